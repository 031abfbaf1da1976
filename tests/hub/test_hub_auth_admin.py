"""Token auth (SPEC.md "Hub wire protocol": hello/refresh, HS256 with the secret, RS256 with a
public key, room globs), the ``wirehub token`` command, the hub's admin HTTP routes and the
embedding API (``wirehub.hub.Hub``), over real loopback sockets with outside clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wirehub.hub import Hub
from wirehub.hub.auth import mint_token

from ..helpers import WAIT, wait_for
from .hubclient import StreamClient, hub_server

SECRET = "auth-admin-test-secret-0123456789abcdefghijklmnopqrstuvwxyz"  # >= 48 bytes: HS384 too


def auth_hub(**options):
    return hub_server("tcp", secret=SECRET, **options)


def tok(sub: str = "alice", **kw) -> str:
    return mint_token(SECRET, sub, **kw)


# --------------------------------------------------------------------- before hello

BEFORE_HELLO = [
    {"op": "join", "room": "r"},
    {"op": "leave", "room": "r"},
    {"op": "pub", "room": "r", "data": 1},
    {"op": "send", "to": "someone", "data": 1},
    {"op": "presence", "room": "r"},
    {"op": "history", "room": "r"},
]

@pytest.mark.parametrize(
    "frame",
    BEFORE_HELLO
    + [
        pytest.param({"op": "ping"}, id="ping"),
        pytest.param({"op": "refresh", "token": "VALID"}, id="refresh"),
    ],
    ids=lambda f: f["op"],
)
async def test_ops_before_hello_are_unauthorized(frame):
    async with auth_hub() as h:
        c = await h.client()
        if frame.get("token") == "VALID":
            frame = {**frame, "token": tok()}
        await c.send({**frame, "ref": "x"})
        err = await c.recv()
        assert err["op"] == "error" and err["code"] == "unauthorized" and err["ref"] == "x", err
        assert "hello" in err["message"]
        await c.hello(token=tok())  # the connection is still usable
        await c.join("r")
        assert await c.barrier() == []


async def test_a_bare_ping_before_hello_is_unauthorized():
    """The ping as clients send it, byte for byte (no ref): with auth on, it is not answered
    by the server's own fast path but refused like any op before hello."""
    async with auth_hub() as h:
        c = await h.client()
        await c.send_raw(b'{"op":"ping"}')
        err = await c.recv()
        assert err["op"] == "error" and err["code"] == "unauthorized" and "ref" not in err, err
        await c.hello(token=tok())
        await c.send_raw(b'{"op":"ping"}')
        assert await c.recv() == {"op": "pong"}


def _rsa_pair():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public


BAD_TOKENS = {
    "missing": None,
    "empty": "",
    "not a jwt": "definitely.not.a-jwt",
    "wrong secret": mint_token("another-secret-that-is-long-enough-0123456789", "alice"),
    "expired": mint_token(SECRET, "alice", ttl=60, clock=lambda: time.time() - 3600),
    "alg none": jwt.encode({"sub": "alice", "exp": time.time() + 3600}, None, algorithm="none"),
    "no sub": jwt.encode({"exp": time.time() + 3600}, SECRET, algorithm="HS256"),
    "no exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
    "HS384": jwt.encode({"sub": "alice", "exp": time.time() + 3600}, SECRET, algorithm="HS384"),
}


@pytest.mark.parametrize("why", list(BAD_TOKENS))
async def test_hello_with_a_bad_token_is_unauthorized(why):
    async with auth_hub() as h:
        c = await h.client()
        frame = {"op": "hello", "ref": 1}
        if BAD_TOKENS[why] is not None:
            frame["token"] = BAD_TOKENS[why]
        await c.send(frame)
        err = await c.expect("error", code="unauthorized", ref=1)
        assert err["message"] and SECRET not in err["message"]
        if BAD_TOKENS[why]:
            assert BAD_TOKENS[why] not in err["message"]  # tokens are never echoed
        await c.send({"op": "join", "room": "r"})
        await c.expect("error", code="unauthorized")  # still not authenticated
        assert (await c.hello(token=tok()))["user"] == "alice"  # and it may try again


