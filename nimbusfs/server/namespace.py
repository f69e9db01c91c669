"""The filesystem's metadata operations, each one PostgreSQL transaction.

Every function takes an open cursor inside a transaction (see
``Database.run``), the authenticated :class:`User` and the calling device, and
either returns a msgpack-able result or raises :class:`FSError`.

Invariants kept here:
- every inode touched belongs to the caller's volume (``owner_id``); an inode of
  another user answers ENOENT, never its data;
- ``nlink`` of a directory is 2 + its subdirectories; of a file, its dentries;
- an inode whose ``nlink`` drops to 0 is an *orphan*: its row stays so that
  handles still open on some mount keep working, and the mount that saw it
  orphaned calls ``purge`` after its last close;
- ``users.used_bytes`` is the sum of current sizes of the volume's files and
  ``blocks.refcount`` counts references from every kept version;
- a version names only blocks its user may reference (``block_owners``), and
  ``have_blocks`` answers only for those (see ``nimbusfs/server/blocks.py``);
- an operation that locks several inodes at once takes them in ascending
  order (``_lock``: rename's two parents, then its source and target; link's
  file and directory); the others lock the parent directory, then the
  entry's inode. The two orders can cross (a link of a file numbered below
  its new directory, against an unlink in that directory): PostgreSQL then
  detects the deadlock and ``Database.run`` reruns the transaction that lost.
- a commit references only live blocks, locked until it ends, so block GC
  never deletes a block a version references (``nimbusfs/server/gc.py``);

Namespace changes answer with what they changed (the parent directory's new
attributes under ``dir``, the removed or replaced inode), so that a mount can
keep its attribute cache current without asking again.
"""

from __future__ import annotations

import errno
import inspect
import logging
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any

import msgpack
from psycopg import Cursor
from psycopg import errors as pgerr

from nimbusfs.blockstore.base import HASH_LEN, block_hash
from nimbusfs.blockstore.chunking import MAX_BLOCK
from nimbusfs.errors import Conflict, FSError
from nimbusfs.posix import (
    NAME_MAX,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    UINT31,
    dropped_privileges,
    setattr_mode,
    xattr_supported,
)
from nimbusfs.server.auth import User
from nimbusfs.server.db import one

log = logging.getLogger(__name__)

BIGINT_MAX = (1 << 63) - 1
# The largest file (ext4's 16 TiB): sizes add up in bigint columns (quota use).
MAX_FILE_SIZE = 16 << 40
# Hashes one have_blocks request may ask about.
MAX_KEYS = 10_000
# mode, uid, gid and rdev: unsigned in the kernel (stat's functions refuse a
# negative mode), stored in PostgreSQL integer columns. The server checks each
# request's arguments against the operation's annotations, this range
# included (``metaserver._conforms``).
UInt31 = Annotated[int, UINT31]

OPS: dict[str, Callable[..., Any]] = {}


# Operations that change nothing a replay could change twice: sent without an
# op_id (the hello tells clients which: this is the one declaration).
READ_ONLY: set[str] = set()


def op(fn: Callable[..., Any] | None = None, *, read_only: bool = False,
       name: str | None = None) -> Any:
    """Register ``fn`` as a mount-protocol operation under ``name`` (default: its own).

    Its annotations declare its arguments (the server checks every request
    against them); ``read_only``: replaying it is harmless, so it needs no
    op_id ("open" may set atime, which a replay sets again). ``name`` keeps
    the protocol's name of an operation whose function is not named so
    (``get_attr`` is "getattr": a function must not shadow a builtin).
    """
    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        OPS[name or f.__name__] = f
        if read_only:
            READ_ONLY.add(name or f.__name__)
        return f
    return register(fn) if fn is not None else register


# ``xattrs``: whether the inode has any extended attribute, so that a mount can
# answer the kernel's frequent getxattr probes (security.capability before
# every write, ACLs for ls -l) without asking.
def _cols(table: str = "") -> str:
    p = f"{table}." if table else ""
    return (", ".join(p + c for c in ("id", "mode", "nlink", "uid", "gid", "rdev", "size",
                                      "atime_ns", "mtime_ns", "ctime_ns", "version", "alloc"))
            + f", EXISTS (SELECT 1 FROM xattrs x WHERE x.inode = {p}id)")


_ATTR_COLS = _cols()


def _attr(row: tuple) -> dict[str, int]:
    keys = ("ino", "mode", "nlink", "uid", "gid", "rdev", "size", "atime", "mtime", "ctime",
            "version", "alloc", "xattrs")
    return dict(zip(keys, row, strict=True))


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FSError(errno.EINVAL, f"invalid name {name!r}")


def inode(cur: Cursor, u: User, ino: int, lock: bool = False) -> dict[str, int]:
    cur.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE id = %s AND owner_id = %s"
                + (" FOR UPDATE" if lock else ""), (ino, u.id))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, f"no inode {ino}")
    return _attr(row)


def _lock(cur: Cursor, u: User, *inos: int) -> dict[int, dict[str, int]]:
    """Lock several inodes in ascending order and return their attributes."""
    return {i: inode(cur, u, i, lock=True) for i in sorted(set(inos))}


def directory(cur: Cursor, u: User, ino: int, lock: bool = True) -> dict[str, int]:
    a = inode(cur, u, ino, lock)
    if not stat.S_ISDIR(a["mode"]):
        raise FSError(errno.ENOTDIR, f"inode {ino} is not a directory")
    if a["nlink"] == 0:
        raise FSError(errno.ENOENT, "directory was removed")
    return a


def _child(cur: Cursor, parent: int, name: bytes) -> int | None:
    cur.execute("SELECT inode FROM dentries WHERE parent = %s AND name = %s", (parent, name))
    row = cur.fetchone()
    return row[0] if row else None


def _touch(cur: Cursor, ino: int, now: int) -> dict[str, int]:
    """Set ctime and mtime of a directory whose entries changed; return its attributes."""
    cur.execute(f"UPDATE inodes SET ctime_ns = %s, mtime_ns = %s WHERE id = %s"
                f" RETURNING {_ATTR_COLS}", (now, now, ino))
    return _attr(one(cur))


CHANNEL = "nimbus_changes"

# A logged change: (kind, inode, parent, name).
Change = tuple[str, int, int | None, bytes | None]


def _log(cur: Cursor, u: User, device: str, *changes: Change) -> None:
    """Append to the change log and NOTIFY listeners, in one statement.

    The notification is delivered at commit. Its payload, ``OWNER SELF
    DEVICE``, lets a replica wake only the sessions that will use the change:
    those of other devices, and the writer's own only if ``SELF`` is 1 (an
    "xattr" change, which even the writing mount applies). A chmod, chown or
    utimens ("setattr") does not wake the writer's own session: that cost a
    transaction and a push per call for nothing (``tar x`` as root makes three
    per file). Inside a ``Batch`` the changes are collected and written by
    its ``finish``, all in one statement, in the same transaction.
    """
    batch = _batch.get()
    if batch is not None and batch.cur is cur:
        batch.changes += changes
        return
    own = int(any(kind == "xattr" for kind, *_ in changes))
    kinds, inos, parents, names = zip(*changes, strict=True)
    cur.execute("WITH c AS (INSERT INTO changes (owner_id, kind, inode, parent, name, device)"
                " SELECT %s, k, i, p, n, %s"
                " FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bytea[]) AS c(k, i, p, n)"
                " RETURNING 1)"
                " SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM c LIMIT 1) n",
                (u.id, device, list(kinds), list(inos), list(parents), list(names),
                 CHANNEL, f"{u.id} {own} {device}"))


class Batch:
    """What the operations of one ``batch`` request (a write-back drain) share.

    They run in one transaction (see ``metaserver._apply_batch``: each in a
    savepoint of its own only once one was refused). While one runs
    (``applying``), ``_log`` collects its changes here rather than writing
    each: ``finish`` writes them all in one statement, in order (one NOTIFY,
    delivered at the commit, as before). The changes of an operation that
    raises are dropped with it. The blocks of all the batch's commits are checked
    and locked at once when the batch starts (``_check_blocks`` then finds
    them here): locked in hash order until the transaction ends, as one
    commit locks its own, so block GC's invariant holds unchanged. Only
    ``cur``'s own calls use it (``_batch`` is this thread's context).
    """

    def __init__(self, cur: Cursor, u: User, device: str, extents: list[list]) -> None:
        self.cur, self.u, self.device = cur, u, device
        self.changes: list[Change] = []
        keys = sorted({bytes(k) for e in extents for k, _ in e if k is not None})
        self.blocks = _BlockRows(cur, u, keys)

    @contextmanager
    def applying(self) -> Iterator[None]:
        """One operation of the batch: its changes kept if it returns, dropped if it raises."""
        mark = len(self.changes)
        token = _batch.set(self)
        try:
            yield
        except BaseException:
            del self.changes[mark:]
            raise
        finally:
            _batch.reset(token)

    def finish(self) -> None:
        """Write the changes of the operations applied (one statement, if any)."""
        if self.changes:
            _log(self.cur, self.u, self.device, *self.changes)


