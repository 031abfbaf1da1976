"""Test helpers: run a server in the test's loop, talk to it over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, AsyncIterator

from wirehub import App, Config, Server
from wirehub.config import load

#: no default listener unless a test asks for it
NO_LISTENERS = {"tcp": "off", "ws": "off", "udp": "off", "admin": "off"}
WAIT = 10.0  # the longest any test waits for an event


def make_config(**options: Any) -> Config:
    flags = dict(NO_LISTENERS)
    flags.update({k: v for k, v in options.items()})
    return load(env={}, flags=flags)


@contextlib.asynccontextmanager
async def serving(app: App, **options: Any) -> AsyncIterator[Server]:
    """Start ``app`` on the given listeners (use port 0) in this loop; drain on exit."""
    server = Server(app, make_config(**options))
    await server.start()
    try:
        yield server
    finally:
        server.request_stop()
        await asyncio.wait_for(server.shutdown(), WAIT)


def addr(server: Server, kind: str = "tcp") -> tuple[str, int]:
    host, _, port = server.addresses[kind][0].rpartition(":")
    return host.strip("[]"), int(port)


async def wait_for(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true, checking once per loop turn (no fixed sleeps)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


async def read_lines(reader: asyncio.StreamReader, n: int, timeout: float = WAIT) -> list[bytes]:
    out = []
    for _ in range(n):
        out.append((await asyncio.wait_for(reader.readline(), timeout)).rstrip(b"\n"))
    return out


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (``ip_local_port_range``)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.Random()  # (a generator of its own: tests that seed random do not make ports collide)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free now, for a server a test starts (in another process) on it.

    Taken below the kernel's ephemeral range: a port from ``bind(0)`` is an ephemeral one, and
    between the test's check and the server's bind, any client connection of the suite may get
    it as its local port, so the server's bind fails (a rare EADDRINUSE, exit 3). Ports below the
    range are never given to connections; the randomness keeps two tests apart."""
    high = _ephemeral_low()
    low = max(1024, min(20000, high - 4096))
    for _ in range(200):
        port = _PORTS.randrange(low, high)
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, kind) as s:  # a full range: what the kernel gives
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``wirehub ARGS...`` (or ``python -m MODULE ARGS...``) in a subprocess, with its
    output captured to a file."""

    def __init__(self, *args: str, cwd: str | None = None, env: dict | None = None, module: str = "wirehub") -> None:
        self.args = args
        self.module = module
        self.cwd = cwd
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None

    def start(self, tmp_path) -> "ServerProcess":
        self.log_path = str(tmp_path / f"server-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            env=self.env,
        )
        return self

    @property
    def log(self) -> str:
        assert self.log_path is not None
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_log(self, text: str, timeout: float = WAIT, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log.count(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} before logging {text!r}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not log {text!r} within {timeout}s:\n{self.log}")
            time.sleep(0.02)

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes (``--workers N``) it logged as started."""
        return [int(m) for m in re.findall(r"worker_started\b.*?\bpid=(\d+)", self.log)]

    def wait_port(self, port: int, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"port {port} not open within {timeout}s:\n{self.log}")
                time.sleep(0.02)

    def stop(self, timeout: float = WAIT) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def reachable(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts TCP connections there (Redis, NATS...)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


class LineClient:
    """A raw hub-protocol client over TCP (one JSON object per line), for tests that run the
    hub in subprocesses: no wirehub client code involved."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.local = writer.get_extra_info("sockname")

    @classmethod
    async def open(cls, port: int, source: str | None = None, host: str = "127.0.0.1") -> "LineClient":
        local = (source, 0) if source else None
        return cls(*await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), WAIT))

    def send(self, frame: dict) -> None:
        self.writer.write(json.dumps(frame).encode() + b"\n")

    async def recv(self) -> dict:
        line = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert line, "the server closed the connection"
        return json.loads(line)

    async def until(self, op: str, **fields: Any) -> dict:
        """The next frame with this op and fields (others, like presence events, are skipped)."""
        while True:
            frame = await self.recv()
            if frame.get("op") == op and all(frame.get(k) == v for k, v in fields.items()):
                return frame

    async def request(self, frame: dict, op: str) -> dict:
        """Send ``frame`` with a fresh ref; the reply carrying that ref must be ``op``."""
        ref = uuid.uuid4().hex[:8]
        self.send(frame | {"ref": ref})
        while True:
            reply = await self.recv()
            if reply.get("ref") == ref:
                assert reply["op"] == op, reply
                return reply

    def close(self) -> None:
        self.writer.close()
