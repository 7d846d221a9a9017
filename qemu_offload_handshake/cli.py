"""``python -m qemu_offload_handshake``: precheck, probe, decode, check, adjust-argv, dump-host, baseline,
check-host, handshake, answer, serve, migrate, install-libvirt-hook, demo.

Exit codes: 0 compatible, 1 blocked, 2 usage error (bad arguments, address, policy or input file),
3 adjustable, 4 unknown (a QEMU could not be read).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import cli_cluster, cli_handshake, cli_libvirt, cli_migrate
from .api import precheck, probe
from .core.argv import apply_adjustments, check_adjustments
from .core.decide import Mode, Verdict, decide, different_vms, report_warnings, with_warnings
from .core.errors import HandshakeError, ProbeError, UsageError
from .core.model import MAX_STRING_BYTES, VmReport
from .core.policy import Policy, parse_policy
from .core.wire import decode, encode
from .render import EXIT_CODES, report_json, verdict_json, verdict_table

__all__ = ["main"]

EXIT_USAGE, EXIT_UNKNOWN = 2, 4
DEFAULT_MAX_AGE = 600  # seconds: a report for a migration about to start should be minutes old, not hours


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, like every other usage error (argparse would print the whole usage first)."""
        self.exit(EXIT_USAGE, f"error: {message} (see: {self.prog} --help)\n")


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, not {text!r}")
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _host(text: str) -> str:
    """``--host``: recorded in the report, so it must be text the wire format can hold."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8 text") from None
    if not text or size > MAX_STRING_BYTES:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_STRING_BYTES} bytes of text, not {size}")
    return text


def _read_bytes(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise UsageError(f"{what} {path}: {err.strerror or err}") from err


def _utf8(data: bytes, path: str, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
                         ) from None


def load_policy(path: str) -> Policy:
    """Read a TOML policy file (the core parses it: ``core.policy.parse_policy``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"policy file {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise UsageError(f"policy file {path}: not valid TOML: {err}") from err
    return parse_policy(text, where=f"policy file {path}")


def _policy(args: argparse.Namespace) -> Policy:
    base = load_policy(args.policy) if args.policy else Policy()
    return base.merged(on=args.on or (), off=args.off or ())


def _key(args: argparse.Namespace) -> bytes | None:
    """The key in ``--key-file``: UTF-8 text, without surrounding whitespace (a trailing newline is not part of it)."""
    if not getattr(args, "key_file", None):
        return None
    data = _read_bytes(args.key_file, "key file")
    _utf8(data, args.key_file, "key file")
    key = data.strip()
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
    data = _read_bytes(path, "report file")
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
    parser = _Parser(prog="python -m qemu_offload_handshake", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("precheck", help="probe both QEMUs over QMP and decide")
    p.add_argument("--source", required=True, metavar="ADDR", help="unix:/path, a path, or tcp:HOST:PORT")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--dest", metavar="ADDR", help="the destination QEMU's QMP address")
    dest.add_argument("--dest-dump", metavar="FILE",
                      help="no destination QEMU yet: predict it from its host's dump (dump-host)")
    p.add_argument("--key-file", metavar="FILE", help="with --dest-dump: require a valid HMAC made with this key")
    p.add_argument("--timeout", type=_timeout, default=5.0, metavar="S",
                   help="timeout of each QMP call (default 5)")
    _decision_args(p)
    p = sub.add_parser("probe", help="write one side's report in the wire format")
    p.add_argument("address", metavar="ADDR")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--host", type=_host, help="host name to record (default: this machine's)")
    p.add_argument("--timeout", type=_timeout, default=5.0, metavar="S")
    p.add_argument("--key-file", metavar="FILE",
                   help="sign the record with HMAC-SHA256 using this key (a text file)")
    p.add_argument("--side", choices=("source", "dest"), help="record which side of a migration this VM is")
    p = sub.add_parser("decode", help="print a wire-format file as JSON")
    p.add_argument("file")
    p.add_argument("--key-file", metavar="FILE", help="require a valid HMAC made with this key")
    p = sub.add_parser("check", help="decide offline from two report files")
    p.add_argument("source_file")
    p.add_argument("dest_file")
    p.add_argument("--key-file", metavar="FILE", help="require valid HMACs made with this key")
    p.add_argument("--max-age", type=_seconds, default=DEFAULT_MAX_AGE, metavar="S",
                   help=f"warn about a report older than S seconds (default {DEFAULT_MAX_AGE})")
    p.add_argument("--allow-different-vms", action="store_true",
                   help="compare reports whose VM UUID or name differ (refused by default)")
    _decision_args(p)
    p = sub.add_parser("adjust-argv", help="print a destination command line with the adjustments applied")
    p.add_argument("--adjustments", required=True, metavar="JSON",
                   help='{"net0": {"host_uso": "off"}} or a precheck --json output (file or text); a blocked '
                        'or unknown verdict exits 1 or 4 with its reasons')
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- followed by the QEMU command line")
    cli_cluster.add_parsers(sub, _host, _timeout)
    cli_handshake.add_parsers(sub, _host, _timeout, _decision_args)
    cli_migrate.add_parser(sub, _timeout, _decision_args)
    cli_libvirt.add_parsers(sub)
    sub.add_parser("demo", help="start local QEMU pairs and show compatible, adjustable and blocked cases")
    return parser


class _Refused(Exception):
    """The adjustments come from a precheck whose verdict cannot be adjusted: exit with that verdict's code."""

    def __init__(self, verdict: str, message: str) -> None:
        super().__init__(message)
        self.code = EXIT_CODES[verdict]


def _reasons(data: dict[str, Any], severities: tuple[str, ...]) -> list[str]:
    """The ``why`` of each finding of a precheck's JSON with one of ``severities``, once each."""
    found: list[tuple[str, Any]] = [("", f) for f in data.get("findings") or () if isinstance(f, dict)]
    for device in data.get("devices") or ():
        if isinstance(device, dict):
            found += [(str(device.get("id", "")), f) for f in device.get("findings") or () if isinstance(f, dict)]
    reasons: list[str] = []
    for dev, finding in found:
        if finding.get("severity") in severities and isinstance(finding.get("why"), str):
            reason = f"{dev}: {finding['why']}" if dev else finding["why"]
            if reason not in reasons:
                reasons.append(reason)
    return reasons


def _adjustments(text: str) -> dict[str, dict[str, str]]:
    """``--adjustments``: JSON text or a file, holding the adjustments themselves or a precheck's ``--json`` output
    (recognised by its ``verdict``)."""
    if text.lstrip()[:1] in ("{", "["):
        where, raw = "--adjustments", text
    else:
        where, raw = f"--adjustments file {text}", _utf8(_read_bytes(text, "--adjustments file"), text,
                                                         "--adjustments file")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON: {err}") from None
    except RecursionError:
        raise UsageError(f"{where}: not valid JSON: nested too deeply") from None
    if isinstance(data, dict) and "verdict" in data:
        verdict = data["verdict"]
        if verdict in ("blocked", "unknown"):
            severities = ("blocker",) if verdict == "blocked" else ("blocker", "unknown")
            reasons = "; ".join(_reasons(data, severities)) or "the precheck gives no reason"
            raise _Refused(verdict, f"the precheck's verdict is {verdict}, so no adjustment makes the destination "
                                    f"compatible: {reasons}")
        if verdict not in ("compatible", "adjustable"):
            raise UsageError(f"{where}: unknown verdict {verdict!r} (compatible, adjustable, blocked or unknown)")
        data = data.get("adjustments", {})
    elif (isinstance(data, dict) and set(data) == {"adjustments"} and isinstance(data["adjustments"], dict)
          and all(isinstance(v, dict) for v in data["adjustments"].values())):
        data = data["adjustments"]
    try:
        return check_adjustments(data)
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from None


def _check_out(out: str) -> None:
    """Refuse an output file that cannot be written, before anything is probed."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: folder {folder} is not writable")


def _run(args: argparse.Namespace) -> int:
    if args.command == "precheck":
        key = _key(args)
        dump = cli_cluster.read_dump(args.dest_dump, key) if args.dest_dump else None
        verdict = asyncio.run(precheck(args.source, args.dest, dest_dump=dump, lenient=args.lenient,
                                       policy=_policy(args), timeout=args.timeout))
        if dump is not None and key is None:
            verdict = with_warnings(verdict, [("report-unsigned", f"the dump {args.dest_dump} was not "
                                                                  "HMAC-verified (no --key-file)")])
        return _print_verdict(verdict, args.json)
    if args.command in cli_cluster.COMMANDS:
        return cli_cluster.run(args)
    if args.command in cli_libvirt.COMMANDS:
        return cli_libvirt.run(args, key=_key)
    if args.command == "migrate":
        return cli_migrate.run(args, policy=_policy, key=_key)
    if args.command in cli_handshake.COMMANDS:
        return cli_handshake.run(args, policy=_policy, print_verdict=_print_verdict, read_dump=cli_cluster.read_dump,
                                 key=_key)
    if args.command == "probe":
        key = _key(args)  # a bad key or output file never costs a probe
        _check_out(args.out)
        try:
            report = asyncio.run(probe(args.address, timeout=args.timeout, host=args.host or socket.gethostname(),
                                       side=args.side))
        except ProbeError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_UNKNOWN
        data = encode(report, key=key)
        try:
            Path(args.out).write_bytes(data)
        except OSError as err:
            raise UsageError(f"--out {args.out}: {err.strerror or err}") from err
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
        problem = different_vms(src, dst)
        if problem and not args.allow_different_vms:
            raise UsageError(f"{problem}; pass --allow-different-vms to compare them anyway")
        verdict = decide(src, dst, mode=Mode.LENIENT if args.lenient else Mode.STRICT, policy=_policy(args))
        warnings = report_warnings(src, dst, now=int(time.time()), max_age=args.max_age, verified=key is not None)
        return _print_verdict(with_warnings(verdict, warnings), args.json)
    if args.command == "adjust-argv":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        try:
            adjustments = _adjustments(args.adjustments)
        except _Refused as refused:
            print(f"error: {refused}", file=sys.stderr)
            return refused.code
        if not argv:
            raise UsageError("give the QEMU command line after --")
        print(json.dumps(apply_adjustments(argv, adjustments)))
        return 0
    if args.command == "demo":
        from .demo import run_demo
        from .lab import LabError
        try:
            return asyncio.run(run_demo())
        except LabError as err:  # the lab is not the product: its failures are reported, not a verdict
            print(f"error: the demo's lab failed: {err}", file=sys.stderr)
            return EXIT_UNKNOWN
    raise UsageError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # Arguments are decoded with surrogateescape; print their undecodable bytes back as they came, whatever
        # the locale's error handler.
        sys.stdout.reconfigure(errors="surrogateescape")
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
    except BrokenPipeError:  # e.g. `... | head -1`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
