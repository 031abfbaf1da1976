"""The embedded broker: one process, everything in memory, every call completes at once.

History is a bounded deque per room (the room's ``history_size`` and ``history_ttl``), and
all rooms' history together is bounded in bytes (``max_bytes``, the hub's
``history_max_bytes``): past it, the least recently used rooms (written or read) lose their
whole history. Expired entries are dropped when a room is read or written, and by a sweep
that runs by itself: every :data:`SWEEP_INTERVAL` seconds it visits the next
:data:`SWEEP_BATCH` rooms, so that rooms nobody touches again are freed too, without a long
stall however many rooms there are.

``seq`` never goes back within a stream. The stream of a room that has no subscriber and no
history left is forgotten (by the sweep, or at once when the last local member leaves); a
room published to again later starts a new stream under a new epoch, so a client that
recovers across that is told ``recovered:false``, never given a silent gap. The same holds
for a room whose history the byte budget evicted while it had members: its stream (``seq``,
epoch) stays, its history is gone, and recovery from before it reports incomplete.

This file is the implementation; import it as :mod:`wirehub.hub.broker.memory`, which picks
this Python code or its compiled copy (the accelerator: ``_memory.pxd`` makes ``_Stream`` and
``MemoryBroker`` extension types with C fields; keep the two in step). ``publish_seq_now``
runs for every ``pub`` on a local broker.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from typing import Mapping

import msgspec

from .base import BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication, history_result

#: bytes one held publication costs beyond its data (measured: 197 on CPython 3.11, the
#: entry's tuple, its seq and ts, the data's bytes object and its slot in the deque, with
#: a margin; tests/hub/test_broker_memory.py holds the measurement to it)
PUB_OVERHEAD = 208
#: bytes a room that holds history costs beyond its publications (measured: ~1,040 with its
#: name, its deque, its stream and their entries in the broker's tables; the same test)
ROOM_OVERHEAD = 1152
#: the default of ``history_max_bytes``
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: seconds between two sweep ticks, and rooms visited per tick: a full pass over 100,000
#: rooms takes 10 s, and one tick costs about a millisecond
SWEEP_INTERVAL = 0.1
SWEEP_BATCH = 1000

_Raw = msgspec.Raw
_Publication = Publication
# deque's own methods, called with the deque: cheaper than looking them up on it per call
_deque_append = collections.deque.append
_deque_popleft = collections.deque.popleft

# A room's history holds each publication as a tuple (seq, ts, data, sender, info, exclude),
# data the bytes (or msgspec.Raw) it was published with: cheaper to make and to drop than a
# Publication with its Raw, one of each per pub. A read (and fan-out) makes the Publication,
# so two reads give two objects for one publication: what the hub shares between the joins
# that replay it is keyed by (room, epoch, seq), not by the object (HubApp._replayed).


def _publication(room: str, seq: int, epoch: str, data: bytes, sender: str, ts: int, info: bytes | None, exclude: str) -> Publication:
    """A Publication of ``room`` (``data`` bytes or msgspec.Raw)."""
    return _Publication(room, seq, epoch, data if type(data) is _Raw else _Raw(data), sender, ts, info, exclude)


class _Stream:
    __slots__ = ("epoch", "seq", "items", "bytes", "ttl_ms", "policy", "size", "oldest")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.seq = 0
        self.items: collections.deque[tuple] = collections.deque()  # history entries (see above)
        self.bytes = 0  # what ``items`` counts toward the budget (ROOM_OVERHEAD included while not empty)
        self.ttl_ms = 0  # the room's history TTL at its last write (for the sweep)
        #: the HistoryPolicy of the last write, and its size (ttl_ms above): read from it only
        #: when a write brings another
        self.policy: HistoryPolicy | None = None
        self.size = 0
        #: at most the ``ts`` of the oldest publication held (the clock going back can only
        #: delay an expiry by its step; reads and the sweep look at the publications
        #: themselves): while the TTL's horizon is not past it, a write need not look at that
        #: publication to know none has expired
        self.oldest = 0


def _append(broker: MemoryBroker, room: str, stream: _Stream, data: bytes, sender: str, ts: int, history: HistoryPolicy,
            info: bytes | None, exclude: str) -> int:
    """``data`` published to ``room`` as the next of ``stream``, kept in its history as
    ``history`` says, within the broker's byte budget; its ``seq``. The body of the publish
    calls (compiled, the stream's fields are C fields here)."""
    seq = stream.seq = stream.seq + 1
    if history is not stream.policy:
        stream.policy = history
        stream.size = history.size
        stream.ttl_ms = int(history.ttl * 1000)
    size = stream.size
    ttl_ms = stream.ttl_ms
    now = ts  # compiled: a C integer
    items = stream.items
    if size > 0:
        cost = len(data) + PUB_OVERHEAD
        if items:
            broker._touch(room)
            if now < stream.oldest:  # the clock went back
                stream.oldest = now
        else:
            cost += ROOM_OVERHEAD
            broker._lru[room] = stream
            stream.oldest = now
        _deque_append(items, (seq, ts, data, sender, info, exclude))
        held = len(items)
        if held > size:  # a full room: its oldest goes (the common case, inline)
            cost -= len(_deque_popleft(items)[2]) + PUB_OVERHEAD
            held -= 1
        stream.bytes += cost
        broker.bytes += cost
        if held > size:
            broker._trim(room, stream, size, ttl_ms, ts)
        elif stream.oldest < now - ttl_ms:  # perhaps expired: the oldest held says
            stream.oldest = items[0][1]
            if stream.oldest < now - ttl_ms:
                broker._trim(room, stream, size, ttl_ms, ts)
    elif items:
        broker._trim(room, stream, size, ttl_ms, ts)
    if broker.bytes > broker.max_bytes:
        broker._evict(room)
    return seq


class MemoryBroker:
    local = True
    in_flight = 0  # every call completes at once

    def __init__(self, clock=time.time, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._clock = clock
        self._epoch = secrets.token_hex(4)
        self._epoch_now = self._epoch  # the epoch a stream created now gets
        self._forgotten = 0  # streams forgotten with seq > 0: each one changes _epoch_now
        self._handler: BrokerHandler | None = None
        self._streams: dict[str, _Stream] = {}
        #: rooms holding history, least recently used first
        self._lru: collections.OrderedDict[str, _Stream] = collections.OrderedDict()
        self._touch = self._lru.move_to_end  # a room written or read: most recently used
        self._subscribed: set[str] = set()
        self._clients: set[str] = set()
        self._presence: dict[str, dict[str, Member]] = {}
        self.max_bytes = max_bytes
        #: bytes of history held, counted as len(data) + PUB_OVERHEAD per publication and
        #: ROOM_OVERHEAD per room holding any
        self.bytes = 0
        #: rooms whose history the byte budget evicted (since start)
        self.evictions = 0
        self._sweep_keys: list[str] = []
        self._sweep_next = 0
        self._sweeper: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ rooms held

    @property
    def rooms_held(self) -> Mapping[str, object]:
        """The rooms this process holds state for (read-only): every subscribed room and
        every room whose stream still lives (history or a ``seq`` not yet forgotten). The
        hub counts them toward ``max_rooms``."""
        return self._streams

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _stream(self, room: str) -> _Stream:
        stream = self._streams.get(room)
        if stream is None:
            stream = self._streams[room] = _Stream(self._epoch_now)
        return stream

    def _forget(self, room: str, stream: _Stream) -> None:
        """Drop a stream with no subscriber and no history. A room published to again gets
        a new stream under a new epoch; a stream that never had a publication needs none
        (nothing could be recovered from it)."""
        if self._streams.get(room) is stream:
            del self._streams[room]
            if stream.seq:
                self._forgotten += 1
                self._epoch_now = f"{self._epoch}.{self._forgotten:x}"

    def _drop(self, stream: _Stream, n: int) -> None:
        """Drop the ``n`` oldest publications of ``stream``."""
        items = stream.items
        freed = 0
        for _ in range(n):
            freed += len(_deque_popleft(items)[2]) + PUB_OVERHEAD
        stream.bytes -= freed
        self.bytes -= freed

    def _emptied(self, room: str, stream: _Stream) -> None:
        """``stream`` holds no history any more."""
        self.bytes -= stream.bytes  # its ROOM_OVERHEAD
        stream.bytes = 0
        self._lru.pop(room, None)

    def _trim(self, room: str, stream: _Stream, size: int, ttl_ms: int, now_ms: int) -> None:
        items = stream.items
        if not items:
            return
        over = len(items) - size
        if over > 0:
            self._drop(stream, over)
        horizon = now_ms - ttl_ms
        n = 0
        for held in items:
            if held[1] >= horizon:  # its ts
                break
            n += 1
        if n:
            self._drop(stream, n)
        if items:
            stream.oldest = items[0][1]
        else:
            self._emptied(room, stream)

    def _evict(self, keep: str) -> None:
        """Bring the history under ``max_bytes``: the least recently used rooms lose their
        whole history; when ``keep`` (the room just written) is the only one left, its
        oldest publications go."""
        lru = self._lru
        while self.bytes > self.max_bytes and lru:
            room, stream = next(iter(lru.items()))
            if room == keep and len(lru) == 1:
                while self.bytes > self.max_bytes and stream.items:
                    self._drop(stream, 1)
                if not stream.items:
                    self._emptied(room, stream)
                return
            self.evictions += 1
            self.bytes -= stream.bytes
            stream.bytes = 0
            stream.items.clear()
            del lru[room]
            if room not in self._subscribed:
                self._forget(room, stream)

    # ------------------------------------------------------------------ the sweep

    def sweep(self) -> int:
        """One tick of the sweep: visit the next :data:`SWEEP_BATCH` rooms, drop their
        expired history, forget those with neither subscriber nor history. Returns how many
        rooms it visited."""
        keys = self._sweep_keys
        start = self._sweep_next
        if start >= len(keys):
            keys = self._sweep_keys = list(self._streams)
            start = 0
        end = min(start + SWEEP_BATCH, len(keys))
        self._sweep_next = end
        streams = self._streams
        subscribed = self._subscribed
        now = self._now_ms()
        for i in range(start, end):
            room = keys[i]
            stream = streams.get(room)
            if stream is None:
                continue
            if stream.items:
                self._trim(room, stream, len(stream.items), stream.ttl_ms, now)
            if not stream.items and room not in subscribed:
                self._forget(room, stream)
        if end >= len(keys):
            self._sweep_keys = []  # release the snapshot; the next tick takes a new one
            self._sweep_next = 0
        return end - start

    def _tick(self) -> None:
        self._sweeper = None
        try:
            self.sweep()
        finally:
            if self._handler is not None:
                self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._tick)

    # ------------------------------------------------------------------ Broker

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._tick)

    async def close(self) -> None:
        self._handler = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def ready(self) -> bool:
        return True

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)
        self._stream(room)  # a joined room's position stays put while it has members

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)
        stream = self._streams.get(room)
        if stream is not None and not stream.items:
            self._forget(room, stream)

    def publish_now(self, room: str, data: bytes, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> Publication:
        """:meth:`publish` without a coroutine (a local broker's; the hub passes its arguments
        by position: cheaper than keywords)."""
        stream = self._streams.get(room)
        if stream is None:
            stream = self._stream(room)
        seq = _append(self, room, stream, data, sender, ts, history, info, exclude)
        pub = _publication(room, seq, stream.epoch, data, sender, ts, info, exclude)
        if room in self._subscribed and self._handler is not None:
            self._handler.on_publication(pub)
        return pub

    def publish_seq_now(self, room: str, data: bytes, sender: str, ts: int, history: HistoryPolicy) -> int:
        """:meth:`publish_now` giving the publication's ``seq`` alone (the hub's ``pub``),
        which makes a Publication only for a node that subscribes to ``room``."""
        stream = self._streams.get(room)
        if stream is None:
            stream = self._stream(room)
        seq = _append(self, room, stream, data, sender, ts, history, None, "")
        if room in self._subscribed and self._handler is not None:
            self._handler.on_publication(_publication(room, seq, stream.epoch, data, sender, ts, None, ""))
        return seq

    def publish_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> asyncio.Future[Publication]:
        future: asyncio.Future[Publication] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self.publish_now(room, data, sender=sender, ts=ts, history=history, info=info, exclude=exclude))
        except Exception as exc:
            future.set_exception(exc)
        return future

    async def publish(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> Publication:
        return self.publish_now(room, data, sender=sender, ts=ts, history=history, info=info, exclude=exclude)

    async def room_event(self, room: str, frame: bytes, *, exclude: str = "") -> None:
        if room in self._subscribed and self._handler is not None:
            self._handler.on_room_event(room, frame, exclude)

    async def history(self, room: str, *, since: int | None = None, limit: int | None = None, history: HistoryPolicy) -> HistoryResult:
        stream = self._streams.get(room)
        if stream is None:  # nothing held: reading creates nothing
            items = []
            position = Position(0, self._epoch_now)
        else:
            if stream.items:
                self._trim(room, stream, history.size, int(history.ttl * 1000), self._now_ms())
                if stream.items:
                    self._touch(room)  # read: recently used
            epoch = stream.epoch
            # only what the read gives becomes a Publication (a join's replay reads once per
            # window, since the last one sent); history_result filters the same again
            held = stream.items if since is None else [h for h in stream.items if h[0] > since]
            items = [_publication(room, h[0], epoch, h[2], h[3], h[1], h[4], h[5]) for h in held]
            position = Position(stream.seq, stream.epoch)
        return history_result(items, position, since, limit)

    async def position(self, room: str) -> Position:
        stream = self._streams.get(room)
        if stream is None:
            return Position(0, self._epoch_now)
        return Position(stream.seq, stream.epoch)

    async def add_client(self, client: str) -> None:
        self._clients.add(client)

    async def remove_client(self, client: str) -> None:
        self._clients.discard(client)

    async def send(self, client: str, frame: bytes) -> bool:
        if client not in self._clients or self._handler is None:
            return False
        self._handler.on_direct(client, frame)
        return True

    async def presence_add(self, room: str, member: Member) -> None:
        self._presence.setdefault(room, {})[member.client] = member

    async def presence_remove(self, room: str, client: str) -> None:
        members = self._presence.get(room)
        if members is not None:
            members.pop(client, None)
            if not members:
                del self._presence[room]

    async def presence(self, room: str) -> list[Member]:
        return list(self._presence.get(room, {}).values())

    async def presence_count(self, room: str) -> int:
        return len(self._presence.get(room, ()))

    async def rooms(self) -> list[str]:
        rooms = [r for r, s in self._streams.items() if s.seq]
        rooms.extend(r for r in self._presence if r not in self._streams or not self._streams[r].seq)
        return rooms
