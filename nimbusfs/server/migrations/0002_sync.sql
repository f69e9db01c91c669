-- Version 2: idempotent replays and per-user version retention.

-- Mutations already applied, by the client's operation id: a request replayed
-- after a lost connection returns the recorded result instead of running twice.
CREATE TABLE applied_ops (
    id          text PRIMARY KEY,
    user_id     bigint NOT NULL,
    result      bytea NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX applied_ops_at ON applied_ops(at);

CREATE INDEX versions_created ON versions(inode, created);
