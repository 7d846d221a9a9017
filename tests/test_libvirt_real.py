"""libvirt for real (issue 11): two libvirt 11.3 daemons as two hosts A and B on this machine (``lab.libvirt``),
``virsh migrate --live`` of a TCG guest from A to B, with this tool's hook installed on B by its own
``install-libvirt-hook`` (run in B's mount namespace, so it lands in B's ``/etc/libvirt/hooks``) and the source's
report stored by ``libvirt-annotate``. The host without USO runs its QEMUs (and the hook's scratch QEMU) with the
no-USO shim."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import pytest
from conftest import CI, require_lab

from qemu_offload_handshake.api import probe
from qemu_offload_handshake.core.domxml import domain_facts
from qemu_offload_handshake.lab.libvirt import LibvirtHost, LibvirtHosts, libvirt_prerequisites

pytestmark = pytest.mark.qemu

CONFIG = "/etc/libvirt/qemu-offload-handshake.toml"  # per host: /etc/libvirt is the host's own folder
HOOK = "/etc/libvirt/hooks/qemu.d/qemu-offload-handshake"
TOOL = [sys.executable, "-m", "qemu_offload_handshake"]


@asynccontextmanager
async def hosts(nouso: str = "") -> AsyncIterator[LibvirtHosts]:
    require_lab(qemu72=False)
    problems = libvirt_prerequisites()
    if problems:
        message = "libvirt prerequisites missing (run scripts/setup.sh): " + "; ".join(problems)
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    async with LibvirtHosts(nouso=nouso) as the_hosts:
        yield the_hosts


async def install_hook(host: LibvirtHost, *more: str) -> None:
    """``install-libvirt-hook`` with its default hooks folder, run as on a real host (in B's namespaces)."""
    done = await host.run(*TOOL, "install-libvirt-hook", "--config", CONFIG, *more)
    assert done.returncode == 0, done.stderr
    script = host.path(HOOK)
    assert script.exists(), done.stdout
    assert f"exec {sys.executable} -m qemu_offload_handshake.libvirt_hook" in script.read_text()  # the venv's


async def tool(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m qemu_offload_handshake ARGS`` in the root namespace."""
    return await asyncio.to_thread(subprocess.run, [*TOOL, *args], capture_output=True, text=True, timeout=120,
                                   check=False)


async def annotate(host: LibvirtHost, domain: str = "qohvm") -> None:
    done = await tool("libvirt-annotate", domain, "--connect", host.uri)
    assert done.returncode == 0 and "stored a report" in done.stdout, done.stderr


def address(host: LibvirtHost, domain: str) -> str:
    return f"libvirt:{domain}?uri={quote(host.uri, safe='')}"  # percent-encoded or not: both are read


async def state(host: LibvirtHost, domain: str = "qohvm") -> str:
    return (await host.virsh("domstate", domain)).stdout.strip()


async def test_a_destination_without_uso_blocks_at_once() -> None:
    async with hosts(nouso="B") as h:
        await h.boot(h.a)  # its guest negotiated USO (A offers it)
        await install_hook(h.b)
        await annotate(h.a)
        blocked = await h.migrate(h.a, h.b)
        assert blocked.returncode != 0 and "qemu-offload-handshake: blocked" in blocked.stderr, blocked
        assert re.search(r"blocked: net0: .*USO", blocked.stderr), blocked.stderr
        assert await state(h.a) == "running" and not (await h.b.virsh("list", "--name")).stdout.strip()
        assert "unsupported" not in h.b.qemu_log("qohvm")  # refused before B started a QEMU

        done = await h.b.run(*TOOL, "install-libvirt-hook", "--config", CONFIG, "--uninstall")
        assert done.returncode == 0 and not h.b.path(HOOK).exists(), done
        late = await h.migrate(h.a, h.b)  # without the hook: after all RAM was sent, QEMU's load fails
        assert late.returncode != 0 and "load of migration failed" in late.stderr, late
        assert "unsupported" in h.b.qemu_log("qohvm")  # "Features 0x... unsupported. Allowed features: 0x..."
        assert await state(h.a) == "running"
        print(f"\nblocked by the hook in {blocked.seconds * 1000:.0f} ms; without it failed late in "
              f"{late.seconds * 1000:.0f} ms")


async def test_a_destination_offering_more_is_adjusted_by_the_hook() -> None:
    async with hosts(nouso="A") as h:
        await h.boot(h.a)  # A lacks USO: the guest did not negotiate it
        await install_hook(h.b)
        await annotate(h.a)
        before = await probe(address(h.a, "qohvm"))
        done = await h.migrate(h.a, h.b)
        assert done.returncode == 0, done
        assert await state(h.b) == "running"
        xml = (await h.b.virsh("dumpxml", "qohvm")).stdout
        overrides = domain_facts(xml).overrides.get("net0", {})
        assert {k: v for k, v in overrides.items() if "uso" in k} == {
            "host_uso": "false", "guest_uso4": "false", "guest_uso6": "false"}, xml
        after = await probe(address(h.b, "qohvm"))
        src, dst = before.nic("net0"), after.nic("net0")
        assert src is not None and dst is not None and src.offered is not None
        assert dst.offered == src.offered and dst.negotiated == src.negotiated, (hex(src.offered), dst)
        print(f"\nmigrated with the override in {done.seconds * 1000:.0f} ms")


async def test_identical_hosts_the_hook_keeps_the_xml() -> None:
    async with hosts() as h:
        await h.boot(h.a)
        await install_hook(h.b)
        stamps = h.b.folder / "etc" / "stamps"  # scripts around the hook (qemu.d runs them in name order)
        for name in ("01-stamp", "zz-stamp"):
            script = h.b.path(f"/etc/libvirt/hooks/qemu.d/{name}")
            script.write_text('#!/bin/sh\n[ "$2 $3" = "migrate begin" ] && date +%s%N >> /etc/libvirt/stamps\n'
                              "exit 0\n")
            script.chmod(0o755)
        await annotate(h.a)
        done = await h.migrate(h.a, h.b)
        assert done.returncode == 0, done
        assert await state(h.b) == "running"
        xml = (await h.b.virsh("dumpxml", "qohvm")).stdout
        assert "qemu:override" not in xml and "qemu-offload-handshake" in xml, xml  # the report, untouched
        taints = (await h.b.virsh("dominfo", "qohvm")).stdout
        assert "hook" not in taints.lower(), taints  # "configuration potentially modified by hook script"
        t0, t1 = (int(x) for x in stamps.read_text().split())
        print(f"\nmigrated in {done.seconds * 1000:.0f} ms; the hook ran {(t1 - t0) / 1e6:.0f} ms")


async def test_precheck_through_libvirt_agrees_with_the_sockets() -> None:
    """Two running domains, DOM1 on A and DOM2 on B (no USO): the precheck through libvirt's passthrough and the
    precheck over QMP sockets give the same verdict. libvirt holds each domain's ``monitor.sock`` (QEMU serves one
    client per monitor), so each domain gets a second QMP monitor through ``<qemu:commandline>``."""
    async with hosts(nouso="B") as h:
        extra = "<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:{},server=on,wait=off'/>" \
                "</qemu:commandline>"
        sockets = {name: h.folder / f"{name}.qmp" for name in ("dom1", "dom2")}
        await asyncio.gather(h.boot(h.a, "dom1", extra.format(sockets["dom1"])),
                             h.boot(h.b, "dom2", extra.format(sockets["dom2"])))
        assert h.a.monitor_socket("dom1").exists() and h.b.monitor_socket("dom2").exists()
        verdicts = {}
        for how, src, dst in (("libvirt", address(h.a, "dom1"), address(h.b, "dom2")),
                              ("socket", f"unix:{sockets['dom1']}", f"unix:{sockets['dom2']}")):
            started = time.monotonic()
            done = await tool("precheck", "--source", src, "--dest", dst, "--json")
            assert "Traceback" not in done.stderr and done.stdout, done.stderr
            data = json.loads(done.stdout)
            verdicts[how] = (done.returncode, data["verdict"], data["adjustments"],
                             [(d["id"], [(f["severity"], f["why"]) for f in d["findings"]]) for d in data["devices"]],
                             [(f["severity"], f["why"]) for f in data["findings"]])
            print(f"\nprecheck over {how}: {data['verdict']} in {(time.monotonic() - started) * 1000:.0f} ms")
        assert verdicts["libvirt"] == verdicts["socket"]
        assert verdicts["socket"][1] == "blocked", verdicts  # dom1 negotiated USO, B cannot offer it



def result_of(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines and lines[-1]["event"] == "result", (done.stdout, done.stderr)
    result: dict[str, object] = lines[-1]
    return result


async def test_the_migrate_command_through_libvirt() -> None:
    """``migrate --source libvirt:DOMAIN --libvirt-dest URI``: annotates and migrates in one command; the hook on a
    destination without USO refuses it (exit 1, the hook's reason, source running); without the hook it fails
    late (exit 5, source running)."""
    async with hosts(nouso="B") as h:
        await h.boot(h.a)
        await install_hook(h.b)
        done = await tool("migrate", "--source", f"libvirt:qohvm?uri={h.a.uri}", "--libvirt-dest", h.b.uri, "--json")
        result = result_of(done)
        assert (done.returncode, result["ending"]) == (1, "refused"), result
        assert "qemu-offload-handshake: blocked: net0" in str(result["reason"]) and "USO" in str(result["reason"])
        assert result["source_state"] == "running" and await state(h.a) == "running"
        done = await h.b.run(*TOOL, "install-libvirt-hook", "--config", CONFIG, "--uninstall")
        assert done.returncode == 0, done
        done = await tool("migrate", "--source", f"libvirt:qohvm?uri={h.a.uri}", "--libvirt-dest", h.b.uri, "--json")
        result = result_of(done)
        assert (done.returncode, result["ending"]) == (5, "failed"), result
        assert result["source_state"] == "running" and await state(h.a) == "running"


async def test_the_migrate_command_through_libvirt_migrates_and_verifies() -> None:
    async with hosts() as h:
        await h.boot(h.a)
        await install_hook(h.b)
        done = await tool("migrate", "--source", address(h.a, "qohvm"), "--libvirt-dest", h.b.uri, "--json")
        result = result_of(done)
        assert (done.returncode, result["ending"], result["differences"]) == (0, "migrated", []), result
        assert result["dest_state"] == "running" and await state(h.b) == "running"
