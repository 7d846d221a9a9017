"""The handshake on the command line: ``handshake`` (source side), ``answer`` (destination, stdio: what ssh
runs) and ``serve`` (destination, the TLS agent). Exit codes as ``precheck``'s; ``answer`` and ``serve`` exit 0
when they ran (a refusal is an answer), 2 on bad arguments."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

from .core.errors import UsageError
from .core.platform import HostDump

__all__ = ["COMMANDS", "add_parsers", "run"]

COMMANDS = ("handshake", "answer", "serve")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return int(text)


def _truth_args(p: argparse.ArgumentParser, host: Callable[[str], str], timeout: Callable[[str], float]) -> None:
    p.add_argument("--qemu", metavar="BINARY", default="qemu-system-x86_64",
                   help="this host's QEMU, for scratch QEMUs (default qemu-system-x86_64)")
    p.add_argument("--no-scratch", action="store_true", help="never start a scratch QEMU: answer from --dump")
    p.add_argument("--dump", metavar="FILE", help="this host's dump (dump-host), used when no scratch QEMU can be")
    p.add_argument("--key-file", metavar="FILE", help="require the dump's HMAC made with this key")
    p.add_argument("--host", type=host, help="host name for the reports (default: this machine's)")
    p.add_argument("--allow-dest", action="append", metavar="PREFIX",
                   help="probe only incoming QEMUs whose address starts so (unix:/run/qemu/, tcp:127.0.0.1:); "
                        "repeatable; default: any address an offer names")
    p.add_argument("--timeout", type=timeout, default=10.0, metavar="S",
                   help="QMP calls and a scratch QEMU's start (default 10); also the offer's deadline")
    p.add_argument("--answer-timeout", type=timeout, default=60.0, metavar="S",
                   help="deadline of one answer (default 60)")


def _tls_args(p: argparse.ArgumentParser, *, side: str) -> None:
    p.add_argument("--cert", metavar="FILE", help=f"this {side}'s certificate (PEM)")
    p.add_argument("--key", metavar="FILE", help=f"this {side}'s private key (PEM)")
    p.add_argument("--ca", metavar="FILE", help="the CA that signs the peer's certificate (PEM)")
    p.add_argument("--insecure", action="store_true", help="plaintext, no certificates (loopback addresses only)")


def add_parsers(sub: Any, host: Callable[[str], str], timeout: Callable[[str], float],
                decision_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("handshake", help="precheck with a destination on another host (its agent, or ssh)")
    p.add_argument("--source", required=True, metavar="ADDR", help="the source QEMU's QMP address (this host)")
    via = p.add_mutually_exclusive_group(required=True)
    via.add_argument("--agent", metavar="HOST:PORT", help="the destination host's agent (serve)")
    via.add_argument("--ssh", metavar="DEST", help="[USER@]HOST or ssh://[USER@]HOST[:PORT]: run answer there")
    p.add_argument("--remote-command", metavar="CMD", help="with --ssh: the command that answers "
                   "(default: python3 -m qemu_offload_handshake answer)")
    p.add_argument("--ssh-option", action="append", metavar="OPT", help="with --ssh: an ssh -o option (repeatable)")
    p.add_argument("--dest", metavar="ADDR", help="the incoming QEMU's QMP address as seen on the destination host")
    p.add_argument("--timeout", type=timeout, default=5.0, metavar="S", help="QMP calls here (default 5)")
    p.add_argument("--answer-timeout", type=timeout, default=60.0, metavar="S",
                   help="deadline of the destination's answer (default 60)")
    _tls_args(p, side="source")
    decision_args(p)
    p = sub.add_parser("answer", help="answer one handshake offer on stdin, on stdout (what handshake --ssh runs)")
    _truth_args(p, host, timeout)
    p = sub.add_parser("serve", help="the destination host's handshake agent (TLS 1.3, client certificates)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (port 0: any)")
    _tls_args(p, side="agent")
    _truth_args(p, host, timeout)
    p.add_argument("--max-concurrent", type=_positive_int, default=8, metavar="N",
                   help="offers answered at once (default 8); more wait, and beyond 512 waiting are refused busy")


def _tls(args: argparse.Namespace, *, server: bool) -> Any:
    from .transport import client_context, server_context
    given = [n for n in ("cert", "key", "ca") if getattr(args, n)]
    if args.insecure:
        if given:
            raise UsageError(f"--insecure takes no --{', --'.join(given)}")
        return None
    if len(given) != 3:
        missing = [f"--{n}" for n in ("cert", "key", "ca") if n not in given]
        raise UsageError(f"TLS needs --cert, --key and --ca (missing {', '.join(missing)}), or --insecure on a "
                         "loopback address")
    return (server_context if server else client_context)(args.cert, args.key, args.ca)


def _destination(args: argparse.Namespace, read_dump: Callable[[str, bytes | None], HostDump],
                 key: Callable[[argparse.Namespace], bytes | None]) -> Any:
    from .answering import Destination
    dump = read_dump(args.dump, key(args)) if args.dump else None
    if args.no_scratch and dump is None:
        raise UsageError("--no-scratch needs --dump (nothing else to answer from)")
    return Destination(None if args.no_scratch else args.qemu, dump, args.host, args.timeout,
                       tuple(args.allow_dest or ()))


def _limits(args: argparse.Namespace, **more: Any) -> Any:
    from .agent import Limits
    return Limits(offer_deadline=args.timeout, answer_deadline=args.answer_timeout, **more)


async def _serve(args: argparse.Namespace, dest: Any, ctx: Any) -> int:
    from .agent import Agent
    from .transport import is_loopback, parse_hostport
    host, port = parse_hostport(args.listen, "--listen")
    if ctx is None and not is_loopback(host):
        raise UsageError(f"--insecure only on a loopback address, not {host}")
    agent = Agent(dest, ssl_context=ctx, limits=_limits(args, max_concurrent=args.max_concurrent))
    try:
        await agent.start(host, port)
    except OSError as err:
        raise UsageError(f"--listen {args.listen}: {err.strerror or err}") from err
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"serve: listening on {host}:{agent.port} ({'TLS 1.3, client certificates' if ctx else 'plaintext'})",
          file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await agent.close()
        print(f"serve: stopped after {agent.answered} answer(s)", file=sys.stderr, flush=True)
    return 0


async def _answer(dest: Any, limits: Any) -> int:
    from .agent import answer_stdio
    data, line = await answer_stdio(dest, limits=limits)
    out = sys.stdout.buffer
    out.write(data)
    out.flush()
    print(f"answer: {line}", file=sys.stderr, flush=True)
    return 0


def run(args: argparse.Namespace, *, policy: Any, print_verdict: Callable[[Any, bool], int],
        read_dump: Callable[[str, bytes | None], HostDump], key: Callable[[argparse.Namespace], bytes | None]) -> int:
    if args.command == "handshake":
        from .api import handshake
        if args.ssh is not None and any(getattr(args, n) for n in ("cert", "key", "ca", "insecure")):
            raise UsageError("--cert, --key, --ca and --insecure are for --agent; ssh authenticates itself")
        if args.agent is not None and (args.remote_command or args.ssh_option):
            raise UsageError("--remote-command and --ssh-option are for --ssh")
        ctx = _tls(args, server=False) if args.agent is not None else None
        if args.agent is not None and ctx is None:
            from .transport import is_loopback, parse_hostport
            if not is_loopback(parse_hostport(args.agent, "--agent")[0]):
                raise UsageError("--insecure only to a loopback address")
        verdict = asyncio.run(handshake(args.source, agent=args.agent, ssl_context=ctx, ssh=args.ssh,
                                        remote_command=args.remote_command, ssh_options=args.ssh_option or (),
                                        dest=args.dest, lenient=args.lenient, policy=policy(args),
                                        timeout=args.timeout, answer_timeout=args.answer_timeout))
        return print_verdict(verdict, args.json)
    dest = _destination(args, read_dump, key)
    if args.command == "answer":
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_answer(dest, _limits(args)))
        return 130
    ctx = _tls(args, server=True)
    return asyncio.run(_serve(args, dest, ctx))

