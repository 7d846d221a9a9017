"""Two allowlists: the precheck's read-only one refuses every migration command before it is sent, and a whole
precheck (and a handshake's answer) sends none of them; the migration's list is used only by ``migrate``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qemu_offload_handshake
from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.errors import CommandNotAllowedError
from qemu_offload_handshake.qmp import MIGRATION_COMMANDS, READ_ONLY_COMMANDS, MigrationQMP, ReadOnlyQMP

PACKAGE = Path(qemu_offload_handshake.__file__).parent


def test_the_lists_are_apart() -> None:
    assert not (MIGRATION_COMMANDS & READ_ONLY_COMMANDS)
    assert {"migrate", "migrate-continue", "migrate_cancel", "cont"} <= MIGRATION_COMMANDS
    assert ReadOnlyQMP.allowed == READ_ONLY_COMMANDS
    assert MigrationQMP.allowed == READ_ONLY_COMMANDS | MIGRATION_COMMANDS


@pytest.mark.parametrize("command", sorted(MIGRATION_COMMANDS))
async def test_the_read_only_client_refuses_each_migration_command(command: str, serve, fakes) -> None:  # type: ignore[no-untyped-def]
    address = await serve()
    async with ReadOnlyQMP(address.removeprefix("unix:"), timeout=2) as qmp:
        with pytest.raises(CommandNotAllowedError, match="not a read-only command"):
            await qmp.execute(command, {})
    assert command not in fakes[0].received


async def test_a_precheck_sends_no_migration_command(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    verdict = await precheck(await serve(), await serve())
    assert verdict.verdict == "compatible"
    for fake in fakes:
        assert fake.received and not set(fake.received) & MIGRATION_COMMANDS, fake.received


def test_only_migrate_uses_the_migration_client() -> None:
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "lab":
            continue  # the lab drives QEMU as it likes; it is not the product
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        if "MigrationQMP" in names and path.name != "qmp.py":
            users.append(path.name)
    assert users == ["migrate.py", "migrate_steps.py"], users


async def test_a_handshake_answer_sends_no_migration_command(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    import secrets
    import time

    from qemu_offload_handshake.answering import Destination, answer_offer
    from qemu_offload_handshake.api import probe
    from qemu_offload_handshake.core.exchange import Offer
    source, dest = await serve(), await serve()
    offer = Offer(await probe(source), secrets.token_bytes(16), time.time_ns() // 1_000_000, dest_address=dest)
    assert (await answer_offer(offer, Destination(qemu=None))).outcome.value == "compatible"
    assert fakes[1].received and not set(fakes[1].received) & MIGRATION_COMMANDS, fakes[1].received
