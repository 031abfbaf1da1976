"""``wirehub bench fanout``: N subscribers in one room, one publisher at a set rate.

The publisher sends ``{"op":"pub","room":ROOM,"data":{"t":NS,"i":N,"pad":"..."}}`` on a
timer with catch-up: message k of a step is due at ``t0 + k / rate``; every tick sends all
that are due in one write, so a late tick never lowers the rate (no sleep drift). ``t`` is
``time.monotonic_ns()`` when the message was written, ``i`` numbers the messages.

A subscriber does not decode JSON. One regular expression finds the ``i`` of every
``{"t":..,"i":..,`` in a chunk read (C code, one call per chunk), and the list of their
digits is compared, in one C-level list comparison, with the digits of the messages it must
get next (the next expected ``i`` onwards, consecutive): every subscriber of a process reads
the same messages, so the first one to read a message records its ``i`` and ``t`` for the
process (:class:`FanState`), and the others convert nothing. Only a chunk that does not
match goes through the per-message path, which learns new messages and tells a gap from a
duplicate from a late (out-of-order) message. Latency is ``now - t`` with one clock reading
per chunk; messages written in the same publisher tick share ``t`` and are recorded as one
value with a count.

``--protocol redis`` and ``--protocol nats`` run the same load against redis-server pub/sub
(``SUBSCRIBE``, then ``PUBLISH`` in RESP) and nats-server (``SUB``, then ``PUB``): the
publication is the same ``{"t":..,"i":..,"pad":..}`` object the hub's ``data`` holds, so the
subscribers' hot path is the same. A redis subscriber is joined once the subscribe
confirmation arrives; a NATS subscriber once the ``PONG`` to a ``PING`` sent after its
``SUB`` does (the server handles a connection's commands in order); both answer the
server's ``PING`` with ``PONG`` (nats-server disconnects clients that do not).

``--ramp`` repeats the step at rising rates (``--ramp-factor``, x2 by default) and stops at
the first step that loses, duplicates or reorders a message, whose p99 exceeds
``--max-p99``, or that the publisher could not keep up with.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from bisect import bisect_right
from collections import Counter
from time import monotonic_ns
from typing import Any

from .net import BenchError, Client, Target, connect, parse_target, share, ws_client_header
from .runner import Control, CpuWindow, Progress, Stopped, WorkerPool, merge_cpu, progress_task
from .stats import Histogram

_MSG = re.compile(rb'\{"t":(\d+),"i":(\d+),')
_TAIL = 128  # longer than any partial match can be
_ENDS = (b"\n", b"}")
MISSING_CAP = 100_000  # per subscriber; gaps beyond it are counted, not listed
CONNECT_CONCURRENCY = 200
NATS_CONNECT = b'CONNECT {"verbose":false,"pedantic":false}\r\n'
PROTOCOLS = ("hub", "redis", "nats")


class FanState:
    """What the subscribers of one worker share: the tallies, and the stream they all read.

    Every subscriber of a room receives the same bytes for the same message (the server
    encodes a publication once, and so do redis and NATS), so the process keeps one copy of
    the stream, :attr:`canon`, from the start of the ``{"t":..`` of message :attr:`cbase`
    onwards, as far as any subscriber has read it, with where each message's
    ``{"t":..,"i":..,`` starts and ends in it and its ``t``. It is learnt once, by whichever
    subscriber reads new bytes first, and checked as it is learnt: the messages in it are
    consecutive, or it stops growing (:attr:`poisoned`) and every subscriber takes the
    per-message path from there."""

    __slots__ = ("hist", "record", "win_start", "win_end", "in_window", "arrived", "received", "lost_conns", "reads",
                 "cbase", "canon", "size", "starts", "marks", "tvals", "scanned", "poisoned")

    def __init__(self) -> None:
        self.new_histogram()
        self.win_start = 1 << 62
        self.win_end = 1 << 62
        self.in_window = 0  # deliveries of messages published inside the window (their latency is recorded)
        self.arrived = 0  # deliveries that arrived inside the window (the throughput)
        self.received = 0
        self.lost_conns = 0
        self.reads = 0  # chunks read by the subscribers
        self.begin()

    def begin(self) -> None:
        """Forget the stream (a new step)."""
        self.cbase = -1  # the i of the message the stream starts with; -1: nothing learnt yet
        self.canon = bytearray()
        self.size = 0  # how much of canon subscribers may read in step (all of it unless poisoned)
        self.starts: list[int] = []  # offset in canon of message cbase + j's {"t":
        self.marks: list[int] = []  # ... and of the end of its {"t":..,"i":.., (read that far: delivered)
        self.tvals: list[int] = []  # its t
        self.scanned = 0  # canon holds no {"t":..,"i":.., before this offset that is not learnt
        self.poisoned = False

    def extend(self, new: bytes) -> None:
        """Append bytes that follow the stream, and learn the messages they complete."""
        canon = self.canon
        canon += new
        starts, marks, tvals = self.starts, self.marks, self.tvals
        expect = self.cbase + len(marks)
        bad = -1
        for m in _MSG.finditer(canon, self.scanned):
            if int(m.group(2)) != expect:  # a gap or a duplicate in what its reader got
                bad = m.start()
                break
            t = int(m.group(1))
            if tvals and tvals[-1] == t:
                t = tvals[-1]  # one int object for every message of a publisher tick
            starts.append(m.start())
            marks.append(m.end())
            tvals.append(t)
            self.scanned = m.end()
            expect += 1
        if bad >= 0:
            # kept (subscribers may have read into it: they need its bytes when they leave the
            # stream), but never read from again
            self.poisoned = True
            self.size = bad
        else:
            self.size = len(canon)

    def new_histogram(self) -> None:
        self.hist = Histogram()
        self.record = self.hist.record


class _Subscriber(Client):
    #: bytes that may come between messages and must be answered (NATS: PING), so must not
    #: become part of the shared stream
    FOREIGN: bytes | None = None

    def __init__(self, target: Target, state: FanState, room: str) -> None:
        super().__init__(target)
        self.state = state
        self.room = room
        self.joined = self.new_future()
        self.rest = b""
        self.cpos = -1  # how far into state.canon this subscriber has read; -1: not in step with it
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
        self.hub_join_reply(payload, self.joined)

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
        self.cpos = -1

    @property
    def complete(self) -> bool:
        return self.next_i >= self.end_i and not self.missing

    # ---- the hot path

    def fast(self, data: bytes) -> None:
        st = self.state
        st.reads += 1
        cpos = self.cpos
        if cpos >= 0:  # in step with the shared stream: the chunk must be its next bytes
            canon = st.canon
            end = cpos + len(data)
            if end <= st.size:
                if canon[cpos:end] == data:
                    self._advance(end)
                    return
            elif not st.poisoned:
                n = len(canon) - cpos
                if canon[cpos:] == data[:n] and self._plain(canon, data[n:]):
                    st.extend(data[n:])  # the first to read these bytes
                    if st.size == end:
                        self._advance(end)
                        return
            self._unsync()
        self._slow_chunk(data)

    def _advance(self, end: int) -> None:
        """Read the shared stream up to ``end``: the messages whose ``i`` that completes
        are delivered, in order, once each."""
        st = self.state
        j0 = self.next_i - st.cbase
        j1 = bisect_right(st.marks, end, j0)
        self.cpos = end
        k = j1 - j0
        if not k:
            return
        now = monotonic_ns()
        self.next_i += k
        self.unique += k
        st.received += k
        if st.win_start <= now < st.win_end:
            st.arrived += k
        ts = st.tvals[j0:j1]
        t = ts[0]
        if t == ts[-1]:  # t never decreases with i: one publisher tick
            if st.win_start <= t < st.win_end:
                st.record(now - t, k)
                st.in_window += k
            return
        j = 0
        while j < k:
            t = ts[j]
            e = bisect_right(ts, t, j)
            if st.win_start <= t < st.win_end:
                st.record(now - t, e - j)
                st.in_window += e - j
            j = e

    def _plain(self, canon: bytearray, new: bytes) -> bool:
        foreign = self.FOREIGN
        return foreign is None or foreign not in bytes(canon[-len(foreign) :]) + new

    def _unsync(self) -> None:
        """Leave the shared stream; keep the start of a message not yet counted (the next
        chunk may complete it)."""
        st = self.state
        j = self.next_i - st.cbase
        lo = st.marks[j - 1] if 0 < j <= len(st.marks) else 0
        self.rest = bytes(st.canon[max(lo, self.cpos - _TAIL) : self.cpos])
        self.cpos = -1

    def _slow_chunk(self, data: bytes) -> None:
        """Every message of a chunk on its own: a gap, a duplicate, a late message, bytes
        between messages; then back in step with the shared stream if it can be."""
        if self.rest:
            data = self.rest + data
            self.rest = b""
        found = list(_MSG.finditer(data))
        if not data.endswith(_ENDS):
            # the chunk ends inside a frame: keep what may be the start of a match (a chunk
            # that ends with a newline or a brace cannot end inside "t":..,"i":..,)
            end = found[-1].end() if found else 0
            self.rest = data[max(end, len(data) - _TAIL) :]
        if not found:
            return
        now = monotonic_ns()
        st = self.state
        k = len(found)
        vals = [(int(m.group(1)), int(m.group(2))) for m in found]
        st.received += k
        if st.win_start <= now < st.win_end:
            st.arrived += k
        self._slow([v[1] for v in vals])
        for t, n in Counter([v[0] for v in vals]).items():
            if st.win_start <= t < st.win_end:
                st.record(now - t, n)
                st.in_window += n
        self._sync(data, found[-1], vals[-1][1])

    def _sync(self, data: bytes, m: re.Match, i: int) -> None:
        """Get in step with the shared stream from message ``i`` (the last of ``data``, at
        ``m``) when what follows it in ``data`` is what the stream has there."""
        st = self.state
        if st.poisoned or i != self.next_i - 1:
            return
        tail = data[m.start() :]
        if st.cbase < 0:  # nothing learnt yet: the stream starts here
            if self._plain(st.canon, tail):
                st.cbase = i
                st.extend(tail)
                if st.size == len(tail):
                    self.cpos = len(tail)
                    self.rest = b""
            return
        j = i - st.cbase
        if not 0 <= j < len(st.starts):
            return
        canon = st.canon
        s0 = st.starts[j]
        n = len(canon) - s0
        if s0 + len(tail) <= st.size:
            if canon[s0 : s0 + len(tail)] == tail:
                self.cpos = s0 + len(tail)
                self.rest = b""
        elif not st.poisoned and canon[s0:] == tail[:n] and self._plain(canon, tail[n:]):
            st.extend(tail[n:])
            if st.size == s0 + len(tail):
                self.cpos = st.size
                self.rest = b""

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


class _RedisSubscriber(_Subscriber):
    """SUBSCRIBE room; joined at the confirmation (``*3 subscribe room :1``)."""

    confirming = False

    def join(self) -> None:
        room = self.room.encode()
        self.transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(room), room))  # type: ignore[union-attr]

    def setup_frame(self, payload: bytes, opcode: int) -> None:  # RESP, line by line (each ends with \r)
        if payload.startswith(b"-"):
            self.setup_failed(f"{self.target.url} refused SUBSCRIBE: {payload[:200].decode('utf-8', 'replace').strip()}")
        elif payload == b"subscribe\r":
            self.confirming = True
        elif self.confirming and payload.startswith(b":"):
            self.end_setup()
            if not self.joined.done():
                self.joined.set_result(None)


class _NatsSubscriber(_Subscriber):
    """CONNECT, SUB room 1, PING; joined at the PONG. Messages: ``MSG room 1 N\\r\\n<data>\\r\\n``."""

    def join(self) -> None:
        self.transport.write(NATS_CONNECT + b"SUB %s 1\r\nPING\r\n" % self.room.encode())  # type: ignore[union-attr]

    def setup_frame(self, payload: bytes, opcode: int) -> None:
        if payload == b"PONG\r":
            self.end_setup()
            if not self.joined.done():
                self.joined.set_result(None)
        elif payload == b"PING\r":
            self.transport.write(b"PONG\r\n")  # type: ignore[union-attr]
        elif payload.startswith(b"-ERR"):
            self.setup_failed(f"{self.target.url} refused the subscription: {payload[:200].decode('utf-8', 'replace').strip()}")

    FOREIGN = b"PING\r\n"  # never in the shared stream: a chunk with one takes the slow path

    def _slow_chunk(self, data: bytes) -> None:
        if b"PING\r\n" in self.rest + data:  # the server's keepalive: unanswered twice, it disconnects us
            self.transport.write(b"PONG\r\n")  # type: ignore[union-attr]
        _Subscriber._slow_chunk(self, data)


SUBSCRIBERS = {"hub": _Subscriber, "redis": _RedisSubscriber, "nats": _NatsSubscriber}


class _Publisher(Client):
    """The hub's publisher: ``{"op":"pub","room":R,"data":{"t":..,"i":..,"pad":".."}}``."""

    def __init__(self, target: Target, room: str, size: int) -> None:
        super().__init__(target)
        self.room = room
        self.room_json = _json_str(room)
        self.errors = 0
        self.error_text = ""
        base = len(b'{"t":%d,"i":%d,"pad":""}' % (time.monotonic_ns(), 1000000))
        self.pad = b"x" * max(0, size - base)
        self.data = b'{"t":%d,"i":%d,"pad":"' + self.pad + b'"}'
        self.template = b'{"op":"pub","room":' + self.room_json + b',"data":' + self.data + b"}"

    async def prepare(self, timeout: float) -> None:
        """Whatever must happen before the first publication."""
        self.end_setup()

    def encode(self, now: int, lo: int, hi: int) -> bytes:
        """Publications ``lo`` .. ``hi - 1``, stamped ``now``, as one write."""
        template = self.template
        if self.target.ws:
            parts = []
            for i in range(lo, hi):
                m = template % (now, i)
                parts.append(ws_client_header(len(m)) + m)
            return b"".join(parts)
        return b"\n".join([template % (now, i) for i in range(lo, hi)]) + b"\n"

    def _error(self, text: str) -> None:
        self.errors += 1
        if not self.error_text:
            self.error_text = text

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
        encode = self.encode
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
                transport.write(encode(now, first + sent, first + due))
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


class _RedisPublisher(_Publisher):
    """``PUBLISH room <data>`` in RESP; replies are ``:<receivers>``, errors start with ``-``."""

    def __init__(self, target: Target, room: str, size: int) -> None:
        super().__init__(target, room, size)
        room_b = room.encode()
        self.prefix = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(room_b), room_b)

    def encode(self, now: int, lo: int, hi: int) -> bytes:
        data, prefix = self.data, self.prefix
        out = []
        for i in range(lo, hi):
            m = data % (now, i)
            out.append(b"%s$%d\r\n%s\r\n" % (prefix, len(m), m))
        return b"".join(out)

    def fast(self, data: bytes) -> None:
        at = 0 if data[:1] == b"-" else data.find(b"\n-") + 1
        if at or data[:1] == b"-":
            self._error(data[at : at + 200].split(b"\r")[0].decode("utf-8", "replace"))


class _NatsPublisher(_Publisher):
    """``PUB room <n>`` and the data; CONNECT and a PING answered first, so that the server
    has the connection set up before the clock starts."""

    def __init__(self, target: Target, room: str, size: int) -> None:
        super().__init__(target, room, size)
        self.subject = room.encode()
        self.connected = self.new_future()

    async def prepare(self, timeout: float) -> None:
        self.transport.write(NATS_CONNECT + b"PING\r\n")  # type: ignore[union-attr]
        try:
            await asyncio.wait_for(asyncio.shield(self.connected), timeout)
        except asyncio.TimeoutError:
            raise BenchError(f"{self.target.url}: no PONG to the publisher's PING within {timeout:g} s") from None

    def setup_frame(self, payload: bytes, opcode: int) -> None:
        if payload == b"PONG\r":
            self.end_setup()
            if not self.connected.done():
                self.connected.set_result(None)
        elif payload == b"PING\r":
            self.transport.write(b"PONG\r\n")  # type: ignore[union-attr]
        elif payload.startswith(b"-ERR") and not self.connected.done():
            self.connected.set_exception(BenchError(f"{self.target.url}: {payload.decode('utf-8', 'replace').strip()}"))

    def on_lost(self) -> None:
        super().on_lost()
        if not self.connected.done():
            self.connected.set_exception(BenchError(f"{self.target.url} closed the publisher connection"))

    def encode(self, now: int, lo: int, hi: int) -> bytes:
        data, head = self.data, b"PUB " + self.subject + b" %d\r\n%s\r\n"
        out = []
        for i in range(lo, hi):
            m = data % (now, i)
            out.append(head % (len(m), m))
        return b"".join(out)

    def fast(self, data: bytes) -> None:
        if b"PING\r\n" in data:
            self.transport.write(b"PONG\r\n")  # type: ignore[union-attr]
        if b"-ERR" in data:
            at = data.find(b"-ERR")
            self._error(data[at : at + 200].split(b"\r")[0].decode("utf-8", "replace"))


PUBLISHERS = {"hub": _Publisher, "redis": _RedisPublisher, "nats": _NatsPublisher}


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
    protocol = p.get("protocol") or "hub"
    sub_cls, pub_cls = SUBSCRIBERS[protocol], PUBLISHERS[protocol]
    subs: list[_Subscriber] = await _open(target, [lambda: sub_cls(target, state, room)] * n)
    for s in subs:
        s.join()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.joined for s in subs)), p["timeout"] + n / 200)
    except asyncio.TimeoutError:
        raise BenchError(f"{target.url}: subscribers were not all joined to {room!r} within the timeout") from None
    publisher = None
    if ctl.index == 0:
        publisher = await connect(target, lambda: pub_cls(target, room, p["size"]))
        await publisher.prepare(p["timeout"])
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
        state.in_window = state.received = state.arrived = state.reads = 0
        state.begin()
        lost_before = state.lost_conns
        for s in subs:
            s.reset(first, count)
        meter = CpuWindow(p.get("server_pids") if ctl.index == 0 else None)
        meter.schedule(win_start, win_end)
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
            reads=state.reads,
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
            cpu=meter.result(),
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
        "subscriber_reads": sum(r["reads"] for r in results.values()),
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
        "cpu": merge_cpu({i: r["cpu"] for i, r in results.items()}),
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
