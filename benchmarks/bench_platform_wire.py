"""Host dumps and baselines in the wire format (1.2) against stdlib json on the same content.

Run: .venv/bin/python benchmarks/bench_platform_wire.py   (prints figures and ratios measured in this run)

A typical dump (every catalogue property and its QOM type, two machine types with their defaults and three
backends each, two unprobed notes), HMAC-signed: encode and decode time per dump, the decode of 10,000 such dumps
of a cluster (hosts differ in name, time, kernel and what their backends offer), and bytes per dump. The json side
carries the same content as a compact JSON object: ``json.loads`` alone (a floor: no checks, no model objects) and
``json.loads`` plus making the same validated model objects (what a JSON exchange would have to do). Then a
20,000-host baseline. The cluster tool's target: 10,000 dumps decoded and merged in under 1 s, so a dump's decode
well under 50 us.
"""

from __future__ import annotations

import json
from typing import Any

from timing import best

from qemu_offload_handshake.core.features import BY_PROPERTY
from qemu_offload_handshake.core.model import Tri
from qemu_offload_handshake.core.platform import (
    Baseline,
    BaselineEntry,
    BaselineHost,
    HostDump,
    MachineOffers,
    Offer,
    Unprobed,
)
from qemu_offload_handshake.core.wire import decode, encode

KEY = b"cluster-secret"
OFFERED = 0x1C0010179BFFFE7
USO = 0b111 << 54
PROPERTIES = tuple((name, "OnOffAuto" if name.endswith("uso") else "bool") for name in sorted(BY_PROPERTY))
DEFAULTS = tuple((name, Tri.ON if feature.default else Tri.OFF) for name, feature in sorted(BY_PROPERTY.items()))
KERNELS = ("6.12.48+deb13-amd64", "6.1.0-40-amd64", "6.12.57+deb13-amd64")


def dump(i: int) -> HostDump:
    """Host ``i`` of a cluster: one in three runs a kernel without USO, one in seven could not determine it."""
    tap = Offer("tap", OFFERED & ~USO, USO) if i % 7 == 0 else Offer("tap", OFFERED & ~USO if i % 3 == 1 else OFFERED)
    offers = (tap, Offer("tap-vhost", OFFERED & ~USO), Offer("user", 0x1017022FFE0))
    return HostDump(
        f"compute-{i:05d}.rack-{i % 40:02d}.example.net", KERNELS[i % 3], (10, 0, 2),
        "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1", 1_760_000_000 + i,
        PROPERTIES, tuple(MachineOffers(m, DEFAULTS, offers) for m in ("pc-i440fx-10.0", "pc-q35-10.0")),
        (Unprobed(None, "vhost-user", "no vhost-user backend on this host"),
         Unprobed("pc-q35-7.2", None, "machine type not in this QEMU")),
        "/usr/bin/qemu-system-x86_64", "pc-q35-10.0")


# --- the same content through json ------------------------------------------------------------------------------
def to_json(d: HostDump) -> str:
    return json.dumps({
        "host": d.host, "kernel": d.kernel, "qemu_version": d.qemu_version, "package": d.package,
        "made_at": d.made_at, "properties": dict(d.properties), "binary": d.binary,
        "default_machine": d.default_machine, "unprobed": [[u.machine, u.backend, u.reason] for u in d.unprobed],
        "machines": [{"machine": m.machine, "defaults": {k: str(v) for k, v in m.defaults},
                      "offers": [[o.backend, o.offered, o.unknown] for o in m.offers]} for m in d.machines],
    }, separators=(",", ":"))


def from_json(text: str) -> HostDump:
    d: dict[str, Any] = json.loads(text)
    return HostDump(
        d["host"], d["kernel"], tuple(d["qemu_version"]), d["package"], d["made_at"],
        tuple(d["properties"].items()),
        tuple(MachineOffers(m["machine"], tuple((k, Tri[v.upper()]) for k, v in m["defaults"].items()),
                            tuple(Offer(*o) for o in m["offers"])) for m in d["machines"]),
        tuple(Unprobed(*u) for u in d["unprobed"]), d["binary"], d["default_machine"])


