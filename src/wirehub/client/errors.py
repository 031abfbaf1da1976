"""What the client raises."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base class of every error the hub client raises (besides ``TimeoutError`` for a
    request that got no reply in time, and ``ValueError`` for a bad URL or argument)."""


class HubError(ClientError):
    """The hub refused a request: it answered ``{"op":"error","code":...,"message":...}``
    with the request's ``ref``. ``code`` is one of the protocol's error codes
    (``bad_frame``, ``forbidden``, ``not_member``, ``no_such_client``...)."""

    def __init__(self, code: str, message: str, frame: dict[str, Any] | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.frame = frame if frame is not None else {"op": "error", "code": code, "message": message}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectError(ClientError, ConnectionError):
    """The connection could not be opened (refused, unreachable, TLS or WebSocket handshake
    failed, no ``welcome`` in time)."""


class ConnectionLost(ClientError, ConnectionError):
    """The connection dropped while this request was in flight. The hub may or may not have
    acted on it (a ``pub`` may have been published): the client never re-sends it by itself,
    because that could publish twice. The client itself reconnects (unless told not to)."""


class Disconnected(ClientError, ConnectionError):
    """The client stopped for good. ``reason`` says why:

    * a ``bye`` reason with ``reconnect:false`` from the hub (``kicked``, ``too_many_errors``,
      ``protocol``), or any bye reason when the client was created with ``reconnect=False``;
    * ``connection_lost``: the connection dropped and ``reconnect=False``;
    * ``unauthorized`` / ``forbidden``: a reconnect's ``hello`` was refused (an expired token);
    * ``closed``: :meth:`Client.close` was called.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        self.message = message or _EXPLAIN.get(reason, f"the connection ended: {reason}")
        super().__init__(reason, self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


_EXPLAIN = {
    "kicked": "the hub disconnected this client (kicked) and asked it not to reconnect",
    "too_many_errors": "the hub disconnected this client after too many refused frames",
    "protocol": "the hub disconnected this client for breaking the protocol",
    "connection_lost": "the connection dropped and reconnecting is off",
    "closed": "the client was closed",
}
