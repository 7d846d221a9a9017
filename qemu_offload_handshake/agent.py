"""The destination's side of the handshake on the network and on stdio.

* ``Agent``: an asyncio server (``serve --listen HOST:PORT``), TLS 1.3 with client certificates required and
  checked against a CA (plaintext only with ``--insecure`` on a loopback address). One offer per connection,
  answered by ``answering.answer_offer``.
* ``answer_stdio``: one offer on stdin, one answer on stdout (``answer``: what ``handshake --ssh`` runs).

Limits (``Limits``): the TLS handshake and the offer must arrive within ``offer_deadline`` (a peer that sends one
byte a minute is dropped with a ``deadline`` refusal); at most ``max_concurrent`` offers are answered at once,
up to ``max_waiting`` more wait for a slot (at most ``wait_deadline``) and any beyond are refused ``busy`` at
once; an answer has ``answer_deadline``; a frame is at most ``max_frame`` bytes; stale and replayed offers are
refused (``core.protocol.ReplayGuard``). A connection's failure is its own: the agent logs one line and serves on.
Only read-only QMP reaches a QEMU the agent did not start (``answering``), and every scratch QEMU it starts is
gone when its handshake ends, however it ends (also when the agent is stopped mid-answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .answering import Destination, answer_offer, clip
from .core.errors import HandshakeError
from .core.exchange import Offer, Prepare, Refusal
from .core.model import VmReport
from .core.protocol import DEFAULT_WINDOW_MS, MAX_FRAME_BYTES, NEED_DATA, Connection, ProtocolError, ReplayGuard, Role
from .transport import is_loopback

__all__ = ["Agent", "Limits", "answer_stdio"]

_READ = 65536


@dataclass(frozen=True, slots=True)
class Limits:
    offer_deadline: float = 10.0  # from accepting the connection to a whole offer (TLS handshake included)
    answer_deadline: float = 60.0  # from the offer to the answer (a scratch QEMU included)
    max_concurrent: int = 8  # offers answered at once
    max_waiting: int = 512  # connections waiting for a slot; beyond: refused "busy"
    wait_deadline: float = 60.0  # how long one waits for a slot
    max_frame: int = MAX_FRAME_BYTES
    window_ms: int = DEFAULT_WINDOW_MS  # replay protection: offers older or newer than this are stale
    max_connections: int = 1024  # open at once, in any state; beyond, a new one is closed at once

    def __post_init__(self) -> None:
        for name in ("offer_deadline", "answer_deadline", "wait_deadline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_concurrent < 1 or self.max_waiting < 0 or self.window_ms < 1 or self.max_connections < 1:
            raise ValueError("max_concurrent, max_connections and window_ms must be positive, max_waiting not "
                             "negative")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _read_offer(conn: Connection, reader: asyncio.StreamReader,
                      on_prepare: Callable[[Prepare], Awaitable[None]]) -> Offer:
    while True:
        event = conn.next_event()
        while event is NEED_DATA:
            conn.receive_data(await reader.read(_READ))
            event = conn.next_event()
        if isinstance(event, Prepare):
            await on_prepare(event)
            continue
        assert isinstance(event, Offer)
        return event


async def _discard(task: asyncio.Future[VmReport] | None) -> None:
    """End a prepared probe nobody will use (its outcome, an error included, is dropped)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


@dataclass
class _Turn:
    """One connection's share of the limits: whether it holds a slot, and its prepared probe."""

    holding: bool = False
    prepared: asyncio.Future[VmReport] | None = None


