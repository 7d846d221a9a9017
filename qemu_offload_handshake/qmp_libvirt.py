"""QMP through libvirt: a domain libvirt owns is read with libvirt's QMP passthrough
(``virDomainQemuMonitorCommand``, ``libvirt_qemu.qemuMonitorCommand`` in the Python binding), with the very same
checks as a socket: the read-only allowlist, the crash table (the version comes from ``query-version``, which is
read-only and sent first) and a timeout per command.

Addresses: ``libvirt:DOMAIN`` (name or UUID) on ``qemu:///system``, or ``libvirt:DOMAIN?uri=CONNECTION-URI``. An
orchestrator can hand its own connection: ``LibvirtQMP(domain, conn=its_virConnect)``. The binding
(``libvirt-python``) is an optional extra: ``pip install qemu-offload-handshake[libvirt]``; nothing else in this
package imports it.

libvirt marks a domain whose monitor was used this way as tainted ("custom-monitor", in the domain's log and
``virsh dominfo``'s ``Tainted`` flags): it tells libvirt's maintainers that someone talked to QEMU behind
libvirt's back. The commands sent are read-only, so libvirt's view of the domain stays right; the taint remains
until the domain stops.

The binding's calls block: each runs in a worker thread with a timeout (a thread that does not return in time is
left to finish on its own; the caller gets ``QMPTimeoutError`` at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from .core.errors import CommandError, ConnectError, ProbeError, QMPTimeoutError, UsageError
from .qmp import ReadOnlyQMP

__all__ = ["DEFAULT_URI", "PREFIX", "LibvirtQMP", "annotate", "binding", "parse_libvirt"]

PREFIX = "libvirt:"
DEFAULT_URI = "qemu:///system"


def parse_libvirt(address: str) -> tuple[str, str]:
    """``libvirt:DOMAIN[?uri=URI]`` -> (domain, connection URI)."""
    rest = address[len(PREFIX):]
    domain, _, query = rest.partition("?")
    uri = DEFAULT_URI
    if query:  # the URI as it is (a '+' stays a '+': qemu+ssh://; it may have a query of its own: ?socket=)
        if not query.startswith("uri=") or len(query) == 4:
            raise UsageError(f"QMP address {address!r}: only ?uri=CONNECTION-URI may follow the domain")
        uri = unquote(query[4:])
    if not domain or any(c.isspace() for c in domain):
        raise UsageError(f"QMP address {address!r}: libvirt:DOMAIN (a domain name or UUID)")
    return domain, uri


def binding() -> tuple[Any, Any]:
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as err:
        raise UsageError("libvirt: addresses need the libvirt Python binding: pip install "
                         "'qemu-offload-handshake[libvirt]' (libvirt-python)") from err
    return libvirt, libvirt_qemu


class LibvirtQMP(ReadOnlyQMP):
    """``ReadOnlyQMP`` whose commands go through libvirt's passthrough instead of a socket."""

    def __init__(self, domain: str, *, uri: str = DEFAULT_URI, timeout: float = 5.0, conn: Any = None) -> None:
        super().__init__(f"{PREFIX}{domain}", timeout=timeout)
        self.domain_name, self.uri, self._conn, self._own = domain, uri, conn, conn is None
        self._dom: Any = None

    def where(self) -> str:
        return f"libvirt domain {self.domain_name} ({self.uri})"

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.timeout)
        except TimeoutError as err:
            raise QMPTimeoutError(f"{self.where()}: {what} got no answer within {self.timeout} s") from err

    async def connect(self) -> None:
        libvirt, _ = binding()
        try:
            if self._conn is None:
                self._conn = await self._call("connecting", libvirt.open, self.uri)
            self._dom = await self._call("finding the domain", self._find, libvirt)
        except libvirt.libvirtError as err:
            await self.close()
            raise ConnectError(f"{self.where()}: {err}") from err
        except QMPTimeoutError as err:
            await self.close()
            raise ConnectError(str(err)) from err
        try:
            reply = await self._send("query-version", None)  # read-only: the version the crash table needs
        except BaseException:
            await self.close()
            raise
        try:
            qemu = reply["qemu"]
            self.version = (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
            package = reply.get("package")
            self.package = (package.strip() or None) if isinstance(package, str) else None
        except (KeyError, TypeError, ValueError, AttributeError):
            self.version = None

    def _find(self, libvirt: Any) -> Any:
        try:
            return self._conn.lookupByName(self.domain_name)
        except libvirt.libvirtError:
            return self._conn.lookupByUUIDString(self.domain_name)

    async def close(self) -> None:
        conn, self._conn, self._dom = self._conn, None, None
        if conn is not None and self._own:
            with contextlib.suppress(Exception):  # best effort: the connection may be gone already
                await asyncio.wait_for(asyncio.to_thread(conn.close), self.timeout)

    async def _send(self, command: str, arguments: Mapping[str, object] | None) -> Any:
        libvirt, libvirt_qemu = binding()
        if self._dom is None:
            raise ProbeError(f"{self.where()}: not connected")
        text = json.dumps({"execute": command, **({"arguments": dict(arguments)} if arguments else {})})
        try:
            raw = await self._call(command, libvirt_qemu.qemuMonitorCommand, self._dom, text, 0)
        except libvirt.libvirtError as err:
            raise ProbeError(f"{self.where()}: {command} failed: {err}") from err
        try:
            reply = json.loads(raw)
        except (TypeError, ValueError) as err:
            raise ProbeError(f"{self.where()}: {command}: libvirt returned no JSON: {raw!r:.200}") from err
        if isinstance(reply, dict) and "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise CommandError(command, str(error.get("class", "GenericError")), str(error.get("desc", "")))
        if not isinstance(reply, dict) or "return" not in reply:
            raise ProbeError(f"{self.where()}: {command}: unexpected reply {raw!r:.200}")
        return reply["return"]


async def annotate(domain: str, *, uri: str = DEFAULT_URI, key: bytes | None = None, timeout: float = 5.0,
                   host: str | None = None) -> bytes:
    """Probe a running domain through libvirt (read-only) and store its report (wire format, signed with ``key``)
    in the live domain's metadata under this project's namespace (``core.domxml.NAMESPACE``), where it travels
    inside the migration XML to the destination's hook. Returns the record's bytes."""
    import base64
    import socket

    from .core.domxml import NAMESPACE
    from .core.wire import encode
    from .probing import probe_vm
    libvirt, _ = binding()
    qmp = LibvirtQMP(domain, uri=uri, timeout=timeout)
    async with qmp:
        report = await probe_vm(qmp, host=host or socket.gethostname(), side="source")
        data = encode(report, key=key)
        element = f"<report>{base64.b64encode(data).decode('ascii')}</report>"
        try:
            await qmp._call("storing the metadata", qmp._dom.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            element, "qoh", NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            raise ProbeError(f"{qmp.where()}: cannot store the report: {err}") from err
    return data
