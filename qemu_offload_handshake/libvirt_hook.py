"""The libvirt qemu hook, destination side: ``DOMAIN migrate begin -`` gets the incoming domain XML on stdin
(libvirt's ``docs/hooks.rst``: the hook may print a changed XML on stdout; a non-zero exit cancels the migration
and libvirt shows what the hook wrote on stderr).

It takes the source's report from the domain's metadata (``libvirt-annotate`` put it there on the source, so it
travels in the migration XML), builds this host's truth as a handshake destination does (``answering``: a scratch
QEMU with the domain's machine type and the source's NICs, else this host's dump), decides, and:

* compatible: no output, exit 0 (libvirt keeps its XML);
* adjustable: the XML with ``<qemu:override>`` frontend properties for those NIC aliases (``core.domxml``, merged
  with overrides already there), exit 0;
* blocked or unknown: one line on stderr with the reasons, exit 1 (libvirt refuses the migration);
* no report in the metadata: allowed with a line on stderr, or refused when the configuration says ``require``.

Every other operation passes at once (the installed script does not even start Python for them). The hook never
calls back into libvirt: libvirt's hook rules forbid it (the daemon waits for the hook: deadlock).

Configuration: a TOML file (``QOH_HOOK_CONFIG``, default ``/etc/qemu-offload-handshake/hook.toml``) with
``require`` (bool), ``lenient`` (bool), ``qemu`` (binary, "" for none), ``dump`` (a dump file), ``key_file``
(reports and dumps must be HMAC-signed with this key), ``max_age`` (seconds a report may be old, default 3600),
``timeout`` (seconds, default 10).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .answering import Destination, answer_offer
from .core.conclude import verdict_of
from .core.decide import Mode
from .core.domxml import MAX_XML, DomainFacts, domain_facts, with_overrides
from .core.errors import HandshakeError, UsageError
from .core.exchange import Offer
from .core.model import VmReport
from .core.platform import HostDump
from .core.predict import backend_kind
from .core.wire import decode

__all__ = ["DEFAULT_CONFIG", "HookConfig", "decide_incoming", "load_config", "main"]

DEFAULT_CONFIG = "/etc/qemu-offload-handshake/hook.toml"
_KEYS: dict[str, type | tuple[type, ...]] = {"require": bool, "lenient": bool, "qemu": str, "dump": str,
                                             "key_file": str, "max_age": int, "timeout": (int, float)}


@dataclass(frozen=True)
class HookConfig:
    require: bool = False
    lenient: bool = False
    qemu: str = "qemu-system-x86_64"
    dump: str = ""
    key_file: str = ""
    max_age: int = 3600
    timeout: float = 10.0


def load_config(path: str | None = None) -> HookConfig:
    """The hook's configuration; a missing file is the defaults, a bad one a ``UsageError`` naming the key."""
    path = path or os.environ.get("QOH_HOOK_CONFIG") or DEFAULT_CONFIG
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return HookConfig()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"hook configuration {path}: {err}") from err
    for key, value in data.items():
        if key not in _KEYS:
            raise UsageError(f"hook configuration {path}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if not isinstance(value, _KEYS[key]) or isinstance(value, bool) != (_KEYS[key] is bool):
            raise UsageError(f"hook configuration {path}: {key} = {value!r} is not a {_KEYS[key]}")
    if not 0 < data.get("timeout", 10) <= 120 or not data.get("max_age", 3600) >= 0:
        raise UsageError(f"hook configuration {path}: timeout must be 0 to 120 s, max_age not negative")
    return HookConfig(**data)


def read_inputs(config: HookConfig) -> tuple[bytes | None, HostDump | None]:
    """The key and the dump the configuration names (``UsageError`` naming the file that cannot be used)."""
    key = None
    if config.key_file:
        try:
            key = Path(config.key_file).read_bytes().strip()
        except OSError as err:
            raise UsageError(f"key file {config.key_file}: {err.strerror or err}") from err
        if not key:
            raise UsageError(f"key file {config.key_file} is empty")
    dump = None
    if config.dump:
        try:
            record = decode(Path(config.dump).read_bytes(), key=key)
        except (OSError, HandshakeError) as err:
            raise UsageError(f"dump {config.dump}: {err}") from err
        if not isinstance(record, HostDump):
            raise UsageError(f"dump {config.dump} is not a host dump")
        dump = record
    return key, dump


async def decide_incoming(xml: str, config: HookConfig, *, key: bytes | None = None,
                          dump: HostDump | None = None) -> tuple[int, str, str]:
    """(exit status, what to print on stdout, a line for stderr) for an incoming domain's XML."""
    facts = domain_facts(xml)
    if facts.report is None:
        if config.require:
            return 1, "", (f"{_BLOCKED}domain {facts.name} carries no offload report (run libvirt-annotate on the "
                           "source first); refused: this host requires one")
        return 0, "", f"qemu-offload-handshake: domain {facts.name} carries no offload report; allowed unchecked"
    try:
        report = decode(facts.report, key=key)
    except HandshakeError as err:
        return 1, "", f"{_UNKNOWN}domain {facts.name}: its report cannot be used: {err}"
    if not isinstance(report, VmReport):
        return 1, "", f"{_UNKNOWN}domain {facts.name}: its metadata holds no VM report"
    problem = _mismatch(facts, report, config.max_age)
    if problem:
        return 1, "", f"{_UNKNOWN}domain {facts.name}: {problem}"
    offer = Offer(report, secrets.token_bytes(16), time.time_ns() // 1_000_000,
                  Mode.LENIENT if config.lenient else Mode.STRICT)
    answer = await answer_offer(offer, Destination(config.qemu or None, dump, timeout=config.timeout))
    verdict = verdict_of(offer, answer)
    if verdict.verdict == "compatible":
        return 0, "", ""
    if verdict.verdict == "adjustable":
        types = dict(dump.properties) if dump is not None else {}
        return 0, with_overrides(xml, verdict.adjustments, types), ""
    reasons = "; ".join(dict.fromkeys(f"{f.device + ': ' if f.device else ''}{f.why}" for f in verdict.findings
                                      if f.severity.value in ("blocker", "unknown")))
    return 1, "", f"qemu-offload-handshake: {verdict.verdict}: {reasons}"[:2000]


_BLOCKED, _UNKNOWN = "qemu-offload-handshake: blocked: ", "qemu-offload-handshake: unknown: "
_FUTURE = 300  # seconds a report may be dated ahead (clocks apart)


def _mismatch(facts: DomainFacts, report: VmReport, max_age: int) -> str | None:
    """Why the report cannot be taken for this domain as it arrives (None: it can): another VM's, another machine
    type, other NICs or backends than the XML's, too old, undated. A report is a claim about the source; the XML
    is what the destination will run, so they must agree."""
    now = time.time()
    if report.made_at is None:
        return "its report does not say when it was made: annotate it again"
    if now - report.made_at > max_age or report.made_at - now > _FUTURE:
        return (f"its report is dated {int(now - report.made_at)} s ago (accepted: up to {max_age} s, and at most "
                f"{_FUTURE} s ahead): annotate it again")
    if not report.vm_uuid or not facts.uuid or report.vm_uuid.lower() != facts.uuid.lower():
        return f"its report is of VM {report.vm_uuid or '(no UUID)'}, the domain is {facts.uuid or '(no UUID)'}"
    if report.machine != facts.machine:
        return f"its report is of machine type {report.machine}, the domain's is {facts.machine}"
    xml = {n.alias: n for n in facts.nics}
    if set(xml) != {n.key for n in report.nics}:
        return (f"its report has NICs {sorted(n.key for n in report.nics)}, the domain's virtio NICs are "
                f"{sorted(xml)}")
    for nic in report.nics:
        there = xml[nic.key]
        kind = backend_kind(nic)
        if there.kind is None or kind is None:
            return f"{nic.key}: a {there.type} backend cannot be told here"
        if there.kind != (kind if kind != "tap-vhost" else "tap") or (there.vhost is not None and kind in (
                "tap", "tap-vhost") and there.vhost != (kind == "tap-vhost") and nic.backend_features is not None):
            return f"{nic.key}: the report's backend is {kind}, the domain's {there.type} ({there.kind})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[1:3] != ["migrate", "begin"]:
        return 0  # not ours: untouched
    started = time.monotonic()
    try:
        config = load_config()
        key, dump = read_inputs(config)
        try:
            xml = sys.stdin.buffer.read(MAX_XML + 1).decode("utf-8")
        except UnicodeDecodeError as err:
            raise UsageError(f"the domain XML on stdin is not UTF-8: {err}") from None
        whole = config.timeout * 6  # the scratch QEMU's start and each of its QMP commands have config.timeout
        code, out, line = asyncio.run(asyncio.wait_for(decide_incoming(xml, config, key=key, dump=dump), whole))
    except UsageError as err:
        code, out, line = 1, "", f"{_UNKNOWN}{err}"
    except TimeoutError:
        code, out, line = 1, "", f"{_UNKNOWN}no decision within {config.timeout * 6:g} s"
    except Exception as err:  # a bug: libvirt shows this line, never a traceback, and the migration is refused
        code, out, line = 1, "", f"{_UNKNOWN}internal error: {type(err).__name__}: {err}"
    if out:
        sys.stdout.write(out)
    if line:
        print(line, file=sys.stderr)
    print(f"qemu-offload-handshake: hook took {(time.monotonic() - started) * 1000:.0f} ms", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
