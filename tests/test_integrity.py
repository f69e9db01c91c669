"""Data integrity when local disks fill up and commits fail: nothing lost or altered silently.

Full disks are real: a small tmpfs mounted at the mount's cache directory
(staging and disk cache) or at a metaserver's local block store.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator

import blake3
import pytest

from conftest import read_file, start_metaserver, write_file


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


def test_full_block_store_is_enospc(tmpfs, services, mount_factory):
    """ENOSPC from a local block store reaches the application (it was EIO)."""
    blocks = tmpfs(4 << 20)
    dep = start_metaserver(services.emb, "fullstore", "file://" + blocks, services.env)
    try:
        m = mount_factory("local", None, dep)
        data = pattern(b"s", 6 << 20)
        with pytest.raises(OSError) as e:
            write_file(m.p("f"), data)
        assert e.value.errno == errno.ENOSPC
        m.stop()
        assert "Traceback" not in m.log()
    finally:
        dep.kill()
