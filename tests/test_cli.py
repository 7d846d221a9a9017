"""The command line as an operator's script uses it: exit codes, --json, files, usage errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import CHILD_PIDS, CI, Serve, ci_enabled, qemu_modules
from fakeqmp import HANG
from test_decide import NEGOTIATED, OFFERED, USO, nic, vm
from test_precheck_fake import status_reply, tunnel_props, with_tunnel_bits

from qemu_offload_handshake.core.argv import apply_adjustments
from qemu_offload_handshake.core.decide import decide
from qemu_offload_handshake.core.errors import UsageError
from qemu_offload_handshake.core.model import NicReport
from qemu_offload_handshake.lab import clean, owned_leftovers, prerequisites
from qemu_offload_handshake.render import verdict_json

TUNNEL_OFF = {"guest_tunnel": "off", "guest_tunnel_csum": "off", "host_tunnel": "off", "host_tunnel_csum": "off"}
TUNNEL_ROW = ("GUEST_UDP_TUNNEL_GSO (65), GUEST_UDP_TUNNEL_GSO_CSUM (66), HOST_UDP_TUNNEL_GSO (67), "
              "HOST_UDP_TUNNEL_GSO_CSUM (68)")


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run the command line; one that overruns ``timeout`` (or a test interrupted meanwhile) is killed, waited for,
    and whatever lab it ran is cleaned (its QEMUs die with it, its taps and folders would not)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_offload_handshake", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    CHILD_PIDS.add(proc.pid)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        pytest.fail(f"{' '.join(args)}: no exit within {timeout} s; killed", pytrace=False)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            clean(owned_leftovers({proc.pid}))
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
    assert data["verdict"] == "adjustable"
    assert data["adjustments"] == {key: TUNNEL_OFF for key in ("net0", "net1", "net2", "net3")}
    assert data["findings"] == []
    finding = next(f for f in data["devices"][0]["findings"] if f["bit"] == 65)
    assert finding == {"severity": "adjust", "code": "offer-extra", "feature": "VIRTIO_NET_F_GUEST_UDP_TUNNEL_GSO",
                       "bit": 65, "source": "not offered", "dest": "offered", "negotiated": False,
                       "why": "only the destination offers it; turn it off there to keep the guest ABI identical."}
    assert [(f["code"], f["bit"]) for d in data["devices"] for f in d["findings"]] == [
        ("offer-extra", bit) for _ in range(4) for bit in (65, 66, 67, 68)]
    code, out, _ = await cli("precheck", "--source", newer, "--dest", plain)
    assert code == 1
    assert out.splitlines()[0] == "verdict: BLOCKED  (strict mode)"
    rows = [re.split(r" {2,}", line.strip()) for line in out.splitlines() if line.startswith("  blocker ")]
    assert rows == [["blocker", key, "offered", "not offered", TUNNEL_ROW] for key in ("net0", "net1", "net2", "net3")]
    assert "why: the destination does not offer it (this QEMU has no property for it: it predates the feature)" in out
    code, out, _ = await cli("precheck", "--source", newer, "--dest", plain, "--lenient", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["verdict"], data["adjustments"], data["recommendations"]) == ("compatible", {}, {})
    assert {(f["severity"], f["code"]) for d in data["devices"] for f in d["findings"]} == {
        ("warning", "offer-missing")}
    code, out, _ = await cli("precheck", "--source", plain, "--dest", "unix:/nonexistent.sock", "--timeout", "1")
    assert code == 4
    assert out.splitlines()[0] == "verdict: UNKNOWN  (strict mode)"
    assert "why: the destination could not be probed: unix:/nonexistent.sock: cannot connect: [Errno 2] No such file " \
           "or directory" in out


async def test_usage_errors_exit_2_with_a_clear_message(serve: Serve, tmp_path: Path) -> None:
    plain = await serve()
    code, _, err = await cli("precheck", "--source", "tcp:nohost", "--dest", plain)
    assert code == 2
    assert "tcp:HOST:PORT" in err
    code, _, err = await cli("precheck", "--dest", plain)
    assert code == 2
    assert "the following arguments are required: --source" in err
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
    data = json.loads(out)
    assert data["verdict"] == "adjustable"
    assert data["adjustments"] == {key: TUNNEL_OFF for key in ("net0", "net1", "net2", "net3")}
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


def driver(statuses: list[str], *, negotiated: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """x-query-virtio-status of the booted transcript with another driver status (and, without ``negotiated``, no
    guest features)."""
    def status(args: dict[str, Any]) -> dict[str, Any]:
        reply = status_reply(args["path"])
        reply["return"]["status"] = {"statuses": statuses}
        if not negotiated:
            reply["return"]["guest-features"] = {"dev-features": [], "transports": []}
        return reply
    return status


ACK_DRIVER = ["VIRTIO_CONFIG_S_ACKNOWLEDGE: Valid virtio device found",
              "VIRTIO_CONFIG_S_DRIVER: Guest OS compatible with device"]


@pytest.mark.parametrize(("statuses", "negotiated", "expected"), [
    ([*ACK_DRIVER, "VIRTIO_CONFIG_S_FEATURES_OK: Feature negotiation complete",
      "VIRTIO_CONFIG_S_DRIVER_OK: Driver setup and ready"], True, False),  # booted: the guest did not take them
    ([], False, None),  # no driver yet (a VM paused before its guest ran)
    (ACK_DRIVER, True, None),  # a driver that wrote its features but has not set FEATURES_OK: not negotiated yet
], ids=["booted", "no-driver", "no-features-ok"])
async def test_json_negotiated_is_null_until_a_driver_has_negotiated(
        serve: Serve, statuses: list[str], negotiated: bool, expected: bool | None) -> None:
    source = await serve(overrides={"x-query-virtio-status": driver(statuses, negotiated=negotiated)})
    newer = await serve(overrides={"x-query-virtio-status": with_tunnel_bits, "qom-list": tunnel_props})
    code, out, _ = await cli("precheck", "--source", source, "--dest", newer, "--json")
    assert code == 3
    data = json.loads(out)
    assert [(f["code"], f["bit"], f["negotiated"]) for d in data["devices"] for f in d["findings"]] == [
        ("offer-extra", bit, expected) for _ in range(4) for bit in (65, 66, 67, 68)]


def test_json_negotiated_is_null_when_the_negotiated_features_are_unknown_or_derived() -> None:
    def negotiated(src: NicReport, dst: NicReport) -> list[tuple[str, int | None, bool | None]]:
        data = verdict_json(decide(vm(src), vm(dst)))
        return [(f["code"], f["bit"], f["negotiated"]) for d in data["devices"] for f in d["findings"]
                if f["bit"] is not None]
    uso = [54, 55, 56]
    no_uso = nic(OFFERED & ~USO)
    assert negotiated(nic(status=15), no_uso) == [("negotiated-missing", b, True) for b in uso]
    assert negotiated(nic(), no_uso) == [("offer-missing", b, None) for b in uso]  # no driver
    assert negotiated(nic(negotiated=NEGOTIATED, status=3), no_uso) == [("negotiated-missing", b, None) for b in uso]
    unread = replace(nic(status=15), negotiated=None)
    assert negotiated(unread, no_uso) == [("offer-missing", b, None) for b in uso]
    derived = replace(nic(status=15), derived=("negotiated", "offered"))
    assert negotiated(derived, no_uso) == [("negotiated-missing", b, None) for b in uso]
    booted_no_uso = nic(OFFERED & ~USO, NEGOTIATED & ~USO, status=15)
    assert negotiated(booted_no_uso, nic()) == [("offer-extra", b, False) for b in uso]


async def test_a_command_that_overruns_is_killed_and_waited_for(serve: Serve) -> None:
    hung = await serve(overrides={"x-query-virtio-status": HANG})
    before = set(CHILD_PIDS)
    with pytest.raises(pytest.fail.Exception, match=r"no exit within 1 s; killed"):
        await cli("precheck", "--source", hung, "--dest", hung, "--timeout", "60", timeout=1)
    (pid,) = CHILD_PIDS - before
    with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie is left
        os.kill(pid, 0)


# The suite's own guards (tests/conftest.py), each checked by running pytest on part of this suite.

ROOT = Path(__file__).parents[1]


def pytest_run(*args: str, ci: str | None = None, **env: str) -> tuple[int, str]:
    """Run pytest on this suite in a child (``CI`` set to ``ci``, or unset): exit code and output."""
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")} | env
    if ci is not None:
        environ["CI"] = ci
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(("value", "enabled"), [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), (" FALSE ", False),
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True), ("github-actions", True)])
def test_ci_is_any_value_but_empty_0_or_false(value: str | None, enabled: bool) -> None:
    assert ci_enabled(value) is enabled


@pytest.mark.parametrize("ci", ["1", "yes", "True", "true"])
def test_under_ci_real_qemu_tests_dropped_by_k_fail_the_run(ci: str) -> None:
    code, out = pytest_run("tests/test_precheck_real.py", "-k", "no_test_has_this_name", ci=ci)
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "CI: 15 real-QEMU tests were deselected" in out


@pytest.mark.parametrize("ci", [None, "0", "false"])
def test_outside_ci_dropping_real_qemu_tests_is_allowed(ci: str | None) -> None:
    code, out = pytest_run("tests/test_precheck_real.py", "-k", "no_test_has_this_name", ci=ci)
    assert code == pytest.ExitCode.NO_TESTS_COLLECTED, out
    assert "CI:" not in out


def test_under_ci_a_missing_prerequisite_fails_instead_of_skipping() -> None:
    code, out = pytest_run("tests/test_features_real.py", QOH_CACHE="/nonexistent")
    assert code == pytest.ExitCode.OK, out
    assert "2 skipped" in out
    code, out = pytest_run("tests/test_features_real.py", ci="1", QOH_CACHE="/nonexistent")
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "2 failed" in out
    assert "Failed: real-QEMU prerequisites missing (run scripts/setup.sh)" in out


def test_under_ci_real_qemu_tests_skipped_or_not_collected_fail_the_run(tmp_path: Path) -> None:
    (tmp_path / "skip_them.py").write_text(
        "import pytest\n\n"
        "def pytest_collection_modifyitems(items):\n"
        "    for item in items:\n"
        "        item.add_marker(pytest.mark.skip(reason='skipped by a plugin'))\n")
    code, out = pytest_run("-p", "skip_them", "tests/test_features_real.py", ci="yes", PYTHONPATH=str(tmp_path))
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "CI: 2 real-QEMU tests were skipped" in out
    assert "skipped by a plugin" in out
    code, out = pytest_run("tests/test_qmp.py", "-k", "addresses", ci="yes")
    assert code == pytest.ExitCode.TESTS_FAILED, out
    modules = sorted(qemu_modules(ROOT / "tests"))
    assert {"test_precheck_real.py", "test_cli.py", "test_features_real.py"} <= set(modules)
    assert f"CI: real-QEMU test modules not collected (or all their qemu tests dropped): {modules}" in out


def need_taps() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        message = "needs root and /dev/net/tun for tap devices"
        if CI:
            pytest.fail(message)
        pytest.skip(message)


def fake_qemu(owner: int) -> subprocess.Popen[bytes]:
    """A process that looks like a lab QEMU of ``owner`` (its -name), so nothing real has to be left behind."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "qemu-system-x86_64", "-name",
                             f"qoh-lab-{owner}-1"])


