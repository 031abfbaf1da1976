"""wirehub against its peers, side by side, on this machine: the table in docs/benchmarks.md.

For every row it starts the peer server and the wirehub server (each a process of its own,
on a free loopback port, pinned to core 0 with ``taskset`` when there are two cores or more),
runs the same ``wirehub bench`` load against each (pinned to core 1), alternating wirehub
and peer runs (A B B A ..., so that drift hits both), takes the median of N runs, and writes
the table with the ratios, the spread, the versions, the load generator's CPU use and the
exact commands.

    python bench/peers.py                                 # every row, 3 runs each (20-25 min)
    python bench/peers.py --only line-p1,hub-tcp-p16      # some rows
    python bench/peers.py --quick --only line-p1          # a smoke run: 1 run, seconds-long steps
    python bench/peers.py --markdown docs/benchmarks.md   # write the table into the docs
    python bench/peers.py --list                          # the rows

Each server is stopped by its process id when its run ends, also on Ctrl-C or an error. The
machine's own redis-server (6379) and nats-server (4222) are never used: the script starts
its own on free ports. Needs redis-server, nats-server and node (v20) for their rows (rows
whose peer is missing are skipped and say so); `npm ci --prefix bench/node` is run when the
Node ``ws`` package is not installed yet.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from wirehub.server.supervisor import raise_open_file_limit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
NODE_DIR = os.path.join(HERE, "node")
HOST = "127.0.0.1"
ROOM = "bench"
IDLE_ROOM = "idle"
SHARED_PORTS = {6379, 4222}  # the machine's own redis-server and nats-server: never touched


# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """How long and how big each kind of load is; --quick makes everything small."""

    runs: int = 3
    seconds: float = 5.0  # echo: measured seconds per run
    warmup: float = 1.0
    connections: int = 100
    size: int = 64
    subscribers: int = 1000
    fan_rate: float = 500.0  # the ramp's first rate (publications/s)
    fan_factor: float = 1.25
    fan_steps: int = 20
    fan_seconds: float = 3.0  # per ramp step
    fan_drain: float = 2.0
    max_p99: float = 100.0
    conns: int = 19000
    conns_settle: float = 2.0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(runs=1, seconds=1.0, warmup=0.3, subscribers=200, fan_rate=500.0, fan_factor=2.0, fan_steps=3,
                   fan_seconds=1.0, fan_drain=1.0, conns=1000, conns_settle=0.5)


# ----------------------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    """A server: its command (``{tcp}``, ``{ws}``, ``{admin}`` are ports), which of those ports
    it listens on, and what it needs installed."""

    name: str
    argv: list[str]
    ports: tuple[str, ...] = ("tcp",)
    needs: str = ""  # an executable that must exist (redis-server, nats-server, node), or py:MODULE
    #: a broker started first, on port ``{broker}``, and measured as part of the server
    #: (``"redis"`` or ``"nats"``, the latter with JetStream)
    broker: str = ""

    def command(self, ports: dict[str, int]) -> list[str]:
        return [a.format(**ports) for a in self.argv]

    def shown(self) -> str:
        names = {"tcp": "$P", "ws": "$P_WS", "admin": "$P_ADMIN", "broker": "$P_BROKER"}
        argv = self.argv[len(WIREHUB) - 1 :] if self.argv[: len(WIREHUB)] == WIREHUB else self.argv  # wirehub ...
        return " ".join(_show_arg(a.format(**names)) for a in argv)


def _show_arg(arg: str) -> str:
    if arg == sys.executable:
        return "python"
    if arg.startswith(ROOT + os.sep):
        return os.path.relpath(arg, ROOT)
    return arg if "$" in arg and " " not in arg and "'" not in arg else shlex.quote(arg)


WIREHUB = [sys.executable, "-m", "wirehub"]
HUB_ARGS = ["serve", "--tcp", HOST + ":{tcp}", "--ws", HOST + ":{ws}", "--admin", HOST + ":{admin}",
            "--udp", HOST + ":{tcp}", "--log-level", "warning"]

SERVERS: dict[str, ServerSpec] = {
    "wirehub-echo": ServerSpec(
        "wirehub run wirehub.apps.echo:app (the framework, line framing)",
        WIREHUB + ["run", "wirehub.apps.echo:app", "--tcp", HOST + ":{tcp}", "--ws", "off", "--udp", "off",
                   "--admin", "off", "--log-level", "warning"]),
    "wirehub-hub": ServerSpec(
        "wirehub serve (the hub, default settings, memory broker)", WIREHUB + HUB_ARGS, ("tcp", "ws", "admin")),
    "wirehub-hub-redis": ServerSpec(
        "wirehub serve --broker redis:// (one node, its own redis-server)",
        WIREHUB + HUB_ARGS + ["--broker", "redis://" + HOST + ":{broker}/0"], ("tcp", "ws", "admin"), "redis-server",
        broker="redis"),
    "wirehub-hub-redis-w2": ServerSpec(
        "wirehub serve --broker redis:// --workers 2 (its own redis-server)",
        WIREHUB + HUB_ARGS + ["--broker", "redis://" + HOST + ":{broker}/0", "--workers", "2"], ("tcp", "ws", "admin"),
        "redis-server", broker="redis"),
    "wirehub-hub-nats": ServerSpec(
        "wirehub serve --broker nats:// (one node, its own nats-server with JetStream)",
        WIREHUB + HUB_ARGS + ["--broker", "nats://" + HOST + ":{broker}"], ("tcp", "ws", "admin"), "nats-server",
        broker="nats"),
    "wirehub-hub-hook": ServerSpec(
        "wirehub serve --app bench/apps/pub_hook.py:hub (an on_publish hook for every room, returning the data "
        "unchanged)", WIREHUB + HUB_ARGS + ["--app", os.path.join(ROOT, "bench", "apps", "pub_hook.py") + ":hub"],
        ("tcp", "ws", "admin")),
    "wirehub-hub-nopresence": ServerSpec(
        f"wirehub serve --rooms '{IDLE_ROOM}:presence=false'",
        WIREHUB + HUB_ARGS + ["--rooms", f"{IDLE_ROOM}:presence=false"], ("tcp", "ws", "admin")),
    "uvloop": ServerSpec("bare uvloop asyncio.Protocol echo server",
                         [sys.executable, os.path.join(PEERS, "uvloop_echo.py"), "{tcp}"]),
    "node-net": ServerSpec("Node.js net echo server", ["node", os.path.join(PEERS, "net_echo.js"), "{tcp}"],
                           needs="node"),
    "node-ws": ServerSpec("Node.js ws echo server", ["node", os.path.join(PEERS, "ws_echo.js"), "{tcp}"],
                          needs="node"),
    "picows": ServerSpec("picows echo server", [sys.executable, os.path.join(PEERS, "picows_echo.py"), "{tcp}"],
                         needs="py:picows"),  # pip install -e '.[bench]'
    "websockets": ServerSpec("websockets echo server",
                             [sys.executable, os.path.join(PEERS, "websockets_echo.py"), "{tcp}"]),
    "redis": ServerSpec("redis-server", ["redis-server", "--port", "{tcp}", "--bind", HOST, "--save", "", "--appendonly",
                                         "no", "--maxclients", "19500", "--daemonize", "no",
                                         # bound to 127.0.0.1 only; protected mode would refuse the
                                         # 127.0.0.2-20 source addresses the connection count uses
                                         "--protected-mode", "no"], needs="redis-server"),
    "nats": ServerSpec("nats-server", ["nats-server", "-a", HOST, "-p", "{tcp}"], needs="nats-server"),
}


# ----------------------------------------------------------------------------- what is measured


@dataclass
class Side:
    """One measurement: a server and the load run against it."""

    key: str
    server: str
    mode: str  # echo | fanout | conns
    url: str  # with {tcp} / {ws}
    args: Callable[[Settings], list[str]]
    label: str

    def load_args(self, s: Settings, ports: dict[str, int] | None = None) -> list[str]:
        names = ports or {"tcp": "$P", "ws": "$P_WS", "admin": "$P_ADMIN"}
        return [self.mode, "--url", self.url.format(**names)] + self.args(s)


def _echo(protocol: str, pipeline: int) -> Callable[[Settings], list[str]]:
    def args(s: Settings) -> list[str]:
        out = ["--protocol", protocol, "--connections", str(s.connections), "--pipeline", str(pipeline)]
        if protocol in ("line", "resp"):
            out += ["--size", str(s.size)]
        return out + ["--duration", f"{s.seconds:g}", "--warmup", f"{s.warmup:g}"]

    return args


def _fanout(protocol: str) -> Callable[[Settings], list[str]]:
    def args(s: Settings) -> list[str]:
        return ["--protocol", protocol, "--subscribers", str(s.subscribers), "--size", str(s.size), "--room", ROOM,
                "--rate", f"{s.fan_rate:g}", "--ramp", "--ramp-factor", f"{s.fan_factor:g}", "--max-steps",
                str(s.fan_steps), "--max-p99", f"{s.max_p99:g}", "--duration", f"{s.fan_seconds:g}", "--warmup",
                f"{s.warmup:g}", "--drain", f"{s.fan_drain:g}"]

    return args


def _conns(join: bool) -> Callable[[Settings], list[str]]:
    def args(s: Settings) -> list[str]:
        # --timeout 30: with presence on, every join is announced to every member, so the
        # last joins of 19,000 wait behind a lot of traffic
        return (["--count", str(s.conns)] + (["--join", IDLE_ROOM] if join else [])
                + ["--warmup", f"{s.conns_settle:g}", "--timeout", "30"])

    return args


#: what a peer WebSocket server (an echo server) is sent by each connection in the
#: WebSocket connection rows: one frame, answered by its echo
WS_FIRST_FRAME = '{"op":"ping"}'


def _ws_conns(join: bool) -> Callable[[Settings], list[str]]:
    """The WebSocket connection rows: each connection upgrades, then joins (the hub) or
    sends one frame and gets its echo (a peer), then holds."""

    def args(s: Settings) -> list[str]:
        first = ["--join", IDLE_ROOM] if join else ["--send", WS_FIRST_FRAME]
        return ["--count", str(s.conns)] + first + ["--warmup", f"{s.conns_settle:g}", "--timeout", "30"]

    return args


TCP, WS = "tcp://" + HOST + ":{tcp}", "ws://" + HOST + ":{ws}/"
PEER_WS = "ws://" + HOST + ":{tcp}/"  # the peers' WebSocket servers listen on their one port

SIDES = {s.key: s for s in [
    Side("wh-line-p1", "wirehub-echo", "echo", TCP, _echo("line", 1), "wirehub echo app, line p1"),
    Side("uv-line-p1", "uvloop", "echo", TCP, _echo("line", 1), "uvloop echo, line p1"),
    Side("node-line-p1", "node-net", "echo", TCP, _echo("line", 1), "Node net echo, line p1"),
    Side("wh-line-p16", "wirehub-echo", "echo", TCP, _echo("line", 16), "wirehub echo app, line p16"),
    Side("redis-echo-p16", "redis", "echo", "redis://" + HOST + ":{tcp}", _echo("resp", 16), "redis-server ECHO p16"),
    Side("uv-line-p16", "uvloop", "echo", TCP, _echo("line", 16), "uvloop echo, line p16"),
    Side("node-line-p16", "node-net", "echo", TCP, _echo("line", 16), "Node net echo, line p16"),
    Side("wh-hub-tcp-p16", "wirehub-hub", "echo", TCP, _echo("hub", 16), "wirehub hub ping, TCP p16"),
    Side("wh-hub-ws-p16", "wirehub-hub", "echo", WS, _echo("hub", 16), "wirehub hub ping, WebSocket p16"),
    Side("node-ws-p16", "node-ws", "echo", PEER_WS, _echo("raw", 16), "Node ws echo, p16"),
    Side("picows-p16", "picows", "echo", PEER_WS, _echo("raw", 16), "picows echo, p16"),
    Side("websockets-p16", "websockets", "echo", PEER_WS, _echo("raw", 16), "websockets echo, p16"),
    Side("wh-fanout", "wirehub-hub", "fanout", TCP, _fanout("hub"), "wirehub hub fan-out (TCP)"),
    Side("redis-fanout", "redis", "fanout", "redis://" + HOST + ":{tcp}", _fanout("redis"), "redis-server pub/sub"),
    Side("nats-fanout", "nats", "fanout", "nats://" + HOST + ":{tcp}", _fanout("nats"), "nats-server pub/sub"),
    Side("wh-fanout-redis", "wirehub-hub-redis", "fanout", TCP, _fanout("hub"), "wirehub hub fan-out on redis:// (TCP)"),
    Side("wh-fanout-nats", "wirehub-hub-nats", "fanout", TCP, _fanout("hub"), "wirehub hub fan-out on nats:// (TCP)"),
    Side("wh-ping-ref-p16", "wirehub-hub", "echo", TCP, _echo("hub-ref", 16), "wirehub hub ping with a ref, TCP p16"),
    Side("wh-pub-p16", "wirehub-hub", "echo", TCP, _echo("hub-pub", 16), "wirehub hub pub with a ref, memory://, p16"),
    Side("wh-pub-hook-p16", "wirehub-hub-hook", "echo", TCP, _echo("hub-pub", 16),
         "wirehub hub pub with a ref, memory://, an on_publish hook, p16"),
    Side("wh-pub-redis-p16", "wirehub-hub-redis", "echo", TCP, _echo("hub-pub", 16),
         "wirehub hub pub with a ref, redis://, p16"),
    Side("wh-pub-redis-w2-p16", "wirehub-hub-redis-w2", "echo", TCP, _echo("hub-pub", 16),
         "wirehub hub pub with a ref, redis://, --workers 2, p16"),
    Side("redis-xadd-p16", "redis", "echo", "redis://" + HOST + ":{tcp}", _echo("resp-xadd", 16),
         "redis-server XADD MAXLEN ~ 100 p16"),
    Side("wh-conns", "wirehub-hub", "conns", TCP, _conns(True), "wirehub hub, joined, default settings"),
    Side("wh-conns-nopresence", "wirehub-hub-nopresence", "conns", TCP, _conns(True),
         "wirehub hub, joined, presence off for the room"),
    Side("uv-conns", "uvloop", "conns", TCP, _conns(False), "uvloop server, idle"),
    Side("node-conns", "node-net", "conns", TCP, _conns(False), "Node net server, idle"),
    Side("redis-conns", "redis", "conns", TCP, _conns(False), "redis-server, idle"),
    Side("nats-conns", "nats", "conns", TCP, _conns(False), "nats-server, idle (no CONNECT sent)"),
    Side("wh-ws-conns", "wirehub-hub", "conns", WS, _ws_conns(True), "wirehub hub over WebSocket, joined, default settings"),
    Side("wh-ws-conns-nopresence", "wirehub-hub-nopresence", "conns", WS, _ws_conns(True),
         "wirehub hub over WebSocket, joined, presence off for the room"),
    Side("node-ws-conns", "node-ws", "conns", PEER_WS, _ws_conns(False), "Node ws echo server, one frame echoed"),
    Side("picows-conns", "picows", "conns", PEER_WS, _ws_conns(False), "picows echo server, one frame echoed"),
]}


@dataclass
class Row:
    id: str
    group: str  # rows of a group are measured together, round after round
    figure: str
    wirehub: str  # side keys
    peer: str | None
    unit: str  # msgs/s | deliveries/s | B/conn | conns/s (a conns run's rate of opening)
    target: tuple[str, float] | None = None  # (">=", ratio), ("<=", ratio) or ("<=KB", kilobytes)
    note: str = ""

    @property
    def sides(self) -> list[str]:
        return [self.wirehub] + ([self.peer] if self.peer else [])


ROWS = [
    Row("line-p1", "line-p1", "framework line echo, 64 B, pipeline 1 — vs bare uvloop Protocol echo",
        "wh-line-p1", "uv-line-p1", "msgs/s", (">=", 0.9)),
    Row("line-p1-node", "line-p1", "framework line echo, 64 B, pipeline 1 — vs Node net echo (context)",
        "wh-line-p1", "node-line-p1", "msgs/s"),
    Row("line-p16", "line-p16", "framework line echo, 64 B, pipeline 16 — vs redis-server ECHO",
        "wh-line-p16", "redis-echo-p16", "msgs/s", (">=", 1.2)),
    Row("line-p16-uvloop", "line-p16", "framework line echo, 64 B, pipeline 16 — vs bare uvloop echo (context)",
        "wh-line-p16", "uv-line-p16", "msgs/s"),
    Row("line-p16-node", "line-p16", "framework line echo, 64 B, pipeline 16 — vs Node net echo (context)",
        "wh-line-p16", "node-line-p16", "msgs/s"),
    Row("hub-tcp-p16", "hub-tcp-p16", "hub ping→pong over TCP, pipeline 16 — vs redis-server ECHO 64 B",
        "wh-hub-tcp-p16", "redis-echo-p16", "msgs/s", (">=", 1.0)),
    Row("hub-ws-p16", "hub-ws-p16", "hub ping→pong over WebSocket, pipeline 16 — vs Node ws echo of the same bytes",
        "wh-hub-ws-p16", "node-ws-p16", "msgs/s", (">=", 1.0)),
    Row("hub-ws-p16-picows", "hub-ws-p16", "hub over WebSocket, pipeline 16 — vs picows echo (context)",
        "wh-hub-ws-p16", "picows-p16", "msgs/s"),
    Row("hub-ws-p16-websockets", "hub-ws-p16", "hub over WebSocket, pipeline 16 — vs websockets echo (context)",
        "wh-hub-ws-p16", "websockets-p16", "msgs/s"),
    Row("fanout", "fanout", "hub fan-out 1 → {subs} subscribers, 64 B: deliveries/s at the highest clean ramp step "
        "(p99 ≤ 100 ms, no loss) — vs redis-server pub/sub", "wh-fanout", "redis-fanout", "deliveries/s", (">=", 1.0)),
    Row("fanout-nats", "fanout", "hub fan-out 1 → {subs} subscribers — vs nats-server (context)",
        "wh-fanout", "nats-fanout", "deliveries/s"),
    Row("fanout-redis", "fanout", "hub on redis:// (one node, its own redis-server on the server's core) fan-out 1 → "
        "{subs} subscribers, 64 B — vs redis-server pub/sub", "wh-fanout-redis", "redis-fanout", "deliveries/s",
        (">=", 1.0)),
    Row("fanout-nats-broker", "fanout", "hub on nats:// (one node, its own nats-server with JetStream on the server's "
        "core) fan-out 1 → {subs} subscribers, 64 B — vs nats-server core pub/sub", "wh-fanout-nats", "nats-fanout",
        "deliveries/s", (">=", 1.0)),
    Row("ping-ref", "hub-tcp-p16", "hub ping with a ref (the general frame path) over TCP, pipeline 16 — vs "
        "redis-server ECHO 64 B", "wh-ping-ref-p16", "redis-echo-p16", "msgs/s", (">=", 1.0)),
    Row("pub-memory", "pub", "hub pub with a ref, 64 B, 100 rooms, pipeline 16, memory:// — vs redis-server XADD "
        "MAXLEN ~ 100", "wh-pub-p16", "redis-xadd-p16", "msgs/s", (">=", 1.0)),
    Row("pub-hook", "pub", "hub pub with a ref, 64 B, 100 rooms, pipeline 16, memory://, with a plain on_publish hook "
        "for every room that returns the data unchanged — vs the same without hooks (the cost of a hook)",
        "wh-pub-hook-p16", "wh-pub-p16", "msgs/s"),
    Row("pub-redis", "pub", "hub pub with a ref, 64 B, 100 rooms, pipeline 16, on redis:// (its redis-server on the "
        "server's core) — vs the same on memory://", "wh-pub-redis-p16", "wh-pub-p16", "msgs/s", (">=", 0.5)),
    Row("pub-redis-workers", "pub", "hub pub with a ref on redis://, --workers 2 — vs --workers 1 (context: two "
        "workers and redis share the server's one core)", "wh-pub-redis-w2-p16", "wh-pub-redis-p16", "msgs/s"),
    Row("conns-nopresence", "conns", "idle hub connections joined to a room, RSS per connection at {conns} "
        "(presence off for the room)", "wh-conns-nopresence", None, "B/conn", ("<=KB", 4.0)),
    Row("conns", "conns", "idle hub connections joined to a room, RSS per connection at {conns} (default settings: "
        "presence on, so each join was announced to every member; context)", "wh-conns", None, "B/conn"),
    Row("conns-uvloop", "conns", "idle connections, RSS per connection — wirehub (joined, presence off) vs bare "
        "uvloop server (context; lower is better)", "wh-conns-nopresence", "uv-conns", "B/conn"),
    Row("conns-node", "conns", "idle connections, RSS per connection — vs Node net server (context)",
        "wh-conns-nopresence", "node-conns", "B/conn"),
    Row("conns-redis", "conns", "idle connections, RSS per connection — vs redis-server (context)",
        "wh-conns-nopresence", "redis-conns", "B/conn"),
    Row("conns-nats", "conns", "idle connections, RSS per connection — vs nats-server (context)",
        "wh-conns-nopresence", "nats-conns", "B/conn"),
    Row("ws-conns", "ws-conns", "WebSocket hub connections joined to a room, RSS per connection at {conns} (default "
        "settings) — vs Node ws echo server, each connection having sent one frame (lower is better)",
        "wh-ws-conns", "node-ws-conns", "B/conn", ("<=", 1.0)),
    Row("ws-conns-tcp", "ws-conns", "WebSocket hub connections joined to a room, RSS per connection at {conns} — vs "
        "the same over TCP (default settings)", "wh-ws-conns", "wh-conns", "B/conn", ("<=", 2.0)),
    Row("ws-conns-picows", "ws-conns", "WebSocket hub connections, RSS per connection — vs bare picows echo server "
        "(context: the library wirehub's WebSocket transport used before)", "wh-ws-conns", "picows-conns", "B/conn"),
    Row("ws-accept", "ws-conns", "WebSocket connections opened per second while opening {conns}, each upgrading, "
        "saying hello and joining one room (default settings) — vs Node ws echo server (upgrade, one frame echoed)",
        "wh-ws-conns", "node-ws-conns", "conns/s", (">=", 1.0)),
    Row("ws-accept-nopresence", "ws-conns", "WebSocket connections opened per second, joining a room with presence "
        "off (the transport's own cost) — vs Node ws echo server (context)", "wh-ws-conns-nopresence",
        "node-ws-conns", "conns/s"),
    Row("ws-conns-nopresence", "ws-conns", "WebSocket hub connections joined to a room with presence off, RSS per "
        "connection — vs Node ws echo server (context)", "wh-ws-conns-nopresence", "node-ws-conns", "B/conn"),
    Row("ws-conns-nopresence-tcp", "ws-conns", "WebSocket hub connections joined to a room with presence off, RSS per "
        "connection — vs the same over TCP (context)", "wh-ws-conns-nopresence", "wh-conns-nopresence", "B/conn"),
]
ROW_IDS = [r.id for r in ROWS]
SCALE_NOTE = ("The 19,000-connection rows assume the open-file limit of this machine (20,000); "
              "the script raises each child's soft limit to the hard one.")


# ----------------------------------------------------------------------------- processes


def pinned(cmd: list[str], core: int, pin: bool) -> list[str]:
    return ["taskset", "-c", str(core)] + cmd if pin else cmd


def free_port(udp_too: bool = False) -> int:
    """A loopback TCP port nobody listens on (and a free UDP port of the same number)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port in SHARED_PORTS:
            continue
        if udp_too:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port")


