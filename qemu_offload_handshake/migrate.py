"""Guarded migration: precheck, migrate, decide again at the switchover, verify after, never leave the source paused.

``await migrate(source, dest, uri)`` (and ``python -m qemu_offload_handshake migrate``):

1. the precheck (read-only, ``api.precheck``); anything but ``compatible`` is refused before a single command that
   changes either QEMU is sent (``adjustable``: with what to add to the destination's command line);
2. on both QEMUs, through ``qmp.MigrationQMP`` (the read-only commands plus ``qmp.MIGRATION_COMMANDS``, a list
   only this module uses): ``return-path`` (the source learns whether the destination loaded the state, instead of
   reporting ``completed`` while the destination is dead) and ``pause-before-switchover``; ``migrate-incoming`` on
   the destination (started with ``-incoming defer``), ``migrate`` on the source;
3. at ``pre-switchover`` (the source is stopped: its guest cannot change anything now) both sides are probed
   again and decided again (``core.migration.recheck``): ``compatible`` goes on (``migrate-continue``), anything
   else is cancelled (``migrate_cancel``) and the result says what changed since the precheck;
4. after ``completed``: the destination must offer exactly what the source offered, per device as QEMU pairs them.

Whatever ends it early (the destination exits, the connection is cut, the deadline, cancellation by the caller:
Ctrl-C or SIGTERM in the CLI) the source is left as it was: QEMU resumes a source that was running when a migration
fails or is cancelled (seen on 10.0; ``migration_iteration_finish`` in ``migration/migration.c``); if it is still
paused a moment later, ``cont`` resumes it. A source that was paused before stays paused.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from . import migrate_steps as steps
from .api import precheck
from .core.decide import Mode, Verdict
from .core.errors import HandshakeError, UsageError
from .core.migration import Ending, MigrationResult, Progress, offered_differences, progress_of, recheck
from .core.model import VmReport
from .core.policy import Policy
from .core.verdict import Outcome
from .destproc import Destination, start_destination
from .probing import probe_vm
from .qmp import MigrationQMP, parse_address

__all__ = ["migrate", "set_options"]

Event = dict[str, object]
PROGRESS_EVERY = 0.25  # seconds between progress events (status changes are sent at once)
POLL = steps.POLL  # query-migrate while RAM is copied
FAST = 0.005  # near the end and after the switchover (one query-migrate costs about 0.3 ms)


def set_options(adjustments: dict[str, dict[str, str]]) -> tuple[str, ...]:
    """What to add to a destination's command line for ``adjustments``: ``-set device.ID.PROP=VALUE``."""
    out: list[str] = []
    for nic, props in sorted(adjustments.items()):
        for prop, value in sorted(props.items()):
            if nic.startswith("/"):  # a device without an id: -set cannot name it
                out.append(f"(on the -device of {nic}: {prop}={value})")
            else:
                out += ["-set", f"device.{nic}.{prop}={value}"]
    return tuple(out)


class _Run:
    """One migration's state, and its events."""

    def __init__(self, on_event: Callable[[Event], None] | None) -> None:
        self.on_event, self.started = on_event, time.monotonic()
        self.events: list[Event] = []
        self.phase = ""
        self.last_progress = -math.inf

    def emit(self, event: Event) -> None:
        event = {**event, "at_ms": round((time.monotonic() - self.started) * 1000)}
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a reader that went away (a closed pipe) must not abandon a migration
                self.on_event = None

    def enter(self, phase: str, **more: object) -> None:
        if phase != self.phase:
            self.phase = phase
            self.emit({"event": "phase", "phase": phase, **more})


def _near_end(progress: Progress) -> bool:
    """Whether the copy should end within a quarter of a second (then the switchover is watched closely)."""
    if progress.status != "active":
        return progress.status != "setup"
    if progress.remaining is None or not progress.mbps:
        return False
    return progress.remaining * 8 / (progress.mbps * 1e6) < 0.25


