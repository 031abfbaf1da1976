"""Recovery after a reconnect (SPEC.md: ``join`` with ``since``/``epoch``): the missed
messages that history still holds come right after ``joined``, in order, with no gap and no
duplicate, then live ones; otherwise ``recovered`` is false and nothing is replayed.

Every test runs on every transport. The concurrency test also runs the hub on its ``async``
path, with a broker whose calls yield to the event loop as a remote broker's would, so that
publications really do land in the middle of a join.
"""

from __future__ import annotations

import asyncio

import pytest

from wirehub.config import load
from wirehub.hub.broker.memory import MemoryBroker

from ..helpers import WAIT
from .hubclient import HubClient, hub_server


async def publish(p: HubClient, room: str, values) -> list[int]:
    """Publish each value from ``p`` (not a member) and return the seqs from the oks."""
    seqs = []
    for v in values:
        await p.send({"op": "pub", "room": room, "data": v, "ref": v})
        seqs.append((await p.expect("ok", ref=v))["seq"])
    return seqs


async def test_missed_messages_are_replayed_in_order_then_live(hub):
    async with hub() as h:
        p = await h.greeted(name="publisher")
        c = await h.greeted()
        joined = await c.join("r")
        epoch = joined["epoch"]
        await publish(p, "r", [1, 2, 3])
        live = [await c.expect("msg", seq=s) for s in (1, 2, 3)]
        await h.drop(c)  # gone; the room goes on without it
        await publish(p, "r", [4, 5, 6, 7, 8])

        c2 = await h.greeted()
        await c2.send({"op": "join", "room": "r", "since": 3, "epoch": epoch, "ref": "re"})
        assert await c2.recv() == {"op": "joined", "room": "r", "seq": 8, "epoch": epoch, "recovered": True, "presence": "events", "ref": "re"}
        replay = [await c2.recv() for _ in range(5)]
        assert [(m["op"], m["seq"], m["data"]) for m in replay] == [("msg", s, s) for s in range(4, 9)]
        assert all(m["room"] == "r" and m["from"] == p.client_id for m in replay)
        # what was replayed is what was sent live: the same frames, ts included
        await c2.send({"op": "history", "room": "r"})
        assert (await c2.expect("history"))["messages"] == live + replay
        await publish(p, "r", [9])
        await c2.expect("msg", seq=9, data=9)
        assert await c2.barrier() == []


async def test_since_older_than_history_is_not_recovered(hub):
    async with hub(history_size=3) as h:
        p = await h.greeted()
        c = await h.greeted()
        epoch = (await c.join("r"))["epoch"]
        await publish(p, "r", [1, 2])
        await c.expect("msg", seq=1)
        await c.expect("msg", seq=2)
        await h.drop(c)
        await publish(p, "r", list(range(3, 11)))  # history now holds 8..10 only

        c2 = await h.greeted()
        assert await c2.join("r", since=2, epoch=epoch) == {
            "op": "joined", "room": "r", "seq": 10, "epoch": epoch, "recovered": False, "presence": "events",
        }
        assert await c2.barrier() == []  # no replay, not even of what history still holds
        await publish(p, "r", [11])
        await c2.expect("msg", seq=11)
        # the edge: history holds 9..11, so since=8 is covered and since=7 is not
        c3 = await h.greeted()
        assert (await c3.join("r", since=8, epoch=epoch))["recovered"] is True
        assert [(await c3.expect("msg"))["seq"] for _ in range(3)] == [9, 10, 11]
        c4 = await h.greeted()
        assert (await c4.join("r", since=7, epoch=epoch))["recovered"] is False
        assert await c4.barrier() == []


async def test_wrong_epoch_is_not_recovered(hub):
    async with hub() as h:
        p = await h.greeted()
        c = await h.greeted()
        epoch = (await c.join("r"))["epoch"]
        await publish(p, "r", [1, 2, 3])
        c2 = await h.greeted()
        joined = await c2.join("r", since=1, epoch=epoch + "-other")
        assert joined == {"op": "joined", "room": "r", "seq": 3, "epoch": epoch, "recovered": False, "presence": "events"}
        assert await c2.barrier() == []


