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
- rows are locked parent-first in ascending inode order, so concurrent
  operations cannot deadlock on each other's directories.

Namespace changes answer with what they changed (the parent directory's new
attributes under ``dir``, the removed or replaced inode), so that a mount can
keep its attribute cache current without asking again.
"""

from __future__ import annotations

import errno
import inspect
import stat
import time
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any

import msgpack
from psycopg import Cursor

from metaserver.auth import User
from metaserver.errors import Conflict, FSError
from metaserver.protocol import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_NAMESPACES,
    dropped_privileges,
)

NAME_MAX = 255
# mode, uid, gid and rdev: unsigned in the kernel (stat's functions refuse a
# negative mode), stored in PostgreSQL integer columns. The server checks each
# request's arguments against the operation's annotations, this range
# included (``server._conforms``).
UInt31 = Annotated[int, range(1 << 31)]

OPS: dict[str, Callable[..., Any]] = {}


def op(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` as a mount-protocol operation under its own name."""
    OPS[fn.__name__] = fn
    return fn


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


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FSError(errno.EINVAL, f"invalid name {name!r}")


def _inode(cur: Cursor, u: User, ino: int, lock: bool = False) -> dict[str, int]:
    cur.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE id = %s AND owner_id = %s"
                + (" FOR UPDATE" if lock else ""), (ino, u.id))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, f"no inode {ino}")
    return _attr(row)


def _lock(cur: Cursor, u: User, *inos: int) -> dict[int, dict[str, int]]:
    """Lock several inodes in ascending order and return their attributes."""
    return {i: _inode(cur, u, i, lock=True) for i in sorted(set(inos))}


def _dir(cur: Cursor, u: User, ino: int, lock: bool = True) -> dict[str, int]:
    a = _inode(cur, u, ino, lock)
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
    return _attr(cur.fetchone())


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
    per file).
    """
    own = int(any(kind == "xattr" for kind, *_ in changes))
    rows = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(changes))
    cur.execute(f"WITH c AS (INSERT INTO changes (owner_id, kind, inode, parent, name, device)"
                f" VALUES {rows} RETURNING 1)"
                " SELECT pg_notify(%s, %s) FROM (SELECT 1 FROM c LIMIT 1) n",
                [v for c in changes for v in (u.id, *c, device)]
                + [CHANNEL, f"{u.id} {own} {device}"])


def _drop_link(cur: Cursor, ino: int, now: int) -> tuple[int | None, int]:
    """Decrement nlink; return (ino if it became an orphan, else None; its mode)."""
    cur.execute("UPDATE inodes SET nlink = nlink - 1, ctime_ns = %s WHERE id = %s"
                " RETURNING nlink, mode", (now, ino))
    nlink, mode = cur.fetchone()
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

@op
def hello(cur: Cursor, u: User, device: str) -> dict[str, Any]:
    return {"user": u.name, "root": u.root}


@op
def getattr(cur: Cursor, u: User, device: str, ino: int) -> dict[str, int]:
    return _inode(cur, u, ino)


@op
def lookup(cur: Cursor, u: User, device: str, parent: int, name: bytes) -> dict[str, int]:
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG, "name longer than 255 bytes")
    cur.execute(f"SELECT {_cols('i')}"
                " FROM dentries d JOIN inodes i ON i.id = d.inode"
                " WHERE d.parent = %s AND d.name = %s AND i.owner_id = %s", (parent, name, u.id))
    row = cur.fetchone()
    if row is None:
        _dir(cur, u, parent, lock=False)
        raise FSError(errno.ENOENT, "no such entry")
    return _attr(row)


@op
def readdir(cur: Cursor, u: User, device: str, ino: int) -> list[tuple[bytes, dict[str, int]]]:
    """All entries of a directory with their attributes: '.', '..', then by name."""
    me = _dir(cur, u, ino, lock=False)
    cur.execute("SELECT parent FROM dentries WHERE inode = %s LIMIT 1", (ino,))
    row = cur.fetchone()
    up = _inode(cur, u, row[0]) if row and ino != u.root else me
    cur.execute(f"SELECT d.name, {_cols('i')}"
                " FROM dentries d JOIN inodes i ON i.id = d.inode"
                " WHERE d.parent = %s ORDER BY d.name", (ino,))
    return [(b".", me), (b"..", up), *((r[0], _attr(r[1:])) for r in cur.fetchall())]


@op
def readlink(cur: Cursor, u: User, device: str, ino: int) -> bytes:
    _inode(cur, u, ino)
    cur.execute("SELECT target FROM inodes WHERE id = %s", (ino,))
    target = cur.fetchone()[0]
    if target is None:
        raise FSError(errno.EINVAL, "not a symlink")
    return bytes(target)


@op
def open(cur: Cursor, u: User, device: str, ino: int, version: int | None = None,
         read: bool = False) -> dict[str, Any]:
    """Attributes and the extent list of a file's current (or a given) version.

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
        " (SELECT extents FROM versions v WHERE v.inode = i.id"
        " AND v.version = coalesce(%s, i.version))"
        " FROM inodes i WHERE i.id = %s AND i.owner_id = %s",
        (now, read, ino, u.id, now - 86_400 * 10**9, version, ino, u.id))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, f"no inode {ino}")
    a = {**_attr(row[:13]), "atime": row[13]}
    if version is None:
        version = a["version"]
    if version and row[14] is None:
        raise FSError(errno.ENOENT, f"no version {version}")
    return {"attr": a, "extents": msgpack.unpackb(row[14]) if version else []}


