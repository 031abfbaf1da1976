"""Standing abuse tests for issue 11's remaining findings: each attack as it was found, against
a real hub on loopback, bounded in count and time, with an honest client served meanwhile.

- row 8: slow writers (one frame, then a partial line a byte at a time) outlived hello_timeout;
- row 9: a ``pub`` whose data cannot be relayed was an uncounted ``internal`` error with a
  logged traceback per frame;
- failed ops' tracebacks are bounded and their errors counted;
- the admin publish ignored ``max_frame`` and the room-name limit; ``--deny`` did not cover the
  admin listener; ``GET /api/rooms`` described every room in one request;
- a token limited to some rooms could ``send`` to any client, and client ids were sequential.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket

import aiohttp
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from wirehub.hub import app as hub_app
from wirehub.hub.auth import mint_token
from wirehub.hub.protocol import MAX_ROOM_LENGTH, Presence
from wirehub.transport.connection import new_connection_id

from ..helpers import WAIT, ServerProcess, free_port
from ..hub.hubclient import UdpClient, hub_server

SECRET = "abuse-misc-secret-0123456789abcdefghijklmnopqrstuvwxyz"
BAD_PUB = b'{"op":"pub","room":"r","data":[1e999,\n2],"ref":%d}'  # a newline and a number out of range
MAX_ERRORS = 20  # the default


def tok(sub: str = "alice", **kw) -> str:
    return mint_token(SECRET, sub, **kw)


async def open_line(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)


async def line_request(reader, writer, frame: dict, timeout: float = WAIT) -> dict:
    """Send ``frame`` with a ref; the reply carrying it."""
    writer.write(json.dumps(frame).encode() + b"\n")
    while True:
        reply = json.loads(await asyncio.wait_for(reader.readline(), timeout))
        if reply.get("ref") == frame.get("ref"):
            return reply


class Honest:
    """A client that pings every ``every`` seconds and records the worst round trip."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.worst = 0.0
        self.pings = 0

    async def run(self, until: float, every: float = 0.2) -> None:
        loop = asyncio.get_running_loop()
        ref = 0
        while loop.time() < until:
            ref += 1
            t0 = loop.time()
            reply = await line_request(self.reader, self.writer, {"op": "ping", "ref": ref}, timeout=5.0)
            assert reply["op"] == "pong", reply
            self.worst = max(self.worst, loop.time() - t0)
            self.pings += 1
            await asyncio.sleep(every)  # pacing of the honest client, not a wait for a condition


def serve(tmp_path, *args: str) -> tuple[ServerProcess, int, int]:
    port, admin = free_port(), free_port()
    server = ServerProcess(
        "serve", "--tcp", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--ws", "off", "--udp", "off", *args
    ).start(tmp_path)
    server.wait_port(port)
    server.wait_port(admin)
    return server, port, admin


