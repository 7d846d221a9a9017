"""Host dumps (``dump.dump_host``) of the lab's "hosts" (wrapper scripts, ``lab/hosts.py``) on real QEMU: what
each can offer per machine type and backend, the effective defaults per machine type, the properties and their
types, and what could not be probed, with reasons."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from conftest import require_lab

from qemu_offload_handshake import qemuproc, scratch
from qemu_offload_handshake.core.features import NEEDS_TUNNEL, NEEDS_USO, NEEDS_VNET_HDR, bits_of
from qemu_offload_handshake.core.model import Tri
from qemu_offload_handshake.core.platform import HostDump
from qemu_offload_handshake.dump import CEILING, ceiling_properties, dump_host
from qemu_offload_handshake.lab import Lab, Nic, VmSpec
from qemu_offload_handshake.lab.hosts import HostKind, write_host

pytestmark = pytest.mark.qemu
MACHINES = ("pc-q35-7.2", "pc-q35-10.0")
BACKENDS = ("tap", "tap-vhost", "user")
HOSTS: dict[str, HostKind] = {"h10": "10", "h10-nouso": "10-nouso", "h72": "7.2", "h111": "11.1"}
USO, TUNNEL = NEEDS_USO, NEEDS_TUNNEL
HASH, RSS, RSC_EXT = 1 << 57, 1 << 60, 1 << 61
VHOST = os.path.exists(scratch.VHOST_NET)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[HostDump, Path]]:
    """The four lab hosts' dumps, taken at once (shared by the tests of this module)."""
    require_lab(guest=False)
    folder = tmp_path_factory.mktemp("hosts")
    wrappers = {name: write_host(folder, kind) for name, kind in HOSTS.items()}

    async def take() -> list[HostDump]:
        return await asyncio.gather(*(dump_host(str(w), machines=MACHINES, backends=BACKENDS, host=name)
                                      for name, w in wrappers.items()))
    return {name: (d, wrappers[name]) for name, d in zip(wrappers, asyncio.run(take()), strict=True)}


def offer(d: HostDump, machine: str, backend: str) -> int:
    found = d.offer(machine, backend)
    assert found is not None, (d.host, machine, backend, d.why_not(machine, backend))
    return found.offered


def test_each_dump_says_which_host_kernel_and_qemu_it_is(dumps: dict[str, tuple[HostDump, Path]]) -> None:
    versions = {"h10": (10, 0), "h10-nouso": (10, 0), "h72": (7, 2), "h111": (11, 1)}
    for name, (d, wrapper) in dumps.items():
        assert d.host == name and d.kernel == os.uname().release and d.binary == str(wrapper)
        assert d.qemu_version[:2] == versions[name] and d.package and d.package.startswith("Debian")
        assert d.default_machine == f"pc-i440fx-{versions[name][0]}.{versions[name][1]}"
        assert abs(d.made_at - time.time()) < 600


def test_tap_vhost_is_unprobed_with_its_reason_where_there_is_no_vhost_net(
        dumps: dict[str, tuple[HostDump, Path]]) -> None:
    for d, _ in dumps.values():
        for machine in (m.machine for m in d.machines):
            if VHOST:
                assert d.offer(machine, "tap-vhost") is not None
            else:
                assert d.offer(machine, "tap-vhost") is None
                assert "no /dev/vhost-net" in (d.why_not(machine, "tap-vhost") or "")
        if not VHOST:
            assert [(u.machine, u.backend) for u in d.unprobed if u.backend == "tap-vhost"] == [(None, "tap-vhost")]


def test_qemu_72_lacks_pc_q35_10_0_and_says_so(dumps: dict[str, tuple[HostDump, Path]]) -> None:
    d = dumps["h72"][0]
    assert [m.machine for m in d.machines] == ["pc-q35-7.2"]
    shown = ".".join(map(str, d.qemu_version))
    assert d.why_not("pc-q35-10.0", "tap") == f"QEMU {shown} has no machine type pc-q35-10.0"
    assert next(u for u in d.unprobed if u.machine == "pc-q35-10.0").backend is None
    for name in ("h10", "h10-nouso", "h111"):
        assert [m.machine for m in dumps[name][0].machines] == sorted(MACHINES)  # sorted by name


def test_properties_and_their_types_are_recorded(dumps: dict[str, tuple[HostDump, Path]]) -> None:
    props = {name: dict(d.properties) for name, (d, _) in dumps.items()}
    assert all(set(p.values()) == {"bool"} for p in props.values())  # no OnOffAuto offloads in 7.2, 10.0, 11.1
    assert "host_uso" not in props["h72"] and "host_uso" in props["h10"]
    assert "host_tunnel" in props["h111"] and "host_tunnel" not in props["h10"]
    assert props["h10"] == props["h10-nouso"] and {"csum", "mrg_rxbuf", "queue_reset", "mq"} <= set(props["h72"])


