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
  it was committed with, durably before the caller frees the staged bytes
  of a staging file a row names. A removal of rows naming none (inline
  bytes, operations) is made durable by the next durable write (one WAL,
  fsynced in order): a crash of the machine before it replays them, and
  the server applies each once (op_ids); a crash of the mount alone loses
  nothing (the WAL is written before ``remove`` returns).
- **Namespace operations.** A journalled ``mknod`` of a directory,
  ``symlink``, ``link``, ``setattr``, ``rename``, ``unlink`` or ``rmdir`` is
  one row of ``ops``, whose ``seq`` comes from the same counter as the
  files': one drain order for both, so an operation reaches
  the server after every file record and operation journalled before it (a
  directory's create before the creates inside it). ``add_op`` does not
  wait: the row joins the group being filled, written by the next ``put``
  (so it is durable before any later close returns: the prefix of what was
  done survives a crash of the machine, as on a local disk where a mkdir is
  durable once something after it is fsynced) or by ``commit`` of its
  group. Before an operation naming entries returns (all but setattr), its
  row and those before it are also written at once without an fsync
  (``write_now``): in the WAL, in the kernel's page cache, so a kill of the
  mount alone never loses one that returned (an SQLite database in its
  default DELETE mode commits by unlinking its journal, and does not fsync
  the directory after it: that unlink lost, its last transaction rolled
  back). An op row
  changes only when a setattr is merged into it (``update_op``: the
  journal's last row, a setattr of the same inode), written again with the
  group being filled, as the merged setattr's own row would have been; it
  is removed (durably) once the server answered it.
- **Leases.** Inode numbers leased to this mount are durable before any is
  used; a number leaves ``leases`` in the transaction that removes the row
  (file, ``mknod`` or ``symlink`` op) of the inode created under it (the server has
  applied that create). So after a crash the free numbers are those in
  ``leases`` that no row uses: a number is never used for two inodes the
  server would both see.

The database is read by ``nimbusfs status`` (another process) to show what
is waiting: ``summary`` opens it read-only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import trio

from nimbusfs.errors import local_io

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.db"
# The journal's format (SQLite ``PRAGMA user_version``): 1 is the tables
# below; 2 the same tables with ``rename`` and ``unlink`` rows in ``ops``; 3
# with ``rmdir``, ``symlink`` and ``link`` rows too.
# A journal made before the version was written (0) has them, or a subset
# that ``_SCHEMA`` completes. A mount refuses a journal of a later version:
# it would replay part of it (an older mount ignores the ``ops`` rows it
# does not know) and remove the rest as drained.
VERSION = 3
# The operations of ``ops`` rows that create an inode under a leased number.
CREATES = frozenset({"mknod", "symlink"})
# A group commit is written in the mount's thread while the average group
# write (an EWMA, this weight for the newest) stays under INLINE_WRITE
# seconds, in a worker thread past it (``commit``).
INLINE_WRITE = 0.002
WRITE_TIME_WEIGHT = 0.2

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
-- Namespace operations journalled (a directory's mknod, a symlink, a link, a
-- setattr, a rename, an unlink, an rmdir), drained in ``seq`` order among the
-- files' rows.
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY,
    op_id TEXT NOT NULL,
    op TEXT NOT NULL,         -- the protocol operation: mknod, symlink, link, setattr, ...
    args BLOB NOT NULL,       -- msgpack: its arguments, as sent
    local BLOB NOT NULL,      -- msgpack: what the mount shows meanwhile (OpRecord.local)
    created REAL NOT NULL
);
"""


@dataclass
class Record:
    ino: int
    seq: int
    op_id: str
    state: dict[str, Any]
    bytes: int
    created: float


@dataclass
class OpRecord:
    """A journalled namespace operation: ``op`` with ``args`` as the server takes them.

    ``ino``: the inode it creates, changes, moves, links or removes (``args["ino"]``).
    ``local``: what this mount shows until it is applied (a new directory's or
    symlink's attributes, a setattr's changes, the ctime a rename, link or
    unlink gives its inode).
    """

    seq: int
    op_id: str
    op: str
    args: dict[str, Any]
    local: dict[str, Any]
    created: float
    # Its group was written (or failed to be): from then on ``write_now`` only
    # updates its row, never inserts it (it may be drained and removed).
    grouped: bool = False

    @property
    def ino(self) -> int:
        return int(self.args["ino"])


class UnknownVersion(Exception):
    """The journal was written by a newer mount (a later format): not opened."""


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


class _Group:
    """Rows written by one transaction; ``done`` is set once it is durable (or failed)."""

    def __init__(self) -> None:
        self.rows: dict[int, Record] = {}
        self.ops: list[OpRecord] = []
        self.updates: dict[int, OpRecord] = {}   # op rows written before, changed since
        self.written: list[Callable[[], None]] = []   # called once written (or failed)
        self.committer = False   # a task will commit it (``commit``)
        self.done = trio.Event()
        self.error: BaseException | None = None


class Waiting(NamedTuple):
    """What a mount's journal holds: ``records`` (files and operations), the staged
    ``bytes`` of its files, the time the oldest record was journalled (unix time; 0:
    none), and the ``files`` and namespace ``ops`` among the records."""

    records: int
    bytes: int
    oldest: float
    files: int
    ops: int


def summary(cache_dir: str) -> Waiting | None:
    """What is waiting in a mount's journal; None: no journal.

    Read-only and without taking part in the writer's locking beyond SQLite's
    own, from any process.
    """
    path = os.path.join(cache_dir, JOURNAL_NAME)
    if not os.path.exists(path):
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        files, size, ops, oldest = conn.execute(  # one statement: one snapshot
            "SELECT (SELECT count(*) FROM pending), (SELECT coalesce(sum(bytes), 0) FROM"
            " pending), (SELECT count(*) FROM ops), (SELECT min(c) FROM (SELECT min(created)"
            " AS c FROM pending UNION ALL SELECT min(created) FROM ops))").fetchone()
    except sqlite3.OperationalError:
        return None  # created but not initialised yet
    finally:
        conn.close()
    return Waiting(files + ops, size, oldest or 0.0, files, ops)


# SQLite's primary result codes the journal passes on as an errno; any other
# (SQLITE_IOERR, SQLITE_CORRUPT ...) is EIO, a failing disk or a bug.
_SQLITE_ERRNO = {sqlite3.SQLITE_FULL: errno.ENOSPC, sqlite3.SQLITE_READONLY: errno.EROFS,
                 sqlite3.SQLITE_NOMEM: errno.ENOMEM}


@contextlib.contextmanager
def _sqlite_io(path: str) -> Iterator[None]:
    """``local_io`` for the journal's SQLite calls: an SQLite error is raised as the errno
    a local file system's would be (a full cache disk is ENOSPC to the close that could
    not be journalled, not EIO), naming the journal."""
    with local_io(path):
        try:
            yield
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", None)
            raise OSError(_SQLITE_ERRNO.get((code or 0) & 0xFF, errno.EIO), str(e)) from e


class Journal:
    """The pending files of one mount (one cache directory, locked by that mount)."""

    def __init__(self, cache_dir: str) -> None:
        self.path = os.path.join(cache_dir, JOURNAL_NAME)
        with _sqlite_io(self.path):
            # Used by one thread at a time (``_lock``): the mount's, or a worker's.
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > VERSION:
                self.db.close()
                raise UnknownVersion(
                    f"the write-back journal {self.path} has format {version}, this nimbusfs"
                    f" knows up to {VERSION}: mount with the newer nimbusfs that wrote it"
                    " (its pending changes are not drained yet)")
            self.db.execute(f"PRAGMA user_version = {VERSION}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT INTO meta VALUES ('lessee', ?) ON CONFLICT DO NOTHING",
                            (uuid.uuid4().hex,))
            self.db.execute("INSERT INTO meta VALUES ('groups', 0) ON CONFLICT DO NOTHING")
            self.lessee: str = self.db.execute(
                "SELECT value FROM meta WHERE key = 'lessee'").fetchone()[0]
        self._lock = trio.Lock()
        self._group = _Group()
        self._write_time = 0.0   # EWMA of a group write's seconds (``_timed_write``)

    def records(self) -> list[Record]:
        """Every pending file, in drain order (at start, before anything is written)."""
        with _sqlite_io(self.path):
            rows = self.db.execute("SELECT ino, seq, op_id, state, bytes, created FROM pending"
                                   " ORDER BY seq").fetchall()
        return [Record(ino, seq, op_id, _unpack(state), n, created)
                for ino, seq, op_id, state, n, created in rows]

    def ops(self) -> list[OpRecord]:
        """Every journalled namespace operation, in drain order (at start)."""
        with _sqlite_io(self.path):
            rows = self.db.execute("SELECT seq, op_id, op, args, local, created FROM ops"
                                   " ORDER BY seq").fetchall()
        return [OpRecord(seq, op_id, op, _unpack(args), _unpack(local), created, grouped=True)
                for seq, op_id, op, args, local, created in rows]

    def next_seq(self) -> int:
        with _sqlite_io(self.path):
            return self.db.execute("SELECT max(coalesce((SELECT max(seq) FROM pending), 0),"
                                   " coalesce((SELECT max(seq) FROM ops), 0)) + 1").fetchone()[0]

    async def put(self, rec: Record) -> None:
        """Make ``rec`` durable (replacing the state of its inode's row); group-committed."""
        group = self._group
        group.rows[rec.ino] = rec  # a later close of the same file in the same group wins
        await self.commit(group)

    def add_op(self, rec: OpRecord, written: Callable[[], None]) -> _Group | None:
        """Add the namespace operation ``rec`` (a new row) to the group being filled.

        ``written`` is called once the group is written (also if that failed:
        the caller decides). Returns the group if nobody has undertaken to
        commit it yet (the caller must ``commit`` it: the caller is that task).
        """
        group = self._group
        group.ops.append(rec)
        group.written.append(written)
        if group.committer:
            return None
        group.committer = True
        return group

    def update_op(self, rec: OpRecord) -> _Group | None:
        """Write the operation ``rec`` again, changed since ``add_op`` (a setattr merged into
        it: the last operation added), with the group being filled; returns the group
        as ``add_op`` does.

        If ``rec`` is still in that group, the group writes it as it is then.
        Else its row is updated by seq (none if answered and removed meanwhile).
        """
        group = self._group
        if group.ops and group.ops[-1] is rec:
            return None   # not written yet, and that group has a committer
        group.updates[rec.seq] = rec
        if group.committer:
            return None
        group.committer = True
        return group

    async def write_now(self, recs: list[OpRecord]) -> None:
        """Write the rows of the operations ``recs`` at once, without an fsync: each was
        added to a group (``add_op``) or merged into (``update_op``), which makes it
        durable.

        One transaction, in the mount's thread when the connection is free (no
        worker thread holds it; nothing is awaited between the check and the
        write), else after the worker's transaction. A row whose group was
        written already (``grouped``: it may be drained and removed since) is
        only updated, never inserted again. Never raises: a row not written now
        is written with its group, which reports what fails there.
        """
        rows = [(r.seq, r.op_id, r.op, _pack(r.args), _pack(r.local), r.created) for r in recs]
        statements: list[tuple[str, list[tuple]]] = [
            ("INSERT INTO ops (seq, op_id, op, args, local, created) VALUES (?, ?, ?, ?, ?, ?)"
             " ON CONFLICT (seq) DO UPDATE SET args = excluded.args, local = excluded.local",
             [row for row, r in zip(rows, recs, strict=True) if not r.grouped]),
            ("UPDATE ops SET args = ?, local = ? WHERE seq = ?",
             [(*row[3:5], row[0]) for row, r in zip(rows, recs, strict=True) if r.grouped])]
        try:
            if self._lock.locked():
                async with self._lock:
                    self._transaction(statements, durable=False)
            else:
                self._transaction(statements, durable=False)
        except OSError as e:
            log.warning("journal %s: %d operations not written at once: %s", self.path,
                        len(recs), e)

    async def commit(self, group: _Group) -> None:
        """Return once ``group`` is written: by this caller if it is the first to get here
        (``put``'s callers, and the task ``add_op`` named).

        Written in the mount's thread, not a worker's: a group is a few rows
        and one fdatasync of the WAL (0.08-0.17 ms on an idle disk), and the
        hop to a worker thread and back cost more than that (two wake-ups,
        and every task ready meanwhile, the drainer's included, ran before
        the close's answer: a write-back close took ~1 ms in its handler).
        The price: the mount answers no other request during that fdatasync
        (under other processes' disk load 0.4-0.7 ms at the median, 6-10 ms
        at p99). So a disk that has become slow (the average group write past
        ``INLINE_WRITE``: a busy or failing disk, a hung one) is written in a
        worker thread again, and the mount keeps answering reads and stats
        meanwhile; back under it, inline again. ``remove`` and
        ``add_leases`` (the drainer's, off any application's path) always
        write in a worker thread, holding ``_lock``: the closes that come
        meanwhile wait for it and share one group (one fdatasync).
        """
        async with self._lock:
            if not group.done.is_set():
                # The first of this group's callers to get here writes all of it.
                self._group = _Group()
                args = (list(group.rows.values()), group.ops, list(group.updates.values()))
                try:
                    if self._write_time > INLINE_WRITE:
                        await trio.to_thread.run_sync(self._timed_write, *args)
                    else:
                        self._timed_write(*args)
                except BaseException as e:
                    group.error = e
                    raise
                finally:
                    for o in group.ops:
                        o.grouped = True
                    for written in group.written:
                        written()
                    group.done.set()
        if group.error is not None:
            raise group.error

    async def sync(self) -> None:
        """Return once every row added so far is durable (the group being filled is
        written now, after any group being written: one lock, in order)."""
        await self.commit(self._group)

    def _timed_write(self, rows: list[Record], ops: list[OpRecord], updates: list[OpRecord]
                     ) -> None:
        """``_write``, its duration averaged into ``_write_time`` (an EWMA)."""
        start = time.monotonic()
        try:
            self._write(rows, ops, updates)
        finally:
            took = time.monotonic() - start
            self._write_time += (took - self._write_time) * WRITE_TIME_WEIGHT

    def _write(self, rows: list[Record], ops: list[OpRecord], updates: list[OpRecord]
               ) -> None:
        self._transaction([(
            "INSERT INTO pending (ino, seq, op_id, state, bytes, created)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (ino) DO UPDATE"
            " SET state = excluded.state, bytes = excluded.bytes",
            [(r.ino, r.seq, r.op_id, _pack(r.state), r.bytes, r.created) for r in rows]), (
            "INSERT INTO ops (seq, op_id, op, args, local, created) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (seq) DO UPDATE SET args = excluded.args, local = excluded.local",
            [(o.seq, o.op_id, o.op, _pack(o.args), _pack(o.local), o.created) for o in ops]), (
            "UPDATE ops SET args = ?, local = ? WHERE seq = ?",
            [(_pack(o.args), _pack(o.local), o.seq) for o in updates]), (
            # Rows written already (``write_now``) are the same bytes again, which
            # SQLite does not write (nor then fsync the WAL for): a counter that
            # changes makes this COMMIT write, and its fsync covers them.
            "UPDATE meta SET value = value + 1 WHERE key = 'groups'",
            [()] if ops or updates else [])])

    def _transaction(self, statements: list[tuple[str, list[tuple]]], durable: bool = True
                     ) -> None:
        """Each statement for each of its rows, in one transaction (one fsync at COMMIT;
        none if not ``durable``: the next durable COMMIT's fsync of the WAL covers it)."""
        with _sqlite_io(self.path):
            if not durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    self.db.executemany(sql, rows)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:   # SQLite ends it itself on some errors (a full disk)
                    self.db.execute("ROLLBACK")
                raise
            finally:
                if not durable:
                    self.db.execute("PRAGMA synchronous=FULL")

    async def remove(self, done: Iterable[tuple[int, str]], ops: Iterable[OpRecord] = (),
                     durable: bool = True) -> None:
        """Durably delete the rows of ``(ino, op_id)`` committed by the server and the
        operations ``ops`` it answered, and the lease of each one's number (its
        create, if it had one, is applied too, or refused for good)."""
        rows, answered = list(done), list(ops)
        if rows or answered:
            statements: list[tuple[str, list[tuple]]] = [
                ("DELETE FROM pending WHERE ino = ? AND op_id = ?", rows),
                ("DELETE FROM ops WHERE seq = ?", [(o.seq,) for o in answered]),
                ("DELETE FROM leases WHERE ino = ?",
                 [(ino,) for ino, _ in rows] + [(o.ino,) for o in answered if o.op in CREATES])]
            async with self._lock:
                await trio.to_thread.run_sync(self._transaction, statements, durable)

    def leases(self) -> list[int]:
        """The leased numbers no pending row uses (at start, before anything is written)."""
        made = {o.ino for o in self.ops() if o.op in CREATES}
        with _sqlite_io(self.path):
            return [r[0] for r in self.db.execute(
                "SELECT ino FROM leases WHERE ino NOT IN (SELECT ino FROM pending)"
                " ORDER BY ino") if r[0] not in made]

    async def add_leases(self, inos: list[int]) -> None:
        """Make newly leased numbers durable (before any of them is used)."""
        async with self._lock:
            await trio.to_thread.run_sync(
                self._transaction, [("INSERT OR IGNORE INTO leases VALUES (?)",
                                     [(i,) for i in inos])])

    def close(self) -> None:
        self.db.close()
