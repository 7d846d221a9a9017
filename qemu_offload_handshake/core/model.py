"""The report model: frozen, typed value objects, validated when they are made.

* ``NicReport``: one virtio-net device as seen on one side.
* ``VmReport``: one side of a migration (a QEMU and its NICs).
* ``HostCapabilities``: what one host's QEMU offers per backend kind when every feature is requested (for the
  cluster baseline).

Bitmaps are Python ints of any width (QEMU 10.2 uses bits up to 68; the model allows up to ``MAX_BITMAP_BITS``).
Nothing here does I/O.
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "DERIVABLE",
    "MAX_BITMAP_BITS",
    "MAX_HOSTS",
    "MAX_ITEMS",
    "MAX_STRING_BYTES",
    "SIDES",
    "CapabilitySet",
    "HostCapabilities",
    "NicReport",
    "Tri",
    "VmReport",
    "parse_tri",
]

# Twice QEMU's VIRTIO_FEATURES_MAX (128 today, bits up to 68 used by QEMU 10.2), and bounded: a bitmap decoded
# from a few bytes of hostile input (a one-byte XOR against a reference) is a Python int of at most 64 bytes.
MAX_BITMAP_BITS = 256
# A backend kind is a QEMU netdev type ("tap", "vhost-user", "vmnet-bridged"): short, so that checking that a
# host's offers are sorted by kind costs little per offer however the kinds are chosen.
MAX_KIND_BYTES = 64
MAX_STRING_BYTES = 1024
MAX_ITEMS = 256  # NICs per VM, properties per NIC, backends per host, notes per record
MAX_HOSTS = 20_000  # hosts in one capability set
# The NIC facts that can be derived instead of read (NicReport.derived), in wire-format order (one bit each).
DERIVABLE = ("backend", "driver_status", "negotiated", "offered", "vnet_hdr")


class Tri(enum.IntEnum):
    """A declared offload property: unset (QEMU's default applies), off, on, or auto."""

    UNSET = 0
    OFF = 1
    ON = 2
    AUTO = 3

    def __str__(self) -> str:
        return self.name.lower()


def parse_tri(value: object) -> Tri:
    """QEMU's answer for a property: booleans today, ``"on"/"off"/"auto"`` strings for OnOffAuto properties."""
    if isinstance(value, bool):
        return Tri.ON if value else Tri.OFF
    if isinstance(value, str) and value.lower() in ("on", "off", "auto"):
        return Tri[value.upper()]
    raise ValueError(f"not an on/off/auto property value: {value!r}")


def _check_str(name: str, value: str | None, *, optional: bool = False) -> None:
    if value is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")
    if value.isascii() and len(value) <= MAX_STRING_BYTES:
        return
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} is not valid Unicode text: {err}") from None
    if size > MAX_STRING_BYTES:
        raise ValueError(f"{name} is longer than {MAX_STRING_BYTES} bytes")


