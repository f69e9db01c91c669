-- Version 10: orphans held by live mounts (block GC, issue 16). An orphan (a
-- file unlinked while a mount has it open) is purged by that mount at its last
-- close; GC purges the ones a dead mount left, once ORPHAN_AGE has passed since
-- they lost their last link or were last held. held_ns: when a mount last said
-- it still has the file open (hold_orphans), so a process keeping a deleted
-- file open for weeks keeps it.
ALTER TABLE inodes ADD COLUMN held_ns bigint;
-- GC and fsck look for orphans every round: a partial index, not a table scan.
CREATE INDEX inodes_orphans ON inodes (id) WHERE nlink = 0;
