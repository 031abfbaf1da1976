"""The Redis broker: a fleet of hub nodes sharing rooms, history, presence and direct messages.

Everything shared lives in one Redis (``redis://HOST:PORT/DB``), under a key prefix::

    {prefix}:m:{room}     hash    e = the stream's epoch, s = the last seq, o = the ts of the
                                  stream's oldest entry when the publish script last looked
    {prefix}:h:{room}     stream  history; entry id ``{seq}-0``, fields t = ts, b = body
    {prefix}:p:{room}     hash    presence: client id -> msgpack Member
    {prefix}:pe:{room}    zset    presence leases: client id -> expiry (ms, the nodes' clock)
    {prefix}:c:{client}   string  the node a client is connected to (PX = the lease)

    {prefix}:r:{room}     channel publications and room events of one room
    {prefix}:n:{node}     channel direct frames for the clients of one node

Publications go through one Lua script (EVALSHA, reloaded on NOSCRIPT) that, for each room of
the call, reads the room's epoch (a new one, and an emptied stream, when the meta hash had
expired), increments the seq, appends to the stream trimmed to the history size and drops
entries older than the TTL, sets the expiries and PUBLISHes on the room's channel, all
atomically, so every node sees one order. One call carries the batches of several rooms (the
publications of one event-loop turn); a room that fails there fails alone.

Each node keeps two connections to Redis (``_resp.py``, replies parsed by hiredis), with no
pool and no request/response lock-step:

- **commands**, auto-pipelined: every command issued in one event-loop turn, by any number of
  client connections, leaves in one write, and the replies are matched in order. Redis runs
  a connection's commands in arrival order, so publications are applied in call order: a
  connection's ``publish_nowait`` calls need not wait for each other's round trip, and a
  room's ``seq`` still follows publish order. A hung Redis is noticed when the oldest
  unanswered command is ``timeout`` old; the connection is dropped and every command in
  flight fails with :class:`BrokerError` (``maybe_applied`` for writes that were sent).
  Work that many clients ask for together is shared: the recovery reads
  (``history(since=...)``) of one room asked for in one turn, or while its last one was under
  way, are one script call from the oldest ``since``, and the client leases and presence
  entries written or removed in one turn are one MULTI/EXEC, so that a storm of thousands of
  re-joins into one room after a restart costs a few calls a turn.
- **pub/sub**: every message parsed from one socket read is handed to the node in the same
  event-loop turn, so the hub writes a read's worth of publications to each subscriber in
  one write, as with the memory broker. Calls for one room reach the handler in seq order.
  ``subscribe()`` returns once Redis acknowledged the SUBSCRIBE, and
  ``position()``/``history()`` of a subscribed room return only after the node was handed
  every publication Redis sent it before (a PING/PONG through the pub/sub connection), so
  that, as with a local broker, no publication up to the position a join read arrives after
  it.

When either connection is lost the node reports the broker down,
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
import functools
import hashlib
import math
import random
import time
import uuid
from typing import Any, Callable

import msgspec

from ..._log import get_logger
from .publishing import Batch, Publisher
from ._resp import CommandLink, Endpoint, LinkLost, ReplyError, SubscriberLink, open_link
from .base import BrokerError, BrokerHandler, HistoryPolicy, HistoryResult, Member, Position, Publication

log = get_logger("wirehub.hub.broker.redis")

#: A room's seq and epoch are remembered at least this long after its last publication (or
#: the history TTL when longer): the seq does not restart for a room that merely went quiet.
META_MIN_TTL_MS = 3_600_000
MAX_TTL_MS = 10 * 365 * 86_400_000
MAX_SEQ = 2**52  # Lua numbers are doubles: a ``since`` beyond this is clamped (it is "ahead")
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
BATCH = 1000  # commands per pipeline / channels per SUBSCRIBE
MIN_REDIS = (6, 2)  # XADD/XTRIM ... MINID


def _redis_version(info: bytes) -> tuple[int, ...]:
    for line in info.splitlines():
        if line.startswith(b"redis_version:"):
            try:
                return tuple(int(x) for x in line.split(b":", 1)[1].strip().split(b".")[:2])
            except ValueError:
                break
    return MIN_REDIS  # not said (a Redis-compatible server): assume it is recent enough

# -- Lua -------------------------------------------------------------------------------------

_TRIM = """
local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end
-- an entry's fields: t (the newest ts), b (the body), or t, n (count), b (the batch)
local function count_of(fields)
  if fields[3] == 'n' then
    return tonumber(fields[4])
  end
  return 1
end
local function blob_of(fields)
  if fields[3] == 'n' then
    return fields[6]
  end
  return fields[4]
end
-- drops the entries older than horizon from the head; returns the ts (t) of the oldest one
-- left, as stored (nil: the stream is empty)
local function trim_old(stream, horizon)
  while true do
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if #first == 0 then
      return nil
    end
    local t = first[1][2][2]
    if tonumber(t) >= horizon then
      return t
    end
    redis.call('XDEL', stream, first[1][1])
  end
end
local function trim(stream, size, top, horizon)
  if size <= 0 then
    redis.call('DEL', stream)
    return
  end
  redis.call('XTRIM', stream, 'MINID', string.format('%d', math.max(0, top - size + 1)))
  trim_old(stream, horizon)
end
"""

# The batches of one event-loop turn, several rooms' in one call (at most CALL_ROOMS rooms and
# about CALL_BYTES of data: see _publishing.py), each room's as if it were a call of its own:
# one entry (and one message on the room's channel) per batch, the n publications of one room
# from one turn. The entry's id is the batch's last seq.
# KEYS: meta1, stream1, meta2, stream2, ...
# ARGV: epoch seed, epoch counter (a room found without an epoch gets the seed and, in hex, the
#       counter plus its index - 1), then 7 per room: size, ttl ms, meta ttl ms, ts (the
#       newest), n, blob, channel
# -> {seq1, epoch1, seq2, epoch2, ...}: each room's last seq and epoch or, for a room that
#    failed (WRONGTYPE on its keys, OOM) and wrote nothing, its error and false
PUBLISH_LUA = (
    _TRIM
    + """
