"""POSIX conformance by system call, run on the mount and, as a control, on local disk.

Every test takes ``root`` (a directory) and must pass on both: what the mount
does differently from the local filesystem is a bug here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys

import pytest

from conftest import read_file, write_file
from nimbusfs.retry import wait_until

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def _checked(ret: int) -> None:
    """Raise the OSError of a failed libc call."""
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(src: str, dst: str, flags: int) -> None:
    _checked(_libc.renameat2(-100, src.encode(), -100, dst.encode(), flags))


def synced_mode(path: str) -> int:
    """st_mode as the file system holds it: statx with AT_STATX_FORCE_SYNC, past
    the kernel's cached attributes (which may still be a setattr's reply)."""
    buf = ctypes.create_string_buffer(256)  # struct statx
    _checked(_libc.statx(-100, path.encode(), 0x2000, 0x2, buf))  # FORCE_SYNC, STATX_MODE
    return int.from_bytes(buf.raw[28:30], "little")  # stx_mode


@pytest.fixture(params=["nimbusfs", "nimbusfs-writeback", "localdisk"])
def root(request, mount_factory, world_tmp) -> str:
    if request.param == "nimbusfs":
        return mount_factory("local").path
    if request.param == "nimbusfs-writeback":   # the same answers from pending files
        return mount_factory("local", None, None, "--writeback").path
    d = os.path.join(world_tmp, "control")
    os.mkdir(d)
    return d


def j(root: str, *p: str) -> str:
    return os.path.join(root, *p)


def err(fn, *a, **kw) -> int:
    with pytest.raises(OSError) as e:
        fn(*a, **kw)
    return e.value.errno




def user_argv(uid: int, code: str) -> list[str]:
    """A command running Python code as an unprivileged user (for permission checks)."""
    return [sys.executable, "-c",
            f"import os, sys; os.setgid({uid}); os.setgroups([]); os.setuid({uid}); {code}"]


def as_user(uid: int, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(user_argv(uid, code), capture_output=True, text=True)


NOBODY = 65534

# --- open(2) ------------------------------------------------------------------------


def test_open_excl_trunc_and_mode(root):
    p = j(root, "f")
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"abcdef")
    os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640 & ~_umask()
    assert err(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    assert os.stat(p).st_size == 0


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_set_group_id_directory_passes_its_group_on(root):
    """What is made in a set-group-ID directory takes the directory's group (a file, a
    symlink; a subdirectory the bit too), though its creator's group is another."""
    d = j(root, "g")
    os.mkdir(d)
    os.chown(d, 0, 1234)
    os.chmod(d, 0o2775)
    with open(j(d, "f"), "wb"):
        pass
    os.mkdir(j(d, "sub"))
    os.symlink("f", j(d, "s"))
    for name in ("f", "sub", "s"):
        assert os.lstat(j(d, name)).st_gid == 1234, name
    assert os.stat(j(d, "sub")).st_mode & 0o2000
    assert not os.stat(j(d, "f")).st_mode & 0o2000


def test_open_append_two_handles_interleave(root):
    p = j(root, "log")
    a = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    for i in range(20):
        os.write(a if i % 2 else b, b"%02d;" % i)
    os.close(a)
    os.close(b)
    assert read_file(p) == b"".join(b"%02d;" % i for i in range(20))


def test_open_errors(root):
    os.mkdir(j(root, "d"))
    write_file(j(root, "f"), b"")
    assert err(os.open, j(root, "nope"), os.O_RDONLY) == errno.ENOENT
    assert err(os.open, j(root, "d"), os.O_WRONLY) == errno.EISDIR
    assert err(os.open, j(root, "f", "x"), os.O_RDONLY) == errno.ENOTDIR


# --- read(2), write(2), truncate(2) ----------------------------------------------------


