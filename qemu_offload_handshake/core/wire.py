"""The versioned binary wire format for reports, built with construct. Layout: ``docs/wire-format.md``.

``encode(record, key=None) -> bytes`` and ``decode(data, key=None) -> record``. Decoding raises nothing but
``DecodeError`` (or its subclasses ``UnsupportedVersionError`` and ``AuthenticationError``), never reads past
the input, and bounds every length and count before it allocates, so memory stays proportional to the input.

Speed and safety with construct: the record layouts below are construct ``Struct``s, compiled with
``Construct.compile()``, whose leaves are the checked leaves of ``wire_layout`` (never construct's own, which
trust their input). Decoding is one pass over the body: each NIC, host and offer is checked and turned into
model objects as it is read (a backend kind or NIC given twice is refused when it is read), a failure names its
field (``nics[1].offered_unknown``) without parsing again, and bytes left after the body's fields are an error.
Time and memory are proportional to the input; ``benchmarks/bench_wire.py`` measures hostile input against
valid input of the same size.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import zlib
from typing import Any

import construct as cs

from . import wire_layout as wl
from .errors import AuthenticationError, DecodeError, EncodeError, UnsupportedVersionError
from .features import BY_BIT, BY_PROPERTY
from .model import (
    DERIVABLE,
    MAX_BITMAP_BITS,
    MAX_HOSTS,
    MAX_ITEMS,
    MAX_STRING_BYTES,
    SIDES,
    CapabilitySet,
    HostCapabilities,
    NicReport,
    Tri,
    VmReport,
)

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "Record",
    "decode",
    "encode",
]

MAGIC = b"QOHS"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1
MAX_RECORD_BYTES = 1 << 20
FLAG_HMAC = 0x01
TYPE_VM, TYPE_HOST, TYPE_SET = 1, 2, 3
HEADER_SIZE, CRC_SIZE, MAC_SIZE = 12, 4, 32
MAX_BITMAP_BYTES = MAX_BITMAP_BITS // 8
MAX_TABLE = 4096

Record = VmReport | HostCapabilities | CapabilitySet


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


def _other_prop(fields: tuple[str, int], parent: Any) -> tuple[str, Tri]:
    name, value = fields
    if name in BY_PROPERTY:
        raise wl.FieldError(f"malformed body: catalogue property {name!r} belongs in tri lo/hi", "name")
    tri = _TRIS[value] if value < 4 else None
    if tri is None:
        raise wl.FieldError(f"malformed body: invalid tri-state {value}", "tri")
    return name, tri


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
    "other_props" / wl.Array(_Count, wl.Struct("name" / _Str, "tri" / _U8, make=_other_prop, tuple=True),
                             unique=True, what="property"),
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


def _pick(table: list[Any], index: int | None, *where: str | int) -> Any:
    if index is None:
        return None
    if index >= len(table):
        raise wl.FieldError(f"malformed body: index {index} outside its table of {len(table)}", *where)
    return table[index]


def _set_ref(fields: tuple[int, int], parent: dict[str, Any]) -> tuple[str, int]:
    return _pick(parent["strings"], fields[0], "backend"), fields[1]


def _set_host(this: dict[str, Any], parent: dict[str, Any]) -> HostCapabilities:
    strings = parent["strings"]
    offer_of = parent.get("offer_of")  # string index -> (kind, reference, the offer when the XOR is 0)
    if offer_of is None:
        refs = parent["refs"]
        offer_of = parent["offer_of"] = {
            i: (kind, refs[kind], (kind, refs[kind])) for i, kind in enumerate(strings) if kind in refs}
    offers = []
    last = ""
    for i, (index, xor) in enumerate(this["offers"]):
        entry = offer_of.get(index)
        if entry is None:
            kind = _pick(strings, index, "offers", i, "backend")
            raise wl.FieldError(f"malformed body: no reference bitmap for backend {kind!r}", "offers", i, "backend")
        kind, ref, same = entry
        if i and kind <= last:
            raise wl.FieldError(f"malformed body: backend kind {kind!r} " + (
                "given twice" if kind == last else "out of order (offers are sorted by kind)"), "offers", i, "backend")
        last = kind
        offers.append((kind, ref ^ xor) if xor else same)  # identical hosts share their offers
    version, package, machine = this["version"], this["package"], this["machine"]
    return HostCapabilities(this["host"], None if version is None else _pick(parent["versions"], version, "version"),
                            None if package is None else _pick(strings, package, "package"),
                            None if machine is None else _pick(strings, machine, "machine"), tuple(offers))


_Index = wl.VarInt(MAX_TABLE - 1)
_SetBody = wl.Struct(  # many hosts: repeated strings in a table, bitmaps XOR a per-backend reference
    "strings" / wl.Array(wl.VarInt(MAX_TABLE), _Str),
    "versions" / wl.Array(wl.VarInt(MAX_TABLE), _Version),
    "refs" / wl.Array(_Count, wl.Struct("backend" / _Index, "bitmap" / _Bits, make=_set_ref, tuple=True),
                      unique=True, what="reference for backend"),
    "hosts" / wl.Array(wl.VarInt(MAX_HOSTS), wl.Struct(
        "present" / wl.VarInt(0x7),
        "host" / _Str,
        "version" / cs.If(cs.this.present & VM_VERSION, _Index),
        "package" / cs.If(cs.this.present & VM_PACKAGE, _Index),
        "machine" / cs.If(cs.this.present & VM_MACHINE, _Index),
        "offers" / wl.Array(_Count, wl.Struct("backend" / _Index, "xor" / _Bits, tuple=True)),
        make=_set_host,
    )),
    "ext" / _NoExt,
    make=lambda this, parent: CapabilitySet(tuple(this["hosts"])),
)
_Header = cs.Struct(
    "magic" / wl.Uint(4),
    "major" / _U8,
    "minor" / _U8,
    "type" / _U8,
    "flags" / _U8,
    "length" / wl.Uint(4),
)
_BODIES = {TYPE_VM: _VmBody, TYPE_HOST: _HostBody, TYPE_SET: _SetBody}
_COMPILED = {rtype: wl.compile_layout(body) for rtype, body in _BODIES.items()}
_MAGIC_INT = int.from_bytes(MAGIC, "big")
_HEADER = wl.compile_layout(_Header)


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
        offers = []
        for kind, bitmap in host.offers:
            ref = refs.setdefault(kind, bitmap)
            offers.append({"backend": strings.index(kind), "xor": bitmap ^ ref})
        hosts.append({
            "present": head["present"], "host": host.host, "offers": offers,
            "version": versions.index(host.qemu_version) if host.qemu_version else None,
            "package": strings.index(host.package) if host.package is not None else None,
            "machine": strings.index(host.machine) if host.machine is not None else None})
    return {"strings": list(strings.items), "hosts": hosts, "ext": {},
            "versions": [dict(zip(("major", "minor", "micro"), v, strict=True)) for v in versions.items],
            "refs": [{"backend": strings.index(k), "bitmap": b} for k, b in refs.items()]}


def encode(record: Record, *, key: bytes | None = None) -> bytes:
    """The wire bytes of a record; signed with HMAC-SHA256 when ``key`` is given."""
    if isinstance(record, VmReport):
        rtype, obj = TYPE_VM, {"head": _head(record), "nics": [_nic_obj(n) for n in record.nics],
                               "unreadable": record.unreadable,
                               "ext": {"vm_name": record.vm_name, "vm_uuid": record.vm_uuid,
                                       "made_at": record.made_at, "side": record.side}}
    elif isinstance(record, HostCapabilities):
        rtype, obj = TYPE_HOST, {"head": _head(record), "ext": {},
                                 "offers": [{"backend": k, "bitmap": b} for k, b in record.offers]}
    elif isinstance(record, CapabilitySet):
        rtype, obj = TYPE_SET, _set_obj(record)
    else:
        raise EncodeError(f"cannot encode {type(record).__name__}: expected a VmReport, HostCapabilities or "
                          "CapabilitySet")
    if key is not None and not key:
        raise EncodeError("an empty HMAC key signs nothing")
    try:
        body: bytes = _COMPILED[rtype].build(obj)
    except cs.ConstructError as err:
        raise EncodeError(f"record out of the format's bounds: {err}") from err
    if len(body) > MAX_RECORD_BYTES:
        raise EncodeError(f"record body of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    head = (MAGIC + bytes((FORMAT_MAJOR, FORMAT_MINOR, rtype, FLAG_HMAC if key else 0))
            + len(body).to_bytes(4, "big"))
    out = head + body
    out += zlib.crc32(out).to_bytes(CRC_SIZE, "big")
    if key:
        out += hmac.new(key, out, hashlib.sha256).digest()
    return out


# ------------------------------------------------------------------------------------------------ decode

def _parse_body(rtype: int, body: bytes) -> Record:
    """One pass over the body: the record, or a ``DecodeError`` naming the field that failed."""
    stream = io.BytesIO(body)
    try:
        record: Record = _COMPILED[rtype].parse_stream(stream)
        if stream.tell() != len(body):
            raise wl.FieldError(f"malformed body: {len(body) - stream.tell()} bytes after its last field",
                                offset=stream.tell())
    except wl.FieldError as err:
        raise DecodeError(err.message, offset=HEADER_SIZE + (err.offset or 0), field=err.field) from None
    except Exception as err:  # a bug rather than bad input; still only DecodeError leaves decode()
        raise DecodeError(f"malformed body: {type(err).__name__}: {err}", offset=HEADER_SIZE) from err
    return record


def decode(data: bytes, *, key: bytes | None = None) -> Record:
    """Decode one record. With ``key``, the record must carry a valid HMAC made with that key."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"truncated: {len(data)} bytes, a header alone is {HEADER_SIZE}", offset=len(data))
    header = _HEADER.parse(data[:HEADER_SIZE])
    if header.magic != _MAGIC_INT:
        raise DecodeError(f"not a qemu-offload-handshake record (magic {data[:4]!r})", offset=0, field="magic")
    if header.major != FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"unsupported version {header.major}.{header.minor}: this reader knows major version {FORMAT_MAJOR}",
            offset=4, field="version")
    if header.type not in _BODIES:
        raise DecodeError(f"unknown record type {header.type}", offset=6, field="type")
    if header.flags & ~FLAG_HMAC:
        raise DecodeError(f"unknown flags {header.flags:#x}", offset=7, field="flags")
    if header.length > MAX_RECORD_BYTES:
        raise DecodeError(f"body length {header.length} exceeds {MAX_RECORD_BYTES}", offset=8, field="length")
    signed = bool(header.flags & FLAG_HMAC)
    end = HEADER_SIZE + header.length + CRC_SIZE
    total = end + (MAC_SIZE if signed else 0)
    if len(data) != total:
        what = "truncated" if len(data) < total else "trailing bytes"
        raise DecodeError(f"{what}: record is {total} bytes, input {len(data)}", offset=min(len(data), total),
                          field="length")
    if key is not None:
        if not signed:
            raise AuthenticationError("record is not signed but a key was given", offset=7, field="flags")
        expected = hmac.new(key, data[:end], hashlib.sha256).digest()
        if not hmac.compare_digest(expected, data[end:]):
            raise AuthenticationError("HMAC mismatch: wrong key or tampered record", offset=end, field="hmac")
    if zlib.crc32(data[:end - CRC_SIZE]) != int.from_bytes(data[end - CRC_SIZE:end], "big"):
        raise DecodeError("checksum mismatch: the record is corrupt", offset=end - CRC_SIZE, field="crc32")
    return _parse_body(header.type, data[HEADER_SIZE:end - CRC_SIZE])
