"""The multiplayer game example (examples/game): its codec and simulation without sockets,
then the server on real loopback sockets with UDP bots, a cheating bot, garbage, and a real
headless Chromium playing over WebSocket in the same world."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from examples.game import protocol as P
from examples.game.client import ClientCore, UdpPlayer
from examples.game.server import MAX_BAD_MESSAGES, MAX_CREDIT, SNAPSHOT_CREDIT, GameApp
from examples.game.world import INPUT_BURST, MAX_PENDING, World, WorldConfig

from . import browser
from .fuzz import fuzz
from .helpers import WAIT, ServerProcess, addr, free_port, serving, wait_for

REPO = Path(__file__).resolve().parents[1]
#: a world small enough that everyone sees everyone (one area-of-interest neighbourhood)
SMALL = dict(width=800, height=600, pellets=20, obstacles=0, view=400, seed=7)


# ----------------------------------------------------------------------------- codec and world, no sockets


def test_messages_round_trip():
    assert P.decode_client(P.encode_hello("ann", b"c00kie")) == P.Hello("ann", b"c00kie")
    assert len(P.encode_hello("x")) == P.HELLO_MIN
    assert P.hello_cookie(P.encode_hello("ann", b"c00kie")) == b"c00kie"
    assert P.hello_cookie(P.encode_hello("ann")) is None
    assert P.decode_client(P.encode_input(0xDEADBEEF, 7, 12, [(1, 2), (-3, 4)])) == P.Input(0xDEADBEEF, 7, 12, ((1, 2), (-3, 4)))
    assert P.decode_client(P.encode_bye(0xCAFE)) == P.Bye(0xCAFE)
    world = World(WorldConfig(obstacles=3))
    player = world.add_player("ann")
    welcome = world.welcome(player)._replace(token=0xFEEDF00D)
    assert P.decode_server(P.encode_welcome(welcome)) == welcome
    board = P.Board(3, ((1, 9, "ann"), (2, 4, "bob")))
    assert P.decode_server(P.encode_board(board)) == board
    names = P.Names(tuple((i, f"player-{i}é") for i in range(1, P.MAX_NAMES + 1)))
    assert P.decode_server(P.encode_names(names.names)) == names
    assert len(P.encode_names((i, "x" * 40) for i in range(P.MAX_NAMES))) <= P.MAX_DATAGRAM
    assert P.decode_server(P.encode_challenge(b"abc")) == b"abc"
    assert P.decode_server(P.encode_error("full", "try later")) == "full: try later"
    # names: control characters dropped, cut to MAX_NAME bytes at a character
    assert P.decode_client(P.encode_hello("a\x1b[31mb" + "é" * 20)).name == "a[31mb" + "é" * 5


def test_bad_client_messages_say_what_is_wrong():
    assert P.decode_client(b"") == P.Bad("empty message")
    assert "unknown message type 0x7f" in P.decode_client(b"\x7f").reason
    assert "padded to at least 32" in P.decode_client(b"\x01\x01\x00\x00").reason
    assert "version 9" in P.decode_client(b"\x01\x09" + bytes(30)).reason
    assert "1 to 4" in P.decode_client(P.encode_input(5, 0, 9, [(0, 0)])[:13] + b"\x05" + bytes(20)).reason
    assert "must be 18 bytes" in P.decode_client(P.encode_input(5, 0, 9, [(0, 0)]) + b"x").reason
    assert "start at 1" in P.decode_client(P.encode_input(5, 0, 1, [(0, 0), (0, 0)])).reason
    assert "BYE must be 5 bytes" in P.decode_client(b"\x03").reason


def _moving_world(players: int, config: dict, seed: int = 3) -> tuple[World, list, random.Random]:
    world = World(WorldConfig(**config))
    rng = random.Random(seed)
    return world, [world.add_player(f"p{i}") for i in range(players)], rng


def _drive(world: World, players: list, rng: random.Random, seqs: dict) -> None:
    for p in players:
        seqs[p.id] = seqs.get(p.id, 0) + 1
        speed = world.config.max_speed
        world.input(p, seqs[p.id], ((rng.randint(-speed, speed), rng.randint(-speed, speed)),))
    world.step()


@pytest.mark.parametrize("config", [SMALL, dict(width=3200, height=2000, pellets=300, obstacles=10, view=400, seed=1)])
def test_deltas_decode_to_the_same_state_as_full_snapshots(config):
    """A simulated lossy link: the client acknowledges what it decoded, the server deltas
    against the acknowledged snapshot; every decoded delta equals the full snapshot of the
    same view, and no snapshot exceeds the datagram bound."""
    world, players, rng = _moving_world(60, config)
    watcher = players[0]
    ring: dict[int, P.View] = {}  # server side, for the watcher
    acked = 0
    history: dict[int, dict] = {}  # client side
    seqs: dict[int, int] = {}
    deltas = 0
    for _ in range(150):
        _drive(world, players, rng, seqs)
        views = world.views()
        view = views[watcher.id]
        wire = P.encode_snapshot(world.tick, watcher.last_seq, view, ring.get(acked), acked)
        ring[world.tick] = view
        if len(ring) > P.SNAPSHOT_RING:
            del ring[next(iter(ring))]
        assert len(wire) <= P.MAX_SNAPSHOT <= P.MAX_DATAGRAM
        full = P.encode_snapshot(world.tick, watcher.last_seq, view)
        expected = P.apply_snapshot(None, P.decode_snapshot(full))
        assert expected == P.state_of(view)
        assert watcher.id in expected  # a player always sees itself
        for v in set(views.values()):
            v.release()
        if rng.random() < 0.3:
            continue  # lost on the way
        snap = P.decode_snapshot(wire)
        assert snap.tick == world.tick and snap.ack == watcher.last_seq
        state = P.apply_snapshot(history.get(snap.base) if snap.base else None, snap)
        assert state == expected
        deltas += snap.base != 0
        history[snap.tick] = state
        if rng.random() < 0.8:  # the ack itself may be lost too
            acked = snap.tick if snap.tick in ring else acked
    assert deltas > 50


def test_a_crowd_is_capped_so_a_snapshot_fits_a_datagram():
    world, players, rng = _moving_world(400, dict(width=400, height=400, pellets=200, obstacles=0, view=400, seed=2))
    seqs: dict[int, int] = {}
    _drive(world, players, rng, seqs)
    views = world.views()
    for p in players:
        state = P.state_of(views[p.id])
        assert p.id in state
        assert sum(1 for i in state if not i & P.PELLET_BIT) == P.MAX_VIEW_PLAYERS
        assert sum(1 for i in state if i & P.PELLET_BIT) == P.MAX_VIEW_PELLETS
    # the worst delta: every entity of one view replaced by another's
    a, b = views[players[0].id], views[players[-1].id]
    assert len(P.encode_snapshot(2, 0, b, a, 1)) <= P.MAX_SNAPSHOT <= P.MAX_DATAGRAM


def test_the_world_clamps_speed_and_takes_one_command_per_tick():
    world = World(WorldConfig(**SMALL))
    p = world.add_player("fast")
    p.x, p.y = 100.0, 300.0
    step = world.config.max_speed / world.config.tick_hz
    world.input(p, 1, ((32767, 0),))  # a teleport attempt: 1,092 units in one tick
    world.step()
    assert p.x == pytest.approx(100 + step) and p.clamped == 1 and p.last_seq == 1
    # a burst of commands: one per tick, the oldest dropped beyond MAX_PENDING, the rest later
    world.input(p, 1 + 4 * 3, tuple((300, 0) for _ in range(4)))
    for seq in range(17, 41, 4):
        world.input(p, seq, tuple((300, 0) for _ in range(4)))
    assert len(p.pending) == MAX_PENDING and p.cmds_dropped > 0
    x = p.x
    world.step()
    assert p.x == pytest.approx(x + step)
    # over the message rate: dropped before anything is queued
    for seq in range(100, 100 + 2 * INPUT_BURST):
        world.input(p, seq, ((0, 0),))
    assert p.inputs_dropped >= INPUT_BURST - 1


def test_settings_are_checked():
    with pytest.raises(ValueError, match="game setting width must be a whole number from 200 to 8191, got 9000"):
        WorldConfig(width=9000)


@fuzz(400)
@given(st.binary(max_size=80) | st.builds(lambda t, b: bytes([t]) + b, st.sampled_from([1, 2, 3]), st.binary(max_size=60)))
@example(b"\x02" + bytes(9) + b"\x04")
@example(b"\x01\x01\xff")
def test_fuzz_client_decoder_never_raises(data):
    msg = P.decode_client(data)
    assert type(msg) in (P.Hello, P.Input, P.Bye, P.Bad)
    if isinstance(msg, P.Input):
        assert 1 <= len(msg.cmds) <= P.MAX_CMDS and msg.seq >= len(msg.cmds)
    P.hello_cookie(data)
    # the same bytes at a live session's frame handler: refused, never raised
    app = GameApp(WorldConfig(**SMALL))
    conn = _FakeConn()
    app.connect(conn)  # type: ignore[arg-type]
    app.frame(conn, P.encode_hello("x"))  # type: ignore[arg-type]
    app.frame(conn, data)  # type: ignore[arg-type]


@fuzz(300)
@given(st.binary(max_size=120) | st.builds(lambda t, b: bytes([t]) + b, st.sampled_from([0x11, 0x12, 0x13, 0x14, 0x1F]), st.binary(max_size=100)))
@example(b"\x15")
def test_fuzz_client_side_never_raises(data):
    core = ClientCore("fuzz")
    core.receive(P.encode_welcome(World(WorldConfig(**SMALL)).welcome(World(WorldConfig(**SMALL)).add_player("a"))))
    core.receive(data)
    core.command(10, 10)


class _FakeConn:
    """What the frame handler touches of a connection (the fuzz test runs without sockets)."""

    transport = "udp"
    id = "fuzz"
    writable = True
    idle_timeout = 0.0

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed: str | None = None

    def send(self, data: bytes) -> bool:
        self.sent.append(data)
        return True

    def close(self, reason: str = "kicked") -> None:
        self.closed = reason


# ----------------------------------------------------------------------------- on real sockets


async def _drive_players(moves: dict, tick_hz: int, stop: asyncio.Event) -> None:
    """Each UdpPlayer sends its command every tick, as a real client does, until stop."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stop.is_set():
        for player, move in moves.items():
            player.move(*move())
        due += 1 / tick_hz
        await asyncio.sleep(max(0.0, due - loop.time()))


