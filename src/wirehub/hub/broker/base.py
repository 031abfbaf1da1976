"""The broker interface every backend implements, and the values that cross it.

A node (one hub process) talks to its broker only through :class:`Broker`; the broker calls
back into the node through :class:`BrokerHandler`. Room streams are identified by
``(room, epoch)``; ``seq`` rises by one per publication within an epoch. A new epoch means
the stream's past is gone (the broker lost it), so a client's ``since`` from another epoch
cannot be recovered.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec


class BrokerError(Exception):
    """The broker cannot do it now (unreachable, refused). The message says why.

    ``maybe_applied`` is True when the connection failed after the request was sent: the
    broker may have carried it out (a publication may still be delivered)."""

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class Position(msgspec.Struct, frozen=True):
    """The top of a room's stream: the last ``seq`` published (0 when none) and its epoch."""

    seq: int
    epoch: str


class Publication(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """One message published to a room, as a history read gives it and fan-out carries it.

    Not tracked by the garbage collector (``gc=False``): its fields are strings, integers and
    bytes, which cannot form a cycle, and a hub makes one per publication and holds many in
    history, each of which the collector would otherwise keep visiting."""

    room: str
    seq: int
    epoch: str
    data: msgspec.Raw  # the JSON of the ``data`` value, exactly as the publisher sent it
    sender: str  # client id, or "" for a backend publish
    ts: int  # server time, ms since the Unix epoch
    #: what an application hook attached (raw JSON, the ``msg``'s ``info``), or None
    info: bytes | None = None
    #: a client that does not get it live (a server-side publish with ``exclude``), or ""
    exclude: str = ""


class Member(msgspec.Struct, frozen=True):
    """A presence entry: one client in one room. ``info`` is what an application hook set
    (any JSON value); it is left out of frames and stored entries when unset, so entries
    stored before it existed read back the same."""

    client: str
    user: str
    name: str | None = None
    info: Any = msgspec.UNSET


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much of a room's stream to keep: the last ``size`` publications, none older
    than ``ttl`` seconds. ``size`` 0 keeps none (but ``seq`` still rises)."""

    size: int = 100
    ttl: float = 3600.0


@dataclass(frozen=True, slots=True)
class HistoryResult:
    publications: list[Publication]  # oldest first
    position: Position  # the stream's top when read
    complete: bool  # True when nothing after ``since`` is missing (history still covers it)


def history_result(held: list[Publication], position: Position, since: int | None, limit: int | None) -> HistoryResult:
    """What ``history`` answers when ``held`` is every publication the room still keeps (oldest
    first, all of ``position``'s epoch): those after ``since``, the newest ``limit`` of them, and
    whether nothing between ``since`` and the top is missing."""
    if since is not None:
        held = [p for p in held if p.seq > since]
        complete = since <= position.seq and (since + 1 > position.seq or (bool(held) and held[0].seq == since + 1))
    else:
        complete = True
    if limit is not None:
        held = held[-limit:] if limit > 0 else []
    return HistoryResult(held, position, complete)


class BrokerHandler(Protocol):
    """What a broker calls on the node. Calls for one room arrive in ``seq`` order."""

    def on_publication(self, pub: Publication) -> None: ...

    def on_room_event(self, room: str, frame: bytes, exclude: str = "") -> None:
        """A frame for every member of ``room`` on this node but ``exclude``, outside
        history (presence events)."""

    def on_direct(self, client: str, frame: bytes) -> None:
        """A frame for one client, if it is connected to this node."""

    def on_broker_state(self, up: bool) -> None:
        """The broker became unreachable (False) or reachable again (True)."""


class Broker(Protocol):
    #: True when every call completes without I/O, so the hub may run calls inline
    #: instead of in a task (the memory broker). Such a broker also has
    #: ``publish_now(room, data, sender, ts, history) -> Publication``: ``publish`` without
    #: a coroutine (arguments by position on the hot path), and ``publish_seq_now`` (the same
    #: arguments) which gives the publication's ``seq`` alone.
    local: bool

    async def start(self, handler: BrokerHandler) -> None: ...

    async def close(self) -> None: ...

    def ready(self) -> bool:
        """False while the broker is unreachable."""

    async def subscribe(self, room: str) -> None:
        """Deliver ``room``'s publications and events to this node (first local member)."""

    async def unsubscribe(self, room: str) -> None:
        """Stop delivering ``room`` to this node (last local member left)."""

    async def publish(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> Publication:
        """Append to ``room``'s stream (assigning the next ``seq``) and deliver it to every
        subscribed node. Raises :class:`BrokerError` when that cannot be done; never drops
        silently. ``info`` and ``exclude`` are kept with it (:class:`Publication`); a
        publication without them is stored as before they existed."""

    def publish_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> asyncio.Future[Publication]:
        """Start :meth:`publish` now and return its future, without waiting for the broker.

        Publications started on one node are applied in the order of these calls (for one
        room, a later call gets a higher ``seq``), and many may be in flight at once: a
        remote broker sends those of one event-loop turn together. The future gives the
        :class:`Publication`, or fails with :class:`BrokerError` (never silently). The caller
        bounds what it keeps in flight; :attr:`in_flight` counts this node's.

        A broker may also have ``publish_seq_nowait`` (same arguments): the same, except
        that its future gives the publication's ``seq`` alone, for a caller that needs
        nothing else (the hub's acks); building the Publication is a good part of the
        per-publication cost (the Redis broker has it). And ``publish_batched_nowait``
        (same arguments), which the hub prefers: it returns ``(future, k)``, where the
        future is shared by the publications the broker sends together and gives the seq of
        the first of them, this one's being that plus ``k`` (no future per publication; the
        Redis broker has it)."""

    #: publications started with :meth:`publish_nowait` (or :meth:`publish`) and not yet answered
    in_flight: int

    async def room_event(self, room: str, frame: bytes, *, exclude: str = "") -> None:
        """Deliver ``frame`` to every member of ``room`` on every node, except the client
        ``exclude``, without history."""

    async def history(self, room: str, *, since: int | None = None, limit: int | None = None, history: HistoryPolicy) -> HistoryResult:
        """Publications still held: those after ``since`` (all of them when None), the last
        ``limit`` of them when given, oldest first."""

    async def position(self, room: str) -> Position: ...

    async def add_client(self, client: str) -> None:
        """``client`` is connected to this node: direct messages for it come here."""

    async def remove_client(self, client: str) -> None: ...

    async def send(self, client: str, frame: bytes) -> bool:
        """Deliver ``frame`` to ``client`` wherever it is connected; False when no node has it."""

    async def presence_add(self, room: str, member: Member) -> None: ...

    async def presence_remove(self, room: str, client: str) -> None: ...

    async def presence(self, room: str) -> list[Member]: ...

    async def presence_count(self, room: str) -> int:
        """How many members ``room`` has on every node: what :meth:`presence` would list, read
        without the entries (one bounded request, whatever the room's size). The hub reads it
        to choose a room's presence mode (hub/presence.py), so it may count a member a moment
        after :meth:`presence` would have dropped it (a dead node's entries)."""

    async def rooms(self) -> list[str]:
        """Rooms with a stream or members, as far as this broker knows, each once, in no
        particular order."""