async def test_token_claims_name_the_user():
    async with auth_hub() as h:
        c = await h.client()
        welcome = await c.hello(token=tok("bob", name="Bobby"))
        assert welcome["user"] == "bob"
        await c.join("r")
        await c.send({"op": "presence", "room": "r"})
        assert (await c.expect("presence"))["members"] == [{"client": welcome["client"], "user": "bob", "name": "Bobby"}]
        d = await h.client()
        await d.hello(token=tok("bob", name="Bobby"), name="B. on a phone")  # hello's name wins
        await d.join("r")
        event = await c.expect("join", client=d.client_id)
        assert (event["user"], event["name"]) == ("bob", "B. on a phone")


async def test_room_and_publish_globs():
    async with auth_hub() as h:
        c = await h.client()
        await c.hello(token=tok(rooms=["chat.*", "dm.alice"], publish=["chat.news", "telemetry.*"]))
        for room in ("chat.general", "chat.x.y", "dm.alice"):
            await c.join(room)
        for i, room in enumerate(("chat", "dm.bob", "telemetry.cpu", "Chat.general")):
            await c.send({"op": "join", "room": room, "ref": i})
            await c.expect("error", code="forbidden", ref=i)
        await c.send({"op": "pub", "room": "chat.news", "data": 1, "ref": "n"})
        assert (await c.recv())["op"] == "ok"  # not a member of chat.news: just the ok
        await c.send({"op": "pub", "room": "telemetry.cpu", "data": 0.5, "ref": "t"})
        assert (await c.recv()) == {"op": "ok", "ref": "t", "seq": 1}  # write-only room
        await c.send({"op": "pub", "room": "chat.general", "data": 1, "ref": "g"})
        await c.expect("error", code="forbidden", ref="g")  # publish globs, not rooms, decide
        assert await c.barrier() == []
        # publish follows rooms when the token has no publish claim; an empty list grants nothing
        d = await h.client()
        await d.hello(token=tok("dora", rooms=["chat.*"]))
        await d.send({"op": "pub", "room": "chat.general", "data": 2, "ref": 1})
        await d.expect("ok", ref=1)
        await c.expect("msg", room="chat.general", data=2)
        e = await h.client()
        await e.hello(token=tok("eve", rooms=[]))
        await e.send({"op": "join", "room": "chat.general", "ref": 1})
        await e.expect("error", code="forbidden", ref=1)


async def test_refresh_extends_the_session():
    async with auth_hub() as h:
        c = await h.client()
        short = jwt.encode({"sub": "alice", "exp": time.time() + 0.5}, SECRET, algorithm="HS256")
        await c.hello(token=short)
        await c.join("r")
        fresh = tok(ttl=3600)
        await c.send({"op": "refresh", "token": fresh, "ref": 1})
        reply = await c.recv()
        assert reply == {"op": "refreshed", "exp": jwt.decode(fresh, SECRET, algorithms=["HS256"])["exp"], "ref": 1}
        # bounded wait well past the first token's expiry (0.5 s): no bye may come
        await c.silent(0.8)
        assert await c.barrier() == []
        await c.join("r2")


async def test_refresh_refuses_another_user_or_a_bad_token():
    async with auth_hub() as h:
        c = await h.client()
        await c.hello(token=tok("alice"))
        await c.join("r")
        await c.send({"op": "refresh", "token": tok("mallory"), "ref": 1})
        err = await c.expect("error", code="unauthorized", ref=1)
        assert "mallory" in err["message"]
        await c.send({"op": "refresh", "token": "garbage", "ref": 2})
        await c.expect("error", code="unauthorized", ref=2)
        await c.send({"op": "presence", "room": "r"})
        (me,) = (await c.expect("presence"))["members"]
        assert me["user"] == "alice"  # unchanged


async def test_refused_refresh_does_not_extend():
    async with auth_hub() as h:
        c = await h.client()
        await c.hello(token=jwt.encode({"sub": "alice", "exp": time.time() + 0.5}, SECRET, algorithm="HS256"))
        await c.send({"op": "refresh", "token": tok("mallory")})
        await c.expect("error", code="unauthorized")
        assert await c.closed() == [{"op": "bye", "reason": "auth_expired", "reconnect": True}]


