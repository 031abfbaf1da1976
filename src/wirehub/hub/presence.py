"""Presence that scales with room size: which presence frames a room's members get, by how
many members the room has on every node.

=========  ==============================  ===============================================
mode       when                            what members get
=========  ==============================  ===============================================
``events`` up to ``presence_threshold``    one ``join`` / ``leave`` frame per change
``diff``   up to ``presence_max``          one ``presence_diff`` per window of
                                           ``presence_window`` (the changes of the window)
``query``  more than ``presence_max``      nothing; ``presence`` queries still answer
``off``    ``presence = off``              nothing; ``presence`` answers an empty list
=========  ==============================  ===============================================

Two sides, both per node and per room:

* **sending**: this node's own joins and leaves go to the broker as ``room_event``s, one per
  change in ``events`` mode, otherwise coalesced into one ``presence_diff`` per window (the
  other nodes' members need them whatever this node's mode is);
* **receiving**: what comes from the broker (from this node too) goes to the local members
  in this node's mode: as it came in ``events`` mode (a ``presence_diff`` from a node in
  another mode is split into ``join``/``leave`` frames), coalesced per window in ``diff``
  mode, dropped in ``query`` mode. This is what bounds the frames a member gets.

A window is sent at its start when the room was quiet for a window (no added latency for a
lone change) and otherwise when it ends: at most one frame per member per window (several
when a window's changes exceed :data:`DIFF_FRAME_BYTES`). Within a window the last change of
a client wins: a client that joins and leaves again is left out, one that leaves and comes
back is one join; a client id is in ``joins`` or in ``leaves``, never both.

A room that changes mode as it grows or shrinks tells its members here with a
``presence_diff`` carrying ``"presence": MODE``. It goes down a mode only once it is an
eighth below the boundary, so a room at the boundary does not flap. See docs/hub.md.

**The room's size on every node.** With a local broker (memory: one process) the size is the
room's members here, exact and free. With a remote broker (a fleet) the mode follows the
room's members on every node, so that all nodes agree and a node with few members of a big
room does not split the others' diffs into one frame per change (a node started beside
another in a handover would). The size is known as:

* a *count* read from the broker (:meth:`Broker.presence_count`: ZCOUNT of the room's live
  leases on Redis, the room's key count in the presence bucket on NATS: one small request,
  whatever the room's size), read when the room gets its first member on this node, beside
  the join's history read, so that the first ``joined`` says the fleet's mode;
* plus the changes heard since: every presence frame that reaches this node (its own
  included) says how many members joined and left. The size is the count plus the joins
  minus the leaves (at least the members here); the count plus the joins and the count minus
  the leaves bound it from above and below.

The count is read again only when a change comes in and those bounds no longer pin the
room's mode (the room may have crossed a boundary), or when the count is older than
:data:`COUNT_MAX_AGE_S` (what no frame tells: a node that died, frames lost while the broker
was away); never more than once per window per room, one read at a time. So a quiet room
costs nothing, a room far from its boundaries nothing after its first join, a join storm one
read per window per room per node, and every estimate is corrected by a read once the room
nears a boundary: the nodes converge on the broker's count. A read that fails leaves the
estimate as it is (logged); the next change tries again.

Why not per-node counts piggy-backed on the frames the nodes exchange (each node's member
count in its diffs, summed): a node new to a room has heard nothing when its first member
joins, so its first ``joined`` would still say ``events`` (the handover case); a node that
dies sends no frame, so its count would stay in the sum forever; and ``events``-mode frames
go to clients as they are, so a count in them would be on the wire or cost a re-encoding of
every event. The frames are used for what they reliably carry: how far the count may have
moved since it was read.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import msgspec

from .._log import get_logger
from . import protocol as wire
from .broker import BrokerError, Member

if TYPE_CHECKING:
    from .app import HubApp, Room

log = get_logger("wirehub.hub")


def _now() -> float:
    return asyncio.get_running_loop().time()

EVENTS, DIFF, QUERY, OFF = "events", "diff", "query", "off"
MODES = (EVENTS, DIFF, QUERY)  # by level
#: the most bytes of member entries one ``presence_diff`` frame carries (under the default
#: 64 KiB frame limit clients keep); a window with more goes out as several frames
DIFF_FRAME_BYTES = 60_000
#: the frames of presence events, as the hub encodes them (a room event that starts
#: otherwise is not presence)
FRAME_PREFIXES = (b'{"op":"join",', b'{"op":"leave",', b'{"op":"presence_diff",')
#: seconds a room's count from a remote broker is trusted without a read, however little the
#: changes heard since could have moved it (module docstring): a node that died without
#: removing its members, or frames lost while the broker was away, are noticed by then
COUNT_MAX_AGE_S = 30.0


@dataclass(frozen=True, slots=True)
class PresenceLevels:
    """A room's presence settings: ``diff`` above ``threshold`` members, ``query`` above
    ``max`` members, changes coalesced per ``window`` seconds in ``diff`` mode."""

    threshold: int = 100
    max: int = 1000
    window: float = 0.1

    def level(self, count: int, current: int) -> int:
        """The level (index in MODES) for ``count`` members, from ``current``."""
        new = 2 if count > self.max else 1 if count > self.threshold else 0
        if new < current:  # down only an eighth below the boundary
            slack = count + count // 8 + 1
            new = min(current, 2 if slack > self.max else 1 if slack > self.threshold else 0)
        return new


class _Event(msgspec.Struct):
    """A ``join``/``leave`` frame as the hub encodes it (a member plus op and room)."""

    op: str
    client: str
    user: str
    name: str | None = None
    info: Any = msgspec.UNSET


class _Diff(msgspec.Struct):
    joins: list[Member] = []
    leaves: list[Member] = []


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_diff = msgspec.json.Decoder(_Diff).decode
_encode = msgspec.json.Encoder().encode


class _Window:
    """A window's changes: client -> (present before the window, entry, present now)."""

    __slots__ = ("changes", "timer", "last")

    def __init__(self) -> None:
        self.changes: dict[str, tuple[bool, bytes, bool]] = {}
        self.timer: asyncio.Handle | None = None
        self.last = -math.inf  # when it was last sent (loop time)

    def add(self, joined: bool, client: str, entry: bytes) -> None:
        prev = self.changes.get(client)
        before = prev[0] if prev is not None else not joined
        if before or joined:
            self.changes[client] = (before, entry, joined)
        else:
            del self.changes[client]  # joined and left within the window: never shown

    def take(self) -> tuple[list[bytes], list[bytes]]:
        joins = [entry for _, entry, now in self.changes.values() if now]
        leaves = [entry for before, entry, now in self.changes.values() if before and not now]
        self.changes = {}
        return joins, leaves

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _RoomPresence:
    __slots__ = ("level", "levels", "outgoing", "incoming", "tell_mode", "fresh", "base", "joins", "leaves", "read_at", "reading", "read_timer")

    def __init__(self, levels: PresenceLevels) -> None:
        self.level = 0
        self.tell_mode = False  # the next frame to the members here says the room's new mode
        self.levels = levels
        self.outgoing = _Window()  # this node's changes, for the broker
        self.incoming = _Window()  # every node's changes, for this node's members
        self.fresh = False  # no member here has been given a mode since the room's first join here
        # the room's size on every node (a remote broker; module docstring)
        self.base: int | None = None  # the broker's count at the last read (None: not read)
        self.joins = 0  # member entries joining and leaving in the presence frames heard
        self.leaves = 0  # since that read was sent
        self.read_at = -math.inf  # when the last read was sent (loop time)
        self.reading: asyncio.Task[None] | None = None
        self.read_timer: asyncio.TimerHandle | None = None

    def size(self, here: int) -> int:
        """The room's members on every node, as far as this node knows (``here`` at least)."""
        if self.base is None:
            return here
        return max(here, self.base + self.joins - self.leaves)

    def settled(self, here: int) -> bool:
        """True when the last count and the changes heard since pin the room's mode."""
        if self.base is None:
            return False
        low = max(here, self.base - self.leaves)
        high = max(low, self.base + self.joins)
        return self.levels.level(low, self.level) == self.level == self.levels.level(high, self.level)


