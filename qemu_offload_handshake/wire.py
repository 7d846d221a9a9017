"""The versioned binary wire format for reports, built with construct. Layout: ``docs/wire-format.md``.

``encode(record, key=None) -> bytes`` and ``decode(data, key=None) -> record``. Decoding raises nothing but
``DecodeError`` (or its subclasses ``UnsupportedVersionError`` and ``AuthenticationError``), never reads past
the input, and bounds every length and count before it allocates, so memory stays proportional to the input.

Speed and safety with construct: the record layouts are construct ``Struct``s, compiled with
``Construct.compile()`` for speed. Construct's compiled code reads with bare ``io.read(n)`` and does not check
short reads, and some of its checks are ``assert``s that vanish under ``python -O``; its documentation says not
to feed compiled parsers untrusted data. So every leaf of these layouts is one of the ``_Leaf`` classes below:
they read through ``_read_exact`` and check every limit with ``if ...: raise`` in plain Python, and the
compiled code calls them for both parsing and building. Only construct's structure (``Struct``, ``If``,
``PrefixedArray``) is compiled. When the compiled parser refuses input, the interpreted one (same leaves, same
checks) parses it again to name the failing field in the error.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import zlib
from collections.abc import Callable
from typing import Any

import construct as cs

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


# ------------------------------------------------------------------------------------------------ leaves

_BYTES = [bytes((i,)) for i in range(256)]


def _read_exact(stream: Any, n: int) -> bytes:
    data: bytes = stream.read(n)
    if len(data) != n:
        raise cs.StreamError(f"truncated: needed {n} bytes, {len(data)} left")
    return data


class _Leaf(cs.Construct):  # type: ignore[misc]
    """A leaf with explicit checks; the compiled parser and builder call ``read``/``write`` directly."""

    def read(self, stream: Any) -> Any:
        raise NotImplementedError

    def write(self, obj: Any, stream: Any) -> Any:
        raise NotImplementedError

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        try:
            return self.read(stream)
        except cs.ConstructError as err:
            raise type(err)(str(err), path=path) from None

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        try:
            return self.write(obj, stream)
        except cs.ConstructError as err:
            raise type(err)(str(err), path=path) from None

    def _emitparse(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        return f"linkedinstances[{id(self)}].read(io)"

    def _emitbuild(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        return f"linkedinstances[{id(self)}].write(obj, io)"

    def _sizeof(self, context: Any, path: str) -> int:
        raise cs.SizeofError("variable size", path=path)


class _VarInt(_Leaf):
    """Unsigned LEB128 of at most ``limit``, minimal encoding only."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.max_bytes = max(1, (limit.bit_length() + 6) // 7)

    def read(self, stream: Any) -> int:
        first: bytes = stream.read(1)
        if first and first[0] < 0x80:  # the common one-byte case
            if first[0] > self.limit:
                raise cs.ValidationError(f"value {first[0]} over its limit {self.limit}")
            return first[0]
        if first:
            stream.seek(-1, io.SEEK_CUR)
        value = 0
        for index in range(self.max_bytes):
            byte = _read_exact(stream, 1)[0]
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                if value > self.limit:
                    raise cs.ValidationError(f"value {value} over its limit {self.limit}")
                if byte == 0 and index > 0:
                    raise cs.ValidationError("varint not minimal")
                return value
        raise cs.ValidationError(f"varint longer than {self.max_bytes} bytes")

    def write(self, obj: int, stream: Any) -> int:
        if isinstance(obj, bool) or not isinstance(obj, int) or not 0 <= obj <= self.limit:
            raise cs.ValidationError(f"value {obj!r} out of range 0..{self.limit}")
        if obj < 0x80:
            stream.write(_BYTES[obj])
            return obj
        out = bytearray()
        value = obj
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                break
        stream.write(out)
        return obj


