"""A lab of real local QEMUs: start them, boot the test guest, migrate between them, clean up.

Used by the tests, the benchmarks and the ``demo`` command. It needs root (tap devices) and what
``scripts/setup.sh`` installs: QEMU >= 10 on the PATH, QEMU 7.2 unpacked in the cache folder, the test guest
(kernel + busybox initramfs) and the no-USO shim. This is I/O shell code; it sends any QMP command it likes
(it *drives* QEMU), unlike the precheck's read-only prober.

Every QEMU it starts gets ``PR_SET_PDEATHSIG`` (dies with the Python process) and every tap it creates is
deleted in ``Lab.close()``; ``leftovers()`` finds what an earlier run may have left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPClient, QMPError

from ..core.labels import parse_feature_block, parse_status
from ..core.quirks import known_crash
from ..probing import split_virtio_path
from .builds import (
    NAME_PREFIX,
    TAP_PREFIX,
    VERSIONS,
    LabError,
    QemuBuild,
    QemuVersion,
    before_first_device,
    cache_dir,
    ip,
    pdeathsig,
    prerequisites,
    qemu_build,
)
from .leaks import Leftovers, clean, clean_stale, leftovers, owned_leftovers, stale_leftovers

__all__ = [
    "VERSIONS",
    "Lab",
    "LabError",
    "Leftovers",
    "Migration",
    "Nic",
    "QemuBuild",
    "Vm",
    "VmSpec",
    "before_first_device",
    "cache_dir",
    "clean",
    "clean_stale",
    "leftovers",
    "owned_leftovers",
    "prerequisites",
    "qemu_build",
    "stale_leftovers",
]

Backend = Literal["tap", "tap-nouso", "tap-notunnel", "user"]
Mode = Literal["paused", "booted", "incoming"]

GUEST_READY = "QOH-GUEST-READY"
DRIVER_OK = 4



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


class Lab:
    """Owns every QEMU and tap it makes; ``async with Lab() as lab`` cleans up whatever happens."""

    def __init__(self, *, boot_timeout: float = 120.0) -> None:
        self.boot_timeout = boot_timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"{NAME_PREFIX}{os.getpid()}-"))  # names its owner (stale check)
        self.vms: list[Vm] = []
        self._taps: list[str] = []
        self._count = 0

    async def __aenter__(self) -> Lab:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _new_tap(self, queues: int = 1) -> str:
        self._count += 1
        name = f"{TAP_PREFIX}{os.getpid() % 100000}t{self._count}"[:15]
        ip("tuntap", "add", "dev", name, "mode", "tap", *(["multi_queue"] if queues > 1 else []))
        self._taps.append(name)
        return name

    @staticmethod
    def _nic_key(nic: Nic, index: int) -> str:
        return nic.id or f"#{index}"

    def _argv(self, spec: VmSpec, name: str, vmdir: Path, taps: Mapping[str, str]) -> list[str]:
        build = qemu_build(spec.qemu)
        guest = cache_dir() / "guest"
        argv = [build.binary, *build.args, "-name", f"{NAME_PREFIX}{os.getpid()}-{spec.vm_name}",
                "-nodefaults", "-no-user-config",
                "-display", "none", "-accel", "tcg", "-machine", spec.machine, "-m", str(spec.memory_mb),
                "-smp", "1",
                "-chardev", f"socket,id=qmp,path={vmdir / 'qmp.sock'},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control",
                "-chardev", f"socket,id=ext,path={vmdir / 'ext.sock'},server=on,wait=off",
                "-mon", "chardev=ext,mode=control",
                "-serial", f"file:{vmdir / 'serial.log'}",
                # The same kernel on every side (also paused and incoming ones) so both sides have equal ROMs.
                "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz"),
                "-append", "console=ttyS0 panic=-1 quiet"]
        for index, nic in enumerate(spec.nics):
            netdev = f"hn{index}"
            if nic.backend == "user":
                argv += ["-netdev", f"user,id={netdev}"]
            else:
                queues = f",queues={nic.queues}" if nic.queues > 1 else ""
                argv += ["-netdev", f"tap,id={netdev},ifname={taps[self._nic_key(nic, index)]},script=no,"
                                    f"downscript=no{queues}"]
            props = "".join(f",{k}={v}" for k, v in nic.props)
            mac = f"52:54:00:12:34:{index + 0x10:02x}"
            qdev_id = f",id={nic.id}" if nic.id else ""
            argv += ["-device", f"{nic.driver}{qdev_id},netdev={netdev},mac={mac}{props}"]
        if spec.mode == "paused":
            argv.append("-S")
        elif spec.mode == "incoming":
            argv += ["-incoming", "defer"]
        return argv

    async def start(self, spec: VmSpec, *, extra_args: Iterable[str] = (),
                    rewrite: Callable[[list[str]], list[str]] | None = None) -> Vm:
        """Start one QEMU; in ``booted`` mode return once the guest's virtio-net driver is up.

        ``rewrite`` may change the command line before QEMU starts (e.g. ``argv.apply_adjustments``)."""
        self._count += 1
        name = f"{NAME_PREFIX}{os.getpid()}-{self._count}"
        vmdir = self.dir / name
        vmdir.mkdir()
        taps = {self._nic_key(n, i): self._new_tap(n.queues) for i, n in enumerate(spec.nics) if n.backend != "user"}
        argv = [*self._argv(spec, name, vmdir, taps), *extra_args]
        if rewrite is not None:
            argv = rewrite(argv)
        env = dict(os.environ) | dict(qemu_build(spec.qemu).env)
        for kind, var in (("tap-nouso", "QOH_NOUSO_TAPS"), ("tap-notunnel", "QOH_NOTUNNEL_TAPS")):
            listed = [taps[self._nic_key(n, i)] for i, n in enumerate(spec.nics) if n.backend == kind]
            if listed:
                env["LD_PRELOAD"] = str(cache_dir() / "nouso.so")
                env[var] = ",".join(listed)
        (vmdir / "argv").write_text(" ".join(argv) + "\n")
        with open(vmdir / "stderr.log", "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, preexec_fn=pdeathsig)
        vm = Vm(spec, name, vmdir, argv, proc, taps)
        self.vms.append(vm)
        await self._connect(vm)
        if spec.mode == "booted":
            await self._wait_guest(vm)
        return vm

    async def _connect(self, vm: Vm) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            if not vm.alive:
                raise LabError(f"{vm.name} exited at start ({vm.proc.returncode}): {vm.stderr_text()}")
            if os.path.exists(vm.qmp_path):
                try:
                    await asyncio.wait_for(vm.qmp.connect(vm.qmp_path), 10)
                    return
                except (QMPError, OSError, TimeoutError):
                    vm.qmp = QMPClient()
            if loop.time() > deadline:
                raise LabError(f"{vm.name}: no QMP socket after 30 s; stderr: {vm.stderr_text()}")
            await asyncio.sleep(0.05)

    async def _wait_guest(self, vm: Vm) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.boot_timeout
        while GUEST_READY not in vm.serial_text():
            text = vm.serial_text()
            if "Kernel panic" in text or "QOH-GUEST-ERROR" in text or not vm.alive:
                raise LabError(f"{vm.name}: guest failed to boot; serial:\n{text[-2000:]}\n{vm.stderr_text()}")
            if loop.time() > deadline:
                raise LabError(f"{vm.name}: guest not ready after {self.boot_timeout} s; serial:\n{text[-2000:]}")
            await asyncio.sleep(0.1)
        if not vm.status_readable:  # the guest's own report: one line per NIC whose virtio driver is bound
            if len(vm.guest_features()) != len(vm.spec.nics):
                raise LabError(f"{vm.name}: guest is up but a virtio-net driver is not: {vm.serial_text()[-2000:]}")
            return
        status = await vm.driver_status()
        if not all(s & DRIVER_OK for s in status.values()):
            raise LabError(f"{vm.name}: guest is up but a virtio-net driver is not: {status}")

    async def migrate(self, src: Vm, dst: Vm, *, timeout: float = 180.0) -> Migration:
        """Migrate for real over a UNIX socket with ``return-path`` on both sides, and report."""
        before = await src.features() if src.status_readable else {}
        caps = {"capabilities": [{"capability": "return-path", "state": True}]}
        await src.execute("migrate-set-capabilities", caps)
        await dst.execute("migrate-set-capabilities", caps)
        uri = f"unix:{self.dir / (dst.name + '-migrate.sock')}"
        await dst.execute("migrate-incoming", {"uri": uri})
        await src.execute("migrate", {"uri": uri})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        status, error = "timeout", None
        while loop.time() < deadline:
            info = await src.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                status, error = info["status"], info.get("error-desc")
                break
            await asyncio.sleep(0.1)
        if status != "completed":
            # A destination that failed to load exits; give it a moment so its stderr is complete.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dst.proc.wait(), 10)
        after = await dst.features() if status == "completed" and dst.alive and dst.status_readable else None
        return Migration(status, error, dst.stderr_text(), await src.run_state(), await dst.run_state(),
                         before, after)

    async def stop(self, vm: Vm) -> None:
        if vm.alive:
            with contextlib.suppress(QMPError, TimeoutError, OSError):
                await asyncio.wait_for(vm.qmp.execute("quit"), 3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(vm.proc.wait(), 5)
        if vm.alive:
            with contextlib.suppress(ProcessLookupError):
                vm.proc.kill()
            await vm.proc.wait()
        # qemu.qmp re-raises, on disconnect, whatever ended the connection (EOFError once QEMU quit).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(vm.qmp.disconnect(), 3)
        for tap in vm.taps.values():
            if tap in self._taps:
                self._taps.remove(tap)
                with contextlib.suppress(LabError):
                    ip("link", "del", tap)

    async def close(self) -> None:
        try:
            for vm in self.vms:
                try:
                    await self.stop(vm)
                finally:
                    if vm.alive:  # stop() was interrupted: PDEATHSIG would get it later, but not now
                        with contextlib.suppress(ProcessLookupError):
                            vm.proc.kill()
            self.vms.clear()
        finally:
            for tap in self._taps:
                with contextlib.suppress(LabError):
                    ip("link", "del", tap)
            self._taps.clear()
            shutil.rmtree(self.dir, ignore_errors=True)
