"""How queued frames become writes: a stream connection's replies to one read go out in one
write when the read is handled; frames for other connections wait for the turn's flush, which
joins everything a connection got in the turn into one write."""

from __future__ import annotations

import array
import asyncio
import socket
from typing import Any

import pytest

from wirehub import App
from wirehub.protocol.framing import Framing, LineDecoder
from wirehub.transport.stream import StreamConnection

from ..helpers import serving


class RecordingTransport(asyncio.Transport):
    """Records every write; pushes back only when told to (``pause_writing`` is the test's)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self._closing = False
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "socket": self._sock}.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._sock.close()

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.close()


class Escape(BaseException):
    pass


class Relay(App):
    """Echoes a frame; ``to:ID:text`` sends ``text`` to connection ID instead; ``bye`` is
    echoed, then the connection is closed."""

    def __init__(self) -> None:
        super().__init__(framing="line")
        self.by_id: dict[str, Any] = {}
        self.handled: list[bytes] = []

    def connect(self, conn) -> None:
        self.by_id[conn.id] = conn

    def frame(self, conn, frame: bytes) -> None:
        self.handled.append(frame)
        if frame == b"escape":
            raise Escape  # not an Exception: dispatch does not catch it
        if frame == b"bye":
            conn.send(frame)
            conn.close()
        elif frame.startswith(b"to:"):
            _, target, text = frame.split(b":", 2)
            self.by_id[target.decode()].send(text)
        else:
            conn.send(frame)


@pytest.fixture
async def relay(request):
    app = Relay()
    options = getattr(request, "param", {})
    async with serving(app, **options) as server:
        made: list[tuple[StreamConnection, RecordingTransport]] = []

        def connect() -> tuple[StreamConnection, RecordingTransport]:
            conn = StreamConnection(server.ctx, "tcp", app.framing)
            transport = RecordingTransport()
            conn.connection_made(transport)
            made.append((conn, transport))
            return conn, transport

        connect.app = app  # type: ignore[attr-defined]
        yield connect
        for conn, _ in made:
            conn.connection_lost(None)


async def test_the_replies_to_one_read_are_one_write_made_before_the_loop_turns(relay):
    conn, transport = relay()
    conn.data_received(b"a\nb\r\nc\n")
    assert transport.writes == [b"a\nb\nc\n"]  # written inside data_received
    await asyncio.sleep(0)  # the turn's flush has nothing more to write
    await asyncio.sleep(0)
    assert transport.writes == [b"a\nb\nc\n"]
    assert conn.frames_out == 3 and conn.bytes_out == 6 and conn.send_buffer == 0


async def test_frames_queued_before_the_read_go_first_in_the_same_write(relay):
    a, a_out = relay()
    b, _ = relay()
    b.data_received(f"to:{a.id}:early\n".encode())  # queued for a, to be flushed this turn
    assert a_out.writes == []
    a.data_received(b"reply\n")
    assert a_out.writes == [b"early\nreply\n"]
    await asyncio.sleep(0)
    assert a_out.writes == [b"early\nreply\n"]  # the flush found it written already


async def test_frames_for_other_connections_wait_for_the_turns_flush_and_are_joined(relay):
    a, _ = relay()
    b, b_out = relay()
    a.data_received(f"to:{b.id}:one\n".encode())
    a.data_received(f"to:{b.id}:two\nto:{b.id}:three\n".encode())
    assert b_out.writes == []  # not b's read: left to the flush
    await asyncio.sleep(0)
    assert b_out.writes == [b"one\ntwo\nthree\n"]  # one write for the whole turn


async def test_a_peer_that_is_behind_gets_its_replies_when_it_catches_up(relay):
    conn, transport = relay()
    conn.pause_writing()  # the transport is above its high water mark
    conn.data_received(b"x\ny\n")
    await asyncio.sleep(0)
    assert transport.writes == [] and conn.send_buffer == 4
    conn.resume_writing()
    assert transport.writes == [b"x\ny\n"]


async def test_a_handler_that_closes_its_connection_mid_read(relay):
    conn, transport = relay()
    conn.data_received(b"one\nbye\nlost\n")
    assert relay.app.handled == [b"one", b"bye"]  # nothing is handled after the close
    assert transport.writes == [b"one\nbye\n"] and transport.is_closing()


async def test_a_sent_buffer_is_copied_so_the_caller_may_reuse_it(relay):
    conn, transport = relay()
    buf = bytearray(b"first")
    conn.pause_writing()
    assert conn.send(buf) and conn.send(memoryview(b"second"))
    buf[:] = b"XXXXX"
    conn.resume_writing()
    assert transport.writes == [b"first\nsecond\n"]
    with pytest.raises(ValueError):
        conn.send(b"two\nlines")
    with pytest.raises(ValueError):  # its bytes hold a newline, whatever its item size
        conn.send(array.array("H", [0x0A00]))
    with pytest.raises(TypeError):
        conn.send("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        conn.send([104, 105])  # type: ignore[arg-type]
    assert conn.frames_out == 2


@pytest.mark.parametrize("relay", [{"slow_consumer": "drop_oldest", "max_send_buffer": "1KiB", "send_buffer_low": "256", "send_buffer_high": "512"}], indirect=True)
async def test_drop_oldest_drops_whole_frames_however_they_were_queued(relay):
    conn, transport = relay()
    conn.pause_writing()  # the peer is behind: frames pile up
    line = b"x" * 99  # 100 bytes on the wire
    for i in range(10):  # 1,000 bytes: at the limit, nothing dropped
        if i % 2:
            assert conn.send_wire(b"%d" % i + line[1:] + b"\n")  # encoded already: one entry
        else:
            assert conn.send(b"%d" % i + line[1:])  # payload + newline: two entries
    assert conn.frames_dropped == 0 and conn.send_buffer == 1000
    conn.send(b"10" + line[2:])  # over: the oldest whole frame goes
    conn.send_wire(b"11" + line[2:] + b"\n")
    assert conn.frames_dropped == 2 and conn.send_buffer == 1000
    conn.resume_writing()
    (data,) = transport.writes
    assert [int(x[:2].rstrip(b"x")) for x in data.split(b"\n")[:-1]] == list(range(2, 12))


async def test_frames_discarded_at_an_abort_are_counted_as_frames(relay):
    conn, _ = relay()
    conn.pause_writing()
    conn.send(b"one")
    conn.send_wire(b"two\n")
    conn.send(b"")  # an empty payload is a frame too (a blank line on the wire)
    conn.send_wire(b"\n")  # and so is an encoded blank line
    conn.send_wire(b"")
    conn.send(b"six")
    conn.abort()
    assert conn.frames_dropped == 6 and conn.send_buffer == 0


@pytest.mark.parametrize("relay", [{"slow_consumer": "drop_oldest", "max_send_buffer": "1KiB", "send_buffer_low": "256",
                                    "send_buffer_high": "512"}], indirect=True)
async def test_drop_oldest_with_encoded_frames_that_look_like_a_newline_or_nothing(relay):
    conn, transport = relay()
    conn.pause_writing()
    conn.send_wire(b"")
    conn.send_wire(b"\n")
    for c in b"abc":
        conn.send(bytes([c]) * 299)
    conn.send(b"d" * 299)  # 1,201 bytes queued: the two encoded frames and "a" go
    assert conn.frames_dropped == 3 and conn.send_buffer == 900
    conn.resume_writing()
    assert transport.writes == [b"b" * 299 + b"\n" + b"c" * 299 + b"\n" + b"d" * 299 + b"\n"]


async def test_what_a_read_queued_is_written_even_when_an_exception_escapes_the_handler(relay):
    conn, transport = relay()
    with pytest.raises(Escape):
        conn.data_received(b"hello\nescape\n")
    assert transport.writes == [b"hello\n"]
    conn.send(b"later")  # the connection still flushes as usual afterwards
    await asyncio.sleep(0)
    assert transport.writes == [b"hello\n", b"later\n"]


class _TupleDecoder:
    """A custom stream decoder whose ``feed`` returns a tuple, not a list."""

    def __init__(self, max_size: int) -> None:
        self._lines = LineDecoder(max_size)

    def feed(self, data: bytes) -> tuple:
        return tuple(self._lines.feed(data))


class _TupleFraming(Framing):
    __slots__ = ()

    def stream_decoder(self, max_size: int) -> _TupleDecoder:
        return _TupleDecoder(max_size)

    def encode(self, payload: bytes) -> bytes:
        return b"<" + payload + b">\n"


async def test_an_apps_own_framing_may_decode_into_any_sequence():
    app = App(framing=_TupleFraming("tuple-lines"))
    app.on_frame(lambda conn, frame: conn.send(frame))
    async with serving(app) as server:
        conn = StreamConnection(server.ctx, "tcp", app.framing)
        transport = RecordingTransport()
        conn.connection_made(transport)
        conn.data_received(b"a\nb\n")
        assert transport.writes == [b"<a>\n<b>\n"]
        conn.connection_lost(None)
