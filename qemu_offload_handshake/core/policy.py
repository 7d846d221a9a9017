"""Tri-state policy for offload properties: ON (must be offered on both sides), OFF (must be off on both; the
destination can be adjusted), AUTO (follow the source: the default for every property).

From command-line flags (``--on host_uso --off guest_ecn``) and/or a TOML file::

    [properties]
    host_uso = "off"
    csum = "on"
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import UsageError
from .features import BY_PROPERTY
from .model import Tri

__all__ = ["Policy", "parse_policy"]


@dataclass(frozen=True)
class Policy:
    properties: Mapping[str, Tri] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for prop, tri in self.properties.items():
            if prop not in BY_PROPERTY:
                known = ", ".join(sorted(BY_PROPERTY))
                raise UsageError(f"policy: unknown offload property {prop!r} (known: {known})")
            if not isinstance(tri, Tri) or tri is Tri.UNSET:
                raise UsageError(f"policy: {prop} must be on, off or auto")

    def merged(self, on: Iterable[str] = (), off: Iterable[str] = ()) -> Policy:
        props = dict(self.properties)
        for names, tri in ((on, Tri.ON), (off, Tri.OFF)):
            for name in names:
                props[name] = tri
        return Policy(props)


def parse_policy(text: str, *, where: str = "policy") -> Policy:
    """A policy from TOML text (the shell reads the file: ``cli``)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{where}: not valid TOML: {err}") from err
    unknown = set(data) - {"properties"}
    if unknown:
        raise UsageError(f"{where}: unknown section(s) {sorted(unknown)}; only [properties]")
    table = data.get("properties", {})
    if not isinstance(table, dict):
        raise UsageError(f"{where}: [properties] must be a table")
    props = {}
    for prop, value in table.items():
        if not isinstance(value, str) or value.lower() not in ("on", "off", "auto"):
            raise UsageError(f"{where}: {prop} = {value!r}: use \"on\", \"off\" or \"auto\"")
        props[prop] = Tri[value.upper()]
    try:
        return Policy(props)
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from None
