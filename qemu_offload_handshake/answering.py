"""The destination's side of a handshake: answer an offer from the truth of this host.

In this order (``answer_offer``):

1. the offer names the incoming QEMU's QMP address on this host: probe it, read-only (``api.probe``: the
   precheck's allowlist), and decide against it; if it cannot be read, the answer is ``unknown`` with why. A QEMU
   monitor serves one client at a time, so probes of one address take turns (``Destination.probe_incoming``); a
   probe may start when the source's ``Prepare`` arrives, before its offer (``incoming``);
2. otherwise this host's QEMU (``Destination.qemu``) is started as a scratch QEMU (``scratch.py``) with the
   offered VM's machine type and NICs: per NIC the same backend kind, the same effective offload property values
   (those this QEMU has; a property it lacks stays away, as it would from a command line that works here), the
   same device state (``devstate.STATE_RULES``: MAC, MSI-X vectors, ring sizes, MTU, speed/duplex, legacy/modern,
   page-per-vq, multifunction, no option ROM, queue pairs) and, on the root bus, the same PCI slot; then probed
   read-only like any QEMU, and killed;
3. when that QEMU lacks the machine type or cannot make a backend (no ``/dev/vhost-net``, no tap rights, a kind
   a scratch QEMU cannot make), or refuses the command line: this host's dump (``Destination.dump``), and the
   answer says so; without a dump, a missing machine type is ``dest-cannot-run`` (blocked), anything else
   ``dest-undetermined`` (unknown).

The decision is ``core.conclude.answer_from``: exactly the precheck's, with the offer's mode and policy.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace

from .api import check_address, probe
from .core.conclude import answer_from
from .core.errors import HandshakeError, MachineTypeError, ScratchError, UsageError
from .core.exchange import Answer, Offer, Truth
from .core.model import NicReport, Tri, VmReport
from .core.platform import HostDump
from .core.predict import backend_kind
from .dump import device_properties
from .qemuproc import DEFAULT_TIMEOUT, QemuCommand, QemuLike
from .qmp import describe, parse_address
from .scratch import BACKENDS, QEMU_NAME, ScratchNic, probe_scratch

__all__ = ["Destination", "answer_offer", "clip", "scratch_nics"]

_ROOT_SLOT = re.compile(r"0000:00:([0-9a-f]{2})\.([0-7])")  # a device on the root bus (probing.dev_path)
# Device state (devstate.STATE_RULES) set as -device properties of the same name; ats/aer matter only behind a
# PCIe port (a scratch QEMU puts its NICs on the root bus), "rom" and "queues" are set their own way below.
_STATE_PROPS = ("mac", "vectors", "rx_queue_size", "tx_queue_size", "host_mtu", "speed", "duplex", "multifunction",
                "disable-legacy", "disable-modern", "page-per-vq")
_VALUE = re.compile(r"[A-Za-z0-9:._-]{1,64}")
_CLIP = 900  # bytes of a sentence in an answer (the wire format takes 1024)


def clip(text: str, limit: int = _CLIP) -> str:
    """Text cut to ``limit`` UTF-8 bytes (an answer's sentences quote QEMU's stderr and addresses)."""
    data = text.encode("utf-8", "replace")
    return text if len(data) <= limit else data[:limit - 3].decode("utf-8", "ignore") + "..."


@dataclass
class Destination:
    """What this host answers from: its QEMU (for scratch QEMUs; None: never start one) and its dump."""

    qemu: QemuLike | None = "qemu-system-x86_64"
    dump: HostDump | None = None
    host: str | None = None  # names the reports (default: this machine's name)
    timeout: float = DEFAULT_TIMEOUT  # per QMP command and for a scratch QEMU's start
    # Incoming QEMUs an offer may name: address prefixes (unix:/run/qemu/, tcp:127.0.0.1:); empty: any address
    allow_dest: tuple[str, ...] = ()
    _props: dict[str, str] | None = field(default=None, repr=False)  # this QEMU's virtio-net-pci properties
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # per incoming QMP address: its lock and how many probes hold or wait for it (forgotten at zero)
    _monitors: dict[str, tuple[asyncio.Lock, list[int]]] = field(default_factory=dict, repr=False)

    def refuses(self, address: str) -> str | None:
        """Why this host does not probe the incoming QEMU the offer names (None: it does): not a QMP address, or
        outside ``allow_dest``. A unix path is compared once made absolute and free of symbolic links."""
        try:
            check_address(address)
        except UsageError as err:
            return str(err)
        if not self.allow_dest:
            return None
        if address.startswith("libvirt:"):
            normal = address
        else:
            target = parse_address(address)
            normal = describe(target if isinstance(target, tuple) else os.path.realpath(target))
        if any(normal.startswith(prefix) for prefix in self.allow_dest):
            return None
        return f"{clip(address, 200)} is not under an address this destination probes ({', '.join(self.allow_dest)})"

    async def probe_incoming(self, address: str) -> VmReport:
        """The incoming QEMU at ``address``, probed read-only; one probe per address at a time (QEMU's monitor
        takes one client; a third concurrent client was refused with EINVAL, seen on QEMU 10.0)."""
        lock, users = self._monitors.setdefault(address, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                return await probe(address, timeout=self.timeout, host=self.host, side="dest")
        finally:
            users[0] -= 1
            if not users[0]:
                del self._monitors[address]

    async def properties(self) -> dict[str, str]:
        """``-device virtio-net-pci,help`` of this QEMU, asked once."""
        async with self._lock:
            if self._props is None:
                assert self.qemu is not None
                self._props = await device_properties(self.qemu, timeout=self.timeout)
            return self._props


def scratch_nics(source: VmReport, props: dict[str, str]) -> tuple[list[ScratchNic], str | None]:
    """The scratch NICs that reproduce the source's, and why they cannot be made (None: they can)."""
    nics = []
    for index, nic in enumerate(source.nics):
        kind = backend_kind(nic)
        if kind is None and nic.netdev_id is not None:
            return [], f"NIC {nic.key}: its backend kind could not be read"
        if kind is not None and kind not in BACKENDS:
            return [], f"NIC {nic.key}: a {kind} backend is not one a scratch QEMU makes ({', '.join(BACKENDS)})"
        qdev_id = nic.qdev_id if QEMU_NAME.fullmatch(nic.qdev_id) else f"qoh-nic{index}"
        values = [(name, str(tri)) for name, tri in nic.properties if name in props and tri is not Tri.UNSET]
        state = dict(nic.state)
        values += [(name, state[name]) for name in _STATE_PROPS
                   if name in props and name in state and _VALUE.fullmatch(state[name])
                   and (name != "duplex" or state[name] in ("half", "full"))]
        if state.get("rom") == "none" and "romfile" in props:
            values.append(("romfile", ""))
        slot = _ROOT_SLOT.fullmatch(nic.dev_path or "")
        if slot and "addr" in props:
            values.append(("addr", f"{slot.group(1)}.{slot.group(2)}"))
        queues = int(state["queues"]) if state.get("queues", "").isdigit() and kind != "user" else 1
        nics.append(ScratchNic(qdev_id, kind, tuple(sorted(dict(values).items())), queues=max(queues, 1)))
    return nics, None


