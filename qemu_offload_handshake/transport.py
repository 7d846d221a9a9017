"""The handshake's transports, source side, and the TLS settings both sides share.

* ``exchange_tls``: one offer to an agent (``agent.serve``) over TLS 1.3 with client certificates (or plaintext
  on a loopback address, when asked for explicitly), one answer back.
* ``exchange_ssh``: one offer through the system's ``ssh`` to ``python -m qemu_offload_handshake answer`` on
  the destination host (ssh's own authentication, configuration and known hosts), one answer back on stdout.

Both drive a ``core.protocol.Connection``; every step has a deadline, and whatever goes wrong (refused
connection, TLS alert, ssh failure, a peer that closes early or sends garbage) is raised as ``ExchangeError``
with one sentence saying what happened. A ``Refusal`` from the destination is returned, not raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Sequence

from .core.errors import HandshakeError, UsageError
from .core.exchange import Answer, Offer, Prepare, Refusal
from .core.protocol import MAX_FRAME_BYTES, NEED_DATA, Connection, ProtocolError, Role

__all__ = ["DEFAULT_REMOTE_COMMAND", "ExchangeError", "check_ssh_destination", "client_context", "exchange_ssh",
           "exchange_tls", "is_loopback", "parse_hostport", "refused_certificate", "server_context"]

DEFAULT_REMOTE_COMMAND = "python3 -m qemu_offload_handshake answer"
_READ = 65536
_CERT = "qoh_cert_file"


class ExchangeError(HandshakeError):
    """The offer could not be sent or its answer not read (connection, TLS, ssh, protocol)."""


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT (e.g. 10.0.0.2:7447 or [::1]:7447)")
    return host, int(port)


def check_ssh_destination(destination: str) -> None:
    """An ssh destination, never an option in disguise."""
    if not destination or destination.startswith("-") or any(c.isspace() for c in destination):
        raise UsageError(f"--ssh {destination!r}: expected [USER@]HOST or ssh://[USER@]HOST[:PORT]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _context(purpose: ssl.Purpose, cert: str, key: str, ca: str) -> ssl.SSLContext:
    side = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for what in ("--cert/--key", "--ca"):
        try:
            if what == "--ca":
                ctx.load_verify_locations(ca)
            else:
                ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError, ValueError) as err:
            files = f"{cert}, {key}" if what != "--ca" else ca
            raise UsageError(f"{what} {files}: {getattr(err, 'strerror', None) or err}") from err
    ctx.verify_mode = ssl.CERT_REQUIRED
    setattr(ctx, _CERT, cert)
    return ctx


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The agent's: TLS 1.3 only, a client certificate signed by ``ca`` required."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The source's: TLS 1.3 only, the agent's certificate checked against ``ca`` and the agent's host name."""
    return _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)


def _ticketed(writer: asyncio.StreamWriter | None) -> bool:
    """Whether the agent sent a TLS 1.3 session ticket: it does once it accepted this side's certificate, and
    never when it refused it (it closes instead; seen with Python's ssl on OpenSSL 3.0: the client reads only end of
    stream or a reset, not the alert)."""
    obj = writer.get_extra_info("ssl_object") if writer is not None else None
    session = getattr(obj, "session", None)
    return bool(session is not None and session.has_ticket)


def refused_certificate(ctx: ssl.SSLContext) -> str:
    """Why the agent refused this side's certificate, as far as this side can tell from the certificate."""
    path = getattr(ctx, _CERT, None)
    head = "the agent refused this side's certificate at the TLS handshake"
    try:
        cert = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # the stdlib's PEM reader
        now = time.time()
        if ssl.cert_time_to_seconds(cert["notAfter"]) < now:
            return f"{head}: it has expired ({path}: not after {cert['notAfter']})"
        if ssl.cert_time_to_seconds(cert["notBefore"]) > now:
            return f"{head}: it is not valid yet ({path}: not before {cert['notBefore']})"
        issuer = ", ".join(f"{k}={v}" for rdn in cert.get("issuer", ()) for k, v in rdn)
    except Exception:
        return f"{head} (not signed by a CA it trusts, expired, or not for client authentication)"
    return f"{head}: its CA did not sign it, or it is not for client authentication ({path}: issued by {issuer})"


def tls_reason(err: BaseException) -> str:
    """An SSL error in words: who did not trust whom."""
    reason = getattr(err, "reason", None) or ""
    verify = getattr(err, "verify_message", None)
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return f"this side does not trust the agent's certificate ({verify or err})"
    for alert, why in (("UNKNOWN_CA", "its CA did not sign it"), ("CERTIFICATE_EXPIRED", "it has expired"),
                       ("CERTIFICATE_REQUIRED", "none was sent"), ("BAD_CERTIFICATE", "it is not acceptable"),
                       ("CERTIFICATE_REVOKED", "it was revoked"), ("DECRYPT_ERROR", "its key does not match")):
        if alert in reason:
            return f"the agent refused this side's certificate: {why} ({reason})"
    return f"TLS failed: {reason or err}"


