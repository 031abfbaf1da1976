"""The hub's per-frame path for the frames that are most of the traffic, ``ping`` and
``pub``: on a local broker (:class:`InlineFrames`) and on a remote one (:class:`PipelinedFrames`).

Compiled with the accelerator (``hatch_build.py``, typed by ``_frames.pxd``) like the
framework's connection and framing code. :class:`~wirehub.hub.app.HubApp` makes one of each
per server. On a local broker, when no hook and no rate limit apply, InlineFrames is the frame
handler itself, and every frame but ping and pub goes to the app's ``_frame_command``, decoded
once; :meth:`InlineFrames.pub` is the hub's one ``pub`` on a local broker (``HubApp._pub_local``
calls it, hooks or not). On a remote broker PipelinedFrames is the frame handler: it starts a
publication without a coroutine, and sends the acks in frame order as the broker answers.
Behaviour is the same as the decoder's path, frame for frame, compiled or not.

The canonical forms: when compiled (``scan``), a ``ping`` or ``pub`` frame written as the
clients write them, ``{"op":"ping","ref":REF}`` and ``{"op":"pub","room":ROOM,"data":DATA,
"ref":REF}`` (``ref`` optional in a pub), is recognised by its bytes, before any decoding:
:func:`ping_reply`, :meth:`InlineFrames.pub_frame` and :meth:`PipelinedFrames.pub_frame`. They take only what they can answer
exactly as the decoder's path would (an integer ``ref`` of at most 18 digits other than
``-0``, strings of printable ASCII without ``"`` or ``\\``, ``DATA`` any JSON value in that
alphabet, a frame that decoding would take as the same command) and leave everything else,
untouched, to ``msgspec`` and the code after it. tests/fuzz/test_fuzz_hub_scan.py holds them to
that: the same replies and the same publications as the decoder's path, for any input.
"""

from __future__ import annotations

import collections
import functools
import time
from asyncio import CancelledError
from types import FunctionType
from typing import Any

import msgspec

from . import protocol as wire
from .broker.base import BrokerError

_Ping = wire.Ping
_Pub = wire.Pub
_decode = wire._decoder.decode
_explain = wire.decode  # a frame the decoder refused: the ProtocolError that says why
_json_decode = msgspec.json.decode
_ok = wire.ok
_pong = wire.pong
_data_bytes = wire.data_bytes
_time_ns = time.time_ns
_deque = collections.deque
# deque's own methods, called with the deque: cheaper than looking them up on it per call
_deque_append = _deque.append
_deque_popleft = _deque.popleft
_partial = functools.partial


def _probe() -> None:
    """A function: a Python one here, a compiled one in the compiled copy."""


#: True in the compiled copy, which then takes the C helpers its .pxd defines
_COMPILED = not isinstance(_probe, FunctionType)

_PING_HEAD = b'{"op":"ping","ref":'
_PONG_HEAD = b'{"op":"pong"'
_PUB_HEAD = b'{"op":"pub","room":"'
_MAX_ROOM_LENGTH = wire.MAX_ROOM_LENGTH
_DATA_KEY = b',"data":'
_REF_KEY = b',"ref":'
#: the longest integer ``ref`` taken by its bytes: 18 digits always fit in 64 bits
MAX_REF_DIGITS = 18
#: the deepest nesting of ``data`` taken by its bytes (deeper: the decoder's path)
MAX_SCAN_DEPTH = 32

# The scanners take ``p``, a frame's bytes: compiled, a C pointer to them (the caller holds the
# frame), so that reading a byte is a C load and a slice is one copy.


def _string_end(p: bytes, i: int, end: int) -> int:
    """Past the string whose opening quote is ``p[i]`` (closed before ``end``), when it
    holds printable ASCII and no ``\\``: then its bytes are its canonical JSON, and its
    text is them. -1 otherwise."""
    if _COMPILED:
        return _string_end_c(p, i, end)  # noqa: F821 - the same in C (_frames.pxd)
    i += 1
    while i < end:
        c = p[i]
        if c == 34:
            return i + 1
        if c < 32 or c > 126 or c == 92:
            return -1
        i += 1
    return -1


