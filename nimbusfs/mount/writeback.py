"""Write-back of file contents: close and fsync are local; a drainer commits later.

In write-back mode (``nimbusfs mount --writeback``) a close or fsync of a
written file returns once the file's uncommitted state is durable on the
local disk: its staged bytes (fdatasynced, or inline in the record when
small) and a :class:`~nimbusfs.mount.journal.Journal` record, fsynced in
groups. The file stays in the VFS's open files, modified, until it is
committed, so reads and stats on this mount see its pending bytes and size
at once; other mounts see them once drained.

The :class:`WriteBack` drainer commits pending files in journal order, in
batches: it takes each file's lock, cuts and uploads its new blocks
(``OpenFile.prepare``), sends the commits of the batch's longest prefix of
prepared files as one ``batch`` request (one transaction on the server,
each commit with the op_id of its journal record), then adopts the answers.
It holds the files' locks until the batch is answered, retrying through an
outage, so that a file never changes between an attempt and its answer: a
commit sent again (after a lost answer, or a crash: the op_id is in the
journal) is applied once, and its answer is the version it made.

Answers: a committed version, or a conflict (another mount changed the file
meanwhile: the server saved these bytes as a conflicted copy, as for a sync
close); a refused commit (quota, permission) saves the bytes under
``recovered/`` as a failed last close does. A journal record is removed
only after its answer was adopted or saved aside, and the staged bytes are
freed only after that: nothing acknowledged is dropped.

Creates (namespace write-back): a file created on a write-back mount gets
an inode number from a range the server leased to this mount (kept in the
journal, so that a replay uses the same numbers), and its ``mknod`` travels
in its journal record, sent just before its commit in the same batch (one
ordered journal; each applied once by its op_id). The server applies it
with ``keep``: if another mount took the name meanwhile the file gets the
conflicted copy's name beside it, if its directory was removed it goes to
the volume's root; the mount logs that and records it in
``conflicts.jsonl``. A refused create (quota, a lease not this mount's)
saves the bytes under ``recovered/`` as a refused commit does. Nothing is
dropped.

Backpressure: past ``limit`` bytes journalled and not yet committed (or
``MAX_PENDING_FILES`` files), writes wait for the drainer (``room``); they
never fail for it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING

import trio

from nimbusfs.errors import FSError, fs_error
from nimbusfs.mount.filedata import OpenFile, Prepared
from nimbusfs.mount.journal import Journal, Record
from nimbusfs.retry import Backoff

if TYPE_CHECKING:
    from nimbusfs.mount.vfs import VFS

log = logging.getLogger(__name__)

# A file whose dirty bytes are at most this is journalled with its bytes in
# the record (one fsync, the journal's, makes the close durable); a larger
# one has its staging file fdatasynced and named in the record.
INLINE_BYTES = 64 << 10
# Files committed by one batch request (one transaction on the server).
BATCH_FILES = 256
# Pending files at most (each holds its staging file open): past it, writes
# wait as past the byte limit.
MAX_PENDING_FILES = 8192
# Inode numbers asked for at a time (``lease_inodes``), and how few left
# start the next lease in the background, so that a create rarely waits.
LEASE = 1024
LEASE_LOW = 256
# Waits between drain attempts that made no progress (the store or the
# metaserver is down), and between sends of a batch through an outage.
RETRY = Backoff(first=0.1, cap=5.0)


class WriteBack:
    """The pending files of a write-back mount and the task that drains them."""

    def __init__(self, vfs: VFS, journal: Journal, limit: int) -> None:
        self.vfs = vfs
        self.journal = journal
        self.limit = limit
        # ino -> its journal record (``state`` dropped: the OpenFile holds it),
        # in drain order: a dict keeps a key's first position when updated.
        self.pending: dict[int, Record] = {}
        self.bytes = 0
        self._edits: dict[int, int] = {}  # ino -> OpenFile.edits its journal record holds
        # Where each pending file was when journalled, both ways: a pending
        # file is not renamed (``committed`` first), so this stays true.
        self._at: dict[tuple[int, bytes], int] = {}
        self._loc: dict[int, tuple[int, bytes]] = {}
        self._seq = journal.next_seq()
        # Namespace write-back: leased inode numbers not used yet, and the
        # files created here that the server does not know yet, by place
        # (server parent -> name -> inode): lookups and listings show them.
        self.free: list[int] = journal.leases()
        self._leasing = trio.Lock()
        self.new: dict[int, dict[bytes, int]] = {}
        self._token = 0   # VFS.drops when the batch being answered was sent
        self._work = trio.Event()       # set when a record is added
        self._progress = trio.Event()   # set (and replaced) when records are removed

    # --- recording -------------------------------------------------------------

    def replay(self) -> int:
        """Rebuild the journal's pending files as open files (at start, before mounting)."""
        for rec in self.journal.records():
            f = OpenFile.restore(self.vfs, rec.ino, rec.state)
            hint = rec.state["hint"]
            if hint:
                self.vfs.names[rec.ino] = (hint["parent"], hint["name"])
            self.vfs.files[rec.ino] = f
            if f.creating is not None:
                self.new.setdefault(f.creating["parent"], {})[f.creating["name"]] = rec.ino
            self._add(rec)
            self._place(rec.ino)
        return len(self.pending)

    # --- namespace ----------------------------------------------------------------

    async def new_ino(self) -> int:
        """A leased inode number for a create (a round trip only when none is left)."""
        if len(self.free) < LEASE_LOW:
            if not self.free:
                await self._lease()
            elif not self._leasing.locked():
                self.vfs.spawn(self._lease)
        return self.free.pop(0)

    async def _lease(self) -> None:
        """Lease ``LEASE`` more numbers; durable in the journal before any is used."""
        async with self._leasing:
            if len(self.free) >= LEASE_LOW:
                return  # another task leased meanwhile
            inos = await self.vfs.call("lease_inodes", count=LEASE, lessee=self.journal.lessee)
            await self.journal.add_leases(inos)
            self.free += inos

    def creating(self, f: OpenFile, parent: int, name: bytes, mode: int, uid: int,
                 gid: int) -> None:
        """``f`` (new, under a leased number) was created at ``parent``/``name`` here.

        The create goes to the server with the file's first journal record,
        as its ``mknod`` before its ``commit``, in the same batch: one
        ordered journal. Until applied, the file is this mount's alone: the
        VFS answers for it (``new``), and any request naming it waits for
        ``created``.
        """
        f.creating = {"op_id": uuid.uuid4().hex, "parent": parent, "name": name, "mode": mode,
                      "uid": uid, "gid": gid}
        f.modified = True   # its close journals (and commits) it, even empty
        self.new.setdefault(parent, {})[name] = f.ino

    async def created(self, f: OpenFile) -> None:
        """Return once the server knows ``f`` (journalled now if it was not yet).

        Before an operation that names the file to the server (unlink,
        rename, link, xattrs, a chmod that cannot wait for the commit).
        """
        while f.creating is not None and self.vfs.files.get(f.ino) is f:
            progress = self._progress   # set by a drain that ends while this stages
            await self.stage(f)
            await progress.wait()

    def _applied(self, f: OpenFile) -> None:
        """``f``'s create is applied (or given up, its bytes saved aside): not new any more."""
        assert f.creating is not None
        names = self.new.get(f.creating["parent"], {})
        if names.get(f.creating["name"]) == f.ino:
            del names[f.creating["name"]]
            if not names:
                del self.new[f.creating["parent"]]
        f.creating = None

    async def stage(self, f: OpenFile) -> None:
        """Make ``f``'s uncommitted changes durable in the journal; return once they are.

        This is a write-back close or fsync. The record's op_id and place in
        the drain order are the file's first pending record's. Nothing new
        since the file's record: nothing to wait for (not even a drain in
        progress, which holds the file's lock).
        """
        if f.ino in self.pending and self._edits.get(f.ino) == f.edits:
            return
        async with f.lock:
            if not f.modified:
                return
            await f.ahead_idle.wait()   # the pump's pieces are part of the state
            state = f.snapshot()
            state["hint"] = self.vfs.commit_hint(f.ino) or None
            st = f.staging
            size = f.staged_bytes()
            if st is not None and size <= INLINE_BYTES and not f.ahead_pieces:
                state["inline"] = [[a, st.read(a, b - a)] for a, b in state["dirty"]]
                state["staging"] = None
            elif st is not None:
                await trio.to_thread.run_sync(st.sync)
            old = self.pending.get(f.ino)
            rec = Record(f.ino, old.seq if old else self._seq, old.op_id if old else
                         uuid.uuid4().hex, state, size, old.created if old else time.time())
            await self.journal.put(rec)
            if old is None:
                self._seq += 1
            rec.state = {}
            self._add(rec)
            self._edits[f.ino] = f.edits
            self._place(f.ino)

    def _place(self, ino: int) -> None:
        loc = self.vfs.names.get(ino)
        if loc is not None:
            self._at[loc] = ino
            self._loc[ino] = loc

    def _add(self, rec: Record) -> None:
        old = self.pending.get(rec.ino)
        self.bytes += rec.bytes - (old.bytes if old else 0)
        self.pending[rec.ino] = rec
        self._work.set()

    async def room(self) -> None:
        """Wait while more than ``limit`` bytes (or ``MAX_PENDING_FILES`` files) are
        journalled and not committed."""
        while self.bytes > self.limit or len(self.pending) >= MAX_PENDING_FILES:
            await self._progress.wait()

    async def committed(self, parent: int, name: bytes) -> None:
        """Wait until the pending file at ``parent``/``name`` (if any) is committed.

        Before a rename or unlink of that name, so that the server sees them
        in this mount's order: another mount never sees a file at its new
        name without its content (a save by writing a temporary file and
        renaming it over the original is atomic for them too), and a commit
        never reaches a file this mount deleted or replaced meanwhile (which
        would save it as a conflicted copy).
        """
        new = self.vfs.files.get(self.new.get(parent, {}).get(name, 0))
        if new is not None:
            await self.created(new)
        ino = self._at.get((parent, name))
        while ino is not None and ino in self.pending:
            await self._progress.wait()

    # --- draining --------------------------------------------------------------

    async def run(self) -> None:
        """Drain pending files for as long as the mount runs."""
        waits = RETRY.delays()
        while True:
            if not self.pending:
                self._work = trio.Event()
                await self._work.wait()
            if await self._drain(list(self.pending)[:BATCH_FILES]):
                waits = RETRY.delays()
            else:
                await trio.sleep(next(waits))

    async def drained(self, give_up: float | None = None) -> bool:
        """Wait until nothing is pending; False if ``give_up`` seconds pass without progress."""
        while self.pending:
            with trio.move_on_after(give_up if give_up is not None else float("inf")):
                await self._progress.wait()
                continue
            return False
        return True

    async def _drain(self, inos: list[int]) -> bool:
        """Commit a batch of pending files, in order; whether any record was removed."""
        # The batch's files: their prepared commits, None for nothing to
        # commit, missing if preparing failed.
        prepared: dict[int, Prepared | None] = {}
        answers: dict[int, list] = {}
        made: dict[int, list] = {}   # the answers to the creates sent with their commits
        ready = {ino: trio.Event() for ino in inos}
        answered = trio.Event()
        done: list[int] = []   # inos whose records were removed
        async with trio.open_nursery() as nursery:
            for ino in inos:
                nursery.start_soon(self._file, ino, prepared, ready[ino], answered,
                                   (made, answers), done)
            for ev in ready.values():
                await ev.wait()
            batch: list[int] = []
            ops: list[list] = []
            for ino in inos:  # the longest prefix of prepared files, to keep the order
                if ino not in prepared:
                    break
                p = prepared[ino]
                if p is not None:
                    batch.append(ino)
                    c = self.vfs.files[ino].creating   # stays, under the file's lock
                    if c is not None:
                        ops.append(["mknod", c["op_id"], {
                            **{k: c[k] for k in ("parent", "name", "mode", "uid", "gid")},
                            "ino": ino, "lessee": self.journal.lessee, "keep": True}])
                    ops.append(["commit", self.pending[ino].op_id, p.args])
            if batch:
                self._token = self.vfs.drops
                replies = iter(await self._send(ops))
                for ino in batch:
                    if self.vfs.files[ino].creating is not None:
                        made[ino] = next(replies)
                    answers[ino] = next(replies)
                # Durably forgotten before any staged byte is freed (``adopt``).
                await self.journal.remove([(ino, self.pending[ino].op_id) for ino in batch
                                           if answers[ino][0] == 0])
            answered.set()
        for ino in done:
            f = self.vfs.files.get(ino)
            if f is not None and self.vfs.forget(f):
                self.vfs.spawn(self.vfs.call, "purge", ino=self.vfs.srv(ino))
        if done or made:
            self._progress.set()
            self._progress = trio.Event()
        return bool(done)

    def _forget(self, ino: int, done: list[int]) -> None:
        """``ino``'s record is removed from the journal: forget it here too.

        Called with the file's lock held (if it is open), so that a close
        waiting for it journals its later changes as a new record, with a
        new op_id, never under the committed record's.
        """
        self._edits.pop(ino, None)
        loc = self._loc.pop(ino, None)
        if loc is not None and self._at.get(loc) == ino:
            del self._at[loc]
        self.bytes -= self.pending.pop(ino).bytes
        done.append(ino)

    async def _file(self, ino: int, prepared: dict[int, Prepared | None], ready: trio.Event,
                    answered: trio.Event, replies: tuple[dict[int, list], dict[int, list]],
                    done: list[int]) -> None:
        """One file of a batch: prepared under its lock, held until the batch is answered.

        ``prepared[ino]`` is None when there is nothing to commit (the file
        was discarded since, e.g. saved aside, or deleted and closed: its
        bytes are gone as on a local disk), and missing if preparing failed
        (a store outage): then it and the files after it wait for the next
        batch. ``replies``: the answers to the batch's creates and commits.
        """
        made, answers = replies
        f = self.vfs.files.get(ino)
        rec = self.pending[ino]
        async with f.lock if f is not None else contextlib.nullcontext():
            try:
                if f is not None and f.ino in self.vfs.orphans and not f.handles:
                    f.discard()
                prepared[ino] = await f.prepare() if f is not None and f.modified else None
            except Exception as e:
                log.warning("write-back of inode %d not ready: %s; retrying", ino,
                            fs_error(e) or e)
            finally:
                ready.set()
            await answered.wait()
            if ino not in prepared:
                return
            p = prepared[ino]
            if p is None:
                await self.journal.remove([(ino, rec.op_id)])
                if f is not None and f.creating is not None:  # discarded before its create
                    self.vfs.uncreated(f.ino, f.creating["parent"], f.creating["name"])
                    self._applied(f)
                self._forget(ino, done)
                return
            answer = answers.get(ino)
            if answer is None:
                return  # not sent: a file before it failed to prepare
            assert f is not None
            create = made.get(ino)
            if create is not None and create[0] == 0:
                self._placed(f, create[1])
            elif create is not None:
                log.error("write-back create of inode %d refused: %s", ino,
                          os.strerror(create[0]))
            if answer[0] == 0:  # its record is removed already (``_drain``)
                self._forget(ino, done)
                await f.adopt(answer[1], p.extents)
                self.vfs.committed(f, bool(answer[1].get("conflict")), self._token)
                return
            if answer[0] == errno.EAGAIN:
                # Block GC collected blocks of it meanwhile (a drain more than
                # the grace after its uploads): they are put again, and the
                # record stays for the next batch, under the same op_id (a
                # refused operation left no trace on the server).
                try:
                    await f.put_again(p)
                except Exception as e:  # the next batch tries again
                    log.warning("write-back of inode %d: its blocks not put again: %s", ino,
                                fs_error(e) or e)
                return
            log.error("write-back commit of inode %d refused: %s", ino,
                      os.strerror(answer[0]) if isinstance(answer[1], dict) else answer[1])
            if await self.vfs.save_aside(f):
                await self.journal.remove([(ino, rec.op_id)])
                if f.creating is not None:  # never created: gone from here too
                    self.vfs.uncreated(f.ino, f.creating["parent"], f.creating["name"])
                    self._applied(f)
                self._forget(ino, done)

    def _placed(self, f: OpenFile, attr: dict) -> None:
        """``f``'s create was applied: where the server put it (``mknod``'s ``keep``)."""
        assert f.creating is not None
        asked = (f.creating["parent"], f.creating["name"])
        self._applied(f)
        if (attr["parent"], attr["name"]) != asked:
            # The name was taken by another mount meanwhile (a conflicted
            # copy's name), or the directory removed (the volume's root).
            self.vfs.moved_by_server(f.ino, asked, (attr["parent"], attr["name"]))

    async def _send(self, ops: list[list]) -> list[list]:
        """Send a batch of commits until it is answered (the same op_ids every time).

        An outage fails a call with EIO after the client's outage timeout: the
        batch is sent again, as a replay (each commit is applied once). Any
        other error of the whole request is every commit's answer.
        """
        waits = RETRY.delays()
        while True:
            try:
                return await self.vfs.client.call("batch", ops=ops)
            except FSError as e:
                if e.errno != errno.EIO:
                    return [[e.errno, e.message]] * len(ops)
                log.warning("write-back of %d files waits for the metaserver: %s", len(ops),
                            e.message)
            await trio.sleep(next(waits))
