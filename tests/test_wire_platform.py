"""The wire format of the platform records (1.2): a host dump (type 4) and a baseline (type 5).

Golden vectors written by hand from docs/wire-format.md, round trips (bits above 63, undetermined bits, OnOffAuto
and unknown properties, partial unprobed notes, empty dumps, a 20,000-host baseline), HMAC, and hostile input:
every way of breaking a record must give a ``DecodeError`` that names the field, never another exception.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire_hostile import varint

from qemu_offload_handshake import (
    AuthenticationError,
    DecodeError,
    EncodeError,
    UnsupportedVersionError,
    decode,
    encode,
)
from qemu_offload_handshake.core.features import BY_PROPERTY
from qemu_offload_handshake.core.model import Tri
from qemu_offload_handshake.core.platform import (
    Baseline,
    BaselineEntry,
    BaselineHost,
    HostDump,
    MachineOffers,
    Offer,
    Unprobed,
)
from qemu_offload_handshake.core.wire import FORMAT_MINOR, MAX_RECORD_BYTES
from qemu_offload_handshake.core.wire_platform import MAX_REFS, MAX_STRINGS

KEY = b"cluster-secret"
OFFERED = 0x1C0010179BFFFE7  # QEMU 10.0's tap offer on q35, with the USO bits 54-56
USO = 0b111 << 54
TUNNEL = 0b1111 << 65  # QEMU 10.2's UDP tunnel bits


def frame(body_hex: str, *, rtype: int = 4, major: int = 1, minor: int = 3) -> bytes:
    """A frame around a hand-written body (CRC from zlib, not from the encoder)."""
    body = bytes.fromhex(body_hex)
    head = b"QOHS" + bytes([major, minor, rtype, 0]) + len(body).to_bytes(4, "big")
    return head + body + zlib.crc32(head + body).to_bytes(4, "big")


def reframe(data: bytes, *, rtype: int | None = None, body: bytes | None = None) -> bytes:
    """``data`` (unsigned) with another type byte or body, and a length and CRC that fit, so the parser meets it."""
    head = bytearray(data[:12])
    body = data[12:-4] if body is None else body
    head[6] = head[6] if rtype is None else rtype
    head[8:12] = len(body).to_bytes(4, "big")
    return bytes(head) + body + zlib.crc32(bytes(head) + body).to_bytes(4, "big")


# ------------------------------------------------------------------------------------------------ golden vectors

OFFER_TAP = "03746170" "06e7ffbf790101" "080000000000000001"  # "tap", offered 0x10179bfffe7, unknown bit 56
MACHINE_Q35 = ("03713335" "0700000000000040" "0101" "00"  # "q35"; tri lo bit 54, tri hi bit 0; no others
               "01" + OFFER_TAP)
DUMP = {  # the parts of the example body of docs/wire-format.md, in order
    "present": "00", "host": "0168", "kernel": "03362e31", "version": "000a00000002", "made_at": "80e2cfaa06",
    "properties": "08" "0100000000000001" "08" "0000000000000001" "01" "05782d666f6f" "03737472",
    "machines": "01" + MACHINE_Q35,
    "unprobed": "01" "02" "0475736572" "0178",  # backend "user", reason "x"
    "ext": "00",
}
GOLDEN_DUMP = HostDump(
    "h", "6.1", (10, 0, 2), None, 1_700_000_000,
    properties=(("csum", "bool"), ("host_uso", "OnOffAuto"), ("x-foo", "str")),
    machines=(MachineOffers("q35", (("csum", Tri.ON), ("guest_uso4", Tri.OFF)),
                            (Offer("tap", 0x10179BFFFE7, 1 << 56),)),),
    unprobed=(Unprobed(None, "user", "x"),))

BASELINE = {
    "made_at": "80e2cfaa06",
    "strings": "04" "03362e31" "03713335" "03746170" "066e6f20746170",  # "6.1", "q35", "tap", "no tap"
    "versions": "01" "000a00000002",
    "properties": "01" "0101" "00" "00",  # one table: csum (bool)
    "hosts": "03" "00016100" "00" "c801" "00"  # a: kernel 0, version 0, made 100 s earlier, table 0
             "0001620000" "00" "00"  # b: made at the same time
             "0001630000" "01" "00",  # c: made 1 s later
    "entries": "01" "01" "02" "010f" "013f"  # q35/tap, offered 0x0f, union 0x3f
               "0101" "00"  # defaults: csum (bit 0) on on some host, nothing off
               "01" "0001"  # hosts: one run from host 0, 2 long
               "01" "00" "010100"  # removed: XOR 0 (0x30) for one run from host 1, 1 long
               "01" "0120" "010100"  # undetermined: XOR 0x20 against b's removed bits: 0x10
               "01" "03" "010200",  # missing: "no tap" for one run from host 2, 1 long
    "ext": "00",
}
GOLDEN_BASELINE = Baseline(1_700_000_000, (
    BaselineHost("a", "6.1", (10, 0, 2), None, 1_699_999_900, (("csum", "bool"),)),
    BaselineHost("b", "6.1", (10, 0, 2), None, 1_700_000_000, (("csum", "bool"),)),
    BaselineHost("c", "6.1", (10, 0, 2), None, 1_700_000_001, (("csum", "bool"),))),
    (BaselineEntry("q35", "tap", 0x0F, 0x3F, (0, 1), removed=((1, 0x30),), undetermined=((1, 0x10),),
                   missing=((2, "no tap"),), defaults_on=0x01),))


def dump_with(**parts: str) -> bytes:
    return frame("".join(parts.get(name, value) for name, value in DUMP.items()))


def baseline_with(**parts: str) -> bytes:
    return frame("".join(parts.get(name, value) for name, value in BASELINE.items()), rtype=5)


def test_golden_dump_from_the_spec_document() -> None:
    assert FORMAT_MINOR == 3
    assert decode(dump_with()) == GOLDEN_DUMP
    assert encode(GOLDEN_DUMP) == dump_with()


def test_golden_baseline_from_the_spec_document() -> None:
    assert decode(baseline_with()) == GOLDEN_BASELINE
    assert encode(GOLDEN_BASELINE) == baseline_with()


def test_any_minor_of_major_1_reads_a_dump_and_another_major_is_refused() -> None:
    body = "".join(DUMP.values())
    for minor in (0, 1, 2, 9):
        assert decode(frame(body, minor=minor)) == GOLDEN_DUMP
    with pytest.raises(UnsupportedVersionError, match=r"unsupported version 2\.3") as caught:
        decode(frame(body, major=2))
    assert caught.value.field == "version"


def test_a_later_minor_s_extensions_are_skipped() -> None:
    assert decode(dump_with(ext="02" "0702abcd" "ac0200")) == GOLDEN_DUMP  # unknown tags 7 and 300
    assert decode(baseline_with(ext="01" "0100")) == GOLDEN_BASELINE


# ------------------------------------------------------------------------------------------------ round trips

CATALOGUE = sorted(BY_PROPERTY)
PROPERTIES = tuple((name, "OnOffAuto" if name.endswith("uso") else "bool") for name in CATALOGUE)
DEFAULTS = tuple((name, Tri.ON if feature.default else Tri.OFF) for name, feature in sorted(BY_PROPERTY.items()))
DEFAULTS_ON = sum(1 << f.bit for f in BY_PROPERTY.values() if f.default)  # a baseline entry's, as DEFAULTS
DEFAULTS_OFF = sum(1 << f.bit for f in BY_PROPERTY.values() if not f.default) | 1 << 54  # a host disagrees on bit 54


def typical_dump(i: int = 0, *, made_at: int = 1_760_000_000) -> HostDump:
    """What a 10.0 host dumps: every catalogue property, two machine types, three backends, two notes."""
    offers = (Offer("tap", OFFERED), Offer("tap-vhost", OFFERED & ~USO), Offer("user", 0x1017022FFE0))
    machines = tuple(MachineOffers(m, DEFAULTS, offers) for m in ("pc-i440fx-10.0", "pc-q35-10.0"))
    return HostDump(f"compute-{i:05d}.example.net", "6.12.48+deb13-amd64", (10, 0, 2),
                    "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1", made_at + i, PROPERTIES, machines,
                    (Unprobed(None, "vhost-user", "no vhost-user backend on this host"),
                     Unprobed("pc-q35-7.2", None, "machine type not in this QEMU")),
                    "/usr/bin/qemu-system-x86_64", "pc-q35-10.0")


UNUSUAL = [
    HostDump("h", "", (0, 0, 0), None, 0),  # nothing but the required fields
    HostDump("h", "k", (65535, 65535, 65535), "", (1 << 40) - 1, machines=(MachineOffers("q35"),)),  # empty machine
    HostDump("h", "k", (11, 1, 3), None, 1, tuple(sorted((*PROPERTIES, ("x-new", "bool"), ("a", "uint32")))),
             (MachineOffers("m", (("a-new", Tri.AUTO), *DEFAULTS, ("zz", Tri.OFF)), (
                 Offer("tap", OFFERED & ~USO | TUNNEL | 1 << 255, USO | 1 << 200),  # bits above 63, undetermined
                 Offer("\u00e9" * 64, 0))),),
             (Unprobed(None, None, "everything"), Unprobed("m", "tap", ""), Unprobed("", None, "\u4e2d"))),
    HostDump("h", "k", (1, 2, 3), None, 1, (("csum", "uint32"), ("host_uso", "OnOffAuto"))),  # catalogue, odd type
]


@pytest.mark.parametrize("dump", [typical_dump(), GOLDEN_DUMP, *UNUSUAL], ids=lambda d: f"{d.host}-{d.kernel}")
@pytest.mark.parametrize("key", [None, KEY])
def test_dump_round_trip(dump: HostDump, key: bytes | None) -> None:
    assert decode(encode(dump, key=key), key=key) == dump


def test_a_typical_dump_is_small() -> None:
    dump = typical_dump()
    machines = tuple(MachineOffers(m.machine, (), m.offers) for m in dump.machines)
    bare = HostDump(dump.host, dump.kernel, dump.qemu_version, dump.package, dump.made_at, (), machines, dump.unprobed,
                    dump.binary, dump.default_machine)
    assert len(encode(dump)) < 430  # mostly texts: host, kernel, package, binary, notes
    assert len(encode(dump)) - len(encode(bare)) <= 2 * 9 + 2 * 2 * 9  # 39 properties' types, 2 x 39 defaults


def test_a_tri_state_is_two_bits_by_feature_bit() -> None:
    # csum (bit 0): lo only = off; guest_csum (bit 1): hi only = on; gso (bit 6): both = auto
    record = decode(dump_with(machines="01" "03713335" "0141" "0142" "00" "00"))
    assert isinstance(record, HostDump)
    assert record.machines[0].defaults == (("csum", Tri.OFF), ("gso", Tri.AUTO), ("guest_csum", Tri.ON))


def big_baseline(count: int = 20_000) -> Baseline:
    """A cluster of ``count`` hosts: two kernels (the older lacks USO), three QEMU builds, one host in 50 has
    no vhost, one in 7 could not determine its USO bits."""
    hosts = tuple(BaselineHost(f"compute-{i:05d}.example.net", ("6.1.0-40-amd64", "6.12.48+deb13-amd64")[i % 3 > 0],
                               (10, 0, i % 3), f"Debian 1:10.0.{i % 3}+ds-2", 1_760_000_000 - i % 900, PROPERTIES)
                  for i in range(count))
    entries = []
    for machine in ("pc-i440fx-10.0", "pc-q35-10.0"):
        for backend in ("tap", "tap-vhost", "user"):
            members = tuple(i for i in range(count) if backend != "tap-vhost" or i % 50)
            outside = sorted(set(range(count)) - set(members))
            lacking = tuple(i for i in members if i % 3 == 0) if backend == "tap" else ()
            entries.append(BaselineEntry(
                machine, backend, OFFERED & ~USO if lacking else OFFERED, OFFERED,
                members, tuple((i, USO) for i in lacking), tuple((i, USO & ~(1 << 54)) for i in lacking if i % 7 == 0),
                tuple((i, "no vhost-net (/dev/vhost-net missing)") for i in outside), DEFAULTS_ON, DEFAULTS_OFF))
    return Baseline(1_760_001_000, hosts, tuple(entries))


@pytest.mark.parametrize(("on", "off"), [(DEFAULTS_ON, DEFAULTS_OFF), (TUNNEL | 1 << 255, 1 << 64 | 1 << 200 | 1),
                                         (1 << 255, 1 << 255), (0, TUNNEL)])
def test_an_entry_s_defaults_round_trip(on: int, off: int) -> None:
    entry = GOLDEN_BASELINE.entries[0]
    entry = BaselineEntry(entry.machine, entry.backend, entry.offered, entry.union, entry.hosts, entry.removed,
                          entry.undetermined, entry.missing, on, off)
    baseline = Baseline(GOLDEN_BASELINE.made_at, GOLDEN_BASELINE.hosts, (entry,))
    for key in (None, KEY):
        decoded = decode(encode(baseline, key=key), key=key)
        assert decoded == baseline and isinstance(decoded, Baseline)
        assert (decoded.entries[0].defaults_on, decoded.entries[0].defaults_off) == (on, off)
    # two bitmaps of (highest bit + 8) // 8 bytes and a length byte each, in place of the golden one's 3 bytes
    growth = len(encode(baseline)) - len(encode(GOLDEN_BASELINE))
    assert growth == sum(max(1, (bits.bit_length() + 7) // 8) + (bits > 0) for bits in (on, off)) - 3


def test_a_20000_host_baseline_round_trips_within_the_size_limit() -> None:
    baseline = big_baseline()
    data = encode(baseline, key=KEY)
    assert len(data) < MAX_RECORD_BYTES
    assert len(data) / 20_000 < 40  # mostly the host names (about 26 bytes each)
    decoded = decode(data, key=KEY)
    assert decoded == baseline
    assert isinstance(decoded, Baseline) and decoded.entries[0].hosts is decoded.entries[2].hosts  # shared


names = st.text(min_size=1, max_size=12)
tris = st.sampled_from([Tri.OFF, Tri.ON, Tri.AUTO])
prop_names = st.one_of(st.sampled_from(CATALOGUE), st.from_regex(r"x-[a-z]{1,6}", fullmatch=True))
wide = st.one_of(st.integers(0, (1 << 70) - 1), st.integers(0, (1 << 256) - 1))


@st.composite
def offers(draw: st.DrawFn) -> Offer:
    offered = draw(wide)
    return Offer(draw(st.text(min_size=1, max_size=10)), offered, draw(wide) & ~offered)


dumps = st.builds(
    lambda host, version, package, made_at, props, machines, notes, binary, default: HostDump(
        host, "k", version, package, made_at, tuple(sorted(props.items())), tuple(
            MachineOffers(m, tuple(sorted(d.items())), tuple(sorted({o.backend: o for o in o_list}.values(),
                                                                    key=lambda o: o.backend)))
            for m, (d, o_list) in sorted(machines.items())), tuple(notes), binary, default),
    names, st.tuples(*[st.integers(0, 65535)] * 3), st.one_of(st.none(), names), st.integers(0, (1 << 40) - 1),
    st.dictionaries(prop_names, st.sampled_from(["bool", "OnOffAuto", "str", "uint32"]), max_size=8),
    st.dictionaries(names, st.tuples(st.dictionaries(prop_names, tris, max_size=6), st.lists(offers(), max_size=4)),
                    max_size=3),
    st.lists(st.builds(Unprobed, st.one_of(st.none(), names), st.one_of(st.none(), names), st.text(max_size=20)),
             max_size=3),
    st.one_of(st.none(), names), st.one_of(st.none(), names))


@st.composite
def baselines(draw: st.DrawFn) -> Baseline:
    made_at = draw(st.integers(0, (1 << 40) - 1))
    host_names = draw(st.lists(names, min_size=1, max_size=8, unique=True))
    hosts = tuple(BaselineHost(name, draw(st.sampled_from(["a", "b"])), (10, 0, draw(st.integers(0, 2))),
                               draw(st.one_of(st.none(), st.just("pkg"))), draw(st.integers(0, (1 << 40) - 1)),
                               draw(st.sampled_from([(), PROPERTIES, (("x-y", "str"),)])))
                  for name in host_names)
    entries = []
    for key in sorted(draw(st.sets(st.tuples(names, names), max_size=4))):
        members = sorted(draw(st.sets(st.integers(0, len(hosts) - 1))))
        offered, extra = draw(wide), draw(wide)
        removed = [(h, bits) for h in members if (bits := draw(wide) & extra & ~offered)]
        undetermined = [(h, part) for h, bits in removed if (part := bits & draw(wide))]
        missing = [(h, draw(st.sampled_from(["x", "y"]))) for h in range(len(hosts)) if h not in members
                   and draw(st.booleans())]
        entries.append(BaselineEntry(*key, offered, offered | extra, tuple(members), tuple(removed),
                                     tuple(undetermined), tuple(missing), draw(wide), draw(wide)))
    return Baseline(made_at, hosts, tuple(entries))


@settings(max_examples=200, deadline=None)
@given(st.one_of(dumps, baselines()), st.one_of(st.none(), st.binary(min_size=1, max_size=8)))
def test_round_trip(record: HostDump | Baseline, key: bytes | None) -> None:
    assert decode(encode(record, key=key), key=key) == record


# ------------------------------------------------------------------------------------------------ HMAC

@pytest.mark.parametrize("record", [typical_dump(), GOLDEN_BASELINE], ids=["dump", "baseline"])
def test_hmac_sign_verify_and_tamper(record: HostDump | Baseline) -> None:
    signed = encode(record, key=KEY)
    assert signed[7] == 1 and decode(signed, key=KEY) == record
    with pytest.raises(AuthenticationError, match="wrong key or tampered"):
        decode(signed, key=b"another key")
    for at in (5, 6, 20, len(signed) - 40, len(signed) - 1):  # minor, type, body, CRC, HMAC
        tampered = bytearray(signed)
        tampered[at] ^= 0x01
        with pytest.raises(AuthenticationError):
            decode(bytes(tampered), key=KEY)
    with pytest.raises(AuthenticationError, match="not signed"):
        decode(encode(record), key=KEY)
    assert decode(signed) == record  # without a key the trailer is not checked; the CRC still is


# ------------------------------------------------------------------------------------------------ hostile input

@pytest.mark.parametrize(("parts", "error", "field"), [
    ({"host": "00"}, "a dump needs a host name", "host"),
    ({"kernel": "02ff31"}, "invalid UTF-8", "kernel"),
    ({"present": "08"}, "over its limit 7", "present"),
    ({"made_at": "8080808080c0"}, "longer than", "made_at"),
    ({"properties": "0108" + "00" "00"}, "bit 3 has no catalogue property", "properties.present"),
    ({"properties": "0101" "0102" "00"}, "bit 1 is not a present property", "properties.on_off_auto"),
    ({"properties": "00" "00" "01" "0a67756573745f6373756d" "04626f6f6c"},  # guest_csum of type bool
     "catalogue property 'guest_csum' belongs in the bitmaps", "properties.other[0].name"),
    ({"properties": "00" "00" "01" "0178" "01ff"}, "invalid UTF-8", "properties.other[0].type"),
    ({"properties": "0101" "00" "01" "046373756d" "03737472"}, "property 'csum' given twice",
     "properties.other[0].name"),  # in the bitmaps and, with another type, among the others
    ({"properties": "00" "00" "02" "0178" "0161" "0178" "0162"}, "property 'x' given twice",
     "properties.other[1].name"),
    ({"machines": "02" + MACHINE_Q35 + MACHINE_Q35}, "machine type 'q35' given twice", "machines[1].machine"),
    ({"machines": "02" + MACHINE_Q35 + "0161" + MACHINE_Q35[8:]}, "'a' out of order", "machines[1].machine"),
    ({"machines": "01" "00" + MACHINE_Q35[8:]}, "without a name", "machines[0].machine"),
    ({"machines": "01" "03713335" "0108" "00" "00" "00"}, "bit 3 has no catalogue property",
     "machines[0].defaults.tri_lo"),
    ({"machines": "01" "03713335" "00" "00" "01" "0178" "04" "00"}, "invalid tri-state 4",
     "machines[0].defaults.other[0].tri"),
    ({"machines": "01" "03713335" "00" "00" "01" "046373756d" "01" "00"}, "'csum' belongs in the bitmaps",
     "machines[0].defaults.other[0].name"),
    ({"machines": "01" "03713335" "00" "00" "00" "02" + OFFER_TAP + OFFER_TAP}, "backend kind 'tap' given twice",
     "machines[0].offers[1].backend"),
    ({"machines": "01" "03713335" "00" "00" "00" "02" + OFFER_TAP + "0161" "00" "00"}, "'a' out of order",
     "machines[0].offers[1].backend"),
    ({"machines": "01" "03713335" "00" "00" "00" "01" "00" "00" "00"}, "must be 1-64 characters",
     "machines[0].offers[0].backend"),
    ({"machines": "01" "03713335" "00" "00" "00" "01" "03746170" "0101" "0103"}, "must not be offered",
     "machines[0].offers[0].unknown"),
    ({"machines": "01" "03713335" "00" "00" "00" "01" "03746170" "020100" "00"}, "trailing zero",
     "machines[0].offers[0].offered"),
    ({"machines": "01" "03713335" "00" "00" "00" "01" "03746170" "21" + "ff" * 33 + "00"}, "over its limit 32",
     "machines[0].offers[0].offered"),
    ({"unprobed": "01" "04" "0178"}, "over its limit 3", "unprobed[0].present"),
    ({"unprobed": "02" "00" "0178" "01"}, "truncated", "unprobed[1].reason"),  # machine "" (the 00 of ext)
    ({"ext": "01" "01"}, "truncated", "ext"),
    ({"ext": "00" "00"}, "1 bytes after its last field", None),
])
def test_hostile_dumps_name_the_field(parts: dict[str, str], error: str, field: str | None) -> None:
    with pytest.raises(DecodeError, match=error) as caught:
        decode(dump_with(**parts))
    assert caught.value.field == field


RUN_ALL = "01" "0002"  # hosts 0-2
NONE = "00" "00"  # an entry's defaults: none on, none off


@pytest.mark.parametrize(("parts", "error", "field"), [
    ({"hosts": "00", "entries": "00"}, "needs at least one host", "hosts"),
    ({"hosts": "02" "00016100000000" "00016100000000"}, "host 'a' given twice", "hosts[1]"),
    ({"hosts": "01" "00000000000000"}, "a host without a name", "hosts[0].host"),
    ({"hosts": "01" "0001610400" "00" "00"}, "index 4 outside its table of 4", "hosts[0].kernel"),
    ({"hosts": "01" "0001610001" "00" "00"}, "index 1 outside its table of 1", "hosts[0].version"),
    ({"hosts": "01" "0101610000" "09" "00" "00"}, "index 9 outside", "hosts[0].package"),
    ({"hosts": "01" "0001610000" "00" "01"}, "index 1 outside", "hosts[0].properties"),
    ({"hosts": "01" "0001610000" "ffffffffff7f" "00"}, "over its limit", "hosts[0].made_at"),
    ({"hosts": "01" "0001610000" "feffffffff1f" "00"}, "not Unix seconds", "hosts[0].made_at"),
    ({"strings": "01" "02c328"}, "invalid UTF-8", "strings[0]"),
    ({"entries": "02" "01" "02" "00" "00" + NONE + "00" "00" "00" "00"
                 "01" "02" "00" "00" + NONE + "00" "00" "00" "00"},
     "entry q35/tap given twice", "entries[1].backend"),
    ({"entries": "02" "02" "02" "00" "00" + NONE + "00" "00" "00" "00"
                 "01" "02" "00" "00" + NONE + "00" "00" "00" "00"},
     "entry q35/tap out of order", "entries[1].machine"),
    ({"entries": "01" "01" "09" "00" "00" + NONE + "00" "00" "00" "00"}, "index 9 outside", "entries[0].backend"),
    ({"entries": "01" "01" "02" "00" "00" "020100" "00" "00" "00" "00" "00"}, "trailing zero",
     "entries[0].defaults_on"),
    ({"entries": "01" "01" "02" "00" "00" "00" "21" + "ff" * 33 + "00" "00" "00" "00"}, "over its limit 32",
     "entries[0].defaults_off"),
    ({"entries": "01" "01" "02" "00" "00" "0101" "0501"}, "truncated", "entries[0].defaults_off"),  # ext: 1 more
    ({"entries": "01" "01" "02" "0103" "0101" + NONE + "00" "00" "00" "00"}, "union lacks offered bits",
     "entries[0].union"),
    ({"entries": "01" "01" "02" "00" "00" + NONE + "01" "0003" "00" "00" "00"}, "a run ends past the 3 hosts",
     "entries[0].hosts"),
    ({"entries": "01" "01" "02" "00" "00" + NONE + "02" "0000" "0100" "00" "00" "00"}, "a run ends past the 3 hosts",
     "entries[0].hosts"),  # host 0, then from host 3 (1 after host 0's successor)
    ({"entries": "01" "01" "02" "00" "0101" + NONE + RUN_ALL + "01" "0101" "01" "0000" "00" "00"},
     "removed bits must be in union and not in offered", "entries[0].removed[0].value"),
    ({"entries": "01" "01" "02" "00" "0101" + NONE + "01" "0000" "01" "00" "01" "0100" "00" "00"},
     "hosts 1-1 are not all in the entry", "entries[0].removed[0].hosts"),
    ({"entries": "01" "01" "02" "00" "0101" + NONE + RUN_ALL + "01" "00" "00" "00" "00"}, "a group without hosts",
     "entries[0].removed[0].hosts"),
    ({"entries": "01" "01" "02" "00" "0103" + NONE + RUN_ALL + "02" "0102" "010000" "00" "010100" "00" "00"},
     "not in increasing order", "entries[0].removed[1].value"),
    ({"entries": "01" "01" "02" "00" "0103" + NONE + RUN_ALL + "02" "00" "010001" "0101" "010100" "00" "00"},
     "a host is in two groups", "entries[0].removed"),
    ({"entries": "01" "01" "02" "00" "0101" + NONE + RUN_ALL + "01" "00" "010000" "01" "00" "010100" "00"},
     "hosts 1-1 are not all hosts that removed bits", "entries[0].undetermined[0].hosts"),
    ({"entries": "01" "01" "02" "00" "0101" + NONE + RUN_ALL + "01" "00" "010000" "01" "0103" "010000" "00"},
     "undetermined bits must be removed bits of the host", "entries[0].undetermined[0].value"),
    ({"entries": "01" "01" "02" "00" "00" + NONE + "01" "0001" "00" "00" "01" "03" "010100"},
     "hosts 1-1 are in the entry", "entries[0].missing[0].hosts"),
    ({"entries": "01" "01" "02" "00" "00" + NONE + "01" "0001" "00" "00" "01" "07" "010200"},
     "index 7 outside", "entries[0].missing[0].value"),
])
def test_hostile_baselines_name_the_field(parts: dict[str, str], error: str, field: str) -> None:
    with pytest.raises(DecodeError, match=error) as caught:
        decode(baseline_with(**parts))
    assert caught.value.field == field


def test_host_references_are_bounded_before_they_are_made() -> None:
    # 20,000 hosts and entries each naming all of them in one run (6 bytes an entry): refused at the entry that
    # passes MAX_REFS, after a bounded amount of memory, not after 20,000 entries x 20,000 hosts.
    hosts = b"".join(b"\x00" + varint(len(name := f"{i:x}".encode())) + name + b"\x00\x00\x00\x00"
                     for i in range(20_000))
    strings = [f"b{i:03d}".encode() for i in range(100)]
    entries = b"".join(b"\x00" + varint(1 + i) + b"\x00\x00" + b"\x00\x00" + b"\x01\x00" + varint(19_999)
                       + b"\x00\x00\x00"
                       for i in range(99))
    body = (b"\x00" + varint(101) + b"\x01q" + b"".join(varint(len(s)) + s for s in strings) + b"\x01" + bytes(6)
            + b"\x01\x00\x00\x00" + varint(20_000) + hosts + varint(99) + entries + b"\x00")
    data = frame(body.hex(), rtype=5)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(DecodeError, match=f"more than {MAX_REFS} host references") as caught:
        decode(data)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert caught.value.field == f"entries[{MAX_REFS // 20_000}].hosts"
    assert peak < 15_000_000  # about 7 MB: 20,000 hosts and 52 entries sharing one tuple of them
    assert elapsed < 20  # generous (tracemalloc slows it): nowhere near 20,000 x 20,000 references


def test_the_encoder_refuses_what_a_reader_would() -> None:
    hosts = tuple(BaselineHost(f"h{i}", "k", (1, 0, 0), None, 0) for i in range(20_000))
    everyone = tuple(range(20_000))
    entries = tuple(BaselineEntry("q35", f"b{i:03d}", 0, 0, everyone) for i in range(MAX_REFS // 20_000 + 1))
    with pytest.raises(EncodeError, match=f"more than {MAX_REFS} times"):
        encode(Baseline(0, hosts, entries))
    assert isinstance(decode(encode(Baseline(0, hosts, entries[:-1]))), Baseline)  # 52 x 20,000: within the bound
    texts = tuple(BaselineHost(f"h{i}", f"k{i}", (1, 0, 0), f"p{i}", 0) for i in range(20_000))  # 40,000 texts
    more = tuple(BaselineEntry(f"m{i:05d}", f"b{i:05d}", 0, 0, ()) for i in range(15_000))  # and 30,000
    assert MAX_STRINGS < 70_000
    with pytest.raises(EncodeError, match="out of the format's bounds"):
        encode(Baseline(0, texts, more))
    with pytest.raises(EncodeError, match="expected a VmReport, HostCapabilities, CapabilitySet, HostDump or"):
        encode(MachineOffers("q35"))  # type: ignore[arg-type]


@pytest.mark.parametrize("record", [GOLDEN_DUMP, typical_dump(), GOLDEN_BASELINE], ids=["golden", "typical",
                                                                                          "baseline"])
def test_truncation_at_every_byte(record: HostDump | Baseline) -> None:
    data = encode(record)
    for end in range(len(data)):  # the frame itself cut short
        with pytest.raises(DecodeError, match="truncated"):
            decode(data[:end])
    body = data[12:-4]
    for end in range(len(body)):  # a body cut short in a frame that fits it: the parser meets the end
        with pytest.raises(DecodeError) as caught:
            decode(reframe(data, body=body[:end]))
        assert caught.value.field is not None, (end, caught.value)


@pytest.mark.parametrize("rtype", [1, 2, 3, 4, 5])
def test_a_record_decoded_as_another_type_is_a_decode_error(rtype: int) -> None:
    for record in (typical_dump(), GOLDEN_DUMP, GOLDEN_BASELINE):
        data = encode(record)
        if data[6] != rtype:
            with pytest.raises(DecodeError):
                decode(reframe(data, rtype=rtype))


@pytest.mark.parametrize("rtype", [0, 10, 255])
def test_an_unknown_record_type_is_a_clear_decode_error(rtype: int) -> None:
    with pytest.raises(DecodeError, match=f"unknown record type {rtype}") as caught:
        decode(reframe(encode(GOLDEN_DUMP), rtype=rtype))
    assert caught.value.field == "type"


FUZZ = """
import random, sys, zlib
sys.path.insert(0, {tests!r})
from test_wire_platform import GOLDEN_BASELINE, GOLDEN_DUMP, reframe, typical_dump, big_baseline
from qemu_offload_handshake import DecodeError, decode, encode
rng = random.Random({seed})
seeds = [encode(GOLDEN_DUMP), encode(typical_dump()), encode(GOLDEN_BASELINE), encode(big_baseline(40))]
for _ in range({n}):
    data = rng.choice(seeds)
    body = bytearray(data[12:-4])
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.8:
            body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        else:
            body[rng.randrange(len(body))] = rng.choice([0x00, 0x01, 0x7f, 0x80, 0xff])
    try:
        decode(reframe(data, body=bytes(body)), key=None)
    except DecodeError as err:
        assert err.offset is not None
