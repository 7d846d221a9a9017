"""qemu-offload-handshake: check virtio-net offload compatibility between QEMUs before a live migration."""

from .errors import (
    AuthenticationError,
    CommandError,
    CommandNotAllowedError,
    ConnectError,
    DecodeError,
    EncodeError,
    HandshakeError,
    ProbeError,
    QMPTimeoutError,
    ReplyError,
    UnsupportedVersionError,
    UsageError,
)
from .model import CapabilitySet, HostCapabilities, NicReport, Tri, VmReport
from .wire import decode, encode

__all__ = [
    "AuthenticationError",
    "CapabilitySet",
    "CommandError",
    "CommandNotAllowedError",
    "ConnectError",
    "DecodeError",
    "EncodeError",
    "HandshakeError",
    "HostCapabilities",
    "NicReport",
    "ProbeError",
    "QMPTimeoutError",
    "ReplyError",
    "Tri",
    "UnsupportedVersionError",
    "UsageError",
    "VmReport",
    "decode",
    "encode",
]