def ref_end(p: bytes, i: int, end: int) -> int:
    """Where the ``ref`` value that starts at ``p[i]`` ends (before ``end``), when it is
    in a form whose bytes are its own canonical JSON: an integer of at most
    :data:`MAX_REF_DIGITS` digits but ``-0``, or a string of printable ASCII without ``"`` or
    ``\\``. -1 otherwise (the decoder's path decides)."""
    if i >= end:
        return -1
    c = p[i]
    if c == 34:  # '"': a string
        return _string_end(p, i, end)
    j = i
    if c == 45:  # '-'
        j += 1
        if j >= end:
            return -1
        c = p[j]
    if c == 48:  # '0': alone, and not "-0" (its reply says 0)
        return j + 1 if j == i else -1
    if c < 49 or c > 57:
        return -1
    k = j + 1
    while k < end:
        c = p[k]
        if c < 48 or c > 57:
            break
        k += 1
    if k - j > MAX_REF_DIGITS:
        return -1
    return k


def ping_reply(frame: bytes) -> Any:
    """The pong to ``{"op":"ping","ref":REF}`` written exactly so (:func:`ref_end`), the same
    bytes as ``wire.pong(REF)``; None for any other frame."""
    n = len(frame)
    p = frame  # compiled: its bytes, as a C pointer (indexing and slicing them are C)
    if n < 21 or p[n - 1] != 125 or not frame.startswith(_PING_HEAD):  # 125: '}'
        return None
    if ref_end(p, 19, n - 1) != n - 1:
        return None
    if _COMPILED:
        return _pong_c(p, n)  # noqa: F821 - one allocation (_frames.pxd)
    return _PONG_HEAD + p[12:n]


def json_end(p: bytes, i: int, end: int) -> int:
    """Where the JSON value that starts at ``p[i]`` ends (before ``end``), when it is one
    the decoder takes and ``wire.data_bytes`` relays unchanged: ASCII, strings of printable
    characters without ``\\``, nesting at most :data:`MAX_SCAN_DEPTH` deep, no newline. -1
    otherwise, and for what is not JSON (the decoder's path decides)."""
    depth = 0
    objects = 0  # a bit per open container, the innermost lowest: 1 for an object
    while True:
        # a value
        while i < end and (p[i] == 32 or p[i] == 9 or p[i] == 13):
            i += 1
        if i >= end:
            return -1
        c = p[i]
        if c == 34:  # a string
            i = _string_end(p, i, end)
            if i < 0:
                return -1
        elif c == 123 or c == 91:  # '{' or '['
            if depth == MAX_SCAN_DEPTH:
                return -1
            depth += 1
            objects = objects * 2 + (1 if c == 123 else 0)
            i += 1
            while i < end and (p[i] == 32 or p[i] == 9 or p[i] == 13):
                i += 1
            if i >= end:
                return -1
            c = p[i]
            if c == (125 if objects & 1 else 93):  # empty: '}' or ']'
                depth -= 1
                objects = objects // 2
                i += 1
            elif objects & 1:
                i = _key_end(p, i, end)
                if i < 0:
                    return -1
                continue
            else:
                continue
        elif c == 45 or 48 <= c <= 57:  # a number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
            if c == 45:
                i += 1
                if i >= end:
                    return -1
                c = p[i]
            if c == 48:
                i += 1
            elif 49 <= c <= 57:
                i += 1
                while i < end and 48 <= p[i] <= 57:
                    i += 1
            else:
                return -1
            if i < end and p[i] == 46:  # '.'
                i += 1
                if i >= end or not 48 <= p[i] <= 57:
                    return -1
                while i < end and 48 <= p[i] <= 57:
                    i += 1
            if i < end and (p[i] == 101 or p[i] == 69):  # 'e', 'E'
                i += 1
                if i < end and (p[i] == 43 or p[i] == 45):
                    i += 1
                if i >= end or not 48 <= p[i] <= 57:
                    return -1
                while i < end and 48 <= p[i] <= 57:
                    i += 1
        elif c == 116:  # true
            if i + 4 > end or p[i + 1] != 114 or p[i + 2] != 117 or p[i + 3] != 101:
                return -1
            i += 4
        elif c == 102:  # false
            if i + 5 > end or p[i + 1] != 97 or p[i + 2] != 108 or p[i + 3] != 115 or p[i + 4] != 101:
                return -1
            i += 5
        elif c == 110:  # null
            if i + 4 > end or p[i + 1] != 117 or p[i + 2] != 108 or p[i + 3] != 108:
                return -1
            i += 4
        else:
            return -1
        # after a value: the end, or what follows it in its container
        while True:
            if depth == 0:
                return i
            while i < end and (p[i] == 32 or p[i] == 9 or p[i] == 13):
                i += 1
            if i >= end:
                return -1
            c = p[i]
            if c == 44:  # ','
                i += 1
                if objects & 1:
                    while i < end and (p[i] == 32 or p[i] == 9 or p[i] == 13):
                        i += 1
                    i = _key_end(p, i, end)
                    if i < 0:
                        return -1
                break  # the next value
            if c != (125 if objects & 1 else 93):
                return -1
            depth -= 1
            objects = objects // 2
            i += 1


