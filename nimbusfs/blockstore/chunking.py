"""Content-defined chunking: where block boundaries fall.

FastCDC cuts where a rolling hash of the content matches, so an insertion in
the middle of a file moves only the one or two cut points around it and every
other block keeps its hash (and is deduplicated). Chunks that are all zeros are
reported as holes (``key is None``): they cost no storage.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from pyfastcdc import FastCDC

from nimbusfs.blockstore.base import block_hash

AVG_BLOCK = 1 << 20
MIN_BLOCK = 256 << 10
MAX_BLOCK = 4 << 20

_cdc = FastCDC(AVG_BLOCK, min_size=MIN_BLOCK, max_size=MAX_BLOCK)


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of a window: its offset in the file, length and hash (None = zeros)."""

    offset: int
    length: int
    key: bytes | None


def pread_exact(fd: int, n: int, off: int) -> bytes:
    """Bytes [off, off + n) of ``fd``, all of them: ``os.pread`` may return fewer.

    Every caller reads bytes it wrote before: a file that ends sooner is a bug,
    never zeros to commit (EOFError).
    """
    parts = []
    while n:
        data = os.pread(fd, n, off)
        if not data:
            raise EOFError(f"file ends at {off}, {n} bytes before the range read")
        parts.append(data)
        off += len(data)
        n -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _FdRange:
    """A ``readinto`` stream over bytes [start, end) of a file descriptor."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.pos, self.end = fd, start, end

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self.end - self.pos)
        if n <= 0:
            return 0
        got = os.preadv(self.fd, [buf[:n]], self.pos)
        if not got:  # a stream's end: the chunks would stop short of ``end``
            raise EOFError(f"file ends at {self.pos}, before {self.end}")
        self.pos += got
        return got


def _is_zero(data: memoryview) -> bool:
    # A block that is not all zeros mostly says so by its first or last byte,
    # without copying it. Otherwise bytes(n) is calloc'ed and the comparison a
    # memcmp: ~0.1 ms per MiB.
    return not (data[0] or data[-1]) and bytes(data) == bytes(len(data))


def _pieces(chunks: Iterable, start: int) -> list[Piece]:
    out = []
    for c in chunks:
        data = c.data
        key = None if _is_zero(data) else block_hash(data)
        out.append(Piece(start + c.offset, c.length, key))
    return out


def chunk_fd(fd: int, start: int, end: int) -> list[Piece]:
    """Cut bytes [start, end) of ``fd`` into pieces and hash them.

    Memory stays bounded by the chunker's buffer whatever the window size. A
    window of at most ``MAX_BLOCK`` is read whole instead: the stream chunker
    allocates its buffer per call (~0.3 ms), more than a small file's whole
    close costs otherwise; the cuts are the same. Runs in a worker thread
    (CPU-bound hashing).
    """
    if end - start <= MAX_BLOCK:
        return chunk_buf(pread_exact(fd, end - start, start), start)
    return _pieces(_cdc.cut_stream(_FdRange(fd, start, end)), start)


def chunk_buf(buf: bytes, start: int) -> list[Piece]:
    """Cut ``buf``, the bytes of a file from offset ``start``, into pieces and hash them.

    Every cut but the last depends only on the bytes before it, so all pieces
    except the last are the ones chunking a longer stream from ``start`` would
    give. Runs in a worker thread.
    """
    return _pieces(_cdc.cut_buf(buf), start)