async def test_since_equal_to_the_current_seq_is_recovered_with_nothing_to_replay(hub):
    async with hub() as h:
        p = await h.greeted()
        c = await h.greeted()
        epoch = (await c.join("r"))["epoch"]
        await publish(p, "r", [1, 2, 3])
        c2 = await h.greeted()
        assert await c2.join("r", since=3, epoch=epoch) == {
            "op": "joined", "room": "r", "seq": 3, "epoch": epoch, "recovered": True, "presence": "events",
        }
        assert await c2.barrier() == []
        await publish(p, "r", [4])
        await c2.expect("msg", seq=4)
        # a brand-new room: since 0 is the current seq
        c3 = await h.greeted()
        joined = await c3.join("fresh", since=0)  # no epoch yet: nothing was ever seen there
        assert (joined["seq"], joined["recovered"]) == (0, True)


async def test_since_ahead_of_the_stream_is_not_recovered(hub):
    async with hub() as h:
        p = await h.greeted()
        c = await h.greeted()
        epoch = (await c.join("r"))["epoch"]
        await publish(p, "r", [1, 2])
        c2 = await h.greeted()
        joined = await c2.join("r", since=50, epoch=epoch)
        assert (joined["seq"], joined["recovered"]) == (2, False)
        assert await c2.barrier() == []


@pytest.mark.parametrize("transport", ["tcp"])
async def test_history_ttl_default_is_one_hour(hub):
    """The memory broker's clock is moved instead of waiting: a gap younger than an hour is
    recovered, an older one is not."""
    now = [1_000.0]
    broker = MemoryBroker(clock=lambda: now[0])
    async with hub(broker=broker) as h:
        p = await h.greeted()
        c = await h.greeted()
        epoch = (await c.join("r"))["epoch"]
        await publish(p, "r", [1, 2])
        now[0] = (await c.expect("msg", seq=1))["ts"] / 1000 + 3599  # history is read with this clock
        c2 = await h.greeted()
        assert (await c2.join("r", since=0, epoch=epoch))["recovered"] is True
        assert [(await c2.expect("msg"))["seq"] for _ in range(2)] == [1, 2]
        now[0] += 5  # both are now more than an hour old
        c3 = await h.greeted()
        assert (await c3.join("r", since=0, epoch=epoch))["recovered"] is False
        assert await c3.barrier() == []


class YieldingBroker(MemoryBroker):
    """The memory broker as a remote broker behaves: not ``local`` (so the hub handles frames
    in per-connection tasks and awaits every call) and every call gives the event loop a few
    turns before and after it runs, so other connections' publications interleave with a join."""

    local = False

    def __init__(self, turns: int = 3) -> None:
        super().__init__()
        self.turns = turns

    async def _turns(self) -> None:
        for _ in range(self.turns):
            await asyncio.sleep(0)

    async def publish(self, *args, **kw):
        await self._turns()
        return await super().publish(*args, **kw)

    async def subscribe(self, room):
        await self._turns()
        await super().subscribe(room)
        await self._turns()

    async def history(self, *args, **kw):
        await self._turns()
        result = await super().history(*args, **kw)
        await self._turns()  # publications that land now are not in this result
        return result

    async def position(self, room):
        await self._turns()
        result = await super().position(room)
        await self._turns()
        return result


