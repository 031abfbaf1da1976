"""Drain and signals: in-process under load, and real SIGTERM/SIGINT to a server process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time


from ..helpers import WAIT, ServerProcess, addr, free_port, serving
from ..transport.test_stream import Recorder


async def test_drain_under_load_loses_no_acknowledged_frame():
    """Clients stream numbered lines while the server drains. Each gets back an unbroken
    prefix of what it sent (every frame the server read was answered), then the app's last
    frame, then EOF."""
    app = Recorder()
    async with serving(app, tcp="127.0.0.1:0", drain_timeout=10) as server:
        clients = [await asyncio.open_connection(*addr(server)) for _ in range(20)]
        stop_sending = asyncio.Event()

        async def produce(writer):
            i = 0
            try:
                while not stop_sending.is_set() and not writer.is_closing() and i < 20_000:
                    writer.write(b"".join(b"%d\n" % n for n in range(i, i + 50)))
                    i += 50
                    await writer.drain()
                    await asyncio.sleep(0)  # let the server (same loop) keep up
            except (ConnectionError, AssertionError):  # closed under us
                pass

        async def consume(reader, writer):
            data = await asyncio.wait_for(reader.read(-1), WAIT)
            writer.close()  # as any client does on EOF
            return data.split(b"\n")[:-1]

        producers = [asyncio.ensure_future(produce(w)) for _, w in clients]
        consumers = [asyncio.ensure_future(consume(r, w)) for r, w in clients]
        await app.wait(lambda log: app.counts.get("frame", 0) >= 5_000)
        assert not any(p.done() for p in producers)  # still under load when the drain starts
        server.request_stop()
        await asyncio.wait_for(server.shutdown(), WAIT)
        stop_sending.set()
        results = await asyncio.gather(*consumers)
        await asyncio.gather(*producers)
    handled = {}
    for event in app.log:
        if event[0] == "frame":
            handled[event[1]] = handled.get(event[1], 0) + 1
    for lines, conn in zip(results, app.conns):
        assert lines[-1] == b"bye shutdown"
        echoes = lines[:-1]
        assert echoes == [b"%d" % i for i in range(len(echoes))]
        assert len(echoes) == handled[conn.id]  # every frame handled was delivered
    assert len(server.registry) == 0


async def test_drain_aborts_what_does_not_close_in_time():
    app = Recorder()

    @app.on_frame
    def frame(conn, data):
        conn.send(b"z" * 60000)  # fill the peer's socket buffers: it never reads
        app._add("frame", conn.id, data)

    async with serving(app, tcp="127.0.0.1:0", drain_timeout=0.5, close_timeout=30, max_send_buffer="64MiB") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        writer.write(b"x\n" * 500)
        await app.wait(lambda log: app.counts.get("frame", 0) == 500)
        loop = asyncio.get_running_loop()
        started = loop.time()
        server.request_stop()
        await asyncio.wait_for(server.shutdown(), WAIT)
        assert loop.time() - started < 3
        (event,) = await app.disconnected(1)
        assert event[2] == "shutdown"
        writer.close()


def _open_clients(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        s.sendall(b"hi\n")
        assert s.recv(16) == b"hi\n"
        out.append(s)
    return out


def test_sigterm_drains_exits_zero_and_the_port_rebinds_at_once(tmp_path):
    port = free_port()
    args = ("run", "wirehub.apps.echo:app", "--tcp", f"127.0.0.1:{port}", "--udp", "off", "--ws", "off", "--admin", "off")
    server = ServerProcess(*args).start(tmp_path)
    server.wait_port(port)
    clients = _open_clients(port, 10)
    server.proc.send_signal(signal.SIGTERM)
    for s in clients:
        assert s.recv(16) == b""  # closed by the server
        s.close()
    assert server.proc.wait(WAIT) == 0
    assert "draining" in server.log and "stopped" in server.log
    # clients still in TIME_WAIT must not stop a new server from binding the port
    again = ServerProcess(*args).start(tmp_path)
    again.wait_port(port)
    assert again.stop() == 0


def test_second_signal_forces_exit(tmp_path):
    port = free_port()
    app_file = tmp_path / "stuck.py"
    app_file.write_text(
        "import wirehub\n"
        "app = wirehub.App()\n"
        "@app.on_frame\n"
        "def frame(conn, data):\n"
        "    conn.send(b'z' * 60000)\n"
    )
    server = ServerProcess(
        "run", "stuck:app", "--tcp", f"127.0.0.1:{port}", "--udp", "off", "--ws", "off", "--admin", "off",
        "--drain-timeout", "60", "--close-timeout", "60", "--max-send-buffer", "64MiB",
        cwd=str(tmp_path),
    ).start(tmp_path)
    server.wait_port(port)
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.sendall(b"x\n" * 300)  # ~18 MB of replies that are never read: the drain cannot finish
    server.proc.send_signal(signal.SIGTERM)
    server.wait_log("draining")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    code = server.proc.wait(WAIT)
    assert code == 1 and time.monotonic() - started < 5
    assert "forced_exit" in server.log
    s.close()
    server.stop()


def test_sigint_drains_like_sigterm(tmp_path):
    port = free_port()
    server = ServerProcess("run", "wirehub.apps.echo:app", "--tcp", f"127.0.0.1:{port}", "--udp", "off", "--ws", "off", "--admin", "off").start(tmp_path)
    server.wait_port(port)
    clients = _open_clients(port, 3)
    os.kill(server.proc.pid, signal.SIGINT)
    for s in clients:
        assert s.recv(16) == b""
        s.close()
    assert server.proc.wait(WAIT) == 0
    server.stop()


async def _drain_six_clients(app) -> None:
    """Six clients of ``app`` (drain_timeout 0.8 s), a drain, and each told ``bye shutdown``."""
    async with serving(app, tcp="127.0.0.1:0", drain_timeout=0.8) as server:
        clients = [await asyncio.open_connection(*addr(server)) for _ in range(6)]
        for r, w in clients:
            w.write(b"hi\n")
            await r.readline()
        server.request_stop()
        await asyncio.wait_for(server.shutdown(), WAIT)
        for r, w in clients:
            assert await asyncio.wait_for(r.read(), WAIT) == b"bye shutdown\n"
            w.close()


async def test_drain_tells_connections_to_go_in_spread_out_batches(monkeypatch):
    """SPEC: on SIGTERM, bye goes out in batches with jitter so that clients do not all come
    back at once."""
    from wirehub.server import server as server_module

    monkeypatch.setattr(server_module, "DRAIN_BATCH", 2)
    app = Recorder()
    when: list[float] = []

    @app.on_closing
    def closing(conn, reason):
        when.append(asyncio.get_running_loop().time())
        conn.send(b"bye " + reason.encode())

    # drain_timeout 0.8: the batches are spread over half of it, 0.4 s, so 3 batches are
    # 0.13 s apart with jitter between 0.5x and 1.5x on one schedule: at least 0.066 s between
    # batches on time, and a quarter of 0.13 s (0.033 s) when the loop runs behind
    await _drain_six_clients(app)
    assert len(when) == 6
    batches = [when[i : i + 2] for i in range(0, 6, 2)]
    assert all(b[1] - b[0] < 0.03 for b in batches)  # one batch is told at once
    gaps = [batches[i + 1][0] - batches[i][1] for i in range(2)]
    assert all(gap >= 0.03 for gap in gaps), gaps  # and the batches are spaced out


async def test_drain_batches_keep_their_schedule_when_telling_them_takes_time(monkeypatch):
    """The batches' times are on one schedule: the time a batch takes to be told (here at least
    0.12 s, a blocking closing handler) comes off the wait before the next one instead of adding up
    (with 19,000 connections a 5 s spread had grown to 9.7 s). Behind schedule, a batch still
    waits a quarter of a gap."""
    import types

    from wirehub.server import server as server_module

    monkeypatch.setattr(server_module, "DRAIN_BATCH", 2)
    monkeypatch.setattr(server_module.random, "uniform", lambda a, b: 1.0)  # no jitter: gap 0.4 / 3
    waits: list[float] = []

    async def sleep(seconds, *args):
        waits.append(seconds)
        await asyncio.sleep(seconds, *args)

    monkeypatch.setattr(server_module, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep}))
    app = Recorder()

    @app.on_closing
    def closing(conn, reason):
        time.sleep(0.06)  # two per batch: telling a batch takes at least 0.12 s
        conn.send(b"bye " + reason.encode())

    await _drain_six_clients(app)
    gap = 0.4 / 3
    # each batch was due a gap (0.133 s) after the one before and at least 0.12 s of that went
    # to telling that one: what was left (at most 0.013 s) is under a quarter of a gap (0.033 s,
    # clear of it whatever the machine's speed: sleeps only last longer), so each waited the quarter
    # (the waits of a drain that added its work would be a whole gap each)
    batch_waits = [w for w in waits if w < gap]  # the server's other sleeps are longer
    assert batch_waits == [gap / 4, gap / 4], waits
