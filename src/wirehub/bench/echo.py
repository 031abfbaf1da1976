"""``wirehub bench echo``: C connections, each keeping a burst of P requests in flight.

Each connection writes its burst (built once, P requests in one write), counts the replies
and, when all P are back, records the burst's round trip and writes the next one. Counting
costs one C call per chunk read: the newlines on TCP (``bytes.count``), the bytes on
WebSocket (every reply frame has the same, known size). Nothing is parsed on the hot path;
what a reply must look like is learnt once per connection before the load starts (a single
request and its reply, checked properly), and the last reply of every burst is compared
with it, so a server answering with errors is noticed rather than counted.

``--protocol line``: P lines of S bytes (plus ``\\n``; over WebSocket, text messages of S
bytes), for an echo server such as ``wirehub run wirehub.apps.echo:app``. ``--protocol hub``:
P ``{"op":"ping"}`` frames, for ``wirehub serve``; S is ignored. ``--protocol raw``: the
same ``{"op":"ping"}`` bytes the hub gets, to a plain echo server (a Node ``ws`` or picows
echo server, a bare TCP echo server), which must send them back unchanged; S is ignored.
``--protocol resp``: Redis ``ECHO`` of S bytes (``*2\\r\\n$4\\r\\nECHO\\r\\n$S\\r\\n...``),
answered with a bulk string (``$S\\r\\n...\\r\\n``, two newlines per reply), TCP only.

Requests that are more than an echo (their replies differ from one another, so the last
reply of a burst is checked for its kind rather than compared byte for byte):
``--protocol hub-ref``: ``{"op":"ping","ref":1}``, answered ``{"op":"pong","ref":1}`` by the
hub's general frame path (a bare ping is answered from a table). ``--protocol hub-pub``:
``{"op":"pub","room":"bench-K","data":"xx…","ref":1}`` with S bytes of data, connection K
publishing to room K mod 100, answered ``{"op":"ok","ref":1,"seq":N}``, TCP only.
``--protocol resp-xadd``: Redis ``XADD bench-K MAXLEN ~ 100 * d <S bytes>`` as a RESP array,
connection K writing stream K mod 100, answered with the entry id as a bulk string: what a
Redis user does to keep a capped history per room, the peer of ``hub-pub``.
"""

from __future__ import annotations

import asyncio
import json
import time
from time import monotonic_ns
from typing import Any

from .net import BenchError, Client, Target, connect, frame_for, parse_target, share
from .runner import Control, CpuWindow, Progress, WorkerPool, merge_cpu, progress_task
from .stats import Histogram

PING = b'{"op":"ping"}'
PING_REF = b'{"op":"ping","ref":1}'
CONNECT_CONCURRENCY = 200
PROTOCOLS = ("hub", "line", "raw", "resp", "hub-ref", "hub-pub", "resp-xadd")
ROOMS = 100  # hub-pub and resp-xadd: connection K writes to room (stream) K mod ROOMS
#: protocols whose replies differ from one another: reply -> the start its last line(s) must have
VARIES = {"hub-pub": b'{"op":"ok"', "resp-xadd": b"$"}


def request_payload(protocol: str, size: int, index: int = 0) -> bytes:
    if protocol in ("hub", "raw"):
        return PING
    if protocol == "hub-ref":
        return PING_REF
    if protocol == "hub-pub":
        data = b'"' + b"x" * max(0, size - 2) + b'"'  # a JSON string of S bytes, quotes included
        return b'{"op":"pub","room":"bench-%d","data":%s,"ref":1}' % (index % ROOMS, data)
    return b"x" * size


def request_bytes(target: Target, protocol: str, payload: bytes, index: int = 0) -> bytes:
    """One request as written on the wire."""
    if protocol in ("resp", "resp-xadd"):
        if target.ws:
            raise BenchError(f"--protocol {protocol} (Redis) needs a tcp:// or redis:// URL")
        if protocol == "resp-xadd":
            key = b"bench-%d" % (index % ROOMS)
            return (b"*8\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$3\r\n100\r\n$1\r\n*\r\n"
                    b"$1\r\nd\r\n$%d\r\n%s\r\n") % (len(key), key, len(payload), payload)
        return b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    if protocol == "hub-pub" and target.ws:
        raise BenchError("--protocol hub-pub counts replies by their newlines: use a tcp:// URL")
    return frame_for(target, payload)


