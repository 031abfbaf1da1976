"""Reconnect storm: N clients in one room, the hub drained and restarted, every client back.

Starts ``wirehub serve`` (TCP on a free loopback port) in a child process and runs the
clients in this process (so each side has its own open-file limit):

1. **fill**: N clients connect and join one room (at most ``--concurrency`` connecting at
   once); a publisher publishes ``--messages`` messages, and every client receives them;
2. **drain**: SIGTERM; the hub sends every client ``bye shutdown`` with ``reconnect:true`` in
   jittered batches (src/wirehub/server/server.py) and exits; it is started again on the
   same port as soon as it has exited;
3. **storm**: each client reconnects as ``wirehub.client`` does (full-jitter backoff from
   0.1 s after every failed attempt, its window capped at 2 s after ``bye shutdown``, at 10 s
   otherwise) and re-joins with ``since``/``epoch``;
   the publisher publishes ``--messages`` more as soon as the new hub answers. A client is
   back once it has joined again, and recovered once it has every message up to the
   publisher's last, with no gap.

With ``--handover`` the new hub is started first, beside the old one on the same port (both
with ``--reuse-port``, on the shared broker), and the old one is then drained: a restart without
downtime, where a client told ``bye`` is taken at once by the new hub. With ``--at-once`` the
new hub is started as soon as the drained one has closed its listener (SIGTERM stops accepting
first, so that a restart can bind the port at once), beside the old one's drain: a supervisor
that restarts without waiting for the old process to exit.

It reports the time from SIGTERM until every client is back and recovered, the frames each
client received in each phase (presence frames apart), clients cut as slow consumers, and
messages lost: a gap in a client's ``seq``, or a re-join history could not recover
(``recovered:false``; with ``memory://`` every re-join is, since the restart starts a new
epoch — use ``--broker redis://...`` or ``nats://...`` to see recovery); and how many
connections the drained hub still had when its ``--drain-timeout`` ran out (it aborts them).

The clients are lean asyncio protocols (a ``msg`` frame's seq is read from its bytes, only
``joined`` and ``bye`` are decoded), so that the load generator is not what is measured;
the storm CPU figures say which side was busy. ``--pin`` puts the hubs on core 0 and the
clients on core 1. ``--py-spy FILE`` samples the hub that takes the storm (and
``--py-spy-drain FILE`` the drained one) with py-spy, as collapsed stacks.

    python bench/storm.py --clients 500                                  # a quick look
    python bench/storm.py --clients 19000 --broker redis://127.0.0.1:6379/12 --json storm.json
    python bench/storm.py --clients 19000 --broker redis://127.0.0.1:6379/12 --handover
    python bench/storm.py --clients 19000 --broker redis://127.0.0.1:6379/12 --at-once

Bounded: at most ``--timeout`` seconds per phase, loopback only, and N at most 19,000
(each side needs N file descriptors; the machine's limit is 20,000).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import msgspec

from wirehub.bench.runner import process_cpu_seconds
from wirehub.client import backoff_delay
from wirehub.client.core import RESTART_BACKOFF_CAP
from wirehub.server.supervisor import raise_open_file_limit

MAX_CLIENTS = 19_000
SOURCE_ADDRESSES = 64  # loopback addresses the clients connect from (source_address)
BACKOFF = (0.1, 10.0)  # wirehub.client's default reconnect backoff
PRESENCE_OPS = frozenset(("join", "leave", "presence_diff"))
PRESENCE_PREFIXES = tuple(b'{"op":"%s"' % op.encode() for op in sorted(PRESENCE_OPS))
MSG_PREFIX = b'{"op":"msg",'
MSG_SEQ_FROM = len(b'{"op":"msg","room":""')  # ',"seq":' comes after the room's name
_decode = msgspec.json.Decoder().decode


def source_address(index: int) -> str:
    """The loopback address client ``index`` connects from: 127.0.0.2 to 127.0.0.65 in turn.
    From one address, each connection to the hub's one port takes its own ephemeral port:
    at 19,000 a connect() cost the clients' process about ten times its CPU at 9,000 (most
    likely the kernel's port search: Linux looks in one half of ip_local_port_range, 14,000
    ports by default, first), and the load generator was the limit. Real clients come from
    many addresses."""
    return f"127.0.0.{2 + index % SOURCE_ADDRESSES}"


def reconnect_delay(attempt: int, restarting: bool) -> float:
    """wirehub.client's wait (src/wirehub/client/core.py): full jitter, doubling, capped at
    RESTART_BACKOFF_CAP after a ``bye shutdown``."""
    base, cap = BACKOFF
    return backoff_delay(attempt, base, min(cap, RESTART_BACKOFF_CAP) if restarting else cap)


class Run:
    """What the clients share: where the hub is, the phase, the target, the counters."""

    def __init__(self, port: int, room: str, n: int) -> None:
        self.port = port
        self.room = room
        self.room_json = json.dumps(room)
        self.join_frame = b'{"op":"join","room":%s}\n' % self.room_json.encode()
        self.phase = "fill"
        self.target: tuple[str | None, int] = (None, 0)  # epoch and seq every client must reach
        self.waiting: set[StormClient] = set()
        self.done = asyncio.Event()
        self.back = 0  # clients joined again after the drain
        self.back_at: list[float] = []  # when each came back (loop time)
        self.connect_errors: dict[str, int] = {}  # failed connection attempts, by errno
        self.all_back = asyncio.Event()
        self.n = n
        self.stopping = False

    def settle(self, c: StormClient) -> None:
        if c in self.waiting and c.joined and c.epoch == self.target[0] and c.seq >= self.target[1]:
            self.waiting.discard(c)
            if not self.waiting:
                self.done.set()


class StormClient(asyncio.Protocol):
    """One member: joins, follows the room's seq, reconnects after a drop.

    Lean, so that the load generator is not what a run measures: a ``msg`` frame's seq is
    read from its bytes (the hub writes ``{"op":"msg","room":R,"seq":N,...``, room first),
    presence frames are counted by their prefix, and only the few other frames (``joined``,
    ``bye``) are decoded."""

    __slots__ = ("run", "source", "transport", "buf", "seq", "epoch", "joined", "ever_joined", "attempt", "restarting",
                 "frames", "presence", "gaps", "not_recovered", "cut", "joined_once")

    def __init__(self, run: Run, index: int) -> None:
        self.run = run
        self.source = source_address(index)
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.seq = 0
        self.epoch: str | None = None
        self.joined = False
        self.ever_joined = False
        self.attempt = 0
        self.restarting = False  # told bye shutdown, not joined again yet
        self.frames = {"fill": 0, "storm": 0}
        self.presence = {"fill": 0, "storm": 0}
        self.gaps = 0
        self.not_recovered = 0
        self.cut = False
        self.joined_once = asyncio.get_running_loop().create_future()

    # -------------------------------------------------------------- connection

    def connect(self) -> None:
        if not self.run.stopping:
            asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, "127.0.0.1", self.run.port, local_addr=(self.source, 0))
        except OSError as exc:
            errors = self.run.connect_errors
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            errors[name] = errors.get(name, 0) + 1
            self.attempt += 1
            asyncio.get_running_loop().call_later(reconnect_delay(self.attempt, self.restarting), self.connect)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""
        if self.epoch is None:
            transport.write(self.run.join_frame)  # type: ignore[attr-defined]
        else:
            transport.write(self.run.join_frame[:-2] + b',"since":%d,"epoch":%s}\n' % (self.seq, json.dumps(self.epoch).encode()))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.joined = False
        if not self.run.stopping:
            self.attempt = 0
            asyncio.get_running_loop().call_later(reconnect_delay(0, self.restarting), self.connect)

    # -------------------------------------------------------------- frames

    def data_received(self, data: bytes) -> None:
        lines = (self.buf + data).split(b"\n") if self.buf else data.split(b"\n")
        self.buf = lines.pop()
        phase = self.run.phase
        self.frames[phase] += len(lines)
        top = self.seq
        for line in lines:
            if line.startswith(MSG_PREFIX):
                start = line.find(b',"seq":', MSG_SEQ_FROM) + 7
                if start < 7:
                    continue  # no seq: not kept in history (the storm publishes none such)
                seq = int(line[start : line.index(b",", start)])
                if seq > top + 1:
                    self.gaps += seq - top - 1
                if seq > top:
                    top = seq
            elif line.startswith(PRESENCE_PREFIXES):
                self.presence[phase] += 1
            else:
                self.seq = top
                f = _decode(line)
                op = f.get("op")
                if op == "joined":
                    self._joined(f)
                    top = self.seq
                elif op == "bye" and f.get("reason") == "slow_consumer":
                    self.cut = True
                elif op == "bye" and f.get("reason") == "shutdown":
                    self.restarting = True
                elif op in PRESENCE_OPS:
                    self.presence[phase] += 1
        if top != self.seq:
            self.seq = top
            self.run.settle(self)

    def _joined(self, f: dict) -> None:
        if self.epoch is not None and not f.get("recovered"):
            self.not_recovered += 1
        if self.epoch is None or not f.get("recovered"):
            self.seq = f["seq"]  # from where the room is now (a known gap when it was a re-join)
        self.epoch = f["epoch"]
        self.joined = True
        self.restarting = False
        if not self.ever_joined:
            self.ever_joined = True
            self.joined_once.set_result(None)
        elif self.run.phase == "storm":
            self.run.back += 1
            self.run.back_at.append(asyncio.get_running_loop().time())
            if self.run.back >= self.run.n:
                self.run.all_back.set()
        self.run.settle(self)

class Publisher:
    """A connection of its own that joins the room (to learn its epoch) and publishes."""

    def __init__(self, port: int, room: str) -> None:
        self.port, self.room = port, room

    async def publish(self, count: int, deadline: float) -> tuple[str, int]:
        """``count`` messages; returns the room's epoch and the last seq. A connection the hub
        closes first (in a storm: its handshake timeout, when the kernel's full listen queue
        dropped the join and TCP's retransmission came too late), or a publication the hub
        could not make (``internal``: its broker's trouble), is tried again on a new
        connection with every message: the target is then the last seq of those."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._publish(count, deadline)
            except (OSError, ConnectionError, Closed) as exc:
                if loop.time() > deadline:
                    raise RuntimeError(f"the publisher could not publish in time: {exc}") from exc
                await asyncio.sleep(0.05)

    async def _publish(self, count: int, deadline: float) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 24)
        try:
            writer.write(b'{"op":"join","room":%s,"ref":"j"}\n' % json.dumps(self.room).encode())
            epoch, seq = None, 0
            for i in range(count):
                writer.write(b'{"op":"pub","room":%s,"data":{"n":%d},"ref":%d}\n' % (json.dumps(self.room).encode(), i, i))
            acks = 0
            bye = None
            while acks < count or epoch is None:
                line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - loop.time()))
                if not line:
                    raise Closed(f"the hub closed the publisher's connection (its last word: {bye})")
                if line.startswith(PRESENCE_PREFIXES):
                    continue
                f = json.loads(line)
                if f.get("op") == "bye":
                    bye = f
                elif f.get("op") == "joined":
                    epoch = f["epoch"]
                elif f.get("op") == "ok":
                    acks += 1
                    seq = max(seq, f["seq"])
                elif f.get("op") == "error" and f.get("code") == "internal":
                    raise Closed(f"the hub could not publish, try again: {f}")  # its broker's trouble (a shared Redis's SCRIPT FLUSH...)
                elif f.get("op") == "error":
                    raise RuntimeError(f"the hub refused a publication: {f}")
            return epoch, seq
        finally:
            writer.close()


