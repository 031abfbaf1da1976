"""``bench/storm.py`` at a small scale, run as a user runs it: 300 clients in one room on
Redis, the hub drained (SIGTERM) and restarted; every client comes back and recovers with
nothing lost, none is cut as a slow consumer, and presence stays O(1) frames per client."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .helpers import reachable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379")
def test_storm_small(tmp_path):
    out = tmp_path / "storm.json"
    clients = 300
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "storm.py"), "--clients", str(clients), "--broker",
         "redis://127.0.0.1:6379/12", "--timeout", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert result["clients"] == clients
    assert result["messages_lost"] == 0 and result["rejoins_not_recovered"] == 0, result
    assert result["slow_consumer_cuts"] == 0, result
    assert 0 < result["restart_listening_s"] <= result["all_back_s"] <= result["all_recovered_s"], result
    # per change to every member would be ~2 x 300 presence frames each (leaves, then joins)
    assert result["presence_frames_per_client_storm"]["max"] <= clients // 2, result
    assert result["presence_frames_per_client_fill"]["max"] <= clients // 2, result
