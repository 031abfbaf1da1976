"""WebSocket connections on an :class:`asyncio.Protocol`, using the sans-I/O core of the
``websockets`` library (handshake, framing, ping/pong, close handshake, size limits).

Each WebSocket message (text or binary, possibly fragmented) is one frame for the app; any
request path is accepted. Frames the app sends go out as text messages, or binary ones when
``conn.binary`` is set.
"""

from __future__ import annotations

import asyncio

from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import OPEN, State
from websockets.server import ServerProtocol

from .._log import get_logger
from ..protocol.framing import FrameError
from .connection import PROTOCOL, SHUTDOWN, Context
from .stream import SocketConnection

log = get_logger("wirehub.websocket")

#: messages over max_frame but within this multiple of it are refused without closing
WS_HARD_LIMIT = 4

_TEXT = Opcode.TEXT
_BINARY = Opcode.BINARY
_CONT = Opcode.CONT


def _identity(payload: bytes) -> bytes:
    return payload


class WebSocketConnection(SocketConnection):
    __slots__ = ("_ws", "_upgraded", "_fragments", "_text", "_max_frame", "binary")

    def __init__(self, ctx: Context, transport_name: str, max_frame: int) -> None:
        super().__init__(ctx, transport_name, _identity)
        # Messages up to max_frame reach the app; those up to WS_HARD_LIMIT x max_frame are
        # read and refused with a too_large framing error (the connection stays open, as on
        # the other transports); beyond that websockets closes with 1009.
        self._ws = ServerProtocol(max_size=max_frame * WS_HARD_LIMIT)
        self._max_frame = max_frame
        self._transport: asyncio.Transport | None = None
        self._upgraded = False
        self._fragments: list[bytes] | None = None
        self._text = True
        self.binary = False

    # asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._bind(transport)
        settings = self._ctx.settings
        # The HTTP upgrade must finish within the handshake deadline; the app has not
        # seen this connection yet, so an expired upgrade is simply dropped.
        if settings.handshake_timeout:
            self._timer = self._ctx.loop.call_later(settings.handshake_timeout, self._upgrade_expired)
        self._ctx.registry.handshaking.add(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_activity = self._ctx.now()
        ws = self._ws
        ws.receive_data(data)
        events = ws.events_received()
        if not self._upgraded:
            for event in events:
                if isinstance(event, Request):
                    self._upgrade(event)
                    break
            self._send_pending_ws_data()
            return
        items: list = []
        failed = False
        for frame in events:
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY:
                if frame.fin:
                    message = frame.data
                else:
                    self._fragments = [frame.data]
                    self._text = opcode is _TEXT
                    continue
            elif opcode is _CONT and self._fragments is not None:
                self._fragments.append(frame.data)
                if not frame.fin:
                    continue
                message = b"".join(self._fragments)
                self._fragments = None
                opcode = _TEXT if self._text else _BINARY
            else:
                continue
            if len(message) > self._max_frame:
                items.append(FrameError("too_large", f"message of {len(message)} bytes exceeds max_frame {self._max_frame}"))
                continue
            if opcode is _TEXT:
                # RFC 6455 8.1: a text message that is not UTF-8 fails the connection (1007).
                try:
                    message.decode()
                except UnicodeDecodeError:
                    ws.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                    failed = True
                    break
            items.append(message)
        if not failed and ws.parser_exc is None:
            self._send_pending_ws_data()  # pongs, the answer to a peer's close
            if items:
                self._dispatch(items)
            if self._close_reason is None and ws.close_expected():  # the peer said goodbye
                self._close_reason = "closed"
                self._cancel_timer()
                self._schedule_abort()
            return
        # We fail the connection (too large, bad UTF-8, bad opcode): websockets has queued
        # its close frame. Messages before the bad one are still handled, and their replies
        # and the app's last frame (the hub's bye) go out before the close frame.
        if items:
            self._dispatch(items)
        prefix = b""
        if self._close_reason is None:
            log.info("websocket_protocol_error", conn=self.id, error=str(ws.parser_exc or "invalid UTF-8 in a text message"))
            prefix = self._last_words(PROTOCOL)
        self._send_pending_ws_data(prefix)
        self._cancel_timer()
        self._schedule_abort()

    def _last_words(self, reason: str) -> bytes:
        """Run the app's closing handler and serialize every frame still queued, by hand:
        websockets no longer sends on a connection it has failed."""
        self._close_reason = reason
        self._last_word = True
        try:
            self._ctx.handlers.closing(self, reason)
        except Exception:
            log.exception("handler_failed", handler="closing", conn=self.id)
        finally:
            self._last_word = False
        opcode = _BINARY if self.binary else _TEXT
        out = b"".join(Frame(opcode, data).serialize(mask=False) for data in self._pending)
        self._pending.clear()
        self._pending_size = 0
        return out

    def eof_received(self) -> bool | None:
        self._ws.receive_eof()
        self._send_pending_ws_data()
        if self._upgraded:
            return self._peer_finished()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._upgraded:
            self._lost(exc)
        else:
            self._cancel_timer()
            self._closed = True
            self._ctx.registry.handshake_ended(self, registered=False)
        self._transport = None

    # handshake --------------------------------------------------------------------

    def _upgrade(self, request: Request) -> None:
        ws = self._ws
        if self._ctx.registry.closing:  # the server is draining: no new sessions
            response = ws.reject(503, "server is shutting down\n")
        else:
            response = ws.accept(request)
        ws.send_response(response)
        if ws.state is OPEN:
            self._upgraded = True
            self._cancel_timer()
            self._ctx.registry.handshake_ended(self, registered=True)
            self._start()
        else:
            self._cancel_timer()
            self._close_reason = PROTOCOL

    def _upgrade_expired(self) -> None:
        self._timer = None
        if not self._upgraded and self._transport is not None:
            log.info("handshake_timeout", transport=self.transport, peer=self.peer)
            self._transport.abort()

    def _send_pending_ws_data(self, prefix: bytes = b"") -> None:
        transport = self._transport
        if transport is None:
            return
        out = self._ws.data_to_send()
        if not out and not prefix:
            return
        eof = bool(out) and out[-1] == b""
        data = prefix + b"".join(out)
        if data:
            self.bytes_out += len(data)
            transport.write(data)
        if eof or (not self._upgraded and self._close_reason is not None):
            transport.close()

    def _schedule_abort(self) -> None:
        if self._transport is not None and not self._closed:
            self._timer = self._ctx.loop.call_later(self._ctx.settings.close_timeout, self.abort)

    # Connection transport hooks ---------------------------------------------------------

    def _write(self, frames: list[bytes]) -> None:
        ws = self._ws
        if ws.state is not OPEN:
            return
        send = ws.send_binary if self.binary else ws.send_text
        for payload in frames:
            send(payload)
        self._send_pending_ws_data()

    def _close_transport(self) -> None:
        ws = self._ws
        if ws.state is OPEN:
            code = CloseCode.GOING_AWAY if self._close_reason == SHUTDOWN else CloseCode.NORMAL_CLOSURE
            ws.send_close(code, self._close_reason or "")
            self._send_pending_ws_data()
        elif self._transport is not None and ws.state is State.CLOSED:
            self._transport.close()


__all__ = ["WebSocketConnection"]
