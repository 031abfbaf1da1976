"""The admin HTTP API (aiohttp, in the server's own event loop).

Framework routes: the dashboard (``GET /`` and its assets, and its live stream
``/api/live``), health, readiness, the connection list and its queries (:mod:`.query`),
disconnecting one connection, draining the node, and Prometheus metrics. An app adds its own
routes (the hub adds rooms) with its ``admin`` hook, and its own metrics with
``collect_metrics()``. With ``admin_token`` set, every route but the health probes and the
page's static files requires ``Authorization: Bearer TOKEN``; the live stream takes the
token as its first message instead. A client in a ``deny`` network gets 403 on every route.
Lists are paged (``offset``, ``limit``; :func:`page_of`), the total in ``X-Total-Count``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from typing import TYPE_CHECKING, Any, Iterable

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .._log import get_logger
from .._version import __version__
from .live import LiveFeed
from .query import PAGE_DEFAULT, PAGE_MAX, QueryError, describe_connection, parse_query, run_query, whole_number  # noqa: F401 (describe_connection: re-exported)

if TYPE_CHECKING:
    from .listeners import Endpoint
    from .server import Server

log = get_logger("wirehub.admin")

_json = msgspec.json.Encoder()
#: routes open without the token: the probes, the page and its assets (they hold no data;
#: the page asks for the token), and the live stream (it checks the token itself)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/api/live"})
ASSET_PREFIX = "/dashboard/"
SERVER_KEY = web.AppKey("wirehub_server", object)
TOTAL_HEADER = "X-Total-Count"
DASHBOARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".txt": "text/plain"}
#: the page loads nothing from elsewhere and runs no inline script
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(data), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": code, "message": message}, status)


def page_of(request: web.Request) -> tuple[int, int] | web.Response:
    """``(offset, limit)`` from the query (defaults 0 and :data:`PAGE_DEFAULT`), or the 400
    response that says which value is wrong (:func:`.query.whole_number`)."""
    try:
        return whole_number(request.query, "offset", 0), whole_number(request.query, "limit", PAGE_DEFAULT, PAGE_MAX)
    except QueryError as exc:
        return error_response(400, "bad_request", str(exc))


def paged(rows: list[Any], total: int) -> web.Response:
    response = json_response(rows)
    response.headers[TOTAL_HEADER] = str(total)
    return response


class _Collector:
    """Computes the server's metrics at scrape time from the registry (nothing is counted
    twice on the hot path)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterable[Any]:
        server = self.server
        conns = server.connections()
        by_transport: dict[str, int] = {}
        totals = dict(server.registry.closed_totals)
        for conn in conns:
            by_transport[conn.transport] = by_transport.get(conn.transport, 0) + 1
            totals["bytes_in"] += conn.bytes_in
            totals["bytes_out"] += conn.bytes_out
            totals["frames_in"] += conn.frames_in
            totals["frames_out"] += conn.frames_out
            totals["frames_dropped"] += conn.frames_dropped
        g = GaugeMetricFamily("wirehub_connections", "Open connections.", labels=["transport"])
        for transport, n in sorted(by_transport.items()):
            g.add_metric([transport], n)
        yield g
        yield CounterMetricFamily("wirehub_connections_accepted", "Connections accepted.", value=server.registry.accepted_total)
        refused = CounterMetricFamily("wirehub_connections_refused", "Connections refused at accept, by reason.", labels=["reason"])
        for reason, n in sorted(server.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        closed = CounterMetricFamily("wirehub_connections_closed", "Connections closed, by reason.", labels=["reason"])
        for reason, n in sorted(server.registry.closed_reasons.items()):
            closed.add_metric([reason], n)
        yield closed
        for key, help_text in (
            ("bytes_in", "Bytes received."),
            ("bytes_out", "Bytes sent."),
            ("frames_in", "Frames received."),
            ("frames_out", "Frames sent."),
            ("frames_dropped", "Frames dropped by the drop_oldest slow-consumer policy or at close."),
        ):
            yield CounterMetricFamily(f"wirehub_{key}", help_text, value=totals[key])
        yield GaugeMetricFamily("wirehub_send_buffer_bytes", "Bytes queued to all peers.", value=sum(c.send_buffer for c in conns))
        lag = server.loop_lag
        yield GaugeMetricFamily("wirehub_event_loop_lag_last_seconds", "Latest event-loop lag sample.", value=lag.last)
        h = HistogramMetricFamily("wirehub_event_loop_lag_seconds", "How late the event loop ran a timer, sampled every 0.25 s.")
        edges = [repr(float(b)) for b in lag.bounds] + ["+Inf"]
        h.add_metric([], buckets=list(zip(edges, lag.cumulative())), sum_value=lag.total)
        yield h
        yield GaugeMetricFamily("wirehub_draining", "1 while the server drains.", value=1 if server.draining else 0)
        app_metrics = getattr(server.app, "collect_metrics", None)
        if app_metrics is not None:
            yield from app_metrics()
        if server.datagram_endpoints:
            udp = CounterMetricFamily(
                "wirehub_udp_unvalidated_datagrams",
                "UDP datagrams from addresses without a session, by what became of them.",
                labels=["outcome"],
            )
            outcomes: dict[str, int] = {}
            for endpoint in server.datagram_endpoints:
                for outcome, n in endpoint.stats.items():
                    outcomes[outcome] = outcomes.get(outcome, 0) + n
            for outcome in ("challenged", "validated", "replied", "refused", "dropped"):
                udp.add_metric([outcome], outcomes.get(outcome, 0))
            yield udp
            yield CounterMetricFamily(
                "wirehub_udp_over_budget_frames",
                "Frames not sent to an unvalidated UDP session: they would have exceeded 3x the bytes it sent.",
                value=outcomes.get("over_budget", 0),
            )


class AdminServer:
    """Serves the admin routes on already-bound sockets."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.token = server.config.admin_token
        self._deny = tuple(server.config.deny)
        # a request body is read whole: the hub's publish takes up to max_frame
        self.web = web.Application(middlewares=[self._denied, self._auth], client_max_size=max(1 << 20, server.config.max_frame + 4096))
        self.web[SERVER_KEY] = server
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(_Collector(server))  # type: ignore[arg-type]
        self.live = LiveFeed(server, self.token)
        self._assets = self._load_assets()
        self.web.router.add_get("/", self.dashboard)
        self.web.router.add_get(ASSET_PREFIX + "{name}", self.asset)
        self.web.router.add_get("/api/live", self.live.handle)
        self.web.router.add_post("/api/drain", self.drain)
        self.web.router.add_get("/healthz", self.healthz)
        self.web.router.add_get("/readyz", self.readyz)
        self.web.router.add_get("/metrics", self.prometheus)
        self.web.router.add_get("/api/connections", self.list_connections)
        self.web.router.add_delete("/api/connections/{id}", self.delete_connection)
        hook = getattr(server.app, "admin", None)
        if hook is not None:
            hook(self.web, server)
        self._runner: web.AppRunner | None = None

    @web.middleware
    async def _denied(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The deny list holds here too (the allow list does not: it names the clients of
        the listeners, and would lock out an operator on loopback)."""
        if self._deny:
            peer = request.transport.get_extra_info("peername") if request.transport is not None else None
            ip = peer[0] if isinstance(peer, tuple) else None
            try:
                addr = ipaddress.ip_address(ip) if ip else None
            except ValueError:
                addr = None
            if addr is not None and any(addr in net for net in self._deny):
                log.info("refused", reason="denied", peer=ip, listener="admin")
                self.server.refused["denied"] = self.server.refused.get("denied", 0) + 1
                response = error_response(403, "denied", "this address is in the server's deny list")
                response.force_close()
                return response
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token and request.path not in PUBLIC_PATHS and not request.path.startswith(ASSET_PREFIX):
            header = request.headers.get("Authorization", "")
            given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return error_response(401, "unauthorized", "send Authorization: Bearer <admin_token>")
        return await handler(request)

    async def start(self, endpoints: list[Endpoint]) -> None:
        self._runner = web.AppRunner(self.web, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        for ep in endpoints:
            await web.SockSite(self._runner, ep.sock).start()

    async def close(self) -> None:
        await self.live.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # routes -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "server": f"wirehub/{__version__}"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, why = self.server.readiness()
        return json_response({"ready": ready, "reason": why}, 200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    @staticmethod
    def _load_assets() -> dict[str, tuple[bytes, str]]:
        """The page's files, read once (they ship in the package; nothing comes from a CDN)."""
        assets: dict[str, tuple[bytes, str]] = {}
        if os.path.isdir(DASHBOARD_DIR):
            for name in os.listdir(DASHBOARD_DIR):
                kind = _TYPES.get(os.path.splitext(name)[1])
                if kind is not None:
                    with open(os.path.join(DASHBOARD_DIR, name), "rb") as f:
                        assets[name] = (f.read(), kind)
        return assets

    def _asset_response(self, name: str) -> web.Response:
        found = self._assets.get(name)
        if found is None:
            return error_response(404, "not_found", f"the dashboard has no file {name!r}")
        body, kind = found
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=PAGE_HEADERS)

    async def dashboard(self, request: web.Request) -> web.Response:
        return self._asset_response("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        return self._asset_response(request.match_info["name"])

    async def drain(self, request: web.Request) -> web.Response:
        """Drain this node as SIGTERM would: stop accepting, bye shutdown to everyone, exit."""
        already = self.server.draining
        log.warning("drain_requested", via="admin", peer=request.remote, connections=len(self.server.registry))
        self.server.request_stop()
        return json_response({"draining": True, "already": already, "connections": len(self.server.registry)}, 202)

    async def list_connections(self, request: web.Request) -> web.Response:
        """Connections, one page: open ones oldest first unless ``sort``/``order`` say
        otherwise, filtered by ``transport``, ``user``, ``room``, ``peer``; ``state=closed``
        for those that closed recently (:mod:`wirehub.server.query`)."""
        try:
            query = parse_query(request.query)
        except QueryError as exc:
            return error_response(400, "bad_request", str(exc))
        now = self.server.loop.time() if self.server.loop else time.monotonic()
        rows, total = run_query(self.server, query, now)
        return paged(rows, total)

    async def delete_connection(self, request: web.Request) -> web.Response:
        conn_id = request.match_info["id"]
        if not self.server.disconnect(conn_id):
            return error_response(404, "no_such_connection", f"no open connection has id {conn_id!r}; GET /api/connections lists them")
        return json_response({"id": conn_id, "disconnected": True})
