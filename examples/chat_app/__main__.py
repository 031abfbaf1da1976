"""``python -m examples.chat_app``: the hub with the chat's hooks, and the chat page, in one
process. Open http://127.0.0.1:8000/ and log in as alice, bob or carol (the users a new
database starts with). Ctrl-C (or SIGTERM) drains the hub and stops.

For every option of the hub (brokers, workers, TLS, tokens), run the hooks in
``wirehub serve --app examples.chat_app:hub`` instead and serve this folder's ``chat.html``
and ``wirehub.js`` from any static server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from wirehub import BindError
from wirehub.config import ConfigError, parse_addr
from wirehub.hub import Hub

from .app import DEFAULT_DATABASE, ChatApp

HERE = os.path.dirname(os.path.abspath(__file__))


def page_server(ws_url: str) -> web.Application:
    """The page and its client library; ``/`` points the page at the hub's WebSocket."""

    async def index(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/chat.html?" + urlencode({**request.query, "ws": ws_url}))

    def file(name: str):
        async def serve(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(os.path.join(HERE, name), headers={"Cache-Control": "no-cache"})

        return serve

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/chat.html", file("chat.html"))
    app.router.add_get("/wirehub.js", file("wirehub.js"))  # clients/js/src/wirehub.js
    return app


async def main(args: argparse.Namespace) -> None:
    chat = ChatApp(args.database)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    page_host, page_port = parse_addr(args.page)
    try:
        async with Hub(hooks=chat.hooks, tcp=args.tcp, ws=args.ws, udp="off", admin=args.admin) as hub:
            ws_url = f"ws://{hub.addresses['ws'][0]}/"
            runner = web.AppRunner(page_server(ws_url), access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, page_host, page_port)
                try:
                    await site.start()
                except OSError as exc:
                    raise SystemExit(f"python -m examples.chat_app: cannot serve the page on {args.page} ({exc.strerror}): "
                                     "pick another address with --page HOST:PORT") from None
                listeners = ", ".join(f"{kind} {where[0]}" for kind, where in hub.addresses.items())
                print(f"chat page: http://{args.page}/  (hub: {listeners}; database: {_shown(args.database)})", flush=True)
                await stop.wait()
            finally:
                await runner.cleanup()
    finally:
        await chat.close()


def _shown(database: str) -> str:
    """The database, for the log: a URL without its user and password."""
    if "://" not in database:
        return database
    url = urlsplit(database)
    return f"{url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}{url.path}"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.chat_app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default=os.environ.get("CHAT_DATABASE") or DEFAULT_DATABASE,
                        help="a SQLite file's path or a postgresql:// URL (env CHAT_DATABASE; default %(default)s)")
    parser.add_argument("--page", default="127.0.0.1:8000", help="HOST:PORT of the chat page (default %(default)s)")
    parser.add_argument("--tcp", default="127.0.0.1:7400", help="the hub's TCP listener, or off (default %(default)s)")
    parser.add_argument("--ws", default="127.0.0.1:7401", help="the hub's WebSocket listener (default %(default)s)")
    parser.add_argument("--admin", default="127.0.0.1:7480", help="the admin API and dashboard, or off (default %(default)s)")
    args = parser.parse_args(argv)
    if args.ws == "off":
        parser.error("--ws: the page talks to the hub over its WebSocket listener; give one (HOST:PORT)")
    try:
        parse_addr(args.page)
    except ValueError as exc:
        parser.error(f"--page: {exc}")
    return args


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    try:
        asyncio.run(main(arguments))
    except (ConfigError, BindError) as exc:  # a bad or busy address for the hub: nothing was started
        sys.exit(f"python -m examples.chat_app: {exc}")
