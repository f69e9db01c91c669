"""The block cache: size limit, hash checks, shared fetches (real local store, no mocks)."""

from __future__ import annotations

import os
import threading
from functools import partial

import pytest
import trio
import trio.testing

from nimbusfs.blockstore import block_hash
from nimbusfs.blockstore.chunking import MAX_BLOCK, chunk_buf, chunk_fd
from nimbusfs.blockstore.local import LocalStore
from nimbusfs.cache import BlockCache, Ranges
from nimbusfs.content.extents import Extents
from nimbusfs.content.reader import DISK_CUTOFF, Readahead, fetch, plan_extents
from nimbusfs.errors import FSError


class CountingStore(LocalStore):
    """A real local store standing in for a remote one (so blocks are cached on disk)."""

    local = False
    fetches = 0
    ranges = 0

    def get(self, key: bytes) -> bytes:
        self.fetches += 1
        return super().get(key)

    def get_range(self, key: bytes, offset: int, length: int) -> bytes:
        self.ranges += 1
        return super().get_range(key, offset, length)


def blocks(n: int, size: int) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(n):
        d = os.urandom(size)
        out.append((block_hash(d), d))
    return out


async def test_disk_limit_is_kept(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=1 << 20, hot_bytes=0)
    for key, data in blocks(10, 300_000):
        store.put(key, data)
        assert await cache.get(key) == data
        assert cache.used <= cache.max_bytes
    on_disk = sum(e.stat().st_size for d in os.scandir(cache.dir) for e in os.scandir(d))
    assert on_disk == cache.used <= 1 << 20


