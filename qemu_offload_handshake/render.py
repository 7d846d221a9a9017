"""Verdicts as JSON (for scripts) and as a short table (for a tired operator)."""

from __future__ import annotations

from typing import Any

from .core.decide import Finding, Verdict
from .core.model import CapabilitySet, HostCapabilities, NicReport, VmReport
from .core.platform import Baseline, HostDump
from .render_platform import baseline_json, dump_json

__all__ = ["EXIT_CODES", "report_json", "verdict_json", "verdict_table"]

EXIT_CODES = {"compatible": 0, "blocked": 1, "adjustable": 3, "unknown": 4}


def _finding(f: Finding) -> dict[str, Any]:
    return {"severity": f.severity.value, "code": f.code, "feature": f.feature, "bit": f.bit, "source": f.source,
            "dest": f.dest, "negotiated": f.negotiated, "why": f.why}


def _side(report: VmReport | HostCapabilities | None) -> dict[str, Any] | None:
    if report is None:
        return None
    side: dict[str, Any] = {"host": report.host, "qemu_version": ".".join(map(str, report.qemu_version or ())) or None,
                            "package": report.package, "machine": report.machine}
    if isinstance(report, VmReport):
        side |= {"vm_name": report.vm_name, "vm_uuid": report.vm_uuid, "made_at": report.made_at}
    return side


def verdict_json(v: Verdict) -> dict[str, Any]:
    pairs = list(v.pairs)
    if not pairs:  # a verdict without a device comparison (a side not probed): list what was seen
        pairs = [(n.key, None) for n in v.source.nics] if v.source else []
        pairs += [(None, n.key) for n in v.dest.nics] if v.dest else []
    return {
        "verdict": v.verdict,
        "mode": v.mode.value,
        "source": _side(v.source),
        "dest": _side(v.dest),
        "findings": [_finding(f) for f in v.findings if not f.device],
        "devices": [_device(v, src, dst) for src, dst in pairs],
        "adjustments": v.adjustments,
        "recommendations": v.recommendations,
        "dest_predicted": {"from": v.predicted_from, "facts": list(v.predicted)} if v.predicted else None,
    }


def _device(v: Verdict, src: str | None, dst: str | None) -> dict[str, Any]:
    """One device as QEMU pairs it: ``id`` (the source's, or the destination's for a device only it has),
    ``dest_id`` (the destination's id for it), ``path`` (where QEMU files its state), its findings, and per side the
    facts that were derived rather than read (empty lists: all read)."""
    key = src if src is not None else dst
    assert key is not None
    nics = (v.source.nic(src) if v.source and src else None, v.dest.nic(dst) if v.dest and dst else None)
    return {"id": key, "dest_id": dst, "path": next((n.dev_path for n in nics if n and n.dev_path), None),
            "derived": {"source": list(nics[0].derived) if nics[0] else [],
                        "dest": list(nics[1].derived) if nics[1] else []},
            "findings": [_finding(f) for f in v.device_findings(key)]}


def _nic_json(n: NicReport) -> dict[str, Any]:
    def hexa(x: int | None) -> str | None:
        return None if x is None else hex(x)
    return {"qdev_id": n.qdev_id, "qom_path": n.qom_path, "netdev_id": n.netdev_id, "backend": n.backend,
            "properties": {k: str(t) for k, t in n.properties}, "offered": hexa(n.offered),
            "negotiated": hexa(n.negotiated), "driver_status": n.driver_status,
            "backend_features": hexa(n.backend_features), "vnet_hdr": n.vnet_hdr, "unreadable": list(n.unreadable),
            "offered_undetermined": hexa(n.offered_unknown or None), "derived": list(n.derived)}


def report_json(r: Any) -> dict[str, Any]:
    """Any decoded record as JSON-friendly data (bitmaps as hex strings: JSON numbers lose bits above 53)."""
    if isinstance(r, VmReport):
        return {"type": "vm", **(_side(r) or {}), "side": r.side, "nics": [_nic_json(n) for n in r.nics],
                "devices_known": r.devices_known, "unreadable": list(r.unreadable)}
    if isinstance(r, HostCapabilities):
        return {"type": "host", **(_side(r) or {}), "offers": {k: hex(b) for k, b in r.offers}}
    if isinstance(r, CapabilitySet):
        return {"type": "set", "hosts": [report_json(h) for h in r.hosts]}
    if isinstance(r, HostDump):
        return dump_json(r)
    if isinstance(r, Baseline):
        return baseline_json(r)
    raise TypeError(f"not a record: {type(r).__name__}")


def _short(f: Finding) -> str:
    name = (f.feature or "").removeprefix("VIRTIO_NET_F_").removeprefix("VIRTIO_F_")
    return f"{name or 'bit'} ({f.bit})" if f.bit is not None else "-"


def verdict_table(v: Verdict) -> str:
    """A short table: findings that differ only in their feature share one row."""
    lines = [f"verdict: {v.verdict.upper()}  ({v.mode.value} mode)"]
    if v.predicted_from:
        lines.append(f"  destination predicted from {v.predicted_from}")
    for name, report in (("source", v.source), ("dest", v.dest)):
        if report is not None:
            version = ".".join(map(str, report.qemu_version)) if report.qemu_version else "?"
            lines.append(f"  {name:6}  {report.host}  QEMU {version}  machine {report.machine or '?'}  "
                         f"{len(report.nics)} virtio-net")
    rows: list[tuple[tuple[str, ...], list[str]]] = []
    for f in v.findings:
        key = (f.severity.value, f.device or "-", f.source or "-", f.dest or "-", f.why)
        if rows and rows[-1][0] == key:
            rows[-1][1].append(_short(f))
        else:
            rows.append((key, [_short(f)]))
    if rows:
        lines += ["", f"  {'SEVERITY':8}  {'DEVICE':8}  {'SOURCE':15}  {'DEST':15}  FEATURES"]
        for (severity, device, src, dst, why), features in rows:
            lines.append(f"  {severity:8}  {device:8}  {src:15}  {dst:15}  {', '.join(features)}")
            lines.append(f"  {'':8}  {'':8}  why: {why}")
    for title, table in (("start the destination with", v.adjustments), ("recommended", v.recommendations)):
        for dev, props in table.items():
            lines.append(f"  {title}: -device ...,id={dev}," + ",".join(f"{k}={val}" for k, val in props.items()))
    return "\n".join(lines)
