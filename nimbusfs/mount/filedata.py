"""A file's content on this mount: committed extents plus staged dirty bytes.

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
   (deduplication across files, versions and users);
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

Invariant: ``size`` is the file's current logical size on this mount; bytes
in ``[0, size)`` come from the staging file where ``staging.dirty`` covers
them, else from the committed extents, else zeros. A per-file lock orders
writes, truncates and flushes; reads take none (``_plan``), so a reader never
waits for a flush's upload.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from nimbusfs.blockstore import block_hash
from nimbusfs.blockstore.chunking import MAX_BLOCK, Piece, chunk_buf
from nimbusfs.cache import Ranges, Staging
from nimbusfs.errors import FSError, local_io

if TYPE_CHECKING:
    from nimbusfs.mount.vfs import VFS

log = logging.getLogger(__name__)

# Sequential reads fetch this far ahead, half the cache's hot set (32 MiB)
# so that blocks read ahead are still in memory when the reader gets there.
READAHEAD_BYTES = 16 << 20
# The kernel issues readahead requests concurrently; they may arrive out of order.
SEQ_SLACK = 1 << 20
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
# Blocks named in one ``hold_blocks`` request (the server takes up to 10,000).
HOLD_AT_ONCE = 1000


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


class Extents:
    """An immutable extent list with cumulative offsets for binary search."""

    def __init__(self, pairs: list) -> None:
        self.keys: list[bytes | None] = [None if k is None else bytes(k) for k, _ in pairs]
        self.lens: list[int] = [n for _, n in pairs]
        self.offs: list[int] = []
        pos = 0
        for n in self.lens:
            self.offs.append(pos)
            pos += n
        self.size = pos

    def index(self, off: int) -> int:
        """Index of the extent containing ``off`` (len(self) if at or past the end)."""
        if off >= self.size:
            return len(self.lens)
        return bisect.bisect_right(self.offs, off) - 1

    def __len__(self) -> int:
        return len(self.lens)

    def pairs(self, lo: int, hi: int) -> list[list]:
        return [[self.keys[i], self.lens[i]] for i in range(lo, hi)]

    def between(self, a: int, b: int) -> list[list]:
        """The extents covering [a, b) exactly: a hole cut by ``a`` or ``b`` is shortened.

        Windows start and end at block boundaries, so only holes are cut.
        """
        i, j = self.index(a), self.index(b - 1)
        assert a == self.offs[i] or self.keys[i] is None, "a block cut at its start"
        assert b == self.offs[j] + self.lens[j] or self.keys[j] is None, "a block cut at its end"
        out = self.pairs(i, j + 1)
        out[0][1] -= a - self.offs[i]
        out[-1][1] -= self.offs[j] + self.lens[j] - b
        return out


class Prepared(NamedTuple):
    """A commit made ready by ``OpenFile.prepare``: its blocks are in the store."""

    extents: list[list]
    args: dict[str, Any]            # the ``commit`` request's arguments
    staged: dict[bytes, Piece]      # its blocks whose bytes are staged, by hash (``put_again``)


class _Span(NamedTuple):
    """Bytes [offset, offset + length) of a stored block of ``size`` bytes, to fetch."""

    key: bytes
    offset: int
    length: int
    size: int
    ranged: bool   # read only these bytes if the block is not cached (a random read)


class OpenFile:
    """State of one regular file while this mount has it open (shared by its handles)."""

    def __init__(self, vfs: VFS, ino: int, attr: dict, extents: list) -> None:
        self.vfs = vfs
        self.ino = ino
        self.staging: Staging | None = None
        self.handles = 0
        self.lock = trio.Lock()
        self.last_read_end = -1
        self.ra_end = 0               # readahead has been started up to here
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
        # Write-back: the ``mknod`` arguments of a create journalled with the
        # file and not yet applied by the server (the inode is this mount's
        # alone until then); None once applied, and for every other file.
        self.creating: dict[str, Any] | None = None
        self.reset(attr, extents)

    def reset(self, attr: dict, extents: list) -> None:
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
        self.reset(self.attr, self.extents.pairs(0, len(self.extents)))

    async def save(self, path: str) -> None:
        """Write the file as this mount shows it (committed and staged bytes) to ``path``."""
        with local_io(path), open(path, "xb") as out:
            for pos in range(0, self.size, PIPELINE_BYTES):
                data = await self._fetch(self._plan(pos, min(pos + PIPELINE_BYTES, self.size),
                                                    False))
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

    # --- reading ---------------------------------------------------------------

    async def read(self, off: int, size: int) -> bytes:
        """The file's bytes [off, off + size), short at its end.

        A read that continues the previous one (within ``SEQ_SLACK``) is
        sequential: it fetches whole blocks, caches them and reads ahead. Any
        other read is random: from a local store, blocks not in memory are
        read by ranges, only the bytes asked for (``BlockCache.get_range``).
        No lock: see ``_plan``.
        """
        ranged = abs(off - self.last_read_end) > SEQ_SLACK
        # Before any await: the kernel sends a sequential reader's requests
        # concurrently, and each must see its predecessor's end.
        self.last_read_end = off + size
        end = min(off + size, self.size)
        data = await self._fetch(self._plan(off, end, ranged))
        if not ranged:
            self._readahead(end)
        return data

    def _plan(self, start: int, end: int, ranged: bool) -> list[bytes | _Span]:
        """What bytes [start, end) are now: staged bytes, read here, and blocks to fetch.

        Synchronous: the plan is the file's content at one instant, whatever a
        write, truncation, commit or the pump changes while its blocks are
        fetched (blocks are named by their hash: they never change). So reads
        take no lock, and never wait for a flush's upload and commit, which
        hold it. ``ranged``: only the bytes asked for of blocks not cached.
        """
        out: list[bytes | _Span] = []
        if start >= end:
            return out
        if self.staging is None:
            self._plan_clean(start, end, ranged, out)
            return out
        for s, e, dirty in self.staging.dirty.split(start, end):
            if dirty:
                self._plan_staged(s, e, out)
            else:
                self._plan_clean(s, e, ranged, out)
        return out

    async def _fetch(self, plan: list[bytes | _Span]) -> bytes:
        """The bytes of a plan, its blocks fetched one after the other."""
        cache = self.vfs.cache
        parts = []
        for x in plan:
            if isinstance(x, bytes):
                parts.append(x)
            elif x.ranged:
                parts.append(await cache.get_range(x.key, x.offset, x.length, x.size))
            else:
                parts.append((await cache.get(x.key))[x.offset:x.offset + x.length])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _plan_clean(self, start: int, end: int, ranged: bool, out: list) -> None:
        """Committed bytes of [start, end); zeros past the committed extents or the cut."""
        ext = self.extents
        pos = start
        i = ext.index(pos)
        limit = min(ext.size, self.cut)
        while pos < end:
            if pos >= limit:
                out.append(bytes(end - pos))
                break
            e_start, key = ext.offs[i], ext.keys[i]
            take = min(end, e_start + ext.lens[i], limit) - pos
            out.append(bytes(take) if key is None
                       else _Span(key, pos - e_start, take, ext.lens[i], ranged))
            pos += take
            i += 1

    def _plan_staged(self, start: int, end: int, out: list) -> None:
        """Dirty bytes of [start, end): released ones from the pipelined pieces' blocks."""
        a, b = max(start, self.ahead_start), min(end, self.ahead_end)
        if a >= b or not self._releases():
            out.append(self.staging.read(start, end - start))
            return
        out.append(self.staging.read(start, a - start))
        pieces = self.ahead_pieces
        i = bisect.bisect_right(pieces, a, key=lambda p: p.offset) - 1
        pos = a
        while pos < b:
            p = pieces[i]
            take = min(b, p.offset + p.length) - pos
            out.append(bytes(take) if p.key is None
                       else _Span(p.key, pos - p.offset, take, p.length, False))
            pos += take
            i += 1
        out.append(self.staging.read(b, end - b))

    def _readahead(self, pos: int) -> None:
        """On sequential reads, fetch the blocks up to READAHEAD_BYTES past ``pos``.

        Each block is requested once per pass (``ra_end``); the cache's transfer
        limiter bounds how many fetches run at once.
        """
        ext = self.extents
        i = ext.index(pos - 1) + 1  # the first extent past the one read
        if i >= len(ext):
            return
        if not ext.offs[i] <= self.ra_end <= pos + READAHEAD_BYTES:
            self.ra_end = ext.offs[i]  # a new pass (a seek, or the file read again)
        j = ext.index(self.ra_end)
        while j < len(ext) and ext.offs[j] < pos + READAHEAD_BYTES:
            key = ext.keys[j]
            if key is not None and not self.vfs.cache.contains(key):
                self.vfs.spawn(self.vfs.cache.get, key)
            j += 1
        self.ra_end = ext.offs[j] if j < len(ext) else ext.size

    # --- writing ---------------------------------------------------------------

    def _staging(self) -> Staging:
        if self.staging is None:
            # Write-back: the journal names the file, to find it after a crash.
            self.staging = Staging(self.vfs.staging_dir, keep=self.vfs.writeback is not None)
        return self.staging

    def _releases(self) -> bool:
        """Whether the pump releases a pipelined segment's staged bytes once its blocks are
        stored and held (a hole is punched: a large file is not written to the disk twice).

        Until their commit those blocks are unreferenced, and block GC collects
        them past its grace unless the mount holds them (``_hold``). Not with
        a server that does not hold blocks (an older one), nor in write-back
        mode (a staging file the journal names: a journal held through a long
        outage cannot hold them): the staging file then keeps every byte,
        for ``put_again``.
        """
        return self.ahead_grace is not None and (self.staging is None
                                                 or self.staging.path is None)

    async def write(self, off: int, data: bytes, kill_priv: bool) -> int:
        """Stage ``data`` at ``off``; return the bytes stored (short on a disk filling up)."""
        async with self.lock:
            if off < self.ahead_read and off + len(data) > self.ahead_start:
                await self._drop_ahead(off)
            # A pwrite into the page cache is faster than a thread hop.
            n = self._staging().write(off, data)
            self.kill_priv |= kill_priv
            self.size = max(self.size, off + n)
            self._touch()
            await self._pipeline(off + n)
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
        for p in pieces[keep:]:  # all put back before any is forgotten (EIO midway)
            if p.key is not None and self._releases():
                self.staging.fill(p.offset, await self.vfs.cache.get(p.key))
        if keep < len(pieces):
            self.ahead_end = pieces[keep].offset
            del pieces[keep:]
        self.ahead_read = self.ahead_end

    async def _pipeline(self, end: int) -> None:
        """After a write ending at ``end``: start uploading its dirty range if due.

        Only a dirty range that starts a window by itself (no committed bytes
        to snap to before it) is pipelined, so its pieces are exactly the ones
        the flush would cut from the same start. Called with the lock held.
        """
        r = self.staging.dirty.find(end - 1)
        if r is None or self._snap_start(r[0]) != r[0]:
            return
        start, stop = r
        if start != self.ahead_start:
            if not self.ahead_idle.is_set() or self.ahead_pieces:
                return  # the pump works on another range, or its pieces hold its bytes
            self._forget_ahead()
            self.ahead_start = self.ahead_end = self.ahead_read = start
            self.ahead_grace = self.vfs.client.info.get("gc_grace")
        while stop - self.ahead_end > BACKLOG_BYTES and not self.ahead_idle.is_set():
            await self.ahead_moved.wait()  # back-pressure: the store is slower than the writer
        if self.ahead_idle.is_set() and stop - self.ahead_end >= PIPELINE_BYTES:
            self.ahead_idle = trio.Event()
            self.vfs.spawn(self._pump)

    async def _pump(self) -> None:
        """Upload the pipelined range segment by segment until it is nearly caught up.

        A segment is read into memory once and cut there; the next segment is
        cut while earlier ones upload. Segments are adopted in file order (each
        waits for its predecessor's turn), so ``ahead_pieces`` stays contiguous;
        a failed upload stops the pump and leaves the pieces adopted so far.
        The cache's ``segment_slots`` bound the segments in memory across all
        files (fairly: first come, first served).
        """
        slots = self.vfs.cache.segment_slots

        async def send(buf: bytes, pieces: list[Piece], turn: trio.Event,
                       done: trio.Event) -> None:
            await self._send(buf, pieces)
            del buf  # its slot is free: so is its memory, while it waits for its turn
            if self._releases():
                await self._hold(pieces)   # before the bytes go: nothing else has them
            await turn.wait()
            end = pieces[-1].offset + pieces[-1].length
            if self._releases():
                self.staging.release(self.ahead_end, end - self.ahead_end)
            self.ahead_pieces += pieces
            self.ahead_end = end
            self.ahead_moved.set()
            self.ahead_moved = trio.Event()
            if self._releases() and not self.holding:
                self.holding = True
                self.vfs.spawn(self._keep_held)
            done.set()

        try:
            async with trio.open_nursery() as nursery:
                pos = self.ahead_end
                turn = trio.Event()
                turn.set()
                while True:
                    await slots.acquire()
                    r = self.staging.dirty.find(self.ahead_start)
                    if r is None or r[0] != self.ahead_start or r[1] - pos < PIPELINE_BYTES:
                        slots.release()
                        break
                    stop = min(r[1], pos + PIPELINE_BYTES + MAX_BLOCK)
                    self.ahead_read = stop
                    buf, pieces = await self._cut(pos, stop, whole=False)
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
        extents = list({p.key: [p.key, p.length] for p in pieces if p.key is not None}.values())
        for i in range(0, len(extents), HOLD_AT_ONCE):
            if lost := await self.vfs.client.call("hold_blocks",
                                                  extents=extents[i:i + HOLD_AT_ONCE]):
                raise FSError(errno.EAGAIN, f"inode {self.ino}: {len(lost)} uploaded block(s)"
                                            " were collected by block GC, e.g."
                                            f" {bytes(lost[0]).hex()}")

    async def _keep_held(self) -> None:
        """Hold the released pipelined blocks every third of the GC grace until committed.

        One task per file, ended once no released pieces are left (committed,
        or discarded). A failed hold (the server unreachable) is logged and
        tried again at the next tick: GC takes a block only a whole grace
        after its last hold. A block reported collected (the mount was
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

    async def _cut(self, pos: int, stop: int, whole: bool) -> tuple[bytes, list[Piece]]:
        """Read bytes [pos, stop) of the staging file into memory and cut them.

        Called with a segment slot held, which ``_send`` frees (or this, if
        the cut fails). Unless ``whole``, the last piece is left out: it ends
        where the segment stops, not at a cut of the content; the next
        segment starts there (the cuts before it depend only on the bytes
        before them).
        """
        def cut() -> tuple[bytes, list[Piece]]:
            buf = self.staging.read(pos, stop - pos)
            pieces = chunk_buf(buf, pos)
            return buf, pieces if whole else pieces[:-1]
        try:
            return await trio.to_thread.run_sync(cut)
        except BaseException:
            self.vfs.cache.segment_slots.release()
            raise

    async def _send(self, buf: bytes, pieces: list[Piece]) -> None:
        """Upload a cut segment's pieces from its bytes, then free its segment slot."""
        view, base = memoryview(buf), pieces[0].offset

        def read(p: Piece) -> memoryview:  # no copy: only put and written to the disk cache
            return view[p.offset - base:p.offset - base + p.length]
        try:
            await self._upload(pieces, read)
        finally:
            self.vfs.cache.segment_slots.release()

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

    async def _materialize(self, win: Ranges) -> None:
        """Copy the committed bytes inside the windows into the staging file.

        The clean gaps are grouped by the committed extent holding them, so
        that each block is fetched once and all its gaps are written by one
        worker-thread call; up to ``MATERIALIZE_BLOCKS`` blocks at a time (the
        memory bound). 20,000 random 4 KiB writes all over a 1 GiB file leave
        as many gaps in one window: copied one by one, they took 6.4 s of an
        11.2 s fsync; grouped, 1.9-2.1 s of 6.4 s (``bench/cpu_profile.py
        fsync``).
        """
        st = self._staging()
        ext = self.extents
        limit = min(ext.size, self.cut)
        gaps: dict[int, list[tuple[int, int]]] = {}  # extent index, -1 for zeros -> gaps
        for s, e in win:
            for pos, stop, dirty in st.dirty.split(s, e):
                if dirty:
                    continue
                while pos < stop:
                    i = ext.index(pos) if pos < limit else -1
                    end = min(stop, ext.offs[i] + ext.lens[i], limit) if i >= 0 else stop
                    gaps.setdefault(i if i >= 0 and ext.keys[i] else -1, []).append((pos, end))
                    pos = end
        slots = trio.CapacityLimiter(MATERIALIZE_BLOCKS)

        async def copy(i: int, spans: list[tuple[int, int]]) -> None:
            async with slots:
                if i < 0:
                    def fill() -> None:
                        for a, b in spans:
                            for pos in range(a, b, MAX_BLOCK):
                                st.fill(pos, bytes(min(b - pos, MAX_BLOCK)))
                else:
                    block, base = memoryview(await self.vfs.cache.get(ext.keys[i])), ext.offs[i]

                    def fill() -> None:
                        for a, b in spans:
                            st.fill(a, block[a - base:b - base])
                await trio.to_thread.run_sync(fill)

        async with trio.open_nursery() as nursery:
            for i, spans in gaps.items():
                nursery.start_soon(copy, i, spans)

    async def _upload(self, pieces: list[Piece],
                      read: Callable[[Piece], bytes | memoryview]) -> None:
        """Upload the pieces' blocks the server does not already reference.

        ``read`` returns a piece's bytes; it runs in a worker thread. When the
        new blocks add up to at most ``ASK_ABOVE_BYTES`` (a small file's close)
        the server is not asked first: blocks this mount already holds are
        skipped and the others put, which the store does only if absent, so
        a block is still stored once; the round trip saved is most of the
        cost of a small close.
        """
        cache = self.vfs.cache
        unique = {p.key: p for p in pieces if p.key is not None}
        if sum(p.length for p in unique.values()) <= ASK_ABOVE_BYTES:
            known = {k for k in unique if cache.contains(k)}
        else:
            keys, known = list(unique), set()
            for i in range(0, len(keys), 1000):
                known.update(await self.vfs.client.call("have_blocks", keys=keys[i:i + 1000]))
        todo = {k: p for k, p in unique.items() if k not in known}

        async def put(p: Piece) -> None:
            def work() -> bytes | memoryview:
                data = read(p)
                with local_io(f"block store {cache.store.url}"):
                    cache.store.put(p.key, data)
                return data
            data = await cache.transfer(work)
            await cache.add(p.key, data, hot=False)

        async with trio.open_nursery() as nursery:
            for p in todo.values():
                nursery.start_soon(put, p)

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
        st, staged, extents = self.staging, prepared.staged, prepared.extents

        async def put(key: bytes) -> None:
            p = staged.get(key)
            data = (await trio.to_thread.run_sync(_read_piece, st, p) if p is not None
                    and st is not None else await self.vfs.cache.get(key))

            def work() -> None:
                with local_io(f"block store {self.vfs.cache.store.url}"):
                    self.vfs.cache.store.put(key, data)
            await self.vfs.cache.transfer(work)

        async with trio.open_nursery() as nursery:
            for key in {bytes(k) for k, _ in extents if k is not None}:
                nursery.start_soon(put, key)

    async def _cut_upload(self, pos: int, end: int) -> list[Piece]:
        """Cut bytes [pos, end) of the staging file into pieces and upload them.

        Segment by segment, like the pump, so that the next segment is cut
        while earlier ones upload; in segment slots shared with the pumps.
        """
        slots = self.vfs.cache.segment_slots
        out: list[Piece] = []
        async with trio.open_nursery() as nursery:
            while pos < end:
                stop = min(end, pos + PIPELINE_BYTES + MAX_BLOCK)
                await slots.acquire()
                buf, pieces = await self._cut(pos, stop, whole=stop == end)
                nursery.start_soon(self._send, buf, pieces)
                del buf  # held by _send only
                out += pieces
                pos = pieces[-1].offset + pieces[-1].length
        return out

    def _new_extents(self, win: Ranges, chunks: dict[int, list[Piece]]) -> list[list]:
        """Committed extents outside the windows, chunks inside, holes past the old end."""
        ext = self.extents
        limit = min(ext.size, self.cut)
        out: list[list] = []
        pos = 0
        for ws, we in [*win, (self.size, self.size)]:
            if pos < min(ws, limit):           # unchanged committed extents
                out += ext.between(pos, min(ws, limit))
                pos = min(ws, limit)
            if pos < ws:                       # never written: a hole
                out.append([None, ws - pos])
            out += [[p.key, p.length] for p in chunks.get(ws, ())]
            pos = we
        merged: list[list] = []
        for k, n in out:  # holes cut by windows would otherwise add up extent by extent
            if k is None and merged and merged[-1][0] is None:
                merged[-1][1] += n
            else:
                merged.append([k, n])
        return merged

    async def flush(self, amend: int | None = None) -> None:
        """Commit the dirty state as a new version; return once it is durable.

        ``amend``: an empty version a handle's flush committed after its open
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
                    r = await self.vfs.client.call("commit", **p.args)
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
        await self._materialize(win)
        chunks: dict[int, list[Piece]] = {}
        pieces: list[Piece] = []   # those still to upload
        staged: list[Piece] = []   # those whose bytes the staging file holds
        st = self.staging
        for s, e in win:
            done = self.ahead_pieces if pipelined(s, e) else []
            if not self._releases():
                staged += done
            pos = self.ahead_end if done else s
            if e - pos > PIPELINE_BYTES:
                cut = await self._cut_upload(pos, e)
                chunks[s] = done + cut
                staged += cut
                continue
            rest = await trio.to_thread.run_sync(st.chunk, pos, e)
            chunks[s] = done + rest
            pieces += rest
            staged += rest
        await self._upload(pieces, partial(_read_piece, st))
        extents = self._new_extents(win, chunks)
        return Prepared(extents, {
            "ino": self.vfs.srv(self.ino), "base": self.base, "extents": extents,
            "size": self.size, "mtime": self.mtime, "kill_priv": self.kill_priv,
            **({"attrs": self.deferred} if self.deferred else {}),
            **self.vfs.commit_hint(self.ino)}, {p.key: p for p in staged if p.key})

    async def adopt(self, r: dict[str, Any], extents: list[list]) -> None:
        """Take a commit's answer: the committed version, or the conflict's outcome."""
        if "conflict" not in r:
            self.reset(r["attr"], extents)
            return
        # Another writer won (or the file was deleted elsewhere): our bytes are
        # in the conflicted copy; this file now shows the winner's version.
        self.vfs.record_conflict(self.ino, r["conflict"])
        if r["attr"] is None:
            self.reset(r["conflict"], extents)
        else:
            cur = await self.vfs.client.call("open", ino=self.vfs.srv(self.ino))
            self.reset(cur["attr"], cur["extents"])

    # --- write-back ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The uncommitted state, for the write-back journal (lock held, no pump running).

        With the staging file's bytes (``staging``'s path, or ``inline`` bytes
        the caller adds) it is everything ``restore`` needs to rebuild this
        file after a crash and ``prepare`` its commit.
        """
        st = self.staging
        return {"attr": self.attr, "extents": self.extents.pairs(0, len(self.extents)),
                "size": self.size, "cut": self.cut, "mtime": self.mtime, "ctime": self.ctime,
                "kill_priv": self.kill_priv, "deferred": self.deferred,
                "dirty": [[a, b] for a, b in st.dirty] if st else [],
                "ahead": [self.ahead_start, self.ahead_end,
                          [[p.offset, p.length, p.key] for p in self.ahead_pieces]],
                # The staging file's name in the staging directory.
                "staging": os.path.basename(st.path) if st and st.path else None,
                "inline": None, "create": self.creating}

    @classmethod
    def restore(cls, vfs: VFS, ino: int, state: dict[str, Any]) -> OpenFile:
        """The file of a journal record, with its uncommitted changes (no handle open)."""
        f = cls(vfs, ino, state["attr"], state["extents"])
        f.size, f.cut = state["size"], state["cut"]
        f.mtime, f.ctime = state["mtime"], state["ctime"]
        f.kill_priv, f.deferred, f.modified = state["kill_priv"], state["deferred"], True
        f.creating = state.get("create")   # absent from records of older mounts
        if state["staging"] is not None or state["inline"] is not None:
            name = state["staging"]
            st = f.staging = Staging(vfs.staging_dir, keep=True, path=name and os.path.join(
                vfs.staging_dir, name))
            for off, data in state["inline"] or ():
                st.fill(off, data)
            for a, b in state["dirty"]:
                st.dirty.add(a, b)
        start, end, pieces = state["ahead"]
        if pieces:
            f.ahead_start, f.ahead_end = start, end
            f.ahead_read = end
            f.ahead_pieces = [Piece(o, n, None if k is None else bytes(k)) for o, n, k in pieces]
        return f

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
            self.staging = None
