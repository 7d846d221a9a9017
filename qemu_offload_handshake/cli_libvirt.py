"""libvirt on the command line: ``install-libvirt-hook`` (and ``--uninstall``) on a destination host.

The hook is a small ``/bin/sh`` script in libvirt's ``hooks/qemu.d/`` that passes every operation but
``migrate begin`` without starting Python, and runs ``python -m qemu_offload_handshake.libvirt_hook`` for that one
with its configuration file (TOML, see ``libvirt_hook``). libvirt reads its hook folder when its daemon starts:
restart it after installing or removing the hook."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from .core.errors import UsageError

__all__ = ["COMMANDS", "add_parsers", "hook_script", "run"]

COMMANDS = ("install-libvirt-hook", "libvirt-annotate")
HOOK_NAME = "qemu-offload-handshake"
MARK = "# qemu-offload-handshake: libvirt qemu hook"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("libvirt-annotate", help="probe a libvirt domain (read-only, through libvirt) and store its "
                                                "report in the domain's metadata, for the destination's hook")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--connect", default="qemu:///system", metavar="URI", help="libvirt connection URI")
    p.add_argument("--key-file", metavar="FILE", help="sign the report with HMAC-SHA256 using this key")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="timeout of each QMP call (default 5)")
    p = sub.add_parser("install-libvirt-hook", help="install the migrate hook for libvirt on this (destination) host")
    p.add_argument("--hooks-dir", default="/etc/libvirt/hooks", metavar="DIR",
                   help="libvirt's hook folder (default /etc/libvirt/hooks; the script goes in DIR/qemu.d/)")
    p.add_argument("--config", default="/etc/qemu-offload-handshake/hook.toml", metavar="FILE",
                   help="where the hook's configuration is written")
    p.add_argument("--require", action="store_true", help="refuse a domain without an offload report")
    p.add_argument("--lenient", action="store_true", help="decide in lenient mode")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="BINARY", help="this host's QEMU (scratch QEMUs)")
    p.add_argument("--dump", metavar="FILE", help="this host's dump, used when no scratch QEMU can be made")
    p.add_argument("--key-file", metavar="FILE", help="reports and dumps must be HMAC-signed with this key")
    p.add_argument("--uninstall", action="store_true", help="remove the hook (and its configuration)")


def hook_script(config: str, python: str | None = None) -> str:
    return "\n".join([
        "#!/bin/sh", MARK + " (install-libvirt-hook; remove with install-libvirt-hook --uninstall)",
        '[ "$2" = migrate ] && [ "$3" = begin ] || exit 0  # every other operation: untouched, at once',
        f"QOH_HOOK_CONFIG={shlex.quote(config)} exec {shlex.quote(python or sys.executable)} "
        '-m qemu_offload_handshake.libvirt_hook "$@"', ""])


def _toml(values: dict[str, object]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())  # JSON strings and bools are TOML


def run(args: argparse.Namespace, key: Any = None) -> int:
    if args.command == "libvirt-annotate":
        import asyncio

        from .qmp_libvirt import annotate
        data = asyncio.run(annotate(args.domain, uri=args.connect, key=key(args) if key else None,
                                    timeout=args.timeout))
        print(f"stored a report of {len(data)} bytes in the metadata of {args.domain}")
        return 0
    folder = Path(args.hooks_dir) / "qemu.d"
    script, config = folder / HOOK_NAME, Path(args.config)
    if args.uninstall:
        removed = []
        for path in (script, config):
            if path.exists():
                if path == script and MARK not in path.read_text(errors="replace"):
                    raise UsageError(f"{path} is not this tool's hook; left alone")
                path.unlink()
                removed.append(str(path))
        print(f"removed {', '.join(removed) or 'nothing (not installed)'}; restart libvirt's daemon")
        return 0
    for given, what in ((args.dump, "--dump"), (args.key_file, "--key-file")):
        if given and not Path(given).is_file():
            raise UsageError(f"{what} {given}: no such file")
    values: dict[str, object] = {"require": args.require, "lenient": args.lenient, "qemu": args.qemu}
    if args.dump:
        values["dump"] = str(Path(args.dump).resolve())
    if args.key_file:
        values["key_file"] = str(Path(args.key_file).resolve())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(_toml(values))
        script.write_text(hook_script(str(config.resolve())))
        script.chmod(0o755)
    except OSError as err:
        raise UsageError(f"cannot install the hook: {err}") from err
    print(f"installed {script} (configuration {config}); restart libvirt's daemon so that it sees the hook")
    return 0
