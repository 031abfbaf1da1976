"""WebSocket connections (RFC 6455, server side, no extensions) on the byte-stream
transport: one :class:`WebSocketConnection` per socket, like a TCP connection, plus the
upgrade and the WebSocket framing of :mod:`wirehub.protocol.websocket`.

Until the upgrade, the connection holds the request's bytes read so far (at most
``MAX_UPGRADE_SIZE``) and a handshake timer; it is not registered and the app does not see
it. The upgrade drops both and makes the connection's frame decoder, the only state
WebSocket adds to a stream connection (docs/benchmarks.md, "Memory per WebSocket
connection": picows, used before, kept ~4.5 KB of its own per connection).

Each WebSocket message (text or binary, possibly fragmented) is one frame for the app; any
request path is accepted. Outgoing frames are framed here (a server frame is a 2-10 byte
header and the payload, unmasked), so a broadcast encodes a message once for every WebSocket
member, and all frames of a loop turn go out in one write. Every byte written to an upgraded
peer goes through the connection's send buffer and its slow-consumer policy, pongs and the
close frame included.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Callable

from .._log import get_logger
from ..protocol.websocket import MAX_UPGRADE_SIZE, Close, Ping, ProtocolError, WebSocketDecoder, http_error, parse_upgrade
from .connection import SHUTDOWN, PROTOCOL, Context, write_out
from .stream import SocketConnection

log = get_logger("wirehub.websocket")

#: messages over max_frame but within this multiple of it are refused without closing;
#: a frame beyond it closes the connection with 1009
WS_HARD_LIMIT = 4

_pack_short = struct.Struct(">BBH").pack
_pack_long = struct.Struct(">BBQ").pack


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


def text_frame(payload: bytes) -> bytes:
    return _server_frame(0x81, payload)


def binary_frame(payload: bytes) -> bytes:
    return _server_frame(0x82, payload)


class WebSocketConnection(SocketConnection):
    """One WebSocket client. ``binary = True`` sends the app's frames as binary messages."""

    __slots__ = ("_upgrade", "_close_code", "_close_sent", "_peer_code")

    def __init__(self, ctx: Context, transport_name: str) -> None:
        super().__init__(ctx, transport_name, text_frame)
        self._transport: asyncio.Transport | None = None
        #: until the upgrade: the request's bytes read so far; None once upgraded
        self._upgrade: bytearray | None = bytearray()
        self._close_code: tuple[int, str] | None = None  # set by _fail: the close frame to send
        self._close_sent = False  # a close frame is queued: nothing may follow it
        #: the code of the peer's close frame, once it came (None before): answered once the
        #: messages before it are handled
        self._peer_code: int | None = None

    @property
    def binary(self) -> bool:
        return self.encode is binary_frame

    @binary.setter
    def binary(self, value: bool) -> None:
        self.encode = binary_frame if value else text_frame

    # asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._bind(transport)
        ctx = self._ctx
        ctx.registry.handshaking.add(self)
        if ctx.settings.handshake_timeout:  # the upgrade's deadline (then the app's handshake deadline)
            self._timer = ctx.loop.call_later(ctx.settings.handshake_timeout, self._upgrade_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None:
            self._upgrade_received(data)
            return
        self.bytes_in += len(data)
        items = self._decoder.feed(data)
        if not items or self._peer_code is not None:  # after the peer's close frame: discarded
            return
        if self._close_reason is not None:  # closing: what the peer still sends is read and discarded
            if self._close_sent and type(items[-1]) is Close and self._transport is not None:
                self._transport.close()  # the peer's answer: the closing handshake is done
            return
        self.last_activity = self._ctx.now()  # whole frames only, as on a stream
        # what the frames of one read send goes out in one write when the read is handled
        self._in_read = True
        try:
            if self._decoder.messages_only:  # the usual read: messages, handled in one call
                self._dispatch(items)
                return
            for item in items:
                if self._close_reason is not None or self._peer_code is not None:
                    break
                kind = type(item)
                if kind is bytes:
                    self._dispatch_one(item)
                elif kind is Ping:
                    # answered through the send buffer like any frame: a peer that pings
                    # and never reads is a slow consumer like any other
                    self._control(_server_frame(0x8A, item.payload))
                elif kind is Close:
                    self._peer_closed(item.code)
                elif kind is ProtocolError:
                    self._fail(item.code, item.message)
                else:  # a FrameError: a message over max_frame
                    self._dispatch([item])
        finally:
            self._in_read = False
            if self._pending:
                write_out((self,), False)

    def eof_received(self) -> bool | None:
        if self._upgrade is not None:
            return False  # the transport closes
        return self._peer_finished()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._upgrade is not None:  # never upgraded: the app never saw it
            self._upgrade = None
            self._cancel_timer()
            self._ctx.registry.handshake_ended(self, registered=False)
        else:
            if self._close_reason is None and self._close_code is not None:
                self._close_reason = PROTOCOL
            self._lost(exc)
        self._transport = None

    # the upgrade ------------------------------------------------------------------------

    def _upgrade_received(self, data: bytes) -> None:
        request = self._upgrade
        transport = self._transport
        if request is None or transport is None or transport.is_closing():
            return  # refused: closing
        request += data
        end = request.find(b"\r\n\r\n")
        if (end < 0 and len(request) > MAX_UPGRADE_SIZE) or end > MAX_UPGRADE_SIZE:
            why = f"upgrade request over {MAX_UPGRADE_SIZE} bytes"
            self._refuse(http_error(431, why), why)
            return
        if end < 0:
            return
        ctx = self._ctx
        if ctx.registry.closing:  # the server is draining: no new sessions
            self._refuse(http_error(503, "server is shutting down"), "draining")
            return
        upgraded, response, why = parse_upgrade(bytes(request[:end]))
        if not upgraded:
            self._refuse(response, why)
            return
        rest = bytes(request[end + 4 :])
        self._upgrade = None
        self._cancel_timer()
        transport.write(response)
        settings = ctx.settings
        self._decoder = WebSocketDecoder(settings.max_frame, settings.max_frame * WS_HARD_LIMIT)
        ctx.registry.handshake_ended(self, registered=True)
        self._start()
        if rest and not self._closed:
            self.data_received(rest)

    def _refuse(self, response: bytes, why: str) -> None:
        log.info("websocket_upgrade_refused", peer=self.peer, error=why)
        self._upgrade = bytearray()  # nothing more is read: the transport is closing
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()  # after the response is written

    def _upgrade_timed_out(self) -> None:
        self._timer = None
        if self._upgrade is not None and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now; one whose upgrade has not finished (the server is
        draining) just closes."""
        if self._upgrade is not None:
            if self._transport is not None:
                self._transport.abort()
            return
        super().abort()

    # frames --------------------------------------------------------------------------

    def _peer_closed(self, code: int) -> None:
        """The peer says goodbye (no bye: it is leaving). As at EOF on a stream, the messages
        it sent before are handled first, their replies delivered: with ``async`` handlers the
        close waits until the connection's queue of frames is done (RFC 6455 5.5.1 lets an
        endpoint send data after the peer's close frame, until it sends its own). Then the
        close frame answers with the peer's code, and the socket closes. What the peer sends
        after its close frame is discarded (it may send no more data). The replies the app
        owes past its handlers (``App.pending``) are waited for the same way."""
        self._peer_code = code
        if self._await_owed():  # the frames before it, and what the app owes (App.pending)
            self._pump.add_done_callback(self._answer_close)
            return
        self._answer_close()

    def _answer_close(self, _: object = None) -> None:
        """The messages before the peer's close frame are handled: answer it and close."""
        if self._close_reason is not None or self._closed:
            return  # closed meanwhile (the app, a timeout, the peer gone)
        self._cancel_timer()
        self._close_reason = "closed"
        code = self._peer_code
        self._send_close(code if code is not None else 1000, b"")
        if not self._closed:  # the peer closes its side once it has our close frame
            self._timer = self._ctx.loop.call_later(self._ctx.settings.close_timeout, self.abort)

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
        self._linger_close()

    def _fail(self, code: int, why: str) -> None:
        """A fatal protocol error: an ordinary close (the app's last frame — the hub's bye —
        then the close frame), with the close code that names the error."""
        log.info("websocket_protocol_error", conn=self.id, code=code, error=why)
        self._close_code = (code, why)
        self.close(PROTOCOL)

    # Connection transport hooks ---------------------------------------------------------

    def _close_transport(self) -> None:
        if self._transport is None or self._closed:
            return
        if self._close_sent:  # the close frame is out (it answered the peer's): the socket is left
            self._linger_close()
            return
        if self._close_code is not None:
            code, why = self._close_code
        elif self._peer_code is not None:  # the peer's close frame: answered with its code
            code, why = self._peer_code, ""
        else:
            code, why = (1001 if self._close_reason == SHUTDOWN else 1000), self._close_reason or ""
        self._send_close(code, why.encode())


def websocket_factory(ctx: Context, transport_name: str) -> Callable[[], WebSocketConnection]:
    return lambda: WebSocketConnection(ctx, transport_name)
