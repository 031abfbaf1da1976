"""The Redis broker: a fleet of hub nodes sharing rooms, history, presence and direct messages.

Everything shared lives in one Redis (``redis://HOST:PORT/DB``), under a key prefix::

    {prefix}:m:{room}     hash    e = the stream's epoch, s = the last seq
    {prefix}:h:{room}     stream  history; entry id ``{seq}-0``, fields t = ts, b = body
    {prefix}:p:{room}     hash    presence: client id -> msgpack Member
    {prefix}:pe:{room}    zset    presence leases: client id -> expiry (ms, the nodes' clock)
    {prefix}:c:{client}   string  the node a client is connected to (PX = the lease)

    {prefix}:r:{room}     channel publications and room events of one room
    {prefix}:n:{node}     channel direct frames for the clients of one node

A publication is one Lua script (EVALSHA, reloaded on NOSCRIPT): it reads the room's epoch
(a new random one, and an emptied stream, when the meta hash had expired), increments the
seq, appends to the stream with an exact MAXLEN and drops entries older than the TTL, sets the
expiries and PUBLISHes on the room's channel, all atomically, so every node sees one order.

Each node keeps one dedicated pub/sub connection, read by one task: calls for one room reach
the handler in seq order. ``subscribe()`` returns once Redis acknowledged the SUBSCRIBE, and
``position()``/``history()`` of a subscribed room return only after the reader has handed the
node every publication Redis sent it before (a PING/PONG through the pub/sub connection), so
that, as with a local broker, no publication up to the position a join read arrives after
it. When that connection is lost the node reports the broker down,
refuses calls with :class:`BrokerError`, reconnects with backoff, resubscribes every room,
re-registers its clients and presence leases (Redis may have lost them), delivers from the
streams what was published while it was away (when history still holds it), and only then
reports the broker up again. A Redis that lost its data hands out new epochs: clients that
come back with a ``since`` from before are told their gap cannot be recovered.

Presence entries and client registrations are leases the node refreshes every ``lease_s/3``;
the entries of a node that dies without cleaning up disappear after ``lease_s``.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import secrets
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..._log import get_logger
from .base import BrokerError, ChainedPublish, BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication

log = get_logger("wirehub.hub.broker.redis")

T = TypeVar("T")

#: A room's seq and epoch are remembered at least this long after its last publication (or
#: the history TTL when longer): the seq does not restart for a room that merely went quiet.
META_MIN_TTL_MS = 3_600_000
MAX_TTL_MS = 10 * 365 * 86_400_000
MAX_SEQ = 2**52  # Lua numbers are doubles: a ``since`` beyond this is clamped (it is "ahead")
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
BATCH = 1000  # commands per pipeline / channels per SUBSCRIBE

# -- Lua -------------------------------------------------------------------------------------

_TRIM = """
local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end
local function trim_old(stream, horizon)
  while true do
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if #first == 0 or tonumber(first[1][2][2]) >= horizon then
      return
    end
    redis.call('XDEL', stream, first[1][1])
  end
end
local function trim(stream, size, horizon)
  if size <= 0 then
    redis.call('DEL', stream)
    return
  end
  redis.call('XTRIM', stream, 'MAXLEN', size)
  trim_old(stream, horizon)
end
"""

# KEYS: meta, stream
# ARGV: new epoch, size, ttl ms, meta ttl ms, horizon ms, ts, body, channel
PUBLISH_LUA = (
    _TRIM
    + """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', meta, 's', 1)
local size = tonumber(ARGV[2])
if size > 0 then
  redis.call('XADD', stream, 'MAXLEN', size, seq .. '-0', 't', ARGV[6], 'b', ARGV[7])
  trim_old(stream, tonumber(ARGV[5]))
  redis.call('PEXPIRE', stream, ARGV[3])
else
  redis.call('DEL', stream)
end
redis.call('PEXPIRE', meta, ARGV[4])
redis.call('PUBLISH', ARGV[8], 'p' .. seq .. ' ' .. epoch .. ' ' .. ARGV[7])
return {seq, epoch}
"""
)

# KEYS: meta, stream
# ARGV: new epoch, meta ttl ms, mode ("pos" | "hist"), size, horizon ms, since ("" = none),
#       limit ("" = none)
# -> {seq, epoch} or {seq, epoch, complete, reversed, id1, body1, id2, body2, ...}
READ_LUA = (
    _TRIM
    + """
