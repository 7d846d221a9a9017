"""The cluster baseline, the new-host check, the compat profile and the dump-based prediction (pure core).

The bitmaps are built from the catalogue the way QEMU 10.0 offers them on tap (every property on); the real-QEMU
tests (test_cluster_real.py) check the same behaviour on dumps of real hosts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qemu_offload_handshake.core.baseline import causes, check_host, compat_profile, extend, merge
from qemu_offload_handshake.core.errors import UsageError
from qemu_offload_handshake.core.features import BY_PROPERTY, NEEDS_TUNNEL, NEEDS_USO, NEEDS_VNET_HDR, mask_of
from qemu_offload_handshake.core.model import NicReport, Tri, VmReport
from qemu_offload_handshake.core.platform import HostDump, MachineOffers, Offer, Unprobed
from qemu_offload_handshake.core.predict import decide_from_dump, predict_dest
from qemu_offload_handshake.core.rules import Mode

ON_BY_DEFAULT = {name: Tri.ON if f.default else Tri.OFF for name, f in BY_PROPERTY.items()}
NO_TUNNEL = {"guest_tunnel", "guest_tunnel_csum", "host_tunnel", "host_tunnel_csum"}
PROPS_10 = tuple(sorted((n, "bool") for n in BY_PROPERTY if n not in NO_TUNNEL))
PROPS_72 = tuple((n, t) for n, t in PROPS_10 if n not in ("host_uso", "guest_uso4", "guest_uso6"))
# MAC, bit 30 and VERSION_1 are there whatever the properties
FIXED = mask_of([5, 30, 32])
ALL_ON_TAP = FIXED | sum(1 << BY_PROPERTY[n].bit for n, _ in PROPS_10 if BY_PROPERTY[n].default)
USO = NEEDS_USO
USO_OFF_PROPS = ("guest_uso4", "guest_uso6", "host_uso")


def dump(host: str, *, tap: int = ALL_ON_TAP, machines: tuple[str, ...] = ("pc-q35-10.0", "pc-q35-7.2"),
         props: tuple[tuple[str, str], ...] = PROPS_10, version: tuple[int, int, int] = (10, 0, 2),
         kernel: str = "6.18.0", unknown: int = 0, unprobed: tuple[Unprobed, ...] = (),
         user: bool = True) -> HostDump:
    defaults = tuple(sorted((n, ON_BY_DEFAULT[n]) for n, _ in props))
    offers = [Offer("tap", tap & ~unknown, unknown)]
    if user:
        offers.append(Offer("user", tap & ~NEEDS_VNET_HDR))
    return HostDump(host, kernel, version, f"Debian {'.'.join(map(str, version))}", 1_700_000_000, props,
                    tuple(MachineOffers(m, defaults, tuple(sorted(offers, key=lambda o: o.backend)))
                          for m in sorted(machines)), unprobed)


def test_and_merge_removes_uso_with_provenance_and_a_profile() -> None:
    base = merge([dump("h1"), dump("h2", tap=ALL_ON_TAP & ~USO, kernel="6.1.0")], made_at=1)
    entry = base.entry("pc-q35-10.0", "tap")
    assert entry is not None
    assert entry.offered == ALL_ON_TAP & ~USO and entry.union == ALL_ON_TAP
    assert [(base.hosts[i].host, bits) for i, bits in entry.removed] == [("h2", USO)]
    [(host, bits, why)] = causes(base, entry)
    assert (host, bits) == ("h2", USO)
    assert "no USO" in why and "6.2" in why and "6.1.0" in why
    profile = {(p.machine, p.backend): p for p in compat_profile(base)}[("pc-q35-10.0", "tap")]
    assert profile.overrides == {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}
    assert profile.device_properties() == "guest_uso4=off,guest_uso6=off,host_uso=off"
    xml = profile.libvirt_override("net0")
    assert "<qemu:device alias='net0'>" in xml
    assert "<qemu:property name='host_uso' type='bool' value='false'/>" in xml
    assert {(p.machine, p.backend): p for p in compat_profile(base)}[("pc-q35-10.0", "user")].overrides == {}


def test_a_host_without_a_machine_type_is_listed_never_dropped() -> None:
    old = dump("old", tap=ALL_ON_TAP & ~USO, machines=("pc-q35-7.2",), props=PROPS_72, version=(7, 2, 22),
               unprobed=(Unprobed("pc-q35-10.0", None, "QEMU 7.2.22 has no machine type pc-q35-10.0"),))
    base = merge([dump("h1"), old], made_at=1)
    new_type = base.entry("pc-q35-10.0", "tap")
    assert new_type is not None and new_type.offered == ALL_ON_TAP  # only h1 runs it ...
    assert [(base.hosts[i].host, why) for i, why in new_type.missing] == [
        ("old", "QEMU 7.2.22 has no machine type pc-q35-10.0")]  # ... and old is named, with its reason
    shared = base.entry("pc-q35-7.2", "tap")
    assert shared is not None and shared.offered == ALL_ON_TAP & ~USO and not shared.missing
    [(_, bits, why)] = causes(base, shared)
    assert bits == USO and why == "QEMU 7.2.22 has no property for it: it predates the feature"
    profile = {(p.machine, p.backend): p for p in compat_profile(base)}[("pc-q35-7.2", "tap")]
    assert profile.absent_on == {p: ("old",) for p in ("guest_uso4", "guest_uso6", "host_uso")}


def test_a_header_less_backend_is_blamed_on_the_header_not_on_uso() -> None:
    base = merge([dump("h1"), dump("h2", tap=ALL_ON_TAP & ~NEEDS_VNET_HDR)], made_at=1)
    entry = base.entry("pc-q35-10.0", "tap")
    assert entry is not None
    texts = {why for _, _, why in causes(base, entry)}
    assert len(texts) == 1 and "virtio-net header" in texts.pop()


def test_undetermined_bits_are_not_in_the_baseline_and_say_why() -> None:
    base = merge([dump("h1"), dump("new", version=(11, 1, 3), unknown=USO | NEEDS_TUNNEL & ALL_ON_TAP)],
                 made_at=1)
    entry = base.entry("pc-q35-10.0", "tap")
    assert entry is not None and not entry.offered & USO
    [(host, bits, why)] = causes(base, entry)
    assert host == "new" and bits == USO and "undetermined" in why


@pytest.mark.parametrize(("dumps", "message"), [
    ([], "no host dumps"),
    ([dump("h1"), dump("h1", version=(7, 2, 22))], "different QEMU builds"),
    ([dump("h1"), dump("h1")], "given twice"),
])
def test_bad_sets_are_refused_with_a_sentence(dumps: list[HostDump], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        merge(dumps, made_at=1)


def test_extend_equals_merging_everything_and_replaces_a_host() -> None:
    a, b, c = dump("a"), dump("b", tap=ALL_ON_TAP & ~USO), dump("c", machines=("pc-q35-10.0",))
    assert extend(merge([a, b], made_at=1), [c], made_at=1) == merge([a, b, c], made_at=1)
    upgraded = dump("b")  # b's kernel was upgraded: it has USO now
    assert extend(merge([a, b], made_at=1), [upgraded], made_at=1) == merge([a, upgraded], made_at=1)


def test_check_host_joins_narrows_or_cannot_join() -> None:
    base = merge([dump("h1"), dump("h2")], made_at=1)
    assert check_host(base, dump("h3"), made_at=2).outcome == "joins"
    narrow = check_host(base, dump("h3", tap=ALL_ON_TAP & ~USO, kernel="5.15.0"), made_at=2)
    assert narrow.outcome == "narrows"
    assert {(n.machine, n.backend, n.bits) for n in narrow.narrowings} == {
        ("pc-q35-10.0", "tap", USO), ("pc-q35-7.2", "tap", USO)}
    first = narrow.narrowings[0]
    assert first.offered_after == ALL_ON_TAP & ~USO and "no USO" in first.causes[0][1]
    after = narrow.after.entry("pc-q35-10.0", "tap")
    assert after is not None and after.offered == ALL_ON_TAP & ~USO
    old = dump("old", machines=("pc-q35-7.2",), props=PROPS_72, version=(7, 2, 22), tap=ALL_ON_TAP & ~USO,
               unprobed=(Unprobed("pc-q35-10.0", None, "QEMU 7.2.22 has no machine type pc-q35-10.0"),))
    cannot = check_host(base, old, made_at=2)
    assert cannot.outcome == "cannot-join"
    assert ("pc-q35-10.0", "tap", "QEMU 7.2.22 has no machine type pc-q35-10.0") in cannot.missing


def vm(*, offered: int = ALL_ON_TAP, negotiated: int | None = None, machine: str = "pc-q35-10.0",
       backend: str = "tap") -> VmReport:
    nic = NicReport.make("net0", "/machine/peripheral/net0", properties=ON_BY_DEFAULT, netdev_id="hn0",
                         backend=backend, offered=offered, negotiated=negotiated if negotiated is not None else 0,
                         driver_status=15 if negotiated else 0, backend_features=0, vnet_hdr=backend == "tap",
                         dev_path="0000:00:02.0", state=(("queues", "1"),))
    return VmReport("src", (10, 0, 2), "Debian 10.0.2", machine, nics=(nic,), vm_name="vm1", side="source")


def test_prediction_equals_the_dump_host_for_the_same_command_line() -> None:
    predicted = predict_dest(vm(), dump("h2", tap=ALL_ON_TAP & ~USO)).report
    [nic] = predicted.nics
    assert nic.offered == ALL_ON_TAP & ~USO and nic.vnet_hdr is True and nic.dev_path == "0000:00:02.0"
    assert predicted.host == "h2" and predicted.machine == "pc-q35-10.0"


def test_a_guest_using_uso_is_blocked_by_a_no_uso_dump_and_says_it_was_predicted() -> None:
    verdict = decide_from_dump(vm(negotiated=ALL_ON_TAP & ~mask_of([30])), dump("h2", tap=ALL_ON_TAP & ~USO))
    assert verdict.verdict == "blocked"
    assert {"negotiated-missing", "predicted"} <= {f.code for f in verdict.findings}
    assert "offered" in verdict.predicted and verdict.predicted_from and "h2" in verdict.predicted_from
    gains = decide_from_dump(vm(offered=ALL_ON_TAP & ~USO), dump("h2"), mode=Mode.STRICT)
    assert gains.verdict == "adjustable" and gains.adjustments == {
        "net0": {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}}


def test_a_dump_without_the_machine_type_or_backend_blocks() -> None:
    old = dump("old", machines=("pc-q35-7.2",), props=PROPS_72, version=(7, 2, 22),
               unprobed=(Unprobed("pc-q35-10.0", None, "QEMU 7.2.22 has no machine type pc-q35-10.0"),))
    verdict = decide_from_dump(vm(), old)
    assert verdict.verdict == "blocked"
    [finding] = [f for f in verdict.findings if f.code == "dest-cannot-run"]
    assert "no machine type pc-q35-10.0" in finding.why
    no_user = dump("h2", user=False, unprobed=(Unprobed(None, "user", "this QEMU has no slirp"),))
    assert decide_from_dump(vm(backend="user", offered=ALL_ON_TAP & ~NEEDS_VNET_HDR), no_user).verdict == "blocked"


def with_defaults(d: HostDump, machine: str, **values: Tri) -> HostDump:
    """``d`` with some property defaults of one machine type changed (another QEMU build's compat properties)."""
    machines = tuple(replace(m, defaults=tuple((n, values.get(n, t)) for n, t in m.defaults))
                     if m.machine == machine else m for m in d.machines)
    return replace(d, machines=machines)


def test_a_default_of_another_build_is_undetermined_but_the_same_build_is_trusted() -> None:
    """pc-q35-8.1 had USO on in QEMU 8.2.0-8.2.4 and off later (NOTES): a source offering it may have it from its
    build's default, which another build does not share."""
    uso_off = {n: Tri.OFF for n in USO_OFF_PROPS}
    other = with_defaults(dump("h2", version=(9, 1, 0)), "pc-q35-10.0", **uso_off)
    verdict = decide_from_dump(vm(negotiated=ALL_ON_TAP & ~mask_of([30])), other)
    assert verdict.verdict == "unknown"
    assert {f.code for f in verdict.findings} >= {"predicted-default-differs"}
    same = with_defaults(replace(dump("h2"), package="Debian 10.0.2"), "pc-q35-10.0", **uso_off)
    assert decide_from_dump(vm(negotiated=ALL_ON_TAP & ~mask_of([30])), same).verdict == "compatible"


def test_vhost_and_unknown_backends_fail_closed() -> None:
    packed = 1 << BY_PROPERTY["packed"].bit
    src = vm(offered=ALL_ON_TAP | packed)
    nic = replace(src.nics[0], properties=tuple(sorted({**dict(src.nics[0].properties),
                                                        "packed": Tri.ON}.items())), backend_features=1)
    vhost_dump = replace(dump("h2"), machines=tuple(
        replace(m, offers=tuple(sorted((*m.offers, Offer("tap-vhost", ALL_ON_TAP)), key=lambda o: o.backend)))
        for m in dump("h2").machines))
    [predicted] = predict_dest(replace(src, nics=(nic,)), vhost_dump).report.nics
    assert predicted.offered_unknown & packed  # the dump's NIC had packed off: vhost may mask it
    [plain] = predict_dest(replace(src, nics=(replace(nic, backend_features=0),)), vhost_dump).report.nics
    assert plain.offered is not None and plain.offered & packed  # a plain tap never clears it
    # QEMU 11.1 sources: vhost-net use unknown, and the host has no vhost-net taps
    derived = replace(vm().nics[0], backend_features=None)
    verdict = decide_from_dump(replace(vm(), nics=(derived,)), dump("h2"))
    assert verdict.verdict == "unknown" and any(f.code == "dest-undetermined" for f in verdict.findings)
    nameless = replace(src.nics[0], backend=None)
    assert decide_from_dump(replace(src, nics=(nameless,)), dump("h2")).verdict == "unknown"


def test_not_dumped_is_unknown_but_cannot_run_is_blocked() -> None:
    verdict = decide_from_dump(vm(machine="pc-q35-9.2"), dump("h2"))
    assert verdict.verdict == "unknown" and any(f.code == "dest-undetermined" for f in verdict.findings)
    no_user = dump("h2", user=False)
    assert decide_from_dump(vm(backend="user", offered=ALL_ON_TAP & ~NEEDS_VNET_HDR), no_user).verdict == "unknown"


def test_a_tap_without_header_is_predicted_without_header() -> None:
    src = vm(offered=ALL_ON_TAP & ~NEEDS_VNET_HDR)
    src = replace(src, nics=(replace(src.nics[0], vnet_hdr=False),))
    verdict = decide_from_dump(src, dump("h2"))
    assert verdict.verdict == "compatible", [f.why for f in verdict.findings]


def test_a_property_the_destination_lacks_is_a_warning_even_when_off() -> None:
    src = vm()
    nic = replace(src.nics[0], properties=tuple(sorted({**dict(src.nics[0].properties), "host_uso": Tri.OFF}.items())))
    old = dump("old", machines=("pc-q35-10.0",), props=PROPS_72, version=(7, 2, 22))
    verdict = decide_from_dump(replace(src, nics=(nic,)), old)
    assert any(f.code == "predicted-property-absent" and "host_uso" in f.why for f in verdict.findings)


def test_profile_needs_no_override_where_every_host_defaults_off_and_pins_disagreeing_defaults() -> None:
    uso_off = {n: Tri.OFF for n in USO_OFF_PROPS}
    a = with_defaults(dump("a"), "pc-q35-7.2", **uso_off)
    b = with_defaults(dump("b", tap=ALL_ON_TAP & ~USO), "pc-q35-7.2", **uso_off)
    profiles = {(p.machine, p.backend): p for p in compat_profile(merge([a, b], made_at=1))}
    assert profiles[("pc-q35-7.2", "tap")].overrides == {}  # off by default everywhere: nothing to set
    assert profiles[("pc-q35-10.0", "tap")].overrides == dict.fromkeys(sorted(USO_OFF_PROPS), "off")
    # two builds disagree on a default whose feature every host can offer: pinned on
    c = with_defaults(dump("c"), "pc-q35-10.0", mrg_rxbuf=Tri.OFF)
    pinned = {(p.machine, p.backend): p for p in compat_profile(merge([dump("a"), c], made_at=1))}
    assert pinned[("pc-q35-10.0", "tap")].overrides == {"mrg_rxbuf": "on"}


def test_check_host_reports_profile_changes_and_unusable_overrides() -> None:
    base = merge([dump("a"), dump("b", tap=ALL_ON_TAP & ~USO)], made_at=1)
    wider = check_host(merge([dump("b", tap=ALL_ON_TAP & ~USO)], made_at=1), dump("a"), made_at=2)
    assert wider.outcome == "joins" and wider.extra and wider.profile_changes
    old = dump("old", machines=("pc-q35-10.0", "pc-q35-7.2"), props=PROPS_72, version=(7, 2, 22),
               tap=ALL_ON_TAP & ~USO)
    cannot = check_host(base, old, made_at=2)
    assert cannot.outcome == "cannot-join"
    assert any("has no property" in why and "host_uso" in why for _, _, why in cannot.missing)
