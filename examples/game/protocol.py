"""The game's wire format: binary messages, the same over UDP datagrams and WebSocket binary
messages. Sans-I/O: bytes in, values out, and back; no sockets, no asyncio, no wirehub.

Every integer is little-endian. Positions travel quantized to 1/8 of a world unit (u16, so a
world is at most 8,191 units wide). Decoders never raise on peer input: a message that does
not decode comes back as :class:`Bad` with the reason. The layout of every message is in
``examples/game/README.md`` ("Protocol"); the constants below are its numbers.

Snapshots are delta-encoded as in Quake 3 (and Source): the server keeps the last
:data:`SNAPSHOT_RING` snapshots it sent each client; a client acknowledges the newest
snapshot it decoded (in every input); the next snapshot only carries the entities that
changed since that one, and the ids of those that left the client's view. A client that
acknowledged nothing the server still holds gets a full snapshot (base 0).
"""

from __future__ import annotations

import struct
from typing import Iterable, NamedTuple

VERSION = 1

# client -> server
HELLO = 0x01
INPUT = 0x02
BYE = 0x03
# server -> client
CHALLENGE = 0x11
WELCOME = 0x12
SNAPSHOT = 0x13
BOARD = 0x14
NAMES = 0x15
ERROR = 0x1F

#: no message the server sends is larger (snapshots are capped well below it: see MAX_SNAPSHOT)
MAX_DATAGRAM = 1200
#: a HELLO is padded to at least this size, so that the 23-byte challenge that may answer it
#: from an address without a session is within the 3x anti-reflection budget
HELLO_MIN = 32
#: bytes of UTF-8 in a player's name
MAX_NAME = 16
#: movement commands in one INPUT (the newest last): the redundancy that survives loss
MAX_CMDS = 4
#: positions on the wire are in 1/POS_SCALE world units
POS_SCALE = 8
#: entity ids with this bit set are pellets; the others (1..32767) are players
PELLET_BIT = 0x8000
#: snapshots the server keeps per client as delta bases, and a client keeps to decode deltas
SNAPSHOT_RING = 16
#: players and pellets in one snapshot at most (area of interest, then this cap)
MAX_VIEW_PLAYERS = 48
MAX_VIEW_PELLETS = 48
#: entries of a leaderboard
BOARD_SIZE = 5
#: entries of one NAMES message (each at most 19 bytes: it stays under MAX_DATAGRAM)
MAX_NAMES = 60

_HELLO_HEAD = struct.Struct("<BBB")  # type, version, cookie length (then cookie, name length, name)
_INPUT_HEAD = struct.Struct("<BIIIB")  # type, session token, ack tick, seq of the newest command, command count
_BYE = struct.Struct("<BI")  # type, session token
_CMD = struct.Struct("<hh")  # vx, vy: wanted velocity in world units per second
_SNAP_HEAD = struct.Struct("<BIIIBB")  # type, tick, base tick, last applied input seq, removed, records
PLAYER = struct.Struct("<HHHH")  # id, x, y, score
PELLET = struct.Struct("<HHH")  # id, x, y
_WELCOME = struct.Struct("<BBHIBHHBBHHB")  # type, version, player, session token, ... obstacle count
_RECT = struct.Struct("<HHHH")
_BOARD_HEAD = struct.Struct("<BHB")  # type, players in the game, entries
_BOARD_ENTRY = struct.Struct("<HHB")  # id, score, name length (then the name)

#: the largest snapshot: a header, every entity of the previous view removed, every entity of
#: the new one sent whole
MAX_SNAPSHOT = _SNAP_HEAD.size + 2 * (MAX_VIEW_PLAYERS + MAX_VIEW_PELLETS) + PLAYER.size * MAX_VIEW_PLAYERS + PELLET.size * MAX_VIEW_PELLETS
assert MAX_SNAPSHOT <= MAX_DATAGRAM


# ------------------------------------------------------------------------------ values


class Bad(NamedTuple):
    """A message that does not decode, and why."""

    reason: str


class Hello(NamedTuple):
    name: str
    cookie: bytes


class Input(NamedTuple):
    token: int  # the session's token, from its WELCOME
    ack: int  # the newest snapshot tick the client decoded (0: none)
    seq: int  # the sequence number of the last command; the others are seq-1, seq-2...
    cmds: tuple[tuple[int, int], ...]  # (vx, vy) in world units per second, oldest first


