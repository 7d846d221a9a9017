"""The bodies of the three record types (VM report, host capabilities, capability set) as construct layouts,
and the objects the encoder builds for them. Layout: ``docs/wire-format.md``; the frame around a body (header,
CRC, HMAC) and the public ``encode``/``decode`` are ``wire.py``.

The layouts are construct ``Struct``s, compiled with ``Construct.compile()``, whose leaves are the checked leaves
of ``wire_layout`` (never construct's own, which trust their input) and a few of this module's own, read by hand
where an item repeats thousands of times (a set's hosts, a NIC's other properties). Parsing is one pass over the
body: each NIC, host and offer is checked and turned into model objects as it is read (a backend kind, NIC or
host given twice is refused when it is read), and a failure names its field (``nics[1].offered_unknown``).
"""

from __future__ import annotations

from typing import Any

import construct as cs

from . import wire_layout as wl
from .features import BY_BIT, BY_PROPERTY
from .model import (
    DERIVABLE,
    MAX_BITMAP_BITS,
    MAX_HOSTS,
    MAX_ITEMS,
    MAX_KIND_BYTES,
    MAX_STRING_BYTES,
    SIDES,
    CapabilitySet,
    HostCapabilities,
    NicReport,
    Tri,
    VmReport,
)

__all__ = ["COMPILED", "MAX_RECORD_BYTES", "TYPE_HOST", "TYPE_SET", "TYPE_VM", "body_obj"]

MAX_RECORD_BYTES = 1 << 20
TYPE_VM, TYPE_HOST, TYPE_SET = 1, 2, 3
MAX_BITMAP_BYTES = MAX_BITMAP_BITS // 8
MAX_TABLE = 4096


# ------------------------------------------------------------------------------------------------ layouts

_Count = wl.VarInt(MAX_ITEMS)
_Length = wl.VarInt(MAX_RECORD_BYTES)
_Str = wl.Text(MAX_STRING_BYTES)
_Bits = wl.Bitmap(MAX_BITMAP_BYTES)


class _Pairs(wl.Leaf):
    """Count, then per pair two texts (name, value); names sorted and distinct (NicReport.state)."""

    def read(self, stream: Any) -> tuple[tuple[str, str], ...]:
        pairs = tuple((_Str.read(stream), _Str.read(stream)) for _ in range(_Count.read(stream)))
        if [k for k, _ in pairs] != sorted({k for k, _ in pairs}):
            raise cs.ValidationError("names are not sorted and distinct")
        return pairs

    def write(self, obj: tuple[tuple[str, str], ...], stream: Any) -> tuple[tuple[str, str], ...]:
        _Count.write(len(obj), stream)
        for name, value in obj:
            _Str.write(name, stream)
            _Str.write(value, stream)
        return obj
_U8 = wl.Uint(1)
_MADE_AT_LIMIT = (1 << 40) - 1
NIC_EXT_OFFERED_UNKNOWN, NIC_EXT_DERIVED, NIC_EXT_DEV_PATH, NIC_EXT_STATE = 1, 2, 3, 4  # extension tags (1.1)
VM_EXT_NAME, VM_EXT_UUID, VM_EXT_MADE_AT, VM_EXT_SIDE = 1, 2, 3, 4
_NicExt = wl.Extensions(_Count, _Length, {NIC_EXT_OFFERED_UNKNOWN: ("offered_unknown", _Bits, 0),
                                          NIC_EXT_DERIVED: ("derived", wl.BitSet(DERIVABLE), ()),
                                          NIC_EXT_DEV_PATH: ("dev_path", _Str, None),
                                          NIC_EXT_STATE: ("state", _Pairs(), ())})
_VmExt = wl.Extensions(_Count, _Length, {
    VM_EXT_NAME: ("vm_name", _Str, None), VM_EXT_UUID: ("vm_uuid", _Str, None),
    VM_EXT_MADE_AT: ("made_at", wl.VarInt(_MADE_AT_LIMIT), None), VM_EXT_SIDE: ("side", wl.Choice(SIDES), None)})
