"""The Redis broker: the shared conformance suite (two nodes on one Redis included), plus what
only a remote broker promises: one sequence under concurrent publishers, presence leases that
run out when a node dies, and surviving Redis going away and coming back.

Runs against the machine's Redis at 127.0.0.1:6379 (skipped when it is not there), one key
prefix per test; the restart tests start a ``redis-server`` of their own on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis

from wirehub.hub.broker.base import BrokerError, HistoryPolicy, Member
from wirehub.hub.broker.redis import RedisBroker

from ..helpers import free_port
from .broker_conformance import POLICY, BrokerConformance, Node, RecordingHandler, eventually, now_ms, raw

HOST, PORT, DB = "127.0.0.1", 6379, 11
URL = f"redis://{HOST}:{PORT}/{DB}"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _redis_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


if not _redis_answers(HOST, PORT):
    pytest.skip(f"Redis is not reachable at {HOST}:{PORT} (start redis-server to run these tests)", allow_module_level=True)


async def drop_prefix(prefix: str, url: str = URL) -> None:
    """Delete every key a test created under ``prefix``."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def started(url: str, prefix: str, node_id: str, **kwargs) -> AsyncIterator[Node]:
    handler = RecordingHandler()
    broker = RedisBroker(url, prefix=prefix, node_id=node_id, **kwargs)
    await broker.start(handler)
    try:
        yield Node(broker, handler)
    finally:
        await broker.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"wht{uuid.uuid4().hex[:12]}"
    yield name
    await drop_prefix(name)


class TestRedisBroker(BrokerConformance):
    @pytest.fixture
    def broker(self, prefix):
        return RedisBroker(URL, prefix=prefix, node_id="node-a")

    @pytest.fixture
    def second_node(self, prefix):
        return RedisBroker(URL, prefix=prefix, node_id="node-b")


# -- a Redis of our own, to stop and start ------------------------------------------------------


