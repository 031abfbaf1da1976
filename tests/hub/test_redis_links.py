"""The Redis broker's own connections (wirehub/hub/broker/_resp.py), against the real Redis:
commands of one event-loop turn leave in one write and are answered in order, a lost
connection fails what it carried (telling sent from unsent), URLs, and the publish path's
handling of a Redis that lost its scripts."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from wirehub.hub.broker._resp import CommandLink, Endpoint, LinkLost, ReplyError, SubscriberLink, encode, open_link
from wirehub.hub.broker.base import BrokerError

from .broker_conformance import POLICY, now_ms
from .test_broker_redis import HOST, PORT, URL, drop_prefix, started

ENDPOINT = Endpoint.from_url(URL)


class CountingWrites:
    """Stands in for a link's transport: counts its write calls (the socket is real)."""

    def __init__(self, link) -> None:
        self.writes = 0
        self._transport = link.transport
        link.transport = self

    def write(self, data) -> None:
        self.writes += 1
        self._transport.write(data)

    def __getattr__(self, name):
        return getattr(self._transport, name)


@pytest.fixture
async def link():
    link = CommandLink("test")
    await open_link(ENDPOINT, link, timeout=2.0, client_name="wirehub-test")
    yield link
    link.abort("test over")


def test_encode_is_a_resp_array_of_bulk_strings():
    assert encode((b"SET", "k", 12, b"")) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$0\r\n\r\n"
    assert encode(("é",)) == b"*1\r\n$2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError, match="not list"):
        encode(([1],))


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1:6379/3", Endpoint(host="127.0.0.1", port=6379, db=3)),
        ("redis://h", Endpoint(host="h")),
        ("redis://:pw@h:7000/1", Endpoint(host="h", port=7000, db=1, password="pw")),
        ("redis://u:p%40ss@h/0", Endpoint(host="h", username="u", password="p@ss")),
        ("rediss://h:6380/2?ssl_cert_reqs=none", Endpoint(host="h", port=6380, db=2, tls=True, verify=False)),
        ("unix:///run/redis.sock?db=4", Endpoint(path="/run/redis.sock", db=4)),
    ],
)
def test_endpoint_from_url(url, expected):
    assert Endpoint.from_url(url) == expected


@pytest.mark.parametrize("url", ["http://h", "redis://h/x", "unix://"])
def test_endpoint_refuses_what_is_not_a_redis_url(url):
    with pytest.raises(ValueError):
        Endpoint.from_url(url)


async def test_commands_of_one_turn_leave_in_one_write_and_are_answered_in_order(link):
    key = f"whtlink{uuid.uuid4().hex[:8]}"
    counter = CountingWrites(link)
    try:
        futures = [link.call(b"INCR", key) for _ in range(500)]
        assert link.pending == 500
        assert await asyncio.gather(*futures) == list(range(1, 501))
        assert counter.writes == 1
        assert link.pending == 0 and link.sent_at == 0.0
    finally:
        await link.call(b"DEL", key)


async def test_a_refused_command_fails_alone(link):
    key = f"whtlink{uuid.uuid4().hex[:8]}"
    try:
        ok1, bad, ok2 = link.call(b"SET", key, b"a"), link.call(b"INCR", key), link.call(b"GET", key)
        assert await ok1 == b"OK"
        with pytest.raises(ReplyError, match="not an integer"):
            await bad
        assert await ok2 == b"a"
    finally:
        await link.call(b"DEL", key)


async def test_a_caller_that_gave_up_does_not_shift_the_replies(link):
    slow = link.call(b"BLPOP", b"whtlink-never", b"0.2")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await slow
    assert await link.call(b"ECHO", b"mine") == b"mine"


async def test_a_lost_connection_fails_what_was_sent_and_what_was_not(link):
    admin = aioredis.Redis.from_url(URL)
    try:
        blocked = link.call(b"BLPOP", b"whtlink-never", b"0.3")  # written at the turn's end
        await asyncio.sleep(0)  # the flush runs
        clients = [c for c in await admin.client_list() if c["name"] == "wirehub-test"]
        for c in clients:
            await admin.client_kill_filter(_id=c["id"])
        with pytest.raises(LinkLost) as sent:
            await blocked
        assert sent.value.sent is True
        late = link.call(b"PING")
        with pytest.raises(LinkLost) as unsent:
            await late
        assert unsent.value.sent is False
        assert link.lost.done()
    finally:
        await admin.aclose()


async def test_a_callback_answer_gets_the_reply_or_the_error(link):
    got = []
    link.then(got.append, b"ECHO", b"x")
    link.then(got.append, b"NOSUCHCOMMAND")
    link.then(None, b"PING")  # not wanted: skipped, keeps the order
    assert await link.call(b"ECHO", b"last") == b"last"
    assert got[0] == b"x" and isinstance(got[1], ReplyError) and len(got) == 2


async def test_a_bad_password_is_refused_at_login():
    link = CommandLink("test")
    endpoint = Endpoint(host=HOST, port=PORT, password="wrong-password")
    with pytest.raises(ReplyError):
        await open_link(endpoint, link, timeout=2.0, client_name="wirehub-test")
    link.abort("test over")


