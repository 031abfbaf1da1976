"""Standing abuse tests: the attacks on the hub's memory of issue 11 (rows 1-4), each run
against a real ``wirehub serve`` (memory broker) on loopback. Each checks the server
process's resident memory stays within the documented bound and that an honest client's ping
is answered promptly meanwhile. The attacks are scaled down (fewer rooms, smaller limits) to
stay bounded in time; the bound each asserts is derived from the limits the server runs with.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest

from ..helpers import WAIT, LineClient, ServerProcess, free_port

pytestmark = [pytest.mark.one_loop, pytest.mark.slow]

MiB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Hub:
    """``wirehub serve`` on loopback (TCP and admin only) with the given extra flags."""

    def __init__(self, tmp_path, *flags: str) -> None:
        self.port, self.admin = free_port(), free_port()
        self.proc = ServerProcess(
            "serve", "--tcp", f"127.0.0.1:{self.port}", "--ws", "off", "--udp", "off",
            "--admin", f"127.0.0.1:{self.admin}", *flags,
        )
        self.tmp_path = tmp_path

    def __enter__(self) -> Hub:
        self.proc.start(self.tmp_path)
        self.proc.wait_port(self.port)
        self.proc.wait_port(self.admin)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stop()

    @property
    def rss(self) -> int:
        assert self.proc.proc is not None
        return rss(self.proc.proc.pid)

    async def client(self) -> LineClient:
        return await LineClient.open(self.port)

    async def serves(self) -> bool:
        """An honest new client is answered (within WAIT) while the attack goes on: the
        attack harms no one else. How fast is the benchmarks' business, not a test's."""
        c = await self.client()
        try:
            await asyncio.wait_for(c.request({"op": "ping"}, "pong"), WAIT)
            return True
        finally:
            c.close()


async def pipelined(c: LineClient, frames: list[dict], replies: int) -> list[dict]:
    """Send every frame at once, then read ``replies`` frames (or until the server closes)."""
    c.writer.write(b"".join(json.dumps(f).encode() + b"\n" for f in frames))
    got = []
    while len(got) < replies:
        line = await asyncio.wait_for(c.reader.readline(), WAIT)
        if not line:
            break
        got.append(json.loads(line))
    return got


async def mute(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that never reads: a tiny kernel receive buffer, and nothing taken from it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=1 << 16)


# ---------------------------------------------------------------------------- row 1


async def test_row1_joining_many_rooms_is_bounded_per_connection_and_per_node(tmp_path):
    """Connections join distinct rooms. Every connection stops at the default 128 rooms
    (error limit naming max_rooms_per_connection; bye too_many_errors once refusals pile
    up), the node at --max-rooms (error limit naming max_rooms); memory stays within about
    4 kB a room held."""
    max_rooms = 3000
    with Hub(tmp_path, "--max-rooms", str(max_rooms)) as hub:
        base = hub.rss
        joined = 0
        limits: set[str] = set()
        attackers = []
        for wave in range(40):  # 40 connections x 140 distinct joins, each kept open
            c = await hub.client()
            attackers.append(c)
            frames = [{"op": "join", "room": f"w{wave}-r{i}"} for i in range(140)]
            replies = await pipelined(c, frames, 140)
            if replies[-1]["op"] == "bye":  # more than max_errors refusals: sent away
                assert replies[-1]["reason"] == "too_many_errors"
                replies.pop()
            else:
                assert len(replies) == 140
            ok = [r for r in replies if r["op"] == "joined"]
            errors = [r for r in replies if r["op"] == "error"]
            assert len(ok) <= 128 and len(ok) + len(errors) == len(replies)
            joined += len(ok)
            assert all(e["code"] == "limit" for e in errors)
            limits |= {e["message"].split(":")[0] for e in errors}
            assert await hub.serves()
        # and one that goes on past the errors it may earn is sent away
        c = await hub.client()
        replies = await pipelined(c, [{"op": "join", "room": f"more-{i}"} for i in range(500)], 500)
        assert replies[-1] == {"op": "bye", "reason": "too_many_errors", "reconnect": False}
        assert limits == {"max_rooms_per_connection", "max_rooms"}
        assert joined <= max_rooms
        grown = hub.rss - base
        assert grown < max_rooms * 4096 + 16 * MiB, f"+{grown / MiB:.1f} MiB for {joined} rooms"
        assert await hub.serves()


# ---------------------------------------------------------------------------- row 2


async def test_row2_max_size_messages_into_many_rooms_stay_within_the_history_budget(tmp_path):
    """One connection publishes 60 kB messages into 200 distinct rooms without joining
    (120 MB in all). History is bounded in total by --history-max-bytes: the least recently
    used rooms lose theirs, and the process grows by about the budget, not by what was sent."""
    budget = 24 * MiB
    with Hub(tmp_path, "--history-max-bytes", "24MiB") as hub:
        base = hub.rss
        c = await hub.client()
        data = "x" * 60_000
        for burst in range(20):  # 20 x 100 publications of 60 kB
            frames = [{"op": "pub", "room": f"flood-{(burst * 100 + i) % 200}", "data": data} for i in range(100)]
            replies = await pipelined(c, [*frames, {"op": "ping", "ref": burst}], 1)
            assert replies == [{"op": "pong", "ref": burst}]
        during = await hub.serves()
        grown = hub.rss - base
        assert grown < budget + 40 * MiB, f"+{grown / MiB:.1f} MiB after 120 MB published"
        assert during
        # the most recently written room still has its newest message; rooms evicted while
        # nobody was in them started new streams (a new epoch: nobody can mistake them)
        reader = await hub.client()
        joined = await reader.request({"op": "join", "room": "flood-199"}, "joined")
        history = await reader.request({"op": "history", "room": "flood-199", "limit": 1}, "history")
        assert [m["seq"] for m in history["messages"]] == [joined["seq"]]
        assert history["messages"][0]["data"] == data


# ---------------------------------------------------------------------------- row 3


async def test_row3_rooms_written_once_are_freed_by_the_sweep(tmp_path):
    """20,000 rooms get one message each and are never touched again; with a 1 s TTL the
    sweep frees them by itself (the admin API lists none), so a second wave as large fits
    under --max-rooms and the process does not grow for it."""
    n = 20_000
    with Hub(tmp_path, "--history-ttl", "1s", "--max-rooms", str(n + 10)) as hub:
        c = await hub.client()

        async def wave(tag: str) -> None:
            for chunk in range(0, n, 2000):
                frames = [{"op": "pub", "room": f"{tag}-{i}", "data": i, "ref": i} for i in range(chunk, chunk + 2000)]
                replies = await pipelined(c, frames, 2000)
                assert all(r["op"] == "ok" for r in replies), [r for r in replies if r["op"] != "ok"][:3]

        async def rooms_listed() -> int:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{hub.admin}/api/rooms") as resp:
                    return len(await resp.json())

        await wave("first")
        after_first = hub.rss
        assert await hub.serves()
        deadline = time.monotonic() + 15  # TTL 1 s + a sweep pass over 20,000 rooms (2 s)
        while await rooms_listed():
            assert time.monotonic() < deadline, "the sweep did not free the expired rooms"
            assert await hub.serves()  # the sweep does not stall the loop
            await asyncio.sleep(0.5)
        await wave("second")  # refused with limit if the first wave were still held
        grown = hub.rss - after_first
        assert grown < 16 * MiB, f"+{grown / MiB:.1f} MiB for a second wave of rooms"


# ---------------------------------------------------------------------------- row 4


async def test_row4_history_and_replays_to_clients_that_never_read_are_bounded(tmp_path):
    """A room holds 100 x 60 kB. 40 clients that never read ask for its full history over
    and over, and 20 more join it with since=0 (a 6 MB replay each). Each history reply
    holds at most --history-reply-bytes, each replay goes out a window at a time as the
    client reads: the process grows by about the clients' send buffers, not 6 MB each."""
    send_buffer = 256 * 1024
    with Hub(tmp_path, "--max-send-buffer", "256KiB") as hub:
        writer_client = await hub.client()
        data = "y" * 60_000
        frames = [{"op": "pub", "room": "big", "data": data} for _ in range(100)]
        assert await pipelined(writer_client, [*frames, {"op": "ping", "ref": 0}], 1) == [{"op": "pong", "ref": 0}]
        epoch = (await writer_client.request({"op": "join", "room": "big"}, "joined"))["epoch"]
        base = hub.rss
        mutes = []
        for i in range(60):
            reader, writer = await mute(hub.port)
            if i < 40:
                ask = b'{"op":"join","room":"big"}\n' + b'{"op":"history","room":"big"}\n' * 5
            else:
                ask = b'{"op":"join","room":"big","since":0,"epoch":"%s"}\n' % epoch.encode()
            writer.write(ask)
            mutes.append((reader, writer))
        assert await hub.serves()
        await writer_client.request({"op": "ping", "ref": "settle"}, "pong")
        grown = hub.rss - base
        # each mute client: its send buffer, one history reply or replay window past it
        bound = 60 * (send_buffer + 256 * 1024 + 64 * 1024) + 24 * MiB
        assert grown < bound, f"+{grown / MiB:.1f} MiB for 60 clients that never read (bound {bound / MiB:.0f} MiB)"
        for _, writer in mutes:
            writer.close()
        # an honest client recovering the same 6 MB gets all of it, in order
        honest = await hub.client()
        await honest.request({"op": "join", "room": "big", "since": 0, "epoch": epoch}, "joined")
        seqs = [(await honest.until("msg"))["seq"] for _ in range(100)]
        assert seqs == list(range(1, 101))
        assert await hub.serves()
