"""What goes wrong between hosts, on a real agent and a real sshd: wrong, expired and untrusted certificates, hostile
frames, replayed and stale offers, a dropped connection, a peer that sends a byte at a time, an agent restarted
mid-handshake, more handshakes than the agent answers at once, ssh refusing. Each gives the client a clear error
(an ``unknown`` verdict naming the cause, exit 4), and the agent keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import ssl
import time
from pathlib import Path

import pytest
from test_handshake_real import PY, Agent, agent, cli_json, hosts, pki, sshd, tls, via_ssh

from qemu_offload_handshake.agent import Agent as InProcessAgent
from qemu_offload_handshake.agent import Limits
from qemu_offload_handshake.answering import Destination
from qemu_offload_handshake.api import probe
from qemu_offload_handshake.core.exchange import Answer, Offer, Refusal
from qemu_offload_handshake.core.protocol import Connection, Role
from qemu_offload_handshake.core.wire import decode
from qemu_offload_handshake.lab import Lab, Vm, VmSpec
from qemu_offload_handshake.lab.certs import Pki
from qemu_offload_handshake.lab.sshd import Sshd
from qemu_offload_handshake.transport import client_context, exchange_tls

pytestmark = pytest.mark.qemu
__all__ = ["hosts", "pki", "sshd"]  # fixtures shared with test_handshake_real


def unknown_because(data: dict[str, object]) -> str:
    assert data["verdict"] == "unknown", data
    return " ".join(f["why"] for f in data["findings"] if f["code"] == "probe-failed")  # type: ignore[attr-defined]


def context(pki: Pki) -> ssl.SSLContext:
    return client_context(str(pki.client_cert), str(pki.client_key), str(pki.ca))


async def offer_of(vm: Vm, **changes: object) -> Offer:
    report = await probe(vm.address)
    fields: dict[str, object] = {"nonce": secrets.token_bytes(16), "made_at_ms": time.time_ns() // 1_000_000}
    return Offer(report, **(fields | changes))  # type: ignore[arg-type]


async def raw(pki: Pki | None, port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send bytes as they are (over TLS, or plaintext with its end of stream when ``pki`` is None), return all the
    agent sends back until it closes."""
    ctx = context(pki) if pki else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if ctx
                                                   else None)
    try:
        writer.write(data)
        await writer.drain()
        if ctx is None:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def reply_of(data: bytes) -> Answer | Refusal:
    record = decode(data)
    assert isinstance(record, Answer | Refusal), record
    return record


async def good(pki: Pki, a: Agent, vm: Vm) -> None:
    code, data = await cli_json("handshake", "--source", vm.address, "--dest", vm.address, *tls(pki, a))
    assert (code, data["verdict"]) == (0, "compatible"), data
    assert a.proc.returncode is None


async def test_certificates_the_agent_or_the_client_must_refuse(qlab: Lab, pki: Pki) -> None:
    vm = await qlab.start(VmSpec())
    async with agent(pki) as a:
        for cert, key, ca, cause in (
            (pki.wrong_client_cert, pki.wrong_client_key, pki.ca, "refused this side's certificate at the TLS "
                                                                   "handshake: its CA did not sign it"),
            (pki.expired_client_cert, pki.expired_client_key, pki.ca, "refused this side's certificate at the TLS "
                                                                       "handshake: it has expired"),
            (pki.client_cert, pki.client_key, pki.other_ca, "does not trust the agent's certificate"),
        ):
            code, data = await cli_json("handshake", "--source", vm.address, "--agent", a.address, "--cert", str(cert),
                                        "--key", str(key), "--ca", str(ca))
            assert code == 4 and cause in unknown_because(data), (cause, data)
        await good(pki, a, vm)
    # the agent is gone now
    code, data = await cli_json("handshake", "--source", vm.address, "--agent", a.address, *tls(pki, a)[2:])
    assert code == 4 and "refused the connection" in unknown_because(data), data


