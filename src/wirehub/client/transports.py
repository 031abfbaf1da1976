"""Client links: one open connection to the hub over one transport, frames in and out.

A link calls ``on_frame(link, payload)`` for every frame it receives (synchronously, in
arrival order) and ``on_lost(link, exc)`` once when it ends, whoever ended it. It knows
nothing about the hub protocol beyond framing:

==========  ==============================================================
tcp, tls,   one JSON object per line (``\\n``), on an :class:`asyncio.Protocol`
unix
ws, wss     one JSON object per text message, with the ``websockets`` library
udp         one JSON object per datagram, on a connected UDP socket, after a
            cookie round trip that validates the socket's address
==========  ==============================================================
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as _ssl
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import msgspec

from ..protocol.framing import LineDecoder
from .errors import ConnectError

log = logging.getLogger("wirehub.client")

SCHEMES = ("tcp", "tls", "unix", "ws", "wss", "udp")
_EXAMPLES = "tcp://127.0.0.1:7400, tls://host:7443, unix:///run/wirehub.sock, ws://127.0.0.1:7401/, wss://host/ws, udp://127.0.0.1:7400"

OnFrame = Callable[["Link", "bytes | str"], None]
OnLost = Callable[["Link", "BaseException | None"], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed hub URL."""

    url: str
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""  # the socket path (unix)

    @property
    def secure(self) -> bool:
        return self.scheme in ("tls", "wss")


def parse_url(url: str) -> Endpoint:
    """Check and split a hub URL; a :class:`ValueError` says what is wrong with it."""
    if not isinstance(url, str) or "://" not in url and not url.startswith("unix:"):
        raise ValueError(f"bad hub URL {url!r}: expected SCHEME://..., for example {_EXAMPLES}")
    scheme = url.split(":", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"bad hub URL {url!r}: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme == "unix":
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"bad hub URL {url!r}: no socket path (unix:///path/to/socket)")
        return Endpoint(url, scheme, path=path)
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"bad hub URL {url!r}: {exc}") from None
    if not host:
        raise ValueError(f"bad hub URL {url!r}: no host")
    if port is None:
        if scheme == "ws":
            port = 80
        elif scheme == "wss":
            port = 443
        else:
            raise ValueError(f"bad hub URL {url!r}: {scheme} needs a port ({scheme}://HOST:PORT)")
    return Endpoint(url, scheme, host=host, port=port)


