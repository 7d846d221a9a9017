"""Predict a destination QEMU from its host's dump, for a precheck before any destination QEMU exists.

The destination is taken to be started with the source's command line on the dump's host. Per NIC:

* the property values: the source's for every property both QEMUs have (the probe reads effective values, and
  the same command line on the same machine type gives the same values: that is the machine type's promise);
  the dump's default on that machine type for a property only the destination's QEMU has; a property only the
  source's QEMU has is absent there (not offered; if the command line sets it, that QEMU will not even start);
* the offered bitmap: a property that is on gives its bit where QEMU never clears it silently, and where it may
  (``features.SILENTLY_CLEARED``) only if the dump's host offered the bit with every property on (undetermined
  there: undetermined here); bits without a property (MAC, MTU, STANDBY, SPEED_DUPLEX, VERSION_1, bit 30) follow
  the command line, so the source's; bits the catalogue does not know are undetermined;
* the backend kind (``tap``, ``tap-vhost``, ``user``, ...): the source's; a backend or machine type the dump's
  host cannot run is a finding (``dest-cannot-run``);
* the device path and the device state follow the command line: the source's.

Nothing is negotiated on a destination. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .decide import Mode, Verdict, decide, with_findings
from .features import BY_BIT, BY_PROPERTY, ONLY_VNET_HDR, SILENTLY_CLEARED
from .model import NicReport, Tri, VmReport
from .platform import HostDump, Offer
from .policy import Policy

__all__ = ["PREDICTED_FACTS", "Prediction", "backend_kind", "decide_from_dump", "predict_dest"]

PREDICTED_FACTS = ("machine", "backend", "properties", "offered", "vnet_hdr", "dev_path", "state")
# Bits QEMU sets from the command line, not from a feature property: MTU (host_mtu), MAC (always), bit 30 (PCI
# transport), VERSION_1 (disable-modern), STANDBY (failover), SPEED_DUPLEX (speed/duplex).
_COMMAND_LINE_BITS = sum(1 << b for b, f in BY_BIT.items() if f.prop is None)


def backend_kind(nic: NicReport) -> str | None:
    """The dump's backend kind of a NIC: its netdev type, ``tap-vhost`` for a tap with vhost-net (a vhost backend
    reports its features; a plain tap reports none: ``backend-features`` empty, seen on QEMU 10.0)."""
    if nic.backend == "tap" and nic.backend_features:
        return "tap-vhost"
    return nic.backend


@dataclass(frozen=True, slots=True)
class Prediction:
    report: VmReport  # the destination as predicted
    findings: tuple[tuple[str, str, str], ...]  # (device key, rule code, sentence)
    source: str  # which dump it came from, in words


def _offer(dump: HostDump, machine: str, nic: NicReport) -> tuple[Offer | None, str, str | None]:
    """The dump's offer for this NIC's backend, the kind used, and a note when the kind is not certain."""
    kind = backend_kind(nic) or "?"
    offer = dump.offer(machine, kind)
    if kind == "tap" and nic.backend_features is None and offer is not None:
        vhost = dump.offer(machine, "tap-vhost")
        if vhost is not None and (vhost.offered, vhost.unknown) != (offer.offered, offer.unknown):
            differ = (vhost.offered ^ offer.offered) | vhost.unknown
            return Offer("tap", offer.offered & ~differ, (offer.unknown | differ) & ~(offer.offered & ~differ)), \
                kind, "whether the source's tap uses vhost-net could not be read, and the host's offers differ"
    return offer, kind, None


def _predict_nic(nic: NicReport, dump: HostDump, machine: str, offer: Offer,
                 findings: list[tuple[str, str, str]]) -> NicReport:
    has = dict(dump.properties)
    defaults = dict(m.defaults) if (m := dump.machine(machine)) else {}
    props: dict[str, Tri] = {}
    for name in has:
        value = nic.prop(name)
        if value is Tri.UNSET:
            value = defaults.get(name, Tri.UNSET)
        if value is not Tri.UNSET:
            props[name] = value
    for name, value in nic.properties:
        if name in BY_PROPERTY and name not in has and value is Tri.ON:
            findings.append((nic.key, "predicted-property-absent",
                             f"the destination's QEMU {'.'.join(map(str, dump.qemu_version))} has no property "
                             f"{name}, which is on here: if the command line sets it, that QEMU will not start; "
                             "otherwise its feature is not offered there"))
    offered, unknown = 0, 0
    for name, value in props.items():
        feature = BY_PROPERTY.get(name)
        if feature is None or value is not Tri.ON:
            continue
        bit = 1 << feature.bit
        if not SILENTLY_CLEARED & bit or offer.offered & bit:
            offered |= bit
        elif offer.unknown & bit:
            unknown |= bit
    source_offered = nic.offered_upper or 0
    offered |= source_offered & _COMMAND_LINE_BITS
    known = _COMMAND_LINE_BITS | sum(1 << f.bit for f in BY_PROPERTY.values())
    unknown |= source_offered & ~known
    if nic.offered is None:
        findings.append((nic.key, "offered-unknown", "the source's offered features are unknown, so the "
                         "destination's command-line bits (MTU, MAC, STANDBY, ...) cannot be predicted"))
    return NicReport.make(
        nic.qdev_id, nic.qom_path, properties=props, netdev_id=nic.netdev_id, backend=nic.backend,
        offered=offered, offered_unknown=unknown & ~offered, derived=("offered",) if unknown & ~offered else (),
        vnet_hdr=bool(offer.offered & ONLY_VNET_HDR) if offer.offered & ONLY_VNET_HDR or not offer.unknown else None,
        dev_path=nic.dev_path, state=nic.state)


def predict_dest(source: VmReport, dump: HostDump) -> Prediction:
    """The destination on ``dump``'s host, started with ``source``'s command line."""
    version = ".".join(map(str, dump.qemu_version))
    where = f"the dump of host {dump.host} (QEMU {version}, kernel {dump.kernel}, made at {dump.made_at})"
    findings: list[tuple[str, str, str]] = [("", "predicted", f"the destination was predicted from {where}, not "
                                                              "probed: no destination QEMU was running")]
    machine = source.machine
    nics = []
    if machine is not None and dump.machine(machine) is None:
        why = dump.why_not(machine, "*") or f"its dump has no machine type {machine}"
        findings.append(("", "dest-cannot-run", f"host {dump.host} cannot run machine type {machine}: {why}"))
    elif machine is not None:
        for nic in source.nics:
            offer, kind, note = _offer(dump, machine, nic)
            if offer is None:
                why = dump.why_not(machine, kind) or f"its dump has no backend {kind} for {machine}"
                findings.append((nic.key, "dest-cannot-run",
                                 f"host {dump.host} cannot give this NIC its backend {kind}: {why}"))
                continue
            if note:
                findings.append((nic.key, "predicted", note))
            nics.append(_predict_nic(nic, dump, machine, offer, findings))
    report = VmReport(dump.host, dump.qemu_version, dump.package, machine, nics=tuple(nics),
                      devices_known=source.devices_known and not any(
                          code == "dest-cannot-run" for _, code, _ in findings),
                      vm_name=source.vm_name, vm_uuid=source.vm_uuid, made_at=dump.made_at, side="dest")
    if not report.devices_known:
        report = replace(report, nics=())
    return Prediction(report, tuple(findings), where)


def decide_from_dump(source: VmReport, dump: HostDump, *, mode: Mode = Mode.STRICT,
                     policy: Policy | None = None) -> Verdict:
    """``decide`` against the destination predicted from ``dump``; the verdict says it was predicted."""
    prediction = predict_dest(source, dump)
    verdict = decide(source, prediction.report, mode=mode, policy=policy)
    if any(code == "dest-cannot-run" for _, code, _ in prediction.findings):
        # The device list of the prediction is void: keep only what is about the whole VM and the prediction.
        verdict = replace(verdict, findings=tuple(f for f in verdict.findings if f.code != "devices-unknown"))
    verdict = with_findings(verdict, prediction.findings)
    return replace(verdict, predicted=PREDICTED_FACTS, predicted_from=prediction.source)

