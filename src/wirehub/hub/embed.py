"""Embedding the hub in your own process: ``async with Hub(...) as hub``."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ..config import Config, load
from ..server.admin import describe_connection
from ..server.server import Server
from .app import HubApp
from .broker import Broker, Publication


class Hub:
    """The hub, started and driven from Python code in the same process.

    ``Hub(config)`` or ``Hub(tcp="127.0.0.1:7400", ws="127.0.0.1:7401", ...)`` with the same
    keys as the command line. ``await hub.start()`` binds the listeners; ``await hub.stop()``
    drains. Meanwhile ``await hub.publish(room, data)``, ``hub.connections()`` and
    ``hub.disconnect(client_id)`` act on the live hub.
    """

    def __init__(self, config: Config | None = None, *, broker: Broker | None = None, **options: Any) -> None:
        if config is None:
            config = load(env={}, flags=options)
        elif options:
            config = config.replace(**options)
        self.config = config
        self.app = HubApp(config, broker)
        self.server = Server(self.app, config)

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

    async def publish(self, room: str, data: Any) -> Publication:
        """Publish ``data`` (any JSON-serialisable value) to ``room``, as a backend would;
        returns the publication with its ``seq`` and ``epoch``."""
        return await self.app.publish_raw(room, msgspec.json.encode(data))

    def connections(self) -> list[dict[str, Any]]:
        """Every open connection on this node, as ``GET /api/connections`` lists them."""
        now = self.server.loop.time() if self.server.loop else time.monotonic()
        return [describe_connection(c, now) | self.app.describe(c) for c in self.server.connections()]

    def disconnect(self, client: str) -> bool:
        """Disconnect a client (it gets ``bye`` ``kicked``); False when it is not here."""
        return self.server.disconnect(client, "kicked")
