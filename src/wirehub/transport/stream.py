"""Byte-stream connections (TCP, TLS, Unix) on an :class:`asyncio.Protocol`.

The protocol *is* the connection: one object per socket, no streams, no task per frame.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from .connection import Connection, Context


def format_peer(peername: Any, family: int) -> tuple[str, str]:
    """Return ``(peer, ip)`` for a socket's peer name: ``"[::1]:5000"``, ``"::1"``."""
    if family == socket.AF_UNIX:
        return "unix", "unix"
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        if ":" in host:
            return f"[{host}]:{port}", host
        return f"{host}:{port}", host
    return str(peername), str(peername)


class SocketConnection(Connection, asyncio.Protocol):
    """A connection that owns an asyncio transport over a connected socket: what stream
    and WebSocket connections share."""

    __slots__ = ("_transport", "proxied_by")

    def __init__(self, ctx: Context, transport_name: str, encode: Any) -> None:
        super().__init__(ctx, transport_name, encode)
        #: the load balancer's address when a PROXY header named the peer, else None
        self.proxied_by: str | None = None

    def _bind(self, transport: asyncio.BaseTransport) -> None:
        """Take the transport: note the peer, set the water marks."""
        self._transport = transport  # type: ignore[assignment]
        self._sink = transport
        if self.proxied_by is None:
            sock = transport.get_extra_info("socket")
            family = sock.family if sock is not None else socket.AF_INET
            self.peer, self.peer_ip = format_peer(transport.get_extra_info("peername"), family)
        settings = self._ctx.settings
        transport.set_write_buffer_limits(high=settings.send_buffer_high, low=settings.send_buffer_low)  # type: ignore[attr-defined]

    def _linger_close(self) -> None:
        """Lingering close: send FIN once the buffer is flushed, then keep reading (and
        discarding) until the peer closes too. Closing a socket with unread input sends RST
        instead, and an RST can destroy replies the peer has not read yet. A peer that has
        already closed its side, or a transport that cannot half-close (TLS), is closed."""
        t = self._transport
        if t is None or t.is_closing():
            return
        if self._eof or not t.can_write_eof():
            t.close()
            return
        try:
            t.write_eof()
        except OSError:  # the peer is already gone
            t.abort()
            return
        if self._reading_paused:
            self._reading_paused = False
            t.resume_reading()

    def _transport_buffered(self) -> int:
        t = self._transport
        return t.get_write_buffer_size() if t is not None else 0

    def _abort_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    @property
    def tls_peer_certificate(self) -> dict | None:
        """The client certificate (mutual TLS), as :meth:`ssl.SSLSocket.getpeercert` gives it."""
        t = self._transport
        return t.get_extra_info("peercert") if t is not None else None


class StreamConnection(SocketConnection):
    """A connection over a byte stream, framed by the app's stream decoder."""

    __slots__ = ()

    def __init__(self, ctx: Context, transport_name: str, framing: Any) -> None:
        super().__init__(ctx, transport_name, framing.encoder)
        self._decoder = framing.stream_decoder(ctx.settings.max_frame)
        self._transport: asyncio.Transport | None = None

    # asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._bind(transport)
        self._start()

    # frame and dispatch what arrived: the connection's own code, compiled with it
    data_received = Connection._received

    def eof_received(self) -> bool | None:
        # Half-close from the peer: answer what it sent, then close our side too.
        return self._peer_finished()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost(exc)
        self._transport = None

    # Connection transport hooks ---------------------------------------------------

    def _close_transport(self) -> None:
        self._linger_close()
