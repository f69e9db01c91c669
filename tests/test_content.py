"""The content layer in-process: the stand-in for the HTTP server, with no FUSE and no TCP.

A writer and a reader over the test PostgreSQL's namespace functions
(``NamespaceMeta`` on a ``MetaServer`` that is built but never serves) and
the local block store, as a front end inside the metaserver would use them:
write, overwrite, truncate, commit, read back, conflicts. What the mount
does with the same classes is covered by the FUSE tests (test_datapath,
test_fileops, test_writeback ...).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from nimbusfs.blockstore import block_hash, open_store
from nimbusfs.cache import BlockCache
from nimbusfs.content import Content, Writer
from nimbusfs.content.writer import PIPELINE_BYTES
from nimbusfs.errors import FSError
from nimbusfs.server import namespace
from nimbusfs.server.auth import User, authenticate
from nimbusfs.server.contentmeta import NamespaceMeta
from nimbusfs.server.db import Database
from nimbusfs.server.metaserver import MetaServer


class Named(Writer):
    """A writer that, like the mount's, names where a conflicted copy goes."""

    def __init__(self, *args: Any, name: bytes, parent: int) -> None:
        super().__init__(*args)
        self.where = {"parent": parent, "name": name}
        self.copies: list[dict[str, Any]] = []

    def commit_hint(self) -> dict[str, Any]:
        return self.where

    def conflicted(self, copy: dict[str, Any]) -> None:
        self.copies.append(copy)


@dataclass
class Front:
    """An in-process front end: one user's view of the content layer."""

    server: MetaServer
    user: User
    content: Content

    async def create(self, name: bytes) -> Named:
        attr = await self.server.mutate(namespace.mknod, self.user, "test", parent=self.user.root,
                                        name=name, mode=stat.S_IFREG | 0o644, uid=0, gid=0)
        return Named(self.content, attr["ino"], attr, [], name=name, parent=self.user.root)

    async def open(self, ino: int, name: bytes) -> Named:
        r = await self.content.meta.open_file(ino)
        return Named(self.content, ino, r["attr"], r["extents"], name=name,
                     parent=self.user.root)

    async def download(self, ino: int) -> bytes:
        """The file's current version as the HTTP server sends it (``BlockAccess.read``)."""
        r = await self.content.meta.open_file(ino)
        return b"".join([d async for d in self.server.blocks.read(r["extents"], 0,
                                                                   r["attr"]["size"])])