def last_reply_is(data: bytes, start: bytes, lines: int) -> bool:
    """Whether the last reply in ``data`` (which ends with one) starts with ``start``; a
    reply spans ``lines`` lines. True when ``data`` does not hold the whole reply."""
    end = len(data) - 1
    for _ in range(lines):
        end = data.rfind(b"\n", 0, end)
        if end < 0:
            return True
    return data.startswith(start, end + 1)


def resp_bulk(payload: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(payload), payload)


class EchoRun:
    """What the connections of one worker share: the burst, the clock limits, the tallies."""

    __slots__ = ("pipeline", "burst", "expect", "tail", "measure_start", "measure_end", "msgs", "total",
                 "hist", "record", "errors", "error_text", "protocol", "request", "target", "size", "varies")

    def __init__(self, target: Target, protocol: str, pipeline: int, size: int) -> None:
        self.protocol = protocol
        self.pipeline = pipeline
        self.target = target
        self.size = size
        self.request = request_payload(protocol, size)
        self.burst = request_bytes(target, protocol, self.request) * pipeline
        self.varies = VARIES.get(protocol)
        self.expect = 0  # newlines (tcp) or bytes (ws) per burst, set once a reply has been seen
        self.tail = b""  # the exact bytes of one reply on the wire
        self.measure_start = 1 << 62
        self.measure_end = 1 << 62
        self.msgs = 0  # replies in complete bursts inside the measured window
        self.total = 0  # replies in complete bursts, warmup included
        self.hist = Histogram()
        self.record = self.hist.record
        self.errors = 0
        self.error_text = ""

    def check(self, reply: bytes) -> str:
        """Why ``reply`` is not the expected answer to :attr:`request` ('' when it is)."""
        shown = reply[:200].decode("utf-8", "replace")
        if self.protocol in ("line", "raw"):
            if reply != self.request:
                what = "the line" if self.protocol == "line" else "the same bytes"
                return f"expected {what} back (--protocol {self.protocol}, an echo server), got {shown!r}"
            return ""
        if self.protocol == "resp":
            if reply != resp_bulk(self.request):
                return f"expected the bulk string {resp_bulk(self.request)[:40]!r}... (--protocol resp, Redis ECHO), got {shown!r}"
            return ""
        if self.protocol == "resp-xadd":
            if not reply.startswith(b"$"):
                return f"expected a stream entry id as a bulk string (--protocol resp-xadd, Redis XADD), got {shown!r}"
            return ""
        try:
            obj = json.loads(reply)
        except ValueError:
            obj = None
        if self.protocol == "hub-pub":
            if not isinstance(obj, dict) or obj.get("op") != "ok" or obj.get("ref") != 1 or type(obj.get("seq")) is not int:
                return f'expected {{"op":"ok","ref":1,"seq":N}} (--protocol hub-pub, a wirehub hub), got {shown!r}'
            return ""
        if self.protocol == "hub-ref" and isinstance(obj, dict) and obj.get("ref") != 1:
            return f'expected {{"op":"pong","ref":1}} (--protocol hub-ref), got {shown!r}'
        if not isinstance(obj, dict) or obj.get("op") != "pong":
            hint = " (an echo server answers a ping with the ping: use --protocol raw, or --protocol line)" if reply == PING else ""
            return f'expected {{"op":"pong"}} (--protocol hub, a wirehub hub), got {shown!r}{hint}'
        return ""


