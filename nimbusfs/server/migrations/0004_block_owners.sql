-- Version 4: which blocks each user may reference (the trust model for blocks).
-- A user may use a block in a commit, or learn from have_blocks that it is
-- stored, only if a row here says so: the user uploaded it (through the
-- metaserver, which hashed it: possession shown) or committed it before. A
-- block shared by several users has a row for each; nobody learns of the
-- others. Existing versions' blocks are added by the Python step of this
-- migration (extents are msgpack, which SQL cannot read).
CREATE TABLE block_owners (
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash        bytea NOT NULL,
    PRIMARY KEY (user_id, hash)
);