local meta, stream = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'e', 's')
local epoch, seq = m[1], tonumber(m[2])
if not epoch then
  epoch, seq = ARGV[1], 0
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 's', 0)
  redis.call('PEXPIRE', meta, ARGV[2])
end
if ARGV[3] == 'pos' then
  return {seq, epoch}
end
trim(stream, tonumber(ARGV[4]), tonumber(ARGV[5]))
local complete = 1
local start = '-'
if ARGV[6] ~= '' then
  local since = tonumber(ARGV[6])
  if since < 0 or since > seq then
    complete = 0
  elseif since < seq then
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if #first == 0 or seq_of(first[1][1]) > since + 1 or seq_of(last[1][1]) ~= seq then
      complete = 0
    end
  end
  if since >= 0 then
    start = string.format('%d-0', since + 1)
  end
end
local entries, reversed = {}, 0
if ARGV[7] == '' then
  entries = redis.call('XRANGE', stream, start, '+')
elseif tonumber(ARGV[7]) > 0 then
  entries = redis.call('XREVRANGE', stream, '+', start, 'COUNT', tonumber(ARGV[7]))
  reversed = 1
end
local out = {seq, epoch, complete, reversed}
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][4]
end
return out
"""
)

# What a node missed while its pub/sub connection was away.
# KEYS: meta, stream; ARGV: the epoch last seen ("" = none), the seq last seen
# -> {epoch or false, id1, body1, ...}
CATCH_UP_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  return {false}
end
local start = '-'
if epoch == ARGV[1] then
  start = string.format('%d-0', tonumber(ARGV[2]) + 1)
end
local out = {epoch}
for _, e in ipairs(redis.call('XRANGE', KEYS[2], start, '+')) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][4]
end
return out
"""

