"""The admin HTTP API over a real socket, with aiohttp's client."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from wirehub import ConfigError

from ..helpers import WAIT, addr, make_config, read_lines, serving
from ..transport.test_stream import Recorder


def base(server) -> str:
    return "http://" + server.addresses["admin"][0]


async def test_health_connections_and_disconnect():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", admin="127.0.0.1:0") as server, aiohttp.ClientSession() as http:
        async with http.get(base(server) + "/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(base(server) + "/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"hello\n")
        await read_lines(reader, 1)
        async with http.get(base(server) + "/api/connections") as r:
            (row,) = await r.json()
        assert row["transport"] == "tcp" and row["peer"].startswith("127.0.0.1:")
        assert (row["bytes_in"], row["bytes_out"], row["msgs_in"], row["msgs_out"]) == (6, 6, 1, 1)
        assert row["send_buffer"] == 0 and row["idle_s"] >= 0 and row["connected_at"] > 1.7e9
        async with http.delete(base(server) + "/api/connections/" + row["id"]) as r:
            assert r.status == 200
        assert await asyncio.wait_for(reader.read(), WAIT) == b"bye kicked\n"
        writer.close()
        (event,) = await app.disconnected()
        assert event[2] == "kicked"
        async with http.delete(base(server) + "/api/connections/" + row["id"]) as r:
            assert r.status == 404 and (await r.json())["error"] == "no_such_connection"


async def test_metrics_in_prometheus_format():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", admin="127.0.0.1:0") as server, aiohttp.ClientSession() as http:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"abc\n")
        await read_lines(reader, 1)
        async with http.get(base(server) + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
        assert 'wirehub_connections{transport="tcp"} 1.0' in text
        assert "wirehub_frames_in_total 1.0" in text and "wirehub_bytes_out_total 4.0" in text
        assert "wirehub_event_loop_lag_seconds_bucket" in text
        writer.close()
        await app.disconnected()
        async with http.get(base(server) + "/metrics") as r:
            text = await r.text()
        assert "wirehub_frames_in_total 1.0" in text  # closed connections still count
        assert 'wirehub_connections_closed_total{reason="closed"} 1.0' in text


async def test_readyz_is_false_while_draining():
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", admin="127.0.0.1:0", drain_timeout=5) as server, aiohttp.ClientSession() as http:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"x\n")
        await read_lines(reader, 1)
        # a client that does not close on EOF keeps the drain going while we ask
        drain = asyncio.ensure_future(server.shutdown())
        await app.wait(lambda log: app.counts.get("closing", 0) == 1)
        async with http.get(base(server) + "/readyz") as r:
            assert r.status == 503 and (await r.json())["reason"] == "draining"
        writer.close()
        await asyncio.wait_for(drain, WAIT)


async def test_token_required_when_set():
    app = Recorder()
    async with serving(app, admin="127.0.0.1:0", admin_token="s3cret") as server, aiohttp.ClientSession() as http:
        async with http.get(base(server) + "/api/connections") as r:
            assert r.status == 401 and "Bearer" in (await r.json())["message"]
        async with http.get(base(server) + "/api/connections", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with http.get(base(server) + "/api/connections", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200 and await r.json() == []
        async with http.get(base(server) + "/healthz") as r:  # probes stay open
            assert r.status == 200


def test_non_loopback_admin_needs_a_token():
    with pytest.raises(ConfigError) as info:
        make_config(admin="0.0.0.0:0")
    assert "admin_token" in str(info.value)
    make_config(admin="0.0.0.0:0", admin_token="t")  # fine with one
