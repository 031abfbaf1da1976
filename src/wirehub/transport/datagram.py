"""UDP: one endpoint per listening socket, one session per validated source address.

A session is a :class:`Connection` like any other (same handlers, counters, idle timeout);
each frame is one datagram and delivery is best effort: nothing is retried or reordered.

A source address is only a claim: anyone can put any address in a UDP header. So that the
server cannot be used to reflect traffic at someone else (a spoofed datagram answered with
more bytes than it carried), an address must prove it receives what is sent to it before it
gets a session, as QUIC's address validation and DTLS's HelloVerifyRequest do:

- **Validating apps** (the app implements ``udp_challenge`` and ``udp_cookie``; the hub
  does). A datagram from an address without a session creates nothing. The endpoint answers
  it with the app's challenge frame carrying a stateless *cookie* (an HMAC of the address and
  a coarse time window under a per-process secret) — but only when that answer is at most
  :data:`AMPLIFICATION` times the datagram's size; a smaller datagram is dropped silently,
  so clients pad their first one. A datagram that carries a valid cookie for its source
  address opens a session, then is handled as a frame. Holding no state for unknown
  addresses, a flood of spoofed datagrams costs no memory and takes no session slot.
- **Other apps** (no hooks: the default). A datagram from a new address opens a session at
  once, as before, but that session is never *validated*: in total it is sent at most
  :data:`AMPLIFICATION` times the bytes it sent; frames beyond that budget are dropped
  (counted in ``frames_dropped``). Request/response apps (an echo) work unchanged; an app
  that pushes more than it receives over UDP implements the hooks.

Either way a frame that the app answers itself (``App.replies``: the hub's bare ping) gets
its answer without any session when the answer is no bigger than the budget allows.

Sessions have their own limit, ``max_udp_sessions`` (and ``max_connections_per_ip``), apart
from the stream listeners' ``max_connections``: UDP never pauses accepting on TCP or
WebSocket listeners.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import socket
import time
from typing import Any, Callable

from .._log import get_logger
from .connection import MAX_QUEUED_FRAMES, Connection, Context
from .stream import format_peer

log = get_logger("wirehub.udp")

#: an unvalidated source address never receives more than this many times the bytes it sent
AMPLIFICATION = 3
#: seconds per cookie window; a cookie is accepted in its window and the next one
COOKIE_WINDOW = 30.0
#: bytes of HMAC in a cookie (base64url: 22 characters)
COOKIE_MAC_BYTES = 16
#: seconds between two ``refused`` log lines of one UDP endpoint
REFUSED_LOG_INTERVAL = 10.0


class CookieJar:
    """Stateless address-validation cookies: ``issue(addr)`` now, ``valid(cookie, addr)``
    within one to two windows of that, with this jar's secret (random per process)."""

    __slots__ = ("_secret", "window", "_clock")

    def __init__(self, secret: bytes | None = None, window: float = COOKIE_WINDOW, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret or os.urandom(32)
        self.window = window
        self._clock = clock

    def _mac(self, addr: Any, epoch: int) -> bytes:
        message = f"{addr[0]}\x00{addr[1]}\x00{epoch}".encode()
        digest = hmac.digest(self._secret, message, "sha256")[:COOKIE_MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=")

    def issue(self, addr: Any) -> bytes:
        """A cookie for ``addr`` (ASCII: base64url without padding)."""
        return self._mac(addr, int(self._clock() // self.window))

    def valid(self, cookie: Any, addr: Any) -> bool:
        """True when ``cookie`` was issued for ``addr`` in this window or the one before."""
        if type(cookie) is str:
            try:
                cookie = cookie.encode("ascii")
            except UnicodeEncodeError:
                return False
        if type(cookie) is not bytes or len(cookie) > 64:
            return False
        epoch = int(self._clock() // self.window)
        return hmac.compare_digest(cookie, self._mac(addr, epoch)) or hmac.compare_digest(cookie, self._mac(addr, epoch - 1))


class DatagramSession(Connection):
    __slots__ = ("_endpoint", "_addr", "validated")

    def __init__(self, ctx: Context, endpoint: DatagramEndpoint, addr: Any, validated: bool = False) -> None:
        super().__init__(ctx, "udp", endpoint.framing.datagram_encoder)
        self._endpoint = endpoint
        self._addr = addr
        #: True once the address proved it receives what is sent to it (a cookie round trip);
        #: until then the session is sent at most AMPLIFICATION times the bytes it sent
        self.validated = validated
        self.peer, self.peer_ip = format_peer(addr, endpoint.family)

    def _write(self, frames: list[bytes]) -> None:
        transport = self._endpoint.transport
        if transport is None:
            return
        addr = self._addr
        if self.validated:
            for data in frames:
                self.bytes_out += len(data)
                transport.sendto(data, addr)
            return
        budget = AMPLIFICATION * self.bytes_in
        for data in frames:
            if self.bytes_out + len(data) > budget:
                self.frames_dropped += 1  # an unvalidated address: never more than 3x what it sent
                self._endpoint.stats["over_budget"] += 1
                continue
            self.bytes_out += len(data)
            transport.sendto(data, addr)

    def _close_transport(self) -> None:
        self._endpoint.end_session(self, None)

    def _abort_transport(self) -> None:
        self._endpoint.end_session(self, None)


class UdpValidation:
    """What a validating app supplies: ``challenge(cookie) -> payload`` (the frame that asks
    the address to echo ``cookie``) and ``cookie(frame) -> cookie or None`` (the cookie a
    frame echoes)."""

    __slots__ = ("challenge", "cookie")

    def __init__(self, challenge: Callable[[bytes], bytes], cookie: Callable[[bytes], Any]) -> None:
        self.challenge = challenge
        self.cookie = cookie


class DatagramEndpoint(asyncio.DatagramProtocol):
    """The protocol of one UDP socket: routes each datagram to its session, and validates
    the source addresses that have none (see the module's description).

    ``allowed(ip)`` says whether ``ip`` may be answered at all (allow/deny lists, not
    draining). ``admit(ip)`` takes a session slot for ``ip`` and returns None, or the name of
    the limit that refused it (then the app's ``refusal`` frame is sent, when the address is
    validated or the frame fits the budget). The registry gives the slot back when the
    session ends.
    """

    def __init__(
        self,
        ctx: Context,
        framing: Any,
        admit: Callable[[str], str | None],
        *,
        allowed: Callable[[str], bool] | None = None,
        validation: UdpValidation | None = None,
        cookies: CookieJar | None = None,
        refusal: Callable[[str], bytes | None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.framing = framing
        self.family = socket.AF_INET
        self.transport: asyncio.DatagramTransport | None = None
        self.sessions: dict[Any, DatagramSession] = {}
        self._admit = admit
        self._allowed_ip = allowed
        self._accepting = True
        self.validation = validation
        self.cookies = cookies or CookieJar()
        self._refusal = refusal
        handlers = ctx.handlers
        #: the app's own answers (App.replies), encoded as datagrams: given without a session
        self._replies = handlers.wires_for(framing.datagram_encoder) if handlers.replies is not None else None
        #: the size of a challenge datagram (the cookie's length is fixed): datagrams too
        #: small to be answered with one are dropped before any work
        self._challenge_size = 0
        if validation is not None:
            self._challenge_size = len(framing.encode_datagram(validation.challenge(self.cookies.issue(("0.0.0.0", 0)))))
        self._refused_log_at = 0.0
        self._refused_unlogged = 0
        #: what happened to datagrams from addresses without a session
        self.stats: dict[str, int] = {"challenged": 0, "validated": 0, "refused": 0, "dropped": 0, "replied": 0, "over_budget": 0}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.family = sock.family

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is None:
            session = self._new_source(data, addr)
            if session is None:
                return
        session.bytes_in += len(data)
        queue = session._queue
        if queue is not None and len(queue) >= MAX_QUEUED_FRAMES:
            # An async handler is behind and a datagram socket cannot pause one peer:
            # best effort means this datagram is dropped.
            session.frames_dropped += 1
            return
        session.last_activity = self.ctx.now()
        item = self.framing.decode_datagram(data, self.ctx.settings.max_frame)
        session._dispatch([item])

    def _new_source(self, data: bytes, addr: Any) -> DatagramSession | None:
        """A datagram from an address without a session: the session it opens, or None
        (answered statelessly, or dropped)."""
        stats = self.stats
        transport = self.transport
        if not self._accepting or transport is None:
            return None
        budget = AMPLIFICATION * len(data)
        replies = self._replies
        validation = self.validation
        if replies is not None or validation is not None:
            item = self.framing.decode_datagram(data, self.ctx.settings.max_frame)
            if type(item) is not bytes:
                stats["dropped"] += 1
                return None
            if replies is not None:
                reply = replies.get(item)
                if reply is not None:
                    if len(reply) <= budget and self._allowed(addr):
                        transport.sendto(reply, addr)
                        stats["replied"] += 1
                    else:
                        stats["dropped"] += 1
                    return None
            if validation is not None:
                try:
                    cookie = validation.cookie(item)
                except Exception:
                    log.exception("handler_failed", handler="udp_cookie")
                    cookie = None
                if cookie is None or not self.cookies.valid(cookie, addr):
                    self._challenge(addr, budget)
                    return None
                stats["validated"] += 1
                return self._open(data, addr, True)
        return self._open(data, addr, False)

    def _allowed(self, addr: Any) -> bool:
        """The allow/deny lists and draining, without taking a slot."""
        return self._allowed_ip is None or self._allowed_ip(format_peer(addr, self.family)[1])

    def _challenge(self, addr: Any, budget: int) -> None:
        stats = self.stats
        if self._challenge_size > budget:
            stats["dropped"] += 1  # too small to answer: no reply bigger than 3x
            return
        if not self._allowed(addr):
            stats["dropped"] += 1
            return
        assert self.validation is not None and self.transport is not None
        try:
            payload = self.validation.challenge(self.cookies.issue(addr))
        except Exception:
            log.exception("handler_failed", handler="udp_challenge")
            return
        wire = self.framing.encode_datagram(payload)
        if len(wire) > budget:
            stats["dropped"] += 1
            return
        self.transport.sendto(wire, addr)
        stats["challenged"] += 1

    def _open(self, data: bytes, addr: Any, validated: bool) -> DatagramSession | None:
        ip = format_peer(addr, self.family)[1]
        if self._allowed_ip is not None and not self._allowed_ip(ip):
            self.stats["dropped"] += 1
            return None
        refused = self._admit(ip)
        if refused is not None:
            self.stats["refused"] += 1
            self._log_refused(refused, addr)
            if self._refusal is not None and self.transport is not None:
                self._send_refusal(refused, addr, None if validated else AMPLIFICATION * len(data))
            return None
        session = DatagramSession(self.ctx, self, addr, validated)
        self.sessions[addr] = session
        session._start()
        if session._closed:  # the app closed it in connect
            return None
        return session

    def _log_refused(self, reason: str, addr: Any) -> None:
        """Logged at most once per REFUSED_LOG_INTERVAL (a flood must not flood the log)."""
        now = self.ctx.now()
        if now < self._refused_log_at:
            self._refused_unlogged += 1
            return
        self._refused_log_at = now + REFUSED_LOG_INTERVAL
        log.info("refused", reason=reason, peer=format_peer(addr, self.family)[0], transport="udp", not_logged_before=self._refused_unlogged)
        self._refused_unlogged = 0

    def _send_refusal(self, reason: str, addr: Any, budget: int | None) -> None:
        assert self._refusal is not None and self.transport is not None
        try:
            payload = self._refusal(reason)
        except Exception:
            log.exception("handler_failed", handler="refusal")
            return
        if payload:
            wire = self.framing.encode_datagram(payload)
            if budget is None or len(wire) <= budget:
                self.transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) for some earlier sendto: nothing to do per session.
        log.debug("udp_error", error=str(exc))

    def connection_lost(self, exc: BaseException | None) -> None:
        for session in list(self.sessions.values()):
            self.end_session(session, exc)
        self.transport = None

    def end_session(self, session: DatagramSession, exc: BaseException | None) -> None:
        if self.sessions.get(session._addr) is session:
            del self.sessions[session._addr]
            session._flush(force=True)
            session._lost(exc)  # the registry releases the session's slot

    def stop_accepting(self) -> None:
        """Draining: datagrams from unknown addresses no longer open sessions."""
        self._accepting = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