async def total_connections(admin: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{admin}/api/connections?limit=0") as r:
        assert r.status == 200
        return int(r.headers["X-Total-Count"])


# --------------------------------------------------------------------- row 8: slow writers


SLOW_WRITERS = 200
HELLO_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.5
#: the finding: such connections outlived hello_timeout 4x and more; now they are closed at
#: their timeout plus the deadline tick and a loaded machine's slack
CLOSED_WITHIN = 3.5


async def trickler(port: int, first: list[bytes], every: float, give_up: float) -> tuple[float, bytes]:
    """Send the whole frames ``first``, then a partial line one byte per ``every`` seconds until
    the server closes (or ``give_up`` seconds pass). Returns (seconds open, what was received)."""
    loop = asyncio.get_running_loop()
    reader, writer = await open_line(port)
    t0 = loop.time()
    for frame in first:
        writer.write(frame + b"\n")
    received = asyncio.ensure_future(reader.read())  # everything, until the server closes
    partial = b'{"op":"ping","pad":"' + b"x" * 4096
    i = 0
    try:
        while not received.done() and loop.time() - t0 < give_up:
            writer.write(partial[i : i + 1])
            i += 1
            await asyncio.wait((received,), timeout=every)
        return loop.time() - t0, (received.result() if received.done() else b"")
    finally:
        received.cancel()
        writer.close()


def bye_reasons(data: bytes) -> list[str]:
    return [f.get("reason") for f in map(json.loads, data.splitlines()) if f.get("op") == "bye"]


async def test_row8_slow_writers_are_closed_at_their_timeout(tmp_path):
    server, port, admin = serve(
        tmp_path, "--secret", SECRET, "--hello-timeout", str(HELLO_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT)
    )
    try:
        loop = asyncio.get_running_loop()
        reader, writer = await open_line(port)
        assert (await line_request(reader, writer, {"op": "hello", "token": tok(), "ref": 0}))["op"] == "welcome"
        honest = Honest(reader, writer)
        give_up = 4 * HELLO_TIMEOUT + 2
        authed = tok("slow")
        attacks = (
            # the finding: one frame (refused: no hello yet), then a partial line byte by byte
            [trickler(port, [b'{"op":"ping"}'], 0.1, give_up) for _ in range(SLOW_WRITERS)]
            # a client that said hello, then trickles: only whole frames are activity
            + [trickler(port, [json.dumps({"op": "hello", "token": authed}).encode()], 0.1, give_up) for _ in range(20)]
        )
        # whole frames, but never hello: auth on means hello within hello_timeout of connecting
        pingers = [trickler(port, [b'{"op":"ping"}'] * 1, 0.3, give_up) for _ in range(20)]
        honest_run = asyncio.ensure_future(honest.run(loop.time() + CLOSED_WITHIN))
        results = await asyncio.wait_for(asyncio.gather(*attacks, *pingers), give_up + WAIT)
        await asyncio.wait_for(honest_run, WAIT)

        slow, said_hello = results[:SLOW_WRITERS], results[SLOW_WRITERS : SLOW_WRITERS + 20]
        for open_s, data in slow:
            assert open_s < CLOSED_WITHIN, f"a slow writer stayed open {open_s:.1f}s (hello_timeout {HELLO_TIMEOUT}s)"
            assert bye_reasons(data) == ["idle"], data[-300:]
        for open_s, data in said_hello:
            assert b'"welcome"' in data
            assert IDLE_TIMEOUT * 0.9 < open_s < IDLE_TIMEOUT + CLOSED_WITHIN - HELLO_TIMEOUT, open_s
            assert bye_reasons(data) == ["idle"]
        assert honest.pings >= 5 and honest.worst < 1.0, f"honest ping took {honest.worst:.3f}s"
        assert await total_connections(admin) == 1  # the honest client only: nothing held
        writer.close()
    finally:
        server.stop()
    assert "Traceback" not in server.log


async def test_row8_whole_frames_without_hello_do_not_outlive_hello_timeout(tmp_path):
    """The hello deadline on its own: pings every 0.3 s (a whole frame each, few enough to stay
    under max_errors for a long while) without hello."""
    server, port, _ = serve(tmp_path, "--secret", SECRET, "--hello-timeout", str(HELLO_TIMEOUT))
    try:
        loop = asyncio.get_running_loop()
        reader, writer = await open_line(port)
        t0 = loop.time()
        errors = 0
        while True:
            writer.write(b'{"op":"ping"}\n')
            try:
                line = await asyncio.wait_for(reader.readline(), 0.3)
            except asyncio.TimeoutError:
                continue
            frame = json.loads(line)
            if frame["op"] == "error":
                assert frame["code"] == "unauthorized"
                errors += 1
                await asyncio.sleep(0.3)  # pacing of the attack
                continue
            assert frame == {"op": "bye", "reason": "idle", "reconnect": True}
            break
        assert HELLO_TIMEOUT * 0.9 < loop.time() - t0 < CLOSED_WITHIN and errors < MAX_ERRORS
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
    finally:
        server.stop()


# --------------------------------------------------------------------- row 9: unrelayable data


async def test_row9_unrelayable_data_is_a_counted_bad_frame_without_traceback(tmp_path):
    port, admin, wsp, udpp = free_port(), free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    server = ServerProcess(
        "serve", "--tcp", f"127.0.0.1:{port}", "--ws", f"127.0.0.1:{wsp}", "--udp", f"127.0.0.1:{udpp}",
        "--admin", f"127.0.0.1:{admin}",
    ).start(tmp_path)
    try:
        server.wait_port(port)
        server.wait_port(wsp)
        reader, writer = await open_line(port)
        honest = Honest(reader, writer)
        honest_run = asyncio.ensure_future(honest.run(asyncio.get_running_loop().time() + 1.0))
        # exactly enough to be cut off: a WebSocket client that keeps sending after the server
        # closed may get a reset that discards the frames before it
        frames = MAX_ERRORS + 1

        got: list[dict] = []

        async def read(ws) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    got.append(json.loads(message))

        ws = await ws_connect(f"ws://127.0.0.1:{wsp}/", proxy=None, open_timeout=WAIT)
        reading = asyncio.ensure_future(read(ws))
        with contextlib.suppress(ConnectionClosed):  # the server closes while frames still come
            for ref in range(frames):
                await ws.send((BAD_PUB % ref).decode())
        await asyncio.wait_for(reading, WAIT)
        await ws.close()
        udp = await UdpClient.open(("127.0.0.1", udpp))
        for ref in range(frames):
            await udp.send_raw(BAD_PUB % ref)
        udp_got = await udp.closed()

        for transport, replies in (("ws", got), ("udp", udp_got)):
            errors, bye = replies[:-1], replies[-1]
            assert [e["code"] for e in errors] == ["bad_frame"] * (MAX_ERRORS + 1), (transport, replies[:3])
            assert [e["ref"] for e in errors] == list(range(MAX_ERRORS + 1))
            assert "out of range" in errors[0]["message"] and "data" in errors[0]["message"]
            assert bye == {"op": "bye", "reason": "too_many_errors", "reconnect": False}, transport
        await asyncio.wait_for(honest_run, WAIT)
        assert honest.worst < 1.0
        writer.close()
    finally:
        server.stop()
    log = server.log
    assert "Traceback" not in log and "hub_op_failed" not in log
    assert len(log) < 16_000, f"{len(log)} bytes of log for {2 * frames} bad frames"


async def test_failed_ops_are_counted_and_their_tracebacks_bounded(caplog, monkeypatch):
    """A server bug a client can trigger: each frame gets ``internal`` and counts toward
    max_errors, and only TRACEBACK_BUDGET tracebacks are logged."""
    monkeypatch.setattr(hub_app, "_tracebacks", hub_app.LogBudget(3, 60.0, "hub_op_failed"))
    async with hub_server("tcp") as h:
        async def bug(session, cmd):
            raise RuntimeError("a server bug")

        h.app._ops[Presence] = bug
        c = await h.greeted()
        ok = await h.greeted()
        with caplog.at_level(logging.ERROR, logger="wirehub"):
            for ref in range(3 * MAX_ERRORS):
                await c.send({"op": "presence", "room": "r", "ref": ref})
            frames = await c.closed()
        assert [f["code"] for f in frames[:-1]] == ["internal"] * (MAX_ERRORS + 1)
        assert frames[-1] == {"op": "bye", "reason": "too_many_errors", "reconnect": False}
        assert await ok.barrier() == []
    tracebacks = [r for r in caplog.records if r.exc_info and r.getMessage() == "hub_op_failed"]
    assert len(tracebacks) == 3


def test_log_budget_reports_what_it_suppressed(caplog):
    budget = hub_app.LogBudget(2, 60.0, "thing")
    assert [budget.allow() for _ in range(5)] == [True, True, False, False, False]
    budget._since -= 61  # the window has passed
    with caplog.at_level(logging.ERROR, logger="wirehub"):
        assert budget.allow()
    [record] = [r for r in caplog.records if r.getMessage() == "thing_suppressed"]
    assert record.fields == {"count": 3, "window_s": 60.0}


# --------------------------------------------------------------------- admin API


def admin_hub(**options):
    return hub_server("tcp", admin="127.0.0.1:0", **options)


async def test_admin_publish_obeys_max_frame_and_the_room_name_limit():
    async with admin_hub(max_frame="1KiB") as h, aiohttp.ClientSession() as http:
        c = await h.greeted()
        await c.join("news")
        url = h.admin_url + "/api/rooms/news/publish"
        async with http.post(url, json={"data": "x" * 2000}) as r:
            assert r.status == 413
            err = await r.json()
        assert err["error"] == "too_large" and "max_frame is 1024" in err["message"]

        async def chunks():  # no Content-Length: the size is found by reading
            for _ in range(4):
                yield b" " * 400
            yield b'{"data":1}'

        async with http.post(url, data=chunks()) as r:
            assert r.status == 413 and (await r.json())["error"] == "too_large"
        long_name = "r" * (MAX_ROOM_LENGTH + 1)
        async with http.post(h.admin_url + f"/api/rooms/{long_name}/publish", json={"data": 1}) as r:
            assert r.status == 400
            err = await r.json()
        assert err["error"] == "bad_request" and str(MAX_ROOM_LENGTH) in err["message"]
        assert await c.barrier() == []  # nothing was published
        async with http.post(url, json={"data": "x" * 900}) as r:
            assert r.status == 200 and (await r.json())["seq"] == 1
        assert (await c.expect("msg", room="news", seq=1))["data"] == "x" * 900
        async with http.post(h.admin_url + f"/api/rooms/{'r' * MAX_ROOM_LENGTH}/publish", json={"data": 1}) as r:
            assert r.status == 200


async def test_admin_listener_applies_the_deny_list():
    async with admin_hub(deny="127.0.0.2/32") as h:
        denied = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=denied) as http:
            for path in ("/healthz", "/api/connections", "/api/rooms"):
                async with http.get(h.admin_url + path) as r:
                    assert r.status == 403 and (await r.json())["error"] == "denied", path
        async with aiohttp.ClientSession() as http:
            async with http.get(h.admin_url + "/healthz") as r:
                assert r.status == 200
            async with http.get(h.admin_url + "/metrics") as r:
                assert 'wirehub_connections_refused_total{reason="denied"} 3.0' in await r.text()
        c = await h.greeted()
        await c.request({"op": "ping", "ref": 1}, "pong", ref=1)


