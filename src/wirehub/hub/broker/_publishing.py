"""The Redis broker's publications on their way: each queued in its room's batch of the
event-loop turn, the turn's batches sent together (up to CALL_ROOMS rooms per script call),
then answered from the call's reply.

Compiled with the accelerator (``hatch_build.py``, typed by ``_publishing.pxd``) like the
memory broker: :class:`~wirehub.hub.broker.redis.RedisBroker` is a subclass of
:class:`Publisher`, whose fields are the part of the broker's state this path reads, so that
compiled they are C fields. Everything else (the script call of a batch, the connections,
failures) is in ``redis.py``. Behaviour is the same compiled or not.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from typing import Any

import msgspec

from ..._log import get_logger
from ._resp import LinkLost
from .base import Publication

log = get_logger("wirehub.hub.broker.redis")

_Raw = msgspec.Raw
_encode = msgspec.msgpack.Encoder().encode
_partial = functools.partial

#: publications one batch (one stream entry, one pub/sub message) carries at most, and data bytes
BATCH_PUBLICATIONS = 512
BATCH_BYTES = 256 * 1024
#: the batches (rooms) of one script call at most, and their data bytes (a batch larger than
#: that goes alone): bounds how long one call holds Redis (about 30 µs of Redis CPU a room)
CALL_ROOMS = 32
CALL_BYTES = 256 * 1024


class Batch:
    """The publications of one room queued in this event-loop turn."""

    __slots__ = ("room", "history", "bodies", "answers", "singles", "shared", "publications", "size", "newest")

    def __init__(self, room: str, history: Any) -> None:
        self.room = room
        self.history = history
        self.bodies: list[tuple[Any, ...]] = []  # [room, sender, ts, data(, info, exclude)]
        #: the same order: each publication's own future, which gives its seq (or, at the
        #: indexes in ``publications``, its Publication); None for one that shares ``shared``
        self.answers: list[asyncio.Future[Any] | None] = []
        self.singles = 0  # publications with a future of their own
        #: the future of the publications queued by publish_batched_nowait: it gives the
        #: batch's first seq (None while there are none)
        self.shared: asyncio.Future[int] | None = None
        self.publications: set[int] | None = None
        self.size = 0
        self.newest = 0  # the newest ts of its publications

    def fail(self, error: BaseException) -> None:
        """Every publication of the batch fails with ``error``."""
        shared = self.shared
        if shared is not None and not shared.done():
            shared.set_exception(error)
        if self.singles:
            for future in self.answers:
                if future is not None and not future.done():
                    future.set_exception(error)


class Publisher:
    """The publish path of :class:`~wirehub.hub.broker.redis.RedisBroker` (its base class)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, from start()
        self._cmd: Any = None  # the command connection (auto-pipelined), while there is one
        self._up = False  # both connections are established and subscribed
        self._closing = False
        self.in_flight = 0  # publications queued or sent and not answered
        self._batches: dict[str, Batch] = {}  # room -> its publications of this event-loop turn
        self._idle = asyncio.Event()  # no call and no publication under way (close() waits for it)
        self._idle.set()
        self._epoch_seed = secrets.token_hex(6).encode()  # new epochs: this seed and a counter (_new_epoch)
        self._epochs = 0
        #: room -> what its part of a script call sends alike (see RedisBroker._publish_head)
        self._publish_heads: dict[str, tuple[Any, bytes, bytes, bytes]] = {}
        #: the publish script call's command and script (RESP bulks; set by the broker)
        self._evalsha = b""
        self.publish_calls = 0  # publish script calls sent (each for up to CALL_ROOMS batches)

    def _new_epoch(self) -> str:
        """The epoch a script gives a room whose stream it finds gone: unique to this process
        and call, without a random draw (a getrandom(2) call) per script call."""
        self._epochs += 1
        return (b"%b%x" % (self._epoch_seed, self._epochs)).decode()

    def publish_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: Any, info: bytes | None = None, exclude: str = "") -> asyncio.Future[Publication]:
        """Queue a publication: the publications of one room in one event-loop turn go to
        Redis as one batch (one EVALSHA, one stream entry, one message to the subscribed
        nodes), every batch of the turn in one write on the auto-pipelined connection. Redis
        runs them in call order (see redis.py's docstring)."""
        return self.publish_seq_nowait(room, data, sender=sender, ts=ts, history=history, info=info, exclude=exclude, publication=True)

    def publish_seq_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: Any, info: bytes | None = None, exclude: str = "", publication: bool = False) -> asyncio.Future[Any]:
        """:meth:`publish_nowait` whose future gives the publication's ``seq`` alone (with
        ``publication``, the :class:`Publication`): no Publication is built for a caller that
        only acks (see the Broker protocol)."""
        refused = self._refused(room)
        if refused is not None:
            return refused
        # the loop cached at start: asyncio.get_running_loop() costs a getpid() system call
        future = (self._loop or asyncio.get_running_loop()).create_future()
        self._queue(room, data, sender, ts, history, info, exclude, publication, future)
        return future

    def publish_batched_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: Any, info: bytes | None = None, exclude: str = "") -> tuple[asyncio.Future[int], int]:
        """:meth:`publish_seq_nowait` without a future of its own (what the hub calls for the
        acks): returns ``(future, k)``, where ``future`` is shared by the publications of
        its batch and gives the seq of the batch's first one; this one's seq is that plus
        ``k``. It fails as the batch does."""
        return self._batched(room, data, sender, ts, history, info, exclude)

    def publish_batched_now(self, room: str, data: bytes, sender: str, ts: int, history: Any) -> tuple[asyncio.Future[int], int]:
        """``publish_batched_nowait(room, data, sender=sender, ts=ts, history=history)``,
        its arguments by position (no keywords to parse: the hub's hot path)."""
        return self._batched(room, data, sender, ts, history, None, "")

    def _batched(self, room: str, data: bytes, sender: str, ts: int, history: Any, info: bytes | None, exclude: str) -> tuple[asyncio.Future[int], int]:
        refused = self._refused(room)
        if refused is not None:
            return refused, 0
        return self._queue(room, data, sender, ts, history, info, exclude, False, None)

    def _refused(self, room: str) -> Any:
        """None while publications can go; otherwise a future failed with the reason."""
        if self._cmd is not None and not self._closing and self._up:
            return None
        future = (self._loop or asyncio.get_running_loop()).create_future()
        future.set_exception(self._refusal(f"publish to {room!r}"))
        return future

    def _queue(self, room: str, data: bytes, sender: str, ts: int, history: Any, info: bytes | None, exclude: str, publication: bool,
               future: Any) -> Any:
        """Put a publication and its future in ``room``'s batch of this turn; a full batch
        goes now. Without a future (None), the publication shares the batch's: returns
        ``(that future, its index in the batch)``."""
        body = data if type(data) is bytes else bytes(data)
        # an application hook's info and exclude, when set, make it [room, sender, ts, data, info, exclude]
        entry = (room, sender, ts, body, info, exclude) if info is not None or exclude else (room, sender, ts, body)
        batches = self._batches
        batch = batches.get(room)
        if batch is None:
            if not batches:
                (self._loop or asyncio.get_running_loop()).call_soon(self._send_batches)
            batch = batches[room] = Batch(room, history)
            self._idle.clear()  # (until this batch is answered: it counts in in_flight)
        k = len(batch.answers)
        batch.bodies.append(entry)
        batch.answers.append(future)
        if future is None:
            shared = batch.shared
            if shared is None:
                shared = batch.shared = (self._loop or asyncio.get_running_loop()).create_future()
            answer = (shared, k)
        else:
            batch.singles += 1
            if publication:
                if batch.publications is None:
                    batch.publications = set()
                batch.publications.add(k)
            answer = None
        batch.size += len(body)
        newest = ts
        if newest > batch.newest:
            batch.newest = newest
        self.in_flight += 1
        if batch.size >= BATCH_BYTES or k + 1 >= BATCH_PUBLICATIONS:
            del batches[room]  # full: it goes now (a call of its own), the room's next publications start a new one
            self._send_call([batch])
        return answer

    def _send_batches(self) -> None:
        """The batches of this turn go (scheduled by the first publication of the turn): in
        script calls of up to CALL_ROOMS batches and CALL_BYTES of data each."""
        batches, self._batches = self._batches, {}
        group = []
        size = 0
        for batch in batches.values():
            if group and (len(group) >= CALL_ROOMS or size + batch.size > CALL_BYTES):
                self._send_call(group)
                group = []
                size = 0
            group.append(batch)
            size += batch.size
        if group:
            self._send_call(group)

    def _send_call(self, batches: list) -> None:
        """One script call (PUBLISH_LUA) for ``batches`` (of different rooms), queued on the
        command connection. A batch that cannot be encoded (a bug: a value that does not
        encode) fails alone."""
        cmd = self._cmd
        if cmd is None:
            self._answered(batches, LinkLost("is not connected", sent=False))
            return
        keys = []
        args = []
        sent = []
        for batch in batches:
            try:
                part = self._part(batch)
            except Exception as exc:
                log.exception("redis_publish_failed", room=batch.room)
                self.in_flight -= len(batch.answers)
                self._settle()
                batch.fail(exc)
                continue
            sent.append(batch)
            keys.append(part[0])
            args.extend(part[1:])
        k = len(sent)
        if not k:
            return
        counter = b"%d" % (self._epochs + 1)  # the call's first new epoch (one per room: _part)
        self._epochs += k
        seed = self._epoch_seed
        nkeys = b"%d" % (2 * k)
        self.publish_calls += 1
        # EVALSHA sha, the number of keys, each room's keys; ARGV: the epoch seed and counter
        # (after the keys), then each room's policy (size, ttl, meta ttl), ts, n, blob, channel
        keys.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(seed), seed, len(counter), counter))
        cmd.then_encoded(_partial(self._answered, sent), b"".join(
            [b"*%d\r\n%b$%d\r\n%b\r\n" % (5 + 9 * k, self._evalsha, len(nkeys), nkeys)] + keys + args))

    def _part(self, batch: Batch) -> tuple:
        """``batch``'s part of a script call: its keys, then its arguments up to the blob,
        the blob, and the rest (RESP bulks, the blob's not copied)."""
        bodies = batch.bodies
        n = len(bodies)
        room, history = batch.room, batch.history
        head = self._publish_heads.get(room)
        if head is None or (head[0] is not history and head[0] != history):
            head = self._publish_head(room, history)
        blob = _encode(bodies[0]) if n == 1 else _encode(bodies)
        newest = b"%d" % batch.newest
        count = b"%d" % n
        return (head[1], b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n" % (head[2], len(newest), newest, len(count), count, len(blob)),
                blob, b"\r\n" + head[3])

    def _answered(self, batches: list, reply: Any) -> None:
        """Redis answered the script call of ``batches`` (``reply``: ``[last seq, epoch]``
        per batch, or in its place the error of a room that failed alone; or the exception
        saying why the call failed): answer each of their publications."""
        n = 0
        for batch in batches:
            n += len(batch.answers)
        self.in_flight -= n
        self._settle()
        if isinstance(reply, BaseException):
            self._publish_failed(batches, reply)
            return
        for i in range(len(batches)):
            last = reply[2 * i]
            if isinstance(last, BaseException):  # this room failed (and wrote nothing)
                self._publish_failed([batches[i]], last)
            else:
                self._answer(batches[i], int(last), reply[2 * i + 1])

    def _answer(self, batch: Batch, last: int, epoch_b: bytes) -> None:
        """``batch`` was published, its last seq ``last``: answer each of its publications."""
        answers = batch.answers
        n = len(answers)
        first = last - n + 1
        shared = batch.shared
        if shared is not None and not shared.done():
            shared.set_result(first)
        if not batch.singles:
            return
        publications = batch.publications
        room, bodies = batch.room, batch.bodies
        epoch = epoch_b.decode() if publications is not None else ""
        for k in range(n):
            future = answers[k]
            if future is None or future.done():
                continue
            seq = first + k
            if publications is None or k not in publications:
                future.set_result(seq)
                continue
            body = bodies[k]
            # (room, seq, epoch, data, sender, ts[, info, exclude]): Publication's fields in order
            if len(body) == 4:
                future.set_result(Publication(room, seq, epoch, _Raw(body[3]), body[1], body[2]))
            else:
                future.set_result(Publication(room, seq, epoch, _Raw(body[3]), body[1], body[2], body[4], body[5]))

    # provided by the broker (redis.py)
    def _refusal(self, what: str) -> Any:
        raise NotImplementedError

    def _publish_head(self, room: str, history: Any) -> tuple[Any, bytes, bytes, bytes]:
        raise NotImplementedError

    def _settle(self) -> None:
        raise NotImplementedError

    def _publish_failed(self, batches: list, exc: BaseException) -> None:
        raise NotImplementedError
