"""The wire format: hand-written golden vectors, round trips, compatibility both ways, hostile input."""

from __future__ import annotations

import hashlib
import hmac
import random
import subprocess
import sys
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_offload_handshake import AuthenticationError, DecodeError, UnsupportedVersionError, decode, encode
from qemu_offload_handshake.core.features import BY_PROPERTY
from qemu_offload_handshake.core.model import (
    DERIVABLE,
    SIDES,
    CapabilitySet,
    HostCapabilities,
    NicReport,
    Tri,
    VmReport,
)
from qemu_offload_handshake.core.wire import FORMAT_MINOR


def frame(body_hex: str, *, major: int = 1, minor: int = 1, rtype: int = 1) -> bytes:
    """A frame around a hand-written body, as docs/wire-format.md lays it out (CRC from zlib, not the encoder)."""
    body = bytes.fromhex(body_hex)
    head = b"QOHS" + bytes([major, minor, rtype, 0]) + len(body).to_bytes(4, "big")
    return head + body + zlib.crc32(head + body).to_bytes(4, "big")


NIC_BODY = (
    "14" "046e657430" "022f70" "06e7ffbf790101" "0f"  # present, qdev id, QOM path, offered, driver status
    "0700000000000040" "00"  # tri lo (bit 54), tri hi
    "00" "00" "00"  # other properties, unreadable, extensions
)
VM_BODY = "05" "026831" "000a00000002" "03713335" "01" "1d" + NIC_BODY + "00" "00"
GOLDEN_VM = frame(VM_BODY, minor=0)  # the version 1.0 example
VM = VmReport("h1", (10, 0, 2), None, "q35", (
    NicReport.make("net0", "/p", offered=0x10179BFFFE7, driver_status=0x0F, properties={"guest_uso4": Tri.OFF}),))

NIC_1_1 = ("44" "046e657430" "022f70" "010f" "01" "00" "00" "00" "00"  # offered 0x0f, vnet_hdr, nothing else
           "02" "01020130" "020118")  # extensions: offered unknown 0x30, derived offered + vnet_hdr
VM_EXT_1_1 = ("04" "010403776562"  # 4 extensions: name "web"
              "0225" "24" "31623465323862612d326661312d313164322d383833662d303031366433636361343237"  # UUID
              "0305" "80e2cfaa06"  # made at 1700000000
              "040102")  # side: destination
VM_BODY_1_1 = "00" "026831" "01" "18" + NIC_1_1 + "00" + VM_EXT_1_1
GOLDEN_VM_1_1 = frame(VM_BODY_1_1)
VM_1_1 = VmReport("h1", None, None, None, (
    NicReport.make("net0", "/p", offered=0x0F, vnet_hdr=True, offered_unknown=0x30, derived=("offered", "vnet_hdr")),),
    vm_name="web", vm_uuid="1b4e28ba-2fa1-11d2-883f-0016d3cca427", made_at=1_700_000_000, side="dest")


def test_golden_vector_from_the_spec_document() -> None:
    assert decode(GOLDEN_VM) == VM  # a 1.0 record still decodes
    assert FORMAT_MINOR == 3
    assert encode(VM) == frame(VM_BODY, minor=3)  # a 1.3 writer: the same body, minor version 3
    assert decode(frame(VM_BODY)) == VM


def test_golden_vector_1_1_from_the_spec_document() -> None:
    assert len(GOLDEN_VM_1_1) == 12 + 87 + 4
    assert decode(GOLDEN_VM_1_1) == VM_1_1
    assert encode(VM_1_1) == frame(VM_BODY_1_1, minor=3)  # a 1.3 writer: the same body


def test_golden_host_capabilities_with_a_bit_above_64() -> None:
    # present 0, host "h", offers: 1 x ("tap", bit 65 | bit 0), no extensions
    body = "00" "0168" "01" "03746170" "09" "010000000000000002" "00"
    record = HostCapabilities("h", None, None, None, (("tap", 1 << 65 | 1),))
    assert decode(frame(body, rtype=2)) == record
    assert encode(record) == frame(body, rtype=2, minor=3)


