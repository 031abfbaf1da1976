"""The chat's tables, in SQLite (the default: a file, no setup) or PostgreSQL (a URL).

::

    users    (name, display_name)              who may connect, and the name others see
    rooms    (name, public)                    which rooms exist; anyone may join a public one
    members  (room, user_name)                 who may join a private room
    messages (id, room, user_name, display_name, text, ts)

The SQL is written once, with PostgreSQL's ``$1`` placeholders; SQLite reads the same
statements with ``?1`` (numbered parameters), psycopg with ``%s`` (:func:`pyformat`). No ORM.

SQLite runs in one thread of its own, with one connection: ``sqlite3`` blocks, and a
connection is not for concurrent use, so every statement of a process queues for that thread
(SQLite writes one at a time anyway) while the event loop goes on. PostgreSQL goes through a
pool of at most :data:`POOL_SIZE` ``psycopg`` (3) async connections per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterable
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

try:
    import psycopg  # the chat extra: PostgreSQL only
except ImportError:
    psycopg = None

#: PostgreSQL connections per hub process (each worker of ``--workers N`` has its own pool)
POOL_SIZE = 10
#: seconds a new PostgreSQL connection may take (a ``connect_timeout`` in the URL wins)
CONNECT_TIMEOUT = 60
#: the longest display name: the hub's limit for a connection's name
MAX_DISPLAY_NAME = 64
#: messages kept per room: past it the oldest are deleted, so that what clients can make the
#: database hold is bounded (rooms are the admin's: rooms x MAX_STORED x MAX_TEXT at most).
#: A process trims a room on its first message there, then every TRIM_EVERY messages it
#: stores in it: a room holds at most MAX_STORED + TRIM_EVERY - 1 per process storing in it.
MAX_STORED = 10_000
TRIM_EVERY = 100

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, display_name TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, public BOOLEAN NOT NULL DEFAULT FALSE)",
    """CREATE TABLE IF NOT EXISTS members (
        room TEXT NOT NULL REFERENCES rooms (name) ON DELETE CASCADE,
        user_name TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        PRIMARY KEY (room, user_name))""",
    """CREATE TABLE IF NOT EXISTS messages (
        id {id} PRIMARY KEY,
        room TEXT NOT NULL,
        user_name TEXT NOT NULL,
        display_name TEXT NOT NULL,
        text TEXT NOT NULL,
        ts BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id)",
]

#: what a new database starts with, so that the example runs at once: three users, a public
#: lobby, and a private room for alice and bob
SEED_USERS = [("alice", "Alice Liddell"), ("bob", "Bob Dylan"), ("carol", "Carol Shaw")]
SEED_ROOMS = [("lobby", True, []), ("team", False, ["alice", "bob"])]

DISPLAY_NAME = "SELECT display_name FROM users WHERE name = $1"
# NULL: no such room; FALSE: the room is private and the user is not a member
MAY_JOIN = """SELECT public OR EXISTS (SELECT 1 FROM members WHERE room = $1 AND user_name = $2)
              FROM rooms WHERE name = $1"""
ADD_USER = "INSERT INTO users (name, display_name) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET display_name = $2"
ADD_ROOM = "INSERT INTO rooms (name, public) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET public = $2"
ADD_MEMBER = "INSERT INTO members (room, user_name) VALUES ($1, $2) ON CONFLICT DO NOTHING"
ADD_MESSAGE = """INSERT INTO messages (room, user_name, display_name, text, ts) VALUES ($1, $2, $3, $4, $5)
                 RETURNING id"""
# The newest $2 messages of room $1 before id $3 whose text contains $4 (a LIKE pattern),
# oldest first. The search scans the room's messages: for big rooms, use PostgreSQL's
# full-text search or a pg_trgm index instead.
MESSAGES = """SELECT id, user_name, display_name, text, ts FROM (
                  SELECT * FROM messages WHERE room = $1 AND id < $3 AND lower(text) LIKE lower($4) ESCAPE '\\'
                  ORDER BY id DESC LIMIT $2) AS newest
              ORDER BY id"""
