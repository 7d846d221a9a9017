"""A real OpenSSH server on loopback for the ssh transport's tests: ``async with Sshd() as sshd``.

It runs Debian's ``/usr/sbin/sshd`` (``scripts/setup.sh`` installs it and keeps the host-wide service off) in the
foreground (``-D -e``) with its own configuration, host key, client key and ``authorized_keys`` in a folder
``qoh-sshd-<our pid>-XXXX`` (in ``/tmp`` unless another parent is given), listening on 127.0.0.1 only, on a free
port, with public-key authentication only. Clients reach it with ``ssh_argv(command)`` or with ``options`` and
``destination`` (``ssh -o OPT ... ssh://USER@127.0.0.1:PORT command``).

What sshd does that matters here (OpenSSH 9.2 on Debian 12, seen):

* every connection is served by a child that sshd re-executes (``sshd ... -R``), then re-titles (``sshd:
  root@notty``) and makes a session leader, and the command it runs is a session leader of its own: killing the
  listener's process group leaves them running. ``stop()`` freezes and kills the whole tree instead
  (``leaks.kill_tree``), and the leak checks know a connection by its stderr, which is the lab sshd's log.
* the command runs through the user's login shell (``bash -c``); Debian's bash reads ``~/.bashrc`` even then, so
  ``PATH`` is what that file makes it (give commands by absolute path, e.g. ``sys.executable``) and anything it
  prints would precede the command's own output.
* it needs its privilege separation folder ``/run/sshd`` (made here when missing: ``/run`` is a tmpfs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shlex
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .builds import LabError, pdeathsig
from .leaks import SSHD_PREFIX, kill_tree, lab_folder, sshd_connections, still_alive

__all__ = ["SSHD", "SSH_KEYGEN", "Sshd", "keygen", "sshd_prerequisites"]

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
LISTENING = "Server listening on 127.0.0.1 port"


def sshd_prerequisites() -> list[str]:
    """What is missing for ``Sshd`` to run, as sentences (empty: ready)."""
    problems = []
    if not os.access(SSHD, os.X_OK):
        problems.append(f"{SSHD} is missing (Debian's openssh-server): run scripts/setup.sh")
    for tool in ("ssh", SSH_KEYGEN):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing (Debian's openssh-client): run scripts/setup.sh")
    if os.geteuid() != 0 and not PRIVSEP_DIR.is_dir():
        problems.append(f"not root and {PRIVSEP_DIR} is missing: sshd needs it, only root can make it")
    return problems


async def keygen(path: Path, comment: str = "qoh-lab") -> Path:
    """Make an ed25519 key pair without a passphrase at ``path`` (private, mode 0600) and ``path.pub``; return the
    public key's path."""
    proc = await asyncio.create_subprocess_exec(
        SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise LabError(f"ssh-keygen for {path} failed ({proc.returncode}): {out.decode(errors='replace').strip()}")
    return path.with_name(path.name + ".pub")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sshd:
    """One lab sshd on 127.0.0.1. Owns its folder and every process under it; ``stop()`` leaves nothing behind.

    Attributes once started: ``port``, ``user`` (whoever runs the tests: root normally), ``destination``
    (``ssh://USER@127.0.0.1:PORT``), ``options`` (``-o`` values for an ssh client: this key, this host key only,
    no prompts), ``client_key``, ``known_hosts``, ``host_key``, ``config``, ``authorized_keys``, ``log`` (sshd's
    stderr: ``LogLevel VERBOSE``, one line per connection, key and session) and ``pid``."""

    def __init__(self, parent: str | Path | None = None, *, start_timeout: float = 10.0) -> None:
        self.parent = parent
        self.start_timeout = start_timeout
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self._dir: Path | None = None
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Sshd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- files ------------------------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        """The folder ``qoh-sshd-<our pid>-XXXX`` holding everything of this sshd (made by ``start()``)."""
        if self._dir is None:
            raise LabError("the lab sshd has no folder: not started")
        return self._dir

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def host_key(self) -> Path:
        return self.dir / "host_key"

    @property
    def client_key(self) -> Path:
        return self.dir / "client_key"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "sshd.pid"

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    # --- what a client needs ----------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def destination(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    @property
    def options(self) -> list[str]:
        """``-o`` values for ``ssh``: this client key only, this sshd's host key only (checked strictly), no
        prompts, no connection sharing, errors only."""
        return [f"IdentityFile={self.client_key}", "IdentitiesOnly=yes",
                f"UserKnownHostsFile={self.known_hosts}", "GlobalKnownHostsFile=/dev/null",
                "StrictHostKeyChecking=yes", "BatchMode=yes", "ConnectTimeout=5", "LogLevel=ERROR",
                "ControlMaster=no", "ControlPath=none"]

    def ssh_argv(self, command: Sequence[str], *, options: Sequence[str] | None = None) -> list[str]:
        """A full ``ssh`` command line running ``command`` (an argv: it is quoted for the remote shell) on this
        sshd; no ssh configuration file is read (``-F none``). ``options`` replaces ``self.options``."""
        argv = ["ssh", "-F", "none"]
        for option in self.options if options is None else options:
            argv += ["-o", option]
        return [*argv, "--", self.destination, shlex.join(command)]

    # --- start and stop ---------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.config.write_text(
            f"# lab sshd (qemu_offload_handshake/lab/sshd.py)\n"
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"AddressFamily inet\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.pid_file}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"AuthenticationMethods publickey\n"
            f"PubkeyAuthentication yes\n"
            f"PasswordAuthentication no\n"
            f"KbdInteractiveAuthentication no\n"
            f"HostbasedAuthentication no\n"
            f"GSSAPIAuthentication no\n"
            f"UsePAM no\n"
            f"PermitRootLogin prohibit-password\n"
            f"AllowUsers {self.user}\n"
            f"StrictModes no\n"
            f"UseDNS no\n"
            f"PrintMotd no\n"
            f"PrintLastLog no\n"
            f"X11Forwarding no\n"
            f"AllowAgentForwarding no\n"
            f"AllowTcpForwarding no\n"
            f"PermitUserEnvironment no\n"
            f"MaxStartups 100\n"
            f"MaxSessions 100\n"
            f"LoginGraceTime 30\n"
            f"LogLevel VERBOSE\n")

    async def start(self) -> Sshd:
        problems = sshd_prerequisites()
        if problems:
            raise LabError("cannot start the lab sshd: " + "; ".join(problems))
        if self.proc is not None:
            raise LabError("this lab sshd was started already")
        if not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            PRIVSEP_DIR.chmod(0o755)
        self._dir = lab_folder(SSHD_PREFIX, self.parent)
        try:
            await keygen(self.host_key, "qoh-lab-sshd-host")
            await keygen(self.client_key, "qoh-lab-client")
            self.authorized_keys.write_text(self.client_key.with_name("client_key.pub").read_text())
            kind, key = self.host_key.with_name("host_key.pub").read_text().split()[:2]
            attempts = 5  # the free port may be taken between our probe and sshd's bind
            for attempt in range(1, attempts + 1):
                self.port = _free_port()
                self._write_config()
                self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {kind} {key}\n")
                if await self._run():
                    return self
                if attempt == attempts or "Address already in use" not in self.log_text():
                    break
            raise LabError(f"the lab sshd did not start (exit {self.proc and self.proc.returncode}); its log "
                           f"{self.log}:\n{self.log_text()}")
        except BaseException:
            await self.stop()
            raise

    async def _run(self) -> bool:
        """Start sshd; True once it listens, False if it exited first."""
        with open(self.log, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                SSHD, "-D", "-e", "-f", str(self.config), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=pdeathsig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while LISTENING not in self.log_text():
            if self.proc.returncode is not None:
                return False
            if loop.time() > deadline:
                raise LabError(f"the lab sshd is not listening after {self.start_timeout} s; its log:\n"
                               f"{self.log_text()}")
            await asyncio.sleep(0.02)
        return True

    async def stop(self) -> None:
        """Kill sshd, its connections and what they run (frozen first: none escapes), wait for them, remove the
        folder. Safe to call twice, or after a failed start."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                await self._kill(proc)
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    async def _kill(self, proc: asyncio.subprocess.Process) -> None:
        try:
            killed = kill_tree(proc.pid) if proc.returncode is None else []
            for pid in sshd_connections(self.dir):  # those of a listener that died first
                killed += kill_tree(pid)
            await proc.wait()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while killed and loop.time() < deadline:
                killed = still_alive(killed)
                if killed:
                    await asyncio.sleep(0.02)
            if killed:
                raise LabError(f"lab sshd processes {killed} still alive 10 s after SIGKILL")
        finally:
            if proc.returncode is None:  # interrupted: PDEATHSIG would get it later, but not now
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