def child_env() -> dict[str, str]:
    """The environment of every child: no WIREHUB_* (defaults are what is measured)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIREHUB_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")) if p)
    return env


BROKERS = {  # the broker a hub side runs on: its own process, on the server's core
    "redis": ["redis-server", "--port", "{broker}", "--bind", HOST, "--save", "", "--appendonly", "no", "--daemonize", "no"],
    "nats": ["nats-server", "-a", HOST, "-p", "{broker}", "-js", "-sd", "{store}"],
}


class Server:
    """A server process started for one run (after its broker, if it has one), stopped by
    its process id."""

    def __init__(self, spec: ServerSpec, pin: bool, log_dir: str) -> None:
        self.spec = spec
        self.ports = {"tcp": free_port(udp_too=True)}
        for name in spec.ports[1:]:
            self.ports[name] = free_port()
        self.broker: Server | None = None
        if spec.broker:
            self.ports["broker"] = free_port()
            store = tempfile.mkdtemp(prefix="peers-js-", dir=log_dir)
            argv = [a.format(broker=self.ports["broker"], store=store) for a in BROKERS[spec.broker]]
            self.broker = Server(ServerSpec(spec.broker + "-server (the hub's broker)", argv), pin, log_dir)
            self.broker.ports = {"tcp": self.ports["broker"]}
            self.broker.argv = pinned(argv, 0, pin)
        self.argv = pinned(spec.command(self.ports), 0, pin)
        self.log_path = os.path.join(log_dir, f"server-{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def pids(self) -> list[int]:
        """The processes whose CPU is the server's: the hub and its broker."""
        return [self.pid] + ([self.broker.pid] if self.broker is not None else [])

    def start(self, timeout: float = 30.0) -> None:
        if self.broker is not None:
            self.broker.start(timeout)
        with open(self.log_path, "wb") as log:
            # its own session: a Ctrl-C in the terminal reaches the script, which stops it
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=child_env(), preexec_fn=raise_open_file_limit, start_new_session=True)
        deadline = time.monotonic() + timeout
        for name in self.spec.ports:  # ready when every port it serves accepts a connection
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    socket.create_connection((HOST, self.ports[name]), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.spec.name} did not listen on {self.ports[name]} within {timeout:g} s")
                    time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # taskset execs the server: the same process

    def log_tail(self, n: int = 600) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                pass
        if self.broker is not None:
            self.broker.stop()


