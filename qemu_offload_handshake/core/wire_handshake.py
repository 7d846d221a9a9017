"""The bodies of the handshake's messages (``exchange``): an offer (type 6), an answer (type 7), a refusal (type 8) and
a prepare (type 9), as compiled construct layouts of the checked leaves of ``wire_layout`` and a few of this
module's own, and the objects the encoder builds (``docs/wire-format.md``; since format 1.3).

Every body starts with the handshake protocol version (2 bytes), before anything else, so that a reader knows a
newer peer when it meets one: an offer, answer or prepare of another version is refused there (``VersionMismatch``,
which ``decode`` raises as ``UnsupportedVersionError``) before the rest is read. A refusal of any version is read:
its job is to say which version its writer speaks, so its layout never changes. An offer carries the source's VM
report, an answer the destination's report or its host's dump, each as the body of its own record type
(``wire_records``, ``wire_platform``) embedded whole, with that record's checks; a failure inside names its field
(``source.nics[0].offered``). Each part is checked as it is read (a finding's code against the rules, the order of
policy and override names, which report an answer's truth carries), and a failure names its field.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import construct as cs

from . import wire_layout as wl
from . import wire_platform, wire_records
from .exchange import (
    MAX_FINDINGS,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    REFUSAL_CODES,
    Answer,
    Offer,
    Prepare,
    Refusal,
    Truth,
)
from .model import MAX_ITEMS, MAX_STRING_BYTES, Tri
from .rules import RULES, Mode, Severity
from .verdict import Finding, Outcome

__all__ = ["COMPILED", "TYPE_ANSWER", "TYPE_OFFER", "TYPE_PREPARE", "TYPE_REFUSAL", "VersionMismatch", "body_obj"]

TYPE_OFFER, TYPE_ANSWER, TYPE_REFUSAL, TYPE_PREPARE = 6, 7, 8, 9
MAX_TIME_MS = (1 << 48) - 1

_Count, _Str = wl.VarInt(MAX_ITEMS), wl.Text(MAX_STRING_BYTES)
_Length = wl.VarInt(wire_records.MAX_RECORD_BYTES)
_NoExt = wl.Extensions(_Count, _Length, {})
_U16 = wl.Uint(2)


class VersionMismatch(wl.FieldError):  # a FieldError: the frame makes it an UnsupportedVersionError
    """An offer or answer of a handshake protocol version this side does not speak."""


class _Version(wl.Leaf):
    """The handshake protocol version: 2 bytes. ``exact``: only ``PROTOCOL_VERSION`` (offers, answers); else any
    version from 1 (refusals)."""

    def __init__(self, exact: bool) -> None:
        super().__init__()
        self.exact = exact

    def read(self, stream: Any) -> int:
        version: int = _U16.read(stream)
        if self.exact and version != PROTOCOL_VERSION:
            raise VersionMismatch(f"handshake protocol version {version}: this side speaks version "
                                  f"{PROTOCOL_VERSION}")
        if not version:
            raise cs.ValidationError("protocol version 0 (versions start at 1)")
        return version

    def write(self, obj: int, stream: Any) -> int:
        return _U16.write(obj, stream)


class _Nonce(wl.Leaf):
    """A nonce: its length (1 byte, which must be ``NONCE_BYTES``), then that many bytes."""

    def read(self, stream: Any) -> bytes:
        if (size := wl.read_exact(stream, 1)[0]) != NONCE_BYTES:
            raise cs.ValidationError(f"a nonce is {NONCE_BYTES} bytes, not {size}")
        return wl.read_exact(stream, NONCE_BYTES)

    def write(self, obj: bytes, stream: Any) -> bytes:
        if not isinstance(obj, bytes) or len(obj) != NONCE_BYTES:
            raise cs.ValidationError(f"a nonce is {NONCE_BYTES} bytes")
        stream.write(bytes((NONCE_BYTES,)) + obj)
        return obj


class _Optional(wl.Leaf):
    """1 byte, ``00`` absent (None) or ``01`` present, then the value if present."""

    def __init__(self, leaf: wl.Leaf) -> None:
        super().__init__()
        self.leaf = leaf

    def read(self, stream: Any) -> Any:
        if (flag := wl.read_exact(stream, 1)[0]) > 1:
            raise cs.ValidationError(f"presence flag {flag}: 0 (absent) or 1 (present)")
        return self.leaf.read(stream) if flag else None

    def write(self, obj: Any, stream: Any) -> Any:
        stream.write(b"\x00" if obj is None else b"\x01")
        if obj is not None:
            self.leaf.write(obj, stream)
        return obj


class _Enum(wl.Choice):
    """One byte: 1 for ``members[0]``, 2 for ``members[1]``, ... (the table here, not the enum's order, fixes
    the bytes)."""

    def __init__(self, *members: Any) -> None:
        super().__init__(tuple(m.value if isinstance(m.value, str) else str(m) for m in members))
        self.members = members

    def read(self, stream: Any) -> Any:
        return self.members[self.names.index(super().read(stream))]

    def write(self, obj: Any, stream: Any) -> Any:
        if obj not in self.members:
            raise cs.ValidationError(f"{obj!r} is not one of {self.members}")
        stream.write(bytes((self.members.index(obj) + 1,)))
        return obj


class _Negotiated(wl.Leaf):
    """A finding's ``negotiated``: 1 byte, ``00`` unknown (None), ``01`` no, ``02`` yes."""

    def read(self, stream: Any) -> bool | None:
        if (byte := wl.read_exact(stream, 1)[0]) > 2:
            raise cs.ValidationError(f"{byte} is not 0 (unknown), 1 (no) or 2 (yes)")
        return None if not byte else byte == 2

    def write(self, obj: bool | None, stream: Any) -> bool | None:
        if obj is not None and not isinstance(obj, bool):
            raise cs.ValidationError(f"negotiated is None, False or True, not {obj!r}")
        stream.write(bytes((0 if obj is None else 1 + obj,)))
        return obj


