"""Wire format against stdlib json on the same content: size, encode+decode time, and the struct floor; then
hostile input against valid input of the same size.

Run: .venv/bin/python benchmarks/bench_wire.py   (prints ratios measured in this run; targets in the output)
     .venv/bin/python benchmarks/bench_wire.py --hostile   (only the hostile-input part)

Both sides produce and consume the same validated model objects: the json path converts the record to a dict
and back (as a JSON-based exchange would have to), the wire path calls encode/decode.

Hostile input: the builders of ``tests/test_wire_hostile.py`` (duplicates, the most items of the smallest size,
full tables with two-byte indexes, 256-bit bitmaps, long non-ASCII texts that every host shares, a broken last
byte...), each at up to 1 MiB, decoded against a realistic valid capability set of the same size (a cluster
dump): decode time (best of a few runs) and peak memory (tracemalloc), as ratios hostile / valid measured in
this run; and against the valid record each input was made from.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from timing import best

from qemu_offload_handshake import (
    CapabilitySet,
    DecodeError,
    HostCapabilities,
    NicReport,
    Tri,
    VmReport,
    decode,
    encode,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_wire_hostile import EARLY, HOSTILE, MIB, valid_set, valid_twin

OFFERED = 0x1C0010179BFFFE7
NEGOTIATED = 0x1C0010130AFFFA7
PROPS = {"csum": Tri.ON, "guest_csum": Tri.ON, "host_tso4": Tri.ON, "host_tso6": Tri.ON, "guest_tso4": Tri.ON,
         "guest_tso6": Tri.ON, "guest_uso4": Tri.AUTO, "guest_uso6": Tri.AUTO, "host_uso": Tri.AUTO,
         "mrg_rxbuf": Tri.ON, "guest_ecn": Tri.OFF, "host_ecn": Tri.OFF}


def vm_report() -> VmReport:
    nics = tuple(NicReport.make(
        f"net{i}", f"/machine/peripheral/net{i}/virtio-backend", properties=PROPS, netdev_id=f"hostnet{i}",
        backend="tap", offered=OFFERED, negotiated=NEGOTIATED, driver_status=0x0F, backend_features=0,
        vnet_hdr=True) for i in range(4))
    return VmReport("compute-017.example.net", (10, 0, 2), "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1",
                    "pc-q35-10.0", nics)


def hosts() -> list[HostCapabilities]:
    return [HostCapabilities(f"compute-{i:04d}.example.net", (10, 0, 2), "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1",
                             "pc-q35-10.0", (("tap", OFFERED ^ (i & 1) << 54), ("user", 0x1017022FFE0)))
            for i in range(1000)]


# --- the same content through json -------------------------------------------------------------------------
def nic_dict(n: NicReport) -> dict[str, Any]:
    return {"qdev_id": n.qdev_id, "qom_path": n.qom_path, "netdev_id": n.netdev_id, "backend": n.backend,
            "properties": {k: str(v) for k, v in n.properties}, "offered": n.offered, "negotiated": n.negotiated,
            "driver_status": n.driver_status, "backend_features": n.backend_features, "vnet_hdr": n.vnet_hdr,
            "unreadable": list(n.unreadable)}


def to_json(r: VmReport | HostCapabilities) -> str:
    d: dict[str, Any] = {"host": r.host, "qemu_version": r.qemu_version, "package": r.package, "machine": r.machine}
    if isinstance(r, VmReport):
        d |= {"nics": [nic_dict(n) for n in r.nics], "unreadable": list(r.unreadable)}
    else:
        d["offers"] = dict(r.offers)
    return json.dumps(d, separators=(",", ":"))


def from_json(s: str) -> VmReport | HostCapabilities:
    return from_dict(json.loads(s))


def from_dict(d: dict[str, Any]) -> VmReport | HostCapabilities:
    version = tuple(d["qemu_version"]) if d["qemu_version"] else None
    if "nics" in d:
        nics = tuple(NicReport.make(
            n["qdev_id"], n["qom_path"], properties={k: Tri[v.upper()] for k, v in n["properties"].items()},
            unreadable=n["unreadable"], netdev_id=n["netdev_id"], backend=n["backend"], offered=n["offered"],
            negotiated=n["negotiated"], driver_status=n["driver_status"], backend_features=n["backend_features"],
            vnet_hdr=n["vnet_hdr"]) for n in d["nics"])
        return VmReport(d["host"], version, d["package"], d["machine"], nics, tuple(d["unreadable"]))
    return HostCapabilities(d["host"], version, d["package"], d["machine"],
                            tuple(sorted(d["offers"].items())))


def set_to_json(c: CapabilitySet) -> str:
    return "[" + ",".join(to_json(h) for h in c.hosts) + "]"


def set_from_json(s: str) -> CapabilitySet:
    return CapabilitySet(tuple(from_dict(d) for d in json.loads(s)))  # type: ignore[misc]


def try_decode(data: bytes) -> str:
    try:
        decode(data)
    except DecodeError as err:
        return f"DecodeError at {err.field or 'body'}"
    return "decoded"


def peak(fn: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def interleaved(fns: list[Callable[[], object]], repeat: int = 5) -> list[float]:
    """The best time of each function, run in turns (so a busy machine slows all of them alike)."""
    times = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            gc.collect()
            start = time.perf_counter()
            fn()
            times[i] = min(times[i], time.perf_counter() - start)
    return times


def hostile_case(name: str, data: bytes) -> tuple[float, float]:
    """Print one hostile input's figures; return its time and memory ratios against the valid set."""
    valid = valid_set(len(data))
    twin = None if name in EARLY else valid_twin(data)
    outcome = try_decode(data)
    assert try_decode(valid) == "decoded" and (twin is None or try_decode(twin) == "decoded")
    runs: list[Callable[[], object]] = [lambda: decode(valid), lambda: try_decode(data)]
    t_valid, t_hostile, *t_twin = interleaved(runs + ([lambda: decode(twin)] if twin else []))
    m_valid, m_hostile = peak(lambda: decode(valid)), peak(lambda: try_decode(data))
    against_twin = (f"{t_hostile / t_twin[0]:4.2f}x, {m_hostile / peak(lambda: decode(twin)):4.2f}x" if twin
                    else "  (refused early)")
    print(f"  {name:58s} {len(data):7d} B  {t_hostile * 1e3:5.1f} / {t_valid * 1e3:5.1f} ms = "
          f"{t_hostile / t_valid:4.2f}x  {m_hostile / MIB:4.1f} / {m_valid / MIB:4.1f} MiB = "
          f"{m_hostile / m_valid:4.2f}x  | {against_twin}  {outcome}")
    return t_hostile / t_valid, m_hostile / m_valid


