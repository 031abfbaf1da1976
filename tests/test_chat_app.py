"""examples/chat_app: the chat on the hub's hooks, its users, rooms and messages in a real
SQLite file and in the machine's real PostgreSQL (a schema of its own per test, dropped
after), over TCP and WebSocket with outside clients; and served as the README says,
restarted, with its stored messages kept."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from examples.chat_app import ChatApp
from examples.chat_app.app import HISTORY_MAX, MAX_QUERY, MAX_TEXT
from examples.chat_app.store import MAX_STORED, POOL_SIZE, TRIM_EVERY, open_store, pyformat
from wirehub.hub.auth import mint_token

from .helpers import LineClient, ServerProcess, free_port, reachable
from .hub.hubclient import HubClient, RunningHub, hub_server

REPO = Path(__file__).resolve().parents[1]
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
needs_postgres = pytest.mark.skipif(not reachable(5432), reason="no PostgreSQL at 127.0.0.1:5432 (scripts/test starts it)")
DATABASES = ["sqlite", pytest.param("postgres", marks=needs_postgres)]
_refs = itertools.count(1)


@contextlib.asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """A new, empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if kind == "sqlite":
        yield str(tmp_path / "chat.db")
        return
    import psycopg

    schema = f"chat_test_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as admin:
        await admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{PG_URL}?search_path={schema}"  # the store applies the URL's query as settings
        finally:
            await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@contextlib.asynccontextmanager
async def chat_hub(url: str) -> AsyncIterator[tuple[RunningHub, ChatApp]]:
    """The chat's hooks on a hub with a TCP and a WebSocket listener."""
    chat = ChatApp(url)
    try:
        async with hub_server("tcp", extra=("ws",), hooks=chat.hooks) as hub:
            yield hub, chat
    finally:
        await chat.close()


async def reply(c: HubClient, frame: dict[str, Any]) -> dict[str, Any]:
    """Send ``frame`` with a fresh ref; the reply that carries it (presence events and
    messages that come meanwhile are skipped)."""
    ref = next(_refs)
    await c.send({**frame, "ref": ref})
    while (answer := await c.recv()).get("ref") != ref:
        pass
    return answer


async def until(c: HubClient, op: str) -> dict[str, Any]:
    while (frame := await c.recv())["op"] != op:
        pass
    return frame


async def rpc(c: HubClient, method: str, data: Any) -> Any:
    answer = await reply(c, {"op": "rpc", "method": method, "data": data})
    assert answer["op"] == "result", answer
    return answer["data"]


async def refused(c: HubClient, frame: dict[str, Any]) -> tuple[str, str]:
    answer = await reply(c, frame)
    assert answer["op"] == "error", answer
    return answer["code"], answer["message"]


@pytest.mark.parametrize("kind", DATABASES)
async def test_the_tables_decide_who_connects_and_joins(kind, tmp_path):
    async with database(kind, tmp_path) as url, chat_hub(url) as (hub, chat):
        stranger = await hub.client("tcp")
        assert await refused(stranger, {"op": "hello", "name": "zed"}) == (
            "app.unknown_user", "there is no user 'zed' here: ask an admin to add you")
        assert (await refused(stranger, {"op": "join", "room": "lobby"}))[0] == "unauthorized"  # hello first
        assert (await stranger.hello(name="bob"))["user"] == "bob"  # a refused hello may be tried again

        alice = await hub.greeted("tcp", name="alice")
        carol = await hub.greeted("ws", name="carol")
        await alice.join("lobby")  # public
        await carol.join("lobby")
        assert (await until(alice, "join"))["name"] == "Carol Shaw"  # display names in presence
        presence = await reply(alice, {"op": "presence", "room": "lobby"})
        assert {m["user"]: m["name"] for m in presence["members"]} == {"alice": "Alice Liddell", "carol": "Carol Shaw"}

        assert await refused(carol, {"op": "join", "room": "nowhere"}) == ("app.no_such_room", "there is no room 'nowhere'")
        assert await refused(carol, {"op": "join", "room": "team"}) == ("app.not_invited", "team is private: ask a member to invite you")
        assert (await reply(alice, {"op": "join", "room": "team"}))["op"] == "joined"  # alice is a member

        # the tables are read at each hello and join: a new user, a new room, an invitation
        store = await chat.store()
        await store.add_user("dave", "Dave Brubeck")
        await store.add_room("ops", members=["carol"])
        dave = await hub.greeted("ws", name="dave")
        assert dave.user == "dave"
        assert (await reply(carol, {"op": "join", "room": "ops"}))["op"] == "joined"
        assert (await refused(dave, {"op": "join", "room": "ops"}))[0] == "app.not_invited"