async def _join(server, *names: str, core: type[ClientCore] = ClientCore) -> list[UdpPlayer]:
    players = []
    for name in names:
        p = UdpPlayer(name)
        p.core = core(name)
        await p.join(*addr(server, "udp"))
        players.append(p)
    return players


async def test_udp_players_see_each_other_move():
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, udp="127.0.0.1:0") as server:
        ann, bob = await _join(server, "ann", "bob")
        assert ann.core.player != bob.core.player and len(app.world.players) == 2
        a, b = app.world.players[ann.core.player], app.world.players[bob.core.player]
        a.x, a.y, b.x, b.y = 100.0, 100.0, 600.0, 150.0  # paths that never cross
        stop = asyncio.Event()
        driver = asyncio.ensure_future(_drive_players({ann: lambda: (150, 0), bob: lambda: (0, 150)}, 30, stop))
        try:
            start_ann = app.world.players[ann.core.player].x
            start_bob = app.world.players[bob.core.player].y

            def seen(watcher, target, axis, start):
                pos = watcher.core.positions().get(target.core.player)
                return pos is not None and pos[axis] > start + 40

            await wait_for(lambda: seen(bob, ann, 0, start_ann) and seen(ann, bob, 1, start_bob), what="each bot seeing the other move")
            await wait_for(lambda: ann.core.names.get(bob.core.player) == "bob" and bob.core.names.get(ann.core.player) == "ann", what="the names")
            for p in (ann, bob):
                assert p.core.bad == 0 and not p.core.errors
                assert p.core.corrections <= 1  # honest clients: the prediction holds (but for the move above)
        finally:
            stop.set()
            await driver
            for p in (ann, bob):
                p.close()
        await wait_for(lambda: not app.world.players, what="the players to leave on BYE")


