"""The decision engine: two ``VmReport``s in, a ``Verdict`` out. Pure and synchronous.

What QEMU checks when the destination loads a virtio-net device (``hw/net/virtio-net.c`` and
``hw/virtio/virtio.c``), and so what decides whether a migration *loads*:

* ``virtio_load`` -> ``virtio_set_features_nocheck``: the features the guest negotiated on the source (its saved
  guest features) must all be offered by the destination, else ``Features 0x... unsupported. Allowed features:
  0x...``. With no driver (negotiated = 0) this passes, whatever the destination offers.
* ``virtio_net_vnet_post_load``: a source whose peer had a virtio-net header needs one on the destination, else
  ``virtio-net: saved image requires vnet_hdr=on`` (even with no driver).
* ``virtio_net_ufo_post_load``: likewise for UFO: ``saved image requires TUN_F_UFO support``.

Whether the guest-visible ABI stays the same is stricter: the offered bitmaps must be identical, or the guest
sees features appear or vanish at its next device reset.

QEMU does not report vnet_hdr or UFO support directly; they are inferred from what it offers against what was
asked (``virtio_net_get_features`` clears the header-dependent bits without a vnet header, and the UFO bits
without UFO). Where neither proves the answer, it is unknown, and unknown is never compatible.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .features import (
    BY_BIT,
    BY_PROPERTY,
    CLEARING_RULES,
    NEEDS_UFO,
    NEEDS_VNET_HDR,
    ONLY_VNET_HDR,
    bits_of,
    mask_of,
    missing_requirements,
)
from .model import NicReport, Tri, VmReport
from .pairing import pair_devices, state_checks
from .policy import Policy
from .rules import Mode, Severity, severity_of
from .verdict import RANK, Collector, Finding, Outcome, Verdict, outcome_of

__all__ = ["Finding", "Mode", "Outcome", "Severity", "Verdict", "decide", "different_vms", "has_negotiated",
           "report_warnings", "with_findings", "with_warnings"]


def _lacks(bit: int, nic: NicReport) -> str:
    """Why ``nic`` does not offer ``bit``: a QEMU without the property (too old for the feature) before any
    backend guess."""
    feature = BY_BIT.get(bit)
    if feature is not None and feature.prop and nic.properties and nic.prop(feature.prop) is Tri.UNSET:
        return "this QEMU has no property for it: it predates the feature"
    return _cause(bit)


def _cause(bit: int, *, known: bool = True) -> str:
    for rule in CLEARING_RULES:
        if rule.mask >> bit & 1:
            return rule.cleared if known else rule.depends
    if not known:
        return "the backend or the PCI transport, which this QEMU cannot report safely"
    return "a machine-type compat property, a property set differently, or a different QEMU build"


def _sides(src: int, dst: int) -> str:
    return "source or the destination" if src and dst else "source" if src else "destination"


def _state(bitmap: int | None, bit: int, unknown: int = 0) -> str:
    if bitmap is None:
        return "unknown"
    return "undetermined" if unknown >> bit & 1 else ("offered" if bitmap >> bit & 1 else "not offered")


def vnet_hdr(nic: NicReport) -> bool | None:
    """Whether the NIC's backend has a virtio-net header: reported, or inferred from offered vs declared."""
    if nic.vnet_hdr is not None:
        return nic.vnet_hdr
    if nic.offered is None:
        return None
    if nic.offered & NEEDS_VNET_HDR:
        return True
    # Only a bit that nothing but a missing header clears proves there is none (USO, UFO, ... have other causes);
    # a bit whose offer is undetermined proves nothing.
    asked = [BY_PROPERTY[p].bit for p, tri in nic.properties if tri is Tri.ON and p in BY_PROPERTY]
    return False if any(ONLY_VNET_HDR >> b & 1 and not nic.offered_unknown >> b & 1 for b in asked) else None


def has_ufo(nic: NicReport) -> bool | None:
    """Whether the NIC's backend supports UFO (QEMU's peer_has_ufo), inferred like ``vnet_hdr``."""
    header = vnet_hdr(nic)
    if header is False:
        return False
    if nic.offered is None or header is None:
        return None
    if nic.offered & NEEDS_UFO:
        return True
    asked = any(nic.prop(BY_BIT[b].prop or "") is Tri.ON for b in bits_of(NEEDS_UFO & ~nic.offered_unknown))
    return False if asked else None


def _bit_finding(c: Collector, device: str, code: str, why: str, bit: int, src: NicReport, dst: NicReport) -> None:
    negotiated = bool((src.negotiated or 0) >> bit & 1) if has_negotiated(src) else None
    feature = BY_BIT.get(bit)
    c.add(device, code, why, feature=feature.name if feature else None, bit=bit,
          source=_state(src.offered, bit, src.offered_unknown), dest=_state(dst.offered, bit, dst.offered_unknown),
          negotiated=negotiated)


