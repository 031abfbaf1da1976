"""Server configuration: one validated :class:`Config` from a TOML file,
``WIREHUB_*`` environment variables and command-line flags (in increasing
precedence).

Everything is driven by the :data:`OPTIONS` table.  Each :class:`Option` names
its *kind*; the kind decides how a raw value is parsed (``_KINDS``), how its
default is shown in ``--help`` and which metavar the flag gets.  The dataclass
defaults, TOML keys, environment names, click flags and validation all come
from that one table -- there is no per-option code.

Problems are collected, never raised one at a time: :func:`load` reports every
bad key, from every source, in a single :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import urlsplit

__all__ = [
    "OPTIONS",
    "Config",
    "ConfigError",
    "Option",
    "Problem",
    "check_file",
    "click_options",
    "flags_from_click",
    "format_addr",
    "format_duration",
    "format_size",
    "load",
    "parse_addr",
    "parse_duration",
    "parse_size",
]

Addr: TypeAlias = tuple[str, int]
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

ENV_PREFIX = "WIREHUB_"
ENV_CONFIG = "WIREHUB_CONFIG"
#: variables of wirehub's that are not options (read elsewhere)
ENV_OTHER = frozenset((ENV_CONFIG, "WIREHUB_PURE_PYTHON"))

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# --------------------------------------------------------------------------
# problems


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the configuration, and where it came from."""

    where: str  # "wirehub.toml:12", "env WIREHUB_X", "flag --x", "config"
    key: str  # option name, or the unknown key as written ("" if none)
    message: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.where}: {self.key}: {self.message}"
        return f"{self.where}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; :attr:`problems` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems: list[Problem] = list(problems)

    def __str__(self) -> str:
        return "invalid configuration:\n  " + "\n  ".join(map(str, self.problems))


class _Invalid(ValueError):
    """Raised by a parser; the message says what is wrong and what is accepted."""


def _got(raw: Any) -> str:
    if isinstance(raw, dict):
        return "a table"
    return repr(raw)


# --------------------------------------------------------------------------
# value syntaxes (public helpers: also used by the CLI and in log messages)

_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*\Z")
_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}
_SIZE_HINT = "a size like 65536 or '64KiB'"


def parse_size(raw: Any) -> int:
    """``65536``, ``"512"``, ``"64KiB"``, ``"64k"``, ``"1M"``, ``"1GiB"`` -> bytes.

    Units are binary and case-insensitive: k/KiB, M/MiB, G/GiB, B.
    """
    if isinstance(raw, int) and not isinstance(raw, bool):
        n = raw
    elif isinstance(raw, str) and (m := _SIZE_RE.match(raw)) and m[2].lower() in _SIZE_UNITS:
        n = int(m[1]) * _SIZE_UNITS[m[2].lower()]
    else:
        raise _Invalid(f"expected {_SIZE_HINT}, got {_got(raw)}")
    if n < 0:
        raise _Invalid(f"expected {_SIZE_HINT} (not negative), got {_got(raw)}")
    return n


def format_size(n: int) -> str:
    """The shortest exact form: 65536 -> '64KiB', 1048576 -> '1MiB', 1000 -> '1000'."""
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


_DURATION_RE = re.compile(
    r"\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*\Z"
)
_DURATION_HINT = "a duration like 30, 1.5, '250ms', '30s', '5m' or '1h'"


def parse_duration(raw: Any) -> float:
    """Seconds as int/float, or ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1.5"``."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        secs = float(raw)
    elif isinstance(raw, str) and (m := _DURATION_RE.match(raw)):
        num, unit = float(m[1]), m[2] or "s"
        secs = num / 1000 if unit == "ms" else num * {"s": 1, "m": 60, "h": 3600}[unit]
    else:
        raise _Invalid(f"expected {_DURATION_HINT}, got {_got(raw)}")
    if not math.isfinite(secs) or secs < 0:
        raise _Invalid(f"expected {_DURATION_HINT}, got {_got(raw)}")
    return secs


def format_duration(secs: float) -> str:
    """An exact, readable form that :func:`parse_duration` reads back unchanged."""
    if secs > 0 and secs.is_integer():
        for unit, mult in (("h", 3600), ("m", 60)):
            if secs % mult == 0:
                return f"{int(secs) // mult}{unit}"
        return f"{int(secs)}s"
    ms = secs * 1000
    if secs > 0 and ms.is_integer() and int(ms) / 1000 == secs:
        return f"{int(ms)}ms"
    return f"{secs!r}s"


_ADDR_HINT = "HOST:PORT or [IPv6]:PORT"


def parse_addr(raw: Any) -> Addr:
    """``"127.0.0.1:7400"``, ``"[::1]:7400"``, ``"localhost:0"`` -> (host, port)."""
    if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], str) and isinstance(raw[1], int):
        raw = format_addr(raw)
    if not isinstance(raw, str):
        raise _Invalid(f"expected {_ADDR_HINT}, got {_got(raw)}")
    host, sep, port = raw.strip().rpartition(":")
    if not sep:
        raise _Invalid(f"expected {_ADDR_HINT}, got {raw!r}")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")):
            raise _Invalid(f"unbalanced brackets; expected {_ADDR_HINT}, got {raw!r}")
        host = host[1:-1]
        if host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise _Invalid(f"only IPv6 addresses go in brackets, got {raw!r}") from None
    elif ":" in host:
        raise _Invalid(f"IPv6 addresses must be in brackets, like '[::1]:7400', got {raw!r}")
    if not host or any(c.isspace() for c in host):
        raise _Invalid(f"host must be a non-empty name or address ({_ADDR_HINT}), got {raw!r}")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise _Invalid(f"port must be a number from 0 to 65535, got {raw!r}")
    return host, int(port)


def format_addr(addr: Addr) -> str:
    """('::1', 7400) -> '[::1]:7400'; ('127.0.0.1', 7400) -> '127.0.0.1:7400'."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# kind parsers: (raw value, option, text) -> typed value.  ``text`` is True
