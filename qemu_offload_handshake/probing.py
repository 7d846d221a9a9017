"""Probe one QEMU over QMP (read-only) into a ``VmReport``.

The QEMU version comes from the QMP greeting, before any command, and decides what may be sent
(``quirks.KNOWN_CRASHES``). Then up to three rounds of concurrent read-only commands, each with the
connection's timeout:

1. ``qom-get /machine type``, ``x-query-virtio`` (the devices), HMP ``info network`` (each netdev's type, which
   no QMP query tells), ``query-name``, ``query-uuid``;
2. per virtio-net device ``x-query-virtio-status`` (offered = host-features, negotiated = guest-features,
   backend features, driver status) where it is safe, and the properties: one ``qom-list-get`` for every device
   and its PCI proxy on QEMU 10.1 and later, else one ``qom-list`` (names and types) and a ``qom-get netdev``
   per device;
3. (QEMU older than 10.1) ``qom-get`` for each property whose value the offered bitmap does not already imply.

Which values are implied: QEMU builds the offered bitmap from the boolean properties and then only *clears*
bits (``hw/net/virtio-net.c``, ``virtio_net_get_features``), so a boolean property whose bit is offered is on,
and one whose bit QEMU never clears for this backend is off when not offered. The rest are read.

Where ``x-query-virtio-status`` is unsafe (QEMU 11.1 aborts on it), the offered bitmap is derived
(``derive``) from the properties, the PCI transport mode and the backend facts that can be read safely
(``hostfacts``, for a QEMU on this host); bits that cannot be derived are marked undetermined, and the
guest is taken to have negotiated everything that may be offered. Every such fact is listed in
``NicReport.derived``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from .core.derive import Backend, backend_of, derive_offered
from .core.devstate import BACKEND_STATE, PROXY_STATE, normalize
from .core.errors import CommandError, ReplyError
from .core.features import BY_PROPERTY, SILENTLY_CLEARED
from .core.labels import parse_feature_block, parse_status
from .core.model import NicReport, Tri, VmReport, parse_tri
from .core.quirks import known_crash
from .hostfacts import QemuFds, kernel_tap_offloads, qemu_fds, tap_vnet_hdr
from .qmp import ReadOnlyQMP

__all__ = ["parse_info_network", "probe_vm", "split_virtio_path"]

T = TypeVar("T")
_PERIPHERAL = "/machine/peripheral/"
_QOM_LIST_GET = (10, 1, 0)  # qom-list-get exists since QEMU 10.1 (qapi/qom.json)


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


def parse_info_network(text: object) -> dict[str, tuple[str, dict[str, str], int]]:
    """Netdev id -> (type, its other ``key=value`` fields, queue pairs) from HMP ``info network`` (net/net.c,
    ``print_net_client``: ``NAME: index=N,type=TYPE,INFO`` per client and queue, peers indented under their NIC;
    a netdev with ``queues=2`` is listed twice, ``index=0`` and ``index=1``, seen on QEMU 10.0)."""
    netdevs: dict[str, tuple[str, dict[str, str], int]] = {}
    if not isinstance(text, str):
        return netdevs
    for line in text.splitlines():
        name, sep, rest = line.strip().removeprefix("\\").strip().partition(": ")
        if not sep or not name:
            continue
        fields = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
        kind = fields.pop("type", None)
        if kind is None or kind == "nic":
            continue
        if name in netdevs:
            first = netdevs[name]
            netdevs[name] = (first[0], first[1], first[2] + 1)
        else:
            netdevs[name] = (kind, fields, 1)
    return netdevs


def _status_fields(status: object, device: str, notes: list[str]) -> dict[str, Any]:
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
    fields["vhost"] = status.get("vhost-started") is True or bool(fields.get("backend_features"))
    return fields


# The derivation also needs host_mtu and speed (read with the device state, BACKEND_STATE) and the proxy's
# disable-modern / disable-legacy (PROXY_STATE); only failover is not among them.
_DERIVE_EXTRA = ("failover",)


def _plan(types: dict[str, str], offered: int | None, vhost: bool) -> tuple[dict[str, Tri], list[str]]:
    """Property values implied by the offered bitmap, and the properties that must be read."""
    implied: dict[str, Tri] = {}
    to_read = [name for name in _DERIVE_EXTRA if name in types] if offered is None else []
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


def _tris(values: dict[str, object], notes: list[str]) -> dict[str, Tri]:
    props = {}
    for name, value in values.items():
        if name in BY_PROPERTY:
            try:
                props[name] = parse_tri(value)
            except ValueError as err:
                notes.append(f"property {name}: {err}")
    return props


def _listed(entry: object) -> dict[str, object]:
    """One qom-list-get result (``{"properties": [{"name", "type", "value"?}]}``) as name -> value."""
    props = entry.get("properties") if isinstance(entry, dict) else None
    if not isinstance(props, list):
        raise ReplyError(f"qom-list-get: unexpected entry {entry!r:.200}")
    return {str(p["name"]): p["value"] for p in props if isinstance(p, dict) and "name" in p and "value" in p}


class _Host:
    """Backend facts for NICs of a QEMU on this host (``None`` when it is not local)."""

    def __init__(self, pid: int | None) -> None:
        self.fds: QemuFds | None = qemu_fds(pid) if pid else None

    def backend(self, kind: str | None, info: dict[str, str]) -> Backend:
        if kind != "tap" or self.fds is None:
            return backend_of(kind)
        name = self.fds.tap_name(info)
        kernel = kernel_tap_offloads()
        return backend_of("tap", vnet_hdr=tap_vnet_hdr(name) if name else None,
                          kernel_ufo=kernel.ufo if kernel else None, kernel_uso=kernel.uso if kernel else None,
                          kernel_tunnel=kernel.tunnel if kernel else None, vhost=self.fds.vhost_net > 0)


async def _read_props(qmp: ReadOnlyQMP, path: str, names: list[str], notes: list[str]) -> dict[str, object]:
    values = await asyncio.gather(*(_try(qmp.execute("qom-get", {"path": path, "property": name}), notes,
                                         f"property {name}") for name in names))
    return {name: value for name, value in zip(names, values, strict=True) if value is not None}


async def _none() -> None:
    return None


async def probe_vm(qmp: ReadOnlyQMP, *, host: str, side: str | None = None, derive: bool = False,
                   batch: bool | None = None) -> VmReport:
    """Read one VM's report. QEMU error replies become ``unreadable`` notes; a dead link raises ``ProbeError``.

    ``derive=True`` derives the offered bitmaps even where x-query-virtio-status is safe (to check the
    derivation against what QEMU reports); ``batch=False`` reads properties one ``qom-get`` at a time even where
    ``qom-list-get`` exists (to measure what it saves)."""
    notes: list[str] = []
    version = qmp.version
    machine, devices, network, name, uuid = await asyncio.gather(
        _try(qmp.execute("qom-get", {"path": "/machine", "property": "type"}), notes, "machine type"),
        _try(qmp.execute("x-query-virtio"), notes, "x-query-virtio (QEMU older than 7.2 has none)"),
        # supplementary: without it the backend kinds are unknown, which the decision handles (fail closed)
        _try(qmp.execute("human-monitor-command", {"command-line": "info network"}), [], "info network"),
        _try(qmp.execute("query-name"), [], "query-name"),
        _try(qmp.execute("query-uuid"), [], "query-uuid"))
    machine_type = machine.removesuffix("-machine") if isinstance(machine, str) else None
    if machine is not None and machine_type is None:
        notes.append(f"machine type: unexpected reply {machine!r}")
    paths = []
    if isinstance(devices, list):
        for dev in devices:
            if isinstance(dev, dict) and dev.get("name") == "virtio-net" and isinstance(dev.get("path"), str):
                if dev["path"] in paths:
                    notes.append(f"x-query-virtio lists {dev['path']} twice; the reply contradicts itself")
                    continue
                paths.append(dev["path"])
    elif devices is not None:
        notes.append("x-query-virtio: reply is not a list")
    netdevs = parse_info_network(network)
    nic_notes: list[list[str]] = [[] for _ in paths]
    status_safe = not derive and known_crash("x-query-virtio-status", None, version) is None
    if batch is None:
        batch = version is not None and version >= _QOM_LIST_GET
    devs = [split_virtio_path(p)[1] for p in paths]
    rounds: list[Awaitable[Any]] = [
        _try(qmp.execute("x-query-virtio-status", {"path": p}), n, "x-query-virtio-status") if status_safe
        else _none() for p, n in zip(paths, nic_notes, strict=True)]
    if batch:
        rounds.append(_try(qmp.execute("qom-list-get", {"paths": paths + devs}), notes, "qom-list-get")
                      if paths else _none())
    else:
        rounds.append(_try(qmp.execute("qom-list", {"path": paths[0]}), notes, "qom-list") if paths else _none())
        rounds += [_try(qmp.execute("qom-get", {"path": p, "property": "netdev"}), [], "netdev") for p in paths]
        rounds += [_read_props(qmp, d, ["addr", "parent_bus", *PROXY_STATE], []) for d in devs]  # path, state
        rounds += [_read_props(qmp, p, list(BACKEND_STATE), []) for p in paths]
    answers = await asyncio.gather(*rounds)
    statuses, listing = answers[:len(paths)], answers[len(paths)]
    values: list[dict[str, object]] = [{} for _ in paths]
    proxies: list[dict[str, object]] = [{} for _ in paths]
    types: dict[str, str] = {}
    if batch and isinstance(listing, list) and len(listing) == 2 * len(paths):
        try:
            values = [_listed(e) for e in listing[:len(paths)]]
            proxies = [_listed(e) for e in listing[len(paths):]]
            types = {k: ("bool" if isinstance(v, bool) else "other") for k, v in values[0].items()} if values else {}
        except ReplyError as err:
            notes.append(str(err))
    elif not batch:
        types = {str(p.get("name")): str(p.get("type")) for p in listing if isinstance(p, dict)} \
            if isinstance(listing, list) else {}
        for value, netdev, more in zip(values, answers[len(paths) + 1:2 * len(paths) + 1],
                                       answers[3 * len(paths) + 1:], strict=True):
            value.update(more)
            if netdev is not None:
                value["netdev"] = netdev
        proxies = list(answers[2 * len(paths) + 1:3 * len(paths) + 1])
    if paths and not types:
        notes.append("the virtio-net properties could not be listed")
    local = _Host(qmp.peer_pid)
    nics_fields: list[dict[str, Any]] = []
    for status, value, dev, n in zip(statuses, values, devs, nic_notes, strict=True):
        netdev = value.get("netdev")
        kind, info, queues = netdevs.get(netdev, (None, {}, None)) if isinstance(netdev, str) else (None, {}, None)
        backend = local.backend(kind, info)
        fields: dict[str, Any] = {"netdev_id": netdev if isinstance(netdev, str) else None, "backend": kind,
                                  "_queues": queues}
        if status_safe:
            fields |= _status_fields(status, dev, n)
        if backend.vnet_hdr is not None:
            fields["vnet_hdr"] = backend.vnet_hdr
        fields["_backend"] = backend
        nics_fields.append(fields)
    plans: list[tuple[dict[str, Tri], list[str]]] = []
    for value, fields in zip(values, nics_fields, strict=True):
        if batch:
            plans.append((_tris(value, []), []))
        else:
            plans.append(_plan(types, fields.get("offered"), bool(fields.get("vhost"))))
    read = await asyncio.gather(*(_read_props(qmp, p, to_read, n) if to_read else _none()
                                  for p, (_, to_read), n in zip(paths, plans, nic_notes, strict=True)))
    paths_by_dev = await _dev_paths(qmp, devs, {d: p for d, p in zip(devs, proxies, strict=True) if "parent_bus" in p})
    nics = []
    try:
        for p, (implied, _), got, value, proxy, f, n, dev_path in zip(paths, plans, read, values, proxies,
                                                                       nics_fields, nic_notes, paths_by_dev,
                                                                       strict=True):
            f["dev_path"] = dev_path
            state = normalize({k: proxy[k] for k in PROXY_STATE if k in proxy},
                              {k: value[k] for k in BACKEND_STATE if k in value}, f.pop("_queues"))
            f["state"] = tuple(sorted(state.items()))
            props = implied | _tris(got or {}, n)
            value = value | (got or {})
            backend = f.pop("_backend")
            f.pop("vhost", None)
            if not status_safe:
                f |= _derived_fields(props, backend, proxy, value)
            nics.append(NicReport.make(*split_virtio_path(p), properties=props, unreadable=n, **f))
        return VmReport(host, version, qmp.package, machine_type, tuple(nics), tuple(notes),
                        devices_known=isinstance(devices, list), vm_name=_name(name), vm_uuid=_uuid(uuid),
                        made_at=int(time.time()), side=side)
    except (TypeError, ValueError) as err:
        raise ReplyError(f"{host}: QEMU's answers do not make a valid report: {err}") from err


_ROOT_HOSTS = {"/machine/q35": "0000:00", "/machine/i440fx": "0000:00"}  # q35/i440fx root_bus_path callbacks


async def _dev_paths(qmp: ReadOnlyQMP, devs: list[str], known: dict[str, dict[str, object]]) -> list[str | None]:
    """QEMU's name for each device's migrated state (``hw/pci/pci.c``, ``pcibus_get_dev_path``: the root bus
    path, then ``:SS.F`` for every PCI device from the root down to this one), from each device's ``addr``
    (devfn) and ``parent_bus`` read-only, walking up through bridges; None where it cannot be told (not PCI, an
    unknown host bridge, a reply that is not what QEMU gives)."""
    props: dict[str, dict[str, object]] = dict(known)

    async def read(paths: list[str]) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in props]
        values = await asyncio.gather(*(_read_props(qmp, p, ["addr", "parent_bus"], []) for p in todo))
        props.update(zip(todo, values, strict=True))

    await read(devs)
    chains: list[list[str] | None] = []
    for dev in devs:
        chain: list[str] | None = [dev]
        for _ in range(16):  # bridges nest a few levels deep at most
            assert chain is not None
            bus = props.get(chain[-1], {}).get("parent_bus")
            owner = bus.rsplit("/", 1)[0] if isinstance(bus, str) and "/" in bus.strip("/") else None
            if owner is None:
                chain = None
                break
            if owner in _ROOT_HOSTS:
                chain.append(owner)
                break
            if owner not in props:
                await read([owner])
            if not isinstance(props[owner].get("addr"), int):
                chain = None  # a host bridge this code does not know (pxb, ...), or not PCI at all
                break
            chain.append(owner)
        chains.append(chain)
    out: list[str | None] = []
    for chain in chains:
        addrs = [props[p].get("addr") for p in chain[:-1]] if chain else []
        if not chain or not all(isinstance(a, int) and 0 <= a < 256 for a in addrs):
            out.append(None)
            continue
        slots = "".join(f":{a >> 3:02x}.{a & 7:x}" for a in reversed(addrs))  # type: ignore[operator]
        out.append(_ROOT_HOSTS[chain[-1]] + slots)
    return out


def _derived_fields(props: dict[str, Tri], backend: Backend, proxy: dict[str, object],
                    value: dict[str, object]) -> dict[str, Any]:
    """Offered and negotiated bitmaps derived from safe reads (x-query-virtio-status is unsafe here)."""
    def onoff(key: str) -> bool | None:
        raw = proxy.get(key)
        return {True: True, False: False, "on": True, "off": False}.get(raw) if isinstance(raw, (bool, str)) \
            else None
    modern = onoff("disable-modern")
    mtu, speed = value.get("host_mtu"), value.get("speed")
    derived = derive_offered(props, backend, modern=None if modern is None else not modern,
                             pci=True if "disable-legacy" in proxy else None,
                             host_mtu=mtu if isinstance(mtu, int) else 0, failover=value.get("failover") is True,
                             speed=speed if isinstance(speed, int) else -1)
    # The guest's negotiated features cannot be read: decide as if it negotiated everything that may be offered.
    facts = ["negotiated", "offered"] + (["vnet_hdr"] if backend.vnet_hdr is not None else [])
    return {"offered": derived.offered, "offered_unknown": derived.unknown,
            "negotiated": derived.offered | derived.unknown, "derived": tuple(sorted(facts))}


def _name(reply: object) -> str | None:
    name = reply.get("name") if isinstance(reply, dict) else None
    return name if isinstance(name, str) and name else None


def _uuid(reply: object) -> str | None:
    uuid = reply.get("UUID") if isinstance(reply, dict) else None
    return uuid if isinstance(uuid, str) and uuid.strip("0-") else None
