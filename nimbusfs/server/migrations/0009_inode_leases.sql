-- Version 9: inode numbers leased to write-back mounts (namespace write-back,
-- issue 16). A mount creates files under numbers taken from this lease
-- without asking the server, and sends the creates later: a create naming a
-- number is accepted once, from its user and lessee only (the row goes with
-- it). The numbers come from inode_seq, so no other inode ever takes them.
-- lessee: a random id the mount keeps in its journal (stable across its
-- restarts, unlike its device name), never shown to another mount.
CREATE TABLE inode_leases (
    ino         bigint PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    lessee      text NOT NULL,
    created     timestamptz NOT NULL DEFAULT now()
);
