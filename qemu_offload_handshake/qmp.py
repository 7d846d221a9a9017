"""A read-only QMP connection: an allowlist of query commands, a timeout on every call, errors converted.

This is I/O shell code around ``qemu.qmp.QMPClient``. A precheck must never change the QEMU it looks at, so
``ReadOnlyQMP.execute`` refuses, before anything is sent, every command not in ``READ_ONLY_COMMANDS``
(``CommandNotAllowedError``). The QMP handshake itself (``qmp_capabilities``, sent by qemu.qmp while
connecting) only negotiates the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Mapping
from typing import Any, Self

from qemu.qmp import ExecuteError, QMPClient, QMPError

from .errors import CommandError, CommandNotAllowedError, ConnectError, ProbeError, QMPTimeoutError, UsageError

__all__ = ["READ_ONLY_COMMANDS", "Address", "ReadOnlyQMP", "parse_address"]

# Every command a precheck may send. Each only reads state (QEMU qapi/*.json: the query-* and x-query-* commands,
# qom-list and qom-get return values and change nothing).
READ_ONLY_COMMANDS = frozenset({
    "query-version",
    "x-query-virtio",
    "x-query-virtio-status",
    "qom-list",
    "qom-get",
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

    def __init__(self, address: Address, *, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise UsageError(f"timeout must be positive, not {timeout}")
        self.address = address
        self.timeout = timeout
        self.sent: list[str] = []  # every command sent, in order (for diagnostics)
        self._client = QMPClient()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        where = describe(self.address)
        try:
            await asyncio.wait_for(self._client.connect(self.address), self.timeout)
        except TimeoutError as err:
            await self.close()
            raise ConnectError(f"{where}: no QMP greeting within {self.timeout} s (QEMU stopped or hung?)") from err
        except (QMPError, OSError, socket.gaierror) as err:
            await self.close()
            raise ConnectError(f"{where}: cannot connect: {err}") from err

    async def close(self) -> None:
        # qemu.qmp re-raises, on disconnect, whatever ended the session: nothing left to do about it here.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), self.timeout)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        if command not in READ_ONLY_COMMANDS:
            raise CommandNotAllowedError(f"{command!r} is not a read-only command; not sent")
        self.sent.append(command)
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