async def test_bye_auth_expired_with_a_one_second_token():
    async with auth_hub() as h:
        c = await h.client()
        await c.hello(token=tok(ttl=1))  # exp is whole seconds, rounded up: 1 to 2 s from now
        await c.join("r")
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await c.closed(timeout=3) == [{"op": "bye", "reason": "auth_expired", "reconnect": True}]
        assert loop.time() - start < 2.5


async def test_rs256_with_a_public_key(tmp_path):
    key, public = _rsa_pair()
    path = tmp_path / "public.pem"
    path.write_bytes(public)
    other_key, _ = _rsa_pair()
    async with hub_server("tcp", token_algorithm="rs256", public_key=str(path)) as h:
        c = await h.client()
        good = jwt.encode({"sub": "rosa", "exp": time.time() + 60, "rooms": ["ops.*"]}, key, algorithm="RS256")
        assert (await c.hello(token=good))["user"] == "rosa"
        await c.join("ops.alerts")
        await c.send({"op": "join", "room": "chat", "ref": 1})
        await c.expect("error", code="forbidden", ref=1)
        for i, bad in enumerate(
            [
                jwt.encode({"sub": "rosa", "exp": time.time() + 60}, other_key, algorithm="RS256"),
                mint_token(SECRET, "rosa"),  # HS256 is not accepted when RS256 is configured
                jwt.encode({"sub": "rosa", "exp": time.time() + 60}, "x" * 40, algorithm="HS256"),
            ]
        ):
            d = await h.client()
            await d.send({"op": "hello", "token": bad, "ref": i})
            await d.expect("error", code="unauthorized", ref=i)


async def test_hs256_token_signed_with_the_public_key_is_refused(tmp_path):
    """The algorithm-confusion attack: an HS256 token whose 'secret' is the server's public key."""
    import base64
    import hashlib
    import hmac

    key, public = _rsa_pair()
    path = tmp_path / "public.pem"
    path.write_bytes(public)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps({"sub": "root", "exp": time.time() + 60}).encode())
    forged = signing_input + "." + b64(hmac.new(public, signing_input.encode(), hashlib.sha256).digest())
    async with hub_server("tcp", token_algorithm="rs256", public_key=str(path)) as h:
        c = await h.client()
        await c.send({"op": "hello", "token": forged, "ref": 1})
        await c.expect("error", code="unauthorized", ref=1)


def test_wirehub_token_cli_mints_a_token_the_hub_accepts():
    out = subprocess.run(
        [sys.executable, "-m", "wirehub", "token", "--sub", "alice", "--secret", SECRET, "--rooms", "chat.*"],
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
    )
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token

    async def use():
        async with auth_hub() as h:
            c = await h.client()
            assert (await c.hello(token=token))["user"] == "alice"
            await c.join("chat.lobby")
            await c.send({"op": "join", "room": "admin", "ref": 1})
            await c.expect("error", code="forbidden", ref=1)

    asyncio.run(use())
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["rooms"] == ["chat.*"]
    assert 3590 <= claims["exp"] - time.time() <= 3610  # default --ttl 1h


# --------------------------------------------------------------------- admin HTTP


def admin_hub(**options):
    return hub_server("tcp", admin="127.0.0.1:0", **options)


async def test_admin_rooms(tmp_path):
    async with admin_hub(history_size=2) as h, aiohttp.ClientSession() as http:
        a = await h.greeted(name="Ann")
        b = await h.greeted()
        epoch = (await a.join("chat"))["epoch"]
        await b.join("chat")
        await b.join("quiet")
        for i in range(3):
            await a.send({"op": "pub", "room": "chat", "data": i})
        async with http.get(h.admin_url + "/api/rooms") as r:
            assert r.status == 200 and r.content_type == "application/json"
            rooms = await r.json()
        assert rooms == [
            {"room": "chat", "members": 2, "seq": 3, "epoch": epoch, "history_size": 2},
            {"room": "quiet", "members": 1, "seq": 0, "epoch": epoch, "history_size": 0},
        ]
        async with http.get(h.admin_url + "/api/rooms/chat") as r:
            assert r.status == 200
            room = await r.json()
        assert {k: room[k] for k in ("room", "members", "seq", "epoch", "history_size")} == rooms[0]
        assert sorted(room["member_list"], key=lambda m: m["client"]) == sorted(
            [
                {"client": a.client_id, "user": a.user, "name": "Ann"},
                {"client": b.client_id, "user": b.user, "name": None},
            ],
            key=lambda m: m["client"],
        )
        async with http.get(h.admin_url + "/api/rooms/no-such-room") as r:
            assert r.status == 404 and (await r.json())["error"] == "no_such_room"
        c = await h.greeted()
        await c.join("a/b c")  # names that need quoting in a URL path
        async with http.get(h.admin_url + "/api/rooms/a%2Fb%20c") as r:
            assert r.status == 200 and (await r.json())["room"] == "a/b c"


