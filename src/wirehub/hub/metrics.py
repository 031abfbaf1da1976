"""The hub's metrics and the dashboard's view of it: counters the frame path bumps (plain
integers, exported at scrape time), broker call timings, and the nodes sharing a broker.

Nothing here is per room or per client: label values come from fixed sets (outcomes, reasons,
error codes, broker operations), so ``/metrics`` stays the same size whatever clients do.

Nodes: with a remote broker each node (process) sends a small heartbeat every
:data:`NODE_HEARTBEAT_S` seconds as a room event on :data:`NODES_ROOM` (no history, nothing
stored in the broker); every node hears all of them. A node not heard from for
:data:`NODE_DOWN_S` is shown as down, and forgotten after :data:`NODE_FORGET_S`. With the
memory broker there is no other node to hear: the dashboard shows this node and says so.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import heapq
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Iterable

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .._log import get_logger
from .broker import BrokerError

if TYPE_CHECKING:
    from ..server.server import Server
    from .app import HubApp

log = get_logger("wirehub.hub")

#: the room whose events carry node heartbeats (never stored; a client may join a room of
#: this name, but heartbeats are not delivered to it)
NODES_ROOM = "$wirehub.nodes"
NODE_HEARTBEAT_S = 1.0
NODE_DOWN_S = 5.0
NODE_FORGET_S = 60.0
#: nodes remembered at most (heartbeats from more are ignored)
MAX_NODES = 256
#: rooms one tick of the dashboard describes (the busiest here by members)
LIVE_ROOMS = 20
HEARTBEAT_PREFIX = b'{"op":"node",'

#: broker operations timed (a remote broker's; client publications are pipelined and timed
#: by the heartbeat's round trip instead, not one by one)
TIMED_OPS = (
    "subscribe", "unsubscribe", "publish", "room_event", "history", "position", "presence",
    "presence_count", "presence_add", "presence_remove", "add_client", "remove_client", "send", "rooms",
)
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RECOVERY_OUTCOMES = ("recovered", "not_in_history", "epoch_changed")
AUTH_REASONS = ("missing", "malformed", "algorithm", "signature", "expired", "not_yet_valid", "claims", "wrong_user", "invalid")


class HubStats:
    """Counters the hub bumps as things happen: plain integers (one attribute increment on
    the frame path), read at scrape time."""

    __slots__ = ("counted", "frames", "pub_refused", "pub_failed", "joins", "leaves", "recoveries", "auth_failures", "errors")

    def __init__(self) -> None:
        self.counted = 0  # publications accepted by the broker, but those ``frames`` counts
        #: the hub's compiled frame handler (hub/_frames.py), which counts the publications
        #: it makes itself (a C integer there, not an attribute of this object)
        self.frames: Any = None
        self.pub_refused = 0  # refused before the broker: the client was told why (see errors)
        self.pub_failed = 0  # the broker failed it, or a server bug
        self.joins = 0
        self.leaves = 0
        self.recoveries = dict.fromkeys(RECOVERY_OUTCOMES, 0)
        self.auth_failures = dict.fromkeys(AUTH_REASONS, 0)
        self.errors: dict[str, int] = {}  # error frames sent, by code (codes come from server code only)

    @property
    def published(self) -> int:
        """Publications accepted by the broker (clients' and backends')."""
        return self.counted + (self.frames.published if self.frames is not None else 0)


class Timings:
    """A histogram per broker operation, kept as bucket counts."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, op: str, seconds: float) -> None:
        counts = self.counts.get(op)
        if counts is None:
            counts = self.counts[op] = [0] * (len(LATENCY_BOUNDS) + 1)
            self.sums[op] = 0.0
        counts[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.sums[op] += seconds


def _timed(method: Any, op: str, timings: Timings) -> Any:
    clock = time.perf_counter

    @functools.wraps(method)
    async def call(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return await method(*args, **kwargs)
        finally:
            timings.observe(op, clock() - start)

    return call


class Node(msgspec.Struct):
    node: str
    host: str = ""
    pid: int = 0
    connections: int = 0
    by_transport: dict[str, int] = {}
    rooms: int = 0
    draining: bool = False
    ts: int = 0


_node_decoder = msgspec.json.Decoder(Node)


class Telemetry:
    """The hub's stats, broker timings and node table."""

    def __init__(self, hub: HubApp) -> None:
        self.hub = hub
        self.stats = hub.stats
        self.timings = Timings()
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"
        #: node id -> (its last heartbeat, when it was heard, loop time)
        self.nodes: dict[str, tuple[Node, float]] = {}
        self.heartbeat_rtt: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._full_logged = False
        self.server: Server | None = None

    @property
    def remote(self) -> bool:
        return not self.hub.broker.local

    def start(self, server: Server) -> None:
        self.server = server
        broker = self.hub.broker
        if not self.remote:
            return
        for op in TIMED_OPS:
            method = getattr(broker, op, None)
            if method is not None:
                setattr(broker, op, _timed(method, op, self.timings))
        self._task = asyncio.ensure_future(self._heartbeats())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    def _beat(self) -> bytes:
        server = self.server
        by: dict[str, int] = {}
        if server is not None:
            for conn in server.registry:
                by[conn.transport] = by.get(conn.transport, 0) + 1
        node = Node(
            node=self.node_id, host=socket.gethostname(), pid=os.getpid(), connections=sum(by.values()), by_transport=by,
            rooms=len(self.hub.rooms), draining=bool(server and server.draining), ts=int(time.time() * 1000),
        )
        return HEARTBEAT_PREFIX + msgspec.json.encode(node)[1:]

    async def _heartbeats(self) -> None:
        broker = self.hub.broker
        subscribed = False
        subscribed_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                own = self.nodes.get(self.node_id)
                now = time.monotonic()
                if subscribed and now - subscribed_at > NODE_DOWN_S and (own is None or now - own[1] > NODE_DOWN_S):
                    subscribed = False  # our own heartbeats stopped coming back: subscribe again
                if not subscribed:
                    await broker.subscribe(NODES_ROOM)
                    subscribed, subscribed_at = True, time.monotonic()
                start = loop.time()
                await broker.room_event(NODES_ROOM, self._beat())
                self.heartbeat_rtt = loop.time() - start
            except BrokerError as exc:
                log.debug("node_heartbeat_failed", error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node_heartbeat_failed")
            await asyncio.sleep(NODE_HEARTBEAT_S)

    def heard(self, frame: bytes) -> None:
        """A heartbeat came through the broker (this node's own included)."""
        try:
            node = _node_decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        now = time.monotonic()
        if node.node not in self.nodes and len(self.nodes) >= MAX_NODES:
            self._forget(now)
            if len(self.nodes) >= MAX_NODES:
                if not self._full_logged:
                    log.warning("too_many_nodes", max_nodes=MAX_NODES)
                    self._full_logged = True
                return
        self.nodes[node.node] = (node, now)

    def _forget(self, now: float) -> None:
        for key, (_, seen) in list(self.nodes.items()):
            if now - seen > NODE_FORGET_S:
                del self.nodes[key]

    def node_rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        self._forget(now)
        rows = []
        for node, seen in self.nodes.values():
            age = now - seen
            rows.append({
                "node": node.node, "host": node.host, "pid": node.pid, "connections": node.connections,
                "by_transport": node.by_transport, "rooms": node.rooms, "draining": node.draining,
                "up": age <= NODE_DOWN_S, "seen_s": round(age, 1), "self": node.node == self.node_id,
            })
        rows.sort(key=lambda r: r["node"])
        return rows

    # ------------------------------------------------------------------ /metrics

    def collect(self) -> Iterable[Any]:
        hub, stats = self.hub, self.stats
        table = hub._room_table  # noqa: SLF001
        yield GaugeMetricFamily("wirehub_hub_rooms", "Rooms with members on this node.", value=len(hub.rooms))
        if table is not None:
            yield GaugeMetricFamily("wirehub_hub_rooms_held", "Rooms the memory broker holds (with history or members).", value=len(table))
        yield GaugeMetricFamily("wirehub_hub_members", "Room memberships of this node's connections.", value=sum(len(r.members) for r in hub.rooms.values()))
        yield GaugeMetricFamily("wirehub_hub_sessions", "Hub sessions (connections the hub knows).", value=len(hub.sessions))
        pubs = CounterMetricFamily("wirehub_hub_publications", "Publications from this node, by outcome.", labels=["outcome"])
        pubs.add_metric(["published"], stats.published)
        pubs.add_metric(["refused"], stats.pub_refused)
        pubs.add_metric(["failed"], stats.pub_failed)
        yield pubs
        yield CounterMetricFamily("wirehub_hub_joins", "Room joins.", value=stats.joins)
        yield CounterMetricFamily("wirehub_hub_leaves", "Room leaves (a disconnect leaves every room).", value=stats.leaves)
        rec = CounterMetricFamily("wirehub_hub_recoveries", "Joins with since: recovered, or not and why.", labels=["outcome"])
        for outcome, n in stats.recoveries.items():
            rec.add_metric([outcome], n)
        yield rec
        auth = CounterMetricFamily("wirehub_hub_auth_failures", "Tokens refused, by reason.", labels=["reason"])
        for reason, n in stats.auth_failures.items():
            auth.add_metric([reason], n)
        yield auth
        errors = CounterMetricFamily("wirehub_hub_errors_sent", "Error frames sent to clients, by code.", labels=["code"])
        for code, n in sorted(stats.errors.items()):
            errors.add_metric([code], n)
        yield errors
        broker = hub.broker
        yield GaugeMetricFamily("wirehub_broker_up", "1 while the broker is reachable.", value=1 if broker.ready() else 0)
        yield GaugeMetricFamily("wirehub_broker_in_flight", "Publications sent to the broker and not yet answered.", value=getattr(broker, "in_flight", 0))
        h = HistogramMetricFamily("wirehub_broker_call_seconds", "Remote broker calls, by operation.", labels=["op"])
        edges = [repr(float(b)) for b in LATENCY_BOUNDS] + ["+Inf"]
        for op in sorted(self.timings.counts):
            running, cumulative = 0, []
            for n in self.timings.counts[op]:
                running += n
                cumulative.append(running)
            h.add_metric([op], buckets=list(zip(edges, cumulative)), sum_value=self.timings.sums[op])
        yield h
        if self.remote:
            nodes = self.node_rows()
            yield GaugeMetricFamily("wirehub_nodes_up", "Nodes heard from through the broker within NODE_DOWN_S (this one included).", value=sum(1 for n in nodes if n["up"]))

    # ------------------------------------------------------------------ the dashboard

    async def live(self, server: Server) -> dict[str, Any]:
        """The hub's part of a dashboard tick: counters, the busiest rooms here, the nodes."""
        hub, stats = self.hub, self.stats
        rooms = hub.rooms
        names = [r.name for r in heapq.nlargest(LIVE_ROOMS, rooms.values(), key=lambda r: len(r.members))]
        table = hub._room_table  # noqa: SLF001
        if len(names) < LIVE_ROOMS and table is not None:
            for name in table:
                if name not in rooms:
                    names.append(name)
                    if len(names) >= LIVE_ROOMS:
                        break
        broker = hub.broker

        async def describe(name: str) -> dict[str, Any]:
            held = await broker.history(name, history=hub.policy(name).history)  # its position too
            room = rooms.get(name)
            return {"room": name, "members": len(room.members) if room else 0, "seq": held.position.seq,
                    "epoch": held.position.epoch, "history_size": len(held.publications)}

        room_rows = list(await asyncio.gather(*(describe(n) for n in names)))
        scheme = hub.config.broker.split(":", 1)[0]
        if self.remote:
            nodes = self.node_rows()
            note = f"nodes heard through the {scheme}:// broker (a heartbeat every {NODE_HEARTBEAT_S:g} s; down after {NODE_DOWN_S:g} s of silence)"
        else:
            by: dict[str, int] = {}
            for conn in server.registry:
                by[conn.transport] = by.get(conn.transport, 0) + 1
            nodes = [{"node": self.node_id, "host": socket.gethostname(), "pid": os.getpid(), "connections": len(server.registry),
                      "by_transport": by, "rooms": len(rooms), "draining": server.draining, "up": True, "seen_s": 0.0, "self": True}]
            note = f"{scheme}:// broker: this node only (no other node shares its rooms)"
        return {
            "rooms": room_rows,
            "rooms_total": len(table) if table is not None else len(rooms),
            "members": sum(len(r.members) for r in rooms.values()),
            "published": stats.published,
            "pub_refused": stats.pub_refused,
            "pub_failed": stats.pub_failed,
            "joins": stats.joins,
            "leaves": stats.leaves,
            "broker": {"scheme": scheme, "up": broker.ready(), "in_flight": getattr(broker, "in_flight", 0),
                       "heartbeat_rtt": None if self.heartbeat_rtt is None else round(self.heartbeat_rtt, 6)},
            "nodes": nodes,
            "nodes_note": note,
            "node": self.node_id,
        }
