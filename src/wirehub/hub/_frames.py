"""The hub's per-frame path on a local broker, for the frames that are most of the traffic:
``ping``, and ``pub`` (:meth:`InlineFrames.pub` is the hub's one ``pub`` on a local broker:
``HubApp._pub_local`` calls it, hooks or not).

Compiled with the accelerator (``hatch_build.py``, typed by ``_frames.pxd``) like the
framework's connection and framing code. :class:`~wirehub.hub.app.HubApp` makes one per
server; when no hook and no rate limit apply it is the frame handler itself, and every frame
but ping and pub goes to the app's ``_frame_command``, decoded once. Behaviour is the same as
``HubApp._frame_inline``'s, frame for frame.
"""

from __future__ import annotations

import time
from typing import Any

from . import protocol as wire

_Ping = wire.Ping
_Pub = wire.Pub
_decode = wire._decoder.decode
_ok = wire.ok
_pong = wire.pong
_data_bytes = wire.data_bytes
_time_ns = time.time_ns


class InlineFrames:
    """``frame(conn, data)`` for the hub: ping and pub here, the rest in the app."""

    __slots__ = ("app", "sessions", "table", "policies", "stats", "publish_now", "gated")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sessions = app.sessions
        self.table = app._room_table  # the rooms a local broker holds (None: ask the app)
        self.policies = app._policies
        self.stats = app.stats
        self.publish_now = getattr(app.broker, "publish_now", None)  # a local broker's
        self.gated = bool(app._gate)

    def __call__(self, conn: Any, data: bytes) -> None:
        try:
            cmd = _decode(data)
        except Exception:  # noqa: BLE001 - the app's path says what is wrong
            self.app._frame_inline(conn, data)
            return
        kind = type(cmd)
        if kind is _Ping:
            if not self.gated or self.sessions[conn.id].greeted:
                conn.send(_pong(cmd.ref))
                return
        elif kind is _Pub:
            session = self.sessions[conn.id]
            try:
                self.pub(session, cmd)
            except Exception:  # noqa: BLE001 - a server bug: logged, answered, counted
                self.app._failed(session, cmd)
            return
        self.app._frame_command(conn, cmd)

    def pub(self, s: Any, cmd: Any) -> None:
        """``pub`` on a local broker: published (and fanned out) now."""
        room = cmd.room
        table = self.table
        if table is not None and room in table and (not self.gated or s.greeted) and (s.claims is None or s.claims.may_publish(room)):
            # the common case, a room that exists and a client who may: only the data to check
            data = _data_bytes(cmd.data)
            if type(data) is str:
                self.app._error(s, "bad_frame", data, cmd.ref)
                self.stats.pub_refused += 1
                return
        else:
            data = self.app._pub_data(s, cmd)
            if data is None:
                self.stats.pub_refused += 1
                return
        self.stats.published += 1
        policy = self.policies.get(room)
        if policy is None:
            policy = self.app.policy(room)
        pub = self.publish_now(room, data, sender=s.client, ts=_time_ns() // 1_000_000, history=policy.history)
        if cmd.ref is not None:
            s.conn.send(_ok(cmd.ref, pub.seq))