_NoExt = wl.Extensions(_Count, _Length, {})

# Presence bits of optional fields (an absent field is None in the model).
NIC_NETDEV, NIC_BACKEND, NIC_OFFERED, NIC_NEGOTIATED, NIC_STATUS, NIC_BACKEND_FEATURES, NIC_VNET_HDR = (
    1, 2, 4, 8, 16, 32, 64)
VM_VERSION, VM_PACKAGE, VM_MACHINE, VM_DEVICES_UNKNOWN = 1, 2, 4, 8

_TRIS = (None, Tri.OFF, Tri.ON, Tri.AUTO)
_PROP_AT = {f.bit: f.prop for f in BY_BIT.values() if f.prop is not None}


class _OtherProp(wl.Leaf):
    """A property the catalogue does not know: text name, 1 byte tri-state; read in one call (a NIC has up to
    256), checked as it is read."""

    def read(self, stream: Any) -> tuple[str, Tri]:
        field = "name"
        try:
            name = _Str.read(stream)
            if name in BY_PROPERTY:
                raise wl.FieldError(f"malformed body: catalogue property {name!r} belongs in tri lo/hi")
            field = "tri"
            value = wl.read_exact(stream, 1)[0]
            tri = _TRIS[value] if value < 4 else None
            if tri is None:
                raise wl.FieldError(f"malformed body: invalid tri-state {value}")
        except Exception as err:
            raise wl.failure(err, field, stream) from None
        return name, tri

    def write(self, obj: dict[str, Any], stream: Any) -> dict[str, Any]:
        _Str.write(obj["name"], stream)
        _U8.write(obj["tri"], stream)
        return obj


def _nic(this: dict[str, Any], parent: Any) -> tuple[str, NicReport]:
    props: dict[str, Tri] = this["other_props"]
    lo, hi = this["tri_lo"], this["tri_hi"]
    both = lo | hi
    while both:
        low = both & -both
        both ^= low
        name = _PROP_AT.get(low.bit_length() - 1)
        if name is None:
            raise wl.FieldError(f"malformed body: tri-state for bit {low.bit_length() - 1}, which has no property",
                                "tri_lo" if lo & low else "tri_hi")
        props[name] = _TRIS[(1 if lo & low else 0) | (2 if hi & low else 0)]  # type: ignore[assignment]
    vnet = this["vnet_hdr"]
    if vnet is not None and vnet > 1:
        raise wl.FieldError(f"malformed body: vnet_hdr must be 0 or 1, not {vnet}", "vnet_hdr")
    ext = this["ext"]
    unknown, derived = ext.get("offered_unknown", 0), ext.get("derived", ())
    if unknown and (this["offered"] is None or this["offered"] & unknown or "offered" not in derived):
        raise wl.FieldError("invalid record: offered_unknown needs a derived offered bitmap and must not overlap it",
                            "ext", "offered_unknown")
    nic = NicReport(
        this["qdev_id"], this["qom_path"], this["netdev_id"], this["backend"], tuple(sorted(props.items())),
        this["offered"], this["negotiated"], this["driver_status"], this["backend_features"],
        None if vnet is None else bool(vnet), tuple(this["unreadable"]), unknown, derived, ext.get("dev_path"),
        ext.get("state", ()))
    return nic.key, nic


