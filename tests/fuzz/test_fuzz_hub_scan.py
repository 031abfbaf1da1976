"""The hub's byte scanners of the canonical ``ping`` and ``pub`` frames (``InlineFrames`` with
``scan``, hub/_frames.py) against the decoder's path (``scan`` off) on any input: the same
replies, the same publications, the same calls into the app, frame for frame. A frame the
scanners do not take must reach the decoder's path untouched.

Both run the implementation in use (compiled where the accelerator is built), each on its own
recording stand-in for the app, so that a difference in anything the frame caused shows."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from wirehub.hub import protocol as wire
from wirehub.hub.frames import InlineFrames
from wirehub.hub.broker.base import HistoryPolicy

from . import fuzz, mutate

ROOMS = ("r", "bench-1", "a b", "x" * 200, "x" * 201, "é", 'q"', "")


class Recorder:
    """What a frame caused: frames sent, publications, calls into the app."""

    def __init__(self) -> None:
        self.events: list[tuple] = []


class Conn:
    id = "c1"

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def send(self, payload: bytes) -> bool:
        self.rec.events.append(("send", bytes(payload)))
        return True


class Claims:
    def may_publish(self, room: str) -> bool:
        return not room.startswith("ro")


class Session:
    def __init__(self, conn: Conn, greeted: bool, claims: Any) -> None:
        self.conn = conn
        self.client = conn.id
        self.greeted = greeted
        self.claims = claims


class Stats:
    pub_refused = 0


class Broker:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.seq = 0

    def publish_seq_now(self, room: str, data: Any, sender: str, ts: int, history: Any) -> int:
        self.seq += 1
        self.rec.events.append(("publish", room, bytes(data), sender, history))
        return self.seq


class Policy:
    def __init__(self, history: HistoryPolicy) -> None:
        self.history = history


class App:
    """The parts of HubApp that InlineFrames uses, recording each call."""

    def __init__(self, rec: Recorder, gated: bool, greeted: bool, claims: Any) -> None:
        self.rec = rec
        conn = Conn(rec)
        self.conn = conn
        self.sessions = {conn.id: Session(conn, greeted, claims)}
        self._room_table = {room: object() for room in ROOMS if room and room != "bench-1"} | {"ro.x": object()}
        self._policies: dict[str, Any] = {}
        self.stats = Stats()
        self.broker = Broker(rec)
        self._gate = gated

    def policy(self, room: str) -> Any:
        return Policy(HistoryPolicy(size=len(room)))

    def _frame_inline(self, conn: Any, data: bytes) -> None:
        self.rec.events.append(("inline", bytes(data)))

    def _frame_command(self, conn: Any, cmd: Any) -> None:
        self.rec.events.append(("command", cmd))

    def _error(self, s: Any, code: str, message: str, ref: Any = None) -> None:
        self.rec.events.append(("error", code, message, ref))

    def _pub_data(self, s: Any, cmd: Any) -> Any:
        self.rec.events.append(("pub_data", cmd))
        return None

    def _failed(self, s: Any, cmd: Any) -> None:
        self.rec.events.append(("failed", cmd))


def outcome(frame: bytes, scan: bool, gated: bool, greeted: bool, claims: Any) -> tuple[list, int, int]:
    rec = Recorder()
    app = App(rec, gated, greeted, claims)
    frames = InlineFrames(app, scan=scan)
    frames(app.conn, frame)
    frames(app.conn, frame)  # twice: the second publication of a room has the next seq
    return rec.events, frames.published, app.stats.pub_refused


def check(frame: bytes, gated: bool = False, greeted: bool = False, claims: Any = None) -> None:
    scanned = outcome(frame, True, gated, greeted, claims)
    decoded = outcome(frame, False, gated, greeted, claims)
    assert scanned == decoded


json_scalar = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
               | st.text(max_size=12) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12))
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=16,
)
printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
#: refs the scanners take (integers of up to 18 digits, printable strings) most of the time
refs = st.one_of(st.integers(-(10**18), 10**18), st.integers(-(10**19), 10**19), st.integers(-9, 9), printable, printable,
                 st.integers(-(2**70), 2**70), st.text(max_size=12), json_scalar)


@st.composite
def canonical(draw) -> bytes:
    """ping and pub frames as clients write them (and near that: spaces, other key orders,
    non-ASCII, escapes, deep data), with refs and data of any kind."""
    if draw(st.booleans()):
        obj: dict[str, Any] = {"op": "ping"}
    else:
        room = draw(st.sampled_from(ROOMS + ("ro.x", "missing")) | st.text(max_size=8))
        obj = {"op": "pub", "room": room, "data": draw(json_value)}
    if draw(st.integers(0, 4)):
        obj["ref"] = draw(refs)
    if draw(st.integers(0, 5)) == 0:  # another order of the keys
        items = list(obj.items())
        draw(st.randoms()).shuffle(items)
        obj = dict(items)
    separators = draw(st.sampled_from([(",", ":"), (",", ":"), (", ", ": "), (",", " : ")]))
    text = json.dumps(obj, separators=separators, ensure_ascii=draw(st.booleans()))
    return text.encode()


@st.composite
def mutated(draw) -> bytes:
    """A canonical frame with a byte changed, inserted or removed."""
    base = draw(canonical() | st.sampled_from([
        b'{"op":"ping","ref":1234}', b'{"op":"ping","ref":"abc"}', b'{"op":"ping","ref":-7}',
        b'{"op":"pub","room":"r","data":{"a":[1,2.5e-3,"x",true,false,null]},"ref":3}',
        b'{"op":"pub","room":"bench-1","data":"xxxx","ref":1}', b'{"op":"pub","room":"r","data":[]}',
    ]))
    return mutate(draw, base, st.integers(0, 255) | st.sampled_from(b'"\\{}[],:-.0123456789eE \t\r\n'))


frames = (
    canonical()
    | mutated()
    | st.binary(max_size=80).map(lambda b: b'{"op":"ping","ref":' + b + b"}")
    | st.binary(max_size=80).map(lambda b: b'{"op":"pub","room":"r","data":' + b + b',"ref":1}')
    | st.integers(1, 80).map(lambda n: b'{"op":"pub","room":"r","data":' + b"[" * n + b"]" * n + b"}")
    | st.integers(1, 80).map(lambda n: b'{"op":"pub","room":"r","data":' + b'{"a":' * n + b"1" + b"}" * n + b"}")
    | st.binary(max_size=100)
)


@fuzz(1500, deadline_ms=500)
@given(frame=frames, gated=st.booleans(), greeted=st.booleans(), claims=st.sampled_from([None, Claims()]))
@example(frame=b'{"op":"ping","ref":-0}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"ping","ref":01}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"ping","ref":123456789012345678}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"ping","ref":1234567890123456789}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"ping","ref":""}', gated=True, greeted=True, claims=None)
@example(frame=b'{"op":"ping","ref":"\\u0041"}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"r","data":"\xff","ref":1}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"r","data":1e999,"ref":1}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"r","data":[1,\n2],"ref":1}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"r","data":{"a" : [ 1 , 2 ] },"ref":-0}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"r","data":\r0,"ref":1}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"r","data": [0 ] ,"ref":1}', gated=False, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"ro.x","data":1,"ref":1}', gated=False, greeted=False, claims=Claims())
@example(frame=b'{"op":"pub","room":"r","data":1,"ref":1}', gated=True, greeted=False, claims=None)
@example(frame=b'{"op":"pub","room":"r","data":1,"ref":1,"ref":2}', gated=False, greeted=False, claims=None)
def test_the_scanners_answer_exactly_as_the_decoders_path(frame, gated, greeted, claims):
    check(frame, gated, greeted, claims)


def test_the_canonical_frames_are_taken_by_their_bytes():
    """The scanners do take the canonical forms (else the test above would prove nothing):
    answered without the decoder, which the stand-in app would record as a call."""
    for frame in (b'{"op":"ping","ref":1234}', b'{"op":"ping","ref":"a-b c"}', b'{"op":"ping","ref":0}'):
        assert InlineFrames.__module__.endswith(("_frames", "_frames_c"))
        rec = Recorder()
        app = App(rec, False, False, None)
        InlineFrames(app, scan=True)(app.conn, frame)
        assert rec.events == [("send", wire.pong(wire.decode(frame).ref))]
    rec = Recorder()
    app = App(rec, False, False, None)
    frames = InlineFrames(app, scan=True)
    frame = b'{"op":"pub","room":"r","data":{"a":[1,-2.5e+3,"x y",true,false,null],"b":{}},"ref":"k"}'
    assert frames.pub_frame(app.conn, frame)
    assert rec.events == [("publish", "r", b'{"a":[1,-2.5e+3,"x y",true,false,null],"b":{}}', "c1", HistoryPolicy(size=1)),
                          ("send", b'{"op":"ok","ref":"k","seq":1}')]
    for other in (b'{"op":"pub","room":"r","data":"\\n","ref":1}', b'{"op":"pub","room":"missing","data":1}',
                  b'{"op":"pub", "room":"r","data":1}', b'{"op":"pub","room":"r","data":01}'):
        assert not frames.pub_frame(app.conn, other)
    assert len(rec.events) == 2  # nothing more done
    # the ack's ref is the frame's own bytes, whatever its length (compiled, refs past 64 bytes
    # are formatted another way), and its seq every digit of it
    for ref, seq in ((b"-123456789012345678", 10**6), (b'"' + b"r" * 62 + b'"', 2), (b'"' + b"r" * 63 + b'"', 3),
                     (b'"' + b"x" * 300 + b'"', 4)):
        frames.publish_seq.__self__.seq = seq - 1
        assert frames.pub_frame(app.conn, b'{"op":"pub","room":"r","data":1,"ref":%b}' % ref)
        assert rec.events[-1] == ("send", b'{"op":"ok","ref":%b,"seq":%d}' % (ref, seq))
    # the room published to last is known again by its bytes (its name and policy kept): rooms
    # of the same length stay apart
    rec = Recorder()
    app = App(rec, False, False, None)
    app._room_table.update(dict.fromkeys(("ab", "ac", "abc")))
    frames = InlineFrames(app, scan=True)
    rooms = ("ab", "ab", "ac", "ab", "abc", "r", "r")
    for room in rooms:
        assert frames.pub_frame(app.conn, b'{"op":"pub","room":"%b","data":1}' % room.encode())
    assert [(e[0], e[1], e[4]) for e in rec.events] == [("publish", r, HistoryPolicy(size=len(r))) for r in rooms]
