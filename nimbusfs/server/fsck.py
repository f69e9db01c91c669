"""fsck: check the database against itself and against the block store; repair what can be.

What is checked (``check``), each in plain words in the report:

- every block a kept version references has a row and is in the store (with
  ``verify_blocks``, its bytes hash to its name);
- ``blocks.refcount`` equals the references the kept versions hold;
- the link count of a file equals its entries, of a directory 2 + its
  subdirectories;
- no entry names an inode that does not exist, or a parent that is not a
  directory;
- every inode with links is reachable from its volume's root; an inode
  without links (an *orphan*) is kept only while a mount may hold it open;
- a volume's used bytes equal the sum of its files' current sizes;
- every file's current version exists.

The server does not know for sure which orphans are open: a mount that
unlinks an open file keeps the inode (``nlink`` 0), holds it while it is
open (``hold_orphans``) and calls ``purge`` after its last close; a mount
that died first leaves the orphan behind. An orphan is reported as one a
live mount may have open while it was orphaned (its ctime) or last held
less than ``ORPHAN_AGE`` ago, and as left behind after that (block GC
purges those on its own, each round).

``repair`` fixes what needs no guess: reference counts, link counts and
used bytes are recounted; entries that point nowhere are removed; orphans
left behind (older than ``ORPHAN_AGE``) are purged (their blocks go to GC);
a version that needs a lost or corrupt block is marked damaged
(``versions.damaged``): reading it is EIO with a log line, never other bytes
or a silently shorter file, and fsck keeps listing it until a newer version
replaces it or it is deleted. Unreachable inodes and current versions that
do not exist are reported for a person to decide.

The counts are read in one snapshot (REPEATABLE READ); repairs are deltas
applied under row locks (``refcount = refcount + d``), so an operation that
ran between the two is not undone. fsck is still best run on a quiet
system: a commit between the snapshot and the store listing can show a
block as missing that is not.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from psycopg import Cursor

from nimbusfs.blockstore.base import BlockNotFound, BlockStore, block_hash
from nimbusfs.server.db import Database
from nimbusfs.server.namespace import ORPHAN_AGE, ORPHAN_SINCE, purge_orphans

log = logging.getLogger(__name__)


@dataclass
class Fault:
    kind: str          # missing_block, corrupt_block, refcount, nlink, dangling_entry, ...
    message: str
    repaired: bool = False

    def __str__(self) -> str:
        return self.message + (" (repaired)" if self.repaired else "")


@dataclass
class Snapshot:
    """What fsck read from the database, in one snapshot."""

    refs: Counter[bytes] = field(default_factory=Counter)          # block -> references
    sizes: dict[bytes, int] = field(default_factory=dict)          # block -> size in extents
    users_of: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)  # -> versions
    damaged: set[tuple[int, int]] = field(default_factory=set)      # (inode, version) marked
    rows: dict[bytes, tuple[int, str]] = field(default_factory=dict)  # block -> refcount, state
    nlink: list[tuple[int, int, int]] = field(default_factory=list)  # inode, nlink, counted
    dangling: list[tuple[int, bytes, int, str]] = field(default_factory=list)
    orphans: list[tuple[int, int, float]] = field(default_factory=list)  # inode, owner, age s
    unreachable: list[tuple[int, int]] = field(default_factory=list)     # inode, owner
    used: list[tuple[int, str, int, int]] = field(default_factory=list)  # id, name, has, sum
    no_version: list[tuple[int, int]] = field(default_factory=list)      # inode, version


def _read(cur: Cursor) -> Snapshot:
    cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    # Counting a large database's rows here between statements takes longer
    # than the pool's limit on an idle transaction (``db.IDLE_IN_TRANSACTION_MS``,
    # meant for a hung server): it would end the snapshot midway.
    cur.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
    s = Snapshot()
    cur.execute("SELECT inode, version, extents, damaged FROM versions")
    for ino, version, ext, damaged in cur:
        if damaged:
            s.damaged.add((ino, version))
        for k, n in msgpack.unpackb(ext):
            if k is not None:
                k = bytes(k)
                s.refs[k] += 1
                s.sizes[k] = n
                s.users_of.setdefault(k, []).append((ino, version))
    cur.execute("SELECT hash, refcount, state FROM blocks")
    s.rows = {bytes(k): (n, state) for k, n, state in cur}
    # Files: one link per entry; directories: 2 + subdirectories (entries of
    # directories in them). Orphans (nlink 0, no entry) agree.
    cur.execute(
        "SELECT i.id, i.nlink, CASE WHEN i.mode & 61440 = 16384 THEN 2 + (SELECT count(*)"
        " FROM dentries d JOIN inodes c ON c.id = d.inode WHERE d.parent = i.id"
        " AND c.mode & 61440 = 16384) ELSE (SELECT count(*) FROM dentries d"
        " WHERE d.inode = i.id) END FROM inodes i")
    s.nlink = [r for r in cur.fetchall() if r[1] != r[2] and not (
        r[1] == 0 and r[2] == 0)]
    cur.execute("SELECT d.parent, d.name, d.inode, CASE WHEN c.id IS NULL THEN 'inode'"
                " ELSE 'parent' END FROM dentries d LEFT JOIN inodes c ON c.id = d.inode"
                " LEFT JOIN inodes p ON p.id = d.parent"
                " WHERE c.id IS NULL OR p.id IS NULL OR p.mode & 61440 <> 16384")
    s.dangling = [(p, bytes(n), i, what) for p, n, i, what in cur.fetchall()]
    cur.execute("SELECT id, owner_id, extract(epoch FROM now())::float8"
                f" - {ORPHAN_SINCE} / 1e9 FROM inodes WHERE nlink = 0 AND NOT EXISTS"
                " (SELECT 1 FROM dentries d WHERE d.inode = inodes.id)")
    s.orphans = cur.fetchall()
    cur.execute(
        "WITH RECURSIVE r(id) AS (SELECT root_inode FROM users WHERE root_inode IS NOT NULL"
        " UNION SELECT d.inode FROM dentries d JOIN r ON d.parent = r.id)"
        " SELECT i.id, i.owner_id FROM inodes i WHERE i.nlink > 0"
        " AND NOT EXISTS (SELECT 1 FROM r WHERE r.id = i.id)")
    s.unreachable = cur.fetchall()
    cur.execute("SELECT u.id, u.name, u.used_bytes, coalesce((SELECT sum(i.size) FROM inodes i"
                " WHERE i.owner_id = u.id AND i.mode & 61440 = 32768), 0)::bigint FROM users u")
    s.used = [r for r in cur.fetchall() if r[2] != r[3]]
    cur.execute("SELECT i.id, i.version FROM inodes i WHERE i.version > 0 AND NOT EXISTS"
                " (SELECT 1 FROM versions v WHERE v.inode = i.id AND v.version = i.version)")
    s.no_version = cur.fetchall()
    return s


# --- repairs, each one transaction ---------------------------------------------------

def _recount_blocks(cur: Cursor, deltas: dict[bytes, int], sizes: dict[bytes, int]) -> None:
    """Add the references the versions hold and the rows do not count (or remove extra).

    A referenced block with no row gets one (live: the caller saw it in the
    store); a count reaching 0 starts its GC grace.
    """
    keys = sorted(deltas)
    cur.execute("INSERT INTO blocks (hash, size, refcount, state)"
                " SELECT k, n, 0, 'live' FROM unnest(%s::bytea[], %s::int[]) AS c(k, n)"
                " ON CONFLICT DO NOTHING", (keys, [sizes.get(k, 0) for k in keys]))
    cur.execute("UPDATE blocks b SET refcount = b.refcount + c.d, unref_since = CASE"
                " WHEN b.refcount + c.d <= 0 THEN now() END"
                " FROM unnest(%s::bytea[], %s::bigint[]) AS c(k, d) WHERE b.hash = c.k",
                (keys, [deltas[k] for k in keys]))


def _fix_nlink(cur: Cursor, deltas: list[tuple[int, int]]) -> None:
    cur.execute("UPDATE inodes i SET nlink = i.nlink + c.d FROM unnest(%s::bigint[],"
                " %s::int[]) AS c(id, d) WHERE i.id = c.id",
                ([i for i, _ in deltas], [d for _, d in deltas]))


def _drop_dangling(cur: Cursor, entries: list[tuple[int, bytes]]) -> None:
    for parent, name in entries:
        cur.execute("DELETE FROM dentries WHERE parent = %s AND name = %s", (parent, name))


def _fix_used(cur: Cursor, deltas: list[tuple[int, int]]) -> None:
    cur.execute("UPDATE users u SET used_bytes = u.used_bytes + c.d FROM unnest(%s::bigint[],"
                " %s::bigint[]) AS c(id, d) WHERE u.id = c.id",
                ([i for i, _ in deltas], [d for _, d in deltas]))


def _mark_damaged(cur: Cursor, versions: list[tuple[int, int]]) -> None:
    cur.execute("UPDATE versions v SET damaged = true FROM unnest(%s::bigint[], %s::bigint[])"
                " AS c(i, n) WHERE v.inode = c.i AND v.version = c.n",
                ([i for i, _ in versions], [n for _, n in versions]))


# --- the check ---------------------------------------------------------------------

def _lost_blocks(store: BlockStore, s: Snapshot, verify: bool,
                 progress: Callable[[str], Any]) -> tuple[list[bytes], list[bytes]]:
    """The referenced blocks missing from the store, and (``verify``) those that hash wrong."""
    stored = {k for k, _, _ in store.objects()}
    missing = sorted(k for k in s.refs if k not in stored)
    corrupt = []
    if verify:
        for n, k in enumerate(sorted(k for k in s.refs if k in stored)):
            if n and n % 10_000 == 0:
                progress(f"verified {n} of {len(s.refs)} blocks")
            try:
                if block_hash(store.get(k)) != k:
                    corrupt.append(k)
            except BlockNotFound:
                missing.append(k)
    return missing, corrupt


def check(db: Database, store: BlockStore, verify_blocks: bool = False, repair: bool = False,
          progress: Callable[[str], Any] = log.info) -> list[Fault]:
    """Check (and with ``repair`` repair) the whole store; return the faults found."""
    s = db.run(_read)
    faults: list[Fault] = []
    missing, corrupt = _lost_blocks(store, s, verify_blocks, progress)

    lost = {**dict.fromkeys(missing, "missing from the store"),
            **dict.fromkeys(corrupt, "corrupt (its bytes hash otherwise)")}
    damaged = sorted({v for k in lost for v in s.users_of[k]})
    for k, why in sorted(lost.items()):
        faults.append(Fault("missing_block" if k in missing else "corrupt_block",
                            f"block {k.hex()} is {why}; versions that need it:"
                            f" {', '.join(f'inode {i} v{n}' for i, n in s.users_of[k][:10])}"))
    new_damage = [v for v in damaged if v not in s.damaged]
    for i, n in sorted(s.damaged):
        faults.append(Fault("damaged_version", f"inode {i} version {n} is marked damaged"
                                               " (blocks lost; reads of it are EIO)"))
    if repair and new_damage:
        db.run(_mark_damaged, new_damage)
        faults.append(Fault("damaged_version", f"{len(new_damage)} version(s) marked damaged:"
                            f" {', '.join(f'inode {i} v{n}' for i, n in new_damage[:20])}",
                            repaired=True))

    deltas = {}
    for k in s.refs.keys() | s.rows.keys():
        counted, state = s.rows.get(k, (None, ""))
        if counted is None:
            faults.append(Fault("refcount", f"block {k.hex()} is referenced {s.refs[k]}"
                                            " time(s) but has no row"))
            if k not in lost:
                deltas[k] = s.refs[k]
        elif counted != s.refs[k] and state != "doomed":
            faults.append(Fault("refcount", f"block {k.hex()} counts {counted} reference(s);"
                                            f" versions hold {s.refs[k]}"))
            deltas[k] = s.refs[k] - counted
        elif state == "doomed" and s.refs[k]:
            faults.append(Fault("refcount", f"block {k.hex()} is referenced but being"
                                            " deleted by block GC"))
    if repair and deltas:
        db.run(_recount_blocks, deltas, s.sizes)
        _repaired(faults, "refcount")

    for ino, nlink, counted in s.nlink:
        faults.append(Fault("nlink", f"inode {ino} has link count {nlink}; its entries make"
                                     f" {counted}"))
    for parent, name, ino, what in s.dangling:
        faults.append(Fault("dangling_entry", f"entry {name!r} in directory {parent} names"
                            + (f" inode {ino}, which does not exist" if what == "inode"
                               else " a parent that is not an existing directory")))
    if repair:
        gone = [(p, n) for p, n, _, what in s.dangling if what == "inode"]
        if gone:
            db.run(_drop_dangling, gone)
            _repaired(faults, "dangling_entry", lambda f: "does not exist" in f.message)
        if s.nlink or gone:
            # Entries removed above change the counts: read them again.
            fresh = db.run(_read).nlink if gone else s.nlink
            if fresh:
                db.run(_fix_nlink, [(i, c - n) for i, n, c in fresh])
            _repaired(faults, "nlink")

    left = [(i, o) for i, o, age in s.orphans if age > ORPHAN_AGE]
    for ino, owner, age in s.orphans:
        faults.append(Fault("orphan", f"inode {ino} (user {owner}) has no entry and no link;"
                            f" unlinked or last held {age / 3600:.1f} h ago: " + (
                                "left behind by a mount that died" if age > ORPHAN_AGE else
                                "a mount may still have it open; kept")))
    if repair and left:
        db.run(purge_orphans, [i for i, _ in left])
        _repaired(faults, "orphan", lambda f: "left behind" in f.message)
    for ino, owner in s.unreachable:
        faults.append(Fault("unreachable", f"inode {ino} (user {owner}) has links but cannot"
                                           " be reached from its volume's root"))
    for ino, version in s.no_version:
        faults.append(Fault("no_version", f"inode {ino}'s current version {version} does not"
                                          " exist"))

    for _, user, has, counted in s.used:
        faults.append(Fault("quota", f"user {user} uses {has:,} bytes by the count; their"
                                     f" files' sizes add up to {counted:,}"))
    if repair and s.used:
        db.run(_fix_used, [(uid, counted - has) for uid, _, has, counted in s.used])
        _repaired(faults, "quota")
    return faults


def _repaired(faults: list[Fault], kind: str,
              which: Callable[[Fault], bool] = lambda f: True) -> None:
    for f in faults:
        if f.kind == kind and which(f):
            f.repaired = True


def summary(faults: list[Fault], started: float) -> str:
    """The closing line of a report."""
    if not faults:
        return f"fsck: no faults found ({time.monotonic() - started:.1f} s)"
    fixed = sum(f.repaired for f in faults)
    return (f"fsck: {len(faults)} fault(s) found, {fixed} repaired, {len(faults) - fixed} left"
            f" ({time.monotonic() - started:.1f} s)")
