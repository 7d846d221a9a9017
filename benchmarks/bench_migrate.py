"""The guarded migration's own cost against a bare migration of the same VM, on real QEMU with a booted guest.

Run as root after scripts/setup.sh:  .venv/bin/python benchmarks/bench_migrate.py [ROUNDS] [SLOW_ROUNDS]

Each migration has a new pair: a booted source (QEMU 10, TCG, 256 MB, one virtio-net NIC on tap) and its
``-incoming defer`` destination, both stopped once it is over (a migrated VM cannot migrate again to the same
destination). Interleaved per round, the order swapped every other round:

(a) bare: ``return-path`` on both, ``migrate-incoming``, ``migrate``, ``query-migrate`` every 0.05 s (migrate.py's
    POLL) until ``completed``, over the lab's own QMP connections (as ``Lab.migrate`` does, without its feature
    reads before and after);
(b) guarded: ``migrate(src.address, dst.address, uri)``: the precheck, ``return-path`` + ``pause-before-switchover``,
    the re-check at the switchover (both QEMUs probed again while the source is paused), ``migrate-continue``, the
    verification probe of the destination after completion.

Wall time from the first command to the end (best and median), the ratio (b)/(a) (target <= 1.1x, median and
best), and where (b)'s extra time goes, from its events: the precheck, the connections before ``setup``, the
pause at the switchover (``pre-switchover`` until QEMU moves on) with the re-check's probes in it, and the
verification after ``completed``. Then the same with the source throttled (``max-bandwidth`` 64 MiB/s, set before
either variant starts): a longer migration, where the fixed cost weighs less (same target).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

from qemu_offload_handshake.core.migration import Ending
from qemu_offload_handshake.lab import Lab, Nic, Vm, VmSpec, prerequisites
from qemu_offload_handshake.migrate import POLL, migrate

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SLOW_ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
TARGET = 1.1
SLOW_BANDWIDTH = 64 << 20  # bytes/s
SPEC = VmSpec(mode="booted", nics=(Nic("net0"),))
COMPONENTS = ("precheck", "connect", "transfer", "pause", "recheck", "tail", "verify", "finish")


@dataclass
class Figures:
    bare: list[float] = field(default_factory=list)
    guarded: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in COMPONENTS})


async def bare(src: Vm, dst: Vm, uri: str) -> None:
    caps = {"capabilities": [{"capability": "return-path", "state": True}]}
    await src.execute("migrate-set-capabilities", caps)
    await dst.execute("migrate-set-capabilities", caps)
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})
    while True:
        info = await src.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(POLL)
    if info["status"] != "completed":
        raise RuntimeError(f"bare migration {info['status']}: {info.get('error-desc')}")


def components(events: list[dict[str, object]], wall_ms: float) -> dict[str, float]:
    """The guarded migration's phases in ms, from its events (``at_ms`` since it started)."""
    at: dict[str, float] = {}  # phase -> when it began; "event:NAME" -> when that event came
    for event in events:
        kind, stamp = event.get("event"), event.get("at_ms")
        name = event.get("phase") if kind == "phase" else f"event:{kind}"
        if isinstance(name, str) and isinstance(stamp, int | float) and name not in at:
            at[name] = float(stamp)
    phases = [str(e["phase"]) for e in events if e.get("event") == "phase"]
    missing = {"precheck", "event:precheck", "setup", "pre-switchover", "recheck", "event:recheck", "completed",
               "verified"} - at.keys()
    if missing:
        raise RuntimeError(f"guarded migration: no {sorted(missing)} in its events: {phases}")
    return {"precheck": at["event:precheck"] - at["precheck"],
            "connect": at["setup"] - at["event:precheck"],  # connections, query-status, before the capabilities
            "transfer": at["pre-switchover"] - at["setup"],  # capabilities, migrate, the RAM copy
            # the source paused: from the poll that saw pre-switchover to migrate-continue (sent right after the
            # recheck event); QEMU stopped it up to one POLL before that poll, which no event shows
            "pause": at["event:recheck"] - at["pre-switchover"],
            "recheck": at["event:recheck"] - at["recheck"],  # the re-check's probes and decision (in the pause)
            "tail": at["completed"] - at["event:recheck"],  # migrate-continue until a poll sees completed
            "verify": at["verified"] - at["completed"],
            "finish": wall_ms - at["verified"]}  # the final run states, closing the connections


