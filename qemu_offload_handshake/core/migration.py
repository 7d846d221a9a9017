"""The guarded migration's pure parts: QEMU's progress in numbers, the re-check at the switchover (what changed
since the precheck, and whether to go on), the check after completion (the destination offers what the source
offered), and the result. The I/O is ``migrate.py``'s.

QEMU facts (seen on QEMU 10.0.2 with a booted guest, ``return-path`` and ``pause-before-switchover`` on both sides):
``query-migrate`` goes ``setup`` -> ``active`` -> ``pre-switchover`` (the source is stopped, run state
``finish-migrate``; the destination ``inmigrate``) -> after ``migrate-continue`` ``device`` -> ``completed``; a
``migrate_cancel`` in ``pre-switchover`` ends ``cancelled`` with the source ``running`` again and the destination
gone ("load of migration failed"). Its ``ram`` member has ``total``, ``remaining``, ``transferred`` (bytes) and
``mbps``; ``expected-downtime`` (ms) appears while ``active``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from .decide import Mode, decide
from .features import BY_BIT
from .model import VmReport
from .policy import Policy
from .verdict import Outcome, Verdict

__all__ = [
    "EXIT_DIFFERS",
    "EXIT_FAILED",
    "Ending",
    "MigrationResult",
    "Progress",
    "changes_since",
    "offered_differences",
    "progress_of",
    "recheck",
]

EXIT_FAILED = 5  # the migration was started and did not complete (the source is as it was)
EXIT_DIFFERS = 6  # migrated (the VM runs on the destination), but the destination offers other features
_EXITS = {Outcome.BLOCKED: 1, Outcome.ADJUSTABLE: 3, Outcome.UNKNOWN: 4}
_FINAL = ("completed", "failed", "cancelled")


class Ending(enum.Enum):
    MIGRATED = "migrated"  # completed; the destination runs the VM
    REFUSED = "refused"  # the precheck said no: nothing was sent that changes either QEMU
    CANCELLED = "cancelled"  # stopped at the switchover (the re-check said no) or by the operator
    FAILED = "failed"  # the migration failed (destination gone, connection cut, deadline)


@dataclass(frozen=True, slots=True)
class Progress:
    status: str  # QEMU's migration status
    total: int | None = None  # RAM bytes
    remaining: int | None = None
    transferred: int | None = None
    mbps: float | None = None
    expected_downtime_ms: int | None = None

    @property
    def percent(self) -> float | None:
        if not self.total or self.remaining is None:
            return None
        return max(0.0, min(100.0, 100.0 * (self.total - self.remaining) / self.total))

    @property
    def final(self) -> bool:
        return self.status in _FINAL

    def line(self) -> str:
        """One line for a terminal: phase, percent of RAM, throughput, remaining, expected downtime."""
        parts = [f"{self.status:<14}"]
        if self.percent is not None:
            parts.append(f"{self.percent:5.1f}% of {_mib(self.total)}")
        if self.mbps is not None:
            parts.append(f"{self.mbps:7.1f} Mbit/s")
        if self.remaining is not None:
            parts.append(f"{_mib(self.remaining)} left")
        if self.expected_downtime_ms is not None:
            parts.append(f"downtime ~{self.expected_downtime_ms} ms")
        return "  ".join(parts)

    def event(self) -> dict[str, object]:
        return {"event": "progress", "status": self.status, "percent": None if self.percent is None
                else round(self.percent, 1), "ram_total": self.total, "ram_remaining": self.remaining,
                "ram_transferred": self.transferred, "mbps": self.mbps,
                "expected_downtime_ms": self.expected_downtime_ms}


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / (1 << 20):.0f} MiB"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def progress_of(info: object) -> Progress:
    """``query-migrate``'s reply in numbers; what is missing or malformed is None (status ``unknown``)."""
    if not isinstance(info, Mapping):
        return Progress("unknown")
    ram = info.get("ram") if isinstance(info.get("ram"), Mapping) else {}
    assert isinstance(ram, Mapping)
    mbps = ram.get("mbps")
    status = info.get("status")
    return Progress(status if isinstance(status, str) else "unknown", _int(ram.get("total")),
                    _int(ram.get("remaining")), _int(ram.get("transferred")),
                    float(mbps) if isinstance(mbps, int | float) and not isinstance(mbps, bool) else None,
                    _int(info.get("expected-downtime")))


