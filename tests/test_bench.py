"""``wirehub bench``: the histogram and the loopback rule as units; every mode run as a user
runs it (``python -m wirehub bench ...`` in a subprocess) against servers this module starts
on loopback ports. Each run is under a second of load; no figure is asserted against a
speed, only against what must hold (counts, order of percentiles, zero loss)."""

from __future__ import annotations

import json
import urllib.request
import os
import random
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from wirehub.bench.conns import parse_sources
from wirehub.bench.fanout import FanState, _NatsSubscriber, _Subscriber
from wirehub.bench.net import BenchError, parse_target, share, ws_client_frame, ws_parse
from wirehub.bench.stats import MAX_VALUE, Histogram, bucket_bounds, bucket_index

from .helpers import ServerProcess, free_port, reachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICK = ("--warmup", "0.2", "--duration", "0.5", "--quiet")
RUN_TIMEOUT = 90


def bench(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIREHUB_")}
    return subprocess.run(
        [sys.executable, "-m", "wirehub", "bench", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env,
    )


def bench_json(tmp_path, *args: str) -> dict:
    out = tmp_path / f"bench-{time.monotonic_ns()}.json"
    proc = bench(*args, "--json", str(out))
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(out.read_text())


def assert_ordered(lat: dict) -> None:
    values = [lat[k] for k in ("min", "p50", "p90", "p99", "max")]
    assert all(v is not None for v in values), lat
    assert values == sorted(values), lat
    assert lat["min"] >= 0


# ----------------------------------------------------------------------------- histogram


def test_percentiles_of_small_integers_are_exact():
    h = Histogram()
    values = list(range(1, 101))
    random.Random(7).shuffle(values)
    for v in values:
        h.record(v)
    assert h.count == 100
    assert (h.min, h.max) == (1, 100)
    assert h.percentile(50) == 50
    assert h.percentile(90) == 90
    assert h.percentile(99) == 99
    assert h.percentile(100) == 100
    assert h.percentile(0) == 1
    assert h.mean() == pytest.approx(50.5)
    s = h.summary(scale=1)
    assert (s["p50"], s["p90"], s["p99"], s["max"], s["count"]) == (50, 90, 99, 100, 100)


def test_percentiles_of_large_values_are_within_one_sixty_fourth():
    h = Histogram()
    for v in range(1, 1001):
        h.record(v * 1_000_000)  # 1 ms .. 1 s in ns
    for q, exact in ((50, 500_000_000), (90, 900_000_000), (99, 990_000_000), (99.9, 999_000_000)):
        got = h.percentile(q)
        assert exact <= got <= exact * (1 + 1 / 64), (q, got)
    assert h.percentile(100) == 1_000_000_000
    assert h.summary()["p50"] == pytest.approx(500.0, rel=1 / 64)  # ns -> ms


def test_one_value_many_times_and_weights():
    h = Histogram()
    h.record(123_456_789, 1000)
    assert h.count == 1000
    assert h.percentile(50) == h.percentile(99) == h.max == h.min == 123_456_789
    h.record(5, 10)
    assert h.count == 1010 and h.min == 5
    assert h.percentile(0.5) == 5  # p0.5 is rank 6 of 1010, and 10 values are 5
    assert h.percentile(1) == 123_456_789  # p1 is rank 11


def test_bucket_bounds_hold_their_values():
    rng = random.Random(1)
    values = list(range(0, 5000)) + [rng.randrange(1, MAX_VALUE) for _ in range(5000)] + [MAX_VALUE]
    for v in values:
        i = bucket_index(v)
        low, high = bucket_bounds(i)
        assert low <= v <= high, (v, i, low, high)
        assert high - low + 1 <= max(1, v // 64 + 1)
    assert bucket_index(-5) == 0
    assert bucket_index(MAX_VALUE * 10) == bucket_index(MAX_VALUE)
    # contiguous: every index's range starts right after the previous one
    for i in range(1, bucket_index(MAX_VALUE) + 1):
        assert bucket_bounds(i)[0] == bucket_bounds(i - 1)[1] + 1


def test_memory_is_bounded_and_clamped():
    h = Histogram()
    size = len(h.counts)
    for v in (-1, 0, 1, 10**6, 10**12, 10**15, 10**30):
        h.record(v)
    assert len(h.counts) == size < 3000
    assert h.min == 0 and h.max == MAX_VALUE


def test_merge_and_round_trip():
    rng = random.Random(3)
    a, b, both = Histogram(), Histogram(), Histogram()
    for _ in range(2000):
        v = int(rng.lognormvariate(12, 1.5))
        (a if rng.random() < 0.5 else b).record(v)
        both.record(v)
    merged = Histogram.from_dict(json.loads(json.dumps(a.to_dict()))).merge(Histogram.from_dict(b.to_dict()))
    assert merged.counts == both.counts
    assert (merged.min, merged.max, merged.count) == (both.min, both.max, both.count)
    for q in (50, 90, 99, 99.9):
        assert merged.percentile(q) == both.percentile(q)
    assert Histogram().merge(a).counts == a.counts


def test_empty_histogram():
    h = Histogram()
    assert h.count == 0 and h.percentile(50) == 0
    s = h.summary()
    assert s["count"] == 0 and s["p99"] is None and s["max"] is None
    assert Histogram.from_dict(h.to_dict()).count == 0
    assert Histogram().merge(h).count == 0


# ----------------------------------------------------------------------------- targets and helpers


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:7400", "ws://127.0.0.1:7401/", "tcp://localhost:7400", "ws://[::1]:7401/x", "tcp://127.3.4.5:1"])
def test_loopback_targets_are_accepted(url):
    t = parse_target(url)
    assert t.port in (7400, 7401, 1)


@pytest.mark.parametrize("url", ["tcp://10.1.2.3:7400", "ws://192.0.2.1:7401/", "tcp://[2001:db8::1]:7400", "tcp://0.0.0.0:7400"])
def test_other_targets_are_refused_unless_allowed(url):
    with pytest.raises(BenchError, match="--allow-remote"):
        parse_target(url)
    assert parse_target(url, allow_remote=True).port in (7400, 7401)


@pytest.mark.parametrize("url", ["http://127.0.0.1:80", "tcp://127.0.0.1", "udp://127.0.0.1:7400", "127.0.0.1:7400"])
def test_bad_urls(url):
    with pytest.raises(BenchError):
        parse_target(url)


@pytest.mark.parametrize("mode", ["echo", "fanout", "conns"])
def test_cli_refuses_a_remote_target_before_any_load(mode):
    started = time.monotonic()
    proc = bench(mode, "--url", "tcp://192.0.2.1:7400", "--quiet", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "not a loopback address" in proc.stderr and "--allow-remote" in proc.stderr
    assert proc.stdout == ""
    assert time.monotonic() - started < 20  # refused, not a connect timing out


def test_sources_and_shares():
    assert parse_sources("127.0.0.1-127.0.0.3") == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert parse_sources("127.0.0.9, 127.0.0.7") == ["127.0.0.9", "127.0.0.7"]
    assert parse_sources("") == []
    with pytest.raises(BenchError, match="loopback"):
        parse_sources("10.0.0.1-10.0.0.2")
    with pytest.raises(BenchError):
        parse_sources("127.0.0.5-127.0.0.1")
    for total in (0, 1, 7, 100, 19_000):
        for parts in (1, 2, 3, 8):
            got = [share(total, i, parts) for i in range(parts)]
            assert sum(got) == total and max(got) - min(got) <= 1


def test_websocket_frames():
    frame = ws_client_frame(b'{"op":"ping"}')
    assert frame[0] == 0x81 and frame[1] == 0x80 | 13 and frame[2:6] == b"\0\0\0\0"
    assert ws_client_frame(b"x" * 300)[1:4] == bytes((0x80 | 126, 1, 44))
    server = bytes((0x81, 3)) + b"abc" + bytes((0x82, 126, 1, 44)) + b"y" * 300 + bytes((0x81, 5)) + b"pa"
    buf = bytearray(server)
    assert ws_parse(buf) == [(1, b"abc"), (2, b"y" * 300)]
    assert bytes(buf) == bytes((0x81, 5)) + b"pa"  # the partial frame stays


async def test_subscriber_counts_gaps_duplicates_and_late_messages():
    state = FanState()
    state.win_start, state.win_end = 0, 1 << 62
    sub = _Subscriber(parse_target("tcp://127.0.0.1:9"), state, "bench")
    sub.end_setup()
    sub.reset(10, 10)  # expects i = 10..19

    def msg(i: int, t: int = 1) -> bytes:
        return b'{"op":"msg","room":"bench","seq":%d,"from":"c1","data":{"t":%d,"i":%d,"pad":"xx"},"ts":1}\n' % (i, t, i)

    stream = msg(10) + msg(11) + msg(13) + msg(13) + msg(12) + msg(14) + b'{"op":"join","room":"bench"}\n' + msg(15)
    for k in range(0, len(stream), 7):  # cut anywhere, even inside a number
        sub.fast(stream[k : k + 7])
    assert (sub.unique, sub.dups, sub.ooo) == (6, 1, 1)
    assert sub.next_i == 16 and not sub.missing and not sub.complete
    sub.fast(msg(16) + msg(17) + msg(18) + msg(19))
    assert sub.complete and sub.unique == 10 and state.received == 11
    assert state.hist.count == 11
    sub.fast(msg(9))
    assert sub.stale == 1
    sub.reset(20, 3)
    sub.fast(msg(22))
    assert sub.missing == {20, 21} and not sub.complete


# ----------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    tcp, ws = free_port(), free_port()
    server = ServerProcess("run", "wirehub.apps.echo:app", "--tcp", f"127.0.0.1:{tcp}", "--ws", f"127.0.0.1:{ws}",
                           "--udp", "off", "--admin", "off", "--log-level", "warning")
    server.start(tmp_path_factory.mktemp("echo"))
    try:
        server.wait_port(tcp)
        server.wait_port(ws)
        yield {"tcp": f"tcp://127.0.0.1:{tcp}", "ws": f"ws://127.0.0.1:{ws}/"}
    finally:
        server.stop()


def start_hub(tmp_path) -> tuple[ServerProcess, dict[str, str]]:
    tcp, ws = free_port(), free_port()
    server = ServerProcess("serve", "--tcp", f"127.0.0.1:{tcp}", "--ws", f"127.0.0.1:{ws}", "--udp", "off", "--admin", "off",
                           "--log-level", "warning")
    server.start(tmp_path)
    try:
        server.wait_port(tcp)
        server.wait_port(ws)
    except BaseException:
        server.stop()
        raise
    return server, {"tcp": f"tcp://127.0.0.1:{tcp}", "ws": f"ws://127.0.0.1:{ws}/"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server, urls = start_hub(tmp_path_factory.mktemp("hub"))
    try:
        yield urls
    finally:
        server.stop()


# ----------------------------------------------------------------------------- echo


def check_echo(doc: dict, url: str, protocol: str, connections: int, pipeline: int) -> None:
    assert doc["mode"] == "echo"
    p, r = doc["parameters"], doc["results"]
    assert (p["url"], p["protocol"], p["connections"], p["pipeline"]) == (url, protocol, connections, pipeline)
    assert p["duration"] == 0.5 and p["warmup"] == 0.2
    assert r["messages"] > 0 and r["messages"] % pipeline == 0
    assert r["bursts"] * pipeline == r["messages"]
    assert r["msgs_per_s"] == pytest.approx(r["messages"] / 0.5)
    assert r["errors"] == 0 and r["stalled_connections"] == 0
    assert_ordered(r["latency_ms"])
    assert r["latency_ms"]["count"] == r["bursts"]
    assert doc["environment"]["python"] and doc["environment"]["cpus"]


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_echo_line_against_the_echo_app(echo_server, tmp_path, transport):
    url = echo_server[transport]
    doc = bench_json(tmp_path, "echo", "--url", url, "--protocol", "line", "--connections", "8", "--pipeline", "4",
                     "--size", "100", *QUICK)
    check_echo(doc, url, "line", 8, 4)
    assert doc["parameters"]["size"] == 100
    assert doc["results"]["bytes_sent_per_msg"] == (101 if transport == "tcp" else 106)


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_echo_hub_ping_pong(hub, tmp_path, transport):
    url = hub[transport]
    doc = bench_json(tmp_path, "echo", "--url", url, "--protocol", "hub", "--connections", "10", "--pipeline", "3", *QUICK)
    check_echo(doc, url, "hub", 10, 3)
    assert doc["results"]["bytes_received_per_msg"] == len(b'{"op":"pong"}') + (1 if transport == "tcp" else 2)


def test_echo_with_two_load_processes_and_the_table(hub, tmp_path):
    out = tmp_path / "two.json"
    proc = bench("echo", "--url", hub["tcp"], "--connections", "5", "--pipeline", "2", "--processes", "2", *QUICK,
                 "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    check_echo(doc, hub["tcp"], "hub", 5, 2)
    assert doc["results"]["processes"] == 2
    assert "msgs/s" in proc.stdout and "burst round trip p99" in proc.stdout
    assert "results: " in proc.stderr


def test_echo_notices_the_wrong_protocol(echo_server, hub):
    proc = bench("echo", "--url", echo_server["tcp"], "--protocol", "hub", "--connections", "2", *QUICK, timeout=60)
    assert proc.returncode == 1
    assert "--protocol line" in proc.stderr
    proc = bench("echo", "--url", hub["tcp"], "--protocol", "line", "--connections", "2", *QUICK, timeout=60)
    assert proc.returncode == 1
    assert "expected the line back" in proc.stderr


def test_echo_progress_line_on_stderr(hub):
    proc = bench("echo", "--url", hub["tcp"], "--connections", "2", "--warmup", "0.2", "--duration", "1.2")
    assert proc.returncode == 0, proc.stderr
    assert "msgs/s" in proc.stderr and "/1.4 s" in proc.stderr


# ----------------------------------------------------------------------------- fanout


@pytest.mark.parametrize("transport,processes", [("tcp", 1), ("ws", 2)])
def test_fanout_delivers_every_message_to_every_subscriber(hub, tmp_path, transport, processes):
    url = hub[transport]
    doc = bench_json(tmp_path, "fanout", "--url", url, "--subscribers", "20", "--rate", "40", "--size", "64",
                     "--warmup", "0.25", "--duration", "0.75", "--drain", "20", "--processes", str(processes), "--quiet")
    p, r = doc["parameters"], doc["results"]
    assert r["processes"] == processes
    assert (p["subscribers"], p["rate"], p["room"], p["url"]) == (20, 40.0, "bench", url)
    (step,) = r["steps"]
    assert step["published"] == 40  # 40/s x (0.25 + 0.75) s
    assert step["expected_deliveries"] == step["delivered"] == 20 * 40
    assert step["lost"] == step["duplicates"] == step["out_of_order"] == step["undelivered_i"] == 0
    assert step["every_i_to_every_subscriber"]
    assert step["subscriber_connections_lost"] == 0
    assert step["received"] == 20 * 40
    assert step["deliveries_measured"] == 20 * step["published_in_window"] > 0
    assert_ordered(step["latency_ms"])


def test_fanout_ramp_reports_each_step(hub, tmp_path):
    doc = bench_json(tmp_path, "fanout", "--url", hub["tcp"], "--subscribers", "5", "--rate", "20", "--ramp",
                     "--max-steps", "3", "--max-p99", "60000", "--warmup", "0", "--duration", "0.3", "--drain", "20",
                     "--room", "ramp", "--quiet")
    r = doc["results"]
    assert [s["rate"] for s in r["steps"]] == [20.0, 40.0, 80.0]
    assert all(s["clean"] and s["lost"] == 0 for s in r["steps"]), [s["problems"] for s in r["steps"]]
    assert r["highest_clean_rate"] == 80.0
    assert doc["parameters"]["room"] == "ramp"


def test_ramp_stops_at_a_step_over_max_p99(hub, tmp_path):
    # no end-to-end latency is 1 microsecond: the first step already fails the bound
    out = tmp_path / "stop.json"
    proc = bench("fanout", "--url", hub["tcp"], "--subscribers", "2", "--rate", "20", "--ramp", "--max-p99", "0.001",
                 "--warmup", "0", "--duration", "0.3", "--quiet", "--json", str(out))
    assert proc.returncode == 1, proc.stderr  # no clean step
    assert "no clean step" in proc.stdout
    r = json.loads(out.read_text())["results"]
    assert len(r["steps"]) == 1 and not r["steps"][0]["clean"]
    assert any("--max-p99" in why for why in r["steps"][0]["problems"])
    assert r["highest_clean_rate"] is None


# ----------------------------------------------------------------------------- conns


def test_conns_reports_bytes_per_connection(tmp_path):
    server, urls = start_hub(tmp_path)
    try:
        doc = bench_json(tmp_path, "conns", "--url", urls["tcp"], "--count", "200", "--server-pid", str(server.proc.pid),
                         "--sources", "127.0.0.1-127.0.0.4", "--warmup", "0.2", "--quiet")
        p, r = doc["parameters"], doc["results"]
        assert p["count"] == 200 and p["sources"] == ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
        assert r["opened"] == 200 and r["failed"] == 0
        assert r["server_pids"] == [server.proc.pid]
        assert r["rss_after"] > r["rss_before"] > 0
        assert r["bytes_per_connection"] > 0
        assert r["closed_by_server"] == 0
        # and joined to a room, over WebSocket, the server found by its port
        doc = bench_json(tmp_path, "conns", "--url", urls["ws"], "--count", "50", "--join", "idle", "--warmup", "0", "--quiet")
        assert doc["results"]["opened"] == 50 and doc["results"]["server_pids"] == [server.proc.pid]
    finally:
        server.stop()


def test_conns_send_waits_for_the_reply_to_one_frame(tmp_path):
    """--send (a server that is not the hub, such as an echo server): each connection sends
    one frame and counts as opened once a frame comes back (here the hub's pong)."""
    server, urls = start_hub(tmp_path)
    try:
        doc = bench_json(tmp_path, "conns", "--url", urls["ws"], "--count", "40", "--send", '{"op":"ping"}',
                         "--warmup", "0", "--quiet")
        assert doc["parameters"]["send"] == '{"op":"ping"}'
        assert doc["results"]["opened"] == 40 and doc["results"]["failed"] == 0
        assert doc["results"]["opened_per_s"] > 0
    finally:
        server.stop()


# ----------------------------------------------------------------------------- plot


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.mark.skipif(_has_matplotlib(), reason="matplotlib is installed here")
def test_plot_without_matplotlib_says_what_to_install(hub, tmp_path):
    proc = bench("echo", "--url", hub["tcp"], "--plot", str(tmp_path / "x.png"), *QUICK, timeout=30)
    assert proc.returncode == 2
    assert "pip install matplotlib" in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not _has_matplotlib(), reason="matplotlib is not installed")
def test_plot_writes_a_png(hub, tmp_path):
    png = tmp_path / "echo.png"
    proc = bench("echo", "--url", hub["tcp"], "--connections", "2", "--plot", str(png), *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- subscribers sharing one stream


class _Sink:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def _redis_msg(i: int) -> bytes:
    data = b'{"t":%d,"i":%d,"pad":"xxxxxxxxxxxxxxxx"}' % (1_000_000 + i // 3 * 1000, i)  # three per publisher tick
    return b"*3\r\n$7\r\nmessage\r\n$5\r\nbench\r\n$%d\r\n%s\r\n" % (len(data), data)


async def test_subscribers_reading_the_same_stream_count_exactly_what_each_got():
    # many subscribers of one process share what they learn of the stream; each reads its own
    # copy cut at random places, some with a duplicate, a gap, a late message or a server PING
    # in it: every count must be what that subscriber got, whichever subscriber read first
    rng = random.Random(11)
    first, count = 100, 300
    normal = list(range(first, first + count))
    dup = normal[:50] + [149] + normal[50:]
    gap = [i for i in normal if i != 200]
    late = normal[:150] + [251, 250] + normal[152:]
    streams = {k: normal for k in range(8)}
    streams.update({8: dup, 9: gap, 10: late, 11: normal})
    state = FanState()
    state.win_start, state.win_end = 0, 1 << 62
    subs = {}
    data = {}
    for k, seq in streams.items():
        sub = _NatsSubscriber(parse_target("tcp://127.0.0.1:9"), state, "bench")
        sub.transport = _Sink()
        sub.end_setup()
        sub.reset(first, count)
        subs[k] = sub
        raw = b"".join(_redis_msg(i) for i in seq)
        if k == 11:  # a keepalive between two messages
            at = raw.index(_redis_msg(222))
            raw = raw[:at] + b"PING\r\n" + raw[at:]
        data[k] = raw
    pos = dict.fromkeys(streams, 0)
    while any(pos[k] < len(data[k]) for k in streams):
        for k in rng.sample(list(streams), len(streams)):
            if pos[k] < len(data[k]):
                n = rng.choice((1, 7, 40, 150, 600, 3000))
                subs[k].fast(data[k][pos[k] : pos[k] + n])
                pos[k] += n
    for k in range(8):
        s = subs[k]
        assert (s.unique, s.dups, s.ooo, s.missing) == (count, 0, 0, set()) and s.complete, k
    assert (subs[8].unique, subs[8].dups, subs[8].ooo) == (count, 1, 0)
    assert subs[9].unique == count - 1 and subs[9].missing == {200} and not subs[9].complete
    assert (subs[10].unique, subs[10].dups, subs[10].ooo) == (count, 0, 1) and subs[10].complete
    assert (subs[11].unique, subs[11].dups) == (count, 0) and subs[11].transport.written == [b"PONG\r\n"]
    total = sum(len(seq) for seq in streams.values())
    assert state.received == total and state.hist.count == total == state.in_window
    assert state.reads > len(streams)


# ----------------------------------------------------------------------------- redis and NATS peers


def _start(argv: list[str], port: int, tmp_path) -> subprocess.Popen:
    log = open(tmp_path / f"{os.path.basename(argv[0])}.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 10
    while not reachable(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{argv[0]} did not start: {(tmp_path / (os.path.basename(argv[0]) + '.log')).read_text()}")
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """Our own redis-server on a free port (never the machine's shared one)."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = _start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                  port, tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    if not shutil.which("nats-server"):
        pytest.skip("nats-server is not installed")
    port = free_port()
    proc = _start(["nats-server", "-a", "127.0.0.1", "-p", str(port)], port, tmp_path_factory.mktemp("nats"))
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        _stop(proc)


def test_echo_resp_against_redis(redis_url, tmp_path):
    doc = bench_json(tmp_path, "echo", "--url", redis_url, "--connections", "6", "--pipeline", "5", "--size", "30", *QUICK)
    check_echo(doc, redis_url, "resp", 6, 5)  # the protocol follows from the redis:// URL
    r = doc["results"]
    assert r["bytes_sent_per_msg"] == len(b"*2\r\n$4\r\nECHO\r\n$30\r\n" + b"x" * 30 + b"\r\n")
    assert r["bytes_received_per_msg"] == len(b"$30\r\n" + b"x" * 30 + b"\r\n")
    server = r["cpu"]["server"]
    assert r["cpu"]["loader"]["per_process"] and server["pids"]  # the server found by its port
    # the server's CPU, and of it the part in user mode (redis answered: it ran a little)
    assert server["cores"] is not None and server["user_cores"] is not None
    assert 0 <= server["user_cores"] <= server["cores"] + 0.02  # /proc counts in clock ticks
    tcp = redis_url.replace("redis://", "tcp://")
    doc = bench_json(tmp_path, "echo", "--url", tcp, "--protocol", "resp", "--connections", "2", "--pipeline", "1", *QUICK)
    check_echo(doc, tcp, "resp", 2, 1)


def test_echo_hub_ping_with_a_ref(hub, tmp_path):
    doc = bench_json(tmp_path, "echo", "--url", hub["tcp"], "--protocol", "hub-ref", "--connections", "4", "--pipeline", "3", *QUICK)
    check_echo(doc, hub["tcp"], "hub-ref", 4, 3)
    assert doc["results"]["bytes_received_per_msg"] == len(b'{"op":"pong","ref":1}\n')


def test_echo_hub_pub_with_a_ref_spreads_over_rooms(tmp_path):
    """hub-pub: each connection publishes to its own room among 100 and every reply is an ok
    (its seq varies); the rooms' history holds what was published."""
    tcp, admin = free_port(), free_port()
    server = ServerProcess("serve", "--tcp", f"127.0.0.1:{tcp}", "--ws", "off", "--udp", "off", "--admin", f"127.0.0.1:{admin}",
                           "--log-level", "warning")
    server.start(tmp_path)
    try:
        server.wait_port(tcp)
        server.wait_port(admin)
        url = f"tcp://127.0.0.1:{tcp}"
        doc = bench_json(tmp_path, "echo", "--url", url, "--protocol", "hub-pub", "--connections", "3",
                         "--pipeline", "4", "--size", "20", *QUICK)
        check_echo(doc, url, "hub-pub", 3, 4)
        assert doc["results"]["bytes_sent_per_msg"] == len(b'{"op":"pub","room":"bench-0","data":"' + b"x" * 18 + b'","ref":1}\n')
        rooms = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/rooms", timeout=5).read())
        seqs = {r["room"]: r["seq"] for r in rooms if r["room"].startswith("bench-")}
        assert set(seqs) == {"bench-0", "bench-1", "bench-2"}
        assert sum(seqs.values()) >= doc["results"]["messages"]  # warmup's publications too
    finally:
        server.stop()


def test_echo_hub_pub_notices_refusals(hub, tmp_path):
    proc = bench("echo", "--url", hub["tcp"], "--protocol", "hub-pub", "--connections", "1", "--size", "70000", *QUICK, timeout=60)
    assert proc.returncode == 1
    assert "expected {\"op\":\"ok\"" in proc.stderr


def test_echo_resp_xadd_against_redis(redis_url, tmp_path):
    doc = bench_json(tmp_path, "echo", "--url", redis_url, "--protocol", "resp-xadd", "--connections", "3", "--pipeline", "4",
                     "--size", "30", *QUICK)
    check_echo(doc, redis_url, "resp-xadd", 3, 4)
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        assert {k.decode() for k in r.keys("bench-*")} >= {"bench-0", "bench-1", "bench-2"}
        assert 0 < r.xlen("bench-1") <= 200  # MAXLEN ~ 100 trims in whole nodes
    finally:
        r.close()


def test_protocols_that_do_not_fit_the_url_are_refused(redis_url, nats_url):
    for args in (("echo", "--url", redis_url, "--protocol", "hub"), ("echo", "--url", nats_url),
                 ("echo", "--url", "ws://127.0.0.1:9/", "--protocol", "resp"),
                 ("fanout", "--url", redis_url, "--protocol", "nats"),
                 ("fanout", "--url", "ws://127.0.0.1:9/", "--protocol", "redis"),
                 ("fanout", "--url", nats_url, "--room", "two words")):
        proc = bench(*args, "--quiet", timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == ""


@pytest.mark.parametrize("transport", ["tcp", "ws"])
def test_echo_raw_sends_the_hubs_bytes_to_an_echo_server(echo_server, tmp_path, transport):
    url = echo_server[transport]
    doc = bench_json(tmp_path, "echo", "--url", url, "--protocol", "raw", "--connections", "4", "--pipeline", "8", *QUICK)
    check_echo(doc, url, "raw", 4, 8)
    framing = 1 if transport == "tcp" else 2  # a newline, or the server's 2-byte frame header
    assert doc["results"]["bytes_received_per_msg"] == len(b'{"op":"ping"}') + framing


def test_echo_raw_notices_a_server_that_does_not_echo(hub):
    proc = bench("echo", "--url", hub["tcp"], "--protocol", "raw", "--connections", "2", *QUICK, timeout=60)
    assert proc.returncode == 1
    assert "expected the same bytes back" in proc.stderr


def _check_fanout(doc: dict, subscribers: int, published: int) -> None:
    (step,) = doc["results"]["steps"]
    assert step["published"] == published
    assert step["expected_deliveries"] == step["delivered"] == step["received"] == subscribers * published
    assert step["lost"] == step["duplicates"] == step["out_of_order"] == step["undelivered_i"] == 0
    assert step["subscriber_connections_lost"] == 0 and step["publisher_errors"] == 0
    assert step["deliveries_measured"] == subscribers * step["published_in_window"] > 0
    assert_ordered(step["latency_ms"])
    cpu = step["cpu"]
    assert cpu["loader"]["per_process"] and cpu["loader"]["total"] is not None


@pytest.mark.parametrize("processes", [1, 2])
def test_fanout_redis_pubsub(redis_url, tmp_path, processes):
    room = f"wirehub-bench-{uuid.uuid4().hex[:8]}"
    doc = bench_json(tmp_path, "fanout", "--url", redis_url, "--subscribers", "12", "--rate", "60", "--room", room,
                     "--warmup", "0.2", "--duration", "0.3", "--drain", "20", "--processes", str(processes), "--quiet")
    assert doc["parameters"]["protocol"] == "redis" and doc["parameters"]["room"] == room
    _check_fanout(doc, 12, 30)


def test_fanout_nats(nats_url, tmp_path):
    room = f"wirehub.bench.{uuid.uuid4().hex[:8]}"
    doc = bench_json(tmp_path, "fanout", "--url", nats_url, "--subscribers", "12", "--rate", "60", "--room", room,
                     "--warmup", "0.2", "--duration", "0.3", "--drain", "20", "--quiet")
    assert doc["parameters"]["protocol"] == "nats"
    _check_fanout(doc, 12, 30)


# ----------------------------------------------------------------------------- the harness (bench/peers.py)


def test_peers_harness_writes_the_table(tmp_path):
    md = tmp_path / "benchmarks.md"
    kept = "## Which WebSocket implementation (issue: the hub)\n\nkept as it was\n"
    md.write_text("# Benchmarks\n\nold top section\n\n" + kept)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "peers.py"), "--quick", "--only", "line-p1", "--seconds", "0.5",
         "--markdown", str(md), "--results", str(tmp_path / "results"), "--no-plots"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    text = md.read_text()
    assert "old top section" not in text and text.endswith(kept)  # the section below stays
    lines = text.splitlines()
    head = lines.index("| figure | wirehub | peer | ratio | target | met? |")
    assert lines[head + 1] == "| --- | ---: | ---: | ---: | --- | --- |"
    row = lines[head + 2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6 and "pipeline 1" in cells[0] and "uvloop" in cells[0]
    wirehub, peer, ratio = (float(c.replace(",", "")) for c in cells[1:4])
    assert wirehub > 0 and peer > 0 and ratio == pytest.approx(wirehub / peer, abs=0.01)
    assert cells[4] == "≥ 0.9×" and cells[5] in ("**yes**", "**no**")
    assert not lines[head + 3].startswith("|")  # one row: only line-p1 was asked for
    assert "taskset" in text or "Not pinned" in text
    assert "bench/peers/uvloop_echo.py $P" in text and "wirehub bench echo --url tcp://127.0.0.1:$P" in text
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert {r["side"] for r in summary["runs"]} == {"wh-line-p1", "uv-line-p1"}
    assert all(r["value"] for r in summary["runs"])


def test_hotpath_measures_the_cost_of_an_on_publish_hook():
    """``bench/hotpath.py``'s hook cases run the hub with ``bench/apps/pub_hook.py`` loaded as
    ``--app`` loads it: the plain hook inline, the async one in the connections' tasks (a
    round waits until every publication of it was published, or fails)."""
    cases = ("hub-pub-ref", "hub-pub-hook", "hub-pub-hook-async")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "hotpath.py"), "--json", "--seconds", "0.2", "--runs", "1"]
    for case in cases:
        cmd += ["--case", case]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    ns = json.loads(proc.stdout)["ns"]
    assert set(ns) == set(cases), proc.stderr
    assert all(ns[case] > 0 for case in cases)
    from wirehub.cli import load_hooks

    for name, is_async in (("hub", False), ("async_hub", True)):  # the hooks the cases load
        hook = load_hooks(os.path.join(ROOT, "bench", "apps", "pub_hook.py") + ":" + name).find("publish", "bench-7")
        assert hook is not None and hook.is_async is is_async