# The batch whose operation this thread runs (``Batch.applying``).
_batch: ContextVar[Batch | None] = ContextVar("nimbus_batch", default=None)


def _drop_link(cur: Cursor, ino: int, now: int) -> tuple[int | None, int]:
    """Decrement nlink; return (ino if it became an orphan, else None; its mode)."""
    cur.execute("UPDATE inodes SET nlink = nlink - 1, ctime_ns = %s WHERE id = %s"
                " RETURNING nlink, mode", (now, ino))
    nlink, mode = one(cur)
    return (ino if nlink == 0 else None), mode


def _remove_dir(cur: Cursor, parent: int, name: bytes, ino: int, now: int) -> dict[str, int]:
    """Remove an empty, locked directory entry and the directory itself.

    Returns the parent's new attributes."""
    cur.execute("SELECT 1 FROM dentries WHERE parent = %s LIMIT 1", (ino,))
    if cur.fetchone():
        raise FSError(errno.ENOTEMPTY, "directory not empty")
    cur.execute("DELETE FROM dentries WHERE parent = %s AND name = %s", (parent, name))
    cur.execute("UPDATE inodes SET nlink = nlink - 1 WHERE id = %s", (parent,))
    cur.execute("DELETE FROM inodes WHERE id = %s", (ino,))
    return _touch(cur, parent, now)


# --- queries -----------------------------------------------------------------

@op(read_only=True)
def hello(cur: Cursor, u: User, device: str) -> dict[str, Any]:
    return {"user": u.name, "root": u.root}


@op(read_only=True, name="getattr")
def get_attr(cur: Cursor, u: User, device: str, ino: int) -> dict[str, int]:
    return inode(cur, u, ino)


@op(read_only=True)
def lookup(cur: Cursor, u: User, device: str, parent: int, name: bytes) -> dict[str, int]:
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    cur.execute(f"SELECT {_cols('i')}"
                " FROM dentries d JOIN inodes i ON i.id = d.inode"
                " WHERE d.parent = %s AND d.name = %s AND i.owner_id = %s", (parent, name, u.id))
    row = cur.fetchone()
    if row is None:
        directory(cur, u, parent, lock=False)
        raise FSError(errno.ENOENT, "no such entry")
    return _attr(row)


@op(read_only=True)
def readdir(cur: Cursor, u: User, device: str, ino: int) -> list[tuple[bytes, dict[str, int]]]:
    """All entries of a directory with their attributes: '.', '..', then by name."""
    me = directory(cur, u, ino, lock=False)
    cur.execute("SELECT parent FROM dentries WHERE inode = %s LIMIT 1", (ino,))
    row = cur.fetchone()
    up = inode(cur, u, row[0]) if row and ino != u.root else me
    cur.execute(f"SELECT d.name, {_cols('i')}"
                " FROM dentries d JOIN inodes i ON i.id = d.inode"
                " WHERE d.parent = %s ORDER BY d.name", (ino,))
    return [(b".", me), (b"..", up), *((r[0], _attr(r[1:])) for r in cur.fetchall())]


@op(read_only=True)
def readlink(cur: Cursor, u: User, device: str, ino: int) -> bytes:
    inode(cur, u, ino)
    cur.execute("SELECT target FROM inodes WHERE id = %s", (ino,))
    target = one(cur)[0]
    if target is None:
        raise FSError(errno.EINVAL, "not a symlink")
    return bytes(target)


@op(read_only=True, name="open")
def open_file(cur: Cursor, u: User, device: str, ino: int, version: int | None = None,
              read: bool = False) -> dict[str, Any]:
    """Attributes and the extent list of a file's current (or a given) version.

    A version ``nimbusfs fsck --repair`` marked damaged (blocks of it are
    lost) is EIO, never bytes other than its own.

    ``read``: the file is opened for reading, so atime is updated the way
    Linux's ``relatime`` does: only if it is not newer than mtime and ctime, or
    is a day old, so a file read over and over costs one update. atime changes
    are not logged: other mounts see them when their attribute cache expires.
    One statement: the update's snapshot is the select's, so the new atime is
    taken from the update's own answer.
    """
    now = time.time_ns()
    cur.execute(
        "WITH t AS (UPDATE inodes SET atime_ns = %s WHERE %s AND id = %s AND owner_id = %s"
        " AND (atime_ns <= greatest(mtime_ns, ctime_ns) OR atime_ns <= %s) RETURNING atime_ns)"
        f" SELECT {_cols('i')}, coalesce((SELECT atime_ns FROM t), i.atime_ns),"
        " v.extents, v.damaged FROM inodes i LEFT JOIN versions v ON v.inode = i.id"
        " AND v.version = coalesce(%s, i.version) WHERE i.id = %s AND i.owner_id = %s",
        (now, read, ino, u.id, now - 86_400 * 10**9, version, ino, u.id))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, f"no inode {ino}")
    a = {**_attr(row[:13]), "atime": row[13]}
    if version is None:
        version = a["version"]
    if version and row[14] is None:
        raise FSError(errno.ENOENT, f"no version {version}")
    if row[15]:
        log.error("inode %d version %d is damaged (fsck found blocks of it lost): read"
                  " refused", ino, version)
        raise FSError(errno.EIO, f"version {version} is damaged: blocks of it are lost")
    return {"attr": a, "extents": msgpack.unpackb(row[14]) if version else []}


@op(read_only=True)
def statfs(cur: Cursor, u: User, device: str) -> dict[str, int]:
    cur.execute("SELECT quota_bytes, used_bytes FROM users WHERE id = %s", (u.id,))
    quota, used = one(cur)
    cur.execute("SELECT count(*) FROM inodes WHERE owner_id = %s", (u.id,))
    return {"quota": quota, "used": used, "inodes": one(cur)[0]}


def check_keys(keys: list) -> list[bytes]:
    """``keys`` as a list of block hashes, or EINVAL (at most ``MAX_KEYS`` of them)."""
    if not (isinstance(keys, list) and len(keys) <= MAX_KEYS
            and all(isinstance(k, bytes) and len(k) == HASH_LEN for k in keys)):
        raise FSError(errno.EINVAL, f"keys must be at most {MAX_KEYS} hashes of {HASH_LEN} bytes")
    return keys


def unowned(cur: Cursor, user_id: int, keys: list[bytes]) -> list[bytes]:
    """The blocks of ``keys`` that the user may not reference (see ``block_owners``)."""
    cur.execute("SELECT k FROM unnest(%s::bytea[]) AS k WHERE NOT EXISTS"
                " (SELECT 1 FROM block_owners o WHERE o.user_id = %s AND o.hash = k)",
                (keys, user_id))
    return [bytes(r[0]) for r in cur.fetchall()]


@op(read_only=True)
def have_blocks(cur: Cursor, u: User, device: str, keys: list[bytes]) -> list[bytes]:
    """The subset of ``keys`` that the store holds and this user may reference.

    Only the user's own blocks (``block_owners``) are answered for, so that
    nobody learns what others store: a block stored for another user is
    uploaded again (the store keeps one copy; the upload shows possession).
    """
    if not check_keys(keys):
        return []
    cur.execute("SELECT o.hash FROM block_owners o JOIN blocks b ON b.hash = o.hash"
                " WHERE o.user_id = %s AND o.hash = ANY(%s) AND b.refcount > 0", (u.id, keys))
    return [bytes(r[0]) for r in cur.fetchall()]


# --- namespace changes ---------------------------------------------------------

