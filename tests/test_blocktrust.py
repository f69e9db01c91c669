"""The trust model for blocks: nobody learns of, references or reads another user's blocks.

Direct mode (the mounts hold store credentials) and proxy mode (``--proxy-blocks``:
blocks go through the metaserver, which hashes what it receives) share the
rules of the mount protocol: ``have_blocks`` answers only for the caller's
blocks, and a commit may name only blocks the caller uploaded or committed
before; proxy mode also serves a block only to its owners.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import psycopg
import pytest
import trio

from conftest import GCS_BUCKET, Deployment, read_file, start_metaserver, write_file
from nimbusfs.blockstore import block_hash, open_store
from nimbusfs.client import connect
from nimbusfs.errors import FSError


@pytest.fixture(scope="module")
def proxied(services) -> Iterator[dict[str, Deployment]]:
    """A metaserver in proxy mode for each block store (the GCS one on the emulator)."""
    deps = {
        "local": start_metaserver(services.emb, "proxy_local",
                                  "file://" + services.emb.path("proxy-blocks"), services.env,
                                  "--proxy-blocks"),
        "gcs": start_metaserver(services.emb, "proxy_gcs", f"gs://{GCS_BUCKET}/proxy",
                                services.env, "--proxy-blocks"),
    }
    yield deps
    for d in deps.values():
        d.proc.terminate()
        d.proc.wait(30)


def _age(dep: Deployment, key: bytes, then: int | None = None) -> tuple[str, int]:
    """A block row's state and the whole days since it became unreferenced; ``then``: make
    that ``then`` seconds ago, after reading it."""
    with psycopg.connect(dep.dsn, autocommit=True) as c:
        state, days = c.execute("SELECT state, extract(epoch FROM now() - unref_since)::int"
                                " / 86400 * 86400 FROM blocks WHERE hash = %s", (key,)).fetchone()
        if then is not None:
            c.execute("UPDATE blocks SET unref_since = now() - make_interval(secs => %s)"
                      " WHERE hash = %s", (then, key))
    return state, days


async def _file(c, name: bytes) -> dict:
    return await c.call("mknod", parent=c.info["root"], name=name, mode=0o100644, uid=0, gid=0)


async def _errno(coro) -> int:
    with pytest.raises(FSError) as e:
        await coro
    return e.value.errno


async def test_have_blocks_answers_only_for_the_callers_blocks(services):
    """A user who knows the hash of another's block is not told it is stored."""
    dep = services.deployments["local"]
    data = os.urandom(300_000)
    key = block_hash(data)
    async with connect(dep.address, dep.new_user(), "a") as a, \
            connect(dep.address, dep.new_user(), "b") as b:
        f = await _file(a, b"secret")
        open_store(a.info["blocks"]).put(key, data)
        await a.call("commit", ino=f["ino"], base=0, extents=[[key, len(data)]],
                     size=len(data), mtime=1)
        assert await a.call("have_blocks", keys=[key]) == [key]
        assert await b.call("have_blocks", keys=[key]) == []


async def test_commit_of_a_block_in_no_store_is_refused(services):
    """Direct mode: a block the store does not hold never enters a version.

    EAGAIN: the mount puts its blocks again and retries (block GC may have
    collected a block put long before the commit)."""
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "a") as a:
        f = await _file(a, b"f")
        key = block_hash(b"never uploaded")
        assert await _errno(a.call("commit", ino=f["ino"], base=0, extents=[[key, 14]],
                                   size=14, mtime=1)) == errno.EAGAIN
        assert (await a.call("getattr", ino=f["ino"]))["version"] == 0


@pytest.mark.parametrize("extents, size", [
    ([[b"\0" * 32, -5]], -5),                        # negative length
    ([[None, 10], [b"\0" * 32, -5]], 5),             # adds up, one length negative
    ([[None, 1 << 63]], 1 << 63),                    # beyond a bigint
    ([[b"short", 5]], 5),                            # not a hash
    ([[b"\0" * 32, (4 << 20) + 1]], (4 << 20) + 1),  # longer than any block
    ([[b"\0" * 32, 5], [b"\0" * 32, 6]], 11),        # one block, two lengths
    ([[None, 5, 1]], 5),                             # not a pair
    ([None], 0),
    ("x", 0),
])
async def test_malformed_extents_are_einval(services, extents, size):
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "a") as a:
        f = await _file(a, b"f")
        assert await _errno(a.call("commit", ino=f["ino"], base=0, extents=extents,
                                   size=size, mtime=1)) == errno.EINVAL
        assert (await a.call("getattr", ino=f["ino"]))["version"] == 0


