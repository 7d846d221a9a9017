"""The building blocks of the wire format's construct layouts (``wire.py``): checked leaves and lean structure.

Construct's compiled code reads with bare ``io.read(n)`` and does not check short reads, some of its checks are
``assert``s that vanish under ``python -O``, and its documentation says not to feed compiled parsers untrusted
data. So every leaf here checks what it reads (short reads included) and every limit with ``if ...: raise`` in
plain Python; the compiled code calls the leaves (or, for a varint's one-byte case, runs the leaf's own checked
expression) for both parsing and building.

The structure (``Struct``, ``Array``, ``Sized``, and construct's own ``If``) compiles, for parsing, to plain
Python that decodes in one pass with no second parse and no construct ``Container``:

* a ``Struct`` parses to a dict of its fields, or to what its ``make(fields, parent_fields)`` returns, so a record
  is checked and turned into model objects while it is read, and nothing is kept that the result does not need;
* an ``Array`` reads a bounded count then its items; with ``unique=True`` its items are (key, value) pairs, it
  parses to a dict, and a key given twice is refused as soon as it is read;
* any failure becomes one ``FieldError`` carrying the path of the field that failed (``nics[2].qom_path``) and
  the offset where reading stopped; the path is only assembled when something fails.

Building goes through construct's own compiled ``Struct`` builder. These layouts are only used compiled.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import construct as cs

__all__ = ["Array", "BitSet", "Bitmap", "Blob", "Choice", "Extensions", "FieldError", "Leaf", "Sized", "Struct",
           "Text", "Uint", "VarInt", "compile_layout", "read_exact"]

_BYTES = [bytes((i,)) for i in range(256)]


class FieldError(Exception):
    """A parse failure: ``message``, ``path`` (innermost first while it travels up) and ``offset``."""

    def __init__(self, message: str, *field: str | int, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str | int] = list(reversed(field))  # "offers", 3, "backend": offers[3].backend
        self.offset = offset

    @property
    def field(self) -> str | None:
        """The failing field, outermost first: ``hosts[3].offers[1].backend``."""
        out = ""
        for part in reversed(self.path):
            out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
        return out or None


def failure(err: BaseException, field: str | int | None, stream: Any) -> FieldError:
    """``err`` (raised while reading ``field`` from ``stream``) as a ``FieldError`` one level further up."""
    if not isinstance(err, FieldError):
        if isinstance(err, cs.ConstructError):
            message = f"malformed body: {str(err).splitlines()[-1] if str(err) else type(err).__name__}"
        elif isinstance(err, ValueError | TypeError):  # the model refused a value
            message = f"invalid record: {err}"
        else:
            message = f"malformed body: {type(err).__name__}: {err}"
        err = FieldError(message)
    if err.offset is None:
        err.offset = stream.tell()
    if field is not None:
        err.path.append(field)
    return err


def read_exact(stream: Any, n: int) -> bytes:
    data: bytes = stream.read(n)
    if len(data) != n:
        raise cs.StreamError(f"truncated: needed {n} bytes, {len(data)} left")
    return data


# ------------------------------------------------------------------------------------------------ leaves

class Leaf(cs.Construct):  # type: ignore[misc]
    """A leaf with explicit checks; the compiled parser and builder call ``read``/``write`` directly."""

    def read(self, stream: Any) -> Any:
        raise NotImplementedError

    def write(self, obj: Any, stream: Any) -> Any:
        raise NotImplementedError

    def _emitparse(self, code: Any) -> str:  # bound by compile_layout()
        code.linkedinstances[id(self)] = self
        return f"read_{id(self)}(io)"

    def _emitbuild(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        return f"linkedinstances[{id(self)}].write(obj, io)"


class VarInt(Leaf):
    """Unsigned LEB128 of at most ``limit``, minimal encoding only."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.max_bytes = max(1, (limit.bit_length() + 6) // 7)

    def read(self, stream: Any) -> int:
        first: bytes = stream.read(1)
        if first and first[0] < 0x80 and first[0] <= self.limit:  # the common one-byte case
            return first[0]
        return self.rest(first, stream)

    def _emitparse(self, code: Any) -> str:  # read() with its one-byte case inline; rest_ID bound by compile_layout
        code.linkedinstances[id(self)] = self
        small = min(0x80, self.limit + 1)
        return f"(first[0] if (first := io.read(1)) and first[0] < {small} else rest_{id(self)}(first, io))"

    def rest(self, first: bytes, stream: Any) -> int:
        """The slow path of ``read``, given what it read as the first byte."""
        if not first:
            raise cs.StreamError("truncated: needed 1 bytes, 0 left")
        value = first[0] & 0x7F
        byte = first[0]
        index = 0
        while byte & 0x80:
            index += 1
            if index >= self.max_bytes:
                raise cs.ValidationError(f"varint longer than {self.max_bytes} bytes")
            byte = read_exact(stream, 1)[0]
            value |= (byte & 0x7F) << (7 * index)
        if value > self.limit:
            raise cs.ValidationError(f"value {value} over its limit {self.limit}")
        if byte == 0 and index:
            raise cs.ValidationError("varint not minimal")
        return value

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


