"""The async API for orchestrators: probe both QEMUs concurrently, then decide.

    verdict = await precheck("unix:/run/src.qmp", "tcp:10.0.0.2:4444")
    if verdict.verdict == "adjustable":
        argv = apply_adjustments(dest_argv, verdict.adjustments)
"""

from __future__ import annotations

import asyncio
import math

from .core.decide import Mode, Verdict, decide
from .core.errors import HandshakeError, UsageError
from .core.model import VmReport
from .core.policy import Policy
from .probing import probe_vm
from .qmp import ReadOnlyQMP, describe, parse_address

__all__ = ["precheck", "probe"]


async def probe(address: str, *, timeout: float = 5.0, host: str | None = None,
                side: str | None = None) -> VmReport:
    """One side's report, read over QMP with read-only commands; ``ProbeError`` if QEMU cannot be read at all.
    ``side`` ("source" or "dest") is recorded in the report when given."""
    target = parse_address(address)
    async with ReadOnlyQMP(target, timeout=timeout) as qmp:
        return await probe_vm(qmp, host=host or describe(target), side=side)


async def _side(address: str, name: str, timeout: float) -> tuple[VmReport | None, str | None]:
    try:
        return await probe(address, timeout=timeout, side="source" if name == "source" else "dest"), None
    except UsageError:
        raise
    except HandshakeError as err:  # unreachable, hung, or answers that make no valid report: unknown, not a raise
        return None, f"the {name} could not be probed: {err}"


async def precheck(source: str, dest: str, *, lenient: bool = False, policy: Policy | None = None,
                   timeout: float = 5.0) -> Verdict:
    """Probe ``source`` and ``dest`` (QMP addresses) concurrently and decide. Never raises for an unreachable or
    hung QEMU, or for any reply QEMU gives: that is an ``unknown`` verdict with the reason. Bad addresses and a
    timeout that is not a positive finite number raise ``UsageError``."""
    parse_address(source)
    parse_address(dest)
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
    (src, p1), (dst, p2) = await asyncio.gather(_side(source, "source", timeout), _side(dest, "destination", timeout))
    return decide(src, dst, mode=Mode.LENIENT if lenient else Mode.STRICT, policy=policy,
                  problems=[p for p in (p1, p2) if p])
