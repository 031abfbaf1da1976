"""The chat's hooks: who may connect and join, what a message is, where it is kept, and the
two RPCs that read the stored messages back.

- ``{"op":"hello","name":USER}``: USER (the token's ``sub`` with ``--secret``) must be in
  ``users``, else ``app.unknown_user``. The connection's name becomes the user's display
  name, which presence shows.
- ``{"op":"join","room":R}``: R must be in ``rooms`` (else ``app.no_such_room``), and public
  or with the user in ``members`` (else ``app.not_invited``).
- ``{"op":"pub","room":R,"data":{"text":T}}``: T is 1 to :data:`MAX_TEXT` characters (else
  ``app.bad_message``) and R a joined room (else ``not_member``). The message is stored, then
  published as ``{"id","user","name","text","ts"}``, ``name`` being the display name. A room
  keeps its newest ``store.MAX_STORED`` messages (the older ones are deleted).
- ``{"op":"rpc","method":"messages","data":{"room":R,"limit":N,"before":ID}}``: the newest N
  (default :data:`HISTORY_DEFAULT`, at most :data:`HISTORY_MAX`) stored messages of R, with
  an id below ID when given, oldest first.
- ``{"op":"rpc","method":"search","data":{"room":R,"text":T,"limit":N}}``: the same, of
  those whose text contains T (1 to :data:`MAX_QUERY` characters; any case).

Bad RPC arguments get ``app.bad_request``; reading a room needs having joined it
(``not_member``). The hub gives a publication its ``seq`` after ``on_publish``, so the store
keys messages by its own ``id``, which travels in the message: a page that loads the stored
messages and receives live ones tells them apart by it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from wirehub.hub import Connect, Hooks, Publish, Reject

from .store import Store, open_store

#: a message's longest text, in characters
MAX_TEXT = 1000
#: messages an RPC returns when not told, and at most: HISTORY_MAX messages of MAX_TEXT
#: characters stay well within a connection's send buffer (--max-send-buffer, 1 MiB)
HISTORY_DEFAULT = 50
HISTORY_MAX = 100
#: the longest search text, in characters
MAX_QUERY = 100
#: where the messages are kept unless CHAT_DATABASE says otherwise
DEFAULT_DATABASE = "chat.db"


class ChatApp:
    """The chat's hooks (``.hooks``, for ``wirehub serve --app`` or ``Hub(hooks=...)``) on the
    database at ``database``: a SQLite file's path, or a ``postgresql://`` URL. The database
    is opened (and its tables created) on the first hook call, in the serving process."""

    def __init__(self, database: str = DEFAULT_DATABASE) -> None:
        self.database = database
        self._store: Store | None = None
        self._opening = asyncio.Lock()
        self.hooks = hooks = Hooks()
        hooks.on_connect(self.connect)
        hooks.on_join("*")(self.join)
        hooks.on_publish("*")(self.publish)
        hooks.on_rpc("messages")(self.messages)
        hooks.on_rpc("search")(self.search)

    async def store(self) -> Store:
        if self._store is None:
            async with self._opening:
                if self._store is None:
                    self._store = await open_store(self.database)
        return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    # ----------------------------------------------------------------- hooks

    async def connect(self, ctx: Any, hello: dict[str, Any]) -> Connect:
        user = ctx.user if ctx.claims is not None else hello["name"]
        if not user:
            raise Reject("app.unknown_user", 'say who you are: {"op":"hello","name":"alice"}')
        display_name = await (await self.store()).display_name(user)
        if display_name is None:
            raise Reject("app.unknown_user", f"there is no user {user!r} here: ask an admin to add you")
        return Connect(user=user, name=display_name)

    async def join(self, ctx: Any, room: str, data: Any) -> None:
        allowed = await (await self.store()).may_join(ctx.user, room)
        if allowed is None:
            raise Reject("app.no_such_room", f"there is no room {room!r}")
        if not allowed:
            raise Reject("app.not_invited", f"{room} is private: ask a member to invite you")

    async def publish(self, ctx: Any, room: str, data: Any) -> Publish:
        _joined(ctx, room)
        text = data.get("text") if isinstance(data, dict) else None
        text = text.strip() if isinstance(text, str) else ""
        if not 0 < len(text) <= MAX_TEXT:
            raise Reject("app.bad_message", f'a message is {{"text": "..."}} of 1 to {MAX_TEXT} characters')
        ts = time.time_ns() // 1_000_000
        message_id = await (await self.store()).add_message(room, ctx.user, ctx.name, text, ts)
        return Publish(data={"id": message_id, "user": ctx.user, "name": ctx.name, "text": text, "ts": ts})

    async def messages(self, ctx: Any, data: Any) -> list[dict[str, Any]]:
        args = _args(data)
        room = _joined(ctx, _room(args))
        before = _number(args, "before", None, 1, 2**62)
        return await (await self.store()).messages(room, _limit(args), before=before)

    async def search(self, ctx: Any, data: Any) -> list[dict[str, Any]]:
        args = _args(data)
        room = _joined(ctx, _room(args))
        text = args.get("text")
        if not isinstance(text, str) or not 0 < len(text) <= MAX_QUERY:
            raise Reject("app.bad_request", f'search for a "text" of 1 to {MAX_QUERY} characters')
        return await (await self.store()).messages(room, _limit(args), contains=text)


def _joined(ctx: Any, room: str) -> str:
    if room not in ctx.rooms:
        raise Reject("not_member", f"join {room} first")
    return room


def _args(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise Reject("app.bad_request", 'send an object: {"room": "lobby", ...}')
    return data


def _room(args: dict[str, Any]) -> str:
    room = args.get("room")
    if not isinstance(room, str) or not room:
        raise Reject("app.bad_request", 'name the room: {"room": "lobby", ...}')
    return room


def _limit(args: dict[str, Any]) -> int:
    return _number(args, "limit", HISTORY_DEFAULT, 1, HISTORY_MAX)  # type: ignore[return-value]


def _number(args: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = args.get(key)
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        raise Reject("app.bad_request", f"{key} is a whole number from {low} to {high}, got {value!r}")
    return value


#: what ``wirehub serve --app examples.chat_app:hub`` serves (CHAT_DATABASE picks the database)
chat = ChatApp(os.environ.get("CHAT_DATABASE") or DEFAULT_DATABASE)
hub = chat.hooks