async def one(lab: Lab, variant: str, figures: Figures, bandwidth: int | None) -> None:
    src = await lab.start(SPEC)
    dst = await lab.start(SPEC.destination())
    try:
        if bandwidth is not None:
            await src.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
        uri = f"unix:{lab.dir / (dst.name + '-migrate.sock')}"
        if variant == "bare":
            start = time.perf_counter()
            await bare(src, dst, uri)
            figures.bare.append(time.perf_counter() - start)
            return
        start = time.perf_counter()
        result = await migrate(src.address, dst.address, uri)
        wall = time.perf_counter() - start
        if result.ending is not Ending.MIGRATED or result.differences:
            raise RuntimeError(f"guarded migration: {result.ending.value}: {result.reason} {result.differences}")
        figures.guarded.append(wall)
        for name, ms in components(result.events, wall * 1e3).items():
            figures.parts[name].append(ms)
    finally:
        await lab.stop(src)
        await lab.stop(dst)


async def measure(lab: Lab, rounds: int, bandwidth: int | None) -> Figures:
    figures = Figures()
    for i in range(rounds):
        for variant in ("bare", "guarded") if i % 2 == 0 else ("guarded", "bare"):
            await one(lab, variant, figures, bandwidth)
    return figures


def report(title: str, figures: Figures) -> bool:
    b_best, b_med = min(figures.bare), statistics.median(figures.bare)
    g_best, g_med = min(figures.guarded), statistics.median(figures.guarded)
    r_med, r_best = g_med / b_med, g_best / b_best
    med = {k: statistics.median(v) for k, v in figures.parts.items()}
    ok = r_med <= TARGET and r_best <= TARGET
    print(title)
    print(f"   (a) bare migration:     best {b_best * 1e3:7.1f} ms, median {b_med * 1e3:7.1f} ms  "
          f"({', '.join(f'{t * 1e3:.0f}' for t in figures.bare)})")
    print(f"   (b) guarded migration:  best {g_best * 1e3:7.1f} ms, median {g_med * 1e3:7.1f} ms  "
          f"({', '.join(f'{t * 1e3:.0f}' for t in figures.guarded)})")
    print(f"   overhead: {(g_med - b_med) * 1e3:+.0f} ms median, {(g_best - b_best) * 1e3:+.0f} ms best")
    print(f"   (b) by phase, median ms: precheck {med['precheck']:.0f}, connect + query-status {med['connect']:.0f}, "
          f"RAM copy {med['transfer']:.0f}, paused at the switchover {med['pause']:.0f} (re-check probes "
          f"{med['recheck']:.0f}), then until completed {med['tail']:.0f}, "
          f"verification {med['verify']:.0f}, final states + close {med['finish']:.0f}")
    guard = med["precheck"] + med["connect"] + med["pause"] + med["verify"] + med["finish"]
    print(f"   (b) the guard's own steps (precheck, connect, pause, verification, close): {guard:.0f} ms median, "
          f"plus the polling around the pause: up to {POLL * 1e3:.0f} ms before a poll sees pre-switchover and "
          f"{med['tail']:.0f} ms from migrate-continue to the poll that sees completed (migrate.py sleeps "
          f"{POLL * 1e3:.0f} ms first; the bare one's last poll waits {POLL * 1e3 / 2:.0f} ms on average)")
    print(f"   ratio (b)/(a): {r_med:.2f}x median, {r_best:.2f}x best  (target <= {TARGET}x)  "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


async def main() -> int:
    problems = prerequisites(guest=True, qemu72=False)
    if problems:
        print(f"guarded migration: skipped ({'; '.join(problems)})")
        return 0
    started = time.perf_counter()
    async with Lab() as lab:
        fast = await measure(lab, ROUNDS, None)
        slow = await measure(lab, SLOW_ROUNDS, SLOW_BANDWIDTH)
    ok = report(f"1. QEMU 10, booted 256 MB guest, one NIC, unthrottled, {ROUNDS} rounds interleaved", fast)
    ok = report(f"2. the same with max-bandwidth {SLOW_BANDWIDTH >> 20} MiB/s on the source, {SLOW_ROUNDS} rounds",
                slow) and ok
    print(f"   ({time.perf_counter() - started:.0f} s in all)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

