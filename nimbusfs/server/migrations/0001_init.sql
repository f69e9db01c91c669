-- nimbusfs schema, version 1.
-- Times are nanoseconds since the epoch (bigint), as stat(2) reports them.
-- Names are bytea: POSIX names are bytes, not text.

CREATE TABLE users (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    root_inode   bigint,
    quota_bytes  bigint NOT NULL DEFAULT 0,          -- 0 = unlimited
    used_bytes   bigint NOT NULL DEFAULT 0,          -- logical bytes of current versions
    created      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tokens (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash        bytea NOT NULL UNIQUE,               -- SHA-256 of the secret; the secret is never stored
    label       text NOT NULL DEFAULT '',
    created     timestamptz NOT NULL DEFAULT now(),
    last_used   timestamptz
);

-- Inode numbers come from a cached sequence (each server process reserves 64 at
-- a time): no hot counter row. 1 is FUSE's root and never a database inode.
CREATE SEQUENCE inode_seq START 2 CACHE 64;

CREATE TABLE inodes (
    id          bigint PRIMARY KEY DEFAULT nextval('inode_seq'),
    owner_id    bigint NOT NULL REFERENCES users(id),  -- the volume it belongs to
    mode        integer NOT NULL,                      -- type and permission bits, as st_mode
    uid         integer NOT NULL,
    gid         integer NOT NULL,
    nlink       integer NOT NULL,
    rdev        integer NOT NULL DEFAULT 0,
    size        bigint NOT NULL DEFAULT 0,
    atime_ns    bigint NOT NULL,
    mtime_ns    bigint NOT NULL,
    ctime_ns    bigint NOT NULL,
    version     bigint NOT NULL DEFAULT 0,             -- current version of the content (0 = empty)
    target      bytea                                   -- symlink target
);

CREATE TABLE dentries (
    parent      bigint NOT NULL REFERENCES inodes(id),
    name        bytea NOT NULL,
    inode       bigint NOT NULL REFERENCES inodes(id),
    PRIMARY KEY (parent, name)
);
CREATE INDEX dentries_inode ON dentries(inode);

CREATE TABLE xattrs (
    inode       bigint NOT NULL REFERENCES inodes(id) ON DELETE CASCADE,
    name        bytea NOT NULL,
    value       bytea NOT NULL,
    PRIMARY KEY (inode, name)
);

-- Every content commit adds a version; the current one is inodes.version.
-- extents: msgpack list of [hash or nil (a hole), length].
CREATE TABLE versions (
    inode       bigint NOT NULL REFERENCES inodes(id) ON DELETE CASCADE,
    version     bigint NOT NULL,
    size        bigint NOT NULL,
    extents     bytea NOT NULL,
    created     timestamptz NOT NULL DEFAULT now(),
    user_id     bigint REFERENCES users(id),
    device      text NOT NULL DEFAULT '',
    PRIMARY KEY (inode, version)
);

-- Reference counts cover every kept version. A block whose count dropped to 0
-- keeps unref_since so GC can wait out a grace period (uploads in flight).
CREATE TABLE blocks (
    hash        bytea PRIMARY KEY,
    size        integer NOT NULL,
    refcount    bigint NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    unref_since timestamptz
);

-- Change log: the sync cursor and the source of pushed invalidations.
CREATE TABLE changes (
    seq         bigserial PRIMARY KEY,
    owner_id    bigint NOT NULL,
    inode       bigint NOT NULL,
    parent      bigint,
    name        bytea,
    kind        text NOT NULL,
    device      text NOT NULL DEFAULT '',
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX changes_owner_seq ON changes(owner_id, seq);