async def test_admin_rooms_are_paged():
    rooms = 2500
    async with admin_hub() as h, aiohttp.ClientSession() as http:
        names = sorted(f"room-{i:05d}" for i in range(rooms))
        for name in names:
            await h.app.publish_raw(name, b"1")
        c = await h.greeted()
        await c.join("room-00000")
        async with http.get(h.admin_url + "/api/rooms") as r:
            assert r.status == 200 and r.headers["X-Total-Count"] == str(rooms)
            first = await r.json()
        assert [row["room"] for row in first] == names[:1024]
        assert first[0] == {"room": "room-00000", "members": 1, "seq": 1, "epoch": first[0]["epoch"], "history_size": 1}
        seen = []
        for offset in range(0, rooms, 700):
            async with http.get(h.admin_url + f"/api/rooms?offset={offset}&limit=700") as r:
                seen += [row["room"] for row in await r.json()]
        assert seen == names
        async with http.get(h.admin_url + "/api/rooms?offset=2400&limit=1000") as r:
            assert len(await r.json()) == 100
        async with http.get(h.admin_url + "/api/rooms?limit=0") as r:
            assert await r.json() == [] and r.headers["X-Total-Count"] == str(rooms)
        for query in ("limit=10001", "limit=-1", "offset=-1", "limit=x", "offset=1.5"):
            async with http.get(h.admin_url + "/api/rooms?" + query) as r:
                assert r.status == 400, query
                assert (await r.json())["error"] == "bad_request"
        d = await h.greeted()
        async with http.get(h.admin_url + "/api/connections?limit=1") as r:
            rows = await r.json()
            assert r.headers["X-Total-Count"] == "2" and len(rows) == 1 and rows[0]["id"] == c.client_id
        async with http.get(h.admin_url + "/api/connections?offset=1") as r:
            assert [row["id"] for row in await r.json()] == [d.client_id]
        await c.request({"op": "ping", "ref": 1}, "pong", ref=1)


