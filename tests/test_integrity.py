"""Data integrity when local disks fill up and commits fail: nothing lost or altered silently.

Full disks are real: a small tmpfs mounted at the mount's cache directory
(staging and disk cache) or at a metaserver's local block store. A commit
fails for real too: a user's quota (EDQUOT), or a metaserver stopped with
SIGSTOP while a flush waits for it.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator

import blake3
import pytest

from conftest import read_file, start_metaserver, status, version_sizes, write_file
from nimbusfs.retry import wait_until


def pattern(seed: bytes, size: int) -> bytes:
    """Deterministic incompressible bytes (BLAKE3 in XOF mode)."""
    return blake3.blake3(seed).digest(length=size)


@pytest.fixture
def tmpfs(world_tmp: str) -> Iterator[Callable[[int], str]]:
    """Make tmpfs file systems of a given size; unmounted after the test's mounts stop.

    Request it before ``mount_factory``, so that it is torn down after it.
    """
    made: list[str] = []

    def make(size: int) -> str:
        d = os.path.join(world_tmp, f"tmpfs{len(made)}")
        os.makedirs(d)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], check=True)
        made.append(d)
        return d

    yield make
    for d in made:
        subprocess.run(["umount", d], check=False)
        if os.path.ismount(d):
            subprocess.run(["umount", "-l", d], check=False)


def fill(directory: str) -> None:
    """Fill the file system holding ``directory`` to the last byte."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        while True:
            try:
                if not f.write(bytes(64 << 10)):
                    return
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return


def test_full_staging_disk_stores_all_bytes_or_fails_with_enospc(tmpfs, mount_factory):
    """A write the staging disk cannot take whole stores a prefix and says so; none is zeros.

    The file written 1 MiB at a time while another file's staged bytes fill
    the disk was committed with a megabyte of zeros, every call successful.
    """
    cache = tmpfs(8 << 20)
    m = mount_factory("local", None, None, "--cache-dir", cache)
    m.cache_dir = cache
    big = pattern(b"b", 15 << 19)   # 7.5 MiB staged: nearly all of the disk
    b = os.open(m.p("b"), os.O_WRONLY | os.O_CREAT, 0o644)
    assert os.write(b, big) == len(big)
    a = os.open(m.p("a"), os.O_WRONLY | os.O_CREAT, 0o644)
    written = bytearray()
    failure = None
    for i in range(4):
        chunk = pattern(bytes([i]), 1 << 20)
        try:
            n = os.write(a, chunk)
        except OSError as e:
            failure = e.errno
            break
        written += chunk[:n]
    assert failure == errno.ENOSPC
    assert 0 < len(written) < 1 << 20
    assert os.fstat(a).st_size == len(written)   # no size for bytes that are nowhere
    os.close(b)                                   # b is committed: its staged bytes go
    rest = pattern(b"rest", 2 << 20)
    assert os.write(a, rest) == len(rest)
    written += rest
    os.close(a)
    m.remount()
    assert read_file(m.p("a")) == bytes(written)
    assert read_file(m.p("b")) == big