local function publish(meta, stream, a, i)
  -- every write up to the first one that succeeded through pcall: a room that fails writes nothing
  local m = redis.pcall('HMGET', meta, 'e', 's', 'o')
  if m.err then
    return m, false
  end
  local epoch = m[1]
  local n = tonumber(ARGV[a + 4])
  local seq = n
  local r
  if not epoch then
    epoch = string.format('%s%x', ARGV[1], ARGV[2] + i - 1)
    r = redis.pcall('DEL', stream)
    if type(r) == 'table' then
      return r, false
    end
  else
    seq = tonumber(m[2]) + n
  end
  local size = tonumber(ARGV[a])
  local seq_s = string.format('%d', seq)  -- (n and ts go on as the strings given: no number formatting)
  local oldest = false
  -- the stream first: when the append fails, nothing was written and no seq was used
  if size > 0 then
    local floor = string.format('%d', math.max(0, seq - size + 1))
    if n == 1 then
      r = redis.pcall('XADD', stream, 'MINID', floor, seq_s .. '-0', 't', ARGV[a + 3], 'b', ARGV[a + 5])
    else
      r = redis.pcall('XADD', stream, 'MINID', floor, seq_s .. '-0', 't', ARGV[a + 3], 'n', ARGV[a + 4], 'b', ARGV[a + 5])
    end
    if type(r) == 'table' then
      return r, false
    end
    -- entries past the TTL: looked for when seq passes a multiple of 64, and then only when the
    -- oldest entry seen last time (meta's o, its ts) is past it, so a room whose entries are
    -- younger than the TTL never reads its oldest one (reads trim them before reading anyway)
    if math.fmod(seq, 64) < n then
      local horizon = tonumber(ARGV[a + 3]) - tonumber(ARGV[a + 1])
      if not m[3] or tonumber(m[3]) < horizon then
        oldest = trim_old(stream, horizon)
      end
    end
    redis.call('PEXPIRE', stream, ARGV[a + 1])
  else
    r = redis.pcall('DEL', stream)
    if type(r) == 'table' then
      return r, false
    end
  end
  if oldest then
    redis.call('HSET', meta, 'e', epoch, 's', seq_s, 'o', oldest)
  else
    redis.call('HSET', meta, 'e', epoch, 's', seq_s)
  end
  redis.call('PEXPIRE', meta, ARGV[a + 2])
  if n == 1 then
    redis.call('PUBLISH', ARGV[a + 6], 'p' .. seq_s .. ' ' .. epoch .. ' ' .. ARGV[a + 5])
  else
    redis.call('PUBLISH', ARGV[a + 6], 'P' .. seq_s .. ' ' .. ARGV[a + 4] .. ' ' .. epoch .. ' ' .. ARGV[a + 5])
  end
  return seq, epoch
end
local out = {}
for i = 1, #KEYS / 2 do
  out[2 * i - 1], out[2 * i] = publish(KEYS[2 * i - 1], KEYS[2 * i], 3 + 7 * (i - 1), i)
end
return out
"""
)

# KEYS: meta, stream
# ARGV: new epoch, meta ttl ms, mode ("pos" | "hist"), size, horizon ms, since ("" = none),
#       limit ("" = none; counts entries)
# -> {seq, epoch} or {seq, epoch, first, last, reversed, id1, n1, blob1, id2, n2, blob2, ...}
#    where first/last are the first and last seq the stream holds (0 when empty)
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
trim(stream, tonumber(ARGV[4]), seq, tonumber(ARGV[5]))
local first, last = 0, 0
local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #head > 0 then
  first = seq_of(head[1][1]) - count_of(head[1][2]) + 1
  last = seq_of(redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1][1])
end
local start = '-'
if ARGV[6] ~= '' and tonumber(ARGV[6]) >= 0 then
  start = string.format('%d-0', tonumber(ARGV[6]) + 1)
end
local entries, reversed = {}, 0
if ARGV[7] == '' then
  entries = redis.call('XRANGE', stream, start, '+')
elseif tonumber(ARGV[7]) > 0 then
  entries = redis.call('XREVRANGE', stream, '+', start, 'COUNT', tonumber(ARGV[7]))
  reversed = 1
end
local out = {seq, epoch, first, last, reversed}
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = count_of(e[2])
  out[#out + 1] = blob_of(e[2])
end
return out
"""
)

# What a node missed while its pub/sub connection was away.
# KEYS: meta, stream; ARGV: the epoch last seen ("" = none), the seq last seen
# -> {epoch or false, id1, n1, blob1, ...}
CATCH_UP_LUA = (
    _TRIM
    + """
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
  out[#out + 1] = count_of(e[2])
  out[#out + 1] = blob_of(e[2])
end
return out
"""
)

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
class _Body(msgspec.Struct, array_like=True, frozen=True):
    """A publication as stored and fanned out: [room, sender, ts, data], plus [info,
    exclude] when an application hook set them (older entries have four items)."""

    room: str
    sender: str
    ts: int
    data: bytes
    info: bytes | None = None
    exclude: str = ""


_decode_body = msgspec.msgpack.Decoder(_Body).decode
_decode_pair = msgspec.msgpack.Decoder(tuple[str, bytes]).decode
_decode_member = msgspec.msgpack.Decoder(Member).decode


