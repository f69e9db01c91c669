"""Extents to bytes, through the block cache: the read path of every front end.

Every block comes from ``BlockCache``, which checks a whole block's hash
wherever it was read from (memory excepted: only checked bytes enter it),
refetches a mismatch once, then fails with EIO: never wrong bytes.

Two shapes of reading:

- a file open on the mount (``Readahead`` with ``plan_extents`` and
  ``fetch``): a read of a few pages is planned synchronously (the file's
  content at one instant, whatever changes it while blocks are fetched) and
  its blocks fetched; sequential reads start fetches of the blocks ahead,
  which the cache keeps in its hot set until the reader gets there;
- a whole version streamed (``stream``: ``nimbusfs cat``, the HTTP
  server's downloads): block after block, with the next ``STREAM_AHEAD``
  blocks fetched while one is sent, held by the stream itself.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from itertools import islice
from typing import Any, NamedTuple

import trio

from nimbusfs.cache import BlockCache
from nimbusfs.content.extents import Extents

log = logging.getLogger(__name__)

# Sequential reads fetch this far ahead, half the cache's hot set (32 MiB)
# so that blocks read ahead are still in memory when the reader gets there.
READAHEAD_BYTES = 16 << 20
# Blocks read ahead past this offset of a file stay in memory only, not on
# the cache disk: a long sequential stream (a video, a copy of a large file)
# is read once, and writing each of its blocks to the disk cost 40% of a
# cold read's CPU (GCS emulator: 386-464 MB/s with, 567-729 without; bcache's
# sequential_cutoff and ZFS's l2arc_noprefetch do the same, for the same
# reason: docs/gcs-path.md). Small files and the first 16 MiB of large ones
# stay on disk (readable offline); so does every block read at random or
# by the reader itself.
DISK_CUTOFF = 16 << 20
# The kernel issues readahead requests concurrently; they may arrive out of order.
SEQ_SLACK = 1 << 20
# Blocks a stream fetches while it sends one: it waits for the store once,
# not once per block, and holds at most this many blocks besides the one it
# sends (4 x MAX_BLOCK; 4 MiB on average).
STREAM_AHEAD = 4
# Zeros of a hole are streamed in pieces of this size.
ZEROS = 1 << 20


class Span(NamedTuple):
    """Bytes [offset, offset + length) of a stored block of ``size`` bytes, to fetch."""

    key: bytes
    offset: int
    length: int
    size: int
    ranged: bool   # read only these bytes if the block is not cached (a random read)


# What a read returns, in order: bytes known at planning time, and spans of blocks.
Plan = list[bytes | Span]


def plan_extents(ext: Extents, start: int, end: int, limit: int, ranged: bool,
                 out: Plan) -> None:
    """Append the plan of bytes [start, end) of ``ext``: zeros past ``limit`` or a hole."""
    pos = start
    i = ext.index(pos)
    limit = min(ext.size, limit)
    while pos < end:
        if pos >= limit:
            out.append(bytes(end - pos))
            break
        e_start, key = ext.offs[i], ext.keys[i]
        take = min(end, e_start + ext.lens[i], limit) - pos
        out.append(bytes(take) if key is None
                   else Span(key, pos - e_start, take, ext.lens[i], ranged))
        pos += take
        i += 1


async def fetch(cache: BlockCache, plan: Plan) -> bytes:
    """The bytes of a plan, its blocks fetched one after the other."""
    parts: list[bytes | memoryview] = []
    for x in plan:
        if isinstance(x, bytes):
            parts.append(x)
        elif x.ranged:
            parts.append(await cache.get_range(x.key, x.offset, x.length, x.size))
        else:  # a view: the join below is the only copy
            parts.append(memoryview(await cache.get(x.key))[x.offset:x.offset + x.length])
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


class Readahead:
    """Whether a file's reads are sequential, and its readahead of committed blocks.

    Not locked: the state is updated before any await, so the kernel's
    concurrent requests of one sequential reader each see their predecessor's
    end. ``spawn`` runs a background task whose failure is logged (a block
    read ahead that fails is fetched again, and fails, when it is read).
    """

    def __init__(self, cache: BlockCache, spawn: Callable[..., None]) -> None:
        self.cache = cache
        self.spawn = spawn
        self.last_read_end = -1
        self.ra_end = 0               # readahead has been started up to here

    def ranged(self, off: int, size: int) -> bool:
        """Whether a read of [off, off + size) is random (not continuing the previous one).

        A sequential read fetches whole blocks, caches them and reads ahead;
        a random one, from a local store, reads only the bytes asked for of
        blocks not in memory (``BlockCache.get_range``).
        """
        ranged = abs(off - self.last_read_end) > SEQ_SLACK
        self.last_read_end = off + size
        return ranged

    def after(self, ext: Extents, pos: int) -> None:
        """A sequential read ended at ``pos``: fetch the blocks up to READAHEAD_BYTES past it.

        Each block is requested once per pass (``ra_end``); the cache's
        transfer limiter bounds how many fetches run at once.
        """
        i = ext.index(pos - 1) + 1  # the first extent past the one read
        if i >= len(ext):
            return
        if not ext.offs[i] <= self.ra_end <= pos + READAHEAD_BYTES:
            self.ra_end = ext.offs[i]  # a new pass (a seek, or the file read again)
        j = ext.index(self.ra_end)
        while j < len(ext) and ext.offs[j] < pos + READAHEAD_BYTES:
            key = ext.keys[j]
            if key is not None and not self.cache.contains(key):
                self.spawn(self.cache.get, key, disk=ext.offs[j] < DISK_CUTOFF)
            j += 1
        self.ra_end = ext.offs[j] if j < len(ext) else ext.size


class _Fetch:
    """One block of a stream fetched through the cache in the background.

    A system task rather than a nursery's: ``stream`` is an async generator,
    which must not keep a nursery open across its yields. Once ``scope`` is
    cancelled (the stream stopped) the fetch is abandoned (``BlockCache``
    abandons its worker thread, which ends with its store call).
    """

    def __init__(self, cache: BlockCache, key: bytes) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.data = b""
        self.error: Exception | None = None
        trio.lowlevel.spawn_system_task(self._run, cache, key)

    async def _run(self, cache: BlockCache, key: bytes) -> None:
        with self.scope:
            try:
                self.data = await cache.get(key)
            except Exception as e:   # FSError, or a bug: raised to the stream's reader
                self.error = e
        self.done.set()

    async def result(self) -> bytes:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.data


async def stream(cache: BlockCache, extents: list[Any], start: int,
                 end: int) -> AsyncIterator[bytes]:
    """The bytes [start, end) of a version with these extents, block by block.

    The next ``STREAM_AHEAD`` blocks are fetched while one is yielded; when
    the caller stops, the fetches under way are cancelled.
    """
    spans: list[tuple[bytes | None, int, int]] = []   # (block, from, to) within it
    pos = 0
    for key, n in extents:
        a, b = max(start, pos), min(end, pos + n)
        if a < b:
            spans.append((None if key is None else bytes(key), a - pos, b - pos))
        pos += n
        if pos >= end:
            break
    todo = iter(spans)
    ahead: deque[tuple[_Fetch | None, int, int]] = deque()

    def fill() -> None:
        for key, a, b in islice(todo, STREAM_AHEAD - len(ahead)):
            ahead.append((None if key is None else _Fetch(cache, key), a, b))
    try:
        fill()
        while ahead:
            job, a, b = ahead[0]
            data = None if job is None else await job.result()
            ahead.popleft()
            fill()
            if data is None:
                for z in range(a, b, ZEROS):
                    yield bytes(min(ZEROS, b - z))
            else:
                yield data[a:b]
    finally:
        for job, _, _ in ahead:
            if job is not None:
                job.scope.cancel()
