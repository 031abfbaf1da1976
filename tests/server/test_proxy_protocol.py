"""PROXY protocol v1/v2 from trusted load balancers: the header names the real client, which
limits, allow/deny lists and the registry then use."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct

import pytest

from wirehub.apps.echo import app as echo_app

from ..helpers import WAIT, addr, read_lines, serving

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 7400) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int, dst: str = "::1", dport: int = 7400, tlv: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    body = s.packed + d.packed + struct.pack(">HH", sport, dport) + tlv
    fam = 0x21 if s.version == 6 else 0x11  # AF_INET6/AF_INET + STREAM
    return V2_SIG + bytes((0x21, fam)) + struct.pack(">H", len(body)) + body


async def open_from(server, source: str = "127.0.0.1", kind: str = "tcp", **kw):
    return await asyncio.open_connection(*addr(server, kind), local_addr=(source, 0), **kw)


async def test_v1_and_v2_headers_name_the_client():
    async with serving(echo_app, tcp="127.0.0.1:0", proxy_protocol="127.0.0.1/32", admin="off") as server:
        r1, w1 = await open_from(server)
        w1.write(v1("203.0.113.7", 5555) + b"hello\n")  # header and data in one segment
        assert await read_lines(r1, 1) == [b"hello"]
        r2, w2 = await open_from(server)
        w2.write(v2("2001:db8::42", 6000, tlv=b"\x04\x00\x02ab"))
        await w2.drain()
        w2.write(b"world\n")
        assert await read_lines(r2, 1) == [b"world"]
        peers = sorted((c.peer, c.peer_ip, c.proxied_by.split(":")[0]) for c in server.connections())
        assert peers == [("203.0.113.7:5555", "203.0.113.7", "127.0.0.1"), ("[2001:db8::42]:6000", "2001:db8::42", "127.0.0.1")]
        w1.close()
        w2.close()


async def test_untrusted_sources_are_not_parsed():
    async with serving(echo_app, tcp="127.0.0.1:0", proxy_protocol="127.0.0.1/32") as server:
        reader, writer = await open_from(server, "127.0.0.2")
        writer.write(v1("203.0.113.7", 5555) + b"x\n")  # just a line to the app
        assert await read_lines(reader, 2) == [b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 7400", b"x"]
        assert server.connections()[0].peer_ip == "127.0.0.2"
        writer.close()


async def test_a_trusted_source_must_send_a_valid_header():
    async with serving(echo_app, tcp="127.0.0.1:0", proxy_protocol="127.0.0.0/8", handshake_timeout=0.3) as server:
        reader, writer = await open_from(server)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), WAIT)
        silent_r, silent_w = await open_from(server)  # sends nothing: dropped at the deadline
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(silent_r.read(), WAIT)
        assert server.gate.count == 0 and not server.connections()


async def test_limits_and_lists_apply_to_the_real_client():
    async with serving(
        echo_app, tcp="127.0.0.1:0", proxy_protocol="127.0.0.1/32", max_connections_per_ip=1, deny="198.51.100.0/24"
    ) as server:
        a = await open_from(server)
        a[1].write(v1("203.0.113.7", 1) + b"a\n")
        await read_lines(a[0], 1)
        b = await open_from(server)  # same load balancer, another client: fine
        b[1].write(v1("203.0.113.8", 2) + b"b\n")
        await read_lines(b[0], 1)
        for header in (v1("203.0.113.7", 3), v1("198.51.100.9", 4)):  # over its limit; denied
            r, w = await open_from(server)
            w.write(header + b"c\n")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), WAIT)
        assert server.gate.per_ip("203.0.113.7") == 1 and server.gate.count == 2
        assert server.refused == {"max_connections_per_ip": 1, "denied": 1}
        a[1].close()
        b[1].close()


async def test_proxy_header_before_tls(tls_certs):
    async with serving(
        echo_app, tls="127.0.0.1:0", cert=tls_certs["cert"], key=tls_certs["key"], proxy_protocol="127.0.0.1/32"
    ) as server:
        raw = socket.create_connection(addr(server, "tls"), source_address=("127.0.0.1", 0))
        raw.sendall(v1("192.0.2.10", 4444))  # the header goes first, in clear, then TLS
        ctx = ssl.create_default_context(cafile=tls_certs["ca"])
        reader, writer = await asyncio.open_connection(sock=raw, ssl=ctx, server_hostname="127.0.0.1")
        writer.write(b"secure\n")
        assert await read_lines(reader, 1) == [b"secure"]
        assert server.connections()[0].peer == "192.0.2.10:4444"
        writer.close()


async def test_local_command_keeps_the_balancers_address():
    async with serving(echo_app, tcp="127.0.0.1:0", proxy_protocol="127.0.0.1/32") as server:
        reader, writer = await open_from(server)
        writer.write(V2_SIG + b"\x20\x00\x00\x00" + b"health\n")  # v2 LOCAL: a health check
        assert await read_lines(reader, 1) == [b"health"]
        assert server.connections()[0].peer_ip == "127.0.0.1"
        writer.close()