# when the raw value came from an environment variable or a flag (strings),
# False when it came from TOML or Config.replace (native types).

Parser = Callable[[Any, "Option", bool], Any]

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _p_bool(raw: Any, opt: Option, text: bool) -> bool:
    if isinstance(raw, bool):
        return raw
    if text and isinstance(raw, str):
        word = raw.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise _Invalid(f"expected true/false, 1/0, yes/no or on/off, got {raw!r}")
    raise _Invalid(f"expected true or false, got {_got(raw)}")


def _p_int(raw: Any, opt: Option, text: bool) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if text and isinstance(raw, str):
        try:
            return int(raw.strip(), 10)
        except ValueError:
            pass
    raise _Invalid(f"expected a whole number, got {_got(raw)}")


def _p_size(raw: Any, opt: Option, text: bool) -> int:
    return parse_size(raw)


def _p_duration(raw: Any, opt: Option, text: bool) -> float:
    secs = parse_duration(raw)
    if secs <= 0:
        raise _Invalid(f"must be more than zero; expected {_DURATION_HINT}, got {_got(raw)}")
    return secs


def _p_str(raw: Any, opt: Option, text: bool) -> str:
    if not isinstance(raw, str) or not raw:
        raise _Invalid(f"expected a non-empty string, got {_got(raw)}")
    return raw


def _p_choice(raw: Any, opt: Option, text: bool) -> str:
    choices = opt.choices or ()
    word = raw.strip().lower() if isinstance(raw, str) else None
    if word in choices:
        return word
    accepted = ", ".join(map(repr, choices))
    hint = difflib.get_close_matches(word, choices, n=1) if word else []
    tail = f"; did you mean {hint[0]!r}?" if hint else ""
    raise _Invalid(f"expected one of {accepted}, got {_got(raw)}{tail}")


def _p_path(raw: Any, opt: Option, text: bool) -> str:
    if not isinstance(raw, str) or not raw:
        raise _Invalid(f"expected the path of a readable file, got {_got(raw)}")
    path = os.path.expanduser(raw)
    if not os.path.exists(path):
        raise _Invalid(f"file not found: {raw!r}")
    if not os.path.isfile(path):
        raise _Invalid(f"not a regular file: {raw!r}")
    if not os.access(path, os.R_OK):
        raise _Invalid(f"file is not readable: {raw!r}")
    return path


def _p_url(raw: Any, opt: Option, text: bool) -> str:
    schemes = opt.choices or ()
    accepted = ", ".join(f"{s}://" for s in schemes)
    if not isinstance(raw, str):
        raise _Invalid(f"expected a URL ({accepted}), got {_got(raw)}")
    url = raw.strip()
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        raise _Invalid(f"expected a URL starting with one of {accepted}, got {raw!r}")
    if scheme.lower() == "memory":
        if rest:
            raise _Invalid(f"memory:// takes nothing after the scheme, got {raw!r}")
        return "memory://"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise _Invalid(f"bad URL {raw!r}: {exc}") from None
    if not parts.hostname:
        raise _Invalid(f"{scheme}:// needs a host, like '{scheme}://localhost', got {raw!r}")
    return url


