"""The table of commands that crash a QEMU version: consulted before anything is sent, and listed in the README."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from fakeqmp import FakeQMP, load_transcript, transcript_greeting

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.errors import UnsafeCommandError
from qemu_offload_handshake.core.quirks import KNOWN_CRASHES, command_key, known_crash
from qemu_offload_handshake.qmp import ReadOnlyQMP

README = Path(__file__).resolve().parents[1] / "README.md"
STATUS = "x-query-virtio-status"


@pytest.mark.parametrize(("version", "listed"), [
    ((7, 2, 22), False), ((10, 0, 2), False), ((10, 2, 2), False), ((11, 0, 0), False), ((11, 1, 0), True),
    ((11, 1, 3), True), ((12, 0, 0), True), (None, True)])
def test_status_query_is_unsafe_from_11_1_on_and_when_the_version_is_unknown(
        version: tuple[int, int, int] | None, listed: bool) -> None:
    assert (known_crash(STATUS, {"path": "/x"}, version) is not None) is listed
    hmp = {"command-line": "info virtio-status /machine/peripheral/net0/virtio-backend"}
    assert (known_crash("human-monitor-command", hmp, version) is not None) is listed
    assert known_crash("human-monitor-command", {"command-line": "info network"}, version) is None
    assert known_crash("qom-list-get", None, version) is None


def test_hmp_lines_are_keyed_by_their_command_words() -> None:
    assert command_key("human-monitor-command", {"command-line": "info virtio-status /p"}) == "hmp:info virtio-status"
    assert command_key("human-monitor-command", {"command-line": "quit"}) == "hmp:quit"
    assert command_key(STATUS, {"path": "/p"}) == STATUS


def test_every_entry_has_its_evidence_and_is_in_the_readme() -> None:
    text = README.read_text()
    section = text[text.index("### Commands known to crash QEMU"):]
    for entry in KNOWN_CRASHES:
        assert entry.effect and entry.evidence
        row = next(line for line in section.splitlines() if f"`{entry.command.removeprefix('hmp:')}`" in line)
        first = ".".join(map(str, entry.first))
        assert first in row, row
        assert ("not fixed" in row) if entry.fixed is None else (".".join(map(str, entry.fixed)) in row)


async def _fake(version: tuple[int, int, int] | None, transcript: str) -> tuple[FakeQMP, str]:
    path = f"{tempfile.mkdtemp(prefix='qoh-fake-')}/q.sock"
    server = FakeQMP(load_transcript(transcript), version=version, package=transcript_greeting(transcript)[1])
    await server.start(path)
    return server, path


@pytest.mark.parametrize(("version", "transcript"), [((11, 1, 3), "qemu111-2nics-booted"),
                                                     ((11, 1, 3), "qemu10-4nics-booted"),
                                                     (None, "qemu111-2nics-booted")])
async def test_nothing_from_the_table_reaches_a_listed_version(
        version: tuple[int, int, int] | None, transcript: str) -> None:
    server, path = await _fake(version, transcript)
    try:
        verdict = await precheck(f"unix:{path}", f"unix:{path}")
        assert verdict.verdict in ("compatible", "unknown")
        async with ReadOnlyQMP(path) as qmp:
            with pytest.raises(UnsafeCommandError, match=STATUS):
                await qmp.execute(STATUS, {"path": "/machine/peripheral/net0/virtio-backend"})
            with pytest.raises(UnsafeCommandError, match="info virtio-status"):
                await qmp.execute("human-monitor-command", {"command-line": "info virtio-status /p"})
        # what the server actually received, not what the client meant to send
        assert STATUS not in server.received
        assert server.received.count("human-monitor-command") == 2  # "info network", once per precheck side
        assert not any(re.match(r"info virtio-status", c) for c in server.hmp_lines)
    finally:
        await server.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


async def test_an_older_qemu_still_gets_the_status_query() -> None:
    server, path = await _fake((10, 0, 2), "qemu10-4nics-booted")
    try:
        verdict = await precheck(f"unix:{path}", f"unix:{path}")
        assert verdict.verdict == "compatible"
        assert server.received.count(STATUS) == 8  # 4 NICs, both sides
    finally:
        await server.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
