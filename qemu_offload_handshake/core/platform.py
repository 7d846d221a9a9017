"""The platform model: what one host can offer (``HostDump``) and what a whole cluster can (``Baseline``).

A host dump records, for one QEMU build on one host, each machine type and backend kind with the feature bitmap
a virtio-net device offers there when **every offload property is turned on** (the ceiling: what this host's
QEMU and kernel can do), the effective default of each property on each machine type, the properties that QEMU
has with their QOM types, and what could not be probed. A baseline is the AND of many hosts' dumps per
(machine type, backend kind), with provenance: which host removed which bits, and which hosts cannot run a
machine type or backend at all.

Frozen value objects, validated when they are made; nothing here does I/O. The merge and the host check are
``baseline.py``; taking a dump is the shell's ``dump.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import MAX_ITEMS, MAX_STRING_BYTES, Tri, _check_bitmap, _check_items, _check_str, _check_version

__all__ = [
    "MAX_DUMP_OFFERS",
    "Baseline",
    "BaselineEntry",
    "BaselineHost",
    "HostDump",
    "MachineOffers",
    "Offer",
    "Unprobed",
]

MAX_DUMP_OFFERS = MAX_ITEMS  # machine types per dump, backend kinds per machine type
MAX_BASELINE_HOSTS = 20_000
_PROPERTY_TYPES = ("bool", "OnOffAuto")


def _check_time(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 40:
        raise ValueError(f"{name} must be Unix seconds: {value!r}")


def _check_host(what: str, host: str, kernel: str, version: tuple[int, int, int] | None, package: str | None,
                made_at: int) -> None:
    """What identifies a host in a dump or a baseline: a name, its kernel, its QEMU build, when it was dumped."""
    _check_str("host", host)
    if not host:
        raise ValueError(f"{what} needs a host name")
    _check_str("kernel", kernel)
    if version is None:
        raise ValueError(f"{what} needs the QEMU version")
    _check_version(version)
    _check_str("package", package, optional=True)
    _check_time("made_at", made_at)


def _check_sorted(name: str, keys: list[object]) -> None:
    if keys != sorted(set(keys)):  # type: ignore[type-var]
        raise ValueError(f"{name} must be sorted without duplicates: {keys!r:.200}")


# Tables already checked, by identity and kind: a cluster's dumps share a few (a decoder makes each of them once
# and hands out the same tuple), so checking one again costs a lookup. Only tuples of tuples are kept (a tuple of
# pairs of texts and Tris cannot change), and being kept here keeps one alive, so its id stays its own.
_CHECKED: dict[tuple[str, int], tuple[object, ...]] = {}


def _seen(kind: str, items: tuple[object, ...]) -> bool:
    return _CHECKED.get((kind, id(items))) is items


def _remember(kind: str, items: tuple[object, ...]) -> None:
    if type(items) is tuple and set(map(type, items)) <= {tuple}:
        if len(_CHECKED) >= 256:
            _CHECKED.clear()
        _CHECKED[kind, id(items)] = items


def _short_texts(texts: list[str]) -> bool:
    """Whether every one is ASCII text of at most MAX_STRING_BYTES (what ``_check_str`` passes), checked in bulk:
    a dump's tables hold about 40 properties per machine type, and a decoder makes thousands of dumps."""
    try:
        joined = "".join(texts)
    except TypeError:
        return False
    return joined.isascii() and (not texts or max(map(len, texts)) <= MAX_STRING_BYTES)


def _check_properties(items: tuple[tuple[str, str], ...]) -> None:
    if _seen("properties", items):
        return
    _check_items("properties", items)
    names: list[Any] = [k for k, _ in items]
    _check_sorted("properties", names)
    if not (_short_texts(names) and _short_texts([kind for _, kind in items])):  # else named below
        for name, kind in items:
            _check_str("property name", name)
            _check_str(f"property {name} type", kind)
    _remember("properties", items)


def _check_tris(name: str, items: tuple[tuple[str, Tri], ...]) -> None:
    if _seen("tris", items):
        return
    _check_items(name, items)
    names: list[Any] = [k for k, _ in items]
    _check_sorted(name, names)
    tris = [tri for _, tri in items]
    if not (_short_texts(names) and set(map(type, tris)) <= {Tri} and Tri.UNSET not in tris):  # else named below
        for prop, tri in items:
            _check_str(f"{name} name", prop)
            if not isinstance(tri, Tri) or tri is Tri.UNSET:
                raise ValueError(f"{name} {prop}: {tri!r} is not off/on/auto")
    _remember("tris", items)


