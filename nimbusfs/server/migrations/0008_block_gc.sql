-- Version 8: block GC and fsck (nimbusfs/server/gc.py, nimbusfs/server/fsck.py).
-- A block row's state: 'live' (its object is in the store: whoever made it
-- live saw it there after the row existed), 'pending' (a put or a commit is
-- making sure the object is there), 'doomed' (GC is deleting the object; the
-- row goes once it is gone). Only live blocks may be referenced by a commit.
-- Rows that exist now were all made after their block was stored: live.
ALTER TABLE blocks ADD COLUMN state text NOT NULL DEFAULT 'live'
    CHECK (state IN ('pending', 'live', 'doomed'));
-- What GC looks for: unreferenced blocks, oldest first.
CREATE INDEX blocks_unreferenced ON blocks (unref_since) WHERE refcount = 0;
-- Versions fsck found to need a block the store lost: reading them answers
-- EIO (never other bytes), and fsck lists them until a version replaces them.
ALTER TABLE versions ADD COLUMN damaged boolean NOT NULL DEFAULT false;
