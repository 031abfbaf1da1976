"""Limits hold: connections at accept, per IP, allow/deny, deadlines, slow consumers."""

from __future__ import annotations

import asyncio

import pytest

from wirehub import App

from ..helpers import WAIT, addr, read_lines, serving
from ..transport.test_stream import Recorder


async def _round_trip(reader, writer, line=b"ping"):
    writer.write(line + b"\n")
    assert await read_lines(reader, 1) == [line]


async def test_max_connections_stops_accepting_until_a_slot_frees():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", max_connections=3) as server:
        clients = [await asyncio.open_connection(*addr(server)) for _ in range(3)]
        for r, w in clients:
            await _round_trip(r, w)
        assert server.gate.full and len(server.registry) == 3
        # The 4th connects at the TCP level (the kernel backlog holds it) but is not served.
        r4, w4 = await asyncio.open_connection(*addr(server))
        w4.write(b"waiting\n")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r4.readline(), 0.3)
        assert len(server.registry) == 3
        # A slot frees: the listener resumes and the 4th is served, its line intact.
        clients[0][1].close()
        assert await read_lines(r4, 1) == [b"waiting"]
        assert len(server.registry) == 3
        for _, w in clients[1:] + [(r4, w4)]:
            w.close()
        await app.disconnected(4)
        assert server.gate.count == 0


async def test_max_connections_per_ip_refuses_with_a_reason():
    from wirehub.apps.echo import app

    async with serving(app, tcp="127.0.0.1:0", max_connections_per_ip=2) as server:
        a = [await asyncio.open_connection(*addr(server)) for _ in range(2)]
        for r, w in a:
            await _round_trip(r, w)
        r3, w3 = await asyncio.open_connection(*addr(server))
        refusal = await asyncio.wait_for(r3.read(), WAIT)
        assert b"max_connections_per_ip" in refusal
        # another client address is not affected
        r4, w4 = await asyncio.open_connection(*addr(server), local_addr=("127.0.0.2", 0))
        await _round_trip(r4, w4)
        assert server.gate.per_ip("127.0.0.1") == 2 and server.gate.per_ip("127.0.0.2") == 1
        for _, w in a + [(r4, w4)]:
            w.close()


async def test_deny_and_allow_lists():
    from wirehub.apps.echo import app

    async with serving(app, tcp="127.0.0.1:0", deny="127.0.0.2/32", allow="127.0.0.0/30") as server:
        r, w = await asyncio.open_connection(*addr(server))
        await _round_trip(r, w)
        for source in ("127.0.0.2", "127.0.0.9"):  # denied; outside the allow list
            with pytest.raises(ConnectionResetError):  # at connect or at the first read
                r2, w2 = await asyncio.open_connection(*addr(server), local_addr=(source, 0))
                await asyncio.wait_for(r2.read(), WAIT)
        assert len(server.registry) == 1
        w.close()


async def test_silent_client_is_dropped_at_the_handshake_deadline():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", handshake_timeout=0.3) as server:
        loop = asyncio.get_running_loop()
        greeted = await asyncio.open_connection(*addr(server))
        await _round_trip(*greeted)
        started = loop.time()
        silent = await asyncio.open_connection(*addr(server))
        partial = await asyncio.open_connection(*addr(server))
        partial[1].write(b"no newline yet")
        assert await asyncio.wait_for(silent[0].read(), WAIT) == b"bye handshake_timeout\n"
        assert await asyncio.wait_for(partial[0].read(), WAIT) == b"bye handshake_timeout\n"
        silent[1].close()  # as a client does on EOF; the server lingers until then
        partial[1].close()
        assert loop.time() - started >= 0.29
        # The client that completed a frame in time is still served.
        await _round_trip(*greeted)
        reasons = [e[2] for e in await app.disconnected(2)]
        assert reasons == ["handshake_timeout", "handshake_timeout"]
        greeted[1].close()


async def test_idle_timeout_and_activity():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", idle_timeout=0.4) as server:
        active = await asyncio.open_connection(*addr(server))
        idle = await asyncio.open_connection(*addr(server))
        await _round_trip(*active)
        await _round_trip(*idle)
        # Keep one busy until the other has been dropped as idle.
        idle_closed = asyncio.ensure_future(idle[0].read())
        while not idle_closed.done():
            await _round_trip(*active)
            await asyncio.wait([idle_closed], timeout=0.05)
        assert idle_closed.result() == b"bye idle\n"
        idle[1].close()
        await _round_trip(*active)
        (event,) = await app.disconnected(1)
        assert event[2] == "idle"
        active[1].close()


