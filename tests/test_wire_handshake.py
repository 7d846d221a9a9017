"""The wire format of the handshake's messages (1.3): an offer (type 6), an answer (type 7), a refusal (type 8).

Golden vectors written by hand from docs/wire-format.md, round trips of a real QEMU's report and real verdicts
(every truth, mode, outcome, severity and refusal code), the handshake protocol version, and hostile input: every
way of breaking a message must give a ``DecodeError`` that names the field, never another exception.
"""

from __future__ import annotations

import json
import random
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_baseline import dump as host_dump
from test_wire import VM, VM_BODY
from test_wire_hostile import varint

from qemu_offload_handshake import (
    AuthenticationError,
    DecodeError,
    EncodeError,
    UnsupportedVersionError,
    decode,
    encode,
)
from qemu_offload_handshake.core.decide import decide
from qemu_offload_handshake.core.exchange import (
    MAX_FINDINGS,
    NONCE_BYTES,
    REFUSAL_CODES,
    Answer,
    Offer,
    Prepare,
    Refusal,
    Truth,
    overrides,
)
from qemu_offload_handshake.core.model import Tri, VmReport
from qemu_offload_handshake.core.rules import RULES, Mode, Severity
from qemu_offload_handshake.core.verdict import Finding, Outcome
from qemu_offload_handshake.core.wire import FORMAT_MINOR, MAX_RECORD_BYTES

KEY = b"cluster-secret"
NONCE = bytes(range(NONCE_BYTES))
DATA = Path(__file__).parent / "data"
USO = 0b111 << 54


def real_report(name: str) -> VmReport:
    """A VM report read from a real QEMU (``tests/data``)."""
    report = decode(bytes.fromhex(json.loads((DATA / f"transcript-{name}.json").read_text())["report"]))
    assert isinstance(report, VmReport)
    return report


SOURCE = real_report("qemu10-4nics-booted")  # QEMU 10.0, 4 NICs, a booted guest that negotiated USO
OLD = replace(SOURCE, nics=tuple(replace(n, offered=(n.offered or 0) & ~USO, negotiated=(n.negotiated or 0) & ~USO)
                                 for n in SOURCE.nics))  # the same VM on a QEMU without USO
NO_USO = replace(SOURCE, side="dest", nics=tuple(replace(n, offered=(n.offered or 0) & ~USO) for n in SOURCE.nics))
DUMP = host_dump("dest-host")


def frame(body: bytes | str, rtype: int) -> bytes:
    """A frame around a body (CRC from zlib, not from the encoder)."""
    body = bytes.fromhex(body) if isinstance(body, str) else body
    head = b"QOHS" + bytes([1, FORMAT_MINOR, rtype, 0]) + len(body).to_bytes(4, "big")
    return head + body + zlib.crc32(head + body).to_bytes(4, "big")


def t(text: str) -> str:
    """A text, as hex: its length, then its UTF-8 bytes."""
    raw = text.encode()
    return varint(len(raw)).hex() + raw.hex()


