"""Write-back rmdir, symlink and link: journalled, answered from this mount's view at once.

Real mounts, a real metaserver and PostgreSQL (helpers of test_writeback: a
metaserver of the test's own that is killed and started again, a twin on
the same database for a second mount that can reach the server while the
first cannot).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from conftest import read_file, wait_until, write_file
from test_writeback import crash, drained_dir, own_server, pending, take_lease, twin


def _tree(m, top: str, tag: bytes) -> None:
    """A small tree at ``top``: files, nested directories, a symlink and a hard link."""
    os.makedirs(m.p(top, "a", "b"))
    os.mkdir(m.p(top, "c"))
    for d in ("", "a", "a/b", "c"):
        for i in range(3):
            write_file(m.p(top, d, f"f{i}"), tag + b"%d" % i)
    os.symlink("a/f0", m.p(top, "s"))
    os.link(m.p(top, "c", "f0"), m.p(top, "c", "l0"))


def _err(fn) -> int:
    with pytest.raises(OSError) as e:
        fn()
    return e.value.errno


def test_rm_rf_of_a_pending_tree_needs_no_server(services, mount_factory):
    """With the metaserver down, ``rm -rf`` of a tree made here (nothing drained) and of a
    drained one returns; the mount shows them gone at once (lookups, listing, the root's
    link count); a directory made again at a removed name holds what is made in it;
    after the restart another mount sees the same and nothing is refused or logged
    (every unlink, rmdir and mkdir applied, in order)."""
    with own_server(services, "wb_rmrf") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        _tree(a, "old", b"old")
        wait_until(lambda: pending(a) == (0, 0), 30, "the setup's drain")
        for _ in os.walk(a.p("old")):   # listed: this mount knows what it holds
            pass
        dep.kill()
        _tree(a, "new", b"new")
        assert pending(a)[0] > 0
        subprocess.run(["rm", "-rf", a.p("new"), a.p("old")], check=True, timeout=60)
        assert os.listdir(a.p()) == ["first"]
        assert not os.path.exists(a.p("old")) and not os.path.lexists(a.p("new"))
        assert os.stat(a.p()).st_nlink == 2
        os.makedirs(a.p("old", "again"))   # make clean, then build: the names made anew
        write_file(a.p("old", "again", "f"), b"rebuilt")
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert sorted(os.listdir(b.p())) == ["first", "old"]
        assert os.listdir(b.p("old")) == ["again"]
        assert read_file(b.p("old", "again", "f")) == b"rebuilt"
        assert os.stat(b.p()).st_nlink == 3
        assert a.records("conflicts.jsonl") == []


def test_kill_after_rm_rf_replays_each_operation_once(services, mount_factory):
    """Trees made while the server is up (part of them drained), the server killed, then
    ``rm -rf`` of them and kill -9 of the mount: the next mount replays the journal
    (the creates not drained, the unlinks and rmdirs), applies each record once (an
    operation applied twice would be refused: ENOENT, logged) and the trees are gone
    everywhere."""
    with own_server(services, "wb_rmkill") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        for n in range(4):
            _tree(a, f"t{n}", b"t%d" % n)
        dep.kill()
        subprocess.run(["rm", "-rf", *(a.p(f"t{n}") for n in range(4))], check=True,
                       timeout=60)
        assert os.listdir(a.p()) == ["first"]
        crash(a)
        dep.start()
        a.start()   # replays and drains before it answers
        assert pending(a) == (0, 0)
        assert os.listdir(a.p()) == ["first"]
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert os.listdir(b.p()) == ["first"]
        assert a.records("conflicts.jsonl") == []


def test_an_rmdir_the_server_refuses_keeps_the_directory_and_the_other_mounts_file(
        services, mount_factory):
    """A removes ``d`` (``rm -rf``: its file, then it) while its server is down; B puts a
    file in ``d`` meanwhile: A's unlink applies, its rmdir is refused (ENOTEMPTY) and
    logged; ``d`` and B's file stay, on both mounts. Nothing is dropped."""
    with (own_server(services, "wb_rmrefused") as dep,
          twin(services, dep, "wb_rmrefused_twin") as other):
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        b = mount_factory("local", a.token, other, "--outage-timeout", "2")
        take_lease(a)
        drained_dir(a, "d", "mine", b"mine")
        wait_until(lambda: os.path.exists(b.p("d", "mine")), 30, "d on B")
        dep.kill()
        subprocess.run(["rm", "-rf", a.p("d")], check=True, timeout=60)
        assert not os.path.exists(a.p("d"))
        write_file(b.p("d", "theirs"), b"theirs")
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        wait_until(lambda: os.path.isdir(a.p("d")) and os.listdir(a.p("d")) == ["theirs"],
                   30, "d back on A with B's file")
        assert read_file(a.p("d", "theirs")) == b"theirs"
        wait_until(lambda: os.listdir(b.p("d")) == ["theirs"], 30, "A's unlink on B")
        assert read_file(b.p("d", "theirs")) == b"theirs"
        log = a.records("conflicts.jsonl")
        assert [(e["refused"], e["errno"]) for e in log if "refused" in e] == [
            ("rmdir", errno.ENOTEMPTY)]


