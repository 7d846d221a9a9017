"""Leftovers of lab runs (QEMUs, taps, folders): whose they are, which are stale, and cleaning them."""


from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from .. import scratch
from .builds import NAME_PREFIX, TAP_PREFIX, LabError, ip

Leftovers = tuple[list[int], list[str], list[str]]  # lab QEMU pids, lab tap names, lab/test folders
# QEMUs the lab starts (-name qoh-lab-<pid>-N) and scratch QEMUs (scratch.py: -name qoh-scratch-<pid>-N)
_NAMES = (NAME_PREFIX, scratch.NAME_PREFIX)
_OWNER_PID = re.compile(rf"(?:{'|'.join(map(re.escape, _NAMES))})(\d+)(?:-|$)")  # their -name and VM folders
# taps: the lab's qoh<pid % 100000>t<N>, scratch QEMUs' qoh<pid % 100000>s<N>
_TAP_OWNER = re.compile(rf"{re.escape(TAP_PREFIX)}(\d{{1,5}})[t{scratch.TAP_INFIX}]\d+")
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
    """Live lab and scratch QEMUs: pid -> the owner pid named by their ``-name qoh-lab-<pid>-N`` or
    ``qoh-scratch-<pid>-N`` (None: names none)."""
    qemus: dict[int, int | None] = {}
    for pid, (_, cmdline) in procs.items():
        if not any(n.encode() in cmdline for n in _NAMES) or b"qemu-system" not in cmdline:
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
            ip("link", "del", tap)
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