async def test_udp_address_validation_and_the_snapshot_budget():
    """No session before a cookie round trip, a challenge within 3x of what came in, and a
    validated client that goes quiet stops getting snapshots."""
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, udp="127.0.0.1:0") as server:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[bytes] = asyncio.Queue()

        class Raw(asyncio.DatagramProtocol):
            def datagram_received(self, data, a):
                got.put_nowait(data)

        raw, _ = await loop.create_datagram_endpoint(Raw, remote_addr=addr(server, "udp"))
        try:
            hello = P.encode_hello("spoof")
            raw.sendto(hello)
            challenge = await asyncio.wait_for(got.get(), WAIT)
            assert challenge[0] == P.CHALLENGE and len(challenge) <= 3 * len(hello)
            raw.sendto(P.encode_input(0, 0, 1, [(300, 0)]))  # inputs from an unvalidated address: no session
            assert (await asyncio.wait_for(got.get(), WAIT))[0] == P.CHALLENGE
            dropped = server.datagram_endpoints[0].stats["dropped"]
            raw.sendto(b"\x01tiny")  # too small to answer within 3x: nothing
            await wait_for(lambda: server.datagram_endpoints[0].stats["dropped"] > dropped, what="the tiny datagram dropped")
            assert not app.world.players and not server.connections() and got.empty()
            # echoing the cookie makes it a player
            raw.sendto(P.encode_hello("quiet", challenge[1:]))
            welcome = P.decode_server(await asyncio.wait_for(got.get(), WAIT))
            assert isinstance(welcome, P.Welcome) and len(app.world.players) == 1
            raw.sendto(P.encode_input(welcome.token, 0, 1, [(0, 0)]))
            # then silence: at most MAX_CREDIT snapshots (and a board), then nothing, while the world ticks on
            start = app.world.tick
            await wait_for(lambda: app.world.tick >= start + 3 * MAX_CREDIT, what="three credits' worth of ticks")
            snapshots = 0
            while not got.empty():
                snapshots += (await got.get())[0] == P.SNAPSHOT
            assert MAX_CREDIT // 2 <= snapshots <= MAX_CREDIT + SNAPSHOT_CREDIT  # the input's credit may land after the first
        finally:
            raw.close()


