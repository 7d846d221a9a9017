"""Runs of host indexes, how a baseline (type 5) names the hosts of an entry and of its groups
(``docs/wire-format.md``): the leaf that reads and writes them, making them into hosts, and building them."""

from __future__ import annotations

import itertools
from bisect import bisect_left
from typing import Any

from . import wire_layout as wl
from .platform import MAX_BASELINE_HOSTS as MAX_HOSTS

__all__ = ["HostCount", "Runs", "grouped", "members", "runs"]

HostCount, _HostStep = wl.VarInt(MAX_HOSTS), wl.VarInt(MAX_HOSTS - 1)


class Runs(wl.Leaf):
    """Count, then per run of hosts a varint skip and a varint length - 1; read flat: (skip, length - 1, ...)."""

    def read(self, stream: Any) -> tuple[int, ...]:
        return tuple(_HostStep.read(stream) if i & 1 else HostCount.read(stream)  # skip first, then length - 1
                     for i in range(2 * HostCount.read(stream), 0, -1))

    def write(self, obj: list[int], stream: Any) -> list[int]:
        HostCount.write(len(obj) // 2, stream)
        for i, value in enumerate(obj):
            (_HostStep if i & 1 else HostCount).write(value, stream)
        return obj


def members(flat: tuple[int, ...], everyone: tuple[int, ...], within: tuple[int, ...] | None, inside: bool,
            what: str, *where: str | int) -> tuple[int, ...]:
    """The hosts of runs ``flat``, all ``within`` (``inside``) or none: slices of ``everyone`` (their ints shared)."""
    parts, pos = [], 0
    for skip, length in zip(flat[::2], flat[1::2], strict=True):
        start = pos + skip
        if (pos := start + 1 + length) > len(everyone):
            raise wl.FieldError(f"malformed body: a run ends past the {len(everyone)} hosts", *where)
        at = 0 if within is None else bisect_left(within, start)
        if within is not None and (not (at + pos - start <= len(within) and within[at + pos - start - 1] == pos - 1
                                        and within[at] == start) if inside else at != bisect_left(within, pos)):
            raise wl.FieldError(f"malformed body: hosts {start}-{pos - 1} are {'not all ' if inside else ''}{what}",
                                *where)
        parts.append(everyone[start:pos])
        pos += 1
    return parts[0] if len(parts) == 1 else tuple(itertools.chain.from_iterable(parts))


def runs(hosts: Any) -> list[int]:
    """Runs of consecutive hosts (sorted): each starts ``skip`` hosts after the host after the previous run."""
    out, pos = list[int](), 0
    for _, group in itertools.groupby(enumerate(hosts), lambda item: item[1] - item[0]):
        run = [host for _, host in group]
        out += (run[0] - pos, len(run) - 1)
        pos = run[-1] + 2
    return out


def grouped(items: tuple[tuple[int, Any], ...], value: Any) -> list[dict[str, Any]]:
    """(host, x) pairs as groups of the hosts with the same ``value(host, x)``, in increasing order of it."""
    groups: dict[Any, list[int]] = {}
    for host, x in items:
        groups.setdefault(value(host, x), []).append(host)
    return [{"value": key, "hosts": runs(groups[key])} for key in sorted(groups)]
