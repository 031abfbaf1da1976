"""Publications on a remote broker travel together: a connection's ``pub`` frames do not wait
for one another's round trip, the acks come in order, frames after them are answered after
them, a connection's window bounds what it has in flight, and a broker that fails mid-stream
answers every publication (ok or error), none lost silently."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis.asyncio as aioredis

from wirehub.hub import app as hub_app
from wirehub.hub.broker.nats import NatsBroker
from wirehub.hub.broker.redis import RedisBroker

from ..helpers import WAIT, wait_for
from .hubclient import hub_server
from .test_broker_nats import URL as NATS_URL
from .test_broker_nats import drop_prefix as drop_nats
from .test_broker_redis import URL as REDIS_URL
from .test_broker_redis import OwnRedis
from .test_broker_redis import drop_prefix as drop_redis


def peak_tracking(cls):
    """The broker class, counting the most publications it ever had in flight."""

    class Tracked(cls):
        peak = 0

        def publish_nowait(self, *args, **kwargs):
            future = super().publish_nowait(*args, **kwargs)
            self.peak = max(self.peak, self.in_flight)
            return future

        if hasattr(cls, "publish_seq_nowait"):  # what the hub calls when the broker has it

            def publish_seq_nowait(self, *args, **kwargs):
                future = super().publish_seq_nowait(*args, **kwargs)
                self.peak = max(self.peak, self.in_flight)
                return future

        if hasattr(cls, "publish_batched_nowait"):  # (and this one first)

            def publish_batched_nowait(self, *args, **kwargs):
                answer = super().publish_batched_nowait(*args, **kwargs)
                self.peak = max(self.peak, self.in_flight)
                return answer

        if hasattr(cls, "publish_batched_now"):  # (and this one for the canonical pub)

            def publish_batched_now(self, *args):
                answer = super().publish_batched_now(*args)
                self.peak = max(self.peak, self.in_flight)
                return answer

    return Tracked


@pytest.fixture(params=["redis", "nats"])
async def remote(request):
    """A started-by-the-hub remote broker, with its own key prefix."""
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    if request.param == "redis":
        broker = peak_tracking(RedisBroker)(REDIS_URL, prefix=prefix)
    else:
        broker = peak_tracking(NatsBroker)(NATS_URL, prefix=prefix)
    yield broker
    await (drop_redis if request.param == "redis" else drop_nats)(prefix)


def lines(frames: list[dict]) -> bytes:
    return b"".join(json.dumps(f, separators=(",", ":")).encode() + b"\n" for f in frames)


@pytest.mark.one_loop
async def test_a_connections_publications_are_pipelined_and_acked_in_order(remote):
    n = 300
    async with hub_server("tcp", broker=remote) as hub:
        sub = await hub.greeted()
        await sub.join("r")
        pub = await hub.greeted()
        # every frame in one write: n publications with refs, then a ping
        await pub.send_raw(lines([{"op": "pub", "room": "r", "data": {"i": i}, "ref": i} for i in range(n)] + [{"op": "ping", "ref": "end"}]), newline=False)
        acks = [await pub.expect("ok", ref=i) for i in range(n)]
        assert [a["seq"] for a in acks] == list(range(1, n + 1))
        await pub.expect("pong", ref="end")  # answered after every publication before it
        got = [await sub.expect("msg", room="r") for _ in range(n)]
        assert [(m["seq"], m["data"]["i"]) for m in got] == [(i + 1, i) for i in range(n)]
        assert 1 < remote.peak <= hub_app.PUB_WINDOW  # in flight together, within the window
        assert remote.in_flight == 0


@pytest.mark.one_loop
async def test_publications_from_many_connections_keep_each_rooms_order(remote):
    async with hub_server("tcp", broker=remote) as hub:
        subs = [await hub.greeted() for _ in range(2)]
        for s, room in zip(subs, ("a", "b")):
            await s.join(room)
        pubs = [await hub.greeted() for _ in range(4)]
        for k, p in enumerate(pubs):
            frames = [{"op": "pub", "room": "ab"[i % 2], "data": [k, i], "ref": i} for i in range(100)]
            await p.send_raw(lines(frames), newline=False)
        for p in pubs:
            seqs = {"a": [], "b": []}
            for i in range(100):
                seqs["ab"[i % 2]].append((await p.expect("ok", ref=i))["seq"])
            assert all(x < y for room in seqs.values() for x, y in zip(room, room[1:]))  # a connection's own order
        for s, room in zip(subs, ("a", "b")):
            got = [await s.expect("msg", room=room) for _ in range(200)]
            assert [m["seq"] for m in got] == list(range(1, 201))
            for k in range(4):  # each publisher's messages arrive in the order it sent them
                mine = [m["data"][1] for m in got if m["data"][0] == k]
                assert mine == sorted(mine) and len(mine) == 50


@pytest.mark.one_loop
async def test_a_broker_failure_mid_stream_answers_every_publication(tmp_path):
    """Redis (with AOF) stops answering while a connection has publications in flight and
    more queued: every ``pub`` gets its ``ok`` or an ``error`` with its ref, and every one
    that was acked is in the history once Redis is back."""
    own = OwnRedis(tmp_path, aof=True)
    await own.start()
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    broker = RedisBroker(own.url, prefix=prefix, timeout=1.0)
    n = 3000
    try:
        async with hub_server("tcp", broker=broker, history_size=n) as hub:
            pub = await hub.greeted()
            await pub.send_raw(lines([{"op": "pub", "room": "r", "data": i, "ref": i} for i in range(n)]), newline=False)
            answers: dict[int, dict] = {}
            first = await pub.recv()
            answers[first["ref"]] = first
            own.pause()  # Redis stops answering: publications in flight and queued behind them
            while len(answers) < n:
                frame = await pub.recv(timeout=WAIT * 2)
                assert frame["op"] in ("ok", "error"), frame
                assert frame["ref"] not in answers, f"answered twice: {frame}"
                answers[frame["ref"]] = frame
            acked = sorted(a["seq"] for a in answers.values() if a["op"] == "ok")
            failed = [a for a in answers.values() if a["op"] == "error"]
            assert acked == list(range(1, len(acked) + 1))
            assert failed, "the broker was stopped with publications queued"
            assert all(a["code"] == "internal" and "broker" in a["message"] for a in failed)
            await own.stop()  # and restarts, from its append-only file
            await own.start()
            await wait_for(broker.ready, timeout=10, what="redis to be back")
            held = await broker.history("r", history=hub.app.policy("r").history)
            assert set(acked) <= {p.seq for p in held.publications}
    finally:
        await own.stop()


@pytest.mark.one_loop
async def test_a_refused_publication_is_answered_in_its_place(remote):
    """A pub refused by the hub itself (its data cannot be relayed) while earlier ones are in
    flight at the broker: its error comes after their acks, before the later ones'."""
    async with hub_server("ws", broker=remote) as hub:
        pub = await hub.greeted()
        await pub.send({"op": "pub", "room": "r", "data": 1, "ref": 1})
        await pub.send_raw(b'{"op":"pub","room":"r","data":[1e999,\n2],"ref":2}')
        await pub.send({"op": "pub", "room": "r", "data": 3, "ref": 3})
        await pub.expect("ok", ref=1)
        await pub.expect("error", ref=2, code="bad_frame")
        await pub.expect("ok", ref=3)


