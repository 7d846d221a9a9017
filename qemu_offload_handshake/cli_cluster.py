"""The cluster commands of the CLI: ``dump-host``, ``baseline``, ``check-host`` (and reading dumps for
``precheck --dest-dump``). Exit codes as the rest of the CLI: 0 done / joins, 1 narrows or cannot join (or a VM
could not migrate to the new host), 2 bad input, 4 nothing could be probed."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from .core.baseline import check_host, merge
from .core.decide import Mode
from .core.errors import HandshakeError, ScratchError, UsageError
from .core.model import VmReport
from .core.platform import Baseline, HostDump
from .core.policy import Policy
from .core.predict import decide_from_dump
from .core.wire import decode, encode
from .render_platform import CHECK_EXIT, baseline_json, baseline_text, check_json, check_text, dump_json, dump_text

__all__ = ["add_parsers", "read_dump", "run"]

COMMANDS = ("dump-host", "baseline", "check-host")
_KINDS = {VmReport: "a VM report", HostDump: "a host dump", Baseline: "a baseline"}


def add_parsers(sub: Any, host: Any, timeout: Any) -> None:
    p = sub.add_parser("dump-host", help="record what this host's QEMU and kernel can offer (scratch QEMUs)")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--qemu", metavar="BINARY", help="the QEMU binary (default: qemu-system-x86_64 on PATH)")
    p.add_argument("--machine", action="append", metavar="TYPE",
                   help="a machine type to dump (repeatable; default: the QEMU's default machine type)")
    p.add_argument("--backend", action="append", metavar="KIND", choices=("tap", "tap-vhost", "user"),
                   help="a backend kind (repeatable; default: tap and tap-vhost)")
    p.add_argument("--host", type=host, help="host name to record (default: this machine's)")
    p.add_argument("--key-file", metavar="FILE", help="sign the dump with HMAC-SHA256 using this key")
    p.add_argument("--timeout", type=timeout, default=20.0, metavar="S",
                   help="deadline for each scratch QEMU (default 20)")
    p.add_argument("--json", action="store_true", help="print the dump as JSON")
    p = sub.add_parser("baseline", help="AND-merge host dumps into a cluster baseline and its compat profile")
    p.add_argument("dumps", nargs="+", metavar="DUMP")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--key-file", metavar="FILE", help="require signed dumps and sign the baseline with this key")
    p.add_argument("--json", action="store_true", help="print the baseline as JSON")
    p = sub.add_parser("check-host", help="check a new host's dump against the cluster baseline")
    p.add_argument("dump", metavar="DUMP")
    p.add_argument("--baseline", required=True, metavar="FILE")
    p.add_argument("--vm", action="append", metavar="REPORT",
                   help="a VM report (from probe) of a running VM: name it if it could not migrate to the host")
    p.add_argument("--key-file", metavar="FILE", help="require valid HMACs made with this key")
    p.add_argument("--lenient", action="store_true", help="decide the VMs in lenient mode")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _read(path: str, key: bytes | None, want: type) -> Any:
    from .cli import _read_bytes
    data = _read_bytes(path, "input file")
    try:
        record = decode(data, key=key)
    except HandshakeError as err:
        raise UsageError(f"{path}: {err}") from err
    if not isinstance(record, want):
        raise UsageError(f"{path} is {_KINDS.get(type(record), 'another record')}, not {_KINDS[want]}")
    return record


def read_dump(path: str, key: bytes | None) -> HostDump:
    dump: HostDump = _read(path, key, HostDump)
    return dump


def _write(out: str, data: bytes) -> None:
    try:
        Path(out).write_bytes(data)
    except OSError as err:
        raise UsageError(f"--out {out}: {err.strerror or err}") from err


def _print(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2))


def run(args: argparse.Namespace) -> int:
    from .cli import _check_out, _key
    key = _key(args)
    if args.command == "dump-host":
        _check_out(args.out)
        from .dump import dump_host
        try:
            dump = asyncio.run(dump_host(args.qemu, machines=tuple(args.machine or ()),
                                         backends=tuple(args.backend) if args.backend else None, host=args.host,
                                         timeout=args.timeout))
        except ScratchError as err:  # raised only when that QEMU cannot be run at all: the --qemu given is wrong
            raise UsageError(f"--qemu {args.qemu or 'qemu-system-x86_64'}: {err}") from err
        _write(args.out, encode(dump, key=key))
        _print(dump_json(dump)) if args.json else print(dump_text(dump, args.out))
        return 0 if any(m.offers for m in dump.machines) else 4
    if args.command == "baseline":
        _check_out(args.out)
        dumps = [read_dump(path, key) for path in args.dumps]
        merged = merge(dumps, made_at=int(time.time()))
        _write(args.out, encode(merged, key=key))
        _print(baseline_json(merged)) if args.json else print(baseline_text(merged, args.out))
        return 0
    if args.command == "check-host":
        dump = read_dump(args.dump, key)
        baseline: Baseline = _read(args.baseline, key, Baseline)
        vms: list[VmReport] = [_read(path, key, VmReport) for path in args.vm or ()]
        result = check_host(baseline, dump, made_at=int(time.time()))
        mode = Mode.LENIENT if args.lenient else Mode.STRICT
        verdicts = [decide_from_dump(vm, dump, mode=mode, policy=Policy()) for vm in vms]
        _print(check_json(result, verdicts)) if args.json else print(check_text(result, verdicts))
        code = CHECK_EXIT[result.outcome]
        return code or (1 if any(v.verdict in ("blocked", "unknown") for v in verdicts) else 0)
    raise UsageError(f"unknown command {args.command}")