@pytest.mark.parametrize("kind", ["local", "gcs"])
async def test_proxy_mode_isolates_users_and_still_deduplicates(services, proxied, kind):
    """In proxy mode a user reads and references only blocks they uploaded themselves.

    Knowing another user's hash gets neither the bytes nor a reference; the
    same bytes uploaded by the second user are stored once.
    """
    dep = proxied[kind]
    data = os.urandom(200_000)
    key = block_hash(data)
    async with connect(dep.address, dep.new_user(), "a") as a, \
            connect(dep.address, dep.new_user(), "b") as b:
        assert a.info["blocks"] == "metaserver:"      # no store address for mounts
        await a.call("put_block", key=key, data=data)
        fa = await _file(a, b"secret")
        await a.call("commit", ino=fa["ino"], base=0, extents=[[key, len(data)]],
                     size=len(data), mtime=1)
        assert await a.call("get_block", key=key) == data
        assert await a.call("get_block", key=key, offset=10, length=5) == data[10:15]

        fb = await _file(b, b"probe")
        assert await b.call("have_blocks", keys=[key]) == []
        assert await _errno(b.call("get_block", key=key)) == errno.ENOENT
        assert await _errno(b.call("commit", ino=fb["ino"], base=0,
                                   extents=[[key, len(data)]], size=len(data),
                                   mtime=1)) == errno.EACCES
        assert (await b.call("getattr", ino=fb["ino"]))["version"] == 0
        # Bytes that do not hash to the key show no possession.
        assert await _errno(b.call("put_block", key=key, data=data[:-1])) == errno.EINVAL
        assert await _errno(b.call("get_block", key=key)) == errno.ENOENT

        store = open_store(dep.blocks)
        before = sorted(store.list())
        await b.call("put_block", key=key, data=data)   # possession shown
        assert sorted(store.list()) == before            # stored once
        await b.call("commit", ino=fb["ino"], base=0, extents=[[key, len(data)]],
                     size=len(data), mtime=1)
        assert await b.call("get_block", key=key) == data


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_a_mount_without_store_credentials(mount_factory, proxied, kind):
    """A mount on a proxy-mode server writes and reads its files through the server."""
    m = mount_factory(kind, None, proxied[kind])
    data = os.urandom(5 << 20)
    write_file(m.p("f"), data)
    m.remount(drop_cache=True)
    assert read_file(m.p("f")) == data
    assert "blocks metaserver:" in m.log()


async def test_remote_store_reports_a_missing_block(services, proxied):
    """The mount's side of proxy mode: another user's block reads as absent."""
    from nimbusfs.blockstore import BlockNotFound
    from nimbusfs.blockstore.remote import RemoteStore

    dep = proxied["local"]
    data = os.urandom(1000)
    key = block_hash(data)
    async with connect(dep.address, dep.new_user(), "a") as a, \
            connect(dep.address, dep.new_user(), "b") as b:
        await a.call("put_block", key=key, data=data)
        sa, sb = RemoteStore(a.call), RemoteStore(b.call)
        assert await trio.to_thread.run_sync(sa.get, key) == data
        with pytest.raises(BlockNotFound):
            await trio.to_thread.run_sync(sb.get, key)


async def test_upgrade_gives_users_the_blocks_of_their_versions(services):
    """Migration 0004's Python step: blocks committed before the upgrade stay usable."""
    import importlib

    import psycopg

    dep = services.deployments["local"]
    data = os.urandom(1000)
    key = block_hash(data)
    async with connect(dep.address, dep.new_user(), "a") as a:
        f = await _file(a, b"old")
        open_store(a.info["blocks"]).put(key, data)
        await a.call("commit", ino=f["ino"], base=0, extents=[[key, 1000]], size=1000, mtime=1)
        with psycopg.connect(dep.dsn) as conn:   # as a database from before version 4
            conn.execute("DELETE FROM block_owners WHERE hash = %s", (key,))
        assert await a.call("have_blocks", keys=[key]) == []
        with psycopg.connect(dep.dsn) as conn:
            importlib.import_module("nimbusfs.server.migrations.0004_block_owners").apply(conn)
        assert await a.call("have_blocks", keys=[key]) == [key]