# the oldest messages of room $1 beyond the newest $2
TRIM = """DELETE FROM messages WHERE room = $1 AND id <= (
              SELECT id FROM messages WHERE room = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)"""
NO_ID_LIMIT = 2**62  # "before" when none is given: after every id


_NUMBERED = re.compile(r"\$(\d+)")


def pyformat(sql: str, args: tuple[Any, ...]) -> tuple[str, list[Any]]:
    """``sql`` and ``args`` for psycopg: each ``$N`` becomes ``%s``, its argument put in that
    place (``$1`` twice: the first argument twice), and a literal ``%`` becomes ``%%``."""
    order = [int(n) - 1 for n in _NUMBERED.findall(sql)]
    return _NUMBERED.sub("%s", sql.replace("%", "%%")), [args[i] for i in order]


def like_pattern(text: str) -> str:
    """A LIKE pattern that matches ``text`` anywhere, ``%`` and ``_`` in it taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Store:
    """The queries, on whichever database :meth:`_fetch` runs them."""

    #: messages kept per room, and how often this process trims a room (tests lower them)
    max_stored = MAX_STORED
    trim_every = TRIM_EVERY
    def __init__(self) -> None:
        #: room -> messages this process stored there since it last trimmed it (rooms are the admin's)
        self._since_trim: dict[str, int] = {}

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        """The rows ``sql`` returns (sequences of column values)."""
        raise NotImplementedError

    async def _setup(self, statements: list[str]) -> None:
        """Run ``statements`` once, as one transaction."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def setup(self, id_type: str) -> None:
        """Create the tables when missing; seed a database that has no user yet."""
        await self._setup([sql.format(id=id_type) for sql in SCHEMA])
        if not await self._fetch("SELECT 1 FROM users LIMIT 1"):
            for name, display_name in SEED_USERS:
                await self.add_user(name, display_name)
            for room, public, members in SEED_ROOMS:
                await self.add_room(room, public=public, members=members)

    async def add_user(self, name: str, display_name: str) -> None:
        if not 0 < len(display_name) <= MAX_DISPLAY_NAME:
            raise ValueError(f"a display name is 1 to {MAX_DISPLAY_NAME} characters, got {display_name!r}")
        await self._fetch(ADD_USER, name, display_name)

    async def add_room(self, name: str, *, public: bool = False, members: Iterable[str] = ()) -> None:
        await self._fetch(ADD_ROOM, name, public)
        for user in members:
            await self._fetch(ADD_MEMBER, name, user)

    async def display_name(self, user: str) -> str | None:
        """``user``'s display name, or None when there is no such user."""
        rows = await self._fetch(DISPLAY_NAME, user)
        return rows[0][0] if rows else None

    async def may_join(self, user: str, room: str) -> bool | None:
        """Whether ``user`` may join ``room``; None when there is no such room."""
        rows = await self._fetch(MAY_JOIN, room, user)
        return bool(rows[0][0]) if rows else None

    async def add_message(self, room: str, user: str, display_name: str, text: str, ts: int) -> int:
        """Store a message; its id (ids rise in the order messages are stored). The room's
        oldest messages beyond :attr:`max_stored` go (see :data:`MAX_STORED`)."""
        rows = await self._fetch(ADD_MESSAGE, room, user, display_name, text, ts)
        since = self._since_trim.get(room, 0)
        if since == 0:
            await self._fetch(TRIM, room, self.max_stored)
        self._since_trim[room] = (since + 1) % self.trim_every
        return rows[0][0]

    async def messages(self, room: str, limit: int, *, before: int | None = None, contains: str = "") -> list[dict[str, Any]]:
        """The newest ``limit`` messages of ``room`` (with an id below ``before``, with
        ``contains`` in their text, case-insensitively), oldest first."""
        before = NO_ID_LIMIT if before is None else before
        rows = await self._fetch(MESSAGES, room, limit, before, like_pattern(contains))
        return [{"id": r[0], "user": r[1], "name": r[2], "text": r[3], "ts": r[4]} for r in rows]


