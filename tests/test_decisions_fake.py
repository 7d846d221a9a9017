"""Replies real QEMU will not give on demand: the precheck still returns a verdict (never an exception)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from conftest import Serve
from fakeqmp import TRANSCRIPT, load_transcript

from qemu_offload_handshake.api import precheck


def twice(args: dict[str, Any]) -> dict[str, Any]:
    real = next(r for (cmd, _), r in load_transcript(TRANSCRIPT).items() if cmd == "x-query-virtio")
    return {"return": real["return"] + real["return"][:1]}


async def test_a_reply_listing_a_device_twice_is_unknown_not_an_exception(serve: Serve) -> None:
    bad = await serve(overrides={"x-query-virtio": twice})
    verdict = await precheck(await serve(), bad)
    assert verdict.verdict == "unknown"
    assert [f.code for f in verdict.findings if f.severity.value == "unknown"] == ["unreadable"]
    assert [f.why for f in verdict.findings if f.code == "unreadable"] == [
        "on the destination, x-query-virtio lists /machine/peripheral/net2/virtio-backend twice; the reply "
        "contradicts itself."]
    # the CLI prints JSON for it (a separate process: this event loop serves the fake QEMU meanwhile)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qemu_offload_handshake", "precheck", "--source", bad, "--dest", bad, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 4, err
    assert json.loads(out)["verdict"] == "unknown"
