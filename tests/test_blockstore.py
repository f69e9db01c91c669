"""The block store contract, on the local directory and on the GCS emulator."""

from __future__ import annotations

import gc
import os
import sys
import time
import uuid

import pytest

from conftest import GCS_BUCKET
from nimbusfs.blockstore import BlockNotFound, block_hash, open_store
from nimbusfs.blockstore.chunking import MAX_BLOCK, MIN_BLOCK, chunk_fd


@pytest.fixture(params=["local", "gcs"])
def bstore(request, services, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "blocks"))
    return open_store(f"gs://{GCS_BUCKET}/unit-{uuid.uuid4().hex[:8]}")


def test_put_get_range_exists_delete_list(bstore):
    data = os.urandom(100_000)
    key = block_hash(data)
    assert not bstore.exists(key)
    with pytest.raises(BlockNotFound):
        bstore.get(key)
    assert bstore.put(key, data) is True
    assert bstore.put(key, data) is False  # written once, never overwritten
    assert bstore.exists(key)
    assert bstore.get(key) == data
    assert bstore.get_range(key, 1000, 500) == data[1000:1500]
    other = os.urandom(10)
    bstore.put(block_hash(other), other)
    assert set(bstore.list()) == {key, block_hash(other)}
    bstore.delete(key)
    bstore.delete(key)  # absent is not an error
    assert not bstore.exists(key)
    assert list(bstore.list()) == [block_hash(other)]


def test_objects_lists_sizes_and_ages(bstore):
    """Block GC's listing: every block with its size and when it was stored."""
    before = time.time()
    blocks = [os.urandom(n) for n in (1, 5000, 70_000)]
    for b in blocks:
        bstore.put(block_hash(b), b)
    listed = {k: (n, t) for k, n, t in bstore.objects()}
    assert {k: n for k, (n, _) in listed.items()} == {block_hash(b): len(b) for b in blocks}
    # GCS timestamps are the server's (milliseconds): a second either side.
    assert all(before - 1 <= t <= time.time() + 1 for _, t in listed.values())
    bstore.delete(block_hash(blocks[0]))
    assert {k for k, _, _ in bstore.objects()} == {block_hash(b) for b in blocks[1:]}


def test_put_of_stored_block_keeps_no_reference(bstore):
    """A put of a block already stored leaves nothing holding the caller's bytes.

    The mount passes views of 20 MiB segments to ``put``: a reference to one
    left in an uncollected cycle (the GCS client's errors hold their frames)
    kept the whole segment in memory.
    """
    data = os.urandom(100_000)
    key = block_hash(data)
    bstore.put(key, data)
    refs = sys.getrefcount(data)
    gc.disable()
    try:
        assert bstore.put(key, memoryview(data)) is False
        assert sys.getrefcount(data) == refs
    finally:
        gc.enable()


def test_local_put_syncs_the_renamed_entry(tmp_path, monkeypatch):
    """A block is durable when put returns: its directory is fsynced after the rename.

    Also when put finds it there (another thread may have renamed it in and
    not yet synced), and the fan-out directories are made and synced before
    any put.
    """
    import nimbusfs.blockstore.local as local

    events: list[tuple[str, str]] = []
    rename, fsync = os.rename, os.fsync

    def rec_rename(src, dst):
        rename(src, dst)
        events.append(("rename", os.path.dirname(dst)))

    def rec_fsync(fd):
        fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(local.os, "rename", rec_rename)
    monkeypatch.setattr(local.os, "fsync", rec_fsync)
    store = open_store(str(tmp_path / "blocks"))
    assert events == [("fsync", store.root), ("fsync", str(tmp_path))]
    assert len(os.listdir(store.root)) == 256
    data = b"block"
    assert store.put(block_hash(data), data)
    d = os.path.dirname(store._path(block_hash(data)))
    assert events.index(("fsync", d)) > events.index(("rename", d))
    events.clear()
    assert not store.put(block_hash(data), data)
    assert events == [("fsync", d)]


def test_local_store_opens_read_only(tmp_path, monkeypatch):
    """A store the caller cannot write (nimbusfs cat as another user) still reads blocks."""
    import errno

    import nimbusfs.blockstore.local as local

    data = b"block"
    store = open_store(str(tmp_path / "blocks"))
    store.put(block_hash(data), data)
    for d in os.listdir(store.root):  # as a store made before the fan-out was
        if not os.listdir(os.path.join(store.root, d)):
            os.rmdir(os.path.join(store.root, d))

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "read-only")

    monkeypatch.setattr(local.os, "makedirs", refuse)
    assert open_store(str(tmp_path / "blocks")).get(block_hash(data)) == data


def test_chunking_is_content_defined(tmp_path):
    """An insertion changes only the blocks around it; the rest keep their hashes."""
    import blake3

    data = blake3.blake3(b"seed").digest(length=20 << 20)
    edited = data[:7_000_000] + b"!" + data[7_000_000:]
    keys = []
    for content in (data, edited):
        p = tmp_path / "f"
        p.write_bytes(content)
        fd = os.open(p, os.O_RDONLY)
        pieces = chunk_fd(fd, 0, len(content))
        os.close(fd)
        assert sum(pc.length for pc in pieces) == len(content)
        assert all(MIN_BLOCK <= pc.length <= MAX_BLOCK for pc in pieces[:-1])
        keys.append({pc.key for pc in pieces})
    assert len(keys[1] - keys[0]) <= 2


def test_zero_chunks_are_holes(tmp_path):
    p = tmp_path / "z"
    p.write_bytes(bytes(8 << 20))
    fd = os.open(p, os.O_RDONLY)
    pieces = chunk_fd(fd, 0, 8 << 20)
    os.close(fd)
    assert pieces and all(pc.key is None for pc in pieces)
