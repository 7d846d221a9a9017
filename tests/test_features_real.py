"""The catalogue's property names and defaults, checked against the real QEMU binaries' own help."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import require_lab

from qemu_offload_handshake.core.features import BY_PROPERTY, CATALOGUE
from qemu_offload_handshake.lab import qemu_build

pytestmark = pytest.mark.qemu


def device_help(binary: str, env: dict[str, str] | None = None) -> dict[str, bool]:
    out = subprocess.run([binary, "-device", "virtio-net-device,help"], capture_output=True, text=True,
                         timeout=30, env=env, check=True).stdout
    return {m.group(1): m.group(2) in ("on", "true")
            for m in re.finditer(r"^\s+(\w+)=<bool>\s+- on/off \(default: (on|off|true|false)\)", out, re.M)}


def test_catalogue_defaults_match_qemu_10() -> None:
    require_lab(guest=False, qemu72=False)
    props = device_help(qemu_build("10").binary)
    known = {name: BY_PROPERTY[name].default for name in props if name in BY_PROPERTY}
    assert len(known) >= 30  # QEMU 10.0 has every catalogue property but the 10.2 tunnel ones
    assert known == {name: props[name] for name in known}
    missing = {f.prop for f in CATALOGUE if f.prop and f.prop not in props}
    assert missing == {"guest_tunnel", "guest_tunnel_csum", "host_tunnel", "host_tunnel_csum"}


def test_qemu_7_2_has_no_uso_properties() -> None:
    require_lab(guest=False)
    build = qemu_build("7.2")
    props = device_help(build.binary, dict(build.env))
    assert "csum" in props
    assert not {"host_uso", "guest_uso4", "guest_uso6"} & set(props)
    assert all(props[name] == BY_PROPERTY[name].default for name in props if name in BY_PROPERTY)