def core_times() -> dict[str, tuple[int, int]]:
    from wirehub.bench.runner import core_times as ct

    return ct()


def background(seconds: float, server_pid: int, server_core: str | None) -> dict[str, float]:
    """Each core's busy fraction over ``seconds`` with the server up and no load, less the
    server's own CPU use on its core: what else runs on the machine."""
    from wirehub.bench.runner import core_busy, process_cpu_seconds

    c0, t0, before = process_cpu_seconds(server_pid), time.monotonic(), core_times()
    time.sleep(seconds)
    busy = core_busy(before, core_times())
    c1, t1 = process_cpu_seconds(server_pid), time.monotonic()
    if server_core in busy and c0 is not None and c1 is not None:
        busy[server_core] = round(max(0.0, busy[server_core] - (c1 - c0) / (t1 - t0)), 3)
    return busy


def bench_timeout(side: Side, s: Settings) -> float:
    if side.mode == "echo":
        return s.warmup + s.seconds + 120
    if side.mode == "fanout":
        return s.fan_steps * (s.warmup + s.fan_seconds + s.fan_drain + 12) + 120
    return s.conns / 100 + s.conns_settle + 240


def run_bench(side: Side, server: Server, s: Settings, pin: bool, out_path: str) -> tuple[dict | None, str]:
    """``wirehub bench`` against a running server; the JSON document and the error text."""
    if os.path.exists(out_path):  # a previous session's, in a reused --results directory
        os.remove(out_path)
    pids = [a for pid in server.pids for a in ("--server-pid", str(pid))]
    args = side.load_args(s, server.ports) + pids + ["--json", out_path, "--quiet"]
    cmd = pinned(WIREHUB + ["bench"] + args, 1, pin)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=ROOT, env=child_env(), preexec_fn=raise_open_file_limit, text=True)
    try:
        out, err = proc.communicate(timeout=bench_timeout(side, s))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # it stops its load processes on the way out
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return None, "the load generator did not finish in time"
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    doc = None
    if os.path.exists(out_path):
        with open(out_path) as f:
            doc = json.load(f)
    error = ""
    if proc.returncode != 0:
        error = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return doc, error


