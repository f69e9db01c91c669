"""The namespace functions driven in-process: one transaction each, on the tests' PostgreSQL.

No metaserver, no TCP and no mount: what the HTTP API does inside the
metaserver, so the rules of ``nimbusfs/server/namespace.py`` are checked
where they are kept (a mount adds its own caches in front of them).
"""

from __future__ import annotations

import errno
import stat
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import unlinked_long_ago
from nimbusfs.errors import Conflict, FSError
from nimbusfs.server import namespace as ns
from nimbusfs.server.auth import User, create_user
from nimbusfs.server.db import Database

DEVICE = "host/test/1"
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture(scope="module")
def db(services) -> Iterator[Database]:
    d = Database(services.deployments["local"].dsn, pool_size=2)
    d.open()
    yield d
    d.close()


@pytest.fixture
def user(db: Database) -> User:
    """A fresh user: an empty volume of its own."""
    return db.run(create_user, "ns" + uuid.uuid4().hex[:12])


@pytest.fixture
def call(db: Database, user: User) -> Callable[..., Any]:
    """``call(fn, **args)``: one namespace operation as ``user``, in its own transaction."""
    return lambda fn, **args: db.run(fn, user, DEVICE, **args)


def _errno(call: Callable[..., Any], fn: Callable[..., Any], **args: Any) -> int:
    """The errno of ``call(fn, **args)``, which must fail."""
    with pytest.raises(FSError) as e:
        call(fn, **args)
    return e.value.errno


def test_rename_over_a_directory_only_when_empty(call, user):
    a = call(ns.mknod, parent=user.root, name=b"a", mode=DIR, uid=0, gid=0)["ino"]
    b = call(ns.mknod, parent=user.root, name=b"b", mode=DIR, uid=0, gid=0)["ino"]
    call(ns.mknod, parent=b, name=b"inside", mode=FILE, uid=0, gid=0)
    assert _errno(call, ns.rename, parent=user.root, name=b"a", new_parent=user.root,
                  new_name=b"b") == errno.ENOTEMPTY
    call(ns.unlink, parent=b, name=b"inside")
    r = call(ns.rename, parent=user.root, name=b"a", new_parent=user.root, new_name=b"b")
    assert (r["ino"], r["replaced"]) == (a, b)
    assert call(ns.lookup, parent=user.root, name=b"b")["ino"] == a
    assert call(ns.get_attr, ino=user.root)["nlink"] == 3   # 2 + the one subdirectory left
    assert _errno(call, ns.get_attr, ino=b) == errno.ENOENT


def test_a_directory_cannot_move_into_itself(call, user):
    d = call(ns.mknod, parent=user.root, name=b"d", mode=DIR, uid=0, gid=0)["ino"]
    sub = call(ns.mknod, parent=d, name=b"sub", mode=DIR, uid=0, gid=0)["ino"]
    assert _errno(call, ns.rename, parent=user.root, name=b"d", new_parent=sub,
                  new_name=b"x") == errno.EINVAL


def test_link_counts(call, user):
    """A directory's nlink is 2 + its subdirectories; a file's, its entries; the
    last entry gone makes an orphan, kept until purged."""
    d = call(ns.mknod, parent=user.root, name=b"d", mode=DIR, uid=0, gid=0)
    assert d["nlink"] == 2 and d["dir"]["nlink"] == 3
    f = call(ns.mknod, parent=d["ino"], name=b"f", mode=FILE, uid=0, gid=0)
    assert f["nlink"] == 1 and f["dir"]["nlink"] == 2           # a file adds no link
    assert call(ns.link, ino=f["ino"], parent=user.root, name=b"g")["nlink"] == 2
    assert _errno(call, ns.link, ino=d["ino"], parent=user.root,
                  name=b"h") == errno.EPERM                       # no hard link to a directory
    assert call(ns.unlink, parent=d["ino"], name=b"f")["orphan"] is None
    assert call(ns.get_attr, ino=f["ino"])["nlink"] == 1
    assert call(ns.unlink, parent=user.root, name=b"g")["orphan"] == f["ino"]
    assert call(ns.get_attr, ino=f["ino"])["nlink"] == 0      # open handles still see it
    assert call(ns.purge, ino=f["ino"]) is True
    assert _errno(call, ns.get_attr, ino=f["ino"]) == errno.ENOENT
    call(ns.rmdir, parent=user.root, name=b"d")
    assert call(ns.get_attr, ino=user.root)["nlink"] == 2


