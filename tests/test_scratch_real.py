"""The scratch QEMU (``scratch.py``) on real QEMU 10.0, 7.2 and 11.1: it offers what a lab QEMU started with the
same command line offers, gives undetermined bits (never wrong ones) on 11.1, classifies why QEMU would not start,
and leaves no process, tap or folder behind after a refusal, a cancellation or a deadline."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from conftest import require_lab

from qemu_offload_handshake import scratch
from qemu_offload_handshake.core.errors import (
    BackendUnavailableError,
    CommandLineError,
    MachineTypeError,
    ScratchTimeoutError,
)
from qemu_offload_handshake.core.features import NEEDS_USO, bits_of
from qemu_offload_handshake.lab import Lab, Nic, VmSpec, owned_leftovers
from qemu_offload_handshake.lab.hosts import qemu_command
from qemu_offload_handshake.scratch import ScratchNic, probe_scratch, scratch_qemu

pytestmark = pytest.mark.qemu
USO = set(bits_of(NEEDS_USO))
SOME_OFF = {"mrg_rxbuf": False, "csum": False, "guest_tso4": False, "guest_ecn": False}
NICS_10 = (Nic("net0"), Nic("net1", "user"), Nic.make("net2", "tap", **SOME_OFF, host_uso=False))
VHOST = os.path.exists(scratch.VHOST_NET)
NICS_72 = (Nic("net0"), Nic("net1", "user"), Nic.make("net2", "tap", **SOME_OFF))  # 7.2 has no host_uso


def as_scratch(nics: tuple[Nic, ...]) -> list[ScratchNic]:
    """The lab's NICs for a scratch QEMU: a no-USO tap is a tap of a QEMU run with the shim."""
    return [ScratchNic(n.id, "user" if n.backend == "user" else "tap", n.props) for n in nics]


def mine() -> tuple[list[int], list[str], list[str]]:
    return owned_leftovers({os.getpid()})


def tap_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and alive(int(p.name)) and text.encode() in _cmdline(p)]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(("qemu", "machine", "nouso", "nics"), [
    ("10", "q35", False, NICS_10),
    ("10", "pc-q35-7.2", False, NICS_10),
    ("10", "q35", True, (Nic("net0", "tap-nouso"), Nic("net1", "user"), Nic.make("net2", "tap-nouso", **SOME_OFF))),
    ("7.2", "pc-q35-7.2", False, NICS_72),
], ids=["10-q35", "10-q35-7.2", "10-nouso", "7.2"])
async def test_scratch_offers_what_a_lab_qemu_with_the_same_command_line_offers(
        qlab: Lab, qemu: str, machine: str, nouso: bool, nics: tuple[Nic, ...]) -> None:
    vm = await qlab.start(VmSpec(qemu=qemu, machine=machine, nics=nics))  # type: ignore[arg-type]
    truth = await vm.features()
    got = await probe_scratch(qemu_command(qemu, nouso=nouso), machine=machine,  # type: ignore[arg-type]
                              nics=as_scratch(nics))
    assert {n.key: n.offered for n in got.report.nics} == truth
    assert got.version == vm.version and got.package and got.machine is not None
    assert got.machine.startswith("pc-q35-") and (machine == "q35" or got.machine == machine)
    assert all(n.offered_unknown == 0 for n in got.report.nics)
    assert set(dict(got.types)) >= {"csum", "mrg_rxbuf"} and set(dict(got.types).values()) == {"bool"}
    assert ("host_uso" in dict(got.types)) == (qemu == "10")
    taps = dict(got.taps)
    assert set(taps) == {"net0", "net2"} and all(t.startswith("qoh") and len(t) <= 15 for t in taps.values())
    assert not any(tap_exists(t) for t in taps.values())  # gone with their QEMU


@pytest.mark.parametrize("nouso", [False, True], ids=["tap", "nouso"])
async def test_qemu_111_gives_undetermined_bits_rather_than_wrong_ones(qlab: Lab, nouso: bool) -> None:
    """11.1's status query crashes it, so its bitmaps are derived; the truth is 10.0 on pc-q35-10.0, where 11.1's
    new UDP tunnel offloads are off (hw_compat_10_1) and both offer alike (seen with everything readable)."""
    nics = (Nic("net0", "tap-nouso" if nouso else "tap"), Nic("net1", "user"),
            Nic.make("net2", "tap-nouso" if nouso else "tap", host_uso=False, guest_uso4=False, guest_uso6=False))
    truth = await (await qlab.start(VmSpec(machine="pc-q35-10.0", nics=nics))).features()
    got = await probe_scratch(qemu_command("11.1", nouso=nouso), machine="pc-q35-10.0", nics=as_scratch(nics))
    assert got.version is not None and got.version[:2] == (11, 1)
    for nic in got.report.nics:
        assert nic.offered is not None and "offered" in nic.derived
        assert nic.offered & ~truth[nic.key] == 0, (nic.key, hex(nic.offered & ~truth[nic.key]))  # none invented
        assert truth[nic.key] & ~(nic.offered | nic.offered_unknown) == 0, nic.key  # none lost
    unknown = {n.key: set(bits_of(n.offered_unknown)) for n in got.report.nics}
    # A tap's USO cannot be told (the kernel accepts it; the shim denies it to QEMU alone): undetermined both ways.
    assert unknown == {"net0": USO, "net1": set(), "net2": set()}


