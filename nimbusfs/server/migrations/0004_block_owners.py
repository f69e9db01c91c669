"""The Python step of migration 0004: every block a user's kept versions
reference becomes theirs to use (``block_owners``), so that existing files
can still be committed over after the upgrade."""

from __future__ import annotations

import msgpack
import psycopg


def apply(conn: psycopg.Connection) -> None:
    owned: set[tuple[int, bytes]] = set()
    with conn.cursor(name="versions_0004") as cur:  # server-side: any number of versions
        cur.execute("SELECT i.owner_id, v.extents FROM versions v JOIN inodes i ON i.id = v.inode")
        for owner, extents in cur:
            owned.update((owner, bytes(k)) for k, _ in msgpack.unpackb(extents) if k)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO block_owners (user_id, hash) VALUES (%s, %s)"
                        " ON CONFLICT DO NOTHING", sorted(owned))
