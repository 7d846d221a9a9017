"""``migrate`` on the command line: one live progress line on a terminal's stderr, or with ``--json`` one JSON event
per line on stdout (phases, progress at most four times a second, the re-check, the result last). Ctrl-C or
SIGTERM cancels the migration and leaves the source running. Exit codes: 0 migrated (and the destination offers
what the source offered), 1 blocked (by the precheck or at the switchover), 3 adjustable (refused: start the
destination with the adjustments, or use --dest-argv), 4 unknown, 5 the migration failed or was cancelled (the
source is as it was), 6 migrated but the destination offers other features (the VM runs there), 2 bad arguments
or a pair that cannot migrate now (the destination not waiting with -incoming defer, the source already
migrating)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

from .core.errors import UsageError
from .core.migration import MigrationResult, progress_of
from .render import verdict_json

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, timeout: Callable[[str], float],
               decision_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("migrate", help="precheck, migrate, decide again at the switchover, verify; the source is "
                                       "never left paused")
    p.add_argument("--source", required=True, metavar="ADDR", help="the source QEMU's QMP address")
    p.add_argument("--dest", metavar="ADDR", help="the destination's QMP address (started with -incoming defer)")
    p.add_argument("--uri", metavar="URI", help="QEMU's migration URI: unix:/path or tcp:HOST:PORT (the destination "
                                                "listens there); with --libvirt-dest: where the stream goes, if not "
                                                "libvirt's choice")
    p.add_argument("--libvirt-dest", metavar="URI", help="with --source libvirt:DOMAIN: annotate the domain and "
                                                         "migrate it live through libvirt to this libvirt (its hook "
                                                         "decides)")
    p.add_argument("--key-file", metavar="FILE", help="with --libvirt-dest: sign the report with this key")
    p.add_argument("--dest-uri", metavar="URI", help="where the destination listens, if the source reaches it at "
                                                     "another address (default: --uri)")
    p.add_argument("--timeout", type=timeout, default=5.0, metavar="S", help="timeout of each QMP call (default 5)")
    p.add_argument("--deadline", type=timeout, default=600.0, metavar="S",
                   help="the whole migration's deadline; then it is cancelled (default 600)")
    p.add_argument("--no-recheck", action="store_true",
                   help="do not decide again at the switchover (shows what the re-check prevents)")
    decision_args(p)
    p.add_argument("--dest-argv", action="store_true",
                   help="start the destination from the QEMU command line after --, adjusted when needed")
    p.add_argument("qemu_argv", nargs=argparse.REMAINDER, metavar="-- QEMU-ARGV...",
                   help="with --dest-argv: the destination's QEMU command line (without -incoming)")


def _result_json(result: MigrationResult) -> dict[str, Any]:
    return {"event": "result", "ending": result.ending.value, "reason": result.reason,
            "exit_code": result.exit_code, "source_state": result.source_state, "dest_state": result.dest_state,
            "changed": list(result.changed),
            "differences": None if result.differences is None else list(result.differences),
            "add_to_dest": list(result.add_to_dest), "dest_pid": result.dest_pid,
            "dest_address": result.dest_address,
            "precheck": verdict_json(result.precheck),
            "recheck": None if result.recheck is None else verdict_json(result.recheck)}


def _text(result: MigrationResult) -> str:
    lines = [f"{result.ending.value}: {result.reason}"]
    if result.precheck.outcome.value != "compatible":
        lines += [f"  precheck: {result.precheck.verdict}"]
        lines += [f"    {f.device or '-'}: {f.why}" for f in result.precheck.findings
                  if f.severity.value in ("blocker", "unknown", "adjust")]
    if result.add_to_dest:
        lines.append("  start the destination with: " + " ".join(result.add_to_dest))
    lines += [f"  changed since the precheck: {c}" for c in result.changed]
    if result.recheck is not None and result.recheck.outcome.value != "compatible":
        lines += [f"    {f.device or '-'}: {f.why}" for f in result.recheck.findings
                  if f.severity.value in ("blocker", "unknown", "adjust")]
    lines += [f"  differs after migrating: {d}" for d in result.differences or ()]
    lines.append(f"  source: {result.source_state or 'gone'}; destination: {result.dest_state or 'gone'}"
                 + (f" (pid {result.dest_pid})" if result.dest_pid else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace, *, policy: Any, key: Any = None) -> int:
    from .migrate import migrate
    if args.source.startswith("libvirt:") or args.libvirt_dest:
        if not (args.source.startswith("libvirt:") and args.libvirt_dest) or args.dest or args.dest_argv:
            raise UsageError("through libvirt: --source libvirt:DOMAIN[?uri=URI] --libvirt-dest URI (no --dest, "
                             "no --dest-argv)")
    elif not args.uri:
        raise UsageError("give --uri (QEMU's migration URI, e.g. unix:/run/m.sock or tcp:HOST:PORT)")
    argv = args.qemu_argv[1:] if args.qemu_argv[:1] == ["--"] else args.qemu_argv
    if args.dest_argv != bool(argv) or (args.dest_argv and args.dest):
        raise UsageError("give --dest ADDR, or --dest-argv -- QEMU-ARGV... (the destination's command line)")
    argv = argv if args.dest_argv else None
    live = not args.json and sys.stderr.isatty()

    def on_event(event: dict[str, object]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif live and event.get("event") == "progress":
            line = progress_of({"status": event["status"], "ram": {"total": event["ram_total"],
                                                                   "remaining": event["ram_remaining"],
                                                                   "mbps": event["mbps"]},
                                "expected-downtime": event["expected_downtime_ms"]}).line()
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    async def main() -> MigrationResult | None:
        if args.libvirt_dest:
            from .libvirt_migrate import migrate_libvirt
            work = migrate_libvirt(args.source, args.libvirt_dest, key=key(args) if key else None,
                                   timeout=args.timeout, deadline=args.deadline, migrate_uri=args.uri,
                                   on_event=on_event)
        else:
            work = migrate(args.source, args.dest, args.uri, lenient=args.lenient, policy=policy(args),
                           timeout=args.timeout, deadline=args.deadline, check=not args.no_recheck, dest_argv=argv,
                           dest_uri=args.dest_uri, on_event=on_event)
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()

        def cancel_once() -> None:  # a second Ctrl-C must not cut the clean-up short
            for sig in signals:
                loop.add_signal_handler(sig, lambda: None)
            task.cancel()

        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal closed
        for sig in signals:
            loop.add_signal_handler(sig, cancel_once)
        try:
            return await task
        except asyncio.CancelledError:  # before the migration started: nothing was changed
            return None

    result = asyncio.run(main())
    if live:
        print(file=sys.stderr)
    if result is None:
        print("error: cancelled before the migration started; neither QEMU was changed", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(_result_json(result)), flush=True)
    else:
        print(_text(result))
    return result.exit_code
