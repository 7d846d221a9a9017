"""Turn the feature blocks of QEMU's ``x-query-virtio-status`` reply into integer bitmaps.

QEMU decodes a bitmap into labels in ``hw/virtio/virtio-qmp.c``, ``qmp_decode_features``: transport bits first
(``virtio_transport_map``), then device bits (``virtio_net_feature_map``), and whatever is left goes into
``unknown-dev-features`` (bits 0-63) and, since QEMU 10.2, ``unknown-dev-features2`` (bits 64-127). Each label
is ``"NAME: description"``. The labels are not reliable (see ``LABEL_DEFECTS``), so this module maps each one
to a bit number, refuses any label it cannot map (naming it), and returns integers: the rest of the library
compares numbers, never labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ReplyError
from .features import CATALOGUE

__all__ = [
    "LABEL_DEFECTS",
    "STATUS_BITS",
    "FeatureBlock",
    "label_to_bit",
    "parse_feature_block",
    "parse_status",
]

# Names QEMU prints that are not in the catalogue under that name.
_EXTRA_NAMES: dict[str, int] = {
    "VHOST_NET_F_VIRTIO_NET_HDR": 27,  # shares bit 27 with VIRTIO_F_ANY_LAYOUT (virtio_net_feature_map)
}


@dataclass(frozen=True, slots=True)
class LabelDefect:
    printed_name: str  # the name QEMU prints
    description_word: str  # a word only the wrongly named feature's description has
    bit: int  # the bit that label really stands for
    seen_in: str


# Labels whose name is wrong, told apart by their description (hw/virtio/virtio-qmp.c, virtio_net_feature_map).
LABEL_DEFECTS: tuple[LabelDefect, ...] = (
    # GUEST_USO6 printed as "VIRTIO_NET_F_GUEST_USO4: Driver can receive USOv6" (seen on QEMU 10.0.2).
    LabelDefect("VIRTIO_NET_F_GUEST_USO4", "USOv6", 55, "QEMU 8.2 to 10.1.2"),
    # GUEST_UDP_TUNNEL_GSO_CSUM printed as "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO: ... requiring checksum offload ...".
    LabelDefect("VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO", "checksum", 66, "QEMU 10.2"),
)

# Driver status bits (virtio spec 1.3, 2.1 "Device Status Field"; QEMU virtio_config_status_map).
STATUS_BITS: dict[str, int] = {
    "VIRTIO_CONFIG_S_ACKNOWLEDGE": 1,
    "VIRTIO_CONFIG_S_DRIVER": 2,
    "VIRTIO_CONFIG_S_DRIVER_OK": 4,
    "VIRTIO_CONFIG_S_FEATURES_OK": 8,
    "VIRTIO_CONFIG_S_NEEDS_RESET": 0x40,
    "VIRTIO_CONFIG_S_FAILED": 0x80,
}

_NAMES: dict[str, int] = {f.name: f.bit for f in CATALOGUE} | _EXTRA_NAMES
_DEFECTS: dict[str, LabelDefect] = {d.printed_name: d for d in LABEL_DEFECTS}


def _split(label: object, where: str) -> tuple[str, str]:
    if not isinstance(label, str):
        raise ReplyError(f"{where}: feature label is not a string: {label!r}")
    name, sep, description = label.partition(":")
    if not sep or not name or name != name.strip():
        raise ReplyError(f"{where}: malformed feature label {label!r} (expected 'NAME: description')")
    return name, description.strip()


def label_to_bit(label: str, *, where: str = "feature label") -> int:
    """Bit number of one QEMU feature label; ``ReplyError`` naming the label if it is unknown."""
    name, description = _split(label, where)
    defect = _DEFECTS.get(name)
    if defect is not None and defect.description_word in description:
        return defect.bit
    try:
        return _NAMES[name]
    except KeyError:
        raise ReplyError(f"{where}: unknown feature label {label!r}; its bit cannot be told") from None


@dataclass(frozen=True, slots=True)
class FeatureBlock:
    bitmap: int
    labels: int  # how many labels were read (for diagnostics)


def _unsigned(value: object, field: str, where: str, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ReplyError(f"{where}: {field} is not an unsigned {bits}-bit integer: {value!r}")
    return value


def parse_feature_block(block: object, *, where: str = "features") -> FeatureBlock:
    """One ``VirtioDeviceFeatures`` object (``host-features`` etc.) to a bitmap of any width."""
    if not isinstance(block, Mapping):
        raise ReplyError(f"{where}: expected an object, got {type(block).__name__}")
    bitmap = 0
    count = 0
    for field in ("transports", "dev-features"):
        labels = block.get(field, [])
        if not isinstance(labels, list):
            raise ReplyError(f"{where}: {field} is not a list")
        for label in labels:
            bit = label_to_bit(label, where=f"{where}.{field}")
            if bitmap >> bit & 1:
                raise ReplyError(f"{where}: bit {bit} is listed twice (label {label!r}); the reply contradicts itself")
            bitmap |= 1 << bit
            count += 1
    for field, shift in (("unknown-dev-features", 0), ("unknown-dev-features2", 64)):
        if field in block:
            unknown = _unsigned(block[field], field, where, 64) << shift
            if bitmap & unknown:
                raise ReplyError(f"{where}: {field} repeats bits that have labels; the reply contradicts itself")
            bitmap |= unknown
    return FeatureBlock(bitmap, count)


def parse_status(status: object, *, where: str = "status") -> int:
    """The driver status labels (``status.statuses``) to the status byte."""
    if not isinstance(status, Mapping) or not isinstance(status.get("statuses", []), list):
        raise ReplyError(f"{where}: expected an object with a 'statuses' list")
    value = 0
    for label in status.get("statuses", []):
        name, _ = _split(label, where)
        try:
            value |= STATUS_BITS[name]
        except KeyError:
            raise ReplyError(f"{where}: unknown driver status label {label!r}") from None
    if "unknown-statuses" in status:
        value |= _unsigned(status["unknown-statuses"], "unknown-statuses", where, 8)
    return value
