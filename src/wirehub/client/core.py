"""The hub client: requests and replies, the event stream, heartbeat, reconnect and recovery.

See :mod:`wirehub.client` for the user-facing description.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Generator, Mapping, Union

import msgspec

from .backoff import backoff_delay
from .errors import ClientError, ConnectError, ConnectionLost, Disconnected, HubError
from .transports import Endpoint, Link, open_link, parse_url

log = logging.getLogger("wirehub.client")

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
#: seconds: the largest reconnect wait after a ``bye`` ``shutdown`` (a draining hub that is
#: restarting), instead of the backoff's own cap, so that a client refused while the hub is down
#: is back within about this long of its return (Phoenix's socket caps its retries at 5 s)
RESTART_BACKOFF_CAP = 2.0

#: bye reasons after which the client never reconnects (the hub says reconnect:false for them)
FATAL_HELLO_CODES = ("unauthorized", "forbidden")
#: UDP: heartbeats that may go unanswered in a row before the session counts as dead
UDP_MISSES = 3

TokenSource = Union[str, None, Callable[[], Union[str, None, Awaitable[Union[str, None]]]]]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Room:
    """A joined room, as :meth:`Client.join` returns it.

    ``seq`` is the sequence number of the last message of this room the client accepted
    (queued for the program), ``epoch`` the room's history epoch: a reconnect re-joins with
    them so that nothing is lost or repeated. ``joined`` turns False after :meth:`leave` (or
    when a re-join after a reconnect was refused).

    ``presence_mode`` is how the hub tells this room's presence changes, from the ``joined``
    reply and kept up to date as the room grows or shrinks: ``"events"``, ``"diff"`` (both
    arrive as ``join``/``leave`` events), ``"query"`` (no events: call :meth:`presence`),
    ``"off"``; None from a hub that does not say.
    """

    __slots__ = ("client", "name", "seq", "epoch", "joined", "presence_mode", "_repairing", "_stuck_at", "_seen")

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self.seq: int = 0
        self.epoch: str | None = None
        self.joined = False
        self.presence_mode: str | None = None
        self._repairing = False
        self._stuck_at: int | None = None  # the seq a gap repair last started from
        self._seen = 0  # the highest seq that arrived (and was set aside) during a repair

    def __repr__(self) -> str:
        return f"<Room {self.name!r} seq={self.seq} epoch={self.epoch!r}{'' if self.joined else ' (left)'}>"

    async def publish(self, data: Any) -> int:
        return await self.client.publish(self.name, data)

    async def presence(self) -> list[dict[str, Any]]:
        return await self.client.presence(self.name)

    async def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        return await self.client.history(self.name, limit)

    async def leave(self) -> None:
        await self.client.leave(self.name)


class _Pending:
    __slots__ = ("future", "link", "on_reply", "quiet")

    def __init__(self, future: asyncio.Future, link: Link, on_reply: Callable[[dict], None] | None, quiet: bool) -> None:
        self.future = future
        self.link = link
        self.on_reply = on_reply
        self.quiet = quiet


class _End:
    """Queued after the last event: the iteration ends here (with ``error``, if any)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Client:
    """A connection to a wirehub hub that stays connected. Made by :func:`connect`."""

    def __init__(
        self,
        url: str | Endpoint,
        *,
        token: TokenSource = None,
        name: str | None = None,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.1, 10.0),
        ssl: Any = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        timeout: float = 10.0,
        heartbeat: float | None = None,
        on_state: Callable[[str, str | None], Any] | None = None,
        on_frame: Callable[[dict], Any] | None = None,
    ) -> None:
        self.endpoint = url if isinstance(url, Endpoint) else parse_url(url)
        self.url = self.endpoint.url
        if len(backoff) != 2 or backoff[0] < 0 or backoff[1] < backoff[0]:
            raise ValueError(f"backoff must be (min_seconds, max_seconds) with 0 <= min <= max, got {backoff!r}")
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self._token = token
        self.name = name
        self.reconnect = reconnect
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self._ssl = ssl
        self.max_frame = max_frame
        self.timeout = timeout
        self._heartbeat_override = heartbeat
        self._on_state = on_state
        self._on_frame_tap = on_frame

        #: from the last ``welcome`` (they change when a reconnect gets a new session)
        self.client_id: str | None = None
        self.user: str | None = None
        self.server: str | None = None
        self.heartbeat: float | None = None
        self.state = "connecting"
        #: counters, for the curious and for tests
        self.reconnects = 0
        self.duplicates_dropped = 0

        self._rooms: dict[str, Room] = {}
        self._pending: dict[Any, _Pending] = {}
        self._refs = itertools.count(1)
        self._link: Link | None = None
        self._bye: dict | None = None
        self._last_error: dict | None = None  # the last error frame that answered no request
        self._connected = asyncio.Event()
        self._events: collections.deque[Any] = collections.deque()
        self._event_waiter: asyncio.Future | None = None
        self._ended = False
        self._fatal: Disconnected | None = None
        self._closing = False
        self._supervisor: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._probe = 0

    # ------------------------------------------------------------------ public API

    def __repr__(self) -> str:
        return f"<wirehub.client.Client {self.url} {self.state} client={self.client_id!r}>"

    @property
    def rooms(self) -> Mapping[str, Room]:
        """The rooms this client is in (and re-joins after a reconnect)."""
        return dict(self._rooms)

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    async def join(self, room: str, since: int | None = None, epoch: str | None = None) -> Room:
        """Join ``room``; with ``since`` (and ``epoch``), first receive every message after
        ``since`` that history still holds (or a ``recovery_failed`` event)."""
        handle = self._rooms.get(room) or Room(self, room)
        frame: dict[str, Any] = {"op": "join", "room": room}
        if since is not None:
            frame["since"] = since
            if epoch is not None:
                frame["epoch"] = epoch
        await self._request(frame, on_reply=lambda reply: self._joined(handle, reply, since, epoch))
        return handle

    async def leave(self, room: str) -> None:
        def left(reply: dict) -> None:
            handle = self._rooms.pop(room, None)
            if handle is not None:
                handle.joined = False

        try:
            await self._request({"op": "leave", "room": room}, on_reply=left)
        except HubError as exc:
            if exc.code == "not_member":
                left(exc.frame)
            raise

    async def publish(self, room: str, data: Any) -> int:
        """Publish ``data`` (anything JSON can carry) to ``room``; returns its ``seq``."""
        reply = await self._request({"op": "pub", "room": room, "data": data})
        return reply.get("seq")  # type: ignore[return-value]

    async def send(self, client_id: str, data: Any) -> None:
        """A direct message to one client (``no_such_client`` if it is not connected)."""
        await self._request({"op": "send", "to": client_id, "data": data})

    async def presence(self, room: str) -> list[dict[str, Any]]:
        reply = await self._request({"op": "presence", "room": room})
        return reply.get("members", [])

    async def history(self, room: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The room's retained messages, oldest first (the last ``limit`` of them). The hub
        bounds each reply in bytes (``"more":true`` when older messages were left out):
        this asks for the pages before until it has them all."""
        frame: dict[str, Any] = {"op": "history", "room": room}
        if limit is not None:
            frame["limit"] = limit
        reply = await self._request(frame)
        messages: list[dict[str, Any]] = reply.get("messages", [])
        while reply.get("more") and messages and (limit is None or len(messages) < limit):
            page: dict[str, Any] = {"op": "history", "room": room, "before": messages[0]["seq"]}
            if limit is not None:
                page["limit"] = limit - len(messages)
            reply = await self._request(page)
            older = reply.get("messages", [])
            if not older:
                break
            messages = older + messages
        return messages

    async def refresh(self, token: str) -> int | None:
        """Give the hub a fresh token before the current one expires; returns its ``exp``.
        Later reconnects say hello with this token."""
        reply = await self._request({"op": "refresh", "token": token})
        self._token = token
        return reply.get("exp")

    async def ping(self) -> float:
        """A round trip to the hub; returns the time it took, in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._request({"op": "ping"})
        return loop.time() - start

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send any frame with a fresh ``ref`` and return the reply that carries it."""
        return await self._request(dict(frame))

    async def send_frame(self, frame: dict[str, Any]) -> None:
        """Send a frame exactly as given, without waiting for anything. Its reply, if any,
        goes to ``on_frame`` only; rooms joined this way are not tracked or re-joined."""
        link = await self._ready_link(asyncio.get_running_loop().time() + self.timeout)
        await self._send(link, frame)

    async def recv(self) -> dict[str, Any]:
        """The next event (see :mod:`wirehub.client`). Once the client has stopped and every
        event before that was received: raises why it stopped (:class:`Disconnected`;
        reason ``closed`` after :meth:`close`)."""
        item = await self._next()
        if type(item) is _End:
            raise item.error if item.error is not None else Disconnected("closed")
        return item

    async def _next(self) -> Any:
        while True:
            if self._events:
                item = self._events[0]
                return item if type(item) is _End else self._events.popleft()
            if self._event_waiter is None or self._event_waiter.done():
                self._event_waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._event_waiter)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        """Events in arrival order; the iteration ends quietly after :meth:`close`, and with
        :class:`Disconnected` when the hub sent the client away for good."""
        item = await self._next()
        if type(item) is _End:
            if item.error is None:
                raise StopAsyncIteration
            raise item.error
        return item

    async def close(self) -> None:
        """Leave for good: stop reconnecting, close the connection, fail pending requests
        with :class:`Disconnected` ``closed``; the iteration ends after queued events."""
        if self._closing:
            return
        self._closing = True
        self._cancel_tasks()
        link = self._link
        if link is not None and not link.closed:
            if link.kind == "udp" and self.state == "connected":
                # A UDP session has no end on the wire: leave the rooms, so that presence
                # is right at once instead of after the hub's idle timeout.
                for name in list(self._rooms):
                    try:
                        await self._send(link, {"op": "leave", "room": name})
                    except Exception:
                        break
            link.close()
            await link.wait_closed(self.timeout)
        self._stop(Disconnected("closed"), end_error=None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ opening

    async def _start(self) -> None:
        """The first connection: fails at once (no retry) with ConnectError or HubError."""
        self._set_state("connecting", None)
        try:
            await self._open()
        except BaseException:
            self._closing = True
            self._stop(Disconnected("closed"), end_error=None)
            raise
        self._set_state("connected", None)
        self._supervisor = self._spawn(self._supervise())

    async def _token_now(self) -> str | None:
        token = self._token
        if callable(token):
            token = token()
            if inspect.isawaitable(token):
                token = await token
        return token  # type: ignore[return-value]

    async def _open(self) -> None:
        """Open a link, say hello, re-join every room; the link is current from the start."""
        link = await open_link(
            self.endpoint, self._on_frame, self._on_lost, ssl=self._ssl, max_frame=self.max_frame, timeout=self.timeout, on_link=self._adopt
        )
        try:
            hello: dict[str, Any] = {"op": "hello"}
            token = await self._token_now()
            if token:
                hello["token"] = token
            if self.name:
                hello["name"] = self.name
            try:
                welcome = await self._request(hello, link=link)
            except asyncio.TimeoutError:
                raise ConnectError(f"cannot connect to {self.url}: no welcome from the hub within {self.timeout:g}s") from None
            except ConnectionLost:
                raise ConnectError(f"cannot connect to {self.url}: {self._why_closed(link)}") from None
            if welcome.get("op") != "welcome":
                raise ConnectError(f"cannot connect to {self.url}: the hub answered hello with {welcome!r}")
            self.client_id = welcome.get("client")
            self.user = welcome.get("user")
            self.server = welcome.get("server")
            beat = self._heartbeat_override if self._heartbeat_override is not None else welcome.get("heartbeat")
            self.heartbeat = float(beat) if isinstance(beat, (int, float)) and beat > 0 else None
            await self._rejoin(link)
        except BaseException:
            link.abort()
            raise
        if self.heartbeat:
            self._heartbeat_task = self._spawn(self._beat(link))

    def _adopt(self, link: Link) -> None:
        """A new link is the current one from the moment it exists (the old one is gone)."""
        self._link = link
        self._bye = None
        self._last_error = None

    def _why_closed(self, link: Link) -> str:
        """Why a link ended before the hello was answered, as well as we know."""
        if self._bye is not None:
            return f"the hub said bye ({self._bye.get('reason')})"
        if self._last_error is not None:
            return f"the hub refused: {self._last_error.get('code')}: {self._last_error.get('message')}"
        cause = link.done.result() if link.done.done() else None
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        return str(cause or "") or "the hub closed the connection before it said welcome"

    async def _rejoin(self, link: Link) -> None:
        """Re-join every room with ``since`` = the last seq accepted and its epoch, all at once."""
        rooms = list(self._rooms.values())
        if not rooms:
            return

        async def one(room: Room) -> None:
            frame = {"op": "join", "room": room.name, "since": room.seq}
            if room.epoch is not None:
                frame["epoch"] = room.epoch
            since, epoch = room.seq, room.epoch
            try:
                await self._request(frame, link=link, on_reply=lambda reply: self._joined(room, reply, since, epoch))
            except HubError as exc:
                self._rooms.pop(room.name, None)
                room.joined = False
                self._event({"op": "rejoin_failed", "room": room.name, "code": exc.code, "message": exc.message})

        results = await asyncio.gather(*(one(r) for r in rooms), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _joined(self, room: Room, reply: dict, since: int | None, epoch: str | None) -> None:
        """A ``joined`` reply, handled as it arrives (before the messages that follow it)."""
        seq = reply.get("seq")
        seq = seq if isinstance(seq, int) else 0
        new_epoch = reply.get("epoch")
        if since is None:
            room.seq = seq
        elif reply.get("recovered"):
            room.seq = since
        else:
            # The gap cannot be filled: say so, and go on from the room's current position.
            self._event(
                {"op": "recovery_failed", "room": room.name, "since": since, "epoch": epoch, "seq": seq, "new_epoch": new_epoch}
            )
            room.seq = seq
        room.epoch = new_epoch
        mode = reply.get("presence")
        room.presence_mode = mode if isinstance(mode, str) else None
        room.joined = True
        room._repairing = False
        self._rooms[room.name] = room

    # ------------------------------------------------------------------ requests

    async def _ready_link(self, deadline: float) -> Link:
        loop = asyncio.get_running_loop()
        while True:
            if self._fatal is not None:
                raise self._fatal
            link = self._link
            if self._connected.is_set() and link is not None and not link.closed:
                return link
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError(f"not connected to {self.url} within {self.timeout:g}s")
            try:
                await asyncio.wait_for(self._connected.wait(), remaining)
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(f"not connected to {self.url} within {self.timeout:g}s") from None

    async def _send(self, link: Link, frame: dict) -> None:
        try:
            await link.send(_encode(frame))
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"the connection to {self.url} dropped: {exc}") from exc

    async def _request(
        self,
        frame: dict[str, Any],
        *,
        link: Link | None = None,
        on_reply: Callable[[dict], None] | None = None,
        quiet: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send ``frame`` with a fresh ref; return its reply or raise HubError/TimeoutError.
        Without ``link``, wait (within the timeout) until the client is connected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.timeout)
        if link is None:
            link = await self._ready_link(deadline)
        elif self._fatal is not None:
            raise self._fatal
        ref = next(self._refs)
        frame["ref"] = ref
        future = loop.create_future()
        self._pending[ref] = _Pending(future, link, on_reply, quiet)
        try:
            await self._send(link, frame)
            remaining = max(0.0, deadline - loop.time())
            try:
                return await asyncio.wait_for(future, remaining)
            except asyncio.TimeoutError:
                raise asyncio.TimeoutError(f"no reply to {frame.get('op')!r} from {self.url} within {self.timeout:g}s") from None
        finally:
            self._pending.pop(ref, None)

    # ------------------------------------------------------------------ inbound

    def _on_frame(self, link: Link, raw: bytes | str) -> None:
        if link is not self._link:
            return
        try:
            frame = _decode(raw)
        except msgspec.DecodeError:
            log.warning("wirehub client: the hub sent a frame that is not JSON: %.200r", raw)
            return
        if type(frame) is not dict:
            return
        op = frame.get("op")
        ref = frame.get("ref")
        if type(ref) is int or type(ref) is str:
            pending = self._pending.get(ref)
            if pending is not None and pending.link is link:
                del self._pending[ref]
                if not pending.quiet:
                    self._tap(frame)
                future = pending.future
                if future.done():  # timed out or cancelled meanwhile
                    return
                if op == "error":
                    future.set_exception(HubError(str(frame.get("code")), str(frame.get("message", "")), frame))
                    return
                if pending.on_reply is not None:
                    try:
                        pending.on_reply(frame)
                    except Exception as exc:  # pragma: no cover - a bug in a hook
                        future.set_exception(exc)
                        return
                future.set_result(frame)
                return
        self._tap(frame)
        if op == "msg":
            room = frame.get("room")
            if room is None:
                self._event(frame)  # a direct message
            else:
                self._room_msg(frame, room)
        elif op == "join" or op == "leave":
            if "client" in frame:
                self._event(frame)
        elif op == "presence_diff":
            self._presence_diff(frame)
        elif op == "bye":
            self._bye = frame
            link.close()  # the hub closes too; answer at once (a UDP session has no close)
        elif op == "error":
            self._last_error = frame
            log.debug("wirehub client: error from the hub: %s", frame)

    def _presence_diff(self, frame: dict) -> None:
        """A window of presence changes: one ``leave``/``join`` event each, leaves first (a
        client is in one list only); a ``presence`` field is the room's new mode."""
        name = frame.get("room")
        room = self._rooms.get(name)  # type: ignore[arg-type]
        mode = frame.get("presence")
        if room is not None and isinstance(mode, str):
            room.presence_mode = mode
        for op in ("leave", "join"):
            members = frame.get(op + "s")
            for member in members if isinstance(members, list) else ():
                if isinstance(member, dict) and "client" in member:
                    self._event({**member, "op": op, "room": name})

    def _tap(self, frame: dict) -> None:
        if self._on_frame_tap is not None:
            try:
                self._on_frame_tap(frame)
            except Exception:
                log.exception("wirehub client: on_frame callback failed")

    def _room_msg(self, frame: dict, name: Any) -> None:
        room = self._rooms.get(name)
        if room is None:
            return  # not (or no longer) a member
        seq = frame.get("seq")
        if type(seq) is not int:
            self._event(frame)
            return
        if room._repairing:
            room._seen = max(room._seen, seq)
            return  # the re-join in progress brings it again, in order
        if seq <= room.seq:
            self.duplicates_dropped += 1
            return
        if seq > room.seq + 1:
            # A gap on a live connection (a lost datagram, a hub that dropped frames of a
            # slow consumer): re-join from the last seq accepted; history fills it in order.
            if room._stuck_at != room.seq:
                self._repair(room)
                return
            # A re-join from here already failed to fill this gap (its reply or its backlog
            # was dropped too): report the gap and move on rather than try forever.
            room._stuck_at = None
            self._event(
                {"op": "recovery_failed", "room": room.name, "since": room.seq, "epoch": room.epoch, "seq": seq - 1, "new_epoch": room.epoch}
            )
        room.seq = seq
        self._event(frame)

    def _repair(self, room: Room) -> None:
        link = self._link
        if link is None or link.closed or not self._connected.is_set():
            return  # the reconnect will re-join anyway
        room._repairing = True
        room._seen = 0
        since, epoch = room.seq, room.epoch
        room._stuck_at = since
        frame: dict[str, Any] = {"op": "join", "room": room.name, "since": since}
        if epoch is not None:
            frame["epoch"] = epoch

        async def run() -> None:
            try:
                await self._request(frame, link=link, quiet=False, on_reply=lambda reply: self._joined(room, reply, since, epoch))
            except HubError as exc:
                self._rooms.pop(room.name, None)
                room.joined = False
                room._repairing = False
                self._event({"op": "rejoin_failed", "room": room.name, "code": exc.code, "message": exc.message})
            except asyncio.TimeoutError:
                # No reply (it was dropped too, or lost over UDP): what arrived meanwhile was
                # set aside; report the gap up to it rather than wait for traffic that may
                # never come.
                if room._repairing and room._seen > room.seq and self._rooms.get(room.name) is room:
                    self._event(
                        {"op": "recovery_failed", "room": room.name, "since": room.seq, "epoch": room.epoch, "seq": room._seen, "new_epoch": room.epoch}
                    )
                    room.seq = room._seen
                room._repairing = False
            except ClientError:
                room._repairing = False  # the connection dropped: the reconnect re-joins

        self._spawn(run())

    # ------------------------------------------------------------------ events

    def _event(self, item: Any) -> None:
        if self._ended:
            return
        self._events.append(item)
        waiter = self._event_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _set_state(self, state: str, reason: str | None) -> None:
        self.state = state
        if state == "connected":
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_state is not None:
            try:
                self._on_state(state, reason)
            except Exception:
                log.exception("wirehub client: on_state callback failed")

    # ------------------------------------------------------------------ connection loss

    def _on_lost(self, link: Link, exc: BaseException | None) -> None:
        if link is not self._link:
            return
        self._connected.clear()
        if self._closing:
            lost: ClientError = self._fatal or Disconnected("closed")
        else:
            lost = ConnectionLost(f"the connection to {self.url} dropped" + (f": {exc}" if exc else ""))
        for ref, pending in list(self._pending.items()):
            if pending.link is link:
                del self._pending[ref]
                if not pending.future.done():
                    pending.future.set_exception(lost)
        for room in self._rooms.values():
            room._repairing = False

    async def _supervise(self) -> None:
        """Wait for the link to end; reconnect (with backoff) or stop for good."""
        while True:
            link = self._link
            assert link is not None
            await asyncio.shield(link.done)
            if self._closing:
                return
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
                self._heartbeat_task = None
            bye = self._bye
            reason = str(bye.get("reason")) if bye is not None else "connection_lost"
            if (bye is not None and bye.get("reconnect") is False) or not self.reconnect:
                message = f"the hub said bye ({reason}) and asked not to reconnect" if bye is not None and bye.get("reconnect") is False else None
                self._stop(Disconnected(reason, message))
                return
            self._set_state("reconnecting", reason)
            attempt = 0
            low, high = self.backoff
            if reason == "shutdown":  # a restart: the hub spread its byes already; it is back soon
                high = max(low, min(high, RESTART_BACKOFF_CAP))
            while True:
                await asyncio.sleep(backoff_delay(attempt, low, high))
                attempt += 1
                if self._closing:
                    return
                try:
                    await self._open()
                    break
                except HubError as exc:
                    if exc.code in FATAL_HELLO_CODES:
                        self._stop(Disconnected(exc.code, f"the hub refused to take this client back: {exc.message}"))
                        return
                    log.info("wirehub client: reconnect to %s refused: %s", self.url, exc)
                except (ConnectError, ConnectionLost, asyncio.TimeoutError, OSError) as exc:
                    if self._fatal is not None or self._closing:
                        return
                    log.debug("wirehub client: reconnect to %s failed: %s", self.url, exc)
                    bye = self._bye
                    if bye is not None and bye.get("reconnect") is False:
                        reason = str(bye.get("reason"))
                        self._stop(Disconnected(reason, f"the hub said bye ({reason}) and asked not to reconnect"))
                        return
            self.reconnects += 1
            self._set_state("connected", reason)

    async def _beat(self, link: Link) -> None:
        """Ping every heartbeat; a connection that stops answering is dropped (and reconnected).

        Over UDP the hub may forget a session without a word (its own restart, or a session
        that went idle): when the client is in rooms, the beat asks for the presence of one of
        them instead of a ping, and ``not_member`` / ``unauthorized`` means "forgotten": the
        client starts a new session (hello, re-join with ``since``) as after any drop."""
        assert self.heartbeat
        misses = 0
        allowed = UDP_MISSES if link.kind == "udp" else 1
        while not link.closed:
            await asyncio.sleep(self.heartbeat)
            frame: dict[str, Any] = {"op": "ping"}
            if link.kind == "udp" and self._rooms:
                names = sorted(self._rooms)
                self._probe = (self._probe + 1) % len(names)
                frame = {"op": "presence", "room": names[self._probe]}
            try:
                await self._request(frame, link=link, quiet=True, timeout=min(self.timeout, max(self.heartbeat, 1.0)))
                misses = 0
            except HubError as exc:
                if exc.code in ("not_member", "unauthorized"):
                    log.info("wirehub client: the hub forgot this udp session (%s); starting a new one", exc.code)
                    link.abort()
                    return
            except asyncio.TimeoutError:
                misses += 1
                if misses >= allowed:
                    log.info("wirehub client: no answer to %d heartbeat(s) from %s; reconnecting", misses, self.url)
                    link.abort()
                    return
            except ClientError:
                return

    # ------------------------------------------------------------------ the end

    def _stop(self, error: Disconnected, end_error: BaseException | None | bool = True) -> None:
        """Stop for good: fail what waits, end the event stream (with ``error`` unless told)."""
        if self._fatal is not None:
            return
        self._fatal = error
        self._closing = True
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        link = self._link
        if link is not None and not link.closed:
            link.abort()
        self._event(_End(error if end_error is True else end_error))  # type: ignore[arg-type]
        self._ended = True
        self._set_state("closed", error.reason)
        self._connected.set()  # wake anyone waiting for the connection: they see _fatal
        self._cancel_tasks()

    def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for task in (self._supervisor, self._heartbeat_task, *self._tasks):
            if task is not None and task is not current and not task.done():
                task.cancel()

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class _Connecting:
    """What :func:`connect` returns: await it for a :class:`Client`, or use it as
    ``async with connect(...) as client:`` (closed on exit)."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self._url = url
        self._options = options
        self._client: Client | None = None

    async def _connect(self) -> Client:
        client = Client(self._url, **self._options)
        await client._start()
        self._client = client
        return client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._connect()

    async def __aexit__(self, *exc: Any) -> None:
        if self._client is not None:
            await self._client.close()


def connect(
    url: str,
    *,
    token: TokenSource = None,
    name: str | None = None,
    reconnect: bool = True,
    backoff: tuple[float, float] = (0.1, 10.0),
    ssl: Any = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    timeout: float = 10.0,
    heartbeat: float | None = None,
    on_state: Callable[[str, str | None], Any] | None = None,
    on_frame: Callable[[dict], Any] | None = None,
) -> _Connecting:
    """Connect to the hub at ``url`` and say hello. See :mod:`wirehub.client`."""
    parse_url(url)  # a bad URL is a ValueError here, before anything is awaited
    options = dict(
        token=token,
        name=name,
        reconnect=reconnect,
        backoff=backoff,
        ssl=ssl,
        max_frame=max_frame,
        timeout=timeout,
        heartbeat=heartbeat,
        on_state=on_state,
        on_frame=on_frame,
    )
    return _Connecting(url, options)
