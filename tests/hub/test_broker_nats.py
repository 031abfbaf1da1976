"""The NATS broker: the shared conformance suite (two nodes on one NATS included), plus what
only a remote broker promises: one sequence under concurrent publishers on two nodes, presence
leases that run out when a node stops refreshing, direct sends across nodes, and surviving a
NATS restart with history, epoch and subscriptions intact.

Runs against the machine's NATS (JetStream) at 127.0.0.1:4222 (skipped when it is not there),
one prefix (streams, buckets, subjects) per test, deleted afterwards; the restart test starts
a ``nats-server`` of its own on a free port with JetStream file storage in a temporary
directory, and stops only that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import msgspec
import nats
import pytest

from wirehub.hub.broker.base import BrokerError, HistoryPolicy, Member, Position, Publication
from wirehub.hub.broker.nats import NatsBroker

from ..helpers import free_port
from .broker_conformance import POLICY, BrokerConformance, FakeClock, Node, RecordingHandler, eventually, now_ms, raw

HOST, PORT = "127.0.0.1", 4222
URL = f"nats://{HOST}:{PORT}"
NATS_SERVER = "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else (shutil.which("nats-server") or "nats-server")


def _nats_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4096).startswith(b"INFO ")
    except OSError:
        return False


if not _nats_answers(HOST, PORT):
    pytest.skip(f"NATS is not reachable at {HOST}:{PORT} (start nats-server -js to run these tests)", allow_module_level=True)


async def drop_prefix(prefix: str, url: str = URL) -> None:
    """Delete every stream (history and KV buckets) a test created under ``prefix``."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        for stream in NatsBroker(url, prefix=prefix).streams:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


def holds(predicate):
    """``predicate`` as an async check for :func:`eventually`."""

    async def check():
        return predicate()

    return check


@contextlib.asynccontextmanager
async def started(url: str, prefix: str, node_id: str, handler: RecordingHandler | None = None, **kwargs) -> AsyncIterator[Node]:
    handler = handler or RecordingHandler()
    broker = NatsBroker(url, prefix=prefix, node_id=node_id, **kwargs)
    await broker.start(handler)
    try:
        yield Node(broker, handler)
    finally:
        await broker.close()


async def crash(broker: NatsBroker) -> None:
    """What a node's death looks like from outside: its tasks stop and its connection drops,
    with nothing cleaned up (no lease deleted, no member removed)."""
    broker._closing = True
    broker._handler = None
    for task in list(broker._tasks):
        task.cancel()
    nc, broker._nc = broker._nc, None
    await nc.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"wht{uuid.uuid4().hex[:12]}"
    yield name
    await drop_prefix(name)


class TestNatsBroker(BrokerConformance):
    @pytest.fixture
    def broker(self, prefix):
        return NatsBroker(URL, prefix=prefix, node_id="node-a", storage="memory")

    @pytest.fixture
    def second_node(self, prefix):
        return NatsBroker(URL, prefix=prefix, node_id="node-b", storage="memory")


# -- NATS only ------------------------------------------------------------------------------------


async def test_is_not_local():
    assert NatsBroker.local is False
    assert NatsBroker(URL).local is False


async def test_unreachable_nats_fails_start_quickly():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    broker = NatsBroker(f"nats://{HOST}:{port}", connect_timeout=0.5)
    started_at = time.monotonic()
    with pytest.raises(BrokerError, match="cannot reach NATS"):
        await broker.start(RecordingHandler())
    assert time.monotonic() - started_at < 3
    assert broker.ready() is False
    with pytest.raises(BrokerError):
        await broker.publish("r", b"1", sender="", ts=0, history=POLICY)