def _new_inode(cur: Cursor, u: User, device: str, parent: int, name: bytes, mode: int,
               uid: int, gid: int, rdev: int = 0, target: bytes | None = None,
               ino: int | None = None, p: dict[str, int] | None = None) -> dict[str, Any]:
    """Create an inode and its entry in ``parent``; answer its attributes and the parent's.

    The parent is locked first; the inode, the entry and the parent's new
    times are then written by one statement. The entry's primary key is the
    existence check: if the name is taken, nothing of the statement is kept
    (the transaction rolls back on EEXIST). ``ino``: a leased number the
    caller has claimed (``_claim``), else the next of ``inode_seq``. ``p``: the
    parent's attributes if the caller locked it already (``_kept_place``).
    """
    check_name(name)
    now = time.time_ns()
    p = p or directory(cur, u, parent)
    is_dir = stat.S_ISDIR(mode)
    # setgid directories pass their group (and, for subdirectories, the bit) on.
    if p["mode"] & stat.S_ISGID:
        gid = p["gid"]
        if is_dir:
            mode |= stat.S_ISGID
    cur.execute(
        "WITH i AS (INSERT INTO inodes (id, owner_id, mode, uid, gid, nlink, rdev, size,"
        " atime_ns, mtime_ns, ctime_ns, target) VALUES (coalesce(%s::bigint,"
        " nextval('inode_seq')),%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
        f" RETURNING {_ATTR_COLS}),"
        " d AS (INSERT INTO dentries (parent, name, inode) SELECT %s, %s, id FROM i"
        " ON CONFLICT DO NOTHING RETURNING 1),"
        f" p AS (UPDATE inodes SET ctime_ns = %s, mtime_ns = %s, nlink = nlink + %s"
        f" WHERE id = %s RETURNING {_ATTR_COLS})"
        " SELECT EXISTS (SELECT 1 FROM d), i.*, p.* FROM i, p",
        (ino, u.id, mode, uid, gid, 2 if is_dir else 1, rdev, len(target or b""), now, now, now,
         target, parent, name, now, now, int(is_dir), parent))
    row = one(cur)
    if not row[0]:
        raise FSError(errno.EEXIST, "entry exists")
    a = _attr(row[1:14])
    _log(cur, u, device, ("create", a["ino"], parent, name))
    return {**a, "dir": _attr(row[14:])}


# Inode numbers one ``lease_inodes`` request may ask for.
MAX_LEASE = 4096


@op
def lease_inodes(cur: Cursor, u: User, device: str, count: int, lessee: str) -> list[int]:
    """Lease ``count`` inode numbers to ``lessee`` (a write-back mount), for its creates.

    The numbers come from ``inode_seq``: no other inode takes them. A create
    naming one (``mknod``'s ``ino``) is accepted once, from this user and
    lessee only (``_claim``). ``lessee`` is a random id the mount keeps in its
    journal, so that its creates replayed after a restart still qualify.
    """
    if not 0 < count <= MAX_LEASE or not 0 < len(lessee) <= 64:
        raise FSError(errno.EINVAL, f"a lease is 1 to {MAX_LEASE} numbers for a lessee id"
                                    " of 1 to 64 characters")
    cur.execute("INSERT INTO inode_leases (ino, user_id, lessee) SELECT nextval('inode_seq'),"
                " %s, %s FROM generate_series(1, %s) RETURNING ino", (u.id, lessee, count))
    return sorted(r[0] for r in cur.fetchall())


def _claim(cur: Cursor, u: User, ino: int, lessee: str | None) -> None:
    """Use up the leased number ``ino``; EACCES unless it is leased to ``u`` and ``lessee``.

    The same answer whether the number is another lessee's, another user's,
    used already or never leased: nothing is learnt of what is not theirs.
    """
    cur.execute("DELETE FROM inode_leases WHERE ino = %s AND user_id = %s AND lessee = %s"
                " RETURNING 1", (ino, u.id, lessee))
    if cur.fetchone() is None:
        raise FSError(errno.EACCES, f"inode number {ino} is not leased to this mount")


def _kept_place(cur: Cursor, u: User, device: str, parent: int, name: bytes
                ) -> tuple[int, bytes, dict[str, int]]:
    """Where a create sent late (``keep``) goes: its name, else a conflicted copy's name;
    and that directory's attributes, locked (the name found free stays free).

    A write-back mount's create reaches the server after it returned: if the
    name was taken meanwhile by another mount, the file gets the conflicted
    copy's name beside it; if its directory was removed, it goes to the
    volume's root (as a conflicted copy's bytes do, ``_save_conflict``).
    """
    cur.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE id = %s AND owner_id = %s"
                " AND nlink > 0 AND mode & 61440 = 16384 FOR UPDATE", (parent, u.id))
    row = cur.fetchone()
    if row is None:
        parent = u.root
    p = _attr(row) if row is not None else directory(cur, u, parent)
    if _child(cur, parent, name) is None:
        return parent, name, p
    return parent, _copy_name(cur, parent, name, device), p


def _copy_name(cur: Cursor, parent: int, name: bytes, device: str) -> bytes:
    """The first conflicted copy's name of ``name`` free in (locked) directory ``parent``."""
    n = 1
    while _child(cur, parent, copy := _conflict_name(name, device, n)) is not None:
        n += 1
    return copy


def _make(cur: Cursor, u: User, device: str, parent: int, name: bytes, mode: int, uid: int,
          gid: int, rdev: int = 0, target: bytes | None = None, ino: int | None = None,
          lessee: str | None = None, keep: bool = False) -> dict[str, Any]:
    """``mknod``'s and ``symlink``'s create: under a leased number (``ino``, ``lessee``) if
    given, and with ``keep`` where the entry went (``_kept_place``) in the answer too."""
    if ino is not None:
        _claim(cur, u, ino, lessee)
    p = None
    if keep:
        parent, name, p = _kept_place(cur, u, device, parent, name)
    a = _new_inode(cur, u, device, parent, name, mode, uid, gid, rdev, target=target, ino=ino,
                   p=p)
    return {**a, "parent": parent, "name": name} if keep else a


@op
def mknod(cur: Cursor, u: User, device: str, parent: int, name: bytes, mode: UInt31, uid: UInt31,
          gid: UInt31, rdev: UInt31 = 0, ino: int | None = None, lessee: str | None = None,
          keep: bool = False) -> dict[str, Any]:
    """Create a file, directory, FIFO or socket (the type is in ``mode``).

    A write-back mount's journalled create names its leased number (``ino``,
    ``lessee``) and asks to ``keep`` the file whatever happened meanwhile
    (``_kept_place``); the answer then also says where it went (``parent``,
    ``name``).
    """
    if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO, stat.S_IFSOCK,
                                 stat.S_IFCHR, stat.S_IFBLK):
        raise FSError(errno.EINVAL, "bad file type")
    return _make(cur, u, device, parent, name, mode, uid, gid, rdev, ino=ino, lessee=lessee,
                 keep=keep)


@op
def symlink(cur: Cursor, u: User, device: str, parent: int, name: bytes, target: bytes,
            uid: UInt31, gid: UInt31, ino: int | None = None, lessee: str | None = None,
            keep: bool = False) -> dict[str, Any]:
    """Create a symbolic link; a write-back mount's journalled one as ``mknod``'s."""
    if len(target) > 4095:
        raise FSError(errno.ENAMETOOLONG, "symlink target too long")
    return _make(cur, u, device, parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target,
                 ino=ino, lessee=lessee, keep=keep)


@op
def link(cur: Cursor, u: User, device: str, ino: int, parent: int, name: bytes,
         keep: bool = False) -> dict[str, Any]:
    """Give inode ``ino`` one more name. A write-back mount's journalled link asks to
    ``keep`` it whatever happened meanwhile (``_kept_place``: a name another mount took
    gets the conflicted copy's name, a directory removed the volume's root); the answer
    then also says where it went (``parent``, ``name``). An inode deleted meanwhile is
    ENOENT: nothing is linked."""
    check_name(name)
    now = time.time_ns()
    if keep:
        # Both locked in ascending order, as ``_lock`` does, the directory only
        # if it is still there: one removed meanwhile is not an error here.
        cur.execute("SELECT id FROM inodes WHERE id = ANY(%s) AND owner_id = %s ORDER BY id"
                    " FOR UPDATE", ([ino, parent], u.id))
        target = inode(cur, u, ino)
        parent, name, _ = _kept_place(cur, u, device, parent, name)
    else:
        target = _lock(cur, u, ino, parent)[ino]
    if stat.S_ISDIR(target["mode"]):
        raise FSError(errno.EPERM, "hard link to a directory")
    if target["nlink"] == 0:
        raise FSError(errno.ENOENT, "file was removed")
    if not keep:
        directory(cur, u, parent)
        if _child(cur, parent, name) is not None:
            raise FSError(errno.EEXIST, "entry exists")
    cur.execute("INSERT INTO dentries (parent, name, inode) VALUES (%s, %s, %s)",
                (parent, name, ino))
    cur.execute(f"UPDATE inodes SET nlink = nlink + 1, ctime_ns = %s WHERE id = %s"
                f" RETURNING {_ATTR_COLS}", (now, ino))
    a = _attr(one(cur))
    d = _touch(cur, parent, now)
    _log(cur, u, device, ("link", ino, parent, name))
    placed = {"parent": parent, "name": name} if keep else {}
    return {**a, "dir": d, **placed}


