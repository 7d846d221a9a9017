"""The handshake's messages: the source's ``Offer`` (optionally announced by a ``Prepare``), the destination's
``Answer``, and a ``Refusal`` the source may get instead of an answer. Frozen value objects, checked when made;
they travel as wire-format records (types 6, 7, 8 and 9: ``wire_handshake``); the order they may come in is
``protocol``'s. Pure data, no I/O.

A prepare carries only the offer's nonce and the incoming QEMU's address: a source that names the incoming QEMU
sends it first, so that the destination probes that QEMU while the source probes its own (a direct precheck probes
both at once; the handshake would otherwise probe one after the other). An offer carries the source VM's report, the
decision's mode and policy, a random nonce and the time it was made, and optionally the QMP address of the incoming
QEMU as seen on the destination host. An answer echoes the nonce and carries the destination's verdict (outcome,
findings, adjustments, recommendations), the destination's own report or, when it answered from its host's dump,
that dump, and how it got its truth (``Truth``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from .model import Tri, VmReport, _check_items, _check_str
from .platform import HostDump
from .rules import RULES, Mode
from .verdict import Finding, Outcome

__all__ = [
    "MAX_FINDINGS",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "REFUSAL_CODES",
    "Answer",
    "Offer",
    "Overrides",
    "Prepare",
    "Refusal",
    "Truth",
    "overrides",
]

PROTOCOL_VERSION = 1
NONCE_BYTES = 16
MAX_FINDINGS = 4096  # findings in one answer (a VM has at most 256 NICs, each with a few dozen findings at most)
_MAX_TIME_MS = (1 << 48) - 1

# Why a destination refused to answer (``Refusal.code``).
REFUSAL_CODES = {
    "version": "the offer's protocol version is not one this destination speaks",
    "malformed": "the offer could not be decoded (a hostile or corrupt frame)",
    "stale": "the offer was made too long ago, or in the future (clocks apart)",
    "replayed": "an offer with this nonce was already answered",
    "busy": "the destination is answering as many handshakes as it may; try again",
    "deadline": "the offer did not arrive in time",
    "failed": "the destination could not answer (its reason says why)",
}

# Per NIC (qdev id), the destination properties to set: ((property, "on"|"off"), ...), sorted, NICs sorted.
Overrides = tuple[tuple[str, tuple[tuple[str, str], ...]], ...]


def overrides(table: Mapping[str, Mapping[str, str]]) -> Overrides:
    """A verdict's ``adjustments`` / ``recommendations`` dict as the frozen, sorted form the messages carry."""
    return tuple(sorted((nic, tuple(sorted(props.items()))) for nic, props in table.items()))


class Truth(enum.Enum):
    """Where the destination's answer comes from."""

    INCOMING = "incoming"  # the incoming QEMU the offer named, probed read-only
    SCRATCH = "scratch"  # a scratch QEMU the destination started with the source's machine type and NICs
    DUMP = "dump"  # the destination host's dump (no QEMU could be started for it)
    NONE = "none"  # nothing: the verdict says why (unknown or blocked)


def _check_nonce(nonce: bytes) -> None:
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")


def _check_overrides(name: str, table: Overrides) -> None:
    _check_items(name, table)
    if [nic for nic, _ in table] != sorted({nic for nic, _ in table}):
        raise ValueError(f"{name}: NICs must be sorted and distinct")
    for nic, props in table:
        _check_str(f"{name} NIC", nic)
        _check_items(f"{name}[{nic}]", props)
        if [p for p, _ in props] != sorted({p for p, _ in props}):
            raise ValueError(f"{name}[{nic}]: properties must be sorted and distinct")
        for prop, value in props:
            _check_str(f"{name}[{nic}] property", prop)
            if value not in ("on", "off"):
                raise ValueError(f"{name}[{nic}].{prop} must be on or off, not {value!r}")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 0xFFFF:
        raise ValueError(f"protocol version must be 1 to 65535: {version!r}")


@dataclass(frozen=True, slots=True)
class Prepare:
    nonce: bytes  # the coming offer's
    dest_address: str  # the coming offer's: the incoming QEMU's QMP address as seen on the destination host
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_nonce(self.nonce)
        _check_str("dest_address", self.dest_address)
        _check_version(self.version)


