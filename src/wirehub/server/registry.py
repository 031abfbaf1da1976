"""The registry of open connections and the gate that limits them at accept time."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable, Iterator

MAX_CONNECTIONS = "max_connections"
MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
MAX_UDP_SESSIONS = "max_udp_sessions"


class AcceptGate:
    """Counts connections from accept to close, total and per client IP.

    A slot is taken at accept (before any TLS handshake) and given back when the connection
    ends. When the total is reached the listeners are paused (``on_full``) so the kernel's
    backlog holds new clients until a slot frees (``on_space``); a client IP over its own
    limit is refused.
    """

    __slots__ = ("max_total", "max_per_ip", "count", "_per_ip", "_on_full", "_on_space", "_full", "total_limit")

    def __init__(
        self,
        max_total: int,
        max_per_ip: int,
        on_full: Callable[[], None],
        on_space: Callable[[], None],
        total_limit: str = MAX_CONNECTIONS,
    ) -> None:
        #: the name of the total's limit, as a refusal says it
        self.total_limit = total_limit
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.count = 0
        self._per_ip: dict[str, int] = {}
        self._on_full = on_full
        self._on_space = on_space
        self._full = False

    @property
    def full(self) -> bool:
        return self.count >= self.max_total

    def admit(self, ip: str, *, per_ip: bool = True) -> str | None:
        """Take a slot for ``ip``; return None on success or the name of the limit hit.
        ``per_ip=False`` skips the per-IP limit (a load balancer's address, until the PROXY
        header names the client: then :meth:`move`)."""
        if self.count >= self.max_total:
            self._set_full()
            return self.total_limit
        if self.max_per_ip and per_ip:
            n = self._per_ip.get(ip, 0)
            if n >= self.max_per_ip:
                return MAX_CONNECTIONS_PER_IP
            self._per_ip[ip] = n + 1
        self.count += 1
        if self.count >= self.max_total:
            self._set_full()
        return None

    def move(self, ip: str) -> str | None:
        """A slot taken with ``per_ip=False`` now belongs to ``ip``: apply its limit. On
        refusal the slot is still held (release it with ``release(ip, per_ip=False)``)."""
        if self.max_per_ip:
            n = self._per_ip.get(ip, 0)
            if n >= self.max_per_ip:
                return MAX_CONNECTIONS_PER_IP
            self._per_ip[ip] = n + 1
        return None

    def release(self, ip: str, *, per_ip: bool = True) -> None:
        self.count -= 1
        if self.max_per_ip and per_ip:
            n = self._per_ip.get(ip, 0) - 1
            if n > 0:
                self._per_ip[ip] = n
            else:
                self._per_ip.pop(ip, None)
        if self._full and self.count < self.max_total:
            self._full = False
            self._on_space()

    def _set_full(self) -> None:
        if not self._full:
            self._full = True
            self._on_full()

    def per_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)


class ConnectionRegistry:
    """Every open connection of this process, by id. Reading it is cheap; the admin API and
    the dashboard iterate it."""

    __slots__ = (
        "_conns", "_gate", "_udp_gate", "_empty", "accepted_total", "closed_totals", "closed_reasons", "handshaking", "closing",
        "closed", "describe",
    )

    def __init__(self, gate: AcceptGate, udp_gate: AcceptGate | None = None, closed_connections: int = 0) -> None:
        self._conns: dict[str, object] = {}
        self._gate = gate
        #: UDP sessions' own slots (``max_udp_sessions``), apart from the stream listeners'
        self._udp_gate = udp_gate or gate
        self._empty: asyncio.Event | None = None
        self.accepted_total = 0
        #: counters of connections that have closed, so totals survive them
        self.closed_totals = dict.fromkeys(("bytes_in", "bytes_out", "frames_in", "frames_out", "frames_dropped"), 0)
        self.closed_reasons: dict[str, int] = {}
        #: connections still in a protocol handshake (WebSocket upgrade): not yet the app's
        self.handshaking: set = set()
        #: True once the server drains: handshakes still running must not complete
        self.closing = False
        #: the last ``closed_connections`` connections that closed, oldest first, as
        #: ``/api/connections?state=closed`` lists them (a row each, never the connection)
        self.closed: collections.deque[dict[str, Any]] = collections.deque(maxlen=closed_connections)
        #: the app's ``describe(conn)`` (user, rooms), called once as a connection closes
        self.describe: Callable[[Any], dict[str, Any]] | None = None

    def add(self, conn) -> None:
        self._conns[conn.id] = conn
        self.accepted_total += 1

    def remove(self, conn) -> None:
        if self._conns.pop(conn.id, None) is not None:
            (self._udp_gate if conn.transport == "udp" else self._gate).release(conn.peer_ip)
            totals = self.closed_totals
            totals["bytes_in"] += conn.bytes_in
            totals["bytes_out"] += conn.bytes_out
            totals["frames_in"] += conn.frames_in
            totals["frames_out"] += conn.frames_out
            totals["frames_dropped"] += conn.frames_dropped
            reason = conn.close_reason or "closed"
            self.closed_reasons[reason] = self.closed_reasons.get(reason, 0) + 1
            if self.closed.maxlen:
                self.closed.append(self._closed_row(conn, reason))
            if not self._conns and self._empty is not None:
                self._empty.set()

    def _closed_row(self, conn, reason: str) -> dict[str, Any]:
        row = {
            "id": conn.id,
            "transport": conn.transport,
            "peer": conn.peer,
            "peer_ip": conn.peer_ip,
            "connected_at": round(conn.connected_at, 3),
            "closed_at": round(time.time(), 3),
            "reason": reason,
            "bytes_in": conn.bytes_in,
            "bytes_out": conn.bytes_out,
            "msgs_in": conn.frames_in,
            "msgs_out": conn.frames_out,
            "msgs_dropped": conn.frames_dropped,
        }
        if self.describe is not None:
            try:
                row.update(self.describe(conn))
            except Exception:  # a closed row without the app's fields beats a failed close
                pass
        return row

    def handshake_ended(self, conn, registered: bool) -> None:
        """A connection left the handshaking set: it is either registered now, or gone
        (then its slot is given back)."""
        self.handshaking.discard(conn)
        if not registered:
            self._gate.release(conn.peer_ip)

    def get(self, conn_id: str):
        return self._conns.get(conn_id)

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator:
        return iter(list(self._conns.values()))

    async def wait_empty(self) -> None:
        if not self._conns:
            return
        self._empty = asyncio.Event()
        await self._empty.wait()
