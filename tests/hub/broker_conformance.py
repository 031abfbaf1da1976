"""The conformance suite every broker backend passes (memory, Redis, NATS).

A backend's test module subclasses :class:`BrokerConformance` in a class whose name starts
with ``Test`` and provides two fixtures:

``broker``
    a fresh, *unstarted* broker instance (the suite starts it with a :class:`RecordingHandler`
    and closes it). The subclass tears down whatever backend state it created.
``second_node``
    another unstarted instance sharing ``broker``'s backend (a second hub node), or
    ``pytest.skip(...)`` when the backend has no such thing (memory).

Every delivery is awaited through :class:`RecordingHandler` (remote brokers deliver from a
reader task, later than ``publish`` returns); nothing assumes synchronous delivery and no
test sleeps. "Nothing arrives" is checked with a *fence*: after the action that must not
deliver, publish a marker to a room the node is subscribed to and await it; deliveries of one
node come through one ordered stream (one connection), so anything that would have arrived
has arrived by then. A backend where that does not hold overrides :meth:`BrokerConformance.fence`.

Rooms and client ids carry a per-test prefix (the ``ns`` fixture) so that backends whose
state outlives one test (a shared Redis) do not see other tests' rooms.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirehub.hub.broker.base import Broker, HistoryPolicy, HistoryResult, Member, Position, Publication

WAIT = 5.0  # the longest any delivery may take
POLICY = HistoryPolicy()  # the default: last 100 for an hour


def now_ms() -> int:
    return int(time.time() * 1000)



async def eventually(check, what: str, timeout: float = 5.0, interval: float = 0.02):
    """Poll the async ``check`` until it returns a truthy value (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)



