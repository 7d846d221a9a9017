"""What a decision returns: the outcome, the findings (each a rule of ``rules.RULES``), the overrides, and the
collector the decision fills. Pure data."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from .model import VmReport
from .rules import Mode, Severity, severity_of

__all__ = ["RANK", "Collector", "Finding", "Outcome", "Verdict", "outcome_of"]


class Outcome(enum.Enum):
    COMPATIBLE = "compatible"
    ADJUSTABLE = "adjustable"
    BLOCKED = "blocked"
    UNKNOWN = "unknown"


RANK = {Severity.BLOCKER: 0, Severity.UNKNOWN: 1, Severity.ADJUST: 2, Severity.WARNING: 3, Severity.INFO: 4}


@dataclass(frozen=True, slots=True)
class Finding:
    device: str  # qdev id or QOM path; "" for a VM-wide finding
    severity: Severity
    code: str  # stable rule name, e.g. "offer-missing"
    why: str  # one plain sentence
    feature: str | None = None
    bit: int | None = None
    source: str | None = None  # the source's value: "offered" / "not offered" / a property value / text
    dest: str | None = None
    negotiated: bool | None = None  # whether the guest negotiated the feature on the source


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    mode: Mode
    findings: tuple[Finding, ...]
    adjustments: dict[str, dict[str, str]] = field(default_factory=dict)  # qdev id -> {property: "on"/"off"}
    recommendations: dict[str, dict[str, str]] = field(default_factory=dict)  # lenient: strict's overrides
    source: VmReport | None = None
    dest: VmReport | None = None
    pairs: tuple[tuple[str | None, str | None], ...] = ()  # (source key, destination key) as QEMU pairs them
    predicted: tuple[str, ...] = ()  # destination facts predicted from a host dump instead of probed
    predicted_from: str | None = None  # which dump, in words

    @property
    def verdict(self) -> str:
        return self.outcome.value

    def device_findings(self, device: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.device == device)


class Collector:
    """Findings as rules of the table (``rules.RULES``): the table, not the caller, says how much each weighs."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.findings: list[Finding] = []
        self.adjust: dict[str, dict[str, str]] = {}
        self.recommend: dict[str, dict[str, str]] = {}

    def add(self, device: str, code: str, why: str, **kw: object) -> None:
        self.findings.append(Finding(device, severity_of(code, self.mode), code, why, **kw))  # type: ignore[arg-type]


def outcome_of(findings: Iterable[Finding]) -> Outcome:
    severities = {f.severity for f in findings}
    if Severity.BLOCKER in severities:
        return Outcome.BLOCKED
    if Severity.UNKNOWN in severities:
        return Outcome.UNKNOWN
    if Severity.ADJUST in severities:
        return Outcome.ADJUSTABLE
    return Outcome.COMPATIBLE


