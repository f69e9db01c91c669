"""Several mounts of one volume: pushed changes, close-to-open, conflicts, versions, outages."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import struct
import subprocess
import sys

import pytest
import trio

from conftest import query, read_file, start_metaserver, write_file
from nimbusfs.mount.places import Places
from nimbusfs.retry import wait_until


@pytest.fixture
def pair(mount_factory, store):
    """Two mounts of one volume, each with its own cache: two machines."""
    a = mount_factory(store)
    b = mount_factory(store, token=a.token)
    return a, b


def test_close_to_open_every_round(pair):
    a, b = pair
    for i, size in enumerate([0, 1, 100, 70_000, 1_500_000, 3, 2_000_000, 10]):
        data = os.urandom(size)
        write_file(a.p("f"), data)                    # close on A returns: committed
        assert read_file(b.p("f")) == data, f"round {i}"
        st = os.stat(b.p("f"))
        assert st.st_size == size
        assert st.st_mtime_ns == os.stat(a.p("f")).st_mtime_ns
        write_file(b.p("f"), data[::-1])              # and the other way round
        assert read_file(a.p("f")) == data[::-1]


def test_open_adopts_new_size_without_the_push(pair, services, store):
    """An open on B reads a version committed elsewhere whole, even before any push.

    B's kernel caches the file's size (300 s) and reads no further than it.
    The new version is committed under B's own device name, so the server
    never pushes it to B: only the open can tell B's kernel the size changed
    (under load, the push for a close on A arrived after B's open and read).
    """
    from nimbusfs.blockstore import block_hash, open_store
    from nimbusfs.client import connect

    a, b = pair
    assert not os.path.exists(b.p("marker"))       # B's kernel caches the negative answer
    write_file(a.p("f"), b"old")
    write_file(a.p("marker"), b"")
    # The marker's push comes after f's: once B sees it, f's push was applied
    # too, and what B's kernel caches next stays.
    wait_until(lambda: os.path.exists(b.p("marker")), 2, "A's changes pushed to B")
    assert os.stat(b.p("f")).st_size == 3          # B's kernel caches the size
    write_file(b.p("g"), b"g")                     # a version naming B's device
    new = os.urandom(100_000)

    async def commit_as_b() -> None:
        dep = services.deployments[store]
        async with connect(dep.address, a.token, "test") as c:
            root = c.info["root"]
            g = await c.call("lookup", parent=root, name=b"g")
            device = (await c.call("versions", ino=g["ino"]))[0]["device"]
        async with connect(dep.address, a.token, device) as c:
            f = await c.call("lookup", parent=root, name=b"f")
            key = block_hash(new)
            open_store(c.info["blocks"]).put(key, new)
            await c.call("commit", ino=f["ino"], base=f["version"], extents=[[key, len(new)]],
                         size=len(new), mtime=f["mtime"] + 1)

    trio.run(commit_as_b)
    assert read_file(b.p("f")) == new


def test_new_file_attributes_travel_with_its_first_version(pair, services, store):
    """chown, chmod and utimens of a file not committed yet wait for its first version.

    ``tar x`` and ``cp -a`` set them on every file before closing it. Until
    the close, other mounts see only an empty file, so the changes go with
    the content, in the commit's transaction: the server still holds the
    create-time attributes while the writer already sees the new ones. Once
    the file has a version, a chmod goes to the server at once again.
    """
    from nimbusfs.client import connect

    a, b = pair
    dep = services.deployments[store]

    def on_server() -> dict:
        async def lookup() -> dict:
            async with connect(dep.address, a.token, "test") as c:
                return await c.call("lookup", parent=c.info["root"], name=b"f")
        return trio.run(lookup)

    fd = os.open(a.p("f"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"data")
        os.fchown(fd, 1234, 5678)
        os.fchmod(fd, 0o640)
        os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
        st = os.fstat(fd)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 1234, 5678)
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (1_000_000_000, 2_000_000_000, 4)
        srv = on_server()
        assert (srv["mode"] & 0o7777, srv["uid"], srv["size"]) == (0o600, 0, 0)
    finally:
        os.close(fd)
    srv = on_server()
    assert (srv["mode"] & 0o7777, srv["uid"], srv["gid"]) == (0o640, 1234, 5678)
    assert (srv["atime"], srv["mtime"], srv["size"]) == (1_000_000_000, 2_000_000_000, 4)
    st = os.stat(b.p("f"))
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns) == \
        (0o640, 1234, 5678, 2_000_000_000)
    assert read_file(b.p("f")) == b"data"
    os.chmod(a.p("f"), 0o644)
    assert on_server()["mode"] & 0o7777 == 0o644
    # What the writer sees stays what the server will hold: an xattr set before
    # a deferred change stays visible; set-user-ID goes to the server at once,
    # and the chown after it drops it there, as Linux does.
    fd = os.open(a.p("g"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"g")
        os.setxattr(fd, "user.k", b"v")
        os.fchmod(fd, 0o640)
        assert os.getxattr(fd, "user.k") == b"v"
        assert os.listxattr(fd) == ["user.k"]
        os.fchmod(fd, 0o4755)
        os.fchown(fd, 1234, 5678)
        assert os.fstat(fd).st_mode & 0o7777 == 0o755
    finally:
        os.close(fd)
    assert os.stat(b.p("g")).st_mode & 0o7777 == 0o755


def test_namespace_changes_visible(pair):
    a, b = pair
    os.mkdir(a.p("d"))
    write_file(a.p("d", "x"), b"x")
    assert os.listdir(b.p("d")) == ["x"]
    os.rename(a.p("d", "x"), a.p("d", "y"))
    wait_until(lambda: os.listdir(b.p("d")) == ["y"], 2, "rename on B")
    # B's kernel forgets the old name when the push arrives (milliseconds).
    wait_until(lambda: not os.path.exists(b.p("d", "x")), 2, "old name gone on B")
    os.unlink(a.p("d", "y"))
    wait_until(lambda: not os.path.exists(b.p("d", "y")), 2, "unlink on B")
    os.chmod(a.p("d"), 0o700)
    wait_until(lambda: os.stat(b.p("d")).st_mode & 0o777 == 0o700, 2, "chmod on B")


def test_cached_negative_answers_dropped_by_a_create_elsewhere(pair):
    a, b = pair
    os.mkdir(b.p("d"))                          # B knows d's (empty) listing
    assert os.listdir(b.p("d")) == []
    assert not os.path.exists(b.p("late"))     # B's kernel caches the negative answer
    assert not os.path.exists(b.p("d", "x"))   # answered from B's listing of d
    write_file(a.p("late"), b"here")
    write_file(a.p("d", "x"), b"x")
    wait_until(lambda: os.path.exists(b.p("late")), 2, "create on A visible on B")
    wait_until(lambda: os.path.exists(b.p("d", "x")), 2, "create in d on A visible on B")
    assert read_file(b.p("late")) == b"here"
    assert read_file(b.p("d", "x")) == b"x"


def test_open_handle_on_b_sees_new_version_after_reopen(pair):
    a, b = pair
    write_file(a.p("f"), b"one")
    with open(b.p("f"), "rb") as held:          # B keeps a handle open throughout
        assert held.read() == b"one"
        write_file(a.p("f"), b"two!")
        assert read_file(b.p("f")) == b"two!"         # a new open sees the new version


def test_concurrent_writers_conflicted_copy(pair):
    a, b = pair
    write_file(a.p("doc.txt"), b"base")
    fa = open(a.p("doc.txt"), "r+b")  # noqa: SIM115
    fb = open(b.p("doc.txt"), "r+b")  # noqa: SIM115
    mine, theirs = os.urandom(300_000), os.urandom(200_000)
    fa.write(mine)
    fb.write(theirs)
    fa.close()                                  # A commits first and wins
    fb.close()                                  # B's base is stale: its bytes go to a copy
    names = sorted(os.listdir(a.path))
    assert len(names) == 2
    copies = [n for n in names if n.startswith("doc (conflicted copy ") and n.endswith(".txt")]
    assert len(copies) == 1, names
    assert read_file(a.p("doc.txt")) == mine
    assert read_file(a.p(copies[0])) == theirs
    assert "conflict" in b.log()


def test_conflicted_copies_name_the_mount(mount_factory):
    """Two mounts on one machine: each one's conflicted copy names it, not just the host."""
    a = mount_factory("local", None, None, "--label", "alpha")
    b = mount_factory("local", a.token, None, "--label", "beta")
    for first, last in ((a, b), (b, a)):
        write_file(a.p("doc.txt"), b"base")
        with open(first.p("doc.txt"), "r+b") as f1, open(last.p("doc.txt"), "r+b") as f2:
            f1.write(b"first")
            f2.write(b"last")
            f1.close()                         # wins; f2's close saves a copy
    host = socket.gethostname()
    copies = sorted(n for n in os.listdir(a.path) if n != "doc.txt")
    assert [c.split(" 20")[0] for c in copies] == [f"doc (conflicted copy {host} alpha",
                                                   f"doc (conflicted copy {host} beta"]
    assert read_file(a.p(copies[0])) == b"last" and read_file(a.p(copies[1])) == b"last"


def test_deleted_elsewhere_while_written(pair):
    a, b = pair
    write_file(a.p("notes.md"), b"v1")
    with open(b.p("notes.md"), "r+b") as fb:
        fb.write(b"precious edit")
        os.unlink(a.p("notes.md"))
    wait_until(lambda: any(n.startswith("notes (conflicted copy ") for n in os.listdir(a.path)),
               2, "conflicted copy on A")
    (copy,) = os.listdir(a.path)
    assert read_file(a.p(copy)) == b"precious edit"


_libc = ctypes.CDLL(None, use_errno=True)


def _handle(path: str) -> ctypes.Array:
    """``path``'s file handle (``name_to_handle_at(2)``: a ``struct file_handle``)."""
    handle = ctypes.create_string_buffer(8 + 128)   # MAX_HANDLE_SZ bytes of handle
    struct.pack_into("I", handle, 0, 128)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(-100, path.encode(), handle, ctypes.byref(mount_id), 0):
        raise OSError(ctypes.get_errno(), "name_to_handle_at")
    return handle


def _by_handle(handle: ctypes.Array, mount_point: str, flags: int) -> int:
    """``open_by_handle_at(2)``, as an NFS server re-exporting the mount opens files: by
    inode, no name looked up."""
    mount_fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mount_fd, handle, flags)
    finally:
        os.close(mount_fd)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "open_by_handle_at")
    return fd


