"""CPU cost of wirehub's hot path per message, in-process, without sockets.

Builds a real :class:`~wirehub.server.server.Server` (no listeners) and real connection
objects bound to a transport that only counts what it is given, then feeds them bursts of
frames exactly as the event loop would (``data_received``, then the per-turn flush) and
reports nanoseconds per message. No syscalls and no load generator, so the figure is the
Python work alone and repeats within a few percent: the tool for deciding between two
versions of the hot path. Throughput through real sockets is ``bench/peers.py``'s.

    python bench/hotpath.py                  # every case
    python bench/hotpath.py --case line-echo --case hub-ping --seconds 2
    python bench/hotpath.py --profile hub-fanout   # cProfile of one case

Cases:
  line-echo     the echo app (``wirehub run wirehub.apps.echo:app``), TCP, 16 lines of 64 B per read
  hub-ping      ``wirehub serve``'s hub, TCP, 16 ``{"op":"ping"}`` per read
  hub-ws-ping   the hub over WebSocket, 16 masked ping frames per read
  hub-fanout    one publisher, 1,000 TCP subscribers joined to a room: ns per delivery
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import socket
import struct
import time
from typing import Any, Callable

from wirehub.apps.echo import app as echo_app
from wirehub.config import load
from wirehub.hub.app import HubApp
from wirehub.server.server import Server
from wirehub.transport.stream import StreamConnection

NO_LISTENERS = {"tcp": "off", "ws": "off", "udp": "off", "admin": "off"}
BURST = 16


class CountingTransport(asyncio.Transport):
    """Takes writes and counts them; never pushes back."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.writes = 0
        self._closing = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # for picows's setsockopt

    def write(self, data: Any) -> None:
        self.written += len(data)
        self.writes += 1

    def writelines(self, lines: Any) -> None:
        for chunk in lines:
            self.write(chunk)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 7400), "socket": self._sock}
        return extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def abort(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._closing = True


def masked_text(payload: bytes) -> bytes:
    """A client text frame masked with the all-zero key (the payload stays as it is)."""
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + struct.pack("!H", n)
    return head + b"\0\0\0\0" + payload


def feed_buffered(proto: Any, data: bytes) -> None:
    """What the loop does for an asyncio.BufferedProtocol (picows's) when data arrives."""
    buf = proto.get_buffer(len(data))
    buf[: len(data)] = data
    proto.buffer_updated(len(data))


class Case:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.ctx = server.ctx
        self.protocols: list[Any] = []

    def close(self) -> None:
        for proto in self.protocols:
            proto.connection_lost(None)

    def stream(self) -> tuple[StreamConnection, CountingTransport]:
        conn = StreamConnection(self.ctx, "tcp", self.server.app.framing)
        transport = CountingTransport()
        conn.connection_made(transport)
        self.protocols.append(conn)
        return conn, transport

    def websocket_conn(self) -> tuple[Any, CountingTransport]:
        from wirehub.transport.websocket import websocket_factory

        proto = websocket_factory(self.ctx, "ws")()
        transport = CountingTransport()
        proto.connection_made(transport)
        self.protocols.append(proto)
        feed_buffered(
            proto,
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        return proto, transport

    def setup(self) -> Callable[[], int]:
        """Returns one round: feeds and flushes, returns the messages it cost."""
        raise NotImplementedError


class Burst(Case):
    """One connection; each round is one read of BURST requests and the flush of the replies."""

    request = b""
    websocket = False

    def setup(self) -> Callable[[], int]:
        flush = self.ctx.flusher.run
        if self.websocket:
            proto, _ = self.websocket_conn()
            burst = masked_text(self.request) * BURST

            def feed(data: bytes) -> None:
                feed_buffered(proto, data)

        else:
            conn, _ = self.stream()
            burst = (self.request + b"\n") * BURST
            feed = conn.data_received

        def round_() -> int:
            feed(burst)
            flush()
            return BURST

        return round_


class LineEcho(Burst):
    request = b"x" * 64


class HubPing(Burst):
    request = b'{"op":"ping"}'


class HubWsPing(HubPing):
    websocket = True


class HubFanout(Case):
    subscribers = 1000

    def setup(self) -> Callable[[], int]:
        flush = self.ctx.flusher.run
        for _ in range(self.subscribers):
            conn, _ = self.stream()
            conn.data_received(b'{"op":"join","room":"bench","presence":false}\n')
        flush()
        pub, _ = self.stream()
        frame = b'{"op":"pub","room":"bench","data":{"t":1,"i":2,"pad":"' + b"x" * 40 + b'"}}\n'
        feed = pub.data_received
        n = self.subscribers

        def round_() -> int:
            feed(frame)
            flush()
            return n

        return round_


CASES: dict[str, tuple[type[Case], Callable[[], Any], dict]] = {
    "line-echo": (LineEcho, lambda: echo_app, {}),
    "hub-ping": (HubPing, None, {}),
    "hub-ws-ping": (HubWsPing, None, {}),
    "hub-fanout": (HubFanout, None, {"history_size": 0}),
}


async def measure(name: str, seconds: float, profile: bool) -> float:
    kind, app_factory, options = CASES[name]
    config = load(env={}, flags={**NO_LISTENERS, **options})
    app = app_factory() if app_factory is not None else HubApp(config)
    server = Server(app, config)
    await server.start()
    case = kind(server)
    try:
        round_ = case.setup()
        for _ in range(200):  # warm up (specialise the bytecode, fill caches)
            round_()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        msgs = 0
        deadline = time.perf_counter() + seconds
        start = time.process_time_ns()  # CPU time: another process on the core does not count
        while time.perf_counter() < deadline:
            for _ in range(50):
                msgs += round_()
        elapsed = time.process_time_ns() - start
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return elapsed / msgs
    finally:
        case.close()
        server.request_stop()
        await server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable; default: all")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3, help="the best of N runs is reported")
    parser.add_argument("--profile", choices=sorted(CASES), help="cProfile one case instead")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    if args.profile:
        run(measure(args.profile, args.seconds, True))
        return
    for name in args.case or list(CASES):
        best = min(run(measure(name, args.seconds, False)) for _ in range(args.runs))
        unit = "delivery" if name == "hub-fanout" else "message"
        print(f"{name:12s} {best:8.0f} ns per {unit}  ({1e9 / best:,.0f}/s on one core)", flush=True)


if __name__ == "__main__":
    main()
