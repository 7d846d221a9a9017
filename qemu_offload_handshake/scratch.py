"""A throwaway QEMU of our own: started paused with no guest and no disk, its virtio-net NICs read, then gone.

``scratch_qemu(qemu, machine=..., nics=[...], timeout=...)`` starts ``QEMU -S -nodefaults -no-user-config
-display none`` with a QMP socket in a private folder and one ``-netdev``/``-device`` pair per NIC, on backends of
its own, and yields once QEMU has greeted on QMP; ``probe()`` reads it with the precheck's own read-only client
and prober (``qmp.ReadOnlyQMP``, ``probing.probe_vm``), so a QEMU whose ``x-query-virtio-status`` crashes it
(11.1) is read through the derivation, with undetermined bits. On leaving, whatever happened (an error, a
deadline, ``asyncio`` cancellation), its process group is killed and reaped, its taps have vanished and its folder
is removed (``qemuproc``). Every step has a deadline: ``timeout`` from the start to the QMP greeting, the same per
QMP command, 10 s for each step of the end.

QEMU facts this relies on (seen on 7.2.22, 10.0.2 and 11.1.3 on this machine, unless a source file is named):

* ``-netdev tap,ifname=NAME,script=no,downscript=no`` with a NAME that does not exist makes QEMU create a
  non-persistent tap (``net/tap-linux.c``, ``tap_open``: ``TUNSETIFF`` without ``TUNSETPERSIST``): the kernel
  deletes it when QEMU's descriptor closes: gone once 7.2 or 10.0 is reaped, 7-28 ms later for 11.1, whose
  io_uring rings hold it (``qemuproc.taps_gone``). Interface names have at most 15 characters (IFNAMSIZ).
* ``vhost=on`` without ``/dev/vhost-net``: 10.0 and 11.1 exit (``Could not open '/dev/vhost-net'``), 7.2 aborts
  on an assertion in ``net_client_init1``; so it is never asked for there (``BackendUnavailableError``).
* The QMP socket (``-qmp unix:PATH,server=on,wait=off``; 11.1 warns that ``-mon`` is deprecated) exists before
  the machine is built, about 17 ms after the start, and a moment before QEMU listens on it (7.2 refused a
  connection then); QEMU greets only once the machine is built, about 27 ms after the start (best of 7, bare
  ``-S -nodefaults``): an error in ``-device`` comes after the socket appeared, as EOF, then exit status 1.
* A refused command line is printed as ``qemu-system-x86_64: -OPTION ARG: message`` (exit 1), e.g.
  ``-device virtio-net-pci,bogus=on: Property 'virtio-net-pci.bogus' not found``; an unknown machine type as
  ``unsupported machine type`` (7.2) or ``unsupported machine type: "NAME"`` (10.0, 11.1); a tap without the
  right to make one as ``-netdev tap,...: could not open /dev/net/tun: Permission denied`` (as user nobody).
* Without ``-accel`` QEMU picks its default accelerator (TCG here; ``kvm`` would add about 5 ms and CPUID warnings);
  the NIC's offered features do not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .core.errors import (
    BackendUnavailableError,
    CommandError,
    CommandLineError,
    ConnectError,
    MachineTypeError,
    ScratchError,
    ScratchTimeoutError,
    UsageError,
)
from .core.features import BY_PROPERTY
from .core.model import NicReport, VmReport
from .probing import probe_vm
from .qemuproc import (
    DEFAULT_TIMEOUT,
    POLL,
    VHOST_NET,
    QemuCommand,
    QemuLike,
    backend_problem,
    exists,
    kill,
    log_fd,
    read_text,
    reap,
    spawn,
    taps_gone,
)
from .qmp import ReadOnlyQMP

__all__ = ["BACKENDS", "NAME_PREFIX", "QEMU_NAME", "VHOST_NET", "QemuCommand", "ScratchNic", "ScratchQemu",
           "ScratchReport", "probe_scratch", "scratch_qemu"]

BACKENDS = ("tap", "tap-vhost", "user")  # the backend kinds a scratch QEMU can make for a NIC (None: no netdev)
NAME_PREFIX = "qoh-scratch-"  # -name qoh-scratch-<our pid>-<n>, folders /tmp/qoh-scratch-<our pid>-<n>-*
TAP_PREFIX, TAP_INFIX = "qoh", "s"  # taps qoh<our pid % 100000>s<n> (the lab's leak checks know both)
QEMU_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")  # ids (util/id.c, id_wellformed), properties, machine types
_tap_numbers = itertools.count(1)
_instances = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ScratchNic:
    """One NIC of a scratch QEMU: its qdev id, backend kind (``BACKENDS``, or None: no netdev at all), extra
    ``-device`` properties, driver, and a tap's queue pairs (QEMU then makes a multi-queue tap)."""

    id: str
    backend: str | None = "tap"
    props: tuple[tuple[str, str], ...] = ()
    driver: str = "virtio-net-pci"
    queues: int = 1

    def __post_init__(self) -> None:
        for what, name in (("NIC id", self.id), ("driver", self.driver), *(("property", k) for k, _ in self.props)):
            if not isinstance(name, str) or not QEMU_NAME.fullmatch(name):
                raise UsageError(f"{what} {name!r}: letters, digits, '-', '.', '_', starting with a letter")
        if self.backend is not None and self.backend not in BACKENDS:
            raise UsageError(f"NIC {self.id}: backend {self.backend!r} is none of {', '.join(BACKENDS)}")
        if any(not isinstance(v, str) for _, v in self.props):
            raise UsageError(f"NIC {self.id}: property values must be text")
        if isinstance(self.queues, bool) or not isinstance(self.queues, int) or not 1 <= self.queues <= 1024:
            raise UsageError(f"NIC {self.id}: queues must be 1 to 1024, not {self.queues!r}")

    @classmethod
    def make(cls, id: str, backend: str | None = "tap", *, driver: str = "virtio-net-pci",
             **props: str | bool) -> ScratchNic:
        items = tuple((k, ("on" if v else "off") if isinstance(v, bool) else v) for k, v in props.items())
        return cls(id, backend, items, driver)


