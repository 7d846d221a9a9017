"""The command line against real QEMUs, as an operator's script sees it: the exit code, the ``--json`` fields and the
messages; every verdict a test relies on is then checked by really migrating the pair (compatible: the migration
completes; blocked: it fails; adjustable: the destination relaunched from ``adjust-argv``'s output is compatible and
the migration completes with identical offered features)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemu_offload_handshake.lab import Lab, Nic, Vm, VmSpec

pytestmark = pytest.mark.qemu

USO = {54: "VIRTIO_NET_F_GUEST_USO4", 55: "VIRTIO_NET_F_GUEST_USO6", 56: "VIRTIO_NET_F_HOST_USO"}
USO_MASK = sum(1 << bit for bit in USO)
USO_ON_NIC = Nic.make("net0", host_uso=True, guest_uso4=True, guest_uso6=True)  # on, whatever the machine type
USO_OFF = {"guest_uso4": "off", "guest_uso6": "off", "host_uso": "off"}  # the adjustments, as the JSON gives them
UUID = "6b1f43e2-8d3c-4a53-9d6c-1f2e3a4b5c6d"
ANON = "/machine/peripheral-anon/device[0]"
NO_DERIVED: dict[str, list[str]] = {"source": [], "dest": []}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "qemu_offload_handshake", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    """Exit code and the parsed ``--json`` output (stdout holds exactly one JSON object, stderr nothing)."""
    proc = cli(*args, "--json")
    assert proc.stderr == "", proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, data


def why(data: dict[str, Any]) -> list[str]:
    """Every finding of a --json output as one line (for assertion messages)."""
    found = [("", f) for f in data["findings"]] + [(d["id"], f) for d in data["devices"] for f in d["findings"]]
    return [f"{dev or '-'} {f['severity']} {f['code']} {f['bit']}: {f['why']}" for dev, f in found]


def usage_error(*args: str) -> str:
    """A usage error: exit 2, nothing on stdout, one line on stderr."""
    proc = cli(*args)
    assert (proc.returncode, proc.stdout) == (2, ""), (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def device(data: dict[str, Any], key: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [d for d in data["devices"] if d["id"] == key]
    assert len(found) == 1, data["devices"]
    return found[0]


def rows(findings: list[dict[str, Any]], *fields: str) -> set[tuple[Any, ...]]:
    return {tuple(f[name] for name in fields) for f in findings}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def name_of(vm: Vm) -> str:
    return vm.argv[vm.argv.index("-name") + 1]


def version_of(vm: Vm) -> str:
    assert vm.version is not None
    return ".".join(map(str, vm.version))


def package_of(vm: Vm) -> str | None:
    """The package string of the QMP greeting (e.g. Debian's), as the lab's own connection received it."""
    assert vm.qmp.greeting is not None
    package = vm.qmp.greeting.QMP.version.get("package")
    return package.strip() or None if isinstance(package, str) else None


def nic_arg(argv: list[str]) -> int:
    """Index of the single virtio-net ``-device`` argument."""
    found = [i for i, arg in enumerate(argv) if argv[i - 1] == "-device" and "virtio-net-pci" in arg]
    assert len(found) == 1, argv
    return found[0]


def json_device(argv: list[str]) -> list[str]:
    """The lab's ``-device virtio-net-pci,id=...`` turned into the JSON form, same properties (on/off as booleans:
    a JSON -device takes no strings for them)."""
    out = list(argv)
    i = nic_arg(argv)
    driver, *opts = argv[i].split(",")
    props: dict[str, object] = {"driver": driver}
    for opt in opts:
        key, value = opt.split("=", 1)
        props[key] = {"on": True, "off": False}.get(value, value)
    out[i] = json.dumps(props, separators=(",", ":"))
    return out


FORMS: dict[str, Callable[[list[str]], list[str]]] = {"opts": list, "json": json_device}


class StopAfterGreeting:
    """A UNIX-socket proxy in front of a QEMU's QMP socket: it relays the greeting and the capabilities negotiation,
    then, when the first command arrives, SIGSTOPs that QEMU and relays the command to it, which so never answers (a
    QEMU that hangs in the middle of the probe). The test sends SIGCONT afterwards, whatever happens."""

    def __init__(self, upstream: str, path: Path, pid: int) -> None:
        self.upstream, self.path, self.pid = upstream, path, pid
        self.commands: list[str] = []  # every command that reached QEMU through the proxy, in order
        self.stopped_at: str | None = None  # the command on whose arrival QEMU was stopped
        self._closing = False
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client: socket.socket | None = None
        while client is None and not self._closing:
            with contextlib.suppress(TimeoutError):
                client = self._listener.accept()[0]
        if client is None:
            return
        with client, socket.socket(socket.AF_UNIX) as qemu:
            qemu.connect(self.upstream)
            seen = b""
            while not self._closing:
                ready = select.select([client, qemu], [], [], 0.1)[0]
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        seen += data
                        names = [m.decode() for m in re.findall(rb'"execute":\s*"([^"]+)"', seen)]
                        new, self.commands = names[len(self.commands):], names
                        if self.stopped_at is None and any(n != "qmp_capabilities" for n in new):
                            self.stopped_at = next(n for n in new if n != "qmp_capabilities")
                            os.kill(self.pid, signal.SIGSTOP)
                        qemu.sendall(data)
                    else:
                        client.sendall(data)

    def close(self) -> None:
        self._closing = True
        self._thread.join(10)
        self._listener.close()


def relaunch_rewrite(adjustments: Path, form: Callable[[list[str]], list[str]],
                     seen: list[tuple[list[str], list[str]]]) -> Callable[[list[str]], list[str]]:
    """A ``Lab.start`` rewrite that passes the lab's command line (in ``form``) through the CLI's ``adjust-argv``, as an
    orchestrator would, and records (given, printed)."""
    def rewrite(argv: list[str]) -> list[str]:
        given = form(argv)
        proc = cli("adjust-argv", "--adjustments", str(adjustments), "--", *given)
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
        printed: list[str] = json.loads(proc.stdout)
        seen.append((given, printed))
        return printed
    return rewrite


async def test_compatible_pair_over_tcp_json_fields_and_usage_errors(qlab: Lab, tmp_path: Path) -> None:
    """Exit 0 with every documented --json field, a tcp: address, an id-less NIC named by its QOM path; exit 2 and 4
    on the same pair; the real migration completes."""
    port = free_port()
    tcp = f"tcp:127.0.0.1:{port}"
    spec = VmSpec(mode="booted", nics=(Nic("net0"), Nic("")))
    src = await qlab.start(spec, extra_args=["-uuid", UUID])
    dst = await qlab.start(spec.destination(), extra_args=["-uuid", UUID,
                                                           "-qmp", f"{tcp},server=on,wait=off"])
    before = int(time.time())
    code, data = cli_json("precheck", "--source", src.address, "--dest", tcp)
    after = int(time.time())
    assert code == 0, why(data)
    assert (data["verdict"], data["mode"]) == ("compatible", "strict")
    version = version_of(src)
    assert re.fullmatch(r"1\d\.\d+\.\d+", version)
    machine = "pc-q35-" + ".".join(version.split(".")[:2])  # "q35" is the newest machine type of that QEMU
    for side, vm, host in (("source", src, src.address), ("dest", dst, tcp)):
        made_at = data[side].pop("made_at")
        assert before <= made_at <= after
        assert data[side] == {"host": host, "qemu_version": version, "package": package_of(vm), "machine": machine,
                              "vm_name": name_of(vm), "vm_uuid": UUID}
    assert data["findings"] == []
    assert sorted(d["id"] for d in data["devices"]) == [ANON, "net0"]
    assert all((d["derived"], d["findings"]) == (NO_DERIVED, []) for d in data["devices"])
    assert (data["adjustments"], data["recommendations"]) == ({}, {})

    proc = cli("precheck", "--source", src.address, "--dest", tcp)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0] == "verdict: COMPATIBLE  (strict mode)"
    assert f"  dest    {tcp}  QEMU {version}  machine {machine}  2 virtio-net" in lines

    # Exit 2: what was wrong is named, on one line.
    assert "host_uzo" in usage_error("precheck", "--source", src.address, "--dest", tcp, "--on", "host_uzo")
    missing = tmp_path / "missing.toml"
    assert str(missing) in usage_error("precheck", "--source", src.address, "--dest", tcp, "--policy", str(missing))
    assert "tcp:HOST:PORT" in usage_error("precheck", "--source", src.address, "--dest", "tcp:127.0.0.1:0")
    # Exit 4: nobody listens there; that side is null and the VM-wide finding says why.
    nobody = f"tcp:127.0.0.1:{free_port()}"
    code, data = cli_json("precheck", "--source", src.address, "--dest", nobody, "--timeout", "2")
    assert code == 4
    assert (data["verdict"], data["dest"], data["source"]["host"]) == ("unknown", None, src.address)
    assert rows(data["findings"], "severity", "code") == {("unknown", "probe-failed")}
    assert data["findings"][0]["why"].startswith(f"the destination could not be probed: {nobody}: cannot connect: ")

    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result
    assert result.offered_after == result.offered_before
    assert sorted(result.offered_before) == [ANON, "net0"]
    assert result.dest_state == "running"


async def test_lost_negotiated_feature_blocks_in_strict_and_lenient_and_the_migration_fails(qlab: Lab) -> None:
    """Exit 1 in both modes when the guest uses USO and the destination's tap has none; adjust-argv refuses the
    blocked verdict with its reasons; the real migration fails with QEMU's own message."""
    spec = VmSpec(mode="booted")
    src = await qlab.start(spec)
    dst = await qlab.start(spec.destination({"net0": "tap-nouso"}))
    outputs = {}
    for mode in ("strict", "lenient"):
        code, data = cli_json("precheck", "--source", src.address, "--dest", dst.address,
                              *(["--lenient"] if mode == "lenient" else []))
        assert code == 1, why(data)
        assert (data["verdict"], data["mode"]) == ("blocked", mode)
        assert data["findings"] == []
        findings = device(data, "net0")["findings"]
        blockers = [f for f in findings if f["severity"] == "blocker"]
        assert rows(blockers, "code", "bit", "feature", "source", "dest", "negotiated") == {
            ("negotiated-missing", bit, name, "offered", "not offered", True) for bit, name in USO.items()}
        assert all("QEMU will refuse the load with 'Features 0x... unsupported'" in f["why"] for f in blockers)
        # ... and the destination is named as silently dropping the USO it was asked for
        assert rows([f for f in findings if f["code"] == "silently-off"], "severity", "bit", "dest") == {
            ("warning", bit, "on, not offered") for bit in USO}
        assert (data["adjustments"], data["recommendations"]) == ({}, {})
        outputs[mode] = data
    proc = cli("precheck", "--source", src.address, "--dest", dst.address, "--lenient")
    assert proc.returncode == 1
    assert proc.stdout.startswith("verdict: BLOCKED  (lenient mode)\n")
    assert "GUEST_USO4 (54), GUEST_USO6 (55), HOST_USO (56)" in proc.stdout

    refused = cli("adjust-argv", "--adjustments", json.dumps(outputs["lenient"]), "--", *dst.argv)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.startswith("error: the precheck's verdict is blocked, so no adjustment makes the "
                                     "destination compatible: net0: the guest uses it and the destination does not "
                                     "offer it"), refused.stderr

    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert "Features 0x" in result.dest_error and "unsupported" in result.dest_error
    assert result.source_running


