"""The server: binds listeners, admits connections, owns their lifecycle, drains on signal.

``Server(app, config)`` runs one process. :func:`wirehub.server.supervisor.run` decides
between one process and a supervisor of ``--workers N``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import signal
import socket
import struct
from typing import TYPE_CHECKING, Any, Iterable

from .._log import get_logger
from ..transport.connection import SHUTDOWN, Context, Settings
from ..transport.datagram import CookieJar, DatagramEndpoint, UdpValidation
from ..transport.stream import StreamConnection, format_peer
from .listeners import BindError, Endpoint, StreamListener, bind_inet, bind_unix, configure_accepted
from ..protocol.framing import FrameError
from ..protocol.proxy import ProxyHeaderParser, ProxyInfo
from .registry import MAX_UDP_SESSIONS, AcceptGate, ConnectionRegistry
from .tls import server_context

if TYPE_CHECKING:
    from ..app import App
    from ..config import Config

log = get_logger("wirehub.server")

#: bytes peeked for a PROXY header: a v2 header with TLVs fits (v1 is at most 107)
PROXY_PEEK = 4096 + 16

#: connections told to leave per batch while draining, and the longest spread of batches
DRAIN_BATCH = 500
DRAIN_SPREAD_MAX = 5.0

STREAM_KINDS = ("tcp", "tls", "unix")


def settings_from(config: Config) -> Settings:
    return Settings(
        max_frame=config.max_frame,
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.idle_timeout,
        close_timeout=config.close_timeout,
        send_buffer_low=config.send_buffer_low,
        send_buffer_high=config.send_buffer_high,
        max_send_buffer=config.max_send_buffer,
        drop_oldest=config.slow_consumer == "drop_oldest",
    )


def bind_all(config: Config, *, reuse_port: bool | None = None, kinds: Iterable[str] | None = None) -> list[Endpoint]:
    """Bind every listener the config asks for; on any failure close them all and raise
    :class:`BindError` naming every address that failed."""
    reuse_port = config.reuse_port if reuse_port is None else reuse_port
    wanted = set(kinds) if kinds is not None else None
    endpoints: list[Endpoint] = []
    errors: list[str] = []
    common = dict(backlog=config.backlog, reuse_address=config.reuse_address, reuse_port=reuse_port)
    plan: list[tuple[str, Any]] = []
    for kind in ("tcp", "tls", "ws", "wss", "udp", "admin"):
        for host, port in getattr(config, kind):
            plan.append((kind, (host, port)))
    for path in config.unix:
        plan.append(("unix", path))
    for kind, where in plan:
        if wanted is not None and kind not in wanted:
            continue
        try:
            if kind == "unix":
                endpoints.append(bind_unix(where, backlog=config.backlog))
            else:
                udp = kind == "udp"
                endpoints.append(bind_inet(kind, where[0], where[1], datagram=udp, receive_buffer=config.udp_receive_buffer if udp else 0, **common))
        except BindError as exc:
            errors.append(str(exc))
    if errors:
        for ep in endpoints:
            ep.sock.close()
        raise BindError("\n".join(errors))
    return endpoints


class Server:
    """One process serving one app on every configured listener."""

    def __init__(self, app: App, config: Config, *, endpoints: list[Endpoint] | None = None, worker: int | None = None) -> None:
        self.app = app
        self.worker = worker
        self.config = config
        self._endpoints = endpoints
        self.listeners: list[StreamListener] = []
        self.datagram_endpoints: list[DatagramEndpoint] = []
        self.addresses: dict[str, list[str]] = {}
        self.draining = False
        self.started = False
        self._stop: asyncio.Event | None = None
        self._signals = 0
        self._forced = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ctx: Context | None = None
        self.gate = AcceptGate(config.max_connections, config.max_connections_per_ip, self._pause_accepting, self._resume_accepting)
        #: UDP sessions' own slots: they never count against (or pause) the stream listeners
        self.udp_gate = AcceptGate(config.max_udp_sessions, config.max_connections_per_ip, _nothing, _nothing, MAX_UDP_SESSIONS)
        self.registry = ConnectionRegistry(self.gate, self.udp_gate, config.closed_connections)
        self.registry.describe = getattr(app, "describe", None)
        #: the secret of this process's UDP address-validation cookies (shared by its UDP sockets)
        self.udp_cookies = CookieJar()
        self._allow = tuple(config.allow)
        self._deny = tuple(config.deny)
        self._proxies = tuple(config.proxy_protocol)
        self._tasks: set[asyncio.Task] = set()
        self.refused: dict[str, int] = {}
        self.loop_lag = LoopLag()
        self.admin: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Run the app's startup hook, then bind (unless given sockets) and start accepting."""
        loop = self.loop = asyncio.get_running_loop()
        if self._stop is None:
            self._stop = asyncio.Event()
        self.app.blocking_pool.threads = self.config.blocking_threads
        self.ctx = Context(loop, self.app.handlers(), settings_from(self.config), self.registry)
        await _maybe_await(self.app.startup(self))
        endpoints = self._endpoints if self._endpoints is not None else bind_all(self.config)
        try:
            await self._listen(endpoints)
        except BaseException:
            for ep in endpoints:
                ep.sock.close()
            raise
        self.started = True

    async def _listen(self, endpoints: list[Endpoint]) -> None:
        assert self.loop is not None and self.ctx is not None
        config = self.config
        framing = self.app.framing
        tls = None
        if any(ep.kind in ("tls", "wss") for ep in endpoints):
            tls = server_context(config.cert, config.key, config.client_ca)
        admin = [ep for ep in endpoints if ep.kind == "admin"]
        if admin:
            from .admin import AdminServer

            self.admin = AdminServer(self)
            await self.admin.start(admin)
        self._spawn(self.loop_lag.run())
        hooks = self.app.udp_hooks()
        validation = UdpValidation(*hooks) if hooks is not None else None
        for ep in endpoints:
            if ep.kind == "udp":
                _, proto = await self.loop.create_datagram_endpoint(
                    lambda: DatagramEndpoint(
                        self.ctx,
                        framing,
                        self._admit_datagram,
                        allowed=self._datagram_allowed,
                        validation=validation,
                        cookies=self.udp_cookies,
                        refusal=self.app.refusal,
                    ),
                    sock=ep.sock,
                )
                self.datagram_endpoints.append(proto)  # type: ignore[arg-type]
            elif ep.kind != "admin":
                factory = self._protocol_factory(ep.kind, framing)
                listener = StreamListener(self.loop, ep, factory, self._accepted, ssl=tls if ep.kind in ("tls", "wss") else None)
                self.listeners.append(listener)
                listener.resume()
            self.addresses.setdefault(ep.kind, []).append(ep.address)
            if self.worker is None:  # a supervisor announces its workers' sockets once
                log.info("listening", transport=ep.kind, address=ep.address)

    def _protocol_factory(self, kind: str, framing: Any):
        ctx = self.ctx
        if kind in ("ws", "wss"):
            from ..transport.websocket import websocket_factory

            return websocket_factory(ctx, kind)
        return lambda: StreamConnection(ctx, kind, framing)

    async def serve(self, *, install_signals: bool = True) -> int:
        """Start, serve until a stop is requested, drain. Returns the exit code."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if install_signals:  # before binding: a signal that comes while we start drains at once
            self._install_signals()
        try:
            await self.start()
            assert self._stop is not None
            await self._stop.wait()
            await self.shutdown()
        finally:
            if install_signals:
                self._remove_signals()
        return 1 if self._forced else 0

    def request_stop(self) -> None:
        """Begin draining (what SIGTERM does)."""
        if self._stop is not None:
            self._stop.set()

    def _install_signals(self) -> None:
        assert self.loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)

    def _remove_signals(self) -> None:
        assert self.loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("draining", signal=sig.name, connections=len(self.registry), timeout_s=self.config.drain_timeout)
            self.request_stop()
        else:
            log.warning("forced_exit", signal=sig.name, connections=len(self.registry))
            self._forced = True
            for conn in self.registry:
                conn.abort()
            if self._drain_task is not None:
                self._drain_task.cancel()

    _drain_task: asyncio.Task | None = None

    async def shutdown(self) -> None:
        """Drain: stop accepting, tell every connection to go (in jittered batches), flush,
        wait for them to close within ``drain_timeout``, abort the rest, run the app's
        shutdown hook."""
        if self.draining:
            return
        self.draining = True
        assert self.loop is not None
        loop = self.loop
        deadline = loop.time() + self.config.drain_timeout
        for listener in self.listeners:
            listener.close()
        for endpoint in self.datagram_endpoints:
            endpoint.stop_accepting()
        self.registry.closing = True
        for conn in list(self.registry.handshaking):  # WebSocket upgrades not yet done
            conn.abort()
        self._drain_task = loop.create_task(self._drain_connections(deadline))
        try:
            await self._drain_task
        except asyncio.CancelledError:
            if not self._forced:
                raise
        remaining = len(self.registry)
        for conn in self.registry:
            conn.abort()
        for endpoint in self.datagram_endpoints:
            endpoint.close()
        for task in list(self._tasks):
            task.cancel()
        if self.admin is not None:
            await self.admin.close()
        try:
            await asyncio.wait_for(_maybe_await(self.app.shutdown(self)), timeout=max(0.1, deadline - loop.time()) if not self._forced else 0.5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("app_shutdown_timeout")
        self.app.blocking_pool.close()
        log.info("stopped", aborted=remaining, forced=self._forced)

    async def _drain_connections(self, deadline: float) -> None:
        assert self.loop is not None
        conns = list(self.registry)
        batches = [conns[i : i + DRAIN_BATCH] for i in range(0, len(conns), DRAIN_BATCH)]
        # Spread the batches over at most half the drain time so that clients told to
        # reconnect do not all come back in the same instant. Each batch has its time on one
        # schedule (a gap apart, with jitter) and waits until then, not a gap after the last
        # one was done: the work of telling 500 connections to go (and of their disconnects)
        # and a busy loop do not add up batch after batch. Behind schedule, batches still come
        # at least a quarter of a gap apart. (With 19,000 connections on a loaded machine the
        # spread of 5 s had grown to 9.7 s, leaving the last batches too little of the drain
        # timeout to close.)
        spread = min(DRAIN_SPREAD_MAX, self.config.drain_timeout / 2)
        gap = spread / len(batches) if len(batches) > 1 else 0.0
        due = self.loop.time()
        for i, batch in enumerate(batches):
            for conn in batch:
                conn.close(SHUTDOWN)
            if gap and i < len(batches) - 1:
                due += gap * random.uniform(0.5, 1.5)
                await asyncio.sleep(max(due - self.loop.time(), gap / 4))
        # Datagram sessions and anything that opened meanwhile.
        for conn in list(self.registry):
            conn.close(SHUTDOWN)
        try:
            await asyncio.wait_for(self.registry.wait_empty(), timeout=max(0.0, deadline - self.loop.time()))
        except asyncio.TimeoutError:
            log.warning("drain_timeout", remaining=len(self.registry))

    # ------------------------------------------------------------------ accept

    def _ip_allowed(self, ip: str) -> bool:
        if not (self._allow or self._deny) or ip == "unix":
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if any(addr in net for net in self._deny):
            return False
        return not self._allow or any(addr in net for net in self._allow)

    def _accepted(self, listener: StreamListener, sock: socket.socket, addr: Any) -> bool:
        peer, ip = format_peer(addr, sock.family)
        if self._proxies and listener.kind != "unix" and _in_networks(ip, self._proxies):
            # A load balancer: the client's address (for limits and lists) comes in the header.
            if self.gate.admit(ip, per_ip=False) is not None:
                self._refuse(listener, sock, peer, "max_connections")
                return False
            configure_accepted(sock, nodelay=self.config.nodelay, keepalive=self.config.keepalive)
            sock.setblocking(False)
            self._spawn(self._connect_proxied(listener, sock, ip, peer))
            return not self.gate.full
        if not self._ip_allowed(ip):
            log.info("refused", reason="denied", peer=peer, listener=listener.endpoint.address)
            self.refused["denied"] = self.refused.get("denied", 0) + 1
            _reset(sock)
            return True
        refusal = self.gate.admit(ip)
        if refusal is not None:
            self._refuse(listener, sock, peer, refusal)
            return refusal != "max_connections"
        configure_accepted(sock, nodelay=self.config.nodelay, keepalive=self.config.keepalive)
        self._spawn(self._connect(listener, sock, ip, peer))
        return not self.gate.full

    async def _connect_proxied(self, listener: StreamListener, sock: socket.socket, lb_ip: str, lb_peer: str) -> None:
        try:
            info = await read_proxy_header(sock, self.config.handshake_timeout)
        except BaseException:
            self.gate.release(lb_ip, per_ip=False)
            sock.close()
            raise
        if isinstance(info, FrameError):
            log.info("proxy_header_refused", peer=lb_peer, error=info.message)
            self.gate.release(lb_ip, per_ip=False)
            _reset(sock)
            return
        if info.source is None:  # LOCAL / UNKNOWN: the proxy itself (health checks)
            peer, ip = lb_peer, lb_ip
        else:
            host, port = info.source
            peer, ip = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host
        refusal = None if self._ip_allowed(ip) else "denied"
        if refusal is None:
            refusal = self.gate.move(ip)
        if refusal is not None:
            self.gate.release(lb_ip, per_ip=False)
            self.refused[refusal] = self.refused.get(refusal, 0) + 1
            log.info("refused", reason=refusal, peer=peer, via=lb_peer, listener=listener.endpoint.address)
            _reset(sock)
            return

        def factory():
            conn = listener.protocol_factory()
            conn.peer, conn.peer_ip, conn.proxied_by = peer, ip, lb_peer
            return conn

        await self._connect(listener, sock, ip, peer, factory)

    async def _connect(self, listener: StreamListener, sock: socket.socket, ip: str, peer: str, factory: Any = None) -> None:
        assert self.loop is not None
        try:
            await self.loop.connect_accepted_socket(
                factory or listener.protocol_factory,
                sock,
                ssl=listener.ssl,
                ssl_handshake_timeout=self.config.handshake_timeout if listener.ssl else None,
            )
        except asyncio.CancelledError:  # shutdown while the TLS handshake was running
            self.gate.release(ip)
            sock.close()
            raise
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            # TLS handshake failed or timed out: give the slot back.
            log.info("handshake_failed", peer=peer, transport=listener.kind, error=str(exc) or type(exc).__name__)
            self.gate.release(ip)
            sock.close()
        except Exception:
            log.exception("accept_setup_failed", peer=peer)
            self.gate.release(ip)
            sock.close()

    def _refuse(self, listener: StreamListener, sock: socket.socket, peer: str, reason: str) -> None:
        log.info("refused", reason=reason, peer=peer, listener=listener.endpoint.address)
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if listener.ssl is None and listener.kind in STREAM_KINDS:
            payload = self.app.refusal(reason)
            if payload:
                try:
                    sock.send(self.app.framing.encode(payload))
                except OSError:
                    pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _datagram_allowed(self, ip: str) -> bool:
        return not self.draining and self._ip_allowed(ip)

    def _admit_datagram(self, ip: str) -> str | None:
        """A UDP session slot for ``ip`` (None), or the name of the limit that refused it."""
        refusal = self.udp_gate.admit(ip)
        if refusal is not None:
            self.refused[refusal] = self.refused.get(refusal, 0) + 1
        return refusal

    def _pause_accepting(self) -> None:
        log.warning("connection_limit_reached", max_connections=self.gate.max_total)
        for listener in self.listeners:
            listener.pause()

    def _resume_accepting(self) -> None:
        if self.draining:
            return
        for listener in self.listeners:
            listener.resume()

    def _spawn(self, coro: Any) -> None:
        assert self.loop is not None
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def asgi(self):
        """An ASGI application that serves this server's app over WebSocket, to mount inside
        a web app (Starlette, FastAPI) so both share one port. Start the server first (in
        the web app's lifespan)."""
        if self._asgi is None:
            from ..transport.asgi import AsgiEndpoint

            self._asgi = AsgiEndpoint(self)
        return self._asgi

    _asgi = None

    # ------------------------------------------------------------------ inspection

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): false while starting or draining, or when the app says so."""
        if not self.started:
            return False, "starting"
        if self.draining:
            return False, "draining"
        app_ready = getattr(self.app, "ready", None)
        if app_ready is not None:
            return app_ready(self)
        return True, "ok"

    def connections(self) -> list:
        return list(self.registry)

    def disconnect(self, conn_id: str, reason: str = "kicked") -> bool:
        conn = self.registry.get(conn_id)
        if conn is None:
            return False
        conn.close(reason)
        return True


class LoopLag:
    """Samples how late the event loop runs a timer: the time a handler that blocks the
    loop steals from every connection. Exported as a histogram by the admin API."""

    bounds = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.last = 0.0
        self.peak = 0.0  # the largest sample since take_peak() last ran

    def record(self, lag: float) -> None:
        self.last = lag
        if lag > self.peak:
            self.peak = lag
        self.total += lag
        for i, bound in enumerate(self.bounds):
            if lag <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def take_peak(self) -> float:
        """The largest sample since the last call (the dashboard's once-a-second point)."""
        peak, self.peak = self.peak, self.last
        return peak

    def cumulative(self) -> list[int]:
        out, running = [], 0
        for n in self.counts:
            running += n
            out.append(running)
        return out

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            self.record(max(0.0, loop.time() - start - self.interval))


def _nothing() -> None:
    pass


async def _maybe_await(result: Any) -> Any:
    """Lifespan hooks may be plain functions or coroutines."""
    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
        return await result
    return result


def _in_networks(ip: str, networks: tuple) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


async def read_proxy_header(sock: socket.socket, timeout: float) -> ProxyInfo | FrameError:
    """Read exactly one PROXY v1/v2 header off ``sock``, leaving what follows (a TLS
    ClientHello, a WebSocket upgrade, frames) unread for the transport. Peeks, then consumes
    only the header's bytes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            data = sock.recv(PROXY_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError as exc:
            return FrameError("bad_frame", f"PROXY protocol: connection failed before the header: {exc.strerror}", fatal=True)
        if data == b"":
            return FrameError("bad_frame", "PROXY protocol: connection closed before the header", fatal=True)
        if data:
            parser = ProxyHeaderParser()
            result = parser.feed(data)
            if result is not None:
                if isinstance(result, ProxyInfo):
                    sock.recv(len(data) - len(parser.remainder))  # exactly the header
                return result
        remaining = deadline - loop.time()
        if remaining <= 0:
            return FrameError("bad_frame", f"PROXY protocol: no complete header within {timeout:g}s", fatal=True)
        if data:
            # Part of a header: readiness stays set while unread bytes wait, so give the
            # rest a moment instead (proxies send the header in one write: this is rare).
            await asyncio.sleep(min(0.01, remaining))
        else:
            waiter = loop.create_future()
            loop.add_reader(sock.fileno(), lambda: waiter.done() or waiter.set_result(None))
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(sock.fileno())


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): a denied client learns at once and no TIME_WAIT stays."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
