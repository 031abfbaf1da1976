"""Programming the hub in Python: hooks that decide what clients may do, and what the server
does in their place.

::

    from wirehub.hub import Hooks, Join, Publish, Reject

    hub = Hooks()

    @hub.on_join("chat.*")
    async def join(ctx, room, data):
        if not await may_enter(ctx.user, room):
            raise Reject("app.not_invited", f"you are not invited to {room}")
        return Join(info={"role": "member"})

``wirehub serve --app module:hub`` loads it; ``Hub(hooks=hub)`` (or the same decorators on
an embedded :class:`~wirehub.hub.Hub`) uses it in your own process. ``docs/hub.md`` has the
whole API: every hook, what it may answer, timeouts, errors and ordering.

A hook is a plain function (run inline: it must be quick), an ``async def`` (awaited within
``hook_timeout``), or a plain function marked ``blocking=True`` (run in the bounded thread
pool of ``blocking_threads``, within ``hook_timeout``). A connection's frames keep their
order while its hooks run: the next frame waits for the hook.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import msgspec

from .auth import glob_match

if TYPE_CHECKING:
    from .actions import Actions
    from .app import Session
    from .auth import Claims

#: An application's own error codes: ``app.`` then 1 to 60 letters, digits, ``_``, ``-`` or ``.``
APP_CODE = re.compile(r"app\.[A-Za-z0-9_.\-]{1,60}\Z")
#: SPEC codes a hook may also refuse with (they mean the same as when the hub refuses)
REFUSAL_CODES = frozenset(
    ("bad_frame", "unauthorized", "forbidden", "not_member", "room_full", "limit", "rate_limited", "no_such_client", "no_such_method")
)
MAX_MESSAGE = 1024  # characters of a Reject message sent to the client


class Reject(Exception):
    """Raised by a hook to refuse what the client asked: the client gets
    ``{"op":"error","code":CODE,"message":MESSAGE}`` (with the frame's ``ref``).

    ``code`` is ``forbidden`` by default; it may be another SPEC code that refuses
    (``bad_frame``, ``unauthorized``, ``not_member``, ``room_full``, ``limit``...) or one of
    the application's own, which must start with ``app.`` (``app.banned``, ``app.too_long``).
    """

    def __init__(self, code: str = "forbidden", message: str | None = None) -> None:
        if not isinstance(code, str) or not (code in REFUSAL_CODES or APP_CODE.match(code)):
            raise ValueError(
                f"Reject code {code!r}: use 'app.' and 1 to 60 letters, digits, '_', '-' or '.' (app.banned), "
                f"or one of {', '.join(sorted(REFUSAL_CODES))}"
            )
        self.code = code
        self.message = (message if message is not None else f"refused by the application ({code})")[:MAX_MESSAGE]
        super().__init__(code, self.message)


class Disconnect(Exception):
    """Raised by a hook to close the client's connection: it gets ``bye`` ``kicked`` with
    ``reconnect`` as given (False by default: a client told to go should not come back)."""

    def __init__(self, reconnect: bool = False) -> None:
        super().__init__("kicked")
        self.reconnect = reconnect


_SAME: Any = object()


@dataclass(slots=True)
class Connect:
    """What ``on_connect`` may answer instead of None (accept as is).

    ``user`` replaces the connection's user (the token's ``sub``, or ``anon-<client id>``);
    ``name`` its display name; ``info`` (any JSON value) is shown with the connection in
    presence; ``rooms`` are joined for it right after ``welcome`` (it gets a ``joined`` for
    each, without ``ref``); ``expires`` (Unix time, seconds) closes it with ``bye``
    ``auth_expired`` then unless a ``refresh`` extends it; ``data`` goes to the client in
    ``welcome``."""

    user: str | None = None
    name: str | None = None
    info: Any = None
    rooms: Iterable[str] = ()
    expires: float | None = None
    data: Any = None


@dataclass(slots=True)
class Join:
    """What ``on_join`` may answer instead of None (accept as is): ``data`` goes to the
    client in ``joined``; ``info`` (any JSON value) is this member's info in the room's
    presence (instead of the connection's)."""

    data: Any = None
    info: Any = None


@dataclass(slots=True)
class Publish:
    """What ``on_publish`` may answer instead of None (publish as sent): ``data`` to publish
    instead; ``history=False`` to deliver it to the members now without keeping it (no
    ``seq``: nobody recovers it later); ``info`` (any JSON value) travels with it as the
    ``msg``'s ``info``."""

    data: Any = _SAME
    history: bool = True
    info: Any = None


@dataclass(slots=True)
class Refresh:
    """What ``on_refresh`` may answer instead of None (the hub's own handling: the token is
    verified when auth is on): ``expires`` (Unix time, seconds, or None for never) is the
    connection's new expiry; ``expired=True`` ends it now with ``bye`` ``auth_expired``."""

    expires: float | None = None
    expired: bool = False


@dataclass(frozen=True, slots=True)
class Hook:
    """One registered hook: the function and how it runs."""

    fn: Callable[..., Any]
    name: str
    is_async: bool
    blocking: bool
    pattern: str = "*"

    @classmethod
    def make(cls, fn: Callable[..., Any], kind: str, blocking: bool, pattern: str = "*") -> Hook:
        if not callable(fn):
            raise TypeError(f"{kind}: {fn!r} is not callable")
        is_async = inspect.iscoroutinefunction(fn)
        if blocking and is_async:
            raise TypeError(f"{kind}: {fn.__qualname__} is async def; blocking=True is for plain functions that block")
        return cls(fn, f"{kind}:{getattr(fn, '__qualname__', repr(fn))}", is_async, bool(blocking), pattern)


class Context:
    """What a hook knows about the connection it runs for.

    ``client`` (its id), ``user``, ``name``, ``transport`` (``tcp``, ``ws``...), ``peer``
    (``host:port``), ``claims`` (the verified token's :class:`~wirehub.hub.auth.Claims`, or
    None), ``info`` (set by ``on_connect``), ``rooms`` (the rooms it is in, a copy), and
    ``state``: a dict of your own that lives as long as the connection. ``hub`` is the
    server's actions (``publish``, ``send``, ``join``, ``disconnect``...)."""

    __slots__ = ("_s", "state", "hub")

    def __init__(self, session: Session, hub: Any) -> None:
        self._s = session
        self.state: dict[str, Any] = {}
        self.hub = hub

    client = property(lambda self: self._s.client)
    user = property(lambda self: self._s.user)
    name = property(lambda self: self._s.name)
    info = property(lambda self: self._s.info)
    transport = property(lambda self: self._s.conn.transport)
    peer = property(lambda self: self._s.conn.peer)
    rooms = property(lambda self: set(self._s.rooms))

    @property
    def claims(self) -> Claims | None:
        return self._s.claims

    def __repr__(self) -> str:
        return f"<Context client={self.client} user={self.user!r} transport={self.transport}>"


class Hooks:
    """The application hooks of a hub. Register with the decorators, then serve with
    ``wirehub serve --app module:hooks`` or ``Hub(hooks=hooks)``. Once serving, the server's
    actions (:class:`Actions`) are available on this object too: ``await hooks.publish(...)``."""

    def __init__(self) -> None:
        #: on_connect, on_refresh, on_disconnect (None when not registered)
        self.single: dict[str, Hook | None] = {"connect": None, "refresh": None, "disconnect": None}
        #: on_join, on_publish, on_leave, in registration order
        self.patterned: dict[str, list[Hook]] = {"join": [], "publish": [], "leave": []}
        self.methods: dict[str, Hook] = {}  # on_rpc
        self._found: dict[tuple[str, str], Hook | None] = {}
        self._actions: Actions | None = None

    # ----------------------------------------------------------------- registering

    def on_connect(self, fn: Callable[..., Any] | None = None, *, blocking: bool = False) -> Any:
        """``(ctx, hello) -> None | Connect``, on ``hello``: ``hello`` is a dict with the
        frame's ``name``, ``token`` and ``data``. With it registered, ``hello`` is required
        before anything else (as with auth)."""
        return self._single("connect", fn, blocking)

    def on_refresh(self, fn: Callable[..., Any] | None = None, *, blocking: bool = False) -> Any:
        """``(ctx, token) -> None | Refresh``, on ``refresh``."""
        return self._single("refresh", fn, blocking)

    def on_disconnect(self, fn: Callable[..., Any] | None = None, *, blocking: bool = False) -> Any:
        """``(ctx, reason) -> None``: the connection is gone (best effort: a node can die)."""
        return self._single("disconnect", fn, blocking)

    def on_join(self, pattern: Any = "*", *, blocking: bool = False) -> Any:
        """``(ctx, room, data) -> None | Join``, on ``join`` of a room matching ``pattern``
        (a glob, as in tokens and ``--rooms``; the first registered pattern that matches wins)."""
        return self._patterned("join", pattern, blocking)

    def on_publish(self, pattern: Any = "*", *, blocking: bool = False) -> Any:
        """``(ctx, room, data) -> None | Publish``, on ``pub`` to a room matching ``pattern``."""
        return self._patterned("publish", pattern, blocking)

    def on_leave(self, pattern: Any = "*", *, blocking: bool = False) -> Any:
        """``(ctx, room) -> None``: the client left a room matching ``pattern`` (by ``leave``,
        a server-side leave, or disconnecting)."""
        return self._patterned("leave", pattern, blocking)

    def on_rpc(self, method: str, *, blocking: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``(ctx, data) -> value``, for ``{"op":"rpc","method":METHOD,...}``: the value
        (any JSON value) is the ``result``'s ``data``; raise :class:`Reject` to refuse."""
        if not isinstance(method, str) or not method:
            raise TypeError(f"on_rpc needs a method name, got {method!r}: @hooks.on_rpc('history')")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if method in self.methods:
                raise ValueError(f"rpc method {method!r} already has a handler ({self.methods[method].name})")
            self.methods[method] = Hook.make(fn, f"rpc {method}", blocking)
            return fn

        return register

    def _single(self, kind: str, fn: Callable[..., Any] | None, blocking: bool) -> Any:
        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            known = self.single[kind]
            if known is not None:
                raise ValueError(f"on_{kind} is already registered ({known.name})")
            self.single[kind] = Hook.make(f, kind, blocking)
            return f

        return register(fn) if fn is not None else register

    def _patterned(self, kind: str, pattern: Any, blocking: bool) -> Any:
        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            self.patterned[kind].append(Hook.make(f, kind, blocking, pattern))
            self._found.clear()
            return f

        if callable(pattern):  # @hooks.on_join with no pattern
            fn, pattern = pattern, "*"
            return register(fn)
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"on_{kind} takes a room glob, got {pattern!r}: @hooks.on_{kind}('chat.*')")
        return register

    # ----------------------------------------------------------------- for the hub

    def all(self) -> list[Hook]:
        found = [h for h in self.single.values() if h is not None]
        for hooks in self.patterned.values():
            found += hooks
        return found + list(self.methods.values())

    def __bool__(self) -> bool:
        return bool(self.all())

    @property
    def need_task(self) -> bool:
        """True when some hook awaits (async or blocking): frames are then handled in each
        connection's task, as with a remote broker."""
        return any(h.is_async or h.blocking for h in self.all())

    def find(self, kind: str, room: str) -> Hook | None:
        """The hook of ``kind`` (``join``, ``publish``, ``leave``) for ``room``, or None."""
        key = (kind, room)
        found = self._found.get(key, _SAME)
        if found is _SAME:
            found = next((h for h in self.patterned[kind] if glob_match(h.pattern, room)), None)
            if len(self._found) >= 10_000:
                self._found.clear()
            self._found[key] = found
        return found  # type: ignore[return-value]

    def bind(self, actions: Actions | None) -> None:
        self._actions = actions

    def __getattr__(self, name: str) -> Any:
        # the server's actions, once serving: hooks.publish(...), hooks.send(...)...
        if name in _ACTION_NAMES:
            actions = self.__dict__.get("_actions")
            if actions is None:
                raise RuntimeError(f"hooks.{name}() works once the hub is serving with these hooks (from a hook, or after start)")
            return getattr(actions, name)
        raise AttributeError(name)


_ACTION_NAMES = frozenset(("publish", "send", "join", "leave", "disconnect", "presence", "history"))


def decode(raw: Any) -> Any:
    """A frame's raw JSON ``data`` as a Python value (None when absent)."""
    return None if raw is None else msgspec.json.decode(raw)