async def test_admin_publish_reaches_members_and_returns_the_seq():
    async with admin_hub(extra=("ws",)) as h, aiohttp.ClientSession() as http:
        tcp = await h.greeted()
        ws = await h.greeted("ws")
        epoch = (await tcp.join("news"))["epoch"]
        await ws.join("news")
        await tcp.barrier()
        await tcp.send({"op": "pub", "room": "news", "data": "first"})
        await tcp.expect("msg", seq=1)
        await ws.expect("msg", seq=1)
        for seq, data in enumerate([{"a": 1}, "text ✓", None, [1, [2]], 3.5], 2):
            t0 = int(time.time() * 1000)
            async with http.post(h.admin_url + "/api/rooms/news/publish", json={"data": data}) as r:
                assert r.status == 200
                assert await r.json() == {"room": "news", "seq": seq, "epoch": epoch}
            for c in (tcp, ws):
                msg = await c.expect("msg", room="news", seq=seq)
                assert msg["data"] == data and t0 <= msg["ts"] <= int(time.time() * 1000)
                assert "from" in msg
        # a room with no members: published all the same (history keeps it)
        async with http.post(h.admin_url + "/api/rooms/empty/publish", json={"data": 1}) as r:
            assert (await r.json())["seq"] == 1
        assert await tcp.barrier() == [] and await ws.barrier() == []


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1,2]", b"{}", b'{"x":1}', b"", b'{"data":1', b'"data"'],
    ids=["not-json", "array", "empty-object", "no-data", "empty", "truncated", "string"],
)
async def test_admin_publish_bad_body_is_400(body):
    async with admin_hub() as h, aiohttp.ClientSession() as http:
        c = await h.greeted()
        await c.join("news")
        async with http.post(h.admin_url + "/api/rooms/news/publish", data=body) as r:
            assert r.status == 400
            err = await r.json()
        assert err["error"] == "bad_request" and err["message"]
        assert await c.barrier() == []  # nothing was published
        async with http.get(h.admin_url + "/api/rooms/news") as r:
            assert (await r.json())["seq"] == 0


async def test_admin_publish_pretty_printed_body():
    async with admin_hub() as h, aiohttp.ClientSession() as http:
        c = await h.greeted()
        await c.join("news")
        body = json.dumps({"data": {"title": "hello", "tags": ["a", "b"]}}, indent=2).encode()
        async with http.post(h.admin_url + "/api/rooms/news/publish", data=body) as r:
            assert r.status == 200, await r.text()
        msg = await c.expect("msg", room="news")
        assert msg["data"] == {"title": "hello", "tags": ["a", "b"]}


async def test_admin_connections_rows_include_user_and_rooms():
    async with admin_hub(secret=SECRET, extra=("ws",)) as h, aiohttp.ClientSession() as http:
        alice = await h.client()
        await alice.hello(token=tok("alice"), name="Alice")
        await alice.join("chat.b")
        await alice.join("chat.a")
        stranger = await h.client("ws")
        await stranger.send({"op": "ping"})
        await stranger.expect("error", code="unauthorized")  # auth is on: hello comes first
        async with http.get(h.admin_url + "/api/connections") as r:
            assert r.status == 200
            rows = {row["transport"]: row for row in await r.json()}
        assert set(rows) == {"tcp", "ws"}
        row = rows["tcp"]
        assert row["id"] == alice.client_id and row["user"] == "alice" and row["rooms"] == ["chat.a", "chat.b"]
        for key in ("peer", "connected_at", "idle_s", "bytes_in", "bytes_out", "msgs_in", "msgs_out", "send_buffer"):
            assert key in row, key
        assert row["msgs_in"] == 3 and row["peer"].startswith("127.0.0.1:")
        assert rows["ws"]["rooms"] == [] and rows["ws"]["user"] != "alice"


