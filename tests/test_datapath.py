"""The data path through a real mount: pipelined uploads, their dedup, cold reads.

Writes longer than ``PIPELINE_BYTES`` are uploaded while the file is still
being written; these tests check what the store and the server hold, on the
local block store, whose directory a test can inspect. Random reads of the
local store read ranges of blocks: the mount process's read counter shows it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import tempfile

import blake3
import pytest

from conftest import read_file
from nimbusfs.blockstore.chunking import MIN_BLOCK, chunk_fd
from nimbusfs.content.reader import SEQ_SLACK
from nimbusfs.content.writer import PIPELINE_BYTES
from nimbusfs.retry import wait_until

SIZE = 4 * PIPELINE_BYTES + 12345


def pattern(seed: bytes, size: int) -> bytes:
    return blake3.blake3(seed).digest(length=size)


def store_dir(m) -> str:
    return m.deployment.blocks.removeprefix("file://")


def stored(m) -> set[str]:
    root = store_dir(m)
    return {n for d in os.listdir(root) if len(d) == 2
            for n in os.listdir(os.path.join(root, d)) if not n.startswith(".")}


def expected_keys(data: bytes) -> list[str]:
    """The blocks a one-shot flush of ``data`` from offset 0 would cut."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        return [p.key.hex() for p in chunk_fd(f.fileno(), 0, len(data)) if p.key is not None]


def write_chunks(f, data: bytes, step: int = 1 << 20) -> None:
    for off in range(0, len(data), step):
        f.write(data[off:off + step])


def test_pipelined_blocks_are_the_flush_blocks(mount_factory):
    """Blocks uploaded while writing are exactly those of a one-shot flush, each once."""
    m = mount_factory("local")
    data = pattern(os.urandom(8), SIZE)
    want = expected_keys(data)
    before = stored(m)
    with open(m.p("a"), "wb") as f:
        write_chunks(f, data)
    assert stored(m) - before == set(want)
    with open(m.p("b"), "wb") as f:  # the same bytes again: nothing new is stored
        write_chunks(f, data)
    assert stored(m) - before == set(want)
    m.remount(drop_cache=True)
    assert read_file(m.p("a")) == data == read_file(m.p("b"))


