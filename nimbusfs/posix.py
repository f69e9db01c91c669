"""POSIX rules that the mount, the server and the HTTP API share.

They belong to no one layer: the server enforces them (names, rename flags,
what a write or a chown drops), the mount answers with them before a round
trip, and the HTTP API's names follow them.
"""

from __future__ import annotations

import stat

# Extended attribute namespaces the filesystem stores (POSIX ACLs are not supported).
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# rename(2) flags, as the kernel passes them. RENAME_WHITEOUT (4), which
# overlayfs asks of its upper directory, is refused with EINVAL.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# The longest name of a directory entry, in bytes (the kernel lets FUSE pass up to 1024).
NAME_MAX = 255


def dropped_privileges(mode: int) -> int:
    """The mode bits an unprivileged write or a chown clears, as Linux does.

    Set-user-ID, and set-group-ID when the file is group-executable (without
    that bit, set-group-ID marks mandatory locking, which stays).
    """
    return stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
