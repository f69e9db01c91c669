"""The one interface every block store backend implements.

Methods are synchronous and thread-safe: the mount and the server call them
from worker threads (``trio.to_thread``) so that a slow store never blocks the
event loop, and several calls may run at once.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import blake3

HASH_LEN = 32


def block_hash(data: bytes | memoryview) -> bytes:
    """Return the content address (32-byte BLAKE3 digest) of a block."""
    return blake3.blake3(data).digest()


class BlockNotFound(KeyError):
    """The store holds no block with this hash."""


class StoreUnavailable(Exception):
    """The store did not answer in time or failed, after its own retries (EIO to users)."""


class BlockStore(abc.ABC):
    """Immutable, content-addressed blob storage.

    Invariant: the bytes stored under a hash always hash to it. ``put`` never
    overwrites an existing block, so concurrent writers of the same content are
    harmless and a reader can never observe a partially written block.

    A remote store bounds every call by the ``timeout`` it was opened with
    (requests and their retries) and raises :class:`StoreUnavailable` when
    that runs out: its calls run in worker threads, which cannot be
    cancelled, so the bound is what frees them.
    """

    url: str
    #: Blocks live on this machine's disk, as fast to read as a disk cache would
    #: be: the mount keeps no second on-disk copy of them (only the hot set).
    local: bool = False

    @abc.abstractmethod
    def get(self, key: bytes) -> bytes:
        """Return the whole block; raise BlockNotFound if absent."""

    @abc.abstractmethod
    def get_range(self, key: bytes, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the block from ``offset``."""

    @abc.abstractmethod
    def put(self, key: bytes, data: bytes | memoryview) -> bool:
        """Store the block unless present; return True if it was written."""

    @abc.abstractmethod
    def exists(self, key: bytes) -> bool:
        """Whether the block is stored."""

    @abc.abstractmethod
    def delete(self, key: bytes) -> None:
        """Remove the block (absent is not an error)."""

    @abc.abstractmethod
    def list(self) -> Iterator[bytes]:
        """Yield the hash of every stored block."""

    @abc.abstractmethod
    def objects(self) -> Iterator[tuple[bytes, int, float]]:
        """Yield (hash, size, time stored in seconds since the epoch) of every stored block.

        Block GC deletes an object no database row knows only once it is
        older than the grace: a block just put may not be committed yet.
        """

    def capacity(self) -> tuple[int, int] | None:
        """(total, free) bytes where the store has a size; None if unbounded."""
        return None

    def remove_leftovers(self, grace: float) -> int:
        """Delete what puts that crashed left, older than ``grace`` seconds; return the count."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release client resources."""