# ----------------------------------------------------------------------------- one measurement


@dataclass
class Run:
    side: str
    group: str
    value: float | None
    error: str = ""
    loader_cpu: float | None = None
    loader_saturated: bool = False
    server_cpu: float | None = None
    server_user: float | None = None  # of server_cpu, the cores spent in user mode
    cores_busy: dict[str, float] = field(default_factory=dict)
    background: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    json_path: str = ""


def summarise(side: Side, doc: dict | None, error: str) -> Run:
    """The figure of one run, and how busy the load generator and the server were."""
    run = Run(side.key, "", None, error)
    if doc is None:
        run.error = error or "no result"
        return run
    r = doc["results"]
    cpu = None
    if side.mode == "echo":
        if not r["errors"] and not r["stalled_connections"]:
            run.value = r["msgs_per_s"]
        else:
            run.error = run.error or r["error"] or f"{r['stalled_connections']} stalled connections"
        cpu = r.get("cpu")
        run.detail = {"p50_ms": r["latency_ms"].get("p50"), "p99_ms": r["latency_ms"].get("p99")}
    elif side.mode == "fanout":
        steps = r["steps"]
        clean = [k for k, st in enumerate(steps) if st["clean"]]
        if clean:
            best = steps[clean[-1]]
            # the step's rate x subscribers: a clean step delivered every publication to every
            # subscriber, so this is what it sustained (the deliveries counted inside the
            # measured window differ from it by a fraction of a percent, window edges)
            run.value = best["rate"] * best["subscribers"]
            cpu = best.get("cpu")
            run.detail = {"rate": best["rate"], "measured_deliveries_per_s": r["highest_clean_deliveries_per_s"],
                          "p50_ms": best["latency_ms"].get("p50"),
                          "p99_ms": best["latency_ms"].get("p99"),
                          "reads": best.get("subscriber_reads"), "received": best.get("received")}
        else:
            run.error = run.error or "no clean ramp step: " + "; ".join(steps[0]["problems"] if steps else [])
        if clean:
            nxt = steps[clean[-1] + 1] if clean[-1] + 1 < len(steps) else None
        else:
            nxt = steps[0] if steps else None
        if nxt is not None:
            ncpu = nxt.get("cpu") or {}
            run.detail["stopped_at"] = {
                "rate": nxt["rate"], "problems": nxt["problems"],
                "loader_cpu": (ncpu.get("loader") or {}).get("total"),
                "loader_saturated": (ncpu.get("loader") or {}).get("saturated"),
                "server_cpu": (ncpu.get("server") or {}).get("cores"),
            }
        elif clean:
            run.detail["stopped_at"] = {"rate": None, "problems": []}  # the ramp ran out of steps
        run.detail["steps"] = [{"rate": st["rate"], "deliveries_per_s": st["deliveries_per_s"],
                                "p99_ms": st["latency_ms"].get("p99"), "clean": st["clean"]} for st in steps]
    else:
        opened, wanted = r["opened"], doc["parameters"]["count"]
        if opened == wanted and not r["closed_by_server"]:
            run.value = r["bytes_per_connection"]
        else:
            run.error = run.error or (f"opened {opened:,} of {wanted:,}, {r['closed_by_server']:,} closed by the server: "
                                      f"{r['error']}")
        run.detail = {"opened": opened, "open_seconds": r["open_seconds"], "rss_after": r["rss_after"],
                      "opened_per_s": r["opened_per_s"] if run.value is not None else None}
    if cpu:
        run.loader_cpu = cpu["loader"]["total"]
        run.loader_saturated = bool(cpu["loader"]["saturated"])
        run.server_cpu = cpu["server"]["cores"]
        run.server_user = cpu["server"].get("user_cores")
        run.cores_busy = cpu.get("cores_busy") or {}
    return run