@op
def statfs(cur: Cursor, u: User, device: str) -> dict[str, int]:
    cur.execute("SELECT quota_bytes, used_bytes FROM users WHERE id = %s", (u.id,))
    quota, used = cur.fetchone()
    cur.execute("SELECT count(*) FROM inodes WHERE owner_id = %s", (u.id,))
    return {"quota": quota, "used": used, "inodes": cur.fetchone()[0]}


@op
def have_blocks(cur: Cursor, u: User, device: str, keys: list[bytes]) -> list[bytes]:
    """The subset of ``keys`` that committed versions already reference."""
    if not keys:
        return []
    cur.execute("SELECT hash FROM blocks WHERE hash = ANY(%s) AND refcount > 0", (keys,))
    return [bytes(r[0]) for r in cur.fetchall()]


# --- namespace changes ---------------------------------------------------------

def _new_inode(cur: Cursor, u: User, device: str, parent: int, name: bytes, mode: int,
               uid: int, gid: int, rdev: int = 0, target: bytes | None = None
               ) -> dict[str, Any]:
    """Create an inode and its entry in ``parent``; answer its attributes and the parent's.

    The parent is locked first; the inode, the entry and the parent's new
    times are then written by one statement. The entry's primary key is the
    existence check: if the name is taken, nothing of the statement is kept
    (the transaction rolls back on EEXIST).
    """
    _check_name(name)
    now = time.time_ns()
    p = _dir(cur, u, parent)
    is_dir = stat.S_ISDIR(mode)
    # setgid directories pass their group (and, for subdirectories, the bit) on.
    if p["mode"] & stat.S_ISGID:
        gid = p["gid"]
        if is_dir:
            mode |= stat.S_ISGID
    cur.execute(
        "WITH i AS (INSERT INTO inodes (owner_id, mode, uid, gid, nlink, rdev, size, atime_ns,"
        " mtime_ns, ctime_ns, target) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
        f" RETURNING {_ATTR_COLS}),"
        " d AS (INSERT INTO dentries (parent, name, inode) SELECT %s, %s, id FROM i"
        " ON CONFLICT DO NOTHING RETURNING 1),"
        f" p AS (UPDATE inodes SET ctime_ns = %s, mtime_ns = %s, nlink = nlink + %s"
        f" WHERE id = %s RETURNING {_ATTR_COLS})"
        " SELECT EXISTS (SELECT 1 FROM d), i.*, p.* FROM i, p",
        (u.id, mode, uid, gid, 2 if is_dir else 1, rdev, len(target or b""), now, now, now,
         target, parent, name, now, now, int(is_dir), parent))
    row = cur.fetchone()
    if not row[0]:
        raise FSError(errno.EEXIST, "entry exists")
    a = _attr(row[1:14])
    _log(cur, u, device, ("create", a["ino"], parent, name))
    return {**a, "dir": _attr(row[14:])}


