"""UDP listeners over real loopback sockets: one session per source address."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ..helpers import WAIT, addr, serving
from .test_stream import Recorder


class UdpClient(asyncio.DatagramProtocol):
    """A UDP socket of its own (its own source port) whose replies queue up to be awaited."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr) -> None:
        self.replies.put_nowait(data)

    @classmethod
    async def open(cls, server, family: int = socket.AF_INET) -> "UdpClient":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(addr(server, "udp"))
        _, proto = await asyncio.get_running_loop().create_datagram_endpoint(cls, sock=sock)
        proto.sock = sock
        return proto

    def connection_made(self, transport) -> None:
        self.transport = transport

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    def send(self, data: bytes) -> None:
        # straight to the socket: asyncio's sendto() silently skips empty datagrams
        self.sock.send(data)

    async def recv(self) -> bytes:
        return await asyncio.wait_for(self.replies.get(), WAIT)

    async def exchange(self, data: bytes) -> bytes:
        self.send(data)
        return await self.recv()

    def close(self) -> None:
        self.transport.close()


async def test_echo_per_datagram_exact_bytes():
    app = Recorder()
    async with serving(app, udp="127.0.0.1:0") as server:
        client = await UdpClient.open(server)
        cases = [
            (b"hello\n", b"hello\n"),  # one trailing newline stripped, one added back
            (b"hello", b"hello\n"),  # none to strip
            (b"two\n\n", b"two\n\n"),  # only one is stripped
            (b"crlf\r\n", b"crlf\n"),  # \r\n counts as the newline
            (b"in\nside", b"in\nside\n"),  # a datagram is one frame, newlines and all
            (b"\x00\xff binary", b"\x00\xff binary\n"),
            (b"\n", b"\n"),  # an empty frame: unlike a blank line on a stream, not skipped
            (b"", b"\n"),
        ]
        for sent, expected in cases:
            assert await client.exchange(sent) == expected, sent
        frames = [e[2] for e in app.log if e[0] == "frame"]
        assert frames == [b"hello", b"hello", b"two\n", b"crlf", b"in\nside", b"\x00\xff binary", b"", b""]
        (conn,) = server.connections()
        assert conn.transport == "udp" and conn.peer == f"127.0.0.1:{client.port}"
        assert conn.frames_in == len(cases) and conn.frames_out == len(cases)
        assert conn.bytes_in == sum(len(s) for s, _ in cases)
        assert conn.bytes_out == sum(len(e) for _, e in cases)
        client.close()


async def test_two_source_addresses_get_two_sessions():
    app = Recorder()
    async with serving(app, udp="127.0.0.1:0") as server:
        a = await UdpClient.open(server)
        b = await UdpClient.open(server)
        assert await a.exchange(b"from a") == b"from a\n"
        assert await b.exchange(b"from b") == b"from b\n"
        assert await a.exchange(b"a again") == b"a again\n"
        conns = server.connections()
        assert len(conns) == 2 and {c.transport for c in conns} == {"udp"}
        assert {c.peer for c in conns} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
        assert [e[0] for e in app.log].count("connect") == 2
        assert server.udp_gate.count == 2 and server.gate.count == 0  # UDP has its own slots
        a.close()
        b.close()


async def test_idle_session_is_closed_with_a_last_datagram():
    app = Recorder()
    async with serving(app, udp="127.0.0.1:0", idle_timeout=0.3) as server:
        loop = asyncio.get_running_loop()
        client = await UdpClient.open(server)
        # 8 bytes sent: an unvalidated session may be sent 24 (echo 9, bye 9)
        assert await client.exchange(b"hi there") == b"hi there\n"
        start = loop.time()
        assert await client.recv() == b"bye idle\n"  # the closing handler's frame, as a datagram
        assert 0.2 <= loop.time() - start < 2.3
        (event,) = await app.disconnected()
        assert event[2] == "idle"
        assert [e[0] for e in app.log] == ["connect", "frame", "closing", "disconnect"]
        assert server.connections() == [] and server.udp_gate.count == 0
        # the same address opens a fresh session
        assert await client.exchange(b"back") == b"back\n"
        (conn,) = server.connections()
        assert conn.id != app.conns[0].id
        client.close()


async def test_oversized_datagram_is_a_frame_error():
    app = Recorder()
    async with serving(app, udp="127.0.0.1:0", max_frame="1KiB") as server:
        client = await UdpClient.open(server)
        assert await client.exchange(b"x" * 1024 + b"\n") == b"x" * 1024 + b"\n"  # limit, after stripping
        assert await client.exchange(b"y" * 1025) == b"error too_large\n"
        assert await client.exchange(b"z" * 1025 + b"\n") == b"error too_large\n"
        assert await client.exchange(b"fine") == b"fine\n"  # the session lives on
        errors = [e for e in app.log if e[0] == "error"]
        assert [e[2] for e in errors] == ["too_large", "too_large"]
        assert len(server.connections()) == 1
        client.close()


