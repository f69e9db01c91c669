"""The pyfuse3 adapter: translates FUSE requests to VFS calls, nothing more.

Every handler maps :class:`FSError` to its errno (also when parallel work
raised it inside an exception group); the mount's local disk I/O raises its
OS errors as FSErrors naming the path (``nimbusfs.errors.local_io``), so
ENOSPC, EDQUOT, EROFS ... reach the application as they are. Any other
exception is a bug or an infrastructure failure: it is logged once with its
traceback and answered with EIO, so an application sees an error, never a
hung call.
"""

from __future__ import annotations

import errno
import functools
import logging
import stat
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from nimbusfs.errors import fs_error
from nimbusfs.mount.vfs import VFS

log = logging.getLogger(__name__)

# The kernel may keep attributes and entries this long. Every change is pushed
# by the server and invalidated explicitly (changes missed while disconnected
# are replayed from the mount's cursor on reconnect), so the timeout only
# bounds staleness in the cases no push covers: atime updates by other mounts
# and a change log trimmed past a long-disconnected mount's cursor.
ATTR_TIMEOUT = 300.0
BLKSIZE = 128 << 10


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Answer an FSError with its errno, anything else with EIO and a logged traceback.

    Never ENOSYS: the kernel takes it as "this filesystem does not implement
    the request" and stops sending it for the rest of the mount (an OPEN
    answered so once made every later open of the mount handle-less, a
    FLUSH or FSYNC so would make every later one succeed unsent). A server
    answers ENOSYS to an operation it does not know (older than the mount):
    that request fails with EIO, logged, and the next is sent again.
    """
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        args[0].vfs.activity.seen(trio.current_time())
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            if (fs := fs_error(e)) is not None and fs.errno == errno.ENOSYS:
                log.error("%s failed: %s (answered EIO)", fn.__name__, fs.message)
                raise pyfuse3.FUSEError(errno.EIO) from None
            if fs is not None:
                raise pyfuse3.FUSEError(fs.errno) from None
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def entry(attr: dict[str, Any]) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr["ino"]
    e.generation = 0
    e.entry_timeout = e.attr_timeout = ATTR_TIMEOUT
    e.st_mode = attr["mode"]
    e.st_nlink = attr["nlink"]
    e.st_uid = attr["uid"]
    e.st_gid = attr["gid"]
    e.st_rdev = attr["rdev"]
    e.st_size = attr["size"]
    e.st_blksize = BLKSIZE
    # st_blocks counts stored bytes: holes in sparse files cost nothing.
    stored = attr["alloc"] if stat.S_ISREG(attr["mode"]) else attr["size"]
    e.st_blocks = (stored + 511) // 512
    e.st_atime_ns = attr["atime"]
    e.st_mtime_ns = attr["mtime"]
    e.st_ctime_ns = attr["ctime"]
    return e


class Kernel:
    """The kernel's caches (see ``nimbusfs.mount.vfs.KernelCache``); calls may block."""

    def invalidate_inode(self, ino: int) -> None:
        pyfuse3.invalidate_inode(ino)

    def invalidate_attr(self, ino: int) -> None:
        pyfuse3.invalidate_inode(ino, attr_only=True)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        pyfuse3.invalidate_entry(parent, name)


class Operations(pyfuse3.Operations):
    # FUSE's export support: a file handle (name_to_handle_at, an NFS server
    # re-exporting the mount) stays valid after the kernel or the mount forgot
    # the inode; the kernel then looks up "." in it, and ".." to connect a
    # directory (``VFS.lookup``). Without it such a handle was stale (ESTALE).
    supports_dot_lookup = True

    def __init__(self, vfs: VFS) -> None:
        super().__init__()
        self.vfs = vfs

    @_errors
    async def lookup(self, parent_inode, name, ctx):
        attr = await self.vfs.lookup(parent_inode, name)
        if attr is None:  # a negative entry, cached like a positive one
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = ATTR_TIMEOUT
            return e
        return entry(attr)

    @_errors
    async def getattr(self, inode, ctx):
        return entry(await self.vfs.getattr(inode))

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        return entry(await self.vfs.setattr(
            inode, fh,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime=attr.st_atime_ns if fields.update_atime else None,
            mtime=attr.st_mtime_ns if fields.update_mtime else None))

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        await self.vfs.setxattr(inode, name, value)

    async def getxattr(self, inode, name, ctx):
        if (err := self.vfs.xattr_error(inode, name)) is not None:
            raise pyfuse3.FUSEError(err)  # the frequent answer, without the wrapper
        return await self._getxattr(inode, name)

    @_errors
    async def _getxattr(self, inode, name):
        return await self.vfs.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode, ctx):
        return sorted(await self.vfs.listxattr(inode))

    @_errors
    async def removexattr(self, inode, name, ctx):
        await self.vfs.removexattr(inode, name)

    @_errors
    async def readlink(self, inode, ctx):
        return await self.vfs.readlink(inode)

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return entry(await self.vfs.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev))

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return entry(await self.vfs.mknod(parent_inode, name, (mode & 0o7777) | 0o040000,
                                          ctx.uid, ctx.gid))

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return entry(await self.vfs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return entry(await self.vfs.link(inode, new_parent_inode, new_name))

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.vfs.unlink(parent_inode, name)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.vfs.rmdir(parent_inode, name)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors
    async def opendir(self, inode, ctx):
        return await self.vfs.opendir(inode)

    @_errors
    async def readdir(self, fh, start_id, token):
        for i, (name, attr) in enumerate(await self.vfs.readdir(fh, start_id), start_id + 1):
            if not pyfuse3.readdir_reply(token, name, entry(attr), i):
                break

    @_errors
    async def fsyncdir(self, fh, datasync):
        await self.vfs.fsyncdir()

    async def releasedir(self, fh):
        self.vfs.releasedir(fh)

    @_errors
    async def open(self, inode, flags, ctx):
        fh, keep = await self.vfs.open(inode, flags, ctx.uid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, attr = await self.vfs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh), entry(attr)

    @_errors
    async def read(self, fh, off, size):
        return await self.vfs.read(fh, off, size)

    @_errors
    async def write(self, fh, off, buf):
        return await self.vfs.write(fh, off, buf)

    @_errors
    async def flush(self, fh):
        await self.vfs.flush(fh)

    @_errors
    async def fsync(self, fh, datasync):
        await self.vfs.flush(fh, sync=True)

    @_errors
    async def release(self, fh):
        await self.vfs.release(fh)

    async def forget(self, inode_list):
        """Inodes live on the server; nothing is kept per lookup here."""

    @_errors
    async def statfs(self, ctx):
        s = await self.vfs.statfs()
        st = pyfuse3.StatvfsData()
        bsize = 4096
        st.f_bsize = st.f_frsize = bsize
        st.f_blocks = s["total"] // bsize
        st.f_bfree = st.f_bavail = s["free"] // bsize
        st.f_files = s["inodes"] + (1 << 32)
        st.f_ffree = st.f_favail = 1 << 32
        st.f_namemax = 255
        return st