@pytest.mark.parametrize("bits", [0b1111 << 65, 1 << 255, (1 << 256) - 1, 1 << 68 | 1 << 255 | 1])
def test_bitmaps_up_to_bit_255(bits: int) -> None:  # QEMU 10.2 uses bits 64-68; the format allows up to 255
    host = HostCapabilities("h", None, None, None, (("tap", bits), ("user", bits >> 1)))
    assert decode(encode(host)) == host
    other = HostCapabilities("g", None, None, None, (("tap", 1),))
    assert decode(encode(CapabilitySet((host, other)))) == CapabilitySet((host, other))
    nic = NicReport.make("n", "/p", offered=bits, negotiated=bits, backend_features=bits)
    vm = VmReport("h", None, None, None, (nic,))
    assert decode(encode(vm)) == vm


def test_bitmaps_above_bit_255_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 256 bits"):
        HostCapabilities("h", None, None, None, (("tap", 1 << 256),))
    with pytest.raises(ValueError, match="at most 256 bits"):
        NicReport.make("n", "/p", offered=1 << 300)
    vector = frame("00" "0168" "01" "03746170" "21" + "00" * 32 + "01" "00", rtype=2)  # a 33-byte bitmap: bit 256
    with pytest.raises(DecodeError, match="over its limit 32") as caught:
        decode(vector)
    assert caught.value.field == "offers[0].bitmap"


def test_backend_kinds_are_at_most_64_bytes() -> None:
    for kind in ("k" * 64, "\u00e9" * 32, "\u4e2d" * 21):
        assert HostCapabilities("h", None, None, None, ((kind, 1),)).offers[0][0] == kind
    for kind in ("k" * 65, "\u00e9" * 32 + "k", "\u4e2d" * 22):
        with pytest.raises(ValueError, match="longer than 64 bytes"):
            HostCapabilities("h", None, None, None, ((kind, 1),))
    with pytest.raises(ValueError, match="not valid Unicode"):
        HostCapabilities("h", None, None, None, (("\udc80", 1),))
    vector = frame("00" "0168" "01" "41" + "6b" * 65 + "0101" "00", rtype=2)
    with pytest.raises(DecodeError, match="invalid record: backend kind longer than 64 bytes"):
        decode(vector)


def test_a_capability_set_names_each_host_once() -> None:
    a, b = (HostCapabilities(name, None, None, None, ()) for name in ("a", "b"))
    assert CapabilitySet((a, b)).hosts == (a, b)
    with pytest.raises(ValueError, match=r"hosts\[2\]: host 'a' given twice"):
        CapabilitySet((a, b, a))
    with pytest.raises(ValueError, match=r"hosts\[1\] has no host name"):
        CapabilitySet((a, HostCapabilities("", None, None, None, ())))
    with pytest.raises(TypeError, match="HostCapabilities objects"):
        CapabilitySet((a, "b"))  # type: ignore[arg-type]
    assert HostCapabilities("", None, None, None, ()).host == ""  # alone, a record may lack a name
    with pytest.raises(ValueError, match="offers must be sorted"):
        HostCapabilities("h", None, None, None, (("user", 1), ("tap", 1)))
    with pytest.raises(ValueError, match="small ints"):
        HostCapabilities("h", (10, 0, True), None, None, ())


def test_older_reader_skips_extensions_and_newer_minor_versions() -> None:
    # The same VM from a hypothetical version 1.3 writer: an unknown NIC extension (tag 99), two extra NIC
    # bytes after the known fields, and an unknown VM extension (tag 300, a two-byte varint).
    nic = NIC_BODY[:-2] + "01" "63" "02" "abcd" + "eeee"
    vector = frame("05" "026831" "000a00000002" "03713335" "01" f"{len(nic) // 2:02x}" + nic + "00"
                   "01" "ac02" "03" "010203", minor=3)
    assert decode(vector) == VM


def vm_with(nic_ext: str = "00", vm_ext: str = "00") -> bytes:
    """GOLDEN_VM_1_1's shape with other extension lists (hex, count included)."""
    nic = "44" "046e657430" "022f70" "010f" "01" "00" "00" "00" "00" + nic_ext
    return frame("00" "026831" "01" f"{len(nic) // 2:02x}" + nic + "00" + vm_ext)


