"""Block store in a local directory: the embedded default.

Layout: ``ROOT/ab/abcdef...`` (hex hash, fanned out by its first byte). A block
is written to a temporary file, fsynced and renamed into place, so a crash never
leaves a partial block under its final name; the directory is fsynced after the
rename, so that a block is durable when ``put`` returns: a version committed
after it must not outlive it in a power loss (the database's own fsync may
carry the rename to disk with it, on some file systems, when the database is
on the same one; nothing else does). A ``put`` that finds the block already
there syncs its directory too: another thread may have renamed it in and not
yet synced. The 256 fan-out directories are made (and the root synced) when
the store is opened, so no ``put`` depends on another's directory creation;
a store this process cannot write is opened to read blocks only.

A put that crashes leaves its ``.tmp-*`` file: a mount removes those older
than an hour when it starts (``remove_leftovers``; a younger one may be a put
in progress in another process), in the background, as it lists every block.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from nimbusfs.blockstore.base import BlockNotFound, BlockStore


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(BlockStore):
    local = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        new = not os.path.isdir(self.root)
        try:
            # 0700: only the store's user lists the blocks (their files are 0600).
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            for i in range(256):
                os.makedirs(os.path.join(self.root, f"{i:02x}"), mode=0o700, exist_ok=True)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return  # e.g. ``nimbusfs cat`` by a user who may only read the store
        _fsync_dir(self.root)  # also after an open that crashed before syncing
        if new:
            _fsync_dir(os.path.dirname(self.root))

    def _path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.root, h[:2], h)

    def get(self, key: bytes) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BlockNotFound(key.hex()) from None

    def get_range(self, key: bytes, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise BlockNotFound(key.hex()) from None
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def put(self, key: bytes, data: bytes | memoryview) -> bool:
        path = self._path(key)
        d = os.path.dirname(path)
        if os.path.exists(path):
            _fsync_dir(d)
            return False
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _fsync_dir(d)
        return True

    def _fanout(self) -> Iterator[str]:
        """The store's fan-out directories (two hex digits), in order."""
        for sub in sorted(os.listdir(self.root)):
            d = os.path.join(self.root, sub)
            if len(sub) == 2 and os.path.isdir(d):
                yield d

    def remove_leftovers(self, grace: float) -> int:
        cutoff, removed = time.time() - grace, 0
        for d in self._fanout():
            with os.scandir(d) as entries:
                for e in entries:
                    if e.name.startswith(".tmp-"):
                        try:
                            if e.stat().st_mtime < cutoff:
                                os.unlink(e.path)
                                removed += 1
                        except FileNotFoundError:
                            pass  # its put finished (or another cleaner was first)
        return removed

    def exists(self, key: bytes) -> bool:
        return os.path.exists(self._path(key))

    def delete(self, key: bytes) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def capacity(self) -> tuple[int, int]:
        usage = shutil.disk_usage(self.root)
        return usage.total, usage.free

    def list(self) -> Iterator[bytes]:
        for d in self._fanout():
            for name in os.listdir(d):
                if not name.startswith("."):
                    yield bytes.fromhex(name)

    def objects(self) -> Iterator[tuple[bytes, int, float]]:
        """The time of a block is its file's mtime: when its ``put`` wrote it."""
        for d in self._fanout():
            with os.scandir(d) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue  # deleted since the listing
                    yield bytes.fromhex(e.name), st.st_size, st.st_mtime