class OwnRedis:
    """A ``redis-server`` this test starts, stops (SIGTERM to its own pid) and starts again on
    the same port; without persistence unless ``aof``."""

    def __init__(self, workdir: Path, *, aof: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    async def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", HOST, "--save", "", *persistence,
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            return await asyncio.to_thread(_redis_answers, HOST, self.port, 0.2)

        await eventually(answers, f"redis-server on port {self.port}", timeout=10.0)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # a paused server would not act on SIGTERM
            proc.terminate()
            await asyncio.to_thread(proc.wait, 10)


@pytest.fixture
async def own_redis(tmp_path) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def own_redis_aof(tmp_path) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(tmp_path, aof=True)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class TestRedisOnly:
    async def test_is_not_local(self):
        assert RedisBroker.local is False
        assert RedisBroker(URL).local is False

    async def test_start_fails_fast_when_redis_is_unreachable(self):
        broker = RedisBroker(f"redis://{HOST}:{free_port()}/0", timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(BrokerError, match="cannot reach redis"):
            await broker.start(RecordingHandler())
        assert time.monotonic() - t0 < 3
        assert broker.ready() is False
        with pytest.raises(BrokerError):
            await broker.publish("r", b"1", sender="", ts=now_ms(), history=POLICY)
        await broker.close()

    async def test_concurrent_publishers_share_one_gapless_sequence(self, prefix):
        room = f"{prefix}:busy"
        per_node, nodes = 40, 3
        async with contextlib.AsyncExitStack() as stack:
            ns = [await stack.enter_async_context(started(URL, prefix, f"n{i}")) for i in range(nodes)]
            for node in ns[:2]:
                await node.broker.subscribe(room)

            async def publish(node: Node, i: int):
                me = node.broker.node_id
                return await node.broker.publish(room, raw([me, i]), sender=me, ts=now_ms(), history=POLICY)

            # every publish of every node in flight at once (several connections per node)
            pubs = await asyncio.gather(*(publish(node, i) for node in ns for i in range(per_node)))
            total = per_node * nodes
            assert sorted(p.seq for p in pubs) == list(range(1, total + 1))
            assert len({p.epoch for p in pubs}) == 1
            by_seq = {p.seq: p for p in pubs}
            for node in ns[:2]:
                got = await node.handler.wait_publications(total, room)
                assert [p.seq for p in got] == list(range(1, total + 1))
                assert got == [by_seq[s] for s in range(1, total + 1)]
            await BrokerConformance().fence(ns[2].broker, ns[2].handler, prefix)
            assert ns[2].handler.in_room(room) == []
            held = await ns[2].broker.history(room, since=total - 100, history=POLICY)
            assert held.complete and held.publications == [by_seq[s] for s in range(total - 99, total + 1)]

    async def test_a_thousand_calls_in_flight_at_once(self, prefix):
        """A thousand clients arriving at once: every call is pipelined on the one command
        connection and answered, none refused."""
        async with started(URL, prefix, "n0") as node:
            n = 1024
            await asyncio.gather(*(node.broker.add_client(f"{prefix}-c{i}") for i in range(n)))
            positions = await asyncio.gather(*(node.broker.position(f"{prefix}:r{i}") for i in range(n)))
            assert len(positions) == n and all(p.seq == 0 for p in positions)

    async def test_position_and_history_return_after_what_they_cover_was_delivered(self, prefix):
        """A node answers a join with position()/history() and then relays live publications:
        none up to the position it read may reach it afterwards (the hub would send it twice,
        or out of order). With a local broker that holds trivially; here the call waits for
        the pub/sub connection to have delivered everything Redis sent it before."""
        room = f"{prefix}:r"
        async with started(URL, prefix, "a") as a, started(URL, prefix, "b") as b:
            await a.broker.subscribe(room)
            stop = asyncio.Event()

            async def publisher():  # another node, publishing all along
                while not stop.is_set():
                    await asyncio.gather(*(b.broker.publish(room, b"0", sender="", ts=now_ms(), history=POLICY) for _ in range(5)))

            task = asyncio.create_task(publisher())
            try:
                for i in range(100):
                    if i % 2:
                        seq = (await a.broker.position(room)).seq
                    else:
                        seq = (await a.broker.history(room, since=0, limit=0, history=POLICY)).position.seq
                    got = [p.seq for p in a.handler.in_room(room)]
                    assert got[:seq] == list(range(1, seq + 1)), f"read seq {seq}, delivered only up to {len(got)}"
            finally:
                stop.set()
                await task
            assert seq > 0

    async def test_recovery_reads_of_one_turn_share_one_read(self, prefix):
        """The re-joins of one room in one event-loop turn (a reconnect storm) read history
        once, from the oldest ``since`` among them: each caller gets what a read of its own
        gives, after everything up to the position was delivered, and a caller that gives up
        does not take the others' answer with it."""
        room = f"{prefix}:r"
        policy = HistoryPolicy(size=8, ttl=3600.0)
        async with started(URL, prefix, "a") as a:
            await a.broker.subscribe(room)
            for i in range(12):
                await a.broker.publish(room, raw(i), sender="", ts=now_ms(), history=policy)
            sinces = [-1, 0, 3, 4, 5, 9, 11, 12, 13]
            alone = [await a.broker.history(room, since=s, history=policy) for s in sinces]
            assert [r.complete for r in alone] == [False, False, False, True, True, True, True, True, False]
            reads = []
            read = a.broker._read

            async def counted(what, room_, since, limit, history):
                reads.append(since)
                return await read(what, room_, since, limit, history)

            a.broker._read = counted  # type: ignore[method-assign]
            together = await asyncio.gather(*(a.broker.history(room, since=s, history=policy) for s in sinces))
            assert reads == [-1]  # one read, from the oldest since
            assert together == alone
            assert [p.seq for p in a.handler.in_room(room)] == list(range(1, 13))
            # callers that come while a read is under way share the next one, started after them
            reads.clear()
            later: list[asyncio.Future] = []

            async def meanwhile(what, room_, since, limit, history):
                reads.append(since)
                if not later:
                    for s in (9, 3, 11):
                        later.append(asyncio.ensure_future(a.broker.history(room, since=s, history=policy)))
                        for _ in range(3):  # each asks in a turn of its own
                            await asyncio.sleep(0)
                return await read(what, room_, since, limit, history)

            a.broker._read = meanwhile  # type: ignore[method-assign]
            assert await a.broker.history(room, since=5, history=policy) == alone[4]
            assert await asyncio.gather(*later) == [alone[5], alone[2], alone[6]]
            assert reads == [5, 3]
            reads.clear()
            tasks: list[asyncio.Future] = []

            async def giving_up(what, room_, since, limit, history):  # both have asked: one gives up
                reads.append(since)
                tasks[0].cancel()
                return await read(what, room_, since, limit, history)

            a.broker._read = giving_up  # type: ignore[method-assign]
            tasks.extend(asyncio.ensure_future(a.broker.history(room, since=s, history=policy)) for s in (4, 9))
            assert await tasks[1] == alone[5]
            assert tasks[0].cancelled() and reads == [4]

    async def test_lease_and_presence_writes_of_one_turn_are_one_transaction(self, prefix):
        """The client leases and presence entries written in one turn go in one MULTI/EXEC;
        each caller is answered for its own commands: one that Redis refuses fails alone."""
        room, bad = f"{prefix}:r", f"{prefix}:bad"
        redis = aioredis.Redis.from_url(URL)
        try:
            await redis.set(f"{prefix}:p:{bad}", "not a hash")  # HSET on it: WRONGTYPE
            async with started(URL, prefix, "a") as a:
                sent = []
                send = a.broker._send_writes

                def counted():
                    sent.append(len(a.broker._writes.callers) if a.broker._writes else 0)
                    send()

                a.broker._send_writes = counted  # type: ignore[method-assign]
                members = [Member(client=f"c{i}", user=f"u{i}") for i in range(50)]
                results = await asyncio.gather(
                    *(a.broker.add_client(m.client) for m in members),
                    *(a.broker.presence_add(room, m) for m in members),
                    a.broker.presence_add(bad, members[0]),
                    return_exceptions=True,
                )
                assert sent == [101]
                assert results[:100] == [None] * 100
                assert isinstance(results[100], BrokerError) and "WRONGTYPE" in str(results[100])
                by_client = lambda ms: sorted(ms, key=lambda m: m.client)  # noqa: E731
                assert await a.broker.presence(room) == by_client(members)
                assert await redis.get(f"{prefix}:c:c7") == b"a"
                await asyncio.gather(*(a.broker.presence_remove(room, m.client) for m in members[:25]))
                assert await a.broker.presence(room) == by_client(members[25:])
        finally:
            await redis.aclose()

    async def test_presence_and_client_leases_of_a_dead_node_run_out(self, prefix):
        room, lease = f"{prefix}:r", 0.6
        alice, bob = Member(client=f"{prefix}-alice", user="alice"), Member(client=f"{prefix}-bob", user="bob")
        async with started(URL, prefix, "dead", lease_s=lease) as dead, started(URL, prefix, "alive", lease_s=lease) as alive:
            await dead.broker.presence_add(room, alice)
            await dead.broker.add_client(alice.client)
            await alive.broker.presence_add(room, bob)
            await alive.broker.add_client(bob.client)
            # the node "dies": nothing refreshes its leases any more (and it cleans nothing up)
            dead.broker._refresher.cancel()
            assert sorted(await alive.broker.presence(room), key=lambda m: m.client) == [alice, bob]

            t0 = time.monotonic()
            members = await eventually(lambda: _without(alive.broker.presence(room), alice), "alice's lease to run out")
            elapsed = time.monotonic() - t0
            # bob was added at the same time; only the live node's refresh kept him
            assert members == [bob]
            assert await alive.broker.presence_count(room) == 1  # the live leases only
            assert elapsed < lease + 2
            assert room in await alive.broker.rooms()
            await eventually(lambda: _is_false(alive.broker.send(alice.client, b'"x"')), "alice's registration to run out")
            assert await dead.broker.send(bob.client, b'"hi"') is True
            assert await alive.handler.wait_directs(1) == [(bob.client, b'"hi"')]
            assert await alive.broker.presence(room) == [bob]

    async def test_presence_expiry_follows_the_injected_clock(self, prefix):
        room = f"{prefix}:r"
        now = [1_700_000_000.0]
        alice, bob = Member(client="alice", user="a"), Member(client="bob", user="b", name="Bob")
        async with started(URL, prefix, "a", clock=lambda: now[0]) as a, started(URL, prefix, "b", clock=lambda: now[0]) as b:
            a.broker._refresher.cancel()
            b.broker._refresher.cancel()
            await a.broker.presence_add(room, alice)
            await b.broker.presence_add(room, bob)
            now[0] += 10.0  # exactly the lease: still held
            assert await b.broker.presence(room) == [alice, bob]
            await b.broker._refresh(full=False)  # b is alive, a is not
            now[0] += 0.5
            assert await a.broker.presence(room) == [bob]
            # a late refresh of the dead node does not bring a purged entry back
            await a.broker._refresh(full=False)
            assert await b.broker.presence(room) == [bob]

    async def test_direct_send_across_nodes(self, prefix):
        async with started(URL, prefix, "a") as a, started(URL, prefix, "b") as b:
            await b.broker.add_client("c-b")
            await a.broker.add_client("c-a")
            frame = b'{"op":"msg","from":"c-a","data":{"x":[1,"\xc3\xa9"]}}'
            assert await a.broker.send("c-b", frame) is True
            assert await b.broker.send("c-a", b'"back"') is True
            assert await b.handler.wait_directs(1) == [("c-b", frame)]
            assert await a.handler.wait_directs(1) == [("c-a", b'"back"')]
            # the client moves to node a
            await b.broker.remove_client("c-b")
            assert await a.broker.send("c-b", b'"1"') is False
            await a.broker.add_client("c-b")
            assert await b.broker.send("c-b", b'"2"') is True
            await a.handler.wait_directs(2)
            assert a.handler.directs[1] == ("c-b", b'"2"')
            # removing from a node that no longer has it leaves the new registration alone
            await b.broker.remove_client("c-b")
            assert await b.broker.send("c-b", b'"3"') is True

    async def test_lost_pubsub_connection_catches_up_without_gap_or_duplicate(self, prefix):
        """Redis stays up but drops one node's pub/sub connection: what others publish meanwhile
        reaches the node once, in order, after it resubscribes."""
        room, node = f"{prefix}:r", f"{prefix}-a"  # a node id no other test run uses
        async with started(URL, prefix, node) as a, started(URL, prefix, "b") as b:
            await a.broker.subscribe(room)
            first = [await b.broker.publish(room, raw(i), sender="", ts=now_ms(), history=POLICY) for i in range(3)]
            await a.handler.wait_publications(3, room)
            admin = aioredis.Redis.from_url(URL)
            try:
                clients = await admin.client_list()
                (sub,) = [c for c in clients if c["name"] == f"wirehub-sub-{node}"]
                await admin.client_kill_filter(_id=sub["id"])
            finally:
                await admin.aclose()
            # a's subscriptions are gone from Redis now: these can only come back by catch-up
            more = [await b.broker.publish(room, raw(i), sender="", ts=now_ms(), history=POLICY) for i in range(3, 8)]
            await a.handler.wait_until(lambda: a.handler.states == [False, True], "a down then up")
            assert a.broker.ready() is True
            last = await b.broker.publish(room, b'"live"', sender="", ts=now_ms(), history=POLICY)
            got = await a.handler.wait_publications(9, room)
            assert got == first + more + [last]
            await BrokerConformance().fence(a.broker, a.handler, prefix, via=b.broker)
            assert len(a.handler.in_room(room)) == 9

    async def test_redis_restart_without_persistence(self, own_redis, prefix):
        room, gone_room = f"{prefix}:r", f"{prefix}:left"
        alice = Member(client="alice", user="a")
        async with started(own_redis.url, prefix, "a", timeout=1.0) as a, started(own_redis.url, prefix, "b", timeout=1.0) as b:
            await a.broker.subscribe(room)
            await a.broker.subscribe(gone_room)
            await a.broker.add_client("alice")
            await a.broker.presence_add(room, alice)
            before = [await b.broker.publish(room, raw(i), sender="", ts=now_ms(), history=POLICY) for i in range(3)]
            await a.handler.wait_publications(3, room)
            old = await a.broker.position(room)
            assert old.seq == 3

            await own_redis.stop()
            await a.handler.wait_until(lambda: a.handler.states == [False], "a to see redis gone")
            await b.handler.wait_until(lambda: b.handler.states == [False], "b to see redis gone")
            assert a.broker.ready() is False
            t0 = time.monotonic()
            with pytest.raises(BrokerError, match="unreachable"):
                await a.broker.publish(room, b"1", sender="", ts=now_ms(), history=POLICY)
            for call in (
                a.broker.history(room, since=1, history=POLICY),
                a.broker.position(room),
                a.broker.subscribe(f"{prefix}:new"),
                a.broker.presence(room),
                a.broker.send("alice", b"x"),
                a.broker.room_event(room, b"x"),
            ):
                with pytest.raises(BrokerError):
                    await call
            await a.broker.unsubscribe(gone_room)  # harmless while down; not resubscribed later
            assert time.monotonic() - t0 < 1.0  # refused at once, not after timeouts

            await own_redis.start()  # same port, empty
            await a.handler.wait_until(lambda: a.handler.states == [False, True], "a to see redis back")
            await b.handler.wait_until(lambda: b.handler.states == [False, True], "b to see redis back")
            assert a.broker.ready() is True and b.broker.ready() is True
            # the subscription is back and the stream is new: a new epoch, seq from 1
            pub = await b.broker.publish(room, b'"after"', sender="", ts=now_ms(), history=POLICY)
            assert pub.seq == 1 and pub.epoch != old.epoch
            got = await a.handler.wait_publications(4, room)
            assert got == before + [pub]
            now = await a.broker.position(room)
            assert now.epoch != old.epoch
            stale = await a.broker.history(room, since=old.seq, history=POLICY)
            assert stale.position.epoch != old.epoch and stale.complete is False
            # what the node holds was registered again: presence and direct messages work
            assert await b.broker.presence(room) == [alice]
            assert await b.broker.send("alice", b'"dm"') is True
            assert await a.handler.wait_directs(1) == [("alice", b'"dm"')]
            await b.broker.publish(gone_room, b"1", sender="", ts=now_ms(), history=POLICY)
            await BrokerConformance().fence(a.broker, a.handler, prefix, via=b.broker)
            assert a.handler.in_room(gone_room) == []
            assert a.handler.states == [False, True]

    async def test_a_hung_redis_is_detected_and_calls_stay_bounded(self, own_redis, prefix):
        """Redis stops answering but keeps its sockets open (SIGSTOP): calls fail after the
        timeout instead of hanging, the idle pub/sub connection is found dead by its PING, and
        everything resumes when Redis does."""
        room = f"{prefix}:r"
        async with started(own_redis.url, prefix, "a", timeout=0.5) as a:
            await a.broker.subscribe(room)
            await a.broker.publish(room, b"1", sender="", ts=now_ms(), history=POLICY)
            await a.handler.wait_publications(1, room)
            own_redis.pause()
            try:
                t0 = time.monotonic()
                with pytest.raises(BrokerError, match="did not answer within 0.5s .it may or may not have been applied"):
                    await a.broker.publish(room, b"2", sender="", ts=now_ms(), history=POLICY)
                assert time.monotonic() - t0 < 2
                await a.handler.wait_until(lambda: a.handler.states == [False], "the hang to be noticed")
                assert a.broker.ready() is False
            finally:
                own_redis.resume()
            await a.handler.wait_until(lambda: a.handler.states == [False, True], "redis to be back")
            last = await a.broker.publish(room, b"3", sender="", ts=now_ms(), history=POLICY)
            # whether the timed-out publish was applied is unknown to its caller; either way
            # the subscriber sees one gapless sequence
            assert last.seq in (2, 3)
            got = await a.handler.wait_publications(last.seq, room)
            assert [p.seq for p in got] == list(range(1, last.seq + 1))

    async def test_a_node_cut_for_its_output_buffer_resubscribes_and_catches_up(self, own_redis, prefix):
        """A node that falls behind its pub/sub connection is cut by Redis when the connection's
        output buffer passes ``client-output-buffer-limit pubsub``: it resubscribes and catches
        up from the history, every publication once and in order, as after an outage."""
        room = f"{prefix}:r"
        admin = aioredis.Redis.from_url(own_redis.url)
        policy = HistoryPolicy(size=2000, ttl=3600.0)
        data = b'"' + b"x" * 10_000 + b'"'
        try:
            await admin.config_set("client-output-buffer-limit", "pubsub 262144 131072 1")
            async with started(own_redis.url, prefix, "a") as a, started(own_redis.url, prefix, "b") as b:
                await a.broker.subscribe(room)
                sub = a.broker._sub
                sub.transport.pause_reading()  # a falls behind: 20 MB will not fit in the socket buffers

                async def cut() -> bool:
                    return not [c for c in await admin.client_list() if c["name"] == "wirehub-sub-a"]

                sent = await asyncio.gather(*(b.broker.publish_nowait(room, data, sender="", ts=now_ms(), history=policy) for _ in range(2000)))
                await eventually(cut, "redis to cut a's pub/sub connection")
                sub.transport.resume_reading()  # a reads what it was sent, then finds the connection gone
                await a.handler.wait_until(lambda: a.handler.states == [False, True], "a to be back")
                got = await a.handler.wait_publications(2000, room)
                assert got == sent
        finally:
            await admin.aclose()

    async def test_close_while_redis_is_down_is_bounded(self, own_redis, prefix):
        handler = RecordingHandler()
        broker = RedisBroker(own_redis.url, prefix=prefix, node_id="a", timeout=1.0)
        await broker.start(handler)
        await broker.add_client("c1")
        await own_redis.stop()
        await handler.wait_until(lambda: handler.states == [False], "redis gone")
        t0 = time.monotonic()
        await broker.close()
        assert time.monotonic() - t0 < 3
        assert broker.ready() is False

    async def test_redis_restart_with_persistence_keeps_the_epoch(self, own_redis_aof, prefix):
        room = f"{prefix}:r"
        async with started(own_redis_aof.url, prefix, "a", timeout=1.0) as a, started(own_redis_aof.url, prefix, "b", timeout=1.0) as b:
            await a.broker.subscribe(room)
            before = [await b.broker.publish(room, raw(i), sender="", ts=now_ms(), history=POLICY) for i in range(3)]
            await a.handler.wait_publications(3, room)
            await own_redis_aof.stop()
            await a.handler.wait_until(lambda: a.handler.states == [False], "redis gone")
            await own_redis_aof.start()
            await b.handler.wait_until(lambda: b.handler.states == [False, True], "b back")
            # b may publish before a has resubscribed: a catches up from the stream
            after = [await b.broker.publish(room, raw(i), sender="", ts=now_ms(), history=POLICY) for i in range(3, 6)]
            assert [p.seq for p in after] == [4, 5, 6] and {p.epoch for p in after} == {before[0].epoch}
            got = await a.handler.wait_publications(6, room)
            assert got == before + after
            held = await a.broker.history(room, since=2, history=POLICY)
            assert held.complete is True and held.publications == before[2:] + after

    async def test_publish_seq_nowait_gives_the_seq_beside_publications_in_one_batch(self, prefix):
        """publish_seq_nowait (the hub's acks) and publish_nowait calls to one room in one
        turn share a batch: the former get their seq, the latter their Publication, in
        call order, and the history holds every one."""
        room = f"{prefix}:r"
        async with started(URL, prefix, "a") as a:
            broker = a.broker
            calls = [(broker.publish_seq_nowait if i % 3 else broker.publish_nowait)(room, raw(i), sender=f"c{i}", ts=now_ms(), history=POLICY) for i in range(9)]
            answers = await asyncio.gather(*calls)
            assert [a if type(a) is int else a.seq for a in answers] == list(range(1, 10))
            for i, answer in enumerate(answers):
                assert (type(answer) is int) == bool(i % 3)
                if type(answer) is not int:
                    assert (answer.room, bytes(answer.data), answer.sender) == (room, bytes(raw(i)), f"c{i}")
            held = await broker.history(room, history=POLICY)
            assert [(p.seq, bytes(p.data), p.sender) for p in held.publications] == [(i + 1, bytes(raw(i)), f"c{i}") for i in range(9)]
            assert broker.in_flight == 0

    async def test_publish_batched_nowait_shares_one_future_per_batch(self, own_redis, prefix):
        """publish_batched_nowait (what the hub calls) beside publish_seq_nowait and
        publish_nowait in one turn: the first ones share the batch's future, which gives its
        first seq, each adding its index; the others get theirs; all in call order. A
        refused one fails at once; a failed batch fails the shared future."""
        from wirehub.hub.broker import BrokerError

        room = f"{prefix}:r"
        async with started(own_redis.url, prefix, "a") as a:  # (its own Redis: SCRIPT FLUSH below)
            broker = a.broker
            kinds = ["batched", "seq", "batched", "publication", "batched"]
            calls = [getattr(broker, f"publish_{kind}_nowait" if kind != "publication" else "publish_nowait")(
                room, raw(i), sender=f"c{i}", ts=now_ms(), history=POLICY) for i, kind in enumerate(kinds)]
            shared = {id(c[0]) for c in calls if type(c) is tuple}
            assert len(shared) == 1 and [c[1] for c in calls if type(c) is tuple] == [0, 2, 4]
            assert broker.in_flight == 5
            assert await _seqs(calls) == [1, 2, 3, 4, 5] and broker.in_flight == 0
            more = [broker.publish_batched_nowait(f"{room}{i % 2}", raw(i), sender="c", ts=now_ms(), history=POLICY) for i in range(4)]
            assert [k for _, k in more] == [0, 0, 1, 1] and more[0][0] is more[2][0] and more[0][0] is not more[1][0]
            assert [await f + k for f, k in more] == [1, 1, 2, 2]  # two rooms: two batches
            await a.broker._cmd.call(b"SCRIPT", b"FLUSH")  # the next batch is refused by Redis (NOSCRIPT)
            future, k = broker.publish_batched_nowait(room, raw(9), sender="c", ts=now_ms(), history=POLICY)
            with pytest.raises(BrokerError, match="lost wirehub's scripts"):
                await future
            assert broker.in_flight == 0
        future, k = broker.publish_batched_nowait(room, raw(9), sender="c", ts=now_ms(), history=POLICY)  # closed
        with pytest.raises(BrokerError, match="not running"):
            await future

    async def test_the_batches_of_one_turn_go_in_one_script_call(self, own_redis, prefix):
        """The publications of several rooms in one event-loop turn are one EVALSHA (counted by
        the broker and by Redis), each room getting its own seqs in call order, its own
        stream entry and message; past CALL_ROOMS rooms a turn takes more calls."""
        from wirehub.hub.broker.publishing import CALL_BYTES, CALL_ROOMS

        rooms = [f"{prefix}:r{i}" for i in range(3)]
        client = aioredis.Redis.from_url(own_redis.url)
        async with started(own_redis.url, prefix, "a") as a, started(own_redis.url, prefix, "b") as b:
            broker = a.broker
            for room in rooms:
                await b.broker.subscribe(room)
            await client.config_resetstat()
            calls = broker.publish_calls
            # rooms interleaved, each published 1, 2 and 3 times; every kind of call
            order = [rooms[0], rooms[1], rooms[2], rooms[1], rooms[2], rooms[2]]
            answers = []
            for i, room in enumerate(order):
                if i % 3 == 0:
                    answers.append(broker.publish_nowait(room, raw(i), sender=f"c{i}", ts=now_ms(), history=POLICY))
                elif i % 3 == 1:
                    answers.append(broker.publish_seq_nowait(room, raw(i), sender=f"c{i}", ts=now_ms(), history=POLICY))
                else:
                    answers.append(broker.publish_batched_now(room, raw(i), f"c{i}", now_ms(), POLICY))
            seqs = await _seqs(answers)
            assert seqs == [1, 1, 1, 2, 2, 3]
            assert broker.publish_calls == calls + 1 and broker.in_flight == 0
            assert (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] == 1
            for r, room in enumerate(rooms):
                mine = [(i, seq) for i, (where, seq) in enumerate(zip(order, seqs)) if where == room]
                held = await broker.history(room, history=POLICY)
                assert [(p.seq, bytes(p.data), p.sender) for p in held.publications] == [(seq, bytes(raw(i)), f"c{i}") for i, seq in mine]
                assert await client.xlen(f"{prefix}:h:{room}") == 1  # one entry per batch
                got = await b.handler.wait_publications(r + 1, room)
                assert [(p.seq, bytes(p.data)) for p in got] == [(seq, bytes(raw(i))) for i, seq in mine]
            # more rooms in a turn than one call takes: two calls, every room answered
            many = [broker.publish_batched_now(f"{prefix}:m{i}", raw(i), "c", now_ms(), POLICY) for i in range(CALL_ROOMS + 1)]
            assert broker.publish_calls == calls + 1  # (not sent before the turn ends)
            assert [await f + k for f, k in many] == [1] * (CALL_ROOMS + 1)
            assert broker.publish_calls == calls + 3
            # and more data than one call takes (two batches of 3/4 CALL_BYTES): one call each
            big = [broker.publish_batched_now(f"{prefix}:b{i}", b"x" * (CALL_BYTES * 3 // 4), "c", now_ms(), POLICY) for i in range(2)]
            assert [await f + k for f, k in big] == [1, 1] and broker.publish_calls == calls + 5
            # Redis lost the script: every batch of the call fails as not applied, the next call works
            await client.script_flush()
            lost = [broker.publish_batched_now(room, raw(0), "c", now_ms(), POLICY) for room in rooms]
            for future, _ in lost:
                with pytest.raises(BrokerError, match="lost wirehub's scripts") as failed:
                    await future
                assert not failed.value.maybe_applied
            assert broker.in_flight == 0
            again = [broker.publish_batched_now(room, raw(0), "c", now_ms(), POLICY) for room in rooms]
            assert [await f + k for f, k in again] == [2, 3, 4]  # (the failed ones took no seq)
            assert broker.publish_calls == calls + 7
        await client.aclose()

    async def test_a_room_that_fails_in_a_shared_call_fails_alone(self, prefix):
        """In one script call, a room whose stream key is not a stream (WRONGTYPE at its
        append) and one whose meta key is not a hash (WRONGTYPE at its first read) fail with
        Redis's error and write nothing (no seq taken, no message); the others are applied,
        acked and delivered."""
        good, stream_bad, meta_bad, good2 = (f"{prefix}:{name}" for name in ("good", "sbad", "mbad", "good2"))
        client = aioredis.Redis.from_url(URL)
        async with started(URL, prefix, "a") as a:
            broker = a.broker
            for room in (good, stream_bad, meta_bad, good2):
                await broker.subscribe(room)
            assert await broker.publish_seq_nowait(stream_bad, raw(0), sender="c", ts=now_ms(), history=POLICY) == 1
            await client.set(f"{prefix}:h:{stream_bad}", "not a stream")
            await client.set(f"{prefix}:m:{meta_bad}", "not a hash")
            calls = broker.publish_calls
            answers = [(room, broker.publish_seq_nowait(room, raw(i), sender="c", ts=now_ms(), history=POLICY))
                       for i, room in enumerate((good, stream_bad, meta_bad, good2, good, stream_bad))]
            results = await asyncio.gather(*(answer for _, answer in answers), return_exceptions=True)
            assert broker.publish_calls == calls + 1 and broker.in_flight == 0
            assert results[0] == 1 and results[3] == 1 and results[4] == 2
            for k in (1, 2, 5):
                assert isinstance(results[k], BrokerError) and "WRONGTYPE" in str(results[k]), results[k]
                assert not results[k].maybe_applied
            assert await client.get(f"{prefix}:h:{stream_bad}") == b"not a stream"
            assert await client.hget(f"{prefix}:m:{stream_bad}", "s") == b"1"  # no seq taken
            assert await client.get(f"{prefix}:m:{meta_bad}") == b"not a hash"
            # fixed, each goes on where it was: the failed publications took no seq and sent nothing
            await client.delete(f"{prefix}:h:{stream_bad}", f"{prefix}:m:{meta_bad}")
            assert await broker.publish_seq_nowait(stream_bad, raw(9), sender="c", ts=now_ms(), history=POLICY) == 2
            assert await broker.publish_seq_nowait(meta_bad, raw(9), sender="c", ts=now_ms(), history=POLICY) == 1
            assert [(p.seq, bytes(p.data)) for p in await a.handler.wait_publications(2, stream_bad)] == [(1, raw(0)), (2, raw(9))]
            assert [(p.seq, bytes(p.data)) for p in await a.handler.wait_publications(1, meta_bad)] == [(1, raw(9))]
            assert [p.seq for p in await a.handler.wait_publications(2, good)] == [1, 2]
            assert [p.seq for p in await a.handler.wait_publications(1, good2)] == [1]
        await client.aclose()

    async def test_entries_past_the_ttl_are_trimmed_when_seen_old_and_never_read(self, prefix):
        """The publish script looks for entries past the TTL when seq passes a multiple of 64
        and the oldest entry it saw last time is past it (meta's ``o``); until then expired
        entries may stay in the stream, but a history read never returns them."""
        room = f"{prefix}:r"
        now = [1_700_000_000.0]
        policy = HistoryPolicy(size=1000, ttl=60.0)
        client = aioredis.Redis.from_url(URL)
        meta, stream = f"{prefix}:m:{room}", f"{prefix}:h:{room}"
        ms = lambda: int(now[0] * 1000)  # noqa: E731
        async with started(URL, prefix, "a", clock=lambda: now[0]) as a:
            broker = a.broker

            async def publish(count: int) -> None:
                for _ in range(count):  # one batch each
                    await broker.publish_seq_nowait(room, b"1", sender="", ts=ms(), history=policy)

            t0 = ms()
            await publish(64)  # seq 64: looks (no o yet), keeps them all, notes the oldest
            assert await client.hget(meta, "o") == b"%d" % t0 and await client.xlen(stream) == 64
            now[0] += 30
            await publish(64)  # seq 128: the oldest seen is within the TTL: not looked at again
            assert await client.hget(meta, "o") == b"%d" % t0 and await client.xlen(stream) == 128
            now[0] += 31  # seqs 1-64 are 61 s old
            await publish(63)
            assert await client.xlen(stream) == 191  # (held until seq 192)
            result = await broker.history(room, since=0, history=policy)
            assert [p.seq for p in result.publications] == list(range(65, 192)) and result.complete is False
            assert await client.xlen(stream) == 127  # the read trimmed them first
            await publish(1)  # seq 192: o is past the TTL: looks, notes the new oldest
            assert await client.hget(meta, "o") == b"%d" % (t0 + 30_000) and await client.xlen(stream) == 128
            now[0] += 30  # seqs 65-128 expired; 64 more pass seq 256: trimmed by the publication
            await publish(64)
            assert await client.xlen(stream) == 128 and await client.hget(meta, "o") == b"%d" % (t0 + 61_000)
            result = await broker.history(room, since=128, history=policy)
            assert [p.seq for p in result.publications] == list(range(129, 257)) and result.complete is True
        await client.aclose()

    async def test_history_ttl_drops_old_entries(self, prefix):
        room = f"{prefix}:r"
        now = [1_700_000_000.0]
        policy = HistoryPolicy(size=100, ttl=60.0)
        async with started(URL, prefix, "a", clock=lambda: now[0]) as a:
            ms = lambda: int(now[0] * 1000)  # noqa: E731
            await a.broker.publish(room, b"1", sender="", ts=ms(), history=policy)
            now[0] += 30
            await a.broker.publish(room, b"2", sender="", ts=ms(), history=policy)
            now[0] += 31  # seq 1 is 61 s old
            result = await a.broker.history(room, since=0, history=policy)
            assert [p.seq for p in result.publications] == [2] and result.complete is False
            assert (await a.broker.history(room, since=1, history=policy)).complete is True
            now[0] += 30
            result = await a.broker.history(room, since=1, history=policy)
            assert result.publications == [] and result.complete is False and result.position.seq == 2


async def _seqs(answers) -> list[int]:
    """The seqs the publish calls' answers give, in order: ``(future, k)`` of the batched
    calls, the futures of the others (a seq or a Publication)."""
    seqs = []
    for answer in answers:
        if type(answer) is tuple:
            seqs.append(await answer[0] + answer[1])
        else:
            got = await answer
            seqs.append(got if type(got) is int else got.seq)
    return seqs


async def _without(members_call, member: Member):
    members = await members_call
    return None if member in members else members


async def _is_false(call) -> bool:
    return (await call) is False