def embedded(body_hex: str) -> str:
    return varint(len(body_hex) // 2).hex() + body_hex


# ------------------------------------------------------------------------------------------------ golden vectors

OFFER = {  # the parts of an offer's body, in order (docs/wire-format.md)
    "version": "0001", "nonce": "10" + NONCE.hex(), "made_at_ms": "80d095ffbc31", "mode": "02",
    "policy": "01" + t("host_uso") + "01", "dest_address": "01" + t("unix:/x"), "source": embedded(VM_BODY),
    "ext": "00",
}
GOLDEN_OFFER = Offer(VM, NONCE, 1_700_000_000_000, Mode.LENIENT, (("host_uso", Tri.OFF),), "unix:/x")
FINDING = {"device": t("net0"), "severity": "02", "code": t("probe-failed"), "why": t("x"), "feature": "00",
           "bit": "0136", "source": "00", "dest": "00", "negotiated": "02"}
ANSWER = {
    "version": "0001", "nonce": "10" + NONCE.hex(), "truth": "04", "how": t("no QEMU"), "outcome": "04",
    "mode": "01", "findings": "01" + "".join(FINDING.values()),
    "adjustments": "01" + t("net0") + "01" + t("guest_uso4") + "01", "recommendations": "00",
    "dest": "00", "dump": "00", "ext": "00",
}
GOLDEN_ANSWER = Answer(NONCE, Truth.NONE, "no QEMU", Outcome.UNKNOWN, Mode.STRICT, (
    Finding("net0", Severity.UNKNOWN, "probe-failed", "x", bit=54, negotiated=True),),
    adjustments=(("net0", (("guest_uso4", "off"),)),))
REFUSAL = {"version": "0001", "code": t("busy"), "message": t("later"), "nonce": "01" "10" + NONCE.hex(), "ext": "00"}
GOLDEN_REFUSAL = Refusal("busy", "later", NONCE)


def offer_with(**parts: str) -> bytes:
    return frame("".join(parts.get(name, value) for name, value in OFFER.items()), 6)


def answer_with(**parts: str) -> bytes:
    return frame("".join(parts.get(name, value) for name, value in ANSWER.items()), 7)


def finding_with(**parts: str) -> str:
    return "01" + "".join(parts.get(name, value) for name, value in FINDING.items())


def refusal_with(**parts: str) -> bytes:
    return frame("".join(parts.get(name, value) for name, value in REFUSAL.items()), 8)


@pytest.mark.parametrize(("vector", "record"), [(offer_with(), GOLDEN_OFFER), (answer_with(), GOLDEN_ANSWER),
                                                (refusal_with(), GOLDEN_REFUSAL)], ids=["offer", "answer", "refusal"])
def test_golden_vectors_from_the_spec_document(vector: bytes, record: Offer | Answer | Refusal) -> None:
    assert FORMAT_MINOR == 3
    assert decode(vector) == record
    assert encode(record) == vector


# ------------------------------------------------------------------------------------------------ round trips

def real_answer(truth: Truth, mode: Mode = Mode.STRICT, *, blocked: bool = False) -> Answer:
    """An answer with a real verdict: the destination lacks USO (blocked), or the source lacked it (adjustable)."""
    verdict = decide(SOURCE, NO_USO, mode=mode) if blocked else decide(OLD, SOURCE, mode=mode)
    dest = NO_USO if truth in (Truth.INCOMING, Truth.SCRATCH) else None
    return Answer(NONCE, truth, f"answered from {truth.value}", verdict.outcome, mode, verdict.findings,
                  overrides(verdict.adjustments), overrides(verdict.recommendations), dest,
                  DUMP if truth is Truth.DUMP else None)


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("mode", list(Mode))
def test_an_offer_with_a_real_report_round_trips(mode: Mode, key: bytes | None) -> None:
    policy = (("guest_uso4", Tri.OFF), ("host_uso", Tri.AUTO), ("x-custom", Tri.ON))
    for offer in (Offer(SOURCE, NONCE, 1_700_000_000_123, mode, policy, "unix:/run/incoming.sock"),
                  Offer(SOURCE, bytes(16), 0, mode), Offer(VM, b"\xff" * 16, (1 << 48) - 1, mode)):
        assert decode(encode(offer, key=key), key=key) == offer


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("truth", list(Truth))
def test_an_answer_from_each_truth_round_trips(truth: Truth, key: bytes | None) -> None:
    for mode in Mode:
        for blocked in (False, True):
            answer = real_answer(truth, mode, blocked=blocked)
            assert answer.findings and (answer.adjustments or answer.recommendations or blocked)
            assert decode(encode(answer, key=key), key=key) == answer


def test_every_outcome_and_severity_round_trips() -> None:
    for outcome in Outcome:
        findings = tuple(Finding("", severity, "derived", "w", source="a", dest="b", negotiated=False)
                         for severity in Severity)
        answer = Answer(NONCE, Truth.NONE, "h", outcome, Mode.LENIENT, findings)
        assert decode(encode(answer)) == answer


@pytest.mark.parametrize("code", sorted(REFUSAL_CODES))
def test_a_refusal_of_each_code_round_trips(code: str) -> None:
    for refusal in (Refusal(code, "why not", NONCE), Refusal(code, "", None, version=7)):
        assert decode(encode(refusal)) == refusal
        assert decode(encode(refusal, key=KEY), key=KEY) == refusal


def test_signed_messages_need_the_key() -> None:
    signed = encode(real_answer(Truth.SCRATCH), key=KEY)
    with pytest.raises(AuthenticationError, match="wrong key or tampered"):
        decode(signed, key=b"another-key")
    with pytest.raises(AuthenticationError, match="not signed"):
        decode(encode(GOLDEN_REFUSAL), key=KEY)


texts = st.text(max_size=30)
maybe = st.one_of(st.none(), texts)
findings = st.builds(Finding, texts, st.sampled_from(Severity), st.sampled_from(sorted(RULES)), texts, maybe,
                     st.one_of(st.none(), st.integers(0, 0xFFFF)), maybe, maybe, st.one_of(st.none(), st.booleans()))
tables = st.dictionaries(texts, st.dictionaries(texts, st.sampled_from(["on", "off"]), max_size=3),
                         max_size=3).map(overrides)
answers = st.builds(lambda truth, how, outcome, mode, items, adjust, recommend: Answer(
    NONCE, truth, how, outcome, mode, tuple(items), adjust, recommend, VM if truth is Truth.SCRATCH else None),
    st.sampled_from([Truth.NONE, Truth.SCRATCH]), texts, st.sampled_from(Outcome), st.sampled_from(Mode),
    st.lists(findings, max_size=5), tables, tables)
offers = st.builds(Offer, st.just(VM), st.binary(min_size=16, max_size=16), st.integers(0, (1 << 48) - 1),
                   st.sampled_from(Mode), st.dictionaries(texts, st.sampled_from([Tri.OFF, Tri.ON, Tri.AUTO]),
                                                          max_size=4).map(lambda d: tuple(sorted(d.items()))), maybe)


@settings(max_examples=200, deadline=None)
@given(st.one_of(answers, offers))
def test_round_trip(record: Offer | Answer) -> None:
    assert decode(encode(record)) == record


# ------------------------------------------------------------------------------------------------ protocol version

@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_an_offer_or_answer_of_another_protocol_version_is_unsupported(version: int) -> None:
    vectors = [offer_with(version=f"{version:04x}"), answer_with(version=f"{version:04x}"),
               frame(f"{version:04x}" "ffffffff", 6), frame(f"{version:04x}", 7)]  # the rest is not read
    if version:
        vectors += [encode(replace(GOLDEN_OFFER, version=version)), encode(replace(GOLDEN_ANSWER, version=version))]
    for vector in vectors:
        with pytest.raises(UnsupportedVersionError, match=f"handshake protocol version {version}: this side speaks "
                                                          "version 1") as caught:
            decode(vector)
        assert caught.value.field == "version"


def test_a_refusal_of_a_newer_protocol_version_is_read() -> None:
    assert decode(refusal_with(version="0002")) == replace(GOLDEN_REFUSAL, version=2)
    assert decode(refusal_with(version="ffff", nonce="00")) == Refusal("busy", "later", None, 0xFFFF)
    newer = Refusal("version", "this side speaks version 3", NONCE, version=3)
    assert decode(encode(newer)) == newer
    with pytest.raises(DecodeError, match="protocol version 0") as caught:
        decode(refusal_with(version="0000"))
    assert caught.type is DecodeError and caught.value.field == "version"


# ------------------------------------------------------------------------------------------------ hostile input

BAD_SOURCE = VM_BODY.replace("06e7ffbf790101", "06e7ffbf790100")  # the NIC's offered bitmap not minimal


CASES = [
    (offer_with(nonce="0f" + NONCE.hex()[2:]), "a nonce is 16 bytes, not 15", "nonce"),
    (offer_with(nonce="11" + NONCE.hex() + "00"), "a nonce is 16 bytes, not 17", "nonce"),
    (offer_with(made_at_ms=varint(1 << 48).hex()), "over its limit", "made_at_ms"),
    (offer_with(mode="03"), "3 is not one of 1 .strict., 2 .lenient.", "mode"),
    (offer_with(policy="02" + t("b") + "01" + t("a") + "01"), "property 'a' out of order", "policy[1].property"),
    (offer_with(policy="02" + t("a") + "01" + t("a") + "02"), "property 'a' given twice", "policy[1].property"),
    (offer_with(policy="01" + t("a") + "00"), "0 is not one of 1 .off.", "policy[0].tri"),
    (offer_with(dest_address="02" + t("x")), "presence flag 2", "dest_address"),
    (offer_with(source=embedded(BAD_SOURCE)), "trailing zero byte", "source.nics[0].offered"),
    (offer_with(source=embedded(VM_BODY.replace("026831", "02ff31", 1))), "UTF-8", "source.head.host"),
    (offer_with(source=embedded(VM_BODY + "00")), "1 bytes after the VM report's last field", "source"),
    (offer_with(source="808040"), "truncated", "source"),
    (offer_with(source="818040"), "over its limit 1048576", "source"),
    (offer_with(ext="00" "00"), "1 bytes after its last field", None),
    (answer_with(nonce="00"), "a nonce is 16 bytes, not 0", "nonce"),
    (answer_with(truth="05"), "5 is not one of 1 .incoming.", "truth"),
    (answer_with(outcome="00"), "0 is not one of", "outcome"),
    (answer_with(findings=finding_with(code=t("no-such-rule"))), "unknown finding code 'no-such-rule'",
     "findings[0].code"),
    (answer_with(findings=finding_with(severity="06")), "6 is not one of", "findings[0].severity"),
    (answer_with(findings=finding_with(bit="01" + varint(1 << 16).hex())), "over its limit 65535", "findings[0].bit"),
    (answer_with(findings=finding_with(negotiated="03")), "3 is not 0 .unknown.", "findings[0].negotiated"),
    (answer_with(findings="02" + "".join(FINDING.values()) + finding_with(severity="00")[2:]), "0 is not one of",
     "findings[1].severity"),
    (answer_with(findings=varint(MAX_FINDINGS + 1).hex()), "over its limit 4096", "findings"),
    (answer_with(adjustments="01" + t("net0") + "01" + t("csum") + "03"), "3 is not one of 1 .off., 2 .on.",
     "adjustments[0].properties[0].value"),
    (answer_with(recommendations="02" + t("net1") + "00" + t("net0") + "00"), "nic 'net0' out of order",
     "recommendations[1].nic"),
    (answer_with(truth="03", dest="01" + embedded(VM_BODY)), "an answer from dump must not carry the destination",
     "dest"),
    (answer_with(truth="02"), "an answer from scratch lacks the destination's report", "dest"),
    (answer_with(truth="03", dump="01" + embedded("00" * 20)), "a dump needs a host name", "dump.host"),
    (answer_with(truth="01", dest="01" + embedded(BAD_SOURCE)), "trailing zero byte", "dest.nics[0].offered"),
    (refusal_with(code=t("sorry")), "unknown refusal code 'sorry'", "code"),
    (refusal_with(message="02ff31"), "invalid UTF-8", "message"),
    (refusal_with(nonce="01" "10" + NONCE.hex()[:-2], ext=""), "truncated", "nonce"),
    (refusal_with(ext="01"), "truncated", "ext"),
]


@pytest.mark.parametrize(("vector", "error", "field"), CASES, ids=[f"{field}:{error}" for _, error, field in CASES])
def test_errors_name_the_field(vector: bytes, error: str, field: str | None) -> None:
    with pytest.raises(DecodeError, match=error) as caught:
        decode(vector)
    assert caught.type is DecodeError and caught.value.field == field


def test_an_answer_from_dump_carries_the_dump() -> None:
    answer = real_answer(Truth.DUMP)
    assert decode(encode(answer)) == answer
    with pytest.raises(ValueError, match="an answer from dump carries the host's dump"):
        replace(answer, dump=None, dest=VM)


SMALL = [GOLDEN_OFFER, GOLDEN_ANSWER, GOLDEN_REFUSAL, replace(GOLDEN_ANSWER, truth=Truth.INCOMING, dest=VM),
         Answer(NONCE, Truth.DUMP, "d", Outcome.COMPATIBLE, Mode.STRICT, dump=host_dump("h", machines=("q35",)))]


@pytest.mark.parametrize("record", SMALL, ids=lambda r: type(r).__name__)
def test_truncation_at_every_byte_is_a_decode_error(record: Offer | Answer | Refusal) -> None:
    data = encode(record)
    body = data[12:-4]
    for cut in range(len(body)):
        with pytest.raises(DecodeError) as caught:
            decode(frame(body[:cut], data[6]))
        assert caught.type is DecodeError and caught.value.field is not None, cut
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            decode(data[:cut])


def decodes_or_fails(data: bytes) -> None:
    try:
        record = decode(data)
    except DecodeError:
        return
    assert isinstance(record, Offer | Answer | Refusal)


@pytest.mark.parametrize("record", SMALL, ids=lambda r: type(r).__name__)
def test_every_bit_flip_is_a_decode_error_or_a_message(record: Offer | Answer | Refusal) -> None:
    data = encode(record)
    body = data[12:-4]
    for i in range(len(body)):
        for bit in range(8):
            decodes_or_fails(frame(body[:i] + bytes([body[i] ^ 1 << bit]) + body[i + 1:], data[6]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SMALL), st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=8))