async def test_with_tokens_the_user_is_the_tokens_subject(tmp_path):
    secret = "chat-app-test-secret-of-32-bytes"
    chat = ChatApp(str(tmp_path / "chat.db"))
    try:
        async with hub_server("ws", hooks=chat.hooks, secret=secret) as hub:
            bob = await hub.client()
            assert (await bob.hello(token=mint_token(secret, "bob"), name="alice"))["user"] == "bob"  # not the name he gives
            await bob.join("lobby")
            presence = await reply(bob, {"op": "presence", "room": "lobby"})
            assert [(m["user"], m["name"]) for m in presence["members"]] == [("bob", "Bob Dylan")]
            zed = await hub.client()
            assert (await refused(zed, {"op": "hello", "token": mint_token(secret, "zed"), "name": "bob"}))[0] == "app.unknown_user"
    finally:
        await chat.close()


@pytest.mark.parametrize("kind", DATABASES)
async def test_messages_are_checked_stored_with_display_names_and_read_back(kind, tmp_path):
    async with database(kind, tmp_path) as url, chat_hub(url) as (hub, chat):
        alice = await hub.greeted("tcp", name="alice")
        bob = await hub.greeted("ws", name="bob")
        await alice.join("lobby")
        await bob.join("lobby")

        rule = f'a message is {{"text": "..."}} of 1 to {MAX_TEXT} characters'
        for bad in ("just text", {"text": ""}, {"text": "   "}, {"text": "x" * (MAX_TEXT + 1)}, {"txt": "hi"}, {"text": 5}, None):
            assert await refused(alice, {"op": "pub", "room": "lobby", "data": bad}) == ("app.bad_message", rule), bad
        assert await refused(alice, {"op": "pub", "room": "team", "data": {"text": "hi"}}) == ("not_member", "join team first")

        sent = [" hello, Bob ", "x" * MAX_TEXT, "100% sure", "bye_now"]
        for author, text in zip((alice, alice, bob, alice), sent):
            ok = await reply(author, {"op": "pub", "room": "lobby", "data": {"text": text}})
            assert ok["op"] == "ok"
            got = await until(bob if author is alice else alice, "msg")
            assert got["seq"] == ok["seq"]
        user, name = ("alice", "Alice Liddell") if author is alice else ("bob", "Bob Dylan")
        assert got["data"] == {"id": got["data"]["id"], "user": user, "name": name, "text": "bye_now", "ts": got["data"]["ts"]}

        stored = await (await chat.store()).messages("lobby", HISTORY_MAX)
        assert [(m["user"], m["name"], m["text"]) for m in stored] == [
            ("alice", "Alice Liddell", "hello, Bob"), ("alice", "Alice Liddell", "x" * MAX_TEXT),
            ("bob", "Bob Dylan", "100% sure"), ("alice", "Alice Liddell", "bye_now")]
        assert got["data"] == stored[-1]  # what was published is what is stored
        ids = [m["id"] for m in stored]
        assert ids == sorted(ids)

        # the RPCs, from either transport
        assert await rpc(bob, "messages", {"room": "lobby"}) == stored
        assert await rpc(alice, "messages", {"room": "lobby", "limit": 2}) == stored[2:]
        assert await rpc(bob, "messages", {"room": "lobby", "limit": 2, "before": ids[2]}) == stored[:2]
        assert await rpc(alice, "search", {"room": "lobby", "text": "HELLO"}) == stored[:1]  # any case
        assert await rpc(alice, "search", {"room": "lobby", "text": "0% s"}) == stored[2:3]
        assert await rpc(bob, "search", {"room": "lobby", "text": "_"}) == stored[3:]  # no LIKE wildcards
        assert await rpc(bob, "search", {"room": "lobby", "text": "%"}) == stored[2:3]
        assert await rpc(alice, "search", {"room": "lobby", "text": "o", "limit": 1}) == stored[3:]  # the newest match
        assert await rpc(bob, "search", {"room": "lobby", "text": "nothing like it"}) == []

        bad_requests = [
            ("messages", None, 'send an object: {"room": "lobby", ...}'),
            ("messages", {"room": 5}, 'name the room: {"room": "lobby", ...}'),
            ("messages", {"room": "lobby", "limit": HISTORY_MAX + 1}, f"limit is a whole number from 1 to {HISTORY_MAX}, got {HISTORY_MAX + 1}"),
            ("messages", {"room": "lobby", "limit": "3"}, f"limit is a whole number from 1 to {HISTORY_MAX}, got '3'"),
            ("messages", {"room": "lobby", "before": 0}, f"before is a whole number from 1 to {2**62}, got 0"),
            ("search", {"room": "lobby"}, f'search for a "text" of 1 to {MAX_QUERY} characters'),
            ("search", {"room": "lobby", "text": "q" * (MAX_QUERY + 1)}, f'search for a "text" of 1 to {MAX_QUERY} characters'),
        ]
        for method, data, message in bad_requests:
            assert await refused(alice, {"op": "rpc", "method": method, "data": data}) == ("app.bad_request", message)
        assert await refused(bob, {"op": "rpc", "method": "messages", "data": {"room": "team"}}) == ("not_member", "join team first")