def _placed_first(nics: Sequence[ScratchNic]) -> list[ScratchNic]:
    """NICs with a PCI slot of their own first: one without could otherwise take the slot a later one names."""
    return sorted(nics, key=lambda n: not any(k == "addr" for k, _ in n.props))


def _same_paths(scratch: VmReport, source: VmReport, nics: Sequence[ScratchNic]) -> VmReport:
    """The scratch report with each NIC's id and device path as the source's: QEMU files device state by the path
    the command line gives it; a scratch NIC the source placed behind a PCIe port sits on the root bus here."""
    by_id = {n.id: src for n, src in zip(nics, source.nics, strict=True)}
    fixed: list[NicReport] = []
    for nic in scratch.nics:
        src = by_id.get(nic.qdev_id)
        fixed.append(nic if src is None else replace(nic, qdev_id=src.qdev_id, qom_path=src.qom_path,
                                                     dev_path=src.dev_path if src.dev_path else nic.dev_path))
    return replace(scratch, nics=tuple(fixed), side="dest")


async def _scratch(offer: Offer, dest: Destination) -> tuple[VmReport | None, str, list[tuple[str, str, str]]]:
    """Probe a scratch QEMU like the source: (report, how, findings when there is no report)."""
    assert dest.qemu is not None
    source, command = offer.source, QemuCommand.of(dest.qemu)
    if source.machine is None or not QEMU_NAME.fullmatch(source.machine):
        return None, "the source's machine type is not known", [("", "machine-unknown", "the offer does not say "
                                                                 "the source's machine type")]
    props = await dest.properties()
    nics, problem = scratch_nics(source, props)
    if problem:
        return None, clip(problem, 600), [("", "dest-undetermined", clip(problem))]
    try:
        scratch = await probe_scratch(command, machine=source.machine, nics=_placed_first(nics),
                                      timeout=dest.timeout, host=dest.host)
    except MachineTypeError as err:
        return None, f"{command} has no machine type {source.machine}", [
            ("", "dest-cannot-run", clip(f"this host's QEMU has no machine type {source.machine}: {err}"))]
    except ScratchError as err:
        return None, clip(f"a scratch QEMU could not be made: {err}", 600), [("", "dest-undetermined", clip(str(err)))]
    report = _same_paths(scratch.report, source, nics)
    version = ".".join(map(str, scratch.version)) if scratch.version else "of unknown version"
    return report, f"a scratch QEMU {version} ({command}, {source.machine}, {len(nics)} NIC(s))", []