class FakeClock:
    """An injectable ``time.time``: seconds, moved only by the test."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def ms(self) -> int:
        return int(self.now * 1000)

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingHandler:
    """A :class:`~wirehub.hub.broker.base.BrokerHandler` that records every call, in order.

    ``await handler.wait_until(predicate)`` (and the ``wait_*`` shorthands) returns as soon as
    the predicate holds, re-checking after each call; it fails after ``timeout`` seconds.
    """

    def __init__(self, timeout: float = WAIT) -> None:
        self.timeout = timeout
        self.publications: list[Publication] = []
        self.room_events: list[tuple[str, bytes, str]] = []  # (room, frame, exclude)
        self.directs: list[tuple[str, bytes]] = []
        self.states: list[bool] = []
        self._changed = asyncio.Event()

    # -- BrokerHandler ---------------------------------------------------------------------
    def on_publication(self, pub: Publication) -> None:
        self.publications.append(pub)
        self._changed.set()

    def on_room_event(self, room: str, frame: bytes, exclude: str = "") -> None:
        self.room_events.append((room, bytes(frame), exclude))
        self._changed.set()

    def on_direct(self, client: str, frame: bytes) -> None:
        self.directs.append((client, bytes(frame)))
        self._changed.set()

    def on_broker_state(self, up: bool) -> None:
        self.states.append(up)
        self._changed.set()

    # -- awaiting --------------------------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], bool], what: str = "condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {self.timeout}s waiting for {what}; {self!r}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass  # loop once more: the predicate decides

    def in_room(self, room: str) -> list[Publication]:
        return [p for p in self.publications if p.room == room]

    async def wait_publications(self, n: int, room: str | None = None) -> list[Publication]:
        """The first ``n`` publications (of ``room``, when given) once that many arrived."""
        pick = (lambda: self.publications) if room is None else (lambda: self.in_room(room))
        await self.wait_until(lambda: len(pick()) >= n, f"{n} publication(s) in {room or 'any room'}")
        return pick()[:n]

    async def wait_room_events(self, n: int) -> list[tuple[str, bytes, str]]:
        await self.wait_until(lambda: len(self.room_events) >= n, f"{n} room event(s)")
        return self.room_events[:n]

    async def wait_directs(self, n: int) -> list[tuple[str, bytes]]:
        await self.wait_until(lambda: len(self.directs) >= n, f"{n} direct frame(s)")
        return self.directs[:n]

    def __repr__(self) -> str:
        return (
            f"RecordingHandler(publications={[(p.room, p.seq) for p in self.publications]}, "
            f"room_events={self.room_events}, directs={self.directs}, states={self.states})"
        )


@dataclass
class Node:
    """A started broker instance and the handler it calls back."""

    broker: Broker
    handler: RecordingHandler


def raw(value: Any) -> bytes:
    return msgspec.json.encode(value)


class BrokerConformance:
    """The shared suite. Subclasses provide the ``broker`` and ``second_node`` fixtures."""

    # -- fixtures ----------------------------------------------------------------------------
    @pytest.fixture
    def ns(self) -> str:
        """A prefix unique to this test, for room names and client ids."""
        return f"t{uuid.uuid4().hex[:10]}"

    @pytest.fixture(autouse=True)
    async def handler(self, broker) -> Any:
        """``broker`` started with a fresh recording handler; closed after the test."""
        recorder = RecordingHandler()
        await broker.start(recorder)
        try:
            yield recorder
        finally:
            await broker.close()

    @pytest.fixture
    async def node_b(self, second_node) -> Any:
        """The second node, started with its own handler."""
        recorder = RecordingHandler()
        await second_node.start(recorder)
        try:
            yield Node(second_node, recorder)
        finally:
            await second_node.close()

    # -- helpers -----------------------------------------------------------------------------
    async def fence(self, broker: Broker, handler: RecordingHandler, ns: str, via: Broker | None = None) -> None:
        """Return once every delivery to ``handler`` caused by what came before has arrived.

        Sends a marker publication (to a room ``broker`` subscribes to) and a marker direct
        frame (to a client ``broker`` holds), both from ``via`` (default ``broker``), and
        awaits both, so that the publication and the direct paths are both flushed.
        """
        tag = uuid.uuid4().hex[:6]
        room, client = f"{ns}:fence:{tag}", f"{ns}-fence-{tag}"
        await broker.subscribe(room)
        await broker.add_client(client)
        sender = via or broker
        await sender.publish(room, b'"fence"', sender="", ts=now_ms(), history=POLICY)
        assert await sender.send(client, b'"fence"') is True
        await handler.wait_publications(1, room)
        await handler.wait_until(lambda: (client, b'"fence"') in handler.directs, "the fence's direct frame")
        handler.directs.remove((client, b'"fence"'))
        await broker.unsubscribe(room)
        await broker.remove_client(client)

    async def publish_n(self, broker: Broker, room: str, n: int, history: HistoryPolicy = POLICY) -> list[Publication]:
        return [await broker.publish(room, raw(i), sender="c1", ts=now_ms(), history=history) for i in range(1, n + 1)]

    # -- basics ------------------------------------------------------------------------------
    async def test_ready_after_start(self, broker):
        assert broker.ready() is True
        assert isinstance(broker.local, bool)

    # -- seq and epoch -----------------------------------------------------------------------
    async def test_position_of_new_room_is_seq_0(self, broker, ns):
        pos = await broker.position(f"{ns}:r")
        assert isinstance(pos, Position)
        assert pos.seq == 0
        assert isinstance(pos.epoch, str) and pos.epoch

    async def test_epoch_before_first_publish_stays_the_same(self, broker, ns):
        room = f"{ns}:r"
        before = await broker.position(room)
        pub = await broker.publish(room, b"1", sender="c1", ts=now_ms(), history=POLICY)
        after = await broker.position(room)
        assert pub.epoch == before.epoch
        assert after == Position(1, before.epoch)

    async def test_seq_starts_at_1_and_rises_by_1(self, broker, ns):
        room = f"{ns}:r"
        pubs = await self.publish_n(broker, room, 5)
        assert [p.seq for p in pubs] == [1, 2, 3, 4, 5]
        assert len({p.epoch for p in pubs}) == 1
        assert await broker.position(room) == Position(5, pubs[0].epoch)

    async def test_seq_is_independent_per_room(self, broker, ns):
        a, b = f"{ns}:a", f"{ns}:b"
        seqs = []
        for room in [a, b, a, a, b, a]:
            pub = await broker.publish(room, b"0", sender="", ts=now_ms(), history=POLICY)
            seqs.append((room, pub.seq))
        assert seqs == [(a, 1), (b, 1), (a, 2), (a, 3), (b, 2), (a, 4)]
        assert (await broker.position(a)).seq == 4
        assert (await broker.position(b)).seq == 2

    async def test_seq_rises_even_with_history_off(self, broker, ns):
        room = f"{ns}:r"
        pubs = await self.publish_n(broker, room, 3, HistoryPolicy(size=0))
        assert [p.seq for p in pubs] == [1, 2, 3]
        assert (await broker.position(room)).seq == 3

    # -- the publication ---------------------------------------------------------------------
    @pytest.mark.parametrize("data", [b'{"a":[1,2]}', b'"x"', b"null", b"0", b'[]', b'{"s":"\xc3\xa9\\u00e9 \\n"}'])
    async def test_publish_returns_the_publication(self, broker, ns, data):
        room = f"{ns}:r"
        ts = now_ms()
        pub = await broker.publish(room, data, sender="client-7", ts=ts, history=POLICY)
        pos = await broker.position(room)
        assert isinstance(pub, Publication)
        assert bytes(pub.data) == data
        assert (pub.room, pub.seq, pub.epoch, pub.sender, pub.ts) == (room, 1, pos.epoch, "client-7", ts)

    async def test_publish_from_backend_has_empty_sender(self, broker, ns):
        pub = await broker.publish(f"{ns}:r", b"1", sender="", ts=now_ms(), history=POLICY)
        assert pub.sender == ""

    async def test_publish_accepts_raw_data(self, broker, ns):
        """The hub decodes a ``pub`` frame's data as ``msgspec.Raw`` and may pass it on as is."""
        data = msgspec.Raw(b'{"a":[1,2]}')
        pub = await broker.publish(f"{ns}:r", data, sender="c", ts=now_ms(), history=POLICY)
        assert bytes(pub.data) == b'{"a":[1,2]}'
        history = await broker.history(f"{ns}:r", history=POLICY)
        assert [bytes(p.data) for p in history.publications] == [b'{"a":[1,2]}']

    async def test_publication_data_is_raw_json(self, broker, ns):
        """``Publication.data`` is declared ``msgspec.Raw`` ("the JSON of the data value"): a
        Publication encodes with its data embedded as JSON, not as a base64 string of bytes."""
        data = b'{"a":[1,2]}'
        room = f"{ns}:r"
        pub = await broker.publish(room, data, sender="c", ts=now_ms(), history=POLICY)
        (held,) = (await broker.history(room, history=POLICY)).publications
        for p in (pub, held):
            assert isinstance(p.data, msgspec.Raw)
            assert msgspec.json.decode(msgspec.json.encode(p))["data"] == {"a": [1, 2]}

    # -- delivery ----------------------------------------------------------------------------
    async def test_subscribed_node_gets_every_publication_in_order(self, broker, handler, ns):
        room = f"{ns}:r"
        await broker.subscribe(room)
        sent = await self.publish_n(broker, room, 20)
        got = await handler.wait_publications(20, room)
        assert got == sent
        assert [p.seq for p in got] == list(range(1, 21))

    # -- publications in flight together (publish_nowait) -------------------------------------
    async def test_publish_nowait_applies_in_call_order(self, broker, handler, ns):
        """Many publications started in one turn, to several rooms, without awaiting each:
        every room's seq follows the call order, delivery and history agree, and in_flight
        counts them until they are answered."""
        rooms = [f"{ns}:a", f"{ns}:b", f"{ns}:c"]
        for room in rooms:
            await broker.subscribe(room)
        futures = [
            (rooms[i % 3], i, broker.publish_nowait(rooms[i % 3], raw(i), sender="c", ts=now_ms(), history=POLICY))
            for i in range(300)
        ]
        assert broker.in_flight <= 300
        pubs = await asyncio.wait_for(asyncio.gather(*(f for _, _, f in futures)), WAIT)
        assert broker.in_flight == 0
        for room in rooms:
            mine = [(i, p) for (r, i, _), p in zip(futures, pubs) if r == room]
            assert [p.seq for _, p in mine] == list(range(1, 101))
            assert [bytes(p.data) for _, p in mine] == [bytes(raw(i)) for i, _ in mine]
            assert await handler.wait_publications(100, room) == [p for _, p in mine]
            assert (await broker.history(room, history=POLICY)).publications == [p for _, p in mine]

    async def test_delivered_publication_carries_data_exactly(self, broker, handler, ns):
        room = f"{ns}:r"
        await broker.subscribe(room)
        payloads = [b'{"a":[1,2]}', b'"x"', b"null"]
        for data in payloads:
            await broker.publish(room, data, sender="s", ts=now_ms(), history=POLICY)
        got = await handler.wait_publications(3, room)
        assert [bytes(p.data) for p in got] == payloads
        assert {p.sender for p in got} == {"s"}

    async def test_unsubscribed_room_delivers_nothing(self, broker, handler, ns):
        await self.publish_n(broker, f"{ns}:quiet", 3)
        await broker.room_event(f"{ns}:quiet", b'{"op":"join"}')
        await self.fence(broker, handler, ns)
        assert handler.in_room(f"{ns}:quiet") == []
        assert handler.room_events == []

    async def test_unsubscribe_stops_delivery(self, broker, handler, ns):
        room = f"{ns}:r"
        await broker.subscribe(room)
        await self.publish_n(broker, room, 2)
        await handler.wait_publications(2, room)
        await broker.unsubscribe(room)
        await broker.publish(room, b"3", sender="", ts=now_ms(), history=POLICY)
        await broker.room_event(room, b'{"op":"leave"}')
        await self.fence(broker, handler, ns)
        assert [p.seq for p in handler.in_room(room)] == [1, 2]
        assert handler.room_events == []

    async def test_resubscribe_resumes_delivery(self, broker, handler, ns):
        room = f"{ns}:r"
        await broker.subscribe(room)
        await broker.unsubscribe(room)
        await broker.publish(room, b"1", sender="", ts=now_ms(), history=POLICY)
        await broker.subscribe(room)
        await broker.publish(room, b"2", sender="", ts=now_ms(), history=POLICY)
        got = await handler.wait_publications(1, room)
        assert [p.seq for p in got] == [2]

    async def test_rooms_do_not_mix(self, broker, handler, ns):
        a, b = f"{ns}:a", f"{ns}:b"
        await broker.subscribe(a)
        await broker.subscribe(b)
        for i in range(6):
            room = a if i % 3 else b
            await broker.publish(room, raw(i), sender="", ts=now_ms(), history=POLICY)
        got_a = await handler.wait_publications(4, a)
        got_b = await handler.wait_publications(2, b)
        assert [(p.room, p.seq, bytes(p.data)) for p in got_a] == [(a, 1, b"1"), (a, 2, b"2"), (a, 3, b"4"), (a, 4, b"5")]
        assert [(p.room, p.seq, bytes(p.data)) for p in got_b] == [(b, 1, b"0"), (b, 2, b"3")]
        await self.fence(broker, handler, ns)
        assert len(handler.publications) == 6 + 1  # plus the fence marker

    # -- room events -------------------------------------------------------------------------
    async def test_room_event_reaches_subscribed_node(self, broker, handler, ns):
        room = f"{ns}:r"
        await broker.subscribe(room)
        frame = b'{"op":"join","room":"r","client":"c1","user":"u"}'
        await broker.room_event(room, frame)
        assert await handler.wait_room_events(1) == [(room, frame, "")]

    async def test_room_event_carries_exclude(self, broker, handler, ns):
        """The broker passes ``exclude`` on; the node skips that client."""
        room = f"{ns}:r"
        await broker.subscribe(room)
        await broker.room_event(room, b'{"op":"join","client":"c1"}', exclude="c1")
        await broker.room_event(room, b'{"op":"leave","client":"c1"}')
        assert await handler.wait_room_events(2) == [
            (room, b'{"op":"join","client":"c1"}', "c1"),
            (room, b'{"op":"leave","client":"c1"}', ""),
        ]

    async def test_room_event_only_to_its_room(self, broker, handler, ns):
        a, b = f"{ns}:a", f"{ns}:b"
        await broker.subscribe(a)
        await broker.room_event(b, b'{"op":"join","n":1}')
        await broker.room_event(a, b'{"op":"join","n":2}')
        assert await handler.wait_room_events(1) == [(a, b'{"op":"join","n":2}', "")]
        await self.fence(broker, handler, ns)
        assert handler.room_events == [(a, b'{"op":"join","n":2}', "")]

    async def test_room_event_is_not_in_history(self, broker, handler, ns):
        room = f"{ns}:r"
        await broker.subscribe(room)
        await broker.publish(room, b"1", sender="", ts=now_ms(), history=POLICY)
        await broker.room_event(room, b'{"op":"leave"}')
        await handler.wait_room_events(1)
        result = await broker.history(room, history=POLICY)
        assert [p.seq for p in result.publications] == [1]
        assert result.position.seq == 1
        assert [p.seq for p in handler.in_room(room)] == [1]

    # -- history -----------------------------------------------------------------------------
    async def test_history_of_new_room_is_empty_and_complete(self, broker, ns):
        result = await broker.history(f"{ns}:r", since=0, history=POLICY)
        assert isinstance(result, HistoryResult)
        assert result.publications == []
        assert result.position.seq == 0
        assert result.complete is True

    async def test_history_holds_all_oldest_first(self, broker, ns):
        room = f"{ns}:r"
        sent = await self.publish_n(broker, room, 7)
        result = await broker.history(room, history=POLICY)
        assert result.publications == sent
        assert result.complete is True

    async def test_history_limit_returns_the_newest(self, broker, ns):
        room = f"{ns}:r"
        sent = await self.publish_n(broker, room, 10)
        result = await broker.history(room, limit=3, history=POLICY)
        assert result.publications == sent[-3:]
        assert [p.seq for p in result.publications] == [8, 9, 10]
        bigger = await broker.history(room, limit=50, history=POLICY)
        assert bigger.publications == sent

    async def test_history_limit_0_returns_nothing(self, broker, ns):
        room = f"{ns}:r"
        await self.publish_n(broker, room, 3)
        result = await broker.history(room, limit=0, history=POLICY)
        assert result.publications == []
        assert result.position.seq == 3

    @pytest.mark.parametrize("since", [0, 1, 4, 9, 10])
    async def test_history_since_returns_exactly_the_later_ones(self, broker, ns, since):
        room = f"{ns}:r"
        sent = await self.publish_n(broker, room, 10)
        result = await broker.history(room, since=since, history=POLICY)
        assert result.publications == sent[since:]
        assert [p.seq for p in result.publications] == list(range(since + 1, 11))
        assert result.complete is True

    async def test_history_since_with_limit(self, broker, ns):
        room = f"{ns}:r"
        await self.publish_n(broker, room, 10)
        result = await broker.history(room, since=2, limit=3, history=POLICY)
        assert [p.seq for p in result.publications] == [8, 9, 10]

    async def test_history_complete_when_since_is_current_seq(self, broker, ns):
        room = f"{ns}:r"
        await self.publish_n(broker, room, 4)
        result = await broker.history(room, since=4, history=POLICY)
        assert result.publications == []
        assert result.complete is True

    async def test_history_complete_when_since_is_current_seq_after_trimming(self, broker, ns):
        room = f"{ns}:r"
        small = HistoryPolicy(size=3)
        await self.publish_n(broker, room, 10, small)
        result = await broker.history(room, since=10, history=small)
        assert result.publications == []
        assert result.complete is True

    async def test_history_complete_from_0_when_nothing_trimmed(self, broker, ns):
        room = f"{ns}:r"
        sent = await self.publish_n(broker, room, 5)
        result = await broker.history(room, since=0, history=POLICY)
        assert result.publications == sent
        assert result.complete is True

    async def test_history_size_keeps_the_newest(self, broker, ns):
        room = f"{ns}:r"
        small = HistoryPolicy(size=3)
        sent = await self.publish_n(broker, room, 10, small)
        result = await broker.history(room, history=small)
        assert result.publications == sent[-3:]
        assert result.position.seq == 10

    async def test_history_incomplete_when_trimmed_past_since(self, broker, ns):
        room = f"{ns}:r"
        small = HistoryPolicy(size=3)
        await self.publish_n(broker, room, 10, small)
        result = await broker.history(room, since=2, history=small)
        assert result.complete is False
        # what is still held after `since` is still returned
        assert [p.seq for p in result.publications] == [8, 9, 10]

    async def test_history_complete_at_the_trim_edge(self, broker, ns):
        room = f"{ns}:r"
        small = HistoryPolicy(size=3)
        await self.publish_n(broker, room, 10, small)
        edge = await broker.history(room, since=7, history=small)  # 8, 9, 10 held: nothing missing
        assert (edge.complete, [p.seq for p in edge.publications]) == (True, [8, 9, 10])
        past = await broker.history(room, since=6, history=small)  # 7 is gone
        assert past.complete is False

    async def test_history_incomplete_when_since_is_ahead(self, broker, ns):
        room = f"{ns}:r"
        await self.publish_n(broker, room, 3)
        result = await broker.history(room, since=5, history=POLICY)
        assert result.publications == []
        assert result.complete is False
        empty = await broker.history(f"{ns}:new", since=1, history=POLICY)
        assert empty.complete is False

    async def test_history_size_0_keeps_nothing(self, broker, ns):
        room = f"{ns}:r"
        off = HistoryPolicy(size=0)
        await self.publish_n(broker, room, 4, off)
        result = await broker.history(room, history=off)
        assert result.publications == []
        assert result.position.seq == 4
        assert (await broker.history(room, since=4, history=off)).complete is True
        assert (await broker.history(room, since=3, history=off)).complete is False
        assert (await broker.history(room, since=0, history=off)).complete is False

    async def test_history_position_equals_position(self, broker, ns):
        room = f"{ns}:r"
        empty = await broker.history(room, history=POLICY)
        assert empty.position == await broker.position(room)
        await self.publish_n(broker, room, 3)
        result = await broker.history(room, since=1, limit=1, history=POLICY)
        assert result.position == await broker.position(room)
        assert result.position.seq == 3
        assert {p.epoch for p in result.publications} == {result.position.epoch}

    # -- presence ----------------------------------------------------------------------------
    async def test_presence_add_and_list(self, broker, ns):
        room = f"{ns}:r"
        alice = Member(client=f"{ns}-c1", user="alice", name="Alice")
        bob = Member(client=f"{ns}-c2", user="bob")
        assert await broker.presence(room) == []
        await broker.presence_add(room, alice)
        await broker.presence_add(room, bob)
        members = await broker.presence(room)
        assert sorted(members, key=lambda m: m.client) == [alice, bob]
        assert all(isinstance(m, Member) for m in members)

    async def test_presence_remove(self, broker, ns):
        room = f"{ns}:r"
        alice = Member(client=f"{ns}-c1", user="alice", name="Alice")
        bob = Member(client=f"{ns}-c2", user="bob")
        await broker.presence_add(room, alice)
        await broker.presence_add(room, bob)
        await broker.presence_remove(room, alice.client)
        assert await broker.presence(room) == [bob]
        await broker.presence_remove(room, bob.client)
        assert await broker.presence(room) == []

    async def test_presence_remove_of_absent_client_is_harmless(self, broker, ns):
        room = f"{ns}:r"
        alice = Member(client=f"{ns}-c1", user="alice")
        await broker.presence_remove(f"{ns}:nobody-here", "ghost")
        await broker.presence_add(room, alice)
        await broker.presence_remove(room, "ghost")
        await broker.presence_remove(room, alice.client)
        await broker.presence_remove(room, alice.client)
        assert await broker.presence(room) == []

    async def test_presence_rooms_are_isolated(self, broker, ns):
        a, b = f"{ns}:a", f"{ns}:b"
        alice = Member(client=f"{ns}-c1", user="alice")
        bob = Member(client=f"{ns}-c2", user="bob")
        await broker.presence_add(a, alice)
        await broker.presence_add(b, bob)
        assert await broker.presence(a) == [alice]
        assert await broker.presence(b) == [bob]
        await broker.presence_remove(a, bob.client)
        assert await broker.presence(b) == [bob]

    async def test_presence_same_client_in_two_rooms(self, broker, ns):
        a, b = f"{ns}:a", f"{ns}:b"
        alice = Member(client=f"{ns}-c1", user="alice", name="A")
        await broker.presence_add(a, alice)
        await broker.presence_add(b, alice)
        assert await broker.presence(a) == [alice]
        assert await broker.presence(b) == [alice]
        await broker.presence_remove(a, alice.client)
        assert await broker.presence(a) == []
        assert await broker.presence(b) == [alice]

    async def test_presence_count_is_what_presence_lists(self, broker, ns):
        room, other = f"{ns}:r", f"{ns}:other"
        assert await broker.presence_count(room) == 0
        for i in range(3):
            await broker.presence_add(room, Member(client=f"{ns}-c{i}", user="u"))
        await broker.presence_add(room, Member(client=f"{ns}-c0", user="u", name="again"))  # replaced, not added
        await broker.presence_add(other, Member(client=f"{ns}-c9", user="u"))
        assert await broker.presence_count(room) == len(await broker.presence(room)) == 3
        await broker.presence_remove(room, f"{ns}-c1")
        assert await broker.presence_count(room) == 2
        assert await broker.presence_count(other) == 1

    # -- direct messages ---------------------------------------------------------------------
    async def test_send_to_added_client(self, broker, handler, ns):
        client = f"{ns}-c1"
        await broker.add_client(client)
        frame = b'{"op":"msg","from":"c0","data":{"a":1}}'
        assert await broker.send(client, frame) is True
        assert await handler.wait_directs(1) == [(client, frame)]
        assert handler.publications == []

    async def test_send_to_unknown_client_is_false(self, broker, handler, ns):
        await broker.add_client(f"{ns}-c1")
        assert await broker.send(f"{ns}-nobody", b'{"op":"msg"}') is False
        await self.fence(broker, handler, ns)
        assert handler.directs == []

    async def test_send_to_removed_client_is_false(self, broker, handler, ns):
        client = f"{ns}-c1"
        await broker.add_client(client)
        await broker.remove_client(client)
        assert await broker.send(client, b'{"op":"msg"}') is False
        await broker.remove_client(client)  # twice: harmless
        await broker.remove_client(f"{ns}-never")
        await self.fence(broker, handler, ns)
        assert handler.directs == []

    async def test_send_reaches_only_the_addressed_client(self, broker, handler, ns):
        c1, c2 = f"{ns}-c1", f"{ns}-c2"
        await broker.add_client(c1)
        await broker.add_client(c2)
        assert await broker.send(c2, b'"two"') is True
        assert await broker.send(c1, b'"one"') is True
        got = await handler.wait_directs(2)
        assert got == [(c2, b'"two"'), (c1, b'"one"')]

    # -- rooms -------------------------------------------------------------------------------
    async def test_rooms_lists_rooms_with_streams_or_presence(self, broker, ns):
        streamed, present, both = f"{ns}:streamed", f"{ns}:present", f"{ns}:both"
        await broker.publish(streamed, b"1", sender="", ts=now_ms(), history=POLICY)
        await broker.presence_add(present, Member(client=f"{ns}-c1", user="u"))
        await broker.publish(both, b"1", sender="", ts=now_ms(), history=POLICY)
        await broker.presence_add(both, Member(client=f"{ns}-c2", user="u"))
        rooms = await broker.rooms()
        assert isinstance(rooms, list)
        mine = sorted(r for r in rooms if r.startswith(ns))
        assert mine == sorted([streamed, present, both])
        assert len(rooms) == len(set(rooms))

    async def test_rooms_forgets_presence_only_room_when_empty(self, broker, ns):
        room = f"{ns}:present"
        await broker.presence_add(room, Member(client=f"{ns}-c1", user="u"))
        await broker.presence_remove(room, f"{ns}-c1")
        assert room not in await broker.rooms()

    # -- the property: any sequence agrees with a simple model ---------------------------------
    # function_scoped_fixture: one broker serves every example, each example uses fresh rooms.
    # differing_executors: the suite runs once per event loop, on a new (stateless) instance.
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(
        size=st.integers(min_value=0, max_value=5),
        ops=st.lists(
            st.one_of(
                st.tuples(st.just("pub"), st.integers(0, 2), st.sampled_from([b"1", b'"x"', b"null", b'{"a":[1,2]}'])),
                # publications issued in one event-loop turn: one batch (one stream entry) on
                # Redis and NATS, so a since, a limit or the trim floor can fall inside one
                st.tuples(st.just("burst"), st.integers(0, 2), st.integers(2, 7)),
                st.tuples(st.just("history"), st.integers(0, 2), st.integers(0, 12), st.none() | st.integers(0, 6)),
            ),
            max_size=30,
        ),
    )
    async def test_matches_the_model(self, broker, size, ops):
        prefix = f"p{uuid.uuid4().hex[:10]}"  # fresh rooms for every example
        policy = HistoryPolicy(size=size)
        model: dict[str, list[Publication]] = {}
        epochs: dict[str, str] = {}

        def append(room: str, pub: Publication, data: bytes) -> None:
            stream = model[room]
            if size == 0 and pub.seq == 1 and epochs.get(room, pub.epoch) != pub.epoch:
                # a room that holds no history and has no subscriber may be forgotten (the
                # memory broker's sweep): it starts again at seq 1 under a new epoch
                stream.clear()
                epochs[room] = pub.epoch
            assert pub.seq == len(stream) + 1
            assert bytes(pub.data) == data
            assert epochs.setdefault(room, pub.epoch) == pub.epoch
            stream.append(pub)

        for op in ops:
            room = f"{prefix}:{op[1]}"
            stream = model.setdefault(room, [])
            if op[0] == "pub":
                append(room, await broker.publish(room, op[2], sender="m", ts=now_ms(), history=policy), op[2])
            elif op[0] == "burst":
                futures = [broker.publish_nowait(room, raw(k), sender="m", ts=now_ms(), history=policy) for k in range(op[2])]
                for k, pub in enumerate(await asyncio.gather(*futures)):
                    append(room, pub, raw(k))
            else:
                _, _, since, limit = op
                result = await broker.history(room, since=since, limit=limit, history=policy)
                if size == 0 and result.position.seq == 0 and epochs.get(room, result.position.epoch) != result.position.epoch:
                    stream.clear()  # forgotten, as above: it starts again
                    del epochs[room]
                seq = len(stream)
                held = stream[-size:] if size else []
                after = [p for p in held if p.seq > since]
                expected = after if limit is None else (after[-limit:] if limit else [])
                assert result.publications == expected
                assert result.position.seq == seq
                assert result.complete is (since <= seq and all(s in {p.seq for p in held} for s in range(since + 1, seq + 1)))
                if room in epochs:
                    assert result.position.epoch == epochs[room]

    # -- two nodes on one backend --------------------------------------------------------------
    async def test_publication_reaches_the_other_node(self, broker, handler, node_b, ns):
        room = f"{ns}:r"
        await node_b.broker.subscribe(room)
        sent = await self.publish_n(broker, room, 5)
        got = await node_b.handler.wait_publications(5, room)
        assert got == sent
        await self.fence(broker, handler, ns)
        assert handler.in_room(room) == []  # A never subscribed

    async def test_unsubscribed_other_node_gets_nothing(self, broker, handler, node_b, ns):
        room = f"{ns}:r"
        await self.publish_n(broker, room, 2)
        await broker.room_event(room, b'{"op":"join"}')
        await self.fence(node_b.broker, node_b.handler, ns, via=broker)
        assert node_b.handler.in_room(room) == []
        assert node_b.handler.room_events == []

    async def test_room_event_reaches_the_other_node(self, broker, node_b, ns):
        room = f"{ns}:r"
        await node_b.broker.subscribe(room)
        await broker.room_event(room, b'{"op":"join","client":"c1"}', exclude="c1")
        assert await node_b.handler.wait_room_events(1) == [(room, b'{"op":"join","client":"c1"}', "c1")]

    async def test_two_nodes_share_one_stream(self, broker, node_b, ns):
        room = f"{ns}:r"
        seqs = []
        for i in range(6):
            via = broker if i % 2 else node_b.broker
            seqs.append(await via.publish(room, raw(i), sender="", ts=now_ms(), history=POLICY))
        assert [p.seq for p in seqs] == [1, 2, 3, 4, 5, 6]
        assert len({p.epoch for p in seqs}) == 1
        assert await broker.position(room) == await node_b.broker.position(room)
        assert (await node_b.broker.history(room, since=2, history=POLICY)).publications == seqs[2:]

    async def test_presence_is_shared_between_nodes(self, broker, node_b, ns):
        room = f"{ns}:r"
        alice = Member(client=f"{ns}-c1", user="alice", name="Alice")
        await broker.presence_add(room, alice)
        assert await node_b.broker.presence(room) == [alice]
        await node_b.broker.presence_add(room, Member(client=f"{ns}-c2", user="bob"))
        assert await broker.presence_count(room) == await node_b.broker.presence_count(room) == 2  # every node's
        await node_b.broker.presence_remove(room, f"{ns}-c2")
        await node_b.broker.presence_remove(room, alice.client)
        assert await broker.presence(room) == []
        assert await broker.presence_count(room) == 0

    async def test_direct_send_reaches_the_other_node(self, broker, handler, node_b, ns):
        client = f"{ns}-c1"
        await node_b.broker.add_client(client)
        assert await broker.send(client, b'{"op":"msg","data":1}') is True
        assert await node_b.handler.wait_directs(1) == [(client, b'{"op":"msg","data":1}')]
        await node_b.broker.remove_client(client)
        assert await broker.send(client, b'{"op":"msg","data":2}') is False
        await self.fence(broker, handler, ns)
        assert handler.directs == []
