"""The handshake between hosts on real QEMU (issue 9's proof): the lab's scenarios through the TLS agent and
through a real sshd, each compared with a direct precheck of the same pair; adjustable pairs relaunched with the
answer's adjustments migrate for real. Agents run as ``python -m qemu_offload_handshake serve`` subprocesses with
real certificates (``lab.certs``); ssh goes through Debian's OpenSSH (``lab.sshd``) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_lab

from qemu_offload_handshake.api import precheck
from qemu_offload_handshake.core.argv import apply_adjustments
from qemu_offload_handshake.lab import Backend, Lab, Nic, VmSpec
from qemu_offload_handshake.lab.agents import AgentProcess, run_agent
from qemu_offload_handshake.lab.certs import Pki, make_pki
from qemu_offload_handshake.lab.hosts import HostKind, write_host
from qemu_offload_handshake.lab.sshd import Sshd, sshd_prerequisites

pytestmark = pytest.mark.qemu
PY = sys.executable


Agent = AgentProcess


def agent(pki: Pki, *args: str, listen: str = "127.0.0.1:0",
          insecure: bool = False) -> contextlib.AbstractAsyncContextManager[AgentProcess]:
    """A real agent subprocess with the lab's PKI (or plaintext on loopback)."""
    return run_agent(None if insecure else pki, *args, listen=listen)


