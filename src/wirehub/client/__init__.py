"""The asyncio client of the wirehub hub, over every transport the hub serves.

.. code-block:: python

    import wirehub.client

    client = await wirehub.client.connect("tcp://127.0.0.1:7400", name="ada")
    room = await client.join("lobby")
    seq = await client.publish("lobby", {"text": "hello"})
    async for event in client:
        print(event)
    await client.close()

    # or: async with wirehub.client.connect(url) as client: ...

URLs: ``tcp://HOST:PORT``, ``tls://HOST:PORT``, ``unix:///path/to/socket``,
``ws://HOST:PORT/PATH``, ``wss://HOST:PORT/PATH``, ``udp://HOST:PORT``. For ``tls``/``wss``
pass ``ssl=`` an :class:`ssl.SSLContext` (default: the system's CAs).

``connect(url, *, token=None, name=None, reconnect=True, backoff=(0.1, 10.0), ssl=None,
max_frame=16 MiB, timeout=10.0, heartbeat=None, on_state=None, on_frame=None)`` opens the
connection and says ``hello`` (with ``token``: a string, or a function, sync or async, called
before every hello so that reconnects can use a fresh token). The first connection is not
retried: it raises :class:`ConnectError` (or :class:`HubError` when the hello is refused).
``client.client_id`` and ``client.user`` come from ``welcome`` (a reconnect is a new session
with a new ``client_id``).

**Requests** — ``join``, ``leave``, ``publish`` (returns the ``seq``), ``send``, ``presence``,
``history``, ``refresh``, ``ping`` — always carry a ``ref`` and wait up to ``timeout`` for the
reply with that ref: an ``error`` reply raises :class:`HubError` (``.code``, ``.message``),
no reply raises :class:`TimeoutError`. While the client is reconnecting a request waits (within
its timeout) for the connection; a request in flight when the connection drops raises
:class:`ConnectionLost` and is never re-sent (a ``pub`` could then be published twice).

**Events** — ``async for event in client`` (or ``await client.recv()``) yields, in arrival
order, the frames the program cares about, as dicts:

* ``{"op":"msg","room":R,"seq":N,"from":ID,"data":ANY,"ts":MS}`` — room messages;
* ``{"op":"msg","from":ID,"data":ANY}`` — direct messages;
* ``{"op":"join"|"leave","room":R,"client":ID,"user":U,"name":N}`` — presence changes (a
  big room's ``presence_diff`` frames arrive split into these, leaves first; ``room.presence_mode``
  says how the hub tells the room's presence: ``events``, ``diff``, ``query`` — no events —, ``off``);
* ``{"op":"recovery_failed","room":R,"since":OLD_SEQ,"epoch":OLD_EPOCH,"seq":NEW_SEQ,
  "new_epoch":E}`` — made by the client: after a reconnect (or a ``join(since=...)``) the hub
  could not replay what was missed (history no longer holds it, or the hub restarted and its
  memory broker starts a new epoch). Messages after ``since`` of the old epoch may be lost;
  the room goes on from ``seq`` in ``new_epoch``;
* ``{"op":"rejoin_failed","room":R,"code":C,"message":M}`` — made by the client: re-joining R
  after a reconnect was refused (a narrower token, a full room); the client is no longer in R.

The events are queued without bound until the program reads them. The iteration ends quietly
after :meth:`Client.close`; when the hub sends the client away for good (``bye`` with
``reconnect:false``: ``kicked``, ``too_many_errors``, ``protocol``), or the connection drops
with ``reconnect=False``, it raises :class:`Disconnected` whose ``reason`` says why — after
every event received before that.

``on_frame(frame)`` is called with every frame received (replies included) except the
client's own heartbeat traffic, before the client acts on it; ``on_state(state, reason)``
with ``"connected"``, ``"reconnecting"`` (reason: the bye reason or ``connection_lost``) and
``"closed"``. ``client.send_frame(dict)`` sends a raw frame as is (its reply, and the messages
of a room joined that way, reach ``on_frame`` only: such rooms are not tracked or re-joined);
``client.request(dict)`` sends one with a fresh ref and returns the reply.

**Heartbeat** — a ``ping`` every ``heartbeat`` seconds (the hub's ``welcome`` says how often,
unless ``heartbeat=`` overrides it); no ``pong`` within ``timeout`` means the connection is
dead: it is dropped and reconnected.

**Reconnect and recovery** — when the connection drops, or the hub says ``bye`` with
``reconnect:true`` (``shutdown``, ``idle``, ``slow_consumer``, ``auth_expired``), the client
waits ``backoff_delay(n)`` (full jitter: uniformly random in ``[backoff[0],
min(backoff[1], backoff[0]·2^(n+1))]`` for the n-th attempt in a row; after ``bye``
``shutdown``, a restarting hub, the window stops growing at ``RESTART_BACKOFF_CAP``, 2 s, so
that every client is back about that soon after the hub), connects, says hello,
and re-joins every room with ``since`` = the seq of the last message of that room it accepted
and that room's ``epoch``. Every message that history still holds is then replayed in order;
any ``msg`` whose seq is not above the last accepted one is dropped, so nothing is delivered
twice. A message that skips a seq on a live connection (a lost datagram, a hub that dropped
frames for a slow consumer) makes the client re-join the room from its last seq the same way
(what arrives meanwhile is set aside: the re-join replays it in order). If that re-join cannot
fill the gap — its reply does not come within ``timeout``, or the next message shows the same
gap again — the client reports it with ``recovery_failed`` and goes on, rather than retry
forever. Either way the program sees every seq of a room once and in order, or a
``recovery_failed`` event whose ``since``/``seq`` say exactly which seqs are missing. A
reconnect whose hello is refused with ``unauthorized``/``forbidden`` stops the client
(``Disconnected``).

**UDP** is best effort: a lost request times out and is not retried (a lost ``msg`` is caught
by the gap check above). There is no connection to lose, so the client notices a dead hub by
an ICMP port-unreachable or by heartbeats going unanswered (3 in a row), and a hub that forgot
the session (it restarted, or timed the session out without the ``bye`` reaching us) by its
heartbeat: while in rooms, the client's heartbeat is a ``presence`` request for one of them,
and ``not_member``/``unauthorized`` means the session is gone. Either way it starts a new
session from a new socket (hello, re-join with ``since``), as after a TCP drop. Outside any
room a forgotten session is only noticed by the next failing request. :meth:`Client.close`
over UDP sends ``leave`` for each room first (there is no close on the wire).
"""

from .backoff import backoff_delay
from .core import Client, Room, connect
from .errors import ClientError, ConnectError, ConnectionLost, Disconnected, HubError
from .transports import SCHEMES, Endpoint, parse_url

__all__ = [
    "SCHEMES",
    "Client",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "Disconnected",
    "Endpoint",
    "HubError",
    "Room",
    "backoff_delay",
    "connect",
    "parse_url",
]