def tap_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


@pytest.mark.qemu
def test_a_test_that_leaks_fails_naming_what_it_left_which_is_cleaned(tmp_path: Path) -> None:
    need_taps()
    (tmp_path / "test_leaky.py").write_text(
        "import os, subprocess, sys, pytest\n\n"
        "@pytest.mark.qemu\n"
        "def test_leaks() -> None:\n"
        "    subprocess.run(['ip', 'tuntap', 'add', 'dev', f'qoh{os.getpid() % 100000}t900', 'mode', 'tap'],\n"
        "                   check=True)\n"
        "    os.mkdir(f'/tmp/qoh-fake-{os.getpid()}-leak')\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', 'qemu-system-x86_64',\n"
        "                      '-name', f'qoh-lab-{os.getpid()}-1'])\n\n"
        "@pytest.mark.qemu\n"
        "def test_tidy() -> None:\n"
        "    pass\n")
    # tests/conftest.py as a plugin, for a test file outside tests/
    code, out = pytest_run("-c", str(ROOT / "pyproject.toml"), "-p", "conftest", str(tmp_path / "test_leaky.py"),
                           PYTHONPATH=str(ROOT / "tests"))
    assert code == pytest.ExitCode.TESTS_FAILED, out
    assert "ERROR at teardown of test_leaks _" in out
    m = re.search(r"LEAK: \S*::test_leaks left QEMU processes \[(\d+)\], tap devices \['qoh(\d+)t900'\] "
                  r"and folders \['(/tmp/qoh-fake-\d+-leak)'\] behind \(now cleaned: killed QEMU \1 .*; deleted tap "
                  r"qoh\2t900; removed folder \3\)", out)
    assert m, out
    assert "1 error" in out
    assert "test_tidy" not in out  # the next test is not blamed
    assert "\nLEAK: the run left" not in out  # cleaned at once: nothing left at the end of the run
    qemu, owner = int(m.group(1)), int(m.group(2))
    assert not Path(f"/proc/{qemu}/cmdline").exists() or b"qoh-lab" not in Path(f"/proc/{qemu}/cmdline").read_bytes()
    assert not tap_exists(f"qoh{owner}t900")
    assert not Path(m.group(3)).exists()


