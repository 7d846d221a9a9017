"""A guest whose virtio-net driver comes up late (``VmSpec.driver_delay``): not loaded when QEMU is first looked at,
loaded seconds later, also while its RAM is being migrated (what a guarded migration has to cope with)."""

from __future__ import annotations

import asyncio

import pytest

from qemu_offload_handshake.lab import DRIVER_OK, GUEST_READY, GUEST_WAITING, Lab, Vm, VmSpec

pytestmark = pytest.mark.qemu

DELAY = 3  # seconds; the driver is up ~DELAY + 0.1 s after QOH-GUEST-WAITING
SLOW = 8 << 20  # bytes/s: a booted guest's ~88 MB of RAM takes ~9.5 s at this rate (~2.4 s at 32 MiB/s)


async def migration_status(vm: Vm) -> str:
    return str((await vm.execute("query-migrate")).get("status"))


async def test_delayed_guest_starts_without_driver_and_loads_it_later(qlab: Lab) -> None:
    vm = await qlab.start(VmSpec(mode="booted", driver_delay=DELAY))
    assert f"qoh.delay={DELAY}" in " ".join(vm.argv)
    assert GUEST_WAITING in vm.serial_text() and GUEST_READY not in vm.serial_text()
    assert not (await vm.driver_status())["net0"] & DRIVER_OK
    assert (await vm.features("guest-features"))["net0"] == 0  # nothing negotiated yet
    await qlab.wait_guest_ready(vm)
    assert (await vm.driver_status())["net0"] & DRIVER_OK
    negotiated = (await vm.features("guest-features"))["net0"]
    assert negotiated != 0
    assert vm.guest_features() == {"eth0": negotiated}  # the guest's own report agrees
    assert VmSpec(driver_delay=DELAY).destination().driver_delay == DELAY  # both sides: the same command line


async def test_delayed_driver_loads_while_the_ram_is_migrated(qlab: Lab) -> None:
    spec = VmSpec(mode="booted", driver_delay=DELAY)
    src, dst = await asyncio.gather(qlab.start(spec), qlab.start(spec.destination()))
    assert dst.argv[dst.argv.index("-append") + 1] == src.argv[src.argv.index("-append") + 1]
    caps = {"capabilities": [{"capability": "return-path", "state": True}]}
    await src.execute("migrate-set-capabilities", caps)
    await dst.execute("migrate-set-capabilities", caps)
    await src.execute("migrate-set-parameters", {"max-bandwidth": SLOW})
    uri = f"unix:{qlab.dir / (dst.name + '-migrate.sock')}"
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (status := await migration_status(src)) != "active":
        assert status in ("setup", "none") and loop.time() < deadline, status
        await asyncio.sleep(0.02)
    assert GUEST_READY not in src.serial_text()  # the driver was not up before the migration was under way
    assert not (await src.driver_status())["net0"] & DRIVER_OK
    while GUEST_READY not in src.serial_text():
        assert loop.time() < deadline, src.serial_text()[-2000:]
        await asyncio.sleep(0.05)
    # active before and after the guest printed READY: it was active then (it never goes back to active)
    assert await migration_status(src) == "active"
    await qlab.wait_guest_ready(src)  # DRIVER_OK on the source, still migrating
    assert (await src.features("guest-features"))["net0"] != 0
    assert await migration_status(src) == "active"
    await src.execute("migrate_cancel")
    while (status := await migration_status(src)) != "cancelled":
        assert status in ("active", "cancelling") and loop.time() < deadline + 10, status
        await asyncio.sleep(0.05)
    assert await src.run_state() == "running"