class SpeedHack(ClientCore):
    """A hacked client: it moves itself, in its own prediction, as fast as it asks to."""

    def _step(self, x, y, vx, vy):
        w = self.welcome
        return min(max(x + vx / w.tick_hz, 0), w.width), min(max(y + vy / w.tick_hz, 0), w.height)


async def test_a_cheating_bot_is_corrected():
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, udp="127.0.0.1:0") as server:
        (cheat,) = await _join(server, "cheat", core=SpeedHack)
        (honest,) = await _join(server, "honest")
        me = app.world.players[cheat.core.player]
        other = app.world.players[honest.core.player]
        me.x, me.y, other.x, other.y = 60.0, 100.0, 700.0, 500.0  # apart: no collision in the way
        hz = app.world.config.tick_hz
        per_tick = app.world.config.max_speed / hz
        stop = asyncio.Event()
        watched: list[tuple[int, float]] = []  # (tick, x) of the cheater, as the honest bot sees it

        setup_tick = app.world.tick

        def watch():
            pos = honest.core.positions().get(cheat.core.player)
            if pos is not None and honest.core.tick > setup_tick and (not watched or watched[-1][0] != honest.core.tick):
                watched.append((honest.core.tick, pos[0]))
            return (0, 0)

        driver = asyncio.ensure_future(_drive_players({honest: watch}, hz, stop))
        try:
            await wait_for(lambda: cheat.core.located, what="the cheater's first snapshot")
            # 1. a teleport: one command of 32,767 units/s, then too fast: twice the speed limit
            start_tick, start_x = app.world.tick, me.x
            cheat.move(32767, 0)
            for _ in range(12):
                cheat.move(2 * app.world.config.max_speed, 0)
                await asyncio.sleep(1 / hz)
            await wait_for(lambda: me.last_seq == cheat.core.seq, what="every command applied")
            assert me.clamped >= 1 and me.clamped + me.cmds_dropped == 13  # (a stalled loop may drop some)
            assert me.x - start_x <= me.clamped * per_tick + 0.01  # one tick at the speed limit per command, no more
            assert app.world.tick - start_tick >= me.clamped
            # its own prediction ran far ahead; the snapshots pulled it back
            await wait_for(lambda: cheat.core.server_ack == cheat.core.seq, what="the last command acknowledged")
            assert cheat.core.corrections >= 3 and cheat.core.last_correction >= per_tick - 0.2  # each snapshot pulls it back
            assert abs(cheat.core.x - me.x) < 0.2
            # 2. too many inputs: ten messages a tick for one second, each with fresh commands
            start_tick, start_x = app.world.tick, me.x
            for _ in range(hz):
                for _ in range(10):
                    cheat.move(app.world.config.max_speed, 0)
                await asyncio.sleep(1 / hz)
            assert me.inputs_dropped > 0 and me.cmds_dropped > 0
            await wait_for(lambda: not me.pending, what="the queued commands to run out")
            assert me.x - start_x <= (app.world.tick - start_tick) * per_tick + 0.01
            # what others saw: never a step faster than the limit
            assert len(watched) > 20
            for (t0, x0), (t1, x1) in zip(watched, watched[1:]):
                assert x1 - x0 <= (t1 - t0) * per_tick + 0.2, (t0, x0, t1, x1)
            # 3. moving someone else: inputs from another socket open no session and move no one
            raw, _ = await asyncio.get_running_loop().create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=addr(server, "udp"))
            ox = other.x
            for seq in range(1, 30):
                raw.sendto(P.encode_input(0, 0, seq, [(300, 0)]))
            raw.close()
            start_tick = app.world.tick
            await wait_for(lambda: app.world.tick > start_tick + 5, what="a few ticks")
            assert len(app.world.players) == 2 and other.x == ox
        finally:
            stop.set()
            await driver
            cheat.close()
            honest.close()


