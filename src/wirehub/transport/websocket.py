"""WebSocket connections on picows: its Cython protocol does the HTTP upgrade and parses
(and unmasks) incoming frames; wirehub handles messages, limits and everything else.

Chosen on evidence (``bench/ws_impl.py``, docs/benchmarks.md): the sans-I/O core of the
``websockets`` library spent 7.4 µs per frame parsing and serializing, which capped the
whole server at about half of what picows reaches.

Each WebSocket message (text or binary, possibly fragmented) is one frame for the app; any
request path is accepted. Outgoing frames are framed here (a server frame is a 2-10 byte
header and the payload, unmasked), so a broadcast encodes a message once for every WebSocket
member, and all frames of a loop turn go out in one write.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, Callable

from picows import WSCloseCode, WSListener, WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import WSAutoPingStrategy, WSProtocol

from .._log import get_logger
from ..protocol.framing import FrameError
from .connection import PROTOCOL, SHUTDOWN, Connection, Context
from .stream import format_peer

log = get_logger("wirehub.websocket")

#: messages over max_frame but within this multiple of it are refused without closing;
#: a frame beyond it closes the connection with 1009
WS_HARD_LIMIT = 4

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONT = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
_pack_short = struct.Struct(">BBH").pack
_pack_long = struct.Struct(">BBQ").pack

# picows makes a child logging.Logger per connection for a logging.Logger; an adapter keeps
# it from doing so (memory per connection), and its messages stay at debug level anyway.
_picows_logger = logging.getLogger("wirehub.websocket.picows")
# A peer's protocol error is the peer's problem: we log it ourselves, at info.
_picows_logger.addFilter(lambda record: not str(record.msg).startswith("WS parser error"))
_picows_log = logging.LoggerAdapter(_picows_logger, {})


def _server_frame(first: int, payload: bytes) -> bytes:
    """An unmasked, final frame (``first`` is FIN plus the opcode): what a server sends."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_short(first, 126, n) + payload
    return _pack_long(first, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    return _server_frame(0x81, payload)


def binary_frame(payload: bytes) -> bytes:
    return _server_frame(0x82, payload)


class WebSocketConnection(Connection):
    """One WebSocket client. ``binary = True`` sends the app's frames as binary messages."""

    __slots__ = ("_ws", "_raw", "_fragments", "_fragment_size", "_text", "_max_frame", "_protocol", "_close_code", "proxied_by")

    def __init__(self, ctx: Context, transport_name: str, protocol: _Protocol) -> None:
        super().__init__(ctx, transport_name, text_frame)
        self._protocol = protocol
        self._ws: Any = None  # picows WSTransport
        self._raw: asyncio.Transport | None = None
        self._fragments: list[bytes] | None = None
        self._fragment_size = 0
        self._text = True
        self._close_code: tuple[Any, str] | None = None  # set by _fail: the close frame to send
        self._max_frame = ctx.settings.max_frame
        self.peer, self.peer_ip, self.proxied_by = protocol.peer, protocol.peer_ip, protocol.proxied_by

    @property
    def binary(self) -> bool:
        return self.encode is binary_frame

    @binary.setter
    def binary(self, value: bool) -> None:
        self.encode = binary_frame if value else text_frame

    # from picows ----------------------------------------------------------------------

    def _connected(self, ws: Any) -> None:
        self._ws = ws
        raw = self._raw = ws.underlying_transport
        self._sink = raw
        settings = self._ctx.settings
        raw.set_write_buffer_limits(high=settings.send_buffer_high, low=settings.send_buffer_low)
        self._start()

    def _frame(self, frame: Any) -> None:
        self.bytes_in += frame.payload_size + 2
        if self._close_reason is not None:
            return
        self.last_activity = self._ctx.now()
        kind = frame.msg_type
        if kind is _TEXT or kind is _BINARY:
            if not frame.fin:
                first = frame.get_payload_as_bytes()
                self._fragments = [first]
                self._fragment_size = len(first)
                self._text = kind is _TEXT
                return
            message = frame.get_payload_as_bytes()
        elif kind is _CONT:
            if self._fragments is None:
                return self._fail(WSCloseCode.PROTOCOL_ERROR, "continuation frame without a message")
            part = frame.get_payload_as_bytes()
            self._fragments.append(part)
            self._fragment_size += len(part)
            if self._fragment_size > self._max_frame * WS_HARD_LIMIT:
                return self._fail(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            if not frame.fin:
                return
            message = b"".join(self._fragments)
            self._fragments = None
            kind = _TEXT if self._text else _BINARY
        elif kind is _CLOSE:
            self._cancel_timer()
            if self._ws.is_close_frame_sent:
                # The answer to a close picows sent on a broken frame: a protocol error.
                self._close_reason = PROTOCOL
            else:
                # The peer says goodbye: answer and close (no bye: the peer is leaving).
                self._close_reason = "closed"
                self._flush(force=True)
                self._ws.send_close(frame.get_close_code())
            self._ws.disconnect()
            return
        else:
            return  # pings are answered by picows; pongs need nothing
        if len(message) > self._max_frame:
            self._dispatch([FrameError("too_large", f"message of {len(message)} bytes exceeds max_frame {self._max_frame}")])
            return
        if kind is _TEXT and not message.isascii():
            try:
                message.decode()
            except UnicodeDecodeError:  # RFC 6455 8.1
                return self._fail(WSCloseCode.INVALID_TEXT, "invalid UTF-8 in a text message")
        self._dispatch_one(message)

    def _fail(self, code: Any, why: str) -> None:
        """A fatal protocol error: an ordinary close (the app's last frame — the hub's bye —
        then the close frame), with the close code that names the error."""
        log.info("websocket_protocol_error", conn=self.id, error=why)
        self._close_code = (code, why)
        self.close(PROTOCOL)

    def _disconnected(self) -> None:
        if self._close_reason is None and self._ws is not None and self._ws.is_close_frame_sent:
            # picows closed it (a frame beyond the hard limit, a broken frame): a protocol error
            log.info("websocket_protocol_error", conn=self.id, error=str(self._ws.close_handshake))
            self._close_reason = PROTOCOL
        self._lost(None)
        self._raw = None

    # Connection transport hooks ---------------------------------------------------------

    def _transport_buffered(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def _close_transport(self) -> None:
        ws = self._ws
        if ws is None or ws.is_disconnected:
            return
        if self._close_code is not None:
            code, why = self._close_code
        else:
            code, why = (WSCloseCode.GOING_AWAY if self._close_reason == SHUTDOWN else WSCloseCode.OK), self._close_reason or ""
        ws.send_close(code, why.encode())
        ws.disconnect()  # graceful: after the buffer is written

    def _abort_transport(self) -> None:
        if self._ws is not None:
            self._ws.disconnect(False)

    def _pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def _resume_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()


class _Listener(WSListener):
    """picows's callbacks, forwarded to the connection."""

    def __init__(self, conn: WebSocketConnection) -> None:
        super().__init__()
        self.conn = conn

    def on_ws_connected(self, transport: Any) -> None:
        self.conn._protocol.upgraded = True
        self.conn._ctx.registry.handshake_ended(self.conn._protocol, registered=True)
        self.conn._connected(transport)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        self.conn._frame(frame)

    def on_ws_disconnected(self, transport: Any) -> None:
        self.conn._disconnected()

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class _Protocol(WSProtocol):
    """picows's protocol, plus what the server needs before the upgrade: the peer, the
    handshake bookkeeping, and giving the accept slot back if the upgrade never happens."""

    def __init__(self, ctx: Context, transport_name: str) -> None:
        settings = ctx.settings
        super().__init__(
            None, None, False, self._listener_for, _picows_log, True,
            settings.handshake_timeout or None,
            False, 20.0, 20.0, WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # answer pings
            settings.max_frame * WS_HARD_LIMIT,
            None,
            2048,  # the smallest read buffer picows takes: idle connections stay small
        )
        self.ctx = ctx
        self.kind = transport_name
        self.peer = self.peer_ip = ""
        self.proxied_by: str | None = None
        self.upgraded = False

    def connection_made(self, transport: Any) -> None:
        if self.proxied_by is None:
            sock = transport.get_extra_info("socket")
            family = sock.family if sock is not None else socket.AF_INET
            self.peer, self.peer_ip = format_peer(transport.get_extra_info("peername"), family)
        self.ctx.registry.handshaking.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Any) -> None:
        super().connection_lost(exc)
        if not self.upgraded:
            self.upgraded = True  # once
            self.ctx.registry.handshake_ended(self, registered=False)

    def _listener_for(self, request: Any) -> Any:
        if self.ctx.registry.closing:  # the server is draining: no new sessions
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(503, b"server is shutting down\n"), None)
        return _Listener(WebSocketConnection(self.ctx, self.kind, self))

    def abort(self) -> None:
        """Drop a connection whose upgrade has not finished (the server is draining)."""
        if self.transport is not None:
            self.transport.disconnect(False)


def websocket_factory(ctx: Context, transport_name: str) -> Callable[[], _Protocol]:
    return lambda: _Protocol(ctx, transport_name)
