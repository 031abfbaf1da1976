"""Targets (URL parsing, the loopback rule), WebSocket bytes and the client base class.

The load generator speaks raw bytes: requests are built once, WebSocket client frames are
masked with the all-zero key (valid per RFC 6455: the server XORs with it and gets the
payload back), so a frame costs no per-byte work to build, and nothing is parsed on the hot
path beyond what a mode needs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit


class BenchError(Exception):
    """A problem the user can fix (bad URL, refused target, server not answering as expected)."""


#: URL schemes that are plain TCP to a known peer; the protocol follows from them unless
#: --protocol says otherwise
TCP_ALIASES = {"redis": "tcp", "nats": "tcp"}


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str  # tcp | ws (redis:// and nats:// are tcp)
    host: str  # the address connected to (resolved)
    port: int
    path: str = "/"
    hostname: str = ""  # as written in the URL (for the Host header)

    @property
    def ws(self) -> bool:
        return self.scheme == "ws"

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_target(url: str, *, allow_remote: bool = False, schemes: tuple[str, ...] = ("tcp", "ws", "redis", "nats")) -> Target:
    """``tcp://HOST:PORT``, ``ws://HOST:PORT/PATH`` (or ``redis://``, ``nats://``: plain TCP)
    to a :class:`Target`, resolving the host.

    Refuses a host that is not (or does not resolve only to) a loopback address unless
    ``allow_remote``: a load generator pointed at someone else's machine is an attack."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise BenchError(f"unsupported URL {url!r}: use {' or '.join(s + '://HOST:PORT' for s in schemes)}")
    try:
        port = parts.port
    except ValueError:
        raise BenchError(f"bad port in {url!r}") from None
    host = parts.hostname
    if not host or port is None:
        raise BenchError(f"URL {url!r} needs a host and a port, for example {scheme}://127.0.0.1:7400")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc}") from None
    addresses = [info[4][0] for info in infos]
    if not allow_remote and not all(is_loopback_host(a) for a in addresses):
        raise BenchError(
            f"refusing to load {url}: {host} is not a loopback address. wirehub bench targets 127.0.0.1 or ::1 "
            "unless you pass --allow-remote (only against machines you own)."
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url=url, scheme=TCP_ALIASES.get(scheme, scheme), host=addresses[0], port=port, path=path, hostname=host)


def url_scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def share(total: int, index: int, parts: int) -> int:
    """How many of ``total`` items process ``index`` of ``parts`` takes (they sum to total)."""
    return total // parts + (1 if index < total % parts else 0)


# ----------------------------------------------------------------------------- WebSocket

_ZERO_KEY = b"\x00\x00\x00\x00"


def ws_client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final, masked client frame with the zero key (the payload is sent as is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", n)
    return head + _ZERO_KEY + payload


def ws_client_header(n: int, opcode: int = 0x1) -> bytes:
    """The header (with the zero mask key) of a client frame of ``n`` payload bytes."""
    if n < 126:
        return bytes((0x80 | opcode, 0x80 | n)) + _ZERO_KEY
    if n < 65536:
        return bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n) + _ZERO_KEY
    return bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", n) + _ZERO_KEY


def ws_upgrade_request(target: Target) -> bytes:
    host = target.hostname or target.host
    if ":" in host:
        host = f"[{host}]"
    return (
        f"GET {target.path} HTTP/1.1\r\nHost: {host}:{target.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {_ws_key()}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: wirehub-bench\r\n\r\n"
    ).encode()


def _ws_key() -> str:
    import base64

    return base64.b64encode(os.urandom(16)).decode()


def ws_parse(buf: bytearray) -> list[tuple[int, bytes]]:
    """Complete server frames (unmasked) at the front of ``buf``, removed from it:
    (opcode, payload) each. Fragments are returned as they come (the bench never needs them)."""
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        b1 = buf[pos + 1]
        n = b1 & 0x7F
        head = 2
        if n == 126:
            if end - pos < 4:
                break
            n = struct.unpack_from("!H", buf, pos + 2)[0]
            head = 4
        elif n == 127:
            if end - pos < 10:
                break
            n = struct.unpack_from("!Q", buf, pos + 2)[0]
            head = 10
        if b1 & 0x80:
            head += 4  # a masked server frame is a protocol error, but skip its key anyway
        if end - pos < head + n:
            break
        out.append((buf[pos] & 0x0F, bytes(buf[pos + head : pos + head + n])))
        pos += head + n
    del buf[:pos]
    return out


# ----------------------------------------------------------------------------- client base