@pytest.mark.parametrize("broker", ["memory", "yielding"])
async def test_publications_during_a_join_are_neither_lost_nor_duplicated(hub, transport, broker):
    """A publisher publishes in a tight loop; a member reads a while and goes; a new client
    re-joins with since/epoch while the publisher is still going. Its seqs must be exactly
    since+1 .. last: what history replays, what arrived during the join, then live."""
    total = 400
    async with hub(broker=YieldingBroker() if broker == "yielding" else None, max_errors=1000) as h:
        p = await h.greeted()
        c = await h.greeted()
        epoch = (await c.join("r"))["epoch"]
        published = 0
        oks: list[int] = []
        first_part, go = asyncio.Event(), asyncio.Event()

        async def publisher():
            # bursts of five pipelined pubs, then their five oks: tight, yet bounded in
            # flight (a UDP socket drops what its peer cannot take in time)
            nonlocal published
            while published < total:
                for _ in range(5):
                    published += 1
                    await p.send({"op": "pub", "room": "r", "data": published, "ref": published})
                for _ in range(5):
                    oks.append((await p.expect("ok"))["seq"])
                if published == 60:  # hold on until the re-join is about to go out
                    first_part.set()
                    await go.wait()

        pub_task = asyncio.ensure_future(publisher())
        try:
            seen = []
            while len(seen) < 20:
                seen.append((await c.expect("msg", room="r"))["seq"])
            assert seen == list(range(1, 21))
            since = seen[-1]
            await c.send({"op": "leave", "room": "r"})  # gone after seq `since` (it may have more queued)
            await asyncio.wait_for(first_part.wait(), WAIT)

            c2 = await h.greeted()
            go.set()  # the publisher carries on while the join is sent and handled
            at_join = published
            await c2.send({"op": "join", "room": "r", "since": since, "epoch": epoch})
            joined = await c2.expect("joined", room="r", epoch=epoch, recovered=True)
            assert since <= joined["seq"]
            seqs = []
            while not seqs or seqs[-1] < total:
                m = await c2.expect("msg", room="r")
                assert m["data"] == m["seq"], m  # one publisher, in order: data n is seq n
                seqs.append(m["seq"])
            assert at_join < total, "the publisher had finished before the join: no overlap tested"
            await asyncio.wait_for(pub_task, WAIT)
        finally:
            pub_task.cancel()
            await asyncio.gather(pub_task, return_exceptions=True)
        assert seqs == list(range(since + 1, total + 1)), _gaps(seqs, since + 1, total)
        assert [s for s in seqs if s <= joined["seq"]] == list(range(since + 1, joined["seq"] + 1))
        assert oks == list(range(1, total + 1))
        assert await c2.barrier() == []


def _gaps(seqs: list[int], first: int, last: int) -> str:
    missing = sorted(set(range(first, last + 1)) - set(seqs))
    dupes = sorted({s for s in seqs if seqs.count(s) > 1})
    return f"missing {missing[:20]} duplicated {dupes[:20]} (of {len(seqs)})"


# ---------------------------------------------------------------- per-room-pattern settings


async def test_room_patterns_override_the_defaults():
    """SPEC: defaults are configurable globally and per room pattern; the first pattern a
    room matches wins."""
    rules = ("quiet.*:presence=off,history_size=0", "big.*:history_size=50,max_room_members=1")
    async with hub_server("tcp", history_size=5, rooms=rules) as h:
        app = h.app
        assert (app.policy("lobby").history.size, app.policy("lobby").presence) == (5, True)
        assert (app.policy("quiet.a").history.size, app.policy("quiet.a").presence) == (0, False)
        assert (app.policy("big.x").history.size, app.policy("big.x").max_members) == (50, 1)
        a, b = await h.greeted(), await h.greeted()
        await a.join("quiet.a")
        await b.join("quiet.a")
        assert await a.barrier() == []  # no presence event for b's arrival
        await a.send({"op": "presence", "room": "quiet.a"})
        assert (await a.expect("presence"))["members"] == []
        for i in range(3):
            await a.send({"op": "pub", "room": "quiet.a", "data": i})
        assert [f["seq"] for f in await a.barrier()] == [1, 2, 3]  # delivered live, as a member
        await a.send({"op": "history", "room": "quiet.a"})
        assert (await a.expect("history"))["messages"] == []  # history_size 0 keeps nothing
        await a.join("big.x")
        assert [f["seq"] for f in await b.barrier()] == [1, 2, 3]
        await b.send({"op": "join", "room": "big.x"})
        await b.expect("error", code="room_full")


def test_room_patterns_may_hold_colons():
    """``doc:*:history_size=10``: the settings follow the last colon (examples/collab's rooms)."""
    config = load(env={}, flags={"rooms": ["doc:*:history_size=10", "awareness:*:presence=off,history_size=0"]})
    assert config.rooms == (("doc:*", (("history_size", 10),)), ("awareness:*", (("presence", False), ("history_size", 0))))
    env = load(env={"WIREHUB_ROOMS": "doc:*:history_size=10;awareness:*:presence=off"})
    assert [pattern for pattern, _ in env.rooms] == ["doc:*", "awareness:*"]
