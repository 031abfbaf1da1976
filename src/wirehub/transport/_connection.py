"""One open connection: counters, deadlines, the outbound buffer and handler dispatch.

A :class:`Connection` is what an application's handlers receive. Subclasses bind it to a
transport: :class:`~wirehub.transport.stream.StreamConnection` (TCP, TLS, Unix),
:class:`~wirehub.transport.datagram.DatagramSession` (UDP) and
:class:`~wirehub.transport.websocket.WebSocketConnection`.

Outbound data goes through a per-connection buffer of whole frames (``_pending``) that a
shared :class:`Flusher` writes once per event-loop turn, so many frames sent in one turn cost
one write; what a stream connection's handlers send to it while one of its reads is handled is
written when that read is done (one write per read, the turn's flush finds nothing left).
While the transport is above its high water mark (``pause_writing``) frames wait in
``_pending``; past ``max_send_buffer`` the slow-consumer policy applies: disconnect, or drop
the oldest frames.

This file is the implementation; import it as :mod:`wirehub.transport.connection`, which
picks this Python code or its compiled copy (see there). ``_connection.pxd`` gives the
compiled copy its C types; keep the two in step.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import heapq
import inspect
import os
import time
import types
import dataclasses
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from .._log import get_logger
from ..protocol.framing import LINE

_line_encode = LINE.encoder
#: the line framing's terminator: a frame sent with ``send`` on a line-framed connection is
#: queued as two entries, its payload and this very object, joined on write (no copy of the
#: payload). An entry that *is* ``_NL`` is always such a newline: an encoded empty line queued
#: by ``send_wire`` or ``broadcast`` is put in as a distinct (bytearray) object.
_NL = b"\n"

log = get_logger("wirehub.connection")

# Framework-level reasons a connection ended; apps map them to their own words.
CLOSED = "closed"  # the peer closed
ERROR = "error"  # the transport failed (reset, TLS error)
IDLE = "idle"
HANDSHAKE_TIMEOUT = "handshake_timeout"
SLOW_CONSUMER = "slow_consumer"
SHUTDOWN = "shutdown"
KICKED = "kicked"
PROTOCOL = "protocol"  # the peer broke the framing
HANDLER_ERROR = "handler_error"  # the app's handler raised

#: frames queued for an ``async`` frame handler before reading pauses
MAX_QUEUED_FRAMES = 64

_b32 = base64.b32encode
_urandom = os.urandom


def new_connection_id() -> str:
    """A short id nobody can guess: 80 random bits from the kernel as 16 characters of
    lowercase base32 (``a-z``, ``2-7``). Client ids are addresses (a hub ``send`` goes to
    one), so they must not be sequential; unique across processes, restarts and forks
    (two ids out of a million collide with odds of about 1 in 10^12)."""
    return _b32(_urandom(10)).decode().lower()


@dataclass(slots=True)
class Handlers:
    """An application's callbacks as the transport layer sees them."""

    connect: Callable[[Any], Any]
    frame: Callable[[Any, bytes], Any]
    frame_error: Callable[[Any, Any], Any]
    disconnect: Callable[[Any, str], Any]
    closing: Callable[[Any, str], Any]
    connect_async: bool = False
    frame_async: bool = False
    frame_error_async: bool = False
    disconnect_async: bool = False
    #: True when frames must go through a per-connection task (some handler awaits)
    pumped: bool = False
    #: frames the server answers itself (``App.replies``), None when there are none
    replies: dict[bytes, bytes] | None = None
    #: the replies encoded, per encoder (built on first use)
    reply_wires: dict[Any, dict[bytes, bytes]] = dataclasses.field(default_factory=dict)
    #: ``(conn) -> awaitable | None``: what the app still owes a peer that finished sending
    #: (replies its handlers started but did not wait for); the close waits for it, at most
    #: ``close_timeout``. None: the app never owes anything past its handlers.
    pending: Callable[[Any], Any] | None = None

    def wires_for(self, encode: Any) -> dict[bytes, bytes]:
        """``replies`` with each answer encoded by ``encode``: built once per encoder."""
        wires = self.reply_wires.get(encode)
        if wires is None:
            wires = {k: encode(v) for k, v in (self.replies or {}).items()}
            if len(self.reply_wires) < 16:  # framings are few; an app's own encoders may not be
                self.reply_wires[encode] = wires
        return wires

    def __post_init__(self) -> None:
        self.connect_async = inspect.iscoroutinefunction(self.connect)
        self.frame_async = inspect.iscoroutinefunction(self.frame)
        self.frame_error_async = inspect.iscoroutinefunction(self.frame_error)
        self.disconnect_async = inspect.iscoroutinefunction(self.disconnect)
        self.pumped = self.connect_async or self.frame_async or self.frame_error_async
        if inspect.iscoroutinefunction(self.closing):
            raise TypeError("the closing handler must be a plain function: it runs just before the close")


