"""The hub mounted in a Starlette app, served by a real uvicorn: web clients and socket
clients share rooms."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os

import aiohttp
import pytest
import uvicorn
from websockets.asyncio.client import connect

from .helpers import WAIT, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("asgi_example", os.path.join(ROOT, "examples", "asgi_app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def web():
    example = load_example()
    app, hub = example.create_app(tcp="127.0.0.1:0")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", ws="websockets-sansio"))
    task = asyncio.ensure_future(server.serve())
    await wait_for(lambda: server.started or task.done(), what="uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", hub
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT)


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), WAIT))


async def tcp_client(hub):
    host, _, port = hub.addresses["tcp"][0].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send(obj):
        writer.write(json.dumps(obj).encode() + b"\n")

    async def get():
        return json.loads(await asyncio.wait_for(reader.readline(), WAIT))

    return send, get, writer


async def test_web_and_tcp_clients_share_a_room(web):
    address, hub = web
    async with connect(f"ws://{address}/ws/") as ws:
        await ws.send(json.dumps({"op": "hello", "name": "browser"}))
        welcome = await recv(ws)
        assert welcome["op"] == "welcome"
        await ws.send(json.dumps({"op": "join", "room": "lobby"}))
        assert (await recv(ws))["op"] == "joined"
        send, get, writer = await tcp_client(hub)
        await send({"op": "join", "room": "lobby"})
        assert (await get())["op"] == "joined"
        assert (await recv(ws))["op"] == "join"  # presence: the TCP client arrived
        await send({"op": "pub", "room": "lobby", "data": {"text": "from tcp"}})
        msg = await recv(ws)
        assert msg["op"] == "msg" and msg["data"] == {"text": "from tcp"} and msg["seq"] == 1
        assert (await get())["data"] == {"text": "from tcp"}  # the sender is a member too
        await ws.send(json.dumps({"op": "pub", "room": "lobby", "data": "from the web", "ref": 1}))
        assert (await get())["data"] == "from the web"
        # the web app's own route publishes through the same hub
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://{address}/announce", json={"text": "from a backend"}) as r:
                assert (await r.json())["seq"] == 3
        assert (await get())["data"] == {"text": "from a backend"}
        conns = hub.connections()
        assert sorted(c["transport"] for c in conns) == ["tcp", "ws"]
        assert any(c["rooms"] == ["lobby"] and c["transport"] == "ws" for c in conns)
        writer.close()


async def test_page_is_served_and_points_at_the_mounted_hub(web):
    address, _ = web
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{address}/") as r:
            assert r.status == 200 and str(r.url).endswith("/?ws=/ws/")
            page = await r.text()
        async with http.get(f"http://{address}/wirehub.js") as r:  # the page's client library
            assert r.status == 200 and r.content_type == "text/javascript"
            script = await r.text()
    assert "<title>wirehub chat</title>" in page and "cdn" not in page.lower()
    assert 'import { Hub } from "./wirehub.js"' in page and "export class Hub" in script


async def test_kicking_a_web_client_closes_its_websocket(web):
    address, hub = web
    async with connect(f"ws://{address}/ws/") as ws:
        await ws.send(json.dumps({"op": "hello"}))
        client = (await recv(ws))["client"]
        assert hub.disconnect(client)
        assert await recv(ws) == {"op": "bye", "reason": "kicked", "reconnect": False}
        await asyncio.wait_for(ws.wait_closed(), WAIT)
        assert ws.close_code == 1000
    await wait_for(lambda: not hub.connections(), what="the registry to forget it")