@pytest.mark.parametrize(("nic_ext", "vm_ext", "error"), [
    ("01" "01020140", "00", r"derived offered.*nics\[0\]\.ext\.offered_unknown"),  # no derived offered
    ("02" "01020103" "020108", "00", r"overlap.*nics\[0\]\.ext\.offered_unknown"),  # bit 0 is also offered
    ("02" "01020100" "020108", "00", r"offered_unknown.*trailing zero"),  # not a minimal bitmap
    ("01" "010100", "00", r"offered_unknown.*default"),  # empty: writers leave it out
    ("01" "020120", "00", r"derived.*bit 5 names nothing"),
    ("01" "020100", "00", r"derived.*default"),
    ("01" "02020801", "00", r"derived.*1 bytes after its value"),
    ("02" "020108" "020108", "00", r"tag 2 given twice"),
    ("02" "6300" "6300", "00", r"tag 99 given twice"),  # unknown tags too
    ("00", "01" "040103", r"side.*3 is not one of"),
    ("00", "01" "0400", r"side.*truncated"),
    ("00", "01" "0306" "808080808040", r"made_at.*over its limit"),  # 2^40
    ("00", "01" "0306" "8080808080c0", r"made_at.*longer than"),
    ("00", "01" "010201ff", r"vm_name.*UTF-8"),
    ("00", "02" "010100" "010100", r"tag 1 given twice"),
    ("00", "01" "0205" "03616263" "64", r"vm_uuid.*1 bytes after"),
])
def test_invalid_extension_contents_name_the_field(nic_ext: str, vm_ext: str, error: str) -> None:
    with pytest.raises(DecodeError, match=error):
        decode(vm_with(nic_ext, vm_ext))


def nic_with_props(props: str) -> bytes:
    """GOLDEN_VM_1_1's shape with other properties (hex, count included) and no extensions."""
    nic = "44" "046e657430" "022f70" "010f" "01" "00" "00" + props + "00" "00"
    return frame("00" "026831" "01" f"{len(nic) // 2:02x}" + nic + "00" "00")


@pytest.mark.parametrize(("props", "error", "field"), [
    ("01" "046373756d" "02", "catalogue property 'csum' belongs in tri lo/hi", "nics[0].other_props[0].name"),
    ("02" "027a7a" "01" "0178" "04", "invalid tri-state 4", "nics[0].other_props[1].tri"),
    ("01" "0178" "00", "invalid tri-state 0", "nics[0].other_props[0].tri"),  # unset is left out, not written
    ("02" "0178" "01" "0178" "03", "property 'x' given twice", "nics[0].other_props[1]"),
    ("01" "02ff78" "01", "invalid UTF-8", "nics[0].other_props[0].name"),
])
def test_other_properties_are_checked_as_they_are_read(props: str, error: str, field: str) -> None:
    with pytest.raises(DecodeError, match=error) as caught:
        decode(nic_with_props(props))
    assert caught.value.field == field
    record = decode(nic_with_props("01" "0178" "03"))
    assert isinstance(record, VmReport) and record.nics[0].properties == (("x", Tri.AUTO),)


def test_extension_edge_values() -> None:
    assert decode(vm_with(vm_ext="02" "010100" "030100")) == VmReport(
        "h1", None, None, None, (NicReport.make("net0", "/p", offered=0x0F, vnet_hdr=True),), vm_name="", made_at=0)
    assert decode(vm_with(vm_ext="01" "0306" "ffffffffff1f")) == VmReport(
        "h1", None, None, None, (NicReport.make("net0", "/p", offered=0x0F, vnet_hdr=True),), made_at=(1 << 40) - 1)
    assert decode(vm_with(vm_ext="02" "040101" "07020000")) == VmReport(  # an unknown tag after a known one
        "h1", None, None, None, (NicReport.make("net0", "/p", offered=0x0F, vnet_hdr=True),), side="source")


def test_newer_major_version_is_a_clear_unsupported_version_error() -> None:
    vector = frame("05" "026831" "000a00000002" "03713335" "00" "00" "00", major=2, minor=0)
    with pytest.raises(UnsupportedVersionError, match=r"unsupported version 2\.0"):
        decode(vector)


