"""``python -m qemu_offload_handshake``: precheck, probe, decode, check, adjust-argv, demo.

Exit codes: 0 compatible, 1 blocked, 2 usage error (bad arguments, address, policy or input file),
3 adjustable, 4 unknown (a QEMU could not be read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import precheck, probe
from .decide import Mode, Verdict, decide
from .errors import HandshakeError, ProbeError, UsageError
from .model import VmReport
from .policy import Policy, load_policy
from .render import EXIT_CODES, report_json, verdict_json, verdict_table
from .wire import decode, encode

__all__ = ["main"]

EXIT_USAGE, EXIT_UNKNOWN = 2, 4


def _policy(args: argparse.Namespace) -> Policy:
    base = load_policy(args.policy) if args.policy else Policy()
    return base.merged(on=args.on or (), off=args.off or ())


def _key(args: argparse.Namespace) -> bytes | None:
    if not getattr(args, "key_file", None):
        return None
    try:
        key = Path(args.key_file).read_bytes().strip()
    except OSError as err:
        raise UsageError(f"key file {args.key_file}: {err.strerror or err}") from err
    if not key:
        raise UsageError(f"key file {args.key_file} is empty")
    return key


def _print_verdict(verdict: Verdict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(verdict_json(verdict), indent=2))
    else:
        print(verdict_table(verdict))
    return EXIT_CODES[verdict.verdict]


def _read_record(path: str, key: bytes | None) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror or err}") from err
    try:
        return decode(data, key=key)
    except HandshakeError as err:
        raise UsageError(f"{path}: {err}") from err


def _decision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (see README)")
    p.add_argument("--lenient", action="store_true",
                   help="compatible whenever the migration loads and the guest keeps what it negotiated")
    p.add_argument("--policy", metavar="FILE", help="TOML policy file ([properties] name = \"on\"|\"off\"|\"auto\")")
    p.add_argument("--on", action="append", metavar="PROP", help="policy: PROP must be offered on both sides")
    p.add_argument("--off", action="append", metavar="PROP", help="policy: PROP must be off on both sides")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qemu_offload_handshake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("precheck", help="probe both QEMUs over QMP and decide")
    p.add_argument("--source", required=True, metavar="ADDR", help="unix:/path, a path, or tcp:HOST:PORT")
    p.add_argument("--dest", required=True, metavar="ADDR")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="timeout of each QMP call (default 5)")
    _decision_args(p)
    p = sub.add_parser("probe", help="write one side's report in the wire format")
    p.add_argument("address", metavar="ADDR")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--host", help="host name to record (default: this machine's)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--key-file", metavar="FILE", help="sign the record with HMAC-SHA256 using this key")
    p = sub.add_parser("decode", help="print a wire-format file as JSON")
    p.add_argument("file")
    p.add_argument("--key-file", metavar="FILE", help="require a valid HMAC made with this key")
    p = sub.add_parser("check", help="decide offline from two report files")
    p.add_argument("source_file")
    p.add_argument("dest_file")
    p.add_argument("--key-file", metavar="FILE", help="require valid HMACs made with this key")
    _decision_args(p)
    p = sub.add_parser("adjust-argv", help="print a destination command line with the adjustments applied")
    p.add_argument("--adjustments", required=True, metavar="JSON",
                   help='{"net0": {"host_uso": "off"}} or a precheck --json output (file or text)')
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- followed by the QEMU command line")
    sub.add_parser("demo", help="start local QEMU pairs and show compatible, adjustable and blocked cases")
    return parser


def _adjustments(text: str) -> dict[str, dict[str, str]]:
    path = Path(text)
    try:
        raw = path.read_text() if not text.lstrip().startswith("{") and path.exists() else text
        data = json.loads(raw)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--adjustments: {err}") from err
    if isinstance(data, dict) and "adjustments" in data:
        data = data["adjustments"]
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and all(x in ("on", "off") for x in v.values()) for v in data.values()):
        raise UsageError('--adjustments must look like {"net0": {"host_uso": "off"}}')
    return data


def _run(args: argparse.Namespace) -> int:
    if args.command == "precheck":
        verdict = asyncio.run(precheck(args.source, args.dest, lenient=args.lenient, policy=_policy(args),
                                       timeout=args.timeout))
        return _print_verdict(verdict, args.json)
    if args.command == "probe":
        try:
            report = asyncio.run(probe(args.address, timeout=args.timeout, host=args.host or socket.gethostname()))
        except ProbeError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_UNKNOWN
        Path(args.out).write_bytes(encode(report, key=_key(args)))
        print(f"wrote {args.out}: {len(report.nics)} virtio-net device(s), {len(report.unreadable)} unreadable fact(s)")
        return 0
    if args.command == "decode":
        print(json.dumps(report_json(_read_record(args.file, _key(args))), indent=2))
        return 0
    if args.command == "check":
        key = _key(args)
        src, dst = _read_record(args.source_file, key), _read_record(args.dest_file, key)
        for name, record in ((args.source_file, src), (args.dest_file, dst)):
            if not isinstance(record, VmReport):
                raise UsageError(f"{name} is not a VM report")
        verdict = decide(src, dst, mode=Mode.LENIENT if args.lenient else Mode.STRICT, policy=_policy(args))
        return _print_verdict(verdict, args.json)
    if args.command == "adjust-argv":
        from .argv import apply_adjustments
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            raise UsageError("give the QEMU command line after --")
        print(json.dumps(apply_adjustments(argv, _adjustments(args.adjustments))))
        return 0
    if args.command == "demo":
        from .demo import run_demo
        return asyncio.run(run_demo())
    raise UsageError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except HandshakeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_UNKNOWN
    except KeyboardInterrupt:
        return 130