async def test_garbage_from_a_udp_player_gets_errors_and_spares_the_others():
    """Bad datagrams get an ERROR (at most one a second) but never end a UDP session: its
    source address can be forged, and a stranger must not end someone else's game."""
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, udp="127.0.0.1:0") as server:
        bad, good = await _join(server, "bad", "good")
        session = next(s for s in app.sessions.values() if s.player is not None and s.player.id == bad.core.player)
        rng = random.Random(5)
        for _ in range(MAX_BAD_MESSAGES + 5):
            bad.send(bytes([rng.choice([0, 2, 7, 0x13, 0xFF])]) + rng.randbytes(rng.randint(0, 40)))
        await wait_for(lambda: session.bad + session.forged == MAX_BAD_MESSAGES + 5, what="every bad datagram handled")
        await wait_for(lambda: any(e.startswith("bad_message") for e in bad.core.errors), what="an error")
        assert len(bad.core.errors) <= 2  # at most one a second
        assert bad.core.player in app.world.players and not any(e.startswith("too_many_errors") for e in bad.core.errors)
        ticks = good.core.snapshots
        good.move(0, 0)
        await wait_for(lambda: good.core.snapshots > ticks, what="the good player's next snapshot")
        bad.close()
        good.close()


async def test_forged_datagrams_from_a_players_address_move_close_and_earn_nothing():
    """What a datagram with a forged source address (a player's) looks like to the server: no
    token, or the wrong one. It does not move the player, end its session, earn snapshots for
    its address, or get a WELCOME (bigger than a HELLO) sent there."""
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, udp="127.0.0.1:0") as server:
        (victim,) = await _join(server, "victim")
        me = app.world.players[victim.core.player]
        session = next(s for s in app.sessions.values() if s.player is me)
        welcomes = []
        receive = victim.core.receive
        victim.core.receive = lambda data: (welcomes.append(data) if data[:1] == bytes((P.WELCOME,)) else None, receive(data))[1]
        await wait_for(lambda: session.credit == 0, what="the quiet player's snapshots to stop")
        x, last_seq, token = me.x, me.last_seq, victim.core.token
        for seq in range(1, 11):  # a stranger who knows the address, not the token
            victim.send(P.encode_input(token ^ 0x5A5A, 0, seq, [(300, 0)]))
        victim.send(P.encode_bye(token ^ 1))
        victim.send(P.encode_hello("victim", b"A" * 22))  # a cookie, not the one that opened the session
        await wait_for(lambda: session.forged == 12, what="the forged datagrams dropped")
        assert session.credit == 0 and session.bad == 0  # no snapshots earned, no error sent
        victim.send(victim.core.hello())  # the real client repeating its HELLO: answered
        await wait_for(lambda: len(welcomes) == 1, what="the WELCOME to the real HELLO")
        assert P.decode_server(welcomes[0]).token == token and session.credit <= SNAPSHOT_CREDIT
        start = app.world.tick
        await wait_for(lambda: app.world.tick > start + 3, what="a few ticks")
        assert (me.x, me.last_seq) == (x, last_seq) and me.id in app.world.players and len(welcomes) == 1
        victim.close()  # the real BYE
        await wait_for(lambda: not app.world.players, what="the player to leave on its BYE")


