"""Byte-stream connections over real loopback sockets: TCP (IPv4 and IPv6) and Unix."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from wirehub import App

from ..helpers import WAIT, addr, read_lines, serving, wait_for


def echo_app(framing: str = "line") -> App:
    app = App(framing=framing)

    @app.on_frame
    def frame(conn, data):
        conn.send(data)

    return app


class Recorder(App):
    """Records every event; ``events`` is awaited by tests instead of sleeping."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log: list[tuple] = []
        self.counts: dict[str, int] = {}
        self.changed = asyncio.Event()
        self.conns = []

    def _add(self, *event):
        self.log.append(event)
        self.counts[event[0]] = self.counts.get(event[0], 0) + 1
        self.changed.set()

    def connect(self, conn):
        self.conns.append(conn)
        self._add("connect", conn.id)

    def frame(self, conn, data):
        self._add("frame", conn.id, data)
        conn.send(data)

    def frame_error(self, conn, error):
        self._add("error", conn.id, error.code)
        conn.send(b"error " + error.code.encode())

    def closing(self, conn, reason):
        self._add("closing", conn.id, reason)
        conn.send(b"bye " + reason.encode())

    def disconnect(self, conn, reason):
        self._add("disconnect", conn.id, reason)

    async def wait(self, pred, timeout=WAIT):
        async def _loop():
            while not pred(self.log):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(_loop(), timeout)

    async def disconnected(self, n=1):
        await self.wait(lambda log: self.counts.get("disconnect", 0) >= n)
        return [e for e in self.log if e[0] == "disconnect"]


async def test_tcp_echo_lines_split_and_pipelined():
    async with serving(echo_app(), tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"one\ntw")
        await writer.drain()
        writer.write(b"o\r\nthree\n\n" + b"".join(b"p%d\n" % i for i in range(100)))
        lines = await read_lines(reader, 103)
        assert lines == [b"one", b"two", b"three"] + [b"p%d" % i for i in range(100)]
        writer.close()


async def test_tcp_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    async with serving(echo_app(), tcp="[::1]:0") as server:
        assert server.addresses["tcp"][0].startswith("[::1]:")
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"six\n")
        assert await read_lines(reader, 1) == [b"six"]
        assert server.connections()[0].peer.startswith("[::1]:")
        writer.close()


async def test_length_prefixed_framing():
    app = Recorder(framing="length")
    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        payloads = [b"", b"x", b"\n\x00binary\xff", b"y" * 60000]
        wire = b"".join(struct.pack(">I", len(p)) + p for p in payloads)
        for i in range(0, len(wire), 4099):  # dribble it in odd pieces
            writer.write(wire[i : i + 4099])
        got = []
        for _ in payloads:
            (n,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), WAIT))
            got.append(await asyncio.wait_for(reader.readexactly(n), WAIT))
        assert got == payloads
        # over max_frame (64 KiB): a framing error the app hears about; the stream resumes
        writer.write(struct.pack(">I", 70000) + b"z" * 70000 + struct.pack(">I", 2) + b"ok")
        (n,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), WAIT))
        assert await reader.readexactly(n) == b"error too_large"
        (n,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), WAIT))
        assert await reader.readexactly(n) == b"ok"
        writer.close()


async def test_unix_socket(tmp_path):
    path = str(tmp_path / "echo.sock")
    async with serving(echo_app(), unix=path) as server:
        assert server.addresses["unix"] == [path]
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"over unix\n")
        assert await read_lines(reader, 1) == [b"over unix"]
        assert server.connections()[0].transport == "unix"
        writer.close()


async def test_stale_unix_socket_is_replaced(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # leaves the file behind, nobody listening
    async with serving(echo_app(), unix=path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"ok\n")
        assert await read_lines(reader, 1) == [b"ok"]
        writer.close()


async def test_counters_and_events():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"abc\ndef\n")
        await read_lines(reader, 2)
        conn = app.conns[0]
        assert (conn.frames_in, conn.frames_out, conn.bytes_in) == (2, 2, 8)
        assert conn.bytes_out == 8 and conn.transport == "tcp" and conn.peer_ip == "127.0.0.1"
        assert conn.send_buffer == 0 and conn.open
        writer.close()
        (event,) = await app.disconnected()
        assert event[2] == "closed"
        assert len(server.registry) == 0
    kinds = [e[0] for e in app.log]
    assert kinds == ["connect", "frame", "frame", "disconnect"]


async def test_oversized_line_is_an_error_and_connection_recovers():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", max_frame="1KiB") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"a" * 5000 + b"\nafter\n")
        assert await read_lines(reader, 2) == [b"error too_large", b"after"]
        writer.close()


async def test_peer_half_close_gets_every_reply():
    async with serving(echo_app(), tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"".join(b"%d\n" % i for i in range(1000)))
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), WAIT)  # until the server closes
        assert data.split(b"\n")[:-1] == [b"%d" % i for i in range(1000)]


async def test_handler_exception_closes_only_that_connection():
    app = App()

    @app.on_frame
    def frame(conn, data):
        if data == b"boom":
            raise RuntimeError("handler bug")
        conn.send(data)

    async with serving(app, tcp="127.0.0.1:0") as server:
        r1, w1 = await asyncio.open_connection(*addr(server))
        r2, w2 = await asyncio.open_connection(*addr(server))
        w1.write(b"boom\n")
        assert await asyncio.wait_for(r1.read(), WAIT) == b""
        w1.close()
        w2.write(b"still here\n")
        assert await read_lines(r2, 1) == [b"still here"]
        w2.close()


