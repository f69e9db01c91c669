"""Every basic POSIX operation through a real mount, on both block stores."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from conftest import read_file, write_file


def test_create_write_read(mnt):
    write_file(mnt.p("hello.txt"), b"hello world\n")
    assert read_file(mnt.p("hello.txt")) == b"hello world\n"
    st = os.stat(mnt.p("hello.txt"))
    assert st.st_size == 12
    assert stat.S_ISREG(st.st_mode)


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 1024 * 1024 + 17])
def test_sizes_round_trip(mnt, size):
    data = os.urandom(size)
    write_file(mnt.p("f"), data)
    assert os.stat(mnt.p("f")).st_size == size
    assert read_file(mnt.p("f")) == data


def test_write_at_any_offset(mnt):
    base = os.urandom(2 * 1024 * 1024)
    write_file(mnt.p("f"), base)
    model = bytearray(base)
    fd = os.open(mnt.p("f"), os.O_RDWR)
    try:
        for off, n in [(0, 10), (1_000_000, 5000), (len(base) - 3, 100), (5_000_000, 7)]:
            chunk = os.urandom(n)
            assert os.pwrite(fd, chunk, off) == n
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + n] = chunk
            # reads through the same handle see unflushed writes
            assert os.pread(fd, n, off) == chunk
    finally:
        os.close(fd)
    assert read_file(mnt.p("f")) == bytes(model)


def test_sparse_far_offset_reads_zeros(mnt):
    fd = os.open(mnt.p("sparse"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"end", 5 * 2**30)
    os.close(fd)
    assert os.stat(mnt.p("sparse")).st_size == 5 * 2**30 + 3
    fd = os.open(mnt.p("sparse"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 2**30) == bytes(4096)
        assert os.pread(fd, 10, 5 * 2**30 - 2) == b"\0\0end"
    finally:
        os.close(fd)


def test_append(mnt):
    write_file(mnt.p("log"), b"one\n")
    with open(mnt.p("log"), "ab") as f:
        f.write(b"two\n")
    assert read_file(mnt.p("log")) == b"one\ntwo\n"


def test_mkdir_list_rmdir(mnt):
    os.mkdir(mnt.p("d"))
    os.mkdir(mnt.p("d", "sub"))
    write_file(mnt.p("d", "a"), b"a")
    write_file(mnt.p("d", "b"), b"b")
    assert sorted(os.listdir(mnt.p("d"))) == ["a", "b", "sub"]
    assert stat.S_ISDIR(os.stat(mnt.p("d")).st_mode)
    assert os.stat(mnt.p("d")).st_nlink == 3  # '.', its entry, sub's '..'
    os.rmdir(mnt.p("d", "sub"))
    assert os.stat(mnt.p("d")).st_nlink == 2
    os.unlink(mnt.p("d", "a"))
    os.unlink(mnt.p("d", "b"))
    os.rmdir(mnt.p("d"))
    assert os.listdir(mnt.path) == []


def test_many_entries_listed(mnt):
    os.mkdir(mnt.p("many"))
    names = {f"file-{i:04d}" for i in range(600)}
    for n in names:
        os.close(os.open(mnt.p("many", n), os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(mnt.p("many"))) == names


def test_unlink(mnt):
    write_file(mnt.p("gone"), b"x" * 100)
    os.unlink(mnt.p("gone"))
    assert not os.path.exists(mnt.p("gone"))
    assert os.listdir(mnt.path) == []


def test_rename_and_replace(mnt):
    os.mkdir(mnt.p("d"))
    write_file(mnt.p("a"), b"A")
    write_file(mnt.p("b"), b"B")
    os.rename(mnt.p("a"), mnt.p("d", "a2"))
    assert read_file(mnt.p("d", "a2")) == b"A"
    assert not os.path.exists(mnt.p("a"))
    os.rename(mnt.p("b"), mnt.p("d", "a2"))  # over an existing file
    assert read_file(mnt.p("d", "a2")) == b"B"
    assert sorted(os.listdir(mnt.path)) == ["d"]
    os.mkdir(mnt.p("e"))
    os.rename(mnt.p("d"), mnt.p("e", "d"))   # a directory, into another one
    assert read_file(mnt.p("e", "d", "a2")) == b"B"
    assert os.stat(mnt.p("e")).st_nlink == 3


def test_truncate_down_and_up(mnt):
    data = os.urandom(3 * 1024 * 1024)
    write_file(mnt.p("t"), data)
    os.truncate(mnt.p("t"), 1_500_000)
    assert os.stat(mnt.p("t")).st_size == 1_500_000
    assert read_file(mnt.p("t")) == data[:1_500_000]
    os.truncate(mnt.p("t"), 4_000_000)
    assert read_file(mnt.p("t")) == data[:1_500_000] + bytes(2_500_000)
    os.truncate(mnt.p("t"), 0)
    assert read_file(mnt.p("t")) == b""


def test_truncate_open_handle_then_write(mnt):
    write_file(mnt.p("t"), b"0123456789")
    with open(mnt.p("t"), "r+b") as f:
        f.truncate(4)
        f.seek(6)
        f.write(b"xy")
    assert read_file(mnt.p("t")) == b"0123\0\0xy"


def test_o_trunc(mnt):
    write_file(mnt.p("t"), b"long old content")
    write_file(mnt.p("t"), b"new")
    assert read_file(mnt.p("t")) == b"new"


def test_stat_times_and_mode(mnt):
    before = time.time_ns()
    fd = os.open(mnt.p("f"), os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, b"abc")
    os.close(fd)
    st = os.stat(mnt.p("f"))
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    assert before - 2e9 <= st.st_mtime_ns <= time.time_ns() + 2e9
    assert st.st_ctime_ns >= st.st_mtime_ns - 2e9


def test_chmod(mnt):
    write_file(mnt.p("f"), b"x")
    os.chmod(mnt.p("f"), 0o600)
    assert stat.S_IMODE(os.stat(mnt.p("f")).st_mode) == 0o600
    os.mkdir(mnt.p("d"), 0o755)
    os.chmod(mnt.p("d"), 0o700)
    st = os.stat(mnt.p("d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700


def test_utimens(mnt):
    write_file(mnt.p("f"), b"x")
    os.utime(mnt.p("f"), ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(mnt.p("f"))
    assert st.st_atime_ns == 1_000_000_000_123
    assert st.st_mtime_ns == 2_000_000_000_456


def test_write_updates_mtime(mnt):
    write_file(mnt.p("f"), b"x")
    os.utime(mnt.p("f"), ns=(10**18, 10**18))
    with open(mnt.p("f"), "ab") as f:
        f.write(b"y")
    assert os.stat(mnt.p("f")).st_mtime_ns != 10**18


def test_statfs(mnt):
    st = os.statvfs(mnt.path)
    assert st.f_namemax == 255
    assert st.f_blocks > 0 and st.f_bavail <= st.f_blocks
    if mnt.store == "local":  # the local store's disk: the same figures as its directory
        disk = os.statvfs(mnt.deployment.blocks.removeprefix("file://"))
        assert st.f_blocks * st.f_frsize == disk.f_blocks * disk.f_frsize


def test_symlink_and_hardlink(mnt):
    write_file(mnt.p("target"), b"data")
    os.symlink("target", mnt.p("sl"))
    assert os.readlink(mnt.p("sl")) == "target"
    assert read_file(mnt.p("sl")) == b"data"
    os.link(mnt.p("target"), mnt.p("hl"))
    assert os.stat(mnt.p("target")).st_nlink == 2
    os.unlink(mnt.p("target"))
    assert read_file(mnt.p("hl")) == b"data"
    assert os.stat(mnt.p("hl")).st_nlink == 1


def test_open_unlinked_file_stays_usable(mnt):
    write_file(mnt.p("f"), b"before")
    fd = os.open(mnt.p("f"), os.O_RDWR)
    try:
        os.unlink(mnt.p("f"))
        assert os.pread(fd, 6, 0) == b"before"
        os.pwrite(fd, b"after!", 0)
        assert os.pread(fd, 6, 0) == b"after!"
    finally:
        os.close(fd)
    assert not os.path.exists(mnt.p("f"))


def test_errors(mnt):
    def err(fn, *a) -> int:
        with pytest.raises(OSError) as e:
            fn(*a)
        return e.value.errno

    write_file(mnt.p("file"), b"x")
    os.mkdir(mnt.p("dir"))
    write_file(mnt.p("dir", "inner"), b"y")
    assert err(os.stat, mnt.p("missing")) == errno.ENOENT
    assert err(open, mnt.p("missing", "x")) == errno.ENOENT
    assert err(os.mkdir, mnt.p("dir")) == errno.EEXIST
    assert err(os.open, mnt.p("file"), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert err(os.stat, mnt.p("file", "x")) == errno.ENOTDIR
    assert err(os.listdir, mnt.p("file")) == errno.ENOTDIR
    assert err(open, mnt.p("dir"), "wb") == errno.EISDIR
    assert err(os.unlink, mnt.p("dir")) == errno.EISDIR
    assert err(os.rmdir, mnt.p("dir")) == errno.ENOTEMPTY
    assert err(os.rmdir, mnt.p("file")) == errno.ENOTDIR
    assert err(os.rename, mnt.p("dir"), mnt.p("file")) == errno.ENOTDIR
    assert err(os.rename, mnt.p("file"), mnt.p("dir")) == errno.EISDIR
    assert err(os.rename, mnt.p("dir"), mnt.p("dir", "sub")) == errno.EINVAL
    long = "n" * 256
    assert err(open, mnt.p(long), "wb") == errno.ENAMETOOLONG
    assert err(os.stat, mnt.p(long)) == errno.ENAMETOOLONG
    assert err(os.mkdir, mnt.p(long)) == errno.ENAMETOOLONG
    write_file(mnt.p("n" * 255), b"ok")  # exactly 255 bytes is allowed
    assert os.path.exists(mnt.p("n" * 255))


def test_quota_exceeded_is_edquot(mount_factory, services):
    m = mount_factory("local", services.deployments["local"].new_user(quota=1 << 20))
    write_file(m.p("fits"), b"x" * 500_000)
    with pytest.raises(OSError) as e:
        write_file(m.p("too-big"), os.urandom(700_000))
    assert e.value.errno == errno.EDQUOT
    assert os.statvfs(m.path).f_blocks * 4096 == 1 << 20
    assert read_file(m.p("fits")) == b"x" * 500_000


def test_fallocate_is_a_clean_eopnotsupp(mnt):
    """pyfuse3 has no fallocate: the kernel answers EOPNOTSUPP (README, known limits)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(mnt.p("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        rc = libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(4096))
        assert rc == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert os.stat(mnt.p("f")).st_size == 0