# KEYS: presence hash, lease zset; ARGV: now ms -> {client1, member1, ...}
PRESENCE_LUA = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
for i = 1, #gone, 500 do
  redis.call('HDEL', KEYS[1], unpack(gone, i, math.min(i + 499, #gone)))
end
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: client key; ARGV: node channel prefix, payload -> receivers
SEND_LUA = """
local node = redis.call('GET', KEYS[1])
if not node then
  return 0
end
return redis.call('PUBLISH', ARGV[1] .. node, ARGV[2])
"""

# KEYS: client key; ARGV: node id
FORGET_CLIENT_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# -- encoding ----------------------------------------------------------------------------------

_encode = msgspec.msgpack.Encoder().encode
_decode_body = msgspec.msgpack.Decoder(tuple[str, str, int, bytes]).decode  # room, sender, ts, data
_decode_pair = msgspec.msgpack.Decoder(tuple[str, bytes]).decode
_decode_member = msgspec.msgpack.Decoder(Member).decode


def _publication(body: bytes, seq: int, epoch: str) -> Publication:
    room, sender, ts, data = _decode_body(body)
    return Publication(room=room, seq=seq, epoch=epoch, data=msgspec.Raw(data), sender=sender, ts=ts)


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)



#: connections one node keeps to Redis for commands (pub/sub has its own)
POOL_SIZE = 256

class RedisBroker(ChainedPublish):
    """:class:`~wirehub.hub.broker.base.Broker` on Redis (see the module docstring)."""

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
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.url = url
        self.prefix = prefix
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.lease_s = lease_s
        self._clock = clock
        self._timeout = timeout  # every socket operation and every call is bounded by it
        self._client: aioredis.Redis | None = None
        self._where = "redis"
        self._handler: BrokerHandler | None = None
        self._closing = False
        self._up = False  # the pub/sub connection is established and subscribed
        self._conn: Any = None  # that connection (redis.asyncio.connection.Connection)
        self._reader: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._inflight = 0  # calls under way; close() lets them finish (bounded)
        self._idle = asyncio.Event()
        self._idle.set()
        self._sub_lock = asyncio.Lock()  # SUBSCRIBE / UNSUBSCRIBE go out in call order
        self._acks: collections.deque[tuple[bytes, bytes, asyncio.Future[None]]] = collections.deque()
        self._pings: dict[bytes, asyncio.Future[None]] = {}  # PING token -> awaiting its PONG
        self._ping_n = 0
        self._want: set[str] = set()  # rooms this node subscribes to
        self._last: dict[str, tuple[str, int]] = {}  # room -> (epoch, seq) last delivered
        self._base: dict[str, tuple[str | None, int]] = {}  # room -> position when subscribed
        self._clients: set[str] = set()  # clients on this node (direct-message leases)
        self._members: dict[str, dict[str, Member]] = {}  # room -> this node's presence entries
        self._room_ch = f"{prefix}:r:"
        self._room_ch_b = self._room_ch.encode()
        self._node_ch_prefix = f"{prefix}:n:"
        self._node_ch = f"{prefix}:n:{self.node_id}".encode()

    # -- keys --------------------------------------------------------------------------------
    def _meta(self, room: str) -> str:
        return f"{self.prefix}:m:{room}"

    def _stream(self, room: str) -> str:
        return f"{self.prefix}:h:{room}"

    def _pkey(self, room: str) -> str:
        return f"{self.prefix}:p:{room}"

    def _pekey(self, room: str) -> str:
        return f"{self.prefix}:pe:{room}"

    def _ckey(self, client: str) -> str:
        return f"{self.prefix}:c:{client}"

    def _channel(self, room: str) -> bytes:
        return (self._room_ch + room).encode()

    # -- time --------------------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    @staticmethod
    def _ttl_ms(policy: HistoryPolicy) -> int:
        ttl = policy.ttl
        if not ttl > 0:  # also NaN
            return 1
        if not math.isfinite(ttl):
            return MAX_TTL_MS
        return max(1, min(MAX_TTL_MS, int(ttl * 1000)))

    # -- life cycle --------------------------------------------------------------------------
    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._closing = False
        # A blocking pool: when every connection is busy (a thousand clients joining at once),
        # a call waits for one (up to the timeout) instead of failing with "Too many
        # connections". ``?max_connections=N`` in the URL changes the size.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=POOL_SIZE,
            timeout=self._timeout,
            protocol=2,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),  # a publish is never sent twice
            client_name=f"wirehub-{self.node_id}",
        )
        client = aioredis.Redis(connection_pool=pool)
        kwargs = client.connection_pool.connection_kwargs
        self._where = f"redis at {kwargs.get('path') or '%s:%s' % (kwargs.get('host'), kwargs.get('port'))}/{kwargs.get('db', 0)}"
        self._client = client
        self._publish = client.register_script(PUBLISH_LUA)
        self._read = client.register_script(READ_LUA)
        self._catch_up = client.register_script(CATCH_UP_LUA)
        self._presence_script = client.register_script(PRESENCE_LUA)
        self._send = client.register_script(SEND_LUA)
        self._forget_client = client.register_script(FORGET_CLIENT_LUA)
        try:
            async with asyncio.timeout(self._timeout):
                await client.ping()
            self._conn, buffered = await self._open_pubsub([])
        except (RedisError, OSError, TimeoutError) as exc:
            await self._close_client()
            raise BrokerError(f"cannot reach {self._where}: {exc or type(exc).__name__}") from exc
        self._up = True
        for msg in buffered:
            self._dispatch(msg)
        self._reader = asyncio.create_task(self._run(), name=f"redis-broker-reader-{self.node_id}")
        self._refresher = asyncio.create_task(self._refresh_loop(), name=f"redis-broker-leases-{self.node_id}")

    async def close(self) -> None:
        self._closing = True  # new calls are refused from here on
        if self._inflight:  # the calls under way finish first (a node's last clean-ups)
            try:
                async with asyncio.timeout(self._timeout * 2):
                    await self._idle.wait()
            except TimeoutError:
                pass
        tasks = [t for t in (self._reader, self._refresher) if t is not None]
        self._reader = self._refresher = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # pragma: no cover - the tasks catch their own errors
                log.warning("redis_broker_task_failed", error=repr(exc))
        was_up, self._up = self._up, False
        self._fail_acks("the broker is closing")
        if was_up and self._client is not None:
            try:  # best effort: this node's leases go now rather than after lease_s
                async with asyncio.timeout(self._timeout):
                    await self._forget_everything()
            except Exception as exc:
                log.debug("redis_broker_cleanup_failed", error=str(exc) or type(exc).__name__)
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._disconnect(conn)
        await self._close_client()
        self._handler = None

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await (client.aclose() if hasattr(client, "aclose") else client.close())
            except Exception as exc:  # closing must not fail
                log.debug("redis_broker_close_failed", error=repr(exc))

    def ready(self) -> bool:
        return self._up

    # -- calls -------------------------------------------------------------------------------
    def _check(self, what: str) -> aioredis.Redis:
        client = self._client
        if client is None or self._closing:
            raise BrokerError(f"cannot {what}: the redis broker is not running")
        if not self._up:
            raise BrokerError(f"cannot {what}: {self._where} is unreachable (reconnecting)")
        return client

    async def _call(self, what: str, make: Callable[[aioredis.Redis], Awaitable[T]], *, unknown: bool = False) -> T:
        """Run one Redis round trip, turning every failure into a :class:`BrokerError`.
        ``unknown``: a timeout leaves the outcome unknown (say so)."""
        client = self._check(what)
        self._inflight += 1
        self._idle.clear()
        try:
            async with asyncio.timeout(self._timeout * 2):
                return await make(client)
        except (RedisError, OSError, TimeoutError) as exc:
            if self._closing:
                raise BrokerError(f"cannot {what}: the redis broker was closed meanwhile") from exc
            # The request was sent: a lost answer leaves its outcome unknown.
            outcome = " (it may or may not have been applied)" if unknown else ""
            if isinstance(exc, (RedisTimeoutError, TimeoutError)):
                raise BrokerError(f"cannot {what}: {self._where} did not answer within {self._timeout:g}s{outcome}", maybe_applied=unknown) from exc
            if isinstance(exc, (RedisConnectionError, OSError)):
                raise BrokerError(f"cannot {what}: {self._where} went away{outcome}: {exc}", maybe_applied=unknown) from exc
            raise BrokerError(f"cannot {what}: {self._where} refused: {exc}") from exc
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    # -- rooms: delivery ---------------------------------------------------------------------
    async def subscribe(self, room: str) -> None:
        self._want.add(room)
        self._last.pop(room, None)
        self._base.pop(room, None)
        try:
            await self._sub_command(b"subscribe", room)
        except BaseException:
            self._want.discard(room)
            raise
        try:  # where the stream stood: the reference for a catch-up after a reconnect
            meta = await self._call(f"subscribe to {room!r}", lambda c: c.hmget(self._meta(room), "e", "s"))
        except BaseException:
            await self.unsubscribe(room)
            raise
        if room in self._want and room not in self._last:
            epoch, seq = meta
            self._base[room] = (epoch.decode() if epoch is not None else None, int(seq or 0))

    async def unsubscribe(self, room: str) -> None:
        self._want.discard(room)
        self._last.pop(room, None)
        self._base.pop(room, None)
        try:
            await self._sub_command(b"unsubscribe", room)
        except BrokerError as exc:
            # Nothing to undo: a lost connection forgets its subscriptions, and the reconnect
            # subscribes only the rooms still wanted. Messages that still arrive are dropped.
            log.debug("redis_unsubscribe_failed", room=room, error=str(exc))

    async def _sub_command(self, kind: bytes, room: str) -> None:
        """Send SUBSCRIBE/UNSUBSCRIBE on the pub/sub connection and await Redis's ack, so
        that whatever is published after this returns is (or is not) delivered here."""
        channel = self._channel(room)
        what = f"{kind.decode()} {room!r}"
        async with self._sub_lock:
            self._check(what)
            conn = self._conn
            if not conn.is_connected:  # lost, and the reader has yet to notice: never reconnect here
                raise BrokerError(f"cannot {what}: lost the connection to {self._where}")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (kind, channel, fut)
            self._acks.append(entry)
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.send_command(kind.upper(), channel)
                    await fut
            except TimeoutError as exc:
                raise BrokerError(f"cannot {what}: {self._where} did not answer within {self._timeout:g}s") from exc
            except (RedisError, OSError) as exc:
                raise BrokerError(f"cannot {what}: {self._where} is unreachable: {exc}") from exc
            finally:
                try:
                    self._acks.remove(entry)
                except ValueError:
                    pass

    async def publish(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy) -> Publication:
        raw = data if isinstance(data, msgspec.Raw) else msgspec.Raw(data)
        body = _encode((room, sender, ts, bytes(raw)))
        ttl_ms = self._ttl_ms(history)
        args = [
            secrets.token_hex(6),
            max(0, history.size),
            ttl_ms,
            max(ttl_ms, META_MIN_TTL_MS),
            ts - ttl_ms,
            ts,
            body,
            self._channel(room),
        ]
        seq, epoch = await self._call(
            f"publish to {room!r}",
            lambda c: self._publish(keys=[self._meta(room), self._stream(room)], args=args, client=c),
            unknown=True,
        )
        return Publication(room=room, seq=int(seq), epoch=epoch.decode(), data=raw, sender=sender, ts=ts)

    async def room_event(self, room: str, frame: bytes, *, exclude: str = "") -> None:
        payload = b"e" + _encode((exclude, bytes(frame)))
        await self._call(f"send an event to {room!r}", lambda c: c.publish(self._channel(room), payload))

    # -- rooms: history ----------------------------------------------------------------------
    async def history(self, room: str, *, since: int | None = None, limit: int | None = None, history: HistoryPolicy) -> HistoryResult:
        ttl_ms = self._ttl_ms(history)
        args = [
            secrets.token_hex(6),
            max(ttl_ms, META_MIN_TTL_MS),
            "hist",
            max(0, history.size),
            self._now_ms() - ttl_ms,
            "" if since is None else max(-1, min(since, MAX_SEQ)),
            "" if limit is None else max(0, min(limit, 2**31)),
        ]
        reply = await self._call(
            f"read the history of {room!r}",
            lambda c: self._read(keys=[self._meta(room), self._stream(room)], args=args, client=c),
        )
        seq, epoch_b, complete, reversed_ = reply[:4]
        epoch = epoch_b.decode()
        items = reply[4:]
        pubs = [_publication(items[i + 1], _seq_of(items[i]), epoch) for i in range(0, len(items), 2)]
        if reversed_:
            pubs.reverse()
        result = HistoryResult(pubs, Position(int(seq), epoch), bool(complete))
        if room in self._want:
            await self._flush(f"read the history of {room!r}")
        return result

    async def position(self, room: str) -> Position:
        args = [secrets.token_hex(6), META_MIN_TTL_MS, "pos", 0, 0, "", ""]
        seq, epoch = await self._call(
            f"read the position of {room!r}",
            lambda c: self._read(keys=[self._meta(room), self._stream(room)], args=args, client=c),
        )
        if room in self._want:
            await self._flush(f"read the position of {room!r}")
        return Position(int(seq), epoch.decode())

    async def _flush(self, what: str) -> None:
        """Return once the reader has handed the node everything Redis sent this node before
        now: a PING on the pub/sub connection, whose PONG comes after all of it.

        After ``history()``/``position()`` of a subscribed room, every publication up to the
        position returned has been delivered already (those that will be delivered at all),
        as with a local broker: the node never gets one of them after it answered a join."""
        self._check(what)
        conn = self._conn
        if not conn.is_connected:
            raise BrokerError(f"cannot {what}: lost the connection to {self._where}")
        self._ping_n += 1
        token = b"w%d" % self._ping_n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        try:
            async with asyncio.timeout(self._timeout):
                await conn.send_command("PING", token)
                await fut
        except TimeoutError as exc:
            raise BrokerError(f"cannot {what}: {self._where} did not answer within {self._timeout:g}s") from exc
        except (RedisError, OSError) as exc:
            raise BrokerError(f"cannot {what}: {self._where} is unreachable: {exc}") from exc
        finally:
            self._pings.pop(token, None)

    # -- direct messages ---------------------------------------------------------------------
    async def add_client(self, client: str) -> None:
        self._clients.add(client)  # registered again on reconnect if this fails
        await self._call(f"register client {client!r}", lambda c: c.set(self._ckey(client), self.node_id, px=self._lease_ms))

    async def remove_client(self, client: str) -> None:
        self._clients.discard(client)  # unrefreshed, its lease runs out if this fails
        await self._call(
            f"unregister client {client!r}",
            lambda c: self._forget_client(keys=[self._ckey(client)], args=[self.node_id], client=c),
        )

    async def send(self, client: str, frame: bytes) -> bool:
        payload = b"d" + _encode((client, bytes(frame)))
        receivers = await self._call(
            f"send to client {client!r}",
            lambda c: self._send(keys=[self._ckey(client)], args=[self._node_ch_prefix, payload], client=c),
        )
        return int(receivers) > 0

    # -- presence ----------------------------------------------------------------------------
    async def presence_add(self, room: str, member: Member) -> None:
        self._members.setdefault(room, {})[member.client] = member  # re-added on reconnect

        async def run(c: aioredis.Redis) -> Any:
            pipe = c.pipeline(transaction=True)
            self._queue_member(pipe, room, member)
            return await pipe.execute()

        await self._call(f"add {member.client!r} to the presence of {room!r}", run)

    async def presence_remove(self, room: str, client: str) -> None:
        members = self._members.get(room)
        if members is not None:
            members.pop(client, None)
            if not members:
                del self._members[room]

        async def run(c: aioredis.Redis) -> Any:
            pipe = c.pipeline(transaction=True)
            pipe.hdel(self._pkey(room), client)
            pipe.zrem(self._pekey(room), client)
            return await pipe.execute()

        await self._call(f"remove {client!r} from the presence of {room!r}", run)

    async def presence(self, room: str) -> list[Member]:
        reply = await self._call(
            f"read the presence of {room!r}",
            lambda c: self._presence_script(keys=[self._pkey(room), self._pekey(room)], args=[self._now_ms()], client=c),
        )
        pairs = sorted((reply[i], reply[i + 1]) for i in range(0, len(reply), 2))
        return [_decode_member(blob) for _, blob in pairs]

    def _queue_member(self, pipe: Any, room: str, member: Member) -> None:
        gc_ms = self._lease_ms * 2
        pipe.hset(self._pkey(room), member.client, _encode(member))
        pipe.zadd(self._pekey(room), {member.client: self._now_ms() + self._lease_ms})
        pipe.pexpire(self._pkey(room), gc_ms)
        pipe.pexpire(self._pekey(room), gc_ms)

    async def rooms(self) -> list[str]:
        async def run(c: aioredis.Redis) -> list[str]:
            found: set[str] = set()
            escaped = _glob_escape(self.prefix)
            metas = [key async for key in c.scan_iter(match=f"{escaped}:m:*", count=1000)]
            cut = len(self.prefix.encode()) + 3  # "{prefix}:m:" and "{prefix}:p:"
            for i in range(0, len(metas), BATCH):
                chunk = metas[i : i + BATCH]
                pipe = c.pipeline(transaction=False)
                for key in chunk:
                    pipe.hget(key, "s")
                for key, seq in zip(chunk, await pipe.execute()):
                    if seq is not None and int(seq) > 0:
                        found.add(key[cut:].decode())
            now = self._now_ms()
            present = [key async for key in c.scan_iter(match=f"{escaped}:p:*", count=1000)]
            for i in range(0, len(present), BATCH):
                chunk = [key[cut:].decode() for key in present[i : i + BATCH]]
                pipe = c.pipeline(transaction=False)
                for room in chunk:
                    pipe.zcount(self._pekey(room), now, "+inf")
                for room, alive in zip(chunk, await pipe.execute()):
                    if alive:
                        found.add(room)
            return sorted(found)

        return await self._call("list the rooms", run)

    # -- leases ------------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not self._up:
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    await self._refresh(full=False)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("redis_lease_refresh_failed", error=str(exc) or type(exc).__name__)
            except Exception:  # never let the refresher die
                log.exception("redis_lease_refresh_failed")

    async def _refresh(self, *, full: bool) -> None:
        """Extend this node's leases. ``full`` writes every entry again (after a reconnect:
        Redis may have lost them); otherwise presence entries removed meanwhile (by another
        node, or expired) stay removed."""
        client = self._client
        if client is None:
            return
        lease_ms, gc_ms = self._lease_ms, self._lease_ms * 2
        expiry = self._now_ms() + lease_ms
        commands: list[Callable[[Any], Any]] = []
        for c in list(self._clients):
            commands.append(lambda p, c=c: p.set(self._ckey(c), self.node_id, px=lease_ms))
        for room, members in list(self._members.items()):
            for member in list(members.values()):
                if full:
                    commands.append(lambda p, r=room, m=member: self._queue_member(p, r, m))
                else:
                    commands.append(lambda p, r=room, m=member: p.zadd(self._pekey(r), {m.client: expiry}, xx=True))
            if not full:
                commands.append(lambda p, r=room: (p.pexpire(self._pkey(r), gc_ms), p.pexpire(self._pekey(r), gc_ms)))
        for i in range(0, len(commands), BATCH):
            pipe = client.pipeline(transaction=False)
            for queue in commands[i : i + BATCH]:
                queue(pipe)
            await pipe.execute()

    async def _forget_everything(self) -> None:
        client = self._client
        if client is None or not (self._clients or self._members):
            return
        pipe = client.pipeline(transaction=False)
        for c in self._clients:
            await self._forget_client(keys=[self._ckey(c)], args=[self.node_id], client=pipe)  # queued
        for room, members in self._members.items():
            for member in members:
                pipe.hdel(self._pkey(room), member)
                pipe.zrem(self._pekey(room), member)
        await pipe.execute()
        self._clients.clear()
        self._members.clear()

    # -- the pub/sub connection --------------------------------------------------------------
    def _new_connection(self) -> Any:
        assert self._client is not None
        pool = self._client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(socket_timeout=None, socket_connect_timeout=self._timeout, client_name=f"wirehub-sub-{self.node_id}")
        kwargs.pop("max_connections", None)
        return pool.connection_class(**kwargs)

    async def _disconnect(self, conn: Any) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await conn.disconnect(nowait=True)
        except Exception as exc:
            log.debug("redis_disconnect_failed", error=repr(exc))

    async def _open_pubsub(self, rooms: list[str]) -> tuple[Any, list[Any]]:
        """A new pub/sub connection subscribed to this node's channel and ``rooms``, once
        Redis acknowledged every subscription; the messages that came meanwhile, in order."""
        conn = self._new_connection()
        try:
            async with asyncio.timeout(self._timeout):
                await conn.connect()
                channels = [self._node_ch] + [self._channel(r) for r in rooms]
                pending = set(channels)
                for i in range(0, len(channels), BATCH):
                    await conn.send_command("SUBSCRIBE", *channels[i : i + BATCH])
                buffered = []
                while pending:
                    msg = await conn.read_response(timeout=self._timeout)
                    if msg is None:
                        raise TimeoutError("no subscription ack")
                    if msg[0] == b"subscribe":
                        pending.discard(msg[1])
                    else:
                        buffered.append(msg)
        except BaseException:
            await self._disconnect(conn)
            raise
        return conn, buffered

    async def _run(self) -> None:
        """The reader: deliver what arrives; when the connection is lost, report it, reconnect
        with backoff, catch up and report the broker back."""
        while True:
            conn = self._conn
            reason = "closed"
            try:
                await self._read_loop(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
            await self._lost(conn, reason)
            await self._reconnect()

    async def _read_loop(self, conn: Any) -> None:
        idle = max(self._timeout, 0.05)
        pinged = False
        while True:
            msg = await conn.read_response(timeout=idle)
            if msg is None:  # quiet for a while: make sure Redis is still there
                if pinged:
                    raise RedisConnectionError(f"no answer to PING within {idle:g}s")
                pinged = True
                async with asyncio.timeout(self._timeout):
                    await conn.send_command("PING")
                continue
            pinged = False
            self._dispatch(msg)

    async def _lost(self, conn: Any, reason: str) -> None:
        self._up = False
        self._conn = None
        self._fail_acks(f"lost the connection to {self._where}: {reason}")
        await self._disconnect(conn)
        log.warning("redis_broker_down", where=self._where, error=reason)
        self._notify(False)

    def _fail_acks(self, message: str) -> None:
        futures = [fut for _, _, fut in self._acks] + list(self._pings.values())
        self._acks.clear()
        self._pings.clear()
        for fut in futures:
            if not fut.done():
                fut.set_exception(BrokerError(message))

    async def _reconnect(self) -> None:
        delay = BACKOFF_MIN_S
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX_S)
            rooms = list(self._want)
            try:
                conn, buffered = await self._open_pubsub(rooms)
            except Exception as exc:
                log.debug("redis_reconnect_failed", where=self._where, error=str(exc) or type(exc).__name__)
                continue
            try:
                async with asyncio.timeout(self._timeout * 2):
                    await self._refresh(full=True)
                    missed = await self._missed(rooms)
            except Exception as exc:  # Redis failed again (or a bug): try again later
                if not isinstance(exc, (RedisError, OSError, TimeoutError)):
                    log.exception("redis_reconnect_failed", where=self._where)
                log.debug("redis_reconnect_failed", where=self._where, error=str(exc) or type(exc).__name__)
                await self._disconnect(conn)
                continue
            self._conn = conn
            for pub in missed:
                self._deliver(pub)
            for msg in buffered:
                self._dispatch(msg)
            stale = [self._channel(r) for r in rooms if r not in self._want]
            try:
                async with asyncio.timeout(self._timeout):
                    for i in range(0, len(stale), BATCH):
                        await conn.send_command("UNSUBSCRIBE", *stale[i : i + BATCH])
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("redis_reconnect_failed", where=self._where, error=str(exc))
                self._conn = None
                await self._disconnect(conn)
                continue
            self._up = True
            log.warning("redis_broker_up", where=self._where)
            self._notify(True)
            return

    async def _missed(self, rooms: list[str]) -> list[Publication]:
        """What was published to ``rooms`` after the last publication delivered here (or after
        the subscription, when none was), as far as the streams still hold it."""
        assert self._client is not None
        known = [(room, self._last.get(room) or self._base.get(room)) for room in rooms]
        known = [(room, last) for room, last in known if last is not None]
        out: list[Publication] = []
        for i in range(0, len(known), BATCH):
            chunk = known[i : i + BATCH]
            pipe = self._client.pipeline(transaction=False)
            for room, (epoch, seq) in chunk:
                await self._catch_up(keys=[self._meta(room), self._stream(room)], args=[epoch or "", seq], client=pipe)  # queued
            for reply in await pipe.execute():
                if not reply or reply[0] is None:
                    continue
                epoch = reply[0].decode()
                items = reply[1:]
                out.extend(_publication(items[j + 1], _seq_of(items[j]), epoch) for j in range(0, len(items), 2))
        return out

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, msg: Any) -> None:
        try:
            kind = msg[0]
            if kind == b"message":
                self._on_message(msg[1], msg[2])
            elif kind in (b"subscribe", b"unsubscribe"):
                for entry in self._acks:
                    if entry[0] == kind and entry[1] == msg[1]:
                        if not entry[2].done():
                            entry[2].set_result(None)
                        self._acks.remove(entry)
                        break
            elif kind == b"pong":  # liveness, or a flush
                fut = self._pings.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
        except Exception:
            log.exception("redis_broker_bad_message", message=repr(msg)[:200])

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        tag = payload[:1]
        if tag == b"d":
            client, frame = _decode_pair(payload[1:])
            self._safely(handler.on_direct, client, frame)
            return
        if not channel.startswith(self._room_ch_b):
            return
        room = channel[len(self._room_ch_b) :].decode()
        if room not in self._want:
            return
        if tag == b"p":
            seq, _, rest = payload[1:].partition(b" ")
            epoch, _, body = rest.partition(b" ")
            self._deliver(_publication(body, int(seq), epoch.decode()))
        elif tag == b"e":
            exclude, frame = _decode_pair(payload[1:])
            self._safely(handler.on_room_event, room, frame, exclude)

    def _deliver(self, pub: Publication) -> None:
        """Hand ``pub`` to the node once, in seq order (a catch-up may overlap live ones)."""
        room = pub.room
        if room not in self._want or self._handler is None:
            return
        last = self._last.get(room)
        if last is not None and last[0] == pub.epoch and pub.seq <= last[1]:
            return
        self._last[room] = (pub.epoch, pub.seq)
        self._safely(self._handler.on_publication, pub)

    def _notify(self, up: bool) -> None:
        if self._handler is not None and not self._closing:
            self._safely(self._handler.on_broker_state, up)

    @staticmethod
    def _safely(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("redis_broker_handler_failed", callback=getattr(fn, "__name__", repr(fn)))