def test_hmac_sign_and_verify() -> None:
    signed = encode(VM, key=b"cluster-secret")
    assert signed[:-32] [7] == 1  # the flag
    assert signed[-32:] == hmac.new(b"cluster-secret", signed[:-32], hashlib.sha256).digest()
    assert decode(signed, key=b"cluster-secret") == VM
    with pytest.raises(AuthenticationError, match="wrong key or tampered"):
        decode(signed, key=b"another-key")
    tampered = bytearray(signed)
    tampered[20] ^= 1
    with pytest.raises(AuthenticationError):
        decode(bytes(tampered), key=b"cluster-secret")
    with pytest.raises(AuthenticationError, match="not signed"):
        decode(encode(VM), key=b"cluster-secret")


def test_errors_name_the_field() -> None:
    bad_utf8 = frame("05" "02ff31" "000a00000002" "03713335" "00" "00" "00")
    with pytest.raises(DecodeError, match=r"UTF-8.*host"):
        decode(bad_utf8)
    with pytest.raises(DecodeError, match="magic"):
        decode(b"JSON" + GOLDEN_VM[4:])
    with pytest.raises(DecodeError, match="checksum"):
        decode(GOLDEN_VM[:-1] + bytes([GOLDEN_VM[-1] ^ 0xFF]))
    inflated = bytearray(GOLDEN_VM)
    inflated[8:12] = (1 << 31).to_bytes(4, "big")
    with pytest.raises(DecodeError, match="length"):
        decode(bytes(inflated))


texts = st.text(max_size=40)
derivable = st.lists(st.sampled_from(DERIVABLE), unique=True).map(lambda names: tuple(sorted(names)))


def derived_fields(offered: int | None, derived: tuple[str, ...], unknown: int) -> dict[str, object]:
    """offered_unknown only where the model allows it: a derived offered bitmap, not overlapping it."""
    if offered is None or "offered" not in derived:
        unknown = 0
    return {"derived": derived, "offered_unknown": unknown & ~(offered or 0)}


bitmaps = st.one_of(st.none(), st.integers(min_value=0, max_value=(1 << 130) - 1))
tris = st.sampled_from([Tri.OFF, Tri.ON, Tri.AUTO])
prop_names = st.one_of(st.sampled_from(sorted(BY_PROPERTY)), st.from_regex(r"x_[a-z]{1,8}", fullmatch=True))
nics = st.builds(
    lambda i, path, netdev, backend, props, off, neg, status, bf, vh, notes, derived, unknown, dev_path: NicReport.make(
        f"net{i}", path, properties=props, unreadable=notes, netdev_id=netdev, backend=backend, offered=off,
        negotiated=neg, driver_status=status, backend_features=bf, vnet_hdr=vh, dev_path=dev_path,
        **derived_fields(off, derived, unknown)),
    st.integers(0, 10**6), texts, st.one_of(st.none(), texts), st.one_of(st.none(), texts),
    st.dictionaries(prop_names, tris, max_size=8), bitmaps, bitmaps, st.one_of(st.none(), st.integers(0, 255)),
    bitmaps, st.one_of(st.none(), st.booleans()), st.lists(texts, max_size=3), derivable,
    st.integers(0, (1 << 200) - 1), st.one_of(st.none(), texts))
versions = st.one_of(st.none(), st.tuples(*[st.integers(0, 65535)] * 3))
vms = st.builds(lambda host, ver, pkg, mach, nic_list, notes, known, about: VmReport(
    host, ver, pkg, mach, tuple({n.key: n for n in nic_list}.values()), tuple(notes),
    devices_known=known or bool(nic_list), **about),
    texts, versions, st.one_of(st.none(), texts), st.one_of(st.none(), texts), st.lists(nics, max_size=5),
    st.lists(texts, max_size=3), st.booleans(), st.fixed_dictionaries({}, optional={
        "vm_name": texts, "vm_uuid": texts, "made_at": st.integers(0, (1 << 40) - 1),
        "side": st.sampled_from(SIDES)}))
wide = st.one_of(st.integers(0, (1 << 128) - 1), st.integers(0, (1 << 256) - 1))  # up to MAX_BITMAP_BITS


def host_caps(names: st.SearchStrategy[str]) -> st.SearchStrategy[HostCapabilities]:
    return st.builds(lambda host, ver, offers: HostCapabilities(host, ver, None, "q35", tuple(sorted(offers.items()))),
                     names, versions, st.dictionaries(st.text(max_size=16), wide, max_size=5))  # kinds <= 64 bytes


