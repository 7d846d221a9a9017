"""Handshake cost against a direct precheck, measured in the same run, through a real agent over loopback TLS.

Run as root after scripts/setup.sh:  .venv/bin/python benchmarks/bench_handshake.py [ROUNDS]

One agent runs for the whole benchmark as ``python -m qemu_offload_handshake serve`` (a subprocess, as on a real
destination host: its own process and event loop, TLS 1.3 with client certificates from ``lab.certs``, default
limits: 8 answers at once, up to 512 waiting). Its scratch QEMU is its default ``qemu-system-x86_64`` (QEMU 10).

1. Named incoming QEMU: a lab source (QEMU 10, one virtio-net NIC on tap) and its ``-incoming`` destination.
   ``api.handshake(source, agent=..., dest=...)`` against ``api.precheck(source, dest)``, interleaved, best and
   median of ROUNDS (target: handshake <= 1.5x precheck, best); with the source paused, and booted.
2. Scratch QEMU: the same handshake without ``dest`` (the agent starts a scratch QEMU like the source), against
   the precheck of (1) plus the scratch QEMU's own cost (``scratch.probe_scratch`` with the NICs
   ``answering.scratch_nics`` makes, this QEMU's properties read once beforehand), interleaved
   (target: handshake <= 1.2x that sum, best).
3. Concurrency and memory: a second agent (``serve --dump FILE --no-scratch``) answers from this host's dump
   (``dump.dump_host`` for the source's machine type). Not from the named incoming QEMU: QEMU's QMP socket
   serves one client at a time with a backlog of one, so more than two probes of one QEMU at once fail to connect
   (EINVAL); 200 handshakes at once naming one incoming QEMU would measure that, not the agent (and each migration
   has its own incoming QEMU). K offers at once (K = 50, 100, 200, then 200 again), each a fresh ``Offer`` (random
   nonce, current time), sent with ``transport.exchange_tls`` on K connections; every one must be answered (an
   ``Answer`` from the dump, with the outcome of ``api.precheck(source, dest_dump=dump)``; no refusal, no
   error). The agent's RSS (``/proc/PID/status`` VmRSS) before and after each round and its peak during the
   round (VmHWM, reset before each round through ``/proc/PID/clear_refs``). The allocator keeps a round's peak
   (RSS does not fall back) and the next round reuses it, so a round's footprint is its peak above the warm agent's
   RSS (after 8 warm-up handshakes, before the first round). Targets: that footprint per handshake at 200 <= 2x
   that at 50 (+ 8 MiB / 200 of slack), and no leak: RSS after the repeated 200 round within 4 MiB of RSS after
   the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from qemu_offload_handshake.answering import Destination, scratch_nics
from qemu_offload_handshake.api import handshake, precheck, probe
from qemu_offload_handshake.core.exchange import Answer, Offer, Truth
from qemu_offload_handshake.core.model import VmReport
from qemu_offload_handshake.core.platform import HostDump
from qemu_offload_handshake.core.policy import Policy
from qemu_offload_handshake.core.rules import Mode
from qemu_offload_handshake.core.wire import encode
from qemu_offload_handshake.dump import dump_host
from qemu_offload_handshake.lab import Lab, Vm, VmSpec, prerequisites
from qemu_offload_handshake.lab.agents import AgentProcess, run_agent
from qemu_offload_handshake.lab.certs import Pki, make_pki
from qemu_offload_handshake.scratch import probe_scratch
from qemu_offload_handshake.transport import ExchangeError, client_context, exchange_tls

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
INCOMING_TARGET = 1.5
SCRATCH_TARGET = 1.2
ROUNDS_K = (50, 100, 200, 200)
PEAK_FACTOR, PEAK_SLACK = 2.0, 8 << 20  # per-handshake peak growth at 200 <= 2x that at 50 + 8 MiB / 200
LEAK_SLACK = 4 << 20  # RSS after the second 200 round vs after the first
MIB = 1 << 20


def memory(agent: AgentProcess) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the agent process in bytes."""
    text = Path(f"/proc/{agent.proc.pid}/status").read_text()
    values = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}
    return values["VmRSS"], values["VmHWM"]


