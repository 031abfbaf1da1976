"""Connection queries: what ``GET /api/connections`` and the dashboard's table ask for.

Modelled on NATS's ``/connz``: ``sort`` and ``order``, ``offset`` and ``limit``, filters by
``transport``, ``user``, ``room`` and ``peer`` (a CIDR), and ``state=closed`` for the
connections that closed recently (the registry's ring of ``closed_connections`` rows, with
their close reason). A query reads every open connection once at most and sorts only the
page it returns (``heapq``): 19,000 connections take a few milliseconds.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    from .server import Server

#: rows a query returns without ``limit``, and the most it returns at all
PAGE_DEFAULT = 1024
PAGE_MAX = 10_000
TRANSPORTS = ("tcp", "tls", "unix", "ws", "wss", "udp")
STATES = ("open", "closed")
ORDERS = ("asc", "desc")
PARAMS = ("sort", "order", "offset", "limit", "transport", "user", "room", "peer", "state")

# sort key -> (the value of an open connection, the value in a row, default order descending)
_Key = Callable[[Any], Any]
SORTS: dict[str, tuple[_Key | None, _Key, bool]] = {
    "id": (lambda c: c.id, lambda r: r["id"], False),
    "transport": (lambda c: c.transport, lambda r: r["transport"], False),
    "peer": (lambda c: c.peer, lambda r: r["peer"], False),
    "connected_at": (lambda c: c.connected_at, lambda r: r["connected_at"], False),
    "idle_s": (lambda c: -c.last_activity, lambda r: r.get("idle_s", 0.0), True),
    "bytes_in": (lambda c: c.bytes_in, lambda r: r["bytes_in"], True),
    "bytes_out": (lambda c: c.bytes_out, lambda r: r["bytes_out"], True),
    "msgs_in": (lambda c: c.frames_in, lambda r: r["msgs_in"], True),
    "msgs_out": (lambda c: c.frames_out, lambda r: r["msgs_out"], True),
    "msgs": (lambda c: c.frames_in + c.frames_out, lambda r: r["msgs_in"] + r["msgs_out"], True),  # in and out: the busiest
    "msgs_dropped": (lambda c: c.frames_dropped, lambda r: r["msgs_dropped"], True),
    "send_buffer": (lambda c: c.send_buffer, lambda r: r.get("send_buffer", 0), True),
    # closed connections only
    "closed_at": (None, lambda r: r["closed_at"], True),
    "reason": (None, lambda r: r["reason"], False),
}


@dataclass(frozen=True, slots=True)
class ConnQuery:
    state: str = "open"
    sort: str = "connected_at"
    descending: bool = False
    offset: int = 0
    limit: int = PAGE_DEFAULT
    transport: str | None = None
    user: str | None = None
    room: str | None = None
    peer: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    @property
    def filtered(self) -> bool:
        return bool(self.transport or self.user is not None or self.room is not None or self.peer is not None)


class QueryError(ValueError):
    """A query value is wrong; the message says which and what is allowed."""


def whole_number(params: Mapping[str, str], key: str, default: int, top: int | None = None) -> int:
    """``params[key]`` as a whole number from 0 to ``top`` (no bound: None), ``default`` when
    it is absent or empty: the one parser of the admin API's number parameters (``offset``,
    ``limit``), for ``/api/connections``, the dashboard's query, and the app's routes. Only
    ASCII digits count (no sign, space, ``_`` or other scripts' digits, which ``int`` takes);
    anything else raises :class:`QueryError` saying which values are allowed."""
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    value = -1
    if type(raw) is str and raw.isascii() and raw.isdigit():
        try:
            value = int(raw)
        except ValueError:  # more digits than int() converts: no count is that large
            value = -1
    if value < 0 or (top is not None and value > top):
        bound = f"0 to {top}" if top is not None else "0 or more"
        raise QueryError(f"{key} must be a whole number from {bound}, got {raw!r}")
    return value


def parse_query(params: Mapping[str, str], *, ignore: Iterable[str] = ("token",), page_max: int = PAGE_MAX, page_default: int = PAGE_DEFAULT) -> ConnQuery:
    """The query from URL parameters (or the dashboard's message); raises :class:`QueryError`."""
    unknown = sorted(set(params) - set(PARAMS) - set(ignore))
    if unknown:
        raise QueryError(f"unknown query parameter {unknown[0]!r}; connections take {', '.join(PARAMS)}")
    state = params.get("state") or "open"
    if state not in STATES:
        raise QueryError(f"state must be open or closed, got {state!r}")
    sort = params.get("sort") or ("closed_at" if state == "closed" else "connected_at")
    spec = SORTS.get(sort)
    if spec is None or (spec[0] is None and state != "closed"):
        usable = [k for k, v in SORTS.items() if v[0] is not None or state == "closed"]
        raise QueryError(f"sort must be one of {', '.join(usable)}" + (" (closed_at and reason with state=closed)" if state == "open" else "") + f", got {sort!r}")
    order = params.get("order")
    if order is not None and order not in ORDERS:
        raise QueryError(f"order must be asc or desc, got {order!r}")
    descending = spec[2] if order is None else order == "desc"
    offset = whole_number(params, "offset", 0)
    limit = whole_number(params, "limit", page_default, page_max)
    transport = params.get("transport") or None
    if transport is not None and transport not in TRANSPORTS:
        raise QueryError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    peer = None
    raw_peer = params.get("peer")
    if raw_peer:
        try:
            peer = ipaddress.ip_network(raw_peer, strict=False)
        except ValueError:
            raise QueryError(f"peer must be an address or a network in CIDR form (127.0.0.0/8, 2001:db8::/32), got {raw_peer!r}") from None
    user = params.get("user")
    room = params.get("room")
    return ConnQuery(
        state=state, sort=sort, descending=descending, offset=offset, limit=limit, transport=transport,
        user=user if user else None, room=room if room else None, peer=peer,
    )


def describe_connection(conn: Any, now: float) -> dict[str, Any]:
    """The framework's view of one connection, as ``/api/connections`` lists it."""
    return {
        "id": conn.id,
        "transport": conn.transport,
        "peer": conn.peer,
        "connected_at": round(conn.connected_at, 3),
        "idle_s": round(max(0.0, now - conn.last_activity), 3),
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "msgs_in": conn.frames_in,
        "msgs_out": conn.frames_out,
        "msgs_dropped": conn.frames_dropped,
        "send_buffer": conn.send_buffer,
    }


def _in_network(network: Any) -> Callable[[str], bool]:
    cache: dict[str, bool] = {}  # many connections share an address

    def test(ip: str) -> bool:
        hit = cache.get(ip)
        if hit is None:
            try:
                hit = ipaddress.ip_address(ip) in network
            except ValueError:  # "unix", "asgi"
                hit = False
            cache[ip] = hit
        return hit

    return test


def _page(items: Iterable[Any], total: int | None, q: ConnQuery, key: _Key, ordered: bool) -> tuple[list[Any], int]:
    """One page of ``items`` in the query's order; ``ordered`` when they come in it already."""
    if ordered:
        if total is None:
            items = list(items)
            total = len(items)
        return list(itertools.islice(items, q.offset, q.offset + q.limit)), total
    items = list(items)
    n = q.offset + q.limit
    if not q.limit or q.offset >= len(items):
        return [], len(items)
    chosen = (heapq.nlargest if q.descending else heapq.nsmallest)(n, items, key=key)
    return chosen[q.offset :], len(items)


def run_query(server: Server, q: ConnQuery, now: float) -> tuple[list[dict[str, Any]], int]:
    """The rows of one page and how many connections match in all."""
    app = server.app
    describe = getattr(app, "describe", None)
    registry = server.registry
    if q.state == "closed":
        rows: Iterable[dict[str, Any]] = registry.closed
        if q.transport:
            rows = [r for r in rows if r["transport"] == q.transport]
        if q.user is not None:
            rows = [r for r in rows if r.get("user") == q.user]
        if q.room is not None:
            rows = [r for r in rows if q.room in (r.get("rooms") or ())]
        if q.peer is not None:
            test = _in_network(q.peer)
            rows = [r for r in rows if test(r.get("peer_ip", ""))]
        key = SORTS[q.sort][1]
        page, total = _page(rows, None, q, key, ordered=False)
        return [dict(r) for r in page], total

    conns: Iterable[Any] = registry
    total: int | None = len(registry)
    if q.user is not None or q.room is not None:
        ids = None
        hook = getattr(app, "connection_ids", None)
        if hook is not None:
            ids = hook(user=q.user, room=q.room)
        if ids is not None:
            found = (registry.get(i) for i in ids)
            conns = sorted((c for c in found if c is not None), key=lambda c: c.connected_at)
        elif describe is not None:
            def matches(c: Any) -> bool:
                info = describe(c)
                return (q.user is None or info.get("user") == q.user) and (q.room is None or q.room in (info.get("rooms") or ()))

            conns = [c for c in registry if matches(c)]
        else:
            conns = []
        total = None
    if q.transport:
        conns = [c for c in conns if c.transport == q.transport]
        total = None
    if q.peer is not None:
        test = _in_network(q.peer)
        conns = [c for c in conns if test(c.peer_ip)]
        total = None
    # the registry (and each filter) keeps connections in the order they came
    ordered = q.sort == "connected_at" and not q.descending
    key = SORTS[q.sort][0]
    assert key is not None
    page, n = _page(conns, total, q, key, ordered)
    out = []
    for conn in page:
        row = describe_connection(conn, now)
        if describe is not None:
            row.update(describe(conn))
        out.append(row)
    return out, n