class _Uint(_Leaf):
    """Fixed-size big-endian unsigned integer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def read(self, stream: Any) -> int:
        return int.from_bytes(_read_exact(stream, self.size), "big")

    def write(self, obj: int, stream: Any) -> int:
        if isinstance(obj, bool) or not isinstance(obj, int) or not 0 <= obj < 1 << (8 * self.size):
            raise cs.ValidationError(f"value {obj!r} does not fit {self.size} bytes")
        stream.write(obj.to_bytes(self.size, "big"))
        return obj


class _Blob(_Leaf):
    """Varint length (at most ``limit``), then that many bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.length = _VarInt(limit)

    def read(self, stream: Any) -> bytes:
        return _read_exact(stream, self.length.read(stream))

    def write(self, obj: bytes, stream: Any) -> bytes:
        self.length.write(len(obj), stream)
        stream.write(obj)
        return obj


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise cs.ValidationError(f"invalid UTF-8 at byte {err.start}") from None


def _bitmap(raw: bytes) -> int:
    if raw and raw[-1] == 0:
        raise cs.ValidationError("bitmap has a trailing zero byte (not minimal)")
    return int.from_bytes(raw, "little")


class _Mapped(_Leaf):
    """A ``_Blob`` seen as another value: ``load`` checks and converts the bytes, ``dump`` gives them back."""

    def __init__(self, limit: int, load: Callable[[bytes], Any], dump: Callable[[Any], bytes]) -> None:
        super().__init__()
        self.blob, self.load, self.dump = _Blob(limit), load, dump

    def read(self, stream: Any) -> Any:
        return self.load(_read_exact(stream, self.blob.length.read(stream)))

    def write(self, obj: Any, stream: Any) -> Any:
        self.blob.write(self.dump(obj), stream)
        return obj


def _Text(limit: int) -> _Mapped:
    """UTF-8 text; invalid UTF-8 is an error, not a replacement character."""
    return _Mapped(limit, _utf8, lambda text: text.encode("utf-8"))


