"""``migrate``'s libvirt form: annotate and migrate a domain that libvirt owns, in one command.

``await migrate_libvirt("libvirt:vm1", "qemu+ssh://dst/system")``: the domain is probed through libvirt (read-only
passthrough) and its report stored in its metadata (``qmp_libvirt.annotate``), then libvirt migrates it live
(``virDomainMigrate3`` with ``VIR_MIGRATE_LIVE``, as ``virsh migrate --live DOMAIN URI`` does), so the destination's
hook (``install-libvirt-hook``) decides from the report before any destination QEMU starts. libvirt itself keeps the
source running when a migration fails. After it completed, the destination domain is read through libvirt and must
offer exactly what the source offered.

A refusal by the hook comes back in libvirt's error ("Hook script execution failed: ... qemu-offload-handshake:
blocked: net0: ..."): the result is ``refused`` with the hook's reason (exit 1, or 4 when it could not decide).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Any

from .core.decide import Mode
from .core.errors import HandshakeError, UsageError
from .core.migration import Ending, MigrationResult, offered_differences
from .core.model import VmReport
from .core.rules import severity_of
from .core.verdict import Finding, Outcome, Verdict
from .core.wire import decode
from .probing import probe_vm
from .qmp_libvirt import LibvirtQMP, annotate, binding, parse_libvirt

__all__ = ["migrate_libvirt"]

_HOOK = re.compile(r"qemu-offload-handshake: (blocked|unknown): (.*)")  # libvirt_hook's refusals
_STATES = {1: "running", 3: "paused", 5: "shut off", 6: "crashed", 7: "pmsuspended"}


def _verdict(outcome: Outcome, code: str, why: str, report: VmReport | None) -> Verdict:
    finding = Finding("", severity_of(code, Mode.STRICT), code, why)
    return Verdict(outcome, Mode.STRICT, (finding,), source=report)


def _migrate_blocking(domain: str, src_uri: str, dest_uri: str, migrate_uri: str | None) -> None:
    libvirt, _ = binding()
    src = libvirt.open(src_uri)
    try:
        dest = libvirt.open(dest_uri)
        try:
            params = {libvirt.VIR_MIGRATE_PARAM_URI: migrate_uri} if migrate_uri else {}
            src.lookupByName(domain).migrate3(dest, params, libvirt.VIR_MIGRATE_LIVE)
        finally:
            dest.close()
    finally:
        src.close()


def _abort_blocking(domain: str, src_uri: str) -> None:
    libvirt, _ = binding()
    conn = libvirt.open(src_uri)
    try:
        conn.lookupByName(domain).abortJob()
    except libvirt.libvirtError:
        pass  # no job any more: it ended on its own
    finally:
        conn.close()


def _state_blocking(domain: str, uri: str) -> str | None:
    libvirt, _ = binding()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return None
    try:
        state = conn.lookupByName(domain).state()[0]
    except libvirt.libvirtError:
        return None  # not (or no longer) there
    finally:
        conn.close()
    return _STATES.get(state, f"state {state}")


async def _state(domain: str, uri: str, timeout: float) -> str | None:
    try:
        return await asyncio.wait_for(asyncio.to_thread(_state_blocking, domain, uri), timeout + 5)
    except TimeoutError:
        return None


async def migrate_libvirt(source: str, dest_uri: str, *, key: bytes | None = None, timeout: float = 5.0,
                          deadline: float = 600.0, migrate_uri: str | None = None,
                          on_event: Callable[[dict[str, object]], None] | None = None) -> MigrationResult:
    """Annotate ``source`` (``libvirt:DOMAIN[?uri=URI]``) and migrate it live to the libvirt at ``dest_uri``
    (``migrate_uri``: where the migration stream goes, if not libvirt's choice)."""
    domain, src_uri = parse_libvirt(source)
    if not dest_uri or any(c.isspace() for c in dest_uri):
        raise UsageError(f"libvirt destination URI {dest_uri!r}: e.g. qemu+ssh://dst/system")
    events: list[dict[str, object]] = []

    def emit(event: dict[str, object]) -> None:
        events.append(event)
        if on_event is not None:
            with contextlib.suppress(Exception):  # a reader that went away does not stop a migration
                on_event(event)

    emit({"event": "phase", "phase": "annotate"})
    try:
        report = decode(await annotate(domain, uri=src_uri, key=key, timeout=timeout), key=key)
    except HandshakeError as err:
        return MigrationResult(Ending.REFUSED, f"not migrated: the domain could not be read: {err}",
                               _verdict(Outcome.UNKNOWN, "probe-failed", str(err), None), events=events)
    assert isinstance(report, VmReport)
    checked = _verdict(Outcome.COMPATIBLE, "handshake", "left to the destination's libvirt hook (a destination "
                       "without it migrates unchecked: the features are verified afterwards)", report)
    emit({"event": "phase", "phase": "migrate"})
    libvirt, _ = binding()
    try:
        await asyncio.wait_for(asyncio.to_thread(_migrate_blocking, domain, src_uri, dest_uri, migrate_uri),
                               deadline)
    except (TimeoutError, asyncio.CancelledError) as err:
        with contextlib.suppress(TimeoutError):  # libvirt resumes the source when its job is aborted
            await asyncio.shield(asyncio.wait_for(asyncio.to_thread(_abort_blocking, domain, src_uri), timeout + 5))
        why = "cancelled by the operator" if isinstance(err, asyncio.CancelledError) else \
            "cancelled: the migration did not end before the deadline"
        state, there = await asyncio.gather(_state(domain, src_uri, timeout), _state(domain, dest_uri, timeout))
        if there == "running" and state is None:  # it had completed after all: the VM runs on the destination
            return MigrationResult(Ending.MIGRATED, f"migrated through libvirt ({why} too late to stop it; not "
                                                    "verified)", checked, dest_state=there, events=events)
        return MigrationResult(Ending.CANCELLED, f"{why}; source {state or 'gone'}", checked, source_state=state,
                               dest_state=there, events=events)
    except libvirt.libvirtError as err:
        message = str(err.get_error_message() or err)
        state = await _state(domain, src_uri, timeout)
        hook = _HOOK.search(message)
        if hook:
            outcome = Outcome.UNKNOWN if hook.group(1) == "unknown" else Outcome.BLOCKED
            code = "hook-undecided" if outcome is Outcome.UNKNOWN else "hook-refused"
            line = hook.group(0).strip()[:900]
            return MigrationResult(Ending.REFUSED, f"not migrated: the destination's hook refused: {line}; source "
                                                   f"{state or 'gone'}", _verdict(outcome, code, line, report),
                                   source_state=state, events=events)
        return MigrationResult(Ending.FAILED, f"the migration failed: {message[:900]}; source {state or 'gone'}",
                               checked, source_state=state, events=events)
    emit({"event": "phase", "phase": "verify"})
    try:
        qmp: Any = LibvirtQMP(domain, uri=dest_uri, timeout=timeout)
        async with qmp:
            after = await probe_vm(qmp, host=dest_uri, side="dest")
        differences = offered_differences(report, after)
    except HandshakeError as err:
        differences = (f"the destination could not be read after the migration: {err}",)
    state = await _state(domain, dest_uri, timeout)
    return MigrationResult(Ending.MIGRATED, "migrated through libvirt" + (
        "; the destination offers what the source offered" if not differences else
        "; but the destination's features differ (the VM runs on the destination)"), checked, None, (), differences,
        await _state(domain, src_uri, timeout), state, events=events)