async def test_admin_readyz_and_drain():
    async with admin_hub() as h, aiohttp.ClientSession() as http:
        async with http.get(h.admin_url + "/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(h.admin_url + "/healthz") as r:
            assert r.status == 200
        c = await h.greeted()
        # a client that does not close at once keeps the drain going while we ask
        stopping = asyncio.ensure_future(h.server.shutdown())
        await c.expect("bye", reason="shutdown", reconnect=True)
        async with http.get(h.admin_url + "/readyz") as r:
            assert r.status == 503 and (await r.json())["ready"] is False
        await c.close()
        await asyncio.wait_for(stopping, WAIT)


# --------------------------------------------------------------------- embedding


async def test_embedded_hub_publish_connections_disconnect():
    async with Hub(tcp="127.0.0.1:0", ws="off", udp="off", admin="off") as hub:
        host, _, port = hub.addresses["tcp"][0].rpartition(":")
        c = await StreamClient.open("tcp", (host, int(port)))
        try:
            welcome = await c.hello(name="embedded")
            await c.join("alerts")
            pub = await hub.publish("alerts", {"a": 1})
            msg = await c.expect("msg", room="alerts", seq=pub.seq, data={"a": 1})
            assert pub.seq == 1 and isinstance(msg["ts"], int)
            await hub.publish("alerts", "plain")
            await c.expect("msg", seq=2, data="plain")

            (row,) = hub.connections()
            assert row["id"] == welcome["client"] and row["transport"] == "tcp"
            assert row["user"] == welcome["user"] and row["rooms"] == ["alerts"] and row["name"] == "embedded"

            assert hub.disconnect(welcome["client"]) is True
            assert await c.closed() == [{"op": "bye", "reason": "kicked", "reconnect": False}]
            await wait_for(lambda: not hub.connections(), what="the connection to go")
            assert hub.disconnect(welcome["client"]) is False
        finally:
            await c.close()


async def test_admin_number_parameters_are_parsed_alike_everywhere():
    """offset and limit mean the same on every route that takes them, the dashboard's stream
    included: ASCII digits within the route's bound, empty or absent for the default, and any
    other value a 400 (the stream: a refusal) whose message names the parameter, its bound
    and the value."""
    async with admin_hub() as h, aiohttp.ClientSession() as http:
        a = await h.greeted()
        await a.join("chat")
        await a.send({"op": "pub", "room": "chat", "data": 1})
        await a.barrier()
        routes = {  # route -> (the number parameter, its bound)
            "/api/connections": ("limit", "0 to 10000"),
            "/api/rooms": ("limit", "0 to 10000"),
            "/api/rooms/chat/history": ("limit", "0 to 1000"),
        }
        bad = ["-1", "x", "+1", " 1", "1_0", "1.0", "\u0661", "99999", "9" * 5000]
        for route, (key, bound) in routes.items():
            for value in bad:
                async with http.get(h.admin_url + route, params={key: value}) as r:
                    body = await r.json()
                assert r.status == 400, (route, value, body)
                assert body == {"error": "bad_request", "message": f"{key} must be a whole number from {bound}, got {value!r}"}, (route, value)
            for value in ("", "1", "0001"):
                async with http.get(h.admin_url + route, params={key: value}) as r:
                    assert r.status == 200, (route, value, await r.text())
        for route in ("/api/connections", "/api/rooms"):
            async with http.get(h.admin_url + route, params={"offset": "-1"}) as r:
                assert r.status == 400
                assert (await r.json())["message"] == "offset must be a whole number from 0 or more, got '-1'"
        async with http.get(h.admin_url + "/api/rooms/chat/history", params={"limit": ""}) as r:
            assert r.status == 200 and len((await r.json())["messages"]) == 1  # the default
        async with http.ws_connect(h.admin_url + "/api/live") as ws:
            await ws.send_str(json.dumps({"conns": {"offset": "+1"}}))
            refusal = await ws.receive_json(timeout=WAIT)
        assert refusal == {"type": "error", "error": "bad_request", "message": "offset must be a whole number from 0 or more, got '+1'"}
