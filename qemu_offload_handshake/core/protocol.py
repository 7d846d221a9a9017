"""The handshake protocol, sans-IO (in the style of h11): bytes in, events out; events in, bytes out.

One connection carries one exchange: the source sends an ``Offer``, optionally announced by a ``Prepare`` with the
offer's nonce and incoming-QEMU address (so that the destination can probe that QEMU while the source probes its
own); the destination sends an ``Answer`` (echoing the offer's nonce) or a ``Refusal``; then both are done. Each
message is one wire-format record (types 6-9:
``wire_handshake``) with a size cap (``max_frame``), optionally HMAC-signed with a shared key. ``Connection``
refuses whatever comes out of that order, in either direction:

* sending out of order (an answer before an offer arrived, a second offer, an answer with another nonce) raises
  ``LocalProtocolError``: a bug on this side;
* receiving out of order or malformed (a second frame, an answer to another offer, a frame over the cap, garbage,
  a newer protocol or format version, the peer closing mid-frame) raises ``RemoteProtocolError``, whose ``code``
  is the ``Refusal`` code a destination answers with (``malformed`` or ``version``); the connection is then in
  ``State.ERROR`` and stays there.

``ReplayGuard`` is the destination's memory of offers: an offer made too long ago or too far in the future is
``stale``, one whose nonce was already seen within that window is ``replayed``. Time and randomness come from the
caller (``now_ms``, ``nonce``): nothing here reads a clock, a socket or a file.
"""

from __future__ import annotations

import enum
import heapq

from .errors import DecodeError, HandshakeError, UnsupportedVersionError
from .exchange import PROTOCOL_VERSION, Answer, Offer, Prepare, Refusal
from .wire import CRC_SIZE as _CRC
from .wire import HEADER_SIZE, MAC_SIZE, MAGIC, Record, decode, encode

__all__ = [
    "DEFAULT_WINDOW_MS",
    "MAX_FRAME_BYTES",
    "NEED_DATA",
    "Connection",
    "LocalProtocolError",
    "NeedData",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplayGuard",
    "Role",
    "State",
]

MAX_FRAME_BYTES = 1 << 20  # the default cap on one frame, header to HMAC
DEFAULT_WINDOW_MS = 120_000  # an offer older (or further in the future) than this is stale


