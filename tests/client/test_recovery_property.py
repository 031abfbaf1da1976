"""Property: whatever the interleaving of publications (from a backend and from clients),
joins, and connection drops (the server side aborting a client's connection), every client
ends up having received, for each room it is in, exactly the room's published sequence since
it joined — no gap, no duplicate, in order — as long as history covers the gaps.

Each generated schedule runs against a fresh in-process hub with a history large enough for
everything, 2–3 clients (each on TCP, WebSocket or a Unix socket) and 2–3 rooms, on asyncio's
loop and on uvloop. Waiting is on events, with timeouts; "turns" only let the loop run a few
callbacks so that drops land at different points of a reconnect."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
import pytest
import uvloop
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import wirehub.client as wc
from wirehub.client import ClientError
from wirehub.hub import Hub

from . import Collector, short_socket_path

KINDS = ("tcp", "ws", "unix")
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
SCENARIO_TIMEOUT = 30.0
WAIT = 10.0
CATCH_UP = 5.0  # for the last messages to arrive once every client is connected


@dataclasses.dataclass
class Scenario:
    rooms: list[str]
    kinds: list[str]
    initial: list[list[str]]  # rooms each client joins before the schedule starts
    ops: list[tuple]


@st.composite
def scenarios(draw) -> Scenario:
    n_clients = draw(st.integers(2, 3))
    rooms = [f"room{i}" for i in range(draw(st.integers(2, 3)))]
    kinds = [draw(st.sampled_from(KINDS)) for _ in range(n_clients)]
    initial = [sorted(draw(st.sets(st.sampled_from(rooms), min_size=0, max_size=len(rooms)))) for _ in range(n_clients)]
    client = st.integers(0, n_clients - 1)
    room = st.sampled_from(rooms)
    op = st.one_of(
        st.tuples(st.just("backend"), room),
        st.tuples(st.just("publish"), client, room),
        st.tuples(st.just("drop"), client),
        st.tuples(st.just("join"), client, room),
        st.tuples(st.just("turns"), st.integers(1, 30)),
        st.tuples(st.just("settle"), client),
    )
    ops = draw(st.lists(op, min_size=1, max_size=40))
    return Scenario(rooms, kinds, initial, ops)


class Participant:
    def __init__(self, index: int, client: wc.Client, starts: dict[str, int]) -> None:
        self.index = index
        self.client = client
        self.starts = starts  # room -> seq of the first `joined` (where its sequence starts)
        self.events = Collector(client)
        self.connected = asyncio.Event()
        self.connected.set()
        self.replayed: list[int] = []


async def play(sc: Scenario) -> None:
    hub = Hub(tcp="127.0.0.1:0", ws="127.0.0.1:0", udp="off", admin="off", unix=short_socket_path(), history_size=100_000)
    await hub.start()
    urls = {
        "tcp": f"tcp://{hub.addresses['tcp'][0]}",
        "ws": f"ws://{hub.addresses['ws'][0]}/",
        "unix": f"unix://{hub.addresses['unix'][0]}",
    }
    people: list[Participant] = []
    tasks: list[asyncio.Task] = []
    try:
        for i, kind in enumerate(sc.kinds):
            starts: dict[str, int] = {}

            replayed: list[int] = []

            def tap(frame: dict, starts: dict[str, int] = starts, replayed: list[int] = replayed) -> None:
                if frame.get("op") == "joined":
                    if frame["room"] not in starts:
                        starts[frame["room"]] = frame["seq"]
                    elif frame["recovered"]:
                        replayed.append(frame["seq"])  # the room's head at the re-join: > since means a replay

            client = await wc.connect(urls[kind], name=f"c{i}", backoff=(0.001, 0.02), timeout=WAIT, on_frame=tap)
            person = Participant(i, client, starts)
            person.replayed = replayed
            client._on_state = lambda state, reason, p=person: p.connected.set() if state == "connected" else p.connected.clear()
            people.append(person)
            for room in sc.initial[i]:
                await client.join(room)

        counter = 0

        async def publish(client: wc.Client, room: str, data: str) -> None:
            try:
                await client.publish(room, data)
            except (ClientError, asyncio.TimeoutError):
                pass  # dropped in flight: maybe published, maybe not; the hub's history says

        async def join(client: wc.Client, room: str) -> None:
            try:
                await client.join(room)
            except (ClientError, asyncio.TimeoutError):
                pass

        for op in sc.ops:
            kind = op[0]
            counter += 1
            if kind == "backend":
                await hub.publish(op[1], f"backend-{counter}")
            elif kind == "publish":
                p = people[op[1]]
                tasks.append(asyncio.ensure_future(publish(p.client, op[2], f"c{p.index}-{counter}")))
            elif kind == "join":
                tasks.append(asyncio.ensure_future(join(people[op[1]].client, op[2])))
            elif kind == "drop":
                client_id = people[op[1]].client.client_id
                for conn in hub.server.connections():
                    if conn.id == client_id:
                        conn.abort()
            elif kind == "turns":
                for _ in range(op[1]):
                    await asyncio.sleep(0)
            elif kind == "settle":
                await asyncio.wait_for(people[op[1]].connected.wait(), WAIT)
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

        # Every client catches up with every room it is in...
        finals = {room: (await hub.app.broker.position(room)).seq for room in sc.rooms}
        history = {}
        for room in sc.rooms:
            result = await hub.app.broker.history(room, history=hub.app.policy(room).history)
            history[room] = [(p.seq, msgspec.json.decode(p.data)) for p in result.publications]
            assert [s for s, _ in history[room]] == list(range(1, finals[room] + 1))
        for p in people:
            await asyncio.wait_for(p.connected.wait(), WAIT)
            for room in p.client.rooms:
                # (or give up at once on an event that already fails the property)
                await p.events.wait(
                    lambda room=room, p=p: (p.events.msgs(room) or [{"seq": p.starts[room]}])[-1]["seq"] >= finals[room]
                    or p.events.ended
                    or any(e["op"] in ("recovery_failed", "rejoin_failed") for e in p.events.events),
                    timeout=CATCH_UP,
                    what=f"client {p.index} to catch up with {room}",
                )
        # ... and has received exactly the room's sequence since it joined.
        for p in people:
            assert set(p.client.rooms) <= set(p.starts)
            for room in p.client.rooms:
                start = p.starts[room]
                got = [(m["seq"], m["data"]) for m in p.events.msgs(room)]
                assert got == history[room][start:], f"client {p.index} ({sc.kinds[p.index]}) in {room} from {start}"
            for room in set(sc.rooms) - set(p.client.rooms):
                assert not p.events.msgs(room)
            odd = [e for e in p.events.events if e["op"] in ("recovery_failed", "rejoin_failed")]
            assert not odd, odd
            assert p.events.error is None
        reconnects = sum(p.client.reconnects for p in people)
        event(f"reconnects: {'0' if not reconnects else '1-3' if reconnects <= 3 else '4+'}")
        event(f"recovered re-joins: {'yes' if any(p.replayed for p in people) else 'no'}")
    finally:
        for p in people:
            await p.client.close()
            await p.events.stop()
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(hub.stop(), WAIT)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_no_gap_no_duplicate_across_drops(loop_name, sc):
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(asyncio.wait_for(play(sc), SCENARIO_TIMEOUT))