_Nic = wl.Struct(
    "present" / wl.VarInt(0x7F),
    "qdev_id" / _Str,
    "qom_path" / _Str,
    "netdev_id" / cs.If(cs.this.present & NIC_NETDEV, _Str),
    "backend" / cs.If(cs.this.present & NIC_BACKEND, _Str),
    "offered" / cs.If(cs.this.present & NIC_OFFERED, _Bits),
    "negotiated" / cs.If(cs.this.present & NIC_NEGOTIATED, _Bits),
    "driver_status" / cs.If(cs.this.present & NIC_STATUS, _U8),
    "backend_features" / cs.If(cs.this.present & NIC_BACKEND_FEATURES, _Bits),
    "vnet_hdr" / cs.If(cs.this.present & NIC_VNET_HDR, _U8),
    "tri_lo" / _Bits,  # declared catalogue properties, 2 bits each, indexed by feature bit
    "tri_hi" / _Bits,
    "other_props" / wl.Array(_Count, _OtherProp(), unique=True, what="property"),
    "unreadable" / wl.Array(_Count, _Str),
    "ext" / _NicExt,
    make=_nic,
)
_Version = wl.Struct("major" / wl.Uint(2), "minor" / wl.Uint(2), "micro" / wl.Uint(2), tuple=True)
_Head = wl.Struct(  # common start of the VM and host bodies
    "present" / wl.VarInt(0xF),
    "host" / _Str,
    "version" / cs.If(cs.this.present & VM_VERSION, _Version),
    "package" / cs.If(cs.this.present & VM_PACKAGE, _Str),
    "machine" / cs.If(cs.this.present & VM_MACHINE, _Str),
)


def _vm(this: dict[str, Any], parent: Any) -> VmReport:
    head = this["head"]
    return VmReport(head["host"], head["version"], head["package"], head["machine"], tuple(this["nics"].values()),
                    tuple(this["unreadable"]), devices_known=not head["present"] & VM_DEVICES_UNKNOWN, **this["ext"])


def _host(this: dict[str, Any], parent: Any) -> HostCapabilities:
    head = this["head"]
    if head["present"] & VM_DEVICES_UNKNOWN:
        raise wl.FieldError("malformed body: flag 8 (device list unreadable) is for VM reports only",
                            "head", "present")
    return HostCapabilities(head["host"], head["version"], head["package"], head["machine"],
                            tuple(sorted(this["offers"].items())))


_VmBody = wl.Struct(
    "head" / _Head,
    "nics" / wl.Array(_Count, wl.Sized(_Length, _Nic), unique=True, what="NIC id or QOM path"),
    "unreadable" / wl.Array(_Count, _Str),
    "ext" / _VmExt,
    make=_vm,
)
_HostBody = wl.Struct(
    "head" / _Head,
    "offers" / wl.Array(_Count, wl.Struct("backend" / _Str, "bitmap" / _Bits, tuple=True),
                        unique=True, what="backend kind"),
    "ext" / _NoExt,
    make=_host,
)


def _pick(table: list[Any], index: int, *where: str | int) -> Any:
    if index >= len(table):
        raise wl.FieldError(f"malformed body: index {index} outside its table of {len(table)}", *where)
    return table[index]


def _set_ref(fields: tuple[int, int], parent: dict[str, Any]) -> tuple[str, int]:
    kind: str = _pick(parent["strings"], fields[0], "backend")
    if len(kind) > MAX_KIND_BYTES or len(kind.encode()) > MAX_KIND_BYTES:  # refused before any host uses it
        raise wl.FieldError(f"invalid record: backend kind longer than {MAX_KIND_BYTES} bytes", "backend")
    return kind, fields[1]


_Index = wl.VarInt(MAX_TABLE - 1)
_SetPresent = wl.VarInt(VM_VERSION | VM_PACKAGE | VM_MACHINE)
_HostCount = wl.VarInt(MAX_HOSTS)


