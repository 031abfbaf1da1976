"""A real headless Chromium driven over the DevTools protocol (CDP), for tests of pages.

Debian's ``chromium`` package; ``scripts/test`` installs it. No test framework of its own:
one WebSocket to the browser (the ``websockets`` library), commands and replies by id.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

import websockets

WAIT = 15.0
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0", "--window-size=1000,700",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.ws: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._profile = tempfile.mkdtemp(prefix="wirehub-chromium-")

    async def start(self) -> "Browser":
        path = chromium_path()
        assert path, "chromium is not installed (scripts/test installs it)"
        self.proc = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        url = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, self._devtools_url), WAIT)
        self.ws = await websockets.connect(url, max_size=None)
        self._reader = asyncio.ensure_future(self._read())
        return self

    def _devtools_url(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            match = re.search(rb"DevTools listening on (ws://\S+)", raw)
            if match:
                return match.group(1).decode()
        raise RuntimeError("chromium exited before it listened for DevTools")

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            future = self._pending.pop(message.get("id"), None)
            if future is not None and not future.done():
                if "error" in message:
                    future.set_exception(RuntimeError(message["error"]))
                else:
                    future.set_result(message.get("result", {}))

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self.ws.send(json.dumps(message))
        return await asyncio.wait_for(future, WAIT)

    async def open(self, url: str) -> "Page":
        target = await self.send("Target.createTarget", {"url": url})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        await page.send("Runtime.enable")
        return page

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def send(self, method: str, params: dict | None = None) -> dict:
        return await self.browser.send(method, params, self.session)

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text", "script error"))
        return result["result"].get("value")

    async def wait_until(self, expression: str, what: str, timeout: float = WAIT) -> Any:
        """Evaluate ``expression`` until it is truthy (the page updates on its own)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                value = await self.eval(expression)
            except RuntimeError:  # the page is still loading: its elements are not there yet
                value = None
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"page never showed {what} within {timeout}s")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: str) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))


def available() -> bool:
    return chromium_path() is not None and os.environ.get("WIREHUB_NO_BROWSER") is None