class ProtocolError(HandshakeError):
    """The exchange went out of order or a frame could not be read."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow now (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow, or bytes that are not a valid frame. ``code`` is the
    refusal code a destination answers it with."""

    def __init__(self, message: str, *, code: str = "malformed", closed: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.closed = closed  # the peer closed the connection before sending a byte


class Role(enum.Enum):
    SOURCE = "source"
    DEST = "destination"


class State(enum.Enum):
    IDLE = "idle"  # nothing exchanged yet
    PREPARED = "prepared"  # the prepare is on its way (source: sent; destination: read), the offer is to come
    WAITING = "waiting"  # the offer is on its way (source: sent, awaiting the reply; destination: read, to answer)
    DONE = "done"  # the reply was sent or read
    ERROR = "error"  # the peer broke the protocol; nothing more is read or sent


class NeedData:
    """``next_event``'s answer when more bytes are needed (``NEED_DATA``)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
Event = Offer | Answer | Refusal | Prepare
_WHAT = {Offer: "an offer", Answer: "an answer", Refusal: "a refusal", Prepare: "a prepare"}


class Connection:
    """One side of one handshake. ``send(event)`` gives the bytes to write; ``receive_data(data)`` takes bytes
    read (``b""`` at end of stream) and ``next_event()`` gives the next event or ``NEED_DATA``."""

    def __init__(self, role: Role, *, key: bytes | None = None, max_frame: int = MAX_FRAME_BYTES) -> None:
        if not isinstance(role, Role):
            raise TypeError("role must be a Role")
        if isinstance(max_frame, bool) or not isinstance(max_frame, int) or max_frame < HEADER_SIZE + _CRC:
            raise ValueError(f"max_frame must be at least {HEADER_SIZE + _CRC} bytes")
        self.role, self.key, self.max_frame = role, key, max_frame
        self.state = State.IDLE
        self.prepare: Prepare | None = None  # the prepare sent (source) or read (destination), if any
        self.offer: Offer | None = None  # the offer sent (source) or read (destination)
        self.reply: Answer | Refusal | None = None  # the reply read (source) or sent (destination)
        self._buffer = bytearray()
        self._eof = False
        self._frames = 0  # frames read

    # ------------------------------------------------------------------------------------------ sending

    def send(self, event: Event) -> bytes:
        if self.state is State.ERROR and not (self.role is Role.DEST and isinstance(event, Refusal)
                                              and self.reply is None):
            raise LocalProtocolError("the connection failed; only the destination's refusal saying why may follow")
        if self.role is Role.SOURCE:
            if isinstance(event, Prepare):
                if self.state is not State.IDLE:
                    raise LocalProtocolError("a prepare comes first, once")
                self.prepare, self.state = event, State.PREPARED
            elif not isinstance(event, Offer):
                raise LocalProtocolError(f"the source sends only a prepare and an offer, not "
                                         f"{_WHAT.get(type(event), event)!r}")
            elif self.state not in (State.IDLE, State.PREPARED):
                raise LocalProtocolError("one offer per connection: an offer was already sent")
            elif self.prepare is not None and _mismatch(self.prepare, event):
                raise LocalProtocolError(f"the offer must be the one prepared: {_mismatch(self.prepare, event)}")
            else:
                self.offer, self.state = event, State.WAITING
        else:
            if isinstance(event, Offer | Prepare):
                raise LocalProtocolError("the destination does not send offers")
            if self.reply is not None:
                raise LocalProtocolError("the reply was already sent")
            if isinstance(event, Answer):
                if self.state is not State.WAITING or self.offer is None:
                    raise LocalProtocolError("an answer before an offer was read")
                if event.nonce != self.offer.nonce:
                    raise LocalProtocolError("the answer must echo the offer's nonce")
            elif not isinstance(event, Refusal):
                raise LocalProtocolError(f"not a protocol event: {event!r}")
            self.reply = event
            self.state = State.DONE if self.state is not State.ERROR else State.ERROR
        data = encode(event, key=self.key)
        if len(data) > self.max_frame:
            raise LocalProtocolError(f"the {type(event).__name__.lower()} is {len(data)} bytes, over the frame cap "
                                     f"of {self.max_frame}")
        return data

    # ------------------------------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise LocalProtocolError("data after the end of the stream")
        if not data:
            self._eof = True
        self._buffer += data

    def _fail(self, message: str, code: str = "malformed", *, closed: bool = False) -> RemoteProtocolError:
        self.state = State.ERROR
        return RemoteProtocolError(message, code=code, closed=closed)

    def next_event(self) -> Event | NeedData:
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection already failed")
        waits = (State.IDLE, State.PREPARED) if self.role is Role.DEST else (State.PREPARED, State.WAITING)
        expecting = self.state in waits
        buf = self._buffer
        if not expecting:
            if buf and self.role is Role.SOURCE and self.state is State.IDLE:
                raise self._fail("the destination sent something before the offer")
            if buf:
                raise self._fail(f"{len(buf)} bytes more than the protocol allows (one frame each way)")
            return NEED_DATA
        frame = self._frame()
        if frame is None:
            return NEED_DATA
        try:
            record = decode(frame, key=self.key)
        except UnsupportedVersionError as err:
            raise self._fail(str(err), "version") from err
        except DecodeError as err:
            raise self._fail(f"not a valid frame: {err}") from err
        return self._accept(record)

    def _frame(self) -> bytes | None:
        """The next whole frame from the buffer, or None when more is needed; refuses garbage and oversized
        frames as soon as their first bytes show it, before buffering the rest."""
        buf = self._buffer
        if buf[:len(MAGIC)] != MAGIC[:len(buf)]:
            raise self._fail(f"not a handshake frame (starts with {bytes(buf[:8])!r})")
        if len(buf) < HEADER_SIZE:
            if self._eof:
                raise self._fail(self._closed(len(buf)), closed=not buf)
            return None
        length = int.from_bytes(buf[8:12], "big")
        total = HEADER_SIZE + length + _CRC + (MAC_SIZE if buf[7] & 1 else 0)
        if total > self.max_frame:
            raise self._fail(f"a frame of {total} bytes is over the cap of {self.max_frame}")
        if len(buf) < total:
            if self._eof:
                raise self._fail(self._closed(len(buf)))
            return None
        frame = bytes(buf[:total])
        del buf[:total]
        self._frames += 1
        return frame

    def _closed(self, have: int) -> str:
        peer = "destination" if self.role is Role.SOURCE else "source"
        if have == 0:
            what = "before answering" if self.role is Role.SOURCE else "without sending an offer"
            return f"the {peer} closed the connection {what}"
        return f"the {peer} closed the connection in the middle of a frame ({have} bytes)"

    def _accept(self, record: Record) -> Event:
        if self.role is Role.DEST:
            if isinstance(record, Prepare) and self.state is State.IDLE:
                self.prepare, self.state = record, State.PREPARED
                return record
            if not isinstance(record, Offer):
                raise self._fail(f"expected an offer, got {_WHAT.get(type(record), 'another record type')}")
            if record.version != PROTOCOL_VERSION:  # the decoder refuses them already; kept for other readers
                raise self._fail(f"protocol version {record.version}: this side speaks {PROTOCOL_VERSION}", "version")
            if self.prepare is not None and _mismatch(self.prepare, record):
                raise self._fail(f"the offer is not the one prepared: {_mismatch(self.prepare, record)}")
            self.offer, self.state = record, State.WAITING
            return record
        if self.state is State.PREPARED and not isinstance(record, Refusal):
            raise self._fail(f"{_WHAT.get(type(record), 'a record')} before the offer was sent")
        if isinstance(record, Answer):
            assert self.offer is not None
            if record.nonce != self.offer.nonce:
                raise self._fail("the answer echoes another nonce: it is not the answer to this offer")
        elif isinstance(record, Refusal):
            if record.nonce is not None and self.offer is not None and record.nonce != self.offer.nonce:
                raise self._fail("the refusal names another offer's nonce")
        else:
            raise self._fail(f"expected an answer, got {_WHAT.get(type(record), 'another record type')}")
        self.reply, self.state = record, State.DONE
        return record


def _mismatch(prepare: Prepare, offer: Offer) -> str | None:
    if prepare.nonce != offer.nonce:
        return "another nonce"
    if prepare.dest_address != offer.dest_address:
        return f"another incoming QEMU ({offer.dest_address!r}, prepared {prepare.dest_address!r})"
    return None


class ReplayGuard:
    """The offers a destination has answered: refuses a stale offer and a replayed nonce. Nonces are kept until
    their offer would be stale anyway; at most ``max_nonces`` at a time (more: ``busy``, never forgetting one
    early, which would let a replay through)."""

    def __init__(self, *, window_ms: int = DEFAULT_WINDOW_MS, max_nonces: int = 100_000) -> None:
        if window_ms <= 0 or max_nonces <= 0:
            raise ValueError("window_ms and max_nonces must be positive")
        self.window_ms, self.max_nonces = window_ms, max_nonces
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []  # heap of (forget after, nonce)

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, offer: Offer, now_ms: int) -> Refusal | None:
        """None if the offer may be answered (its nonce is then remembered), else the refusal to send."""
        while self._expiry and self._expiry[0][0] < now_ms:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        age = now_ms - offer.made_at_ms
        if age > self.window_ms:
            return Refusal("stale", f"the offer was made {age / 1000:.1f} s ago, over the {self.window_ms / 1000:g} s "
                                    "this destination accepts (replay protection; are the clocks apart?)", offer.nonce)
        if -age > self.window_ms:
            return Refusal("stale", f"the offer is dated {-age / 1000:.1f} s in the future (are the clocks apart?)",
                           offer.nonce)
        if offer.nonce in self._seen:
            return Refusal("replayed", "an offer with this nonce was already answered: a replay", offer.nonce)
        if len(self._seen) >= self.max_nonces:
            return Refusal("busy", f"{len(self._seen)} recent offers remembered, the most this destination keeps",
                           offer.nonce)
        self._seen.add(offer.nonce)
        heapq.heappush(self._expiry, (offer.made_at_ms + self.window_ms, offer.nonce))
        return None
