"""The shared deadline timer: connections filed by deadline, checked together, never early."""

from __future__ import annotations

import asyncio

from wirehub.transport.connection import Deadlines

from ..helpers import WAIT


class Probe:
    """Stands in for a connection: records when it was checked."""

    def __init__(self, name: str, log: list[str], done: asyncio.Event, expected: int) -> None:
        self.id = name
        self._deadline = 0
        self.checked: list[float] = []
        self.log = log  # shared by the probes of a test: the order of the checks
        self.done = done
        self.expected = expected

    def _deadline_check(self) -> None:
        self.checked.append(asyncio.get_running_loop().time())
        self.log.append(self.id)
        if len(self.log) >= self.expected:
            self.done.set()


async def test_checked_in_deadline_order_and_never_before_the_deadline():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    done = asyncio.Event()
    log: list[str] = []
    now = loop.time()
    offsets = {"c": 0.12, "a": 0.03, "b": 0.07, "a2": 0.03}
    probes = {}
    for name, offset in offsets.items():
        probe = probes[name] = Probe(name, log, done, expected=4)
        probe._deadline = deadlines.file(probe, now + offset)
        assert deadlines.due(probe._deadline) >= now + offset  # rounded up, never down
    await asyncio.wait_for(done.wait(), WAIT)
    assert sorted(log[:2]) == ["a", "a2"] and log[2:] == ["b", "c"]
    for name, probe in probes.items():
        (at,) = probe.checked
        assert at >= now + offsets[name] - 0.002  # a loop timer may fire a millisecond early
        assert probe._deadline == 0  # the slot was emptied


async def test_an_unfiled_connection_is_not_checked_and_a_refiled_one_is_checked_once():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    done = asyncio.Event()
    log: list[str] = []
    now = loop.time()
    gone, moved, last = (Probe(name, log, done, expected=2) for name in ("gone", "moved", "last"))
    gone._deadline = deadlines.file(gone, now + 0.02)
    moved._deadline = deadlines.file(moved, now + 0.02)
    deadlines.unfile(gone, gone._deadline)
    deadlines.unfile(moved, moved._deadline)
    moved._deadline = deadlines.file(moved, now + 0.06)
    last._deadline = deadlines.file(last, now + 0.1)
    await asyncio.wait_for(done.wait(), WAIT)
    assert log == ["moved", "last"]
    assert gone.checked == [] and len(moved.checked) == 1


async def test_a_nearer_deadline_rearms_the_loop_timer():
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    done = asyncio.Event()
    log: list[str] = []
    now = loop.time()
    far, near = (Probe(name, log, done, expected=1) for name in ("far", "near"))
    far._deadline = deadlines.file(far, now + WAIT)  # the loop timer is set for this one
    near._deadline = deadlines.file(near, now + 0.03)  # ... and must move nearer
    await asyncio.wait_for(done.wait(), WAIT / 2)
    assert log == ["near"]
    deadlines.unfile(far, far._deadline)
