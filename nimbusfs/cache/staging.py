"""Staging of dirty file data on local disk.

Each file open for writing on this mount has one sparse staging file holding
the bytes written since the last commit, plus the set of byte ranges those
bytes cover. Data never waits in memory beyond ``MEMORY_BYTES`` per file: a
write is a ``pwrite`` into the staging file, so memory use does not grow
with the amount written. A small file's bytes (all within the first
``MEMORY_BYTES``) stay in memory until a write goes past that or a write-back
journal needs them on disk by name (``sync``): the staging file is created
then. Most files an unpacking or a checkout writes are that small, and the
file's create, name and unlink cost more than the rest of its write.

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

from nimbusfs.blockstore.chunking import Piece, chunk_buf, chunk_fd, pread_exact
from nimbusfs.errors import FSError, local_io

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# A file's staged bytes stay in memory while they all lie below this offset
# (97% of the files of the benchmark's Django sdist); with the write-back
# mount's ``MAX_PENDING_FILES`` that bounds the memory at 256 MiB.
MEMORY_BYTES = 32 << 10


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
        """A new, empty staging area for ``directory`` (in memory until it needs its file);
        or the existing file ``path``.

        ``keep``: the file keeps its name until ``close``, so that a write-back
        journal can name it and find it again after a crash; otherwise it is
        unlinked at once and the kernel frees it when it is closed.
        """
        self.directory = directory
        self.what = f"staging file in {directory}"
        self.keep = keep or path is not None
        self.path: str | None = None
        self.fd = -1
        # The bytes while there is no file (``_spill`` makes it); None after.
        # Read without a lock by upload threads: they take this reference
        # once, and a spill sets ``fd`` before it drops the buffer.
        self._mem: bytearray | None = bytearray()
        self._listed = path is not None   # the name is durable in its directory
        if path is not None:
            with local_io(self.what):
                self.fd, self.path = os.open(path, os.O_RDWR), path
            self._mem = None
        self.dirty = Ranges()

    def _spill(self) -> None:
        """Create the staging file and move the bytes held in memory into it (all or raise:
        the memory keeps them if the disk cannot)."""
        mem = self._mem
        assert mem is not None
        with local_io(self.what):
            os.makedirs(self.directory, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.directory, prefix="dirty-")
            if not self.keep:
                os.unlink(name)
        self.fd, self.path = fd, name if self.keep else None
        try:
            self._pwrite_file(0, memoryview(mem), partial=False)
        except BaseException:
            os.close(fd)
            if self.keep:
                os.unlink(name)
            self.fd, self.path = -1, None
            raise
        self._mem = None

    def sync(self) -> None:
        """Make the staged bytes and the file's name durable (in a worker thread)."""
        if self._mem is not None:
            self._spill()
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
        mem = self._mem
        if mem is not None:
            if off + n > len(mem):
                raise EOFError(f"staged bytes end at {len(mem)}, before {off + n}")
            return bytes(mem[off:off + n])
        with local_io(self.what):
            return pread_exact(self.fd, n, off)

    def chunk(self, start: int, end: int) -> list[Piece]:
        """Cut the staged bytes [start, end) into pieces (in a worker thread)."""
        if self._mem is not None:
            return chunk_buf(self.read(start, end - start), start)
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
        mem = self._mem
        if mem is not None and off + len(data) <= MEMORY_BYTES:
            if off > len(mem):
                mem.extend(bytes(off - len(mem)))   # a hole reads as zeros
            mem[off:off + len(data)] = data
            return len(data)
        if mem is not None:
            self._spill()
        return self._pwrite_file(off, data, partial)

    def _pwrite_file(self, off: int, data: bytes | memoryview, partial: bool) -> int:
        """``_pwrite`` into the staging file."""
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
        if self._mem is not None:
            self._mem[off:off + n] = bytes(len(self._mem[off:off + n]))
            return
        if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n):
            err = ctypes.get_errno()
            if err != errno.EOPNOTSUPP:
                with local_io(self.what):
                    raise OSError(err, os.strerror(err))

    def reset(self) -> None:
        """Forget all dirty data (it has been committed)."""
        self.dirty.clear()
        if self._mem is not None:
            self._mem = bytearray()   # not cleared in place: an upload thread may read it
            return
        with local_io(self.what):
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        """Close the file; a kept one is removed (its bytes are committed or given up)."""
        if self._mem is not None:
            self._mem = None
            return
        os.close(self.fd)
        if self.path is not None:
            with local_io(self.what):
                os.unlink(self.path)