class Bye(NamedTuple):
    token: int


class Rect(NamedTuple):
    x: int
    y: int
    w: int
    h: int


class Welcome(NamedTuple):
    player: int
    tick_hz: int
    width: int
    height: int
    radius: int
    pellet_radius: int
    max_speed: int
    view: int  # the side of an area-of-interest cell: a client sees at least this far around it
    obstacles: tuple[Rect, ...]
    #: the session's secret: INPUT and BYE carry it back, so that a datagram with a forged
    #: source address (which never saw the WELCOME) moves, closes and earns nothing
    token: int = 0


class Snapshot(NamedTuple):
    tick: int
    base: int  # 0: a full snapshot; else the tick of the snapshot this is a delta against
    ack: int  # the last input seq the server applied for this client
    removed: tuple[int, ...]
    records: tuple[tuple[int, tuple[int, ...]], ...]  # (id, fields): players (x, y, score), pellets (x, y)


class Board(NamedTuple):
    players: int
    top: tuple[tuple[int, int, str], ...]  # (id, score, name), best first


class Names(NamedTuple):
    names: tuple[tuple[int, str], ...]  # (id, name) of players the client sees


# ------------------------------------------------------------------------------ client -> server


def encode_hello(name: str, cookie: bytes = b"") -> bytes:
    raw = clean_name(name).encode()[:MAX_NAME]
    data = _HELLO_HEAD.pack(HELLO, VERSION, len(cookie)) + cookie + bytes((len(raw),)) + raw
    return data.ljust(HELLO_MIN, b"\0")


def encode_input(token: int, ack: int, seq: int, cmds: Iterable[tuple[int, int]]) -> bytes:
    cmds = list(cmds)[-MAX_CMDS:]
    return _INPUT_HEAD.pack(INPUT, token, ack, seq, len(cmds)) + b"".join(_CMD.pack(vx, vy) for vx, vy in cmds)


def encode_bye(token: int) -> bytes:
    return _BYE.pack(BYE, token)


def clean_name(name: str) -> str:
    """A name without control characters, at most MAX_NAME bytes of UTF-8 (cut at a character)."""
    text = "".join(ch for ch in name if ch.isprintable()).strip()
    while len(text.encode()) > MAX_NAME:
        text = text[:-1]
    return text


def decode_client(data: bytes) -> Hello | Input | Bye | Bad:
    """One message from a client. Never raises."""
    if not data:
        return Bad("empty message")
    kind = data[0]
    if kind == INPUT:
        if len(data) < _INPUT_HEAD.size:
            return Bad(f"INPUT of {len(data)} bytes is shorter than its {_INPUT_HEAD.size}-byte header")
        _, token, ack, seq, n = _INPUT_HEAD.unpack_from(data)
        if not 1 <= n <= MAX_CMDS:
            return Bad(f"INPUT carries {n} commands; send 1 to {MAX_CMDS}")
        if len(data) != _INPUT_HEAD.size + n * _CMD.size:
            return Bad(f"INPUT with {n} commands must be {_INPUT_HEAD.size + n * _CMD.size} bytes, got {len(data)}")
        if seq < n:
            return Bad("INPUT sequence numbers start at 1")
        cmds = tuple(_CMD.iter_unpack(memoryview(data)[_INPUT_HEAD.size:]))
        return Input(token, ack, seq, cmds)
    if kind == HELLO:
        return _decode_hello(data)
    if kind == BYE:
        if len(data) != _BYE.size:
            return Bad(f"BYE must be {_BYE.size} bytes (its type and the session token), got {len(data)}")
        return Bye(_BYE.unpack(data)[1])
    return Bad(f"unknown message type 0x{kind:02x}")


def _decode_hello(data: bytes) -> Hello | Bad:
    if len(data) < HELLO_MIN:
        return Bad(f"HELLO must be padded to at least {HELLO_MIN} bytes, got {len(data)}")
    _, version, n_cookie = _HELLO_HEAD.unpack_from(data)
    if version != VERSION:
        return Bad(f"protocol version {version} is not supported; this server speaks {VERSION}")
    at = _HELLO_HEAD.size
    cookie = bytes(data[at:at + n_cookie])
    at += n_cookie
    if at >= len(data):
        return Bad("HELLO ends before its name")
    n_name = data[at]
    raw = data[at + 1:at + 1 + n_name]
    if n_name > MAX_NAME or len(raw) != n_name:
        return Bad(f"HELLO's name must be at most {MAX_NAME} bytes and inside the message")
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        return Bad("HELLO's name is not UTF-8")
    return Hello(clean_name(name), cookie)


