"""Take one host's dump: what its QEMU and kernel can offer, per machine type and backend kind (``HostDump``).

``dump_host`` first asks the QEMU which virtio-net properties it has (``-device virtio-net-pci,help``: name and
QOM type of each, about 13 ms) and its default machine type (``-machine help``, the line marked ``(default)``,
about 16 ms), both at once. Then, for each machine type at once, one scratch QEMU (``scratch.py``) with one NIC
per backend kind, each with **every offload property turned on**, and one NIC without a netdev and without
properties, whose properties are the machine type's effective defaults (machine-type compat properties,
``hw/core/machine.c`` ``hw_compat_*``, apply to every device of that machine). The offered bitmaps are read as the
precheck reads them (``probing.probe_vm``): from ``x-query-virtio-status`` on 7.2 and 10.0, derived on 11.1,
whose undetermined bits (a tap's USO and UDP tunnel offloads, RSS/hash) go into ``Offer.unknown``.

"Every offload property" is every catalogue property of kind OFFLOAD plus those QEMU may silently clear
(``features.SILENTLY_CLEARED``, which adds ``rss``) that this QEMU has; a ``bool`` is set ``on``, an ``OnOffAuto``
(none of these properties is one in 7.2, 10.0 or 11.1) ``auto``, which is on wherever the backend can do it.
Which of them QEMU refuses to start with when on: **none**, seen on 7.2.22, 10.0.2 and 11.1.3 (q35, with a tap,
``-netdev user`` and no netdev, all of them on at once and each alone): ``hash``, ``rss`` and ``guest_rsc_ext``
are accepted and then silently not offered where the backend cannot do them. ``_REFUSED_WHEN_ON`` would list a
property some QEMU refuses to start with (left at its default then); it is empty.

Nothing that cannot be probed makes the dump fail: a backend the host lacks (``scratch.backend_problem``: no
``/dev/vhost-net``, no right to make taps; or QEMU refusing it), a machine type QEMU does not have, a scratch
QEMU that is refused, times out or cannot be read, each becomes an ``Unprobed`` entry with its reason. Only a
QEMU that cannot be run at all (no version to record) raises ``ScratchError``.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .core.errors import (
    BackendUnavailableError,
    HandshakeError,
    MachineTypeError,
    ScratchError,
    UsageError,
)
from .core.features import BY_PROPERTY, CEILING_PROPERTIES
from .core.model import Tri
from .core.platform import HostDump, MachineOffers, Offer, Unprobed
from .qemuproc import DEFAULT_TIMEOUT, QemuCommand, QemuLike, backend_problem, qemu_output
from .scratch import BACKENDS, QEMU_NAME, ScratchNic, probe_scratch

__all__ = ["DEFAULT_BACKENDS", "ceiling_properties", "device_properties", "dump_host", "parse_device_help",
           "parse_machine_help"]

DEFAULT_BACKENDS = ("tap", "tap-vhost")
DEFAULTS_NIC = "qoh-defaults"  # the NIC without netdev and properties: the machine type's effective defaults
# Offload properties a QEMU refuses to start with when on: none on 7.2.22, 10.0.2, 11.1.3 (module docstring).
_REFUSED_WHEN_ON: frozenset[str] = frozenset()
_HELP_LINE = re.compile(r"^\s+([A-Za-z][\w.-]*)=<([^>]+)>", re.MULTILINE)
_VERSION = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)(?: \((.+)\))?")
CEILING = CEILING_PROPERTIES


def parse_device_help(text: str) -> dict[str, str]:
    """Property name -> QOM type from ``-device DRIVER,help`` (``  csum=<bool>  - on/off (default: on)``; the same
    form on 7.2, 10.0 and 11.1, where 11.1 also lists ``hash-ipv4=<OnOffAuto>`` and the like)."""
    return {m.group(1): m.group(2) for m in _HELP_LINE.finditer(text)}


def parse_machine_help(text: str) -> str | None:
    """The default machine type from ``-machine help`` (``pc-i440fx-10.0  Standard PC ... (default)``)."""
    for line in text.splitlines():
        if line.rstrip().endswith("(default)") and line.split():
            return line.split()[0]
    return None


async def device_properties(qemu: QemuLike, *, driver: str = "virtio-net-pci",
                            timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
    """Every property of ``driver`` on this QEMU with its QOM type, without starting a machine."""
    return parse_device_help(await qemu_output(QemuCommand.of(qemu), "-device", f"{driver},help", timeout=timeout))


def ceiling_properties(types: dict[str, str]) -> dict[str, str]:
    """The ``-device`` properties that turn every offload of this QEMU on (``types``: its properties and their
    QOM types): ``on`` for a bool, ``auto`` for an OnOffAuto (on wherever the backend can)."""
    return {name: ("auto" if kind == "OnOffAuto" else "on") for name, kind in sorted(types.items())
            if name in CEILING and name not in _REFUSED_WHEN_ON and kind in ("bool", "OnOffAuto")}


def _version(text: str) -> tuple[tuple[int, int, int], str | None] | None:
    m = _VERSION.search(text)
    return None if m is None else ((int(m.group(1)), int(m.group(2)), int(m.group(3))), m.group(4))


@dataclass
class _Machine:
    """What one machine type's scratch QEMU gave."""

    asked: str | None
    offers: MachineOffers | None = None
    unprobed: list[Unprobed] = field(default_factory=list)  # backends that could not be probed on it
    missing: bool = False  # QEMU has no such machine type
    failed: str | None = None  # why this machine type could not be probed at all
    version: tuple[int, int, int] | None = None
    package: str | None = None
    types: tuple[tuple[str, str], ...] = ()


