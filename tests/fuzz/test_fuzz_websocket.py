"""The WebSocket frame path on any input.

- Arbitrary bytes after a valid upgrade, sent to a real server over a real socket: the server
  never logs an error or a traceback, everything it sends back is well-formed server frames
  with nothing after a close frame, and another connection, open all along, still echoes.
- Valid client frames (messages, fragmented messages, pings) cut into arbitrary reads, fed to
  the server's WebSocket protocol exactly as the event loop does: the same replies, in order,
  as the frames sent in one read.
- The frame decoder alone: on any bytes in any reads it never raises, gives the items of one
  read, and holds at most one unfinished frame; on frames serialized by the ``websockets``
  library (an independent encoder) it gives back their messages.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirehub import App, Server
from wirehub.protocol.websocket import WebSocketDecoder

from ..helpers import WAIT, addr, make_config, wait_for
from ..protocol.test_websocket import kinds
from ..transport.test_websocket import UPGRADE
from . import fuzz

MAX_FRAME = 1024


class Echo(App):
    """Echoes each message as a binary message (any bytes are valid in one)."""

    def connect(self, conn):
        conn.binary = True

    def frame(self, conn, data):
        conn.send(data)


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes = b"\x0f\xf0\x55\xaa",
                 length_form: str = "minimal") -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    masked = 0x80 if mask else 0
    if length_form == "16" or (length_form == "minimal" and 126 <= n < 65536):
        head = bytes((first, masked | 126)) + struct.pack(">H", n)
    elif length_form == "64" or (length_form == "minimal" and n >= 65536):
        head = bytes((first, masked | 127)) + struct.pack(">Q", n)
    else:
        head = bytes((first, masked | n))
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if mask else payload
    return head + mask + body


def server_frames(data: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """Parse what a server sends: ``[(opcode, fin, payload)]`` and the unparsed rest."""
    frames = []
    pos = 0
    while len(data) - pos >= 2:
        first, second = data[pos], data[pos + 1]
        assert first & 0x70 == 0, f"server frame with reserved bits: {data[pos : pos + 2]!r}"
        assert second & 0x80 == 0, "masked server frame"
        opcode, fin, n = first & 0x0F, bool(first & 0x80), second & 0x7F
        at = pos + 2
        if n == 126:
            n, at = int.from_bytes(data[pos + 2 : pos + 4], "big"), pos + 4
        elif n == 127:
            n, at = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
        if len(data) < at + n:
            break
        frames.append((opcode, fin, data[at : at + n]))
        pos = at + n
    return frames, data[pos:]


# ------------------------------------------------------------------ a real server, in a thread


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


class ThreadServer:
    """A server on its own event loop in a thread: the test talks to it over sockets with
    blocking calls, as an outside client would."""

    def __init__(self, app: App, **options: Any) -> None:
        self.app, self.options = app, options
        self.ready = threading.Event()
        self.server: Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-server", daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        assert self.ready.wait(WAIT), "the server did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.loop is not None and self.server is not None
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(WAIT)

    def _run(self) -> None:
        import uvloop

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.server = Server(self.app, make_config(**self.options))
            await self.server.start()
            self.ready.set()
            await self.server.serve(install_signals=False)

        uvloop.run(main())

    def call(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)


def upgraded_socket(address) -> socket.socket:
    sock = socket.create_connection(address, timeout=WAIT)
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert head.endswith(b"\r\n\r\n"), "the server sent frames before any was asked for"
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


@pytest.fixture(scope="module")
def live():
    errors = ErrorRecords()
    logging.getLogger("wirehub").addHandler(errors)
    try:
        # the wirehub serve defaults that matter here, with a small max_frame so that
        # the oversize paths (refused, 1009) are reached by small inputs
        with ThreadServer(Echo(), ws="127.0.0.1:0", max_frame=MAX_FRAME) as ts:
            assert ts.server is not None
            honest = upgraded_socket(addr(ts.server, "ws"))
            yield ts, honest, errors
            honest.close()
    finally:
        logging.getLogger("wirehub").removeHandler(errors)


def still_echoes(sock: socket.socket, text: bytes) -> None:
    sock.sendall(client_frame(0x1, text))
    got = b""
    while True:
        frames, rest = server_frames(got)
        if frames:
            assert frames == [(0x2, True, text)] and rest == b"", frames
            return
        chunk = sock.recv(65536)
        assert chunk, "the honest connection was closed"
        got += chunk


fuzz_frame = st.builds(
    client_frame,
    opcode=st.integers(0, 15) | st.sampled_from([0, 1, 2, 8, 9, 10]),
    payload=st.binary(max_size=200) | st.integers(MAX_FRAME - 2, 4 * MAX_FRAME + 2).map(lambda n: b"z" * n)
    | st.sampled_from([b"\x03\xe8", b"\x03\xe8bye", b"\x00\x00", b"\x03\xee", b"\x0b\xb8\xff", b"\xff\xfe"]),
    fin=st.booleans(),
    rsv=st.integers(0, 7) | st.just(0),
    mask=st.just(b"\x0f\xf0\x55\xaa") | st.binary(min_size=4, max_size=4) | st.just(b""),
    length_form=st.sampled_from(["minimal", "minimal", "16", "64"]),
)
garbage = (
    st.binary(max_size=400)
    | st.lists(fuzz_frame, max_size=8).map(b"".join)
    | st.tuples(st.lists(fuzz_frame, max_size=4).map(b"".join), st.integers(0, 64)).map(lambda t: t[0][: len(t[0]) - t[1]])
    | st.tuples(st.integers(0, 0xFF), st.sampled_from([126, 127, 0xFE, 0xFF]), st.binary(max_size=12)).map(
        lambda t: bytes(t[:2]) + t[2]  # length fields of every form, complete or not
    )
)


@fuzz(150, deadline_ms=3000)
@given(data=garbage, cuts=st.lists(st.integers(0, 400), max_size=4))
def test_arbitrary_bytes_after_the_upgrade_never_harm_the_server(live, data, cuts):
    ts, honest, errors = live
    sock = upgraded_socket(addr(ts.server, "ws"))
    try:
        bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
        for a, b in zip(bounds, bounds[1:]):
            sock.sendall(data[a:b])
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server may have closed already (a protocol error): what it sent is read below
    received = read_to_eof(sock)
    sock.close()
    frames, rest = server_frames(received)
    assert rest == b"", f"not whole frames: {rest[:40]!r}"
    opcodes = [f[0] for f in frames]
    assert set(opcodes) <= {0x1, 0x2, 0x8, 0xA}, opcodes  # the app's messages, pongs, a close
    if 0x8 in opcodes:
        assert opcodes.index(0x8) == len(opcodes) - 1, "frames after the close frame"
        close = frames[-1][2]
        assert len(close) != 1 and len(close) <= 125
        if close:
            code = int.from_bytes(close[:2], "big")
            # the server's own codes, or a valid code of the client's close echoed back
            # (RFC 6455 7.4: 1000-1003, 1007-1011 and the applications' 3000-4999)
            assert code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011) or 3000 <= code <= 4999, close
            close[2:].decode()
    assert not errors.records, [r.getMessage() for r in errors.records]
    still_echoes(honest, b"still here")


def test_after_the_fuzzing_only_the_honest_connection_is_left(live):
    ts, honest, errors = live
    server = ts.server

    async def settled():
        await wait_for(lambda: len(server.connections()) == 1 and server.gate.count == 1, what="fuzz connections gone")

    ts.call(settled())
    still_echoes(honest, b"last")
    assert not errors.records


# ------------------------------------------------------------------ valid frames, any reads


class RecordingTransport(asyncio.Transport):
    """What the loop's transport would be, minus the socket: records what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self._closing = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # get_extra_info("socket")

    def write(self, data: Any) -> None:
        self.data += data

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 7400), "socket": self._sock}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture(scope="module")
def offline():
    import uvloop

    loop = uvloop.new_event_loop()
    server = Server(Echo(), make_config(max_frame=MAX_FRAME))
    loop.run_until_complete(server.start())
    yield loop, server
    loop.run_until_complete(server.shutdown())
    loop.close()


