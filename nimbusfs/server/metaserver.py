"""The metaserver process: the mount protocol over TCP, backed by PostgreSQL.

Stateless apart from its connection pool and its subscribers, so several
replicas may serve one database: every change is announced with PostgreSQL
NOTIFY at commit, and each replica LISTENs and pushes the change log to the
mounts connected to it.

A connection is a stranger's until its hello is answered: it has
``HELLO_TIMEOUT`` seconds and ``MAX_HELLO_FRAME`` bytes to send it, one
address may hold ``MAX_UNAUTHENTICATED`` such connections, its wrong tokens
are rate-limited (``WrongTokens``), and what strangers are refused is logged
as one summary per ``REFUSAL_LOG_INTERVAL``, not a line each.

Per connection: many requests may be in flight (bounded), answered in
completion order. A request whose args carry ``op_id`` is applied at most
once: its result is recorded in the same transaction and a replay (after a
lost connection, marked ``replay``) gets the recorded result.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import ssl
import threading
import time
import types
import typing
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import msgpack
import psycopg
import trio

from nimbusfs import metrics
from nimbusfs.blockstore import BlockStore
from nimbusfs.blockstore.base import StoreUnavailable
from nimbusfs.blockstore.remote import PROXY_URL
from nimbusfs.errors import Conflict, FSError
from nimbusfs.protocol import (
    MAX_HELLO_FRAME,
    PROTOCOL_VERSION,
    PUSH,
    FrameError,
    FrameReader,
    pack,
)
from nimbusfs.retry import RECONNECT
from nimbusfs.server import gc, namespace, uploads
from nimbusfs.server.auth import User, authenticate
from nimbusfs.server.blocks import BlockAccess
from nimbusfs.server.db import Database, one

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
# The server's own operations (beside namespace.OPS) that need no op_id: a
# block put (or held) again is the same block; ping (a client's check that a silent
# connection's server is alive) is answered without the database. A batch
# carries no op_id of its own: each of its operations carries one.
READ_ONLY = frozenset({"subscribe", "get_block", "put_block", "hold_blocks", "ping", "batch"})
# What a request's op is counted as in the metrics: a name a client made up
# is "other", so that clients cannot add label values.
_COUNTED = frozenset(namespace.OPS) | READ_ONLY
# Operations in one ``batch`` request (a write-back mount's drain).
MAX_BATCH = 1000
HELLO_TIMEOUT = 10.0
MAX_UNAUTHENTICATED = 64     # per address: mounts may share one (NAT; the tests' 127.0.0.1)
WRONG_TOKEN_BURST = 20       # per address, then WRONG_TOKEN_RATE a second
WRONG_TOKEN_RATE = 1.0
REFUSAL_LOG_INTERVAL = 10.0
# Change-log sequence numbers are assigned before commit, so a later number
# can become visible before an earlier one. Each push therefore looks back
# this many numbers for late arrivals and skips those already sent.
LOOKBACK = 500
LOG_RETENTION_DAYS = 7
# The peer closed or reset the connection.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


_signature = functools.cache(inspect.signature)
# PostgreSQL's bigint, the widest integer column. msgpack decodes ints up to
# 2**64 - 1; a larger one than this reaches psycopg as numeric and fails
# inside the transaction.
_INT64 = range(-(1 << 63), 1 << 63)


@functools.cache
def _arg_types(fn: Callable[..., Any]) -> dict[str, Any]:
    """The annotated type of each parameter of ``fn``: what a request may pass.

    The operation's own annotations are the one declaration of its arguments'
    shape. A parameter without one is a bug, raised when the server starts.
    """
    hints = typing.get_type_hints(fn, include_extras=True)
    missing = [p for p in _signature(fn).parameters if p not in hints]
    if missing:
        raise TypeError(f"{fn.__qualname__}: parameters {missing} have no annotation")
    return hints


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a decoded msgpack value has the annotated type ``hint``.

    Exact types, as msgpack decodes them: an int is not a bool (nor the
    reverse) and fits in a bigint; a ``tuple[...]`` annotation is an array of
    that many items (msgpack has no tuples); ``list[T]`` and ``dict[K, V]``
    check every item; ``Annotated[int, range(...)]`` an int in that range.
    ``Any`` and unparameterised containers check no items.
    """
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is typing.Annotated:
        return _conforms(value, params[0]) and all(value in r for r in params[1:]
                                                   if isinstance(r, range))
    if origin in (types.UnionType, typing.Union):
        return any(_conforms(value, h) for h in params)
    if hint is type(None):
        return value is None
    if hint is int:
        return type(value) is int and value in _INT64
    if origin is tuple:
        return (type(value) is list and len(value) == len(params)
                and all(map(_conforms, value, params)))
    if origin is list:
        return type(value) is list and all(_conforms(v, params[0]) for v in value)
    if origin is dict:
        return type(value) is dict and all(_conforms(k, params[0]) and _conforms(v, params[1])
                                           for k, v in value.items())
    return type(value) is hint


