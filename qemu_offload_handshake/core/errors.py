"""The exception tree. Every error this package raises derives from ``HandshakeError``.

An incompatible pair of QEMUs is a *result* (a verdict), never an exception. Exceptions are for input that
cannot be read, peers that cannot be reached and requests that must not be sent. Errors of third-party
libraries (qemu.qmp, construct) are converted where they enter, with ``raise ... from err``.

.. code-block:: text

    HandshakeError
     +-- ReplyError              a QEMU reply is malformed, contradicts itself or carries an unknown label
     +-- DecodeError             wire-format bytes are malformed, truncated, oversized or hostile
     |    +-- UnsupportedVersionError   a newer major format version
     |    +-- AuthenticationError       HMAC missing, wrong key, or tampered
     +-- EncodeError             a record cannot be put in the wire format
     +-- ProbeError              talking to a QEMU failed
     |    +-- ConnectError            the QMP endpoint cannot be reached or negotiated
     |    +-- QMPTimeoutError         a QMP command got no answer in time
     |    +-- CommandError            QEMU answered a command with an error
     |    +-- CommandNotAllowedError  a command outside the read-only allowlist was about to be sent
     |         +-- UnsafeCommandError  a command known to crash this QEMU version was about to be sent
     +-- ScratchError            a throwaway QEMU of our own (scratch.py) could not be started or read
     |    +-- MachineTypeError        that QEMU has no such machine type
     |    +-- BackendUnavailableError a NIC backend cannot be made here (no /dev/vhost-net, no tap rights, no slirp)
     |    +-- CommandLineError        QEMU refused the command line (its stderr is quoted)
     |    +-- ScratchTimeoutError     a step of its start missed its deadline (e.g. no QMP greeting in time)
     +-- UsageError              bad arguments, address or policy file
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "CommandError",
    "CommandLineError",
    "CommandNotAllowedError",
    "ConnectError",
    "DecodeError",
    "EncodeError",
    "HandshakeError",
    "MachineTypeError",
    "ProbeError",
    "QMPTimeoutError",
    "ReplyError",
    "ScratchError",
    "ScratchTimeoutError",
    "UnsafeCommandError",
    "UnsupportedVersionError",
    "UsageError",
]


class HandshakeError(Exception):
    """Root of every exception raised by qemu_offload_handshake."""


class ReplyError(HandshakeError):
    """A QEMU reply could not be understood (wrong type, unknown label, self-contradiction)."""


class DecodeError(HandshakeError):
    """Wire-format bytes could not be decoded; the message names the field or offset."""

    def __init__(self, message: str, *, offset: int | None = None, field: str | None = None) -> None:
        where = []
        if field is not None:
            where.append(f"field {field}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.offset = offset
        self.field = field


class UnsupportedVersionError(DecodeError):
    """The record was written by a newer, incompatible major version of the format."""


class AuthenticationError(DecodeError):
    """The record's HMAC is missing, made with another key, or does not match its bytes."""


class EncodeError(HandshakeError):
    """A record cannot be encoded (a value out of the format's bounds)."""


class ProbeError(HandshakeError):
    """Probing a QEMU over QMP failed."""


class ConnectError(ProbeError):
    """The QMP endpoint could not be reached or the QMP handshake failed."""


class QMPTimeoutError(ProbeError):
    """A QMP command was not answered within the timeout."""


class CommandError(ProbeError):
    """QEMU answered a command with an error reply."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class CommandNotAllowedError(ProbeError):
    """A command outside the read-only allowlist was about to be sent; it was not sent."""


class UnsafeCommandError(CommandNotAllowedError):
    """A command that ``quirks.KNOWN_CRASHES`` lists for this QEMU version was about to be sent; it was not sent."""


class ScratchError(HandshakeError):
    """A throwaway QEMU of our own (``scratch.py``) could not be started, read or ended. ``stderr`` is what that
    QEMU printed (empty when it printed nothing or never ran)."""

    def __init__(self, message: str, *, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class MachineTypeError(ScratchError):
    """That QEMU has no such machine type (it exits with "unsupported machine type")."""

    def __init__(self, message: str, *, machine: str, stderr: str = "") -> None:
        super().__init__(message, stderr=stderr)
        self.machine = machine


class BackendUnavailableError(ScratchError):
    """A NIC backend cannot be made on this host: no /dev/vhost-net, no right to create a tap, no slirp, ...
    ``backend`` is the backend kind (``tap``, ``tap-vhost``, ``user``), ``nic`` the NIC's id."""

    def __init__(self, message: str, *, backend: str, nic: str | None = None, stderr: str = "") -> None:
        super().__init__(message, stderr=stderr)
        self.backend = backend
        self.nic = nic


class CommandLineError(ScratchError):
    """QEMU refused the command line (an unknown property or device, a bad value, ...); the message quotes it."""


class ScratchTimeoutError(ScratchError):
    """A step of a throwaway QEMU's start did not finish by its deadline (no QMP greeting in time)."""


class UsageError(HandshakeError):
    """Bad command-line arguments, QMP address or policy."""