async def test_concurrent_publishers_on_two_nodes_get_one_sequence(prefix):
    room = "busy"
    per_worker, workers = 15, 3  # per node: 45 publications each, all at once
    async with started(URL, prefix, "a", storage="memory") as a, started(URL, prefix, "b", storage="memory") as b:
        await a.broker.subscribe(room)
        await b.broker.subscribe(room)

        async def worker(node: Node, tag: str) -> list:
            return [await node.broker.publish(room, raw(f"{tag}{i}"), sender=tag, ts=now_ms(), history=POLICY) for i in range(per_worker)]

        results = await asyncio.gather(*(worker(node, f"{name}{w}-") for node, name in ((a, "a"), (b, "b")) for w in range(workers)))
        pubs = [p for result in results for p in result]
        total = per_worker * workers * 2
        assert sorted(p.seq for p in pubs) == list(range(1, total + 1))
        assert len({p.epoch for p in pubs}) == 1
        for result in results:  # each publisher's own publications in the order it made them
            assert [p.seq for p in result] == sorted(p.seq for p in result)
        by_seq = {p.seq: p for p in pubs}
        for node in (a, b):
            got = await node.handler.wait_publications(total, room)
            assert [p.seq for p in got] == list(range(1, total + 1))
            assert got == [by_seq[s] for s in range(1, total + 1)]
        history = await b.broker.history(room, since=0, history=POLICY)
        assert history.complete is True
        assert history.publications == [by_seq[s] for s in range(1, total + 1)]


async def test_presence_lease_runs_out_when_a_node_stops_refreshing(prefix):
    clock = FakeClock()
    room = "lobby"
    alice, bob = Member(client="c-alice", user="alice"), Member(client="c-bob", user="bob")
    async with started(URL, prefix, "a", storage="memory", lease_s=300.0, clock=clock) as a:
        b = NatsBroker(URL, prefix=prefix, node_id="b", storage="memory", lease_s=30.0, clock=clock)
        await b.start(RecordingHandler())
        try:
            await a.broker.presence_add(room, alice)
            await b.presence_add(room, bob)
            assert sorted(await a.broker.presence(room), key=lambda m: m.client) == [alice, bob]
        finally:
            await crash(b)  # b stops refreshing its lease, and cleans nothing up
        clock.advance(30)  # b's lease runs to exactly now: still listed
        assert sorted(await a.broker.presence(room), key=lambda m: m.client) == [alice, bob]
        clock.advance(1)
        assert await a.broker.presence_count(room) == 2  # the count does not check leases...
        assert await a.broker.presence(room) == [alice]
        assert await a.broker.presence_count(room) == 1  # ...a read deletes the dead node's entries
        assert room in await a.broker.rooms()
        await a.broker.presence_remove(room, alice.client)
        assert await a.broker.presence(room) == []
        assert room not in await a.broker.rooms()
        # the dead node's entry was deleted by the reader, not just hidden
        nc = await nats.connect(URL)
        try:
            assert (await nc.jetstream().stream_info(f"KV_{prefix}_PRESENCE")).state.messages == 0
        finally:
            await nc.close()


async def test_a_live_node_keeps_its_lease_and_rewrites_its_entries_after_a_lapse(prefix):
    clock = FakeClock()
    room = "lobby"
    bob = Member(client="c-bob", user="bob", name="Bob")
    async with started(URL, prefix, "a", storage="memory", lease_s=300.0, clock=clock) as a, started(
        URL, prefix, "b", storage="memory", lease_s=30.0, clock=clock
    ) as b:
        await b.broker.presence_add(room, bob)
        await b.broker.add_client(bob.client)
        for _ in range(3):  # refreshed in time, the lease never runs out
            clock.advance(20)
            await b.broker._refresh()
            assert await a.broker.presence(room) == [bob]
        # b was cut off long enough for its lease to lapse: a reader drops its member...
        clock.advance(31)
        assert await a.broker.presence(room) == []
        # ...and b's next refresh sees the lapse and writes everything again
        await b.broker._refresh()
        assert await a.broker.presence(room) == [bob]
        assert await a.broker.send(bob.client, b'"hi"') is True
        assert await b.handler.wait_directs(1) == [(bob.client, b'"hi"')]


async def test_the_lease_is_refreshed_in_the_background(prefix):
    bob = Member(client="c-bob", user="bob")
    async with started(URL, prefix, "a", storage="memory") as a, started(URL, prefix, "b", storage="memory", lease_s=0.3) as b:
        await b.broker.presence_add("lobby", bob)
        first = b.broker._last_refresh
        await eventually(holds(lambda: b.broker._last_refresh > first + 0.6), "two lease periods of refreshes")
        assert await a.broker.presence("lobby") == [bob]