def baseline(count: int) -> Baseline:
    """A cluster of ``count`` hosts as the merge makes it (USO removed by one host in three, undetermined by one in
    seven, vhost missing on one in fifty)."""
    hosts = tuple(BaselineHost(f"compute-{i:05d}.rack-{i % 40:02d}.example.net", KERNELS[i % 3], (10, 0, 2),
                               "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1", 1_760_000_000 + i, PROPERTIES)
                  for i in range(count))
    lacking = tuple(i for i in range(count) if i % 3 == 1 or i % 7 == 0)
    entries = []
    for machine in ("pc-i440fx-10.0", "pc-q35-10.0"):
        for backend, offered in (("tap", OFFERED & ~USO), ("tap-vhost", OFFERED & ~USO), ("user", 0x1017022FFE0)):
            members = tuple(i for i in range(count) if backend != "tap-vhost" or i % 50)
            missing = tuple((i, "no vhost-net") for i in range(0, count, 50)) if backend == "tap-vhost" else ()
            entries.append(BaselineEntry(
                machine, backend, offered, OFFERED if backend == "tap" else offered, members,
                tuple((i, USO) for i in lacking) if backend == "tap" else (),
                tuple((i, USO) for i in lacking if i % 7 == 0) if backend == "tap" else (), missing,
                sum(1 << f.bit for f in BY_PROPERTY.values() if f.default),
                sum(1 << f.bit for f in BY_PROPERTY.values() if f.default is False)))
    return Baseline(1_760_100_000, hosts, tuple(entries))


def main() -> None:
    typical = dump(1)
    wire, text = encode(typical, key=KEY), to_json(typical)
    assert decode(wire, key=KEY) == typical and from_json(text) == typical
    print("a typical dump (39 properties, 2 machine types x 3 backends, 2 notes), HMAC-signed")
    print(f"  size:   wire {len(wire):5d} B, compact json {len(text):5d} B, ratio {len(wire) / len(text):.2f}")
    t_enc = best(lambda: encode(typical, key=KEY), number=2000)
    t_json_enc = best(lambda: to_json(typical), number=2000)
    print(f"  encode: wire {t_enc * 1e6:6.1f} us, json.dumps {t_json_enc * 1e6:6.1f} us, "
          f"ratio {t_enc / t_json_enc:.2f}")
    t_dec = best(lambda: decode(wire, key=KEY), number=5000)
    t_loads = best(lambda: json.loads(text), number=5000)
    t_json_dec = best(lambda: from_json(text), number=5000)
    print(f"  decode: wire {t_dec * 1e6:6.1f} us (target well under 50), json.loads alone {t_loads * 1e6:6.1f} us "
          f"(ratio {t_dec / t_loads:.2f}), json.loads + model objects {t_json_dec * 1e6:6.1f} us "
          f"(ratio {t_dec / t_json_dec:.2f})")

    cluster = [dump(i) for i in range(10_000)]
    wires = [encode(d, key=KEY) for d in cluster]
    texts = [to_json(d) for d in cluster]
    assert [decode(w, key=KEY) for w in wires[:100]] == cluster[:100]
    print("10,000 dumps of a cluster, HMAC-signed")
    sizes, json_sizes = sum(map(len, wires)), sum(map(len, texts))
    print(f"  bytes per dump: wire {sizes / 1e4:6.1f}, json {json_sizes / 1e4:6.1f}, ratio {sizes / json_sizes:.2f}")
    t_all = best(lambda: [decode(w, key=KEY) for w in wires], repeat=3)
    t_all_loads = best(lambda: [json.loads(t) for t in texts], repeat=3)
    t_all_json = best(lambda: [from_json(t) for t in texts], repeat=3)
    print(f"  decode all: wire {t_all:5.3f} s (target: with the merge, under 1 s), "
          f"json.loads alone {t_all_loads:5.3f} s (ratio {t_all / t_all_loads:.2f}), "
          f"json.loads + model objects {t_all_json:5.3f} s (ratio {t_all / t_all_json:.2f})")

    big = baseline(20_000)
    data = encode(big, key=KEY)
    assert decode(data, key=KEY) == big
    print("a baseline of 20,000 hosts x 6 entries, HMAC-signed")
    print(f"  size {len(data)} B ({len(data) / 20_000:.1f} B a host; the limit is 1 MiB), "
          f"encode {best(lambda: encode(big, key=KEY), repeat=3):5.3f} s, "
          f"decode {best(lambda: decode(data, key=KEY), repeat=3):5.3f} s")


if __name__ == "__main__":
    main()
