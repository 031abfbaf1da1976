"""The hub's side of application hooks: calling them (inline, awaited or in the thread pool,
within ``hook_timeout``), turning what they raise into ``error`` frames, and carrying out
what they answer. :class:`~wirehub.hub.app.HubApp` calls in here from its ops; with no hook
registered none of this runs and the frame path is the hookless one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec

from .._log import get_logger
from . import protocol as wire
from .hooks import _SAME, Connect, Context, Disconnect, Hook, Hooks, Join, Publish, Refresh, Reject, decode
from .protocol import MAX_NAME_LENGTH, MAX_ROOM_LENGTH

if TYPE_CHECKING:
    from .app import HubApp, Session
    from .protocol import Hello, Pub, Rpc
    from .protocol import Join as JoinCmd
    from .protocol import Refresh as RefreshCmd

log = get_logger("wirehub.hub")

#: what :meth:`HookRunner.call` returns when the hook refused or failed (the client was told)
FAILED: Any = object()
_encode = msgspec.json.Encoder().encode
MAX_USER_LENGTH = 200


class BadAnswer(Exception):
    """A hook answered something the hub cannot use (a bug in the application)."""


class HookRunner:
    def __init__(self, app: HubApp, hooks: Hooks) -> None:
        self.app = app
        self.hooks = hooks
        self.actions = app.actions
        self.timeout = app.config.hook_timeout or None

    def ctx(self, s: Session) -> Context:
        ctx = s.ctx
        if ctx is None:
            ctx = s.ctx = Context(s, self.actions)
        return ctx

    # ----------------------------------------------------------------- calling

    async def call(self, hook: Hook, s: Session, ref: Any, *args: Any) -> Any:
        """The hook's answer, or FAILED once the client got the error (or is closing)."""
        if not (hook.is_async or hook.blocking):
            return self.call_now(hook, s, ref, *args)
        ctx = self.ctx(s)
        try:
            if hook.blocking:
                return await asyncio.wait_for(self.app.blocking_pool.run(hook.fn, ctx, *args), self.timeout)
            return await asyncio.wait_for(hook.fn(ctx, *args), self.timeout)
        except Exception as exc:
            if s.publishing:  # earlier publications are answered first: replies keep frame order
                await asyncio.wait(tuple(f for f, *_ in s.publishing))
            self.failed(hook, s, ref, exc)
            return FAILED

    def call_now(self, hook: Hook, s: Session, ref: Any, *args: Any) -> Any:
        """:meth:`call` for a plain hook, without a coroutine."""
        try:
            return hook.fn(self.ctx(s), *args)
        except Exception as exc:
            self.failed(hook, s, ref, exc)
            return FAILED

    def failed(self, hook: Hook, s: Session, ref: Any, exc: Exception) -> None:
        """Tell the client why ``hook`` did not let its frame through; log what is the
        server's fault, within the traceback budget."""
        from .app import _tracebacks

        app = self.app
        if isinstance(exc, Reject):
            app._error(s, exc.code, exc.message, ref)
        elif isinstance(exc, Disconnect):
            s.conn.close("kicked_retry" if exc.reconnect else "kicked")
        elif isinstance(exc, asyncio.TimeoutError):
            if _tracebacks.allow():
                log.warning("hook_timeout", conn=s.client, hook=hook.name, timeout_s=self.timeout)
            app._error(s, "timeout", f"the application did not answer within hook_timeout ({self.timeout:g}s); try again later", ref, counts=False)
        else:
            if _tracebacks.allow():
                if isinstance(exc, BadAnswer):
                    log.error("hook_failed", conn=s.client, hook=hook.name, error=str(exc))
                else:
                    _log_traceback(s, hook, exc)
            app._error(s, "internal", "the application failed to handle this frame; it has been logged", ref)

    async def notify(self, hook: Hook, s: Session, *args: Any) -> None:
        """A notification (on_leave, on_disconnect): nothing to answer; failures are logged."""
        from .app import _tracebacks

        try:
            ctx = self.ctx(s)
            if hook.blocking:
                await asyncio.wait_for(self.app.blocking_pool.run(hook.fn, ctx, *args), self.timeout)
            elif hook.is_async:
                await asyncio.wait_for(hook.fn(ctx, *args), self.timeout)
            else:
                hook.fn(ctx, *args)
        except asyncio.TimeoutError:
            if _tracebacks.allow():
                log.warning("hook_timeout", conn=s.client, hook=hook.name, timeout_s=self.timeout)
        except Exception as exc:
            if _tracebacks.allow():
                _log_traceback(s, hook, exc)

    # ----------------------------------------------------------------- hooks

    async def connect(self, s: Session, cmd: Hello, hook: Hook) -> Connect | None:
        """on_connect: the accepted answer (applied to the session), or None when refused."""
        hello = {"name": cmd.name, "token": cmd.token, "data": decode(cmd.data)}
        answer = await self.call(hook, s, cmd.ref, hello)
        if answer is FAILED:
            return None
        if answer is None:
            return Connect()
        try:
            if type(answer) is not Connect:
                raise BadAnswer(f"{hook.name} returned {type(answer).__name__}; return None or Connect(...)")
            if answer.user is not None and not (type(answer.user) is str and 0 < len(answer.user) <= MAX_USER_LENGTH):
                raise BadAnswer(f"{hook.name}: Connect.user must be a string of 1 to {MAX_USER_LENGTH} characters, got {answer.user!r}")
            if answer.name is not None and not (type(answer.name) is str and 0 < len(answer.name) <= MAX_NAME_LENGTH):
                raise BadAnswer(f"{hook.name}: Connect.name must be a string of 1 to {MAX_NAME_LENGTH} characters, got {answer.name!r}")
            rooms = [answer.rooms] if isinstance(answer.rooms, str) else list(answer.rooms)
            if not all(type(r) is str and 0 < len(r) <= MAX_ROOM_LENGTH for r in rooms):
                raise BadAnswer(f"{hook.name}: Connect.rooms must be room names (1 to {MAX_ROOM_LENGTH} characters), got {rooms!r}")
            info = _info(hook, answer.info)
            if answer.data is not None:
                _encode(answer.data)  # fails here, not after the session changed
        except (BadAnswer, TypeError, ValueError) as exc:
            self.failed(hook, s, cmd.ref, exc if isinstance(exc, BadAnswer) else BadAnswer(f"{hook.name}: {exc}"))
            return None
        answer.rooms = rooms
        if answer.user is not None:
            s.user = answer.user
        if answer.name is not None:
            s.name = answer.name
        if info is not None:
            s.info = msgspec.json.decode(info)
        if answer.expires is not None:
            self.app._arm_expiry_at(s, float(answer.expires))
        return answer

    async def connected(self, s: Session, answer: Connect) -> None:
        """After welcome: the rooms on_connect joined the client to."""
        from .protocol import Join as JoinCmd

        for room in answer.rooms:  # type: ignore[union-attr]
            if not s.conn.open:
                return
            await self.app._join(s, JoinCmd(room=room), by_server=True)

    async def join(self, s: Session, cmd: JoinCmd, hook: Hook) -> Join | None:
        answer = await self.call(hook, s, cmd.ref, cmd.room, decode(cmd.data))
        if answer is FAILED:
            return None
        if answer is None:
            return Join()
        try:
            if type(answer) is not Join:
                raise BadAnswer(f"{hook.name} returned {type(answer).__name__}; return None or Join(...)")
            if answer.data is not None:
                _encode(answer.data)
            _info(hook, answer.info)
        except (BadAnswer, TypeError, ValueError) as exc:
            self.failed(hook, s, cmd.ref, exc if isinstance(exc, BadAnswer) else BadAnswer(f"{hook.name}: {exc}"))
            return None
        return answer

    async def refresh(self, s: Session, cmd: RefreshCmd, hook: Hook) -> bool:
        """on_refresh; False when it answered None (the hub's own handling applies)."""
        answer = await self.call(hook, s, cmd.ref, cmd.token)
        if answer is FAILED:
            return True
        if answer is None:
            return False
        if type(answer) is not Refresh:
            self.failed(hook, s, cmd.ref, BadAnswer(f"{hook.name} returned {type(answer).__name__}; return None or Refresh(...)"))
            return True
        if answer.expired:
            log.info("auth_expired", conn=s.client, user=s.user, by="on_refresh")
            s.conn.close("auth_expired")
            return True
        self.app._arm_expiry_at(s, None if answer.expires is None else float(answer.expires))
        exp = None if answer.expires is None else int(answer.expires)
        s.conn.send(wire.with_ref({"op": "refreshed", "exp": exp}, cmd.ref))
        return True

    async def rpc(self, s: Session, cmd: Rpc) -> None:
        if self.app._needs_hello(s, cmd.ref):
            return
        hook = self.hooks.methods.get(cmd.method)
        if hook is None:
            self.app._error(s, "no_such_method", f"no rpc method {cmd.method!r} on this server", cmd.ref)
            return
        answer = await self.call(hook, s, cmd.ref, decode(cmd.data))
        if answer is FAILED:
            return
        try:
            data = _encode(answer)
        except (TypeError, ValueError) as exc:
            self.failed(hook, s, cmd.ref, BadAnswer(f"{hook.name} returned a value that is not JSON: {exc}"))
            return
        s.conn.send(wire.result(cmd.ref, data))

    async def left(self, s: Session, room: str) -> None:
        hook = self.hooks.find("leave", room)
        if hook is not None:
            await self.notify(hook, s, room)

    async def disconnected(self, s: Session, reason: str) -> None:
        hook = self.hooks.single["disconnect"]
        if hook is not None:
            await self.notify(hook, s, reason)

    # ----------------------------------------------------------------- publishing

    def _published_data(self, hook: Hook, s: Session, cmd: Pub, data: bytes, answer: Any) -> tuple[bytes, bool, bytes | None] | None:
        """(data, keep in history, info) to publish for on_publish's answer; None after
        telling the client it failed."""
        if answer is None:
            return data, True, None
        try:
            if type(answer) is not Publish:
                raise BadAnswer(f"{hook.name} returned {type(answer).__name__}; return None or Publish(...)")
            out = data if answer.data is _SAME else _encode(answer.data)
            return out, bool(answer.history), _info(hook, answer.info)
        except (BadAnswer, TypeError, ValueError) as exc:
            self.failed(hook, s, cmd.ref, exc if isinstance(exc, BadAnswer) else BadAnswer(f"{hook.name}: {exc}"))
            return None

    def pub_local(self, s: Session, cmd: Pub) -> None:
        """``pub`` on a local broker with hooks registered (plain ones: inline)."""
        app = self.app
        if app._gate and not s.greeted and app._needs_hello(s, cmd.ref):
            return
        hook = self.hooks.find("publish", cmd.room)
        if hook is None:
            type(app)._pub_local(app, s, cmd)
            return
        data = app._pub_data(s, cmd)
        if data is None:
            app.stats.pub_refused += 1
            return
        answer = self.call_now(hook, s, cmd.ref, cmd.room, decode(data))
        if answer is FAILED:
            app.stats.pub_refused += 1
            return
        out = self._published_data(hook, s, cmd, data, answer)
        if out is None:
            app.stats.pub_refused += 1
            return
        app.stats.counted += 1
        data, keep, info = out
        if not keep:
            from .app import _drive  # (imported here: app imports this module)

            _drive(self.actions.publish_ephemeral(s, cmd.room, data, info))
            if cmd.ref is not None:
                s.conn.send(wire.with_ref({"op": "ok"}, cmd.ref))
            return
        pub = app.broker.publish_now(cmd.room, data, sender=s.client, ts=time.time_ns() // 1_000_000, history=app.policy(cmd.room).history, **_with(info))  # type: ignore[attr-defined]
        if cmd.ref is not None:
            s.conn.send(wire.ok(cmd.ref, pub.seq))

    async def pub_pipelined(self, s: Session, cmd: Pub) -> None:
        """``pub`` in a connection's task with hooks registered: on_publish runs before the
        publication is started, in frame order."""
        app = self.app
        hook = self.hooks.find("publish", cmd.room)
        if hook is None:
            await type(app)._pub_pipelined(app, s, cmd)
            return
        data = app._pub_data(s, cmd)
        if data is None:
            app.stats.pub_refused += 1
            return
        answer = await self.call(hook, s, cmd.ref, cmd.room, decode(data))
        if answer is FAILED or (out := self._published_data(hook, s, cmd, data, answer)) is None:
            app.stats.pub_refused += 1
            return
        data, keep, info = out
        if not keep:
            app.stats.counted += 1  # kept publications are counted when the broker answers
        if keep:
            await type(app)._pub_pipelined(app, s, cmd, data, info)
            return
        if s.publishing:  # after the publications before it, as for the sender
            await asyncio.wait(tuple(f for f, *_ in s.publishing))
        await self.actions.publish_ephemeral(s, cmd.room, data, info)
        if cmd.ref is not None:
            s.conn.send(wire.with_ref({"op": "ok"}, cmd.ref))


def _info(hook: Hook, info: Any) -> bytes | None:
    """An answer's ``info`` as JSON (None when unset)."""
    if info is None:
        return None
    try:
        return _encode(info)
    except (TypeError, ValueError) as exc:
        raise BadAnswer(f"{hook.name}: info is not JSON: {exc}") from None


def _with(info: bytes | None) -> dict[str, Any]:
    return {} if info is None else {"info": info}


def _log_traceback(s: Session, hook: Hook, exc: BaseException) -> None:
    log._log(40, "hook_failed", {"conn": s.client, "hook": hook.name}, exc_info=(type(exc), exc, exc.__traceback__))