async def test_a_long_name_still_gets_its_conflicted_copy(services):
    """The copy's tag fits in 255 bytes by cutting the stem, then the extension."""
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "host/label/id") as a:
        name = b"c." + b"d" * 253
        f = await _file(a, name)
        await a.call("commit", ino=f["ino"], base=0, extents=[], size=0, mtime=1)
        r = await a.call("commit", ino=f["ino"], base=0, extents=[], size=0, mtime=2,
                         parent=a.info["root"], name=name)
        copy = r["conflict"]
        names = [n for n, _ in await a.call("readdir", ino=a.info["root"])]
        (made,) = [n for n in names if b"conflicted copy" in n]
        assert len(made) <= 255 and made.startswith(b"c (conflicted copy host label ")
        assert copy["ino"] != f["ino"]


async def test_two_conflicts_in_one_second_on_a_long_name_get_two_copies(services):
    """The copy's number is part of the tag, which is never cut (it looped forever)."""
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "h" * 200 + "/label/id") as a:
        name = b"x" * 250
        f = await _file(a, name)
        await a.call("commit", ino=f["ino"], base=0, extents=[], size=0, mtime=1)
        for _ in range(2):
            with trio.fail_after(30):
                await a.call("commit", ino=f["ino"], base=0, extents=[], size=0, mtime=2,
                             parent=a.info["root"], name=name)
        names = [n for n, _ in await a.call("readdir", ino=a.info["root"])]
        copies = [n for n in names if b"conflicted copy" in n]
        assert len(copies) == 2 and all(len(n) <= 255 for n in copies)


@pytest.mark.parametrize("mode", ["direct", "proxy"])
async def test_hold_blocks_holds_only_what_the_caller_may_reference(services, proxied, mode):
    """``hold_blocks`` (a mount keeps the blocks it uploaded ahead from block GC).

    It holds the caller's stored blocks and answers the others as not held. In
    proxy mode another user's block is answered exactly as a block nobody
    stores; in direct mode (one trust domain) a block the store holds is held
    and becomes the caller's, as a commit naming it would make it.
    """
    dep = proxied["local"] if mode == "proxy" else services.deployments["local"]
    data, nowhere = os.urandom(200_000), os.urandom(1000)
    key, absent = block_hash(data), block_hash(nowhere)
    extents = [[key, len(data)], [None, 5], [absent, len(nowhere)]]
    async with connect(dep.address, dep.new_user(), "a") as a, \
            connect(dep.address, dep.new_user(), "b") as b:
        assert a.info["gc_grace"] == 3600.0      # the servers' default, told to mounts
        if mode == "proxy":
            await a.call("put_block", key=key, data=data)
        else:
            open_store(a.info["blocks"]).put(key, data)
        assert await a.call("hold_blocks", extents=extents) == [absent]
        assert _age(dep, key, 86400) == ("live", 0)          # then as if unused for a day
        assert await a.call("hold_blocks", extents=extents) == [absent]
        assert _age(dep, key, 86400) == ("live", 0)          # its grace restarted
        held_by_b = await b.call("hold_blocks", extents=extents)
        if mode == "proxy":                                  # not told it is stored
            assert sorted(held_by_b) == sorted([key, absent])
            assert _age(dep, key) == ("live", 86400)
        else:
            assert held_by_b == [absent]
            assert _age(dep, key) == ("live", 0)
        assert await a.call("hold_blocks", extents=[[None, 5]]) == []
        for bad in ([[key[:-1], len(data)]], [[key, 0]], [[key, 1 << 30]], [[key, 1 << 62]], [key],
                    [[key, len(data)]] * 10_001, "x"):
            assert await _errno(a.call("hold_blocks", extents=bad)) == errno.EINVAL
        assert await _errno(a.call("hold_blocks", keys=[key])) == errno.EINVAL