@pytest.fixture
async def front(services, tmp_path) -> AsyncIterator[Front]:
    dep = services.deployments["local"]
    db = Database(dep.dsn, pool_size=4)
    db.open()
    store = open_store(dep.blocks)
    server = MetaServer(db, dep.dsn, store)
    user = db.run(authenticate, dep.new_user())
    os.makedirs(tmp_path / "staging")
    try:
        async with trio.open_nursery() as nursery:
            def spawn(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
                nursery.start_soon(fn, *args)
            cache = BlockCache(store, None, 0)
            yield Front(server, user, Content(cache, NamespaceMeta(server, user, "test"), spawn,
                                              str(tmp_path / "staging")))
            nursery.cancel_scope.cancel()
    finally:
        db.close()


def pattern(seed: bytes, n: int) -> bytearray:
    """``n`` bytes that chunk into many blocks and differ from any other seed's."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += block_hash(seed + i.to_bytes(8, "big")) * 1024
        i += 1
    return out[:n]


async def check(front: Front, f: Writer, data: bytes | bytearray) -> None:
    """The file reads back as ``data``: through the writer, a fresh reader and a download."""
    assert await f.read(0, len(data) + 10) == data
    again = await front.open(f.ino, b"")
    assert again.size == len(data)
    assert await again.read(0, len(data) + 10) == data
    assert await again.read(len(data) // 3, 5000) == data[len(data) // 3:len(data) // 3 + 5000]
    assert await front.download(f.ino) == data


async def test_write_overwrite_truncate_read_back(front: Front) -> None:
    f = await front.create(b"a.bin")
    data = pattern(b"a", 3 * PIPELINE_BYTES + 12345)   # pipelined: uploaded while written
    for off in range(0, len(data), 1 << 20):
        await f.write(off, bytes(data[off:off + (1 << 20)]), kill_priv=False)
    await f.flush()
    assert f.base == 1 and not f.modified
    await check(front, f, data)
    before = list(f.extents.keys)

    # An overwrite in the middle re-cuts only the blocks it touches.
    at = len(data) // 2
    data[at:at + 100] = b"x" * 100
    await f.write(at, b"x" * 100, kill_priv=False)
    assert await f.read(at - 10, 120) == data[at - 10:at + 110]   # staged, before the commit
    await f.flush()
    assert f.base == 2
    await check(front, f, data)
    assert len(set(f.extents.keys) - set(before)) <= 3

    # Truncate inside a block, then extend with a hole and write past it.
    await f.truncate(len(data) // 3 + 7)
    del data[len(data) // 3 + 7:]
    await f.truncate(len(data) + (5 << 20))
    data += bytes(5 << 20)
    await f.write(len(data), b"tail", kill_priv=False)
    data += b"tail"
    await f.flush()
    assert f.base == 3
    await check(front, f, data)
    assert f.extents.keys[-2] is None   # past the truncated block, a hole: no zeros stored


async def test_dedup_and_small_files(front: Front) -> None:
    """Small files commit without asking which blocks exist; equal bytes are stored once."""
    data = os.urandom(100_000)
    files = []
    for name in (b"one", b"two"):
        f = await front.create(name)
        await f.write(0, data, kill_priv=False)
        await f.flush()
        files.append(f)
    assert files[0].extents.pairs() == files[1].extents.pairs()
    for f in files:
        await check(front, f, data)
    empty = await front.create(b"empty")
    await empty.truncate(0)
    await empty.flush()
    await check(front, empty, b"")


async def test_conflict_keeps_both(front: Front) -> None:
    """Two writers from one base: the first wins the name, the second's bytes are a copy."""
    a = await front.create(b"c.txt")
    b = await front.open(a.ino, b"c.txt")
    await a.write(0, b"first writer", kill_priv=False)
    await b.write(0, b"second writer", kill_priv=False)
    await a.flush()
    await b.flush()
    assert a.copies == [] and len(b.copies) == 1
    names = {bytes(n): a["ino"] for n, a in await front.server.call(
        namespace.readdir, front.user, "test", front.user.root)}
    copy_name, = (n for n in names if n.startswith(b"c (conflicted copy test "))
    assert names[copy_name] == b.copies[0]["ino"] and names[b"c.txt"] == a.ino
    await check(front, b, b"first writer")             # b shows the winner now
    copy = await front.open(b.copies[0]["ino"], b"")
    assert await copy.read(0, 100) == b"second writer"


async def test_corrupt_block_is_eio_never_wrong_bytes(front: Front) -> None:
    """A block whose stored bytes fail their hash: every reader gets EIO, not the bytes."""
    data = os.urandom(300_000)
    f = await front.create(b"bad.bin")
    await f.write(0, data, kill_priv=False)
    await f.flush()
    key = f.extents.keys[0]
    assert key is not None
    path = os.path.join(front.server.blocks.store.root, key[:1].hex(), key.hex())
    with open(path, "r+b") as out:
        out.write(b"\xff" * 16)
    fresh = await front.open(f.ino, b"bad.bin")
    with pytest.raises(FSError) as e:
        await front.download(f.ino)
    assert e.value.errno == errno.EIO
    with pytest.raises(FSError) as e:
        await fresh.read(0, 4096 * 4)   # sequential: whole blocks, hash-checked
    assert e.value.errno == errno.EIO