async def test_direct_send_across_nodes_and_to_a_dead_node(prefix):
    async with started(URL, prefix, "a", storage="memory") as a:
        b = NatsBroker(URL, prefix=prefix, node_id="b", storage="memory")
        b_handler = RecordingHandler()
        await b.start(b_handler)
        try:
            await b.add_client("c1")
            await a.broker.add_client("c2")
            assert await a.broker.send("c1", b'{"to":"c1"}') is True
            assert await b.send("c2", b'{"to":"c2"}') is True
            assert await b_handler.wait_directs(1) == [("c1", b'{"to":"c1"}')]
            assert await a.handler.wait_directs(1) == [("c2", b'{"to":"c2"}')]
        finally:
            await crash(b)
        # b died holding c1: nobody answers on its subject, so the send is refused
        assert await a.broker.send("c1", b'"lost"') is False
        assert await a.broker.send("c1", b'"lost"') is False  # the stale registration is gone
        assert await a.broker.send("c2", b'"still here"') is True


async def test_room_names_with_any_characters(prefix):
    names = ["", "a.b", "a b", "*", ">", "a.*.>", "é/ü\\x", "\n\t\"'", "x" * 300, "long-" + "é" * 400]
    async with started(URL, prefix, "a", storage="memory") as a, started(URL, prefix, "b", storage="memory") as b:
        for room in names:
            await b.broker.subscribe(room)
        for room in names:
            pub = await a.broker.publish(room, raw(room), sender="", ts=now_ms(), history=POLICY)
            assert (pub.room, pub.seq) == (room, 1)
            await a.broker.presence_add(room, Member(client=f"c:{room}", user="u"))
        for room in names:
            got = await b.handler.wait_publications(1, room)
            assert bytes(got[0].data) == raw(room)
            assert (await b.broker.history(room, history=POLICY)).publications == got
            assert await b.broker.presence(room) == [Member(client=f"c:{room}", user="u")]
        assert sorted(await b.broker.rooms()) == sorted(names)
        assert len(b.handler.publications) == len(names)


async def test_history_ttl_is_enforced_on_read(prefix):
    clock = FakeClock()
    policy = HistoryPolicy(size=100, ttl=60.0)
    async with started(URL, prefix, "a", storage="memory", clock=clock) as a:
        broker = a.broker
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=policy)
        clock.advance(30)
        await broker.publish("r", b"2", sender="", ts=clock.ms(), history=policy)
        clock.advance(30)  # seq 1 is exactly ttl old: kept
        assert [p.seq for p in (await broker.history("r", history=policy)).publications] == [1, 2]
        clock.advance(1)
        result = await broker.history("r", since=0, history=policy)
        assert ([p.seq for p in result.publications], result.complete) == ([2], False)
        assert (await broker.history("r", since=1, history=policy)).complete is True
        clock.advance(30)
        result = await broker.history("r", since=1, history=policy)
        assert (result.publications, result.complete, result.position.seq) == ([], False, 2)
        assert (await broker.history("r", since=2, history=policy)).complete is True
        assert (await broker.publish("r", b"3", sender="", ts=clock.ms(), history=policy)).seq == 3


async def test_history_is_trimmed_in_storage(prefix):
    small = HistoryPolicy(size=3)
    async with started(URL, prefix, "a", storage="memory") as a:
        for _ in range(100):
            await a.broker.publish("r", b"1", sender="", ts=now_ms(), history=small)
        result = await a.broker.history("r", since=96, history=small)
        assert ([p.seq for p in result.publications], result.complete) == ([98, 99, 100], False)
        stored = await a.broker._read(a.broker._hist, a.broker._room_subject("r"))
        assert 3 <= len(stored) <= 3 + 32


async def test_epoch_is_shared_and_survives_restarting_nodes_but_not_losing_the_stream(prefix):
    async with started(URL, prefix, "a", storage="memory") as a:
        empty = await a.broker.position("r")
        pubs = [await a.broker.publish("r", raw(i), sender="", ts=now_ms(), history=POLICY) for i in range(3)]
        assert {p.epoch for p in pubs} == {empty.epoch}
    async with started(URL, prefix, "b", storage="memory") as b:  # a new node, later
        assert await b.broker.position("r") == Position(3, empty.epoch)
        assert (await b.broker.position("other")).epoch != empty.epoch
        await drop_prefix(prefix)  # the history is lost
        lost = await b.broker.position("r")
        assert lost.seq == 0 and lost.epoch != empty.epoch
        pub = await b.broker.publish("r", b"1", sender="", ts=now_ms(), history=POLICY)
        assert (pub.seq, pub.epoch) == (1, lost.epoch)
        result = await b.broker.history("r", since=3, history=POLICY)
        assert result.complete is False and result.position == Position(1, lost.epoch)


