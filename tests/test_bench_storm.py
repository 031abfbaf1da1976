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


def run_storm(tmp_path, clients: int, *more: str) -> dict:
    out = tmp_path / "storm.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "storm.py"), "--clients", str(clients), "--broker",
         "redis://127.0.0.1:6379/12", "--timeout", "60", "--json", str(out), *more],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(out.read_text())


@pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379")
def test_storm_small(tmp_path):
    clients = 300
    result = run_storm(tmp_path, clients)
    assert result["clients"] == clients
    assert result["messages_lost"] == 0 and result["rejoins_not_recovered"] == 0, result
    assert result["slow_consumer_cuts"] == 0, result
    assert 0 < result["restart_listening_s"] <= result["all_back_s"] <= result["all_recovered_s"], result
    back = result["back_s"]
    assert result["restart_listening_s"] <= back["p50"] <= back["p99"] <= back["max"] <= result["all_back_s"], result
    # while no hub listened the clients were refused, and only that
    assert set(result["connect_errors"]) <= {"ECONNREFUSED"}, result
    # per change to every member would be ~2 x 300 presence frames each (leaves, then joins)
    assert result["presence_frames_per_client_storm"]["max"] <= clients // 2, result
    assert result["presence_frames_per_client_fill"]["max"] <= clients // 2, result


@pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379")
def test_storm_with_a_handover(tmp_path):
    """--handover: the new hub shares the port (SO_REUSEPORT) before the old one drains; every
    client moves to it and recovers with nothing lost."""
    result = run_storm(tmp_path, 300, "--handover")
    assert result["handover"] is True and result["clients"] == 300
    assert result["messages_lost"] == 0 and result["rejoins_not_recovered"] == 0, result
    assert result["slow_consumer_cuts"] == 0, result
    assert 0 < result["all_back_s"] <= result["all_recovered_s"], result
    assert result["frames_per_client_storm"]["mean"] >= 21, result  # joined + the 20 messages after


@pytest.mark.skipif(not reachable(6379), reason="no Redis at 127.0.0.1:6379")
def test_storm_restarted_at_once(tmp_path):
    """--at-once: the new hub binds the port as soon as the drained one closed its listener,
    while the old one still drains; every client moves to it and recovers with nothing lost."""
    result = run_storm(tmp_path, 300, "--at-once")
    assert result["at_once"] is True and result["handover"] is False and result["clients"] == 300
    assert result["messages_lost"] == 0 and result["rejoins_not_recovered"] == 0, result
    assert result["slow_consumer_cuts"] == 0, result
    assert 0 < result["restart_listening_s"] <= result["all_back_s"] <= result["all_recovered_s"], result
    assert set(result["connect_errors"]) <= {"ECONNREFUSED"}, result
    assert result["frames_per_client_storm"]["mean"] >= 21, result  # joined + the 20 messages after