@op
def unlink(cur: Cursor, u: User, device: str, parent: int, name: bytes, ino: int | None = None
           ) -> dict[str, Any]:
    """Remove a non-directory entry; report the inode if it became an orphan.

    The entry is deleted before its inode is looked at (one statement fewer);
    if it names a directory the transaction rolls back on EISDIR. A write-back
    mount's journalled unlink names the inode it removed there (``ino``): if
    the name is another inode's now (another mount replaced it meanwhile),
    ESTALE and nothing is removed (that other file is not this mount's to drop).
    """
    now = time.time_ns()
    directory(cur, u, parent)
    cur.execute("DELETE FROM dentries WHERE parent = %s AND name = %s RETURNING inode",
                (parent, name))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, "no such entry")
    if ino is not None and row[0] != ino:
        raise FSError(errno.ESTALE, "the name is another inode's now")
    ino = row[0]
    orphan, mode = _drop_link(cur, ino, now)
    if stat.S_ISDIR(mode):
        raise FSError(errno.EISDIR, "is a directory")
    d = _touch(cur, parent, now)
    _log(cur, u, device, ("unlink", ino, parent, name))
    return {"orphan": orphan, "ino": ino, "dir": d}


@op
def rmdir(cur: Cursor, u: User, device: str, parent: int, name: bytes, ino: int | None = None
          ) -> dict[str, Any]:
    """Remove an empty directory. A write-back mount's journalled rmdir names the inode it
    removed there (``ino``): if the name is another inode's now, ESTALE and nothing is
    removed; one another mount has put entries in meanwhile is ENOTEMPTY (they stay)."""
    if name == b".":
        raise FSError(errno.EINVAL, "cannot remove '.'")
    now = time.time_ns()
    directory(cur, u, parent)
    found = _child(cur, parent, name)
    if found is None:
        raise FSError(errno.ENOENT, "no such entry")
    if ino is not None and found != ino:
        raise FSError(errno.ESTALE, "the name is another inode's now")
    ino = found
    if not stat.S_ISDIR(inode(cur, u, ino, lock=True)["mode"]):
        raise FSError(errno.ENOTDIR, "not a directory")
    d = _remove_dir(cur, parent, name, ino, now)
    _log(cur, u, device, ("rmdir", ino, parent, name))
    return {"ino": ino, "dir": d}


def _is_ancestor(cur: Cursor, anc: int, ino: int) -> bool:
    """Whether directory ``anc`` is ``ino`` or one of its ancestors."""
    cur.execute(
        "WITH RECURSIVE up(id) AS (SELECT %s::bigint UNION"
        " SELECT d.parent FROM dentries d JOIN up ON d.inode = up.id)"
        " SELECT 1 FROM up WHERE id = %s", (ino, anc))
    return cur.fetchone() is not None


@op
def rename(cur: Cursor, u: User, device: str, parent: int, name: bytes, new_parent: int,
           new_name: bytes, flags: int = 0, ino: int | None = None,
           replaces: int | None = None, keep: bool = False) -> dict[str, Any]:
    """Move an entry, replacing or exchanging with an existing one as rename(2) says.

    RENAME_WHITEOUT and any other flag are refused (EINVAL, as Linux answers a
    flag the file system does not support): renaming without leaving the
    whiteout would tell the caller it was left.

    A write-back mount's journalled rename, sent after it returned, names the
    inodes it saw (``ino`` at the source, ``replaces`` at the target: None for
    no target) and asks to ``keep`` both files whatever happened meanwhile: a
    source that is another inode now is ESTALE (nothing moves); a target that
    another mount made, replaced or removed meanwhile is left as it is and the
    source takes a conflicted copy's name beside it (an exchange is ESTALE).
    The answer then also says where the source went (``new_parent``,
    ``new_name``).
    """
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise FSError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
    check_name(new_name)
    now = time.time_ns()
    _lock(cur, u, parent, new_parent)
    directory(cur, u, parent)
    directory(cur, u, new_parent)
    src = _child(cur, parent, name)
    if src is None:
        raise FSError(errno.ENOENT, "no such entry")
    if ino is not None and src != ino:
        raise FSError(errno.ESTALE, "the source name is another inode's now")
    dst = _child(cur, new_parent, new_name)
    if keep and dst != replaces:
        if flags & RENAME_EXCHANGE:
            raise FSError(errno.ESTALE, "the exchange target changed meanwhile")
        new_name, dst = _copy_name(cur, new_parent, new_name, device), None
    placed = {"new_parent": new_parent, "new_name": new_name} if keep else {}
    attrs = _lock(cur, u, *(i for i in (src, dst) if i is not None))
    src_dir = stat.S_ISDIR(attrs[src]["mode"])
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise FSError(errno.ENOENT, "exchange target does not exist")
    elif dst is not None and flags & RENAME_NOREPLACE:
        raise FSError(errno.EEXIST, "target exists")
    if src_dir and parent != new_parent and _is_ancestor(cur, src, new_parent):
        raise FSError(errno.EINVAL, "cannot move a directory into itself")
    dst_dir = dst is not None and stat.S_ISDIR(attrs[dst]["mode"])
    if flags & RENAME_EXCHANGE and dst is not None and dst_dir and parent != new_parent \
            and _is_ancestor(cur, dst, parent):
        raise FSError(errno.EINVAL, "cannot move a directory into itself")
    if src == dst:
        return {"orphan": None, "ino": None, "replaced": None, "dirs": [], **placed}
    orphan = None
    if flags & RENAME_EXCHANGE:
        cur.execute("UPDATE dentries SET inode = %s WHERE parent = %s AND name = %s",
                    (dst, parent, name))
        cur.execute("UPDATE dentries SET inode = %s WHERE parent = %s AND name = %s",
                    (src, new_parent, new_name))
        if src_dir != dst_dir and parent != new_parent:
            moved_in = 1 if src_dir else -1
            cur.execute("UPDATE inodes SET nlink = nlink + %s WHERE id = %s",
                        (moved_in, new_parent))
            cur.execute("UPDATE inodes SET nlink = nlink - %s WHERE id = %s", (moved_in, parent))
        cur.execute("UPDATE inodes SET ctime_ns = %s WHERE id IN (%s, %s)", (now, src, dst))
    else:
        if dst is not None:
            if src_dir and not dst_dir:
                raise FSError(errno.ENOTDIR, "target is not a directory")
            if dst_dir and not src_dir:
                raise FSError(errno.EISDIR, "target is a directory")
            if dst_dir:
                _remove_dir(cur, new_parent, new_name, dst, now)
            else:
                cur.execute("DELETE FROM dentries WHERE parent = %s AND name = %s",
                            (new_parent, new_name))
                orphan, _ = _drop_link(cur, dst, now)
        cur.execute("UPDATE dentries SET parent = %s, name = %s WHERE parent = %s AND name = %s",
                    (new_parent, new_name, parent, name))
        if src_dir and parent != new_parent:
            cur.execute("UPDATE inodes SET nlink = nlink - 1 WHERE id = %s", (parent,))
            cur.execute("UPDATE inodes SET nlink = nlink + 1 WHERE id = %s", (new_parent,))
        cur.execute("UPDATE inodes SET ctime_ns = %s WHERE id = %s", (now, src))
    dirs = [_touch(cur, parent, now)]
    if new_parent != parent:
        dirs.append(_touch(cur, new_parent, now))
    changes: list[Change] = [("rename_from", src, parent, name),
                             ("rename", src, new_parent, new_name)]
    if flags & RENAME_EXCHANGE and dst is not None:
        changes.append(("rename", dst, parent, name))
    elif dst is not None:
        # The replaced inode lost its link here: other mounts drop its cached
        # attributes (another link of it shows one link fewer) and the feed
        # reports it (gone, or its remaining entry). First: the feed lists
        # inodes in the order of their first change, and a client that removes
        # a deleted entry by its place must do so before the renamed one lands.
        changes.insert(0, ("rmdir" if dst_dir else "unlink", dst, new_parent, new_name))
    _log(cur, u, device, *changes)
    return {"orphan": orphan, "ino": src, "replaced": dst, "dirs": dirs, **placed}