class Uint(Leaf):
    """Fixed-size big-endian unsigned integer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def read(self, stream: Any) -> int:
        return int.from_bytes(read_exact(stream, self.size), "big")

    def write(self, obj: int, stream: Any) -> int:
        if isinstance(obj, bool) or not isinstance(obj, int) or not 0 <= obj < 1 << (8 * self.size):
            raise cs.ValidationError(f"value {obj!r} does not fit {self.size} bytes")
        stream.write(obj.to_bytes(self.size, "big"))
        return obj


class Blob(Leaf):
    """Varint length (at most ``limit``), then that many bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.length = VarInt(limit)

    def read(self, stream: Any) -> Any:
        first: bytes = stream.read(1)
        size = first[0] if first and first[0] < 0x80 and first[0] <= self.length.limit else \
            self.length.rest(first, stream)
        raw: bytes = stream.read(size)
        if len(raw) != size:
            raise cs.StreamError(f"truncated: needed {size} bytes, {len(raw)} left")
        return self.load(raw)

    def load(self, raw: bytes) -> Any:
        """Check and convert the bytes."""
        return raw

    def dump(self, obj: Any) -> bytes:
        return obj  # type: ignore[no-any-return]

    def write(self, obj: Any, stream: Any) -> Any:
        raw = self.dump(obj)
        self.length.write(len(raw), stream)
        stream.write(raw)
        return obj


class Text(Blob):
    """UTF-8 text; invalid UTF-8 is an error, not a replacement character."""

    def read(self, stream: Any) -> str:  # Blob.read and load in one (the most common leaf)
        first: bytes = stream.read(1)
        size = first[0] if first and first[0] < 0x80 and first[0] <= self.length.limit else \
            self.length.rest(first, stream)
        raw: bytes = stream.read(size)
        if len(raw) != size:
            raise cs.StreamError(f"truncated: needed {size} bytes, {len(raw)} left")
        try:
            return raw.decode()
        except UnicodeDecodeError as err:
            raise cs.ValidationError(f"invalid UTF-8 at byte {err.start}") from None

    def dump(self, obj: str) -> bytes:
        return obj.encode("utf-8")


