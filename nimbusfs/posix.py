"""POSIX rules that the mount, the server and the HTTP API share.

They belong to no one layer: the server enforces them (names, rename flags,
what a write or a chown drops), the mount answers with them before a round
trip, and the HTTP API's names follow them.
"""

from __future__ import annotations

import errno
import stat
from typing import Any

from nimbusfs.errors import FSError

# Extended attribute namespaces the filesystem stores (POSIX ACLs are not supported).
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# Names in those namespaces it does not store: SELinux labels. A kernel with
# SELinux answers them itself for FUSE (a label from the policy's genfscon)
# and refuses to set them, so the file system never holds one that counts.
UNSUPPORTED_XATTRS = frozenset({b"security.selinux"})
# rename(2) flags, as the kernel passes them. RENAME_WHITEOUT (4), which
# overlayfs asks of its upper directory, is refused with EINVAL.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# The longest name of a directory entry, in bytes (the kernel lets FUSE pass up to 1024).
NAME_MAX = 255
# The values the server stores: mode, uid, gid and rdev in PostgreSQL integer
# columns (unsigned in the kernel: below 2**31 here), times in nanoseconds in
# bigint columns.
UINT31 = range(1 << 31)
INT64 = range(-(1 << 63), 1 << 63)


def check_setattr(changes: dict[str, int]) -> None:
    """EINVAL for a chmod/chown/utimens value the server cannot store (a uid of
    2**31 or more, a time past 2262), as the server answers: a mount checks
    before it journals one, so that no drain carries it."""
    for key, value in changes.items():
        if value not in (INT64 if key in ("atime", "mtime") else UINT31):
            raise FSError(errno.EINVAL, f"{key} {value} out of the file system's range")


def xattr_supported(name: bytes) -> bool:
    """Whether the file system stores extended attributes of this name.

    The others are EOPNOTSUPP for get, set and remove, as Linux answers for a
    namespace a file system has no handler for (``system.posix_acl_access``
    on a file system without ACLs), not ENODATA: tools take EOPNOTSUPP as "not
    supported on this device" and stop asking (GNU ls -l asks for
    ``security.selinux`` and ``system.posix_acl_access`` of every entry until
    one says so).
    """
    return name.startswith(XATTR_NAMESPACES) and name not in UNSUPPORTED_XATTRS


def dropped_privileges(mode: int) -> int:
    """The mode bits an unprivileged write or a chown clears, as Linux does.

    Set-user-ID, and set-group-ID when the file is group-executable (without
    that bit, set-group-ID marks mandatory locking, which stays).
    """
    return stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)


def changing(attr: dict[str, Any], changes: dict[str, int]) -> dict[str, int]:
    """The chmod/chown/utimens ``changes`` that change the inode of ``attr``.

    A mode, uid or gid it has already is dropped, unless a chown of it would
    clear set-user-ID/set-group-ID (``setattr_mode``); times are kept. A
    write-back mount journals only what is left: ``tar x`` as root chowns
    and chmods every directory it made to what it already is.
    """
    chown = ("uid" in changes or "gid" in changes) and (
        setattr_mode(attr["mode"], None, True) != attr["mode"])
    return {k: v for k, v in changes.items()
            if chown or (stat.S_IMODE(v) != stat.S_IMODE(attr["mode"]) if k == "mode"
                         else k not in ("uid", "gid") or v != attr[k])}


def merge_setattrs(first: dict[str, int], then: dict[str, int]) -> dict[str, int] | None:
    """The one setattr whose changes do what ``first`` then ``then`` do; None if none.

    Later values win, and a later mode replaces whatever an earlier chown left
    (``setattr_mode``). The one case without such a setattr: ``then`` chowns
    without a mode after ``first`` set one with set-user-ID or set-group-ID
    bits the chown would clear (of a file; the inode's type is not known
    here): merged, the mode given would keep them.
    """
    if (("uid" in then or "gid" in then) and "mode" not in then and "mode" in first
            and dropped_privileges(first["mode"]) & first["mode"]):
        return None
    return {**first, **then}


def setattr_mode(mode: int, new: int | None, chown: bool) -> int:
    """The mode after a setattr: ``new`` if given, else what a ``chown`` leaves.

    A chown of anything but a directory drops set-user-ID (and set-group-ID
    when group-executable), as Linux does. The server applies it; a
    write-back mount shows its journalled setattrs with it.
    """
    if new is not None:
        return stat.S_IFMT(mode) | stat.S_IMODE(new)
    if chown and not stat.S_ISDIR(mode):
        return mode & ~dropped_privileges(mode)
    return mode
