"""The guarded migration's pure parts (``core.migration``): QEMU's progress in numbers and in one line, what the
guest changed since the precheck, the check after completion, exit codes."""

from __future__ import annotations

from dataclasses import replace

from test_decide import NEGOTIATED, OFFERED, USO, nic, vm

from qemu_offload_handshake.core.decide import Mode, decide
from qemu_offload_handshake.core.migration import (
    EXIT_DIFFERS,
    EXIT_FAILED,
    Ending,
    MigrationResult,
    changes_since,
    offered_differences,
    progress_of,
    recheck,
)

ACTIVE = {"status": "active", "expected-downtime": 300,
          "ram": {"total": 256 << 20, "remaining": 64 << 20, "transferred": 200 << 20, "mbps": 33.5}}


def test_progress_in_numbers_and_in_one_line() -> None:
    p = progress_of(ACTIVE)
    assert (p.status, p.percent, p.mbps, p.expected_downtime_ms, p.final) == ("active", 75.0, 33.5, 300, False)
    assert p.line() == "active           75.0% of 256 MiB     33.5 Mbit/s  64 MiB left  downtime ~300 ms"
    assert p.event()["percent"] == 75.0 and p.event()["ram_remaining"] == 64 << 20
    assert progress_of({"status": "completed"}).final


def test_malformed_progress_is_unknown_not_a_crash() -> None:
    junks: list[object] = [None, [], {"status": 3}, {"ram": "x"}, {"status": "active", "ram": {"total": -1,
                                                                                                "mbps": True}}]
    for junk in junks:
        p = progress_of(junk)
        assert p.percent is None and p.mbps is None
        assert isinstance(p.line(), str)


def test_what_the_guest_changed_since_the_precheck() -> None:
    before = vm(nic(OFFERED, negotiated=0, status=3))  # the driver has not negotiated yet
    now = vm(nic(OFFERED, negotiated=NEGOTIATED | USO, status=15))
    changed = changes_since(before, now)
    assert any("negotiated" in c and "GUEST_USO4" in c for c in changed), changed
    assert any("driver status 3 -> 15" in c for c in changed), changed
    assert changes_since(now, now) == ()
    assert changes_since(vm(nic(key="net0"), nic(key="net1")), vm(nic(key="net0"))) == ("net1: gone since the "
                                                                                      "precheck",)


def test_the_decision_at_the_switchover_sees_the_new_negotiation() -> None:
    before = decide(vm(nic(OFFERED, negotiated=0, status=3)), vm(nic(OFFERED & ~USO)), mode=Mode.LENIENT)
    assert before.verdict == "compatible"
    verdict, changed = recheck(before, vm(nic(OFFERED, negotiated=NEGOTIATED | USO, status=15)),
                               vm(nic(OFFERED & ~USO)), mode=Mode.LENIENT, policy=None)
    assert verdict.verdict == "blocked" and any(f.code == "negotiated-missing" for f in verdict.findings)
    assert changed


def test_after_completion_the_destination_must_offer_what_the_source_offered() -> None:
    assert offered_differences(vm(nic()), vm(nic())) == ()
    (more,) = offered_differences(vm(nic(OFFERED & ~USO)), vm(nic(OFFERED)))
    assert "offers" in more and "GUEST_USO4" in more
    unread = vm(replace(nic(), offered=None))
    assert "could not be read" in offered_differences(vm(nic()), unread)[0]  # never silently equal
    assert "only on the destination" in offered_differences(vm(nic(key="net0")),
                                                            vm(nic(key="net0"), nic(key="net1")))[0]


def test_exit_codes() -> None:
    ok = decide(vm(nic()), vm(nic()))
    blocked = decide(vm(nic()), vm(nic(OFFERED & ~USO)))
    assert MigrationResult(Ending.MIGRATED, "", ok, differences=()).exit_code == 0
    assert MigrationResult(Ending.MIGRATED, "", ok, differences=("x",)).exit_code == EXIT_DIFFERS
    assert MigrationResult(Ending.REFUSED, "", blocked).exit_code == 1
    assert MigrationResult(Ending.REFUSED, "", ok).exit_code == 2  # compatible, but not waiting / already migrating
    assert MigrationResult(Ending.CANCELLED, "", ok, recheck=blocked).exit_code == 1
    unknown = decide(vm(nic()), vm(replace(nic(), offered=None)))
    assert MigrationResult(Ending.CANCELLED, "", ok, recheck=unknown).exit_code == 4
    assert MigrationResult(Ending.CANCELLED, "", ok).exit_code == EXIT_FAILED  # by the operator
    assert MigrationResult(Ending.FAILED, "", ok, recheck=blocked).exit_code == EXIT_FAILED  # not acted on