@dataclass(frozen=True, slots=True)
class ScratchReport:
    """What a scratch QEMU told: its version and package (QMP greeting), its resolved machine type (QOM
    ``/machine`` ``type``), the report of its NICs, the QOM types of the catalogue properties of its first
    virtio-net device (``qom-list``: ``bool``, or ``OnOffAuto`` where a QEMU adopts it) and its taps."""

    version: tuple[int, int, int] | None
    package: str | None
    machine: str | None
    report: VmReport
    types: tuple[tuple[str, str], ...] = ()
    taps: tuple[tuple[str, str], ...] = ()  # (NIC id, tap name)

    def nic(self, id: str) -> NicReport | None:
        return self.report.nic(id)


def _escape(value: str) -> str:
    return value.replace(",", ",,")  # QemuOpts: a comma inside a value is doubled


def _new_tap() -> str:
    """A tap name nobody uses: ``qoh<pid % 100000>s<n>``, at most 15 characters."""
    while True:
        name = f"{TAP_PREFIX}{os.getpid() % 100000}{TAP_INFIX}{next(_tap_numbers) % 1_000_000}"
        if not os.path.exists(f"/sys/class/net/{name}"):
            return name


class ScratchQemu:
    """One scratch QEMU; made by ``scratch_qemu``, which starts it and makes sure it is gone afterwards."""

    def __init__(self, command: QemuCommand, *, machine: str | None, nics: Sequence[ScratchNic], timeout: float,
                 extra_args: Sequence[str], host: str | None) -> None:
        if not timeout > 0:
            raise UsageError(f"timeout must be positive, not {timeout}")
        if machine is not None and not QEMU_NAME.fullmatch(machine):
            raise UsageError(f"machine type {machine!r} is not a machine type name")
        ids = [n.id for n in nics]
        if len(set(ids)) != len(ids):
            raise UsageError(f"two NICs share an id: {sorted(ids)}")
        self.command, self.machine, self.nics, self.timeout = command, machine, tuple(nics), timeout
        self.extra_args, self.host = tuple(extra_args), host or socket.gethostname()
        self.name = f"{NAME_PREFIX}{os.getpid()}-{next(_instances)}"
        self.dir: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp: ReadOnlyQMP | None = None
        self.taps: dict[str, str] = {}  # NIC id -> tap name
        self.argv: list[str] = []

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def version(self) -> tuple[int, int, int] | None:
        return None if self.qmp is None else self.qmp.version

    def stderr_text(self) -> str:
        return "" if self.dir is None else read_text(self.dir / "stderr.log")

    def _netdev(self, index: int, nic: ScratchNic) -> str | None:
        if nic.backend == "user":
            return f"user,id=hn{index}"
        if nic.backend in ("tap", "tap-vhost"):
            vhost = ",vhost=on" if nic.backend == "tap-vhost" else ""
            queues = f",queues={nic.queues}" if nic.queues > 1 else ""
            return f"tap,id=hn{index},ifname={self.taps[nic.id]},script=no,downscript=no{vhost}{queues}"
        return None

    def _argv(self, sock: Path) -> list[str]:
        argv = ["-name", self.name, "-S", "-nodefaults", "-no-user-config", "-display", "none"]
        argv += ["-machine", self.machine] if self.machine else []
        # -qmp, not -chardev + -mon: 11.1 warns that -mon is deprecated (seen); -qmp is quiet on 7.2, 10.0, 11.1
        argv += ["-qmp", f"unix:{_escape(str(sock))},server=on,wait=off", *self.extra_args]
        for index, nic in enumerate(self.nics):
            netdev = self._netdev(index, nic)
            argv += ["-netdev", netdev] if netdev else []
            peer = f",netdev=hn{index}" if netdev else ""
            argv += ["-device", f"{nic.driver},id={nic.id}{peer}" + "".join(f",{k}={_escape(v)}" for k, v in nic.props)]
        return argv

    async def _start(self) -> None:
        for nic in self.nics:
            problem = backend_problem(nic.backend) if nic.backend else None
            if problem:
                raise BackendUnavailableError(f"NIC {nic.id}: no {nic.backend} backend: {problem}",
                                              backend=str(nic.backend), nic=nic.id)
        deadline = asyncio.get_running_loop().time() + self.timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        sock = self.dir / "qmp.sock"
        self.taps = {n.id: _new_tap() for n in self.nics if n.backend in ("tap", "tap-vhost")}
        self.argv = [*self.command.argv, *self._argv(sock)]
        try:
            async with asyncio.timeout_at(deadline):
                log = log_fd(self.dir / "stderr.log")
                try:
                    self.proc = await spawn(self.command, self.argv[len(self.command.argv):],
                                             stdout=subprocess.DEVNULL, stderr=log)
                finally:
                    os.close(log)
                while not exists(sock):  # QEMU makes the socket: nothing to wait on but time
                    if self.proc.returncode is not None:
                        raise self._exit_error()
                    await asyncio.sleep(POLL)
                await self._connect(str(sock))
        except TimeoutError as err:
            raise ScratchTimeoutError(f"{self.command}: no QMP greeting within {self.timeout} s",
                                      stderr=self.stderr_text()) from err

    async def _connect(self, sock: str) -> None:
        """Connect and take the greeting, racing QEMU's exit (a refused ``-device`` comes after the socket). The
        socket file exists a moment before QEMU listens on it (``bind`` then ``listen``; seen on 7.2 as ECONNREFUSED):
        a refused connection is tried again, until the deadline."""
        assert self.proc is not None
        while True:
            self.qmp = ReadOnlyQMP(sock, timeout=self.timeout)
            connect = asyncio.ensure_future(self.qmp.connect())
            exited = asyncio.ensure_future(self.proc.wait())
            try:
                await asyncio.wait((connect, exited), return_when=asyncio.FIRST_COMPLETED)
            finally:
                connect.cancel()
                exited.cancel()
                outcome = (await asyncio.gather(connect, exited, return_exceptions=True))[0]
            if outcome is None:
                return
            if self.proc.returncode is not None or not isinstance(outcome, ConnectError) \
                    or not isinstance(outcome.__cause__, ConnectionRefusedError):
                break
            await asyncio.sleep(POLL)
        if self.proc.returncode is None:  # EOF while QEMU exits: let it finish exiting, then say why
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), min(2.0, self.timeout))
        if self.proc.returncode is None:
            cause = outcome if isinstance(outcome, BaseException) else None
            raise ScratchError(f"{self.command}: cannot talk QMP to it: {outcome}", stderr=self.stderr_text()) \
                from cause
        raise self._exit_error()

    def _exit_error(self) -> ScratchError:
        """Why QEMU exited while starting, from what it printed."""
        assert self.proc is not None
        code, text = self.proc.returncode, self.stderr_text()
        said = " / ".join(line.strip() for line in text.splitlines() if line.strip())[-1500:] or "(nothing on stderr)"
        if "unsupported machine type" in text:
            return MachineTypeError(f"{self.command} has no machine type {self.machine}: {said}",
                                    machine=self.machine or "", stderr=text)
        for index, nic in enumerate(self.nics):
            netdev = self._netdev(index, nic)
            if netdev and f"-netdev {netdev}:" in text:
                return BackendUnavailableError(f"NIC {nic.id}: QEMU cannot make its {nic.backend} backend: {said}",
                                               backend=str(nic.backend), nic=nic.id, stderr=text)
        if code is not None and code < 0:
            return ScratchError(f"{self.command} died of signal {-code} while starting: {said}", stderr=text)
        return CommandLineError(f"QEMU refused the command line (exit status {code}): {said}", stderr=text)

    async def _stop(self, *, quiet: bool = False) -> None:
        """Kill (the whole process group), close QMP, reap, wait for the taps to vanish, remove the folder. The
        kill and the removal need no waiting, so they happen even when a second cancellation cuts the waits
        short. ``quiet``: a failure to clean up is not raised (another exception is on its way out)."""
        proc, qmp = self.proc, self.qmp
        try:
            kill(proc)
            if qmp is not None:
                await qmp.close()
            if proc is not None:
                await reap(proc)
            await taps_gone(list(self.taps.values()))
        except ScratchError:
            if not quiet:
                raise
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)

    async def probe(self, *, side: str | None = None) -> ScratchReport:
        """Read the NICs (``probing.probe_vm``, read-only) and the QOM types of the catalogue properties."""
        if self.qmp is None or self.proc is None or self.proc.returncode is not None:
            raise ScratchError(f"{self.name} is not running", stderr=self.stderr_text())
        report = await probe_vm(self.qmp, host=self.host, side=side)
        types: tuple[tuple[str, str], ...] = ()
        virtio = [n for n in report.nics if n.offered is not None or n.properties]
        if virtio:
            try:
                listing = await self.qmp.execute("qom-list", {"path": f"{virtio[0].qom_path}/virtio-backend"})
            except CommandError:
                listing = []
            types = tuple(sorted((str(p["name"]), str(p["type"])) for p in listing
                                 if isinstance(p, dict) and p.get("name") in BY_PROPERTY and "type" in p))
        return ScratchReport(self.qmp.version, self.qmp.package, report.machine, report, types,
                             tuple(sorted(self.taps.items())))


