"""qemu-offload-handshake: check virtio-net offload compatibility between QEMUs before a live migration."""

import sys
import types
from typing import TYPE_CHECKING, Any

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
    UnsupportedVersionError,
    UsageError,
)
from .core.model import CapabilitySet, HostCapabilities, NicReport, Tri, VmReport
from .core.wire import decode, encode

if TYPE_CHECKING:
    from .api import precheck, probe
    from .core.decide import Verdict


def __getattr__(name: str) -> Any:
    """The async API (``precheck``, ``probe``) and ``Verdict`` load on first use, so that importing the sans-IO core
    (catalogue, model, wire format, decision) pulls in neither asyncio nor qemu.qmp."""
    if name == "precheck":
        from .api import precheck
        return precheck
    if name == "Verdict":
        from .core.decide import Verdict
        return Verdict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """This package's module type. Its attribute ``probe`` is always the async function ``api.probe``.

    The package also has a submodule named ``probe`` (``probe.py``), and whenever that submodule is first imported
    (``import qemu_offload_handshake.api`` imports it) the import system binds it as the package's attribute
    ``probe``, which would shadow the function. A property on the module's type wins over the module's namespace
    for reads and for writes, so the function stays, loaded on first use; the submodule stays in ``sys.modules``
    (``from qemu_offload_handshake.probe import probe_vm`` works). Anything else assigned to ``probe`` (a test's
    stand-in) is kept until it is deleted."""

    @property
    def probe(self) -> Any:
        override = self.__dict__.get("_probe_override")
        if override is not None:
            return override
        from .api import probe
        return probe

    @probe.setter
    def probe(self, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.probe":
            return  # the import system binding the submodule
        self.__dict__["_probe_override"] = value

    @probe.deleter
    def probe(self) -> None:
        self.__dict__.pop("_probe_override", None)


sys.modules[__name__].__class__ = _Package

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
