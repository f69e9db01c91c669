"""Blocks through the metaserver: the store of a mount that holds no store credentials.

In proxy mode (``nimbusfs server --proxy-blocks``) the server names
``PROXY_URL`` as the block store; the mount then reads and writes blocks with
the mount protocol's ``get_block``/``put_block``, and the server decides which
blocks the user may read (see ``nimbusfs/server/blocks.py``).

The store interface is synchronous and called from worker threads (see
``BlockStore``); each call hops back to the trio thread for the request.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from nimbusfs.blockstore.base import BlockNotFound, BlockStore
from nimbusfs.errors import FSError

PROXY_URL = "metaserver:"


class RemoteStore(BlockStore):
    """``call`` is the client's ``call(op, **args)``; it runs on the trio thread."""

    url = PROXY_URL

    def __init__(self, call: Callable[..., Awaitable[Any]]) -> None:
        self._call = call

    def _run(self, op: str, **args: Any) -> Any:
        return trio.from_thread.run(lambda: self._call(op, **args))

    def get(self, key: bytes) -> bytes:
        return self.get_range(key, 0, None)

    def get_range(self, key: bytes, offset: int, length: int | None) -> bytes:
        try:
            return self._run("get_block", key=key, offset=offset, length=length)
        except FSError as e:
            if e.errno == errno.ENOENT:
                raise BlockNotFound(key.hex()) from None
            raise

    def put(self, key: bytes, data: bytes | memoryview) -> bool:
        self._run("put_block", key=key, data=bytes(data))
        return True

    def exists(self, key: bytes) -> bool:
        return bool(self._run("have_blocks", keys=[key]))

    def delete(self, key: bytes) -> None:
        raise FSError(errno.EPERM, "a mount does not delete blocks")

    def list(self) -> Iterator[bytes]:
        raise FSError(errno.EPERM, "a mount does not list blocks")

    def objects(self) -> Iterator[tuple[bytes, int, float]]:
        raise FSError(errno.EPERM, "a mount does not list blocks")