async def test_max_connections_per_ip_limits_sessions():
    app = Recorder()
    async with serving(app, udp="127.0.0.1:0", max_connections_per_ip=1) as server:
        a = await UdpClient.open(server)
        b = await UdpClient.open(server)
        assert await a.exchange(b"first") == b"first\n"
        b.send(b"refused")
        # Datagrams to one socket are handled in order: once a's reply is back, b's datagram
        # has been seen (and dropped).
        assert await a.exchange(b"still a") == b"still a\n"
        assert b.replies.empty()
        (conn,) = server.connections()
        assert conn.peer == f"127.0.0.1:{a.port}"
        assert [e[0] for e in app.log].count("connect") == 1
        assert server.udp_gate.count == 1
        a.close()
        b.close()


async def test_freed_slot_admits_the_next_source():
    app = Recorder()
    async with serving(app, udp="127.0.0.1:0", max_connections_per_ip=1, idle_timeout=0.2) as server:
        a = await UdpClient.open(server)
        b = await UdpClient.open(server)
        assert await a.exchange(b"a" * 8) == b"a" * 8 + b"\n"
        assert await a.recv() == b"bye idle\n"
        await app.disconnected()
        assert await b.exchange(b"b") == b"b\n"
        assert [c.peer for c in server.connections()] == [f"127.0.0.1:{b.port}"]
        a.close()
        b.close()


async def test_length_framing_sends_raw_datagrams():
    app = Recorder(framing="length")
    async with serving(app, udp="127.0.0.1:0") as server:
        client = await UdpClient.open(server)
        for payload in (b"raw", b"with newline\n", b"\x00\x00\x00\x05hello", b"\r\n"):
            assert await client.exchange(payload) == payload  # no prefix, nothing stripped
        frames = [e[2] for e in app.log if e[0] == "frame"]
        assert frames == [b"raw", b"with newline\n", b"\x00\x00\x00\x05hello", b"\r\n"]
        client.close()


def _rcvbuf(server) -> int:
    return server.datagram_endpoints[0].transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


