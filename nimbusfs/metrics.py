"""Prometheus metrics of the metaserver and of the mount: the metric objects, and their hooks.

Two registries, one per kind of process, so that each serves only its own
figures: ``SERVER`` (the metaserver's ``/metrics``, on its HTTP listener)
and ``MOUNT`` (``nimbusfs mount --metrics HOST:PORT``). Both hold the
process's own figures too (CPU seconds, resident memory, open files).

The metric objects are module-level, one set per process, and the code that
moves them imports them from here: the metaserver's request loop, the HTTP
API, ``Database.run``, the mount's FUSE operations (``instrument``), its
block cache, its block store (``MeteredStore``) and its protocol client.
The GC figures (``GC_*``) are set by the metaserver's scheduled GC rounds (``gc_round``).

Cost: a counter or histogram update is a lock and an addition (about a
microsecond), made once per request, per block or per FUSE operation, never
per byte. Labels are bounded sets (operation names known in advance, route
templates, errno names, HTTP statuses): a name a client sends is never a
label value, so no client can grow the registry.

Thread safety: prometheus_client's metrics take a lock per update, so
worker threads (block transfers, transactions) update them directly.
"""

from __future__ import annotations

import errno
import functools
import inspect
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nimbusfs.blockstore.base import BlockStore

if TYPE_CHECKING:
    import pyfuse3

SERVER = CollectorRegistry()
MOUNT = CollectorRegistry()
ProcessCollector(registry=SERVER)
ProcessCollector(registry=MOUNT)

# Latency buckets, seconds: a FUSE operation answered from memory takes tens of
# microseconds, a commit of a large file seconds; a request to the metaserver
# from a fraction of a millisecond (a cached answer) to a long-poll's minutes.
FAST = (.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05,
        .1, .25, .5, 1.0, 2.5, 10.0, 60.0)
SLOW = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0)


def errname(code: int) -> str:
    """An errno as a label value: its name (``ENOENT``), a bounded set."""
    return errno.errorcode.get(code, "other")


# --- the metaserver ----------------------------------------------------------------------

REQUESTS = Histogram(
    "nimbusfs_server_request_seconds",
    "Requests answered, and how long each took, by interface (protocol: a mount's"
    " operation; http: a REST route) and operation",
    ["interface", "op"], buckets=SLOW, registry=SERVER)
REQUEST_ERRORS = Counter(
    "nimbusfs_server_request_errors",
    "Requests answered with an error: the errno's name (protocol) or the HTTP status",
    ["interface", "op", "error"], registry=SERVER)
DB_RETRIES = Counter(
    "nimbusfs_server_db_retries",
    "Transactions run again: serialization failure, deadlock, a lost connection, or"
    " a write-back batch one of whose operations was refused (applied again with a"
    " savepoint for each operation)",
    ["reason"], registry=SERVER)
PUSH_LAG = Histogram(
    "nimbusfs_server_push_lag_seconds",
    "From a change's commit notification reaching this metaserver to its push leaving"
    " for a mount", buckets=SLOW, registry=SERVER)
PUSHED_CHANGES = Counter(
    "nimbusfs_server_pushed_changes", "Change-log rows pushed to mounts", registry=SERVER)

# Block GC rounds of the server's schedule (``--gc-interval``): set by
# ``gc_round``. A round of ``nimbusfs gc`` runs in its own process and prints
# its figures instead.
GC_RUNS = Counter("nimbusfs_gc_runs", "GC passes completed", registry=SERVER)
GC_DELETED_BLOCKS = Counter("nimbusfs_gc_deleted_blocks",
                            "Blocks and unknown objects deleted from the store by GC",
                            registry=SERVER)
GC_RECLAIMED_BYTES = Counter("nimbusfs_gc_reclaimed_bytes",
                             "Bytes deleted from the store by GC", registry=SERVER)
GC_DURATION = Histogram("nimbusfs_gc_run_seconds", "How long each GC pass took",
                        buckets=(.1, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
                        registry=SERVER)
GC_LAST_RUN = Gauge("nimbusfs_gc_last_run_timestamp_seconds",
                    "When the last GC pass ended (Unix time)", registry=SERVER)


def gc_round(deleted: int, deleted_bytes: int, seconds: float) -> None:
    """Count a finished block GC round of this metaserver."""
    GC_RUNS.inc()
    GC_DELETED_BLOCKS.inc(deleted)
    GC_RECLAIMED_BYTES.inc(deleted_bytes)
    GC_DURATION.observe(seconds)
    GC_LAST_RUN.set_to_current_time()


class ServerState(Collector):
    """The figures one metaserver holds rather than counts, read when scraped.

    ``state()`` returns them as a dict (see ``MetaServer.metrics_state``):
    connected mounts, the database pool's connections, the transactions in
    worker threads and those waiting for one. Registered by the server while
    it serves (one at a time per process).
    """

    GAUGES = {
        "mounts": "Mount connections subscribed to pushed changes",
        "connections": "Authenticated protocol connections (mounts and CLI clients)",
        "db_pool_connections": "Database connections open in the pool",
        "db_pool_idle": "Database connections idle in the pool",
        "db_pool_max": "The pool's largest size",
        "db_transactions": "Transactions running in worker threads",
        "db_transactions_waiting": "Transactions waiting for a database connection",
    }
    COUNTERS = {
        "db_connections_lost": "Pooled database connections found broken",
        "db_connection_errors": "Failed attempts to open a database connection",
    }

    def __init__(self, state: Callable[[], dict[str, int]]) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = self.state()
        for name, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"nimbusfs_server_{name}", doc, now[name])
        for name, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"nimbusfs_server_{name}", doc, now[name])


