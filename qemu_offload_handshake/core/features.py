"""The virtio-net feature catalogue: every feature bit QEMU knows, defined once.

Sources, per column:

* bit numbers and spec names: the virtio specification 1.3, section 5.1.3 "Feature bits" (network device) and
  section 6 "Reserved Feature Bits" (transport), plus the 1.4 draft for the UDP tunnel bits 65-68; the same
  numbers are in QEMU's ``include/standard-headers/linux/virtio_net.h`` and ``virtio_config.h``.
* property names and defaults: QEMU ``hw/net/virtio-net.c``, ``virtio_net_properties[]``
  (``DEFINE_PROP_BIT64("csum", VirtIONet, host_features, VIRTIO_NET_F_CSUM, true)`` and so on) and
  ``hw/virtio/virtio.h``, ``DEFINE_VIRTIO_COMMON_FEATURES`` for the transport bits. Defaults are those of the
  newest machine type; older machine types turn some off (``hw/core/machine.c``, ``hw_compat_*``), which is why
  the decision engine never trusts a default and always reads what is offered.
* dependencies: the virtio specification 1.3, section 5.1.3.1 "Feature bit requirements" (1.4 draft for the
  tunnel bits). Each entry of ``requires`` is a group of bits of which at least one must be present.

Bits QEMU does not list here still travel through the library as plain integers: nothing is ever dropped.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "BY_BIT",
    "BY_NAME",
    "BY_PROPERTY",
    "CATALOGUE",
    "CEILING_PROPERTIES",
    "CLEARING_RULES",
    "MAX_BITS",
    "NEEDS_OWN_HASH",
    "NEEDS_TUNNEL",
    "NEEDS_UFO",
    "NEEDS_USO",
    "NEEDS_VNET_HDR",
    "ONLY_VNET_HDR",
    "SILENTLY_CLEARED",
    "ClearingRule",
    "Feature",
    "Kind",
    "bits_of",
    "describe_bit",
    "mask_of",
    "missing_requirements",
]


class Kind(enum.Enum):
    """What a feature bit is about."""

    OFFLOAD = "offload"  # checksum and segmentation offloads: what silently differs between hosts
    CONTROL = "control"  # control virtqueue and what needs it
    TRANSPORT = "transport"  # ring and transport bits, common to every virtio device
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Feature:
    bit: int
    name: str
    prop: str | None
    default: bool | None
    kind: Kind
    requires: tuple[tuple[int, ...], ...] = ()

    @property
    def short(self) -> str:
        """The name without its ``VIRTIO_NET_F_`` / ``VIRTIO_F_`` prefix, e.g. ``GUEST_USO4``."""
        for prefix in ("VIRTIO_NET_F_", "VIRTIO_RING_F_", "VIRTIO_F_", "VHOST_USER_F_"):
            if self.name.startswith(prefix):
                return self.name[len(prefix):]
        return self.name


_O, _C, _T, _X = Kind.OFFLOAD, Kind.CONTROL, Kind.TRANSPORT, Kind.OTHER
_CSUM, _GUEST_CSUM, _CTRL_VQ = 0, 1, 17
_GUEST_TSO, _HOST_TSO = (7, 8), (11, 12)

# bit, spec name, QEMU property, QEMU default, kind, requires (groups of alternatives)
_TABLE: tuple[tuple[int, str, str | None, bool | None, Kind, tuple[tuple[int, ...], ...]], ...] = (
    (0, "VIRTIO_NET_F_CSUM", "csum", True, _O, ()),
    (1, "VIRTIO_NET_F_GUEST_CSUM", "guest_csum", True, _O, ()),
    (2, "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS", "ctrl_guest_offloads", True, _C, ((_CTRL_VQ,),)),
    (3, "VIRTIO_NET_F_MTU", None, None, _X, ()),  # offered when host_mtu is set
    (5, "VIRTIO_NET_F_MAC", None, None, _X, ()),  # always added by QEMU
    (6, "VIRTIO_NET_F_GSO", "gso", True, _O, ()),  # legacy
    (7, "VIRTIO_NET_F_GUEST_TSO4", "guest_tso4", True, _O, ((_GUEST_CSUM,),)),
    (8, "VIRTIO_NET_F_GUEST_TSO6", "guest_tso6", True, _O, ((_GUEST_CSUM,),)),
    (9, "VIRTIO_NET_F_GUEST_ECN", "guest_ecn", True, _O, (_GUEST_TSO,)),
    (10, "VIRTIO_NET_F_GUEST_UFO", "guest_ufo", True, _O, ((_GUEST_CSUM,),)),
    (11, "VIRTIO_NET_F_HOST_TSO4", "host_tso4", True, _O, ((_CSUM,),)),
    (12, "VIRTIO_NET_F_HOST_TSO6", "host_tso6", True, _O, ((_CSUM,),)),
    (13, "VIRTIO_NET_F_HOST_ECN", "host_ecn", True, _O, (_HOST_TSO,)),
    (14, "VIRTIO_NET_F_HOST_UFO", "host_ufo", True, _O, ((_CSUM,),)),
    (15, "VIRTIO_NET_F_MRG_RXBUF", "mrg_rxbuf", True, _O, ()),
    (16, "VIRTIO_NET_F_STATUS", "status", True, _C, ()),
    (17, "VIRTIO_NET_F_CTRL_VQ", "ctrl_vq", True, _C, ()),
    (18, "VIRTIO_NET_F_CTRL_RX", "ctrl_rx", True, _C, ((_CTRL_VQ,),)),
    (19, "VIRTIO_NET_F_CTRL_VLAN", "ctrl_vlan", True, _C, ((_CTRL_VQ,),)),
    (20, "VIRTIO_NET_F_CTRL_RX_EXTRA", "ctrl_rx_extra", True, _C, ((_CTRL_VQ,),)),
    (21, "VIRTIO_NET_F_GUEST_ANNOUNCE", "guest_announce", True, _C, ((_CTRL_VQ,),)),
    (22, "VIRTIO_NET_F_MQ", "mq", False, _C, ((_CTRL_VQ,),)),
    (23, "VIRTIO_NET_F_CTRL_MAC_ADDR", "ctrl_mac_addr", True, _C, ((_CTRL_VQ,),)),
    (24, "VIRTIO_F_NOTIFY_ON_EMPTY", "notify_on_empty", True, _T, ()),
    (26, "VHOST_F_LOG_ALL", None, None, _X, ()),
    (27, "VIRTIO_F_ANY_LAYOUT", "any_layout", True, _T, ()),
    (28, "VIRTIO_RING_F_INDIRECT_DESC", "indirect_desc", True, _T, ()),
    (29, "VIRTIO_RING_F_EVENT_IDX", "event_idx", True, _T, ()),
    (30, "VHOST_USER_F_PROTOCOL_FEATURES", None, None, _X, ()),
    (32, "VIRTIO_F_VERSION_1", None, None, _T, ()),  # set by the PCI transport for modern devices
    (33, "VIRTIO_F_IOMMU_PLATFORM", "iommu_platform", False, _T, ()),
    (34, "VIRTIO_F_RING_PACKED", "packed", False, _T, ()),
    (35, "VIRTIO_F_IN_ORDER", "in_order", False, _T, ()),
    (36, "VIRTIO_F_ORDER_PLATFORM", None, None, _T, ()),
    (37, "VIRTIO_F_SR_IOV", None, None, _T, ()),
    (40, "VIRTIO_F_RING_RESET", "queue_reset", True, _T, ()),
    (53, "VIRTIO_NET_F_NOTF_COAL", None, None, _C, ((_CTRL_VQ,),)),
    (54, "VIRTIO_NET_F_GUEST_USO4", "guest_uso4", True, _O, ((_GUEST_CSUM,),)),
    (55, "VIRTIO_NET_F_GUEST_USO6", "guest_uso6", True, _O, ((_GUEST_CSUM,),)),
    (56, "VIRTIO_NET_F_HOST_USO", "host_uso", True, _O, ((_CSUM,),)),
    (57, "VIRTIO_NET_F_HASH_REPORT", "hash", False, _O, ()),
    (60, "VIRTIO_NET_F_RSS", "rss", False, _C, ((_CTRL_VQ,),)),
    (61, "VIRTIO_NET_F_RSC_EXT", "guest_rsc_ext", False, _O, (_HOST_TSO,)),
    (62, "VIRTIO_NET_F_STANDBY", None, None, _X, ()),  # offered when failover=on
    (63, "VIRTIO_NET_F_SPEED_DUPLEX", None, None, _X, ()),  # offered when speed/duplex are set
    (65, "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO", "guest_tunnel", True, _O, ((7, 8, 54, 55),)),
    (66, "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO_CSUM", "guest_tunnel_csum", True, _O, ((65,),)),
    (67, "VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO", "host_tunnel", True, _O, ((11, 12, 56),)),
    (68, "VIRTIO_NET_F_HOST_UDP_TUNNEL_GSO_CSUM", "host_tunnel_csum", True, _O, ((67,),)),
)

CATALOGUE: tuple[Feature, ...] = tuple(Feature(b, n, p, d, k, r) for b, n, p, d, k, r in _TABLE)
BY_BIT: dict[int, Feature] = {f.bit: f for f in CATALOGUE}
BY_NAME: dict[str, Feature] = {f.name: f for f in CATALOGUE}
BY_PROPERTY: dict[str, Feature] = {f.prop: f for f in CATALOGUE if f.prop is not None}

MAX_BITS = 128  # QEMU's VIRTIO_FEATURES_MAX (include/hw/virtio/virtio-features.h, QEMU 10.2)


def _mask(*shorts: str) -> int:
    return sum(1 << BY_NAME[f"VIRTIO_NET_F_{s}"].bit for s in shorts)


# The bits QEMU clears silently, by backend condition (hw/net/virtio-net.c, virtio_net_get_features): the
# virtio-net header (peer_has_vnet_hdr), UFO (peer_has_ufo), USO (peer_has_uso), UDP tunnel offload
# (peer_has_tunnel, 10.2) and, in newer QEMUs without vhost, its own hash/RSS support.
ONLY_VNET_HDR = _mask("CSUM", "GUEST_CSUM", "HOST_TSO4", "HOST_TSO6", "HOST_ECN", "GUEST_TSO4", "GUEST_TSO6",
                      "GUEST_ECN")  # nothing but a missing header clears these
NEEDS_UFO = _mask("HOST_UFO", "GUEST_UFO")
NEEDS_USO = _mask("HOST_USO", "GUEST_USO4", "GUEST_USO6")
NEEDS_TUNNEL = _mask("GUEST_UDP_TUNNEL_GSO", "GUEST_UDP_TUNNEL_GSO_CSUM", "HOST_UDP_TUNNEL_GSO",
                     "HOST_UDP_TUNNEL_GSO_CSUM")
NEEDS_OWN_HASH = _mask("HASH_REPORT", "RSS")
NEEDS_VNET_HDR = ONLY_VNET_HDR | NEEDS_UFO | NEEDS_USO | NEEDS_TUNNEL | _mask("HASH_REPORT")
SILENTLY_CLEARED = NEEDS_VNET_HDR | NEEDS_OWN_HASH
# The properties a host dump turns on (dump.py): every offload, and every one QEMU may clear silently. The dump's
# other properties keep the machine type's defaults.
CEILING_PROPERTIES = frozenset(p for p, f in BY_PROPERTY.items()
                               if f.kind is Kind.OFFLOAD or SILENTLY_CLEARED >> f.bit & 1)


@dataclass(frozen=True, slots=True)
class ClearingRule:
    """One condition under which QEMU silently clears bits (virtio_net_get_features)."""

    mask: int  # the bits it clears
    fact: str  # the backend fact it needs (a field of derive.Backend; "own_hash": this QEMU's own RSS/hash)
    cleared: str  # why a side does not offer such a bit (for the decision's sentences)
    depends: str  # what decides whether such a bit is offered (for undetermined bits)


# The one table of QEMU's silent clearing, used by the derivation (probe side) and the decision. Most specific
# first: a USO bit is also a header bit, and its cause is the first row that holds it.
CLEARING_RULES: tuple[ClearingRule, ...] = (
    ClearingRule(NEEDS_USO, "uso", "its backend has no USO: tap on a host kernel older than Linux 6.2, or "
                 "vhost-user, vhost-vdpa, passt, which QEMU never probes for USO", "whether the backend supports USO"),
    ClearingRule(NEEDS_UFO, "ufo", "its backend has no UFO support", "whether the backend supports UFO"),
    ClearingRule(NEEDS_TUNNEL, "tunnel", "its backend has no UDP tunnel offload",
                 "whether the backend supports UDP tunnel offload"),
    ClearingRule(NEEDS_OWN_HASH & ~NEEDS_VNET_HDR, "own_hash", "this QEMU cannot do RSS for this backend (no eBPF RSS)",
                 "whether this QEMU can do RSS for this backend"),
    ClearingRule(NEEDS_VNET_HDR, "vnet_hdr", "its backend has no virtio-net header (vnet_hdr): -netdev user, or tap "
                 "with vnet_hdr=off", "whether the backend has a virtio-net header"),
)


def bits_of(bitmap: int) -> Iterator[int]:
    """The set bit numbers of ``bitmap``, lowest first (works at any width)."""
    if bitmap < 0:
        raise ValueError(f"feature bitmap must not be negative: {bitmap}")
    bit = 0
    while bitmap:
        if bitmap & 1:
            yield bit
        bitmap >>= 1
        bit += 1


def mask_of(bits: Iterable[int]) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def describe_bit(bit: int) -> str:
    """``GUEST_USO4 (bit 54)``, or ``unknown bit 90`` for bits the catalogue does not know."""
    feature = BY_BIT.get(bit)
    return f"{feature.short} (bit {bit})" if feature else f"unknown bit {bit}"


def missing_requirements(bitmap: int) -> list[tuple[int, tuple[int, ...]]]:
    """Pairs (bit, group) where ``bit`` is set but none of ``group`` is: a bitmap the spec forbids."""
    missing = []
    for bit in bits_of(bitmap):
        feature = BY_BIT.get(bit)
        if feature is None:
            continue
        for group in feature.requires:
            if not any(bitmap >> g & 1 for g in group):
                missing.append((bit, group))
    return missing
