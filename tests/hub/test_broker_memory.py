"""The embedded memory broker: the shared conformance suite, plus what only it promises."""

from __future__ import annotations

import msgspec
import pytest

from wirehub.hub.broker.base import HistoryPolicy, Member
from wirehub.hub.broker.memory import MemoryBroker

from .broker_conformance import BrokerConformance, FakeClock, RecordingHandler


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
