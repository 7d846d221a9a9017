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

__all__ = [
    "AuthenticationError",
    "CommandError",
    "CommandNotAllowedError",
    "ConnectError",
    "DecodeError",
    "EncodeError",
    "HandshakeError",
    "ProbeError",
    "QMPTimeoutError",
    "ReplyError",
    "UnsupportedVersionError",
    "UsageError",
]
