"""WebSocket connections that arrive through an ASGI server (uvicorn, hypercorn...), so that
a web app (Starlette, FastAPI) and a wirehub app share one port and one process.

``server.asgi`` is an ASGI application; mount it at a path of the web app. Each WebSocket
becomes a :class:`Connection` of the same server, with the same handlers, limits and
registry as its own listeners' connections. The ASGI server owns the socket, so writes go
through ``send`` from one writer task per connection, and the outbound buffer is ours:
above the high water mark the connection reports itself not writable, past
``max_send_buffer`` the slow-consumer policy applies, as on every other transport.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .._log import get_logger
from .connection import SHUTDOWN, Connection, Context

if TYPE_CHECKING:
    from ..server.server import Server

log = get_logger("wirehub.asgi")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013


def _identity(payload: bytes) -> bytes:
    return payload


class AsgiConnection(Connection):
    __slots__ = ("_send", "_outbox", "_outbox_size", "_writer", "_close_code", "binary")

    def __init__(self, ctx: Context, scope: Scope, send: Send) -> None:
        super().__init__(ctx, "wss" if scope.get("scheme") == "wss" else "ws", _identity)
        client = scope.get("client")
        if client:
            host, port = client[0], client[1]
            self.peer_ip = host
            self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            self.peer = self.peer_ip = "asgi"
        self._send = send
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_size = 0
        self._writer: asyncio.Task | None = None
        self._close_code: int | None = None
        self.binary = False

    def _write(self, frames: list[bytes]) -> None:
        for data in frames:
            self._outbox.append(data)
            self._outbox_size += len(data)
        if self._outbox_size > self._ctx.settings.send_buffer_high and not self._write_paused:
            self.pause_writing()
        self._kick_writer()

    def _kick_writer(self) -> None:
        if self._writer is None:
            self._writer = self._ctx.loop.create_task(self._write_out())

    async def _write_out(self) -> None:
        outbox = self._outbox
        low = self._ctx.settings.send_buffer_low
        try:
            while outbox:
                data = outbox.popleft()
                self._outbox_size -= len(data)
                message = {"type": "websocket.send", "bytes": data} if self.binary else {"type": "websocket.send", "text": data.decode()}
                await self._send(message)
                self.bytes_out += len(data)
                if self._write_paused and self._outbox_size <= low:
                    self.resume_writing()
            if self._close_code is not None:
                await self._send({"type": "websocket.close", "code": self._close_code, "reason": self._close_reason or ""})
        except Exception as exc:  # the ASGI server lost the socket
            log.debug("asgi_send_failed", conn=self.id, error=str(exc))
            outbox.clear()
            self._outbox_size = 0
        finally:
            self._writer = None

    def _transport_buffered(self) -> int:
        return self._outbox_size

    def _close_transport(self) -> None:
        if self._close_code is None:
            self._close_code = CLOSE_GOING_AWAY if self._close_reason == SHUTDOWN else CLOSE_NORMAL
            self._kick_writer()

    def _abort_transport(self) -> None:
        self._outbox.clear()
        self._outbox_size = 0
        if self._writer is not None:
            self._writer.cancel()
        self._close_code = self._close_code or CLOSE_NORMAL
        self._ctx.loop.create_task(self._send_close_quietly())

    async def _send_close_quietly(self) -> None:
        try:
            await self._send({"type": "websocket.close", "code": self._close_code or CLOSE_NORMAL})
        except Exception:
            pass


class AsgiEndpoint:
    """The ASGI application of one :class:`~wirehub.server.server.Server`."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served as the whole app: the server runs on its own
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "websocket":
            await send({"type": "http.response.start", "status": 426, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"this endpoint speaks WebSocket only\n"})
            return
        if (await receive())["type"] != "websocket.connect":
            return
        server = self.server
        ctx = server.ctx
        if ctx is None or not server.started or server.draining:
            await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
            return
        client = scope.get("client")
        ip = client[0] if client else "asgi"
        if not server._ip_allowed(ip) or server.gate.admit(ip) is not None:
            server.refused["asgi"] = server.refused.get("asgi", 0) + 1
            await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
            return
        conn = AsgiConnection(ctx, scope, send)
        try:
            await send({"type": "websocket.accept"})
        except Exception:
            server.gate.release(ip)
            return
        conn._start()
        max_frame = ctx.settings.max_frame
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    break
                if kind != "websocket.receive":
                    continue
                text = message.get("text")
                payload = text.encode() if text is not None else (message.get("bytes") or b"")
                conn.bytes_in += len(payload)
                if conn.close_reason is not None:
                    continue
                conn.last_activity = ctx.now()
                if len(payload) > max_frame:
                    conn._close_code = CLOSE_TOO_BIG
                    conn.close("protocol")
                    continue
                conn._dispatch_one(payload)
        finally:
            if conn._writer is not None and conn.close_reason is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(conn._writer), ctx.settings.close_timeout)
                except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    pass
            conn._lost(None)
