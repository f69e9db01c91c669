"""The mount protocol's framing: msgpack messages over one TCP stream.

Each frame is a 4-byte big-endian length followed by a msgpack body.
- request:  ``[id, op, {args}]``
- response: ``[id, 0, result]`` or ``[id, errno, message]``
- push (server to mount, unrequested): ``[PUSH, kind, payload]``

Request ids let many requests be in flight on one connection; responses come
back in completion order. The first request on a connection must be
``hello`` with ``token`` and ``device`` arguments.
"""

from __future__ import annotations

import stat
import struct
from typing import Any

import msgpack
import trio

MAX_FRAME = 64 << 20
PUSH = -1
# Extended attribute namespaces the filesystem stores (POSIX ACLs are not supported).
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
# rename(2) flags, as the kernel passes them. RENAME_WHITEOUT (4), which
# overlayfs asks of its upper directory, is refused with EINVAL.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# The longest name of a directory entry, in bytes (the kernel lets FUSE pass up to 1024).
NAME_MAX = 255

_LEN = struct.Struct(">I")


def dropped_privileges(mode: int) -> int:
    """The mode bits an unprivileged write or a chown clears, as Linux does.

    Set-user-ID, and set-group-ID when the file is group-executable (without
    that bit, set-group-ID marks mandatory locking, which stays).
    """
    return stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)


def pack(msg: Any) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Reads whole frames from a trio stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                return False
            self.buf += chunk
        return True

    async def read(self) -> Any | None:
        """Return the next message, or None at end of stream."""
        if not await self._fill(4):
            return None
        (n,) = _LEN.unpack_from(self.buf)
        if n > MAX_FRAME:
            raise ValueError(f"frame of {n} bytes exceeds limit")
        if not await self._fill(4 + n):
            return None
        body = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