_decode_batch = msgspec.msgpack.Decoder(list[_Body]).decode
#: rooms whose publish script call's fixed part (keys, history settings, channel) is kept
#: encoded; past it the cache starts again
PUBLISH_HEADS = 4096


def _unpack(last: int, n: int, blob: bytes, epoch: str) -> list[Publication]:
    """The publications of one entry (or one message): a body, or a batch of ``n`` ending at ``last``."""
    if n == 1:
        return [_publication(blob, last, epoch)]
    first = last - n + 1
    return [
        Publication(room=b.room, seq=first + k, epoch=epoch, data=msgspec.Raw(b.data), sender=b.sender, ts=b.ts, info=b.info, exclude=b.exclude)
        for k, b in enumerate(_decode_batch(blob))
    ]


def _entries(items: list[Any], epoch: str) -> list[Publication]:
    """The publications of the entries ``id, n, blob, ...`` a script returned, oldest first."""
    out: list[Publication] = []
    for j in range(0, len(items), 3):
        out.extend(_unpack(_seq_of(items[j]), int(items[j + 1]), items[j + 2], epoch))
    return out


def _complete(since: int | None, top: int, first: int, last: int, history: HistoryPolicy) -> bool:
    """Whether a read from ``since`` holds every publication after it up to ``top``, given
    the first and last seq the stream holds."""
    if since is None:
        return True
    if since < 0 or since > top:
        return False
    if since == top:
        return True
    floor = top - history.size + 1 if history.size > 0 else top + 1  # the oldest seq the room keeps
    return last == top and max(first, floor) <= since + 1  # since + 1 ... top are all held


class _SharedRead:
    """The ``history(since=...)`` calls of one room in one event-loop turn: read once, from
    the oldest ``since`` of them."""

    __slots__ = ("since", "answers")

    def __init__(self, since: int) -> None:
        self.since = since
        self.answers: list[asyncio.Future[tuple[int, str, int, int, list[Publication]]]] = []


class _Writes:
    """The lease and presence writes of one event-loop turn (``RedisBroker._write``): their
    commands in call order, and per caller its future, what it does, and how many commands
    are its own."""

    __slots__ = ("commands", "callers")

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.callers: list[tuple[asyncio.Future[list[Any]], str, int]] = []


def _bulk(arg: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def _publication(body: bytes, seq: int, epoch: str) -> Publication:
    b = _decode_body(body)
    return Publication(room=b.room, seq=seq, epoch=epoch, data=msgspec.Raw(b.data), sender=b.sender, ts=b.ts, info=b.info, exclude=b.exclude)


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)



#: the scripts every node loads (SCRIPT LOAD) when it connects, by name
SCRIPTS = {
    "publish": PUBLISH_LUA,
    "read": READ_LUA,
    "catch_up": CATCH_UP_LUA,
    "presence": PRESENCE_LUA,
    "send": SEND_LUA,
    "forget_client": FORGET_CLIENT_LUA,
}
SHAS = {name: hashlib.sha1(text.encode()).hexdigest().encode() for name, text in SCRIPTS.items()}


def _noscript(reply: Any) -> bool:
    return type(reply) is ReplyError and str(reply).startswith("NOSCRIPT")


