"""WebSocket connections on picows: its Cython protocol does the HTTP upgrade and parses
(and unmasks) incoming frames; wirehub handles messages, limits and everything else.

Chosen on evidence (``bench/ws_impl.py``, docs/benchmarks.md): the sans-I/O core of the
``websockets`` library spent 7.4 µs per frame parsing and serializing, which capped the
whole server at about half of what picows reaches.

Each WebSocket message (text or binary, possibly fragmented) is one frame for the app; any
request path is accepted. Outgoing frames are framed here (a server frame is a 2-10 byte
header and the payload, unmasked), so a broadcast encodes a message once for every WebSocket
member, and all frames of a loop turn go out in one write.

Every byte written to an upgraded peer goes through the connection's send buffer and its
slow-consumer policy, control frames included: pongs and close frames are queued here like
the app's frames, and picows is given a stand-in transport (:class:`_PicowsTransport`) so
that what it would write itself (a close frame when its parser fails the connection) comes
back to the connection instead of reaching the socket. The one write picows makes straight to
the socket is the upgrade response, once, before any frame.

The checks RFC 6455 asks of a server that picows leaves to its user are made in
``_frame``: reserved bits set without a negotiated extension (there are none), a new
message inside a fragmented one, a continuation without a message, invalid UTF-8 text.
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
from .connection import HANDLER_ERROR, PROTOCOL, SHUTDOWN, Connection, Context
from .stream import format_peer

log = get_logger("wirehub.websocket")

#: messages over max_frame but within this multiple of it are refused without closing;
#: a frame beyond it closes the connection with 1009
WS_HARD_LIMIT = 4

#: the most bytes one read takes from the socket. picows doubles its read buffer whenever a
#: read fills most of it, and never shrinks it: without this cap a peer that floods small
#: frames grows its connection's buffer to whatever the kernel has queued (14 MiB after 14
#: full reads). With it, the buffer stays near twice a read plus the frame being received,
#: at most ``2 * (WS_HARD_LIMIT * max_frame + WS_READ_SIZE)``.
WS_READ_SIZE = 65536

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONT = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
_PING = WSMsgType.PING
_PROTOCOL_ERROR = WSCloseCode.PROTOCOL_ERROR
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


def close_frame(code: int, reason: bytes = b"") -> bytes:
    """A close frame: the code, then the reason cut to what a control frame holds (125
    bytes). 1005 ("no code received", never sent) gives a close frame without a body."""
    if code == 1005:
        return b"\x88\x00"
    return bytes((0x88, 2 + len(reason[:123]))) + code.to_bytes(2, "big") + reason[:123]


def _parse_close(data: bytes) -> tuple[int, str]:
    """The code and reason of a close frame picows wrote (unmasked, at most 125 bytes)."""
    body = bytes(data)[2:]
    if len(body) < 2:
        return 1005, ""
    return int.from_bytes(body[:2], "big"), body[2:].decode("utf-8", "replace")


def text_frame(payload: bytes) -> bytes:
    return _server_frame(0x81, payload)


def binary_frame(payload: bytes) -> bytes:
    return _server_frame(0x82, payload)


class WebSocketConnection(Connection):
    """One WebSocket client. ``binary = True`` sends the app's frames as binary messages."""

    __slots__ = ("_ws", "_raw", "_fragments", "_fragment_size", "_text", "_max_frame", "_protocol", "_close_code",
                 "_close_sent", "proxied_by")

    def __init__(self, ctx: Context, transport_name: str, protocol: _Protocol) -> None:
        super().__init__(ctx, transport_name, text_frame)
        self._protocol = protocol
        self._ws: Any = None  # picows WSTransport
        self._raw: asyncio.Transport | None = None
        self._fragments: list[bytes] | None = None
        self._fragment_size = 0
        self._text = True
        self._close_code: tuple[int, str] | None = None  # set by _fail: the close frame to send
        self._close_sent = False  # a close frame is queued: nothing may follow it
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
        stand_in = ws.underlying_transport
        stand_in.conn = self
        raw = self._raw = stand_in.raw
        self._sink = raw
        settings = self._ctx.settings
        raw.set_write_buffer_limits(high=settings.send_buffer_high, low=settings.send_buffer_low)
        self._start()

    def _frame(self, transport: Any, frame: Any) -> None:
        self.bytes_in += frame.payload_size + 2
        if self._close_reason is not None:  # closing: what the peer still sends is read and discarded
            if self._close_sent and frame.msg_type is _CLOSE and self._raw is not None:
                self._raw.close()  # the peer's answer: the closing handshake is done
            return
        kind = frame.msg_type  # (last_activity is set once per read, in _Protocol.get_buffer)
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # RFC 6455 5.2: no extension is negotiated
            return self._fail(_PROTOCOL_ERROR, "reserved bit set without a negotiated extension")
        if kind is _TEXT or kind is _BINARY:
            if self._fragments is not None:  # RFC 6455 5.4: fragments of messages do not interleave
                return self._fail(_PROTOCOL_ERROR, "new message inside a fragmented message")
            if not frame.fin:
                first = frame.get_payload_as_bytes()
                self._fragments = [first]
                self._fragment_size = len(first)
                self._text = kind is _TEXT
                return
            message = frame.get_payload_as_bytes()
        elif kind is _CONT:
            if self._fragments is None:
                return self._fail(_PROTOCOL_ERROR, "continuation frame without a message")
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
        elif kind is _PING:
            # answered through the send buffer like any frame: a peer that pings and never
            # reads is a slow consumer like any other
            self._control(_server_frame(0x8A, frame.get_payload_as_bytes()))
            return
        elif kind is _CLOSE:
            # The peer says goodbye: answer and close (no bye: the peer is leaving).
            code = 1005  # no code: the answer has none either
            if frame.payload_size >= 2:
                code = int(frame.get_close_code())
                if code < 1000 or code == 1006:  # picows lets these two through; RFC 6455 7.4
                    return self._fail(_PROTOCOL_ERROR, f"close code {code} may not be sent")
            self._cancel_timer()
            self._close_reason = "closed"
            self._send_close(code, b"")
            if not self._closed:  # the peer closes its side once it has our close frame
                self._timer = self._ctx.loop.call_later(self._ctx.settings.close_timeout, self.abort)
            return
        else:
            return  # pongs need nothing
        if len(message) > self._max_frame:
            self._dispatch([FrameError("too_large", f"message of {len(message)} bytes exceeds max_frame {self._max_frame}")])
            return
        if kind is _TEXT and not message.isascii():
            try:
                message.decode()
            except UnicodeDecodeError:  # RFC 6455 8.1
                return self._fail(WSCloseCode.INVALID_TEXT, "invalid UTF-8 in a text message")
        self._dispatch_one(message)

    def _control(self, data: bytes) -> None:
        """Queue a control frame (a pong) in the send buffer. It is not one of the app's
        frames (``frames_out`` does not count it) and gets no burst allowance: when the send
        buffer (pending plus the transport's) would pass ``max_send_buffer``, the slow-consumer
        policy applies at once — ``disconnect`` closes the connection, ``drop_oldest`` does
        not send this pong (RFC 6455 5.5.3 lets a pong answer only the latest ping)."""
        if self._closed or self._close_sent:
            return
        size = len(data)
        if self._pending_size + size + self._transport_buffered() > self._ctx.max_send_buffer:
            if not self._ctx.settings.drop_oldest:
                self._overflow()  # logs slow_consumer and closes
            return
        pending = self._pending
        if not pending and not self._write_paused and not self._in_read:
            self._ctx.flusher.add(self)
        pending.append(data)
        self._pending_size += size

    def _send_close(self, code: int, reason: bytes) -> None:
        """Write what is queued, then the close frame, the last bytes this peer gets; then
        the lingering close (docs/backpressure.md) as on TCP: FIN once they are written, and
        what the peer still sends is read and discarded until it closes its side (a socket
        closed with unread input sends RST, and the peer may then drop the close frame
        unread). ``close_timeout`` bounds the wait. TLS cannot half-close: it closes."""
        if self._close_sent or self._closed:
            return
        self._close_sent = True
        data = close_frame(code, reason)
        self._pending.append(data)
        self._pending_size += len(data)
        self._flush(force=True)
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if raw.can_write_eof():
            raw.write_eof()
            raw.resume_reading()  # paused after a parser error or behind async handlers
        else:
            raw.close()  # after the buffer is written

    def _picows_wrote(self, data: bytes) -> None:
        """picows wrote to its transport after the upgrade: a close frame when its parser
        failed the connection (an invalid frame, one beyond the hard limit). It is not sent
        as it is: the connection closes as for any protocol error, once the frame picows
        still hands over from the same read is handled (its parser reads one frame ahead),
        so the app's last frame, then the close frame with picows's code, are the last
        bytes the peer gets."""
        if bytes(data[:1]) != b"\x88":
            self._control(bytes(data))  # nothing else is expected (pongs and pings are ours)
            return
        if self._close_reason is not None or self._close_code is not None or self._closed:
            return  # closing already: the close frame is ours
        self._close_code = _parse_close(data)
        # No more reads: after the error picows's parser may go on finding frames (past a
        # frame beyond the hard limit, or a close frame it refused), and the loop may read
        # again before a callback runs (libuv reads up to 32 times per poll). The frame it
        # read ahead of the error is still handed over, in this read: then the close.
        raw = self._raw
        if raw is not None and not raw.is_closing():
            raw.pause_reading()
        self._ctx.loop.call_soon(self._picows_failed)

    def _picows_failed(self) -> None:
        if self._close_reason is None and not self._closed and self._close_code is not None:
            code, why = self._close_code
            log.info("websocket_protocol_error", conn=self.id, code=code, error=why)
            self.close(HANDLER_ERROR if code == WSCloseCode.INTERNAL_ERROR else PROTOCOL)

    def _fail(self, code: Any, why: str) -> None:
        """A fatal protocol error: an ordinary close (the app's last frame — the hub's bye —
        then the close frame), with the close code that names the error."""
        log.info("websocket_protocol_error", conn=self.id, code=int(code), error=why)
        self._close_code = (int(code), why)
        self.close(PROTOCOL)

    def _disconnected(self) -> None:
        if self._close_reason is None and self._close_code is not None:
            # picows failed it and the socket went before the close could be sent
            code, why = self._close_code
            log.info("websocket_protocol_error", conn=self.id, code=code, error=why)
            self._close_reason = PROTOCOL
        self._lost(None)
        self._raw = None

    # Connection transport hooks ---------------------------------------------------------

    def _transport_buffered(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def _close_transport(self) -> None:
        if self._raw is None or self._closed:
            return
        if self._close_code is not None:
            code, why = self._close_code
        else:
            code, why = (1001 if self._close_reason == SHUTDOWN else 1000), self._close_reason or ""
        self._send_close(code, why.encode())

    def _abort_transport(self) -> None:
        if self._raw is not None:
            self._raw.abort()

    def _pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def _resume_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()


class _Listener(WSListener):
    """picows's callbacks, forwarded to the connection. Slots, no ``__dict__`` (memory per
    connection): ``on_ws_frame`` is a slot, not a method, that holds the connection's own
    ``_frame``: picows looks its callbacks up on the listener, so a frame costs no
    forwarding call."""

    __slots__ = ("conn", "on_ws_frame")

    def __init__(self, conn: WebSocketConnection) -> None:
        super().__init__()
        self.conn = conn
        self.on_ws_frame = conn._frame

    def on_ws_connected(self, transport: Any) -> None:
        conn = self.conn
        conn._protocol.upgraded = True
        conn._ctx.registry.handshake_ended(conn._protocol, registered=True)
        # The upgrade's request and response stay on picows's transport for as long as the
        # connection lives; their headers (about 2.5 KB) are not needed after the upgrade.
        for message in (transport.request, transport.response):
            if message is not None:
                message.headers = None
        conn._connected(transport)

    def on_ws_disconnected(self, transport: Any) -> None:
        self.conn._disconnected()

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class _PicowsTransport:
    """The socket's transport as picows sees it. picows writes to its transport itself (the
    upgrade response, and a close frame when its parser fails a connection), and would send()
    to the socket directly whenever the transport's buffer is empty: this stand-in reports a
    buffer that is never empty, so every write picows makes comes to :meth:`write`. Before
    the upgrade (``conn`` is None) that is the response, written to the socket as it is;
    after it, the connection gets it (``_picows_wrote``), so that nothing reaches the peer
    outside the connection's send buffer. The connection's own frames do not pass here."""

    __slots__ = ("raw", "conn")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.conn: WebSocketConnection | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return 1  # never 0: picows then hands its writes to write() instead of the socket

    def write(self, data: Any) -> None:
        if self.conn is None:
            self.raw.write(data)
        else:
            self.conn._picows_wrote(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        conn = self.conn
        if conn is not None:
            if conn._close_code is not None and conn._close_reason is None:
                conn._picows_failed()  # picows's own delayed disconnect after its close frame
            if conn._close_sent:
                return  # the connection's lingering close ends it (close_timeout bounds it)
        self.raw.close()

    def abort(self) -> None:
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.raw.is_closing()


_get_buffer = WSProtocol.get_buffer


class _Protocol(WSProtocol):
    """picows's protocol, plus what the server needs before the upgrade: the peer, the
    handshake bookkeeping, and giving the accept slot back if the upgrade never happens."""

    __slots__ = ("ctx", "now", "conn", "kind", "peer", "peer_ip", "proxied_by", "upgraded")  # no __dict__

    def __init__(self, ctx: Context, transport_name: str) -> None:
        settings = ctx.settings
        super().__init__(
            None, None, False, self._listener_for, _picows_log, True,
            settings.handshake_timeout or None,
            False, 20.0, 20.0, WSAutoPingStrategy.PING_WHEN_IDLE,
            False,  # pings are answered in _frame, through the send buffer
            settings.max_frame * WS_HARD_LIMIT,
            None,
            2048,  # the smallest read buffer picows takes: idle connections stay small
        )
        self.ctx = ctx
        self.now = ctx.now
        self.conn: WebSocketConnection | None = None  # once the upgrade is accepted
        self.kind = transport_name
        self.peer = self.peer_ip = ""
        self.proxied_by: str | None = None
        self.upgraded = False

    def get_buffer(self, size_hint: int) -> Any:
        """Where the next read goes: called just before each read, so it also marks the
        connection active (once per read, not per frame: idle means no bytes received)."""
        conn = self.conn
        if conn is not None:
            conn.last_activity = self.now()
        buf = _get_buffer(self, size_hint)
        return buf if len(buf) <= WS_READ_SIZE else buf[:WS_READ_SIZE]

    def connection_made(self, transport: Any) -> None:
        if self.proxied_by is None:
            sock = transport.get_extra_info("socket")
            family = sock.family if sock is not None else socket.AF_INET
            self.peer, self.peer_ip = format_peer(transport.get_extra_info("peername"), family)
        self.ctx.registry.handshaking.add(self)
        super().connection_made(_PicowsTransport(transport))

    def connection_lost(self, exc: Any) -> None:
        super().connection_lost(exc)
        if not self.upgraded:
            self.upgraded = True  # once
            self.ctx.registry.handshake_ended(self, registered=False)

    def _listener_for(self, request: Any) -> Any:
        if self.ctx.registry.closing:  # the server is draining: no new sessions
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_error_response(503, b"server is shutting down\n"), None)
        conn = self.conn = WebSocketConnection(self.ctx, self.kind, self)
        return _Listener(conn)

    def abort(self) -> None:
        """Drop a connection whose upgrade has not finished (the server is draining)."""
        if self.transport is not None:
            self.transport.disconnect(False)


def websocket_factory(ctx: Context, transport_name: str) -> Callable[[], _Protocol]:
    return lambda: _Protocol(ctx, transport_name)
