"""Probe one QEMU over QMP (read-only) into a ``VmReport``.

Per virtio-net device: ``x-query-virtio-status`` (offered = host-features, negotiated = guest-features, backend
features, driver status), ``qom-list`` (which offload properties this QEMU has, and their types) and ``qom-get``
for the properties whose value is not already implied. Everything per device and per VM runs concurrently; every
call has the connection's timeout.

Which property values are implied: QEMU builds the offered bitmap from the boolean properties and then only
*clears* bits (``hw/net/virtio-net.c``, ``virtio_net_get_features``), so a boolean property whose bit is
offered is necessarily on. All others (bits not offered, and non-boolean OnOffAuto properties) are read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from .errors import CommandError, ReplyError
from .features import BY_PROPERTY
from .model import NicReport, Tri, VmReport, parse_tri
from .qmp import ReadOnlyQMP
from .virtio_status import parse_feature_block, parse_status

__all__ = ["probe_vm"]

T = TypeVar("T")
_PERIPHERAL = "/machine/peripheral/"


async def _try(call: Awaitable[T], notes: list[str], what: str) -> T | None:
    """Await a QMP call; a QEMU error reply becomes a note of what could not be read (transport errors raise)."""
    try:
        return await call
    except CommandError as err:
        notes.append(f"{what}: {err.error_class}: {err.desc}")
    except ReplyError as err:
        notes.append(f"{what}: {err}")
    return None


def _device_path(virtio_path: str) -> tuple[str, str]:
    """(qdev id, QOM path of the device) from the virtio backend's path; the id is '' for id-less devices."""
    device = virtio_path.removesuffix("/virtio-backend")
    rest = device[len(_PERIPHERAL):] if device.startswith(_PERIPHERAL) else ""
    return (rest if rest and "/" not in rest else ""), device


async def _probe_nic(qmp: ReadOnlyQMP, path: str) -> NicReport:
    qdev_id, device = _device_path(path)
    notes: list[str] = []
    status, plist = await asyncio.gather(
        _try(qmp.execute("x-query-virtio-status", {"path": path}), notes, "x-query-virtio-status"),
        _try(qmp.execute("qom-list", {"path": path}), notes, "qom-list"))
    fields: dict[str, Any] = {}
    if isinstance(status, dict):
        for key, which in (("offered", "host-features"), ("negotiated", "guest-features"),
                           ("backend_features", "backend-features")):
            block = await _try(_parse_async(status.get(which), f"{device} {which}"), notes, which)
            fields[key] = None if block is None else block
        fields["driver_status"] = await _try(_status_async(status.get("status")), notes, "driver status")
    elif status is not None:
        notes.append("x-query-virtio-status: reply is not an object")
    offered: int | None = fields.get("offered")
    types = {p.get("name"): p.get("type") for p in plist if isinstance(p, dict)} if isinstance(plist, list) else {}
    if plist is not None and not types:
        notes.append("qom-list: no properties in the reply")
    props: dict[str, Tri] = {}
    to_read = []
    for name, feature in BY_PROPERTY.items():
        if name not in types:
            continue  # this QEMU has no such property (e.g. host_uso before 8.2)
        if types[name] == "bool" and offered is not None and offered >> feature.bit & 1:
            props[name] = Tri.ON  # implied: an offered bit's boolean property is on
        else:
            to_read.append(name)
    values = await asyncio.gather(*(_try(qmp.execute("qom-get", {"path": path, "property": name}), notes,
                                         f"property {name}") for name in [*to_read, "netdev"]))
    for name, value in zip(to_read, values, strict=False):
        if value is None:
            continue
        try:
            props[name] = parse_tri(value)
        except ValueError as err:
            notes.append(f"property {name}: {err}")
    netdev = values[-1] if isinstance(values[-1], str) and values[-1] else None
    return NicReport.make(qdev_id, device, properties=props, unreadable=notes, netdev_id=netdev, **fields)


async def _parse_async(block: object, where: str) -> int:
    return parse_feature_block(block, where=where).bitmap


async def _status_async(status: object) -> int:
    return parse_status(status)


async def probe_vm(qmp: ReadOnlyQMP, *, host: str) -> VmReport:
    """Read one VM's report. QEMU error replies become ``unreadable`` notes; a dead link raises ``ProbeError``."""
    notes: list[str] = []
    version, machine, devices = await asyncio.gather(
        _try(qmp.execute("query-version"), notes, "query-version"),
        _try(qmp.execute("qom-get", {"path": "/machine", "property": "type"}), notes, "machine type"),
        _try(qmp.execute("x-query-virtio"), notes, "x-query-virtio (QEMU older than 7.2 has none)"))
    qemu_version = package = None
    if isinstance(version, dict):
        try:
            q = version["qemu"]
            qemu_version = (int(q["major"]), int(q["minor"]), int(q["micro"]))
            package = str(version.get("package", "")).strip() or None
        except (KeyError, TypeError, ValueError):
            notes.append(f"query-version: unexpected reply {version!r}")
    machine_type = machine.removesuffix("-machine") if isinstance(machine, str) else None
    if machine is not None and machine_type is None:
        notes.append(f"machine type: unexpected reply {machine!r}")
    paths = []
    if isinstance(devices, list):
        for dev in devices:
            if isinstance(dev, dict) and dev.get("name") == "virtio-net" and isinstance(dev.get("path"), str):
                paths.append(dev["path"])
    elif devices is not None:
        notes.append("x-query-virtio: reply is not a list")
    nics = await asyncio.gather(*(_probe_nic(qmp, path) for path in paths))
    try:
        return VmReport(host, qemu_version, package, machine_type, tuple(nics), tuple(notes),
                        devices_known=isinstance(devices, list))
    except (TypeError, ValueError) as err:
        raise ReplyError(f"{host}: QEMU's answers do not make a valid report: {err}") from err
