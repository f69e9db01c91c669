"""Resumable uploads (HTTP ``/uploads``): sessions whose chunks arrive in any order.

Each chunk is cut into blocks and stored when it arrives (``BlockAccess.ingest``),
and its row keeps the chunk's extent list: nothing of an upload waits in
memory or in the database, it survives a restart of the server and any
replica can take the next chunk. A chunk sent again replaces itself.
Completing concatenates the chunks' extents and commits them with the
namespace's rules (``put_file`` or ``replace``), in one transaction that also
records the answer, so that a repeated complete answers the same.

The chunks are cut independently, so blocks at the seams between chunks are
not the ones a mount writing the same bytes would cut: deduplication with a
mount's copy holds for the blocks inside the chunks (content-defined cuts
fall back in step within a block or two of a seam), not at the seams.

Uploads expire (``EXPIRY``); ``expire`` deletes them; their blocks, referenced
by nothing, are left to block GC.
"""

from __future__ import annotations

import errno
import secrets
import stat
from typing import Any

import msgpack
from psycopg import Cursor

from nimbusfs.errors import FSError
from nimbusfs.server.auth import User
from nimbusfs.server.db import one
from nimbusfs.server.namespace import BIGINT_MAX, check_name, directory, inode, put_file, replace

EXPIRY_HOURS = 24
# The most chunks an upload may have (each at least one byte).
MAX_CHUNKS = 100_000


def _session(cur: Cursor, u: User, upload_id: str, lock: bool = False) -> dict[str, Any]:
    cur.execute("SELECT size, checksum, expires, result, name, parent, file_id,"
                " expected_version, on_exists FROM uploads WHERE id = %s AND user_id = %s"
                " AND expires > now()" + (" FOR UPDATE" if lock else ""), (upload_id, u.id))
    row = cur.fetchone()
    if row is None:
        raise FSError(errno.ENOENT, "no such upload (or it expired)")
    keys = ("size", "checksum", "expires", "result", "name", "parent", "file_id",
            "expected_version", "on_exists")
    return dict(zip(keys, row, strict=True))


def create(cur: Cursor, u: User, device: str, name: bytes, parent: int | None,
           file_id: int | None, expected_version: int | None, on_exists: str, size: int,
           checksum: bytes | None) -> dict[str, Any]:
    """Open an upload of ``size`` bytes; EDQUOT now if the quota cannot take them.

    The folder (or the file to replace) must be the user's now: nothing of
    another user's volume takes a chunk.
    """
    check_name(name)
    if not 0 <= size <= BIGINT_MAX:
        raise FSError(errno.EINVAL, "size must be a non-negative int64")
    if file_id is not None:
        if not stat.S_ISREG(inode(cur, u, file_id)["mode"]):
            raise FSError(errno.EISDIR, "only a file's content can be replaced")
    else:
        directory(cur, u, parent or u.root, lock=False)
    cur.execute("SELECT quota_bytes, used_bytes FROM users WHERE id = %s", (u.id,))
    quota, used = one(cur)
    if quota and used + size > quota:
        raise FSError(errno.EDQUOT, f"the upload needs {size} bytes; {quota - used} are free")
    upload_id = secrets.token_urlsafe(18)
    cur.execute("INSERT INTO uploads (id, user_id, name, parent, file_id, expected_version,"
                " on_exists, size, checksum, expires) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, now() + make_interval(hours => %s)) RETURNING expires",
                (upload_id, u.id, name, parent, file_id, expected_version, on_exists, size,
                 checksum, EXPIRY_HOURS))
    return {"upload_id": upload_id, "expires": one(cur)[0]}


def status(cur: Cursor, u: User, device: str, upload_id: str) -> dict[str, Any]:
    """The chunks received, and ``uploaded_bytes``: how far from the start they are contiguous."""
    s = _session(cur, u, upload_id)
    cur.execute("SELECT n, size FROM upload_chunks WHERE upload_id = %s ORDER BY n",
                (upload_id,))
    chunks = cur.fetchall()
    contiguous = 0
    for i, (n, size) in enumerate(chunks):
        if n != i:
            break
        contiguous += size
    return {"size": s["size"], "expires": s["expires"], "completed": s["result"] is not None,
            "uploaded_bytes": contiguous, "chunks": [{"n": n, "size": n_} for n, n_ in chunks]}


