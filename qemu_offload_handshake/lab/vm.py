"""One lab VM: what to start (``VmSpec`` with its ``Nic``s), the running QEMU (``Vm``) and a migration's outcome."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPClient, QMPError

from ..core.labels import parse_feature_block, parse_status
from ..core.quirks import known_crash
from ..probing import split_virtio_path
from .builds import LabError, QemuVersion

Backend = Literal["tap", "tap-nouso", "tap-notunnel", "user"]
Mode = Literal["paused", "booted", "incoming"]



@dataclass(frozen=True, slots=True)
class Nic:
    """One virtio-net NIC: its qdev id, its backend and extra ``-device`` properties."""

    id: str  # "" for a device created without an id (QEMU puts it under /machine/peripheral-anon)
    backend: Backend = "tap"
    props: tuple[tuple[str, str], ...] = ()
    driver: str = "virtio-net-pci"
    queues: int = 1  # tap queue pairs (a multi-queue tap and netdev queues=N when > 1)

    @classmethod
    def make(cls, id: str, backend: Backend = "tap", **props: str | bool) -> Nic:
        items = tuple((k, ("on" if v else "off") if isinstance(v, bool) else v) for k, v in props.items())
        return cls(id, backend, items)


@dataclass(frozen=True, slots=True)
class VmSpec:
    qemu: QemuVersion = "10"
    machine: str = "q35"
    nics: tuple[Nic, ...] = (Nic("net0"),)
    mode: Mode = "paused"
    memory_mb: int = 256
    vm_name: str = "vm"  # QEMU's -name is qoh-lab-<pid>-<vm_name>: a source and its destination share it, as with
    # libvirt, Nova and KubeVirt (the precheck's `check` refuses reports of different VMs)
    # Seconds the guest waits (kernel argument qoh.delay, rounded up to whole seconds) before it loads virtio_net; a
    # booted VM with one is returned by Lab.start while it waits (no driver yet): Lab.wait_guest_ready waits for it.
    driver_delay: float | None = None

    def destination(self, backends: Mapping[str, Backend] | None = None, **changes: Any) -> VmSpec:
        """The same VM as an ``-incoming defer`` destination, with some NIC backends replaced."""
        backends = backends or {}
        nics = tuple(replace(n, backend=backends.get(n.id, n.backend)) for n in self.nics)
        return replace(self, mode="incoming", nics=nics, **changes)


@dataclass(frozen=True, slots=True)
class Migration:
    status: str  # completed / failed / cancelled / timeout
    error: str | None  # the source's error-desc
    dest_error: str  # what the destination printed on stderr
    source_state: str | None  # run state of the source afterwards (None: it is gone)
    dest_state: str | None  # run state of the destination afterwards (None: it exited)
    offered_before: dict[str, int]  # qdev id -> bitmap offered by the source (empty where it cannot be read)
    offered_after: dict[str, int] | None  # qdev id -> bitmap offered by the destination, if it lives

    @property
    def source_running(self) -> bool:
        return self.source_state == "running"


@dataclass
class Vm:
    spec: VmSpec
    name: str
    dir: Path
    argv: list[str]
    proc: asyncio.subprocess.Process
    taps: dict[str, str]  # nic id -> tap name
    qmp: QMPClient = field(default_factory=QMPClient)

    @property
    def qmp_path(self) -> str:
        """The lab's own QMP socket (it drives QEMU through it)."""
        return str(self.dir / "qmp.sock")

    @property
    def address(self) -> str:
        """A second QMP socket for others (the precheck, an orchestrator): ``unix:/path``."""
        return f"unix:{self.dir / 'ext.sock'}"

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    @property
    def version(self) -> tuple[int, int, int] | None:
        greeting = self.qmp.greeting
        if greeting is None:
            return None
        qemu = greeting.QMP.version["qemu"]
        return int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"])  # type: ignore[index]

    @property
    def status_readable(self) -> bool:
        """Whether x-query-virtio-status is safe on this QEMU (the lab never sends what crashes it either)."""
        return known_crash("x-query-virtio-status", None, self.version) is None

    def guest_features(self) -> dict[str, int]:
        """Guest interface -> the features its driver negotiated, as the guest itself printed them at boot
        (``/sys/class/net/IF/device/features``: character i is bit i)."""
        return {m.group(1): int(m.group(2)[::-1], 2)
                for m in re.finditer(r"QOH-GUEST-NIC (\S+) ([01]+)", self.serial_text())}

    def stderr_text(self) -> str:
        return (self.dir / "stderr.log").read_text(errors="replace")

    def serial_text(self) -> str:
        path = self.dir / "serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def execute(self, command: str, args: Mapping[str, object] | None = None,
                      timeout: float = 30.0) -> Any:
        try:
            return await asyncio.wait_for(self.qmp.execute(command, dict(args) if args else None), timeout)
        except (QMPError, TimeoutError, OSError) as err:
            raise LabError(f"{self.name}: {command} failed: {err!r}; stderr: {self.stderr_text()}") from err

    async def virtio_paths(self) -> dict[str, str]:
        """Device key (qdev id, or QOM path when it has none, as ``NicReport.key``) -> its virtio backend path."""
        paths = {}
        for dev in await self.execute("x-query-virtio"):
            if dev["name"] == "virtio-net":
                qdev_id, device = split_virtio_path(dev["path"])
                paths[qdev_id or device] = dev["path"]
        return paths

    async def _statuses(self) -> dict[str, Any]:
        if not self.status_readable:
            raise LabError(f"{self.name}: x-query-virtio-status is known to crash QEMU {self.version}; not sent")
        return {nic: await self.execute("x-query-virtio-status", {"path": path})
                for nic, path in (await self.virtio_paths()).items()}

    async def features(self, which: str = "host-features") -> dict[str, int]:
        """Device key -> feature bitmap (``host-features`` = offered, ``guest-features`` = negotiated)."""
        return {nic: parse_feature_block(status[which], where=f"{self.name} {nic}").bitmap
                for nic, status in (await self._statuses()).items()}

    async def driver_status(self) -> dict[str, int]:
        return {nic: parse_status(status["status"]) for nic, status in (await self._statuses()).items()}

    async def run_state(self) -> str | None:
        if not self.alive:
            return None
        try:
            reply = await asyncio.wait_for(self.qmp.execute("query-status"), 10)
        except (QMPError, TimeoutError, OSError):
            return None
        return str(reply["status"])  # type: ignore[index]