_FEATURES_OK = 8  # virtio status bit (labels.STATUS_BITS)


def has_negotiated(nic: NicReport) -> bool:
    """Whether the driver has negotiated features that were read: a non-zero negotiated bitmap, not derived, and
    FEATURES_OK set where the status is known. Otherwise a finding's ``negotiated`` is None (JSON ``null``)."""
    if not nic.negotiated or {"negotiated", "driver_status"} & set(nic.derived):
        return False
    return nic.driver_status is None or bool(nic.driver_status & _FEATURES_OK)


def _silent_turn_offs(c: Collector, key: str, side: str, nic: NicReport) -> None:
    if nic.offered is None:
        return
    for prop, tri in nic.properties:
        feature = BY_PROPERTY.get(prop)
        if feature is None or tri is not Tri.ON or (nic.offered_upper or 0) >> feature.bit & 1:
            continue
        c.add(key, "silently-off",
              f"its property is on (set or by default), yet the {side} QEMU silently does not offer it: "
              f"{_cause(feature.bit)}.",
              feature=feature.name, bit=feature.bit, **{"source" if side == "source" else "dest": "on, not offered"})


def _load_checks(c: Collector, key: str, src: NicReport, dst: NicReport) -> None:
    """The conditions under which QEMU itself refuses to load the device."""
    # QEMU checks the saved guest features whatever the driver status (a driver that wrote its features but has
    # not set FEATURES_OK yet counts too); a device reset clears them (virtio_reset).
    if src.negotiated is None:
        c.add(key, "negotiated-unknown",
              "the guest's negotiated features on the source could not be read.")
    elif dst.offered is not None:
        assumed = "negotiated" in src.derived
        uses = "the guest may use it (its negotiated features cannot be read on this QEMU, so all are assumed)" \
            if assumed else "the guest uses it"
        for bit in bits_of(src.negotiated & ~dst.offered):
            if (src.offered_unknown | dst.offered_unknown) >> bit & 1:
                sides = _sides(src.offered_unknown >> bit & 1, dst.offered_unknown >> bit & 1)
                _bit_finding(c, key, "negotiated-undetermined",
                             f"{uses}, and whether the {sides}"
                             f" offers it cannot be told safely (it depends on {_cause(bit, known=False)}): if the "
                             "guest uses it and the destination lacks it, QEMU will refuse the load.", bit, src, dst)
                continue
            _bit_finding(c, key, "negotiated-missing",
                         f"{uses} and the destination does not offer it ({_lacks(bit, dst)}): QEMU will "
                         "refuse the load with 'Features 0x... unsupported'.",
                         bit, src, dst)
    for check, text, error in ((vnet_hdr, "a virtio-net header (vnet_hdr)", "saved image requires vnet_hdr=on"),
                               (has_ufo, "UFO support", "saved image requires TUN_F_UFO support")):
        had, has = check(src), check(dst)
        if had is False:
            continue
        if had is True and has is False:
            c.add(key, f"backend-{check.__name__}",
                  f"the source's backend has {text} and the destination's does not: QEMU will refuse the load "
                  f"with '{error}'.", source="yes", dest="no")
        elif had is None or has is None:
            c.add(key, f"backend-{check.__name__}-unknown",
                  f"whether the {'source' if had is None else 'destination'} backend has {text} cannot be told "
                  "from what QEMU reports.", source=str(had).lower(), dest=str(has).lower())


