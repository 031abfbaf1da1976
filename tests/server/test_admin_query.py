"""``GET /api/connections`` queries (sort, order, paging, filters, state=closed) and the live
stream's token and query handling, against a real hub over loopback."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from wirehub.hub import Hub

from ..helpers import WAIT


class Line:
    """A hub client over TCP, from outside (plain asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.id = ""

    @classmethod
    async def open(cls, hub: Hub, *, source: str = "127.0.0.1", name: str | None = None, rooms: tuple[str, ...] = ()) -> "Line":
        host, _, port = hub.addresses["tcp"][0].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0))
        c = cls(reader, writer)
        await c.send({"op": "hello", **({"name": name} if name else {})})
        c.id = (await c.expect("welcome"))["client"]
        for room in rooms:
            await c.send({"op": "join", "room": room})
            await c.expect("joined")
        return c

    async def send(self, frame: dict) -> None:
        self.writer.write(json.dumps(frame).encode() + b"\n")
        await self.writer.drain()

    async def recv(self) -> dict:
        line = await asyncio.wait_for(self.reader.readline(), WAIT)
        assert line, "the server closed the connection"
        return json.loads(line)

    async def expect(self, op: str) -> dict:
        while True:
            frame = await self.recv()
            if frame["op"] == op:
                return frame

    def close(self) -> None:
        self.writer.close()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, object, str | None]:
    async with http.get(url) as r:
        return r.status, await r.json(), r.headers.get("X-Total-Count")


async def test_sort_filter_page_and_bad_values():
    async with Hub(tcp="127.0.0.1:0", ws="off", udp="off", admin="127.0.0.1:0") as hub, aiohttp.ClientSession() as http:
        base = "http://" + hub.addresses["admin"][0] + "/api/connections"
        a = await Line.open(hub, rooms=("ops",))
        b = await Line.open(hub, source="127.0.0.2", rooms=("ops", "dev"))
        c = await Line.open(hub, source="127.0.0.3")
        for _ in range(3):  # b is the busiest
            await b.send({"op": "ping"})
            await b.expect("pong")

        status, rows, total = await get(http, base)
        assert status == 200 and total == "3" and [r["id"] for r in rows] == [a.id, b.id, c.id]  # oldest first
        _, rows, _ = await get(http, base + "?sort=msgs_in")  # counters sort descending by default
        assert rows[0]["id"] == b.id
        _, rows, _ = await get(http, base + "?sort=msgs_in&order=asc&limit=1")
        assert len(rows) == 1 and rows[0]["id"] != b.id
        _, rows, total = await get(http, base + "?sort=connected_at&order=desc&offset=1&limit=1")
        assert total == "3" and [r["id"] for r in rows] == [b.id]
        _, rows, total = await get(http, base + "?room=ops")
        assert total == "2" and {r["id"] for r in rows} == {a.id, b.id}
        _, rows, total = await get(http, base + "?room=dev&transport=tcp")
        assert total == "1" and rows[0]["rooms"] == ["dev", "ops"]
        _, rows, total = await get(http, base + f"?user=anon-{c.id}")
        assert total == "1" and rows[0]["id"] == c.id
        _, rows, total = await get(http, base + "?peer=127.0.0.2/31")  # .2 and .3
        assert total == "2" and {r["id"] for r in rows} == {b.id, c.id}
        _, rows, total = await get(http, base + "?peer=127.0.0.1")
        assert total == "1" and rows[0]["id"] == a.id
        _, rows, total = await get(http, base + "?transport=ws")
        assert total == "0" and rows == []
        _, rows, total = await get(http, base + "?room=nowhere")
        assert total == "0" and rows == []

        for query, words in (
            ("sort=bogus", "sort must be one of"),
            ("order=up", "order must be asc or desc"),
            ("limit=-1", "limit must be a whole number from 0 to 10000"),
            ("limit=10001", "limit"),
            ("offset=x", "offset must be a whole number"),
            ("transport=carrier-pigeon", "transport must be one of tcp"),
            ("peer=300.1.2.3/8", "peer must be an address or a network in CIDR form"),
            ("state=zombie", "state must be open or closed"),
            ("sort=closed_at", "closed_at and reason with state=closed"),
            ("sotr=id", "unknown query parameter 'sotr'"),
        ):
            status, body, _ = await get(http, base + "?" + query)
            assert status == 400 and body["error"] == "bad_request" and words in body["message"], (query, body)

        # recently closed: kicked and gone, with the reason and the user it had
        async with http.delete(f"{base}/{b.id}") as r:
            assert r.status == 200
        assert (await b.expect("bye"))["reason"] == "kicked"
        b.close()
        await asyncio.wait_for(_until(lambda: len(hub.server.registry.closed) == 1), WAIT)
        a.close()
        await asyncio.wait_for(_until(lambda: len(hub.server.registry.closed) == 2), WAIT)
        _, rows, total = await get(http, base + "?state=closed")
        assert total == "2" and [r["id"] for r in rows] == [a.id, b.id]  # newest first
        kicked = rows[1]
        assert kicked["reason"] == "kicked" and kicked["user"] == f"anon-{b.id}" and kicked["rooms"] == ["dev", "ops"]
        assert kicked["closed_at"] >= kicked["connected_at"] and kicked["msgs_in"] >= 6
        _, rows, total = await get(http, base + "?state=closed&room=dev")
        assert total == "1" and rows[0]["id"] == b.id
        _, rows, total = await get(http, base + "?state=closed&sort=reason&order=desc&peer=127.0.0.0/8")
        assert [r["reason"] for r in rows] == ["kicked", "closed"]
        _, rows, total = await get(http, base)
        assert total == "1" and rows[0]["id"] == c.id
        c.close()


