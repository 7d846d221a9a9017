"""The steps ``migrate.py`` takes on the two QEMUs, each with its QEMU facts (seen on QEMU 10.0.2 unless a source is
named). Every command goes through ``qmp.MigrationQMP`` (the read-only commands plus ``qmp.MIGRATION_COMMANDS``)
with its timeout.

* ``ready``: before anything changes, the destination must wait for a migration (run state ``inmigrate``, no
  migration of its own yet: ``-incoming defer``) and the source must not be migrating already (``query-migrate``
  ``active`` and the like) nor be a destination itself.
* ``capabilities`` / ``restore``: the values of ``return-path`` and ``pause-before-switchover`` before this command
  set them, put back at the end (a source left with ``pause-before-switchover`` on would stop in
  ``pre-switchover`` at the operator's next plain ``migrate`` and stay paused).
* ``settle``: after an interruption, the migration's real end: ``migrate_cancel`` unless QEMU already ended it,
  then ``query-migrate`` until ``completed``, ``failed`` or ``cancelled`` (bounded). A migration that completed
  after all is a migration (its source must never be resumed: ``cont`` on a ``postmigrate`` source is accepted
  by QEMU and would run the VM on both sides).
* ``resume``: a source that was running and whose migration failed or was cancelled is resumed by QEMU itself
  (``migration_iteration_finish``, ``migration/migration.c``); if it is still paused a moment later, ``cont``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from .core.errors import HandshakeError
from .core.migration import progress_of
from .qmp import MigrationQMP

__all__ = ["CAPABILITIES", "capabilities", "migration_status", "ready", "restore", "resume", "run_state", "settle"]

CAPABILITIES = ("return-path", "pause-before-switchover")
_IDLE = ("none", "completed", "failed", "cancelled")  # a source may start a migration from these
_PAUSED = ("paused", "finish-migrate", "postmigrate", "prelaunch")
POLL = 0.05


async def run_state(qmp: MigrationQMP) -> str | None:
    """``query-status``'s run state, None if it cannot be read (QEMU gone)."""
    try:
        status = await qmp.execute("query-status")
    except HandshakeError:
        return None
    return str(status.get("status")) if isinstance(status, Mapping) else None


async def migration_status(qmp: MigrationQMP) -> str:
    """``query-migrate``'s status: ``none`` when QEMU never migrated, ``unknown`` when it cannot be read."""
    try:
        reply = await qmp.execute("query-migrate")
    except HandshakeError:
        return "unknown"
    if isinstance(reply, Mapping) and not reply:
        return "none"  # an empty reply: no migration yet (seen on a fresh QEMU)
    return progress_of(reply).status


async def ready(src: MigrationQMP, dst: MigrationQMP) -> str | None:
    """Why this pair cannot be migrated now (None: it can)."""
    (src_state, dst_state), (src_mig, dst_mig) = await asyncio.gather(
        asyncio.gather(run_state(src), run_state(dst)), asyncio.gather(migration_status(src), migration_status(dst)))
    if dst_state != "inmigrate":
        return (f"the destination is not waiting for a migration (run state {dst_state}): start it with "
                "-incoming defer (are --source and --dest the right way round?)")
    if dst_mig not in ("none", "unknown"):
        return (f"the destination already has a migration ({dst_mig}): start it with -incoming defer, not "
                "-incoming URI")
    if src_state == "inmigrate":
        return "the source is itself waiting for an incoming migration"
    if src_mig not in _IDLE:
        return f"the source is already migrating ({src_mig}); nothing was changed"
    return None


async def capabilities(qmp: MigrationQMP) -> dict[str, bool]:
    """The current values of ``CAPABILITIES``."""
    reply = await qmp.execute("query-migrate-capabilities")
    values = {c.get("capability"): c.get("state") for c in reply if isinstance(c, Mapping)} \
        if isinstance(reply, list) else {}
    return {name: bool(values.get(name)) for name in CAPABILITIES}


async def restore(qmp: MigrationQMP, before: Mapping[str, bool]) -> None:
    """Put the capabilities back as they were (best effort: QEMU may be gone, or refuse during a migration)."""
    if before:
        with contextlib.suppress(HandshakeError):
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": name, "state": state} for name, state in before.items()]})


async def settle(src: MigrationQMP, *, bound: float) -> str:
    """The real end of a migration this command started and was interrupted: cancel it unless it ended, then wait
    (at most ``bound`` seconds) for QEMU's final status; ``unknown`` if it cannot be told."""
    loop = asyncio.get_running_loop()
    end = loop.time() + bound
    status = await migration_status(src)
    if status not in ("completed", "failed", "cancelled", "unknown"):
        with contextlib.suppress(HandshakeError):
            await src.execute("migrate_cancel")
    while status not in ("completed", "failed", "cancelled") and loop.time() < end:
        await asyncio.sleep(POLL)
        status = await migration_status(src)
    return status


async def resume(src: MigrationQMP, *, was_running: bool, status: str) -> str | None:
    """The source as it was before: only after a migration that failed, was cancelled or never started (never after
    ``completed``, never when the end is ``unknown``). Returns its run state."""
    state = await run_state(src)
    if not was_running or status not in ("failed", "cancelled", "none"):
        return state
    for _ in range(40):  # QEMU resumes it itself a moment after the end
        if state not in _PAUSED:
            return state
        await asyncio.sleep(POLL)
        state = await run_state(src)
    with contextlib.suppress(HandshakeError):
        await src.execute("cont")
    return await run_state(src)
