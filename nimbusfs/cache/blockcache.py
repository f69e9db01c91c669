"""A content-addressed block cache: a small hot set in memory over an LRU on disk.

Blocks are named by their hash, so a cached block is never stale and needs no
invalidation. Every whole block read from disk or fetched from the store is
checked against its hash: a corrupt cache file is dropped and refetched, and a
store that returns wrong bytes twice yields EIO, never wrong data.

A store whose blocks are already on this machine's disk (``store.local``) gets
no disk copy: it would double the I/O of every write and cold read for no
gain. Only the hot set in memory is kept for it. From such a store, random
reads of blocks not in memory read only the bytes they need (``get_range``),
neither hash-checked nor cached: a range cannot be checked against the hash of
the whole block, so for a range the store's own integrity is trusted (it is a
local disk). Nothing unchecked ever enters the cache.

Concurrency: all methods run on the trio thread; file and store I/O go to
worker threads. Concurrent readers of one missing whole block share one
fetch, and its failure (ranged reads are not shared: each reads its own
bytes); a failed block is not fetched again for ``FAILED_SECONDS``. The
disk part never exceeds ``max_bytes`` by more than the block being added.

Outages: every store call (``transfer``) fails with EIO ``timeout`` seconds
after it was made (the mount's outage timeout), however long the store's
worker thread still runs; blocks in memory or on disk are read as before.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import cachetools
import trio

from nimbusfs.blockstore import BlockNotFound, BlockStore, StoreUnavailable, block_hash
from nimbusfs.errors import FSError, local_io
from nimbusfs.metrics import CACHE_HIT_BYTES, CACHE_HITS, CACHE_MISS_BYTES, CACHE_MISSES

R = TypeVar("R")

log = logging.getLogger(__name__)

# What one ranged read of a local store costs besides its bytes (a thread hop,
# open, pread), counted in bytes read: it decides when a block is cheaper to
# read whole (measured: docs/benchmarks.md, "Ranged reads of a local store").
REQUEST_BYTES = 64 << 10
# The hot set: blocks in memory, e.g. those read ahead until the reader gets
# there. 32 MiB holds twice the readahead (nimbusfs/content/reader.py); more
# costs memory and gains nothing measurable (docs/benchmarks.md, "The hot
# set's size").
HOT_BYTES = 32 << 20
# A block whose fetch failed is not fetched again for this long: its readers
# waiting on the fetch, and the kernel, which reads a page again at once when
# its readahead failed, get the same error instead of one more outage
# timeout each (a read of an uncached block took twice the timeout).
FAILED_SECONDS = 2.0


def _hit(tier: str, data: bytes) -> bytes:
    """Count a block read the cache served from ``tier``; return the block."""
    CACHE_HITS.labels(tier).inc()
    CACHE_HIT_BYTES.labels(tier).inc(len(data))
    return data


def _miss(data: bytes) -> bytes:
    """Count a read the store served (a whole block or a range); return its bytes."""
    CACHE_MISSES.inc()
    CACHE_MISS_BYTES.inc(len(data))
    return data


def _missing(key: bytes) -> FSError:
    """The error for a block the store does not have: data is lost, so it is logged too."""
    log.error("block %s is missing from the block store", key.hex())
    return FSError(errno.EIO, f"block {key.hex()} missing from store")


class BlockCache:
    """``directory``: where the disk part lives; None: no disk part, only the hot set
    (the metaserver, ``nimbusfs cat``: processes that read a block once)."""

    def __init__(self, store: BlockStore, directory: str | None, max_bytes: int,
                 hot_bytes: int = HOT_BYTES, transfers: int = 8,
                 segments: int = 4, timeout: float = 60.0) -> None:
        self.store = store
        self.timeout = timeout
        self.dir = os.path.join(directory or "", "blocks")
        self.max_bytes = max_bytes
        self.hot: cachetools.LRUCache[bytes, bytes] = cachetools.LRUCache(hot_bytes, getsizeof=len)
        self.lru: OrderedDict[bytes, int] = OrderedDict()
        self.used = 0
        self.transfers = trio.CapacityLimiter(transfers)
        # Segments of dirty data held in memory while they upload, across all
        # files (each at most 20 MiB): bounds the memory pipelining uses.
        self.segment_slots = trio.Semaphore(segments)
        self._inflight: dict[bytes, trio.Event] = {}
        self._failed: cachetools.TTLCache[bytes, FSError] = cachetools.TTLCache(
            4096, FAILED_SECONDS)
        # What the ranged reads of each block not cached have cost, in bytes
        # (see get_range; bounded: a block forgotten here starts again at 0).
        self.ranged: cachetools.LRUCache[bytes, int] = cachetools.LRUCache(4096)
        self.on_disk = directory is not None and not store.local
        if directory is not None:
            os.makedirs(self.dir, exist_ok=True)
        if self.on_disk:
            self._load_index()

    def _path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.dir, h[:2], h)

    def _load_index(self) -> None:
        """Rebuild the LRU from the files on disk, least recently written first."""
        found = []
        for sub in os.listdir(self.dir):
            d = os.path.join(self.dir, sub)
            for name in os.listdir(d) if os.path.isdir(d) else ():
                p = os.path.join(d, name)
                if name.startswith("."):
                    os.unlink(p)  # a write interrupted by a crash
                    continue
                st = os.stat(p)
                found.append((st.st_mtime_ns, bytes.fromhex(name), st.st_size))
        for _, key, size in sorted(found):
            self.lru[key] = size
            self.used += size
        self._evict()

    def _evict(self) -> None:
        while self.used > self.max_bytes and self.lru:
            key, size = self.lru.popitem(last=False)
            self.used -= size
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass

    def _write_file(self, key: bytes, data: bytes | memoryview) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{key.hex()}.{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _read_file(self, key: bytes) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if block_hash(data) != key:
            log.warning("cached block %s is corrupt; refetching", key.hex())
            os.unlink(self._path(key))
            return None
        return data

    def _remember(self, key: bytes, data: bytes) -> None:
        if len(data) <= self.hot.maxsize:
            self.hot[key] = data

    async def add(self, key: bytes, data: bytes | memoryview, hot: bool = True) -> None:
        """Insert a block just uploaded or fetched (the caller vouches for its hash).

        ``hot=False`` keeps it out of the hot set (a block just written: the
        kernel's page cache holds the file); only then may ``data`` be a view,
        which is not kept.
        """
        if hot:
            self._remember(key, bytes(data))  # bytes(b) is b itself: no copy
        if not self.on_disk:
            return
        if key in self.lru:
            self.lru.move_to_end(key)
            return
        try:
            await trio.to_thread.run_sync(self._write_file, key, data)
        except OSError as e:
            # A full cache disk (often full of staged bytes) costs a later read
            # a fetch: it must not fail the read that fetched the block, nor
            # the upload that stored it.
            log.warning("block %s not kept in the disk cache %s: %s", key.hex(), self.dir, e)
            return
        if key not in self.lru:
            self.lru[key] = len(data)
            self.used += len(data)
            self._evict()

    async def transfer(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(*args)``, a call of the store, in a worker thread within the transfer limiter.

        Fails with EIO ``timeout`` seconds after it was made, the wait for
        the limiter included, or when the store gives up (StoreUnavailable).
        The worker thread cannot be cancelled: it is abandoned, and ends by
        itself once the store's own timeouts (opened with the same figure)
        run out, holding its limiter slot until then. So a close waits for
        no upload past its deadline: the first to fail cancels the others'
        waits.
        """
        with trio.move_on_after(self.timeout):
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.transfers,
                                                     abandon_on_cancel=True)
            except StoreUnavailable as e:
                log.warning("block store %s: %s", self.store.url, e)
                raise FSError(errno.EIO, f"block store: {e}") from None
        log.warning("block store %s: no answer within %g s", self.store.url, self.timeout)
        raise FSError(errno.EIO, f"block store gave no answer within {self.timeout:g} s")

    async def put(self, key: bytes, read: Callable[[], bytes | memoryview],
                  keep: bool = True) -> None:
        """Store the block ``read()`` returns under ``key`` (the caller vouches for its hash).

        ``read`` runs in the transfer's worker thread, so a block staged on
        disk is read there, not on the trio thread. The store puts it only if
        absent. ``keep``: add it to the disk cache, out of the hot set (a
        block just written: the writer's page cache holds its bytes).
        """
        def work() -> bytes | memoryview:
            data = read()
            with local_io(f"block store {self.store.url}"):
                self.store.put(key, data)
            return data
        data = await self.transfer(work)
        if keep:
            await self.add(key, data, hot=False)

    def contains(self, key: bytes) -> bool:
        return key in self.hot or key in self.lru

    async def get(self, key: bytes, disk: bool = True) -> bytes:
        """Return the block's bytes from memory, disk or the store.

        ``disk=False``: a block fetched from the store is kept in the hot set
        only, not written to the disk part (a sequential stream's blocks read
        ahead: see ``content/reader.py``, ``DISK_CUTOFF``).
        """
        data = self.hot.get(key)
        if data is not None:
            return _hit("memory", data)
        while True:
            if (failed := self._failed.get(key)) is not None:
                raise FSError(failed.errno, failed.message)
            if (ev := self._inflight.get(key)) is None:
                break
            await ev.wait()
            data = self.hot.get(key)
            if data is not None:  # another reader's fetch
                return _hit("memory", data)
        ev = self._inflight[key] = trio.Event()
        try:
            return await self._load(key, disk)
        except FSError as e:
            self._failed[key] = e
            raise
        finally:
            del self._inflight[key]
            ev.set()

    async def get_range(self, key: bytes, offset: int, length: int, size: int) -> bytes:
        """Return bytes [offset, offset + length) of a block of ``size`` bytes (a random read).

        From a local store, a block not in memory (nor being fetched) is read
        by ranges, uncached: reading and hashing a whole block (1 MiB on
        average, up to 4 MiB) for a 4 KiB random read is what made those slow.
        The range is not hash-checked (see the module docstring), only its
        length. A block read by ranges again and again is read whole (and kept
        in memory) once its ranges, this one included, would cost as much as
        that whole read, each range costing ``REQUEST_BYTES`` plus its length
        (the rent-or-buy rule: never more than twice the cost of the better
        choice in hindsight); for a 1 MiB block, at the 16th 4 KiB read.

        A remote store's blocks are fetched whole, through ``get``: there a
        request's latency is most of its cost, and the block, cached on disk,
        serves the reads near it; ranges did not win there when measured
        (docs/benchmarks.md, "Ranged reads of a remote store").
        """
        cost = self.ranged.get(key, 0) + REQUEST_BYTES + length
        if (not self.store.local or key in self.hot or key in self._inflight
                or cost >= REQUEST_BYTES + size):
            self.ranged.pop(key, None)
            block = await self.get(key)
            return block[offset:offset + length]
        self.ranged[key] = cost
        try:
            data = await self.transfer(self.store.get_range, key, offset, length)
        except BlockNotFound:
            raise _missing(key) from None
        if len(data) != length:
            raise FSError(errno.EIO, f"block {key.hex()} is short in the store")
        return _miss(data)

    def _fetch(self, key: bytes) -> tuple[bytes, bool]:
        """Get a block from the store and check its hash (one worker-thread hop)."""
        data = self.store.get(key)
        return data, block_hash(data) == key

    async def _load(self, key: bytes, disk: bool) -> bytes:
        if key in self.lru:
            cached = await trio.to_thread.run_sync(self._read_file, key)
            if cached is not None:
                self.lru.move_to_end(key)
                self._remember(key, cached)
                return _hit("disk", cached)
            self.used -= self.lru.pop(key)
        for attempt in range(2):
            try:
                data, ok = await self.transfer(self._fetch, key)
            except BlockNotFound:
                raise _missing(key) from None
            if ok:
                if disk:
                    await self.add(key, data)
                else:
                    self._remember(key, data)
                return _miss(data)
            log.error("block %s from store fails its hash (attempt %d)", key.hex(), attempt + 1)
        raise FSError(errno.EIO, f"block {key.hex()} is corrupt in the store")
