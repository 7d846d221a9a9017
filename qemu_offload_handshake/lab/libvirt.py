"""Two libvirt "hosts" on this machine, A and B, for real ``virsh migrate --live`` runs (issue 11).

Each host is one system-mode ``libvirtd`` (Debian ships only the monolithic daemon) in its own network namespace
and mount namespace: ``ip netns exec`` gives a new mount namespace, where the host's folders are bind-mounted over
``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and ``/var/cache/libvirt``, so
that nothing shows in the root namespace and everything vanishes with the host's last process. The two are joined
by a veth pair (10.213.0.1 on A, .2 on B: ``migration_address``/``migration_host``); each has a tap ``qohtap0`` of
its own (the same name on both, as on real hosts). ``nouso``: the host's ``/usr/bin/qemu-system-x86_64`` is a
wrapper starting QEMU with the no-USO shim (its QEMUs, and the hook's scratch QEMU there, lack USO).

libvirtd runs under a small child subreaper (``reaper.py``): libvirt daemonizes QEMU, and this machine's init
reaps late, which costs every ``virsh destroy`` and migration ~2 s otherwise. Everything the hosts start names
their folder ``/tmp/qoh-libvirt-<pid>-XXXX`` on its command line, and the netns are ``qohlv<pid>A``/``B``: the
lab's leak checks (``leaks.py``) find and clean what a dead run left. The facts behind each setting are in the
README's test section."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .builds import LabError, cache_dir, pdeathsig
from .leaks import LIBVIRT_PREFIX, NETNS_PREFIX, kill_tree, lab_folder, still_alive

__all__ = ["LibvirtHost", "LibvirtHosts", "Migration", "domain_xml", "libvirt_prerequisites"]

TAP = "qohtap0"
QEMU = "/usr/bin/qemu-system-x86_64"
MOUNTS = ("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"), \
    ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt")
REAPER = '''"""reaper.py CMD...: run CMD as a child subreaper, reap every orphan at once, exit when no child is left."""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("reaper: prctl: " + os.strerror(ctypes.get_errno()))
main = os.fork()
if main == 0:
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: libvirtd dies with the reaper (which dies with the lab)
    os.execvp(sys.argv[1], sys.argv[1:])
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda n, _f: os.kill(main, n))
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == main:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
'''


def libvirt_prerequisites() -> list[str]:
    """What is missing for two libvirt hosts, as sentences (empty: ready)."""
    needed = ("/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/nsenter", "/usr/bin/python3")
    problems = [f"{p} is missing: run scripts/setup.sh (libvirt 11.3)" for p in needed if not os.path.exists(p)]
    if not problems:
        out = subprocess.run(["/usr/sbin/libvirtd", "--version"], capture_output=True, text=True, check=False).stdout
        version = out.split()[-1] if out.split() else "?"
        if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (11, 3):
            problems.append(f"libvirtd is {version}, need >= 11.3: run scripts/setup.sh")
    with contextlib.suppress(ImportError):
        import libvirt  # noqa: F401
        return problems
    return [*problems, "the libvirt Python binding is missing in this venv: run scripts/setup.sh"]


def domain_xml(name: str, serial: Path, extra: str = "") -> str:
    """A TCG guest (the lab's kernel and initramfs, 256 MiB, no disk), one virtio NIC on the host's tap (userspace
    virtio-net, like the plain-QEMU lab), its console in ``serial``; ``extra`` goes inside ``<domain>``."""
    guest = cache_dir() / "guest"
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-10.0'>hvm</type>
    <kernel>{guest}/vmlinuz</kernel><initrd>{guest}/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline></os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU}</emulator>
    <controller type='usb' model='none'/>
    <interface type='ethernet'><mac address='52:54:00:12:34:56'/><target dev='{TAP}' managed='no'/>
      <model type='virtio'/><driver name='qemu'/></interface>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>{extra}
</domain>
"""


@dataclass(frozen=True, slots=True)
class Migration:
    returncode: int
    stderr: str
    seconds: float


@dataclass
class LibvirtHost:
    """One libvirt host: its folder (the bind-mount sources), netns, veth address and daemon."""

    name: str  # "A" or "B"
    folder: Path
    netns: str
    address: str
    nouso: bool
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0  # libvirtd's
    started_in: float = 0.0

    @property
    def uri(self) -> str:
        """A connection URI that works from the root namespace (the socket path is under /tmp, seen by all)."""
        return f"qemu+unix:///system?socket={self.folder}/run/libvirt-sock"

    def path(self, inside: str) -> Path:
        """Where a path of the host's namespace (under one of the bind mounts) is seen from the root namespace."""
        for sub, target in MOUNTS:
            if inside == target or inside.startswith(target + "/"):
                return self.folder / sub / inside[len(target):].lstrip("/")
        raise LabError(f"{inside} is not under one of host {self.name}'s own folders")

    def inside(self, *argv: str) -> list[str]:
        """``argv`` run in this host's mount and network namespaces (as its libvirtd and its hooks see them)."""
        return ["nsenter", "-t", str(self.pid), "-m", "-n", *argv]

    async def run(self, *argv: str, input: str | None = None, timeout: float = 60,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, self.inside(*argv), input=input, capture_output=True,
                                       text=True, timeout=timeout, check=False, env=env)

    async def virsh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, ["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                                       text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        """libvirtd's log (warnings and errors: hooks' failures land there)."""
        with contextlib.suppress(OSError):
            return (self.folder / "log" / "libvirtd.log").read_text(errors="replace")
        return ""

    def qemu_log(self, domain: str) -> str:
        """The domain's QEMU log on this host (QEMU's stderr: a failed incoming migration says why only here)."""
        with contextlib.suppress(OSError):
            return (self.folder / "log" / "qemu" / f"{domain}.log").read_text(errors="replace")
        return ""

    def monitor_socket(self, domain: str) -> Path:
        """The QMP socket libvirt holds for a running domain, as seen from the root namespace."""
        found = sorted((self.folder / "lib" / "qemu").glob(f"domain-*-{domain}/monitor.sock"))
        if not found:
            raise LabError(f"host {self.name}: no monitor socket for {domain}")
        return found[-1]


@dataclass
class LibvirtHosts:
    """``async with LibvirtHosts(nouso="B") as hosts``: hosts ``a`` and ``b`` with their daemons up."""

    nouso: str = ""  # "A", "B" or "": the host whose QEMU lacks USO
    parent: Path | None = None
    folder: Path = field(init=False)
    hosts: dict[str, LibvirtHost] = field(init=False, default_factory=dict)
    _undo: list[list[str]] = field(init=False, default_factory=list)

    @property
    def a(self) -> LibvirtHost:
        return self.hosts["A"]

    @property
    def b(self) -> LibvirtHost:
        return self.hosts["B"]

    async def __aenter__(self) -> LibvirtHosts:
        problems = libvirt_prerequisites()
        if problems:
            raise LabError("; ".join(problems))
        self.folder = lab_folder(LIBVIRT_PREFIX, self.parent)
        try:
            await asyncio.to_thread(self._up)
            for host in self.hosts.values():  # one after the other: the second finds the capabilities cache warm
                # started from this (the loop's) thread: PR_SET_PDEATHSIG fires when the creating thread ends
                started = self._spawn(host)
                await asyncio.to_thread(self._wait_ready, host, started)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _up(self) -> None:
        (self.folder / "reaper.py").write_text(REAPER)
        if not Path("/run/libvirt").exists():
            Path("/run/libvirt").mkdir()  # the mount point; empty in the root namespace
            self._undo.append(["rmdir", "/run/libvirt"])
        if not os.path.ismount("/run/netns"):
            self._undo.append(["umount", "/run/netns"])  # iproute2 bind-mounts it onto itself at the first netns
        if not Path("/run/netns").exists():
            self._undo.append(["rmdir", "/run/netns"])
        prefix = f"{NETNS_PREFIX}{os.getpid()}"
        for name, address, uuid in (("A", "10.213.0.1", "a"), ("B", "10.213.0.2", "b")):
            host = LibvirtHost(name, self.folder / name, prefix + name, address, self.nouso == name)
            self.hosts[name] = host
            self._configure(host, uuid)
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "tuntap", "add", "dev", TAP, "mode", "tap")
            _ip("-n", host.netns, "link", "set", TAP, "up")
        _ip("link", "add", f"{prefix}A0", "netns", self.a.netns, "type", "veth", "peer", "name", f"{prefix}B0",
            "netns", self.b.netns)
        for host in self.hosts.values():
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", f"{prefix}{host.name}0")
            _ip("-n", host.netns, "link", "set", f"{prefix}{host.name}0", "up")

    def _configure(self, host: LibvirtHost, uuid: str) -> None:
        d = host.folder
        for sub in ("etc/hooks/qemu.d", "run", "lib", "log", "cache/qemu/capabilities"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # libvirtd decides whether a qemu hook exists at start only (hooks/qemu or an executable in qemu.d), then
        # re-lists qemu.d at every call: a no-op script keeps it live, so hooks can come and go without a restart.
        keep = d / "etc/hooks/qemu.d/00-keep-hooks-live"
        keep.write_text("#!/bin/sh\nexit 0\n")
        keep.chmod(0o755)
        (d / "etc/libvirtd.conf").write_text(
            f'host_uuid = "00000000-0000-4000-8000-00000000000{uuid}"\nauth_unix_ro = "none"\nauth_unix_rw = "none"\n'
            'unix_sock_rw_perms = "0700"\nlog_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        # root QEMUs, no cgroups (both daemons number domains from 1), no per-domain namespace, no security driver,
        # QEMU's stderr in log/qemu/NAME.log (no virtlogd); migration on this host's veth address.
        (d / "etc/qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = "none"\n'
            'cgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = "file"\n'
            f'migration_address = "{host.address}"\nmigration_host = "{host.address}"\n')

    def _spawn(self, host: LibvirtHost) -> float:
        caches = cache_dir() / "libvirt"
        caps = caches / ("caps-nouso" if host.nouso else "caps-plain")  # the wrapper has its own ctime
        caps.mkdir(parents=True, exist_ok=True)
        mounts = [f"mount --bind {host.folder / sub} {target}" for sub, target in MOUNTS]
        mounts.append(f"mount --bind {caps} /var/cache/libvirt/qemu/capabilities")
        if host.nouso:
            mounts += [f"mount --bind {QEMU} {_stable(caches / 'real-qemu', '')}",
                       f"mount --bind {_nouso_wrapper(caches)} {QEMU}"]
        script = " && ".join([*mounts, f"exec /usr/sbin/libvirtd -p {host.folder}/libvirtd.pid"])
        out = open(host.folder / "daemon.out", "wb")  # noqa: SIM115 (the daemon keeps it)
        started = time.monotonic()
        with out:
            # env -i: libvirt passes its PATH on to hooks and QEMUs; cwd /: libvirtd keeps it, hooks inherit it
            host.proc = subprocess.Popen(
                ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "ip", "netns", "exec", host.netns,
                 "/usr/bin/python3", str(self.folder / "reaper.py"), "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/", preexec_fn=pdeathsig,
                start_new_session=True)
        return started

    def _wait_ready(self, host: LibvirtHost, started: float) -> None:
        assert host.proc is not None
        deadline = started + 60  # a cold capabilities cache: libvirt probes QEMU (1.5-8 s)
        while time.monotonic() < deadline:
            ready = subprocess.run(["virsh", "-q", "-c", host.uri, "version"], capture_output=True,
                                   stdin=subprocess.DEVNULL, timeout=30, check=False).returncode == 0
            if ready:
                host.pid = int((host.folder / "libvirtd.pid").read_text().strip())
                host.started_in = time.monotonic() - started
                return
            if host.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise LabError(f"libvirtd of host {host.name} did not come up: "
                       f"{(host.folder / 'daemon.out').read_text(errors='replace')[-2000:]} {host.log()[-2000:]}")

    async def boot(self, host: LibvirtHost, name: str = "qohvm", extra: str = "", timeout: float = 60) -> Path:
        """Define and start a guest on ``host``, wait until its virtio-net driver is up; its serial log's path."""
        serial = self.folder / f"{name}.serial"
        serial.write_text("")
        xml = self.folder / f"{name}.xml"
        xml.write_text(domain_xml(name, serial, extra))
        for args in (("define", str(xml)), ("start", name)):
            done = await host.virsh(*args)
            if done.returncode != 0:
                raise LabError(f"host {host.name}: virsh {args[0]} {name}: {done.stderr.strip()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = serial.read_text(errors="replace")
            if "QOH-GUEST-READY" in text:
                return serial
            if "Kernel panic" in text or "QOH-GUEST-ERROR" in text:
                break
            await asyncio.sleep(0.05)
        raise LabError(f"guest {name} on host {host.name} did not come up: {serial.read_text()[-500:]!r}")

    async def migrate(self, source: LibvirtHost, dest: LibvirtHost, name: str = "qohvm", *options: str,
                      timeout: float = 120) -> Migration:
        """``virsh migrate --live`` (direct: virsh talks to both daemons)."""
        started = time.monotonic()
        done = await source.virsh("migrate", "--live", *options, name, dest.uri, timeout=timeout)
        return Migration(done.returncode, done.stderr, time.monotonic() - started)

    async def close(self) -> None:
        await asyncio.to_thread(self._down)

    def _down(self) -> None:
        for host in self.hosts.values():
            if host.pid and host.proc is not None and host.proc.poll() is None:
                names = subprocess.run(["virsh", "-q", "-c", host.uri, "list", "--name"], capture_output=True,
                                       text=True, timeout=30, check=False, stdin=subprocess.DEVNULL).stdout.split()
                for name in names:
                    subprocess.run(["virsh", "-q", "-c", host.uri, "destroy", name], capture_output=True,
                                   timeout=30, check=False, stdin=subprocess.DEVNULL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.pid, 15)
        for host in self.hosts.values():
            if host.proc is None:
                continue
            try:
                host.proc.wait(timeout=10)  # the reaper: it exits once libvirtd and its QEMUs are gone
            except subprocess.TimeoutExpired:
                kill_tree(host.proc.pid)
                host.proc.wait(timeout=10)
        for host in self.hosts.values():  # anything left in the namespace (a QEMU libvirt lost, a hung hook)
            pids = _netns_pids(host.netns)
            for pid in pids:
                kill_tree(pid)
            deadline = time.monotonic() + 10
            while still_alive(pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            if Path(f"/run/netns/{host.netns}").exists():
                _ip("netns", "del", host.netns)  # with its tap and the veth pair
        others = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
        for argv in self._undo:
            if argv[0] == "rmdir" and argv[1] == "/run/libvirt":
                if not any(n.startswith(NETNS_PREFIX) for n in others):  # another run's hosts mount over it
                    with contextlib.suppress(OSError):
                        os.rmdir("/run/libvirt")
            elif not others:
                subprocess.run(argv, capture_output=True, timeout=10, check=False)
        self._undo.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _netns_pids(netns: str) -> list[int]:
    if not Path(f"/run/netns/{netns}").exists():
        return []
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _stable(path: Path, body: str, mode: int = 0o644) -> Path:
    """``path`` holding ``body``, rewritten only when it differs (libvirt's capabilities cache keys on ctime)."""
    if not path.exists() or path.read_text() != body:
        path.write_text(body)
    if path.stat().st_mode & 0o777 != mode:
        path.chmod(mode)
    return path


def _nouso_wrapper(caches: Path) -> Path:
    """A QEMU that starts the real one (bind-mounted on ``real-qemu`` in the host's namespace) with the shim."""
    shim = cache_dir() / "nouso.so"
    if not shim.exists():
        raise LabError(f"no-USO shim missing at {shim}: run scripts/setup.sh")
    return _stable(caches / "qemu-nouso", f'#!/bin/sh\nLD_PRELOAD={shim} exec {caches / "real-qemu"} "$@"\n', 0o755)