@dataclass(frozen=True, slots=True)
class Offer:
    source: VmReport
    nonce: bytes
    made_at_ms: int  # Unix time in milliseconds, by the source's clock
    mode: Mode = Mode.STRICT
    policy: tuple[tuple[str, Tri], ...] = ()  # (property, ON/OFF/AUTO), sorted by property
    dest_address: str | None = None  # the incoming QEMU's QMP address as seen on the destination host
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.source, VmReport):
            raise TypeError("an offer's source is a VmReport")
        _check_nonce(self.nonce)
        if isinstance(self.made_at_ms, bool) or not isinstance(self.made_at_ms, int) \
                or not 0 <= self.made_at_ms <= _MAX_TIME_MS:
            raise ValueError(f"made_at_ms must be Unix milliseconds: {self.made_at_ms!r}")
        if not isinstance(self.mode, Mode):
            raise TypeError("mode must be a Mode")
        _check_items("policy", self.policy)
        if [p for p, _ in self.policy] != sorted({p for p, _ in self.policy}):
            raise ValueError("policy: properties must be sorted and distinct")
        for prop, tri in self.policy:
            _check_str("policy property", prop)
            if not isinstance(tri, Tri) or tri is Tri.UNSET:
                raise ValueError(f"policy {prop}: on, off or auto")
        _check_str("dest_address", self.dest_address, optional=True)
        _check_version(self.version)


@dataclass(frozen=True, slots=True)
class Answer:
    nonce: bytes  # the offer's
    truth: Truth
    how: str  # one sentence: which QEMU or dump, and why not a better source of truth
    outcome: Outcome
    mode: Mode
    findings: tuple[Finding, ...] = ()
    adjustments: Overrides = ()
    recommendations: Overrides = ()
    dest: VmReport | None = None  # the destination's report (truth INCOMING or SCRATCH)
    dump: HostDump | None = None  # the destination host's dump (truth DUMP)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_nonce(self.nonce)
        if not isinstance(self.truth, Truth) or not isinstance(self.outcome, Outcome) \
                or not isinstance(self.mode, Mode):
            raise TypeError("truth, outcome and mode must be their enums")
        _check_str("how", self.how)
        _check_items("findings", self.findings, MAX_FINDINGS)
        for finding in self.findings:
            if not isinstance(finding, Finding):
                raise TypeError("findings must be Finding objects")
            if finding.code not in RULES:
                raise ValueError(f"unknown finding code {finding.code!r}")
            for name in ("device", "why"):
                _check_str(f"finding {name}", getattr(finding, name))
            for name in ("feature", "source", "dest"):
                _check_str(f"finding {name}", getattr(finding, name), optional=True)
            if finding.bit is not None and (isinstance(finding.bit, bool) or not isinstance(finding.bit, int)
                                            or not 0 <= finding.bit < 1 << 16):
                raise ValueError(f"finding bit must be 0 to 65535: {finding.bit!r}")
        _check_overrides("adjustments", self.adjustments)
        _check_overrides("recommendations", self.recommendations)
        if self.dest is not None and not isinstance(self.dest, VmReport):
            raise TypeError("dest must be a VmReport")
        if self.dump is not None and not isinstance(self.dump, HostDump):
            raise TypeError("dump must be a HostDump")
        expected = {Truth.INCOMING: (True, False), Truth.SCRATCH: (True, False), Truth.DUMP: (False, True),
                    Truth.NONE: (False, False)}[self.truth]
        if (self.dest is not None, self.dump is not None) != expected:
            raise ValueError(f"an answer from {self.truth.value} carries "
                             + {(True, False): "the destination's report", (False, True): "the host's dump",
                                (False, False): "neither a report nor a dump"}[expected])
        _check_version(self.version)

    @property
    def adjustments_dict(self) -> dict[str, dict[str, str]]:
        return {nic: dict(props) for nic, props in self.adjustments}


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # one of REFUSAL_CODES
    message: str  # one sentence
    nonce: bytes | None = None  # the offer's, when it was read
    version: int = PROTOCOL_VERSION  # the highest protocol version the refusing side speaks

    def __post_init__(self) -> None:
        if self.code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {self.code!r}")
        _check_str("message", self.message)
        if self.nonce is not None:
            _check_nonce(self.nonce)
        _check_version(self.version)