async def test_garbage_on_a_stream_gets_errors_then_a_close():
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))
        for _ in range(MAX_BAD_MESSAGES + 1):
            writer.write((1).to_bytes(4, "big") + b"\x7f")
        received = await asyncio.wait_for(reader.read(), WAIT)  # up to the close
        messages = []
        while received:
            size = int.from_bytes(received[:4], "big")
            messages.append(P.decode_server(received[4:4 + size]))
            received = received[4 + size:]
        assert messages[0] == "bad_message: unknown message type 0x7f"
        assert messages[-1] == f"too_many_errors: {MAX_BAD_MESSAGES} bad messages; closing"
        writer.close()


# ----------------------------------------------------------------------------- the browser, in the same world


@pytest.mark.skipif(not browser.available(), reason="chromium is not installed (scripts/test installs it)")
async def test_browser_and_udp_bots_see_each_other_move(tmp_path):
    """A real Chromium on the page the server serves, playing over WebSocket, and UDP bots:
    each side sees the other move; the page draws the others interpolated ~100 ms behind."""
    app = GameApp(WorldConfig(**(SMALL | dict(pellets=40))))
    chrome = await browser.Browser().start()
    stop = asyncio.Event()
    driver = None
    bots: list[UdpPlayer] = []
    try:
        async with serving(app, udp="127.0.0.1:0", ws="127.0.0.1:0", admin="127.0.0.1:0") as server:
            bots = await _join(server, *(f"bot{i}" for i in range(12)))
            rng = random.Random(9)
            moves = {b: (lambda b=b: b.core.toward_nearest_pellet(rng)) for b in bots}
            driver = asyncio.ensure_future(_drive_players(moves, 30, stop))
            host, port = addr(server, "admin")
            page = await chrome.open(f"http://{host}:{port}/game?name=webby")  # redirected to /game/, query kept
            await page.wait_until("window.game && game.welcome && game.me && game.snapshots.length > 5", "the welcome and snapshots")
            web_id = await page.eval("game.welcome.player")
            assert app.world.players[web_id].name == "webby"
            # a long name is cut at a character, to 16 bytes, and the server takes that HELLO
            hello = await page.eval("(() => { const g = Object.create(game); g.name = 'é'.repeat(9) + 'z'; return [...g.hello()]; })()")
            assert P.decode_client(bytes(hello)) == P.Hello("é" * 8, b"")
            # the bots see the browser's player move right
            web_player = app.world.players[web_id]
            web_player.x, web_player.y = 100.0, 300.0  # room to move right (the page is corrected at once)
            start = web_player.x
            await page.eval("game.setMove(200, 0); true")
            await wait_for(lambda: all((b.core.positions().get(web_id) or (0,))[0] > start + 60 for b in bots), what="every bot seeing the page's player move")
            # the page sees the bots move: a bot's position in the page's newest snapshot changes
            bot_id = bots[0].core.player
            first = await page.eval(f"game.snapshots.at(-1).state.get({bot_id})")
            await page.wait_until(
                f"(p => p && Math.hypot(p[0] - {first[0]}, p[1] - {first[1]}) > 30)(game.snapshots.at(-1).state.get({bot_id}))",
                "a bot moving on the page",
            )
            # others are drawn between two snapshots about 100 ms (3 ticks) behind the newest
            lag = await page.eval("game.tick - game.renderTick")
            assert 0.5 < lag < 8, lag
            assert await page.eval(f"game.rendered.has({bot_id})")
            await page.wait_until(f"game.names.get({bot_id}) === 'bot0'", "the bots' names")
            assert "playing" in await page.eval("document.getElementById('status').textContent")
            shot = os.environ.get("WIREHUB_GAME_SCREENSHOT") or str(tmp_path / "game.png")
            await page.eval("game.setMove(null); true")
            await page.screenshot(shot)
            assert Path(shot).stat().st_size > 10_000
            stop.set()
            await driver
            for b in bots:
                b.close()
    finally:
        stop.set()
        if driver is not None:
            await driver
        await chrome.close()


async def test_the_page_and_stats_are_served_on_the_admin_listener():
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, ws="127.0.0.1:0", admin="127.0.0.1:0") as server:
        host, port = addr(server, "admin")
        loop = asyncio.get_running_loop()

        def get(path):
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=WAIT) as r:
                return r.geturl(), r.headers, r.read()

        url, headers, body = await loop.run_in_executor(None, get, "/game?name=x")
        assert url.endswith("/game/?name=x") and headers["Content-Type"].startswith("text/html")
        assert f'content="ws://{server.addresses["ws"][0]}/"'.encode() in body
        _, headers, body = await loop.run_in_executor(None, get, "/game/game.js")
        assert headers["Content-Type"].startswith("text/javascript") and b"class Game" in body
        await wait_for(lambda: len(app.tick_times) > 3, what="a few ticks")
        _, _, body = await loop.run_in_executor(None, get, "/game/stats")
        stats = json.loads(body)
        assert stats["tick"] > 3 and stats["tick_budget_ms"] == pytest.approx(33.333) and stats["tick_ms"]["p50"] > 0


