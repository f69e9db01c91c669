"""Data written through a mount is in the block store and the metaserver, not only in caches."""

from __future__ import annotations

import hashlib
import os

import blake3


def pattern(seed: bytes, size: int) -> bytes:
    """Deterministic incompressible bytes (BLAKE3 in XOF mode)."""
    return blake3.blake3(seed).digest(length=size)


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_survives_remount_without_cache(mnt):
    files = {
        "empty": b"",
        "one": b"1",
        "small.txt": b"hello\n" * 100,
        "dir/nested/medium.bin": pattern(b"m", 5 * 1024 * 1024 + 3),
    }
    os.makedirs(mnt.p("dir", "nested"))
    for name, data in files.items():
        with open(mnt.p(name), "wb") as f:
            f.write(data)
    want = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    mnt.remount(drop_cache=True)
    assert not any(os.scandir(os.path.join(mnt.cache_dir, "blocks")))
    assert {n: sha(mnt.p(n)) for n in files} == want
    assert os.path.isdir(mnt.p("dir", "nested"))


def test_gigabytes_file(mount_factory):
    """A 2.5 GiB file of incompressible data, written sequentially and read back by hash."""
    m = mount_factory("local")
    size = 2 * 2**30 + 2**29
    step = 8 << 20
    h = hashlib.sha256()
    with open(m.p("huge"), "wb") as f:
        for off in range(0, size, step):
            chunk = blake3.blake3(off.to_bytes(8, "little")).digest(length=step)
            h.update(chunk)
            f.write(chunk)
        os.fsync(f.fileno())
    assert os.stat(m.p("huge")).st_size == size
    m.remount(drop_cache=True)
    assert sha(m.p("huge")) == h.hexdigest()
