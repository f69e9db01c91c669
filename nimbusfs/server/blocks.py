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

Block GC (``nimbusfs/server/gc.py``) deletes blocks nothing references; its
invariant needs every put and every direct-mode admission to *pin* the
block's row before its bytes are stored or looked for, and to *confirm* it
after (``_pin``, ``_confirm``). An ownership row outlives a block GC
collected: a commit of that block is then refused with EAGAIN (put it
again), not EACCES.
A mount holds the blocks it uploaded for a file it has not
committed yet (``hold``, ``hold_blocks``): by the rules above, only blocks
it may reference; another user's block is answered as one nobody stores.

Store calls run in worker threads, never inside a database transaction.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from psycopg import Cursor

from nimbusfs.blockstore import BlockNotFound, BlockStore, block_hash
from nimbusfs.blockstore.base import StoreUnavailable
from nimbusfs.blockstore.chunking import MAX_BLOCK, Piece, chunk_fd
from nimbusfs.cache import BlockCache
from nimbusfs.content.reader import stream
from nimbusfs.errors import FSError, fs_error
from nimbusfs.retry import Backoff
from nimbusfs.server.auth import User
from nimbusfs.server.namespace import MAX_KEYS, check_extents, check_keys, unowned

log = logging.getLogger(__name__)

# Seconds a put waits for block GC to finish deleting a block it doomed.
DOOMED_WAIT = 10.0
# The waits between its looks: 50 ms doubling to 1 s.
DOOMED_RETRY = Backoff(first=0.05, cap=1.0, jitter=0.0)
# Seconds a download waits for a block from the store before EIO.
STORE_TIMEOUT = 60.0
# Blocks checked in the store at once when a direct-mode commit names new ones.
EXISTS_AT_ONCE = 16


def _unusable(cur: Cursor, user_id: int, keys: list[bytes]) -> list[bytes]:
    """The blocks of ``keys`` a commit of the user's could not reference as they are.

    Those the user does not own, and those whose row is not live (GC
    collected the block, or is collecting it, or a put of it is unfinished):
    these must be put again (or, in direct mode, seen in the store again).
    """
    cur.execute("SELECT k FROM unnest(%s::bytea[]) AS k WHERE NOT EXISTS"
                " (SELECT 1 FROM block_owners o WHERE o.user_id = %s AND o.hash = k)"
                " OR NOT EXISTS (SELECT 1 FROM blocks b WHERE b.hash = k AND b.state = 'live')",
                (keys, user_id))
    return [bytes(r[0]) for r in cur.fetchall()]


def _pin(cur: Cursor, keys: list[bytes], sizes: list[int]) -> dict[bytes, Any]:
    """Step one of making blocks usable, before their bytes are put or looked for.

    Each block gets a row that GC leaves alone for a whole grace period: a
    missing row is made ``pending``; an unreferenced one has its grace
    restarted (``unref_since``). A doomed row (GC is deleting the object)
    is EAGAIN: the caller tries again once GC is done with it. Returns the
    blocks that are not live yet, with their rows' ``first_seen``, which
    ``_confirm`` checks (see the module docstring of ``gc``: a row GC
    deleted and someone made again is another row). ``first_seen`` of a new
    row is ``clock_timestamp()``, later than the deletion of any row before
    it, whenever that row's transaction began.
    """
    cur.execute("INSERT INTO blocks (hash, size, refcount, unref_since, state, first_seen)"
                " SELECT k, n, 0, now(), 'pending', clock_timestamp()"
                " FROM unnest(%s::bytea[], %s::int[]) AS c(k, n) ORDER BY k"
                " ON CONFLICT (hash) DO UPDATE SET unref_since = CASE"
                " WHEN blocks.refcount = 0 THEN now() ELSE blocks.unref_since END"
                " RETURNING hash, state, first_seen", (keys, sizes))
    rows = cur.fetchall()
    if any(state == "doomed" for _, state, _ in rows):
        raise FSError(errno.EAGAIN, "a block is being deleted by block GC; try again")
    return {bytes(k): first for k, state, first in rows if state != "live"}


def _confirm(cur: Cursor, user_id: int, keys: list[bytes], pending: dict[bytes, Any]) -> None:
    """Step two, once every block of ``pending`` was put (or seen) in the store after ``_pin``.

    They become live, if their rows are still the ones pinned (EAGAIN if
    GC took one meanwhile: their bytes may have gone with it), and every
    block of ``keys`` becomes the user's to reference.
    """
    if pending:
        cur.execute("UPDATE blocks b SET state = 'live'"
                    " FROM unnest(%s::bytea[], %s::timestamptz[]) AS c(k, t)"
                    " WHERE b.hash = c.k AND b.first_seen = c.t AND b.state <> 'doomed'"
                    " RETURNING b.hash", (list(pending), list(pending.values())))
        if cur.rowcount != len(pending):
            raise FSError(errno.EAGAIN, "block GC took a block while it was stored; try again")
    cur.execute("INSERT INTO block_owners (user_id, hash) SELECT %s, k"
                " FROM unnest(%s::bytea[]) AS k ON CONFLICT DO NOTHING", (user_id, keys))


