"""The example chat page in a real headless Chromium, talking to the hub's WebSocket listener
through the JavaScript client (clients/js, which examples/web/wirehub.js links to), with a TCP
client in the same room; then the hub restarts and the page reconnects and re-joins by itself."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from aiohttp import web

from wirehub.hub import Hub

from . import browser
from .helpers import WAIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not browser.available(), reason="chromium is not installed (scripts/test installs it)")


async def test_chat_page_in_a_real_browser(tmp_path):
    static = web.Application()
    # wirehub.js is a link to clients/js/src/wirehub.js, outside the folder
    static.router.add_static("/", os.path.join(ROOT, "examples", "web"), follow_symlinks=True)
    runner = web.AppRunner(static, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]
    chrome = await browser.Browser().start()
    try:
        async with Hub(tcp="127.0.0.1:0", ws="127.0.0.1:0", udp="off", admin="off") as hub:
            ws_address = hub.addresses["ws"][0]
            page = await chrome.open(f"http://127.0.0.1:{http_port}/chat.html?ws=ws://{ws_address}/&name=carol&room=lobby")
            await page.wait_until("!document.querySelector('input[name=text]').disabled", "the joined room")

            host, _, port = hub.addresses["tcp"][0].rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))

            async def get():
                return json.loads(await asyncio.wait_for(reader.readline(), WAIT))

            writer.write(b'{"op":"hello","name":"dave"}\n{"op":"join","room":"lobby"}\n')
            assert (await get())["op"] == "welcome" and (await get())["op"] == "joined"
            await page.wait_until("document.getElementById('log').innerText.includes('dave joined')", "dave's arrival")
            writer.write(b'{"op":"pub","room":"lobby","data":{"text":"hello carol"}}\n')
            await page.wait_until("document.getElementById('log').innerText.includes('hello carol')", "dave's message")
            # carol types and sends; dave receives it over TCP
            await page.eval(
                "const i = document.querySelector('input[name=text]'); i.value = 'hi dave';"
                "document.getElementById('form').requestSubmit(); true"
            )
            frames = [await get() for _ in range(2)]  # dave's own message comes back too (he is a member)
            assert [f["data"] for f in frames] == [{"text": "hello carol"}, {"text": "hi dave"}]
            assert frames[1]["room"] == "lobby" and frames[1]["from"] != frames[0]["from"]
            await page.wait_until("document.getElementById('log').innerText.includes('hi dave')", "carol's own message")
            # the library's state, read from the page
            assert await page.eval("[hub.state, hub.rooms.get('lobby').state, hub.rooms.get('lobby').seq]") == ["connected", "joined", 2]
            writer.close()
            first_client = await page.eval("hub.client")

        # The hub restarts on the same port (a new memory broker: a new epoch). The page
        # reconnects, re-joins, says what it could not recover, and chats on.
        async with Hub(tcp="127.0.0.1:0", ws=ws_address, udp="off", admin="off") as hub:
            # the page may not have noticed the restart yet: wait for its new session
            new_session = f"hub.client !== {json.dumps(first_client)} && hub.state === 'connected'"
            await page.wait_until(new_session + " && hub.rooms.get('lobby').state === 'joined'", "the re-joined room")
            await page.wait_until("document.getElementById('log').innerText.includes('earlier messages are gone')", "the gap notice")
            await hub.publish("lobby", {"text": "welcome back"})
            await page.wait_until("document.getElementById('log').innerText.includes('welcome back')", "a message after the restart")
            await page.screenshot(str(tmp_path / "chat.png"))
            assert (tmp_path / "chat.png").stat().st_size > 1000
    finally:
        await chrome.close()
        await runner.cleanup()
