"""The ``websockets`` library's own asyncio WebSocket echo server, on uvloop (no compression).

    python bench/peers/websockets_echo.py PORT [HOST]
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:  # the load generator closes without a closing handshake
        pass


async def main(host: str, port: int) -> None:
    async with serve(echo, host, port, compression=None, max_size=2**16, ping_interval=None):
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])))
