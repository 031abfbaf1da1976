"""CPU cost of wirehub's hot path per message, in-process, without sockets.

Builds a real :class:`~wirehub.server.server.Server` (no listeners) and real connection
objects bound to a transport that only counts what it is given, then feeds them bursts of
frames exactly as the event loop would (``data_received``, then the per-turn flush) and
reports nanoseconds per message. No syscalls and no load generator, so the figure is the
Python work alone and repeats within a few percent: the tool for deciding between two
versions of the hot path. Throughput through real sockets is ``bench/peers.py``'s.

    python bench/hotpath.py                  # every case
    python bench/hotpath.py --case line-echo --case hub-ping --seconds 2
    python bench/hotpath.py --profile hub-fanout   # cProfile of one case
    python bench/hotpath.py --markdown docs/benchmarks.md --baseline cc3e463
                                             # compiled vs Python code vs an old revision (its Python
                                             # code, and compiled when it had an accelerator), into the docs

Cases:
  line-echo     the echo app (``wirehub run wirehub.apps.echo:app``), TCP, 16 lines of 64 B per read
  line-echo-p1  the same, one line per read (pipeline 1: the cost per read and per flush shows)
  hub-ping      ``wirehub serve``'s hub, TCP, 16 ``{"op":"ping"}`` per read
  hub-ws-ping   the hub over WebSocket, 16 masked ping frames per read
  hub-ping-ref  the hub, TCP, 16 ``{"op":"ping","ref":N}`` per read (the general frame path)
  hub-pub-ref   the hub, TCP, 16 ``pub`` with a ref and 64 B of data per read, 100 rooms
                (history append and ack), memory broker
  hub-pub-hook  hub-pub-ref with a plain ``on_publish`` hook for every room that returns the
                data unchanged (bench/apps/pub_hook.py): the cost of a hook
  hub-pub-hook-async  the same with an ``async def`` hook (run in the connection's task)
  hub-pub-redis hub-pub-ref on ``redis://`` (a redis-server of its own on a free port, started
                and stopped by this script; skipped without redis-server): the hub's CPU per
                publication, its Redis connections' syscalls included, Redis's own CPU not
  hub-fanout    one publisher, 1,000 TCP subscribers joined to a room: ns per delivery
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import pstats
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable

from wirehub.apps.echo import app as echo_app
from wirehub.config import load
from wirehub.hub.app import HubApp
from wirehub.server.server import Server
from wirehub.transport.stream import StreamConnection

HOOK_APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apps", "pub_hook.py")

NO_LISTENERS = {"tcp": "off", "ws": "off", "udp": "off", "admin": "off"}
BURST = 16


class CountingTransport(asyncio.Transport):
    """Takes writes and counts them; never pushes back."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.writes = 0
        self._closing = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # get_extra_info("socket")

    def write(self, data: Any) -> None:
        self.written += len(data)
        self.writes += 1

    def writelines(self, lines: Any) -> None:
        for chunk in lines:
            self.write(chunk)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 7400), "socket": self._sock}
        return extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._closing = True


def masked_text(payload: bytes) -> bytes:
    """A client text frame masked with the all-zero key (the payload stays as it is)."""
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + struct.pack("!H", n)
    return head + b"\0\0\0\0" + payload


def feed_buffered(proto: Any, data: bytes) -> None:
    """What the loop does when data arrives: ``data_received``, or for an
    asyncio.BufferedProtocol (the WebSocket transport on picows, before 2026-12, which a
    ``--baseline`` may measure) ``get_buffer`` and ``buffer_updated``."""
    if not hasattr(proto, "get_buffer"):
        proto.data_received(data)
        return
    buf = proto.get_buffer(len(data))
    buf[: len(data)] = data
    proto.buffer_updated(len(data))


