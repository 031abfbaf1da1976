"""The NATS broker: a fleet of hub nodes sharing rooms through one NATS system (nats-py).

What lives where (``P`` is the ``prefix``; room and client names are arbitrary strings, so
every name that goes into a subject or a key is a *token*: ``r`` + unpadded lowercase
base32 of its UTF-8, or ``x`` + sha256 hex when that would be longer than 400 characters;
the real name always travels in the message itself):

``P_HISTORY`` (JetStream stream, subjects ``P.h.>`` and ``P.meta``)
    One subject per room, ``P.h.<room>``. Each message holds one or more consecutive
    publications of the room: a JSON head ``[room, seq, epoch, sender, ts, publish-id]``
    (``seq`` the last publication's, ``sender``/``ts`` too), a newline, then the
    publication's data bytes untouched; a message of several adds a seventh item,
    ``[[sender, ts, size], ...]`` for each publication oldest first (they hold ``seq - n + 1``
    to ``seq``), and the data bytes follow one after another. (A one-publication message is
    as it always was; a node of an older version cannot read the longer head, so a fleet
    is upgraded all at once.) The stream has no per-subject or age limit of its own:
    history policies differ per room and the broker only learns them per call, so the *size*
    and *ttl* of a room are enforced when reading, and whenever a room's ``seq`` passes a
    multiple of ``max(size, 32)`` the publisher trims the subject (in the background, one
    trim per room at a time): when it knows where the oldest message still needed starts
    (it keeps the stream sequences of the last 16 messages it appended one after the other)
    it purges the subject below that message, so the room keeps about the last ``size``
    publications; otherwise it purges-by-subject with ``keep=max(size, 1)`` messages. Either
    way a room holds at most about ``size + max(size, 32)`` messages of at most 64 KiB of
    data each (or one larger publication). The newest message of a room (its *head*) is
    never removed: it carries the room's ``seq`` and epoch, so ``seq`` never goes back.
    ``P.meta`` holds one message, the stream's *generation*: a random id written
    create-if-absent when the stream is created (or found without it).

Sequence: optimistic concurrency on the head. An append reads the head (or uses the head it
    cached from its own last append to that room), writes the message after it with
    ``Nats-Expected-Last-Subject-Sequence: <head's stream sequence>`` (0 for an empty
    subject), and on JetStream's *wrong last sequence* error re-reads the head and retries,
    renumbering its publications. JetStream applies the check and the append atomically, so
    across all nodes each ``seq`` is written exactly once and a room's stream order is its
    ``seq`` order. An append whose acknowledgement was lost is recognised on the retry by
    its publish id in the head, so it is never written twice.

Publishing (``publish_nowait``; ``publish`` awaits it, on the same path): a publication goes
    into its room's queue on this node, in call order, and is answered by a future. Each
    room with queued publications has one sender task, which appends one message at a time:
    everything queued when it starts a message goes into it (up to ``publish_batch``
    publications and 64 KiB of data), and what arrives while that message is unacknowledged
    waits for the next one. So a room has at most one message in flight per node (the
    expected-last-sequence of the next message is known only from the previous one's ack,
    and predicting stream sequences fails whenever another room or node writes to the
    stream), yet one room's rate is not bound by the round trip: the busier the room, the
    more publications each message carries. Rooms are pipelined against each other: up to
    ``publish_window`` messages (all rooms together) are unacknowledged at once, their acks
    coming back to one inbox subscription of this connection, matched to futures; messages
    started in one event-loop turn leave in one socket write (nats-py queues commands and
    its flusher task writes all of them on the next turn). When the connection goes, the
    messages in flight fail at once with ``maybe_applied`` and the publications not yet sent
    fail as not applied; nothing is retried after the caller is told. Backpressure: the
    caller (the hub) bounds what it keeps in flight; ``in_flight`` counts this node's
    publications from the call until the answer, and past ``max_in_flight`` (65,536) a
    publication is refused at once (not applied) instead of queued. A publication whose
    future the caller cancelled before it was sent is dropped.

Epoch: a room's messages carry its epoch; an empty room's epoch is derived from the stream's
    generation and the room name (``sha256(generation, room)``): every node computes the same
    value without a round trip or a stored key, an unpublished room leaves nothing behind,
    and when the history is lost (stream deleted or purged, data directory gone) the
    generation marker goes with it, a new one is written, and every room gets a new epoch.
    A NATS restart with file storage keeps stream, generation and epochs.

Fan-out: the stream *republishes* every stored message to ``P.r.<room>`` (JetStream
    RePublish): the server does it after storing, in stream order, so every subscribed node
    gets each room's publications in ``seq`` order even with many concurrent publishers, and
    a publication that is stored is fanned out even if its publisher dies right after. A
    message of several publications reaches a node as one and is handed to the hub in one
    event-loop turn (so the hub writes them to its subscribers in one write each); messages
    that arrive in one socket read are handed over in one turn too (nats-py's reader queues
    them all for the room's subscription task, which delivers them without yielding).
    (A core publish from the publisher after its JetStream ack could overtake another
    node's and arrive out of order; an ordered consumer per room per node would cost a
    JetStream consumer per room.) Room events go to the same core subject with no history,
    so one subscription per room per node carries both. A node tracks the last ``seq`` it
    delivered per room; a gap (a reconnect, a dropped message) is filled from the history
    before the next publication is delivered, and after a reconnect every subscribed room
    is caught up the same way.

``P_PRESENCE`` (KV bucket): key ``<room>.<client>``, value the member, its room, and the node
    (id and incarnation) that holds it.  ``P_NODES`` (KV bucket): key ``<node>``, value the
    node's incarnation (random per start) and lease expiry (``clock() + lease_s``), refreshed
    every ``lease_s / 3``. A presence entry is live while its node's lease is: one refresh per
    node instead of one per member, and a dead node's members vanish ``lease_s`` after its
    last refresh. Readers delete entries of dead nodes when they meet them. A node that finds
    its own lease lapsed (or that reconnects) writes all its entries again.

``P_CLIENTS`` (KV bucket): key ``<client>``, value the node's direct subject
    ``P.d.<node>.<incarnation>``. ``send`` looks the client up and makes a request on that
    subject; the node answers whether it holds the client (after handing the frame over). No
    responders (the node is gone) or no key means ``False``; a key left by a dead node is
    deleted then.

Removals (``presence_remove``, ``remove_client``) never fail: while NATS is away they are
queued and applied on reconnect, when the node also writes its lease, members and clients
again. Everything else raises :class:`BrokerError` at once while NATS is unreachable, and
after ``timeout`` seconds at most otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import itertools
import hashlib
import json
import random
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats
import nats.errors

from ..._log import get_logger
from .base import BrokerError, BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication, history_result

log = get_logger("wirehub.hub.broker.nats")

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_TOKEN = 400
_TRIM_EVERY = 32  # trim a room at least every this many publications
_HEADS_CACHED = 10_000  # rooms whose head this node remembers from its own publishes
_NODES_TTL = 3600.0  # the node-lease bucket's own max age: leases of long-dead nodes go away
_RESYNC_BATCH = 256
_PAST_ANY_PAGE = 1 << 30  # a STREAM.INFO subjects offset past every page: the total, no subjects
_BATCH_MAX = 1024  # publications in one history message at most
_BATCH_BYTES = 65536  # publication bytes in one history message at most (one larger publication goes alone)
_WINDOW = 256  # history messages this node keeps unacknowledged at once, all rooms together
_MAX_IN_FLIGHT = 65536  # publications this node holds unanswered before it refuses more
_CHAIN = 16  # a room's newest history messages whose place this node knows, for exact trimming

# A room's head as this node knows it: its stream sequence, seq and epoch, and the chain of
# (stream sequence, last seq) of the newest messages known to be consecutive on the subject,
# oldest first, ending with the head.
_HeadInfo = tuple[int, int, str, tuple[tuple[int, int], ...]]

# JetStream API error codes
_NO_MESSAGE = 10037
_STREAM_NOT_FOUND = 10059
_WRONG_LAST_SEQUENCE = 10071
_STREAM_EXISTS = 10058



class _Head(msgspec.Struct, array_like=True, frozen=True):
    """A history message's head: the room's top after it (``seq``, ``epoch``), the last
    publication's ``sender`` and ``ts``, the message's publish id, and ``parts``
    (``[sender, ts, size]`` of every publication, oldest first) when it holds more than one."""

    room: str
    seq: int
    epoch: str
    sender: str
    ts: int
    pid: str
    parts: list[tuple[str, int, int]] | None = None
    #: ``[info, exclude]`` of every publication, oldest first, when an application hook set
    #: them on one of them (``info`` the raw JSON as text, "" for none)
    extra: list[tuple[str, str]] | None = None


_head_decoder = msgspec.json.Decoder(_Head)
_str_decoder = msgspec.json.Decoder(str)
_encode = msgspec.json.encode


class _Entry(msgspec.Struct, frozen=True):
    """A presence entry as stored."""

    room: str
    client: str
    user: str
    name: str | None
    node: str
    inc: str
    info: Any = msgspec.UNSET  # set by an application hook (left out when unset)


class _Lease(msgspec.Struct, frozen=True):
    inc: str
    expires: float


class _ClientEntry(msgspec.Struct, frozen=True):
    node: str
    subject: str


class _ApiError(BrokerError):
    def __init__(self, what: str, error: dict[str, Any]) -> None:
        self.code = int(error.get("code") or 0)
        self.err_code = int(error.get("err_code") or 0)
        super().__init__(f"NATS refused {what}: {error.get('description', error)} (err_code {self.err_code})")


class _NoStream(BrokerError):
    pass


def _token(name: str) -> str:
    raw = name.encode("utf-8", "surrogatepass")
    token = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
    if len(token) <= _MAX_TOKEN:
        return "r" + token
    return "x" + hashlib.sha256(raw).hexdigest()


def _untoken(token: str) -> str | None:
    """The name a token was made from; None for a hashed token (read the name elsewhere)."""
    if not token.startswith("r"):
        return None
    body = token[1:].upper()
    try:
        return base64.b32decode(body + "=" * (-len(body) % 8)).decode("utf-8", "surrogatepass")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _decode_head(body: bytes) -> _Head:
    return _head_decoder.decode(body.partition(b"\n")[0])


def _decode_pubs(body: bytes) -> tuple[list[Publication], _Head]:
    """The publications a history message holds, oldest first, and its head."""
    raw_head, _, data = body.partition(b"\n")
    h = _head_decoder.decode(raw_head)
    extra = h.extra
    if h.parts is None:
        if extra:
            info, exclude = extra[0]
            return [Publication(h.room, h.seq, h.epoch, msgspec.Raw(data), h.sender, h.ts, info.encode() or None, exclude)], h
        return [Publication(h.room, h.seq, h.epoch, msgspec.Raw(data), h.sender, h.ts)], h
    if not h.parts or any(size < 0 for _, _, size in h.parts) or sum(size for _, _, size in h.parts) != len(data):
        raise ValueError(f"a history message of {h.room!r} does not hold the publications its head lists")
    seq = h.seq - len(h.parts)
    offset = 0
    pubs = []
    for i, (sender, ts, size) in enumerate(h.parts):
        seq += 1
        if extra and i < len(extra):
            info, exclude = extra[i]
            pubs.append(Publication(h.room, seq, h.epoch, msgspec.Raw(data[offset : offset + size]), sender, ts, info.encode() or None, exclude))
        else:
            pubs.append(Publication(h.room, seq, h.epoch, msgspec.Raw(data[offset : offset + size]), sender, ts))
        offset += size
    return pubs, h


class _Pending:
    """One publication started on this node and not answered yet."""

    __slots__ = ("raw", "size", "sender", "ts", "history", "future", "extra")

    def __init__(self, raw: msgspec.Raw, sender: str, ts: int, history: HistoryPolicy, future: asyncio.Future[Publication],
                 extra: tuple[str, str] | None = None) -> None:
        self.extra = extra  # (info as text, exclude) when a hook set them
        self.raw = raw
        self.size = len(raw)
        self.sender = sender
        self.ts = ts
        self.history = history
        self.future = future


class _Outbox:
    """A room's publications started on this node and not yet sent, and the task that sends
    them (one history message at a time, in order); gone when the queue runs empty."""

    __slots__ = ("room", "subject", "queue", "batch", "sent", "task")

    def __init__(self, room: str, subject: str) -> None:
        self.room = room
        self.subject = subject
        self.queue: deque[_Pending] = deque()
        self.batch: list[_Pending] = []  # taken from the queue, being appended
        self.sent = False  # an attempt for ``batch`` went out (its outcome may be unknown)
        self.task: asyncio.Task | None = None


class _Locks:
    """One asyncio lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, list[Any]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._locks.get(key) is entry:
                del self._locks[key]


