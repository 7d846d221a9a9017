"""Rewrite a destination QEMU command line with the precheck's adjustments (``{"net0": {"host_uso": "off"}}``).

What is rewritten, and why (QEMU's source as cited; each case also checked against QEMU 10.0 with ``qom-get``):

* ``-device driver,k=v,...`` is read as QEMU's option parser reads it (``util/qemu-option.c``,
  ``get_opt_name_value`` and ``get_opt_value``): ``,,`` inside a value is a literal comma, a bare ``name`` means
  ``name=on`` and ``noname`` means ``name=off`` (deprecated short forms), a comma at the very end ends the list and
  means nothing, and the device's id is its *first* ``id=`` (``opts_parse_id``). Each adjusted property's own
  settings are removed and ``prop=on|off`` is appended; every other option is kept as written. A trailing comma is
  dropped, so that the appended option cannot turn into an escaped comma inside the previous value.
* ``-device {"driver": ..., "id": ...}`` (JSON: QEMU takes an argument that starts with ``{`` as JSON,
  ``system/vl.c``): the properties are set as JSON booleans, the type a JSON ``-device`` needs.
* ``-set device.ID.PROP=VALUE`` for an adjusted device and property is rewritten to the adjusted value. ``-set``
  appends to that ``-device``'s options (``system/vl.c``, ``qemu_set_option`` -> ``qemu_opt_set``) and the last
  setting of a name wins (``qemu_opts_to_qdict``), so left alone it would undo the adjustment. A
  ``-set device.ID.id=...`` for an adjusted device would rename it (the ``id`` option overrides the device's id in
  ``qemu_opts_to_qdict``), so it is refused.
* ``-global DRIVER.PROP=VALUE`` and ``-global driver=...,property=...,value=...`` (``virtio-net-pci``,
  ``virtio-net-device`` or any other driver) are left as they are: global properties are applied when the device
  object is created (``hw/core/qdev.c``, ``device_post_init`` -> ``qdev_prop_set_globals``), and only then does
  ``qdev_device_add_from_qdict`` (``system/qdev-monitor.c``) set the ``-device``'s own properties, so the property
  written into the ``-device`` here always wins over a ``-global``. (For ``virtio-net-pci`` the properties are
  aliases of its inner ``virtio-net-device``, whose globals are applied even earlier, while the proxy is
  initialised.) Rewriting the ``-global`` instead would change every other device of that driver.

Refused with ``UsageError``, before anything is rewritten: a property that is not a virtio-net feature property of
the catalogue (``features.BY_PROPERTY``; e.g. ``id``, or ``netdev=x,romfile=/y,host_uso``), a value other than
``"on"`` or ``"off"``, a device key that is not a plain QEMU id (letters, digits, ``-``, ``.`` and ``_``, starting
with a letter: ``util/id.c``, ``id_wellformed``), a device that has no id (the precheck names it by its QOM path,
e.g. ``/machine/peripheral-anon/device[0]``; a command line can only address a device by its id), and an adjusted
device that is not on the command line, is there twice or is not a virtio-net device.

Not seen: devices and settings that come from a ``-readconfig`` file.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence

from .errors import UsageError
from .features import BY_PROPERTY

__all__ = ["apply_adjustments", "check_adjustments", "split_options"]

_PLAIN_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
_SET = re.compile(r"([^.]+)\.([^.]+)\.([^=]+)=(.*)", re.DOTALL)  # sscanf "%[^.].%[^.].%[^=]" then '='
_VIRTIO_NET = re.compile(r"virtio-net[a-z0-9-]*")  # -pci, -pci-(non-)transitional, -device, -ccw, the alias
_VALUES = ("on", "off")


def check_adjustments(adjustments: object) -> dict[str, dict[str, str]]:
    """``adjustments`` as a plain dict once every device id, property and value is one this module can write;
    ``UsageError`` naming the first bad one otherwise."""
    if not isinstance(adjustments, Mapping):
        raise UsageError('adjustments must map device ids to properties, e.g. {"net0": {"host_uso": "off"}}')
    checked: dict[str, dict[str, str]] = {}
    for dev, props in adjustments.items():
        if not isinstance(dev, str) or not dev:
            raise UsageError(f"adjustments: {dev!r} is not a device id")
        if dev.startswith("/"):
            raise UsageError(f"adjustments: device {dev} has no id, and a command line can only adjust a device by "
                             f"its id: add id=NAME to its -device (on both sides) and run the precheck again")
        if not _PLAIN_ID.fullmatch(dev):
            raise UsageError(f"adjustments: {dev!r} is not a plain device id (letters, digits, '-', '.', '_', "
                             f"starting with a letter)")
        if not isinstance(props, Mapping):
            raise UsageError(f'adjustments for {dev}: {props!r} is not a map of properties like {{"host_uso": "off"}}')
        checked[dev] = {}
        for prop, value in props.items():
            if prop not in BY_PROPERTY:
                close = difflib.get_close_matches(str(prop), list(BY_PROPERTY), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UsageError(f"adjustments for {dev}: {prop!r} is not a virtio-net feature property{hint}")
            if value not in _VALUES:
                raise UsageError(f'adjustments for {dev}: {prop} = {value!r}: use "on" or "off"')
            checked[dev][prop] = value
    return checked


def _opt_value(s: str, p: int) -> tuple[str, int]:
    """QEMU's ``get_opt_value``: the value starting at ``p`` (``,,`` is a literal comma) and where it ends."""
    parts = []
    while True:
        end = s.find(",", p)
        if end < 0:
            parts.append(s[p:])
            return "".join(parts), len(s)
        if s[end + 1:end + 2] != ",":
            parts.append(s[p:end])
            return "".join(parts), end
        parts.append(s[p:end + 1])
        p = end + 2


