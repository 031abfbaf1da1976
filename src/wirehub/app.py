"""The framework API: an :class:`App` is the handlers of one kind of server.

Write handlers with decorators::

    app = wirehub.App(framing="line")

    @app.on_frame
    def echo(conn, frame):
        conn.send(frame)

or subclass :class:`App` and override the methods of the same names (``connect``, ``frame``,
``frame_error``, ``closing``, ``disconnect``, ``refusal``, ``startup``, ``shutdown``,
``udp_challenge``, ``udp_cookie``).

A handler may be a plain function or ``async def``. Plain functions run inline as bytes
arrive, the fastest path; a plain function that blocks (``@app.on_frame(blocking=True)``)
runs in a bounded thread pool instead. When ``connect``, ``frame`` or ``frame_error`` is ``async``, each
connection gets a task that runs its handler calls one at a time in arrival order, and
reading from the peer pauses while it is behind. Either way a handler that raises is logged
and closes only its own connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .blocking import BlockingPool, blocking_handler
from .protocol.framing import Framing, FrameError, get_framing
from .transport.connection import PROTOCOL, Connection, Handlers

if TYPE_CHECKING:
    from .server.server import Server

F = TypeVar("F", bound=Callable[..., Any])


class App:
    """Handlers for connection events, plus the framing the app speaks on byte streams
    (``"line"``: one frame per ``\\n``-terminated line; ``"length"``: 4-byte big-endian
    length prefix). WebSocket messages and UDP datagrams are one frame each whatever the
    framing."""

    def __init__(self, *, framing: str | Framing = "line", name: str | None = None) -> None:
        self.framing: Framing = get_framing(framing) if isinstance(framing, str) else framing
        self.name = name or type(self).__name__
        #: frames the server answers itself, in order with the rest, without calling the frame
        #: handler: a frame equal to a key gets its value back (heartbeats; the compiled core
        #: answers them with no Python call). Set before the server starts.
        self.replies: dict[bytes, bytes] = {}
        #: the thread pool of handlers marked ``blocking=True`` (the server sets its size
        #: from ``blocking_threads`` when it starts)
        self.blocking_pool = BlockingPool()

    # --------------------------------------------------------------- overridable handlers

    def connect(self, conn: Connection) -> Any:
        """A connection opened (after any TLS or WebSocket handshake)."""

    def frame(self, conn: Connection, frame: bytes) -> Any:
        """One complete frame arrived."""
        raise NotImplementedError(f"{self.name} has no frame handler: decorate one with @app.on_frame or override frame()")

    def frame_error(self, conn: Connection, error: FrameError) -> Any:
        """The peer broke the framing (``error.code`` is ``too_large`` or ``bad_frame``).
        The default closes the connection with reason ``protocol``."""
        conn.close(PROTOCOL)

    def closing(self, conn: Connection, reason: str) -> None:
        """The server is about to close ``conn`` (``idle``, ``shutdown``, ``kicked``,
        ``slow_consumer``, ``handshake_timeout``...). A last ``conn.send`` here is
        flushed before the close. Must be a plain function."""

    def disconnect(self, conn: Connection, reason: str) -> Any:
        """The connection is gone; ``reason`` says why (``closed`` when the peer left)."""

    def refusal(self, reason: str) -> bytes | None:
        """The frame to send a client refused at accept (``max_connections_per_ip``), or None."""
        return None

    def pending(self, conn: Connection) -> Any:
        """What the app still owes ``conn`` beyond its handlers (an awaitable), or None: for
        an app whose frame handler starts work and returns before its reply is sent. When
        the peer finishes (EOF, a WebSocket close frame), the close waits, after the queued
        frames, for this, at most ``close_timeout``. Only an app that overrides it is asked
        (a plain function)."""
        return None

    # UDP address validation (see wirehub.transport.datagram): an app that implements both
    # hooks gets no session for a UDP source address until it echoed a cookie; one that does
    # not keeps a session per address whose output is held to 3x what the address sent.

    def udp_challenge(self, cookie: bytes) -> bytes:
        """The frame that asks a UDP source address without a session to prove it is real:
        it must carry ``cookie`` (ASCII) so that the client can echo it. Sent only when it is
        at most 3x the size of the datagram it answers (clients pad their first datagram).
        Must be a plain function with no side effects: it runs without any session."""
        raise NotImplementedError

    def udp_cookie(self, frame: bytes) -> bytes | str | None:
        """The cookie a frame from an address without a session echoes, or None. When it is
        valid for that address, a session opens and the frame is handled as usual; otherwise
        the address is challenged again. A plain function, cheap: it sees every such frame."""
        return None

    async def startup(self, server: Server) -> None:
        """Runs once per process before the listeners open."""

    async def shutdown(self, server: Server) -> None:
        """Runs once per process after the connections drained."""

    # --------------------------------------------------------------- decorators

    def on_connect(self, fn: F | None = None, *, blocking: bool = False) -> Any:
        return self._register("connect", fn, blocking)

    def on_frame(self, fn: F | None = None, *, blocking: bool = False) -> Any:
        """``@app.on_frame``, or ``@app.on_frame(blocking=True)`` for a plain function that
        blocks (a database or HTTP library without async): it then runs in the server's
        thread pool (``blocking_threads``), one call at a time per connection, in order,
        with reads paused while its frames wait. Its ``conn`` is a
        :class:`~wirehub.blocking.ThreadConnection`: ``send`` and ``close`` are safe there."""
        return self._register("frame", fn, blocking)

    def _register(self, which: str, fn: Any, blocking: bool) -> Any:
        def register(f: F) -> F:
            setattr(self, which, blocking_handler(self, f, which) if blocking else f)
            return f

        return register(fn) if fn is not None else register

    def on_frame_error(self, fn: F) -> F:
        self.frame_error = fn  # type: ignore[method-assign]
        return fn

    def on_closing(self, fn: F) -> F:
        self.closing = fn  # type: ignore[method-assign]
        return fn

    def on_disconnect(self, fn: F | None = None, *, blocking: bool = False) -> Any:
        return self._register("disconnect", fn, blocking)

    def on_refusal(self, fn: F) -> F:
        self.refusal = fn  # type: ignore[method-assign]
        return fn

    def on_udp_challenge(self, fn: F) -> F:
        self.udp_challenge = fn  # type: ignore[method-assign]
        return fn

    def on_udp_cookie(self, fn: F) -> F:
        self.udp_cookie = fn  # type: ignore[method-assign]
        return fn

    def on_startup(self, fn: F) -> F:
        self.startup = fn  # type: ignore[method-assign]
        return fn

    def on_shutdown(self, fn: F) -> F:
        self.shutdown = fn  # type: ignore[method-assign]
        return fn

    # --------------------------------------------------------------- for the server

    def udp_hooks(self) -> tuple[Callable[[bytes], bytes], Callable[[bytes], Any]] | None:
        """(challenge, cookie) when this app validates UDP source addresses, else None."""
        challenge = type(self).udp_challenge is not App.udp_challenge or "udp_challenge" in self.__dict__
        cookie = type(self).udp_cookie is not App.udp_cookie or "udp_cookie" in self.__dict__
        if challenge != cookie:
            raise TypeError(f"{self.name} implements only one of udp_challenge and udp_cookie: UDP address validation needs both")
        return (self.udp_challenge, self.udp_cookie) if challenge else None

    def handlers(self) -> Handlers:
        if type(self).frame is App.frame and "frame" not in self.__dict__:
            raise TypeError(f"{self.name} has no frame handler: decorate one with @app.on_frame or override frame()")
        owes = type(self).pending is not App.pending or "pending" in self.__dict__
        return Handlers(
            connect=self.connect,
            frame=self.frame,
            frame_error=self.frame_error,
            disconnect=self.disconnect,
            closing=self.closing,
            replies=dict(self.replies) or None,
            pending=self.pending if owes else None,
        )
