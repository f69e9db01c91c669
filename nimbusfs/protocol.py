"""The mount protocol's framing: msgpack messages over one TCP stream.

Each frame is a 4-byte big-endian length followed by a msgpack body.
- request:  ``[id, op, {args}]``
- response: ``[id, 0, result]`` or ``[id, errno, message]``
- push (server to mount, unrequested): ``[PUSH, kind, payload]``

Request ids let many requests be in flight on one connection; responses come
back in completion order. The first request on a connection must be
``hello`` with ``token`` and ``device`` arguments; until it is answered, a
frame may be at most ``MAX_HELLO_FRAME`` bytes.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack
import trio

# A commit of a 1 TiB file (a million extents of 40 bytes) is about 40 MB.
MAX_FRAME = 64 << 20
# A hello is a token and a device name: a peer not yet authenticated sends no more.
MAX_HELLO_FRAME = 4 << 10
PUSH = -1
# Sent in hello and answered by the server: a mismatch is refused with a clear error
# (EPROTONOSUPPORT), never half understood.
PROTOCOL_VERSION = 1
_LEN = struct.Struct(">I")


def cert_fingerprint(der: bytes) -> str:
    """A certificate's SHA-256, as the server prints it and ``--tls-fingerprint`` takes it."""
    return hashlib.sha256(der).digest().hex(":").upper()


class FrameError(ValueError):
    """A frame over its limit, or a body that is not one msgpack value."""


def pack(msg: Any) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, TypeError) as e:  # TypeError: an array or a map as a map key
        raise FrameError(f"undecodable frame: {e!r}") from None


class FrameReader:
    """Reads whole frames from a trio stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self, n: int, chunk: int) -> bool:
        while len(self.buf) < n:
            data = await self.stream.receive_some(chunk)
            if not data:
                return False
            self.buf += data
        return True

    async def read(self, limit: int = MAX_FRAME) -> Any | None:
        """Return the next message, or None at end of stream.

        Raise FrameError for a frame longer than ``limit`` (before receiving
        its body) or one that does not decode. No more than ``limit`` + 4
        bytes are received at a time, so a small limit also bounds the buffer.
        """
        chunk = min(1 << 20, limit + 4)
        if not await self._fill(4, chunk):
            return None
        (n,) = _LEN.unpack_from(self.buf)
        if n > limit:
            raise FrameError(f"frame of {n} bytes exceeds the limit of {limit}")
        if not await self._fill(4 + n, chunk):
            return None
        body = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        # On the event loop: msgpack holds the GIL while it decodes, so a worker
        # thread stalls the loop as long (60 MiB of zeros: 0.64 s either way).
        return _unpack(body)