def split_options(s: str, firstname: str | None = "driver") -> list[tuple[str, str, str]]:
    """``(name, value, text as written)`` for each option of a QEMU option string, as ``opts_do_parse`` reads it
    (``firstname`` names a first option given without ``name=``; ``None`` reads it as ``opts_parse_id`` does)."""
    options = []
    p = 0
    while p < len(s):
        start = p
        end = min((i for i in (s.find("=", p), s.find(",", p)) if i >= 0), default=len(s))
        if end == len(s) or s[end] == ",":
            if firstname is not None:
                name = firstname
                value, p = _opt_value(s, p)
            else:  # a flag: "name" is name=on, "noname" is name=off
                name, p = s[p:end], end
                name, value = (name[2:], "off") if name.startswith("no") else (name, "on")
        else:
            name = s[p:end]
            value, p = _opt_value(s, end + 1)
        options.append((name, value, s[start:p]))
        p += 1  # the comma after the option (or past the end)
        firstname = None
    return options


def _device_id(s: str) -> str | None:
    return next((value for name, value, _ in split_options(s, None) if name == "id"), None)


def _check_driver(dev: str, driver: object, arg: str) -> None:
    if not isinstance(driver, str) or not _VIRTIO_NET.fullmatch(driver):
        what = f"driver {driver!r}" if isinstance(driver, str) and driver else "no driver"
        raise UsageError(f"-device {arg}: device {dev} has {what}, not a virtio-net one, so the adjustments for "
                         f"{dev} cannot be meant for it")


def _rewrite_device(arg: str, adjustments: Mapping[str, Mapping[str, str]], seen: list[str]) -> str:
    if arg.startswith("{"):
        try:
            obj = json.loads(arg)
        except (json.JSONDecodeError, RecursionError) as err:
            raise UsageError(f"-device {arg}: not valid JSON: {err}") from err
        dev = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(dev, str) or dev not in adjustments:
            return arg
        seen.append(dev)
        _check_driver(dev, obj.get("driver"), arg)
        obj.update({prop: value == "on" for prop, value in adjustments[dev].items()})
        return json.dumps(obj, separators=(",", ":"))
    dev = _device_id(arg)
    if dev is None or dev not in adjustments:
        return arg
    seen.append(dev)
    options = split_options(arg)
    _check_driver(dev, next((v for n, v, _ in reversed(options) if n == "driver"), None), arg)
    props = adjustments[dev]
    kept = [text for name, _, text in options if name not in props]
    return ",".join(kept + [f"{prop}={value}" for prop, value in props.items()])


def _rewrite_set(arg: str, adjustments: Mapping[str, Mapping[str, str]]) -> str:
    match = _SET.fullmatch(arg)
    if not match or match[1] != "device" or match[2] not in adjustments:
        return arg
    group, dev, prop, _ = match.groups()
    if prop == "id":
        raise UsageError(f"-set {arg} renames device {dev}, which has adjustments; give the device its final id in "
                         f"its -device instead")
    if prop in adjustments[dev]:
        return f"{group}.{dev}.{prop}={adjustments[dev][prop]}"
    return arg


def apply_adjustments(argv: Sequence[str], adjustments: Mapping[str, Mapping[str, str]]) -> list[str]:
    """A copy of ``argv`` (a QEMU command line) with each adjusted device's properties set; ``UsageError`` for
    anything that cannot be adjusted safely (see the module's docstring)."""
    checked = check_adjustments(adjustments)
    rewriters = {"device": lambda a: _rewrite_device(a, checked, seen), "set": lambda a: _rewrite_set(a, checked)}
    out: list[str] = []
    seen: list[str] = []
    pending: str | None = None  # the option whose argument comes next
    for arg in argv:
        if pending is not None:
            out.append(rewriters[pending](arg))
            pending = None
            continue
        flag, eq, value = arg.partition("=")
        option = flag[2:] if flag.startswith("--") else flag[1:] if flag.startswith("-") else ""
        if option in rewriters and eq:
            out.append(f"{flag}={rewriters[option](value)}")
        elif option in rewriters and not eq:
            out.append(arg)
            pending = option
        else:
            out.append(arg)
    twice = sorted({dev for dev in seen if seen.count(dev) > 1})
    if twice:
        raise UsageError(f"more than one -device with id {', '.join(twice)} in the command line")
    missing = sorted(set(checked) - set(seen))
    if missing:
        raise UsageError(f"no -device with id {', '.join(missing)} in the command line; nothing was adjusted there")
    return out