# --------------------------------------------------------------------- direct messages


async def test_send_needs_the_permission_when_the_token_limits_rooms():
    async with hub_server("tcp", secret=SECRET) as h:
        bob = await h.greeted(token=tok("bob"))
        cases = [
            (tok("restricted", rooms=["chat.*"]), "forbidden"),  # the finding
            (tok("muted", send=False), "forbidden"),
            (tok("granted", rooms=["chat.*"], send=True), "ok"),
            (tok("anyone"), "ok"),  # no rooms claim: unrestricted, direct messages included
        ]
        for token, expected in cases:
            sender = await h.greeted(token=token)
            reply = await sender.request({"op": "send", "to": bob.client_id, "data": "hi", "ref": 7}, "ok" if expected == "ok" else "error", ref=7)
            if expected == "ok":
                assert await bob.expect("msg", **{"from": sender.client_id, "data": "hi"})
            else:
                assert reply["code"] == "forbidden" and '"send": true' in reply["message"]
                assert await bob.barrier() == []


async def test_send_without_auth_is_open():
    async with hub_server("tcp") as h:
        a, b = await h.greeted(), await h.greeted()
        await a.request({"op": "send", "to": b.client_id, "data": 1, "ref": 1}, "ok", ref=1)
        await b.expect("msg", data=1)


# --------------------------------------------------------------------- client ids


ID = re.compile(r"[a-z2-7]{16}")


async def test_client_ids_are_random_and_short():
    async with hub_server("tcp") as h:
        clients = [await h.greeted() for _ in range(50)]
        ids = [c.client_id for c in clients]
        assert len(set(ids)) == len(ids) and all(ID.fullmatch(i) for i in ids), ids[:3]
        # nothing ties one id to the next: no shared prefix as a process tag or counter would give
        for a, b in zip(ids, ids[1:]):
            assert os.path.commonprefix([a, b]).__len__() < 6, (a, b)
        # a guess next to a known id reaches nobody
        guess = ids[-1][:-1] + ("a" if ids[-1][-1] != "a" else "b")
        reply = await clients[0].request({"op": "send", "to": guess, "data": 1, "ref": 2}, "error", ref=2)
        assert reply["code"] == "no_such_client"


def test_new_connection_id_is_unique_and_unpredictable():
    ids = [new_connection_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(ID.fullmatch(i) for i in ids)
    # every position uses the whole alphabet: no fixed part
    for position in range(16):
        assert len({i[position] for i in ids}) == 32