def measure(side: Side, group: str, s: Settings, pin: bool, work: str, index: int, quiet: bool = False) -> Run:
    spec = SERVERS[side.server]
    server = Server(spec, pin, work)
    try:
        try:
            server.start()
        except RuntimeError:  # another program may have taken the free port meanwhile: once more
            server.stop()
            server = Server(spec, pin, work)
            server.start()
        bg = background(0.5, server.pid, "cpu0" if pin else None)
        out = os.path.join(work, f"{side.key}-{index}.json")
        doc, error = run_bench(side, server, s, pin, out)
        if error and server.proc is not None and server.proc.poll() is not None:
            error += f" (the server exited with {server.proc.returncode}: {server.log_tail(300)})"
    except RuntimeError as exc:
        return Run(side.key, group, None, str(exc))
    finally:
        server.stop()
    run = summarise(side, doc, error)
    run.group = group
    run.background = bg
    run.json_path = out
    if not quiet:
        shown = "FAILED: " + run.error if run.value is None else fmt_value(run.value, side_unit(side))
        sat = "  (load generator saturated)" if run.loader_saturated else ""
        print(f"  {side.label:<48} {shown}{sat}", flush=True)
    return run


def side_unit(side: Side) -> str:
    return {"echo": "msgs/s", "fanout": "deliveries/s", "conns": "B/conn"}[side.mode]


# ----------------------------------------------------------------------------- the table


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "B/conn":
        return f"{v / 1024:,.2f} KiB"
    return f"{v:,.0f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "—"
    m = statistics.median(values)
    return f"±{(max(values) - min(values)) / 2 / m * 100:.0f}%" if m else "—"


def judge(row: Row, w: float | None, p: float | None) -> tuple[str, str, str]:
    """(ratio, target, met?) cells."""
    ratio = f"{w / p:.2f}" if w is not None and p else "—"
    if row.target is None:
        return ratio, "context", ""
    kind, bound = row.target
    if kind == ">=":
        met = "—" if w is None or not p else ("**yes**" if w / p >= bound else "**no**")
        return ratio, f"≥ {bound:g}×", met
    if kind == "<=":  # lower is better (RSS per connection against a peer's)
        met = "—" if w is None or not p else ("**yes**" if w / p <= bound else "**no**")
        return ratio, f"≤ {bound:g}×", met
    met = "—" if w is None else ("**yes**" if w / 1024 <= bound else "**no**")
    return ratio, f"≤ {bound:g} KiB ({bound * 1024:,.0f} B)", met


Key = tuple  # (group, side key): a side measured in two groups is two measurements


def results_by_side(runs: list[Run]) -> dict[Key, list[Run]]:
    out: dict[Key, list[Run]] = {}
    for r in runs:
        out.setdefault((r.group, r.side), []).append(r)
    return out


def measured(rows: list[Row]) -> list[Key]:
    """Every (group, side) the rows need, in order."""
    out: list[Key] = []
    for row in rows:
        for k in row.sides:
            if (row.group, k) not in out:
                out.append((row.group, k))
    return out


def row_median(by_side: dict[Key, list[Run]], key: Key, unit: str) -> float | None:
    """The median of a side's runs in a row's unit: a conns run's figure is its RSS per
    connection, and its rate of opening for a ``conns/s`` row."""
    runs = by_side.get(key, [])
    if unit == "conns/s":
        return median([r.detail["opened_per_s"] for r in runs if r.detail.get("opened_per_s")])
    return median([r.value for r in runs if r.value is not None])


