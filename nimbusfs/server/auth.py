"""Users and tokens.

A token is ``nfs_`` + 32 random bytes (url-safe base64). Only its SHA-256 is
stored, so a database leak does not leak credentials; SHA-256 (not a slow KDF)
is enough because the secret has 256 bits of entropy.
"""

from __future__ import annotations

import errno
import hashlib
import secrets
import time
from dataclasses import dataclass

from psycopg import Cursor

from nimbusfs.errors import FSError
from nimbusfs.server.db import one


@dataclass(frozen=True)
class User:
    id: int
    name: str
    root: int
    admin: bool = False     # sees the whole store's totals (storage stats)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create_user(cur: Cursor, name: str, quota_bytes: int = 0, admin: bool = False) -> User:
    """Create a user with an empty root directory (owned by root, mode 0755)."""
    cur.execute("SELECT id FROM users WHERE name = %s", (name,))
    if cur.fetchone():
        raise FSError(errno.EEXIST, f"user {name!r} exists")
    cur.execute("INSERT INTO users (name, quota_bytes, admin) VALUES (%s, %s, %s) RETURNING id",
                (name, quota_bytes, admin))
    uid = one(cur)[0]
    now = time.time_ns()
    cur.execute(
        "INSERT INTO inodes (owner_id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns)"
        " VALUES (%s, %s, 0, 0, 2, %s, %s, %s) RETURNING id",
        (uid, 0o040755, now, now, now))
    root = one(cur)[0]
    cur.execute("UPDATE users SET root_inode = %s WHERE id = %s", (root, uid))
    return User(uid, name, root, admin)


def create_token(cur: Cursor, user_name: str, label: str = "") -> str:
    """Issue a new token for a user and return the secret (shown once)."""
    cur.execute("SELECT id FROM users WHERE name = %s", (user_name,))
    row = cur.fetchone()
    if not row:
        raise FSError(errno.ENOENT, f"no user {user_name!r}")
    token = "nfs_" + secrets.token_urlsafe(32)
    cur.execute("INSERT INTO tokens (user_id, hash, label) VALUES (%s, %s, %s)",
                (row[0], token_hash(token), label))
    return token


def authenticate(cur: Cursor, token: str) -> User:
    cur.execute(
        "UPDATE tokens t SET last_used = now() FROM users u"
        " WHERE t.hash = %s AND u.id = t.user_id RETURNING u.id, u.name, u.root_inode, u.admin",
        (token_hash(token),))
    row = cur.fetchone()
    if not row:
        raise FSError(errno.EACCES, "invalid token")
    return User(*row)
