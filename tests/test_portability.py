"""What the server asks of PostgreSQL beyond portable SQL: the list docs/scaling.md works from.

A distributed PostgreSQL-compatible engine (docs/scaling.md names YugabyteDB)
runs the common SQL the schema is written in, but not everything PostgreSQL
has. These tests keep the inventory there true: a new PostgreSQL-only
feature in the code or the schema fails them until it is added (with what
replaces it) to both.
"""

from __future__ import annotations

import pathlib
import re

import psycopg

import nimbusfs

# Each PostgreSQL-only feature the server uses (pattern, case-insensitive):
# where, as docs/scaling.md's table lists it.
USED = {
    r"\bLISTEN\b": {"metaserver.py"},
    r"\bpg_notify\b": {"namespace.py"},
    r"\bxid8\b": {"feed.py", "0005_sync_feed.sql"},
    r"\bpg_current_xact_id\b": {"0005_sync_feed.sql"},
    r"\bpg_current_snapshot\b|\bpg_snapshot_xmin\b": {"feed.py"},
    r"\bpg_(try_)?advisory_(un)?lock\b": {"db.py", "gc.py"},
    r"\bCREATE SEQUENCE\b|\bnextval\b": {"0001_init.sql", "namespace.py"},
    r"\bbigserial\b": {"0001_init.sql"},
}
# Features the server must not start using without the same review.
AVOIDED = [r"\bCREATE TRIGGER\b", r"\bCREATE (OR REPLACE )?FUNCTION\b", r"\bLOCK TABLE\b",
           r"\bDEFERRABLE\b", r"\bEXCLUDE USING\b", r"\bgist\b", r"\bctid\b",
           r"\bCREATE EXTENSION\b", r"\bINHERITS\b",
           r"\bGENERATED ALWAYS AS\b"]


def _sources() -> dict[str, str]:
    root = pathlib.Path(nimbusfs.__file__).parent
    files = [*root.glob("server/**/*.py"), *root.glob("server/migrations/*.sql"),
             root / "api.py"]
    return {f.name: f.read_text() for f in files}


def test_the_postgresql_only_features_used_are_the_documented_ones():
    sources = _sources()
    found = {pattern: {name for name, text in sources.items()
                       if re.search(pattern, text, re.IGNORECASE)} for pattern in USED}
    assert found == USED
    for pattern in AVOIDED:
        users = sorted(n for n, t in sources.items() if re.search(pattern, t, re.IGNORECASE))
        assert not users, f"{pattern} in {users}: see docs/scaling.md"


def test_the_migrated_schema_has_only_portable_objects(services):
    """On a migrated database: every table has a primary key (a distributed
    engine shards by it), no triggers, functions or extensions, the column types
    are few, and the sequences are the four the inventory names."""
    with psycopg.connect(services.deployments["local"].dsn) as conn:
        def rows(sql: str) -> list[tuple]:
            return conn.execute(sql).fetchall()

        tables = {r[0] for r in rows("SELECT relname FROM pg_class WHERE relkind = 'r'"
                                     " AND relnamespace = 'public'::regnamespace")}
        keyed = {r[0] for r in rows("SELECT conrelid::regclass::text FROM pg_constraint"
                                    " WHERE contype = 'p'")}
        assert tables <= keyed, tables - keyed
        assert rows("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal") == []
        assert rows("SELECT proname FROM pg_proc"
                    " WHERE pronamespace = 'public'::regnamespace") == []
        assert rows("SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'") == []
        types = {r[0] for r in rows("SELECT DISTINCT data_type FROM information_schema.columns"
                                    " WHERE table_schema = 'public'")}
        assert types == {"bigint", "integer", "text", "bytea", "boolean",
                         "timestamp with time zone", "xid8"}
        sequences = {r[0] for r in rows("SELECT relname FROM pg_class WHERE relkind = 'S'")}
        assert sequences == {"inode_seq", "users_id_seq", "tokens_id_seq", "changes_seq_seq"}