def _key_end(p: bytes, i: int, end: int) -> int:
    """Past an object's key and its colon (a string as :func:`json_end` takes them), or -1."""
    if i >= end or p[i] != 34:
        return -1
    i = _string_end(p, i, end)
    if i < 0:
        return -1
    while i < end and (p[i] == 32 or p[i] == 9 or p[i] == 13):
        i += 1
    if i >= end or p[i] != 58:  # ':'
        return -1
    return i + 1


class PubScanner:
    """What :class:`InlineFrames` and :class:`PipelinedFrames` share: the canonical ``pub``
    read by its bytes (:meth:`scan_pub`), and the room published to last, known again by its
    bytes (:meth:`room_of`, :meth:`history_of`): its name, and its history policy (a room's
    policy is the config's for the server's life)."""

    __slots__ = ("app", "sessions", "policies", "room_end", "data_end", "ref_start", "known", "last_room_key", "last_room",
                 "last_history", "last_conn", "last_session", "last_client", "last_send")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sessions = app.sessions
        self.policies = app._policies
        #: where scan_pub found the room's closing quote, the data's end and the ref's start
        #: (the frame's last byte when it has none); the data starts 9 bytes past the room
        self.room_end = 0
        self.data_end = 0
        self.ref_start = 0
        self.known = False  # room_of's room was the last one (its history is last_history)
        self.last_room_key: bytes | None = None
        self.last_room: Any = None
        self.last_history: Any = None
        #: the connection a frame was last taken from, its session, the session's client id
        #: and the connection's send (a connection's session and client id are the same from
        #: connect to close, and no frame of it is handled after; the app forgets it when it
        #: closes)
        self.last_conn: Any = None
        self.last_session: Any = None
        self.last_client: Any = None
        self.last_send: Any = None

    def forget(self, conn: Any) -> None:
        """``conn`` closed: no longer the last connection (the app calls it on disconnect)."""
        if self.last_conn is conn:
            self.last_conn = self.last_session = self.last_client = self.last_send = None

    def session_of(self, conn: Any) -> Any:
        """``conn``'s session (the frames of one read come together); ``last_client`` and
        ``last_send`` are its client id and ``conn.send`` from now on."""
        if conn is self.last_conn:
            return self.last_session
        s = self.sessions[conn.id]
        self.last_conn = conn
        self.last_session = s
        self.last_client = s.client
        self.last_send = conn.send
        return s

    def scan_pub(self, frame: bytes) -> bool:
        """``{"op":"pub","room":ROOM,"data":DATA[,"ref":REF]}`` written in the canonical form
        (see the module): True, and where its parts are in ``room_end``, ``data_end`` and
        ``ref_start``. False for any other frame."""
        n = len(frame)
        end = n - 1
        p = frame  # compiled: its bytes, as a C pointer (indexing and slicing them are C)
        if p[end] != 125 or not frame.startswith(_PUB_HEAD):
            return False
        i = _string_end(p, 19, end)  # the room (from its opening quote, _PUB_HEAD's last byte)
        if i < 0:
            return False
        room_end = i - 1
        if room_end == 20 or room_end - 20 > _MAX_ROOM_LENGTH or not frame.startswith(_DATA_KEY, i):
            return False
        data_start = room_end + 9
        c = p[data_start]
        if c == 32 or c == 9 or c == 13:  # space before the value: not in the data the decoder gives
            return False
        data_end = json_end(p, data_start, end)
        if data_end < 0:
            return False
        ref_start = end
        if data_end != end:
            if not frame.startswith(_REF_KEY, data_end):
                return False
            ref_start = data_end + 7
            if ref_end(p, ref_start, end) != end:
                return False
        self.room_end = room_end
        self.data_end = data_end
        self.ref_start = ref_start
        return True

    def room_of(self, frame: bytes) -> str:
        """The room of the frame scan_pub took last."""
        p = frame
        room_end = self.room_end
        key = self.last_room_key
        if key is not None and len(key) == room_end - 20 and (_same_c(p + 20, key) if _COMPILED else frame.startswith(key, 20)):  # noqa: F821 - defined in the .pxd
            self.known = True
            return self.last_room
        self.known = False
        return p[20:room_end].decode("ascii")

    def history_of(self, frame: bytes, room: str) -> Any:
        """The history policy of ``room``, room_of's answer for ``frame``: the last room's
        again, or looked up (and this room is the last one from now on)."""
        if self.known:
            return self.last_history
        policy = self.policies.get(room)
        if policy is None:
            policy = self.app.policy(room)
        history = policy.history
        self.last_room_key = frame[20 : self.room_end]
        self.last_room = room
        self.last_history = history
        self.known = True
        return history