def test_fuzz_only_decode_error_escapes(record: Offer | Answer | Refusal, seed: int, junk: bytes) -> None:
    data = encode(record)
    body, rng = bytearray(data[12:-4]), random.Random(seed)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(body))
        choice = rng.randrange(3)
        if choice == 0:
            body[at] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif choice == 1:
            body[at:at] = junk
        else:
            del body[at:at + rng.randint(1, 8)]
    decodes_or_fails(frame(bytes(body), data[6]))


def test_hostile_lengths_do_not_allocate_out_of_proportion() -> None:
    hostile = [offer_with(source="808040"), answer_with(findings="a020"),  # 1 MiB of source, 4096 findings claimed
               answer_with(dest="01808040", truth="01"), refusal_with(message="8008")]
    tracemalloc.start()
    for data in hostile * 50:
        with pytest.raises(DecodeError):
            decode(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000


def test_a_message_over_the_record_size_is_an_encode_error() -> None:
    why = "w" * 1000
    big = Answer(NONCE, Truth.NONE, "h", Outcome.UNKNOWN, Mode.STRICT,
                 tuple(Finding(f"net{i}", Severity.UNKNOWN, "unreadable", why) for i in range(MAX_FINDINGS)))
    with pytest.raises(EncodeError, match=f"exceeds {MAX_RECORD_BYTES}"):
        encode(big)
    with pytest.raises(EncodeError, match="Offer, Answer, Refusal or Prepare"):
        encode(object())  # type: ignore[arg-type]


def test_a_prepare_round_trips_and_refuses_a_newer_version() -> None:
    prepare = Prepare(NONCE, "unix:/run/incoming.qmp")
    for key in (None, b"k"):
        assert decode(encode(prepare, key=key), key=key) == prepare
    data = bytearray(encode(prepare))
    data[12:14] = (2).to_bytes(2, "big")
    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "big")
    with pytest.raises(UnsupportedVersionError, match="handshake protocol version 2"):
        decode(bytes(data))
    whole = encode(prepare)
    for cut in range(len(whole)):
        with pytest.raises(DecodeError):
            decode(whole[:cut])
