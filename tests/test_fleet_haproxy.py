"""A fleet behind a real load balancer: two hub nodes on one Redis broker, Debian's HAProxy in
front in TCP mode with PROXY protocol v2.

Proves, end to end over loopback: the admin API of each node shows every client's real source
address (not HAProxy's); clients on different nodes share rooms; and SIGKILL of one node makes
its `wirehub.client` subscribers reconnect through HAProxy to the other node and recover every
message published meanwhile, once each and in order, with no `recovery_failed`."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import uuid

import aiohttp
import pytest

import wirehub.client

from .helpers import WAIT, LineClient, ServerProcess, free_port, reachable

BROKER = "redis://127.0.0.1:6379/13"
HAPROXY = shutil.which("haproxy")


pytestmark = [
    pytest.mark.one_loop,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379"),
]


class Node:
    def __init__(self, proc: ServerProcess, port: int, admin: int, name: str) -> None:
        self.proc, self.port, self.admin, self.name = proc, port, admin, name

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.admin}"


class Fleet:
    """Two hub nodes on the Redis broker and an HAProxy in front of them."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[Node] = []
        self.haproxy: subprocess.Popen | None = None
        self.haproxy_log = tmp_path / "haproxy.log"
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> "Fleet":
        for i in (1, 2):
            port, admin = free_port(), free_port()
            proc = ServerProcess(
                "serve", "--tcp", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--ws", "off", "--udp", "off",
                "--broker", BROKER, "--proxy-protocol", "127.0.0.1/32",
            )  # fmt: skip
            self.nodes.append(Node(proc.start(self.tmp_path), port, admin, f"n{i}"))
        for node in self.nodes:
            node.proc.wait_port(node.port, timeout=20)
            node.proc.wait_port(node.admin, timeout=20)
        servers = "\n".join(
            f"    server {n.name} 127.0.0.1:{n.port} send-proxy-v2 check check-send-proxy inter 200ms fall 2 rise 1" for n in self.nodes
        )
        cfg = self.tmp_path / "haproxy.cfg"
        cfg.write_text(
            f"""global
    maxconn 1000

defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    option redispatch
    retries 3

frontend hub
    bind 127.0.0.1:{self.port}
    default_backend nodes

backend nodes
    balance roundrobin
{servers}
"""
        )
        self._hlog = open(self.haproxy_log, "wb")
        self.haproxy = subprocess.Popen(
            [HAPROXY, "-f", str(cfg), "-db"], stdout=self._hlog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + WAIT
        while not reachable(self.port):
            if self.haproxy.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.haproxy.returncode}:\n{self.haproxy_log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"haproxy did not listen on {self.port} within {WAIT}s:\n{self.haproxy_log.read_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> list[str]:
        """Stop everything this fleet started; return the problems (nodes that did not exit cleanly)."""
        problems = []
        if self.haproxy is not None:
            if self.haproxy.poll() is None:
                self.haproxy.terminate()
            try:
                self.haproxy.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
            self._hlog.close()
        for node in self.nodes:
            killed = node.proc.proc is not None and node.proc.proc.returncode == -signal.SIGKILL
            code = node.proc.stop()
            if not killed and code != 0:
                problems.append(f"{node.name} exited with {code}:\n{node.proc.log}")
        return problems


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    try:
        yield f.start()
    finally:
        problems = f.stop()
    assert not problems, "\n".join(problems)


async def connections(http: aiohttp.ClientSession, node: Node) -> list[dict]:
    async with http.get(f"{node.api}/api/connections", timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def where(http: aiohttp.ClientSession, fleet: Fleet, name: str) -> tuple[Node, dict]:
    """The node that holds the (single) connection whose hello said ``name``, and its entry."""
    found = []
    for node in fleet.nodes:
        if node.proc.proc.poll() is not None:
            continue
        found += [(node, c) for c in await connections(http, node) if c.get("name") == name]
    assert len(found) == 1, f"{name!r} is on {[(n.name, c) for n, c in found]}"
    return found[0]


async def publish(http: aiohttp.ClientSession, node: Node, room: str, data) -> int:
    async with http.post(f"{node.api}/api/rooms/{room}/publish", json={"data": data}, timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["seq"]


async def test_real_client_addresses_and_rooms_shared_across_nodes(fleet):
    room = "room-" + uuid.uuid4().hex[:8]
    tag = uuid.uuid4().hex[:6]
    async with aiohttp.ClientSession() as http:
        # connect from distinct loopback source addresses until both nodes hold a client
        clients: dict[str, tuple[LineClient, Node]] = {}
        for i in range(8):
            source = f"127.0.0.{5 + i}"
            c = await LineClient.open(fleet.port, source)
            name = f"{tag}-{i}"
            await c.request({"op": "hello", "name": name}, "welcome")
            node, entry = await where(http, fleet, name)
            # the node sees the client's own address and port, carried by HAProxy's PROXY v2 header
            assert entry["peer"] == f"{source}:{c.local[1]}", (entry, c.local)
            clients[name] = (c, node)
            if len({n.name for _, n in clients.values()}) == 2 and len(clients) >= 2:
                break
        by_node = {n.name: c for c, n in clients.values()}
        assert set(by_node) == {"n1", "n2"}, "HAProxy put every client on one node"
        for c, _ in clients.values():
            assert c.local[0] != "127.0.0.1"

        # clients on different nodes share a room both ways
        a, b = by_node["n1"], by_node["n2"]
        await a.request({"op": "join", "room": room}, "joined")
        await b.request({"op": "join", "room": room}, "joined")
        ok = await a.request({"op": "pub", "room": room, "data": "from n1"}, "ok")
        got = await b.until("msg", room=room)
        assert (got["seq"], got["data"]) == (ok["seq"], "from n1")
        ok = await b.request({"op": "pub", "room": room, "data": "from n2"}, "ok")
        got = await a.until("msg", room=room, data="from n2")
        assert got["seq"] == ok["seq"]
        for c, _ in clients.values():
            c.close()


async def test_node_kill_subscribers_fail_over_through_haproxy_and_recover_everything(fleet):
    room = "room-" + uuid.uuid4().hex[:8]
    tag = uuid.uuid4().hex[:6]
    total, kill_at = 300, 100
    async with aiohttp.ClientSession() as http:
        subs: dict[str, wirehub.client.Client] = {}
        events: dict[str, list[dict]] = {}
        states: dict[str, list[tuple[str, str | None]]] = {}
        readers = []

        async def read(name: str, client) -> None:
            async for event in client:
                events[name].append(event)

        placed: dict[str, Node] = {}
        last_seen: dict[str, int] = {}  # the last room seq each subscriber's connection delivered
        lost_at: dict[str, list[int]] = {}  # last_seen when the connection dropped
        rejoins: dict[str, list[dict]] = {}  # every `joined` reply for the room

        def on_frame(name: str, frame: dict) -> None:
            if frame.get("op") == "msg" and frame.get("room") == room:
                last_seen[name] = max(last_seen.get(name, 0), frame["seq"])
            elif frame.get("op") == "joined" and frame.get("room") == room:
                rejoins[name].append(frame)

        def on_state(name: str, state: str, reason: str | None) -> None:
            states[name].append((state, reason))
            if state == "reconnecting":
                lost_at[name].append(last_seen.get(name, 0))

        try:
            for i in range(8):  # until each node holds a subscriber
                name = f"{tag}-sub{i}"
                events[name], states[name], lost_at[name], rejoins[name] = [], [], [], []
                client = await wirehub.client.connect(
                    fleet.url,
                    name=name,
                    backoff=(0.05, 0.5),
                    timeout=5.0,
                    on_state=lambda s, r, n=name: on_state(n, s, r),
                    on_frame=lambda f, n=name: on_frame(n, f),
                )
                subs[name] = client
                await client.join(room)
                readers.append(asyncio.create_task(read(name, client)))
                placed[name] = (await where(http, fleet, name))[0]
                if len({n.name for n in placed.values()}) == 2:
                    break
            assert len({n.name for n in placed.values()}) == 2, "HAProxy put every subscriber on one node"
            victim_sub = next(iter(placed))
            victim = placed[victim_sub]
            survivor = next(n for n in fleet.nodes if n is not victim)
            moved = [name for name, node in placed.items() if node is victim]

            # a publisher on the surviving node's admin API publishes numbered messages
            # continuously, through the kill
            seqs: list[int] = []
            killed = asyncio.Event()

            async def publisher() -> None:
                for n in range(total):
                    seqs.append(await publish(http, survivor, room, {"n": n}))
                    if n == kill_at:
                        victim.proc.proc.send_signal(signal.SIGKILL)
                        killed.set()
                    await asyncio.sleep(0.005)

            await asyncio.wait_for(publisher(), 20)
            assert killed.is_set()
            assert seqs == list(range(seqs[0], seqs[0] + total)), "the room's seq did not rise by 1 per publish"
            assert victim.proc.proc.wait(WAIT) == -signal.SIGKILL

            # every subscriber ends up with every number, once, in order
            deadline = asyncio.get_running_loop().time() + 15

            def complete(name: str) -> bool:
                msgs = [e for e in events[name] if e.get("op") == "msg" and e.get("room") == room]
                return bool(msgs) and msgs[-1]["seq"] >= seqs[-1]

            while not all(complete(n) for n in subs):
                if any(e.get("op") in ("recovery_failed", "rejoin_failed") for ev in events.values() for e in ev):
                    break
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.02)
            for name in subs:
                bad = [e for e in events[name] if e.get("op") in ("recovery_failed", "rejoin_failed")]
                assert not bad, f"{name}: {bad}"
                msgs = [e for e in events[name] if e.get("op") == "msg" and e.get("room") == room]
                got = [m["data"]["n"] for m in msgs]
                missing = sorted(set(range(total)) - set(got))
                assert got == list(range(total)), (
                    f"{name} (on {placed[name].name}): {len(got)} received, missing {missing[:20]}, states {states[name]}"
                )
                assert [m["seq"] for m in msgs] == seqs

            # the subscribers of the killed node reconnected through HAProxy to the survivor, and
            # their re-join really had a gap to fill (messages published while they were away)
            gaps = []
            for name in moved:
                assert lost_at[name], f"{name} never reconnected: {states[name]}"
                assert len(rejoins[name]) >= 2 and all(j["recovered"] is True for j in rejoins[name][1:]), rejoins[name]
                gaps.append(rejoins[name][1]["seq"] - lost_at[name][0])
                node, entry = await where(http, fleet, name)
                assert node is survivor and room in entry["rooms"], entry
            assert max(gaps) > 0, f"no subscriber missed anything while reconnecting (gaps {gaps}): recovery was not exercised"
            for name in subs:
                if name not in moved:
                    assert not lost_at[name], f"{name} on the surviving node was disconnected: {states[name]}"
            print(f"victim {victim.name}; moved {moved}; gaps filled by recovery {gaps}")
        finally:
            await asyncio.wait_for(asyncio.gather(*(c.close() for c in subs.values()), return_exceptions=True), WAIT)
            for t in readers:
                t.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