@pytest.mark.one_loop
async def test_a_failed_publication_is_answered_before_the_ones_after_it():
    """Redis refuses one publication (its room key holds a value of another type) while the
    next one, to another room, succeeds: the error comes before the next one's ack, each reply
    in the place of the frame it answers."""
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.set(f"{prefix}:m:bad", "not a hash")
        broker = RedisBroker(REDIS_URL, prefix=prefix)
        async with hub_server("tcp", broker=broker) as hub:
            pub = await hub.greeted()
            frames = [{"op": "pub", "room": "bad" if i % 2 else "r", "data": i, "ref": i} for i in range(10)]
            await pub.send_raw(lines(frames + [{"op": "ping", "ref": "end"}]), newline=False)
            got = [await pub.recv() for _ in range(11)]
            assert [f.get("ref") for f in got] == list(range(10)) + ["end"]
            assert [f["op"] for f in got[:10]] == ["ok", "error"] * 5
            assert all(f["code"] == "internal" for f in got[1:10:2])
    finally:
        await client.aclose()
        await drop_redis(prefix)


@pytest.mark.one_loop
async def test_error_replies_held_behind_publications_count_against_the_send_buffer(tmp_path):
    """Error replies wait behind the publications in flight before them (their order is the
    frames'). While Redis does not answer, a client that keeps earning errors (large refs
    echoed back) cannot make the hub hold more for it than its send buffer takes: past
    max_send_buffer it gets bye slow_consumer, as a client that does not read would."""
    own = OwnRedis(tmp_path)
    await own.start()
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    broker = RedisBroker(own.url, prefix=prefix, timeout=60.0)
    limit = 64 * 1024
    try:
        async with hub_server("tcp", broker=broker, max_send_buffer=limit, max_errors=100_000) as hub:
            pub = await hub.greeted()
            own.pause()  # the next publication stays in flight
            await pub.send({"op": "pub", "room": "r", "data": 0, "ref": 0})
            session = hub.app.sessions[pub.client_id]
            await wait_for(lambda: session.publishing, what="the publication to be in flight")
            big = "x" * 4000
            bad = b'{"op":"pub","room":"r","data":"\xff","ref":"%s"}\n' % big.encode()  # data not UTF-8: bad_frame
            for _ in range(4 * limit // len(bad)):  # four send buffers' worth of error replies
                if not session.conn.open:
                    break
                await pub.send_raw(bad, newline=False)
                held = sum(len(item) for _, item, _ in session.publishing or () if type(item) is bytes)
                assert held <= limit, f"{held} bytes of replies held for the client, over max_send_buffer"
            frames = await pub.closed()
            own.resume()
            assert frames[-1] == {"op": "bye", "reason": "slow_consumer", "reconnect": True}
            # the replies it earned before the cut fit in the send buffer
            assert 0 < hub.app.stats.errors.get("bad_frame", 0) <= limit // len(big)
    finally:
        await own.stop()


@pytest.mark.one_loop
@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_a_client_that_publishes_then_closes_gets_every_ack(remote, transport):
    """Publications in flight at the broker when the client finishes (FIN on TCP, a close
    frame on WebSocket): their acks still come, in order, before the server closes. (The
    frame handler has returned for each: the framework waits for what the hub still owes.)"""
    n = 50
    async with hub_server(transport, broker=remote) as hub:
        pub = await hub.greeted()
        frames = [{"op": "pub", "room": "r", "data": i, "ref": i} for i in range(n)]
        if transport == "tcp":
            await pub.send_raw(lines(frames), newline=False)
            pub.writer.write_eof()
            got = await pub.closed()
        else:
            for f in frames:
                await pub.send(f)
            closing = asyncio.ensure_future(pub.ws.close())
            got = await pub.closed()
            await asyncio.wait_for(closing, WAIT)
            assert pub.close_code == 1000
        assert [(f["op"], f["ref"]) for f in got] == [("ok", i) for i in range(n)]
        assert [f["seq"] for f in got] == list(range(1, n + 1))


@pytest.mark.one_loop
async def test_a_failed_publication_is_answered_in_its_place():
    """A publication the broker fails after a later one of the same connection was acked (it
    was in another room's batch): its error comes first, then the later one's ack."""
    from wirehub.hub.broker import BrokerError

    class HoldsFirst(RedisBroker):
        """Answers the first publication only when the test says, and then with a failure."""

        held = None

        def hold(self, future, k):
            if self.held is None:
                self.held = future.get_loop().create_future()
                return self.held, k
            return future, k

        def publish_batched_nowait(self, *args, **kwargs):  # (the hub's publications come here, or
            return self.hold(*super().publish_batched_nowait(*args, **kwargs))

        def publish_batched_now(self, *args):  # here: the canonical pub, taken by its bytes)
            return self.hold(*super().publish_batched_now(*args))

    prefix = f"wht{uuid.uuid4().hex[:12]}"
    broker = HoldsFirst(REDIS_URL, prefix=prefix)
    try:
        async with hub_server("tcp", broker=broker) as hub:
            pub = await hub.greeted()
            await pub.send_raw(lines([{"op": "pub", "room": "a", "data": 1, "ref": 1}, {"op": "pub", "room": "b", "data": 2, "ref": 2}]), newline=False)
            await wait_for(lambda: broker.held is not None and broker.in_flight == 0, timeout=WAIT, what="the second publication to be answered")
            broker.held.set_exception(BrokerError("cannot publish to 'a': refused"))
            first = await pub.recv()
            assert (first["op"], first["ref"]) == ("error", 1), first
            await pub.expect("ok", ref=2, seq=1)
    finally:
        await drop_redis(prefix)