def add_chunk(cur: Cursor, u: User, device: str, upload_id: str, n: int, size: int,
              extents: list, offset: int | None = None) -> dict[str, Any]:
    """Record chunk ``n`` (its blocks are stored); a chunk sent again replaces itself.

    ``offset``: the chunk is bytes from there of a Content-Range upload, so
    it ends the bytes received: chunks after it are dropped (bytes sent again
    from an earlier offset never leave stale ones behind them), and the
    chunks before it must still end at ``offset`` (a request that waited
    while the client started over with other ranges is refused, ESPIPE).
    """
    s = _session(cur, u, upload_id, lock=True)
    if s["result"] is not None:
        raise FSError(errno.EBUSY, "the upload is complete")
    if offset is not None:
        cur.execute("SELECT coalesce(sum(size), 0), count(*) FROM upload_chunks"
                    " WHERE upload_id = %s AND n < %s", (upload_id, n))
        before, count = one(cur)
        if (before, count) != (offset, n):
            raise FSError(errno.ESPIPE, "the upload changed meanwhile; ask where to resume")
        cur.execute("DELETE FROM upload_chunks WHERE upload_id = %s AND n > %s",
                    (upload_id, n))
    if not 0 <= n < min(MAX_CHUNKS, max(s["size"], 1)):
        raise FSError(errno.EINVAL, f"chunk {n} is past the upload's declared size")
    cur.execute("SELECT coalesce(sum(size), 0) FROM upload_chunks WHERE upload_id = %s"
                " AND n <> %s", (upload_id, n))
    if one(cur)[0] + size > s["size"]:
        raise FSError(errno.EFBIG, f"the chunks exceed the declared size of {s['size']} bytes")
    cur.execute("INSERT INTO upload_chunks (upload_id, n, size, extents) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (upload_id, n) DO UPDATE SET size = excluded.size,"
                " extents = excluded.extents", (upload_id, n, size, msgpack.packb(extents)))
    return status(cur, u, device, upload_id)


def chunk_at(cur: Cursor, u: User, device: str, upload_id: str, offset: int) -> int:
    """The index of the chunk that bytes from ``offset`` make (Content-Range uploads).

    An upload by ranges is a stream: its chunks are contiguous from 0, and
    bytes from ``offset`` replace everything from there on. ``offset`` must
    be where the contiguous bytes end, or where one of their chunks starts
    (that chunk and those after it are then dropped by ``add_chunk``);
    else ESPIPE, and the message says where to resume.
    """
    st = status(cur, u, device, upload_id)
    pos = 0
    for i, c in enumerate(st["chunks"]):
        if c["n"] != i or pos > offset:
            break
        if pos == offset:
            return i
        pos += c["size"]
    if offset == st["uploaded_bytes"]:
        return sum(1 for i, c in enumerate(st["chunks"]) if c["n"] == i)
    raise FSError(errno.ESPIPE, f"resume at offset {st['uploaded_bytes']}")


def extents(cur: Cursor, u: User, device: str, upload_id: str) -> dict[str, Any]:
    """The whole upload's extents, or EAGAIN naming what is missing."""
    s = _session(cur, u, upload_id)
    cur.execute("SELECT n, size, extents FROM upload_chunks WHERE upload_id = %s ORDER BY n",
                (upload_id,))
    rows = cur.fetchall()
    missing = sorted(set(range(rows[-1][0] + 1 if rows else 0)) - {r[0] for r in rows})
    total = sum(r[1] for r in rows)
    if missing or total != s["size"]:
        more = "" if total >= s["size"] else f"; {s['size'] - total} more bytes expected" \
            f" from chunk {rows[-1][0] + 1 if rows else 0} on"
        raise FSError(errno.EAGAIN, f"missing chunks {missing[:100]}{more}")
    out: list[list] = []
    for _, _, ext in rows:
        for k, n in msgpack.unpackb(ext):
            if k is None and out and out[-1][0] is None:
                out[-1][1] += n
            else:
                out.append([k, n])
    return {"extents": out, "size": total, "checksum": s["checksum"], "result": s["result"]}


def complete(cur: Cursor, u: User, device: str, upload_id: str, ext: list, size: int,
             mtime: int) -> int:
    """Commit the upload (once); return the file's id. A repeat answers the first result."""
    s = _session(cur, u, upload_id, lock=True)
    if s["result"] is not None:
        return msgpack.unpackb(s["result"])
    if s["file_id"] is not None:
        replace(cur, u, device, s["file_id"], ext, size, mtime, s["expected_version"])
        ino = s["file_id"]
    else:
        ino = put_file(cur, u, device, s["parent"] or u.root, bytes(s["name"]), ext, size,
                       mtime, s["on_exists"])["id"]
    cur.execute("UPDATE uploads SET result = %s WHERE id = %s", (msgpack.packb(ino), upload_id))
    return ino


def abort(cur: Cursor, u: User, device: str, upload_id: str) -> None:
    _session(cur, u, upload_id)
    cur.execute("DELETE FROM uploads WHERE id = %s", (upload_id,))


def expire(cur: Cursor) -> int:
    """Delete expired uploads (their chunks go with them); return how many."""
    cur.execute("DELETE FROM uploads WHERE expires < now()")
    return cur.rowcount
