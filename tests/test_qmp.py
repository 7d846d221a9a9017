"""The read-only QMP connection: the allowlist holds before anything is sent; addresses parse or say why not."""

from __future__ import annotations

import pytest
from conftest import Serve, readme_read_only
from fakeqmp import FakeQMP

from qemu_offload_handshake import CommandNotAllowedError, UsageError
from qemu_offload_handshake.qmp import HMP_READ_ONLY, READ_ONLY_COMMANDS, ReadOnlyQMP, parse_address


def test_the_allowlist_is_the_readmes_list() -> None:
    commands, hmp_lines = readme_read_only()
    assert commands == READ_ONLY_COMMANDS
    assert hmp_lines == HMP_READ_ONLY


async def test_a_command_outside_the_allowlist_is_refused_before_it_is_sent(serve: Serve, fakes: list[FakeQMP]) -> None:
    address = await serve()
    async with ReadOnlyQMP(parse_address(address)) as qmp:
        for command in ("quit", "stop", "migrate", "device_del", "qom-set", "human-monitor-command"):
            with pytest.raises(CommandNotAllowedError, match=command):
                await qmp.execute(command)
        for line in ("quit", "info networks", "info network; quit", " info network", "info network\nquit"):
            with pytest.raises(CommandNotAllowedError, match="human-monitor-command"):
                await qmp.execute("human-monitor-command", {"command-line": line})
        await qmp.execute("query-name")  # the connection works: what was refused was simply not sent
    # what the server received, not what the client meant to send: the handshake and the one allowed command
    assert fakes[0].received == ["qmp_capabilities", "query-name"]
    assert fakes[0].hmp_lines == []


@pytest.mark.parametrize(("text", "parsed"), [
    ("unix:/run/qmp.sock", "/run/qmp.sock"), ("/run/qmp.sock", "/run/qmp.sock"), ("qmp.sock", "qmp.sock"),
    ("tcp:10.0.0.2:4444", ("10.0.0.2", 4444)), ("tcp:[::1]:4444", ("::1", 4444)),
])
def test_addresses(text: str, parsed: object) -> None:
    assert parse_address(text) == parsed


@pytest.mark.parametrize("text", ["", " ", "tcp:host", "tcp:host:0", "tcp:host:65536", "ssh:host", "unix:"])
def test_bad_addresses_name_the_problem(text: str) -> None:
    with pytest.raises(UsageError, match=r"QMP address|empty"):
        parse_address(text)
