"""Leftovers of lab runs (QEMUs, the lab's sshds and what runs under them, test agents, the libvirt hosts' daemons
and QEMUs, taps and network namespaces, folders): whose they are, which are stale, and cleaning them."""


from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import scratch
from .builds import NAME_PREFIX, TAP_PREFIX, LabError, ip

# lab processes (QEMUs, sshds, agents), lab tap names, lab/test folders
Leftovers = tuple[list[int], list[str], list[str]]
# QEMUs the lab starts (-name qoh-lab-<pid>-N) and scratch QEMUs (scratch.py: -name qoh-scratch-<pid>-N)
_NAMES = (NAME_PREFIX, scratch.NAME_PREFIX)
_OWNER_PID = re.compile(rf"(?:{'|'.join(map(re.escape, _NAMES))})(\d+)(?:-|$)")  # their -name and VM folders
# taps: the lab's qoh<pid % 100000>t<N>, scratch QEMUs' qoh<pid % 100000>s<N>
_TAP_OWNER = re.compile(rf"{re.escape(TAP_PREFIX)}(\d{{1,5}})[t{scratch.TAP_INFIX}]\d+")
_FOLDER_OWNER = re.compile(r"qoh-[a-z]+-(\d+)-")  # folders that name their owner: qoh-fake-<pid>-...
OWNERLESS_AGE = 3600.0  # a qoh-* folder that names no owner is stale once untouched this long (seconds)
SSHD_PREFIX = "qoh-sshd-"  # the lab's sshd (sshd.py) lives in a folder qoh-sshd-<owner pid>-XXXX its command line names
AGENT_PREFIX = "qoh-agent-"  # a folder for an agent a test starts (``lab_folder()``): qoh-agent-<owner pid>-XXXX
_SSHD_OWNER = re.compile(rb"/" + re.escape(SSHD_PREFIX.encode()) + rb"(\d+)-")  # in a command line or a file's path
_PATH_OWNER = re.compile(rb"/qoh-[a-z]+-(\d+)-")  # any lab/test folder in a command line
_SSHD_ARG0 = re.compile(rb"(?:\S*/)?sshd(?::|\s|$)")  # /usr/sbin/sshd, and "sshd: ..." once it set its title
_AGENT_NAMES = (b"qemu_offload_handshake", b"qemu-offload-handshake")  # -m qemu_offload_handshake, the script
# libvirt hosts (libvirt.py): a folder qoh-libvirt-<owner pid>-XXXX named on the command line of their reaper, their
# libvirtd (-p FOLDER/libvirtd.pid) and their QEMUs (serial log in FOLDER); network namespaces qohlv<owner pid>A/B,
# listed with the taps as "netns:<name>"
LIBVIRT_PREFIX = "qoh-libvirt-"
NETNS_PREFIX = "qohlv"
NETNS_TAG = "netns:"
_LIBVIRT_OWNER = re.compile(rb"/" + re.escape(LIBVIRT_PREFIX.encode()) + rb"(\d+)-")
_NETNS_OWNER = re.compile(rf"{re.escape(NETNS_TAG + NETNS_PREFIX)}(\d+)[AB]")
_LIBVIRT_TOOLS = (b"virsh", b"nsenter")  # short-lived clients whose arguments name a host's folder: not the host's


@dataclass(frozen=True, slots=True)
class LabProcess:
    """A live process the lab (or a test) started, as its command line, its stderr or its parent tell.

    ``kind``: ``QEMU``; ``sshd`` (a lab sshd's listener: its command line names its folder); ``sshd child`` (one
    per connection: sshd re-titles it and makes it a session leader, so only its parent or its stderr, the lab
    sshd's log, tell); ``under sshd`` (what a connection runs, e.g. the command ssh asked for); ``agent`` (``python
    -m qemu_offload_handshake serve`` / ``qemu-offload-handshake serve`` whose command line names a lab/test folder,
    or that a live process other than init started); ``libvirt`` (a lab libvirt host's reaper, libvirtd or QEMU:
    its command line names the host's folder). ``owner``: the pid the names give (None: they give none)."""

    kind: str
    owner: int | None
    ppid: int


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


