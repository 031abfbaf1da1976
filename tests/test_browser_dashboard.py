"""The admin dashboard (``GET /`` on the admin listener) in a real headless Chromium, against a
running hub with an admin token: a wrong token is refused, the numbers follow clients as they
connect, publish and leave, a kick from the page reaches the client as ``bye kicked``, and a
publication from the page reaches a member."""

from __future__ import annotations

import json

import pytest

from wirehub.hub import Hub

from . import browser
from .server.test_admin_query import Line

pytestmark = [
    pytest.mark.skipif(not browser.available(), reason="chromium is not installed (scripts/test installs it)"),
    pytest.mark.one_loop,  # the page is what is under test: once is enough
]

TEXT = "document.getElementById({!r}).textContent"


def text(element_id: str) -> str:
    return TEXT.format(element_id)


async def test_dashboard_in_a_real_browser(tmp_path):
    chrome = await browser.Browser().start()
    clients: list[Line] = []
    try:
        async with Hub(tcp="127.0.0.1:0", ws="off", udp="off", admin="127.0.0.1:0", admin_token="s3cret") as hub:
            page = await chrome.open("http://" + hub.addresses["admin"][0] + "/")
            await page.wait_until("document.getElementById('login').open", "the token dialog")

            # a wrong token: the stream refuses it and the page asks again, saying so
            await page.eval("document.getElementById('token-input').value = 'wrong'; document.getElementById('login-form').requestSubmit(); true")
            await page.wait_until(
                "document.getElementById('login').open && document.getElementById('login-error').textContent.includes('refused')",
                "the wrong token refused",
            )
            assert await page.eval(text("status")) == "token refused"
            assert await page.eval("location.href.includes('wrong')") is False

            await page.eval("document.getElementById('token-input').value = 's3cret'; document.getElementById('login-form').requestSubmit(); true")
            await page.wait_until(f"{text('status')} === 'live' && {text('total-connections')} === '0'", "the live page")

            # clients connect and join: the totals and the rooms table follow
            for i in range(3):
                clients.append(await Line.open(hub, name=f"c{i}", rooms=("lobby",)))
            await page.wait_until(f"{text('total-connections')} === '3'", "three connections")
            await page.wait_until(
                "[...document.querySelectorAll('#rooms-table tbody tr')].some(r => r.dataset.room === 'lobby' && r.cells[1].textContent === '3')",
                "lobby with 3 members",
            )
            assert await page.eval("document.querySelectorAll('#conns-table tbody tr[data-id]').length") == 3
            for k in range(5):
                await clients[0].send({"op": "pub", "room": "lobby", "data": k})
            await page.wait_until(
                "[...document.querySelectorAll('#rooms-table tbody tr')].some(r => r.dataset.room === 'lobby' && r.cells[2].textContent === '5')",
                "the room's seq at 5",
            )
            await page.wait_until(f"{text('frames-total')}.startsWith('total ') && !{text('frames-total')}.startsWith('total 0 ')", "frame totals")

            # one leaves
            clients.pop().close()
            await page.wait_until(f"{text('total-connections')} === '2'", "two connections")

            # the connection table filters on the server: by user
            victim, other = clients
            await page.eval(f"document.getElementById('f-user').value = 'anon-{other.id}'; document.getElementById('filters').requestSubmit(); true")
            await page.wait_until(
                f"document.querySelectorAll('#conns-table tbody tr[data-id]').length === 1 && document.querySelector('#conns-table tbody tr[data-id]').dataset.id === '{other.id}'",
                "the filtered table",
            )
            await page.eval("document.getElementById('f-user').value = ''; document.getElementById('filters').requestSubmit(); true")
            await page.wait_until("document.querySelectorAll('#conns-table tbody tr[data-id]').length === 2", "the whole table again")

            # kick, with a confirmation: nothing happens until it is confirmed
            await page.eval(f"document.querySelector('button.kick[data-id=\"{victim.id}\"]').click(); true")
            await page.wait_until("document.getElementById('confirm').open", "the confirmation")
            assert victim.id in await page.eval(text("confirm-text"))
            assert len(hub.server.registry) == 2
            await page.eval("document.getElementById('confirm-yes').click(); true")
            bye = await victim.expect("bye")
            assert bye["reason"] == "kicked" and bye["reconnect"] is False
            await page.wait_until(f"{text('total-connections')} === '1'", "one connection")

            # publish from the page: the member left gets it
            await page.eval(
                "document.getElementById('publish-room').value = 'lobby';"
                "document.getElementById('publish-data').value = '{\"text\":\"from the page\"}';"
                "document.getElementById('publish-form').requestSubmit(); true"
            )
            while True:
                msg = await other.expect("msg")
                if msg["data"] == {"text": "from the page"}:
                    break
            assert msg["room"] == "lobby" and msg["seq"] == 6
            await page.wait_until(f"{text('publish-result')}.includes('seq 6')", "the publish result")

            # the recently closed connections, with their reasons
            await page.eval("document.getElementById('f-state').value = 'closed'; document.getElementById('f-state').dispatchEvent(new Event('change')); true")
            await page.wait_until(
                f"[...document.querySelectorAll('#conns-table tbody tr[data-id]')].some(r => r.dataset.id === '{victim.id}' && r.textContent.includes('kicked'))",
                "the kicked connection among the closed",
            )
            # the history of a room, read from the page
            await page.eval("document.querySelector('#rooms-table tr[data-room=\"lobby\"] button[data-act=history]').click(); true")
            await page.wait_until("document.getElementById('viewer').open", "the history viewer")
            shown = json.loads(await page.eval("document.getElementById('viewer-body').textContent"))
            assert [m["data"] for m in shown][-1] == {"text": "from the page"} and len(shown) == 6
            await page.screenshot(str(tmp_path / "dashboard.png"))
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        for c in clients:
            c.close()
        await chrome.close()
