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
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPClient, QMPError

from ..core.labels import parse_feature_block, parse_status
from ..core.quirks import known_crash
from ..probe import split_virtio_path

__all__ = [
    "Lab",
    "LabError",
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
QemuVersion = Literal["10", "7.2", "11.1"]
VERSIONS: tuple[QemuVersion, ...] = ("10", "7.2", "11.1")

TAP_PREFIX = "qoh"  # every tap the lab makes starts with this
NAME_PREFIX = "qoh-lab-"  # every QEMU the lab starts has -name qoh-lab-...
GUEST_READY = "QOH-GUEST-READY"
DRIVER_OK = 4


class LabError(Exception):
    """The lab cannot do what was asked (a prerequisite is missing, QEMU died, a guest did not boot). The lab is
    test and demo equipment, not the product: its errors are not part of the ``HandshakeError`` tree."""


def cache_dir() -> Path:
    """Where set-up puts QEMU 7.2/11.1, the guest and the shim: ``QOH_CACHE``, else ``.cache`` of the source
    checkout this package runs from (``scripts/setup.sh``), else ``~/.cache/qemu-offload-handshake`` (never inside
    site-packages)."""
    env = os.environ.get("QOH_CACHE")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists() and (checkout / "scripts" / "setup.sh").exists():
        return checkout / ".cache"
    return Path.home() / ".cache" / "qemu-offload-handshake"


@dataclass(frozen=True, slots=True)
class Nic:
    """One virtio-net NIC: its qdev id, its backend and extra ``-device`` properties."""

    id: str  # "" for a device created without an id (QEMU puts it under /machine/peripheral-anon)
    backend: Backend = "tap"
    props: tuple[tuple[str, str], ...] = ()
    driver: str = "virtio-net-pci"

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


@dataclass(frozen=True, slots=True)
class QemuBuild:
    """How to run one QEMU version: its binary, extra environment and extra arguments."""

    binary: str
    env: Mapping[str, str]
    args: tuple[str, ...]


def qemu_build(version: QemuVersion) -> QemuBuild:
    if version == "10":
        binary = shutil.which("qemu-system-x86_64")
        if binary is None:
            raise LabError("qemu-system-x86_64 (QEMU >= 10) is not installed: run scripts/setup.sh")
        return QemuBuild(binary, {}, ())
    root = cache_dir() / f"qemu-{version}"
    binary = str(root / "usr/bin/qemu-system-x86_64")
    if not os.access(binary, os.X_OK) or not (root / ".complete").exists():
        raise LabError(f"QEMU {version} is not unpacked at {root}: run scripts/setup.sh")
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    modules = {"QEMU_MODULE_DIR": f"{root}/usr/lib/x86_64-linux-gnu/qemu"}
    if version == "11.1":
        # Debian 13's QEMU with Debian 13's libraries, started through its own dynamic loader (NOTES, seen), with
        # its own firmware and option ROMs.
        loader = f"{root}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        return QemuBuild(loader, modules, ("--library-path", libs, binary, "-L", f"{root}/usr/share/qemu",
                                           "-L", f"{root}/usr/share/seabios", "-L", f"{root}/usr/lib/ipxe/qemu"))
    env = modules | {"LD_LIBRARY_PATH": libs}
    # Firmware and NIC option ROMs: the system's SeaBIOS and iPXE, then 7.2's own data (NOTES, seen).
    args = ("-L", "/usr/share/seabios", "-L", "/usr/lib/ipxe/qemu", "-L", f"{root}/usr/share/qemu")
    return QemuBuild(binary, env, args)


def before_first_device(argv: list[str], extra: Iterable[str]) -> list[str]:
    """``argv`` with ``extra`` arguments placed before its first ``-device`` (a bus must exist before its NIC)."""
    at = argv.index("-device") if "-device" in argv else len(argv)
    return [*argv[:at], *extra, *argv[at:]]


