"""A read-only QMP connection: an allowlist of query commands, a timeout on every call, errors converted.

This is I/O shell code around ``qemu.qmp.QMPClient``. A precheck must never change the QEMU it looks at, so
``ReadOnlyQMP.execute`` refuses, before anything is sent, every command not in ``READ_ONLY_COMMANDS`` (and any
``human-monitor-command`` line other than those in ``HMP_READ_ONLY``): ``CommandNotAllowedError``. It must never
crash it either: the QEMU version comes from the QMP greeting, before any command, and a command that
``quirks.KNOWN_CRASHES`` lists for that version is refused too (``UnsafeCommandError``). The QMP handshake itself
(``qmp_capabilities``, sent by qemu.qmp while connecting) only negotiates the protocol.

For a UNIX socket the connection also learns the QEMU's process id (``SO_PEERCRED``), so that facts about its
backends on this host can be read from ``/proc`` and ``/sys`` (``hostfacts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any, Self

from qemu.qmp import ExecuteError, QMPClient, QMPError

from .core import quirks
from .core.errors import (
    CommandError,
    CommandNotAllowedError,
    ConnectError,
    ProbeError,
    QMPTimeoutError,
    UnsafeCommandError,
    UsageError,
)
from .core.quirks import Version, known_crash

__all__ = ["HMP_READ_ONLY", "MIGRATION_COMMANDS", "READ_ONLY_COMMANDS", "Address", "MigrationQMP", "ReadOnlyQMP",
           "parse_address"]

# Every command a precheck may send. Each only reads state (QEMU qapi/*.json: the query-* and x-query-* commands,
# qom-list, qom-list-get and qom-get return values and change nothing). The README lists the same commands; a
# test compares QEMU's own trace of a precheck with the README's list.
READ_ONLY_COMMANDS = frozenset({
    "query-version",
    "query-name",
    "query-uuid",
    "x-query-virtio",
    "x-query-virtio-status",
    "qom-list",
    "qom-list-get",
    "qom-get",
    "human-monitor-command",  # only with a command line from HMP_READ_ONLY
})
# The exact HMP command lines allowed through human-monitor-command: "info network" prints each NIC's netdev
# and its type (hmp_info_network in net/net.c), which no QMP query tells.
HMP_READ_ONLY = frozenset({"info network"})
# What the migrate command (migrate.py, and nothing else) sends besides the read-only commands, on a separate
# client class (MigrationQMP): the precheck's client refuses every one of them. From QEMU's qapi/migration.json
# and qapi/run-state.json / qapi/misc.json (cont). Each was sent through MigrationQMP to real 7.2.22, 10.0.2 and
# 11.1.3 with a booted guest (pre-switchover, continue, cancel, cont): none is in the crash table, none crashed.
MIGRATION_COMMANDS = frozenset({
    "query-status",  # the run state: running, paused, inmigrate, finish-migrate, postmigrate
    "query-migrate",  # status and RAM progress
    "query-migrate-capabilities",  # to put return-path and pause-before-switchover back as they were
    "migrate-set-capabilities",  # return-path, pause-before-switchover (both sides, before the migration)
    "migrate-incoming",  # start listening on a destination started with -incoming defer
    "migrate",  # start the migration on the source
    "migrate-continue",  # leave the pre-switchover pause: switch over
    "migrate_cancel",  # give up: the source resumes
    "cont",  # resume a source that a failed migration left paused (it was running before)
})

Address = str | tuple[str, int]


def parse_address(text: str) -> Address:
    """``unix:/path``, a bare path, or ``tcp:HOST:PORT`` (``tcp:[::1]:4444`` for IPv6)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty QMP address: give unix:/path, a path, or tcp:HOST:PORT")
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise UsageError(f"QMP address {text!r} has no socket path")
        return path
    if text.startswith("tcp:"):
        m = re.fullmatch(r"tcp:(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})", text)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise UsageError(f"QMP address {text!r} is not tcp:HOST:PORT")
        return m.group(1).strip("[]"), int(m.group(2))
    if ":" in text.split("/")[0] and not text.startswith(("/", ".")):
        raise UsageError(f"QMP address {text!r}: unknown scheme (use unix:/path or tcp:HOST:PORT)")
    return text


