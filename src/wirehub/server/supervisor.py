"""Running a server: one process, or a supervisor of ``--workers N``.

With workers, the supervisor binds every socket before forking — so a port already in use is
reported once, before any worker starts — one TCP/UDP socket per worker and address with
SO_REUSEPORT (the kernel spreads connections across them), and Unix sockets once, shared. It
keeps its copies: a worker that dies is restarted on the same sockets, and clients that
arrive meanwhile wait in that socket's backlog. SIGTERM or SIGINT drains every worker; a
second signal kills them.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import _log
from .._version import __version__
from .. import _accelerator
from .listeners import BindError, Endpoint
from .server import Server, bind_all

if TYPE_CHECKING:
    from ..app import App
    from ..config import Config

log = _log.get_logger("wirehub.supervisor")

EXIT_OK = 0
EXIT_FORCED = 1
EXIT_BIND = 3
RESTART_BACKOFF_MAX = 10.0
YOUNG_DEATH_S = 2.0


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as nginx and redis do); return the
    limit now in force. Also the load generator's and the benchmark children's."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def _event_loop_runner():
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run
    return uvloop.run


def run(app: App, config: Config) -> int:
    """Serve ``app`` with ``config`` until drained; return the process exit code."""
    _log.configure(config.log_level, config.log_format)
    log.info("starting", version=__version__, accelerator=_accelerator.summary())
    limit = raise_open_file_limit()
    if limit < config.max_connections + 64:
        log.info("open_file_limit", limit=limit, max_connections=config.max_connections, note="connections beyond the limit wait in the backlog")
    if config.workers > 1:
        return Supervisor(app, config).run()
    return run_single(app, config)


#: allocations between two young-generation collections in a server process (Python: 700)
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """The cyclic garbage collector, set for a server: what exists at start (modules, the app)
    is frozen out of every collection, and young collections run every 50,000 allocations
    instead of every 700. At the default, a server handling a frame costs a few list and
    handle allocations, the collector runs every few hundred frames, and it took a fifth of
    the CPU per message (bench/hotpath.py). Garbage without cycles is freed at once either
    way; cycles wait a little longer."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run_single(app: App, config: Config, endpoints: list[Endpoint] | None = None, *, worker: int | None = None) -> int:
    server = Server(app, config, endpoints=endpoints, worker=worker)
    tune_gc()
    try:
        return _event_loop_runner()(server.serve())
    except BindError as exc:
        log.error("bind_failed", error=str(exc))
        return EXIT_BIND


class _Worker:
    __slots__ = ("index", "process", "started", "failures")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.Process | None = None
        self.started = 0.0
        self.failures = 0


class Supervisor:
    def __init__(self, app: App, config: Config) -> None:
        self.app = app
        self.config = config
        self.n = config.workers
        self.socket_sets: list[list[Endpoint]] = []
        self.workers = [_Worker(i) for i in range(self.n)]
        self._signals: list[int] = []
        self._stopping = False
        self._ctx = multiprocessing.get_context("fork")

    def bind(self) -> None:
        inet = ("tcp", "tls", "ws", "wss", "udp", "admin")  # admin: each worker serves its own
        shared = bind_all(self.config, kinds=("unix",))
        try:
            for _ in range(self.n):
                self.socket_sets.append(bind_all(self.config, reuse_port=True, kinds=inet) + shared)
        except BindError:
            self._close_sockets()
            for ep in shared:
                ep.sock.close()
            raise
        for ep in self.socket_sets[0]:
            log.info("listening", transport=ep.kind, address=ep.address, workers=self.n)

    def _close_sockets(self) -> None:
        for endpoints in self.socket_sets:
            for ep in endpoints:
                ep.sock.close()

    def run(self) -> int:
        try:
            self.bind()
        except BindError as exc:
            log.error("bind_failed", error=str(exc))
            return EXIT_BIND
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for worker in self.workers:
                self._start(worker)
            return self._supervise(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            self._close_sockets()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _start(self, worker: _Worker) -> None:
        endpoints = self.socket_sets[worker.index]
        process = self._ctx.Process(
            target=_worker_main,
            args=(worker.index, self.app, self.config, endpoints, self.socket_sets),
            name=f"wirehub-worker-{worker.index}",
            daemon=False,
        )
        process.start()
        worker.process = process
        worker.started = time.monotonic()
        log.info("worker_started", worker=worker.index, pid=process.pid)

    def _supervise(self, wake: socket.socket) -> int:
        deadline: float | None = None
        restarts: dict[int, float] = {}  # worker index -> when to restart
        exit_code = EXIT_OK
        while True:
            alive = [w for w in self.workers if w.process is not None]
            if self._stopping and not alive:
                return exit_code
            timeout = 1.0
            if restarts:
                timeout = max(0.0, min(restarts.values()) - time.monotonic())
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            waitables: list[Any] = [w.process.sentinel for w in alive] + [wake]  # type: ignore[union-attr]
            multiprocessing.connection.wait(waitables, timeout)
            try:
                while wake.recv(512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            while self._signals:
                signum = self._signals.pop(0)
                if not self._stopping:
                    self._stopping = True
                    deadline = time.monotonic() + self.config.drain_timeout + 5.0
                    restarts.clear()
                    log.info("draining", signal=signal.Signals(signum).name, workers=len(alive))
                    self._close_sockets()
                    self._signal_all(signal.SIGTERM)
                else:
                    log.warning("forced_exit", signal=signal.Signals(signum).name)
                    self._signal_all(signal.SIGKILL)
                    exit_code = EXIT_FORCED
            for worker in alive:
                process = worker.process
                assert process is not None
                if process.exitcode is None:
                    continue
                process.join()
                worker.process = None
                if self._stopping:
                    if process.exitcode != 0 and exit_code == EXIT_OK:
                        exit_code = EXIT_FORCED
                    continue
                lived = time.monotonic() - worker.started
                worker.failures = worker.failures + 1 if lived < YOUNG_DEATH_S else 0
                delay = min(RESTART_BACKOFF_MAX, 0.1 * (2 ** worker.failures)) if worker.failures else 0.0
                log.warning("worker_died", worker=worker.index, pid=process.pid, exitcode=process.exitcode, restart_in_s=delay)
                restarts[worker.index] = time.monotonic() + delay
            now = time.monotonic()
            for index, when in list(restarts.items()):
                if when <= now:
                    del restarts[index]
                    self._start(self.workers[index])
            if deadline is not None and now >= deadline:
                log.warning("drain_timeout", workers=sum(1 for w in self.workers if w.process is not None))
                self._signal_all(signal.SIGKILL)
                exit_code = EXIT_FORCED
                deadline = None

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.pid:
                try:
                    os.kill(worker.process.pid, sig)
                except ProcessLookupError:
                    pass


def _worker_main(index: int, app: App, config: Config, endpoints: list[Endpoint], all_sets: list[list[Endpoint]]) -> None:
    # Our own process group: a terminal's Ctrl-C reaches only the supervisor, which then
    # asks each worker to drain exactly once.
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    mine = {id(ep.sock) for ep in endpoints}
    for other in all_sets:
        for ep in other:
            if id(ep.sock) not in mine:
                ep.sock.close()
    sys.exit(run_single(app, config, endpoints, worker=index))