def test_full_cache_disk_does_not_fail_a_read_from_the_store(tmpfs, mount_factory):
    """A block fetched from the store is returned even when the disk cache cannot keep it."""
    cache = tmpfs(8 << 20)
    m = mount_factory("gcs", None, None, "--cache-dir", cache)
    data = pattern(b"c", 3 << 20)
    write_file(m.p("f"), data)
    m.stop()
    subprocess.run(["rm", "-rf", os.path.join(cache, "blocks")], check=True)
    fill(cache)
    m.start()
    # O_DIRECT: no readahead, whose failure the kernel would hide by asking again.
    fd = os.open(m.p("f"), os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_full_block_store_is_enospc_and_the_bytes_are_recovered(tmpfs, services,
                                                                mount_factory):
    """ENOSPC from a local block store reaches the application (it was EIO)."""
    blocks = tmpfs(4 << 20)
    dep = start_metaserver(services.emb, "fullstore", "file://" + blocks, services.env)
    try:
        m = mount_factory("local", None, dep)
        data = pattern(b"s", 6 << 20)
        with pytest.raises(OSError) as e:
            write_file(m.p("f"), data)
        assert e.value.errno == errno.ENOSPC
        wait_until(lambda: m.records("recovered.jsonl"), what="the recovery file")
        [r] = m.records("recovered.jsonl")
        assert r["name"] == "f" and r["size"] == len(data)
        assert read_file(r["path"]) == data
        m.stop()
        assert "Traceback" not in m.log()
    finally:
        dep.kill()


def test_failed_close_is_never_committed_later(mount_factory, services, world_tmp):
    """A close answered with an error: its bytes are saved aside, never committed behind it.

    The retry at the last release used to commit them once it could (here:
    space freed before a reader's close), or drop them if it failed too.
    """
    m = mount_factory("local", services.deployments["local"].new_user(quota=1 << 20))
    write_file(m.p("other"), pattern(b"o", 700_000))
    write_file(m.p("f"), b"old")
    r = os.open(m.p("f"), os.O_RDONLY)
    new = pattern(b"n", 500_000)
    w = os.open(m.p("f"), os.O_WRONLY | os.O_TRUNC)
    os.write(w, new)
    with pytest.raises(OSError) as e:
        os.close(w)
    assert e.value.errno == errno.EDQUOT
    os.unlink(m.p("other"))   # the commit would fit now
    os.close(r)
    wait_until(lambda: m.records("recovered.jsonl"), what="the recovery file")
    [rec] = m.records("recovered.jsonl")
    assert rec["name"] == "f" and read_file(rec["path"]) == new
    assert read_file(m.p("f")) == b"old"
    assert os.stat(m.p("f")).st_size == 3
    assert rec["path"] in status(m, world_tmp)


def test_reader_close_does_not_fail_for_a_writer_and_attrs_go_back(mount_factory, services):
    """A reader's close succeeds while another handle's commit fails; after the writer's
    failed close the file shows its committed size again (it showed the failed one)."""
    m = mount_factory("local", services.deployments["local"].new_user(quota=1 << 20))
    write_file(m.p("f"), b"old")
    r = os.open(m.p("f"), os.O_RDONLY)
    w = os.open(m.p("f"), os.O_RDWR)
    new = pattern(b"q", 1_500_000)
    os.pwrite(w, new, 0)
    with pytest.raises(OSError) as e:
        os.fsync(w)
    assert e.value.errno == errno.EDQUOT
    os.close(r)                                   # nothing of its own to commit
    assert os.fstat(w).st_size == len(new)        # kept for a retry
    with pytest.raises(OSError) as e:
        os.close(w)
    assert e.value.errno == errno.EDQUOT
    wait_until(lambda: m.records("recovered.jsonl"), what="the recovery file")
    wait_until(lambda: os.stat(m.p("f")).st_size == 3, what="the committed size")
    assert read_file(m.p("f")) == b"old"
    assert read_file(m.records("recovered.jsonl")[0]["path"]) == new


def test_bytes_that_cannot_be_saved_stay_staged_until_they_are(tmpfs, mount_factory,
                                                               services):
    """A failed close whose bytes cannot be saved either (the disk is full): they stay
    staged on the mount, readable, and are saved at a later last close."""
    cache = tmpfs(8 << 20)
    m = mount_factory("local", services.deployments["local"].new_user(quota=1 << 20), None,
                      "--cache-dir", cache)
    m.cache_dir = cache
    data = pattern(b"u", 2 << 20)
    w = os.open(m.p("f"), os.O_WRONLY | os.O_CREAT, 0o644)
    assert os.write(w, data) == len(data)
    fill(cache)
    with pytest.raises(OSError) as e:
        os.close(w)
    assert e.value.errno == errno.EDQUOT
    wait_until(lambda: "not saved" in m.log(), what="the failed save")
    assert read_file(m.p("f")) == data   # still staged: the last close tries again
    os.unlink(os.path.join(cache, "filler"))
    read_file(m.p("f"))
    wait_until(lambda: m.records("recovered.jsonl"), what="the recovery file")
    assert read_file(m.records("recovered.jsonl")[0]["path"]) == data
    wait_until(lambda: os.stat(m.p("f")).st_size == 0, what="the committed size")
    assert read_file(m.p("f")) == b""


def _blocked_in_fuse(tid: int) -> bool:
    """Whether a thread waits for the FUSE server's answer (its request is queued)."""
    with open(f"/proc/self/task/{tid}/wchan") as f:
        wchan = f.read()
    return "fuse" in wchan or "request_wait_answer" in wchan


def test_reads_do_not_wait_for_an_upload(services, mount_factory):
    """Staged and committed bytes are read while a flush waits for the metaserver."""
    dep = start_metaserver(services.emb, "stopped", "file://" + services.emb.path("blocks"),
                           services.env)
    stopped = False
    try:
        m = mount_factory("local", None, dep)
        committed = pattern(b"k", 2 << 20)
        write_file(m.p("f"), committed)
        w = os.open(m.p("f"), os.O_RDWR)
        staged = pattern(b"t", 1 << 20)
        os.pwrite(w, staged, 0)
        r = os.open(m.p("f"), os.O_RDONLY)
        dep.proc.send_signal(signal.SIGSTOP)
        stopped = True
        result: list = []
        sync = threading.Thread(target=lambda: result.append(os.fsync(w)))
        sync.start()
        wait_until(lambda: _blocked_in_fuse(sync.native_id), what="the fsync at the mount")
        got: list[bytes] = []

        def read() -> None:
            os.posix_fadvise(r, 0, 0, os.POSIX_FADV_DONTNEED)
            got.append(os.pread(r, 3 << 20, 0))
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(30)   # a bound on a hang: it waited for the fsync's commit
        assert not reader.is_alive(), "the read waited for the flush"
        assert got == [staged + committed[1 << 20:]]
        dep.proc.send_signal(signal.SIGCONT)
        stopped = False
        sync.join(60)
        assert result == [None]
        os.close(r)
        os.close(w)
    finally:
        if stopped:
            dep.proc.send_signal(signal.SIGCONT)
        dep.kill()


def test_leftovers_of_crashed_puts_are_removed_at_start(services, mount_factory):
    """A put that crashed left its temporary file; a mount removes it once it is old."""
    d = os.path.join(services.emb.path("blocks"), "ab")
    os.makedirs(d, exist_ok=True)
    old, young = os.path.join(d, ".tmp-crashed"), os.path.join(d, ".tmp-in-progress")
    for p in (old, young):
        write_file(p, b"partial block")
    os.utime(old, (0, 0))
    try:
        mount_factory("local")
        wait_until(lambda: not os.path.exists(old), what="the leftover removed")
        assert os.path.exists(young)   # may be a put in progress in another process
    finally:
        for p in (old, young):
            if os.path.exists(p):
                os.unlink(p)


def test_a_truncation_is_committed_by_the_handle_that_made_it(mount_factory, services):
    """ftruncate is its handle's write: its close commits it (and answers for it);
    truncate by path is committed before it returns, whoever else holds the file."""
    m = mount_factory("local", services.deployments["local"].new_user(quota=1 << 20))
    p = m.p("f")
    write_file(p, b"0123456789")
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 4)
    os.close(fd)
    assert version_sizes(m, p)[0] == 4                  # committed when close returned
    reader = os.open(p, os.O_RDONLY)
    try:
        os.truncate(p, 3)
        assert version_sizes(m, p)[0] == 3              # a reader's close would commit nothing
    finally:
        os.close(reader)
    fd = os.open(p, os.O_RDWR)
    os.ftruncate(fd, 2 << 20)                    # over the quota: the close says so
    with pytest.raises(OSError) as e:
        os.close(fd)
    assert e.value.errno == errno.EDQUOT

