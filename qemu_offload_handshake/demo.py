"""``demo``: real local QEMU pairs through the precheck, each verdict then checked by really migrating.

Needs root and what ``scripts/setup.sh`` installs (``scripts/run demo`` does both). Leaves nothing behind.
"""

from __future__ import annotations

import re

from .api import precheck
from .core.argv import apply_adjustments
from .lab import Lab, Migration, Nic, Vm, VmSpec, prerequisites
from .render import verdict_table

__all__ = ["run_demo"]


def _title(text: str) -> None:
    print(f"\n=== {text}")


def _migration(result: Migration) -> None:
    line = f"real migration: {result.status}"
    if result.status != "completed":
        error = re.search(r"(Features 0x[0-9a-f]+ unsupported[^\n]*|saved image requires [^\n]*)", result.dest_error)
        line += f" (destination: {error.group(1) if error else result.dest_error.strip()[-200:]}); source is "
        line += str(result.source_state)
    print(line)


async def _pair(lab: Lab, spec: VmSpec, dest: VmSpec) -> tuple[Vm, Vm]:
    return await lab.start(spec), await lab.start(dest)


async def run_demo() -> int:
    problems = prerequisites()
    if problems:
        print("demo needs: " + "; ".join(problems))
        return 4
    async with Lab() as lab:
        _title("1. same command line, both hosts' taps have USO (booted guest)")
        spec = VmSpec(mode="booted")
        src, dst = await _pair(lab, spec, spec.destination())
        print(verdict_table(await precheck(src.address, dst.address)))
        _migration(await lab.migrate(src, dst))
        await lab.stop(src)
        await lab.stop(dst)

        _title("2. source host lacks USO (kernel < 6.2), destination has it: destination offers more")
        spec = VmSpec(mode="booted", nics=(Nic("net0", "tap-nouso"),))
        dest = spec.destination({"net0": "tap"})
        src, dst = await _pair(lab, spec, dest)
        verdict = await precheck(src.address, dst.address)
        print(verdict_table(verdict))
        await lab.stop(dst)
        print("\n... relaunching the destination with the adjustments:")
        dst = await lab.start(dest, rewrite=lambda argv: apply_adjustments(argv, verdict.adjustments))
        print("  " + next(a for a in dst.argv if ",id=net0," in a))
        print(verdict_table(await precheck(src.address, dst.address)))
        _migration(await lab.migrate(src, dst))
        await lab.stop(src)
        await lab.stop(dst)

        _title("3. source has USO and the guest uses it, destination host lacks USO")
        spec = VmSpec(mode="booted")
        src, dst = await _pair(lab, spec, spec.destination({"net0": "tap-nouso"}))
        print(verdict_table(await precheck(src.address, dst.address)))
        print("(migrating anyway, to show what the precheck prevented)")
        _migration(await lab.migrate(src, dst))
    return 0
