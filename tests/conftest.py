"""Shared fixtures: the real-QEMU lab, and a run-wide check that nothing is left behind."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from qemu_offload_handshake import lab

# tests/fakeqmp.py is imported by the tests as "fakeqmp".
sys.path.insert(0, os.path.dirname(__file__))
from fakeqmp import TRANSCRIPT, FakeQMP, load_transcript, transcript_greeting

Serve = Callable[..., Awaitable[str]]

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
async def serve() -> AsyncIterator[Serve]:
    """serve(**FakeQMP fields) -> a QMP address of a fake server replaying the 4-NIC QEMU 10 transcript."""
    tmp = tempfile.mkdtemp(prefix="qoh-fake-")
    servers: list[FakeQMP] = []

    async def start(transcript: str = TRANSCRIPT, **kw: Any) -> str:
        version, package = transcript_greeting(transcript)
        server = FakeQMP(load_transcript(transcript), **({"version": version, "package": package} | kw))
        path = f"{tmp}/{len(servers)}.sock"
        await server.start(path)
        servers.append(server)
        return f"unix:{path}"

    yield start
    for server in servers:
        await server.close()
    shutil.rmtree(tmp, ignore_errors=True)
