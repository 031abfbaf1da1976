"""``wirehub status`` and ``wirehub top``: a running server's sockets and rooms, read from
its admin API and printed as tables.

The server sorts, filters and pages (``/api/connections?sort=...&limit=...``): a snapshot
reads only the rows it prints, the busiest first (``sort=msgs``) unless told otherwise,
whatever the number of connections. The rooms are the first ``limit`` by name; the totals
come from the ``X-Total-Count`` header."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping


#: the most rows the admin API gives in one page (``wirehub.server.admin.PAGE_MAX``)
PAGE_MAX = 10_000


class StatusError(Exception):
    """The admin API could not be read; the message says what to check."""


def fetch(base: str, path: str, token: str | None, timeout: float = 5.0) -> Any:
    return fetch_page(base, path, token, timeout)[0]


def fetch_page(base: str, path: str, token: str | None, timeout: float = 5.0) -> tuple[Any, int | None]:
    """The JSON at ``path`` and the list's total (``X-Total-Count``; None when absent)."""
    request = urllib.request.Request(base.rstrip("/") + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = response.headers.get("X-Total-Count")
            return json.loads(response.read()), int(total) if total and total.isdigit() else None
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise StatusError(f"{base} wants a token: pass --admin-token (or set WIREHUB_ADMIN_TOKEN)") from None
        if exc.code == 404:
            return None, None
        if exc.code == 400:
            try:
                message = json.loads(exc.read())["message"]
            except (ValueError, KeyError, TypeError, OSError):
                message = f"HTTP {exc.code}"
            raise StatusError(message) from None
        raise StatusError(f"{base}{path} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach the admin API at {base} ({reason}); is the server running, and is --admin set to it?") from None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render(base: str, token: str | None, *, limit: int = 50, query: Mapping[str, str | None] | None = None) -> str:
    """One snapshot: readiness, connections (busiest first unless ``query`` says otherwise:
    the parameters of ``/api/connections``) and rooms."""
    try:
        ready = fetch(base, "/readyz", token)
    except StatusError:
        ready = None  # 503 while draining: still show the rest
    limit = min(max(0, limit), PAGE_MAX)
    params = {"sort": "msgs", **{k: v for k, v in (query or {}).items() if v}, "limit": str(limit)}
    closed = params.get("state") == "closed"
    if closed and params["sort"] == "msgs":
        params["sort"] = "closed_at"
    conns, conns_total = fetch_page(base, "/api/connections?" + urllib.parse.urlencode(params), token)
    conns = conns or []
    rooms, rooms_total = fetch_page(base, f"/api/rooms?limit={limit}", token)
    now = time.time()
    n_conns = conns_total if conns_total is not None else len(conns)
    n_rooms = rooms_total if rooms_total is not None else len(rooms or [])
    filtered = any(params.get(k) for k in ("transport", "user", "room", "peer"))
    what = "closed" if closed else "connections"
    out = [f"{base}  ready={ready.get('ready') if isinstance(ready, dict) else '?'}  {what}={n_conns}" + (" (filtered)" if filtered else "")
           + (f"  rooms={n_rooms}" if rooms is not None else "")]
    head = ["ID", "TRANSPORT", "PEER", "USER", "ROOMS"]
    if closed:
        head += ["CLOSED", "REASON", "LIVED", "IN", "OUT", "DROPPED"]
        rows = [
            [c["id"], c["transport"], c["peer"], str(c.get("user") or "-"), ",".join(c.get("rooms") or []) or "-",
             f"{now - c['closed_at']:.0f}s ago", c["reason"], f"{c['closed_at'] - c['connected_at']:.0f}s", str(c["msgs_in"]), str(c["msgs_out"]),
             str(c["msgs_dropped"])]
            for c in conns
        ]
    else:
        head += ["AGE", "IDLE", "IN", "OUT", "BYTES IN", "BYTES OUT", "BUFFER"]
        rows = [
            [
                c["id"], c["transport"], c["peer"], str(c.get("user") or "-"), ",".join(c.get("rooms") or []) or "-",
                f"{now - c['connected_at']:.0f}s", f"{c['idle_s']:.1f}s", str(c["msgs_in"]), str(c["msgs_out"]),
                _size(c["bytes_in"]), _size(c["bytes_out"]), _size(c["send_buffer"]),
            ]
            for c in conns
        ]
    out.append("")
    out.append(_table(head, rows))
    if n_conns > len(conns):
        out.append(f"... and {n_conns - len(conns)} more")
    if rooms is not None:
        out.append("")
        out.append(_table(["ROOM", "MEMBERS", "SEQ", "HISTORY", "EPOCH"], [[r["room"], str(r["members"]), str(r["seq"]), str(r["history_size"]), r["epoch"]] for r in rooms[:limit]]))
        if n_rooms > len(rooms[:limit]):
            out.append(f"... and {n_rooms - len(rooms[:limit])} more")
    return "\n".join(out)
