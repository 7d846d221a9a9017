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
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from .builds import (
    NAME_PREFIX,
    TAP_PREFIX,
    VERSIONS,
    LabError,
    QemuBuild,
    before_first_device,
    cache_dir,
    ip,
    pdeathsig,
    prerequisites,
    qemu_build,
)
from .leaks import Leftovers, clean, clean_stale, leftovers, owned_leftovers, stale_leftovers
from .vm import Backend, Migration, Mode, Nic, Vm, VmSpec

__all__ = [
    "VERSIONS",
    "Backend",
    "Lab",
    "LabError",
    "Leftovers",
    "Migration",
    "Mode",
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

GUEST_READY = "QOH-GUEST-READY"
GUEST_WAITING = "QOH-GUEST-WAITING"  # the guest sleeps its driver_delay before loading virtio_net
DRIVER_OK = 4


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

    @staticmethod
    def _delay_arg(spec: VmSpec) -> str:
        if spec.driver_delay is None:
            return ""
        if not 0 <= spec.driver_delay <= 3600:
            raise LabError(f"driver_delay must be 0 to 3600 seconds, not {spec.driver_delay}")
        return f" qoh.delay={math.ceil(spec.driver_delay)}"

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
                "-append", "console=ttyS0 panic=-1 quiet" + self._delay_arg(spec)]
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

    def command_line(self, spec: VmSpec) -> list[str]:
        """The command line ``start`` would run for ``spec`` in ``booted`` mode (nothing added for the mode), its
        taps made (deleted in ``close``), for a QEMU someone else starts (``migrate --dest-argv``). Plain taps and
        ``user`` only: the no-USO shim needs an environment a command line cannot carry."""
        if any(n.backend not in ("tap", "user") for n in spec.nics):
            raise LabError("command_line: tap and user NICs only")
        self._count += 1
        name = f"{NAME_PREFIX}{os.getpid()}-{self._count}"
        vmdir = self.dir / name
        vmdir.mkdir()
        taps = {self._nic_key(n, i): self._new_tap(n.queues) for i, n in enumerate(spec.nics) if n.backend != "user"}
        return self._argv(replace(spec, mode="booted"), name, vmdir, taps)

    async def start(self, spec: VmSpec, *, extra_args: Iterable[str] = (),
                    rewrite: Callable[[list[str]], list[str]] | None = None) -> Vm:
        """Start one QEMU; in ``booted`` mode return once the guest's virtio-net driver is up (with a
        ``driver_delay``: once the guest waits to load it; ``wait_guest_ready`` then waits for the driver).

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
            await (self._wait_serial(vm, GUEST_WAITING) if spec.driver_delay is not None else self._wait_guest(vm))
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

    async def wait_guest_ready(self, vm: Vm) -> None:
        """Wait until a booted guest (one started with a ``driver_delay``) printed QOH-GUEST-READY, and check that
        its virtio-net drivers are up (DRIVER_OK), as ``start`` does without a delay."""
        await self._wait_guest(vm)

    async def _wait_serial(self, vm: Vm, marker: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.boot_timeout
        while marker not in vm.serial_text():
            text = vm.serial_text()
            if "Kernel panic" in text or "QOH-GUEST-ERROR" in text or not vm.alive:
                raise LabError(f"{vm.name}: guest failed to boot; serial:\n{text[-2000:]}\n{vm.stderr_text()}")
            if loop.time() > deadline:
                raise LabError(f"{vm.name}: no {marker} after {self.boot_timeout} s; serial:\n{text[-2000:]}")
            await asyncio.sleep(0.1)

    async def _wait_guest(self, vm: Vm) -> None:
        await self._wait_serial(vm, GUEST_READY)
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
