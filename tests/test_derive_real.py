"""The derivation used on QEMU 11.1, checked where the truth can be read: on real QEMU 10.0 and 7.2 the derived
offered bitmap must agree with x-query-virtio-status on every bit it determines."""

from __future__ import annotations

import pytest

from qemu_offload_handshake.core.features import bits_of
from qemu_offload_handshake.lab import Lab, Nic, VmSpec, before_first_device
from qemu_offload_handshake.probing import probe_vm
from qemu_offload_handshake.qmp import ReadOnlyQMP, parse_address

pytestmark = pytest.mark.qemu
USO = {54, 55, 56}
NICS = (Nic("net0"), Nic("net1", "user"), Nic("net2", "tap-nouso"),
        Nic.make("net3", host_mtu="9000", speed="1000", duplex="full"), Nic.make("net4", mrg_rxbuf=False, csum=False),
        Nic.make("net5", bus="rp1"))  # behind a PCIe root port: legacy virtio off
ROOT_PORT = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,addr=0x10"]


@pytest.mark.parametrize(("qemu", "machine"), [("10", "q35"), ("7.2", "pc-q35-7.2"), ("10", "pc-q35-7.2")])
async def test_derived_offered_bits_agree_with_what_qemu_reports(qlab: Lab, qemu: str, machine: str) -> None:
    vm = await qlab.start(VmSpec(qemu=qemu, machine=machine, mode="booted", nics=NICS),  # type: ignore[arg-type]
                          rewrite=lambda argv: before_first_device(argv, ROOT_PORT))  # the port before its NIC
    async with ReadOnlyQMP(parse_address(vm.address)) as qmp:
        real = await probe_vm(qmp, host="read")
        derived = await probe_vm(qmp, host="derived", derive=True)
    assert [n.key for n in real.nics] == [n.key for n in derived.nics]
    for read, nic in zip(real.nics, derived.nics, strict=True):
        assert read.offered is not None and nic.offered is not None
        assert nic.derived == ("negotiated", "offered", "vnet_hdr")
        assert nic.offered & ~read.offered == 0, (nic.key, hex(nic.offered & ~read.offered))  # nothing invented
        upper = nic.offered | nic.offered_unknown
        assert read.offered & ~upper == 0, (nic.key, hex(read.offered & ~upper))  # nothing lost
        assert nic.vnet_hdr is (nic.key != "net1")  # tap has a header (sysfs tun_flags), user has none
        undetermined = set(bits_of(nic.offered_unknown))
        # USO on a tap is the only thing left open (only where the machine type turns it on)
        assert undetermined == (USO if machine == "q35" and nic.key != "net1" else set()), nic.key
    # virtio-pci offers bit 30 (VIRTIO_F_BAD_FEATURE) with legacy virtio on (root bus) and off (root port) alike
    assert all((n.offered or 0) >> 30 & 1 for n in real.nics)
