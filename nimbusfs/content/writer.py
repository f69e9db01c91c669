"""A file's content while it is written: committed extents plus staged dirty bytes.

A committed version is a list of extents ``(hash or None, length)`` laid end
to end; ``None`` is a hole (zeros, no storage). Writes go to a :class:`Staging`
file. ``flush`` turns the dirty state into a new version:

1. each dirty range is widened to the boundaries of the committed blocks it
   touches (and a truncation point inside a block widens to that block), so
   that the blocks outside the windows are reused unchanged; holes are cut
   where the windows begin and end instead;
2. the clean bytes inside each window are copied into the staging file, and
   the window is re-cut with content-defined chunking and hashed;
3. blocks the server does not already reference are uploaded in parallel
   (deduplication across files, versions and users), through the block
   cache's transfer limiter and timeout, and added to the cache;
4. one ``commit`` names the base version, the new extents, size and mtime.

Pipelining: while a long dirty range is still being written sequentially, its
completed blocks are cut, hashed and uploaded in the background (one task per
file, a bounded segment at a time), so a flush only handles the tail. Those
blocks are referenced by nothing until the flush commits them: a crash before
that leaves the old version intact. Writes wait when the background upload
lags by more than ``BACKLOG_BYTES`` (bounded memory and disk traffic). Their
staged bytes are released once the server holds the blocks (``hold_blocks``),
and held again every third of the server's GC grace until the commit, so
that block GC never collects them however long the file is written.

Invariant: ``size`` is the file's current logical size; bytes in
``[0, size)`` come from the staging file where ``staging.dirty`` covers them,
else from the committed extents, else zeros. ``staging`` exists whenever
something is dirty or pipelined (``_staging`` makes it). A per-file lock
orders writes, truncates and flushes; reads take none (``_plan``), so a
reader never waits for a flush's upload.

Front-end neutral: what a front end supplies is a :class:`Content` (block
cache, metadata interface, a spawner for background tasks, the staging
directory); the mount's ``OpenFile`` adds its handles and write-back state.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import trio

from nimbusfs.blockstore import block_hash
from nimbusfs.blockstore.chunking import MAX_BLOCK, Piece, chunk_buf
from nimbusfs.cache import BlockCache, Ranges, Staging
from nimbusfs.content.extents import Extents, merge_holes
from nimbusfs.content.meta import Metadata
from nimbusfs.content.reader import Plan, Readahead, Span, fetch, plan_extents
from nimbusfs.errors import FSError, local_io

log = logging.getLogger(__name__)

# A sequentially written dirty range is uploaded in segments of this size ...
PIPELINE_BYTES = 16 << 20
# ... and writes wait for the background upload when it lags by more than this.
BACKLOG_BYTES = 64 << 20
# Blocks fetched at once to fill the clean gaps of the windows being re-chunked.
MATERIALIZE_BLOCKS = 8
# New blocks up to this total are put without asking the server which it has.
ASK_ABOVE_BYTES = 256 << 10
# Commits tried when the server answers that block GC collected some of the
# blocks (they are put again between tries).
COMMIT_ATTEMPTS = 3
# Blocks named in one ``have_blocks`` or ``hold_blocks`` request (the server takes 10,000).
KEYS_AT_ONCE = 1000
# A window this small is cut and hashed in the trio thread (tens of
# microseconds), not a worker's: the hop there and back costs more, once per
# small file a write-back drain or a close commits.
CHUNK_HERE_BYTES = 64 << 10


@dataclass(frozen=True)
class Content:
    """What a front end gives the content layer, shared by all its files.

    ``spawn(fn, *args)`` runs a background task (readahead, the pipelined
    upload, holding its blocks) whose failure is logged, not raised.
    """

    cache: BlockCache
    meta: Metadata
    spawn: Callable[..., None]
    staging_dir: str


def _read_piece(st: Staging, p: Piece) -> bytes:
    """A piece's bytes from the staging file, checked against its hash.

    Runs in an upload's worker thread, which is abandoned if the store does
    not answer in time (``BlockCache.transfer``): it may read after the file
    was closed and its descriptor reused, and must never store other bytes
    under the piece's hash.
    """
    data = st.read(p.offset, p.length)
    if block_hash(data) != p.key:
        raise FSError(errno.EIO, "staging file changed under an upload")
    return data


def _blocks(pieces: list[Piece]) -> dict[bytes, Piece]:
    """The pieces that are blocks (not holes), one per hash."""
    return {p.key: p for p in pieces if p.key is not None}


class Prepared(NamedTuple):
    """A commit made ready by ``Writer.prepare``: its blocks are in the store."""

    extents: list[list[Any]]
    args: dict[str, Any]            # the ``commit`` request's arguments
    staged: dict[bytes, Piece]      # its blocks whose bytes are staged, by hash (``put_again``)


class Writer:
    """One file's content as one front end shows it: read, written, truncated, committed."""

    def __init__(self, content: Content, ino: int, attr: dict[str, Any],
                 extents: list[Any]) -> None:
        self.content = content
        self.ino = ino
        self.staging: Staging | None = None
        self.lock = trio.Lock()
        self.reads = Readahead(content.cache, content.spawn)
        # Pipelined upload of one dirty range: pieces covering [ahead_start,
        # ahead_end) are in the store, and their staged bytes are released
        # (read from the pieces' blocks); staged bytes up to ahead_read may be
        # in a segment being cut or uploaded. A write or truncation touching
        # [ahead_start, ahead_read) first waits for the pump to stop, so the
        # pump never sees those bytes change; pieces are forgotten only with
        # their bytes put back (_drop_ahead) or once committed (reset).
        self.ahead_start = self.ahead_end = self.ahead_read = -1
        self.ahead_pieces: list[Piece] = []
        # The server's GC grace when this range began, if it holds blocks
        # (``hold_blocks``; an older server does not: the bytes stay staged).
        self.ahead_grace: float | None = None
        self.holding = False               # a ``_keep_held`` task runs for this file
        self.ahead_idle = trio.Event()     # set when no pump runs for this file
        self.ahead_idle.set()
        self.ahead_moved = trio.Event()    # set (and replaced) when ahead_end advances
        # Counts changes (writes, truncations, deferred attributes, mtime): a
        # write-back close with nothing new since the last journal record
        # needs neither the lock nor a record.
        self.edits = 0
        self.reset(attr, extents)

    def reset(self, attr: dict[str, Any], extents: list[Any]) -> None:
        """Adopt a committed version as the clean state (no dirty data may be pending)."""
        self.attr = attr
        self.base = attr["version"]
        self.extents = Extents(extents)
        self.size = attr["size"]
        self.cut = self.size          # lowest size since the last commit
        self.mtime = attr["mtime"]
        self.modified = False         # size or content changed since the last commit
        self.kill_priv = False        # an unprivileged write: the commit drops setuid/setgid
        self.deferred: dict[str, int] = {}  # mode, owner, atime changes for the commit
        self.ctime = 0                # when the last uncommitted change was made
        self.failed = False           # a flush of these changes answered an application an error
        self._forget_ahead()
        if self.staging is not None:
            self.staging.reset()

    def staged_bytes(self) -> int:
        """Bytes written since the last commit (holes between them not counted)."""
        return sum(e - s for s, e in self.staging.dirty) if self.staging is not None else 0

    def discard(self) -> None:
        """Drop the uncommitted changes: the file is its committed version again."""
        self.reset(self.attr, self.extents.pairs())

    async def save(self, path: str) -> None:
        """Write the file as it is shown here (committed and staged bytes) to ``path``."""
        with local_io(path), open(path, "xb") as out:
            for pos in range(0, self.size, PIPELINE_BYTES):
                data = await fetch(self.content.cache, self._plan(
                    pos, min(pos + PIPELINE_BYTES, self.size), False))
                await trio.to_thread.run_sync(out.write, data)

    def defer(self, changes: dict[str, int]) -> bool:
        """Keep chmod/chown/utimens changes for the coming commit, if that is the first.

        A file created and never committed shows other mounts only an empty
        file: its mode, owner and times reach them with its first version, in
        the commit's transaction, as its size does (``tar x`` and ``cp -a`` as
        root set three per file, fchown, fchmod and utimensat: three round
        trips of five). mtime needs nothing here: the commit carries
        ``self.mtime``. Not when set-user-ID or set-group-ID is involved (a
        later unprivileged write must drop them, and chown does too), nor
        without data to commit. Returns whether the changes were kept.
        """
        mode = self.deferred.get("mode", self.attr["mode"])
        if (not self.modified or self.base != 0
                or (changes.get("mode", 0) | mode) & (stat.S_ISUID | stat.S_ISGID)):
            return False
        self.deferred.update((k, v) for k, v in changes.items() if k != "mtime")
        self.ctime = time.time_ns()
        self.edits += 1
        return True

    def set_mtime(self, mtime: int) -> None:
        """utimens: the coming commit carries ``mtime``, not the time of the last write
        (``cp -a``, ``rsync``, ``tar x`` set it after writing), deferred or not."""
        self.mtime = mtime
        self.edits += 1

    def attrs_sent(self, attr: dict[str, Any], mode_set: bool) -> None:
        """chmod/chown/utimens went to the server directly, with the changes deferred so
        far (the caller holds the lock): the server's ``attr`` is the file's now, and a
        mode set after a write stands (as on Linux: ``kill_priv`` no longer applies)."""
        self.deferred.clear()
        self.attr = attr   # the mode ``defer`` checks
        if mode_set:
            self.kill_priv = False

    # --- the front end's hooks -----------------------------------------------------

    def commit_hint(self) -> dict[str, Any]:
        """Extra ``commit`` arguments: where a conflicted copy should go (none by default)."""
        return {}

    def keep_staged(self) -> bool:
        """Whether a new staging file outlives the process (write-back: a journal names it);
        its pipelined bytes are then never released (``_releases``)."""
        return False

    def conflicted(self, copy: dict[str, Any]) -> None:
        """A commit lost to another writer's: the bytes are in ``copy`` (the conflicted copy)."""
        log.warning("inode %d: another writer committed first; these bytes are saved as"
                    " inode %d", self.ino, copy["ino"])

    # --- reading ---------------------------------------------------------------

    async def read(self, off: int, size: int) -> bytes:
        """The file's bytes [off, off + size), short at its end.

        Sequential reads read ahead (``Readahead``). No lock: see ``_plan``.
        """
        ranged = self.reads.ranged(off, size)   # before any await
        end = min(off + size, self.size)
        data = await fetch(self.content.cache, self._plan(off, end, ranged))
        if not ranged:
            self.reads.after(self.extents, end)
        return data

    def _plan(self, start: int, end: int, ranged: bool) -> Plan:
        """What bytes [start, end) are now: staged bytes, read here, and blocks to fetch.

        Synchronous: the plan is the file's content at one instant, whatever a
        write, truncation, commit or the pump changes while its blocks are
        fetched (blocks are named by their hash: they never change). So reads
        take no lock, and never wait for a flush's upload and commit, which
        hold it. ``ranged``: only the bytes asked for of blocks not cached.
        """
        out: Plan = []
        if start >= end:
            return out
        if self.staging is None:
            plan_extents(self.extents, start, end, self.cut, ranged, out)
            return out
        for s, e, dirty in self.staging.dirty.split(start, end):
            if dirty:
                self._plan_staged(self.staging, s, e, out)
            else:
                plan_extents(self.extents, s, e, self.cut, ranged, out)
        return out

    def _plan_staged(self, st: Staging, start: int, end: int, out: Plan) -> None:
        """Dirty bytes of [start, end): released ones from the pipelined pieces' blocks."""
        a, b = max(start, self.ahead_start), min(end, self.ahead_end)
        if a >= b or not self._releases():
            out.append(st.read(start, end - start))
            return
        out.append(st.read(start, a - start))
        pieces = self.ahead_pieces
        i = bisect.bisect_right(pieces, a, key=lambda p: p.offset) - 1
        pos = a
        while pos < b:
            p = pieces[i]
            take = min(b, p.offset + p.length) - pos
            out.append(bytes(take) if p.key is None
                       else Span(p.key, pos - p.offset, take, p.length, False))
            pos += take
            i += 1
        out.append(st.read(b, end - b))

    # --- writing ---------------------------------------------------------------

    def _staging(self) -> Staging:
        if self.staging is None:
            self.staging = Staging(self.content.staging_dir, keep=self.keep_staged())
        return self.staging

    def _releases(self) -> bool:
        """Whether the pump releases a pipelined segment's staged bytes once its blocks are
        stored and held (a hole is punched: a large file is not written to the disk twice).

        Until their commit those blocks are unreferenced, and block GC collects
        them past its grace unless they are held (``_hold``). Not with a
        server that does not hold blocks (an older one), nor in write-back
        mode (a staging file the journal names: a journal held through a long
        outage cannot hold them): the staging file then keeps every byte,
        for ``put_again``.
        """
        return self.ahead_grace is not None and (self.staging is None
                                                 or not self.staging.keep)

    async def write(self, off: int, data: bytes, kill_priv: bool) -> int:
        """Stage ``data`` at ``off``; return the bytes stored (short on a disk filling up)."""
        async with self.lock:
            if off < self.ahead_read and off + len(data) > self.ahead_start:
                await self._drop_ahead(off)
            # A pwrite into the page cache is faster than a thread hop.
            st = self._staging()
            n = st.write(off, data)
            self.kill_priv |= kill_priv
            self.size = max(self.size, off + n)
            self._touch()
            await self._pipeline(st, off + n)
        return n

    async def truncate(self, size: int) -> None:
        async with self.lock:
            if size < self.ahead_read:
                await self._drop_ahead(size)
            if size < self.size and self.staging is not None:
                self.staging.dirty.clip(size)
            self.cut = min(self.cut, size)
            self.size = size
            self._touch()

    def _touch(self) -> None:
        """A write or truncation: mtime and ctime change (ctime shows until the commit)."""
        self.modified = True
        self.mtime = self.ctime = time.time_ns()
        self.edits += 1

    # --- pipelined upload ------------------------------------------------------

    def _forget_ahead(self) -> None:
        """Forget the pipelined pieces (committed: no pump runs, the staging is reset)."""
        self.ahead_start = self.ahead_end = self.ahead_read = -1
        self.ahead_pieces = []

    async def _drop_ahead(self, pos: int) -> None:
        """Forget the pipelined pieces from the one holding byte ``pos`` on: bytes change.

        Waits for the pump to stop first (it may be reading those bytes), then
        puts the released bytes of the forgotten pieces back into the staging
        file from their blocks. The pieces before stay valid: chunking from the
        range's start cuts them the same way whatever follows.
        """
        await self.ahead_idle.wait()
        pieces = self.ahead_pieces
        keep = bisect.bisect_right(pieces, pos, key=lambda p: p.offset + p.length)
        if self._releases():  # all put back before any is forgotten (EIO midway)
            for p in pieces[keep:]:
                if p.key is not None:
                    self._staging().fill(p.offset, await self.content.cache.get(p.key))
        if keep < len(pieces):
            self.ahead_end = pieces[keep].offset
            del pieces[keep:]
        self.ahead_read = self.ahead_end

    async def _pipeline(self, st: Staging, end: int) -> None:
        """After a write ending at ``end``: start uploading its dirty range if due.

        Only a dirty range that starts a window by itself (no committed bytes
        to snap to before it) is pipelined, so its pieces are exactly the ones
        the flush would cut from the same start. Called with the lock held.
        """
        r = st.dirty.find(end - 1)
        if r is None or self._snap_start(r[0]) != r[0]:
            return
        start, stop = r
        if start != self.ahead_start:
            if not self.ahead_idle.is_set() or self.ahead_pieces:
                return  # the pump works on another range, or its pieces hold its bytes
            self._forget_ahead()
            self.ahead_start = self.ahead_end = self.ahead_read = start
            self.ahead_grace = self.content.meta.gc_grace
        while stop - self.ahead_end > BACKLOG_BYTES and not self.ahead_idle.is_set():
            await self.ahead_moved.wait()  # back-pressure: the store is slower than the writer
        if self.ahead_idle.is_set() and stop - self.ahead_end >= PIPELINE_BYTES:
            self.ahead_idle = trio.Event()
            self.content.spawn(self._pump, st)

    async def _pump(self, st: Staging) -> None:
        """Upload the pipelined range segment by segment until it is nearly caught up.

        A segment is read into memory once and cut there; the next segment is
        cut while earlier ones upload. Segments are adopted in file order (each
        waits for its predecessor's turn), so ``ahead_pieces`` stays contiguous;
        a failed upload stops the pump and leaves the pieces adopted so far.
        The cache's ``segment_slots`` bound the segments in memory across all
        files (fairly: first come, first served). ``st`` is the file's staging,
        which outlives the pump (it is closed only with the file).
        """
        slots = self.content.cache.segment_slots

        async def send(buf: bytes, pieces: list[Piece], turn: trio.Event,
                       done: trio.Event) -> None:
            await self._send(buf, pieces)
            del buf  # its slot is free: so is its memory, while it waits for its turn
            if self._releases():
                await self._hold(pieces)   # before the bytes go: nothing else has them
            await turn.wait()
            end = pieces[-1].offset + pieces[-1].length
            if self._releases():
                st.release(self.ahead_end, end - self.ahead_end)
            self.ahead_pieces += pieces
            self.ahead_end = end
            self.ahead_moved.set()
            self.ahead_moved = trio.Event()
            if self._releases() and not self.holding:
                self.holding = True
                self.content.spawn(self._keep_held)
            done.set()

        try:
            async with trio.open_nursery() as nursery:
                pos = self.ahead_end
                turn = trio.Event()
                turn.set()
                while True:
                    await slots.acquire()
                    r = st.dirty.find(self.ahead_start)
                    if r is None or r[0] != self.ahead_start or r[1] - pos < PIPELINE_BYTES:
                        slots.release()
                        break
                    stop = min(r[1], pos + PIPELINE_BYTES + MAX_BLOCK)
                    self.ahead_read = stop
                    buf, pieces = await self._cut(st, pos, stop, whole=False)
                    done = trio.Event()
                    nursery.start_soon(send, buf, pieces, turn, done)
                    del buf  # held by send only
                    turn = done
                    pos = pieces[-1].offset + pieces[-1].length
        finally:
            self.ahead_idle.set()
            self.ahead_moved.set()

    async def _hold(self, pieces: list[Piece]) -> None:
        """Have the server hold the pieces' blocks for another GC grace (``hold_blocks``).

        EAGAIN if it does not hold one (GC collected it, e.g. an object put
        again over one GC was about to delete in direct mode): the pump stops
        before releasing that segment's bytes, and the flush uploads it again.
        """
        extents = [[k, p.length] for k, p in _blocks(pieces).items()]
        for i in range(0, len(extents), KEYS_AT_ONCE):
            if lost := await self.content.meta.hold_blocks(extents[i:i + KEYS_AT_ONCE]):
                raise FSError(errno.EAGAIN, f"inode {self.ino}: {len(lost)} uploaded block(s)"
                                            " were collected by block GC, e.g."
                                            f" {bytes(lost[0]).hex()}")

    async def _keep_held(self) -> None:
        """Hold the released pipelined blocks every third of the GC grace until committed.

        One task per file, ended once no released pieces are left (committed,
        or discarded). A failed hold (the server unreachable) is logged and
        tried again at the next tick: GC takes a block only a whole grace
        after its last hold. A block reported collected (the process was
        suspended, or the server unreachable, for longer than the grace) is
        put again from the block cache at the commit if it still holds it
        (``put_again``), else that commit fails.
        """
        try:
            while self.ahead_pieces and (grace := self.ahead_grace) and self._releases():
                await trio.sleep(grace / 3)
                try:
                    await self._hold(list(self.ahead_pieces))
                except FSError as e:
                    log.warning("holding the uploaded blocks of inode %d: %s", self.ino,
                                e.message)
        finally:
            self.holding = False

    async def _cut(self, st: Staging, pos: int, stop: int,
                   whole: bool) -> tuple[bytes, list[Piece]]:
        """Read bytes [pos, stop) of the staging file into memory and cut them.

        Called with a segment slot held, which ``_send`` frees (or this, if
        the cut fails). Unless ``whole``, the last piece is left out: it ends
        where the segment stops, not at a cut of the content; the next
        segment starts there (the cuts before it depend only on the bytes
        before them).
        """
        def cut() -> tuple[bytes, list[Piece]]:
            buf = st.read(pos, stop - pos)
            pieces = chunk_buf(buf, pos)
            return buf, pieces if whole else pieces[:-1]
        try:
            return await trio.to_thread.run_sync(cut)
        except BaseException:
            self.content.cache.segment_slots.release()
            raise

    async def _send(self, buf: bytes, pieces: list[Piece]) -> None:
        """Upload a cut segment's pieces from its bytes, then free its segment slot."""
        view, base = memoryview(buf), pieces[0].offset

        def read(p: Piece) -> memoryview:  # no copy: only put and written to the disk cache
            return view[p.offset - base:p.offset - base + p.length]
        try:
            await self._upload(pieces, read)
        finally:
            self.content.cache.segment_slots.release()

    # --- committing ------------------------------------------------------------

    def _block_at(self, pos: int) -> int | None:
        """Index of the committed block (a data extent, not a hole) holding byte ``pos``."""
        ext = self.extents
        if pos < min(ext.size, self.cut):
            i = ext.index(pos)
            if ext.keys[i] is not None:
                return i
        return None

    def _snap_start(self, s: int) -> int:
        """Where a window holding byte ``s`` starts: the start of the block holding it.

        A hole is cut where the window starts instead: it may be any size (a
        file extended by truncate is one hole), and widening a window over it
        would make the flush write all its zeros out to re-chunk them.
        """
        i = self._block_at(s)
        return s if i is None else self.extents.offs[i]

    def _windows(self) -> Ranges:
        """Byte ranges to re-chunk: dirty ranges widened to the blocks they touch."""
        ext = self.extents
        limit = min(ext.size, self.cut)  # cut <= size always
        win = Ranges()

        def widen(s: int, e: int) -> None:
            i = self._block_at(e - 1)
            if i is not None:
                e = ext.offs[i] + ext.lens[i]
            win.add(self._snap_start(s), min(e, self.size))

        if self.staging is not None:
            for s, e in self.staging.dirty:
                widen(s, e)
        i = self._block_at(limit - 1) if 0 < limit < ext.size else None
        if i is not None and ext.offs[i] + ext.lens[i] > limit:
            widen(ext.offs[i], limit)  # the block cut by a truncation
        return win

    async def _materialize(self, st: Staging, win: Ranges) -> None:
        """Copy the committed bytes inside the windows into the staging file.

        The clean gaps are grouped by the committed block holding them (None:
        zeros), so that each block is fetched once and all its gaps are
        written by one worker-thread call; up to ``MATERIALIZE_BLOCKS``
        blocks at a time (the memory bound). Random writes all over a large
        file leave as many gaps in one window (docs/benchmarks.md, "fsync
        after random writes").
        """
        ext = self.extents
        limit = min(ext.size, self.cut)
        # (block, its offset) -> gaps; (None, 0) for zeros.
        gaps: dict[tuple[bytes | None, int], list[tuple[int, int]]] = {}
        for s, e in win:
            for pos, stop, dirty in st.dirty.split(s, e):
                if dirty:
                    continue
                while pos < stop:
                    i = ext.index(pos) if pos < limit else -1
                    end = min(stop, ext.offs[i] + ext.lens[i], limit) if i >= 0 else stop
                    where = (ext.keys[i], ext.offs[i]) if i >= 0 and ext.keys[i] else (None, 0)
                    gaps.setdefault(where, []).append((pos, end))
                    pos = end
        if not gaps:   # a new file's windows, all written: nothing to copy
            return
        slots = trio.CapacityLimiter(MATERIALIZE_BLOCKS)

        def zeros(spans: list[tuple[int, int]]) -> None:
            for a, b in spans:
                for pos in range(a, b, MAX_BLOCK):
                    st.fill(pos, bytes(min(b - pos, MAX_BLOCK)))

        def copy(block: memoryview, base: int, spans: list[tuple[int, int]]) -> None:
            for a, b in spans:
                st.fill(a, block[a - base:b - base])

        async def fill(key: bytes | None, base: int, spans: list[tuple[int, int]]) -> None:
            async with slots:
                if key is None:
                    await trio.to_thread.run_sync(zeros, spans)
                else:
                    block = memoryview(await self.content.cache.get(key))
                    await trio.to_thread.run_sync(copy, block, base, spans)

        async with trio.open_nursery() as nursery:
            for (key, base), spans in gaps.items():
                nursery.start_soon(fill, key, base, spans)

    async def _upload(self, pieces: list[Piece],
                      read: Callable[[Piece], bytes | memoryview]) -> None:
        """Upload the pieces' blocks the server does not already reference.

        ``read`` returns a piece's bytes; it runs in a worker thread. When the
        new blocks add up to at most ``ASK_ABOVE_BYTES`` (a small file's close)
        the server is not asked first: blocks already in the cache are
        skipped and the others put, which the store does only if absent, so
        a block is still stored once; the round trip saved is most of the
        cost of a small close.
        """
        cache = self.content.cache
        unique = _blocks(pieces)
        known: set[bytes] = set()
        if sum(p.length for p in unique.values()) <= ASK_ABOVE_BYTES:
            known = {k for k in unique if cache.contains(k)}
        else:
            keys = list(unique)
            for i in range(0, len(keys), KEYS_AT_ONCE):
                known.update(await self.content.meta.have_blocks(keys[i:i + KEYS_AT_ONCE]))

        async def put(key: bytes, p: Piece) -> None:
            await cache.put(key, partial(read, p))

        async with trio.open_nursery() as nursery:
            for key, p in unique.items():
                if key not in known:
                    nursery.start_soon(put, key, p)

    async def put_again(self, prepared: Prepared) -> None:
        """Put every block of a prepared commit into the store, whether it seems stored or not.

        After the server refused the commit because block GC collected some
        of its blocks since they were uploaded or deduplicated against
        (EAGAIN: a commit that came more than the GC grace after its uploads,
        e.g. a write-back drain after a long outage). A block's bytes come
        from the staging file (the pieces this commit cut; in write-back mode
        the pipelined ones too, see ``_releases``), else from the block cache
        (which fetches, and hash-checks, what it does not hold: a block gone
        from both fails the commit with that error).
        """
        log.info("inode %d: blocks of its commit were collected; putting them again", self.ino)
        st, staged, cache = self.staging, prepared.staged, self.content.cache

        async def put(key: bytes) -> None:
            p = staged.get(key)
            if p is not None and st is not None:
                await cache.put(key, partial(_read_piece, st, p), keep=False)
            else:
                data = await cache.get(key)
                await cache.put(key, lambda: data, keep=False)

        async with trio.open_nursery() as nursery:
            for key in {bytes(k) for k, _ in prepared.extents if k is not None}:
                nursery.start_soon(put, key)

    async def _cut_upload(self, st: Staging, pos: int, end: int) -> list[Piece]:
        """Cut bytes [pos, end) of the staging file into pieces and upload them.

        Segment by segment, like the pump, so that the next segment is cut
        while earlier ones upload; in segment slots shared with the pumps.
        """
        slots = self.content.cache.segment_slots
        out: list[Piece] = []
        async with trio.open_nursery() as nursery:
            while pos < end:
                stop = min(end, pos + PIPELINE_BYTES + MAX_BLOCK)
                await slots.acquire()
                buf, pieces = await self._cut(st, pos, stop, whole=stop == end)
                nursery.start_soon(self._send, buf, pieces)
                del buf  # held by _send only
                out += pieces
                pos = pieces[-1].offset + pieces[-1].length
        return out

    def _new_extents(self, win: Ranges, chunks: dict[int, list[Piece]]) -> list[list[Any]]:
        """Committed extents outside the windows, chunks inside, holes past the old end."""
        ext = self.extents
        limit = min(ext.size, self.cut)
        out: list[list[Any]] = []
        pos = 0
        for ws, we in [*win, (self.size, self.size)]:
            if pos < min(ws, limit):           # unchanged committed extents
                out += ext.between(pos, min(ws, limit))
                pos = min(ws, limit)
            if pos < ws:                       # never written: a hole
                out.append([None, ws - pos])
            out += [[p.key, p.length] for p in chunks.get(ws, ())]
            pos = we
        # Holes cut by windows would otherwise add up extent by extent.
        return merge_holes(out)

    async def flush(self, amend: int | None = None) -> None:
        """Commit the dirty state as a new version; return once it is durable.

        ``amend``: an empty version a flush committed after an open
        truncated the file (see ``VFS.flush``); if it is still the base, the
        server drops it as it commits this one.
        """
        async with self.lock:
            if not self.modified:
                return
            p = await self.prepare()
            if amend == self.base:
                p.args["amend"] = True
            for attempt in range(COMMIT_ATTEMPTS):
                try:
                    r = await self.content.meta.commit(p.args)
                    break
                except FSError as e:
                    if e.errno != errno.EAGAIN or attempt == COMMIT_ATTEMPTS - 1:
                        raise
                await self.put_again(p)
            await self.adopt(r, p.extents)

    async def prepare(self) -> Prepared:
        """Upload the dirty state's new blocks; return its extents and the ``commit`` args.

        Called with the lock held and changes pending; the caller sends the
        commit (alone, or in a write-back batch), passes an EAGAIN answer to
        ``put_again`` (and sends it again), and passes the answer to ``adopt``
        before it releases the lock.
        """
        await self.ahead_idle.wait()
        win = self._windows()

        def pipelined(s: int, e: int) -> bool:
            return s == self.ahead_start and self.ahead_end <= e
        if self.ahead_pieces and not any(pipelined(s, e) for s, e in win):
            await self._drop_ahead(self.ahead_start)  # re-chunked whole: restore its bytes
        st = self._staging()
        await self._materialize(st, win)
        chunks: dict[int, list[Piece]] = {}
        pieces: list[Piece] = []   # those still to upload
        staged: list[Piece] = []   # those whose bytes the staging file holds
        for s, e in win:
            done = self.ahead_pieces if pipelined(s, e) else []
            if not self._releases():
                staged += done
            pos = self.ahead_end if done else s
            if e - pos > PIPELINE_BYTES:
                cut = await self._cut_upload(st, pos, e)
                chunks[s] = done + cut
                staged += cut
                continue
            rest = (st.chunk(pos, e) if e - pos <= CHUNK_HERE_BYTES
                    else await trio.to_thread.run_sync(st.chunk, pos, e))
            chunks[s] = done + rest
            pieces += rest
            staged += rest
        await self._upload(pieces, partial(_read_piece, st))
        extents = self._new_extents(win, chunks)
        return Prepared(extents, {
            "ino": self.ino, "base": self.base, "extents": extents,
            "size": self.size, "mtime": self.mtime, "kill_priv": self.kill_priv,
            **({"attrs": self.deferred} if self.deferred else {}),
            **self.commit_hint()}, _blocks(staged))

    async def adopt(self, r: dict[str, Any], extents: list[list[Any]]) -> None:
        """Take a commit's answer: the committed version, or the conflict's outcome."""
        if "conflict" not in r:
            self.reset(r["attr"], extents)
            return
        # Another writer won (or the file was deleted elsewhere): our bytes are
        # in the conflicted copy; this file now shows the winner's version.
        self.conflicted(r["conflict"])
        if r["attr"] is None:
            self.reset(r["conflict"], extents)
        else:
            cur = await self.content.meta.open_file(self.ino)
            self.reset(cur["attr"], cur["extents"])

    # --- a record of the uncommitted state -------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The uncommitted state, for a journal (lock held, no pump running).

        With the staging file's bytes (``staging``'s path, or ``inline`` bytes
        the caller adds) it is everything ``restore`` needs to rebuild this
        file after a crash and ``prepare`` its commit.
        """
        st = self.staging
        return {"attr": self.attr, "extents": self.extents.pairs(),
                "size": self.size, "cut": self.cut, "mtime": self.mtime, "ctime": self.ctime,
                "kill_priv": self.kill_priv, "deferred": self.deferred,
                "dirty": [[a, b] for a, b in st.dirty] if st else [],
                "ahead": [self.ahead_start, self.ahead_end,
                          [[p.offset, p.length, p.key] for p in self.ahead_pieces]],
                # The staging file's name in the staging directory.
                "staging": os.path.basename(st.path) if st and st.path else None,
                "inline": None}

    def restored(self, state: dict[str, Any]) -> None:
        """Take a journal record's uncommitted changes (``snapshot``) on a fresh file."""
        self.size, self.cut = state["size"], state["cut"]
        self.mtime, self.ctime = state["mtime"], state["ctime"]
        self.kill_priv, self.deferred, self.modified = state["kill_priv"], state["deferred"], True
        if state["staging"] is not None or state["inline"] is not None:
            name = state["staging"]
            d = self.content.staging_dir
            st = self.staging = Staging(d, keep=True, path=name and os.path.join(d, name))
            for off, data in state["inline"] or ():
                st.fill(off, data)
            for a, b in state["dirty"]:
                st.dirty.add(a, b)
        start, end, pieces = state["ahead"]
        if pieces:
            self.ahead_start, self.ahead_end = start, end
            self.ahead_read = end
            self.ahead_pieces = [Piece(o, n, None if k is None else bytes(k))
                                 for o, n, k in pieces]

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
            self.staging = None