async def test_qemu_stopped_after_the_greeting_gives_unknown_within_the_timeout(qlab: Lab, tmp_path: Path) -> None:
    """Exit 4 within --timeout when QEMU greets, negotiates and then stops (SIGSTOP) on the first command; the reason
    names that command. Once it runs again the real verdict comes: a VM-wide blocker (machine types differ), and the
    migration really fails."""
    src = await qlab.start(VmSpec())
    dst = await qlab.start(VmSpec(machine="pc-q35-9.2").destination())
    proxy = StopAfterGreeting(dst.address.removeprefix("unix:"), tmp_path / "proxy.sock", dst.proc.pid)
    try:
        start = time.monotonic()
        code, data = cli_json("precheck", "--source", src.address, "--dest", f"unix:{proxy.path}",
                              "--timeout", "1")
        elapsed = time.monotonic() - start
    finally:
        proxy.close()
        os.kill(dst.proc.pid, signal.SIGCONT)
    assert proxy.commands[0] == "qmp_capabilities"  # the greeting and the negotiation went through
    assert proxy.stopped_at is not None
    assert code == 4, why(data)
    assert elapsed < 1 + 4  # one --timeout, plus the interpreter's start and a bounded disconnect
    assert (data["verdict"], data["mode"], data["dest"]) == ("unknown", "strict", None)
    assert data["source"]["host"] == src.address
    assert len(data["findings"]) == 1
    finding = data["findings"][0]
    assert (finding["severity"], finding["code"]) == ("unknown", "probe-failed")
    m = re.fullmatch(rf"the destination could not be probed: unix:{re.escape(str(proxy.path))}: (\S+) got no answer "
                     r"within 1\.0 s", finding["why"])
    assert m is not None, finding["why"]
    assert m.group(1) in proxy.commands[1:]  # a command QEMU received while stopped
    assert [d["id"] for d in data["devices"]] == ["net0"]  # the source's device, nothing to compare it with
    assert (data["adjustments"], data["recommendations"]) == ({}, {})

    code, data = cli_json("precheck", "--source", src.address, "--dest", dst.address, "--timeout", "1")
    assert code == 1, why(data)
    machine = data["source"]["machine"]
    assert machine == "pc-q35-" + ".".join(version_of(src).split(".")[:2])
    assert data["findings"] == [{"severity": "blocker", "code": "machine-differs", "feature": None, "bit": None,
                                 "source": machine, "dest": "pc-q35-9.2", "negotiated": None,
                                 "why": data["findings"][0]["why"]}]
    assert f"{machine} vs pc-q35-9.2" in data["findings"][0]["why"]
    assert device(data, "net0")["findings"] == []
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert f"Machine type received is '{machine}' and local is 'pc-q35-9.2'" in result.dest_error, result
    assert result.source_state == "prelaunch"  # the paused source is left as it was