def table(rows: list[Row], by_side: dict[Key, list[Run]], s: Settings) -> list[str]:
    lines = ["| figure | wirehub | peer | ratio | target | met? |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        figure = row.figure.format(subs=f"{s.subscribers:,}", conns=f"{s.conns:,}")
        w = row_median(by_side, (row.group, row.wirehub), row.unit)
        p = row_median(by_side, (row.group, row.peer), row.unit) if row.peer else None
        ratio, target, met = judge(row, w, p)
        peer = fmt_value(p, row.unit) if row.peer else "—"
        lines.append(f"| {figure} ({row.unit}) | {fmt_value(w, row.unit)} | {peer} | {ratio} | {target} | {met} |")
    return lines


def cpu_per_message(runs: list[Run]) -> tuple[float, float] | None:
    """The server's CPU time per message (echo), in user mode and in the kernel, in ns:
    medians over the runs that measured it; None when none did."""
    runs = [r for r in runs if r.value and r.server_cpu is not None and r.server_user is not None]
    if not runs:
        return None
    user = median([r.server_user / r.value * 1e9 for r in runs])  # type: ignore[operator]
    return user, max(0.0, median([(r.server_cpu - r.server_user) / r.value * 1e9 for r in runs]))  # type: ignore[operator]


def per_message(runs: list[Run]) -> str:
    split = cpu_per_message(runs)
    return "—" if split is None else f"{split[0]:,.0f} + {split[1]:,.0f}"


def runs_table(sides: list[Key], by_side: dict[Key, list[Run]]) -> list[str]:
    lines = ["| measurement | runs | median | spread | load CPU | load saturated | server CPU | server ns/msg (user + "
             "system) | cores busy (0 / 1) | background (0 / 1) |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |"]
    for key in sides:
        side = SIDES[key[1]]
        runs = by_side.get(key, [])
        unit = side_unit(side)
        vals = [r.value for r in runs if r.value is not None]
        shown_runs = ", ".join(fmt_value(r.value, unit) if r.value is not None else "failed" for r in runs)
        load = [r.loader_cpu for r in runs if r.loader_cpu is not None]
        srv = [r.server_cpu for r in runs if r.server_cpu is not None]
        sat = sum(1 for r in runs if r.loader_saturated)

        def cores(field_: str) -> str:
            per = [getattr(r, field_) for r in runs if getattr(r, field_)]
            if not per:
                return "—"
            return " / ".join(f"{statistics.median([c.get(n, 0.0) for c in per]):.2f}" for n in sorted(per[0]))

        lines.append(
            f"| {label(key)} | {shown_runs} | {fmt_value(median(vals), unit)} | {spread(vals)} | "
            f"{f'{median(load):.2f}' if load else '—'} | {f'{sat} of {len(runs)}' if load else '—'} | "
            f"{f'{median(srv):.2f}' if srv else '—'} | {per_message(runs) if side.mode == 'echo' else '—'} | "
            f"{cores('cores_busy')} | {cores('background')} |")
    return lines


# ----------------------------------------------------------------------------- the machine


def _run_text(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cores": os.cpu_count(), "cpu": model, "kernel": platform.release(), "system": platform.system(),
            "memory": mem, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": platform.python_version()}
    for name in ("wirehub", "uvloop", "picows", "websockets", "msgspec"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    commit = _run_text(["git", "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
        out["wirehub"] += f" (git {commit}{', with uncommitted changes' if dirty else ''})"
    accelerator = _run_text([sys.executable, "-c", "import wirehub.transport.connection as c; print(c.ACCELERATOR)"])
    out["wirehub"] += f", accelerator {accelerator or 'unknown'}"
    m = re.search(r"v=(\S+)", _run_text(["redis-server", "--version"]))
    out["redis-server"] = m.group(1) if m else "not found"
    m = re.search(r"v?(\d+\.\d+\.\d+)", _run_text(["nats-server", "--version"]))
    out["nats-server"] = m.group(1) if m else "not found"
    out["node"] = _run_text(["node", "--version"]) or "not found"
    try:
        with open(os.path.join(NODE_DIR, "node_modules", "ws", "package.json")) as f:
            out["ws"] = json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        out["ws"] = "not installed"
    return out


def ensure_node_ws() -> str:
    """Install the pinned ``ws`` package (npm ci) when it is not there yet; '' when ready."""
    if os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ws")):
        return ""
    if not shutil.which("npm"):
        return "npm not found"
    out = subprocess.run(["npm", "ci", "--prefix", NODE_DIR, "--no-audit", "--no-fund"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    return "" if out.returncode == 0 else f"npm ci failed: {out.stderr.strip()[-300:]}"


# ----------------------------------------------------------------------------- plots


def label(key: Key) -> str:
    """A measurement's name; the group too when the side is measured in several groups."""
    side = SIDES[key[1]]
    shared = sum(1 for g in {r.group for r in ROWS} if any(key[1] in r.sides for r in ROWS if r.group == g)) > 1
    return f"{side.label} [{key[0]} row]" if shared else side.label


def plots(img_dir: str, rows: list[Row], by_side: dict[Key, list[Run]], docs_dir: str,
          subscribers: int) -> tuple[list[str], str]:
    """PNG plots from the measurements; (markdown lines, a note when they could not be drawn)."""
    try:
        import matplotlib
    except ImportError:
        return [], "matplotlib is not installed, so there are no plots (pip install matplotlib, then rerun)."
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    out: list[str] = []
    rel = os.path.relpath(img_dir, docs_dir)

    # every row with a peer: wirehub / peer, with its target
    ratio_rows = [(r, row_median(by_side, (r.group, r.wirehub), r.unit), row_median(by_side, (r.group, r.peer), r.unit))
                  for r in rows if r.peer and r.unit != "B/conn"]
    ratio_rows = [(r, w / p) for r, w, p in ratio_rows if w is not None and p]
    if ratio_rows:
        fig, ax = plt.subplots(figsize=(10, 0.42 * len(ratio_rows) + 1.5))
        ys = range(len(ratio_rows))
        ax.barh(ys, [x for _, x in ratio_rows],
                color=["tab:blue" if r.target else "tab:gray" for r, _ in ratio_rows])
        for y, (r, x) in zip(ys, ratio_rows):
            if r.target:
                ax.plot([r.target[1]] * 2, [y - 0.4, y + 0.4], color="tab:red", linewidth=2)
            ax.text(x, y, f" {x:.2f}", va="center", fontsize=8)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(ys))
        ax.set_yticklabels([r.id for r, _ in ratio_rows])
        ax.invert_yaxis()
        ax.set_xlabel("wirehub ÷ peer (medians; red mark: the target; grey: context rows)")
        ax.set_title("wirehub against its peers")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(img_dir, "bench-ratios.png"), dpi=100)
        plt.close(fig)
        out.append(f"![wirehub against its peers]({rel}/bench-ratios.png)")
    keys = [k for k in measured([r for r in rows if r.unit == "B/conn"]) if by_side.get(k)]
    if keys:
        meds, lo, hi = [], [], []
        for k in keys:
            vals = [r.value / 1024 for r in by_side[k] if r.value is not None] or [0.0]
            m = statistics.median(vals)
            meds.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(keys) + 1.4))
        ax.barh(range(len(keys)), meds, xerr=[lo, hi], capsize=3,
                color=["tab:blue" if k[1].startswith("wh-") else "tab:gray" for k in keys])
        ax.axvline(4.0, color="tab:red", linewidth=1, linestyle="--")
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([label(k) for k in keys])
        ax.invert_yaxis()
        ax.set_xlabel("KiB of server RSS per connection (median; bars: lowest and highest run; red: 4 KiB)")
        ax.set_title("idle connections")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(img_dir, "bench-conns.png"), dpi=100)
        plt.close(fig)
        out.append(f"![RSS per idle connection]({rel}/bench-conns.png)")
    # the fan-out ramps of each server's median run
    ramps = []
    for k in ("wh-fanout", "redis-fanout", "nats-fanout"):
        runs = [r for r in by_side.get(("fanout", k), []) if r.detail.get("steps")]
        if runs:
            runs.sort(key=lambda r: r.value or 0)
            ramps.append((k, runs[len(runs) // 2].detail["steps"]))
    if ramps:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for k, steps in ramps:
            rates = [st["rate"] for st in steps]
            a1.plot(rates, [st["deliveries_per_s"] for st in steps], marker="o", label=SIDES[k].label)
            a2.plot(rates, [st["p99_ms"] or 0 for st in steps], marker="o", label=SIDES[k].label)
        a1.set_xscale("log")
        a1.set_xlabel("publications/s")
        a1.set_ylabel("deliveries/s")
        a1.set_title(f"fan-out ramp to {subscribers:,} subscribers (median run)")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.axhline(100, color="tab:red", linestyle="--", linewidth=1)
        a2.set_xlabel("publications/s")
        a2.set_ylabel("end-to-end p99 (ms)")
        a2.set_title("p99 per step (limit: 100 ms)")
        for a in (a1, a2):
            a.grid(True, which="both", alpha=0.3)
            a.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(img_dir, "bench-fanout-ramp.png"), dpi=100)
        plt.close(fig)
        out.append(f"![fan-out ramp]({rel}/bench-fanout-ramp.png)")
    return out, ""


# ----------------------------------------------------------------------------- the document


KEPT_SECTION = "## Which WebSocket implementation"


def document(rows: list[Row], by_side: dict[Key, list[Run]], s: Settings, info: dict[str, Any], plot_lines: list[str],
             plot_note: str, argv: list[str]) -> str:
    m, v = info["machine"], info["versions"]
    sides = measured(rows)
    lines = [
        "# Benchmarks",
        "",
        "Every figure here is measured against a peer in the same run, on this project's machine, with the command",
        "that reproduces it. Performance is never asserted by tests: these are measurements, rerun them after a",
        "change that could move them.",
        "",
        "## wirehub against its peers",
        "",
        f"Written by `python bench/peers.py {' '.join(shlex.quote(a) for a in argv)}` on {info['date']} "
        f"(took {info['elapsed_min']:.0f} min). Do not edit it by hand: rerun the script — every row, 3 runs each, "
        "`python bench/peers.py --markdown docs/benchmarks.md` (20-25 minutes; `pip install matplotlib` first for "
        "the plots), or some rows with `--only ROW,...` (`--list` names them).",
        "",
        *(["**This is a smoke run (`--quick`): one run of each, seconds-long steps, "
           f"{s.subscribers:,} subscribers instead of 1,000, {s.conns:,} connections instead of 19,000. Its figures only "
           "show that every row works; they are not the measurements the targets are about.**", ""]
          if info.get("quick") else []),
        *(["**Interrupted (Ctrl-C): some rows have fewer runs than asked for.**", ""] if info.get("interrupted") else []),
        f"**Machine.** {m['cores']} cores ({m['cpu'] or 'unknown CPU'}), {m['system']} {m['kernel']}, {m['memory']} RAM, "
        f"open-file limit {m['nofile'][0]:,} (hard {m['nofile'][1]:,}). "
        + ("Every server pinned to core 0 (`taskset -c 0`), every load process to core 1 (`taskset -c 1`)."
           if info["pinned"] else "**Not pinned** (fewer than two cores, or no taskset): server and load share the CPUs."),
        "",
        "**Versions.** " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"**Method.** {s.runs} run{'s' if s.runs != 1 else ''} of each measurement, the median shown; each run starts "
        "a fresh server on a free loopback port, waits until it accepts connections, measures, and stops it. The "
        "runs of a row's servers alternate (wirehub, peer, peer, wirehub, ...), so that drift over the session "
        f"reaches both. Echo: {s.connections} connections, {s.warmup:g} s warmup then {s.seconds:g} s measured; "
        f"fan-out: {s.subscribers:,} subscribers, a ramp from {s.fan_rate:g} publications/s ×{s.fan_factor:g} per step "
        f"({s.warmup:g} s + {s.fan_seconds:g} s each) until a step loses a message or its p99 exceeds {s.max_p99:g} ms; "
        f"connections: {s.conns:,} opened, the server's RSS read {s.conns_settle:g} s after the last.",
        "",
        *table(rows, by_side, s),
        "",
        "The ratio is wirehub ÷ peer (for RSS per connection, lower is better, so a ratio below 1 is in wirehub's "
        "favour). Fan-out figures are the highest clean ramp step's publication rate × subscribers (a clean "
        "step delivered every publication to every subscriber), so they sit on the ramp's grid: a server's true "
        f"ceiling is up to {(s.fan_factor - 1) * 100:.0f}% above its figure, and two servers that reached the same "
        "step tie.",
        "",
        "### The peers",
        "",
        "- **bare uvloop echo** (`bench/peers/uvloop_echo.py`): an `asyncio.Protocol` whose `data_received` writes the "
        "bytes back — no framing, no parsing; the ceiling for any Python server on uvloop.",
        "- **redis-server**: its own instance on a free port (`--save \"\" --appendonly no`); echo is the `ECHO` command "
        "(`wirehub bench echo --protocol resp`: 64-byte argument, replies counted as bulk strings), fan-out is "
        "`SUBSCRIBE` / `PUBLISH` with the same 64-byte JSON payload the hub fan-out publishes.",
        "- **nats-server**: its own instance (`-a 127.0.0.1 -p P`, no JetStream); fan-out with `SUB` / `PUB` of the "
        "same payload.",
        "- **Node.js `net`** (`bench/peers/net_echo.js`): a socket that writes every chunk back, `noDelay` on.",
        "- **Node.js `ws`** (`bench/peers/ws_echo.js`, the version pinned in `bench/node/package-lock.json`): echoes "
        "each message; the load sends it the hub's own `{\"op\":\"ping\"}` frames (`--protocol raw`) and expects them "
        "back, so both sides move the same bytes (the hub answers `{\"op\":\"pong\"}`, the same size).",
        "- **picows** and **websockets** (`bench/peers/picows_echo.py`, `bench/peers/websockets_echo.py`): the same "
        "WebSocket echo on the two Python libraries, on uvloop.",
        "",
        "### Runs and spread",
        "",
        *runs_table(sides, by_side),
        "",
        "Spread: half the range of the runs, as a percentage of the median. Load CPU: the load processes' own CPU "
        "time over the measured window, in cores; server CPU likewise (all its threads). Cores busy: each core's "
        "busy fraction in that window, whoever used it, softirqs included (loopback TCP is largely processed there, "
        "so neither process's CPU time shows all of it). Background: each core's busy fraction during 0.5 s with "
        "the server up and no load, just before the run, less the server's own CPU use — anything well above zero "
        "is another program's. Server ns/msg: the server's CPU time per message, in user mode (its own code, the "
        "interpreter, the event loop) and in the kernel on its behalf (syscalls, TCP processing).",
        "",
        *cpu_split_notes(by_side),
        "### Noise",
        "",
        *noise_notes(by_side, sides, info),
        "",
        "### Was the load generator the limit?",
        "",
        *loader_notes(by_side, sides, info),
        "",
        "### Reproduce a row",
        "",
        "Each row's servers are started as below (P, P_WS, P_ADMIN: free loopback ports; SERVER_PID: the server's "
        "process id), then the load runs against them. `python bench/peers.py --only ROW` does all of it.",
        "",
        *reproduce(rows, s, info["pinned"]),
    ]
    if plot_lines or plot_note:
        lines += ["", "### Plots", ""]
        lines += [plot_note] if plot_note else plot_lines
    failed = [(k, r.error) for k in sides for r in by_side.get(k, []) if r.value is None]
    if failed:
        lines += ["", "### Failed runs", ""]
        lines += [f"- {label(k)}: {err}" for k, err in failed]
    if info.get("skipped"):
        lines += ["", "### Skipped", ""]
        lines += [f"- {row}: {why}" for row, why in info["skipped"].items()]
    return "\n".join(lines) + "\n"


def cpu_split_notes(by_side: dict[Key, list[Run]]) -> list[str]:
    """For the line echo at pipeline 16 against redis-server: how much user time per message
    wirehub could spend and still reach the target ratio, from the measured system times."""
    row = next((r for r in ROWS if r.id == "line-p16"), None)
    if row is None or row.target is None or not row.peer:
        return []

    def split(side: str) -> tuple[float, float] | None:
        return cpu_per_message(by_side.get((row.group, side), []))

    wh, peer, bare = split(row.wirehub), split(row.peer), split("uv-line-p16")
    if wh is None or peer is None:
        return []
    ratio = row.target[1]
    budget = (peer[0] + peer[1]) / ratio - wh[1]
    text = (f"**Where a {ratio:g}× redis-server line echo at pipeline 16 has to come from.** Per message, redis-server spent "
            f"{peer[0]:,.0f} ns in user mode and {peer[1]:,.0f} ns in the kernel; wirehub {wh[0]:,.0f} + {wh[1]:,.0f} ns. "
            f"At wirehub's kernel time, {ratio:g}× redis-server's rate leaves {max(0.0, budget):,.0f} ns of user time per "
            f"message for everything wirehub does: reading, framing, calling the app's handler, the handler itself "
            f"(`conn.send`), buffering and writing.")
    if bare is not None:
        text += (f" The bare uvloop echo, which frames nothing and calls nothing per message (one `data_received`, "
                 f"one `write` per burst), spent {bare[0]:,.0f} + {bare[1]:,.0f} ns: the event loop's own share of "
                 f"that budget.")
    text += (f" Per second of the server's CPU, wirehub answered {(peer[0] + peer[1]) / (wh[0] + wh[1]):.2f}× as many "
             f"messages as redis-server: the ratio the servers alone would give if the load generator were never "
             f"the limit.")
    runs = by_side.get((row.group, row.wirehub), [])
    bare_runs = by_side.get((row.group, "uv-line-p16"), [])
    if runs and all(r.loader_saturated for r in runs) and bare_runs:
        ceiling = median([r.value for r in bare_runs if r.value]) / median(
            [r.value for r in by_side.get((row.group, row.peer), []) if r.value])
        text += (f" The load generator's core was saturated in every wirehub run, so the throughput ratio is the "
                 f"load generator's as much as the server's: in the same run the bare uvloop echo reached "
                 f"{ceiling:.2f}× redis-server, also with the load generator saturated, the most this machine's "
                 f"one load core shows for any server.")
    return [text, ""]


def noise_notes(by_side: dict[Key, list[Run]], sides: list[Key], info: dict[str, Any]) -> list[str]:
    out = []
    la = info.get("loadavg")
    if la:
        out.append(f"- Load average at the start {la[0][0]:.2f}, at the end {la[1][0]:.2f} (1 min).")
    noisy = []
    for k in sides:
        for r in by_side.get(k, []):
            if r.background and max(r.background.values()) > 0.05:
                noisy.append(f"{label(k)} ({', '.join(f'{c} {b:.0%}' for c, b in r.background.items())})")
    if noisy:
        out.append("- Something else was using the CPU just before " + str(len(noisy)) + " run(s): "
                   + "; ".join(noisy[:8]) + ("; ..." if len(noisy) > 8 else "") + ". Their figures are less reliable.")
    else:
        out.append("- No other program was busy just before any run (background under 5 % on every core).")
    wide = []
    for k in sides:
        vals = [r.value for r in by_side.get(k, []) if r.value is not None]
        if len(vals) >= 2 and statistics.median(vals) and (max(vals) - min(vals)) / 2 / statistics.median(vals) > 0.1:
            wide.append(f"{label(k)} ({spread(vals)})")
    if wide:
        out.append("- Runs more than ±10 % apart: " + "; ".join(wide) + ". Treat ratios near a target with care.")
    else:
        out.append("- Every measurement's runs are within ±10 % of their median.")
    out.append("- Loopback only: no network card, so these are the servers' CPU costs per message, not what a LAN would show.")
    return out


def loader_notes(by_side: dict[Key, list[Run]], sides: list[Key], info: dict[str, Any]) -> list[str]:
    out = ["The load generator (`wirehub bench`) reports its own CPU use over each measured window. When its core "
           "is busy ≥ 90 % of the time, the figure may be the load generator's limit rather than the server's: "
           "those measurements are listed here.", ""]
    sat = []
    for k in sides:
        runs = by_side.get(k, [])
        n = sum(1 for r in runs if r.loader_saturated)
        if n:
            srv = [r.server_cpu for r in runs if r.server_cpu is not None]
            sat.append(f"- {label(k)}: saturated in {n} of {len(runs)} run(s); the server used "
                       f"{statistics.median(srv):.2f} cores meanwhile." if srv else
                       f"- {label(k)}: saturated in {n} of {len(runs)} run(s).")
    out += sat or ["- None: the load generator had CPU to spare in every measured window."]
    fan = [(k, r) for k in sides if SIDES[k[1]].mode == "fanout" for r in by_side.get(k, []) if r.detail.get("stopped_at")]
    if fan:
        out.append("")
        out.append("Fan-out: what ended each ramp (the first step that was not clean), and who was busy then:")
        out.append("")
        for k, r in fan:
            st = r.detail["stopped_at"]
            if st.get("rate") is None:
                out.append(f"- {label(k)}: none — the ramp's last step was still clean, so the ceiling is higher "
                           "than the figure.")
                continue
            load = st.get("loader_cpu")
            srv = st.get("server_cpu")
            out.append(
                f"- {label(k)}: at {st['rate']:,.0f}/s — {'; '.join(st['problems']) or 'not clean'}; load "
                f"{'-' if load is None else f'{load:.2f}'} cores{' (saturated)' if st.get('loader_saturated') else ''}, "
                f"server {'-' if srv is None else f'{srv:.2f}'} cores.")
        reads = [(k, r.detail) for k, r in fan if r.detail.get("reads")]
        if reads:
            out.append("")
            out.append("Deliveries per subscriber read at the highest clean step (the load generator's cost is "
                       "mostly per read, so the more messages a read carries, the cheaper each one is): "
                       + ", ".join(f"{label(k)} {d['received'] / d['reads']:.1f}" for k, d in reads[:9]) + ".")
    return out


def reproduce(rows: list[Row], s: Settings, pin: bool) -> list[str]:
    out = []
    seen: set[str] = set()
    for row in rows:
        for key in row.sides:
            if key in seen:
                continue
            seen.add(key)
            side = SIDES[key]
            spec = SERVERS[side.server]
            server = " ".join(pinned([], 0, pin) + [spec.shown()])
            pids = ["--server-pid", "$SERVER_PID"]
            broker = []
            if spec.broker:
                argv = [a.format(broker="$P_BROKER", store="$JS_DIR") for a in BROKERS[spec.broker]]
                broker = [" ".join(pinned([], 0, pin) + argv) + " &"]
                pids += ["--server-pid", "$BROKER_PID"]
            load = " ".join(pinned([], 1, pin) + ["wirehub", "bench"] + [_show_arg(a) for a in side.load_args(s)] + pids)
            out += [f"{side.label} (rows: {', '.join(r.id for r in rows if key in r.sides)}):", "", "```sh",
                    *broker, server + " &", load, "```", ""]
    return out[:-1] if out else out


def write_markdown(path: str, text: str) -> None:
    """Replace everything above the kept section (the WebSocket implementation study) with
    ``text``; keep that section and whatever follows it."""
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        at = old.find(KEPT_SECTION)
        if at >= 0:
            kept = old[at:]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + ("\n" + kept if kept else ""))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def select(only: str | None) -> list[Row]:
    if not only:
        return list(ROWS)
    wanted = [x.strip() for x in only.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in ROW_IDS]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROW_IDS)}")
    return [r for r in ROWS if r.id in wanted]


def missing(row: Row) -> str:
    """Why a row cannot run here ('' when it can)."""
    for key in row.sides:
        need = SERVERS[SIDES[key].server].needs
        if need.startswith("py:"):
            if importlib.util.find_spec(need[3:]) is None:
                return f"the Python package {need[3:]} is not installed (pip install -e '.[bench]')"
        elif need and not shutil.which(need):
            return f"{need} is not installed"
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, help="runs of each measurement (default 3; 1 with --quick)")
    ap.add_argument("--seconds", type=float, help="measured seconds of each echo run and each fan-out step "
                    "(default 5 and 3)")
    ap.add_argument("--only", metavar="ROW[,ROW]", help="these rows only (see --list)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 run, ~1 s steps, 200 subscribers, 1,000 connections")
    ap.add_argument("--markdown", metavar="FILE", help="write the results into FILE (docs/benchmarks.md), keeping its "
                    f"'{KEPT_SECTION[3:]}' section; plots go to img/ beside it")
    ap.add_argument("--results", metavar="DIR", help="keep every run's JSON and server log here (default: a new temp dir)")
    ap.add_argument("--render", metavar="DIR", help="measure nothing: write --markdown from the summary.json a "
                    "previous run left in DIR")
    ap.add_argument("--no-plots", action="store_true", help="no PNG plots even when matplotlib is installed")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    args = ap.parse_args(argv)
    if args.list:
        d = Settings()
        for r in ROWS:
            print(f"{r.id:24s} {r.figure.format(subs=f'{d.subscribers:,}', conns=f'{d.conns:,}')}")
        return 0
    if args.render:
        return render(args)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the servers are stopped on the way out, and what was measured is kept

    signal.signal(signal.SIGINT, stop)  # also when started from a script that ignores it
    signal.signal(signal.SIGTERM, stop)
    s = Settings.quick() if args.quick else Settings()
    if args.runs is not None:
        s.runs = max(1, args.runs)
    if args.seconds is not None:
        s.seconds = s.fan_seconds = max(0.2, args.seconds)
    rows = select(args.only)
    skipped = {r.id: why for r in rows if (why := missing(r))}
    if any("node-ws" == SIDES[k].server for r in rows if r.id not in skipped for k in r.sides):
        why = ensure_node_ws()
        if why:
            skipped.update({r.id: why for r in rows if any(SIDES[k].server == "node-ws" for k in r.sides)})
    rows_run = [r for r in rows if r.id not in skipped]
    for rid, why in skipped.items():
        print(f"skipping {rid}: {why}", file=sys.stderr)
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if not pin:
        print("note: fewer than two cores (or no taskset): servers and load are not pinned", file=sys.stderr)
    work = args.results or tempfile.mkdtemp(prefix="wirehub-peers-")
    os.makedirs(work, exist_ok=True)
    print(f"results and server logs: {work}", file=sys.stderr)
    info: dict[str, Any] = {"machine": machine(), "versions": versions(), "pinned": pin, "skipped": skipped,
                            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "quick": args.quick, "argv": argv,
                            "rows": [r.id for r in rows_run]}
    loadavg = [os.getloadavg()]
    started = time.monotonic()
    runs: list[Run] = []
    groups: list[str] = []
    for r in rows_run:
        if r.group not in groups:
            groups.append(r.group)
    interrupted = False
    try:
        for g in groups:
            sides: list[str] = []
            for r in rows_run:
                if r.group == g:
                    sides += [k for k in r.sides if k not in sides]
            print(f"[{g}] {len(sides)} server(s) x {s.runs} run(s)", flush=True)
            for k in range(s.runs):
                order = sides if k % 2 == 0 else list(reversed(sides))  # A B B A: drift reaches both
                for key in order:
                    runs.append(measure(SIDES[key], g, s, pin, work, len(runs)))
    except KeyboardInterrupt:
        interrupted = True
        info["interrupted"] = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    loadavg.append(os.getloadavg())
    info["loadavg"] = loadavg
    info["elapsed_min"] = (time.monotonic() - started) / 60
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump({"settings": s.__dict__, "info": info, "runs": [r.__dict__ for r in runs]}, f, indent=2, default=str)
    print()
    print("\n".join(table(rows_run, results_by_side(runs), s)))
    if args.markdown:
        publish(args.markdown, rows_run, runs, s, info, args.no_plots)
    return 130 if interrupted else 0


def publish(path: str, rows: list[Row], runs: list[Run], s: Settings, info: dict[str, Any], no_plots: bool) -> None:
    by_side = results_by_side(runs)
    docs_dir = os.path.dirname(os.path.abspath(path))
    plot_lines, plot_note = ([], "") if no_plots else plots(os.path.join(docs_dir, "img"), rows, by_side, docs_dir,
                                                             s.subscribers)
    write_markdown(path, document(rows, by_side, s, info, plot_lines, plot_note, info["argv"]))
    print(f"\nwrote {path}", file=sys.stderr)


def render(args: argparse.Namespace) -> int:
    """--render DIR: the document again from a previous run's summary.json."""
    if not args.markdown:
        raise SystemExit("--render needs --markdown FILE")
    with open(os.path.join(args.render, "summary.json")) as f:
        data = json.load(f)
    s = Settings(**data["settings"])
    info = data["info"]
    info["machine"]["nofile"] = tuple(info["machine"]["nofile"])
    runs = [Run(**r) for r in data["runs"]]
    rows = [r for r in ROWS if r.id in info["rows"]]
    print("\n".join(table(rows, results_by_side(runs), s)))
    publish(args.markdown, rows, runs, s, info, args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
