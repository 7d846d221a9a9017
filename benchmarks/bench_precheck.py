"""Precheck speed: against real QEMU (ratio to the QMP floor) and over a fleet of fake-served VM pairs.

Run as root after scripts/setup.sh:  .venv/bin/python benchmarks/bench_precheck.py

1. One VM with 4 NICs on real QEMU 10, source and destination: a full precheck against the floor, which is
   connect + QMP negotiation + one query-version on both sides concurrently (target <= 2.0x).
2. 1,000 VM pairs served by the fake QMP server (a separate process replaying a real QEMU's answers for a 4-NIC
   VM): prechecks per second and peak Python memory at 50, 200 and 1,000 pairs, 32 at a time. The cost per pair
   should stay flat (linear growth).
3. QEMU 11.1 with 4 NICs: the probe with one qom-list-get (QEMU 10.1+) against one qom-get per property.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from timing import best_of

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.lab import Lab, Nic, VmSpec, prerequisites
from qemu_offload_handshake.qmp import ReadOnlyQMP, parse_address

TESTS = Path(__file__).resolve().parents[1] / "tests"
CONCURRENCY = 32


async def floor(src: str, dst: str, commands: int = 1) -> None:
    async def one(address: str) -> None:
        async with ReadOnlyQMP(parse_address(address)) as qmp:
            await asyncio.gather(*(qmp.execute("query-version") for _ in range(commands)))
    await asyncio.gather(one(src), one(dst))


async def commands_per_side(address: str) -> int:
    from qemu_offload_handshake.probing import probe_vm
    async with ReadOnlyQMP(parse_address(address)) as qmp:
        await probe_vm(qmp, host="count")
        return len(qmp.sent)


async def real_qemu() -> None:
    problems = prerequisites(guest=True, qemu72=False)
    if problems:
        print(f"1. real QEMU: skipped ({'; '.join(problems)})")
        return
    async with Lab() as lab:
        spec = VmSpec(nics=tuple(Nic(f"net{i}") for i in range(4)))
        src = await lab.start(spec)
        dst = await lab.start(spec.destination())
        verdict = await precheck(src.address, dst.address)
        assert verdict.verdict == "compatible", verdict.findings
        n = await commands_per_side(src.address)
        f_best, f_med = await best_of(30, lambda: floor(src.address, dst.address))
        n_best, n_med = await best_of(30, lambda: floor(src.address, dst.address, n))
        p_best, p_med = await best_of(30, lambda: precheck(src.address, dst.address))
    print("1. real QEMU 10, one VM with 4 NICs on each side (best of 30 / median)")
    print(f"   floor (connect, negotiate, query-version, both sides): {f_best * 1e3:6.2f} / {f_med * 1e3:6.2f} ms")
    print(f"   same with {n} query-version per side (the precheck's command count): "
          f"{n_best * 1e3:6.2f} / {n_med * 1e3:6.2f} ms")
    print(f"   precheck ({n} read-only commands per side, 3 rounds):   {p_best * 1e3:6.2f} / {p_med * 1e3:6.2f} ms")
    print(f"   ratio to the floor: {p_best / f_best:.2f}x best, {p_med / f_med:.2f}x median  (target <= 2.0x)")
    print(f"   ratio to {n} commands' floor: {p_best / n_best:.2f}x best, {p_med / n_med:.2f}x median")


async def batch_read() -> None:
    """QEMU 11.1 (no x-query-virtio-status): one qom-list-get for every device vs one qom-get per property."""
    if prerequisites(guest=False, qemu72=False, qemu111=True):
        print("3. QEMU 11.1: skipped (not installed: run scripts/setup.sh)")
        return
    from qemu_offload_handshake.probing import probe_vm
    async with Lab() as lab:
        vm = await lab.start(VmSpec(qemu="11.1", nics=tuple(Nic(f"net{i}") for i in range(4))))
        async with ReadOnlyQMP(parse_address(vm.address)) as qmp:
            counts, results = {}, {}
            for batch in (True, False):
                before = len(qmp.sent)
                report = await probe_vm(qmp, host="bench", batch=batch)
                counts[batch] = len(qmp.sent) - before
                results[batch] = [(n.offered, n.offered_unknown, n.properties) for n in report.nics]

                async def once(b: bool = batch) -> None:
                    await probe_vm(qmp, host="bench", batch=b)
                results[batch].append(await best_of(30, once))  # type: ignore[arg-type]
    (b_best, b_med), (g_best, g_med) = results[True].pop(), results[False].pop()  # type: ignore[misc]
    assert results[True] == results[False], "qom-list-get and qom-get must give the same report"
    print("3. QEMU 11.1, one paused VM with 4 NICs, probe of one side (best of 30 / median)")
    print(f"   qom-list-get (10.1+): {counts[True]:3d} commands, {b_best * 1e3:6.2f} / {b_med * 1e3:6.2f} ms")
    print(f"   qom-get per property: {counts[False]:3d} commands, {g_best * 1e3:6.2f} / {g_med * 1e3:6.2f} ms")
    print(f"   qom-list-get saves {1 - b_med / g_med:.0%} of the time ({g_med / b_med:.1f}x faster, median)")


async def fleet() -> None:
    with tempfile.TemporaryDirectory(prefix="qoh-bench-") as tmp:
        sock = f"{tmp}/fake.sock"
        server = subprocess.Popen([sys.executable, str(TESTS / "fakeqmp.py"), "qemu10-4nics-booted", sock],  # noqa: ASYNC220
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            address = f"unix:{sock}"
            limit = asyncio.Semaphore(CONCURRENCY)

            async def one() -> None:
                async with limit:
                    verdict = await precheck(address, address, timeout=30)
                    if verdict.verdict != "compatible":
                        raise RuntimeError(f"fleet precheck: {verdict.verdict} {verdict.findings[:2]}")

            print(f"2. fleet served by the fake QMP server (4 NICs per VM, {CONCURRENCY} prechecks at a time)")
            per_pair = {}
            for pairs in (50, 200, 1000):
                tracemalloc.start()
                start = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(pairs)))
                elapsed = time.perf_counter() - start
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                per_pair[pairs] = elapsed / pairs
                print(f"   {pairs:5d} pairs: {pairs / elapsed:7.1f} prechecks/s, {elapsed:6.2f} s, "
                      f"peak Python memory {peak / 2**20:6.1f} MiB")
            print(f"   cost per pair, 1,000 vs 50: {per_pair[1000] / per_pair[50]:.2f}x (1.0 = linear)")
        finally:
            server.terminate()
            server.wait(10)


async def main() -> None:
    await real_qemu()
    await batch_read()
    await fleet()


if __name__ == "__main__":
    asyncio.run(main())
