"""Decision fixes (issue 7 §2-§4) on real QEMU: backend facts the bits cannot tell, policy in lenient mode, pending
negotiation, and what `check` says about the reports it is given. Real migrations confirm the verdicts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.argv import apply_adjustments
from qemu_offload_handshake.core.decide import Severity
from qemu_offload_handshake.core.model import Tri
from qemu_offload_handshake.core.policy import Policy
from qemu_offload_handshake.lab import Lab, Nic, VmSpec

pytestmark = pytest.mark.qemu
OFFLOADS = ("csum", "guest_csum", "gso", "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo", "host_tso4",
            "host_tso6", "host_ecn", "host_ufo")
USO = ("guest_uso4", "guest_uso6", "host_uso")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qemu_offload_handshake", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(("qemu", "machine"), [("10", "q35"), ("7.2", "pc-q35-7.2")])
async def test_tap_with_every_offload_off_to_user_is_blocked_by_the_header(qlab: Lab, qemu: str, machine: str) -> None:
    props = {p: False for p in OFFLOADS + (USO if qemu == "10" else ())}
    spec = VmSpec(qemu=qemu, machine=machine, nics=(Nic.make("net0", **props),))  # type: ignore[arg-type]
    src, dst = await qlab.start(spec), await qlab.start(spec.destination({"net0": "user"}))
    verdict = await precheck(src.address, dst.address)
    # no offered bit proves the header any more; the tap's own flag (sysfs) and the netdev type do
    assert verdict.verdict == "blocked", verdict.findings
    assert [(f.code, f.source, f.dest) for f in verdict.findings if f.severity is Severity.BLOCKER] == [
        ("backend-vnet_hdr", "yes", "no")]
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert "saved image requires vnet_hdr=on" in result.dest_error


async def test_lenient_mode_with_an_off_policy_adjusts_the_destination(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", nics=(Nic("net0", "tap-nouso"),))
    dest = spec.destination({"net0": "tap"})
    src, dst = await qlab.start(spec), await qlab.start(dest)
    verdict = await precheck(src.address, dst.address, lenient=True, policy=Policy({"host_uso": Tri.OFF}))
    assert verdict.verdict == "adjustable", verdict.findings
    assert verdict.adjustments == {"net0": {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}}
    assert [f.code for f in verdict.findings if f.severity is Severity.ADJUST] == ["policy-off"]
    await qlab.stop(dst)
    dst = await qlab.start(dest, rewrite=lambda argv: apply_adjustments(argv, verdict.adjustments))
    again = await precheck(src.address, dst.address, lenient=True, policy=Policy({"host_uso": Tri.OFF}))
    assert again.verdict == "compatible", again.findings
    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result.dest_error
    assert result.offered_after == result.offered_before


async def test_lenient_compatible_before_the_driver_negotiated_says_it_may_still(qlab: Lab) -> None:
    spec = VmSpec(mode="paused")
    src, dst = await qlab.start(spec), await qlab.start(spec.destination({"net0": "tap-nouso"}))
    verdict = await precheck(src.address, dst.address, lenient=True)
    assert verdict.verdict == "compatible"
    pending = [f for f in verdict.findings if f.code == "negotiation-pending"]
    assert len(pending) == 1 and pending[0].severity is Severity.WARNING
    assert "before the switchover" in pending[0].why
    result = await qlab.migrate(src, dst)
    assert result.status == "completed"  # true now; the warning is about what the guest may still do


async def test_check_says_what_the_reports_are(qlab: Lab, tmp_path: Path) -> None:
    spec = VmSpec(mode="booted")
    src, dst = await qlab.start(spec), await qlab.start(spec.destination())
    other = await qlab.start(VmSpec(vm_name="another-vm"))
    key = tmp_path / "key"
    key.write_text("k3y\n")
    files = {}
    for name, vm, side in (("src", src, "source"), ("dst", dst, "dest"), ("other", other, "dest")):
        files[name] = str(tmp_path / f"{name}.qoh")
        done = cli("probe", vm.address, "--out", files[name], "--key-file", str(key), "--side", side)
        assert done.returncode == 0, done.stderr

    def codes(*args: str) -> tuple[int, list[str]]:
        done = cli("check", *args, "--json")
        return done.returncode, [f["code"] for f in json.loads(done.stdout)["findings"] if f["severity"] == "warning"]

    assert codes(files["src"], files["dst"], "--key-file", str(key)) == (0, [])
    assert codes(files["src"], files["dst"]) == (0, ["report-unsigned"])
    assert codes(files["dst"], files["src"], "--key-file", str(key)) == (0, ["report-sides-swapped"])
    refused = cli("check", files["src"], files["other"], "--key-file", str(key))
    assert refused.returncode == 2
    assert "different VMs (name 'qoh-lab-" in refused.stderr and "--allow-different-vms" in refused.stderr
    allowed = cli("check", files["src"], files["other"], "--key-file", str(key), "--allow-different-vms")
    assert allowed.returncode == 0, allowed.stderr  # the same NIC on the same host: compatible
    await asyncio.sleep(2.1)
    assert codes(files["src"], files["dst"], "--key-file", str(key), "--max-age", "1") == (
        0, ["report-old", "report-old"])