async def test_a_refused_command_line_names_the_property_and_leaves_nothing() -> None:
    require_lab(guest=False)
    before = mine()
    nics = [ScratchNic.make("net0", bogus="on"), ScratchNic("net1", "user")]
    with pytest.raises(CommandLineError, match=r"Property 'virtio-net-pci\.bogus' not found") as info:
        await probe_scratch(qemu_command("10"), nics=nics)
    assert "-device virtio-net-pci,id=net0,netdev=hn0,bogus=on" in info.value.stderr
    assert mine() == before


@pytest.mark.parametrize("qemu", ["10", "7.2"])
async def test_a_missing_machine_type_and_a_missing_backend_are_told_apart(qemu: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    require_lab(guest=False)
    before = mine()
    machine = "pc-q35-10.0" if qemu == "7.2" else "pc-q35-99.0"
    with pytest.raises(MachineTypeError, match="unsupported machine type") as info:
        await probe_scratch(qemu_command(qemu), machine=machine, nics=[ScratchNic("net0")])  # type: ignore[arg-type]
    assert info.value.machine == machine
    if VHOST:
        pytest.skip("this host has /dev/vhost-net: QEMU cannot be shown refusing vhost=on")
    with pytest.raises(BackendUnavailableError, match="no /dev/vhost-net") as missing:
        await probe_scratch(qemu_command(qemu), nics=[ScratchNic("net0", "tap-vhost")])  # type: ignore[arg-type]
    assert missing.value.backend == "tap-vhost" and missing.value.nic == "net0" and not missing.value.stderr
    # Asked anyway (the check bypassed): 10.0 exits, 7.2 aborts on an assertion; both say so on the -netdev line.
    monkeypatch.setattr(scratch, "backend_problem", lambda kind: None)
    with pytest.raises(BackendUnavailableError, match="vhost") as refused:
        await probe_scratch(qemu_command(qemu), nics=[ScratchNic("net0", "user"),  # type: ignore[arg-type]
                                                     ScratchNic("net1", "tap-vhost")])
    assert refused.value.backend == "tap-vhost" and refused.value.nic == "net1" and refused.value.stderr
    assert mine() == before


def blocked_after_its_taps(fifo: Path) -> list[str]:
    """Arguments that make QEMU block after it made its taps and QMP socket, before it greets: a filter-dump
    object is created after the netdevs (vl.c, qemu_create_late_backends) and opens its file for writing, which
    for a FIFO waits for a reader (seen on 10.0: tap and socket there, no greeting). ``hn0`` is the scratch's
    netdev of its first NIC."""
    os.mkfifo(fifo)
    return ["-object", f"filter-dump,id=qoh-block,netdev=hn0,file={fifo}"]


async def test_cancelled_mid_start_leaves_nothing(tmp_path: Path) -> None:
    require_lab(guest=False)
    before = mine()
    task = asyncio.create_task(probe_scratch(qemu_command("10"), nics=[ScratchNic("net0")], timeout=60,
                                             extra_args=blocked_after_its_taps(tmp_path / "fifo")))
    deadline = time.monotonic() + 30
    while not (mine()[0] and mine()[1]):  # QEMU runs and its tap exists
        assert not task.done() and time.monotonic() < deadline, task
        await asyncio.sleep(0.01)
    running = mine()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert mine() == before
    assert not any(alive(pid) for pid in running[0])


async def test_a_qemu_that_never_greets_is_given_up_at_the_deadline(tmp_path: Path) -> None:
    require_lab(guest=False)
    before = mine()
    # A "QEMU" that never greets, from a shell that does not exec: the whole process group must go.
    (tmp_path / "sleeper").symlink_to("/bin/sleep")
    wrapper = tmp_path / "never-greets"
    wrapper.write_text(f"#!/bin/sh\n{tmp_path / 'sleeper'} 60\n")
    wrapper.chmod(0o755)
    start = time.monotonic()
    with pytest.raises(ScratchTimeoutError, match=r"no QMP greeting within 0\.5 s"):
        await probe_scratch(str(wrapper), nics=[ScratchNic("net0", "user")], timeout=0.5)
    assert time.monotonic() - start < 5
    # And a real QEMU stuck after making its tap.
    with pytest.raises(ScratchTimeoutError):
        await probe_scratch(qemu_command("10"), nics=[ScratchNic("net0")], timeout=1.0,
                            extra_args=blocked_after_its_taps(tmp_path / "fifo"))
    await asyncio.sleep(0)
    assert mine() == before
    assert processes_naming(str(tmp_path)) == []


@pytest.mark.parametrize(("qemu", "default"), [("10", "pc-i440fx-10.0"), ("11.1", "pc-i440fx-11.1")])
async def test_the_scratch_qemu_is_gone_when_the_block_is_left(qemu: str, default: str) -> None:
    """Its process, its folder and its tap, at once: also on 11.1, whose io_uring keeps a tap alive for a few
    milliseconds after the process is reaped."""
    require_lab(guest=False)
    before = mine()
    async with scratch_qemu(qemu_command(qemu), nics=[ScratchNic("net0"), ScratchNic("net1", None)]) as s:  # type: ignore[arg-type]
        assert s.pid is not None and alive(s.pid) and s.dir is not None and s.dir.exists()
        tap = s.taps["net0"]
        assert tap_exists(tap)
        report = await s.probe()
        assert report.machine == default  # QEMU's default machine type, resolved
        assert report.nic("net1") is not None and report.nic("net1").backend is None  # type: ignore[union-attr]
    assert not alive(s.pid) and not s.dir.exists() and not tap_exists(tap)
    assert mine() == before
