"""The cluster baseline: merge host dumps with AND, say why each bit went, check a new host, give the compat profile.

* ``merge(dumps)``: per (machine type, backend kind), the AND of every host's offer (undetermined bits count as not
  offered), the OR (what some host can), which host removed which bits, and which hosts cannot run it at all.
* ``extend(baseline, dumps)``: the same with more hosts (a host given again replaces its earlier dump).
* ``check_host(baseline, dump)``: does a new host join (offers at least the baseline everywhere), narrow it
  (which bits, why, and the baseline it would leave), or not join at all (a machine type or backend missing)?
* ``compat_profile(baseline)``: per (machine type, backend kind), the property overrides that make a VM offer
  only what every host can, as a dict, as ``-device`` properties and as a libvirt ``<qemu:override>`` fragment.

Pure: bad input raises ``UsageError`` with a sentence naming it; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import UsageError
from .features import BY_BIT, BY_PROPERTY, CLEARING_RULES, NEEDS_VNET_HDR, ONLY_VNET_HDR, bits_of
from .model import Tri
from .platform import Baseline, BaselineEntry, BaselineHost, HostDump

__all__ = [
    "HostCheck",
    "Narrowing",
    "Profile",
    "causes",
    "check_host",
    "compat_profile",
    "extend",
    "merge",
]

Key = tuple[str, str]  # (machine type, backend kind)


@dataclass(frozen=True, slots=True)
class _Host:
    """One host as the merge sees it: its identity and, per key, (offered, undetermined) or why it has none."""

    info: BaselineHost
    offers: dict[Key, tuple[int, int]]
    missing: dict[Key, str]
    defaults: dict[Key, tuple[int, int]]  # per key: (properties on by default, off by default), by feature bit


def _default_bits(defaults: tuple[tuple[str, Tri], ...]) -> tuple[int, int]:
    on = off = 0
    for name, value in defaults:
        feature = BY_PROPERTY.get(name)
        if feature is not None:
            if value is Tri.OFF:
                off |= 1 << feature.bit
            else:  # on, or auto (on where the backend can)
                on |= 1 << feature.bit
    return on, off


def _version(v: tuple[int, int, int] | None) -> str:
    return ".".join(map(str, v)) if v else "?"


def _build(info: BaselineHost) -> str:
    return f"QEMU {_version(info.qemu_version)}" + (f" ({info.package})" if info.package else "")


def _from_dump(dump: HostDump) -> _Host:
    if not isinstance(dump, HostDump):
        raise UsageError(f"not a host dump: {type(dump).__name__}")
    info = BaselineHost(dump.host, dump.kernel, dump.qemu_version, dump.package, dump.made_at, dump.properties)
    offers = {(m.machine, o.backend): (o.offered, o.unknown) for m in dump.machines for o in m.offers}
    bits = {m.machine: _default_bits(m.defaults) for m in dump.machines}
    defaults = {key: bits[key[0]] for key in offers}
    missing: dict[Key, str] = {}
    for item in dump.unprobed:  # reasons for what the dump could not probe; the merge looks them up per key
        missing.setdefault((item.machine or "*", item.backend or "*"), item.reason)
    return _Host(info, offers, missing, defaults)


def _from_baseline(baseline: Baseline) -> list[_Host]:
    """The hosts of a baseline as they went in (a host's offer is the union minus what it removed)."""
    hosts = [_Host(info, {}, {}, {}) for info in baseline.hosts]
    for e in baseline.entries:
        key = (e.machine, e.backend)
        removed, undetermined = dict(e.removed), dict(e.undetermined)
        for index in e.hosts:  # a host's own defaults are not kept: the entry's (on somewhere, off somewhere)
            hosts[index].offers[key] = (e.union & ~removed.get(index, 0), undetermined.get(index, 0))
            hosts[index].defaults[key] = (e.defaults_on, e.defaults_off)
        for index, reason in e.missing:
            hosts[index].missing[key] = reason
    return hosts


def _why_missing(host: _Host, key: Key) -> str:
    machine, backend = key
    for probe in (key, (machine, "*"), ("*", backend), ("*", "*")):
        if probe in host.missing:
            return host.missing[probe]
    if any(k[0] == machine for k in host.offers):
        return f"its dump has no backend {backend} for {machine} (not asked for with --backend)"
    return f"its dump has no machine type {machine} (not asked for with --machine)"


def _check_hosts(hosts: Sequence[_Host]) -> None:
    seen: dict[str, BaselineHost] = {}
    for host in hosts:
        info = host.info
        first = seen.get(info.host)
        if first is None:
            seen[info.host] = info
            continue
        if (first.qemu_version, first.package) != (info.qemu_version, info.package):
            raise UsageError(f"host {info.host} is given twice with different QEMU builds ({_build(first)} and "
                             f"{_build(info)}): a host runs one QEMU build; give only its current dump (dump a "
                             "second build under another --host name)")
        raise UsageError(f"host {info.host} is given twice ({_build(info)}, dumps made at {first.made_at} and "
                         f"{info.made_at}): give each host's dump once")


def _merge(hosts: Sequence[_Host], made_at: int) -> Baseline:
    if not hosts:
        raise UsageError("no host dumps to merge: give at least one")
    _check_hosts(hosts)
    found: dict[Key, list[tuple[int, int, int]]] = {}
    default_bits: dict[Key, tuple[int, int]] = {}
    for index, host in enumerate(hosts):
        for key, (offered, unknown) in host.offers.items():
            found.setdefault(key, []).append((index, offered, unknown))
            on, off = host.defaults.get(key, (0, 0))
            was_on, was_off = default_bits.get(key, (0, 0))
            default_bits[key] = (was_on | on, was_off | off)
    entries = []
    for key in sorted(found):
        offers = found[key]
        union, meet = 0, -1
        for _, offered, unknown in offers:
            union |= offered | unknown
            meet &= offered
        removed = tuple((i, union & ~offered) for i, offered, _ in offers if union & ~offered)
        undetermined = tuple((i, unknown) for i, _, unknown in offers if unknown)
        present = {i for i, _, _ in offers}
        missing = tuple((i, _why_missing(h, key)) for i, h in enumerate(hosts) if i not in present)
        entries.append(BaselineEntry(key[0], key[1], meet, union, tuple(i for i, _, _ in offers), removed,
                                     undetermined, missing, *default_bits[key]))
    return Baseline(made_at, tuple(h.info for h in hosts), tuple(entries))


def merge(dumps: Iterable[HostDump], *, made_at: int) -> Baseline:
    """The AND of the dumps per (machine type, backend kind), with provenance. Each host once."""
    return _merge([_from_dump(d) for d in dumps], made_at)


def extend(baseline: Baseline, dumps: Iterable[HostDump], *, made_at: int) -> Baseline:
    """``baseline`` with more hosts; a dump of a host already in it replaces that host's part."""
    new = [_from_dump(d) for d in dumps]
    _check_hosts(new)
    names = {h.info.host for h in new}
    return _merge([h for h in _from_baseline(baseline) if h.info.host not in names] + new, made_at)


# ------------------------------------------------------------------------------------------------ causes

def _cause(bit: int, info: BaselineHost, lacks: int, undetermined: int, backend: str) -> str:
    feature = BY_BIT.get(bit)
    qemu = f"QEMU {_version(info.qemu_version)}"
    if undetermined >> bit & 1:
        return (f"undetermined on {info.host}: {qemu} cannot report its offered features safely, and this one "
                "could not be derived")
    if feature is not None and feature.prop is not None and feature.prop not in dict(info.properties):
        return f"{qemu} has no property for it: it predates the feature"
    header_gone = ONLY_VNET_HDR & lacks == ONLY_VNET_HDR
    for rule in CLEARING_RULES:
        if not rule.mask >> bit & 1:
            continue
        if header_gone and rule.fact != "vnet_hdr" and NEEDS_VNET_HDR >> bit & 1:
            continue  # without a virtio-net header every header bit goes: that is the cause, not USO or UFO
        text = rule.cleared
        if rule.fact in ("uso", "tunnel", "ufo") and backend.startswith("tap"):
            text += f" (this host's kernel: {info.kernel})"
        return text
    return f"not offered by {qemu} on this host even with every property on"


def causes(baseline: Baseline, entry: BaselineEntry) -> list[tuple[str, int, str]]:
    """(host, bits, cause) for every host that removed bits from ``entry``, bits grouped by cause."""
    undetermined = dict(entry.undetermined)
    out: list[tuple[str, int, str]] = []
    for index, bits in entry.removed:
        info = baseline.hosts[index]
        lacks = bits | (~entry.union & NEEDS_VNET_HDR)
        groups: dict[str, int] = {}
        for bit in bits_of(bits):
            text = _cause(bit, info, lacks, undetermined.get(index, 0), entry.backend)
            groups[text] = groups.get(text, 0) | 1 << bit
        out += [(info.host, mask, text) for text, mask in groups.items()]
    return out


# ------------------------------------------------------------------------------------------------ new hosts

@dataclass(frozen=True, slots=True)
class Narrowing:
    machine: str
    backend: str
    bits: int  # in the baseline, not offered by the new host
    causes: tuple[tuple[int, str], ...]  # (bits, cause)
    offered_after: int  # the entry's baseline once the host joins


@dataclass(frozen=True, slots=True)
class HostCheck:
    host: str
    outcome: str  # "joins" / "narrows" / "cannot-join"
    narrowings: tuple[Narrowing, ...]
    missing: tuple[tuple[str, str, str], ...]  # (machine, backend, why the new host cannot run it)
    extra: tuple[tuple[str, str, int], ...]  # (machine, backend, bits the new host offers beyond the baseline)
    after: Baseline  # the baseline with the new host in it
    # (machine, backend, overrides before, overrides after): the compat profile changes once the host joins (VMs
    # started with the old profile may then offer what the new host cannot, or the new host more than they do)
    profile_changes: tuple[tuple[str, str, dict[str, str], dict[str, str]], ...] = ()


def check_host(baseline: Baseline, dump: HostDump, *, made_at: int) -> HostCheck:
    """Whether ``dump``'s host offers at least the baseline for every (machine type, backend kind) of it."""
    host = _from_dump(dump)
    after = extend(baseline, [dump], made_at=made_at)
    narrowings, missing, extra = [], [], []
    for entry in baseline.entries:
        key = (entry.machine, entry.backend)
        if not entry.hosts:
            continue  # no host of the baseline runs it either: nothing the new host could narrow
        if key not in host.offers:
            missing.append((entry.machine, entry.backend, _why_missing(host, key)))
            continue
        offered, _ = host.offers[key]
        new = after.entry(*key)
        assert new is not None
        if entry.offered & ~offered:
            mine = [(bits, text) for name, bits, text in causes(after, new) if name == dump.host]
            lost = entry.offered & ~offered
            narrowings.append(Narrowing(entry.machine, entry.backend, lost,
                                        tuple((bits & lost, text) for bits, text in mine if bits & lost),
                                        new.offered))
        if offered & ~entry.union:
            extra.append((entry.machine, entry.backend, offered & ~entry.union))
    before = {(p.machine, p.backend): p for p in compat_profile(baseline)}
    later = {(p.machine, p.backend): p for p in compat_profile(after)}
    has = dict(dump.properties)
    changes = []
    version = ".".join(map(str, dump.qemu_version))
    for key, profile in before.items():
        if key not in host.offers:
            continue
        lacking = [p for p in profile.overrides if p not in has]
        if lacking:
            missing.append((*key, f"its QEMU {version} has no property {', '.join(lacking)}, which the compat "
                                  "profile sets: VMs started with the profile cannot start there"))
        if key in later and later[key].overrides != profile.overrides:
            changes.append((*key, profile.overrides, later[key].overrides))
    outcome = "cannot-join" if missing else "narrows" if narrowings else "joins"
    return HostCheck(dump.host, outcome, tuple(narrowings), tuple(missing), tuple(extra), after, tuple(changes))


# ------------------------------------------------------------------------------------------------ compat profile

LIBVIRT_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass(frozen=True, slots=True)
class Profile:
    machine: str
    backend: str
    overrides: dict[str, str]  # property -> "off" (or "on"), in feature-bit order
    absent_on: dict[str, tuple[str, ...]]  # property -> hosts whose QEMU has no such property (leave it out there)
    types: dict[str, str]  # property -> QOM type where the hosts agree ("bool", "OnOffAuto"); "mixed" otherwise
    unfixable: int = 0  # bits some host offers and another not, that no property turns off

    def device_properties(self) -> str:
        """``host_uso=off,guest_uso4=off`` for a ``-device virtio-net-pci,...`` line."""
        return ",".join(f"{k}={v}" for k, v in self.overrides.items())

    def libvirt_override(self, alias: str = "net0") -> str:
        """A ``<qemu:override>`` fragment for one NIC (libvirt 8.2+, docs/drvqemu.rst): inside ``<domain>``
        with ``xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'``; one ``<qemu:device>`` per NIC alias."""
        props = []
        for name, value in self.overrides.items():
            if self.types.get(name) == "bool":
                props.append(f"        <qemu:property name='{name}' type='bool' value='"
                             f"{'true' if value == 'on' else 'false'}'/>")
            else:  # OnOffAuto (or hosts that disagree): the string form, which QEMU parses for both
                props.append(f"        <qemu:property name='{name}' type='string' value='{value}'/>")
        return "\n".join(["<qemu:override>", f"  <qemu:device alias='{alias}'>", "    <qemu:frontend>", *props,
                          "    </qemu:frontend>", "  </qemu:device>", "</qemu:override>"])


def _override(bit: int, entry: BaselineEntry) -> str | None:
    """What a VM started on this machine type with default properties must set for ``bit`` to be offered alike
    everywhere: "off" where some host can offer it and another cannot, and some host would by default (when every
    host defaults it off, nothing: unless the dumps say nothing of defaults); where the hosts' QEMU builds disagree
    on the default, pinned ("on" if every host can offer it)."""
    mask = 1 << bit
    on, off = entry.defaults_on & mask, entry.defaults_off & mask
    if on and off:
        return "on" if entry.offered & mask else "off"
    if entry.union & ~entry.offered & mask and (on or not (entry.defaults_on | entry.defaults_off)):
        return "off"
    return None


def compat_profile(baseline: Baseline) -> list[Profile]:
    """Per entry, the property overrides that make a VM (started with default properties plus these) offer only
    what every host of the entry can, whatever host it starts on."""
    profiles = []
    tables: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}  # hosts share a few property tables
    props_of = [tables.setdefault(h.properties, dict(h.properties)) for h in baseline.hosts]
    for entry in baseline.entries:
        overrides: dict[str, str] = {}
        absent: dict[str, tuple[str, ...]] = {}
        types: dict[str, str] = {}
        unfixable = 0
        for bit in bits_of(entry.union & ~entry.offered | entry.defaults_on & entry.defaults_off):
            feature = BY_BIT.get(bit)
            if feature is None or feature.prop is None:
                unfixable |= 1 << bit
                continue
            value = _override(bit, entry)
            if value is None:
                continue
            prop = feature.prop
            overrides[prop] = value
            kinds = {props_of[i].get(prop) for i in entry.hosts}
            lacking = tuple(baseline.hosts[i].host for i in entry.hosts if prop not in props_of[i])
            if lacking:
                absent[prop] = lacking
            known = {k for k in kinds if k is not None}
            types[prop] = known.pop() if len(known) == 1 else "mixed"
        profiles.append(Profile(entry.machine, entry.backend, overrides, absent, types, unfixable))
    return profiles
