"""The block cache: size limit, hash checks, shared fetches (real local store, no mocks)."""

from __future__ import annotations

import os

import pytest
import trio

from blockstore import block_hash
from blockstore.chunking import MAX_BLOCK, chunk_buf, chunk_fd
from blockstore.local import LocalStore
from cache import BlockCache, Ranges
from metaserver.errors import FSError


class CountingStore(LocalStore):
    """A real local store standing in for a remote one (so blocks are cached on disk)."""

    local = False
    fetches = 0

    def get(self, key: bytes) -> bytes:
        self.fetches += 1
        return super().get(key)


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
