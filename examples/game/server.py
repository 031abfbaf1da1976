"""The game server: a wirehub framework app that runs the world at a fixed 30 Hz tick and
sends every player a snapshot of what it sees, delta-encoded against the last snapshot that
player acknowledged. UDP players (``client.py``, ``bots.py``) and WebSocket players (the
browser page it serves on the admin listener at ``/game``) are in the same world: both speak
the binary protocol of ``protocol.py``, one message per datagram or WebSocket message.

Run it from the repository root::

    wirehub run examples.game.server:app      # UDP 127.0.0.1:7400, WebSocket :7401, page http://127.0.0.1:7480/game/

UDP and reflection: the app implements the framework's address validation hooks, so a UDP
source address gets nothing but a 23-byte challenge (within 3x of its padded HELLO) until it
echoed the cookie, and only then becomes a player. A validated session is then sent at most
:data:`SNAPSHOT_CREDIT` snapshots per datagram it sends, and at most :data:`MAX_CREDIT` in
advance: when its client goes quiet, the snapshots stop within a second.

One process holds the world: run it without ``--workers`` (it refuses to start with more).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from typing import Any

from wirehub import App, Connection, FrameError, Server

from .protocol import (
    MAX_NAMES, PELLET_BIT, SNAPSHOT_RING, Bye, Hello, Input, View, decode_client, encode_board, encode_challenge, encode_error,
    encode_names, encode_snapshot, encode_welcome, hello_cookie,
)
from .world import World, WorldConfig

log = logging.getLogger("examples.game")
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
#: snapshots a validated UDP session earns per datagram it sends, and may hold in advance
SNAPSHOT_CREDIT = 2
MAX_CREDIT = 30
#: malformed messages a stream (WebSocket, TCP) session may send before it is closed (each
#: gets an ERROR, at most one a second). A UDP session is never closed for them: its source
#: address can be forged, and a stranger must not be able to end someone else's game
MAX_BAD_MESSAGES = 20
#: seconds of silence after which a player leaves (a UDP client that vanished)
PLAYER_IDLE_TIMEOUT = 10.0
#: tick durations kept for the stats (the bench reads them)
TICK_SAMPLES = 4096
_PAGE_TYPES = {"game.html": "text/html", "game.js": "text/javascript", "game.css": "text/css"}


class Session:
    """One client: its player, its delta bases, its budget."""

    __slots__ = ("conn", "player", "udp", "credit", "ring", "acked", "bad", "error_at", "named", "token", "cookie", "forged")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.player: Any = None
        self.udp = conn.transport == "udp"
        self.credit = MAX_CREDIT
        self.ring: dict[int, View] = {}  # tick -> the view sent then (a delta base once acknowledged)
        self.acked = 0  # the newest tick the client acknowledged that is still in the ring
        self.bad = 0
        self.error_at = 0.0
        #: players whose name this client was sent (at most max_players ids)
        self.named: set[int] = set()
        #: the secret its WELCOME carries, which INPUT and BYE must carry back: the source
        #: address of a datagram proves nothing, the token proves it came from the client
        self.token = secrets.randbits(32)
        #: the cookie of the HELLO that opened a UDP session: a repeated HELLO must carry it
        self.cookie: bytes | None = None
        #: datagrams dropped for a wrong token or cookie (forged, or a confused client)
        self.forged = 0


class GameApp(App):
    def __init__(self, config: WorldConfig | None = None) -> None:
        # "length" framing is for TCP clients; datagrams and WebSocket messages are one frame each
        super().__init__(framing="length", name="game")
        self.world = World(config)
        self.sessions: dict[str, Session] = {}
        #: seconds each tick took, and CPU seconds it used: simulation, snapshots, and writing
        #: them to the sockets (the wall time also counts what else the machine ran meanwhile)
        self.tick_times: deque[float] = deque(maxlen=TICK_SAMPLES)
        self.tick_cpu: deque[float] = deque(maxlen=TICK_SAMPLES)
        self._flush_at = (0.0, 0.0)
        #: ticks that started late: the previous tick, or other work, ran past their due time
        self.late_ticks = 0
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    async def startup(self, server: Server) -> None:
        if server.config.workers > 1:
            raise RuntimeError("the game keeps its world in one process: run it without --workers")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def shutdown(self, server: Server) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.world.config.tick_hz
        due = loop.time()
        while True:
            due += period
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.late_ticks += 1
                if delay < -5 * period:  # far behind: do not run a burst of ticks to catch up
                    due = loop.time()
                await asyncio.sleep(0)
            # A tick's figure is its own run plus the framework's flush of the frames it
            # queued (the sendto calls): that flush is a call_soon callback scheduled by the
            # first send, so it runs between the two markers scheduled around the tick.
            loop.call_soon(self._flush_starts)
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                self.tick()
            except Exception:  # a bug in the game must not stop the world for everyone
                log.exception("tick_failed tick=%d", self.world.tick)
            loop.call_soon(self._tick_done, time.perf_counter() - wall, time.thread_time() - cpu)

    def _flush_starts(self) -> None:
        self._flush_at = (time.perf_counter(), time.thread_time())

    def _tick_done(self, wall: float, cpu: float) -> None:
        self.tick_times.append(wall + time.perf_counter() - self._flush_at[0])
        self.tick_cpu.append(cpu + time.thread_time() - self._flush_at[1])

    # ------------------------------------------------------------------ the tick

    def tick(self) -> None:
        """Advance the world one tick and send each player its snapshot."""
        world = self.world
        world.step()
        tick = world.tick
        views = world.views()
        board = None
        for session in self.sessions.values():
            player = session.player
            if player is None:
                continue
            conn = session.conn
            if session.udp:
                if session.credit <= 0:
                    continue  # the client went quiet: nothing more until it sends again
                session.credit -= 1
            elif not conn.writable:
                continue  # a WebSocket peer behind: skip a snapshot rather than queue it
            view = views[player.id]
            ring = session.ring
            base = ring.get(session.acked)
            conn.send(encode_snapshot(tick, player.last_seq, view, base, session.acked))
            ring[tick] = view
            if len(ring) > SNAPSHOT_RING:
                del ring[next(iter(ring))]
            if tick % world.config.tick_hz == 0:  # once a second: the leaderboard, and names
                if board is None:
                    board = encode_board(world.board())
                conn.send(board)
                self._send_names(session, view)
        for view in set(views.values()):
            view.release()

    def _send_names(self, session: Session, view: View) -> None:
        """The names of the players in view that this client was not told yet."""
        players = self.world.players
        new = [(pid, players[pid].name) for pid in view.ids if not pid & PELLET_BIT and pid not in session.named and pid in players]
        if new:
            new = new[:MAX_NAMES]
            session.named.update(pid for pid, _ in new)
            session.conn.send(encode_names(new))

    # ------------------------------------------------------------------ connections

    def connect(self, conn: Connection) -> None:
        if conn.transport in ("ws", "wss"):
            conn.binary = True  # type: ignore[attr-defined]
        conn.idle_timeout = PLAYER_IDLE_TIMEOUT
        self.sessions[conn.id] = Session(conn)

    def frame(self, conn: Connection, data: bytes) -> None:
        session = self.sessions[conn.id]
        msg = decode_client(data)
        if isinstance(msg, Input):
            player = session.player
            if player is None:
                self._refuse(session, "hello_first", "send HELLO before INPUT")
                return
            if msg.token != session.token:
                self._forged(session, "INPUT")
                return
            if session.udp:
                session.credit = min(MAX_CREDIT, session.credit + SNAPSHOT_CREDIT)
            if msg.ack > session.acked and msg.ack in session.ring:  # only a snapshot this session was sent
                session.acked = msg.ack
            self.world.input(player, msg.seq, msg.cmds)
        elif isinstance(msg, Hello):
            if session.udp:
                if session.cookie is None:  # the HELLO that opened the session: the server checked its cookie
                    session.cookie = msg.cookie
                elif msg.cookie != session.cookie:  # a WELCOME is bigger than a HELLO: no answer to a stranger
                    self._forged(session, "HELLO")
                    return
                session.credit = min(MAX_CREDIT, session.credit + SNAPSHOT_CREDIT)
            if session.player is None:
                session.player = self.world.add_player(msg.name)
                if session.player is None:
                    conn.send(encode_error("full", f"the game holds {self.world.config.max_players} players; try again later"))
                    conn.close("full")
                    return
            welcome = self.world.welcome(session.player)._replace(token=session.token)
            conn.send(encode_welcome(welcome))  # again when a client repeats HELLO (a lost WELCOME)
        elif isinstance(msg, Bye):
            if msg.token != session.token:
                self._forged(session, "BYE")
                return
            conn.close("closed")
        else:
            self._refuse(session, "bad_message", msg.reason)

    def _forged(self, session: Session, what: str) -> None:
        """A message without this session's token (or cookie). Over UDP it may come from a
        forged source address: it gets no answer, so that nobody can use the server to send
        bytes at a player's address. On a stream it is a confused client, and told so."""
        session.forged += 1
        if not session.udp:
            self._refuse(session, "bad_token", f"{what} must carry the token of this session's WELCOME")

    def _refuse(self, session: Session, code: str, message: str) -> None:
        """An ERROR, at most one a second; past MAX_BAD_MESSAGES a stream session is closed."""
        session.bad += 1
        conn = session.conn
        if session.bad > MAX_BAD_MESSAGES and not session.udp:
            conn.send(encode_error("too_many_errors", f"{MAX_BAD_MESSAGES} bad messages; closing"))
            conn.close("too_many_errors")
            return
        now = time.monotonic()
        if now - session.error_at >= 1.0:
            session.error_at = now
            conn.send(encode_error(code, message))

    def frame_error(self, conn: Connection, error: FrameError) -> None:
        session = self.sessions.get(conn.id)
        if error.fatal or session is None:
            conn.close("protocol")
        else:
            self._refuse(session, error.code, error.message)

    def closing(self, conn: Connection, reason: str) -> None:
        if reason not in ("closed", "full", "too_many_errors"):
            conn.send(encode_error(reason, "the server ended this session"))

    def disconnect(self, conn: Connection, reason: str) -> None:
        session = self.sessions.pop(conn.id, None)
        if session is not None and session.player is not None:
            self.world.remove_player(session.player.id)

    # ------------------------------------------------------------------ UDP address validation

    def udp_challenge(self, cookie: bytes) -> bytes:
        return encode_challenge(cookie)

    def udp_cookie(self, frame: bytes) -> bytes | None:
        return hello_cookie(frame)

    # ------------------------------------------------------------------ admin listener: the page, stats

    def admin(self, web_app: Any, server: Server) -> None:
        from aiohttp import web

        files = {}
        for name, kind in _PAGE_TYPES.items():
            path = os.path.join(WEB_DIR, name)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    files[name] = (f.read(), kind)
        headers = {
            "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        }

        def page(name: str) -> Any:
            async def handler(request: web.Request) -> web.Response:
                body, kind = files[name]
                if name == "game.html":  # the page connects to this server's WebSocket listener
                    body = body.replace(b"{{WS_URL}}", self._ws_url(server, request.url.host or "127.0.0.1").encode())
                return web.Response(body=body, content_type=kind, charset="utf-8", headers=headers)

            return handler

        async def to_folder(request: web.Request) -> web.Response:  # relative links need the slash
            raise web.HTTPFound(request.rel_url.with_path("/game/").with_query(request.rel_url.query))

        web_app.router.add_get("/game", to_folder)
        web_app.router.add_get("/game/", page("game.html"))
        for name in _PAGE_TYPES:
            if name in files:
                web_app.router.add_get(f"/game/{name}", page(name))
        web_app.router.add_get("/game/stats", self._stats_route)

    @staticmethod
    def _ws_url(server: Server, page_host: str) -> str:
        """ws://HOST:PORT/ of the first WebSocket listener ("" when there is none); a wildcard
        address is replaced by the host the page was loaded from."""
        for scheme in ("ws", "wss"):
            for address in server.addresses.get(scheme, []):
                host, _, port = address.rpartition(":")
                if host in ("0.0.0.0", "[::]"):
                    host = page_host
                return f"{scheme}://{host}:{port}/"
        return ""

    async def _stats_route(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.stats())

    def stats(self) -> dict[str, Any]:
        """Ticks so far, players, and the distribution of the last TICK_SAMPLES ticks' times
        (wall and CPU, in ms) beside the budget of one tick."""

        def spread(samples: deque[float]) -> dict[str, Any]:
            times = sorted(samples)
            at = (lambda q: round(times[min(len(times) - 1, int(q * len(times)))] * 1000, 3)) if times else (lambda q: None)
            return {"p50": at(0.5), "p99": at(0.99), "max": at(1.0), "samples": len(times)}

        return {
            "tick": self.world.tick,
            "players": len(self.world.players),
            "tick_ms": spread(self.tick_times),
            "tick_cpu_ms": spread(self.tick_cpu),
            "tick_budget_ms": round(1000 / self.world.config.tick_hz, 3),
            "late_ticks": self.late_ticks,
        }

    def describe(self, conn: Connection) -> dict[str, Any]:
        session = self.sessions.get(conn.id)
        player = session.player if session is not None else None
        if player is None:
            return {}
        return {"user": player.name, "player": player.id, "score": player.score}


app = GameApp()