@dataclass(slots=True)
class Settings:
    """Per-connection limits and timeouts, shared by every connection of a server."""

    max_frame: int = 65536
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    close_timeout: float = 5.0
    send_buffer_low: int = 16384
    send_buffer_high: int = 65536
    max_send_buffer: int = 1048576
    drop_oldest: bool = False  # slow-consumer policy: False = disconnect


class Flusher:
    """Writes every connection's pending frames once per event-loop turn."""

    __slots__ = ("_loop", "_dirty", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Connection] = []
        self._scheduled = False

    def add(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.run)

    def run(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        write_out(dirty, False)


class Deadlines:
    """Every connection's handshake and idle deadline on one loop timer.

    A connection is filed under the ``TICK``-wide slot its deadline falls in (rounded up, so
    it is never checked early), and the connections of a slot are checked together when it
    comes due. A connection costs one set entry here instead of a loop timer of its own (a
    uvloop timer handle is ~600 bytes), and moving a deadline costs a set operation."""

    TICK = 0.02  # seconds: how late a deadline may be noticed
    EARLY = 0.002  # a loop timer may fire this much early (libuv counts milliseconds)

    __slots__ = ("_loop", "_slots", "_keys", "_timer", "_armed")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, set[Connection]] = {}
        self._keys: list[int] = []  # heap of the slots' keys
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0  # the key the loop timer fires for

    def file(self, conn: Connection, when: float) -> int:
        """File ``conn`` to be checked at loop time ``when`` or just after; returns its key."""
        key = -int(-when // self.TICK)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            heapq.heappush(self._keys, key)
            if self._timer is None or key < self._armed:
                self._arm(key)
        slot.add(conn)
        return key

    def unfile(self, conn: Connection, key: int) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(conn)  # an emptied slot stays until due: it costs one empty check

    def due(self, key: int) -> float:
        return key * self.TICK

    def _arm(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = key
        self._timer = self._loop.call_at(key * self.TICK, self._fire)

    def _fire(self) -> None:
        self._timer = None
        keys = self._keys
        horizon = self._loop.time() + self.EARLY
        while keys and keys[0] * self.TICK <= horizon:
            slot = self._slots.pop(heapq.heappop(keys), None)
            for conn in slot or ():
                conn._deadline = 0
                try:
                    conn._deadline_check()
                except Exception:
                    log.exception("deadline_check_failed", conn=conn.id)
        if keys:
            self._arm(keys[0])


def write_out(conns: Iterable[Connection], force: bool) -> None:
    """Write each connection's pending frames (one joined write per connection), unless it
    is closed or, without ``force``, the peer is behind. The body of ``Connection._flush``,
    looped here so that the per-turn flush of many connections costs no call per connection."""
    for conn in conns:
        pending = conn._pending
        if not pending or conn._closed or (conn._write_paused and not force):
            continue
        sink = conn._sink
        if sink is None:
            conn._write(pending)
        else:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            conn.bytes_out += len(data)
            sink.write(data)
        pending.clear()
        conn._pending_size = 0


def broadcast(conns: Iterable[Connection], payload: bytes) -> int:
    """Send ``payload`` as one frame to every connection in ``conns``: encoded once per
    framing (connections of one framing get the same bytes object), queued like ``send``
    (closing connections skipped, the send-buffer limit applied to each). Returns how many
    connections it was queued for. Order ``conns`` by framing for the fewest encodings."""
    wires: dict[Any, bytes] = {}
    encode: Any = None
    data = b""
    size = 0
    queued = 0
    for conn in conns:
        if (conn._close_reason is not None and not conn._last_word) or conn._closed:
            continue
        if conn.encode is not encode:
            encode = conn.encode
            data = wires.get(encode)  # type: ignore[assignment]
            if data is None:
                data = encode(payload)
                if data is _NL and encode is _line_encode:
                    data = bytearray(data)  # an empty line: not to be taken for a payload's newline
                wires[encode] = data
            size = len(data)
        # send_wire's body, inlined: this runs once per member of a fan-out
        pending = conn._pending
        if not pending and not conn._write_paused and not conn._in_read:
            conn._ctx.flusher.add(conn)
        pending.append(data)
        conn._pending_size += size
        conn.frames_out += 1
        if conn._pending_size > conn._ctx.max_send_buffer and not conn._over_limit():
            continue
        queued += 1
    return queued


class Context:
    """What every connection of one server shares: loop, handlers, settings, registry."""

    __slots__ = ("loop", "handlers", "settings", "flusher", "deadlines", "registry", "now", "max_send_buffer",
                 "frame_handler", "pumped", "frame_now", "has_replies", "reply_max")

    def __init__(self, loop: asyncio.AbstractEventLoop, handlers: Handlers, settings: Settings, registry: Any) -> None:
        self.loop = loop
        self.handlers = handlers
        self.settings = settings
        self.flusher = Flusher(loop)
        self.deadlines = Deadlines(loop)
        self.registry = registry
        self.now = loop.time
        # read on every send or read: one lookup, not two (handlers do not change once built)
        self.max_send_buffer = settings.max_send_buffer
        self.frame_handler = handlers.frame
        self.pumped = handlers.pumped
        #: frames go through the connection's task (pumped) but the frame handler is a plain
        #: function: it runs at once while nothing is queued before it (Connection._dispatch)
        self.frame_now = handlers.pumped and not handlers.frame_async
        self.has_replies = handlers.replies is not None
        #: the longest frame the server answers itself: a longer one is not looked up (hashing
        #: a frame costs more than comparing its length)
        self.reply_max = max(map(len, handlers.replies)) if handlers.replies else -1


class Connection:
    """One client connection, as handlers see it.

    Public attributes: ``id``, ``transport`` (``"tcp"``, ``"tls"``, ``"unix"``, ``"udp"``,
    ``"ws"``, ``"wss"``), ``peer`` (``"host:port"``), ``peer_ip``, ``connected_at`` (Unix
    time), the counters ``bytes_in``, ``bytes_out``, ``frames_in``, ``frames_out``,
    ``frames_dropped``, and ``state``, a dict that belongs to the application.
    """

    __slots__ = (
        "id",
        "transport",
        "peer",
        "peer_ip",
        "connected_at",
        "_state",
        "bytes_in",
        "bytes_out",
        "frames_in",
        "frames_out",
        "frames_dropped",
        "last_activity",
        "_ctx",
        "encode",
        "_sink",
        "_pending",
        "_pending_size",
        "_write_paused",
        "_close_reason",
        "_closed",
        "_greeted",
        "_idle_timeout",
        "_timer",
        "_deadline",
        "_queue",
        "_pump",
        "_drain_waiter",
        "_reading_paused",
        "_eof",
        "_last_word",
        "_handshake_deadline",
        "_app_deadline",
        "_decoder",
        "_in_read",
        "__weakref__",
    )

    def __init__(self, ctx: Context, transport_name: str, encode: Callable[[bytes], bytes]) -> None:
        self.id = new_connection_id()
        self.transport = transport_name
        self.peer = ""
        self.peer_ip = ""
        self.connected_at = time.time()
        self._state: dict[str, Any] | None = None  # created on first use (memory per idle connection)
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self.last_activity = ctx.now()
        self._ctx = ctx
        #: this connection's framing encoder: payload -> bytes on the wire. Connections with
        #: the same encoder take the same bytes, so a broadcast encodes once per encoder.
        self.encode = encode
        #: the raw transport once bound (stream and WebSocket connections): the flush writes
        #: the joined frames to it directly; None means ``_write`` does the writing
        self._sink: Any = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._write_paused = False
        self._close_reason: str | None = None
        self._closed = False
        self._greeted = False
        self._idle_timeout = ctx.settings.idle_timeout
        self._timer: asyncio.TimerHandle | None = None  # close_timeout's abort
        self._deadline = 0  # key of this connection's next deadline in ctx.deadlines (0: none)
        self._queue: collections.deque | None = None
        self._pump: asyncio.Task | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._reading_paused = False
        self._eof = False
        self._last_word = False  # True while the closing handler may still send
        self._handshake_deadline = 0.0  # loop time by which the first frame must arrive (0: none)
        self._app_deadline = 0.0  # loop time set by the app's set_deadline (0: none)
        self._decoder: Any = None  # a byte stream's frame decoder (stream connections)
        #: True while the frames of one read are handled: what they send is written once at
        #: the end of the read, not left to the per-turn flush
        self._in_read = False

    # ------------------------------------------------------------------ public API

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.transport} {self.peer}>"

    @property
    def state(self) -> dict[str, Any]:
        """A dict that belongs to the application (created on first use)."""
        state = self._state
        if state is None:
            state = self._state = {}
        return state

    @property
    def open(self) -> bool:
        """False once a close has started: sends are then refused."""
        return self._close_reason is None and not self._closed

    @property
    def idle_s(self) -> float:
        return max(0.0, self._ctx.now() - self.last_activity)

    @property
    def send_buffer(self) -> int:
        """Bytes queued for this peer: frames not yet written plus the transport's buffer."""
        return self._pending_size + self._transport_buffered()

    @property
    def writable(self) -> bool:
        """False while the peer is behind (above the high water mark)."""
        return not self._write_paused

    @property
    def idle_timeout(self) -> float:
        return self._idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float) -> None:
        """Change this connection's idle timeout (the hub lengthens it after hello)."""
        self._idle_timeout = seconds
        if self._closed or self._close_reason is not None:
            return
        if self._greeted or self._deadline:  # before the first frame, the nearer deadline wins
            self._arm_deadline()

    def set_deadline(self, seconds: float | None) -> None:
        """Close the connection with reason ``handshake_timeout`` ``seconds`` from now, whatever
        it sends meanwhile, unless this is called again first (``None`` cancels). For an app
        whose own handshake is a frame: the hub's ``hello`` when auth is on. Unlike the idle
        timeout, activity does not move it."""
        self._app_deadline = self._ctx.now() + seconds if seconds else 0.0
        if self._closed or self._close_reason is not None:
            return
        if self._app_deadline:
            self._arm_deadline()

    # send and send_wire share their body rather than call a helper: they run once per frame
    # sent (once per member for a broadcast), and the call would cost more than the body.
    # On a line-framed connection, ``send`` queues the payload and ``_NL`` as two entries,
    # joined on write: one copy of the payload (the join) instead of two.

    def send(self, payload: bytes) -> bool:
        """Queue one frame. Returns False when it was not queued (closing, or dropped)."""
        if (self._close_reason is not None and not self._last_word) or self._closed:
            return False
        if self.encode is _line_encode:  # the line framing's encode, inlined (the default framing)
            if type(payload) is not bytes:
                payload = memoryview(payload).tobytes()  # its bytes (a copy: the caller may reuse it)
            if 10 in payload:
                _line_encode(payload)  # raises the framing's ValueError
            data = None
            size = len(payload) + 1
        else:
            data = self.encode(payload)
            size = len(data)
        pending = self._pending
        if not pending and not self._write_paused and not self._in_read:
            self._ctx.flusher.add(self)
        if data is None:
            pending.append(payload)
            pending.append(_NL)
        else:
            pending.append(data)
        self._pending_size += size
        self.frames_out += 1
        if self._pending_size > self._ctx.max_send_buffer:
            return self._over_limit()
        return True

    def send_wire(self, data: bytes) -> bool:
        """Queue bytes already encoded for this connection's framing (see ``encode``)."""
        if (self._close_reason is not None and not self._last_word) or self._closed:
            return False
        if data is _NL and self.encode is _line_encode:
            data = bytearray(data)  # an encoded empty line: not to be taken for a payload's newline
        pending = self._pending
        if not pending and not self._write_paused and not self._in_read:
            self._ctx.flusher.add(self)
        pending.append(data)
        self._pending_size += len(data)
        self.frames_out += 1
        if self._pending_size > self._ctx.max_send_buffer:
            return self._over_limit()
        return True

    def close(self, reason: str = KICKED) -> None:
        """Close from the server side: the app's ``closing`` handler may send a last frame,
        queued frames are flushed, then the transport closes (aborted after ``close_timeout``)."""
        if self._close_reason is not None or self._closed:
            return
        self._close_reason = reason
        self._cancel_timer()
        if reason == SLOW_CONSUMER:
            self._discard_pending()
        self._last_word = True
        try:
            self._ctx.handlers.closing(self, reason)
        except Exception:
            log.exception("handler_failed", handler="closing", conn=self.id)
        finally:
            self._last_word = False
        self._flush(force=True)
        self._close_transport()
        if not self._closed:
            self._timer = self._ctx.loop.call_later(self._ctx.settings.close_timeout, self.abort)

    def abort(self) -> None:
        """Drop the connection at once, discarding anything queued."""
        if self._closed:
            return
        if self._close_reason is None:
            self._close_reason = KICKED
        self._discard_pending()
        self._abort_transport()

    async def drain(self) -> None:
        """Write what is queued now, then wait while the peer is behind (until the send buffer
        falls below the low water mark) or the connection closes."""
        self._flush()
        if not self._write_paused or self._closed:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self._ctx.loop.create_future()
        await asyncio.shield(self._drain_waiter)

    # ------------------------------------------------------------------ outbound

    def _over_limit(self) -> bool:
        """More than ``max_send_buffer`` is queued."""
        if not self._write_paused:
            # A burst (a history replay, a fan-out), not a peer that is behind: hand it to
            # the transport now. If the peer cannot take it, the transport pauses us and
            # what follows waits here, under the same limit.
            self._flush()
            return True
        return self._overflow()

    def _overflow(self) -> bool:
        settings = self._ctx.settings
        if not settings.drop_oldest:
            log.info("slow_consumer", conn=self.id, peer=self.peer, send_buffer=self.send_buffer)
            self.close(SLOW_CONSUMER)
            return False
        pending = self._pending
        size = self._pending_size
        line = self.encode is _line_encode
        drop = frames = 0
        while size > settings.max_send_buffer and drop < len(pending):
            entry = pending[drop]
            size -= len(entry)
            drop += 1
            if line and drop < len(pending) and pending[drop] is _NL:  # a payload: its newline goes too
                size -= 1
                drop += 1
            frames += 1
        del pending[:drop]
        self._pending_size = size
        self.frames_dropped += frames
        return bool(pending)

    def _pending_frames(self) -> int:
        """How many frames ``_pending`` holds: on a line-framed connection, a frame queued by
        ``send`` is two entries (its payload, then ``_NL`` itself); one queued encoded is one."""
        pending = self._pending
        if self.encode is not _line_encode:
            return len(pending)
        frames = 0
        for entry in pending:
            if entry is not _NL:
                frames += 1
        return frames

    def _discard_pending(self) -> None:
        self.frames_dropped += self._pending_frames()
        self._pending.clear()
        self._pending_size = 0

    def _flush(self, force: bool = False) -> None:
        """Write pending frames to the transport: joined, to ``_sink``, or through the
        subclass's ``_write``."""
        write_out((self,), force)

    # transport hooks, implemented by subclasses
    def _write(self, frames: list[bytes]) -> None:
        """Write the pending entries (connections without ``_sink``). Each is a whole frame
        unless ``encode`` is the line framing's, whose ``send`` queues a payload and ``_NL``:
        joining them is the only correct way to write those."""
        raise NotImplementedError

    def _transport_buffered(self) -> int:
        return 0

    def _close_transport(self) -> None:
        raise NotImplementedError

    def _abort_transport(self) -> None:
        raise NotImplementedError

    def _pause_reading(self) -> None:
        pass

    def _resume_reading(self) -> None:
        pass

    # ------------------------------------------------------------------ flow control callbacks

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        self._flush()

    # ------------------------------------------------------------------ deadlines

    def _start(self) -> None:
        """The transport is up: register, arm the handshake deadline, greet the app."""
        ctx = self._ctx
        ctx.registry.add(self)
        if ctx.settings.handshake_timeout:
            self._handshake_deadline = ctx.loop.time() + ctx.settings.handshake_timeout
            self._arm_deadline()
        if ctx.pumped:
            self._enqueue(_CONNECT)
        else:
            try:
                ctx.handlers.connect(self)
            except Exception:
                self._handler_failed("connect")

    # One deadline per connection, filed in ctx.deadlines: the handshake deadline (until the
    # first frame) or the idle timeout (after it). It is lazy: reading does not touch it, and
    # a check due sooner than needed is kept (it finds nothing due and re-files), so a
    # deadline that moves later costs nothing. It is re-filed only when it comes nearer.

    def _next_deadline(self) -> float:
        """Loop time of the next deadline (0: none)."""
        when = self.last_activity + self._idle_timeout if self._idle_timeout else 0.0
        if not self._greeted:
            hs = self._handshake_deadline
            when = min(hs, when) if hs and when else hs or when
        app = self._app_deadline
        if app:
            when = min(app, when) if when else app
        return when

    def _arm_deadline(self) -> None:
        if self._close_reason is not None or self._closed:
            return  # closing: close_timeout's abort is the only deadline left
        when = self._next_deadline()
        deadlines = self._ctx.deadlines
        key = self._deadline
        if key:
            if when and deadlines.due(key) <= when:
                return  # filed to be checked sooner: that check re-files it
            deadlines.unfile(self, key)
            self._deadline = 0
        if when:
            self._deadline = deadlines.file(self, when)

    def _deadline_check(self) -> None:
        """A deadline may have passed (called by ``ctx.deadlines``)."""
        if self._closed or self._close_reason is not None:
            return
        # what is due within the timer's early margin is due now: anything re-filed is then
        # due after this round of checks, which therefore cannot pick it up again
        now = self._ctx.now() + Deadlines.EARLY
        if not self._greeted and self._handshake_deadline and now >= self._handshake_deadline:
            log.info("handshake_timeout", conn=self.id, peer=self.peer)
            self.close(HANDSHAKE_TIMEOUT)
        elif self._app_deadline and now >= self._app_deadline:
            log.info("handshake_timeout", conn=self.id, peer=self.peer, by="app")
            self.close(HANDSHAKE_TIMEOUT)
        elif self._idle_timeout and now >= self.last_activity + self._idle_timeout:
            log.info("idle_timeout", conn=self.id, peer=self.peer, idle_s=round(self.idle_s, 3))
            self.close(IDLE)
        else:
            self._arm_deadline()

    def _greet(self) -> None:
        """First complete frame: the handshake deadline gives way to the idle timeout."""
        self._greeted = True
        self._arm_deadline()

    def _cancel_timer(self) -> None:
        if self._deadline:
            self._ctx.deadlines.unfile(self, self._deadline)
            self._deadline = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ inbound dispatch

    def _received(self, data: bytes) -> None:
        """Bytes from a byte stream: framed by ``_decoder`` and handed to the app. The body
        of a stream connection's ``data_received``, here so that it is compiled too."""
        self.bytes_in += len(data)
        if self._close_reason is not None:
            return  # closing: what the peer still sends is read and discarded
        items = self._decoder.feed(data)
        if items:
            # Only a whole frame (or a framing error) is activity: a peer that trickles a
            # partial frame a byte at a time does not hold its connection open past the idle
            # timeout (a partial frame is bounded by max_frame, its wait by the timeout).
            self.last_activity = self._ctx.now()
            # the replies to one read go out in one write when the read is handled, as a bare
            # echo server's would: no round through the per-turn flush
            self._in_read = True
            try:
                self._dispatch(items)
            finally:
                self._in_read = False
                if self._pending:  # also when an exception escapes: nothing is left unwritten
                    write_out((self,), False)

    def _dispatch(self, items: list) -> None:
        """Hand decoded frames (bytes) and framing errors to the app, in order.

        With handlers that await (``ctx.pumped``) the items go to the connection's task,
        except while nothing is queued there and the frame handler is a plain function
        (``ctx.frame_now``): then it runs now, frame after frame, as long as it returns None
        (no task and no turn of the loop for such a frame); what it returns to be awaited,
        and every item after it, go to the task, which keeps them in order. A framing error
        goes there too (its handler may await)."""
        if not self._greeted:
            for item in items:
                if type(item) is bytes:
                    self._greet()
                    break
        ctx = self._ctx
        pumped = ctx.pumped
        if pumped and not (ctx.frame_now and self._pump is None):
            for item in items:
                self._enqueue(item)
            return
        frame = ctx.frame_handler
        replies = ctx.handlers.wires_for(self.encode) if ctx.has_replies else None
        reply_max = ctx.reply_max
        n = len(items)
        i = 0
        try:
            while i < n:
                if self._close_reason is not None:
                    return
                item = items[i]
                if type(item) is bytes:
                    i += 1
                    self.frames_in += 1
                    if replies is not None and len(item) <= reply_max:
                        reply = replies.get(item)
                        if reply is not None:
                            self.send_wire(reply)
                            continue
                    result = frame(self, item)
                    if pumped and result is not None:
                        self._enqueue(_Awaited(result))
                        break
                elif pumped:
                    break
                else:
                    i += 1
                    ctx.handlers.frame_error(self, item)
        except Exception:
            self._handler_failed("frame")
            return
        while i < n:  # (pumped) behind what the task awaits
            self._enqueue(items[i])
            i += 1

    def _dispatch_one(self, frame: bytes) -> None:
        """:meth:`_dispatch` for one frame (a WebSocket message, a datagram): no list."""
        if not self._greeted:
            self._greet()
        ctx = self._ctx
        if ctx.pumped:
            if ctx.frame_now and self._pump is None:
                self._dispatch([frame])
            else:
                self._enqueue(frame)
            return
        self.frames_in += 1
        if ctx.has_replies and len(frame) <= ctx.reply_max:
            reply = ctx.handlers.wires_for(self.encode).get(frame)
            if reply is not None:
                self.send_wire(reply)
                return
        try:
            ctx.frame_handler(self, frame)
        except Exception:
            self._handler_failed("frame")

    def _handler_failed(self, which: str) -> None:
        log.exception("handler_failed", handler=which, conn=self.id, peer=self.peer)
        self.close(HANDLER_ERROR)

    def _enqueue(self, item: Any) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = collections.deque()
        queue.append(item)
        if self._pump is None:
            self._pump = self._ctx.loop.create_task(self._run_pump())
        if len(queue) >= MAX_QUEUED_FRAMES and not self._reading_paused:
            self._reading_paused = True
            self._pause_reading()

    async def _run_pump(self) -> None:
        """Runs handler calls one at a time, in arrival order, while any are queued."""
        handlers = self._ctx.handlers
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                item = queue.popleft()
                if self._reading_paused and len(queue) <= MAX_QUEUED_FRAMES // 2:
                    self._reading_paused = False
                    if not self._closed:
                        self._resume_reading()
                if item is _CONNECT:
                    await _maybe_await(handlers.connect(self))
                elif type(item) is bytes:
                    if self._close_reason is not None:
                        continue
                    self.frames_in += 1
                    reply = handlers.wires_for(self.encode).get(item) if handlers.replies is not None and len(item) <= self._ctx.reply_max else None
                    if reply is not None:
                        self.send_wire(reply)
                    else:  # the frame handler, awaited when it is async (no isinstance check for a coroutine)
                        result = handlers.frame(self, item)
                        if result is not None:
                            await (result if type(result) is _COROUTINE else _maybe_await(result))
                elif type(item) is _Awaited:  # what a frame handler run by _dispatch returned
                    result = item.result
                    if self._close_reason is not None:  # closing: the rest of that frame is dropped
                        if type(result) is _COROUTINE:
                            result.close()
                        continue
                    await (result if type(result) is _COROUTINE else _maybe_await(result))
                elif type(item) is _Disconnect:
                    await _maybe_await(handlers.disconnect(self, item.reason))
                elif item is _OWED:  # the peer finished: what the app still owes it, then the close
                    owed = handlers.pending(self) if not self._closed else None
                    if owed is not None:
                        try:
                            await asyncio.wait_for(owed, self._ctx.settings.close_timeout)
                        except asyncio.TimeoutError:
                            log.warning("pending_timeout", conn=self.id, peer=self.peer, close_timeout_s=self._ctx.settings.close_timeout)
                elif self._close_reason is None:
                    await _maybe_await(handlers.frame_error(self, item))
        except Exception:
            queue.clear()
            self._handler_failed("frame")
        finally:
            self._pump = None
            if self._eof and not self._closed:
                self._finish()

    def _peer_finished(self) -> bool:
        """The peer sent EOF. Returns True to keep the transport open until queued frames
        are handled (``async`` handlers) and what the app owes is sent, False to let it
        close after the flush."""
        self._eof = True
        if self._await_owed():
            return True
        self._finish()
        return False

    def _await_owed(self) -> bool:
        """The peer sends no more frames: after those queued, the app's ``pending`` (when it
        has one) is awaited in the connection's task. True while that task has work left:
        the close waits for it."""
        if self._ctx.handlers.pending is not None:
            self._enqueue(_OWED)
        return self._pump is not None

    def _finish(self) -> None:
        if self._close_reason is None:
            self._close_reason = CLOSED
        self._cancel_timer()
        self._flush(force=True)
        self._close_transport()

    def _lost(self, exc: BaseException | None) -> None:
        """The transport is gone: release everything and tell the app."""
        if self._closed:
            return
        self._closed = True
        if self._close_reason is None:
            self._close_reason = CLOSED if exc is None else ERROR
        self._cancel_timer()
        self._discard_pending()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        ctx = self._ctx
        ctx.registry.remove(self)
        handlers = ctx.handlers
        reason = self._close_reason
        if handlers.pumped or handlers.disconnect_async:
            self._enqueue(_Disconnect(reason))
        else:
            try:
                handlers.disconnect(self, reason)
            except Exception:
                log.exception("handler_failed", handler="disconnect", conn=self.id)

    @property
    def close_reason(self) -> str | None:
        """Why the connection closed (or is closing); None while open."""
        return self._close_reason


class _Disconnect:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Awaited:
    """What a frame handler run by ``_dispatch`` returned, for the connection's task to await."""

    __slots__ = ("result",)

    def __init__(self, result: Any) -> None:
        self.result = result


_CONNECT = object()
_OWED = object()  # queued when the peer finished: the pump awaits handlers.pending


_COROUTINE = types.CoroutineType  # an async def handler's coroutine (a Python one: the app's code)


async def _maybe_await(result: Any) -> None:
    if isinstance(result, Awaitable):
        await result