async def test_the_closed_ring_is_bounded():
    async with Hub(tcp="127.0.0.1:0", ws="off", udp="off", admin="127.0.0.1:0", closed_connections=2) as hub, aiohttp.ClientSession() as http:
        ids = []
        for _ in range(3):
            c = await Line.open(hub)
            ids.append(c.id)
            c.close()
            await asyncio.wait_for(_until(lambda: len(hub.server.registry) == 0), WAIT)
        _, rows, total = await get(http, "http://" + hub.addresses["admin"][0] + "/api/connections?state=closed")
        assert total == "2" and [r["id"] for r in rows] == [ids[2], ids[1]]


async def _until(check) -> None:
    while not check():
        await asyncio.sleep(0.01)


async def test_live_stream_wants_the_token_first_and_follows_the_query():
    async with Hub(tcp="127.0.0.1:0", ws="off", udp="off", admin="127.0.0.1:0", admin_token="s3cret") as hub, aiohttp.ClientSession() as http:
        url = "ws://" + hub.addresses["admin"][0] + "/api/live"
        async with http.ws_connect(url) as ws:
            await ws.send_json({"token": "wrong"})
            msg = await ws.receive_json(timeout=WAIT)
            assert msg["type"] == "error" and msg["error"] == "unauthorized"
            closing = await ws.receive(timeout=WAIT)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4401
        async with http.ws_connect(url) as ws:
            await ws.send_json({"conns": {}})  # no token at all
            assert (await ws.receive_json(timeout=WAIT))["error"] == "unauthorized"
        a = await Line.open(hub, rooms=("ops",))
        b = await Line.open(hub)
        async with http.ws_connect(url) as ws:
            await ws.send_json({"token": "s3cret", "conns": {"sort": "id", "limit": 1}})
            assert (await ws.receive_json(timeout=WAIT))["type"] == "welcome"
            tick = await ws.receive_json(timeout=WAIT)
            assert tick["type"] == "tick" and tick["totals"]["connections"] == 2 and tick["totals"]["by_transport"] == {"tcp": 2}
            assert tick["conns"]["total"] == 2 and [r["id"] for r in tick["conns"]["rows"]] == [min(a.id, b.id)]
            assert tick["app"]["rooms"][0]["room"] == "ops" and tick["app"]["nodes"][0]["self"]
            await ws.send_json({"conns": {"room": "ops"}})
            tick = await ws.receive_json(timeout=WAIT)
            assert tick["conns"]["total"] == 1 and tick["conns"]["rows"][0]["id"] == a.id
            await ws.send_json({"conns": {"sort": "nope"}})
            tick = await ws.receive_json(timeout=WAIT)
            assert "sort must be one of" in tick["conns"]["error"]
        # the page itself and its assets need no token (they hold no data); the API does
        async with http.get("http://" + hub.addresses["admin"][0] + "/") as r:
            assert r.status == 200 and "wirehub" in await r.text() and "default-src 'self'" in r.headers["Content-Security-Policy"]
        async with http.get("http://" + hub.addresses["admin"][0] + "/dashboard/dashboard.js") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
        async with http.get("http://" + hub.addresses["admin"][0] + "/dashboard/admin.py") as r:
            assert r.status == 404  # only the page's own files
        async with http.post("http://" + hub.addresses["admin"][0] + "/api/drain") as r:
            assert r.status == 401
        a.close()
        b.close()