class Client(asyncio.Protocol):
    """A connection in two phases. Setup (``self.setup`` true): the WebSocket upgrade if any,
    then whole frames to :meth:`setup_frame` until the subclass calls :meth:`end_setup`.
    Then raw chunks go to :meth:`fast` (the subclass's hot path) with no framing done here."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.setup = True
        self.upgraded = not target.ws
        self.ready = self.new_future()  # connected (and upgraded)
        self.lost = False
        self._buf = bytearray()

    def new_future(self) -> asyncio.Future:
        """A future whose exception, if nobody awaits it (the connection was closed at the
        end of a run), is not reported as "never retrieved"."""
        fut = self.loop.create_future()
        fut.add_done_callback(_swallow)
        return fut

    # ---- asyncio

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        if self.target.ws:
            transport.write(ws_upgrade_request(self.target))
        else:
            self.ready.set_result(None)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if not self.ready.done():
            self.ready.set_exception(BenchError(f"{self.target.url} closed the connection during setup"))
        self.on_lost()

    def data_received(self, data: bytes) -> None:
        if self.setup:
            self._setup_received(data)
        else:
            self.fast(data)

    # ---- setup phase

    def _setup_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail("the WebSocket upgrade response is too long")
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if not status.startswith(b"HTTP/1.1 101"):
                self._fail(f"{self.target.url} refused the WebSocket upgrade: {status.decode('latin-1')!r}")
                return
            del buf[: end + 4]
            self.upgraded = True
            self.ready.set_result(None)
        if self.target.ws:
            frames = [f for f in ws_parse(buf) if f[0] in (0x1, 0x2)]
        else:
            frames = []
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                frames.append((0, bytes(buf[:nl])))
                del buf[: nl + 1]
        for i, (opcode, payload) in enumerate(frames):
            self.setup_frame(payload, opcode)
            if not self.setup:
                # whatever followed the last setup frame belongs to the fast path
                rest = b"".join(self.reply_bytes(p, o) for o, p in frames[i + 1 :]) + bytes(buf)
                buf.clear()
                if rest:
                    self.fast(rest)
                return

    def reply_bytes(self, payload: bytes, opcode: int = 0x1) -> bytes:
        """A server frame as it arrives on the wire: a line, or an unmasked WebSocket frame."""
        if not self.target.ws:
            return payload + b"\n"
        n = len(payload)
        first = 0x80 | (opcode or 0x1)
        if n < 126:
            return bytes((first, n)) + payload
        if n < 65536:
            return bytes((first, 126)) + struct.pack("!H", n) + payload
        return bytes((first, 127)) + struct.pack("!Q", n) + payload

    def _fail(self, message: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(BenchError(message))
        self.setup_failed(message)
        if self.transport is not None:
            self.transport.close()

    def end_setup(self) -> None:
        self.setup = False

    def frame(self, payload: bytes) -> bytes:
        """``payload`` framed for the target: a line, or a masked WebSocket text frame."""
        return ws_client_frame(payload) if self.target.ws else payload + b"\n"

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self.frame(payload))

    def hub_join_reply(self, payload: bytes, joined: asyncio.Future) -> None:
        """During setup, a hub's answer to a join: ``joined`` resolves on ``joined``; an
        ``error`` or ``bye`` fails the setup, quoting it."""
        if b'"op":"joined"' in payload:
            self.end_setup()
            if not joined.done():
                joined.set_result(None)
        elif b'"op":"error"' in payload or b'"op":"bye"' in payload:
            self.setup_failed(f"{self.target.url} refused the join: {payload[:200].decode('utf-8', 'replace')}")

    # ---- for subclasses

    def setup_frame(self, payload: bytes, opcode: int) -> None:
        pass

    def setup_failed(self, message: str) -> None:
        pass

    def fast(self, data: bytes) -> None:
        pass

    def on_lost(self) -> None:
        pass

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _swallow(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def frame_for(target: Target, payload: bytes) -> bytes:
    return ws_client_frame(payload) if target.ws else payload + b"\n"


async def connect(target: Target, factory, *, local_addr: tuple[str, int] | None = None, timeout: float = 10.0):
    """Open one connection (and finish the WebSocket upgrade); return the protocol."""
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(factory, target.host, target.port, local_addr=local_addr), timeout
        )
        await asyncio.wait_for(asyncio.shield(proto.ready), timeout)
    except asyncio.TimeoutError:
        raise BenchError(f"{target.url}: connecting timed out after {timeout:g} s") from None
    except ConnectionRefusedError:
        raise BenchError(f"{target.url}: connection refused (is the server running?)") from None
    return proto
