"""qemu-offload-handshake: check virtio-net offload compatibility between QEMUs before a live migration."""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .api import precheck, probe
    from .decide import Verdict


def __getattr__(name: str) -> Any:
    """The async API (``precheck``, ``probe``) and ``Verdict`` load on first use, so that importing the sans-IO core
    (catalogue, model, wire format, decision) pulls in neither asyncio nor qemu.qmp."""
    if name in ("precheck", "probe"):
        from . import api
        return getattr(api, name)
    if name == "Verdict":
        from .decide import Verdict
        return Verdict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    "Verdict",
    "VmReport",
    "decode",
    "encode",
    "precheck",
    "probe",
]
