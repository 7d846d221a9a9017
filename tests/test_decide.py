"""The decision engine on its own: pure functions, no event loop, no QEMU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_offload_handshake.decide import Mode, Outcome, Severity, decide, has_ufo, vnet_hdr
from qemu_offload_handshake.features import BY_PROPERTY, CATALOGUE, mask_of, missing_requirements
from qemu_offload_handshake.model import NicReport, Tri, VmReport
from qemu_offload_handshake.policy import Policy
from qemu_offload_handshake.virtio_status import parse_feature_block

# QEMU 10.0 on tap, as read from the real QEMU (tests/data): offered, and what a Linux 6.12 guest negotiated.
OFFERED = 0x1C0010179BFFFE7
NEGOTIATED = 0x1C0010130AFFFA7
USO = mask_of([54, 55, 56])
DATA = Path(__file__).parent / "data"
USER_OFFERED = parse_feature_block(json.loads((DATA / "virtio-status-qemu10-q35-user-paused.json").read_text())[
    "x-query-virtio-status"]["host-features"]).bitmap  # QEMU 10.0 with -netdev user, read from the real QEMU


def nic(offered: int = OFFERED, negotiated: int | None = None, status: int = 0, key: str = "net0",
        **props: Tri) -> NicReport:
    declared = {p: Tri.ON for p, f in BY_PROPERTY.items() if offered >> f.bit & 1} | props
    return NicReport.make(key, f"/machine/peripheral/{key}", properties=declared, offered=offered,
                          negotiated=negotiated if negotiated is not None else (NEGOTIATED if status else 0),
                          driver_status=status, dev_path=f"0000:00:{sum(map(ord, key)) % 32:02x}.0")


def vm(*nics: NicReport, machine: str = "pc-q35-10.0") -> VmReport:
    return VmReport("h", (10, 0, 2), "test", machine, nics)


def test_identical_is_compatible() -> None:
    assert decide(vm(nic(status=15)), vm(nic())).outcome is Outcome.COMPATIBLE


def test_booted_guest_losing_uso_is_blocked_in_both_modes() -> None:
    src, dst = vm(nic(status=15)), vm(nic(OFFERED & ~USO, host_uso=Tri.ON))
    for mode in Mode:
        verdict = decide(src, dst, mode=mode)
        assert verdict.outcome is Outcome.BLOCKED
        assert {f.bit for f in verdict.findings if f.code == "negotiated-missing"} == {54, 55, 56}
        assert all(f.negotiated for f in verdict.findings if f.code == "negotiated-missing")


def test_paused_vm_losing_uso_strict_blocks_lenient_warns() -> None:
    src, dst = vm(nic()), vm(nic(OFFERED & ~USO))
    assert decide(src, dst).outcome is Outcome.BLOCKED
    lenient = decide(src, dst, mode=Mode.LENIENT)
    assert lenient.outcome is Outcome.COMPATIBLE
    assert {f.severity for f in lenient.findings if f.code == "offer-missing"} == {Severity.WARNING}


def test_destination_offering_more_is_adjustable_with_exact_overrides() -> None:
    verdict = decide(vm(nic(OFFERED & ~USO)), vm(nic()))
    assert verdict.outcome is Outcome.ADJUSTABLE
    assert verdict.adjustments == {"net0": {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}}
    lenient = decide(vm(nic(OFFERED & ~USO)), vm(nic()), mode=Mode.LENIENT)
    assert lenient.outcome is Outcome.COMPATIBLE
    assert lenient.adjustments == {}
    assert lenient.recommendations == verdict.adjustments


def test_extra_bit_without_a_property_is_blocked() -> None:
    speed_duplex = 1 << 63  # offered when speed/duplex are set; no on/off property turns it off
    verdict = decide(vm(nic()), vm(nic(OFFERED | speed_duplex)))
    assert verdict.outcome is Outcome.BLOCKED
    assert [f.code for f in verdict.findings if f.severity is Severity.BLOCKER] == ["offer-extra-fixed"]


def test_no_vnet_hdr_on_the_destination_is_blocked_even_paused() -> None:
    user = USER_OFFERED
    dst = vm(nic(user, csum=Tri.ON, guest_csum=Tri.ON))
    assert vnet_hdr(dst.nics[0]) is False
    verdict = decide(vm(nic()), dst, mode=Mode.LENIENT)
    assert verdict.outcome is Outcome.BLOCKED
    assert any(f.code == "backend-vnet_hdr" for f in verdict.findings)


def test_vnet_hdr_and_ufo_unknown_when_nothing_proves_them() -> None:
    quiet = nic(OFFERED & ~mask_of([0, 1, 6, 7, 8, 9, 10, 11, 12, 13, 14, 54, 55, 56]),
                csum=Tri.OFF, guest_csum=Tri.OFF, guest_ufo=Tri.OFF, host_ufo=Tri.OFF)
    assert vnet_hdr(quiet) is None
    assert has_ufo(quiet) is None
    assert has_ufo(nic()) is True


def test_uso_missing_alone_does_not_prove_a_missing_vnet_hdr() -> None:
    # Only USO is on and not offered: a tap without USO, not a backend without a header.
    only_uso = NicReport.make("net0", "/p", properties={"host_uso": Tri.ON}, offered=mask_of([5, 32]),
                              negotiated=0, driver_status=0)
    assert vnet_hdr(only_uso) is None
    assert vnet_hdr(nic(USER_OFFERED, csum=Tri.ON)) is False


def test_device_missing_extra_and_machine_type() -> None:
    verdict = decide(vm(nic(), nic(key="net1")), vm(nic(), nic(key="net2")))
    assert {(f.device, f.code) for f in verdict.findings} >= {("net1", "device-missing"), ("net2", "device-extra")}
    assert decide(vm(nic()), vm(nic(), machine="pc-q35-7.2")).outcome is Outcome.BLOCKED


def test_missing_facts_are_never_compatible() -> None:
    unread = NicReport.make("net0", "/p", offered=None, driver_status=0, dev_path=nic().dev_path)
    assert decide(vm(nic()), vm(unread)).outcome is Outcome.UNKNOWN
    assert decide(vm(nic()), None, problems=["dest down"]).outcome is Outcome.UNKNOWN
    no_machine = VmReport("h", None, None, None, (nic(),))
    assert decide(vm(nic()), no_machine).outcome is Outcome.UNKNOWN
    not_listed = VmReport("h", None, None, "pc-q35-10.0", (), devices_known=False)
    assert decide(vm(nic()), not_listed).outcome is Outcome.UNKNOWN


def test_features_written_before_features_ok_are_checked_too() -> None:
    # A driver that wrote its features but has not set FEATURES_OK (status ACKNOWLEDGE|DRIVER = 3): QEMU still
    # saves and checks them on load.
    verdict = decide(vm(nic(negotiated=NEGOTIATED, status=3)), vm(nic(OFFERED & ~USO)), mode=Mode.LENIENT)
    assert verdict.outcome is Outcome.BLOCKED
    assert {f.bit for f in verdict.findings if f.code == "negotiated-missing"} == {54, 55, 56}


def test_policy_on_off() -> None:
    src, dst = vm(nic(OFFERED & ~USO)), vm(nic())
    on = decide(src, dst, policy=Policy({"host_uso": Tri.ON}))
    assert on.outcome is Outcome.BLOCKED
    assert any(f.code == "policy-on" for f in on.findings)
    off = decide(vm(nic()), vm(nic()), policy=Policy({"guest_ecn": Tri.OFF}))
    assert off.outcome is Outcome.BLOCKED  # the source offers it and a running guest cannot change
    off_dest = decide(vm(nic(OFFERED & ~(1 << 9))), vm(nic()), policy=Policy({"guest_ecn": Tri.OFF}))
    assert off_dest.outcome is Outcome.ADJUSTABLE
    assert off_dest.adjustments == {"net0": {"guest_ecn": "off"}}


def test_silently_turned_off_properties_are_reported_with_a_cause() -> None:
    verdict = decide(vm(nic(OFFERED & ~USO, host_uso=Tri.ON)), vm(nic(OFFERED & ~USO)))
    silent = [f for f in verdict.findings if f.code == "silently-off"]
    assert [(f.bit, f.source) for f in silent] == [(56, "on, not offered")]
    assert "Linux 6.2" in silent[0].why


bitmaps = st.integers(0, (1 << 70) - 1)


@settings(max_examples=500, deadline=None)
@given(bitmaps, bitmaps, bitmaps, st.sampled_from([0, 15]), st.sampled_from(list(Mode)))
def test_compatible_never_lies(src_offered: int, dst_offered: int, negotiated: int, status: int, mode: Mode) -> None:
    """Whatever the bitmaps: compatible implies the load works (and, strict, an identical ABI)."""
    src = nic(src_offered, negotiated & src_offered if status else 0, status)
    dst = nic(dst_offered)
    verdict = decide(vm(src), vm(dst), mode=mode)
    if verdict.outcome is Outcome.COMPATIBLE:
        assert (src.negotiated or 0) & ~dst_offered == 0
        assert not (vnet_hdr(src) and vnet_hdr(dst) is not True)
        assert not (has_ufo(src) and has_ufo(dst) is not True)
        if mode is Mode.STRICT:
            assert src_offered == dst_offered
    if verdict.outcome is Outcome.ADJUSTABLE:
        fixed = dst_offered & ~mask_of(BY_PROPERTY[p].bit for p in verdict.adjustments["net0"])
        assert fixed == src_offered
        assert not missing_requirements(fixed) or missing_requirements(src_offered)


def test_catalogue_properties_are_unique_and_dependencies_known() -> None:
    assert len({f.prop for f in CATALOGUE if f.prop}) == len([f for f in CATALOGUE if f.prop])
    bits = {f.bit for f in CATALOGUE}
    assert all(b in bits for f in CATALOGUE for group in f.requires for b in group)
    assert not missing_requirements(OFFERED)  # what real QEMU offers satisfies the spec


def test_the_sans_io_core_imports_neither_asyncio_nor_qemu_qmp() -> None:
    code = ("import sys\n"
            "import qemu_offload_handshake, qemu_offload_handshake.decide, qemu_offload_handshake.wire\n"
            "import qemu_offload_handshake.virtio_status, qemu_offload_handshake.policy\n"
            "import qemu_offload_handshake.render, qemu_offload_handshake.argv\n"
            "print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('qemu.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
