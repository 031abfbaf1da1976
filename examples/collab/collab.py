"""A collaborative text editor on Yjs through the hub: the server side (README.md beside it).

    python examples/collab/collab.py            # the hub, and the page at http://127.0.0.1:7410/
    wirehub serve --config examples/collab/wirehub.toml    # the hub alone (serve web/ yourself)

Rooms, per document NAME:

- ``doc:NAME`` carries Yjs updates: ``{"update": BASE64}``. ``on_publish`` decodes each with
  pycrdt and stores it before it is published (one that does not decode is refused with
  ``app.bad_update``), so the server's copy has every update any client has seen.
- ``awareness:NAME`` carries y-protocols awareness updates (cursors, names, colours):
  ``{"awareness": BASE64}``, with ``"hello": true`` when a client arrives (the others answer
  with their own state). Presence and history are off for it (wirehub.toml): nothing in it is
  kept.
- RPC ``sync`` ``{"doc": NAME, "sv": BASE64}`` (after joining ``doc:NAME``) is Yjs sync step 1;
  its result ``{"update": BASE64, "sv": BASE64}`` is sync step 2 from the server's copy (what
  the client lacks) and the server's own state vector (the client publishes what the server
  lacks). A client gets the whole document in one step, however long ago it was written.

The store is SQLite (``collab.sqlite3`` beside this file) unless ``COLLAB_STORE`` (or
``--store``) names another file or a ``postgresql://`` URL.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import signal
import sys

from aiohttp import web
from pycrdt import Decoder

from wirehub.config import load, parse_addr
from wirehub.hub import Hooks, Hub, Reject

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # docstore, beside this file
from docstore import DocStore, StoreLimit, check_state_vector, check_update  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WEB = os.path.join(HERE, "web")
DEFAULT_STORE = os.path.join(HERE, "collab.sqlite3")
DEFAULT_PAGE = "127.0.0.1:7410"
MAX_DOC_NAME = 100  # characters of a document name (the hub allows rooms of 200)


def unb64(value: object, what: str, code: str = "app.bad_update") -> bytes:
    """The bytes of a base64 field, or Reject(code) naming what was expected."""
    if not isinstance(value, str):
        raise Reject(code, f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Reject(code, f"{what} is not valid base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_awareness(update: bytes) -> None:
    """Raise ValueError unless ``update`` is a y-protocols awareness update: a count, then per
    client its id, clock and JSON state (``null`` when it left)."""
    d = Decoder(update)
    try:
        for _ in range(d.read_var_uint()):
            d.read_var_uint(), d.read_var_uint()
            json.loads(d.read_var_string())
    except (RuntimeError, IndexError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not an awareness update ({exc})") from None
    if d.length != 0:
        raise ValueError("not an awareness update (bytes left over)")


def make_hooks(store: DocStore | None = None) -> Hooks:
    """The editor's hooks over ``store`` (by default the one ``COLLAB_STORE`` names)."""
    store = store if store is not None else DocStore(os.environ.get("COLLAB_STORE") or DEFAULT_STORE)
    hooks = Hooks()
    hooks.store = store

    @hooks.on_join("doc:*")
    def join_doc(ctx, room, data):
        if not 0 < len(room) - 4 <= MAX_DOC_NAME:
            raise Reject("app.bad_doc_name", f"a document name is 1 to {MAX_DOC_NAME} characters: doc:NAME")

    @hooks.on_publish("doc:*", blocking=True)  # sqlite3 and psycopg block: the hub's thread pool
    def update(ctx, room, data):
        raw = unb64(data.get("update") if isinstance(data, dict) else None, 'a Yjs update {"update": BASE64}')
        try:
            check_update(raw)
        except ValueError as exc:
            raise Reject("app.bad_update", f"the update does not decode as a Yjs update: {exc}") from None
        try:
            store.append(room[4:], raw)
        except StoreLimit as exc:  # the document's size, or the number of documents
            raise Reject("limit", str(exc)) from None
        # None: published as sent, once stored

    @hooks.on_rpc("sync", blocking=True)
    def sync(ctx, data):
        name = data.get("doc") if isinstance(data, dict) else None
        if not isinstance(name, str):
            raise Reject("bad_frame", 'sync takes {"doc": NAME, "sv": BASE64 state vector}')
        if "doc:" + name not in ctx.rooms:
            raise Reject("not_member", f"join doc:{name} before sync (so that no update falls between the two)")
        state_vector = unb64(data.get("sv"), "sv (the Yjs state vector)")
        try:
            check_state_vector(state_vector)
        except ValueError as exc:
            raise Reject("app.bad_update", f"sv does not decode as a Yjs state vector: {exc}") from None
        missing, server_state = store.sync(name, state_vector)
        return {"update": b64(missing), "sv": b64(server_state)}

    @hooks.on_publish("awareness:*")
    def awareness(ctx, room, data):
        field = data.get("awareness") if isinstance(data, dict) else None
        raw = unb64(field, 'an awareness update {"awareness": BASE64}', "app.bad_awareness")
        try:
            check_awareness(raw)
        except ValueError as exc:
            raise Reject("app.bad_awareness", str(exc)) from None

    return hooks


