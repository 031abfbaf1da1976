"""``wirehub bench conns``: open N idle connections, report what they cost the server.

The server's resident memory (``VmRSS`` in ``/proc/PID/status``) is read before the first
connection and again once all are open and the server has settled (``--warmup``); the
difference divided by the connections opened is the figure. Connections are spread over
several loopback source addresses (``--sources``), each with its own ~28,000 ephemeral
ports, so that no single (source, destination) pair runs out. With ``--join ROOM`` each
connection says hello and joins ROOM first, as a real hub client would; with ``--send TEXT``
(a server that is not the hub, such as an echo server) it sends TEXT as one frame and waits for
the first frame back. ``opened/s`` counts connections that finished all of that.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from typing import Any

from .net import BenchError, Client, Target, is_loopback_host, parse_target, share
from .net import connect as open_connection
from .runner import Control, Progress, WorkerPool, progress_task


def parse_sources(text: str | None, *, allow_remote: bool = False) -> list[str]:
    """``127.0.0.1-127.0.0.20``, ``127.0.0.1,127.0.0.2`` or one address; ``''`` for none."""
    if not text:
        return []
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = ipaddress.ip_address(lo.strip())
            b = ipaddress.ip_address(hi.strip()) if sep else a
        except ValueError:
            raise BenchError(f"bad --sources entry {part!r}: use 127.0.0.1-127.0.0.20 or a comma-separated list") from None
        if a.version != b.version or int(b) < int(a):
            raise BenchError(f"bad --sources range {part!r}")
        if int(b) - int(a) >= 65536:
            raise BenchError(f"--sources range {part!r} is too large")
        out.extend(str(ipaddress.ip_address(x)) for x in range(int(a), int(b) + 1))
    if not allow_remote:
        bad = [s for s in out if not is_loopback_host(s)]
        if bad:
            raise BenchError(f"--sources {bad[0]} is not a loopback address (pass --allow-remote to use others)")
    return out


def read_rss(pid: int) -> int:
    """Resident memory of a process, in bytes (VmRSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        raise BenchError(f"no process {pid} (is the server running? --server-pid)") from None
    except PermissionError:
        raise BenchError(f"cannot read /proc/{pid}/status: permission denied") from None
    raise BenchError(f"/proc/{pid}/status has no VmRSS line (a kernel thread?)")


def listener_pids(port: int) -> list[int]:
    """The processes that hold a TCP socket listening on ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            continue
    pids = []
    if not inodes:
        return pids
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(pids)


class _Idle(Client):
    def __init__(self, target: Target, join: str | None, send: bytes | None = None) -> None:
        super().__init__(target)
        self.join = join
        self.send = send
        self.joined = self.new_future()
        self.closed_by_server = False

    def start_join(self) -> None:
        import json

        room = json.dumps(self.join).encode()
        self.transport.write(self.frame(b'{"op":"hello","name":"bench"}') + self.frame(b'{"op":"join","room":%s}' % room))  # type: ignore[union-attr]

    def start_send(self) -> None:
        self.transport.write(self.frame(self.send))  # type: ignore[union-attr,arg-type]

    def setup_frame(self, payload: bytes, opcode: int) -> None:
        if self.join:
            self.hub_join_reply(payload, self.joined)
        else:  # the answer to --send: any frame
            self.end_setup()
            if not self.joined.done():
                self.joined.set_result(None)

    def setup_failed(self, message: str) -> None:
        if not self.joined.done():
            self.joined.set_exception(BenchError(message))

    def on_lost(self) -> None:
        self.closed_by_server = True
        self.setup_failed(f"{self.target.url} closed the connection during the join")


async def worker(ctl: Control, p: dict) -> None:
    target = parse_target(p["url"], allow_remote=True)
    n = share(p["count"], ctl.index, ctl.count)
    offset = sum(share(p["count"], i, ctl.count) for i in range(ctl.index))  # this worker's first global index
    sources = p["sources"]
    join = p["join"]
    send = p["send"].encode() if p.get("send") and not join else None
    conns: list[_Idle] = []
    state = {"opened": 0, "failed": 0, "error": ""}
    sem = asyncio.Semaphore(p["concurrency"])

    async def one(k: int) -> None:
        local = (sources[k % len(sources)], 0) if sources else None
        async with sem:
            try:
                c = await open_connection(target, lambda: _Idle(target, join, send), local_addr=local, timeout=p["timeout"])
                if join or send:
                    if join:
                        c.start_join()
                    else:
                        c.start_send()
                    await asyncio.wait_for(asyncio.shield(c.joined), p["timeout"])
                else:
                    c.end_setup()
            except (OSError, BenchError, asyncio.TimeoutError) as exc:
                state["failed"] += 1
                if not state["error"]:
                    state["error"] = str(exc) or type(exc).__name__
                return
        conns.append(c)
        state["opened"] += 1

    reporter = progress_task(ctl, lambda: {"opened": state["opened"], "failed": state["failed"]})
    started = time.monotonic()
    await asyncio.gather(*(one(offset + k) for k in range(n)))
    open_s = time.monotonic() - started
    reporter.cancel()
    ctl.send("ready", opened=state["opened"], failed=state["failed"], error=state["error"], open_s=open_s)
    _, msg = await ctl.recv("start")
    while not ctl.stopped and time.monotonic_ns() < msg["until"]:
        await asyncio.sleep(min(0.1, max(0.0, (msg["until"] - time.monotonic_ns()) / 1e9)))
    closed = sum(1 for c in conns if c.closed_by_server)
    ctl.send("result", still_open=len(conns) - closed, closed_by_server=closed)
    for c in conns:
        c.close()


def run(p: dict, progress: Progress) -> dict[str, Any]:
    pids = p["server_pids"]
    if not pids:
        target = parse_target(p["url"], allow_remote=True)
        pids = listener_pids(target.port)
        if not pids:
            raise BenchError(
                f"no process found listening on port {target.port}: give the server's process id with --server-pid PID"
            )
    rss = lambda: sum(read_rss(pid) for pid in pids)  # noqa: E731
    before = rss()
    processes = max(1, min(p["processes"], p["count"]))
    pool = WorkerPool("wirehub.bench.conns:worker", p, processes)
    timeline: list[dict] = [{"connections": 0, "rss": before}]
    started = time.monotonic()
    try:

        def tick() -> None:
            opened = sum(w.get("opened", 0) for w in pool.latest.values())
            failed = sum(w.get("failed", 0) for w in pool.latest.values())
            now_rss = rss()
            if opened != timeline[-1]["connections"]:
                timeline.append({"connections": opened, "rss": now_rss})
            elapsed = time.monotonic() - started
            progress.show(
                f"conns {elapsed:5.1f} s  opened {opened:,}/{p['count']:,}"
                + (f"  failed {failed:,}" if failed else "")
                + f"  server RSS {now_rss / 2**20:,.1f} MiB"
            )

        ready = pool.gather("ready", timeout=p["timeout"] * 2 + 30 + p["count"] / 200, tick=tick)
        opened = sum(r["opened"] for r in ready.values())
        failed = sum(r["failed"] for r in ready.values())
        open_s = max(r["open_s"] for r in ready.values())
        settle_until = time.monotonic() + p["warmup"]
        while time.monotonic() < settle_until:
            progress.show(f"conns: {opened:,} open, letting the server settle ({p['warmup']:g} s)")
            time.sleep(min(0.1, max(0.0, settle_until - time.monotonic())))
        after = rss()
        timeline.append({"connections": opened, "rss": after})
        hold_until = time.monotonic_ns() + int(p["duration"] * 1e9)
        pool.broadcast("start", until=hold_until)
        results = pool.gather(
            "result", timeout=p["duration"] + 30,
            tick=lambda: progress.show(f"conns: holding {opened:,} connections open"),
        )
    finally:
        progress.clear()
        pool.close()
    time.sleep(min(1.0, p["warmup"]))
    try:
        after_close = rss()
    except BenchError:
        after_close = None
    if opened == 0:
        first_error = next((r["error"] for r in ready.values() if r["error"]), "")
        raise BenchError(f"no connection could be opened: {first_error}")
    return {
        "server_pids": pids,
        "opened": opened,
        "failed": failed,
        "error": next((r["error"] for r in ready.values() if r["error"]), ""),
        "open_seconds": open_s,
        "opened_per_s": opened / open_s if open_s > 0 else None,
        "still_open_at_end": sum(r["still_open"] for r in results.values()),
        "closed_by_server": sum(r["closed_by_server"] for r in results.values()),
        "rss_before": before,
        "rss_after": after,
        "rss_after_close": after_close,
        "bytes_per_connection": (after - before) / opened,
        "timeline": timeline,
        "processes": processes,
    }
