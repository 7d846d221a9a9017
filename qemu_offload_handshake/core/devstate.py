"""Device state beyond the feature bits: what else travels with a virtio-net device, and what a difference does.

Seen on real QEMU 10.0.2 with a booted guest, one difference at a time between two otherwise equal QEMUs (the
sources are QEMU 10.0/10.2's; errors are what the destination printed):

* The load fails (``LOAD``): the PCI config space QEMU compares on load (``hw/pci/pci.c``, ``get_pci_config_device``:
  "Bad config data") for ``vectors`` (MSI-X table size), ``multifunction``, ``disable-legacy``,
  ``disable-modern``, ``page-per-vq`` (BAR size), and behind a PCIe port ``ats`` / ``aer`` (on the root bus the
  device is plain PCI and they change nothing); the option ROM, a RAM block named after the device path
  (``romfile=""`` or ``rombar=0`` on one side: "Unknown ramblock", another size: "Size mismatch"); the netdev's
  queue pairs (``max_queue_pairs``, checked in ``hw/net/virtio-net.c``; some mismatches even crash the
  destination).
* The guest sees a change (``GUEST``): the ring sizes (``rx_queue_size``, ``tx_queue_size``: the rings keep the
  source's size until the guest resets the device), the ``host_mtu`` value, ``speed`` / ``duplex`` values and the
  ``mac`` (the source's stays until a device reset). Whether these features are offered at all is a feature bit,
  compared elsewhere.

``STATE_RULES`` is the table; ``compare_state`` applies it to two paired devices. Pure logic, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["BACKEND_STATE", "PROXY_STATE", "STATE_RULES", "Effect", "StateRule", "compare_state", "normalize"]


class Effect(enum.Enum):
    LOAD = "load"  # the destination refuses the load
    GUEST = "guest"  # the load works, the guest sees something else


@dataclass(frozen=True, slots=True)
class StateRule:
    name: str  # key in NicReport.state
    effect: Effect
    what: str  # for the sentence
    express_only: bool = False  # only matters behind a PCIe port (not on the root bus)


STATE_RULES: tuple[StateRule, ...] = (
    StateRule("queues", Effect.LOAD, "the netdev's queue pairs (max_queue_pairs)"),
    StateRule("vectors", Effect.LOAD, "the MSI-X vector count (PCI config space)"),
    StateRule("multifunction", Effect.LOAD, "multifunction (PCI header type)"),
    StateRule("disable-legacy", Effect.LOAD, "legacy virtio (PCI device id)"),
    StateRule("disable-modern", Effect.LOAD, "modern virtio (PCI capabilities)"),
    StateRule("page-per-vq", Effect.LOAD, "page-per-vq (BAR size)"),
    StateRule("rom", Effect.LOAD, "the option ROM (a RAM block: present or not, and its size)"),
    StateRule("ats", Effect.LOAD, "ATS (PCIe extended capability)", express_only=True),
    StateRule("aer", Effect.LOAD, "AER (PCIe extended capability)", express_only=True),
    StateRule("rx_queue_size", Effect.GUEST, "the receive ring size"),
    StateRule("tx_queue_size", Effect.GUEST, "the transmit ring size"),
    StateRule("host_mtu", Effect.GUEST, "the MTU the device reports"),
    StateRule("speed", Effect.GUEST, "the link speed the device reports"),
    StateRule("duplex", Effect.GUEST, "the duplex the device reports"),
    StateRule("mac", Effect.GUEST, "the MAC address"),
)
# Where each value is read: the PCI proxy (/machine/peripheral/ID) or the virtio-net device (.../virtio-backend).
PROXY_STATE = ("vectors", "multifunction", "disable-legacy", "disable-modern", "page-per-vq", "ats", "aer", "rombar",
               "romfile", "romsize")
BACKEND_STATE = ("rx_queue_size", "tx_queue_size", "host_mtu", "speed", "duplex", "mac")


def normalize(proxy: Mapping[str, object], backend: Mapping[str, object], queues: int | None) -> dict[str, str]:
    """The state values as comparable text, from what QEMU answered (types differ across versions: ``rombar`` is
    int32 -1 on 10.0 and 11.1 and uint32 1 on 7.2, both meaning a ROM BAR). A value QEMU did not give is left out."""
    out: dict[str, str] = {}
    for name, value in [*proxy.items(), *backend.items()]:
        if name in ("rombar", "romfile", "romsize"):
            continue
        if isinstance(value, bool):
            out[name] = "on" if value else "off"
        elif isinstance(value, (int, str)):
            out[name] = str(value)
    romfile, rombar, romsize = proxy.get("romfile"), proxy.get("rombar"), proxy.get("romsize")
    if isinstance(romfile, str) and isinstance(rombar, int) and not isinstance(rombar, bool):
        out["rom"] = f"size {romsize}" if romfile and rombar != 0 and isinstance(romsize, int) else "none"
    if queues is not None:
        out["queues"] = str(queues)
    return {k: v for k, v in out.items() if k in _NAMES}


_NAMES = {r.name for r in STATE_RULES}


def compare_state(src: Mapping[str, str], dst: Mapping[str, str], *,
                  express: bool) -> Iterator[tuple[StateRule, str | None, str | None]]:
    """(rule, source value, destination value) for every rule whose values differ or are missing on one side."""
    for rule in STATE_RULES:
        if rule.express_only and not express:
            continue
        a, b = src.get(rule.name), dst.get(rule.name)
        if a is None and b is None:
            continue
        if a != b:
            yield rule, a, b
