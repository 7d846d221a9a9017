"""Shared fixtures: the real-QEMU lab, the fake QMP server, and the suite's own guards.

* What runs that are gone left behind (lab QEMUs, taps, folders whose owner process is dead) is cleaned when the
  session starts; other runs using the lab concurrently are left alone.
* A test that uses the lab fails if it leaves a QEMU, tap or folder of its own behind (cleaned, then named); the
  session fails if anything of its own is left at its end.
* Under CI (``CI`` set to anything but empty, ``0`` or ``false``) a missing real-QEMU prerequisite fails instead of
  skipping, and the session fails unless every test marked ``qemu`` ran: none skipped, none deselected, and every
  test module that has such tests collected.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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


def ci_enabled(value: str | None) -> bool:
    """Whether a ``CI`` environment value means "this is CI": anything but unset, empty, ``0`` or ``false``."""
    return (value or "").strip().lower() not in ("", "0", "false")


CI = ci_enabled(os.environ.get("CI"))
# Processes the tests started that may run a lab of their own (the ``demo`` command): their leftovers are ours.
CHILD_PIDS: set[int] = set()
_before: lab.Leftovers = ([], [], [])
_qemu_skipped: dict[str, str] = {}  # node id -> why, for tests marked qemu
_qemu_deselected: list[str] = []


def _family() -> set[int]:
    return {os.getpid()} | CHILD_PIDS


def _say(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    else:
        print(line, file=sys.stderr)


def _describe(items: lab.Leftovers) -> str:
    return f"QEMU processes {items[0]}, tap devices {items[1]} and folders {items[2]}"


def _minus(after: lab.Leftovers, before: lab.Leftovers) -> lab.Leftovers:
    return (sorted(set(after[0]) - set(before[0])), sorted(set(after[1]) - set(before[1])),
            sorted(set(after[2]) - set(before[2])))


def require_lab(*, guest: bool = True, qemu72: bool = True) -> None:
    """Skip a test that needs real QEMU when the machine lacks it; under CI, fail instead."""
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
    if the_lab.dir.exists():
        pytest.fail(f"LEAK: the lab's folder {the_lab.dir} is still there after Lab.close()", pytrace=False)


def _uses_lab(item: pytest.Item) -> bool:
    return "qlab" in getattr(item, "fixturenames", ()) or item.get_closest_marker("qemu") is not None


@pytest.fixture(autouse=True)
def _no_leak_from_this_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that used the lab fails, naming them, if it left QEMUs, taps or folders of its own behind (torn down
    after its other fixtures, so after the lab closed)."""
    if not _uses_lab(request.node):
        yield
        return
    before = lab.owned_leftovers(_family())
    yield
    leaked = _minus(lab.owned_leftovers(_family()), before)
    if any(leaked):
        cleaned = lab.clean(leaked)
        pytest.fail(f"LEAK: {request.node.nodeid} left {_describe(leaked)} behind (now cleaned: "
                    f"{'; '.join(cleaned)})", pytrace=False)


def pytest_sessionstart(session: pytest.Session) -> None:
    global _before
    # Nothing can be this new process's yet: whatever names its pid is from a dead run that had the same pid.
    cleaned = lab.clean(lab.owned_leftovers({os.getpid()})) + lab.clean_stale()
    if cleaned:
        _say(session.config, "cleaned what earlier runs left behind: " + "; ".join(cleaned))
    _before = lab.owned_leftovers(_family())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # Before -m/-k deselect: a test that uses the lab is a real-QEMU test, marked or not.
    for item in items:
        if "qlab" in getattr(item, "fixturenames", ()) and item.get_closest_marker("qemu") is None:
            item.add_marker(pytest.mark.qemu)


def pytest_deselected(items: list[pytest.Item]) -> None:
    _qemu_deselected.extend(item.nodeid for item in items if item.get_closest_marker("qemu") is not None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "qemu" in report.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _qemu_skipped[report.nodeid] = reason


def qemu_modules(folder: Path) -> set[str]:
    """The test modules in ``folder`` that have real-QEMU tests (a ``qemu`` mark, or the lab fixture)."""
    return {p.name for p in folder.glob("test_*.py")
            if re.search(r"pytest\.mark\.qemu|\bqlab\b", p.read_text(errors="replace"))}


def _ci_completeness(session: pytest.Session) -> list[str]:
    """Under CI, why the real-QEMU tests did not all run (empty: they did)."""
    problems = []
    if _qemu_deselected:
        problems.append(f"{len(_qemu_deselected)} real-QEMU tests were deselected: {_qemu_deselected}")
    if _qemu_skipped:
        problems.append(f"{len(_qemu_skipped)} real-QEMU tests were skipped: {_qemu_skipped}")
    collected = {item.path.name for item in session.items if item.get_closest_marker("qemu") is not None}
    missing = sorted(qemu_modules(Path(__file__).parent) - collected)
    if missing:
        problems.append(f"real-QEMU test modules not collected (or all their qemu tests dropped): {missing}")
    return problems


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = _minus(lab.owned_leftovers(_family()), _before)
    if any(leaked):
        cleaned = lab.clean(leaked)
        _say(session.config, f"\nLEAK: the run left {_describe(leaked)} behind (now cleaned: {'; '.join(cleaned)})")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if CI and not session.config.option.collectonly and exitstatus != pytest.ExitCode.INTERRUPTED:
        problems = _ci_completeness(session)
        for problem in problems:
            _say(session.config, f"\nCI: {problem}")
        if problems:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def fakes() -> list[FakeQMP]:
    """The fake servers ``serve`` started in this test, in order: what each actually received."""
    return []


@pytest.fixture
async def serve(fakes: list[FakeQMP]) -> AsyncIterator[Serve]:
    """serve(transcript, **FakeQMP fields) -> a QMP address of a fake server replaying a transcript (default: the
    4-NIC QEMU 10 one), greeting with the transcript's version unless ``version`` is given."""
    tmp = tempfile.mkdtemp(prefix=f"qoh-fake-{os.getpid()}-")

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