@pytest.mark.parametrize("mode", ["--sync", "--writeback"])
def test_a_file_opened_by_its_handle_and_deleted_elsewhere_is_kept_as_a_copy(
        mount_factory, mode):
    """A file opened by its handle (``open_by_handle_at``, no name looked up: an NFS
    re-export does this) on a mount that never saw its name, written, and deleted
    meanwhile by another mount: its bytes become a conflicted copy where it was. (The
    mount did not know the file's place, and the server, given none, took the deletion
    for the writer's own: the bytes went to the deleted inode, lost.)"""
    b = mount_factory("local", None, None, "--sync")
    os.mkdir(b.p("d"))
    write_file(b.p("d", "notes.md"), b"v1")
    a = mount_factory("local", b.token, None, mode)
    handle = _handle(a.p("d", "notes.md"))
    a.remount()   # a new mount process: it knows no name, the kernel no inode of it
    fd = _by_handle(handle, a.path, os.O_RDWR)
    try:
        os.unlink(b.p("d", "notes.md"))
        os.write(fd, b"precious edit")
    finally:
        os.close(fd)
    wait_until(lambda: os.listdir(b.p("d")) != [], 10, "the conflicted copy on B")
    (copy,) = os.listdir(b.p("d"))
    assert copy.startswith("notes (conflicted copy ")
    assert read_file(b.p("d", copy)) == b"precious edit"


