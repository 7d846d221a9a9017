"""The decision rules as one table: every finding code, its severity in strict and in lenient mode, and what it
means. The decision (``decide``) only says *which* rule a finding is; the table decides how much it weighs, and
the README's list of codes is checked against it (``tests/test_layout.py``). Pure data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["RULES", "Mode", "Rule", "Severity", "severity_of"]


class Severity(enum.Enum):
    BLOCKER = "blocker"  # the migration fails or the guest loses a feature it uses
    UNKNOWN = "unknown"  # a fact needed for the decision is missing
    ADJUST = "adjust"  # fixed by the destination overrides
    WARNING = "warning"  # no effect on the verdict, but an operator should know
    INFO = "info"


class Mode(enum.Enum):
    STRICT = "strict"
    LENIENT = "lenient"


@dataclass(frozen=True, slots=True)
class Rule:
    strict: Severity
    lenient: Severity
    means: str


_B, _U, _A, _W, _I = Severity.BLOCKER, Severity.UNKNOWN, Severity.ADJUST, Severity.WARNING, Severity.INFO
RULES: dict[str, Rule] = {
    # a side, the machine, the device list
    "probe-failed": Rule(_U, _U, "a side could not be probed at all (unreachable, hung, unreadable replies)"),
    "unreadable": Rule(_U, _U, "a fact QEMU was asked for could not be read"),
    "machine-unknown": Rule(_U, _U, "the machine type of a side could not be read"),
    "machine-differs": Rule(_B, _B, "the machine types differ"),
    "devices-unknown": Rule(_U, _U, "the virtio-net devices of a side could not be listed"),
    "no-nics": Rule(_I, _I, "neither side has a virtio-net device"),
    # pairing devices as QEMU pairs their state
    "device-missing": Rule(_B, _B, "the destination has no device where the source has one"),
    "device-extra": Rule(_B, _B, "only the destination has this device"),
    "device-moved": Rule(_W, _W, "a device id is in another slot on the destination"),
    "device-renamed": Rule(_W, _W, "the device in a slot has another id on the destination"),
    "device-path-unknown": Rule(_U, _U, "where QEMU files a device's state could not be read"),
    # what the load checks (virtio_net_load / virtio_load)
    "negotiated-missing": Rule(_B, _B, "the guest uses a feature the destination does not offer"),
    "negotiated-undetermined": Rule(_U, _U, "the guest may use a feature whose offer cannot be told safely"),
    "negotiated-unknown": Rule(_U, _U, "the guest's negotiated features could not be read"),
    "backend-vnet_hdr": Rule(_B, _B, "the destination's backend lacks the source's virtio-net header"),
    "backend-vnet_hdr-unknown": Rule(_U, _U, "whether a backend has a virtio-net header cannot be told"),
    "backend-has_ufo": Rule(_B, _B, "the destination's backend lacks the source's UFO support"),
    "backend-has_ufo-unknown": Rule(_U, _U, "whether a backend supports UFO cannot be told"),
    # the offered features (the guest ABI)
    "offered-unknown": Rule(_U, _U, "the offered features of a side could not be read"),
    "offered-undetermined": Rule(_U, _W, "whether a side offers a feature cannot be told safely"),
    "offer-missing": Rule(_B, _W, "the destination offers less: the guest loses it at its next reset"),
    "offer-extra": Rule(_A, _W, "the destination offers more and can be told not to"),
    "offer-extra-fixed": Rule(_B, _W, "the destination offers more and has no property to turn it off"),
    "overrides-inconsistent": Rule(_B, _B, "the overrides would leave a feature without one it requires"),
    "silently-off": Rule(_W, _W, "a property is on but QEMU silently does not offer its feature"),
    "negotiation-pending": Rule(_W, _W, "the driver has not negotiated yet and may still do so"),
    "derived": Rule(_I, _I, "facts were derived from safe reads, not read (x-query-virtio-status unsafe)"),
    # a destination predicted from its host's dump (precheck --dest-dump)
    "predicted": Rule(_I, _I, "the destination was predicted from its host's dump, not probed"),
    "dest-cannot-run": Rule(_B, _B, "the destination host cannot run this machine type or backend (its dump)"),
    "dest-undetermined": Rule(_U, _U, "the dump cannot tell the destination (not probed there, backend unknown)"),
    "predicted-property-absent": Rule(_W, _W, "a property of the source does not exist on the destination's QEMU"),
    "predicted-default-differs": Rule(_U, _W, "a property differs from the destination QEMU's default: undetermined"),
    # the handshake between hosts (handshake, answer, serve)
    "handshake": Rule(_I, _I, "the destination host answered the handshake: from what (incoming, scratch, dump)"),
    "handshake-disagrees": Rule(_U, _U, "the destination's own verdict differs from this side's on the same reports"),
    "hook-refused": Rule(_B, _B, "the destination's libvirt hook refused the migration (migrate through libvirt)"),
    "hook-undecided": Rule(_U, _U, "the destination's libvirt hook could not decide (migrate through libvirt)"),
    # policy
    "policy-on": Rule(_B, _B, "policy requires a feature a side does not offer"),
    "policy-off": Rule(_A, _A, "policy requires a feature off: turned off on the destination"),
    "policy-off-source": Rule(_B, _B, "policy requires a feature off that the running source offers"),
    "policy-off-fixed": Rule(_B, _B, "policy requires a feature off the destination cannot turn off"),
    "policy-undetermined": Rule(_U, _U, "policy names a feature whose offer cannot be told safely"),
    # device state beyond the feature bits (devstate.STATE_RULES)
    "state-differs": Rule(_B, _B, "device state that must match for the load differs (vectors, queues, ROM, ...)"),
    "config-differs": Rule(_B, _W, "device state the guest sees differs (ring sizes, MTU, speed, MAC)"),
    "state-unknown": Rule(_U, _U, "device state could not be read on a side"),
    # about the reports themselves (check)
    "report-old": Rule(_W, _W, "a report is older than --max-age"),
    "report-age-unknown": Rule(_W, _W, "a report does not say when it was made"),
    "report-sides-swapped": Rule(_W, _W, "the report files are in destination, source order"),
    "report-unsigned": Rule(_W, _W, "the reports were not HMAC-verified"),
}


def severity_of(code: str, mode: Mode) -> Severity:
    rule = RULES[code]  # a KeyError here is a bug: every finding is a rule of the table
    return rule.strict if mode is Mode.STRICT else rule.lenient
