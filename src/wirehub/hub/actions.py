"""What the server can do from Python: publish, send, join, leave, disconnect, presence and
history. Hooks reach it as ``ctx.hub`` (or on their :class:`~wirehub.hub.Hooks` object once
serving); an embedded :class:`~wirehub.hub.Hub` has the same methods.

Every action works across nodes sharing a broker: what concerns a client or user connected
to another node travels as a control message on the broker (``send`` and room events), and
the node that holds the connection carries it out.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .._log import get_logger
from . import protocol as wire
from .broker import Member, Publication
from .protocol import MAX_ROOM_LENGTH

if TYPE_CHECKING:
    from .app import HubApp, Session

log = get_logger("wirehub.hub")
_encode = msgspec.json.Encoder().encode
#: control frames between nodes start with this byte (never a JSON frame's first byte)
CONTROL = b"\x00"
#: a user's connections on every node are reached through a room of this name: nothing a
#: client sends can name it (it is longer than any room name a client may use)
_USER_ROOM = "\x00user:"


USER_ROOM_PREFIX = _USER_ROOM + "\x00" * (MAX_ROOM_LENGTH - len(_USER_ROOM) + 1)


def user_room(user: str) -> str:
    return USER_ROOM_PREFIX + user


def _room_name(room: str) -> str:
    if not isinstance(room, str) or not 0 < len(room) <= MAX_ROOM_LENGTH:
        raise ValueError(f"room must be a string of 1 to {MAX_ROOM_LENGTH} characters, got {room!r}")
    return room


class Actions:
    """The server's actions (see the module docstring)."""

    def __init__(self, app: HubApp) -> None:
        self._app = app
        #: the connections of each user that said hello on this node
        self.users: dict[str, set[Session]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- rooms

    async def publish(self, room: str, data: Any, *, exclude: str | None = None, history: bool = True, info: Any = None) -> Publication | None:
        """Publish ``data`` (any JSON value) to ``room`` from the server (``from`` is ``""``).
        ``exclude``: a client id that does not get it live (the author of a message you
        rewrote and published yourself, say). ``history=False``: delivered now, not kept,
        no ``seq`` (returns None). ``info``: any JSON value, the ``msg``'s ``info``."""
        app = self._app
        room = _room_name(room)
        body = _encode(data)
        info_b = None if info is None else _encode(info)
        if not history:
            await self.publish_ephemeral(None, room, body, info_b, exclude=exclude or "")
            return None
        extra: dict[str, Any] = {}
        if info_b is not None:
            extra["info"] = info_b
        if exclude:
            extra["exclude"] = exclude
        return await app.broker.publish(room, body, sender="", ts=int(time.time() * 1000), history=app.policy(room).history, **extra)

    async def presence(self, room: str) -> list[Member]:
        """Who is in ``room`` on every node (empty when presence is off for it)."""
        app = self._app
        room = _room_name(room)
        return await app.broker.presence(room) if app.policy(room).presence else []

    async def history(self, room: str, *, limit: int | None = None, since: int | None = None) -> list[Publication]:
        """What ``room``'s history holds, oldest first: the last ``limit``, or those after
        ``since``. A :class:`~wirehub.hub.broker.Publication` has ``seq``, ``data`` (raw
        JSON: ``msgspec.json.decode(pub.data)``), ``sender``, ``ts`` and ``info``."""
        app = self._app
        room = _room_name(room)
        result = await app.broker.history(room, since=since, limit=limit, history=app.policy(room).history)
        return result.publications

    # ----------------------------------------------------------------- clients and users

    async def send(self, data: Any, *, client: str | None = None, user: str | None = None) -> bool:
        """Send ``data`` (any JSON value) to one client, or to every connection of ``user``
        on every node, as ``{"op":"msg","data":...}`` (no ``room``, no ``from``). For a
        client: False when no node has it."""
        frame = wire.server_msg(_encode(data))
        app = self._app
        if (client is None) == (user is None):
            raise TypeError("send(data, client=ID) or send(data, user=USER)")
        if client is not None:
            s = app.sessions.get(client)
            if s is not None:
                s.conn.send(frame)
                return True
            return await app.broker.send(client, frame)
        return await self._to_user(user, frame)  # type: ignore[arg-type]

    async def disconnect(self, *, client: str | None = None, user: str | None = None, reconnect: bool = False) -> bool:
        """Close a client's connection, or every connection of ``user`` on every node, with
        ``bye`` ``kicked`` and ``reconnect`` as given. For a client: False when no node has it."""
        if (client is None) == (user is None):
            raise TypeError("disconnect(client=ID) or disconnect(user=USER)")
        control = CONTROL + _encode(["disconnect", reconnect])
        app = self._app
        if client is not None:
            s = app.sessions.get(client)
            if s is not None:
                s.conn.close("kicked_retry" if reconnect else "kicked")
                return True
            return await app.broker.send(client, control)
        return await self._to_user(user, control)  # type: ignore[arg-type]

    async def join(self, client: str, room: str, *, info: Any = None) -> bool:
        """Join ``client`` to ``room`` from the server side, on whichever node it is: it gets
        ``joined`` (no ``ref``), then the room's messages; ``info`` is its presence info there.
        No token check and no on_join hook. False when no node has the client."""
        room = _room_name(room)
        info = None if info is None else msgspec.json.decode(_encode(info))
        s = self._app.sessions.get(client)
        if s is not None:
            await self.join_here(s, room, info)
            return True
        return await self._app.broker.send(client, CONTROL + _encode(["join", room, info]))

    async def leave(self, client: str, room: str) -> bool:
        """Take ``client`` out of ``room``, on whichever node it is: it gets ``left`` (no
        ``ref``). False when no node has the client."""
        room = _room_name(room)
        s = self._app.sessions.get(client)
        if s is not None:
            await self.leave_here(s, room)
            return True
        return await self._app.broker.send(client, CONTROL + _encode(["leave", room]))

    async def publish_ephemeral(self, s: Session | None, room: str, data: bytes, info: bytes | None, exclude: str = "") -> None:
        """A publication without history: delivered to the members now, on every node, as a
        ``msg`` without ``seq``."""
        sender = s.client_json if s is not None else b'""'
        frame = wire.with_info(wire.ephemeral_msg(wire.json_str(room), sender, data, time.time_ns() // 1_000_000), info)
        await self._app.broker.room_event(room, frame, exclude=exclude)

    # ----------------------------------------------------------------- users

    async def _to_user(self, user: str, frame: bytes) -> bool:
        app = self._app
        if not isinstance(user, str) or not user:
            raise ValueError(f"user must be a non-empty string, got {user!r}")
        if app.broker.local:  # every connection is here
            return self.user_event(user, frame) > 0
        await app.broker.room_event(user_room(user), frame)
        return True

    def user_event(self, user: str, frame: bytes) -> int:
        """``frame`` for every connection of ``user`` on this node (a control frame is
        carried out); how many there were."""
        sessions = self.users.get(user)
        if not sessions:
            return 0
        for s in list(sessions):
            if frame[:1] == CONTROL:
                self.run_control(s, frame)
            else:
                s.conn.send(frame)
        return len(sessions)

    async def track_user(self, s: Session) -> None:
        """``s`` said hello: messages for its user reach it (from any node)."""
        sessions = self.users.get(s.user)
        if sessions is None:
            sessions = self.users[s.user] = set()
            if not self._app.broker.local:
                await self._app.broker.subscribe(user_room(s.user))
        sessions.add(s)

    async def untrack_user(self, s: Session) -> None:
        sessions = self.users.get(s.user)
        if sessions is None or s not in sessions:
            return
        sessions.discard(s)
        if not sessions:
            del self.users[s.user]
            if not self._app.broker.local:
                await self._app.broker.unsubscribe(user_room(s.user))

    # ----------------------------------------------------------------- on the node that has it

    async def join_here(self, s: Session, room: str, info: Any) -> None:
        from .protocol import Join

        if info is not None:
            if s.room_info is None:
                s.room_info = {}
            s.room_info[room] = info
        await self._app._join(s, Join(room=room), by_server=True)

    async def leave_here(self, s: Session, room: str) -> None:
        if room in s.rooms and s.conn.open:
            s.conn.send(wire.encode({"op": "left", "room": room}))
            await self._app._part(s, room)

    def run_control(self, s: Session, frame: bytes) -> None:
        """A control message from another node for ``s``: disconnect it, or join or leave a
        room for it (in a task)."""
        try:
            what = msgspec.json.decode(frame[1:])
        except msgspec.DecodeError:
            return
        if what[0] == "disconnect":
            s.conn.close("kicked_retry" if what[1] else "kicked")
            return
        if what[0] == "join":
            coro = self.join_here(s, what[1], what[2])
        elif what[0] == "leave":
            coro = self.leave_here(s, what[1])
        else:
            return
        task = asyncio.ensure_future(self._guarded(s, coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, s: Session, coro: Any) -> None:
        from .broker import BrokerError

        try:
            await coro
        except BrokerError as exc:
            log.warning("broker_error", op="server_join_leave", conn=s.client, error=str(exc))
        except Exception:
            log.exception("hub_op_failed", conn=s.client, op="server_join_leave")