def prerequisites(*, guest: bool = True, qemu72: bool = True, qemu111: bool = True) -> list[str]:
    """What is missing for the lab to run, as sentences (empty: ready)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root: tap devices need root")
    if not os.path.exists("/dev/net/tun"):
        problems.append("/dev/net/tun is missing")
    versions = [v for v in VERSIONS if (v != "7.2" or qemu72) and (v != "11.1" or qemu111)]
    for version in versions:
        try:
            qemu_build(version)
        except LabError as err:
            problems.append(str(err))
    if guest:
        for name in ("vmlinuz", "initrd.gz"):
            if not (cache_dir() / "guest" / name).exists():
                problems.append(f"test guest {name} missing in {cache_dir() / 'guest'}: run scripts/setup.sh")
    if not (cache_dir() / "nouso.so").exists():
        problems.append(f"no-USO shim missing at {cache_dir() / 'nouso.so'}: run scripts/setup.sh")
    return problems


def _pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: QEMU dies with us, whatever happens


Leftovers = tuple[list[int], list[str], list[str]]  # lab QEMU pids, lab tap names, lab/test folders
_OWNER_PID = re.compile(rf"{re.escape(NAME_PREFIX)}(\d+)(?:-|$)")  # QEMU -name and VM folders: qoh-lab-<pid>-N
_TAP_OWNER = re.compile(rf"{re.escape(TAP_PREFIX)}(\d{{1,5}})t\d+")  # taps: qoh<pid % 100000>t<N>
_FOLDER_OWNER = re.compile(r"qoh-[a-z]+-(\d+)-")  # folders that name their owner: qoh-fake-<pid>-...
OWNERLESS_AGE = 3600.0  # a qoh-* folder that names no owner is stale once untouched this long (seconds)


def _processes() -> dict[int, tuple[int, bytes]]:
    """Every live process (zombies left out): pid -> (parent pid, command line)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            found[int(proc.name)] = (int(ppid), cmdline)
    return found


def _lab_qemus(procs: Mapping[int, tuple[int, bytes]]) -> dict[int, int | None]:
    """Live lab QEMUs: pid -> the owner pid named by their ``-name qoh-lab-<pid>-N`` (None: names none)."""
    qemus: dict[int, int | None] = {}
    for pid, (_, cmdline) in procs.items():
        if NAME_PREFIX.encode() not in cmdline or b"qemu-system" not in cmdline:
            continue
        args = cmdline.split(b"\0")
        names = [args[i + 1].decode(errors="replace") for i, arg in enumerate(args[:-1]) if arg == b"-name"]
        m = _OWNER_PID.match(names[0]) if names else None
        qemus[pid] = int(m.group(1)) if m else None
    return qemus


def _orphaned(owner: int | None, ppid: int, procs: Mapping[int, object]) -> bool:
    """Whether a lab QEMU has lost the process that started it (the one its name gives, its parent)."""
    if owner is None:  # a name this lab does not give: only an orphan adopted by init is surely stale
        return ppid == 1
    return owner not in procs or ppid != owner


def _tap_owner(tap: str) -> int | None:
    """A lab tap's owner as its name gives it: the owner's pid modulo 100000."""
    m = _TAP_OWNER.fullmatch(tap)
    return int(m.group(1)) if m else None


def _folder_owners(folder: Path) -> set[int]:
    """The pids a lab or test folder names: its own (``qoh-fake-<pid>-...``) or its VMs' (``qoh-lab-<pid>-N``)."""
    m = _FOLDER_OWNER.match(folder.name)
    if m:
        return {int(m.group(1))}
    owners = set()
    with contextlib.suppress(OSError):
        for sub in folder.iterdir():
            if m := _OWNER_PID.match(sub.name):
                owners.add(int(m.group(1)))
    return owners


def leftovers() -> Leftovers:
    """Pids of live lab QEMUs, names of lab taps, and lab/test socket folders (from this or any other run, live or
    not; ``stale_leftovers`` and ``owned_leftovers`` tell whose)."""
    pids = sorted(_lab_qemus(_processes()))
    taps = sorted(p.name for p in Path("/sys/class/net").iterdir()
                  if p.name.startswith(TAP_PREFIX) and (p / "tun_flags").exists())
    dirs = sorted(str(p) for p in Path(tempfile.gettempdir()).glob("qoh-*"))
    return pids, taps, dirs


