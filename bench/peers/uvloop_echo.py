"""The Python ceiling: a bare uvloop ``asyncio.Protocol`` echo server (data_received ->
transport.write), with no framing at all. Also the idle-connection memory baseline.

    python bench/peers/uvloop_echo.py PORT [HOST]
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def main(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Echo, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])))
