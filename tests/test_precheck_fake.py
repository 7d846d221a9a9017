"""The precheck against the scripted fake QMP server: what real QEMU will not do on demand."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import Any

import pytest
from conftest import Serve, readme_read_only
from fakeqmp import DATA, DROP, GARBAGE, HANG, TRANSCRIPT, FakeQMP, load_transcript

from qemu_offload_handshake import UsageError, VmReport, decode
from qemu_offload_handshake.api import precheck, probe
from qemu_offload_handshake.core.decide import Severity, Verdict
from qemu_offload_handshake.core.model import Tri


def status_reply(path: str, transcript: str = TRANSCRIPT) -> dict[str, Any]:
    reply = load_transcript(transcript)[("x-query-virtio-status", json.dumps({"path": path}, sort_keys=True))]
    return copy.deepcopy(reply)


NET0 = "/machine/peripheral/net0/virtio-backend"


def whys(verdict: Verdict) -> list[tuple[str, str]]:
    """(code, why) of every finding, when each is expected exactly."""
    return [(f.code, f.why) for f in verdict.findings]


async def test_replayed_real_answers_give_the_report_real_qemu_gave(serve: Serve) -> None:
    for transcript in ("qemu10-4nics-booted", "qemu72-1nic-booted", "qemu111-2nics-booted"):
        address = await serve(transcript)
        report = await probe(address, host=transcript)
        recorded = decode(bytes.fromhex(json.loads((DATA / f"transcript-{transcript}.json").read_text())["report"]))
        assert isinstance(recorded, VmReport)
        assert report == dataclasses.replace(recorded, made_at=report.made_at)
    verdict = await precheck(await serve(), await serve())
    assert verdict.verdict == "compatible"


@pytest.mark.parametrize(("transcript", "expected"), [("qemu10-4nics-booted", "compatible"),
                                                     ("qemu72-1nic-booted", "compatible"),
                                                     ("qemu111-2nics-booted", "unknown")])  # no tap to read for a fake
async def test_what_arrives_is_only_what_the_readme_lists(serve: Serve, fakes: list[FakeQMP], transcript: str,
                                                          expected: str) -> None:
    commands, hmp_lines = readme_read_only()
    verdict = await precheck(await serve(transcript), await serve(transcript))
    assert verdict.verdict == expected
    for fake in fakes:  # what the servers received (not what the client meant to send)
        assert "x-query-virtio" in fake.received
        assert set(fake.received) - {"qmp_capabilities"} <= commands, fake.received  # the README's list, no other
        assert fake.hmp_lines == ["info network"]
        assert all(line in hmp_lines for line in fake.hmp_lines)


async def test_a_hung_command_is_unknown_not_a_hang(serve: Serve) -> None:
    hung = await serve(overrides={"x-query-virtio-status": HANG})
    start = time.monotonic()
    verdict = await precheck(await serve(), hung, timeout=0.5)
    assert time.monotonic() - start < 5
    assert verdict.verdict == "unknown"
    assert whys(verdict) == [("probe-failed", f"the destination could not be probed: {hung}: x-query-virtio-status got "
                                              "no answer within 0.5 s")]


async def test_a_stopped_qemu_that_never_greets_is_unknown(serve: Serve) -> None:
    stopped = await serve(greet=False)
    verdict = await precheck(stopped, await serve(), timeout=0.5)
    assert verdict.verdict == "unknown"
    assert whys(verdict) == [("probe-failed", f"the source could not be probed: {stopped}: no QMP greeting within "
                                              "0.5 s (QEMU stopped or hung?)")]


@pytest.mark.parametrize("behaviour", [DROP, GARBAGE], ids=["dropped", "garbage"])
async def test_dropped_connection_or_garbage_mid_probe_is_unknown(serve: Serve, behaviour: str) -> None:
    broken = await serve(overrides={"qom-list": behaviour})
    verdict = await precheck(await serve(), broken, timeout=2)
    assert verdict.verdict == "unknown"
    assert verdict.dest is None
    assert whys(verdict) == [("probe-failed", f"the destination could not be probed: {broken}: qom-list failed: "
                                              "ExecInterruptedError('Disconnected')")]


async def test_nothing_listening_is_unknown(serve: Serve) -> None:
    verdict = await precheck(await serve(), "unix:/nonexistent/qmp.sock", timeout=1)
    assert verdict.verdict == "unknown"
    assert whys(verdict) == [("probe-failed", "the destination could not be probed: unix:/nonexistent/qmp.sock: "
                                              "cannot connect: [Errno 2] No such file or directory")]


async def test_error_reply_for_a_device_is_unknown_with_the_reason(serve: Serve) -> None:
    def status(args: dict[str, Any]) -> dict[str, Any]:
        if args["path"] == NET0:
            return {"error": {"class": "GenericError", "desc": "device is being unplugged"}}
        return status_reply(args["path"])
    verdict = await precheck(await serve(), await serve(overrides={"x-query-virtio-status": status}))
    assert verdict.verdict == "unknown"
    unknown = [f for f in verdict.findings if f.severity is Severity.UNKNOWN]
    assert unknown[0].why == "on the destination, x-query-virtio-status: GenericError: device is being unplugged."
    # only that device is unknown (the other notes: the properties its offer no longer implies, read one by one
    # and not in the transcript)
    assert {(f.device, f.code) for f in unknown} == {("net0", "unreadable"), ("net0", "backend-vnet_hdr-unknown"),
                                                      ("net0", "backend-has_ufo-unknown"), ("net0", "offered-unknown")}


async def test_qemu_older_than_7_2_is_unknown_unless_already_blocked(serve: Serve, fakes: list[FakeQMP]) -> None:
    # QEMU 7.1 has no x-query-virtio(-status): the fake answers CommandNotFound because it greets as 7.1.0, with no
    # override saying so (a fake that greeted as anything from 7.2 on would answer, and the verdict would not be
    # unknown)
    verdict = await precheck(await serve(), await serve(version=(7, 1, 0)))
    assert verdict.dest is not None
    assert verdict.dest.qemu_version == (7, 1, 0)  # what the greeting announced, as the client read it
    assert verdict.verdict == "unknown"
    assert whys(verdict) == [
        ("unreadable", "on the destination, x-query-virtio (QEMU older than 7.2 has none): CommandNotFound: The "
                       "command x-query-virtio has not been found."),
        ("devices-unknown", "the virtio-net devices of a side could not be listed, so they cannot be compared.")]
    assert "x-query-virtio" in fakes[1].received
    assert "x-query-virtio-status" not in fakes[1].received
    other_machine = {"qom-get": lambda args: {"return": "pc-q35-7.1-machine"}}
    verdict = await precheck(await serve(), await serve(version=(7, 1, 0), overrides=other_machine))
    assert verdict.dest is not None
    assert verdict.dest.qemu_version == (7, 1, 0)
    assert verdict.verdict == "blocked"  # the machine types alone prove it
    assert [(f.code, f.source, f.dest) for f in verdict.findings if f.severity is Severity.BLOCKER] == [
        ("machine-differs", "pc-q35-10.0", "pc-q35-7.1")]


async def test_onoffauto_string_properties_of_a_future_qemu(serve: Serve) -> None:
    real_list = next(r["return"] for (cmd, _), r in load_transcript(TRANSCRIPT).items() if cmd == "qom-list")
    onoffauto = {"host_uso", "guest_uso4", "guest_uso6", "csum"}

    def qom_list(args: dict[str, Any]) -> dict[str, Any]:
        return {"return": [{"name": p["name"], "type": "OnOffAuto" if p["name"] in onoffauto else p["type"]}
                           for p in real_list]}

    def qom_get(args: dict[str, Any]) -> dict[str, Any]:
        value = {"host_uso": "auto", "guest_uso4": "on", "guest_uso6": "off", "csum": "on"}.get(args["property"])
        if value is not None:
            return {"return": value}
        key = ("qom-get", json.dumps(args, sort_keys=True))
        return load_transcript(TRANSCRIPT).get(key, {"return": False})

    def no_uso6(args: dict[str, Any]) -> dict[str, Any]:
        reply = status_reply(args["path"])
        for block in ("host-features", "guest-features"):
            labels = reply["return"][block]["dev-features"]
            reply["return"][block]["dev-features"] = [x for x in labels if "USOv6" not in x]
        return reply

    dest = await serve(overrides={"qom-list": qom_list, "qom-get": qom_get, "x-query-virtio-status": no_uso6})
    report = await probe(dest)
    nic = report.nic("net0")
    assert nic is not None
    assert (nic.prop("host_uso"), nic.prop("guest_uso4"), nic.prop("guest_uso6"), nic.prop("csum")) == (
        Tri.AUTO, Tri.ON, Tri.OFF, Tri.ON)
    verdict = await precheck(await serve(), dest)
    assert verdict.verdict == "blocked"  # the guest negotiated GUEST_USO6; the destination has it off
    assert {f.bit for f in verdict.findings if f.code == "negotiated-missing"} == {55}


def with_tunnel_bits(args: dict[str, Any]) -> dict[str, Any]:
    """QEMU 10.2's labels for the UDP tunnel bits 65-68, in host-features."""
    reply = status_reply(args["path"])
    reply["return"]["host-features"]["dev-features"] += [
        "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO: Driver can receive GSO over UDP tunnel packets",
        "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO: Driver can receive GSO over UDP tunnel packets requiring checksum "
        "offload for the outer header",
        "VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO: Device can receive GSO over UDP tunnel packets",
        "VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM: Device can receive GSO over UDP tunnel packets requiring checksum "
        "offload for the outer header"]
    return reply


