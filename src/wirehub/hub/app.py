"""The hub: rooms, presence, history with recovery, direct messages and token auth, as an
ordinary :class:`wirehub.App`.

Every transport the framework serves (TCP, TLS, Unix, WebSocket, UDP) speaks the same JSON
protocol (:mod:`wirehub.hub.protocol`). The hub keeps only this node's view — which local
connections are in which room — and asks its broker for everything shared: sequence
numbers, history, presence and delivery to other nodes.

With a broker whose calls complete without I/O (``memory://``) every frame is handled inline
as it arrives; with a remote broker the frame handler is ``async`` and the framework runs each
connection's frames in order in a task, pausing reads while it is behind.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import msgspec
from .. import App, Connection, broadcast
from .._log import get_logger
from .._version import __version__
from . import protocol as wire
from .auth import AuthError, Claims, TokenVerifier, glob_match
from .broker import Broker, BrokerError, HistoryPolicy, Member, Publication, create_broker
from .actions import CONTROL, USER_ROOM_PREFIX, Actions
from .frames import PUB_IN_FLIGHT, PUB_WINDOW, SCAN, InlineFrames, PipelinedFrames
from .hooked import HookRunner
from .hooks import Context, Hooks
from .metrics import HEARTBEAT_PREFIX, NODES_ROOM, HubStats, Telemetry
from .presence import FRAME_PREFIXES as PRESENCE_FRAMES, PresenceLevels, RoomPresence
from .protocol import Hello, History, Join, Leave, Ping, Presence, ProtocolError, Pub, Refresh, Rpc, Send

if TYPE_CHECKING:
    from ..config import Config
    from ..server.server import Server

log = get_logger("wirehub.hub")

#: framework close reason -> (bye reason, should the client reconnect)
BYE = {
    "shutdown": ("shutdown", True),
    "idle": ("idle", True),
    "handshake_timeout": ("idle", True),
    "kicked": ("kicked", False),
    "kicked_retry": ("kicked", True),  # a hook's Disconnect(reconnect=True)
    "slow_consumer": ("slow_consumer", True),
    "auth_expired": ("auth_expired", True),
    "too_many_errors": ("too_many_errors", False),
    "protocol": ("protocol", False),
    "handler_error": ("protocol", True),
}

ERROR_WINDOW_S = 60.0
POLICY_CACHE = 10_000  # rooms whose resolved settings are remembered
#: tracebacks of failed ops logged per minute by one process; the rest are counted and
#: reported in one line (a client able to trigger a server bug cannot flood the log)
TRACEBACK_BUDGET = 10


class LogBudget:
    """At most ``limit`` records per ``window`` seconds; those refused are counted and logged
    as one ``suppressed`` line when the next window opens."""

    __slots__ = ("limit", "window", "event", "_since", "_used", "_suppressed")

    def __init__(self, limit: int, window: float, event: str) -> None:
        self.limit, self.window, self.event = limit, window, event
        self._since = 0.0
        self._used = self._suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._since >= self.window:
            if self._suppressed:
                log.error(self.event + "_suppressed", count=self._suppressed, window_s=self.window)
            self._since, self._used, self._suppressed = now, 0, 0
        if self._used < self.limit:
            self._used += 1
            return True
        self._suppressed += 1
        return False


_tracebacks = LogBudget(TRACEBACK_BUDGET, 60.0, "hub_op_failed")
HELD_OVERHEAD = 160  # bytes a held publication costs beyond its data


@dataclass(frozen=True, slots=True)
class RoomPolicy:
    """What applies to one room: its history, whether presence is tracked, its size limit,
    and the sizes at which its presence changes mode (hub/presence.py)."""

    history: HistoryPolicy
    presence: bool
    max_members: int
    presence_levels: PresenceLevels = PresenceLevels()


class Session:
    """The hub's state for one connection."""

    __slots__ = (
        "conn",
        "client",
        "client_json",
        "user",
        "name",
        "claims",
        "greeted",
        "rooms",
        "joining",
        "errors",
        "errors_since",
        "tokens",
        "tokens_at",
        "expiry",
        "publishing",
        "held",
        "ctx",
        "info",
        "room_info",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.client = conn.id
        self.client_json = wire.json_str(conn.id)
        self.user = "anon-" + conn.id
        self.name: str | None = None
        self.claims: Claims | None = None
        self.greeted = False
        self.rooms: set[str] = set()
        #: rooms whose join is in progress: live publications and room events wait here
        #: until the join reply and the replay are out
        self.joining: dict[str, list[Publication | bytes]] = {}
        self.errors = 0
        self.errors_since = 0.0
        self.tokens = 0.0
        self.tokens_at = 0.0
        self.expiry: Any = None
        #: this connection's publications in flight at a remote broker, oldest first (None
        #: when there are none): its other frames wait for them, so replies keep their order
        #: (see hub/_frames.py, PipelinedFrames: (future, the pub or its ref's bytes or (reply,), k))
        self.publishing: collections.deque[tuple[asyncio.Future[Any], Pub | bytes | tuple[bytes], int]] | None = None
        #: bytes of the replies waiting in ``publishing`` for the acks before them: counted
        #: with the send buffer against max_send_buffer (see HubApp._error)
        self.held = 0
        #: application hooks: their view of this connection (made on the first hook call),
        #: the info on_connect set, and the info on_join set per room
        self.ctx: Context | None = None
        self.info: Any = msgspec.UNSET
        self.room_info: dict[str, Any] | None = None

    def member(self, room: str | None = None) -> Member:
        info = self.info
        if self.room_info is not None and room in self.room_info:
            info = self.room_info[room]
        return Member(client=self.client, user=self.user, name=self.name, info=info)

    def end_join(self, room: str) -> list[Publication | bytes]:
        """The frames held while joining ``room``; the room is no longer joining."""
        held = self.joining.pop(room, [])
        if not self.joining:
            self.joining = {}  # a dict does not shrink: an empty one costs 64 bytes, a used one 232
        return held


class _Held(list):
    """What a member gets once its join is done: live publications and presence events that
    came while the join reply and the replay were being sent. Bounded like a send buffer:
    past ``limit`` bytes the connection is closed as a slow consumer (``bye`` with
    ``reconnect:true``; it recovers from where it got to)."""

    __slots__ = ("conn", "size", "limit")

    def __init__(self, conn: Connection, limit: int) -> None:
        super().__init__()
        self.conn = conn
        self.size = 0
        self.limit = limit

    def append(self, item: Publication | bytes) -> None:  # type: ignore[override]
        if self.size > self.limit:
            return  # closing already
        self.size += len(item) if type(item) is bytes else len(item.data) + HELD_OVERHEAD  # type: ignore[union-attr]
        super().append(item)
        if self.size > self.limit:
            log.info("slow_consumer", conn=self.conn.id, peer=self.conn.peer, held=self.size, during="join")
            self.conn.close("slow_consumer")


class Room:
    """This node's members of one room."""

    __slots__ = ("name", "name_json", "members", "_targets")

    def __init__(self, name: str) -> None:
        self.name = name
        self.name_json = wire.json_str(name)
        self.members: dict[str, Session] = {}
        self._targets: tuple[list[Connection], list[Session]] | None = None

    def changed(self) -> None:
        """A member came, went, or finished joining: rebuild the targets on the next send."""
        self._targets = None

    def targets(self) -> tuple[list[Connection], list[Session]]:
        """The connections of the members a frame goes to now, grouped by framing (for
        :func:`broadcast`), and the members still joining (their frames wait)."""
        targets = self._targets
        if targets is None:
            ready: list[Session] = []
            waiting: list[Session] = []
            for s in self.members.values():
                (waiting if self.name in s.joining else ready).append(s)
            ready.sort(key=lambda s: id(s.conn.encode))
            targets = self._targets = ([s.conn for s in ready], waiting)
        return targets


def _drive(coro: Awaitable[Any]) -> Any:
    """Run a coroutine that never suspends (calls into a local broker) to completion now."""
    try:
        coro.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return done.value
    coro.close()  # type: ignore[attr-defined]
    raise RuntimeError("a local broker call suspended; brokers with I/O must set local = False")


class HubApp(App):
    """The real-time hub as a framework app. ``wirehub serve`` runs it; :class:`wirehub.hub.Hub`
    embeds it."""

    def __init__(self, config: Config, broker: Broker | None = None, hooks: Hooks | None = None) -> None:
        super().__init__(framing="line", name="hub")
        self.config = config
        #: the application's hooks (docs/hub.md); registered until the server starts
        self.hooks = hooks if hooks is not None else Hooks()
        self._runner: HookRunner | None = None
        #: the server's actions (publish, send, join, disconnect...): hooks' ctx.hub, Hub's
        self.actions = Actions(self)
        #: whether connections are tracked by user (for send/disconnect by user): with hooks,
        #: or embedded
        self.route_users = False
        self.broker: Broker = broker if broker is not None else create_broker(config.broker, history_max_bytes=config.history_max_bytes)
        #: a broker that keeps rooms in this process (memory) shows them here: they count
        #: toward max_rooms with the joined ones, and a publish may create one
        self._room_table: Any = getattr(self.broker, "rooms_held", None)
        #: join replays still being paced by the client's reading
        self._replays: set[asyncio.Task[None]] = set()
        #: bytes of replay a join puts into the send buffer before waiting for it to drain
        self._replay_window = max(1, config.max_send_buffer // 2)
        #: the frames replayed in this event-loop turn, by (room, epoch, seq): the joins of
        #: one turn that replay the same publications (whether the broker hands them the
        #: same objects, as Redis's shared read does, or makes them per read, as the memory
        #: broker does) have each encoded once, and their send buffers share one bytes
        #: object. Emptied after the turn.
        self._replayed: dict[tuple[str, str, int], bytes] = {}
        self.default_policy = RoomPolicy(
            HistoryPolicy(size=config.history_size, ttl=config.history_ttl), config.presence, config.max_room_members,
            PresenceLevels(config.presence_threshold, config.presence_max, config.presence_window),
        )
        #: which presence frames each room's members get, by its size (hub/presence.py)
        self.presence = RoomPresence(self, _drive)
        self._policies: dict[str, RoomPolicy] = {}
        self.verifier: TokenVerifier | None = None
        if config.token_algorithm != "hs256":
            with open(config.public_key, "rb") as f:  # type: ignore[arg-type]  (config requires it)
                self.verifier = TokenVerifier(public_key=f.read(), algorithms=(config.token_algorithm.upper(),))
        elif config.secret:
            self.verifier = TokenVerifier(secret=config.secret, algorithms=("HS256",))
        self.rooms: dict[str, Room] = {}
        self.sessions: dict[str, Session] = {}
        self.server: Server | None = None
        #: counters for /metrics and the dashboard (plain integers; hub/metrics.py)
        self.stats = HubStats()
        self.telemetry = Telemetry(self)
        #: True when frames before a successful hello are refused (auth, or an on_connect hook)
        self._gate = self.verifier is not None
        self._rate = config.rate_limit
        self._heartbeat = int(config.heartbeat) if config.heartbeat == int(config.heartbeat) else config.heartbeat
        self._ops: dict[type, Callable[[Session, Any], Awaitable[None]]] = {
            Hello: self._hello,
            Join: self._join,
            Leave: self._leave,
            Send: self._send,
            Presence: self._presence,
            History: self._history,
            Refresh: self._refresh,
            Rpc: self._rpc,
        }

    def policy(self, room: str) -> RoomPolicy:
        """The settings of ``room``: the first ``rooms`` pattern it matches, over the globals."""
        policy = self._policies.get(room)
        if policy is None:
            policy = self.default_policy
            for pattern, overrides in self.config.rooms:
                if glob_match(pattern, room):
                    values = dict(overrides)
                    history = HistoryPolicy(
                        size=values.get("history_size", policy.history.size), ttl=values.get("history_ttl", policy.history.ttl)
                    )
                    old = policy.presence_levels
                    levels = PresenceLevels(
                        values.get("presence_threshold", old.threshold), values.get("presence_max", old.max), values.get("presence_window", old.window)
                    )
                    policy = RoomPolicy(history, values.get("presence", policy.presence), values.get("max_room_members", policy.max_members), levels)
                    break
            if len(self._policies) >= POLICY_CACHE:
                self._policies.clear()
            self._policies[room] = policy
        return policy

    # ------------------------------------------------------------------ framework hooks

    def handlers(self):  # type: ignore[override]
        # A local broker answers at once: handle frames inline. Otherwise let the framework
        # run each connection's frames in order in a task.
        hooks = self.hooks
        if hooks:
            runner = self._runner = HookRunner(self, hooks)
            hooks.bind(self.actions)
            self.route_users = True
            # pub goes through the hooks' path (rooms without an on_publish hook fall back)
            self._pub_local = runner.pub_local  # type: ignore[method-assign]
            self._pub_pipelined = runner.pub_pipelined  # type: ignore[method-assign]
        self._gate = self.verifier is not None or hooks.single["connect"] is not None
        if not self._gate and not self.config.rate_limit:
            # no auth and no rate limit: a bare ping needs no session, the server answers it
            self.replies[wire.PING] = wire.PONG
        # A hook that awaits (async, or blocking in the pool) needs the task too.
        local = self.broker.local and not hooks.need_task
        self.connect = self._connect_inline if local else self._connect_async  # type: ignore[method-assign]
        # (with a remote broker, connect is async: the framework runs each connection's frames
        # in a task, and awaits what the frame handler returns: hub/_frames.py)
        self._pipelined = PipelinedFrames(self, scan=SCAN)
        self.frame = self._frame_inline if local else self._pipelined.frame  # type: ignore[method-assign]
        self._frames = InlineFrames(self, scan=SCAN)
        stats = self.stats
        if stats.frames is not None:  # handlers() again: what the last one counted stays counted
            stats.counted += stats.frames.published
        stats.frames = self._frames  # it counts its own publications
        if local and not hooks and not self.config.rate_limit:
            # ping and pub in the compiled accelerator's code (the rest in _frame_command)
            self.frame = self._frames.frame  # type: ignore[method-assign]
        self.disconnect = self._disconnect_inline if local else self._disconnect_async  # type: ignore[method-assign]
        handlers = super().handlers()
        if self.broker.local:
            handlers.pending = None  # no publication is ever in flight: nothing owed
        return handlers

    async def startup(self, server: Server) -> None:
        self.server = server
        await self.broker.start(self)
        self.telemetry.start(server)

    async def shutdown(self, server: Server) -> None:
        # Connections that just closed may still be leaving their rooms through the broker.
        if self.sessions:
            self._all_gone = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_gone.wait(), server.config.close_timeout)
            except asyncio.TimeoutError:
                log.warning("shutdown_with_sessions", sessions=len(self.sessions))
        for task in list(self._replays):
            task.cancel()
        await self.presence.close(server.config.close_timeout)
        await self.telemetry.stop()
        await self.broker.close()

    _all_gone: asyncio.Event | None = None

    def _new_session(self, conn: Connection) -> Session:
        session = Session(conn)
        conn.idle_timeout = self.config.hello_timeout
        if self._gate:
            # auth on: hello within hello_timeout of connecting, whatever else comes meanwhile
            conn.set_deadline(self.config.hello_timeout)
        self.sessions[session.client] = session
        return session

    def _connect_inline(self, conn: Connection) -> None:
        _drive(self.broker.add_client(self._new_session(conn).client))

    async def _connect_async(self, conn: Connection) -> None:
        session = self._new_session(conn)
        try:
            await self.broker.add_client(session.client)
        except BrokerError as exc:
            log.warning("broker_error", op="add_client", error=str(exc))

    def closing(self, conn: Connection, reason: str) -> None:
        bye_reason, reconnect = BYE.get(reason, (reason, True))
        conn.send(wire.bye(bye_reason, reconnect))

    def frame_error(self, conn: Connection, error: Any) -> None:
        session = self.sessions.get(conn.id)
        if error.fatal or session is None:
            conn.close("protocol")
            return
        self._error(session, error.code, error.message)

    def refusal(self, reason: str) -> bytes:
        return wire.error("limit", f"{reason}: connection refused, the limit is reached; try again later")

    # UDP address validation: a source address gets no session (no history, no room
    # traffic) until it echoed the cookie of a {"op":"challenge"} in a frame. See docs/hub.md.
    def udp_challenge(self, cookie: bytes) -> bytes:
        return wire.challenge(cookie)

    def udp_cookie(self, frame: bytes) -> bytes | None:
        return wire.echoed_cookie(frame)

    def ready(self, server: Server) -> tuple[bool, str]:
        return (True, "ok") if self.broker.ready() else (False, "broker unreachable")

    def describe(self, conn: Connection) -> dict[str, Any]:
        session = self.sessions.get(conn.id)
        if session is None:
            return {"user": None, "rooms": []}
        return {"user": session.user, "name": session.name, "rooms": sorted(session.rooms)}

    def connection_ids(self, *, user: str | None = None, room: str | None = None) -> set[str]:
        """The ids of this node's connections of ``user`` and in ``room`` (admin queries)."""
        ids: set[str] | None = None
        if room is not None:
            found = self.rooms.get(room)
            ids = set(found.members) if found is not None else set()
        if user is not None:
            pool = (self.sessions[i] for i in ids if i in self.sessions) if ids is not None else self.sessions.values()
            ids = {s.client for s in pool if s.user == user}
        return ids if ids is not None else set(self.sessions)

    def admin(self, web_app: Any, server: Server) -> None:
        from .admin import add_routes

        add_routes(web_app, self)

    def collect_metrics(self) -> Any:
        return self.telemetry.collect()

    async def live(self, server: Server) -> dict[str, Any]:
        return await self.telemetry.live(server)

    # ------------------------------------------------------------------ frames

    def _frame_inline(self, conn: Connection, data: bytes) -> None:
        self._frame_command(conn, wire.decode(data))

    def _frame_command(self, conn: Connection, cmd: Any) -> None:
        """A decoded frame, handled inline (a local broker, no hook that awaits)."""
        session: Session = self.sessions[conn.id]
        kind = type(cmd)
        if kind is ProtocolError:
            self._error(session, cmd.code, cmd.message, cmd.ref)
            return
        if self._rate and not self._admit(session, cmd.ref):
            return
        # the hot paths, ping and pub, without a coroutine
        if kind is Ping:
            if not self._gate or session.greeted or not self._needs_hello(session, cmd.ref):
                conn.send(wire.pong(cmd.ref))
            return
        try:
            if kind is Pub:
                self._pub_local(session, cmd)
            else:
                _drive(self._ops[kind](session, cmd))
        except Exception:
            self._failed(session, cmd)

    async def _frame_async(self, session: Session, cmd: Any) -> None:
        if type(cmd) is Pub:
            if self._admit(session, cmd.ref):
                try:
                    await self._pub_pipelined(session, cmd)
                except BrokerError as exc:
                    self._broker_failed(session, cmd.ref, exc)
                except Exception:
                    self._failed(session, cmd)
            return
        if session.publishing:  # replies go out in the order of the frames they answer
            await asyncio.wait(tuple(f for f, *_ in session.publishing))
        if type(cmd) is ProtocolError:
            self._error(session, cmd.code, cmd.message, cmd.ref)
        elif type(cmd) is Ping:
            if self._admit(session, cmd.ref) and not self._needs_hello(session, cmd.ref):
                session.conn.send(wire.pong(cmd.ref))
        elif self._admit(session, cmd.ref):
            try:
                await self._ops[type(cmd)](session, cmd)
            except BrokerError as exc:
                self._broker_failed(session, cmd.ref, exc)
            except Exception:
                self._failed(session, cmd)

    def pending(self, conn: Connection) -> Any:
        """The acks the hub owes ``conn`` once its peer finished: its publications still in
        flight at the broker (the frame handler does not wait for them)."""
        session = self.sessions.get(conn.id)
        if session is None or not session.publishing:
            return None
        return asyncio.wait(tuple(f for f, *_ in session.publishing))

    def _broker_failed(self, session: Session, ref: Any, exc: BrokerError, *, now: bool = False) -> None:
        """The broker failed ``ref``'s request: say so (it does not count toward max_errors)."""
        if exc.maybe_applied:
            why = f"the broker connection failed during this request; it may or may not have taken effect: {exc}"
        else:
            why = f"the broker is unavailable, nothing was done: {exc}"
        # The server's trouble, not the client's: it does not count toward max_errors.
        self._error(session, "internal", why, ref, counts=False, now=now)

    def _failed(self, session: Session, cmd: Any) -> None:
        """A server bug while handling a frame (bad client input is an error reply, never an
        exception). Its traceback is logged within TRACEBACK_BUDGET; the error counts toward
        max_errors, so a client that can trigger it is disconnected like any other."""
        op = type(cmd).__name__.lower()
        if _tracebacks.allow():
            log.exception("hub_op_failed", conn=session.client, op=op)
        self._error(session, "internal", "the server failed to handle this frame; it has been logged", cmd.ref)

    def _admit(self, session: Session, ref: Any) -> bool:
        """Auth gate and rate limit, before any op but hello."""
        rate = self.config.rate_limit
        if rate:
            now = time.monotonic()
            session.tokens = min(2.0 * rate, session.tokens + (now - session.tokens_at) * rate) if session.tokens_at else 2.0 * rate
            session.tokens_at = now
            if session.tokens < 1.0:
                self._error(session, "rate_limited", f"more than {rate} frames per second; slow down", ref)
                return False
            session.tokens -= 1.0
        return True

    def _needs_hello(self, session: Session, ref: Any) -> bool:
        if self._gate and not session.greeted:
            self._error(session, "unauthorized", 'authentication is on: send {"op":"hello","token":...} first', ref)
            return True
        return False

    def _error(self, session: Session, code: str, message: str, ref: Any = None, *, counts: bool = True, now: bool = False) -> None:
        """Send an error reply. Behind publications still in flight it waits for their acks
        (a reply keeps its frame's place), unless ``now``: it answers the publication at the
        front, whose place has come."""
        conn = session.conn
        frame = wire.error(code, message, ref)
        window = session.publishing
        if window and not now:
            # Held replies are bytes for this peer like its send buffer's, and count with it
            # against max_send_buffer: a client that earns errors (uncounted ones too, and
            # each may echo a ref up to max_frame) while its publications wait for a slow
            # broker or hook cannot make the hub hold more for it than a client that does
            # not read. Past it: bye slow_consumer, never a reply dropped from the middle.
            held = session.held + len(frame)
            if held + conn.send_buffer > self.config.max_send_buffer:
                log.info("slow_consumer", conn=session.client, peer=conn.peer, held=held, send_buffer=conn.send_buffer, during="publishing")
                conn.close("slow_consumer")
                return
            session.held = held
            ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            ready.set_result(None)  # (the front's answer sends it: see PipelinedFrames.published)
            window.append((ready, (frame,), -1))
        else:
            conn.send(frame)
        errors = self.stats.errors
        errors[code] = errors.get(code, 0) + 1
        if not counts:
            return
        now = time.monotonic()
        if now - session.errors_since > ERROR_WINDOW_S:
            session.errors_since = now
            session.errors = 0
        session.errors += 1
        if session.errors > self.config.max_errors:
            log.info("too_many_errors", conn=session.client, peer=conn.peer, errors=session.errors)
            conn.close("too_many_errors")

    # ------------------------------------------------------------------ ops

    async def _hello(self, s: Session, cmd: Hello) -> None:
        if s.greeted:
            self._error(s, "bad_frame", "hello was already said on this connection", cmd.ref)
            return
        if cmd.name is not None and not 0 < len(cmd.name) <= wire.MAX_NAME_LENGTH:
            self._error(s, "bad_frame", f"'name' must be 1 to {wire.MAX_NAME_LENGTH} characters", cmd.ref)
            return
        if self.verifier is not None:
            if not cmd.token:
                self.stats.auth_failures["missing"] += 1
                self._error(s, "unauthorized", "authentication is on: hello needs a 'token'", cmd.ref)
                return
            claims = self._verify(s, cmd.token, cmd.ref)
            if claims is None:
                return
            s.claims = claims
            s.user = claims.sub
            s.name = cmd.name or claims.name
            self._arm_expiry(s)
        else:
            s.name = cmd.name
        accepted = None
        hook = self.hooks.single["connect"]
        if hook is not None:
            assert self._runner is not None
            accepted = await self._runner.connect(s, cmd, hook)
            if accepted is None or s.greeted or not s.conn.open:
                return  # refused (the client was told), or another hello won meanwhile
        s.greeted = True
        s.conn.idle_timeout = self.config.idle_timeout
        if self.verifier is not None:
            s.conn.set_deadline(None)
        welcome = {"op": "welcome", "client": s.client, "user": s.user, "heartbeat": self._heartbeat, "server": f"wirehub/{__version__}"}
        if accepted is not None and accepted.data is not None:
            welcome["data"] = accepted.data
        s.conn.send(wire.with_ref(welcome, cmd.ref))
        if self.route_users:
            await self.actions.track_user(s)
        if accepted is not None and accepted.rooms:
            await self._runner.connected(s, accepted)  # type: ignore[union-attr]

    async def _refresh(self, s: Session, cmd: Refresh) -> None:
        if self._needs_hello(s, cmd.ref):
            return
        hook = self.hooks.single["refresh"]
        if hook is not None and await self._runner.refresh(s, cmd, hook):  # type: ignore[union-attr]
            return
        if self.verifier is None:
            s.conn.send(wire.with_ref({"op": "refreshed", "exp": None}, cmd.ref))
            return
        claims = self._verify(s, cmd.token, cmd.ref)
        if claims is None:
            return
        if s.claims is not None and claims.sub != s.claims.sub:
            self.stats.auth_failures["wrong_user"] += 1
            self._error(s, "unauthorized", f"the new token is for {claims.sub!r}, this connection is {s.claims.sub!r}", cmd.ref)
            return
        s.claims = claims
        s.user = claims.sub
        s.greeted = True
        self._arm_expiry(s)
        exp = int(claims.exp) if claims.exp is not None else None
        s.conn.send(wire.with_ref({"op": "refreshed", "exp": exp}, cmd.ref))

    def _verify(self, s: Session, token: str, ref: Any) -> Claims | None:
        """The token's claims, or None after telling the client why not."""
        assert self.verifier is not None
        try:
            return self.verifier.verify(token)
        except AuthError as exc:
            failures = self.stats.auth_failures
            failures[exc.reason] = failures.get(exc.reason, 0) + 1
            self._error(s, "unauthorized", exc.message, ref)
            return None

    def _arm_expiry(self, s: Session) -> None:
        self._arm_expiry_at(s, s.claims.exp if s.claims is not None else None)

    def _arm_expiry_at(self, s: Session, exp: float | None) -> None:
        """Close ``s`` with ``auth_expired`` at Unix time ``exp`` (None: never)."""
        if s.expiry is not None:
            s.expiry.cancel()
            s.expiry = None
        if exp is None or self.server is None or self.server.loop is None:
            return
        delay = max(0.0, exp - time.time())
        s.expiry = self.server.loop.call_later(delay, self._expired, s)

    def _expired(self, s: Session) -> None:
        s.expiry = None
        log.info("auth_expired", conn=s.client, user=s.user)
        s.conn.close("auth_expired")

    async def _join(self, s: Session, cmd: Join, *, by_server: bool = False) -> None:
        """``join``; ``by_server``: a join the application made (no token check, no hook)."""
        if not by_server and self._needs_hello(s, cmd.ref):
            return
        name = cmd.room
        if not by_server and s.claims is not None and not s.claims.may_join(name):
            self._error(s, "forbidden", f"your token does not allow joining {name!r}", cmd.ref)
            return
        if name not in s.rooms and self._room_refused(s, name, cmd.ref, joining=True):
            return
        accepted = None
        hook = self.hooks.find("join", name) if self._runner is not None and not by_server else None
        if hook is not None:
            accepted = await self._runner.join(s, cmd, hook)  # type: ignore[union-attr]
            if accepted is None or not s.conn.open:
                return
            if accepted.info is not None:
                if s.room_info is None:
                    s.room_info = {}
                s.room_info[name] = accepted.info
            elif s.room_info is not None:
                s.room_info.pop(name, None)
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name)
        policy = self.policy(name)
        limit = policy.max_members
        if limit and s.client not in room.members and len(room.members) >= limit:
            self._error(s, "room_full", f"{name!r} has its maximum of {limit} members", cmd.ref)
            self._drop_room_if_empty(room)
            return
        first_here = not room.members
        rejoin = s.client in room.members
        room.members[s.client] = s
        s.rooms.add(name)
        # live publications wait until the join reply and history are out
        s.joining[name] = held = _Held(s.conn, self.config.max_send_buffer)
        room.changed()
        levels = policy.presence_levels if policy.presence else None
        counting = None  # the room's size on every node, read beside the history (hub/presence.py)
        try:
            if first_here:
                await self.broker.subscribe(name)
                counting = self.presence.prime(room, levels)
            recovered = False
            backlog: list[Publication] = []
            if cmd.since is not None:
                result = await self.broker.history(name, since=cmd.since, history=policy.history)
                position = result.position
                recovered = result.complete and (cmd.epoch is None or cmd.epoch == position.epoch)
                if recovered:
                    backlog = result.publications
                outcome = "recovered" if recovered else "epoch_changed" if result.complete else "not_in_history"
                self.stats.recoveries[outcome] += 1
            else:
                position = await self.broker.position(name)
        except BaseException:
            s.end_join(name)
            room.changed()
            if not rejoin:
                room.members.pop(s.client, None)
                s.rooms.discard(name)
                self._drop_room_if_empty(room)
            raise
        conn = s.conn
        self.stats.joins += 1
        if counting is not None:
            await counting
        mode = self.presence.counted(room, levels)
        joined = {"op": "joined", "room": name, "seq": position.seq, "epoch": position.epoch, "recovered": recovered, "presence": mode}
        if accepted is not None and accepted.data is not None:
            joined["data"] = accepted.data
        conn.send(wire.with_ref(joined, cmd.ref))
        last = position.seq
        sent = self._replay(s, room, backlog) if backlog else 0
        if sent:
            last = backlog[sent - 1].seq
        if sent < len(backlog):
            # More than the send buffer should take at once: the rest goes out as the client
            # reads, read again from history each time (nothing is pinned here meanwhile).
            task = asyncio.ensure_future(self._replay_rest(s, room, policy.history, last, position.epoch, held))
            self._replays.add(task)
            task.add_done_callback(self._replays.discard)
        else:
            self._end_join(s, room, last)
        backlog = []
        conn.idle_timeout = self.config.idle_timeout
        if policy.presence and not rejoin:
            member = s.member(name)
            await self.broker.presence_add(name, member)
            await self.presence.announce(name, True, member)

    def _room_refused(self, s: Session, name: str, ref: Any, *, joining: bool) -> bool:
        """True, after telling the client, when ``name`` would be one room too many: for this
        connection (a join beyond max_rooms_per_connection) or for this node (a new room
        beyond max_rooms: rooms with members here, and rooms the memory broker holds)."""
        if joining and len(s.rooms) >= self.config.max_rooms_per_connection:
            self._error(s, "limit", f"max_rooms_per_connection: this connection is in {len(s.rooms)} rooms, the most "
                        "it may be in; leave one before joining another", ref)
            return True
        table = self._room_table
        if name in self.rooms or (table is not None and name in table):
            return False
        if table is None and not joining:
            return False  # the broker holds history elsewhere: a publish adds nothing here
        held = len(table) if table is not None else len(self.rooms)
        if held >= self.config.max_rooms:
            self._error(s, "limit", f"max_rooms: this server holds its maximum of {self.config.max_rooms} rooms; "
                        "use an existing room, or try again once rooms have emptied", ref)
            return True
        return False

    def _replay(self, s: Session, room: Room, pubs: list[Publication]) -> int:
        """Send the first of ``pubs`` (at least one) until the send buffer holds the replay
        window; how many went."""
        conn = s.conn
        window = self._replay_window
        frames = self._replayed
        if not frames:
            asyncio.get_running_loop().call_soon(frames.clear)
        n = 0
        for pub in pubs:
            if n and conn.send_buffer >= window:
                break
            key = (room.name, pub.epoch, pub.seq)
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = self._msg(room, pub)
            if not conn.send(frame):
                break
            n += 1
        return n

    async def _replay_rest(self, s: Session, room: Room, history: HistoryPolicy, last: int, epoch: str, held: _Held) -> None:
        """The rest of a join's replay, a window at a time as the client drains its send
        buffer, read from history again each time. If history no longer holds what comes
        next (the client read slower than the room moved on), the connection is closed as a
        slow consumer: its reconnect then gets recovered:false, never a silent gap."""
        conn = s.conn
        name = room.name
        try:
            while True:
                await conn.drain()
                if not conn.open or s.joining.get(name) is not held:
                    return  # closed, left, or joined again
                result = await self.broker.history(name, since=last, history=history)
                if not conn.open or s.joining.get(name) is not held:
                    return
                if not result.complete or result.position.epoch != epoch:
                    log.info("slow_consumer", conn=s.client, peer=conn.peer, room=name, during="replay", since=last)
                    conn.close("slow_consumer")
                    return
                pubs = result.publications
                sent = self._replay(s, room, pubs) if pubs else 0
                if sent:
                    last = pubs[sent - 1].seq
                if sent == len(pubs):
                    break
                if not conn.open:
                    return
            self._end_join(s, room, last)
        except BrokerError as exc:
            log.warning("broker_error", op="replay", conn=s.client, error=str(exc))
            conn.close("slow_consumer")  # the replay cannot go on: reconnecting recovers what it can

    def _end_join(self, s: Session, room: Room, last: int) -> None:
        """The join reply and replay are out: send what was held meanwhile, then go live."""
        conn = s.conn
        waited = s.end_join(room.name)
        room.changed()
        for item in waited:
            if type(item) is bytes:
                conn.send(item)  # a presence event that came during the join
            elif item.seq > last:  # no duplicate of what history already gave
                conn.send(self._msg(room, item))

    async def _leave(self, s: Session, cmd: Leave) -> None:
        if self._needs_hello(s, cmd.ref):
            return
        if cmd.room not in s.rooms:
            self._error(s, "not_member", f"you are not in {cmd.room!r}", cmd.ref)
            return
        s.conn.send(wire.with_ref({"op": "left", "room": cmd.room}, cmd.ref))
        await self._part(s, cmd.room)

    async def _part(self, s: Session, name: str) -> None:
        s.rooms.discard(name)
        s.end_join(name)
        room = self.rooms.get(name)
        if room is None or room.members.pop(s.client, None) is None:
            return
        self.stats.leaves += 1
        room.changed()
        policy = self.policy(name)
        self.presence.counted(room, policy.presence_levels if policy.presence else None)
        if policy.presence:
            member = s.member(name)
            await self.broker.presence_remove(name, s.client)
            await self.presence.announce(name, False, member)
        if s.room_info is not None:
            s.room_info.pop(name, None)
        if not room.members and self.rooms.get(name) is room:  # another leave may have won the race
            del self.rooms[name]
            self.presence.forget(name)
            await self.broker.unsubscribe(name)
        if self._runner is not None:
            await self._runner.left(s, name)  # on_leave

    def _drop_room_if_empty(self, room: Room) -> None:
        if not room.members and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            self.presence.forget(room.name)

    def _pub_data(self, s: Session, cmd: Pub) -> bytes | None:
        """The data of a ``pub`` the client may send, or None once it was told why not."""
        if self._gate and not s.greeted and self._needs_hello(s, cmd.ref):
            return None
        if s.claims is not None and not s.claims.may_publish(cmd.room):
            self._error(s, "forbidden", f"your token does not allow publishing to {cmd.room!r}", cmd.ref)
            return None
        if self._room_table is not None and cmd.room not in self._room_table and self._room_refused(s, cmd.room, cmd.ref, joining=False):
            return None
        data = wire.data_bytes(cmd.data)
        if type(data) is str:
            self._error(s, "bad_frame", data, cmd.ref)
            return None
        return data

    def _pub_local(self, s: Session, cmd: Pub) -> None:
        """``pub`` on a local broker: published (and fanned out) now (hub/_frames.py)."""
        self._frames.pub(s, cmd)

    async def _pub_pipelined(self, s: Session, cmd: Pub, data: bytes | None = None, info: bytes | None = None) -> None:
        """``pub`` on a remote broker: started without waiting for the broker's answer, so a
        connection's publications travel together (one pipeline per event-loop turn) instead
        of one round trip each. The broker applies them in call order; the acks go out in
        that order too, even when the broker answers rooms out of order. A connection keeps
        at most PUB_WINDOW in flight (and the node PUB_IN_FLIGHT): beyond that its frames
        wait, and its reads pause. (``data`` and ``info``: what an on_publish hook answered.)"""
        if data is None:
            data = self._pub_data(s, cmd)
            if data is None:
                self.stats.pub_refused += 1
                return
        broker = self.broker
        while (window := s.publishing) and (len(window) >= PUB_WINDOW or broker.in_flight >= PUB_IN_FLIGHT):
            await asyncio.wait((window[0][0],))  # its answer takes it out of the window
        self._pub_start(s, cmd, data, info)

    def _pub_start(self, s: Session, cmd: Pub, data: bytes, info: bytes | None) -> None:
        """Start ``cmd``'s publication at the broker and put it in ``s``'s window (which the
        caller made sure has room); its ack goes out when the broker answers (hub/_frames.py)."""
        self._pipelined.start(s, cmd, data, info)

    def _pub_bug(self, s: Session, ref: Any, exc: Exception) -> None:
        """A publication failed with something other than a BrokerError: a broker bug, logged
        within the same budget as _failed's, and answered."""
        if _tracebacks.allow():
            log.error("hub_op_failed", conn=s.client, op="pub", error=repr(exc))
        self._error(s, "internal", "the server failed to handle this frame; it has been logged", ref, now=True)

    async def _send(self, s: Session, cmd: Send) -> None:
        if self._needs_hello(s, cmd.ref):
            return
        if s.claims is not None and not s.claims.may_send():
            why = "does not allow direct messages" if s.claims.send is False else "limits you to rooms and does not grant direct messages"
            self._error(s, "forbidden", f'your token {why}; ask for one with "send": true', cmd.ref)
            return
        data = wire.data_bytes(cmd.data)
        if type(data) is str:
            self._error(s, "bad_frame", data, cmd.ref)
            return
        frame = wire.direct_msg(s.client_json, data)
        target = self.sessions.get(cmd.to)
        if target is not None:
            target.conn.send(frame)
            delivered = True
        else:
            delivered = await self.broker.send(cmd.to, frame)
        if not delivered:
            self._error(s, "no_such_client", f"no client {cmd.to!r} is connected", cmd.ref)
        elif cmd.ref is not None:
            s.conn.send(wire.encode({"op": "ok", "ref": cmd.ref}))

    async def _presence(self, s: Session, cmd: Presence) -> None:
        if self._needs_hello(s, cmd.ref):
            return
        if cmd.room not in s.rooms:
            self._error(s, "not_member", f"join {cmd.room!r} to see who is in it", cmd.ref)
            return
        members = await self.broker.presence(cmd.room) if self.policy(cmd.room).presence else []
        s.conn.send(wire.with_ref({"op": "presence", "room": cmd.room, "members": members}, cmd.ref))

    async def _history(self, s: Session, cmd: History) -> None:
        if self._needs_hello(s, cmd.ref):
            return
        if cmd.room not in s.rooms:
            self._error(s, "not_member", f"join {cmd.room!r} to read its history", cmd.ref)
            return
        limit = cmd.limit if cmd.limit is not None and cmd.limit >= 0 else None
        history = self.policy(cmd.room).history
        if cmd.before is None:
            result = await self.broker.history(cmd.room, limit=limit, history=history)
            pubs = result.publications
        else:
            result = await self.broker.history(cmd.room, history=history)
            pubs = [p for p in result.publications if p.seq < cmd.before]
            if limit is not None:
                pubs = pubs[-limit:] if limit else []
        room = self.rooms.get(cmd.room)
        if room is None:  # left while the broker answered
            return
        # The newest messages that fit in history_reply_bytes (at least one): a reply never
        # puts more than that into the send buffer at once. "more":true says older ones were
        # left out; {"op":"history","before":FIRST_SEQ} asks for them.
        budget = self.config.history_reply_bytes
        frames: list[bytes] = []
        size = 0
        for pub in reversed(pubs):
            frame = self._msg(room, pub)
            size += len(frame) + 1
            if size > budget and frames:
                break
            frames.append(frame)
        frames.reverse()
        head = wire.with_ref({"op": "history", "room": cmd.room, "epoch": result.position.epoch}, cmd.ref)[:-1]
        tail = b'],"more":true}' if len(frames) < len(pubs) else b"]}"
        s.conn.send(head + b',"messages":[' + b",".join(frames) + tail)

    async def _rpc(self, s: Session, cmd: Rpc) -> None:
        if self._runner is None:
            if not self._needs_hello(s, cmd.ref):
                self._error(s, "no_such_method", f"no rpc method {cmd.method!r} on this server", cmd.ref)
            return
        await self._runner.rpc(s, cmd)

    # ------------------------------------------------------------------ broker callbacks

    def _msg(self, room: Room, pub: Publication) -> bytes:
        sender = self.sessions.get(pub.sender)
        sender_json = sender.client_json if sender is not None else wire.json_str(pub.sender)
        frame = wire.room_msg(room.name_json, pub.seq, sender_json, bytes(pub.data), pub.ts)
        return frame if pub.info is None else wire.with_info(frame, pub.info)  # info: set by a hook

    def on_publication(self, pub: Publication) -> None:
        room = self.rooms.get(pub.room)
        if room is not None:
            self._broadcast(room, self._msg(room, pub), exclude=pub.exclude, pub=pub)

    def on_room_event(self, room_name: str, frame: bytes, exclude: str = "") -> None:
        if room_name == NODES_ROOM and frame.startswith(HEARTBEAT_PREFIX):
            self.telemetry.heard(frame)  # another node's heartbeat (or ours): not for clients
            return
        room = self.rooms.get(room_name)
        if room is not None:
            if frame.startswith(PRESENCE_FRAMES):
                self.presence.deliver(room, frame, exclude)  # in this room's presence mode
            else:
                self._broadcast(room, frame, exclude=exclude)
        elif self.route_users and room_name[:1] == "\x00":  # a user's connections (actions.py)
            self.actions.user_event(room_name[len(USER_ROOM_PREFIX) :], frame)

    def _broadcast(self, room: Room, frame: bytes, *, exclude: str = "", pub: Publication | None = None) -> None:
        """Write ``frame`` to every local member of ``room``, encoded once per framing.
        A member whose join is still in progress gets publications after its replay."""
        conns, waiting = room.targets()
        for s in waiting:
            if s.client != exclude:
                held = s.joining.get(room.name)
                if held is not None:
                    held.append(pub if pub is not None else frame)
        if exclude:
            conns = [c for c in conns if c.id != exclude]
        broadcast(conns, frame)

    def on_direct(self, client: str, frame: bytes) -> None:
        s = self.sessions.get(client)
        if s is not None:
            if frame[:1] == CONTROL:  # a server action from another node (actions.py)
                self.actions.run_control(s, frame)
            else:
                s.conn.send(frame)

    def on_broker_state(self, up: bool) -> None:
        log.warning("broker_state", up=up)

    # ------------------------------------------------------------------ disconnect

    def _disconnect_inline(self, conn: Connection, reason: str) -> None:
        self._frames.forget(conn)  # (the frame handler's last connection, see PubScanner.session_of)
        _drive(self._cleanup(conn, reason))

    async def _disconnect_async(self, conn: Connection, reason: str) -> None:
        self._pipelined.forget(conn)
        try:
            await self._cleanup(conn, reason)
        except BrokerError as exc:
            log.warning("broker_error", op="disconnect", error=str(exc))

    async def _cleanup(self, conn: Connection, reason: str = "closed") -> None:
        s: Session | None = self.sessions.get(conn.id)
        if s is None:
            return
        if s.expiry is not None:
            s.expiry.cancel()
        try:
            for name in list(s.rooms):
                await self._part(s, name)
            await self.broker.remove_client(s.client)
            if self.route_users:
                await self.actions.untrack_user(s)
            if self._runner is not None and (s.greeted or not self._gate):
                await self._runner.disconnected(s, BYE.get(reason, (reason, True))[0])  # on_disconnect
        finally:
            self.sessions.pop(s.client, None)
            if not self.sessions and self._all_gone is not None:
                self._all_gone.set()

    # ------------------------------------------------------------------ embedding

    async def publish_raw(self, room: str, data: bytes, *, sender: str = "") -> Publication:
        """Publish the JSON ``data`` (bytes) to ``room`` from the server side. Raises
        ValueError when it is not UTF-8."""
        checked = wire.data_bytes(data)
        if type(checked) is str:
            raise ValueError(checked)
        data = checked
        try:
            pub = await self.broker.publish(room, data, sender=sender, ts=int(time.time() * 1000), history=self.policy(room).history)
        except BrokerError:
            self.stats.pub_failed += 1
            raise
        self.stats.counted += 1
        return pub
