"""The async API for orchestrators: probe both QEMUs concurrently, then decide.

    verdict = await precheck("unix:/run/src.qmp", "tcp:10.0.0.2:4444")
    if verdict.verdict == "adjustable":
        argv = apply_adjustments(dest_argv, verdict.adjustments)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import ssl
import time
from collections.abc import Sequence

from .core.conclude import verdict_of
from .core.decide import Mode, Verdict, decide
from .core.errors import HandshakeError, UsageError
from .core.exchange import Offer, Prepare, Refusal
from .core.model import VmReport
from .core.platform import HostDump
from .core.policy import Policy
from .core.predict import decide_from_dump
from .probing import probe_vm
from .qmp import ReadOnlyQMP, describe, parse_address

__all__ = ["handshake", "precheck", "probe"]


async def probe(address: str, *, timeout: float = 5.0, host: str | None = None,
                side: str | None = None) -> VmReport:
    """One side's report, read over QMP with read-only commands; ``ProbeError`` if QEMU cannot be read at all.
    ``side`` ("source" or "dest") is recorded in the report when given."""
    qmp, where = client(address, timeout)
    async with qmp:
        return await probe_vm(qmp, host=host or where, side=side)


def client(address: str, timeout: float) -> tuple[ReadOnlyQMP, str]:
    """The read-only client for an address (``libvirt:DOMAIN`` goes through libvirt's QMP passthrough,
    ``qmp_libvirt``), and the address in words."""
    if address.startswith("libvirt:"):
        from .qmp_libvirt import LibvirtQMP, parse_libvirt
        domain, uri = parse_libvirt(address)
        return LibvirtQMP(domain, uri=uri, timeout=timeout), address
    target = parse_address(address)
    return ReadOnlyQMP(target, timeout=timeout), describe(target)


def check_address(address: str) -> None:
    """``UsageError`` for an address that is none of ``unix:/path``, a path, ``tcp:HOST:PORT``, ``libvirt:DOMAIN``."""
    if isinstance(address, str) and address.startswith("libvirt:"):
        from .qmp_libvirt import parse_libvirt
        parse_libvirt(address)
    else:
        parse_address(address)


async def _side(address: str, name: str, timeout: float) -> tuple[VmReport | None, str | None]:
    try:
        return await probe(address, timeout=timeout, side="source" if name == "source" else "dest"), None
    except UsageError:
        raise
    except HandshakeError as err:  # unreachable, hung, or answers that make no valid report: unknown, not a raise
        return None, f"the {name} could not be probed: {err}"


async def precheck(source: str, dest: str | None = None, *, dest_dump: HostDump | None = None,
                   lenient: bool = False, policy: Policy | None = None, timeout: float = 5.0) -> Verdict:
    """Probe ``source`` and ``dest`` (QMP addresses) concurrently and decide. Never raises for an unreachable or
    hung QEMU, or for any reply QEMU gives: that is an ``unknown`` verdict with the reason. Bad addresses and a
    timeout that is not a positive finite number raise ``UsageError``.

    With ``dest_dump`` instead of ``dest`` (no destination QEMU exists yet), the destination is predicted from
    its host's dump as if started with the source's command line (``core.predict``); the verdict lists the
    predicted facts (``Verdict.predicted``) and the dump (``Verdict.predicted_from``)."""
    if (dest is None) == (dest_dump is None):
        raise UsageError("give either dest (a QMP address) or dest_dump (a host dump), not both or neither")
    check_address(source)
    if dest is not None:
        check_address(dest)
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
    mode = Mode.LENIENT if lenient else Mode.STRICT
    if dest_dump is not None:
        if not isinstance(dest_dump, HostDump):
            raise UsageError(f"dest_dump must be a HostDump, not {type(dest_dump).__name__}")
        src, problem = await _side(source, "source", timeout)
        if src is None:
            return decide(None, None, mode=mode, policy=policy, problems=[problem or "the source was not probed"])
        return decide_from_dump(src, dest_dump, mode=mode, policy=policy)
    assert dest is not None
    (src, p1), (dst, p2) = await asyncio.gather(_side(source, "source", timeout), _side(dest, "destination", timeout))
    return decide(src, dst, mode=mode, policy=policy, problems=[p for p in (p1, p2) if p])


class _NoSource(HandshakeError):
    """The source could not be probed: no offer to make (the verdict is unknown)."""


async def handshake(source: str, *, agent: str | None = None, ssl_context: ssl.SSLContext | None = None,
                    ssh: str | None = None, remote_command: str | None = None, ssh_options: Sequence[str] = (),
                    dest: str | None = None, lenient: bool = False, policy: Policy | None = None,
                    timeout: float = 5.0, answer_timeout: float = 60.0) -> Verdict:
    """Probe ``source`` (a local QMP address), offer its report to the destination host and decide from its
    answer: over TLS to an agent (``agent="HOST:PORT"`` with ``ssl_context`` from ``transport.client_context``;
    None: plaintext, loopback only) or through ``ssh`` (``ssh="[USER@]HOST"`` or ``ssh://USER@HOST:PORT``, running
    ``remote_command``, default ``python3 -m qemu_offload_handshake answer``). ``dest``: the incoming QEMU's QMP
    address as seen on the destination host (None: the destination starts a scratch QEMU like the source, or
    answers from its dump). The verdict is the one a direct ``precheck`` of the pair gives, with how the
    destination got its truth (finding ``handshake``). Like ``precheck``, a destination that cannot be asked, or
    refuses, is an ``unknown`` verdict with the reason, not a raise; bad arguments raise ``UsageError``."""
    from .transport import (
        DEFAULT_REMOTE_COMMAND,
        ExchangeError,
        check_ssh_destination,
        exchange_ssh,
        exchange_tls,
        parse_hostport,
    )

    if (agent is None) == (ssh is None):
        raise UsageError("give either agent (HOST:PORT) or ssh (a destination for ssh), not both or neither")
    check_address(source)
    target = parse_hostport(agent, "agent") if agent is not None else None
    if ssh is not None:
        check_ssh_destination(ssh)
    if dest is not None:  # checked here, used there: it is the destination host's address
        check_address(dest)
        try:
            Prepare(bytes(16), dest)
        except ValueError as err:
            raise UsageError(f"dest {dest[:60]!r}...: {err}") from None
    for name, value in (("timeout", timeout), ("answer_timeout", answer_timeout)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
    mode = Mode.LENIENT if lenient else Mode.STRICT
    nonce = secrets.token_bytes(16)
    # The connection (and, with an incoming QEMU named, the destination's probe of it: Prepare) goes on while the
    # source is probed: a direct precheck probes both at once too.
    prepare = Prepare(nonce, dest) if dest is not None else None

    async def make_offer() -> Offer:
        src, problem = await _side(source, "source", timeout)
        if src is None:
            raise _NoSource(problem or "the source was not probed")
        return Offer(src, nonce, time.time_ns() // 1_000_000, mode,
                     tuple(sorted((policy or Policy()).properties.items())), dest)

    offer_task = asyncio.ensure_future(make_offer())
    try:
        if target is not None:
            reply = await exchange_tls(offer_task, *target, ssl_context=ssl_context, prepare=prepare,
                                       timeout=answer_timeout)
        else:
            assert ssh is not None
            reply = await exchange_ssh(offer_task, ssh, prepare=prepare, ssh_options=ssh_options,
                                       remote_command=remote_command or DEFAULT_REMOTE_COMMAND, timeout=answer_timeout)
    except _NoSource as err:
        return decide(None, None, mode=mode, policy=policy, problems=[str(err)])
    except ExchangeError as err:
        try:
            src = (await offer_task).source
        except _NoSource as no_source:
            return decide(None, None, mode=mode, policy=policy, problems=[str(no_source)])
        return decide(src, None, mode=mode, policy=policy, problems=[f"the destination could not be asked: {err}"])
    finally:
        if not offer_task.done():
            offer_task.cancel()
            with contextlib.suppress(BaseException):
                await offer_task
    offer = offer_task.result()
    src = offer.source
    if isinstance(reply, Refusal):
        return decide(src, None, mode=mode, policy=policy,
                      problems=[f"the destination refused the offer ({reply.code}): {reply.message}"])
    return verdict_of(offer, reply)
