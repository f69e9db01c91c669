"""Write-back mode read a second time, adversarially: renames, unlinks and the close path
on real mounts (a real metaserver, PostgreSQL and FUSE), compared with what a local disk
does."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess

import pytest

from conftest import read_file, wait_until, write_file
from test_posix import RENAME_EXCHANGE, renameat2
from test_writeback import crash, drained_dir, own_server, pending, take_lease


def tree(root: str) -> dict[str, bytes | None]:
    """Every path under ``root``: a file's bytes, None for a directory."""
    out: dict[str, bytes | None] = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = None
        for n in files:
            out[os.path.relpath(os.path.join(d, n), root)] = read_file(os.path.join(d, n))
    return out


def test_rename_cycle_and_over_pending_then_exchange_with_committed(services, mount_factory):
    with own_server(services, "h_cycle") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a, {"c": b"committed"})
        dep.kill()
        write_file(a.p("a"), b"A")
        os.rename(a.p("a"), a.p("b"))
        os.rename(a.p("b"), a.p("a"))
        write_file(a.p("p"), b"P")
        os.rename(a.p("a"), a.p("p"))          # a pending file over a pending file
        assert read_file(a.p("p")) == b"A"
        renameat2(a.p("p"), a.p("c"), RENAME_EXCHANGE)   # pending <-> committed
        assert read_file(a.p("c")) == b"A"
        assert sorted(os.listdir(a.p())) == ["c", "first", "p"]
        dep.start()
        assert read_file(a.p("p")) == b"committed"   # an open of a committed file asks
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep)
        assert tree(b.p()) == {"c": b"A", "p": b"committed", "first": b"1"}
        assert a.records("conflicts.jsonl") == []


def test_rename_of_a_directory_holding_pending_files_then_unlink_inside(services,
                                                                        mount_factory):
    with own_server(services, "h_dir") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        os.mkdir(a.p("d"))
        write_file(a.p("d", "x"), b"x")
        write_file(a.p("d", "y"), b"y")
        wait_until(lambda: pending(a) == (0, 0), 30, "drain")
        write_file(a.p("d", "x"), b"x2")
        dep.kill()
        write_file(a.p("d", "new"), b"new")
        os.mkdir(a.p("e"))                    # a pending directory as target parent
        os.rename(a.p("d"), a.p("e", "d2"))
        os.unlink(a.p("e", "d2", "new"))
        os.unlink(a.p("e", "d2", "y"))
        os.rename(a.p("e", "d2", "x"), a.p("e", "x"))
        assert sorted(os.listdir(a.p())) == ["e", "first"]
        assert sorted(os.listdir(a.p("e"))) == ["d2", "x"]
        assert os.listdir(a.p("e", "d2")) == []
        dep.start()
        assert tree(a.p()) == {"e": None, "e/d2": None, "e/x": b"x2", "first": b"1"}
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep)
        assert tree(b.p()) == {"e": None, "e/d2": None, "e/x": b"x2", "first": b"1"}
        assert a.records("conflicts.jsonl") == []


def test_unlinked_open_file_written_and_closed_through_its_handle(services, mount_factory):
    with own_server(services, "h_orphan") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        write_file(a.p("committed"), b"c" * 100)
        wait_until(lambda: pending(a) == (0, 0), 30, "drain")
        for name in ("committed", "fresh"):
            fd = os.open(a.p(name), os.O_RDWR | os.O_CREAT)
            os.write(fd, b"before")
            os.unlink(a.p(name))
            assert not os.path.exists(a.p(name))
            os.write(fd, b"after" * 10_000)       # past 32 KiB: spills
            os.fsync(fd)
            os.lseek(fd, 0, 0)
            assert os.read(fd, 11) == b"beforeafter"
            assert os.fstat(fd).st_nlink == 0
            os.close(fd)
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep)
        assert tree(b.p()) == {"first": b"1"}
        assert a.records("conflicts.jsonl") == []
        rec = os.path.join(a.cache_dir, "recovered")
        assert not os.path.exists(rec) or os.listdir(rec) == []


def test_link_of_a_renamed_file(services, mount_factory):
    with own_server(services, "h_link") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "5")
        take_lease(a, {"x": b"x"})
        os.rename(a.p("x"), a.p("y"))
        os.link(a.p("y"), a.p("z"))
        write_file(a.p("n"), b"n")
        os.rename(a.p("n"), a.p("m"))
        os.link(a.p("m"), a.p("m2"))
        assert os.stat(a.p("z")).st_nlink == 2 and os.stat(a.p("m2")).st_nlink == 2
        assert sorted(os.listdir(a.p())) == ["first", "m", "m2", "y", "z"]
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep)
        assert tree(b.p()) == {"first": b"1", "y": b"x", "z": b"x", "m": b"n", "m2": b"n"}
        assert os.stat(b.p("m")).st_ino == os.stat(b.p("m2")).st_ino