def _i_path(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise _Invalid(f"expected a non-empty path, got {_got(raw)}")
    return os.path.expanduser(raw)


def _i_cidr(raw: Any) -> Network:
    if isinstance(raw, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return raw
    if isinstance(raw, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raw = str(raw)
    if isinstance(raw, str):
        try:
            return ipaddress.ip_network(raw.strip(), strict=False)
        except ValueError:
            pass
    raise _Invalid(f"expected an IP network like '10.0.0.0/8', '2001:db8::/32' or '::1', got {_got(raw)}")


def _list_of(item: Callable[[Any], Any], *, split_items: bool) -> Parser:
    """A list kind.  A string is split on commas (env, TOML shorthand); with
    ``split_items`` each string item of a list is split too (``--tcp a:1,b:2``).
    The single value ``"off"`` (or nothing at all) means an empty list."""

    def parse(raw: Any, opt: Option, text: bool) -> tuple[Any, ...]:
        if isinstance(raw, str):
            items: list[Any] = [s.strip() for s in raw.split(",") if s.strip()]
        elif isinstance(raw, (list, tuple)):
            items = []
            for it in raw:
                if split_items and isinstance(it, str) and "," in it:
                    items.extend(s.strip() for s in it.split(",") if s.strip())
                else:
                    items.append(it.strip() if isinstance(it, str) else it)
        else:
            raise _Invalid(f"expected a list of {opt.shown_metavar} or 'off', got {_got(raw)}")
        offs = [it for it in items if isinstance(it, str) and it.lower() == "off"]
        if offs:
            if len(items) == 1:
                return ()
            raise _Invalid(f"'off' means none and cannot be combined with other values, got {_got(raw)}")
        out, errors = [], []
        for it in items:
            try:
                out.append(item(it))
            except _Invalid as exc:
                errors.append(str(exc))
        if errors:
            raise _Invalid("; ".join(errors))
        return tuple(out)

    return parse


#: what a room pattern may change (``[rooms."chat.*"]`` in TOML, ``--room 'chat.*:presence=off'``)
#: the longest ``presence_window`` a setting may ask for, in seconds
MAX_PRESENCE_WINDOW_S = 10.0
ROOM_KEYS = ("history_size", "history_ttl", "presence", "max_room_members", "presence_threshold", "presence_max", "presence_window")

RoomRules = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def _p_rooms(raw: Any, opt: Option, text: bool) -> RoomRules:
    """Per-room-pattern overrides, in order (the first pattern a room matches wins).
    TOML: a table of tables; flags and env: ``PATTERN:key=value,key=value`` items
    (env separates items with ``;``)."""
    if isinstance(raw, str):
        raw = [item for item in raw.split(";") if item.strip()]
    if isinstance(raw, dict):
        entries = list(raw.items())
        values_are_text = False
    elif isinstance(raw, (list, tuple)):
        entries, errors = [], []
        for item in raw:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                entries.append((item[0], dict(item[1])))
                continue
            # the last colon: a pattern may hold colons of its own (doc:*:history_size=10)
            pattern, sep, rest = item.rpartition(":") if isinstance(item, str) else ("", "", "")
            pairs = [kv.split("=", 1) for kv in rest.split(",") if kv.strip()]
            if not sep or not pattern.strip() or any(len(p) != 2 for p in pairs):
                errors.append(f"expected PATTERN:key=value[,key=value...], got {_got(item)}")
                continue
            entries.append((pattern.strip(), {k.strip(): v.strip() for k, v in pairs}))
        if errors:
            raise _Invalid("; ".join(errors))
        values_are_text = True
    else:
        raise _Invalid(f"expected a table of room patterns, got {_got(raw)}")
    out, errors = [], []
    for pattern, settings in entries:
        if not isinstance(pattern, str) or not pattern:
            errors.append(f"a room pattern must be a non-empty string, got {_got(pattern)}")
            continue
        if not isinstance(settings, dict):
            errors.append(f"rooms.{pattern} must be a table of settings, got {_got(settings)}")
            continue
        parsed = []
        for key, value in settings.items():
            name = str(key).replace("-", "_")
            name = "max_room_members" if name == "max_members" else name
            if name not in ROOM_KEYS:
                errors.append(f"rooms.{pattern}: unknown setting {key!r} (one of {', '.join(ROOM_KEYS)})")
                continue
            try:
                parsed.append((name, _parse(_BY_NAME[name], value, values_are_text or isinstance(value, str))))
            except _Invalid as exc:
                errors.append(f"rooms.{pattern}.{name}: {exc}")
        out.append((pattern, tuple(parsed)))
    if errors:
        raise _Invalid("; ".join(errors))
    return tuple(out)


def _show_rooms(rules: RoomRules) -> str:
    return "; ".join(f"{p}:" + ",".join(f"{k}={v}" for k, v in kv) for p, kv in rules) if rules else "none"


@dataclass(frozen=True, slots=True)
class _Kind:
    parse: Parser
    metavar: str
    show: Callable[[Any], str] = str  # typed default -> text for --help
    is_list: bool = False


def _show_list(fmt: Callable[[Any], str]) -> Callable[[tuple[Any, ...]], str]:
    return lambda items: ", ".join(map(fmt, items)) if items else "off"


_KINDS: dict[str, _Kind] = {
    "addrs": _Kind(_list_of(parse_addr, split_items=True), "HOST:PORT", _show_list(format_addr), True),
    "paths": _Kind(_list_of(_i_path, split_items=False), "PATH", _show_list(str), True),
    "cidrs": _Kind(_list_of(_i_cidr, split_items=True), "CIDR", _show_list(str), True),
    "path": _Kind(_p_path, "FILE"),
    "str": _Kind(_p_str, "TEXT"),
    "url": _Kind(_p_url, "URL"),
    "int": _Kind(_p_int, "N"),
    "bool": _Kind(_p_bool, "", lambda b: "on" if b else "off"),
    "size": _Kind(_p_size, "SIZE", format_size),
    "duration": _Kind(_p_duration, "DURATION", format_duration),
    "choice": _Kind(_p_choice, "CHOICE"),
    "rooms": _Kind(_p_rooms, "PATTERN:KEY=VALUE,...", _show_rooms, True),
}


# --------------------------------------------------------------------------
# the table


@dataclass(frozen=True, slots=True)
class Option:
    """One configuration option: the single source of truth for its default,
    TOML key, environment variable, flag, parser and help text."""

    name: str
    kind: str
    default: Any  # raw form, as it would be written in TOML; None = unset
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None  # for "choice"; allowed schemes for "url"
    group: str = "General"  # --help section
    minimum: int | None = None  # inclusive lower bound for int/size kinds
    maximum: float | None = None  # inclusive upper bound (int, size, duration kinds)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def is_list(self) -> bool:
        return _KINDS[self.kind].is_list

    @property
    def shown_metavar(self) -> str:
        if self.metavar:
            return self.metavar
        if self.kind == "choice" and self.choices:
            return "[" + "|".join(self.choices) + "]"
        return _KINDS[self.kind].metavar

    @property
    def default_text(self) -> str:
        """The default as shown in ``--help``: '127.0.0.1:7400', '64KiB', 'off', 'none'."""
        if self.default is None:
            return "none"
        return _KINDS[self.kind].show(_DEFAULTS[self.name])

    def parse(self, raw: Any, *, text: bool = True) -> Any:
        """Parse one raw value (a string when ``text``); raises ValueError."""
        return _parse(self, raw, text)


_L, _TLS, _HUB, _SOCK, _PROC = "Listeners", "TLS", "Hub", "Sockets", "Process"
_TIME, _LIM, _ACC, _LOG = "Timeouts", "Limits", "Access", "Logging"

OPTIONS: tuple[Option, ...] = (
    Option("tcp", "addrs", ("127.0.0.1:7400",), "Plain TCP listener addresses.", group=_L),
    Option("tls", "addrs", (), "TLS-over-TCP listener addresses (needs --cert and --key).", group=_L),
    Option("ws", "addrs", ("127.0.0.1:7401",), "WebSocket listener addresses.", group=_L),
    Option("wss", "addrs", (), "Secure WebSocket listener addresses (needs --cert and --key).", group=_L),
    Option("udp", "addrs", ("127.0.0.1:7400",), "UDP listener addresses.", group=_L),
    Option("admin", "addrs", ("127.0.0.1:7480",), "Admin HTTP endpoint addresses (health, metrics).", group=_L),
    Option("unix", "paths", (), "Unix-domain socket listener paths.", group=_L),
    Option("cert", "path", None, "TLS certificate chain file (PEM).", group=_TLS),
    Option("key", "path", None, "TLS private key file (PEM).", group=_TLS),
    Option("client_ca", "path", None,
           "CA bundle (PEM); when set, TLS clients must present a certificate signed by it (mutual TLS).",
           group=_TLS),
    Option("secret", "str", None, "Shared secret for signed tokens; setting it turns token auth on.", group=_HUB),
    Option("heartbeat", "duration", 25.0,
           "Heartbeat interval announced in welcome: clients send a ping at least this often.", group=_HUB),
    Option("hello_timeout", "duration", 60.0,
           "Idle timeout of a connection that has not said hello or joined a room (idle_timeout applies after); "
           "with auth on, also the time from connecting by which hello must succeed.",
           group=_HUB),
    Option("history_size", "int", 100, "Messages each room's history keeps (0: none).", group=_HUB, minimum=0),
    Option("history_ttl", "duration", 3600.0, "How long a room's history keeps a message.", group=_HUB),
    Option("presence", "bool", True, "Track room members and send join/leave events.", group=_HUB),
    Option("presence_threshold", "int", 100,
           "Members of a room (on every node) above which its presence changes go out as one presence_diff "
           "per window instead of one join/leave frame each (0: always).", group=_HUB, minimum=0),
    Option("presence_max", "int", 1000,
           "Members of a room (on every node) above which no presence changes are sent at all; presence "
           "queries still answer (0: never any).", group=_HUB, minimum=0),
    Option("presence_window", "duration", "100ms",
           "How long presence changes are gathered into one presence_diff.", group=_HUB, maximum=MAX_PRESENCE_WINDOW_S),
    Option("max_room_members", "int", 0, "Members a room may have (0 = unlimited); more get room_full.",
           group=_HUB, minimum=0),
    Option("max_rooms_per_connection", "int", 128,
           "Rooms one connection may be in at once; a join beyond it gets error limit.", group=_HUB, minimum=1),
    Option("max_rooms", "int", 100000,
           "Rooms this node holds in total: rooms with members here, plus (memory broker) rooms that hold "
           "history; a join or publish that would add one beyond it gets error limit.", group=_HUB, minimum=1),
    Option("history_max_bytes", "size", "256MiB",
           "Memory broker: bytes of history kept over all rooms; past it the least recently used rooms "
           "lose their history (clients recovering from before get recovered:false).", group=_HUB, minimum=0),
    Option("history_reply_bytes", "size", "256KiB",
           "Largest history reply: it holds the newest messages that fit (at least one) and says "
           "\"more\":true when older ones were left out.", group=_HUB, minimum=1024),
    Option("rooms", "rooms", (),
           "Settings for rooms whose name matches a glob, overriding history_size, history_ttl, presence, "
           "presence_threshold, presence_max, presence_window and max_room_members; the first matching pattern wins. TOML: [rooms.\"chat.*\"] tables.",
           metavar="PATTERN:KEY=VALUE,...", group=_HUB),
    Option("max_errors", "int", 20,
           "Error replies a connection may earn within a minute before it gets bye too_many_errors.",
           group=_HUB, minimum=1),
    Option("rate_limit", "int", 0,
           "Frames per second one connection may send (bursts of twice that); 0 = unlimited.", group=_HUB, minimum=0),
    Option("token_algorithm", "choice", "hs256",
           "Token signature algorithm: HS256 with --secret, or RS256/ES256 with --public-key.",
           choices=("hs256", "rs256", "es256"), group=_HUB),
    Option("public_key", "path", None, "PEM public key that verifies RS256/ES256 tokens.", group=_HUB),
    Option("app", "str", None,
           "Hub hooks to load, as MODULE:ATTRIBUTE naming a wirehub.hub.Hooks (wirehub serve --app chat:hub); "
           "see docs/hub.md.", metavar="MODULE:HOOKS", group=_HUB),
    Option("hook_timeout", "duration", 5.0,
           "Time an async or blocking hub hook may take; the client then gets error timeout (the hook's "
           "work is not undone).", group=_HUB),
    Option("admin_token", "str", None,
           "Bearer token the admin API requires (Authorization: Bearer ...); mandatory when --admin "
           "binds a non-loopback address.", group=_ACC),
    Option("closed_connections", "int", 1024,
           "Recently closed connections the admin API remembers, with their close reason "
           "(GET /api/connections?state=closed); the oldest is forgotten first; 0 keeps none.",
           group=_ACC, minimum=0),
    Option("broker", "url", "memory://",
           "Message broker for multi-process/multi-host fan-out: memory://, redis://, rediss://, nats://, tls://.",
           choices=("memory", "redis", "rediss", "nats", "tls"), group=_HUB),
    Option("workers", "int", 1, "Number of worker processes.", group=_PROC, minimum=1),
    Option("blocking_threads", "int", 32,
           "Threads per process that run handlers and hub hooks marked blocking=True; calls beyond them "
           "wait their turn (each connection has at most one in the pool, and its reads pause meanwhile).",
           group=_PROC, minimum=1),
    Option("reuse_port", "bool", False, "Set SO_REUSEPORT on listening sockets.", group=_SOCK),
    Option("reuse_address", "bool", True, "Set SO_REUSEADDR on listening sockets.", group=_SOCK),
    Option("backlog", "int", 4096, "Listen backlog per socket (the kernel caps it at net.core.somaxconn).", group=_SOCK, minimum=1),
    Option("udp_receive_buffer", "size", 4194304,
           "SO_RCVBUF of UDP listening sockets: datagrams that arrive while the event loop is busy wait "
           "there instead of being dropped (the kernel caps it at net.core.rmem_max; 0 keeps the system's default).",
           group=_SOCK, minimum=0),
    Option("nodelay", "bool", True, "Set TCP_NODELAY on TCP connections.", group=_SOCK),
    Option("keepalive", "bool", True, "Set SO_KEEPALIVE on TCP connections.", group=_SOCK),
    Option("handshake_timeout", "duration", 10.0,
           "Time allowed for the TLS/WebSocket/hello handshake.", group=_TIME),
    Option("idle_timeout", "duration", 300.0,
           "Close connections that send no complete frame for this long (a partial frame is not activity).",
           group=_TIME),
    Option("drain_timeout", "duration", 30.0,
           "On shutdown, time given to connections to finish before they are closed.", group=_TIME),
    Option("close_timeout", "duration", 5.0, "Time allowed for a graceful close.", group=_TIME),
    Option("max_connections", "int", 100000, "Maximum concurrent connections.", group=_LIM, minimum=1),
    Option("max_connections_per_ip", "int", 0,
           "Maximum concurrent connections from one IP address (0 = unlimited).", group=_LIM, minimum=0),
    Option("max_udp_sessions", "int", 10000,
           "Maximum concurrent UDP sessions (validated source addresses), counted apart from "
           "--max-connections; more are refused with an error naming this limit.", group=_LIM, minimum=1),
    Option("max_frame", "size", 65536, "Largest accepted frame/message.", group=_LIM, minimum=1),
    Option("send_buffer_low", "size", 16384, "Send buffer low-water mark: writing resumes below it.",
           group=_LIM, minimum=0),
    Option("send_buffer_high", "size", 65536, "Send buffer high-water mark: writing pauses above it.",
           group=_LIM, minimum=0),
    Option("max_send_buffer", "size", 1048576,
           "Hard limit on a connection's queued outgoing data; beyond it --slow-consumer applies.",
           group=_LIM, minimum=0),
    Option("slow_consumer", "choice", "disconnect",
           "What to do when a client exceeds --max-send-buffer.",
           choices=("disconnect", "drop_oldest"), group=_LIM),
    Option("allow", "cidrs", (), "Only accept clients from these networks (default: everyone).", group=_ACC),
    Option("deny", "cidrs", (), "Refuse clients from these networks (the admin API too).", group=_ACC),
    Option("proxy_protocol", "cidrs", (),
           "Load balancers that send a PROXY protocol v1/v2 header (HAProxy, nginx, AWS NLB); connections "
           "from them must start with one, and the client it names becomes the connection's peer. "
           "TCP, TLS, WS and WSS listeners.", group=_ACC),
    Option("log_level", "choice", "info", "Log level.", choices=("debug", "info", "warning", "error"),
           group=_LOG),
    Option("log_format", "choice", "text", "Log format.", choices=("text", "json"), group=_LOG),
)

_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
_BY_ENV: dict[str, Option] = {o.env: o for o in OPTIONS}


def _parse(opt: Option, raw: Any, text: bool) -> Any:
    value = _KINDS[opt.kind].parse(raw, opt, text)
    if opt.minimum is not None and value < opt.minimum:
        raise _Invalid(f"must be at least {opt.minimum}, got {_got(raw)}")
    if opt.maximum is not None and value > opt.maximum:
        raise _Invalid(f"must be at most {_KINDS[opt.kind].show(opt.maximum)}, got {_got(raw)}")
    return value


def _typed_default(opt: Option) -> Any:
    return None if opt.default is None else _KINDS[opt.kind].parse(opt.default, opt, False)


# Typed defaults; "path" defaults are all None, so nothing touches the disk here.
_DEFAULTS: dict[str, Any] = {o.name: _typed_default(o) for o in OPTIONS}


# --------------------------------------------------------------------------
# the config


@dataclass(frozen=True, slots=True)
class Config:
    """The validated server configuration.  Field defaults come from OPTIONS."""

    tcp: tuple[Addr, ...] = _DEFAULTS["tcp"]
    tls: tuple[Addr, ...] = _DEFAULTS["tls"]
    ws: tuple[Addr, ...] = _DEFAULTS["ws"]
    wss: tuple[Addr, ...] = _DEFAULTS["wss"]
    udp: tuple[Addr, ...] = _DEFAULTS["udp"]
    admin: tuple[Addr, ...] = _DEFAULTS["admin"]
    unix: tuple[str, ...] = _DEFAULTS["unix"]
    cert: str | None = _DEFAULTS["cert"]
    key: str | None = _DEFAULTS["key"]
    client_ca: str | None = _DEFAULTS["client_ca"]
    secret: str | None = _DEFAULTS["secret"]
    heartbeat: float = _DEFAULTS["heartbeat"]
    hello_timeout: float = _DEFAULTS["hello_timeout"]
    history_size: int = _DEFAULTS["history_size"]
    history_ttl: float = _DEFAULTS["history_ttl"]
    presence: bool = _DEFAULTS["presence"]
    presence_threshold: int = _DEFAULTS["presence_threshold"]
    presence_max: int = _DEFAULTS["presence_max"]
    presence_window: float = _DEFAULTS["presence_window"]
    max_room_members: int = _DEFAULTS["max_room_members"]
    max_rooms_per_connection: int = _DEFAULTS["max_rooms_per_connection"]
    max_rooms: int = _DEFAULTS["max_rooms"]
    history_max_bytes: int = _DEFAULTS["history_max_bytes"]
    history_reply_bytes: int = _DEFAULTS["history_reply_bytes"]
    rooms: RoomRules = _DEFAULTS["rooms"]
    max_errors: int = _DEFAULTS["max_errors"]
    rate_limit: int = _DEFAULTS["rate_limit"]
    token_algorithm: str = _DEFAULTS["token_algorithm"]
    public_key: str | None = _DEFAULTS["public_key"]
    app: str | None = _DEFAULTS["app"]
    hook_timeout: float = _DEFAULTS["hook_timeout"]
    admin_token: str | None = _DEFAULTS["admin_token"]
    closed_connections: int = _DEFAULTS["closed_connections"]
    broker: str = _DEFAULTS["broker"]
    workers: int = _DEFAULTS["workers"]
    blocking_threads: int = _DEFAULTS["blocking_threads"]
    reuse_port: bool = _DEFAULTS["reuse_port"]
    reuse_address: bool = _DEFAULTS["reuse_address"]
    backlog: int = _DEFAULTS["backlog"]
    udp_receive_buffer: int = _DEFAULTS["udp_receive_buffer"]
    nodelay: bool = _DEFAULTS["nodelay"]
    keepalive: bool = _DEFAULTS["keepalive"]
    handshake_timeout: float = _DEFAULTS["handshake_timeout"]
    idle_timeout: float = _DEFAULTS["idle_timeout"]
    drain_timeout: float = _DEFAULTS["drain_timeout"]
    close_timeout: float = _DEFAULTS["close_timeout"]
    max_connections: int = _DEFAULTS["max_connections"]
    max_connections_per_ip: int = _DEFAULTS["max_connections_per_ip"]
    max_udp_sessions: int = _DEFAULTS["max_udp_sessions"]
    max_frame: int = _DEFAULTS["max_frame"]
    send_buffer_low: int = _DEFAULTS["send_buffer_low"]
    send_buffer_high: int = _DEFAULTS["send_buffer_high"]
    max_send_buffer: int = _DEFAULTS["max_send_buffer"]
    slow_consumer: str = _DEFAULTS["slow_consumer"]
    allow: tuple[Network, ...] = _DEFAULTS["allow"]
    deny: tuple[Network, ...] = _DEFAULTS["deny"]
    proxy_protocol: tuple[Network, ...] = _DEFAULTS["proxy_protocol"]
    log_level: str = _DEFAULTS["log_level"]
    log_format: str = _DEFAULTS["log_format"]
    config_file: str | None = field(default=None)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied, each re-parsed and the whole
        re-checked (raises ConfigError).  Values may be typed (``max_frame=1024``)
        or in the TOML syntax (``max_frame="1KiB"``); None unsets an optional."""
        unknown = sorted(set(changes) - _FIELDS)
        if unknown:
            raise TypeError(f"Config has no field(s) {', '.join(unknown)}")
        parsed: dict[str, Any] = {}
        problems: list[Problem] = []
        bad: set[str] = set()
        for name, raw in changes.items():
            opt = _BY_NAME.get(name)
            if opt is None or (raw is None and opt.default is None):
                parsed[name] = raw
                continue
            try:
                parsed[name] = _parse(opt, raw, False)
            except _Invalid as exc:
                problems.append(Problem("replace", name, str(exc)))
                bad.add(name)
        new = dataclasses.replace(self, **parsed)
        problems += _cross_check({n: getattr(new, n) for n in _BY_NAME}, bad)
        if problems:
            raise ConfigError(problems)
        return new


_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))
if [f.name for f in dataclasses.fields(Config)] != [o.name for o in OPTIONS] + ["config_file"]:
    raise RuntimeError("wirehub.config: Config fields are out of step with OPTIONS")


# --------------------------------------------------------------------------
# cross-field rules: (options involved, check returning (key, message) pairs)


def _tls_pair(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    if v["cert"] and not v["key"]:
        return [("cert", "cert is set but key is not; TLS needs both cert and key")]
    if v["key"] and not v["cert"]:
        return [("key", "key is set but cert is not; TLS needs both cert and key")]
    return []


def _tls_users(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    if v["cert"] or v["key"]:  # both, or _tls_pair already reports the missing one
        return []
    out = [(n, f"{n} listeners need a certificate: set both cert and key") for n in ("tls", "wss") if v[n]]
    if v["client_ca"]:
        out.append(("client_ca", "client_ca (mutual TLS) needs cert and key to be set"))
    return out


def _buffers(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    low, high, top = v["send_buffer_low"], v["send_buffer_high"], v["max_send_buffer"]
    out = []
    if not low < high:
        out.append(("send_buffer_low", f"send_buffer_low ({format_size(low)}) must be less than "
                                       f"send_buffer_high ({format_size(high)})"))
    if not high <= top:
        out.append(("send_buffer_high", f"send_buffer_high ({format_size(high)}) must not exceed "
                                        f"max_send_buffer ({format_size(top)})"))
    return out


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses other machines cannot reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _admin_exposed(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    if v["admin_token"]:
        return []
    return [
        ("admin_token", f"the admin API on {format_addr(a)} is reachable from other machines: set admin_token "
                        "(clients then send Authorization: Bearer TOKEN) or bind --admin 127.0.0.1:PORT")
        for a in v["admin"] if not is_loopback(a[0])
    ]


def _token_keys(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    alg = v["token_algorithm"]
    if alg != "hs256" and not v["public_key"]:
        return [("public_key", f"token_algorithm {alg} verifies tokens with a public key: set public_key to its PEM file")]
    if alg == "hs256" and v["public_key"]:
        return [("public_key", "public_key is only used with token_algorithm rs256 or es256; HS256 tokens use secret")]
    return []


_RULES: tuple[tuple[frozenset[str], Callable[[Mapping[str, Any]], list[tuple[str, str]]]], ...] = (
    (frozenset({"cert", "key"}), _tls_pair),
    (frozenset({"cert", "key", "tls", "wss", "client_ca"}), _tls_users),
    (frozenset({"send_buffer_low", "send_buffer_high", "max_send_buffer"}), _buffers),
    (frozenset({"admin", "admin_token"}), _admin_exposed),
    (frozenset({"token_algorithm", "public_key"}), _token_keys),
)


def _cross_check(values: Mapping[str, Any], bad: set[str], origin: Mapping[str, str] | None = None) -> list[Problem]:
    origin = origin or {}
    return [
        Problem(origin.get(key, "config"), key, msg)
        for names, rule in _RULES
        if not names & bad
        for key, msg in rule(values)
    ]


# --------------------------------------------------------------------------
# loading

_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")
_KEY_RE = re.compile(r"""\s*(?:"([^"\\]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*[=.]""")
_HEADER_RE = re.compile(r"""\s*\[\[?\s*(?:"([^"\\]*)"|'([^']*)'|([A-Za-z0-9_-]+))""")


def _key_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key (or table header) as written."""
    lines: dict[str, int] = {}
    top_level = True
    for n, line in enumerate(text.splitlines(), 1):
        if m := _HEADER_RE.match(line):
            top_level = False
        elif not (top_level and (m := _KEY_RE.match(line))):
            continue
        lines.setdefault(next(g for g in m.groups() if g is not None), n)
    return lines


def _hint(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _read_file(path: str, problems: list[Problem]) -> list[tuple[str, str, Any]]:
    """-> [(where, key as written, raw value)], appending file-level problems."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        problems.append(Problem(path, "", f"cannot read config file: {exc.strerror or exc}"))
        return []
    try:
        text = data.decode("utf-8")
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        problems.append(Problem(path, "", f"config file is not UTF-8 text: {exc}"))
        return []
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS_RE.search(str(exc))
        problems.append(Problem(f"{path}:{m[1]}" if m else path, "", f"invalid TOML: {exc}"))
        return []
    lines = _key_lines(text)
    return [(f"{path}:{lines[k]}" if k in lines else path, k, v) for k, v in doc.items()]


def _not_given(raw: Any) -> bool:
    return raw is None or (isinstance(raw, (tuple, list)) and not raw)


def load(
    *,
    file: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from file < env < flags; raise ConfigError listing
    every problem found in every source.

    ``env`` defaults to ``os.environ``; only ``WIREHUB_*`` keys are read and
    ``WIREHUB_CONFIG`` names the file when ``file`` is None.  ``flags`` maps
    option names to raw values; None or an empty tuple/list means "not given".
    """
    env = os.environ if env is None else env
    flags = {} if flags is None else flags
    file = file or env.get(ENV_CONFIG) or None

    problems: list[Problem] = []
    values: dict[str, Any] = dict(_DEFAULTS)
    bad: set[str] = set()

    origin: dict[str, str] = {}  # option name -> where its value came from

    def apply(opt: Option, raw: Any, where: str, text: bool) -> None:
        try:
            values[opt.name] = _parse(opt, raw, text)
            origin[opt.name] = where
        except _Invalid as exc:
            problems.append(Problem(where, opt.name, str(exc)))
            bad.add(opt.name)

    if file:
        seen: dict[str, str] = {}
        for where, key, raw in _read_file(file, problems):
            name = key.replace("-", "_")
            opt = _BY_NAME.get(name)
            if opt is None:
                problems.append(Problem(where, key, "unknown option" + _hint(name, list(_BY_NAME))))
            elif name in seen:
                problems.append(Problem(where, key, f"given twice (also as {seen[name]!r})"))
            else:
                seen[name] = key
                apply(opt, raw, where, False)

    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in ENV_OTHER:
            continue
        opt = _BY_ENV.get(var)
        if opt is None:
            # A near miss of an option's variable is surely a typo; anything else may belong
            # to some other tool and is left alone.
            hint = _hint(var, list(_BY_ENV))
            if hint:
                problems.append(Problem(f"env {var}", var, "unknown environment variable" + hint))
        else:
            apply(opt, env[var], f"env {var}", True)

    for name, raw in flags.items():
        if _not_given(raw):
            continue
        opt = _BY_NAME.get(name.replace("-", "_"))
        if opt is None:
            problems.append(Problem(f"flag --{name.replace('_', '-')}", name,
                                    "unknown option" + _hint(name, list(_BY_NAME))))
        else:
            apply(opt, raw, f"flag {opt.flag}", True)

    problems += _cross_check(values, bad, origin)
    if problems:
        raise ConfigError(problems)
    return Config(**values, config_file=file)


def check_file(path: str) -> list[Problem]:
    """Validate one config file on its own (no env, no flags); [] when valid."""
    try:
        load(file=path, env={}, flags={})
    except ConfigError as exc:
        return exc.problems
    return []


# --------------------------------------------------------------------------
# click integration


def click_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config FILE`` and one flag per OPTIONS entry (in table order).

    Every flag has ``default=None`` (lists: ``()``) so "not given" is visible;
    values stay raw strings (bools: True/False) for :func:`load` to parse.
    """
    import click

    for opt in reversed(OPTIONS):
        extra = " Repeatable; 'off' for none." if opt.is_list else ""
        help_text = f"{opt.help}{extra} [default: {opt.default_text}]"
        if opt.kind == "bool":
            decl = f"{opt.flag}/--no-{opt.flag[2:]}"
            func = click.option(decl, opt.name, default=None, help=help_text)(func)
        else:
            func = click.option(
                opt.flag, opt.name, type=str, default=None, multiple=opt.is_list,
                metavar=opt.shown_metavar, help=help_text,
            )(func)
    return click.option(
        "--config", "config", metavar="FILE", default=None, type=str,
        help=f"TOML config file (also ${ENV_CONFIG}). Precedence: flags > {ENV_PREFIX}* env > file.",
    )(func)


def flags_from_click(params: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Split click's parameters into (config file, flags for :func:`load`),
    keeping only the options actually given; other parameters are ignored."""
    flags = {o.name: params[o.name] for o in OPTIONS if o.name in params and not _not_given(params[o.name])}
    return params.get("config") or None, flags