hosts = host_caps(texts)
# A set names each host once, by a non-empty name.
sets = st.builds(lambda hs: CapabilitySet(tuple(hs)),
                 st.lists(host_caps(st.text(min_size=1, max_size=40)), max_size=6, unique_by=lambda h: h.host))


@settings(max_examples=300, deadline=None)
@given(st.one_of(vms, hosts, sets), st.one_of(st.none(), st.binary(min_size=1, max_size=16)))
def test_round_trip(record: VmReport | HostCapabilities, key: bytes | None) -> None:
    assert decode(encode(record, key=key), key=key) == record


def mutations(data: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    buf = bytearray(data)
    if choice == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # truncate
        del buf[rng.randrange(len(buf)):]
    elif choice == 2:  # inflate a byte to a large length / varint continuation
        buf[rng.randrange(len(buf))] = rng.choice([0x7F, 0x80, 0xFF])
    elif choice == 3:  # insert junk
        pos = rng.randrange(len(buf))
        buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
    elif choice == 4:  # inflate the body length
        buf[8:12] = rng.randrange(1 << 32).to_bytes(4, "big")
    else:  # mutate the body and fix the CRC, so the parser itself meets the damage
        body_end = len(buf) - 4
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(12, body_end)] = rng.randrange(256)
        buf[body_end:] = zlib.crc32(bytes(buf[:body_end])).to_bytes(4, "big")
    return bytes(buf)


FUZZ = """
import random, sys
sys.path.insert(0, {tests!r})
from test_wire import GOLDEN_VM, GOLDEN_VM_1_1, mutations, VM
from qemu_offload_handshake import CapabilitySet, DecodeError, HostCapabilities, decode, encode
rng = random.Random({seed})
hosts = tuple(HostCapabilities(f"h{{i}}", (10, 0, i), "pkg", "q35", (("tap", 0xFF << i), ("user", 3)))
              for i in range(3))
seeds = [GOLDEN_VM, GOLDEN_VM_1_1, encode(VM, key=b"k"), encode(hosts[0]), encode(CapabilitySet(hosts))]
for i in range({n}):
    data = mutations(rng.choice(seeds), rng)
    try:
        decode(data, key=rng.choice([None, b"k"]))
    except DecodeError:
        pass
print("ok")
"""


@pytest.mark.parametrize("optimize", [[], ["-O"]], ids=["normal", "python-O"])
def test_mutation_fuzz_only_decode_error_escapes(optimize: list[str]) -> None:
    import os
    tests = os.path.dirname(__file__)
    done = subprocess.run([sys.executable, *optimize, "-c", FUZZ.format(tests=tests, seed=7, n=4000)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_hostile_lengths_do_not_allocate_out_of_proportion() -> None:
    # A NIC count of 256 and a string length of 1024 claimed in a tiny body, and a 4 GiB body length.
    hostile = [frame("00" "0168" "ff01" + "ff07" * 50), frame("00" "ff07" + "41" * 10)]
    tracemalloc.start()
    for data in hostile * 100:
        with pytest.raises(DecodeError):
            decode(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000


def test_non_bytes_input_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="expected bytes"):
        decode("QOHS")  # type: ignore[arg-type]


def test_golden_capability_set_shares_strings_and_xors_bitmaps() -> None:
    # strings ["tap", "q35"], no versions, ref tap = 0x0f; host "a" offers 0x0f (xor 0), host "b" 0x0d (xor 2)
    body = ("02" "03746170" "03713335" "00" "01" "00" "010f"
            "02" "04" "0161" "01" "01" "00" "00"  # 2 hosts; machine = string 1, 1 offer: tap xor 0
            "04" "0162" "01" "01" "00" "0102" "00")
    record = CapabilitySet((HostCapabilities("a", None, None, "q35", (("tap", 0x0F),)),
                            HostCapabilities("b", None, None, "q35", (("tap", 0x0D),))))
    assert decode(frame(body, rtype=3)) == record
    assert encode(record) == frame(body, rtype=3, minor=3)
    out_of_table = frame("02" "03746170" "03713335" "00" "01" "00" "010f" "01" "04" "0161" "07" "01" "00" "00" "00",
                         rtype=3)
    with pytest.raises(DecodeError, match="index 7 outside"):
        decode(out_of_table)
