"""Replies real QEMU will not give on demand: the precheck still returns a verdict (never an exception)."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from typing import Any

from conftest import Serve
from fakeqmp import TRANSCRIPT, load_transcript

from qemu_offload_handshake.api import precheck, probe
from qemu_offload_handshake.core.features import BY_BIT, NEEDS_VNET_HDR, bits_of


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


# Every bit whose offer a virtio-net header would prove (features.NEEDS_VNET_HDR), as QEMU labels them.
HEADER_OFFLOADS = tuple(BY_BIT[b].name for b in bits_of(NEEDS_VNET_HDR))


def vhost_user(args: dict[str, Any]) -> dict[str, Any]:
    """HMP info network with net0's netdev as vhost-user (QEMU prints type=vhost-user for -netdev vhost-user)."""
    real = next(r for (cmd, _), r in load_transcript(TRANSCRIPT).items() if cmd == "human-monitor-command")
    text = real["return"].replace("hn0: index=0,type=tap,", "hn0: index=0,type=vhost-user,")
    return {"return": text}


def masked_header(args: dict[str, Any]) -> dict[str, Any]:
    """net0's vhost backend masks every header offload (as a vhost-user backend without them would)."""
    reply = copy.deepcopy(load_transcript(TRANSCRIPT)[("x-query-virtio-status", json.dumps(args, sort_keys=True))])
    if args["path"].startswith("/machine/peripheral/net0/"):
        for block in ("host-features", "guest-features"):
            labels = reply["return"][block]["dev-features"]
            reply["return"][block]["dev-features"] = [x for x in labels if x.split(":")[0] not in HEADER_OFFLOADS]
    return reply


async def test_vhost_user_has_a_header_even_when_its_backend_masks_the_header_offloads(serve: Serve) -> None:
    # hw/net/vhost_net.c, net/vhost-user.c: vhost-user always has a virtio-net header and UFO in QEMU; offered bits
    # alone would say "no header" here and skip QEMU's load check.
    masked = {"human-monitor-command": vhost_user, "x-query-virtio-status": masked_header}
    source, dest = await serve(overrides=masked), await serve(overrides=masked)
    report = await probe(source)
    net0 = report.nic("net0")
    assert net0 is not None and (net0.backend, net0.vnet_hdr) == ("vhost-user", True)
    assert "vnet_hdr" not in net0.derived or net0.vnet_hdr is True
    verdict = await precheck(source, dest)
    assert not [f for f in verdict.findings if f.code.startswith("backend-vnet_hdr")], verdict.findings
    # to a tap destination that really has no header (user netdev): the load check applies and blocks
    user = await serve(overrides={"human-monitor-command": lambda a: {"return": vhost_user(a)["return"].replace(
        "type=vhost-user,", "type=user,")}})
    blocked = await precheck(source, user)
    assert ("net0", "backend-vnet_hdr") in {(f.device, f.code) for f in blocked.findings}
