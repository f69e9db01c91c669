-- Version 3: bytes a file's current version really stores (holes excluded), for st_blocks.
ALTER TABLE inodes ADD COLUMN alloc bigint NOT NULL DEFAULT 0;
UPDATE inodes SET alloc = size WHERE mode & 61440 = 32768;
