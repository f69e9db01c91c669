"""The write-back journal: the files whose closed contents the server has not committed yet.

A write-back mount answers ``close`` and ``fsync`` once the file's state is
durable on the local disk, and commits it to the server later
(:class:`~nimbusfs.mount.writeback.WriteBack`). This module keeps that state:
one SQLite database (WAL, ``synchronous=FULL``) in the mount's cache
directory, with one row per pending file.

Invariants:

- **Durable when ``put`` returns.** A row is in the WAL and the WAL is
  fsynced before ``put`` returns; the caller has made the bytes the row
  names durable before (the staging file fdatasynced, or the bytes inline in
  the row). Concurrent ``put`` calls share one transaction and one fsync
  (group commit): the first caller waiting writes every row queued so far.
- **One row per inode.** A later close of the same file replaces the row's
  state but keeps its ``seq`` (its place in the drain order) and its
  ``op_id``, so that whatever attempt to commit the file reached the server,
  sending it again with that op_id applies it once (the server keeps applied
  op_ids for a day: a journal left undrained longer may commit a file's last
  state as a conflicted copy of itself, never lose it).
- **Order.** Rows are drained in ``seq`` order, the order their files were
  first closed; ``seq`` grows across restarts.
- **Removed once committed.** ``remove`` deletes a row only for the op_id
  it was committed with, durably, before the caller frees the staged bytes.
- **Leases.** Inode numbers leased to this mount are durable before any is
  used; a number leaves ``leases`` in the transaction that removes the row
  of the file created under it (the server has applied that create). So
  after a crash the free numbers are those in ``leases`` that no row uses:
  a number is never used for two files the server would both see.

The database is read by ``nimbusfs status`` (another process) to show what
is waiting: ``summary`` opens it read-only.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from nimbusfs.errors import local_io

JOURNAL_NAME = "journal.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    ino INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    op_id TEXT NOT NULL,
    state BLOB NOT NULL,      -- msgpack: OpenFile.snapshot()
    bytes INTEGER NOT NULL,   -- staged bytes waiting (for the write-back limit and status)
    created REAL NOT NULL     -- when the file was first closed (unix time)
);
-- Namespace write-back: this mount's lessee id (``lease_inodes``), stable
-- across its restarts, and the inode numbers leased to it and not yet used
-- by a create the server applied.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (ino INTEGER PRIMARY KEY);
"""


@dataclass
class Record:
    ino: int
    seq: int
    op_id: str
    state: dict[str, Any]
    bytes: int
    created: float


class _Group:
    """Rows written by one transaction; ``done`` is set once it is durable (or failed)."""

    def __init__(self) -> None:
        self.rows: dict[int, Record] = {}
        self.done = trio.Event()
        self.error: BaseException | None = None


def summary(cache_dir: str) -> tuple[int, int, float] | None:
    """(files, bytes, oldest first-close time) waiting in a mount's journal; None: no journal.

    Read-only and without taking part in the writer's locking beyond SQLite's
    own, from any process.
    """
    path = os.path.join(cache_dir, JOURNAL_NAME)
    if not os.path.exists(path):
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        n, size, oldest = conn.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), min(created) FROM pending").fetchone()
    except sqlite3.OperationalError:
        return None  # created but not initialised yet
    finally:
        conn.close()
    return n, size, oldest or 0.0


class Journal:
    """The pending files of one mount (one cache directory, locked by that mount)."""

    def __init__(self, cache_dir: str) -> None:
        self.path = os.path.join(cache_dir, JOURNAL_NAME)
        with local_io(self.path):
            # Used from one worker thread at a time (``_lock``), never two at once.
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT INTO meta VALUES ('lessee', ?) ON CONFLICT DO NOTHING",
                            (uuid.uuid4().hex,))
            self.lessee: str = self.db.execute(
                "SELECT value FROM meta WHERE key = 'lessee'").fetchone()[0]
        self._lock = trio.Lock()
        self._group = _Group()

    def records(self) -> list[Record]:
        """Every pending file, in drain order (at start, before anything is written)."""
        with local_io(self.path):
            rows = self.db.execute("SELECT ino, seq, op_id, state, bytes, created FROM pending"
                                   " ORDER BY seq").fetchall()
        return [Record(ino, seq, op_id, msgpack.unpackb(state, raw=False,
                                                        strict_map_key=False), n, created)
                for ino, seq, op_id, state, n, created in rows]

    def next_seq(self) -> int:
        with local_io(self.path):
            return self.db.execute("SELECT coalesce(max(seq), 0) + 1 FROM pending").fetchone()[0]

    async def put(self, rec: Record) -> None:
        """Make ``rec`` durable (replacing the state of its inode's row); group-committed."""
        group = self._group
        group.rows[rec.ino] = rec  # a later close of the same file in the same group wins
        async with self._lock:
            if not group.done.is_set():
                # The first of this group's callers to get here writes all of it.
                self._group = _Group()
                try:
                    await trio.to_thread.run_sync(self._write, list(group.rows.values()))
                except BaseException as e:
                    group.error = e
                    raise
                finally:
                    group.done.set()
        if group.error is not None:
            raise group.error

    def _write(self, rows: list[Record]) -> None:
        self._transaction([(
            "INSERT INTO pending (ino, seq, op_id, state, bytes, created)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (ino) DO UPDATE"
            " SET state = excluded.state, bytes = excluded.bytes",
            [(r.ino, r.seq, r.op_id, msgpack.packb(r.state, use_bin_type=True), r.bytes,
              r.created) for r in rows])])

    def _transaction(self, statements: list[tuple[str, list[tuple]]]) -> None:
        """Each statement for each of its rows, in one transaction (one fsync at COMMIT)."""
        with local_io(self.path):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    async def remove(self, done: Iterable[tuple[int, str]]) -> None:
        """Durably delete the rows of ``(ino, op_id)`` committed by the server, and the
        lease of each one's number (its create, if it had one, is applied too)."""
        rows = list(done)
        if rows:
            statements: list[tuple[str, list[tuple]]] = [
                ("DELETE FROM pending WHERE ino = ? AND op_id = ?", list(rows)),
                ("DELETE FROM leases WHERE ino = ?", [(ino,) for ino, _ in rows])]
            async with self._lock:
                await trio.to_thread.run_sync(self._transaction, statements)

    def leases(self) -> list[int]:
        """The leased numbers no pending row uses (at start, before anything is written)."""
        with local_io(self.path):
            return [r[0] for r in self.db.execute(
                "SELECT ino FROM leases WHERE ino NOT IN (SELECT ino FROM pending)"
                " ORDER BY ino")]

    async def add_leases(self, inos: list[int]) -> None:
        """Make newly leased numbers durable (before any of them is used)."""
        async with self._lock:
            await trio.to_thread.run_sync(
                self._transaction, [("INSERT OR IGNORE INTO leases VALUES (?)",
                                     [(i,) for i in inos])])

    def close(self) -> None:
        self.db.close()