async def cli(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(PY, "-m", "qemu_offload_handshake", *args,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    assert b"Traceback" not in err, err.decode()
    return proc.returncode, out.decode(), err.decode()


async def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await cli(*args, "--json")
    assert out, err
    return code, json.loads(out)


def tls(pki: Pki, agent: Agent) -> list[str]:
    return ["--agent", agent.address, "--cert", str(pki.client_cert), "--key", str(pki.client_key),
            "--ca", str(pki.ca)]


def via_ssh(sshd: Sshd, *answer_args: str) -> list[str]:
    remote = shlex.join([PY, "-m", "qemu_offload_handshake", "answer", *answer_args])
    return ["--ssh", sshd.destination, "--remote-command", remote,
            *(a for o in sshd.options for a in ("--ssh-option", o))]


def summary(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return data["verdict"], data["adjustments"]


def codes(data: dict[str, Any]) -> list[str]:
    found = [f["code"] for f in data["findings"]]
    return found + [f["code"] for d in data["devices"] for f in d["findings"]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_lab()
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_lab()
    folder = tmp_path_factory.mktemp("hosts")
    return {kind: write_host(folder, kind) for kind in ("10", "10-nouso", "7.2")}


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[Sshd]:
    problems = sshd_prerequisites()
    if problems:
        pytest.skip("; ".join(problems))
    async with Sshd(tmp_path) as server:
        yield server


@dataclass(frozen=True)
class Scenario:
    source: VmSpec
    dest_backends: dict[str, Backend]
    dest_changes: dict[str, Any]
    host: HostKind | None  # the destination host's QEMU for a scratch QEMU (None: no scratch comparison)
    expect: str | None  # the direct precheck's verdict, where the scenario is about it


BOOTED = VmSpec(mode="booted")
SCENARIOS = {
    "identical": Scenario(BOOTED, {}, {}, "10", "compatible"),
    "uso-lost": Scenario(BOOTED, {"net0": "tap-nouso"}, {}, "10-nouso", "blocked"),
    "uso-gained": Scenario(VmSpec(nics=(Nic("net0", "tap-nouso"),), mode="booted"), {"net0": "tap"}, {}, "10",
                           "adjustable"),
    "7.2-to-10": Scenario(VmSpec(qemu="7.2", machine="pc-q35-7.2", mode="booted"), {}, {"qemu": "10"}, "10", None),
    "10-to-7.2": Scenario(VmSpec(machine="pc-q35-7.2", mode="booted"), {}, {"qemu": "7.2"}, "7.2", None),
    "machine-differs": Scenario(VmSpec(machine="pc-q35-10.0"), {}, {"machine": "pc-q35-7.2"}, None, "blocked"),
}


@pytest.mark.parametrize("name", SCENARIOS)
async def test_the_handshake_gives_the_direct_prechecks_verdict(name: str, qlab: Lab, pki: Pki,
                                                                hosts: dict[str, Path], sshd: Sshd) -> None:
    s = SCENARIOS[name]
    src = await qlab.start(s.source)
    dst = await qlab.start(s.source.destination(s.dest_backends, **s.dest_changes))
    direct = await precheck(src.address, dst.address)
    if s.expect:
        assert direct.verdict == s.expect, direct.findings
    want = (direct.verdict, direct.adjustments)
    scratch_args = ["--qemu", str(hosts[s.host])] if s.host else []
    async with agent(pki, *scratch_args) as a:
        for how, args in (("agent", tls(pki, a)), ("ssh", via_ssh(sshd, *scratch_args))):
            code, data = await cli_json("handshake", "--source", src.address, "--dest", dst.address, *args)
            assert summary(data) == want, (how, data)
            assert code == {"compatible": 0, "blocked": 1, "adjustable": 3, "unknown": 4}[direct.verdict]
            assert "handshake" in codes(data) and "handshake-disagrees" not in codes(data)
            assert codes(data).count("handshake") == 1
            if s.host is None:
                continue
            # no destination QEMU named: the destination host starts a scratch QEMU like the source
            code, data = await cli_json("handshake", "--source", src.address, *args)
            assert summary(data) == want, (how, "scratch", data)
            why = next(f["why"] for f in data["findings"] if f["code"] == "handshake")
            assert "scratch QEMU" in why, why
    answered = [line for line in a.log if " answered " in line]  # one line per agent handshake, once it stopped
    assert len(answered) == (2 if s.host else 1), a.log
    if direct.verdict == "adjustable":
        fixed = await qlab.start(s.source.destination(s.dest_backends, **s.dest_changes),
                                 rewrite=lambda argv: apply_adjustments(argv, data["adjustments"]))
        after = await precheck(src.address, fixed.address)
        assert after.verdict == "compatible", after.findings
        migration = await qlab.migrate(src, fixed)
        assert migration.status == "completed", migration
        assert migration.offered_after == migration.offered_before


async def test_the_scratch_qemu_reproduces_the_source_device(qlab: Lab, pki: Pki, hosts: dict[str, Path]) -> None:
    """Device state beyond the offloads (ring sizes, MTU, speed/duplex, MAC, vectors, queue pairs, no ROM, slot)
    and a second NIC on -netdev user: a scratch QEMU answers as a destination with the same command line would."""
    odd = Nic("net0", "tap", (("rx_queue_size", "1024"), ("host_mtu", "9000"),
                              ("speed", "10000"), ("duplex", "full"), ("romfile", ""), ("mq", "on"),
                              ("vectors", "6"), ("addr", "0x7"), ("guest_ecn", "off")), queues=2)
    # a third NIC without an id, on a tap without USO: a destination with USO is adjusted on it by its QOM path
    spec = VmSpec(nics=(odd, Nic.make("net1", "user", csum=False), Nic("", "tap-nouso")))
    src = await qlab.start(spec)
    dst = await qlab.start(spec.destination({"": "tap"}))
    direct = await precheck(src.address, dst.address)
    anon = "/machine/peripheral-anon/device[0]"
    assert (direct.verdict, list(direct.adjustments)) == ("adjustable", [anon]), direct.findings
    async with agent(pki, "--qemu", str(hosts["10"])) as a:
        code, data = await cli_json("handshake", "--source", src.address, *tls(pki, a))
    assert (code, summary(data)) == (3, ("adjustable", direct.adjustments)), data
    assert not {"state-differs", "config-differs", "device-missing", "device-extra"} & set(codes(data)), data
    assert [d["path"] for d in data["devices"]] == [n.dev_path for n in direct.source.nics]  # type: ignore[union-attr]
    assert sorted(d["id"] for d in data["devices"]) == [anon, "net0", "net1"], data


async def test_without_the_machine_type_the_destination_answers_from_its_dump(qlab: Lab, pki: Pki,
                                                                              hosts: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """QEMU 7.2 cannot start pc-q35-10.0: with a dump, the answer is the dump's prediction and says so; without
    one, dest-cannot-run (blocked)."""
    src = await qlab.start(VmSpec(machine="pc-q35-10.0"))
    dump = tmp_path / "h3.dump"
    code, _, err = await cli("dump-host", "--out", str(dump), "--qemu", str(hosts["7.2"]), "--host", "h3",
                             "--machine", "pc-q35-7.2", "--machine", "pc-q35-10.0")
    assert code == 0, err
    async with agent(pki, "--qemu", str(hosts["7.2"]), "--dump", str(dump)) as a:
        code, data = await cli_json("handshake", "--source", src.address, *tls(pki, a))
    why = next(f["why"] for f in data["findings"] if f["code"] == "handshake")
    assert "the dump of host h3" in why and "no machine type pc-q35-10.0" in why, why
    assert "h3" in data["dest_predicted"]["from"], data["dest_predicted"]
    assert (code, data["verdict"]) == (1, "blocked") and "dest-cannot-run" in codes(data), data
    async with agent(pki, "--qemu", str(hosts["7.2"])) as a:
        code, data = await cli_json("handshake", "--source", src.address, *tls(pki, a))
    assert (code, data["verdict"]) == (1, "blocked") and "dest-cannot-run" in codes(data), data