def test_kill_after_renames_and_unlinks_then_replay(services, mount_factory):
    with own_server(services, "h_kill") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a, {"c": b"committed"})
        dep.kill()
        os.mkdir(a.p("d"))
        write_file(a.p("d", "f"), b"F")
        os.rename(a.p("c"), a.p("d", "c"))
        os.rename(a.p("d"), a.p("d2"))
        write_file(a.p("g"), b"G")
        os.rename(a.p("g"), a.p("d2", "c"))      # over the committed file
        os.unlink(a.p("d2", "f"))
        write_file(a.p("d2", "f"), b"F2")
        os.fsync(os.open(a.p("d2"), os.O_RDONLY))
        want = {"d2": None, "d2/c": b"G", "d2/f": b"F2", "first": b"1"}
        assert tree(a.p("d2")) == {"c": b"G", "f": b"F2"}
        crash(a)
        dep.start()
        a.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "the replay's drain")
        assert tree(a.p()) == want
        b = mount_factory("local", a.token, dep)
        assert tree(b.p()) == want
        assert a.records("conflicts.jsonl") == []


def test_a_file_grown_past_the_memory_bound_after_its_close(mount_factory):
    a = mount_factory("local", None, None, "--writeback")
    b = mount_factory("local", a.token)
    write_file(a.p("f"), b"a" * 10_000)
    with open(a.p("f"), "r+b") as f:
        f.seek(0, 2)
        f.write(b"b" * 100_000)
        f.seek(5)
        f.write(b"c")
    want = b"aaaaa" + b"c" + b"a" * 9_994 + b"b" * 100_000
    assert read_file(a.p("f")) == want
    write_file(a.p("g"), b"g" * 20_000)
    with open(a.p("g"), "r+b") as f:
        f.truncate(5)
        f.seek(40_000)
        f.write(b"z")
    wantg = b"g" * 5 + bytes(39_995) + b"z"
    assert read_file(a.p("g")) == wantg
    wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
    assert read_file(b.p("f")) == want
    assert read_file(b.p("g")) == wantg


def _compare_with_local(script: str, mnt: str, local: str) -> None:
    for d in (mnt, local):
        subprocess.run(["bash", "-euxc", script], cwd=d, check=True, capture_output=True)


def test_git_and_sqlite_on_the_mount(mount_factory, tmp_path):
    a = mount_factory("local", None, None, "--writeback")
    b = mount_factory("local", a.token)
    local = str(tmp_path / "local")
    os.mkdir(local)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", GIT_AUTHOR_DATE="2020-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2020-01-01T00:00:00Z")
    script = ("git init -q r && cd r && for i in $(seq 20); do echo $i > f$i; done && "
              "git add . && git commit -qm one && git mv f1 g1 && rm f2 && echo x >> f3 && "
              "git add -A && git commit -qm two && git gc -q && git fsck --strict && "
              "git log --format=%H")
    heads = []
    for d in (a.p(), local):
        heads.append(subprocess.run(["bash", "-euc", script], cwd=d, env=env, check=True,
                                    capture_output=True, text=True).stdout)
    assert heads[0] == heads[1]
    for mode in ("DELETE", "WAL"):
        for d in (a.p(), local):
            con = sqlite3.connect(os.path.join(d, f"db-{mode}"))
            con.execute(f"pragma journal_mode={mode}")
            con.execute("create table t(x)")
            for _ in range(50):
                with con:
                    con.execute("insert into t values (?)", (os.urandom(3000).hex(),))
            with con:
                con.execute("delete from t where rowid % 3 = 0")
            con.execute("vacuum")
            assert con.execute("pragma integrity_check").fetchone() == ("ok",)
            con.close()
    wait_until(lambda: pending(a) == (0, 0), 120, "A's drain")
    subprocess.run(["git", "fsck", "--strict"], cwd=b.p("r"), check=True, env=env)
    assert subprocess.run(["git", "log", "--format=%H"], cwd=b.p("r"), check=True, env=env,
                          capture_output=True, text=True).stdout == heads[0]
    for mode in ("DELETE", "WAL"):
        con = sqlite3.connect(b.p(f"db-{mode}"))
        assert con.execute("pragma integrity_check").fetchone() == ("ok",)
        assert con.execute("select count(*) from t").fetchone() == (34,)
        con.close()


