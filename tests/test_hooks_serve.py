"""`wirehub serve --app MODULE:HOOKS`: the hooks run on the node that received the frame,
the same on every node sharing Redis or NATS and in every worker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from .helpers import LineClient, ServerProcess, reachable
from .test_scaleout import BROKERS, start_nodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.one_loop


def start(tmp_path, broker: str, *extra: str, count: int = 2) -> list[tuple[ServerProcess, int]]:
    return start_nodes(tmp_path, broker, "--app", "tests.hub.hookapp:hub", *extra, count=count, cwd=ROOT)


@pytest.mark.parametrize("broker", BROKERS)
async def test_two_nodes_run_the_hooks_of_app(tmp_path, broker):
    room = "members." + uuid.uuid4().hex[:8]
    (n1, p1), (n2, p2) = start(tmp_path, broker)
    try:
        alice, bob = await LineClient.open(p1), await LineClient.open(p2)
        bob2 = await LineClient.open(p1)
        await alice.request({"op": "hello", "name": "alice"}, "welcome")
        b = await bob.request({"op": "hello", "name": "bob"}, "welcome")
        await bob2.request({"op": "hello", "name": "bob"}, "welcome")
        refused = await alice.request({"op": "join", "room": room}, "error")
        assert refused["code"] == "app.password"
        await alice.request({"op": "join", "room": room, "data": "let me in"}, "joined")
        await bob.request({"op": "join", "room": room, "data": "let me in"}, "joined")
        event = await alice.until("join", room=room, client=b["client"])  # bob is in presence now
        assert event["info"] == {"pid": n2.proc.pid}
        members = (await alice.request({"op": "presence", "room": room}, "presence"))["members"]
        assert {m["name"]: m["info"]["pid"] for m in members} == {"alice": n1.proc.pid, "bob": n2.proc.pid}
        ok = await bob.request({"op": "pub", "room": room, "data": "hi"}, "ok")
        msg = await alice.until("msg", room=room)
        assert (msg["seq"], msg["data"], msg["info"]) == (ok["seq"], {"text": "HI"}, {"by": b["user"]})
        for expected in (1, 2):
            result = await bob.request({"op": "rpc", "method": "whoami"}, "result")
            assert result["data"] == {"client": b["client"], "pid": n2.proc.pid, "calls": expected}
        # a server action from a hook on node 1 reaches the user's connections on both nodes
        await alice.request({"op": "rpc", "method": "kick_user", "data": b["user"]}, "result")
        assert (await bob.until("bye")) == {"op": "bye", "reason": "kicked", "reconnect": False}
        await bob2.until("bye")
        for c in (alice, bob, bob2):
            c.close()
    finally:
        for node, _ in (n1, p1), (n2, p2):
            node.stop()


def test_a_bad_app_is_refused_before_anything_binds(tmp_path):
    run = lambda spec: subprocess.run([sys.executable, "-m", "wirehub", "serve", "--app", spec, "--tcp", "127.0.0.1:0", "--ws", "off",
                                       "--udp", "off", "--admin", "off"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    done = run("tests.hub.hookapp:nothing")
    assert done.returncode == 2 and "has no attribute 'nothing'" in done.stderr
    done = run("tests.hub.hookapp:os")
    assert done.returncode == 2 and "not wirehub.hub.Hooks" in done.stderr