@contextmanager
def serving(state: Callable[[], dict[str, int]]) -> Iterator[None]:
    """Publish a metaserver's ``ServerState`` for as long as it serves."""
    collector = ServerState(state)
    SERVER.register(collector)
    try:
        yield
    finally:
        SERVER.unregister(collector)


def request(interface: str, op: str, seconds: float, error: str | None) -> None:
    """Count one answered request (``error``: None if it succeeded)."""
    REQUESTS.labels(interface, op).observe(seconds)
    if error is not None:
        REQUEST_ERRORS.labels(interface, op, error).inc()


# The methods counted under their own name (label values come from a known set).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetrics:
    """ASGI middleware: every HTTP request counted by route template and timed.

    The outermost layer, so requests refused before routing (a wrong token)
    count too, as ``unrouted``. The time runs until the last byte of the
    response is sent (a download's whole transfer; a long-poll's wait).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_(msg: dict) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)
        try:
            await self.app(scope, receive, send_)
        finally:
            route = scope.get("route")   # set by Starlette's router on a match
            # Set on a 405 too, whatever the method: one a client made up is "other".
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            op = f"{method} {route.path}" if route is not None else "unrouted"
            request("http", op, time.perf_counter() - start,
                    str(status) if status >= 400 else None)


def is_loopback(peer: str) -> bool:
    """Whether a peer address is this host's loopback (IPv4-mapped IPv6 included)."""
    try:
        a = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_loopback


# --- the mount ---------------------------------------------------------------------------

FUSE_OPS = Histogram(
    "nimbusfs_mount_fuse_op_seconds", "FUSE requests answered, and how long each took, by"
    " operation", ["op"], buckets=FAST, registry=MOUNT)
FUSE_ERRORS = Counter(
    "nimbusfs_mount_fuse_errors", "FUSE requests answered with an errno, by operation",
    ["op", "errno"], registry=MOUNT)
CACHE_HITS = Counter(
    "nimbusfs_mount_cache_hits", "Block reads served by the cache, by tier (memory, disk)",
    ["tier"], registry=MOUNT)
CACHE_HIT_BYTES = Counter(
    "nimbusfs_mount_cache_hit_bytes", "Bytes of the blocks the cache served, by tier",
    ["tier"], registry=MOUNT)
CACHE_MISSES = Counter(
    "nimbusfs_mount_cache_misses",
    "Block reads the cache could not serve (fetched from the store: a whole block, or a"
    " range of one)", registry=MOUNT)
CACHE_MISS_BYTES = Counter(
    "nimbusfs_mount_cache_miss_bytes", "Bytes fetched from the store for cache misses",
    registry=MOUNT)
CACHE_BYTES = Gauge("nimbusfs_mount_cache_bytes", "Bytes the cache holds, by tier",
                    ["tier"], registry=MOUNT)
CACHE_LIMIT = Gauge("nimbusfs_mount_cache_limit_bytes",
                    "The cache's size limit, by tier", ["tier"], registry=MOUNT)
STORE_BYTES = Counter(
    "nimbusfs_mount_store_bytes",
    "Bytes moved to or from the block store (direction: upload, download)",
    ["direction"], registry=MOUNT)
STORE_REQUESTS = Histogram(
    "nimbusfs_mount_store_request_seconds",
    "Block store calls and how long each took, by operation", ["op"], buckets=SLOW,
    registry=MOUNT)
UPLOADS_IN_FLIGHT = Gauge("nimbusfs_mount_uploads_in_flight",
                          "Blocks being put to the store now", registry=MOUNT)
DIRTY_FILES = Gauge(
    "nimbusfs_mount_dirty_files",
    "Open files with changes not committed yet (uploaded at their close or fsync)",
    registry=MOUNT)
RECONNECTS = Counter("nimbusfs_mount_reconnects",
                     "Connections to the metaserver opened again after one was lost",
                     registry=MOUNT)