def _stderr_target(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/fd/2").encode()
    return b""


def _is_agent(cmdline: bytes) -> bool:
    args = cmdline.split(b"\0")
    if b"serve" not in args:
        return False
    before = args[:args.index(b"serve")]
    return any(a in _AGENT_NAMES or a.endswith(b"/qemu-offload-handshake") for a in before)


def children_of(procs: Mapping[int, tuple[int, bytes]]) -> dict[int, list[int]]:
    """Parent pid -> its live children."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    return children


def descendants(pid: int, procs: Mapping[int, tuple[int, bytes]] | None = None) -> list[int]:
    """The live descendants of ``pid`` (children first), by the parent pids of ``/proc``."""
    return _descendants(pid, children_of(procs if procs is not None else _processes()))


def _descendants(pid: int, children: Mapping[int, list[int]]) -> list[int]:
    found: list[int] = []
    seen = {pid}
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop(0)
        if child not in seen:
            seen.add(child)
            found.append(child)
            todo.extend(children.get(child, ()))
    return found


def still_alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that are live processes (zombies count as gone)."""
    procs = _processes()
    return [p for p in pids if p in procs]


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants, frozen first (SIGSTOP, repeated until no new one appears) so that
    none forks a process that would escape; return the pids signalled (waiting for them is the caller's)."""
    stopped: list[int] = []
    for _ in range(100):
        new = [p for p in [pid, *descendants(pid)] if p not in stopped]
        if not new:
            break
        for p in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
            stopped.append(p)
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return stopped


def sshd_connections(folder: str | Path) -> list[int]:
    """Live sshd processes serving a connection of the lab sshd in ``folder`` (their stderr is its log there),
    whether its listener lives or not."""
    prefix = str(folder).rstrip("/").encode() + b"/"
    return [pid for pid, (_, cmdline) in _processes().items()
            if _SSHD_ARG0.match(cmdline.split(b"\0", 1)[0]) and _stderr_target(pid).startswith(prefix)]


def lab_processes(procs: Mapping[int, tuple[int, bytes]] | None = None) -> dict[int, LabProcess]:
    """Live lab QEMUs, lab sshds with their connections and what those run, and test agents: pid -> what it is."""
    procs = procs if procs is not None else _processes()
    found = {pid: LabProcess("QEMU", owner, procs[pid][0]) for pid, owner in _lab_qemus(procs).items()}
    sshds: dict[int, int] = {}  # pid -> owner, from the command line (listener) or stderr (connection)
    named: set[int] = set()  # those whose command line names the folder: listeners, connections not yet re-titled
    for pid, (ppid, cmdline) in procs.items():
        if pid in found:
            continue
        args = cmdline.split(b"\0")
        libvirt = _LIBVIRT_OWNER.search(cmdline)
        if libvirt and os.path.basename(args[0]) not in _LIBVIRT_TOOLS:
            found[pid] = LabProcess("libvirt", int(libvirt.group(1)), ppid)
        elif _SSHD_ARG0.match(args[0]):
            m = _SSHD_OWNER.search(cmdline)
            if m:
                named.add(pid)
            else:
                m = _SSHD_OWNER.search(_stderr_target(pid))
            if m:
                sshds[pid] = int(m.group(1))
        elif _is_agent(cmdline):
            m = _PATH_OWNER.search(cmdline)
            if m:
                found[pid] = LabProcess("agent", int(m.group(1)), ppid)
            elif ppid != 1 and ppid in procs:
                found[pid] = LabProcess("agent", None, ppid)
    children = children_of(procs)
    # A listener names its folder and no lab sshd started it (a connection's sshd re-executes itself with -R).
    listeners = [p for p in sshds if p in named and procs[p][0] not in sshds and b"-R" not in procs[p][1].split(b"\0")]
    for pid in listeners:
        found[pid] = LabProcess("sshd", sshds[pid], procs[pid][0])
    for pid, owner in sshds.items():  # connections (under a listener or not any more), and what they run
        if pid in listeners:
            continue
        found.setdefault(pid, LabProcess("sshd child", owner, procs[pid][0]))
    for pid, owner in sshds.items():
        for child in _descendants(pid, children):
            found.setdefault(child, LabProcess("under sshd", owner, procs[child][0]))
    return found


def _stale(pid: int, labs: Mapping[int, LabProcess], procs: Mapping[int, object]) -> bool:
    """Whether a lab process belongs to a run that is gone.

    QEMUs and sshd listeners (the lab starts them itself): the process their name gives is not alive or is not
    their parent. An sshd connection or what runs under it: its owner is not alive, or its parent is not a live
    lab process of a live run. An agent: the owner its folder names is not alive, or init adopted it (one that
    names no owner is never stale: it may not be the lab's)."""
    seen: set[int] = set()
    while pid not in seen:
        seen.add(pid)
        lab = labs[pid]
        if lab.kind in ("QEMU", "sshd"):
            return _orphaned(lab.owner, lab.ppid, procs)
        if lab.kind == "agent":
            return lab.owner is not None and (lab.owner not in procs or lab.ppid == 1)
        if lab.kind == "libvirt":
            return lab.owner not in procs
        if lab.owner not in procs or lab.ppid not in labs:
            return True
        pid = lab.ppid
    return True


def _tap_owner(tap: str) -> int | None:
    """A lab tap's (or a libvirt host's netns') owner as its name gives it: the owner's pid modulo 100000."""
    n = _NETNS_OWNER.fullmatch(tap)
    if n:
        return int(n.group(1)) % 100000
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


def lab_folder(prefix: str = AGENT_PREFIX, parent: str | Path | None = None) -> Path:
    """A new folder ``<prefix><this pid>-XXXX`` (in ``/tmp`` unless ``parent`` is given): a test that starts an
    agent puts its files there and names them on its command line, so the leak checks know the agent and the
    folder as this process's."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def leftovers() -> Leftovers:
    """Pids of live lab processes (QEMUs, the lab's sshds and what runs under them, test agents), names of lab
    taps, and lab/test folders (from this or any other run, live or not; ``stale_leftovers`` and
    ``owned_leftovers`` tell whose)."""
    pids = sorted(lab_processes())
    taps = sorted(p.name for p in Path("/sys/class/net").iterdir()
                  if p.name.startswith(TAP_PREFIX) and (p / "tun_flags").exists())
    with contextlib.suppress(OSError):
        taps += sorted(NETNS_TAG + p.name for p in Path("/run/netns").iterdir()
                       if _NETNS_OWNER.fullmatch(NETNS_TAG + p.name))
    dirs = sorted(str(p) for p in Path(tempfile.gettempdir()).glob("qoh-*"))
    return pids, taps, dirs


def owned_leftovers(owners: Iterable[int]) -> Leftovers:
    """The leftovers whose names say one of ``owners`` (pids) made them: QEMUs ``qoh-lab-<pid>-N``, sshds whose
    folder is ``qoh-sshd-<pid>-...`` (and their connections and what those run), agents whose command line names a
    folder ``qoh-<kind>-<pid>-...`` or whose parent is one of ``owners``, taps ``qoh<pid % 100000>tN``, folders
    ``qoh-<kind>-<pid>-...`` or holding VM folders ``qoh-lab-<pid>-N``."""
    owners = set(owners)
    pids, taps, dirs = leftovers()
    labs = lab_processes()
    return ([p for p in pids if p in labs and (labs[p].owner in owners
                                               or (labs[p].owner is None and labs[p].kind == "agent"
                                                   and labs[p].ppid in owners))],
            [t for t in taps if _tap_owner(t) in {o % 100000 for o in owners}],
            [d for d in dirs if _folder_owners(Path(d)) & owners])


def stale_leftovers(*, ownerless_age: float = OWNERLESS_AGE) -> Leftovers:
    """The leftovers of runs that are gone, safe to clean while other runs use the lab concurrently.

    A lab process is stale as ``_stale`` says (a QEMU when the process its name gives is not alive or is not its
    parent: the lab starts every QEMU itself); a tap when no live process has its owner's pid (modulo 100000) and
    no live QEMU names it; a folder when none of the owners it names is alive and no live lab process uses it, or,
    naming none, when untouched for ``ownerless_age`` seconds."""
    procs = _processes()
    pids, taps, dirs = leftovers()
    labs = lab_processes(procs)
    stale_pids = [p for p in pids if p in procs and p in labs and _stale(p, labs, procs)]
    in_use = [cmdline for pid, (_, cmdline) in procs.items() if pid in labs and pid not in stale_pids]
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
    return stale_pids, stale_taps, stale_dirs


def _describe(pid: int, lab: LabProcess) -> str:
    if lab.kind == "QEMU":
        return f"QEMU {pid} (-name {NAME_PREFIX}{lab.owner}-...)"
    if lab.kind == "agent" and lab.owner is None:
        return f"agent {pid} (started by {lab.ppid})"
    if lab.kind == "under sshd":
        return f"process {pid} under a lab sshd (of {lab.owner})"
    return f"{'lab ' if lab.kind.startswith('sshd') else ''}{lab.kind} {pid} (of {lab.owner})"


def clean(items: Leftovers) -> list[str]:
    """Kill these lab processes (SIGSTOP all first, so none forks meanwhile, then SIGKILL them and whatever they
    started, and wait until they are gone), delete these taps and folders; return what was cleaned, one line each.
    A pid that is no longer a lab process by then is left alone."""
    pids, taps, dirs = items
    done = []
    labs = lab_processes()
    mine = [pid for pid in pids if pid in labs]
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    killed = []
    for pid in mine:
        for p in kill_tree(pid):
            if p not in killed:
                killed.append(p)
                done.append(f"killed {_describe(p, labs[p])}" if p in labs else f"killed {p}, started by {pid}")
    deadline = time.monotonic() + 10
    while killed and time.monotonic() < deadline:
        killed = still_alive(killed)
        time.sleep(0.05)
    for pid in killed:
        done.append(f"{_describe(pid, labs[pid]) if pid in labs else pid} still alive 10 s after SIGKILL")
    for tap in taps:
        try:
            if tap.startswith(NETNS_TAG):
                _kill_netns(tap[len(NETNS_TAG):])
                ip("netns", "del", tap[len(NETNS_TAG):])
                done.append(f"deleted network namespace {tap[len(NETNS_TAG):]}")
                continue
            ip("link", "del", tap)
            done.append(f"deleted tap {tap}")
        except LabError as err:
            done.append(f"could not delete tap {tap}: {err}")
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed folder {d}" if not os.path.exists(d) else f"could not remove folder {d}")
    return done


def _kill_netns(name: str) -> None:
    """Kill what still runs in a network namespace (a lab libvirt host's leftovers) and wait until it is gone."""
    import subprocess
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False)
    pids = [p for pid in out.stdout.split() if pid.isdigit() for p in kill_tree(int(pid))]
    deadline = time.monotonic() + 10
    while still_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def clean_stale() -> list[str]:
    """Clean what runs that are gone left behind (``stale_leftovers``); return what was cleaned."""
    return clean(stale_leftovers())
