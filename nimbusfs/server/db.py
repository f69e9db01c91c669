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

from nimbusfs.metrics import DB_RETRIES
from nimbusfs.retry import RECONNECT

log = logging.getLogger(__name__)
T = TypeVar("T")


def one(cur: psycopg.Cursor) -> tuple[Any, ...]:
    """The row of a statement that answers exactly one (an aggregate, a RETURNING
    of a row the transaction has locked or just made, a row a foreign key keeps).

    No row there is a bug, not a missing entry (those are checked where they
    can happen, with their errno): it is raised as one, which the server
    answers EIO ("internal error") and logs with its traceback.
    """
    row = cur.fetchone()
    if row is None:
        raise LookupError(f"no row where one was certain ({cur.statusmessage})")
    return row


# Contention: the transaction lost to a concurrent one and can safely run again.
_CONTENTION = (pgerr.SerializationFailure, pgerr.DeadlockDetected)
# How long the pool tries to replace a lost connection, and a transaction
# waits for one, before ``run`` tries again (and so asks the pool for a new
# attempt). The pool's own retries back off without a cap, 1, 3, 7, 15, 31,
# 63 s after the loss: a database back 8 s after it went (a standby promoted
# late) was reached 14.3 s after (tests/test_failover.py's soak), one back
# after 32 s would be after 63 s. Bounded here, the next attempt comes within
# about this time plus ``run``'s own backoff (at most 2 s). Transactions never
# wait this long for a healthy pool: the server's CapacityLimiter lets no
# more transactions run at once than the pool holds.
POOL_RECONNECT = 2.0
# A transaction that waits this long for its next statement is ended by the
# database, its locks released. Between statements there is only this
# process's Python code (store calls never run inside a transaction), so
# this happens only when the process is hung (stopped, or its host frozen or
# cut off): another replica, to which the mounts moved, then waits no longer
# for the rows the hung one had locked.
IDLE_IN_TRANSACTION_MS = 10_000


class Database:
    def __init__(self, dsn: str, pool_size: int = 8, statement_timeout_ms: int = 30_000,
                 outage_timeout: float = 60.0) -> None:
        self.outage_timeout = outage_timeout
        self.dsn = dsn
        self.pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, reconnect_timeout=POOL_RECONNECT,
            # No per-checkout health check (it costs a round trip per request):
            # a broken connection fails its transaction, which run() retries.
            kwargs={"options": f"-c statement_timeout={statement_timeout_ms}"
                               f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"})
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
        ``outage_timeout`` seconds (a restart, or a failover: a DSN naming
        several hosts with ``target_session_attrs=read-write`` reaches the new
        primary on the next connect). A transaction that failed on a lost
        connection never committed only if the failure came before COMMIT was
        sent: the rerun is given the same ``fn``, and mutations (the mount
        protocol's and the HTTP API's, run by ``metaserver._Once``) then look
        up their op id instead of applying themselves again. Every retry
        waits with the ``RECONNECT`` backoff (deadlocks and serialization
        failures too), for up to ``outage_timeout`` seconds, after which the
        last error is raised (the server answers EIO). A statement cancelled
        by ``statement_timeout`` is not retried.
        """
        waits = RECONNECT.until(time.monotonic() + self.outage_timeout)
        while True:
            try:
                # The pool's context commits the transaction the first statement
                # opened, or rolls it back if ``fn`` raised.
                with self.pool.connection(POOL_RECONNECT) as conn, conn.cursor() as cur:
                    return fn(cur, *args, **kwargs)
            except (psycopg.OperationalError, psycopg.InterfaceError,
                    pgerr.IdleInTransactionSessionTimeout) as e:
                # The last: the database ended a transaction this process left
                # idle (it was stopped or frozen, ``IDLE_IN_TRANSACTION_MS``),
                # and with it the connection: nothing of it was committed.
                if isinstance(e, pgerr.QueryCanceled) or (delay := next(waits, None)) is None:
                    raise
                if isinstance(e, _CONTENTION):
                    DB_RETRIES.labels("deadlock" if isinstance(e, pgerr.DeadlockDetected)
                                      else "serialization").inc()
                    log.debug("transaction lost to a concurrent one (%s); rerun in %.3fs",
                              type(e).__name__, delay)
                else:
                    DB_RETRIES.labels("connection").inc()
                    log.warning("database unavailable (%s); retrying in %.2fs", e, delay)
                time.sleep(delay)

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
            # A migration's Python step may think between statements for long.
            conn.execute("SET idle_in_transaction_session_timeout = 0")
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
                conn.execute("RESET idle_in_transaction_session_timeout")
                conn.commit()
