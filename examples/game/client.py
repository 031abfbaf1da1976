"""A headless UDP client of the game: joins, walks to the nearest pellet it sees, and prints
what it sees once a second. Run it from the repository root against a running server::

    python -m examples.game.client --name alice                # udp://127.0.0.1:7400
    python -m examples.game.client --url udp://127.0.0.1:7400 --seconds 10

:class:`ClientCore` is the client without I/O (``bots.py`` and the tests drive it): it
answers the server's address-validation challenge, decodes snapshots against the ones it
holds and acknowledges the newest, and predicts its own player from the commands the server
has not applied yet (Quake-style: on each snapshot, start from the server's position and
replay the unacknowledged commands). When the server disagrees (a collision, a clamped
command, a cheat), the prediction is corrected: ``corrections`` counts those.
:class:`UdpPlayer` carries it over a UDP socket.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
from collections import deque
from typing import Any, Coroutine
from urllib.parse import urlsplit

from .protocol import (
    MAX_CMDS, PELLET_BIT, POS_SCALE, SNAPSHOT, SNAPSHOT_RING, Bad, Board, Names, Snapshot, Welcome, apply_snapshot, decode_server,
    encode_bye, encode_hello, encode_input,
)
from .world import clamp_velocity, step_position

#: commands a client remembers until the server applies them (four seconds at 30 Hz)
MAX_UNACKED = 120
#: a prediction off by more than this many world units counts as a correction
CORRECTION_EPSILON = 1.0
#: seconds between two HELLOs while waiting for WELCOME, and how many are sent at most
HELLO_RETRY = 0.25
HELLO_TRIES = 20


class ClientCore:
    """One player's side of the protocol, without sockets."""

    def __init__(self, name: str = "player", *, blind: bool = False) -> None:
        self.name = name
        #: blind clients acknowledge snapshots without decoding them (load generators: the
        #: server does the same work; the client spares its CPU)
        self.blind = blind
        self.cookie = b""
        self.welcome: Welcome | None = None
        self.history: dict[int, dict[int, tuple[int, ...]]] = {}
        self.state: dict[int, tuple[int, ...]] = {}  # the newest decoded snapshot: id -> fields
        self.tick = 0  # its tick (acknowledged in every input)
        self.server_ack = 0  # the last of our commands the server applied
        self.seq = 0
        self.unacked: deque[tuple[int, float, float]] = deque(maxlen=MAX_UNACKED)
        self._recent: deque[tuple[int, int]] = deque(maxlen=MAX_CMDS)
        self.x = self.y = 0.0  # predicted position of our player
        self.located = False  # True once a snapshot showed where our player is
        self.board: Board | None = None
        self.names: dict[int, str] = {}
        self.errors: deque[str] = deque(maxlen=8)
        self.bad = 0  # server messages that did not decode
        self.snapshots = 0
        self.corrections = 0
        self.last_correction = 0.0

    @property
    def player(self) -> int:
        return self.welcome.player if self.welcome is not None else 0

    @property
    def token(self) -> int:
        """The session's token from the WELCOME, which every INPUT and BYE carries."""
        return self.welcome.token if self.welcome is not None else 0

    def hello(self) -> bytes:
        return encode_hello(self.name, self.cookie)

    def receive(self, data: bytes) -> list[bytes]:
        """Handle one message from the server; returns the messages to send in answer."""
        if self.blind and data[:1] == bytes((SNAPSHOT,)) and len(data) >= 5:
            self.snapshots += 1
            self.tick = max(self.tick, int.from_bytes(data[1:5], "little"))
            return []
        msg = decode_server(data)
        if isinstance(msg, Snapshot):
            self._snapshot(msg)
        elif isinstance(msg, Welcome):
            self.welcome = msg
        elif isinstance(msg, Board):
            self.board = msg
            self.names.update((pid, name) for pid, _, name in msg.top)
        elif isinstance(msg, Names):
            self.names.update(msg.names)
        elif isinstance(msg, bytes):  # CHALLENGE: prove the address by echoing the cookie
            self.cookie = msg
            return [self.hello()]
        elif isinstance(msg, str):
            self.errors.append(msg)
        else:
            self.bad += 1
            self.errors.append(msg.reason)
        return []

    def _snapshot(self, snap: Snapshot) -> None:
        if snap.tick <= self.tick:
            return  # late or duplicated: a newer one is decoded already
        state = apply_snapshot(self.history.get(snap.base) if snap.base else None, snap)
        if isinstance(state, Bad):
            self.bad += 1
            return
        self.snapshots += 1
        self.history[snap.tick] = state
        while len(self.history) > 2 * SNAPSHOT_RING:
            del self.history[next(iter(self.history))]
        self.tick, self.state, self.server_ack = snap.tick, state, snap.ack
        self._reconcile()

    def _reconcile(self) -> None:
        me = self.state.get(self.player)
        if me is None or self.welcome is None:
            return
        while self.unacked and self.unacked[0][0] <= self.server_ack:
            self.unacked.popleft()
        x, y = me[0] / POS_SCALE, me[1] / POS_SCALE
        for _, vx, vy in self.unacked:
            x, y = self._step(x, y, vx, vy)
        error = math.hypot(x - self.x, y - self.y)
        if error > CORRECTION_EPSILON and self.located:
            self.corrections += 1
            self.last_correction = error
        self.x, self.y = x, y
        self.located = True

    def _step(self, x: float, y: float, vx: float, vy: float) -> tuple[float, float]:
        w = self.welcome
        assert w is not None
        vx, vy, _ = clamp_velocity(vx, vy, w.max_speed)
        return step_position(x, y, vx, vy, 1.0 / w.tick_hz, w.radius, w.width, w.height, w.obstacles)

    def command(self, vx: float, vy: float) -> bytes:
        """The INPUT that asks to move at (vx, vy) world units per second for one tick (with
        the previous commands again, against loss); the move is predicted at once."""
        self.seq += 1
        vx, vy = max(-32768, min(32767, int(vx))), max(-32768, min(32767, int(vy)))
        self.unacked.append((self.seq, vx, vy))
        self._recent.append((vx, vy))
        if self.located and not self.blind:
            self.x, self.y = self._step(self.x, self.y, vx, vy)
        return encode_input(self.token, self.tick, self.seq, self._recent)

    def bye(self) -> bytes:
        return encode_bye(self.token)

    # ------------------------------------------------------------------ what it sees

    def positions(self) -> dict[int, tuple[float, float, int]]:
        """Players in view: id -> (x, y, score), from the newest snapshot."""
        return {pid: (f[0] / POS_SCALE, f[1] / POS_SCALE, f[2]) for pid, f in self.state.items() if not pid & PELLET_BIT}

    def pellets(self) -> list[tuple[float, float]]:
        return [(f[0] / POS_SCALE, f[1] / POS_SCALE) for pid, f in self.state.items() if pid & PELLET_BIT]

    def toward_nearest_pellet(self, rng: random.Random) -> tuple[float, float]:
        """A velocity toward the nearest pellet in view (a random heading when none is)."""
        speed = self.welcome.max_speed if self.welcome is not None else 100
        best = min(self.pellets(), key=lambda p: (p[0] - self.x) ** 2 + (p[1] - self.y) ** 2, default=None)
        if best is None:
            angle = rng.uniform(0, 2 * math.pi)
        else:
            angle = math.atan2(best[1] - self.y, best[0] - self.x) + rng.uniform(-0.3, 0.3)
        return speed * math.cos(angle), speed * math.sin(angle)


