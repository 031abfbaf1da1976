"""The simulation, the authority on everything: where players are, what they collide with, who
scores. Sans-I/O and deterministic for a seed: :meth:`World.step` advances one fixed tick,
:meth:`World.input` queues a client's movement commands, :meth:`World.views` says what each
player sees. The server (``server.py``) calls these from its 30 Hz tick; tests call them
directly.

Clients never send positions. A command is a wanted velocity; the world clamps it to the
maximum speed, applies each command once and at most one per player per tick (a client that
sends more is not faster: beyond :data:`MAX_PENDING` waiting, the oldest are dropped; a
player without a command for this tick stands still) and takes at most :data:`INPUT_BURST` input messages
in advance from each client (a token bucket refilled by :data:`INPUT_RATE` per tick).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, fields
from typing import Iterable

from .protocol import MAX_VIEW_PELLETS, MAX_VIEW_PLAYERS, PELLET_BIT, POS_SCALE, Board, BOARD_SIZE, Rect, View, Welcome, pellet_record, player_record

#: commands waiting for their tick, per player; beyond it the oldest are dropped
MAX_PENDING = 6
#: input messages a player may send per tick on average, and in one burst
INPUT_RATE = 2
INPUT_BURST = 30
#: the side of a collision-grid cell (at least a player's diameter)
COLLISION_CELL = 64
#: the order in which an area-of-interest cell and its neighbours fill a view (own cell first)
_AOI_ORDER = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, -1), (-1, 1), (1, 1))


@dataclass(frozen=True)
class WorldConfig:
    """The game's settings. Every value is checked: a wrong one raises ValueError naming it."""

    width: int = 3200
    height: int = 2000
    tick_hz: int = 30
    max_speed: int = 300  # world units per second
    radius: int = 16
    pellet_radius: int = 6
    pellets: int = 300
    obstacles: int = 10
    view: int = 400  # the side of an area-of-interest cell: a player sees its cell and the 8 around
    max_players: int = 1000
    seed: int = 1

    def __post_init__(self) -> None:
        limits = {
            "width": (200, 65535 // POS_SCALE), "height": (200, 65535 // POS_SCALE), "tick_hz": (1, 120),
            "max_speed": (1, 10000), "radius": (2, 100), "pellet_radius": (1, 100), "pellets": (0, PELLET_BIT - 1),
            "obstacles": (0, 64), "view": (100, 65535), "max_players": (1, PELLET_BIT - 1), "seed": (0, 2**63),
        }
        for f in fields(self):
            low, high = limits[f.name]
            value = getattr(self, f.name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"game setting {f.name} must be a whole number from {low} to {high}, got {value!r}")


def _x_of(p: Player) -> float:
    return p.x


class Player:
    __slots__ = (
        "id", "name", "x", "y", "vx", "vy", "score", "last_seq", "queued_seq", "pending", "tokens", "rec", "_q",
        "inputs_dropped", "cmds_dropped", "clamped",
    )

    def __init__(self, pid: int, name: str, x: float, y: float) -> None:
        self.id = pid
        self.name = name
        self.x, self.y = x, y
        self.vx = self.vy = 0.0
        self.score = 0
        self.last_seq = 0  # the last command applied (snapshots acknowledge it)
        self.queued_seq = 0  # the last command queued
        self.pending: deque[tuple[int, int, int]] = deque()
        self.tokens = float(INPUT_BURST)
        self._q: tuple[int, int, int] | None = None
        self.rec = b""
        self.inputs_dropped = 0  # input messages over the rate
        self.cmds_dropped = 0  # commands beyond MAX_PENDING
        self.clamped = 0  # commands faster than max_speed
        self.refresh()

    def refresh(self) -> None:
        """Repack the record when what travels (quantized position, score) changed."""
        q = (int(self.x * POS_SCALE + 0.5), int(self.y * POS_SCALE + 0.5), self.score)
        if q != self._q:
            self._q = q
            self.rec = player_record(self.id, self.x, self.y, self.score)


def clamp_velocity(vx: float, vy: float, max_speed: float) -> tuple[float, float, bool]:
    """(vx, vy) no faster than ``max_speed``, and whether it had to be slowed."""
    speed2 = vx * vx + vy * vy
    if speed2 <= max_speed * max_speed:
        return vx, vy, False
    k = max_speed / math.sqrt(speed2)
    return vx * k, vy * k, True


def settle(x: float, y: float, r: float, width: float, height: float, rects: Iterable[Rect]) -> tuple[float, float]:
    """(x, y) pushed out of the obstacles and inside the walls."""
    for rx, ry, rw, rh in rects:
        cx = min(max(x, rx), rx + rw)
        cy = min(max(y, ry), ry + rh)
        dx, dy = x - cx, y - cy
        d2 = dx * dx + dy * dy
        if d2 >= r * r:
            continue
        if d2 > 1e-9:
            d = math.sqrt(d2)
            x, y = cx + dx / d * r, cy + dy / d * r
        else:  # the centre is inside: leave by the nearest side
            exits = ((x - rx + r, -1, 0), (rx + rw - x + r, 1, 0), (y - ry + r, 0, -1), (ry + rh - y + r, 0, 1))
            depth, ex, ey = min(exits)
            x, y = x + ex * depth, y + ey * depth
    return min(max(x, r), width - r), min(max(y, r), height - r)


def step_position(x: float, y: float, vx: float, vy: float, dt: float, r: float, width: float, height: float, rects: Iterable[Rect]) -> tuple[float, float]:
    """One tick of movement at (vx, vy) (already clamped), walls and obstacles included. The
    client predicts its own player with this very function."""
    return settle(x + vx * dt, y + vy * dt, r, width, height, rects)


def layout_obstacles(config: WorldConfig) -> tuple[Rect, ...]:
    rng = random.Random(config.seed ^ 0x0B57AC1E)
    margin = 4 * config.radius
    out = []
    for _ in range(config.obstacles):
        w = rng.randint(40, max(40, min(220, config.width // 6)))
        h = rng.randint(40, max(40, min(220, config.height // 6)))
        x = rng.randint(margin, max(margin, config.width - margin - w))
        y = rng.randint(margin, max(margin, config.height - margin - h))
        out.append(Rect(x, y, w, h))
    return tuple(out)


class World:
    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = cfg = config or WorldConfig()
        self.rng = random.Random(cfg.seed)
        self.tick = 0
        self.dt = 1.0 / cfg.tick_hz
        self.players: dict[int, Player] = {}
        self.obstacles = layout_obstacles(cfg)
        self._next_id = 1
        # obstacles near each collision cell (static), pellets per collision and view cell
        self._rects_near: dict[tuple[int, int], tuple[Rect, ...]] = {}
        reach = cfg.radius + 1
        for rect in self.obstacles:
            for cx in range((rect.x - reach) // COLLISION_CELL, (rect.x + rect.w + reach) // COLLISION_CELL + 1):
                for cy in range((rect.y - reach) // COLLISION_CELL, (rect.y + rect.h + reach) // COLLISION_CELL + 1):
                    self._rects_near[(cx, cy)] = self._rects_near.get((cx, cy), ()) + (rect,)
        self.pellets: list[tuple[float, float, bytes]] = []
        self._pellet_cells: dict[tuple[int, int], set[int]] = {}
        self._pellet_views: dict[tuple[int, int], set[int]] = {}
        for i in range(cfg.pellets):
            self.pellets.append((0.0, 0.0, b""))
            self._place_pellet(i)

    # ------------------------------------------------------------------ players

    def _free_spot(self, clearance: float) -> tuple[float, float]:
        cfg = self.config
        for _ in range(50):
            x = self.rng.uniform(clearance, cfg.width - clearance)
            y = self.rng.uniform(clearance, cfg.height - clearance)
            if settle(x, y, clearance, cfg.width, cfg.height, self.obstacles) == (x, y):
                return x, y
        return cfg.width / 2, cfg.height / 2

    def add_player(self, name: str) -> Player | None:
        """A new player at a free spot, or None when the game holds max_players already."""
        if len(self.players) >= self.config.max_players:
            return None
        while self._next_id in self.players:
            self._next_id = self._next_id % (PELLET_BIT - 1) + 1
        pid = self._next_id
        self._next_id = self._next_id % (PELLET_BIT - 1) + 1
        x, y = self._free_spot(self.config.radius)
        player = self.players[pid] = Player(pid, name or f"player{pid}", x, y)
        return player

    def remove_player(self, pid: int) -> None:
        self.players.pop(pid, None)

    def input(self, player: Player, seq: int, cmds: tuple[tuple[int, int], ...]) -> bool:
        """Queue the commands of one input message (``seq`` numbers the last one). Commands
        already queued (the redundant copies) are skipped. False when the message is over
        the player's rate and was dropped."""
        if player.tokens < 1:
            player.inputs_dropped += 1
            return False
        player.tokens -= 1
        pending = player.pending
        seq -= len(cmds) - 1
        for vx, vy in cmds:
            if seq > player.queued_seq:
                pending.append((seq, vx, vy))
                player.queued_seq = seq
            seq += 1
        while len(pending) > MAX_PENDING:
            pending.popleft()
            player.cmds_dropped += 1
        return True

    # ------------------------------------------------------------------ the tick

    def step(self) -> None:
        cfg = self.config
        self.tick += 1
        dt, r, width, height = self.dt, cfg.radius, cfg.width, cfg.height
        max_speed = cfg.max_speed
        rects_near = self._rects_near
        cell = COLLISION_CELL
        players = list(self.players.values())
        for p in players:
            p.tokens = min(INPUT_BURST, p.tokens + INPUT_RATE)
            if p.pending:  # one command per tick, each exactly once: the client predicts the same
                seq, vx, vy = p.pending.popleft()
                p.vx, p.vy, clamped = clamp_velocity(vx, vy, max_speed)
                p.clamped += clamped
                p.last_seq = seq
                if vx or vy:
                    x, y = p.x + p.vx * dt, p.y + p.vy * dt
                    p.x, p.y = settle(x, y, r, width, height, rects_near.get((int(x) // cell, int(y) // cell), ()))
            else:  # none arrived in time: stand still rather than guess
                p.vx = p.vy = 0.0
        self._collide(players)
        self._eat(players)
        for p in players:
            p.refresh()

    def _collide(self, players: list[Player]) -> None:
        """Overlapping players push each other apart, half the overlap each (sweep and
        prune: sorted by x, each player is compared with those less than a diameter right)."""
        cfg = self.config
        r = cfg.radius
        reach = 2 * r
        reach2 = reach * reach
        players.sort(key=_x_of)
        moved: list[Player] = []
        n = len(players)
        for i in range(n):
            p = players[i]
            px = p.x
            for j in range(i + 1, n):
                q = players[j]
                ddx = q.x - px
                if ddx >= reach:
                    break
                ddy = q.y - p.y
                d2 = ddx * ddx + ddy * ddy
                if d2 >= reach2:
                    continue
                d = math.sqrt(d2)
                if d < 1e-6:
                    ddx, ddy, d = 1.0, 0.0, 1.0
                push = (reach - d) / 2
                ux, uy = ddx / d * push, ddy / d * push
                p.x -= ux
                p.y -= uy
                q.x += ux
                q.y += uy
                moved.append(p)
                moved.append(q)
        near = self._rects_near
        for p in moved:
            p.x, p.y = settle(p.x, p.y, r, cfg.width, cfg.height, near.get((int(p.x) // COLLISION_CELL, int(p.y) // COLLISION_CELL), ()))

    def _eat(self, players: list[Player]) -> None:
        """A player touching a pellet scores; the pellet grows back elsewhere."""
        reach = self.config.radius + self.config.pellet_radius
        reach2 = reach * reach
        cells = self._pellet_cells
        pellets = self.pellets
        cell = COLLISION_CELL
        for p in players:
            x, y = p.x, p.y
            x0, x1 = int(x - reach) // cell, int(x + reach) // cell
            y0, y1 = int(y - reach) // cell, int(y + reach) // cell
            for cx in range(x0, x1 + 1):
                for cy in range(y0, y1 + 1):
                    here = cells.get((cx, cy))
                    if not here:
                        continue
                    for i in list(here):
                        px, py, _ = pellets[i]
                        if (x - px) ** 2 + (y - py) ** 2 < reach2:
                            p.score += 1
                            self._place_pellet(i)

    def _place_pellet(self, i: int) -> None:
        if self.pellets[i][2]:
            x, y, _ = self.pellets[i]
            self._pellet_cells[(int(x) // COLLISION_CELL, int(y) // COLLISION_CELL)].discard(i)
            self._pellet_views[(int(x) // self.config.view, int(y) // self.config.view)].discard(i)
        x, y = self._free_spot(self.config.pellet_radius + 2)
        self.pellets[i] = (x, y, pellet_record(i, x, y))
        self._pellet_cells.setdefault((int(x) // COLLISION_CELL, int(y) // COLLISION_CELL), set()).add(i)
        self._pellet_views.setdefault((int(x) // self.config.view, int(y) // self.config.view), set()).add(i)

    # ------------------------------------------------------------------ what each player sees

    def views(self) -> dict[int, View]:
        """Each player's view: the players and pellets of its area-of-interest cell and the 8
        around it, its own cell first, at most MAX_VIEW_PLAYERS and MAX_VIEW_PELLETS. Players
        of one cell share one View (and so the encoding of its deltas)."""
        side = self.config.view
        cells: dict[tuple[int, int], list[Player]] = {}
        for p in self.players.values():
            cells.setdefault((int(p.x) // side, int(p.y) // side), []).append(p)
        pellet_cells = self._pellet_views
        pellets = self.pellets
        out: dict[int, View] = {}
        for (cx, cy), members in cells.items():
            seen: list[Player] = []
            eaten: list[int] = []
            for dx, dy in _AOI_ORDER:
                key = (cx + dx, cy + dy)
                if len(seen) < MAX_VIEW_PLAYERS:
                    found = cells.get(key)
                    if found:
                        seen.extend(found)
                if len(eaten) < MAX_VIEW_PELLETS:
                    here = pellet_cells.get(key)
                    if here:
                        eaten.extend(sorted(here))
            seen = seen[:MAX_VIEW_PLAYERS]
            eaten = eaten[:MAX_VIEW_PELLETS]
            pellet_ids = tuple(i | PELLET_BIT for i in eaten)
            pellet_recs = tuple(pellets[i][2] for i in eaten)
            group = View(tuple(p.id for p in seen) + pellet_ids, tuple(p.rec for p in seen) + pellet_recs)
            for n, p in enumerate(members):
                if n < MAX_VIEW_PLAYERS:  # own cell first: the first members are in the group's view
                    out[p.id] = group
                else:  # a crowded cell: this one sees itself and the first others
                    others = seen[: MAX_VIEW_PLAYERS - 1]
                    out[p.id] = View((p.id,) + tuple(o.id for o in others) + pellet_ids, (p.rec,) + tuple(o.rec for o in others) + pellet_recs)
        return out

    # ------------------------------------------------------------------ messages

    def welcome(self, player: Player) -> Welcome:
        cfg = self.config
        return Welcome(player.id, cfg.tick_hz, cfg.width, cfg.height, cfg.radius, cfg.pellet_radius, cfg.max_speed, cfg.view, self.obstacles)

    def board(self) -> Board:
        top = heapq.nlargest(BOARD_SIZE, self.players.values(), key=lambda p: (p.score, -p.id))
        return Board(len(self.players), tuple((p.id, p.score, p.name) for p in top))