def test_sparse_file_reads_zeros_and_stores_little(root):
    p = j(root, "sparse")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"tail", 1 << 30)
    os.close(fd)
    st = os.stat(p)
    assert st.st_size == (1 << 30) + 4
    assert st.st_blocks * 512 < st.st_size // 100     # the hole costs (almost) nothing
    fd = os.open(p, os.O_RDONLY)
    assert os.pread(fd, 8, 512 << 20) == bytes(8)
    assert os.pread(fd, 6, (1 << 30) - 2) == b"\0\0tail"
    os.close(fd)


def test_truncate_on_open_handle(root):
    p = j(root, "t")
    write_file(p, b"0123456789" * 1000)
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 5)
    assert os.fstat(fd).st_size == 5
    assert os.pread(fd, 100, 0) == b"01234"
    os.ftruncate(fd, 20)
    assert os.pread(fd, 100, 0) == b"01234" + bytes(15)
    os.close(fd)
    assert read_file(p) == b"01234" + bytes(15)


def test_ftruncate_changes_ctime(root):
    """ftruncate on an open handle is a setattr with the handle: ctime changes with mtime."""
    p = j(root, "f")
    write_file(p, b"0123456789")
    before = os.stat(p)
    probe = j(root, "clock")
    write_file(probe, b"")

    def clock_moved() -> bool:  # the file system's clock (coarse on ext4) is past ``before``
        os.utime(probe)
        return os.stat(probe).st_ctime_ns > before.st_ctime_ns
    wait_until(clock_moved, what="the file system's clock to move")
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 4)
        st = os.fstat(fd)
        assert st.st_size == 4
        assert st.st_mtime_ns > before.st_mtime_ns
        assert st.st_ctime_ns > before.st_ctime_ns
    finally:
        os.close(fd)
    assert os.stat(p).st_ctime_ns > before.st_ctime_ns


def test_unlinked_open_file_until_last_close(root):
    p = j(root, "f")
    write_file(p, b"data")
    fd1 = os.open(p, os.O_RDWR)
    fd2 = os.open(p, os.O_RDONLY)
    os.unlink(p)
    os.pwrite(fd1, b"more", 4)
    os.close(fd1)
    assert os.pread(fd2, 8, 0) == b"datamore"
    assert os.fstat(fd2).st_nlink == 0
    os.close(fd2)
    assert os.listdir(root) == []


# --- rename(2) and renameat2(2) ---------------------------------------------------------


def test_rename_variants(root):
    os.makedirs(j(root, "a", "b"))
    os.mkdir(j(root, "empty"))
    os.mkdir(j(root, "full"))
    write_file(j(root, "full", "x"), b"x")
    write_file(j(root, "f"), b"f")
    write_file(j(root, "g"), b"g")
    assert err(os.rename, j(root, "a"), j(root, "a", "b", "c")) == errno.EINVAL
    assert err(os.rename, j(root, "a"), j(root, "full")) == errno.ENOTEMPTY
    os.rename(j(root, "a"), j(root, "empty"))            # over an empty directory
    assert os.path.isdir(j(root, "empty", "b"))
    assert err(renameat2, j(root, "f"), j(root, "g"), RENAME_NOREPLACE) == errno.EEXIST
    renameat2(j(root, "f"), j(root, "h"), RENAME_NOREPLACE)
    renameat2(j(root, "h"), j(root, "g"), RENAME_EXCHANGE)
    assert read_file(j(root, "g")) == b"f" and read_file(j(root, "h")) == b"g"
    renameat2(j(root, "g"), j(root, "full"), RENAME_EXCHANGE)  # a file with a directory
    assert read_file(j(root, "full")) == b"f" and read_file(j(root, "g", "x")) == b"x"
    assert err(renameat2, j(root, "nope"), j(root, "g"), RENAME_EXCHANGE) == errno.ENOENT
    os.rename(j(root, "h"), j(root, "h"))                 # onto itself: no-op
    assert read_file(j(root, "h")) == b"g"


