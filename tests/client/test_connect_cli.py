"""``wirehub connect`` as a user runs it: ``python -m wirehub connect URL`` in a subprocess
against ``wirehub serve`` in another, commands on stdin, frames on stdout."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from ..helpers import WAIT, ServerProcess, free_port

OFF = ("--ws", "off", "--udp", "off", "--admin", "off")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WIREHUB_")}


@pytest.fixture
def hub(tmp_path):
    port = free_port()
    server = ServerProcess("serve", "--tcp", f"127.0.0.1:{port}", *OFF)
    server.env = clean_env()
    server.start(tmp_path)
    try:
        server.wait_port(port)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        server.stop()


class Connect:
    """A running ``wirehub connect``: write lines to it, wait for frames it prints."""

    def __init__(self, url: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wirehub", "connect", url, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=clean_env(),
        )
        self.frames: list[dict] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, None), daemon=True).start()

    def _pump(self, stream, into) -> None:
        for line in stream:
            if into is None:
                self.stderr.append(line)
            else:
                into.put(line)
        if into is not None:
            into.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, predicate, what: str, timeout: float = WAIT) -> dict:
        """The first frame printed so far, or from now on, that ``predicate`` accepts."""
        for frame in self.frames:
            if predicate(frame):
                return frame
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout}s; printed: {self.frames}; stderr: {''.join(self.stderr)}")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait()}) before printing {what}; printed: {self.frames}; stderr: {''.join(self.stderr)}")
            frame = json.loads(line)  # every stdout line is one JSON object
            assert isinstance(frame, dict), line
            self.frames.append(frame)
            if predicate(frame):
                return frame

    def finish(self, timeout: float = WAIT) -> int:
        """Close stdin (end of input) and wait for the exit; the rest of stdout is read."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self.proc.wait(timeout)
        while (line := self._lines.get(timeout=timeout)) is not None:
            self.frames.append(json.loads(line))
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def op(name: str, **fields):
    return lambda f: f.get("op") == name and all(f.get(k) == v for k, v in fields.items())


def run_connect(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wirehub", "connect", *args], input=stdin, capture_output=True, text=True, timeout=WAIT * 2, env=clean_env()
    )


