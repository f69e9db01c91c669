"""Block GC: delete the blocks nothing references any more, and store objects no row knows.

A round (``collect``) first purges the files mounts that died left deleted
while open (orphans neither linked nor held by a live mount for
``namespace.ORPHAN_AGE``: ``left_behind``), then deletes

- blocks whose reference count has been 0 for longer than the grace
  (``blocks.unref_since``): versions dropped by retention or purged with
  their file, conflicts amended away, puts never committed;
- store objects that no ``blocks`` row knows, older than the grace: blocks a
  direct-mode mount put into the store itself and never committed (it
  crashed, or its commit was refused);
- blocks still held by the chunks of an unexpired resumable upload
  (``upload_chunks``) are kept whatever their age.

**The invariant: GC never deletes a block that a committed version references
or that a commit in flight is about to reference.** The argument, on the
``blocks`` row's ``state`` (migration 0008):

1. GC deletes a store object only while the block's row is ``doomed``, and
   removes the row only after the object is gone. A row becomes doomed
   (``_doom``) only under its row lock, with ``refcount = 0`` and an
   ``unref_since`` older than the grace checked under that lock; an object
   no row knows becomes doomed by inserting a doomed row for it, which fails
   (and GC leaves the object alone) if any row appeared meanwhile.
2. A commit (``namespace._check_blocks``) locks every block row it
   references and refuses, with EAGAIN, a block whose row is missing or not
   ``live``; it raises the reference count in the same transaction. So a
   committed version's blocks have ``refcount > 0`` from the commit on, until
   a transaction removes the version, and cannot be doomed before.
3. A row is made ``live`` only by whoever saw the object in the store after
   the row existed: a put (``BlockAccess.put``, the HTTP API's ``ingest``)
   pins the row (``_pin``: made ``pending``, or its grace restarted), then
   puts the bytes, then confirms (``_confirm``); a direct-mode commit
   (``BlockAccess.admit``) pins, then looks for the object, then confirms.
   Confirming checks that the row is still the one pinned (same
   ``first_seen``) and not doomed, else EAGAIN. A store ``put`` of an object
   that is there does nothing, so a put racing with GC's delete could leave
   nothing stored; the pin/confirm pair turns every such race into EAGAIN.
   Hence: **a live row's object is in the store** (GC would have had to
   doom the row first, and doomed rows never come back to life).
4. A commit in flight has put or deduplicated its blocks (``have_blocks``
   answers only referenced blocks; a mount's cache may skip blocks it holds)
   at some time before the commit. If GC collected one since, the row is
   doomed or gone, and by 2 the commit is refused with EAGAIN: the mount puts
   its blocks again and commits again (``OpenFile.put_again``), the HTTP API
   stores the file again. Nothing is committed over a missing block. The
   grace makes this rare: a pin restarts it, so a commit that follows its
   uploads within the grace is never refused. A write-back mount whose
   journal holds a commit longer than the grace (an outage) sees the
   refusal and uploads from its staging data, which keeps every byte until
   the commit.
5. A sync mount does not keep the bytes of the blocks it uploaded ahead
   while a large file is written (``OpenFile._releases``), so it *holds*
   them (``hold_blocks``, ``BlockAccess.hold``) before releasing their
   bytes and then every third of the grace the server told it in the hello
   until the commit. A live row the caller may reference has its grace
   restarted under its row lock (``_hold``: a row GC doomed first is not
   held; a row held first fails GC's recheck of ``unref_since``); in direct
   mode the other blocks go through the same pin, look, confirm as a
   commit's (point 3, the only way a hold makes a row live), which gives the
   objects the mount put rows, so they stop being "objects no row knows"
   (one the mount's put found there already, old, and GC deleted before the
   pin, is found missing). A block the answer names as not held (collected) keeps its bytes
   staged (the first hold) or is put again at the commit from the block
   cache. So a block held within every grace is never collected, and the
   commit's EAGAIN rule (point 2) still guards everything else: a mount
   suspended, or cut off from every server, for longer than the grace loses
   such a block and its close fails (EIO), never commits over it. A GC run
   with a shorter grace than the servers' (``nimbusfs gc --grace``) may
   collect held blocks the same way.

GC itself runs in one process at a time (a PostgreSQL advisory lock), in
batches: each batch dooms its rows in one short transaction, deletes the
objects with no transaction open, then deletes the rows. A GC that dies
leaves doomed rows behind, which the next round finishes first. Blocks a
commit has locked are skipped (``SKIP LOCKED``), never waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import msgpack
import psycopg
from psycopg import Cursor

from nimbusfs.blockstore.base import BlockStore
from nimbusfs.blockstore.chunking import MAX_BLOCK
from nimbusfs.server import namespace
from nimbusfs.server.db import Database

log = logging.getLogger(__name__)

# Rows doomed (and objects deleted) per transaction.
BATCH = 1000
# Store deletes at once (GCS deletes are one request each).
DELETERS = 16
# Seconds after which a crashed put's leftover (a local store's .tmp file) is
# deleted: not the grace, which may be shorter than a put of a block takes.
LEFTOVER_AGE = 3600.0
# The advisory lock that keeps GC rounds (server schedules, ``nimbusfs gc``) apart.
GC_LOCK = 7317


@dataclass
class Report:
    """What a round deleted (or, with ``dry_run``, would delete)."""

    dry_run: bool = False
    blocks: int = 0            # unreferenced blocks past the grace
    block_bytes: int = 0
    orphans: int = 0           # store objects no row knew, past the grace
    orphan_bytes: int = 0
    leftovers: int = 0         # pieces of crashed puts (a local store's .tmp files)
    left_orphans: int = 0      # files purged: unlinked while open by a mount that died
    kept_for_uploads: int = 0  # unreferenced blocks held by unfinished uploads
    seconds: float = 0.0

    def __str__(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"block GC {verb} {self.blocks} unreferenced block(s) ({self.block_bytes:,}"
                f" bytes) and {self.orphans} store object(s) no row knew"
                f" ({self.orphan_bytes:,} bytes), {self.leftovers} leftover(s) of crashed"
                f" puts, {self.left_orphans} deleted file(s) left behind by mounts that"
                f" died; kept {self.kept_for_uploads} block(s) of unfinished uploads;"
                f" {self.seconds:.1f} s")


def _held_by_uploads(cur: Cursor) -> list[bytes]:
    """The blocks the chunks of unexpired uploads reference (no version does yet)."""
    cur.execute("SELECT c.extents FROM upload_chunks c JOIN uploads u ON u.id = c.upload_id"
                " WHERE u.expires > now() AND u.result IS NULL")
    return sorted({bytes(k) for (ext,) in cur for k, _ in msgpack.unpackb(ext) if k})


def _doom(cur: Cursor, grace: float, held: list[bytes], limit: int
          ) -> list[tuple[bytes, int]]:
    """Doom up to ``limit`` unreferenced blocks past the grace (see point 1); return them.

    Rows locked by a commit are skipped; a row that changed since the
    statement's snapshot is checked again once locked (READ COMMITTED's
    recheck of ``FOR UPDATE``), so a block a commit referenced meanwhile is
    not doomed.
    """
    cur.execute("UPDATE blocks b SET state = 'doomed' FROM (SELECT hash FROM blocks"
                " WHERE refcount = 0 AND state <> 'doomed'"
                " AND unref_since < now() - make_interval(secs => %s)"
                " AND hash <> ALL(%s::bytea[]) ORDER BY unref_since LIMIT %s"
                " FOR UPDATE SKIP LOCKED) d WHERE b.hash = d.hash RETURNING b.hash, b.size",
                (grace, held, limit))
    return [(bytes(k), n) for k, n in cur.fetchall()]


def _doomed(cur: Cursor) -> list[tuple[bytes, int]]:
    """Rows a GC that died left doomed."""
    cur.execute("SELECT hash, size FROM blocks WHERE state = 'doomed'")
    return [(bytes(k), n) for k, n in cur.fetchall()]


def _doom_unknown(cur: Cursor, keys: list[bytes], sizes: list[int]) -> list[bytes]:
    """Doom store objects no row knows by inserting doomed rows; return those doomed."""
    cur.execute("INSERT INTO blocks (hash, size, refcount, unref_since, state)"
                " SELECT k, n, 0, now(), 'doomed' FROM unnest(%s::bytea[], %s::int[]) AS c(k, n)"
                " ON CONFLICT (hash) DO NOTHING RETURNING hash", (keys, sizes))
    return [bytes(r[0]) for r in cur.fetchall()]


def _unknown(cur: Cursor, keys: list[bytes]) -> list[bytes]:
    cur.execute("SELECT k FROM unnest(%s::bytea[]) AS k"
                " WHERE NOT EXISTS (SELECT 1 FROM blocks b WHERE b.hash = k)", (keys,))
    return [bytes(r[0]) for r in cur.fetchall()]


def _forget(cur: Cursor, keys: list[bytes]) -> None:
    """The last step: the objects are gone, so are their (doomed) rows."""
    cur.execute("DELETE FROM blocks WHERE hash = ANY(%s) AND state = 'doomed'", (keys,))


def _collectable(cur: Cursor, grace: float, held: list[bytes]) -> tuple[int, int]:
    cur.execute("SELECT count(*), coalesce(sum(size), 0)::bigint FROM blocks"
                " WHERE state = 'doomed' OR (refcount = 0"
                " AND unref_since < now() - make_interval(secs => %s)"
                " AND hash <> ALL(%s::bytea[]))", (grace, held))
    count, size = cur.fetchone() or (0, 0)
    return count, size


def _batches(it: Iterator, n: int) -> Iterator[list]:
    while batch := list(islice(it, n)):
        yield batch


class _Round:
    def __init__(self, db: Database, store: BlockStore, grace: float, dry_run: bool,
                 stop: threading.Event) -> None:
        self.db, self.store, self.grace, self.stop = db, store, grace, stop
        self.report = Report(dry_run=dry_run)
        self.pool = ThreadPoolExecutor(DELETERS, thread_name_prefix="gc-delete")

    def delete(self, doomed: list[tuple[bytes, int]]) -> int:
        """Delete doomed blocks' objects, then their rows; return the bytes freed."""
        keys = [k for k, _ in doomed]
        list(self.pool.map(self.store.delete, keys))
        self.db.run(_forget, keys)
        return sum(n for _, n in doomed)

    def left_behind(self) -> None:
        """Purge the files left behind by mounts that died: unlinked while open there, never
        purged at their last close (``namespace.ORPHAN_AGE``). Their blocks are
        unreferenced from now: a later round collects them after the grace."""
        r = self.report
        if r.dry_run:
            r.left_orphans = len(self.db.run(namespace.left_orphans, None))
            return
        while not self.stop.is_set() and (inos := self.db.run(namespace.left_orphans, BATCH)):
            r.left_orphans += self.db.run(namespace.purge_orphans, inos)

    def unreferenced(self) -> None:
        held = self.db.run(_held_by_uploads)
        r = self.report
        if r.dry_run:
            r.blocks, r.block_bytes = self.db.run(_collectable, self.grace, held)
        else:
            r.block_bytes += self.delete(self.db.run(_doomed))
            while not self.stop.is_set() and (doomed := self.db.run(_doom, self.grace, held,
                                                                     BATCH)):
                r.blocks += len(doomed)
                r.block_bytes += self.delete(doomed)
        r.kept_for_uploads = len(held)

    def unknown(self) -> None:
        cutoff = time.time() - self.grace
        old = ((k, n) for k, n, t in self.store.objects() if t < cutoff and n <= MAX_BLOCK)
        r = self.report
        for batch in _batches(old, BATCH):
            if self.stop.is_set():
                return
            sizes = dict(batch)
            if r.dry_run:
                found = self.db.run(_unknown, list(sizes))
            else:
                found = self.db.run(_doom_unknown, list(sizes), list(sizes.values()))
                self.delete([(k, sizes[k]) for k in found])
            r.orphans += len(found)
            r.orphan_bytes += sum(sizes[k] for k in found)
        if not r.dry_run:
            r.leftovers = self.store.remove_leftovers(LEFTOVER_AGE)


def collect(db: Database, store: BlockStore, grace: float, dry_run: bool = False,
            stop: threading.Event | None = None) -> Report | None:
    """One GC round (see the module docstring); None if another round holds the lock.

    ``grace`` in seconds. ``stop`` ends the round between batches (server
    shutdown). Runs in a worker thread: database and store calls block.
    """
    started = time.monotonic()
    with psycopg.connect(db.dsn, autocommit=True) as lock:
        if lock.execute("SELECT pg_try_advisory_lock(%s)", (GC_LOCK,)).fetchone() != (True,):
            return None
        rnd = _Round(db, store, grace, dry_run, stop or threading.Event())
        try:
            rnd.left_behind()
            rnd.unreferenced()
            rnd.unknown()
        finally:
            rnd.pool.shutdown()
            lock.execute("SELECT pg_advisory_unlock(%s)", (GC_LOCK,))
    rnd.report.seconds = time.monotonic() - started
    return rnd.report