async def _converse(conn: Connection, reader: asyncio.StreamReader) -> Answer | Refusal:
    event = conn.next_event()
    while event is NEED_DATA:
        data = await reader.read(_READ)
        conn.receive_data(data)
        event = conn.next_event()
    assert isinstance(event, Answer | Refusal)
    return event


async def _ready(offer: Offer | Awaitable[Offer]) -> Offer:
    return offer if isinstance(offer, Offer) else await offer


async def exchange_tls(offer: Offer | Awaitable[Offer], host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                       prepare: Prepare | None = None, timeout: float = 60.0, key: bytes | None = None,
                       max_frame: int = MAX_FRAME_BYTES) -> Answer | Refusal:
    """Send ``offer`` to the agent at ``host:port`` and return its reply, all within ``timeout`` seconds.
    ``ssl_context`` None: plaintext, allowed only to a loopback address. ``offer`` may still be in the making (a
    task): the connection is opened, and ``prepare`` sent, meanwhile."""
    if ssl_context is None and not is_loopback(host):
        raise UsageError(f"plaintext only to a loopback address, not {host} (give --cert, --key and --ca)")
    where = f"the agent at {host}:{port}"
    conn = Connection(Role.SOURCE, key=key, max_frame=max_frame)
    first = conn.send(prepare) if prepare is not None else b""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context,
                                                           server_hostname=host if ssl_context else None,
                                                           limit=max_frame)
            if first:
                writer.write(first)
            writer.write(conn.send(await _ready(offer)))
            await writer.drain()
            return await _converse(conn, reader)
    except TimeoutError as err:
        raise ExchangeError(f"{where} did not answer within {timeout:g} s") from err
    except ssl.SSLError as err:
        raise ExchangeError(f"{where}: {tls_reason(err)}") from err
    except ConnectionRefusedError as err:
        raise ExchangeError(f"{where} refused the connection (is the agent running?)") from err
    except (ProtocolError, ConnectionError, OSError) as err:
        if ssl_context is not None and writer is not None and not _ticketed(writer):
            raise ExchangeError(f"{where}: {refused_certificate(ssl_context)}") from err
        if isinstance(err, ProtocolError):
            raise ExchangeError(f"{where}: {err}") from err
        raise ExchangeError(f"{where}: the connection failed: {err.strerror or err}") from err
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)


async def _tail(stream: asyncio.StreamReader, keep: int = 1 << 16) -> bytes:
    """Everything a stream says until its end, of which the last ``keep`` bytes are kept (ssh's error is last)."""
    kept = b""
    while chunk := await stream.read(_READ):
        kept = (kept + chunk)[-keep:]
    return kept


async def exchange_ssh(offer: Offer | Awaitable[Offer], destination: str, *, prepare: Prepare | None = None,
                       remote_command: str = DEFAULT_REMOTE_COMMAND, ssh_options: Sequence[str] = (),
                       ssh: str = "ssh", timeout: float = 60.0, key: bytes | None = None,
                       max_frame: int = MAX_FRAME_BYTES) -> Answer | Refusal:
    """Run ``ssh [-o OPTION]... DESTINATION REMOTE_COMMAND`` with the offer on its stdin and read the answer from
    its stdout, all within ``timeout`` seconds (then ssh is killed). ``offer`` may still be in the making (a
    task): ssh is started, and ``prepare`` sent, meanwhile."""
    check_ssh_destination(destination)
    argv = [ssh, *(a for opt in ssh_options for a in ("-o", opt)), "-T", "-e", "none", "--", destination,
            remote_command]
    conn = Connection(Role.SOURCE, key=key, max_frame=max_frame)
    first = conn.send(prepare) if prepare is not None else b""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    start_new_session=True)
    except OSError as err:
        raise UsageError(f"cannot run {ssh}: {err.strerror or err}") from err
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.ensure_future(_tail(proc.stderr))
    where = f"ssh {destination}"
    answered = False
    try:
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError):  # ssh may exit (refused) before it read the offer
                proc.stdin.write(first)
                data = conn.send(await _ready(offer))
                proc.stdin.write(data)
                await proc.stdin.drain()
                proc.stdin.close()
            try:
                reply = await _converse(conn, proc.stdout)
                answered = True
                return reply
            except ProtocolError as err:
                await proc.wait()
                said = " / ".join(ln.strip() for ln in (await stderr).decode(errors="replace").splitlines()
                                  if ln.strip())[-600:]
                if proc.returncode == 255:
                    raise ExchangeError(f"{where} failed (exit status 255): {said or err}") from err
                if proc.returncode:
                    raise ExchangeError(f"{where}: the remote command {remote_command!r} failed (exit status "
                                        f"{proc.returncode}): {said or err}") from err
                raise ExchangeError(f"{where}: {err}") from err
    except TimeoutError as err:
        raise ExchangeError(f"{where} did not answer within {timeout:g} s") from err
    finally:
        if answered:  # ssh ends on its own in a moment
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 2)
        if proc.returncode is None:  # ssh and whatever it started (a ProxyCommand): its own session
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        stderr.cancel()
        with contextlib.suppress(BaseException):
            await stderr
