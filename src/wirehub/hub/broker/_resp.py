"""Redis connections for the broker: RESP commands out, replies parsed by hiredis.

Two kinds of connection, both plain :class:`asyncio.Protocol` objects:

:class:`CommandLink`
    Auto-pipelined commands. :meth:`CommandLink.call` queues one command and returns its
    future at once; every command queued in one event-loop turn leaves in one ``write``
    (as rueidis does for Centrifugo), and replies are matched to futures in order. Redis
    runs a connection's commands in the order they arrive, so commands issued in call order
    are applied in call order: that is what keeps a room's ``seq`` in publish order while
    many publications are in flight. A command whose caller stopped waiting (a timeout)
    keeps its place, so later replies still find their futures.
:class:`SubscriberLink`
    A connection in pub/sub mode. Every reply parsed from one socket read is handed to the
    owner in one call (``on_replies``), so the publications of one read reach the hub in one
    event-loop turn and each subscriber gets them in one write.

Neither reconnects: when the socket goes, :attr:`lost` is resolved with the reason, and
every command still waiting fails with :class:`LinkLost` (``sent`` says whether it had been
written, i.e. whether Redis may have run it). The owner opens new links.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS, the system's CA
store; ``?ssl_cert_reqs=none`` skips verification) and ``unix://[[user]:password@]/path[?db=N]``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl as _ssl
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from ..._log import get_logger

ReplyError = hiredis.ReplyError
log = get_logger("wirehub.hub.broker.redis")


class LinkLost(ConnectionError):
    """The connection went away before the reply came. ``sent``: the command had been
    written, so Redis may have run it."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a Redis is and how to log in, from a URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a Unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    verify: bool = True

    @property
    def where(self) -> str:
        return f"redis at {self.path or f'{self.host}:{self.port}'}/{self.db}"

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL: {url!r} (use redis://host:port/db, rediss://… or unix:///path)")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        db_text = query.get("db", "0")
        if scheme == "unix":
            path = unquote(parts.path)
            if not path:
                raise ValueError(f"{url!r}: a unix:// Redis URL needs a socket path")
            return cls(path=path, db=int(db_text), username=username, password=password)
        if parts.path not in ("", "/"):
            db_text = parts.path.lstrip("/")
        try:
            db = int(db_text)
            port = parts.port or 6379
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=username,
            password=password,
            tls=scheme == "rediss",
            verify=query.get("ssl_cert_reqs", "required").lower() not in ("none", "optional"),
        )


def encode(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings (what every Redis client sends)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            pass
        elif kind is str:
            arg = arg.encode()
        elif kind is int:
            arg = b"%d" % arg
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            arg = bytes(arg)
        elif isinstance(arg, float):
            arg = repr(arg).encode()
        else:
            raise TypeError(f"a Redis argument must be bytes, str, int or float, not {kind.__name__}")
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)


