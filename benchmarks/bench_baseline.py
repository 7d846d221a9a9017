"""The cluster baseline at scale: decode N signed host dumps and AND-merge them, against the floor of parsing the
same dumps as JSON (``json.loads`` of their compact JSON form), measured in the same run.

Run:  .venv/bin/python benchmarks/bench_baseline.py

Targets (issue 8): 10,000 dumps decoded and merged in under 1 s; memory flat (peak memory per dump the same at
1,000, 5,000 and 10,000 dumps). The dumps are realistic: QEMU 10.0's 35 properties with their defaults, two
machine types with two backend kinds each; one host in ten has no USO (old kernel), one in twenty is a QEMU 7.2
host without pc-q35-10.0; host names, kernels and packages vary like a real fleet's.
"""

from __future__ import annotations

import json
import time
import tracemalloc

from qemu_offload_handshake.core.baseline import compat_profile, merge
from qemu_offload_handshake.core.features import BY_PROPERTY, NEEDS_USO, NEEDS_VNET_HDR, mask_of
from qemu_offload_handshake.core.model import Tri
from qemu_offload_handshake.core.platform import HostDump, MachineOffers, Offer, Unprobed
from qemu_offload_handshake.core.wire import decode, encode
from qemu_offload_handshake.render_platform import dump_json

KEY = b"cluster key"
TUNNEL = {"guest_tunnel", "guest_tunnel_csum", "host_tunnel", "host_tunnel_csum"}
PROPS = tuple(sorted((n, "bool") for n in BY_PROPERTY if n not in TUNNEL))
PROPS_72 = tuple(p for p in PROPS if p[0] not in ("host_uso", "guest_uso4", "guest_uso6"))
CEILING = mask_of([5, 30, 32]) | sum(1 << BY_PROPERTY[n].bit for n, _ in PROPS)


def defaults(props: tuple[tuple[str, str], ...], old: bool) -> tuple[tuple[str, Tri], ...]:
    off = {"host_uso", "guest_uso4", "guest_uso6"} if old else set()
    return tuple((n, Tri.ON if BY_PROPERTY[n].default and n not in off else Tri.OFF) for n, _ in props)


def make_dump(i: int) -> HostDump:
    old_qemu = i % 20 == 7
    no_uso = i % 10 == 3
    props = PROPS_72 if old_qemu else PROPS
    tap = CEILING & ~(NEEDS_USO if no_uso or old_qemu else 0)
    offers = (Offer("tap", tap), Offer("user", tap & ~NEEDS_VNET_HDR))
    machines = [MachineOffers("pc-q35-7.2", defaults(props, True), offers)]
    unprobed = [Unprobed(None, "tap-vhost", "no /dev/vhost-net on this host")]
    if old_qemu:
        unprobed.append(Unprobed("pc-q35-10.0", None, "QEMU 7.2.22 has no machine type pc-q35-10.0"))
    else:
        machines.append(MachineOffers("pc-q35-10.0", defaults(props, False), offers))
    version = (7, 2, 22) if old_qemu else (10, 0, 2)
    package = "Debian 1:7.2+dfsg-7+deb12u18" if old_qemu else "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"
    return HostDump(f"compute-{i:05d}.rack{i % 40:02d}.example.net", "6.1.0-28-amd64" if no_uso else "6.12.12-amd64",
                    version, package, 1_795_000_000 + i, props, tuple(sorted(machines, key=lambda m: m.machine)),
                    tuple(unprobed),
                    "/usr/bin/qemu-system-x86_64", "pc-i440fx-10.0")


def decode_and_merge(blobs: list[bytes]) -> None:
    dumps = (decode(b, key=KEY) for b in blobs)  # one at a time, as files are read
    baseline = merge((d for d in dumps if isinstance(d, HostDump)), made_at=int(time.time()))
    compat_profile(baseline)
    assert len(baseline.hosts) == len(blobs)


def run(n: int, blobs: list[bytes], texts: list[str]) -> tuple[float, float, float, int]:
    """Time (best of 3, without tracing) and peak memory (a separate traced run)."""
    floor = took = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for text in texts[:n]:
            json.loads(text)
        floor = min(floor, time.perf_counter() - start)
        start = time.perf_counter()
        decode_and_merge(blobs[:n])
        took = min(took, time.perf_counter() - start)
    tracemalloc.start()
    decode_and_merge(blobs[:n])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return took, floor, took / floor, peak


def main() -> None:
    total = 10_000
    blobs = [encode(make_dump(i), key=KEY) for i in range(total)]
    texts = [json.dumps(dump_json(make_dump(i)), separators=(",", ":")) for i in range(total)]
    print(f"one dump: {len(blobs[0])} bytes signed wire, {len(texts[0])} bytes compact JSON")
    print(f"{'dumps':>7}  {'decode+merge':>12}  {'json floor':>10}  {'ratio':>6}  {'peak MiB':>8}  {'bytes/dump':>10}")
    for n in (1_000, 5_000, total):
        took, floor, ratio, peak = run(n, blobs, texts)
        print(f"{n:>7}  {took:>10.3f} s  {floor:>8.3f} s  {ratio:>5.2f}x  {peak / 2**20:>8.1f}  {peak // n:>10}")
    print("targets: 10,000 dumps in < 1 s; bytes/dump flat across sizes")


if __name__ == "__main__":
    main()
