"""The command line as an operator's script uses it: exit codes, --json, files, usage errors."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Serve
from test_precheck_fake import tunnel_props, with_tunnel_bits

from qemu_offload_handshake.argv import apply_adjustments
from qemu_offload_handshake.errors import UsageError
from qemu_offload_handshake.lab import prerequisites


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_offload_handshake", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_precheck_exit_codes_and_json(serve: Serve) -> None:
    plain, newer = await serve(), await serve(overrides={"x-query-virtio-status": with_tunnel_bits,
                                                         "qom-list": tunnel_props})
    code, out, _ = await cli("precheck", "--source", plain, "--dest", plain, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["verdict"] == "compatible"
    assert [d["id"] for d in data["devices"]] == ["net2", "net0", "net3", "net1"]
    code, out, _ = await cli("precheck", "--source", plain, "--dest", newer, "--json")
    assert code == 3
    data = json.loads(out)
    assert data["adjustments"]["net1"] == {"guest_tunnel": "off", "guest_tunnel_csum": "off", "host_tunnel": "off",
                                           "host_tunnel_csum": "off"}
    finding = next(f for f in data["devices"][0]["findings"] if f["bit"] == 65)
    assert finding == {"severity": "adjust", "code": "offer-extra", "feature": "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO",
                       "bit": 65, "source": "not offered", "dest": "offered", "negotiated": False,
                       "why": finding["why"]}
    code, out, _ = await cli("precheck", "--source", newer, "--dest", plain)
    assert code == 1
    assert "verdict: BLOCKED" in out
    code, out, _ = await cli("precheck", "--source", newer, "--dest", plain, "--lenient", "--json")
    assert code == 0
    assert json.loads(out)["recommendations"] == {}
    code, out, _ = await cli("precheck", "--source", plain, "--dest", "unix:/nonexistent.sock", "--timeout", "1")
    assert code == 4
    assert "could not be probed" in out


async def test_usage_errors_exit_2_with_a_clear_message(serve: Serve, tmp_path: Path) -> None:
    plain = await serve()
    code, _, err = await cli("precheck", "--source", "tcp:nohost", "--dest", plain)
    assert code == 2
    assert "tcp:HOST:PORT" in err
    code, _, err = await cli("precheck", "--dest", plain)
    assert code == 2
    policy = tmp_path / "policy.toml"
    policy.write_text('[properties]\nhost_uzo = "off"\n')
    code, _, err = await cli("precheck", "--source", plain, "--dest", plain, "--policy", str(policy))
    assert code == 2
    assert "host_uzo" in err
    assert str(policy) in err
    policy.write_text('[properties]\nguest_ecn = "off"\n')
    code, out, _ = await cli("precheck", "--source", plain, "--dest", plain, "--policy", str(policy))
    assert code == 1  # the source offers GUEST_ECN, the policy forbids it
    assert "policy requires guest_ecn=off" in out


async def test_probe_files_decode_and_offline_check(serve: Serve, tmp_path: Path) -> None:
    plain, newer = await serve(), await serve(overrides={"x-query-virtio-status": with_tunnel_bits,
                                                         "qom-list": tunnel_props})
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    src, dst = tmp_path / "src.qoh", tmp_path / "dst.qoh"
    for address, file in ((plain, src), (newer, dst)):
        code, stdout, _ = await cli("probe", address, "--out", str(file), "--host", "h1", "--key-file", str(key))
        assert code == 0, stdout
    code, out, _ = await cli("decode", str(dst), "--key-file", str(key))
    assert code == 0
    decoded: dict[str, Any] = json.loads(out)
    assert decoded["host"] == "h1"
    assert int(decoded["nics"][0]["offered"], 16) >> 65 & 0xF == 0xF  # bits above 64 survive the file
    code, out, _ = await cli("check", str(src), str(dst), "--key-file", str(key), "--json")
    assert code == 3
    assert json.loads(out)["verdict"] == "adjustable"
    other = tmp_path / "other"
    other.write_text("not the key")
    code, _, err = await cli("check", str(src), str(dst), "--key-file", str(other))
    assert code == 2
    assert "HMAC mismatch" in err
    dst.write_bytes(dst.read_bytes()[:-40])
    code, _, err = await cli("decode", str(dst))
    assert code == 2
    assert "truncated" in err


async def test_adjust_argv_command() -> None:
    code, out, _ = await cli("adjust-argv", "--adjustments", '{"net0": {"host_uso": "off"}}', "--",
                             "qemu", "-device", "virtio-net-pci,id=net0,netdev=n0,host_uso=on")
    assert code == 0
    assert json.loads(out) == ["qemu", "-device", "virtio-net-pci,id=net0,netdev=n0,host_uso=off"]


def test_apply_adjustments_both_device_syntaxes() -> None:
    adjustments = {"net0": {"guest_uso4": "off"}, "net1": {"host_uso": "off"}}
    argv = ["qemu", "-device", "virtio-net-pci,netdev=a,id=net0,romfile=a,,b",
            "--device={\"driver\": \"virtio-net-pci\", \"id\": \"net1\", \"host_uso\": true}",
            "-device", "virtio-net-pci,id=net2"]
    assert apply_adjustments(argv, adjustments) == [
        "qemu", "-device", "virtio-net-pci,netdev=a,id=net0,romfile=a,,b,guest_uso4=off",
        '--device={"driver":"virtio-net-pci","id":"net1","host_uso":false}',
        "-device", "virtio-net-pci,id=net2"]
    with pytest.raises(UsageError, match="net9"):
        apply_adjustments(argv, {"net9": {"host_uso": "off"}})


@pytest.mark.qemu
async def test_demo_shows_the_three_cases_and_real_migrations_agree() -> None:
    from conftest import require_lab
    require_lab()
    assert not prerequisites()
    code, out, err = await cli("demo")
    assert code == 0, err
    verdicts = [line.split()[1] for line in out.splitlines() if line.startswith("verdict:")]
    assert verdicts == ["COMPATIBLE", "ADJUSTABLE", "COMPATIBLE", "BLOCKED"]
    migrations = [line for line in out.splitlines() if line.startswith("real migration:")]
    assert migrations[:2] == ["real migration: completed"] * 2
    assert migrations[2].startswith("real migration: failed (destination: Features 0x")
    assert migrations[2].endswith("source is running")
