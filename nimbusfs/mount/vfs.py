"""The VFS layer: POSIX semantics on top of the metaserver and the block cache.

It knows nothing of pyfuse3 (the adapter translates), so its logic can be
driven directly. Inode numbers here are FUSE's: the volume's root directory
is 1, every other inode keeps its server number.

State kept per mount:
- ``files``: the :class:`OpenFile` of each regular file open on this mount,
  shared by all its handles and dropped at the last release;
- ``handles``: file handle -> OpenFile; ``dirs``: directory handle -> listing;
- ``attrs``: the server's attributes of inodes seen recently, so that the
  kernel's getattr (after every write, and on a directory after each create
  in it) is answered without a round trip. This mount's own changes update
  it from their replies; other mounts' changes drop entries as they are
  pushed. A reply is cached only if the items it fills were not dropped
  while its request was in flight (``_drops``), so a reply older than a
  change can never outlive it;
- ``listings``: the complete name sets of directories this mount listed or
  made, kept by the same rules (``dentries``: each name's inode; ``parents``:
  each directory's '..'), so that looking up a name that does not exist (as
  every create does first) needs no round trip, and a readdir of a directory
  whose names and their attributes are all cached neither (``_known_listing``).

Namespace operations go straight to the server (one transaction each) and
are visible to every mount as soon as they return; but in write-back mode a
create is local (``_create_here``: a leased inode number, the create
journalled with the file's first close), and until the server has applied
it the file is this mount's alone: lookups, getattr and readdir answer for
it from the overlay of names changed here (``WriteBack.entries``), and any
request naming it by number waits for its create (``call``). So are a
mkdir (``_mkdir_here``), a symlink (``_symlink_here``), a link
(``_link_here``), a rename (``_rename_here``), an unlink (``_unlink_here``),
an rmdir (``_rmdir_here``) and a chmod/chown/utimens of an inode no file
here holds open (journalled as operations): until applied, lookups and
readdir answer from the overlay first (``_overlaid``), a new directory or
symlink from ``WriteBack.made`` (a directory's listing is known: empty but
for what is made in it here; a symlink's target is in its record), every
attribute this mount shows carries the pending changes and removed or
added links (``_out``), and a request naming such an inode to the server
(by number, or by a name changed here) waits until its operations are
applied, so the server sees this mount's operations in the order they were
made. File content is
close-to-open: a close or fsync commits it before returning, and every open
asks the server for the current version. In write-back mode (``writeback``)
a close or fsync journals the file's changes on the local disk instead, and
the file stays in ``files``, modified, until the drainer has committed it:
this mount reads its own pending bytes, other mounts see them once drained.
Changes made by other mounts are pushed by the server; ``apply_changes``
turns them into kernel cache invalidations, done by one background task in
a worker thread (the kernel may block an invalidation while a related
request is in progress).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio
from cachetools import LRUCache

from nimbusfs.cache import BlockCache
from nimbusfs.client import MetaClient
from nimbusfs.errors import FSError, fs_error
from nimbusfs.mount.activity import Activity
from nimbusfs.mount.filedata import OpenFile
from nimbusfs.mount.freshness import Drops
from nimbusfs.mount.journal import OpRecord
from nimbusfs.mount.places import Places
from nimbusfs.posix import (
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    changing,
    check_setattr,
    dropped_privileges,
    setattr_mode,
    xattr_supported,
)
from nimbusfs.retry import RECONNECT

if TYPE_CHECKING:
    from nimbusfs.mount.writeback import Entry, WriteBack

log = logging.getLogger(__name__)

ROOT = 1
# Kinds of change that alter a directory entry (the others alter an inode only).
ENTRY_CHANGES = frozenset({"create", "link", "unlink", "rmdir", "rename", "rename_from"})
# Requests that only read what a journalled setattr does not change (names, places,
# contents, a symlink's target): sent without waiting for the setattrs of what they name
# (``call``). Not the xattr reads (a chown removes security.capability), nor an open
# for reading: it updates atime on the server (relatime) by times a pending setattr
# changes (its ctime at least), and a utimens applied after it would undo it.
READS = frozenset({"lookup", "open", "readlink", "entry"})
# Bounds of the metadata caches, so that the mount's memory does not grow with
# the volume: attributes of 50,000 inodes (~40 MB), 250,000 names in directory
# listings (~15 MB; a directory with more is not kept).
MAX_ATTRS = 50_000
MAX_LISTED = 250_000
# Orphans purged by one ``batch`` request (``purge_soon``; the server takes 1,000).
PURGE_BATCH = 256
# Orphans held by one ``hold_orphans`` request (the server takes 10,000), and
# the longest time between two holds (``hold_orphans``).
HOLD_BATCH = 10_000
HOLD_EVERY = 3600.0


def _check_length(*names: bytes) -> None:
    """ENAMETOOLONG for a name over NAME_MAX bytes, before any cache can answer.

    The kernel passes names of up to 1024 bytes to FUSE; a lookup answered
    from a directory listing would say ENOENT, and stat, chmod, unlink,
    rmdir, link, rename and truncate all start with a lookup.
    """
    if any(len(n) > NAME_MAX for n in names):
        raise FSError(errno.ENAMETOOLONG, "name longer than 255 bytes")


def _check_xattr_name(name: bytes) -> None:
    """EOPNOTSUPP for a name the file system does not store (see ``xattr_supported``)."""
    if not xattr_supported(name):
        raise FSError(errno.EOPNOTSUPP, "unsupported xattr name")


class KernelCache(Protocol):
    """The kernel's caches, as the FUSE adapter exposes them (blocking calls)."""

    def invalidate_inode(self, ino: int) -> None: ...
    def invalidate_attr(self, ino: int) -> None: ...
    def invalidate_entry(self, parent: int, name: bytes) -> None: ...


