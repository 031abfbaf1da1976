"""UDP: one endpoint per listening socket, one session per source address.

A session is a :class:`Connection` like any other (same handlers, counters, idle timeout);
each frame is one datagram and delivery is best effort: nothing is retried or reordered.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

from .._log import get_logger
from .connection import MAX_QUEUED_FRAMES, Connection, Context
from .stream import format_peer

log = get_logger("wirehub.udp")


class DatagramSession(Connection):
    __slots__ = ("_endpoint", "_addr")

    def __init__(self, ctx: Context, endpoint: DatagramEndpoint, addr: Any) -> None:
        super().__init__(ctx, "udp", endpoint.framing.datagram_encoder)
        self._endpoint = endpoint
        self._addr = addr
        self.peer, self.peer_ip = format_peer(addr, endpoint.family)

    def _write(self, frames: list[bytes]) -> None:
        transport = self._endpoint.transport
        if transport is None:
            return
        addr = self._addr
        for data in frames:
            self.bytes_out += len(data)
            transport.sendto(data, addr)

    def _close_transport(self) -> None:
        self._endpoint.end_session(self, None)

    def _abort_transport(self) -> None:
        self._endpoint.end_session(self, None)


class DatagramEndpoint(asyncio.DatagramProtocol):
    """The protocol of one UDP socket: routes each datagram to its session."""

    def __init__(self, ctx: Context, framing: Any, admit: Callable[[str], bool]) -> None:
        self.ctx = ctx
        self.framing = framing
        self.family = socket.AF_INET
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[Any, DatagramSession] = {}
        self._admit = admit
        self._accepting = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.family = sock.family

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is None:
            if not self._accepting:
                return
            ip = format_peer(addr, self.family)[1]
            if not self._admit(ip):
                return
            session = DatagramSession(self.ctx, self, addr)
            self.sessions[addr] = session
            session._start()
        session.bytes_in += len(data)
        queue = session._queue
        if queue is not None and len(queue) >= MAX_QUEUED_FRAMES:
            # An async handler is behind and a datagram socket cannot pause one peer:
            # best effort means this datagram is dropped.
            session.frames_dropped += 1
            return
        session.last_activity = self.ctx.now()
        item = self.framing.decode_datagram(data, self.ctx.settings.max_frame)
        session._dispatch([item])

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) for some earlier sendto: nothing to do per session.
        log.debug("udp_error", error=str(exc))

    def connection_lost(self, exc: BaseException | None) -> None:
        for session in list(self.sessions.values()):
            self.end_session(session, exc)
        self.transport = None

    def end_session(self, session: DatagramSession, exc: BaseException | None) -> None:
        if self.sessions.get(session._addr) is session:
            del self.sessions[session._addr]
            session._flush(force=True)
            session._lost(exc)  # the registry releases the session's slot

    def stop_accepting(self) -> None:
        """Draining: datagrams from unknown addresses no longer open sessions."""
        self._accepting = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
