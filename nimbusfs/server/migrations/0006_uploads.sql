-- Version 6: resumable uploads of the HTTP API (nimbusfs/server/uploads.py).
-- A chunk's bytes are cut into blocks and stored as they arrive; the chunk
-- row keeps its extent list, so an upload survives a server restart and is
-- served by any replica. Completing concatenates the chunks' extents.
CREATE TABLE uploads (
    id               text PRIMARY KEY,
    user_id          bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name             bytea NOT NULL,
    parent           bigint,                  -- the folder of a new file
    file_id          bigint,                  -- or the file whose content it replaces
    expected_version bigint,
    on_exists        text NOT NULL DEFAULT 'fail',
    size             bigint NOT NULL,
    checksum         bytea,                   -- SHA-256 the client declared
    created          timestamptz NOT NULL DEFAULT now(),
    expires          timestamptz NOT NULL,
    result           bytea                    -- msgpack: the completed file's id, once done
);
CREATE INDEX uploads_expires ON uploads(expires);

CREATE TABLE upload_chunks (
    upload_id   text NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    n           integer NOT NULL,
    size        bigint NOT NULL,
    extents     bytea NOT NULL,
    PRIMARY KEY (upload_id, n)
);
