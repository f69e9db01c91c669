"""Real programs in the mount must not notice it is not a local disk."""

from __future__ import annotations

import filecmp
import glob
import os
import sqlite3
import stat
import subprocess
import sys

import pytest

GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t",
       "-c", "init.defaultBranch=main"]


def sh(*cmd: str, cwd: str | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def test_git_workflow_and_clone(mount_factory, world_tmp):
    m = mount_factory("local")
    repo = m.p("repo")
    os.mkdir(repo)
    sh(*GIT, "init", "-q", cwd=repo)
    for i in range(30):
        with open(os.path.join(repo, f"f{i}.txt"), "w") as f:
            f.write(f"line {i}\n" * (i + 1))
    sh(*GIT, "add", ".", cwd=repo)
    sh(*GIT, "commit", "-qm", "one", cwd=repo)
    sh(*GIT, "checkout", "-qb", "feature", cwd=repo)
    with open(os.path.join(repo, "f1.txt"), "a") as f:
        f.write("feature\n")
    sh(*GIT, "commit", "-qam", "two", cwd=repo)
    sh(*GIT, "checkout", "-q", "main", cwd=repo)
    with open(os.path.join(repo, "f2.txt"), "a") as f:
        f.write("main\n")
    sh(*GIT, "commit", "-qam", "three", cwd=repo)
    sh(*GIT, "merge", "-q", "--no-edit", "feature", cwd=repo)
    sh(*GIT, "gc", "-q", cwd=repo)
    sh(*GIT, "fsck", "--strict", cwd=repo)
    assert len(sh(*GIT, "log", "--oneline", cwd=repo).splitlines()) == 4
    # a local repository on disk cloned into the mount
    src = os.path.join(world_tmp, "src")
    sh(*GIT, "clone", "-q", repo, src)
    sh(*GIT, "clone", "-q", "--no-hardlinks", src, m.p("clone"))
    sh(*GIT, "fsck", "--strict", cwd=m.p("clone"))
    assert sh(*GIT, "rev-parse", "HEAD", cwd=m.p("clone")) == sh(*GIT, "rev-parse", "HEAD",
                                                                  cwd=repo)


@pytest.mark.parametrize(("journal", "transactions"), [("wal", 2000), ("delete", 300)])
def test_sqlite_transactions(mount_factory, journal, transactions):
    """WAL mode (shared mmap of the -shm file) and the classic rollback journal."""
    m = mount_factory("local")
    db = sqlite3.connect(m.p("app.db"))
    assert db.execute(f"PRAGMA journal_mode={journal}").fetchone() == (journal,)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    for i in range(transactions):
        with db:
            db.execute("INSERT INTO t (v) VALUES (?)", ("x" * (i % 300),))
            if i % 7 == 0:
                db.execute("DELETE FROM t WHERE id = ?", (i // 2,))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    count = db.execute("SELECT count(*) FROM t").fetchone()[0]
    db.close()
    m.remount(drop_cache=True)
    db = sqlite3.connect(m.p("app.db"))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == count
    db.close()


def _source_tarball() -> str:
    """trio's source distribution from PyPI, fetched by test.sh into the virtualenv."""
    (path,) = glob.glob(os.path.join(sys.prefix, "testdata", "trio-*.tar.gz"))
    return path


def _same_trees(a: str, b: str) -> None:
    cmp = filecmp.dircmp(a, b)
    assert not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files), \
        (cmp.left_only, cmp.right_only, cmp.diff_files)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors
    for d in cmp.common_dirs:
        _same_trees(os.path.join(a, d), os.path.join(b, d))


def test_tar_extract_and_compileall(mount_factory, world_tmp):
    m = mount_factory("local")
    tarball = _source_tarball()
    top = os.path.basename(tarball)[:-len(".tar.gz")]
    local = os.path.join(world_tmp, "local")
    os.mkdir(local)
    sh("tar", "-xzf", tarball, "-C", local)
    sh("tar", "-xzf", tarball, "-C", m.path)
    _same_trees(os.path.join(local, top), m.p(top))
    src = m.p(top, "src", "trio")
    sh(sys.executable, "-m", "compileall", "-q", src)
    assert any(n.endswith(".pyc") for n in os.listdir(os.path.join(src, "__pycache__")))


def _tree_with_links(root: str) -> None:
    os.makedirs(os.path.join(root, "d", "e"))
    for i in range(10):
        with open(os.path.join(root, "d", f"f{i}"), "wb") as f:
            f.write(os.urandom(1000 * i))
        os.chmod(os.path.join(root, "d", f"f{i}"), 0o600 + i % 2 * 0o55)
    os.symlink("f1", os.path.join(root, "d", "rel-link"))
    os.symlink("/nonexistent", os.path.join(root, "d", "dangling"))
    os.link(os.path.join(root, "d", "f2"), os.path.join(root, "d", "e", "hard"))
    # Times in the past, distinct per entry: rsync compares mtimes to the second and
    # skips setting one that already matches, which a fresh copy might by chance.
    for i, name in enumerate(sorted(os.listdir(os.path.join(root, "d")))):
        os.utime(os.path.join(root, "d", name), ns=(10**18, 10**18 + i * 10**9 + 123),
                 follow_symlinks=False)


def _attrs(root: str) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            is_dir = stat.S_ISDIR(s.st_mode)  # a directory's size is each filesystem's own
            out[os.path.relpath(p, root)] = (
                s.st_mode, None if is_dir else s.st_size, None if is_dir else s.st_mtime_ns,
                None if is_dir else s.st_nlink, os.readlink(p) if stat.S_ISLNK(s.st_mode) else None)
    return out


def test_cp_a_and_rsync(mount_factory, world_tmp):
    m = mount_factory("local")
    src = os.path.join(world_tmp, "src")
    _tree_with_links(src)
    sh("cp", "-a", src, m.p("cp"))
    assert _attrs(m.p("cp")) == _attrs(src)
    assert os.stat(m.p("cp", "d", "f2")).st_ino == os.stat(m.p("cp", "d", "e", "hard")).st_ino
    sh("rsync", "-aH", src + "/", m.p("rs") + "/")
    assert _attrs(m.p("rs")) == _attrs(src)
    back = os.path.join(world_tmp, "back")
    sh("rsync", "-aH", m.p("rs") + "/", back + "/")
    assert _attrs(back) == _attrs(src)
