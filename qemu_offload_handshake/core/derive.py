"""Derive a NIC's offered feature bitmap from safe reads, for a QEMU whose x-query-virtio-status is unsafe.

QEMU builds what a virtio-net device offers (``hw/net/virtio-net.c``, ``virtio_net_get_features``; the same in
10.2 and 11.1) from its properties, always adds MAC, and then silently clears bits its backend cannot do;
virtio-pci then adds VERSION_1 (modern) and VIRTIO_F_BAD_FEATURE, bit 30 (``hw/virtio/virtio-pci.c``,
``virtio_pci_device_plugged``): seen on real QEMU 10.0 and 7.2 whether legacy virtio is on (a root-bus slot)
or off (behind a PCIe root port), so it follows the PCI transport, not its legacy mode
(``tests/test_derive_real.py``). The transport properties (``indirect_desc``,
``event_idx``, ``notify_on_empty``, ``any_layout``, ``iommu_platform``, ``packed``, ``queue_reset``,
``in_order``) live on ``VirtIODevice.host_features`` itself (``DEFINE_VIRTIO_COMMON_FEATURES`` in
``hw/virtio/virtio.c``), so reading them gives the *effective* bits; the virtio-net properties live on
``VirtIONet.host_features`` and keep the *requested* value (``qom-get`` still says ``true`` for a USO that was
cleared). This module applies QEMU's clearing rules (``features.CLEARING_RULES``, the table the decision uses
too) to the requested bits with what is known about the backend, and returns the bits known to be offered plus
the bits that may or may not be: a rule whose condition is unknown makes its bits undetermined, never assumed.

Pure logic, no I/O: the shell reads the properties and the backend facts (``probing``, ``hostfacts``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .features import BY_NAME, BY_PROPERTY, CLEARING_RULES, NEEDS_TUNNEL, Kind, mask_of
from .model import Tri

__all__ = ["Backend", "Derived", "backend_of", "derive_offered"]

_MAC, _MTU, _STANDBY, _SPEED_DUPLEX = 5, 3, 62, 63
_BAD_FEATURE, _VERSION_1 = 30, 32
_HASH_RSS = mask_of([BY_NAME["VIRTIO_NET_F_HASH_REPORT"].bit, BY_NAME["VIRTIO_NET_F_RSS"].bit])
# Net bits a vhost backend may mask (hw/net/vhost_net.c and net/tap.c, kernel_feature_bits /
# user_feature_bits, in the net range: transport bits are read effective anyway). Kernel vhost-net always has
# MRG_RXBUF (drivers/vhost/net.c, VHOST_NET_FEATURES), so only these are left to the kernel:
_KERNEL_VHOST_MASKS = mask_of([57, 61]) | NEEDS_TUNNEL  # HASH_REPORT, RSC_EXT, UDP tunnel
_TRANSPORT_PROPS = frozenset(f.prop for f in BY_PROPERTY.values() if f.kind is Kind.TRANSPORT)


@dataclass(frozen=True, slots=True)
class Backend:
    """What is known about a NIC's backend: each fact True, False or None (unknown)."""

    kind: str | None  # netdev type from HMP "info network": tap, user, vhost-user, vhost-vdpa, socket, ...
    vnet_hdr: bool | None = None
    ufo: bool | None = None
    uso: bool | None = None
    tunnel: bool | None = None
    vhost: bool | None = None  # a vhost backend (kernel vhost-net for tap, or vhost-user/vdpa) may mask bits


# Backends that are not tap: what QEMU's NetClientInfo callbacks answer (net/vhost-user.c, net/vhost-vdpa.c:
# has_vnet_hdr and has_ufo true, no has_uso / has_tunnel; every other type has none of them).
_FIXED: dict[str, Backend] = {
    "vhost-user": Backend("vhost-user", True, True, False, False, True),
    "vhost-vdpa": Backend("vhost-vdpa", True, True, False, False, True),
}
_NO_HEADER = frozenset({"user", "socket", "stream", "dgram", "l2tpv3", "vde", "hubport", "netmap", "af-xdp"})


def backend_of(kind: str | None, *, vnet_hdr: bool | None = None, kernel_ufo: bool | None = None,
               kernel_uso: bool | None = None, kernel_tunnel: bool | None = None,
               vhost: bool | None = None) -> Backend:
    """The backend facts for a netdev type. For tap, the caller passes what it could read on the QEMU's host:
    the tap's header flag, this kernel's answers to QEMU's offload probes, and whether vhost-net is in use.

    A kernel that refuses USO or UDP tunnel offload proves QEMU has none; a kernel that accepts them does not
    prove QEMU saw them (the lab's shim denies them to one QEMU on the same kernel), so that stays unknown. UFO
    is taken from the kernel's answer (nothing in the lab or in QEMU makes them differ)."""
    if kind in _FIXED:
        return _FIXED[kind]
    if kind in _NO_HEADER:
        return Backend(kind, False, False, False, False, False)
    if kind == "tap":
        return Backend("tap", vnet_hdr, kernel_ufo, False if kernel_uso is False else None,
                       False if kernel_tunnel is False else None, vhost)
    return Backend(kind)


@dataclass(frozen=True, slots=True)
class Derived:
    offered: int  # bits known to be offered
    unknown: int  # bits that may or may not be offered


def derive_offered(props: Mapping[str, Tri], backend: Backend, *, modern: bool | None, pci: bool | None,
                   host_mtu: int = 0, failover: bool = False, speed: int = -1) -> Derived:
    """Offered bits from the declared properties (values as QEMU reports them), the PCI transport and the
    backend facts. ``modern``: the proxy's ``disable-modern`` negated; ``pci``: whether the transport is PCI."""
    requested = mask_of(BY_PROPERTY[p].bit for p, tri in props.items() if tri is Tri.ON and p in BY_PROPERTY)
    requested |= 1 << _MAC
    if host_mtu:
        requested |= 1 << _MTU  # virtio_net_device_realize
    if failover:
        requested |= 1 << _STANDBY
    if speed >= 0:
        requested |= 1 << _SPEED_DUPLEX
    known, unknown = requested, 0
    for rule in CLEARING_RULES:
        if rule.fact == "own_hash":
            continue  # below, with HASH_REPORT
        value = getattr(backend, rule.fact)
        hit = known & rule.mask
        if not hit or value is True:
            continue
        known &= ~hit
        if value is None:
            unknown |= hit
    hash_rss = known & _HASH_RSS
    if hash_rss:  # cleared unless QEMU can hash itself or load eBPF RSS: not readable
        known &= ~hash_rss
        unknown |= hash_rss
    if backend.vhost is not False:
        masked = known & (_KERNEL_VHOST_MASKS if backend.kind == "tap" else ~0) & ~_transport_mask(props)
        masked &= ~(1 << _MAC | 1 << _MTU)
        if masked:
            known &= ~masked
            unknown |= masked
    for flag, bit in ((modern, _VERSION_1), (pci, _BAD_FEATURE)):
        if flag is None:
            unknown |= 1 << bit
        elif flag:
            known |= 1 << bit
    return Derived(known, unknown & ~known)


def _transport_mask(props: Mapping[str, Tri]) -> int:
    return mask_of(BY_PROPERTY[p].bit for p in props if p in _TRANSPORT_PROPS)
