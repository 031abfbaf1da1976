"""``wirehub bench``: the histogram and the loopback rule as units; every mode run as a user
runs it (``python -m wirehub bench ...`` in a subprocess) against servers this module starts
on loopback ports. Each run is under a second of load; no figure is asserted against a
speed, only against what must hold (counts, order of percentiles, zero loss)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

from wirehub.bench.conns import parse_sources
from wirehub.bench.fanout import FanState, _Subscriber
from wirehub.bench.net import BenchError, parse_target, share, ws_client_frame, ws_parse
from wirehub.bench.stats import MAX_VALUE, Histogram, bucket_bounds, bucket_index

from .helpers import ServerProcess, free_port

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


# ----------------------------------------------------------------------------- plot


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


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