def _setattr(cur: Cursor, a: dict[str, int], mode: int | None = None, uid: int | None = None,
             gid: int | None = None, atime: int | None = None, mtime: int | None = None
             ) -> dict[str, int]:
    """Change mode, owner or times of the locked inode ``a``; ctime becomes now."""
    sets, vals = ["ctime_ns = %s"], [time.time_ns()]
    new_mode = setattr_mode(a["mode"], mode, uid is not None or gid is not None)
    if new_mode != a["mode"]:
        sets.append("mode = %s")
        vals.append(new_mode)
    for col, v in (("uid", uid), ("gid", gid), ("atime_ns", atime), ("mtime_ns", mtime)):
        if v is not None:
            sets.append(f"{col} = %s")
            vals.append(v)
    cur.execute(f"UPDATE inodes SET {', '.join(sets)} WHERE id = %s RETURNING {_ATTR_COLS}",
                (*vals, a["ino"]))
    return _attr(one(cur))


# The changes ``_setattr`` takes: what a commit's ``attrs`` may hold.
SETATTR_KEYS = frozenset(inspect.signature(_setattr).parameters) - {"cur", "a"}


@op(name="setattr")
def set_attr(cur: Cursor, u: User, device: str, ino: int, mode: UInt31 | None = None,
             uid: UInt31 | None = None, gid: UInt31 | None = None, atime: int | None = None,
             mtime: int | None = None) -> dict[str, int]:
    """Change mode, owner or times; ctime becomes now. Size changes are commits."""
    attr = _setattr(cur, inode(cur, u, ino, lock=True), mode, uid, gid, atime, mtime)
    _log(cur, u, device, ("setattr", ino, None, None))
    return attr


# --- extended attributes ---------------------------------------------------------


def _xattr_name(name: bytes) -> None:
    if not xattr_supported(name):
        raise FSError(errno.EOPNOTSUPP, "unsupported xattr name")
    if len(name) > 255:
        raise FSError(errno.ERANGE, "xattr name too long")


@op
def setxattr(cur: Cursor, u: User, device: str, ino: int, name: bytes, value: bytes) -> None:
    """Set an attribute (pyfuse3 checks XATTR_CREATE/XATTR_REPLACE before calling)."""
    _xattr_name(name)
    if len(value) > 65536:
        raise FSError(errno.E2BIG, "xattr value too large")
    inode(cur, u, ino, lock=True)
    cur.execute("INSERT INTO xattrs (inode, name, value) VALUES (%s, %s, %s)"
                " ON CONFLICT (inode, name) DO UPDATE SET value = excluded.value",
                (ino, name, value))
    cur.execute("UPDATE inodes SET ctime_ns = %s WHERE id = %s", (time.time_ns(), ino))
    _log(cur, u, device, ("xattr", ino, None, None))


@op(read_only=True)
def getxattr(cur: Cursor, u: User, device: str, ino: int, name: bytes) -> bytes:
    inode(cur, u, ino)
    cur.execute("SELECT value FROM xattrs WHERE inode = %s AND name = %s", (ino, name))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENODATA, "no such xattr")
    return bytes(row[0])


@op(read_only=True)
def listxattr(cur: Cursor, u: User, device: str, ino: int) -> list[bytes]:
    inode(cur, u, ino)
    cur.execute("SELECT name FROM xattrs WHERE inode = %s ORDER BY name", (ino,))
    return [bytes(r[0]) for r in cur.fetchall()]


@op
def removexattr(cur: Cursor, u: User, device: str, ino: int, name: bytes) -> None:
    inode(cur, u, ino, lock=True)
    cur.execute("DELETE FROM xattrs WHERE inode = %s AND name = %s", (ino, name))
    if cur.rowcount == 0:
        raise FSError(errno.ENODATA, "no such xattr")
    cur.execute("UPDATE inodes SET ctime_ns = %s WHERE id = %s", (time.time_ns(), ino))
    _log(cur, u, device, ("xattr", ino, None, None))


# --- content -------------------------------------------------------------------

def _refs(extents: list) -> tuple[list[bytes], list[int], list[int]]:
    """The distinct blocks of ``extents`` in hash order, their sizes and reference counts.

    A fixed order keeps concurrent commits from deadlocking on ``blocks`` rows.
    """
    counts = Counter(bytes(k) for k, _ in extents if k is not None)
    sizes = {bytes(k): n for k, n in extents if k is not None}
    keys = sorted(counts)
    return keys, [sizes[k] for k in keys], [counts[k] for k in keys]


def _unref(cur: Cursor, extents: list) -> None:
    """Drop the references of a deleted version; a block reaching 0 starts its GC grace."""
    keys, _, counts = _refs(extents)
    if keys:
        cur.execute(
            "UPDATE blocks b SET refcount = b.refcount - c.n,"
            " unref_since = CASE WHEN b.refcount - c.n <= 0 THEN now() END"
            " FROM unnest(%s::bytea[], %s::bigint[]) AS c(hash, n) WHERE b.hash = c.hash",
            (keys, counts))


def _conflict_name(name: bytes, device: str, n: int = 1) -> bytes:
    """``NAME (conflicted copy HOST LABEL YYYY-MM-DD HHMMSS[ N]).EXT``, at most 255 bytes.

    A mount's device is ``HOST/LABEL/ID`` (``nimbusfs.mount.serve.device_name``): the
    host and label say which mount the copy came from (the host alone is the
    same for two mounts on one machine). A device of two parts (``HOST/ID``,
    an older mount) names the host only. Host and label are cut to 64 bytes
    each, so that the tag always fits; ``n`` > 1 (a second copy in the same
    second) is part of the tag, which ``tagged`` never cuts.
    """
    host, *rest = device.split("/")
    who = " ".join(p.encode()[:64].decode(errors="ignore")
                   for p in (host, "/".join(rest[:-1])) if p)
    count = b" %d" % n if n > 1 else b""
    return tagged(name, b" (conflicted copy %s %s%s)" % (
        who.encode(), time.strftime("%Y-%m-%d %H%M%S").encode(), count))


def _cut(b: bytes, n: int) -> bytes:
    """``b`` cut to at most ``n`` bytes, not inside a UTF-8 character."""
    while 0 < n < len(b) and b[n] & 0xC0 == 0x80:
        n -= 1
    return b[:max(0, n)]


def tagged(name: bytes, tag: bytes) -> bytes:
    """``STEM TAG.EXT`` in at most ``NAME_MAX`` bytes (a conflicted copy, an autorename).

    The stem is cut first (keeping a byte of it), then the extension: a long
    name must never make the copy impossible (ENAMETOOLONG would lose the
    conflicted copy's bytes).
    """
    stem, dot, ext = name.rpartition(b".")
    if not dot or not stem:
        stem, dot, ext = name, b"", b""
    ext = _cut(ext, NAME_MAX - len(tag) - len(dot) - 1)
    dot = dot if ext else b""
    stem = _cut(stem, NAME_MAX - len(tag) - len(dot) - len(ext)) or stem[:1]
    return _cut(stem + tag + dot + ext, NAME_MAX)


def _save_conflict(cur: Cursor, u: User, device: str, ino: int, parent: int, name: bytes,
                   extents: list, size: int, mtime: int) -> dict[str, Any]:
    """Keep a losing writer's bytes as a new file beside the original.

    The copy goes into ``parent`` if that directory still exists in the volume,
    else into the volume's root; its mode and owner are the original's.
    """
    cur.execute("SELECT mode, uid, gid FROM inodes WHERE id = %s AND owner_id = %s",
                (ino, u.id))
    mode, uid, gid = cur.fetchone() or (0o100644, 0, 0)
    cur.execute("SELECT 1 FROM inodes WHERE id = %s AND owner_id = %s AND nlink > 0"
                " AND mode & 61440 = 16384", (parent, u.id))
    if cur.fetchone() is None:
        parent = u.root
    copy_name = _conflict_name(name, device)
    n = 1
    while _child(cur, parent, copy_name) is not None:
        n += 1
        copy_name = _conflict_name(name, device, n)
    a = _new_inode(cur, u, device, parent, copy_name, stat.S_IFREG | stat.S_IMODE(mode), uid,
                   gid)
    return {**_commit(cur, u, device, a, extents, size, mtime), "dir": a["dir"]}