@pytest.mark.parametrize("kind", DATABASES)
async def test_a_room_keeps_its_newest_messages_only(kind, tmp_path):
    """What clients can make the database hold is bounded: past max_stored (MAX_STORED) a
    room's oldest messages go, checked on a room's first message and every trim_every."""
    async with database(kind, tmp_path) as url, chat_hub(url) as (hub, chat):
        store = await chat.store()
        assert (store.max_stored, store.trim_every) == (MAX_STORED, TRIM_EVERY)
        store.max_stored, store.trim_every = 3, 2
        alice = await hub.greeted("tcp", name="alice")
        await alice.join("lobby")
        await alice.join("team")
        await reply(alice, {"op": "pub", "room": "team", "data": {"text": "in team"}})
        for n in range(1, 9):  # trimmed after the 1st, 3rd, 5th and 7th: 3 kept, then one more
            assert (await reply(alice, {"op": "pub", "room": "lobby", "data": {"text": f"m{n}"}}))["op"] == "ok"
        assert [m["text"] for m in await rpc(alice, "messages", {"room": "lobby"})] == ["m5", "m6", "m7", "m8"]
        assert [m["text"] for m in await rpc(alice, "messages", {"room": "team"})] == ["in team"]  # other rooms keep theirs
        await reply(alice, {"op": "pub", "room": "lobby", "data": {"text": "m9"}})
        assert [m["text"] for m in await store.messages("lobby", HISTORY_MAX)] == ["m7", "m8", "m9"]


def test_the_sql_is_written_once_and_read_by_psycopg():
    # $N becomes %s with its argument in that place; a literal % is kept
    assert pyformat("SELECT $2 WHERE a = $1 AND b LIKE '%x' AND c = $1", ("one", "two")) == (
        "SELECT %s WHERE a = %s AND b LIKE '%%x' AND c = %s", ["two", "one", "one"])


@needs_postgres
async def test_postgres_keeps_to_its_pool_and_the_urls_settings(tmp_path):
    async with database("postgres", tmp_path) as url:
        # search_path (from the fixture) and statement_timeout are server settings, a value
        # with a space in it included; application_name is libpq's own
        store = await open_store(f"{url},%20public&statement_timeout=5s&application_name=chat%20test")
        try:
            sql = "SELECT pg_backend_pid(), current_setting('search_path'), current_setting('statement_timeout'), current_setting('application_name')"
            rows = [r[0] for r in await asyncio.gather(*(store._fetch(sql) for _ in range(3 * POOL_SIZE)))]
            assert len({pid for pid, *_ in rows}) == POOL_SIZE  # as many connections as callers, up to POOL_SIZE
            schema = url.rsplit("=", 1)[1]
            assert {tuple(settings) for _, *settings in rows} == {(f"{schema}, public", "5s", "chat test")}
            assert await store.display_name("alice") == "Alice Liddell"  # the tables went to that schema
        finally:
            await store.close()


@pytest.mark.parametrize("kind", DATABASES)
async def test_stored_messages_outlive_the_hub(kind, tmp_path):
    async with database(kind, tmp_path) as url:
        async with chat_hub(url) as (hub, _):
            alice = await hub.greeted("tcp", name="alice")
            await alice.join("lobby")
            assert (await reply(alice, {"op": "pub", "room": "lobby", "data": {"text": "before the restart"}}))["op"] == "ok"
        async with chat_hub(url) as (hub, _):  # a new hub, a new memory broker: the same database
            bob = await hub.greeted("ws", name="bob")
            assert (await bob.join("lobby"))["seq"] == 0  # the hub's own history went with it
            [kept] = await rpc(bob, "messages", {"room": "lobby"})
            assert (kept["user"], kept["name"], kept["text"]) == ("alice", "Alice Liddell", "before the restart")


@pytest.mark.one_loop
async def test_served_as_the_readme_says_and_restarted(tmp_path):
    """``wirehub serve --app examples.chat_app:hub`` with CHAT_DATABASE, stopped with SIGTERM
    and started again on the same file."""
    readme = (REPO / "README.md").read_text()
    assert "pip install -e '.[chat]'" in readme and "python -m examples.chat_app" in readme
    assert "wirehub serve --app examples.chat_app:hub" in readme
    port = free_port()
    env = {"CHAT_DATABASE": str(tmp_path / "chat.db")}
    args = ("serve", "--app", "examples.chat_app:hub", "--tcp", f"127.0.0.1:{port}", "--ws", "off", "--udp", "off", "--admin", "off")
    for texts in (["first run"], ["first run", "second run"]):
        server = ServerProcess(*args, cwd=str(REPO), env=env).start(tmp_path)
        try:
            server.wait_port(port)
            c = await LineClient.open(port)
            assert (await c.request({"op": "hello", "name": "carol"}, "welcome"))["user"] == "carol"
            await c.request({"op": "join", "room": "lobby"}, "joined")
            await c.request({"op": "pub", "room": "lobby", "data": {"text": texts[-1]}}, "ok")
            stored = (await c.request({"op": "rpc", "method": "messages", "data": {"room": "lobby"}}, "result"))["data"]
            assert [(m["name"], m["text"]) for m in stored] == [("Carol Shaw", t) for t in texts]
            c.close()
        finally:
            assert server.stop() == 0, server.log
        assert "error" not in server.log.lower(), server.log