class _EchoClient(Client):
    def __init__(self, target: Target, run: EchoRun, index: int) -> None:
        super().__init__(target)
        self.run = run
        if run.protocol in VARIES:  # a room (stream) of its own among ROOMS
            one = request_bytes(target, run.protocol, request_payload(run.protocol, run.size, index), index)
            self.first, self.burst = one, one * run.pipeline
        else:
            self.burst = run.burst
            self.first = run.burst[: len(run.burst) // run.pipeline]
        self.calibrated = self.new_future()
        self.done = self.loop.create_future()
        self.pending = 0
        self.sent_at = 0
        self.partial = b""  # a RESP reply's lines so far

    # ---- setup: one request, its reply learnt

    def calibrate(self) -> None:
        self.transport.write(self.first)  # type: ignore[union-attr]

    def setup_frame(self, payload: bytes, opcode: int) -> None:
        run = self.run
        if run.protocol in ("resp", "resp-xadd"):  # lines: a bulk string is two of them, anything else one
            payload = self.partial + payload + b"\n"
            if payload.startswith(b"$"):
                try:
                    n = int(payload[1 : payload.index(b"\r")])
                except ValueError:
                    n = -1
                if n >= 0 and len(payload) < payload.index(b"\n") + 1 + n + 2:
                    self.partial = payload
                    return
            self.partial = b""
        problem = run.check(payload)
        if problem:
            self.setup_failed(f"{self.target.url}: {problem}")
            return
        tail = payload if run.protocol in ("resp", "resp-xadd") else self.reply_bytes(payload, opcode)
        if run.varies is not None:  # replies differ (a seq, an entry id): count lines, check kinds
            run.tail = tail
            run.expect = run.pipeline * tail.count(b"\n")
        elif not run.tail:
            run.tail = tail
            # what the hot path counts per reply: its bytes (ws) or its newlines (tcp)
            run.expect = run.pipeline * (len(tail) if self.target.ws else tail.count(b"\n"))
        elif tail != run.tail:
            self.setup_failed(f"{self.target.url}: two connections got different replies to the same request")
            return
        self.end_setup()
        if not self.calibrated.done():
            self.calibrated.set_result(None)

    def setup_failed(self, message: str) -> None:
        if not self.calibrated.done():
            self.calibrated.set_exception(BenchError(message))

    # ---- the load

    def start(self, now: int) -> None:
        self.sent_at = now
        self.pending = self.run.expect
        self.transport.write(self.burst)  # type: ignore[union-attr]

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, text: str) -> None:
        self.run.errors += 1
        if not self.run.error_text:
            self.run.error_text = text
        self.finish()
        self.close()

    def _burst_done(self, data: bytes) -> None:
        run = self.run
        now = monotonic_ns()
        tail = run.tail
        if run.varies is not None:
            bad = self.pending < 0 or not last_reply_is(data, run.varies, tail.count(b"\n"))
        else:
            bad = self.pending < 0 or (len(data) >= len(tail) and not data.endswith(tail))
        if bad:
            self.fail(f"unexpected reply: ...{data[-80:].decode('utf-8', 'replace')!r}")
            return
        run.total += run.pipeline
        if now >= run.measure_start:
            if now >= run.measure_end:
                self.finish()
                return
            run.msgs += run.pipeline
            run.record(now - self.sent_at)
        self.sent_at = now
        self.pending = run.expect
        self.transport.write(self.burst)  # type: ignore[union-attr]

    def on_lost(self) -> None:
        if not self.setup and not self.done.done():
            self.fail("the server closed the connection")
        self.setup_failed(f"{self.target.url} closed the connection")


class _LineClient(_EchoClient):
    def fast(self, data: bytes) -> None:
        self.pending -= data.count(b"\n")
        if self.pending <= 0:
            self._burst_done(data)


