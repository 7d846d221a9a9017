"""Guarded migration on real QEMU with a booted TCG guest (issue 10's proof), through the command line: a compatible
pair migrates with progress and verified features; a blocked pair is refused untouched; a guest that loads its
driver during the RAM copy is caught at the switchover (and, without the re-check, fails late as QEMU fails); the
destination killed, the connection cut, SIGTERM: the source runs on; --dest-argv migrates an adjustable pair in
one command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qemu_offload_handshake.lab import Lab, Nic, Vm, VmSpec

pytestmark = pytest.mark.qemu
SLOW = 8 << 20  # max-bandwidth: a booted guest's ~88 MB then take ~9.5 s (the driver loads 3 s in)


@dataclass
class Run:
    proc: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)

    async def until(self, pred: Any, timeout: float = 60) -> dict[str, Any]:
        """The first event (read so far or coming) for which ``pred`` holds."""
        assert self.proc.stdout is not None
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[seen:]:
                    if pred(event):
                        return event
                seen = len(self.events)
                line = await self.proc.stdout.readline()
                assert line, f"the command ended first: {self.events}"
                self.events.append(json.loads(line))

    async def result(self, timeout: float = 120) -> tuple[int, dict[str, Any]]:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert b"Traceback" not in err, err.decode()
        self.events += [json.loads(line) for line in out.decode().splitlines()]
        assert self.events and self.events[-1]["event"] == "result", (self.events[-3:], err.decode())
        assert self.proc.returncode is not None
        return self.proc.returncode, self.events[-1]

    def phases(self) -> list[str]:
        return [str(e["phase"]) for e in self.events if e["event"] == "phase"]


@contextlib.asynccontextmanager
async def migrate(*args: str) -> AsyncIterator[Run]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_offload_handshake", "migrate", "--json",
                                                *args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        yield Run(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def migrated(lab: Lab, src: Vm, dst: Vm, *more: str) -> tuple[int, dict[str, Any], Run]:
    async with migrate("--source", src.address, "--dest", dst.address, "--uri", f"unix:{lab.dir}/{dst.name}.mig",
                       *more) as run:
        code, result = await run.result()
    return code, result, run


async def status(vm: Vm) -> str | None:
    return (await vm.execute("query-migrate")).get("status") if vm.alive else None


async def test_a_compatible_pair_migrates_with_progress_and_verified_features(qlab: Lab) -> None:
    src = await qlab.start(VmSpec(mode="booted"))
    dst = await qlab.start(VmSpec(mode="booted").destination())
    before = await src.features()
    await src.execute("migrate-set-parameters", {"max-bandwidth": 64 << 20})  # long enough for a few progress events
    code, result, run = await migrated(qlab, src, dst)
    assert (code, result["ending"]) == (0, "migrated"), result
    expected = iter(run.phases())  # in this order (QEMU's own phases between, e.g. "device", may be seen or not)
    assert all(p in expected for p in ("precheck", "setup", "active", "pre-switchover", "recheck", "completed",
                                       "verified")), run.phases()
    progress = [e for e in run.events if e["event"] == "progress"]
    assert any(e["status"] == "active" and e["percent"] is not None and e["ram_total"] for e in progress), progress
    assert result["differences"] == [] and result["recheck"]["verdict"] == "compatible"
    assert (result["source_state"], result["dest_state"]) == ("postmigrate", "running")
    assert await dst.features() == before  # the lab's own reading agrees


async def test_a_blocked_pair_is_refused_and_both_qemus_are_untouched(qlab: Lab) -> None:
    src = await qlab.start(VmSpec(mode="booted"))
    dst = await qlab.start(VmSpec(mode="booted").destination({"net0": "tap-nouso"}))
    code, result, run = await migrated(qlab, src, dst)
    assert (code, result["ending"]) == (1, "refused"), result
    assert "nothing was sent" in result["reason"] and run.phases() == ["precheck", "refused"]
    assert (await src.run_state(), await dst.run_state()) == ("running", "inmigrate")
    assert (await status(src), await status(dst)) == (None, None)  # no migration was ever started
    caps = {c["capability"]: c["state"] for c in await dst.execute("query-migrate-capabilities")}
    assert not caps["return-path"] and not caps["pause-before-switchover"]


async def test_features_negotiated_during_the_copy_are_caught_at_the_switchover(qlab: Lab) -> None:
    """The guest's driver loads 3 s into a ~9 s copy and negotiates USO, which the destination lacks: the re-check
    cancels at the switchover and the source runs on; without it, the destination fails the load at the end."""
    spec = VmSpec(mode="booted", driver_delay=3)
    outcomes = {}
    for recheck in (True, False):
        src = await qlab.start(spec)  # returns while the guest waits to load its driver
        dst = await qlab.start(spec.destination({"net0": "tap-nouso"}))
        await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW})
        code, result, _ = await migrated(qlab, src, dst, "--lenient", *([] if recheck else ["--no-recheck"]))
        assert result["precheck"]["verdict"] == "compatible", result["precheck"]  # lenient: not negotiated yet
        assert await src.run_state() == "running" and result["source_state"] == "running", result
        caps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
        assert not caps["pause-before-switchover"] and not caps["return-path"], caps  # put back as they were
        outcomes[recheck] = (code, result, dst.stderr_text())
    code, result, _ = outcomes[True]
    assert (code, result["ending"]) == (1, "cancelled"), result
    assert result["recheck"]["verdict"] == "blocked", result["recheck"]
    assert any("negotiated" in c and "USO" in c for c in result["changed"]), result["changed"]
    assert "cancelled at the switchover" in result["reason"]
    code, result, stderr = outcomes[False]
    assert (code, result["ending"]) == (5, "failed"), result
    assert "re-check disabled" in result["reason"], result["reason"]
    assert "Features 0x" in stderr and "unsupported" in stderr, stderr


async def test_the_destination_killed_mid_copy_leaves_the_source_running(qlab: Lab) -> None:
    src = await qlab.start(VmSpec(mode="booted"))
    dst = await qlab.start(VmSpec(mode="booted").destination())
    await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW})
    async with migrate("--source", src.address, "--dest", dst.address, "--uri", f"unix:{qlab.dir}/k.mig") as run:
        await run.until(lambda e: e.get("status") == "active" and (e.get("percent") or 0) > 5)
        dst.proc.kill()
        code, result = await run.result()
    assert (code, result["ending"]) == (5, "failed"), result
    assert result["source_state"] == "running" and await src.run_state() == "running"


async def _proxy(listen_port: int, target_port: int, cut: asyncio.Event) -> asyncio.Server:
    """A TCP relay whose connections are all cut when ``cut`` is set."""
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def pump(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
        tasks = [asyncio.ensure_future(pump(reader, up_writer)), asyncio.ensure_future(pump(up_reader, writer))]
        await asyncio.wait([*tasks, asyncio.ensure_future(cut.wait())], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (writer, up_writer):
            w.transport.abort()
    return await asyncio.start_server(relay, "127.0.0.1", listen_port)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_connection_cut_mid_copy_leaves_the_source_running(qlab: Lab) -> None:
    src = await qlab.start(VmSpec(mode="booted"))
    dst = await qlab.start(VmSpec(mode="booted").destination())
    await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW})
    there, relay = _free_port(), _free_port()
    cut = asyncio.Event()
    proxy = await _proxy(relay, there, cut)
    try:
        async with migrate("--source", src.address, "--dest", dst.address, "--uri", f"tcp:127.0.0.1:{relay}",
                           "--dest-uri", f"tcp:127.0.0.1:{there}") as run:
            await run.until(lambda e: e.get("status") == "active" and (e.get("percent") or 0) > 5)
            cut.set()
            code, result = await run.result()
    finally:
        proxy.close()
    assert (code, result["ending"]) == (5, "failed"), result
    assert result["source_state"] == "running" and await src.run_state() == "running"


async def test_sigterm_cancels_and_the_source_runs_on(qlab: Lab) -> None:
    src = await qlab.start(VmSpec(mode="booted"))
    dst = await qlab.start(VmSpec(mode="booted").destination())
    await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW})
    async with migrate("--source", src.address, "--dest", dst.address, "--uri", f"unix:{qlab.dir}/t.mig") as run:
        await run.until(lambda e: e.get("status") == "active")
        run.proc.send_signal(signal.SIGTERM)
        code, result = await run.result()
    assert (code, result["ending"]) == (5, "cancelled") and "by the operator" in result["reason"], result
    assert result["source_state"] == "running" and await src.run_state() == "running"


async def test_dest_argv_migrates_an_adjustable_pair_in_one_command(qlab: Lab) -> None:
    """The source has no USO (its tap lacks it); the destination's command line has a tap with USO: the command
    starts it, finds it adjustable, starts it again with USO off, migrates, and the features are equal."""
    src = await qlab.start(VmSpec(nics=(Nic("net0", "tap-nouso"),), mode="booted"))
    argv = qlab.command_line(VmSpec(nics=(Nic("net0", "tap"),)))
    pid = None
    try:
        async with migrate("--source", src.address, "--uri", f"unix:{qlab.dir}/a.mig", "--dest-argv", "--",
                           *argv) as run:
            code, result = await run.result()
        pid = result["dest_pid"]
        assert (code, result["ending"]) == (0, "migrated"), result
        adjusting = [e for e in run.events if e["event"] == "adjusting"]
        assert adjusting and set(adjusting[0]["adjustments"]["net0"]) >= {"host_uso"}, run.events
        assert result["differences"] == [] and result["dest_state"] == "running"
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not _alive(pid):
                    break
                await asyncio.sleep(0.05)
        _remove_dest_folders()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _remove_dest_folders() -> None:
    """The folders of destinations a finished migrate command started (their QMP socket and log)."""
    for folder in Path("/tmp").glob("qoh-dest-*"):
        owner = folder.name.split("-")[2]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


async def test_a_source_paused_before_stays_paused(qlab: Lab) -> None:
    src = await qlab.start(VmSpec(mode="booted"))
    dst = await qlab.start(VmSpec(mode="booted").destination())
    await src.execute("stop")
    await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW})
    async with migrate("--source", src.address, "--dest", dst.address, "--uri", f"unix:{qlab.dir}/p.mig") as run:
        await run.until(lambda e: e.get("status") == "active")
        run.proc.send_signal(signal.SIGTERM)
        code, result = await run.result()
    assert (code, result["ending"]) == (5, "cancelled"), result
    assert result["source_state"] == "paused" and await src.run_state() == "paused"


async def test_on_a_terminal_one_live_progress_line(qlab: Lab) -> None:
    """Without --json and with a terminal on stderr: one line rewritten in place (carriage returns), the result on
    stdout."""
    import pty
    src = await qlab.start(VmSpec(mode="booted"))
    dst = await qlab.start(VmSpec(mode="booted").destination())
    await src.execute("migrate-set-parameters", {"max-bandwidth": 64 << 20})
    leader, follower = pty.openpty()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_offload_handshake", "migrate",
                                                "--source", src.address, "--dest", dst.address, "--uri",
                                                f"unix:{qlab.dir}/tty.mig", stdout=asyncio.subprocess.PIPE,
                                                stderr=follower)
    os.close(follower)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    shown = await asyncio.to_thread(_read_all, leader)
    assert proc.returncode == 0, (out, shown)
    assert out.decode().startswith("migrated: "), out
    assert "\r" in shown and re.search(r"active +[0-9.]+% of [0-9]+ MiB +[0-9.]+ Mbit/s", shown), shown


def _read_all(fd: int) -> str:
    chunks = []
    try:
        while data := os.read(fd, 65536):
            chunks.append(data)
    except OSError:  # EIO once the other side is closed
        pass
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")
