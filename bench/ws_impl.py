"""Which WebSocket implementation should wirehub build on? Echo throughput, side by side.

Starts each echo server in its own process (pinned to core 0 when there are two cores),
drives it with the same raw-socket load generator (pinned to core 1): C connections, each
keeping P messages of S bytes in flight, for D seconds. Prints a table and, with
--markdown FILE, writes it for docs/benchmarks.md.

    python bench/ws_impl.py --connections 100 --pipeline 16 --size 64 --seconds 5 --runs 3

Servers:
  wirehub     wirehub's WebSocket listener (websockets' sans-I/O core in an asyncio
              Protocol) serving the echo app, on uvloop
  websockets  the websockets library's own asyncio server, on uvloop
  picows      a bare picows echo server, on uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- servers


def serve_websockets(port: int) -> None:
    import uvloop
    from websockets.asyncio.server import serve

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async def main():
        async with serve(echo, "127.0.0.1", port, compression=None, max_size=2**16):
            print("ready", flush=True)
            await asyncio.Future()

    uvloop.run(main())


def serve_picows(port: int) -> None:
    import uvloop
    from picows import WSListener, WSMsgType, ws_create_server

    class Echo(WSListener):
        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.TEXT:
                transport.send(WSMsgType.TEXT, frame.get_payload_as_memoryview())
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

    async def main():
        server = await ws_create_server(lambda request: Echo(), "127.0.0.1", port)
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


def server_command(kind: str, port: int) -> list[str]:
    if kind == "wirehub":
        return [sys.executable, "-m", "wirehub", "run", "wirehub.apps.echo:app", "--ws", f"127.0.0.1:{port}",
                "--tcp", "off", "--udp", "off", "--admin", "off", "--log-level", "warning"]
    return [sys.executable, __file__, "--serve", kind, "--port", str(port)]


# ----------------------------------------------------------------------------- load


def masked_text_frame(payload: bytes, key: bytes = b"\x11\x22\x33\x44") -> bytes:
    """A client-to-server text frame (clients must mask), built once and sent many times."""
    assert len(payload) < 126
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + key + masked


async def load(port: int, connections: int, pipeline: int, size: int, seconds: float) -> dict:
    """A load generator that costs almost nothing per message, so that the server is what
    gets measured: each connection writes a pre-built burst of ``pipeline`` masked frames
    and counts reply bytes (every reply is exactly ``2 + size`` bytes) before the next."""
    loop = asyncio.get_running_loop()
    burst = masked_text_frame(b"x" * size) * pipeline
    reply = 2 + size
    upgrade = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    state = {"stop_at": float("inf")}

    class Client(asyncio.Protocol):
        def __init__(self):
            self.upgraded = loop.create_future()
            self.done = loop.create_future()
            self.head = b""
            self.pending = 0  # reply bytes still expected for the burst in flight
            self.messages = 0

        def connection_made(self, transport):
            self.transport = transport
            transport.write(upgrade)

        def send_burst(self):
            self.pending = reply * pipeline
            self.transport.write(burst)

        def data_received(self, data):
            if not self.upgraded.done():
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end >= 0:
                    assert self.head.startswith(b"HTTP/1.1 101"), self.head[:40]
                    self.upgraded.set_result(None)
                return
            self.pending -= len(data)
            if self.pending <= 0:
                self.messages += pipeline
                if loop.time() < state["stop_at"]:
                    self.send_burst()
                elif not self.done.done():
                    self.done.set_result(None)

    clients = []
    for _ in range(connections):
        _, client = await loop.create_connection(Client, "127.0.0.1", port)
        await asyncio.wait_for(client.upgraded, 10)
        clients.append(client)
    started = loop.time()
    state["stop_at"] = started + seconds
    for c in clients:
        c.send_burst()
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), seconds + 30)
    elapsed = loop.time() - started
    for c in clients:
        c.transport.close()
    total = sum(c.messages for c in clients)
    return {"messages": total, "seconds": elapsed, "msgs_per_s": total / elapsed}


def run_load(port: int, args) -> dict:
    cmd = [sys.executable, __file__, "--load", "--port", str(port), "--connections", str(args.connections),
           "--pipeline", str(args.pipeline), "--size", str(args.size), "--seconds", str(args.seconds)]
    out = subprocess.run(pin(cmd, 1), capture_output=True, text=True, timeout=args.seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pin(cmd: list[str], core: int) -> list[str]:
    return ["taskset", "-c", str(core)] + cmd if (os.cpu_count() or 1) >= 2 else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def measure(kind: str, args) -> list[float]:
    results = []
    for _ in range(args.runs):
        port = free_port()
        proc = subprocess.Popen(pin(server_command(kind, port), 0), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(port, proc)
            results.append(run_load(port, args)["msgs_per_s"])
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("wirehub", "websockets", "picows", "uvloop")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--pipeline", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--servers", default="wirehub,websockets,picows")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        {"websockets": serve_websockets, "picows": serve_picows}[args.serve](args.port)
        return
    if args.load:
        import uvloop

        print(json.dumps(uvloop.run(load(args.port, args.connections, args.pipeline, args.size, args.seconds))))
        return
    rows = {}
    for kind in args.servers.split(","):
        runs = measure(kind, args)
        rows[kind] = runs
        print(f"{kind:11s} median {statistics.median(runs):>10,.0f} msgs/s  runs {[round(r) for r in runs]}", flush=True)
    base = statistics.median(rows["picows"]) if "picows" in rows else None
    lines = [
        f"WebSocket echo, {args.connections} connections x pipeline {args.pipeline}, {args.size}-byte text messages, "
        f"{args.seconds:g} s x {args.runs} runs (median), load from a raw-socket client on another core.",
        "",
        "| server | msgs/s (median) | runs | vs picows |",
        "| --- | ---: | --- | ---: |",
    ]
    for kind, runs in rows.items():
        med = statistics.median(runs)
        ratio = f"{med / base:.2f}" if base else "-"
        lines.append(f"| {kind} | {med:,.0f} | {', '.join(f'{r:,.0f}' for r in runs)} | {ratio} |")
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + f"; Python {sys.version.split()[0]}.")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
