"""Run by tests/test_accelerator.py in a fresh interpreter: prints which implementation each
accelerated module took, then echoes lines through a real server on loopback (the echo app on
TCP, a partial line and a "\\r\\n" included), so that every mix of compiled and Python modules
is seen to work together, not only to import."""

import asyncio

import wirehub._accelerator as accelerator
import wirehub.protocol.framing as framing
import wirehub.transport.connection as connection
from wirehub.apps.echo import app
from wirehub.config import load
from wirehub.server.server import Server


async def echo_round_trip() -> bytes:
    config = load(env={}, flags={"tcp": "127.0.0.1:0", "ws": "off", "udp": "off", "admin": "off"})
    server = Server(app, config)
    await server.start()
    try:
        host, _, port = server.addresses["tcp"][0].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"one\ntw")
        await writer.drain()
        writer.write(b"o\r\nthree\n")
        replies = b"".join([await asyncio.wait_for(reader.readline(), 10) for _ in range(3)])
        writer.close()
        return replies
    finally:
        server.request_stop()
        await asyncio.wait_for(server.shutdown(), 10)


print(connection.ACCELERATOR)
print(connection.Connection.__module__)
print(framing.ACCELERATOR)
print(framing.LineDecoder.__module__)
print(accelerator.summary())
print(asyncio.run(echo_round_trip()))