def _describe(hint: Any) -> str:
    """``hint`` as an error message names it: ``mode must be an int in [0, 10) or None``."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(map(_describe, typing.get_args(hint)))
    if hint is type(None):
        return "None"
    if hint is int:
        return f"an int in [{_INT64.start}, {_INT64.stop})"
    if origin is typing.Annotated:
        r = typing.get_args(hint)[1]
        return f"an int in [{r.start}, {r.stop})"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _check_args(opname: str, fn: Callable[..., Any], fixed: tuple, args: dict[str, Any]
                ) -> None:
    """Raise EINVAL unless ``fn(*fixed, **args)`` is a call its annotations allow.

    Checked before any transaction, so a malformed request changes nothing and
    costs no database round trip.
    """
    try:
        _signature(fn).bind(*fixed, **args)
    except TypeError as e:
        raise FSError(errno.EINVAL, f"bad arguments for {opname}: {e}") from None
    types_ = _arg_types(fn)
    for name, value in args.items():
        if not _conforms(value, types_[name]):
            raise FSError(errno.EINVAL, f"bad arguments for {opname}: {name} must be"
                                        f" {_describe(types_[name])}")


def _operation(opname: str) -> Callable[..., Any]:
    fn = namespace.OPS.get(opname)
    if fn is None:
        raise FSError(errno.ENOSYS, f"unknown operation {opname!r}")
    return fn


def _check_op_id(opname: str, op_id: Any, replay: Any) -> None:
    # op_id is stored in a text column (no NUL); the client sends 32 hex digits.
    if not (op_id is None or (type(op_id) is str and 0 < len(op_id) <= 64
                              and "\0" not in op_id)) or type(replay) is not bool:
        raise FSError(errno.EINVAL, f"bad arguments for {opname}: op_id must be a str of"
                                    " 1-64 characters but NUL, replay a bool")


class _Once:
    """Run a mutation unless its ``op_id`` was applied already; either way, its result.

    Called as the transaction's function (``Database.run(once, fn, *args)``).
    A first attempt runs ``fn`` and then records its result (one statement).
    A replay claims ``op_id`` first, so that its key lock makes a later replay
    wait for it, and reads the recorded result if the claim finds one. Should
    a first attempt still be running when its replay arrives (the connection
    was lost meanwhile), both may run ``fn`` but only one commits: the first
    attempt's record then finds the key taken and rolls it back. Its client is
    gone, so nobody waits for that answer.

    Every run after the first is a replay: ``Database.run`` runs the
    transaction again when the database connection was lost, and the lost
    connection may have taken the answer to a COMMIT that was applied (a
    database failover). The replay then returns the recorded result instead
    of applying ``fn`` a second time (a commit's base version would be stale,
    a mkdir's name taken). The key is the user's: one user's op ids cannot
    collide with another's, and any replica finds it in the shared database.
    """

    def __init__(self, key: str, replay: bool) -> None:
        self.key = key
        self.replay = replay

    def __call__(self, cur: psycopg.Cursor, fn: Any, *args: Any, **kwargs: Any) -> Any:
        replay, self.replay = self.replay, True
        user_id = args[0].id
        if replay:
            cur.execute("INSERT INTO applied_ops (id, user_id, result) VALUES (%s, %s, '')"
                        " ON CONFLICT (id) DO NOTHING RETURNING 1", (self.key, user_id))
            if cur.fetchone() is None:
                cur.execute("SELECT result FROM applied_ops WHERE id = %s", (self.key,))
                return msgpack.unpackb(one(cur)[0], raw=False, strict_map_key=False)
            result = fn(cur, *args, **kwargs)
            cur.execute("UPDATE applied_ops SET result = %s WHERE id = %s",
                        (msgpack.packb(result, use_bin_type=True), self.key))
            return result
        result = fn(cur, *args, **kwargs)
        cur.execute("INSERT INTO applied_ops (id, user_id, result) VALUES (%s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING RETURNING 1",
                    (self.key, user_id, msgpack.packb(result, use_bin_type=True)))
        if cur.fetchone() is None:
            raise FSError(errno.EALREADY, "applied by a replay of this request")
        return result


class _Refused(Exception):
    """An operation of a batch applied without savepoints failed: apply it again with them."""


def _apply_batch(cur: psycopg.Cursor, user: User, device: str, ops: list[tuple[str, str, Any]],
                 failed: dict[int, list], careful: bool) -> list[list]:
    """Apply ``ops`` in order in one transaction; answer ``[errno, result]`` for each.

    Each operation is applied once by its op_id, as a replay is (``_Once``),
    so a batch sent again after a lost answer, or after the mount restarted,
    applies each operation once; but the batch claims all its op ids in one
    statement first (in key order, so two copies of a batch wait for each
    other rather than deadlock), reads the results of those applied before
    in one more, and records the new results in one at the end. Each
    operation runs in a savepoint when ``careful``: one that fails (a quota,
    a deleted file) is answered its errno and leaves no trace (its claim is
    removed at the end, so a later batch may apply it), and the others still
    apply. Operations rarely fail, and a savepoint is two statements of its
    own (a third of a drained ``setattr``'s): so a batch is first applied
    without them, and the first failure raises :class:`_Refused`, which
    rolls the whole transaction back for a careful run (``batch``). An op
    id repeated in the batch is applied once, the repeats answered as a
    replay is. Statements shared by the operations (the change log, the
    blocks of the commits) are made once for the batch (``namespace.Batch``).
    ``failed``: operations refused before the transaction (by index),
    answered as they are.
    """
    keys = {i: f"{user.id}:{op_id}" for i, (_, op_id, _) in enumerate(ops) if i not in failed}
    recorded = _claim_ops(cur, user, sorted(set(keys.values())))
    batch = namespace.Batch(cur, user, device, [
        args["extents"] for i, (opname, _, args) in enumerate(ops)
        if opname == "commit" and i in keys and keys[i] not in recorded])
    out: list[list] = []
    applied: dict[str, Any] = {}
    undone: set[str] = set()
    for i, (opname, _, args) in enumerate(ops):
        if i in failed:
            out.append(failed[i])
            continue
        key = keys[i]
        if key in recorded:
            out.append([0, recorded[key]])
            continue
        if careful:
            cur.execute("SAVEPOINT batch_op")
        try:
            with batch.applying():
                result = namespace.OPS[opname](cur, user, device, **args)
        except FSError as e:
            if not careful:
                raise _Refused from e
            cur.execute("ROLLBACK TO SAVEPOINT batch_op")
            out.append([e.errno, {"conflict": e.current, "message": e.message}
                        if isinstance(e, Conflict) else e.message])
            undone.add(key)
        else:
            if careful:
                cur.execute("RELEASE SAVEPOINT batch_op")
            out.append([0, result])
            applied[key] = recorded[key] = result
            undone.discard(key)
    batch.finish()
    if applied:
        cur.execute("UPDATE applied_ops a SET result = r.result"
                    " FROM unnest(%s::text[], %s::bytea[]) AS r(id, result) WHERE a.id = r.id",
                    (list(applied), [msgpack.packb(r, use_bin_type=True)
                                     for r in applied.values()]))
    if undone:
        cur.execute("DELETE FROM applied_ops WHERE id = ANY(%s)", (sorted(undone),))
    return out


def _claim_ops(cur: psycopg.Cursor, user: User, keys: list[str]) -> dict[str, Any]:
    """Claim the op ids ``keys`` (sorted) of a batch; the results of those applied before.

    A key claimed here is held (its row's lock) until the transaction ends:
    a copy of the batch sent again meanwhile waits for it, then finds it
    applied, or free again if its operation failed. An empty result marks
    a claim whose result is not recorded yet (never committed so).
    """
    cur.execute("INSERT INTO applied_ops (id, user_id, result)"
                " SELECT k, %s, '' FROM unnest(%s::text[]) WITH ORDINALITY AS c(k, n)"
                " ORDER BY n ON CONFLICT (id) DO NOTHING RETURNING id", (user.id, keys))
    before = set(keys) - {r[0] for r in cur.fetchall()}
    if not before:
        return {}
    cur.execute("SELECT id, result FROM applied_ops WHERE id = ANY(%s)", (sorted(before),))
    return {k: msgpack.unpackb(r, raw=False, strict_map_key=False) for k, r in cur.fetchall()}


def _changes_since(cur: psycopg.Cursor, owner: int, after: int, sent: list[int]) -> list[list]:
    """The owner's changes after ``after`` in order, except the sequence numbers in ``sent``."""
    cur.execute("SELECT seq, inode, parent, name, kind, device FROM changes"
                " WHERE owner_id = %s AND seq > %s"
                " AND seq NOT IN (SELECT unnest(%s::bigint[]))"  # a hashed anti-join
                " ORDER BY seq LIMIT 5000", (owner, after, sent))
    return [list(r) for r in cur.fetchall()]


def _subscribe_point(cur: psycopg.Cursor, owner: int, cursor: int) -> dict[str, Any]:
    """The newest sequence number, and whether the log still reaches back to ``cursor``.

    Sequence numbers are global (one user's have gaps), so the test is whether
    the change at ``cursor`` itself is still kept: trimming removes the oldest.
    """
    cur.execute("SELECT coalesce(max(seq), 0) FROM changes WHERE owner_id = %s", (owner,))
    newest = one(cur)[0]
    cur.execute("SELECT 1 FROM changes WHERE owner_id = %s AND seq = %s", (owner, cursor))
    return {"newest": newest, "reset": bool(cursor) and cur.fetchone() is None}


def _trim(cur: psycopg.Cursor) -> None:
    uploads.expire(cur)
    cur.execute("DELETE FROM applied_ops WHERE at < now() - interval '1 day'")
    cur.execute("WITH d AS (DELETE FROM changes WHERE at < now() - make_interval(days => %s)"
                " RETURNING xid) UPDATE changes_trimmed"
                " SET upto = greatest(upto, (SELECT max(xid) FROM d))"
                " WHERE EXISTS (SELECT 1 FROM d)", (LOG_RETENTION_DAYS,))


class WrongTokens:
    """Wrong tokens per peer address: a bucket of ``burst`` refilled at ``rate`` a second.

    While an address's bucket is empty its hellos are answered EAGAIN without
    looking at the token (the client waits and tries again), so a flood from
    one address has at most ``rate`` tokens a second checked, each a
    transaction. A mount behind that address waits too, until the bucket
    refills: the server cannot tell it from the flood.
    """

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self.levels: dict[str, tuple[float, float]] = {}  # address: (level, when)

    def _level(self, peer: str, now: float) -> float:
        level, when = self.levels.get(peer, (self.burst, now))
        return min(self.burst, level + (now - when) * self.rate)

    def allowed(self, peer: str) -> bool:
        return self._level(peer, trio.current_time()) >= 1

    def failed(self, peer: str) -> None:
        now = trio.current_time()
        self.levels[peer] = (self._level(peer, now) - 1, now)
        if len(self.levels) > 4096:  # many addresses: forget those whose buckets are full
            self.levels = {p: v for p, v in self.levels.items()
                           if self._level(p, now) < self.burst}


class Session:
    """One authenticated mount connection."""

    def __init__(self, stream: trio.abc.Stream, user: User, device: str) -> None:
        self.stream = stream
        self.user = user
        self.device = device
        self.send_lock = trio.Lock()
        self.wake = trio.Event()
        self.cursor = -1            # -1: not subscribed
        self.sent: set[int] = set()
        # When a change notification first woke the pump since its last push
        # (trio time; None: woken by nothing but a (re)subscription): push lag.
        self.notified: float | None = None

    async def send(self, msg: Any) -> None:
        async with self.send_lock:
            await self.stream.send_all(pack(msg))


class MetaServer:
    """``proxy``: mounts get no store address; blocks go through ``BlockAccess``.
    ``tls``: every connection is TLS. ``gc_interval``: seconds between block
    GC rounds (0: none; see ``nimbusfs/server/gc.py``), which delete what has
    been unreferenced for ``gc_grace`` seconds."""

    def __init__(self, db: Database, dsn: str, store: BlockStore, proxy: bool = False,
                 tls: ssl.SSLContext | None = None, gc_interval: float = 3600.0,
                 gc_grace: float = 3600.0) -> None:
        for fn in namespace.OPS.values():
            _arg_types(fn)  # every operation's arguments are declared (or it fails here)
        self.db = db
        self.dsn = dsn
        self.blocks_url = PROXY_URL if proxy else store.url
        self.tls = tls
        self.limiter = trio.CapacityLimiter(db.pool_size)
        self.blocks = BlockAccess(store, proxy, self.call)
        self.gc_interval = gc_interval
        self.gc_grace = gc_grace
        self.subscribers: dict[int, set[Session]] = {}
        self.watchers: dict[int, set[trio.Event]] = {}
        self.unauthenticated: Counter[str] = Counter()   # connections before hello, by address
        self.wrong_tokens = WrongTokens(WRONG_TOKEN_BURST, WRONG_TOKEN_RATE)
        self.refusals: Counter[tuple[str, str]] = Counter()  # (address, why) since the last summary
        self.sessions = 0     # authenticated connections

    def metrics_state(self) -> dict[str, int]:
        """What ``metrics.ServerState`` publishes: connections, the pool, transactions."""
        pool = self.db.pool.get_stats()
        return {"mounts": sum(map(len, self.subscribers.values())),
                "connections": self.sessions,
                "db_pool_connections": pool.get("pool_size", 0),
                "db_pool_idle": pool.get("pool_available", 0),
                "db_pool_max": pool.get("pool_max", 0),
                "db_transactions": self.limiter.borrowed_tokens,
                "db_transactions_waiting": self.limiter.statistics().tasks_waiting,
                "db_connections_lost": pool.get("connections_lost", 0),
                "db_connection_errors": pool.get("connections_errors", 0)}

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(cur, ...)`` in one transaction on a worker thread.

        On shutdown a transaction still waiting (e.g. on a lock or a lost
        database) is abandoned rather than awaited: its client never saw an
        answer and replays it, and the ``op_id`` keeps the replay from applying
        twice.
        """
        return await trio.to_thread.run_sync(
            partial(self.db.run, fn, *args, **kwargs), limiter=self.limiter,
            abandon_on_cancel=True)

    async def mutate(self, fn: Any, user: User, device: str, *args: Any, **kwargs: Any) -> Any:
        """Run a mutation that comes without an op id (an HTTP request's) exactly once.

        It is given one, recorded like the mount protocol's: should the answer
        to its COMMIT be lost (a database failover), the transaction's rerun
        finds the record instead of applying it again (a second copy of an
        autorenamed upload, a 409 for a folder it made). Nobody replays it
        from outside: an HTTP client that lost its answer decides itself.
        """
        return await self.call(_Once(f"{user.id}:{uuid.uuid4().hex}", False), fn, user,
                               device, *args, **kwargs)

    async def serve(self, host: str, port: int,
                    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        with metrics.serving(self.metrics_state):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen)
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self._log_refusals)
                if self.gc_interval > 0:
                    nursery.start_soon(self._collect_blocks)
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self.handle_connection, port, host=host))
                task_status.started(listeners)

    # --- change notifications -------------------------------------------------------

    def _wake(self, owner: int | None = None, device: str | None = None) -> None:
        """Wake the pumps of ``owner``'s sessions (of every session if None).

        A change from ``device`` (if named) does not wake that device's own
        session: the mount already knows it. Its rows are pushed with the next change from
        elsewhere, so the session's cursor still advances.
        """
        groups = [self.subscribers.get(owner, ())] if owner is not None \
            else list(self.subscribers.values())
        now = trio.current_time()
        for group in groups:
            for s in group:
                if not device or s.device != device:
                    s.wake.set()
                    if owner is not None and s.notified is None:
                        s.notified = now
        for watchers in ([self.watchers.get(owner, ())] if owner is not None
                         else list(self.watchers.values())):
            for ev in watchers:
                ev.set()

    @contextmanager
    def watching(self, owner: int) -> Iterator[trio.Event]:
        """An event set at the next change of ``owner``'s volume (an HTTP long-poll).

        Costs no database connection while it waits: the LISTEN connection
        wakes it, as it wakes the mounts' pumps.
        """
        ev = trio.Event()
        self.watchers.setdefault(owner, set()).add(ev)
        try:
            yield ev
        finally:
            group = self.watchers[owner]
            group.discard(ev)
            if not group:
                del self.watchers[owner]

    async def _listen(self) -> None:
        """LISTEN on a connection of its own, without a thread: wait for its socket.

        Never gives up: a lost connection is opened again with the
        ``RECONNECT`` backoff, for as long as the database is away.
        """
        waits = RECONNECT.delays()
        while True:
            try:
                conn = await trio.to_thread.run_sync(
                    partial(psycopg.connect, self.dsn, autocommit=True))
            except psycopg.OperationalError as e:
                delay = next(waits)
                log.warning("LISTEN connection failed (%s); retrying in %.2fs", e, delay)
                await trio.sleep(delay)
                continue
            waits = RECONNECT.delays()
            try:
                conn.execute(f"LISTEN {namespace.CHANNEL}")
                self._wake()  # anything committed while we were not listening
                while True:
                    await trio.lowlevel.wait_readable(conn.fileno())
                    conn.pgconn.consume_input()
                    if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                        raise psycopg.OperationalError("LISTEN connection lost")
                    while (n := conn.pgconn.notifies()) is not None:
                        owner, own, device = n.extra.decode().split(" ", 2)
                        self._wake(int(owner), None if own == "1" else device)
            except (psycopg.Error, OSError) as e:
                log.warning("LISTEN connection lost (%s); reconnecting", e)
            finally:
                conn.close()

    async def _housekeeping(self) -> None:
        while True:
            try:
                await self.call(_trim)
            except psycopg.OperationalError as e:
                log.error("database unavailable, log not trimmed: %s", e)
            await trio.sleep(3600)

    async def _collect_blocks(self) -> None:
        """Block GC every ``gc_interval`` seconds, first after one interval.

        One replica collects at a time (the others find the lock taken and
        skip the round). On shutdown the round stops between batches.
        """
        while True:
            await trio.sleep(self.gc_interval)
            stop = threading.Event()
            try:
                report = await trio.to_thread.run_sync(
                    partial(gc.collect, self.db, self.blocks.store, self.gc_grace, stop=stop),
                    abandon_on_cancel=True)
            except (psycopg.OperationalError, StoreUnavailable) as e:
                log.error("block GC stopped: %s", e)
                continue
            except Exception:   # a bug: logged, and the server serves on
                log.exception("block GC failed")
                continue
            finally:
                stop.set()
            if report is not None:   # None: another replica's round holds the lock
                log.info("%s", report)
                metrics.gc_round(report.blocks + report.orphans,
                                 report.block_bytes + report.orphan_bytes, report.seconds)

    async def _pump(self, s: Session) -> None:
        """Push the change log to a subscribed session whenever it is woken.

        Ends when the connection is gone. While the database is unreachable
        it retries, with the ``RECONNECT`` backoff between the tries
        (``Database.run`` already waited ``outage_timeout`` in each).
        """
        waits = RECONNECT.delays()
        while True:
            await s.wake.wait()
            s.wake = trio.Event()
            notified, s.notified = s.notified, None  # what this pass's read will see
            lower = max(0, s.cursor - LOOKBACK)
            try:
                fresh = await self.call(_changes_since, s.user.id, lower,
                                        [q for q in s.sent if q > lower])
            except psycopg.OperationalError as e:
                log.error("database unavailable, changes not pushed yet: %s", e)
                s.wake.set()
                s.notified = notified
                await trio.sleep(next(waits))
                continue
            waits = RECONNECT.delays()
            if fresh:
                s.cursor = max(s.cursor, fresh[-1][0])
                if len(fresh) == 5000:
                    s.wake.set()  # more to come
            s.sent = {q for q in s.sent if q > s.cursor - LOOKBACK} | {r[0] for r in fresh}
            if fresh:
                try:
                    await s.send([PUSH, "changes", fresh])
                except _GONE:
                    return
                metrics.PUSHED_CHANGES.inc(len(fresh))
                if notified is not None:
                    metrics.PUSH_LAG.observe(trio.current_time() - notified)

    async def _subscribe(self, s: Session, nursery: trio.Nursery, cursor: int = 0
                         ) -> dict[str, Any]:
        point = await self.call(_subscribe_point, s.user.id, cursor)
        first = s.cursor < 0
        s.cursor = point["newest"] if (point["reset"] or not cursor) else cursor
        self.subscribers.setdefault(s.user.id, set()).add(s)
        if first:
            nursery.start_soon(self._pump, s)
        s.wake.set()
        return point

    # --- connections -----------------------------------------------------------------

    def refused(self, peer: str, why: str) -> None:
        """Count a stranger's refused connection; only the first of an interval is logged now."""
        if not self.refusals:
            log.warning("refused a connection from %s: %s (more are summed up every %.0f s)",
                        peer, why, REFUSAL_LOG_INTERVAL)
        self.refusals[peer, why] += 1

    async def _log_refusals(self) -> None:
        """Log each interval's refusals in one line (a lone one was logged as it came)."""
        while True:
            await trio.sleep(REFUSAL_LOG_INTERVAL)
            total = sum(self.refusals.values())
            if total > 1:
                top = self.refusals.most_common(5)
                log.warning("refused %d connections in %.0f s: %s%s", total,
                            REFUSAL_LOG_INTERVAL,
                            ", ".join(f"{n} from {peer} ({why})" for (peer, why), n in top),
                            ", ..." if len(self.refusals) > len(top) else "")
            self.refusals.clear()

    async def _hello(self, reader: FrameReader, stream: trio.abc.Stream, peer: str
                     ) -> Session | None:
        """Authenticate a new connection: its session, or None if refused (the reply says why).

        Only the hello (and a TLS handshake) must come within ``HELLO_TIMEOUT``:
        checking the token may wait for the database, which is no fault of the peer's.
        """
        try:
            with trio.move_on_after(HELLO_TIMEOUT) as timeout:
                msg = await reader.read(MAX_HELLO_FRAME)
            if timeout.cancelled_caught:
                self.refused(peer, f"no hello within {HELLO_TIMEOUT:.0f} s")
                return None
        except FrameError as e:
            self.refused(peer, str(e))
            return None
        except trio.BrokenResourceError as e:
            if isinstance(e.__cause__, ssl.SSLError):  # e.g. a client not speaking TLS
                self.refused(peer, f"TLS handshake failed: {e.__cause__.reason}")
            return None
        if msg is None:
            return None
        args = msg[2] if (isinstance(msg, list) and len(msg) == 3 and msg[1] == "hello"
                          and isinstance(msg[2], dict)) else {}
        token, device = args.get("token"), args.get("device", "")
        if not (type(token) is str and type(device) is str and len(device) <= 255
                and "\0" not in device):
            self.refused(peer, "not a hello")
            await stream.send_all(pack([0, errno.EPROTO, "expected hello with a token and a"
                                                          " device name"]))
            return None
        rid = msg[0]
        if args.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            self.refused(peer, "another protocol version")
            await stream.send_all(pack([rid, errno.EPROTONOSUPPORT,
                                        f"this metaserver speaks protocol {PROTOCOL_VERSION}, the"
                                        f" client {args.get('protocol')!r}: upgrade both"]))
            return None
        if not self.wrong_tokens.allowed(peer):
            self.refused(peer, "too many wrong tokens")
            await stream.send_all(pack([rid, errno.EAGAIN, "too many wrong tokens from this"
                                                            " address; try again later"]))
            return None
        try:
            user = await self.call(authenticate, token)
        except FSError as e:
            self.wrong_tokens.failed(peer)
            self.refused(peer, e.message)
            await stream.send_all(pack([rid, e.errno, e.message]))
            return None
        except psycopg.OperationalError as e:
            log.error("database unavailable, connection refused: %s", e)
            await stream.send_all(pack([rid, errno.EIO, "database unavailable"]))
            return None
        await stream.send_all(pack([rid, 0, {
            "user": user.name, "root": user.root, "blocks": self.blocks_url,
            "protocol": PROTOCOL_VERSION, "read_only": sorted(namespace.READ_ONLY | READ_ONLY),
            # How often a mount must hold its uploaded-ahead blocks (``hold_blocks``).
            "gc_grace": self.gc_grace}]))
        return Session(stream, user, device)

    async def _authenticate(self, reader: FrameReader, stream: trio.abc.Stream, peer: str
                            ) -> Session | None:
        """``_hello``, as one of the address's few strangers (or refused if too many)."""
        if self.unauthenticated[peer] >= MAX_UNAUTHENTICATED:
            self.refused(peer, f"over {MAX_UNAUTHENTICATED} connections before hello")
            return None
        self.unauthenticated[peer] += 1
        try:
            return await self._hello(reader, stream, peer)
        finally:
            self.unauthenticated[peer] -= 1
            if not self.unauthenticated[peer]:
                del self.unauthenticated[peer]

    async def handle_connection(self, tcp: trio.SocketStream) -> None:
        """Serve one mount's connection until it closes.

        Whatever happens to one connection ends that connection only: an
        exception leaving this handler would stop the listener and with it the
        server for every mount. A peer that vanishes (a killed mount resets
        the connection) is caught inside the nursery, where it is raised, as
        the nursery would wrap it in an ExceptionGroup on its way out.
        """
        try:
            peer = tcp.socket.getpeername()[0]
        except OSError:  # reset before it was served (ENOTCONN)
            await tcp.aclose()
            return
        # The TLS handshake happens on the first receive, within the hello's time.
        # No close_notify (https_compatible): frames delimit themselves, and a
        # closing TLS stream would otherwise finish a stranger's handshake first.
        stream = tcp if self.tls is None else trio.SSLStream(tcp, self.tls, server_side=True,
                                                             https_compatible=True)
        reader = FrameReader(stream)
        slots = trio.Semaphore(MAX_IN_FLIGHT)
        session = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    session = await self._authenticate(reader, stream, peer)
                    if session is not None:
                        self.sessions += 1
                    while session is not None and (msg := await reader.read()) is not None:
                        await slots.acquire()
                        nursery.start_soon(self._answer, session, nursery, slots, msg)
                except _GONE:
                    pass
                except FrameError as e:
                    log.warning("closing connection: %s", e)
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("connection failed")
        finally:
            if session is not None:
                self.sessions -= 1
                self.subscribers.get(session.user.id, set()).discard(session)
            await stream.aclose()

    async def _dispatch(self, s: Session, nursery: trio.Nursery, opname: str,
                        args: dict[str, Any]) -> Any:
        if opname == "ping":
            return None
        if opname == "subscribe":
            _check_args(opname, self._subscribe, (s, nursery), args)
            return await self._subscribe(s, nursery, **args)
        if opname in ("put_block", "get_block", "hold_blocks"):
            try:
                return await getattr(self.blocks, opname.split("_")[0])(s.user, **args)
            except TypeError as e:
                raise FSError(errno.EINVAL, f"bad arguments for {opname}: {e}") from None
        if opname == "batch":
            return await self._batch(s, args)
        fn = _operation(opname)
        op_id = args.pop("op_id", None)
        replay = args.pop("replay", False)
        _check_op_id(opname, op_id, replay)
        _check_args(opname, fn, (None, s.user, s.device), args)
        if opname == "commit":  # outside the transaction: it may ask the block store
            await self.blocks.admit(s.user, args["extents"], args["size"])
        if op_id is None:
            return await self.call(fn, s.user, s.device, **args)
        return await self.call(_Once(f"{s.user.id}:{op_id}", replay), fn, s.user, s.device,
                               **args)

    async def _batch(self, s: Session, args: dict[str, Any]) -> list[list]:
        """``batch``: many namespace operations, in order, in one transaction.

        ``ops`` is a list of ``[op, op_id, args]`` (each with its op_id: a
        batch is made to be sent again); the answer lists ``[0, result]`` or
        ``[errno, message]`` for each, in order. A write-back mount drains its
        journal this way: one PostgreSQL commit for many closes. A batch that
        is not a list of known mutating operations with op ids is refused
        whole; an operation whose arguments are wrong fails alone (EINVAL),
        the others still apply, so one bad record never holds back the
        journal records of other files. Blocks of the
        commits are admitted first, outside the transaction, all at once; if
        that fails, commit by commit, so that only the commits at fault fail.
        """
        ops = args.get("ops")
        if set(args) != {"ops"} or not (isinstance(ops, list) and 0 < len(ops) <= MAX_BATCH):
            raise FSError(errno.EINVAL, f"bad arguments for batch: ops must be a list of 1 to"
                                        f" {MAX_BATCH} [op, op_id, args]")
        failed: dict[int, list] = {}
        for i, item in enumerate(ops):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and isinstance(item[1], str) and isinstance(item[2], dict)):
                raise FSError(errno.EINVAL, "bad arguments for batch: each op is"
                                            " [op, op_id, args]")
            fn = _operation(item[0])
            if item[0] in namespace.READ_ONLY:
                raise FSError(errno.EINVAL, f"bad arguments for batch: {item[0]} changes"
                                            " nothing")
            _check_op_id(item[0], item[1], False)
            try:  # one op's arguments: that op fails alone, as one the database refuses
                _check_args(item[0], fn, (None, s.user, s.device), item[2])
            except FSError as e:
                failed[i] = [e.errno, e.message]
        commits = [(i, a) for i, (name, _, a) in enumerate(ops)
                   if name == "commit" and i not in failed]
        try:
            await self.blocks.admit(s.user, [e for _, a in commits for e in a["extents"]],
                                    sum(a["size"] for _, a in commits))
        except FSError:
            for i, a in commits:
                try:
                    await self.blocks.admit(s.user, a["extents"], a["size"])
                except FSError as e:
                    failed[i] = [e.errno, e.message]
        try:
            return await self.call(_apply_batch, s.user, s.device, ops, failed, False)
        except _Refused:
            metrics.DB_RETRIES.labels("batch_refusal").inc()
            return await self.call(_apply_batch, s.user, s.device, ops, failed, True)

    async def _answer(self, s: Session, nursery: trio.Nursery, slots: trio.Semaphore,
                      msg: Any) -> None:
        rid = msg[0] if isinstance(msg, list) and msg else 0
        start = time.perf_counter()
        try:
            if not (isinstance(msg, list) and len(msg) == 3 and isinstance(msg[2], dict)):
                raise FSError(errno.EPROTO, "malformed request")
            reply = [rid, 0, await self._dispatch(s, nursery, str(msg[1]), msg[2])]
        except Conflict as e:
            reply = [rid, e.errno, {"conflict": e.current, "message": e.message}]
        except FSError as e:
            reply = [rid, e.errno, e.message]
        except psycopg.OperationalError as e:
            log.error("database unavailable: %s", e)
            reply = [rid, errno.EIO, "database unavailable"]
        except Exception:
            log.exception("request failed: %r", msg[:2] if isinstance(msg, list) else msg)
            reply = [rid, errno.EIO, "internal error"]
        op = msg[1] if isinstance(msg, list) and len(msg) > 1 else None
        metrics.request("protocol", op if type(op) is str and op in _COUNTED else "other",
                        time.perf_counter() - start, metrics.errname(reply[1]) if reply[1]
                        else None)
        try:
            await s.send(reply)
        except _GONE:
            pass  # the reader sees it too and ends the connection
        finally:
            slots.release()