def _check_bitmap(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int bitmap, not {type(value).__name__}")
    if value < 0 or value.bit_length() > MAX_BITMAP_BITS:
        raise ValueError(f"{name} must be a bitmap of at most {MAX_BITMAP_BITS} bits: {value:#x}")


def _check_items(name: str, items: tuple[object, ...], limit: int = MAX_ITEMS) -> None:
    if not isinstance(items, tuple):
        raise TypeError(f"{name} must be a tuple")
    if len(items) > limit:
        raise ValueError(f"{name} has more than {limit} entries")


@dataclass(frozen=True, slots=True)
class NicReport:
    qdev_id: str  # "" for a device created without an id: qom_path identifies it then
    qom_path: str
    netdev_id: str | None = None
    backend: str | None = None  # "tap", "user", "vhost-user", ... when known
    properties: tuple[tuple[str, Tri], ...] = ()  # declared offload properties, sorted by name
    offered: int | None = None  # host-features: what the device offers the guest
    negotiated: int | None = None  # guest-features: what the driver accepted (valid once FEATURES_OK)
    driver_status: int | None = None  # virtio status byte
    backend_features: int | None = None  # backend-features (vhost) when QEMU reports them
    vnet_hdr: bool | None = None  # whether the backend has a virtio-net header (None: not known)
    unreadable: tuple[str, ...] = ()  # facts that could not be read, as short sentences
    # Bits whose offered state could not be derived (only with a derived ``offered``): each may or may not be
    # offered. ``offered`` then holds the bits known to be offered.
    offered_unknown: int = 0
    # Facts derived from safe reads instead of read from QEMU (names from ``DERIVABLE``), e.g. on a QEMU where
    # x-query-virtio-status is known to crash.
    derived: tuple[str, ...] = ()
    # Where QEMU files the device's migrated state (qdev_get_dev_path, e.g. "0000:00:04.0", behind a PCIe root
    # port "0000:00:10.0:00.0"): QEMU pairs source and destination devices by it, not by their ids.
    dev_path: str | None = None
    # Device state beyond the feature bits (devstate.STATE_RULES: MSI-X vectors, queues, ROM, ring sizes, MTU,
    # MAC, ...) as (name, value text), sorted by name; empty when it could not be read.
    state: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_str("qdev_id", self.qdev_id)
        _check_str("dev_path", self.dev_path, optional=True)
        _check_items("state", self.state)
        if [k for k, _ in self.state] != sorted({k for k, _ in self.state}):
            raise ValueError("state must be sorted by name without duplicates")
        for name, value in self.state:
            _check_str("state name", name)
            _check_str(f"state {name}", value)
        _check_str("qom_path", self.qom_path)
        if not self.qdev_id and not self.qom_path:
            raise ValueError("a NIC needs a qdev id or a QOM path")
        _check_str("netdev_id", self.netdev_id, optional=True)
        _check_str("backend", self.backend, optional=True)
        for name in ("offered", "negotiated", "backend_features"):
            _check_bitmap(name, getattr(self, name))
        if self.driver_status is not None and (
            isinstance(self.driver_status, bool) or not isinstance(self.driver_status, int)
            or not 0 <= self.driver_status <= 0xFF
        ):
            raise ValueError(f"driver_status must be a byte: {self.driver_status!r}")
        if self.vnet_hdr is not None and not isinstance(self.vnet_hdr, bool):
            raise TypeError("vnet_hdr must be a bool or None")
        _check_items("properties", self.properties)
        names = [p[0] for p in self.properties]
        if names != sorted(set(names)):
            raise ValueError("properties must be sorted by name without duplicates (use NicReport.make)")
        for prop, tri in self.properties:
            _check_str("property name", prop)
            if not isinstance(tri, Tri):
                raise TypeError(f"property {prop}: {tri!r} is not a Tri")
            if tri is Tri.UNSET:
                raise ValueError(f"property {prop}: an unset property is left out, not stored as UNSET")
        _check_items("unreadable", self.unreadable)
        for note in self.unreadable:
            _check_str("unreadable note", note)
        _check_bitmap("offered_unknown", self.offered_unknown)
        if self.offered_unknown and (self.offered is None or self.offered & self.offered_unknown):
            raise ValueError("offered_unknown needs an offered bitmap and must not overlap it")
        if not isinstance(self.derived, tuple) or list(self.derived) != sorted(set(self.derived)) \
                or not set(self.derived) <= set(DERIVABLE):
            raise ValueError(f"derived must be a sorted tuple of distinct names from {DERIVABLE}: {self.derived!r}")
        if self.offered_unknown and "offered" not in self.derived:
            raise ValueError("offered_unknown is only for a derived offered bitmap")

    @property
    def offered_upper(self) -> int | None:
        """Every bit that may be offered: the known ones and the undetermined ones."""
        return None if self.offered is None else self.offered | self.offered_unknown

    @classmethod
    def make(cls, qdev_id: str, qom_path: str, *, properties: Mapping[str, Tri] | None = None,
             unreadable: Iterable[str] = (), **fields: object) -> NicReport:
        props = tuple(sorted((k, v) for k, v in (properties or {}).items() if v is not Tri.UNSET))
        return cls(qdev_id, qom_path, properties=props, unreadable=tuple(unreadable), **fields)  # type: ignore[arg-type]

    @property
    def key(self) -> str:
        """How devices are matched across sides: the qdev id, else the QOM path."""
        return self.qdev_id or self.qom_path

    def prop(self, name: str) -> Tri:
        for prop, tri in self.properties:
            if prop == name:
                return tri
        return Tri.UNSET


@dataclass(frozen=True, slots=True)
class _Side:
    """What identifies one side: the host and its QEMU."""

    host: str
    qemu_version: tuple[int, int, int] | None
    package: str | None
    machine: str | None

    def _check_side(self) -> None:
        _check_str("host", self.host)
        _check_version(self.qemu_version)
        _check_str("package", self.package, optional=True)
        _check_str("machine", self.machine, optional=True)


SIDES = ("source", "dest")


@dataclass(frozen=True, slots=True)
class VmReport(_Side):
    nics: tuple[NicReport, ...] = ()
    unreadable: tuple[str, ...] = ()
    devices_known: bool = True  # False: the device list itself could not be read (``nics`` is then empty)
    vm_name: str | None = None  # QEMU's -name (query-name), when set
    vm_uuid: str | None = None  # QEMU's -uuid (query-uuid), when set
    made_at: int | None = None  # when the report was made: Unix time in seconds
    side: str | None = None  # "source" or "dest" when the maker knew which side it probed

    def __post_init__(self) -> None:
        self._check_side()
        _check_str("vm_name", self.vm_name, optional=True)
        _check_str("vm_uuid", self.vm_uuid, optional=True)
        if self.made_at is not None and (isinstance(self.made_at, bool) or not isinstance(self.made_at, int)
                                         or not 0 <= self.made_at < 1 << 40):
            raise ValueError(f"made_at must be Unix seconds: {self.made_at!r}")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES} or None: {self.side!r}")
        if not isinstance(self.devices_known, bool) or (not self.devices_known and self.nics):
            raise ValueError("devices_known must be a bool, and False only with no NICs")
        _check_items("nics", self.nics)
        for nic in self.nics:
            if not isinstance(nic, NicReport):
                raise TypeError("nics must be NicReport objects")
        keys = [n.key for n in self.nics]
        if len(keys) != len(set(keys)):
            raise ValueError(f"two NICs share an id or QOM path: {sorted(keys)}")
        _check_items("unreadable", self.unreadable)
        for note in self.unreadable:
            _check_str("unreadable note", note)

    def nic(self, key: str) -> NicReport | None:
        for nic in self.nics:
            if nic.key == key or nic.qom_path == key:
                return nic
        return None


