"""Bots: many UDP players in one process, each on its own socket, sending a command every
tick. Run them from the repository root against a running game server::

    python -m examples.game.bots --count 100                 # until Ctrl-C
    python -m examples.game.bots --count 500 --seconds 30 --blind

A bot walks to the nearest pellet it sees (decoding every snapshot, as a real client does).
``--blind`` bots wander instead and acknowledge each snapshot without decoding it: the
server's work is the same, the bots' CPU is spared (the benchmark uses them). Every
``--report`` seconds a line says how many bots play and what they receive.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import time

from .client import UdpPlayer, command_line, parse_udp_url, run_command

#: bots that say HELLO at the same time while joining
JOIN_BATCH = 50


class Bots:
    def __init__(self, host: str, port: int, count: int, *, blind: bool = False, seed: int | None = None) -> None:
        self.host, self.port = host, port
        self.count = count
        self.blind = blind
        self.rng = random.Random(seed)
        self.players: list[UdpPlayer] = []
        self._headings: list[float] = []

    async def join(self) -> None:
        for first in range(0, self.count, JOIN_BATCH):
            batch = [UdpPlayer(f"bot{i}", blind=self.blind) for i in range(first, min(self.count, first + JOIN_BATCH))]
            await asyncio.gather(*(p.join(self.host, self.port) for p in batch))
            self.players.extend(batch)
            self._headings.extend(self.rng.uniform(0, 2 * math.pi) for _ in batch)

    def step(self) -> None:
        """One command from every bot."""
        rng = self.rng
        for i, player in enumerate(self.players):
            core = player.core
            if self.blind:
                if rng.random() < 0.03:  # a new heading every second or so
                    self._headings[i] = rng.uniform(0, 2 * math.pi)
                speed = core.welcome.max_speed if core.welcome is not None else 100
                player.move(speed * math.cos(self._headings[i]), speed * math.sin(self._headings[i]))
            else:
                player.move(*core.toward_nearest_pellet(rng))

    def close(self) -> None:
        for player in self.players:
            player.close()

    def report(self, seconds: float) -> str:
        n = max(1, len(self.players))
        received = sum(p.bytes_in for p in self.players)
        snaps = sum(p.core.snapshots for p in self.players)
        return (f"{len(self.players)} bots | {snaps / n / seconds:.1f} snapshots/s and {received / n / seconds:.0f} B/s per bot "
                f"| {sum(p.core.corrections for p in self.players)} corrections")


async def run(args: argparse.Namespace) -> None:
    host, port = parse_udp_url(args.url)
    bots = Bots(host, port, args.count, blind=args.blind, seed=args.seed)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await bots.join()
        tick_hz = bots.players[0].core.welcome.tick_hz if bots.players and bots.players[0].core.welcome else 30
        print(f"{len(bots.players)} bots joined udp://{host}:{port}", flush=True)
        period = 1.0 / tick_hz
        start = due = loop.time()
        last_report = time.monotonic()
        while not stop.is_set() and (args.seconds <= 0 or loop.time() - start < args.seconds):
            bots.step()
            due += period
            if due < loop.time():  # behind (too many bots for this CPU): do not burst
                due = loop.time()
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
            except asyncio.TimeoutError:
                pass
            if args.report > 0 and time.monotonic() - last_report >= args.report:
                now = time.monotonic()
                print(bots.report(now - last_report), flush=True)
                for p in bots.players:
                    p.bytes_in = 0
                    p.core.snapshots = 0
                last_report = now
    finally:
        bots.close()


def main(argv: list[str] | None = None) -> int:
    parser = command_line("python -m examples.game.bots", __doc__)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--blind", action="store_true", help="wander and acknowledge snapshots without decoding them")
    parser.add_argument("--report", type=float, default=5.0, help="seconds between two report lines (0: none)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 5000:
        parser.error("--count must be from 1 to 5000")
    return run_command(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
