"""Each document's Yjs state, kept with pycrdt and stored: SQLite (a file, no setup) by default,
PostgreSQL (psycopg 3) for a ``postgresql://`` URL.

A document is a log of Yjs updates (``collab_updates``) and a row of totals (``collab_docs``).
An update is appended as it arrives, in one short transaction; once a document has
``compact_after`` of them they are merged, through a pycrdt ``Doc``, into one update of the
whole state (deleted text garbage-collected). A sync reads the document's rows, builds the
``Doc`` and answers with the part of its state the client lacks.

Every node of a fleet appends to and reads from the same database, so the document is the same
whichever node a client reaches (the row of totals is locked while a document is appended to
or compacted, so no update is lost to a concurrent compaction). The calls block: the hooks run
them in the hub's thread pool (``blocking=True``).
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from pycrdt import Doc, Text, get_state

#: Largest stored state of one document, in bytes. A sync reply carries the whole document in
#: one frame (base64: 4/3 of this), and it must fit in the connection's --max-send-buffer (1 MiB).
MAX_DOC_BYTES = 512 * 1024
#: Updates a document collects before they are merged into one.
COMPACT_AFTER = 200
#: Documents the store holds at most: anyone who may publish to ``doc:*`` creates one by
#: writing to a new name, so this bounds what clients can make the store hold (MAX_DOCS x
#: MAX_DOC_BYTES, 512 MiB). Nodes creating documents at the same moment may pass it by as
#: many as they create at once.
MAX_DOCS = 1000


class StoreLimit(Exception):
    """An update the store refuses for a limit (the hooks answer ``limit``)."""


class DocTooLarge(StoreLimit):
    """An update would take a document past ``max_doc_bytes``."""


class TooManyDocs(StoreLimit):
    """An update would create a document past ``max_docs``."""


def check_update(update: bytes) -> None:
    """Raise ValueError unless ``update`` decodes as a Yjs update (v1 encoding)."""
    get_state(update)  # decodes every struct and the delete set: ValueError on anything else


def check_state_vector(state: bytes) -> None:
    """Raise ValueError unless ``state`` decodes as a Yjs state vector."""
    Doc().get_update(state)


_SCHEMA = {
    "sqlite": (
        "CREATE TABLE IF NOT EXISTS collab_docs (name TEXT PRIMARY KEY, bytes INTEGER NOT NULL, updates INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS collab_updates (id INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL, data BLOB NOT NULL)",
        "CREATE INDEX IF NOT EXISTS collab_updates_doc ON collab_updates (doc, id)",
    ),
    "postgres": (
        "CREATE TABLE IF NOT EXISTS collab_docs (name TEXT PRIMARY KEY, bytes BIGINT NOT NULL, updates INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS collab_updates (id BIGSERIAL PRIMARY KEY, doc TEXT NOT NULL, data BYTEA NOT NULL)",
        "CREATE INDEX IF NOT EXISTS collab_updates_doc ON collab_updates (doc, id)",
    ),
}


class DocStore:
    """The documents in the database at ``url``: a file path (SQLite) or ``postgresql://...``.

    The connection opens on first use. One connection per process, used by one thread at a
    time (a lock): each call is a few short statements."""

    def __init__(self, url: str, *, max_doc_bytes: int = MAX_DOC_BYTES, compact_after: int = COMPACT_AFTER,
                 max_docs: int = MAX_DOCS) -> None:
        self.url = url
        self.kind = "postgres" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self.max_doc_bytes = max_doc_bytes
        self.max_docs = max_docs
        self.compact_after = compact_after
        self._db: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the database

    def _connect(self) -> Any:
        if self._db is None:
            if self.kind == "postgres":
                import psycopg  # the collab extra: psycopg[binary]

                db = psycopg.connect(self.url, connect_timeout=5)
            else:
                db = sqlite3.connect(self.url, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA busy_timeout=5000")  # another process on the same file
            for statement in _SCHEMA[self.kind]:
                db.execute(statement)
            db.commit()
            self._db = db
        return self._db

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s") if self.kind == "postgres" else query

    def _run(self, fn: Any, *args: Any) -> Any:
        """fn(execute, *args) in one transaction, the document's row locked (serialised)."""
        with self._lock:
            db = self._connect()
            if self.kind == "sqlite":
                db.execute("BEGIN IMMEDIATE")  # takes the write lock now: no upgrade deadlock
            try:
                result = fn(lambda q, params=(): db.execute(self._sql(q), params), *args)
            except BaseException:
                try:
                    db.rollback()
                except Exception:  # a broken connection: the next call opens a new one
                    pass
                if getattr(db, "closed", False):
                    self._db = None
                raise
            db.commit()
            return result

    def _lock_doc(self, execute: Any, name: str) -> tuple[int, int]:
        execute("INSERT INTO collab_docs (name, bytes, updates) VALUES (?, 0, 0) ON CONFLICT (name) DO NOTHING", (name,))
        lock = " FOR UPDATE" if self.kind == "postgres" else ""
        return tuple(execute("SELECT bytes, updates FROM collab_docs WHERE name = ?" + lock, (name,)).fetchone())

    # ------------------------------------------------------------------ documents

    def append(self, name: str, update: bytes) -> None:
        """Store a (checked) update of document ``name``; DocTooLarge past ``max_doc_bytes``,
        TooManyDocs when ``name`` is new and the store holds ``max_docs`` already."""
        size, count = self._run(self._append, name, update, False)
        if size > self.max_doc_bytes:  # the log may hold much that merging drops: merge, then judge
            self._run(self._compact, name)
            self._run(self._append, name, update, True)
        elif count >= self.compact_after:
            self._run(self._compact, name)

    def _append(self, execute: Any, name: str, update: bytes, final: bool) -> tuple[int, int]:
        if execute("SELECT 1 FROM collab_docs WHERE name = ?", (name,)).fetchone() is None:
            (docs,) = execute("SELECT count(*) FROM collab_docs").fetchone()
            if docs >= self.max_docs:
                raise TooManyDocs(f"the store holds {self.max_docs} documents (MAX_DOCS): write to an existing one")
        size, count = self._lock_doc(execute, name)
        if size + len(update) > self.max_doc_bytes:
            if final:
                raise DocTooLarge(f"document {name!r} would exceed {self.max_doc_bytes} bytes (MAX_DOC_BYTES)")
            return size + len(update), count
        execute("INSERT INTO collab_updates (doc, data) VALUES (?, ?)", (name, update))
        execute("UPDATE collab_docs SET bytes = bytes + ?, updates = updates + 1 WHERE name = ?", (len(update), name))
        return size + len(update), count + 1

    def _compact(self, execute: Any, name: str) -> None:
        self._lock_doc(execute, name)
        state = self._load(execute, name).get_update()
        execute("DELETE FROM collab_updates WHERE doc = ?", (name,))
        execute("INSERT INTO collab_updates (doc, data) VALUES (?, ?)", (name, state))
        execute("UPDATE collab_docs SET bytes = ?, updates = 1 WHERE name = ?", (len(state), name))

    def _load(self, execute: Any, name: str) -> Doc:
        doc = Doc()
        for (data,) in execute("SELECT data FROM collab_updates WHERE doc = ? ORDER BY id", (name,)).fetchall():
            doc.apply_update(bytes(data))
        return doc

    def doc(self, name: str) -> Doc:
        """The document as a pycrdt ``Doc`` (empty when it was never written)."""
        return self._run(self._load, name)

    def sync(self, name: str, state_vector: bytes) -> tuple[bytes, bytes]:
        """Yjs sync step 2 for a client whose state vector is ``state_vector``: (the update it
        lacks, the server's own state vector, with which the client answers what the server lacks)."""
        doc = self.doc(name)
        return doc.get_update(state_vector), doc.get_state()

    def text(self, name: str, field: str = "text") -> str:
        """The document's Y.Text ``field`` as a string."""
        return str(self.doc(name).get(field, type=Text))

    def stats(self, name: str) -> tuple[int, int]:
        """(stored bytes, stored updates) of a document ((0, 0) when it was never written)."""
        row = self._run(lambda execute: execute("SELECT bytes, updates FROM collab_docs WHERE name = ?", (name,)).fetchone())
        return tuple(row) if row is not None else (0, 0)

    def count(self) -> int:
        """How many documents the store holds."""
        return self._run(lambda execute: execute("SELECT count(*) FROM collab_docs").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
