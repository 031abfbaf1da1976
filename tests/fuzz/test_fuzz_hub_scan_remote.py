"""The hub's byte scanner of the canonical ``pub`` on a remote broker (``PipelinedFrames``
with ``scan``, hub/_frames.py) against the decoder's path (``scan`` off) on any input: the
same publications started at the broker, the same acks in the same order once it answers, the
same calls into the app, frame for frame. A frame the scanner does not take must reach the
decoder's path untouched.

Both run the implementation in use (compiled where the accelerator is built), each on its own
recording stand-in for the app and the broker (whose futures are asyncio's, answered by the
test), so that a difference in anything the frame caused shows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wirehub.hub import protocol as wire
from wirehub.hub.app import HubApp
from wirehub.hub.broker.base import BrokerError, HistoryPolicy
from wirehub.hub.frames import PUB_WINDOW, PipelinedFrames

from . import fuzz
from . import test_fuzz_hub_scan as scan
from .test_fuzz_hub_scan import Claims, Conn, Policy, Recorder, frames


class Session(scan.Session):
    def __init__(self, conn: Conn, greeted: bool, claims: Any) -> None:
        super().__init__(conn, greeted, claims)
        self.publishing: Any = None
        self.held = 0


class Stats:
    pub_refused = 0
    pub_failed = 0
    counted = 0


class Broker:
    """A remote broker's batched publish: the publications of one "turn" share a future
    (each then is its first seq plus its index), as the Redis broker's do."""

    def __init__(self, rec: Recorder, loop: asyncio.AbstractEventLoop) -> None:
        self.rec = rec
        self.loop = loop
        self.in_flight = 0
        self.batch: list[Any] = []  # [future, count]
        self.batches: list[list[Any]] = []

    def publish_batched_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: Any, info: Any = None,
                               exclude: str = "") -> tuple[asyncio.Future[int], int]:
        assert type(ts) is int and ts > 1_600_000_000_000
        self.rec.events.append(("publish", room, bytes(data), sender, history, info, exclude))
        if not self.batch:
            self.batch = [self.loop.create_future(), 0]
            self.batches.append(self.batch)
        k = self.batch[1]
        self.batch[1] += 1
        self.in_flight += 1
        return self.batch[0], k

    def publish_batched_now(self, room: str, data: bytes, sender: str, ts: int, history: Any) -> tuple[asyncio.Future[int], int]:
        return self.publish_batched_nowait(room, data, sender=sender, ts=ts, history=history)

    def publish_nowait(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a broker with publish_batched_nowait is asked for that")

    def answer(self, failing: bool) -> None:
        """Answer every batch: seqs from 1 on, or (``failing``) the first fails."""
        seq = 1
        for i, (future, n) in enumerate(self.batches):
            if failing and i == 0:
                future.set_exception(BrokerError("redis://x is not connected", maybe_applied=False))
            else:
                future.set_result(seq)
            seq += n
        self.in_flight = 0
        self.batches = []
        self.batch = []


class App:
    """The parts of HubApp that PipelinedFrames uses, recording each call."""

    def __init__(self, rec: Recorder, loop: asyncio.AbstractEventLoop, gated: bool, greeted: bool, claims: Any) -> None:
        self.rec = rec
        conn = Conn(rec)
        self.conn = conn
        self.session = Session(conn, greeted, claims)
        self.sessions = {conn.id: self.session}
        self._room_table = None
        self._policies: dict[str, Any] = {}
        self.stats = Stats()
        self.broker = Broker(rec, loop)
        self._gate = gated
        self._rate = 0
        self._runner = None

    def policy(self, room: str) -> Any:
        return Policy(HistoryPolicy(size=len(room)))

    def _frame_async(self, s: Any, cmd: Any) -> None:
        self.rec.events.append(("async", cmd))

    def _error(self, s: Any, code: str, message: str, ref: Any = None) -> None:
        self.rec.events.append(("error", code, message, ref))

    # HubApp's own: what a pub the scanner does not take is answered with, on a remote broker
    _pub_data = HubApp._pub_data
    _needs_hello = HubApp._needs_hello

    def _failed(self, s: Any, cmd: Any) -> None:
        self.rec.events.append(("failed", cmd))

    def _broker_failed(self, s: Any, ref: Any, exc: Exception, *, now: bool = False) -> None:
        self.rec.events.append(("broker_failed", ref, str(exc), now))


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def outcome(loop: asyncio.AbstractEventLoop, frame: bytes, scan: bool, gated: bool, greeted: bool, claims: Any,
            failing: bool) -> tuple[list, int, int, int]:
    rec = Recorder()
    app = App(rec, loop, gated, greeted, claims)
    handler = PipelinedFrames(app, scan=scan)
    handler(app.conn, frame)
    handler(app.conn, frame)  # twice: two publications of a batch, two acks in order
    app.broker.batch = []  # a third in a batch of its own
    handler(app.conn, frame)
    app.broker.answer(failing)
    loop.run_until_complete(asyncio.sleep(0))  # the front's callback runs
    assert app.session.publishing is None
    return rec.events, app.stats.counted, app.stats.pub_refused, app.stats.pub_failed


def check(loop: asyncio.AbstractEventLoop, frame: bytes, gated: bool = False, greeted: bool = False, claims: Any = None,
          failing: bool = False) -> None:
    assert outcome(loop, frame, True, gated, greeted, claims, failing) == outcome(loop, frame, False, gated, greeted, claims, failing)


@fuzz(1000, deadline_ms=500)
@given(frame=frames, gated=st.booleans(), greeted=st.booleans(), claims=st.sampled_from([None, Claims()]), failing=st.booleans())
@example(frame=b'{"op":"pub","room":"r","data":1,"ref":-0}', gated=False, greeted=False, claims=None, failing=False)
@example(frame=b'{"op":"pub","room":"r","data":"\xff","ref":1}', gated=False, greeted=False, claims=None, failing=False)
@example(frame=b'{"op":"pub","room":"r","data":[1,\n2],"ref":1}', gated=False, greeted=False, claims=None, failing=False)
@example(frame=b'{"op":"pub","room":"ro.x","data":1,"ref":1}', gated=False, greeted=False, claims=Claims(), failing=False)
@example(frame=b'{"op":"pub","room":"r","data":1,"ref":1}', gated=True, greeted=False, claims=None, failing=False)
@example(frame=b'{"op":"pub","room":"r","data":1,"ref":"k"}', gated=False, greeted=False, claims=None, failing=True)
@example(frame=b'{"op":"pub","room":"r","data":1}', gated=False, greeted=False, claims=None, failing=True)
@example(frame=b'{"op":"pub","room":"' + b"x" * 201 + b'","data":1,"ref":1}', gated=False, greeted=False, claims=None, failing=False)
def test_the_scanner_answers_exactly_as_the_decoders_path(loop, frame, gated, greeted, claims, failing):
    check(loop, frame, gated, greeted, claims, failing)


def test_the_canonical_pub_is_taken_by_its_bytes(loop):
    """The scanner does take the canonical form (else the test above would prove nothing):
    started without the decoder, acked with the ref's own bytes in frame order, and the
    room's name and policy are known again by its bytes."""
    rec = Recorder()
    app = App(rec, loop, False, False, None)
    handler = PipelinedFrames(app, scan=True)
    refs = (b"7", b'"k"', b"-123456789012345678", b'"' + b"r" * 63 + b'"', b'"' + b"x" * 300 + b'"', b"")
    rooms = ("ab", "ab", "ac", "abc", "r", "r")
    for ref, room in zip(refs, rooms):
        frame = b'{"op":"pub","room":"%b","data":{"a":[1,-2.5e+3,"x y",true]}%b}' % (room.encode(), b',"ref":' + ref if ref else b"")
        assert handler.pub_frame(app.conn, frame)
    assert [e[:2] for e in rec.events] == [("publish", room) for room in rooms]
    assert all(e[2] == b'{"a":[1,-2.5e+3,"x y",true]}' and e[4] == HistoryPolicy(size=len(e[1])) for e in rec.events)
    assert len(app.session.publishing) == len(refs)
    app.broker.answer(False)
    loop.run_until_complete(asyncio.sleep(0))
    acks = [e[1] for e in rec.events[len(rooms):]]
    assert acks == [b'{"op":"ok","ref":%b,"seq":%d}' % (ref, seq) for seq, ref in enumerate(refs[:-1], 1)]
    assert app.stats.counted == len(refs) and app.session.publishing is None
    # not taken: what the decoder's path must say or do
    for other in (b'{"op":"pub","room":"r","data":"\\n","ref":1}', b'{"op":"pub", "room":"r","data":1}',
                  b'{"op":"pub","room":"r","data":01}', b'{"op":"pub","room":"","data":1}'):
        assert not handler.pub_frame(app.conn, other)
    # a full window: the decoder's path waits for room
    for _ in range(PUB_WINDOW):
        assert handler.pub_frame(app.conn, b'{"op":"pub","room":"r","data":1,"ref":1}')
    assert not handler.pub_frame(app.conn, b'{"op":"pub","room":"r","data":1,"ref":1}')


def test_a_reply_held_behind_the_acks_goes_after_them(loop):
    """A reply queued in the window (HubApp._error's (reply,) entry) goes out in its place."""
    rec = Recorder()
    app = App(rec, loop, False, False, None)
    handler = PipelinedFrames(app, scan=True)
    assert handler.pub_frame(app.conn, b'{"op":"pub","room":"r","data":1,"ref":1}')
    ready = loop.create_future()
    ready.set_result(None)
    reply = wire.error("bad_frame", "x", 2)
    app.session.publishing.append((ready, (reply,), -1))
    app.session.held = len(reply)
    assert handler.pub_frame(app.conn, b'{"op":"pub","room":"r","data":1,"ref":3}')
    app.broker.answer(False)
    loop.run_until_complete(asyncio.sleep(0))
    assert [e[1] for e in rec.events if e[0] == "send"] == [b'{"op":"ok","ref":1,"seq":1}', reply, b'{"op":"ok","ref":3,"seq":2}']
    assert app.session.held == 0