def test_symlink_and_link_need_no_server_and_reach_other_mounts(services, mount_factory):
    """With the metaserver down, a symlink and hard links (to a file created here and to
    a drained one) return and show at once: readlink, lstat, link counts, the new name's
    bytes; after a kill -9 and the restart another mount sees the same, one inode per
    linked file."""
    with own_server(services, "wb_links") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a, {"old": b"drained"})
        dep.kill()
        os.mkdir(a.p("d"))
        os.symlink("../old", a.p("d", "s"))
        os.symlink("x" * 300, a.p("long"))
        write_file(a.p("new"), b"made here")
        os.link(a.p("new"), a.p("d", "new2"))
        os.link(a.p("old"), a.p("old2"))
        os.link(a.p("d", "s"), a.p("s2"))   # a link to a symlink made here
        assert os.readlink(a.p("d", "s")) == "../old"
        assert os.readlink(a.p("long")) == "x" * 300
        assert stat.S_ISLNK(os.lstat(a.p("d", "s")).st_mode)
        assert os.lstat(a.p("long")).st_size == 300
        assert os.stat(a.p("new")).st_nlink == 2 and os.stat(a.p("old")).st_nlink == 2
        assert os.lstat(a.p("s2")).st_nlink == 2
        assert read_file(a.p("d", "new2")) == b"made here"
        assert sorted(os.listdir(a.p())) == ["d", "first", "long", "new", "old", "old2", "s2"]
        crash(a)
        dep.start()
        a.start()
        assert pending(a) == (0, 0)
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        for m in (a, b):
            assert sorted(os.listdir(m.p())) == [
                "d", "first", "long", "new", "old", "old2", "s2"]
            assert sorted(os.listdir(m.p("d"))) == ["new2", "s"]
            assert os.readlink(m.p("d", "s")) == "../old" == os.readlink(m.p("s2"))
            assert os.readlink(m.p("long")) == "x" * 300
            assert read_file(m.p("d", "s")) == b"drained"
            assert read_file(m.p("d", "new2")) == b"made here"
            assert os.stat(m.p("new")).st_ino == os.stat(m.p("d", "new2")).st_ino
            assert os.stat(m.p("old")).st_ino == os.stat(m.p("old2")).st_ino
            assert os.stat(m.p("new")).st_nlink == 2 == os.stat(m.p("old")).st_nlink
            assert os.lstat(m.p("s2")).st_nlink == 2
        assert a.records("conflicts.jsonl") == []


def test_rmdir_symlink_and_link_errors_are_answered_locally(services, mount_factory):
    """With the metaserver down, rmdir(2), symlink(2) and link(2) fail at once with the
    errno a local disk gives, from this mount's view, and journal nothing."""
    with own_server(services, "wb_rmerr") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        drained_dir(a, "full", "f", b"f")
        dep.kill()
        os.mkdir(a.p("newdir"))
        write_file(a.p("newdir", "g"), b"g")
        write_file(a.p("file"), b"file")
        before = pending(a)[0]
        assert _err(lambda: os.rmdir(a.p("nothing"))) == errno.ENOENT
        assert _err(lambda: os.rmdir(a.p("file"))) == errno.ENOTDIR
        assert _err(lambda: os.rmdir(a.p("full"))) == errno.ENOTEMPTY
        assert _err(lambda: os.rmdir(a.p("newdir"))) == errno.ENOTEMPTY
        assert _err(lambda: os.symlink("t", a.p("file"))) == errno.EEXIST
        assert _err(lambda: os.symlink("t", a.p("newdir", "g"))) == errno.EEXIST
        assert _err(lambda: os.link(a.p("file"), a.p("first"))) == errno.EEXIST
        assert _err(lambda: os.link(a.p("newdir"), a.p("l"))) == errno.EPERM
        assert _err(lambda: os.link(a.p("nothing"), a.p("l"))) == errno.ENOENT
        os.unlink(a.p("full", "f"))
        os.rmdir(a.p("full"))   # empty now, as this mount shows it
        assert _err(lambda: os.rmdir(a.p("full"))) == errno.ENOENT
        wait_until(lambda: pending(a)[0] == before + 2, 30, "the group commit")
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep)
        assert sorted(os.listdir(b.p())) == ["file", "first", "newdir"]
        assert a.records("conflicts.jsonl") == []