async def test_gap_in_live_delivery_is_filled_from_history(prefix):
    """A node that missed publications (here: dropped on the floor) delivers them from
    history before the next one, in order."""
    async with started(URL, prefix, "a", storage="memory") as a:
        await a.broker.subscribe("r")
        await a.broker.publish("r", b"1", sender="", ts=now_ms(), history=POLICY)
        await a.handler.wait_publications(1, "r")
        rs = a.broker._subs["r"]
        await rs.sub.unsubscribe()  # the node stops hearing the room, without knowing
        for i in range(2, 5):
            await a.broker.publish("r", raw(i), sender="", ts=now_ms(), history=POLICY)
        rs.sub = await a.broker._nc.subscribe(a.broker._fanout_subject("r"), cb=functools.partial(a.broker._on_room_msg, rs))
        await a.broker._flush()  # the SUB in place (not nc.flush(): see NatsBroker._flush)
        await a.broker.publish("r", b"5", sender="", ts=now_ms(), history=POLICY)
        got = await a.handler.wait_publications(5, "r")
        assert [p.seq for p in got] == [1, 2, 3, 4, 5]


async def test_an_unusable_existing_stream_is_refused_with_a_clear_error(prefix):
    """A history stream left by something else (here: without the republish fan-out, which
    NATS cannot add to an existing stream) stops the start with a message that says what to do."""
    nc = await nats.connect(URL)
    try:
        await nc.jetstream().add_stream(name=f"{prefix}_HISTORY", subjects=[f"{prefix}.h.>"], max_age=3600)
    finally:
        await nc.close()
    broker = NatsBroker(URL, prefix=prefix)
    with pytest.raises(BrokerError, match="delete it .* or use another prefix"):
        await broker.start(RecordingHandler())
    assert broker.ready() is False


# -- a NATS of our own, to stop and start ----------------------------------------------------------


