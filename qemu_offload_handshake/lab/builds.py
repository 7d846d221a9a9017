"""How to run each QEMU version of the lab, what set-up must have installed, and where its cache is."""


from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

QemuVersion = Literal["10", "7.2", "11.1"]
VERSIONS: tuple[QemuVersion, ...] = ("10", "7.2", "11.1")
TAP_PREFIX = "qoh"  # every tap the lab makes starts with this
NAME_PREFIX = "qoh-lab-"  # every QEMU the lab starts has -name qoh-lab-<pid>-...


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


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: QEMU dies with us, whatever happens