def _hold(cur: Cursor, user_id: int, keys: list[bytes]) -> list[bytes]:
    """Restart the GC grace of the user's unreferenced live blocks among ``keys`` (sorted);
    return the blocks of ``keys`` the user could not reference as they are (``_unusable``).

    The rows are locked in hash order, as a commit locks them (no deadlock).
    A row GC doomed meanwhile is not held (READ COMMITTED rechecks it once
    locked); one held is not doomed by a round that began before: GC's doom
    skips locked rows and rechecks ``unref_since`` on the others.
    """
    cur.execute("UPDATE blocks b SET unref_since = now() FROM (SELECT hash FROM blocks"
                " WHERE hash = ANY(%s) AND refcount = 0 AND state = 'live' AND EXISTS"
                " (SELECT 1 FROM block_owners o WHERE o.user_id = %s AND o.hash = blocks.hash)"
                " ORDER BY hash FOR UPDATE) h WHERE b.hash = h.hash", (keys, user_id))
    return _unusable(cur, user_id, keys)


def _owns(cur: Cursor, user_id: int, key: bytes) -> bool:
    return not unowned(cur, user_id, [key])


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
        # Reads (downloads) go through a cache without a disk part: its hot
        # set shares a block among concurrent downloads; a store that does not
        # answer fails a read with EIO after ``STORE_TIMEOUT``. Every store
        # call, read or put, counts against its transfer limiter.
        self.cache = BlockCache(store, None, 0, transfers=transfers, timeout=STORE_TIMEOUT)
        self.transfers = self.cache.transfers

    async def _store(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A store call in a worker thread; a store that does not answer is EIO (503)."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.transfers)
        except StoreUnavailable as e:
            raise _unavailable(e) from None

    async def _pinned(self, keys: list[bytes], sizes: list[int]) -> dict[bytes, Any]:
        """``_pin``, waiting (up to ``DOOMED_WAIT`` seconds) for GC to finish with a doomed block.

        GC deletes a doomed block's object and then its row in well under a
        second; after that the block can be stored again.
        """
        waits = DOOMED_RETRY.until(trio.current_time() + DOOMED_WAIT, trio.current_time)
        while True:
            try:
                return await self.transaction(_pin, keys, sizes)
            except FSError as e:
                if e.errno != errno.EAGAIN or (delay := next(waits, None)) is None:
                    raise
            await trio.sleep(delay)

    async def _seen(self, u: User, sizes: dict[bytes, int]) -> list[bytes]:
        """Direct mode: make the blocks of ``sizes`` usable by the user if the store holds
        them; return those it does not hold.

        A block that is new to the user, or not live, is pinned (``_pin``),
        then looked for in the store, then confirmed with the others found
        (see the module docstring of ``gc``, point 3). Direct mode is one
        trust domain, so the answer tells nobody anything they could not
        read in the store.
        """
        new = await self.transaction(_unusable, u.id, sorted(sizes))
        if not new:
            return []
        pending = await self._pinned(new, [sizes[k] for k in new])
        missing: list[bytes] = []
        limiter = trio.CapacityLimiter(EXISTS_AT_ONCE)

        async def check(key: bytes) -> None:
            async with limiter:
                if not await self._store(self.store.exists, key):
                    missing.append(key)

        try:
            async with trio.open_nursery() as nursery:
                for key in pending:
                    nursery.start_soon(check, key)
        except BaseExceptionGroup as group:
            # The store gave up on the checks (EIO): one error, not a group the
            # request's handler would log as a bug with its traceback.
            if (err := fs_error(group)) is None:
                raise
            raise err from None
        if found := [k for k in new if k not in missing]:
            await self.transaction(_confirm, u.id, found,
                                   {k: pending[k] for k in found if k in pending})
        return missing

    async def admit(self, u: User, extents: Any, size: Any) -> None:
        """Before a commit: make sure its blocks are the user's to reference, and live.

        In proxy mode there is nothing to do here: ``commit`` itself refuses
        any block not uploaded through ``put`` (EACCES), or collected since
        (EAGAIN: the mount puts it again). In direct mode (``_seen``) a
        block the store does not hold fails the commit with EAGAIN, so that
        the mount puts it (again) and retries: block GC may have collected
        it since it was put, as an object no row knew.
        """
        blocks = check_extents(extents, size)
        if self.proxy or not blocks:
            return
        if missing := await self._seen(u, blocks):
            log.info("user %s committed %d block(s) the store does not hold, e.g. %s",
                     u.name, len(missing), missing[0].hex())
            raise FSError(errno.EAGAIN, "extents name blocks that are not in the store:"
                                        " upload them (again)")

    async def hold(self, u: User, extents: Any) -> list[bytes]:
        """``hold_blocks``: keep blocks a mount uploaded for a file it has not committed yet.

        ``extents`` as a commit's (``[hash, length]``; holes are ignored), at
        most ``MAX_KEYS``. Each block the user may reference and that is
        live has its GC grace restarted (``_hold``); in direct mode the
        others are looked for in the store as a commit would (``_seen``),
        which gives the objects the mount put rows that GC keeps. Returns
        the blocks that are not held: GC collected them (or is collecting
        them), or, in proxy mode, the user never put them. That answer is
        the same whether another user stores a block or not. A mount calls
        this for its uploaded-ahead blocks every third of the grace it was
        told in the hello, so no round ever finds one past its grace; a
        commit still refuses any block that is not live (EAGAIN).
        """
        if not (isinstance(extents, list) and len(extents) <= MAX_KEYS):
            raise FSError(errno.EINVAL, f"extents must be a list of at most {MAX_KEYS}")
        # What the lengths add up to if they are all a block's: any other is
        # EINVAL in check_extents (never summed into an EFBIG).
        size = sum(e[1] for e in extents if isinstance(e, list | tuple) and len(e) == 2
                   and type(e[1]) is int and 0 < e[1] <= MAX_BLOCK)
        blocks = check_extents(extents, size)
        if not blocks:
            return []
        lost = await self.transaction(_hold, u.id, sorted(blocks))
        if self.proxy or not lost:
            return lost
        return await self._seen(u, {k: blocks[k] for k in lost})

    async def put(self, u: User, key: Any, data: Any) -> None:
        """Store a block the user sends, once its bytes are shown to hash to ``key``.

        Pinned before it is put and confirmed after (see ``_pin``): the
        store's put does nothing if the object is there, and an object of a
        block GC doomed may be there still, about to go.
        """
        check_keys([key])
        if not (isinstance(data, bytes) and 0 < len(data) <= MAX_BLOCK):
            raise FSError(errno.EINVAL, f"a block is 1 to {MAX_BLOCK} bytes")
        if await trio.to_thread.run_sync(block_hash, data) != key:
            raise FSError(errno.EINVAL, "the bytes do not hash to the key")
        pending = await self._pinned([key], [len(data)])
        await self._store(self.store.put, key, data)
        await self.transaction(_confirm, u.id, [key], pending)

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
        those the user cannot reference as they are (not theirs yet, or not
        live) are put (the store keeps one copy of each whatever its
        owners). Every block is pinned (``_pin``), which restarts the GC
        grace of those no version references: an upload's chunks wait for
        its completion with nothing else holding them. The cuts are the mount's for a file
        written from its start, so the same bytes uploaded here and written
        through a mount are stored once. ``fd`` is read twice (chunking,
        then each new block), never whole into memory.
        """
        pieces: list[Piece] = await trio.to_thread.run_sync(chunk_fd, fd, 0, size)
        sizes = {p.key: p.length for p in pieces if p.key is not None}
        first = {p.key: p for p in reversed(pieces) if p.key is not None}
        keys = sorted(sizes)
        pending = await self._pinned(keys, [sizes[k] for k in keys]) if keys else {}
        new = sorted(set(await self.transaction(_unusable, u.id, keys)) | set(pending))

        def put(key: bytes) -> None:
            p = first[key]
            data = os.pread(fd, p.length, p.offset)
            if len(data) != p.length:
                raise FSError(errno.EIO, "the upload's spool file is short")
            self.store.put(key, data)

        async with trio.open_nursery() as nursery:
            for key in new:
                nursery.start_soon(self._store, put, key)
        if new:
            await self.transaction(_confirm, u.id, new, pending)
        extents: list[list] = []
        for p in pieces:
            if p.key is None and extents and extents[-1][0] is None:
                extents[-1][1] += p.length   # adjacent holes are one
            else:
                extents.append([p.key, p.length])
        return extents

    def read(self, extents: list, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes [start, end) of a version with these extents, block by block.

        The content layer's stream (``nimbusfs.content.reader.stream``), as
        the mount and ``nimbusfs cat`` read: every block hash-checked through
        the cache, the next blocks fetched while one is sent, the fetches
        under way cancelled when the caller stops.
        """
        return stream(self.cache, extents, start, end)