@op
def mknod(cur: Cursor, u: User, device: str, parent: int, name: bytes, mode: UInt31, uid: UInt31,
          gid: UInt31, rdev: UInt31 = 0) -> dict[str, int]:
    """Create a file, directory, FIFO or socket (the type is in ``mode``)."""
    if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO, stat.S_IFSOCK,
                                 stat.S_IFCHR, stat.S_IFBLK):
        raise FSError(errno.EINVAL, "bad file type")
    return _new_inode(cur, u, device, parent, name, mode, uid, gid, rdev)


@op
def symlink(cur: Cursor, u: User, device: str, parent: int, name: bytes, target: bytes,
            uid: UInt31, gid: UInt31) -> dict[str, int]:
    if len(target) > 4095:
        raise FSError(errno.ENAMETOOLONG, "symlink target too long")
    return _new_inode(cur, u, device, parent, name, stat.S_IFLNK | 0o777, uid, gid,
                      target=target)


@op
def link(cur: Cursor, u: User, device: str, ino: int, parent: int, name: bytes
         ) -> dict[str, int]:
    _check_name(name)
    now = time.time_ns()
    locked = _lock(cur, u, ino, parent)
    if stat.S_ISDIR(locked[ino]["mode"]):
        raise FSError(errno.EPERM, "hard link to a directory")
    if locked[ino]["nlink"] == 0:
        raise FSError(errno.ENOENT, "file was removed")
    _dir(cur, u, parent)
    if _child(cur, parent, name) is not None:
        raise FSError(errno.EEXIST, "entry exists")
    cur.execute("INSERT INTO dentries (parent, name, inode) VALUES (%s, %s, %s)",
                (parent, name, ino))
    cur.execute(f"UPDATE inodes SET nlink = nlink + 1, ctime_ns = %s WHERE id = %s"
                f" RETURNING {_ATTR_COLS}", (now, ino))
    a = _attr(cur.fetchone())
    d = _touch(cur, parent, now)
    _log(cur, u, device, ("link", ino, parent, name))
    return {**a, "dir": d}


@op
def unlink(cur: Cursor, u: User, device: str, parent: int, name: bytes) -> dict[str, Any]:
    """Remove a non-directory entry; report the inode if it became an orphan.

    The entry is deleted before its inode is looked at (one statement fewer);
    if it names a directory the transaction rolls back on EISDIR.
    """
    now = time.time_ns()
    _dir(cur, u, parent)
    cur.execute("DELETE FROM dentries WHERE parent = %s AND name = %s RETURNING inode",
                (parent, name))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, "no such entry")
    ino = row[0]
    orphan, mode = _drop_link(cur, ino, now)
    if stat.S_ISDIR(mode):
        raise FSError(errno.EISDIR, "is a directory")
    d = _touch(cur, parent, now)
    _log(cur, u, device, ("unlink", ino, parent, name))
    return {"orphan": orphan, "ino": ino, "dir": d}


