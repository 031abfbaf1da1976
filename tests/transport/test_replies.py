"""``App.replies``: frames the server answers itself, in order with the app's own replies."""

from __future__ import annotations

import asyncio

import pytest

from wirehub import App

from ..helpers import addr, read_lines, serving
from .test_websocket import recv, ws_connect


class Echo(App):
    """Echoes frames upper-cased (so that a reply from the app is told apart), counts calls."""

    def __init__(self, *, pumped: bool = False) -> None:
        super().__init__(framing="line")
        self.calls: list[bytes] = []
        self.replies[b"PING"] = b"PONG"
        if pumped:
            self.frame = self.frame_async  # type: ignore[method-assign]

    def frame(self, conn, frame: bytes) -> None:
        self.calls.append(frame)
        conn.send(frame.upper())

    async def frame_async(self, conn, frame: bytes) -> None:
        await asyncio.sleep(0)
        self.calls.append(frame)
        conn.send(frame.upper())


@pytest.mark.parametrize("pumped", [False, True], ids=["plain", "async"])
async def test_answered_in_order_without_calling_the_handler(pumped):
    app = Echo(pumped=pumped)
    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"a\nPING\nb\nPING\nPING!\n")
        assert await read_lines(reader, 5) == [b"A", b"PONG", b"B", b"PONG", b"PING!"]
        assert app.calls == [b"a", b"b", b"PING!"]  # only frames that are not exactly a key
        (conn,) = server.connections()
        assert conn.frames_in == 5 and conn.frames_out == 5
        writer.close()


async def test_over_websocket_in_the_connections_framing():
    app = Echo()
    async with serving(app, ws="127.0.0.1:0") as server:
        async with ws_connect(server) as ws:
            for message in ("x", "PING", "y"):
                await ws.send(message)
            assert [await recv(ws) for _ in range(3)] == ["X", "PONG", "Y"]
        assert app.calls == [b"x", b"y"]