def _names(bits: int) -> str:
    out = []
    while bits:
        low = bits & -bits
        bits ^= low
        bit = low.bit_length() - 1
        out.append(BY_BIT[bit].name if bit in BY_BIT else f"bit {bit}")
    return ", ".join(out)


def changes_since(before: VmReport, now: VmReport) -> tuple[str, ...]:
    """What the source's guest changed since the precheck, per device: features it negotiated or dropped, its
    driver's status; a device that appeared or went away."""
    out = []
    old = {n.key: n for n in before.nics}
    for nic in now.nics:
        was = old.pop(nic.key, None)
        if was is None:
            out.append(f"{nic.key}: a device that was not there at the precheck")
            continue
        a, b = was.negotiated or 0, nic.negotiated or 0
        if b & ~a:
            out.append(f"{nic.key}: the guest negotiated {_names(b & ~a)} since the precheck")
        if a & ~b:
            out.append(f"{nic.key}: the guest no longer uses {_names(a & ~b)}")
        if was.driver_status != nic.driver_status:
            out.append(f"{nic.key}: driver status {was.driver_status} -> {nic.driver_status}")
    out += [f"{key}: gone since the precheck" for key in old]
    return tuple(out)


def recheck(before: Verdict, source: VmReport, dest: VmReport, *, mode: Mode,
            policy: Policy | None) -> tuple[Verdict, tuple[str, ...]]:
    """The decision again at the switchover (the source is paused: its guest cannot change anything now), and
    what changed since the precheck. Only ``compatible`` goes on: a destination that is already receiving cannot
    be adjusted any more."""
    verdict = decide(source, dest, mode=mode, policy=policy)
    changed = changes_since(before.source, source) if before.source is not None else ()
    return verdict, changed


def offered_differences(source: VmReport, dest: VmReport) -> tuple[str, ...]:
    """After completion: where the destination does not offer exactly what the source offered, per device as QEMU
    pairs them (device path, else id); empty: equal everywhere. A bitmap that could not be read is a difference
    (never silently equal)."""
    by_path = {n.dev_path or n.key: n for n in dest.nics}
    out = []
    for nic in source.nics:
        other = by_path.pop(nic.dev_path or nic.key, None)
        if other is None:
            out.append(f"{nic.key}: no device at {nic.dev_path or nic.key} on the destination")
        elif nic.offered is None or other.offered is None:
            out.append(f"{nic.key}: the offered features could not be read on the "
                       f"{'source' if nic.offered is None else 'destination'}")
        elif nic.offered_unknown or other.offered_unknown:
            out.append(f"{nic.key}: some offered features could not be told (derived)")
        elif nic.offered != other.offered:
            more, less = other.offered & ~nic.offered, nic.offered & ~other.offered
            said = [f"offers {_names(more)} more" if more else "", f"lacks {_names(less)}" if less else ""]
            out.append(f"{nic.key}: the destination " + " and ".join(s for s in said if s))
    out += [f"{nic.key}: only on the destination" for nic in by_path.values()]
    return tuple(out)


@dataclass(frozen=True)
class MigrationResult:
    ending: Ending
    reason: str  # one sentence
    precheck: Verdict
    recheck: Verdict | None = None  # the decision at the switchover
    changed: tuple[str, ...] = ()  # what changed since the precheck (at the switchover)
    differences: tuple[str, ...] | None = None  # after completion: offered features (None: not checked)
    source_state: str | None = None  # run states at the end ("running", "paused", "postmigrate", None: gone)
    dest_state: str | None = None
    add_to_dest: tuple[str, ...] = ()  # refused as adjustable: what to add to the destination's command line
    dest_pid: int | None = None  # a destination this command started (--dest-argv) that now runs the VM
    dest_address: str | None = None  # its QMP address
    events: list[dict[str, object]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.ending is Ending.MIGRATED:
            return 0 if not self.differences else EXIT_DIFFERS
        if self.ending is Ending.REFUSED:  # compatible, yet not a pair that can migrate now: a setup problem
            return _EXITS.get(self.precheck.outcome, 2)
        if self.ending is Ending.CANCELLED and self.recheck is not None \
                and self.recheck.outcome is not Outcome.COMPATIBLE:
            return _EXITS[self.recheck.outcome]  # the decision at the switchover stopped it
        return EXIT_FAILED
