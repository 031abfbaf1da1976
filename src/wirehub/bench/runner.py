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

from ..server.supervisor import raise_open_file_limit
from .net import BenchError

PROGRESS_EVERY = 0.25  # seconds between a worker's progress reports
SATURATED = 0.9  # a load process busy this fraction of the wall time may be what limits the figure
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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
    raise_open_file_limit()
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


# ----------------------------------------------------------------------------- CPU use


def process_cpu_times(pid: int) -> tuple[float, float] | None:
    """User and system CPU time of a process (all its threads) in seconds, from
    /proc/PID/stat; None when it cannot be read (gone, another user's, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # the name may hold spaces; fields from 3 on
    try:
        return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK  # utime, stime: fields 14 and 15
    except (IndexError, ValueError):
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) in seconds; None when unknown."""
    times = process_cpu_times(pid)
    return None if times is None else times[0] + times[1]


def core_times() -> dict[str, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies since boot from /proc/stat; busy counts user, system,
    interrupts and softirqs (loopback TCP is largely processed in softirqs, which no
    process's CPU time shows). Empty when unreadable."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *vals = line.split()
                if name == "cpu":
                    continue
                v = [int(x) for x in vals[:8]]
                total = sum(v)
                out[name] = (total - v[3] - v[4], total)  # minus idle and iowait
    except (OSError, ValueError):
        pass
    return out


def core_busy(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    out = {}
    for name, (b1, t1) in after.items():
        if name in before:
            b0, t0 = before[name]
            if t1 > t0:
                out[name] = round((b1 - b0) / (t1 - t0), 3)
    return out


class CpuWindow:
    """CPU time used by this load process, and by the server's processes, between two
    instants (the measured window): whether the load generator or the server was the one
    that ran out of CPU. Started and stopped by timers on the worker's event loop."""

    __slots__ = ("server_pids", "t0", "t1", "c0", "c1", "s0", "s1", "k0", "k1")

    def __init__(self, server_pids: list[int] | None = None) -> None:
        self.server_pids = list(server_pids or [])
        self.t0 = self.t1 = 0
        self.c0 = self.c1 = 0.0
        self.s0: dict[int, tuple[float, float] | None] = {}
        self.s1: dict[int, tuple[float, float] | None] = {}
        self.k0: dict[str, tuple[int, int]] = {}
        self.k1: dict[str, tuple[int, int]] = {}

    def schedule(self, start_ns: int, end_ns: int) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic_ns()
        loop.call_later(max(0.0, (start_ns - now) / 1e9), self.start)
        loop.call_later(max(0.0, (end_ns - now) / 1e9), self.stop)

    def start(self) -> None:
        self.k0 = core_times()
        self.s0 = {pid: process_cpu_times(pid) for pid in self.server_pids}
        self.c0 = time.process_time()
        self.t0 = time.monotonic_ns()
        self.t1 = 0

    def stop(self) -> None:
        if not self.t0 or self.t1:
            return
        self.t1 = time.monotonic_ns()
        self.c1 = time.process_time()
        self.s1 = {pid: process_cpu_times(pid) for pid in self.server_pids}
        self.k1 = core_times()

    def result(self) -> dict:
        """``wall_s``, ``cpu_s`` (this process), ``server_cpu_s`` and ``server_user_s`` (pid ->
        seconds of CPU, and of it in user mode, or None) and ``cores_busy`` (cpuN -> fraction
        of the window it was busy, whoever with)."""
        if self.t0 and not self.t1:
            self.stop()
        if not self.t0:
            return {"wall_s": 0.0, "cpu_s": 0.0, "server_cpu_s": {}, "server_user_s": {}, "cores_busy": {}}
        server: dict[str, float | None] = {}
        user: dict[str, float | None] = {}
        for pid in self.server_pids:
            a, b = self.s0.get(pid), self.s1.get(pid)
            known = a is not None and b is not None
            server[str(pid)] = round(b[0] + b[1] - a[0] - a[1], 3) if known else None  # type: ignore[index]
            user[str(pid)] = round(b[0] - a[0], 3) if known else None  # type: ignore[index]
        return {"wall_s": (self.t1 - self.t0) / 1e9, "cpu_s": self.c1 - self.c0, "server_cpu_s": server,
                "server_user_s": user, "cores_busy": core_busy(self.k0, self.k1)}


def merge_cpu(windows: dict[int, dict], loader_cores: int | None = None) -> dict:
    """The load processes' and the server's CPU use over the measured window, as fractions
    of one core: ``loader.per_process``, ``loader.total``, ``loader.saturated`` (a load
    process, or all of them together on the cores they may use, busy >= 90 % of the time:
    the figure may be the load generator's limit, not the server's), ``server.cores`` and of
    them ``server.user_cores`` (the rest is the kernel's work for it: syscalls, TCP)."""
    if loader_cores is None:
        loader_cores = available_cores()
    per = []
    for i in sorted(windows):
        w = windows[i]
        per.append(round(w["cpu_s"] / w["wall_s"], 3) if w["wall_s"] > 0 else None)
    known = [x for x in per if x is not None]
    total = round(sum(known), 3) if known else None
    saturated = bool(known) and (max(known) >= SATURATED or total >= SATURATED * loader_cores)
    server: dict[str, Any] = {"pids": [], "cores": None, "user_cores": None, "per_pid": {}}
    first = windows.get(0) or {}
    if first.get("server_cpu_s"):
        pids = [int(p) for p in first["server_cpu_s"]]
        used = [v for v in first["server_cpu_s"].values() if v is not None]
        user = [v for v in (first.get("server_user_s") or {}).values() if v is not None]
        server["pids"] = pids
        if first["wall_s"] > 0:  # each server process's share (a hub and its broker, say)
            server["per_pid"] = {p: (None if v is None else round(v / first["wall_s"], 3)) for p, v in first["server_cpu_s"].items()}
        if used and first["wall_s"] > 0 and len(used) == len(pids):
            server["cores"] = round(sum(used) / first["wall_s"], 3)
            if len(user) == len(pids):
                server["user_cores"] = round(sum(user) / first["wall_s"], 3)
    affinity = sorted(available_core_ids())
    busy = first.get("cores_busy") or {}
    loader_busy = [busy.get(f"cpu{c}") for c in affinity]
    if len(affinity) < len(busy) and loader_busy and all(b is not None for b in loader_busy):
        # the load is pinned to some cores: when they are busy (softirqs included) all the
        # time, the load generator may be what limits the figure even if its processes'
        # own CPU time does not show it
        saturated = saturated or sum(loader_busy) >= SATURATED * len(loader_busy)  # type: ignore[arg-type]
    return {
        "loader": {"per_process": per, "total": total, "cores_available": loader_cores, "cores": affinity,
                   "saturated": saturated},
        "server": server,
        "cores_busy": busy,
        "note": "CPU time / wall time over the measured window, in cores (1.0 = one core busy all the time); "
                "cores_busy: each CPU's busy fraction (user, system, irq, softirq) whoever used it",
    }


def available_core_ids() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        return set(range(os.cpu_count() or 1))


def available_cores() -> int:
    return len(available_core_ids())


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
