"""A scripted fake QMP server, for what real QEMU will not do on demand: hang, drop the connection, answer
garbage or errors, lack a command, answer OnOffAuto strings, or report QEMU 10.2's feature bits above 63.

It replays real QEMU answers captured by ``scripts/capture_transcript.py`` (``tests/data/transcript-*.json``),
with per-command overrides. Run standalone (for the fleet benchmark) with
``python tests/fakeqmp.py TRANSCRIPT SOCKET``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
TRANSCRIPT = "qemu10-4nics-booted"  # 4 NICs, QEMU 10.0.2, booted guest

# A behaviour for one command: a reply object ({"return": ...} / {"error": ...}), or one of these words.
HANG, DROP, GARBAGE = "hang", "drop", "garbage"
Behaviour = dict[str, Any] | str | Callable[[dict[str, Any]], dict[str, Any] | str]
# Commands QEMU has only from a version on (qapi/*.json "Since:"): a fake QEMU announcing an older version answers
# CommandNotFound for them, as that QEMU would, whatever the transcript holds.
SINCE: dict[str, tuple[int, int, int]] = {
    "x-query-virtio": (7, 2, 0),
    "x-query-virtio-status": (7, 2, 0),
    "qom-list-get": (10, 1, 0),
}


def load_transcript(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    data = json.loads((DATA / f"transcript-{name}.json").read_text())
    return {(cmd, json.dumps(args, sort_keys=True)): reply for cmd, args, reply in data["exchanges"]}


def transcript_greeting(name: str) -> tuple[tuple[int, int, int], str]:
    """The QEMU version and package the recorded QEMU announced in its QMP greeting."""
    greeting = json.loads((DATA / f"transcript-{name}.json").read_text())["greeting"]
    qemu = greeting["qemu"]
    return (qemu["major"], qemu["minor"], qemu["micro"]), greeting["package"]


@dataclass
class FakeQMP:
    replies: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    overrides: dict[str, Behaviour] = field(default_factory=dict)  # by command name
    greet: bool = True  # False: accept the connection and never send the greeting (a stopped QEMU)
    version: tuple[int, int, int] | None = (10, 0, 2)  # announced in the greeting (None: none); see SINCE
    package: str = "fake"
    received: list[str] = field(default_factory=list)  # every command that arrived, in order
    hmp_lines: list[str] = field(default_factory=list)  # every human-monitor-command line that arrived
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _answer(self, message: dict[str, Any]) -> dict[str, Any] | str:
        command = message.get("execute", "")
        args = message.get("arguments", {}) or {}
        if command == "qmp_capabilities":
            return {"return": {}}
        behaviour = self.overrides.get(command)
        if callable(behaviour):
            return behaviour(args)
        if behaviour is not None:
            return behaviour
        if self.version is not None and self.version < SINCE.get(command, (0, 0, 0)):
            return {"error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}}
        reply = self.replies.get((command, json.dumps(args, sort_keys=True)))
        if reply is not None:
            return reply
        if any(cmd == command for cmd, _ in self.replies):
            return {"error": {"class": "GenericError", "desc": f"no scripted answer for {command} {args}"}}
        return {"error": {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if not self.greet:
                await reader.read()  # say nothing until the client gives up
                return
            version: dict[str, Any] = {}
            if self.version is not None:
                major, minor, micro = self.version
                version = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self.package}
            greeting = {"QMP": {"version": version, "capabilities": ["oob"]}}
            writer.write(json.dumps(greeting).encode() + b"\r\n")
            async for message in _messages(reader):
                self.received.append(message.get("execute", ""))
                if message.get("execute") == "human-monitor-command":
                    self.hmp_lines.append(str((message.get("arguments") or {}).get("command-line")))
                answer = self._answer(message)
                if answer == HANG:
                    continue
                if answer == DROP:
                    return
                if answer == GARBAGE:
                    writer.write(b"{this is not json\r\n")
                else:
                    assert isinstance(answer, dict)
                    if "id" in message:
                        answer = {**answer, "id": message["id"]}
                    writer.write(json.dumps(answer).encode() + b"\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def _messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects as the client sends them (qemu.qmp sends no newline between them, like QEMU accepts)."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await reader.read(65536):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                message, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break
            buffer = buffer.lstrip()[end:]
            yield message


async def _main(transcript: str, path: str) -> None:
    version, package = transcript_greeting(transcript)
    server = FakeQMP(load_transcript(transcript), version=version, package=package)
    await server.start(path)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
