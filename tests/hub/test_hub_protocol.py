"""The hub wire protocol (SPEC.md "Hub wire protocol"), frame by frame, over real loopback
sockets, with outside clients (tests/hub/hubclient.py) on every transport: TCP, TLS, Unix,
WebSocket and UDP. The behaviour is the same on all of them, so most tests run on each.

"Nothing else arrived" is shown with ``barrier()``: a ping whose pong must be the next frame.
The hub answers a connection's frames in order and, with the memory broker, queues
publications and presence events inline, so anything meant for a client is on the wire before
the pong to a ping sent afterwards.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import jwt
import pytest

from wirehub import __version__

from ..helpers import WAIT, addr, wait_for
from .hubclient import STREAMS, HubClient, StreamClient, WsClient, dumps, hub_server

SECRET = "hub-protocol-test-secret-0123456789abcdef"


def now_ms() -> int:
    return int(time.time() * 1000)


def token(sub: str = "alice", ttl: float = 3600, **claims) -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + ttl, **claims}, SECRET, algorithm="HS256")


async def room_of(h, room: str, n: int, **hello) -> list[HubClient]:
    """``n`` greeted clients in ``room``; the presence join events they got are consumed."""
    clients = []
    for i in range(n):
        c = await h.greeted(name=f"member{i}", **hello)
        await c.join(room)
        clients.append(c)
    for c in clients:
        extra = await c.barrier()
        assert all(f["op"] == "join" and f["room"] == room for f in extra), extra
    return clients


async def pub_and_collect(c: HubClient, room: str, data, ref) -> tuple[dict, dict]:
    """Publish from a member: returns its (msg, ok), whichever order they came in."""
    await c.pub(room, data, ref=ref)
    frames = [await c.recv(), await c.recv()]
    by_op = {f["op"]: f for f in frames}
    assert set(by_op) == {"msg", "ok"}, frames
    return by_op["msg"], by_op["ok"]


# --------------------------------------------------------------------- hello / welcome


async def test_hello_gets_welcome(hub):
    async with hub() as h:
        c = await h.client()
        await c.send({"op": "hello", "name": "Ann"})
        welcome = await c.recv()
        assert set(welcome) == {"op", "client", "user", "heartbeat", "server"}, welcome
        assert welcome["op"] == "welcome"
        assert welcome["heartbeat"] == 25  # the default, in seconds
        assert welcome["server"] == f"wirehub/{__version__}"
        assert isinstance(welcome["client"], str) and welcome["client"]
        assert isinstance(welcome["user"], str) and welcome["user"]
        # the client id is the connection's id (what the admin API lists and kicks)
        assert [conn.id for conn in h.server.connections()] == [welcome["client"]]
        assert await c.barrier() == []


async def test_heartbeat_is_configurable(hub):
    async with hub(heartbeat=7) as h:
        c = await h.client()
        assert (await c.hello())["heartbeat"] == 7
    async with hub(heartbeat="2500ms") as h:
        c = await h.client()
        assert (await c.hello())["heartbeat"] == 2.5


async def test_anonymous_identity_without_auth(hub):
    """No auth: hello is optional and every client gets an anonymous identity of its own."""
    async with hub() as h:
        a, b = await h.client(), await h.client()
        wa, wb = await a.hello(), await b.hello(name="Bob")
        assert wa["client"] != wb["client"] and wa["user"] != wb["user"]
        # without hello at all: join, publish and appear in presence with an identity
        c = await h.client()
        await c.join("lobby")
        await a.join("lobby")
        await c.send({"op": "presence", "room": "lobby"})
        frames = [await c.recv(), await c.recv()]  # a's join event and the presence reply
        event = next(f for f in frames if f["op"] == "join")
        assert event["client"] == wa["client"] and event["user"] == wa["user"] and event["name"] is None
        presence = next(f for f in frames if f["op"] == "presence")
        anon = [m for m in presence["members"] if m["client"] != wa["client"]]
        assert len(anon) == 1 and isinstance(anon[0]["user"], str) and anon[0]["user"]
        assert anon[0]["user"] not in (wa["user"], wb["user"]) and anon[0]["name"] is None


async def test_second_hello_is_refused_and_harmless(hub):
    async with hub() as h:
        c = await h.client()
        first = await c.hello(name="Ann")
        await c.send({"op": "hello", "name": "Eve", "ref": 2})
        err = await c.expect("error", ref=2)
        assert err["code"] == "bad_frame" and err["message"]
        await c.join("r")
        await c.send({"op": "presence", "room": "r"})
        (me,) = (await c.expect("presence"))["members"]
        assert me == {"client": first["client"], "user": first["user"], "name": "Ann"}


# --------------------------------------------------------------------- join


async def test_join_gets_joined(hub):
    async with hub() as h:
        a = await h.client()
        await a.send({"op": "join", "room": "lobby"})
        joined = await a.recv()
        assert set(joined) == {"op", "room", "seq", "epoch", "recovered", "presence"}, joined
        assert joined["presence"] == "events"  # a small room: one join/leave frame per change
        assert joined["op"] == "joined" and joined["room"] == "lobby"
        assert joined["seq"] == 0 and joined["recovered"] is False
        assert isinstance(joined["epoch"], str) and joined["epoch"]
        for i in range(3):
            await a.pub("lobby", i)
        assert [(await a.expect("msg"))["seq"] for _ in range(3)] == [1, 2, 3]
        b = await h.client()
        assert await b.join("lobby") == {
            "op": "joined", "room": "lobby", "seq": 3, "epoch": joined["epoch"], "recovered": False, "presence": "events",
        }
        # room names are any non-empty string: dots, slashes, spaces, unicode
        for room in ("chat.general", "a/b/c", "with space", "général ✓ 日本"):
            await b.join(room)


async def test_unknown_fields_are_ignored(hub):
    async with hub() as h:
        a = await h.client()
        await a.send({"op": "hello", "name": "Ann", "client_version": "9", "caps": {"x": [1, 2]}})
        await a.expect("welcome")
        await a.send({"op": "join", "room": "r", "colour": "blue", "nested": {"deep": [None]}, "ref": 1})
        await a.expect("joined", room="r", ref=1)
        await a.send({"op": "pub", "room": "r", "data": 5, "priority": "high", "ref": 2})
        msg, ok = [await a.recv(), await a.recv()]
        assert "priority" not in msg and msg["data"] == 5 and ok == {"op": "ok", "ref": 2, "seq": 1}
        await a.send({"op": "ping", "ref": 3, "extra": True})
        assert await a.recv() == {"op": "pong", "ref": 3}


# --------------------------------------------------------------------- pub / msg


async def test_pub_reaches_every_member_and_the_sender_when_a_member(hub):
    async with hub() as h:
        a, b = await room_of(h, "r", 2)
        outsider = await h.greeted()
        t0 = now_ms()
        msg, ok = await pub_and_collect(a, "r", {"x": 1}, ref=1)
        t1 = now_ms()
        assert ok == {"op": "ok", "ref": 1, "seq": 1}
        assert set(msg) == {"op", "room", "seq", "from", "data", "ts"}, msg
        assert (msg["room"], msg["seq"], msg["from"], msg["data"]) == ("r", 1, a.client_id, {"x": 1})
        assert isinstance(msg["ts"], int) and t0 <= msg["ts"] <= t1  # server time in ms
        assert await b.recv() == msg
        assert await outsider.barrier() == []
        # a client that is not a member may publish: members get it, the publisher only the ok
        await outsider.pub("r", "from outside", ref="o")
        assert await outsider.recv() == {"op": "ok", "ref": "o", "seq": 2}
        assert await outsider.barrier() == []
        for c in (a, b):
            m = await c.expect("msg", room="r", seq=2, data="from outside")
            assert m["from"] == outsider.client_id
        # without a ref there is no ok
        await b.pub("r", [1])
        assert (await b.expect("msg", seq=3))["from"] == b.client_id
        assert await b.barrier() == []
        await a.expect("msg", seq=3, data=[1])


async def test_seq_rises_by_one_per_room(hub):
    async with hub() as h:
        (a,) = await room_of(h, "r1", 1)
        await a.join("r2")
        seen = []
        for i in range(6):
            room = "r1" if i % 3 else "r2"
            msg, ok = await pub_and_collect(a, room, i, ref=i)
            assert ok["seq"] == msg["seq"]
            seen.append((room, msg["seq"], msg["ts"]))
        assert [s for r, s, _ in seen if r == "r1"] == [1, 2, 3, 4]
        assert [s for r, s, _ in seen if r == "r2"] == [1, 2]
        stamps = [t for _, _, t in seen]
        assert stamps == sorted(stamps)


DATA = [
    {"a": 1, "b": [1, 2, {"c": None}], "z": "last"},
    [1, "two", 3.5, None, True, False, {}, []],
    "plain string",
    "",
    0,
    -17,
    3.25,
    1e300,
    12345678901234567890123,
    None,
    True,
    False,
    {},
    [],
    {"ünïcödé": "çødé ✓ 😀", "nested": {"日本": ["語", {"emoji": "🎉", "rtl": "שלום"}]}},
    'quotes " and \\ backslash, \n newline, \t tab, \u2028 line separator, \x00 nul',
]


async def test_data_of_any_json_type_round_trips_exactly(hub):
    async with hub() as h:
        a, b = await room_of(h, "r", 2)
        for seq, data in enumerate(DATA, 1):
            msg, _ = await pub_and_collect(a, "r", data, ref=seq)
            other = await b.expect("msg", seq=seq)
            for got in (msg["data"], other["data"]):
                assert got == data and type(got) is type(data)
                assert json.dumps(got) == json.dumps(data)  # same types, same key order


async def test_data_with_whitespace_inside_is_relayed_as_json(hub):
    """JSON allows whitespace between tokens; the data keeps its value (and stays one frame)."""
    async with hub() as h:
        a, b = await room_of(h, "r", 2)
        await a.send_raw(b'{"op":"pub","room":"r","ref":1,"data":  { "k" : [ 1 , 2 ] ,\t"s": "x y" } }')
        msg = await b.expect("msg", seq=1)
        assert msg["data"] == {"k": [1, 2], "s": "x y"}


@pytest.mark.parametrize("transport", ["ws", "udp"])
@pytest.mark.parametrize("op", ["pub", "send"])
async def test_pretty_printed_data_from_a_message_transport_reaches_stream_members(hub, op):
    async with hub(extra=("tcp",)) as h:
        sender = await h.greeted()
        member = await h.greeted("tcp")
        await member.join("r")
        await member.barrier()
        if op == "pub":
            frame = b'{"op":"pub","room":"r","ref":1,"data":{\n  "a": [\n    1,\n    2\n  ]\n}}'
        else:
            frame = b'{"op":"send","to":"' + member.client_id.encode() + b'","ref":1,"data":{\n  "a": [\n    1,\n    2\n  ]\n}}'
        await sender.send_raw(frame)
        reply = await sender.recv()
        assert reply["op"] == "ok", reply
        got = await member.expect("msg")
        assert got["data"] == {"a": [1, 2]}


@pytest.mark.parametrize("transport", STREAMS + ("udp",))
async def test_data_that_is_not_utf8_is_refused(hub):
    async with hub(extra=("ws",)) as h:
        member = await h.greeted("ws")
        await member.join("r")
        publisher = await h.greeted()
        await publisher.join("r")
        await member.barrier()
        await publisher.send_raw(b'{"op":"pub","room":"r","ref":1,"data":"\xff\xfe"}')
        err = await publisher.expect("error", ref=1)
        assert err["code"] == "bad_frame"
        assert await publisher.barrier() == []
        assert await member.barrier() == []


async def test_pub_reaches_members_on_every_transport(tls_certs):
    """One room, one member per transport: every one gets the same msg."""
    async with hub_server("tcp", certs=tls_certs, extra=("tls", "unix", "ws", "udp")) as h:
        members = {}
        for kind in ("tcp", "tls", "unix", "ws", "udp"):
            c = await h.greeted(kind, name=kind)
            await c.join("all")
            members[kind] = c
        for c in members.values():
            await c.barrier()  # presence events of the later joiners
        await members["udp"].pub("all", {"from": "udp", "✓": [1, None]}, ref=1)
        msgs = [await c.expect("msg", seq=1) for c in members.values()]
        assert all(m == msgs[0] for m in msgs), msgs
        assert msgs[0]["data"] == {"from": "udp", "✓": [1, None]} and msgs[0]["from"] == members["udp"].client_id
        assert await members["udp"].recv() == {"op": "ok", "ref": 1, "seq": 1}


# --------------------------------------------------------------------- leave


async def test_leave_gets_left_and_stops_delivery(hub):
    async with hub() as h:
        a, b = await room_of(h, "r", 2)
        await a.send({"op": "leave", "room": "r"})
        assert await a.recv() == {"op": "left", "room": "r"}
        await b.expect("leave", room="r", client=a.client_id)
        await b.pub("r", "after a left")
        await b.expect("msg", data="after a left")
        assert await a.barrier() == []
        await a.send({"op": "leave", "room": "r", "ref": 9})
        err = await a.expect("error", code="not_member", ref=9)
        assert err["message"]
        await a.send({"op": "leave", "room": "never-joined"})
        await a.expect("error", code="not_member")
        await a.join("r")  # and back in
        await b.expect("join", client=a.client_id)


# --------------------------------------------------------------------- send (direct)


async def test_send_direct_message(hub):
    async with hub() as h:
        a, b = await h.greeted(), await h.greeted()
        await a.send({"op": "send", "to": b.client_id, "data": {"hi": "✓"}})
        assert await b.recv() == {"op": "msg", "from": a.client_id, "data": {"hi": "✓"}}
        assert await a.barrier() == []  # no ref: no reply
        await a.send({"op": "send", "to": b.client_id, "data": [1, 2], "ref": "d1"})
        reply = await a.recv()
        assert reply["ref"] == "d1" and reply["op"] == "ok", reply
        assert await b.recv() == {"op": "msg", "from": a.client_id, "data": [1, 2]}
        # to oneself, and to a client that never said hello (its id is the connection id)
        await a.send({"op": "send", "to": a.client_id, "data": "me"})
        assert await a.recv() == {"op": "msg", "from": a.client_id, "data": "me"}
        c = await h.client()
        await c.barrier()
        (c_id,) = {conn.id for conn in h.server.connections()} - {a.client_id, b.client_id}
        await a.send({"op": "send", "to": c_id, "data": None})
        assert await c.recv() == {"op": "msg", "from": a.client_id, "data": None}


async def test_send_to_unknown_client_is_no_such_client(hub):
    async with hub() as h:
        a, b = await h.greeted(), await h.greeted()
        await a.send({"op": "send", "to": "no-such-id", "data": 1, "ref": 4})
        err = await a.expect("error", code="no_such_client", ref=4)
        assert err["message"]
        gone = b.client_id
        await h.drop(b)
        await a.send({"op": "send", "to": gone, "data": 1})
        await a.expect("error", code="no_such_client")


# --------------------------------------------------------------------- presence


async def test_presence_lists_members(hub):
    async with hub() as h:
        a = await h.greeted(name="Ann")
        b = await h.greeted(name="Bob ✓")
        c = await h.greeted()  # no name
        for x in (a, b, c):
            await x.join("r")
        await a.barrier()
        await b.barrier()
        await a.send({"op": "presence", "room": "r", "ref": 1})
        reply = await a.recv()
        assert set(reply) == {"op", "room", "members", "ref"} and reply["op"] == "presence" and reply["room"] == "r"
        assert sorted(reply["members"], key=lambda m: m["client"]) == sorted(
            [
                {"client": a.client_id, "user": a.user, "name": "Ann"},
                {"client": b.client_id, "user": b.user, "name": "Bob ✓"},
                {"client": c.client_id, "user": c.user, "name": None},
            ],
            key=lambda m: m["client"],
        )
        await c.send({"op": "presence", "room": "elsewhere"})
        await c.expect("error", code="not_member")


async def test_presence_events_go_to_other_members_not_the_subject(hub):
    async with hub() as h:
        a = await h.greeted(name="Ann")
        await a.join("r")
        b = await h.greeted(name="Bob")
        await b.join("r")
        event = await a.recv()
        assert event == {"op": "join", "room": "r", "client": b.client_id, "user": b.user, "name": "Bob"}
        assert await b.barrier() == []  # not to the subject
        outsider = await h.greeted()
        await outsider.join("other")
        await b.send({"op": "leave", "room": "r"})
        await b.expect("left")
        assert await a.recv() == {"op": "leave", "room": "r", "client": b.client_id, "user": b.user, "name": "Bob"}
        assert await b.barrier() == []
        await b.join("r")
        await a.expect("join", client=b.client_id)
        await h.drop(b)  # disconnecting leaves every room
        assert await a.recv() == {"op": "leave", "room": "r", "client": b.client_id, "user": b.user, "name": "Bob"}
        assert await outsider.barrier() == []  # other rooms hear nothing


async def test_presence_off(hub):
    async with hub(presence=False) as h:
        a, b = await h.greeted(), await h.greeted()
        await a.join("r")
        await b.join("r")
        await b.send({"op": "leave", "room": "r"})
        await b.expect("left")
        assert await a.barrier() == []  # no join / leave events


# --------------------------------------------------------------------- history


async def test_history_oldest_first_with_limit_and_epoch(hub):
    async with hub() as h:
        a = await h.greeted()
        joined_epoch = (await a.join("r"))["epoch"]
        live = []
        for i in range(5):
            msg, _ = await pub_and_collect(a, "r", {"n": i}, ref=i)
            live.append(msg)
        await a.send({"op": "history", "room": "r", "limit": 3, "ref": "h"})
        reply = await a.recv()
        assert reply == {"op": "history", "room": "r", "epoch": joined_epoch, "messages": live[2:], "ref": "h"}
        await a.send({"op": "history", "room": "r"})
        assert (await a.expect("history"))["messages"] == live
        await a.send({"op": "history", "room": "r", "limit": 0})
        assert (await a.expect("history"))["messages"] == []
        await a.send({"op": "history", "room": "r", "limit": 100})
        assert (await a.expect("history"))["messages"] == live
        await a.send({"op": "history", "room": "not-mine"})
        await a.expect("error", code="not_member")


async def test_history_keeps_the_last_100_by_default(hub):
    async with hub() as h:
        p = await h.greeted()
        for i in range(1, 102):
            await p.pub("r", i)  # not a member, no ref: nothing comes back
            if i % 20 == 0:
                assert await p.barrier() == []  # paced: UDP is best effort
        assert await p.barrier() == []
        c = await h.greeted()
        assert (await c.join("r"))["seq"] == 101
        await c.send({"op": "history", "room": "r"})
        messages = (await c.expect("history"))["messages"]
        assert [m["seq"] for m in messages] == list(range(2, 102))
        assert [m["data"] for m in messages] == list(range(2, 102))


async def test_history_keeps_history_size(hub):
    async with hub(history_size=3) as h:
        (a,) = await room_of(h, "r", 1)
        for i in range(5):
            await pub_and_collect(a, "r", i, ref=i)
        await a.send({"op": "history", "room": "r"})
        assert [m["seq"] for m in (await a.expect("history"))["messages"]] == [3, 4, 5]


# --------------------------------------------------------------------- refresh / ping


async def test_refresh_without_auth(hub):
    async with hub() as h:
        c = await h.greeted()
        await c.send({"op": "refresh", "token": "anything", "ref": 1})
        assert await c.recv() == {"op": "refreshed", "exp": None, "ref": 1}


async def test_ping_pong(hub):
    async with hub() as h:
        c = await h.client()  # before hello too
        await c.send({"op": "ping"})
        assert await c.recv() == {"op": "pong"}
        await c.send({"op": "ping", "ref": 7})
        assert await c.recv() == {"op": "pong", "ref": 7}
        await c.send({"op": "ping", "ref": "seven"})
        assert await c.recv() == {"op": "pong", "ref": "seven"}
        await c.send({"op": "ping", "ref": None})  # null is "no ref"
        assert await c.recv() == {"op": "pong"}


@pytest.mark.parametrize("ref", [0, 42, -7, 2**63 + 5, "", "r-✓"], ids=repr)
async def test_ref_is_echoed_on_every_reply(hub, ref):
    async with hub() as h:
        other = await h.greeted()
        c = await h.client()
        replies = {}

        async def ask(frame: dict, what: str):
            await c.send({**frame, "ref": ref})
            reply = await c.recv()
            while reply["op"] == "msg" and frame["op"] == "pub":  # our own msg may come first
                reply = await c.recv()
            assert "ref" in reply and reply["ref"] == ref and type(reply["ref"]) is type(ref), (what, reply)
            replies[what] = reply

        await ask({"op": "hello", "name": "R"}, "welcome")
        await ask({"op": "join", "room": "r"}, "joined")
        await ask({"op": "pub", "room": "r", "data": 1}, "ok")
        await ask({"op": "send", "to": other.client_id, "data": 1}, "send-ok")
        await ask({"op": "presence", "room": "r"}, "presence")
        await ask({"op": "history", "room": "r"}, "history")
        await ask({"op": "refresh", "token": "t"}, "refreshed")
        await ask({"op": "ping"}, "pong")
        await ask({"op": "leave", "room": "r"}, "left")
        await ask({"op": "leave", "room": "r"}, "not_member")
        await ask({"op": "send", "to": "nobody", "data": 1}, "no_such_client")
        await ask({"op": "frobnicate"}, "unknown_op")
        await ask({"op": "join", "room": 5}, "bad_frame")
        assert {w: r["op"] for w, r in replies.items()} == {
            "welcome": "welcome", "joined": "joined", "ok": "ok", "send-ok": "ok", "presence": "presence",
            "history": "history", "refreshed": "refreshed", "pong": "pong", "left": "left",
            "not_member": "error", "no_such_client": "error", "unknown_op": "error", "bad_frame": "error",
        }
        assert [replies[k]["code"] for k in ("not_member", "no_such_client", "unknown_op", "bad_frame")] == [
            "not_member", "no_such_client", "unknown_op", "bad_frame",
        ]


# --------------------------------------------------------------------- errors

BAD_FRAMES = [
    (b"this is not json", "not JSON"),
    (b'{"op":"ping"', "truncated JSON"),
    (b"[1,2,3]", "an array"),
    (b'"a string"', "a string"),
    (b"42", "a number"),
    (b"null", "null"),
    (b'{"room":"r"}', "no op"),
    (b'{"op":5}', "op not a string"),
    (b'{"op":"join","room":5}', "room as int"),
    (b'{"op":"join"}', "join without room"),
    (b'{"op":"join","room":"r","since":"3"}', "since as string"),
    (b'{"op":"join","room":"r","since":1.5}', "since as float"),
    (b'{"op":"join","room":"r","epoch":7}', "epoch as int"),
    (b'{"op":"ping","ref":true}', "ref as bool"),
    (b'{"op":"ping","ref":{"a":1}}', "ref as object"),
    (b'{"op":"ping","ref":[1]}', "ref as array"),
    (b'{"op":"ping","ref":1.5}', "ref as float"),
    (b'{"op":"pub","room":"r"}', "pub without data"),
    (b'{"op":"pub","data":1}', "pub without room"),
    (b'{"op":"send","to":5,"data":1}', "to as int"),
    (b'{"op":"history","room":"r","limit":"2"}', "limit as string"),
    (b'{"op":"hello","name":5}', "name as int"),
    (b'{"op":"refresh"}', "refresh without token"),
]


async def test_bad_frames(hub):
    """Every malformed frame gets error bad_frame (with no ref: none could be read) and the
    connection goes on."""
    async with hub(max_errors=100) as h:
        c = await h.greeted()
        for raw, why in BAD_FRAMES:
            await c.send_raw(raw)
            err = await c.recv()
            assert err["op"] == "error" and err["code"] == "bad_frame", (why, err)
            assert isinstance(err["message"], str) and err["message"], (why, err)
            assert "ref" not in err, (why, err)
            assert await c.barrier() == [], why
        await c.join("still-works")


async def test_bad_frame_with_a_readable_ref_echoes_it(hub):
    async with hub() as h:
        c = await h.client()
        await c.send_raw(b'{"op":"join","room":5,"ref":"q"}')
        assert (await c.expect("error", code="bad_frame"))["ref"] == "q"
        await c.send_raw(b'{"op":"history","room":"r","limit":"x","ref":3}')
        assert (await c.expect("error", code="bad_frame"))["ref"] == 3


async def test_unknown_op(hub):
    async with hub() as h:
        c = await h.client()
        await c.send({"op": "frobnicate", "ref": 1})
        err = await c.expect("error", code="unknown_op", ref=1)
        assert set(err) == {"op", "code", "message", "ref"} and err["message"]
        await c.send({"op": "PING"})  # ops are case-sensitive
        await c.expect("error", code="unknown_op")
        assert await c.barrier() == []


async def test_deeply_nested_json_is_a_bad_frame_not_a_crash(hub):
    async with hub() as h:
        c = await h.client()
        depth = 3000  # 6 KB, far under max_frame
        await c.send_raw(b'{"op":"pub","room":"r","data":' + b"[" * depth + b"]" * depth + b',"ref":1}')
        reply = await c.recv()
        assert reply["op"] == "error" and reply["code"] == "bad_frame", reply
        assert await c.barrier() == []


async def test_too_large_frame_gets_too_large_and_the_connection_stays(hub):
    async with hub(max_frame="1KiB") as h:
        c = await h.greeted()
        head = b'{"op":"ping","ref":1,"pad":"'
        exact = head + b"x" * (1024 - len(head) - 2) + b'"}'
        assert len(exact) == 1024
        await c.send_raw(exact)
        assert await c.recv() == {"op": "pong", "ref": 1}  # exactly max_frame is fine
        await c.send_raw(b'{"op":"join","room":"big","ref":2,"pad":"' + b"y" * 2000 + b'"}')
        err = await c.expect("error", code="too_large")
        assert err["message"] and "ref" not in err  # the frame was not read, so neither was its ref
        assert await c.barrier() == []
        assert "big" not in h.app.rooms
        await c.join("r")  # usable


@pytest.mark.parametrize("transport", STREAMS + ("ws",))  # a UDP datagram cannot carry 64 KiB
async def test_default_max_frame_is_64KiB(hub):
    async with hub() as h:
        c = await h.greeted()
        head = b'{"op":"ping","ref":1,"pad":"'
        await c.send_raw(head + b"x" * (65536 - len(head) - 2) + b'"}')
        assert await c.recv() == {"op": "pong", "ref": 1}
        await c.send_raw(head + b"x" * (65537 - len(head) - 2) + b'"}')
        await c.expect("error", code="too_large")
        assert await c.barrier() == []


@pytest.mark.parametrize("transport", STREAMS)
async def test_too_large_line_is_skipped_up_to_its_newline(hub):
    async with hub(max_frame="1KiB") as h:
        c = await h.greeted()
        # one write: an oversized line, then a good one right behind it
        await c.send_raw(b'{"op":"ping","ref":2,"pad":"' + b"y" * 5000 + b'"}\n{"op":"ping","ref":3}')
        await c.expect("error", code="too_large")
        assert await c.recv() == {"op": "pong", "ref": 3}
        assert await c.barrier() == []


@pytest.mark.parametrize("transport", ["ws"])
async def test_far_too_large_websocket_message_closes_1009(hub):
    """Over WebSocket a message a few times max_frame is still read and refused with
    too_large (above); one beyond the hard limit (4 x max_frame) is not read at all: the
    server fails the connection with close code 1009 (message too big)."""
    async with hub(max_frame="1KiB") as h:
        c = await h.greeted()
        await c.send_raw(b'{"op":"join","room":"r","pad":"' + b"y" * 5000 + b'"}')
        frames = await c.closed()
        assert c.close_code == 1009
        assert [f for f in frames if f["op"] != "bye"] == []  # the oversized join was not handled
        await wait_for(lambda: not h.server.connections(), what="the connection to go")
        assert "r" not in h.app.rooms


@pytest.mark.parametrize("transport", ["ws"])
async def test_fatal_websocket_error_says_bye_protocol_first(hub):
    """Invalid UTF-8 in a text message: bye protocol, then close 1007. (A frame beyond the
    hard limit is refused by the WebSocket parser before it is read, with close 1009 and no
    bye: see test_far_too_large_websocket_message_closes_1009.)"""
    async with hub(max_frame="1KiB") as h:
        c = await h.greeted()
        await c.send_raw(b'{"op":"ping","x":"\xff\xfe"}', text=True)
        frames = await c.closed()
        assert c.close_code == 1007
        assert frames == [{"op": "bye", "reason": "protocol", "reconnect": False}]


async def test_unauthorized_and_forbidden(hub):
    async with hub(secret=SECRET) as h:
        c = await h.client()
        await c.send({"op": "join", "room": "chat.a", "ref": 1})
        assert (await c.expect("error", code="unauthorized", ref=1))["message"]
        await c.send({"op": "hello", "token": "not-a-jwt", "ref": 2})
        await c.expect("error", code="unauthorized", ref=2)
        await c.send({"op": "hello", "token": token(rooms=["chat.*"], publish=["chat.news"]), "ref": 3})
        assert await c.expect("welcome", user="alice", ref=3)
        await c.join("chat.a")
        await c.send({"op": "join", "room": "admin", "ref": 4})
        assert (await c.expect("error", code="forbidden", ref=4))["message"]
        await c.send({"op": "pub", "room": "chat.a", "data": 1, "ref": 5})
        await c.expect("error", code="forbidden", ref=5)
        await c.send({"op": "pub", "room": "chat.news", "data": 1, "ref": 6})
        await c.expect("ok", ref=6, seq=1)
        assert await c.barrier() == []


async def test_rate_limited(hub):
    """rate_limit 2/s with bursts of 4: of ten frames sent at once, four are served and six
    refused with rate_limited (each carrying its ref); the connection stays open."""
    async with hub(rate_limit=2) as h:
        c = await h.client()
        for i in range(10):
            await c.send({"op": "ping", "ref": i})
        replies = [await c.recv() for _ in range(10)]
        assert replies[:4] == [{"op": "pong", "ref": i} for i in range(4)]
        for i, r in enumerate(replies[4:], 4):
            assert r["op"] == "error" and r["code"] == "rate_limited" and r["ref"] == i, r
        assert h.server.connections()[0].open


async def test_bare_pings_are_rate_limited_too(hub):
    """A ping as clients send it, byte for byte (the server answers those itself when nothing
    gates them), still goes through the rate limit when there is one."""
    async with hub(rate_limit=2) as h:
        c = await h.client()
        for _ in range(10):
            await c.send_raw(b'{"op":"ping"}')
        replies = [await c.recv() for _ in range(10)]
        assert replies[:4] == [{"op": "pong"}] * 4
        assert [r.get("code") for r in replies[4:]] == ["rate_limited"] * 6, replies


async def test_room_full(hub):
    async with hub(max_room_members=2) as h:
        a, b = await room_of(h, "r", 2)
        c = await h.greeted()
        await c.send({"op": "join", "room": "r", "ref": 1})
        assert (await c.expect("error", code="room_full", ref=1))["message"]
        await a.join("r")  # a member joining again is not a new member
        await c.join("other")  # other rooms are not affected
        await b.send({"op": "leave", "room": "r"})
        await b.expect("left")
        await c.join("r")


# --------------------------------------------------------------------- bye


async def test_bye_idle_after_hello(hub):
    async with hub(idle_timeout=0.15) as h:
        c = await h.greeted()
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await c.closed() == [{"op": "bye", "reason": "idle", "reconnect": True}]
        assert loop.time() - start >= 0.12


async def test_bye_idle_before_hello_uses_hello_timeout(hub):
    """A connection that has sent something but neither said hello nor joined gets
    hello_timeout, not the (long) idle_timeout."""
    async with hub(hello_timeout=0.15, idle_timeout=60) as h:
        c = await h.client()
        await c.send({"op": "ping"})
        await c.expect("pong")
        assert await c.closed(timeout=5) == [{"op": "bye", "reason": "idle", "reconnect": True}]


async def test_joining_without_hello_lengthens_the_idle_timeout(hub):
    """After a join the idle timeout is idle_timeout, not hello_timeout."""
    async with hub(hello_timeout=0.05, idle_timeout=0.25) as h:
        c = await h.client()
        await c.join("r")
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await c.closed() == [{"op": "bye", "reason": "idle", "reconnect": True}]
        assert loop.time() - start >= 0.2  # four hello_timeouts


async def test_default_idle_timeouts(hub):
    """SPEC defaults: 60 s for a connection that has not said hello or joined, 5 minutes after.
    (Read from the connection: waiting minutes is not a unit test.)"""
    async with hub() as h:
        c = await h.client()
        await c.send({"op": "ping"})
        await c.expect("pong")
        (conn,) = h.server.connections()
        assert conn.idle_timeout == 60
        await c.hello()
        assert conn.idle_timeout == 300
        d = await h.client()
        await d.join("r")
        (other,) = [x for x in h.server.connections() if x is not conn]
        assert other.idle_timeout == 300


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_silent_connection_gets_bye_idle_after_hello_timeout(hub):
    async with hub(hello_timeout=0.05, handshake_timeout=30) as h:
        c = await h.client()
        # bounded: 0.5 s is ten hello_timeouts; handshake_timeout (30 s) must not be what fires
        assert await c.closed(timeout=0.5) == [{"op": "bye", "reason": "idle", "reconnect": True}]


@pytest.mark.parametrize("transport", ["tcp"])
async def test_pings_keep_a_connection_alive(hub):
    async with hub(idle_timeout=0.2) as h:
        c = await h.greeted()
        for _ in range(5):  # 0.4 s of activity, twice the idle timeout
            await asyncio.sleep(0.08)  # pacing, not waiting for a condition
            await c.send({"op": "ping"})
            await c.expect("pong")
        assert await c.closed() == [{"op": "bye", "reason": "idle", "reconnect": True}]


async def test_bye_kicked_by_server_disconnect(hub):
    async with hub() as h:
        c = await h.greeted()
        assert h.server.disconnect(c.client_id)
        assert await c.closed() == [{"op": "bye", "reason": "kicked", "reconnect": False}]
        await wait_for(lambda: c.client_id not in h.app.sessions, what="the session to end")
        assert not h.server.disconnect(c.client_id)


async def test_bye_kicked_by_admin_delete(hub):
    async with hub(admin="127.0.0.1:0") as h, aiohttp.ClientSession() as http:
        c = await h.greeted()
        await c.join("r")
        async with http.delete(f"{h.admin_url}/api/connections/{c.client_id}") as r:
            assert r.status == 200
        assert await c.closed() == [{"op": "bye", "reason": "kicked", "reconnect": False}]


async def test_bye_too_many_errors(hub):
    async with hub(max_errors=3) as h:
        c = await h.greeted()
        for i in range(4):
            await c.send({"op": "nope", "ref": i})
        frames = await c.closed()
        assert [(f["op"], f.get("code"), f.get("ref")) for f in frames[:4]] == [("error", "unknown_op", i) for i in range(4)]
        assert frames[4:] == [{"op": "bye", "reason": "too_many_errors", "reconnect": False}]


async def test_bye_shutdown_on_drain(hub, transport):
    async with hub() as h:
        c = await h.greeted()
        await c.join("r")
        stopping = asyncio.ensure_future(h.server.shutdown())
        assert await c.closed() == [{"op": "bye", "reason": "shutdown", "reconnect": True}]
        if transport == "ws":
            assert c.close_code == 1001
        await asyncio.wait_for(stopping, WAIT)


async def test_bye_auth_expired(hub):
    async with hub(secret=SECRET) as h:
        c = await h.client()
        await c.hello(token=token(ttl=0.3))  # exp may be fractional: unix seconds, a number
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await c.closed() == [{"op": "bye", "reason": "auth_expired", "reconnect": True}]
        assert loop.time() - start >= 0.15


@pytest.mark.parametrize("transport", ["tcp"])
async def test_bye_slow_consumer(hub):
    """A client that never reads, in a room a backend floods with big messages: once its send
    buffer passes max_send_buffer it gets bye slow_consumer (after what was already on the wire).
    A member that reads gets every message and stays."""
    async with hub(send_buffer_low="4KiB", send_buffer_high="16KiB", max_send_buffer="64KiB") as h:
        fast = await h.greeted()
        await fast.join("flood")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # keep the kernel's share small
        sock.setblocking(False)
        await loop.sock_connect(sock, addr(h.server, "tcp"))
        await loop.sock_sendall(sock, b'{"op":"join","room":"flood"}\n')
        await wait_for(lambda: len(h.app.rooms.get("flood").members) == 2, what="the join")
        (conn,) = [x for x in h.server.connections() if x.id != fast.client_id]
        big = dumps({"blob": "z" * 32 * 1024})
        sent = 0
        while conn.close_reason is None:
            assert sent < 4000, "never became a slow consumer"  # 128 MiB: far past any socket buffer
            await h.app.publish_raw("flood", big)
            sent += 1
            await asyncio.sleep(0)  # let the flusher write
        assert conn.close_reason == "slow_consumer"
        # now read everything: what got through, then the bye, then the close
        reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024 * 1024)
        c = StreamClient("tcp", reader, writer)
        h.clients.append(c)
        frames = await c.closed()
        assert frames[-1] == {"op": "bye", "reason": "slow_consumer", "reconnect": True}
        assert frames[0]["op"] == "joined"
        seqs = [f["seq"] for f in frames if f["op"] == "msg"]
        assert seqs == sorted(seqs) and len(seqs) < sent  # some were dropped, none reordered
        await fast.expect("join")  # presence: the slow one came
        assert [(await fast.expect("msg"))["seq"] for _ in range(sent)] == list(range(1, sent + 1))
        await fast.expect("leave")  # and went
        assert await fast.barrier() == []


@pytest.mark.parametrize("transport", ["ws"])
async def test_bye_protocol_websocket_invalid_utf8_closes_1007(hub):
    """A fatal framing error: a WebSocket text message that is not UTF-8 fails the connection
    with close code 1007 (RFC 6455 8.1)."""
    async with hub() as h:
        c = await h.greeted()
        await c.join("r")
        await c.send_raw(b'{"op":"ping","x":"\xff\xfe"}', text=True)
        frames = await c.closed()
        assert c.close_code == 1007
        assert all(f["op"] == "bye" for f in frames), frames  # the message itself was not handled
        await wait_for(lambda: not h.server.connections(), what="the connection to go")


@pytest.mark.parametrize("transport", STREAMS + ("udp",))
async def test_no_input_is_fatal_on_stream_and_datagram_transports(hub):
    """bye protocol is for a fatal framing error, one after which the stream cannot be read.
    Line framing has none: a line is read up to its "\\n" whatever its bytes, an oversized one
    is skipped to the next "\\n" (error too_large), and any other bad content is one bad_frame;
    a datagram is always exactly one frame. So on TCP, TLS, Unix and UDP nothing a client sends
    gets bye protocol (only a failing handler would: see the deeply-nested-JSON BUG test).
    Here every kind of garbage gets an error and the connection carries on."""
    async with hub(max_frame="1KiB", max_errors=100) as h:
        c = await h.greeted()
        garbage = [
            (b"\xff\xfe\xfd invalid utf-8", "bad_frame"),
            (b"\x00\x00\x00\x00", "bad_frame"),
            (b"\x16\x03\x01\x02\x00 a TLS hello", "bad_frame"),
            (b"GET / HTTP/1.1", "bad_frame"),
            (b"\r", None),  # a blank line: skipped on streams; UDP: one bad frame
            (b"{" * 900, "bad_frame"),
            (b"z" * 4000, "too_large"),
        ]
        for raw, code in garbage:
            await c.send_raw(raw)
            before = await c.barrier()
            if code is None:
                assert len(before) <= 1 and all(f["code"] == "bad_frame" for f in before), (raw, before)
            else:
                assert [(f["op"], f["code"]) for f in before] == [("error", code)], (raw[:40], before)
        await c.join("r")
        assert h.server.connections()[0].open


@pytest.mark.parametrize("transport", ["ws"])
async def test_websocket_binary_message_is_a_frame_too(hub):
    async with hub() as h:
        c = await h.client()
        await c.send_raw(dumps({"op": "ping", "ref": "bin"}), text=False)
        assert await c.recv() == {"op": "pong", "ref": "bin"}
        assert isinstance(c, WsClient)