class _Known(wl.Leaf):
    """A text that must be a key of ``table`` (a finding's code, a refusal's code)."""

    def __init__(self, table: dict[str, Any], what: str) -> None:
        super().__init__()
        self.table, self.what = table, what

    def read(self, stream: Any) -> str:
        if (code := _Str.read(stream)) not in self.table:
            raise cs.ValidationError(f"unknown {self.what} {code!r}")
        return code

    def write(self, obj: str, stream: Any) -> str:
        return _Str.write(obj, stream)  # type: ignore[no-any-return]


class _Sorted(wl.Leaf):
    """Count, then per item a text name and a value of ``value``, names in strictly increasing order: a tuple of
    (name, value) pairs. ``names``: what a failure calls the name and the value (``policy[2].tri``)."""

    def __init__(self, value: wl.Leaf, names: tuple[str, str], limit: int = MAX_ITEMS) -> None:
        super().__init__()
        self.value, self.names, self.count = value, names, wl.VarInt(limit)

    def read(self, stream: Any) -> tuple[tuple[str, Any], ...]:
        items: list[tuple[str, Any]] = []
        sub = None
        try:
            for _ in range(self.count.read(stream)):
                sub = self.names[0]
                name = _Str.read(stream)
                if items and name <= items[-1][0]:
                    raise wl.FieldError(f"malformed body: {sub} {name!r} " + (
                        "given twice" if name == items[-1][0] else "out of order (they are sorted)"))
                sub = self.names[1]
                items.append((name, self.value.read(stream)))
        except Exception as err:
            raise wl.failure(wl.failure(err, sub, stream), None if sub is None else len(items), stream) from None
        return tuple(items)

    def write(self, obj: tuple[tuple[str, Any], ...], stream: Any) -> tuple[tuple[str, Any], ...]:
        self.count.write(len(obj), stream)
        for name, value in obj:
            _Str.write(name, stream)
            self.value.write(value, stream)
        return obj