class OwnNats:
    """A ``nats-server -js`` this test starts, stops (SIGTERM to its own pid) and starts again
    on the same port with the same storage directory."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", HOST, "-p", str(self.port), "-js", "-sd", str(self.workdir / "js"), "-l", str(self.workdir / "nats.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        async def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited with {self.proc.returncode}; see {self.workdir / 'nats.log'}")
            return await asyncio.to_thread(_nats_answers, HOST, self.port, 0.2)

        await eventually(answers, f"nats-server on port {self.port}")

    def stopped(self) -> bool:
        """Every thread of the server is stopped (SIGSTOP took effect)."""
        tasks = Path(f"/proc/{self.proc.pid}/task")
        states = [(task / "stat").read_text().rpartition(")")[2].split()[0] for task in tasks.iterdir()]
        return all(state in ("T", "t") for state in states)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)


@pytest.fixture
async def own_nats(tmp_path) -> AsyncIterator[OwnNats]:
    server = OwnNats(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_nats_restart_keeps_history_epoch_and_subscriptions(own_nats):
    policy = HistoryPolicy(size=100)
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    async with started(own_nats.url, "restart", "a", timeout=2.0, reconnect_wait=0.1) as a, started(
        own_nats.url, "restart", "b", timeout=2.0, reconnect_wait=0.1
    ) as b:
        await a.broker.subscribe("r")
        await b.broker.add_client("c-b")
        await b.broker.presence_add("r", Member(client="c-b", user="bob"))
        before = [await b.broker.publish("r", raw(i), sender="", ts=now_ms(), history=policy) for i in range(1, 4)]
        await a.handler.wait_publications(3, "r")

        await own_nats.stop()
        for node in (a, b):
            await node.handler.wait_until(lambda n=node: n.handler.states == [False], "on_broker_state(False)")
            assert node.broker.ready() is False
        started_at = time.monotonic()
        with pytest.raises(BrokerError, match="unreachable"):
            await a.broker.publish("r", b"0", sender="", ts=now_ms(), history=policy)
        for call in (a.broker.position("r"), a.broker.history("r", history=policy), b.broker.send("c-b", b"1"), a.broker.presence("r")):
            with pytest.raises(BrokerError):
                await call
        assert time.monotonic() - started_at < 1.0  # refused at once, not after a timeout
        await b.broker.presence_remove("r", "nobody")  # removals never fail: applied later

        await own_nats.start()
        for node in (a, b):
            node.handler.timeout = 15.0
            await node.handler.wait_until(lambda n=node: n.handler.states == [False, True], "on_broker_state(True)")
            assert node.broker.ready() is True

        result = await a.broker.history("r", since=0, history=policy)  # file storage kept it all
        assert result.publications == before and result.complete is True
        assert result.position == Position(3, before[0].epoch)
        after = await b.broker.publish("r", b"4", sender="", ts=now_ms(), history=policy)
        assert (after.seq, after.epoch) == (4, before[0].epoch)
        got = await a.handler.wait_publications(4, "r")  # a's subscription came back by itself
        assert [p.seq for p in got] == [1, 2, 3, 4]
        assert await a.broker.presence("r") == [Member(client="c-b", user="bob")]
        assert await a.broker.send("c-b", b'"back"') is True
        await b.handler.wait_until(lambda: ("c-b", b'"back"') in b.handler.directs, "the direct frame after the restart")
        assert a.handler.states == [False, True] and b.handler.states == [False, True]
    assert unhandled == []


async def test_a_restart_under_load_loses_nothing_that_was_acknowledged(own_nats):
    """Publishers keep going while NATS stops and starts again: every publish either fails
    with BrokerError (bounded) or is acknowledged, and every acknowledged one is in history
    afterwards, once, in a gapless sequence of one epoch."""
    policy = HistoryPolicy(size=10_000)
    acked: list = []
    refused: list[str] = []
    stop = asyncio.Event()
    async with started(own_nats.url, "load", "a", timeout=1.0, reconnect_wait=0.1) as a, started(
        own_nats.url, "load", "b", timeout=1.0, reconnect_wait=0.1
    ) as b:

        async def publisher(node: Node, tag: str) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    acked.append(await node.broker.publish("r", raw(f"{tag}{i}"), sender=tag, ts=now_ms(), history=policy))
                except BrokerError as exc:
                    refused.append(str(exc))
                    await asyncio.sleep(0.01)  # a client's retry pause, not a wait for a condition

        tasks = [asyncio.create_task(publisher(node, f"{name}{w}-")) for node, name in ((a, "a"), (b, "b")) for w in range(2)]
        try:
            await eventually(holds(lambda: len(acked) >= 50), "50 publications before the restart")
            await own_nats.stop()
            await a.handler.wait_until(lambda: a.handler.states == [False], "on_broker_state(False)")
            await eventually(holds(lambda: len(refused) >= 4), "publishes refused while NATS is away")
            before = len(acked)
            await own_nats.start()
            a.handler.timeout = b.handler.timeout = 15.0
            for node in (a, b):
                await node.handler.wait_until(lambda n=node: n.handler.states == [False, True], "on_broker_state(True)")
            await eventually(holds(lambda: len(acked) >= before + 50), "50 publications after the restart", timeout=15)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        result = await a.broker.history("r", since=0, history=policy)
        held = result.publications
        assert result.complete is True
        assert [p.seq for p in held] == list(range(1, len(held) + 1))
        assert len({p.epoch for p in held}) == 1
        assert len({bytes(p.data) for p in held}) == len(held)  # nothing stored twice
        assert {(p.seq, bytes(p.data)) for p in acked} <= {(p.seq, bytes(p.data)) for p in held}
        assert any("unreachable" in text for text in refused)


# -- publications in flight (publish_nowait) ---------------------------------------------------------


class TurnCountingHandler(RecordingHandler):
    """Also counts the event-loop turns publications were delivered in (the hub writes to its
    subscribers once per turn, so this is the number of writes per subscriber)."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0
        self._in_turn = False

    def on_publication(self, pub) -> None:
        if not self._in_turn:
            self._in_turn = True
            self.turns += 1
            asyncio.get_running_loop().call_soon(self._end_turn)
        super().on_publication(pub)

    def _end_turn(self) -> None:
        self._in_turn = False


def counting(url: str, prefix: str, node_id: str, **kwargs):
    return started(url, prefix, node_id, TurnCountingHandler(), **kwargs)