class VFS:
    def __init__(self, client: MetaClient, cache: BlockCache, state_dir: str,
                 nursery: trio.Nursery, kernel: KernelCache) -> None:
        self.client = client
        self.cache = cache
        self.kernel = kernel
        self.state_dir = state_dir
        self.staging_dir = os.path.join(state_dir, "staging")
        self.nursery = nursery
        self.root = client.info["root"]
        self.writeback: WriteBack | None = None  # write-back mode (set before mounting)
        self.files: dict[int, OpenFile] = {}
        self.handles: dict[int, OpenFile] = {}
        self.privileged: set[int] = set()   # handles opened by root (CAP_FSETID)
        self.writers: set[int] = set()      # handles that wrote or truncated: flush commits
        # Handles whose open truncated the file (O_TRUNC), until their first
        # commit; those whose first commit was an empty version, with it.
        self.truncating: set[int] = set()
        self.emptied: dict[int, int] = {}
        self.dirs: dict[int, list] = {}
        self.orphans: set[int] = set()
        # Bounded maps: where each inode was last seen (for conflict copies: kept
        # while the file is held here), and the version the kernel's page cache
        # holds for it.
        self.names = Places(100_000, held=self.files.__contains__)
        self.page_version: LRUCache[int, int] = LRUCache(100_000)
        # Names of each inode's xattrs: the kernel asks for security.capability
        # before every write, and the answer is almost always "none". As many
        # as attributes: ``ls -l`` of a directory the attribute cache holds
        # must not fall back to asking the server once per entry.
        self.xattr_names: LRUCache[int, frozenset[bytes]] = LRUCache(MAX_ATTRS)
        self.attrs: LRUCache[int, dict[str, Any]] = LRUCache(MAX_ATTRS)
        self.listings: LRUCache[int, set[bytes]] = LRUCache(MAX_LISTED, getsizeof=len)
        # (parent, name) -> (inode, file type) of entries seen (lookups, listings,
        # this mount's changes), dropped by the same changes as listings: a
        # write-back rename or unlink of an entry seen needs no round trip (``_find``).
        self.dentries: LRUCache[tuple[int, bytes], tuple[int, int]] = LRUCache(MAX_LISTED)
        self.activity = Activity()   # the adapter's requests: the drain yields to them
        self._to_purge: list[int] = []   # orphans for ``purge_soon``'s task, and whether it runs
        self._purging = False
        self._purges_done = trio.Event()   # set when the task ends (``purged``)
        # Directory -> its parent (FUSE numbers), for the '..' of a listing answered
        # from the caches: filled with listings, dropped with them and when moved.
        self.parents: LRUCache[int, int] = LRUCache(MAX_ATTRS)
        # Which cached items were dropped when: an attribute's key is its FUSE inode,
        # a listing's (with its dentries and '..') ``("dir", inode)``.
        self._drops = Drops()
        self._fh = itertools.count(1)
        self._inval_send, self._inval_recv = trio.open_memory_channel[tuple](10_000)

    # --- changes from other mounts ---------------------------------------------------

    def apply_changes(self, changes: list) -> None:
        """Queue kernel invalidations for changes pushed by the server.

        Changes made by this mount are skipped: its replies already updated the
        kernel. An empty list means the server's log did not reach back far
        enough: every inode this mount has shown is invalidated.
        """
        if not changes:
            log.warning("change log reset: invalidating all cached inodes")
            for ino in list(self.page_version):
                self._invalidate(("inode", ino))
            self.page_version.clear()
            self.attrs.clear()
            self.xattr_names.clear()
            self.listings.clear()
            self.dentries.clear()
            self.parents.clear()
            self._drops.all()
            return
        for _, ino, parent, name, kind, device in changes:
            if device == self.client.device and kind != "xattr":
                continue
            # Even this mount's xattr changes drop the name cache, in case a
            # reply older than the change re-seeded it.
            self.xattr_names.pop(self.fuse(ino), None)
            if device == self.client.device:
                continue
            entry = kind in ENTRY_CHANGES and parent is not None
            self._drop(ino, parent if entry else None)
            if entry:
                # The directory's listing, and the moved or removed inode's own
                # (its '..' may have changed, or it is gone).
                self._forget_listing(self.fuse(parent), self.fuse(ino))
                self.dentries.pop((self.fuse(parent), bytes(name)), None)
            self._invalidate(("inode", self.fuse(ino)))
            if entry:
                self._invalidate(("entry", self.fuse(parent), bytes(name)))
                self._invalidate(("inode", self.fuse(parent)))

    def _invalidate(self, item: tuple) -> None:
        try:
            self._inval_send.send_nowait(item)
        except trio.WouldBlock:
            # A burst larger than the queue: the kernel's attribute timeout
            # still bounds how long this mount shows the old state.
            log.warning("invalidation queue full; dropping one for inode %d", item[1])

    async def run_invalidations(self) -> None:
        async for item in self._inval_recv:
            try:
                if item[0] == "inode":
                    await trio.to_thread.run_sync(self.kernel.invalidate_inode, item[1])
                else:
                    await trio.to_thread.run_sync(self.kernel.invalidate_entry, item[1], item[2])
            except OSError:
                pass  # the kernel holds nothing for it: nothing to invalidate

    # --- conflicts -----------------------------------------------------------------------

    def commit_hint(self, ino: int) -> dict[str, Any]:
        """Where a conflicted copy of ``ino`` should go (nothing for files we deleted)."""
        place = self.names.place(ino)
        if ino in self.orphans or place is None or self._unlinked_here(ino):
            return {}
        return {"parent": place[0], "name": place[1]}

    def _unlinked_here(self, ino: int) -> bool:
        """Whether journalled unlinks or renames over it (write-back) leave ``ino`` without
        a name, as far as this mount knows its link count (unknown: assumed so).

        Its commit drains after them, often in the same batch, before their answer
        makes it an orphan here: with a name, the server would take the inode's
        deletion for another mount's and save the bytes of a deleted file as a
        conflicted copy (an unlinked file written through an open handle)."""
        if self.writeback is None or not (gone := self.writeback.unlinked(self.srv(ino))):
            return False
        attr = self.attrs.get(ino)
        return attr is None or attr["nlink"] <= gone

    def record_conflict(self, ino: int, copy: dict[str, Any]) -> None:
        # The copy is a new entry in a directory the kernel does not know changed.
        self._drop(copy["dir"]["ino"])
        self._forget_listing(self.fuse(copy["dir"]["ino"]))
        self._invalidate(("inode", self.fuse(copy["dir"]["ino"])))
        parent, name = self.names.place(ino) or (self.root, b"?")
        # The log names inodes only; the names are in conflicts.jsonl (0600).
        log.warning("conflict on inode %d: another writer's version was kept; this"
                    " mount's bytes are saved as inode %d", ino, copy["ino"])
        self._log_conflict({"time": time.time(), "inode": ino, "parent": parent,
                            "name": name.decode(errors="replace"), "copy_inode": copy["ino"]})

    def record_refused(self, op: str, args: dict[str, Any], answer: list) -> None:
        """A journalled namespace operation the server refused (``answer``: its errno and
        message), gone from the journal: what it was, in ``conflicts.jsonl``."""
        self._log_conflict({
            "time": time.time(), "refused": op, "errno": answer[0], "error": str(answer[1]),
            "args": {k: v.decode(errors="replace") if isinstance(v, bytes) else v
                     for k, v in args.items()}})

    def _log_conflict(self, entry: dict[str, Any]) -> None:
        """Append to ``conflicts.jsonl`` (0600: it names files; the log names inodes only)."""
        fd = os.open(os.path.join(self.state_dir, "conflicts.jsonl"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(entry) + "\n")

    # --- helpers -----------------------------------------------------------------

    def srv(self, ino: int) -> int:
        return self.root if ino == ROOT else ino

    def fuse(self, ino: int) -> int:
        return ROOT if ino == self.root else ino

    @property
    def drops(self) -> int:
        """The token of a request sent now (``Drops.now``): the write-back drain's batches
        take it, and their answers are cached only if still ``_fresh``."""
        return self._drops.now

    def _drop(self, *inos: int | None) -> None:
        """Forget cached attributes; replies to requests already in flight are not cached."""
        keys = [self.fuse(ino) for ino in inos if ino is not None]
        self._drops.drop(*keys)
        for ino in keys:
            self.attrs.pop(ino, None)

    def _fresh(self, ino: int, token: int) -> bool:
        """Whether a reply to a request sent at ``token`` may cache (server) inode
        ``ino``'s attributes: they were not dropped since."""
        return self._drops.fresh(self.fuse(ino), token)

    def _forget_listing(self, *dirs: int) -> None:
        """Forget the listings of directories ``dirs`` (FUSE numbers) and their '..';
        a listing in flight for one of them is not cached (its entries' dentries still
        are: ``_forget_listing`` does not drop them)."""
        self._drops.drop(*(("dir", d) for d in dirs))
        for d in dirs:
            self.listings.pop(d, None)
            self.parents.pop(d, None)

    def _fill(self, attr: dict[str, Any], token: int) -> None:
        """Cache a reply's attributes, given ``_drops.now`` as it was when the request
        was sent.

        If the inode's attributes were dropped meanwhile the reply may predate
        that change, or be newer than what was cached since (an applied setattr
        leaves this mount's estimate while an open's answer waited for it): the
        inode's entry is dropped instead of refreshed, and the next getattr asks.
        """
        ino = self.fuse(attr["ino"])
        if self._drops.fresh(ino, token):
            self.attrs[ino] = attr
        else:
            self.attrs.pop(ino, None)

    def _named(self, parent: int, name: bytes, attr: dict[str, Any], token: int
               ) -> dict[str, Any]:
        """Cache a reply's attributes (and its directory's, when the call changed it),
        remember where the inode was seen (for conflict copies) and return its attrs."""
        if "dir" in attr:
            attr = dict(attr)
            self._fill(attr.pop("dir"), token)
        self._fill(attr, token)
        self._seen_at(parent, name, attr)
        if self._drops.fresh(("dir", parent), token):
            self.dentries[(parent, name)] = (self.fuse(attr["ino"]), stat.S_IFMT(attr["mode"]))
            if stat.S_ISDIR(attr["mode"]) and self._drops.fresh(
                    ("dir", self.fuse(attr["ino"])), token):
                self.parents[self.fuse(attr["ino"])] = parent
        return self._out(attr)

    def _seen_at(self, parent: int, name: bytes, attr: dict[str, Any]) -> None:
        """A file's inode was seen at ``parent``/``name`` (a lookup, a listing): where a
        commit of it names a conflicted copy (``commit_hint``). Without it, a file opened
        by a name known from a listing and deleted meanwhile by another mount had its
        bytes committed to the deleted inode (the server makes a copy only with a name)."""
        if not stat.S_ISDIR(attr["mode"]):
            self.names[self.fuse(attr["ino"])] = (self.srv(parent), name)

    def _entries_changed(self, parent: int, add: bytes | None = None,
                         remove: bytes | None = None) -> None:
        """This mount added or removed a name in ``parent``: keep its listing complete.

        Also drops ``("dir", parent)``, so a listing read concurrently (which may
        predate the change) is not cached.
        """
        self._drops.drop(("dir", parent))
        if remove is not None:   # an added name's inode is set by the caller
            self.dentries.pop((parent, remove), None)
        names = self.listings.get(parent)
        if names is None:
            return
        names.discard(remove)
        if add is not None:
            names.add(add)
        if len(names) < MAX_LISTED:
            self.listings[parent] = names  # re-weighed in the LRU
        else:
            self._forget_listing(parent)

    def _out(self, attr: dict[str, Any]) -> dict[str, Any]:
        """Server attributes as this mount sees them (FUSE inode, unflushed changes).

        An open file's uncommitted changes show as the commit will make them:
        its size and mtime, deferred attribute changes, and set-user-ID already
        dropped after an unprivileged write (so that a chmod relative to the
        mode it reads cannot set the bit again).
        """
        if self.writeback is not None and (ch := self.writeback.changed(attr["ino"])):
            # Journalled setattrs not applied yet, as the server will apply them.
            attr = self._with_changes(attr, ch)
        else:
            attr = dict(attr)
        if self.writeback is not None and (gone := self.writeback.unlinked(attr["ino"])):
            attr["nlink"] = max(attr["nlink"] - gone, 0)   # unlinked or replaced here
        if attr["ino"] == self.root:
            attr["ino"] = ROOT
        if not attr["xattrs"]:
            self.xattr_names[attr["ino"]] = frozenset()
        elif self.xattr_names.get(attr["ino"]) == frozenset():
            del self.xattr_names[attr["ino"]]  # a reply older than the setxattr seeded it
        f = self.files.get(attr["ino"])
        if f is not None and f.modified:
            attr["size"], attr["mtime"] = f.size, f.mtime
            # An estimate until the commit: the committed blocks and the staged bytes.
            attr["alloc"] = min(f.size, attr["alloc"] + f.staged_bytes())
            if f.kill_priv:
                attr["mode"] &= ~dropped_privileges(attr["mode"])
            attr.update((k, v) for k, v in f.deferred.items() if k != "mode")
            if "mode" in f.deferred:
                attr["mode"] = stat.S_IFMT(attr["mode"]) | stat.S_IMODE(f.deferred["mode"])
            attr["ctime"] = max(attr["ctime"], f.ctime)
        return attr

    @staticmethod
    def _with_changes(attr: dict[str, Any], ch: dict[str, int]) -> dict[str, Any]:
        """A copy of ``attr`` with journalled setattr changes ``ch`` (``WriteBack.changed``)
        applied as the server applies them."""
        attr = {**attr, **{k: v for k, v in ch.items() if k != "mode"}}
        attr["mode"] = stat.S_IFMT(attr["mode"]) | stat.S_IMODE(
            setattr_mode(attr["mode"], ch.get("mode"), "uid" in ch or "gid" in ch))
        attr["ctime"] = max(attr["ctime"], ch["ctime"])
        return attr

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> None:
        """Run a background task whose failure is logged, not fatal."""
        async def guarded() -> None:
            try:
                await fn(*args, **kwargs)
            except Exception as e:
                log.warning("background %s failed: %s", getattr(fn, "__name__", fn),
                            fs_error(e) or e)
        self.nursery.start_soon(guarded)

    async def call(self, op: str, **args: Any) -> Any:
        """Send a request; one naming a file created here waits until the server knows it,
        one naming an inode with journalled operations until they are applied, one by a
        name changed here (``WriteBack.entries``) until that change is: the server sees
        this mount's operations in order where the order matters, and a link, symlink or
        lookup by a name this mount did not change does not wait for the drain. A request
        that only reads (``READS``) does not wait for journalled setattrs either."""
        if self.writeback is not None:
            f = self.files.get(self.fuse(args["ino"])) if "ino" in args else None
            if f is not None and f.creating is not None:
                await self.writeback.created(f)
            for key, name in (("ino", ""), ("parent", "name"), ("new_parent", "new_name")):
                if key in args:
                    await self.writeback.settled(args[key], name=args.get(name),
                                                 reading=op in READS and not args.get("read"))
        return await self.client.call(op, **args)

    def orphaned(self, result: dict[str, Any]) -> None:
        """An unlink or rename left inode ``result["orphan"]`` without a name: purged now,
        or after its last close here."""
        ino = result.get("orphan")
        if ino is None:
            return
        if ino in self.files:
            self.orphans.add(ino)   # purge after the last close
        else:
            self.purge_soon(ino)

    def purge_soon(self, ino: int) -> None:
        """Purge orphan (server) inode ``ino`` in the background.

        Orphans queued while a purge is in flight go together, in one
        ``batch`` request of at most ``PURGE_BATCH``: an ``rm -rf`` of a
        drained tree sent one request (a transaction) per file, 5,600-6,800
        of them after the Django sdist's unlinks. Each waits for the
        journalled operations naming it, as ``call`` would. A batch that
        fails for an outage (EIO) stays at the head of the queue and is sent
        again after a backoff, for as long as the mount runs, and an unmount
        waits for the queue (``purged``): an orphan left on the server keeps
        counting against its owner's quota until the server's block GC
        purges it (``namespace.ORPHAN_AGE``, 7 days). A purge the server
        answers with an error is logged and left (to GC); one applied twice
        deletes nothing the second time (``namespace.purge``).
        """
        self._to_purge.append(ino)
        if not self._purging:
            self._purging = True
            self.spawn(self._purge_queued)

    async def _purge_queued(self) -> None:
        waits = RECONNECT.delays()
        try:
            while self._to_purge:
                inos = self._to_purge[:PURGE_BATCH]   # removed once answered
                try:
                    if self.writeback is not None:
                        for ino in inos:
                            await self.writeback.settled(ino)
                    answers = await self.client.call("batch", ops=[
                        ["purge", uuid.uuid4().hex, {"ino": ino}] for ino in inos])
                except FSError as e:
                    if e.errno != errno.EIO:
                        raise
                    log.warning("purge of %d orphans failed (%s); retrying", len(inos),
                                e.message)
                    await trio.sleep(next(waits))
                    continue
                waits = RECONNECT.delays()
                del self._to_purge[:len(inos)]   # only appended to meanwhile
                for ino, (err, why) in zip(inos, answers, strict=True):
                    if err:
                        log.warning("purge of inode %d failed: %s", ino, why)
        finally:
            self._purging = False
            self._purges_done.set()
            self._purges_done = trio.Event()

    async def purged(self, give_up: float | None = None) -> bool:
        """Wait until the orphans queued (``purge_soon``) are purged; False if ``give_up``
        seconds pass first (the server out of reach: they are left to block GC)."""
        with trio.move_on_after(give_up if give_up is not None else float("inf")):
            while self._purging:
                await self._purges_done.wait()
            return True
        log.error("%d orphans not purged: the metaserver does not answer; block GC purges"
                  " them in 7 days (or fsck --repair)", len(self._to_purge))
        return False

    async def hold_orphans(self) -> None:
        """Hold the orphans open here on the server every third of its GC grace, at most
        every ``HOLD_EVERY``.

        A file unlinked while open here stays on the server without a link
        until its last close purges it; block GC takes an orphan not held
        for ``namespace.ORPHAN_AGE`` (7 days) as one a dead mount left. A
        process that keeps a deleted file open longer (a log, a temporary
        file, a reader) keeps it: this mount says so, at the cadence it holds
        its uploaded-ahead blocks, and never less often than hourly (a grace
        of days would leave gaps as long). A failed hold, whatever the
        failure, is tried again next time (the age is days); a server that
        does not know the call yet (ENOSYS: a replica not upgraded) is
        logged once.
        """
        unknown_logged = False
        while True:
            await trio.sleep(min(max((self.client.gc_grace or HOLD_EVERY) / 3, 1.0), HOLD_EVERY))
            inos = [self.srv(ino) for ino in self.orphans]
            for i in range(0, len(inos), HOLD_BATCH):
                batch = inos[i:i + HOLD_BATCH]
                try:
                    await self.client.call("hold_orphans", inos=batch)
                except Exception as e:
                    err = fs_error(e)
                    unknown = err is not None and err.errno == errno.ENOSYS
                    if not (unknown and unknown_logged):
                        log.warning("holding %d files deleted while open here: %s",
                                    len(batch), err.message if err else repr(e))
                    unknown_logged |= unknown
                    break

    # --- metadata ------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> dict[str, Any] | None:
        """The entry's attributes, or None if there is no such entry.

        The kernel may cache a negative answer like a positive one: a create
        by another mount is pushed and invalidates it.
        """
        _check_length(name)
        if name == b".":
            return await self.getattr(parent)
        if name == b"..":
            return await self._parent(parent)
        if self.writeback is not None and (
                e := self.writeback.entry(self.srv(parent), name)) is not None:
            # Changed here, not applied yet: this mount's answer, not the server's.
            return None if e.ino is None else self._out(await self._attr(self.fuse(e.ino)))
        # Known here, as coherent as a listing from the caches: another mount's
        # change of the name or the inode drops them when pushed (a connection
        # lost is connected again in the background, and its subscription brings
        # the changes missed meanwhile). The kernel asks again for an entry it
        # holds after a chmod of a directory (it drops the directory's entry
        # then, and ``tar x`` chmods every directory it makes) or once its
        # timeout passed: answered without the server, so with it out of reach
        # too, and without waiting for a write-back drain.
        names = self.listings.get(parent)
        if names is not None and name not in names:
            return None
        seen = self.dentries.get((parent, name))
        if seen is not None and (attr := self._cached_attr(seen[0])) is not None:
            self._seen_at(parent, name, attr)
            return self._out(attr)
        token = self._drops.now
        try:
            attr = await self.call("lookup", parent=self.srv(parent), name=name)
        except FSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return self._named(parent, name, attr, token)

    async def _parent(self, ino: int) -> dict[str, Any]:
        """The entry ``..`` of directory ``ino``.

        The kernel answers ``..`` itself in a path walk; it asks only to connect
        a directory found by its handle to the tree (``open_by_handle_at``, an
        NFS server re-exporting the mount: FUSE's export support, which pyfuse3
        negotiates), after the mount or the kernel forgot it. Unanswered, a
        directory's handle went stale whenever its dentry was evicted.
        """
        up = ROOT if ino == ROOT else self.parents.get(ino)
        if up is None:
            up = self.fuse((await self.call("entry", ino=self.srv(ino)))["parent"])
        return await self.getattr(up)

    async def getattr(self, ino: int) -> dict[str, Any]:
        return self._out(await self._attr(ino))

    def _cached_attr(self, ino: int) -> dict[str, Any] | None:
        """``_attr`` when it needs no round trip: the cached attributes, or those of a
        file, directory or symlink made here and not on the server yet; else None."""
        attr = self.attrs.get(ino)
        f = self.files.get(ino)
        if attr is None and f is not None and f.creating is not None:
            attr = f.attr   # created here, not on the server yet
        if attr is None and self.writeback is not None:
            attr = self.writeback.made(self.srv(ino))   # a directory made here
        return attr

    async def _attr(self, ino: int) -> dict[str, Any]:
        """``getattr``'s attributes as the server gives them (``_out`` adds this mount's)."""
        attr = self._cached_attr(ino)
        if attr is None:
            token = self._drops.now
            try:
                # Not waiting for journalled setattrs of it (``call``): the
                # server's attributes with them on top (``_out``) are the
                # answer, so a server out of reach fails this within the
                # outage timeout rather than after the drain.
                attr = await self.client.call("getattr", ino=self.srv(ino))
            except FSError as e:
                f = self.files.get(ino)
                if not (e.errno == errno.EIO and self.writeback is not None
                        and f is not None and f.modified):
                    raise
                # A pending file (write-back) while the server is out of
                # reach: shown from its attributes as of its last commit or
                # setattr, which may predate a setxattr (so: xattrs unknown).
                return {**f.attr, "xattrs": True}
            self._fill(attr, token)
        return attr

    async def setattr(self, ino: int, fh: int | None = None, size: int | None = None,
                      **changes: int | None) -> dict[str, Any]:
        """Apply chmod/chown/utimens changes and/or a truncation.

        A truncation through a handle (``ftruncate``) is that handle's write:
        its close commits it and answers for it. One by path (``truncate``)
        is committed before it returns, as a local disk's is durable in the
        page cache at once: no close of another handle (a reader's) would.
        """
        changed = {k: v for k, v in changes.items() if v is not None}
        check_setattr(changed)   # before a truncation: the request fails as a whole
        if size is not None:
            held = self.handles.get(fh) if fh is not None else None
            if held is not None and held.ino == ino:
                # The handle's file as its open adopted it, as a write through
                # it would be: no round trip (an outage does not fail it).
                opened = held
                opened.handles += 1
            else:
                opened = await self._acquire(ino)
            try:
                if stat.S_ISDIR(opened.attr["mode"]):
                    raise FSError(errno.EISDIR, "is a directory")
                if not stat.S_ISREG(opened.attr["mode"]):
                    raise FSError(errno.EINVAL, "not a regular file")
                if opened is not held:   # by path: committed here, its place needed
                    await self._find_place(ino)
                await opened.truncate(size)
                if fh is not None and self.handles.get(fh) is opened:
                    self.writers.add(fh)
                else:
                    await self._flush(opened)
            finally:
                await self._release(opened)
        attr = await self._change(ino, changed)
        f = self.files.get(ino)
        if f is not None and self.writeback is not None and ino in self.writeback.pending:
            # A file whose close is journalled keeps these changes for its
            # commit (deferred ones, its mtime): journalled again, as an fsync
            # would, or a crash loses them (a replayed commit would even undo a
            # utimens the server applied) while a later close returned durable.
            await self.writeback.stage(f)
        return attr

    async def _change(self, ino: int, changes: dict[str, int]) -> dict[str, Any]:
        """``setattr``'s chmod/chown/utimens ``changes`` (none: the attributes)."""
        f = self.files.get(ino)
        if changes and f is None and self.writeback is not None:
            # No file here holds it open (a directory, a symlink, a closed
            # file): journalled, shown at once (``_out``), applied in order.
            # Its attributes (the answer) first: a server out of reach fails
            # this with EIO before anything is journalled, not after. A mode
            # or owner it has already is not journalled (``changing``; its
            # ctime stays, where a local disk's would move).
            attr = await self.getattr(ino)
            changes = changing(attr, changes)
            if not changes:
                return attr
            self.writeback.setattr(self.srv(ino), changes)
            return await self.getattr(ino)
        if f is not None and changes.get("mtime") is not None:
            # The coming commit must not undo utimens: also that of a file
            # created here, whose deferred changes leave mtime to the commit.
            f.set_mtime(changes["mtime"])
        if changes and f is not None and f.creating is not None and self.writeback is not None:
            async with f.lock:
                if f.defer(changes):
                    return await self.getattr(ino)
            # Not deferrable (set-user-ID involved): the server must know the file first.
            await self.writeback.created(f)
        if changes and f is not None and (f.base == 0 or (f.kill_priv and "mode" in changes)):
            # Under the file's lock: no commit carrying deferred changes or
            # ``kill_priv`` is in flight, and none starts before this change is
            # deferred or sent. (Deferred only while the file has no version: a
            # version is never undone.)
            async with f.lock:
                if self.files.get(ino) is f and f.defer(changes):
                    return await self.getattr(ino)
                # Sent now, with any deferred ones (a later commit must not
                # apply those over this).
                attr = await self._setattr(ino, {**f.deferred, **changes})
                f.attrs_sent(attr, "mode" in changes)
                return self._out(attr)
        if changes:
            return self._out(await self._setattr(ino, changes))
        return await self.getattr(ino)

    async def _setattr(self, ino: int, changes: dict[str, int]) -> dict[str, Any]:
        token = self._drops.now
        attr = await self.call("setattr", ino=self.srv(ino), **changes)
        self._fill(attr, token)
        return attr

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        _check_xattr_name(name)
        self.xattr_names.pop(ino, None)
        await self.call("setxattr", ino=self.srv(ino), name=name, value=value)
        self._drop(ino)  # ctime and the has-xattrs flag changed

    def xattr_error(self, ino: int, name: bytes) -> int | None:
        """getxattr's errno when it is known without waiting for anything, else None.

        EOPNOTSUPP for names the file system does not store, ENODATA for names
        this inode is known not to have. The kernel asks before every write
        (security.capability) and ``ls -l`` of each entry (security.selinux,
        system.posix_acl_access, until the first EOPNOTSUPP); the adapter
        answers those from here without a coroutine.
        """
        if not xattr_supported(name):
            return errno.EOPNOTSUPP
        names = self.xattr_names.get(ino)
        return errno.ENODATA if names is not None and name not in names else None

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if (err := self.xattr_error(ino, name)) is not None:
            raise FSError(err, "no such xattr" if err == errno.ENODATA else "unsupported xattr")
        if name not in await self.listxattr(ino):
            raise FSError(errno.ENODATA, "no such xattr")
        return await self.call("getxattr", ino=self.srv(ino), name=name)

    async def listxattr(self, ino: int) -> frozenset[bytes]:
        """The inode's attribute names (without any stored before their name was refused)."""
        names = self.xattr_names.get(ino)
        if names is None:
            names = frozenset(n for n in await self.call("listxattr", ino=self.srv(ino))
                              if xattr_supported(n))
            self.xattr_names[ino] = names
        return names

    async def removexattr(self, ino: int, name: bytes) -> None:
        _check_xattr_name(name)
        self.xattr_names.pop(ino, None)
        await self.call("removexattr", ino=self.srv(ino), name=name)
        self._drop(ino)

    async def readlink(self, ino: int) -> bytes:
        if self.writeback is not None and (
                target := self.writeback.target(self.srv(ino))) is not None:
            return target   # a symlink made here, not on the server yet
        return await self.call("readlink", ino=self.srv(ino))

    async def statfs(self) -> dict[str, int]:
        """Space as the user sees it: the quota, else the block store's disk, else 1 PiB."""
        s = await self.call("statfs")
        if s["quota"]:
            return {"total": s["quota"], "free": max(s["quota"] - s["used"], 0),
                    "inodes": s["inodes"]}
        cap = await trio.to_thread.run_sync(self.cache.store.capacity)
        total, free = cap if cap else (1 << 50, (1 << 50) - s["used"])
        return {"total": total, "free": free, "inodes": s["inodes"]}

    # --- namespace -------------------------------------------------------------------

    async def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                    rdev: int = 0) -> dict[str, Any]:
        _check_length(name)
        if self.writeback is not None and stat.S_ISDIR(mode):
            return await self._mkdir_here(parent, name, mode, uid, gid)
        token = self._drops.now
        attr = self._named(parent, name, await self.call(
            "mknod", parent=self.srv(parent), name=name, mode=mode, uid=uid, gid=gid, rdev=rdev),
            token)
        if stat.S_ISDIR(mode) and self._drops.fresh(("dir", attr["ino"]), token):
            self.listings[attr["ino"]] = set()   # a new directory: empty, and we know it
            self.parents[attr["ino"]] = parent
        self._entries_changed(parent, add=name)
        return attr

    async def _create_here(self, parent: int, name: bytes, mode: int, uid: int, gid: int
                           ) -> OpenFile:
        """A new empty file at ``parent``/``name`` that only this mount knows of, yet.

        Its attributes are what the server's ``mknod`` would make (a set-group-ID
        directory passes its group on); the directory's cached times move as
        the server's will, so that the kernel's getattr of it after the create
        needs no round trip. The kernel has looked the name up (holding the
        directory's lock): it is free as far as this mount knows; if another
        mount took it meanwhile, the drain keeps this file under a conflicted
        name.
        """
        _check_length(name)
        check_setattr({"uid": uid, "gid": gid})   # as the server's mknod: none drains it
        assert self.writeback is not None
        attr = await self._new_here(parent, name, mode, 1, uid, gid)
        ino = attr["ino"]
        f = self.files[ino] = OpenFile(self, ino, attr, [])
        self.writeback.creating(f, self.srv(parent), name, mode, uid, attr["gid"])
        self.names[ino] = (self.srv(parent), name)
        self._shown_here(parent, name, attr)
        return f

    async def _mkdir_here(self, parent: int, name: bytes, mode: int, uid: int, gid: int
                          ) -> dict[str, Any]:
        """A new directory at ``parent``/``name`` that only this mount knows of, yet.

        As ``_create_here`` for a file: a leased number, the attributes the
        server's ``mknod`` will give it (a set-group-ID parent passes its group
        and the bit on), the parent's cached attributes moved as the server's
        will be; journalled as an operation of its own (``WriteBack.mkdir``:
        durable before any file made in it is). Its listing is known (empty), so
        the lookups and creates in it need no round trip either.
        """
        check_setattr({"uid": uid, "gid": gid})
        attr = await self._new_here(parent, name, mode, 2, uid, gid)
        assert self.writeback is not None
        self.writeback.mkdir(self.srv(parent), name, attr)
        self.attrs[attr["ino"]] = attr
        self.listings[attr["ino"]] = set()
        self.parents[attr["ino"]] = parent
        self._shown_here(parent, name, attr, links=1)
        await self.writeback.write_now()
        return self._out(attr)

    def _dir_changed(self, parent: int, now: int, links: int = 0) -> None:
        """An entry was made, moved or removed here in ``parent`` at ``now`` (journalled):
        its times move as the server's will (a journalled utimens of it comes first on
        the server, so its mtime goes too), and its link count by ``links`` (its
        subdirectories made, moved in or out, removed)."""
        # A reply in flight for it predates this: it must not replace the estimate.
        self._drops.drop(parent)
        if (d := self.attrs.get(parent)) is not None:
            self.attrs[parent] = {**d, "mtime": now, "ctime": now,
                                  "nlink": d["nlink"] + links}
        assert self.writeback is not None
        self.writeback.touched(self.srv(parent), now)

    async def _new_here(self, parent: int, name: bytes, mode: int, nlink: int, uid: int,
                        gid: int, size: int = 0) -> dict[str, Any]:
        """The attributes the server's create will give a new inode at ``parent``/``name``
        (checked: ``_new_entry``), under a leased number: a set-group-ID parent passes its
        group on, and to a directory the bit too."""
        p = await self._new_entry(parent, name)
        assert self.writeback is not None
        if p["mode"] & stat.S_ISGID:
            gid = p["gid"]
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        return {"ino": await self.writeback.new_ino(), "mode": mode, "nlink": nlink,
                "uid": uid, "gid": gid, "rdev": 0, "size": size, "atime": now, "mtime": now,
                "ctime": now, "version": 0, "alloc": 0, "xattrs": False}

    def _shown_here(self, parent: int, name: bytes, attr: dict[str, Any], links: int = 0
                    ) -> None:
        """A journalled create or link of ``attr``'s inode at ``parent``/``name``, shown
        at once: the parent's times and link count (``_dir_changed``; ``links``), its
        listing and the entry (no lookup needs the server)."""
        self._dir_changed(parent, attr["ctime"], links)
        self._entries_changed(parent, add=name)
        self.dentries[(parent, name)] = (attr["ino"], stat.S_IFMT(attr["mode"]))

    async def _new_entry(self, parent: int, name: bytes) -> dict[str, Any]:
        """A journalled create's or link's checks of ``parent``/``name`` (ENOTDIR, EEXIST
        as far as this mount knows: ``_taken``); the parent's attributes."""
        p = await self.getattr(parent)
        if not stat.S_ISDIR(p["mode"]):
            raise FSError(errno.ENOTDIR, "not a directory")
        if self._taken(parent, name):
            raise FSError(errno.EEXIST, "entry exists")
        return p

    def _taken(self, parent: int, name: bytes) -> bool:
        """Whether ``parent``/``name`` exists as far as this mount knows without asking
        (its pending changes, else its listing): a local create's EEXIST."""
        assert self.writeback is not None
        e = self.writeback.entry(self.srv(parent), name)
        return e.ino is not None if e is not None else name in self.listings.get(parent, ())

    def _changed_here(self, ino: int) -> dict[bytes, Entry]:
        """This mount's pending name changes in directory ``ino`` (``WriteBack.entries``),
        a copy: taken before the server's listing is asked for (``_overlaid``)."""
        if self.writeback is None:
            return {}
        return dict(self.writeback.entries.get(self.srv(ino), {}))

    async def _overlaid(self, here: dict[bytes, Entry],
                        listing: list[tuple[bytes, dict[str, Any]]]
                        ) -> list[tuple[bytes, dict[str, Any]]]:
        """The server's ``listing`` of a directory with this mount's pending name changes in
        it, ``here`` (``_changed_here``, taken before the listing was asked for): names
        removed or moved away gone, names made or moved here added with their inodes'
        attributes. An operation answered while the listing was on its way is in the
        listing or not; its entry in ``here`` stands for it either way (it names what the
        server holds once it is applied). Read after the listing came, the overlay would
        have lost that entry and a listing from before would show the old name."""
        if not here:
            return listing
        out = [(n, a) for n, a in listing if n not in here]
        for n, e in here.items():
            if e.ino is not None:
                out.append((n, await self._attr(self.fuse(e.ino))))
        return out

    def moved_by_server(self, ino: int, asked: tuple[int, bytes],
                        placed: tuple[int, bytes], what: str = "create") -> None:
        """A create or rename (``what``) of this mount was applied elsewhere than it was
        made (the drain's ``keep``: the name was taken meanwhile, or the directory
        removed): the file is kept there, and the kernel and the caches forget the old
        place."""
        self.names[ino] = placed
        log.warning("%s of inode %d: its name was taken or its directory removed"
                    " meanwhile; the file is kept under another name", what, ino)
        self._place_changed(asked)
        self._place_changed(placed)
        self._forget_listing(self.fuse(ino))   # a directory's '..' may be another
        self._log_conflict({"time": time.time(), "inode": ino, "parent": asked[0],
                            "name": asked[1].decode(errors="replace"),
                            "kept_as": placed[1].decode(errors="replace"),
                            "kept_in": placed[0]})

    def applied(self, ino: int) -> None:
        """A journalled setattr of (server) inode ``ino`` was applied: its cached
        attributes become what this mount showed, the setattr's changes (and any
        still pending after it, shown anyway) on its estimate, as a directory's stay
        its estimate when the creates in it are applied; so neither a getattr nor a
        listing asks the server after the drain (``tar x`` sets the times of every
        directory it made; ``rm -rf`` of the tree then asked for each). Not replaced
        by the answer's: those are the inode's at the setattr, before what was
        journalled after it and applied in the same batch (a directory's new
        subdirectory), which this mount's estimate had counted."""
        key = self.fuse(ino)
        shown = self.attrs.get(key)
        assert self.writeback is not None
        changes = self.writeback.changed(ino)
        # A reply in flight (a getattr or lookup sent before it was applied,
        # which shows the setattr only as long as it is pending) must not
        # fill the cache again with what it saw.
        self._drop(ino)
        if shown is not None and changes:
            self.attrs[key] = self._with_changes(shown, changes)

    def renamed(self, rec: OpRecord, result: dict[str, Any], token: int) -> None:
        """A journalled rename, link, unlink or rmdir ``rec`` was applied (``result``):
        where the server put a renamed file or a new link (``keep``), an inode it left
        without a name purged; the attributes of the inodes it changed are asked again
        (their cached ones predate it, and this mount's estimate goes with the record).
        A link's answer has its inode's attributes: cached, as a sync link's are, unless
        attributes were dropped since the batch was sent (``token``: ``drops`` then), so
        a stat of it needs no round trip (nor the server, through an outage)."""
        a = rec.args
        keys = {"rename": ("new_parent", "new_name"), "link": ("parent", "name")}.get(rec.op)
        if keys is not None and (placed := (result[keys[0]], result[keys[1]])) != (
                asked := (a[keys[0]], a[keys[1]])):
            self.moved_by_server(rec.ino, asked, placed, rec.op)
        if rec.op == "link" and self._fresh(rec.ino, token):
            self._drops.drop(self.fuse(rec.ino))   # a reply in flight is older
            self.attrs[self.fuse(rec.ino)] = {
                k: v for k, v in result.items() if k not in ("dir", "parent", "name")}
        else:
            self._drop(rec.ino, a.get("replaces"))
        self.orphaned(result)

    def unrenamed(self, rec: OpRecord) -> None:
        """A journalled rename, link, unlink or rmdir ``rec`` was refused: the kernel and
        the caches forget what this mount showed at its names and of its inodes."""
        self._drop(rec.ino, rec.args.get("replaces"))
        self._forget_listing(self.fuse(rec.ino))   # a directory's '..' shown here
        self._place_changed((rec.args["parent"], rec.args["name"]))
        if rec.op == "rename":
            self._place_changed((rec.args["new_parent"], rec.args["new_name"]))

    def refused(self, ino: int) -> None:
        """A journalled setattr of (server) inode ``ino`` was refused: shown as the server's."""
        self._drop(ino)
        self._invalidate(("inode", self.fuse(ino)))

    def uncreated(self, ino: int, parent: int, name: bytes) -> None:
        """A create of this mount was refused; its bytes are saved aside: the name goes."""
        self._place_changed((parent, name))
        self._entries_changed(self.fuse(parent), remove=name)
        self._forget_listing(self.fuse(ino))

    def _place_changed(self, place: tuple[int, bytes]) -> None:
        parent = self.fuse(place[0])
        self._drop(place[0])
        self._forget_listing(parent)
        self.dentries.pop((parent, place[1]), None)
        self._invalidate(("entry", parent, place[1]))
        self._invalidate(("inode", parent))

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int
                      ) -> dict[str, Any]:
        _check_length(name)
        if self.writeback is not None:
            return await self._symlink_here(parent, name, target, uid, gid)
        token = self._drops.now
        attr = self._named(parent, name, await self.call(
            "symlink", parent=self.srv(parent), name=name, target=target, uid=uid, gid=gid),
            token)
        self._entries_changed(parent, add=name)
        return attr

    async def _symlink_here(self, parent: int, name: bytes, target: bytes, uid: int, gid: int
                            ) -> dict[str, Any]:
        """A new symlink at ``parent``/``name`` that only this mount knows of, yet: as a
        directory's ``_mkdir_here`` (a leased number, the attributes the server's
        ``symlink`` will give it, journalled; ``readlink`` answered from the record)."""
        if len(target) > 4095:
            raise FSError(errno.ENAMETOOLONG, "symlink target too long")
        check_setattr({"uid": uid, "gid": gid})
        attr = await self._new_here(parent, name, stat.S_IFLNK | 0o777, 1, uid, gid,
                                    len(target))
        assert self.writeback is not None
        self.writeback.symlink(self.srv(parent), name, target, attr)
        self.attrs[attr["ino"]] = attr
        self._shown_here(parent, name, attr)
        await self.writeback.write_now()
        return self._out(attr)

    async def link(self, ino: int, parent: int, name: bytes) -> dict[str, Any]:
        _check_length(name)
        if self.writeback is not None:
            return await self._link_here(ino, parent, name)
        token = self._drops.now
        attr = self._named(parent, name, await self.call(
            "link", ino=self.srv(ino), parent=self.srv(parent), name=name), token)
        self._entries_changed(parent, add=name)
        return attr

    async def _link_here(self, ino: int, parent: int, name: bytes) -> dict[str, Any]:
        """link(2) journalled (write-back): checked against this mount's view (EPERM for a
        directory, ENOENT for an inode without a name any more, EEXIST, ENOTDIR), shown at
        once (the name, the link count and ctime), applied in journal order after the
        inode's create if it was made here; with ``keep`` (a name another mount took
        meanwhile gets the conflicted copy's name; an inode deleted meanwhile: refused
        and logged, the name goes)."""
        assert self.writeback is not None
        attr = await self.getattr(ino)
        if stat.S_ISDIR(attr["mode"]):
            raise FSError(errno.EPERM, "hard link to a directory")
        if attr["nlink"] == 0:
            raise FSError(errno.ENOENT, "file was removed")
        await self._new_entry(parent, name)
        await self._journalled(attr)
        now = time.time_ns()
        self.writeback.link(self.srv(ino), self.srv(parent), name, now)
        self._shown_here(parent, name, {**attr, "ino": ino, "ctime": now})
        await self.writeback.write_now()
        return await self.getattr(ino)

    async def unlink(self, parent: int, name: bytes) -> None:
        _check_length(name)
        if self.writeback is not None:
            await self._unlink_here(parent, name)
            return
        token = self._drops.now
        r = await self.call("unlink", parent=self.srv(parent), name=name)
        self._fill(r["dir"], token)
        self._drop(r["ino"])  # its nlink and ctime changed
        self._entries_changed(parent, remove=name)
        self.orphaned(r)

    async def _unlink_here(self, parent: int, name: bytes) -> None:
        """unlink(2) journalled (write-back): checked against this mount's view, shown at
        once (the name gone, the inode's link count), applied in journal order."""
        assert self.writeback is not None
        attr = await self._find(parent, name)
        if attr is None:
            raise FSError(errno.ENOENT, "no such entry")
        if stat.S_ISDIR(attr["mode"]):
            raise FSError(errno.EISDIR, "is a directory")
        await self._journalled(attr)
        now = time.time_ns()
        self.writeback.unlink(self.srv(parent), name, self.srv(attr["ino"]), now)
        self._dir_changed(parent, now)
        self._entries_changed(parent, remove=name)
        await self.writeback.write_now()

    async def _find(self, parent: int, name: bytes) -> dict[str, Any] | None:
        """``lookup`` for a journalled rename or unlink (the entry's inode and type at
        least), without a round trip for an entry seen here (``dentries``): it returns
        while the server is out of reach. If another mount changed the entry meanwhile and
        the push has not come yet, the server refuses the operation (ESTALE: nothing
        changes)."""
        assert self.writeback is not None
        if self.writeback.entry(self.srv(parent), name) is None:
            seen = self.dentries.get((parent, name))
            if seen is not None:
                return self.attrs.get(seen[0]) or {"ino": seen[0], "mode": seen[1]}
        return await self.lookup(parent, name)

    async def _journalled(self, *attrs: dict[str, Any] | None) -> None:
        """The files among ``attrs`` created here have their create journalled (staged, as
        a close would), so that a rename or unlink journalled next reaches the server
        after it."""
        assert self.writeback is not None
        for attr in attrs:
            f = self.files.get(attr["ino"]) if attr is not None else None
            if f is not None and f.creating is not None and f.ino not in self.writeback.pending:
                await self.writeback.stage(f)

    async def _empty(self, ino: int) -> bool:
        """Whether directory ``ino`` has no entries, as this mount shows it."""
        names = self.listings.get(ino)
        if names is None:
            here = self._changed_here(ino)
            names = {n for n, _ in await self._overlaid(here, await self._listing(ino))}
        return not names - {b".", b".."}

    async def rmdir(self, parent: int, name: bytes) -> None:
        _check_length(name)
        if self.writeback is not None:
            await self._rmdir_here(parent, name)
            return
        token = self._drops.now
        r = await self.call("rmdir", parent=self.srv(parent), name=name)
        self._fill(r["dir"], token)
        self._drop(r["ino"])
        self._entries_changed(parent, remove=name)

    async def _rmdir_here(self, parent: int, name: bytes) -> None:
        """rmdir(2) journalled (write-back): no wait for the drain.

        Checked against this mount's view (the server's would miss what is
        pending here): ENOENT, ENOTDIR, ENOTEMPTY (the server's listing, which
        ``_empty`` may fetch, less the names removed here, plus those made
        here); the kernel has answered EBUSY for a mount point and EINVAL for
        '.' before asking. Shown at once (the name gone, the parent's link
        count and times). Journalled after the operations on its entries
        (their unlinks, renames out, the creates in it), so the server applies
        it after them; if another mount put an entry in it meanwhile the
        server refuses it (ENOTEMPTY): the directory and that entry show again.
        """
        assert self.writeback is not None
        attr = await self._find(parent, name)
        if attr is None:
            raise FSError(errno.ENOENT, "no such entry")
        if not stat.S_ISDIR(attr["mode"]):
            raise FSError(errno.ENOTDIR, "not a directory")
        if not await self._empty(attr["ino"]):
            raise FSError(errno.ENOTEMPTY, "directory not empty")
        now = time.time_ns()
        self.writeback.rmdir(self.srv(parent), name, self.srv(attr["ino"]))
        self._dir_changed(parent, now, links=-1)
        self._entries_changed(parent, remove=name)
        self._forget_listing(attr["ino"])
        await self.writeback.write_now()

    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     flags: int) -> None:
        _check_length(name, new_name)
        if self.writeback is not None:
            await self._rename_here(parent, name, new_parent, new_name, flags)
            return
        token = self._drops.now
        r = await self.call("rename", parent=self.srv(parent), name=name,
                            new_parent=self.srv(new_parent), new_name=new_name, flags=flags)
        for d in r["dirs"]:
            self._fill(d, token)
        self._drop(r["ino"], r["replaced"])  # their ctime (and nlink) changed
        # A moved directory's '..' changed, a replaced one is gone.
        self._forget_listing(*(self.fuse(i) for i in (r["ino"], r["replaced"]) if i is not None))
        exchange = bool(flags & RENAME_EXCHANGE)   # keeps both names
        self._entries_changed(parent, remove=None if exchange else name)
        self._entries_changed(new_parent, add=None if exchange else new_name)
        # The inodes at both names changed (a replaced or exchanged one was cached
        # there: listed at the name, the kernel then read its bytes there): asked
        # again by the next listing or lookup.
        self.dentries.pop((new_parent, new_name), None)
        self.dentries.pop((parent, name), None)
        self.orphaned(r)
        if r["ino"] is not None:
            self.names[self.fuse(r["ino"])] = (self.srv(new_parent), new_name)

    async def _rename_here(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                           flags: int) -> None:
        """rename(2) journalled (write-back): no wait for the drain.

        Checked against this mount's view (its pending changes over the
        server's entries, which a lookup may still fetch) with rename(2)'s
        errors: ENOENT, EEXIST (RENAME_NOREPLACE), ENOTDIR/EISDIR, ENOTEMPTY;
        the kernel has answered EINVAL for a directory into its own subtree
        and EBUSY for '.' and '..' before asking. Shown at once (the names,
        the replaced inode's link count, the directories' times and links);
        what only the server can decide later (a name another mount changed
        meanwhile) follows ``namespace.rename``'s ``keep``.
        """
        assert self.writeback is not None
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FSError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        src = await self._find(parent, name)
        if src is None:
            raise FSError(errno.ENOENT, "no such entry")
        dst = await self._find(new_parent, new_name)
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and dst is None:
            raise FSError(errno.ENOENT, "exchange target does not exist")
        if dst is not None and flags & RENAME_NOREPLACE:
            raise FSError(errno.EEXIST, "target exists")
        src_dir = stat.S_ISDIR(src["mode"])
        dst_dir = dst is not None and stat.S_ISDIR(dst["mode"])
        if dst is not None and not exchange:
            if src_dir and not dst_dir:
                raise FSError(errno.ENOTDIR, "target is not a directory")
            if dst_dir and not src_dir:
                raise FSError(errno.EISDIR, "target is a directory")
            if dst_dir and not await self._empty(dst["ino"]):
                raise FSError(errno.ENOTEMPTY, "directory not empty")
        if dst is not None and dst["ino"] == src["ino"]:
            return   # two names of one inode: rename(2) does nothing
        await self._journalled(src, dst)
        now = time.time_ns()
        self.writeback.rename(
            (self.srv(parent), name, self.srv(new_parent), new_name), flags,
            self.srv(src["ino"]), None if dst is None else self.srv(dst["ino"]), now)
        moved = src_dir - dst_dir   # subdirectories moved from parent to new_parent
        self._dir_changed(parent, now, -moved if exchange else -src_dir)
        self._dir_changed(new_parent, now, moved)
        if not exchange:   # an exchange keeps both names
            self._entries_changed(parent, remove=name)
            self._entries_changed(new_parent, add=new_name)
        self.dentries[(new_parent, new_name)] = (src["ino"], stat.S_IFMT(src["mode"]))
        if src_dir:
            self.parents[src["ino"]] = new_parent
        if exchange:
            assert dst is not None
            self.dentries[(parent, name)] = (dst["ino"], stat.S_IFMT(dst["mode"]))
            if dst_dir:
                self.parents[dst["ino"]] = parent
        elif dst_dir:
            assert dst is not None
            self._forget_listing(dst["ino"])   # replaced: gone
        await self.writeback.write_now()

    # --- directories -------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        """A directory handle; its listing is read by the first ``readdir``.

        The kernel opens only inodes it knows as directories, and an inode's
        type never changes: the check is made when the attributes are cached,
        and the server is not asked for them (``rm -rf`` opens each directory
        twice). A directory removed meanwhile by another mount fails at its
        listing (ENOENT) instead.
        """
        attr = self._cached_attr(ino)
        if attr is not None and not stat.S_ISDIR(attr["mode"]):
            raise FSError(errno.ENOTDIR, "not a directory")
        fh = next(self._fh)
        self.dirs[fh] = [ino, None]
        return fh

    async def readdir(self, fh: int, start: int) -> list[tuple[bytes, dict[str, Any]]]:
        """Entries from index ``start``; the listing is read once per opendir.

        From the caches when they hold it whole (``_known_listing``), else
        from the server (``_fetched_listing``), which fills them: so ``rm -rf``
        (fts opens each directory twice and reads it three times) and ``ls``
        after ``ls`` ask the server once per directory at most, and a tree
        made here not at all.
        """
        d = self.dirs[fh]
        if d[1] is None or start == 0:
            listing = self._known_listing(d[0])
            if listing is None:
                listing = await self._fetched_listing(d[0])
            d[1] = [(n, self._out(a)) for n, a in listing]
        return d[1][start:]

    async def _fetched_listing(self, ino: int) -> list[tuple[bytes, dict[str, Any]]]:
        """Directory ``ino``'s listing from the server, with this mount's pending changes
        (``_overlaid``); what it holds is cached unless dropped while it was on its way
        (``_drops``): each entry's attributes, and the names with their inodes and the
        '..' as the complete listing ``_known_listing`` answers from."""
        token = self._drops.now
        here = self._changed_here(ino)
        listing = await self._listing(ino)
        fresh = self._drops.fresh(("dir", ino), token)
        for n, a in listing:
            self._fill(a, token)
            if n == b"..":
                if fresh:
                    self.parents[ino] = self.fuse(a["ino"])
            elif n != b"." and n not in here and fresh:
                self.dentries[(ino, n)] = (self.fuse(a["ino"]), stat.S_IFMT(a["mode"]))
                self._seen_at(ino, n, a)
                if stat.S_ISDIR(a["mode"]) and self._drops.fresh(("dir", a["ino"]), token):
                    self.parents[self.fuse(a["ino"])] = ino
        listing = await self._overlaid(here, listing)
        # Asked again: ``_overlaid`` may have waited for the server (an entry changed
        # here whose attributes are not cached), and a push may have come meanwhile.
        if self._drops.fresh(("dir", ino), token) and len(listing) < MAX_LISTED:
            self.listings[ino] = {n for n, _ in listing} - {b".", b".."}
        return listing

    def _known_listing(self, ino: int) -> list[tuple[bytes, dict[str, Any]]] | None:
        """Directory ``ino``'s listing from the caches, or None if they miss any of it: its
        names (``listings``: complete, this mount's own changes in), each name's inode
        (this mount's pending change of it, else ``dentries``), the attributes of each
        and of the directory and its parent (``_cached_attr``: those of an inode changed
        by another mount are dropped when its push comes, and the listing asks the
        server again).

        Coherent as the cached lookups are: another mount's change shows once its push
        arrived (``apply_changes`` drops the directory's listing, or the changed
        inode's attributes), this mount's own at once; a change log reset drops all."""
        names = self.listings.get(ino)
        up = ROOT if ino == ROOT else self.parents.get(ino)
        if names is None or up is None:
            return None
        me, above = self._cached_attr(ino), self._cached_attr(up)
        if me is None or above is None:
            return None
        out = [(b".", me), (b"..", above)]
        for n in names:
            e = self.writeback.entry(self.srv(ino), n) if self.writeback is not None else None
            if e is not None:
                if e.ino is None:
                    continue   # removed here: not in ``names`` (defensive)
                child: int | None = self.fuse(e.ino)
            else:
                child = self.dentries.get((ino, n), (None, 0))[0]
            a = self._cached_attr(child) if child is not None else None
            if a is None:
                return None
            out.append((n, a))
        return out

    async def _listing(self, ino: int) -> list[tuple[bytes, dict[str, Any]]]:
        """The server's listing of ``ino``; of a directory made here and not on the server
        yet, its own: the server knows nothing in it (``_overlaid`` adds the rest).

        Not waiting for the journalled operations naming ``ino`` (``call``): its
        create is answered here, the names changed in it are the overlay's and
        its attributes' pending changes are put on top (``_out``), so the
        server's listing as it is now is the answer. (Waiting made a listing
        right after ``tar x`` wait for the drain of its directory's utimens.)"""
        rec = self.writeback.new.get(self.srv(ino)) if self.writeback is not None else None
        if rec is None:
            return await self.client.call("readdir", ino=self.srv(ino))
        assert self.writeback is not None
        up = rec.args["parent"]
        me = self.attrs.get(ino) or rec.local   # this mount's estimate, kept up to date
        return [(b".", me), (b"..", self.attrs.get(self.fuse(up)) or self.writeback.made(up)
                             or me)]

    def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self) -> None:
        """fsync of a directory: the namespace operations made before it are durable.

        A sync mount's are on the server once they return. A write-back
        mount's journalled ones (mkdir, setattr) join a group commit that may
        not be written yet: written now. (Not answered, the kernel would take
        ENOSYS for success from then on, with nothing made durable.)
        """
        if self.writeback is not None:
            await self.writeback.journal.sync()

    # --- files ---------------------------------------------------------------------------

    async def _acquire(self, ino: int, read: bool = False) -> OpenFile:
        """The OpenFile of ``ino`` with a handle counted, at the server's current version.

        Close-to-open: unless this mount holds unflushed changes, every open
        adopts the newest committed version, whatever other mounts did.
        ``read``: the server updates atime (relatime) in the same call.
        """
        f = self.files.get(ino)
        if f is None or not f.modified:
            token = self._drops.now
            r = await self.call("open", ino=self.srv(ino), read=read)
            self._fill(r["attr"], token)
            f = self.files.get(ino)  # another task may have loaded it meanwhile
            if f is None:
                f = self.files[ino] = OpenFile(self, ino, r["attr"], r["extents"])
            elif not f.modified and f.base != r["attr"]["version"]:
                async with f.lock:
                    if not f.modified:
                        f.reset(r["attr"], r["extents"])
        f.handles += 1
        return f

    async def _release(self, f: OpenFile) -> None:
        f.handles -= 1
        if f.handles:
            return
        try:
            await self._settle(f)
        finally:
            # Changes neither committed nor saved (a full disk) keep the file
            # open on this mount: the next last close or the unmount saves them.
            # So do journalled ones, until the drainer commits them.
            if self.forget(f):
                self.purge_soon(self.srv(f.ino))

    def forget(self, f: OpenFile) -> bool:
        """Drop ``f`` if no handle has it open and nothing of it is uncommitted.

        Returns whether its inode, deleted while open, is to be purged now.
        """
        if f.handles or self.files.get(f.ino) is not f or f.modified:
            return False
        del self.files[f.ino]
        self.names.release(f.ino)
        f.close()
        if f.ino not in self.orphans:
            return False
        self.orphans.discard(f.ino)
        return True

    async def _settle(self, f: OpenFile) -> None:
        """Commit ``f``'s changes that no handle will flush any more (last release, unmount).

        Never behind an application's back: changes whose flush answered an
        application an error (``failed``) are not committed later; they, and
        changes whose commit fails here (no application to answer), are saved
        as a recovery file instead of dropped (README, Durability).
        """
        if f.modified and not f.failed:
            try:
                await (self.writeback.stage(f) if self.writeback else self._commit(f))
                return
            except Exception as e:
                log.error("commit of inode %d at its last close failed: %s", f.ino,
                          fs_error(e) or e)
        if f.modified:
            await self._recover(f)

    async def _recover(self, f: OpenFile) -> None:
        """Save ``f`` as this mount shows it under ``recovered/``, listed by ``nimbusfs status``.

        Then the file is its committed version again, here and in the kernel's
        caches (which showed the uncommitted size and bytes). If the file
        cannot be saved (its disk is full too), the changes stay staged.
        """
        async with f.lock:  # no write or flush while it is saved and dropped
            await self._save_aside(f)

    async def save_aside(self, f: OpenFile) -> bool:
        """``_recover`` with the file's lock held (a refused write-back commit); whether saved."""
        await self._save_aside(f)
        return not f.modified or f.handles > 0

    def committed(self, f: OpenFile, conflict: bool, token: int) -> None:
        """The drainer committed ``f``: the kernel and the caches see the server's version.

        The commit's attributes are cached (a ``stat`` needs no round trip)
        unless some cached attributes were dropped since the batch was sent
        (``token``: ``drops`` then): the answer may predate that change. Then
        attributes cached since of this version or a later one stay: they are
        newer than the commit's (a link of the file applied after it in the same
        batch, whose answer came first); older ones go (an estimate from before
        the commit). Dropping those too left a file and its link drained
        together without attributes, their directory's listing not whole in the
        caches, and unreadable with the server out of reach.
        """
        if conflict:  # the file shows the other writer's version now
            self._drop(f.ino)
            self._invalidate(("inode", f.ino))
            return
        self.page_version[f.ino] = f.base
        if self._drops.fresh(f.ino, token):
            self._drops.drop(f.ino)   # a reply in flight (a getattr) is older
            self.attrs[f.ino] = f.attr
        elif (since := self.attrs.get(f.ino)) is None or since["version"] < f.attr["version"]:
            self.attrs.pop(f.ino, None)

    async def _save_aside(self, f: OpenFile) -> None:
        """``_recover``'s work, under the file's lock."""
        parent, name = self.names.place(f.ino) or (self.root, b"?")
        path = os.path.join(self.state_dir, "recovered",
                            f"{f.ino}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            await f.save(path)
        except Exception as e:
            log.error("uncommitted bytes of %r (inode %d) not saved to %s: %s; they stay staged"
                      " on this mount (lost if it stops before they are saved)",
                      name, f.ino, path, fs_error(e) or e)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
        log.warning("uncommitted bytes of %r (inode %d) saved to %s", name, f.ino, path)
        try:
            with open(os.path.join(self.state_dir, "recovered.jsonl"), "a") as out:
                out.write(json.dumps({"time": time.time(), "inode": f.ino, "parent": parent,
                                      "name": name.decode(errors="replace"), "path": path,
                                      "size": f.size}) + "\n")
        except OSError as e:
            log.error("%s not listed for nimbusfs status: %s", path, e)
        if f.handles:
            # Opened again while it was saved (an editor retrying its save): the
            # new handle showed and took over these bytes; its close commits them.
            log.warning("inode %d was opened again while saved: its changes stay staged",
                        f.ino)
            f.failed = False
            return
        f.discard()
        self._drop(f.ino)
        self._invalidate(("inode", f.ino))

    async def open(self, ino: int, flags: int, uid: int) -> tuple[int, bool]:
        """Open a file; return the handle and whether the kernel may keep its page cache."""
        f = await self._acquire(ino, read=(flags & os.O_ACCMODE) != os.O_WRONLY)
        try:
            if not stat.S_ISREG(f.attr["mode"]):
                raise FSError(errno.EINVAL, "not a regular file")
            truncated = flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY
            if (flags & os.O_ACCMODE) != os.O_RDONLY:
                await self._find_place(ino)   # before the truncation: a failure changes nothing
            if truncated:
                await f.truncate(0)
            keep = self.page_version.get(ino) == f.base and not f.modified
            if not keep:
                # The kernel reads no further than the size it has cached,
                # which may be from before the version this open adopted: the
                # push that invalidates it can still be on its way (close on
                # A, open on B read short under load). Its cached attributes
                # go now; the page cache goes with the reply (no keep_cache).
                try:
                    await trio.to_thread.run_sync(self.kernel.invalidate_attr, ino)
                except OSError:
                    pass  # the kernel holds nothing for it
        except BaseException:
            await self._release(f)
            raise
        self.page_version[ino] = f.base
        fh = self._handle(f, uid)
        if truncated:
            self.writers.add(fh)
            self.truncating.add(fh)
        return fh, keep

    async def _find_place(self, ino: int) -> None:
        """Before a change to ``ino`` (an open for writing, a truncation by path):
        ask the server where it is if this mount does not know.

        A file opened by its handle (an NFS server re-exporting the mount does
        so, ``open_by_handle_at``) was never looked up by this mount, nor one
        whose place was forgotten (``names`` is bounded). Written, and deleted
        meanwhile by another mount, its commit would name no place, and the
        server would take the deletion for this mount's own: its bytes lost
        with the deleted inode rather than saved as a conflicted copy.
        """
        if self.names.place(ino) is not None:
            return
        try:
            e = await self.call("entry", ino=self.srv(ino))
        except FSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOSYS):
                raise
            return   # deleted already (nothing names it), or a server without ``entry``
        if e["parent"] is not None and self.names.place(ino) is None:   # not moved here meanwhile
            self.names[ino] = (e["parent"], e["name"])

    def _handle(self, f: OpenFile, uid: int) -> int:
        fh = next(self._fh)
        self.handles[fh] = f
        if uid == 0:
            self.privileged.add(fh)
        return fh

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
                     gid: int) -> tuple[int, dict[str, Any]]:
        """Create and open a new file: its first (empty) version needs no ``open`` call.

        In write-back mode the file is created here, under a leased inode
        number, and journalled with its first close (``WriteBack.creating``).
        """
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        if self.writeback is not None:
            f = await self._create_here(parent, name, mode, uid, gid)
            attr = self._out(f.attr)
        else:
            attr = await self.mknod(parent, name, mode, uid, gid)
            f = self.files[attr["ino"]] = OpenFile(self, attr["ino"], attr, [])
        f.handles += 1
        self.page_version[f.ino] = f.base
        fh = self._handle(f, uid)
        self.writers.add(fh)  # a new file: its (empty) first version is this handle's
        return fh, attr

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.handles[fh].read(off, size)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        # Like Linux, a write by anyone but root drops set-user-ID/set-group-ID.
        self.writers.add(fh)
        if self.writeback is not None:
            await self.writeback.room()  # past the write-back limit: wait for the drainer
        return await self.handles[fh].write(off, data, kill_priv=fh not in self.privileged)

    async def flush(self, fh: int, sync: bool = False) -> None:
        """A handle's close, or its fsync (``sync``): commit the file's changes.

        A close commits only if its handle wrote: a reader's close commits
        nothing and cannot fail for another handle's writes. An fsync syncs the
        file whatever handle it names, as on Linux (``sync FILE`` opens it to
        read).

        One save, one version: the kernel flushes at every close, also of a
        descriptor that has a duplicate: a shell saving ``echo x > f`` opens
        with O_TRUNC, moves the descriptor to 1 and closes the original before
        writing. That flush commits the empty file (a close must: ``: > f`` is
        a save too, and another mount's open must see it); the handle's next
        commit replaces that empty version instead of adding one after it.
        """
        if not (sync or fh in self.writers):
            return
        f = self.handles[fh]
        committing = f.modified
        await self._flush(f, self.emptied.get(fh))
        if committing:
            self.emptied.pop(fh, None)
            if fh in self.truncating and f.size == 0:
                self.emptied[fh] = f.base
            self.truncating.discard(fh)

    async def _flush(self, f: OpenFile, amend: int | None = None) -> None:
        """Commit ``f`` for an application, which gets the error if it fails.

        A failed flush keeps the changes staged, marked ``failed``: a later
        flush by a writer retries them; none is made behind the application's
        back (``_settle``). ``amend``: see ``flush``.
        """
        try:
            if self.writeback is not None:
                await self.writeback.stage(f)  # durable here; committed by the drainer
                return
            await self._commit(f, amend)
        except Exception as e:
            f.failed = f.modified
            log.warning("flush of %r (inode %d) failed: %s; its changes stay staged",
                        (self.names.place(f.ino) or (0, b"?"))[1], f.ino, fs_error(e) or e)
            raise
        self.page_version[f.ino] = f.base

    async def _commit(self, f: OpenFile, amend: int | None = None) -> None:
        """Flush ``f``; a commit's reply becomes the inode's cached attributes."""
        token, committing = self._drops.now, f.modified
        await f.flush(amend)
        if committing:
            self._fill(f.attr, token)

    async def release(self, fh: int) -> None:
        self.privileged.discard(fh)
        self.writers.discard(fh)
        self.truncating.discard(fh)
        self.emptied.pop(fh, None)
        await self._release(self.handles.pop(fh))

    async def flush_all(self, give_up: float | None = None) -> bool:
        """Commit every open file, or save it as a recovery file (before unmount).

        In write-back mode: journal them, then wait for the drainer until
        nothing is pending, or ``give_up`` seconds pass without progress
        (the journal keeps the rest for the next mount). Whether all is
        committed. Then the orphans queued are purged (``purged``, as long).
        """
        for f in list(self.files.values()):
            if f.modified:
                await self._settle(f)
        if self.writeback is None:
            await self.purged(give_up)
            return True
        n, size = len(self.writeback.pending), self.writeback.bytes
        if n:
            log.info("draining %d pending files (%.1f MiB) before unmounting", n, size / 2**20)
        if await self.writeback.drained(give_up):
            await self.purged(give_up)
            return True
        log.error("%d files (%.1f MiB) not committed: the metaserver or the store does not"
                  " answer; they stay in the journal, committed at the next mount of this"
                  " cache directory", len(self.writeback.pending), self.writeback.bytes / 2**20)
        return False