class Agent:
    """``await agent.start(host, port)``, then it serves until ``await agent.close()``."""

    def __init__(self, dest: Destination, *, ssl_context: ssl.SSLContext | None, limits: Limits | None = None,
                 key: bytes | None = None, log: Callable[[str], None] | None = None) -> None:
        self.dest, self.ssl, self.limits, self.key = dest, ssl_context, limits or Limits(), key
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.replays = ReplayGuard(window_ms=self.limits.window_ms)
        self._slots = asyncio.Semaphore(self.limits.max_concurrent)
        self._waiting = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.answered = 0  # answers sent (for tests and the log)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        if self.ssl is None and not is_loopback(host):
            raise ValueError(f"plaintext only on a loopback address, not {host}")
        deadline = self.limits.offer_deadline if self.ssl else None
        self._server = await asyncio.start_server(self._connection, host, port, ssl=self.ssl,
                                                  ssl_handshake_timeout=deadline, limit=self.limits.max_frame,
                                                  backlog=1024)

    async def close(self) -> None:
        """Stop listening, end every handshake in progress (their scratch QEMUs go with them), and wait."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = self._peer(writer)
        started = time.monotonic()
        if len(self._tasks) >= self.limits.max_connections:
            writer.close()
            self.log(f"agent: {peer}: closed: {len(self._tasks)} connections open, the most this agent keeps")
            return
        self._tasks.add(task)
        try:
            outcome = await self._handle(reader, writer)
        except asyncio.CancelledError:
            outcome = "cancelled (the agent is stopping)"
            raise
        except (ConnectionError, OSError, ssl.SSLError) as err:
            outcome = f"connection lost: {err}"
        except Exception as err:  # one connection's bug must not end the agent
            outcome = f"internal error: {type(err).__name__}: {err}"
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
            self.log(f"agent: {peer}: {outcome} ({(time.monotonic() - started) * 1000:.0f} ms)")

    @staticmethod
    def _peer(writer: asyncio.StreamWriter) -> str:
        addr = writer.get_extra_info("peername")
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        cert = writer.get_extra_info("peercert")
        if isinstance(cert, dict):
            for rdn in cert.get("subject", ()):
                for name, value in rdn:
                    if name == "commonName":
                        return f"{where} ({value})"
        return where

    async def _refuse(self, conn: Connection, writer: asyncio.StreamWriter, refusal: Refusal) -> str:
        with contextlib.suppress(Exception):
            writer.write(conn.send(refusal))
            await asyncio.wait_for(writer.drain(), 5)
        return f"refused {refusal.code}: {refusal.message}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        turn = _Turn()
        try:
            return await self._answer(conn=Connection(Role.DEST, key=self.key, max_frame=self.limits.max_frame),
                                      reader=reader, writer=writer, turn=turn)
        finally:
            await _discard(turn.prepared)
            if turn.holding:
                self._slots.release()

    async def _answer(self, *, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      turn: _Turn) -> str:
        limits = self.limits

        async def on_prepare(prepare: Prepare) -> None:
            """Probe the incoming QEMU while the source probes its own, if a slot is free at once (a prepare never
            gets past the limits)."""
            if not self._slots.locked() and not self.dest.refuses(prepare.dest_address):
                await self._slots.acquire()  # free: taken without yielding to other connections
                turn.holding = True
                turn.prepared = asyncio.ensure_future(self.dest.probe_incoming(prepare.dest_address))

        try:
            offer = await asyncio.wait_for(_read_offer(conn, reader, on_prepare), limits.offer_deadline)
        except TimeoutError:
            return await self._refuse(conn, writer, Refusal("deadline", f"no whole offer within "
                                                                        f"{limits.offer_deadline:g} s"))
        except ProtocolError as err:
            if getattr(err, "closed", False):
                return "closed without an offer"
            return await self._refuse(conn, writer, Refusal(getattr(err, "code", "malformed"), str(err)[:900]))
        refusal = self.replays.check(offer, _now_ms())
        if refusal is not None:
            return await self._refuse(conn, writer, refusal)
        if not turn.holding:
            if not self._slots.locked():
                await self._slots.acquire()  # a free slot is taken at once, without yielding to other connections
            elif self._waiting >= limits.max_waiting:
                return await self._refuse(conn, writer, Refusal("busy", f"{limits.max_concurrent} handshakes "
                                                                        f"answered and {self._waiting} waiting",
                                                                offer.nonce))
            else:
                self._waiting += 1
                try:
                    await asyncio.wait_for(self._slots.acquire(), limits.wait_deadline)
                except TimeoutError:
                    return await self._refuse(conn, writer, Refusal("busy", f"no free slot within "
                                                                            f"{limits.wait_deadline:g} s",
                                                                    offer.nonce))
                finally:
                    self._waiting -= 1
            turn.holding = True
        try:
            answer = await asyncio.wait_for(answer_offer(offer, self.dest, incoming=turn.prepared),
                                            limits.answer_deadline)
        except TimeoutError:
            return await self._refuse(conn, writer, Refusal("failed", f"no answer within "
                                                                      f"{limits.answer_deadline:g} s", offer.nonce))
        except (HandshakeError, ValueError, OSError) as err:  # a bug or the host failing: say so, serve on
            return await self._refuse(conn, writer, Refusal("failed", clip(f"the destination failed to answer: "
                                                                           f"{type(err).__name__}: {err}"),
                                                            offer.nonce))
        writer.write(conn.send(answer))
        await asyncio.wait_for(writer.drain(), limits.offer_deadline)
        self.answered += 1
        return f"answered {answer.outcome.value} from {answer.truth.value}"


async def answer_stdio(dest: Destination, *, limits: Limits | None = None, key: bytes | None = None,
                       stdin: asyncio.StreamReader | None = None) -> tuple[bytes, str]:
    """One offer from stdin (or ``stdin``), answered: (the reply's bytes to write, a line for the log). Stale
    offers are refused; a replay needs the ssh credentials that carried the original, and each ``answer`` is a
    new process, so no nonce memory is kept here."""
    limits = limits or Limits()
    loop = asyncio.get_running_loop()
    if stdin is None:
        stdin = asyncio.StreamReader(limit=limits.max_frame)
        mode = os.fstat(sys.stdin.fileno()).st_mode
        if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not sys.stdin.isatty()):
            # a file or a device such as /dev/null: epoll takes neither, and reading one never waits
            stdin.feed_data(await asyncio.to_thread(sys.stdin.buffer.read, limits.max_frame + 1))
            stdin.feed_eof()
        else:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
    conn = Connection(Role.DEST, key=key, max_frame=limits.max_frame)
    turn = _Turn()

    async def on_prepare(prepare: Prepare) -> None:
        if not dest.refuses(prepare.dest_address):
            turn.prepared = asyncio.ensure_future(dest.probe_incoming(prepare.dest_address))

    try:
        try:
            offer = await asyncio.wait_for(_read_offer(conn, stdin, on_prepare), limits.offer_deadline)
        except TimeoutError:
            refusal = Refusal("deadline", f"no whole offer on stdin within {limits.offer_deadline:g} s")
            return conn.send(refusal), f"refused: {refusal.message}"
        except ProtocolError as err:
            refusal = Refusal(getattr(err, "code", "malformed"), str(err)[:900])
            return conn.send(refusal), f"refused: {refusal.message}"
        stale = ReplayGuard(window_ms=limits.window_ms).check(offer, _now_ms())
        if stale is not None:
            return conn.send(stale), f"refused: {stale.message}"
        try:
            answer = await asyncio.wait_for(answer_offer(offer, dest, incoming=turn.prepared), limits.answer_deadline)
        except TimeoutError:
            refusal = Refusal("failed", f"no answer within {limits.answer_deadline:g} s", offer.nonce)
            return conn.send(refusal), f"refused: {refusal.message}"
        except (HandshakeError, ValueError, OSError) as err:
            refusal = Refusal("failed", clip(f"the destination failed to answer: {type(err).__name__}: {err}"),
                              offer.nonce)
            return conn.send(refusal), f"refused: {refusal.message}"
        return conn.send(answer), f"answered {answer.outcome.value} from {answer.truth.value}"
    finally:
        await _discard(turn.prepared)