def test_rename_whiteout_is_kept_or_refused(root):
    """RENAME_WHITEOUT leaves a 0/0 character device at the source, or fails with EINVAL
    and moves nothing (the mount refuses it); it never moves the file without one."""
    write_file(j(root, "a"), b"a")
    try:
        renameat2(j(root, "a"), j(root, "b"), RENAME_WHITEOUT)
    except OSError as e:
        assert e.errno == errno.EINVAL
        assert read_file(j(root, "a")) == b"a" and not os.path.lexists(j(root, "b"))
    else:
        st = os.lstat(j(root, "a"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert read_file(j(root, "b")) == b"a"


def test_rename_hardlink_onto_itself(root):
    write_file(j(root, "a"), b"a")
    os.link(j(root, "a"), j(root, "b"))
    os.rename(j(root, "a"), j(root, "b"))                  # same inode: nothing happens
    assert sorted(os.listdir(root)) == ["a", "b"]


# --- names ------------------------------------------------------------------------------


def test_names_are_bytes(root):
    raw = os.fsencode(root)
    for name in (b"\xff\xfe", b"caf\xc3\xa9", b"tab\tnew\nline", b" lead", b"-", b"a" * 255):
        write_file(os.path.join(raw, name), name)
        assert read_file(os.path.join(raw, name)) == name
    assert set(os.listdir(raw)) == {b"\xff\xfe", b"caf\xc3\xa9", b"tab\tnew\nline", b" lead",
                                    b"-", b"a" * 255}
    assert err(write_file, os.path.join(raw, b"a" * 256), b"") == errno.ENAMETOOLONG
    assert err(os.mkdir, os.path.join(raw, b"b" * 256)) == errno.ENAMETOOLONG


def test_long_names_are_enametoolong_everywhere(root):
    """Every call naming an entry over 255 bytes fails with ENAMETOOLONG, also when the
    directory's listing is known (the mount then answers lookups without the server)."""
    write_file(j(root, "f"), b"f")
    os.mkdir(j(root, "d"))
    os.listdir(root)
    long = os.path.join(os.fsencode(root), b"n" * 256)
    f = os.fsencode(j(root, "f"))
    for call in (os.stat, os.lstat, os.unlink, os.rmdir, lambda p: os.chmod(p, 0o600),
                 lambda p: os.truncate(p, 0), lambda p: os.link(f, p),
                 lambda p: os.rename(f, p), lambda p: os.rename(p, f)):
        assert err(call, long) == errno.ENAMETOOLONG
    assert read_file(j(root, "f")) == b"f"


def test_deep_paths(root):
    p = root
    for i in range(60):
        p = j(p, f"level{i}")
        os.mkdir(p)
    write_file(j(p, "leaf"), b"deep")
    assert read_file(j(p, "leaf")) == b"deep"


# --- link(2), symlink(2), mknod(2) --------------------------------------------------------


def test_hard_links(root):
    write_file(j(root, "a"), b"shared")
    os.mkdir(j(root, "d"))
    os.link(j(root, "a"), j(root, "d", "b"))
    assert os.stat(j(root, "a")).st_nlink == 2
    assert os.stat(j(root, "a")).st_ino == os.stat(j(root, "d", "b")).st_ino
    with open(j(root, "d", "b"), "ab") as f:
        f.write(b"+")
    assert read_file(j(root, "a")) == b"shared+"
    os.unlink(j(root, "a"))
    assert read_file(j(root, "d", "b")) == b"shared+"
    assert os.stat(j(root, "d", "b")).st_nlink == 1
    assert err(os.link, j(root, "d"), j(root, "dl")) == errno.EPERM


def test_symlinks(root):
    os.symlink("target", j(root, "dangling"))
    assert os.readlink(j(root, "dangling")) == "target"
    assert err(os.stat, j(root, "dangling")) == errno.ENOENT
    assert stat.S_ISLNK(os.lstat(j(root, "dangling")).st_mode)
    assert os.lstat(j(root, "dangling")).st_size == len("target")
    write_file(j(root, "target"), b"now here")
    assert read_file(j(root, "dangling")) == b"now here"
    assert stat.S_ISREG(os.stat(j(root, "dangling")).st_mode)
    os.symlink("/" + "x" * 1000, j(root, "long"))
    assert os.readlink(j(root, "long")) == "/" + "x" * 1000


def test_fifo(root):
    os.mkfifo(j(root, "pipe"), 0o600)
    assert stat.S_ISFIFO(os.stat(j(root, "pipe")).st_mode)


# --- chmod, chown, utimensat ----------------------------------------------------------------


def test_chown_and_setuid_clearing(root):
    p = j(root, "prog")
    write_file(p, b"#!/bin/sh\n")
    os.chmod(p, 0o6755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o6755
    with open(p, "ab") as f:          # root keeps the bits (CAP_FSETID)
        f.write(b"true\n")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o6755
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert stat.S_IMODE(st.st_mode) == 0o0755      # chown drops setuid and setgid
    os.chmod(p, 0o6777)
    r = as_user(NOBODY, f"open({p!r}, 'ab').write(b'x')")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o0777  # an unprivileged write drops them


def test_mode_set_after_an_unprivileged_write_stands(root):
    """The write drops set-user-ID at once; a chmod after it, before the close, sets it again.

    The kernel drops it with a SETATTR before the write; the mount drops it
    again in the commit at the close (for a kernel that leaves it to the file
    system), which must not drop it from a mode set after the write. The mode
    is read last past the kernel's cached attributes (still the chmod's reply).
    """
    p = j(root, "prog")
    write_file(p, b"#!/bin/sh\n")
    os.chmod(p, 0o4777)
    writer = subprocess.Popen(user_argv(NOBODY, (
        f"fd = os.open({p!r}, os.O_WRONLY | os.O_APPEND); os.write(fd, b'true'); "
        f"print(oct(os.stat({p!r}).st_mode & 0o7777), flush=True); "
        "sys.stdin.readline(); os.close(fd)")),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == oct(0o777)  # dropped by the write
        os.chmod(p, 0o4777)
    finally:
        writer.communicate("\n")
    assert writer.returncode == 0
    assert stat.S_IMODE(synced_mode(p)) == 0o4777


def test_permissions_between_users(root):
    os.chmod(root, 0o777)
    p = j(root, "private")
    write_file(p, b"secret")
    os.chmod(p, 0o600)
    r = as_user(NOBODY, f"open({p!r}, 'rb')")
    assert "PermissionError" in r.stderr
    r = as_user(NOBODY, f"open({p!r}, 'ab')")
    assert "PermissionError" in r.stderr
    r = as_user(NOBODY, f"open({j(root, 'mine')!r}, 'wb').close(); "
                        f"print(os.stat({j(root, 'mine')!r}).st_uid)")
    assert r.stdout.strip() == str(NOBODY)


def test_sticky_directory(root):
    os.chmod(root, 0o1777)
    write_file(j(root, "roots"), b"")
    os.chmod(j(root, "roots"), 0o666)
    r = as_user(NOBODY, f"os.unlink({j(root, 'roots')!r})")
    assert "PermissionError" in r.stderr
    assert os.path.exists(j(root, "roots"))


def test_utimens(root):
    p = j(root, "f")
    write_file(p, b"x")
    os.utime(p, ns=(1_234_567_890_123_456_789, 987_654_321_000_000_001))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_234_567_890_123_456_789,
                                                987_654_321_000_000_001)
    before = os.stat(p).st_ctime_ns
    os.utime(p)                                        # UTIME_NOW for both
    assert os.stat(p).st_mtime_ns > 987_654_321_000_000_001
    assert os.stat(p).st_ctime_ns >= before


def test_utime_omit_and_relatime(root):
    p = j(root, "f")
    write_file(p, b"content")
    os.utime(p, ns=(10**18, 10**18))
    subprocess.run(["touch", "-m", "-d", "@2000000000", p], check=True)  # atime: UTIME_OMIT
    st = os.stat(p)
    assert st.st_atime_ns == 10**18 and st.st_mtime_ns == 2 * 10**18
    os.utime(p, ns=(10**18, 10**18))
    read_file(p)                  # atime not newer than mtime: a read updates it (relatime)
    first = os.stat(p).st_atime_ns
    assert first > 10**18
    read_file(p)                  # now newer than mtime and ctime: no update
    assert os.stat(p).st_atime_ns == first


def test_chown_needs_root(root):
    os.chmod(root, 0o777)
    r = as_user(NOBODY, f"open({j(root, 'mine')!r}, 'wb').close(); "
                        f"os.chown({j(root, 'mine')!r}, 0, 0)")
    assert "PermissionError" in r.stderr


def test_times_follow_posix(root):
    os.mkdir(j(root, "d"))
    os.utime(j(root, "d"), ns=(10**18, 10**18))
    write_file(j(root, "d", "f"), b"x")                       # a new entry changes the directory
    assert os.stat(j(root, "d")).st_mtime_ns > 10**18
    os.utime(j(root, "d", "f"), ns=(10**18, 10**18))
    c0 = os.stat(j(root, "d", "f")).st_ctime_ns
    os.chmod(j(root, "d", "f"), 0o600)                  # metadata change: ctime, not mtime
    st = os.stat(j(root, "d", "f"))
    assert st.st_mtime_ns == 10**18 and st.st_ctime_ns >= c0


def test_directory_nlink(root):
    os.mkdir(j(root, "d"))
    assert os.stat(j(root, "d")).st_nlink == 2
    for n in ("a", "b", "c"):
        os.mkdir(j(root, "d", n))
    write_file(j(root, "d", "file"), b"")
    assert os.stat(j(root, "d")).st_nlink == 5
    os.rename(j(root, "d", "a"), j(root, "a"))
    assert os.stat(j(root, "d")).st_nlink == 4


def test_readdir_has_dot_entries(root):
    os.mkdir(j(root, "d"))
    out = subprocess.run(["ls", "-a", j(root, "d")], capture_output=True, text=True).stdout
    assert out.split() == [".", ".."]


# --- extended attributes ------------------------------------------------------------------


def test_xattrs(root):
    p = j(root, "f")
    write_file(p, b"")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "trusted.level", b"3")
    os.setxattr(p, "security.label", b"l")
    assert os.getxattr(p, "user.color") == b"blue"
    assert {"user.color", "trusted.level", "security.label"} <= set(os.listxattr(p))
    assert err(os.setxattr, p, "user.color", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert err(os.setxattr, p, "user.none", b"x", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.color") == b"red"
    assert err(os.getxattr, p, "user.none") == errno.ENODATA
    os.removexattr(p, "user.color")
    assert err(os.removexattr, p, "user.color") == errno.ENODATA
    assert "user.color" not in os.listxattr(p)
    assert err(os.setxattr, p, "user.big", b"x" * 70000) == errno.E2BIG


def test_xattr_erange_on_small_buffer(root):
    p = j(root, "f")
    write_file(p, b"")
    os.setxattr(p, "user.v", b"0123456789")
    buf = ctypes.create_string_buffer(4)
    n = _libc.getxattr(p.encode(), b"user.v", buf, 4)
    assert n == -1 and ctypes.get_errno() == errno.ERANGE


# --- locks ---------------------------------------------------------------------------------


def test_locks_between_local_processes(root):
    import fcntl

    p = j(root, "lockfile")
    write_file(p, b"")
    with open(p, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        code = (f"import fcntl; f = open({p!r}, 'r+b')\n"
                "try:\n fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('got')\n"
                "except OSError: print('busy')")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.stdout.strip() == "busy"
