"""Where a hub connection's memory goes: a tracemalloc snapshot diff over N connections.

Runs the hub in this process (on uvloop, under tracemalloc), opens N connections to it from a
``wirehub bench conns`` child process (TCP or WebSocket, each saying hello and joining one
room), and once all are open compares a snapshot taken then with one taken before the first:
the Python allocations (objects, dicts, buffers allocated through Python's allocators, which
picows's objects and its read and write buffers are too) that the N connections hold, by
the line that allocated them, per connection. It also prints the server's RSS per connection
as the child measured it (tracemalloc's own bookkeeping inflates it: the RSS figures of
docs/benchmarks.md come from ``bench/peers.py``, without tracemalloc).

    python bench/conn_memory.py --transport ws --count 2000
    python bench/conn_memory.py --transport tcp --count 2000 --top 15
    python bench/conn_memory.py --transport ws --count 2000 --presence   # default settings

Bounded: the child holds the connections for at most ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import linecache
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import uvloop

from wirehub.hub import Hub

HOST = "127.0.0.1"
ROOM = "idle"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _where(trace: tracemalloc.Statistic | tracemalloc.StatisticDiff, root: str) -> str:
    frame = trace.traceback[0]
    name = frame.filename
    for prefix in (root + os.sep, os.path.dirname(os.__file__) + os.sep):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if "site-packages" + os.sep in name:
        name = name.split("site-packages" + os.sep, 1)[1]
    line = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{name}:{frame.lineno}  {line[:70]}"


async def measure(args: argparse.Namespace) -> dict:
    port, ws_port = _free_port(), _free_port()
    rooms = () if args.presence else (f"{ROOM}:presence=false",)
    hub = Hub(tcp=f"{HOST}:{port}", ws=f"{HOST}:{ws_port}", udp="off", admin="off", log_level="warning", rooms=rooms)
    await hub.start()
    registry = hub.server.registry
    url = f"ws://{HOST}:{ws_port}/" if args.transport == "ws" else f"tcp://{HOST}:{port}"
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    out.close()
    cmd = [sys.executable, "-m", "wirehub", "bench", "conns", "--url", url, "--count", str(args.count),
           "--join", ROOM, "--warmup", "1", "--duration", "3", "--timeout", str(args.timeout),
           "--server-pid", str(os.getpid()), "--json", out.name]
    gc.collect()
    before = tracemalloc.take_snapshot()
    child = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + args.timeout * 2 + args.count / 200
    while len(registry) < args.count and time.monotonic() < deadline and child.returncode is None:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the last joins' replies are written
    open_conns = len(registry)
    gc.collect()
    after = tracemalloc.take_snapshot()
    _, err = await asyncio.wait_for(child.communicate(), args.timeout + 60)
    await hub.stop()
    try:
        with open(out.name) as f:
            result = json.load(f)["results"]
    except (OSError, ValueError, KeyError):
        raise SystemExit(f"wirehub bench conns failed: {err.decode(errors='replace')[-2000:]}") from None
    finally:
        os.unlink(out.name)
    return {"open": open_conns, "before": before, "after": after, "bench": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("ws", "tcp"), default="ws")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--presence", action="store_true", help="default settings (presence on for the room)")
    parser.add_argument("--top", type=int, default=25, help="lines shown")
    parser.add_argument("--frames", type=int, default=1, help="traceback depth grouped by (1: the allocating line)")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    tracemalloc.start(args.frames)
    r = uvloop.run(measure(args))
    n = r["open"]
    if not n:
        raise SystemExit("no connection was open")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stats = r["after"].compare_to(r["before"], "traceback" if args.frames > 1 else "lineno")
    total = sum(s.size_diff for s in stats)
    blocks = sum(s.count_diff for s in stats)
    print(f"{args.transport}: {n:,} connections open (hello + join {ROOM!r}, presence {'on' if args.presence else 'off'})")
    print(f"Python allocations held: {total / n:,.0f} B/conn in {blocks / n:.1f} blocks/conn "
          f"(tracemalloc, {len(stats):,} allocating lines)")
    bench = r["bench"]
    print(f"server RSS: {bench['bytes_per_connection']:,.0f} B/conn (inflated by tracemalloc's own bookkeeping)")
    print()
    print(f"{'B/conn':>8} {'blocks/conn':>11}  allocated at")
    for s in stats[: args.top]:
        print(f"{s.size_diff / n:8.0f} {s.count_diff / n:11.2f}  {_where(s, root)}")
        if args.frames > 1:
            for frame in list(s.traceback)[1:]:
                print(f"{'':21}  < {frame.filename.rsplit(os.sep, 2)[-1]}:{frame.lineno}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
