"""Device state beyond the feature bits, with equal bitmaps: what fails the load is blocked, what only changes what
the guest sees is blocked in strict mode and a warning in lenient mode. Real migrations are the truth."""

from __future__ import annotations

import pytest

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.decide import Severity, Verdict
from qemu_offload_handshake.lab import Lab, Nic, VmSpec

pytestmark = pytest.mark.qemu


def state_findings(v: Verdict) -> list[tuple[str, str, str | None, str | None]]:
    return sorted((f.severity.value, f.code, f.source, f.dest) for f in v.findings
                  if f.code in ("state-differs", "config-differs", "state-unknown"))


@pytest.mark.parametrize(("props", "expected"), [
    ({"vectors": "5"}, ("vectors", "4", "5")),
    ({"romfile": ""}, ("rom", "size 262144", "none")),
    ({"page-per-vq": True}, ("page-per-vq", "off", "on")),
], ids=["msix-vectors", "no-option-rom", "page-per-vq"])
async def test_state_that_fails_the_load_is_blocked(qlab: Lab, props: dict[str, str | bool],
                                                    expected: tuple[str, str, str]) -> None:
    spec = VmSpec(mode="booted")
    src = await qlab.start(spec)
    dst = await qlab.start(VmSpec(nics=(Nic.make("net0", **props),)).destination())  # type: ignore[arg-type]
    for lenient in (False, True):
        verdict = await precheck(src.address, dst.address, lenient=lenient)
        assert verdict.verdict == "blocked", verdict.findings
        assert state_findings(verdict) == [("blocker", "state-differs", expected[1], expected[2])]
        assert f"({expected[0]}: " in next(f.why for f in verdict.findings if f.code == "state-differs")
    # the feature bitmaps are equal: only the state tells
    assert not [f for f in verdict.findings if f.bit is not None and f.severity is Severity.BLOCKER]
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert result.source_running


async def test_state_the_guest_sees_is_strict_blocked_lenient_warned_and_loads(qlab: Lab) -> None:
    spec = VmSpec(mode="booted")
    src = await qlab.start(spec)
    dst = await qlab.start(VmSpec(nics=(Nic.make("net0", rx_queue_size="1024"),)).destination())
    strict = await precheck(src.address, dst.address)
    lenient = await precheck(src.address, dst.address, lenient=True)
    assert strict.verdict == "blocked"
    assert state_findings(strict) == [("blocker", "config-differs", "256", "1024")]
    assert lenient.verdict == "compatible", lenient.findings
    assert state_findings(lenient) == [("warning", "config-differs", "256", "1024")]
    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result.dest_error


@pytest.mark.parametrize("qemu", ["10", "11.1"])
async def test_equal_state_is_read_on_every_version(qlab: Lab, qemu: str) -> None:
    spec = VmSpec(qemu=qemu, machine="pc-q35-10.0", nics=(Nic("net0"), Nic("net1", "user")))  # type: ignore[arg-type]
    src, dst = await qlab.start(spec), await qlab.start(spec.destination())
    verdict = await precheck(src.address, dst.address)
    assert state_findings(verdict) == []
    assert verdict.source is not None
    state = dict(verdict.source.nics[0].state)
    assert {k: state.get(k) for k in ("queues", "vectors", "rom", "rx_queue_size", "disable-legacy")} == {
        "queues": "1", "vectors": "4", "rom": "size 262144", "rx_queue_size": "256", "disable-legacy": "off"}


async def test_queue_pairs_are_read_and_a_different_count_is_blocked(qlab: Lab) -> None:
    two = Nic("net0", queues=2, props=(("mq", "on"), ("vectors", "6")))
    spec = VmSpec(mode="booted", nics=(two,))
    src, dst = await qlab.start(spec), await qlab.start(spec.destination())
    same = await precheck(src.address, dst.address)
    assert same.verdict == "compatible", same.findings
    assert same.source is not None and dict(same.source.nics[0].state)["queues"] == "2"
    assert (await qlab.migrate(src, dst)).status == "completed"
    # mq off on both sides, equal feature bitmaps, only the netdev's queue count differs (max_queue_pairs)
    src = await qlab.start(VmSpec(mode="booted", nics=(Nic("net0", queues=2, props=(("vectors", "4"),)),)))
    dst = await qlab.start(VmSpec(nics=(Nic("net0", props=(("vectors", "4"),)),)).destination())
    verdict = await precheck(src.address, dst.address, lenient=True)
    assert verdict.verdict == "blocked"
    assert state_findings(verdict) == [("blocker", "state-differs", "2", "1")]
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert result.source_running
