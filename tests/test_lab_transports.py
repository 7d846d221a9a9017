"""The lab's equipment for the handshake's transports, for real: its own OpenSSH server on loopback
(``lab/sshd.py``) and its test PKI (``lab/certs.py``) with Python's ``ssl`` over a loopback socket. No QEMU; sshd
needs root (its privilege separation folder). A missing prerequisite skips, or fails under CI."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CI

from qemu_offload_handshake.lab import LabError, clean, owned_leftovers, stale_leftovers
from qemu_offload_handshake.lab.certs import SERVER_NAMES, Pki, make_pki
from qemu_offload_handshake.lab.leaks import lab_processes, still_alive
from qemu_offload_handshake.lab.sshd import Sshd, keygen, sshd_prerequisites


def require(problems: list[str]) -> None:
    """Skip when the machine lacks something; under CI, fail instead."""
    if problems:
        message = "transport lab prerequisites missing (run scripts/setup.sh): " + "; ".join(problems)
        if CI:
            pytest.fail(message)
        pytest.skip(message)


def require_sshd() -> None:
    require(sshd_prerequisites() + ([] if os.geteuid() == 0 else ["not root: the lab sshd needs /run/sshd"]))


def require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        require(["the Python package cryptography (the test extra) is not installed"])


async def run(argv: Sequence[str], timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def exists(path: str) -> bool:
    return os.path.exists(path)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def wait_for(condition: object, what: str, timeout: float = 10) -> None:
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


# --- the lab's sshd ---------------------------------------------------------------------------------------------

async def test_sshd_runs_a_command_for_the_lab_key_only_on_loopback() -> None:
    require_sshd()
    async with Sshd() as sshd:
        assert sshd.destination == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}"
        assert await run(sshd.ssh_argv(["echo", "hello"])) == (0, "hello\n", "")
        # as a transport builds it: the options and the destination, the command quoted for the remote shell
        argv = ["ssh", *(x for option in sshd.options for x in ("-o", option)), sshd.destination, "printf",
                "'%s|'", "'a b'", "'$HOME'"]
        assert await run(argv) == (0, "a b|$HOME|", "")
        assert await run(sshd.ssh_argv(["printf", "%s|", "a b", "$HOME", "it's"])) == (0, "a b|$HOME|it's|", "")
        # stdin reaches the command and its stdout comes back untouched (the handshake's answer side uses both)
        proc = await asyncio.create_subprocess_exec(*sshd.ssh_argv(["cat"]), stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(b"\x00binary\xff\n" * 1000), 30)
        assert (proc.returncode, out, err) == (0, b"\x00binary\xff\n" * 1000, b"")
        # exit codes come through
        assert (await run(sshd.ssh_argv(["sh", "-c", "exit 7"])))[0] == 7
        log = sshd.log_text()
        assert f"Server listening on 127.0.0.1 port {sshd.port}." in log
        assert "Server listening on 0.0.0.0" not in log and "::" not in log.split("Connection from")[0]
        assert f"Accepted publickey for {sshd.user} from 127.0.0.1" in log


async def test_sshd_refuses_another_key_and_a_client_expecting_another_host_key(tmp_path: Path) -> None:
    require_sshd()
    wrong = tmp_path / "wrong_key"
    await keygen(wrong, "not-authorized")
    async with Sshd() as sshd:
        options = [f"IdentityFile={wrong}" if o.startswith("IdentityFile=") else o for o in sshd.options]
        code, out, err = await run(sshd.ssh_argv(["echo", "hello"], options=options))
        assert (code, out) == (255, "")
        assert "Permission denied (publickey)" in err
        await wait_for(lambda: f"Failed publickey for {sshd.user} from 127.0.0.1" in sshd.log_text(),
                       "sshd logging the refused key")
        # a client that knows another host key for [127.0.0.1]:PORT refuses this sshd (StrictHostKeyChecking=yes)
        other_pub = (await keygen(tmp_path / "other_host", "other-host")).read_text().split()
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{sshd.port} {other_pub[0]} {other_pub[1]}\n")
        options = [f"UserKnownHostsFile={known}" if o.startswith("UserKnownHostsFile=") else o
                   for o in sshd.options]
        code, out, err = await run(sshd.ssh_argv(["echo", "hello"], options=options))
        assert (code, out) == (255, "")
        assert "Host key verification failed" in err or "HOST IDENTIFICATION HAS CHANGED" in err
        # and one that knows none refuses it too
        options = [o for o in sshd.options if not o.startswith("UserKnownHostsFile=")] + \
                  [f"UserKnownHostsFile={tmp_path / 'empty'}"]
        code, _, err = await run(sshd.ssh_argv(["echo", "hello"], options=options))
        assert code == 255 and "Host key verification failed" in err


async def test_sshd_stop_kills_its_connections_and_what_they_run() -> None:
    """sshd makes every connection, and the command it runs, a session of its own: stop() must get them all."""
    require_sshd()
    sshd = Sshd()
    await sshd.start()
    client = None
    try:
        assert sshd.pid is not None
        listener, folder, port = sshd.pid, sshd.dir, sshd.port
        client = await asyncio.create_subprocess_exec(*sshd.ssh_argv(["sleep", "600"]), stdin=subprocess.DEVNULL,
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # (the login shell runs ~/.bashrc first, which may start short-lived processes of its own)
        await wait_for(lambda: [cmdline(pid) for pid, p in lab_processes().items()
                                if p.owner == os.getpid() and p.kind == "under sshd"] == [b"sleep\x00600\x00"],
                       "only sleep running under the lab sshd")
        mine = {pid: p for pid, p in lab_processes().items() if p.owner == os.getpid()
                and p.kind in ("sshd", "sshd child", "under sshd")}
        assert sorted(p.kind for p in mine.values()) == ["sshd", "sshd child", "under sshd"], mine
        assert mine[listener].kind == "sshd"
        assert set(mine) <= set(owned_leftovers({os.getpid()})[0])
        assert str(folder) in owned_leftovers({os.getpid()})[2]
        assert not set(mine) & set(stale_leftovers()[0])  # a live run's sshd is nobody's to clean
        pgids = {os.getpgid(pid) for pid in mine}
        assert len(pgids) == 3, f"sshd no longer makes sessions of its own ({pgids}): simplify stop()"
    finally:
        await sshd.stop()
    assert still_alive(mine) == []
    assert not port_open(port)
    assert not folder.exists()
    assert not set(owned_leftovers({os.getpid()})[0]) & set(mine)
    assert str(folder) not in owned_leftovers({os.getpid()})[2]
    out, err = await asyncio.wait_for(client.communicate(), 10)
    assert client.returncode == 255, (out, err)
    await sshd.stop()  # twice is harmless


async def test_sshd_stop_kills_the_connections_of_a_listener_that_died_first() -> None:
    require_sshd()
    async with Sshd() as sshd:
        assert sshd.pid is not None
        client = await asyncio.create_subprocess_exec(*sshd.ssh_argv(["sleep", "600"]), stdin=subprocess.DEVNULL,
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        await wait_for(lambda: any(cmdline(pid) == b"sleep\x00600\x00" for pid, p in lab_processes().items()
                                   if p.owner == os.getpid() and p.kind == "under sshd"), "sleep under the lab sshd")
        session = [pid for pid, p in lab_processes().items() if p.owner == os.getpid()
                   and p.kind in ("sshd child", "under sshd")]
        os.kill(sshd.pid, signal.SIGKILL)
        await wait_for(lambda: not sshd.alive, "the listener's death")
        assert still_alive(session) == session  # the connection and its command outlive it
    assert still_alive(session) == []
    await asyncio.wait_for(client.communicate(), 10)
    assert client.returncode == 255


async def test_sshd_takes_another_port_when_its_first_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    require_sshd()
    from qemu_offload_handshake.lab import sshd as module

    with socket.create_server(("127.0.0.1", 0)) as taken:
        ports = [taken.getsockname()[1]]
        real = module._free_port
        monkeypatch.setattr(module, "_free_port", lambda: ports.pop() if ports else real())
        async with Sshd() as sshd:
            assert sshd.port != taken.getsockname()[1]
            assert await run(sshd.ssh_argv(["echo", "hello"])) == (0, "hello\n", "")


async def test_sshd_is_refused_clearly_without_its_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemu_offload_handshake.lab.sshd.SSHD", "/nonexistent/sshd")
    with pytest.raises(LabError, match=r"/nonexistent/sshd is missing .*run scripts/setup\.sh"):
        async with Sshd():
            pass


DEAD_RUN = """
import asyncio, subprocess, sys
from qemu_offload_handshake.lab.leaks import lab_folder
from qemu_offload_handshake.lab.sshd import Sshd

