"""The handshake protocol without an event loop (``core.protocol``, ``core.conclude``): the order of events in both
directions, frames split anywhere, hostile bytes, replay protection, and both ends of the decision."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decide import OFFERED, USO, nic, vm

from qemu_offload_handshake.core.conclude import answer_from, verdict_of
from qemu_offload_handshake.core.decide import Mode, decide
from qemu_offload_handshake.core.exchange import Answer, Offer, Prepare, Refusal, Truth, overrides
from qemu_offload_handshake.core.model import Tri
from qemu_offload_handshake.core.policy import Policy
from qemu_offload_handshake.core.protocol import (
    NEED_DATA,
    Connection,
    LocalProtocolError,
    RemoteProtocolError,
    ReplayGuard,
    Role,
    State,
)
from qemu_offload_handshake.core.verdict import Outcome
from qemu_offload_handshake.core.wire import encode

NOW = 1_790_000_000_000
SOURCE = vm(nic(OFFERED & ~USO))  # a source without USO
MORE = vm(nic(OFFERED))  # a destination that also offers USO: adjustable
NONCE = bytes(range(16))


def offer(**changes: object) -> Offer:
    return dataclasses.replace(Offer(SOURCE, NONCE, NOW), **changes)  # type: ignore[arg-type]


def answer(o: Offer | None = None, dest: object = MORE) -> Answer:
    return answer_from(o or offer(), truth=Truth.SCRATCH, how="a test", dest=dest)  # type: ignore[arg-type]


def feed(conn: Connection, data: bytes, *, eof: bool = False) -> object:
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    return conn.next_event()


def test_one_offer_one_answer_in_order() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DEST)
    assert src.next_event() is NEED_DATA and src.state is State.IDLE
    data = src.send(offer())
    assert src.state.value == "waiting"
    got = feed(dst, data)
    assert got == offer() and dst.state is State.WAITING
    reply = answer()
    event = feed(src, dst.send(reply))
    assert event == reply and src.state.value == dst.state.value == "done"
    assert reply.outcome is Outcome.ADJUSTABLE and reply.adjustments == (("net0", (("guest_uso4", "off"),
                                                                                  ("guest_uso6", "off"),
                                                                                  ("host_uso", "off"))),)


@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=6))
@settings(max_examples=60, deadline=None)
def test_frames_split_anywhere_arrive_whole(cuts: list[int]) -> None:
    data = Connection(Role.SOURCE).send(offer())
    dst = Connection(Role.DEST)
    points = [*sorted({min(c, len(data)) for c in cuts} - {0}), len(data)]  # b"" would mean end of stream
    start, events = 0, []
    for point in dict.fromkeys(points):
        dst.receive_data(data[start:point])
        start = point
        events.append(dst.next_event())
    assert events[-1] == offer() and all(e is NEED_DATA for e in events[:-1])


def test_sending_out_of_order_is_refused_locally() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DEST)
    with pytest.raises(LocalProtocolError, match="only a prepare and an offer"):
        src.send(answer())
    src.send(offer())
    with pytest.raises(LocalProtocolError, match="one offer per connection"):
        src.send(offer())
    with pytest.raises(LocalProtocolError, match="before an offer"):
        dst.send(answer())
    with pytest.raises(LocalProtocolError, match="does not send offers"):
        dst.send(offer())
    feed(dst, Connection(Role.SOURCE).send(offer()))
    with pytest.raises(LocalProtocolError, match="echo the offer's nonce"):
        dst.send(answer(offer(nonce=bytes(16))))
    dst.send(answer())
    with pytest.raises(LocalProtocolError, match="already sent"):
        dst.send(Refusal("busy", "late"))


def test_a_prepare_announces_the_offer_and_must_match_it() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DEST)
    prepared = Prepare(NONCE, "unix:/run/incoming.qmp")
    first = src.send(prepared)
    assert src.state is State.PREPARED and feed(dst, first) == prepared and dst.state is State.PREPARED
    with pytest.raises(LocalProtocolError, match="another incoming QEMU"):
        src.send(offer(dest_address="unix:/other.qmp"))
    with pytest.raises(LocalProtocolError, match="another nonce"):
        src.send(offer(dest_address="unix:/run/incoming.qmp", nonce=bytes(16)))
    with pytest.raises(LocalProtocolError, match="comes first, once"):
        src.send(prepared)
    good = offer(dest_address="unix:/run/incoming.qmp")
    assert feed(dst, src.send(good)) == good and dst.state.value == "waiting"
    assert feed(src, dst.send(answer(good))) == answer(good)
    # a destination refuses an offer that is not the one prepared, and a second prepare
    dst = Connection(Role.DEST)
    feed(dst, first)
    with pytest.raises(RemoteProtocolError, match="not the one prepared: another nonce"):
        feed(dst, encode(offer(dest_address="unix:/run/incoming.qmp", nonce=bytes(16))))
    dst = Connection(Role.DEST)
    feed(dst, first)
    with pytest.raises(RemoteProtocolError, match="expected an offer, got a prepare"):
        feed(dst, first)
    # the source takes a refusal (not an answer) before its offer went out
    src = Connection(Role.SOURCE)
    src.send(prepared)
    assert isinstance(feed(src, Connection(Role.DEST).send(Refusal("busy", "full"))), Refusal)
    src = Connection(Role.SOURCE)
    src.send(prepared)
    with pytest.raises(RemoteProtocolError, match="an answer before the offer was sent"):
        feed(src, encode(answer(good)))


def test_a_refusal_may_come_first_and_ends_the_exchange() -> None:
    src, dst = Connection(Role.SOURCE), Connection(Role.DEST)
    data = src.send(offer())
    event = feed(src, dst.send(Refusal("busy", "8 answered, 512 waiting")))
    assert isinstance(event, Refusal) and event.code == "busy" and src.state is State.DONE
    assert data


@pytest.mark.parametrize(("role", "first", "message"), [
    (Role.DEST, "answer", "expected an offer, got an answer"),
    (Role.SOURCE, "offer", "expected an answer, got an offer"),
])
def test_receiving_the_wrong_event_is_refused(role: Role, first: str, message: str) -> None:
    conn = Connection(role)
    if role is Role.SOURCE:
        conn.send(offer())
    data = encode(answer()) if first == "answer" else encode(offer())
    with pytest.raises(RemoteProtocolError, match=message) as err:
        feed(conn, data)
    assert err.value.code == "malformed" and conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.next_event()


def test_an_answer_to_another_offer_is_refused() -> None:
    src = Connection(Role.SOURCE)
    src.send(offer())
    other = answer(offer(nonce=b"\xff" * 16))
    with pytest.raises(RemoteProtocolError, match="another nonce"):
        feed(src, encode(other))


def test_more_than_one_frame_is_refused() -> None:
    dst = Connection(Role.DEST)
    data = Connection(Role.SOURCE).send(offer())
    assert feed(dst, data + data[:5]) == offer()
    with pytest.raises(RemoteProtocolError, match="5 bytes more than the protocol allows"):
        dst.next_event()


def test_garbage_is_refused_at_its_first_bytes() -> None:
    dst = Connection(Role.DEST)
    with pytest.raises(RemoteProtocolError, match="not a handshake frame"):
        feed(dst, b"GET / HTTP/1.1\r\n")


def test_an_oversized_frame_is_refused_from_its_header() -> None:
    dst = Connection(Role.DEST, max_frame=4096)
    header = encode(offer())[:8] + (10_000_000).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError, match="over the cap of 4096"):
        feed(dst, header)


def test_a_newer_protocol_version_is_refused_with_the_version_code() -> None:
    data = bytearray(encode(offer()))
    body = 12
    data[body:body + 2] = (2).to_bytes(2, "big")  # the body starts with the protocol version
    end = len(data) - 4
    data[end:] = zlib.crc32(bytes(data[:end])).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError, match="version 2") as err:
        feed(Connection(Role.DEST), bytes(data))
    assert err.value.code == "version"


def test_a_newer_wire_format_is_refused_with_the_version_code() -> None:
    data = bytearray(encode(offer()))
    data[4] = 2
    with pytest.raises(RemoteProtocolError, match="unsupported version 2") as err:
        feed(Connection(Role.DEST), bytes(data))
    assert err.value.code == "version"


def test_end_of_stream_says_who_closed_and_when() -> None:
    with pytest.raises(RemoteProtocolError, match="closed the connection without sending an offer") as err:
        feed(Connection(Role.DEST), b"", eof=True)
    assert err.value.closed
    src = Connection(Role.SOURCE)
    src.send(offer())
    with pytest.raises(RemoteProtocolError, match="destination closed the connection before answering"):
        feed(src, b"", eof=True)
    src = Connection(Role.SOURCE)
    src.send(offer())
    with pytest.raises(RemoteProtocolError, match="in the middle of a frame"):
        feed(src, encode(answer())[:30], eof=True)


def test_after_a_remote_error_only_the_destinations_refusal_may_be_sent() -> None:
    dst = Connection(Role.DEST)
    with pytest.raises(RemoteProtocolError):
        feed(dst, b"XXXX")
    assert dst.send(Refusal("malformed", "not a frame"))
    with pytest.raises(LocalProtocolError):
        dst.send(Refusal("malformed", "again"))


def test_signed_frames_need_the_key() -> None:
    key = b"shared secret"
    dst = Connection(Role.DEST, key=key)
    assert feed(dst, Connection(Role.SOURCE, key=key).send(offer())) == offer()
    with pytest.raises(RemoteProtocolError, match="not signed"):
        feed(Connection(Role.DEST, key=key), Connection(Role.SOURCE).send(offer()))
    with pytest.raises(RemoteProtocolError, match="HMAC mismatch"):
        feed(Connection(Role.DEST, key=key), Connection(Role.SOURCE, key=b"other").send(offer()))


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
@settings(max_examples=300, deadline=None)
def test_hostile_bytes_give_only_protocol_errors(junk: bytes, at: int) -> None:
    good = encode(offer())
    data = good[:at] + junk + good[at + len(junk):]
    dst = Connection(Role.DEST)
    try:
        event = feed(dst, data, eof=True)
    except RemoteProtocolError:
        assert dst.state is State.ERROR
        return
    assert event is NEED_DATA or isinstance(event, Offer)


# ------------------------------------------------------------------------------------------------ replay


def test_replayed_and_stale_offers_are_refused() -> None:
    guard = ReplayGuard(window_ms=60_000)
    assert guard.check(offer(), NOW) is None
    again = guard.check(offer(), NOW + 1000)
    assert again is not None and again.code == "replayed"
    old = guard.check(offer(nonce=b"\x01" * 16), NOW + 61_000)
    assert old is not None and old.code == "stale" and "61.0 s ago" in old.message
    future = guard.check(offer(nonce=b"\x02" * 16, made_at_ms=NOW + 120_000), NOW)
    assert future is not None and future.code == "stale" and "future" in future.message
    # once the offer itself is stale its nonce is forgotten: memory stays bounded by the window
    assert guard.check(offer(nonce=b"\x03" * 16, made_at_ms=NOW + 200_000), NOW + 200_000) is None
    assert len(guard) == 1


def test_the_replay_memory_is_bounded_and_never_forgets_early() -> None:
    guard = ReplayGuard(window_ms=60_000, max_nonces=3)
    for i in range(3):
        assert guard.check(offer(nonce=bytes([i]) * 16), NOW) is None
    busy = guard.check(offer(nonce=b"\x09" * 16), NOW)
    assert busy is not None and busy.code == "busy"
    assert guard.check(offer(nonce=b"\x09" * 16), NOW + 60_001 + 1) is not None  # stale by then
    assert guard.check(offer(nonce=b"\x09" * 16, made_at_ms=NOW + 61_000), NOW + 61_000) is None


# ------------------------------------------------------------------------------------------------ decisions


def test_the_source_renders_the_same_verdict_as_a_direct_precheck() -> None:
    for mode in Mode:
        o = offer(mode=mode, policy=(("guest_ecn", Tri.OFF),))
        direct = decide(SOURCE, MORE, mode=mode, policy=Policy({"guest_ecn": Tri.OFF}))
        verdict = verdict_of(o, answer(o))
        assert (verdict.outcome, verdict.adjustments) == (direct.outcome, direct.adjustments)
        assert [f.code for f in verdict.findings if f.code not in ("handshake",)] == [f.code for f in direct.findings]
        assert any(f.code == "handshake" and "a test" in f.why for f in verdict.findings)


def test_a_destination_that_disagrees_makes_the_verdict_unknown() -> None:
    o = offer()
    lying = dataclasses.replace(answer(o), outcome=Outcome.COMPATIBLE, adjustments=())
    verdict = verdict_of(o, lying)
    assert verdict.verdict == "unknown"
    assert any(f.code == "handshake-disagrees" and "concluded compatible" in f.why for f in verdict.findings)
    no_truth = Answer(o.nonce, Truth.NONE, "nothing", Outcome.COMPATIBLE, Mode.STRICT)
    assert verdict_of(o, no_truth).verdict == "unknown"


def test_no_truth_is_never_compatible() -> None:
    o = offer()
    ans = answer_from(o, truth=Truth.NONE, how="nothing")
    assert ans.outcome is Outcome.UNKNOWN and ans.dest is None
    blocked = answer_from(o, truth=Truth.NONE, how="no machine type",
                          findings=[("", "dest-cannot-run", "no pc-q35-10.0 here")])
    assert blocked.outcome is Outcome.BLOCKED
    assert [f.code for f in verdict_of(o, blocked).findings] == ["dest-cannot-run", "handshake"]


def test_an_unknown_policy_property_is_answered_unknown() -> None:
    o = offer(policy=(("future_offload", Tri.ON),))
    ans = answer(o)
    assert ans.outcome is Outcome.UNKNOWN and ans.truth is Truth.NONE
    assert "future_offload" in ans.findings[0].why


def test_overrides_are_sorted_and_checked() -> None:
    assert overrides({"b": {"y": "off", "x": "on"}, "a": {}}) == (("a", ()), ("b", (("x", "on"), ("y", "off"))))
    with pytest.raises(ValueError, match="on or off"):
        Answer(NONCE, Truth.SCRATCH, "x", Outcome.ADJUSTABLE, Mode.STRICT, adjustments=(("n", (("p", "auto"),)),),
               dest=MORE)


@pytest.mark.parametrize(("outcome", "findings"), [
    (Outcome.UNKNOWN, ()),
    (Outcome.BLOCKED, ()),
    (Outcome.UNKNOWN, (("", "probe-failed", "sent as info"),)),
    (Outcome.COMPATIBLE, (("", "dest-cannot-run", "no machine type"),)),
])
def test_an_answer_without_truth_is_never_compatible_whatever_it_says(
        outcome: Outcome, findings: tuple[tuple[str, str, str], ...]) -> None:
    from qemu_offload_handshake.core.rules import Severity
    from qemu_offload_handshake.core.verdict import Finding
    o = offer()
    sent = tuple(Finding(d, Severity.INFO, c, w) for d, c, w in findings)  # severities as a peer may send them
    ans = Answer(o.nonce, Truth.NONE, "nothing", outcome, Mode.STRICT, sent)
    verdict = verdict_of(o, decode_one(encode(ans)))
    assert verdict.verdict in ("blocked", "unknown"), verdict
    if not findings or outcome is Outcome.COMPATIBLE:
        assert any(f.code == "handshake-disagrees" for f in verdict.findings), verdict.findings


def decode_one(data: bytes) -> Answer:
    from qemu_offload_handshake.core.wire import decode
    record = decode(data)
    assert isinstance(record, Answer)
    return record
