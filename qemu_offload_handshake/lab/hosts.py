"""Lab "hosts": one machine made to look like several hosts to ``dump.dump_host`` and ``scratch``.

A host here is an executable wrapper script (``#!/bin/sh`` then ``exec env VAR=... QEMU ARGS... "$@"``) that runs
one of the lab's QEMU builds the way ``builds.qemu_build`` says (environment, extra arguments, 11.1 through its
own loader), optionally with the no-USO shim on every tap (``LD_PRELOAD`` of ``nouso.so`` with
``QOH_NOUSO_TAPS`` unset: every ``TUNSETOFFLOAD`` asking for USO fails, as on a kernel older than Linux 6.2;
``shim/nouso.c``). ``dump_host(qemu=str(script), host="h2")`` then probes it like another host's QEMU. The
script ``exec``s, so QEMU keeps the script's process id (the scratch QEMU's process group and ``SO_PEERCRED``
stay right).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal

from ..qemuproc import QemuCommand
from .builds import LabError, QemuVersion, cache_dir, qemu_build

__all__ = ["HOST_KINDS", "HostKind", "qemu_command", "write_host"]

HostKind = Literal["10", "10-nouso", "7.2", "11.1"]
HOST_KINDS: tuple[HostKind, ...] = ("10", "10-nouso", "7.2", "11.1")
_DESCRIBED = {"10": "QEMU 10 as installed", "10-nouso": "QEMU 10, every tap without USO (kernel < 6.2)",
              "7.2": "QEMU 7.2 (unpacked)", "11.1": "QEMU 11.1 (unpacked, through its own loader)"}


def qemu_command(version: QemuVersion, *, nouso: bool = False) -> QemuCommand:
    """A lab QEMU build as a ``scratch.QemuCommand`` (``nouso``: the no-USO shim on every tap)."""
    build = qemu_build(version)
    env = dict(build.env)
    if nouso:
        shim = cache_dir() / "nouso.so"
        if not shim.exists():
            raise LabError(f"no-USO shim missing at {shim}: run scripts/setup.sh")
        env["LD_PRELOAD"] = str(shim)
    return QemuCommand((build.binary, *build.args), tuple(sorted(env.items())))


def write_host(folder: Path, kind: HostKind, name: str | None = None) -> Path:
    """Write the wrapper script of host ``kind`` into ``folder`` (as ``name``, default ``qemu-<kind>``) and
    return its path; it runs that QEMU with whatever arguments it is given."""
    if kind not in HOST_KINDS:
        raise LabError(f"unknown lab host {kind!r}: one of {', '.join(HOST_KINDS)}")
    command = qemu_command("10" if kind == "10-nouso" else kind, nouso=kind == "10-nouso")
    unset = ["-u", "QOH_NOUSO_TAPS", "-u", "QOH_NOTUNNEL_TAPS"]  # the shim then applies to every tap
    line = shlex.join(["exec", "env", *unset, *(f"{k}={v}" for k, v in command.env), *command.argv])
    path = folder / (name or f"qemu-{kind}")
    path.write_text(f"#!/bin/sh\n# lab host: {_DESCRIBED[kind]}\n{line} \"$@\"\n")
    path.chmod(0o755)
    return path
