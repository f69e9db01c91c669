-- Version 5: the HTTP sync feed's cursor.
-- Sequence numbers are taken before commit, so a lower one can become visible
-- after a higher one; a stateless cursor cannot wait for it. Each change keeps
-- the id of the transaction that made it instead: every transaction with an
-- id below a snapshot's xmin has ended, so "xid >= xmin of the last read" is
-- a lower bound that misses nothing (see nimbusfs/server/feed.py).
ALTER TABLE changes ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX changes_owner_xid ON changes(owner_id, xid, seq);
-- The highest xid of a change trimmed from the log: a cursor below it has
-- lost changes and must start again from a full listing.
CREATE TABLE changes_trimmed (
    id          integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    upto        xid8 NOT NULL DEFAULT '0'
);
INSERT INTO changes_trimmed DEFAULT VALUES;
