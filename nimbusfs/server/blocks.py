"""Which blocks a user may use, and block I/O for mounts without store credentials.

The trust model (README, "Security"): a user may reference in a commit, or
be told by ``have_blocks`` about, only blocks in their ``block_owners`` rows.
A row is made when

- the user uploads the block through the metaserver (``put``): the server
  hashes the bytes it received, so possession is shown; or
- in *direct* mode, a commit names a block that the store holds
  (``admit``): there every mount holds the store's credentials and can read
  any block anyway, so direct mode is one trust domain (one user, or users
  who trust each other), and the check only keeps a block that is in no
  store out of every version.

In *proxy* mode (``nimbusfs server --proxy-blocks``) mounts get no store
address at all: they put and get blocks through this server, which answers a
``get`` only for the caller's own blocks, and refuses a commit naming any
other. The store still keeps one copy of a block that several users upload
(deduplicated storage), and nobody can tell: ``put`` answers alike whether
the block was new or not.

Store calls run in worker threads, never inside a database transaction.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import islice
from typing import Any

import trio
from psycopg import Cursor

from nimbusfs.blockstore import BlockNotFound, BlockStore, block_hash
from nimbusfs.blockstore.base import StoreUnavailable
from nimbusfs.blockstore.chunking import MAX_BLOCK, Piece, chunk_fd
from nimbusfs.errors import FSError, fs_error
from nimbusfs.server.auth import User
from nimbusfs.server.namespace import check_extents, check_keys, unowned

log = logging.getLogger(__name__)

# Blocks checked in the store at once when a direct-mode commit names new ones.
EXISTS_AT_ONCE = 16
# Zeros of a hole are sent in pieces of this size.
ZEROS = 1 << 20
# Blocks a download fetches (and hash-checks) while it sends one: it waits
# for the store once, not once per block. A download holds at most this many
# blocks besides the one it sends (4 x MAX_BLOCK; 4 MiB on average).
READ_AHEAD = 4


def _own(cur: Cursor, user_id: int, keys: list[bytes], sizes: list[int] | None = None) -> None:
    """Record that the user may reference ``keys``; with ``sizes``, that they are stored.

    A block put but not committed yet has a ``blocks`` row with no
    references, so that block GC treats it like any block whose last
    reference went: kept for the grace period, then collected.
    """
    if sizes is not None:
        cur.execute("INSERT INTO blocks (hash, size, refcount, unref_since)"
                    " SELECT k, n, 0, now() FROM unnest(%s::bytea[], %s::int[]) AS c(k, n)"
                    " ON CONFLICT (hash) DO NOTHING", (keys, sizes))
    cur.execute("INSERT INTO block_owners (user_id, hash) SELECT %s, k"
                " FROM unnest(%s::bytea[]) AS k ON CONFLICT DO NOTHING", (user_id, keys))


def _owns(cur: Cursor, user_id: int, key: bytes) -> bool:
    return not unowned(cur, user_id, [key])


class _Fetch:
    """One block of a download fetched and hash-checked in the background.

    A system task rather than a nursery's: ``BlockAccess.read`` is an async
    generator, which must not keep a nursery open across its yields. Store
    calls count against ``limiter`` like any other; once ``scope`` is
    cancelled (the download stopped) the worker thread is abandoned, and ends
    with its store call.
    """

    def __init__(self, fn: Callable[[bytes], bytes], key: bytes,
                 limiter: trio.CapacityLimiter) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.data = b""
        self.error: Exception | None = None
        trio.lowlevel.spawn_system_task(self._run, fn, key, limiter)

    async def _run(self, fn: Callable[[bytes], bytes], key: bytes,
                   limiter: trio.CapacityLimiter) -> None:
        with self.scope:
            try:
                self.data = await trio.to_thread.run_sync(fn, key, limiter=limiter,
                                                          abandon_on_cancel=True)
            except Exception as e:   # FSError, or a bug: raised to the download
                self.error = e
        self.done.set()

    async def result(self) -> bytes:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.data


def _unavailable(e: StoreUnavailable) -> FSError:
    log.error("block store unavailable: %s", e)
    return FSError(errno.EIO, "the block store is unavailable")


class BlockAccess:
    """The server's side of the trust model for blocks (see the module docstring)."""

    def __init__(self, store: BlockStore, proxy: bool,
                 transaction: Callable[..., Awaitable[Any]], transfers: int = 16) -> None:
        self.store = store
        self.proxy = proxy
        self.transaction = transaction  # MetaServer.call: fn(cur, ...) in one transaction
        self.transfers = trio.CapacityLimiter(transfers)

    async def _store(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A store call in a worker thread; a store that does not answer is EIO (503)."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.transfers)
        except StoreUnavailable as e:
            raise _unavailable(e) from None

    async def admit(self, u: User, extents: Any, size: Any) -> None:
        """Before a commit: make sure its blocks are the user's to reference.

        In proxy mode there is nothing to do here: ``commit`` itself refuses
        any block not uploaded through ``put``. In direct mode a block new to
        the user is admitted if the store holds it; one it does not hold
        fails the commit with EACCES, as a block of someone else would.
        """
        blocks = check_extents(extents, size)
        if self.proxy or not blocks:
            return
        new = await self.transaction(unowned, u.id, sorted(blocks))
        if not new:
            return
        missing: list[bytes] = []
        limiter = trio.CapacityLimiter(EXISTS_AT_ONCE)

        async def check(key: bytes) -> None:
            async with limiter:
                if not await self._store(self.store.exists, key):
                    missing.append(key)

        try:
            async with trio.open_nursery() as nursery:
                for key in new:
                    nursery.start_soon(check, key)
        except BaseExceptionGroup as group:
            # The store gave up on the checks (EIO): one error, not a group the
            # request's handler would log as a bug with its traceback.
            if (err := fs_error(group)) is None:
                raise
            raise err from None
        if missing:
            log.warning("user %s committed %d block(s) the store does not hold, e.g. %s",
                        u.name, len(missing), missing[0].hex())
            raise FSError(errno.EACCES, "extents name blocks that are not in the store")
        await self.transaction(_own, u.id, new)

    async def put(self, u: User, key: Any, data: Any) -> None:
        """Store a block the user sends, once its bytes are shown to hash to ``key``."""
        check_keys([key])
        if not (isinstance(data, bytes) and 0 < len(data) <= MAX_BLOCK):
            raise FSError(errno.EINVAL, f"a block is 1 to {MAX_BLOCK} bytes")
        if await trio.to_thread.run_sync(block_hash, data) != key:
            raise FSError(errno.EINVAL, "the bytes do not hash to the key")
        await self._store(self.store.put, key, data)
        await self.transaction(_own, u.id, [key], [len(data)])

    async def get(self, u: User, key: Any, offset: Any = 0, length: Any = None) -> bytes:
        """A block of the user's (or ``length`` bytes of it from ``offset``).

        ENOENT for a block that is not the user's, whether stored or not.
        """
        check_keys([key])
        if not (type(offset) is int and 0 <= offset <= MAX_BLOCK
                and (length is None or (type(length) is int and 0 <= length <= MAX_BLOCK))):
            raise FSError(errno.EINVAL, "bad offset or length")
        if not await self.transaction(_owns, u.id, key):
            raise FSError(errno.ENOENT, "no such block")
        if length is None:
            return await self.get_stored(key)
        try:
            return await self._store(self.store.get_range, key, offset, length)
        except BlockNotFound:
            raise FSError(errno.EIO, "block missing from the store") from None

    def _verified(self, key: bytes) -> bytes:
        """A block from the store, checked against its hash (fetched twice at most).

        Runs in a worker thread.
        """
        for _ in range(2):
            data = self._get(key)
            if block_hash(data) == key:
                return data
            log.error("block %s from the store fails its hash", key.hex())
        raise FSError(errno.EIO, f"block {key.hex()} is corrupt in the store")

    async def get_stored(self, key: bytes) -> bytes:
        return await self._store(self._get, key)

    def _get(self, key: bytes) -> bytes:
        try:
            return self.store.get(key)
        except BlockNotFound:
            log.error("block %s is referenced but missing from the store", key.hex())
            raise FSError(errno.EIO, "block missing from the store") from None
        except StoreUnavailable as e:
            raise _unavailable(e) from None

    async def ingest(self, u: User, fd: int, size: int) -> list[list]:
        """Cut bytes [0, size) of ``fd`` into blocks and store them; return the extents.

        The server holds the bytes, so every block becomes the user's; only
        those the user does not have yet are put (the store keeps one copy
        of each whatever its owners). The cuts are the mount's for a file
        written from its start, so the same bytes uploaded here and written
        through a mount are stored once. ``fd`` is read twice (chunking,
        then each new block), never whole into memory.
        """
        pieces: list[Piece] = await trio.to_thread.run_sync(chunk_fd, fd, 0, size)
        sizes = {p.key: p.length for p in pieces if p.key is not None}
        first = {p.key: p for p in reversed(pieces) if p.key is not None}
        new = await self.transaction(unowned, u.id, sorted(sizes))

        def put(p: Piece) -> None:
            data = os.pread(fd, p.length, p.offset)
            if len(data) != p.length:
                raise FSError(errno.EIO, "the upload's spool file is short")
            self.store.put(p.key, data)

        async with trio.open_nursery() as nursery:
            for key in new:
                nursery.start_soon(self._store, put, first[key])
        if new:
            await self.transaction(_own, u.id, new, [sizes[k] for k in new])
        extents: list[list] = []
        for p in pieces:
            if p.key is None and extents and extents[-1][0] is None:
                extents[-1][1] += p.length   # adjacent holes are one
            else:
                extents.append([p.key, p.length])
        return extents

    async def read(self, extents: list, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes [start, end) of a version with these extents, block by block.

        Every block is hash-checked; the next ``READ_AHEAD`` blocks are
        fetched and checked in worker threads while one is sent. When the
        caller stops, the fetches under way are cancelled.
        """
        spans: list[tuple[bytes | None, int, int]] = []   # (block, from, to) within it
        pos = 0
        for key, n in extents:
            a, b = max(start, pos), min(end, pos + n)
            if a < b:
                spans.append((None if key is None else bytes(key), a - pos, b - pos))
            pos += n
            if pos >= end:
                break
        todo = iter(spans)
        ahead: deque[tuple[_Fetch | None, int, int]] = deque()

        def fill() -> None:
            for key, a, b in islice(todo, READ_AHEAD - len(ahead)):
                ahead.append((None if key is None else _Fetch(self._verified, key,
                                                              self.transfers), a, b))
        try:
            fill()
            while ahead:
                fetch, a, b = ahead[0]
                data = None if fetch is None else await fetch.result()
                ahead.popleft()
                fill()
                if data is None:
                    for z in range(a, b, ZEROS):
                        yield bytes(min(ZEROS, b - z))
                else:
                    yield data[a:b]
        finally:
            for fetch, _, _ in ahead:
                if fetch is not None:
                    fetch.scope.cancel()
