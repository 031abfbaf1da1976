"""The hub's memory limits, frame by frame over loopback TCP: rooms per connection and per
node, history replies bounded in bytes (paged with ``before``), and join replays paced by the
send buffer draining (an honest client recovers a replay far bigger than its send buffer)."""

from __future__ import annotations

import asyncio
import json
import socket

from ..helpers import WAIT, addr, wait_for
from .hubclient import hub_server


def tcp_hub(**options):
    return hub_server("tcp", **options)


def shrink_send_buffer(h, client: str) -> None:
    """Make the kernel keep little for this client: what the hub sends it then piles up in
    the hub's own buffers, as for a peer behind a slow network (loopback would otherwise
    absorb megabytes)."""
    sock = h.app.sessions[client].conn._transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def slow_reader(target):
    """A connection whose kernel receive buffer is tiny, read only when the test says so:
    what the server sends it piles up in the server's send buffer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, target)
    return await asyncio.open_connection(sock=sock, limit=1 << 16)


async def test_rooms_per_connection_are_limited(tmp_path):
    async with tcp_hub(max_rooms_per_connection=3) as h:
        c = await h.greeted()
        for room in ("a", "b", "c"):
            await c.join(room)
        await c.send({"op": "join", "room": "d", "ref": 1})
        error = await c.expect("error", code="limit", ref=1)
        assert "max_rooms_per_connection" in error["message"]
        await c.join("a")  # joining one it is in again is not a new room
        await c.request({"op": "leave", "room": "b"}, "left")
        await c.join("d")
        other = await h.greeted()
        await other.join("e")  # the limit is per connection
        assert sorted(h.app.sessions[c.client_id].rooms) == ["a", "c", "d"]


async def test_rooms_per_node_are_limited_for_joins_and_publishes():
    async with tcp_hub(max_rooms=3, presence=False) as h:
        a = await h.greeted()
        await a.join("one")
        await a.join("two")
        await a.pub("three", "kept in history", ref=1)  # a room with history but no member counts
        await a.expect("ok", ref=1)
        b = await h.greeted()
        await b.send({"op": "join", "room": "four", "ref": 2})
        error = await b.expect("error", code="limit", ref=2)
        assert "max_rooms" in error["message"] and "max_rooms_per_connection" not in error["message"]
        await b.pub("four", 1, ref=3)
        await b.expect("error", code="limit", ref=3)
        assert "four" not in h.app.rooms and "four" not in h.app.broker.rooms_held
        await b.join("one")  # rooms that exist stay open to everyone
        await b.join("three")
        await b.pub("two", "fine", ref=4)
        await b.expect("ok", ref=4)
        await a.expect("msg", room="two", data="fine")
        # "two" holds a message: with no member left it still counts, as a room with history
        await a.request({"op": "leave", "room": "two"}, "left")
        await b.send({"op": "join", "room": "four", "ref": 5})
        await b.expect("error", code="limit", ref=5)


async def test_room_without_history_is_freed_when_its_last_member_leaves():
    async with tcp_hub(max_rooms=1) as h:
        a = await h.greeted()
        await a.join("x")
        await a.request({"op": "leave", "room": "x"}, "left")
        await a.join("y")


async def test_history_reply_is_bounded_in_bytes_and_pages_back():
    async with tcp_hub(history_reply_bytes=2048) as h:
        a = await h.greeted()
        await a.join("r")
        for i in range(1, 21):
            await a.pub("r", {"n": i, "pad": "x" * 300}, ref=i)
            frames = [await a.recv(), await a.recv()]
            assert {f["op"] for f in frames} == {"msg", "ok"}
        seen: list[int] = []
        before = None
        pages = 0
        while True:
            ask = {"op": "history", "room": "r", "ref": "h"}
            if before is not None:
                ask["before"] = before
            await a.send(ask)
            reply = await a.expect("history", ref="h")
            pages += 1
            seqs = [m["seq"] for m in reply["messages"]]
            assert seqs == sorted(seqs) and seqs, reply
            assert len(str(reply).encode()) < 2048 + 400
            seen = seqs + seen
            if not reply.get("more"):
                break
            before = seqs[0]
        assert seen == list(range(1, 21))
        assert pages >= 4
        # the newest message always comes, even when it alone is over the limit
        await a.pub("r", {"pad": "y" * 3000}, ref="big")
        await a.recv(), await a.recv()
        await a.send({"op": "history", "room": "r", "ref": "h2"})
        reply = await a.expect("history", ref="h2", more=True)
        assert [m["seq"] for m in reply["messages"]] == [21]
        # limit and before together: the newest 2 below seq 10
        await a.send({"op": "history", "room": "r", "before": 10, "limit": 2})
        reply = await a.expect("history")
        assert [m["seq"] for m in reply["messages"]] == [8, 9] and "more" not in reply


async def test_honest_client_recovers_a_replay_far_bigger_than_its_send_buffer():
    """5 MB of history replayed to a client whose send buffer is 256 KiB: paced by its
    reading, everything arrives in order, and it is not taken for a slow consumer."""
    async with tcp_hub(max_send_buffer="256KiB") as h:
        p = await h.greeted()
        pad = "z" * 50_000
        for i in range(1, 101):
            await p.pub("r", {"n": i, "pad": pad}, ref=i)
            await p.expect("ok", ref=i)
        c = await h.greeted()
        epoch = (await c.join("r"))["epoch"]
        await c.request({"op": "leave", "room": "r"}, "left")
        joined = await c.join("r", since=0, epoch=epoch)
        assert joined["recovered"] is True and joined["seq"] == 100
        for i in range(101, 106):  # live, while the replay is being paced
            await p.pub("r", {"n": i}, ref=i)
        got = []
        while len(got) < 105:
            frame = await c.recv()
            assert frame["op"] == "msg", frame  # no bye slow_consumer
            got.append(frame["seq"])
        assert got == list(range(1, 106))
        assert await c.barrier() == []
        assert not h.app._replays


async def test_client_that_falls_behind_its_replay_is_disconnected_never_given_a_gap():
    """A recovering client that does not read while the room moves on is closed as a slow
    consumer (reconnect:true) once what waits for it passes its send buffer; what it got
    before has no gap, and its reconnect from there is told recovered:false."""
    async with tcp_hub(max_send_buffer="128KiB", history_size=20) as h:
        p = await h.greeted()
        for i in range(1, 21):
            await p.pub("r", {"n": i, "pad": "z" * 50_000}, ref=i)
            await p.expect("ok", ref=i)
        epoch = (await p.join("r"))["epoch"]
        reader, writer = await slow_reader(addr(h.server, "tcp"))
        writer.write(b'{"op":"hello"}\n')
        client = json.loads(await asyncio.wait_for(reader.readline(), WAIT))["client"]
        shrink_send_buffer(h, client)
        writer.write(b'{"op":"join","room":"r","since":0,"epoch":"%s"}\n' % epoch.encode())
        await writer.drain()
        await wait_for(lambda: len(h.app.rooms["r"].members) == 2, what="the join")
        # nobody reads c: the room moves on, 400 x 5 KB wait for it
        for i in range(21, 421):
            await p.pub("r", {"n": i, "pad": "y" * 5_000})
            if i % 50 == 0:
                await p.barrier()  # p is a member: its own msgs come back; keep its buffer small

        seqs = []
        last = None
        while True:
            line = await asyncio.wait_for(reader.readline(), WAIT)
            if not line:
                break
            last = json.loads(line)
            if last["op"] == "msg":
                seqs.append(last["seq"])
        writer.close()
        assert last == {"op": "bye", "reason": "slow_consumer", "reconnect": True}
        assert seqs == list(range(1, len(seqs) + 1))  # no gap in what it got
        assert len(seqs) < 420
        c = await h.greeted()
        assert (await c.join("r", since=seqs[-1] if seqs else 0, epoch=epoch))["recovered"] is False