class _SetHosts(wl.Leaf):
    """The hosts of a capability set (count, then per host: present, name, indexes, offers), read by hand with
    the set's tables: a set holds up to 20,000 hosts, and one loop with locals costs half of a generic array of
    structs with a ``make``. Each field is checked as it is read (a host name given before, a kind without a
    reference or out of order) and a failure names it (``hosts[3].host``, ``hosts[3].offers[2].backend``)."""

    def _emitparse(self, code: Any) -> str:  # a field of the set's Struct, whose fields so far are ``this``
        code.linkedinstances[id(self)] = self
        return f"linkedinstances[{id(self)}].read_hosts(io, this)"

    def read_hosts(self, stream: Any, tables: dict[str, Any]) -> tuple[HostCapabilities, ...]:
        refs, strings, versions = tables["refs"], tables["strings"], tables["versions"]
        offer_of = {i: (kind, refs[kind], (kind, refs[kind]))  # string index -> (kind, reference, offer if XOR 0)
                    for i, kind in enumerate(strings) if kind in refs}
        names: dict[str, None] = {}  # the names so far: a dict holds 20,000 names in half the memory of a set
        hosts = []
        read = stream.read  # one-byte varints are read inline (their leaf checks the others)
        count, field = None, None
        try:
            for _ in range(count := _HostCount.read(stream)):
                field = "present"
                present = first[0] if (first := read(1)) and first[0] <= 7 else _SetPresent.rest(first, stream)
                field = "host"
                name = _Str.read(stream)
                if name in names or not name:
                    raise wl.FieldError(f"invalid record: host {name!r} given twice (each host in a set appears "
                                        "once)" if name else "invalid record: a host without a name (each host in "
                                        "a set is named)")
                names[name] = None
                version = package = machine = None
                if present:
                    field = "version"
                    version = _pick(versions, _Index.read(stream)) if present & VM_VERSION else None
                    field = "package"
                    package = _pick(strings, _Index.read(stream)) if present & VM_PACKAGE else None
                    field = "machine"
                    machine = _pick(strings, _Index.read(stream)) if present & VM_MACHINE else None
                field = "offers"
                n = first[0] if (first := read(1)) and first[0] < 0x80 else _Count.rest(first, stream)
                offers = self.read_offers(stream, n, offer_of, strings) if n else ()
                field = None
                hosts.append(HostCapabilities(name, version, package, machine, offers))
        except Exception as err:
            raise wl.failure(wl.failure(err, field, stream), None if count is None else len(hosts), stream) from None
        return tuple(hosts)

    @staticmethod
    def read_offers(stream: Any, count: int, offer_of: dict[int, Any], strings: list[str]) -> tuple[Any, ...]:
        offers, last, read = [], "", stream.read
        i, field = 0, "backend"
        try:
            for i in range(count):
                field = "backend"
                index = first[0] if (first := read(1)) and first[0] < 0x80 else _Index.rest(first, stream)
                entry = offer_of.get(index)
                if entry is None:
                    raise wl.FieldError(f"malformed body: no reference bitmap for backend {_pick(strings, index)!r}")
                kind, ref, same = entry
                if i and kind <= last:
                    raise wl.FieldError(f"malformed body: backend kind {kind!r} " + (
                        "given twice" if kind == last else "out of order (offers are sorted by kind)"))
                last = kind
                field = "xor"
                xor = _Bits.read(stream)
                offers.append((kind, ref ^ xor) if xor else same)  # identical hosts share their offers
        except Exception as err:
            raise wl.failure(wl.failure(err, field, stream), i, stream) from None
        return tuple(offers)

    def write(self, obj: list[dict[str, Any]], stream: Any) -> list[dict[str, Any]]:  # from _set_obj
        _HostCount.write(len(obj), stream)
        for host in obj:
            _SetPresent.write(host["present"], stream)
            _Str.write(host["host"], stream)
            for index in host["indexes"]:
                _Index.write(index, stream)
            _Count.write(len(host["offers"]), stream)
            for index, xor in host["offers"]:
                _Index.write(index, stream)
                _Bits.write(xor, stream)
        return obj


_SetBody = wl.Struct(  # many hosts: repeated strings in a table, bitmaps XOR a per-backend reference
    "strings" / wl.Array(wl.VarInt(MAX_TABLE), _Str),
    "versions" / wl.Array(wl.VarInt(MAX_TABLE), _Version),
    "refs" / wl.Array(_Count, wl.Struct("backend" / _Index, "bitmap" / _Bits, make=_set_ref, tuple=True),
                      unique=True, what="reference for backend"),
    "hosts" / _SetHosts(),
    "ext" / _NoExt,
    make=lambda this, parent: CapabilitySet(this["hosts"]),
)


COMPILED = {TYPE_VM: wl.compile_layout(_VmBody), TYPE_HOST: wl.compile_layout(_HostBody),
            TYPE_SET: wl.compile_layout(_SetBody)}