class Bitmap(Blob):
    """A bitmap of any width: little-endian bytes, minimal (no trailing zero byte)."""

    def load(self, raw: bytes) -> int:
        if raw and raw[-1] == 0:
            raise cs.ValidationError("bitmap has a trailing zero byte (not minimal)")
        return int.from_bytes(raw, "little")

    def dump(self, obj: int) -> bytes:
        return obj.to_bytes((obj.bit_length() + 7) // 8, "little")


class BitSet(Leaf):
    """A varint whose bit *i* stands for ``names[i]``: a sorted tuple of names. A bit without a name is an error."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names, self.value = names, VarInt(0xFFFF)

    def read(self, stream: Any) -> tuple[str, ...]:
        value = self.value.read(stream)
        if value >> len(self.names):
            raise cs.ValidationError(f"bit {value.bit_length() - 1} names nothing (bits 0-{len(self.names) - 1} "
                                     f"are {', '.join(self.names)})")
        return tuple(sorted(name for i, name in enumerate(self.names) if value >> i & 1))

    def write(self, obj: tuple[str, ...], stream: Any) -> tuple[str, ...]:
        self.value.write(sum(1 << self.names.index(name) for name in set(obj)), stream)
        return obj


class Choice(Leaf):
    """One byte: 1 for ``names[0]``, 2 for ``names[1]``, ..."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names

    def read(self, stream: Any) -> str:
        byte = read_exact(stream, 1)[0]
        if not 1 <= byte <= len(self.names):
            raise cs.ValidationError(f"{byte} is not one of " + ", ".join(
                f"{i} ({name})" for i, name in enumerate(self.names, 1)))
        return self.names[byte - 1]

    def write(self, obj: str, stream: Any) -> str:
        stream.write(_BYTES[self.names.index(obj) + 1])
        return obj


class Extensions(Leaf):
    """Count, then per extension: varint tag, varint length, that many bytes of content.

    ``known`` maps a tag to (field name, leaf, default): the content of a known tag is exactly one value of that
    leaf, and is never the field's default (writers leave defaults out). Each tag appears at most once; unknown
    tags are skipped. Parses to a dict of the known fields present; builds from such a dict (None: left out).
    """

    def __init__(self, count: VarInt, length: VarInt, known: dict[int, tuple[str, Leaf, Any]]) -> None:
        super().__init__()
        self.count, self.tag, self.length, self.known = count, VarInt(0xFFFF), length, known

    def read(self, stream: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        seen: set[int] = set()
        for _ in range(self.count.read(stream)):
            tag = self.tag.read(stream)
            if tag in seen:
                raise cs.ValidationError(f"extension tag {tag} given twice")
            seen.add(tag)
            size = self.length.read(stream)
            if tag not in self.known:
                if len(stream.read(size)) != size:  # skipped: read (bounded by the input), not kept
                    raise cs.StreamError(f"truncated: extension tag {tag} needs {size} bytes")
                continue
            name, leaf, default = self.known[tag]
            content = read_exact(stream, size)
            sub = io.BytesIO(content)
            try:
                value = leaf.read(sub)
                if sub.tell() != size:
                    raise cs.ValidationError(f"{size - sub.tell()} bytes after its value")
                if value == default:
                    raise cs.ValidationError(f"holds its default value {default!r}, which writers leave out")
            except cs.ConstructError as err:
                raise FieldError(f"malformed body: extension {name} (tag {tag}): {err}", name,
                                 offset=stream.tell() - size + sub.tell()) from None
            values[name] = value
        return values

    def write(self, obj: dict[str, Any], stream: Any) -> dict[str, Any]:
        present = [(tag, obj[name], leaf) for tag, (name, leaf, default) in sorted(self.known.items())
                   if obj.get(name, default) != default]
        self.count.write(len(present), stream)
        for tag, value, leaf in present:
            content = io.BytesIO()
            leaf.write(value, content)
            self.tag.write(tag, stream)
            self.length.write(len(content.getvalue()), stream)
            stream.write(content.getvalue())
        return obj


# ------------------------------------------------------------------------------------------------ structure

def _only_compiled(self: Any, *args: Any) -> Any:
    raise NotImplementedError(f"{type(self).__name__} parses only compiled (Construct.compile())")


class Struct(cs.Struct):  # type: ignore[misc]
    """construct's ``Struct`` whose compiled parser fills a plain dict (which ``If`` conditions see as ``this``),
    or with ``tuple=True`` a tuple of its fields in order, and hands it to ``make(fields, parent_fields)`` when
    given. Fields see only their own struct's fields; a tuple struct's fields see none."""

    def __init__(self, *subcons: Any, make: Callable[[Any, Any], Any] | None = None, tuple: bool = False) -> None:
        super().__init__(*subcons)
        self.make, self.tuple = make, tuple

    _parse = _only_compiled

    def _emitparse(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        me = f"linkedinstances[{id(self)}]"
        fname = f"parse_record_{code.allocateId()}"
        lines = [f"def {fname}(io, parent):", "    field = None", "    try:"]
        if not self.tuple:
            lines.insert(1, "    this = {}")
        for index, sc in enumerate(self.subcons):
            parse = sc._compileparse(code)
            if self.tuple and "this" in parse:
                raise ValueError(f"field {sc.name} of a tuple Struct refers to other fields")
            lines += [f"        field = {sc.name!r}",
                      f"        {f'value{index}' if self.tuple else f'this[{sc.name!r}]'} = {parse}"]
        fields = f"({''.join(f'value{i}, ' for i in range(len(self.subcons)))})" if self.tuple else "this"
        lines += ["        field = None", f"        return {f'{me}.make({fields}, parent)' if self.make else fields}",
                  "    except Exception as err:", f"        raise {me}.failure(err, field, io) from None"]
        code.append("\n".join(lines))
        return f"{fname}(io, this)"

    failure = staticmethod(failure)


def compile_layout(layout: Any) -> Any:
    """``layout.compile()``, with each leaf's ``read`` bound to a name of the compiled module (no lookups)."""
    compiled = layout.compile()
    for key, instance in compiled.module.linkedinstances.items():
        if isinstance(instance, Leaf):
            setattr(compiled.module, f"read_{key}", instance.read)
        if isinstance(instance, VarInt):
            setattr(compiled.module, f"rest_{key}", instance.rest)
    return compiled


class Array(cs.Subconstruct):  # type: ignore[misc]
    """``count`` items of ``subcon``, like ``PrefixedArray``. Parses to a list; with ``unique``, the items are
    (key, value) pairs and it parses to a dict, refusing a repeated key as soon as it is read."""

    def __init__(self, count: VarInt, subcon: Any, *, unique: bool = False, what: str = "key") -> None:
        super().__init__(subcon)
        self.count, self.unique, self.what = count, unique, what

    _parse = _only_compiled

    def twice(self, key: Any) -> Exception:
        return cs.ValidationError(f"{self.what} {key!r} given twice")  # type: ignore[no-any-return]

    def _emitparse(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        me, item = f"linkedinstances[{id(self)}]", self.subcon
        loop = [f"for index in range({self.count._compileparse(code)}):"]
        if isinstance(item, Struct) and item.tuple and not item.make:  # a plain tuple: read here, no call per item
            for i, sc in enumerate(item.subcons):
                loop += [f"    field = {sc.name!r}", f"    value{i} = {sc._compileparse(code)}"]
            value = f"({''.join(f'value{i}, ' for i in range(len(item.subcons)))})"
            fail = f"{me}.failure(err, field, io)"
        else:
            value, fail = item._compileparse(code), "err"
        if self.unique:
            loop += [f"    key, value = {value}", "    field = None", "    if key in items:",
                     f"        raise {me}.twice(key)", "    items[key] = value"]
        else:
            loop += [f"    items.append({value})"]
        fname = f"parse_array_{code.allocateId()}"
        code.append("\n".join([
            f"def {fname}(io, this):", "    index = field = None", "    try:",
            "        items = {}" if self.unique else "        items = []", *("        " + line for line in loop),
            "        return items", "    except Exception as err:",
            f"        raise {me}.failure({fail}, index, io) from None"]))
        return f"{fname}(io, this)"

    failure = staticmethod(failure)

    def _emitbuild(self, code: Any) -> str:  # from a list of items, ``unique`` or not
        code.linkedinstances[id(self)] = self
        fname = f"build_array_{code.allocateId()}"
        code.append("\n".join([
            f"def {fname}(objs, io, this):",
            f"    linkedinstances[{id(self)}].count.write(len(objs), io)",
            "    for obj in objs:",
            f"        {self.subcon._compilebuild(code)}",
            "    return objs",
        ]))
        return f"{fname}(obj, io, this)"


class Sized(cs.Subconstruct):  # type: ignore[misc]
    """Varint byte length, then ``subcon`` parsed from exactly those bytes (later bytes in it are skipped)."""

    def __init__(self, length: VarInt, subcon: Any) -> None:
        super().__init__(subcon)
        self.length = length

    _parse = _only_compiled

    def nested(self, stream: Any, parse: Callable[[Any], Any]) -> Any:
        data = read_exact(stream, self.length.read(stream))
        inner = io.BytesIO(data)
        try:
            return parse(inner)
        except Exception as err:
            err = failure(err, None, inner)
            err.offset = (err.offset or 0) + stream.tell() - len(data)
            raise err from None

    def nested_build(self, obj: Any, stream: Any, build: Callable[[Any, Any], Any]) -> Any:
        inner = io.BytesIO()
        build(obj, inner)
        data = inner.getvalue()
        self.length.write(len(data), stream)
        stream.write(data)
        return obj

    def _emitparse(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        return f"linkedinstances[{id(self)}].nested(io, lambda io: ({self.subcon._compileparse(code)}))"

    def _emitbuild(self, code: Any) -> str:
        code.linkedinstances[id(self)] = self
        return (f"linkedinstances[{id(self)}].nested_build(obj, io, "
                f"lambda obj, io: ({self.subcon._compilebuild(code)}))")