def check_extents(extents: Any, size: Any) -> dict[bytes, int]:
    """Validate a commit's extent list; return its distinct blocks and their sizes.

    Each extent is ``[hash or None, length]``: a block of 1 to ``MAX_BLOCK``
    bytes named by a ``HASH_LEN``-byte hash (always with the same length), or
    a hole of any positive length; the lengths add up to ``size``, which fits
    a bigint. Anything else is EINVAL before the transaction touches a row.
    """
    if not (isinstance(extents, list) and type(size) is int and size >= 0):
        raise FSError(errno.EINVAL, "extents must be a list and size a non-negative int")
    if size > MAX_FILE_SIZE:
        raise FSError(errno.EFBIG, f"a file is at most {MAX_FILE_SIZE} bytes")
    total, blocks = 0, dict[bytes, int]()
    for e in extents:
        if not (isinstance(e, list | tuple) and len(e) == 2 and type(e[1]) is int and e[1] > 0):
            raise FSError(errno.EINVAL, "an extent is [hash or nil, positive length]")
        key, n = e
        if key is not None and not (isinstance(key, bytes) and len(key) == HASH_LEN
                                    and n <= MAX_BLOCK and blocks.setdefault(key, n) == n):
            raise FSError(errno.EINVAL, f"a block extent is [{HASH_LEN}-byte hash, its"
                                            f" length (at most {MAX_BLOCK})]")
        total += n
        if total > size:
            break
    if total != size:
        raise FSError(errno.EINVAL, "extents do not add up to size")
    return blocks


class _BlockRows:
    """Blocks ``keys`` as a commit sees them: those ``u`` may not reference, and the
    rows of the others (hash -> size, state), locked until the transaction ends.

    Locked in hash order, as ``_commit`` locks them: block GC dooms a block
    only under this lock, and only unreferenced.
    """

    def __init__(self, cur: Cursor, u: User, keys: list[bytes]) -> None:
        self.keys = set(keys)
        self.unowned = set(unowned(cur, u.id, keys)) if keys else set()
        owned = [k for k in keys if k not in self.unowned]
        self.rows: dict[bytes, tuple[int, str]] = {}
        if owned:
            cur.execute("SELECT hash, size, state FROM blocks WHERE hash = ANY(%s)"
                        " ORDER BY hash FOR NO KEY UPDATE", (owned,))
            self.rows = {bytes(k): (n, state) for k, n, state in cur.fetchall()}


def _check_blocks(cur: Cursor, u: User, extents: Any, size: Any) -> None:
    """Validate extents (``check_extents``), and refuse blocks the user may not
    reference, names with another length than stored, and blocks that are
    not live (EAGAIN: block GC collected them since the caller stored them,
    or is collecting them; the caller puts them again and retries). This is
    the commit's half of block GC's invariant (``nimbusfs/server/gc.py``).
    Inside a ``Batch``, its rows (checked and locked when it started) answer.

    EACCES says the same whether a block is stored for someone else or not
    at all: nothing is learnt of other users' data.
    """
    blocks = check_extents(extents, size)
    if not blocks:
        return
    batch = _batch.get()
    known = (batch.blocks if batch is not None and batch.cur is cur and batch.u is u
             and blocks.keys() <= batch.blocks.keys else _BlockRows(cur, u, sorted(blocks)))
    if any(k in known.unowned for k in blocks):
        raise FSError(errno.EACCES, "extents name blocks this user has not uploaded")
    rows = {k: known.rows[k] for k in blocks if k in known.rows}
    if any(blocks[k] != n for k, (n, _) in rows.items()):
        raise FSError(errno.EINVAL, "an extent's length is not its block's size")
    if len(rows) != len(blocks) or any(state != "live" for _, state in rows.values()):
        raise FSError(errno.EAGAIN, "blocks were collected since they were stored:"
                                    " upload them again")


@contextmanager
def _bigint_overflow() -> Iterator[None]:
    """EFBIG where a sum (a volume's used bytes) would leave PostgreSQL's bigint."""
    try:
        yield
    except pgerr.NumericValueOutOfRange:
        raise FSError(errno.EFBIG, "the volume's size would exceed what is countable") from None


def _commit(cur: Cursor, u: User, device: str, a: dict[str, int], extents: list, size: int,
            mtime: int, kill_priv: bool = False, attrs: dict[str, int] | None = None
            ) -> dict[str, int]:
    """Add a version to the locked inode ``a`` and make it current.

    ``kill_priv``: the writer was unprivileged, so set-user-ID (and
    set-group-ID on a group-executable file) is dropped, as Linux does.
    ``attrs``: mode, owner or time changes (``_setattr``'s) applied after
    the new version, by the same statement (a write-back drain's commit
    carries those ``tar x`` set).
    """
    attrs = attrs or {}
    ino = a["ino"]
    grow = size - a["size"]
    version = a["version"] + 1
    alloc = sum(n for k, n in extents if k is not None)
    kill = dropped_privileges(a["mode"]) if kill_priv else 0
    mode = setattr_mode(a["mode"] & ~kill, attrs.get("mode"), "uid" in attrs or "gid" in attrs)
    keys, sizes, counts = _refs(extents)
    # One statement: the quota, the version row, its block references and the
    # inode. Over quota, it is all rolled back by the exception below.
    with _bigint_overflow():
        cur.execute(
            "WITH q AS (UPDATE users SET used_bytes = used_bytes + %s WHERE id = %s"
            " RETURNING quota_bytes, used_bytes),"
            " v AS (INSERT INTO versions (inode, version, size, extents, user_id, device)"
            " VALUES (%s, %s, %s, %s, %s, %s)),"
            " r AS (INSERT INTO blocks (hash, size, refcount)"
            " SELECT * FROM unnest(%s::bytea[], %s::int[], %s::bigint[])"
            " ON CONFLICT (hash) DO UPDATE"
            " SET refcount = blocks.refcount + excluded.refcount, unref_since = NULL),"
            " i AS (UPDATE inodes SET version = %s, size = %s, mtime_ns = %s, ctime_ns = %s,"
            " alloc = %s, mode = %s, uid = coalesce(%s, uid), gid = coalesce(%s, gid),"
            f" atime_ns = coalesce(%s, atime_ns) WHERE id = %s RETURNING {_ATTR_COLS})"
            " SELECT q.*, i.* FROM q, i",
            (grow, u.id, ino, version, size, msgpack.packb(extents), u.id, device,
             keys, sizes, counts, version, size, attrs.get("mtime", mtime), time.time_ns(),
             alloc, mode, attrs.get("uid"), attrs.get("gid"), attrs.get("atime"), ino))
    row = one(cur)
    quota, used = row[:2]
    if quota and grow > 0 and used > quota:
        raise FSError(errno.EDQUOT, "storage quota exceeded")  # the transaction rolls back
    _log(cur, u, device, ("write", ino, None, None))
    _expire_versions(cur, ino, version)
    return _attr(row[2:])


# Retention: a version is dropped once it is both beyond the newest
# RETENTION["versions"] and older than RETENTION["days"] (set from the server's
# --keep-versions / --keep-days).
RETENTION = {"versions": 100, "days": 30}


def _expire_versions(cur: Cursor, ino: int, current: int) -> None:
    if current <= RETENTION["versions"]:
        return  # no version is beyond the kept number yet
    cur.execute("DELETE FROM versions WHERE inode = %s AND version <= %s"
                " AND created < now() - make_interval(days => %s) RETURNING extents",
                (ino, current - RETENTION["versions"], RETENTION["days"]))
    for (ext,) in cur.fetchall():
        _unref(cur, msgpack.unpackb(ext))


@op
def commit(cur: Cursor, u: User, device: str, ino: int, base: int,
           extents: list[tuple[bytes | None, int]], size: int,
           mtime: int, kill_priv: bool = False, parent: int | None = None,
           name: bytes | None = None, attrs: dict[str, int] | None = None,
           amend: bool = False) -> dict[str, Any]:
    """Make ``extents`` the new current version of file ``ino``.

    ``base`` is the version the writer started from. If another commit came
    first, or the file was deleted meanwhile, nothing of the original changes:
    the bytes are saved as a conflicted copy next to it (``parent``/``name``
    are where the writer last saw the file) and the answer names the copy.
    Every block must be the user's to reference (``block_owners``: uploaded
    through the metaserver, or in direct mode admitted by
    ``BlockAccess.admit`` once the store was seen to hold it), else EACCES:
    a version never references a missing block, nor one of another user's
    that this user never showed to possess. ``attrs`` are mode, owner or
    time changes the writer made while writing a file that has no version
    yet (see ``OpenFile.defer``): they are applied after the new version (or
    to the conflicted copy), in the same transaction. ``amend``: the base is
    an empty version this device committed when the same save began (an open
    with O_TRUNC, flushed before the writes); it is dropped, so that one save
    is one version. A base with bytes, or another device's, is kept.
    """
    attrs = attrs or {}
    if not (isinstance(attrs, dict) and set(attrs) <= SETATTR_KEYS
            and all(type(v) is int for v in attrs.values())
            and all(attrs[k] in UINT31 for k in ("mode", "uid", "gid") if k in attrs)):
        raise FSError(errno.EINVAL, "bad attributes")
    _check_blocks(cur, u, extents, size)
    cur.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE id = %s AND owner_id = %s FOR UPDATE",
                (ino, u.id))
    row = cur.fetchone()
    a = _attr(row) if row else None
    if a is not None and not stat.S_ISREG(a["mode"]):
        raise FSError(errno.EINVAL, "not a regular file")
    if a is not None and a["version"] == base and (a["nlink"] > 0 or name is None):
        if amend:
            cur.execute("DELETE FROM versions WHERE inode = %s AND version = %s AND size = 0"
                        " AND device = %s", (ino, base, device))
        return {"attr": _commit(cur, u, device, a, extents, size, mtime, kill_priv, attrs)}
    if name is None:
        raise (Conflict(a["version"]) if a else FSError(errno.ENOENT, "file was deleted"))
    copy = _save_conflict(cur, u, device, ino, parent or u.root, name, extents, size, mtime)
    if attrs:
        copy = {**_setattr(cur, copy, **attrs), "dir": copy["dir"]}
    return {"attr": a, "conflict": copy}


