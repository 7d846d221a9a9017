"""The tree tells the design: a pure core (no event loop, no processes, no sockets, no files), the I/O shell
beside it, the lab apart; rules as a table that the README mirrors; modules readable in one sitting."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import qemu_offload_handshake
from qemu_offload_handshake.core.errors import HandshakeError
from qemu_offload_handshake.core.rules import RULES
from qemu_offload_handshake.lab import LabError

PACKAGE = Path(qemu_offload_handshake.__file__).parent
README = PACKAGE.parent / "README.md"
# Imports that mean I/O or concurrency; the core must use none of them.
IMPURE = {"asyncio", "subprocess", "socket", "os", "pathlib", "shutil", "tempfile", "threading", "ctypes", "fcntl",
          "select", "signal", "qemu", "urllib", "http", "ssl"}
IMPURE_CALLS = {"open", "input", "print"}
# Over the 400-line mark, with the reason (kept short: split them when they grow).
LONG = {"core/wire.py": 430, "core/wire_layout.py": 460}


def core_modules() -> list[Path]:
    return sorted((PACKAGE / "core").glob("*.py"))


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_the_core_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
            assert node.level <= 1, f"{path.name} imports from outside the core: {ast.unparse(node)}"
        else:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in IMPURE_CALLS, f"{path.name}:{node.lineno} calls {node.func.id}()"
            continue
        for name in names:
            assert name.split(".")[0] not in IMPURE, f"{path.name}:{node.lineno} imports {name}"


def test_importing_the_core_loads_no_event_loop_or_qmp_client() -> None:
    import subprocess
    import sys
    code = ("import sys, qemu_offload_handshake.core.decide, qemu_offload_handshake.core.wire; "
            "import qemu_offload_handshake; "
            "print(sorted(m for m in ('asyncio', 'qemu.qmp', 'subprocess') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_modules_are_readable_in_one_sitting() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        lines = len(path.read_text().splitlines())
        assert lines <= LONG.get(name, 400), f"{name} has {lines} lines"


def test_the_lab_is_not_part_of_the_product_error_tree() -> None:
    assert not issubclass(LabError, HandshakeError)
    assert "lab" not in {m.split(".")[0] for m in qemu_offload_handshake.__all__}


def test_the_public_api_is_importable_from_the_package_root() -> None:
    for name in qemu_offload_handshake.__all__:
        assert getattr(qemu_offload_handshake, name) is not None
    assert callable(qemu_offload_handshake.precheck) and callable(qemu_offload_handshake.probe)
    assert importlib.import_module("qemu_offload_handshake").decide.__module__.endswith("core.decide")


def test_the_readme_lists_every_rule_with_its_severities() -> None:
    rows = re.findall(r"^\| `([a-z_-]+)` \| (\w+) \| (\w+) \| (.+) \|$", README.read_text(), re.MULTILINE)
    table = {code: (strict, lenient) for code, strict, lenient, _ in rows if code in RULES or "-" in code}
    assert table == {code: (r.strict.value, r.lenient.value) for code, r in RULES.items()}


def test_every_code_the_decision_emits_is_a_rule() -> None:
    source = "\n".join(p.read_text() for p in core_modules()) + (PACKAGE / "cli.py").read_text()
    source += (PACKAGE / "libvirt_migrate.py").read_text()
    emitted = set(re.findall(r'c\.add\([^,]+,\s*"([a-z_-]+)"', source))
    emitted |= set(re.findall(r'_bit_finding\(c, [^,]+,\s*"([a-z_-]+)"', source))
    emitted |= set(re.findall(r'\("(report-[a-z-]+)",', source))
    emitted |= set(re.findall(r'\((?:nic\.key|""),\s*"([a-z-]+)"', source))  # predict.py's (device, code, why)
    emitted |= set(re.findall(r'return "([a-z-]+)", f"', source))  # predict.py's (code, why)
    emitted |= set(re.findall(r'"(hook-[a-z]+)"', source))  # libvirt_migrate.py: the hook's refusal
    emitted |= {f"backend-{check}{end}" for check in ("vnet_hdr", "has_ufo") for end in ("", "-unknown")}
    assert len(emitted) > 30  # the scan itself works
    assert emitted == set(RULES)
