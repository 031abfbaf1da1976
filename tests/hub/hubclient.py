"""Outside clients for the hub wire protocol: one per transport, all with the same async API.

These speak the protocol from SPEC.md with plain sockets (asyncio streams, ``ssl``, a UDP
socket) and the ``websockets`` client library -- never wirehub's own client code -- so the
tests check the wire, not the implementation against itself.

API (every client)::

    await c.send({"op": "ping"})        # one JSON object, framed for the transport
    await c.send_raw(b"not json")        # exact bytes as one frame (line / message / datagram)
    frame = await c.recv()               # next frame as a dict; Closed when the server closed
    frame = await c.expect("pong", ref=1)  # next frame must have this op and these fields
    before = await c.barrier()           # ping with a fresh ref: the frames that came before the pong
    frames = await c.closed()            # read until the server closes; the frames it sent first
    await c.close()

``barrier()`` is how the tests show that *nothing* was sent to a client without waiting for a
fixed time: the hub answers one connection's frames in order and (with the memory broker)
delivers publications and presence events inline, so anything meant for the client is queued
before the pong to a ping sent afterwards.

:func:`hub_server` runs a :class:`wirehub.hub.HubApp` in the test's loop with one listener of
the chosen transport and hands out connected clients; it closes them before draining the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import ssl
import tempfile
from typing import Any, AsyncIterator

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from wirehub.hub import HubApp

from ..helpers import WAIT, addr, make_config, serving, wait_for

TRANSPORTS = ("tcp", "tls", "unix", "ws", "udp")
STREAMS = ("tcp", "tls", "unix")
STREAM_LIMIT = 64 * 1024 * 1024  # readline limit: big enough for any frame a test provokes

_refs = itertools.count(1_000_000)


class Closed(Exception):
    """The server closed the connection (EOF, close frame) while a frame was awaited."""


def dumps(obj: Any) -> bytes:
    """Compact JSON, UTF-8, non-ASCII kept as is (what a typical client sends)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class HubClient:
    """What every transport's client shares."""

    transport = "?"

    def __init__(self) -> None:
        self.client_id: str | None = None  # set by hello()
        self.user: str | None = None  # set by hello()

    # -------------------------------------------------------------- transport hooks

    async def send_raw(self, data: bytes) -> None:
        raise NotImplementedError

    async def _recv_bytes(self, timeout: float) -> bytes:
        """The next frame's bytes; raises Closed at the server's close, TimeoutError."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def _wait_close(self, timeout: float) -> list[dict]:
        frames = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                frames.append(await self.recv(max(0.0, deadline - loop.time())))
            except Closed:
                return frames

    # -------------------------------------------------------------- the API

    async def send(self, obj: Any) -> None:
        await self.send_raw(dumps(obj))

    async def recv(self, timeout: float = WAIT) -> dict:
        data = await self._recv_bytes(timeout)
        try:
            frame = json.loads(data)
        except ValueError as exc:  # the server must only ever send JSON objects
            raise AssertionError(f"server sent a frame that is not JSON: {data[:200]!r}") from exc
        assert isinstance(frame, dict), f"server sent a JSON {type(frame).__name__}, not an object: {data[:200]!r}"
        return frame

    async def expect(self, op: str | None = None, *, timeout: float = WAIT, **fields: Any) -> dict:
        """The next frame, which must have ``op`` and every given field equal (others ignored)."""
        frame = await self.recv(timeout)
        if op is not None:
            assert frame.get("op") == op, f"expected op {op!r}{_show(fields)}, got {frame}"
        for key, value in fields.items():
            assert key in frame, f"expected {key}={value!r} in {frame}"
            assert frame[key] == value, f"expected {key}={value!r}, got {frame}"
        return frame

    async def request(self, obj: dict, op: str, **fields: Any) -> dict:
        await self.send(obj)
        return await self.expect(op, **fields)

    async def barrier(self, timeout: float = WAIT) -> list[dict]:
        """Ping with a fresh ref; return every frame that arrived before its pong."""
        ref = next(_refs)
        await self.send({"op": "ping", "ref": ref})
        before = []
        while True:
            frame = await self.recv(timeout)
            if frame == {"op": "pong", "ref": ref}:
                return before
            before.append(frame)

    async def silent(self, seconds: float) -> None:
        """Assert that nothing arrives for ``seconds``. Only for checks where no ping
        barrier can prove it (e.g. while the server is supposed to be timing something)."""
        try:
            frame = await self.recv(seconds)
        except (asyncio.TimeoutError, TimeoutError):
            return
        raise AssertionError(f"expected silence for {seconds}s, got {frame}")

    async def closed(self, timeout: float = WAIT) -> list[dict]:
        """Read until the server closes the connection; return the frames it sent first.
        (UDP has no close on the wire: there it returns once a ``bye`` arrived.)"""
        try:
            return await self._wait_close(timeout)
        finally:
            await self.close()

    # -------------------------------------------------------------- conveniences

    async def hello(self, **fields: Any) -> dict:
        welcome = await self.request({"op": "hello", **fields}, "welcome")
        self.client_id = welcome["client"]
        self.user = welcome["user"]
        return welcome

    async def join(self, room: str, **fields: Any) -> dict:
        return await self.request({"op": "join", "room": room, **fields}, "joined", room=room)

    async def pub(self, room: str, data: Any, ref: Any = None) -> None:
        frame = {"op": "pub", "room": room, "data": data}
        if ref is not None:
            frame["ref"] = ref
        await self.send(frame)


def _show(fields: dict) -> str:
    return (" with " + ", ".join(f"{k}={v!r}" for k, v in fields.items())) if fields else ""


# ------------------------------------------------------------------ byte streams


class StreamClient(HubClient):
    """TCP, TLS and Unix: one JSON object per ``\\n``-terminated line."""

    def __init__(self, transport: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.transport = transport
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, transport: str, target: Any, ssl_context: ssl.SSLContext | None = None) -> StreamClient:
        if transport == "unix":
            reader, writer = await asyncio.open_unix_connection(target, limit=STREAM_LIMIT)
        else:
            host, port = target
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_context, limit=STREAM_LIMIT), WAIT
            )
        return cls(transport, reader, writer)

    async def send_raw(self, data: bytes, *, newline: bool = True) -> None:
        self.writer.write(data + b"\n" if newline else data)
        await self.writer.drain()

    async def _recv_bytes(self, timeout: float) -> bytes:
        try:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as exc:
            raise Closed(str(exc)) from exc
        if not line:
            raise Closed("EOF")
        assert line.endswith(b"\n"), f"the server closed in the middle of a line: {line[:200]!r}"
        return line[:-1]

    async def close(self) -> None:
        if self.writer.is_closing():
            return
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)


# ------------------------------------------------------------------ WebSocket


class WsClient(HubClient):
    """WebSocket: one JSON object per text message."""

    transport = "ws"

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws

    @classmethod
    async def open(cls, target: tuple[str, int], path: str = "/") -> WsClient:
        host, port = target
        ws = await ws_connect(
            f"ws://{host}:{port}{path}",
            proxy=None,
            compression=None,
            ping_interval=None,
            open_timeout=WAIT,
            close_timeout=WAIT,
            max_size=STREAM_LIMIT,
            max_queue=None,  # buffer everything: a test may leave messages unread and still close
        )
        return cls(ws)

    async def send_raw(self, data: bytes, *, text: bool = True) -> None:
        await self.ws.send(data, text=text)

    async def _recv_bytes(self, timeout: float) -> bytes:
        try:
            message = await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as exc:
            raise Closed(str(exc)) from exc
        assert isinstance(message, str), f"the hub sent a binary message: {message[:200]!r}"
        return message.encode()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason

    async def _wait_close(self, timeout: float) -> list[dict]:
        frames = await super()._wait_close(timeout)
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return frames

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), WAIT)


# ------------------------------------------------------------------ UDP


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable after the server left
        pass


class UdpClient(HubClient):
    """UDP: one JSON object per datagram, from one source port (the session)."""

    transport = "udp"

    def __init__(self, sock: socket.socket, transport: asyncio.DatagramTransport, proto: _Datagrams) -> None:
        super().__init__()
        self.sock = sock
        self._transport = transport
        self._proto = proto
        self.cookie: str | None = None  # echoed by the first frame sent (see validate)

    @classmethod
    async def open(cls, target: tuple[str, int]) -> UdpClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.setblocking(False)
        sock.connect(target)
        transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(_Datagrams, sock=sock)
        client = cls(sock, transport, proto)  # type: ignore[arg-type]
        await client.validate()
        return client

    async def validate(self) -> None:
        """The first half of the hub's UDP address validation (docs/hub.md): a padded
        datagram gets a challenge (and opens nothing). The first frame sent then echoes its
        cookie, which opens the session. Loopback loses nothing: no retries."""
        self._transport.sendto(b'{"op":"ping","pad":"' + b" " * 100 + b'"}')
        challenge = json.loads(await self._recv_bytes(WAIT))
        assert challenge["op"] == "challenge" and isinstance(challenge["cookie"], str), challenge
        self.cookie = challenge["cookie"]

    async def send_raw(self, data: bytes) -> None:
        cookie, self.cookie = self.cookie, None
        if cookie is not None:
            if data.startswith(b"{") and data.rstrip().endswith(b"}"):
                data = data.rstrip()[:-1] + (b"," if data.rstrip() != b"{}" else b"") + b'"cookie":"' + cookie.encode() + b'"}'
            else:  # not an object to carry the cookie: a ping of its own does
                self._transport.sendto(json.dumps({"op": "ping", "cookie": cookie}).encode())
                answer = json.loads(await self._recv_bytes(WAIT))
                assert answer["op"] in ("pong", "error"), answer
        self._transport.sendto(data)

    async def _recv_bytes(self, timeout: float) -> bytes:
        data = await asyncio.wait_for(self._proto.queue.get(), timeout)
        # A datagram may end with one "\n" (line framing of datagrams); the JSON is the rest.
        return data[:-1] if data.endswith(b"\n") else data

    async def _wait_close(self, timeout: float) -> list[dict]:
        # No close on the wire: the session ends with its bye (best effort, but loopback).
        frames = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self.recv(max(0.0, deadline - loop.time()))
            frames.append(frame)
            if frame.get("op") == "bye":
                return frames

    async def close(self) -> None:
        self._transport.close()


# ------------------------------------------------------------------ a hub to talk to


def listener_options(transport: str, *, certs: dict | None = None, unix_path: str | None = None) -> dict:
    if transport in ("tcp", "ws", "udp"):
        return {transport: "127.0.0.1:0"}
    if transport == "tls":
        assert certs is not None, "TLS needs the tls_certs fixture"
        return {"tls": "127.0.0.1:0", "cert": certs["cert"], "key": certs["key"]}
    if transport == "unix":
        assert unix_path is not None
        return {"unix": unix_path}
    raise ValueError(transport)


class RunningHub:
    """A hub serving in this loop, plus the clients a test opened on it."""

    def __init__(self, server: Any, app: HubApp, transport: str, certs: dict | None) -> None:
        self.server = server
        self.app = app
        self.transport = transport
        self.certs = certs
        self.clients: list[HubClient] = []

    async def client(self, transport: str | None = None) -> HubClient:
        """A new connected client on ``transport`` (the hub's main one by default)."""
        kind = transport or self.transport
        if kind in STREAMS:
            if kind == "unix":
                target: Any = self.server.addresses["unix"][0]
            else:
                target = addr(self.server, kind)
            ctx = ssl.create_default_context(cafile=self.certs["ca"]) if kind == "tls" else None
            c: HubClient = await StreamClient.open(kind, target, ctx)
        elif kind == "ws":
            c = await WsClient.open(addr(self.server, "ws"))
        elif kind == "udp":
            c = await UdpClient.open(addr(self.server, "udp"))
        else:
            raise ValueError(kind)
        self.clients.append(c)
        return c

    async def greeted(self, transport: str | None = None, **hello: Any) -> HubClient:
        """A new client that has said hello (so ``client_id`` is known)."""
        c = await self.client(transport)
        await c.hello(**hello)
        return c

    async def drop(self, c: HubClient) -> None:
        """Disconnect ``c`` and wait until the hub has let it go: the client closes (UDP has
        no close on the wire, so there the server kicks it)."""
        client_id = c.client_id
        assert client_id, "say hello first: the client id comes in the welcome"
        if c.transport == "udp":
            assert self.server.disconnect(client_id)
            await c.closed()
        else:
            await c.close()
        await wait_for(lambda: client_id not in self.app.sessions, what="the session to end")

    @property
    def admin_url(self) -> str:
        return "http://" + self.server.addresses["admin"][0]


@contextlib.asynccontextmanager
async def hub_server(
    transport: str, *, certs: dict | None = None, extra: tuple[str, ...] = (), broker: Any = None, hooks: Any = None, **options: Any
) -> AsyncIterator[RunningHub]:
    """Serve a HubApp with a listener for ``transport`` (and each of ``extra``) on port 0."""
    tmpdir = None
    listeners: dict[str, Any] = {}
    for kind in (transport, *extra):
        unix_path = None
        if kind == "unix":
            tmpdir = tmpdir or tempfile.mkdtemp(prefix="wh-")  # short: sun_path is ~100 bytes
            unix_path = os.path.join(tmpdir, "hub.sock")
        listeners.update(listener_options(kind, certs=certs, unix_path=unix_path))
    options = {**listeners, **options}
    app = HubApp(make_config(**options), broker, hooks)
    try:
        async with serving(app, **options) as server:
            hub = RunningHub(server, app, transport, certs)
            try:
                yield hub
            finally:
                for c in hub.clients:
                    await c.close()
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
