"""WebSocket listeners driven by the ``websockets`` client library over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from ..helpers import WAIT, addr, serving, wait_for
from .test_stream import Recorder


class WsRecorder(Recorder):
    """A :class:`Recorder` that can ask for binary replies (``conn.binary``)."""

    def __init__(self, *, binary: bool = False, **kw):
        super().__init__(**kw)
        self.binary = binary

    def connect(self, conn):
        conn.binary = self.binary
        super().connect(conn)


def url(server, path: str = "/") -> str:
    host, port = addr(server, "ws")
    return f"ws://{host}:{port}{path}"


def ws_connect(server, path: str = "/", **kw):
    kw.setdefault("open_timeout", WAIT)
    kw.setdefault("close_timeout", WAIT)
    return connect(url(server, path), proxy=None, compression=None, ping_interval=None, **kw)


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), WAIT)


async def closed_code(ws) -> int | None:
    """Read until the server closes; return the close code it sent."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await recv(ws)
    await asyncio.wait_for(ws.wait_closed(), WAIT)
    return ws.close_code


async def read_until_eof(reader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        return b""


async def test_text_echo():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            await ws.send("hello")
            await ws.send("héllo wörld ✓")
            await ws.send("")
            assert [await recv(ws) for _ in range(3)] == ["hello", "héllo wörld ✓", ""]
            (conn,) = server.connections()
            assert conn.transport == "ws" and conn.peer_ip == "127.0.0.1"
            assert conn.frames_in == 3 and conn.frames_out == 3
        (event,) = await app.disconnected()
        assert event[2] == "closed"


async def test_binary_message_answered_as_text_by_default():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            await ws.send(b"raw bytes \x00 ok")
            reply = await recv(ws)
            assert reply == "raw bytes \x00 ok" and isinstance(reply, str)
        assert ("frame", app.conns[0].id, b"raw bytes \x00 ok") in app.log


async def test_binary_replies_when_conn_binary_is_set():
    app = WsRecorder(binary=True)
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            payload = bytes(range(256))  # not UTF-8: only a binary message can carry it
            await ws.send(payload)
            assert await recv(ws) == payload
            await ws.send("text in")
            reply = await recv(ws)
            assert reply == b"text in" and isinstance(reply, bytes)


@pytest.mark.parametrize("path", ["/", "/a/b?x=1", "/chat/room%201/?token=abc&x="])
async def test_any_path_is_accepted(path):
    async with serving(WsRecorder(), ws="127.0.0.1:0") as server:
        async with ws_connect(server, path) as ws:
            await ws.send(f"on {path}")
            assert await recv(ws) == f"on {path}"


async def test_fragmented_message_is_reassembled():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            await ws.send(["frag", "men", "ted ✓"])
            assert await recv(ws) == "fragmented ✓"
            await ws.send([b"\x01\x02", b"", b"\x03"])  # binary fragments, one of them empty
            assert await recv(ws) == "\x01\x02\x03"
            await ws.send("whole")
            assert await recv(ws) == "whole"
        frames = [e[2] for e in app.log if e[0] == "frame"]
        assert frames == ["fragmented ✓".encode(), b"\x01\x02\x03", b"whole"]


async def test_ping_is_answered_with_pong():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            await ws.send("first")
            assert await recv(ws) == "first"
            pong = await ws.ping(b"are you there")
            latency = await asyncio.wait_for(pong, WAIT)
            assert latency >= 0
            await ws.send("after ping")
            assert await recv(ws) == "after ping"
        # control frames never reach the app
        assert [e[2] for e in app.log if e[0] == "frame"] == [b"first", b"after ping"]


async def test_message_over_max_frame_is_refused_and_the_connection_stays_open():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", max_frame="1KiB") as server:
        async with ws_connect(server) as ws:
            await ws.send("x" * 1024)  # exactly the limit is fine
            assert await recv(ws) == "x" * 1024
            await ws.send("y" * 1025)  # over: a framing error the app answers, as on TCP
            assert await recv(ws) == "error too_large"
            await ws.send(["a" * 600, "b" * 600])  # each fragment fits, the message does not
            assert await recv(ws) == "error too_large"
            await ws.send("still open")
            assert await recv(ws) == "still open"
        assert [e[0] for e in app.log].count("frame") == 2


async def test_message_far_over_max_frame_closes_with_1009():
    from wirehub.transport.websocket import WS_HARD_LIMIT

    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", max_frame="1KiB") as server:
        async with ws_connect(server) as ws:
            await ws.send("z" * (1024 * WS_HARD_LIMIT + 1))  # websockets stops reading it
            assert await closed_code(ws) == 1009
        (event,) = await app.disconnected()
        assert event[2] == "protocol"
        assert not [e for e in app.log if e[0] == "frame"]
        await wait_for(lambda: server.gate.count == 0, what="gate released")


async def test_plain_http_get_gets_4xx_and_is_closed():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        await wait_for(lambda: server.gate.count == 1, what="slot taken at accept")
        writer.write(b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = await read_until_eof(reader)  # returns only once the server closed
        status_line = response.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 4"), response[:200]
        writer.close()
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        assert app.log == [] and server.connections() == []


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"])
async def test_unfinished_upgrade_is_dropped_within_handshake_timeout(sent):
    app = WsRecorder()
    timeout = 0.3
    async with serving(app, ws="127.0.0.1:0", handshake_timeout=timeout) as server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        start = loop.time()
        writer.write(sent)
        await wait_for(lambda: server.gate.count == 1, what="slot taken at accept")
        assert await read_until_eof(reader) == b""
        elapsed = loop.time() - start
        assert timeout * 0.8 <= elapsed < timeout + 2.0, elapsed
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        assert app.log == []
        writer.close()


async def test_upgraded_but_silent_client_gets_handshake_timeout():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", handshake_timeout=0.3) as server:
        async with ws_connect(server) as ws:
            assert await recv(ws) == "bye handshake_timeout"
            assert await closed_code(ws) == 1000
            assert ws.close_reason == "handshake_timeout"
        (event,) = await app.disconnected()
        assert event[2] == "handshake_timeout"
        await wait_for(lambda: server.gate.count == 0, what="gate released")


async def test_server_shutdown_closes_with_1001_after_the_last_frame():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            await ws.send("hi")
            assert await recv(ws) == "hi"
            stopping = asyncio.create_task(server.shutdown())
            assert await recv(ws) == "bye shutdown"  # the closing handler's frame comes first
            with pytest.raises(ConnectionClosedOK):
                await recv(ws)
            assert ws.close_code == 1001 and ws.close_reason == "shutdown"
        await asyncio.wait_for(stopping, WAIT)
        (event,) = await app.disconnected()
        assert event[2] == "shutdown"
        assert [e[0] for e in app.log] == ["connect", "frame", "closing", "disconnect"]


async def test_client_close_means_disconnect_closed():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        ws = await ws_connect(server)
        await ws.send("x")
        assert await recv(ws) == "x"
        await asyncio.wait_for(ws.close(code=1000, reason="done"), WAIT)
        assert ws.close_code == 1000
        (event,) = await app.disconnected()
        assert event[2] == "closed"
        assert "closing" not in [e[0] for e in app.log]  # the peer left: nothing to say goodbye to
        assert server.connections() == []
        await wait_for(lambda: server.gate.count == 0, what="gate released")


async def test_invalid_utf8_text_closes_with_1007():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            await ws.send(b"\xff\xfe not utf-8", text=True)  # RFC 6455 8.1: fail the connection
            code = await closed_code(ws)
        (event,) = await app.disconnected()
        assert not [e for e in app.log if e[0] == "frame"], "invalid UTF-8 text was handed to the app"
        assert event[2] == "protocol"
        assert code == 1007


async def test_server_side_close_sends_last_frame_then_close_frame():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            await ws.send("hi")
            assert await recv(ws) == "hi"
            assert server.disconnect(app.conns[0].id)
            assert await recv(ws) == "bye kicked"
            assert await closed_code(ws) == 1000
            assert ws.close_reason == "kicked"
        (event,) = await app.disconnected()
        assert event[2] == "kicked"
        await wait_for(lambda: server.gate.count == 0, what="gate released")


async def test_client_dropping_tcp_without_close_frame():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        ws = await ws_connect(server)
        await ws.send("x")
        assert await recv(ws) == "x"
        ws.transport.close()  # FIN, no closing handshake
        (event,) = await app.disconnected()
        assert event[2] == "closed"
        await wait_for(lambda: server.gate.count == 0, what="gate released")


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_raw_upgrade_request_gets_101():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head  # RFC 6455 sample
        await app.wait(lambda log: log and log[0][0] == "connect")
        writer.close()
        await app.disconnected()


async def test_upgrade_pending_at_shutdown_is_not_completed_afterwards():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", handshake_timeout=5) as server:
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        await wait_for(lambda: server.gate.count == 1, what="slot taken at accept")
        await asyncio.wait_for(server.shutdown(), WAIT)
        writer.write(UPGRADE)  # the server has stopped: this must not open a connection
        try:
            data = await asyncio.wait_for(reader.read(4096), WAIT)
        except ConnectionResetError:
            data = b""
        writer.close()
        leftover = server.connections()
        for conn in leftover:
            conn.abort()
        assert not data.startswith(b"HTTP/1.1 101"), data
        assert app.log == [] and leftover == []
        assert server.gate.count == 0


async def test_garbage_instead_of_http_is_closed():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        response = await read_until_eof(reader)
        assert b"101" not in response
        writer.close()
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        assert app.log == []


async def test_idle_connection_gets_last_frame_then_close():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", idle_timeout=0.3) as server:
        async with ws_connect(server) as ws:
            await ws.send("hi")
            assert await recv(ws) == "hi"
            assert await recv(ws) == "bye idle"
            assert await closed_code(ws) == 1000 and ws.close_reason == "idle"
        (event,) = await app.disconnected()
        assert event[2] == "idle"
        assert server.connections() == []


async def test_wss_echo(tls_certs):
    app = WsRecorder()
    async with serving(app, wss="127.0.0.1:0", cert=tls_certs["cert"], key=tls_certs["key"]) as server:
        host, port = addr(server, "wss")
        ctx = ssl.create_default_context(cafile=tls_certs["ca"])
        async with connect(f"wss://{host}:{port}/secure", ssl=ctx, proxy=None, open_timeout=WAIT) as ws:
            await ws.send("secret")
            assert await recv(ws) == "secret"
            assert server.connections()[0].transport == "wss"
        (event,) = await app.disconnected()
        assert event[2] == "closed"


async def test_frames_sent_with_the_upgrade_request_are_read():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        masked = bytes((0x81, 0x80 | 5)) + b"\0\0\0\0" + b"early"  # the all-zero mask
        writer.write(UPGRADE + masked)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await asyncio.wait_for(reader.readexactly(7), WAIT) == b"\x81\x05early"
        writer.close()
        await app.disconnected()


async def test_an_upgrade_request_over_the_limit_gets_431():
    from wirehub.protocol.websocket import MAX_UPGRADE_SIZE

    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        writer.write(b"GET / HTTP/1.1\r\nX-Filler: " + b"x" * MAX_UPGRADE_SIZE)
        response = await read_until_eof(reader)
        assert response.startswith(b"HTTP/1.1 431 "), response[:100]
        writer.close()
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        assert app.log == [] and server.connections() == []


class SlowWsRecorder(WsRecorder):
    """Frames handled in the connection's task (an async handler) that waits for ``go``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.go = asyncio.Event()

    async def frame(self, conn, data):
        self._add("frame", conn.id, data)
        await self.go.wait()
        conn.send(data)


async def test_a_peer_gone_without_a_close_frame_while_an_async_handler_runs_is_let_go():
    """The peer sends a message and closes TCP (FIN, no close frame) while the async handler
    still works on it: the server answers, sends its close frame, closes the socket, and the
    connection ends (disconnect, the accept gate released), not a half-open socket kept."""
    app = SlowWsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server, "ws"))
        writer.write(UPGRADE)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        mask = b"\x01\x02\x03\x04"
        writer.write(bytes((0x81, 0x80 | 1)) + mask + bytes((ord("x") ^ mask[0],)))
        await app.wait(lambda log: any(e[0] == "frame" for e in log))
        writer.write_eof()  # the peer is done: FIN while the handler waits
        await wait_for(lambda: app.conns[0]._eof, what="the server saw the FIN")
        app.go.set()
        (event,) = await app.disconnected()
        assert event[2] == "closed"
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        writer.close()


async def test_messages_before_a_close_frame_are_answered_then_the_close_handshake_completes():
    """The peer sends messages, then its close frame, while an async handler still works on
    the first: as at EOF on TCP, every message before the close frame is handled and its reply
    delivered, then the server's close frame echoes the peer's code and the connection ends
    with reason closed."""
    app = SlowWsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        ws = await ws_connect(server)
        n = 5
        for i in range(n):
            await ws.send(f"m{i}")
        await app.wait(lambda log: any(e[0] == "frame" for e in log))
        conn = app.conns[0]
        sent = sum(6 + len(f"m{i}") for i in range(n)) + 8  # masked frames; the close frame: code 4000, no reason
        closing = asyncio.ensure_future(ws.close(code=4000))
        await wait_for(lambda: conn.bytes_in >= sent, what="the server read the close frame")
        app.go.set()
        await asyncio.wait_for(closing, WAIT)
        assert ws.close_code == 4000  # the server's close frame echoed the client's code
        got = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                got.append(await recv(ws))
        assert got == [f"m{i}" for i in range(n)]
        (event,) = await app.disconnected()
        assert event[2] == "closed"
        assert [e[2] for e in app.log if e[0] == "frame"] == [f"m{i}".encode() for i in range(n)]
        await wait_for(lambda: server.gate.count == 0, what="gate released")
