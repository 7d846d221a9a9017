"""Facts about a local QEMU's network backends that no QMP command tells, read from ``/proc`` and ``/sys``.

Only for a QEMU on this host, known by its pid (``SO_PEERCRED`` of its QMP UNIX socket). Everything here only
reads, except ``kernel_tap_offloads``, which opens a throwaway tap of its own (gone when closed) to ask this
host's kernel which offloads a tap accepts, exactly as QEMU's probes do (``net/tap-linux.c``,
``tap_probe_has_ufo`` / ``tap_probe_has_uso`` / ``tap_probe_has_tunnel``). Any failure gives ``None`` (unknown),
never an exception.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = ["KernelTap", "QemuFds", "kernel_tap_offloads", "qemu_fds", "tap_vnet_hdr"]

IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000  # linux/if_tun.h
TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_UFO, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x10, 0x20, 0x40
TUN_F_UDP_TUNNEL_GSO = 0x80  # linux/if_tun.h (Linux 6.17); QEMU net/tap-linux.h


@dataclass(frozen=True, slots=True)
class QemuFds:
    """What a QEMU process has open that tells about its backends."""

    taps: dict[int, str]  # descriptor -> name of the tap device it holds (fdinfo "iff:")
    vhost_net: int  # how many /dev/vhost-net descriptors it holds (kernel vhost for some tap)

    def tap_name(self, info: dict[str, str]) -> str | None:
        """The tap behind an ``info network`` entry (``ifname=`` or ``fd=``), if this QEMU holds it."""
        name = info.get("ifname")
        if name is None and info.get("fd", "").isdigit():
            name = self.taps.get(int(info["fd"]))
        return name if name in self.taps.values() else None


def qemu_fds(pid: int) -> QemuFds | None:
    """The tap devices and vhost-net descriptors of process ``pid`` (needs the right to read its /proc)."""
    taps: dict[int, str] = {}
    vhost = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target == "/dev/vhost-net":
            vhost += 1
        elif target == "/dev/net/tun":
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/fdinfo/{entry.name}").read_text().splitlines():
                    if line.startswith("iff:") and entry.name.isdigit():
                        taps[int(entry.name)] = line[4:].strip()
    return QemuFds(taps, vhost)


def tap_vnet_hdr(name: str) -> bool | None:
    """Whether tap ``name`` was opened with a virtio-net header (``IFF_VNET_HDR`` in ``/sys/class/net/NAME/
    tun_flags``; QEMU opens it so unless ``vnet_hdr=off``). Seen: 0x7802 with the header, 0x3802 without."""
    if not name or "/" in name:
        return None
    try:
        flags = int(Path(f"/sys/class/net/{name}/tun_flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None
    return bool(flags & IFF_VNET_HDR)


@dataclass(frozen=True, slots=True)
class KernelTap:
    """Which offloads this host's kernel accepts on a tap (QEMU asks the same questions)."""

    ufo: bool
    uso: bool
    tunnel: bool


@cache
def kernel_tap_offloads() -> KernelTap | None:
    """Ask the kernel with a throwaway tap (needs CAP_NET_ADMIN); ``None`` if it cannot be asked."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        ifr = struct.pack("16sH22x", b"", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)

        def accepts(flags: int) -> bool:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                return True
            except OSError:
                return False
        return KernelTap(ufo=accepts(TUN_F_CSUM | TUN_F_UFO), uso=accepts(TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6),
                         tunnel=accepts(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UDP_TUNNEL_GSO))
    except OSError:
        return None
    finally:
        os.close(fd)