class SqliteStore(Store):
    """The tables in a SQLite file, through one connection in one thread of its own."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chat-sqlite")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: str) -> SqliteStore:
        store = cls(path)
        await store.setup("INTEGER")  # an INTEGER PRIMARY KEY is the rowid: it rises by itself
        return store

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; _setup opens a transaction
            db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for the writer (--workers N)
            db.execute("PRAGMA busy_timeout = 5000")  # another process's write: wait, do not fail
            db.execute("PRAGMA foreign_keys = ON")
            self._db = db
        return self._db

    def _run(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        return self._connect().execute(sql.replace("$", "?"), args).fetchall()

    def _run_all(self, statements: list[str]) -> None:
        db = self._connect()
        with db:  # one transaction
            db.execute("BEGIN")
            for sql in statements:
                db.execute(sql)

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, sql, args)

    async def _setup(self, statements: list[str]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._run_all, statements)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown()


def postgres_conninfo(url: str) -> tuple[str, dict[str, str]]:
    """The URL for libpq and its connection settings. A query parameter that libpq does not
    know (``?search_path=chat``) is a server setting, sent as ``options=-c search_path=chat``."""
    known = {d.keyword.decode() for d in psycopg.pq.Conninfo.get_defaults()}
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in params if k in known and k != "options"]
    options = [v for k, v in params if k == "options"]
    for k, v in params:
        if k not in known:
            value = v.replace("\\", "\\\\").replace(" ", "\\ ")  # libpq's escapes in options
            options.append(f"-c {k}={value}")
    kwargs = {"options": " ".join(options)} if options else {}
    if "connect_timeout" not in dict(kept):
        kwargs["connect_timeout"] = str(CONNECT_TIMEOUT)
    return urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote))), kwargs


class ConnectionPool:
    """At most ``size`` psycopg async connections (autocommit), opened when needed and
    kept for the next caller; a caller waits while all are busy. A connection that comes back
    broken or inside a transaction (a cancelled query) is closed, not kept."""

    def __init__(self, url: str, size: int) -> None:
        self._conninfo, self._kwargs = postgres_conninfo(url)
        self._idle: list[Any] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        if self._closed:
            raise RuntimeError("the chat store's PostgreSQL pool is closed: open a new store")
        async with self._slots:
            db = self._idle.pop() if self._idle else None
            if db is None:
                db = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, **self._kwargs)
            try:
                yield db
            finally:
                if self._closed or db.closed or db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    await db.close()
                else:
                    self._idle.append(db)

    async def close(self) -> None:
        """Close the idle connections now, the busy ones as they come back."""
        self._closed = True
        while self._idle:
            await self._idle.pop().close()


class PostgresStore(Store):
    """The tables in PostgreSQL, through a psycopg pool. Settings in the URL's query
    (``?search_path=chat``) apply to every connection."""

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__()
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        if psycopg is None:
            raise RuntimeError("a postgresql:// database needs psycopg: pip install -e '.[chat]'")
        store = cls(ConnectionPool(url, POOL_SIZE))
        try:
            await store.setup("BIGINT GENERATED ALWAYS AS IDENTITY")
        except BaseException:
            await store.close()
            raise
        return store

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        query, params = pyformat(sql, args)
        async with self._pool.connection() as db:
            cursor = await db.execute(query, params)
            return await cursor.fetchall() if cursor.description is not None else []

    async def _setup(self, statements: list[str]) -> None:
        async with self._pool.connection() as db, db.transaction():
            # several processes (workers, nodes) may start at once: one creates, the others wait
            await db.execute("SELECT pg_advisory_xact_lock(hashtext('wirehub chat_app schema'))")
            for sql in statements:
                await db.execute(sql)

    async def close(self) -> None:
        await self._pool.close()


async def open_store(database: str) -> Store:
    """``postgresql://...`` (or ``postgres://``): PostgreSQL; anything else is the path of a
    SQLite file (created when missing)."""
    if database.startswith(("postgresql://", "postgres://")):
        return await PostgresStore.open(database)
    return await SqliteStore.open(database)
