"""The hub client against an in-process hub, on every transport: requests and replies,
events, errors, presence/history, two clients, heartbeat, and the ways a connection ends
(kicked: stop; drained restart: reconnect with recovery_failed; dropped transport: reconnect
with exact recovery)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest

import wirehub.client as wc
from wirehub.client import ConnectError, Disconnected, HubError, backoff_delay, parse_url
from wirehub.hub import Hub
from wirehub.hub.auth import mint_token

from ..helpers import WAIT, wait_for
from . import STREAMS, TRANSPORTS, Collector, client_ssl, hub_options, listen_address, url_for

SECRET = "a-test-secret-that-is-long-enough-for-hs256-0123456789"
FAST = dict(backoff=(0.005, 0.05), timeout=5.0)


@contextlib.asynccontextmanager
async def running_hub(kind: str, certs, **extra):
    hub = Hub(**hub_options(kind, certs, **extra))
    await hub.start()
    try:
        yield hub
    finally:
        await asyncio.wait_for(hub.stop(), WAIT)


@contextlib.asynccontextmanager
async def client_of(hub: Hub, kind: str, certs, **options):
    opts = dict(FAST, ssl=client_ssl(kind, certs))
    opts.update(options)
    client = await wc.connect(url_for(hub, kind), **opts)
    try:
        yield client
    finally:
        await client.close()


def server_conn(hub: Hub, client_id: str):
    for conn in hub.server.connections():
        if conn.id == client_id:
            return conn
    raise AssertionError(f"no server connection {client_id}: {[c.id for c in hub.server.connections()]}")


@pytest.fixture
def certs(request):
    """TLS files only for the TLS transports (the others do not pay for key generation)."""
    kind = request.node.callspec.params.get("kind") if hasattr(request.node, "callspec") else None
    if kind in ("tls", "wss"):
        return request.getfixturevalue("tls_certs")
    return None


# ---------------------------------------------------------------------- basics, per transport


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_join_publish_receive(kind, certs):
    async with running_hub(kind, certs) as hub, client_of(hub, kind, certs, name="ada") as client:
        assert client.client_id and client.user == f"anon-{client.client_id}"
        assert client.server.startswith("wirehub/") and client.state == "connected"
        room = await client.join("lobby")
        assert (room.name, room.seq, room.joined) == ("lobby", 0, True)
        assert room.epoch
        seq = await client.publish("lobby", {"text": "hi", "n": [1, 2.5, None, True]})
        assert seq == 1
        event = await asyncio.wait_for(client.recv(), WAIT)
        assert event["op"] == "msg" and event["room"] == "lobby" and event["seq"] == 1
        assert event["from"] == client.client_id
        assert event["data"] == {"text": "hi", "n": [1, 2.5, None, True]}
        assert isinstance(event["ts"], int)
        pub = await hub.publish("lobby", "from the backend")
        event = await asyncio.wait_for(client.recv(), WAIT)
        assert (event["seq"], event["data"], event["from"]) == (pub.seq, "from the backend", "")
        assert room.seq == 2
        assert await room.publish(3) == 3
        assert (await asyncio.wait_for(client.recv(), WAIT))["data"] == 3
        assert await client.ping() >= 0
        await room.leave()
        assert not room.joined and "lobby" not in client.rooms
        await hub.publish("lobby", "not for us")
        await client.join("other")
        await hub.publish("other", "marker")
        event = await asyncio.wait_for(client.recv(), WAIT)
        assert (event["room"], event["data"]) == ("other", "marker")  # nothing from lobby after leaving


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_errors_raise_hub_error(kind, certs):
    async with running_hub(kind, certs) as hub, client_of(hub, kind, certs) as client:
        with pytest.raises(HubError) as info:
            await client.presence("nowhere")
        assert info.value.code == "not_member" and "nowhere" in info.value.message
        assert info.value.frame["op"] == "error"
        with pytest.raises(HubError) as info:
            await client.history("nowhere")
        assert info.value.code == "not_member"
        with pytest.raises(HubError) as info:
            await client.leave("nowhere")
        assert info.value.code == "not_member"
        with pytest.raises(HubError) as info:
            await client.send("no.such", "hello?")
        assert info.value.code == "no_such_client"
        with pytest.raises(HubError) as info:
            await client.request({"op": "pub", "room": 7, "data": 1})
        assert info.value.code == "bad_frame"
        with pytest.raises(HubError) as info:
            await client.request({"op": "teleport"})
        assert info.value.code == "unknown_op"
        with pytest.raises(HubError) as info:
            await client.join("x" * 201)
        assert info.value.code == "bad_frame"
        # the connection is still fine
        await client.join("ok")
        assert await client.publish("ok", 1) == 1
        assert client.reconnects == 0 and client.state == "connected"


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_presence_and_history(kind, certs):
    async with running_hub(kind, certs) as hub:
        async with client_of(hub, kind, certs, name="ada") as a, client_of(hub, kind, certs, name="bob") as b:
            await a.join("room")
            for i in range(5):
                await a.publish("room", i)
            await b.join("room")
            members = await b.presence("room")
            assert sorted((m["client"], m["name"]) for m in members) == sorted([(a.client_id, "ada"), (b.client_id, "bob")])
            assert {m["user"] for m in members} == {a.user, b.user}
            history = await b.history("room")
            assert [(m["seq"], m["data"]) for m in history] == [(i + 1, i) for i in range(5)]
            assert all(m["op"] == "msg" and m["room"] == "room" and m["from"] == a.client_id for m in history)
            assert [m["data"] for m in await b.history("room", limit=2)] == [3, 4]
            assert await b.history("room", limit=0) == []


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_two_clients_chat(kind, certs):
    async with running_hub(kind, certs) as hub:
        async with client_of(hub, kind, certs, name="ada") as a, client_of(hub, kind, certs, name="bob") as b:
            ea, eb = Collector(a), Collector(b)
            await a.join("chat")
            await b.join("chat")
            await ea.wait(lambda: any(e["op"] == "join" for e in ea.events), what="bob's join")
            join = next(e for e in ea.events if e["op"] == "join")
            assert join == {"op": "join", "room": "chat", "client": b.client_id, "user": b.user, "name": "bob"}
            await b.publish("chat", "hello ada")
            await a.publish("chat", "hello bob")
            for c in (ea, eb):
                await c.wait(lambda c=c: len(c.msgs("chat")) == 2, what="both messages")
                assert [(m["from"], m["data"]) for m in c.msgs("chat")] == [(b.client_id, "hello ada"), (a.client_id, "hello bob")]
            await a.send(b.client_id, {"private": True})
            await eb.wait(lambda: any(e["op"] == "msg" and "room" not in e for e in eb.events), what="the direct message")
            direct = [e for e in eb.events if e["op"] == "msg" and "room" not in e]
            assert direct == [{"op": "msg", "from": a.client_id, "data": {"private": True}}]
            await b.leave("chat")
            await ea.wait(lambda: any(e["op"] == "leave" for e in ea.events), what="bob's leave")
            assert [e for e in ea.events if e["op"] == "leave"][0]["client"] == b.client_id
            assert not any(e["op"] in ("join", "leave") for e in eb.events)  # no echo of our own presence
            await ea.stop()
            await eb.stop()


# ---------------------------------------------------------------------- how connections end


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_kicked_stops_and_iteration_says_why(kind, certs):
    async with running_hub(kind, certs) as hub, client_of(hub, kind, certs) as client:
        states = []
        client._on_state = lambda state, reason: states.append((state, reason))
        events = Collector(client)
        await client.join("lobby")
        await hub.publish("lobby", "before")
        await events.wait(lambda: events.msgs(), what="the message before the kick")
        assert hub.disconnect(client.client_id)
        await events.wait(lambda: events.ended, what="the end of the iteration")
        assert isinstance(events.error, Disconnected), events.error
        assert events.error.reason == "kicked" and "kicked" in str(events.error)
        assert [m["data"] for m in events.msgs()] == ["before"]  # what came first is still delivered
        assert states == [("closed", "kicked")]
        assert client.state == "closed" and client.reconnects == 0
        with pytest.raises(Disconnected) as info:
            await client.publish("lobby", "after")
        assert info.value.reason == "kicked"
        with pytest.raises(Disconnected):
            await client.recv()


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_reconnect_after_hub_restart_reports_recovery_failed(kind, certs):
    """The hub drains (bye shutdown, reconnect:true); a new hub binds the same address; the
    client reconnects and re-joins, but the new memory broker has a new epoch: the client
    says recovery_failed, then goes on with the new numbering."""
    states = []
    hub = Hub(**hub_options(kind, certs))
    await hub.start()
    where = listen_address(hub, kind)
    url = url_for(hub, kind)
    client = await wc.connect(url, ssl=client_ssl(kind, certs), on_state=lambda s, r: states.append((s, r)), **FAST)
    events = Collector(client)
    try:
        room = await client.join("lobby")
        first_id = client.client_id
        await hub.publish("lobby", "one")
        await hub.publish("lobby", "two")
        await events.wait(lambda: len(events.msgs()) == 2, what="two messages")
        old_epoch = room.epoch
        await asyncio.wait_for(hub.stop(), WAIT)
        hub = Hub(**hub_options(kind, certs, where=where))
        await hub.start()
        await events.wait(lambda: any(e["op"] == "recovery_failed" for e in events.events), what="recovery_failed")
        failed = [e for e in events.events if e["op"] == "recovery_failed"]
        assert failed == [{"op": "recovery_failed", "room": "lobby", "since": 2, "epoch": old_epoch, "seq": 0, "new_epoch": room.epoch}]
        assert room.epoch != old_epoch and room.seq == 0
        assert ("reconnecting", "shutdown") in states and states[-1] == ("connected", "shutdown")
        assert client.client_id != first_id and client.reconnects == 1
        pub = await hub.publish("lobby", "after the restart")
        assert pub.seq == 1
        await events.wait(lambda: len(events.msgs()) == 3, what="the message after the restart")
        assert [(m["seq"], m["data"]) for m in events.msgs()] == [(1, "one"), (2, "two"), (1, "after the restart")]
        assert await client.publish("lobby", "mine") == 2
    finally:
        await client.close()
        await events.stop()
        await asyncio.wait_for(hub.stop(), WAIT)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_reconnect_after_transport_drop_recovers_exactly(kind, certs):
    """The server side aborts the connection (no bye); messages published meanwhile are
    replayed from history after the reconnect: every seq once, in order. Over UDP nothing
    tells the client; its heartbeat (a presence probe) finds the session forgotten."""
    async with running_hub(kind, certs) as hub:
        frames: list[dict] = []
        states: list = []
        async with client_of(hub, kind, certs, heartbeat=0.05, on_frame=frames.append, on_state=lambda s, r: states.append((s, r))) as client:
            events = Collector(client)
            await client.join("a")
            await client.join("b")
            await hub.publish("a", "a1")
            await events.wait(lambda: len(events.msgs()) == 1, what="a1")
            first_id = client.client_id
            server_conn(hub, first_id).abort()
            # published while the client is away (it cannot have noticed yet: no await since)
            for i in range(2, 6):
                await hub.publish("a", f"a{i}")
            await hub.publish("b", "b1")
            await events.wait(lambda: len(events.msgs()) == 6, what="the replayed messages")
            assert [(m["room"], m["seq"], m["data"]) for m in events.msgs("a")] == [("a", i, f"a{i}") for i in range(1, 6)]
            assert [(m["seq"], m["data"]) for m in events.msgs("b")] == [(1, "b1")]
            assert client.reconnects == 1 and client.client_id != first_id
            assert ("reconnecting", "connection_lost") in states
            rejoined = [f for f in frames if f["op"] == "joined" and f.get("ref") is not None and f["recovered"]]
            assert sorted(f["room"] for f in rejoined) == ["a", "b"]
            assert not any(e["op"] in ("recovery_failed", "rejoin_failed") for e in events.events)
            # live again, and nothing more was queued (no duplicate hiding behind)
            await hub.publish("a", "a6")
            await events.wait(lambda: len(events.msgs()) == 7, what="a6")
            assert [m["seq"] for m in events.msgs("a")] == [1, 2, 3, 4, 5, 6]
            await events.stop()


@pytest.mark.parametrize("kind", ("tcp", "ws"))
async def test_requests_wait_for_the_reconnect(kind, certs):
    async with running_hub(kind, certs) as hub, client_of(hub, kind, certs, backoff=(0.1, 0.2)) as client:
        events = Collector(client)
        await client.join("r")
        server_conn(hub, client.client_id).abort()
        await wait_for(lambda: client.state == "reconnecting", what="the client to notice the drop")
        # issued while reconnecting: waits for the new session (and the re-join), then goes out
        seq = await client.publish("r", "while reconnecting")
        assert seq == 1 and client.reconnects == 1
        await events.wait(lambda: events.msgs(), what="the message")
        assert [m["data"] for m in events.msgs()] == ["while reconnecting"]
        await events.stop()


async def test_gap_on_a_live_connection_is_filled_from_history():
    """A frame the hub did not deliver (as when it drops frames for a slow consumer): the next
    message shows a gap, and the client re-joins from its last seq to fill it, in order."""
    async with running_hub("tcp", None) as hub, client_of(hub, "tcp", None) as client:
        events = Collector(client)
        await client.join("g")
        await hub.publish("g", 1)
        await events.wait(lambda: len(events.msgs()) == 1)
        members = hub.app.rooms["g"].members
        session = members.pop(client.client_id)  # the hub "loses" the next frame for this client
        await hub.publish("g", 2)
        members[client.client_id] = session
        await hub.publish("g", 3)
        await hub.publish("g", 4)
        await events.wait(lambda: len(events.msgs()) == 4, what="the filled gap")
        assert [(m["seq"], m["data"]) for m in events.msgs()] == [(1, 1), (2, 2), (3, 3), (4, 4)]
        assert client.reconnects == 0
        await hub.publish("g", 5)
        await events.wait(lambda: len(events.msgs()) == 5)
        assert [m["seq"] for m in events.msgs()] == [1, 2, 3, 4, 5]
        await events.stop()


async def test_close_ends_iteration_quietly_and_context_manager():
    async with running_hub("tcp", None) as hub:
        async with wc.connect(url_for(hub, "tcp"), **FAST) as client:
            await client.join("x")
            await hub.publish("x", "queued")
            await wait_for(lambda: client.rooms["x"].seq == 1, what="the message to arrive")
        assert client.state == "closed"
        assert [e["data"] async for e in client] == ["queued"]  # queued events, then a quiet end
        with pytest.raises(Disconnected) as info:
            await client.ping()
        assert info.value.reason == "closed"
        await wait_for(lambda: not hub.server.connections(), what="the server to see the close")


async def test_udp_close_leaves_rooms():
    async with running_hub("udp", None) as hub:
        watcher = await wc.connect(url_for(hub, "udp"), **FAST)
        other = await wc.connect(url_for(hub, "udp"), **FAST)
        events = Collector(watcher)
        await watcher.join("p")
        await other.join("p")
        await other.close()
        await events.wait(lambda: any(e["op"] == "leave" for e in events.events), what="the leave of the closed UDP client")
        assert [m["client"] for m in await watcher.presence("p")] == [watcher.client_id]
        await events.stop()
        await watcher.close()


# ---------------------------------------------------------------------- heartbeat


async def test_heartbeat_keeps_an_idle_connection_open():
    async with running_hub("tcp", None, idle_timeout=0.4, heartbeat=0.05) as hub:
        async with client_of(hub, "tcp", None) as client:
            assert client.heartbeat == 0.05
            conn = server_conn(hub, client.client_id)
            start = asyncio.get_running_loop().time()
            # the server would close a connection idle for 0.4 s; wait for well past that
            await wait_for(lambda: conn.frames_in >= 20 and asyncio.get_running_loop().time() - start > 0.8, what="heartbeats")
            assert conn.open and client.reconnects == 0 and client.state == "connected"


async def test_heartbeat_detects_a_hub_that_stopped_answering():
    """A fake hub that says welcome but never answers a ping: the client drops the connection
    and reconnects."""
    accepted: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        line = await reader.readline()
        ref = json.loads(line)["ref"]
        writer.write(json.dumps({"op": "welcome", "client": f"c{len(accepted)}", "user": "u", "heartbeat": 0.05, "ref": ref}).encode() + b"\n")
        try:
            while await reader.readline():
                pass  # swallow pings
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    states = []
    client = await wc.connect(f"tcp://127.0.0.1:{port}", backoff=(0.005, 0.01), timeout=0.2, on_state=lambda s, r: states.append(s))
    try:
        await wait_for(lambda: len(accepted) >= 2 and client.client_id == f"c{len(accepted)}", what="a reconnect")
        assert "reconnecting" in states
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------- auth, URLs, connect failures


async def test_token_auth_and_refresh():
    secret = SECRET
    async with running_hub("tcp", None, secret=secret) as hub:
        url = url_for(hub, "tcp")
        with pytest.raises(HubError) as info:
            await wc.connect(url, token="not-a-token", **FAST)
        assert info.value.code == "unauthorized"
        with pytest.raises(HubError) as info:
            await wc.connect(url, **FAST)
        assert info.value.code == "unauthorized"
        calls = []

        def token() -> str:
            calls.append(1)
            return mint_token(secret, "ada", rooms=["public.*"], ttl=60)

        async with wc.connect(url, token=token, **FAST) as client:
            assert client.user == "ada"
            await client.join("public.1")
            with pytest.raises(HubError) as info:
                await client.join("private")
            assert info.value.code == "forbidden"
            exp = await client.refresh(mint_token(secret, "ada", ttl=120))
            assert isinstance(exp, int)
            # a reconnect says hello with the refreshed token (which allows any room)
            events = Collector(client)
            server_conn(hub, client.client_id).abort()
            await wait_for(lambda: client.reconnects == 1 and client.state == "connected", what="the reconnect")
            await client.join("private")
            assert len(calls) == 1  # the refreshed token replaced the callable
            await events.stop()


async def test_reconnect_with_a_refused_token_stops():
    secret = SECRET
    async with running_hub("tcp", None, secret=secret) as hub:
        tokens = [mint_token(secret, "ada", ttl=60), "expired-or-garbage"]
        client = await wc.connect(url_for(hub, "tcp"), token=lambda: tokens.pop(0), **FAST)
        events = Collector(client)
        server_conn(hub, client.client_id).abort()
        await events.wait(lambda: events.ended, what="the end")
        assert isinstance(events.error, Disconnected) and events.error.reason == "unauthorized"
        await client.close()


@pytest.mark.parametrize(
    "url, words",
    [
        ("127.0.0.1:7400", "SCHEME://"),
        ("http://127.0.0.1:7400", "unknown scheme 'http'"),
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://:7400", "no host"),
        ("unix://", "no socket path"),
        ("tcp://127.0.0.1:99999", "bad hub URL"),
    ],
)
async def test_bad_urls(url, words):
    with pytest.raises(ValueError) as info:
        await wc.connect(url)
    assert words in str(info.value)


def test_parse_url():
    ep = parse_url("tcp://127.0.0.1:7400")
    assert (ep.url, ep.scheme, ep.host, ep.port) == ("tcp://127.0.0.1:7400", "tcp", "127.0.0.1", 7400)
    assert parse_url("udp://[::1]:7400").host == "::1"
    assert parse_url("unix:///run/hub.sock").path == "/run/hub.sock"
    assert parse_url("unix:rel.sock").path == "rel.sock"
    assert parse_url("wss://example.com/ws").port == 443
    assert parse_url("ws://example.com").port == 80
    assert parse_url("tls://h:1").secure and not parse_url("tcp://h:1").secure


async def test_connect_failures_are_clear(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        for scheme in ("tcp", "ws", "udp"):
            with pytest.raises(ConnectError) as info:
                await wc.connect(f"{scheme}://127.0.0.1:{port}", timeout=2)
            assert f"cannot connect to {scheme}://127.0.0.1:{port}" in str(info.value)
            assert "refused" in str(info.value).lower()
    with pytest.raises(ConnectError) as info:
        await wc.connect(f"unix://{tmp_path}/none.sock")
    assert "No such file" in str(info.value)
    with pytest.raises(ValueError, match="not a TLS transport"):
        await wc.connect(f"tcp://127.0.0.1:{port}", ssl=True)


async def test_tls_with_an_unknown_ca_fails_clearly(tls_certs):
    async with running_hub("tls", tls_certs) as hub:
        with pytest.raises(ConnectError) as info:
            await wc.connect(url_for(hub, "tls"))  # system CAs do not know the test CA
        assert "TLS handshake failed" in str(info.value) and "certificate" in str(info.value)


def test_backoff_full_jitter_bounds():
    lows = [backoff_delay(n, 0.1, 10.0, rand=lambda a, b: a) for n in range(12)]
    highs = [backoff_delay(n, 0.1, 10.0, rand=lambda a, b: b) for n in range(12)]
    assert lows == [0.1] * 12
    assert highs[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6])
    assert highs[-1] == 10.0 and max(highs) == 10.0
    import random

    rng = random.Random(7)
    samples = [backoff_delay(3, 0.1, 10.0, rand=rng.uniform) for _ in range(500)]
    assert all(0.1 <= s <= 1.6 for s in samples) and max(samples) - min(samples) > 1.0  # spread out
    assert backoff_delay(100, 0.5, 2.0, rand=lambda a, b: b) == 2.0
    with pytest.raises(ValueError):
        wc.Client("tcp://h:1", backoff=(2.0, 1.0))


@pytest.mark.parametrize("kind", STREAMS)
async def test_on_frame_sees_replies_and_send_frame_is_raw(kind, certs):
    async with running_hub(kind, certs) as hub:
        frames: list[dict] = []
        async with client_of(hub, kind, certs, on_frame=frames.append) as client:
            assert frames[0]["op"] == "welcome"
            await client.send_frame({"op": "presence", "room": "x", "ref": "mine"})
            await wait_for(lambda: any(f.get("ref") == "mine" for f in frames), what="the raw reply")
            reply = next(f for f in frames if f.get("ref") == "mine")
            assert reply["op"] == "error" and reply["code"] == "not_member"


# ---------------------------------------------------------------------- a hub that drops frames


def assert_no_silent_gap(events: list[dict], room: str, start: int = 0) -> int:
    """Every msg of ``room`` is the one after the last, unless a recovery_failed event just
    said where the sequence goes on. Returns the last seq."""
    last = start
    for event in events:
        if event.get("room") != room:
            continue
        if event["op"] == "recovery_failed":
            assert event["since"] == last and event["seq"] > last, (event, last)
            last = event["seq"]
        elif event["op"] == "msg":
            assert event["seq"] == last + 1, (event["seq"], last)
            last = event["seq"]
    return last


async def test_drop_oldest_gaps_are_filled_or_reported():
    """With the drop_oldest slow-consumer policy the hub drops frames of a client that stops
    reading (replies included). Whatever was dropped, the program sees every seq once, in
    order, or a recovery_failed event that says where the sequence goes on — never a silent
    gap, and the client does not hang on a re-join whose reply was dropped."""
    options = dict(history_size=10_000, slow_consumer="drop_oldest", max_send_buffer="64KiB")
    async with running_hub("tcp", None, **options) as hub, client_of(hub, "tcp", None, timeout=1.0) as client:
        events = Collector(client)
        room = await client.join("r")
        conn = server_conn(hub, client.client_id)
        client._link._transport.pause_reading()  # the client stops reading for a while
        n = 0
        while conn.frames_dropped == 0:
            n += 1
            await hub.publish("r", f"{n:04d}" + "x" * 1000)
            if n % 20 == 0:
                await asyncio.sleep(0)  # let the hub try to write
            assert n < 20_000, "the hub never dropped anything"
        for _ in range(50):
            n += 1
            await hub.publish("r", f"{n:04d}" + "x" * 1000)
        client._link._transport.resume_reading()
        # room.seq moves when the client accepts a message; the program sees it once read
        await events.wait(lambda: room.seq == n and events.events and events.events[-1].get("seq") == n, what=f"the sequence to reach {n}")
        assert assert_no_silent_gap(events.events, "r") == n
        assert all(m["data"].startswith(f"{m['seq']:04d}") for m in events.msgs())
        assert client.reconnects == 0 and client.state == "connected"
        await events.stop()


# ---------------------------------------------------------------------- hub bugs found on the way

BIG = "x" * 12_000  # 100 of these: about 1.2 MB, more than the default max_send_buffer (1 MiB)


async def test_recovery_of_a_backlog_larger_than_the_send_buffer():
    async with running_hub("tcp", None) as hub:  # default limits: history 100, max_send_buffer 1 MiB
        frames: list[dict] = []
        async with client_of(hub, "tcp", None, on_frame=frames.append) as client:
            events = Collector(client)
            await client.join("r")
            server_conn(hub, client.client_id).abort()
            for _ in range(100):
                await hub.publish("r", BIG)
            slow = lambda: [f for f in frames if f["op"] == "bye" and f["reason"] == "slow_consumer"]  # noqa: E731
            try:
                await wait_for(lambda: len(events.msgs()) == 100 or slow(), what="the recovered backlog or a bye")
            finally:
                await events.stop()
            assert not slow(), "the hub sent the reconnecting client away as a slow consumer"
            assert [m["seq"] for m in events.msgs()] == list(range(1, 101))


async def test_history_larger_than_the_send_buffer():
    async with running_hub("tcp", None) as hub:
        for _ in range(100):
            await hub.publish("r", BIG)
        async with client_of(hub, "tcp", None, reconnect=False) as client:
            await client.join("r")
            history = await client.history("r")
            assert len(history) == 100


async def test_a_refused_connection_says_why():
    async with running_hub("tcp", None, max_connections_per_ip=1) as hub:
        async with client_of(hub, "tcp", None):
            with pytest.raises(ConnectError) as info:
                await wc.connect(url_for(hub, "tcp"), **FAST)
            assert "the hub refused: limit" in str(info.value) and "max_connections_per_ip" in str(info.value)


@pytest.mark.parametrize("kind", ("tcp", "ws", "udp"))
async def test_close_while_reconnecting_is_prompt(kind, certs):
    hub = Hub(**hub_options(kind, certs))
    await hub.start()
    client = await wc.connect(url_for(hub, kind), backoff=(0.01, 0.02), timeout=5.0)
    await asyncio.wait_for(hub.stop(), WAIT)  # nothing listens any more
    await wait_for(lambda: client.state == "reconnecting", what="the client to notice")
    start = asyncio.get_running_loop().time()
    pending = asyncio.ensure_future(client.ping())  # waits for a connection that will not come
    await asyncio.wait_for(client.close(), 2.0)
    assert asyncio.get_running_loop().time() - start < 1.0
    with pytest.raises(Disconnected):
        await asyncio.wait_for(pending, 1.0)
    assert client.state == "closed"


async def test_close_fails_requests_in_flight_with_closed():
    """A request waiting for its reply when the program closes the client raises
    Disconnected ``closed`` (not ConnectionLost: nothing will reconnect)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ref = json.loads(await reader.readline())["ref"]
        writer.write(json.dumps({"op": "welcome", "client": "c1", "user": "u", "heartbeat": 25, "ref": ref}).encode() + b"\n")
        while await reader.readline():
            pass  # never answers anything else
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await wc.connect(f"tcp://127.0.0.1:{port}", **FAST)
        pending = asyncio.ensure_future(client.publish("r", 1))
        await wait_for(lambda: client._pending, what="the request to go out")
        await client.close()
        with pytest.raises(Disconnected) as info:
            await asyncio.wait_for(pending, WAIT)
        assert info.value.reason == "closed"
    finally:
        server.close()
        await server.wait_closed()