def diff_frames(room_json: bytes, joins: list[bytes], leaves: list[bytes], mode: str | None = None) -> list[bytes]:
    """``presence_diff`` frames for these entries, each at most DIFF_FRAME_BYTES of entries
    (at least one frame; ``mode`` goes in the first one)."""
    head = b'{"op":"presence_diff","room":' + room_json
    frames: list[bytes] = []
    tail = b',"presence":"%s"}' % mode.encode() if mode is not None else b"}"
    items = [(True, e) for e in joins] + [(False, e) for e in leaves]
    i = 0
    while True:
        size = 0
        js: list[bytes] = []
        ls: list[bytes] = []
        while i < len(items) and (not size or size + len(items[i][1]) <= DIFF_FRAME_BYTES):
            joined, entry = items[i]
            (js if joined else ls).append(entry)
            size += len(entry) + 1
            i += 1
        frames.append(head + b',"joins":[' + b",".join(js) + b'],"leaves":[' + b",".join(ls) + b"]" + tail)
        tail = b"}"
        if i >= len(items):
            return frames


class RoomPresence:
    """The hub's presence frames, by room size (module docstring). One per :class:`HubApp`."""

    def __init__(self, app: HubApp, drive: Callable[[Awaitable[Any]], Any]) -> None:
        self._app = app
        #: the mode follows the room's size on every node (a remote broker), not only here
        self._fleet = not app.broker.local
        self._drive = drive  # runs a local broker's call to completion now
        self._rooms: dict[str, _RoomPresence] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    def counted(self, room: Room, levels: PresenceLevels | None) -> str:
        """``room``'s members here changed (``levels`` None: presence is off for it): its
        mode, after telling the members when it changed."""
        name = room.name
        state = self._rooms.get(name)
        if levels is None:
            return OFF
        count = len(room.members)
        if state is None:
            if not count:
                return EVENTS
            state = self._rooms[name] = _RoomPresence(levels)
            state.level = levels.level(count, 0)
            self._check(name, state, count)
            return MODES[state.level]
        state.levels = levels
        if not count:  # nobody here to tell: what the window held for them goes too (the
            # level stays: this node's last changes still go out as the window they are in)
            state.incoming.cancel()
            state.incoming.changes = {}
            self._forget(name, state)
            return MODES[state.level]
        self._resize(room, state)
        state.fresh = False
        return MODES[state.level]

    def prime(self, room: Room, levels: PresenceLevels | None) -> Awaitable[None] | None:
        """``room`` has its first member here: with a remote broker, start reading the room's
        size on every node, and return what to await before :meth:`counted` gives the joiner
        its mode (None: nothing to wait for). The read never raises (a failure is logged)."""
        if levels is None or not self._fleet:
            return None
        name = room.name
        state = self._rooms.get(name)
        if state is None:
            state = self._rooms[name] = _RoomPresence(levels)
        state.levels = levels
        state.fresh = True
        task = self._read(name)
        return asyncio.shield(task) if task is not None else None

    def _resize(self, room: Room, state: _RoomPresence) -> None:
        """The room's mode for its size now, told to the members here when it changed."""
        level = state.levels.level(state.size(len(room.members)), state.level)
        if level == state.level:
            return
        if level == 0 and state.outgoing.changes:  # out before the events that follow
            self._send_outgoing(room.name)
        state.level = level
        if state.fresh:  # nobody here was told a mode yet: the joins under way say this one
            return
        state.tell_mode = True
        window = state.incoming
        window.cancel()
        if level == 1:  # soon: with the change that made it (in the same turn on a local broker)
            window.timer = asyncio.get_running_loop().call_soon(self._incoming_due, room.name)
        else:  # now: the last diff (what the window held), before the events or the silence
            self._send_incoming(room, state)

    # ------------------------------------------------------------------ the size on every node

    def _heard(self, room: Room, state: _RoomPresence, joins: int, leaves: int) -> None:
        """A presence frame from the broker (a remote one) says ``joins`` members joined and
        ``leaves`` left: the room's size moved, maybe its mode."""
        state.joins += joins
        state.leaves += leaves
        if room.members:
            self._resize(room, state)
            self._check(room.name, state, len(room.members))

    def _check(self, name: str, state: _RoomPresence, here: int) -> None:
        """Read the room's count (now, or once a window has passed since the last read) when
        what is known no longer pins its mode, or the count is too old."""
        if not self._fleet or state.reading is not None or state.read_timer is not None:
            return
        now = _now()
        if state.settled(here) and now - state.read_at < COUNT_MAX_AGE_S:
            return
        delay = state.read_at + state.levels.window - now
        if delay <= 0:
            self._read(name)
        else:
            state.read_timer = asyncio.get_running_loop().call_later(delay, self._read, name)

    def _read(self, name: str) -> asyncio.Task[None] | None:
        """Start reading ``name``'s count from the broker (unless a read is under way): the task."""
        state = self._rooms.get(name)
        if state is None:
            return None
        if state.read_timer is not None:
            state.read_timer.cancel()
            state.read_timer = None
        if state.reading is None:
            state.read_at = _now()
            state.reading = task = asyncio.ensure_future(self._count(name, state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return state.reading

    async def _count(self, name: str, state: _RoomPresence) -> None:
        joins, leaves = state.joins, state.leaves  # heard before the read: in its answer
        try:
            count = await self._app.broker.presence_count(name)
        except BrokerError as exc:  # the estimate stays; the next change tries again
            log.warning("broker_error", op="presence_count", room=name, error=str(exc))
            return
        except Exception as exc:
            log.error("presence_count_failed", room=name, error=repr(exc))
            return
        finally:
            state.reading = None
        if self._rooms.get(name) is not state:
            return  # the room emptied here meanwhile
        state.base = count
        state.joins -= joins  # those heard meanwhile may be in the count too: the bounds
        state.leaves -= leaves  # stay bounds, and the next read settles it
        room = self._app.rooms.get(name)
        if room is not None and room.members:
            self._resize(room, state)
            self._check(name, state, len(room.members))

    # ------------------------------------------------------------------ sending side

    async def announce(self, name: str, joined: bool, member: Member) -> None:
        """This node's member joined (or left) ``name``: tell every node's members."""
        state = self._rooms.get(name)
        if state is None or state.level == 0:
            event = {"op": "join" if joined else "leave", "room": name, "client": member.client, "user": member.user, "name": member.name}
            if member.info is not msgspec.UNSET:
                event["info"] = member.info
            await self._app.broker.room_event(name, wire.encode(event), exclude=member.client)
            return
        window = state.outgoing
        window.add(joined, member.client, _encode(member))
        self._schedule(window, state.levels.window, functools.partial(self._send_outgoing, name))

    def _send_outgoing(self, name: str) -> None:
        state = self._rooms.get(name)
        if state is None:
            return
        window = state.outgoing
        window.timer = None
        window.last = _now()
        joins, leaves = window.take()
        if joins or leaves:
            for frame in diff_frames(wire.json_str(name), joins, leaves):
                self._run(self._app.broker.room_event(name, frame))
        self._forget(name, state)

    # ------------------------------------------------------------------ receiving side

    def deliver(self, room: Room, frame: bytes, exclude: str) -> None:
        """A presence frame (FRAME_PREFIXES) from the broker for ``room``'s members here."""
        state = self._rooms.get(room.name)
        diff = frame.startswith(FRAME_PREFIXES[2])
        changes = None
        if state is not None and self._fleet:  # it moves the room's size on every node
            if diff:
                changes = self._decoded(_decode_diff, frame)
                if changes is None:
                    return
                self._heard(room, state, len(changes.joins), len(changes.leaves))
            elif frame.startswith(FRAME_PREFIXES[0]):
                self._heard(room, state, 1, 0)
            else:
                self._heard(room, state, 0, 1)
        level = state.level if state is not None else 0
        if level == 2:
            return
        if diff and changes is None:
            changes = self._decoded(_decode_diff, frame)
            if changes is None:
                return
        if level == 0:
            if changes is None:
                self._app._broadcast(room, frame, exclude=exclude)
                return
            for op, members in ((b"leave", changes.leaves), (b"join", changes.joins)):
                head = b'{"op":"' + op + b'","room":' + room.name_json + b","
                for m in members:
                    self._app._broadcast(room, head + _encode(m)[1:], exclude=m.client)
            return
        assert state is not None
        window = state.incoming
        if changes is not None:
            for m in changes.leaves:
                window.add(False, m.client, _encode(m))
            for m in changes.joins:
                window.add(True, m.client, _encode(m))
        else:
            e = self._decoded(_decode_event, frame)
            if e is None:
                return
            window.add(e.op == "join", e.client, _encode(Member(e.client, e.user, e.name, e.info)))
        self._schedule(window, state.levels.window, functools.partial(self._incoming_due, room.name))

    def _incoming_due(self, name: str) -> None:
        state = self._rooms.get(name)
        if state is None:
            return
        state.incoming.timer = None
        room = self._app.rooms.get(name)
        if room is not None:
            self._send_incoming(room, state)

    def _send_incoming(self, room: Room, state: _RoomPresence) -> None:
        """The window's changes to the members here (with the room's mode when it changed,
        even when there are none)."""
        window = state.incoming
        window.cancel()
        joins, leaves = window.take()
        announce, state.tell_mode = state.tell_mode, False
        if state.level == 2 and not announce:
            return
        if joins or leaves or announce:
            window.last = _now()
            for frame in diff_frames(room.name_json, joins, leaves, MODES[state.level] if announce else None):
                self._app._broadcast(room, frame)

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _decoded(decode: Callable[[bytes], Any], frame: bytes) -> Any:
        """A presence frame from another node, or None (logged) when it cannot be read."""
        try:
            return decode(frame)
        except msgspec.DecodeError as exc:  # a node of another version, or a bug
            log.warning("presence_frame_unreadable", error=str(exc), frame=frame[:200])
            return None

    def _schedule(self, window: _Window, period: float, send: Callable[[], None]) -> None:
        """Send ``window`` now if it was quiet for a period, else at the period's end."""
        if window.timer is not None:
            return
        delay = window.last + period - _now()
        if delay <= 0:
            send()
        else:
            window.timer = asyncio.get_running_loop().call_later(delay, send)

    def forget(self, name: str) -> None:
        """``name`` has no members here any more: its state goes once its window is out."""
        state = self._rooms.get(name)
        if state is not None:
            self._forget(name, state)

    def _forget(self, name: str, state: _RoomPresence) -> None:
        if not state.outgoing.changes and state.outgoing.timer is None and name not in self._app.rooms:
            if self._rooms.get(name) is state:
                del self._rooms[name]
                if state.read_timer is not None:  # (a read under way finds the state gone)
                    state.read_timer.cancel()
                    state.read_timer = None

    def _run(self, call: Awaitable[None]) -> None:
        """A broker call from a timer: at once on a local broker, else in a task (a failure
        is logged: the other nodes' members miss this window's changes)."""
        if self._app.broker.local:
            self._drive(call)
            return
        task = asyncio.ensure_future(call)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and isinstance(task.exception(), BrokerError):
            log.warning("broker_error", op="presence_diff", error=str(task.exception()))
        elif not task.cancelled() and task.exception() is not None:
            log.error("presence_diff_failed", error=repr(task.exception()))

    async def close(self, timeout: float) -> None:
        """The hub is shutting down: this node's last changes go to the broker now (within
        ``timeout``), and nothing more is sent."""
        for name, state in list(self._rooms.items()):
            state.incoming.cancel()
            if state.read_timer is not None:
                state.read_timer.cancel()
            if state.outgoing.changes:
                state.outgoing.cancel()
                self._send_outgoing(name)
            state.outgoing.cancel()
        self._rooms.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in self._tasks:
            task.cancel()