def _Bitmap(limit: int) -> _Mapped:
    """A bitmap of any width: little-endian bytes, minimal (no trailing zero byte)."""
    return _Mapped(limit, _bitmap, lambda n: n.to_bytes((n.bit_length() + 7) // 8, "little"))


class _Sized(cs.Subconstruct):  # type: ignore[misc]
    """Varint byte length, then ``subcon`` parsed from exactly those bytes (later bytes in it are skipped)."""

    def __init__(self, subcon: Any) -> None:
        super().__init__(subcon)
        self.length = _VarInt(MAX_RECORD_BYTES)

    def nested(self, stream: Any, parse: Callable[[Any], Any]) -> Any:
        return parse(io.BytesIO(_read_exact(stream, self.length.read(stream))))

    def nested_build(self, obj: Any, stream: Any, build: Callable[[Any, Any], Any]) -> Any:
        inner = io.BytesIO()
        build(obj, inner)
        data = inner.getvalue()
        self.length.write(len(data), stream)
        stream.write(data)
        return obj

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        return self.nested(stream, lambda sub: self.subcon._parsereport(sub, context, path))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        return self.nested_build(obj, stream, lambda o, sub: self.subcon._build(o, sub, context, path))

    def _emitparse(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        return f"linkedinstances[{id(self)}].nested(io, lambda io: ({self.subcon._compileparse(code)}))"

    def _emitbuild(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        return (f"linkedinstances[{id(self)}].nested_build(obj, io, "
                f"lambda obj, io: ({self.subcon._compilebuild(code)}))")


class _BitSet(_Leaf):
    """A varint whose bit *i* stands for ``names[i]``: a sorted tuple of names. A bit without a name is an error."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names, self.value = names, _VarInt(0xFFFF)

    def read(self, stream: Any) -> tuple[str, ...]:
        value = self.value.read(stream)
        if value >> len(self.names):
            raise cs.ValidationError(f"bit {value.bit_length() - 1} names nothing (bits 0-{len(self.names) - 1} "
                                     f"are {', '.join(self.names)})")
        return tuple(sorted(name for i, name in enumerate(self.names) if value >> i & 1))

    def write(self, obj: tuple[str, ...], stream: Any) -> tuple[str, ...]:
        self.value.write(sum(1 << self.names.index(name) for name in set(obj)), stream)
        return obj


class _Choice(_Leaf):
    """One byte: 1 for ``names[0]``, 2 for ``names[1]``, ..."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names

    def read(self, stream: Any) -> str:
        byte = _read_exact(stream, 1)[0]
        if not 1 <= byte <= len(self.names):
            raise cs.ValidationError(f"{byte} is not one of " + ", ".join(
                f"{i} ({name})" for i, name in enumerate(self.names, 1)))
        return self.names[byte - 1]

    def write(self, obj: str, stream: Any) -> str:
        stream.write(_BYTES[self.names.index(obj) + 1])
        return obj


class _Extensions(_Leaf):
    """Count, then per extension: varint tag, varint length, that many bytes of content.

    ``known`` maps a tag to (field name, leaf, default): the content of a known tag is exactly one value of that
    leaf, and is never the field's default (writers leave defaults out). Each tag appears at most once; unknown
    tags are skipped. Parses to a dict of the known fields present; builds from such a dict (None: left out).
    """

    def __init__(self, known: dict[int, tuple[str, _Leaf, Any]]) -> None:
        super().__init__()
        self.known = known
        self.tag, self.length = _VarInt(0xFFFF), _VarInt(MAX_RECORD_BYTES)

    def read(self, stream: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        seen: set[int] = set()
        for _ in range(_Count.read(stream)):
            tag = self.tag.read(stream)
            if tag in seen:
                raise cs.ValidationError(f"extension tag {tag} given twice")
            seen.add(tag)
            content = _read_exact(stream, self.length.read(stream))
            if tag not in self.known:
                continue
            name, leaf, default = self.known[tag]
            sub = io.BytesIO(content)
            try:
                value = leaf.read(sub)
            except cs.ConstructError as err:
                raise cs.ValidationError(f"extension {name} (tag {tag}): {err}") from None
            if sub.tell() != len(content):
                raise cs.ValidationError(f"extension {name} (tag {tag}): {len(content) - sub.tell()} bytes after "
                                         "its value")
            if value == default:
                raise cs.ValidationError(f"extension {name} (tag {tag}) holds its default value {default!r}, "
                                         "which writers leave out")
            values[name] = value
        return values

    def write(self, obj: dict[str, Any], stream: Any) -> dict[str, Any]:
        present = [(tag, obj[name], leaf) for tag, (name, leaf, default) in sorted(self.known.items())
                   if obj.get(name, default) != default]
        _Count.write(len(present), stream)
        for tag, value, leaf in present:
            content = io.BytesIO()
            leaf.write(value, content)
            self.tag.write(tag, stream)
            self.length.write(len(content.getvalue()), stream)
            stream.write(content.getvalue())
        return obj


# ------------------------------------------------------------------------------------------------ layouts

_Count = _VarInt(MAX_ITEMS)
_Str = _Text(MAX_STRING_BYTES)
_Bits = _Bitmap(MAX_BITMAP_BYTES)
_U8 = _Uint(1)
_MADE_AT_LIMIT = (1 << 40) - 1
NIC_EXT_OFFERED_UNKNOWN, NIC_EXT_DERIVED = 1, 2  # extension tags (format 1.1)
VM_EXT_NAME, VM_EXT_UUID, VM_EXT_MADE_AT, VM_EXT_SIDE = 1, 2, 3, 4
_NicExt = _Extensions({NIC_EXT_OFFERED_UNKNOWN: ("offered_unknown", _Bits, 0),
                       NIC_EXT_DERIVED: ("derived", _BitSet(DERIVABLE), ())})
_VmExt = _Extensions({VM_EXT_NAME: ("vm_name", _Str, None), VM_EXT_UUID: ("vm_uuid", _Str, None),
                      VM_EXT_MADE_AT: ("made_at", _VarInt(_MADE_AT_LIMIT), None),
                      VM_EXT_SIDE: ("side", _Choice(SIDES), None)})
_NoExt = _Extensions({})

# Presence bits of optional fields (an absent field is None in the model).
NIC_NETDEV, NIC_BACKEND, NIC_OFFERED, NIC_NEGOTIATED, NIC_STATUS, NIC_BACKEND_FEATURES, NIC_VNET_HDR = (
    1, 2, 4, 8, 16, 32, 64)
VM_VERSION, VM_PACKAGE, VM_MACHINE, VM_DEVICES_UNKNOWN = 1, 2, 4, 8

_Nic = cs.Struct(
    "present" / _VarInt(0x7F),
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
    "other_props" / cs.PrefixedArray(_Count, cs.Struct("name" / _Str, "tri" / _U8)),
    "unreadable" / cs.PrefixedArray(_Count, _Str),
    "ext" / _NicExt,
)
_Version = cs.Struct("major" / _Uint(2), "minor" / _Uint(2), "micro" / _Uint(2))
_Head = cs.Struct(  # common start of the VM and host bodies
    "present" / _VarInt(0xF),
    "host" / _Str,
    "version" / cs.If(cs.this.present & VM_VERSION, _Version),
    "package" / cs.If(cs.this.present & VM_PACKAGE, _Str),
    "machine" / cs.If(cs.this.present & VM_MACHINE, _Str),
)
_VmBody = cs.Struct(
    "head" / _Head,
    "nics" / cs.PrefixedArray(_Count, _Sized(_Nic)),
    "unreadable" / cs.PrefixedArray(_Count, _Str),
    "ext" / _VmExt,
)
_HostBody = cs.Struct(
    "head" / _Head,
    "offers" / cs.PrefixedArray(_Count, cs.Struct("backend" / _Str, "bitmap" / _Bits)),
    "ext" / _NoExt,
)
_Index = _VarInt(MAX_TABLE - 1)
_SetBody = cs.Struct(  # many hosts: repeated strings in a table, bitmaps XOR a per-backend reference
    "strings" / cs.PrefixedArray(_VarInt(MAX_TABLE), _Str),
    "versions" / cs.PrefixedArray(_VarInt(MAX_TABLE), _Version),
    "refs" / cs.PrefixedArray(_Count, cs.Struct("backend" / _Index, "bitmap" / _Bits)),
    "hosts" / cs.PrefixedArray(_VarInt(MAX_HOSTS), cs.Struct(
        "present" / _VarInt(0x7),
        "host" / _Str,
        "version" / cs.If(cs.this.present & VM_VERSION, _Index),
        "package" / cs.If(cs.this.present & VM_PACKAGE, _Index),
        "machine" / cs.If(cs.this.present & VM_MACHINE, _Index),
        "offers" / cs.PrefixedArray(_Count, cs.Struct("backend" / _Index, "xor" / _Bits)),
    )),
    "ext" / _NoExt,
)
_Header = cs.Struct(
    "magic" / _Uint(4),
    "major" / _U8,
    "minor" / _U8,
    "type" / _U8,
    "flags" / _U8,
    "length" / _Uint(4),
)
_BODIES = {TYPE_VM: _VmBody, TYPE_HOST: _HostBody, TYPE_SET: _SetBody}
_COMPILED = {rtype: body.compile() for rtype, body in _BODIES.items()}
_MAGIC_INT = int.from_bytes(MAGIC, "big")
_HEADER = _Header.compile()


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
                  "ext": {"offered_unknown": nic.offered_unknown, "derived": nic.derived}}


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

_TRIS = (None, Tri.OFF, Tri.ON, Tri.AUTO)


def _tri(value: int, where: str) -> Tri:
    tri = _TRIS[value] if value < 4 else None
    if tri is None:
        raise DecodeError(f"invalid tri-state {value}", field=where)
    return tri


_PROP_AT = {f.bit: f.prop for f in BY_BIT.values() if f.prop is not None}


def _nic_from(obj: Any, index: int) -> NicReport:
    props: dict[str, Tri] = {}
    lo, hi = obj.tri_lo, obj.tri_hi
    both = lo | hi
    while both:
        low = both & -both
        both ^= low
        name = _PROP_AT.get(low.bit_length() - 1)
        if name is None:
            raise DecodeError(f"tri-state for bit {low.bit_length() - 1}, which has no property",
                              field=f"nics[{index}].tri")
        props[name] = _TRIS[(1 if lo & low else 0) | (2 if hi & low else 0)]  # type: ignore[assignment]
    for entry in obj.other_props:
        if entry.name in props or entry.name in BY_PROPERTY:
            raise DecodeError(f"property {entry.name!r} given twice", field=f"nics[{index}].other_props")
        props[entry.name] = _tri(entry.tri, f"nics[{index}].other_props")
    vnet = obj.vnet_hdr
    if vnet is not None and vnet > 1:
        raise DecodeError(f"vnet_hdr must be 0 or 1, not {vnet}", field=f"nics[{index}].vnet_hdr")
    ext = obj.ext
    unknown = ext.get("offered_unknown", 0)
    if unknown and (obj.offered is None or obj.offered & unknown or "offered" not in ext.get("derived", ())):
        raise DecodeError("offered_unknown needs a derived offered bitmap and must not overlap it",
                          field=f"nics[{index}].offered_unknown")
    return NicReport(
        obj.qdev_id, obj.qom_path, obj.netdev_id, obj.backend, tuple(sorted(props.items())), obj.offered,
        obj.negotiated, obj.driver_status, obj.backend_features, None if vnet is None else bool(vnet),
        tuple(obj.unreadable), unknown, ext.get("derived", ()))


def _version(v: Any) -> tuple[int, int, int] | None:
    return None if v is None else (v.major, v.minor, v.micro)


def _pick(table: list[Any], index: int | None, what: str) -> Any:
    if index is None:
        return None
    if index >= len(table):
        raise DecodeError(f"{what} index {index} outside its table of {len(table)}", field=what)
    return table[index]


def _set_from(parsed: Any) -> CapabilitySet:
    strings, versions = list(parsed.strings), [_version(v) for v in parsed.versions]
    refs: dict[str, int] = {}
    for ref in parsed.refs:
        kind = _pick(strings, ref.backend, "refs.backend")
        if kind in refs:
            raise DecodeError(f"reference for backend {kind!r} given twice", field="refs")
        refs[kind] = ref.bitmap
    hosts = []
    for entry in parsed.hosts:
        offers = []
        for offer in entry.offers:
            kind = _pick(strings, offer.backend, "hosts.offers.backend")
            if kind not in refs:
                raise DecodeError(f"no reference bitmap for backend {kind!r}", field="hosts.offers")
            offers.append((kind, offer.xor ^ refs[kind]))
        hosts.append(HostCapabilities(
            entry.host, _pick(versions, entry.version, "hosts.version"), _pick(strings, entry.package, "hosts.package"),
            _pick(strings, entry.machine, "hosts.machine"), tuple(offers)))
    return CapabilitySet(tuple(hosts))


def _parse_body(rtype: int, body: bytes) -> Any:
    try:
        return _COMPILED[rtype].parse(body)
    except Exception as fast_err:
        try:
            _BODIES[rtype].parse(body)
        except cs.ConstructError as err:
            path = (getattr(err, "path", None) or "").replace("(parsing) -> ", "").replace(" -> ", ".")
            raise DecodeError(f"malformed body: {str(err).splitlines()[-1]}", offset=HEADER_SIZE,
                              field=path or None) from err
        raise DecodeError(f"malformed body: {fast_err}", offset=HEADER_SIZE) from fast_err


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
    parsed = _parse_body(header.type, data[HEADER_SIZE:end - CRC_SIZE])
    try:
        if header.type == TYPE_SET:
            return _set_from(parsed)
        head = parsed.head
        version = _version(head.version)
        if header.type == TYPE_VM:
            return VmReport(head.host, version, head.package, head.machine,
                            tuple(_nic_from(n, i) for i, n in enumerate(parsed.nics)), tuple(parsed.unreadable),
                            devices_known=not head.present & VM_DEVICES_UNKNOWN, **parsed.ext)
        if head.present & VM_DEVICES_UNKNOWN:
            raise DecodeError("flag 8 (device list unreadable) is for VM reports only", field="head.present")
        offers = tuple(sorted((o.backend, o.bitmap) for o in parsed.offers))
        if len({k for k, _ in offers}) != len(offers):
            raise DecodeError("a backend kind is listed twice", field="offers")
        return HostCapabilities(head.host, version, head.package, head.machine, offers)
    except (ValueError, TypeError) as err:  # the model refused a value: name it
        raise DecodeError(f"invalid record: {err}", offset=HEADER_SIZE) from err