@op
def rmdir(cur: Cursor, u: User, device: str, parent: int, name: bytes) -> dict[str, Any]:
    if name == b".":
        raise FSError(errno.EINVAL, "cannot remove '.'")
    now = time.time_ns()
    _dir(cur, u, parent)
    ino = _child(cur, parent, name)
    if ino is None:
        raise FSError(errno.ENOENT, "no such entry")
    if not stat.S_ISDIR(_inode(cur, u, ino, lock=True)["mode"]):
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
           new_name: bytes, flags: int = 0) -> dict[str, Any]:
    """Move an entry, replacing or exchanging with an existing one as rename(2) says."""
    _check_name(new_name)
    now = time.time_ns()
    _lock(cur, u, parent, new_parent)
    _dir(cur, u, parent)
    _dir(cur, u, new_parent)
    src = _child(cur, parent, name)
    if src is None:
        raise FSError(errno.ENOENT, "no such entry")
    dst = _child(cur, new_parent, new_name)
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
    if flags & RENAME_EXCHANGE and dst_dir and parent != new_parent \
            and _is_ancestor(cur, dst, parent):
        raise FSError(errno.EINVAL, "cannot move a directory into itself")
    if src == dst:
        return {"orphan": None, "ino": None, "replaced": None, "dirs": []}
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
    if flags & RENAME_EXCHANGE:
        changes.append(("rename", dst, parent, name))
    _log(cur, u, device, *changes)
    return {"orphan": orphan, "ino": src, "replaced": dst, "dirs": dirs}


def _setattr(cur: Cursor, a: dict[str, int], mode: int | None = None, uid: int | None = None,
             gid: int | None = None, atime: int | None = None, mtime: int | None = None
             ) -> dict[str, int]:
    """Change mode, owner or times of the locked inode ``a``; ctime becomes now."""
    sets, vals = ["ctime_ns = %s"], [time.time_ns()]
    if mode is None and (uid is not None or gid is not None) and not stat.S_ISDIR(a["mode"]):
        # chown drops set-user-ID, and set-group-ID when group-executable, as on Linux
        mode = a["mode"] & ~dropped_privileges(a["mode"])
    if mode is not None:
        sets.append("mode = %s")
        vals.append(stat.S_IFMT(a["mode"]) | stat.S_IMODE(mode))
    for col, v in (("uid", uid), ("gid", gid), ("atime_ns", atime), ("mtime_ns", mtime)):
        if v is not None:
            sets.append(f"{col} = %s")
            vals.append(v)
    cur.execute(f"UPDATE inodes SET {', '.join(sets)} WHERE id = %s RETURNING {_ATTR_COLS}",
                (*vals, a["ino"]))
    return _attr(cur.fetchone())


# The changes ``_setattr`` takes: what a commit's ``attrs`` may hold.
SETATTR_KEYS = frozenset(inspect.signature(_setattr).parameters) - {"cur", "a"}


@op
def setattr(cur: Cursor, u: User, device: str, ino: int, mode: UInt31 | None = None,
            uid: UInt31 | None = None, gid: UInt31 | None = None, atime: int | None = None,
            mtime: int | None = None) -> dict[str, int]:
    """Change mode, owner or times; ctime becomes now. Size changes are commits."""
    attr = _setattr(cur, _inode(cur, u, ino, lock=True), mode, uid, gid, atime, mtime)
    _log(cur, u, device, ("setattr", ino, None, None))
    return attr


# --- extended attributes ---------------------------------------------------------


def _xattr_name(name: bytes) -> None:
    if not name.startswith(XATTR_NAMESPACES):
        raise FSError(errno.EOPNOTSUPP, "unsupported xattr namespace")
    if len(name) > 255:
        raise FSError(errno.ERANGE, "xattr name too long")


@op
def setxattr(cur: Cursor, u: User, device: str, ino: int, name: bytes, value: bytes) -> None:
    """Set an attribute (pyfuse3 checks XATTR_CREATE/XATTR_REPLACE before calling)."""
    _xattr_name(name)
    if len(value) > 65536:
        raise FSError(errno.E2BIG, "xattr value too large")
    _inode(cur, u, ino, lock=True)
    cur.execute("INSERT INTO xattrs (inode, name, value) VALUES (%s, %s, %s)"
                " ON CONFLICT (inode, name) DO UPDATE SET value = excluded.value",
                (ino, name, value))
    cur.execute("UPDATE inodes SET ctime_ns = %s WHERE id = %s", (time.time_ns(), ino))
    _log(cur, u, device, ("xattr", ino, None, None))