async def _until_final(run: _Run, src: MigrationQMP, dst: MigrationQMP, *, deadline: float, check: bool,
                       before: Verdict, mode: Mode, policy: Policy | None,
                       found: dict[str, object]) -> str:
    """Follow the migration to its end (``completed``, ``failed``, ``cancelled``); decide at the switchover."""
    loop = asyncio.get_running_loop()
    while True:
        reply = await src.execute("query-migrate")
        progress = progress_of(reply)
        now = loop.time()
        if progress.status != run.phase or now - run.last_progress >= PROGRESS_EVERY:
            run.enter(progress.status)
            run.last_progress = now
            run.emit(progress.event())
        if progress.final:
            found["error"] = reply.get("error-desc") if isinstance(reply, dict) else None
            return progress.status
        if now > deadline + 30:  # cancelled at the deadline and still not ended: stop watching
            return "unknown"
        if now > deadline and "deadline" not in found:
            found["deadline"] = True
            await src.execute("migrate_cancel")
        elif progress.status == "pre-switchover" and "recheck" not in found:
            run.enter("recheck")
            source_now, dest_now = await asyncio.gather(probe_vm(src, host=socket.gethostname(), side="source"),
                                                        probe_vm(dst, host=socket.gethostname(), side="dest"))
            verdict, changed = recheck(before, source_now, dest_now, mode=mode, policy=policy)
            found.update(recheck=verdict, changed=changed, source_now=source_now)
            run.emit({"event": "recheck", "verdict": verdict.verdict, "changed": list(changed)})
            if check and verdict.outcome is Outcome.COMPATIBLE:
                await src.execute("migrate-continue", {"state": "pre-switchover"})
            elif check:
                await src.execute("migrate_cancel")
            else:  # the re-check disabled (to show what it saves): switch over whatever it says
                await src.execute("migrate-continue", {"state": "pre-switchover"})
            continue  # the switchover takes milliseconds: look again at once
        await asyncio.sleep(FAST if _near_end(progress) else POLL)


