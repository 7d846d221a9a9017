"""Bad input on the command line: a one-line ``error: ...`` naming what was wrong, the README's exit code, never a
traceback, and never a probe that a bad argument would have wasted. No QEMU needed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOT_UTF8 = b"\xff\xfe not utf-8 \x80"
DEVICE = ["qemu", "-device", "virtio-net-pci,id=net0,netdev=n0,host_uso=on"]


def cli(*args: str) -> tuple[int, str, str]:
    # A strict stdout, as in a UTF-8 locale other than C.UTF-8; arguments may carry undecodable bytes.
    proc = subprocess.run([sys.executable, "-m", "qemu_offload_handshake", *args], capture_output=True, text=True,
                          errors="surrogateescape", timeout=60,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def usage_error(*args: str) -> str:
    """The one-line message of a usage error (exit code 2, nothing on stdout)."""
    code, out, err = cli(*args)
    assert (code, out) == (2, ""), (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A QMP address nobody should connect to, and its listening socket (to check that nobody did)."""
    path = str(tmp_path / "qmp.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        sock.listen()
        sock.setblocking(False)
        yield path, sock


def assert_not_probed(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.accept()[0].close()


# --- adjust-argv ---

def test_adjust_argv_trailing_comma_and_set() -> None:
    code, out, _ = cli("adjust-argv", "--adjustments", '{"net0": {"host_uso": "off"}}', "--",
                       "qemu", "-device", "virtio-net-pci,id=net0,", "-set", "device.net0.host_uso=on")
    assert code == 0
    assert json.loads(out) == ["qemu", "-device", "virtio-net-pci,id=net0,host_uso=off",
                               "-set", "device.net0.host_uso=off"]


@pytest.mark.parametrize(("adjustments", "named"), [
    ('{"net0": {"id": "off"}}', "'id' is not a virtio-net feature property"),
    ('{"net0": {"netdev=x,romfile=/y,host_uso": "off"}}', "'netdev=x,romfile=/y,host_uso'"),
    ('{"net0": {"host_uso": "disabled"}}', "host_uso = 'disabled'"),
    ('{"net0": {"host_uso": true}}', "host_uso = True"),
    ('{"net0,romfile=/y": {"host_uso": "off"}}', "'net0,romfile=/y' is not a plain device id"),
    ('{"/machine/peripheral-anon/device[0]": {"host_uso": "off"}}',
     "/machine/peripheral-anon/device[0] has no id"),
    ('{"net0": "off"}', "adjustments for net0"),
    ('["net0"]', "adjustments must map device ids"),
    ('{"net0": {"host_uso": "off"}', "not valid JSON"),
    ('{"a":' * 10_000, "not valid JSON: nested too deeply"),
])
def test_adjust_argv_refuses_bad_adjustments(adjustments: str, named: str) -> None:
    err = usage_error("adjust-argv", "--adjustments", adjustments, "--", *DEVICE)
    assert named in err
    assert err.startswith("error: --adjustments: ")


def test_adjust_argv_refuses_a_device_it_cannot_adjust() -> None:
    err = usage_error("adjust-argv", "--adjustments", '{"net0": {"host_uso": "off"}}', "--",
                      "qemu", "-device", "virtio-net-pci,id=net0", "-set", "device.net0.id=other")
    assert "renames device net0" in err
    err = usage_error("adjust-argv", "--adjustments", '{"net9": {"host_uso": "off"}}', "--", *DEVICE)
    assert "no -device with id net9" in err


def verdict_json(verdict: str, **fields: Any) -> str:
    data: dict[str, Any] = {"verdict": verdict, "mode": "strict", "source": None, "dest": None, "findings": [],
                            "devices": [], "adjustments": {}, "recommendations": {}}
    return json.dumps({**data, **fields})


def test_adjust_argv_with_a_blocked_or_unknown_precheck_exits_with_its_code_and_reason(tmp_path: Path) -> None:
    blocked = verdict_json("blocked", devices=[{"id": "net0", "findings": [
        {"severity": "blocker", "code": "offer-missing", "why": "the destination does not offer HOST_USO."},
        {"severity": "warning", "code": "x", "why": "not a reason."}]}])
    code, out, err = cli("adjust-argv", "--adjustments", blocked, "--", *DEVICE)
    assert (code, out) == (1, "")
    assert err == ("error: the precheck's verdict is blocked, so no adjustment makes the destination compatible: "
                   "net0: the destination does not offer HOST_USO.\n")
    unknown = tmp_path / "precheck.json"
    unknown.write_text(verdict_json("unknown", findings=[
        {"severity": "unknown", "code": "probe-failed", "why": "the destination could not be probed: timeout."}]))
    code, out, err = cli("adjust-argv", "--adjustments", str(unknown), "--", *DEVICE)
    assert (code, out) == (4, "")
    assert "verdict is unknown" in err and "the destination could not be probed: timeout." in err


def test_adjust_argv_with_a_compatible_or_adjustable_precheck(tmp_path: Path) -> None:
    code, out, _ = cli("adjust-argv", "--adjustments", verdict_json("compatible"), "--", *DEVICE)
    assert (code, json.loads(out)) == (0, DEVICE)
    adjustable = tmp_path / "precheck.json"
    adjustable.write_text(verdict_json("adjustable", adjustments={"net0": {"host_uso": "off"}}))
    code, out, _ = cli("adjust-argv", "--adjustments", str(adjustable), "--", *DEVICE)
    assert (code, json.loads(out)) == (0, ["qemu", "-device", "virtio-net-pci,id=net0,netdev=n0,host_uso=off"])
    err = usage_error("adjust-argv", "--adjustments", verdict_json("maybe"), "--", *DEVICE)
    assert "unknown verdict 'maybe'" in err


def test_adjust_argv_adjustment_files(tmp_path: Path) -> None:
    bad = tmp_path / "adj.json"
    bad.write_bytes(NOT_UTF8)
    err = usage_error("adjust-argv", "--adjustments", str(bad), "--", *DEVICE)
    assert f"--adjustments file {bad} is not UTF-8 text (byte 0xff at offset 0)" in err
    err = usage_error("adjust-argv", "--adjustments", str(tmp_path / "missing.json"), "--", *DEVICE)
    assert f"--adjustments file {tmp_path / 'missing.json'}: No such file or directory" in err
    err = usage_error("adjust-argv", "--adjustments", str(tmp_path), "--", *DEVICE)
    assert "Is a directory" in err


# --- files ---

def test_non_utf8_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_bytes(NOT_UTF8)
    err = usage_error("precheck", "--source", "/nonexistent", "--dest", "/nonexistent", "--policy", str(policy))
    assert str(policy) in err


def test_key_files_that_cannot_be_used(tmp_path: Path) -> None:
    record = tmp_path / "report.qoh"
    record.write_bytes(b"")
    binary = tmp_path / "binary.key"
    binary.write_bytes(NOT_UTF8)
    empty = tmp_path / "empty.key"
    empty.write_text(" \n")
    for command in (["decode", str(record)], ["check", str(record), str(record)]):
        err = usage_error(*command, "--key-file", str(binary))
        assert f"key file {binary} is not UTF-8 text" in err
        err = usage_error(*command, "--key-file", str(empty))
        assert f"key file {empty} is empty" in err
        err = usage_error(*command, "--key-file", str(tmp_path))
        assert f"key file {tmp_path}: Is a directory" in err
        err = usage_error(*command, "--key-file", str(tmp_path / "missing"))
        assert "No such file or directory" in err


def test_a_bad_key_or_output_never_costs_a_probe(tmp_path: Path, listener: tuple[str, socket.socket]) -> None:
    address, sock = listener
    binary = tmp_path / "binary.key"
    binary.write_bytes(NOT_UTF8)
    out = str(tmp_path / "out.qoh")
    err = usage_error("probe", address, "--out", out, "--key-file", str(binary))
    assert "is not UTF-8 text" in err
    err = usage_error("probe", address, "--out", out, "--key-file", str(tmp_path / "missing"))
    assert "No such file or directory" in err
    missing = tmp_path / "no" / "such" / "folder"
    err = usage_error("probe", address, "--out", str(missing / "out.qoh"))
    assert f"--out {missing / 'out.qoh'}: folder {missing} does not exist" in err
    err = usage_error("probe", address, "--out", str(tmp_path))
    assert f"--out {tmp_path} is a folder" in err
    assert_not_probed(sock)
    assert not os.path.exists(out)


# --- numbers ---

@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1", "-inf", "five"])
@pytest.mark.parametrize("command", [["precheck", "--source", "/nonexistent", "--dest", "/nonexistent"],
                                     ["probe", "/nonexistent", "--out", "/nonexistent/x"]])
def test_bad_timeouts(command: list[str], value: str) -> None:
    err = usage_error(*command, f"--timeout={value}")
    assert "argument --timeout" in err and repr(value) in err


@pytest.mark.parametrize(("host", "named"), [("h\udcff", "'h\\udcff' is not valid UTF-8 text"),
                                             ("", "not 0"), ("x" * 2000, "not 2000")])
def test_bad_host_names(host: str, named: str, listener: tuple[str, socket.socket], tmp_path: Path) -> None:
    address, sock = listener
    err = usage_error("probe", address, "--out", str(tmp_path / "out.qoh"), f"--host={host}")
    assert "argument --host: " in err and named in err
    assert_not_probed(sock)


def test_undecodable_bytes_in_an_address_are_printed_back() -> None:
    code, out, _ = cli("precheck", "--source", "/nonexistent/\udcff", "--dest", "/nonexistent", "--timeout", "1")
    assert code == 4
    assert "unix:/nonexistent/\udcff: cannot connect" in out


def test_argparse_errors_are_one_line_too() -> None:
    err = usage_error("precheck", "--dest", "/x")
    assert "the following arguments are required: --source" in err
    err = usage_error("nonsense")
    assert "invalid choice" in err


# --- the package's public names ---

@pytest.mark.parametrize("first", [
    "import qemu_offload_handshake.api", "import qemu_offload_handshake.probing",
    "from qemu_offload_handshake.probing import probe_vm", "import qemu_offload_handshake"])
def test_probe_is_always_the_async_function(first: str) -> None:
    script = (f"{first}\n"
              "import inspect, qemu_offload_handshake as q\n"
              "from qemu_offload_handshake import probe, precheck\n"
              "from qemu_offload_handshake.api import probe as api_probe\n"
              "import qemu_offload_handshake.probing\n"
              "assert probe is api_probe is q.probe and inspect.iscoroutinefunction(precheck), probe\n"
              "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")


def test_probe_can_still_be_replaced_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    import qemu_offload_handshake as q
    from qemu_offload_handshake.api import probe
    assert q.probe is probe

    stand_in = object()
    monkeypatch.setattr(q, "probe", stand_in)
    assert q.probe is stand_in
    monkeypatch.undo()
    assert q.probe is probe


# --- handshake, serve, answer ---

@pytest.mark.parametrize(("args", "named"), [
    (["handshake", "--agent", "127.0.0.1:7447"], "TLS needs --cert, --key and --ca (missing --cert, --key, --ca)"),
    (["handshake", "--agent", "10.0.0.2:7447", "--insecure"], "--insecure only to a loopback address"),
    (["handshake", "--agent", "nowhere", "--insecure"], "--agent 'nowhere': expected HOST:PORT"),
    (["handshake", "--ssh", "root@h", "--insecure"], "--cert, --key, --ca and --insecure are for --agent"),
    (["handshake", "--agent", "127.0.0.1:1", "--insecure", "--ssh-option", "X=y"], "are for --ssh"),
    (["handshake", "--agent", "127.0.0.1:1", "--cert", "/nonexistent.pem", "--key", "/nonexistent.key", "--ca",
      "/nonexistent-ca.pem"], "--cert/--key /nonexistent.pem, /nonexistent.key: No such file or directory"),
    (["handshake", "--ssh=-oProxyCommand=x"], "--ssh '-oProxyCommand=x': expected [USER@]HOST"),
    (["handshake", "--agent", "127.0.0.1:1", "--insecure", "--dest", "/" + "x" * 1100], "longer than 1024 bytes"),
])
def test_handshake_arguments_that_cannot_work(args: list[str], named: str,
                                              listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    err = usage_error(args[0], "--source", path, *args[1:])
    assert named in err, err
    assert_not_probed(sock)


@pytest.mark.parametrize(("args", "named"), [
    (["serve", "--listen", "0.0.0.0:0", "--insecure"], "--insecure only on a loopback address, not 0.0.0.0"),
    (["serve", "--listen", "127.0.0.1:0"], "TLS needs --cert, --key and --ca"),
    (["serve", "--listen", "127.0.0.1:0", "--insecure", "--cert", "x"], "--insecure takes no --cert"),
    (["serve", "--listen", "127.0.0.1:0", "--insecure", "--no-scratch"], "--no-scratch needs --dump"),
    (["answer", "--dump", "/nonexistent.dump"], "/nonexistent.dump"),
])
def test_agent_arguments_that_cannot_work(args: list[str], named: str) -> None:
    assert named in usage_error(*args)


@pytest.mark.parametrize(("address", "named"), [
    ("libvirt:", "libvirt:DOMAIN (a domain name or UUID)"),
    ("libvirt:vm1?x=1", "only ?uri=CONNECTION-URI may follow the domain"),
    ("libvirt:vm 1", "libvirt:DOMAIN"),
])
def test_bad_libvirt_addresses(address: str, named: str, listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    assert named in usage_error("precheck", "--source", address, "--dest", path)
    assert_not_probed(sock)