def describe(address: Address) -> str:
    return f"tcp:{address[0]}:{address[1]}" if isinstance(address, tuple) else f"unix:{address}"


class ReadOnlyQMP:
    """One QMP connection that only sends allowlisted commands, each with a timeout."""

    allowed: frozenset[str] = READ_ONLY_COMMANDS
    kind = "read-only"

    def __init__(self, address: Address, *, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise UsageError(f"timeout must be positive, not {timeout}")
        self.address = address
        self.timeout = timeout
        self.sent: list[str] = []  # every command sent, in order (for diagnostics)
        self.version: Version | None = None  # from the QMP greeting
        self.package: str | None = None
        self.peer_pid: int | None = None  # the QEMU's pid when connected over a UNIX socket on this host
        self._client = QMPClient()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        where = describe(self.address)
        try:
            await asyncio.wait_for(self._connect(), self.timeout)
        except TimeoutError as err:
            await self.close()
            raise ConnectError(f"{where}: no QMP greeting within {self.timeout} s (QEMU stopped or hung?)") from err
        except (QMPError, OSError, socket.gaierror) as err:
            await self.close()
            raise ConnectError(f"{where}: cannot connect: {err}") from err

    async def _connect(self) -> None:
        if isinstance(self.address, tuple):
            await self._client.connect(self.address)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, self.address)
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid = struct.unpack("3i", creds)[0]
                self.peer_pid = pid if pid > 0 else None
                await self._client.connect(sock)
            except BaseException:
                sock.close()
                raise
        self._read_greeting()

    def _read_greeting(self) -> None:
        """The version QEMU announces before any command (QMP greeting: ``{"QMP": {"version": {"qemu": ...,
        "package": ...}}}``, qapi/control.json); anything unexpected leaves it unknown (every command the crash
        table lists is then refused)."""
        greeting = self._client.greeting
        try:
            raw = greeting.QMP.version if greeting is not None else {}
            qemu = raw["qemu"]
            version = (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))  # type: ignore[index]
            if all(0 <= v < 1 << 16 for v in version):
                self.version = version
            package = raw.get("package")
            self.package = (package.strip() or None) if isinstance(package, str) else None
        except (KeyError, TypeError, ValueError, AttributeError):
            self.version = None

    async def close(self) -> None:
        # qemu.qmp re-raises, on disconnect, whatever ended the session: nothing left to do about it here.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), self.timeout)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        crash = known_crash(command, arguments, self.version)
        if crash is not None:
            shown = ".".join(map(str, self.version)) if self.version else "an unknown version"
            raise UnsafeCommandError(f"{quirks.command_key(command, arguments)} is known to crash QEMU {shown} "
                                     f"({crash.effect}); not sent")
        if command not in self.allowed:
            raise CommandNotAllowedError(f"{command!r} is not a {self.kind} command; not sent")
        if command == "human-monitor-command" and (arguments or {}).get("command-line") not in HMP_READ_ONLY:
            line = (arguments or {}).get("command-line")
            raise CommandNotAllowedError(f"human-monitor-command {line!r} is not in the read-only list; not sent")
        self.sent.append(command)
        return await self._send(command, arguments)

    async def _send(self, command: str, arguments: Mapping[str, object] | None) -> Any:
        """Send one command that ``execute`` allowed (a transport over something else overrides only this)."""
        where = describe(self.address)
        try:
            return await asyncio.wait_for(
                self._client.execute(command, dict(arguments) if arguments else None), self.timeout)
        except TimeoutError as err:
            raise QMPTimeoutError(f"{where}: {command} got no answer within {self.timeout} s") from err
        except ExecuteError as err:
            raise CommandError(command, err.error_class, str(err)) from err
        except (QMPError, OSError, EOFError) as err:
            raise ProbeError(f"{where}: {command} failed: {err!r}") from err


class MigrationQMP(ReadOnlyQMP):
    """The migrate command's connection: the read-only commands and ``MIGRATION_COMMANDS``, nothing else (the
    crash table applies as well)."""

    allowed = READ_ONLY_COMMANDS | MIGRATION_COMMANDS
    kind = "read-only or migration"