def _compare(c: Collector, key: str, src: NicReport, dst: NicReport, mode: Mode, policy: Policy) -> None:
    if src.offered is None or dst.offered is None:
        c.add(key, "offered-unknown",
              f"the features the {'source' if src.offered is None else 'destination'} offers could not be read.")
        return
    overrides: dict[str, str] = {}
    undetermined = src.offered_unknown | dst.offered_unknown
    in_load_checks = (src.negotiated or 0) & ~dst.offered  # already a negotiated-* finding
    for bit in bits_of(undetermined & ~in_load_checks):
        _bit_finding(c, key, "offered-undetermined",
                     f"whether the {_sides(src.offered_unknown >> bit & 1, dst.offered_unknown >> bit & 1)} offers "
                     f"it cannot be told safely (it depends on {_cause(bit, known=False)}), so the guest ABI "
                     "cannot be proven identical.", bit, src, dst)
    missing = src.offered & ~dst.offered & ~undetermined
    if missing and mode is Mode.LENIENT and not src.negotiated and "negotiated" not in src.derived:
        c.add(key, "negotiation-pending",
              "the guest's driver has negotiated nothing yet (booting, or paused before its driver loaded): it may "
              "still negotiate a feature the destination does not offer before the switchover, and the load would "
              "then fail; migrate with a re-check at the switchover, or use strict mode.")
    for bit in bits_of(missing):
        negotiated = src.negotiated is not None and bool(src.negotiated >> bit & 1)
        if negotiated:
            continue  # already a blocker from the load checks
        _bit_finding(c, key, "offer-missing",
                     f"the destination does not offer it ({_lacks(bit, dst)}): the guest would lose it at its next "
                     "device reset (ABI change).", bit, src, dst)
    extra = dst.offered & ~src.offered & ~undetermined
    for bit in bits_of(extra):
        feature = BY_BIT.get(bit)
        prop = feature.prop if feature else None
        if prop is None or dst.prop(prop) is Tri.UNSET:
            _bit_finding(c, key, "offer-extra-fixed",
                         "only the destination offers it and has no property to turn it off: the guest would see "
                         "a new feature after its next reset (ABI change).", bit, src, dst)
            continue
        overrides[prop] = "off"
        _bit_finding(c, key, "offer-extra",
                     "only the destination offers it; turn it off there to keep the guest ABI identical.",
                     bit, src, dst)
    _apply_policy(c, key, src, dst, policy, overrides)
    if overrides and missing_requirements(dst.offered & ~mask_of(BY_PROPERTY[p].bit for p in overrides)):
        c.add(key, "overrides-inconsistent",
              "turning the extra features off would leave the destination with a feature set the virtio spec "
              "forbids (a feature without the one it requires).")
        return
    if overrides:
        if mode is Mode.STRICT or any(f.severity is Severity.ADJUST and f.device == key for f in c.findings):
            c.adjust[dst.key] = overrides  # the destination's own id: the overrides go on its command line
        else:
            c.recommend[dst.key] = overrides


def _apply_policy(c: Collector, key: str, src: NicReport, dst: NicReport, policy: Policy,
                  overrides: dict[str, str]) -> None:
    if src.offered is None or dst.offered is None:
        return
    for prop, want in policy.properties.items():
        bit = BY_PROPERTY[prop].bit
        if want is not Tri.AUTO and (src.offered_unknown | dst.offered_unknown) >> bit & 1:
            _bit_finding(c, key, "policy-undetermined",
                         f"policy requires {prop}={want}, and whether it is offered cannot be told safely.",
                         bit, src, dst)
            continue
        in_src, in_dst = bool(src.offered >> bit & 1), bool(dst.offered >> bit & 1)
        if want is Tri.ON and not (in_src and in_dst):
            where = " and ".join(s for s, ok in (("source", in_src), ("destination", in_dst)) if not ok)
            _bit_finding(c, key, "policy-on",
                         f"policy requires {prop}=on but the {where} does not offer it ({_cause(bit)}).",
                         bit, src, dst)
        elif want is Tri.OFF and in_src:
            _bit_finding(c, key, "policy-off-source",
                         f"policy requires {prop}=off but the source offers it; a running guest cannot be "
                         "changed.", bit, src, dst)
        elif want is Tri.OFF and in_dst:
            # never passed silently: even where lenient mode would only recommend the override, policy adjusts
            if dst.prop(prop) is Tri.UNSET and prop not in overrides:
                _bit_finding(c, key, "policy-off-fixed",
                             f"policy requires {prop}=off; the destination offers it and has no such property.",
                             bit, src, dst)
            else:
                overrides[prop] = "off"
                _bit_finding(c, key, "policy-off",
                             f"policy requires {prop}=off; turn it off on the destination.", bit, src, dst)


def _qemu(report: VmReport) -> str:
    return "QEMU " + ".".join(map(str, report.qemu_version)) if report.qemu_version else "QEMU of unknown version"


def with_warnings(verdict: Verdict, warnings: Iterable[tuple[str, str]]) -> Verdict:
    """The verdict with VM-wide warnings added (``(code, sentence)``): they inform, the outcome stays."""
    extra = tuple(Finding("", severity_of(code, verdict.mode), code, why) for code, why in warnings)
    findings = tuple(sorted(verdict.findings + extra, key=lambda f: (RANK[f.severity], f.device, f.bit or -1)))
    return replace(verdict, findings=findings)


def with_findings(verdict: Verdict, found: Iterable[tuple[str, str, str]]) -> Verdict:
    """The verdict with more findings (``(device, code, sentence)``), its outcome decided again from all of them."""
    extra = tuple(Finding(device, severity_of(code, verdict.mode), code, why) for device, code, why in found)
    findings = tuple(sorted(verdict.findings + extra, key=lambda f: (RANK[f.severity], f.device, f.bit or -1)))
    outcome = outcome_of(findings)
    return replace(verdict, outcome=outcome, findings=findings,
                   adjustments=verdict.adjustments if outcome is Outcome.ADJUSTABLE else {},
                   recommendations=verdict.recommendations if outcome is not Outcome.BLOCKED else {})