@dataclass(frozen=True, slots=True)
class Offer:
    """One backend kind on one machine type: the bitmap offered with every offload property on."""

    backend: str  # "tap", "tap-vhost", "user", ...
    offered: int
    unknown: int = 0  # bits that could not be determined (each may or may not be offered); never in offered

    def __post_init__(self) -> None:
        _check_str("backend", self.backend)
        if not self.backend or len(self.backend) > 64:
            raise ValueError(f"backend kind must be 1-64 characters: {self.backend!r}")
        _check_bitmap("offered", self.offered)
        _check_bitmap("unknown", self.unknown)
        if self.offered is None or self.offered & self.unknown:
            raise ValueError("an offer needs an offered bitmap, and unknown bits must not overlap it")


@dataclass(frozen=True, slots=True)
class MachineOffers:
    """One machine type of a dump: its property defaults and its offers per backend kind."""

    machine: str  # the resolved name ("pc-q35-10.0"), never an alias ("q35")
    defaults: tuple[tuple[str, Tri], ...] = ()  # effective default of each catalogue property, sorted by name
    offers: tuple[Offer, ...] = ()  # sorted by backend kind

    def __post_init__(self) -> None:
        _check_str("machine", self.machine)
        if not self.machine:
            raise ValueError("machine type must not be empty")
        _check_tris("defaults", self.defaults)
        _check_items("offers", self.offers)
        for offer in self.offers:
            if not isinstance(offer, Offer):
                raise TypeError("offers must be Offer objects")
        _check_sorted(f"offers of {self.machine}", [o.backend for o in self.offers])

    def offer(self, backend: str) -> Offer | None:
        for offer in self.offers:
            if offer.backend == backend:
                return offer
        return None


@dataclass(frozen=True, slots=True)
class Unprobed:
    """Something a dump could not probe, and why (``machine`` or ``backend`` None: all of them)."""

    machine: str | None
    backend: str | None
    reason: str

    def __post_init__(self) -> None:
        _check_str("unprobed machine", self.machine, optional=True)
        _check_str("unprobed backend", self.backend, optional=True)
        _check_str("unprobed reason", self.reason)

    def covers(self, machine: str, backend: str) -> bool:
        return self.machine in (None, machine) and self.backend in (None, backend)



@dataclass(frozen=True, slots=True)
class HostDump:
    """What one host's QEMU build and kernel can offer, per machine type and backend kind."""

    host: str
    kernel: str  # uname release
    qemu_version: tuple[int, int, int]
    package: str | None
    made_at: int
    properties: tuple[tuple[str, str], ...] = ()  # (name, QOM type) of the catalogue properties this QEMU has
    machines: tuple[MachineOffers, ...] = ()  # sorted by machine type
    unprobed: tuple[Unprobed, ...] = ()
    binary: str | None = None  # the QEMU binary that was probed
    default_machine: str | None = None  # that QEMU's default machine type (resolved)

    def __post_init__(self) -> None:
        _check_host("a dump", self.host, self.kernel, self.qemu_version, self.package, self.made_at)
        _check_str("binary", self.binary, optional=True)
        _check_str("default_machine", self.default_machine, optional=True)
        _check_properties(self.properties)
        _check_items("machines", self.machines)
        for machine in self.machines:
            if not isinstance(machine, MachineOffers):
                raise TypeError("machines must be MachineOffers objects")
        _check_sorted("machines", [m.machine for m in self.machines])
        _check_items("unprobed", self.unprobed)
        for item in self.unprobed:
            if not isinstance(item, Unprobed):
                raise TypeError("unprobed must be Unprobed objects")

    def machine(self, name: str) -> MachineOffers | None:
        for machine in self.machines:
            if machine.machine == name:
                return machine
        return None

    def offer(self, machine: str, backend: str) -> Offer | None:
        found = self.machine(machine)
        return None if found is None else found.offer(backend)

    def why_not(self, machine: str, backend: str) -> str | None:
        """Why this dump has no offer for (machine, backend), if it says; None if it has one or says nothing."""
        if self.offer(machine, backend) is not None:
            return None
        for item in self.unprobed:
            if item.covers(machine, backend):
                return item.reason
        return None


