"""The hub's per-frame path on a local broker, for the frames that are most of the traffic:
``ping`` and ``pub`` to a room that exists, by a client who may publish there.

Compiled with the accelerator (``hatch_build.py``, typed by ``_frames.pxd``) like the
framework's connection and framing code; :class:`~wirehub.hub.app.HubApp` picks it when no hook
and no rate limit apply, and every other frame or case goes to the app's own
``_frame_inline``. Behaviour is the same as that method's, frame for frame.
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
    """``frame(conn, data)`` for the hub: ping and the common pub here, the rest in the app."""

    __slots__ = ("app", "sessions", "table", "policies", "stats", "publish_now", "gated", "other")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sessions = app.sessions
        self.table = app._room_table  # the rooms a local broker holds (None: ask the app)
        self.policies = app._policies
        self.stats = app.stats
        self.publish_now = app.broker.publish_now
        self.gated = bool(app._gate)
        self.other = app._frame_inline

    def __call__(self, conn: Any, data: bytes) -> None:
        try:
            cmd = _decode(data)
        except Exception:  # noqa: BLE001 - the app's path says what is wrong
            self.other(conn, data)
            return
        kind = type(cmd)
        if kind is _Ping:
            session = self.sessions[conn.id]
            if not self.gated or session.greeted:
                conn.send(_pong(cmd.ref))
                return
        elif kind is _Pub:
            session = self.sessions[conn.id]
            room = cmd.room
            table = self.table
            if (table is not None and room in table and (not self.gated or session.greeted)
                    and session.claims is None):
                data = _data_bytes(cmd.data)
                if type(data) is bytes:
                    self.stats.published += 1
                    try:
                        policy = self.policies.get(room)
                        if policy is None:
                            policy = self.app.policy(room)
                        pub = self.publish_now(room, data, sender=session.client, ts=_time_ns() // 1_000_000,
                                               history=policy.history)
                    except Exception:  # noqa: BLE001 - a server bug: logged, answered, counted
                        self.app._failed(session, cmd)
                        return
                    ref = cmd.ref
                    if ref is not None:
                        conn.send(_ok(ref, pub.seq))
                    return
        self.app._frame_command(conn, cmd)