async def main() -> None:
    sshd = await Sshd().start()
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    client = await asyncio.create_subprocess_exec(*sshd.ssh_argv(["sleep", "600"]), start_new_session=True, **quiet)
    folder = lab_folder()
    agent = await asyncio.create_subprocess_exec(  # looks like an agent to the leak checks
        sys.executable, "-c", "import time; time.sleep(600)", "-m", "qemu_offload_handshake", "serve",
        "--cert", str(folder / "server.pem"), **quiet)
    print(sshd.pid, client.pid, agent.pid, sshd.dir, folder, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_leak_checks_find_what_a_dead_run_left_under_its_sshd_and_its_agent() -> None:
    """A run killed outright: PDEATHSIG takes its sshd's listener, but not the connection (a session of its own)
    nor what it runs, nor an agent; the stale check finds those and both folders, and cleans them.

    (Its children must not hold its stdout pipe: asyncio's ``Process.wait()`` returns only once every pipe to the
    process is closed, by whoever holds it. Another test run starting meanwhile may clean these stale leftovers
    first, with this same check: what is gone by then counts as found.)"""
    require_sshd()
    run_proc = await asyncio.create_subprocess_exec(sys.executable, "-c", DEAD_RUN, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE)
    assert run_proc.stdout is not None
    client = None
    try:
        line = (await asyncio.wait_for(run_proc.stdout.readline(), 30)).decode().split()
        listener, client, agent = map(int, line[:3])
        folders = line[3:]

        def theirs() -> dict[int, str]:
            return {pid: p.kind for pid, p in lab_processes().items() if p.owner == run_proc.pid}

        await wait_for(lambda: sorted(theirs().values()) == ["agent", "sshd", "sshd child", "under sshd"]
                       and any(cmdline(pid) == b"sleep\x00600\x00" for pid in theirs()),
                       "the dead run's sshd, connection, sleep and agent")
        before = theirs()
        assert before[listener] == "sshd" and before[agent] == "agent"
        owned = owned_leftovers({run_proc.pid})
        assert set(before) <= set(owned[0]) and sorted(folders) == sorted(owned[2])
        assert not set(owned[0]) & set(stale_leftovers()[0])  # its owner lives: not stale yet
        run_proc.kill()
        await asyncio.wait_for(run_proc.wait(), 10)
        await wait_for(lambda: not still_alive([listener]), "the listener dying with its owner (PDEATHSIG)")
        stale = stale_leftovers()
        expected = {pid for pid, kind in before.items() if kind != "sshd"}  # connection, sleep, agent
        assert expected <= set(stale[0]) | (expected - set(still_alive(expected))), (before, stale)
        assert set(folders) <= set(stale[2]) | {f for f in folders if not exists(f)}
        cleaned = clean(([pid for pid in stale[0] if pid in expected], [], [f for f in stale[2] if f in folders]))
        assert still_alive(expected) == [], cleaned
        assert not any(exists(f) for f in folders), cleaned
        assert owned_leftovers({run_proc.pid}) == ([], [], [])
    finally:
        if run_proc.returncode is None:
            run_proc.kill()
            await run_proc.wait()
        leftover = owned_leftovers({run_proc.pid})
        if any(leftover):
            clean(leftover)
    # the ssh client (the dead run's, adopted by init) ends once its connection is gone
    await wait_for(lambda: not still_alive([client]), "the dead run's ssh client ending")


# --- the test PKI -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_cryptography()
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(cert or pki.server_cert, key or pki.server_key)
    return ctx


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its name
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(pki.ca)
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class Exchange:
    server_error: str | None = None
    client_error: str | None = None
    client_handshake: bool = False  # the client's own handshake finished (in TLS 1.3 it does before the server
    # has checked the client's certificate: the client hears of a refusal at its first read)
    reply: bytes = b""
    peer_subject: str | None = None
    version: str | None = None


def exchange(server: ssl.SSLContext, client: ssl.SSLContext, name: str = "localhost",
             address: str = "127.0.0.1") -> Exchange:
    """One TLS connection over a real loopback socket: the client sends ``ping``, the server answers ``pong`` +
    what it got."""
    result = Exchange()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.create_server((address, 0), family=family) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError as err:
                result.server_error = str(err)
                return
            conn.settimeout(10)
            with server.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as tls:
                try:
                    tls.do_handshake()
                    cert = tls.getpeercert()
                    result.peer_subject = str(cert["subject"]) if cert else None
                    tls.sendall(b"pong" + tls.recv(4))
                except (OSError, ssl.SSLError) as err:
                    result.server_error = str(err)
                    # Closing now, with the client's data unread, would reset the connection, and the client
                    # might see the reset instead of the alert: end our side, then read until the client closes.
                    with contextlib.suppress(OSError):
                        tls.shutdown(socket.SHUT_WR)  # (drops the TLS layer: what follows is the bare socket)
                        while tls.recv(4096):
                            pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection((address, port), timeout=10) as raw, \
                 client.wrap_socket(raw, server_hostname=name) as tls:
                result.client_handshake = True
                result.version = tls.version()
                tls.sendall(b"ping")
                result.reply = tls.recv(8)
                if not result.reply:
                    result.client_error = "connection closed"
        except (OSError, ssl.SSLError) as err:
            result.client_error = str(err)
        thread.join(15)
        assert not thread.is_alive()
    return result


def test_pki_mutual_tls_13_with_the_right_certificates(pki: Pki) -> None:
    done = exchange(server_context(pki), client_context(pki, pki.client_cert, pki.client_key))
    assert (done.server_error, done.client_error, done.reply, done.version) == (None, None, b"pongping", "TLSv1.3")
    assert done.peer_subject is not None and "qoh-lab-client" in done.peer_subject
    # the agent's certificate is good for every name it has
    for name in SERVER_NAMES:
        done = exchange(server_context(pki), client_context(pki, pki.client_cert, pki.client_key), name)
        assert done.reply == b"pongping", (name, done)


def test_pki_over_ipv6_loopback(pki: Pki) -> None:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            pass
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    done = exchange(server_context(pki), client_context(pki, pki.client_cert, pki.client_key), "::1", "::1")
    assert done.reply == b"pongping", done


def test_pki_client_certificate_of_another_ca_is_refused_by_the_server(pki: Pki) -> None:
    done = exchange(server_context(pki), client_context(pki, pki.wrong_client_cert, pki.wrong_client_key))
    assert done.server_error is not None and "certificate verify failed" in done.server_error
    assert "unable to get local issuer certificate" in done.server_error
    assert done.client_handshake  # TLS 1.3: the client finished its side first ...
    assert done.client_error is not None and "unknown ca" in done.client_error  # ... and hears the alert later
    assert done.reply == b""


def test_pki_expired_client_certificate_is_refused_by_the_server(pki: Pki) -> None:
    done = exchange(server_context(pki), client_context(pki, pki.expired_client_cert, pki.expired_client_key))
    assert done.server_error is not None and "certificate verify failed" in done.server_error
    assert "certificate has expired" in done.server_error
    assert done.client_error is not None and "certificate expired" in done.client_error
    assert done.reply == b""


def test_pki_client_without_certificate_is_refused_by_the_server(pki: Pki) -> None:
    done = exchange(server_context(pki), client_context(pki, None, None))
    assert done.server_error is not None and "peer did not return a certificate" in done.server_error
    assert done.client_error is not None and "certificate required" in done.client_error


def test_pki_server_certificate_of_another_ca_is_refused_by_the_client(pki: Pki) -> None:
    done = exchange(server_context(pki, pki.wrong_server_cert, pki.wrong_server_key),
                    client_context(pki, pki.client_cert, pki.client_key))
    assert not done.client_handshake
    assert done.client_error is not None and "unable to get local issuer certificate" in done.client_error
    assert done.server_error is not None and "unknown ca" in done.server_error


def test_pki_server_certificate_is_refused_for_another_name(pki: Pki) -> None:
    done = exchange(server_context(pki), client_context(pki, pki.client_cert, pki.client_key), "example.org")
    assert done.client_error is not None and "Hostname mismatch" in done.client_error


def test_pki_files(pki: Pki) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    for path in (pki.server_key, pki.client_key, pki.wrong_client_key, pki.expired_client_key,
                 pki.wrong_server_key, pki.ca_key, pki.other_ca_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    certs = {path.name: x509.load_pem_x509_certificate(path.read_bytes())
             for path in (pki.ca, pki.other_ca, pki.server_cert, pki.client_cert, pki.wrong_client_cert,
                          pki.expired_client_cert, pki.wrong_server_cert)}
    for name, cert in certs.items():
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1", name
        if name != "expired-client.pem":
            assert cert.not_valid_before_utc < now < cert.not_valid_after_utc, name
            assert cert.not_valid_after_utc - now < datetime.timedelta(days=1, minutes=5), name
    assert certs["expired-client.pem"].not_valid_after_utc < now
    server = certs["server.pem"]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = certs["client.pem"].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certs["wrong-client.pem"].issuer == certs["other-ca.pem"].subject
    assert certs["wrong-server.pem"].issuer == certs["other-ca.pem"].subject
    assert certs["expired-client.pem"].issuer == certs["ca.pem"].subject
