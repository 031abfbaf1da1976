"""``wirehub bench fanout``: N subscribers in one room, one publisher at a set rate.

The publisher sends ``{"op":"pub","room":ROOM,"data":{"t":NS,"i":N,"pad":"..."}}`` on a
timer with catch-up: message k of a step is due at ``t0 + k / rate``; every tick sends all
that are due in one write, so a late tick never lowers the rate (no sleep drift). ``t`` is
``time.monotonic_ns()`` when the message was written, ``i`` numbers the messages.

A subscriber does not decode JSON. One regular expression finds every ``{"t":..,"i":..,``
in a chunk read (C code, one call per chunk); the pair of numbers is converted once per
process (every subscriber reads the same message, so the others find it in a dict); the
``i`` of a chunk are checked in one go against the run they should be (the next expected
``i`` onwards, consecutive), and only a chunk that is not goes through the per-message path
that tells a gap from a duplicate from a late (out-of-order) message. Latency is
``now - t`` with one clock reading per chunk; messages written in the same publisher tick
share ``t`` and are recorded as one value with a count.

``--ramp`` repeats the step at rising rates (``--ramp-factor``, x2 by default) and stops at
the first step that loses, duplicates or reorders a message, whose p99 exceeds
``--max-p99``, or that the publisher could not keep up with.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from time import monotonic_ns
from typing import Any

from .net import BenchError, Client, Target, connect, parse_target, share, ws_client_header
from .runner import Control, Progress, Stopped, WorkerPool, progress_task
from .stats import Histogram

_MSG = re.compile(rb'\{"t":(\d+),"i":(\d+),')
_TAIL = 128  # longer than any partial match can be
_ENDS = (b"\n", b"}")
PARSED_CAP = 100_000
MISSING_CAP = 100_000  # per subscriber; gaps beyond it are counted, not listed
CONNECT_CONCURRENCY = 200


class FanState:
    """What the subscribers of one worker share."""

    __slots__ = ("hist", "record", "win_start", "win_end", "in_window", "arrived", "received", "lost_conns", "parsed")

    def __init__(self) -> None:
        self.new_histogram()
        self.win_start = 1 << 62
        self.win_end = 1 << 62
        self.in_window = 0  # deliveries of messages published inside the window (their latency is recorded)
        self.arrived = 0  # deliveries that arrived inside the window (the throughput)
        self.received = 0
        self.lost_conns = 0
        #: i (as bytes) -> (t, i) as ints: every subscriber of this process reads the same
        #: message, so each is converted once, not once per subscriber
        self.parsed: dict[bytes, tuple[int, int]] = {}

    def parse(self, pair: tuple[bytes, bytes]) -> tuple[int, int]:
        parsed = self.parsed
        if len(parsed) >= PARSED_CAP:
            parsed.clear()
        value = parsed[pair[1]] = (int(pair[0]), int(pair[1]))
        return value

    def new_histogram(self) -> None:
        self.hist = Histogram()
        self.record = self.hist.record


class _Subscriber(Client):
    def __init__(self, target: Target, state: FanState, room: str) -> None:
        super().__init__(target)
        self.state = state
        self.room = room
        self.joined = self.new_future()
        self.rest = b""
        self.base = 0
        self.next_i = 0
        self.end_i = 0
        self.unique = 0
        self.dups = 0
        self.ooo = 0
        self.stale = 0
        self.missing: set[int] = set()
        self.overflow = 0

    # ---- setup: join, wait for joined

    def join(self) -> None:
        self.send(b'{"op":"join","room":%s}' % _json_str(self.room))

    def setup_frame(self, payload: bytes, opcode: int) -> None:
        if b'"op":"joined"' in payload:
            self.end_setup()
            if not self.joined.done():
                self.joined.set_result(None)
        elif b'"op":"error"' in payload or b'"op":"bye"' in payload:
            self.setup_failed(f"{self.target.url} refused the join: {payload[:200].decode('utf-8', 'replace')}")

    def setup_failed(self, message: str) -> None:
        if not self.joined.done():
            self.joined.set_exception(BenchError(message))

    def on_lost(self) -> None:
        self.setup_failed(f"{self.target.url} closed a subscriber connection during setup")
        if not self.setup:
            self.state.lost_conns += 1

    # ---- one step

    def reset(self, first: int, count: int) -> None:
        self.base = self.next_i = first
        self.end_i = first + count
        self.unique = self.dups = self.ooo = self.stale = self.overflow = 0
        self.missing = set()

    @property
    def complete(self) -> bool:
        return self.next_i >= self.end_i and not self.missing

    # ---- the hot path

    def fast(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
            self.rest = b""
        pairs = _MSG.findall(data)
        if not data.endswith(_ENDS):
            # the chunk ends inside a frame: keep what may be the start of a match (a chunk
            # that ends with a newline or a brace cannot end inside "t":..,"i":..,)
            self._keep_tail(data, pairs)
        if not pairs:
            return
        now = monotonic_ns()
        st = self.state
        get = st.parsed.get
        if len(pairs) == 1:  # the usual case below a few thousand messages/s
            pair = pairs[0]
            t, i = get(pair[1]) or st.parse(pair)
            if i == self.next_i:
                self.next_i = i + 1
                self.unique += 1
            else:
                self._slow([i])
            st.received += 1
            if st.win_start <= now < st.win_end:
                st.arrived += 1
            if st.win_start <= t < st.win_end:
                st.record(now - t)
                st.in_window += 1
            return
        parse = st.parse
        vals = [get(p[1]) or parse(p) for p in pairs]
        k = len(vals)
        first_t, first = vals[0]
        last_t, last = vals[-1]
        st.received += k
        if st.win_start <= now < st.win_end:
            st.arrived += k
        ivals = [v[1] for v in vals]
        if first == self.next_i and last == first + k - 1 and ivals == list(range(first, first + k)):
            self.next_i = first + k
            self.unique += k
            if first_t == last_t:  # in order, so every t in between is the same
                if st.win_start <= first_t < st.win_end:
                    st.record(now - first_t, k)
                    st.in_window += k
                return
        else:
            self._slow(ivals)
        for t, n in Counter([v[0] for v in vals]).items():
            if st.win_start <= t < st.win_end:
                st.record(now - t, n)
                st.in_window += n

    def _keep_tail(self, data: bytes, pairs: list) -> None:
        end = 0
        if pairs:
            last = b'"i":' + pairs[-1][1] + b","
            end = data.rfind(last) + len(last)
        self.rest = data[max(end, len(data) - _TAIL) :]

    def _slow(self, ivals: list[int]) -> None:
        for i in ivals:
            nxt = self.next_i
            if i == nxt:
                self.next_i = i + 1
                self.unique += 1
            elif i > nxt:
                gap = i - nxt
                if len(self.missing) + gap <= MISSING_CAP:
                    self.missing.update(range(nxt, i))
                else:
                    self.overflow += gap
                self.next_i = i + 1
                self.unique += 1
            elif i in self.missing:
                self.missing.discard(i)
                self.ooo += 1
                self.unique += 1
            elif i < self.base:
                self.stale += 1  # from an earlier step
            elif self.overflow:
                self.ooo += 1  # cannot tell: it may fill a gap that was not listed
                self.overflow -= 1
                self.unique += 1
            else:
                self.dups += 1


class _Publisher(Client):
    def __init__(self, target: Target, room: str, size: int) -> None:
        super().__init__(target)
        self.room_json = _json_str(room)
        self.errors = 0
        self.error_text = ""
        base = len(b'{"t":%d,"i":%d,"pad":""}' % (time.monotonic_ns(), 1000000))
        self.pad = b"x" * max(0, size - base)
        self.template = b'{"op":"pub","room":' + self.room_json + b',"data":{"t":%d,"i":%d,"pad":"' + self.pad + b'"}}'

    def fast(self, data: bytes) -> None:
        n = data.count(b'"op":"error"') + data.count(b'"op":"bye"')
        if n:
            self.errors += n
            if not self.error_text:
                at = max(data.find(b'{"op":"error"'), data.find(b'{"op":"bye"'), 0)
                self.error_text = data[at : at + 200].decode("utf-8", "replace")

    def on_lost(self) -> None:
        if not self.error_text:
            self.error_text = "the server closed the publisher connection"
        self.errors += 1

    async def publish(self, rate: float, t0: int, first: int, count: int, deadline: int, window: tuple[int, int]) -> dict:
        """Send ``count`` messages numbered from ``first``, message k due at t0 + k/rate."""
        loop = self.loop
        done = loop.create_future()
        template = self.template
        ws = self.target.ws
        per_ns = rate / 1e9
        state = {"sent": 0, "in_window": 0, "lag": 0, "last_t": 0}
        transport = self.transport
        assert transport is not None

        def tick() -> None:
            now = time.monotonic_ns()
            sent = state["sent"]
            due = min(count, int((now - t0) * per_ns) + 1)
            blocked = transport.get_write_buffer_size() >= 8 << 20  # the server is not reading: wait
            if due > sent and not blocked and not transport.is_closing():
                base = first + sent
                if ws:
                    parts = []
                    for i in range(base, first + due):
                        m = template % (now, i)
                        parts.append(ws_client_header(len(m)) + m)
                    transport.write(b"".join(parts))
                else:
                    transport.write(b"\n".join([template % (now, i) for i in range(base, first + due)]) + b"\n")
                lag = now - (t0 + int(sent / per_ns))
                if lag > state["lag"]:
                    state["lag"] = lag
                if window[0] <= now < window[1]:
                    state["in_window"] += due - sent
                state["sent"] = sent = due
                state["last_t"] = now
            if sent >= count or now >= deadline or transport.is_closing():
                if not done.done():
                    done.set_result(None)
                return
            delay = 0.001 if blocked else (t0 + sent / per_ns - time.monotonic_ns()) / 1e9
            loop.call_later(max(0.0, delay), tick)

        self.state = state
        loop.call_later(max(0.0, (t0 - time.monotonic_ns()) / 1e9), tick)
        await done
        return {
            "published": state["sent"],
            "published_in_window": state["in_window"],
            "lag_ms": state["lag"] / 1e6,
            "last_sent_ns": state["last_t"],
        }


def _json_str(text: str) -> bytes:
    import json

    return json.dumps(text).encode()


async def _open(target: Target, factories: list) -> list:
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(factory):
        async with sem:
            return await connect(target, factory)

    tasks = [asyncio.ensure_future(one(f)) for f in factories]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def worker(ctl: Control, p: dict) -> None:
    target = parse_target(p["url"], allow_remote=True)
    if ctl.count == 1:
        n = p["subscribers"]
    else:  # process 0 only publishes, so that its timer never waits behind subscriber reads
        n = 0 if ctl.index == 0 else share(p["subscribers"], ctl.index - 1, ctl.count - 1)
    state = FanState()
    room = p["room"]
    subs: list[_Subscriber] = await _open(target, [lambda: _Subscriber(target, state, room)] * n)
    for s in subs:
        s.join()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.joined for s in subs)), p["timeout"] + n / 200)
    except asyncio.TimeoutError:
        raise BenchError(f"{target.url}: subscribers were not all joined to {room!r} within the timeout") from None
    publisher = None
    if ctl.index == 0:
        publisher = await connect(target, lambda: _Publisher(target, room, p["size"]))
        publisher.end_setup()
    ctl.send("ready", subscribers=n)
    while True:
        kind, step = await ctl.recv("step", "stop")
        if kind == "stop":
            break
        t0, first, count = step["t0"], step["first"], step["count"]
        win_start = t0 + int(step["warmup"] * 1e9)
        win_end = win_start + int(step["duration"] * 1e9)
        pub_end = t0 + int(count / step["rate"] * 1e9)
        deadline = max(pub_end, win_end) + int(step["drain"] * 1e9)
        state.new_histogram()
        state.win_start, state.win_end = win_start, win_end
        state.in_window = state.received = state.arrived = 0
        state.parsed.clear()
        lost_before = state.lost_conns
        for s in subs:
            s.reset(first, count)
        pub_task = None
        if publisher is not None:
            publisher.state = {"sent": 0}
            pub_task = asyncio.ensure_future(publisher.publish(step["rate"], t0, first, count, deadline, (win_start, win_end)))
        reporter = progress_task(
            ctl, lambda: {"received": state.received, "published": publisher.state["sent"] if publisher is not None else 0}
        )
        while time.monotonic_ns() < deadline:
            if all(s.complete or s.lost for s in subs) and (pub_task is None or pub_task.done()):
                break
            if ctl.stopped:
                raise Stopped("stopped")
            await asyncio.sleep(0.01)
        reporter.cancel()
        pub = await pub_task if pub_task is not None else None
        missing: set[int] = set()
        overflow = 0
        min_next = first + count
        for s in subs:
            if len(missing) < MISSING_CAP:
                missing |= s.missing
            overflow += s.overflow
            min_next = min(min_next, s.next_i)
        ctl.send(
            "step_result",
            subscribers=n,
            hist=state.hist.to_dict(),
            in_window=state.in_window,
            arrived=state.arrived,
            received=state.received,
            unique=sum(s.unique for s in subs),
            duplicates=sum(s.dups for s in subs),
            out_of_order=sum(s.ooo for s in subs),
            stale=sum(s.stale for s in subs),
            missing=sorted(missing),
            overflow=overflow,
            min_next=min_next,
            lost_connections=state.lost_conns - lost_before,
            publisher=pub,
            publisher_errors=publisher.errors if publisher is not None else 0,
            publisher_error=publisher.error_text if publisher is not None else "",
        )
    for s in subs:
        s.close()
    if publisher is not None:
        publisher.close()


def merge_step(step: dict, results: dict[int, dict], max_p99_ms: float) -> dict[str, Any]:
    """One step's figures from every worker's report, and whether the step was clean."""
    pub = results[0]["publisher"] or {}
    published = pub.get("published", 0)
    subscribers = sum(r["subscribers"] for r in results.values())
    hist = Histogram()
    for r in results.values():
        hist.merge(Histogram.from_dict(r["hist"]))
    unique = sum(r["unique"] for r in results.values())
    expected = subscribers * published
    first = step["first"]
    end = first + published
    min_next = min(r["min_next"] for r in results.values())
    missing = {i for r in results.values() for i in r["missing"] if i < min(min_next, end)}
    undelivered = len(missing) + max(0, end - min_next)
    duplicates = sum(r["duplicates"] for r in results.values())
    ooo = sum(r["out_of_order"] for r in results.values())
    lost = max(0, expected - unique)
    lost_conns = sum(r["lost_connections"] for r in results.values())
    duration = step["duration"]
    latency = hist.summary()
    reasons = []
    if published < step["count"]:
        reasons.append(f"the publisher sent {published:,} of {step['count']:,} messages in time")
    if lost:
        reasons.append(f"{lost:,} deliveries lost")
    if duplicates:
        reasons.append(f"{duplicates:,} duplicates")
    if ooo:
        reasons.append(f"{ooo:,} out of order")
    if lost_conns:
        reasons.append(f"{lost_conns} subscriber connection(s) closed by the server")
    if results[0]["publisher_errors"]:
        reasons.append(f"the server answered the publisher with errors: {results[0]['publisher_error']}")
    if hist.count == 0:
        reasons.append("no delivery inside the measured window")
    elif latency["p99"] > max_p99_ms:
        reasons.append(f"p99 {latency['p99']:.1f} ms > --max-p99 {max_p99_ms:g} ms")
    lag = pub.get("lag_ms", 0.0)
    if lag > max_p99_ms:
        reasons.append(f"the publisher fell {lag:.0f} ms behind its schedule (the server did not take the rate)")
    return {
        "rate": step["rate"],
        "subscribers": subscribers,
        "published": published,
        "published_in_window": pub.get("published_in_window", 0),
        "expected_deliveries": expected,
        "delivered": unique,
        "received": sum(r["received"] for r in results.values()),
        "lost": lost,
        "duplicates": duplicates,
        "out_of_order": ooo,
        "undelivered_i": undelivered,
        "every_i_to_every_subscriber": undelivered == 0 and lost == 0,
        "subscriber_connections_lost": lost_conns,
        "deliveries_measured": hist.count,
        "deliveries_per_s": sum(r["arrived"] for r in results.values()) / duration if duration else 0.0,
        "latency_ms": latency,
        "publisher_lag_ms": lag,
        "publisher_errors": results[0]["publisher_errors"],
        "clean": not reasons,
        "problems": reasons,
        "histogram_ns": hist.to_dict(),
    }


def run(p: dict, progress: Progress) -> dict[str, Any]:
    processes = max(1, min(p["processes"], p["subscribers"]))
    # with several processes the publisher gets one of its own (not counted in --processes)
    pool = WorkerPool("wirehub.bench.fanout:worker", p, processes if processes == 1 else processes + 1)
    steps: list[dict] = []
    try:
        progress.show(f"fanout: opening {p['subscribers']} subscribers to {p['url']}", force=True)
        pool.gather("ready", timeout=p["timeout"] + 30 + p["subscribers"] / 200)
        rate = float(p["rate"])
        first = 0
        total_steps = p["max_steps"] if p["ramp"] else 1
        for k in range(total_steps):
            if p["max_rate"] and rate > p["max_rate"]:
                break
            count = max(1, math.ceil(rate * (p["warmup"] + p["duration"])))
            t0 = time.monotonic_ns() + 100_000_000
            step = {"rate": rate, "t0": t0, "first": first, "count": count, "warmup": p["warmup"],
                    "duration": p["duration"], "drain": p["drain"]}
            pool.latest.clear()
            pool.broadcast("step", **step)
            total_s = p["warmup"] + p["duration"]
            label = f"step {k + 1} " if p["ramp"] else ""

            def tick(rate=rate, t0=t0, total_s=total_s, label=label) -> None:
                elapsed = max(0.0, (time.monotonic_ns() - t0) / 1e9)
                got = sum(w.get("received", 0) for w in pool.latest.values())
                published = sum(w.get("published", 0) for w in pool.latest.values())
                per_s = got / elapsed if elapsed > 0 else 0.0
                phase = "warmup" if elapsed < p["warmup"] else ("measure" if elapsed < total_s else "drain")
                progress.show(
                    f"fanout {label}{rate:,.0f} msg/s  {min(elapsed, total_s):5.1f}/{total_s:g} s  {phase:7s}  "
                    f"published {published:,}  delivered {got:,} ({per_s:,.0f}/s)"
                )

            results = pool.gather("step_result", timeout=total_s + p["drain"] + p["timeout"] + 30, tick=tick)
            merged = merge_step(step, results, p["max_p99"])
            steps.append(merged)
            if p["ramp"]:
                lat = merged["latency_ms"]
                verdict = "clean" if merged["clean"] else "STOP: " + "; ".join(merged["problems"])
                progress.note(
                    f"step {k + 1}: {rate:,.0f} msg/s -> {merged['deliveries_per_s']:,.0f} deliveries/s, "
                    f"p99 {_ms(lat.get('p99'))}, lost {merged['lost']:,}  {verdict}"
                )
            if not merged["clean"]:
                break
            first += count
            rate *= p["ramp_factor"]
    finally:
        progress.clear()
        pool.close()
    clean = [s for s in steps if s["clean"]]
    best = max(clean, key=lambda s: s["rate"]) if clean else None
    return {
        "steps": steps,
        "highest_clean_rate": best["rate"] if best else None,
        "highest_clean_deliveries_per_s": best["deliveries_per_s"] if best else None,
        "processes": processes,
    }


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.2f} ms"