@op(read_only=True)
def versions(cur: Cursor, u: User, device: str, ino: int) -> list[dict[str, Any]]:
    """The kept versions of a file, newest first."""
    inode(cur, u, ino)
    cur.execute("SELECT v.version, v.size, extract(epoch FROM v.created)::float8, v.device,"
                " coalesce(us.name, ''), v.extents"
                " FROM versions v LEFT JOIN users us ON us.id = v.user_id"
                " WHERE v.inode = %s ORDER BY v.version DESC", (ino,))
    return [{**dict(zip(("version", "size", "time", "device", "user"), r[:5], strict=True)),
             "content_hash": content_hash(msgpack.unpackb(r[5]))} for r in cur.fetchall()]


@op
def restore(cur: Cursor, u: User, device: str, ino: int, version: int) -> dict[str, int]:
    """Make an old version current again, as a new version (history is kept)."""
    a = inode(cur, u, ino, lock=True)
    cur.execute("SELECT size, extents FROM versions WHERE inode = %s AND version = %s",
                (ino, version))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, f"no version {version}")
    return _commit(cur, u, device, a, msgpack.unpackb(row[1]), row[0], time.time_ns())


@op
def purge(cur: Cursor, u: User, device: str, ino: int) -> bool:
    """Delete an orphan (nlink 0) of this user with its versions; True if it was deleted.

    A mount purges a file it unlinked once its last handle on it closes.
    """
    return purge_orphan(cur, ino, u.id)


# An orphan that lost its last link, and was last held (``hold_orphans``),
# longer ago than this is taken as left behind by a mount that died before its
# last close (which would have purged it), not as a file a live mount still
# holds open (a live mount holds its orphans every third of the GC grace, at
# least hourly): block GC purges it (``gc``), fsck reports it so. A mount
# offline as long has its caches reset anyway (the change log keeps 7 days).
ORPHAN_AGE = 7 * 86400.0
# Since when an orphan is left alone: its last link lost (ctime) or its last hold.
ORPHAN_SINCE = "GREATEST(ctime_ns, COALESCE(held_ns, 0))"
# Orphans one ``hold_orphans`` request names at most.
MAX_HOLD = 10_000


@op(read_only=True)
def hold_orphans(cur: Cursor, u: User, device: str, inos: list[int]) -> None:
    """Note that this mount still has these orphans of its user's open.

    GC and fsck take an orphan not held for ``ORPHAN_AGE`` as left behind by
    a dead mount and purge it; a live mount holds the ones it keeps open
    (a process reading a file deleted under it, for weeks). Replaying it is
    harmless; an inode not an orphan of this user is left as it is.
    """
    if len(inos) > MAX_HOLD:
        raise FSError(errno.EINVAL, f"at most {MAX_HOLD} orphans at once")
    cur.execute("UPDATE inodes SET held_ns = %s WHERE id = ANY(%s) AND owner_id = %s"
                " AND nlink = 0", (time.time_ns(), inos, u.id))


def purge_orphan(cur: Cursor, ino: int, owner: int | None = None,
                 left_behind: bool = False) -> bool:
    """Delete orphan ``ino`` (nlink 0), if ``owner``'s (None: anyone's), with its versions;
    with ``left_behind``, only if neither unlinked nor held for ``ORPHAN_AGE``.

    Their blocks lose a reference (GC takes them after its grace), and the
    file's size leaves its owner's used bytes (a symlink's target does not
    count there). Whether it was deleted: not if it was linked again, held
    since it was found left behind, or is gone. The inode row is locked
    first, so a link or hold racing with it either comes first (then nothing
    is deleted) or finds the inode gone.
    """
    cur.execute("SELECT nlink, size, owner_id, mode FROM inodes WHERE id = %s"
                " AND (%s::bigint IS NULL OR owner_id = %s)"
                f" AND (NOT %s OR {ORPHAN_SINCE} < %s) FOR UPDATE",
                (ino, owner, owner, left_behind, _left_since()))
    row = cur.fetchone()
    if row is None or row[0] > 0:
        return False
    cur.execute("SELECT extents FROM versions WHERE inode = %s", (ino,))
    for (ext,) in cur.fetchall():
        _unref(cur, msgpack.unpackb(ext))
    cur.execute("DELETE FROM inodes WHERE id = %s", (ino,))
    if stat.S_ISREG(row[3]):
        cur.execute("UPDATE users SET used_bytes = used_bytes - %s WHERE id = %s",
                    (row[1], row[2]))
    return True


def purge_orphans(cur: Cursor, inos: list[int]) -> int:
    """``purge_orphan`` each of ``inos`` (anyone's) that is still left behind; how many
    were purged."""
    return sum(purge_orphan(cur, ino, left_behind=True) for ino in inos)


def _left_since() -> int:
    """The time (ns) before which an orphan's unlink and last hold make it left behind."""
    return time.time_ns() - int(ORPHAN_AGE * 1e9)


def left_orphans(cur: Cursor, limit: int | None) -> list[int]:
    """Up to ``limit`` (None: all) orphans left alone for ``ORPHAN_AGE``: left behind by
    mounts that died."""
    cur.execute(f"SELECT id FROM inodes i WHERE nlink = 0 AND {ORPHAN_SINCE} < %s AND NOT"
                " EXISTS (SELECT 1 FROM dentries d WHERE d.inode = i.id) ORDER BY id LIMIT %s",
                (_left_since(), limit))
    return [r[0] for r in cur.fetchall()]




# --- whole files by id and path (the HTTP API) ---------------------------------
# An id is an inode number: it stays with the file across renames and moves.

def content_hash(extents: list) -> str:
    """A version's content identity (the HTTP ETag): equal for the same extents.

    Derived from the extent list, so it costs no read of the data: the same
    bytes written with another edit history may be cut into other blocks and
    hash differently, but a change of content always changes it.
    """
    return block_hash(msgpack.packb(extents)).hex()


@op(read_only=True)
def entry(cur: Cursor, u: User, device: str, ino: int) -> dict[str, Any]:
    """An inode's attributes, where it is (parent, name, path) and its content hash.

    A mount asks it for an inode it knows by number only (a file handle).

    The root's path is ``/`` and its parent None. A file with several hard
    links shows one of its entries; an orphan (open somewhere, no entry)
    answers ENOENT, as a deleted file does.
    """
    a = inode(cur, u, ino)
    cur.execute(
        "WITH RECURSIVE up(inode, parent, name, depth) AS ("
        " (SELECT inode, parent, name, 0 FROM dentries WHERE inode = %s ORDER BY parent, name"
        " LIMIT 1) UNION ALL"
        " SELECT d.inode, d.parent, d.name, up.depth + 1"
        " FROM up JOIN LATERAL (SELECT * FROM dentries d WHERE d.inode = up.parent"
        " ORDER BY d.parent, d.name LIMIT 1) d ON true)"
        " SELECT parent, name FROM up ORDER BY depth", (ino,))
    chain = cur.fetchall()
    if ino != u.root and not chain:
        raise FSError(errno.ENOENT, f"no inode {ino}")
    cur.execute("SELECT extents FROM versions WHERE inode = %s AND version = %s",
                (ino, a["version"]))
    row = cur.fetchone()
    return {**a, "parent": chain[0][0] if chain else None,
            "name": bytes(chain[0][1]) if chain else b"",
            "path": b"/" + b"/".join(bytes(n) for _, n in reversed(chain)),
            "content_hash": content_hash(msgpack.unpackb(row[0]) if row else [])}


