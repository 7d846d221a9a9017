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
  host cannot run is ``dest-cannot-run`` (blocked), one the dump did not probe ``dest-undetermined`` (unknown);
* a property the source's QEMU has on a value other than the destination QEMU's default there is undetermined
  unless both are the same QEMU build (set on the command line, or another build's default?); with a vhost
  backend, a property the dump did not turn on is undetermined (vhost masks bits of its own list);
* the device path and the device state follow the command line: the source's.

Nothing is negotiated on a destination. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .decide import Mode, Verdict, decide, with_findings
from .features import BY_BIT, BY_PROPERTY, CEILING_PROPERTIES, NEEDS_VNET_HDR, ONLY_VNET_HDR, SILENTLY_CLEARED
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


def _props(nic: NicReport, dump: HostDump, defaults: dict[str, Tri], same_build: bool,
           findings: list[tuple[str, str, str]]) -> tuple[dict[str, Tri], set[str]]:
    """The destination's property values, and those that cannot be told: a value that differs from the
    destination QEMU's default on this machine type was either set on the command line (then it is the same
    there) or is the default of another QEMU build (the same machine type name has had different defaults across
    builds: USO on pc-q35-8.1 in QEMU 8.2.0-8.2.4 and 8.2.5, NOTES); only the same build settles it."""
    has = dict(dump.properties)
    props: dict[str, Tri] = {}
    unsure: set[str] = set()
    for name in has:
        value, default = nic.prop(name), defaults.get(name, Tri.UNSET)
        if value is Tri.UNSET:
            value = default
        elif not same_build and default is not Tri.UNSET and value is not default:
            unsure.add(name)
        if value is not Tri.UNSET:
            props[name] = value
    qemu = ".".join(map(str, dump.qemu_version))
    for name, value in nic.properties:
        if name in BY_PROPERTY and name not in has:
            findings.append((nic.key, "predicted-property-absent",
                             f"the destination's QEMU {qemu} has no property {name} ({value} here): if the command "
                             "line sets it (a compat profile's overrides do), that QEMU will not start; otherwise "
                             "its feature is not offered there"))
    return props, unsure


def _predict_nic(nic: NicReport, dump: HostDump, machine: str, offer: Offer, kind: str, same_build: bool,
                 findings: list[tuple[str, str, str]]) -> NicReport:
    offers = dump.machine(machine)
    defaults = dict(offers.defaults) if offers else {}
    props, unsure = _props(nic, dump, defaults, same_build, findings)
    if nic.vnet_hdr is False:  # e.g. tap with vnet_hdr=off: the same command line has no header there either
        offer = Offer(offer.backend, offer.offered & ~NEEDS_VNET_HDR, offer.unknown & ~NEEDS_VNET_HDR)
    plain = kind in ("tap", "user")  # a vhost backend may mask any bit of its feature list (vhost_net.c)
    offered, unknown = 0, 0
    for name, value in props.items():
        feature = BY_PROPERTY.get(name)
        if feature is None:
            continue
        bit = 1 << feature.bit
        if name in unsure:
            unknown |= bit
            continue
        if value is not Tri.ON:
            continue
        if name in CEILING_PROPERTIES or defaults.get(name) is Tri.ON:  # the dump's NIC had it on: its answer
            offered |= bit & offer.offered
            unknown |= bit & offer.unknown
        elif plain and not SILENTLY_CLEARED & bit:  # QEMU never clears it for a plain backend
            offered |= bit
        else:
            unknown |= bit
    for name in sorted(unsure):
        findings.append((nic.key, "predicted-default-differs",
                         f"{name} is {nic.prop(name)} here but defaults to {defaults.get(name)} on {machine} in the "
                         f"destination's QEMU {'.'.join(map(str, dump.qemu_version))}: set on the command line, or "
                         "a default of another QEMU build? Its feature is undetermined"))
    source_offered = nic.offered_upper or 0
    offered |= source_offered & _COMMAND_LINE_BITS
    known = _COMMAND_LINE_BITS | sum(1 << f.bit for f in BY_PROPERTY.values())
    unknown |= source_offered & ~known
    if nic.offered is None:
        findings.append((nic.key, "offered-unknown", "the source's offered features are unknown, so the "
                         "destination's command-line bits (MTU, MAC, STANDBY, ...) cannot be predicted"))
    header = offer.offered & ONLY_VNET_HDR
    return NicReport.make(
        nic.qdev_id, nic.qom_path, properties=props, netdev_id=nic.netdev_id, backend=nic.backend,
        offered=offered, offered_unknown=unknown & ~offered, derived=("offered",) if unknown & ~offered else (),
        vnet_hdr=bool(header) if header or not offer.unknown & ONLY_VNET_HDR else None,
        dev_path=nic.dev_path, state=nic.state)


def _cannot(dump: HostDump, machine: str, backend: str, what: str) -> tuple[str, str]:
    """(code, sentence) for what the dump has no offer for: its host cannot (the dump says why), or the dump did
    not probe it (not asked for: undetermined)."""
    why = dump.why_not(machine, backend)
    if why:
        return "dest-cannot-run", f"host {dump.host} cannot run {what}: {why}"
    return "dest-undetermined", f"the dump of host {dump.host} did not probe {what} (not asked for when dumping)"


def predict_dest(source: VmReport, dump: HostDump) -> Prediction:
    """The destination on ``dump``'s host, started with ``source``'s command line."""
    version = ".".join(map(str, dump.qemu_version))
    where = f"the dump of host {dump.host} (QEMU {version}, kernel {dump.kernel}, made at {dump.made_at})"
    findings: list[tuple[str, str, str]] = [("", "predicted", f"the destination was predicted from {where}, not "
                                                              "probed: no destination QEMU was running")]
    machine = source.machine
    same_build = (source.qemu_version, source.package) == (dump.qemu_version, dump.package)
    nics = []
    void = False
    if machine is None:
        findings.append(("", "dest-undetermined", "the source's machine type is unknown, so the destination "
                                                  "cannot be predicted"))
        void = True
    elif dump.machine(machine) is None:
        findings.append(("", *_cannot(dump, machine, "*", f"machine type {machine}")))
        void = True
    else:
        for nic in source.nics:
            offer, kind, note = _offer(dump, machine, nic)
            if kind == "?":
                findings.append((nic.key, "dest-undetermined", "the backend of this NIC is unknown on the source"))
                void = True  # a NIC left out would look like a device the destination lacks
                continue
            if offer is None:
                findings.append((nic.key, *_cannot(dump, machine, kind, f"backend {kind} on {machine}")))
                void = True
                continue
            if note:
                findings.append((nic.key, "dest-undetermined", note))
            if kind == "tap" and nic.backend_features is None and dump.offer(machine, "tap-vhost") is None:
                findings.append((nic.key, "dest-undetermined",
                                 f"whether the source's tap uses vhost-net could not be read, and host {dump.host} "
                                 f"has no vhost-net taps ({dump.why_not(machine, 'tap-vhost') or 'not dumped'}): "
                                 "with vhost=on that QEMU would not start"))
            nics.append(_predict_nic(nic, dump, machine, offer, kind, same_build, findings))
    report = VmReport(dump.host, dump.qemu_version, dump.package, machine, nics=() if void else tuple(nics),
                      devices_known=source.devices_known and not void,
                      vm_name=source.vm_name, vm_uuid=source.vm_uuid, made_at=dump.made_at, side="dest")
    return Prediction(report, tuple(findings), where)


def decide_from_dump(source: VmReport, dump: HostDump, *, mode: Mode = Mode.STRICT,
                     policy: Policy | None = None) -> Verdict:
    """``decide`` against the destination predicted from ``dump``; the verdict says it was predicted."""
    prediction = predict_dest(source, dump)
    verdict = decide(source, prediction.report, mode=mode, policy=policy)
    if not prediction.report.devices_known and source.devices_known:
        # The device list of the prediction is void: keep only what is about the whole VM and the prediction.
        verdict = replace(verdict, findings=tuple(f for f in verdict.findings if f.code != "devices-unknown"))
    verdict = with_findings(verdict, prediction.findings)
    return replace(verdict, predicted=PREDICTED_FACTS, predicted_from=prediction.source)