async def replies_to(server: Server, chunks: list[bytes]) -> list[tuple[int, bool, bytes]]:
    from wirehub.transport.websocket import websocket_factory

    conn = websocket_factory(server.ctx, "ws")()
    transport = RecordingTransport()
    conn.connection_made(transport)
    try:
        for chunk in [UPGRADE, *chunks]:
            conn.data_received(chunk)
            await asyncio.sleep(0)  # the loop turn: the flush
        await asyncio.sleep(0)
        head, _, frames = bytes(transport.data).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        parsed, rest = server_frames(frames)
        assert rest == b""
        return parsed
    finally:
        conn.connection_lost(None)
        transport._sock.close()


message = st.tuples(st.booleans(), st.binary(max_size=300) | st.text(max_size=100).map(str.encode), st.integers(1, 4))


@st.composite
def conversation(draw) -> tuple[bytes, list[tuple[int, bool, bytes]]]:
    """Valid client frames and the replies they must get, in order."""
    wire, expected = [], []
    for binary, payload, parts in draw(st.lists(message, max_size=8)):
        opcode = 0x2 if binary else 0x1
        if not binary:
            payload = payload.decode("utf-8", "replace").encode()
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), min_size=parts - 1, max_size=parts - 1)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            wire.append(client_frame(opcode if i == 0 else 0x0, piece, fin=last, mask=draw(st.binary(min_size=4, max_size=4))))
            if last:
                expected.append((0x2, True, payload))
            if draw(st.booleans()):  # a ping, also between fragments (RFC 6455 5.4)
                ping = draw(st.binary(max_size=125))
                wire.append(client_frame(0x9, ping))
                expected.append((0xA, True, ping))
    return b"".join(wire), expected