def _at(cur: Cursor, u: User, device: str, parent: int | bytes) -> int:
    """A directory given by id, or by path (bytes) from the volume's root."""
    return resolve(cur, u, device, parent) if isinstance(parent, bytes) else parent


def resolve(cur: Cursor, u: User, device: str, path: bytes) -> int:
    """The inode at ``path`` (``/a/b``, from the volume's root); ENOENT if none.

    ``.`` and ``..`` are refused (EINVAL): a path never leaves the volume.
    """
    ino = u.root
    for name in (p for p in path.split(b"/") if p):
        check_name(name)
        directory(cur, u, ino, lock=False)
        child = _child(cur, ino, name)
        if child is None:
            raise FSError(errno.ENOENT, f"no such entry {name!r}")
        ino = child
    return ino


def children(cur: Cursor, u: User, device: str, ino: int, after: bytes | None, limit: int
             ) -> list[dict[str, Any]]:
    """Up to ``limit`` entries of a directory in name order, those after ``after`` only."""
    directory(cur, u, ino, lock=False)
    cur.execute(f"SELECT d.name, {_cols('i')}, v.extents FROM dentries d"
                " JOIN inodes i ON i.id = d.inode"
                " LEFT JOIN versions v ON v.inode = i.id AND v.version = i.version"
                " WHERE d.parent = %s AND d.name > %s ORDER BY d.name LIMIT %s",
                (ino, after or b"", limit))
    return [{**_attr(r[1:14]), "parent": ino, "name": bytes(r[0]),
             "content_hash": content_hash(msgpack.unpackb(r[14]) if r[14] else [])}
            for r in cur.fetchall()]


def _free_name(cur: Cursor, parent: int, name: bytes) -> bytes:
    """``name``, or ``name (1).ext``, ``name (2).ext`` ... whichever is free in ``parent``."""
    n, candidate = 0, name
    while _child(cur, parent, candidate) is not None:
        n += 1
        candidate = tagged(name, b" (%d)" % n)
    return candidate


def put_file(cur: Cursor, u: User, device: str, parent: int | bytes, name: bytes,
             extents: list, size: int, mtime: int, on_exists: str = "fail") -> dict[str, Any]:
    """Create ``parent/name`` (parent by id or path) with the given content in one transaction.

    If the name is taken: ``fail`` answers EEXIST, ``overwrite`` commits a
    new version of that file (EISDIR if it is not a regular file),
    ``autorename`` creates ``name (1).ext`` (or the next free number). The
    new file takes the parent's owner and mode 0600 (a mount with allow_other
    shows it to its owner only). Returns the file's id.
    """
    check_name(name)
    _check_blocks(cur, u, extents, size)
    parent = _at(cur, u, device, parent)
    p = directory(cur, u, parent)
    existing = _child(cur, parent, name)
    if existing is not None and on_exists == "overwrite":
        a = inode(cur, u, existing, lock=True)
        if not stat.S_ISREG(a["mode"]):
            raise FSError(errno.EISDIR, "the name is taken by a directory")
        _commit(cur, u, device, a, extents, size, mtime)
        return {"id": existing}
    if existing is not None and on_exists != "autorename":
        raise FSError(errno.EEXIST, "the name is taken")
    a = _new_inode(cur, u, device, parent, _free_name(cur, parent, name), stat.S_IFREG | 0o600,
                   p["uid"], p["gid"])
    _commit(cur, u, device, a, extents, size, mtime)
    return {"id": a["ino"]}


def replace(cur: Cursor, u: User, device: str, ino: int, extents: list, size: int, mtime: int,
            expected_version: int | None = None) -> None:
    """Make ``extents`` the file's new version; with ``expected_version``, only if current.

    A stale ``expected_version`` raises Conflict and nothing changes: the
    same rule as the mount's commit, without the conflicted copy (the
    caller decides).
    """
    _check_blocks(cur, u, extents, size)
    a = inode(cur, u, ino, lock=True)
    if not stat.S_ISREG(a["mode"]):
        raise FSError(errno.EISDIR, "not a regular file")
    if a["nlink"] == 0:
        raise FSError(errno.ENOENT, "file was deleted")
    if expected_version is not None and expected_version != a["version"]:
        raise Conflict(a["version"])
    _commit(cur, u, device, a, extents, size, mtime)


def remove(cur: Cursor, u: User, device: str, ino: int) -> None:
    """Delete a file's entry (one of them, if hard-linked) or an empty directory, by id.

    A file left without entries goes at once with its versions: a mount that
    has it open keeps what it read, and its next commit becomes a conflicted
    copy, as after a delete on another mount.
    """
    if ino == u.root:
        raise FSError(errno.EBUSY, "the root cannot be removed")
    e = entry(cur, u, device, ino)
    if stat.S_ISDIR(e["mode"]):
        rmdir(cur, u, device, e["parent"], e["name"])
    elif unlink(cur, u, device, e["parent"], e["name"])["orphan"]:
        purge(cur, u, device, ino)


def make_folder(cur: Cursor, u: User, device: str, parent: int | bytes, name: bytes
                ) -> dict[str, Any]:
    """Create a directory (mode 0700, the parent's owner) in ``parent``, by id or path."""
    parent = _at(cur, u, device, parent)
    p = directory(cur, u, parent, lock=False)
    return {"id": _new_inode(cur, u, device, parent, name, stat.S_IFDIR | 0o700, p["uid"],
                             p["gid"])["ino"]}


def move(cur: Cursor, u: User, device: str, ino: int, parent: int | None, name: bytes | None
         ) -> None:
    """Rename and/or move a file or directory by id; a taken name is EEXIST (no replace)."""
    e = entry(cur, u, device, ino)
    if e["parent"] is None:
        raise FSError(errno.EBUSY, "the root cannot be moved")
    if parent in (None, e["parent"]) and name in (None, e["name"]):
        return  # already there
    rename(cur, u, device, e["parent"], e["name"], e["parent"] if parent is None else parent,
           e["name"] if name is None else name, RENAME_NOREPLACE)


def storage_stats(cur: Cursor, u: User, device: str) -> dict[str, int]:
    """What the user's volume holds: logical bytes, and the distinct blocks behind them.

    ``stored_size`` counts the bytes of every kept version's blocks (what the
    volume would take without deduplication), ``unique_blocks_size`` each
    distinct block once. Reads every version's extent list: a figure for a
    person, not for a hot path.
    """
    cur.execute("SELECT quota_bytes, used_bytes FROM users WHERE id = %s", (u.id,))
    quota, used = one(cur)
    cur.execute("SELECT count(*) FILTER (WHERE mode & 61440 = 32768) FROM inodes"
                " WHERE owner_id = %s AND nlink > 0", (u.id,))
    files = one(cur)[0]
    blocks: dict[bytes, int] = {}
    stored = versions = 0
    cur.execute("SELECT v.extents FROM versions v JOIN inodes i ON i.id = v.inode"
                " WHERE i.owner_id = %s", (u.id,))
    for (ext,) in cur:
        versions += 1
        for k, n in msgpack.unpackb(ext):
            if k is not None:
                blocks[k] = n
                stored += n
    return {"logical_size": used, "stored_size": stored, "file_count": files,
            "version_count": versions, "block_count": len(blocks),
            "unique_blocks_size": sum(blocks.values()), "quota": quota, "used": used}


def store_stats(cur: Cursor, u: User, device: str) -> dict[str, int]:
    """The same totals for every volume of the store (an administrator's view).

    From ``blocks`` alone: its reference counts count every kept version's
    references, so no extent list is read.
    """
    if not u.admin:
        raise FSError(errno.EACCES, "only an administrator sees the whole store")
    cur.execute("SELECT coalesce(sum(used_bytes), 0)::bigint, count(*) FROM users")
    used, users = one(cur)
    cur.execute("SELECT count(*) FILTER (WHERE mode & 61440 = 32768 AND nlink > 0) FROM inodes")
    files = one(cur)[0]
    cur.execute("SELECT count(*) FROM versions")
    versions = one(cur)[0]
    cur.execute("SELECT count(*), coalesce(sum(size), 0)::bigint,"
                " coalesce(sum(size * refcount), 0)::bigint FROM blocks WHERE refcount > 0")
    count, unique, stored = one(cur)
    return {"logical_size": used, "stored_size": stored, "unique_blocks_size": unique,
            "block_count": count, "file_count": files, "version_count": versions,
            "user_count": users}