def dead_owner() -> int:
    """A number no live process has as its pid modulo 100000 (so a name carrying it has a dead owner)."""
    live = {int(p.name) % 100000 for p in Path("/proc").iterdir() if p.name.isdigit()}
    return next(n for n in range(99999, 0, -1) if n not in live)


@pytest.mark.qemu
def test_the_session_cleans_what_dead_runs_left_and_nothing_of_live_ones() -> None:
    need_taps()
    dead, me = dead_owner(), os.getpid()
    stale = {"tap": f"qoh{dead}t1", "folder": f"/tmp/qoh-fake-{dead}-stale"}
    live = {"tap": f"qoh{me % 100000}t901", "folder": f"/tmp/qoh-fake-{me}-live"}
    stale_qemu, live_qemu = fake_qemu(dead), fake_qemu(me)  # a live run's QEMU: its owner is its parent
    try:
        for items in (stale, live):
            subprocess.run(["ip", "tuntap", "add", "dev", items["tap"], "mode", "tap"], check=True)
            os.mkdir(items["folder"])
        time.sleep(0.2)  # the fake QEMUs have exec'd
        code, out = pytest_run("tests/test_qmp.py", "-k", "test_addresses")
        assert code == pytest.ExitCode.OK, out
        assert (f"cleaned what earlier runs left behind: killed QEMU {stale_qemu.pid} (-name qoh-lab-{dead}-...); "
                f"deleted tap {stale['tap']}; removed folder {stale['folder']}") in out
        assert stale_qemu.wait(5) == -signal.SIGKILL
        assert not tap_exists(stale["tap"])
        assert not os.path.exists(stale["folder"])
        assert live_qemu.poll() is None  # another run's (here: this one's) things are left alone
        assert tap_exists(live["tap"])
        assert os.path.exists(live["folder"])
    finally:
        for proc in (stale_qemu, live_qemu):
            proc.kill()
            proc.wait()
        for items in (stale, live):
            subprocess.run(["ip", "link", "del", items["tap"]], capture_output=True, check=False)
            shutil.rmtree(items["folder"], ignore_errors=True)