class Link:
    """One connection. Subclasses implement :meth:`send`, :meth:`close` and :meth:`abort`."""

    kind = ""

    def __init__(self, on_frame: OnFrame, on_lost: OnLost) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self.closed = False
        self.done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close gracefully (the peer sees an orderly end)."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop at once."""
        raise NotImplementedError

    async def wait_closed(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.done), timeout)
        except asyncio.TimeoutError:
            self.abort()

    def _ended(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.done.done():
            self.done.set_result(exc)
        self._on_lost(self, exc)


# ---------------------------------------------------------------------- tcp, tls, unix


class StreamLink(Link, asyncio.Protocol):
    """Newline-delimited JSON over a byte stream."""

    def __init__(self, kind: str, on_frame: OnFrame, on_lost: OnLost, max_frame: int) -> None:
        super().__init__(on_frame, on_lost)
        self.kind = kind
        self._decoder = LineDecoder(max_frame)
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._drain: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for item in self._decoder.feed(data):
            if self.closed:
                return
            if type(item) is bytes:
                self._on_frame(self, item)
            else:  # a frame over max_frame: skipped (the decoder discards it)
                log.warning("wirehub client: skipped a frame from the hub: %s", item.message)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._ended(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, data: bytes) -> None:
        t = self._transport
        if t is None or self.closed or t.is_closing():
            raise ConnectionResetError("the connection is closed")
        t.write(data + b"\n")
        if self._paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        else:
            self._ended(None)  # never connected, or already gone

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        else:
            self._ended(None)


# ---------------------------------------------------------------------- ws, wss


class WebSocketLink(Link):
    """One JSON object per text message, with ``websockets``' asyncio client."""

    def __init__(self, kind: str, on_frame: OnFrame, on_lost: OnLost) -> None:
        super().__init__(on_frame, on_lost)
        self.kind = kind
        self._ws: Any = None
        self._reader: asyncio.Task | None = None

    def start(self, ws: Any) -> None:
        self._ws = ws
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        exc: BaseException | None = None
        try:
            async for message in self._ws:
                if self.closed:
                    break
                self._on_frame(self, message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # ConnectionClosedError and friends: the link is gone
            exc = e
        finally:
            self._ended(exc)

    async def send(self, data: bytes) -> None:
        if self.closed or self._ws is None:
            raise ConnectionResetError("the connection is closed")
        try:
            if _WS_TEXT_BYTES:
                await self._ws.send(data, text=True)
            else:  # pragma: no cover - websockets < 14
                await self._ws.send(data.decode())
        except Exception as exc:
            if exc.__class__.__module__.startswith("websockets"):
                raise ConnectionResetError(f"the connection is closed: {exc}") from exc
            raise

    def close(self) -> None:
        if self._ws is None:
            self._ended(None)  # the handshake never finished
        elif not self.closed:
            asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        try:
            await self._ws.close()
        except Exception:  # pragma: no cover - already gone
            pass

    def abort(self) -> None:
        if self._ws is not None:
            transport = getattr(self._ws, "transport", None)
            if transport is not None:
                transport.abort()
        elif not self.closed:
            self._ended(None)


def _websockets_major() -> int:
    try:
        from websockets.version import version

        return int(version.split(".")[0])
    except Exception:  # pragma: no cover
        return 0


_WS_MAJOR = _websockets_major()
_WS_TEXT_BYTES = _WS_MAJOR >= 14


# ---------------------------------------------------------------------- udp


class DatagramLink(Link, asyncio.DatagramProtocol):
    """One JSON object per datagram on a connected UDP socket. Best effort: nothing is
    retried. A port-unreachable answer (nothing listens there any more) ends the link.

    Before the link is handed over, :meth:`handshake` validates this socket's address with
    the hub (docs/hub.md, "UDP"): a ping padded to :data:`UDP_PAD_TO` bytes until the hub's
    ``{"op":"challenge","cookie":C}`` arrives, then the ping with ``"cookie":C`` until the
    session answers, each resent after a growing delay. A challenge that arrives later means
    the hub no longer has this session (it restarted, or the session expired): the link ends,
    and the client reconnects with recovery as after any drop."""

    kind = "udp"

    def __init__(self, on_frame: OnFrame, on_lost: OnLost) -> None:
        super().__init__(on_frame, on_lost)
        self._transport: asyncio.DatagramTransport | None = None
        self.validated = False
        self.cookie: str | None = None
        self._wake: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        data = data.rstrip(b"\r\n")
        if not data:
            return
        if b'"challenge"' in data:
            cookie = _challenge_cookie(data)
            if cookie is not None:
                if self.validated:
                    self._forgotten()
                else:
                    self.cookie = cookie
                    self._wakeup()
                return
        if not self.validated:
            # Before the handshake is done nothing but its ping was sent: this is the
            # session's answer to it (a pong, or an error when the hub wants hello first).
            self.validated = True
            self._wakeup()
            return
        self._on_frame(self, data)

    def _wakeup(self) -> None:
        waiter = self._wake
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _forgotten(self) -> None:
        log.info("wirehub client: the hub no longer knows this udp session (it restarted or the session expired)")
        self._ended(ConnectionResetError("the hub no longer knows this UDP session"))
        if self._transport is not None:
            self._transport.close()

    async def handshake(self) -> None:
        """Validate this socket's address with the hub; the caller bounds it in time."""
        loop = asyncio.get_running_loop()
        delay = UDP_RETRY_FIRST
        while not self.validated:
            if self.closed or self._transport is None:
                cause = self.done.result() if self.done.done() else None
                raise cause if isinstance(cause, OSError) else ConnectionResetError("the UDP socket closed during the handshake")
            frame = b'{"op":"ping"' + (b',"cookie":"' + self.cookie.encode() + b'"' if self.cookie else b"")
            pad = max(0, UDP_PAD_TO - len(frame) - len(b',"pad":""}'))
            self._transport.sendto(frame + b',"pad":"' + b" " * pad + b'"}')
            cookie = self.cookie
            self._wake = loop.create_future()
            try:
                await asyncio.wait_for(self._wake, delay)
            except asyncio.TimeoutError:
                delay = min(delay * 2, UDP_RETRY_MAX)  # lost (either way): send again, later
            finally:
                self._wake = None
            if self.cookie != cookie:
                delay = UDP_RETRY_FIRST  # a fresh cookie: echo it at once

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self._ended(exc)
            self._wakeup()
            if self._transport is not None:
                self._transport.close()
        else:
            log.debug("wirehub client: udp error: %s", exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        self._ended(exc)
        self._wakeup()

    async def send(self, data: bytes) -> None:
        if self._transport is None or self.closed:
            raise ConnectionResetError("the connection is closed")
        self._transport.sendto(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        else:
            self._ended(None)

    abort = close


#: the handshake's datagrams are padded to this many bytes, so that the hub's challenge fits
#: within the 3x it may send an address it has not validated (as QUIC pads its Initial)
UDP_PAD_TO = 200
#: the handshake resends after this delay, doubling up to UDP_RETRY_MAX
UDP_RETRY_FIRST = 0.2
UDP_RETRY_MAX = 1.0

_generic_decode = msgspec.json.Decoder().decode


def _challenge_cookie(data: bytes) -> str | None:
    """The cookie of a ``{"op":"challenge","cookie":C}`` frame, or None for any other frame."""
    try:
        frame = _generic_decode(data)
    except msgspec.DecodeError:
        return None
    if type(frame) is dict and frame.get("op") == "challenge":
        cookie = frame.get("cookie")
        if type(cookie) is str and cookie.isascii() and cookie.isprintable() and '"' not in cookie and "\\" not in cookie:
            return cookie
    return None


# ---------------------------------------------------------------------- opening


def client_ssl_context(endpoint: Endpoint, ssl: Any) -> Any:
    """The SSL context for tls:// and wss:// (the system's CAs unless one is given)."""
    if not endpoint.secure:
        if ssl not in (None, False):
            raise ValueError(f"ssl= was given but {endpoint.scheme}:// is not a TLS transport (use tls:// or wss://)")
        return None
    if ssl is None or ssl is True:
        return _ssl.create_default_context()
    return ssl


async def open_link(
    endpoint: Endpoint,
    on_frame: OnFrame,
    on_lost: OnLost,
    *,
    ssl: Any = None,
    max_frame: int,
    timeout: float,
    on_link: Callable[[Link], None] | None = None,
) -> Link:
    """Open a link; any failure is a :class:`ConnectError` that says where and why.
    ``on_link`` gets the link as soon as it exists, before it can receive anything (a hub
    may speak first: a refusal is sent at once)."""
    loop = asyncio.get_running_loop()
    context = client_ssl_context(endpoint, ssl)
    try:
        return await asyncio.wait_for(_open(loop, endpoint, on_frame, on_lost, context, max_frame, on_link or _ignore), timeout)
    except ConnectError:
        raise
    except asyncio.TimeoutError:
        raise ConnectError(f"cannot connect to {endpoint.url}: no connection within {timeout:g}s") from None
    except _ssl.SSLError as exc:
        raise ConnectError(f"cannot connect to {endpoint.url}: TLS handshake failed: {exc}") from exc
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        raise ConnectError(f"cannot connect to {endpoint.url}: {why}") from exc
    except Exception as exc:
        if exc.__class__.__module__.startswith("websockets"):
            raise ConnectError(f"cannot connect to {endpoint.url}: WebSocket handshake failed: {exc}") from exc
        raise


def _ignore(link: Link) -> None:
    pass


async def _open(
    loop: asyncio.AbstractEventLoop, ep: Endpoint, on_frame: OnFrame, on_lost: OnLost, context: Any, max_frame: int, on_link: Callable[[Link], None]
) -> Link:
    kind = ep.scheme
    if kind in ("tcp", "tls"):
        link = StreamLink(kind, on_frame, on_lost, max_frame)
        on_link(link)
        transport, _ = await loop.create_connection(lambda: link, ep.host, ep.port, ssl=context, server_hostname=ep.host if context else None)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
        return link
    if kind == "unix":
        link = StreamLink(kind, on_frame, on_lost, max_frame)
        on_link(link)
        await loop.create_unix_connection(lambda: link, ep.path)
        return link
    if kind == "udp":
        dlink = DatagramLink(on_frame, on_lost)
        on_link(dlink)
        await loop.create_datagram_endpoint(lambda: dlink, remote_addr=(ep.host, ep.port))
        try:
            await dlink.handshake()
        except BaseException:
            dlink.abort()
            raise
        return dlink
    # ws, wss
    from websockets.asyncio.client import connect as ws_connect

    options: dict[str, Any] = dict(ssl=context, max_size=max_frame, ping_interval=None, compression=None, open_timeout=None)
    if _WS_MAJOR >= 15:
        options["proxy"] = None  # a loopback hub must not be reached through $HTTP_PROXY
    wlink = WebSocketLink(kind, on_frame, on_lost)
    on_link(wlink)
    ws = await ws_connect(ep.url, **options)
    wlink.start(ws)
    return wlink