def hello_cookie(data: bytes) -> bytes | None:
    """The cookie a HELLO echoes, or None (for the UDP listener's address validation)."""
    if len(data) < HELLO_MIN or data[0] != HELLO:
        return None
    n = data[2]
    return bytes(data[3:3 + n]) if n else None


# ------------------------------------------------------------------------------ server -> client


def encode_challenge(cookie: bytes) -> bytes:
    return bytes((CHALLENGE,)) + cookie


def encode_welcome(w: Welcome) -> bytes:
    head = _WELCOME.pack(WELCOME, VERSION, w.player, w.token, w.tick_hz, w.width, w.height, w.radius, w.pellet_radius, w.max_speed, w.view, len(w.obstacles))
    return head + b"".join(_RECT.pack(*r) for r in w.obstacles)


def encode_board(board: Board) -> bytes:
    parts = [_BOARD_HEAD.pack(BOARD, min(board.players, 0xFFFF), len(board.top))]
    for pid, score, name in board.top:
        raw = name.encode()[:MAX_NAME]
        parts.append(_BOARD_ENTRY.pack(pid, min(score, 0xFFFF), len(raw)) + raw)
    return b"".join(parts)


def encode_names(names: Iterable[tuple[int, str]]) -> bytes:
    parts = []
    for pid, name in names:
        raw = name.encode()[:MAX_NAME]
        parts.append(struct.pack("<HB", pid, len(raw)) + raw)
    return bytes((NAMES, len(parts))) + b"".join(parts)


def encode_error(code: str, message: str) -> bytes:
    return bytes((ERROR,)) + f"{code}: {message}".encode()[:200]


def player_record(pid: int, x: float, y: float, score: int) -> bytes:
    return PLAYER.pack(pid, int(x * POS_SCALE + 0.5), int(y * POS_SCALE + 0.5), min(score, 0xFFFF))


def pellet_record(pid: int, x: float, y: float) -> bytes:
    return PELLET.pack(pid | PELLET_BIT, int(x * POS_SCALE + 0.5), int(y * POS_SCALE + 0.5))


class View:
    """What one snapshot shows: entity ids and their packed records (the id included), in
    the same order. The server builds one per area-of-interest cell per tick and shares it
    among the clients there; the sets and the delta bodies are computed once, on demand."""

    __slots__ = ("ids", "recs", "_id_set", "_rec_set", "_bodies")

    def __init__(self, ids: tuple[int, ...], recs: tuple[bytes, ...]) -> None:
        self.ids = ids
        self.recs = recs
        self._id_set: frozenset[int] | None = None
        self._rec_set: frozenset[bytes] | None = None
        self._bodies: dict[int, tuple[int, int, bytes]] = {}

    def body(self, base: View | None) -> tuple[int, int, bytes]:
        """(removed count, record count, bytes) of this view as a delta against ``base``
        (everything when ``base`` is None)."""
        key = id(base)
        found = self._bodies.get(key)
        if found is not None:
            return found
        if base is None:
            body = (0, len(self.recs), b"".join(self.recs))
        else:
            base_recs = base._rec_set
            if base_recs is None:
                base_recs = base._rec_set = frozenset(base.recs)
            ids = self._id_set
            if ids is None:
                ids = self._id_set = frozenset(self.ids)
            removed = [i for i in base.ids if i not in ids]
            changed = [r for r in self.recs if r not in base_recs]
            body = (len(removed), len(changed), struct.pack(f"<{len(removed)}H", *removed) + b"".join(changed))
        self._bodies[key] = body
        return body

    def release(self) -> None:
        """Forget the delta bodies (the server calls it when the tick's snapshots are sent:
        the keys are the ids of views that may be freed afterwards)."""
        self._bodies.clear()


def encode_snapshot(tick: int, ack: int, view: View, base: View | None = None, base_tick: int = 0) -> bytes:
    """The snapshot of ``view`` at ``tick``, as a delta against ``base`` (sent at ``base_tick``,
    and acknowledged by the client), or whole."""
    n_removed, n_records, body = view.body(base)
    return _SNAP_HEAD.pack(SNAPSHOT, tick, base_tick if base is not None else 0, ack, n_removed, n_records) + body