class InlineFrames(PubScanner):
    """``frame(conn, data)`` for the hub: ping and pub here, the rest in the app."""

    __slots__ = ("table", "stats", "publish_seq", "gated", "scan", "published")

    def __init__(self, app: Any, scan: bool = False) -> None:
        super().__init__(app)
        table = app._room_table  # the rooms a local broker holds (None: ask the app)
        self.table = table if type(table) is dict else None
        self.stats = app.stats
        self.publish_seq = getattr(app.broker, "publish_seq_now", None)  # a local broker's
        self.gated = bool(app._gate)
        #: recognise the canonical ping and pub by their bytes first (worth it compiled)
        self.scan = scan
        #: publications made here (``HubStats.published`` adds them: see ``HubStats.frames``)
        self.published = 0

    def __call__(self, conn: Any, data: bytes) -> None:
        self.frame(conn, data)

    def frame(self, conn: Any, data: bytes) -> None:
        """The frame handler (the app's ``frame``: a bound method of a compiled class is
        called without an argument tuple, the instance itself would not be)."""
        if self.scan and type(data) is bytes:
            head = data  # compiled: typed bytes, whose bytes are read in C
            if len(head) > 20 and head[7] == 112:  # '{"op":"p'
                if head[8] == 105:  # ping
                    reply = ping_reply(head)
                    if reply is not None:
                        s = self.session_of(conn)
                        if not self.gated or s.greeted:
                            self.last_send(reply)
                            return
                elif head[8] == 117 and self.table is not None:  # pub
                    if self.pub_frame(conn, head):
                        return
        try:
            cmd = _decode(data)
        except Exception:  # noqa: BLE001 - the app's path says what is wrong
            self.app._frame_inline(conn, data)
            return
        kind = type(cmd)
        if kind is _Ping:
            if not self.gated or self.sessions[conn.id].greeted:
                conn.send(_pong(cmd.ref))
                return
        elif kind is _Pub:
            session = self.sessions[conn.id]
            try:
                self.pub(session, cmd)
            except Exception:  # noqa: BLE001 - a server bug: logged, answered, counted
                self.app._failed(session, cmd)
            return
        self.app._frame_command(conn, cmd)

    def pub_frame(self, conn: Any, frame: bytes) -> bool:
        """``{"op":"pub","room":ROOM,"data":DATA[,"ref":REF]}`` written in the canonical form
        (see the module), to a room that exists, by a client who may: published as
        :meth:`pub` would, True. False, having done nothing, for any other frame."""
        if not self.scan_pub(frame):
            return False
        p = frame  # compiled: its bytes, as a C pointer (indexing and slicing them are C)
        end = len(frame) - 1
        room = self.room_of(frame)
        if room not in self.table:
            return False
        s = self.session_of(conn)
        if self.gated and not s.greeted:
            return False
        send = self.last_send  # conn's, kept: fan-out may close a connection, and its forget clear this
        try:
            if s.claims is not None and not s.claims.may_publish(room):
                return False  # the decoder's path says why
            self.published += 1
            history = self.history_of(frame, room)
            ts = _now_ms_c() if _COMPILED else _time_ns() // 1_000_000  # noqa: F821 - defined in the .pxd
            seq = self.publish_seq(room, p[self.room_end + 9 : self.data_end], self.last_client, ts, history)
            ref_start = self.ref_start
            if ref_start != end:
                if _COMPILED:  # formatted in C (_frames.pxd)
                    send(_ack_c(p + ref_start, end - ref_start, seq))  # noqa: F821 - defined in the .pxd
                else:
                    send(b'{"op":"ok","ref":%b,"seq":%d}' % (p[ref_start:end], seq))
        except Exception:  # noqa: BLE001 - a server bug: logged, answered, counted (as pub's caller does)
            self.app._failed(s, _decode(frame))
        return True

    def pub(self, s: Any, cmd: Any) -> None:
        """``pub`` on a local broker: published (and fanned out) now."""
        room = cmd.room
        table = self.table
        if table is not None and room in table and (not self.gated or s.greeted) and (s.claims is None or s.claims.may_publish(room)):
            # the common case, a room that exists and a client who may: only the data to check
            data = _data_bytes(cmd.data)
            if type(data) is str:
                self.app._error(s, "bad_frame", data, cmd.ref)
                self.stats.pub_refused += 1
                return
        else:
            data = self.app._pub_data(s, cmd)
            if data is None:
                self.stats.pub_refused += 1
                return
        self.published += 1
        policy = self.policies.get(room)
        if policy is None:
            policy = self.app.policy(room)
        seq = self.publish_seq(room, data, s.client, _time_ns() // 1_000_000, policy.history)
        if cmd.ref is not None:
            s.conn.send(_ok(cmd.ref, seq))


#: publications one connection may have in flight at a remote broker; its next one waits
#: (and its reads pause once its queue of frames fills) until the oldest is answered
PUB_WINDOW = 64
#: publications the whole node may have in flight; beyond it a connection waits for its own
PUB_IN_FLIGHT = 8192


class PipelinedFrames(PubScanner):
    """``frame(conn, data)`` for the hub on a remote broker, in the connection's task: a
    ``pub`` whose publication can start now starts here and None is returned; any other frame
    (and a ``pub`` that must wait for room in the window, or that hooks handle) is the
    coroutine the task awaits before the next.

    A connection's publications in flight are its window, ``Session.publishing``: a deque of
    ``(future, cmd, k)``, oldest first. ``cmd`` is the ``pub`` (decoded), or, for a ``pub``
    taken by its bytes (:meth:`pub_frame`), its ``ref``'s bytes (``b""``: none), or a
    1-tuple holding the bytes of a reply that waits for the acks before it (see
    ``HubApp._error``). The future gives the seq: the seq itself (``k`` is -1), or, shared by
    a batch of publications (a broker's ``publish_batched_nowait``), the batch's first seq,
    to which ``k`` is added. The future of the front alone has a callback: a broker answers a
    batch of publications in one go, and one call answers every publication answered at the
    front."""

    __slots__ = ("broker", "stats", "publish", "batched", "batched_now", "runner", "rate", "gated", "table", "scan")

    def __init__(self, app: Any, scan: bool = False) -> None:
        super().__init__(app)
        self.broker = app.broker
        self.stats = app.stats
        #: a broker's publish_nowait whose future gives the seq alone, when it has one (base.py)
        self.publish = getattr(app.broker, "publish_seq_nowait", None) or app.broker.publish_nowait
        #: a broker's publish whose future is shared by a batch (base.py), when it has one, and
        #: the same by position (publish_batched_now: no keywords to parse)
        self.batched = getattr(app.broker, "publish_batched_nowait", None)
        self.batched_now = getattr(app.broker, "publish_batched_now", None) if self.batched is not None else None
        self.runner = app._runner  # the hooks' (None: no hooks)
        self.rate = bool(app._rate)
        self.gated = bool(app._gate)
        self.table = app._room_table  # the rooms a broker holds in this process (a remote one: None)
        #: take the canonical pub by its bytes first (as InlineFrames does; worth it compiled)
        self.scan = scan

    def __call__(self, conn: Any, data: bytes) -> Any:
        return self.frame(conn, data)

    def frame(self, conn: Any, data: bytes) -> Any:
        """The frame handler (the app's ``frame``: a bound method of a compiled class is
        called without an argument tuple, the instance itself would not be)."""
        if self.scan and type(data) is bytes:
            head = data  # compiled: typed bytes, whose bytes are read in C
            if len(head) > 20 and head[7] == 112 and head[8] == 117 and self.pub_frame(conn, head):  # '{"op":"pu'
                return None
        session = self.sessions[conn.id]
        try:
            cmd = _decode(data)
        except Exception:  # noqa: BLE001 - not a command: the error reply says why
            cmd = _explain(data)
        if type(cmd) is _Pub and self.runner is None:
            window = session.publishing
            if window is None or (len(window) < PUB_WINDOW and self.broker.in_flight < PUB_IN_FLIGHT):
                app = self.app
                if not self.rate or app._admit(session, cmd.ref):
                    try:
                        if self.table is None and session.claims is None and (not self.gated or session.greeted):
                            # the common case, a client who may: only the data to check
                            body = bytes(cmd.data)
                            if not body.isascii() or 10 in body:  # (data_bytes's own tests)
                                body = _data_bytes(body)
                                if type(body) is str:
                                    app._error(session, "bad_frame", body, cmd.ref)
                                    body = None
                        else:
                            body = app._pub_data(session, cmd)
                        if body is None:
                            self.stats.pub_refused += 1
                        else:
                            self.start(session, cmd, body, None)
                    except BrokerError as exc:
                        app._broker_failed(session, cmd.ref, exc)
                    except Exception:  # noqa: BLE001 - a server bug: logged, answered, counted
                        app._failed(session, cmd)
                return None
        return self.app._frame_async(session, cmd)

    def pub_frame(self, conn: Any, frame: bytes) -> bool:
        """A ``pub`` written in the canonical form (see the module), by a client who may,
        when there is room in its window and no hook or rate limit applies: started as
        :meth:`start` would start it, True. False, having done nothing, otherwise."""
        if self.runner is not None or self.rate or self.table is not None or not self.scan_pub(frame):
            return False
        s = self.session_of(conn)
        if self.gated and not s.greeted:
            return False
        window = s.publishing
        if window is not None and (len(window) >= PUB_WINDOW or self.broker.in_flight >= PUB_IN_FLIGHT):
            return False  # the decoder's path waits for room
        p = frame  # compiled: its bytes, as a C pointer (indexing and slicing them are C)
        room = self.room_of(frame)
        try:
            if s.claims is not None and not s.claims.may_publish(room):
                return False  # the decoder's path says why
            history = self.history_of(frame, room)
            data = p[self.room_end + 9 : self.data_end]
            ts = _now_ms_c() if _COMPILED else _time_ns() // 1_000_000  # noqa: F821 - defined in the .pxd
            k = -1
            client = self.last_client  # s's (session_of)
            if self.batched_now is not None:
                future, k = self.batched_now(room, data, client, ts, history)
            elif self.batched is not None:
                future, k = self.batched(room, data, sender=client, ts=ts, history=history)
            else:
                future = self.publish(room, data, sender=client, ts=ts, history=history)
            self.in_window(s, window, future, p[self.ref_start : len(frame) - 1], k)
        except BrokerError as exc:
            self.app._broker_failed(s, _decode(frame).ref, exc)
        except Exception:  # noqa: BLE001 - a server bug: logged, answered, counted (as frame's)
            self.app._failed(s, _decode(frame))
        return True

    def start(self, s: Any, cmd: Any, data: bytes, info: Any) -> None:
        """Start ``cmd``'s publication at the broker and put it in ``s``'s window (which the
        caller made sure has room)."""
        room = cmd.room
        policy = self.policies.get(room)
        if policy is None:
            policy = self.app.policy(room)
        ts = _now_ms_c() if _COMPILED else _time_ns() // 1_000_000  # noqa: F821 - defined in the .pxd
        k = -1
        if self.batched is not None:
            future, k = self.batched(room, data, sender=s.client, ts=ts, history=policy.history, info=info)
        else:
            future = self.publish(room, data, sender=s.client, ts=ts, history=policy.history, info=info)
        self.in_window(s, s.publishing, future, cmd, k)

    def in_window(self, s: Any, window: Any, future: Any, cmd: Any, k: int) -> None:
        """A publication just started goes at the back of ``s``'s window (``window``: its
        ``publishing``, read by the caller; see the class)."""
        if window is None:
            window = s.publishing = _deque()
        if not window:  # the front of the window: its answer answers the client (published)
            future.add_done_callback(_partial(self.published, s))
        _deque_append(window, (future, cmd, k))

    def published(self, s: Any, _: Any) -> None:
        """The publication at the front of ``s``'s window was answered: answer the client for
        every one answered at the front, in the order they were sent. The new front gets this
        callback, when one is left."""
        window = s.publishing
        if window is None:
            return
        send = s.conn.send
        published = 0
        last = None  # the future answered last, whose result is value (or error)
        value: Any = None
        error: Any = None
        while window:
            entry = window[0]
            future = entry[0]
            if future is not last:  # (a batch's publications share theirs)
                if not future.done():
                    break
                last = future
                error = None
                try:
                    value = future.result()  # the seq, a batch's first seq, or the Publication
                except CancelledError as exc:
                    error = exc
                except Exception as exc:  # noqa: BLE001 - a BrokerError, or a broker bug
                    error = exc
            _deque_popleft(window)
            cmd = entry[1]
            kind = type(cmd)
            if kind is tuple:  # a reply queued behind the acks (see HubApp._error)
                reply = cmd[0]
                s.held -= len(reply)
                send(reply)
                continue
            if error is not None:
                if type(error) is not CancelledError:
                    self.failed(s, cmd, error)
                continue
            published += 1
            k = entry[2]
            if k >= 0:
                seq = value + k
            elif type(value) is int:
                seq = value
            else:
                seq = value.seq
            if kind is bytes:  # taken by its bytes: cmd is its ref's (b"": none)
                ref = cmd  # compiled: typed bytes, whose bytes the ack copies in C
                n = len(ref)
                if n:
                    if _COMPILED:
                        rp = ref
                        send(_ack_c(rp, n, seq))  # noqa: F821 - defined in the .pxd
                    else:
                        send(b'{"op":"ok","ref":%b,"seq":%d}' % (ref, seq))
            elif cmd.ref is not None:
                send(_ok(cmd.ref, seq))
        self.stats.counted += published
        if window:
            window[0][0].add_done_callback(_partial(self.published, s))
        else:
            s.publishing = None

    def failed(self, s: Any, cmd: Any, exc: Exception) -> None:
        """The publication at the front failed: say so (it was the front: before the acks
        behind it)."""
        self.stats.pub_failed += 1
        ref = (_json_decode(cmd) if cmd else None) if type(cmd) is bytes else cmd.ref
        if isinstance(exc, BrokerError):
            self.app._broker_failed(s, ref, exc, now=True)
        else:  # a broker bug: logged within the same budget as HubApp._failed's
            self.app._pub_bug(s, ref, exc)
