"""Record what a real precheck probe asks a real QEMU and what QEMU answers, for the fake QMP server.

Run as root after scripts/setup.sh:  .venv/bin/python scripts/capture_transcript.py
Writes tests/data/transcript-<name>.json: {"exchanges": [[command, arguments, reply-or-error], ...],
"report": hex of the wire-encoded VmReport the probe made from those answers}.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qemu_offload_handshake import CommandError, encode
from qemu_offload_handshake.lab import Lab, Nic, VmSpec
from qemu_offload_handshake.probe import probe_vm
from qemu_offload_handshake.qmp import ReadOnlyQMP, parse_address

OUT = Path(__file__).resolve().parents[1] / "tests" / "data"
CASES = {
    "qemu10-4nics-booted": VmSpec(mode="booted", nics=tuple(Nic(f"net{i}") for i in range(4))),
    "qemu72-1nic-booted": VmSpec(qemu="7.2", machine="pc-q35-7.2", mode="booted"),
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
                report = await probe_vm(qmp, host=name)
            record = {"exchanges": qmp.exchanges, "report": encode(report).hex()}
            (OUT / f"transcript-{name}.json").write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
            print(name, len(qmp.exchanges), "exchanges")
            await lab.stop(vm)


if __name__ == "__main__":
    asyncio.run(main())
