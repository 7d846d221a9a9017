"""The destination's answer against QEMUs that misbehave or must not be touched (the fake QMP server, which records
every command it receives): only read-only commands reach an incoming QEMU the destination did not start, and a
hung or unreachable one gives an ``unknown`` answer that says why, within the deadline."""

from __future__ import annotations

import secrets
import time

from fakeqmp import HANG

from qemu_offload_handshake.answering import Destination, answer_offer
from qemu_offload_handshake.api import probe
from qemu_offload_handshake.core.conclude import verdict_of
from qemu_offload_handshake.core.exchange import Offer, Truth
from qemu_offload_handshake.core.verdict import Outcome
from qemu_offload_handshake.qmp import HMP_READ_ONLY, READ_ONLY_COMMANDS


async def offer_for(source: str, dest: str | None) -> Offer:
    return Offer(await probe(source), secrets.token_bytes(16), time.time_ns() // 1_000_000, dest_address=dest)


async def test_only_read_only_commands_reach_the_incoming_qemu(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    source, dest = await serve(), await serve()
    offer = await offer_for(source, dest)
    answer = await answer_offer(offer, Destination(qemu=None))
    assert answer.truth is Truth.INCOMING and answer.outcome is Outcome.COMPATIBLE, answer.findings
    sent = set(fakes[1].received) - {"qmp_capabilities"}  # the QMP handshake itself
    assert sent and sent <= READ_ONLY_COMMANDS, fakes[1].received
    assert set(fakes[1].hmp_lines) <= HMP_READ_ONLY, fakes[1].hmp_lines
    assert verdict_of(offer, answer).verdict == "compatible"


async def test_a_hung_incoming_qemu_is_unknown_within_the_deadline(serve) -> None:  # type: ignore[no-untyped-def]
    source, dest = await serve(), await serve(overrides={"x-query-virtio": HANG})
    started = time.monotonic()
    answer = await answer_offer(await offer_for(source, dest), Destination(qemu=None, timeout=0.5))
    assert time.monotonic() - started < 5
    assert answer.truth is Truth.NONE and answer.outcome is Outcome.UNKNOWN
    assert "could not be probed" in answer.findings[0].why, answer.findings


async def test_an_unreachable_incoming_qemu_and_no_truth_at_all(serve, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = await serve()
    answer = await answer_offer(await offer_for(source, f"unix:{tmp_path}/none.sock"), Destination(qemu=None))
    assert answer.outcome is Outcome.UNKNOWN and "could not be probed" in answer.findings[0].why
    nothing = await answer_offer(await offer_for(source, None), Destination(qemu=None))
    assert nothing.truth is Truth.NONE and nothing.outcome is Outcome.UNKNOWN
    assert "neither a QEMU to start nor a dump" in nothing.findings[0].why


async def test_an_address_outside_allow_dest_is_not_probed(serve, fakes) -> None:  # type: ignore[no-untyped-def]
    source, dest = await serve(), await serve()
    answer = await answer_offer(await offer_for(source, dest), Destination(qemu=None, allow_dest=("unix:/run/qemu/",)))
    assert answer.outcome is Outcome.UNKNOWN and "not under an address this destination probes" in \
        answer.findings[0].why, answer.findings
    assert fakes[1].received == []
    allowed = Destination(qemu=None, allow_dest=(f"unix:{dest.removeprefix('unix:').rsplit('/', 1)[0]}/",))
    assert (await answer_offer(await offer_for(source, dest), allowed)).truth is Truth.INCOMING


async def test_long_texts_are_cut_to_fit_the_answer(serve) -> None:  # type: ignore[no-untyped-def]
    source = await serve()
    answer = await answer_offer(await offer_for(source, "unix:/tmp/" + "x" * 1010), Destination(qemu=None))
    assert answer.outcome is Outcome.UNKNOWN and len(answer.how.encode()) <= 1024