class Case:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.ctx = server.ctx
        self.protocols: list[Any] = []

    def close(self) -> None:
        for proto in self.protocols:
            proto.connection_lost(None)

    def stream(self) -> tuple[StreamConnection, CountingTransport]:
        conn = StreamConnection(self.ctx, "tcp", self.server.app.framing)
        transport = CountingTransport()
        conn.connection_made(transport)
        self.protocols.append(conn)
        return conn, transport

    def websocket_conn(self) -> tuple[Any, CountingTransport]:
        from wirehub.transport.websocket import websocket_factory

        proto = websocket_factory(self.ctx, "ws")()
        transport = CountingTransport()
        proto.connection_made(transport)
        self.protocols.append(proto)
        feed_buffered(
            proto,
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        return proto, transport

    def setup(self) -> Callable[[], int]:
        """Returns one round: feeds and flushes, returns the messages it cost."""
        raise NotImplementedError


class Burst(Case):
    """One connection; each round is one read of ``per_read`` requests and the flush of the
    replies."""

    request = b""
    websocket = False
    per_read = BURST

    def setup(self) -> Callable[[], int]:
        flush = self.ctx.flusher.run
        if self.websocket:
            proto, _ = self.websocket_conn()
            burst = masked_text(self.request) * self.per_read

            def feed(data: bytes) -> None:
                feed_buffered(proto, data)

        else:
            conn, _ = self.stream()
            burst = (self.request + b"\n") * self.per_read
            feed = conn.data_received
        n = self.per_read

        def round_() -> int:
            feed(burst)
            flush()
            return n

        return round_


class LineEcho(Burst):
    request = b"x" * 64


class LineEchoP1(LineEcho):
    per_read = 1


class HubPing(Burst):
    request = b'{"op":"ping"}'


class HubWsPing(HubPing):
    websocket = True


class HubPingRef(HubPing):
    request = b'{"op":"ping","ref":1234}'


class HubPubRef(Case):
    """16 publications with a ref per read, each connection to its own room among 100 (as
    ``wirehub bench echo --protocol hub-pub`` does): a history append and an ack each."""

    connections = 100
    #: frames go to each connection's task (an async hook): a round also runs the event loop
    #: until every publication of the round is published
    in_tasks = False
    #: in_tasks: how long to sleep between looks at the count, and how many looks at most
    poll = 0.0
    turns = 10_000

    def setup(self) -> Callable[[], Any]:
        flush = self.ctx.flusher.run
        feeds = []
        for k in range(self.connections):
            conn, _ = self.stream()
            data = b'"' + b"x" * 62 + b'"'
            request = b'{"op":"pub","room":"bench-%d","data":%s,"ref":1}\n' % (k, data)
            feeds.append((conn.data_received, request * BURST))
        n = BURST * self.connections

        def round_() -> int:
            for feed, burst in feeds:
                feed(burst)
            flush()
            return n

        if not self.in_tasks:
            return round_
        stats = self.server.app.stats

        async def round_in_tasks() -> int:
            goal = stats.published + n
            for feed, burst in feeds:
                feed(burst)
            for _ in range(self.turns):  # bounded: a round takes a few turns of the loop
                if stats.published >= goal:
                    break
                await asyncio.sleep(self.poll)
            else:
                raise RuntimeError("the publications of a round were not all published")
            flush()
            return n

        return round_in_tasks


class HubPubHookAsync(HubPubRef):
    in_tasks = True


class HubPubRedis(HubPubRef):
    in_tasks = True
    # the round waits for Redis's answers: asleep in the loop (spinning would count as the hub's CPU)
    poll = 0.0005
    turns = 20_000  # 10 s


class OwnRedis:
    """A redis-server on a free loopback port, for the cases on ``redis://``; stopped by its pid."""

    def __init__(self) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            raise ImportError("redis-server is not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                      "no", "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):  # bounded: 10 s
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def hooked_hub(name: str) -> Callable[[Any], Any]:
    """A hub app with ``bench/apps/pub_hook.py``'s hooks ``name``, loaded as ``wirehub serve
    --app`` loads them."""

    def make(config: Any) -> Any:
        from wirehub.cli import load_hooks

        return HubApp(config, hooks=load_hooks(f"{HOOK_APP}:{name}"))

    return make


class HubFanout(Case):
    subscribers = 1000

    def setup(self) -> Callable[[], int]:
        flush = self.ctx.flusher.run
        for _ in range(self.subscribers):
            conn, _ = self.stream()
            conn.data_received(b'{"op":"join","room":"bench","presence":false}\n')
        flush()
        pub, _ = self.stream()
        frame = b'{"op":"pub","room":"bench","data":{"t":1,"i":2,"pad":"' + b"x" * 40 + b'"}}\n'
        feed = pub.data_received
        n = self.subscribers

        def round_() -> int:
            feed(frame)
            flush()
            return n

        return round_


CASES: dict[str, tuple[type[Case], Callable[[Any], Any] | None, dict]] = {
    "line-echo": (LineEcho, lambda config: echo_app, {}),
    "line-echo-p1": (LineEchoP1, lambda config: echo_app, {}),
    "hub-ping": (HubPing, None, {}),
    "hub-ws-ping": (HubWsPing, None, {}),
    "hub-ping-ref": (HubPingRef, None, {}),
    "hub-pub-ref": (HubPubRef, None, {}),
    "hub-pub-hook": (HubPubRef, hooked_hub("hub"), {}),
    "hub-pub-hook-async": (HubPubHookAsync, hooked_hub("async_hub"), {}),
    "hub-pub-redis": (HubPubRedis, None, {"broker": OwnRedis}),
    "hub-fanout": (HubFanout, None, {"history_size": 0}),
}


async def measure(name: str, seconds: float, profile: bool) -> float:
    kind, app_factory, options = CASES[name]
    redis = options["broker"]() if options.get("broker") is OwnRedis else None
    if redis is not None:
        options = {**options, "broker": redis.url}
    try:
        return await _measure(kind, app_factory, options, seconds, profile)
    finally:
        if redis is not None:
            redis.stop()


async def _measure(kind: type[Case], app_factory: Callable[[Any], Any] | None, options: dict, seconds: float,
                   profile: bool) -> float:
    config = load(env={}, flags={**NO_LISTENERS, **options})
    app = app_factory(config) if app_factory is not None else HubApp(config)
    server = Server(app, config)
    await server.start()
    case = kind(server)
    try:
        round_ = case.setup()
        in_tasks = asyncio.iscoroutinefunction(round_)
        for _ in range(200):  # warm up (specialise the bytecode, fill caches)
            await round_() if in_tasks else round_()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        msgs = 0
        deadline = time.perf_counter() + seconds
        start = time.process_time_ns()  # CPU time: another process on the core does not count
        while time.perf_counter() < deadline:
            for _ in range(50):
                msgs += await round_() if in_tasks else round_()
        elapsed = time.process_time_ns() - start
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return elapsed / msgs
    finally:
        case.close()
        server.request_stop()
        await server.shutdown()


SECTION = "## The hot path, in-process"
UNITS = {"hub-fanout": "delivery"}
DESCRIBE = {
    "line-echo": "framework line echo (the echo app), 16 lines of 64 B per read",
    "line-echo-p1": "framework line echo, one line of 64 B per read (pipeline 1)",
    "hub-ping": "hub `ping`→`pong` over TCP, 16 per read",
    "hub-ws-ping": "hub `ping`→`pong` over WebSocket, 16 per read",
    "hub-ping-ref": "hub `ping` with a `ref` over TCP (the general frame path), 16 per read",
    "hub-pub-ref": "hub `pub` with a `ref`, 64 B, 100 rooms (history append and ack), 16 per read",
    "hub-pub-hook": "hub `pub` as above, with a plain `on_publish` hook returning the data unchanged",
    "hub-pub-hook-async": "hub `pub` as above, with an `async def` `on_publish` hook returning the data unchanged",
    "hub-pub-redis": "hub `pub` as above on `redis://` (the hub's CPU, Redis's not)",
    "hub-fanout": "hub fan-out: one publication to 1,000 TCP members, per delivery",
}


def measure_all(cases: list[str], seconds: float, runs: int) -> dict[str, float]:
    """Best of ``runs`` for each case, in this process, in ns."""
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    out = {}
    for name in cases:
        try:
            out[name] = min(run(measure(name, seconds, False)) for _ in range(runs))
        except (ImportError, AttributeError, TypeError) as exc:  # code from before the case's feature
            print(f"{name}: not measured: this code cannot run it ({type(exc).__name__}: {exc})", file=sys.stderr)
    return out


def measure_variant(label: str, env: dict[str, str], cases: list[str], seconds: float, runs: int) -> dict[str, Any]:
    """Run this script in a child process under ``env``; its figures and the accelerator state."""
    cmd = [sys.executable, __file__, "--json", "--seconds", str(seconds), "--runs", str(runs)]
    for name in cases:
        cmd += ["--case", name]
    print(f"measuring {label} ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(out.stdout)


def baseline_tree(rev: str, where: str) -> str:
    """Check out ``rev`` of this repository into ``where``; return its ``src`` folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-f", where, rev], check=True, capture_output=True)
    return os.path.join(where, "src")


def baseline_compiled(tree: str, where: str) -> str | None:
    """Build ``tree`` into a wheel (its own build hook compiles whatever accelerator that
    revision had) and unpack it into ``where``; return the folder to put on PYTHONPATH, or
    None when the revision built no compiled module."""
    print("building the baseline's wheel ...", file=sys.stderr, flush=True)
    wheels = os.path.join(where, "wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, tree],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(f"the baseline's wheel did not build: {done.stderr[-500:]}", file=sys.stderr)
        return None
    site = os.path.join(where, "site")
    for name in os.listdir(wheels):
        with zipfile.ZipFile(os.path.join(wheels, name)) as wheel:
            wheel.extractall(site)
    built = [f for _, _, files in os.walk(site) for f in files if f.endswith((".so", ".pyd"))]
    return site if built else None


def measure_variants(variants: list[tuple[str, dict[str, str]]], cases: list[str], seconds: float,
                     runs: int) -> list[dict[str, Any]]:
    """Measure every variant ``runs`` times, in rounds (A B C, A B C, ...) so that a change in
    the machine's speed over the session reaches all of them; the best run of each is kept."""
    results: list[dict[str, Any]] = [{"ns": {}} for _ in variants]
    for round_ in range(runs):
        for (label, env), result in zip(variants, results):
            figures = measure_variant(f"{label} (round {round_ + 1} of {runs})", env, cases, seconds, 1)
            result["accelerator"] = figures.get("accelerator")
            for name, ns in figures["ns"].items():
                result["ns"][name] = min(ns, result["ns"].get(name, ns))
    return results


def markdown(variants: list[tuple[str, str, dict[str, Any]]], cases: list[str], command: str) -> str:
    head = ["case"] + [label for label, _, _ in variants]
    lines = [
        SECTION,
        "",
        "The CPU cost of the hot path per message, without sockets: `bench/hotpath.py` builds a real server",
        "(no listeners) and real connections on a transport that only counts what it is given, feeds them",
        "reads as the event loop would and flushes as the loop would, and reports the CPU time (the",
        "process's, so another program on the core does not count) per message, best of several runs. No",
        "syscalls and no load generator: this is the Python work alone, the figure used to choose between",
        "two versions of the hot path. The socket figures are the table at the top. Each round runs the",
        "turn's flush by hand after the read; code that leaves a read's replies to that flush also pays a",
        "`loop.call_soon` every round here, where a real event loop pays one per turn for all the",
        "connections it served, so the one-line-per-read case overstates that cost for such code (wirehub",
        "before 8d70e41; since, a read's replies are written when the read is handled).",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * len(variants),
    ]
    for name in cases:
        row = [DESCRIBE[name]]
        for _, _, figures in variants:
            ns = figures["ns"].get(name)
            row.append(f"{ns:,.0f} ns" if ns is not None else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for label, what, figures in variants:
        lines.append(f"- **{label}**: {what} (accelerator: {figures.get('accelerator', 'n/a')}).")
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    """Replace this script's section of ``path`` (from its heading to the next ``## ``), or
    append it."""
    with open(path) as f:
        doc = f.read()
    at = doc.find(SECTION)
    if at < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", at + len(SECTION))
        doc = doc[:at] + text + (doc[end:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable; default: all")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3, help="the best of N runs is reported (with --markdown: N rounds "
                        "over the variants, so that a change in the machine's speed reaches all of them)")
    parser.add_argument("--profile", choices=sorted(CASES), help="cProfile one case instead")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="measure the compiled and the Python code (and --baseline) "
                        "in child processes and write the table into FILE's hot-path section")
    parser.add_argument("--baseline", metavar="REV", help="with --markdown: also measure this git revision's code")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    cases = args.case or list(CASES)
    if args.profile:
        try:
            import uvloop

            uvloop.run(measure(args.profile, args.seconds, True))
        except ImportError:
            asyncio.run(measure(args.profile, args.seconds, True))
        return
    if args.markdown:
        # (label, description, environment of the child that measures it)
        plan: list[tuple[str, str, dict[str, str]]] = []
        with tempfile.TemporaryDirectory(prefix="wirehub-baseline-") as tmp:
            tree = os.path.join(tmp, "tree")
            try:
                if args.baseline:
                    src = baseline_tree(args.baseline, tree)
                    plan.append((f"git {args.baseline}", f"the code of revision {args.baseline}, pure Python",
                                 {"PYTHONPATH": src, "WIREHUB_PURE_PYTHON": "1"}))
                    site = baseline_compiled(tree, tmp)
                    if site is not None:
                        plan.append((f"git {args.baseline} compiled",
                                     f"the code of revision {args.baseline} with its compiled accelerator",
                                     {"PYTHONPATH": site, "WIREHUB_PURE_PYTHON": "0"}))
                plan.append(("Python code", "this tree with `WIREHUB_PURE_PYTHON=1`", {"WIREHUB_PURE_PYTHON": "1"}))
                plan.append(("compiled", "this tree as installed, with the compiled accelerator", {"WIREHUB_PURE_PYTHON": "0"}))
                results = measure_variants([(label, env) for label, _, env in plan], cases, args.seconds, args.runs)
            finally:
                if args.baseline:
                    subprocess.run(["git", "worktree", "remove", "--force", tree], capture_output=True)
        variants = [(label, what, figures) for (label, what, _), figures in zip(plan, results)
                    if label != "compiled" or figures.get("accelerator") == "compiled"]
        command = "python bench/hotpath.py --markdown " + args.markdown + (f" --baseline {args.baseline}" if args.baseline else "")
        write_section(args.markdown, markdown(variants, cases, command))
        print(f"wrote {args.markdown}", file=sys.stderr)
        return
    try:  # as `wirehub run` and `wirehub serve` set the garbage collector
        from wirehub.server.supervisor import tune_gc
    except ImportError:  # a revision from before it
        pass
    else:
        tune_gc()
    figures = measure_all(cases, args.seconds, args.runs)
    if args.json:
        try:
            from wirehub._accelerator import summary
        except ImportError:  # a revision from before the accelerator covered the decoders
            try:
                from wirehub.transport.connection import ACCELERATOR
            except ImportError:  # a revision from before the accelerator
                ACCELERATOR = "none (before the accelerator)"
        else:
            ACCELERATOR = summary()
        print(json.dumps({"ns": figures, "accelerator": ACCELERATOR}))
        return
    for name, best in figures.items():
        unit = UNITS.get(name, "message")
        print(f"{name:12s} {best:8.0f} ns per {unit}  ({1e9 / best:,.0f}/s on one core)", flush=True)


if __name__ == "__main__":
    main()