def reset_peak(agent: AgentProcess) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``echo 5 > /proc/PID/clear_refs``)."""
    try:
        Path(f"/proc/{agent.proc.pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def serve(pki: Pki, *args: str) -> contextlib.AbstractAsyncContextManager[AgentProcess]:
    """The agent subprocess (``lab.agents``); stopped with SIGTERM and waited for."""
    return run_agent(pki, *args)


async def interleaved(n: int, fns: dict[str, Callable[[], Awaitable[object]]]) -> dict[str, tuple[float, float]]:
    """Each function awaited ``n`` times, in turn (the order rotated each round): name -> (best, median)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            await fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def ms(pair: tuple[float, float]) -> str:
    return f"{pair[0] * 1e3:7.2f} / {pair[1] * 1e3:7.2f} ms"


def verdict_line(failures: list[str], name: str, ratio: float, target: float) -> str:
    ok = ratio <= target
    if not ok:
        failures.append(f"{name}: {ratio:.2f}x > {target}x")
    return f"{ratio:.2f}x (target <= {target}x) {'PASS' if ok else 'FAIL'}"


def new_offer(source: VmReport, dest_address: str | None) -> Offer:
    """An offer as ``api.handshake`` makes it: a fresh random nonce, the current time, the default policy."""
    return Offer(source, secrets.token_bytes(16), time.time_ns() // 1_000_000, Mode.STRICT,
                 tuple(sorted(Policy().properties.items())), dest_address)


async def named_incoming(label: str, src: Vm, dst: Vm, agent: AgentProcess, ctx: ssl.SSLContext,
                         failures: list[str]) -> tuple[float, float]:
    direct = await precheck(src.address, dst.address)
    shaken = await handshake(src.address, agent=agent.address, ssl_context=ctx, dest=dst.address)
    how = [f.why for f in shaken.findings if f.code == "handshake"]
    if direct.verdict != "compatible" or shaken.verdict != direct.verdict or not how:
        raise RuntimeError(f"{label}: precheck {direct.verdict}, handshake {shaken.verdict}: {shaken.findings}")
    source = await probe(src.address, side="source")

    async def pre() -> None:
        await precheck(src.address, dst.address)

    async def hs() -> None:
        await handshake(src.address, agent=agent.address, ssl_context=ctx, dest=dst.address)

    async def source_probe() -> None:
        await probe(src.address, side="source")

    async def dest_probe() -> None:
        await probe(dst.address, side="dest")

    async def tls_connect() -> None:  # the agent logs it as "closed without an offer"
        _, writer = await asyncio.open_connection("127.0.0.1", agent.port, ssl=ctx, server_hostname="127.0.0.1")
        writer.close()
        await writer.wait_closed()

    async def exchange() -> None:
        reply = await exchange_tls(new_offer(source, dst.address), "127.0.0.1", agent.port, ssl_context=ctx)
        assert isinstance(reply, Answer) and reply.truth is Truth.INCOMING, reply

    t = await interleaved(ROUNDS, {"precheck": pre, "handshake": hs, "source": source_probe, "dest": dest_probe,
                                   "tls": tls_connect, "exchange": exchange})
    floor = (t["source"][0] + t["dest"][0], t["source"][1] + t["dest"][1])
    print(f"   {label} source: precheck {ms(t['precheck'])}, handshake {ms(t['handshake'])}; both {direct.verdict}")
    print(f"      components: source probe {ms(t['source'])}, destination probe alone {ms(t['dest'])}, "
          f"TLS connect alone {ms(t['tls'])}, exchange (offer to answer, the agent probing the incoming QEMU) "
          f"{ms(t['exchange'])}")
    print(f"      the handshake's sequential floor (source probe, then destination probe; no transport) "
          f"{ms(floor)} = {floor[0] / t['precheck'][0]:.2f}x / {floor[1] / t['precheck'][1]:.2f}x the precheck, "
          f"which probes both sides at once")
    print(f"      handshake / precheck: {t['handshake'][1] / t['precheck'][1]:.2f}x median, best "
          + verdict_line(failures, f"1. {label}", t["handshake"][0] / t["precheck"][0], INCOMING_TARGET))
    return t["precheck"]


