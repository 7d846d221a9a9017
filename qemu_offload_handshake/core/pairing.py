"""Pairing devices as QEMU pairs their migrated state (by device path), and the device state beyond the feature
bits (``devstate``). Pure logic, filling a ``verdict.Collector``."""

from __future__ import annotations

from .devstate import Effect, compare_state
from .model import NicReport
from .verdict import Collector

__all__ = ["pair_devices", "state_checks"]

_ANON = "/machine/peripheral-anon/"




def state_checks(c: Collector, key: str, src: NicReport, dst: NicReport) -> None:
    """Device state beyond the feature bits (``devstate.STATE_RULES``)."""
    empty = [side for side, nic in (("source", src), ("destination", dst)) if not nic.state]
    if empty:
        c.add(key, "state-unknown",
              f"the device state beyond features (MSI-X vectors, queues, option ROM, ring sizes, MTU, MAC) of the "
              f"{' and '.join(empty)} could not be read; a difference there can fail the load.")
        return
    express = (src.dev_path or "").count(":") > 2 or (dst.dev_path or "").count(":") > 2  # behind a port
    for rule, a, b in compare_state(dict(src.state), dict(dst.state), express=express):
        if a is None or b is None:
            c.add(key, "state-unknown",
                  f"{rule.what} could not be read on the {'source' if a is None else 'destination'}.",
                  source=a, dest=b)
        elif rule.effect is Effect.LOAD:
            c.add(key, "state-differs",
                  f"{rule.what} differs ({rule.name}: {a} vs {b}): QEMU will refuse to load the device state.",
                  source=a, dest=b)
        else:
            c.add(key, "config-differs",
                  f"{rule.what} differs ({rule.name}: {a} vs {b}): the load works, but the guest sees the "
                  "destination's value "
                  "(at once, or after its next device reset): an ABI change.", source=a, dest=b)


def pair_devices(c: Collector, sources: tuple[NicReport, ...],
          dests: tuple[NicReport, ...]) -> list[tuple[NicReport | None, NicReport | None]]:
    """Pair devices as QEMU pairs their migrated state: by device path (``qdev_get_dev_path``, e.g.
    ``0000:00:04.0``; ``migration/savevm.c`` files each device's state under it, not under its id). Where a path
    is missing on either side, by id, and the pairing itself is then unknown."""
    pairs: list[tuple[NicReport | None, NicReport | None]] = []
    if all(n.dev_path for n in sources + dests):
        by_path = {n.dev_path: n for n in dests}
        by_key = {n.key: n for n in dests}
        for src in sources:
            dst = by_path.pop(src.dev_path, None)
            pairs.append((src, dst))
            if dst is None:
                _absent(c, src.key, "destination", f"at {src.dev_path}")
            elif dst.key != src.key and not (src.key.startswith(_ANON) and dst.key.startswith(_ANON)):
                other = by_key.get(src.key)
                if other is not None:
                    c.add(src.key, "device-moved",
                          f"{src.key} is at {src.dev_path} on the source and at {other.dev_path} on the destination:"
                          f" QEMU loads its state into the destination's device at {src.dev_path}, {dst.key}, and "
                          f"compares it with that one; adjustments name {dst.key}.", source=src.dev_path,
                          dest=other.dev_path)
                else:
                    c.add(src.key, "device-renamed",
                          f"the device at {src.dev_path} is {src.key} on the source and {dst.key} on the destination:"
                          f" QEMU pairs them by slot; adjustments name {dst.key}.", source=src.key, dest=dst.key)
        pairs += [(None, dst) for dst in by_path.values()]
        for dst in by_path.values():
            _absent(c, dst.key, "source", f"at {dst.dev_path}")
        return pairs
    missing = [n.key for n in sources + dests if not n.dev_path]
    c.add("", "device-path-unknown",
          f"the device path of {', '.join(dict.fromkeys(missing))} could not be read, so which device QEMU pairs "
          "with which cannot be told (it pairs them by PCI slot, not by id); compared by id.")
    keys = {n.key: n for n in dests}
    for src in sources:
        dst = keys.pop(src.key, None)
        pairs.append((src, dst))
        if dst is None:
            _absent(c, src.key, "destination", "")
    for dst in keys.values():
        pairs.append((None, dst))
        _absent(c, dst.key, "source", "")
    return pairs


def _absent(c: Collector, key: str, lacking: str, where: str) -> None:
    place = f" ({where})" if where else ""
    if lacking == "destination":
        c.add(key, "device-missing",
              f"the destination has no such virtio-net device{place}: the load would fail.", source="present",
              dest="absent")
    else:
        c.add(key, "device-extra",
              f"only the destination has this virtio-net device{place}: the load would fail.", source="absent",
              dest="present")


