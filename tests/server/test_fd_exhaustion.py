"""Out of file descriptors: the accept loop backs off and recovers instead of spinning or dying."""

from __future__ import annotations

import resource
import select
import socket
import subprocess
import sys

from ..helpers import WAIT, ServerProcess, free_port

FD_LIMIT = 48  # the interpreter and the loop take ~20; the rest are connections


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


class LimitedServer(ServerProcess):
    def start(self, tmp_path):  # same as ServerProcess.start, with a hard open-file limit
        self.log_path = str(tmp_path / "server.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wirehub", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_limit_fds, env=self.env,
        )
        return self


def _recv_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(64)
        if not chunk:
            break
        buf += chunk
    return buf


def test_emfile_backs_off_then_serves_the_waiting_clients(tmp_path):
    port = free_port()
    server = LimitedServer(
        "run", "wirehub.apps.echo:app", "--tcp", f"127.0.0.1:{port}", "--udp", "off", "--ws", "off", "--admin", "off"
    ).start(tmp_path)
    server.wait_port(port)
    clients = []
    for i in range(FD_LIMIT + 10):  # more than the server can hold
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        s.sendall(b"client %d\n" % i)
        clients.append(s)
    server.wait_log("accept_backoff")
    # Collect the replies that come; the clients the server could not accept get none.
    served, pending = [], list(clients)
    while pending:
        ready, _, _ = select.select(pending, [], [], 0.5)
        if not ready:
            break
        for s in ready:
            served.append((s, _recv_line(s)))
            pending.remove(s)
    waiting = pending
    assert served and waiting, (len(served), len(waiting))
    for s, line in served:
        assert line.startswith(b"client ")
        s.close()
    # descriptors free up: the listener resumes and every waiting client is answered
    for s in waiting:
        s.settimeout(WAIT)
        assert _recv_line(s).startswith(b"client ")
        s.close()
    assert server.proc.poll() is None  # never died
    assert server.stop() == 0
