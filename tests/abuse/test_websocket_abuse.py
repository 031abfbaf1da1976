"""WebSocket peers that break the rules, driven over real loopback sockets by a raw client
(no WebSocket library: it would refuse to send what these tests send).

Each protocol violation must end with a close frame naming it, and nothing may follow the
close frame on the wire; a peer that pings and never reads must end as a slow consumer with
the server's send buffer bounded by ``max_send_buffer``.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from wirehub._log import TextFormatter
from wirehub.bench.net import ws_parse

from ..helpers import WAIT, addr, serving, wait_for
from ..transport.test_websocket import UPGRADE, WsRecorder

MASK = b"\x37\xfa\x21\x3d"


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame; ``rsv`` is the reserved bits as they sit in the first byte
    (0x40 RSV1, 0x20 RSV2, 0x10 RSV3)."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0xFF)) + n.to_bytes(8, "big")
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Unmasked server frames, ``[(opcode, payload)]``, and what is left over."""
    buf = bytearray(data)
    return ws_parse(buf), bytes(buf)


async def ping_until_closed(writer: asyncio.StreamWriter, conn, budget: float | None = None) -> tuple[int, int]:
    """Write 125-byte pings (33 kB a write) and never read, until ``conn`` is closed (at most
    256 MB, and ``budget`` seconds when given); the bytes sent and the largest send buffer seen."""
    pings = client_frame(0x9, b"p" * 125) * 256
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget if budget is not None else None
    peak = sent = 0
    while conn.open and sent < 256 * 1024 * 1024 and (deadline is None or loop.time() < deadline):
        writer.write(pings)
        sent += len(pings)
        try:
            await asyncio.wait_for(writer.drain(), 0.05)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        peak = max(peak, conn.send_buffer)
    return sent, peak