hub = make_hooks()


# ---------------------------------------------------------------------- the page


def page_app(ws_url: str) -> web.Application:
    """The editor page (web/index.html and the bundle that ``npm run build`` writes), pointed
    at the hub's WebSocket ``ws_url``."""

    async def index(request: web.Request) -> web.StreamResponse:
        if "ws" not in request.query:
            raise web.HTTPFound(request.rel_url.update_query(ws=ws_url))
        return web.FileResponse(os.path.join(WEB, "index.html"))

    async def bundle(request: web.Request) -> web.StreamResponse:
        path = os.path.join(WEB, "dist", request.match_info["name"])
        if not os.path.exists(path):
            return web.Response(status=404, text="the bundle is not built: cd examples/collab/web && npm ci && npm run build\n")
        return web.FileResponse(path, headers={"Content-Type": "text/javascript" if path.endswith(".js") else "application/json"})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/{name:collab\\.js(?:\\.map)?}", bundle)
    return app


async def start_page(address: str, ws_url: str) -> tuple[web.AppRunner, str]:
    """Serve the page on ``address`` (HOST:PORT, port 0 for any); returns (runner, bound address)."""
    host, port = parse_addr(address)
    runner = web.AppRunner(page_app(ws_url), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    return runner, f"{bound[0]}:{bound[1]}"


async def serve(config, hooks: Hooks, page: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Hub(config, hooks=hooks) as running:
        ws = running.addresses["ws"][0]
        runner, bound = await start_page(page, f"ws://{ws}/")
        print(f"collab: open http://{bound}/?doc=welcome in two windows (hub WebSocket ws://{ws}/, store {hooks.store.url})", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    hooks.store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The collaborative editor: the hub with the editor's hooks, and its page.")
    parser.add_argument("--page", default=DEFAULT_PAGE, help=f"HOST:PORT of the page (default {DEFAULT_PAGE})")
    parser.add_argument("--store", default=os.environ.get("COLLAB_STORE") or DEFAULT_STORE,
                        help="SQLite file or postgresql:// URL (default: COLLAB_STORE, else collab.sqlite3 here)")
    parser.add_argument("--config", default=os.path.join(HERE, "wirehub.toml"),
                        help="the hub's settings (default: wirehub.toml here; WIREHUB_* variables override it)")
    args = parser.parse_args(argv)
    try:
        config = load(file=args.config)
        parse_addr(args.page)
    except Exception as exc:  # ConfigError, or a --page that is not HOST:PORT
        sys.exit(f"collab: {exc}")
    asyncio.run(serve(config, make_hooks(DocStore(args.store)), args.page))


if __name__ == "__main__":
    main()
