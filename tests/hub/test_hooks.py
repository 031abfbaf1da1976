"""Application hooks (docs/hub.md, "Programming the hub"): every hook and outcome over TCP
and WebSocket with outside clients, on the memory broker and across two nodes sharing Redis
(and NATS); bad answers, exceptions and timeouts; per-connection order while hooks run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator

import msgspec
import pytest

from wirehub.hub import Connect, Disconnect, Hooks, Join, Publish, Refresh, Reject
from wirehub.hub import app as hub_app
from wirehub.hub.broker.nats import NatsBroker
from wirehub.hub.broker.redis import RedisBroker

from ..helpers import WAIT, reachable, wait_for
from .hubclient import hub_server
from .test_broker_nats import URL as NATS_URL
from .test_broker_nats import drop_prefix as drop_nats
from .test_broker_redis import URL as REDIS_URL
from .test_broker_redis import drop_prefix as drop_redis

TRANSPORTS = ("tcp", "ws")
BROKERS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379")),
    pytest.param("nats", marks=pytest.mark.skipif(not reachable(4222), reason="no NATS at 127.0.0.1:4222")),
]

pytestmark = pytest.mark.one_loop


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


@contextlib.asynccontextmanager
async def nodes(kind: str, transport: str, hooks: Hooks, **options: Any) -> AsyncIterator[tuple[Any, Any]]:
    """Two hub nodes with the same hooks: one memory hub twice, or two hubs sharing a Redis
    or NATS prefix (clients on the first and the second are on different nodes)."""
    if kind == "memory":
        async with hub_server(transport, hooks=hooks, **options) as hub:
            yield hub, hub
        return
    prefix = f"whk{uuid.uuid4().hex[:12]}"
    make = (lambda: RedisBroker(REDIS_URL, prefix=prefix)) if kind == "redis" else (lambda: NatsBroker(NATS_URL, prefix=prefix))
    try:
        async with hub_server(transport, hooks=hooks, broker=make(), **options) as one:
            async with hub_server(transport, hooks=hooks, broker=make(), **options) as two:
                yield one, two
    finally:
        await (drop_redis if kind == "redis" else drop_nats)(prefix)


async def msgs(c: Any, n: int) -> list[dict]:
    """The next ``n`` ``msg`` frames ``c`` gets (presence events skipped: across nodes they
    may come in any order with the messages)."""
    got = []
    while len(got) < n:
        frame = await c.recv()
        if frame["op"] == "msg":
            got.append(frame)
    return got


# --------------------------------------------------------------------- on_connect


async def test_on_connect_sets_identity_info_state_and_server_side_rooms(transport):
    hooks = Hooks()
    seen = []

    @hooks.on_connect
    async def connect(ctx, hello):
        seen.append((ctx.client, ctx.transport, hello))
        ctx.state["visits"] = 0
        if hello["data"] != {"ticket": "t-1"}:
            raise Reject("app.bad_ticket", "unknown ticket")
        return Connect(user="alice", name="Alice A.", info={"plan": "pro"}, rooms=["inbox.alice"], data={"motd": "hi"})

    @hooks.on_rpc("visit")
    def visit(ctx, data):
        ctx.state["visits"] += 1
        return {"visits": ctx.state["visits"], "user": ctx.user, "info": ctx.info}

    async with hub_server(transport, hooks=hooks) as hub:
        c = await hub.client()
        # on_connect makes hello required, as auth does: nothing else before it
        await c.request({"op": "join", "room": "lobby", "ref": 1}, "error", code="unauthorized", ref=1)
        await c.request({"op": "pub", "room": "lobby", "data": 1, "ref": 2}, "error", code="unauthorized", ref=2)
        await c.request({"op": "ping", "ref": 3}, "error", code="unauthorized", ref=3)
        assert seen == []
        await c.request({"op": "hello", "data": {"ticket": "nope"}, "ref": 4}, "error", code="app.bad_ticket", message="unknown ticket", ref=4)
        welcome = await c.request({"op": "hello", "data": {"ticket": "t-1"}, "ref": 5}, "welcome", user="alice", data={"motd": "hi"}, ref=5)
        await c.expect("joined", room="inbox.alice")  # joined by the server, no ref
        assert seen[-1][1] == transport and seen[-1][0] == welcome["client"]
        assert seen[-1][2] == {"name": None, "token": None, "data": {"ticket": "t-1"}}
        other = await hub.greeted(data={"ticket": "t-1"})
        await other.expect("joined", room="inbox.alice")
        await c.barrier()
        members = (await c.request({"op": "presence", "room": "inbox.alice"}, "presence"))["members"]
        assert {m["client"]: (m["user"], m["name"], m["info"]) for m in members} == {
            welcome["client"]: ("alice", "Alice A.", {"plan": "pro"}),
            other.client_id: ("alice", "Alice A.", {"plan": "pro"}),
        }
        # ctx.state belongs to one connection and lasts as long as it
        for n in (1, 2):
            result = await c.request({"op": "rpc", "method": "visit", "ref": 9}, "result", ref=9)
            assert result["data"] == {"visits": n, "user": "alice", "info": {"plan": "pro"}}
        await other.request({"op": "rpc", "method": "visit"}, "result", data={"visits": 1, "user": "alice", "info": {"plan": "pro"}})


async def test_on_connect_disconnect_and_expiry(transport):
    hooks = Hooks()

    @hooks.on_connect
    def connect(ctx, hello):
        if hello["name"] == "mallory":
            raise Disconnect()
        return Connect(expires=time.time() + 0.3)

    async with hub_server(transport, hooks=hooks) as hub:
        c = await hub.client()
        await c.send({"op": "hello", "name": "mallory", "ref": 1})
        assert (await c.closed())[-1] == {"op": "bye", "reason": "kicked", "reconnect": False}
        c = await hub.greeted(name="bob")
        frames = await c.closed()  # Connect(expires=...) ends it, as a token's exp would
        assert frames[-1] == {"op": "bye", "reason": "auth_expired", "reconnect": True}


# --------------------------------------------------------------------- on_join


@pytest.mark.parametrize("broker", BROKERS)
async def test_on_join_refuses_accepts_with_data_and_member_info_across_nodes(transport, broker):
    hooks = Hooks()
    calls = []

    @hooks.on_join("vip.*")
    async def vip(ctx, room, data):
        calls.append(("vip", room, data))
        if data != {"code": 42}:
            raise Reject("app.not_invited", f"{room} is by invitation")
        return Join(data={"topic": "secrets"}, info={"badge": "gold"})

    @hooks.on_join("*")
    def anything(ctx, room, data):  # only for rooms "vip.*" does not match: the first pattern wins
        calls.append(("any", room, data))

    room = f"vip.{uuid.uuid4().hex[:6]}"
    async with nodes(broker, transport, hooks) as (one, two):
        a = await one.greeted(name="a")
        b = await two.greeted(name="b")
        await a.request({"op": "join", "room": room, "ref": 1}, "error", code="app.not_invited", ref=1)
        joined = await a.request({"op": "join", "room": room, "data": {"code": 42}, "ref": 2}, "joined", data={"topic": "secrets"}, ref=2)
        assert joined["room"] == room
        assert "data" not in (await b.request({"op": "join", "room": "plain-" + room}, "joined"))  # None: accepted as is
        await b.request({"op": "join", "room": room, "data": {"code": 42}}, "joined", data={"topic": "secrets"})
        event = await a.expect("join", room=room, client=b.client_id)  # presence event crosses nodes with info
        assert event["info"] == {"badge": "gold"}
        members = (await b.request({"op": "presence", "room": room}, "presence"))["members"]
        assert sorted((m["name"], m.get("info")) for m in members) == [("a", {"badge": "gold"}), ("b", {"badge": "gold"})]
        members = (await b.request({"op": "presence", "room": "plain-" + room}, "presence"))["members"]
        assert [("info" in m) for m in members] == [False]  # no hook info: no info field
        assert calls == [("vip", room, None), ("vip", room, {"code": 42}), ("any", "plain-" + room, None), ("vip", room, {"code": 42})]


# --------------------------------------------------------------------- on_publish


@pytest.mark.parametrize("broker", BROKERS)
async def test_on_publish_rewrites_refuses_skips_history_and_attaches_info(transport, broker):
    hooks = Hooks()

    @hooks.on_publish("chat.*")
    async def publish(ctx, room, data):
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise Reject("bad_frame", "a chat message is {\"text\": STRING}")
        if data.get("typing"):
            return Publish(history=False, info={"kind": "typing"})
        if data["text"] == "as is":
            return None
        return Publish(data={"text": data["text"].strip()[:10], "by": ctx.name}, info={"name": ctx.name})

    room = f"chat.{uuid.uuid4().hex[:6]}"
    async with nodes(broker, transport, hooks) as (one, two):
        a = await one.greeted(name="ann")
        b = await two.greeted(name="bo")
        for c in (a, b):
            await c.join(room)
        await a.send({"op": "pub", "room": room, "data": {"text": "  hello there everyone  "}, "ref": 1})
        await a.send({"op": "pub", "room": room, "data": {"nope": 1}, "ref": 2})
        await a.send({"op": "pub", "room": room, "data": {"text": "as is"}, "ref": 3})
        await a.send({"op": "pub", "room": room, "data": {"text": "", "typing": True}, "ref": 4})
        await a.send({"op": "pub", "room": "other", "data": "no hook here", "ref": 5})
        got = await a.barrier()
        replies = [f for f in got if "ref" in f]
        assert [(f["op"], f["ref"]) for f in replies] == [("ok", 1), ("error", 2), ("ok", 3), ("ok", 4), ("ok", 5)]
        assert replies[1]["code"] == "bad_frame" and "seq" not in replies[3]
        first, second, typing = await msgs(b, 3)
        assert (first["data"], first["info"], first["from"]) == ({"text": "hello ther", "by": "ann"}, {"name": "ann"}, a.client_id)
        assert second["data"] == {"text": "as is"} and "info" not in second and second["seq"] == first["seq"] + 1
        assert "seq" not in typing and typing["info"] == {"kind": "typing"} and typing["from"] == a.client_id
        history = await b.request({"op": "history", "room": room}, "history")
        assert [(m["data"], m.get("info")) for m in history["messages"]] == [
            ({"text": "hello ther", "by": "ann"}, {"name": "ann"}),
            ({"text": "as is"}, None),
        ]


async def test_on_publish_keeps_order_while_async_hooks_run(transport):
    hooks = Hooks()

    @hooks.on_publish("*")
    async def slow_then_fast(ctx, room, data):
        await asyncio.sleep(0.002 * (data % 4))  # later frames are often quicker
        if data % 7 == 3:
            raise Reject("app.sevens", "no")
        return Publish(data=data * 10)

    n = 60
    async with hub_server(transport, hooks=hooks) as hub:
        c = await hub.greeted()
        await c.join("r")
        for i in range(n):
            await c.send({"op": "pub", "room": "r", "data": i, "ref": i})
        await c.send({"op": "ping", "ref": "after"})
        frames = [await c.recv() for _ in range(n + n - len([i for i in range(n) if i % 7 == 3]) + 1)]
        replies = [f for f in frames if f["op"] in ("ok", "error", "pong")]
        assert [f["ref"] for f in replies] == list(range(n)) + ["after"]
        assert [f["op"] == "error" for f in replies[:-1]] == [i % 7 == 3 for i in range(n)]
        assert [f["data"] for f in frames if f["op"] == "msg"] == [i * 10 for i in range(n) if i % 7 != 3]


# --------------------------------------------------------------------- on_rpc


@pytest.mark.parametrize("broker", BROKERS)
async def test_rpc_results_errors_and_unknown_methods(transport, broker):
    hooks = Hooks()

    @hooks.on_rpc("add")
    async def add(ctx, data):
        return {"sum": data["a"] + data["b"], "client": ctx.client}

    @hooks.on_rpc("nothing")
    def nothing(ctx, data):
        assert data is None
        return None

    @hooks.on_rpc("refuse")
    def refuse(ctx, data):
        raise Reject("app.quota", "out of quota")

    async with nodes(broker, transport, hooks) as (_, two):
        c = await two.greeted()
        await c.request({"op": "rpc", "method": "add", "data": {"a": 2, "b": 3}, "ref": "x"}, "result", data={"sum": 5, "client": c.client_id}, ref="x")
        await c.request({"op": "rpc", "method": "nothing", "ref": 1}, "result", data=None, ref=1)
        await c.request({"op": "rpc", "method": "refuse", "ref": 2}, "error", code="app.quota", message="out of quota", ref=2)
        error = await c.request({"op": "rpc", "method": "nope", "ref": 3}, "error", code="no_such_method", ref=3)
        assert "'nope'" in error["message"]
        await c.request({"op": "rpc", "ref": 4}, "error", code="bad_frame", ref=4)
        await c.request({"op": "rpc", "method": "", "ref": 5}, "error", code="bad_frame", ref=5)


async def test_rpc_without_hooks_is_no_such_method(transport):
    async with hub_server(transport) as hub:
        c = await hub.client()
        await c.request({"op": "rpc", "method": "anything", "ref": 1}, "error", code="no_such_method", ref=1)


# --------------------------------------------------------------------- failures


async def test_a_hook_that_raises_gives_internal_and_is_logged_within_the_budget(transport, caplog, monkeypatch):
    monkeypatch.setattr(hub_app, "_tracebacks", hub_app.LogBudget(2, 60.0, "hub_op_failed"))
    hooks = Hooks()

    @hooks.on_rpc("boom")
    def boom(ctx, data):
        raise KeyError("the bug")

    @hooks.on_rpc("not_json")
    async def not_json(ctx, data):
        return object()

    @hooks.on_join("*")
    def bad_answer(ctx, room, data):
        return "yes"  # neither None nor Join(...)

    @hooks.on_publish("*")
    def bad_code(ctx, room, data):
        raise Reject("teapot", "a code outside the range")

    caplog.set_level(logging.ERROR, logger="wirehub")
    async with hub_server(transport, hooks=hooks, max_errors=50) as hub:
        c = await hub.greeted()
        for ref in range(3):
            await c.request({"op": "rpc", "method": "boom", "ref": ref}, "error", code="internal", ref=ref)
        await c.request({"op": "rpc", "method": "not_json", "ref": 4}, "error", code="internal", ref=4)
        await c.request({"op": "join", "room": "r", "ref": 5}, "error", code="internal", ref=5)
        await c.request({"op": "pub", "room": "r", "data": 1, "ref": 6}, "error", code="internal", ref=6)
        await c.request({"op": "ping", "ref": 7}, "pong", ref=7)  # the connection goes on
    failed = [r for r in caplog.records if r.getMessage() == "hook_failed"]
    assert len(failed) == 2  # the budget: the third and later were counted, not logged
    assert all(r.fields["conn"] == c.client_id and r.fields["hook"] == "rpc boom:test_a_hook_that_raises_gives_internal_and_is_logged_within_the_budget.<locals>.boom" for r in failed)
    assert failed[0].exc_info is not None and "the bug" in str(failed[0].exc_info[1])


async def test_a_hook_slower_than_hook_timeout_gives_timeout_and_others_go_on(transport, caplog):
    hooks = Hooks()
    release = asyncio.Event()

    @hooks.on_rpc("slow")
    async def slow(ctx, data):
        await release.wait()

    @hooks.on_join("slow.*")
    async def slow_join(ctx, room, data):
        await release.wait()

    caplog.set_level(logging.WARNING, logger="wirehub")
    async with hub_server(transport, hooks=hooks, hook_timeout=0.3) as hub:
        c = await hub.greeted()
        other = await hub.greeted()
        started = asyncio.get_running_loop().time()
        await c.send({"op": "rpc", "method": "slow", "ref": 1})
        await other.request({"op": "ping", "ref": 2}, "pong", ref=2)  # another connection is not held up
        assert asyncio.get_running_loop().time() - started < 0.3
        error = await c.expect("error", code="timeout", ref=1)
        assert "hook_timeout" in error["message"]
        await c.request({"op": "join", "room": "slow.x", "ref": 3}, "error", code="timeout", ref=3)
        members = hub.app.rooms.get("slow.x")
        assert members is None or c.client_id not in members.members
        await c.request({"op": "ping", "ref": 4}, "pong", ref=4)
    assert [r.fields["conn"] for r in caplog.records if r.getMessage() == "hook_timeout"] == [c.client_id, c.client_id]


def test_reject_codes_are_checked():
    assert Reject("app.x").code == "app.x"
    assert Reject().code == "forbidden"
    assert Reject("not_member", "join first").message == "join first"
    for bad in ("internal", "timeout", "teapot", "app.", "app.a b", 42):
        with pytest.raises(ValueError, match="app."):
            Reject(bad)


def test_hooks_registration_is_checked():
    hooks = Hooks()
    with pytest.raises(TypeError, match="blocking=True is for plain functions"):

        @hooks.on_rpc("x", blocking=True)
        async def x(ctx, data):
            pass

    with pytest.raises(TypeError, match="room glob"):
        hooks.on_join(42)

    @hooks.on_connect
    def one(ctx, hello):
        pass

    with pytest.raises(ValueError, match="already registered"):
        hooks.on_connect(one)
    with pytest.raises(RuntimeError, match="once the hub is serving"):
        hooks.publish("r", 1)


# --------------------------------------------------------------------- refresh, leave, disconnect


async def test_on_refresh_extends_or_expires(transport):
    hooks = Hooks()

    @hooks.on_connect
    def connect(ctx, hello):
        return Connect(expires=time.time() + 0.5)

    @hooks.on_refresh
    def refresh(ctx, token):
        if token == "stop":
            return Refresh(expired=True)
        if token == "default":
            return None
        return Refresh(expires=time.time() + 3600)

    async with hub_server(transport, hooks=hooks) as hub:
        c = await hub.greeted()
        reply = await c.request({"op": "refresh", "token": "more", "ref": 1}, "refreshed", ref=1)
        assert reply["exp"] > time.time() + 3000
        await c.request({"op": "refresh", "token": "default", "ref": 2}, "refreshed", exp=None, ref=2)  # no auth: the hub's answer
        await c.request({"op": "ping", "ref": 3}, "pong", ref=3)
        await c.send({"op": "refresh", "token": "stop"})
        assert (await c.closed())[-1] == {"op": "bye", "reason": "auth_expired", "reconnect": True}


async def test_on_leave_and_on_disconnect_are_told(transport):
    hooks = Hooks()
    events: asyncio.Queue = asyncio.Queue()

    @hooks.on_leave("game.*")
    async def left(ctx, room):
        await events.put(("leave", ctx.client, room))

    @hooks.on_disconnect
    def gone(ctx, reason):
        events.put_nowait(("disconnect", ctx.client, reason, sorted(ctx.rooms)))

    async with hub_server(transport, hooks=hooks) as hub:
        c = await hub.greeted()
        for room in ("game.1", "game.2", "lobby"):
            await c.join(room)
        await c.request({"op": "leave", "room": "game.1"}, "left")
        assert await asyncio.wait_for(events.get(), WAIT) == ("leave", c.client_id, "game.1")
        hub.server.disconnect(c.client_id, "kicked")
        got = [await asyncio.wait_for(events.get(), WAIT) for _ in range(2)]
        assert got == [("leave", c.client_id, "game.2"), ("disconnect", c.client_id, "kicked", [])]


# --------------------------------------------------------------------- server actions


@pytest.mark.parametrize("broker", BROKERS)
async def test_server_actions_from_hooks_reach_clients_and_users_on_any_node(transport, broker):
    hooks = Hooks()

    @hooks.on_connect
    def connect(ctx, hello):
        return Connect(user=hello["name"])

    @hooks.on_rpc("act")
    async def act(ctx, data):
        hub, what = ctx.hub, data["do"]
        if what == "shout":  # to the room, not back to the caller
            pub = await hub.publish(data["room"], {"shout": data["text"]}, exclude=ctx.client, info={"by": ctx.user})
            return pub.seq
        if what == "dm":
            return await hub.send({"dm": data["text"]}, user=data["user"])
        if what == "pull":
            return await hub.join(data["client"], data["room"], info={"pulled": True})
        if what == "push":
            return await hub.leave(data["client"], data["room"])
        if what == "who":
            return sorted(m.user for m in await hub.presence(data["room"]))
        if what == "last":
            return [(p.seq, msgspec.json.decode(p.data)) for p in await hub.history(data["room"], limit=2)]
        if what == "kick":
            return await hub.disconnect(user=data["user"], reconnect=True)
        raise Reject("app.unknown", what)

    room = "r" + uuid.uuid4().hex[:6]
    async with nodes(broker, transport, hooks) as (one, two):
        a = await one.greeted(name="ann")
        b = await two.greeted(name="bob")
        b2 = await one.greeted(name="bob")  # the same user on the other node
        for c in (a, b):
            await c.join(room)
        async def act(c, **data):
            await c.send({"op": "rpc", "method": "act", "data": data, "ref": "act"})
            while True:  # presence events may come first
                frame = await c.recv()
                if frame.get("ref") == "act":
                    assert frame["op"] == "result", frame
                    return frame

        seq = (await act(a, do="shout", room=room, text="hey"))["data"]
        got = (await msgs(b, 1))[0]
        assert (got["data"], got["seq"], got["from"], got["info"]) == ({"shout": "hey"}, seq, "", {"by": "ann"})
        assert [f for f in await a.barrier() if f["op"] == "msg"] == []  # excluded
        # to every connection of a user, wherever it is
        await act(a, do="dm", user="bob", text="psst")
        for c in (b, b2):
            assert (await msgs(c, 1))[0] == {"op": "msg", "data": {"dm": "psst"}}
        # join and leave a client of another node
        assert (await act(a, do="pull", client=b2.client_id, room=room))["data"] is True
        joined = await b2.expect("joined", room=room)
        assert "ref" not in joined
        await wait_for_members(a, room, ["ann", "bob", "bob"])
        members = (await b2.request({"op": "presence", "room": room}, "presence"))["members"]
        assert [m.get("info") for m in members if m["client"] == b2.client_id] == [{"pulled": True}]
        assert (await act(a, do="who", room=room))["data"] == ["ann", "bob", "bob"]
        await act(a, do="push", client=b2.client_id, room=room)
        assert [f for f in await b2.barrier() if f["op"] not in ("join", "leave")] == [{"op": "left", "room": room}]
        assert (await act(a, do="last", room=room))["data"] == [[seq, {"shout": "hey"}]]
        assert (await act(a, do="pull", client="nobody", room=room))["data"] is False
        # disconnect a user everywhere
        await act(a, do="kick", user="bob")
        for c in (b, b2):
            frames = await c.closed()
            assert frames[-1] == {"op": "bye", "reason": "kicked", "reconnect": True}
        assert all(f["op"] in ("join", "leave") for f in await a.barrier())  # ann stays


async def wait_for_members(c: Any, room: str, users: list[str]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        await c.send({"op": "presence", "room": room, "ref": "who"})
        while (frame := await c.recv()).get("ref") != "who":
            pass
        members = frame["members"]
        if sorted(m["user"] for m in members) == users:
            return
        assert asyncio.get_running_loop().time() < deadline, members
        await asyncio.sleep(0.01)


async def test_embedded_hub_has_the_hooks_and_the_actions(transport):
    from wirehub.hub import Hub

    from .hubclient import StreamClient, WsClient
    from ..helpers import addr

    hub = Hub(**{transport: "127.0.0.1:0", "ws" if transport == "tcp" else "tcp": "off", "udp": "off", "admin": "off"})

    @hub.on_join("*")
    def join(ctx, room, data):
        return Join(data={"hello": room})

    async with hub:
        target = addr(hub.server, transport)
        c = await (StreamClient.open("tcp", target) if transport == "tcp" else WsClient.open(target))
        try:
            welcome = await c.hello()
            await c.request({"op": "join", "room": "lobby"}, "joined", data={"hello": "lobby"})
            await hub.publish("lobby", {"n": 1}, exclude=welcome["client"])
            pub = await hub.publish("lobby", {"n": 2}, info={"from": "backend"})
            msg = await c.expect("msg")
            assert (msg["data"], msg["seq"], msg["info"]) == ({"n": 2}, pub.seq, {"from": "backend"})
            assert await hub.send("to you", user=welcome["user"])
            await c.expect("msg", data="to you")
            assert [m.client for m in await hub.presence("lobby")] == [welcome["client"]]
            assert [msgspec.json.decode(p.data) for p in await hub.history("lobby")] == [{"n": 1}, {"n": 2}]
            assert await hub.leave(welcome["client"], "lobby")
            await c.expect("left", room="lobby")
            assert await hub.kick(client=welcome["client"])
            assert (await c.closed())[-1]["reason"] == "kicked"
        finally:
            await c.close()