async def upgraded(server):
    reader, writer = await asyncio.open_connection(*addr(server, "ws"))
    writer.write(UPGRADE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def until_eof(reader) -> bytes:
    """Everything the server sends until it closes the socket."""
    chunks = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


async def closing_frames(reader) -> list[tuple[int, bytes]]:
    """The server's frames up to the end of the connection; asserts that the last is a
    close frame and that not one byte follows it."""
    frames, rest = server_frames(await until_eof(reader))
    assert rest == b"", f"bytes after the last whole frame: {rest[:64]!r}"
    assert frames and frames[-1][0] == 0x8, frames
    return frames


def close_code(frame: tuple[int, bytes]) -> int:
    return int.from_bytes(frame[1][:2], "big")


VIOLATIONS = {
    "rsv1": (client_frame(0x1, b"hello", rsv=0x40), 1002),
    "rsv2": (client_frame(0x1, b"hello", rsv=0x20), 1002),
    "rsv3": (client_frame(0x2, b"hello", rsv=0x10), 1002),
    "rsv1 on a ping": (client_frame(0x9, b"hello", rsv=0x40), 1002),
    "text inside a fragmented message": (client_frame(0x1, b"part", fin=False) + client_frame(0x1, b"new"), 1002),
    "binary inside a fragmented message": (client_frame(0x1, b"part", fin=False) + client_frame(0x2, b"new", fin=False), 1002),
    "continuation without a message": (client_frame(0x0, b"orphan"), 1002),
    "unknown opcode": (client_frame(0x3, b"?"), 1002),
    "unmasked frame": (b"\x81\x02hi", 1002),
    "fragmented ping": (client_frame(0x9, b"p", fin=False), 1002),
    "invalid utf-8": (client_frame(0x1, b"\xff\xfe"), 1007),
    "close code 0": (client_frame(0x8, b"\x00\x00"), 1002),
    "close code 1006": (client_frame(0x8, (1006).to_bytes(2, "big")), 1002),
    "close code 1005": (client_frame(0x8, (1005).to_bytes(2, "big")), 1002),
    "close code 2999": (client_frame(0x8, (2999).to_bytes(2, "big")), 1002),
    "close with a 1-byte body": (client_frame(0x8, b"\x03"), 1002),
    "close reason not utf-8": (client_frame(0x8, (1000).to_bytes(2, "big") + b"\xff"), 1007),
    "ping over 125 bytes": (client_frame(0x9, b"p" * 126), 1002),
    "frame beyond the hard limit": (client_frame(0x2, b"x" * (4 * 1024 + 1)), 1009),
}


@pytest.mark.parametrize("violation", list(VIOLATIONS))
async def test_protocol_violation_closes_with_its_code_and_nothing_follows(violation):
    data, code = VIOLATIONS[violation]
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", max_frame="1KiB") as server:
        reader, writer = await upgraded(server)
        writer.write(client_frame(0x1, b"before") + data)
        frames = await closing_frames(reader)
        assert frames[0] == (0x1, b"before")  # what came before the violation is answered
        assert frames[-2] == (0x1, b"bye protocol")  # the app's last word, then the close
        assert close_code(frames[-1]) == code, frames[-1]
        assert b"before" not in [p for _, p in frames[1:]]
        writer.close()
        (event,) = await app.disconnected()
        assert event[2] == "protocol"
        # the frames of the violation never reach the app
        assert [e[2] for e in app.log if e[0] == "frame"] == [b"before"]


async def test_too_large_error_comes_before_the_1009_close():
    """A message over max_frame (refused, the connection stays) and, in the same read, a
    frame beyond the hard limit (the connection closes with 1009): the error for the first is
    sent before the close."""
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", max_frame="1KiB") as server:
        reader, writer = await upgraded(server)
        writer.write(client_frame(0x1, b"y" * 1025) + client_frame(0x2, b"z" * (4 * 1024 + 1)))
        frames = await closing_frames(reader)
        assert frames[:-1] == [(0x1, b"error too_large"), (0x1, b"bye protocol")]
        assert close_code(frames[-1]) == 1009
        writer.close()
        (event,) = await app.disconnected()
        assert event[2] == "protocol"


async def test_peer_close_is_answered_with_a_close_and_nothing_after():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await upgraded(server)
        writer.write(client_frame(0x1, b"x") + client_frame(0x8, (1000).to_bytes(2, "big") + b"done") + client_frame(0x1, b"late"))
        frames = await closing_frames(reader)
        assert frames[0] == (0x1, b"x") and len(frames) == 2
        assert close_code(frames[1]) == 1000
        writer.close()
        (event,) = await app.disconnected()
        assert event[2] == "closed"
        assert [e[2] for e in app.log if e[0] == "frame"] == [b"x"]


async def test_close_without_a_code_is_answered_with_an_empty_close():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await upgraded(server)
        writer.write(client_frame(0x8))
        assert await closing_frames(reader) == [(0x8, b"")]  # 1005 is never sent
        writer.close()
        await app.disconnected()


async def test_ping_is_answered_through_the_send_buffer_in_order():
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0") as server:
        reader, writer = await upgraded(server)
        writer.write(client_frame(0x1, b"a") + client_frame(0x9, b"p1") + client_frame(0x1, b"b") + client_frame(0x9))
        got = b""
        while len(server_frames(got)[0]) < 4:
            got += await asyncio.wait_for(reader.read(65536), WAIT)
        assert server_frames(got) == ([(0x1, b"a"), (0xA, b"p1"), (0x1, b"b"), (0xA, b"")], b"")
        (conn,) = server.connections()
        assert conn.frames_out == 2  # pongs are not the app's frames
        writer.close()
        await app.disconnected()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_ping_flood_without_reading_ends_as_slow_consumer_with_bounded_memory():
    """A peer that sends pings and never reads: the pongs wait in the connection's send
    buffer like any frame, so the connection ends as a slow consumer, and the server's send
    buffer for it never passes max_send_buffer by more than one frame. (Once, picows wrote the
    pongs to the socket's transport itself: +616 MB in 2.6 s against a 1 MiB limit.)"""
    limit = 256 * 1024
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", max_send_buffer=limit, close_timeout=0.3) as server:
        honest_reader, honest_writer = await upgraded(server)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for us
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr(server, "ws"))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(UPGRADE)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)).startswith(b"HTTP/1.1 101 ")
        await wait_for(lambda: len(server.connections()) == 2, what="both upgraded")
        flooder = [c for c in server.connections() if c is not app.conns[0]][0]
        rss_before = _rss()
        sent, peak = await ping_until_closed(writer, flooder, WAIT)
        assert not flooder.open, f"still open after {sent} bytes of pings; send_buffer={flooder.send_buffer}"
        assert flooder.close_reason == "slow_consumer"
        assert peak <= limit + 127, peak  # one pong is 127 bytes
        assert _rss() - rss_before < 64 * 1024 * 1024
        writer.transport.abort()
        await app.disconnected(1)
        # the other connection was not harmed
        honest_writer.write(client_frame(0x1, b"still here"))
        frames, _ = server_frames(await asyncio.wait_for(honest_reader.read(65536), WAIT))
        assert frames == [(0x1, b"still here")]
        honest_writer.close()


async def test_ping_flood_under_drop_oldest_stays_bounded():
    limit = 128 * 1024
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", max_send_buffer=limit, slow_consumer="drop_oldest", close_timeout=0.3) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr(server, "ws"))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(UPGRADE)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        await wait_for(lambda: len(server.connections()) == 1, what="upgraded")
        (conn,) = server.connections()
        pings = client_frame(0x9, b"p" * 125) * 256
        peak = sent = 0
        full = 0
        while sent < 32 * 1024 * 1024 and full < 20:  # until the buffer has been full a while
            writer.write(pings)
            sent += len(pings)
            try:
                await asyncio.wait_for(writer.drain(), 0.05)
            except asyncio.TimeoutError:
                pass
            peak = max(peak, conn.send_buffer)
            full += conn.send_buffer > limit - 127
        assert full, f"the send buffer never filled after {sent} bytes"
        assert conn.open and peak <= limit + 127, peak
        writer.transport.abort()
        await app.disconnected(1)