async def test_probe_and_check_with_hmac_and_policy(qlab: Lab, tmp_path: Path) -> None:
    """probe (signed) + decode + check on real reports: exit 0, the files carry QEMU's real bitmaps, a wrong key is
    exit 2; policy from a file and --on/--off, offline and live; the real migration completes."""
    spec = VmSpec(mode="booted")
    src = await qlab.start(spec)
    dst = await qlab.start(spec.destination())
    key, wrong = tmp_path / "key", tmp_path / "wrong"
    key.write_text("s3cret\n")
    wrong.write_text("s3cret2\n")
    files = {"src": tmp_path / "src.qoh", "dst": tmp_path / "dst.qoh"}
    for (name, file), vm in zip(files.items(), (src, dst), strict=True):
        proc = cli("probe", vm.address, "--out", str(file), "--host", f"{name}-host", "--key-file", str(key))
        assert (proc.returncode, proc.stderr) == (0, "")
        assert proc.stdout == f"wrote {file}: 1 virtio-net device(s), 0 unreadable fact(s)\n"
    proc = cli("decode", str(files["src"]), "--key-file", str(key))
    assert proc.returncode == 0
    decoded = json.loads(proc.stdout)
    assert (decoded["type"], decoded["host"], decoded["qemu_version"]) == ("vm", "src-host", version_of(src))
    [nic] = decoded["nics"]
    assert nic["qdev_id"] == "net0"
    assert nic["offered"] == hex((await src.features())["net0"])
    assert nic["negotiated"] == hex((await src.features("guest-features"))["net0"])
    assert int(nic["negotiated"], 16) & USO_MASK == USO_MASK  # the booted guest really uses USO

    check = ("check", str(files["src"]), str(files["dst"]), "--key-file", str(key))
    code, data = cli_json(*check)
    assert code == 0, why(data)
    assert (data["verdict"], data["source"]["host"], data["dest"]["host"]) == ("compatible", "src-host", "dst-host")
    assert data["findings"] == []
    assert device(data, "net0")["findings"] == []
    assert "HMAC mismatch" in usage_error("check", str(files["src"]), str(files["dst"]), "--key-file", str(wrong))

    policy = tmp_path / "policy.toml"
    policy.write_text('[properties]\nguest_ecn = "off"\ncsum = "on"\n')
    for how in (["--policy", str(policy)], ["--off", "guest_ecn"]):
        for command in (check, ("precheck", "--source", src.address, "--dest", dst.address)):
            code, data = cli_json(*command, *how)
            assert code == 1, (command, how, why(data))
            assert rows(device(data, "net0")["findings"], "severity", "code", "bit", "source", "dest") == {
                ("blocker", "policy-off-source", 9, "offered", "offered")}
            assert device(data, "net0")["findings"][0]["why"].startswith(
                "policy requires guest_ecn=off but the source offers it")
    for command in (check, ("precheck", "--source", src.address, "--dest", dst.address)):
        code, data = cli_json(*command, "--on", "host_uso", "--on", "csum", "--off", "ctrl_mac_addr")
        assert code == 1, why(data)  # both offer CTRL_MAC_ADDR (bit 23)
        assert rows(device(data, "net0")["findings"], "code", "bit") == {("policy-off-source", 23)}
        code, data = cli_json(*command, "--on", "host_uso", "--on", "csum")  # both offer both: compatible
        assert code == 0, why(data)

    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result
    assert result.offered_after == result.offered_before