async def test_pipelined_publications_to_one_room_from_one_node(prefix):
    """Hundreds of publications in flight into one room: seq follows the call order exactly,
    an awaited publish after them gets the next seq, history and another node's delivery
    hold exactly the same, and that node gets them in a few turns, not one per publication."""
    room, n = "hot", 600
    policy = HistoryPolicy(size=1000)
    async with started(URL, prefix, "a", storage="memory") as a, counting(URL, prefix, "b", storage="memory") as b:
        await b.broker.subscribe(room)
        futures = [a.broker.publish_nowait(room, raw(i), sender=f"c{i % 7}", ts=now_ms(), history=policy) for i in range(n // 2)]
        assert a.broker.in_flight == n // 2
        await asyncio.sleep(0)  # one turn later, with the first ones on their way: more
        futures += [a.broker.publish_nowait(room, raw(i), sender=f"c{i % 7}", ts=now_ms(), history=policy) for i in range(n // 2, n)]
        last = await a.broker.publish(room, raw("last"), sender="z", ts=now_ms(), history=policy)
        pubs = await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert a.broker.in_flight == 0
        assert [p.seq for p in pubs] == list(range(1, n + 1)) and last.seq == n + 1
        assert [bytes(p.data) for p in pubs] == [raw(i) for i in range(n)]
        assert [p.sender for p in pubs] == [f"c{i % 7}" for i in range(n)]
        everything = pubs + [last]
        assert len({p.epoch for p in everything}) == 1
        assert await b.handler.wait_publications(n + 1, room) == everything
        assert b.handler.turns <= 20, b.handler.turns  # one turn per publication was n + 1
        result = await b.broker.history(room, since=0, history=policy)
        assert (result.publications, result.complete, result.position.seq) == (everything, True, n + 1)
        assert (await a.broker.history(room, limit=3, history=policy)).publications == everything[-3:]
        assert await a.broker.position(room) == Position(n + 1, last.epoch)


async def test_pipelined_history_is_trimmed_exactly(prefix):
    """Batches much larger than the room's history: what is kept is exactly the last
    ``size`` publications, and storage holds few messages."""
    room, small = "trimmed", HistoryPolicy(size=10)
    async with started(URL, prefix, "a", storage="memory") as a:
        for _ in range(3):
            futures = [a.broker.publish_nowait(room, raw(i), sender="", ts=now_ms(), history=small) for i in range(200)]
            await asyncio.wait_for(asyncio.gather(*futures), 10)
        pubs = [await a.broker.publish(room, raw(i), sender="", ts=now_ms(), history=small) for i in range(3)]
        await eventually(holds(lambda: not a.broker._trimming), "the trims to finish")
        result = await a.broker.history(room, since=590, history=small)
        assert [p.seq for p in result.publications] == list(range(594, 604)) and result.complete is False
        assert result.publications[-3:] == pubs
        stored = await a.broker._read(a.broker._hist, a.broker._room_subject(room))
        assert len(stored) <= 10 + 32


async def test_two_nodes_publish_pipelined_into_one_room(prefix):
    """Both nodes keep publications in flight into the same room at once: one sequence, no
    seq skipped or repeated, each node's own in its call order, both deliver the same order."""
    room, per_turn, turns = "shared", 40, 6
    policy = HistoryPolicy(size=10_000)
    async with started(URL, prefix, "a", storage="memory") as a, started(URL, prefix, "b", storage="memory") as b:
        await a.broker.subscribe(room)
        await b.broker.subscribe(room)
        calls: dict[str, list] = {"a": [], "b": []}
        for turn in range(turns):
            for name, node in (("a", a), ("b", b)):
                calls[name] += [
                    node.broker.publish_nowait(room, raw(f"{name}{turn}.{i}"), sender=name, ts=now_ms(), history=policy) for i in range(per_turn)
                ]
            await asyncio.sleep(0)  # the next turn's publications while these are in flight
        results = {name: await asyncio.wait_for(asyncio.gather(*futures), 15) for name, futures in calls.items()}
        total = 2 * per_turn * turns
        everything = results["a"] + results["b"]
        assert sorted(p.seq for p in everything) == list(range(1, total + 1))
        for name, pubs in results.items():
            assert [p.seq for p in pubs] == sorted(p.seq for p in pubs)
            assert [bytes(p.data) for p in pubs] == [raw(f"{name}{t}.{i}") for t in range(turns) for i in range(per_turn)]
        by_seq = sorted(everything, key=lambda p: p.seq)
        for node in (a, b):
            assert await node.handler.wait_publications(total, room) == by_seq
        assert (await a.broker.history(room, since=0, history=policy)).publications == by_seq


async def test_publications_of_one_turn_leave_in_one_write(prefix):
    """Publications to many rooms started in one turn go to NATS in one socket write."""
    rooms = [f"r{i}" for i in range(50)]
    async with started(URL, prefix, "a", storage="memory") as a:
        for room in rooms:  # every room's head is known: the next publications go out at once
            await a.broker.publish(room, b"0", sender="", ts=now_ms(), history=POLICY)
        transport = a.broker._nc._transport
        writes: list[int] = []
        original = transport.writelines

        def counted(payload):
            writes.append(len(payload))
            return original(payload)

        transport.writelines = counted
        try:
            futures = [a.broker.publish_nowait(room, raw(i), sender="", ts=now_ms(), history=POLICY) for room in rooms for i in range(3)]
            pubs = await asyncio.wait_for(asyncio.gather(*futures), 10)
        finally:
            transport.writelines = original
        assert {(p.room, p.seq) for p in pubs} == {(room, s) for room in rooms for s in (2, 3, 4)}
        assert len(writes) == 1 and writes[0] == len(rooms), writes  # one PUB per room (3 publications each)


async def test_in_flight_is_exact_and_bounded(prefix):
    """``in_flight`` counts what is unanswered, at every moment; history messages in flight
    stay within ``publish_window``, each holding at most ``publish_batch`` publications; past
    ``max_in_flight`` a publication is refused at once, saying which limit and what to do."""
    rooms = [f"r{i}" for i in range(6)]
    async with started(URL, prefix, "a", storage="memory", publish_window=2, publish_batch=4, max_in_flight=60) as a:
        broker = a.broker
        out = {"now": 0, "most": 0}
        parts: list[int] = []
        original = broker._js_send

        async def watched(subject, body, headers):
            head = msgspec.json.decode(body.partition(b"\n")[0])
            parts.append(len(head[6]) if len(head) > 6 else 1)
            out["now"] += 1
            out["most"] = max(out["most"], out["now"])
            try:
                return await original(subject, body, headers)
            finally:
                out["now"] -= 1

        broker._js_send = watched
        futures = [broker.publish_nowait(room, raw(i), sender="", ts=now_ms(), history=POLICY) for i in range(10) for room in rooms]
        assert broker.in_flight == 60
        refused = broker.publish_nowait(rooms[0], b"1", sender="", ts=now_ms(), history=POLICY)
        with pytest.raises(BrokerError, match="max_in_flight") as info:
            refused.result()
        assert info.value.maybe_applied is False and broker.in_flight == 60
        pending = set(futures)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert broker.in_flight == len(pending)
        assert out["most"] <= 2 and max(parts) <= 4 and sum(parts) == 60
        for room in rooms:
            mine = [f.result() for f in futures if f.result().room == room]
            assert [p.seq for p in mine] == list(range(1, 11))
            assert [bytes(p.data) for p in mine] == [raw(i) for i in range(10)]
        assert (await broker.publish(rooms[0], b"1", sender="", ts=now_ms(), history=POLICY)).seq == 11


async def test_a_publication_the_caller_gave_up_on_before_it_left_is_not_sent(prefix):
    async with started(URL, prefix, "a", storage="memory") as a:
        first = a.broker.publish_nowait("r", b"1", sender="", ts=now_ms(), history=POLICY)
        dropped = a.broker.publish_nowait("r", b"2", sender="", ts=now_ms(), history=POLICY)
        kept = a.broker.publish_nowait("r", b"3", sender="", ts=now_ms(), history=POLICY)
        dropped.cancel()
        assert [p.seq for p in await asyncio.gather(first, kept)] == [1, 2]
        assert a.broker.in_flight == 0
        assert [bytes(p.data) for p in (await a.broker.history("r", history=POLICY)).publications] == [b"1", b"3"]


async def test_a_publication_larger_than_nats_takes_is_refused_alone(prefix):
    async with started(URL, prefix, "a", storage="memory") as a:
        big = b'"' + b"x" * a.broker._nc.max_payload + b'"'
        before = a.broker.publish_nowait("r", b"1", sender="", ts=now_ms(), history=POLICY)
        refused = a.broker.publish_nowait("r", big, sender="", ts=now_ms(), history=POLICY)
        after = a.broker.publish_nowait("r", b"2", sender="", ts=now_ms(), history=POLICY)
        assert (await before).seq == 1 and (await after).seq == 2
        with pytest.raises(BrokerError, match="max_payload") as info:
            await refused
        assert info.value.maybe_applied is False and a.broker.in_flight == 0


async def test_publications_in_flight_when_the_connection_is_lost(own_nats):
    """The connection to NATS breaks with publications sent and unanswered (the server is
    paused, so none can be answered): every future settles at once, with a BrokerError, none
    hangs; whatever was acknowledged before is in history afterwards, once, and whatever was
    refused as not applied is not."""
    policy = HistoryPolicy(size=10_000)
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    async with started(own_nats.url, "lost", "a", timeout=5.0, connect_timeout=1.0, reconnect_wait=0.1, publish_batch=8) as a:
        broker = a.broker
        acked = list(await asyncio.gather(*(broker.publish_nowait("r", raw(f"before{i}"), sender="", ts=now_ms(), history=policy) for i in range(200))))
        assert [p.seq for p in acked] == list(range(1, 201))
        own_nats.proc.send_signal(signal.SIGSTOP)  # nothing is answered from here on
        try:
            await eventually(holds(lambda: own_nats.stopped()), "nats-server to stop")
            calls = [broker.publish_nowait("r", raw(f"during{i}"), sender="", ts=now_ms(), history=policy) for i in range(300)]
            calls.append(asyncio.ensure_future(broker.publish("r", raw("awaited"), sender="", ts=now_ms(), history=policy)))
            await eventually(holds(lambda: broker._acks), "the first batch to go out")
            assert broker.in_flight == 301
            started_at = loop.time()
            broker._nc._transport._io_writer.transport.abort()  # the connection breaks
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)  # none hangs
            assert loop.time() - started_at < 2.0  # failed when the connection went, not after a timeout
        finally:
            own_nats.proc.send_signal(signal.SIGCONT)
        assert broker.in_flight == 0
        assert all(isinstance(r, BrokerError) for r in results), results[:3]
        assert results[0].maybe_applied is True  # the first batch was out: it may have been stored
        assert any(not r.maybe_applied for r in results)  # those never sent were not
        not_applied = {raw(f"during{i}") for i, r in enumerate(results[:300]) if not r.maybe_applied}

        a.handler.timeout = 15.0
        await a.handler.wait_until(lambda: a.handler.states == [False, True], "on_broker_state(True)")
        result = await broker.history("r", since=0, history=policy)
        held = result.publications
        assert result.complete is True and [p.seq for p in held] == list(range(1, len(held) + 1))
        assert len({bytes(p.data) for p in held}) == len(held)  # nothing stored twice
        assert held[:200] == acked
        assert not not_applied & {bytes(p.data) for p in held}
        after = await broker.publish("r", b"1", sender="", ts=now_ms(), history=policy)
        assert after.seq == len(held) + 1
    assert unhandled == []


async def test_messages_arriving_together_are_delivered_in_few_turns(prefix):
    """Many one-publication messages reaching a node together (here written straight to the
    room's fan-out subject in one write) are handed to the hub in a few event-loop turns,
    not one turn (one write per subscriber) each, in order."""
    room, n = "together", 200
    async with counting(URL, prefix, "b", storage="memory") as b:
        await b.broker.subscribe(room)
        nc = await nats.connect(URL)
        try:
            for seq in range(1, n + 1):
                head = msgspec.json.encode([room, seq, "e1", "s", seq, f"p{seq}"])
                await nc.publish(b.broker._fanout_subject(room), head + b"\n" + raw(seq))
            await nc.flush()
        finally:
            await nc.close()
        got = await b.handler.wait_publications(n, room)
        assert [(p.seq, bytes(p.data)) for p in got] == [(s, raw(s)) for s in range(1, n + 1)]
        assert b.handler.turns <= 20, b.handler.turns
