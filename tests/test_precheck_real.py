"""The precheck against real QEMU pairs; every verdict is then checked by really migrating the pair."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import readme_read_only

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.argv import apply_adjustments
from qemu_offload_handshake.core.decide import Severity, Verdict
from qemu_offload_handshake.core.features import mask_of
from qemu_offload_handshake.lab import Lab, Migration, Nic, Vm, VmSpec

pytestmark = pytest.mark.qemu
USO = mask_of([54, 55, 56])


async def check_then_migrate(lab: Lab, spec: VmSpec, dest: VmSpec, **kw: bool) -> tuple[Verdict, Migration]:
    src = await lab.start(spec)
    dst = await lab.start(dest)
    verdict = await precheck(src.address, dst.address, **kw)  # type: ignore[arg-type]
    return verdict, await lab.migrate(src, dst)


def blockers(v: Verdict) -> set[tuple[str, str]]:
    return {(f.device, f.code) for f in v.findings if f.severity is Severity.BLOCKER}


async def test_identical_pair_is_compatible_and_migrates(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", nics=(Nic("net0"), Nic("net1")))
    verdict, result = await check_then_migrate(qlab, spec, spec.destination())
    assert verdict.verdict == "compatible", verdict.findings
    assert result.status == "completed"
    assert result.offered_after == result.offered_before


async def test_uso_lost_with_booted_guest_is_blocked_and_migration_really_fails(qlab: Lab) -> None:
    spec = VmSpec(mode="booted")
    verdict, result = await check_then_migrate(qlab, spec, spec.destination({"net0": "tap-nouso"}))
    assert verdict.verdict == "blocked"
    assert blockers(verdict) == {("net0", "negotiated-missing")}
    negotiated = {f.bit for f in verdict.findings if f.code == "negotiated-missing"}
    assert negotiated == {54, 55, 56}
    assert result.status == "failed"
    assert "Features 0x" in result.dest_error
    # the destination is also reported as silently dropping the USO it was asked for
    assert {f.bit for f in verdict.findings if f.code == "silently-off" and f.dest} == {54, 55, 56}


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
async def test_uso_lost_with_paused_vm_strict_blocks_lenient_allows(qlab: Lab, lenient: bool) -> None:
    spec = VmSpec(mode="paused")
    verdict, result = await check_then_migrate(qlab, spec, spec.destination({"net0": "tap-nouso"}), lenient=lenient)
    # What really happens: the migration loads, but the destination offers less (the ABI drift).
    assert result.status == "completed"
    assert result.offered_after is not None
    assert result.offered_before["net0"] & ~result.offered_after["net0"] == USO
    drift = {f.bit for f in verdict.findings if f.code == "offer-missing"}
    assert drift == {54, 55, 56}
    if lenient:
        assert verdict.verdict == "compatible"
        assert all(f.severity is Severity.WARNING for f in verdict.findings if f.code == "offer-missing")
    else:
        assert verdict.verdict == "blocked"
        assert blockers(verdict) == {("net0", "offer-missing")}


async def test_destination_offering_more_is_adjusted_relaunched_and_migrates(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", nics=(Nic("net0", "tap-nouso"), Nic("net1")))
    dest = spec.destination({"net0": "tap"})
    src = await qlab.start(spec)
    dst = await qlab.start(dest)
    verdict = await precheck(src.address, dst.address)
    assert verdict.verdict == "adjustable"
    assert verdict.adjustments == {"net0": {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}}
    await qlab.stop(dst)
    dst = await qlab.start(dest, rewrite=lambda argv: apply_adjustments(argv, verdict.adjustments))
    again = await precheck(src.address, dst.address)
    assert again.verdict == "compatible", again.findings
    result = await qlab.migrate(src, dst)
    assert result.status == "completed"
    assert result.offered_after == result.offered_before
    assert result.dest_state == "running"


async def test_property_differing_on_the_command_line(qlab: Lab) -> None:
    spec = VmSpec(mode="booted")
    dest = VmSpec(nics=(Nic.make("net0", mrg_rxbuf=False),)).destination()
    verdict, result = await check_then_migrate(qlab, spec, dest)
    assert verdict.verdict == "blocked"
    assert blockers(verdict) == {("net0", "negotiated-missing")}
    assert {f.bit for f in verdict.findings if f.code == "negotiated-missing"} == {15}  # MRG_RXBUF
    assert result.status == "failed"


async def test_several_nics_one_bad_names_only_that_one(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", nics=(Nic("net0"), Nic("net1"), Nic("net2")))
    verdict, result = await check_then_migrate(qlab, spec, spec.destination({"net1": "tap-nouso"}))
    assert verdict.verdict == "blocked"
    assert blockers(verdict) == {("net1", "negotiated-missing")}
    assert result.status == "failed"


async def test_devices_without_an_id_are_matched_by_qom_path(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", nics=(Nic("net0"), Nic("")))
    verdict, result = await check_then_migrate(qlab, spec, spec.destination())
    assert verdict.verdict == "compatible", verdict.findings
    assert verdict.source is not None
    assert sorted(n.key for n in verdict.source.nics) == ["/machine/peripheral-anon/device[0]", "net0"]
    assert result.status == "completed"
    bad, result = await check_then_migrate(qlab, spec, spec.destination({"": "tap-nouso"}))
    assert blockers(bad) == {("/machine/peripheral-anon/device[0]", "negotiated-missing")}
    assert result.status == "failed"


async def test_missing_nic_is_blocked(qlab: Lab) -> None:
    spec = VmSpec(nics=(Nic("net0"), Nic("net1")))
    verdict, result = await check_then_migrate(qlab, spec, VmSpec(nics=(Nic("net0"),)).destination())
    assert blockers(verdict) == {("net1", "device-missing")}
    assert result.status == "failed"


async def test_tap_to_user_is_blocked_by_vnet_hdr(qlab: Lab) -> None:
    spec = VmSpec()
    verdict, result = await check_then_migrate(qlab, spec, spec.destination({"net0": "user"}))
    assert verdict.verdict == "blocked"
    assert blockers(verdict) == {("net0", "backend-vnet_hdr"), ("net0", "backend-has_ufo"), ("net0", "offer-missing")}
    assert "saved image requires vnet_hdr=on" in result.dest_error


@pytest.mark.parametrize(("there", "back"), [("7.2", "10"), ("10", "7.2")])
async def test_qemu72_and_qemu10_on_pc_q35_7_2_are_compatible(qlab: Lab, there: str, back: str) -> None:
    spec = VmSpec(qemu=there, machine="pc-q35-7.2", mode="booted")  # type: ignore[arg-type]
    verdict, result = await check_then_migrate(qlab, spec, spec.destination(qemu=back))
    assert verdict.verdict == "compatible", verdict.findings
    assert {r.qemu_version[0] for r in (verdict.source, verdict.dest) if r and r.qemu_version} == {7, 10}
    assert result.status == "completed"


async def test_different_machine_types_are_blocked(qlab: Lab) -> None:
    spec = VmSpec(machine="pc-q35-7.2")
    verdict, result = await check_then_migrate(qlab, spec, spec.destination(machine="q35"))
    assert blockers(verdict) == {("", "machine-differs")}
    assert result.status == "failed"


async def test_precheck_sends_only_read_only_commands(qlab: Lab) -> None:
    """QEMU's own trace of every QMP request against the README's list (not the code's allowlist, which a wrong
    change could widen): only those commands, and only the HMP line ``info network``."""
    commands, hmp_lines = readme_read_only()
    traces = [Path(qlab.dir) / f"trace-{i}.log" for i in range(2)]
    spec = VmSpec(mode="booted", nics=(Nic("net0"), Nic("net1", "tap-nouso")))
    vms: list[Vm] = []
    for trace, s in zip(traces, (spec, spec.destination({"net1": "tap"})), strict=True):
        vms.append(await qlab.start(s, extra_args=["-trace", "handle_qmp_command", "-D", str(trace)]))
    verdict = await precheck(vms[0].address, vms[1].address)
    assert verdict.verdict == "adjustable"
    for trace in traces:
        # handle_qmp_command: "mon 0x... req: {JSON request}", one line per request (QEMU monitor/qmp.c)
        requests = [(m.group(1), json.loads(m.group(2)))
                    for m in re.finditer(r"handle_qmp_command mon (0x[0-9a-f]+) req: (.*)", trace.read_text())]
        lab_monitor = requests[0][0]  # the lab connected first, on its own monitor
        seen = [req for mon, req in requests if mon != lab_monitor]
        executed = [req["execute"] for req in seen]
        assert "x-query-virtio-status" in executed  # the precheck's commands are in the trace (QEMU's own record)
        assert set(executed) - {"qmp_capabilities"} <= commands, executed
        hmp = [req["arguments"]["command-line"] for req in seen if req["execute"] == "human-monitor-command"]
        assert hmp == ["info network"]
        assert set(hmp) <= hmp_lines


async def test_a_stopped_qemu_gives_unknown_within_the_timeout(qlab: Lab) -> None:
    spec = VmSpec()
    src = await qlab.start(spec)
    dst = await qlab.start(spec.destination())
    os.kill(dst.proc.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        verdict = await precheck(src.address, dst.address, timeout=1.0)
        assert time.monotonic() - start < 10
    finally:
        os.kill(dst.proc.pid, signal.SIGCONT)
    assert verdict.verdict == "unknown"
    assert verdict.dest is None
    assert [(f.code, f.why) for f in verdict.findings] == [
        ("probe-failed", f"the destination could not be probed: {dst.address}: no QMP greeting within 1.0 s (QEMU "
                         "stopped or hung?)")]
    assert (await precheck(src.address, dst.address)).verdict == "compatible"  # and fine once it runs again
