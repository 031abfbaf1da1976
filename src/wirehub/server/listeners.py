"""Listening sockets and the accept loop.

Sockets are bound here (so a supervisor can bind them before forking workers) and accepted
by :class:`StreamListener`, our own accept loop on ``loop.add_reader``: it can pause when the
connection limit is reached (the kernel backlog then holds newcomers) and back off when the
process runs out of file descriptors, which ``loop.create_server`` cannot.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

from .._log import get_logger

log = get_logger("wirehub.listener")

#: accept() errors that mean "out of resources for now": pause and retry later
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BATCH = 64
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0


class BindError(Exception):
    """A listener could not be bound; the message says which and what to do."""


@dataclass(slots=True)
class Endpoint:
    """A bound socket and what it is for."""

    kind: str  # "tcp", "tls", "unix", "udp", "ws", "wss", "admin"
    sock: socket.socket
    address: str  # as printed: "127.0.0.1:7400", "[::1]:7400", "/run/wirehub.sock"
    path: str | None = None  # Unix socket path to unlink at exit
    extra: dict[str, Any] = field(default_factory=dict)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(host: str, port: int, socktype: int) -> tuple[int, Any]:
    try:
        infos = socket.getaddrinfo(host, port, type=socktype, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _bind_error(kind: str, address: str, exc: OSError) -> BindError:
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        hint = f" — another process is listening there; stop it, pick another port with --{kind} HOST:PORT, or disable it with --{kind} off"
    elif exc.errno == errno.EACCES:
        hint = " — ports below 1024 need privileges; pick a port above 1024"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = " — that address is not on this machine"
    return BindError(f"cannot listen on {kind} {address}: {exc.strerror}{hint}")


def bind_inet(
    kind: str,
    host: str,
    port: int,
    *,
    datagram: bool = False,
    backlog: int = 4096,
    reuse_address: bool = True,
    reuse_port: bool = False,
    receive_buffer: int = 0,
) -> Endpoint:
    """Bind a TCP (or, with ``datagram``, UDP) socket on ``host:port``; ``receive_buffer``
    (bytes, 0 for the system's default) sets a datagram socket's SO_RCVBUF."""
    socktype = socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM
    family, sockaddr = _resolve(host, port, socktype)
    address = format_address(host, port)
    sock = socket.socket(family, socktype)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if datagram and receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind(sockaddr)
        if not datagram:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _bind_error(kind, address, exc) from None
    bound = sock.getsockname()
    return Endpoint(kind, sock, format_address(bound[0], bound[1]))


def bind_unix(path: str, *, backlog: int = 4096) -> Endpoint:
    """Bind a Unix stream socket, replacing a stale socket file left by a dead server."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(f"cannot listen on unix {path}: a file that is not a socket is in the way; remove it or pick another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: stale
        else:
            raise BindError(f"cannot listen on unix {path}: another process is serving that socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _bind_error("unix", path, exc) from None
    return Endpoint("unix", sock, path, path=path)


def configure_accepted(sock: socket.socket, *, nodelay: bool, keepalive: bool) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class StreamListener:
    """Accepts on one listening stream socket and hands each new socket to ``on_accept``.

    ``on_accept(listener, sock, addr)`` returns False when the server is full, which pauses
    this listener until :meth:`resume`.
    """

    __slots__ = ("loop", "endpoint", "ssl", "protocol_factory", "_on_accept", "_reading", "_closed", "_backoff", "_retry")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: Endpoint,
        protocol_factory: Callable[[], asyncio.Protocol],
        on_accept: Callable[[StreamListener, socket.socket, Any], bool],
        ssl: Any = None,
    ) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.ssl = ssl
        self.protocol_factory = protocol_factory
        self._on_accept = on_accept
        self._reading = False
        self._closed = False
        self._backoff = BACKOFF_START
        self._retry: asyncio.TimerHandle | None = None

    @property
    def kind(self) -> str:
        return self.endpoint.kind

    def resume(self) -> None:
        if not self._reading and not self._closed and self._retry is None:
            self.loop.add_reader(self.endpoint.sock.fileno(), self._on_readable)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.endpoint.sock.fileno())
            self._reading = False

    def close(self) -> None:
        """Stop accepting and close the socket (a restarted server can bind at once)."""
        if self._closed:
            return
        self.pause()
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.endpoint.sock.close()
        if self.endpoint.path:
            try:
                os.unlink(self.endpoint.path)
            except OSError:
                pass

    def _on_readable(self) -> None:
        sock = self.endpoint.sock
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._back_off(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up before we accepted
                log.error("accept_failed", listener=self.endpoint.address, error=str(exc))
                return
            self._backoff = BACKOFF_START
            if not self._on_accept(self, conn, addr):
                return  # full: the server paused us

    def _back_off(self, exc: OSError) -> None:
        log.warning(
            "accept_backoff",
            listener=self.endpoint.address,
            error=os.strerror(exc.errno or 0),
            retry_in_s=self._backoff,
            hint="raise the open-file limit (ulimit -n) or lower max_connections",
        )
        self.pause()
        self._retry = self.loop.call_later(self._backoff, self._retry_accept)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _retry_accept(self) -> None:
        self._retry = None
        self.resume()
