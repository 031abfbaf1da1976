"""Presence by room size (hub/presence.py, docs/hub.md "Presence in big rooms"), over real
TCP sockets: one join/leave frame per change in small rooms, one ``presence_diff`` per window
above ``presence_threshold``, nothing above ``presence_max`` (queries still answer), the mode
in ``joined``, and across two nodes on Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from wirehub.hub.broker.redis import RedisBroker
from wirehub.hub.presence import DIFF_FRAME_BYTES, diff_frames

from ..helpers import WAIT, addr
from .hubclient import hub_server
from .test_broker_redis import URL as REDIS_URL
from .test_broker_redis import drop_prefix as drop_redis


def clients_of(frames: list[dict], key: str) -> list[str]:
    return [m["client"] for f in frames for m in f[key]]


async def leave(c, room: str) -> None:
    """Leave ``room``, skipping the presence frames that came before the ``left``."""
    await c.send({"op": "leave", "room": room})
    while (frame := await c.recv())["op"] != "left":
        assert frame["op"] == "presence_diff", frame


async def diff_with(c, key: str, client: str, timeout: float = WAIT) -> dict:
    """The next presence_diff that lists ``client`` in ``key``; earlier diffs (a client's own
    join comes back to it in a diff) are skipped."""
    while True:
        frame = await c.recv(timeout)
        assert frame["op"] == "presence_diff", frame
        if client in clients_of([frame], key):
            return frame


async def test_small_room_gets_one_frame_per_change():
    async with hub_server("tcp", presence_threshold=2) as h:
        a, b = await h.greeted(name="Ann"), await h.greeted(name="Bob")
        assert (await a.join("r"))["presence"] == "events"
        assert (await b.join("r"))["presence"] == "events"
        assert await a.recv() == {"op": "join", "room": "r", "client": b.client_id, "user": b.user, "name": "Bob"}
        await b.request({"op": "leave", "room": "r"}, "left")
        assert await a.recv() == {"op": "leave", "room": "r", "client": b.client_id, "user": b.user, "name": "Bob"}
        assert await a.barrier() == []


async def test_room_above_the_threshold_gets_diffs_and_says_so():
    async with hub_server("tcp", presence_threshold=1, presence_window="2s") as h:
        a, b = await h.greeted(name="Ann"), await h.greeted(name="Bob")
        assert (await a.join("r"))["presence"] == "events"
        assert (await b.join("r"))["presence"] == "diff"  # 2 members > 1
        member_b = {"client": b.client_id, "user": b.user, "name": "Bob"}
        # the room's switch is announced in the frame that carries the change that made it
        switch = {"op": "presence_diff", "room": "r", "joins": [member_b], "leaves": [], "presence": "diff"}
        assert await a.recv() == switch
        assert await b.recv() == switch  # a diff may list the receiving client itself
        # the next change comes within the window: it waits for the window's end (2 s)
        c = await h.greeted(name="Cy")
        assert (await c.join("r"))["presence"] == "diff"
        assert await a.barrier() == []
        diff = await a.recv(timeout=WAIT + 2)
        assert diff == {"op": "presence_diff", "room": "r", "joins": [{"client": c.client_id, "user": c.user, "name": "Cy"}], "leaves": []}


async def test_a_window_coalesces_many_joins_into_one_frame_per_member():
    n, window = 60, 1.0
    async with hub_server("tcp", presence_threshold=0, presence_window=f"{window}s") as h:
        watcher = await h.greeted()
        assert (await watcher.join("r"))["presence"] == "diff"
        started = time.monotonic()
        joiners = []
        for _ in range(n):
            c = await h.greeted()
            await c.join("r")
            joiners.append(c)
        elapsed = time.monotonic() - started
        own = await watcher.recv()  # its own join, at once: the room was quiet
        assert own["op"] == "presence_diff" and clients_of([own], "joins") == [watcher.client_id]
        frames = []
        while len(clients_of(frames, "joins")) < n:
            frame = await watcher.recv(timeout=WAIT + window)
            assert frame["op"] == "presence_diff", frame
            frames.append(frame)
        assert sorted(clients_of(frames, "joins")) == sorted(c.client_id for c in joiners)
        # the first change goes at once (the room was quiet), then one frame per window
        assert len(frames) <= 2 + elapsed / window, (len(frames), elapsed)
        # the last joiner got the diffs since it joined: itself at least, one frame a window
        last = joiners[-1]
        await diff_with(last, "joins", last.client_id, timeout=WAIT + window)

        # a join then a leave within one window cancel out; a leave is one entry
        gone = joiners[0]
        await leave(gone, "r")
        brief = await h.greeted()
        await brief.join("r")
        await leave(brief, "r")
        frames = [await watcher.recv(timeout=WAIT + window)]
        if not frames[0]["leaves"]:  # the leave went at the start of a window, alone
            frames.append(await watcher.recv(timeout=WAIT + window))
        assert clients_of(frames, "leaves") == [gone.client_id]
        assert brief.client_id not in clients_of(frames, "joins") + clients_of(frames, "leaves")


async def test_room_above_max_sends_no_presence_but_answers_queries():
    async with hub_server("tcp", presence_max=2) as h:
        a, b, c, d = [await h.greeted(name=n) for n in ("a", "b", "c", "d")]
        assert (await a.join("r"))["presence"] == "events"
        assert (await b.join("r"))["presence"] == "events"
        await a.expect("join", client=b.client_id)
        assert (await c.join("r"))["presence"] == "query"  # 3 members > 2
        # one last frame says so (with the window's changes: none, c's join is not sent)
        stop = {"op": "presence_diff", "room": "r", "joins": [], "leaves": [], "presence": "query"}
        assert await a.recv() == stop and await b.recv() == stop
        assert (await d.join("r"))["presence"] == "query"
        assert await a.barrier() == [] and await b.barrier() == []
        members = (await a.request({"op": "presence", "room": "r"}, "presence"))["members"]
        assert sorted(m["name"] for m in members) == ["a", "b", "c", "d"]
        # shrinking: back to events only well below the boundary (no flapping at it)
        await leave(d, "r")
        await leave(c, "r")  # 2 members: still query
        assert await a.barrier() == []
        await leave(b, "r")  # 1 member
        assert await a.recv() == {"op": "presence_diff", "room": "r", "joins": [], "leaves": [], "presence": "events"}
        await a.expect("leave", client=b.client_id)  # events from then on
        e = await h.greeted(name="e")
        assert (await e.join("r"))["presence"] == "events"
        await a.expect("join", client=e.client_id)


async def test_presence_off_is_the_mode_off():
    async with hub_server("tcp", rooms=["quiet.*:presence=off", "big.*:presence_threshold=0"]) as h:
        for room, mode in (("quiet.1", "off"), ("big.1", "diff"), ("other", "events")):
            assert (await (await h.greeted()).join(room))["presence"] == mode


@pytest.mark.one_loop
async def test_a_room_of_2000_filling_sends_o_n_frames():
    """Per-event presence would send n(n-1)/2 = 2M frames here; by size it is O(n)."""
    n, threshold, top, window = 2000, 50, 500, 0.5
    async with hub_server("tcp", presence_threshold=threshold, presence_max=top, presence_window=f"{window}s") as h:
        host, port = addr(h.server, "tcp")
        streams = []
        started = time.monotonic()
        for batch in range(0, n, 100):
            opened = await asyncio.gather(*(asyncio.open_connection(host, port, limit=1 << 24) for _ in range(100)))
            for _, writer in opened:
                writer.write(b'{"op":"join","room":"big"}\n')
            for reader, _ in opened:
                assert json.loads(await asyncio.wait_for(reader.readline(), WAIT))["op"] == "joined"
            streams.extend(opened)
        elapsed = time.monotonic() - started
        assert elapsed < 60, elapsed
        presence = 0
        for reader, writer in streams:
            writer.write(b'{"op":"ping","ref":"end"}\n')
        for reader, writer in streams:
            while (line := await asyncio.wait_for(reader.readline(), WAIT + window)) != b'{"op":"pong","ref":"end"}\n':
                assert json.loads(line)["op"] in ("join", "presence_diff"), line
                presence += 1
        for _, writer in streams:
            writer.close()
        # events up to `threshold` members, a frame a window per member up to `top`, then
        # one (the switch) for those who were there; never per join to every member
        bound = threshold * threshold + top * (elapsed / window + 3) + n
        assert presence <= bound, (presence, bound, elapsed)
        assert presence < n * (n - 1) / 2 / 50


def test_a_big_window_is_split_into_frames_clients_accept():
    entry = json.dumps({"client": "x" * 16, "user": "anon-" + "x" * 16, "name": None}).encode()
    frames = diff_frames(b'"r"', [entry] * 3000, [entry] * 10, "diff")
    assert all(len(f) <= DIFF_FRAME_BYTES + 200 for f in frames) and len(frames) > 1
    decoded = [json.loads(f) for f in frames]
    assert sum(len(f["joins"]) for f in decoded) == 3000 and sum(len(f["leaves"]) for f in decoded) == 10
    assert decoded[0]["presence"] == "diff" and all("presence" not in f for f in decoded[1:])


@pytest.mark.one_loop
async def test_a_join_on_one_node_reaches_the_other_nodes_members_as_a_diff():
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    try:
        async with hub_server("tcp", broker=RedisBroker(REDIS_URL, prefix=prefix), presence_threshold=0) as node_a, \
                hub_server("tcp", broker=RedisBroker(REDIS_URL, prefix=prefix), presence_threshold=0) as node_b:
            here, there = await node_b.greeted(name="on-b"), await node_a.greeted(name="on-a")
            assert (await here.join("r"))["presence"] == "diff"
            assert (await there.join("r"))["presence"] == "diff"
            diff = await diff_with(here, "joins", there.client_id)
            assert diff == {"op": "presence_diff", "room": "r", "joins": [{"client": there.client_id, "user": there.user, "name": "on-a"}], "leaves": []}
            await there.close()
            gone = await diff_with(here, "leaves", there.client_id, timeout=WAIT + 1)
            assert gone["joins"] == []
            # a node whose room is small gets the other node's diff as join/leave events
            async with hub_server("tcp", broker=RedisBroker(REDIS_URL, prefix=prefix)) as node_c:
                small = await node_c.greeted()
                assert (await small.join("r"))["presence"] == "events"
                newcomer = await node_a.greeted(name="new")
                await newcomer.join("r")
                assert await small.recv() == {"op": "join", "room": "r", "client": newcomer.client_id, "user": newcomer.user, "name": "new"}
    finally:
        await drop_redis(prefix)


async def past_presence(c, command: dict, op: str) -> dict:
    """Send ``command`` and return the reply ``op``, skipping the presence frames before it."""
    await c.send(command)
    while (frame := await c.recv())["op"] != op:
        assert frame["op"] in ("join", "leave", "presence_diff"), frame
    return frame


def fleet_broker(kind: str, prefix: str):
    """A broker of ``kind`` for one node of a fleet sharing ``prefix``, and how to drop it."""
    if kind == "redis":
        return RedisBroker(REDIS_URL, prefix=prefix), drop_redis
    from wirehub.hub.broker.nats import NatsBroker

    from .test_broker_nats import URL as NATS_URL  # (skips the test when NATS is not there)
    from .test_broker_nats import drop_prefix as drop_nats

    return NatsBroker(NATS_URL, prefix=prefix, storage="memory"), drop_nats


@pytest.mark.one_loop
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_a_room_has_the_fleets_mode_on_a_node_with_few_of_its_members(kind):
    """A handover in small: node A holds most of a room, node B gets its first member. B
    takes the room's mode from every node's members, so A's coalesced diffs reach B's member
    as diffs (before, B counted its own single member, put the room in ``events`` mode and
    split every diff into a frame per change), and the mode follows the fleet down again."""
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    window = 1.0
    rooms = [f"big.*:presence_threshold=3,presence_max=100,presence_window={window}s", "huge.*:presence_threshold=1,presence_max=3"]
    broker_a, drop = fleet_broker(kind, prefix)
    try:
        async with hub_server("tcp", broker=broker_a, rooms=rooms) as node_a, \
                hub_server("tcp", broker=fleet_broker(kind, prefix)[0], rooms=rooms) as node_b:
            on_a = [await node_a.greeted() for _ in range(5)]
            for c in on_a:
                for room in ("big.r", "huge.r"):
                    await past_presence(c, {"op": "join", "room": room}, "joined")
            # B has no member of either room yet: its first joiner gets the fleet's mode
            b1 = await node_b.greeted(name="on-b")
            assert (await b1.join("huge.r"))["presence"] == "query"  # 5 on A > presence_max 3
            assert (await b1.join("big.r"))["presence"] == "diff"  # 5 on A > presence_threshold 3
            await diff_with(b1, "joins", b1.client_id, timeout=WAIT + window)  # its own join, as a diff

            # more joins on A, faster than a window: B's member gets them as diffs, coalesced
            started = time.monotonic()
            more = [await node_a.greeted() for _ in range(3)]
            for c in more:
                await past_presence(c, {"op": "join", "room": "big.r"}, "joined")
            elapsed = time.monotonic() - started
            frames: list[dict] = []
            while not {c.client_id for c in more} <= set(clients_of(frames, "joins")):
                frame = await b1.recv(timeout=WAIT + window)
                assert frame["op"] == "presence_diff" and frame["room"] == "big.r", frame  # never split into join frames
                frames.append(frame)
            assert len(frames) <= 2 + elapsed / window, (len(frames), elapsed)

            # A's members leave: the fleet's room is small again, B's member is told, and
            # the next change comes to it as an event
            for c in on_a + more:
                await past_presence(c, {"op": "leave", "room": "big.r"}, "left")
            while (frame := await b1.recv(timeout=WAIT + window)).get("presence") != "events":
                assert frame["op"] == "presence_diff", frame
            assert frame["op"] == "presence_diff"
            newcomer = await node_a.greeted(name="new")
            assert (await newcomer.join("big.r"))["presence"] == "events"
            while (frame := await b1.recv(timeout=WAIT + window))["op"] == "leave":
                pass  # the last of A's leaves, as events now
            assert frame == {"op": "join", "room": "big.r", "client": newcomer.client_id, "user": newcomer.user, "name": "new"}
    finally:
        await drop(prefix)


@pytest.mark.one_loop
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_a_join_storm_costs_a_node_one_count_read_per_window(kind):
    """The fleet's count is read from the broker when the changes heard may have moved the
    room's mode: at most once per window however many join, and not at all once the mode is
    certain (a room far above presence_max)."""
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    window, n = 0.5, 40
    rooms = [f"storm.*:presence_threshold=5,presence_max=20,presence_window={window}s"]
    broker_a, drop = fleet_broker(kind, prefix)
    broker_b = fleet_broker(kind, prefix)[0]
    reads = []
    count = broker_b.presence_count

    async def counting(room: str) -> int:
        reads.append(room)
        return await count(room)

    broker_b.presence_count = counting
    try:
        async with hub_server("tcp", broker=broker_a, rooms=rooms) as node_a, \
                hub_server("tcp", broker=broker_b, rooms=rooms) as node_b:
            watcher = await node_b.greeted()
            assert (await watcher.join("storm.r"))["presence"] == "events"
            assert reads == ["storm.r"]  # the first join here reads the fleet's count
            started = time.monotonic()
            joiners = [await node_a.greeted() for _ in range(n)]
            for c in joiners:
                await past_presence(c, {"op": "join", "room": "storm.r"}, "joined")
            # the watcher is told each mode in turn, then nothing: the room is in query mode
            modes = []
            while not modes or modes[-1] != "query":
                frame = await watcher.recv(timeout=WAIT + window)
                assert frame["op"] in ("join", "presence_diff"), frame
                if "presence" in frame:
                    modes.append(frame["presence"])
            elapsed = time.monotonic() - started
            assert modes == ["diff", "query"]
            assert len(reads) <= 2 + elapsed / window, (len(reads), elapsed)
            # every node agrees on the mode: the last joiner on A and a new one on B
            assert (await past_presence(await node_a.greeted(), {"op": "join", "room": "storm.r"}, "joined"))["presence"] == "query"
            assert (await past_presence(await node_b.greeted(), {"op": "join", "room": "storm.r"}, "joined"))["presence"] == "query"
    finally:
        await drop(prefix)
