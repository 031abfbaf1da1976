"""The embedded memory broker: the shared conformance suite, plus what only it promises."""

from __future__ import annotations

import asyncio
import tracemalloc

import msgspec
import pytest

from wirehub.hub.broker.base import HistoryPolicy, Member, Position
from wirehub.hub.broker import memory as memory_module
from wirehub.hub.broker.memory import PUB_OVERHEAD, ROOM_OVERHEAD, SWEEP_BATCH, MemoryBroker

from .broker_conformance import BrokerConformance, FakeClock, RecordingHandler, now_ms


class TestMemoryBroker(BrokerConformance):
    @pytest.fixture
    def broker(self):
        return MemoryBroker()

    @pytest.fixture
    def second_node(self):
        pytest.skip("memory broker is one process")

    # -- memory only ---------------------------------------------------------------------------
    async def test_a_room_never_published_to_is_forgotten_on_unsubscribe(self, broker, ns):
        room = f"{ns}:quiet"
        await broker.subscribe(room)
        before = await broker.position(room)
        await broker.unsubscribe(room)
        assert room not in await broker.rooms() and room not in broker._streams
        assert await broker.position(room) == before  # same epoch, still seq 0: nothing to recover

    async def test_is_local(self, broker):
        assert broker.local is True
        assert MemoryBroker.local is True

    async def test_epoch_differs_between_instances(self):
        one, two = MemoryBroker(), MemoryBroker()
        first = await one.publish("r", b"1", sender="", ts=0, history=HistoryPolicy())
        second = await two.publish("r", b"1", sender="", ts=0, history=HistoryPolicy())
        assert first.seq == second.seq == 1
        assert first.epoch != second.epoch
        assert (await one.position("r")).epoch != (await two.position("r")).epoch

    async def test_other_instance_epoch_means_incomplete_recovery_is_detectable(self):
        """A restarted process (a new instance) hands out a new epoch for the same room, which is
        how the hub tells a reconnecting client its ``since`` cannot be recovered."""
        before = MemoryBroker()
        for _ in range(3):
            await before.publish("r", b"1", sender="", ts=0, history=HistoryPolicy())
        old = await before.position("r")
        after = MemoryBroker()
        assert (await after.position("r")) != old

    async def test_ttl_drops_old_publications_on_read(self):
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        await broker.start(RecordingHandler())
        policy = HistoryPolicy(size=100, ttl=60.0)
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=policy)
        clock.advance(30)
        await broker.publish("r", b"2", sender="", ts=clock.ms(), history=policy)
        clock.advance(29)
        assert [p.seq for p in (await broker.history("r", history=policy)).publications] == [1, 2]
        clock.advance(2)  # seq 1 is 61 s old, seq 2 is 31 s old
        result = await broker.history("r", since=0, history=policy)
        assert [p.seq for p in result.publications] == [2]
        assert result.complete is False  # seq 1 is gone
        assert (await broker.history("r", since=1, history=policy)).complete is True
        clock.advance(30)  # both expired
        result = await broker.history("r", since=1, history=policy)
        assert result.publications == []
        assert result.complete is False
        assert result.position.seq == 2  # seq does not go back
        assert (await broker.history("r", since=2, history=policy)).complete is True

    async def test_ttl_drops_old_publications_on_write(self):
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        await broker.start(RecordingHandler())
        policy = HistoryPolicy(size=100, ttl=10.0)
        for _ in range(3):
            await broker.publish("r", b"1", sender="", ts=clock.ms(), history=policy)
        clock.advance(11)
        pub = await broker.publish("r", b"2", sender="", ts=clock.ms(), history=policy)
        assert pub.seq == 4
        # the write itself trimmed: a read with a longer TTL cannot bring 1..3 back
        longer = HistoryPolicy(size=100, ttl=3600.0)
        assert [p.seq for p in (await broker.history("r", history=longer)).publications] == [4]

    async def test_ttl_on_write_follows_the_oldest_held_through_trims_and_policy_changes(self):
        # A write looks at the oldest publication only when the horizon may have passed it:
        # that bound must follow the history through size trims, expiries and a new policy.
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        await broker.start(RecordingHandler())
        small = HistoryPolicy(size=2, ttl=10.0)
        for _ in range(3):  # seq 1 goes by size, 2 and 3 are held, written at t=0
            await broker.publish("r", b"1", sender="", ts=clock.ms(), history=small)
        clock.advance(6)
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=small)  # 4 at t=6: 2 goes by size
        clock.advance(5)  # t=11: 3 (t=0) expired, 4 (t=6) not
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=small)  # 5: 3 goes
        longer = HistoryPolicy(size=100, ttl=3600.0)
        assert [p.seq for p in (await broker.history("r", history=longer)).publications] == [4, 5]
        shorter = HistoryPolicy(size=100, ttl=2.0)  # a new policy is read at once
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=shorter)  # 6 at t=11: 4 (t=6) goes
        assert [p.seq for p in (await broker.history("r", history=longer)).publications] == [5, 6]

    async def test_ttl_on_write_after_the_clock_went_back(self):
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        await broker.start(RecordingHandler())
        policy = HistoryPolicy(size=100, ttl=10.0)
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=policy)  # 1 at t=0
        await broker.publish("r", b"1", sender="", ts=clock.ms() - 5000, history=policy)  # 2: the clock 5 s back
        clock.advance(12)  # t=12: 1 (t=0) and 2 (t=-5) expired
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=policy)
        longer = HistoryPolicy(size=100, ttl=3600.0)
        assert [p.seq for p in (await broker.history("r", history=longer)).publications] == [3]

    async def test_ttl_boundary_is_kept(self):
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        await broker.start(RecordingHandler())
        policy = HistoryPolicy(size=100, ttl=10.0)
        await broker.publish("r", b"1", sender="", ts=clock.ms(), history=policy)
        clock.advance(10)  # exactly ttl old: not older than ttl
        assert [p.seq for p in (await broker.history("r", history=policy)).publications] == [1]

    async def test_delivery_after_close_goes_nowhere(self):
        handler = RecordingHandler()
        broker = MemoryBroker()
        await broker.start(handler)
        await broker.subscribe("r")
        await broker.add_client("c1")
        await broker.close()
        pub = await broker.publish("r", b"1", sender="", ts=0, history=HistoryPolicy())
        assert pub.seq == 1
        assert await broker.send("c1", b"x") is False
        assert handler.publications == [] and handler.directs == []

    async def test_presence_add_again_replaces_the_entry(self, broker):
        await broker.presence_add("r", Member(client="c1", user="u", name="old"))
        await broker.presence_add("r", Member(client="c1", user="u", name="new"))
        assert await broker.presence("r") == [Member(client="c1", user="u", name="new")]

    async def test_raw_data_object_is_kept(self, broker):
        data = msgspec.Raw(b'{"a":[1,2]}')
        pub = await broker.publish("r", data, sender="", ts=0, history=HistoryPolicy())
        assert msgspec.json.encode(pub) == b'{"room":"r","seq":1,"epoch":"%s","data":{"a":[1,2]},"sender":"","ts":0}' % pub.epoch.encode()