async def scratch(src: Vm, agent: AgentProcess, ctx: ssl.SSLContext, pre: tuple[float, float],
                  failures: list[str]) -> None:
    dest = Destination()
    assert dest.qemu is not None
    props = await dest.properties()  # once, beforehand: not counted (the agent asks once in its life, too)
    source = await probe(src.address, side="source")
    nics, problem = scratch_nics(source, props)
    if problem or source.machine is None:
        raise RuntimeError(f"no scratch NICs for the source: {problem or 'machine type unknown'}")
    shaken = await handshake(src.address, agent=agent.address, ssl_context=ctx)
    how = " ".join(f.why for f in shaken.findings if f.code == "handshake")
    if shaken.verdict != "compatible" or "scratch" not in how:
        raise RuntimeError(f"scratch handshake: {shaken.verdict}: {shaken.findings}")
    machine, qemu = source.machine, dest.qemu

    async def own() -> None:
        await probe_scratch(qemu, machine=machine, nics=nics)

    async def hs() -> None:
        await handshake(src.address, agent=agent.address, ssl_context=ctx)

    t = await interleaved(ROUNDS, {"scratch": own, "handshake": hs})
    base = (pre[0] + t["scratch"][0], pre[1] + t["scratch"][1])
    print(f"2. scratch QEMU ({qemu}, {machine}, {len(nics)} NIC), best / median of {ROUNDS}, interleaved")
    print(f"   precheck of (1) {ms(pre)} + scratch QEMU's own cost {ms(t['scratch'])} = baseline {ms(base)}")
    print(f"   handshake without dest {ms(t['handshake'])}; overhead over the baseline "
          f"{(t['handshake'][0] - base[0]) * 1e3:+.1f} ms best, {(t['handshake'][1] - base[1]) * 1e3:+.1f} ms median")
    print(f"   handshake / baseline: {t['handshake'][1] / base[1]:.2f}x median, best "
          + verdict_line(failures, "2. scratch", t["handshake"][0] / base[0], SCRATCH_TARGET))


async def concurrent(src: Vm, dump: HostDump, agent: AgentProcess, ctx: ssl.SSLContext, failures: list[str]) -> None:
    expected = f"answered {(await precheck(src.address, dest_dump=dump)).verdict}"
    source = await probe(src.address, side="source")  # once: every offer carries the same report

    async def one() -> tuple[str, float]:
        offer = new_offer(source, None)
        start = time.perf_counter()
        try:
            reply = await exchange_tls(offer, "127.0.0.1", agent.port, ssl_context=ctx, timeout=60)
        except ExchangeError as err:
            return f"error: {err}", 0.0
        elapsed = time.perf_counter() - start
        if not isinstance(reply, Answer):
            return f"refused {reply.code}: {reply.message}", elapsed
        if reply.nonce != offer.nonce or reply.truth is not Truth.DUMP:
            return f"answered from {reply.truth.value}: {reply.how}", elapsed
        return f"answered {reply.outcome.value}", elapsed

    print(f"3. concurrent handshakes against a second agent (pid {agent.proc.pid}) answering from this host's dump "
          f"({expected}), default limits: 8 answered at once, the rest waiting")
    # a few first, so the agent's first-use allocations (TLS, imports, caches) are not counted as growth
    for reply, _ in await asyncio.gather(*(one() for _ in range(8))):
        if reply != expected:
            raise RuntimeError(f"warm-up: {reply}")
    # The allocator keeps what a round freed (RSS stays near its peak) and the next round reuses it, so a round's
    # footprint is its peak above the warm agent's RSS (before the first round), not above its own start.
    base, _ = memory(agent)
    peak_exact = True
    rows: list[tuple[int, int, int, int]] = []  # K, RSS before, peak during, RSS after
    for k in ROUNDS_K:
        rss_before, _ = memory(agent)
        peak_exact = reset_peak(agent) and peak_exact
        start = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(k)))
        elapsed = time.perf_counter() - start
        await asyncio.sleep(0.2)  # the agent closes its last connections and logs them
        rss_after, hwm = memory(agent)
        rows.append((k, rss_before, hwm, rss_after))
        bad = [r for r, _ in results if r != expected]
        if bad:
            failures.append(f"3. K={k}: {len(bad)} of {k} not answered: {sorted(set(bad))[:3]}")
        latencies = sorted(t for _, t in results)
        print(f"   K={k:3d}: {k - len(bad)}/{k} answered in {elapsed:4.2f} s ({k / elapsed:5.1f}/s; latency median "
              f"{statistics.median(latencies) * 1e3:5.1f} ms, max {latencies[-1] * 1e3:5.1f} ms); RSS "
              f"{rss_before / MIB:5.1f} -> {rss_after / MIB:5.1f} MiB, peak {hwm / MIB:5.1f} MiB = warm RSS "
              f"+{(hwm - base) / MIB:4.1f} MiB ({(hwm - base) / k / 1024:5.1f} KiB per handshake)")
    if not peak_exact:
        print("   (VmHWM could not be reset: the peaks are since the agent started)")
    per = {k: max(hwm - base, 0) / k for k, _, hwm, _ in rows[:3]}
    limit = PEAK_FACTOR * per[50] + PEAK_SLACK / 200
    ok = per[200] <= limit
    if not ok:
        failures.append(f"3. peak per handshake at 200 {per[200] / 1024:.1f} KiB > {limit / 1024:.1f} KiB")
    print(f"   peak above the warm RSS ({base / MIB:.1f} MiB) per handshake: {per[50] / 1024:.1f} KiB at 50, "
          f"{per[100] / 1024:.1f} KiB at 100, {per[200] / 1024:.1f} KiB at 200 (target at 200 <= {PEAK_FACTOR:g}x "
          f"that at 50 + {PEAK_SLACK / MIB:g} MiB / 200 = {limit / 1024:.1f} KiB) {'PASS' if ok else 'FAIL'}")
    first_200, again_200 = rows[2][3], rows[3][3]
    leak_ok = again_200 - first_200 <= LEAK_SLACK
    if not leak_ok:
        failures.append(f"3. RSS grew {(again_200 - first_200) / MIB:.1f} MiB over a repeated round of 200")
    print(f"   RSS after the rounds: {rows[0][3] / MIB:.1f} MiB after 50 (kept at its peak by the allocator), "
          f"{first_200 / MIB:.1f} after the first 200, {again_200 / MIB:.1f} after the second 200 "
          f"({(again_200 - first_200) / MIB:+.1f} MiB; target within {LEAK_SLACK / MIB:g} MiB: no leak) "
          f"{'PASS' if leak_ok else 'FAIL'}")


