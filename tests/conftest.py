"""Shared fixtures: the real-QEMU lab, and a run-wide check that nothing is left behind."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from qemu_offload_handshake import lab

# tests/fakeqmp.py is imported by the tests as "fakeqmp".
sys.path.insert(0, os.path.dirname(__file__))
from fakeqmp import TRANSCRIPT, FakeQMP, load_transcript, transcript_greeting

Serve = Callable[..., Awaitable[str]]
README = Path(__file__).parents[1] / "README.md"


def readme_read_only() -> tuple[frozenset[str], frozenset[str]]:
    """What the README promises the precheck sends: the QMP commands and the HMP lines (``human-monitor-command``)
    named in backticks in its sentence "The precheck sends only read-only commands (...)"."""
    text = " ".join(README.read_text().split())
    start = text.index("The precheck sends only read-only commands (")
    listed = text[start:text.index(")", start)]
    commands, _, hmp = listed.partition("`human-monitor-command` with exactly the line")
    names = frozenset(re.findall(r"`([^`]+)`", commands)) | ({"human-monitor-command"} if hmp else set())
    lines = frozenset(re.findall(r"`([^`]+)`", hmp))
    # the parse itself: the status query and one HMP line at least, and nothing that is not a command name
    assert "x-query-virtio-status" in names and lines and all(re.fullmatch(r"[a-z-]+", n) for n in names), listed
    return names, lines


CI = os.environ.get("CI", "").lower() == "true"
_before: tuple[list[int], list[str], list[str]] = ([], [], [])


def require_lab(*, guest: bool = True, qemu72: bool = True) -> None:
    """Skip a test that needs real QEMU when the machine lacks it; under CI=true, fail instead."""
    problems = lab.prerequisites(guest=guest, qemu72=qemu72)
    if problems:
        message = "real-QEMU prerequisites missing (run scripts/setup.sh): " + "; ".join(problems)
        if CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
async def qlab() -> AsyncIterator[lab.Lab]:
    require_lab()
    async with lab.Lab() as the_lab:
        yield the_lab


def pytest_sessionstart(session: pytest.Session) -> None:
    global _before
    _before = lab.leftovers()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pids, taps, dirs = lab.leftovers()
    new = (sorted(set(pids) - set(_before[0])), sorted(set(taps) - set(_before[1])),
           sorted(set(dirs) - set(_before[2])))
    if any(new):
        print(f"\nLEAK: the run left QEMU processes {new[0]}, tap devices {new[1]} and socket folders {new[2]} behind")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def fakes() -> list[FakeQMP]:
    """The fake servers ``serve`` started in this test, in order: what each actually received."""
    return []


@pytest.fixture
async def serve(fakes: list[FakeQMP]) -> AsyncIterator[Serve]:
    """serve(transcript, **FakeQMP fields) -> a QMP address of a fake server replaying a transcript (default: the
    4-NIC QEMU 10 one), greeting with the transcript's version unless ``version`` is given."""
    tmp = tempfile.mkdtemp(prefix="qoh-fake-")

    async def start(transcript: str = TRANSCRIPT, **kw: Any) -> str:
        version, package = transcript_greeting(transcript)
        server = FakeQMP(load_transcript(transcript), **({"version": version, "package": package} | kw))
        path = f"{tmp}/{len(fakes)}.sock"
        await server.start(path)
        fakes.append(server)
        return f"unix:{path}"

    yield start
    for server in fakes:
        await server.close()
    shutil.rmtree(tmp, ignore_errors=True)