async def test_index_survives_restart(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    (key, data), = blocks(1, 1000)
    store.put(key, data)
    await cache.get(key)
    again = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    assert await again.get(key) == data
    assert store.fetches == 1


async def test_corrupt_cache_file_is_refetched(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20, hot_bytes=0)
    (key, data), = blocks(1, 5000)
    store.put(key, data)
    await cache.get(key)
    with open(cache._path(key), "r+b") as f:
        f.truncate(100)
    assert await cache.get(key) == data
    assert store.fetches == 2


async def test_corrupt_store_block_is_eio(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    ((key, _),) = blocks(1, 5000)
    store.put(key, b"not the right bytes")
    with pytest.raises(FSError) as e:
        await cache.get(key)
    assert e.value.errno == 5
    assert store.fetches == 2  # refetched once before giving up


async def test_concurrent_readers_share_one_fetch(tmp_path):
    store = CountingStore(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    (key, data), = blocks(1, 1 << 20)
    store.put(key, data)
    results = []

    async def reader():
        results.append(await cache.get(key))

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(reader)
    assert results == [data] * 8
    assert store.fetches == 1


class CountingLocal(CountingStore):
    """The same, as the local store it is: random reads may read it by ranges."""

    local = True


async def test_random_reads_of_a_local_store_read_ranges_until_the_block_is_hot(tmp_path):
    """A 1 MiB block not in memory is read by 4 KiB ranges, uncached, 15 times; then whole."""
    store = CountingLocal(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    (key, data), = blocks(1, 1 << 20)
    store.put(key, data)
    for i in range(15):
        off = i * 60_000
        assert await cache.get_range(key, off, 4096, len(data)) == data[off:off + 4096]
    assert (store.ranges, store.fetches) == (15, 0)
    assert not cache.contains(key)
    assert await cache.get_range(key, 5, 4096, len(data)) == data[5:4101]
    assert (store.ranges, store.fetches) == (15, 1)   # the 16th read fetched it whole
    assert cache.contains(key)
    assert await cache.get_range(key, 9000, 100, len(data)) == data[9000:9100]
    assert (store.ranges, store.fetches) == (15, 1)   # served from memory


async def test_random_reads_of_a_remote_store_fetch_whole_blocks(tmp_path):
    """Remote blocks are fetched whole, hash-checked and cached on disk, even for 4 KiB."""
    store = CountingStore(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20, hot_bytes=0)
    (key, data), = blocks(1, 1 << 20)
    store.put(key, data)
    assert await cache.get_range(key, 4096, 4096, len(data)) == data[4096:8192]
    assert (store.ranges, store.fetches) == (0, 1)
    with open(cache._path(key), "r+b") as f:
        f.write(b"garbage")
    assert await cache.get_range(key, 0, 4096, len(data)) == data[:4096]
    assert (store.ranges, store.fetches) == (0, 2)   # the corrupt cache file was refetched


async def test_ranged_reads_share_a_whole_fetch_in_flight(tmp_path):
    """Readers of a block being fetched whole wait for that fetch, not the store."""
    store = CountingLocal(str(tmp_path / "store"))
    gate = threading.Event()
    get = store.get
    store.get = lambda key: gate.wait() and get(key)
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    (key, data), = blocks(1, 1 << 20)
    store.put(key, data)
    results = []

    async def reader(off: int) -> None:
        results.append(await cache.get_range(key, off, 4096, len(data)) == data[off:off + 4096])

    async with trio.open_nursery() as n:
        n.start_soon(cache.get, key)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(8):
            n.start_soon(reader, i * 100_000)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == [True] * 8
    assert (store.ranges, store.fetches) == (0, 1)


async def test_ranged_read_of_a_missing_block_is_eio(tmp_path):
    store = CountingLocal(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    (key, _), = blocks(1, 1000)
    with pytest.raises(FSError) as e:
        await cache.get_range(key, 0, 100, 1000)
    assert e.value.errno == 5


def test_ranges_merge_split_clip():
    r = Ranges()
    r.add(10, 20)
    r.add(30, 40)
    r.add(20, 25)        # adjacent: merges
    assert list(r) == [(10, 25), (30, 40)]
    r.add(5, 35)
    assert list(r) == [(5, 40)]
    r.add(50, 60)
    assert r.split(0, 70) == [(0, 5, False), (5, 40, True), (40, 50, False), (50, 60, True),
                              (60, 70, False)]
    r.clip(55)
    assert list(r) == [(5, 40), (50, 55)]
    r.clip(45)
    assert list(r) == [(5, 40)]


async def test_local_store_gets_no_disk_copy(tmp_path):
    """Blocks of a store on local disk are kept in memory only, still hash-checked."""
    store = LocalStore(str(tmp_path / "store"))
    fetches = []
    get = store.get
    store.get = lambda key: fetches.append(key) or get(key)
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=10 << 20)
    (key, data), (bad, _) = blocks(2, 5000)
    store.put(key, data)
    await cache.add(key, data)
    assert await cache.get(key) == data
    assert fetches == []                      # served from the hot set
    assert not any(os.scandir(cache.dir))     # no second copy on disk
    cache.hot.clear()
    assert await cache.get(key) == data
    assert fetches == [key]
    store.put(bad, b"not the right bytes")
    with pytest.raises(FSError):
        await cache.get(bad)


def test_segment_cuts_are_the_whole_stream_cuts(tmp_path):
    """Pipelining's premise: cutting a prefix gives the same pieces, except the last."""
    data = os.urandom(24 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = chunk_fd(fd, 1000, len(data))
    finally:
        os.close(fd)
    done = []
    pos = 1000
    while len(data) - pos > 2 * MAX_BLOCK:  # segment by segment, as the pump does
        seg = chunk_buf(data[pos:pos + 8 * MAX_BLOCK // 2], pos)[:-1]
        done += seg
        pos = seg[-1].offset + seg[-1].length
    assert len(done) > 2
    assert done == whole[:len(done)]


async def test_a_long_sequential_stream_stays_off_the_cache_disk(tmp_path):
    """Blocks read ahead past DISK_CUTOFF are kept in memory only; the first ones, and a
    block read at random anywhere, are cached on disk (readable offline)."""
    store = CountingStore(str(tmp_path / "store"))
    cache = BlockCache(store, str(tmp_path / "c"), max_bytes=1 << 30)
    parts = blocks(24, 1 << 20)
    for key, data in parts:
        store.put(key, data)
    ext = Extents([[key, len(data)] for key, data in parts])
    nursery: list[trio.Nursery] = []
    reads = Readahead(cache, lambda fn, *a, **kw: nursery[0].start_soon(partial(fn, *a, **kw)))
    got = []
    for off in range(0, ext.size, 1 << 20):   # the kernel's 1 MiB reads, one after the other
        plan: list = []
        reads.ranged(off, 1 << 20)
        plan_extents(ext, off, off + (1 << 20), ext.size, False, plan)
        got.append(await fetch(cache, plan))
        async with trio.open_nursery() as n:   # the readahead it starts, finished
            nursery[:] = [n]
            reads.after(ext, off + (1 << 20))
    assert b"".join(got) == b"".join(data for _, data in parts)
    assert store.fetches == len(parts)
    assert set(cache.lru) == {key for i, (key, _) in enumerate(parts)
                              if i << 20 < DISK_CUTOFF}
    cache.hot.clear()
    far, data = parts[-1]
    assert await cache.get_range(far, 4096, 4096, len(data)) == data[4096:8192]
    assert far in cache.lru
