"""The versioned binary wire format for reports, built with construct. Layout: ``docs/wire-format.md``.

``encode(record, key=None) -> bytes`` and ``decode(data, key=None) -> record``. Decoding raises nothing but
``DecodeError`` (or its subclasses ``UnsupportedVersionError`` and ``AuthenticationError``), never reads past
the input, and bounds every length and count before it allocates, so memory stays proportional to the input.

This module is the frame (header, CRC-32, HMAC); the bodies are the compiled construct layouts of
``wire_records`` (types 1-3), ``wire_platform`` (4 host dump and 5 baseline, since 1.2) and ``wire_handshake``
(6 offer, 7 answer, 8 refusal and 9 prepare of the handshake, since 1.3), whose leaves are the checked leaves of
``wire_layout`` (never construct's own, which trust their input). Decoding is one pass over the
body: each NIC, host and offer is checked and turned into model objects as it is read (a backend kind, NIC or host
given twice is refused when it is read), a failure names its field (``nics[1].offered_unknown``) without parsing
again, and bytes left after the body's fields are an error. An offer or answer of a handshake protocol version
this side does not speak is an ``UnsupportedVersionError`` naming the field ``version``.
Time and memory are proportional to the input; ``benchmarks/bench_wire.py`` measures hostile input against
valid input of the same size.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
import zlib

import construct as cs

from . import wire_layout as wl
from .errors import AuthenticationError, DecodeError, EncodeError, UnsupportedVersionError
from .exchange import Answer, Offer, Prepare, Refusal
from .model import CapabilitySet, HostCapabilities, VmReport
from .platform import Baseline, HostDump
from .wire_handshake import COMPILED as HANDSHAKE_COMPILED
from .wire_handshake import VersionMismatch
from .wire_handshake import body_obj as handshake_body_obj
from .wire_platform import COMPILED as PLATFORM_COMPILED
from .wire_platform import body_obj as platform_body_obj
from .wire_records import COMPILED as RECORD_COMPILED
from .wire_records import MAX_RECORD_BYTES, body_obj

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
FORMAT_MINOR = 3  # 1.1: VM and NIC extensions; 1.2: record types 4 (host dump) and 5 (baseline)
# 1.3: record types 6-9 (handshake offer, answer, refusal, prepare)
FLAG_HMAC = 0x01
HEADER_SIZE, CRC_SIZE, MAC_SIZE = 12, 4, 32

Record = VmReport | HostCapabilities | CapabilitySet | HostDump | Baseline | Offer | Answer | Refusal | Prepare
COMPILED = RECORD_COMPILED | PLATFORM_COMPILED | HANDSHAKE_COMPILED  # record type -> body layout

# The fixed 12-byte header, read only once the input has 12 bytes: magic, major, minor, type, flags, length
# (struct rather than a construct Struct: its Container cost a third of decoding a small record).
_HEADER = struct.Struct(">IBBBBI")
_MAGIC_INT = int.from_bytes(MAGIC, "big")


# ------------------------------------------------------------------------------------------------ encode

def encode(record: Record, *, key: bytes | None = None) -> bytes:
    """The wire bytes of a record; signed with HMAC-SHA256 when ``key`` is given."""
    typed = body_obj(record) or platform_body_obj(record) or handshake_body_obj(record)
    if typed is None:
        raise EncodeError(f"cannot encode {type(record).__name__}: expected a VmReport, HostCapabilities, "
                          "CapabilitySet, HostDump or Baseline, or an Offer, Answer, Refusal or Prepare")
    rtype, obj = typed
    if key is not None and not key:
        raise EncodeError("an empty HMAC key signs nothing")
    try:
        body: bytes = COMPILED[rtype].build(obj)
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
        record: Record = COMPILED[rtype].parse_stream(stream)
        if stream.tell() != len(body):
            raise wl.FieldError(f"malformed body: {len(body) - stream.tell()} bytes after its last field",
                                offset=stream.tell())
    except wl.FieldError as err:  # a handshake peer of another protocol version: UnsupportedVersionError
        error = UnsupportedVersionError if isinstance(err, VersionMismatch) else DecodeError
        raise error(err.message, offset=HEADER_SIZE + (err.offset or 0), field=err.field) from None
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
    magic, major, minor, rtype, flags, length = _HEADER.unpack_from(data)
    if magic != _MAGIC_INT:
        raise DecodeError(f"not a qemu-offload-handshake record (magic {data[:4]!r})", offset=0, field="magic")
    if major != FORMAT_MAJOR:
        raise UnsupportedVersionError(
            f"unsupported version {major}.{minor}: this reader knows major version {FORMAT_MAJOR}",
            offset=4, field="version")
    if rtype not in COMPILED:
        raise DecodeError(f"unknown record type {rtype}", offset=6, field="type")
    if flags & ~FLAG_HMAC:
        raise DecodeError(f"unknown flags {flags:#x}", offset=7, field="flags")
    if length > MAX_RECORD_BYTES:
        raise DecodeError(f"body length {length} exceeds {MAX_RECORD_BYTES}", offset=8, field="length")
    signed = bool(flags & FLAG_HMAC)
    end = HEADER_SIZE + length + CRC_SIZE
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
    return _parse_body(rtype, data[HEADER_SIZE:end - CRC_SIZE])
