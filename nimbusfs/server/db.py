"""PostgreSQL access: the connection pool, migrations and the transaction runner.

psycopg's async API does not run under trio, so the server uses a synchronous
``psycopg_pool.ConnectionPool``; each request runs one transaction in a worker
thread (``trio.to_thread.run_sync``) bounded by a CapacityLimiter the size of
the pool. ``statement_timeout`` bounds every statement.

psycopg's pipeline mode was measured and not kept: over a Unix socket its
per-statement bookkeeping cost more server CPU than the round trips it saved
(mknod 4.7 ms with it, 2.5-3.5 ms without).
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerr
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors after which the whole transaction can safely run again.
_RETRY = (pgerr.SerializationFailure, pgerr.DeadlockDetected)


class Database:
    def __init__(self, dsn: str, pool_size: int = 8, statement_timeout_ms: int = 30_000,
                 outage_timeout: float = 60.0) -> None:
        self.outage_timeout = outage_timeout
        self.pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False,
            # No per-checkout health check (it costs a round trip per request):
            # a broken connection fails its transaction, which run() retries.
            kwargs={"options": f"-c statement_timeout={statement_timeout_ms}"})
        self.pool_size = pool_size

    def open(self) -> None:
        self.pool.open(wait=True, timeout=self.outage_timeout)
        self.migrate()

    def close(self) -> None:
        self.pool.close(timeout=5)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(cur, *args, **kwargs)`` in one transaction and return its result.

        Serialization failures and deadlocks rerun the transaction. A lost
        connection (database restart) is retried with backoff for up to
        ``outage_timeout`` seconds. A transaction that failed on a lost
        connection never committed only if the failure came before COMMIT was
        sent; the operations are written so that a rerun is harmless.
        """
        deadline = time.monotonic() + self.outage_timeout
        delay = 0.05
        while True:
            try:
                # The pool's context commits the transaction the first statement
                # opened, or rolls it back if ``fn`` raised.
                with self.pool.connection() as conn, conn.cursor() as cur:
                    return fn(cur, *args, **kwargs)
            except _RETRY:
                continue
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                if isinstance(e, pgerr.QueryCanceled) or time.monotonic() > deadline:
                    raise
                log.warning("database unavailable (%s); retrying in %.2fs", e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def migrate(self) -> None:
        """Apply the SQL files in ``nimbusfs/server/migrations`` not applied yet, in order.

        A migration that needs more than SQL (e.g. reading msgpack columns)
        has a Python module of the same name beside its SQL file, whose
        ``apply(conn)`` runs after the SQL in the same transaction. An
        advisory lock serialises replicas that start at the same time: a
        session lock, not a transaction's, so it is released only once all
        is committed (released before its COMMIT, another server read no
        migration as applied and failed creating the first one's tables).
        Each migration is a transaction of its own, committed with its
        ``schema_migrations`` row: a crash leaves the migrations before it.
        """
        files = sorted(
            (f for f in importlib.resources.files("nimbusfs.server.migrations").iterdir()
             if f.name.endswith(".sql")), key=lambda f: f.name)
        with self.pool.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(7316)")
            try:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                             "(version text PRIMARY KEY, applied timestamptz DEFAULT now())")
                conn.commit()
                done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
                conn.commit()  # so that each ``transaction()`` below is one, not a savepoint
                for f in files:
                    if f.name in done:
                        continue
                    log.info("applying migration %s", f.name)
                    with conn.transaction():
                        conn.execute(f.read_text())
                        step = f"nimbusfs.server.migrations.{f.name.removesuffix('.sql')}"
                        if importlib.util.find_spec(step) is not None:
                            importlib.import_module(step).apply(conn)
                        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)",
                                     (f.name,))
            finally:
                conn.rollback()  # nothing uncommitted is left but a failed statement's
                conn.execute("SELECT pg_advisory_unlock(7316)")
                conn.commit()
