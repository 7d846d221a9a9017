"""The migrate hook for libvirt, run as libvirt runs it (``HOOK DOMAIN migrate begin -`` with the incoming domain
XML on stdin), deciding on real QEMU: the source's report (probed from a lab VM, put in the XML's metadata as
``libvirt-annotate`` does) against a scratch QEMU of the destination host's QEMU (wrapper scripts: QEMU 10, and
QEMU 10 on a kernel without USO)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_lab

from qemu_offload_handshake.api import probe
from qemu_offload_handshake.core.domxml import domain_facts, with_report
from qemu_offload_handshake.core.model import VmReport
from qemu_offload_handshake.core.wire import encode
from qemu_offload_handshake.lab import Lab, Nic, VmSpec
from qemu_offload_handshake.lab.hosts import write_host

pytestmark = pytest.mark.qemu


UUID = "6f1f2c1e-1111-4a4a-9b9b-000000000001"


def domain_xml(report: VmReport, uuid: str = UUID) -> str:
    """The incoming domain XML libvirt would pass: its UUID, machine type, one virtio NIC on a tap (libvirt names
    it net0; the incoming XML carries no alias)."""
    return (f"<domain type='qemu'><name>vm1</name><uuid>{uuid}</uuid>"
            f"<os><type arch='x86_64' machine='{report.machine}'>hvm</type></os>"
            "<devices><interface type='ethernet'><mac address='52:54:00:12:34:10'/><model type='virtio'/>"
            "<driver name='qemu'/></interface></devices></domain>")


def install(folder: Path, *more: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "qemu_offload_handshake", "install-libvirt-hook", "--hooks-dir",
                           str(folder / "hooks"), "--config", str(folder / "hook.toml"), *more],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return folder / "hooks" / "qemu.d" / "qemu-offload-handshake"


def run_hook(hook: Path, xml: str, *op: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(hook), "vm1", *(op or ("migrate", "begin", "-"))], input=xml, capture_output=True,
                          text=True, timeout=120, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done


async def test_the_hook_allows_blocks_and_rewrites(qlab: Lab, tmp_path: Path) -> None:
    require_lab()
    hosts = {kind: write_host(tmp_path, kind) for kind in ("10", "10-nouso")}
    with_uso = await qlab.start(VmSpec(mode="booted"), extra_args=["-uuid", UUID])  # its guest negotiated USO
    without = await qlab.start(VmSpec(nics=(Nic("net0", "tap-nouso"),), mode="booted"), extra_args=["-uuid", UUID])
    xml = {name: with_report(domain_xml(r), encode(r)) for name, r in
           (("uso", await probe(with_uso.address)), ("no-uso", await probe(without.address)))}

    same = install(tmp_path / "same", "--qemu", str(hosts["10"]))
    done = run_hook(same, xml["uso"])
    assert (done.returncode, done.stdout) == (0, ""), done.stderr  # compatible: libvirt keeps its XML

    lacking = install(tmp_path / "lacking", "--qemu", str(hosts["10-nouso"]))
    done = run_hook(lacking, xml["uso"])
    assert done.returncode == 1 and done.stdout == "", done
    first = done.stderr.splitlines()[0]
    assert first.startswith("qemu-offload-handshake: blocked: net0:") and "USO" in first, done.stderr

    more = run_hook(same, xml["no-uso"])  # this host offers USO, the source does not: adjusted
    assert more.returncode == 0 and more.stdout, more.stderr
    overrides = domain_facts(more.stdout).overrides["net0"]
    assert {k: v for k, v in overrides.items() if "uso" in k} == {"guest_uso4": "false", "guest_uso6": "false",
                                                                  "host_uso": "false"}, overrides

    # a report that is not this domain's: another VM, machine type or NIC set is never taken (fails closed)
    report = await probe(with_uso.address)
    for other, named in ((domain_xml(report, "6f1f2c1e-1111-4a4a-9b9b-000000000002"), "its report is of VM"),
                         (domain_xml(report).replace(str(report.machine), "pc-q35-7.2"), "machine type"),
                         (domain_xml(report).replace("</devices>", "<interface type='ethernet'><model "
                                                     "type='virtio'/></interface></devices>"), "NICs")):
        done = run_hook(same, with_report(other, encode(report)))
        assert done.returncode == 1 and named in done.stderr and "unknown:" in done.stderr, done.stderr

    # every other operation passes untouched and at once (the script does not start Python for it)
    started = time.monotonic()
    for op in (("prepare", "begin", "-"), ("start", "begin", "-"), ("migrate", "end", "-"), ("release", "end", "-")):
        assert run_hook(lacking, xml["uso"], *op).returncode == 0
    assert time.monotonic() - started < 2


async def test_a_domain_without_a_report(tmp_path: Path) -> None:
    plain = "<domain><name>vm1</name><os><type machine='pc-q35-10.0'>hvm</type></os></domain>"
    done = run_hook(install(tmp_path / "a"), plain)
    assert done.returncode == 0 and "carries no offload report; allowed unchecked" in done.stderr
    done = run_hook(install(tmp_path / "b", "--require"), plain)
    assert done.returncode == 1 and "refused: this host requires one" in done.stderr


def test_install_and_uninstall(tmp_path: Path) -> None:
    hook = install(tmp_path)
    assert hook.stat().st_mode & 0o111 and "qemu_offload_handshake.libvirt_hook" in hook.read_text()
    done = subprocess.run([sys.executable, "-m", "qemu_offload_handshake", "install-libvirt-hook", "--hooks-dir",
                           str(tmp_path / "hooks"), "--config", str(tmp_path / "hook.toml"), "--uninstall"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not hook.exists() and not (tmp_path / "hook.toml").exists(), done
