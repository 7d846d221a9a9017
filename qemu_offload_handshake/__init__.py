"""qemu-offload-handshake: check virtio-net offload compatibility between QEMUs before a live migration."""

from typing import TYPE_CHECKING, Any

from .core.decide import Mode, decide
from .core.errors import (
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
    UnsafeCommandError,
    UnsupportedVersionError,
    UsageError,
)
from .core.model import CapabilitySet, HostCapabilities, NicReport, Tri, VmReport
from .core.policy import Policy
from .core.verdict import Finding, Outcome, Verdict
from .core.wire import decode, encode

if TYPE_CHECKING:
    from .api import handshake, precheck, probe


def __getattr__(name: str) -> Any:
    """The async API (``precheck``, ``probe``) loads on first use, so that importing the sans-IO core (catalogue,
    model, wire format, decision) pulls in neither asyncio nor qemu.qmp. The probing module is ``probing``, so
    nothing named ``probe`` ever shadows the function."""
    if name in ("handshake", "precheck", "probe"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AuthenticationError",
    "CapabilitySet",
    "CommandError",
    "CommandNotAllowedError",
    "ConnectError",
    "DecodeError",
    "EncodeError",
    "Finding",
    "HandshakeError",
    "HostCapabilities",
    "Mode",
    "NicReport",
    "Outcome",
    "Policy",
    "ProbeError",
    "QMPTimeoutError",
    "ReplyError",
    "Tri",
    "UnsafeCommandError",
    "UnsupportedVersionError",
    "UsageError",
    "Verdict",
    "VmReport",
    "decide",
    "decode",
    "encode",
    "handshake",
    "precheck",
    "probe",
]