class _Link(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.received_at = time.monotonic()  # the last time bytes came in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(f"went away: {exc}" if exc else "closed the connection")

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.lost.done()

    def abort(self, reason: str) -> None:
        """Drop the connection now (a hung Redis, a protocol error)."""
        if not self.lost.done():
            self.lost.set_result(reason)
        transport = self.transport
        if transport is not None:
            transport.abort()

    def _parse(self, data: bytes) -> list[Any] | None:
        self.received_at = time.monotonic()
        reader = self._reader
        reader.feed(data)
        out = []
        try:
            while (reply := reader.gets()) is not False:
                out.append(reply)
        except hiredis.ProtocolError as exc:
            self.abort(f"sent something that is not RESP: {exc}")
            return None
        return out


class CommandLink(_Link):
    """Auto-pipelined commands (see the module docstring)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        # what answers each command (see ``then``): queued this turn and not yet written, then written
        self._unsent: list[Any] = []
        self._waiting: collections.deque[Any] = collections.deque()
        self._scheduled = False
        self.sent_at = 0.0  # when the oldest command still waiting was written (0: none waits)

    @property
    def pending(self) -> int:
        """Commands queued or written and not answered yet."""
        return len(self._unsent) + len(self._waiting)

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; its future gives the reply, or raises :class:`ReplyError`
        (Redis refused it) or :class:`LinkLost`."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self.then(future, *args)
        return future

    def then(self, answer: asyncio.Future[Any] | Callable[[Any], None] | None, *args: Any) -> None:
        """Queue one command; ``answer`` is its future, or a function called with the reply
        (a :class:`ReplyError` or :class:`LinkLost` instance when it failed), or None (the
        reply is not wanted)."""
        self.then_encoded(answer, encode(args))

    def then_encoded(self, answer: asyncio.Future[Any] | Callable[[Any], None] | None, command: bytes) -> None:
        """:meth:`then` for a command already encoded as a RESP array (:func:`encode`)."""
        if not self.open:
            lost = LinkLost("is not connected", sent=False)
            if isinstance(answer, asyncio.Future):
                answer.set_exception(lost)
            elif answer is not None:
                answer(lost)
            return
        self._out.append(command)
        self._unsent.append(answer)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        transport = self.transport
        if not self._out or transport is None:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        if not self._waiting:
            self.sent_at = time.monotonic()
        self._waiting.extend(self._unsent)
        self._unsent = []
        transport.write(data)

    def data_received(self, data: bytes) -> None:
        replies = self._parse(data)
        if not replies:
            return
        waiting = self._waiting
        for reply in replies:
            if not waiting:
                self.abort("answered a command that was not sent")
                return
            answer = waiting.popleft()
            if answer is None:
                continue
            if not isinstance(answer, asyncio.Future):
                try:
                    answer(reply)
                except Exception:  # the owner's bug: the replies after it must still find their commands
                    log.exception("redis_reply_handler_failed", link=self.name)
            elif answer.done():  # its caller gave up (a timeout): the reply only keeps the order
                continue
            elif type(reply) is ReplyError:
                answer.set_exception(reply)
            else:
                answer.set_result(reply)
        self.sent_at = time.monotonic() if waiting else 0.0

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        reason = self.lost.result()
        waiting, self._waiting = self._waiting, collections.deque()
        unsent, self._unsent = self._unsent, []
        self._out = []
        self.sent_at = 0.0
        for answers, sent in ((waiting, True), (unsent, False)):
            for answer in answers:
                if answer is None:
                    continue
                lost = LinkLost(reason, sent=sent)
                if not isinstance(answer, asyncio.Future):
                    try:
                        answer(lost)
                    except Exception:
                        log.exception("redis_reply_handler_failed", link=self.name)
                elif not answer.done():
                    answer.set_exception(lost)

    def abort(self, reason: str) -> None:
        super().abort(reason)
        if self.transport is None:  # never connected, or gone already: fail what is left now
            self.connection_lost(None)


class SubscriberLink(_Link):
    """A pub/sub connection; ``on_replies`` gets every reply of one read in one call (after
    the login exchange of :func:`open_link`, whose replies it keeps for itself)."""

    def __init__(self, name: str, on_replies: Callable[[list[Any]], None]) -> None:
        super().__init__(name)
        self._on_replies = on_replies
        self._expect = 0  # replies of the login exchange still to come
        self._answers: list[Any] = []
        self._answered: asyncio.Future[list[Any]] | None = None

    def send(self, *args: Any) -> None:
        transport = self.transport
        if transport is None or self.lost.done():
            raise LinkLost("is not connected", sent=False)
        transport.write(encode(args))

    async def exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` and return their replies (before the link subscribes)."""
        self._expect = len(commands)
        self._answers = []
        self._answered = asyncio.get_running_loop().create_future()
        for cmd in commands:
            self.send(*cmd)
        lost = asyncio.ensure_future(asyncio.shield(self.lost))
        try:
            done, _ = await asyncio.wait((lost, self._answered), return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if self._answered not in done:
            raise LinkLost(self.lost.result(), sent=True)
        return self._answered.result()

    def data_received(self, data: bytes) -> None:
        replies = self._parse(data)
        if not replies:
            return
        if self._expect:
            take = replies[: self._expect]
            self._answers.extend(take)
            self._expect -= len(take)
            replies = replies[len(take) :]
            if not self._expect and self._answered is not None and not self._answered.done():
                self._answered.set_result(self._answers)
            if not replies:
                return
        self._on_replies(replies)


async def open_link(endpoint: Endpoint, link: _Link, *, timeout: float, client_name: str) -> None:
    """Connect ``link`` to ``endpoint``, log in, select the database and name the client.
    Raises OSError, TimeoutError or :class:`ReplyError` (bad password, no such database)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if endpoint.path is not None:
            await loop.create_unix_connection(lambda: link, endpoint.path)
        else:
            context = None
            if endpoint.tls:
                context = _ssl.create_default_context()
                if not endpoint.verify:
                    context.check_hostname = False
                    context.verify_mode = _ssl.CERT_NONE
            transport, _ = await loop.create_connection(lambda: link, endpoint.host, endpoint.port, ssl=context)
            sock = transport.get_extra_info("socket")
            if sock is not None:  # a command is written as soon as its turn ends: no Nagle delay behind an unacked one
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        setup: list[tuple[Any, ...]] = []
        if endpoint.password is not None:
            setup.append(("AUTH", endpoint.username, endpoint.password) if endpoint.username else ("AUTH", endpoint.password))
        if endpoint.db:
            setup.append(("SELECT", endpoint.db))
        setup.append(("CLIENT", "SETNAME", client_name))
        if isinstance(link, CommandLink):
            answers = [await future for future in [link.call(*cmd) for cmd in setup]]
        else:
            assert isinstance(link, SubscriberLink)
            answers = await link.exchange(setup)
        for answer in answers:
            if type(answer) is ReplyError:
                raise answer
