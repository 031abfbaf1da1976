"""A Redis restart under load loses nothing that was acknowledged.

Two hub nodes share a Redis broker that this test owns: its own ``redis-server`` on a free
loopback port, with an append-only file fsynced on every write, so that a restart keeps the
rooms' seqs, epochs and history. `wirehub.client` subscribers on both nodes sit in one room
while a raw hub-protocol publisher on node 1 publishes numbered messages continuously, each
with a ref, and records which were acknowledged (``ok`` with a seq) and which were refused
(``error``: expected while Redis is away). Mid-way Redis gets SIGTERM; both nodes' ``/readyz``
must turn 503; Redis is started again on the same port and directory; both ``/readyz`` must
turn 200; publishing goes on a while.

Then: every subscriber received every acknowledged message exactly once, in seq order; a
publish refused with "nothing was done" never took a seq and was never delivered; the only
seqs between acknowledged ones belong to the publish in flight when Redis went down, refused
as "may or may not have taken effect" (Redis may apply it before it dies), and delivered at
most once; nobody saw ``recovery_failed``/``rejoin_failed``; and the room's epoch is the same
after the restart as before (the AOF kept it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid

import aiohttp
import pytest

import wirehub.client

from .helpers import WAIT, ServerProcess, free_port

REDIS_SERVER = "/usr/bin/redis-server"

pytestmark = [
    pytest.mark.one_loop,
    pytest.mark.skipif(not os.path.exists(REDIS_SERVER), reason=f"{REDIS_SERVER} is not installed"),
]

PAUSE = 0.003  # between two publishes
REFUSED_PAUSE = 0.4  # after a refusal: every error reply counts toward the hub's max_errors (20/min)


class Redis:
    """A redis-server of our own, in the foreground, with an fsync-always AOF in ``dir``."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.dir = tmp_path / "redis"
        self.dir.mkdir()
        self.log_path = tmp_path / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
            ],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + WAIT
        while self.log.count("Ready to accept connections") < self.starts:  # after loading the AOF
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"redis-server not ready within {WAIT}s:\n{self.log}")
            time.sleep(0.01)

    def stop(self) -> int | None:
        """SIGTERM to our own redis-server (it writes its AOF and exits); its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()


class Node:
    def __init__(self, proc: ServerProcess, port: int, admin: int, name: str) -> None:
        self.proc, self.port, self.admin, self.name = proc, port, admin, name

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


class Publisher:
    """A raw hub-protocol client: one ``pub`` at a time, each with its own ref."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Publisher":
        return cls(*await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT))

    async def request(self, frame: dict) -> dict:
        ref = uuid.uuid4().hex[:10]
        self.writer.write(json.dumps(frame | {"ref": ref}).encode() + b"\n")
        while True:
            line = await asyncio.wait_for(self.reader.readline(), WAIT)
            assert line, "the hub closed the publisher's connection"
            reply = json.loads(line)
            assert reply.get("op") != "bye", reply
            if reply.get("ref") == ref:
                return reply

    def close(self) -> None:
        self.writer.close()


