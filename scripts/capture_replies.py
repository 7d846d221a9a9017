"""Capture real x-query-virtio-status replies from the lab's QEMUs into tests/data/ (test data for the parser).

Run as root after scripts/setup.sh:  .venv/bin/python scripts/capture_replies.py
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from qemu_offload_handshake.lab import Lab, Nic, VmSpec

OUT = Path(__file__).resolve().parents[1] / "tests" / "data"
CASES = {
    "qemu10-q35-tap-booted": VmSpec(mode="booted"),
    "qemu10-q35-nouso-booted": VmSpec(mode="booted", nics=(Nic("net0", "tap-nouso"),)),
    "qemu10-q35-user-paused": VmSpec(nics=(Nic("net0", "user"),)),
    "qemu10-q35-7.2-tap-booted": VmSpec(machine="pc-q35-7.2", mode="booted"),
    "qemu72-q35-7.2-tap-booted": VmSpec(qemu="7.2", machine="pc-q35-7.2", mode="booted"),
    "qemu72-q35-7.2-user-paused": VmSpec(qemu="7.2", machine="pc-q35-7.2", nics=(Nic("net0", "user"),)),
}


async def main() -> None:
    async with Lab() as lab:
        for name, spec in CASES.items():
            vm = await lab.start(spec)
            version = await vm.execute("query-version")
            path = (await vm.virtio_paths())["net0"]
            status = await vm.execute("x-query-virtio-status", {"path": path})
            record = {"spec": repr(spec), "query-version": version, "path": path, "x-query-virtio-status": status}
            (OUT / f"virtio-status-{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            print(name, version["package"])
            await lab.stop(vm)


if __name__ == "__main__":
    asyncio.run(main())
