"""Programs no one here wrote (nc, openssl s_client, a plain blocking socket) against the
built-in echo app served by ``wirehub run`` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import time

import pytest

from .helpers import WAIT, ServerProcess, free_port

ECHO = "wirehub.apps.echo:app"
DEFAULT_LISTENERS = ("--tcp", "--udp", "--ws", "--admin")  # on unless turned off


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (scripts/test installs it)")
    return path


@contextlib.contextmanager
def echo_server(tmp_path, *args: str, port: int | None = None):
    """``wirehub run`` the echo app with every listener off but ``args``; on exit, stop it
    with SIGTERM and require a clean drain (exit code 0)."""
    off = [x for flag in DEFAULT_LISTENERS if flag not in args for x in (flag, "off")]
    server = ServerProcess("run", ECHO, *off, *args).start(tmp_path)
    try:
        if port is not None:
            server.wait_port(port)
        else:
            server.wait_log("listening")
        yield server
    except BaseException:
        server.stop()
        raise
    code = server.stop()
    assert code == 0, f"server exited with {code}:\n{server.log}"


def run(cmd: list[str], data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=data, capture_output=True, timeout=WAIT)


def test_nc_tcp(tmp_path):
    nc = need("nc")
    port = free_port()
    with echo_server(tmp_path, "--tcp", f"127.0.0.1:{port}", port=port):
        # -N: shut down the write side at stdin EOF, then read until the server closes
        out = run([nc, "-N", "127.0.0.1", str(port)], b"a\nb\n")
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"a\nb\n"
        out = run([nc, "-N", "127.0.0.1", str(port)], b"crlf\r\n\n\nlast line without newline")
        assert out.stdout == b"crlf\n"  # \r\n stripped, blank lines skipped, no partial frame


def test_nc_udp(tmp_path):
    nc = need("nc")
    tcp, udp = free_port(), free_port(socket.SOCK_DGRAM)
    with echo_server(tmp_path, "--tcp", f"127.0.0.1:{tcp}", "--udp", f"127.0.0.1:{udp}", port=tcp):
        out = run([nc, "-u", "-w1", "127.0.0.1", str(udp)], b"over udp\n")
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"over udp\n"


def test_nc_unix_socket(tmp_path):
    nc = need("nc")
    path = str(tmp_path / "echo.sock")
    with echo_server(tmp_path, "--unix", path):
        out = run([nc, "-N", "-U", path], b"one\ntwo\n")
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"one\ntwo\n"
    assert not os.path.exists(path), "the socket file outlived the server"


def read_line(proc: subprocess.Popen, deadline: float) -> bytes:
    """One line of the child's stdout, without blocking past ``deadline``."""
    fd = proc.stdout.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line within {WAIT}s; got {buf!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


def test_openssl_s_client(tmp_path, tls_certs):
    openssl = need("openssl")
    port = free_port()
    with echo_server(
        tmp_path, "--tls", f"127.0.0.1:{port}", "--cert", tls_certs["cert"], "--key", tls_certs["key"], port=port
    ):
        cmd = [
            openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", tls_certs["ca"],
            "-verify_ip", "127.0.0.1", "-verify_return_error", "-quiet",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.stdin.write(b"hello from openssl\n")
            proc.stdin.flush()
            line = read_line(proc, time.monotonic() + WAIT)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=WAIT)
        assert line == b"hello from openssl\n", err


def test_openssl_s_client_refuses_tls11(tmp_path, tls_certs):
    openssl = need("openssl")
    port = free_port()
    with echo_server(
        tmp_path, "--tls", f"127.0.0.1:{port}", "--cert", tls_certs["cert"], "--key", tls_certs["key"], port=port
    ) as server:
        cmd = [
            openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", tls_certs["ca"],
            "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-quiet",
        ]  # fmt: skip
        out = run(cmd, b"should not be echoed\n")
        assert out.returncode != 0
        assert b"should not be echoed" not in out.stdout
        if b"no protocols available" not in out.stderr:  # this OpenSSL could offer TLS 1.1...
            server.wait_log("UNSUPPORTED_PROTOCOL")  # ...and the server is the one that said no


def test_plain_blocking_python_socket(tmp_path):
    port = free_port()
    with echo_server(tmp_path, "--tcp", f"127.0.0.1:{port}", port=port):
        lines = [b"line %d" % i for i in range(5000)]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"".join(line + b"\n" for line in lines))
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received == b"".join(line + b"\n" for line in lines)


def test_refusal_message_over_the_per_ip_limit(tmp_path):
    nc = need("nc")
    port = free_port()
    with echo_server(tmp_path, "--tcp", f"127.0.0.1:{port}", "--max-connections-per-ip", "1", port=port):
        deadline = time.monotonic() + WAIT
        while True:  # wait_port's probe may hold the one slot for a moment
            holder = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            holder.sendall(b"hold\n")
            if holder.recv(100) == b"hold\n":
                break
            holder.close()
            assert time.monotonic() < deadline, "never got a slot"
        with holder:
            out = run([nc, "-N", "127.0.0.1", str(port)], b"refused?\n")
            assert out.stdout == b"error: connection refused (max_connections_per_ip); try again later\n"
            holder.sendall(b"still here\n")
            assert holder.recv(100) == b"still here\n"