# -- the total history budget, the sweep --------------------------------------------------------

BIG = HistoryPolicy(size=100, ttl=3600.0)


def cost(n_rooms: int, n_pubs: int, data_len: int) -> int:
    return n_rooms * ROOM_OVERHEAD + n_pubs * (data_len + PUB_OVERHEAD)


class TestHistoryBudget:
    def test_the_counted_overheads_cover_what_history_holds(self):
        """PUB_OVERHEAD and ROOM_OVERHEAD are at least what a held publication (beyond its
        data) and a room holding history take, measured as the hub makes them: the data a
        slice of the frame, the ts an int of its own."""
        broker = MemoryBroker(max_bytes=1 << 40)
        policy = HistoryPolicy(size=10_000, ttl=3600.0)
        frame = b'{"op":"pub","room":"r","data":"' + b"x" * 62 + b'"}'
        n, rooms, ts = 10_000, 500, now_ms()
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                broker.publish_seq_now("room", frame[30:94], "client-1", ts + i, policy)
            held = tracemalloc.get_traced_memory()[0]
            for i in range(rooms):
                broker.publish_seq_now(f"room-{i}", frame[30:94], "client-1", ts + i, policy)
            end = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        per_pub = (held - start) / n - 64
        assert 64 < per_pub <= PUB_OVERHEAD
        per_room = (end - held) / rooms - 64 - per_pub
        assert 0 < per_room <= ROOM_OVERHEAD
        assert broker.bytes == cost(rooms + 1, n + rooms, 64)

    async def test_bytes_count_what_is_held_and_return_to_zero(self):
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        for room in ("a", "b"):
            for _ in range(3):
                await broker.publish(room, b"12345", sender="", ts=clock.ms(), history=HistoryPolicy(size=2, ttl=10))
        assert broker.bytes == cost(2, 4, 5)  # size 2: the third of each room trimmed its first
        clock.advance(11)
        broker.sweep()
        assert broker.bytes == 0 and broker.rooms_held == {}

    async def test_least_recently_used_room_loses_its_history_first(self):
        broker = MemoryBroker(max_bytes=cost(3, 3, 10))
        for room in ("a", "b", "c"):
            await broker.publish(room, b"0123456789", sender="", ts=now_ms(), history=BIG)
        assert broker.evictions == 0
        await broker.history("a", history=BIG)  # a read is a use: "b" is now the oldest
        await broker.publish("d", b"0123456789", sender="", ts=now_ms(), history=BIG)
        assert broker.evictions == 1
        assert broker.bytes <= broker.max_bytes
        held = {r: len((await broker.history(r, history=BIG)).publications) for r in "abcd"}
        assert held == {"a": 1, "b": 0, "c": 1, "d": 1}

    async def test_budget_holds_under_a_flood_of_big_messages(self):
        budget = 200_000
        broker = MemoryBroker(max_bytes=budget)
        data = b"x" * 60_000
        for i in range(300):
            await broker.publish(f"r{i % 37}", data, sender="", ts=now_ms(), history=BIG)
            assert broker.bytes <= budget
        assert broker.evictions > 0
        assert sum(len(s.items) for s in broker._streams.values()) * len(data) <= budget

    async def test_one_room_over_the_budget_keeps_its_newest(self):
        broker = MemoryBroker(max_bytes=cost(1, 3, 100))
        for i in range(10):
            await broker.publish("r", b"%03d" % i + b"x" * 97, sender="", ts=now_ms(), history=BIG)
        result = await broker.history("r", since=0, history=BIG)
        assert [p.seq for p in result.publications] == [8, 9, 10]
        assert result.complete is False and result.position.seq == 10

    async def test_evicted_room_with_members_keeps_seq_and_epoch_and_reports_the_gap(self):
        broker = MemoryBroker(max_bytes=cost(1, 2, 1))
        await broker.start(RecordingHandler())
        await broker.subscribe("joined")
        first = await broker.publish("joined", b"1", sender="", ts=now_ms(), history=BIG)
        await broker.publish("other", b"1", sender="", ts=now_ms(), history=BIG)
        await broker.publish("other", b"2", sender="", ts=now_ms(), history=BIG)  # evicts "joined"
        assert broker.evictions == 1
        result = await broker.history("joined", since=0, history=BIG)
        assert result.publications == [] and result.complete is False  # recovered:false, not a gap
        assert result.position == Position(1, first.epoch)
        again = await broker.publish("joined", b"2", sender="", ts=now_ms(), history=BIG)
        assert (again.seq, again.epoch) == (2, first.epoch)
        await broker.close()

    async def test_evicted_room_without_members_is_forgotten_and_comes_back_under_a_new_epoch(self):
        broker = MemoryBroker(max_bytes=cost(1, 1, 1))
        old = [await broker.publish("gone", b"1", sender="", ts=now_ms(), history=BIG) for _ in range(1)][-1]
        await broker.publish("other", b"1", sender="", ts=now_ms(), history=BIG)  # evicts "gone"
        assert "gone" not in broker.rooms_held
        new = await broker.publish("gone", b"1", sender="", ts=now_ms(), history=BIG)
        assert new.seq == 1 and new.epoch != old.epoch
        # a client that saw seq 1 of the old stream cannot mistake the new one for it
        result = await broker.history("gone", since=old.seq, history=BIG)
        assert result.position.epoch != old.epoch

    async def test_budget_zero_keeps_no_history_but_seq_rises(self):
        broker = MemoryBroker(max_bytes=0)
        await broker.subscribe("r")
        pubs = [await broker.publish("r", b"1", sender="", ts=now_ms(), history=BIG) for _ in range(3)]
        assert [p.seq for p in pubs] == [1, 2, 3] and broker.bytes == 0