async def readyz(http: aiohttp.ClientSession, node: Node) -> int:
    async with http.get(f"http://127.0.0.1:{node.admin}/readyz", timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
        await r.read()
        return r.status


async def wait_readyz(http: aiohttp.ClientSession, node: Node, status: int, timeout: float = WAIT) -> float:
    """Poll ``/readyz`` of ``node`` until it answers ``status``; how long that took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen = None
    while (seen := await readyz(http, node)) != status:
        if loop.time() - start > timeout:
            raise AssertionError(f"{node.name} /readyz still {seen} after {timeout}s (want {status}):\n{node.proc.log}")
        await asyncio.sleep(0.02)
    return loop.time() - start


async def test_redis_restart_under_load_loses_nothing_acknowledged(tmp_path):
    room = "room-" + uuid.uuid4().hex[:8]
    redis = Redis(tmp_path)
    redis.start()
    nodes: list[Node] = []
    subs: dict[str, wirehub.client.Client] = {}
    readers: list[asyncio.Task] = []
    publisher: Publisher | None = None
    try:
        for i in (1, 2):
            port, admin = free_port(), free_port()
            proc = ServerProcess(
                "serve", "--tcp", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--ws", "off", "--udp", "off",
                "--broker", redis.url,
            )  # fmt: skip
            nodes.append(Node(proc.start(tmp_path), port, admin, f"n{i}"))
        for node in nodes:
            node.proc.wait_port(node.port, timeout=20)
            node.proc.wait_port(node.admin, timeout=20)

        async with aiohttp.ClientSession() as http:
            for node in nodes:
                assert await readyz(http, node) == 200

            # two subscribers on each node
            events: dict[str, list[dict]] = {}
            states: dict[str, list[tuple[str, str | None]]] = {}
            joins: dict[str, list[dict]] = {}

            def on_frame(name: str, frame: dict) -> None:
                if frame.get("op") == "joined" and frame.get("room") == room:
                    joins[name].append(frame)

            async def read(name: str, client) -> None:
                async for event in client:
                    events[name].append(event)

            for node in nodes:
                for k in range(2):
                    name = f"{node.name}-sub{k}"
                    events[name], states[name], joins[name] = [], [], []
                    client = await wirehub.client.connect(
                        node.url,
                        name=name,
                        backoff=(0.05, 0.5),
                        timeout=5.0,
                        on_state=lambda s, r, n=name: states[n].append((s, r)),
                        on_frame=lambda f, n=name: on_frame(n, f),
                    )
                    subs[name] = client
                    await client.join(room)
                    readers.append(asyncio.create_task(read(name, client)))
            epoch = joins["n1-sub0"][0]["epoch"]
            assert all(j[0]["epoch"] == epoch for j in joins.values()), joins

            # the publisher on node 1: numbered messages, continuously, each acknowledged or refused
            publisher = await Publisher.open(nodes[0].port)
            assert (await publisher.request({"op": "hello", "name": "publisher"}))["op"] == "welcome"
            acked: list[tuple[int, int]] = []  # (n, seq)
            refused: list[tuple[int, dict]] = []  # (n, error reply)
            stop = asyncio.Event()

            async def publish() -> None:
                n = 0
                while not stop.is_set():
                    reply = await publisher.request({"op": "pub", "room": room, "data": {"n": n}})
                    if reply["op"] == "ok":
                        acked.append((n, reply["seq"]))
                        await asyncio.sleep(PAUSE)
                    else:
                        assert reply["op"] == "error", reply
                        refused.append((n, reply))
                        await asyncio.sleep(REFUSED_PAUSE)
                    n += 1

            pub_task = asyncio.create_task(publish())

            async def until(predicate, what: str, timeout: float = WAIT) -> None:
                deadline = asyncio.get_running_loop().time() + timeout
                while not predicate():
                    if pub_task.done():
                        pub_task.result()  # raise what stopped the publisher
                        raise AssertionError(f"the publisher stopped before {what}")
                    if asyncio.get_running_loop().time() > deadline:
                        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                    await asyncio.sleep(0.01)

            # under load, Redis goes away
            await until(lambda: len(acked) >= 150, "150 acknowledged publishes")
            before_stop = len(acked)
            assert await asyncio.to_thread(redis.stop) == 0, redis.log
            down = [await wait_readyz(http, node, 503) for node in nodes]
            await until(lambda: len(refused) >= 3, "3 refused publishes while Redis is down")
            acked_while_down = len(acked) - before_stop

            # Redis comes back on the same port with the same AOF
            await asyncio.to_thread(redis.start)
            up = [await wait_readyz(http, node, 200, timeout=15) for node in nodes]
            after_up = len(acked)
            await until(lambda: len(acked) >= after_up + 150, "150 acknowledged publishes after the restart")
            stop.set()
            await asyncio.wait_for(pub_task, WAIT)

            # every subscriber gets to the last acknowledged seq
            last = acked[-1][1]

            def failed() -> list[dict]:
                return [e for ev in events.values() for e in ev if e.get("op") in ("recovery_failed", "rejoin_failed")]

            def msgs(name: str) -> list[dict]:
                return [e for e in events[name] if e.get("op") == "msg" and e.get("room") == room]

            deadline = asyncio.get_running_loop().time() + WAIT
            while not all(msgs(n) and msgs(n)[-1]["seq"] >= last for n in subs) and not failed():
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.02)

            assert not failed(), failed()
            seqs = [seq for _, seq in acked]
            # A refusal says whether anything happened: "nothing was done" is certain; "may or
            # may not have taken effect" is the publish in flight when Redis went down — Redis
            # may have applied it before dying (it is then delivered once, with its seq).
            uncertain = {n for n, r in refused if "may or may not" in r["message"]}
            certain = {n for n, r in refused if n not in uncertain}
            seen = {m["seq"]: m["data"]["n"] for m in msgs(next(iter(subs)))}
            ghosts = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))  # seqs taken, never acknowledged
            bad = [(g, seen.get(g), dict(refused).get(seen.get(g), {}).get("message")) for g in ghosts if seen.get(g) not in uncertain]
            assert not bad, (
                "seqs taken by publishes that were refused as certain failures "
                f"(seq, n delivered at that seq, the refusal the publisher got for that n): {bad}"
            )
            expected = sorted([(seq, n) for n, seq in acked] + [(g, seen[g]) for g in ghosts])
            for name in subs:
                got = [(m["seq"], m["data"]["n"]) for m in msgs(name)]
                stray = [pair for pair in got if pair[1] in certain]
                assert not stray, f"{name} received publishes refused as not done {stray[:10]}; refusals {refused[:3]}"
                missing = sorted(set(expected) - set(got))
                assert got == expected, (
                    f"{name}: {len(got)} received of {len(expected)} expected, missing {missing[:20]}, "
                    f"duplicates {len(got) - len(set(got))}, states {states[name]}"
                )

            # the epoch survived the restart: a fresh join sees the same one, and so did any re-join
            fresh = await publisher.request({"op": "join", "room": room})
            assert fresh["op"] == "joined" and fresh["epoch"] == epoch, (fresh, epoch)
            assert fresh["seq"] == last, (fresh, last)
            for name, frames in joins.items():
                assert all(j["epoch"] == epoch for j in frames), (name, frames)
                assert all(j.get("recovered", True) is True for j in frames[1:]), (name, frames)
            for r in refused:
                assert r[1]["code"] and r[1].get("message"), r
            print(
                f"acked {len(acked)} (seqs {seqs[0]}..{seqs[-1]}), refused {len(refused)}, acked after SIGTERM "
                f"{acked_while_down}; readyz 503 after {[round(d, 3) for d in down]}s, 200 after "
                f"{[round(u, 3) for u in up]}s; reconnects {[n for n in subs if any(s == 'reconnecting' for s, _ in states[n])]}"
            )
    finally:
        if publisher is not None:
            publisher.close()
        await asyncio.wait_for(asyncio.gather(*(c.close() for c in subs.values()), return_exceptions=True), WAIT)
        for t in readers:
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        problems = []
        for node in nodes:
            code = node.proc.stop()
            if code != 0:
                problems.append(f"{node.name} exited with {code}:\n{node.proc.log}")
        redis.stop()
    assert not problems, "\n".join(problems)