def test_crash_before_close_commits_nothing(mount_factory):
    """A killed mount leaves the last committed version, though blocks were uploaded."""
    m = mount_factory("local")
    data = pattern(os.urandom(8), SIZE)
    first = os.path.join(store_dir(m), expected_keys(data)[0][:2], expected_keys(data)[0])
    fd = os.open(m.p("big"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for off in range(0, len(data), 1 << 20):
            os.write(fd, data[off:off + (1 << 20)])
        wait_until(lambda: os.path.exists(first), what="a pipelined upload")
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone
    subprocess.run(["fusermount3", "-u", "-z", m.path], check=True)
    m.stop()
    m.start()
    assert os.path.getsize(m.p("big")) == 0


def test_rewrites_of_pipelined_bytes(mount_factory):
    """Overwriting and truncating bytes already uploaded in the background."""
    m = mount_factory("local")
    data = bytearray(pattern(os.urandom(8), SIZE))
    fd = os.open(m.p("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for off in range(0, 3 * PIPELINE_BYTES, 1 << 20):
            os.write(fd, data[off:off + (1 << 20)])
        wait_until(lambda: set(expected_keys(bytes(data[:PIPELINE_BYTES]))[:2]) <= stored(m),
                   what="a pipelined upload")
        os.pwrite(fd, b"x" * 100, 4096)             # inside the uploaded range
        data[4096:4196] = b"x" * 100
        os.ftruncate(fd, PIPELINE_BYTES + 5)         # below the uploaded range's end
        del data[PIPELINE_BYTES + 5:]
        os.lseek(fd, 0, os.SEEK_END)
        tail = pattern(b"tail", 2 * PIPELINE_BYTES)
        for off in range(0, len(tail), 1 << 20):
            os.write(fd, tail[off:off + (1 << 20)])
        data += tail
        assert os.pread(fd, 200, 4000) == bytes(data[4000:4200])
    finally:
        os.close(fd)
    m.remount(drop_cache=True)
    assert hashlib.sha256(read_file(m.p("f"))).digest() == hashlib.sha256(data).digest()


def rchar(m) -> int:
    """Bytes the mount process has read with read system calls (files, sockets, FUSE)."""
    with open(f"/proc/{m.proc.pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_random_reads_read_ranges_of_local_blocks(mount_factory):
    """Cold 4 KiB reads at scattered offsets (some across a block boundary) read no whole
    block of the local store; a sequential read of the same file reads whole blocks."""
    m = mount_factory("local")
    data = pattern(os.urandom(8), 3 * PIPELINE_BYTES)
    with open(m.p("f"), "wb") as f:
        write_chunks(f, data)
    m.remount()
    with tempfile.TemporaryFile() as t:
        t.write(data)
        t.flush()
        cuts = [p.offset for p in chunk_fd(t.fileno(), 0, len(data))]
    n = len(cuts)
    offsets = [cuts[n * 3 // 4] - 100, cuts[n // 8] + 12345, cuts[n // 2] - 2000,
               cuts[n - 1], cuts[n // 4] + 99999]
    prev = -1
    for off in offsets:
        assert abs(off - prev) > 2 * SEQ_SLACK  # each read is random
        prev = off + 4096
    fd = os.open(m.p("f"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead either
        before = rchar(m)
        for off in offsets:
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
        assert rchar(m) - before < MIN_BLOCK   # any whole block is at least this big
    finally:
        os.close(fd)
    before = rchar(m)
    assert read_file(m.p("f")) == data
    assert rchar(m) - before >= len(data)


def staged_bytes(m) -> int:
    """Disk space held by the mount's staging files (unlinked: found through its fds)."""
    total = 0
    fds = f"/proc/{m.proc.pid}/fd"
    for n in os.listdir(fds):
        try:
            if "/staging/dirty-" in os.readlink(f"{fds}/{n}"):
                total += os.stat(f"{fds}/{n}").st_blocks * 512
        except FileNotFoundError:
            pass  # closed meanwhile
    return total


def test_uploaded_bytes_leave_the_staging_file(mount_factory):
    """Staged bytes whose blocks are stored are freed while the file is still being
    written; they read back from their blocks, and an overwrite puts them back."""
    m = mount_factory("local")
    data = bytearray(pattern(os.urandom(8), SIZE))
    fd = os.open(m.p("f"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for off in range(0, len(data), 1 << 20):
            os.write(fd, data[off:off + (1 << 20)])
        wait_until(lambda: staged_bytes(m) <= len(data) - 2 * PIPELINE_BYTES,
                   what="uploaded bytes released from the staging file")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read through the mount
        assert os.pread(fd, 3 << 20, 5 << 20) == data[5 << 20:8 << 20]
        at = PIPELINE_BYTES + 7
        os.pwrite(fd, b"y" * 100, at)
        data[at:at + 100] = b"y" * 100
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 1 << 20, at - 1000) == data[at - 1000:at - 1000 + (1 << 20)]
    finally:
        os.close(fd)
    m.remount(drop_cache=True)
    assert hashlib.sha256(read_file(m.p("f"))).digest() == hashlib.sha256(data).digest()


def test_a_block_missing_at_flush_is_a_clean_eio(mount_factory):
    """A rewrite whose untouched bytes cannot be fetched fails with EIO, logged without a traceback.

    The block is fetched inside a nursery (blocks are fetched in parallel at
    flush), whose exception group used to reach the adapter as an unknown
    error: EIO too, but with a traceback in the mount log (the fixture fails
    on one).
    """
    m = mount_factory("local")
    data = pattern(os.urandom(8), 3 << 20)
    with open(m.p("f"), "wb") as f:
        f.write(data)
    m.remount(drop_cache=True)
    for key in expected_keys(data):
        os.unlink(os.path.join(store_dir(m), key[:2], key))
    fd = os.open(m.p("f"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 1 << 20)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # the close's flush fails the same way
    assert "Traceback" not in m.log()


def test_a_write_into_a_large_hole_is_flushed_without_its_zeros(mount_factory):
    """A file extended by truncate is one hole; a write into it re-chunks only itself.

    The window around the write used to be widened over the whole hole, and
    the flush wrote all of its zeros into the staging file to re-chunk them.
    """
    m = mount_factory("local")
    path = m.p("sparse")
    with open(path, "wb") as f:
        f.truncate(1 << 30)

    def written() -> int:  # bytes the mount process has written through syscalls
        with open(f"/proc/{m.proc.pid}/io") as f:
            return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])

    before = written()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 512 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert written() - before < 16 << 20
    m.remount(drop_cache=True)
    assert os.path.getsize(path) == 1 << 30
    assert os.stat(path).st_blocks * 512 < 1 << 20  # holes store nothing
    with open(path, "rb") as f:
        f.seek((512 << 20) - 4096)
        assert f.read(3 * 4096) == bytes(4096) + b"x" * 4096 + bytes(4096)


def test_a_large_rewritten_window_is_cut_as_in_one_pass(mount_factory):
    """Small writes all over a committed file: the flush cuts the one window in segments.

    Each segment is uploaded while the next is cut; the blocks must be those
    of cutting the new content in one pass, and the file must read back.
    """
    m = mount_factory("local")
    data = bytearray(pattern(os.urandom(8), SIZE))
    with open(m.p("f"), "wb") as f:
        write_chunks(f, data)
    with open(m.p("f"), "r+b") as f:
        for off in range(4096, len(data), 1 << 20):
            f.seek(off)
            f.write(b"y" * 100)
            data[off:off + 100] = b"y" * 100
    assert set(expected_keys(bytes(data))) <= stored(m)
    m.remount(drop_cache=True)
    assert read_file(m.p("f")) == data
