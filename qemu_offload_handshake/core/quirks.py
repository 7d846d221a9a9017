"""Commands known to crash or misbehave on given QEMU versions: one table, consulted before anything is sent.

A read-only precheck that takes down the VM it reads is the worst thing this tool can do. Every QMP command (and
every HMP command line sent through ``human-monitor-command``) is checked against ``KNOWN_CRASHES`` with the
version QEMU announced in its QMP greeting, before it is sent (``qmp.ReadOnlyQMP``); a listed command is never
sent to a listed version, and the probe reads what it can by other, safe means (``derive``). When the version is
not known, every listed command counts as unsafe.

An entry's range is ``first`` (inclusive) to ``fixed`` (exclusive); ``fixed=None`` means no fixed release is
known, so every later version is treated as affected until one is verified on the real binary.

This module is pure data and logic (no I/O).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KNOWN_CRASHES", "SAFE_ON_11_1", "KnownCrash", "Version", "command_key", "known_crash"]

Version = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class KnownCrash:
    command: str  # a QMP command name, or "hmp:" + the HMP command word(s), e.g. "hmp:info virtio-status"
    first: Version  # first version known affected
    fixed: Version | None  # first version known fixed; None: none known, every later version counts as affected
    effect: str  # what QEMU does
    evidence: str  # where and how it was seen

    def affects(self, version: Version | None) -> bool:
        if version is None:
            return True  # an unknown version may be an affected one
        return self.first <= version and (self.fixed is None or version < self.fixed)


_V11_1_EVIDENCE = ("seen on Debian's 1:11.1.3+ds-1~bpo13+1 (trixie-backports; same version in sid) on this "
                   "project's Debian 12 lab: any virtio device, paused (-S) or running with a booted guest, any "
                   "machine type; tests/test_qemu111.py proves the tool never sends it")
KNOWN_CRASHES: tuple[KnownCrash, ...] = (
    KnownCrash("x-query-virtio-status", (11, 1, 0), None,
               "QEMU aborts: qapi/qapi-visit-core.c:52: visit_start_struct: Assertion "
               "'!(v->type & VISITOR_OUTPUT) || *obj' failed", _V11_1_EVIDENCE),
    KnownCrash("hmp:info virtio-status", (11, 1, 0), None,
               "QEMU segfaults (the HMP twin of x-query-virtio-status)", _V11_1_EVIDENCE),
)

# Read-only commands tried on the real 11.1.3 binary (paused and with a booted guest) that leave QEMU running
# (the probe uses some of them; tests/test_qemu111.py re-checks the ones it uses).
SAFE_ON_11_1: tuple[str, ...] = (
    "query-version", "query-status", "query-name", "query-uuid", "query-pci", "qom-list", "qom-get",
    "qom-list-get", "x-query-virtio", "x-query-virtio-queue-status", "hmp:info network", "hmp:info virtio",
    "hmp:info qtree",
)


def command_key(command: str, arguments: Mapping[str, object] | None = None) -> str:
    """The table's key for a command: the QMP name, or ``hmp:`` and the words of an HMP command line (its
    arguments, such as a QOM path, are left out)."""
    if command == "human-monitor-command":
        line = (arguments or {}).get("command-line")
        words = line.split() if isinstance(line, str) else []
        head = words[:2] if words[:1] == ["info"] else words[:1]
        return "hmp:" + " ".join(head)
    return command


def known_crash(command: str, arguments: Mapping[str, object] | None,
                version: Version | None) -> KnownCrash | None:
    """The table entry that forbids sending this command to this QEMU version, if any."""
    key = command_key(command, arguments)
    for entry in KNOWN_CRASHES:
        if entry.command == key and entry.affects(version):
            return entry
    return None