@op
def getxattr(cur: Cursor, u: User, device: str, ino: int, name: bytes) -> bytes:
    _inode(cur, u, ino)
    cur.execute("SELECT value FROM xattrs WHERE inode = %s AND name = %s", (ino, name))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENODATA, "no such xattr")
    return bytes(row[0])


@op
def listxattr(cur: Cursor, u: User, device: str, ino: int) -> list[bytes]:
    _inode(cur, u, ino)
    cur.execute("SELECT name FROM xattrs WHERE inode = %s ORDER BY name", (ino,))
    return [bytes(r[0]) for r in cur.fetchall()]


@op
def removexattr(cur: Cursor, u: User, device: str, ino: int, name: bytes) -> None:
    _inode(cur, u, ino, lock=True)
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


def _conflict_name(name: bytes, device: str) -> bytes:
    """``NAME (conflicted copy HOST YYYY-MM-DD HHMMSS).EXT``, at most 255 bytes."""
    stem, dot, ext = name.rpartition(b".")
    if not dot or not stem:
        stem, dot, ext = name, b"", b""
    host = device.split("/")[0].encode()
    tag = b" (conflicted copy %s %s)" % (host, time.strftime("%Y-%m-%d %H%M%S").encode())
    tail = tag + dot + ext
    return stem[:max(1, NAME_MAX - len(tail))] + tail


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
        copy_name = _conflict_name(name + b" %d" % n, device)
    a = _new_inode(cur, u, device, parent, copy_name, stat.S_IFREG | stat.S_IMODE(mode), uid,
                   gid)
    return {**_commit(cur, u, device, a, extents, size, mtime), "dir": a["dir"]}


def _commit(cur: Cursor, u: User, device: str, a: dict[str, int], extents: list, size: int,
            mtime: int, kill_priv: bool = False) -> dict[str, int]:
    """Add a version to the locked inode ``a`` and make it current.

    ``kill_priv``: the writer was unprivileged, so set-user-ID (and
    set-group-ID on a group-executable file) is dropped, as Linux does.
    """
    ino = a["ino"]
    grow = size - a["size"]
    version = a["version"] + 1
    alloc = sum(n for k, n in extents if k is not None)
    kill = dropped_privileges(a["mode"]) if kill_priv else 0
    keys, sizes, counts = _refs(extents)
    # One statement: the quota, the version row, its block references and the
    # inode. Over quota, it is all rolled back by the exception below.
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
        f" alloc = %s, mode = mode & ~%s WHERE id = %s RETURNING {_ATTR_COLS})"
        " SELECT q.*, i.* FROM q, i",
        (grow, u.id, ino, version, size, msgpack.packb(extents), u.id, device,
         keys, sizes, counts, version, size, mtime, time.time_ns(), alloc, kill, ino))
    row = cur.fetchone()
    quota, used = row[:2]
    if quota and grow > 0 and used > quota:
        raise FSError(errno.EDQUOT, "storage quota exceeded")  # the transaction rolls back
    _log(cur, u, device, ("write", ino, None, None))
    _expire_versions(cur, ino, version)
    return _attr(row[2:])


# Retention: a version is dropped once it is both beyond the newest KEEP_VERSIONS
# and older than KEEP_DAYS (the server's --keep-versions / --keep-days).
RETENTION = {"versions": 100, "days": 30}


def _expire_versions(cur: Cursor, ino: int, current: int) -> None:
    if current <= RETENTION["versions"]:
        return  # no version is beyond the newest KEEP_VERSIONS yet
    cur.execute("DELETE FROM versions WHERE inode = %s AND version <= %s"
                " AND created < now() - make_interval(days => %s) RETURNING extents",
                (ino, current - RETENTION["versions"], RETENTION["days"]))
    for (ext,) in cur.fetchall():
        _unref(cur, msgpack.unpackb(ext))


