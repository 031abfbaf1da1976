"""Blocking handlers and hooks run in the bounded thread pool: a connection's calls keep their
order, its reads pause while they wait, the pool's size is `blocking_threads`, and pings,
deadlines and other connections go on while a handler sleeps in `time.sleep`."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import wirehub
from wirehub.hub import Hooks

from .helpers import WAIT, addr, serving, wait_for
from .hub.hubclient import hub_server

pytestmark = pytest.mark.one_loop


def sleepy_app(state: dict) -> wirehub.App:
    """``sleep S`` sleeps S seconds in the pool; ``wait`` blocks until ``state["gate"]`` is set."""
    app = wirehub.App(framing="line")
    lock = threading.Lock()
    state["gate"] = threading.Event()

    @app.on_frame(blocking=True)
    def frame(conn, data):
        assert threading.current_thread() is not threading.main_thread()
        with lock:
            state["running"] = state.get("running", 0) + 1
            state["peak"] = max(state.get("peak", 0), state["running"])
        try:
            if data.startswith(b"sleep"):
                time.sleep(float(data.split()[1]))
            elif data == b"wait":
                state["gate"].wait(WAIT)
            conn.send(b"done " + data)
        finally:
            with lock:
                state["running"] -= 1

    return app


async def test_a_blocking_frame_handler_runs_beside_pings_in_order():
    state: dict = {}
    app = sleepy_app(state)
    async with serving(app, tcp="127.0.0.1:0") as server:
        host, port = addr(server)
        slow_r, slow_w = await asyncio.open_connection(host, port)
        other_r, other_w = await asyncio.open_connection(host, port)
        slow_w.write(b"wait\nafter-1\nafter-2\n")
        await slow_w.drain()
        await wait_for(lambda: state.get("running") == 1, what="the handler to block")
        for i in range(5):  # another connection is answered while it blocks, five times over
            other_w.write(b"ping %d\n" % i)
            await other_w.drain()
            assert await asyncio.wait_for(other_r.readline(), WAIT) == b"done ping %d\n" % i
        assert state["running"] == 1  # still blocked: the gate is not set yet
        state["gate"].set()
        lines = [await asyncio.wait_for(slow_r.readline(), WAIT) for _ in range(3)]
        assert lines == [b"done wait\n", b"done after-1\n", b"done after-2\n"]
        for w in (slow_w, other_w):
            w.close()


async def test_the_pool_has_blocking_threads_and_a_waiting_connection_stops_being_read():
    state: dict = {}
    app = sleepy_app(state)
    async with serving(app, tcp="127.0.0.1:0", blocking_threads=2) as server:
        host, port = addr(server)
        conns = [await asyncio.open_connection(host, port) for _ in range(4)]
        started = time.monotonic()
        for _, w in conns:
            w.write(b"sleep 0.3\n")
        answers = [await asyncio.wait_for(r.readline(), WAIT) for r, _ in conns]
        assert answers == [b"done sleep 0.3\n"] * 4
        assert state["peak"] == 2 and time.monotonic() - started >= 0.55  # two rounds of two
        # one connection with many calls queued: its reads pause (backpressure), the others' do not
        r, w = conns[0]
        w.write(b"sleep 0.2\n" + b"x\n" * 200)
        await w.drain()
        await wait_for(lambda: [c._reading_paused for c in server.connections()].count(True) == 1, what="its reading to pause")
        got = [await asyncio.wait_for(r.readline(), WAIT) for _ in range(201)]
        assert got == [b"done sleep 0.2\n"] + [b"done x\n"] * 200
        for _, w in conns:
            w.close()


def test_blocking_is_for_plain_functions():
    app = wirehub.App()
    with pytest.raises(TypeError, match="blocking=True is for plain functions"):

        @app.on_frame(blocking=True)
        async def frame(conn, data):
            pass


async def test_blocking_hub_hooks_keep_order_and_time_out():
    hooks = Hooks()
    gate = threading.Event()

    @hooks.on_rpc("sleep", blocking=True)
    def sleep(ctx, data):
        if data == "gate":  # blocks until the test sets the gate
            gate.wait(WAIT)
            data = 0
        time.sleep(data)
        ctx.state["slept"] = ctx.state.get("slept", 0) + data
        return {"slept": ctx.state["slept"], "thread": threading.current_thread().name}

    async with hub_server("tcp", hooks=hooks, hook_timeout=1.0, heartbeat=0.2) as hub:
        c = await hub.greeted()
        other = await hub.greeted()
        await c.send({"op": "rpc", "method": "sleep", "data": "gate", "ref": 1})
        await c.send({"op": "ping", "ref": 2})
        await c.send({"op": "rpc", "method": "sleep", "data": 0, "ref": 3})
        # answered while c's hook is blocked in the pool (it cannot end before the gate opens)
        await other.request({"op": "ping", "ref": "o"}, "pong", ref="o")
        gate.set()
        first = await c.expect("result", ref=1)
        assert first["data"]["slept"] == 0 and first["data"]["thread"].startswith("wirehub-blocking")
        await c.expect("pong", ref=2)
        await c.expect("result", ref=3)
        await c.request({"op": "rpc", "method": "sleep", "data": 1.5, "ref": 4}, "error", code="timeout", ref=4)
        await c.request({"op": "ping", "ref": 5}, "pong", ref=5)