async def test_udp_handshake_retries_a_lost_datagram_and_a_forgotten_session_reconnects():
    """A fake hub that loses the first probe, then challenges, then acts as a session: the
    link resends after its delay and echoes the cookie. Later a challenge (the hub forgot
    the session) ends the link and the client reconnects with a fresh handshake."""
    from wirehub.client.transports import UDP_PAD_TO

    seen: list[bytes] = []

    class FakeHub(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport
            self.forget = False
            self.validated: set = set()

        def datagram_received(self, data, addr):
            seen.append(data)
            frame = json.loads(data)
            if addr not in self.validated:
                if frame.get("cookie") == f"c{addr[1]}":
                    self.validated.add(addr)
                elif len([d for d in seen if b'"cookie"' not in d]) == 1:
                    return  # the first probe is lost
                else:
                    assert len(data) >= UDP_PAD_TO  # padded: room for a 3x answer
                    self.transport.sendto(json.dumps({"op": "challenge", "cookie": f"c{addr[1]}"}).encode() + b"\n", addr)
                    return
            if self.forget:  # a restarted hub: no session, so a challenge
                self.validated.discard(addr)
                self.forget = False
                self.transport.sendto(json.dumps({"op": "challenge", "cookie": "new"}).encode() + b"\n", addr)
                return
            reply = {"op": "pong"} if frame["op"] == "ping" else {"op": "welcome", "client": f"c{addr[1]}", "heartbeat": 0.05}
            if "ref" in frame:
                reply["ref"] = frame["ref"]
            self.transport.sendto(json.dumps(reply).encode() + b"\n", addr)

    loop = asyncio.get_running_loop()
    transport, fake = await loop.create_datagram_endpoint(FakeHub, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        start = loop.time()
        client = await wc.connect(f"udp://127.0.0.1:{port}", **FAST)
        assert loop.time() - start >= 0.15  # waited out the lost probe's delay
        first = client.client_id
        probes = [json.loads(d) for d in seen if b'"hello"' not in d]
        assert probes[0]["op"] == "ping" and "cookie" not in probes[0] and probes[-1]["cookie"] == first
        fake.forget = True
        await wait_for(lambda: client.reconnects == 1 and client.state == "connected", what="the reconnect")
        assert client.client_id != first
        await client.close()
    finally:
        transport.close()


async def test_presence_diffs_arrive_as_join_and_leave_events_and_the_mode_is_kept():
    async with running_hub("tcp", None, presence_threshold=0, presence_max=2) as hub:
        async with client_of(hub, "tcp", None, name="ada") as a, client_of(hub, "tcp", None, name="bob") as b:
            ea = Collector(a)
            room = await a.join("chat")
            assert room.presence_mode == "diff"  # above presence_threshold=0 members
            await b.join("chat")
            await ea.wait(lambda: any(e["op"] == "join" and e["client"] == b.client_id for e in ea.events), what="bob's join")
            join = next(e for e in ea.events if e["op"] == "join" and e["client"] == b.client_id)
            assert join == {"op": "join", "room": "chat", "client": b.client_id, "user": b.user, "name": "bob"}
            await b.leave("chat")
            await ea.wait(lambda: any(e["op"] == "leave" for e in ea.events), what="bob's leave")
            assert [e["client"] for e in ea.events if e["op"] == "leave"] == [b.client_id]
            # past presence_max=2 members the room goes quiet, and says so
            async with client_of(hub, "tcp", None) as c, client_of(hub, "tcp", None) as d:
                await c.join("chat")
                assert (await d.join("chat")).presence_mode == "query"
                await wait_for(lambda: room.presence_mode == "query", what="the room's switch to query")
            await ea.stop()


async def test_after_bye_shutdown_the_backoff_stops_growing_at_the_restart_cap(monkeypatch, certs):
    """A client told ``bye shutdown`` retries a restarting hub within RESTART_BACKOFF_CAP, not
    its own (long) cap: every client of a drained hub is back soon after the hub is. Each
    wait the client asks for is recorded and shortened, so no time passes in sleeps."""
    from wirehub.client import core

    windows: list[tuple[int, float, float]] = []

    def recorded(attempt: int, low: float, high: float) -> float:
        windows.append((attempt, low, high))
        return 0.005

    monkeypatch.setattr(core, "backoff_delay", recorded)
    hub = Hub(**hub_options("tcp", certs))
    await hub.start()
    where = listen_address(hub, "tcp")
    client = await wc.connect(url_for(hub, "tcp"), backoff=(0.5, 60.0), timeout=5.0)
    try:
        await asyncio.wait_for(hub.stop(), WAIT)  # bye shutdown; nobody listens for a while
        await wait_for(lambda: len(windows) >= 3, what="three refused reconnects")
        hub = Hub(**hub_options("tcp", certs, where=where))
        await hub.start()
        await wait_for(lambda: client.state == "connected" and client.reconnects == 1, what="the reconnect")
        assert windows[:3] == [(0, 0.5, core.RESTART_BACKOFF_CAP), (1, 0.5, core.RESTART_BACKOFF_CAP),
                               (2, 0.5, core.RESTART_BACKOFF_CAP)]
        windows.clear()
        for conn in list(hub.server.registry):  # a plain drop, no bye: the client's own cap
            conn.abort()
        await wait_for(lambda: client.reconnects == 2, what="the second reconnect")
        assert windows[0] == (0, 0.5, 60.0)
    finally:
        await client.close()
        await asyncio.wait_for(hub.stop(), WAIT)