def test_commands_and_raw_frames_from_a_pipe(hub):
    """Everything piped at once, then end of input: every reply is printed, in order, exit 0."""
    lines = [
        "/join lobby",
        "/pub lobby hello there",
        '{"op":"presence","room":"lobby","ref":"raw-1"}',
        '{"op":"pub","room":"lobby","data":{"json":[1,2]}}',
        "/history lobby 1",
        "/bogus",
        "not json",
        '{"op":"ping","ref":"last"}',
    ]
    out = run_connect(hub, "--name", "ada", stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    frames = [json.loads(line) for line in out.stdout.splitlines()]
    ops = [f["op"] for f in frames]
    assert ops == ["welcome", "joined", "msg", "ok", "presence", "msg", "history", "pong"], frames
    welcome = frames[0]
    me = welcome["client"]
    assert frames[1]["room"] == "lobby" and frames[1]["seq"] == 0
    assert frames[2] == {**frames[2], "room": "lobby", "seq": 1, "from": me, "data": "hello there"}
    assert frames[3]["seq"] == 1
    assert frames[4]["ref"] == "raw-1" and frames[4]["members"] == [{"client": me, "user": welcome["user"], "name": "ada"}]
    assert frames[5]["data"] == {"json": [1, 2]} and frames[5]["seq"] == 2
    assert [m["data"] for m in frames[6]["messages"]] == [{"json": [1, 2]}]
    assert frames[7] == {"op": "pong", "ref": "last"}
    assert f"connected to {hub} as {me}" in out.stderr
    assert "unknown command /bogus" in out.stderr and "not a JSON object or a command" in out.stderr


def test_two_connect_processes_chat(hub):
    ada, bob = Connect(hub, "--name", "ada"), Connect(hub, "--name", "bob")
    try:
        ada_id = ada.expect(op("welcome"), "ada's welcome")["client"]
        bob_id = bob.expect(op("welcome"), "bob's welcome")["client"]
        ada.send("/join chat")
        ada.expect(op("joined", room="chat"), "ada's joined")
        bob.send("/join chat")
        bob.expect(op("joined", room="chat"), "bob's joined")
        joined = ada.expect(op("join", room="chat"), "bob's presence join")
        assert (joined["client"], joined["name"]) == (bob_id, "bob")
        bob.send("/pub chat hi ada, it's bob")
        for who in (ada, bob):
            msg = who.expect(op("msg", room="chat"), "bob's message")
            assert (msg["from"], msg["data"], msg["seq"]) == (bob_id, "hi ada, it's bob", 1)
        ada.send(f"/send {bob_id} psst")
        direct = bob.expect(lambda f: f.get("op") == "msg" and "room" not in f, "the direct message")
        assert direct == {"op": "msg", "from": ada_id, "data": "psst"}
        ada.send("/presence chat")
        members = ada.expect(op("presence", room="chat"), "the presence reply")["members"]
        assert sorted(m["name"] for m in members) == ["ada", "bob"]
        ada.send("/quit")
        assert ada.proc.wait(WAIT) == 0
        left = bob.expect(op("leave", room="chat"), "ada's leave")
        assert left["client"] == ada_id
        bob.send("/send nobody.1 hello?")
        error = bob.expect(op("error"), "the error for an unknown client")
        assert error["code"] == "no_such_client"
        assert bob.finish() == 0
    finally:
        ada.kill()
        bob.kill()


def test_kicked_exits_non_zero(tmp_path):
    port, admin = free_port(), free_port()
    server = ServerProcess("serve", "--tcp", f"127.0.0.1:{port}", "--ws", "off", "--udp", "off", "--admin", f"127.0.0.1:{admin}")
    server.env = clean_env()
    server.start(tmp_path)
    client = None
    try:
        server.wait_port(port)
        server.wait_port(admin)
        client = Connect(f"tcp://127.0.0.1:{port}")
        me = client.expect(op("welcome"), "the welcome")["client"]
        request = urllib.request.Request(f"http://127.0.0.1:{admin}/api/connections/{me}", method="DELETE")
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            assert response.status < 300
        client.expect(op("bye", reason="kicked"), "the bye")
        assert client.proc.wait(WAIT) == 1
        assert "disconnected: kicked" in "".join(client.stderr)
    finally:
        if client is not None:
            client.kill()
        server.stop()


@pytest.mark.parametrize(
    "url, code, words",
    [
        ("http://127.0.0.1:1", 2, "unknown scheme 'http'"),
        ("tcp://127.0.0.1", 2, "needs a port"),
        ("nonsense", 2, "bad hub URL 'nonsense'"),
    ],
)
def test_bad_url_exits_with_a_clear_message(url, code, words):
    out = run_connect(url)
    assert out.returncode == code
    assert words in out.stderr and out.stdout == ""


def test_unreachable_hub_exits_non_zero():
    port = free_port()  # nothing listens there
    out = run_connect(f"tcp://127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"cannot connect to tcp://127.0.0.1:{port}: Connection refused" in out.stderr
    out = run_connect("unix:///nonexistent/wirehub.sock")
    assert out.returncode == 1 and "No such file or directory" in out.stderr
    out = run_connect(f"tcp://127.0.0.1:{port}", "--cafile", "ca.pem")
    assert out.returncode == 2 and "--cafile is for tls:// and wss://" in out.stderr


def test_connect_over_udp_does_the_address_validation(tmp_path):
    """``wirehub connect udp://`` against ``wirehub serve``: the cookie round trip is the
    client's business; what the user sees is the same as on TCP."""
    port, udp = free_port(), free_port(socket.SOCK_DGRAM)
    server = ServerProcess("serve", "--tcp", f"127.0.0.1:{port}", "--udp", f"127.0.0.1:{udp}", "--ws", "off", "--admin", "off")
    server.env = clean_env()
    server.start(tmp_path)
    try:
        server.wait_port(port)
        lines = ["/join lobby", "/pub lobby over udp", '{"op":"ping","ref":"last"}']
        out = run_connect(f"udp://127.0.0.1:{udp}", stdin="\n".join(lines) + "\n")
        assert out.returncode == 0, out.stderr
        frames = [json.loads(line) for line in out.stdout.splitlines()]
        assert [f["op"] for f in frames] == ["welcome", "joined", "msg", "ok", "pong"], frames
        assert frames[2]["data"] == "over udp"
    finally:
        server.stop()
