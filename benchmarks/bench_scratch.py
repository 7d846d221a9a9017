"""Scratch QEMU and host dump cost, against the floor of starting the same bare QEMU, measured in the same run.

Run as root after scripts/setup.sh:  .venv/bin/python benchmarks/bench_scratch.py [ROUNDS]

1. The floor: the same QEMU started bare (``-S -nodefaults -no-user-config -display none``, a QMP socket, no NIC)
   until its QMP greeting (process start, socket, connect, greeting); its kill and reap are shown beside it.
2. A scratch QEMU (``scratch.probe_scratch``) with one tap NIC and one NIC without netdev: start (to the greeting),
   probe (``probe_vm`` + ``qom-list``) and gone (killed, reaped, folder removed), each and in total, as a ratio to
   the floor; on QEMU 10.0, and on 7.2 and 11.1 when installed.
3. ``dump.dump_host`` with two machine types (pc-q35-7.2, pc-q35-10.0) and two backends (tap, tap-vhost): wall time
   and ratio to the floor (target: under 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ConnectError, QMPClient
from timing import best_of

from qemu_offload_handshake.dump import dump_host
from qemu_offload_handshake.lab import prerequisites
from qemu_offload_handshake.lab.hosts import qemu_command
from qemu_offload_handshake.scratch import QemuCommand, ScratchNic, scratch_qemu

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15


async def bare_start(command: QemuCommand, gone: list[float]) -> None:
    """The floor: a bare QEMU to its QMP greeting (the time to kill and reap it goes to ``gone``)."""
    folder = tempfile.mkdtemp(prefix=f"qoh-bench-{os.getpid()}-")
    sock = f"{folder}/qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        *command.argv, "-S", "-nodefaults", "-no-user-config", "-display", "none",
        "-qmp", f"unix:{sock},server=on,wait=off",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=command.environ())
    client = QMPClient()
    try:
        while True:  # the same 2 ms polling as the scratch QEMU, until QEMU listens
            if os.path.exists(sock):  # noqa: ASYNC240 (as the scratch QEMU does, through a sync helper)
                with contextlib.suppress(ConnectError):
                    await client.connect(sock)
                    break
                client = QMPClient()
            await asyncio.sleep(0.002)
    finally:
        start = time.perf_counter()
        with contextlib.suppress(Exception):
            await client.disconnect()
        proc.kill()
        await proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
        gone.append(time.perf_counter() - start)


async def scratch_once(command: QemuCommand, parts: dict[str, list[float]]) -> None:
    nics = [ScratchNic("net0"), ScratchNic("net1", None)]
    t0 = time.perf_counter()
    async with scratch_qemu(command, nics=nics, machine="q35") as s:
        t1 = time.perf_counter()
        await s.probe()
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    for name, value in (("start", t1 - t0), ("probe", t2 - t1), ("gone", t3 - t2)):
        parts[name].append(value)


async def one_version(label: str, command: QemuCommand) -> float:
    gone: list[float] = []
    f_best, f_med = await best_of(ROUNDS, lambda: bare_start(command, gone))
    parts: dict[str, list[float]] = {"start": [], "probe": [], "gone": []}
    s_best, s_med = await best_of(ROUNDS, lambda: scratch_once(command, parts))
    print(f"   QEMU {label}: floor {f_best * 1e3:6.1f} / {f_med * 1e3:6.1f} ms (kill+reap "
          f"{statistics.median(gone) * 1e3:.1f} ms); scratch {s_best * 1e3:6.1f} / {s_med * 1e3:6.1f} ms = "
          f"{s_best / f_best:.1f}x / {s_med / f_med:.1f}x the floor")
    print("      median start {start:.1f} ms, probe {probe:.1f} ms, gone {gone:.1f} ms".format(
        **{k: statistics.median(v) * 1e3 for k, v in parts.items()}))
    return f_med


async def main() -> None:
    problems = prerequisites(guest=False, qemu72=False, qemu111=False)
    if problems:
        print(f"skipped: {'; '.join(problems)}")
        return
    print(f"1-2. bare QEMU to its QMP greeting (the floor) and a scratch QEMU with a tap NIC and a NIC without netdev "
          f"(best / median of {ROUNDS})")
    floor = await one_version("10.0", qemu_command("10"))
    for version in ("7.2", "11.1"):
        if prerequisites(guest=False, qemu72=version == "7.2", qemu111=version == "11.1"):
            print(f"   QEMU {version}: not installed")
        else:
            await one_version(version, qemu_command(version))
    times = []
    for _ in range(max(3, ROUNDS // 3)):
        start = time.perf_counter()
        dump = await dump_host(qemu_command("10"), machines=("pc-q35-7.2", "pc-q35-10.0"), host="bench")
        times.append(time.perf_counter() - start)
    assert len(dump.machines) == 2
    best, med = min(times), statistics.median(times)
    print(f"3. dump_host, QEMU 10.0, 2 machine types x (tap, tap-vhost) (best / median of {len(times)}): "
          f"{best * 1e3:.0f} / {med * 1e3:.0f} ms = {best / floor:.1f}x / {med / floor:.1f}x the floor's median "
          f"(target < 2 s); {len(dump.unprobed)} unprobed: {[u.reason for u in dump.unprobed]}")


if __name__ == "__main__":
    asyncio.run(main())