class _Body(wl.Leaf):
    """The body of a record of type ``rtype`` embedded whole: varint length, then exactly one body of that type
    (its compiled layout; bytes after its last field are an error, as in a frame)."""

    def __init__(self, rtype: int, layouts: dict[int, Any], to_obj: Callable[[object], Any], what: str) -> None:
        super().__init__()
        self.rtype, self.layout, self.to_obj, self.what = rtype, layouts[rtype], to_obj, what

    def read(self, stream: Any) -> Any:
        data = wl.read_exact(stream, _Length.read(stream))
        inner = io.BytesIO(data)
        try:
            value = self.layout.parse_stream(inner)
            if inner.tell() != len(data):
                raise wl.FieldError(f"malformed body: {len(data) - inner.tell()} bytes after the {self.what}'s "
                                    "last field")
        except Exception as err:
            err = wl.failure(err, None, inner)
            err.offset = (err.offset or 0) + stream.tell() - len(data)
            raise err from None
        return value

    def write(self, obj: Any, stream: Any) -> Any:
        typed = self.to_obj(obj)
        if typed is None or typed[0] != self.rtype:
            raise cs.ValidationError(f"expected a {self.what}, not {type(obj).__name__}")
        data = self.layout.build(typed[1])
        _Length.write(len(data), stream)
        stream.write(data)
        return obj


_Mode = _Enum(Mode.STRICT, Mode.LENIENT)
_VmBody = _Body(wire_records.TYPE_VM, wire_records.COMPILED, wire_records.body_obj, "VM report")
_DumpBody = _Body(wire_platform.TYPE_DUMP, wire_platform.COMPILED, wire_platform.body_obj, "host dump")
_Overrides = _Sorted(_Sorted(wl.Choice(("off", "on")), ("property", "value")), ("nic", "properties"))

# ------------------------------------------------------------------------------------------------ offer

_OfferBody = wl.Struct(
    "version" / _Version(exact=True),
    "nonce" / _Nonce(),
    "made_at_ms" / wl.VarInt(MAX_TIME_MS),
    "mode" / _Mode,
    "policy" / _Sorted(_Enum(Tri.OFF, Tri.ON, Tri.AUTO), ("property", "tri")),
    "dest_address" / _Optional(_Str),
    "source" / _VmBody,
    "ext" / _NoExt,
    make=lambda this, parent: Offer(this["source"], this["nonce"], this["made_at_ms"], this["mode"], this["policy"],
                                    this["dest_address"], this["version"]),
)

# ------------------------------------------------------------------------------------------------ answer

_SEVERITIES = (Severity.BLOCKER, Severity.UNKNOWN, Severity.ADJUST, Severity.WARNING, Severity.INFO)
_OUTCOMES = (Outcome.COMPATIBLE, Outcome.ADJUSTABLE, Outcome.BLOCKED, Outcome.UNKNOWN)
_TRUTHS = (Truth.INCOMING, Truth.SCRATCH, Truth.DUMP, Truth.NONE)
# What an answer of each truth carries: (a destination report, a host dump).
_CARRIES = {Truth.INCOMING: (True, False), Truth.SCRATCH: (True, False), Truth.DUMP: (False, True),
            Truth.NONE: (False, False)}

_Finding = wl.Struct(
    "device" / _Str,
    "severity" / _Enum(*_SEVERITIES),
    "code" / _Known(RULES, "finding code"),
    "why" / _Str,
    "feature" / _Optional(_Str),
    "bit" / _Optional(wl.VarInt(0xFFFF)),
    "source" / _Optional(_Str),
    "dest" / _Optional(_Str),
    "negotiated" / _Negotiated(),
    make=lambda this, parent: Finding(**this),
)