# ------------------------------------------------------------------------------------------------ encode

def _head(record: VmReport | HostCapabilities) -> dict[str, Any]:
    present = ((VM_VERSION if record.qemu_version else 0) | (VM_PACKAGE if record.package is not None else 0)
               | (VM_MACHINE if record.machine is not None else 0)
               | (VM_DEVICES_UNKNOWN if isinstance(record, VmReport) and not record.devices_known else 0))
    version = dict(zip(("major", "minor", "micro"), record.qemu_version, strict=True)) if record.qemu_version else None
    return {"present": present, "host": record.host, "version": version, "package": record.package,
            "machine": record.machine}


_NIC_OPTIONAL = (("netdev_id", NIC_NETDEV), ("backend", NIC_BACKEND), ("offered", NIC_OFFERED),
                 ("negotiated", NIC_NEGOTIATED), ("driver_status", NIC_STATUS),
                 ("backend_features", NIC_BACKEND_FEATURES), ("vnet_hdr", NIC_VNET_HDR))


def _nic_obj(nic: NicReport) -> dict[str, Any]:
    obj = {name: getattr(nic, name) for name, _ in _NIC_OPTIONAL}
    present = sum(flag for name, flag in _NIC_OPTIONAL if obj[name] is not None)
    if nic.vnet_hdr is not None:
        obj["vnet_hdr"] = int(nic.vnet_hdr)
    lo = hi = 0
    other = []
    for prop, tri in nic.properties:
        feature = BY_PROPERTY.get(prop)
        if feature is None:
            other.append({"name": prop, "tri": int(tri)})
        else:
            lo |= (tri & 1) << feature.bit
            hi |= (tri >> 1) << feature.bit
    return obj | {"present": present, "qdev_id": nic.qdev_id, "qom_path": nic.qom_path, "tri_lo": lo,
                  "tri_hi": hi, "other_props": other, "unreadable": nic.unreadable,
                  "ext": {"offered_unknown": nic.offered_unknown, "derived": nic.derived, "dev_path": nic.dev_path,
                          "state": nic.state}}


class _Table:
    def __init__(self) -> None:
        self.items: dict[Any, int] = {}

    def index(self, item: Any) -> int:
        return self.items.setdefault(item, len(self.items))


def _set_obj(record: CapabilitySet) -> dict[str, Any]:
    strings, versions = _Table(), _Table()
    refs: dict[str, int] = {}
    hosts = []
    for host in record.hosts:
        head = _head(host)
        offers = [(strings.index(kind), bitmap ^ refs.setdefault(kind, bitmap)) for kind, bitmap in host.offers]
        indexes = [versions.index(host.qemu_version)] if host.qemu_version else []
        indexes += [strings.index(text) for text in (host.package, host.machine) if text is not None]
        hosts.append({"present": head["present"], "host": host.host, "indexes": indexes, "offers": offers})
    return {"strings": list(strings.items), "hosts": hosts, "ext": {},
            "versions": [dict(zip(("major", "minor", "micro"), v, strict=True)) for v in versions.items],
            "refs": [{"backend": strings.index(k), "bitmap": b} for k, b in refs.items()]}


def body_obj(record: object) -> tuple[int, dict[str, Any]] | None:
    """The record type and what its compiled layout builds the body from; None for what is not a record."""
    if isinstance(record, VmReport):
        return TYPE_VM, {"head": _head(record), "nics": [_nic_obj(n) for n in record.nics],
                         "unreadable": record.unreadable,
                         "ext": {"vm_name": record.vm_name, "vm_uuid": record.vm_uuid, "made_at": record.made_at,
                                 "side": record.side}}
    if isinstance(record, HostCapabilities):
        return TYPE_HOST, {"head": _head(record), "ext": {},
                           "offers": [{"backend": k, "bitmap": b} for k, b in record.offers]}
    if isinstance(record, CapabilitySet):
        return TYPE_SET, _set_obj(record)
    return None