@pytest.mark.parametrize("mode", ["--sync", "--writeback"])
def test_a_directory_opened_by_its_handle_on_a_new_mount_is_connected(mount_factory, mode):
    """A directory's handle still opens on a new mount process (as an NFS server that
    re-exports the mount opens it after the mount restarted, or after the kernel evicted
    the directory's dentry): the kernel connects it to the tree by looking up ``..``,
    which the mount answers (it refused it: the handle was stale)."""
    a = mount_factory("local", None, None, mode)
    os.makedirs(a.p("d", "sub"))
    write_file(a.p("d", "sub", "f"), b"x")
    handle = _handle(a.p("d", "sub"))
    a.remount()
    fd = _by_handle(handle, a.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == ["f"]
        assert os.stat("..", dir_fd=fd).st_ino == os.stat(a.p("d")).st_ino
    finally:
        os.close(fd)


def test_the_place_of_a_held_file_outlives_its_eviction():
    """``Places``, pure logic: the LRU of places forgets the oldest, except those of held
    inodes (a file open or pending here), which stay until released or set anew."""
    held = {1}
    p = Places(2, held=held.__contains__)
    p[1] = (10, b"held")
    p[2] = (10, b"free")
    p[3] = (10, b"c")
    p[4] = (10, b"d")    # 1 and 2 evicted
    assert p.place(1) == (10, b"held") and p.place(2) is None
    p[1] = (11, b"moved")      # set anew: in the LRU again, the old place gone
    p[5] = (10, b"e")
    p[6] = (10, b"f")
    assert p.place(1) == (11, b"moved")
    p.release(1)
    assert p.place(1) is None


def test_versions_restore_and_cat(mount_factory):
    m = mount_factory("local")
    contents = [os.urandom(1000 + i * 5000) for i in range(5)]
    for c in contents:
        write_file(m.p("v.bin"), c)
    env = dict(m.services.env, NIMBUSFS_TOKEN=m.token)
    base = [sys.executable, "-m", "nimbusfs.cli"]
    server = ["--server", m.deployment.address]
    out = subprocess.run([*base, "versions", m.p("v.bin"), *server], env=env, check=True,
                         capture_output=True, text=True).stdout
    # each write committed one version (O_TRUNC and the data land in one commit)
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [5, 4, 3, 2, 1]
    assert [int(r[1]) for r in rows] == [len(c) for c in reversed(contents)]
    old = subprocess.run([*base, "cat", m.p("v.bin"), "--version", "2", *server], env=env,
                         check=True, capture_output=True).stdout
    assert old == contents[1]
    subprocess.run([*base, "restore", m.p("v.bin"), "--version", "2", *server], env=env,
                   check=True, capture_output=True)
    assert read_file(m.p("v.bin")) == contents[1]
    out = subprocess.run([*base, "versions", m.p("v.bin"), *server], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.splitlines()[1].split()[0] == "6"


def test_metaserver_crash_loses_nothing(services, mount_factory):
    """SIGKILL the metaserver while two mounts write; no acknowledged write is lost or doubled."""
    dep = start_metaserver(services.emb, "crash", "file://" + services.emb.path("blocks"),
                           services.env)
    a = b = None
    try:
        a = mount_factory("local", deployment=dep)
        b = mount_factory("local", token=a.token, deployment=dep)
        written: dict[str, bytes] = {}

        async def writer(m, tag: str) -> None:
            for i in range(40):
                name = f"{tag}-{i}"
                data = os.urandom(5000 + i)
                await trio.to_thread.run_sync(write_file, m.p(name), data)
                written[name] = data     # close returned: acknowledged

        async def crasher() -> None:
            for _ in range(3):
                await trio.sleep(0.3)
                dep.kill()
                await trio.sleep(0.5)
                dep.start()

        async def main() -> None:
            async with trio.open_nursery() as n:
                n.start_soon(writer, a, "a")
                n.start_soon(writer, b, "b")
                n.start_soon(crasher)

        trio.run(main)
        assert "unreachable" in a.log() + b.log()  # the outages did hit the mounts
        assert sorted(os.listdir(a.path)) == sorted(written)
        for name, data in written.items():
            assert read_file(b.p(name)) == data
        # each file was committed exactly once: one version, not a replayed second one
        counts = query(dep.dsn, "SELECT max(version), count(*) FROM versions GROUP BY inode")
        assert all(v == 1 and c == 1 for v, c in counts)
        assert len(counts) == len(written)
    finally:
        for m in (a, b):
            if m is not None:
                m.stop()   # while the server is up, so that unmounting needs no retries
        dep.kill()


def test_version_retention(services, mount_factory):
    dep = start_metaserver(services.emb, "retention", "file://" + services.emb.path("blocks"),
                           services.env, "--keep-versions", "2", "--keep-days", "0")
    m = None
    try:
        m = mount_factory("local", None, dep)
        for i in range(5):
            write_file(m.p("f"), b"version %d" % i)
        env = dict(m.services.env, NIMBUSFS_TOKEN=m.token)
        out = subprocess.run([sys.executable, "-m", "nimbusfs.cli", "versions", m.p("f"),
                              "--server", dep.address], env=env, check=True,
                             capture_output=True, text=True).stdout
        assert [int(line.split()[0]) for line in out.splitlines()[1:]] == [5, 4]
    finally:
        if m is not None:
            m.stop()
        dep.kill()


def test_outage_fails_with_eio_after_timeout_and_is_logged_once(services, mount_factory):
    """A write fails with EIO once the outage timeout passed; the mount carries on once the
    server is back. Its log has the outage's first failed attempt and the reconnection, not
    a line per attempt (an idle mount retries every 2 s for as long as an outage lasts;
    the 3 s here make six attempts)."""
    dep = start_metaserver(services.emb, "outage", "file://" + services.emb.path("blocks"),
                           services.env)
    m = None
    try:
        m = mount_factory("local", None, dep, "--outage-timeout", "3")
        write_file(m.p("before"), b"ok")
        dep.kill()
        with pytest.raises(OSError) as e:
            write_file(m.p("during"), b"x")
        assert e.value.errno == errno.EIO
        dep.start()
        write_file(m.p("after"), b"ok again")   # the mount carries on once the server is back
        assert read_file(m.p("after")) == b"ok again"
        log = m.log()
        assert len(re.findall(r"metaserver \S+ unreachable", log)) == 1, log
        assert "reached again after" in log
    finally:
        if m is not None:
            m.stop()
        dep.kill()