def tunnel_props(args: dict[str, Any]) -> dict[str, Any]:
    real = next(r["return"] for (cmd, _), r in load_transcript(TRANSCRIPT).items() if cmd == "qom-list")
    extra = [{"name": n, "type": "bool"} for n in ("guest_tunnel", "guest_tunnel_csum", "host_tunnel",
                                                   "host_tunnel_csum")]
    return {"return": real + extra}


async def test_qemu_10_2_bits_above_63_destination_offers_more(serve: Serve) -> None:
    newer = await serve(overrides={"x-query-virtio-status": with_tunnel_bits, "qom-list": tunnel_props})
    verdict = await precheck(await serve(), newer)
    assert verdict.verdict == "adjustable"
    assert verdict.adjustments["net0"] == {"guest_tunnel": "off", "guest_tunnel_csum": "off", "host_tunnel": "off",
                                           "host_tunnel_csum": "off"}
    assert {f.bit for f in verdict.findings if f.code == "offer-extra"} == {65, 66, 67, 68}


async def test_qemu_10_2_bits_above_63_destination_offers_less(serve: Serve) -> None:
    newer = await serve(overrides={"x-query-virtio-status": with_tunnel_bits, "qom-list": tunnel_props})
    older = await serve()
    strict = await precheck(newer, older)
    assert strict.verdict == "blocked"
    assert {f.bit for f in strict.findings if f.code == "offer-missing"} == {65, 66, 67, 68}
    lenient = await precheck(newer, older, lenient=True)
    assert lenient.verdict == "compatible"  # the guest did not negotiate them: the load works
    assert {(f.device, f.severity, f.code, f.bit) for f in lenient.findings} == {
        (device, Severity.WARNING, "offer-missing", bit) for device in ("net0", "net1", "net2", "net3")
        for bit in (65, 66, 67, 68)}


@pytest.mark.parametrize("address", ["", "tcp:host", "tcp:host:99999", "ftp://x", "unix:"])
async def test_bad_addresses_are_usage_errors(address: str) -> None:
    with pytest.raises(UsageError):
        await precheck(address, "unix:/tmp/x")