async def main() -> int:
    problems = prerequisites(guest=False, qemu72=False, qemu111=False)
    if problems:
        print(f"skipped: {'; '.join(problems)}")
        return 0
    booted_ok = not prerequisites(guest=True, qemu72=False, qemu111=False)
    failures: list[str] = []
    started = time.perf_counter()
    logs: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="qoh-bench-") as tmp:
        pki = make_pki(tmp)
        ctx = client_context(str(pki.client_cert), str(pki.client_key), str(pki.ca))
        async with Lab() as lab:
            spec = VmSpec()  # QEMU 10, q35, one virtio-net NIC on a tap, paused
            src = await lab.start(spec)
            dst = await lab.start(spec.destination())
            async with serve(pki) as agent:
                logs.append(agent.log)
                print(f"1. named incoming QEMU (QEMU 10, one NIC on tap), agent subprocess on {agent.address} over "
                      f"TLS 1.3; best / median of {ROUNDS}, interleaved")
                pre = await named_incoming("paused", src, dst, agent, ctx, failures)
                if booted_ok:
                    booted_spec = VmSpec(mode="booted", vm_name="booted")
                    booted = await lab.start(booted_spec)
                    booted_dst = await lab.start(booted_spec.destination())
                    await named_incoming("booted", booted, booted_dst, agent, ctx, failures)
                    for vm in (booted, booted_dst):  # a running guest is noise for what follows
                        await lab.stop(vm)
                else:
                    print("   booted source: skipped (no test guest: run scripts/setup.sh)")
                await scratch(src, agent, ctx, pre, failures)
            source = await probe(src.address, side="source")
            assert source.machine is not None
            dump = await dump_host(machines=(source.machine,), host="bench-dest")
            dump_file = Path(tmp) / "dest.dump"
            dump_file.write_bytes(encode(dump))
            async with serve(pki, "--dump", str(dump_file), "--no-scratch") as agent:
                logs.append(agent.log)
                await concurrent(src, dump, agent, ctx, failures)
    for log in logs:
        if any("Traceback" in line or "internal error" in line for line in log):
            failures.append("an agent logged an internal error")
        if not log or not log[-1].startswith("serve: stopped after"):
            failures.append(f"an agent did not stop cleanly: {log[-1:] or '(no log)'}")
    print(f"total {time.perf_counter() - started:.1f} s; agents: "
          + "; ".join(log[-1] if log else "(no log)" for log in logs))
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