def test_rename_to_a_name_another_mount_created_meanwhile(services, mount_factory):
    from test_writeback import twin
    with (own_server(services, "h_taken") as dep,
          twin(services, dep, "h_taken_twin") as other):
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        b = mount_factory("local", a.token, other, "--outage-timeout", "2")
        take_lease(a, {"src": b"src"})
        os.listdir(b.p())
        dep.kill()
        os.rename(a.p("src"), a.p("dst"))
        write_file(b.p("dst"), b"theirs")
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        names = sorted(os.listdir(b.p()))
        wait_until(lambda: len(os.listdir(b.p())) == 3, 30, "the copy on B")
        names = sorted(os.listdir(b.p()))
        assert read_file(b.p("dst")) == b"theirs", names
        [copy] = [n for n in names if n.startswith("dst (conflicted")]
        assert read_file(b.p(copy)) == b"src"


def test_a_file_replaced_by_a_rename_then_written_through_its_handle(mount_factory):
    """The inode a rename replaced, written and closed through a handle still open: its
    bytes go with it (no conflicted copy of a file this mount removed), as on a local
    disk."""
    a = mount_factory("local", None, None, "--writeback")
    take_lease(a, {"x": b"old"})
    with open(a.p("x"), "r+b") as f:
        f.write(b"O")
        write_file(a.p("x.tmp"), b"new")
        os.rename(a.p("x.tmp"), a.p("x"))
        f.write(b"LD")
        f.flush()
        os.fsync(f.fileno())
    wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
    b = mount_factory("local", a.token)
    assert tree(b.p()) == {"first": b"1", "x": b"new"}
    assert a.records("conflicts.jsonl") == []


def test_listings_while_renames_drain(mount_factory):
    """``ls`` while renames of committed and pending files drain shows each file once,
    at its new name, before, during and after the server's answers."""
    a = mount_factory("local", None, None, "--writeback")
    take_lease(a)
    for i in range(30):
        write_file(a.p(f"c{i}"), b"%d" % i)
    wait_until(lambda: pending(a) == (0, 0), 60, "drain")
    want = {"first"}
    for i in range(30):
        write_file(a.p(f"p{i}"), b"p%d" % i)
        os.rename(a.p(f"c{i}"), a.p(f"r{i}"))
        os.rename(a.p(f"p{i}"), a.p(f"q{i}"))
        want |= {f"r{i}", f"q{i}"}
        assert set(os.listdir(a.p())) == want | {
            f"c{j}" for j in range(i + 1, 30)}

    def drained() -> bool:
        assert sorted(os.listdir(a.p())) == sorted(want)
        return pending(a) == (0, 0)
    wait_until(drained, 60, "A's drain, listed all along")
    for i in range(30):
        assert read_file(a.p(f"r{i}")) == b"%d" % i
        assert read_file(a.p(f"q{i}")) == b"p%d" % i


def test_a_full_cache_disk_when_a_small_file_spills(mount_factory, world_tmp):
    """A file staged in memory grows past ``MEMORY_BYTES`` while the cache disk is full:
    the application gets ENOSPC (at the write, or at the close with the kernel's write
    cache), not EIO; once there is room again files close and drain."""
    a = mount_factory("local", None, None, "--writeback")
    take_lease(a)
    a.stop()
    tmp = os.path.join(world_tmp, "small")
    os.rename(a.cache_dir, tmp)
    os.mkdir(a.cache_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", a.cache_dir], check=True)
    try:
        subprocess.run(["cp", "-a", tmp + "/.", a.cache_dir], check=True)
        a.start()
        filler = os.path.join(a.cache_dir, "filler")
        f = os.open(a.p("f"), os.O_WRONLY | os.O_CREAT)
        os.write(f, b"a" * 1000)
        with open(filler, "wb", buffering=0) as fill, contextlib.suppress(OSError):
            while True:
                fill.write(bytes(4096))
        with pytest.raises(OSError) as e:
            try:
                os.write(f, b"b" * 100_000)
            finally:
                os.close(f)
        assert e.value.errno == errno.ENOSPC
        os.unlink(filler)
        # ``f`` itself is not checked: its create was to be journalled by the close
        # that failed, so the mount saves its bytes aside and removes its name, which
        # the kernel may still show for a moment (an open then fails with ENOENT).
        write_file(a.p("g"), b"c" * 50_000)
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token)
        assert read_file(b.p("g")) == b"c" * 50_000
    finally:
        a.stop()
        subprocess.run(["umount", a.cache_dir], check=False)


