"""Devices are paired as QEMU pairs their migrated state: by PCI slot (device path), not by id. Real migrations
with a booted guest are the truth (issue 7 §1: swapped slots gave a false "compatible")."""

from __future__ import annotations

import pytest

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.argv import apply_adjustments
from qemu_offload_handshake.core.decide import Severity, Verdict
from qemu_offload_handshake.lab import Lab, Nic, VmSpec, before_first_device
from qemu_offload_handshake.render import verdict_json

pytestmark = pytest.mark.qemu
ROOT_PORT = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,addr=0x10"]


def found(v: Verdict, severity: Severity) -> set[tuple[str, str]]:
    return {(f.device, f.code) for f in v.findings if f.severity is severity}


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
async def test_swapped_slots_are_compared_slot_by_slot_and_the_real_migration_agrees(qlab: Lab, lenient: bool) -> None:
    spec = VmSpec(mode="booted", nics=(Nic.make("net0", addr="0x3"), Nic.make("net1", addr="0x4")))
    dest = VmSpec(nics=(Nic.make("net0", addr="0x4", mrg_rxbuf=False), Nic.make("net1", addr="0x3"))).destination()
    src, dst = await qlab.start(spec), await qlab.start(dest)
    verdict = await precheck(src.address, dst.address, lenient=lenient)
    # net1 (slot 4) loads into the destination's slot 4, which is net0 there, without MRG_RXBUF; the MACs follow
    # the ids, so each slot's MAC changes too (strict: an ABI change of its own)
    assert verdict.verdict == "blocked", verdict.findings
    macs = set() if lenient else {("net0", "config-differs"), ("net1", "config-differs")}
    assert found(verdict, Severity.BLOCKER) == {("net1", "negotiated-missing")} | macs
    assert {f.bit for f in verdict.findings if f.code == "negotiated-missing"} == {15}
    assert found(verdict, Severity.WARNING) >= {("net0", "device-moved"), ("net1", "device-moved")}
    devices = {d["id"]: (d["dest_id"], d["path"]) for d in verdict_json(verdict)["devices"]}
    assert devices == {"net0": ("net1", "0000:00:03.0"), "net1": ("net0", "0000:00:04.0")}
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert "0000:00:04.0/virtio-net" in result.dest_error
    assert result.source_running


async def test_swapped_slots_with_equal_features_load_but_change_the_mac(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", nics=(Nic.make("net0", addr="0x3"), Nic.make("net1", addr="0x4")))
    dest = VmSpec(nics=(Nic.make("net0", addr="0x4"), Nic.make("net1", addr="0x3"))).destination()
    src, dst = await qlab.start(spec), await qlab.start(dest)
    strict = await precheck(src.address, dst.address)
    # each slot keeps the source's MAC until the guest resets the device, then takes the destination's
    assert strict.verdict == "blocked"
    assert found(strict, Severity.BLOCKER) == {("net0", "config-differs"), ("net1", "config-differs")}
    assert all("(mac: 52:54:00:12:34:" in f.why for f in strict.findings if f.code == "config-differs")
    lenient = await precheck(src.address, dst.address, lenient=True)
    assert lenient.verdict == "compatible", lenient.findings
    assert found(lenient, Severity.WARNING) == {("net0", "device-moved"), ("net1", "device-moved"),
                                                ("net0", "config-differs"), ("net1", "config-differs")}
    assert (await qlab.migrate(src, dst)).status == "completed"


async def test_behind_a_root_port_and_without_an_id(qlab: Lab) -> None:
    def with_port(argv: list[str]) -> list[str]:
        return before_first_device(argv, ROOT_PORT)
    spec = VmSpec(mode="booted", nics=(Nic.make("net0", bus="rp1"), Nic("")))
    src, dst = await qlab.start(spec, rewrite=with_port), await qlab.start(spec.destination(), rewrite=with_port)
    verdict = await precheck(src.address, dst.address)
    assert verdict.verdict == "compatible", verdict.findings
    assert verdict.source is not None
    assert {n.key: n.dev_path for n in verdict.source.nics} == {
        "net0": "0000:00:10.0:00.0", "/machine/peripheral-anon/device[0]": "0000:00:01.0"}
    assert (await qlab.migrate(src, dst)).status == "completed"
    src = await qlab.start(spec, rewrite=with_port)
    dst = await qlab.start(spec.destination({"": "tap-nouso"}), rewrite=with_port)
    verdict = await precheck(src.address, dst.address)
    assert found(verdict, Severity.BLOCKER) == {("/machine/peripheral-anon/device[0]", "negotiated-missing")}
    assert (await qlab.migrate(src, dst)).status == "failed"


async def test_a_renamed_device_is_adjusted_under_the_destination_id(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", nics=(Nic.make("net0", "tap-nouso", addr="0x3"),))
    dest = VmSpec(nics=(Nic.make("uplink", addr="0x3"),)).destination()
    src, dst = await qlab.start(spec), await qlab.start(dest)
    verdict = await precheck(src.address, dst.address)
    assert verdict.verdict == "adjustable", verdict.findings
    assert ("net0", "device-renamed") in found(verdict, Severity.WARNING)
    assert verdict.adjustments == {"uplink": {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}}
    await qlab.stop(dst)
    dst = await qlab.start(dest, rewrite=lambda argv: apply_adjustments(argv, verdict.adjustments))
    again = await precheck(src.address, dst.address)
    assert again.verdict == "compatible", again.findings
    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result.dest_error
