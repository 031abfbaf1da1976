"""The summary table, the JSON document and the optional PNG plot."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from typing import Any

from .net import BenchError
from .stats import Histogram

PLOT_HINT = "--plot needs matplotlib, which is not installed: pip install matplotlib"


def environment() -> dict[str, Any]:
    from .._version import __version__

    out: dict[str, Any] = {
        "wirehub": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        import uvloop

        out["uvloop"] = uvloop.__version__
    except ImportError:  # pragma: no cover
        out["uvloop"] = None
    try:
        out["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return out


def document(mode: str, parameters: dict[str, Any], results: dict[str, Any], env: dict[str, Any], started: float) -> dict[str, Any]:
    env = dict(env)
    try:
        env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return {
        "tool": "wirehub bench",
        "mode": mode,
        "command": "wirehub " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "parameters": parameters,
        "results": results,
        "environment": env,
    }


def write_json(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=_default)
        f.write("\n")
    os.replace(tmp, path)


def _default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


# ----------------------------------------------------------------------------- tables


def _num(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}"
    return f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    lines = [title, "-" * (width + vwidth + 3)]
    lines += [f"{k:<{width}}   {v:>{vwidth}}" for k, v in rows]
    return "\n".join(lines)


def _latency_rows(lat: dict[str, Any], label: str) -> list[tuple[str, str]]:
    return [(f"{label} {k}", _ms(lat.get(k))) for k in ("p50", "p90", "p99", "p99.9", "max")]


def _cores(v: Any) -> str:
    return "-" if v is None else f"{v:.2f} cores"


def _cpu_rows(cpu: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The load processes' and the server's CPU use over the measured window."""
    if not cpu:
        return []
    loader = cpu["loader"]
    per = ", ".join("-" if x is None else f"{x:.2f}" for x in loader["per_process"])
    rows = [("load CPU", f"{_cores(loader['total'])} ({per})" + ("  SATURATED" if loader["saturated"] else ""))]
    if cpu["server"]["pids"]:
        server, user = cpu["server"]["cores"], cpu["server"].get("user_cores")
        split = "" if server is None or user is None else f" (user {user:.2f}, system {max(0.0, server - user):.2f})"
        rows.append(("server CPU", _cores(server) + split))
    if cpu.get("cores_busy"):
        rows.append(("cores busy", ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores_busy"].items())))
    return rows


def _cpu_cell(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return "-"
    total = cpu["loader"]["total"]
    text = "-" if total is None else f"{total:.2f}"
    if cpu["loader"]["saturated"]:
        text += "!"
    server = cpu["server"]["cores"]
    return text + ("" if server is None else f"/{server:.2f}")


def echo_table(p: dict[str, Any], r: dict[str, Any]) -> str:
    size = {"hub": "ping frames", "raw": "the hub's ping bytes"}.get(p["protocol"], f"{p['size']} B")
    title = (
        f"wirehub bench echo  {p['url']}  --protocol {p['protocol']}: {p['connections']} connections x "
        f"pipeline {p['pipeline']}, {size}, {p['duration']:g} s (+{p['warmup']:g} s warmup), "
        f"{r['processes']} load process{'es' if r['processes'] != 1 else ''}"
    )
    rows = [
        ("messages", _num(r["messages"])),
        ("msgs/s", _num(r["msgs_per_s"])),
        ("bursts", _num(r["bursts"])),
    ]
    rows += _latency_rows(r["latency_ms"], "burst round trip")
    rows += [("errors", _num(r["errors"])), ("stalled connections", _num(r["stalled_connections"]))]
    rows += _cpu_rows(r.get("cpu"))
    out = _table(title, rows)
    if r["error"]:
        out += f"\nfirst error: {r['error']}"
    return out


def fanout_table(p: dict[str, Any], r: dict[str, Any]) -> str:
    steps = r["steps"]
    title = (
        f"wirehub bench fanout  {p['url']} ({p.get('protocol') or 'hub'}): {p['subscribers']} subscribers in {p['room']!r}, {p['size']} B data, "
        f"{p['duration']:g} s (+{p['warmup']:g} s warmup) per step, "
        f"{r['processes']} load process{'es' if r['processes'] != 1 else ''}"
    )
    if len(steps) == 1 and not p["ramp"]:
        s = steps[0]
        rows = [
            ("rate (target)", f"{_num(s['rate'])} msg/s"),
            ("published", _num(s["published"])),
            ("expected deliveries", _num(s["expected_deliveries"])),
            ("delivered", _num(s["delivered"])),
            ("lost", _num(s["lost"])),
            ("duplicates", _num(s["duplicates"])),
            ("out of order", _num(s["out_of_order"])),
            ("i not delivered to all", _num(s["undelivered_i"])),
            ("deliveries/s", _num(s["deliveries_per_s"])),
        ]
        rows += _latency_rows(s["latency_ms"], "end-to-end")
        rows.append(("publisher lag max", _ms(s["publisher_lag_ms"])))
        rows += _cpu_rows(s.get("cpu"))
        out = _table(title, rows)
        if s["problems"]:
            out += "\nproblems: " + "; ".join(s["problems"])
        return out
    head = (f"{'step':>4}  {'rate':>10}  {'published':>10}  {'deliveries/s':>13}  {'lost':>8}  {'dup':>5}  {'ooo':>5}  "
            f"{'p50':>10}  {'p99':>10}  {'max':>10}  {'cpu load/srv':>12}  result")
    lines = [title, "-" * len(head), head]
    for k, s in enumerate(steps, 1):
        lat = s["latency_ms"]
        lines.append(
            f"{k:>4}  {_num(s['rate']):>10}  {_num(s['published']):>10}  {_num(s['deliveries_per_s']):>13}  "
            f"{_num(s['lost']):>8}  {_num(s['duplicates']):>5}  {_num(s['out_of_order']):>5}  {_ms(lat.get('p50')):>10}  "
            f"{_ms(lat.get('p99')):>10}  {_ms(lat.get('max')):>10}  {_cpu_cell(s.get('cpu')):>12}  "
            f"{'clean' if s['clean'] else '; '.join(s['problems'])}"
        )
    if r["highest_clean_rate"] is not None:
        lines.append(
            f"highest clean rate: {_num(r['highest_clean_rate'])} msg/s x {p['subscribers']} subscribers = "
            f"{_num(r['highest_clean_deliveries_per_s'])} deliveries/s (p99 <= {p['max_p99']:g} ms, no loss)"
        )
    else:
        lines.append("no clean step: even the first rate lost messages or exceeded --max-p99")
    lines.append("cpu load/srv: the load processes' / the server's CPU use in the measured window, in cores "
                 "(! = a load process or the load cores were >= 90 % busy: the step may be the load generator's limit)")
    return "\n".join(lines)


def conns_table(p: dict[str, Any], r: dict[str, Any]) -> str:
    title = (
        f"wirehub bench conns  {p['url']}: {p['count']:,} idle connections"
        + (f", each joined to {p['join']!r}" if p["join"] else "")
        + (f", each sent {p['send']!r} and got a reply" if p.get("send") and not p["join"] else "")
        + f", server pid {', '.join(map(str, r['server_pids']))}"
    )
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rows = [
        ("opened", _num(r["opened"])),
        ("failed", _num(r["failed"])),
        ("opened/s", _num(r["opened_per_s"])),
        ("server RSS before", mib(r["rss_before"])),
        ("server RSS with all open", mib(r["rss_after"])),
        ("server RSS after closing", mib(r["rss_after_close"])),
        ("bytes per connection", f"{r['bytes_per_connection']:,.0f} B ({r['bytes_per_connection'] / 1024:.2f} KiB)"),
        ("closed by the server", _num(r["closed_by_server"])),
    ]
    out = _table(title, rows)
    if r["error"]:
        out += f"\nfirst error: {r['error']}"
    return out


# ----------------------------------------------------------------------------- plots


def require_matplotlib() -> None:
    """Fail before any load is generated when --plot cannot be honoured."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError(PLOT_HINT)


def plot(path: str, doc: dict[str, Any]) -> None:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode, r, p = doc["mode"], doc["results"], doc["parameters"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if mode == "echo":
        ax = axes[0]
        tl = r["timeline"]
        ax.plot([x["t"] for x in tl], [x["msgs_per_s"] for x in tl], marker=".")
        ax.set_xlabel("seconds")
        ax.set_ylabel("msgs/s")
        ax.set_title(f"throughput ({p['connections']} conns x pipeline {p['pipeline']})")
        ax.set_ylim(bottom=0)
        _latency_curve(axes[1], Histogram.from_dict(r["histogram_ns"]), "burst round trip")
    elif mode == "fanout":
        steps = r["steps"]
        if len(steps) > 1:
            ax = axes[0]
            rates = [s["rate"] for s in steps]
            ax.plot(rates, [s["deliveries_per_s"] for s in steps], marker="o", label="deliveries/s")
            ax.set_xscale("log")
            ax.set_xlabel("publish rate (msg/s)")
            ax.set_ylabel("deliveries/s")
            ax2 = ax.twinx()
            ax2.plot(rates, [s["latency_ms"].get("p99") or 0 for s in steps], color="tab:red", marker="x", label="p99 ms")
            ax2.set_ylabel("p99 latency (ms)")
            lines = ax.get_lines() + ax2.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left")
            ax.set_title(f"fan-out to {p['subscribers']} subscribers")
        else:
            axes[0].axis("off")
            s = steps[0]
            axes[0].text(0.05, 0.5, f"{s['rate']:,.0f} msg/s x {s['subscribers']} subscribers\n"
                         f"{s['deliveries_per_s']:,.0f} deliveries/s\nlost {s['lost']:,}", fontsize=12)
        _latency_curve(axes[1], Histogram.from_dict(steps[-1]["histogram_ns"]), "end-to-end latency (last step)")
    elif mode == "conns":
        tl = r["timeline"]
        ax = axes[0]
        ax.plot([x["connections"] for x in tl], [x["rss"] / 2**20 for x in tl], marker=".")
        ax.set_xlabel("open connections")
        ax.set_ylabel("server RSS (MiB)")
        ax.set_title(f"{r['bytes_per_connection']:,.0f} B per connection")
        axes[1].axis("off")
    fig.suptitle(f"wirehub bench {mode}  {p.get('url', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _latency_curve(ax, hist: Histogram, title: str) -> None:
    curve = hist.curve()
    if not curve:
        ax.text(0.5, 0.5, "no samples", ha="center")
        return
    xs = [min(f, 0.99999) for _, f in curve]
    ax.plot([1 / (1 - x) for x in xs], [v for v, _ in curve])
    ax.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["0", "50", "90", "99", "99.9", "99.99", "99.999"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