ADJUSTABLE = {
    # source: a tap without USO; destination: the same VM on a tap with USO
    "10": (VmSpec(mode="booted", nics=(Nic("net0", "tap-nouso"),)), VmSpec(nics=(Nic("net0"),)).destination()),
    # QEMU 7.2 (no USO at all) to QEMU 10 on the same machine type with USO turned on
    "7.2-to-10": (VmSpec(qemu="7.2", machine="pc-q35-7.2", mode="booted"),
                  VmSpec(machine="pc-q35-7.2", nics=(USO_ON_NIC,)).destination()),
}


@pytest.mark.parametrize("form", ["opts", "json"])
@pytest.mark.parametrize("pair", ["10", "7.2-to-10"])
async def test_adjustable_then_adjust_argv_relaunch_and_migrate(qlab: Lab, tmp_path: Path, pair: str,
                                                                form: str) -> None:
    """Exit 3 with the adjustments; adjust-argv on the lab's own command line (both -device forms) gives a
    destination that is compatible, and the migration completes with identical offered features."""
    spec, dest = ADJUSTABLE[pair]
    as_form = FORMS[form]
    src = await qlab.start(spec)
    dst = await qlab.start(dest, rewrite=as_form)
    code, data = cli_json("precheck", "--source", src.address, "--dest", dst.address)
    assert code == 3, why(data)
    assert (data["verdict"], data["findings"], data["adjustments"]) == ("adjustable", [], {"net0": USO_OFF})
    findings = device(data, "net0")["findings"]
    assert rows([f for f in findings if f["severity"] != "warning"], "severity", "code", "bit", "feature", "source",
                "dest", "negotiated") == {("adjust", "offer-extra", bit, name, "not offered", "offered", False)
                                          for bit, name in USO.items()}
    # a source on a tap without USO is named as silently dropping the USO its properties ask for; QEMU 7.2 has none
    silent = {("silently-off", bit, "on, not offered") for bit in USO} if pair == "10" else set()
    assert rows([f for f in findings if f["severity"] == "warning"], "code", "bit", "source") == silent
    assert data["source"]["qemu_version"] == version_of(src)
    proc = cli("precheck", "--source", src.address, "--dest", dst.address)
    assert proc.returncode == 3
    assert ("  start the destination with: -device ...,id=net0,guest_uso4=off,guest_uso6=off,host_uso=off"
            in proc.stdout.splitlines())
    output = tmp_path / "precheck.json"
    output.write_text(json.dumps(data))

    await qlab.stop(dst)
    seen: list[tuple[list[str], list[str]]] = []
    dst = await qlab.start(dest, rewrite=relaunch_rewrite(output, as_form, seen))
    [(given, printed)] = seen
    i = nic_arg(given)
    assert printed[:i] + printed[i + 1:] == given[:i] + given[i + 1:]  # nothing else changed
    if form == "opts":
        assert printed[i] == ("virtio-net-pci,id=net0,netdev=hn0,mac=52:54:00:12:34:10,"
                              "guest_uso4=off,guest_uso6=off,host_uso=off")
    else:
        assert json.loads(printed[i]) == {"driver": "virtio-net-pci", "id": "net0", "netdev": "hn0",
                                          "mac": "52:54:00:12:34:10", "guest_uso4": False, "guest_uso6": False,
                                          "host_uso": False}
    code, data = cli_json("precheck", "--source", src.address, "--dest", dst.address)
    assert code == 0, why(data)
    assert data["findings"] == []
    assert rows(device(data, "net0")["findings"], "severity", "code", "bit", "source") == {
        ("warning", code, bit, side) for code, bit, side in silent}

    result = await qlab.migrate(src, dst)
    assert result.status == "completed", result
    assert result.dest_state == "running"
    assert result.offered_after is not None
    assert result.offered_after == result.offered_before
    assert result.offered_after["net0"] & USO_MASK == 0


