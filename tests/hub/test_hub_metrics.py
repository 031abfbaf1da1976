"""The hub's metrics in ``/metrics``, scraped with prometheus_client's parser while clients
connect, join, publish, recover and fail to authenticate; node heartbeats through Redis."""

from __future__ import annotations

import asyncio
import socket
import uuid

import aiohttp
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from wirehub.config import load
from wirehub.hub import Hub
from wirehub.hub.broker.redis import RedisBroker

from ..helpers import WAIT
from ..server.test_admin_query import Line, _until

ROUNDS = 20  # publications per client while the metrics are scraped


async def scrape(http: aiohttp.ClientSession, hub: Hub) -> dict[tuple[str, tuple], float]:
    async with http.get("http://" + hub.addresses["admin"][0] + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_hub_metrics_under_load():
    secret = "k" * 32
    async with Hub(tcp="127.0.0.1:0", ws="127.0.0.1:0", udp="off", admin="127.0.0.1:0", secret=secret) as hub, aiohttp.ClientSession() as http:
        good = jwt.encode({"sub": "ann", "exp": 4102444800}, secret, algorithm="HS256")
        expired = jwt.encode({"sub": "bob", "exp": 1000}, secret, algorithm="HS256")
        forged = jwt.encode({"sub": "eve", "exp": 4102444800}, "x" * 32, algorithm="HS256")
        host, _, port = hub.addresses["tcp"][0].rpartition(":")

        async def client(token: str) -> Line:
            reader, writer = await asyncio.open_connection(host, int(port))
            c = Line(reader, writer)
            await c.send({"op": "hello", "token": token})
            return c

        members = []
        for _ in range(4):
            c = await client(good)
            c.id = (await c.expect("welcome"))["client"]
            await c.send({"op": "join", "room": "load"})
            await c.expect("joined")
            members.append(c)
        for token, _reason in ((expired, "expired"), (forged, "signature"), ("not-a-jwt", "malformed")):
            c = await client(token)
            assert (await c.expect("error"))["code"] == "unauthorized"
            c.close()

        async def publish(c: Line) -> None:
            for i in range(ROUNDS):
                await c.send({"op": "pub", "room": "load", "data": i, "ref": i})

        load = asyncio.gather(*(publish(c) for c in members))
        during = await scrape(http, hub)  # while the load runs
        await load
        for c in members:  # every publication reached every member
            for _ in range(ROUNDS * len(members)):
                await c.expect("msg")
        # one recovers, one cannot (the epoch changed)
        first = members[0]
        await first.send({"op": "leave", "room": "load"})
        await first.expect("left")
        await first.send({"op": "join", "room": "load", "since": ROUNDS, "epoch": (await _epoch(http, hub))})
        assert (await first.expect("joined"))["recovered"] is True
        await first.send({"op": "leave", "room": "load"})
        await first.expect("left")
        await first.send({"op": "join", "room": "load", "since": 1, "epoch": "another"})
        assert (await first.expect("joined"))["recovered"] is False
        await first.send({"op": "pub", "room": "load", "data": "\u0000", "ref": "x"})  # fine data: a string
        await first.send({"op": "frobnicate"})
        assert (await first.expect("error"))["code"] == "unknown_op"
        members[1].close()
        await asyncio.wait_for(_until(lambda: len(hub.app.sessions) == 3), WAIT)

        after = await scrape(http, hub)
        assert value(during, "wirehub_hub_members") >= 1
        assert value(after, "wirehub_hub_rooms") == 1 and value(after, "wirehub_hub_members") == 3
        assert value(after, "wirehub_hub_sessions") == 3
        assert value(after, "wirehub_hub_publications_total", outcome="published") == ROUNDS * len(members) + 1
        assert value(after, "wirehub_hub_publications_total", outcome="refused") == 0
        assert value(after, "wirehub_hub_joins_total") == 4 + 2
        assert value(after, "wirehub_hub_leaves_total") == 2 + 1  # two leaves, one disconnect
        assert value(after, "wirehub_hub_recoveries_total", outcome="recovered") == 1
        assert value(after, "wirehub_hub_recoveries_total", outcome="epoch_changed") == 1
        assert value(after, "wirehub_hub_recoveries_total", outcome="not_in_history") == 0
        for reason in ("expired", "signature", "malformed"):
            assert value(after, "wirehub_hub_auth_failures_total", reason=reason) == 1, reason
        assert value(after, "wirehub_hub_errors_sent_total", code="unauthorized") == 3
        assert value(after, "wirehub_hub_errors_sent_total", code="unknown_op") == 1
        assert value(after, "wirehub_broker_up") == 1
        assert value(after, "wirehub_connections", transport="tcp") == 3
        assert value(after, "wirehub_frames_in_total") >= ROUNDS * len(members)
        # bounded cardinality: no label names a room or a client
        names = {labels for (_, labels) in after}
        assert not any(v in ("load",) or v in {c.id for c in members} for labels in names for _, v in labels)
        for c in members:
            c.close()


async def _epoch(http: aiohttp.ClientSession, hub: Hub) -> str:
    async with http.get("http://" + hub.addresses["admin"][0] + "/api/rooms/load") as r:
        return (await r.json())["epoch"]


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.mark.skipif(not _redis_up(), reason="Redis is not reachable at 127.0.0.1:6379")
async def test_nodes_hear_each_other_through_redis_and_broker_calls_are_timed():
    prefix = f"whm{uuid.uuid4().hex[:10]}"
    url = "redis://127.0.0.1:6379/11"
    config = load(env={}, flags=dict(tcp="127.0.0.1:0", ws="off", udp="off", admin="127.0.0.1:0", broker=url))
    async with Hub(config, broker=RedisBroker(url, prefix=prefix, node_id="a" + prefix)) as one, \
            Hub(config, broker=RedisBroker(url, prefix=prefix, node_id="b" + prefix)) as two, aiohttp.ClientSession() as http:
        c = await Line.open(two, rooms=("r",))
        await asyncio.wait_for(_until(lambda: len(one.app.telemetry.node_rows()) == 2 and any(
            n["connections"] == 1 for n in one.app.telemetry.node_rows())), WAIT)
        samples = await scrape(http, one)
        assert value(samples, "wirehub_nodes_up") == 2 and value(samples, "wirehub_broker_up") == 1
        assert value(samples, "wirehub_broker_call_seconds_count", op="room_event") >= 1
        live = await one.app.live(one.server)
        assert {n["self"] for n in live["nodes"]} == {True, False} and "redis://" in live["nodes_note"]
        samples = await scrape(http, two)
        assert value(samples, "wirehub_broker_call_seconds_count", op="subscribe") >= 2  # the room and the nodes
        c.close()
    client = __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