def report_warnings(source: VmReport, dest: VmReport, *, now: int, max_age: int,
                    verified: bool) -> list[tuple[str, str]]:
    """What an operator deciding from two report files should know: old reports, unsigned ones, swapped sides."""
    warnings = []
    for name, report in (("source", source), ("destination", dest)):
        if report.made_at is None:
            warnings.append(("report-age-unknown", f"the {name} report does not say when it was made."))
        elif now - report.made_at > max_age:
            warnings.append(("report-old", f"the {name} report is {now - report.made_at} s old (limit {max_age} s): "
                                           "the VM may have changed since; probe again."))
    if (source.side, dest.side) == ("dest", "source"):
        warnings.append(("report-sides-swapped", "the first report was made of a destination and the second of a "
                                                 "source: check the order of the files."))
    if not verified:
        warnings.append(("report-unsigned", "the reports were not HMAC-verified (no --key-file): anyone who could "
                                            "write the files could have changed them."))
    return warnings


def different_vms(source: VmReport, dest: VmReport) -> str | None:
    """Why two reports describe different VMs (UUID or name differ where both are known), or None."""
    for what, a, b in (("UUID", source.vm_uuid, dest.vm_uuid), ("name", source.vm_name, dest.vm_name)):
        if a is not None and b is not None and a != b:
            return f"the reports describe different VMs ({what} {a!r} vs {b!r})"
    return None


def decide(source: VmReport | None, dest: VmReport | None, *, mode: Mode = Mode.STRICT,
           policy: Policy | None = None, problems: Iterable[str] = ()) -> Verdict:
    """Compare the two sides. ``problems`` are reasons a side could not be probed at all (verdict unknown)."""
    policy = policy or Policy()
    c = Collector(mode)
    for problem in problems:
        c.add("", "probe-failed", problem)
    if source is None or dest is None:
        if not any(f.code == "probe-failed" for f in c.findings):
            c.add("", "probe-failed", "a side was not probed.")
        return Verdict(outcome_of(c.findings), mode, tuple(c.findings), source=source, dest=dest)
    for side, report in (("source", source), ("destination", dest)):
        for note in report.unreadable:
            c.add("", "unreadable", f"on the {side}, {note}.")
    if source.machine is None or dest.machine is None:
        c.add("", "machine-unknown", "the machine type of a side could not be read.")
    elif source.machine != dest.machine:
        c.add("", "machine-differs",
              f"the machine types differ ({source.machine} vs {dest.machine}): QEMU migrates only between equal "
              "machine types.", source=source.machine, dest=dest.machine)
    if not (source.devices_known and dest.devices_known):
        c.add("", "devices-unknown",
              "the virtio-net devices of a side could not be listed, so they cannot be compared.")
        return _verdict(c, mode, source, dest)
    pairs = pair_devices(c, source.nics, dest.nics)
    for src, dst in pairs:
        if src is None or dst is None:
            continue
        for side, nic, report in (("source", src, source), ("destination", dst, dest)):
            for note in nic.unreadable:
                c.add(src.key, "unreadable", f"on the {side}, {note}.")
            if nic.derived:
                c.add(src.key, "derived",
                      f"on the {side} ({_qemu(report)}), {', '.join(nic.derived)} were derived, not read: "
                      "x-query-virtio-status is known to crash this QEMU, so offered features come from its "
                      "properties and backend facts and the guest is assumed to use every feature that may be "
                      "offered.", **{"source" if side == "source" else "dest": "derived"})
            _silent_turn_offs(c, src.key, side, nic)
        _load_checks(c, src.key, src, dst)
        _compare(c, src.key, src, dst, mode, policy)
        state_checks(c, src.key, src, dst)
    if not source.nics and not dest.nics:
        c.add("", "no-nics", "neither side has a virtio-net device.")
    return _verdict(c, mode, source, dest, tuple((s.key if s else None, d.key if d else None) for s, d in pairs))


def _verdict(c: Collector, mode: Mode, source: VmReport, dest: VmReport,
             pairs: tuple[tuple[str | None, str | None], ...] = ()) -> Verdict:
    findings = tuple(sorted(c.findings, key=lambda f: (RANK[f.severity], f.device, f.bit or -1)))
    outcome = outcome_of(findings)
    adjustments = c.adjust if outcome is Outcome.ADJUSTABLE else {}
    recommendations = c.recommend if outcome is not Outcome.BLOCKED else {}
    return Verdict(outcome, mode, findings, adjustments, recommendations, source, dest, pairs)
