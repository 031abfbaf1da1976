"""TLS listeners over real loopback sockets: echo, protocol versions, mutual TLS, handshake
deadlines, and failed handshakes next to healthy connections."""

from __future__ import annotations

import asyncio
import ssl
import warnings

import trustme
from cryptography import x509

from ..helpers import WAIT, addr, read_lines, serving, wait_for
from .test_stream import Recorder

Failure = (ssl.SSLError, OSError, asyncio.IncompleteReadError)


def client_context(tls_certs, *, client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=tls_certs["ca"])
    if client_cert:
        ctx.load_cert_chain(tls_certs["client_cert"])
    return ctx


def tls_options(tls_certs, **extra) -> dict:
    return dict(tls="127.0.0.1:0", cert=tls_certs["cert"], key=tls_certs["key"], **extra)


async def open_tls(server, ctx):
    return await asyncio.wait_for(
        asyncio.open_connection(*addr(server, "tls"), ssl=ctx, ssl_handshake_timeout=WAIT), WAIT
    )


async def attempt(server, ctx, payload: bytes = b"ping\n"):
    """Handshake, send ``payload``, read until EOF. Returns the bytes read, or the exception
    that ended the attempt (handshake refused, alert, reset)."""
    try:
        reader, writer = await open_tls(server, ctx)
    except Failure as exc:
        return exc
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.read(), WAIT)
    except Failure as exc:
        return exc
    finally:
        writer.close()


def refused(result) -> bool:
    """The attempt did not get an echo: it failed, or the server closed without a byte."""
    return isinstance(result, BaseException) or result == b""


async def test_tls_echo(tls_certs):
    app = Recorder()
    async with serving(app, **tls_options(tls_certs)) as server:
        reader, writer = await open_tls(server, client_context(tls_certs))
        writer.write(b"hello over tls\nsecond\n")
        assert await read_lines(reader, 2) == [b"hello over tls", b"second"]
        version = writer.get_extra_info("ssl_object").version()
        assert version in ("TLSv1.2", "TLSv1.3")
        (conn,) = server.connections()
        assert conn.transport == "tls" and conn.peer_ip == "127.0.0.1"
        assert conn.bytes_in == len(b"hello over tls\nsecond\n")  # plaintext bytes, not records
        assert not conn.tls_peer_certificate  # no client certificate asked for
        writer.close()
        (event,) = await app.disconnected()
        assert event[2] == "closed"
        await wait_for(lambda: server.gate.count == 0, what="gate released")


async def test_tls12_client_is_accepted(tls_certs):
    ctx = client_context(tls_certs)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with serving(Recorder(), **tls_options(tls_certs)) as server:
        reader, writer = await open_tls(server, ctx)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
        writer.write(b"v12\n")
        assert await read_lines(reader, 1) == [b"v12"]
        writer.close()


async def test_tls11_client_is_refused(tls_certs):
    ctx = client_context(tls_certs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            # let this OpenSSL offer the old versions at all, so the *server* says no
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            pass  # cannot even offer TLS 1.1 here: the handshake must fail all the same
    app = Recorder()
    async with serving(app, **tls_options(tls_certs)) as server:
        result = await attempt(server, ctx)
        assert isinstance(result, Failure), result
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        assert app.log == [] and server.connections() == []


async def test_mutual_tls_client_without_certificate_fails(tls_certs):
    app = Recorder()
    async with serving(app, **tls_options(tls_certs, client_ca=tls_certs["ca"])) as server:
        result = await attempt(server, client_context(tls_certs))
        assert refused(result), result
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        assert app.log == [] and server.connections() == []


async def test_mutual_tls_client_with_certificate(tls_certs):
    app = Recorder()
    async with serving(app, **tls_options(tls_certs, client_ca=tls_certs["ca"])) as server:
        reader, writer = await open_tls(server, client_context(tls_certs, client_cert=True))
        writer.write(b"it is me\n")
        assert await read_lines(reader, 1) == [b"it is me"]
        (conn,) = app.conns
        peercert = conn.tls_peer_certificate
        assert peercert, "server did not keep the client certificate"
        with open(tls_certs["client_cert"], "rb") as f:
            expected = x509.load_pem_x509_certificate(f.read()).subject
        subject = dict(kv for rdn in peercert["subject"] for kv in rdn)
        assert subject == {a.oid._name: a.value for a in expected}
        assert ("email", "client@example.test") in peercert["subjectAltName"]
        writer.close()
        await app.disconnected()


async def test_silent_tcp_client_is_dropped_within_handshake_timeout(tls_certs):
    app = Recorder()
    timeout = 0.3
    async with serving(app, **tls_options(tls_certs, handshake_timeout=timeout)) as server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(*addr(server, "tls"))  # plain TCP
        start = loop.time()
        await wait_for(lambda: server.gate.count == 1, what="slot taken at accept")
        try:
            data = await asyncio.wait_for(reader.read(), WAIT)
        except ConnectionResetError:
            data = b""
        elapsed = loop.time() - start
        assert data == b""  # the server said nothing (no TLS alert to a silent peer), just left
        assert timeout * 0.8 <= elapsed < timeout + 2.0, elapsed
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        assert app.log == []
        writer.close()


async def test_failed_handshakes_do_not_disturb_an_established_connection(tls_certs):
    app = Recorder()
    async with serving(app, **tls_options(tls_certs)) as server:
        reader, writer = await open_tls(server, client_context(tls_certs))
        writer.write(b"before\n")
        assert await read_lines(reader, 1) == [b"before"]

        # plain text on the TLS port: the server's handshake fails
        r2, w2 = await asyncio.open_connection(*addr(server, "tls"))
        w2.write(b"GET / HTTP/1.0\r\n\r\n")
        try:
            junk = await asyncio.wait_for(r2.read(), WAIT)
        except ConnectionResetError:
            junk = b""
        assert b"GET" not in junk
        w2.close()

        # a client that does not trust the server's CA aborts its own handshake
        distrustful = ssl.create_default_context()
        trustme.CA().configure_trust(distrustful)
        result = await attempt(server, distrustful)
        assert isinstance(result, ssl.SSLCertVerificationError), result

        await wait_for(lambda: server.gate.count == 1, what="failed handshakes released")
        writer.write(b"after\n")
        assert await read_lines(reader, 1) == [b"after"]
        assert [e[0] for e in app.log] == ["connect", "frame", "frame"]
        assert len(server.connections()) == 1
        writer.close()
        await app.disconnected()


async def test_handshake_pending_at_shutdown_is_dropped_and_released(tls_certs):
    app = Recorder()
    async with serving(app, **tls_options(tls_certs)) as server:
        reader, writer = await asyncio.open_connection(*addr(server, "tls"))  # never says hello
        await wait_for(lambda: server.gate.count == 1, what="slot taken at accept")
        await asyncio.wait_for(server.shutdown(), WAIT)
        try:
            data = await asyncio.wait_for(reader.read(), WAIT)
        except ConnectionResetError:
            data = b""
        assert data == b""
        assert app.log == []
        writer.close()
        assert server.gate.count == 0


async def test_tls_client_silent_after_handshake_gets_handshake_timeout(tls_certs):
    app = Recorder()
    async with serving(app, **tls_options(tls_certs, handshake_timeout=0.3)) as server:
        reader, writer = await open_tls(server, client_context(tls_certs))
        assert await asyncio.wait_for(reader.read(), WAIT) == b"bye handshake_timeout\n"
        (event,) = await app.disconnected()
        assert event[2] == "handshake_timeout"
        await wait_for(lambda: server.gate.count == 0, what="gate released")
        writer.close()
