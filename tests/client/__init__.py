"""Tests of the hub client (``wirehub.client``) and ``wirehub connect``.

Shared here: an in-process hub on one chosen transport, and the URL a client uses for it.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import ssl
import tempfile
from typing import Any

from wirehub.hub import Hub

#: every transport the client speaks, as a hub listener kind
TRANSPORTS = ("tcp", "tls", "unix", "ws", "wss", "udp")
STREAMS = ("tcp", "tls", "unix", "ws", "wss")


_SOCKET_DIRS: list[str] = []


@atexit.register
def _remove_socket_dirs() -> None:
    for path in _SOCKET_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def short_socket_path(name: str = "hub.sock") -> str:
    """A Unix socket path short enough for sun_path (pytest's tmp_path may not be); its
    directory is removed when the test process exits."""
    directory = tempfile.mkdtemp(prefix="whc-", dir="/tmp")
    _SOCKET_DIRS.append(directory)
    return os.path.join(directory, name)


def hub_options(kind: str, certs: dict[str, Any] | None = None, *, where: str | None = None, **extra: Any) -> dict[str, Any]:
    """Options for a :class:`Hub` listening only on ``kind`` (``where``: address or path)."""
    opts: dict[str, Any] = {"tcp": "off", "ws": "off", "udp": "off", "admin": "off"}
    if kind == "unix":
        opts["unix"] = where or short_socket_path()
    else:
        opts[kind] = where or "127.0.0.1:0"
    if kind in ("tls", "wss"):
        assert certs is not None
        opts["cert"], opts["key"] = certs["cert"], certs["key"]
    opts.update(extra)
    return opts


def listen_address(hub: Hub, kind: str) -> str:
    return hub.addresses[kind][0]


def url_for(hub: Hub, kind: str) -> str:
    where = listen_address(hub, kind)
    if kind == "unix":
        return f"unix://{where}"
    if kind in ("ws", "wss"):
        return f"{kind}://{where}/hub"
    return f"{kind}://{where}"


def client_ssl(kind: str, certs: dict[str, Any] | None) -> ssl.SSLContext | None:
    if kind not in ("tls", "wss"):
        return None
    assert certs is not None
    return ssl.create_default_context(cafile=certs["ca"])


class Collector:
    """Reads a client's events in a task; ``wait(predicate)`` waits (bounded) until the
    events seen so far satisfy it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.events: list[dict] = []
        self.error: BaseException | None = None
        self.ended = False
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.client:
                self.events.append(event)
                self._changed.set()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to inspect
            self.error = exc
        finally:
            self.ended = True
            self._changed.set()

    async def wait(self, predicate, timeout: float = 10.0, what: str = "events") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; events so far: {self.events!r}, error: {self.error!r}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def msgs(self, room: str | None = None) -> list[dict]:
        return [e for e in self.events if e.get("op") == "msg" and (room is None or e.get("room") == room)]

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except BaseException:  # noqa: BLE001
            pass