def test_defaults_are_per_machine_type(dumps: dict[str, tuple[HostDump, Path]]) -> None:
    for name in ("h10", "h111"):
        d = dumps[name][0]
        old, new = (dict(d.machine(m).defaults) for m in MACHINES)  # type: ignore[union-attr]
        assert {old[p] for p in ("host_uso", "guest_uso4", "guest_uso6")} == {Tri.OFF}  # hw_compat_8_1
        assert {new[p] for p in ("host_uso", "guest_uso4", "guest_uso6")} == {Tri.ON}
        assert set(old) == set(new) == set(dict(d.properties))  # every property this QEMU has
        assert old["csum"] is Tri.ON and old["rss"] is Tri.OFF and new["mq"] is Tri.OFF
    d111 = dumps["h111"][0]
    assert dict(d111.machine("pc-q35-10.0").defaults)["host_tunnel"] is Tri.OFF  # type: ignore[union-attr]
    d72 = dumps["h72"][0]
    assert "host_uso" not in dict(d72.machine("pc-q35-7.2").defaults)  # type: ignore[union-attr]


def test_what_each_host_can_offer(dumps: dict[str, tuple[HostDump, Path]]) -> None:
    h10, nouso, h72 = dumps["h10"][0], dumps["h10-nouso"][0], dumps["h72"][0]
    for machine in MACHINES:
        # every property on explicitly: QEMU 10 offers USO on tap even on pc-q35-7.2 (compat only sets defaults)
        assert offer(h10, machine, "tap") & USO == USO
        assert offer(nouso, machine, "tap") & USO == 0  # the no-USO host lacks bits 54-56 on tap...
        assert offer(nouso, machine, "tap") == offer(h10, machine, "tap") & ~USO  # ...and nothing else
        assert offer(nouso, machine, "user") == offer(h10, machine, "user")
        # hash, RSS and RSC_EXT on, and offered on tap; without a header only RSS and RSC_EXT remain
        assert offer(h10, machine, "tap") & (HASH | RSS | RSC_EXT) == HASH | RSS | RSC_EXT
        assert offer(h10, machine, "user") & NEEDS_VNET_HDR == 0 and offer(h10, machine, "user") & RSS
        assert all(o.unknown == 0 for d in (h10, nouso) for o in d.machine(machine).offers)  # type: ignore[union-attr]
    assert offer(h72, "pc-q35-7.2", "tap") == offer(h10, "pc-q35-7.2", "tap") & ~USO  # 7.2 has no USO at all
    assert offer(h72, "pc-q35-7.2", "user") == offer(h10, "pc-q35-7.2", "user")


def test_qemu_111_dump_has_unknown_bits_where_the_derivation_cannot_tell(
        dumps: dict[str, tuple[HostDump, Path]]) -> None:
    d111, h10 = dumps["h111"][0], dumps["h10"][0]
    for machine in MACHINES:
        tap, user = d111.offer(machine, "tap"), d111.offer(machine, "user")
        assert tap is not None and user is not None
        # a tap's USO and UDP tunnel offloads, HASH and RSS (eBPF RSS or not): undetermined, never guessed
        assert tap.unknown == USO | TUNNEL | HASH | RSS and user.unknown == RSS
        # what it does determine agrees with QEMU 10.0's read bitmap, and nothing 10.0 offers is lost
        for backend, got in (("tap", tap), ("user", user)):
            truth = offer(h10, machine, backend)
            assert got.offered & ~truth == 0 and truth & ~(got.offered | got.unknown) == 0, backend
    assert [b for b in bits_of(d111.offer("pc-q35-10.0", "tap").unknown)] == [  # type: ignore[union-attr]
        54, 55, 56, 57, 60, 65, 66, 67, 68]


async def test_the_ceiling_is_what_a_lab_qemu_with_every_property_on_offers(
        qlab: Lab, dumps: dict[str, tuple[HostDump, Path]]) -> None:
    d = dumps["h10"][0]
    props = ceiling_properties(dict(d.properties))
    assert set(props) == {p for p in CEILING if p in dict(d.properties)} and set(props.values()) == {"on"}
    vm = await qlab.start(VmSpec(machine="pc-q35-7.2", nics=(Nic("net0", props=tuple(props.items())),)))
    assert (await vm.features())["net0"] == offer(d, "pc-q35-7.2", "tap")


async def test_default_machine_aliases_a_non_root_host_and_the_time_it_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    require_lab(guest=False)
    d = await dump_host(backends=("user",), host="h")  # QEMU 10 from PATH, its default machine type
    assert [m.machine for m in d.machines] == [d.default_machine] == ["pc-i440fx-10.0"]
    d = await dump_host(machines=("q35", "pc-q35-10.0"), backends=("user",), host="h")
    assert [m.machine for m in d.machines] == ["pc-q35-10.0"]  # an alias is recorded under its real name
    start = time.perf_counter()
    await dump_host(machines=MACHINES, host="h")  # one host, two machine types, two backends
    assert time.perf_counter() - start < 2.0
    monkeypatch.setattr(qemuproc, "_has_net_admin", lambda: False)
    d = await dump_host(machines=("pc-q35-10.0",), backends=("tap", "user"), host="h")
    assert d.why_not("pc-q35-10.0", "tap") == "not root (no CAP_NET_ADMIN): QEMU cannot create a tap device"
    assert d.offer("pc-q35-10.0", "user") is not None
