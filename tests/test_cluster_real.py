"""The cluster workflow end to end, through the command line, on three real "hosts" of this machine (issue 8's proof):
h1 = QEMU 10 on tap, h2 = QEMU 10 on a tap without USO (the shim: a kernel older than Linux 6.2), h3 = QEMU 7.2.

Each host is dumped (``dump-host``), the dumps are merged (``baseline``), a new host is checked (``check-host``),
a precheck predicts a destination from its dump (``precheck --dest-dump``), and real migrations of a booted guest
prove the baseline's overrides right; predicted bitmaps are compared with live destinations started with the same
command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import require_lab

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.features import NEEDS_USO
from qemu_offload_handshake.core.platform import HostDump
from qemu_offload_handshake.core.wire import decode
from qemu_offload_handshake.lab import Backend, Lab, LabError, Nic, VmSpec
from qemu_offload_handshake.lab.builds import QemuVersion
from qemu_offload_handshake.lab.hosts import HostKind, write_host

pytestmark = pytest.mark.qemu

HOSTS: dict[str, HostKind] = {"h1": "10", "h2": "10-nouso", "h3": "7.2"}
MACHINES = ("pc-q35-7.2", "pc-q35-10.0")
USO_OFF = {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}
USO_NAMES = ["GUEST_USO4", "GUEST_USO6", "HOST_USO"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "qemu_offload_handshake", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_json(*args: str) -> tuple[int, Any]:
    proc = cli(*args, "--json")
    assert proc.stderr == "", proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def usage_error(*args: str) -> str:
    proc = cli(*args)
    assert (proc.returncode, proc.stdout) == (2, ""), (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = folder / "key"
        self.key.write_text("cluster secret\n")
        self.wrappers = {name: write_host(folder, kind, f"qemu-{name}") for name, kind in HOSTS.items()}
        self.json: dict[str, Any] = {}
        for name, wrapper in self.wrappers.items():
            code, data = cli_json("dump-host", "--out", str(self.dump(name)), "--qemu", str(wrapper), "--host", name,
                                  "--machine", MACHINES[0], "--machine", MACHINES[1], "--backend", "tap",
                                  "--backend", "tap-vhost", "--backend", "user", "--key-file", str(self.key))
            assert code == 0, data
            self.json[name] = data

    def dump(self, name: str) -> Path:
        return self.folder / f"{name}.dump"

    def decoded(self, name: str) -> HostDump:
        record = decode(self.dump(name).read_bytes(), key=b"cluster secret")
        assert isinstance(record, HostDump)
        return record

    def baseline(self, out: str, *names: str) -> tuple[int, Any]:
        return cli_json("baseline", *(str(self.dump(n)) for n in names), "--out", str(self.folder / out),
                        "--key-file", str(self.key))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    require_lab(guest=False)
    return Cluster(tmp_path_factory.mktemp("cluster"))


def entry(baseline: dict[str, Any], machine: str, backend: str) -> dict[str, Any]:
    found = [e for e in baseline["entries"] if (e["machine"], e["backend"]) == (machine, backend)]
    assert len(found) == 1, [(e["machine"], e["backend"]) for e in baseline["entries"]]
    one: dict[str, Any] = found[0]
    return one


def test_dumps_say_what_each_host_can_offer(cluster: Cluster) -> None:
    h1, h2, h3 = (cluster.json[n] for n in ("h1", "h2", "h3"))
    for machine in MACHINES:  # every offload property on: QEMU 10 offers USO on pc-q35-7.2 too, if the tap can
        assert set(USO_NAMES) <= set(h1["machines"][machine]["offers"]["tap"]["features"])
        assert not set(USO_NAMES) & set(h2["machines"][machine]["offers"]["tap"]["features"])
    assert h1["machines"]["pc-q35-7.2"]["defaults"]["host_uso"] == "off"  # hw_compat_8_1
    assert h1["machines"]["pc-q35-10.0"]["defaults"]["host_uso"] == "on"
    assert list(h3["machines"]) == ["pc-q35-7.2"] and "host_uso" not in h3["properties"]
    assert {"machine": "pc-q35-10.0", "backend": None,
            "reason": f"QEMU {h3['qemu_version']} has no machine type pc-q35-10.0"} in h3["unprobed"]
    assert any(u["backend"] == "tap-vhost" and "vhost-net" in u["reason"] for u in h1["unprobed"])
    assert h1["properties"]["host_uso"] == "bool" and h1["kernel"] and h1["package"].startswith("Debian")


def test_baseline_of_the_uso_and_no_uso_hosts_has_no_uso_and_says_who_removed_it(cluster: Cluster) -> None:
    code, base = cluster.baseline("h12.baseline", "h1", "h2")
    assert code == 0, base
    for machine in MACHINES:
        tap = entry(base, machine, "tap")
        assert not set(USO_NAMES) & set(tap["offered"]["features"]) and tap["hosts"] == ["h1", "h2"]
        [removed] = tap["removed"]
        assert removed["host"] == "h2" and removed["features"] == USO_NAMES
        assert "no USO" in removed["cause"] and "6.2" in removed["cause"]
        # a VM started with defaults offers USO on pc-q35-10.0, not on pc-q35-7.2 (hw_compat_8_1)
        assert tap["profile"]["overrides"] == (USO_OFF if machine == "pc-q35-10.0" else {})
        assert entry(base, machine, "user")["profile"]["overrides"] == {}  # no header: nothing to differ on
    tap = entry(base, "pc-q35-10.0", "tap")
    assert tap["profile"]["device"] == "guest_uso4=off,guest_uso6=off,host_uso=off"
    assert "<qemu:property name='host_uso' type='bool' value='false'/>" in tap["profile"]["libvirt"]
    decoded = cli("decode", str(cluster.folder / "h12.baseline"), "--key-file", str(cluster.key))
    assert (decoded.returncode, json.loads(decoded.stdout)) == (0, base)


def test_the_72_host_shares_only_machine_types_up_to_7_2(cluster: Cluster) -> None:
    code, base = cluster.baseline("all.baseline", "h1", "h2", "h3")
    assert code == 0, base
    new = entry(base, "pc-q35-10.0", "tap")
    assert new["hosts"] == ["h1", "h2"]
    assert new["missing"] == [{"host": "h3", "why": f"QEMU {cluster.json['h3']['qemu_version']} has no machine "
                                                    "type pc-q35-10.0"}]
    old = entry(base, "pc-q35-7.2", "tap")
    assert old["hosts"] == ["h1", "h2", "h3"] and old["missing"] == []
    # USO is off by default on pc-q35-7.2 in QEMU 10 (hw_compat_8_1) and absent in 7.2: no override needed there
    # (one would keep 7.2 from starting: "Property 'virtio-net-pci.host_uso' not found")
    assert not set(USO_NAMES) & set(old["offered"]["features"]) and old["profile"]["overrides"] == {}
    assert new["profile"]["overrides"] == USO_OFF


async def test_the_profile_makes_a_uso_guest_migrate_to_the_no_uso_host(cluster: Cluster, qlab: Lab) -> None:
    """A guest booted on h1 with the baseline's overrides migrates to h2 with identical offered features; the
    same guest without them negotiates USO and fails there; check-host and --dest-dump predict both."""
    _, base = cluster.baseline("h12b.baseline", "h1", "h2")
    overrides = entry(base, "pc-q35-10.0", "tap")["profile"]["overrides"]
    with_profile = VmSpec(machine="pc-q35-10.0", nics=(Nic.make("net0", **overrides),), mode="booted", vm_name="a")
    plain = VmSpec(machine="pc-q35-10.0", mode="booted", vm_name="b")
    good, bad = await qlab.start(with_profile), await qlab.start(plain)
    assert (await bad.features("guest-features"))["net0"] & NEEDS_USO  # its guest uses USO
    # the prediction: compatible with the profile, blocked without it
    code, data = cli_json("precheck", "--source", good.address, "--dest-dump", str(cluster.dump("h2")),
                          "--key-file", str(cluster.key))
    assert (code, data["verdict"]) == (0, "compatible"), data
    assert data["dest_predicted"]["facts"] and "h2" in data["dest_predicted"]["from"]
    code, unsigned = cli_json("precheck", "--source", good.address, "--dest-dump", str(cluster.dump("h2")))
    assert (code, unsigned["verdict"]) == (0, "compatible")  # a warning, not a verdict
    assert "report-unsigned" in {f["code"] for f in unsigned["findings"]}
    code, data = cli_json("precheck", "--source", bad.address, "--dest-dump", str(cluster.dump("h2")),
                          "--key-file", str(cluster.key))
    assert (code, data["verdict"]) == (1, "blocked"), data
    assert {f["code"] for d in data["devices"] for f in d["findings"]} >= {"negotiated-missing"}
    # check-host: h2 against h1's own baseline narrows it (USO) and names the VM that could not move there
    _, solo = cluster.baseline("h1.baseline", "h1")
    report = cluster.folder / "b.vm"
    assert cli("probe", bad.address, "--out", str(report), "--key-file", str(cluster.key)).returncode == 0
    code, check = cli_json("check-host", str(cluster.dump("h2")), "--baseline", str(cluster.folder / "h1.baseline"),
                           "--vm", str(report), "--key-file", str(cluster.key))
    assert (code, check["outcome"]) == (1, "narrows"), check
    assert {(n["machine"], tuple(n["lost"]["features"])) for n in check["narrowings"] if n["backend"] == "tap"} == {
        (m, tuple(USO_NAMES)) for m in MACHINES}
    assert check["vms_that_cannot_migrate"] == [bad.argv[bad.argv.index("-name") + 1]]
    assert any("USO" in r for r in check["vms"][0]["reasons"]), check["vms"]
    del solo
    # the real migrations
    for src, expect in ((good, "completed"), (bad, "failed")):
        dst = await qlab.start(src.spec.destination({"net0": "tap-nouso"}))
        result = await qlab.migrate(src, dst)
        assert result.status == expect, result
        if expect == "completed":
            assert result.offered_after == result.offered_before
        else:
            assert "Features 0x" in result.dest_error and "unsupported" in result.dest_error, result.dest_error
            assert result.source_running


SCENARIOS: list[tuple[str, VmSpec, str]] = [
    # (id, the source, the destination host): the destination is started with the source's command line there
    ("10-to-h1", VmSpec(machine="pc-q35-10.0"), "h1"),
    ("10-to-h2", VmSpec(machine="pc-q35-10.0"), "h2"),
    ("10-old-machine-to-h3", VmSpec(machine="pc-q35-7.2"), "h3"),
    ("72-to-h1", VmSpec(qemu="7.2", machine="pc-q35-7.2"), "h1"),
    ("uso-on-old-machine-to-h2", VmSpec(machine="pc-q35-7.2", nics=(
        Nic.make("net0", host_uso=True, guest_uso4=True, guest_uso6=True),)), "h2"),
    ("user-and-props-off-to-h1", VmSpec(machine="pc-q35-10.0", nics=(
        Nic.make("net0", "user"), Nic.make("net1", mrg_rxbuf=False, host_uso=False, guest_ecn=False),
        Nic.make("net2", host_mtu="9000", speed="10000", duplex="full"))), "h1"),
    ("two-nics-to-h2", VmSpec(machine="pc-q35-10.0", nics=(Nic("net0"), Nic("net1", "user"))), "h2"),
]
DEST: dict[str, tuple[QemuVersion, Backend]] = {"h1": ("10", "tap"), "h2": ("10", "tap-nouso"), "h3": ("7.2", "tap")}


@pytest.mark.parametrize(("spec", "host"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
async def test_dest_dump_predictions_equal_the_live_destination(cluster: Cluster, qlab: Lab, spec: VmSpec,
                                                                host: str) -> None:
    src = await qlab.start(spec)
    qemu, tap = DEST[host]
    dst = await qlab.start(spec.destination({n.id: tap for n in spec.nics if n.backend != "user"}, qemu=qemu))
    verdict = await precheck(src.address, dest_dump=cluster.decoded(host))
    assert verdict.dest is not None and verdict.predicted
    predicted = {n.key: (n.offered, n.offered_unknown) for n in verdict.dest.nics}
    live = await dst.features()
    assert predicted == {k: (v, 0) for k, v in live.items()}
    direct = await precheck(src.address, dst.address)
    assert verdict.verdict == direct.verdict, ([f.why for f in verdict.findings], [f.why for f in direct.findings])


async def test_a_machine_type_the_dest_host_lacks_is_blocked_and_really_cannot_start(cluster: Cluster,
                                                                                   qlab: Lab) -> None:
    src = await qlab.start(VmSpec(machine="pc-q35-10.0"))
    verdict = await precheck(src.address, dest_dump=cluster.decoded("h3"))
    assert verdict.verdict == "blocked"
    assert any(f.code == "dest-cannot-run" and "no machine type pc-q35-10.0" in f.why for f in verdict.findings)
    with pytest.raises(LabError, match=r"(?i)machine"):
        await qlab.start(src.spec.destination(qemu="7.2"))


def test_bad_input_is_a_clear_error(cluster: Cluster, tmp_path: Path) -> None:
    good = cluster.dump("h1").read_bytes()
    other_version = tmp_path / "v2.dump"
    other_version.write_bytes(good[:4] + b"\x02" + good[5:])
    assert "version" in usage_error("baseline", str(other_version), "--out", str(tmp_path / "b"))
    tampered = tmp_path / "t.dump"
    tampered.write_bytes(good[:40] + bytes([good[40] ^ 1]) + good[41:])
    message = usage_error("baseline", str(tampered), "--out", str(tmp_path / "b"), "--key-file", str(cluster.key))
    assert "HMAC" in message or "authentic" in message.lower()
    mixed = tmp_path / "h1-72.dump"  # "h1" dumped again, with QEMU 7.2
    assert cli("dump-host", "--out", str(mixed), "--qemu", str(cluster.wrappers["h3"]), "--host", "h1",
               "--machine", "pc-q35-7.2", "--backend", "user").returncode == 0
    assert "different QEMU builds" in usage_error("baseline", str(cluster.dump("h1")), str(mixed), "--out",
                                                  str(tmp_path / "b"))
    assert "DUMP" in usage_error("baseline", "--out", str(tmp_path / "b"))  # an empty set
    assert "--qemu /bin/true" in usage_error("dump-host", "--out", str(tmp_path / "b"), "--qemu", "/bin/true")
    assert "No such file" in usage_error("dump-host", "--out", str(tmp_path / "b"), "--qemu", str(tmp_path / "nix"))
    report = tmp_path / "vm.rep"
    report.write_bytes(good)
    assert "not a baseline" in usage_error("check-host", str(cluster.dump("h2")), "--baseline", str(report))
    assert not (tmp_path / "b").exists()