async def test_async_handlers_keep_order_and_pause_reading():
    app = App()
    seen = []

    @app.on_connect
    async def connect(conn):
        await asyncio.sleep(0)
        conn.send(b"hello")

    @app.on_frame
    async def frame(conn, data):
        await asyncio.sleep(0)
        seen.append(data)
        conn.send(data)

    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"".join(b"%d\n" % i for i in range(500)))
        lines = await read_lines(reader, 501)
        assert lines == [b"hello"] + [b"%d" % i for i in range(500)]
        assert seen == [b"%d" % i for i in range(500)]
        writer.close()


async def test_a_plain_frame_handler_among_async_ones_runs_inline_until_it_returns_an_awaitable():
    """With an async connect, a plain frame handler runs as the bytes arrive while nothing is
    queued before it (no task for it); what it returns is awaited by the connection's task
    before the frames after it, which stay in order behind it."""
    app = App()
    release = asyncio.Event()
    inline: list[bool] = []

    @app.on_connect
    async def connect(conn):
        await asyncio.sleep(0)
        conn.send(b"hello")

    async def later(conn, data):
        await release.wait()
        conn.send(b"late " + data)

    @app.on_frame
    def frame(conn, data):
        inline.append(asyncio.current_task() is None)
        if data.startswith(b"wait"):
            return later(conn, data)
        conn.send(data)
        return None

    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        assert await read_lines(reader, 1) == [b"hello"]
        writer.write(b"a\nb\n")
        assert await read_lines(reader, 2) == [b"a", b"b"]
        assert inline == [True, True]  # nothing was queued: run in the read, no task
        writer.write(b"wait1\nc\n")
        await wait_for(lambda: len(inline) == 3, what="wait1 to be handled")
        writer.write(b"d\n")
        await wait_for(lambda: len(server.connections()[0]._queue or ()) == 2, what="c and d to wait behind wait1")
        assert len(inline) == 3  # c and d wait for wait1's coroutine
        release.set()
        assert await read_lines(reader, 3) == [b"late wait1", b"c", b"d"]
        assert inline[3:] == [False, False]  # in the connection's task, after the awaited one
        writer.write(b"e\n")
        assert await read_lines(reader, 1) == [b"e"]
        await wait_for(lambda: len(inline) == 6, what="e to be handled")
        assert inline[5] is True  # the task is done: inline again
        writer.close()


async def test_drain_waits_for_the_peer():
    app = App()
    done = asyncio.Event()

    @app.on_frame
    async def frame(conn, data):
        for _ in range(200):
            conn.send(b"x" * 8000)
            await conn.drain()
        done.set()

    async with serving(app, tcp="127.0.0.1:0", max_send_buffer="256KiB") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"go\n")
        total = 0
        while total < 200 * 8001:
            chunk = await asyncio.wait_for(reader.read(65536), WAIT)
            assert chunk
            total += len(chunk)
        await asyncio.wait_for(done.wait(), WAIT)
        assert server.connections()[0].frames_dropped == 0
        writer.close()


async def test_reading_pauses_while_an_async_handler_is_behind():
    from wirehub.transport.connection import MAX_QUEUED_FRAMES

    app = App()
    release = asyncio.Event()
    handled = []

    @app.on_frame
    async def frame(conn, data):
        await release.wait()
        handled.append(data)

    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        lines = [b"%06d" % i for i in range(100_000)]
        writer.write(b"\n".join(lines) + b"\n")  # 700 KB the handler cannot keep up with
        await wait_for(lambda: server.connections() and server.connections()[0]._reading_paused, what="reading to pause")
        conn = server.connections()[0]
        queued = len(conn._queue)
        # Bounded: at most one read's worth of frames beyond the pause threshold.
        assert MAX_QUEUED_FRAMES <= queued < MAX_QUEUED_FRAMES + 256 * 1024 // 7
        assert conn.bytes_in < 700_000  # the rest waits in the kernel, not in our memory
        release.set()
        await wait_for(lambda: len(handled) == len(lines), what="every frame handled")
        assert handled == lines
        writer.close()


async def test_a_peer_that_finishes_gets_what_the_app_still_owes_it():
    """A plain frame handler that answers later (work it started and returned from): when the
    peer sends EOF, the close waits for the app's ``pending`` before closing, so the late
    reply is delivered, then EOF."""
    loop = asyncio.get_running_loop()

    class Later(App):
        def __init__(self):
            super().__init__()
            self.owed: dict[str, asyncio.Future] = {}
            self.conns = []

        def connect(self, conn):
            self.conns.append(conn)

        def frame(self, conn, data):
            conn.send(b"got " + data)
            done = self.owed[conn.id] = loop.create_future()
            done.add_done_callback(lambda _: conn.send(b"later " + data))

        def pending(self, conn):
            return self.owed.get(conn.id)

    app = Later()
    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"x\n")
        writer.write_eof()
        await wait_for(lambda: app.conns and app.conns[0]._eof, what="the server saw the FIN")
        app.owed[app.conns[0].id].set_result(None)
        data = await asyncio.wait_for(reader.read(), WAIT)  # until the server closes
        assert data == b"got x\nlater x\n"
        writer.close()