@contextlib.asynccontextmanager
async def scratch_qemu(qemu: QemuLike, *, machine: str | None = None, nics: Sequence[ScratchNic] = (),
                       timeout: float = DEFAULT_TIMEOUT, extra_args: Sequence[str] = (),
                       host: str | None = None) -> AsyncIterator[ScratchQemu]:
    """Start a scratch QEMU (``machine`` None: QEMU's default) and yield it once it greeted on QMP; it is gone
    (killed, reaped, folder removed, taps gone) when the block is left in any way. ``extra_args`` go before the
    NICs (e.g. a ``pcie-root-port`` a NIC's ``bus`` names). ``host`` names the reports (default: this host)."""
    scratch = ScratchQemu(QemuCommand.of(qemu), machine=machine, nics=nics, timeout=timeout, extra_args=extra_args,
                          host=host)
    try:
        await scratch._start()
        yield scratch
    except BaseException:
        await scratch._stop(quiet=True)
        raise
    await scratch._stop()


async def probe_scratch(qemu: QemuLike, *, machine: str | None = None, nics: Sequence[ScratchNic] = (),
                        timeout: float = DEFAULT_TIMEOUT, extra_args: Sequence[str] = (),
                        host: str | None = None) -> ScratchReport:
    """Start a scratch QEMU, read it, and end it: ``scratch_qemu`` and ``probe`` in one call."""
    async with scratch_qemu(qemu, machine=machine, nics=nics, timeout=timeout, extra_args=extra_args,
                            host=host) as scratch:
        return await scratch.probe()
