"""The hub's ``pub`` on a remote broker (Redis, NATS): the frame handler of a connection's
task, which starts a publication without a coroutine, and the acks, sent in frame order as
the broker answers.

Compiled with the accelerator (``hatch_build.py``, typed by ``_pipelined.pxd``) like the
local broker's frame path (``_frames.py``). :class:`~wirehub.hub.app.HubApp` makes one per
server when its broker is remote: :meth:`PipelinedFrames.frame` is then the app's frame
handler, :meth:`PipelinedFrames.start` its ``_pub_start`` and :meth:`PipelinedFrames.published`
the callback of the publication at the front of a connection's window. Behaviour is the same
compiled or not, frame for frame.

A connection's publications in flight are its window, ``Session.publishing``: a deque of
``(future, cmd, k)``, oldest first, where ``cmd`` is the ``pub`` (or the bytes of a reply
that waits for the acks before it, see ``HubApp._error``) and the future gives its seq: the
seq itself (``k`` is -1), or, shared by a batch of publications (a broker's
``publish_batched_nowait``), the batch's first seq, to which its ``k`` is added. The future
of the front alone has a callback: a broker answers a batch of publications in one go, and
one call answers every publication answered at the front.
"""

from __future__ import annotations

import collections
import functools
import time
from asyncio import CancelledError
from typing import Any

from . import protocol as wire
from .broker.base import BrokerError

_Pub = wire.Pub
_decode = wire._decoder.decode
_explain = wire.decode  # a frame the decoder refused: the ProtocolError that says why
_ok = wire.ok
_data_bytes = wire.data_bytes
_time = time.time
_deque = collections.deque
_partial = functools.partial

#: publications one connection may have in flight at a remote broker; its next one waits
#: (and its reads pause once its queue of frames fills) until the oldest is answered
PUB_WINDOW = 64
#: publications the whole node may have in flight; beyond it a connection waits for its own
PUB_IN_FLIGHT = 8192


class PipelinedFrames:
    """``frame(conn, data)`` for the hub on a remote broker, in the connection's task: a
    ``pub`` whose publication can start now starts here and None is returned; any other frame
    (and a ``pub`` that must wait for room in the window, or that hooks handle) is the
    coroutine the task awaits before the next."""

    __slots__ = ("app", "sessions", "broker", "policies", "stats", "publish", "batched", "runner", "rate", "gated", "table")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sessions = app.sessions
        self.broker = app.broker
        self.policies = app._policies
        self.stats = app.stats
        #: a broker's publish_nowait whose future gives the seq alone, when it has one (base.py)
        self.publish = getattr(app.broker, "publish_seq_nowait", None) or app.broker.publish_nowait
        #: a broker's publish whose future is shared by a batch (base.py), when it has one
        self.batched = getattr(app.broker, "publish_batched_nowait", None)
        self.runner = app._runner  # the hooks' (None: no hooks)
        self.rate = bool(app._rate)
        self.gated = bool(app._gate)
        self.table = app._room_table  # the rooms a broker holds in this process (a remote one: None)

    def __call__(self, conn: Any, data: bytes) -> Any:
        return self.frame(conn, data)

    def frame(self, conn: Any, data: bytes) -> Any:
        """The frame handler (the app's ``frame``: a bound method of a compiled class is
        called without an argument tuple, the instance itself would not be)."""
        session = self.sessions[conn.id]
        try:
            cmd = _decode(data)
        except Exception:  # noqa: BLE001 - not a command: the error reply says why
            cmd = _explain(data)
        if type(cmd) is _Pub and self.runner is None:
            window = session.publishing
            if window is None or (len(window) < PUB_WINDOW and self.broker.in_flight < PUB_IN_FLIGHT):
                app = self.app
                if not self.rate or app._admit(session, cmd.ref):
                    try:
                        if self.table is None and session.claims is None and (not self.gated or session.greeted):
                            # the common case, a client who may: only the data to check
                            body = bytes(cmd.data)
                            if not body.isascii() or 10 in body:  # (data_bytes's own tests)
                                body = _data_bytes(body)
                                if type(body) is str:
                                    app._error(session, "bad_frame", body, cmd.ref)
                                    body = None
                        else:
                            body = app._pub_data(session, cmd)
                        if body is None:
                            self.stats.pub_refused += 1
                        else:
                            self.start(session, cmd, body, None)
                    except BrokerError as exc:
                        app._broker_failed(session, cmd, exc)
                    except Exception:  # noqa: BLE001 - a server bug: logged, answered, counted
                        app._failed(session, cmd)
                return None
        return self.app._frame_async(session, cmd)

    def start(self, s: Any, cmd: Any, data: bytes, info: Any) -> None:
        """Start ``cmd``'s publication at the broker and put it in ``s``'s window (which the
        caller made sure has room)."""
        window = s.publishing
        if window is None:
            window = s.publishing = _deque()
        room = cmd.room
        policy = self.policies.get(room)
        if policy is None:
            policy = self.app.policy(room)
        k = -1
        batched = self.batched
        if batched is not None:
            future, k = batched(room, data, sender=s.client, ts=int(_time() * 1000), history=policy.history, info=info)
        else:
            future = self.publish(room, data, sender=s.client, ts=int(_time() * 1000), history=policy.history, info=info)
        if not window:  # the front of the window: its answer answers the client (published)
            future.add_done_callback(_partial(self.published, s))
        window.append((future, cmd, k))

    def published(self, s: Any, _: Any) -> None:
        """The publication at the front of ``s``'s window was answered: answer the client for
        every one answered at the front, in the order they were sent. The new front gets this
        callback, when one is left."""
        window = s.publishing
        if window is None:
            return
        send = s.conn.send
        published = 0
        while window:
            entry = window[0]
            future = entry[0]
            if not future.done():
                break
            window.popleft()
            cmd = entry[1]
            if type(cmd) is bytes:  # a reply queued behind the acks (see HubApp._error)
                s.held -= len(cmd)
                send(cmd)
                continue
            try:
                seq = future.result()  # the seq, a batch's first seq, or the Publication
            except CancelledError:
                continue
            except Exception as exc:  # noqa: BLE001 - a BrokerError, or a broker bug
                self.failed(s, cmd, exc)
                continue
            published += 1
            ref = cmd.ref
            if ref is not None:
                k = entry[2]
                if k >= 0:
                    seq += k
                elif type(seq) is not int:
                    seq = seq.seq
                send(_ok(ref, seq))
        self.stats.counted += published
        if window:
            window[0][0].add_done_callback(_partial(self.published, s))
        else:
            s.publishing = None

    def failed(self, s: Any, cmd: Any, exc: Exception) -> None:
        """The publication at the front failed: say so (it was the front: before the acks
        behind it)."""
        self.stats.pub_failed += 1
        if isinstance(exc, BrokerError):
            self.app._broker_failed(s, cmd, exc, now=True)
        else:  # a broker bug: logged within the same budget as HubApp._failed's
            self.app._pub_bug(s, cmd, exc)
