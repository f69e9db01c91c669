-- Version 10: orphans held by live mounts (block GC, issue 16). An orphan (a
-- file unlinked while a mount has it open) is purged by that mount at its last
-- close; GC purges the ones a dead mount left, once ORPHAN_AGE has passed since
-- they lost their last link or were last held. held_ns: when a mount last said
-- it still has the file open (hold_orphans), so a process keeping a deleted
-- file open for weeks keeps it. Nullable without a default: no table rewrite,
-- the lock on inodes is brief. No index for the orphan scan: it runs once per
-- GC round, and an index on nlink would make every link count change update
-- an index.
ALTER TABLE inodes ADD COLUMN held_ns bigint;
