"""Staging of dirty file data on local disk.

Each file open for writing on this mount has one sparse staging file holding
the bytes written since the last commit, plus the set of byte ranges those
bytes cover. Data never waits in memory: a write is a ``pwrite`` into the
staging file, so memory use does not grow with the amount written.

Staged bytes whose blocks are already in the store (a pipelined upload) can be
released: a hole is punched where they were, so the kernel never writes them
back to disk. Without that, a file written faster than the kernel's dirty
page limit allows (about 10% of memory) is written to disk twice
(docs/benchmarks.md, "Released staged bytes").
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import tempfile

from nimbusfs.blockstore.chunking import Piece, chunk_fd, pread_exact
from nimbusfs.errors import FSError, local_io

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class Ranges:
    """A set of disjoint, sorted, non-adjacent half-open byte ranges."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.starts)

    def __iter__(self):
        return iter(zip(self.starts, self.ends, strict=True))

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self.ends, start)      # first range ending at/after start
        j = bisect.bisect_right(self.starts, end)     # ranges starting at/before end
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def find(self, pos: int) -> tuple[int, int] | None:
        """The range holding byte ``pos``, if any."""
        i = bisect.bisect_right(self.starts, pos) - 1
        if i >= 0 and pos < self.ends[i]:
            return self.starts[i], self.ends[i]
        return None

    def clip(self, size: int) -> None:
        """Drop everything at or beyond ``size``."""
        i = bisect.bisect_left(self.starts, size)
        del self.starts[i:], self.ends[i:]
        if self.ends and self.ends[-1] > size:
            self.ends[-1] = size

    def clear(self) -> None:
        self.starts.clear()
        self.ends.clear()

    def split(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Cut [start, end) into pieces, each marked whether it lies in the set."""
        out = []
        pos = start
        i = bisect.bisect_right(self.ends, start)
        while pos < end:
            if i < len(self.starts) and self.starts[i] <= pos:
                e = min(self.ends[i], end)
                out.append((pos, e, True))
                i += 1
            else:
                e = min(self.starts[i], end) if i < len(self.starts) else end
                out.append((pos, e, False))
            pos = e
        return out


class Staging:
    """One file's dirty bytes: a sparse temporary file and the ranges it holds.

    Invariant: ``dirty`` covers only bytes the file holds. A write the disk
    could not take whole marks only the bytes it stored, and every read of
    staged bytes gets all of them or fails: a flush never commits a range this
    file does not hold (a full disk once committed a megabyte of zeros while
    every call succeeded). OS errors are raised as FSErrors naming the
    directory (ENOSPC, EDQUOT ... as they are).
    """

    def __init__(self, directory: str, keep: bool = False, path: str | None = None) -> None:
        """A new, empty staging file in ``directory``; or the existing file ``path``.

        ``keep``: the file keeps its name until ``close``, so that a write-back
        journal can name it and find it again after a crash; otherwise it is
        unlinked at once and the kernel frees it when it is closed.
        """
        self.directory = directory
        self.what = f"staging file in {directory}"
        self.path: str | None = None
        self._listed = path is not None   # the name is durable in its directory
        with local_io(self.what):
            if path is not None:
                self.fd, self.path = os.open(path, os.O_RDWR), path
            else:
                os.makedirs(directory, exist_ok=True)
                self.fd, name = tempfile.mkstemp(dir=directory, prefix="dirty-")
                if keep:
                    self.path = name
                else:
                    os.unlink(name)
        self.dirty = Ranges()

    def sync(self) -> None:
        """Make the staged bytes and the file's name durable (in a worker thread)."""
        with local_io(self.what):
            os.fdatasync(self.fd)
            if self._listed:
                return
            d = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(d)
            finally:
                os.close(d)
        self._listed = True

    def write(self, off: int, data: bytes) -> int:
        """Stage ``data`` at ``off``; return how many bytes were stored.

        Fewer than all only when the disk filled up after some were stored: a
        short count, which the kernel passes on to the application as a local
        file system would (its next write gets ENOSPC). Raises if none were.
        """
        done = self._pwrite(off, data, partial=True)
        self.dirty.add(off, off + done)
        return done

    def read(self, off: int, n: int) -> bytes:
        """Staged bytes [off, off + n), all of them."""
        with local_io(self.what):
            return pread_exact(self.fd, n, off)

    def chunk(self, start: int, end: int) -> list[Piece]:
        """Cut the staged bytes [start, end) into pieces (in a worker thread)."""
        with local_io(self.what):
            return chunk_fd(self.fd, start, end)

    def fill(self, off: int, data: bytes | memoryview) -> None:
        """Write clean bytes around dirty ones, to build a window to re-chunk: all or raise."""
        self._pwrite(off, data, partial=False)

    def _pwrite(self, off: int, data: bytes | memoryview, partial: bool) -> int:
        """Write ``data`` at ``off`` whole, as ``os.pwrite`` may store fewer bytes.

        An error (a full disk) after some bytes were stored returns their
        count if ``partial``; otherwise, or when none were, it is raised.
        """
        view, done = memoryview(data), 0
        try:
            with local_io(self.what):
                while done < len(view):
                    n = os.pwrite(self.fd, view[done:], off + done)
                    if not n:
                        raise OSError(errno.EIO, "pwrite stored nothing")
                    done += n
        except FSError:
            if not (partial and done):
                raise
        return done

    def release(self, off: int, n: int) -> None:
        """Free the staged bytes of [off, off + n): they read as zeros from now on.

        The dirty ranges stay as they are: the caller reads those bytes from
        where it put them. A file system that cannot punch holes keeps them.
        """
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n):
            err = ctypes.get_errno()
            if err != errno.EOPNOTSUPP:
                with local_io(self.what):
                    raise OSError(err, os.strerror(err))

    def reset(self) -> None:
        """Forget all dirty data (it has been committed)."""
        self.dirty.clear()
        with local_io(self.what):
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        """Close the file; a kept one is removed (its bytes are committed or given up)."""
        os.close(self.fd)
        if self.path is not None:
            with local_io(self.what):
                os.unlink(self.path)
