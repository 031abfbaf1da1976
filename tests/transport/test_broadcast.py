"""``wirehub.broadcast``: one frame to many connections, over real loopback sockets."""

from __future__ import annotations

import asyncio

from wirehub import App, broadcast

from ..helpers import WAIT, addr, read_lines, serving, wait_for
from .test_websocket import recv, ws_connect


class Room(App):
    """Every connection is a member; frames from members are ignored."""

    def __init__(self) -> None:
        super().__init__(framing="line")
        self.members: list = []

    def connect(self, conn) -> None:
        self.members.append(conn)

    def frame(self, conn, frame: bytes) -> None:
        pass

    def disconnect(self, conn, reason: str) -> None:
        self.members.remove(conn)


async def open_tcp(server, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection(*addr(server)) for _ in range(n)]


async def test_one_encoding_per_framing_and_every_member_gets_the_frame():
    app = Room()
    async with serving(app, tcp="127.0.0.1:0", ws="127.0.0.1:0") as server:
        tcp = await open_tcp(server, 3)
        async with ws_connect(server) as ws1, ws_connect(server) as ws2:
            await wait_for(lambda: len(app.members) == 5, what="five members")
            tcp_members = [c for c in app.members if c.transport == "tcp"]
            # connections of one framing hold the same encoder object
            assert all(c.encode is tcp_members[0].encode for c in tcp_members)
            encoded: list[bytes] = []
            original = tcp_members[0].encode

            def counting(payload):
                encoded.append(payload)
                return original(payload)

            for conn in tcp_members:
                conn.encode = counting
            assert broadcast(app.members, b'{"n":1}') == 5
            assert broadcast(app.members, b'{"n":2}') == 5
            for reader, _ in tcp:
                assert await read_lines(reader, 2) == [b'{"n":1}', b'{"n":2}']
            for ws in (ws1, ws2):
                assert [await recv(ws), await recv(ws)] == ['{"n":1}', '{"n":2}']
            assert encoded == [b'{"n":1}', b'{"n":2}']  # once per message for the 3 TCP members
            for conn in app.members:
                assert conn.frames_out == 2
        for _, writer in tcp:
            writer.close()


async def test_closing_connections_are_skipped():
    app = Room()
    async with serving(app, tcp="127.0.0.1:0", drain_timeout=WAIT) as server:
        (r1, w1), (r2, w2) = await open_tcp(server, 2)
        await wait_for(lambda: len(app.members) == 2, what="two members")
        leaving, staying = app.members
        leaving.close()
        assert broadcast([leaving, staying], b"news") == 1
        assert await read_lines(r2, 1) == [b"news"]
        assert await asyncio.wait_for(r1.read(), WAIT) == b""  # closed, and no "news"
        for w in (w1, w2):
            w.close()


async def test_the_send_buffer_limit_applies_to_each_member():
    app = Room()
    async with serving(app, tcp="127.0.0.1:0", max_send_buffer="64KiB", send_buffer_high="16KiB",
                       send_buffer_low="4KiB") as server:
        (r_fast, w_fast), (r_slow, w_slow) = await open_tcp(server, 2)
        await wait_for(lambda: len(app.members) == 2, what="two members")
        fast, slow = app.members
        line = b"x" * 1023
        got = 0
        sent = 0
        # The slow member never reads: the kernel buffers fill, then its send buffer, and it
        # is disconnected as a slow consumer. The fast member reads everything.
        while slow.open and sent < 100_000:
            broadcast([fast, slow], line)
            sent += 1
            data = await asyncio.wait_for(r_fast.read(1 << 20), WAIT)
            got += data.count(b"\n")
        assert not slow.open, "the member that never reads was not disconnected"
        assert fast.open
        while got < sent:
            data = await asyncio.wait_for(r_fast.read(1 << 20), WAIT)
            assert data, "the fast member lost its connection"
            got += data.count(b"\n")
        assert got == sent
        for w in (w_fast, w_slow):
            w.close()
