"""Embedding the hub in your own process: ``async with Hub(...) as hub``."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ..config import Config, load
from ..server.admin import describe_connection
from ..server.server import Server
from .app import HubApp
from .broker import Broker, Member, Publication
from .hooks import Hooks


class Hub:
    """The hub, started and driven from Python code in the same process.

    ``Hub(config)`` or ``Hub(tcp="127.0.0.1:7400", ws="127.0.0.1:7401", ...)`` with the same
    keys as the command line. ``await hub.start()`` binds the listeners; ``await hub.stop()``
    drains. Meanwhile ``await hub.publish(room, data)``, ``hub.connections()`` and
    ``hub.disconnect(client_id)`` act on the live hub, with the other server actions
    (``send``, ``join``, ``leave``, ``presence``, ``history``).

    Hooks (docs/hub.md) are registered on it before ``start``, with the decorators of
    :class:`~wirehub.hub.Hooks` (``@hub.on_join("chat.*")``), or given as ``hooks=``.
    """

    def __init__(self, config: Config | None = None, *, broker: Broker | None = None, hooks: Hooks | None = None, **options: Any) -> None:
        if config is None:
            config = load(env={}, flags=options)
        elif options:
            config = config.replace(**options)
        self.config = config
        self.hooks = hooks if hooks is not None else Hooks()
        self.app = HubApp(config, broker, self.hooks)
        self.app.route_users = True  # send and disconnect by user work without hooks too
        self.server = Server(self.app, config)
        self.actions = self.app.actions
        for name in ("on_connect", "on_join", "on_publish", "on_rpc", "on_refresh", "on_leave", "on_disconnect"):
            setattr(self, name, getattr(self.hooks, name))

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        self.server.request_stop()
        await self.server.shutdown()

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def asgi(self):
        """The hub's WebSocket side as an ASGI app: ``Mount("/ws", hub.asgi)`` in Starlette,
        ``app.mount("/ws", hub.asgi)`` in FastAPI. Clients there share rooms with every
        listener's clients."""
        return self.server.asgi

    @property
    def addresses(self) -> dict[str, list[str]]:
        """Where each listener is bound: ``{"tcp": ["127.0.0.1:7400"], ...}``."""
        return self.server.addresses

    async def publish(self, room: str, data: Any, *, exclude: str | None = None, history: bool = True, info: Any = None) -> Publication | None:
        """Publish ``data`` (any JSON-serialisable value) to ``room``, as a backend would;
        returns the publication with its ``seq`` and ``epoch`` (None with ``history=False``).
        ``exclude``: a client id that does not get it live; ``info``: the ``msg``'s ``info``."""
        if exclude is None and history and info is None:
            return await self.app.publish_raw(room, msgspec.json.encode(data))
        return await self.actions.publish(room, data, exclude=exclude, history=history, info=info)

    async def send(self, data: Any, *, client: str | None = None, user: str | None = None) -> bool:
        """Send ``data`` to one client or to every connection of a user, on any node."""
        return await self.actions.send(data, client=client, user=user)

    async def join(self, client: str, room: str, *, info: Any = None) -> bool:
        """Join a client (on any node) to ``room`` from the server side."""
        return await self.actions.join(client, room, info=info)

    async def leave(self, client: str, room: str) -> bool:
        """Take a client (on any node) out of ``room``."""
        return await self.actions.leave(client, room)

    async def kick(self, *, client: str | None = None, user: str | None = None, reconnect: bool = False) -> bool:
        """:meth:`disconnect` across nodes, by client or by user (every connection of it)."""
        return await self.actions.disconnect(client=client, user=user, reconnect=reconnect)

    async def presence(self, room: str) -> list[Member]:
        """Who is in ``room``, on every node."""
        return await self.actions.presence(room)

    async def history(self, room: str, *, limit: int | None = None, since: int | None = None) -> list[Publication]:
        """What ``room``'s history holds, oldest first."""
        return await self.actions.history(room, limit=limit, since=since)

    def connections(self) -> list[dict[str, Any]]:
        """Every open connection on this node, as ``GET /api/connections`` lists them."""
        now = self.server.loop.time() if self.server.loop else time.monotonic()
        return [describe_connection(c, now) | self.app.describe(c) for c in self.server.connections()]

    def disconnect(self, client: str) -> bool:
        """Disconnect a client (it gets ``bye`` ``kicked``); False when it is not here."""
        return self.server.disconnect(client, "kicked")
