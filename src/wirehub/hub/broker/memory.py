"""The embedded broker: one process, everything in memory, every call completes at once.

History is a bounded deque per room; entries older than the room's TTL are dropped when the
room is next read or written. ``seq`` never goes back within a process; the epoch is random
per broker instance, so a restarted server tells reconnecting clients that their gap cannot
be recovered (the memory is gone). A room nobody ever published to is forgotten when this
node unsubscribes from it, so joins to arbitrary names do not accumulate.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time

import msgspec

from .base import BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication


class _Stream:
    __slots__ = ("epoch", "seq", "items")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.seq = 0
        self.items: collections.deque[Publication] = collections.deque()

    def trim(self, policy: HistoryPolicy, now_ms: int) -> None:
        items = self.items
        while len(items) > policy.size:
            items.popleft()
        horizon = now_ms - int(policy.ttl * 1000)
        while items and items[0].ts < horizon:
            items.popleft()


class MemoryBroker:
    local = True
    in_flight = 0  # every call completes at once

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._epoch = secrets.token_hex(4)
        self._handler: BrokerHandler | None = None
        self._streams: dict[str, _Stream] = {}
        self._subscribed: set[str] = set()
        self._clients: set[str] = set()
        self._presence: dict[str, dict[str, Member]] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _stream(self, room: str) -> _Stream:
        stream = self._streams.get(room)
        if stream is None:
            stream = self._streams[room] = _Stream(self._epoch)
        return stream

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None

    def ready(self) -> bool:
        return True

    async def subscribe(self, room: str) -> None:
        self._subscribed.add(room)

    async def unsubscribe(self, room: str) -> None:
        self._subscribed.discard(room)
        stream = self._streams.get(room)
        if stream is not None and stream.seq == 0:
            del self._streams[room]

    def publish_now(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy) -> Publication:
        """:meth:`publish` without a coroutine (a local broker's; the hub's hot path)."""
        stream = self._stream(room)
        stream.seq += 1
        raw = data if isinstance(data, msgspec.Raw) else msgspec.Raw(data)
        pub = Publication(room=room, seq=stream.seq, epoch=stream.epoch, data=raw, sender=sender, ts=ts)
        if history.size > 0:
            stream.items.append(pub)
        stream.trim(history, ts)
        if room in self._subscribed and self._handler is not None:
            self._handler.on_publication(pub)
        return pub

    def publish_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy) -> asyncio.Future[Publication]:
        future: asyncio.Future[Publication] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self.publish_now(room, data, sender=sender, ts=ts, history=history))
        except Exception as exc:
            future.set_exception(exc)
        return future

    async def publish(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy) -> Publication:
        return self.publish_now(room, data, sender=sender, ts=ts, history=history)

    async def room_event(self, room: str, frame: bytes, *, exclude: str = "") -> None:
        if room in self._subscribed and self._handler is not None:
            self._handler.on_room_event(room, frame, exclude)

    async def history(self, room: str, *, since: int | None = None, limit: int | None = None, history: HistoryPolicy) -> HistoryResult:
        stream = self._stream(room)
        stream.trim(history, self._now_ms())
        items = list(stream.items)
        position = Position(stream.seq, stream.epoch)
        if since is not None:
            items = [p for p in items if p.seq > since]
            first_missing = since + 1
            complete = since <= stream.seq and (first_missing > stream.seq or (bool(items) and items[0].seq == first_missing))
        else:
            complete = True
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return HistoryResult(items, position, complete)

    async def position(self, room: str) -> Position:
        stream = self._stream(room)
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

    async def rooms(self) -> list[str]:
        return sorted({r for r, s in self._streams.items() if s.seq} | set(self._presence))