class UdpPlayer(asyncio.DatagramProtocol):
    """A :class:`ClientCore` on a UDP socket."""

    def __init__(self, name: str = "player", *, blind: bool = False) -> None:
        self.core = ClientCore(name, blind=blind)
        self.transport: asyncio.DatagramTransport | None = None
        self.welcomed = asyncio.Event()
        self.bytes_in = self.bytes_out = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.bytes_in += len(data)
        for reply in self.core.receive(data):
            self.send(reply)
        if self.core.welcome is not None and not self.welcomed.is_set():
            self.welcomed.set()

    def error_received(self, exc: Exception) -> None:
        self.core.errors.append(f"socket: {exc}")

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.sendto(data)

    async def join(self, host: str, port: int) -> None:
        """Open the socket, HELLO until WELCOME (the first is answered with a challenge)."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, remote_addr=(host, port))
        for _ in range(HELLO_TRIES):
            self.send(self.core.hello())
            try:
                await asyncio.wait_for(self.welcomed.wait(), HELLO_RETRY)
                return
            except asyncio.TimeoutError:
                continue
        self.close()
        raise ConnectionError(f"no WELCOME from udp://{host}:{port} after {HELLO_TRIES} HELLOs: is the game server running there? {list(self.core.errors)}")

    def move(self, vx: float, vy: float) -> None:
        self.send(self.core.command(vx, vy))

    def close(self) -> None:
        if self.transport is not None:
            if self.core.welcome is not None:
                self.send(self.core.bye())
            self.transport.close()


def parse_udp_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "udp" or not parts.hostname or not parts.port:
        raise SystemExit(f"--url must look like udp://127.0.0.1:7400, got {url!r}")
    return parts.hostname, parts.port


async def _main(args: argparse.Namespace) -> None:
    host, port = parse_udp_url(args.url)
    player = UdpPlayer(args.name)
    await player.join(host, port)
    core = player.core
    print(f"joined as player {core.player} ({core.name}); the world is {core.welcome.width}x{core.welcome.height}", flush=True)  # type: ignore[union-attr]
    rng = random.Random()
    loop = asyncio.get_running_loop()
    period = 1.0 / core.welcome.tick_hz  # type: ignore[union-attr]
    start = due = loop.time()
    next_print = start + 1
    try:
        while args.seconds <= 0 or loop.time() - start < args.seconds:
            player.move(*core.toward_nearest_pellet(rng))
            if loop.time() >= next_print:
                next_print += 1
                me = core.positions().get(core.player, (0, 0, 0))
                print(f"tick {core.tick} at ({core.x:.0f}, {core.y:.0f}) score {me[2]} | {len(core.positions())} players and "
                      f"{len(core.pellets())} pellets in view | {core.corrections} corrections", flush=True)
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))
    finally:
        player.close()


def command_line(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options this client and the bots share."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--url", default="udp://127.0.0.1:7400", help="the game server's UDP listener")
    parser.add_argument("--seconds", type=float, default=0, help="leave after this long (0: until Ctrl-C)")
    return parser


def run_command(main: Coroutine[Any, Any, None]) -> int:
    """Run a command's coroutine: 0, or 1 with the reason when the server never answered."""
    try:
        try:
            import uvloop  # a wirehub dependency on Linux: cheaper datagrams for many bots
        except ImportError:
            asyncio.run(main)
        else:
            uvloop.run(main)
    except KeyboardInterrupt:
        pass
    except ConnectionError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = command_line("python -m examples.game.client", __doc__)
    parser.add_argument("--name", default="walker")
    return run_command(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
