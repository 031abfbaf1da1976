"""Several hub processes sharing one broker (Redis or NATS): rooms, presence, direct
messages and recovery work across nodes, and `--workers N` shares state the same way."""

from __future__ import annotations

import os
import uuid

import pytest

from .helpers import LineClient, ServerProcess, free_port, reachable


BROKERS = [
    pytest.param("redis://127.0.0.1:6379/12", marks=pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379"), id="redis"),
    pytest.param("nats://127.0.0.1:4222", marks=pytest.mark.skipif(not reachable(4222), reason="no NATS at 127.0.0.1:4222"), id="nats"),
]


pytestmark = pytest.mark.one_loop


def owners(pids: list[int], client_ports: list[int]) -> dict[int, int]:
    """Which process holds the server end of each client connection (by the client's port):
    the sockets in /proc/PID/fd, their ports from /proc/net/tcp."""
    inode_pid = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode_pid[target[8:-1]] = pid
    found = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            remote_port, inode = int(fields[2].split(":")[1], 16), fields[9]
            if remote_port in client_ports and inode in inode_pid:
                found[remote_port] = inode_pid[inode]
    assert set(found) == set(client_ports), f"no worker holds the connections from ports {set(client_ports) - set(found)}"
    return found


def start_nodes(tmp_path, broker: str, *extra: str, count: int = 1, cwd: str | None = None) -> list[tuple[ServerProcess, int]]:
    """Start ``count`` hub processes at once, each on its own port, all on ``broker``."""
    nodes = []
    for _ in range(count):
        port = free_port()
        node = ServerProcess("serve", "--tcp", f"127.0.0.1:{port}", "--ws", "off", "--udp", "off", "--admin", "off", "--broker", broker, *extra, cwd=cwd)
        nodes.append((node.start(tmp_path), port))
    for node, port in nodes:
        node.wait_port(port, timeout=20)
    return nodes


@pytest.mark.parametrize("broker", BROKERS)
async def test_two_nodes_share_rooms_presence_direct_and_recovery(tmp_path, broker):
    room = "room-" + uuid.uuid4().hex[:8]
    (node1, port1), (node2, port2) = start_nodes(tmp_path, broker, count=2)
    try:
        alice, bob = await LineClient.open(port1), await LineClient.open(port2)
        a = await alice.request({"op": "hello", "name": "alice"}, "welcome")
        b = await bob.request({"op": "hello", "name": "bob"}, "welcome")
        joined = await alice.request({"op": "join", "room": room}, "joined")
        await bob.request({"op": "join", "room": room}, "joined")
        await alice.until("join", room=room, client=b["client"])  # presence crosses nodes
        ok = await alice.request({"op": "pub", "room": room, "data": {"n": 1}}, "ok")
        msg = await bob.until("msg", room=room)
        assert (msg["seq"], msg["data"], msg["from"]) == (ok["seq"], {"n": 1}, a["client"])
        members = (await bob.request({"op": "presence", "room": room}, "presence"))["members"]
        assert sorted(m["name"] for m in members) == ["alice", "bob"]
        await bob.request({"op": "send", "to": a["client"], "data": "psst"}, "ok")  # direct, across nodes
        direct = await alice.until("msg", data="psst")
        assert direct["from"] == b["client"] and "room" not in direct

        # bob drops off node 2; alice publishes three more on node 1; bob comes back on node 1
        last = msg["seq"]
        bob.close()
        for n in (2, 3, 4):
            await alice.request({"op": "pub", "room": room, "data": {"n": n}}, "ok")
        back = await LineClient.open(port1)
        rejoined = await back.request({"op": "join", "room": room, "since": last, "epoch": joined["epoch"]}, "joined")
        assert rejoined["recovered"] is True and rejoined["epoch"] == joined["epoch"]
        replay = [await back.until("msg", room=room) for _ in range(3)]
        assert [(m["seq"], m["data"]["n"]) for m in replay] == [(last + 1, 2), (last + 2, 3), (last + 3, 4)]
        alice.close()
        back.close()
    finally:
        assert node1.stop() == 0, node1.log
        assert node2.stop() == 0, node2.log


@pytest.mark.parametrize("broker", BROKERS)
async def test_workers_share_state_through_the_broker(tmp_path, broker):
    room = "room-" + uuid.uuid4().hex[:8]
    ((node, port),) = start_nodes(tmp_path, broker, "--workers", "2")
    try:
        node.wait_log("worker_started", count=2)
        clients = [await LineClient.open(port) for _ in range(12)]  # SO_REUSEPORT spreads them over both workers
        ids = []
        for c in clients:
            ids.append((await c.request({"op": "hello"}, "welcome"))["client"])
            await c.request({"op": "join", "room": room}, "joined")
        assert len(set(owners(node.worker_pids(), [c.local[1] for c in clients]).values())) == 2, "all clients landed on one worker"
        await clients[0].request({"op": "pub", "room": room, "data": "to everyone"}, "ok")
        for c in clients[1:]:
            assert (await c.until("msg", room=room))["data"] == "to everyone"
        for c in clients:
            c.close()
    finally:
        assert node.stop() == 0, node.log
