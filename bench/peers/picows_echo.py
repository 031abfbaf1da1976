"""A bare picows WebSocket echo server on uvloop: every text or binary message is sent back
as it came, one send per message.

    python bench/peers/picows_echo.py PORT [HOST]
"""

from __future__ import annotations

import sys

import uvloop
from picows import WSListener, WSMsgType, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            transport.send(frame.msg_type, frame.get_payload_as_memoryview())
        elif frame.msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def main(host: str, port: int) -> None:
    server = await ws_create_server(lambda request: Echo(), host, port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1", int(sys.argv[1])))