class RedisBroker(Publisher):
    """:class:`~wirehub.hub.broker.base.Broker` on Redis (see the module docstring). Its
    publish path, ``publish_nowait`` and ``publish_seq_nowait``, is :class:`Publisher`'s
    (``_publishing.py``, compiled with the accelerator)."""

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
        super().__init__()  # the loop, the connections' state, in_flight and the batches of this turn
        self._evalsha = _bulk(b"EVALSHA") + _bulk(SHAS["publish"])
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.url = url
        self._endpoint = Endpoint.from_url(url)
        self.prefix = prefix
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.lease_s = lease_s
        self._clock = clock
        self._timeout = timeout  # every call is bounded by it, and so is Redis's silence
        self._where = self._endpoint.where
        self._handler: BrokerHandler | None = None
        self._sub: SubscriberLink | None = None  # pub/sub
        self._holding: list[Any] | None = None  # messages held while (re)subscribing
        self._opening: tuple[SubscriberLink, set[bytes], asyncio.Future[None]] | None = None
        self._next_sub: SubscriberLink | None = None  # the pub/sub connection being set up
        self._reader: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._reads: dict[tuple[str, HistoryPolicy], _SharedRead] = {}  # history(since) calls of this turn
        self._reading: set[asyncio.Task[None]] = set()  # their reads' tasks
        self._reads_under_way: set[tuple[str, HistoryPolicy]] = set()  # rooms with a shared read under way
        self._writes: _Writes | None = None  # lease and presence writes of this turn (_write)
        self._inflight = 0  # calls under way; close() lets them finish (bounded)
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
        self._prefix_b = prefix.encode()

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
        self._loop = asyncio.get_running_loop()
        try:
            self._cmd, self._sub = await self._open([])
        except (ReplyError, LinkLost, OSError, TimeoutError) as exc:
            raise BrokerError(f"cannot reach {self._where}: {exc or type(exc).__name__}") from exc
        self._up = True
        self._release()
        self._reader = asyncio.create_task(self._run(), name=f"redis-broker-reader-{self.node_id}")
        self._refresher = asyncio.create_task(self._refresh_loop(), name=f"redis-broker-leases-{self.node_id}")

    async def close(self) -> None:
        self._closing = True  # new calls are refused from here on
        if not self._idle.is_set():  # the calls under way finish first (a node's last clean-ups)
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
        if was_up and self._cmd is not None:
            try:  # best effort: this node's leases go now rather than after lease_s
                async with asyncio.timeout(self._timeout):
                    await self._forget_everything()
            except Exception as exc:
                log.debug("redis_broker_cleanup_failed", error=str(exc) or type(exc).__name__)
        for link in (self._cmd, self._sub):
            if link is not None:
                link.abort("the broker closed")
        self._cmd = self._sub = None
        self._handler = None

    def ready(self) -> bool:
        return self._up

    # -- calls -------------------------------------------------------------------------------
    def _refusal(self, what: str) -> BrokerError | None:
        if self._cmd is None or self._closing:
            return BrokerError(f"cannot {what}: the redis broker is not running")
        if not self._up:
            return BrokerError(f"cannot {what}: {self._where} is unreachable (reconnecting)")
        return None

    def _error(self, what: str, exc: BaseException, *, unknown: bool = False) -> BrokerError:
        """The BrokerError for a failed call. ``unknown``: the call writes, so a lost answer
        leaves its outcome unknown (say so)."""
        if self._closing:
            sent = unknown and isinstance(exc, LinkLost) and exc.sent
            outcome = " (it may or may not have been applied)" if sent else ""
            return BrokerError(f"cannot {what}: the redis broker was closed meanwhile{outcome}", maybe_applied=sent)
        if isinstance(exc, LinkLost):
            outcome = " (it may or may not have been applied)" if unknown and exc.sent else ""
            return BrokerError(f"cannot {what}: {self._where} {exc.reason}{outcome}", maybe_applied=unknown and exc.sent)
        if isinstance(exc, TimeoutError):
            outcome = " (it may or may not have been applied)" if unknown else ""
            return BrokerError(f"cannot {what}: {self._where} did not answer within {self._timeout:g}s{outcome}", maybe_applied=unknown)
        if isinstance(exc, ReplyError) and str(exc).startswith("NOSCRIPT"):
            return BrokerError(f"cannot {what}: {self._where} lost wirehub's scripts (SCRIPT FLUSH?); nothing was done, try again")
        return BrokerError(f"cannot {what}: {self._where} refused: {exc}")

    async def _call(self, what: str, *args: Any, unknown: bool = False) -> Any:
        """One command, answered within the timeout; every failure is a :class:`BrokerError`."""
        refused = self._refusal(what)
        if refused is not None:
            raise refused
        assert self._cmd is not None
        self._inflight += 1
        self._idle.clear()
        try:
            async with asyncio.timeout(self._timeout):
                return await self._cmd.call(*args)
        except (ReplyError, LinkLost, OSError, TimeoutError) as exc:
            raise self._error(what, exc, unknown=unknown) from exc
        finally:
            self._inflight -= 1
            self._settle()

    def _settle(self) -> None:
        if not self._inflight and not self.in_flight:
            self._idle.set()

    async def _script(self, what: str, name: str, keys: list[Any], args: list[Any], *, unknown: bool = False) -> Any:
        """EVALSHA ``name``; when Redis lost the script (SCRIPT FLUSH), load them again and
        retry once (only for a script that writes nothing it cannot repeat)."""
        try:
            return await self._call(what, b"EVALSHA", SHAS[name], len(keys), *keys, *args, unknown=unknown)
        except BrokerError as exc:
            if not isinstance(exc.__cause__, ReplyError) or not str(exc.__cause__).startswith("NOSCRIPT"):
                raise
            self._load_scripts()
            return await self._call(what, b"EVALSHA", SHAS[name], len(keys), *keys, *args, unknown=unknown)

    def _load_scripts(self) -> None:
        """Load the scripts again (Redis lost them); the commands queued after these find them."""
        if self._cmd is not None:
            for text in SCRIPTS.values():
                self._cmd.then(None, b"SCRIPT", b"LOAD", text)

    async def _many(self, link: CommandLink, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` together (one pipeline) and return their replies; the first
        error is raised once every reply is in."""
        futures = [link.call(*cmd) for cmd in commands]
        replies = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

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
            meta = await self._call(f"subscribe to {room!r}", b"HMGET", self._meta(room), b"e", b"s")
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
            refused = self._refusal(what)
            if refused is not None:
                raise refused
            sub = self._sub
            if sub is None or not sub.open:  # lost, and the reader has yet to notice: never reconnect here
                raise BrokerError(f"cannot {what}: lost the connection to {self._where}")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (kind, channel, fut)
            self._acks.append(entry)
            try:
                async with asyncio.timeout(self._timeout):
                    sub.send(kind.upper(), channel)
                    await fut
            except TimeoutError as exc:
                raise BrokerError(f"cannot {what}: {self._where} did not answer within {self._timeout:g}s") from exc
            except LinkLost as exc:
                raise BrokerError(f"cannot {what}: {self._where} {exc.reason}") from exc
            finally:
                try:
                    self._acks.remove(entry)
                except ValueError:
                    pass

    def _publish_failed(self, batches: list[Batch], reply: BaseException) -> None:
        """The script call of ``batches`` failed (Redis refused it, or the connection went),
        or Redis refused one room's part of it (``batches`` is then that room's batch alone):
        each of their publications fails, saying whether it may have been applied."""
        if _noscript(reply):
            self._load_scripts()  # for the next ones; these were not applied
        for batch in batches:
            batch.fail(self._error(f"publish to {batch.room!r}", reply, unknown=True))

    def _publish_head(self, room: str, history: HistoryPolicy) -> tuple[HistoryPolicy, bytes, bytes, bytes]:
        """What every publish script call with ``room`` under ``history`` sends alike for it,
        encoded once: (history, its keys, its size and TTL arguments, its channel argument).
        Remembered for PUBLISH_HEADS rooms."""
        ttl_ms = self._ttl_ms(history)
        keys = _bulk(self._meta(room).encode()) + _bulk(self._stream(room).encode())
        policy = b"".join(_bulk(b"%d" % v) for v in (max(0, history.size), ttl_ms, max(ttl_ms, META_MIN_TTL_MS)))
        head = (history, keys, policy, _bulk(self._channel(room)))
        if len(self._publish_heads) >= PUBLISH_HEADS:
            self._publish_heads.clear()
        self._publish_heads[room] = head
        return head

    async def publish(self, room: str, data: bytes, *, sender: str, ts: int, history: HistoryPolicy, info: bytes | None = None, exclude: str = "") -> Publication:
        future = self.publish_nowait(room, data, sender=sender, ts=ts, history=history, info=info, exclude=exclude)
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(future)
        except TimeoutError as exc:
            raise self._error(f"publish to {room!r}", exc, unknown=True) from exc

    async def room_event(self, room: str, frame: bytes, *, exclude: str = "") -> None:
        payload = b"e" + _encode((exclude, bytes(frame)))
        await self._call(f"send an event to {room!r}", b"PUBLISH", self._channel(room), payload)

    # -- rooms: history ----------------------------------------------------------------------
    async def history(self, room: str, *, since: int | None = None, limit: int | None = None, history: HistoryPolicy) -> HistoryResult:
        if since is not None and limit is None:
            return await self._history_since(room, since, history)
        what = f"read the history of {room!r}"
        top, epoch, first, last, pubs = await self._read(what, room, since, limit, history)
        if since is not None:
            pubs = [p for p in pubs if p.seq > since]
        if limit is not None:
            pubs = pubs[-limit:] if limit > 0 else []
        result = HistoryResult(pubs, Position(top, epoch), _complete(since, top, first, last, history))
        if room in self._want:
            await self._flush(what)
        return result

    async def _history_since(self, room: str, since: int, history: HistoryPolicy) -> HistoryResult:
        """``history(since=...)`` without a limit (a join's recovery): the callers for one room
        share one script call and one pub/sub flush, reading from the oldest ``since`` among
        them; each gets its own part. One such read of a room is under way at a time: the
        callers of one event-loop turn, and those that come while a read is under way, wait
        for the next one, which starts once they have asked (a read from before a caller
        asked could miss what was delivered to the room before it joined). After a restart
        thousands of clients re-join a big room within a few turns: one read each would
        decode the same entries thousands of times."""
        loop = self._loop or asyncio.get_running_loop()
        key = (room, history)
        read = self._reads.get(key)
        if read is None:
            read = self._reads[key] = _SharedRead(since)
            if key not in self._reads_under_way:
                self._start_read(key, read)
        elif since < read.since:
            read.since = since
        answer: asyncio.Future[tuple[int, str, int, int, list[Publication]]] = loop.create_future()
        read.answers.append(answer)
        top, epoch, first, last, pubs = await answer  # a cancelled caller cancels only its own answer
        return HistoryResult([p for p in pubs if p.seq > since], Position(top, epoch), _complete(since, top, first, last, history))

    def _start_read(self, key: tuple[str, HistoryPolicy], read: _SharedRead) -> None:
        task = (self._loop or asyncio.get_running_loop()).create_task(self._shared_read(key, read))  # runs next turn, once this turn's callers asked
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def _shared_read(self, key: tuple[str, HistoryPolicy], read: _SharedRead) -> None:
        if self._reads.get(key) is read:
            del self._reads[key]  # the callers from here on wait for the next read
        self._reads_under_way.add(key)
        room, history = key
        what = f"read the history of {room!r}"
        try:
            reply = await self._read(what, room, read.since, None, history)
            if room in self._want:
                await self._flush(what)
        except asyncio.CancelledError:
            for answer in read.answers:
                answer.cancel()
            raise
        except Exception as exc:
            for answer in read.answers:
                if not answer.done():
                    answer.set_exception(exc)
            return
        finally:
            self._reads_under_way.discard(key)
            waiting = self._reads.get(key)
            if waiting is not None:  # asked while this one was under way: their read now
                self._start_read(key, waiting)
        for answer in read.answers:
            if not answer.done():
                answer.set_result(reply)

    async def _read(self, what: str, room: str, since: int | None, limit: int | None, history: HistoryPolicy) -> tuple[int, str, int, int, list[Publication]]:
        """The read script: the room's top seq and epoch, the first and last seq its stream
        holds, and the publications it returned that history still keeps (from ``since``+1,
        the newest ``limit`` entries), oldest first."""
        ttl_ms = self._ttl_ms(history)
        args = [
            self._new_epoch(),
            max(ttl_ms, META_MIN_TTL_MS),
            "hist",
            max(0, history.size),
            self._now_ms() - ttl_ms,
            "" if since is None else max(-1, min(since, MAX_SEQ)),
            "" if limit is None else max(0, min(limit, 2**31)),
        ]
        reply = await self._script(what, "read", [self._meta(room), self._stream(room)], args)
        top, epoch_b, first, last, reversed_ = reply[:5]
        top, first, last = int(top), int(first), int(last)
        epoch = epoch_b.decode()
        items = reply[5:]
        if reversed_:  # newest entry first: put them in order
            items = [x for j in range(len(items) - 3, -1, -3) for x in items[j : j + 3]]
        floor = top - history.size + 1 if history.size > 0 else top + 1  # the oldest seq the room keeps
        return top, epoch, first, last, [p for p in _entries(items, epoch) if p.seq >= floor]

    async def position(self, room: str) -> Position:
        what = f"read the position of {room!r}"
        args = [self._new_epoch(), META_MIN_TTL_MS, "pos", 0, 0, "", ""]
        seq, epoch = await self._script(what, "read", [self._meta(room), self._stream(room)], args)
        if room in self._want:
            await self._flush(what)
        return Position(int(seq), epoch.decode())

    async def _flush(self, what: str) -> None:
        """Return once the reader has handed the node everything Redis sent this node before
        now: a PING on the pub/sub connection, whose PONG comes after all of it.

        After ``history()``/``position()`` of a subscribed room, every publication up to the
        position returned has been delivered already (those that will be delivered at all),
        as with a local broker: the node never gets one of them after it answered a join."""
        refused = self._refusal(what)
        if refused is not None:
            raise refused
        sub = self._sub
        if sub is None or not sub.open:
            raise BrokerError(f"cannot {what}: lost the connection to {self._where}")
        self._ping_n += 1
        token = b"w%d" % self._ping_n
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        try:
            async with asyncio.timeout(self._timeout):
                sub.send(b"PING", token)
                await fut
        except TimeoutError as exc:
            raise BrokerError(f"cannot {what}: {self._where} did not answer within {self._timeout:g}s") from exc
        except LinkLost as exc:
            raise BrokerError(f"cannot {what}: {self._where} {exc.reason}") from exc
        finally:
            self._pings.pop(token, None)

    # -- direct messages ---------------------------------------------------------------------
    async def add_client(self, client: str) -> None:
        self._clients.add(client)  # registered again on reconnect if this fails
        await self._write(f"register client {client!r}", [(b"SET", self._ckey(client), self.node_id, b"PX", self._lease_ms)])

    async def remove_client(self, client: str) -> None:
        self._clients.discard(client)  # unrefreshed, its lease runs out if this fails
        what = f"unregister client {client!r}"
        try:  # with this turn's other writes (a drain's thousands of disconnects)
            await self._write(what, [(b"EVALSHA", SHAS["forget_client"], 1, self._ckey(client), self.node_id)])
        except BrokerError as exc:
            if not _noscript(exc.__cause__):
                raise
            await self._script(what, "forget_client", [self._ckey(client)], [self.node_id])  # loads the scripts again

    async def send(self, client: str, frame: bytes) -> bool:
        payload = b"d" + _encode((client, bytes(frame)))
        receivers = await self._script(f"send to client {client!r}", "send", [self._ckey(client)], [self._node_ch_prefix, payload])
        return int(receivers) > 0

    # -- presence ----------------------------------------------------------------------------
    async def presence_add(self, room: str, member: Member) -> None:
        self._members.setdefault(room, {})[member.client] = member  # re-added on reconnect
        await self._write(f"add {member.client!r} to the presence of {room!r}", self._member_commands(room, member))

    async def presence_remove(self, room: str, client: str) -> None:
        members = self._members.get(room)
        if members is not None:
            members.pop(client, None)
            if not members:
                del self._members[room]
        commands = [(b"HDEL", self._pkey(room), client), (b"ZREM", self._pekey(room), client)]
        await self._write(f"remove {client!r} from the presence of {room!r}", commands)

    def _write(self, what: str, commands: list[tuple[Any, ...]]) -> asyncio.Future[list[Any]]:
        """Queue ``commands`` (writes whose callers only need to know they were applied: client
        leases, presence entries; a script that Redis lost fails with NOSCRIPT as the cause) for this event-loop turn's MULTI/EXEC: the writes of every
        caller of the turn go together, in call order, with nothing between one caller's
        commands. Each caller's future gives its commands' replies, or a BrokerError (raised
        at once when the broker is down). A caller that awaits its write before its next one,
        as every caller here does, keeps its own order; a join storm's thousands of presence
        entries and leases cost one transaction a turn instead of one each.

        Bounded like every call: the command connection is dropped, failing what it carries,
        once its oldest unanswered command is ``timeout`` old (``_watch``)."""
        refused = self._refusal(what)
        if refused is not None:
            raise refused
        loop = self._loop or asyncio.get_running_loop()
        writes = self._writes
        if writes is None:
            writes = self._writes = _Writes()
            loop.call_soon(self._send_writes)
        future: asyncio.Future[list[Any]] = loop.create_future()
        writes.commands.extend(commands)
        writes.callers.append((future, what, len(commands)))
        self._inflight += 1
        self._idle.clear()
        return future

    def _send_writes(self) -> None:
        writes, self._writes = self._writes, None
        if writes is None:
            return
        link = self._cmd
        if link is None:
            self._written(writes, LinkLost("is not connected", sent=False))
            return
        link.then(None, b"MULTI")
        for cmd in writes.commands:
            link.then(None, *cmd)
        link.then(functools.partial(self._written, writes), b"EXEC")

    def _written(self, writes: _Writes, reply: Any) -> None:
        """The EXEC of a turn's writes answered (or failed): answer each caller."""
        self._inflight -= len(writes.callers)
        self._settle()
        failed = reply if isinstance(reply, BaseException) else None
        if failed is None and not isinstance(reply, list):  # EXEC answers an array (nil: aborted by a WATCH, not used here)
            failed = ReplyError(f"EXEC answered {reply!r}")
        at = 0
        for future, what, n in writes.callers:
            part = reply[at : at + n] if failed is None else None
            at += n
            if future.done():  # its caller gave up
                continue
            error = failed if part is None else next((r for r in part if isinstance(r, ReplyError)), None)
            if error is not None:
                exc = self._error(what, error)
                exc.__cause__ = error
                future.set_exception(exc)
            else:
                future.set_result(part)

    async def presence(self, room: str) -> list[Member]:
        reply = await self._script(f"read the presence of {room!r}", "presence", [self._pkey(room), self._pekey(room)], [self._now_ms()])
        pairs = sorted((reply[i], reply[i + 1]) for i in range(0, len(reply), 2))
        return [_decode_member(blob) for _, blob in pairs]

    async def presence_count(self, room: str) -> int:
        # the live leases (as ``presence`` reads them: a lease that ran out is gone): O(log N)
        return int(await self._call(f"count the presence of {room!r}", b"ZCOUNT", self._pekey(room), self._now_ms(), b"+inf"))

    def _member_commands(self, room: str, member: Member) -> list[tuple[Any, ...]]:
        gc_ms = self._lease_ms * 2
        return [
            (b"HSET", self._pkey(room), member.client, _encode(member)),
            (b"ZADD", self._pekey(room), self._now_ms() + self._lease_ms, member.client),
            (b"PEXPIRE", self._pkey(room), gc_ms),
            (b"PEXPIRE", self._pekey(room), gc_ms),
        ]

    async def rooms(self) -> list[str]:
        what = "list the rooms"
        found: set[str] = set()
        escaped = _glob_escape(self.prefix)
        cut = len(self.prefix.encode()) + 3  # "{prefix}:m:" and "{prefix}:p:"

        async def scan(pattern: str) -> list[bytes]:
            keys: list[bytes] = []
            cursor = b"0"
            while True:
                cursor, batch = await self._call(what, b"SCAN", cursor, b"MATCH", pattern, b"COUNT", 1000)
                keys.extend(batch)
                if cursor == b"0":
                    return keys

        metas = await scan(f"{escaped}:m:*")
        for i in range(0, len(metas), BATCH):
            chunk = metas[i : i + BATCH]
            seqs = await self._gather(what, [(b"HGET", key, b"s") for key in chunk])
            found.update(key[cut:].decode() for key, seq in zip(chunk, seqs) if seq is not None and int(seq) > 0)
        now = self._now_ms()
        present = await scan(f"{escaped}:p:*")
        for i in range(0, len(present), BATCH):
            chunk = [key[cut:].decode() for key in present[i : i + BATCH]]
            alive = await self._gather(what, [(b"ZCOUNT", self._pekey(room), now, b"+inf") for room in chunk])
            found.update(room for room, n in zip(chunk, alive) if n)
        return sorted(found)

    async def _gather(self, what: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        refused = self._refusal(what)
        if refused is not None:
            raise refused
        assert self._cmd is not None
        try:
            async with asyncio.timeout(self._timeout):
                return await self._many(self._cmd, commands)
        except (ReplyError, LinkLost, OSError, TimeoutError) as exc:
            raise self._error(what, exc) from exc

    # -- leases ------------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not self._up:
                continue
            try:
                async with asyncio.timeout(self._timeout):
                    await self._refresh(full=False)
            except (ReplyError, LinkLost, OSError, TimeoutError) as exc:
                log.debug("redis_lease_refresh_failed", error=str(exc) or type(exc).__name__)
            except Exception:  # never let the refresher die
                log.exception("redis_lease_refresh_failed")

    async def _refresh(self, *, full: bool, link: CommandLink | None = None) -> None:
        """Extend this node's leases. ``full`` writes every entry again (after a reconnect:
        Redis may have lost them); otherwise presence entries removed meanwhile (by another
        node, or expired) stay removed."""
        link = link or self._cmd
        if link is None:
            return
        lease_ms, gc_ms = self._lease_ms, self._lease_ms * 2
        expiry = self._now_ms() + lease_ms
        commands: list[tuple[Any, ...]] = [(b"SET", self._ckey(c), self.node_id, b"PX", lease_ms) for c in list(self._clients)]
        for room, members in list(self._members.items()):
            for member in list(members.values()):
                if full:
                    commands.extend(self._member_commands(room, member))
                else:
                    commands.append((b"ZADD", self._pekey(room), b"XX", expiry, member.client))
            if not full:
                commands.append((b"PEXPIRE", self._pkey(room), gc_ms))
                commands.append((b"PEXPIRE", self._pekey(room), gc_ms))
        for i in range(0, len(commands), BATCH):
            await self._many(link, commands[i : i + BATCH])

    async def _forget_everything(self) -> None:
        link = self._cmd
        if link is None or not (self._clients or self._members):
            return
        commands: list[tuple[Any, ...]] = [
            (b"EVALSHA", SHAS["forget_client"], 1, self._ckey(c), self.node_id) for c in self._clients
        ]
        for room, members in self._members.items():
            for member in members:
                commands.append((b"HDEL", self._pkey(room), member))
                commands.append((b"ZREM", self._pekey(room), member))
        await self._many(link, commands)
        self._clients.clear()
        self._members.clear()

    # -- the connections ---------------------------------------------------------------------
    async def _open(self, rooms: list[str]) -> tuple[CommandLink, SubscriberLink]:
        """A command connection with the scripts loaded, and a pub/sub connection subscribed
        to this node's channel and ``rooms`` once Redis acknowledged every subscription. The
        messages that come meanwhile are held (``_holding``) until :meth:`_release`."""
        cmd = CommandLink("commands")
        sub = self._next_sub = SubscriberLink("pub/sub", lambda replies: self._on_replies(sub, replies))
        self._holding = []
        try:
            await open_link(self._endpoint, cmd, timeout=self._timeout, client_name=f"wirehub-{self.node_id}")
            async with asyncio.timeout(self._timeout):
                info, *_ = await self._many(cmd, [(b"INFO", b"server")] + [(b"SCRIPT", b"LOAD", text) for text in SCRIPTS.values()])
            version = _redis_version(info)
            if version < MIN_REDIS:
                raise ReplyError(f"is Redis {'.'.join(map(str, version))}; wirehub needs Redis {'.'.join(map(str, MIN_REDIS))} or newer "
                                 "(streams trimmed with MINID)")
            await open_link(self._endpoint, sub, timeout=self._timeout, client_name=f"wirehub-sub-{self.node_id}")
            channels = [self._node_ch] + [self._channel(r) for r in rooms]
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._opening = (sub, set(channels), done)
            for i in range(0, len(channels), BATCH):
                sub.send(b"SUBSCRIBE", *channels[i : i + BATCH])
            async with asyncio.timeout(self._timeout):
                await asyncio.wait((done, sub.lost), return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                raise LinkLost(sub.lost.result(), sent=True)
        except BaseException:
            cmd.abort("setup failed")
            sub.abort("setup failed")
            self._holding = self._next_sub = None
            raise
        finally:
            self._opening = None
        return cmd, sub

    def _release(self) -> None:
        """Deliver the messages held while subscribing, and stop holding."""
        self._next_sub = None
        held, self._holding = self._holding, None
        for reply in held or ():
            self._on_reply(reply)

    async def _run(self) -> None:
        """The watch: when a connection is lost (or Redis stops answering), report it,
        reconnect with backoff, catch up and report the broker back."""
        while True:
            reason = await self._watch()
            await self._lost(reason)
            await self._reconnect()

    async def _watch(self) -> str:
        """Return why the connections had to be given up."""
        cmd, sub = self._cmd, self._sub
        assert cmd is not None and sub is not None
        idle = max(self._timeout, 0.05)
        pinged_at = 0.0
        while True:
            await asyncio.wait((cmd.lost, sub.lost), timeout=idle / 4, return_when=asyncio.FIRST_COMPLETED)
            for link in (cmd, sub):
                if link.lost.done():
                    return f"{link.name}: {link.lost.result()}"
            now = time.monotonic()
            if cmd.sent_at and now - cmd.sent_at > self._timeout:
                reason = f"did not answer within {self._timeout:g}s"
                cmd.abort(reason)
                return f"commands: {reason}"
            if now - sub.received_at < idle:
                pinged_at = 0.0
            elif not pinged_at:  # quiet for a while: make sure Redis is still there
                pinged_at = now
                try:
                    sub.send(b"PING")
                except LinkLost:
                    continue
            elif now - pinged_at > idle:
                return f"pub/sub: no answer to PING within {idle:g}s"

    async def _lost(self, reason: str) -> None:
        self._up = False
        for link in (self._cmd, self._sub):
            if link is not None:
                link.abort(reason)
        self._fail_acks(f"lost the connection to {self._where}: {reason}")
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
                cmd, sub = await self._open(rooms)
            except Exception as exc:
                log.debug("redis_reconnect_failed", where=self._where, error=str(exc) or type(exc).__name__)
                continue
            try:
                async with asyncio.timeout(self._timeout * 2):
                    await self._refresh(full=True, link=cmd)
                    missed = await self._missed(rooms, cmd)
            except BaseException as exc:  # Redis failed again (or a bug, or close()): try again later
                cmd.abort("reconnect failed")
                sub.abort("reconnect failed")
                self._holding = self._next_sub = None
                if not isinstance(exc, Exception):
                    raise  # cancelled by close(): nothing left behind
                if not isinstance(exc, (ReplyError, LinkLost, OSError, TimeoutError)):
                    log.exception("redis_reconnect_failed", where=self._where)
                log.debug("redis_reconnect_failed", where=self._where, error=str(exc) or type(exc).__name__)
                continue
            self._cmd, self._sub = cmd, sub
            for pub in missed:
                self._deliver(pub)
            self._release()
            stale = [self._channel(r) for r in rooms if r not in self._want]
            try:
                for i in range(0, len(stale), BATCH):
                    sub.send(b"UNSUBSCRIBE", *stale[i : i + BATCH])
            except LinkLost as exc:
                log.debug("redis_reconnect_failed", where=self._where, error=exc.reason)
                cmd.abort("reconnect failed")
                sub.abort("reconnect failed")
                continue
            self._up = True
            log.warning("redis_broker_up", where=self._where)
            self._notify(True)
            return

    async def _missed(self, rooms: list[str], link: CommandLink) -> list[Publication]:
        """What was published to ``rooms`` after the last publication delivered here (or after
        the subscription, when none was), as far as the streams still hold it."""
        known = [(room, self._last.get(room) or self._base.get(room)) for room in rooms]
        known = [(room, last) for room, last in known if last is not None]
        out: list[Publication] = []
        for i in range(0, len(known), BATCH):
            chunk = known[i : i + BATCH]
            commands = [
                (b"EVALSHA", SHAS["catch_up"], 2, self._meta(room), self._stream(room), epoch or "", seq) for room, (epoch, seq) in chunk
            ]
            for reply in await self._many(link, commands):
                if not reply or reply[0] is None:
                    continue
                out.extend(_entries(reply[1:], reply[0].decode()))
        return out

    # -- dispatch ----------------------------------------------------------------------------
    def _on_replies(self, link: SubscriberLink, replies: list[Any]) -> None:
        """Everything one read of the pub/sub connection brought, in one event-loop turn: the
        hub's writes to its subscribers are flushed once per turn, so a subscriber gets all
        the publications of one read in one write."""
        opening = self._opening
        if opening is not None and opening[0] is link:
            _, pending, done = opening
            for reply in replies:
                if type(reply) is list and reply and reply[0] == b"subscribe":
                    pending.discard(reply[1])
                    if not pending and not done.done():
                        done.set_result(None)
                elif self._holding is not None:
                    self._holding.append(reply)
            return
        if link is not self._sub and link is not self._next_sub:
            return  # a connection given up
        holding = self._holding
        for reply in replies:
            if holding is not None and type(reply) is list and reply and reply[0] == b"message":
                holding.append(reply)
            else:
                self._on_reply(reply)

    def _on_reply(self, msg: Any) -> None:
        try:
            if type(msg) is not list or not msg:
                return
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
        elif tag == b"P":  # a batch: "P{last} {n} {epoch} {blob}"
            last, n, epoch, blob = payload[1:].split(b" ", 3)
            for pub in _unpack(int(last), int(n), blob, epoch.decode()):
                self._deliver(pub)
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