class Closed(Exception):
    """The hub closed the publisher's connection before every publication was answered, or
    could not make one for now."""


# ------------------------------------------------------------------ the hub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_hub(args: argparse.Namespace, port: int) -> subprocess.Popen:
    """``wirehub serve`` on ``port`` (with ``--handover``: SO_REUSEPORT). It logs at ``info``
    (a few lines: listening, draining, stopped, refusals, slow consumers) into a temporary
    file: its ``listening`` line tells when it is up (wait_listening)."""
    cmd = [
        *(["taskset", "-c", "0"] if args.pin else []),
        sys.executable, "-m", "wirehub", "serve", "--tcp", f"127.0.0.1:{port}", "--ws", "off", "--udp", "off",
        "--admin", "off", "--broker", args.broker,
        "--history-size", str(max(100, 2 * args.messages)),
        "--max-connections", str(args.clients + 100), "--drain-timeout", str(args.drain_timeout),
        "--log-level", "info", *(["--reuse-port"] if args.handover else []), *args.serve_arg,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIREHUB_")}
    log = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the hub runs, and a full pipe would block it
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def hub_log(proc: subprocess.Popen) -> str:
    """What the hub wrote to stderr so far (its log)."""
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read().decode(errors="replace")


def drain_remaining(proc: subprocess.Popen) -> int:
    """The connections a drained hub still had open when its drain timeout ran out (its
    ``drain_timeout`` warning), or 0."""
    match = re.search(r"drain_timeout\b.*?remaining=(\d+)", hub_log(proc))
    return int(match.group(1)) if match else 0


LISTENING = re.compile(r"^(\S+) info listening transport=tcp ", re.M)


async def wait_listening(proc: subprocess.Popen, deadline: float) -> float:
    """Wait for the hub's ``listening`` log line; return its time (Unix seconds). Not a probe
    connection: while thousands of clients knock, a probe waits in the accept backlog with
    them (or its SYN is dropped and retried a second later), and would say "listening" late."""
    loop = asyncio.get_running_loop()
    while True:
        found = LISTENING.search(hub_log(proc))
        if found:
            return datetime.datetime.strptime(found.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()
        if proc.poll() is not None:
            raise RuntimeError(f"wirehub serve exited with {proc.returncode}: {hub_log(proc)[-2000:]}")
        if loop.time() > deadline:
            raise RuntimeError("wirehub serve did not log that it listens in time")
        await asyncio.sleep(0.01)


async def wait_port_free(port: int, deadline: float) -> None:
    """Wait until ``port`` can be bound again (a drained hub closes its listener first thing)."""
    loop = asyncio.get_running_loop()
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the hub binds
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                pass
        if loop.time() > deadline:
            raise RuntimeError(f"port {port} still held by the drained hub")
        await asyncio.sleep(0.005)


async def wait_exit(proc: subprocess.Popen, deadline: float) -> float:
    """Wait for the hub to exit; return the CPU time (user + system) it used in all."""
    loop = asyncio.get_running_loop()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here: its rusage is only had so
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if loop.time() > deadline:
            raise RuntimeError("wirehub serve did not exit after SIGTERM in time")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ the run


def per_client(values: list[int]) -> dict[str, float]:
    values = sorted(values)
    return {"mean": round(sum(values) / len(values), 2), "p50": values[len(values) // 2], "max": values[-1]}


async def storm(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    port = free_port()
    room = "storm-" + uuid.uuid4().hex[:8]
    run = Run(port, room, args.clients)
    hub = start_hub(args, port)
    procs = [hub]
    try:
        await wait_listening(hub, loop.time() + 30)
        # 1. fill
        started = loop.time()
        clients = [StormClient(run, i) for i in range(args.clients)]
        gate = asyncio.Semaphore(args.concurrency)

        async def first(c: StormClient) -> None:
            async with gate:
                c.connect()
                await c.joined_once

        await asyncio.wait_for(asyncio.gather(*(first(c) for c in clients)), args.timeout)
        fill_s = loop.time() - started
        run.target = await Publisher(port, room).publish(args.messages, loop.time() + args.timeout)
        run.waiting = set(clients)
        for c in clients:
            run.settle(c)
        await asyncio.wait_for(run.done.wait(), args.timeout)
        # 2. drain, 3. storm
        run.phase = "storm"
        run.done.clear()
        run.waiting = set(clients)
        run.target = (None, 0)  # not reachable until the publisher says where the room is
        if args.handover:  # the new hub first, on the same port: clients told bye reach it at once
            new_hub = start_hub(args, port)
            procs.append(new_hub)
            await wait_listening(new_hub, loop.time() + 30)
            hub_cpu, our_cpu = cpu_seconds(new_hub.pid), time.process_time()
        drain_spy = start_py_spy(args.py_spy_drain, hub.pid) if args.py_spy_drain else None
        if drain_spy is not None:
            procs.append(drain_spy)
        t0, t0_wall = loop.time(), time.time()
        overflows = listen_overflows()
        drain_cpu = cpu_seconds(hub.pid)
        hub.send_signal(signal.SIGTERM)
        if args.at_once:  # the new hub as soon as the old one let go of the port, beside its drain
            await wait_port_free(port, t0 + 30)
            new_hub = start_hub(args, port)
            procs.append(new_hub)
            exiting = asyncio.ensure_future(wait_exit(hub, t0 + args.drain_timeout + 30))
            listening_s = await wait_listening(new_hub, loop.time() + 30) - t0_wall
            hub_cpu, our_cpu = cpu_seconds(new_hub.pid), time.process_time()
            drain_cpu = await exiting - drain_cpu
        else:
            drain_cpu = await wait_exit(hub, t0 + args.drain_timeout + 30) - drain_cpu
        exited_s = loop.time() - t0
        old_hub = hub
        if drain_spy is not None:
            drain_spy.wait(30)  # py-spy writes its profile once the process it samples exited
        if args.handover:
            hub, listening_s = new_hub, 0.0
        elif args.at_once:
            hub = new_hub
        else:
            hub = start_hub(args, port)
            procs.append(hub)
            listening_s = await wait_listening(hub, loop.time() + 30) - t0_wall
            hub_cpu, our_cpu = cpu_seconds(hub.pid), time.process_time()
        spy = start_py_spy(args.py_spy, hub.pid) if args.py_spy else None
        if spy is not None:
            procs.append(spy)
        run.target = await Publisher(port, room).publish(args.messages, loop.time() + args.timeout)
        for c in clients:
            run.settle(c)
        await asyncio.wait_for(run.all_back.wait(), args.timeout)
        back_s = loop.time() - t0
        await asyncio.wait_for(run.done.wait(), args.timeout)
        recovered_s = loop.time() - t0
        hub_cpu, our_cpu = cpu_seconds(hub.pid) - hub_cpu, time.process_time() - our_cpu
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            spy.wait(30)
        run.stopping = True
        return {
            "clients": args.clients,
            "broker": args.broker.split("://")[0],
            "handover": args.handover,
            "at_once": args.at_once,
            "pinned": args.pin,
            "serve_args": args.serve_arg,
            "fill_s": round(fill_s, 3),
            "fill_joins_per_s": round(args.clients / fill_s),
            "drain_exit_s": round(exited_s, 3),
            # connections the old hub still had when its --drain-timeout ran out (it then aborts them)
            "drain_timeout_remaining": drain_remaining(old_hub),
            "restart_listening_s": round(listening_s, 3),
            "all_back_s": round(back_s, 3),
            "all_recovered_s": round(recovered_s, 3),
            "recovered_after_restart_s": round(recovered_s - listening_s, 3),
            # CPU from the restarted hub's listening until every client recovered: which side
            # was the limit (a side near the wall time was)
            "storm_cpu_s": {"hub": round(hub_cpu, 2), "clients": round(our_cpu, 2)},
            # CPU of the drained hub from SIGTERM until it exited (byes, disconnects, clean-up)
            "drain_cpu_s": round(drain_cpu, 2),
            "frames_per_client_fill": per_client([c.frames["fill"] for c in clients]),
            "presence_frames_per_client_fill": per_client([c.presence["fill"] for c in clients]),
            "frames_per_client_storm": per_client([c.frames["storm"] for c in clients]),
            "presence_frames_per_client_storm": per_client([c.presence["storm"] for c in clients]),
            # when the clients were back, from SIGTERM
            "back_s": {q: round(sorted(run.back_at)[min(len(run.back_at) - 1, int(f * len(run.back_at)))] - t0, 3)
                       for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
            # connections the kernel dropped because a listen queue was full (machine-wide, so
            # other processes' count too): a client whose SYN or ACK was dropped waits for TCP's
            # retransmission (1 s, then 2 s, 4 s...)
            "listen_overflows": listen_overflows() - overflows if overflows is not None else None,
            # failed connection attempts of the whole run (refused while no hub listened...)
            "connect_errors": run.connect_errors,
            "slow_consumer_cuts": sum(c.cut for c in clients),
            "rejoins_not_recovered": sum(c.not_recovered for c in clients),
            "messages_lost": sum(c.gaps for c in clients),
        }
    finally:
        run.stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def start_py_spy(out: str, pid: int) -> subprocess.Popen:
    """py-spy (pip install py-spy) sampling the hub ``pid`` into ``out`` (collapsed stacks, one a line: flamegraph.pl or speedscope read them)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", out],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def listen_overflows() -> int | None:
    """The kernel's ListenOverflows counter (/proc/net/netstat), or None where there is none."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        row = dict(zip(names.split(), values.split()))
        if "ListenOverflows" in row:
            return int(row["ListenOverflows"])
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    return process_cpu_seconds(pid) or 0.0


def raise_fd_limit(need: int) -> None:
    soft = raise_open_file_limit()  # to the hard limit, as the hub does for itself
    if soft < need:
        raise SystemExit(f"storm: {need - 200} clients need {need} open files here and in the hub; the limit is {soft}: "
                         f"use fewer --clients or raise ulimit -n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=500, help=f"members of the room (at most {MAX_CLIENTS:,})")
    p.add_argument("--messages", type=int, default=20, help="published before the drain, and again after the restart")
    p.add_argument("--broker", default="memory://", help="the hub's --broker (redis:// or nats:// to see recovery across the restart)")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="the hub's --drain-timeout: byes spread over half of it, at most 5 s")
    p.add_argument("--concurrency", type=int, default=1000, help="clients connecting at once during the fill")
    p.add_argument("--timeout", type=float, default=120.0, help="the longest each phase may take (seconds)")
    p.add_argument("--serve-arg", action="append", default=[], help="one more argument for wirehub serve (repeatable), e.g. --serve-arg=--presence-max=0")
    p.add_argument("--handover", action="store_true", help="start the new hub beside the old one (both with "
                   "--reuse-port) before the drain, as a restart without downtime does (needs a shared --broker)")
    p.add_argument("--at-once", action="store_true", help="start the new hub as soon as the drained one has closed its "
                   "listener (SIGTERM stops accepting first, so a restart can bind the port at once: SPEC), beside its drain, "
                   "instead of once it has exited")
    p.add_argument("--pin", action="store_true", help="the hubs on core 0 (taskset -c 0), the clients on core 1, as "
                   "bench/peers.py pins (Redis is not pinned)")
    p.add_argument("--py-spy", metavar="FILE", help="sample the hub that takes the storm with py-spy (pip install py-spy) "
                   "from its listening until every client recovered, into FILE (collapsed stacks)")
    p.add_argument("--py-spy-drain", metavar="FILE", help="the same for the hub that is drained, from SIGTERM until it exits")
    p.add_argument("--json", help="write the figures to this file too")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be 1 to {MAX_CLIENTS:,}")
    if args.handover and args.at_once:
        p.error("--handover and --at-once are two ways to restart: give one")
    if args.handover and args.broker.startswith("memory:"):
        p.error("--handover runs two hubs at once: give them a shared --broker (redis://... or nats://...)")
    raise_fd_limit(args.clients + 200)
    if args.pin:
        if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
            p.error("--pin needs two cores and taskset")
        os.sched_setaffinity(0, {1})  # the clients here; the hubs on core 0 (start_hub)
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        result = asyncio.run(storm(args))
    else:
        result = uvloop.run(storm(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
