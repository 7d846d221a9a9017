"""QEMU processes of our own: how to run a QEMU build, start it so that it cannot outlive us, end it for sure.

I/O shell code for ``scratch.py`` (throwaway QEMUs) and ``dump.py`` (host dumps). A QEMU is a ``QemuCommand``: a
command prefix (its binary; or a loader and its arguments, as the lab's 11.1 runs) and extra environment. Each
process is started in a process group of its own with ``PR_SET_PDEATHSIG`` = SIGKILL (so a wrapper script that
does not ``exec`` dies with its QEMU, and nothing survives us even if we are SIGKILLed), and ended by SIGKILL to
the group and reaping, each wait with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.errors import CommandLineError, ScratchError, ScratchTimeoutError, UsageError

__all__ = ["DEFAULT_TIMEOUT", "TUN", "VHOST_NET", "QemuCommand", "QemuLike", "backend_problem", "kill",
           "qemu_output", "reap", "spawn", "taps_gone"]

VHOST_NET, TUN = "/dev/vhost-net", "/dev/net/tun"
DEFAULT_TIMEOUT = 10.0
REAP_TIMEOUT = 10.0  # SIGKILL to reaped, and reaped to its taps gone
POLL = 0.002  # how often to look for what QEMU makes (its QMP socket) or leaves (its taps)
_CAP_NET_ADMIN = 12  # linux/capability.h
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True, slots=True)
class QemuCommand:
    """How to run one QEMU: a command prefix (its binary, or a loader with arguments) and extra environment."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) and a for a in self.argv):
            raise UsageError(f"a QEMU command needs a binary: {self.argv!r}")

    @classmethod
    def of(cls, qemu: QemuLike, env: Mapping[str, str] | None = None) -> QemuCommand:
        """A binary path (or name on PATH), a command prefix, or None: ``qemu-system-x86_64`` from PATH."""
        if isinstance(qemu, QemuCommand):
            return qemu if env is None else cls(qemu.argv, tuple(sorted((dict(qemu.env) | dict(env)).items())))
        if qemu is None:
            found = shutil.which("qemu-system-x86_64")
            if found is None:
                raise ScratchError("no qemu-system-x86_64 on PATH: give the QEMU binary")
            argv: tuple[str, ...] = (found,)
        elif isinstance(qemu, (str, os.PathLike)):
            argv = (os.fspath(qemu),)
        else:
            argv = tuple(qemu)
        return cls(argv, tuple(sorted((env or {}).items())))

    def environ(self) -> dict[str, str]:
        return dict(os.environ) | dict(self.env)

    @property
    def binary(self) -> str:
        """The QEMU binary it runs: the first ``qemu-system-*`` argument (after a loader), else the command."""
        for arg in self.argv:
            if os.path.basename(arg).startswith("qemu-system-"):
                return arg
        return self.argv[0]

    def __str__(self) -> str:
        return shlex.join(self.argv)


QemuLike = str | os.PathLike[str] | Sequence[str] | QemuCommand | None  # what the functions take as "qemu"


def backend_problem(kind: str) -> str | None:
    """Why this host cannot give a NIC of a QEMU we start a backend of ``kind``, or None if it can."""
    if kind in ("tap", "tap-vhost"):
        if not os.path.exists(TUN):
            return f"{TUN} is missing: this host cannot make tap devices"
        if not _has_net_admin():
            return "not root (no CAP_NET_ADMIN): QEMU cannot create a tap device"
    if kind == "tap-vhost" and not os.path.exists(VHOST_NET):
        return f"no {VHOST_NET} on this host (vhost_net module not loaded): no kernel vhost-net for tap"
    return None


def _has_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


@functools.cache
def _prctl() -> Any:
    return ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it


def _die_with_us() -> None:  # runs in the child between fork and exec
    _prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL)


def exists(path: Path) -> bool:
    return path.exists()


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def log_fd(path: Path) -> int:
    """A new file for a QEMU's stderr (the caller closes the descriptor once QEMU has it)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


async def spawn(command: QemuCommand, args: Sequence[str], *, stdout: int, stderr: int) -> asyncio.subprocess.Process:
    """Start ``command`` with ``args``: a process group of its own, killed when we die."""
    _prctl()
    try:
        return await asyncio.create_subprocess_exec(
            *command.argv, *args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=command.environ(),
            start_new_session=True, preexec_fn=_die_with_us)
    except OSError as err:
        raise ScratchError(f"cannot run QEMU {command}: {err}") from err


def kill(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL to the process's group (its own: ``spawn``), also once the leader is reaped: a wrapper that does not
    ``exec`` may have left QEMU in the group (the group id cannot be reused while a member lives)."""
    if proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def reap(proc: asyncio.subprocess.Process) -> None:
    try:
        await asyncio.wait_for(proc.wait(), REAP_TIMEOUT)
    except TimeoutError as err:
        raise ScratchError(f"QEMU (pid {proc.pid}) still not gone {REAP_TIMEOUT} s after SIGKILL") from err


async def taps_gone(taps: Sequence[str]) -> None:
    """Wait until the kernel has deleted these taps (QEMU made them non-persistent). QEMU 7.2 and 10.0 have
    closed their tap when reaped; 11.1 holds it in io_uring (``/proc/PID/fd``: ``anon_inode:[io_uring]``), whose
    teardown the kernel finishes asynchronously: its taps were still there when it was reaped, gone 7-28 ms
    later (seen, one and two taps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REAP_TIMEOUT
    while left := [t for t in taps if exists(Path(f"/sys/class/net/{t}"))]:
        if loop.time() > deadline:
            raise ScratchError(f"taps {left} still there {REAP_TIMEOUT} s after their QEMU was gone")
        await asyncio.sleep(POLL)


async def qemu_output(qemu: QemuCommand, *args: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Run QEMU with ``args`` that print and exit (``-device virtio-net-pci,help``, ``-machine help``,
    ``-version``: 12-17 ms each on 7.2, 10.0, 11.1 here) and return what it printed; killed at the deadline."""
    proc = await spawn(qemu, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        raise ScratchTimeoutError(f"{qemu} {shlex.join(args)}: no answer within {timeout} s") from exc
    finally:
        kill(proc)
        await reap(proc)
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()
        raise CommandLineError(f"{qemu} {shlex.join(args)} failed ({proc.returncode}): {text[-1000:]}", stderr=text)
    return out.decode(errors="replace")