async def test_receive_buffer_is_set_on_udp_listeners():
    """``udp_receive_buffer`` (4 MiB by default) is the listening socket's SO_RCVBUF, up to the
    kernel's cap (Linux doubles the value asked for, for its bookkeeping); 0 keeps the system's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        system = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        one_mib = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    async with serving(Recorder(), udp="127.0.0.1:0", udp_receive_buffer="1MiB") as server:
        assert _rcvbuf(server) == one_mib
    async with serving(Recorder(), udp="127.0.0.1:0", udp_receive_buffer=0) as server:
        assert _rcvbuf(server) == system
    if one_mib > system:  # the kernel allows more than its default: the default asks for it
        async with serving(Recorder(), udp="127.0.0.1:0") as server:
            assert _rcvbuf(server) >= one_mib


async def test_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    app = Recorder()
    async with serving(app, udp="[::1]:0") as server:
        assert server.addresses["udp"][0].startswith("[::1]:")
        client = await UdpClient.open(server, socket.AF_INET6)
        assert await client.exchange(b"six\n") == b"six\n"
        (conn,) = server.connections()
        assert conn.peer == f"[::1]:{client.port}" and conn.peer_ip == "::1"
        client.close()


async def test_shutdown_closes_sessions_with_a_last_datagram():
    app = Recorder()
    async with serving(app, udp="127.0.0.1:0") as server:
        client = await UdpClient.open(server)
        assert await client.exchange(b"hi there") == b"hi there\n"
        await asyncio.wait_for(server.shutdown(), WAIT)
        assert await client.recv() == b"bye shutdown\n"
        (event,) = await app.disconnected()
        assert event[2] == "shutdown"
        assert server.connections() == [] and server.udp_gate.count == 0
        client.close()


# ------------------------------------------------------------------ address validation


def test_cookie_jar_binds_the_address_and_a_time_window():
    from wirehub.transport.datagram import CookieJar

    now = [1000.0]
    jar = CookieJar(window=30.0, clock=lambda: now[0])
    cookie = jar.issue(("127.0.0.1", 5000))
    assert len(cookie) == 22 and cookie.isascii()
    assert jar.valid(cookie, ("127.0.0.1", 5000)) and jar.valid(cookie.decode(), ("127.0.0.1", 5000))
    assert not jar.valid(cookie, ("127.0.0.1", 5001)) and not jar.valid(cookie, ("127.0.0.2", 5000))
    assert not CookieJar(window=30.0, clock=lambda: now[0]).valid(cookie, ("127.0.0.1", 5000))  # another secret
    now[0] += 30.0  # the next window: still accepted
    assert jar.valid(cookie, ("127.0.0.1", 5000))
    now[0] += 30.0  # two windows on: expired
    assert not jar.valid(cookie, ("127.0.0.1", 5000))
    for bad in (None, 5, b"", "é" * 22, b"x" * 1000):
        assert not jar.valid(bad, ("127.0.0.1", 5000))


class Validating(Recorder):
    """A framework app that validates UDP addresses with its own frames."""

    def udp_challenge(self, cookie):
        return b"prove " + cookie

    def udp_cookie(self, frame):
        return frame[7:] if frame.startswith(b"cookie ") else None


async def test_an_app_with_hooks_keeps_no_state_for_unvalidated_addresses():
    app = Validating()
    async with serving(app, udp="127.0.0.1:0") as server:
        endpoint = server.datagram_endpoints[0]
        client = await UdpClient.open(server)
        client.send(b"hello")  # 5 bytes: the 29-byte challenge would be more than 3x
        client.send(b"x" * 10)
        challenge = await client.recv()  # answers the second only
        assert challenge.startswith(b"prove ") and len(challenge) == 29
        assert client.replies.empty() and server.connections() == [] and app.log == []
        cookie = challenge[6:-1]
        assert await client.exchange(b"cookie " + cookie) == b"cookie " + cookie + b"\n"  # opens it, then is a frame
        (conn,) = server.connections()
        assert conn.validated and [e[0] for e in app.log] == ["connect", "frame"]
        assert await client.exchange(b"y" * 2000) == b"y" * 2000 + b"\n"
        assert await client.exchange(b"z") == b"z\n"  # validated: no budget
        # A cookie from another address does not open a session for this one.
        other = await UdpClient.open(server)
        assert await other.exchange(b"cookie " + cookie) == b"prove " + endpoint.cookies.issue(("127.0.0.1", other.port)) + b"\n"
        assert len(server.connections()) == 1 and server.udp_gate.count == 1 and server.gate.count == 0
        assert endpoint.stats["challenged"] == 2 and endpoint.stats["validated"] == 1 and endpoint.stats["dropped"] == 1
        client.close()
        other.close()


async def test_validated_sessions_over_the_cap_are_refused_with_the_limit_named():
    app = Validating()
    app.refusal = lambda reason: f"refused: {reason}".encode()
    async with serving(app, udp="127.0.0.1:0", max_udp_sessions=1, max_connections=1) as server:
        a, b = await UdpClient.open(server), await UdpClient.open(server)
        for c in (a, b):
            c.send(b"x" * 30)
        cookie_a, cookie_b = (await a.recv())[6:-1], (await b.recv())[6:-1]
        assert await a.exchange(b"cookie " + cookie_a) == b"cookie " + cookie_a + b"\n"
        assert await b.exchange(b"cookie " + cookie_b) == b"refused: max_udp_sessions\n"
        assert [c.peer for c in server.connections()] == [f"127.0.0.1:{a.port}"]
        assert server.refused == {"max_udp_sessions": 1}
        # The stream listeners' own limit is untouched: a TCP connection still gets in.
        assert server.gate.count == 0
        a.close()
        b.close()


async def test_without_hooks_an_unvalidated_session_gets_at_most_3x():
    class Pusher(Recorder):
        def connect(self, conn):
            super().connect(conn)
            conn.send(b"w" * 1000)  # a banner far bigger than any first datagram

    app = Pusher()
    async with serving(app, udp="127.0.0.1:0") as server:
        client = await UdpClient.open(server)
        assert await client.exchange(b"1") == b"1\n"  # the banner (1001 bytes) is dropped: 3 may go
        assert await client.exchange(b"22") == b"22\n"  # 2 + 3 bytes sent of the 9 allowed
        (conn,) = server.connections()
        assert not conn.validated and conn.bytes_in == 3 and conn.bytes_out == 5
        assert conn.frames_dropped == 1 and server.datagram_endpoints[0].stats["over_budget"] == 1
        client.close()


async def test_app_replies_are_answered_without_a_session():
    app = Validating()
    app.replies[b"ping"] = b"pong"
    async with serving(app, udp="127.0.0.1:0") as server:
        client = await UdpClient.open(server)
        assert await client.exchange(b"ping") == b"pong\n"
        assert await client.exchange(b"ping\n") == b"pong\n"
        assert server.connections() == [] and app.log == []
        client.close()


def test_hooks_come_in_pairs():
    app = Recorder()
    assert app.udp_hooks() is None
    app.on_udp_challenge(lambda cookie: b"c " + cookie)
    with pytest.raises(TypeError, match="udp_cookie"):
        app.udp_hooks()
    app.on_udp_cookie(lambda frame: None)
    assert app.udp_hooks() is not None
