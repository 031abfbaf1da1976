"""Blocking code off the event loop: a bounded thread pool per server process.

A plain handler marked ``blocking=True`` (``@app.on_frame(blocking=True)``, or a hub hook)
runs in one of ``blocking_threads`` threads. The framework treats it as an ``async`` handler:
each connection's calls run one at a time in arrival order, and reading from a connection
pauses while its frames wait (``MAX_QUEUED_FRAMES``). So a connection has at most one call in
the pool, the pool's queue is bounded by the number of connections, and heartbeats, deadlines
and every other connection keep going on the event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

DEFAULT_THREADS = 32


class BlockingPool:
    """``blocking_threads`` threads, started on first use (so a process that forks workers
    starts none before the fork)."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        #: calls submitted and not finished (running or waiting for a thread)
        self.busy = 0

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a pool thread; its result (or exception) as a future of the
        running loop."""
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="wirehub-blocking")
        self.busy += 1
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: Any) -> None:
        self.busy -= 1

    def close(self) -> None:
        """Stop taking calls; calls still waiting are cancelled, running ones finish on
        their own (a thread cannot be interrupted)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class ThreadConnection:
    """A :class:`~wirehub.Connection` as a blocking handler sees it from its pool thread.

    ``send``, ``send_wire``, ``close`` and ``set_deadline`` are handed to the event loop (in
    the order they are called, and before the handler's call counts as done); everything else
    (``id``, ``peer``, ``state``...) is read from the connection itself. ``send`` returns True:
    whether the frame was queued is decided on the loop."""

    __slots__ = ("_conn", "_loop")

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn
        self._loop = loop

    def send(self, payload: bytes) -> bool:
        self._loop.call_soon_threadsafe(self._conn.send, payload)
        return True

    def send_wire(self, data: bytes) -> bool:
        self._loop.call_soon_threadsafe(self._conn.send_wire, data)
        return True

    def close(self, reason: str = "kicked") -> None:
        self._loop.call_soon_threadsafe(self._conn.close, reason)

    def set_deadline(self, seconds: float | None) -> None:
        self._loop.call_soon_threadsafe(self._conn.set_deadline, seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __repr__(self) -> str:
        return f"<ThreadConnection of {self._conn!r}>"


def blocking_handler(app: Any, fn: Callable[..., Any], which: str) -> Callable[..., Any]:
    """``fn`` (a plain function taking the connection first) as an ``async`` handler that runs
    it in ``app``'s pool with a :class:`ThreadConnection`."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"{which}: {getattr(fn, '__qualname__', fn)} is async def; blocking=True is for plain functions that block")

    @functools.wraps(fn)
    async def handler(conn: Any, *args: Any) -> None:
        pool = app.blocking_pool
        await pool.run(fn, ThreadConnection(conn, asyncio.get_running_loop()), *args)

    return handler
