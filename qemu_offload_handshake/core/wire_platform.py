"""The bodies of a host dump (type 4) and a cluster baseline (type 5), as compiled construct layouts of the checked
leaves of ``wire_layout`` and a few of this module's own, and the objects the encoder builds (``docs/wire-format.md``).
A dump's machine types are read in one loop with locals: a cluster tool decodes thousands of dumps. Each part is
checked and made into model objects as it is read, and a failure names its field (``machines[1].offers[0].backend``,
``entries[2].removed[1].value``); a baseline's host references are counted before any is made (``MAX_REFS``).
Its runs of hosts are ``wire_runs``'s."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import construct as cs

from . import wire_layout as wl
from . import wire_runs as wr
from .errors import EncodeError
from .features import BY_PROPERTY
from .model import MAX_BITMAP_BITS, MAX_ITEMS, MAX_STRING_BYTES, Tri
from .platform import Baseline, BaselineEntry, BaselineHost, HostDump, MachineOffers, Offer, Unprobed
from .wire_records import MAX_RECORD_BYTES

__all__ = ["COMPILED", "MAX_REFS", "TYPE_BASELINE", "TYPE_DUMP", "body_obj"]

TYPE_DUMP, TYPE_BASELINE = 4, 5
MAX_STRINGS = 1 << 16  # texts in a baseline's string table
MAX_TABLE = 4096  # versions, property tables in a baseline
MAX_REFS = 1 << 20  # host references (hosts, removed, undetermined, missing) in all of a baseline's entries
DUMP_PACKAGE, DUMP_BINARY, DUMP_DEFAULT_MACHINE = 1, 2, 4  # presence bits of a dump's optional fields
UNPROBED_MACHINE, UNPROBED_BACKEND, HOST_PACKAGE = 1, 2, 1  # presence bits: of an unprobed note, of a baseline host
QOM_TYPES = ("bool", "OnOffAuto")  # a catalogue property of one of these types is written in the bitmaps

_Count, _Str, _Bits, _U8 = wl.VarInt(MAX_ITEMS), wl.Text(MAX_STRING_BYTES), wl.Bitmap(MAX_BITMAP_BITS // 8), wl.Uint(1)
_MadeAt = wl.VarInt((1 << 40) - 1)
_NoExt = wl.Extensions(_Count, wl.VarInt(MAX_RECORD_BYTES), {})
_VERSION = ("major", "minor", "micro")
_Version = wl.Struct(*(name / wl.Uint(2) for name in _VERSION), tuple=True)

_BY_NAME = tuple(sorted((name, feature.bit) for name, feature in BY_PROPERTY.items()))
_CATALOGUE = sum(1 << bit for _, bit in _BY_NAME)
_TRIS = (Tri.UNSET, Tri.OFF, Tri.ON, Tri.AUTO)


def _no_bit(bits: int, what: str) -> None:
    if bits:
        raise wl.FieldError(f"malformed body: bit {(bits & -bits).bit_length() - 1} {what}")


# Bitmaps to the model's sorted pairs: dumps share a few, and so the tuples (which the model then checks once).
@functools.lru_cache(maxsize=64)
def _tris(lo: int, hi: int) -> tuple[tuple[str, Tri], ...]:
    both = lo | hi
    return tuple((name, _TRIS[(lo >> bit & 1) | (hi >> bit & 1) << 1]) for name, bit in _BY_NAME if both >> bit & 1)


@functools.lru_cache(maxsize=64)
def _types(present: int, on_off_auto: int) -> tuple[tuple[str, str], ...]:
    return tuple((name, QOM_TYPES[on_off_auto >> bit & 1]) for name, bit in _BY_NAME if present >> bit & 1)


def _bits(stream: Any) -> int:
    """``_Bits.read`` in one call, its one-byte length inline (its leaf checks the others)."""
    size = first[0] if (first := stream.read(1)) and first[0] <= 32 else _Bits.length.rest(first, stream)
    if len(raw := stream.read(size)) != size:
        raise cs.StreamError(f"truncated: needed {size} bytes, {len(raw)} left")
    return _Bits.load(raw) if size and not raw[-1] else int.from_bytes(raw, "little")


def _others(stream: Any, known: tuple[tuple[str, Any], ...], present: int, types: bool) -> tuple[tuple[str, Any], ...]:
    """An "other" list after the catalogue's ``known`` pairs (bitmap ``present``): count, then per property a text
    name and a value (a text type, or a tri-state), names distinct. Returns all the pairs, sorted by name."""
    items: dict[str, Any] = {}
    sub = None
    try:
        for _ in range(_Count.read(stream)):
            sub = "name"
            name = _Str.read(stream)
            sub = "type" if types else "tri"
            value: Any = _Str.read(stream) if types else wl.read_exact(stream, 1)[0]
            if not types and not 1 <= value <= 3:
                raise wl.FieldError(f"malformed body: invalid tri-state {value} (1 off, 2 on, 3 auto)")
            sub = "name"
            feature = BY_PROPERTY.get(name)
            if name in items or (feature is not None and present >> feature.bit & 1):
                raise wl.FieldError(f"malformed body: property {name!r} given twice")
            if feature is not None and (not types or value in QOM_TYPES):
                raise wl.FieldError(f"malformed body: catalogue property {name!r} belongs in the bitmaps")
            items[name] = value if types else _TRIS[value]
    except Exception as err:
        raise wl.failure(wl.failure(err, sub, stream), None if sub is None else len(items), stream) from None
    return tuple(sorted(known + tuple(items.items()))) if items else known


class _Properties(wl.Leaf):
    """Properties and their QOM types: bitmaps present, OnOffAuto (of them; the others bool), the other list."""

    def read(self, stream: Any) -> tuple[tuple[str, str], ...]:
        field = "present"
        try:
            _no_bit((present := _bits(stream)) & ~_CATALOGUE, "has no catalogue property")
            field = "on_off_auto"
            _no_bit((on_off_auto := _bits(stream)) & ~present, "is not a present property")
            field = "other"
            return _others(stream, _types(present, on_off_auto), present, True)
        except Exception as err:
            raise wl.failure(err, field, stream) from None

    def write(self, obj: tuple[tuple[str, str], ...], stream: Any) -> tuple[tuple[str, str], ...]:
        present = on_off_auto = 0
        for name, kind in obj:
            if (feature := BY_PROPERTY.get(name)) is not None and kind in QOM_TYPES:
                present, on_off_auto = present | 1 << feature.bit, on_off_auto | (kind == QOM_TYPES[1]) << feature.bit
        _write_others(present, on_off_auto, [(k, v) for k, v in obj if k not in BY_PROPERTY or v not in QOM_TYPES],
                      _Str, stream)
        return obj


def _write_others(one: int, two: int, others: list[tuple[str, Any]], leaf: Any, stream: Any) -> None:
    for bits in (one, two):
        _Bits.write(bits, stream)
    _Count.write(len(others), stream)
    for name, value in others:
        _Str.write(name, stream)
        leaf.write(value, stream)


class _Machines(wl.Leaf):
    """A dump's machine types and their defaults and offers (``docs/wire-format.md``), read in one loop with locals,
    each field checked as it is read."""

    def read(self, stream: Any) -> tuple[MachineOffers, ...]:
        read, machines, last = stream.read, [], ""
        count = j = field = sub = None
        try:
            for _ in range(count := _Count.read(stream)):
                field, sub, j = "machine", None, None
                if not (name := _Str.read(stream)) or name <= last:
                    raise wl.FieldError(f"malformed body: machine type {name!r} " + ("without a name" if not name else
                                        "given twice" if name == last else "out of order (they are sorted)"))
                last = name
                field, sub = "defaults", "tri_lo"
                _no_bit((lo := _bits(stream)) & ~_CATALOGUE, "has no catalogue property")
                sub = "tri_hi"
                _no_bit((hi := _bits(stream)) & ~_CATALOGUE, "has no catalogue property")
                sub = "other"
                defaults = _others(stream, _tris(lo, hi), lo | hi, False)
                field, sub, offers, kind = "offers", None, [], ""
                for j in range(first[0] if (first := read(1)) and first[0] < 0x80 else _Count.rest(first, stream)):
                    sub = "backend"
                    if (backend := _Str.read(stream)) <= kind and j:
                        raise wl.FieldError(f"malformed body: backend kind {backend!r} " + (
                            "given twice" if backend == kind else "out of order (offers are sorted by kind)"))
                    kind, sub = backend, "offered"
                    offered = _bits(stream)
                    sub = "unknown"
                    if offered & (unknown := _bits(stream)):
                        raise wl.FieldError("invalid record: unknown bits must not be offered bits")
                    sub = "backend"  # what the model may still refuse: the kind's length
                    offers.append(Offer(backend, offered, unknown))
                field = sub = j = None
                machines.append(MachineOffers(name, defaults, tuple(offers)))
        except Exception as err:
            err = wl.failure(wl.failure(wl.failure(err, sub, stream), j, stream), field, stream)
            raise wl.failure(err, None if count is None else len(machines), stream) from None
        return tuple(machines)

    def write(self, obj: tuple[MachineOffers, ...], stream: Any) -> tuple[MachineOffers, ...]:
        _Count.write(len(obj), stream)
        for machine in obj:
            _Str.write(machine.machine, stream)
            lo = hi = 0
            for name, tri in machine.defaults:
                if (feature := BY_PROPERTY.get(name)) is not None:
                    lo, hi = lo | (tri & 1) << feature.bit, hi | (tri >> 1) << feature.bit
            _write_others(lo, hi, [(k, int(v)) for k, v in machine.defaults if k not in BY_PROPERTY], _U8, stream)
            _Count.write(len(machine.offers), stream)
            for offer in machine.offers:
                for leaf, value in ((_Str, offer.backend), (_Bits, offer.offered), (_Bits, offer.unknown)):
                    leaf.write(value, stream)
        return obj


def _dump(this: dict[str, Any], parent: Any) -> HostDump:
    if not this["host"]:
        raise wl.FieldError("invalid record: a dump needs a host name", "host")
    return HostDump(this["host"], this["kernel"], this["version"], this["package"], this["made_at"], this["properties"],
                    this["machines"], tuple(this["unprobed"]), this["binary"], this["default_machine"])


_DumpBody = wl.Struct(
    "present" / wl.VarInt(DUMP_PACKAGE | DUMP_BINARY | DUMP_DEFAULT_MACHINE),
    "host" / _Str, "kernel" / _Str, "version" / _Version, "made_at" / _MadeAt,
    "package" / cs.If(cs.this.present & DUMP_PACKAGE, _Str), "binary" / cs.If(cs.this.present & DUMP_BINARY, _Str),
    "default_machine" / cs.If(cs.this.present & DUMP_DEFAULT_MACHINE, _Str),
    "properties" / _Properties(), "machines" / _Machines(),
    "unprobed" / wl.Array(_Count, wl.Struct(
        "present" / wl.VarInt(UNPROBED_MACHINE | UNPROBED_BACKEND), "machine" / cs.If(cs.this.present & 1, _Str),
        "backend" / cs.If(cs.this.present & 2, _Str), "reason" / _Str,
        make=lambda this, parent: Unprobed(this["machine"], this["backend"], this["reason"]))),
    "ext" / _NoExt,
    make=_dump,
)


# ------------------------------------------------------------------------------------------------ baseline

_Index, _TableIndex = wl.VarInt(MAX_STRINGS - 1), wl.VarInt(MAX_TABLE - 1)


def _pick(table: list[Any], index: int, *field: str | int) -> Any:
    if index >= len(table):
        raise wl.FieldError(f"malformed body: index {index} outside its table of {len(table)}", *field)
    return table[index]


def _host(this: dict[str, Any], tables: dict[str, Any]) -> tuple[str, BaselineHost]:
    if not this["host"]:
        raise wl.FieldError("invalid record: a host without a name", "host")
    strings, age = tables["strings"], this["made_at"]
    if not 0 <= (made_at := tables["made_at"] - (age >> 1 ^ -(age & 1))) < 1 << 40:
        raise wl.FieldError(f"malformed body: made at {made_at}, not Unix seconds", "made_at")
    package = None if this["package"] is None else _pick(strings, this["package"], "package")
    return this["host"], BaselineHost(
        this["host"], _pick(strings, this["kernel"], "kernel"), _pick(tables["versions"], this["version"], "version"),
        package, made_at, _pick(tables["properties"], this["properties"], "properties"))


def _entry(this: dict[str, Any], tables: dict[str, Any]) -> BaselineEntry:
    strings, count = tables["strings"], len(tables["hosts"])
    machine, backend = _pick(strings, this["machine"], "machine"), _pick(strings, this["backend"], "backend")
    if (machine, backend) <= (last := tables.get("last", ("", ""))) and "last" in tables:
        raise wl.FieldError(f"malformed body: entry {machine}/{backend} " + ("given twice" if (machine, backend) == last
                            else "out of order (entries are sorted)"), "backend" if machine == last[0] else "machine")
    tables["last"], offered, union = (machine, backend), this["offered"], this["union"]
    if offered & ~union:
        raise wl.FieldError("invalid record: the union lacks offered bits", "union")
    runs = [this["hosts"], *(group_runs for name in _GROUPS for _, group_runs in this[name])]
    tables["refs"] = refs = tables.get("refs", 0) + sum(len(part) // 2 + sum(part[1::2]) for part in runs)
    if refs > MAX_REFS:  # counted before any run is made into hosts
        raise wl.FieldError(f"malformed body: more than {MAX_REFS} host references in the entries", "hosts")
    everyone = tables.get("everyone") or tables.setdefault("everyone", tuple(range(count)))
    hosts = wr.members(this["hosts"], everyone, None, True, "", "hosts")

    def pairs(name: str, within: tuple[int, ...], inside: bool, what: str, make: Any) -> tuple[tuple[int, Any], ...]:
        out: list[tuple[int, Any]] = []
        for i, (value, group_runs) in enumerate(this[name]):
            if i and value <= this[name][i - 1][0]:
                raise wl.FieldError("malformed body: groups not in increasing order of their value", name, i, "value")
            if not (members := wr.members(group_runs, everyone, within, inside, what, name, i, "hosts")):
                raise wl.FieldError("malformed body: a group without hosts", name, i, "hosts")
            out += make(members, value, (name, i))
        out.sort(key=lambda pair: pair[0])  # (in order already when there is one group)
        if len(dict(out)) != len(out):
            raise wl.FieldError("malformed body: a host is in two groups", name)
        return tuple(out)

    def checked(bits: int, of: int, where: tuple[str, int]) -> int:
        if not bits or bits & ~of:
            raise wl.FieldError(f"invalid record: {where[0]} bits must be " + ("in union and not in offered" if
                                where[0] == "removed" else "removed bits of the host"), *where, "value")
        return bits

    ref = union & ~offered  # what some host removed: a host's removed bits XOR this
    removed = pairs("removed", hosts, True, "in the entry", lambda members, xor, where: zip(
        members, itertools.repeat(checked(ref ^ xor, ref, where)), strict=False))
    of = dict(removed)
    undetermined = pairs("undetermined", tuple(of), True, "hosts that removed bits", lambda members, xor, where: [
        (host, checked(of[host] ^ xor, of[host], where)) for host in members])
    missing = pairs("missing", hosts, False, "in the entry", lambda members, index, where: zip(
        members, itertools.repeat(_pick(strings, index, *where, "value")), strict=False))
    return BaselineEntry(machine, backend, offered, union, hosts, removed, undetermined, missing,
                         this["defaults_on"], this["defaults_off"])


def _baseline(this: dict[str, Any], parent: Any) -> Baseline:
    if not this["hosts"]:
        raise wl.FieldError("invalid record: a baseline needs at least one host", "hosts")
    return Baseline(this["made_at"], tuple(this["hosts"].values()), tuple(this["entries"]))


_GROUPS = ("removed", "undetermined", "missing")  # per group: a value and the runs of hosts that have it

_BaselineBody = wl.Struct(
    "made_at" / _MadeAt,
    "strings" / wl.Array(wl.VarInt(MAX_STRINGS), _Str),
    "versions" / wl.Array(wl.VarInt(MAX_TABLE), _Version),
    "properties" / wl.Array(wl.VarInt(MAX_TABLE), _Properties()),
    "hosts" / wl.Array(wr.HostCount, wl.Struct(
        "present" / wl.VarInt(HOST_PACKAGE), "host" / _Str, "kernel" / _Index, "version" / _TableIndex,
        "package" / cs.If(cs.this.present & HOST_PACKAGE, _Index),
        "made_at" / wl.VarInt((1 << 41) - 1),  # zigzag of (the baseline's made at - the host's)
        "properties" / _TableIndex, make=_host), unique=True, what="host"),
    "entries" / wl.Array(wr.HostCount, wl.Struct(
        "machine" / _Index, "backend" / _Index, "offered" / _Bits, "union" / _Bits, "defaults_on" / _Bits,
        "defaults_off" / _Bits, "hosts" / wr.Runs(),
        *(name / wl.Array(wr.HostCount, wl.Struct("value" / leaf, "hosts" / wr.Runs(), tuple=True))
          for name, leaf in zip(_GROUPS, (_Bits, _Bits, _Index), strict=True)), make=_entry)),
    "ext" / _NoExt,
    make=_baseline,
)

COMPILED = {TYPE_DUMP: wl.compile_layout(_DumpBody), TYPE_BASELINE: wl.compile_layout(_BaselineBody)}


# ------------------------------------------------------------------------------------------------ encode

def _dump_obj(dump: HostDump) -> dict[str, Any]:
    present = (dump.package is not None) | (dump.binary is not None) << 1 | (dump.default_machine is not None) << 2
    return {"present": present, "host": dump.host, "kernel": dump.kernel, "made_at": dump.made_at,
            "version": dict(zip(_VERSION, dump.qemu_version, strict=True)), "package": dump.package,
            "binary": dump.binary, "default_machine": dump.default_machine, "properties": dump.properties,
            "machines": dump.machines,
            "unprobed": [{"present": (u.machine is not None) | (u.backend is not None) << 1, "machine": u.machine,
                          "backend": u.backend, "reason": u.reason} for u in dump.unprobed], "ext": {}}


def _index(table: dict[Any, int], item: Any) -> int:
    return table.setdefault(item, len(table))


def _baseline_obj(record: Baseline) -> dict[str, Any]:
    if sum(len(e.hosts) + len(e.removed) + len(e.undetermined) + len(e.missing) for e in record.entries) > MAX_REFS:
        raise EncodeError(f"a baseline's entries name hosts more than {MAX_REFS} times, which a reader refuses")
    strings, versions, tables = dict[Any, int](), dict[Any, int](), dict[Any, int]()  # item -> index, in order
    hosts = []
    for host in record.hosts:
        age = record.made_at - host.made_at
        hosts.append({"present": HOST_PACKAGE if host.package is not None else 0, "host": host.host,
                      "kernel": _index(strings, host.kernel), "version": _index(versions, host.qemu_version),
                      "package": None if host.package is None else _index(strings, host.package),
                      "made_at": 2 * age if age >= 0 else -2 * age - 1, "properties": _index(tables, host.properties)})
    entries = []
    for e in record.entries:
        ref, removed = e.union & ~e.offered, dict(e.removed)
        entries.append({"machine": _index(strings, e.machine), "backend": _index(strings, e.backend),
                        "offered": e.offered, "union": e.union, "defaults_on": e.defaults_on,
                        "defaults_off": e.defaults_off, "hosts": wr.runs(e.hosts),
                        "removed": wr.grouped(e.removed, lambda host, bits, ref=ref: bits ^ ref),
                        "undetermined": wr.grouped(e.undetermined, lambda host, bits, of=removed: bits ^ of[host]),
                        "missing": wr.grouped(e.missing, lambda host, reason: _index(strings, reason))})
    return {"made_at": record.made_at, "strings": list(strings), "properties": list(tables), "hosts": hosts,
            "versions": [dict(zip(_VERSION, v, strict=True)) for v in versions], "entries": entries, "ext": {}}


def body_obj(record: object) -> tuple[int, dict[str, Any]] | None:
    """The record type and what its compiled layout builds the body from; None for what is not a platform record."""
    return (TYPE_DUMP, _dump_obj(record)) if isinstance(record, HostDump) else (
        (TYPE_BASELINE, _baseline_obj(record)) if isinstance(record, Baseline) else None)
