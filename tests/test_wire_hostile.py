"""Hostile wire input: the worst records we could build decode or fail in one pass, in bounded memory.

The builders here write bodies byte by byte (the encoder refuses what they contain). ``benchmarks/bench_wire.py``
imports them to measure decode time and peak memory of each against a valid capability set of the same size;
these tests check behaviour only (the error and the field it names, one pass, memory), never wall-clock time.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from qemu_offload_handshake import CapabilitySet, DecodeError, HostCapabilities, decode, encode
from qemu_offload_handshake.core.features import BY_PROPERTY
from qemu_offload_handshake.core.wire import MAX_RECORD_BYTES

MIB = 1 << 20
OFFERED = 0x1C0010179BFFFE7
WIDE = (1 << 255) | OFFERED  # the widest bitmap the format allows: every XOR against it is a new 256-bit int


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def text(value: str) -> bytes:
    raw = value.encode()
    return varint(len(raw)) + raw


def bitmap(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "little")
    return varint(len(raw)) + raw


def name(i: int) -> bytes:
    """The i-th of the shortest distinct host names, as text: 128 of one byte, then 18,304 of two (one two-byte
    character, then two ASCII characters), then three ASCII characters."""
    if i < 128:
        return text(chr(i))
    if (i := i - 128) < 1920:
        return text(chr(0x80 + i))
    if (i := i - 1920) < 16384:
        return text(chr(i >> 7) + chr(i & 0x7F))
    i -= 16384
    return text(chr(i >> 14) + chr(i >> 7 & 0x7F) + chr(i & 0x7F))


def named(hosts: int, rest: bytes, present: int = 0) -> list[bytes]:
    """``hosts`` set entries: present, a name of ``name()``, then ``rest`` (the other fields)."""
    return [varint(present) + name(i) + rest for i in range(hosts)]


def frame(body: bytes, rtype: int) -> bytes:
    head = b"QOHS" + bytes([1, 1, rtype, 0]) + len(body).to_bytes(4, "big")
    return head + body + zlib.crc32(head + body).to_bytes(4, "big")


def broken_last(body: bytes) -> bytes:
    """The body with its last byte (the extension count, 0) claiming one extension that is not there."""
    assert body[-1] == 0
    return body[:-1] + b"\x01"


# ------------------------------------------------------------------------------------------------ valid input

def valid_set(size: int) -> bytes:
    """A realistic cluster dump of about ``size`` bytes: a few QEMU builds and machine types, tap/user/vhost-user
    offers that differ from host to host by a few bits."""
    def hosts(count: int) -> tuple[HostCapabilities, ...]:
        return tuple(HostCapabilities(
            f"compute-{i:05d}.rack-{i % 64:02d}.example.net", (10, 0, 2 + i % 3),
            f"Debian 1:10.0.{2 + i % 3}+ds-2+deb13u1~bpo12+1", ("pc-q35-10.0", "pc-q35-7.2")[i % 2],
            tuple((kind, OFFERED ^ ((i * 2654435761 >> (3 * j)) & 0xF) << 50)
                  for j, kind in enumerate(("tap", "user", "vhost-user")))) for i in range(count))
    per_host = len(encode(CapabilitySet(hosts(200)))) / 200
    count = min(20_000, int(size / per_host))
    while len(data := encode(CapabilitySet(hosts(count)))) > min(size, MAX_RECORD_BYTES):
        count -= max(1, count // 100)
    return data


# ------------------------------------------------------------------------------------------------ hostile input

def set_body(strings: list[str], refs: list[tuple[int, int]], hosts: list[bytes], versions: int = 0) -> bytes:
    return (varint(len(strings)) + b"".join(map(text, strings)) + varint(versions) + b"\x00\x0a\x00\x00\x00\x02" *
            versions + varint(len(refs)) + b"".join(varint(k) + bitmap(b) for k, b in refs)
            + varint(len(hosts)) + b"".join(hosts) + b"\x00")


def fill(size: int, build: Callable[[int], bytes], limit: int) -> bytes:
    """``build(count)`` with the largest count (at most ``limit``) whose record fits ``size`` (and the format)."""
    size = min(size, MAX_RECORD_BYTES + 16)
    one, two = len(build(1)), len(build(2))
    count = max(1, min(limit, 1 + (size - one) // max(1, two - one)))
    while count > 1 and len(build(count)) > size:
        count -= max(1, count // 64)
    return build(count)


# Sorted, one-byte indexes, and as costly as kinds get: the longest (64 bytes), non-ASCII (their size is looked up)
# and alike but for their last character (comparing two in order reads them to the end).
KINDS = ["k" * 61 + chr(0x4E00 + i) for i in range(128)]
WIDE_REFS = [(i, WIDE) for i in range(128)]


def set_duplicate_kinds(size: int) -> bytes:
    """Every host offers the same backend kind 256 times."""
    return fill(size, lambda n: frame(set_body(["tap"], [(0, OFFERED)], named(n, varint(256) + b"\x00\x00" * 256)),
                                      3), 20_000)


def set_duplicate_refs(size: int) -> bytes:
    """256 references for the same kind, then as many hosts as fit."""
    return fill(size, lambda n: frame(set_body(["tap"], [(0, WIDE)] * 256, named(n, b"\x01\x00\x00")), 3), 20_000)


def set_duplicate_hosts(size: int) -> bytes:
    """The most hosts (20,000), each named "h" and nothing else."""
    return fill(size, lambda n: frame(set_body([], [], [b"\x00" + text("h") + b"\x00"] * n), 3), 20_000)


def set_dense_offers(size: int) -> bytes:
    """Hosts offering 128 kinds each, 2 bytes per offer (XOR 0), all valid until the last byte."""
    offers = varint(128) + b"".join(bytes((i, 0)) for i in range(128))
    return fill(size, lambda n: frame(broken_last(set_body(KINDS, WIDE_REFS, named(n, offers))), 3), 20_000)


def set_dense_distinct_offers(size: int) -> bytes:
    """As ``set_dense_offers`` with a one-byte XOR against a 256-bit reference: 3 bytes per new 256-bit int."""
    hosts = [b"\x00" + name(h) + varint(128) + b"".join(bytes((i, 1, 1 + (h + i) % 255)) for i in range(128))
             for h in range(min(20_000, size // 388 + 2))]
    return fill(size, lambda n: frame(broken_last(set_body(KINDS, WIDE_REFS, hosts[:n])), 3), len(hosts))


def set_tiny_hosts(size: int) -> bytes:
    """The most hosts (20,000), each as small as a host with a version, package, machine and an offer gets."""
    rest = b"\x00\x01\x01\x01\x00\x00"  # version 0, package 1, machine 1, 1 offer: tap, XOR 0
    return fill(size, lambda n: frame(broken_last(set_body(["tap", "q35"], [(0, OFFERED)], named(n, rest, 7),
                                                           versions=1)), 3), 20_000)


def set_long_kinds(size: int) -> bytes:
    """Dense offers of 64 kinds of 1 KiB, alike but for their last character (before kinds were bounded to 64
    bytes, checking that each host's offers are in order compared them to their end: 13x at 1 MiB)."""
    kinds = ["k" * 1020 + chr(0x4E00 + i) for i in range(64)]
    offers = varint(64) + b"".join(bytes((i, 0)) for i in range(64))
    return fill(size, lambda n: frame(set_body(kinds, [(i, OFFERED) for i in range(64)], named(n, offers)), 3),
                20_000)


def set_wide_strings(size: int) -> bytes:
    """The most hosts, each with a name, a package and a machine type: texts of 1 KiB of non-ASCII characters
    (measuring one encodes it) that every host shares."""
    strings = ["\u4e2d" * 341, "\u00e9" * 512]
    return fill(size, lambda n: frame(broken_last(set_body(strings, [], named(n, b"\x00\x01\x00", 6))), 3), 20_000)


def set_alternating_strings(size: int) -> bytes:
    """As ``set_wide_strings`` with 65 short packages and machine types taken in turn: more than the model keeps
    measured (64), so each is measured again."""
    strings = [chr(0x100 + i) + "\u00e9" * 7 for i in range(65)]
    return fill(size, lambda n: frame(broken_last(set_body(strings, [], [
        varint(6) + name(i) + varint(i % 65) + varint((i + 32) % 65) + b"\x00" for i in range(n)])), 3), 20_000)


def set_empty_hosts(size: int) -> bytes:
    """The most hosts (20,000), each with the shortest distinct name and nothing else (5.2 bytes a host)."""
    return fill(size, lambda n: frame(broken_last(set_body([], [], named(n, b"\x00"))), 3), 20_000)


def set_big_tables(size: int) -> bytes:
    """4096 distinct strings and 4096 versions (about half the size), then hosts whose indexes all take two-byte
    varints: offers of the last 128 strings (backend kinds, so at most 64 bytes)."""
    length = max(4, min(1024, (min(size, MAX_RECORD_BYTES) // 2 - 4096 * 6) // 4096 - 2))
    strings = [f"{i:04d}".ljust(length if i < 4096 - 128 else min(length, 64), "s") for i in range(4096)]
    refs = [(i, WIDE) for i in range(4096 - 128, 4096)]
    rest = varint(4095) * 3 + varint(128) + b"".join(varint(k) + b"\x00" for k, _ in refs)
    return fill(size, lambda n: frame(broken_last(set_body(strings, refs, named(n, rest, 7), versions=4096)), 3),
                20_000)


def nic(index: int, tail: bytes) -> bytes:
    body = b"\x00" + text(f"n{index}") + text("") + b"\x00\x00" + tail
    return varint(len(body)) + body


def vm(size: int, tail: bytes) -> bytes:
    """As many NICs (at most 256) as fit, each ending with ``tail``; the last byte broken."""
    def build(count: int) -> bytes:
        return frame(broken_last(b"\x00" + text("h") + varint(count) + b"".join(nic(i, tail) for i in range(count))
                                 + b"\x00\x00"), 1)
    return fill(size, build, 256)


def vm_many_properties(size: int) -> bytes:
    """256 NICs x 256 distinct properties with one-character, two-byte names: every name a new string."""
    return vm(size, varint(256) + b"".join(text(chr(0x100 + i)) + b"\x01" for i in range(256)) + b"\x00\x00")


def vm_many_notes(size: int) -> bytes:
    """256 NICs x 256 unreadable notes of one three-byte character each: every note a new string."""
    return vm(size, b"\x00" + varint(256) + b"".join(text(chr(0x4E00 + i)) for i in range(256)) + b"\x00")


def vm_many_extensions(size: int) -> bytes:
    """256 NICs x 256 unknown, empty NIC extensions (tags 300..555, two-byte varints)."""
    return vm(size, b"\x00\x00" + varint(256) + b"".join(varint(300 + t) + b"\x00" for t in range(256)))


def vm_every_property_and_bitmap(size: int) -> bytes:
    """256 NICs, each with every optional field, 256-bit bitmaps and every catalogue property set to auto."""
    tri = 0
    for feature in BY_PROPERTY.values():
        tri |= 1 << feature.bit
    fields = (text("/p") + text("hostnet0") + text("tap") + bitmap(WIDE) + bitmap(WIDE) + b"\x0f" + bitmap(WIDE)
              + b"\x01" + bitmap(tri) + bitmap(tri) + b"\x00\x00\x00")

    def build(count: int) -> bytes:
        nics = [b"\x7f" + text(f"n{i}") + fields for i in range(count)]
        return frame(broken_last(b"\x00" + text("h") + varint(count) + b"".join(varint(len(n)) + n for n in nics)
                                 + b"\x00\x00"), 1)
    return fill(size, build, 256)


HOSTILE: dict[str, Callable[[int], bytes]] = {
    "set: a kind given twice in every host": set_duplicate_kinds,
    "set: a reference given twice": set_duplicate_refs,
    "set: dense offers of 1 KiB kinds": set_long_kinds,
    "set: every host named like the first": set_duplicate_hosts,
    "set: dense offers, last byte broken": set_dense_offers,
    "set: dense distinct 256-bit offers, last byte broken": set_dense_distinct_offers,
    "set: 20,000 tiny hosts, last byte broken": set_tiny_hosts,
    "set: 20,000 hosts with only a name, last byte broken": set_empty_hosts,
    "set: 20,000 hosts sharing 1 KiB non-ASCII texts, broken": set_wide_strings,
    "set: 20,000 hosts, 65 alternating texts, last byte broken": set_alternating_strings,
    "set: full tables, two-byte indexes, last byte broken": set_big_tables,
    "vm: 256 x 256 properties, last byte broken": vm_many_properties,
    "vm: 256 x 256 notes, last byte broken": vm_many_notes,
    "vm: 256 x 256 unknown extensions, last byte broken": vm_many_extensions,
    "vm: 256 full NICs, last byte broken": vm_every_property_and_bitmap,
}

# Refused as soon as the culprit is read (the field, and the offset it is read by: within 2 KiB, or after the
# kinds' strings table), naming it; the others fail at their last byte.
EARLY = {
    "set: a kind given twice in every host": ("hosts[0].offers[1].backend", 2048),
    "set: a reference given twice": ("refs[1]", 2048),
    "set: dense offers of 1 KiB kinds": ("refs[0].backend", 64 * 1024 + 2048),
    "set: every host named like the first": ("hosts[1].host", 2048),
}
def valid_twin(data: bytes) -> bytes:
    """The record a ``broken_last`` input was made from: the same bytes with its last body byte restored."""
    body = data[12:-5] + b"\x00"
    return frame(body, data[6])


def peak_memory(fn: Callable[[], Any]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def refuse(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as caught:
        decode(data)
    return caught.value


# ------------------------------------------------------------------------------------------------ tests

SIZE = 96 * 1024  # small enough for a quick test; the benchmark runs the same builders at 1 MiB


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_fails_naming_the_field(name: str) -> None:
    data = HOSTILE[name](SIZE)
    assert len(data) <= SIZE
    err = refuse(data)
    assert err.offset is not None
    if name in EARLY:
        field, before = EARLY[name]
        assert (err.field, err.offset < before) == (field, True), str(err)
    else:
        assert (err.field, err.offset) == ("ext", len(data) - 4), str(err)
        decode(valid_twin(data))  # valid up to that byte


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_memory_is_bounded_by_valid_input_of_the_same_size(name: str) -> None:
    data = HOSTILE[name](SIZE)
    valid = valid_set(len(data))
    assert len(valid) > 0.9 * len(data)
    assert isinstance(decode(valid), CapabilitySet)
    hostile_peak = peak_memory(lambda: refuse(data))
    valid_peak = peak_memory(lambda: decode(valid))
    assert hostile_peak <= 5 * valid_peak, (hostile_peak, valid_peak)
    if name not in EARLY:  # failing at the last byte costs no more than decoding the valid record it came from
        twin_peak = peak_memory(lambda: decode(valid_twin(data)))
        assert hostile_peak <= 1.1 * twin_peak + 64 * 1024, (hostile_peak, twin_peak)


def test_one_pass_a_broken_last_byte_costs_no_more_work_than_the_valid_record() -> None:
    """Count the Python function calls of decoding: a record broken at its last byte is read once, as far as
    the valid one (the interpreted re-parse that named fields used to double the work)."""
    body = set_body(KINDS[:3], [(0, 1), (1, 2), (2, 3)],
                    [b"\x00" + text(f"h{i}") + b"\x03\x00\x00\x01\x00\x02\x00" for i in range(300)])
    valid, broken = frame(body, 3), frame(broken_last(body), 3)
    calls = []
    for data in (valid, broken):
        count = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal count
            count += event == "call"
        sys.setprofile(profile)
        try:
            decode(data)
        except DecodeError:
            pass
        finally:
            sys.setprofile(None)
        calls.append(count)
    assert calls[1] <= calls[0] + 20, calls  # the error path adds a few calls, not a second pass


def test_trailing_bytes_after_the_body_and_after_the_frame_are_errors() -> None:
    body = set_body(["tap"], [(0, 1)], [b"\x00" + text("h") + b"\x01\x00\x00"])
    assert decode(frame(body, 3)) == CapabilitySet((HostCapabilities("h", None, None, None, (("tap", 1),)),))
    err = refuse(frame(body + b"\x00", 3))
    assert "1 bytes after its last field" in str(err) and err.offset == 12 + len(body)
    err = refuse(frame(body, 3) + b"\x00")
    assert "trailing bytes" in str(err)


@pytest.mark.parametrize(("body", "field"), [
    (set_body(["tap"], [(0, 1)], named(6, b"\x01\x00\x00")[:5] + named(6, b"\x01\x07\x00")[5:]),
     "hosts[5].offers[0].backend"),
    (set_body(["b", "a"], [(0, 1), (1, 1)], named(1, b"\x02\x00\x00\x01\x00")), "hosts[0].offers[1].backend"),
    (set_body(["tap", "user"], [(0, 1)], named(1, b"\x01\x01\x00")), "hosts[0].offers[0].backend"),
    (set_body(["tap"], [(0, 1)], named(1, b"\x00\x01\x00\x00", 1)), "hosts[0].version"),
    (set_body(["tap"], [(0, 1)], named(3, b"\x00") + named(2, b"\x00")), "hosts[3].host"),  # named twice
    (set_body(["tap"], [(0, 1)], [*named(2, b"\x00"), b"\x00\x00\x00"]), "hosts[2].host"),  # no name
    (set_body(["tap"], [(0, 1)], [b"\x00\x02\xc3\x28\x01\x00\x00"]), "hosts[0].host"),
    (set_body(["tap"], [(3, 1)], []), "refs[0].backend"),
])
def test_set_errors_name_the_host_and_offer(body: bytes, field: str) -> None:
    assert refuse(frame(body, 3)).field == field