def test_purging_a_deleted_symlink_leaves_the_used_bytes(db, call, user):
    """The used bytes count files' sizes only: a symlink's target never added to them, and
    purging a deleted symlink took its length off (fsck then found them short)."""
    f = call(ns.mknod, parent=user.root, name=b"f", mode=FILE, uid=0, gid=0)
    call(ns.commit, ino=f["ino"], base=0, extents=[[None, 5]], size=5, mtime=1)
    s = call(ns.symlink, parent=user.root, name=b"s", target=b"x" * 40, uid=0, gid=0)
    assert call(ns.unlink, parent=user.root, name=b"s")["orphan"] == s["ino"]
    assert call(ns.purge, ino=s["ino"]) is True
    assert db.run(lambda cur: cur.execute("SELECT used_bytes FROM users WHERE id = %s",
                                          (user.id,)).fetchone()[0]) == 5


def test_an_orphan_held_after_gc_found_it_left_behind_is_not_purged(db, call, user):
    """GC finds orphans left behind, then purges them in other transactions: one its
    mount held meanwhile (back after a long outage) is kept. Another user's hold does
    nothing."""
    f = call(ns.mknod, parent=user.root, name=b"f", mode=FILE, uid=0, gid=0)
    ino = f["ino"]
    assert call(ns.unlink, parent=user.root, name=b"f")["orphan"] == ino
    unlinked_long_ago(db, ino)
    assert ino in db.run(ns.left_orphans, None)
    other = db.run(create_user, "ns" + uuid.uuid4().hex[:12])
    db.run(ns.hold_orphans, other, DEVICE, [ino])
    assert ino in db.run(ns.left_orphans, None)
    call(ns.hold_orphans, inos=[ino])
    assert db.run(ns.purge_orphans, [ino]) == 0
    assert call(ns.get_attr, ino=ino)["nlink"] == 0


def test_a_commit_on_a_stale_base_changes_nothing(call, user):
    """Without a name: Conflict naming the current version. With the name the writer
    saw: the bytes become a conflicted copy beside the original, which stays."""
    f = call(ns.mknod, parent=user.root, name=b"notes.txt", mode=FILE, uid=0, gid=0)
    first = call(ns.commit, ino=f["ino"], base=0, extents=[[None, 5]], size=5, mtime=1)
    assert first["attr"]["version"] == 1
    with pytest.raises(Conflict) as e:
        call(ns.commit, ino=f["ino"], base=0, extents=[[None, 7]], size=7, mtime=2)
    assert e.value.current == 1 and e.value.errno == errno.ESTALE
    r = call(ns.commit, ino=f["ino"], base=0, extents=[[None, 9]], size=9, mtime=3,
             parent=user.root, name=b"notes.txt")
    assert r["attr"]["version"] == 1 and r["attr"]["size"] == 5
    (copy_name,) = [n for n, _ in call(ns.readdir, ino=user.root)[2:] if n != b"notes.txt"]
    assert copy_name.startswith(b"notes (conflicted copy host test ")   # HOST/LABEL/ID
    assert copy_name.endswith(b").txt")
    copy = call(ns.lookup, parent=user.root, name=copy_name)
    assert copy["ino"] == r["conflict"]["ino"] and copy["size"] == 9
    assert call(ns.get_attr, ino=f["ino"])["size"] == 5


def test_another_users_inode_is_not_there(db, call, user):
    other = db.run(create_user, "ns" + uuid.uuid4().hex[:12])
    f = call(ns.mknod, parent=user.root, name=b"mine", mode=FILE, uid=0, gid=0)["ino"]
    as_other = {"u": other, "device": DEVICE}
    for fn, args in ((ns.get_attr, {"ino": f}), (ns.open_file, {"ino": f}),
                     (ns.unlink, {"parent": user.root, "name": b"mine"}),
                     (ns.link, {"ino": f, "parent": other.root, "name": b"stolen"})):
        with pytest.raises(FSError) as e:
            db.run(fn, **as_other, **args)
        assert e.value.errno == errno.ENOENT, fn.__name__
    assert call(ns.get_attr, ino=f)["nlink"] == 1
