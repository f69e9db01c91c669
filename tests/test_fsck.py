"""fsck: a database and a block store corrupted on purpose, one fault at a time.

Each case starts from a volume written through a real mount (a directory,
a file with a hard link, a small file, a symlink), checks that fsck finds
nothing, breaks one thing, and checks what ``nimbusfs fsck`` says, its exit
code, and what ``--repair`` leaves.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import msgpack
import pytest

from conftest import Deployment, read_file, start_metaserver, write_file
from nimbusfs.blockstore import open_store
from nimbusfs.server.db import Database

_worlds = itertools.count()


@pytest.fixture
def world(services, mount_factory) -> Iterator[tuple[Deployment, Database, object, object]]:
    name = f"fsck_{os.getpid()}_{next(_worlds)}"
    blocks = "file://" + services.emb.path(name)
    dep = start_metaserver(services.emb, name, blocks, services.env, "--gc-interval", "0")
    db = Database(dep.dsn, pool_size=1)
    db.open()
    m = mount_factory("local", dep.new_user(), dep)
    os.mkdir(m.p("d"))
    write_file(m.p("d", "a"), os.urandom(300_000))
    os.link(m.p("d", "a"), m.p("d", "b"))
    write_file(m.p("c"), b"small file")
    os.symlink("d/a", m.p("s"))
    yield dep, db, open_store(blocks), m
    m.stop()   # before its server: a mount without one waits for it to come back
    dep.proc.terminate()
    dep.proc.wait(30)
    db.close()


def fsck(dep: Deployment, *flags: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "nimbusfs.cli", "fsck", "--dsn", dep.dsn,
                        "--blocks", dep.blocks, *flags], capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout


def sql(db: Database, query: str, *args) -> list:
    def run(cur):
        cur.execute(query, args)
        return cur.fetchall() if cur.description else []
    return db.run(run)


def block_of(db: Database, ino: int) -> bytes:
    (ext,), = sql(db, "SELECT v.extents FROM versions v JOIN inodes i ON i.id = v.inode"
                      " AND i.version = v.version WHERE i.id = %s", ino)
    return bytes(msgpack.unpackb(ext)[0][0])


def test_fsck_of_a_sound_store_finds_nothing(world):
    dep, *_ = world
    code, out = fsck(dep, "--verify-blocks")
    assert code == 0 and "no faults found" in out, out


# (fault, what it does to the world, what fsck names, whether --repair clears it)
def _missing_block(db, bstore, m):
    bstore.delete(block_of(db, os.stat(m.p("d", "a")).st_ino))


def _corrupt_block(db, bstore, m):
    key = block_of(db, os.stat(m.p("d", "a")).st_ino)
    path = bstore._path(key)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(b"not these bytes")


def _refcount(db, bstore, m):
    sql(db, "UPDATE blocks SET refcount = refcount + 3 WHERE hash = %s",
        block_of(db, os.stat(m.p("c")).st_ino))


def _nlink(db, bstore, m):
    sql(db, "UPDATE inodes SET nlink = 5 WHERE id = %s", os.stat(m.p("d", "a")).st_ino)


def _dangling_entry(db, bstore, m):
    def run(cur):
        cur.execute("SET LOCAL session_replication_role = replica")  # no foreign keys
        cur.execute("INSERT INTO dentries (parent, name, inode) SELECT root_inode, 'ghost',"
                    " 999999999 FROM users")
    db.run(run)


def _orphan(db, bstore, m):
    ino = os.stat(m.p("c")).st_ino
    sql(db, "DELETE FROM dentries WHERE inode = %s", ino)
    sql(db, "UPDATE inodes SET nlink = 0, ctime_ns = %s WHERE id = %s",
        time.time_ns() - 8 * 86400 * 10**9, ino)


def _quota(db, bstore, m):
    sql(db, "UPDATE users SET used_bytes = used_bytes + 1000")


def _unreachable(db, bstore, m):
    ino = os.stat(m.p("d")).st_ino
    sql(db, "UPDATE dentries SET parent = %s WHERE inode = %s", ino, ino)


@pytest.mark.parametrize("fault, break_it, repairable, flags", [
    ("missing_block", _missing_block, False, ()),
    ("corrupt_block", _corrupt_block, False, ("--verify-blocks",)),
    ("refcount", _refcount, True, ()),
    ("nlink", _nlink, True, ()),
    ("dangling_entry", _dangling_entry, True, ()),
    ("orphan", _orphan, True, ()),
    ("quota", _quota, True, ()),
    ("unreachable", _unreachable, False, ()),
], ids=lambda v: v if isinstance(v, str) else None)
def test_fsck_finds_and_repairs_one_fault(world, fault, break_it, repairable, flags):
    dep, db, bstore, m = world
    assert fsck(dep, "--verify-blocks")[0] == 0
    break_it(db, bstore, m)
    code, out = fsck(dep, *flags)
    assert code == 1, out
    assert _says(fault, out), out
    code, out = fsck(dep, "--repair", *flags)
    assert code == 1 and "repaired" in out, out
    code, out = fsck(dep, *flags)
    assert (code == 0) == repairable, out


def _says(fault: str, out: str) -> bool:
    """The plain words fsck uses for each fault."""
    return {"missing_block": "missing from the store", "corrupt_block": "corrupt",
            "refcount": "reference(s)", "nlink": "link count", "dangling_entry": "does not exist",
            "orphan": "left behind", "quota": "bytes by the count",
            "unreachable": "cannot be reached"}[fault] in out


def test_a_version_with_a_lost_block_reads_eio_after_repair(world):
    """Never other bytes, never a shorter file: the damaged version is EIO and listed."""
    dep, db, bstore, m = world
    data = read_file(m.p("c"))
    _missing_block(db, bstore, m)
    code, out = fsck(dep, "--repair")
    assert code == 1 and "marked damaged" in out, out
    m.remount(drop_cache=True)
    with pytest.raises(OSError) as e:
        read_file(m.p("d", "a"))
    assert e.value.errno == errno.EIO
    assert read_file(m.p("c")) == data           # the rest of the volume reads
    code, out = fsck(dep)
    assert code == 1 and "is marked damaged" in out, out
    os.unlink(m.p("d", "a"))                     # gone with its last link: sound again
    os.unlink(m.p("d", "b"))
    assert fsck(dep)[0] == 0


def test_fsck_counts_a_large_database_in_one_snapshot(world, monkeypatch):
    """fsck reads every table in one transaction and counts in Python between its
    statements: on a large database that takes longer than the server's limit on a
    transaction idle between statements (10 s), which must not end fsck's snapshot."""
    from nimbusfs.server import db as db_module
    from nimbusfs.server import fsck as fsck_module

    dep, db, bstore, m = world
    ino = os.stat(m.p("c")).st_ino
    key = block_of(db, ino)
    sql(db, "INSERT INTO versions (inode, version, size, extents) SELECT %s, 1000 + g, 10, %s"
            " FROM generate_series(1, 100000) g", ino, msgpack.packb([[key, 10]]))
    # The same limit, scaled down with the database: counting 100,000 versions takes longer.
    monkeypatch.setattr(db_module, "IDLE_IN_TRANSACTION_MS", 20)
    small = Database(dep.dsn, pool_size=1, outage_timeout=5)
    small.open()
    try:
        faults = fsck_module.check(small, bstore)
    finally:
        small.close()
    assert [f.kind for f in faults] == ["refcount"], faults
    assert "versions hold 100001" in faults[0].message