async def _dump_machine(qemu: QemuCommand, machine: str | None, kinds: Sequence[str], props: dict[str, str],
                        timeout: float) -> _Machine:
    """One scratch QEMU for one machine type; a backend QEMU will not make is dropped and the QEMU started again
    without it (so one missing backend costs the others nothing)."""
    out = _Machine(machine)
    kinds = list(kinds)
    while True:
        nics = [ScratchNic(f"qoh-{kind}", kind, tuple(props.items())) for kind in kinds]
        nics.append(ScratchNic(DEFAULTS_NIC, None))
        try:
            got = await probe_scratch(qemu, machine=machine, nics=nics, timeout=timeout)
            break
        except BackendUnavailableError as err:
            if err.backend not in kinds:
                raise
            kinds.remove(err.backend)
            out.unprobed.append(Unprobed(machine, err.backend, str(err)))
        except MachineTypeError:
            out.missing = True
            return out
        except HandshakeError as err:  # refused, timed out, unreadable: this machine type is not probed
            out.failed = str(err)
            return out
    out.version, out.package, out.types = got.version, got.package, got.types
    name = got.machine or machine
    if name is None:
        out.failed = "its machine type could not be read: " + "; ".join(got.report.unreadable)
        return out
    defaults_nic = got.nic(DEFAULTS_NIC)
    defaults = tuple(sorted(defaults_nic.properties)) if defaults_nic else ()
    offers = []
    for kind in kinds:
        nic = got.nic(f"qoh-{kind}")
        if nic is None or nic.offered is None:
            why = "; ".join(nic.unreadable) if nic else "the NIC is missing from x-query-virtio"
            out.unprobed.append(Unprobed(name, kind, f"offered features unreadable: {why}"))
            continue
        offers.append(Offer(kind, nic.offered, nic.offered_unknown))
    out.unprobed = [Unprobed(name, u.backend, u.reason) for u in out.unprobed]
    out.offers = MachineOffers(name, tuple((p, t) for p, t in defaults if t is not Tri.UNSET),
                               tuple(sorted(offers, key=lambda o: o.backend)))
    return out


def _kinds(backends: Iterable[str] | None) -> list[str]:
    kinds = list(dict.fromkeys(DEFAULT_BACKENDS if backends is None else backends))
    unknown = [k for k in kinds if k not in BACKENDS]
    if unknown:
        raise UsageError(f"backend kinds {unknown} unknown: a dump probes {', '.join(BACKENDS)}")
    return kinds


async def dump_host(qemu: QemuLike = None, *, machines: Sequence[str] = (), backends: Iterable[str] | None = None,
                    host: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> HostDump:
    """This host's dump for the QEMU ``qemu`` (a binary, a command prefix, a ``QemuCommand``; None:
    ``qemu-system-x86_64`` from PATH): ``machines`` (default: QEMU's default machine type; aliases such as
    ``q35`` are recorded under their real name), ``backends`` (default ``tap`` and ``tap-vhost``; any of
    ``scratch.BACKENDS``). ``timeout`` is the deadline of each step (a QEMU start, a QMP command)."""
    command = QemuCommand.of(qemu)
    kinds = _kinds(backends)
    bad = [m for m in machines if not isinstance(m, str) or not QEMU_NAME.fullmatch(m)]
    if bad:
        raise UsageError(f"not machine type names: {bad}")
    asked: list[str | None] = [*dict.fromkeys(machines)] or [None]
    help_text, machine_text = await asyncio.gather(
        qemu_output(command, "-device", "virtio-net-pci,help", timeout=timeout),
        qemu_output(command, "-machine", "help", timeout=timeout))
    help_types = parse_device_help(help_text)
    default_machine = parse_machine_help(machine_text)
    unprobed: list[Unprobed] = []
    usable = []
    for kind in kinds:
        problem = backend_problem(kind)
        if problem:
            unprobed.append(Unprobed(None, kind, problem))
        else:
            usable.append(kind)
    props = ceiling_properties(help_types)
    results = await asyncio.gather(*(_dump_machine(command, m, usable, props, timeout) for m in asked))
    greeted = next((r for r in results if r.version is not None), None)
    if greeted is not None:
        version, package = greeted.version, greeted.package
    else:
        found = _version(await qemu_output(command, "-version", timeout=timeout))
        if found is None:
            raise ScratchError(f"{command}: neither a QMP greeting nor -version told its version")
        version, package = found
    assert version is not None
    shown = ".".join(map(str, version))
    by_name: dict[str, MachineOffers] = {}
    for result in results:
        unprobed += result.unprobed
        if result.missing:
            unprobed.append(Unprobed(result.asked, None, f"QEMU {shown} has no machine type {result.asked}"))
        if result.failed is not None:
            what = f"machine type {result.asked}" if result.asked else "its default machine type"
            unprobed.append(Unprobed(result.asked, None, f"QEMU {shown} could not be probed with {what}: "
                                                         f"{result.failed}"))
        if result.offers is not None:
            by_name.setdefault(result.offers.machine, result.offers)  # "q35" and "pc-q35-10.0" are one
    types = dict(help_types) | dict(next((r.types for r in results if r.types), ()))
    return HostDump(
        host=host or socket.gethostname(), kernel=os.uname().release, qemu_version=version, package=package,
        made_at=int(time.time()),
        properties=tuple(sorted((p, t) for p, t in types.items() if p in BY_PROPERTY)),
        machines=tuple(by_name[name] for name in sorted(by_name)),
        unprobed=tuple(unprobed), binary=command.binary, default_machine=default_machine)

