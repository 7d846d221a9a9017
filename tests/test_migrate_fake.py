"""The migrate command's dangerous corners, on a scripted QEMU whose migration state the test drives (what real QEMU
will not do on demand: a reply lost right at the switchover, an interruption at an exact moment, a source already
migrating for someone else). What must hold: the source is never resumed after a completed migration, never
cancelled for a migration this command did not start, and its capabilities are put back."""

from __future__ import annotations

import asyncio
from typing import Any

from fakeqmp import HANG, TRANSCRIPT

from qemu_offload_handshake.core.migration import Ending
from qemu_offload_handshake.migrate import migrate


class Source:
    """A source QEMU's migration: ``active`` for a few polls, then ``pre-switchover``; ``migrate-continue``
    completes it (``lose_reply``: without answering), ``migrate_cancel`` cancels it and resumes the guest."""

    def __init__(self, *, busy: bool = False, lose_reply: bool = False) -> None:
        self.status, self.run = ("active" if busy else "none"), "running"
        self.lose_reply, self.polls = lose_reply, 0
        self.caps = {"return-path": False, "pause-before-switchover": False, "events": True}

    def set_caps(self, args: dict[str, Any]) -> Any:
        if self.status == "active":
            return {"error": {"class": "GenericError", "desc": "There's a migration process in progress"}}
        self.caps.update({c["capability"]: c["state"] for c in args["capabilities"]})
        return {"return": {}}

    def query(self, args: dict[str, Any]) -> Any:
        if self.status == "active":
            self.polls += 1
            if self.polls > 3:
                self.status, self.run = "pre-switchover", "finish-migrate"
        return {"return": {} if self.status == "none" else {"status": self.status}}

    def overrides(self) -> dict[str, Any]:
        def start(args: dict[str, Any]) -> Any:
            self.status = "active"
            return {"return": {}}

        def go(args: dict[str, Any]) -> Any:
            self.status, self.run = "completed", "postmigrate"
            return HANG if self.lose_reply else {"return": {}}

        def cancel(args: dict[str, Any]) -> Any:
            if self.status not in ("completed", "failed", "cancelled"):
                self.status, self.run = "cancelled", "running"
            return {"return": {}}

        def cont(args: dict[str, Any]) -> Any:
            self.run = "running"
            return {"return": {}}

        return {"query-migrate": self.query, "migrate": start, "migrate-continue": go, "migrate_cancel": cancel,
                "cont": cont, "query-status": lambda a: {"return": {"status": self.run}},
                "migrate-set-capabilities": self.set_caps,
                "query-migrate-capabilities": lambda a: {"return": [{"capability": k, "state": v}
                                                                    for k, v in self.caps.items()]}}


DEST = {"migrate-set-capabilities": {"return": {}}, "migrate-incoming": {"return": {}},
        "query-status": {"return": {"status": "inmigrate"}}, "query-migrate": {"return": {}},
        "query-migrate-capabilities": {"return": []}}


async def start(serve: Any, source: Source, dest: dict[str, Any] | None = None) -> tuple[str, str]:
    return await serve(TRANSCRIPT, overrides=source.overrides()), await serve(TRANSCRIPT, overrides=dest or DEST)


async def test_a_migration_that_completes_puts_the_capabilities_back(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    source = Source()
    src, dst = await start(serve, source)
    result = await migrate(src, dst, "unix:/nonexistent.mig", timeout=2)
    assert result.ending is Ending.MIGRATED and result.exit_code == 0, result.reason
    assert source.caps == {"return-path": False, "pause-before-switchover": False, "events": True}
    assert "cont" not in fakes[0].received


async def test_a_source_migrating_for_someone_else_is_left_alone(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    source = Source(busy=True)
    src, dst = await start(serve, source)
    result = await migrate(src, dst, "unix:/nonexistent.mig", timeout=2)
    assert result.ending is Ending.REFUSED and result.exit_code == 2, result.reason
    assert "already migrating" in result.reason
    sent = set(fakes[0].received)
    assert not sent & {"migrate_cancel", "migrate-set-capabilities", "migrate", "cont"}, fakes[0].received
    assert source.status == "active"


async def test_a_destination_not_waiting_is_refused_before_any_change(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    source = Source()
    src, dst = await start(serve, source, {**DEST, "query-status": {"return": {"status": "running"}}})
    result = await migrate(src, dst, "unix:/nonexistent.mig", timeout=2)
    assert result.ending is Ending.REFUSED and "-incoming defer" in result.reason, result.reason
    assert not {"migrate-set-capabilities", "migrate-incoming"} & set(fakes[1].received), fakes[1].received


async def test_a_lost_reply_at_the_switchover_is_still_a_migration(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    """``migrate-continue`` worked but its reply never came: the migration completed, and the source (now
    ``postmigrate``) must not be resumed: ``cont`` would run the VM on both sides."""
    source = Source(lose_reply=True)
    src, dst = await start(serve, source)
    result = await migrate(src, dst, "unix:/nonexistent.mig", timeout=0.5)
    assert result.ending is Ending.MIGRATED, result.reason
    assert "cont" not in fakes[0].received and source.run == "postmigrate"


async def test_an_interruption_during_the_recheck_cancels_and_resumes(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    source = Source()
    src, dst = await start(serve, source)
    holder: dict[str, asyncio.Task[Any]] = {}

    def on_event(event: dict[str, object]) -> None:
        if event.get("event") == "phase" and event.get("phase") == "recheck":
            asyncio.get_running_loop().call_soon(holder["task"].cancel)

    holder["task"] = asyncio.ensure_future(migrate(src, dst, "unix:/nonexistent.mig", timeout=2, on_event=on_event))
    result = await holder["task"]
    assert result.ending is Ending.CANCELLED and "by the operator" in result.reason, result.reason
    assert source.status in ("cancelled", "completed")
    assert source.run in ("running", "postmigrate") and (source.status == "completed") == (source.run ==
                                                                                           "postmigrate")
    assert source.caps["pause-before-switchover"] is False


async def test_a_reader_that_goes_away_does_not_abandon_the_migration(serve) -> None:  # type: ignore[no-untyped-def]
    source = Source()
    src, dst = await start(serve, source)

    def on_event(event: dict[str, object]) -> None:
        raise BrokenPipeError("stdout closed")

    result = await migrate(src, dst, "unix:/nonexistent.mig", timeout=2, on_event=on_event)
    assert result.ending is Ending.MIGRATED and source.status == "completed", result.reason
