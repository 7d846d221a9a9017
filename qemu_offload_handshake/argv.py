"""Rewrite a destination QEMU command line with the precheck's adjustments.

Handles ``-device driver,k=v,...`` (QEMU's option syntax: ``,,`` is a literal comma) and the JSON form
``-device {"driver": ..., "id": ...}``, with ``-device`` or ``--device``, as a separate argument or ``=``-joined.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .errors import UsageError

__all__ = ["apply_adjustments"]


def _split_opts(value: str) -> list[str]:
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                current += ",,"
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    return parts


def _rewrite(value: str, adjustments: Mapping[str, Mapping[str, str]], done: set[str]) -> str:
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as err:
            raise UsageError(f"-device {value!r}: not valid JSON: {err}") from err
        dev = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(dev, str) and dev in adjustments:
            done.add(dev)
            obj.update({k: v == "on" for k, v in adjustments[dev].items()})
            return json.dumps(obj, separators=(",", ":"))
        return value
    parts = _split_opts(value)
    ids = [p[3:] for p in parts[1:] if p.startswith("id=")]
    if not ids or ids[-1] not in adjustments:
        return value
    dev = ids[-1]
    done.add(dev)
    props = adjustments[dev]
    kept = [parts[0]] + [p for p in parts[1:] if p.split("=", 1)[0] not in props]
    return ",".join(kept + [f"{k}={v}" for k, v in props.items()])


def apply_adjustments(argv: Sequence[str], adjustments: Mapping[str, Mapping[str, str]]) -> list[str]:
    """A copy of ``argv`` with each adjusted device's properties set; ``UsageError`` if a device is not there."""
    out: list[str] = []
    done: set[str] = set()
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(_rewrite(arg, adjustments, done))
            expect_value = False
        elif arg in ("-device", "--device"):
            out.append(arg)
            expect_value = True
        elif arg.startswith(("-device=", "--device=")):
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={_rewrite(value, adjustments, done)}")
        else:
            out.append(arg)
    missing = sorted(set(adjustments) - done)
    if missing:
        raise UsageError(f"no -device with id {', '.join(missing)} in the command line; nothing was adjusted there")
    return out
