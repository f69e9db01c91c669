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
It yields to a burst of requests (``run``: a batch at least every
``PACE`` seconds until the burst pauses). With a backlog (a full batch
waiting, and a batch due), two batches overlap (``_Flight``):
the next one is taken and prepared while the server applies this one, and
is sent once this one is answered, and only if this one was sent whole
(else it is not sent: its records wait for the next batch, behind those
left over): the server still gets the records in journal order, one batch
at a time, and the mount's uploads no longer wait for the server's
transaction nor the reverse. Through an outage the next batch lets its
files go rather than hold their locks.
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

Directories and attribute changes (namespace write-back, continued): a
``mkdir`` (under a leased number, as a file's create) and a ``setattr`` of
an inode no file of this mount holds open (chmod, chown, utimens of a
directory, a symlink or a closed file: ``tar x`` sets them on every
directory it made) are journalled as operations of their own
(:class:`~nimbusfs.mount.journal.OpRecord`) and drained in the same order
as the files' records (one ``seq``), each applied once by its op_id. They
return before their record is durable: it joins the next group commit, so
it is durable before any later close or fsync returns, or ``OP_DELAY``
after it if none comes (a local disk makes a mkdir durable with the next
fsync after it, too). Only written records are drained. A setattr of the
inode whose setattr is the journal's last record, not in a batch in flight,
is merged into that record (``_coalesce``: ``tar x`` sets a directory's
owner, mode and times in three calls). Until applied,
this mount shows them: a new directory's attributes and (empty) listing,
the files and directories made in it (``new``), an inode's changed
attributes (``changed``); a request that names such an inode to the
server waits for its operations (``settled``), so the server sees this
mount's operations on an inode in the order they were made. Refusals on
drain: a ``mkdir`` whose name was taken meanwhile is applied under the
conflicted copy's name beside it, one whose parent was removed in the
volume's root (``keep``, as a file's create); refused outright (quota, a
lease that is not this mount's) the directory is gone here too and
logged, and the entries made inside it are applied with ``keep`` in the
volume's root: nothing is dropped. A ``setattr`` refused (the inode was
deleted by another mount meanwhile) is logged and dropped: it changed
nothing but attributes of an inode gone. Every refused operation is also
appended, with its arguments, to ``conflicts.jsonl``.

Renames and unlinks (namespace write-back, continued) are journalled
operations too, checked by the VFS against this mount's view at call time.
Names changed here are an overlay (``entries``: parent -> name -> the
inode it names now, or None, and the operation that set it) that lookups
and listings consult before the server, until that operation is answered;
a pending file's record comes before a rename of it in the drain order
(its commit goes to the inode, wherever it is named). The server applies
them naming the inodes this mount saw: a source that is another inode now
is refused (ESTALE: nothing moves), a target another mount changed
meanwhile stays and the renamed file takes the conflicted copy's name
(``keep``); an unlink of a name that is another inode's now is refused.
Refused, both names show the server's entries again; logged as the others.

