"""--workers N: processes sharing the ports, restarted when they die, drained together."""

from __future__ import annotations

import os
import signal
import socket
import time

from ..helpers import WAIT, ServerProcess, free_port

PID_APP = """
import os
import wirehub

app = wirehub.App()

@app.on_frame
def frame(conn, data):
    conn.send(str(os.getpid()).encode())
"""


def _ask_pid(port: int, sock: socket.socket | None = None) -> tuple[int, socket.socket]:
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.sendall(b"pid?\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(64)
        assert chunk, "server closed"
        buf += chunk
    return int(buf), s


def _start(tmp_path, port: int, *extra: str) -> ServerProcess:
    (tmp_path / "pidapp.py").write_text(PID_APP)
    server = ServerProcess(
        "run", "pidapp:app", "--workers", "2", "--tcp", f"127.0.0.1:{port}",
        "--udp", "off", "--ws", "off", "--admin", "off", *extra,
        cwd=str(tmp_path),
    ).start(tmp_path)
    server.wait_log("worker_started", count=2)
    server.wait_port(port)
    return server


def test_workers_share_the_port_and_drain_together(tmp_path):
    port = free_port()
    server = _start(tmp_path, port)
    pids, socks = set(), []
    for _ in range(40):  # SO_REUSEPORT hashes each new connection to one worker
        pid, s = _ask_pid(port)
        pids.add(pid)
        socks.append(s)
    assert len(pids) == 2 and server.proc.pid not in pids
    server.proc.send_signal(signal.SIGTERM)
    for s in socks:
        assert s.recv(16) == b""  # every worker closed its connections
        s.close()
    assert server.proc.wait(WAIT) == 0
    for pid in pids:  # no worker left behind
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_dead_worker_is_restarted(tmp_path):
    port = free_port()
    server = _start(tmp_path, port)
    seen = {}
    while len(seen) < 2:
        pid, s = _ask_pid(port)
        seen[pid] = s
    victim = next(iter(seen))
    os.kill(victim, signal.SIGKILL)
    server.wait_log("worker_died")
    server.wait_log("worker_started", count=3)
    # the survivor's connection is untouched; new connections reach two live workers again
    survivor = [p for p in seen if p != victim][0]
    assert _ask_pid(port, seen[survivor])[0] == survivor
    fresh = set()
    deadline = time.monotonic() + WAIT
    while len(fresh) < 2 and time.monotonic() < deadline:
        pid, s = _ask_pid(port)
        fresh.add(pid)
        s.close()
    assert victim not in fresh and len(fresh) == 2
    for s in seen.values():
        s.close()
    assert server.stop() == 0


def test_bind_failure_is_reported_once_before_any_worker_starts(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    (tmp_path / "pidapp.py").write_text(PID_APP)
    server = ServerProcess(
        "run", "pidapp:app", "--workers", "2", "--tcp", f"127.0.0.1:{port}", "--udp", "off", "--ws", "off", "--admin", "off",
        cwd=str(tmp_path),
    ).start(tmp_path)
    assert server.proc.wait(WAIT) == 3
    assert f"127.0.0.1:{port}" in server.log and "worker_started" not in server.log
    server.stop()
    blocker.close()
