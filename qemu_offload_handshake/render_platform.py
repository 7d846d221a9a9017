"""Host dumps, baselines and new-host checks as JSON (for scripts) and as short text (for an operator).

Bitmaps are hex strings (JSON numbers lose bits above 53), each with the feature names it holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .core.baseline import HostCheck, causes, compat_profile
from .core.features import BY_BIT, bits_of
from .core.platform import Baseline, HostDump
from .core.verdict import Verdict

__all__ = ["baseline_json", "baseline_text", "check_json", "check_text", "dump_json", "dump_text", "vm_outcome"]

CHECK_EXIT = {"joins": 0, "narrows": 1, "cannot-join": 1}


def _names(bits: int) -> list[str]:
    return [BY_BIT[b].short if b in BY_BIT else f"bit {b}" for b in bits_of(bits)]


def _bits(bits: int) -> dict[str, Any]:
    return {"bitmap": hex(bits), "features": _names(bits)}


def _version(v: tuple[int, int, int] | None) -> str | None:
    return ".".join(map(str, v)) if v else None


def dump_json(d: HostDump) -> dict[str, Any]:
    return {
        "type": "host-dump", "host": d.host, "kernel": d.kernel, "qemu_version": _version(d.qemu_version),
        "package": d.package, "binary": d.binary, "made_at": d.made_at, "default_machine": d.default_machine,
        "properties": dict(d.properties),
        "machines": {m.machine: {"defaults": {k: str(v) for k, v in m.defaults},
                                 "offers": {o.backend: _bits(o.offered) | {
                                     "undetermined": _bits(o.unknown) if o.unknown else None} for o in m.offers}}
                     for m in d.machines},
        "unprobed": [{"machine": u.machine, "backend": u.backend, "reason": u.reason} for u in d.unprobed],
    }


def dump_text(d: HostDump, out: str | None = None) -> str:
    lines = [(f"wrote {out}: " if out else "") + f"host {d.host}, kernel {d.kernel}, QEMU {_version(d.qemu_version)}"
             + (f" ({d.package})" if d.package else "")]
    for m in d.machines:
        for o in m.offers:
            extra = f", {len(_names(o.unknown))} undetermined" if o.unknown else ""
            lines.append(f"  {m.machine:16} {o.backend:10} offers {hex(o.offered)} ({len(_names(o.offered))} "
                         f"features{extra})")
    lines += [f"  not probed: {u.machine or 'every machine type'} / {u.backend or 'every backend'}: {u.reason}"
              for u in d.unprobed]
    return "\n".join(lines)


def baseline_json(b: Baseline) -> dict[str, Any]:
    profiles = {(p.machine, p.backend): p for p in compat_profile(b)}
    entries = []
    for e in b.entries:
        p = profiles[(e.machine, e.backend)]
        entries.append({
            "machine": e.machine, "backend": e.backend, "offered": _bits(e.offered),
            "hosts": [b.hosts[i].host for i in e.hosts],
            "missing": [{"host": b.hosts[i].host, "why": why} for i, why in e.missing],
            "removed": [{"host": host, **_bits(bits), "cause": why} for host, bits, why in causes(b, e)],
            "profile": {"overrides": p.overrides, "device": p.device_properties(),
                        "cannot_be_turned_off": _bits(p.unfixable) if p.unfixable else None,
                        "libvirt": p.libvirt_override(), "absent_on": {k: list(v) for k, v in p.absent_on.items()}},
        })
    return {"type": "baseline", "made_at": b.made_at,
            "hosts": [{"host": h.host, "kernel": h.kernel, "qemu_version": _version(h.qemu_version),
                       "package": h.package, "dump_made_at": h.made_at} for h in b.hosts],
            "entries": entries}


def baseline_text(b: Baseline, out: str | None = None) -> str:
    lines = [(f"wrote {out}: " if out else "") + f"baseline of {len(b.hosts)} host(s), {len(b.entries)} "
             "machine type / backend pair(s)"]
    profiles = {(p.machine, p.backend): p for p in compat_profile(b)}
    for e in b.entries:
        p = profiles[(e.machine, e.backend)]
        lines.append(f"  {e.machine:16} {e.backend:10} {len(e.hosts)} host(s), offers {hex(e.offered)}; "
                     + (f"-device ...,{p.device_properties()}" if p.overrides else "no overrides needed"))
        for host, bits, why in causes(b, e)[:5]:
            lines.append(f"    {host} removed {', '.join(_names(bits))}: {why}")
        for i, why in e.missing[:5]:
            lines.append(f"    {b.hosts[i].host} cannot run it: {why}")
        if len(e.missing) > 5:
            lines.append(f"    ... and {len(e.missing) - 5} more host(s) that cannot run it")
    return "\n".join(lines)


def vm_outcome(v: Verdict) -> dict[str, Any]:
    """One VM against the new host: its verdict and the reasons (blockers and unknowns, once each)."""
    source = v.source
    reasons: list[str] = []
    for f in v.findings:
        if f.severity.value in ("blocker", "unknown", "adjust"):
            text = f"{f.device}: {f.why}" if f.device else f.why
            if text not in reasons:
                reasons.append(text)
    return {"vm": (source.vm_name or source.vm_uuid) if source else None, "host": source.host if source else None,
            "machine": source.machine if source else None, "verdict": v.verdict, "reasons": reasons,
            "adjustments": v.adjustments}


def check_json(c: HostCheck, vms: Sequence[Verdict] = ()) -> dict[str, Any]:
    return {
        "host": c.host, "outcome": c.outcome,
        "narrowings": [{"machine": n.machine, "backend": n.backend, "lost": _bits(n.bits),
                        "causes": [{**_bits(bits), "cause": why} for bits, why in n.causes],
                        "baseline_after": _bits(n.offered_after)} for n in c.narrowings],
        "missing": [{"machine": m, "backend": k, "why": why} for m, k, why in c.missing],
        "extra": [{"machine": m, "backend": k, **_bits(bits)} for m, k, bits in c.extra],
        "profile_changes": [{"machine": m, "backend": k, "before": old, "after": new}
                            for m, k, old, new in c.profile_changes],
        "vms": [vm_outcome(v) for v in vms],
        "vms_that_cannot_migrate": [vm_outcome(v)["vm"] for v in vms if v.verdict in ("blocked", "unknown")],
    }


def check_text(c: HostCheck, vms: Sequence[Verdict] = ()) -> str:
    word = {"joins": "JOINS: it offers at least the baseline everywhere",
            "narrows": "NARROWS the baseline", "cannot-join": "CANNOT JOIN"}[c.outcome]
    lines = [f"host {c.host} {word}"]
    for n in c.narrowings:
        lines.append(f"  {n.machine} / {n.backend}: loses {', '.join(_names(n.bits))}; baseline after: "
                     f"{hex(n.offered_after)}")
        lines += [f"    {', '.join(_names(bits))}: {why}" for bits, why in n.causes]
    lines += [f"  {m} / {k}: cannot run it: {why}" for m, k, why in c.missing]
    lines += [f"  {m} / {k}: offers more ({', '.join(_names(bits))}): VMs started there need the new profile"
              for m, k, bits in c.extra]
    lines += [f"  {m} / {k}: the compat profile changes from {old or 'no overrides'} to {new or 'no overrides'}"
              for m, k, old, new in c.profile_changes]
    for v in vms:
        out = vm_outcome(v)
        if out["verdict"] in ("blocked", "unknown"):
            lines.append(f"  VM {out['vm']} (on {out['host']}) could not migrate here: {out['verdict']}")
            lines += [f"    {r}" for r in out["reasons"][:5]]
        elif out["verdict"] == "adjustable":
            lines.append(f"  VM {out['vm']} (on {out['host']}) can migrate here only with the destination "
                         f"overrides {out['adjustments']}")
            lines += [f"    {r}" for r in out["reasons"][:5]]
    return "\n".join(lines)