async def migrate(source: str, dest: str | None = None, uri: str = "", *, lenient: bool = False,
                  policy: Policy | None = None, timeout: float = 5.0, deadline: float = 600.0,
                  check: bool = True, dest_argv: Sequence[str] | None = None, dest_uri: str | None = None,
                  on_event: Callable[[Event], None] | None = None) -> MigrationResult:
    """Migrate ``source`` (a QMP address) to ``dest`` (the incoming QEMU's QMP address, started with ``-incoming
    defer``) over ``uri`` (QEMU's migration URI, e.g. ``unix:/run/m.sock`` or ``tcp:10.0.0.2:4444``), guarded as the
    module docstring says. ``dest_argv`` instead of ``dest``: start the destination from that QEMU command line
    (``-incoming defer`` and a QMP socket added; adjusted when the precheck is adjustable); it keeps running after a
    migration and is killed otherwise. ``dest_uri``: where the destination listens, when the source reaches it at
    another address (NAT, a relay); default ``uri``. ``check`` False skips the decision at the switchover (to show
    what it saves). Raises only ``UsageError``; everything else is the result."""
    if (dest is None) == (dest_argv is None):
        raise UsageError("give either dest (a QMP address) or dest_argv (a QEMU command line), not both or neither")
    for given in (uri, dest_uri) if dest_uri is not None else (uri,):
        if not isinstance(given, str) or not given or given.startswith("-") or any(c.isspace() for c in given):
            raise UsageError(f"migration URI {given!r}: e.g. unix:/run/m.sock or tcp:HOST:PORT")
    parse_address(source)
    if dest is not None:
        parse_address(dest)
    for name, value in (("timeout", timeout), ("deadline", deadline)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
    run = _Run(on_event)
    mode = Mode.LENIENT if lenient else Mode.STRICT
    started: Destination | None = None
    run.enter("precheck")
    try:
        if dest_argv is not None:
            started, verdict = await _start_and_check(run, source, dest_argv, lenient=lenient, policy=policy,
                                                      timeout=timeout)
            dest = started.address
        else:
            verdict = await precheck(source, dest, lenient=lenient, policy=policy, timeout=timeout)
        run.emit({"event": "precheck", "verdict": verdict.verdict, "adjustments": verdict.adjustments})
        if verdict.outcome is not Outcome.COMPATIBLE:
            return _refused(run, verdict)
        assert dest is not None
        result = await _migrate(run, source, dest, (uri, dest_uri or uri), verdict, mode=mode, policy=policy,
                                timeout=timeout, deadline=deadline, check=check)
        if started is not None:
            if result.ending is Ending.MIGRATED:
                started.keep()
                result = replace(result, dest_pid=started.pid, dest_address=started.address)
            else:
                result = replace(result, dest_state="killed (started by this command)")
        return result
    finally:
        if started is not None:
            await asyncio.shield(started.close())  # kills it unless kept


def _refused(run: _Run, verdict: Verdict) -> MigrationResult:
    why = {Outcome.BLOCKED: "the precheck blocks it", Outcome.UNKNOWN: "the precheck could not decide",
           Outcome.ADJUSTABLE: "the destination must be started with the adjustments first"}[verdict.outcome]
    run.enter("refused")
    return MigrationResult(Ending.REFUSED, f"not migrated: {why}; nothing was sent to either QEMU", verdict,
                           add_to_dest=set_options(verdict.adjustments), events=run.events)


async def _start_and_check(run: _Run, source: str, argv: Sequence[str], *, lenient: bool, policy: Policy | None,
                           timeout: float) -> tuple[Destination, Verdict]:
    """Start the destination from ``argv``; if the precheck is adjustable, start it again with the adjustments.
    Whatever goes wrong (cancellation included), a destination started here is not left behind."""
    started = await start_destination(argv, timeout=max(timeout, 10.0))
    try:
        verdict = await precheck(source, started.address, lenient=lenient, policy=policy, timeout=timeout)
        if verdict.outcome is Outcome.ADJUSTABLE:
            run.emit({"event": "adjusting", "adjustments": verdict.adjustments})
            await started.close()
            started = await start_destination(argv, timeout=max(timeout, 10.0), adjustments=verdict.adjustments)
            verdict = await precheck(source, started.address, lenient=lenient, policy=policy, timeout=timeout)
    except BaseException:
        await asyncio.shield(started.close())
        raise
    return started, verdict


async def _migrate(run: _Run, source: str, dest: str, uris: tuple[str, str], before: Verdict, *, mode: Mode,
                   policy: Policy | None, timeout: float, deadline: float, check: bool) -> MigrationResult:
    loop = asyncio.get_running_loop()
    found: dict[str, object] = {"check": check}
    src = MigrationQMP(parse_address(source), timeout=timeout)
    dst = MigrationQMP(parse_address(dest), timeout=timeout)
    caps: dict[str, dict[str, bool]] = {}
    was_running, sent, status = False, False, "none"
    try:
        try:
            await asyncio.gather(src.connect(), dst.connect())
            problem = await steps.ready(src, dst)
            if problem is not None:
                run.enter("refused")
                return MigrationResult(Ending.REFUSED, f"not migrated: {problem}", before,
                                       source_state=await steps.run_state(src), dest_state=await steps.run_state(dst),
                                       events=run.events)
            was_running = await steps.run_state(src) == "running"
            run.enter("setup")
            caps = {"source": await steps.capabilities(src), "dest": await steps.capabilities(dst)}
            turn_on = {"capabilities": [{"capability": c, "state": True} for c in steps.CAPABILITIES]}
            await asyncio.gather(src.execute("migrate-set-capabilities", turn_on),
                                 dst.execute("migrate-set-capabilities", turn_on))
            await dst.execute("migrate-incoming", {"uri": uris[1]})
            await src.execute("migrate", {"uri": uris[0]})
            sent = True
            status = await _until_final(run, src, dst, deadline=loop.time() + deadline, check=check,
                                        before=before, mode=mode, policy=policy, found=found)
        except (asyncio.CancelledError, Exception) as err:  # whatever it is, the migration must end properly
            if isinstance(err, asyncio.CancelledError):
                found["interrupted"] = True
            else:
                found["error"] = str(err) if isinstance(err, HandshakeError) else f"{type(err).__name__}: {err}"
            status = await asyncio.shield(steps.settle(src, bound=timeout + 10)) if sent else "none"
        return await asyncio.shield(_conclude(run, src, dst, status, before, found, was_running=was_running,
                                              sent=sent))
    finally:
        await asyncio.shield(_close(src, dst, caps))


async def _close(src: MigrationQMP, dst: MigrationQMP, caps: dict[str, dict[str, bool]]) -> None:
    """Put the capabilities back on both sides (the destination that now runs the VM too), then disconnect."""
    await asyncio.gather(steps.restore(src, caps.get("source", {})), steps.restore(dst, caps.get("dest", {})))
    await asyncio.gather(src.close(), dst.close())


async def _conclude(run: _Run, src: MigrationQMP, dst: MigrationQMP, status: str, before: Verdict,
                    found: dict[str, object], *, was_running: bool, sent: bool) -> MigrationResult:
    verdict = found.get("recheck")
    rechecked = verdict if isinstance(verdict, Verdict) else None
    seen = found.get("changed")
    changed: tuple[str, ...] = tuple(str(c) for c in seen) if isinstance(seen, tuple) else ()
    if status == "completed":
        source_now = found.get("source_now")
        offered: VmReport | None = source_now if isinstance(source_now, VmReport) else before.source
        try:
            after = await probe_vm(dst, host=socket.gethostname(), side="dest")
            differences = offered_differences(offered, after) if offered is not None else ("the source's report "
                                                                                          "is missing",)
        except HandshakeError as err:
            differences = (f"the destination could not be read after the migration: {err}",)
        run.enter("verified" if not differences else "verify-failed")
        why = "migrated" + ("; the destination offers what the source offered" if not differences else
                            "; but the destination's features differ (the VM runs on the destination)")
        if found.get("interrupted"):
            why += "; an interruption came after the switchover: the migration had completed"
        return MigrationResult(Ending.MIGRATED, why, before, rechecked, changed, differences,
                               await steps.run_state(src), await steps.run_state(dst), events=run.events)
    source_state = await steps.resume(src, was_running=was_running, status=status)
    if found.get("interrupted"):
        ending, why = Ending.CANCELLED, "cancelled by the operator"
    elif rechecked is not None and rechecked.outcome is not Outcome.COMPATIBLE and status == "cancelled" \
            and found.get("check"):
        ending, why = Ending.CANCELLED, (f"cancelled at the switchover: the decision there is {rechecked.verdict}"
                                         + (f" ({'; '.join(changed)})" if changed else ""))
    elif found.get("deadline"):
        ending, why = Ending.FAILED, "cancelled: the migration did not end before the deadline"
    else:
        ending, why = Ending.FAILED, f"the migration {status}: {found.get('error') or 'no reason given'}"
        if rechecked is not None and rechecked.outcome is not Outcome.COMPATIBLE and not found.get("check"):
            why += f" (the decision at the switchover was {rechecked.verdict}, not acted on: re-check disabled)"
    if status == "unknown":
        why += "; QEMU did not say how the migration ended: check the source before acting"
    run.enter(ending.value)
    return MigrationResult(ending, f"{why}; source {source_state or 'gone'}", before, rechecked, changed, None,
                           source_state, await steps.run_state(dst), events=run.events)
