"""The NATS broker: a fleet of hub nodes sharing rooms through one NATS system (nats-py).

What lives where (``P`` is the ``prefix``; room and client names are arbitrary strings, so
every name that goes into a subject or a key is a *token*: ``r`` + unpadded lowercase
base32 of its UTF-8, or ``x`` + sha256 hex when that would be longer than 400 characters;
the real name always travels in the message itself):

``P_HISTORY`` (JetStream stream, subjects ``P.h.>`` and ``P.meta``)
    One subject per room, ``P.h.<room>``. Each message is one publication: a JSON head
    ``[room, seq, epoch, sender, ts, publish-id]``, a newline, then the publication's data
    bytes untouched. The stream has no per-subject or age limit of its own: history policies
    differ per room and the broker only learns them per call, so the *size* and *ttl* of a
    room are enforced when reading, and every ``max(size, 32)`` publications the publisher
    trims the subject with a purge-by-subject ``keep=max(size, 1)``, so a room holds at most
    ``size + max(size, 32)`` messages. The newest message of a room (its *head*) is never
    removed: it carries the room's ``seq`` and epoch, so ``seq`` never goes back.
    ``P.meta`` holds one message, the stream's *generation*: a random id written
    create-if-absent when the stream is created (or found without it).

Sequence: optimistic concurrency on the head. A publish reads the head (or uses the head it
    cached from its own last publish to that room), writes ``seq + 1`` with
    ``Nats-Expected-Last-Subject-Sequence: <head's stream sequence>`` (0 for an empty
    subject), and on JetStream's *wrong last sequence* error re-reads the head and retries.
    JetStream applies the check and the append atomically, so across all nodes each ``seq``
    is written exactly once and a room's stream order is its ``seq`` order. Publishes of one
    node to one room are serialised locally, so a node only retries against other nodes.
    A publish whose acknowledgement was lost is recognised on the retry by its publish id in
    the head, so it is never written twice.

Epoch: a room's messages carry its epoch; an empty room's epoch is derived from the stream's
    generation and the room name (``sha256(generation, room)``): every node computes the same
    value without a round trip or a stored key, an unpublished room leaves nothing behind,
    and when the history is lost (stream deleted or purged, data directory gone) the
    generation marker goes with it, a new one is written, and every room gets a new epoch.
    A NATS restart with file storage keeps stream, generation and epochs.

Fan-out: the stream *republishes* every stored message to ``P.r.<room>`` (JetStream
    RePublish): the server does it after storing, in stream order, so every subscribed node
    gets each room's publications in ``seq`` order even with many concurrent publishers, and
    a publication that is stored is fanned out even if its publisher dies right after.
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
import hashlib
import json
import random
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats
import nats.errors

from ..._log import get_logger
from .base import BrokerError, ChainedPublish, BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication

log = get_logger("wirehub.hub.broker.nats")

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_TOKEN = 400
_TRIM_EVERY = 32  # trim a room at least every this many publications
_HEADS_CACHED = 10_000  # rooms whose head this node remembers from its own publishes
_NODES_TTL = 3600.0  # the node-lease bucket's own max age: leases of long-dead nodes go away
_RESYNC_BATCH = 256

# JetStream API error codes
_NO_MESSAGE = 10037
_STREAM_NOT_FOUND = 10059
_WRONG_LAST_SEQUENCE = 10071
_STREAM_EXISTS = 10058

_Head = tuple[str, int, str, str, int, str]  # room, seq, epoch, sender, ts, publish id
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


def _decode_pub(body: bytes) -> tuple[Publication, str]:
    head, _, data = body.partition(b"\n")
    room, seq, epoch, sender, ts, pid = _head_decoder.decode(head)
    return Publication(room=room, seq=seq, epoch=epoch, data=msgspec.Raw(data), sender=sender, ts=ts), pid


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


class NatsBroker(ChainedPublish):
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
    ) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"NATS broker prefix {prefix!r}: use letters, digits, '_' and '-' only")
        if lease_s <= 0 or timeout <= 0:
            raise ValueError("lease_s and timeout must be positive")
        if storage not in ("file", "memory"):
            raise ValueError("storage must be 'file' or 'memory'")
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
        self._pub_locks = _Locks()
        self._heads: dict[str, tuple[int, int, str]] = {}  # room -> (stream seq, seq, epoch)
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

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        if self._recovery is not None:
            self._recovery.cancel()
        if self._up:
            self._up = False
            log.warning("nats_disconnected", url=self.url, node=self.node_id)
            self._notify(False)

    async def _on_closed(self) -> None:
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

    async def _flush(self) -> None:
        nc = self._conn()
        try:
            await nc.flush(timeout=self._timeout)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise self._wrap("a flush", exc) from exc

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
                pub, _ = _decode_pub(body)
                if pub.room != rs.room:
                    return
                async with rs.lock:
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
            pub, _ = _decode_pub(msg.data)
            if pub.room == rs.room and pub.epoch == rs.epoch and pub.seq > rs.seq and (upto is None or pub.seq < upto):
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

    async def publish(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy) -> Publication:
        self._conn()
        raw = data if isinstance(data, msgspec.Raw) else msgspec.Raw(data)
        payload = bytes(raw)
        subject = self._room_subject(room)
        pid = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        conflicts = 0
        async with self._pub_locks.hold(room):
            head = self._heads.pop(room, None)
            while True:
                if loop.time() > deadline:
                    raise BrokerError(f"could not append to {room!r} within {self._timeout:g}s ({conflicts} concurrent writes won first)")
                try:
                    if head is None:
                        found = await self._last(self._hist, subject)
                        if found is None:
                            head = (0, 0, await self._empty_epoch(room))
                        else:
                            stored, stored_pid = _decode_pub(found[1])
                            if stored_pid == pid:  # an earlier attempt did land
                                self._remember(room, (found[0], stored.seq, stored.epoch))
                                return Publication(room, stored.seq, stored.epoch, raw, sender, ts)
                            head = (found[0], stored.seq, stored.epoch)
                    stream_seq, seq, epoch = head
                    body = _encode((room, seq + 1, epoch, sender, ts, pid)) + b"\n" + payload
                    ack = await self._js_publish(subject, body, {"Nats-Expected-Last-Subject-Sequence": str(stream_seq)})
                except _ApiError as exc:
                    if exc.err_code != _WRONG_LAST_SEQUENCE:
                        raise
                    head = None
                    conflicts += 1
                    if conflicts > 2:
                        await asyncio.sleep(random.uniform(0, 0.002 * min(conflicts, 10)))
                    continue
                except _NoStream:
                    head = None
                    await self._ensure_history()
                    continue
                except BrokerError as exc:
                    if not self._connected():
                        raise
                    if loop.time() > deadline:
                        raise BrokerError(f"publish to {room!r} not confirmed (it may or may not be stored): {exc}", maybe_applied=True) from exc
                    head = None  # a lost answer: the head tells whether it landed
                    continue
                self._remember(room, (int(ack["seq"]), seq + 1, epoch))
                break
        pub = Publication(room=room, seq=seq + 1, epoch=epoch, data=raw, sender=sender, ts=ts)
        every = max(history.size, _TRIM_EVERY)
        if pub.seq % every == 0:
            try:
                await self._api(f"STREAM.PURGE.{self._hist}", {"filter": subject, "keep": max(history.size, 1)})
            except BrokerError as exc:
                log.warning("nats_trim_failed", room=room, error=str(exc))
        return pub

    def _remember(self, room: str, head: tuple[int, int, str]) -> None:
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
        pubs = []
        for msg in messages:
            pub, _ = _decode_pub(msg.data)
            if pub.room == room:
                pubs.append(pub)
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
        items = items[start:]
        if since is not None:
            items = [p for p in items if p.seq > since]
            complete = since <= position.seq and (since + 1 > position.seq or (bool(items) and items[0].seq == since + 1))
        else:
            complete = True
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return HistoryResult(items, position, complete)

    async def position(self, room: str) -> Position:
        try:
            found = await self._last(self._hist, self._room_subject(room))
        except _NoStream:
            await self._ensure_history()
            found = None
        if found is None:
            return Position(0, await self._empty_epoch(room))
        pub, _ = _decode_pub(found[1])
        return Position(pub.seq, pub.epoch)

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
            (self._presence_subject(room, client), _encode(_Entry(room, m.client, m.user, m.name, self.node_id, self._inc)))
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
        entry = _Entry(room, member.client, member.user, member.name, self.node_id, self._inc)
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
        return [Member(client=e.client, user=e.user, name=e.name) for e in await self._entries(prefix) if e.room == room]

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
                    name = _decode_pub(found[1])[0].room
            if name is not None:
                names.add(name)
        names.update(e.room for e in await self._entries(f"$KV.{self._presence_bucket}.>"))
        return sorted(names)
