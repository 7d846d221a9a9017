"""Record what a real precheck probe asks a real QEMU and what QEMU answers, for the fake QMP server.

Run as root after scripts/setup.sh:  .venv/bin/python scripts/capture_transcript.py
Writes tests/data/transcript-<name>.json: {"exchanges": [[command, arguments, reply-or-error], ...],
"report": hex of the wire-encoded VmReport the probe made from those answers, "greeting": the QEMU version and
package of its QMP greeting}. The fake server replays it without the host facts a local QEMU has (its taps).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu_offload_handshake import CommandError, encode
from qemu_offload_handshake.lab import Lab, Nic, VmSpec
from qemu_offload_handshake.probing import probe_vm
from qemu_offload_handshake.qmp import ReadOnlyQMP, parse_address

OUT = Path(__file__).resolve().parents[1] / "tests" / "data"
CASES = {
    "qemu10-4nics-booted": VmSpec(mode="booted", nics=tuple(Nic(f"net{i}") for i in range(4))),
    "qemu72-1nic-booted": VmSpec(qemu="7.2", machine="pc-q35-7.2", mode="booted"),
    "qemu111-2nics-booted": VmSpec(qemu="11.1", mode="booted", nics=(Nic("net0"), Nic("net1", "user"))),
}


class Recorder(ReadOnlyQMP):
    def __init__(self, address: Any) -> None:
        super().__init__(address)
        self.exchanges: list[list[Any]] = []

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        try:
            reply = await super().execute(command, arguments)
        except CommandError as err:
            self.exchanges.append([command, dict(arguments or {}), {"error": {"class": err.error_class,
                                                                              "desc": err.desc}}])
            raise
        self.exchanges.append([command, dict(arguments or {}), {"return": reply}])
        return reply


async def main() -> None:
    async with Lab() as lab:
        for name, spec in CASES.items():
            vm = await lab.start(spec)
            async with Recorder(parse_address(vm.address)) as qmp:
                qmp.peer_pid = None  # as the fake server will be seen: no host facts about its taps
                report = await probe_vm(qmp, host=name)
            version = dict(zip(("major", "minor", "micro"), qmp.version or (), strict=False))
            record = {"exchanges": qmp.exchanges, "report": encode(report).hex(),
                      "greeting": {"qemu": version, "package": qmp.package}}
            (OUT / f"transcript-{name}.json").write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
            print(name, len(qmp.exchanges), "exchanges")
            await lab.stop(vm)


if __name__ == "__main__":
    asyncio.run(main())