def hostile() -> None:
    print("hostile input vs a valid capability set of the same size: decode time (best of 5), peak memory "
          "(tracemalloc); target <= 5x.\n  Last column: against the valid record the input was made from (its "
          "last byte restored): one pass costs the same")
    ratios = [hostile_case(name, build(MIB + 16)) for name, build in HOSTILE.items()]
    print(f"  worst: time {max(t for t, _ in ratios):.2f}x, memory {max(m for _, m in ratios):.2f}x")


def main() -> None:
    if "--hostile" in sys.argv[1:]:
        hostile()
        return
    vm = vm_report()
    fleet = hosts()
    assert decode(encode(vm)) == vm and from_json(to_json(vm)) == vm
    wire_vm, json_vm = encode(vm), to_json(vm)
    wire_fleet = [encode(h) for h in fleet]
    json_fleet = [to_json(h) for h in fleet]
    assert all(from_json(j) == h for j, h in zip(json_fleet, fleet, strict=True))

    print("size (wire bytes / compact json bytes), target <= 0.25")
    print(f"  VM report, 4 NICs:        {len(wire_vm):6d} / {len(json_vm):6d} = {len(wire_vm) / len(json_vm):.3f}")
    ws, js = sum(map(len, wire_fleet)), sum(len(j) for j in json_fleet)
    print(f"  1,000 host records, one by one: {ws:7d} / {js:7d} = {ws / js:.3f}")
    cluster = CapabilitySet(tuple(fleet))
    wire_set, json_set = encode(cluster), set_to_json(cluster)
    assert decode(wire_set) == cluster and set_from_json(json_set) == cluster
    print(f"  1,000 hosts as one set:        {len(wire_set):7d} / {len(json_set):7d} = "
          f"{len(wire_set) / len(json_set):.3f}")

    print("encode+decode time (wire / json, same validated model objects), target <= 1.0")
    t_wire = best(lambda: decode(encode(vm)), number=200)
    t_json = best(lambda: from_json(to_json(vm)), number=200)
    print(f"  VM report:   wire {t_wire * 1e6:8.1f} us, json {t_json * 1e6:8.1f} us, ratio {t_wire / t_json:.2f}")
    t_wire = best(lambda: [decode(encode(h)) for h in fleet], repeat=3)
    t_json = best(lambda: [from_json(to_json(h)) for h in fleet], repeat=3)
    print(f"  1,000 host records: wire {t_wire * 1e3:7.1f} ms, json {t_json * 1e3:7.1f} ms, "
          f"ratio {t_wire / t_json:.2f}")
    t_wire = best(lambda: decode(encode(cluster)), repeat=3)
    t_json = best(lambda: set_from_json(set_to_json(cluster)), repeat=3)
    print(f"  1,000 hosts as a set: wire {t_wire * 1e3:5.1f} ms, json {t_json * 1e3:7.1f} ms, "
          f"ratio {t_wire / t_json:.2f}")

    print("decode per record against the floor (struct.unpack_from of the bitmaps alone)")
    offsets = [wire_vm.find(OFFERED.to_bytes(8, "little"))]
    t_decode = best(lambda: decode(wire_vm), number=200)
    t_floor = best(lambda: [struct.unpack_from("<QQ", wire_vm, o) for o in offsets * 4], number=2000)
    print(f"  VM report: decode {t_decode * 1e6:8.1f} us, floor {t_floor * 1e6:6.2f} us, "
          f"ratio {t_decode / t_floor:.0f}x")
    hostile()


if __name__ == "__main__":
    main()