class _RoomSub:
    """This node's subscription to one room, and the last publication it delivered."""

    __slots__ = ("room", "sub", "lock", "epoch", "seq")

    def __init__(self, room: str) -> None:
        self.room = room
        self.sub: Any = None
        self.lock = asyncio.Lock()
        self.epoch: str | None = None
        self.seq = 0


class _Lost(BrokerError):
    """The connection went away while a request was out: it may have been carried out."""


class _NotSent(BrokerError):
    """A request that never left this node."""


class NatsBroker:
    local = False

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "wirehub",
        node_id: str | None = None,
        lease_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        ping_interval: float = 5.0,
        storage: str = "file",
        replicas: int = 1,
        publish_window: int = _WINDOW,
        publish_batch: int = _BATCH_MAX,
        max_in_flight: int = _MAX_IN_FLIGHT,
    ) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, from start()
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"NATS broker prefix {prefix!r}: use letters, digits, '_' and '-' only")
        if lease_s <= 0 or timeout <= 0:
            raise ValueError("lease_s and timeout must be positive")
        if storage not in ("file", "memory"):
            raise ValueError("storage must be 'file' or 'memory'")
        if publish_window < 1 or publish_batch < 1 or max_in_flight < 1:
            raise ValueError("publish_window, publish_batch and max_in_flight must be at least 1")
        self.url = url
        self.prefix = prefix
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.lease_s = float(lease_s)
        self._clock = clock
        self._timeout = float(timeout)
        self._connect_timeout = float(connect_timeout)
        self._reconnect_wait = float(reconnect_wait)
        self._ping_interval = ping_interval
        self._storage = storage
        self._replicas = replicas
        self.publish_window = publish_window
        self.publish_batch = publish_batch
        self.max_in_flight = max_in_flight

        self._inc = secrets.token_hex(6)  # this instance's incarnation
        self._hist = f"{prefix}_HISTORY"
        self._meta_subject = f"{prefix}.meta"
        self._presence_bucket = f"{prefix}_PRESENCE"
        self._clients_bucket = f"{prefix}_CLIENTS"
        self._nodes_bucket = f"{prefix}_NODES"
        self._direct_subject = f"{prefix}.d.{_token(self.node_id)}.{self._inc}"

        self._nc: Any = None
        self._handler: BrokerHandler | None = None
        self._up = False
        self._closing = False
        self._subs: dict[str, _RoomSub] = {}
        self._sub_locks = _Locks()
        self.in_flight = 0  # publications started and not answered (in outboxes, queued or being appended)
        self._outboxes: dict[str, _Outbox] = {}
        self._slots = asyncio.Semaphore(publish_window)  # history messages unacknowledged (made again per start)
        self._trimming: set[str] = set()  # rooms with a trim under way
        self._ack_prefix = ""  # this connection's inbox for JetStream acknowledgements
        self._acks: dict[str, asyncio.Future[Any]] = {}
        self._ack_ids = itertools.count()
        self._heads: dict[str, _HeadInfo] = {}  # room -> its head as this node's last publish left it
        self._generation: str | None = None
        self._clients: set[str] = set()
        self._presence: dict[tuple[str, str], Member] = {}
        self._pending_purges: dict[str, str] = {}  # subject -> stream: removals to apply
        self._last_refresh: float | None = None
        self._tasks: set[asyncio.Task] = set()
        self._refresher: asyncio.Task | None = None
        self._recovery: asyncio.Task | None = None

    # ------------------------------------------------------------------ names

    @property
    def streams(self) -> list[str]:
        """The JetStream streams this broker's prefix uses (its whole state in NATS)."""
        return [self._hist] + [f"KV_{b}" for b in (self._presence_bucket, self._clients_bucket, self._nodes_bucket)]

    def _room_subject(self, room: str) -> str:
        return f"{self.prefix}.h.{_token(room)}"

    def _fanout_subject(self, room: str) -> str:
        return f"{self.prefix}.r.{_token(room)}"

    def _presence_subject(self, room: str, client: str) -> str:
        return f"$KV.{self._presence_bucket}.{_token(room)}.{_token(client)}"

    def _client_subject(self, client: str) -> str:
        return f"$KV.{self._clients_bucket}.{_token(client)}"

    def _node_subject(self, node: str) -> str:
        return f"$KV.{self._nodes_bucket}.{_token(node)}"

    # ------------------------------------------------------------------ lifecycle

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.publish_window)  # bound to this loop
        nc = nats.NATS()
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=[self.url],
                    name=f"wirehub-{self.node_id}",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self._reconnect_wait,
                    connect_timeout=self._connect_timeout,
                    ping_interval=self._ping_interval,
                    max_outstanding_pings=3,
                    drain_timeout=self._timeout,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                ),
                self._connect_timeout,
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise BrokerError(f"cannot reach NATS at {self.url}: {exc!r}") from exc
        self._nc = nc
        try:
            await self._setup()
            await nc.subscribe(self._direct_subject, cb=self._on_direct)
            self._ack_prefix = nc.new_inbox() + "."
            await nc.subscribe(self._ack_prefix + "*", cb=self._on_ack)
            await self._flush()
        except BaseException:
            self._nc = None
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._up = True
        self._refresher = self._spawn(self._refresh_loop(), "refresh")

    async def close(self) -> None:
        if self._closing:
            return
        senders = [box.task for box in self._outboxes.values() if box.task is not None]
        if senders and self._connected():  # what was started before the close is finished first
            await asyncio.wait(senders, timeout=self._timeout)
        self._closing = True
        self._handler = None
        self._up = False
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        nc, self._nc = self._nc, None
        if nc is None:
            return
        if nc.is_connected:
            with contextlib.suppress(Exception):
                # the lease goes first: this node's members vanish at once for every reader
                await self._api(f"STREAM.PURGE.KV_{self._nodes_bucket}", {"filter": self._node_subject(self.node_id)}, nc=nc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), self._timeout)
        with contextlib.suppress(Exception):
            await nc.close()
        self._subs.clear()

    def ready(self) -> bool:
        nc = self._nc
        return self._up and nc is not None and nc.is_connected

    # ------------------------------------------------------------------ connection state

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"wirehub-nats-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("nats_task_failed", task=task.get_name(), error=repr(task.exception()))

    def _notify(self, up: bool) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            handler.on_broker_state(up)
        except Exception:
            log.exception("broker_state_handler_failed")

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats_error", url=self.url, error=repr(exc))

    def _fail_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for future in acks.values():
            if not future.done():
                future.set_exception(_Lost(f"the connection to NATS at {self.url} was lost before JetStream answered"))

    async def _on_disconnected(self) -> None:
        self._fail_acks()
        if self._closing:
            return
        if self._recovery is not None:
            self._recovery.cancel()
        if self._up:
            self._up = False
            log.warning("nats_disconnected", url=self.url, node=self.node_id)
            self._notify(False)

    async def _on_closed(self) -> None:
        self._fail_acks()
        if self._closing or self._nc is None:
            return
        if self._up:
            self._up = False
            self._notify(False)
        log.error("nats_connection_closed", url=self.url, node=self.node_id)

    async def _on_reconnected(self) -> None:
        if self._closing:
            return
        log.warning("nats_reconnected", url=self.url, node=self.node_id)
        if self._recovery is not None:
            self._recovery.cancel()
        self._recovery = self._spawn(self._recover(), "recover")

    async def _recover(self) -> None:
        """After a reconnect: make sure the streams exist, write this node's state again,
        deliver what subscribed rooms missed, then report the broker up."""
        delay = 0.05
        while not self._closing and self._connected():
            try:
                self._heads.clear()
                await self._setup()
                await self._resync()
                await self._catch_up()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("nats_recovery_retry", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        else:
            return
        if self._connected() and not self._up and not self._closing:
            self._up = True
            self._notify(True)

    def _connected(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected

    def _conn(self) -> Any:
        nc = self._nc
        if nc is None:
            raise BrokerError("the NATS broker is closed" if self._closing else "the NATS broker is not started")
        if not nc.is_connected:
            raise BrokerError(f"NATS at {self.url} is unreachable (reconnecting)")
        return nc

    # ------------------------------------------------------------------ low-level requests

    def _wrap(self, what: str, exc: BaseException) -> BrokerError:
        if isinstance(exc, BrokerError):
            return exc
        if isinstance(exc, TimeoutError):
            return BrokerError(f"NATS at {self.url} did not answer {what} within {self._timeout:g}s")
        return BrokerError(f"NATS at {self.url} failed {what}: {exc!r}")

    async def _request(self, subject: str, payload: bytes, what: str, headers: dict[str, str] | None = None, nc: Any = None) -> Any:
        nc = nc or self._conn()
        try:
            return await nc.request(subject, payload, timeout=self._timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise self._wrap(what, exc) from exc

    async def _api(self, api: str, request: dict[str, Any] | None = None, *, nc: Any = None) -> dict[str, Any]:
        payload = json.dumps(request).encode() if request is not None else b""
        try:
            msg = await self._request(f"$JS.API.{api}", payload, api, nc=nc)
        except nats.errors.NoRespondersError as exc:
            raise BrokerError(f"JetStream at {self.url} is not available ({api})") from exc
        try:
            response = json.loads(msg.data)
        except ValueError as exc:
            raise BrokerError(f"NATS answered {api} with something that is not JSON") from exc
        if "error" in response:
            raise _ApiError(api, response["error"])
        return response

    async def _js_publish(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            msg = await self._request(subject, body, "a JetStream publish", headers=headers)
        except nats.errors.NoRespondersError as exc:
            raise _NoStream(f"no JetStream stream takes {subject}") from exc
        response = json.loads(msg.data)
        if "error" in response:
            raise _ApiError(f"a publish to {subject}", response["error"])
        return response

    async def _js_send(self, subject: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """A JetStream publish whose acknowledgement comes to this connection's ack inbox
        (any number may be out at once). Raises :class:`_NotSent` when it did not leave,
        :class:`_Lost` (``maybe_applied``) when the connection went or no answer came."""
        nc = self._conn()
        token = str(next(self._ack_ids))
        future = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        try:
            try:
                await nc.publish(subject, body, reply=self._ack_prefix + token, headers=headers)
            except nats.errors.MaxPayloadError as exc:
                raise _NotSent(
                    f"a publication of {len(body)} bytes is larger than NATS at {self.url} takes (max_payload {nc.max_payload})"
                ) from exc
            except (nats.errors.Error, OSError) as exc:
                raise _NotSent(str(self._wrap("a JetStream publish", exc))) from exc
            try:
                msg = await asyncio.wait_for(future, self._timeout)
            except TimeoutError as exc:
                raise _Lost(f"NATS at {self.url} did not acknowledge a publish to {subject} within {self._timeout:g}s") from exc
        finally:
            self._acks.pop(token, None)
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise _NoStream(f"no JetStream stream takes {subject}")
        try:
            response = json.loads(msg.data)
        except ValueError as exc:
            raise _Lost(f"NATS answered a publish to {subject} with something that is not JSON") from exc
        if "error" in response:
            raise _ApiError(f"a publish to {subject}", response["error"])
        return response

    async def _on_ack(self, msg: Any) -> None:
        future = self._acks.pop(msg.subject[len(self._ack_prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def _flush(self) -> None:
        """Return once NATS has processed every command this connection sent before the call
        (a subscription is in place, a publish is routed).

        Not ``nc.flush()``: nats-py (2.16) writes its PING straight to the socket while the
        commands before it (a SUB) may still wait in its pending buffer for the flusher task,
        so the PONG can come back before the server has seen the SUB, and a publication from
        another connection right after is not delivered (seen as a flaky two-node test). A
        message to this connection's own inbox goes through the same buffer as the commands
        before it, so its return proves the server processed them.
        """
        nc = self._conn()
        token = "f" + str(next(self._ack_ids))
        future = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        try:
            await nc.publish(self._ack_prefix + token, b"")
            await asyncio.wait_for(future, self._timeout)
        except (nats.errors.Error, OSError, TimeoutError, _Lost) as exc:
            raise self._wrap("a flush", exc) from exc
        finally:
            self._acks.pop(token, None)

    async def _last(self, stream: str, subject: str) -> tuple[int, bytes, dict[str, str]] | None:
        """The last message on ``subject``: (stream seq, data, headers), or None."""
        try:
            response = await self._api(f"STREAM.MSG.GET.{stream}", {"last_by_subj": subject})
        except _ApiError as exc:
            if exc.err_code == _NO_MESSAGE:
                return None
            if exc.err_code == _STREAM_NOT_FOUND:
                raise _NoStream(str(exc)) from exc
            raise
        message = response["message"]
        data = base64.b64decode(message.get("data") or b"")
        headers: dict[str, str] = {}
        if message.get("hdrs"):
            for line in base64.b64decode(message["hdrs"]).decode("utf-8", "replace").split("\r\n")[1:]:
                key, sep, value = line.partition(":")
                if sep:
                    headers[key.strip()] = value.strip()
        return int(message["seq"]), data, headers

    async def _read(self, stream: str, subject: str, deliver: str = "all") -> list[Any]:
        """Every message on ``subject`` (a filter) as of now, oldest first, through a
        short-lived ephemeral pull consumer."""
        nc = self._conn()
        config = {
            "deliver_policy": deliver,
            "ack_policy": "none",
            "filter_subject": subject,
            "replay_policy": "instant",
            "inactive_threshold": int(max(self._timeout * 4, 10) * 1e9),
            "mem_storage": True,
            "num_replicas": 1,
        }
        try:
            info = await self._api(f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config})
        except _ApiError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                raise _NoStream(str(exc)) from exc
            raise
        name, pending = info["name"], int(info.get("num_pending") or 0)
        out: list[Any] = []
        try:
            if pending:
                inbox = nc.new_inbox()
                sub = await nc.subscribe(inbox)
                try:
                    request = json.dumps({"batch": pending, "no_wait": True}).encode()
                    await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}", request, reply=inbox)
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + self._timeout
                    while len(out) < pending:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            raise BrokerError(f"NATS at {self.url} did not deliver {stream} history within {self._timeout:g}s")
                        try:
                            msg = await sub.next_msg(timeout=remaining)
                        except (nats.errors.Error, TimeoutError) as exc:
                            raise self._wrap(f"reading {stream}", exc) from exc
                        if not msg.data and msg.headers and msg.headers.get("Status"):
                            break  # 404/408: nothing more (trimmed meanwhile)
                        out.append(msg)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                if nc.is_connected:  # the answer goes nowhere; inactive_threshold is the backstop
                    await nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", reply=nc.new_inbox())
        return out

    # ------------------------------------------------------------------ streams and buckets

    async def _setup(self) -> None:
        await self._ensure_history()
        await self._ensure_bucket(self._presence_bucket, None)
        await self._ensure_bucket(self._clients_bucket, None)
        await self._ensure_bucket(self._nodes_bucket, _NODES_TTL)
        self._generation = await self._current_generation()
        await self._put_lease()

    async def _create_stream(self, config: dict[str, Any], *, required: tuple[str, ...] = ()) -> None:
        """Create the stream; one that exists with another configuration is used as it is,
        except that the ``required`` settings are put right (an update) or refused."""
        name = config["name"]
        try:
            await self._api(f"STREAM.CREATE.{name}", config)
            return
        except _ApiError as exc:
            if exc.err_code != _STREAM_EXISTS:
                raise
        info = await self._api(f"STREAM.INFO.{name}")
        current = info.get("config") or {}
        if all(current.get(key) == config[key] for key in required):
            return
        log.warning("nats_stream_updated", stream=name, settings=",".join(required))
        try:
            await self._api(f"STREAM.UPDATE.{name}", {**current, **{key: config[key] for key in required}})
        except _ApiError as exc:
            raise BrokerError(
                f"the existing stream {name} does not have the settings wirehub needs ({', '.join(required)}) and cannot be "
                f"updated ({exc}); delete it (its history is lost) or use another prefix"
            ) from exc

    async def _ensure_history(self) -> None:
        await self._create_stream(
            {
                "name": self._hist,
                "description": "wirehub room history (seq, epoch, publications)",
                "subjects": [f"{self.prefix}.h.>", self._meta_subject],
                "retention": "limits",
                "max_consumers": -1,
                "max_msgs": -1,
                "max_bytes": -1,
                "max_age": 0,
                "max_msgs_per_subject": -1,
                "max_msg_size": -1,
                "discard": "old",
                "storage": self._storage,
                "num_replicas": self._replicas,
                "duplicate_window": int(120e9),
                "republish": {"src": f"{self.prefix}.h.>", "dest": f"{self.prefix}.r.>"},
                "allow_direct": False,
                "deny_delete": False,
                "deny_purge": False,
            },
            required=("subjects", "republish", "max_msgs_per_subject", "max_age", "deny_purge"),
        )

    async def _ensure_bucket(self, bucket: str, ttl: float | None) -> None:
        """A JetStream KV bucket, configured as nats' KV clients create them."""
        await self._create_stream(
            {
                "name": f"KV_{bucket}",
                "subjects": [f"$KV.{bucket}.>"],
                "retention": "limits",
                "max_consumers": -1,
                "max_msgs": -1,
                "max_bytes": -1,
                "max_age": int((ttl or 0) * 1e9),
                "max_msgs_per_subject": 1,
                "max_msg_size": -1,
                "discard": "new",
                "storage": self._storage,
                "num_replicas": self._replicas,
                "duplicate_window": int(min(ttl or 120, 120) * 1e9),
                "allow_rollup_hdrs": True,
                "deny_delete": True,
                "allow_direct": False,
            }
        )

    async def _current_generation(self) -> str:
        """The history stream's generation marker, written create-if-absent."""
        for _ in range(5):
            try:
                found = await self._last(self._hist, self._meta_subject)
            except _NoStream:
                await self._ensure_history()
                continue
            if found is not None:
                return found[1].decode()
            try:
                await self._js_publish(self._meta_subject, secrets.token_hex(8).encode(), {"Nats-Expected-Last-Subject-Sequence": "0"})
            except _ApiError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:  # another node wrote it first: read it
                    raise
            except _NoStream:
                await self._ensure_history()
        raise BrokerError(f"could not establish the history generation in {self._hist}")

    async def _empty_epoch(self, room: str) -> str:
        generation = await self._current_generation()
        if generation != self._generation:
            self._generation = generation
            self._heads.clear()
        digest = hashlib.sha256(generation.encode() + b"\0" + room.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ rooms: delivery

    async def subscribe(self, room: str) -> None:
        self._conn()
        async with self._sub_locks.hold(room):
            if room in self._subs:
                return
            rs = _RoomSub(room)
            nc = self._conn()
            try:
                rs.sub = await nc.subscribe(self._fanout_subject(room), cb=functools.partial(self._on_room_msg, rs))
            except (nats.errors.Error, OSError) as exc:
                raise self._wrap("a subscribe", exc) from exc
            self._subs[room] = rs
            try:
                await self._flush()  # the server has the interest before we return
            except BaseException:
                self._subs.pop(room, None)
                with contextlib.suppress(Exception):
                    await rs.sub.unsubscribe()
                raise

    async def unsubscribe(self, room: str) -> None:
        async with self._sub_locks.hold(room):
            rs = self._subs.pop(room, None)
            if rs is not None and rs.sub is not None:
                with contextlib.suppress(Exception):
                    await rs.sub.unsubscribe()

    async def _on_room_msg(self, rs: _RoomSub, msg: Any) -> None:
        if self._subs.get(rs.room) is not rs or self._handler is None:
            return
        body = msg.data
        try:
            if body[:1] == b"[":
                pubs, head = _decode_pubs(body)
                if head.room != rs.room:
                    return
                async with rs.lock:
                    for pub in pubs:
                        await self._deliver(rs, pub)
            else:
                head, _, frame = body.partition(b"\n")
                exclude = _str_decoder.decode(head)
                handler = self._handler
                if handler is not None and self._subs.get(rs.room) is rs:
                    handler.on_room_event(rs.room, frame, exclude)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("nats_delivery_failed", room=rs.room)

    async def _deliver(self, rs: _RoomSub, pub: Publication) -> None:
        if rs.epoch == pub.epoch:
            if pub.seq <= rs.seq:
                return  # already delivered (a catch-up got there first)
            if pub.seq > rs.seq + 1:
                await self._fill(rs, pub.seq)
        self._emit(rs, pub)

    def _emit(self, rs: _RoomSub, pub: Publication) -> None:
        handler = self._handler
        if handler is None or self._subs.get(rs.room) is not rs:
            return
        rs.epoch, rs.seq = pub.epoch, pub.seq
        handler.on_publication(pub)

    async def _fill(self, rs: _RoomSub, upto: int | None) -> None:
        """Deliver what history still holds between the last delivered ``seq`` and ``upto``."""
        try:
            messages = await self._read(self._hist, self._room_subject(rs.room))
        except BrokerError as exc:
            log.warning("nats_gap_not_filled", room=rs.room, after=rs.seq, error=str(exc))
            return
        for msg in messages:
            pubs, head = _decode_pubs(msg.data)
            if head.room == rs.room and head.epoch == rs.epoch and head.seq > rs.seq:
                for pub in pubs:
                    if pub.seq > rs.seq and (upto is None or pub.seq < upto):
                        self._emit(rs, pub)

    async def _catch_up(self) -> None:
        async def one(rs: _RoomSub) -> None:
            async with rs.lock:
                if rs.epoch is not None and self._subs.get(rs.room) is rs:
                    await self._fill(rs, None)

        rooms = [rs for rs in self._subs.values() if rs.epoch is not None]
        for i in range(0, len(rooms), 32):
            await asyncio.gather(*(one(rs) for rs in rooms[i : i + 32]))

    # ------------------------------------------------------------------ rooms: publish

    def publish_nowait(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> asyncio.Future[Publication]:
        # the loop cached at start: asyncio.get_running_loop() costs a getpid() system call
        future: asyncio.Future[Publication] = (self._loop or asyncio.get_running_loop()).create_future()
        try:
            self._conn()
            if self.in_flight >= self.max_in_flight:
                raise BrokerError(
                    f"this node has {self.in_flight} publications waiting for NATS (max_in_flight); "
                    "publish again when earlier ones are answered"
                )
        except BrokerError as exc:
            future.set_exception(exc)
            return future
        raw = data if isinstance(data, msgspec.Raw) else msgspec.Raw(data)
        box = self._outboxes.get(room)
        if box is None:
            box = self._outboxes[room] = _Outbox(room, self._room_subject(room))
            box.task = self._spawn(self._send_room(box), "publish")
        extra = None if info is None and not exclude else ((info or b"").decode(), exclude)
        box.queue.append(_Pending(raw, sender, ts, history, future, extra))
        self.in_flight += 1
        return future

    async def publish(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> Publication:
        return await self.publish_nowait(room, data, sender=sender, ts=ts, history=history, info=info, exclude=exclude)

    def _answer(self, item: _Pending, pub: Publication | None, exc: BaseException | None = None) -> None:
        self.in_flight -= 1
        if not item.future.done():
            if exc is None:
                item.future.set_result(pub)
            else:
                item.future.set_exception(exc)

    def _take(self, box: _Outbox) -> list[_Pending]:
        """The next history message's publications: as many queued ones as fit."""
        batch: list[_Pending] = []
        size = 0
        budget = min(_BATCH_BYTES, self._nc.max_payload // 2 if self._nc is not None else _BATCH_BYTES)
        queue = box.queue
        while queue and len(batch) < self.publish_batch:
            item = queue[0]
            if item.future.done():  # the caller gave up on it before it was sent
                queue.popleft()
                self.in_flight -= 1
                continue
            if batch and size + item.size > budget:
                break
            queue.popleft()
            batch.append(item)
            size += item.size
        return batch

    async def _send_room(self, box: _Outbox) -> None:
        """Append a room's queued publications in order, one history message at a time."""
        try:
            while box.queue:
                async with self._slots:
                    box.batch, box.sent = self._take(box), False
                    if not box.batch:
                        continue
                    try:
                        pubs = await self._append(box)
                    except BrokerError as exc:
                        for item in box.batch:
                            self._answer(item, None, exc)
                    else:
                        for item, pub in zip(box.batch, pubs):
                            self._answer(item, pub)
                    box.batch = []
        except BaseException as exc:
            error = BrokerError(
                "the NATS broker is closed" if self._closing else f"the NATS broker failed to publish: {exc!r}",
                maybe_applied=box.sent,
            )
            for item in box.batch:
                self._answer(item, None, error)
            box.batch = []
            raise
        finally:
            if self._outboxes.get(box.room) is box:
                del self._outboxes[box.room]
            while box.queue:
                error = BrokerError("the NATS broker is closed" if self._closing else "the NATS broker failed to publish")
                self._answer(box.queue.popleft(), None, error)

    async def _append(self, box: _Outbox) -> list[Publication]:
        """Store ``box.batch`` as one history message after the room's head: its
        publications get the next ``seq`` values, in order. Retries on a concurrent write
        (another node's), and on a lost answer only after the head shows it did not land."""
        room, subject, batch = box.room, box.subject, box.batch
        count = len(batch)
        last = batch[-1]
        parts = None if count == 1 else [(item.sender, item.ts, item.size) for item in batch]
        extra = None if all(item.extra is None for item in batch) else [item.extra or ("", "") for item in batch]
        pid = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        conflicts = 0
        lost = False  # an attempt went out and its answer was lost: it may have landed
        head = self._heads.pop(room, None)
        while True:
            box.sent = lost
            if loop.time() > deadline:
                raise BrokerError(
                    f"could not append to {room!r} within {self._timeout:g}s ({conflicts} concurrent writes won first)"
                    + (" (an attempt may have been stored)" if lost else ""),
                    maybe_applied=lost,
                )
            try:
                if head is None:
                    found = await self._last(self._hist, subject)
                    if found is None:
                        head = (0, 0, await self._empty_epoch(room), ())
                    else:
                        stored = _decode_head(found[1])
                        head = (found[0], stored.seq, stored.epoch, ((found[0], stored.seq),))
                        if stored.pid == pid:  # an earlier attempt did land
                            self._remember(room, head)
                            return self._numbered(box, stored.seq - count, stored.epoch)
                stream_seq, seq, epoch, chain = head
                fields: tuple[Any, ...] = (room, seq + count, epoch, last.sender, last.ts, pid)
                head_fields = fields if parts is None and extra is None else (*fields, parts) if extra is None else (*fields, parts, extra)
                body = b"".join([_encode(head_fields), b"\n", *(item.raw for item in batch)])
                box.sent = True
                ack = await self._js_send(subject, body, {"Nats-Expected-Last-Subject-Sequence": str(stream_seq)})
            except _ApiError as exc:  # a definite answer: this attempt was not stored
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise BrokerError(str(exc), maybe_applied=lost) from exc
                head = None
                conflicts += 1
                if conflicts > 2:
                    await asyncio.sleep(random.uniform(0, 0.002 * min(conflicts, 10)))
                continue
            except _NoStream:
                head = None
                try:
                    await self._ensure_history()
                except BrokerError as exc:
                    raise BrokerError(str(exc), maybe_applied=lost) from exc
                continue
            except BrokerError as exc:
                lost = lost or isinstance(exc, _Lost)
                if isinstance(exc, _NotSent) or not self._connected():
                    if lost:
                        what = f"publish to {room!r} not confirmed (it may or may not be stored): {exc}"
                        raise BrokerError(what, maybe_applied=True) from exc
                    raise BrokerError(str(exc)) from exc
                head = None  # a lost answer: the head tells whether it landed
                continue
            top = seq + count
            chain = (*chain[-(_CHAIN - 1) :], (int(ack["seq"]), top))
            size = last.history.size
            every = max(size, _TRIM_EVERY)
            if top // every > seq // every and room not in self._trimming:
                # purge below the oldest message still needed when the chain shows where it
                # starts (every message before it ends at or below top - size), else keep the
                # newest ``size`` messages (each holds one publication or more)
                request: dict[str, Any] = {"filter": subject, "keep": max(size, 1)}
                for i in range(len(chain) - 2, -1, -1):
                    if chain[i][1] <= top - size:
                        request = {"filter": subject, "seq": chain[i + 1][0]}
                        chain = chain[i + 1 :]
                        break
                self._trimming.add(room)
                self._spawn(self._trim(room, request), "trim")
            self._remember(room, (chain[-1][0], top, epoch, chain))
            return self._numbered(box, seq, epoch)

    @staticmethod
    def _numbered(box: _Outbox, after: int, epoch: str) -> list[Publication]:
        return [
            Publication(box.room, after + i, epoch, item.raw, item.sender, item.ts)
            if item.extra is None
            else Publication(box.room, after + i, epoch, item.raw, item.sender, item.ts, item.extra[0].encode() or None, item.extra[1])
            for i, item in enumerate(box.batch, 1)
        ]

    async def _trim(self, room: str, request: dict[str, Any]) -> None:
        try:
            await self._api(f"STREAM.PURGE.{self._hist}", request)
        except BrokerError as exc:
            log.warning("nats_trim_failed", room=room, error=str(exc))
        finally:
            self._trimming.discard(room)

    def _remember(self, room: str, head: _HeadInfo) -> None:
        self._heads[room] = head
        if len(self._heads) > _HEADS_CACHED:
            self._heads.pop(next(iter(self._heads)))

    async def room_event(self, room: str, frame: bytes, *, exclude: str = "") -> None:
        nc = self._conn()
        try:
            await nc.publish(self._fanout_subject(room), _encode(exclude) + b"\n" + bytes(frame))
        except (nats.errors.Error, OSError) as exc:
            raise self._wrap("a room event", exc) from exc

    # ------------------------------------------------------------------ rooms: history

    async def _stored(self, room: str) -> list[Publication]:
        try:
            messages = await self._read(self._hist, self._room_subject(room))
        except _NoStream:
            await self._ensure_history()
            return []
        pubs: list[Publication] = []
        for msg in messages:
            held, head = _decode_pubs(msg.data)
            if head.room == room:
                pubs += held
        return pubs

    async def history(self, room: str, *, since: int | None = None, limit: int | None = None, history: HistoryPolicy) -> HistoryResult:
        stored = await self._stored(room)
        if stored:
            head = stored[-1]
            position = Position(head.seq, head.epoch)
        else:
            position = Position(0, await self._empty_epoch(room))
        items = [p for p in stored if p.epoch == position.epoch and p.seq > position.seq - history.size]
        horizon = int(self._clock() * 1000) - int(history.ttl * 1000)
        start = 0
        while start < len(items) and items[start].ts < horizon:
            start += 1
        return history_result(items[start:], position, since, limit)

    async def position(self, room: str) -> Position:
        try:
            found = await self._last(self._hist, self._room_subject(room))
        except _NoStream:
            await self._ensure_history()
            found = None
        if found is None:
            return Position(0, await self._empty_epoch(room))
        head = _decode_head(found[1])
        return Position(head.seq, head.epoch)

    # ------------------------------------------------------------------ KV helpers

    async def _kv_put(self, subject: str, value: bytes) -> None:
        try:
            await self._js_publish(subject, value)
        except _NoStream:
            await self._setup()
            await self._js_publish(subject, value)

    async def _kv_get(self, stream: str, subject: str) -> bytes | None:
        try:
            found = await self._last(stream, subject)
        except _NoStream:
            return None
        if found is None:
            return None
        _, data, headers = found
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None
        return data

    async def _remove(self, stream: str, subject: str) -> None:
        """Delete a key completely (no tombstone left); queued while NATS is away."""
        self._pending_purges[subject] = stream
        if not self._connected():
            return
        try:
            await self._api(f"STREAM.PURGE.{stream}", {"filter": subject})
        except _ApiError as exc:
            if exc.err_code != _STREAM_NOT_FOUND:
                log.warning("nats_remove_deferred", subject=subject, error=str(exc))
                return
        except BrokerError as exc:
            log.warning("nats_remove_deferred", subject=subject, error=str(exc))
            return
        if self._pending_purges.get(subject) == stream:
            del self._pending_purges[subject]

    async def _put_lease(self) -> None:
        now = self._clock()
        lease = _Lease(inc=self._inc, expires=now + self.lease_s)
        await self._kv_put(self._node_subject(self.node_id), _encode(lease))
        self._last_refresh = now

    async def _leases(self, nodes: set[str]) -> dict[str, _Lease | None]:
        stream = f"KV_{self._nodes_bucket}"

        async def one(node: str) -> _Lease | None:
            data = await self._kv_get(stream, self._node_subject(node))
            if data is None:
                return None
            try:
                return msgspec.json.decode(data, type=_Lease)
            except msgspec.DecodeError:
                return None

        names = sorted(nodes)
        found = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, found))

    def _alive(self, node: str, inc: str, leases: dict[str, _Lease | None]) -> bool:
        lease = leases.get(node)
        return lease is not None and lease.inc == inc and lease.expires >= self._clock()

    async def _resync(self) -> None:
        """Write this node's lease, members and clients again; apply queued removals."""
        for subject, stream in list(self._pending_purges.items()):
            await self._api(f"STREAM.PURGE.{stream}", {"filter": subject})
            if self._pending_purges.get(subject) == stream:
                del self._pending_purges[subject]
        await self._put_lease()
        clients = list(self._clients)
        members = list(self._presence.items())
        writes = [(self._client_subject(c), _encode(_ClientEntry(self.node_id, self._direct_subject))) for c in clients]
        writes += [
            (self._presence_subject(room, client), _encode(_Entry(room, m.client, m.user, m.name, self.node_id, self._inc, m.info)))
            for (room, client), m in members
        ]
        for i in range(0, len(writes), _RESYNC_BATCH):
            await asyncio.gather(*(self._kv_put(s, v) for s, v in writes[i : i + _RESYNC_BATCH]))
        # a removal made while these writes were under way must win over them
        for client in clients:
            if client not in self._clients:
                await self._remove(f"KV_{self._clients_bucket}", self._client_subject(client))
        for key, _ in members:
            if key not in self._presence:
                await self._remove(f"KV_{self._presence_bucket}", self._presence_subject(*key))

    async def _refresh(self) -> None:
        """One lease refresh: write the lease (and everything else if it had lapsed, since
        readers may have deleted this node's entries meanwhile); notice a new generation."""
        lapsed = self._last_refresh is None or self._clock() - self._last_refresh > self.lease_s
        if lapsed:
            await self._resync()
        else:
            await self._put_lease()
        generation = await self._current_generation()
        if generation != self._generation:
            self._generation = generation
            self._heads.clear()

    async def _refresh_loop(self) -> None:
        interval = min(self.lease_s / 3, 600.0)
        while True:
            await asyncio.sleep(interval)
            if not self._up or not self._connected():
                continue
            try:
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("nats_lease_refresh_failed", node=self.node_id, error=str(exc))

    # ------------------------------------------------------------------ direct messages

    async def add_client(self, client: str) -> None:
        self._clients.add(client)
        subject = self._client_subject(client)
        self._pending_purges.pop(subject, None)
        self._conn()
        await self._kv_put(subject, _encode(_ClientEntry(self.node_id, self._direct_subject)))

    async def remove_client(self, client: str) -> None:
        self._clients.discard(client)
        await self._remove(f"KV_{self._clients_bucket}", self._client_subject(client))

    async def send(self, client: str, frame: bytes) -> bool:
        nc = self._conn()
        key = self._client_subject(client)
        data = await self._kv_get(f"KV_{self._clients_bucket}", key)
        if data is None:
            return False
        try:
            entry = msgspec.json.decode(data, type=_ClientEntry)
        except msgspec.DecodeError:
            return False
        try:
            reply = await self._request(entry.subject, _encode(client) + b"\n" + bytes(frame), "a direct send", nc=nc)
        except nats.errors.NoRespondersError:
            # the node that registered it is gone: forget the stale registration
            with contextlib.suppress(BrokerError):
                await self._api(f"STREAM.PURGE.KV_{self._clients_bucket}", {"filter": key})
            return False
        return reply.data == b"1"

    async def _on_direct(self, msg: Any) -> None:
        try:
            head, _, frame = msg.data.partition(b"\n")
            client = _str_decoder.decode(head)
            handler = self._handler
            held = handler is not None and client in self._clients
            if held:
                handler.on_direct(client, frame)
        except Exception:
            log.exception("nats_direct_failed")
            held = False
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(b"1" if held else b"0")

    # ------------------------------------------------------------------ presence

    async def presence_add(self, room: str, member: Member) -> None:
        self._presence[(room, member.client)] = member
        subject = self._presence_subject(room, member.client)
        self._pending_purges.pop(subject, None)
        self._conn()
        entry = _Entry(room, member.client, member.user, member.name, self.node_id, self._inc, member.info)
        await self._kv_put(subject, _encode(entry))

    async def presence_remove(self, room: str, client: str) -> None:
        self._presence.pop((room, client), None)
        await self._remove(f"KV_{self._presence_bucket}", self._presence_subject(room, client))

    async def _entries(self, subject_filter: str) -> list[_Entry]:
        """Live presence entries under a filter; entries of dead nodes are deleted."""
        stream = f"KV_{self._presence_bucket}"
        try:
            messages = await self._read(stream, subject_filter, "last_per_subject")
        except _NoStream:
            return []
        entries: list[tuple[str, _Entry]] = []
        for msg in messages:
            if not msg.data or (msg.headers and msg.headers.get("KV-Operation") in ("DEL", "PURGE")):
                continue
            try:
                entries.append((msg.subject, msgspec.json.decode(msg.data, type=_Entry)))
            except msgspec.DecodeError:
                continue
        if not entries:
            return []
        leases = await self._leases({e.node for _, e in entries})
        live, dead = [], []
        for subject, entry in entries:
            (live if self._alive(entry.node, entry.inc, leases) else dead).append(subject)
        if dead:
            await asyncio.gather(*(self._api(f"STREAM.PURGE.{stream}", {"filter": s}) for s in dead), return_exceptions=True)
        alive = set(live)
        return [e for s, e in entries if s in alive]

    async def presence(self, room: str) -> list[Member]:
        self._conn()
        prefix = f"$KV.{self._presence_bucket}.{_token(room)}.*"
        return [Member(client=e.client, user=e.user, name=e.name, info=e.info) for e in await self._entries(prefix) if e.room == room]

    async def presence_count(self, room: str) -> int:
        # The stream's count of the room's keys (a removal purges its key: no tombstones),
        # asked for a page past the end so that the answer lists none of them. Entries of a
        # dead node count until a ``presence`` read deletes them.
        self._conn()
        request = {"subjects_filter": f"$KV.{self._presence_bucket}.{_token(room)}.*", "offset": _PAST_ANY_PAGE}
        try:
            info = await self._api(f"STREAM.INFO.KV_{self._presence_bucket}", request)
        except _ApiError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                return 0
            raise
        return int(info.get("total") or 0)

    # ------------------------------------------------------------------ rooms

    async def rooms(self) -> list[str]:
        self._conn()
        names: set[str] = set()
        offset = 0
        head = f"{self.prefix}.h."
        subjects: list[str] = []
        while True:
            try:
                info = await self._api(f"STREAM.INFO.{self._hist}", {"subjects_filter": f"{self.prefix}.h.>", "offset": offset})
            except _ApiError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    break
                raise
            page = list((info.get("state") or {}).get("subjects") or {})
            subjects += page
            offset += len(page)
            if not page or offset >= int(info.get("total") or 0):
                break
        for subject in subjects:
            name = _untoken(subject[len(head) :])
            if name is None:  # a hashed token: the name is in the message
                found = await self._last(self._hist, subject)
                if found is not None:
                    name = _decode_head(found[1]).room
            if name is not None:
                names.add(name)
        names.update(e.room for e in await self._entries(f"$KV.{self._presence_bucket}.>"))
        return sorted(names)