@op
def commit(cur: Cursor, u: User, device: str, ino: int, base: int,
           extents: list[tuple[bytes | None, int]], size: int,
           mtime: int, kill_priv: bool = False, parent: int | None = None,
           name: bytes | None = None, attrs: dict[str, int] | None = None
           ) -> dict[str, Any]:
    """Make ``extents`` the new current version of file ``ino``.

    ``base`` is the version the writer started from. If another commit came
    first, or the file was deleted meanwhile, nothing of the original changes:
    the bytes are saved as a conflicted copy next to it (``parent``/``name``
    are where the writer last saw the file) and the answer names the copy.
    The blocks must already be in the block store: a version never references
    a missing block. ``attrs`` are mode, owner or time changes the writer made
    while writing a file that has no version yet (see ``OpenFile.defer``):
    they are applied after the new version (or to the conflicted copy), in
    the same transaction.
    """
    if sum(n for _, n in extents) != size:
        raise FSError(errno.EINVAL, "extents do not add up to size")
    attrs = attrs or {}
    if not (isinstance(attrs, dict) and set(attrs) <= SETATTR_KEYS
            and all(type(v) is int for v in attrs.values())):
        raise FSError(errno.EINVAL, "bad attributes")
    cur.execute(f"SELECT {_ATTR_COLS} FROM inodes WHERE id = %s AND owner_id = %s FOR UPDATE",
                (ino, u.id))
    row = cur.fetchone()
    a = _attr(row) if row else None
    if a is not None and not stat.S_ISREG(a["mode"]):
        raise FSError(errno.EINVAL, "not a regular file")
    if a is not None and a["version"] == base and (a["nlink"] > 0 or name is None):
        attr = _commit(cur, u, device, a, extents, size, mtime, kill_priv)
        return {"attr": _setattr(cur, attr, **attrs) if attrs else attr}
    if name is None:
        raise (Conflict(a["version"]) if a else FSError(errno.ENOENT, "file was deleted"))
    copy = _save_conflict(cur, u, device, ino, parent or u.root, name, extents, size, mtime)
    if attrs:
        copy = {**_setattr(cur, copy, **attrs), "dir": copy["dir"]}
    return {"attr": a, "conflict": copy}


@op
def versions(cur: Cursor, u: User, device: str, ino: int) -> list[dict[str, Any]]:
    """The kept versions of a file, newest first."""
    _inode(cur, u, ino)
    cur.execute("SELECT v.version, v.size, extract(epoch FROM v.created)::float8, v.device,"
                " coalesce(us.name, '') FROM versions v LEFT JOIN users us ON us.id = v.user_id"
                " WHERE v.inode = %s ORDER BY v.version DESC", (ino,))
    return [dict(zip(("version", "size", "time", "device", "user"), r, strict=True))
            for r in cur.fetchall()]


@op
def restore(cur: Cursor, u: User, device: str, ino: int, version: int) -> dict[str, int]:
    """Make an old version current again, as a new version (history is kept)."""
    a = _inode(cur, u, ino, lock=True)
    cur.execute("SELECT size, extents FROM versions WHERE inode = %s AND version = %s",
                (ino, version))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, f"no version {version}")
    return _commit(cur, u, device, a, msgpack.unpackb(row[1]), row[0], time.time_ns())


@op
def purge(cur: Cursor, u: User, device: str, ino: int) -> bool:
    """Delete an orphan (nlink 0) with its versions; True if it was deleted."""
    cur.execute("SELECT nlink, size FROM inodes WHERE id = %s AND owner_id = %s FOR UPDATE",
                (ino, u.id))
    row = cur.fetchone()
    if row is None or row[0] > 0:
        return False
    cur.execute("SELECT extents FROM versions WHERE inode = %s", (ino,))
    for (ext,) in cur.fetchall():
        _unref(cur, msgpack.unpackb(ext))
    cur.execute("DELETE FROM inodes WHERE id = %s", (ino,))
    cur.execute("UPDATE users SET used_bytes = used_bytes - %s WHERE id = %s", (row[1], u.id))
    return True