print("ok")
"""


@pytest.mark.parametrize("optimize", [[], ["-O"]], ids=["normal", "python-O"])
def test_random_bit_flips_give_only_decode_errors(optimize: list[str]) -> None:
    tests = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, *optimize, "-c", FUZZ.format(tests=tests, seed=11, n=6000)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_random_flips_in_a_signed_record_are_authentication_errors() -> None:
    rng = random.Random(3)
    signed = encode(typical_dump(), key=KEY)
    for _ in range(300):
        data = bytearray(signed)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        with pytest.raises(DecodeError) as caught:  # the magic, version, type or length may fail first
            decode(bytes(data), key=KEY)
        assert isinstance(caught.value, AuthenticationError) or caught.value.field in (
            "magic", "version", "type", "flags", "length")


# ------------------------------------------------------------------------------------------------ the model

def test_what_the_decoder_shares_is_still_checked_by_the_model() -> None:
    # The decoder hands the same defaults and property tuples to many objects, and the model checks a tuple it
    # has checked once; a table it refused stays refused, and one that could change is checked each time.
    bad = (("csum", Tri.ON), ("a", Tri.OFF))  # not sorted
    for _ in range(2):
        with pytest.raises(ValueError, match="sorted"):
            MachineOffers("q35", bad)
    mutable = (["csum", "bool"],)
    HostDump("h", "k", (1, 0, 0), None, 0, mutable)  # type: ignore[arg-type]
    mutable[0][1] = 7  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="must be a string"):
        HostDump("h", "k", (1, 0, 0), None, 0, mutable)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not off/on/auto"):
        MachineOffers("q35", (("csum", Tri.UNSET),))


def test_model_fixes_the_wire_relies_on() -> None:
    with pytest.raises(ValueError, match="needs the QEMU version"):
        BaselineHost("h", "k", None, None, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a string"):
        BaselineHost("h", "k", (1, 0, 0), None, 0, (("csum", 1),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="undetermined hosts must be sorted"):
        BaselineEntry("q35", "tap", 0, 3, (0, 1), ((0, 1), (1, 1)), ((1, 1), (0, 1)))
