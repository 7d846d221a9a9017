"""A handshake agent as its own process (``python -m qemu_offload_handshake serve``), for the tests and the
benchmarks: ``async with run_agent(pki, "--qemu", WRAPPER) as agent`` yields once it listens (its first stderr
line names the port), collects its log lines, and stops it with SIGTERM (it ends its handshakes and their scratch
QEMUs), then waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .builds import LabError
from .certs import Pki

__all__ = ["AgentProcess", "run_agent"]

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@dataclass
class AgentProcess:
    port: int
    proc: asyncio.subprocess.Process
    log: list[str] = field(default_factory=list)  # its stderr lines so far (all of them once it stopped)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def _drain(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode(errors="replace").rstrip())


@contextlib.asynccontextmanager
async def run_agent(pki: Pki | None, *args: str, listen: str = "127.0.0.1:0") -> AsyncIterator[AgentProcess]:
    """An agent with ``pki``'s agent certificate (None: ``--insecure``, plaintext on loopback) and ``args``."""
    certs = ["--insecure"] if pki is None else ["--cert", str(pki.server_cert), "--key", str(pki.server_key),
                                                "--ca", str(pki.ca)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qemu_offload_handshake", "serve", "--listen", listen, *certs, *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    drain: asyncio.Future[None] | None = None
    try:
        first = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode(errors="replace")
        found = _LISTENING.search(first)
        if not found:
            rest = (await asyncio.wait_for(proc.stderr.read(), 10)).decode(errors="replace")
            raise LabError(f"the agent did not start: {first}{rest}".strip())
        agent = AgentProcess(int(found.group(1)), proc, [first.rstrip()])
        drain = asyncio.ensure_future(_drain(proc.stderr, agent.log))
        yield agent
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise LabError("the agent did not stop within 15 s of SIGTERM") from None
        if drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(drain, 5)