async def test_idle_timeout_can_be_changed_per_connection():
    app = Recorder()

    @app.on_frame
    def frame(conn, data):
        conn.idle_timeout = float(data)
        conn.send(b"set")

    async with serving(app, tcp="127.0.0.1:0", idle_timeout=60) as server:
        r, w = await asyncio.open_connection(*addr(server))
        w.write(b"0.2\n")
        assert await read_lines(r, 1) == [b"set"]
        assert await asyncio.wait_for(r.read(), WAIT) == b"bye idle\n"
        w.close()


async def test_client_that_never_reads_is_disconnected_with_bounded_memory():
    """Flood a connection that does not read: the server's buffer for it never passes the
    configured bound, it is disconnected as a slow consumer, and others are unaffected."""
    limit = 256 * 1024
    peak = 0
    app = Recorder()

    @app.on_frame
    def frame(conn, data):
        nonlocal peak
        for _ in range(16):  # amplify: 16 replies per request
            conn.send(data)
        peak = max(peak, conn.send_buffer)

    # close_timeout: the flooder never reads, so the server's lingering close is cut short
    async with serving(app, tcp="127.0.0.1:0", max_send_buffer=limit, send_buffer_high="64KiB", max_frame="8KiB", close_timeout=0.3) as server:
        other = await asyncio.open_connection(*addr(server))
        reader, writer = await asyncio.open_connection(*addr(server))
        line = b"x" * 4000 + b"\n"
        sent = 0
        closed = asyncio.ensure_future(app.disconnected(1))
        while not closed.done() and sent < 50_000:
            writer.write(line * 16)
            sent += 16
            try:
                await asyncio.wait_for(writer.drain(), 0.05)
            except (asyncio.TimeoutError, ConnectionError):
                pass
            await asyncio.sleep(0)
        (event,) = await asyncio.wait_for(closed, WAIT)
        assert event[2] == "slow_consumer"
        # The bound of docs/backpressure.md: a burst handed to the transport while the peer
        # still kept up (at most the limit plus one amplified reply), the high water mark,
        # and at most the limit (plus that reply) waiting in our own buffer.
        burst = 16 * 4001
        assert peak <= 2 * (limit + burst) + 64 * 1024
        conn_other = [c for c in server.connections()]
        assert len(conn_other) == 1
        other[1].write(b"fine\n")
        assert await read_lines(other[0], 1) == [b"fine"]
        writer.close()
        other[1].close()


async def test_drop_oldest_policy_keeps_the_connection_and_the_newest_frames():
    app = App()
    flood = asyncio.Event()

    @app.on_frame
    def frame(conn, data):
        if data == b"flood":
            conn.pause_writing()  # as if the peer stopped reading: frames pile up in our buffer
            for i in range(1000):
                conn.send(b"%04d" % i + b"." * 1000)
            flood.set()
            conn.resume_writing()

    async with serving(app, tcp="127.0.0.1:0", max_send_buffer="100KiB", send_buffer_low="8KiB", send_buffer_high="16KiB", slow_consumer="drop_oldest") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"flood\n")
        await asyncio.wait_for(flood.wait(), WAIT)
        conn = server.connections()[0]
        assert conn.open and conn.frames_dropped > 0
        kept = 1000 - conn.frames_dropped
        lines = await read_lines(reader, kept)
        assert [int(x[:4]) for x in lines] == list(range(conn.frames_dropped, 1000))
        writer.close()


async def test_timeouts_keep_working_while_a_handler_is_slow():
    """SPEC: heartbeats and timeouts keep working while a user handler is slow."""
    app = Recorder()
    busy = asyncio.Event()
    release = asyncio.Event()

    @app.on_frame
    async def frame(conn, data):
        if data == b"slow":
            busy.set()
            await release.wait()  # a handler stuck on some slow call
        conn.send(data)

    async with serving(app, tcp="127.0.0.1:0", idle_timeout=0.3, handshake_timeout=0.3) as server:
        slow = await asyncio.open_connection(*addr(server))
        slow[1].write(b"slow\n")
        await asyncio.wait_for(busy.wait(), WAIT)
        silent = await asyncio.open_connection(*addr(server))  # never sends: handshake deadline
        idle = await asyncio.open_connection(*addr(server))
        await _round_trip(*idle)  # then goes quiet: idle timeout
        assert await asyncio.wait_for(silent[0].read(), WAIT) == b"bye handshake_timeout\n"
        assert await asyncio.wait_for(idle[0].read(), WAIT) == b"bye idle\n"
        assert not release.is_set() and busy.is_set()  # all while the slow handler was still waiting
        release.set()
        for _, w in (slow, silent, idle):
            w.close()
