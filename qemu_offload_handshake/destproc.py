"""A destination QEMU that ``migrate --dest-argv`` starts itself: the given command line with ``-incoming defer``
and a QMP socket of ours added (and the precheck's adjustments applied, ``core.argv``), in a session of its own so
that it outlives this process once it runs the migrated VM. Until then it is ours: ``close()`` kills it and removes
its folder unless ``keep()`` was called (after a completed migration).

Facts relied on: ``-incoming defer`` makes QEMU wait for ``migrate-incoming`` (``qemu-options.hx``); ``-qmp
unix:PATH,server=on,wait=off`` adds a QMP monitor besides any the command line has (seen on 7.2, 10.0 and 11.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .core.argv import apply_adjustments
from .core.errors import HandshakeError, UsageError
from .qemuproc import log_fd
from .qmp import ReadOnlyQMP

__all__ = ["DEST_PREFIX", "Destination", "start_destination"]

DEST_PREFIX = "qoh-dest-"  # /tmp/qoh-dest-<our pid>-XXXX: the QMP socket and the log of a destination we start
_REFUSED = ("-incoming", "-daemonize")


class Destination:
    def __init__(self, proc: asyncio.subprocess.Process, folder: Path) -> None:
        self.proc, self.folder = proc, folder
        self.kept = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"unix:{self.folder / 'qmp.sock'}"

    def log(self) -> str:
        try:
            return (self.folder / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""

    def keep(self) -> None:
        """It runs the migrated VM now: leave it (and its folder, where its QMP socket is) running."""
        self.kept = True

    async def close(self) -> None:
        if self.kept:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        shutil.rmtree(self.folder, ignore_errors=True)


async def start_destination(argv: Sequence[str], *, timeout: float = 10.0,
                            adjustments: Mapping[str, Mapping[str, str]] | None = None) -> Destination:
    """Start it and return once it greeted on QMP; ``UsageError`` (quoting QEMU) if it does not start."""
    argv = list(argv)
    if not argv:
        raise UsageError("--dest-argv: give the destination's QEMU command line")
    given = [a for a in argv if a in _REFUSED]
    if given:
        raise UsageError(f"--dest-argv: leave out {', '.join(given)} (this command adds -incoming defer and runs QEMU)")
    if adjustments:
        argv = apply_adjustments(argv, {k: dict(v) for k, v in adjustments.items()})
    folder = Path(tempfile.mkdtemp(prefix=f"{DEST_PREFIX}{os.getpid()}-"))
    sock = folder / "qmp.sock"
    full = [*argv, "-incoming", "defer", "-qmp", f"unix:{str(sock).replace(',', ',,')},server=on,wait=off"]
    (folder / "argv").write_text(" ".join(full) + "\n")
    try:
        log = log_fd(folder / "qemu.log")
        try:
            proc = await asyncio.create_subprocess_exec(*full, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                        start_new_session=True)
        finally:
            os.close(log)
    except OSError as err:
        shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"--dest-argv: cannot run {argv[0]}: {err.strerror or err}") from err
    dest = Destination(proc, folder)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    try:
        while loop.time() < end:
            if proc.returncode is not None:
                break
            if sock.exists():
                with contextlib.suppress(HandshakeError):
                    async with ReadOnlyQMP(str(sock), timeout=max(0.5, end - loop.time())):
                        return dest
            await asyncio.sleep(0.02)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 1)
        said = " / ".join(line.strip() for line in dest.log().splitlines() if line.strip())[-800:]
        raise UsageError("--dest-argv: the destination QEMU did not start"
                         + (f" (exit status {proc.returncode})" if proc.returncode is not None else
                            f" within {timeout:g} s") + f": {said or 'it printed nothing'}")
    except BaseException:
        await dest.close()
        raise