async def test_a_tcp_player_speaks_the_same_protocol_with_length_framing():
    app = GameApp(WorldConfig(**SMALL))
    async with serving(app, tcp="127.0.0.1:0") as server:
        reader, writer = await asyncio.open_connection(*addr(server))

        async def message():
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), WAIT), "big")
            return P.decode_server(await asyncio.wait_for(reader.readexactly(size), WAIT))

        def send(data):
            writer.write(len(data).to_bytes(4, "big") + data)

        send(P.encode_hello("tcp"))
        welcome = await message()
        assert isinstance(welcome, P.Welcome)
        send(P.encode_input(welcome.token ^ 1, 0, 1, [(300, 0)]))  # not this session's token: told, not applied
        while not isinstance(error := await message(), str):
            pass
        assert error == "bad_token: INPUT must carry the token of this session's WELCOME"
        send(P.encode_input(welcome.token, 0, 1, [(300, 0)]))
        snap = await message()
        while not (isinstance(snap, P.Snapshot) and snap.ack == 1):
            snap = await message()
        assert welcome.player in dict(snap.records) and snap.base == 0
        writer.close()
        await wait_for(lambda: not app.world.players, what="the TCP player to leave")


async def test_a_failing_tick_is_logged_and_the_world_goes_on(caplog):
    app = GameApp(WorldConfig(**SMALL))
    step = app.world.step
    failures = []

    def broken_once():
        if not failures:
            failures.append(app.world.tick)
            raise ZeroDivisionError("a bug in the game")
        step()

    app.world.step = broken_once  # type: ignore[method-assign]
    async with serving(app, udp="127.0.0.1:0"):
        await wait_for(lambda: app.world.tick > 3, what="ticks after the failure")
    assert failures and any(r.message.startswith("tick_failed") and r.exc_info for r in caplog.records)


async def test_one_process_only():
    with pytest.raises(RuntimeError, match="without --workers"):
        async with serving(GameApp(WorldConfig(**SMALL)), udp="127.0.0.1:0", workers=2):
            pass


# ----------------------------------------------------------------------------- the README's commands


@pytest.mark.one_loop
def test_the_readme_commands(tmp_path):
    """``wirehub run examples.game.server:app`` and ``python -m examples.game.bots``, then the
    headless client, from the repository root."""
    readme = (REPO / "examples" / "game" / "README.md").read_text()
    assert "wirehub run examples.game.server:app" in readme and "python -m examples.game.bots --count 100" in readme
    port = free_port()
    server = ServerProcess("run", "examples.game.server:app", "--udp", f"127.0.0.1:{port}", "--ws", "off", "--tcp", "off", "--admin", "off", cwd=str(REPO))
    server.start(tmp_path)
    try:
        server.wait_log("listening transport=udp")
        url = f"udp://127.0.0.1:{port}"
        bots = subprocess.run([sys.executable, "-m", "examples.game.bots", "--url", url, "--count", "5", "--seconds", "2.2", "--report", "1"],
                              cwd=REPO, capture_output=True, text=True, timeout=WAIT * 3)
        assert bots.returncode == 0, bots.stderr
        assert "5 bots joined" in bots.stdout and "5 bots |" in bots.stdout
        client = subprocess.run([sys.executable, "-m", "examples.game.client", "--url", url, "--seconds", "1.5"],
                                cwd=REPO, capture_output=True, text=True, timeout=WAIT * 3)
        assert client.returncode == 0, client.stderr
        assert "joined as player" in client.stdout and "in view" in client.stdout
        nobody = subprocess.run([sys.executable, "-m", "examples.game.client", "--url", f"udp://127.0.0.1:{free_port()}", "--seconds", "1"],
                                cwd=REPO, capture_output=True, text=True, timeout=WAIT * 3)
        assert nobody.returncode == 1 and "is the game server running there?" in nobody.stderr
    finally:
        code = server.stop()
    assert code == 0, server.log