def state_of(view: View) -> dict[int, tuple[int, ...]]:
    """The decoded state a client holds after this view (for tests and the server's own use)."""
    return {pid: fields for pid, fields in _records(b"".join(view.recs), 0, len(view.recs))[0]}


# ------------------------------------------------------------------------------ client side decoding


def decode_server(data: bytes) -> Snapshot | Welcome | Board | Names | bytes | str | Bad:
    """One message from the server: a Snapshot, Welcome, Board or Names; the cookie of a CHALLENGE
    (bytes); the text of an ERROR (str); or Bad. Never raises."""
    if not data:
        return Bad("empty message")
    kind = data[0]
    try:
        if kind == SNAPSHOT:
            return decode_snapshot(data)
        if kind == CHALLENGE:
            return bytes(data[1:])
        if kind == WELCOME:
            fields = _WELCOME.unpack_from(data)
            n = fields[-1]
            rects = tuple(Rect(*_RECT.unpack_from(data, _WELCOME.size + i * _RECT.size)) for i in range(n))
            if fields[1] != VERSION:
                return Bad(f"the server speaks protocol version {fields[1]}, this client {VERSION}")
            return Welcome(fields[2], *fields[4:-1], obstacles=rects, token=fields[3])
        if kind == BOARD:
            _, players, n = _BOARD_HEAD.unpack_from(data)
            at, top = _BOARD_HEAD.size, []
            for _ in range(n):
                pid, score, n_name = _BOARD_ENTRY.unpack_from(data, at)
                at += _BOARD_ENTRY.size
                top.append((pid, score, bytes(data[at:at + n_name]).decode(errors="replace")))
                at += n_name
            return Board(players, tuple(top))
        if kind == NAMES:
            at, names = 2, []
            for _ in range(data[1]):
                pid, n_name = struct.unpack_from("<HB", data, at)
                names.append((pid, bytes(data[at + 3:at + 3 + n_name]).decode(errors="replace")))
                at += 3 + n_name
            return Names(tuple(names))
        if kind == ERROR:
            return bytes(data[1:]).decode(errors="replace")
    except (struct.error, IndexError) as exc:
        return Bad(f"message type 0x{kind:02x} is cut short: {exc}")
    return Bad(f"unknown message type 0x{kind:02x}")


def decode_snapshot(data: bytes) -> Snapshot | Bad:
    if len(data) < _SNAP_HEAD.size:
        return Bad("snapshot shorter than its header")
    _, tick, base, ack, n_removed, n_records = _SNAP_HEAD.unpack_from(data)
    at = _SNAP_HEAD.size
    if len(data) < at + 2 * n_removed:
        return Bad("snapshot cut short in its removed ids")
    removed = struct.unpack_from(f"<{n_removed}H", data, at)
    records, end = _records(data, at + 2 * n_removed, n_records)
    if end != len(data):
        return Bad(f"snapshot of {len(data)} bytes holds {end} bytes of records")
    return Snapshot(tick, base, ack, removed, tuple(records))


def _records(data: bytes, at: int, n: int) -> tuple[list[tuple[int, tuple[int, ...]]], int]:
    """n entity records from ``at``; the end offset is past the data when they do not fit."""
    out = []
    size = len(data)
    for _ in range(n):
        if at + 2 > size:
            return out, size + 1
        pid = data[at] | data[at + 1] << 8
        layout = PELLET if pid & PELLET_BIT else PLAYER
        if at + layout.size > size:
            return out, size + 1
        fields = layout.unpack_from(data, at)
        out.append((pid, fields[1:]))
        at += layout.size
    return out, at


def apply_snapshot(base: dict[int, tuple[int, ...]] | None, snap: Snapshot) -> dict[int, tuple[int, ...]] | Bad:
    """The state ``snap`` describes, given the state of its base snapshot (None for a full one)."""
    if snap.base == 0:
        state: dict[int, tuple[int, ...]] = {}
    elif base is None:
        return Bad(f"snapshot {snap.tick} is a delta against {snap.base}, which this client does not hold")
    else:
        state = dict(base)
    for pid in snap.removed:
        if state.pop(pid, None) is None:
            return Bad(f"snapshot {snap.tick} removes entity {pid}, which its base does not hold")
    for pid, fields in snap.records:
        state[pid] = fields
    return state