def owned_leftovers(owners: Iterable[int]) -> Leftovers:
    """The leftovers whose names say one of ``owners`` (pids) made them: QEMUs ``qoh-lab-<pid>-N``, taps
    ``qoh<pid % 100000>tN``, folders ``qoh-fake-<pid>-...`` or holding VM folders ``qoh-lab-<pid>-N``."""
    owners = set(owners)
    pids, taps, dirs = leftovers()
    qemus = _lab_qemus(_processes())
    return ([p for p in pids if qemus.get(p) in owners],
            [t for t in taps if _tap_owner(t) in {o % 100000 for o in owners}],
            [d for d in dirs if _folder_owners(Path(d)) & owners])


def stale_leftovers(*, ownerless_age: float = OWNERLESS_AGE) -> Leftovers:
    """The leftovers of runs that are gone, safe to clean while other runs use the lab concurrently.

    A lab QEMU is stale when the process its name gives is not alive or is not its parent (the lab starts every
    QEMU itself); a tap when no live process has its owner's pid (modulo 100000) and no live QEMU names it; a
    folder when none of the owners it names is alive and no live QEMU uses it, or, naming none, when untouched
    for ``ownerless_age`` seconds."""
    procs = _processes()
    pids, taps, dirs = leftovers()
    qemus = _lab_qemus(procs)
    stale_qemus = [p for p in pids if p in procs and _orphaned(qemus.get(p), procs[p][0], procs)]
    in_use = [cmdline for pid, (_, cmdline) in procs.items() if pid in qemus and pid not in stale_qemus]
    live_mod = {pid % 100000 for pid in procs}
    stale_taps = [t for t in taps if _tap_owner(t) not in live_mod
                  and not any(f"ifname={t},".encode() in c for c in in_use)]
    stale_dirs = []
    for d in dirs:
        owners = _folder_owners(Path(d))
        if any(d.encode() + b"/" in c for c in in_use):
            continue
        if owners and not owners & procs.keys():
            stale_dirs.append(d)
        elif not owners:
            with contextlib.suppress(OSError):
                if time.time() - Path(d).stat().st_mtime > ownerless_age:
                    stale_dirs.append(d)
    return stale_qemus, stale_taps, stale_dirs


def clean(items: Leftovers) -> list[str]:
    """Kill these lab QEMUs (SIGKILL, then wait until they are gone), delete these taps and folders; return what
    was cleaned, one line each. A pid that is no longer a lab QEMU by then is left alone."""
    pids, taps, dirs = items
    done = []
    qemus = _lab_qemus(_processes())
    killed = []
    for pid in pids:
        if pid in qemus:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                done.append(f"killed QEMU {pid} (-name {NAME_PREFIX}{qemus[pid]}-...)")
    deadline = time.monotonic() + 10
    while killed and time.monotonic() < deadline:
        alive = _processes()
        killed = [p for p in killed if p in alive]
        time.sleep(0.05)
    for pid in killed:
        done.append(f"QEMU {pid} still alive 10 s after SIGKILL")
    for tap in taps:
        try:
            _ip("link", "del", tap)
            done.append(f"deleted tap {tap}")
        except LabError as err:
            done.append(f"could not delete tap {tap}: {err}")
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed folder {d}" if not os.path.exists(d) else f"could not remove folder {d}")
    return done


def clean_stale() -> list[str]:
    """Clean what runs that are gone left behind (``stale_leftovers``); return what was cleaned."""
    return clean(stale_leftovers())


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip()}")


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

    def _new_tap(self) -> str:
        self._count += 1
        name = f"{TAP_PREFIX}{os.getpid() % 100000}t{self._count}"[:15]
        _ip("tuntap", "add", "dev", name, "mode", "tap")
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
                argv += ["-netdev", f"tap,id={netdev},ifname={taps[self._nic_key(nic, index)]},script=no,downscript=no"]
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
        taps = {self._nic_key(n, i): self._new_tap() for i, n in enumerate(spec.nics) if n.backend != "user"}
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
                *argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, preexec_fn=_pdeathsig)
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
                    _ip("link", "del", tap)

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
                    _ip("link", "del", tap)
            self._taps.clear()
            shutil.rmtree(self.dir, ignore_errors=True)
