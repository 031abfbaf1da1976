"""The ``wirehub bench`` command group (click). The work is in the mode modules."""

from __future__ import annotations

import signal
import socket
import sys
import time
from typing import Any, Callable

import click

EXIT_PROBLEM = 1


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that the load processes are stopped on the way out."""

_COMMON = [
    click.option("--processes", type=click.IntRange(1, 256), default=1, show_default=True, metavar="N",
                 help="Load processes, each with its own event loop and a share of the connections."),
    click.option("--timeout", type=click.FloatRange(0.1, 600), default=10.0, show_default=True, metavar="S",
                 help="How long to wait for a connection, a first reply, or replies still in flight at the end."),
    click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None, metavar="FILE",
                 help="Write every figure and the parameters to FILE as JSON."),
    click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None, metavar="FILE.png",
                 help="Draw the results to a PNG (needs matplotlib)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress line on stderr."),
    click.option("--allow-remote", is_flag=True, help="Allow a target that is not a loopback address (only machines you own)."),
]


def _common(duration: float = 5.0, duration_help: str = "Seconds of measured load (per step with --ramp).",
            warmup_help: str = "Seconds of load before measuring starts (not counted).") -> Callable[[Callable], Callable]:
    options = [
        click.option("--duration", type=click.FloatRange(0 if duration == 0 else 0.1, 3600), default=duration,
                     show_default=True, metavar="S", help=duration_help),
        click.option("--warmup", type=click.FloatRange(0, 600), default=1.0, show_default=True, metavar="S", help=warmup_help),
        *_COMMON,
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


_server_pid_option = click.option(
    "--server-pid", "server_pids", type=click.IntRange(1, None), multiple=True, metavar="PID",
    help="The server process whose CPU use over the measured window is reported (repeat for several; "
         "default: whatever listens on the port, when it can be found).")


@click.group("bench")
def bench() -> None:
    """Load generator: echo throughput and latency, fan-out, idle-connection memory.

    \b
    wirehub bench echo   --url tcp://127.0.0.1:7400 --protocol hub --connections 100 --pipeline 16
    wirehub bench echo   --url redis://127.0.0.1:6380 --pipeline 16
    wirehub bench fanout --url ws://127.0.0.1:7401/ --subscribers 1000 --rate 1000 --ramp
    wirehub bench fanout --url nats://127.0.0.1:4223 --subscribers 1000 --rate 1000 --ramp
    wirehub bench conns  --url tcp://127.0.0.1:7400 --count 19000 --server-pid PID

    Targets must be loopback addresses unless --allow-remote is given. A summary table goes to
    stdout at the end; a progress line to stderr while it runs.
    """


@bench.command("echo")
@click.option("--url", default="tcp://127.0.0.1:7400", show_default=True,
              help="tcp://HOST:PORT, ws://HOST:PORT/PATH or redis://HOST:PORT")
@click.option("--protocol", type=click.Choice(["hub", "line", "raw", "resp", "hub-ref", "hub-pub", "resp-xadd"]), default=None,
              help="hub: ping -> pong (wirehub serve); line: S-byte messages echoed back (wirehub run "
                   "wirehub.apps.echo:app, any echo server); raw: the hub's ping bytes to a plain echo server, which "
                   "sends them back unchanged; resp: Redis ECHO; hub-ref: ping with a ref -> pong with it; hub-pub: "
                   "pub of S bytes with a ref to room bench-K (connection K mod 100) -> ok; resp-xadd: Redis XADD "
                   "bench-K MAXLEN ~ 100 of S bytes.  [default: hub, resp for a redis:// URL]")
@click.option("--connections", "-c", type=click.IntRange(1, 1_000_000), default=100, show_default=True, metavar="C")
@click.option("--pipeline", "-p", type=click.IntRange(1, 100_000), default=1, show_default=True, metavar="P",
              help="Requests written at once per connection; the next burst goes when all P replies are back.")
@click.option("--size", "-s", type=click.IntRange(1, 16 * 1024 * 1024), default=64, show_default=True, metavar="BYTES",
              help="Message size (line: the bytes before the newline; resp: the ECHO argument; ignored with --protocol hub and raw).")
@_server_pid_option
@_common()
def echo_cmd(**params: Any) -> None:
    """Throughput and latency percentiles of request/reply echo.

    Each of C connections writes a burst of P messages, waits for the P replies, and
    repeats. Reports msgs/s and the burst round trip (p50/p90/p99/max; with --pipeline 1 it
    is the per-message latency), and the load processes' and the server's CPU use over the
    measured window ("SATURATED": the load generator may be the limit). Exits 1 when the
    server answered wrongly or stopped answering.
    """
    from . import echo

    def check(results: dict) -> int:
        return EXIT_PROBLEM if results["errors"] or results["stalled_connections"] else 0

    _run("echo", params, echo.run, check)


@bench.command("fanout")
@click.option("--url", default="tcp://127.0.0.1:7400", show_default=True,
              help="tcp://HOST:PORT or ws://HOST:PORT/PATH of a hub, redis://HOST:PORT or nats://HOST:PORT")
@click.option("--protocol", type=click.Choice(["hub", "redis", "nats"]), default=None,
              help="hub: join and pub (wirehub serve); redis: SUBSCRIBE and PUBLISH; nats: SUB and PUB.  "
                   "[default: from the URL scheme, hub for tcp:// and ws://]")
@click.option("--subscribers", "-n", type=click.IntRange(1, 1_000_000), default=100, show_default=True, metavar="N")
@click.option("--rate", "-r", type=click.FloatRange(0.1, 10_000_000), default=1000.0, show_default=True, metavar="R",
              help="Publications per second (the first step's with --ramp).")
@click.option("--size", "-s", type=click.IntRange(1, 60_000), default=64, show_default=True, metavar="BYTES",
              help="Size of each publication's data (padded; never less than its t and i).")
@click.option("--room", default="bench", show_default=True, help="The room subscribers join and the publisher publishes to.")
@click.option("--ramp", is_flag=True, help="Repeat at rising rates until a step loses messages or exceeds --max-p99.")
@click.option("--ramp-factor", type=click.FloatRange(1.01, 100), default=2.0, show_default=True, metavar="F",
              help="Rate multiplier between steps.")
@click.option("--max-p99", type=click.FloatRange(0.001, 600_000), default=100.0, show_default=True, metavar="MS",
              help="A step whose end-to-end p99 exceeds this many milliseconds ends the ramp.")
@click.option("--max-steps", type=click.IntRange(1, 100), default=10, show_default=True, metavar="K")
@click.option("--max-rate", type=click.FloatRange(0, None), default=0.0, metavar="R", help="Do not ramp beyond this rate (0: no limit).")
@click.option("--drain", type=click.FloatRange(0, 600), default=2.0, show_default=True, metavar="S",
              help="After the last publication of a step, how long to wait for the deliveries still on their way.")
@_server_pid_option
@_common()
def fanout_cmd(**params: Any) -> None:
    """One publisher, N subscribers in a room: deliveries/s, loss, end-to-end latency.

    With --processes N > 1 the subscribers are shared by N processes and the publisher
    runs in one more process of its own. Subscribers read a monotonic-clock timestamp from each publication's data (same host:
    the clock is shared by every process). --protocol redis or nats (or a redis:// or
    nats:// URL) runs the same load against redis-server pub/sub or nats-server. Loss is
    counted against N x published, with
    duplicates and out-of-order deliveries (which must be 0). Exits 1 when a run without
    --ramp loses, duplicates or reorders a message, or when no --ramp step was clean.
    """
    from . import fanout

    def check(results: dict) -> int:
        steps = results["steps"]
        if params["ramp"]:
            return 0 if results["highest_clean_rate"] is not None else EXIT_PROBLEM
        s = steps[0]
        bad = s["lost"] or s["duplicates"] or s["out_of_order"] or s["subscriber_connections_lost"]
        return EXIT_PROBLEM if bad else 0

    _run("fanout", params, fanout.run, check)


@bench.command("conns")
@click.option("--url", default="tcp://127.0.0.1:7400", show_default=True, help="tcp://HOST:PORT or ws://HOST:PORT/PATH")
@click.option("--count", "-n", type=click.IntRange(1, 10_000_000), default=1000, show_default=True, metavar="N",
              help="Connections to open (the open-file limit is raised to its hard limit first).")
@click.option("--server-pid", "server_pids", type=click.IntRange(1, None), multiple=True, metavar="PID",
              help="The server process whose RSS is measured (repeat for several; default: whatever listens on the port).")
@click.option("--sources", default=None, metavar="A-B|A,B,...",
              help="Local source addresses to spread connections over. [default: 127.0.0.1-127.0.0.20 for an IPv4 loopback target]")
@click.option("--join", default=None, metavar="ROOM",
              help="Hub: each connection says hello and joins ROOM (turn presence off for it, e.g. --rooms 'ROOM:presence=false', "
                   "or every join is announced to every member).")
@click.option("--send", default=None, metavar="TEXT",
              help="Not the hub (an echo server): each connection sends TEXT as one frame (a WebSocket text message, "
                   "or a line) and waits for the first frame back. Ignored with --join.")
@click.option("--concurrency", type=click.IntRange(1, 100_000), default=256, show_default=True, metavar="K",
              help="Connections being opened at once (per process).")
@_common(0.0, "Seconds to hold the connections open after measuring (checking the server keeps them).",
         "Seconds to let the server settle once all are open, before its memory is read.")
def conns_cmd(**params: Any) -> None:
    """Open N idle connections and report the server's memory per connection.

    Reads the server's VmRSS before and after (once all are open and --warmup seconds have
    passed), holds them --duration seconds, closes them all. Point it at a freshly started
    server: one that had connections before reuses the memory they freed.
    """
    from . import conns

    _run("conns", params, conns.run, lambda r: 0)


_SCHEME_PROTOCOL = {"echo": {"redis": "resp"}, "fanout": {"redis": "redis", "nats": "nats"}}
_REDIS_PROTOCOLS = {"echo": ("resp", "resp-xadd")}


def _protocol(mode: str, url: str, protocol: str | None, ws: bool) -> str:
    """The protocol to speak: --protocol, or the one the URL scheme names; refuse a mismatch."""
    from .net import BenchError, url_scheme

    scheme = url_scheme(url)
    implied = _SCHEME_PROTOCOL[mode].get(scheme)
    if scheme in ("redis", "nats") and implied is None:
        raise BenchError(f"wirehub bench {mode} has no {scheme} protocol: use a tcp:// or ws:// URL")
    if protocol is None:
        protocol = implied or "hub"
    elif implied is not None and protocol != implied and protocol not in _REDIS_PROTOCOLS.get(mode, ()):
        raise BenchError(f"a {scheme}:// URL speaks --protocol {implied}, not {protocol}")
    if ws and protocol in ("resp", "resp-xadd", "redis", "nats", "hub-pub"):
        raise BenchError(f"--protocol {protocol} is plain TCP: use a tcp:// URL")
    return protocol


def _run(mode: str, params: dict[str, Any], runner: Callable, check: Callable[[dict], int]) -> None:
    from . import report
    from ..server.supervisor import raise_open_file_limit
    from .net import BenchError, is_loopback_host, parse_target
    from .runner import Progress

    started = time.time()
    json_path = params.pop("json_path")
    plot_path = params.pop("plot_path")
    quiet = params.pop("quiet")
    try:  # what is wrong with the command itself: exit 2, before any load
        target = parse_target(params["url"], allow_remote=params["allow_remote"])
        if mode == "conns":
            from .conns import parse_sources

            sources = params.pop("sources")
            if sources is None and target.family == socket.AF_INET and target.host.startswith("127."):
                sources = "127.0.0.1-127.0.0.20"
            params["sources"] = parse_sources(sources, allow_remote=params["allow_remote"])
            params["server_pids"] = list(params["server_pids"])
            if params["sources"] and any((":" in s) != (target.family == socket.AF_INET6) for s in params["sources"]):
                raise BenchError("--sources must be of the same address family as the target")
        if mode in ("echo", "fanout"):
            params["protocol"] = _protocol(mode, params["url"], params["protocol"], target.ws)
            params["server_pids"] = list(params["server_pids"])
            if mode == "fanout" and params["protocol"] == "nats" and (not params["room"] or any(c.isspace() for c in params["room"])):
                raise BenchError("a NATS subject (--room) must be non-empty, without spaces")
        if plot_path:
            report.require_matplotlib()
    except BenchError as exc:
        raise click.UsageError(str(exc)) from None
    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminated)  # stop the load processes too, as Ctrl-C does
    try:
        if mode in ("echo", "fanout") and not params["server_pids"]:
            from .conns import listener_pids

            params["server_pids"] = listener_pids(target.port) if is_loopback_host(target.host) else []
        params["nofile_limit"] = raise_open_file_limit()
        env = report.environment()
        results = runner(params, Progress(enabled=not quiet))
    except BenchError as exc:
        click.echo(f"wirehub bench {mode}: {exc}", err=True)
        sys.exit(EXIT_PROBLEM)
    except KeyboardInterrupt:
        click.echo(f"\nwirehub bench {mode}: interrupted", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo(f"wirehub bench {mode}: terminated", err=True)
        sys.exit(143)
    doc = report.document(mode, params, results, env, started)
    table = {"echo": report.echo_table, "fanout": report.fanout_table, "conns": report.conns_table}[mode]
    click.echo(table(params, results))
    if json_path:
        report.write_json(json_path, doc)
        click.echo(f"results: {json_path}", err=True)
    if plot_path:
        try:
            report.plot(plot_path, doc)
        except BenchError as exc:
            click.echo(f"wirehub bench {mode}: {exc}", err=True)
            sys.exit(EXIT_PROBLEM)
        click.echo(f"plot: {plot_path}", err=True)
    sys.exit(check(results))