class _WsClient(_EchoClient):
    def fast(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending <= 0:
            self._burst_done(data)


async def open_clients(target: Target, factory, n: int) -> list:
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one():
        async with sem:
            return await connect(target, factory)

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                t.result().close()
        raise


async def worker(ctl: Control, p: dict) -> None:
    target = parse_target(p["url"], allow_remote=True)  # the parent applied the loopback rule
    n = share(p["connections"], ctl.index, ctl.count)
    run = EchoRun(target, p["protocol"], p["pipeline"], p["size"])
    cls = _WsClient if target.ws else _LineClient
    first = sum(share(p["connections"], i, ctl.count) for i in range(ctl.index))  # this worker's first index
    indexes = iter(range(first, first + n))
    clients = await open_clients(target, lambda: cls(target, run, next(indexes)), n)
    try:
        for c in clients:
            c.calibrate()
        await asyncio.wait_for(asyncio.gather(*(c.calibrated for c in clients)), p["timeout"])
    except asyncio.TimeoutError:
        raise BenchError(f"{target.url}: no reply to a first request within {p['timeout']:g} s") from None
    ctl.send("ready", connections=n)
    _, start = await ctl.recv("start")
    t0 = start["t0"]
    run.measure_start = t0 + int(p["warmup"] * 1e9)
    run.measure_end = run.measure_start + int(p["duration"] * 1e9)
    delay = (t0 - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
    def snapshot() -> dict:
        if ctl.stopped:  # the parent gave up (Ctrl-C): every connection ends at its next reply
            run.measure_end = 0
        return {"total": run.total, "msgs": run.msgs}

    reporter = progress_task(ctl, snapshot)
    meter = CpuWindow(p.get("server_pids") if ctl.index == 0 else None)
    meter.schedule(run.measure_start, run.measure_end)
    now = time.monotonic_ns()
    for c in clients:
        c.start(now)
    wait = (run.measure_end - time.monotonic_ns()) / 1e9 + p["timeout"]
    _, pending = await asyncio.wait([c.done for c in clients], timeout=max(0.0, wait))
    reporter.cancel()
    for c in clients:
        c.close()
    ctl.send(
        "result",
        msgs=run.msgs,
        total=run.total,
        hist=run.hist.to_dict(),
        errors=run.errors,
        error_text=run.error_text,
        stalled=len(pending),
        connections=n,
        reply_bytes=len(run.tail),
        request_bytes=len(run.burst) // max(1, run.pipeline),
        cpu=meter.result(),
    )


def run(p: dict, progress: Progress) -> dict[str, Any]:
    """Run the echo load described by ``p``; return the merged results."""
    processes = max(1, min(p["processes"], p["connections"]))
    pool = WorkerPool("wirehub.bench.echo:worker", p, processes)
    try:
        progress.show(f"echo: opening {p['connections']} connections to {p['url']}", force=True)
        pool.gather("ready", timeout=p["timeout"] + 30 + p["connections"] / 500)
        t0 = time.monotonic_ns() + 50_000_000
        warmup, duration = p["warmup"], p["duration"]
        pool.broadcast("start", t0=t0)
        timeline: list[tuple[float, int]] = []
        measure_start = t0 + int(warmup * 1e9)
        total_s = warmup + duration

        def tick() -> None:
            now = time.monotonic_ns()
            elapsed = max(0.0, (now - t0) / 1e9)
            if now < measure_start:
                done = sum(w.get("total", 0) for w in pool.latest.values())
                rate = done / elapsed if elapsed > 0 else 0.0
                phase = "warmup"
            else:
                done = sum(w.get("msgs", 0) for w in pool.latest.values())
                window = (now - measure_start) / 1e9
                rate = done / window if window > 0 else 0.0
                phase = "measure"
                if elapsed <= total_s:
                    timeline.append((round(elapsed, 3), done))
            progress.show(f"echo {min(elapsed, total_s):5.1f}/{total_s:g} s  {phase:7s}  {done:>12,} msgs  {rate:>12,.0f} msgs/s")

        results = pool.gather("result", timeout=total_s + p["timeout"] + 30, tick=tick)
    finally:
        progress.clear()
        pool.close()
    hist = Histogram()
    for r in results.values():
        hist.merge(Histogram.from_dict(r["hist"]))
    msgs = sum(r["msgs"] for r in results.values())
    errors = sum(r["errors"] for r in results.values())
    first = results[0]
    rates = []
    prev_t, prev_n = warmup, 0
    for t, n in timeline:  # cumulative counts to rates per interval
        if t - prev_t >= 0.5:
            rates.append((round(t - warmup, 3), (n - prev_n) / (t - prev_t)))
            prev_t, prev_n = t, n
    return {
        "messages": msgs,
        "seconds": duration,
        "msgs_per_s": msgs / duration if duration else 0.0,
        "bursts": hist.count,
        "bytes_sent_per_msg": first["request_bytes"],
        "bytes_received_per_msg": first["reply_bytes"],
        "errors": errors,
        "error": next((r["error_text"] for r in results.values() if r["error_text"]), ""),
        "stalled_connections": sum(r["stalled"] for r in results.values()),
        "latency_ms": hist.summary(),
        "latency_note": "burst round trip: from writing a burst of `pipeline` requests to its last reply",
        "timeline": [{"t": t, "msgs_per_s": round(r, 1)} for t, r in rates],
        "processes": processes,
        "cpu": merge_cpu({i: r["cpu"] for i, r in results.items()}),
        "histogram_ns": hist.to_dict(),
    }
