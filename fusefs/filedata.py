"""A file's content on this mount: committed extents plus staged dirty bytes.

A committed version is a list of extents ``(hash or None, length)`` laid end
to end; ``None`` is a hole (zeros, no storage). Writes go to a :class:`Staging`
file. ``flush`` turns the dirty state into a new version:

1. each dirty range is widened to the boundaries of the committed extents it
   touches (and a truncation point inside an extent widens to that extent),
   so that the extents outside the windows are reused unchanged;
2. the clean bytes inside each window are copied into the staging file, and
   the window is re-cut with content-defined chunking and hashed;
3. blocks the server does not already reference are uploaded in parallel
   (deduplication across files, versions and users);
4. one ``commit`` names the base version, the new extents, size and mtime.

Invariant: ``size`` is the file's current logical size on this mount; bytes
in ``[0, size)`` come from the staging file where ``staging.dirty`` covers
them, else from the committed extents, else zeros. A per-file lock orders
writes, truncates and flushes; reads of a clean file take no lock.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from blockstore.chunking import Piece, chunk_fd
from cache import Ranges, Staging

if TYPE_CHECKING:
    from fusefs.vfs import VFS

log = logging.getLogger(__name__)

READAHEAD_BLOCKS = 4


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


class OpenFile:
    """State of one regular file while this mount has it open (shared by its handles)."""

    def __init__(self, vfs: VFS, ino: int, attr: dict, extents: list) -> None:
        self.vfs = vfs
        self.ino = ino
        self.staging: Staging | None = None
        self.handles = 0
        self.lock = trio.Lock()
        self.last_read_end = -1
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
        if self.staging is not None:
            self.staging.reset()

    # --- reading ---------------------------------------------------------------

    async def read(self, off: int, size: int) -> bytes:
        if self.staging is None:
            return await self._read_clean(off, min(off + size, self.size))
        async with self.lock:
            end = min(off + size, self.size)
            parts = []
            for s, e, dirty in self.staging.dirty.split(off, end) if off < end else ():
                parts.append(self.staging.read(s, e - s) if dirty
                             else await self._read_clean(s, e))
            return b"".join(parts)

    async def _read_clean(self, start: int, end: int) -> bytes:
        """Committed bytes of [start, end); zeros past the committed extents or the cut."""
        ext = self.extents
        if start >= end:
            return b""
        parts = []
        pos = start
        i = ext.index(pos)
        limit = min(ext.size, self.cut)
        while pos < end:
            if pos >= limit:
                parts.append(bytes(end - pos))
                break
            e_start, key = ext.offs[i], ext.keys[i]
            take = min(end, e_start + ext.lens[i], limit) - pos
            if key is None:
                parts.append(bytes(take))
            else:
                block = await self.vfs.cache.get(key)
                parts.append(block[pos - e_start:pos - e_start + take])
            pos += take
            i += 1
        if start == self.last_read_end:
            self._readahead(i)
        self.last_read_end = end
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def _readahead(self, i: int) -> None:
        """On sequential reads, fetch the next blocks in the background."""
        ext = self.extents
        for j in range(i, min(i + READAHEAD_BLOCKS, len(ext))):
            key = ext.keys[j]
            if key is not None and not self.vfs.cache.contains(key):
                self.vfs.spawn(self.vfs.cache.get, key)

    # --- writing ---------------------------------------------------------------

    def _staging(self) -> Staging:
        if self.staging is None:
            self.staging = Staging(self.vfs.staging_dir)
        return self.staging

    async def write(self, off: int, data: bytes, kill_priv: bool) -> int:
        async with self.lock:
            self.kill_priv |= kill_priv
            # A pwrite into the page cache is faster than a thread hop.
            self._staging().write(off, data)
            self.size = max(self.size, off + len(data))
            self._touch()
        return len(data)

    async def truncate(self, size: int) -> None:
        async with self.lock:
            if size < self.size and self.staging is not None:
                self.staging.dirty.clip(size)
            self.cut = min(self.cut, size)
            self.size = size
            self._touch()

    def _touch(self) -> None:
        self.modified = True
        self.mtime = time.time_ns()

    # --- committing ------------------------------------------------------------

    def _windows(self) -> Ranges:
        """Byte ranges to re-chunk: dirty ranges widened to committed extent boundaries."""
        ext = self.extents
        limit = min(ext.size, self.cut)  # cut <= size always
        win = Ranges()

        def widen(s: int, e: int) -> None:
            if s < limit:
                s = ext.offs[ext.index(s)]
            if e - 1 < limit:
                i = ext.index(e - 1)
                e = ext.offs[i] + ext.lens[i]
            win.add(s, min(e, self.size))

        if self.staging is not None:
            for s, e in self.staging.dirty:
                widen(s, e)
        if 0 < limit < ext.size and ext.offs[ext.index(limit)] < limit:
            widen(ext.offs[ext.index(limit)], limit)  # the extent cut by a truncation
        return win

    async def _materialize(self, win: Ranges) -> None:
        """Copy the committed bytes inside the windows into the staging file."""
        st = self._staging()
        for s, e in win:
            for ps, pe, dirty in st.dirty.split(s, e):
                if not dirty:
                    pos = ps
                    while pos < pe:  # at most one block in memory at a time
                        n = min(pe - pos, 4 << 20)
                        data = await self._read_clean(pos, pos + n)
                        await trio.to_thread.run_sync(st.fill, pos, data)
                        pos += n

    async def _upload(self, pieces: list[Piece]) -> None:
        """Upload the pieces' blocks the server does not already reference."""
        keys = list({p.key: None for p in pieces if p.key is not None})
        known = set()
        for i in range(0, len(keys), 1000):
            known.update(await self.vfs.client.call("have_blocks", keys=keys[i:i + 1000]))
        todo = {p.key: p for p in pieces if p.key is not None and p.key not in known}
        fd = self.staging.fd
        cache = self.vfs.cache

        async def put(p: Piece) -> None:
            def work() -> bytes:
                data = os.pread(fd, p.length, p.offset)
                cache.store.put(p.key, data)
                return data
            data = await trio.to_thread.run_sync(work, limiter=cache.transfers)
            await cache.add(p.key, data)

        async with trio.open_nursery() as nursery:
            for p in todo.values():
                nursery.start_soon(put, p)

    def _new_extents(self, win: Ranges, chunks: dict[int, list[Piece]]) -> list[list]:
        """Committed extents outside the windows, chunks inside, holes past the old end."""
        ext = self.extents
        limit = min(ext.size, self.cut)
        out: list[list] = []
        pos = 0
        for ws, we in [*win, (self.size, self.size)]:
            if pos < min(ws, limit):           # unchanged committed extents
                out += ext.pairs(ext.index(pos), ext.index(min(ws, limit) - 1) + 1)
                pos = min(ws, limit)
            if pos < ws:                       # never written: a hole
                out.append([None, ws - pos])
            out += [[p.key, p.length] for p in chunks.get(ws, ())]
            pos = we
        return out

    async def flush(self) -> None:
        """Commit the dirty state as a new version; return once it is durable."""
        async with self.lock:
            if not self.modified:
                return
            win = self._windows()
            await self._materialize(win)
            chunks: dict[int, list[Piece]] = {}
            for s, e in win:
                chunks[s] = await trio.to_thread.run_sync(chunk_fd, self.staging.fd, s, e)
            pieces = [p for ps in chunks.values() for p in ps]
            await self._upload(pieces)
            extents = self._new_extents(win, chunks)
            r = await self.vfs.client.call("commit", ino=self.vfs.srv(self.ino), base=self.base,
                                           extents=extents, size=self.size, mtime=self.mtime,
                                           kill_priv=self.kill_priv,
                                           **self.vfs.commit_hint(self.ino))
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

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
            self.staging = None