async def test_hostile_frames_replays_and_stale_offers_are_refused_and_the_agent_serves_on(qlab: Lab,
                                                                                           pki: Pki) -> None:
    vm = await qlab.start(VmSpec())
    async with agent(pki) as a:
        offer = await offer_of(vm, dest_address=vm.address)
        frame = Connection(Role.SOURCE).send(offer)
        first = reply_of(await raw(pki, a.port, frame))
        assert isinstance(first, Answer) and first.outcome.value == "compatible"
        again = reply_of(await raw(pki, a.port, frame))
        assert isinstance(again, Refusal) and again.code == "replayed", again
        stale = Connection(Role.SOURCE).send(await offer_of(vm, made_at_ms=time.time_ns() // 1_000_000 - 3_600_000))
        refusal = reply_of(await raw(pki, a.port, stale))
        assert isinstance(refusal, Refusal) and refusal.code == "stale" and "s ago" in refusal.message
        await good(pki, a, vm)
    assert any("refused replayed" in line for line in a.log) and any("refused stale" in line for line in a.log)
    async with agent(pki, insecure=True) as a:  # plaintext on loopback: a fuzzed frame can end with end-of-stream
        rng = random.Random(9)
        for case in range(40):  # fuzzed frames: bytes changed, cut short, or the length made huge
            data = bytearray(Connection(Role.SOURCE).send(await offer_of(vm)) if case % 10 == 0 else frame)
            if case % 3 == 0:
                data = data[:rng.randrange(1, len(data))]
            elif case % 3 == 1:
                for _ in range(rng.randrange(1, 6)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                data[8:12] = (0x7FFFFFFF).to_bytes(4, "big")
            back = await raw(None, a.port, bytes(data))
            if back:
                reply = reply_of(back)
                assert isinstance(reply, Refusal | Answer), reply
                if isinstance(reply, Refusal):
                    assert reply.code in ("malformed", "version", "replayed", "stale"), reply
        assert reply_of(await raw(None, a.port, b"GET / HTTP/1.1\r\n\r\n")).code == "malformed"  # type: ignore[union-attr]
        code, verdict = await cli_json("handshake", "--source", vm.address, "--dest", vm.address, "--agent",
                                       a.address, "--insecure")
        assert (code, verdict["verdict"]) == (0, "compatible"), verdict
    assert any("refused malformed" in line for line in a.log)


async def test_a_dropped_connection_and_a_slow_peer_are_dropped(qlab: Lab, pki: Pki) -> None:
    vm = await qlab.start(VmSpec())
    async with agent(pki, "--timeout", "1") as a:
        frame = Connection(Role.SOURCE).send(await offer_of(vm))
        _, cut = await asyncio.open_connection("127.0.0.1", a.port, ssl=context(pki), server_hostname="127.0.0.1")
        cut.write(frame[:20])  # then the connection drops
        await cut.drain()
        cut.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port, ssl=context(pki),
                                                       server_hostname="127.0.0.1")
        started = time.monotonic()
        for byte in frame[:10]:  # one byte every 0.3 s: the whole offer must arrive within --timeout
            if reader.at_eof():
                break
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.3)
        back = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        refusal = reply_of(back)
        assert isinstance(refusal, Refusal) and refusal.code == "deadline", refusal
        assert time.monotonic() - started < 5
        # a TCP connection that never starts TLS is closed at the same deadline
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", a.port)
        assert await asyncio.wait_for(plain_reader.read(), 10) == b""
        plain_writer.close()
        await good(pki, a, vm)
    assert any("in the middle of a frame" in line for line in a.log), a.log


async def test_an_agent_restarted_mid_handshake(qlab: Lab, pki: Pki, hosts: dict[str, Path],
                                                tmp_path: Path) -> None:
    """SIGTERM while a scratch QEMU is starting: the client says the agent closed before answering, the agent
    leaves no QEMU or tap behind (the leak check), and the restarted agent on the same port answers."""
    vm = await qlab.start(VmSpec())
    marker = tmp_path / "started"
    slow = tmp_path / "slow-qemu"
    slow.write_text(f"#!/bin/sh\n[ \"$1\" = -device ] || {{ touch {marker}; sleep 3; }}\nexec {hosts['10']} \"$@\"\n")
    slow.chmod(0o755)
    async with agent(pki, "--qemu", str(slow)) as a:
        port = a.port
        client = asyncio.ensure_future(cli_json("handshake", "--source", vm.address, *tls(pki, a)))
        while not marker.exists():
            assert not client.done(), client.result()
            await asyncio.sleep(0.05)
        a.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(a.proc.wait(), 15) == 0
        code, data = await client
        assert code == 4 and "closed the connection before answering" in unknown_because(data), data
    assert any("cancelled" in line for line in a.log), a.log
    async with agent(pki, listen=f"127.0.0.1:{port}") as b:
        await good(pki, b, vm)


async def test_more_handshakes_than_the_agent_answers_at_once(qlab: Lab, pki: Pki, hosts: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """One answered at a time, one more may wait: of three at once, two are answered and one is refused busy."""
    vm = await qlab.start(VmSpec())
    slow = tmp_path / "slow-qemu"
    slow.write_text(f"#!/bin/sh\n[ \"$1\" = -device ] || sleep 1\nexec {hosts['10']} \"$@\"\n")
    slow.chmod(0o755)
    from qemu_offload_handshake.transport import server_context
    server = InProcessAgent(Destination(str(slow)), ssl_context=server_context(
        str(pki.server_cert), str(pki.server_key), str(pki.ca)), limits=Limits(max_concurrent=1, max_waiting=1),
        log=lambda line: None)
    await server.start("127.0.0.1", 0)
    try:
        offers = [await offer_of(vm) for _ in range(3)]
        replies = await asyncio.gather(*(exchange_tls(o, "127.0.0.1", server.port, ssl_context=context(pki))
                                         for o in offers))
    finally:
        await server.close()
    kinds = sorted(type(r).__name__ for r in replies)
    assert kinds == ["Answer", "Answer", "Refusal"], replies
    busy = next(r for r in replies if isinstance(r, Refusal))
    assert busy.code == "busy" and "1 waiting" in busy.message, busy


async def test_ssh_refusals_are_clear(qlab: Lab, sshd: Sshd, tmp_path: Path) -> None:
    vm = await qlab.start(VmSpec())
    other = tmp_path / "other"
    await (await asyncio.create_subprocess_exec("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other),
                                                stdout=asyncio.subprocess.DEVNULL)).wait()
    args = via_ssh(sshd)
    options = [o if not o.startswith("IdentityFile=") else f"IdentityFile={other}" for o in sshd.options]
    wrong_key = [*args[:4], *(x for o in options for x in ("--ssh-option", o))]
    code, data = await cli_json("handshake", "--source", vm.address, *wrong_key)
    assert code == 4 and "exit status 255" in unknown_because(data) and "Permission denied" in unknown_because(data)
    no_tool = [*args[:2], "--remote-command", "/nonexistent/python -m qemu_offload_handshake answer", *args[4:]]
    code, data = await cli_json("handshake", "--source", vm.address, *no_tool)
    assert code == 4 and "exit status 127" in unknown_because(data), data
    code, data = await cli_json("handshake", "--source", vm.address, "--dest", vm.address, *args)
    assert (code, data["verdict"]) == (0, "compatible"), data


def test_answer_on_stdio_refuses_garbage_and_says_so() -> None:
    import subprocess
    done = subprocess.run([PY, "-m", "qemu_offload_handshake", "answer", "--no-scratch", "--dump", os.devnull],
                          input=b"", capture_output=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.startswith(b"error: ")
    done = subprocess.run([PY, "-m", "qemu_offload_handshake", "answer"], input=b"QOHSgarbage", capture_output=True,
                          timeout=60, check=False)
    reply = reply_of(done.stdout)
    assert done.returncode == 0 and isinstance(reply, Refusal) and reply.code == "malformed", (done, reply)
    assert b"refused" in done.stderr
    with open(os.devnull, "rb") as empty:  # stdin a file, not a pipe: read as well
        done = subprocess.run([PY, "-m", "qemu_offload_handshake", "answer"], stdin=empty, capture_output=True,
                              timeout=60, check=False)
    reply = reply_of(done.stdout)
    assert done.returncode == 0 and isinstance(reply, Refusal) and "without sending an offer" in reply.message


async def test_handshakes_naming_one_incoming_qemu_take_turns(qlab: Lab, pki: Pki) -> None:
    """QEMU's monitor serves one client at a time (a third concurrent client was refused with EINVAL, seen on 10.0):
    the agent probes one incoming QEMU for one handshake at a time, so four at once are all answered."""
    from qemu_offload_handshake.api import handshake
    sources = [await qlab.start(VmSpec()) for _ in range(4)]
    dst = await qlab.start(VmSpec().destination())
    async with agent(pki) as a:
        verdicts = await asyncio.gather(*(handshake(s.address, agent=a.address, ssl_context=context(pki),
                                                    dest=dst.address) for s in sources))
    assert [v.verdict for v in verdicts] == ["compatible"] * 4, [v.findings for v in verdicts]
