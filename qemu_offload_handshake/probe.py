"""Probe one QEMU over QMP (read-only) into a ``VmReport``.

Three rounds of concurrent read-only commands, each call with the connection's timeout:

1. ``query-version``, ``qom-get /machine type``, ``x-query-virtio`` (the devices);
2. per virtio-net device ``x-query-virtio-status`` (offered = host-features, negotiated = guest-features,
   backend features, driver status), and one ``qom-list`` (which offload properties this QEMU's virtio-net has,
   and their types: ``bool`` today, ``OnOffAuto`` in a QEMU that adopts it);
3. ``qom-get`` for each property whose value the offered bitmap does not already imply.

Which values are implied: QEMU builds the offered bitmap from the boolean properties and then only *clears*
bits (``hw/net/virtio-net.c``, ``virtio_net_get_features``), so a boolean property whose bit is offered is on,
and one whose bit QEMU never clears for this backend is off when not offered. The rest are read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from .errors import CommandError, ReplyError
from .features import BY_PROPERTY, SILENTLY_CLEARED
from .model import NicReport, Tri, VmReport, parse_tri
from .qmp import ReadOnlyQMP
from .virtio_status import parse_feature_block, parse_status

__all__ = ["probe_vm", "split_virtio_path"]

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


def split_virtio_path(virtio_path: str) -> tuple[str, str]:
    """(qdev id, QOM path of the device) from the virtio backend's path; the id is '' for id-less devices."""
    device = virtio_path.removesuffix("/virtio-backend")
    rest = device[len(_PERIPHERAL):] if device.startswith(_PERIPHERAL) else ""
    return (rest if rest and "/" not in rest else ""), device


def _nic_fields(status: object, device: str, notes: list[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if not isinstance(status, dict):
        if status is not None:
            notes.append("x-query-virtio-status: reply is not an object")
        return fields
    for key, which in (("offered", "host-features"), ("negotiated", "guest-features"),
                       ("backend_features", "backend-features")):
        try:
            fields[key] = parse_feature_block(status.get(which), where=f"{device} {which}").bitmap
        except ReplyError as err:
            notes.append(f"{which}: {err}")
    try:
        fields["driver_status"] = parse_status(status.get("status"))
    except ReplyError as err:
        notes.append(f"driver status: {err}")
    if status.get("vhost-started") is True or fields.get("backend_features"):
        fields["backend"] = "vhost"
    return fields


def _plan(types: dict[str, str], fields: dict[str, Any]) -> tuple[dict[str, Tri], list[str]]:
    """Property values implied by the offered bitmap, and the properties that must be read."""
    offered = fields.get("offered")
    vhost = fields.get("backend") == "vhost"
    implied: dict[str, Tri] = {}
    to_read = []
    for name, feature in BY_PROPERTY.items():
        if name not in types:
            continue  # this QEMU has no such property (e.g. host_uso before 8.2)
        if types[name] != "bool" or offered is None:
            to_read.append(name)
        elif offered >> feature.bit & 1:
            implied[name] = Tri.ON  # QEMU offers a bit only if its property is on
        elif vhost or SILENTLY_CLEARED >> feature.bit & 1:
            # off, or on and silently cleared: only QEMU can say (with vhost, vhost_net_get_features may mask
            # any bit, so then every such property is read)
            to_read.append(name)
        else:
            implied[name] = Tri.OFF
    return implied, to_read


async def _read_props(qmp: ReadOnlyQMP, path: str, names: list[str], props: dict[str, Tri],
                      notes: list[str]) -> None:
    values = await asyncio.gather(*(_try(qmp.execute("qom-get", {"path": path, "property": name}), notes,
                                         f"property {name}") for name in names))
    for name, value in zip(names, values, strict=True):
        if value is None:
            continue
        try:
            props[name] = parse_tri(value)
        except ValueError as err:
            notes.append(f"property {name}: {err}")


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
    nic_notes: list[list[str]] = [[] for _ in paths]
    # Every backend is a virtio-net-device: one qom-list tells the properties (and types) of all of them.
    statuses = await asyncio.gather(
        *(_try(qmp.execute("x-query-virtio-status", {"path": p}), n, "x-query-virtio-status")
          for p, n in zip(paths, nic_notes, strict=True)),
        _try(qmp.execute("qom-list", {"path": paths[0]}), notes, "qom-list") if paths else _none())
    plist = statuses[-1]
    types = {str(p.get("name")): str(p.get("type")) for p in plist if isinstance(p, dict)} \
        if isinstance(plist, list) else {}
    if paths and not types:
        notes.append("qom-list: the virtio-net properties could not be listed")
    nics_fields = [_nic_fields(st, split_virtio_path(p)[1], n)
                   for p, st, n in zip(paths, statuses, nic_notes, strict=False)]
    plans = [_plan(types, f) for f in nics_fields]
    await asyncio.gather(*(_read_props(qmp, p, to_read, implied, n)
                           for p, (implied, to_read), n in zip(paths, plans, nic_notes, strict=True)))
    try:
        nics = tuple(NicReport.make(*split_virtio_path(p), properties=implied, unreadable=n, **f)
                     for p, (implied, _), n, f in zip(paths, plans, nic_notes, nics_fields, strict=True))
        return VmReport(host, qemu_version, package, machine_type, nics, tuple(notes),
                        devices_known=isinstance(devices, list))
    except (TypeError, ValueError) as err:
        raise ReplyError(f"{host}: QEMU's answers do not make a valid report: {err}") from err


async def _none() -> None:
    return None