async def test_qemu10_with_uso_on_pc_q35_7_2_to_qemu72_is_blocked(qlab: Lab) -> None:
    """A QEMU 10 source on pc-q35-7.2 with USO turned on (the machine type's default is off), its guest using it,
    to QEMU 7.2 (which has no USO): exit 1, and the real migration fails."""
    src = await qlab.start(VmSpec(machine="pc-q35-7.2", mode="booted", nics=(USO_ON_NIC,)))
    dst = await qlab.start(VmSpec(qemu="7.2", machine="pc-q35-7.2").destination(), rewrite=json_device)
    code, data = cli_json("precheck", "--source", src.address, "--dest", dst.address)
    assert code == 1, why(data)
    assert data["verdict"] == "blocked"
    assert (data["source"]["machine"], data["dest"]["machine"]) == ("pc-q35-7.2", "pc-q35-7.2")
    assert data["dest"]["qemu_version"] == version_of(dst)
    assert data["dest"]["qemu_version"].startswith("7.2.")
    assert data["findings"] == []
    assert rows(device(data, "net0")["findings"], "severity", "code", "bit", "source", "dest", "negotiated") == {
        ("blocker", "negotiated-missing", bit, "offered", "not offered", True) for bit in USO}
    result = await qlab.migrate(src, dst)
    assert result.status == "failed"
    assert "Features 0x" in result.dest_error and "unsupported" in result.dest_error
    assert result.source_running


async def test_uso_missing_on_qemu72_is_not_blamed_on_the_backend(qlab: Lab) -> None:
    src = await qlab.start(VmSpec(machine="pc-q35-7.2", nics=(USO_ON_NIC,)))
    dst = await qlab.start(VmSpec(qemu="7.2", machine="pc-q35-7.2").destination())
    code, data = cli_json("precheck", "--source", src.address, "--dest", dst.address)
    assert code == 1, why(data)
    missing = [f for f in device(data, "net0")["findings"] if f["code"] == "offer-missing"]
    assert {f["bit"] for f in missing} == set(USO)
    for finding in missing:
        assert "backend has no USO" not in finding["why"], finding["why"]
        assert "this QEMU has no " in finding["why"] and "predates the feature" in finding["why"], finding["why"]
