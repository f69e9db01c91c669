"""The sync feed: what changed in a user's volume since a cursor (HTTP ``/sync``).

It reads the change log that drives the mounts' pushes. Each entry is the
*current* state of a changed inode (or that it is gone), never a delta, so an
entry delivered twice is harmless; that is what lets a stateless cursor miss
nothing.

A change's sequence number is taken before its transaction commits, so a
lower number may become visible after a higher one: a cursor of sequence
numbers would skip it. The cursor holds transaction ids instead (the
``changes.xid`` column): every transaction whose id is below a snapshot's
``xmin`` had ended when the snapshot was taken, so a round that reads every
change with ``xid >= lo`` and ends with the next round's ``lo`` set to the
``xmin`` of its own first read misses nothing; changes committed while the
round ran may come again in the next.

Cursors (opaque to clients; ``0`` starts):

- ``f.NEXT.AFTER``: a full listing, inodes after id AFTER; then the log from NEXT;
- ``l.LO``: the log from transaction id LO;
- ``l.LO.NEXT.XID.SEQ``: the same round, continuing after change (XID, SEQ).

A cursor whose changes were trimmed from the log (``changes_trimmed``) starts
again from a full listing, with ``reset`` set.
"""

from __future__ import annotations

import errno
import re
from typing import Any

from psycopg import Cursor

from nimbusfs.errors import FSError
from nimbusfs.server.auth import User
from nimbusfs.server.db import one
from nimbusfs.server.namespace import entry

_N = r"(\d{1,19})"
_CURSOR = re.compile(rf"0|f\.{_N}\.{_N}|l\.{_N}(?:\.{_N}\.{_N}\.{_N})?")


def _parse(cursor: str) -> tuple[Any, ...]:
    m = _CURSOR.fullmatch(cursor)
    if m is None:
        raise FSError(errno.EINVAL, "malformed cursor")
    if cursor == "0":
        return ("0",)
    if m[1] is not None:
        return ("f", int(m[1]), int(m[2]))
    return ("l", int(m[3]), *(int(g) for g in m.groups()[3:] if g is not None))


def _xmin(cur: Cursor) -> int:
    cur.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    return one(cur)[0]


def _state(cur: Cursor, u: User, device: str, ino: int, parent: int | None,
           name: bytes | None) -> dict[str, Any]:
    """An inode's current entry, or that it is gone (with where it last was)."""
    try:
        return {**entry(cur, u, device, ino), "deleted": False}
    except FSError as e:
        if e.errno != errno.ENOENT:
            raise
        return {"ino": ino, "deleted": True, "parent": parent, "name": name or b""}


def page(cur: Cursor, u: User, device: str, cursor: str, limit: int) -> dict[str, Any]:
    """Up to ``limit`` entries after ``cursor``; the next cursor; ``has_more``; ``reset``.

    ``own``: every change of the entry in this page came from ``device``.
    """
    kind, *n = _parse(cursor)
    reset = False
    if kind == "l":
        cur.execute("SELECT upto::text::bigint FROM changes_trimmed")
        row = cur.fetchone()
        if row is not None and n[0] <= row[0]:
            kind, reset = "0", True
    if kind == "0":
        kind, n = "f", [_xmin(cur), 0]
    if kind == "f":
        nxt, after = n
        cur.execute("SELECT id FROM inodes WHERE owner_id = %s AND nlink > 0 AND id > %s"
                    " AND id <> %s ORDER BY id LIMIT %s", (u.id, after, u.root, limit + 1))
        inos = [r[0] for r in cur.fetchall()]
        more = len(inos) > limit
        inos = inos[:limit]
        entries = [{**_state(cur, u, device, i, None, None), "own": False} for i in inos]
        return {"entries": entries, "has_more": more, "reset": reset,
                "cursor": f"f.{nxt}.{inos[-1]}" if more else f"l.{nxt}"}
    if len(n) == 1:  # a round's first page: the next round starts at this read's xmin
        n = [*n, _xmin(cur), 0, 0]
    lo, nxt, pos_xid, pos_seq = n
    cur.execute("SELECT xid::text::bigint, seq, inode, parent, name, device FROM changes"
                " WHERE owner_id = %s AND xid >= %s::text::xid8"
                " AND (xid, seq) > (%s::text::xid8, %s) ORDER BY xid, seq LIMIT %s",
                (u.id, lo, pos_xid, pos_seq, limit + 1))
    rows = cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    last: dict[int, tuple[int | None, bytes | None]] = {}
    own: dict[int, bool] = {}
    for _, _, ino, parent, name, dev in rows:
        last[ino] = (parent, bytes(name) if name is not None else None)
        own[ino] = own.get(ino, True) and dev == device
    entries = [{**_state(cur, u, device, ino, *where), "own": own[ino]}
               for ino, where in last.items() if ino != u.root]
    return {"entries": entries, "has_more": more, "reset": reset,
            "cursor": f"l.{lo}.{nxt}.{rows[-1][0]}.{rows[-1][1]}" if more else f"l.{nxt}"}


def pending(cur: Cursor, u: User, device: str, cursor: str) -> bool:
    """Whether ``page`` would return anything for ``cursor`` (a long-poll's first look)."""
    kind, *n = _parse(cursor)
    if kind != "l":
        return True
    cur.execute("SELECT EXISTS (SELECT 1 FROM changes WHERE owner_id = %s"
                " AND xid >= %s::text::xid8 AND (xid, seq) > (%s::text::xid8, %s))"
                " OR (SELECT upto::text::bigint >= %s FROM changes_trimmed)",
                (u.id, n[0], n[2] if len(n) > 1 else 0, n[3] if len(n) > 1 else 0, n[0]))
    return bool(one(cur)[0])