def _check_version(version: tuple[int, int, int] | None) -> None:
    if version is None:
        return
    if not (type(version) is tuple and len(version) == 3 and type(version[0]) is int and type(version[1]) is int
            and type(version[2]) is int and min(version) >= 0 and max(version) < 1 << 16):
        raise ValueError(f"qemu_version must be (major, minor, micro) of small ints: {version!r}")


def _utf8_size(value: str) -> int:
    """The UTF-8 size of a text, -1 if it is not valid Unicode (a lone surrogate)."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


# The sizes of the non-ASCII texts that a capability set's hosts repeat, remembered (finding one encodes it):
# a set has at most 256 kinds with a reference, so all of its kinds stay (twice as many kept, each at most 64
# characters); packages and machine types come from a table of up to 4096 and stay while few alternate.
_kind_size = functools.lru_cache(maxsize=2 * MAX_ITEMS)(_utf8_size)
_text_size = functools.lru_cache(maxsize=64)(_utf8_size)


@dataclass(frozen=True, slots=True, init=False)
class HostCapabilities(_Side):
    offers: tuple[tuple[str, int], ...] = ()  # (backend kind, offered bitmap), sorted by kind

    def __init__(self, host: str, qemu_version: tuple[int, int, int] | None, package: str | None,
                 machine: str | None, offers: tuple[tuple[str, int], ...] = ()) -> None:
        # A capability set decodes thousands of these: the fields are set through their slots (as the frozen
        # dataclass __init__ does, without its lookups), and the common case (ASCII texts, a version of small
        # ints) is checked inline; anything else goes to the checks that name the problem. A set's hosts share
        # a few kinds, packages and machine types: a non-ASCII one is measured once (``_kind_size``, ``_text_size``).
        _set_host(self, host)
        _set_version(self, qemu_version)
        _set_package(self, package)
        _set_machine(self, machine)
        _set_offers(self, offers)
        if not (type(host) is str and host.isascii() and len(host) <= MAX_STRING_BYTES):
            _check_str("host", host)
        version = qemu_version
        if version is not None and not (type(version) is tuple and len(version) == 3
                                        and int is type(version[0]) is type(version[1]) is type(version[2])
                                        and not (version[0] | version[1] | version[2]) >> 16):
            _check_version(version)
        if package is not None and not (type(package) is str and 0 <= (
                len(package) if package.isascii() else _text_size(package)) <= MAX_STRING_BYTES):
            _check_str("package", package)
        if machine is not None and not (type(machine) is str and 0 <= (
                len(machine) if machine.isascii() else _text_size(machine)) <= MAX_STRING_BYTES):
            _check_str("machine", machine)
        if type(offers) is not tuple or len(offers) > MAX_ITEMS:
            _check_items("offers", offers)
        last = None
        for kind, bitmap in offers:
            if not (type(kind) is str and len(kind) <= MAX_KIND_BYTES
                    and (kind.isascii() or 0 <= _kind_size(kind) <= MAX_KIND_BYTES)):
                _check_str("backend kind", kind)
                raise ValueError(f"backend kind longer than {MAX_KIND_BYTES} bytes: {kind[:MAX_KIND_BYTES]!r}")
            if last is not None and kind <= last:
                raise ValueError("offers must be sorted by backend kind without duplicates: "
                                 f"{kind!r} " + ("given twice" if kind == last else f"after {last!r}"))
            last = kind
            if type(bitmap) is not int or bitmap < 0 or bitmap.bit_length() > MAX_BITMAP_BITS:
                _check_bitmap(f"offers[{kind}]", bitmap)  # names the problem (the name is built only then)

    def offer(self, backend: str) -> int | None:
        return dict(self.offers).get(backend)


_name_of = operator.attrgetter("host")
_set_host, _set_version, _set_package, _set_machine, _set_offers = (
    getattr(HostCapabilities, name).__set__ for name in ("host", "qemu_version", "package", "machine", "offers"))


@dataclass(frozen=True, slots=True)
class CapabilitySet:
    """The capability records of many hosts (a cluster's dumps), travelling as one compact record.

    Each host appears once, by a non-empty name: a cluster's dumps name each host once, so two records of one
    host (or a record of no host) mean the set was put together wrong."""

    hosts: tuple[HostCapabilities, ...] = ()

    def __post_init__(self) -> None:
        hosts = self.hosts
        if not isinstance(hosts, tuple):
            raise TypeError("hosts must be a tuple")
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"a capability set holds at most {MAX_HOSTS} hosts")
        if not set(map(type, hosts)) <= {HostCapabilities} and not all(
                isinstance(host, HostCapabilities) for host in hosts):
            raise TypeError("hosts must be HostCapabilities objects")
        names = set(map(_name_of, hosts))
        if len(names) != len(hosts) or "" in names:
            seen: set[str] = set()
            for i, host in enumerate(hosts):
                if not host.host:
                    raise ValueError(f"hosts[{i}] has no host name (each host in a set is named)")
                if host.host in seen:
                    raise ValueError(f"hosts[{i}]: host {host.host!r} given twice (each host in a set appears once)")
                seen.add(host.host)