@dataclass(frozen=True, slots=True)
class BaselineHost:
    """One host that went into a baseline (from its dump)."""

    host: str
    kernel: str
    qemu_version: tuple[int, int, int]
    package: str | None
    made_at: int  # when its dump was made
    properties: tuple[tuple[str, str], ...] = ()  # its QEMU's catalogue properties and their types

    def __post_init__(self) -> None:
        _check_host("a baseline host", self.host, self.kernel, self.qemu_version, self.package, self.made_at)
        _check_properties(self.properties)


@dataclass(frozen=True, slots=True)
class BaselineEntry:
    """One (machine type, backend kind) of a baseline. Hosts are indices into ``Baseline.hosts``."""

    machine: str
    backend: str
    offered: int  # AND of the offers of ``hosts`` (undetermined bits count as not offered)
    union: int  # OR of their offers: a bit in union but not in offered was removed by some host
    hosts: tuple[int, ...]  # the hosts that can run it, sorted
    removed: tuple[tuple[int, int], ...] = ()  # (host, bits of union it does not offer), only hosts that remove any
    undetermined: tuple[tuple[int, int], ...] = ()  # (host, bits it could not determine), a subset of its removed
    missing: tuple[tuple[int, str], ...] = ()  # (host, why it cannot run this machine type / backend kind)
    # The machine type's property defaults across ``hosts``, as bitmaps indexed by the feature bit of each catalogue
    # property: a bit in defaults_on is a property that defaults to on on some host, in defaults_off one that
    # defaults to off on some host (both: the hosts' QEMU builds disagree on that machine type's default).
    defaults_on: int = 0
    defaults_off: int = 0

    def __post_init__(self) -> None:
        _check_str("machine", self.machine)
        _check_str("backend", self.backend)
        _check_bitmap("offered", self.offered)
        _check_bitmap("union", self.union)
        _check_bitmap("defaults_on", self.defaults_on)
        _check_bitmap("defaults_off", self.defaults_off)
        if self.offered & ~self.union:
            raise ValueError(f"{self.machine}/{self.backend}: the AND has bits the OR has not")
        for name in ("hosts", "removed", "undetermined", "missing"):
            _check_items(name, getattr(self, name), MAX_BASELINE_HOSTS)
        _check_sorted("hosts", list(self.hosts))
        _check_sorted("removed hosts", [h for h, _ in self.removed])
        _check_sorted("undetermined hosts", [h for h, _ in self.undetermined])
        _check_sorted("missing hosts", [h for h, _ in self.missing])
        if set(self.hosts) & {h for h, _ in self.missing}:
            raise ValueError(f"{self.machine}/{self.backend}: a host is both in and missing")
        for _, bits in self.removed:
            _check_bitmap("removed", bits)
            if not bits or bits & ~self.union or bits & self.offered:
                raise ValueError(f"{self.machine}/{self.backend}: removed bits must be in union, not in offered")
        if not {h for h, _ in self.removed} <= set(self.hosts):
            raise ValueError(f"{self.machine}/{self.backend}: a host removed bits without being in the entry")
        removed = dict(self.removed)
        for host, bits in self.undetermined:
            _check_bitmap("undetermined", bits)
            if not bits or bits & ~removed.get(host, 0):
                raise ValueError(f"{self.machine}/{self.backend}: undetermined bits must be removed bits of that host")
        for _, reason in self.missing:
            _check_str("missing reason", reason)


@dataclass(frozen=True, slots=True)
class Baseline:
    """The cluster baseline: per (machine type, backend kind), what every host that can run it offers."""

    made_at: int
    hosts: tuple[BaselineHost, ...]
    entries: tuple[BaselineEntry, ...]  # sorted by (machine, backend)

    def __post_init__(self) -> None:
        _check_time("made_at", self.made_at)
        _check_items("hosts", self.hosts, MAX_BASELINE_HOSTS)
        if not self.hosts:
            raise ValueError("a baseline needs at least one host")
        names = [h.host for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError("a host appears twice in the baseline")
        _check_items("entries", self.entries, MAX_BASELINE_HOSTS)
        _check_sorted("entries", [(e.machine, e.backend) for e in self.entries])
        count = len(self.hosts)
        for entry in self.entries:
            for index in (*entry.hosts, *(h for h, _ in entry.missing)):
                if not 0 <= index < count:
                    raise ValueError(f"{entry.machine}/{entry.backend}: host index {index} out of range")

    def entry(self, machine: str, backend: str) -> BaselineEntry | None:
        for entry in self.entries:
            if entry.machine == machine and entry.backend == backend:
                return entry
        return None