async def answer_offer(offer: Offer, dest: Destination, *,
                       incoming: Awaitable[VmReport] | None = None) -> Answer:
    """The answer to one offer, from the truth of this host (module docstring). ``incoming``: the probe of the
    offer's incoming QEMU, already started (after a ``Prepare``). Raises nothing but cancellation: whatever fails
    becomes the answer's reason."""
    if offer.dest_address is not None:
        where = clip(offer.dest_address, 300)
        refused = dest.refuses(offer.dest_address)
        if refused:
            return answer_from(offer, truth=Truth.NONE, how=f"nothing: the incoming QEMU at {where} is not probed "
                               "here", findings=[("", "probe-failed", clip(f"not probed: {refused}"))])
        try:
            probed = await (incoming or dest.probe_incoming(offer.dest_address))
        except (UsageError, HandshakeError) as err:
            return answer_from(offer, truth=Truth.NONE, how=f"nothing: the incoming QEMU at {where} could not be "
                               "probed", findings=[("", "probe-failed", clip(f"the incoming QEMU at {where} could "
                                                                             f"not be probed: {err}"))])
        return answer_from(offer, truth=Truth.INCOMING, how=f"the incoming QEMU at {where}", dest=probed)
    why_not = "no QEMU to start a scratch QEMU with"
    findings: list[tuple[str, str, str]] = [("", "probe-failed", "this destination has neither a QEMU to start "
                                             "nor a dump")]
    if dest.qemu is not None:
        report: VmReport | None
        try:
            report, how, findings = await _scratch(offer, dest)
        except HandshakeError as err:  # this QEMU cannot even list its properties
            report, how, findings = None, clip(f"{dest.qemu} cannot be run: {err}", 600), [
                ("", "probe-failed", clip(str(err)))]
        if report is not None:
            return answer_from(offer, truth=Truth.SCRATCH, how=how, dest=report)
        why_not = how
    if dest.dump is not None:
        return answer_from(offer, truth=Truth.DUMP, how=clip(f"the dump of host {dest.dump.host} (no scratch QEMU: "
                                                             f"{why_not})"), dump=dest.dump)
    return answer_from(offer, truth=Truth.NONE, how=clip(f"nothing ({why_not}, no dump)"), findings=findings)