def _answer(this: dict[str, Any], parent: Any) -> Answer:
    truth = this["truth"]
    for carries, name, what in zip(_CARRIES[truth], ("dest", "dump"), ("the destination's report", "the host's dump"),
                                   strict=True):
        if (this[name] is not None) != carries:
            raise wl.FieldError(f"invalid record: an answer from {truth.value} "
                                + ("lacks " if carries else "must not carry ") + what, name)
    return Answer(this["nonce"], truth, this["how"], this["outcome"], this["mode"], tuple(this["findings"]),
                  this["adjustments"], this["recommendations"], this["dest"], this["dump"], this["version"])


_AnswerBody = wl.Struct(
    "version" / _Version(exact=True),
    "nonce" / _Nonce(),
    "truth" / _Enum(*_TRUTHS),
    "how" / _Str,
    "outcome" / _Enum(*_OUTCOMES),
    "mode" / _Mode,
    "findings" / wl.Array(wl.VarInt(MAX_FINDINGS), _Finding),
    "adjustments" / _Overrides,
    "recommendations" / _Overrides,
    "dest" / _Optional(_VmBody),
    "dump" / _Optional(_DumpBody),
    "ext" / _NoExt,
    make=_answer,
)

# ------------------------------------------------------------------------------------------------ refusal
# Fixed for every protocol version, so that a side reads the refusal of a newer peer.

_RefusalBody = wl.Struct(
    "version" / _Version(exact=False),
    "code" / _Known(REFUSAL_CODES, "refusal code"),
    "message" / _Str,
    "nonce" / _Optional(_Nonce()),
    "ext" / _NoExt,
    make=lambda this, parent: Refusal(this["code"], this["message"], this["nonce"], this["version"]),
)

# ------------------------------------------------------------------------------------------------ prepare

_PrepareBody = wl.Struct(
    "version" / _Version(exact=True),
    "nonce" / _Nonce(),
    "dest_address" / _Str,
    "ext" / _NoExt,
    make=lambda this, parent: Prepare(this["nonce"], this["dest_address"], this["version"]),
)

COMPILED = {TYPE_OFFER: wl.compile_layout(_OfferBody), TYPE_ANSWER: wl.compile_layout(_AnswerBody),
            TYPE_REFUSAL: wl.compile_layout(_RefusalBody), TYPE_PREPARE: wl.compile_layout(_PrepareBody)}


# ------------------------------------------------------------------------------------------------ encode

_FINDING_FIELDS = ("device", "severity", "code", "why", "feature", "bit", "source", "dest", "negotiated")


def body_obj(record: object) -> tuple[int, dict[str, Any]] | None:
    """The record type and what its compiled layout builds the body from; None for what is not a handshake
    message."""
    if isinstance(record, Offer):
        return TYPE_OFFER, {"version": record.version, "nonce": record.nonce, "made_at_ms": record.made_at_ms,
                            "mode": record.mode, "policy": record.policy, "dest_address": record.dest_address,
                            "source": record.source, "ext": {}}
    if isinstance(record, Answer):
        return TYPE_ANSWER, {
            "version": record.version, "nonce": record.nonce, "truth": record.truth, "how": record.how,
            "outcome": record.outcome, "mode": record.mode,
            "findings": [{name: getattr(f, name) for name in _FINDING_FIELDS} for f in record.findings],
            "adjustments": record.adjustments, "recommendations": record.recommendations, "dest": record.dest,
            "dump": record.dump, "ext": {}}
    if isinstance(record, Refusal):
        return TYPE_REFUSAL, {"version": record.version, "code": record.code, "message": record.message,
                              "nonce": record.nonce, "ext": {}}
    if isinstance(record, Prepare):
        return TYPE_PREPARE, {"version": record.version, "nonce": record.nonce, "dest_address": record.dest_address,
                              "ext": {}}
    return None
