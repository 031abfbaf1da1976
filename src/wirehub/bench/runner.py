"""Load processes and the progress line.

Every mode runs its load in worker processes (one by default, ``--processes N`` for more),
each with its own uvloop event loop and its share of the connections. The parent only
coordinates: it waits until every worker is connected, gives them one common start time
(``time.monotonic_ns()``, CLOCK_MONOTONIC, the same clock in every process on Linux),
prints progress from their reports and merges their results. Messages between them are
small tuples over a ``multiprocessing`` pipe: ``(kind, payload)``.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import time
from typing import Any, Callable

from .net import BenchError, raise_nofile_limit

PROGRESS_EVERY = 0.25  # seconds between a worker's progress reports


class Stopped(Exception):
    """The parent asked the worker to stop (Ctrl-C, or another worker failed)."""


# ----------------------------------------------------------------------------- worker side


class Control:
    """The worker's end of its pipe to the parent, read by the event loop."""

    def __init__(self, conn: mpc.Connection, index: int, count: int) -> None:
        self.conn = conn
        self.index = index
        self.count = count
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[tuple[str, dict]] = asyncio.Queue()
        self.stopped = False  # a stop arrived: loops that do not wait on recv() check this
        self.loop.add_reader(conn.fileno(), self._readable)
        self._parent = os.getppid()
        self._watch = self.loop.call_later(0.5, self._parent_alive)

    def _parent_alive(self) -> None:
        if os.getppid() != self._parent:  # killed without a word: do not load a server forever
            self.stopped = True
            self.inbox.put_nowait(("stop", {"reason": "the parent process went away"}))
        else:
            self._watch = self.loop.call_later(0.5, self._parent_alive)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg[0] == "stop":
                    self.stopped = True
                self.inbox.put_nowait(msg)
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            self.stopped = True
            self.inbox.put_nowait(("stop", {"reason": "the parent process went away"}))

    def send(self, kind: str, **payload: Any) -> None:
        try:
            self.conn.send((kind, payload))
        except (BrokenPipeError, OSError):
            pass

    async def recv(self, *kinds: str) -> tuple[str, dict]:
        """The next message from the parent; :class:`Stopped` when it is ``stop`` (and it
        was not asked for)."""
        while True:
            kind, payload = await self.inbox.get()
            if kind == "stop" and "stop" not in kinds:
                raise Stopped(payload.get("reason", "stopped"))
            if not kinds or kind in kinds:
                return kind, payload

    def close(self) -> None:
        self._watch.cancel()
        try:
            self.loop.remove_reader(self.conn.fileno())
        except Exception:
            pass


def _worker_entry(spec: str, params: dict, index: int, count: int, conn: mpc.Connection, inherited: list) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us
    for other in inherited:  # the parent's ends of the pipes, copied by fork: without them
        other.close()  # closed here, this process would not see its parent go away
    raise_nofile_limit()
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)

    async def main() -> None:
        ctl = Control(conn, index, count)
        try:
            await fn(ctl, params)
        finally:
            ctl.close()

    try:
        import uvloop

        runner: Callable = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(main())
    except Stopped:
        pass
    except BenchError as exc:
        _send_quietly(conn, ("error", {"message": str(exc)}))
    except BaseException as exc:  # report it rather than die silently
        _send_quietly(conn, ("error", {"message": f"{type(exc).__name__}: {exc}"}))
    finally:
        conn.close()


def _send_quietly(conn: mpc.Connection, msg: tuple) -> None:
    try:
        conn.send(msg)
    except (BrokenPipeError, OSError):
        pass


def progress_task(ctl: Control, snapshot: Callable[[], dict]) -> asyncio.Task:
    """Send ``snapshot()`` to the parent every PROGRESS_EVERY seconds until cancelled."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            ctl.send("progress", **snapshot())

    return asyncio.ensure_future(loop())


# ----------------------------------------------------------------------------- parent side


class WorkerPool:
    """N worker processes running ``spec`` (``module:async_function(ctl, params)``)."""

    def __init__(self, spec: str, params: dict, processes: int) -> None:
        fork = "fork" in mp.get_all_start_methods()
        ctx = mp.get_context("fork" if fork else "spawn")
        self.conns: list[mpc.Connection | None] = []
        self.procs: list[Any] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            inherited = [*self.conns, parent] if fork else []
            proc = ctx.Process(target=_worker_entry, args=(spec, params, i, processes, child, inherited),
                               name=f"wirehub-bench-{i}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self.latest: dict[int, dict] = {}  # the last progress payload of each worker

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, index: int, kind: str, **payload: Any) -> None:
        conn = self.conns[index]
        if conn is not None:
            try:
                conn.send((kind, payload))
            except (BrokenPipeError, OSError):
                pass

    def broadcast(self, kind: str, **payload: Any) -> None:
        for i in range(len(self.conns)):
            self.send(i, kind, **payload)

    def gather(self, kind: str, timeout: float, tick: Callable[[], None] | None = None,
               on_message: Callable[[int, str, dict], None] | None = None) -> dict[int, dict]:
        """Wait until every worker has sent a ``kind`` message; return their payloads by
        worker index. ``progress`` messages update :attr:`latest`; ``tick`` runs at least
        every PROGRESS_EVERY seconds; other messages go to ``on_message``. A worker's
        ``error`` or death raises :class:`BenchError`."""
        out: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(out) < len(self.procs):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [i for i in range(len(self.procs)) if i not in out]
                raise BenchError(f"load process(es) {missing} did not report {kind!r} within {timeout:.0f} s")
            live = {c: i for i, c in enumerate(self.conns) if c is not None}
            for conn in mpc.wait(list(live), min(left, PROGRESS_EVERY)):
                i = live[conn]  # type: ignore[index]
                try:
                    got, payload = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self.conns[i] = None
                    if i not in out:
                        code = self.procs[i].exitcode
                        raise BenchError(f"load process {i} exited unexpectedly (exit code {code})") from None
                    continue
                if got == "error":
                    raise BenchError(payload["message"])
                if got == "progress":
                    self.latest[i] = payload
                elif got == kind:
                    out[i] = payload
                elif on_message is not None:
                    on_message(i, got, payload)
            if tick is not None:
                tick()
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Tell the workers to stop, wait for them, and end any that do not exit."""
        self.broadcast("stop", reason="done")
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():  # pragma: no cover
                proc.kill()
                proc.join(1.0)
        for conn in self.conns:
            if conn is not None:
                conn.close()


def sum_latest(pool: WorkerPool, key: str) -> int:
    return sum(p.get(key, 0) for p in pool.latest.values())


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line a second otherwise."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.2 if self.tty else 1.0
        self.last = 0.0
        self.width = 0

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        if self.tty:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (a ramp step's result, a warning)."""
        if not self.enabled:
            return
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