@fuzz(200, deadline_ms=1000)
@given(talk=conversation(), cuts=st.lists(st.integers(0, 3000), max_size=20))
def test_valid_frames_in_any_reads_get_the_replies_of_one_read(offline, talk, cuts):
    loop, server = offline
    wire, expected = talk
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(wire)}), len(wire)]
    chunks = [wire[a:b] for a, b in zip(bounds, bounds[1:])]
    assert loop.run_until_complete(replies_to(server, chunks)) == expected
    assert loop.run_until_complete(replies_to(server, [wire])) == expected


# ------------------------------------------------------------------ the decoder alone

HARD = 4 * 64


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


frame_bytes = st.lists(
    st.builds(client_frame, st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA]), st.binary(max_size=300),
              fin=st.booleans(), rsv=st.sampled_from([0, 0, 0, 1, 4]),
              mask=st.sampled_from([b"\x0f\xf0\x55\xaa", b"\0\0\0\0", b""])),
    max_size=8,
).map(b"".join)


@fuzz(300)
@given(data=frame_bytes | st.binary(max_size=600), cuts=st.lists(st.integers(0, 2500), max_size=25))
def test_decoder_on_any_bytes_in_any_reads(data, cuts):
    expected = kinds(WebSocketDecoder(64, HARD).feed(data))
    d = WebSocketDecoder(64, HARD)
    got = []
    for piece in _pieces(data, cuts):
        got += kinds(d.feed(piece))
        assert d.buffered <= HARD + 14
    assert got == expected
    ends = [i for i, item in enumerate(got) if isinstance(item, tuple) and item[0] in ("close", "error")]
    assert ends in ([], [len(got) - 1])  # nothing after a close or a protocol error


@fuzz(200)
@given(messages=st.lists(st.tuples(st.booleans(), st.binary(max_size=200) | st.text(max_size=60).map(str.encode),
                                   st.integers(1, 3)), max_size=6),
       cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_decoder_reads_what_websockets_serializes(messages, cuts):
    from websockets.frames import Frame, Opcode

    wire = b""
    expected = []
    for binary, payload, parts in messages:
        if not binary:
            payload = payload.decode("utf-8", "replace").encode()
        size = -(-len(payload) // parts) or 1
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        for i, chunk in enumerate(chunks):
            opcode = (Opcode.BINARY if binary else Opcode.TEXT) if i == 0 else Opcode.CONT
            wire += Frame(opcode, chunk, fin=i == len(chunks) - 1).serialize(mask=True)
        expected.append(payload)
    wire += Frame(Opcode.CLOSE, (1000).to_bytes(2, "big") + b"done").serialize(mask=True)
    d = WebSocketDecoder(1000, 4000)
    got = []
    for piece in _pieces(wire, cuts):
        got += kinds(d.feed(piece))
    assert got == expected + [("close", 1000, "done")]