Removals, symlinks and links (namespace write-back, continued): an
``rmdir`` is journalled as an unlink is, checked at call time against this
mount's view (empty: the server's listing less the names removed here plus
those made here); it drains after the operations on the entries it held,
in the one order, naming the inode this mount removed: the server refuses
it if the name is another inode's by then (ESTALE) or another mount put an
entry in it meanwhile (ENOTEMPTY); then the directory and that entry show
again, logged, nothing dropped. A directory made and removed here before
draining sends both records (the mknod, then the rmdir): no cancelling,
which would have to prove that nothing between them depended on the
directory. A ``symlink`` is a create under a leased number, as a
directory's (its target in the record: ``readlink`` answers from it); a
``link`` names the existing inode (after its create if it was made here)
and is applied with ``keep`` (a name taken meanwhile gets the conflicted
copy's name beside it; an inode deleted meanwhile: refused, the name goes).

A record the server refuses whatever the batch (a whole ``batch`` request
refused, not for an outage: arguments it does not take) can never drain:
the records of that batch are sent one at a time until it is found, and
after ``REFUSALS`` tries that refusal is its answer (a file's bytes saved
under ``recovered/``, an operation logged), so the records after it drain,
at a replay too. A request waiting for the drain of what it names waits
no longer than the outage timeout while the drainer cannot reach the
server or the store (``_until``): EIO, the journal untouched.

Backpressure: past ``limit`` bytes journalled and not yet committed (or
``MAX_PENDING_FILES`` files), writes wait for the drainer (``room``); they
never fail for it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from nimbusfs import metrics
from nimbusfs.errors import FSError, fs_error
from nimbusfs.mount.filedata import OpenFile, Prepared
from nimbusfs.mount.journal import CREATES, Journal, OpRecord, Record
from nimbusfs.posix import RENAME_EXCHANGE, merge_setattrs
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
# Operations kept for the next ``write_now`` past which those already written
# by their groups are dropped (a long run of setattrs writes nothing at once).
UNWRITTEN = 4096
# Inode numbers asked for at a time (``lease_inodes``), and how few left
# start the next lease in the background, so that a create rarely waits.
LEASE = 1024
LEASE_LOW = 256
# How long a journalled namespace operation waits for a close to write it
# in the same group commit (one fsync for both) before it is written alone.
OP_DELAY = 0.005
# The drain yields to the mount's requests (``run``): a batch is taken once
# the mount is quiet (``Activity``), or ``PACE`` seconds after the last one
# was taken, or at once while a request or an unmount waits for the drain
# (``_want``) or the oldest record waiting is ``MAX_LAG`` seconds old (a
# burst that lasts: the backlog stops growing).
PACE = 1.0
MAX_LAG = 30.0
# Waits between drain attempts that made no progress (the store or the
# metaserver is down), and between sends of a batch through an outage.
RETRY = Backoff(first=0.1, cap=5.0)
# Times a record sent alone is refused as a whole (not an outage) before that
# is its answer (``_send``).
REFUSALS = 3


class Entry(NamedTuple):
    """A name changed here that the server has not applied yet: the (server) inode it
    names now (None: removed here), and the op_id of the operation that made it so (a
    create, a mkdir, a rename, an unlink). That operation's answer ends it, unless a
    later operation changed the name again (then that one's does)."""

    ino: int | None
    by: str


class _Touched(NamedTuple):
    """What an operation touches until answered (``_touches``)."""

    named: list[int]     # inodes it names: requests naming them to the server wait for it
    inside: list[int]    # directories whose names it changes (``drained`` waits for them)
    changed: list[int]   # inodes whose attributes it changes (``WriteBack.changed``)
    unlinked: list[int]  # inodes it removes a link of
    linked: list[int]    # inodes it adds a link to
    setting: list[int]   # inodes it sets attributes of: requests that change them wait


def _touches(rec: OpRecord) -> _Touched:
    """What ``rec`` touches until answered. A link names no inode: the server knows the
    inode it links, and a request naming it (an open) need not wait for the new name. A
    setattr names none either: the server knows the inode, and what it changes shows
    here meanwhile (``changed``); only a request that changes the inode's attributes
    too, or removes it, waits for it (``setting``, ``settled``)."""
    a = rec.args
    if rec.op == "rename":
        exchange = a["flags"] & RENAME_EXCHANGE
        gone = [a["replaces"]] if a["replaces"] is not None and not exchange else []
        others = [a["replaces"]] if a["replaces"] is not None else []
        return _Touched(gone, [a["parent"], a["new_parent"]], [rec.ino, *others], gone, [], [])
    if rec.op == "unlink":
        return _Touched([rec.ino], [a["parent"]], [rec.ino], [rec.ino], [], [])
    if rec.op == "rmdir":
        return _Touched([rec.ino], [a["parent"]], [], [], [], [])
    if rec.op == "link":
        return _Touched([], [a["parent"]], [rec.ino], [], [rec.ino], [])
    if rec.op == "setattr":
        return _Touched([], [], [rec.ino], [], [], [rec.ino])
    return _Touched([rec.ino], [], [], [], [], [])   # a create


def _places(rec: OpRecord) -> list[tuple[int, bytes]]:
    """The names ``rec`` changes (server parent, name)."""
    a = rec.args
    if rec.op == "rename":
        return [(a["parent"], a["name"]), (a["new_parent"], a["new_name"])]
    return [] if rec.op == "setattr" else [(a["parent"], a["name"])]


class _Flight:
    """One batch of the drain (``WriteBack._drain``): its records and how it went."""

    def __init__(self, items: list[int | OpRecord]) -> None:
        self.items = items
        self.files = {i for i in items if isinstance(i, int)}
        self.ops = {i.seq for i in items if isinstance(i, OpRecord)}
        self.prepared = trio.Event()   # its files prepared (or failed to): take the next
        self.done = trio.Event()       # answered, or given up: the next may be sent
        # Every record of it was sent and answered (the batch after it may
        # then be sent: the order holds), and whether any record was removed.
        self.whole = False
        self.progress = False


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
        self._seq = journal.next_seq()
        # Namespace write-back: leased inode numbers not used yet, and the
        # overlay of names changed here that the server has not applied yet
        # (server parent -> name -> Entry): lookups and listings answer from it
        # before the server's answer.
        self.free: list[int] = journal.leases()
        self._leasing = trio.Lock()
        self.entries: dict[int, dict[bytes, Entry]] = {}
        # Namespace operations journalled and not answered yet (seq -> record),
        # how many of them name each inode (its create, its removal: a request
        # naming it to the server waits for them) and set its attributes (one
        # changing them waits for those too), how many change names in each
        # directory, the inodes they create (directories, symlinks: ino -> their
        # mknod or symlink), their changes of attributes (ino -> seq -> changes),
        # links removed and links added (ino -> count).
        self.ops: dict[int, OpRecord] = {}
        self._naming: dict[int, int] = {}
        self._setting: dict[int, int] = {}
        self._inside: dict[int, int] = {}
        self.new: dict[int, OpRecord] = {}
        self._changes: dict[int, dict[int, dict[str, int]]] = {}
        self._links: dict[int, int] = {}
        self._linked: dict[int, int] = {}
        self._token = 0   # VFS.drops when the batch being answered was sent
        self._work = trio.Event()       # set when a record is added
        self._progress = trio.Event()   # set (and replaced) when records are removed
        # Whether the drainer's last attempt failed for an outage (a batch
        # not answered within the outage timeout, a file not prepared: the
        # store or the server out of reach), until a record is removed; and
        # set (and replaced) on removals and on each such failure: what a
        # bounded wait (``_until``) wakes up for.
        self._down = False
        self._news = trio.Event()
        # A batch was refused as a whole (``_send``): records are sent one at
        # a time until the one at fault is found; (seq, times) it was refused.
        self._solo = False
        self._refusals = (0, 0)
        # The records of the batches in flight (files by inode, operations by
        # seq): the next batch is taken from the others.
        self._flying_files: set[int] = set()
        self._flying_ops: set[int] = set()
        # Every record queued, as (seq, inode or -1 for an operation), a heap
        # in drain order, so that taking a batch costs what it takes, not the
        # number of records waiting (a scan of all 16,000 records of a ``tar
        # x`` for each of its 80 batches was a fifth of the drain's CPU). An
        # entry whose record is gone (answered, or a file's record removed)
        # is dropped when it reaches the top; the records of a batch stay in
        # it until they are answered, so a batch not sent needs no undoing.
        self._order: list[tuple[int, int]] = []
        # The last operation journalled, until answered: a setattr of its
        # inode journalled right after it may be merged into it (``_coalesce``).
        self._tail: OpRecord | None = None
        # Operations journalled (or merged into) and not yet written at once
        # (``write_now``), by seq, and the write in flight.
        self._unwritten: dict[int, OpRecord] = {}
        self._writing: trio.Event | None = None
        # Pacing (``run``): tasks waiting for the drain, the pause they cut
        # short, and when the last batch was taken.
        self._wanted = 0
        self._pausing: trio.CancelScope | None = None
        self._taken = float("-inf")

    # --- recording -------------------------------------------------------------

    def replay(self) -> int:
        """Rebuild the journal's pending files as open files and its operations (at start,
        before mounting), in drain order: the overlay of names ends as this mount left it."""
        records: list[Record | OpRecord] = [*self.journal.records(), *self.journal.ops()]
        for rec in sorted(records, key=lambda r: r.seq):
            if isinstance(rec, OpRecord):
                self._hold(rec)
                continue
            f = OpenFile.restore(self.vfs, rec.ino, rec.state)
            hint = rec.state["hint"]
            if hint:
                self.vfs.names[rec.ino] = (hint["parent"], hint["name"])
            self.vfs.files[rec.ino] = f
            if f.creating is not None:
                self._name(f.creating["parent"], f.creating["name"], rec.ino,
                           f.creating["op_id"])
            self._add(rec)
        return len(self.pending) + len(self.ops)

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
        self._name(parent, name, f.ino, f.creating["op_id"])

    def mkdir(self, parent: int, name: bytes, attr: dict[str, Any]) -> None:
        """Journal the create of the directory ``attr`` (under a leased number) at
        ``parent``/``name``. This mount shows it at once (``dirs``, ``new``);
        the server gets it in journal order, with ``keep``."""
        self._journal("mknod", {
            "parent": parent, "name": name, "mode": attr["mode"], "uid": attr["uid"],
            "gid": attr["gid"], "ino": attr["ino"], "lessee": self.journal.lessee,
            "keep": True}, attr)

    def rename(self, places: tuple[int, bytes, int, bytes], flags: int, src: int,
               dst: int | None, now: int) -> None:
        """Journal rename(2) of (server) ``places`` (parent, name, new parent, new name) with
        ``flags``, which this mount checked: inode ``src`` there, ``dst`` (None: none) at
        the target. Shown at once (``entries``); the server gets it in journal order, with
        ``keep`` (``namespace.rename``: a name another mount changed meanwhile is not
        replaced)."""
        parent, name, new_parent, new_name = places
        self._journal("rename", {
            "parent": parent, "name": name, "new_parent": new_parent, "new_name": new_name,
            "flags": flags, "ino": src, "replaces": dst, "keep": True}, {"ctime": now})

    def unlink(self, parent: int, name: bytes, ino: int, now: int) -> None:
        """Journal the unlink of inode ``ino`` at (server) ``parent``/``name``; shown at
        once (``entries``, its link count)."""
        self._journal("unlink", {"parent": parent, "name": name, "ino": ino}, {"ctime": now})

    def rmdir(self, parent: int, name: bytes, ino: int) -> None:
        """Journal the removal of the (empty, as this mount shows it) directory ``ino`` at
        (server) ``parent``/``name``; shown at once (``entries``). The server refuses it
        if the name is another inode's by then (ESTALE) or if another mount put entries
        in it meanwhile (ENOTEMPTY): the directory and those entries stay."""
        self._journal("rmdir", {"parent": parent, "name": name, "ino": ino}, {})

    def symlink(self, parent: int, name: bytes, target: bytes, attr: dict[str, Any]) -> None:
        """Journal the create of the symlink ``attr`` (under a leased number) to ``target``
        at ``parent``/``name``: shown at once (``new``, ``entries``), applied as a
        directory's ``mkdir`` is (``keep``)."""
        self._journal("symlink", {
            "parent": parent, "name": name, "target": target, "uid": attr["uid"],
            "gid": attr["gid"], "ino": attr["ino"], "lessee": self.journal.lessee,
            "keep": True}, attr)

    def link(self, ino: int, parent: int, name: bytes, now: int) -> None:
        """Journal link(2) of (server) inode ``ino`` at ``parent``/``name``: shown at once
        (``entries``, its link count and ctime); applied with ``keep`` (a name another
        mount took meanwhile gets the conflicted copy's name beside it)."""
        self._journal("link", {"parent": parent, "name": name, "ino": ino, "keep": True},
                      {"ctime": now})

    def setattr(self, ino: int, changes: dict[str, int]) -> None:
        """Journal chmod/chown/utimens ``changes`` of ``ino``.

        For an inode no file of this mount holds open (an open file's changes
        go with its commit): the VFS shows them at once (``changed``).
        Merged into the journal's last record if that is a setattr of ``ino``
        too (``_coalesce``).
        """
        local = {**changes, "ctime": time.time_ns()}
        if not self._coalesce(ino, changes, local):
            self._journal("setattr", {"ino": ino, **changes}, local)

    def _coalesce(self, ino: int, changes: dict[str, int], local: dict[str, int]) -> bool:
        """Merge a setattr of ``ino`` into the journal's last record (``_tail``) if that is
        a setattr of ``ino`` no batch in flight holds; whether it was merged.

        ``tar x`` sets each directory's owner, mode and times one after
        another: three records, a third of its drain. Merged, they are one
        operation under the first's op_id and place in the drain order, doing
        exactly what the two did (``merge_setattrs``; refused where no single
        setattr does). Only the tail: with no record journalled between the
        two, no other record moves relative to the change: what other mounts
        see stays a prefix of what was done here (and a directory's utimens is
        never moved before a create in it, whose time would then be the
        directory's). Not a record in flight: a batch taken may be sent at any
        moment, and what was sent under an op_id must not change (one that
        came back unsent is free again: the server has not applied it).

        Durable as the new record would have been: with the group being
        filled (``Journal.update_op``). The record's ``args`` and ``local``
        are replaced, never changed in place (a group being written in a
        worker thread may be packing the old ones). A record already written
        may be drained before its rewrite is: the server then has the merged
        changes before this disk does, and a crash meanwhile replays the row's
        older ones under an op_id already applied (not applied again). Shown
        at once, as a new record's; unshown with the one answer (``_unhold``).
        """
        rec = self._tail
        if (rec is None or rec.seq != self._seq - 1 or rec.op != "setattr" or rec.ino != ino
                or rec.seq in self._flying_ops):
            return False
        merged = merge_setattrs({k: v for k, v in rec.args.items() if k != "ino"}, changes)
        if merged is None:
            return False
        rec.args = {"ino": ino, **merged}
        rec.local = {**rec.local, **local}
        self._changes[ino][rec.seq].update(local)
        self._unwrite(rec)
        group = self.journal.update_op(rec)
        if group is not None:
            self.vfs.spawn(self._commit_soon, group)
        return True

    def _journal(self, op: str, args: dict[str, Any], local: dict[str, Any]) -> None:
        """Journal ``op``: shown at once, drained once its record is written.

        The record joins the journal's group being filled (``OP_DELAY``).
        Records journalled later are in the same group commit or a later
        one, so they are never drained before it. A record that could not be
        written (the cache disk failed) is drained all the same, from memory:
        the mount shows it already.
        """
        rec = OpRecord(self._seq, uuid.uuid4().hex, op, args, local, time.time())
        self._unwrite(rec)
        self._seq += 1
        self._tail = rec
        self._show(rec)
        group = self.journal.add_op(rec, lambda: self._queue(rec))
        if group is not None:
            self.vfs.spawn(self._commit_soon, group)

    def _unwrite(self, rec: OpRecord) -> None:
        """``rec`` is new or changed: the next ``write_now`` writes it. Those its group
        wrote since are dropped now and then (a setattr alone writes nothing now)."""
        self._unwritten[rec.seq] = rec
        if len(self._unwritten) > UNWRITTEN:
            self._unwritten = {s: r for s, r in self._unwritten.items() if not r.grouped}

    async def write_now(self) -> None:
        """Return once the operations journalled so far are written (not durably).

        The end of every request that journals an operation naming entries
        (all but setattr), after its changes are shown, so that a kill of the
        mount cannot lose one that returned (``Journal.write_now``), not only
        a crash of the machine within the group's delay: applications commit
        by unlink and rename (SQLite's journal, an editor's save), never by a
        chmod or utimens. A setattr's row is written with the next such
        request's or its group, whichever comes first: what a kill of the
        mount leaves is still a prefix of what was done (a chmod before a
        rename is never lost while the rename is kept). Usually written at
        once, without an await; a request finding another's write in flight
        (the journal's worker thread held it) waits for it, then writes what
        is left.
        """
        while self._unwritten or self._writing is not None:
            if self._writing is not None:
                await self._writing.wait()
                continue
            recs, self._unwritten = list(self._unwritten.values()), {}
            self._writing = writing = trio.Event()
            try:
                await self.journal.write_now(recs)
            finally:
                self._writing = None
                writing.set()

    async def _commit_soon(self, group: Any) -> None:
        await trio.sleep(OP_DELAY)
        await self.journal.commit(group)

    def _hold(self, rec: OpRecord) -> None:
        """A record of the journal at start: shown and drained."""
        self._show(rec)
        self._queue(rec)

    def _queue(self, rec: OpRecord) -> None:
        self.ops[rec.seq] = rec
        heapq.heappush(self._order, (rec.seq, -1))
        self._work.set()

    def _show(self, rec: OpRecord) -> None:
        """This mount shows ``rec`` from now until it is answered (``_unhold``)."""
        for ino in self._count(rec, 1):
            self._changes.setdefault(ino, {})[rec.seq] = dict(rec.local)
        a = rec.args
        if rec.op in CREATES:
            self.new[rec.ino] = rec
        if rec.op in ("mknod", "symlink", "link"):
            self._name(a["parent"], a["name"], rec.ino, rec.op_id)
        elif rec.op in ("unlink", "rmdir"):
            self._name(a["parent"], a["name"], None, rec.op_id)
        elif rec.op == "rename":
            exchange = a["flags"] & RENAME_EXCHANGE
            self._name(a["parent"], a["name"], a["replaces"] if exchange else None, rec.op_id)
            self._name(a["new_parent"], a["new_name"], rec.ino, rec.op_id)
            # Where a conflicted copy of a pending file goes: its name now.
            self.vfs.names[self.vfs.fuse(rec.ino)] = (a["new_parent"], a["new_name"])
            if exchange:
                self.vfs.names[self.vfs.fuse(a["replaces"])] = (a["parent"], a["name"])

    def _unhold(self, rec: OpRecord) -> None:
        """``rec`` was answered (applied or refused): this mount shows the server's state."""
        del self.ops[rec.seq]
        if self._tail is rec:
            self._tail = None   # applied: a later setattr is a record of its own
        for ino in self._count(rec, -1):
            changes = self._changes[ino]
            del changes[rec.seq]
            if not changes:
                del self._changes[ino]
        if rec.op in CREATES:
            del self.new[rec.ino]
        for parent, name in _places(rec):
            self._unname(parent, name, rec.op_id)

    def _count(self, rec: OpRecord, step: int) -> list[int]:
        """Add ``step`` to the counts of the inodes ``rec`` names, the directories whose
        names it changes and the inodes it removes or adds a link of (``_touches``; a
        count of 0 is removed); the inodes whose attributes it changes."""
        t = _touches(rec)
        for counts, inos in ((self._naming, t.named), (self._inside, t.inside),
                             (self._links, t.unlinked), (self._linked, t.linked),
                             (self._setting, t.setting)):
            for ino in inos:
                n = counts.get(ino, 0) + step
                assert n >= 0, f"{rec.op} {rec.seq}: inode {ino} counted down below 0"
                if n:
                    counts[ino] = n
                else:
                    del counts[ino]
        return t.changed

    def _name(self, parent: int, name: bytes, ino: int | None, by: str) -> None:
        """``parent``/``name`` names ``ino`` (None: nothing) here, by the operation ``by``."""
        self.entries.setdefault(parent, {})[name] = Entry(ino, by)

    def _unname(self, parent: int, name: bytes, by: str) -> None:
        """The operation ``by`` was answered: its entry goes, unless a later one changed the
        name again (that one's answer ends it)."""
        names = self.entries.get(parent, {})
        e = names.get(name)
        if e is not None and e.by == by:
            del names[name]
            if not names:
                del self.entries[parent]

    def entry(self, parent: int, name: bytes) -> Entry | None:
        """What this mount changed at (server) ``parent``/``name`` and the server has not
        applied yet; None: nothing (the server's answer is this mount's)."""
        return self.entries.get(parent, {}).get(name)

    def unlinked(self, ino: int) -> int:
        """Links of (server) inode ``ino`` removed here and not applied yet, less those
        added here (negative: more added)."""
        return self._links.get(ino, 0) - self._linked.get(ino, 0)

    def made(self, ino: int) -> dict[str, Any] | None:
        """The attributes of (server) inode ``ino`` if it is a directory or a symlink made
        here that the server does not know yet."""
        rec = self.new.get(ino)
        return None if rec is None else rec.local

    def target(self, ino: int) -> bytes | None:
        """The target of (server) inode ``ino`` if it is a symlink made here that the
        server does not know yet."""
        rec = self.new.get(ino)
        return rec.args["target"] if rec is not None and rec.op == "symlink" else None

    def touched(self, ino: int, now: int) -> None:
        """An entry was made here in directory ``ino`` at ``now``, after its journalled
        setattrs: the server will apply them first, then move its times to the
        create's, so this mount shows those times from now on."""
        for change in self._changes.get(ino, {}).values():
            if "mtime" in change:
                change["mtime"] = now
            change["ctime"] = now

    def changed(self, ino: int) -> dict[str, int] | None:
        """The journalled setattr changes of (server) inode ``ino`` not applied yet, merged."""
        changes = self._changes.get(ino)
        if changes is None:
            return None
        merged: dict[str, int] = {}
        for c in changes.values():   # in seq order: a later change wins
            merged.update(c)
        return merged

    async def settled(self, ino: int, name: bytes | None = None, reading: bool = False
                      ) -> None:
        """Return once the server has applied (or refused) every journalled operation
        naming (server) inode ``ino`` and, unless ``reading``, every setattr of it; with
        ``name`` every one changing that name in it: before a request that names it to
        the server. A request that only reads (a lookup in it, an open of it for
        writing) gets the server's answer as it is, this mount's pending changes of
        attributes shown on it (``VFS._out``): it does not wait behind a backlog for a
        chmod or utimens (``tar x`` sets the times of each directory it made at its
        end). EIO through an outage (``_until``)."""
        await self._until(lambda: not self._naming.get(ino)
                          and (reading or not self._setting.get(ino))
                          and (name is None or self.entry(ino, name) is None))

    async def _until(self, ready: Callable[[], bool],
                     step: Callable[[], Awaitable[None]] | None = None) -> None:
        """Wait until ``ready()`` (checked after each drain), running ``step`` before each
        wait; FSError(EIO) once the outage timeout has passed while the drainer is
        down (its last attempt failed for an outage).

        So a request waiting for the drain of what it names fails as a call to
        an unreachable server does, and never hangs the mount: the journal is
        untouched (the records drain once the server is back, and the request
        may be retried then). A drain that is slow but making progress (a long
        queue, a large upload) is waited for: the timeout bounds an outage,
        not the work ahead. ``step`` must be safe to cancel (``stage`` is).
        """
        if ready():
            return
        with self._want():
            timeout = self.vfs.client.outage_timeout
            deadline = trio.current_time() + timeout
            while not ready():
                news = self._news   # set by a drain that ends while ``step`` runs
                if trio.current_time() < deadline:
                    with trio.move_on_at(deadline):
                        if step is not None:
                            await step()
                        await news.wait()
                    continue
                # The timeout passed: down now, or at the drainer's next failure,
                # is EIO; its next progress starts the bound again.
                if not self._down:
                    await news.wait()
                    if not self._down:
                        deadline = trio.current_time() + timeout
                        continue
                raise FSError(errno.EIO, "the write-back journal cannot drain (the metaserver or"
                              " the store is out of reach): what it holds drains once it is back")

    async def created(self, f: OpenFile) -> None:
        """Return once the server knows ``f`` (journalled now if it was not yet).

        Before an operation that names the file to the server (link, xattrs,
        a chmod that cannot wait for the commit).
        EIO through an outage (``_until``).
        """
        await self._until(lambda: f.creating is None or self.vfs.files.get(f.ino) is not f,
                          lambda: self.stage(f))

    def _applied(self, f: OpenFile) -> None:
        """``f``'s create is applied (or given up, its bytes saved aside): not new any more."""
        assert f.creating is not None
        self._unname(f.creating["parent"], f.creating["name"], f.creating["op_id"])
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
            st = f.staging
            size = f.staged_bytes()
            inline = st is not None and size <= INLINE_BYTES and not f.ahead_pieces
            if st is not None and not inline:
                # Before the snapshot, which names the file (a staging area
                # in memory makes its file now).
                await trio.to_thread.run_sync(st.sync)
            state = f.snapshot()
            state["hint"] = self.vfs.commit_hint(f.ino) or None
            if inline:
                assert st is not None
                state["inline"] = [[a, st.read(a, b - a)] for a, b in state["dirty"]]
                state["staging"] = None
            old = self.pending.get(f.ino)
            seq = old.seq if old else self._seq
            if old is None:
                # Taken before the journal write's await: records journalled
                # meanwhile (another close, a mkdir) come after it, never beside it.
                self._seq += 1
            rec = Record(f.ino, seq, old.op_id if old else uuid.uuid4().hex, state, size,
                         old.created if old else time.time())
            # Not cancelled once the record is queued (a bounded wait, ``_until``):
            # the journal row and this bookkeeping go together.
            with trio.CancelScope(shield=True):
                await self.journal.put(rec)
                rec.state = {"staging": state["staging"]}   # the rest is the OpenFile's
                self._add(rec)
                self._edits[f.ino] = f.edits

    def _add(self, rec: Record) -> None:
        old = self.pending.get(rec.ino)
        self.bytes += rec.bytes - (old.bytes if old else 0)
        self.pending[rec.ino] = rec
        if old is None:   # a later close of a pending file keeps its place
            heapq.heappush(self._order, (rec.seq, rec.ino))
        self._work.set()

    async def room(self) -> None:
        """Wait while more than ``limit`` bytes (or ``MAX_PENDING_FILES`` files) are
        journalled and not committed."""
        while self.bytes > self.limit or len(self.pending) >= MAX_PENDING_FILES:
            with self._want():
                await self._progress.wait()

    # --- draining --------------------------------------------------------------

    async def run(self) -> None:
        """Drain pending files for as long as the mount runs.

        A batch is taken once the one before it is answered or, if a full
        batch (``BATCH_FILES`` records) waits, once it is prepared: then two
        are in flight, one prepared while the other is sent. (Taken early
        with fewer, batches stay small and the server makes more
        transactions for the same records: ``tar x`` of 4,000 entries made
        1,980 instead of 904, its CPU 3.4 s instead of 2.8.) After a batch that
        made no progress (an outage), the drainer waits (``RETRY``); after one
        not sent whole, the batch taken meanwhile is not sent, and the next
        is taken afresh from the first records in drain order.

        Pacing: the drain yields to the mount's requests. A batch is taken once
        the mount is quiet (``Activity``: an idle mount or one answering a
        few requests at once, so that a change there is drained as soon as
        it is made), else ``PACE`` seconds after
        the last one was taken; and at once while a task waits for the drain
        (``_want``: a request naming a pending name, a writer past the limit,
        an unmount, the replay at start) or once the oldest record waiting is
        ``MAX_LAG`` seconds old (a burst that lasts drains as it did before:
        its backlog, and what a waiting request waits behind, stop growing).
        Why: the drain shares the mount's interpreter (its GIL) and disk (the
        store's fsyncs beside the journal's). Drained beside a
        ``tar x`` of 10,042 entries, ``tar`` returned after 24.7-28.3 s and
        everything was uploaded after 24.9-28.6; with the drain held until
        ``tar`` returned, 9.6-10.9 s and 22.3-23.5 (interleaved, load 2-3.5):
        both sooner (the shipped rule's own A/B is in docs/drain.md). Other
        mounts see a burst's records at ``BATCH_FILES`` per ``PACE`` or more
        while it lasts, and the rest after it; a request that waits for the
        drain waits for the records ahead of its own, which a burst leaves
        more of. The search for a record refused whole (``_solo``) is paced
        like any batch.
        """
        waits = RETRY.delays()

        async def wait_after(f: _Flight) -> None:
            nonlocal waits
            if f.progress:
                waits = RETRY.delays()
            else:
                await trio.sleep(next(waits))

        before: _Flight | None = None
        async with trio.open_nursery() as nursery:
            while True:
                if before is not None and before.done.is_set() and not before.whole:
                    await wait_after(before)
                    before = None   # taken afresh from the first records
                waiting = self._waiting()
                if not waiting or (waiting < BATCH_FILES and before is not None
                                   and not before.done.is_set()):
                    self._work = trio.Event()   # set by a record added, a batch ended
                    await self._work.wait()
                    continue
                now = trio.current_time()
                if not (self._wanted or now >= self._taken + PACE
                        or not self.vfs.activity.quiet_in(now) or self._lag() >= MAX_LAG):
                    await self._pace()
                    continue
                self._taken = now
                flight = _Flight(self._next())
                self._flying_files |= flight.files
                self._flying_ops |= flight.ops
                nursery.start_soon(self._drain, flight, before)
                await flight.prepared.wait()
                if before is None:
                    before = flight
                    continue
                await before.done.wait()
                if not before.whole:
                    await flight.done.wait()   # not sent: its records are free again
                await wait_after(before)
                before = flight if before.whole else None

    def _waiting(self) -> int:
        """How many records wait that no batch in flight holds."""
        return (len(self.pending) - len(self._flying_files & self.pending.keys())
                + len(self.ops) - len(self._flying_ops & self.ops.keys()))

    def _next(self) -> list[int | OpRecord]:
        """The first ``BATCH_FILES`` records in drain order that no batch in flight holds
        (one while looking for a record refused as a whole, ``_solo``): files (by
        inode) and operations."""
        want = 1 if self._solo else BATCH_FILES
        order = self._order
        taken: list[int | OpRecord] = []
        seen: list[tuple[int, int]] = []
        while order and len(taken) < want:
            seq, ino = entry = heapq.heappop(order)
            if ino < 0:
                if seq not in self.ops:
                    continue   # answered
                flying = seq in self._flying_ops
            else:
                r = self.pending.get(ino)
                if r is None or r.seq != seq:
                    continue   # removed (a later record of the file has its own entry)
                flying = ino in self._flying_files
            seen.append(entry)
            if not flying:
                taken.append(self.ops[seq] if ino < 0 else ino)
        for entry in seen:
            heapq.heappush(order, entry)
        return taken

    async def drained(self, give_up: float | None = None) -> bool:
        """Wait until nothing is pending; False if ``give_up`` seconds pass without progress."""
        while self.pending or self._naming or self._setting or self._inside:
            with trio.move_on_after(give_up if give_up is not None else float("inf")), \
                    self._want():
                await self._progress.wait()
                continue
            return False
        return True

    def _lag(self) -> float:
        """Seconds since the oldest record not yet answered was journalled (0: none)."""
        order = self._order
        while order:
            seq, ino = order[0]
            rec = self.ops.get(seq) if ino < 0 else self.pending.get(ino)
            if rec is not None and rec.seq == seq:
                return time.time() - rec.created
            heapq.heappop(order)   # answered, or a file's record removed (``_next``)
        return 0.0

    @contextlib.contextmanager
    def _want(self) -> Iterator[None]:
        """While inside, the drain takes its batches at once (``run``): a request, a
        writer past the limit or an unmount waits for it."""
        self._wanted += 1
        if self._pausing is not None:
            self._pausing.cancel()
        try:
            yield
        finally:
            self._wanted -= 1

    async def _pace(self) -> None:
        """Wait until the drain may take a batch (``run``): the mount's requests
        quiet, ``PACE`` seconds since the last batch was taken, the oldest record
        waiting ``MAX_LAG`` seconds old, or a task waiting for the drain."""
        start = trio.current_time()
        deadline = min(self._taken + PACE, start + MAX_LAG - self._lag())
        try:
            with trio.CancelScope(deadline=deadline) as self._pausing:
                while not self._wanted:
                    wait = self.vfs.activity.quiet_in(trio.current_time())
                    if not wait:
                        break
                    await trio.sleep(wait)
        finally:
            self._pausing = None
            metrics.WRITEBACK_PACED.observe(trio.current_time() - start)

    async def _drain(self, flight: _Flight, before: _Flight | None) -> None:
        """Commit a batch of pending files and operations, in order: prepared at once, sent
        once the batch ``before`` it was answered, and only if that one was sent
        whole (the journal's order). Whatever happens, ``flight.done`` is set at
        the end and its records are free for the next batch."""
        try:
            await self._fly(flight, before)
        finally:
            self._flying_files -= flight.files
            self._flying_ops -= flight.ops
            flight.prepared.set()
            flight.done.set()
            self._work.set()
            self._tell()

    async def _fly(self, flight: _Flight, before: _Flight | None) -> None:
        items = flight.items
        inos = [i for i in items if isinstance(i, int)]
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
            flight.prepared.set()
            # Sent once the batch before it is answered, and only if that one was
            # sent whole. Not through an outage that holds that one (``_down``):
            # this batch then lets its files go, so that their writes and closes
            # wait for no more than the batch in flight's, as without overlap.
            while before is not None and not before.done.is_set() and not self._down:
                news = self._news
                await news.wait()
            send = before is None or (before.done.is_set() and before.whole)
            batch: list[int] = []
            ops: list[list] = []
            sent: list[OpRecord] = []
            order: list[int | OpRecord] = []   # what was sent, in order
            cut = not send
            for item in items if send else []:  # the longest prefix of prepared files
                if isinstance(item, OpRecord):
                    sent.append(item)
                    order.append(item)
                    ops.append([item.op, item.op_id, item.args])
                    continue
                ino = item
                if ino not in prepared:
                    cut = True
                    break
                p = prepared[ino]
                if p is not None:
                    batch.append(ino)
                    order.append(ino)
                    c = self.vfs.files[ino].creating   # stays, under the file's lock
                    if c is not None:
                        ops.append(["mknod", c["op_id"], {
                            **{k: c[k] for k in ("parent", "name", "mode", "uid", "gid")},
                            "ino": ino, "lessee": self.journal.lessee, "keep": True}])
                    ops.append(["commit", self.pending[ino].op_id, p.args])
            op_answers: list[tuple[OpRecord, list]] = []
            whole = await self._send(ops, order) if ops else None
            flight.whole = not cut and (whole is not None or not ops)
            if whole is None:
                sent = []   # not applied: every record stays for the next batch
            else:
                metrics.WRITEBACK_BATCHES.inc()
                for name, n in collections.Counter(o[0] for o in ops).items():
                    metrics.WRITEBACK_OPS.labels(name).inc(n)
                replies = iter(whole)
                for item in order:
                    if isinstance(item, OpRecord):
                        op_answers.append((item, next(replies)))
                        continue
                    if self.vfs.files[item].creating is not None:
                        made[item] = next(replies)
                    answers[item] = next(replies)
                # Forgotten before any staged byte is freed (``adopt``); durably
                # if a record names a staging file (a replay would need it).
                # Without it, a removal lost to a crash of the machine only
                # sends its operations again: applied once, by their op_ids.
                ok = [ino for ino in batch if answers[ino][0] == 0]
                await self.journal.remove(
                    [(ino, self.pending[ino].op_id) for ino in ok], sent,
                    durable=any(self.pending[ino].state["staging"] for ino in ok))
            for rec, answer in op_answers:
                self._answered(rec, answer)
            answered.set()
        for ino in done:
            f = self.vfs.files.get(ino)
            if f is not None and self.vfs.forget(f):
                self.vfs.purge_soon(self.vfs.srv(ino))
        if done or made or sent:
            self._down = False
            self._progress.set()
            self._progress = trio.Event()
            self._tell()
        flight.progress = bool(done or sent)

    def _stalled(self) -> None:
        """An attempt failed for an outage: bounded waits past their timeout give up."""
        self._down = True
        self._tell()

    def _tell(self) -> None:
        self._news.set()
        self._news = trio.Event()

    def _answered(self, rec: OpRecord, answer: list) -> None:
        """The server answered the journalled operation ``rec`` (its row is removed)."""
        if answer[0] == 0 and rec.op in CREATES:
            asked = (rec.args["parent"], rec.args["name"])
            placed = (answer[1]["parent"], answer[1]["name"])
            if placed != asked:
                self.vfs.moved_by_server(rec.ino, asked, placed)
            # Its cached attributes stay this mount's estimate (as a parent's
            # of a create does): the server's moved with the creates in it.
        elif answer[0] == 0 and rec.op == "setattr":
            self.vfs.applied(rec.ino)
        elif answer[0] == 0:
            self.vfs.renamed(rec, answer[1], self._token)
        elif rec.op in ("rename", "unlink", "rmdir", "link"):
            # The server decided otherwise (a name another mount changed
            # meanwhile: ESTALE; a directory it removed, or put entries in:
            # ENOTEMPTY; an inode it deleted): nothing was moved, removed or
            # linked there, the names show the server's entries again.
            log.warning("write-back %s of inode %d refused (%s): this mount shows the"
                        " server's names", rec.op, rec.ino, answer[1])
            self.vfs.record_refused(rec.op, rec.args, answer)
            self.vfs.unrenamed(rec)
        elif rec.op in CREATES:
            # Refused outright (quota, a lease not this mount's): the entries
            # made inside a directory are applied with ``keep`` in the volume's root.
            log.error("write-back %s of inode %d refused: %s; the entries made in it (if"
                      " any) go to the volume's root", rec.op, rec.ino, answer[1])
            self.vfs.record_refused(rec.op, rec.args, answer)
            self.vfs.uncreated(rec.ino, rec.args["parent"], rec.args["name"])
        else:
            # Only attributes of an inode deleted meanwhile (by another mount,
            # or by this one: an rmdir does not wait for a chmod before it), or
            # a record this server can never take (``_send``): logged, as
            # every refused operation is, in conflicts.jsonl.
            log.warning("write-back setattr of inode %d refused (%s): dropped", rec.ino,
                        answer[1])
            self.vfs.record_refused(rec.op, rec.args, answer)
            self.vfs.refused(rec.ino)
        self._unhold(rec)

    def _forget(self, ino: int, done: list[int]) -> None:
        """``ino``'s record is removed from the journal: forget it here too.

        Called with the file's lock held (if it is open), so that a close
        waiting for it journals its later changes as a new record, with a
        new op_id, never under the committed record's.
        """
        self._edits.pop(ino, None)
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
                self._stalled()
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

    async def _send(self, ops: list[list], order: list[int | OpRecord]) -> list[list] | None:
        """Send a batch of operations (of the records ``order``) until it is answered (the
        same op_ids every time); None if it was refused as a whole and not applied.

        An outage fails a call with EIO after the client's outage timeout, and
        a token refused (EACCES, EPERM) is no record's fault: the batch is sent
        again, as a replay (each operation is applied once). Any other error of
        the whole request (EINVAL: arguments this server does not take) comes
        from one record that can never drain, and must not block or refuse
        the others: a batch of several records is not applied, and they are
        sent one at a time (``_solo``) until that one is found; a batch of one
        record refused ``REFUSALS`` times in a row (with the drainer's backoff
        between) gets the error as its answer: saved aside, its record
        removed, as a refused operation is.
        """
        waits = RETRY.delays()
        while True:
            try:
                self._token = self.vfs.drops
                replies = await self.vfs.client.call("batch", ops=ops)
                self._solo = False
                return replies
            except FSError as e:
                if e.errno not in (errno.EIO, errno.EACCES, errno.EPERM):
                    return self._refused_whole(e, ops, order)
                log.warning("write-back of %d records waits for the metaserver: %s",
                            len(order), e.message)
                self._stalled()
            await trio.sleep(next(waits))

    def _refused_whole(self, e: FSError, ops: list[list], order: list[int | OpRecord]
                       ) -> list[list] | None:
        """``_send``'s answer to the batch ``ops`` (of records ``order``) refused as a whole."""
        first = order[0]
        seq = first.seq if isinstance(first, OpRecord) else self.pending[first].seq
        if len(order) > 1:
            log.warning("write-back batch of %d records refused as a whole (%s): sent one at"
                        " a time to find the record at fault", len(order), e.message)
            self._solo = True
            return None
        tries = self._refusals[1] + 1 if self._refusals[0] == seq else 1
        if tries < REFUSALS:
            log.warning("write-back record %d refused (%s): retried (%d of %d)", seq,
                        e.message, tries, REFUSALS)
            self._refusals = (seq, tries)
            return None
        self._refusals = (0, 0)
        self._solo = False
        return [[e.errno, e.message]] * len(ops)