async def test_a_subscriber_link_hands_over_everything_of_one_read_at_once():
    batches: list[list] = []
    sub = SubscriberLink("sub", batches.append)
    await open_link(ENDPOINT, sub, timeout=2.0, client_name="wirehub-test-sub")
    channel = f"whtlink{uuid.uuid4().hex[:8]}"
    link = CommandLink("pub")
    await open_link(ENDPOINT, link, timeout=2.0, client_name="wirehub-test-pub")
    try:
        sub.send(b"SUBSCRIBE", channel)
        while not batches:
            await asyncio.sleep(0.01)
        assert batches.pop(0) == [[b"subscribe", channel.encode(), 1]]
        # 200 publications in one pipeline: Redis sends them back-to-back
        await asyncio.gather(*(link.call(b"PUBLISH", channel, b"%d" % i) for i in range(200)))
        async with asyncio.timeout(2):
            while sum(len(b) for b in batches) < 200:
                await asyncio.sleep(0.01)
        messages = [m for b in batches for m in b]
        assert [m[2] for m in messages] == [b"%d" % i for i in range(200)]
        assert len(batches) < 200  # several per read, not one call per message
    finally:
        sub.abort("test over")
        link.abort("test over")


async def test_publish_after_redis_lost_its_scripts():
    """SCRIPT FLUSH on a live Redis: the publication that meets it is refused as not applied
    (the next ones, queued behind the reload, work); reads retry transparently."""
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    room = f"{prefix}:r"
    admin = aioredis.Redis.from_url(URL)
    try:
        async with started(URL, prefix, "a") as a:
            first = await a.broker.publish(room, b"1", sender="", ts=now_ms(), history=POLICY)
            await admin.script_flush()
            with pytest.raises(BrokerError, match="lost wirehub's scripts.*nothing was done") as refused:
                await a.broker.publish(room, b"2", sender="", ts=now_ms(), history=POLICY)
            assert refused.value.maybe_applied is False
            second = await a.broker.publish(room, b"3", sender="", ts=now_ms(), history=POLICY)
            assert (first.seq, second.seq) == (1, 2)
            await admin.script_flush()
            held = await a.broker.history(room, history=POLICY)
            assert [p.seq for p in held.publications] == [1, 2]
            # a lease removed in a turn's MULTI/EXEC (remove_client) whose script is gone
            await a.broker.add_client("c1")
            assert await admin.get(f"{prefix}:c:c1") == b"a"
            await admin.script_flush()
            await a.broker.remove_client("c1")
            assert await admin.get(f"{prefix}:c:c1") is None
    finally:
        await admin.aclose()
        await drop_prefix(prefix)


async def test_publications_of_one_turn_reach_redis_in_one_write():
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    try:
        async with started(URL, prefix, "a") as a:
            counter = CountingWrites(a.broker._cmd)
            futures = [a.broker.publish_nowait(f"{prefix}:r{i % 4}", b"%d" % i, sender="", ts=now_ms(), history=POLICY) for i in range(64)]
            assert a.broker.in_flight == 64
            pubs = await asyncio.gather(*futures)
            assert counter.writes == 1
            assert a.broker.in_flight == 0
            assert [p.seq for p in pubs] == [i // 4 + 1 for i in range(64)]
    finally:
        await drop_prefix(prefix)


def test_redis_version_is_read_from_info():
    from wirehub.hub.broker.redis import MIN_REDIS, _redis_version

    assert _redis_version(b"# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:0\r\n") == (7, 0)
    assert _redis_version(b"redis_version:6.0.9\r\n") < MIN_REDIS <= _redis_version(b"redis_version:6.2.0\r\n")
    assert _redis_version(b"# Server\r\n") == MIN_REDIS  # not said: assumed recent enough


async def test_a_publication_redis_refuses_uses_no_seq():
    """The script appends to the stream before it moves the seq: when the append fails (here
    the history key holds a string), nothing was written, the error says nothing was done,
    and the next publication takes the next seq: no hole for members or for history."""
    prefix = f"wht{uuid.uuid4().hex[:12]}"
    room = f"{prefix}:r"
    admin = aioredis.Redis.from_url(URL)
    try:
        async with started(URL, prefix, "a") as a:
            await a.broker.subscribe(room)
            first = await a.broker.publish(room, b"1", sender="", ts=now_ms(), history=POLICY)
            await admin.delete(f"{prefix}:h:{room}")
            await admin.set(f"{prefix}:h:{room}", "not a stream")
            with pytest.raises(BrokerError, match="refused") as refused:
                await a.broker.publish(room, b"2", sender="", ts=now_ms(), history=POLICY)
            assert refused.value.maybe_applied is False
            await admin.delete(f"{prefix}:h:{room}")
            second = await a.broker.publish(room, b"3", sender="", ts=now_ms(), history=POLICY)
            assert (first.seq, second.seq) == (1, 2)
            assert [p.seq for p in await a.handler.wait_publications(2, room)] == [1, 2]
    finally:
        await admin.aclose()
        await drop_prefix(prefix)
