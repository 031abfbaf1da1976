"""The dashboard's live stream: ``GET /api/live``, a WebSocket from the admin server.

The page sends one JSON message first, ``{"token": TOKEN, "conns": QUERY}`` (the token only
when the server has ``admin_token``; never in the URL). A wrong or missing token gets
``{"type":"error","error":"unauthorized",...}`` and close code 4401. Then the server sends a
``tick`` every :data:`LIVE_INTERVAL` seconds: totals (the page turns them into rates), the
app's part (the hub: rooms and nodes), and one page of the connection table as the page last
asked for it (``{"conns": QUERY}``, the parameters of ``/api/connections``, at most
:data:`LIVE_PAGE_MAX` rows). A new query is answered at once, but one stream's page is
queried at most once every :data:`LIVE_QUERY_INTERVAL` seconds: queries that come sooner are
coalesced, the latest answered when the interval is up (a page that sends a query per frame
cannot make the server sort every connection per frame). The totals are computed once per
tick for every open stream; at most :data:`MAX_LIVE` streams are open at once, counting
those still waiting for their first message.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import WSMsgType, web

from .._version import __version__
from .query import ConnQuery, QueryError, parse_query, run_query

if TYPE_CHECKING:
    from .server import Server


#: seconds between two ticks of the live stream
LIVE_INTERVAL = 1.0
#: dashboards (live streams) one process serves at once; more get 503
MAX_LIVE = 16
#: seconds a new stream has to send its first message (the token)
LIVE_AUTH_TIMEOUT = 10.0
#: rows of the connection table one tick carries, at most
LIVE_PAGE_MAX = 500
#: the largest message the page may send (a query)
LIVE_MAX_MESSAGE = 16 * 1024
#: seconds the app's part of a tick may take (a remote broker's answers) before it is left out
LIVE_APP_TIMEOUT = 2.0
#: bytes queued to one dashboard beyond which its ticks are skipped until it reads
LIVE_BACKLOG = 1 << 20
#: seconds between two queries of one stream's connection page (each sorts and filters every
#: connection): the page's queries that come sooner are coalesced, the latest answered then
LIVE_QUERY_INTERVAL = 0.25

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def totals(server: Server) -> dict[str, Any]:
    """Totals over every connection, open and closed (the counters only rise)."""
    registry = server.registry
    sums = dict(registry.closed_totals)
    by_transport: dict[str, int] = {}
    send_buffer = 0
    b_in = b_out = f_in = f_out = f_drop = 0
    for conn in registry:
        t = conn.transport
        by_transport[t] = by_transport.get(t, 0) + 1
        b_in += conn.bytes_in
        b_out += conn.bytes_out
        f_in += conn.frames_in
        f_out += conn.frames_out
        f_drop += conn.frames_dropped
        send_buffer += conn.send_buffer
    sums["bytes_in"] += b_in
    sums["bytes_out"] += b_out
    sums["frames_in"] += f_in
    sums["frames_out"] += f_out
    sums["frames_dropped"] += f_drop
    sums["connections"] = len(registry)
    sums["by_transport"] = by_transport
    sums["send_buffer"] = send_buffer
    sums["accepted"] = registry.accepted_total
    sums["closed"] = sum(registry.closed_reasons.values())
    sums["slow_consumer"] = registry.closed_reasons.get("slow_consumer", 0)
    sums["refused"] = sum(server.refused.values())
    return sums


def node_info(server: Server) -> dict[str, Any]:
    ready, why = server.readiness()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "worker": server.worker,
        "version": __version__,
        "ready": ready,
        "reason": why,
        "draining": server.draining,
        "addresses": {k: v for k, v in server.addresses.items()},
    }


class _Viewer:
    __slots__ = ("ws", "transport", "query", "wake", "page_error")

    def __init__(self, ws: web.WebSocketResponse, transport: Any, query: ConnQuery) -> None:
        self.ws = ws
        self.transport = transport
        self.query = query
        self.wake = asyncio.Event()
        self.page_error: str | None = None


class LiveFeed:
    """Every open live stream of one admin server, and the task that ticks while any is."""

    def __init__(self, server: Server, token: str | None) -> None:
        self.server = server
        self.token = token
        self.viewers: set[_Viewer] = set()
        self.opening = 0  # streams upgraded, their first message (the token) not read yet
        self.snapshot: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def _query(self, raw: Any) -> ConnQuery:
        if raw is None:
            return parse_query({"limit": "50"}, page_max=LIVE_PAGE_MAX)
        if not isinstance(raw, dict):
            raise QueryError("conns must be an object of /api/connections parameters")
        params = {str(k): "" if v is None else str(v) for k, v in raw.items()}
        params.setdefault("limit", "50")
        return parse_query(params, ignore=(), page_max=LIVE_PAGE_MAX)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if len(self.viewers) + self.opening >= MAX_LIVE:
            from .admin import error_response

            return error_response(503, "limit", f"{MAX_LIVE} dashboards are open on this node, the most it serves (MAX_LIVE); close one")
        self.opening += 1
        try:
            ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=LIVE_MAX_MESSAGE)
            await ws.prepare(request)
            first = await ws.receive(timeout=LIVE_AUTH_TIMEOUT)
        except asyncio.TimeoutError:
            await ws.close(code=4408, message=b"send the first message (the token) sooner")
            return ws
        finally:
            self.opening -= 1
        hello: Any = None
        if first.type == WSMsgType.TEXT:
            try:
                hello = _decode.decode(first.data)
            except msgspec.DecodeError:
                hello = None
        if not isinstance(hello, dict):
            await self._refuse(ws, "bad_request", 'the first message must be a JSON object: {"token": TOKEN}', 4400)
            return ws
        if self.token:
            given = hello.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                await self._refuse(ws, "unauthorized", "the admin token is wrong or missing: enter the server's admin_token", 4401)
                return ws
        try:
            query = self._query(hello.get("conns"))
        except QueryError as exc:
            await self._refuse(ws, "bad_request", str(exc), 4400)
            return ws
        viewer = _Viewer(ws, request.transport, query)
        self.viewers.add(viewer)
        if self._task is None:
            self._task = asyncio.ensure_future(self._tick())
        sender = asyncio.ensure_future(self._send(viewer))
        try:
            await ws.send_str(_json.encode({"type": "welcome", "interval": LIVE_INTERVAL, "page_max": LIVE_PAGE_MAX, "node": node_info(self.server)}).decode())
            if self.snapshot is not None:
                viewer.wake.set()
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    body = _decode.decode(msg.data)
                    if isinstance(body, dict) and "conns" in body:
                        viewer.query = self._query(body["conns"])
                        viewer.page_error = None
                except (msgspec.DecodeError, QueryError) as exc:
                    viewer.page_error = str(exc)
                if self.snapshot is not None:
                    viewer.wake.set()
        finally:
            self.viewers.discard(viewer)
            sender.cancel()
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, code: str, message: str, close: int) -> None:
        if ws.closed:
            return
        try:
            await ws.send_str(_json.encode({"type": "error", "error": code, "message": message}).decode())
            await ws.close(code=close, message=code.encode())
        except (ConnectionError, RuntimeError):
            pass  # the page went away first

    async def _send(self, viewer: _Viewer) -> None:
        ws = viewer.ws
        server = self.server
        clock = asyncio.get_running_loop().time
        queried = -LIVE_QUERY_INTERVAL  # loop time of this stream's last query
        while not ws.closed:
            await viewer.wake.wait()
            early = queried + LIVE_QUERY_INTERVAL - clock()
            if early > 0:
                # too soon after the last query: what comes meanwhile (new queries, a tick)
                # only updates the viewer, and one query answers it all
                await asyncio.sleep(early)
            viewer.wake.clear()
            snapshot = self.snapshot
            if snapshot is None:
                continue
            transport = viewer.transport
            if transport is not None and transport.get_write_buffer_size() > LIVE_BACKLOG:
                continue  # this page is not reading: it gets the next tick it can take
            q = viewer.query
            now = server.loop.time() if server.loop else time.monotonic()
            queried = clock()
            rows, total = run_query(server, q, now)
            page = {"rows": rows, "total": total, "offset": q.offset, "limit": q.limit, "state": q.state, "sort": q.sort,
                    "order": "desc" if q.descending else "asc"}
            if viewer.page_error:
                page["error"] = viewer.page_error
            try:
                await ws.send_str(_json.encode({**snapshot, "conns": page}).decode())
            except (ConnectionError, RuntimeError):
                return

    async def _tick(self) -> None:
        server = self.server
        try:
            while self.viewers:
                snapshot: dict[str, Any] = {"type": "tick", "t": round(time.time(), 3), "node": node_info(server), "totals": totals(server)}
                snapshot["totals"]["loop_lag"] = round(server.loop_lag.take_peak(), 6)
                live = getattr(server.app, "live", None)
                if live is not None:
                    try:
                        snapshot["app"] = await asyncio.wait_for(live(server), LIVE_APP_TIMEOUT)
                    except asyncio.TimeoutError:
                        snapshot["app_error"] = f"the app's part took longer than {LIVE_APP_TIMEOUT} s"
                    except Exception as exc:  # a broker error: the page says so, the stream goes on
                        snapshot["app_error"] = str(exc) or type(exc).__name__
                self.snapshot = snapshot
                for viewer in list(self.viewers):
                    viewer.wake.set()
                await asyncio.sleep(LIVE_INTERVAL)
        finally:
            self._task = None
            self.snapshot = None

    async def close(self) -> None:
        for viewer in list(self.viewers):
            await viewer.ws.close(code=1001, message=b"server stopping")
        if self._task is not None:
            self._task.cancel()
