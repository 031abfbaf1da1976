"""examples/chat_app's page in a real headless Chromium, served as the README says
(``python -m examples.chat_app``, on a SQLite file): two pages chat and see each other's
display names, a page opened later shows the stored messages and searches them, an unknown
user is told why; after a restart the open pages re-join without showing a message twice, and
a new page still shows what was stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from . import browser
from .helpers import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
JOINED = "hub.state === 'connected' && hub.rooms.get('lobby').state === 'joined'"
#: the message lines of the page, as [display name, text]
LINES = "[...document.querySelectorAll('#log li:not(.meta)')].map((li) => [li.querySelector('.who').textContent, li.lastChild.textContent])"
LOG = "document.getElementById('log').innerText"

pytestmark = [
    pytest.mark.one_loop,
    pytest.mark.skipif(not browser.available(), reason="chromium is not installed (scripts/test installs it)"),
]


async def say(page: browser.Page, text: str) -> None:
    await page.eval(
        f"const i = document.querySelector('#compose [name=text]'); i.value = {json.dumps(text)};"
        "document.getElementById('compose').requestSubmit(); true"
    )


async def shows(page: browser.Page, lines: list[list[str]], what: str) -> None:
    expected = json.dumps(lines, separators=(",", ":"))  # as JSON.stringify writes it
    await page.wait_until(f"JSON.stringify({LINES}) === {json.dumps(expected)}", what)


async def test_chat_app_pages_in_a_real_browser(tmp_path):
    page_port, ws_port = free_port(), free_port()
    args = ("--page", f"127.0.0.1:{page_port}", "--ws", f"127.0.0.1:{ws_port}", "--tcp", "off", "--admin", "off")
    env = {"CHAT_DATABASE": str(tmp_path / "chat.db")}

    def start() -> ServerProcess:
        server = ServerProcess(*args, module="examples.chat_app", cwd=str(REPO), env=env).start(tmp_path)
        server.wait_log("chat page: ")
        return server

    server = start()
    chrome = await browser.Browser().start()
    base = f"http://127.0.0.1:{page_port}"
    try:
        alice = await chrome.open(f"{base}/?name=alice")  # "/" points the page at the hub's WebSocket
        await alice.wait_until(JOINED, "alice in the lobby")
        bob = await chrome.open(f"{base}/chat.html?ws=ws://127.0.0.1:{ws_port}/&name=bob")
        await bob.wait_until(JOINED, "bob in the lobby")
        await alice.wait_until(f"{LOG}.includes('Bob Dylan joined')", "bob's display name in presence")

        await say(alice, "hello from alice")
        await shows(bob, [["Alice Liddell", "hello from alice"]], "alice's message with her display name")
        await say(bob, "hi Alice")
        chat = [["Alice Liddell", "hello from alice"], ["Bob Dylan", "hi Alice"]]
        await shows(alice, chat, "bob's message")

        carol = await chrome.open(f"{base}/")  # no name: the page asks for one
        await carol.wait_until("document.getElementById('login').offsetParent !== null", "the login form")
        assert await carol.eval("document.getElementById('compose').offsetParent") is None
        await carol.eval("document.querySelector('#login [name=name]').value = 'carol'; document.getElementById('login').requestSubmit(); true")
        await carol.wait_until(JOINED, "carol in the lobby")  # later: the stored messages, from the RPC
        assert await carol.eval("document.getElementById('login').offsetParent") is None
        await shows(carol, chat, "the stored messages")
        await carol.eval("document.querySelector('#search [name=q]').value = 'ALICE'; document.getElementById('search').requestSubmit(); true")
        await carol.wait_until("document.getElementById('found').innerText.includes('2 messages with “ALICE”')", "the search results")

        zed = await chrome.open(f"{base}/?name=zed")
        await zed.wait_until(f"{LOG}.includes(\"cannot chat: app.unknown_user: there is no user 'zed' here\")", "the refusal")
        assert await zed.eval("hub.state") == "disconnected"

        # a restart: a new hub and a new memory broker, the same database
        client_before = await alice.eval("hub.client")
        assert server.stop() == 0, server.log
        server = start()
        await alice.wait_until(f"hub.client !== {json.dumps(client_before)} && {JOINED}", "alice back in the lobby")
        await alice.wait_until(f"{LOG}.split('in lobby:').length === 3", "the stored messages loaded again")
        assert await alice.eval(LINES) == chat  # each once
        late = await chrome.open(f"{base}/?name=bob&room=lobby")
        await late.wait_until(JOINED, "a new page in the lobby")
        await shows(late, chat, "the stored messages after the restart")
        await late.screenshot(str(tmp_path / "chat_app.png"))
        assert (tmp_path / "chat_app.png").stat().st_size > 1000
    finally:
        await chrome.close()
        server.stop()
