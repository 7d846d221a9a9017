"""The lab reproduces what really happens when QEMUs with different offloads migrate (NOTES, all seen)."""

from __future__ import annotations

import re

import pytest

from qemu_offload_handshake.core.features import BY_NAME
from qemu_offload_handshake.lab import Lab, VmSpec

pytestmark = pytest.mark.qemu

USO = {BY_NAME[n].bit for n in ("VIRTIO_NET_F_GUEST_USO4", "VIRTIO_NET_F_GUEST_USO6", "VIRTIO_NET_F_HOST_USO")}
USO_MASK = sum(1 << b for b in USO)


async def test_guest_on_qemu10_tap_negotiates_uso(qlab: Lab) -> None:
    vm = await qlab.start(VmSpec(mode="booted"))
    offered = (await vm.features("host-features"))["net0"]
    negotiated = (await vm.features("guest-features"))["net0"]
    assert offered & USO_MASK == USO_MASK
    assert negotiated & USO_MASK == USO_MASK
    assert negotiated & ~offered == 0
    # The guest kernel's own view (/sys/class/net/eth0/device/features, bit i = character i) agrees.
    line = re.search(r"QOH-GUEST-NIC eth0 ([01]+)", vm.serial_text())
    assert line, vm.serial_text()
    assert int(line.group(1)[::-1], 2) == negotiated


async def test_booted_guest_to_tap_without_uso_fails_and_source_keeps_running(qlab: Lab) -> None:
    spec = VmSpec(mode="booted")
    src = await qlab.start(spec)
    dst = await qlab.start(spec.destination({"net0": "tap-nouso"}))
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    match = re.search(r"Features 0x([0-9a-f]+) unsupported. Allowed features: 0x([0-9a-f]+)", result.dest_error)
    assert match, result.dest_error
    wanted, allowed = int(match.group(1), 16), int(match.group(2), 16)
    assert wanted & ~allowed == USO_MASK  # exactly the USO bits the guest negotiated are refused
    assert wanted == (await src.features("guest-features"))["net0"]
    assert result.source_running
    assert result.dest_state is None  # the destination died


async def test_tap_to_user_fails_on_vnet_hdr_even_paused(qlab: Lab) -> None:
    spec = VmSpec(mode="paused")
    src = await qlab.start(spec)
    dst = await qlab.start(spec.destination({"net0": "user"}))
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert "saved image requires vnet_hdr=on" in result.dest_error
    assert result.source_state == "prelaunch"  # -S: never started, and still there


async def test_paused_vm_to_no_uso_migrates_but_offered_features_shrink(qlab: Lab) -> None:
    spec = VmSpec(mode="paused")
    src = await qlab.start(spec)
    dst = await qlab.start(spec.destination({"net0": "tap-nouso"}))
    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result.dest_error
    assert result.offered_after is not None
    before, after = result.offered_before["net0"], result.offered_after["net0"]
    assert before & ~after == USO_MASK  # the ABI drift: the guest would lose USO at its next reset
    assert after & ~before == 0


async def test_qemu72_and_qemu10_migrate_both_ways_on_pc_q35_7_2(qlab: Lab) -> None:
    old = VmSpec(qemu="7.2", machine="pc-q35-7.2", mode="booted")
    src = await qlab.start(old)
    assert (await src.execute("query-version"))["qemu"]["major"] == 7
    dst = await qlab.start(old.destination(qemu="10"))
    there = await qlab.migrate(src, dst)
    assert there.status == "completed", there.dest_error
    assert there.dest_state == "running"
    assert there.offered_after == there.offered_before
    assert there.offered_before["net0"] & USO_MASK == 0  # compat properties keep USO off on pc-q35-7.2
    back = await qlab.start(old.destination())
    home = await qlab.migrate(dst, back)
    assert home.status == "completed", home.dest_error
    assert home.dest_state == "running"
    assert (await back.execute("query-version"))["qemu"]["major"] == 7
