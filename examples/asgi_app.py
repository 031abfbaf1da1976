"""The hub inside a Starlette web app: one port for the web page and its WebSocket.

    pip install starlette uvicorn
    python examples/asgi_app.py            # http://127.0.0.1:8000/ (the chat page)

The page's WebSocket is the hub's, mounted at /ws, and the hub also listens on TCP
127.0.0.1:7400, so `wirehub connect tcp://127.0.0.1:7400` chats in the same rooms.
The same works in FastAPI: `app.mount("/ws", hub.asgi)`.
"""

from __future__ import annotations

import contextlib
import os

from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.routing import Mount, Route

from wirehub.hub import Hub

HERE = os.path.dirname(os.path.abspath(__file__))


def create_app(**hub_options) -> tuple[Starlette, Hub]:
    options = {"tcp": "127.0.0.1:7400", "ws": "off", "udp": "off", "admin": "off"} | hub_options
    hub = Hub(**options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await hub.start()  # the hub runs in the web server's event loop
        yield
        await hub.stop()

    async def page(request):
        if "ws" not in request.query_params:  # point the page at the hub mounted below
            return RedirectResponse("/?ws=/ws/")
        return FileResponse(os.path.join(HERE, "web", "chat.html"))

    async def script(request):  # the page's client library (clients/js/src/wirehub.js)
        return FileResponse(os.path.join(HERE, "web", "wirehub.js"), media_type="text/javascript")

    async def announce(request):
        body = await request.json()
        pub = await hub.publish(body.get("room", "lobby"), {"text": body["text"]})
        return JSONResponse({"seq": pub.seq})

    app = Starlette(
        routes=[Route("/", page), Route("/wirehub.js", script), Route("/announce", announce, methods=["POST"]), Mount("/ws", hub.asgi)],
        lifespan=lifespan,
    )
    return app, hub


app, hub = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