SERVER_CALLS = Counter(
    "nimbusfs_mount_server_calls",
    "Requests this mount made to the metaserver, by operation (a call resent after a"
    " reconnect counts once): what its caches did not answer", ["op"], registry=MOUNT)
WRITEBACK_OPS = Counter(
    "nimbusfs_mount_writeback_ops",
    "Operations of write-back journal records the server answered, by protocol operation"
    " (a file's record is a commit, with a mknod before it if the file was created here)",
    ["op"],
    registry=MOUNT)
WRITEBACK_PACED = Histogram(
    "nimbusfs_mount_writeback_paced_seconds",
    "Waits of the write-back drain for a burst of requests to pause, and how long each"
    " took (it yields to them, and takes a batch at least once a second meanwhile)",
    buckets=SLOW, registry=MOUNT)
WRITEBACK_BATCHES = Counter(
    "nimbusfs_mount_writeback_batches",
    "Batch requests of the write-back drain the server answered (one transaction each)",
    registry=MOUNT)
CONNECTED = Gauge("nimbusfs_mount_server_connected",
                  "1 while the mount holds a connection to the metaserver", registry=MOUNT)


def _timed(name: str, handler: Callable[..., Awaitable[Any]], answer: type[Exception]
           ) -> Callable[..., Awaitable[Any]]:
    """``handler`` (a FUSE operation) counted and timed under ``name``; an ``answer``
    exception (pyfuse3's FUSEError) is counted by its errno."""
    # Each label's child looked up once, not per call (``labels`` takes a lock).
    seconds = FUSE_OPS.labels(name)
    errors: dict[int, Counter] = {}

    @functools.wraps(handler)
    async def op(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return await handler(*args)
        except answer as e:
            code = getattr(e, "errno", 0)
            if (counter := errors.get(code)) is None:
                counter = errors[code] = FUSE_ERRORS.labels(name, errname(code))
            counter.inc()
            raise
        finally:
            seconds.observe(time.perf_counter() - start)
    return op


def instrument(ops: pyfuse3.Operations) -> pyfuse3.Operations:
    """Count and time every FUSE operation ``ops`` answers; return it.

    Each request handler of ``pyfuse3.Operations`` is replaced on the
    instance (pyfuse3 looks them up there) by a timed one, so a mount
    without ``--metrics`` runs the handlers as they are. pyfuse3 is imported
    here, not with the module: a metaserver's host needs no libfuse.
    """
    import pyfuse3

    for name, fn in vars(pyfuse3.Operations).items():
        if not name.startswith("_") and inspect.iscoroutinefunction(fn):
            setattr(ops, name, _timed(name, getattr(ops, name), pyfuse3.FUSEError))
    return ops


def serve_mount(address: str) -> tuple[Any, str]:
    """Serve ``MOUNT`` on ``HOST:PORT`` from a thread (port 0: any free one).

    Returns the server (``shutdown()`` stops it) and its URL. No token: bind
    it to loopback or a network only the monitoring reaches.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    httpd, _ = start_http_server(int(port), host, registry=MOUNT)
    bound, port_ = str(httpd.server_address[0]), httpd.server_address[1]
    shown = f"[{bound}]" if ":" in bound else bound
    return httpd, f"http://{shown}:{port_}/metrics"


class MeteredStore(BlockStore):
    """A block store whose transfers are counted (bytes, calls, time, puts in flight).

    Delegates everything to ``store``; runs in the same worker threads.
    """

    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self.url = store.url
        self.local = store.local

    @contextmanager
    def _timed(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            STORE_REQUESTS.labels(op).observe(time.perf_counter() - start)

    def get(self, key: bytes) -> bytes:
        with self._timed("get"):
            data = self.store.get(key)
        STORE_BYTES.labels("download").inc(len(data))
        return data

    def get_range(self, key: bytes, offset: int, length: int) -> bytes:
        with self._timed("get_range"):
            data = self.store.get_range(key, offset, length)
        STORE_BYTES.labels("download").inc(len(data))
        return data

    def put(self, key: bytes, data: bytes | memoryview) -> bool:
        with UPLOADS_IN_FLIGHT.track_inprogress(), self._timed("put"):
            written = self.store.put(key, data)
        STORE_BYTES.labels("upload").inc(len(data))
        return written

    def exists(self, key: bytes) -> bool:
        return self.store.exists(key)

    def delete(self, key: bytes) -> None:
        self.store.delete(key)

    def list(self) -> Iterator[bytes]:
        return self.store.list()

    def objects(self) -> Iterator[tuple[bytes, int, float]]:
        return self.store.objects()

    def capacity(self) -> tuple[int, int] | None:
        return self.store.capacity()

    def remove_leftovers(self, grace: float) -> int:
        return self.store.remove_leftovers(grace)

    def close(self) -> None:
        self.store.close()