class TestSweep:
    async def test_expired_history_of_untouched_rooms_is_freed_by_the_sweep(self):
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        policy = HistoryPolicy(size=100, ttl=5.0)
        for i in range(2500):
            await broker.publish(f"r{i}", b"1", sender="", ts=clock.ms(), history=policy)
        await broker.subscribe("r0")  # has a member: its stream stays, its history goes
        assert len(broker.rooms_held) == 2500
        clock.advance(6)
        visited = []
        while True:
            visited.append(broker.sweep())
            if sum(visited) >= 2500:
                break
        assert max(visited) <= SWEEP_BATCH  # bounded work per tick
        assert broker.bytes == 0
        assert list(broker.rooms_held) == ["r0"]
        assert (await broker.history("r0", since=0, history=policy)).complete is False

    async def test_sweep_keeps_what_has_not_expired(self):
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        policy = HistoryPolicy(size=100, ttl=5.0)
        await broker.publish("old", b"1", sender="", ts=clock.ms(), history=policy)
        clock.advance(3)
        await broker.publish("new", b"1", sender="", ts=clock.ms(), history=policy)
        clock.advance(3)
        broker.sweep()
        assert set(broker.rooms_held) == {"new"}
        assert [p.seq for p in (await broker.history("new", history=policy)).publications] == [1]

    async def test_sweep_runs_by_itself(self, monkeypatch):
        monkeypatch.setattr(memory_module._impl, "SWEEP_INTERVAL", 0.01)  # the code's module (maybe compiled)
        clock = FakeClock()
        broker = MemoryBroker(clock=clock)
        await broker.start(RecordingHandler())
        try:
            policy = HistoryPolicy(size=100, ttl=1.0)
            for i in range(50):
                await broker.publish(f"r{i}", b"1", sender="", ts=clock.ms(), history=policy)
            clock.advance(2)
            deadline = asyncio.get_running_loop().time() + 5
            while broker.rooms_held and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert broker.rooms_held == {} and broker.bytes == 0
        finally:
            await broker.close()
        assert broker._sweeper is None

    async def test_empty_stream_without_subscriber_is_forgotten(self):
        broker = MemoryBroker()
        off = HistoryPolicy(size=0)
        await broker.publish("r", b"1", sender="", ts=now_ms(), history=off)
        assert "r" in broker.rooms_held  # seq 1 is kept until the sweep passes
        first = await broker.position("r")
        broker.sweep()
        assert "r" not in broker.rooms_held
        assert (await broker.position("r")).epoch != first.epoch

    async def test_reading_an_unknown_room_creates_nothing(self):
        broker = MemoryBroker()
        await broker.history("ghost", since=3, history=BIG)
        await broker.position("ghost")
        assert broker.rooms_held == {}
