"""The VFS layer: POSIX semantics on top of the metaserver and the block cache.

It knows nothing of pyfuse3 (the adapter translates), so its logic can be
driven directly. Inode numbers here are FUSE's: the volume's root directory
is 1, every other inode keeps its server number.

State kept per mount:
- ``files``: the :class:`OpenFile` of each regular file open on this mount,
  shared by all its handles and dropped at the last release;
- ``handles``: file handle -> OpenFile; ``dirs``: directory handle -> listing.

Namespace operations go straight to the server (one transaction each) and
are visible to every mount as soon as they return. File content is
close-to-open: a close or fsync commits it before returning.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from cache import BlockCache
from fusefs.filedata import OpenFile
from metaserver.client import MetaClient
from metaserver.errors import FSError

log = logging.getLogger(__name__)

ROOT = 1


class VFS:
    def __init__(self, client: MetaClient, cache: BlockCache, staging_dir: str,
                 nursery: trio.Nursery) -> None:
        self.client = client
        self.cache = cache
        self.staging_dir = staging_dir
        self.nursery = nursery
        self.root = client.info["root"]
        self.files: dict[int, OpenFile] = {}
        self.handles: dict[int, OpenFile] = {}
        self.dirs: dict[int, list] = {}
        self.orphans: set[int] = set()
        self._fh = itertools.count(1)

    # --- helpers -----------------------------------------------------------------

    def srv(self, ino: int) -> int:
        return self.root if ino == ROOT else ino

    def _out(self, attr: dict[str, Any]) -> dict[str, Any]:
        """Server attributes as this mount sees them (FUSE inode, unflushed size)."""
        attr = dict(attr)
        if attr["ino"] == self.root:
            attr["ino"] = ROOT
        f = self.files.get(attr["ino"])
        if f is not None and f.modified:
            attr["size"], attr["mtime"] = f.size, f.mtime
        return attr

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> None:
        """Run a background task whose failure is logged, not fatal."""
        async def guarded() -> None:
            try:
                await fn(*args, **kwargs)
            except Exception as e:
                log.warning("background %s failed: %s", getattr(fn, "__name__", fn), e)
        self.nursery.start_soon(guarded)

    async def call(self, op: str, **args: Any) -> Any:
        return await self.client.call(op, **args)

    def _orphaned(self, result: dict[str, Any]) -> None:
        ino = result.get("orphan")
        if ino is None:
            return
        if ino in self.files:
            self.orphans.add(ino)   # purge after the last close
        else:
            self.spawn(self.call, "purge", ino=ino)

    # --- metadata ------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> dict[str, Any]:
        if name == b".":
            return await self.getattr(parent)
        if name == b"..":
            raise FSError(errno.ENOTSUP, "'..' lookups are answered by the kernel")
        return self._out(await self.call("lookup", parent=self.srv(parent), name=name))

    async def getattr(self, ino: int) -> dict[str, Any]:
        return self._out(await self.call("getattr", ino=self.srv(ino)))

    async def setattr(self, ino: int, size: int | None = None, **changes: int | None
                      ) -> dict[str, Any]:
        """Apply chmod/chown/utimens changes and/or a truncation."""
        if size is not None:
            f = await self._acquire(ino)
            try:
                if stat.S_ISDIR(f.attr["mode"]):
                    raise FSError(errno.EISDIR, "is a directory")
                if not stat.S_ISREG(f.attr["mode"]):
                    raise FSError(errno.EINVAL, "not a regular file")
                await f.truncate(size)
            finally:
                await self._release(f)  # commits now unless another handle keeps it open
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            return self._out(await self.call("setattr", ino=self.srv(ino), **changes))
        return await self.getattr(ino)

    async def readlink(self, ino: int) -> bytes:
        return await self.call("readlink", ino=self.srv(ino))

    async def statfs(self) -> dict[str, int]:
        return await self.call("statfs")

    # --- namespace -------------------------------------------------------------------

    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                    rdev: int = 0) -> dict[str, Any]:
        return self._out(await self.call("mknod", parent=self.srv(parent), name=name,
                                         mode=mode, uid=uid, gid=gid, rdev=rdev))

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int
                      ) -> dict[str, Any]:
        return self._out(await self.call("symlink", parent=self.srv(parent), name=name,
                                         target=target, uid=uid, gid=gid))

    async def link(self, ino: int, parent: int, name: bytes) -> dict[str, Any]:
        return self._out(await self.call("link", ino=self.srv(ino), parent=self.srv(parent),
                                         name=name))

    async def unlink(self, parent: int, name: bytes) -> None:
        self._orphaned(await self.call("unlink", parent=self.srv(parent), name=name))

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self.call("rmdir", parent=self.srv(parent), name=name)

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     flags: int) -> None:
        self._orphaned(await self.call("rename", parent=self.srv(parent), name=name,
                                       new_parent=self.srv(new_parent), new_name=new_name,
                                       flags=flags))

    # --- directories -------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        attr = await self.getattr(ino)
        if not stat.S_ISDIR(attr["mode"]):
            raise FSError(errno.ENOTDIR, "not a directory")
        fh = next(self._fh)
        self.dirs[fh] = [ino, None]
        return fh

    async def readdir(self, fh: int, start: int) -> list[tuple[bytes, dict[str, Any]]]:
        """Entries from index ``start``; the listing is read once per opendir."""
        d = self.dirs[fh]
        if d[1] is None or start == 0:
            d[1] = [(n, self._out(a)) for n, a in await self.call("readdir", ino=self.srv(d[0]))]
        return d[1][start:]

    def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    # --- files ---------------------------------------------------------------------------

    async def _acquire(self, ino: int) -> OpenFile:
        """The OpenFile of ``ino``, loaded from the server if not open yet; counts a handle."""
        f = self.files.get(ino)
        if f is None:
            r = await self.call("open", ino=self.srv(ino))
            f = self.files.get(ino)  # another task may have loaded it meanwhile
            if f is None:
                f = self.files[ino] = OpenFile(self, ino, r["attr"], r["extents"])
        f.handles += 1
        return f

    async def _release(self, f: OpenFile) -> None:
        f.handles -= 1
        if f.handles:
            return
        try:
            await f.flush()
        finally:
            if f.handles == 0 and self.files.get(f.ino) is f:
                del self.files[f.ino]
                f.close()
                if f.ino in self.orphans:
                    self.orphans.discard(f.ino)
                    await self.call("purge", ino=self.srv(f.ino))

    async def open(self, ino: int, flags: int) -> int:
        f = await self._acquire(ino)
        try:
            if not stat.S_ISREG(f.attr["mode"]):
                raise FSError(errno.EINVAL, "not a regular file")
            if flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY:
                await f.truncate(0)
        except BaseException:
            await self._release(f)
            raise
        fh = next(self._fh)
        self.handles[fh] = f
        return fh

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[int, dict[str, Any]]:
        attr = await self.mknod(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)
        return await self.open(attr["ino"], flags & ~os.O_TRUNC), attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.handles[fh].read(off, size)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.handles[fh].write(off, data)

    async def flush(self, fh: int) -> None:
        await self.handles[fh].flush()

    async def release(self, fh: int) -> None:
        await self._release(self.handles.pop(fh))

    async def flush_all(self) -> None:
        """Commit every open file (before unmount)."""
        for f in list(self.files.values()):
            await f.flush()
