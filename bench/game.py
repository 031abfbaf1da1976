"""The multiplayer game example (examples/game) under bots: tick time and bandwidth per player.

The game server runs in this process, on uvloop, exactly as ``wirehub run
examples.game.server:app`` builds it (the default world: 3,200 x 2,000 units, 300 pellets, 10
obstacles, 30 Hz); the bots run in a separate process (``python -m examples.game.bots
--blind``: they send a command every tick and acknowledge every snapshot without decoding
it, so that one bot process can keep up with hundreds; the server does the same work as for
real clients). For each bot count: wait until every bot joined, let it run ``--warmup``
seconds, then measure for ``--seconds``:

- tick time p50 / p99 / max: one tick's simulation, snapshots for every player, and their
  writing to the socket (the flush after the tick), beside the 33.3 ms budget of 30 Hz; and
  the CPU time of the same (on a shared machine the wall time also counts other processes);
- late ticks: ticks that started late (the previous tick, or other work, ran past their time);
- per player and second: datagrams (30 snapshots and one leaderboard) and bytes sent (UDP payload; add 28 B of IP and UDP
  header per datagram on the wire), and bytes received;
- CPU of the server process and of the bots' process (a saturated bot process sends fewer
  inputs: the bytes-in column shows it).

    python bench/game.py                              # 10, 100 and 500 bots, 10 s each
    python bench/game.py --bots 10 --bots 100 --seconds 5 --json out.json

As ``bench/peers.py`` does, the server is pinned to core 0 and the bots to core 1
(``--no-pin`` to leave them to the scheduler).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from examples.game.server import GameApp  # noqa: E402
from wirehub import Server, load_config  # noqa: E402
from wirehub._accelerator import summary as accelerator  # noqa: E402

#: the longest wait for bots to join, or to leave
JOIN_TIMEOUT = 60.0
#: as bench/peers.py does: the server on core 0, the load (the bots) on core 1
SERVER_CORE, BOTS_CORE = 0, 1
PIN = (os.cpu_count() or 1) >= 2


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _until(predicate, what: str, timeout: float = JOIN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/game.py: timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


def _totals(app: GameApp) -> tuple[int, int, int]:
    out = inp = frames = 0
    for session in app.sessions.values():
        out += session.conn.bytes_out
        inp += session.conn.bytes_in
        frames += session.conn.frames_out
    return out, inp, frames


async def measure(app: GameApp, url: str, count: int, warmup: float, seconds: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    bots = subprocess.Popen(
        [sys.executable, "-m", "examples.game.bots", "--url", url, "--count", str(count), "--blind", "--report", "0",
         "--seconds", str(JOIN_TIMEOUT + warmup + seconds + 10), "--seed", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, {BOTS_CORE})) if PIN else None,
    )
    try:
        await _until(lambda: len(app.world.players) >= count or bots.poll() is not None, f"{count} bots to join")
        if bots.poll() is not None:
            raise SystemExit(f"bench/game.py: the bots exited with {bots.returncode}: {bots.stderr.read().decode() if bots.stderr else ''}")
        await asyncio.sleep(warmup)
        app.tick_times.clear()
        app.tick_cpu.clear()
        late0 = app.late_ticks
        out0, in0, frames0 = _totals(app)
        cpu0, bots_cpu0, t0 = _own_cpu(), _cpu_of(bots.pid), time.monotonic()
        await asyncio.sleep(seconds)
        out1, in1, frames1 = _totals(app)
        cpu1, bots_cpu1, t1 = _own_cpu(), _cpu_of(bots.pid), time.monotonic()
        players = len(app.world.players)
        stats = app.stats()
    finally:
        if bots.poll() is None:
            bots.terminate()  # the bots say BYE and leave
        bots.wait(JOIN_TIMEOUT)
    await _until(lambda: not app.world.players, "the bots to leave")
    elapsed = t1 - t0
    per = max(1, players) * elapsed
    return {
        "bots": count,
        "players": players,
        "tick_ms": stats["tick_ms"],
        "tick_cpu_ms": stats["tick_cpu_ms"],
        "tick_budget_ms": stats["tick_budget_ms"],
        "late_ticks": stats["late_ticks"] - late0,
        "ticks": stats["tick_ms"]["samples"],
        "snapshots_per_player_s": round((frames1 - frames0) / per, 1),
        "bytes_out_per_player_s": round((out1 - out0) / per),
        "bytes_in_per_player_s": round((in1 - in0) / per),
        "server_cpu": round((cpu1 - cpu0) / elapsed, 2),
        "bots_cpu": round((bots_cpu1 - bots_cpu0) / elapsed, 2),
        "seconds": round(elapsed, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| bots | tick p50 | tick p99 | tick max | tick CPU p50 | tick CPU p99 | budget | late ticks | datagrams/s per player | bytes/s per player out | bytes/s per player in | server CPU | bots CPU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        t, c = r["tick_ms"], r["tick_cpu_ms"]
        lines.append(
            f"| {r['bots']} | {t['p50']:.2f} ms | {t['p99']:.2f} ms | {t['max']:.2f} ms | {c['p50']:.2f} ms | {c['p99']:.2f} ms | "
            f"{r['tick_budget_ms']:.1f} ms | "
            f"{r['late_ticks']} of {r['ticks']} | {r['snapshots_per_player_s']} | {r['bytes_out_per_player_s']:,} | "
            f"{r['bytes_in_per_player_s']:,} | {r['server_cpu']:.0%} | {r['bots_cpu']:.0%} |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    app = GameApp()
    config = load_config(env={}, flags={"udp": "127.0.0.1:0", "tcp": "off", "ws": "off", "admin": "off", "log_level": "warning"})
    server = Server(app, config)
    await server.start()
    rows = []
    try:
        url = f"udp://{server.addresses['udp'][0]}"
        for count in args.bots:
            row = await measure(app, url, count, args.warmup, args.seconds)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    finally:
        server.request_stop()
        await server.shutdown()
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bots", type=int, action="append", help="bot count (repeatable; default 10, 100, 500)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per bot count")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to core 0 and the bots to core 1")
    args = parser.parse_args()
    args.bots = args.bots or [10, 100, 500]
    global PIN
    PIN = PIN and not args.no_pin
    if PIN:
        os.sched_setaffinity(0, {SERVER_CORE})
    logging.basicConfig(level=logging.WARNING)
    import uvloop

    print(f"game bench: server accelerator {accelerator()}, bots in a separate process (--blind), "
          f"{'server on core 0, bots on core 1, ' if PIN else ''}{args.warmup:g} s warm-up, {args.seconds:g} s measured per row, "
          f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    print(table([]), flush=True)
    rows = uvloop.run(main(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    cli()
