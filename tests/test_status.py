"""`wirehub status` and `wirehub top` against a running hub."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from wirehub.status import fetch_page

from .helpers import WAIT, ServerProcess, free_port


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wirehub", *args], capture_output=True, text=True, timeout=WAIT * 3)


def test_status_and_top_show_connections_and_rooms(tmp_path):
    port, admin = free_port(), free_port()
    server = ServerProcess("serve", "--tcp", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--ws", "off", "--udp", "off").start(tmp_path)
    try:
        server.wait_port(admin)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s, s.makefile("rb") as lines:
            s.sendall(b'{"op":"hello","name":"ann"}\n{"op":"join","room":"ops"}\n{"op":"pub","room":"ops","data":1}\n')
            client = json.loads(lines.readline())["client"]
            for _ in range(2):  # joined, msg
                lines.readline()
            result = cli("status", "--admin", f"127.0.0.1:{admin}")
            assert result.returncode == 0, result.stderr
            out = result.stdout
            assert "ready=True" in out and "connections=1" in out and "rooms=1" in out
            row = next(line for line in out.splitlines() if line.startswith(client))
            assert "tcp" in row and "ops" in row and f"anon-{client}" in row
            assert any(line.split()[:3] == ["ops", "1", "1"] for line in out.splitlines())  # room, members, seq
            top = cli("top", "--admin", f"http://127.0.0.1:{admin}", "--iterations", "2", "--interval", "0.05")
            assert top.returncode == 0 and top.stdout.count("connections=1") == 2
            # the server filters: a room nobody is in, a network nobody comes from
            for args in (("--room", "nowhere"), ("--peer", "10.0.0.0/8"), ("--transport", "ws")):
                out = cli("status", "--admin", f"127.0.0.1:{admin}", *args).stdout
                assert "connections=0 (filtered)" in out and client not in out, args
            out = cli("status", "--admin", f"127.0.0.1:{admin}", "--room", "ops", "--sort", "idle_s", "--order", "asc").stdout
            assert "connections=1 (filtered)" in out and client in out
            bad = cli("status", "--admin", f"127.0.0.1:{admin}", "--peer", "not-a-network")
            assert bad.returncode == 1 and "peer must be an address or a network in CIDR form" in bad.stderr
        # once it has closed, --closed shows it with its reason
        deadline = time.monotonic() + WAIT
        while fetch_page(f"http://127.0.0.1:{admin}", "/api/connections?state=closed", None)[1] != 1:
            assert time.monotonic() < deadline, "the closed connection never showed"
        closed = cli("status", "--admin", f"127.0.0.1:{admin}", "--closed")
        assert closed.returncode == 0 and "closed=1" in closed.stdout
        row = next(line for line in closed.stdout.splitlines() if line.startswith(client))
        assert "closed" in row.split() and "ops" in row
    finally:
        assert server.stop() == 0


def test_status_says_what_to_check_when_the_server_is_not_there():
    result = cli("status", "--admin", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach the admin API" in result.stderr and "--admin" in result.stderr