def test_more_name_chains_with_the_server_down_then_a_crash(services, mount_factory):
    """An exchange of a directory made here with a committed one, a directory renamed and
    its name made again, a pending file unlinked: kill -9 before any drain, and after
    the replay both mounts show what a local disk would, nothing saved aside."""
    with own_server(services, "h_chain") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        drained_dir(a, "old", "o", b"o")
        dep.kill()
        os.mkdir(a.p("new"))
        write_file(a.p("new", "n"), b"n")
        renameat2(a.p("new"), a.p("old"), RENAME_EXCHANGE)
        os.rename(a.p("new"), a.p("moved"))
        os.mkdir(a.p("new"))
        write_file(a.p("new", "again"), b"again")
        write_file(a.p("gone"), b"gone")
        os.unlink(a.p("gone"))
        os.rename(a.p("old", "n"), a.p("moved", "n"))
        want_names = {"first", "moved", "moved/o", "moved/n", "new", "new/again", "old"}
        assert {p for p in tree_names(a.p())} == want_names
        fd = os.open(a.p("new"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        crash(a)
        dep.start()
        a.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "the replay's drain")
        want = {"first": b"1", "moved": None, "moved/o": b"o", "moved/n": b"n", "new": None,
                "new/again": b"again", "old": None}
        assert tree(a.p()) == want
        b = mount_factory("local", a.token, dep)
        assert tree(b.p()) == want
        assert a.records("conflicts.jsonl") == []
        rec = os.path.join(a.cache_dir, "recovered")
        assert not os.path.exists(rec) or os.listdir(rec) == []


def tree_names(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root)
            for d, dirs, files in os.walk(root) for n in dirs + files}


SQLITE_WRITER = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("pragma journal_mode=" + sys.argv[2])
con.execute("pragma synchronous=" + sys.argv[3])
con.execute("create table if not exists t(x)")
n = 0
while True:
    con.execute("begin")
    con.execute("insert into t values (randomblob(3000))")
    con.execute("update t set x = randomblob(100) where rowid % 7 = 0")
    con.execute("commit")
    n += 1
    print(n, flush=True)
"""


# DELETE with FULL (SQLite's defaults): SQLite does not fsync the directory after the
# unlink of its journal that commits a transaction; that unlink, lost to a kill -9 of the
# mount before its group commit, would roll the last transaction back at the next open
# (3 runs in 3 before journalled operations were written at once: ``write_now``).
@pytest.mark.parametrize(("mode", "sync"), [("DELETE", "FULL"), ("DELETE", "EXTRA"),
                                            ("WAL", "FULL")])
def test_sqlite_survives_kill_of_the_mount(mount_factory, mode, sync):
    """SQLite committing transactions on the mount when the mount is killed: after the
    remount the database is intact and holds every transaction whose commit returned."""
    import sys
    a = mount_factory("local", None, None, "--writeback")
    take_lease(a)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, a.p("db"), mode, sync],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        seen = 0
        for line in proc.stdout:
            seen = int(line)
            if seen >= 40:
                break
        crash(a)
        proc.kill()
        for line in proc.stdout:
            seen = max(seen, int(line))
        proc.wait()
        a.start()
        con = sqlite3.connect(a.p("db"))
        assert con.execute("pragma integrity_check").fetchone() == ("ok",)
        count = con.execute("select count(*) from t").fetchone()[0]
        con.close()
        assert count >= seen


def test_operations_that_returned_survive_a_kill_of_the_mount(mount_factory):
    """Renames, unlinks, mkdirs, chmods and symlinks killed with the mount right after the
    last returned (within the group commit's delay, before any fsync): the remount
    replays every one of them, and another mount sees them once drained."""
    a = mount_factory("local", None, None, "--writeback")
    take_lease(a, {f"f{i}": b"%d" % i for i in range(8)})
    for i in range(8):
        os.rename(a.p(f"f{i}"), a.p(f"g{i}"))
        os.mkdir(a.p(f"d{i}"))
        os.chmod(a.p(f"d{i}"), 0o700)
        os.symlink(f"g{i}", a.p(f"s{i}"))
        if i % 2:
            os.unlink(a.p(f"g{i}"))
    crash(a)
    a.start()
    names = set(os.listdir(a.p()))
    assert not {f"f{i}" for i in range(8)} & names
    assert {f"g{i}" for i in range(0, 8, 2)} <= names
    assert not {f"g{i}" for i in range(1, 8, 2)} & names
    for i in range(8):
        assert os.stat(a.p(f"d{i}")).st_mode & 0o777 == 0o700
        assert os.readlink(a.p(f"s{i}")) == f"g{i}"
    wait_until(lambda: pending(a) == (0, 0), 30, "the drain")
    b = mount_factory("local", a.token)
    assert set(os.listdir(b.p())) == names
    assert read_file(b.p("g6")) == b"6"
