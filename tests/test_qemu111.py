"""QEMU 11.1.3, whose x-query-virtio-status aborts it: the tool never crashes it, derives what it can safely and
says `unknown` for the rest; real migrations are the truth for every verdict."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.decide import Severity, Verdict
from qemu_offload_handshake.core.errors import UnsafeCommandError
from qemu_offload_handshake.lab import Lab, Migration, Nic, Vm, VmSpec
from qemu_offload_handshake.qmp import ReadOnlyQMP, parse_address

pytestmark = pytest.mark.qemu
USO_OFF = {"host_uso": False, "guest_uso4": False, "guest_uso6": False}
TUNNEL_OFF = {"guest_tunnel": False, "guest_tunnel_csum": False, "host_tunnel": False, "host_tunnel_csum": False}
USO, TUNNEL = {54, 55, 56}, {65, 66, 67, 68}


def codes(v: Verdict, *severities: Severity) -> dict[str, set[int | None]]:
    out: dict[str, set[int | None]] = {}
    for f in v.findings:
        if f.severity in severities:
            out.setdefault(f.code, set()).add(f.bit)
    return out


async def both_running(*vms: Vm) -> None:
    for vm in vms:
        assert vm.alive, vm.stderr_text()
        assert await vm.run_state() in ("running", "inmigrate"), vm.stderr_text()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qemu_offload_handshake", *args], capture_output=True, text=True,
                          timeout=60, check=False)


async def pair(lab: Lab, spec: VmSpec, dest: VmSpec, **kw: bool) -> tuple[Vm, Vm, Verdict]:
    src, dst = await lab.start(spec), await lab.start(dest)
    verdict = await precheck(src.address, dst.address, **kw)  # type: ignore[arg-type]
    await both_running(src, dst)
    return src, dst, verdict


async def test_every_command_of_the_tool_leaves_qemu_111_running(qlab: Lab, tmp_path: Path) -> None:
    trace = tmp_path / "trace.log"
    spec = VmSpec(qemu="11.1", mode="booted", nics=(Nic("net0"), Nic("net1", "user")))
    vm = await qlab.start(spec, extra_args=["-trace", "handle_qmp_command", "-D", str(trace)])
    other = await qlab.start(VmSpec(qemu="10", mode="booted"))
    assert vm.version is not None and vm.version[:2] == (11, 1)
    for source, dest in ((vm, other), (other, vm), (vm, vm)):
        for lenient in (False, True):
            await precheck(source.address, dest.address, lenient=lenient)
            await both_running(vm)
    report = tmp_path / "r.qoh"
    key = tmp_path / "key"
    key.write_text("secret\n")
    results = [cli("probe", vm.address, "--out", str(report), "--key-file", str(key)),
               cli("decode", str(report), "--key-file", str(key)),
               cli("check", str(report), str(report), "--key-file", str(key), "--json"),
               cli("precheck", "--source", vm.address, "--dest", other.address, "--json"),
               cli("precheck", "--source", other.address, "--dest", vm.address, "--lenient")]
    for done in results:
        assert "Traceback" not in done.stderr, done.stderr
    assert results[0].returncode == 0, results[0].stderr
    decoded = json.loads(results[1].stdout)
    assert decoded["qemu_version"] == "11.1.3"
    assert {n["qdev_id"]: n["derived"] for n in decoded["nics"]} == {
        "net0": ["negotiated", "offered", "vnet_hdr"], "net1": ["negotiated", "offered", "vnet_hdr"]}
    # the command that would crash it is refused before it is sent, even when asked for directly
    async with ReadOnlyQMP(parse_address(vm.address)) as qmp:
        with pytest.raises(UnsafeCommandError, match=r"known to crash QEMU 11\.1\.3"):
            await qmp.execute("x-query-virtio-status", {"path": "/machine/peripheral/net0/virtio-backend"})
    await both_running(vm, other)
    sent = {m.group(1) for m in re.finditer(r'"execute": "([^"]+)"', trace.read_text())}
    assert "qom-list-get" in sent  # the tool's commands are in QEMU's own trace
    assert "x-query-virtio-status" not in sent


@pytest.mark.parametrize(("there", "back"), [("11.1", "10"), ("10", "11.1")], ids=["11.1-to-10.0", "10.0-to-11.1"])
async def test_qemu_111_and_100_on_pc_q35_10_0(qlab: Lab, there: str, back: str) -> None:
    spec = VmSpec(qemu=there, machine="pc-q35-10.0", mode="booted")  # type: ignore[arg-type]
    src, dst, strict = await pair(qlab, spec, spec.destination(qemu=back))
    lenient = await precheck(src.address, dst.address, lenient=True)
    await both_running(src, dst)
    # USO on a tap is the one thing 11.1 cannot tell safely; the rest of the bitmap is derived exactly.
    assert strict.verdict == "unknown"
    undetermined = codes(strict, Severity.UNKNOWN)
    assert set().union(*undetermined.values()) == USO, strict.findings
    assert any("USO" in f.why for f in strict.findings if f.severity is Severity.UNKNOWN)
    side = "source" if there == "11.1" else "destination"
    assert any(f.code == "derived" and f.why.startswith(f"on the {side} (QEMU 11.1.3)") for f in strict.findings)
    if there == "11.1":
        # the 10.0 destination offers USO, so whatever 11.1 offers, the load works: lenient can say so
        assert lenient.verdict == "compatible", lenient.findings
    else:
        assert lenient.verdict == "unknown"  # the guest uses USO, and 11.1 may lack it
        assert codes(lenient, Severity.UNKNOWN) == {"negotiated-undetermined": USO}
    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result.dest_error
    assert result.dest_state == "running"


async def test_qemu_111_to_a_tap_without_uso_is_never_compatible_and_really_fails(qlab: Lab) -> None:
    spec = VmSpec(qemu="11.1", mode="booted")
    src, dst, strict = await pair(qlab, spec, spec.destination({"net0": "tap-nouso"}))
    lenient = await precheck(src.address, dst.address, lenient=True)
    assert strict.verdict != "compatible" and lenient.verdict != "compatible"
    assert codes(lenient, Severity.UNKNOWN)["negotiated-undetermined"] >= USO
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert "error while loading state" in result.dest_error
    assert result.source_running


@pytest.mark.parametrize("direction", ["tunnel-to-none", "none-to-tunnel"])
async def test_qemu_111_pairs_differing_only_in_udp_tunnel_support(qlab: Lab, direction: str) -> None:
    first, second = ("tap", "tap-notunnel") if direction == "tunnel-to-none" else ("tap-notunnel", "tap")
    spec = VmSpec(qemu="11.1", mode="booted", nics=(Nic.make("net0", first, **USO_OFF),))  # type: ignore[arg-type]
    src, dst, strict = await pair(qlab, spec, spec.destination({"net0": second}))  # type: ignore[dict-item]
    lenient = await precheck(src.address, dst.address, lenient=True)
    # pc-q35-11.1 turns the tunnel offloads on; whether a tap really has them cannot be read on 11.1
    for verdict in (strict, lenient):
        assert verdict.verdict == "unknown", verdict.findings
        assert codes(verdict, Severity.UNKNOWN) == {"negotiated-undetermined": TUNNEL}
        assert all("UDP tunnel" in f.why or "guest may use it" in f.why
                   for f in verdict.findings if f.severity is Severity.UNKNOWN)
    result: Migration = await qlab.migrate(src, dst)
    # The truth: the 6.12 guest negotiates no tunnel offload, so the load works; unknown was not wrong, only
    # cautious (a guest that negotiated them would fail on the tap without them).
    assert result.status == "completed", result.dest_error
    assert all(f < 1 << 64 for f in src.guest_features().values())


async def test_qemu_111_with_undeterminable_offloads_off_is_compatible_and_migrates(qlab: Lab) -> None:
    spec = VmSpec(qemu="11.1", mode="booted",
                  nics=(Nic.make("net0", **USO_OFF, **TUNNEL_OFF), Nic("net1", "user")))  # type: ignore[arg-type]
    src, dst, strict = await pair(qlab, spec, spec.destination())
    assert strict.verdict == "compatible", strict.findings
    assert all(n.derived for n in (strict.source.nics if strict.source else ()))
    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result.dest_error


async def test_qemu_111_tap_to_user_is_blocked_and_really_fails(qlab: Lab) -> None:
    spec = VmSpec(qemu="11.1", mode="booted", nics=(Nic.make("net0", **USO_OFF, **TUNNEL_OFF),))  # type: ignore[arg-type]
    src, dst, strict = await pair(qlab, spec, spec.destination({"net0": "user"}))
    assert strict.verdict == "blocked"
    assert "backend-vnet_hdr" in codes(strict, Severity.BLOCKER)
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert result.source_running
