"""The versioned binary wire format for reports, built with construct. Layout: ``docs/wire-format.md``.

``encode(record, key=None) -> bytes`` and ``decode(data, key=None) -> record``. Decoding never raises anything
but ``DecodeError`` (or its subclasses ``UnsupportedVersionError`` and ``AuthenticationError``), never reads
past the input, and bounds every length and count before it allocates, so memory stays proportional to the
input. No construct ``Check``/``assert`` is relied on (they vanish under ``python -O``): every check is an
explicit ``if ...: raise``, in Python or in the two small constructs below.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib
from typing import Any

import construct as cs

from .errors import AuthenticationError, DecodeError, EncodeError, UnsupportedVersionError
from .features import BY_BIT, BY_PROPERTY
from .model import MAX_BITMAP_BITS, MAX_ITEMS, MAX_STRING_BYTES, HostCapabilities, NicReport, Tri, VmReport

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
FORMAT_MINOR = 0
MAX_RECORD_BYTES = 1 << 20
FLAG_HMAC = 0x01
TYPE_VM, TYPE_HOST = 1, 2
HEADER_SIZE, CRC_SIZE, MAC_SIZE = 12, 4, 32
MAX_BITMAP_BYTES = MAX_BITMAP_BITS // 8

Record = VmReport | HostCapabilities


class _BoundedVarInt(cs.Construct):  # type: ignore[misc]
    """LEB128 unsigned varint of at most ``limit``; longer or larger encodings are refused."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.max_bytes = max(1, (limit.bit_length() + 6) // 7)

    def _parse(self, stream: Any, context: Any, path: str) -> int:
        value = 0
        for index in range(self.max_bytes):
            byte: int = cs.stream_read(stream, 1, path)[0]
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                if value > self.limit or (byte == 0 and index > 0):
                    raise cs.ValidationError(f"varint {value} over its limit {self.limit} or not minimal", path=path)
                return value
        raise cs.ValidationError(f"varint longer than {self.max_bytes} bytes", path=path)

    def _build(self, obj: int, stream: Any, context: Any, path: str) -> int:
        if not isinstance(obj, int) or not 0 <= obj <= self.limit:
            raise cs.ValidationError(f"varint {obj!r} out of range 0..{self.limit}", path=path)
        out = bytearray()
        value = obj
        while True:
            low = value & 0x7F
            value >>= 7
            out.append(low | (0x80 if value else 0))
            if not value:
                break
        cs.stream_write(stream, bytes(out), len(out), path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise cs.SizeofError("varint has no fixed size", path=path)


class _Text(cs.Adapter):  # type: ignore[misc]
    """UTF-8 text; invalid UTF-8 is a parse error, not a replacement character."""

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError as err:
            raise cs.ValidationError(f"invalid UTF-8 at byte {err.start}", path=path) from None

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        return obj.encode("utf-8")


class _Bitmap(cs.Adapter):  # type: ignore[misc]
    """A bitmap of any width: little-endian bytes, minimal (no trailing zero byte)."""

    def _decode(self, obj: bytes, context: Any, path: str) -> int:
        if obj and obj[-1] == 0:
            raise cs.ValidationError("bitmap has a trailing zero byte (not minimal)", path=path)
        return int.from_bytes(obj, "little")

    def _encode(self, obj: int, context: Any, path: str) -> bytes:
        return obj.to_bytes((obj.bit_length() + 7) // 8, "little")


_Count = _BoundedVarInt(MAX_ITEMS)
_Str = _Text(cs.Prefixed(_BoundedVarInt(MAX_STRING_BYTES), cs.GreedyBytes))
_Bits = _Bitmap(cs.Prefixed(_BoundedVarInt(MAX_BITMAP_BYTES), cs.GreedyBytes))
_Extensions = cs.PrefixedArray(_Count, cs.Struct(
    "tag" / _BoundedVarInt(0xFFFF),
    "data" / cs.Prefixed(_BoundedVarInt(MAX_RECORD_BYTES), cs.GreedyBytes),
))
_Version = cs.Struct("major" / cs.Int16ub, "minor" / cs.Int16ub, "micro" / cs.Int16ub)

# Presence bits of optional fields (an absent field is None in the model).
NIC_NETDEV, NIC_BACKEND, NIC_OFFERED, NIC_NEGOTIATED, NIC_STATUS, NIC_BACKEND_FEATURES, NIC_VNET_HDR = (
    1, 2, 4, 8, 16, 32, 64)
VM_VERSION, VM_PACKAGE, VM_MACHINE = 1, 2, 4

_Nic = cs.Struct(
    "present" / _BoundedVarInt(0x7F),
    "qdev_id" / _Str,
    "qom_path" / _Str,
    "netdev_id" / cs.If(cs.this.present & NIC_NETDEV, _Str),
    "backend" / cs.If(cs.this.present & NIC_BACKEND, _Str),
    "offered" / cs.If(cs.this.present & NIC_OFFERED, _Bits),
    "negotiated" / cs.If(cs.this.present & NIC_NEGOTIATED, _Bits),
    "driver_status" / cs.If(cs.this.present & NIC_STATUS, cs.Int8ub),
    "backend_features" / cs.If(cs.this.present & NIC_BACKEND_FEATURES, _Bits),
    "vnet_hdr" / cs.If(cs.this.present & NIC_VNET_HDR, cs.Int8ub),
    "tri_lo" / _Bits,  # declared catalogue properties, 2 bits each, indexed by feature bit
    "tri_hi" / _Bits,
    "other_props" / cs.PrefixedArray(_Count, cs.Struct("name" / _Str, "tri" / cs.Int8ub)),
    "unreadable" / cs.PrefixedArray(_Count, _Str),
    "ext" / _Extensions,
)
_Head = cs.Struct(  # common start of both record bodies
    "present" / _BoundedVarInt(0x7),
    "host" / _Str,
    "version" / cs.If(cs.this.present & VM_VERSION, _Version),
    "package" / cs.If(cs.this.present & VM_PACKAGE, _Str),
    "machine" / cs.If(cs.this.present & VM_MACHINE, _Str),
)
_VmBody = cs.Struct(
    "head" / _Head,
    "nics" / cs.PrefixedArray(_Count, cs.Prefixed(_BoundedVarInt(MAX_RECORD_BYTES), _Nic)),
    "unreadable" / cs.PrefixedArray(_Count, _Str),
    "ext" / _Extensions,
)
_HostBody = cs.Struct(
    "head" / _Head,
    "offers" / cs.PrefixedArray(_Count, cs.Struct("backend" / _Str, "bitmap" / _Bits)),
    "ext" / _Extensions,
)
_Header = cs.Struct(
    "magic" / cs.Bytes(4),
    "major" / cs.Int8ub,
    "minor" / cs.Int8ub,
    "type" / cs.Int8ub,
    "flags" / cs.Int8ub,
    "length" / cs.Int32ub,
)
_BODIES = {TYPE_VM: _VmBody, TYPE_HOST: _HostBody}


# ---------------------------------------------------------------------------------------------------- encode

def _head(record: VmReport | HostCapabilities) -> dict[str, Any]:
    present = ((VM_VERSION if record.qemu_version else 0) | (VM_PACKAGE if record.package is not None else 0)
               | (VM_MACHINE if record.machine is not None else 0))
    version = dict(zip(("major", "minor", "micro"), record.qemu_version, strict=True)) if record.qemu_version else None
    return {"present": present, "host": record.host, "version": version, "package": record.package,
            "machine": record.machine}


def _nic_obj(nic: NicReport) -> dict[str, Any]:
    optional = (("netdev_id", NIC_NETDEV), ("backend", NIC_BACKEND), ("offered", NIC_OFFERED),
                ("negotiated", NIC_NEGOTIATED), ("driver_status", NIC_STATUS),
                ("backend_features", NIC_BACKEND_FEATURES), ("vnet_hdr", NIC_VNET_HDR))
    present = sum(flag for name, flag in optional if getattr(nic, name) is not None)
    lo = hi = 0
    other = []
    for prop, tri in nic.properties:
        feature = BY_PROPERTY.get(prop)
        if feature is None:
            other.append({"name": prop, "tri": int(tri)})
        else:
            lo |= (tri & 1) << feature.bit
            hi |= (tri >> 1) << feature.bit
    obj = {name: getattr(nic, name) for name, _ in optional}
    if nic.vnet_hdr is not None:
        obj["vnet_hdr"] = int(nic.vnet_hdr)
    return obj | {"present": present, "qdev_id": nic.qdev_id, "qom_path": nic.qom_path, "tri_lo": lo,
                  "tri_hi": hi, "other_props": other, "unreadable": list(nic.unreadable), "ext": []}


def encode(record: Record, *, key: bytes | None = None) -> bytes:
    """The wire bytes of a ``VmReport`` or ``HostCapabilities``; signed with HMAC-SHA256 when ``key`` is given."""
    try:
        if isinstance(record, VmReport):
            rtype, body = TYPE_VM, _VmBody.build({
                "head": _head(record), "nics": [_nic_obj(n) for n in record.nics],
                "unreadable": list(record.unreadable), "ext": []})
        elif isinstance(record, HostCapabilities):
            rtype, body = TYPE_HOST, _HostBody.build({
                "head": _head(record), "offers": [{"backend": k, "bitmap": b} for k, b in record.offers],
                "ext": []})
        else:
            raise EncodeError(f"cannot encode {type(record).__name__}: expected VmReport or HostCapabilities")
    except cs.ConstructError as err:
        raise EncodeError(f"record out of the format's bounds: {err}") from err
    if len(body) > MAX_RECORD_BYTES:
        raise EncodeError(f"record body of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    if key is not None and not key:
        raise EncodeError("an empty HMAC key signs nothing")
    flags = FLAG_HMAC if key else 0
    head = _Header.build({"magic": MAGIC, "major": FORMAT_MAJOR, "minor": FORMAT_MINOR, "type": rtype,
                          "flags": flags, "length": len(body)})
    out: bytes = head + body
    out += zlib.crc32(out).to_bytes(CRC_SIZE, "big")
    if key:
        out += hmac.new(key, out, hashlib.sha256).digest()
    return out


# ---------------------------------------------------------------------------------------------------- decode

def _tri(value: int, where: str) -> Tri:
    if value not in (1, 2, 3):
        raise DecodeError(f"invalid tri-state {value}", field=where)
    return Tri(value)


def _nic_from(obj: Any, index: int) -> NicReport:
    where = f"nics[{index}]"
    props: dict[str, Tri] = {}
    lo, hi = obj.tri_lo, obj.tri_hi
    both = lo | hi
    bit = 0
    while both >> bit:
        if both >> bit & 1:
            feature = BY_BIT.get(bit)
            if feature is None or feature.prop is None:
                raise DecodeError(f"tri-state for bit {bit}, which has no property", field=f"{where}.tri")
            props[feature.prop] = _tri((lo >> bit & 1) | (hi >> bit & 1) << 1, f"{where}.tri")
        bit += 1
    for entry in obj.other_props:
        if entry.name in props or entry.name in BY_PROPERTY:
            raise DecodeError(f"property {entry.name!r} given twice", field=f"{where}.other_props")
        props[entry.name] = _tri(entry.tri, f"{where}.other_props")
    if obj.vnet_hdr is not None and obj.vnet_hdr > 1:
        raise DecodeError(f"vnet_hdr must be 0 or 1, not {obj.vnet_hdr}", field=f"{where}.vnet_hdr")
    return NicReport.make(
        obj.qdev_id, obj.qom_path, properties=props, unreadable=obj.unreadable, netdev_id=obj.netdev_id,
        backend=obj.backend, offered=obj.offered, negotiated=obj.negotiated, driver_status=obj.driver_status,
        backend_features=obj.backend_features, vnet_hdr=None if obj.vnet_hdr is None else bool(obj.vnet_hdr))


def _version(head: Any) -> tuple[int, int, int] | None:
    v = head.version
    return None if v is None else (v.major, v.minor, v.micro)


def decode(data: bytes, *, key: bytes | None = None) -> Record:
    """Decode one record. With ``key``, the record must carry a valid HMAC made with that key."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"truncated: {len(data)} bytes, a header alone is {HEADER_SIZE}", offset=len(data))
    header = _Header.parse(data[:HEADER_SIZE])
    if header.magic != MAGIC:
        raise DecodeError(f"not a qemu-offload-handshake record (magic {header.magic!r})", offset=0, field="magic")
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
    crc = int.from_bytes(data[end - CRC_SIZE:end], "big")
    if zlib.crc32(data[:end - CRC_SIZE]) != crc:
        raise DecodeError("checksum mismatch: the record is corrupt", offset=end - CRC_SIZE, field="crc32")
    body = data[HEADER_SIZE:end - CRC_SIZE]
    try:
        parsed = _BODIES[header.type].parse(body)
    except cs.ConstructError as err:
        path = getattr(err, "path", None) or ""
        raise DecodeError(f"malformed body: {str(err).splitlines()[0]}", offset=HEADER_SIZE,
                          field=path.replace("(parsing) -> ", "") or None) from err
    try:
        head = parsed.head
        if header.type == TYPE_VM:
            return VmReport(head.host, _version(head), head.package, head.machine,
                            tuple(_nic_from(n, i) for i, n in enumerate(parsed.nics)), tuple(parsed.unreadable))
        offers = tuple(sorted((o.backend, o.bitmap) for o in parsed.offers))
        if len({k for k, _ in offers}) != len(offers):
            raise DecodeError("a backend kind is listed twice", field="offers")
        return HostCapabilities(head.host, _version(head), head.package, head.machine, offers)
    except (ValueError, TypeError) as err:  # the model refused a value: name it
        raise DecodeError(f"invalid record: {err}", offset=HEADER_SIZE) from err