async def test_protocol_error_is_logged_with_its_code_and_reason(caplog):
    app = WsRecorder()
    caplog.set_level(logging.INFO, logger="wirehub.websocket")
    async with serving(app, ws="127.0.0.1:0", max_frame="1KiB") as server:
        reader, writer = await upgraded(server)
        writer.write(client_frame(0x2, b"z" * (4 * 1024 + 1)))  # refused from its header
        await closing_frames(reader)
        writer.close()
        await app.disconnected()
    (record,) = [r for r in caplog.records if r.getMessage() == "websocket_protocol_error"]
    line = TextFormatter().format(record)
    assert record.fields["code"] == 1009 and "4097" in record.fields["error"], line
    assert "object>" not in line and "code=1009" in line


async def test_a_flood_of_small_frames_does_not_grow_the_read_buffer():
    """Reads full of small frames, handled as fast as they come (picows, used before, doubled
    its read buffer whenever a read filled most of it and never shrank it: 14 MiB after 14
    reads). The decoder holds at most one unfinished frame between reads: memory stays flat
    whatever the reads' size."""
    import tracemalloc

    from wirehub import Server
    from wirehub.transport.websocket import websocket_factory

    from ..fuzz.test_fuzz_websocket import Echo, RecordingTransport
    from ..helpers import make_config

    server = Server(Echo(), make_config(max_frame="1KiB"))
    await server.start()
    conn = websocket_factory(server.ctx, "ws")()
    transport = RecordingTransport()
    conn.connection_made(transport)
    conn.data_received(UPGRADE)
    tracemalloc.start()
    try:
        frame = client_frame(0x2, b"x" * 10)  # 16 bytes
        read = frame * 4096 + frame[:7]  # 64 KiB of whole frames and the start of one more
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(14):
            conn.data_received(read[7:] if _ else read)  # each read ends inside a frame
            assert conn._decoder.buffered == 7
            transport.data.clear()
            await asyncio.sleep(0)
        grown = tracemalloc.get_traced_memory()[0] - start
        assert conn.frames_in == 14 * 4096 and conn.open
        assert grown < 64 * 1024, grown
    finally:
        tracemalloc.stop()
        conn.connection_lost(None)
        transport._sock.close()
        await server.shutdown()


async def test_hub_on_its_defaults_ends_a_ping_flood_with_bye_slow_consumer():
    """The finding as it was made: ``wirehub serve``'s hub on its defaults (max_send_buffer
    1 MiB), a WebSocket client that pings and never reads. It now ends as a slow consumer:
    bye slow_consumer, then the close frame, nothing after, and the send buffer stayed within
    the limit plus one pong."""
    from ..hub.hubclient import hub_server

    async with hub_server("ws") as h:
        limit = h.server.config.max_send_buffer
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr(h.server, "ws"))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024 * 1024)
        writer.write(UPGRADE)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        await wait_for(lambda: len(h.server.connections()) == 1, what="upgraded")
        (conn,) = h.server.connections()
        _, peak = await ping_until_closed(writer, conn)
        assert conn.close_reason == "slow_consumer" and peak <= limit + 127, (conn.close_reason, peak)
        # now read all that was written: pongs, then the bye, then the close frame, nothing after
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)  # a fast reader now
        frames = await closing_frames(reader)
        assert {op for op, _ in frames[:-2]} == {0xA}
        assert frames[-2] == (0x1, b'{"op":"bye","reason":"slow_consumer","reconnect":true}')
        assert close_code(frames[-1]) == 1000 and frames[-1][1][2:] == b"slow_consumer"
        writer.close()


@pytest.mark.parametrize("cause", ["violation", "kick"])
async def test_close_frame_reaches_a_peer_that_is_still_sending(cause):
    """The server closes while the peer is still sending: closing a socket with unread input
    makes the kernel send RST, and a peer that gets RST may drop what it has not read yet
    (the bye and the close frame). So after the close frame the server half-closes and
    reads and discards until the peer closes, as on TCP."""
    app = WsRecorder()
    async with serving(app, ws="127.0.0.1:0", max_frame="64KiB") as server:
        reader, writer = await upgraded(server)
        filler = client_frame(0x2, b"f" * 60000) * 40  # 2.4 MB the server will not handle
        if cause == "violation":
            writer.write(client_frame(0x1, b"x", rsv=0x40) + filler)
        else:
            writer.write(client_frame(0x1, b"x"))
            await app.wait(lambda log: ("frame", app.conns[0].id, b"x") in log)
            server.disconnect(app.conns[0].id)
            writer.write(filler)
        frames = await closing_frames(reader)
        reason = "protocol" if cause == "violation" else "kicked"
        assert frames[-2] == (0x1, b"bye " + reason.encode())
        assert close_code(frames[-1]) == (1002 if cause == "violation" else 1000)
        writer.close()
        (event,) = await app.disconnected()
        assert event[2] == reason
