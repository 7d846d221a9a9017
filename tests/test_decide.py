"""The decision engine on its own: pure functions, no event loop, no QEMU."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_offload_handshake.core.decide import Mode, Outcome, Severity, Verdict, decide, has_ufo, vnet_hdr
from qemu_offload_handshake.core.features import BY_PROPERTY, CATALOGUE, mask_of, missing_requirements
from qemu_offload_handshake.core.labels import parse_feature_block
from qemu_offload_handshake.core.model import NicReport, Tri, VmReport
from qemu_offload_handshake.core.policy import Policy

# QEMU 10.0 on tap, as read from the real QEMU (tests/data): offered, and what a Linux 6.12 guest negotiated.
OFFERED = 0x1C0010179BFFFE7
NEGOTIATED = 0x1C0010130AFFFA7
USO = mask_of([54, 55, 56])
DATA = Path(__file__).parent / "data"
USER_OFFERED = parse_feature_block(json.loads((DATA / "virtio-status-qemu10-q35-user-paused.json").read_text())[
    "x-query-virtio-status"]["host-features"]).bitmap  # QEMU 10.0 with -netdev user, read from the real QEMU


STATE = (("queues", "1"), ("vectors", "4"))  # equal device state on both sides (devstate.py)


def dev_path(key: str) -> str:
    """A PCI device path per id (QEMU pairs devices by it): the same id sits in the same slot on both sides."""
    return f"0000:00:{2 + int(key.removeprefix('net')):02x}.0"


def nic(offered: int = OFFERED, negotiated: int | None = None, status: int = 0, key: str = "net0",
        **props: Tri) -> NicReport:
    declared = {p: Tri.ON for p, f in BY_PROPERTY.items() if offered >> f.bit & 1} | props
    return NicReport.make(key, f"/machine/peripheral/{key}", properties=declared, offered=offered,
                          negotiated=negotiated if negotiated is not None else (NEGOTIATED if status else 0),
                          driver_status=status, dev_path=dev_path(key), state=STATE)


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
    assert [(f.code, f.source, f.dest) for f in verdict.findings if f.severity is Severity.BLOCKER] == [
        ("backend-vnet_hdr", "yes", "no"), ("backend-has_ufo", "yes", "no")]  # without a header, no UFO either


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
    assert verdict.outcome is Outcome.BLOCKED
    assert [(f.device, f.severity, f.code) for f in verdict.findings] == [
        ("net1", Severity.BLOCKER, "device-missing"), ("net2", Severity.BLOCKER, "device-extra")]
    machines = decide(vm(nic()), vm(nic(), machine="pc-q35-7.2"))
    assert machines.outcome is Outcome.BLOCKED
    assert [(f.severity, f.code, f.source, f.dest) for f in machines.findings] == [
        (Severity.BLOCKER, "machine-differs", "pc-q35-10.0", "pc-q35-7.2")]


def unknowns(verdict: Verdict) -> list[tuple[str, str]]:
    assert verdict.outcome is Outcome.UNKNOWN
    assert all(f.severity in (Severity.UNKNOWN, Severity.WARNING, Severity.INFO) for f in verdict.findings)
    return [(f.device, f.code) for f in verdict.findings if f.severity is Severity.UNKNOWN]


def test_missing_facts_are_never_compatible() -> None:
    unread = NicReport.make("net0", "/p", offered=None, driver_status=0, dev_path=dev_path("net0"), state=STATE)
    assert unknowns(decide(vm(nic()), vm(unread))) == [
        ("net0", "backend-vnet_hdr-unknown"), ("net0", "backend-has_ufo-unknown"), ("net0", "offered-unknown")]
    down = decide(vm(nic()), None, problems=["dest down"])
    assert unknowns(down) == [("", "probe-failed")]
    assert [f.why for f in down.findings] == ["dest down"]
    no_machine = VmReport("h", None, None, None, (nic(),))
    assert unknowns(decide(vm(nic()), no_machine)) == [("", "machine-unknown")]
    not_listed = VmReport("h", None, None, "pc-q35-10.0", (), devices_known=False)
    assert unknowns(decide(vm(nic()), not_listed)) == [("", "devices-unknown")]


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
    assert [(f.code, f.bit) for f in on.findings if f.severity is Severity.BLOCKER] == [("policy-on", 56)]
    off = decide(vm(nic()), vm(nic()), policy=Policy({"guest_ecn": Tri.OFF}))
    assert off.outcome is Outcome.BLOCKED  # the source offers it and a running guest cannot change
    assert [(f.code, f.bit) for f in off.findings] == [("policy-off-source", 9)]
    off_dest = decide(vm(nic(OFFERED & ~(1 << 9))), vm(nic()), policy=Policy({"guest_ecn": Tri.OFF}))
    assert off_dest.outcome is Outcome.ADJUSTABLE
    assert off_dest.adjustments == {"net0": {"guest_ecn": "off"}}


def test_silently_turned_off_properties_are_reported_with_a_cause() -> None:
    verdict = decide(vm(nic(OFFERED & ~USO, host_uso=Tri.ON)), vm(nic(OFFERED & ~USO)))
    silent = [f for f in verdict.findings if f.code == "silently-off"]
    assert [(f.bit, f.source) for f in silent] == [(56, "on, not offered")]
    assert "Linux 6.2" in silent[0].why


# ---------------------------------------------------------------------------------------------------------------
# The decision against an independent reference. Each generated NIC is built the way QEMU builds one (a real
# QEMU 10.0 bitmap, minus what properties turn off, minus what the backend silently clears, as read from real QEMUs
# in tests/data), and the reference decides from those generating facts with the README's rules, not from decide.py's
# inferences or the catalogue's masks.

NOUSO_OFFERED = parse_feature_block(json.loads((DATA / "virtio-status-qemu10-q35-nouso-booted.json").read_text())[
    "x-query-virtio-status"]["host-features"]).bitmap  # QEMU 10.0 on a tap without USO, read from the real QEMU
CLEARED = {"tap": 0, "tap-nouso": OFFERED & ~NOUSO_OFFERED, "user": OFFERED & ~USER_OFFERED}
HAS_HEADER = {"tap": True, "tap-nouso": True, "user": False}  # -netdev user has no virtio-net header
HAS_UFO = {"tap": True, "tap-nouso": True, "user": False}  # a tap on Linux 6.12 takes UFO; user has no header
# Properties a command line may turn off, in groups that keep the bitmap valid (property -> bit, QEMU's names).
TOGGLES: dict[str, dict[str, int]] = {
    "uso": {"host_uso": 56, "guest_uso4": 54, "guest_uso6": 55},
    "ecn": {"guest_ecn": 9, "host_ecn": 13},
    "mrg_rxbuf": {"mrg_rxbuf": 15},
    "ctrl_guest_offloads": {"ctrl_guest_offloads": 2},
    "event_idx": {"event_idx": 29},
    # every offload that needs the header: QEMU then cannot tell whether there is one
    "offloads": {"csum": 0, "guest_csum": 1, "guest_tso4": 7, "guest_tso6": 8, "guest_ecn": 9, "guest_ufo": 10,
                 "host_tso4": 11, "host_tso6": 12, "host_ecn": 13, "host_ufo": 14, "guest_uso4": 54,
                 "guest_uso6": 55, "host_uso": 56},
}
SPEED_DUPLEX = 1 << 63  # offered when -device ...,speed=,duplex= are set; no property turns it off
DEFAULT_ON = sorted(p for p, f in BY_PROPERTY.items() if OFFERED >> f.bit & 1)  # what QEMU 10.0 declares on


@dataclass(frozen=True)
class Made:
    """One generated NIC: the facts it was made from (the reference's truth), and its report."""

    key: str
    backend: str
    off: frozenset[str]  # TOGGLES groups turned off on its command line
    speed: bool
    header_reported: bool  # the report carries vnet_hdr, read from the host (a QEMU on this host)
    readable: bool  # False: x-query-virtio-status failed for it
    negotiated_readable: bool

    @property
    def props_off(self) -> dict[str, int]:
        return {p: b for group in self.off for p, b in TOGGLES[group].items()}

    @property
    def offered(self) -> int:
        offered = OFFERED & ~CLEARED[self.backend]
        for bit in self.props_off.values():
            offered &= ~(1 << bit)
        return offered | (SPEED_DUPLEX if self.speed else 0)

    @property
    def header(self) -> bool | None:
        """Whether its backend has a virtio-net header, as far as a report can show it: read from the host, or an
        offload that needs the header asked for (and then offered or not)."""
        return HAS_HEADER[self.backend] if self.header_reported or "offloads" not in self.off else None

    @property
    def ufo(self) -> bool | None:
        if self.header is False:
            return False
        return HAS_UFO[self.backend] if self.header is not None and "offloads" not in self.off else None


def report(made: Made, status: int, negotiated_mask: int) -> NicReport:
    declared = {p: Tri.ON for p in DEFAULT_ON} | {p: Tri.OFF for p in made.props_off}
    if not made.readable:
        return NicReport.make(made.key, f"/machine/peripheral/{made.key}", properties=declared,
                              unreadable=["x-query-virtio-status: GenericError: gone"], dev_path=dev_path(made.key),
                              state=STATE)
    negotiated = made.offered & negotiated_mask if status else 0
    return NicReport.make(made.key, f"/machine/peripheral/{made.key}", properties=declared, offered=made.offered,
                          negotiated=negotiated if made.negotiated_readable else None, driver_status=status,
                          vnet_hdr=HAS_HEADER[made.backend] if made.header_reported else None,
                          dev_path=dev_path(made.key), state=STATE)


@dataclass(frozen=True)
class Case:
    mode: Mode
    src_machine: str
    dst_machine: str | None
    src: tuple[Made, ...]
    dst: tuple[Made, ...]
    status: int  # the source driver's status byte: 0 no driver, 3 features written, 15 running
    negotiated_mask: int  # what the source's driver took of what was offered
    dst_devices_known: bool


def reference(case: Case) -> tuple[Outcome, dict[str, dict[str, str]]]:
    """The README's rules, applied to what the NICs were made from."""
    blocked = unknown = False
    adjustments: dict[str, dict[str, str]] = {}
    if case.dst_machine is None:
        unknown = True  # missing information is never compatible
    elif case.dst_machine != case.src_machine:
        blocked = True  # different machine types
    if not case.dst_devices_known:
        return (Outcome.BLOCKED if blocked else Outcome.UNKNOWN), {}
    dst = {m.key: m for m in case.dst}
    src = {m.key: m for m in case.src}
    if src.keys() != dst.keys():
        blocked = True  # a device on one side only
    for key in src.keys() & dst.keys():
        s, d = src[key], dst[key]
        if not (s.readable and d.readable):
            unknown = True
            continue
        if not s.negotiated_readable:
            unknown = True
        elif case.status and s.offered & case.negotiated_mask & ~d.offered:
            blocked = True  # a feature the guest negotiated that the destination does not offer
        for had, has in ((s.header, d.header), (s.ufo, d.ufo)):  # the header, then UFO support
            if had is None or (had and has is None):
                unknown = True
            elif had and not has:
                blocked = True  # the destination's backend lacks what the source's had
        if case.mode is Mode.STRICT:
            if s.offered & ~d.offered:
                blocked = True  # strict: the destination offers less
            extra = d.offered & ~s.offered
            if extra & SPEED_DUPLEX:
                blocked = True  # offers more, and no property turns it off
            elif extra:
                props = {p: b for group in TOGGLES.values() for p, b in group.items()}
                adjustments[key] = {p: "off" for p, b in sorted(props.items()) if extra >> b & 1}
    if blocked:
        return Outcome.BLOCKED, {}
    if unknown:
        return Outcome.UNKNOWN, {}
    return (Outcome.ADJUSTABLE, adjustments) if adjustments else (Outcome.COMPATIBLE, {})


@st.composite
def cases(draw: st.DrawFn) -> Case:
    def made(key: str, like: Made | None = None) -> Made:
        fresh = Made(key, draw(st.sampled_from(sorted(CLEARED))),
                     frozenset(draw(st.sets(st.sampled_from(sorted(TOGGLES)), max_size=2))),
                     draw(st.booleans()), draw(st.booleans()),
                     draw(st.sampled_from([True] * 9 + [False])), draw(st.sampled_from([True] * 9 + [False])))
        if like is None:
            return fresh
        # the destination: mostly the source's NIC with one thing changed, sometimes an unrelated one
        change = draw(st.sampled_from(["same", "backend", "off", "speed", "fresh"]))
        return {"same": like, "fresh": fresh, "backend": replace(like, backend=fresh.backend),
                "off": replace(like, off=fresh.off), "speed": replace(like, speed=fresh.speed)}[change]
    keys = draw(st.sampled_from([("net0",), ("net0", "net1"), ()]))
    src = tuple(made(k) for k in keys)
    dst = tuple(made(m.key, m) for m in src if draw(st.sampled_from([True] * 9 + [False])))
    if draw(st.sampled_from([False] * 9 + [True])):
        dst += (made("net2"),)
    machine = "pc-q35-10.0"
    return Case(draw(st.sampled_from(list(Mode))), machine,
                draw(st.sampled_from([machine] * 8 + ["pc-q35-7.2", None])), src, dst,
                draw(st.sampled_from([0, 3, 15])), draw(st.one_of(st.just(NEGOTIATED), st.integers(0, (1 << 70) - 1))),
                draw(st.sampled_from([True] * 19 + [False])))


def test_decide_agrees_with_a_reference_decision() -> None:
    """Whatever the NICs, backends, drivers, machine types and devices: the verdict and the adjustments are the
    reference's, and every outcome occurs in both modes."""
    seen: set[tuple[Mode, Outcome]] = set()

    @settings(max_examples=1500, deadline=None, database=None)
    @given(cases())
    def check(case: Case) -> None:
        src = VmReport("h", (10, 0, 2), "test", case.src_machine,
                       tuple(report(m, case.status, case.negotiated_mask) for m in case.src))
        dst = VmReport("h", (10, 0, 2), "test", case.dst_machine,
                       tuple(report(m, 15, NEGOTIATED) for m in case.dst) if case.dst_devices_known else (),
                       devices_known=case.dst_devices_known)
        verdict = decide(src, dst, mode=case.mode)
        outcome, adjustments = reference(case)
        assert (verdict.outcome, verdict.adjustments) == (outcome, adjustments), verdict.findings
        seen.add((case.mode, outcome))

    check()
    assert seen == {(mode, outcome) for mode in Mode for outcome in Outcome} - {(Mode.LENIENT, Outcome.ADJUSTABLE)}


def test_catalogue_properties_are_unique_and_dependencies_known() -> None:
    assert len({f.prop for f in CATALOGUE if f.prop}) == len([f for f in CATALOGUE if f.prop])
    bits = {f.bit for f in CATALOGUE}
    assert all(b in bits for f in CATALOGUE for group in f.requires for b in group)
    assert not missing_requirements(OFFERED)  # what real QEMU offers satisfies the spec


def test_the_sans_io_core_imports_neither_asyncio_nor_qemu_qmp() -> None:
    code = ("import sys\n"
            "import qemu_offload_handshake, qemu_offload_handshake.core.decide, qemu_offload_handshake.core.wire\n"
            "import qemu_offload_handshake.core.labels, qemu_offload_handshake.core.policy\n"
            "import qemu_offload_handshake.render, qemu_offload_handshake.core.argv\n"
            "print(sorted(m for m in sys.modules if m == 'asyncio' or m.startswith('qemu.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_device_state_beyond_features() -> None:
    base = nic(status=15)

    def with_state(**values: str) -> NicReport:
        return dataclasses.replace(base, state=tuple(sorted((dict(STATE) | values).items())))
    assert decide(vm(base), vm(dataclasses.replace(base, state=()))).outcome is Outcome.UNKNOWN
    vectors = decide(vm(base), vm(with_state(vectors="6")))
    assert vectors.outcome is Outcome.BLOCKED
    assert [(f.code, f.source, f.dest) for f in vectors.findings] == [("state-differs", "4", "6")]
    assert decide(vm(with_state(ats="off")), vm(with_state(ats="on"))).outcome is Outcome.COMPATIBLE  # root bus
    behind = dataclasses.replace(with_state(ats="off"), dev_path="0000:00:10.0:00.0")
    assert decide(vm(behind), vm(dataclasses.replace(behind, state=with_state(ats="on").state))).outcome \
        is Outcome.BLOCKED
    for mode, outcome in ((Mode.STRICT, Outcome.BLOCKED), (Mode.LENIENT, Outcome.COMPATIBLE)):
        ring = decide(vm(with_state(rx_queue_size="256")), vm(with_state(rx_queue_size="1024")), mode=mode)
        assert (ring.outcome, [f.code for f in ring.findings]) == (outcome, ["config-differs"])