@pytest.mark.parametrize("n", [3])
async def test_drain_from_the_admin_api(n):
    hub = Hub(tcp="127.0.0.1:0", ws="off", udp="off", admin="127.0.0.1:0")
    serving = asyncio.ensure_future(hub.server.serve(install_signals=False))
    try:
        await asyncio.wait_for(_until(lambda: hub.server.started), WAIT)
        clients = [await Line.open(hub) for _ in range(n)]
        async with aiohttp.ClientSession() as http:
            async with http.post("http://" + hub.addresses["admin"][0] + "/api/drain") as r:
                assert r.status == 202 and (await r.json())["connections"] == n
        for c in clients:
            bye = await c.expect("bye")
            assert bye["reason"] == "shutdown" and bye["reconnect"] is True
            c.close()
        assert await asyncio.wait_for(serving, WAIT) == 0
    finally:
        if not serving.done():
            serving.cancel()


async def test_live_streams_waiting_for_their_token_count_toward_max_live():
    """MAX_LIVE bounds every open /api/live stream, those that have not sent their token yet
    included: the next one gets 503 ``limit``; once one goes, a new one is taken again."""
    from wirehub.server.live import MAX_LIVE

    async with Hub(tcp="off", ws="off", udp="off", admin="127.0.0.1:0", admin_token="s3cret") as hub, aiohttp.ClientSession() as http:
        url = "ws://" + hub.addresses["admin"][0] + "/api/live"
        silent = [await http.ws_connect(url) for _ in range(MAX_LIVE)]  # upgraded, no token sent
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url)
        assert refused.value.status == 503
        await silent.pop().close()
        async with http.ws_connect(url) as ws:
            await ws.send_json({"token": "s3cret"})
            assert (await ws.receive_json(timeout=WAIT))["type"] == "welcome"
        for ws in silent:
            await ws.close()


async def test_a_live_stream_queries_its_page_at_most_once_per_interval(monkeypatch):
    """A page that sends a new query as soon as the last one is answered, or a burst of them,
    cannot make the server query per message: one stream's page is queried at most once per
    LIVE_QUERY_INTERVAL, the queries between coalesced, the latest always answered."""
    from wirehub.server import live

    interval = 0.2
    monkeypatch.setattr(live, "LIVE_QUERY_INTERVAL", interval, raising=False)
    queried: list[float] = []
    real = live.run_query

    def counted(*args, **kwargs):
        queried.append(asyncio.get_running_loop().time())
        return real(*args, **kwargs)

    monkeypatch.setattr(live, "run_query", counted)
    async with Hub(tcp="127.0.0.1:0", ws="off", udp="off", admin="127.0.0.1:0") as hub, aiohttp.ClientSession() as http:
        a = await Line.open(hub)
        url = "ws://" + hub.addresses["admin"][0] + "/api/live"
        async with http.ws_connect(url) as ws:
            await ws.send_json({"conns": {"limit": 1}})
            assert (await ws.receive_json(timeout=WAIT))["type"] == "welcome"

            async def page_with(limit: int) -> dict:
                for _ in range(100):  # ticks with the previous query may come first
                    tick = await ws.receive_json(timeout=WAIT)
                    if tick["conns"]["limit"] == limit:
                        return tick["conns"]
                raise AssertionError(f"no page with limit {limit}")

            await page_with(1)
            for limit in range(2, 8):  # a new query as soon as the last is answered
                await ws.send_json({"conns": {"limit": limit}})
                page = await page_with(limit)
                assert page["rows"][0]["id"] == a.id
            for limit in range(10, 60):  # a burst: coalesced, the last one answered
                await ws.send_json({"conns": {"limit": limit}})
            await page_with(59)
        gaps = [b - a for a, b in zip(queried, queried[1:])]
        assert gaps and min(gaps) >= interval * 0.99, gaps  # the loop's timer may fire a hair early
        assert len(queried) < 6 + 50
        a.close()
