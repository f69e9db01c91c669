"""The mount process: connect to the metaserver, open the block store and cache, serve FUSE.

Runs in the foreground until the filesystem is unmounted (``fusermount3 -u``)
or it receives SIGTERM/SIGINT, in which case it commits every open file and
unmounts itself. In write-back mode it waits for the drainer before it
exits (up to ``outage_timeout`` without progress; the journal keeps the rest).

A write-back journal left by an earlier mount of the same cache directory
(a crash, or an unmount while the server was down) is replayed and drained
before the kernel mount is made, in either mode: nothing journalled is
dropped, and the mount never shows a state older than what it acknowledged.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import resource
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pyfuse3
import trio

from nimbusfs import metrics
from nimbusfs.blockstore import BlockStore, open_store
from nimbusfs.cache import BlockCache
from nimbusfs.client import TLS, MetaClient
from nimbusfs.mount.adapter import Kernel, Operations
from nimbusfs.mount.journal import JOURNAL_NAME, Journal, UnknownVersion
from nimbusfs.mount.vfs import VFS
from nimbusfs.mount.writeback import WriteBack
from nimbusfs.services import notify_ready

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    mountpoint: str
    server: str
    token: str
    cache_dir: str
    cache_size: int = 10 << 30
    blocks: str | None = None        # override the block store the server names
    allow_other: bool = False
    read_only: bool = False
    outage_timeout: float = 60.0
    label: str = ""                  # names this mount in conflicted copies (default: below)
    tls: TLS | None = None           # how to trust the metaserver (see MetaClient)
    insecure: bool = False           # the token may go in clear to a non-loopback server
    metrics: str | None = None       # HOST:PORT to serve Prometheus metrics on (FUSE ops timed)
    writeback: bool = False          # close/fsync durable locally, committed in the background
    writeback_limit: int = 10 << 30  # bytes journalled and not committed before writes wait


class MountFailed(Exception):
    """The kernel (or fusermount3) refused the mount; the message is one line with the
    cause and what to do."""


def _fuse_init(ops: Operations, mountpoint: str, options: set[str]) -> None:
    """``pyfuse3.init``, raising :class:`MountFailed` with libfuse's own reason.

    libfuse writes why a mount failed to file descriptor 2 (``fuse: failed to
    open /dev/fuse: Permission denied``) and pyfuse3 raises only "fuse_session_mount
    failed": descriptor 2 is collected meanwhile and passed on afterwards.
    """
    with tempfile.TemporaryFile() as said:
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, options)
            failed = False
        except RuntimeError:
            failed = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        text = said.read().decode(errors="replace")
    if not failed:
        os.write(2, text.encode())
        return
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = lines[-1] if lines else "the kernel refused the FUSE mount"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        hint = ("/dev/fuse is closed to this user: mount as root, or let the user open it"
                " (e.g. chmod 0666 /dev/fuse, Debian's default, or a group it belongs to)")
    elif not shutil.which("fusermount3"):
        hint = "install fuse3 (./mount.sh does), or mount as root"
    else:
        hint = f"check that {mountpoint} is an empty directory this user owns"
    raise MountFailed(f"cannot mount {mountpoint}: {cause}; {hint}")


M_ARENA_MAX = -8  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
READAHEAD_KIB = 1024
# Temporary files of block puts older than this were left by a crash.
LEFTOVER_GRACE = 3600.0


def device_name(cfg: MountConfig) -> str:
    """``HOST/LABEL/ID``: the name of this mount in the change log, versions and conflicts.

    The label (``--label``, by default the mount point's base name) is what a
    conflicted copy is named after, with the host, so that two mounts on one
    machine leave copies a user can tell apart. The random ID keeps every
    mount process's name unique (also two machines with the same host name):
    the server pushes a change to every device but the one that made it.
    """
    label = cfg.label or os.path.basename(cfg.mountpoint.rstrip("/")) or "root"
    return f"{socket.gethostname()}/{label}/{uuid.uuid4().hex[:8]}"


def _lock_cache_dir(path: str) -> int:
    """Hold an exclusive lock on the cache directory: one mount per cache."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MountFailed(f"cache directory {path} is in use by another mount; give this"
                          " mount a --cache-dir of its own") from None
    return fd


def _tune_malloc() -> Callable[[int], int] | None:
    """Keep glibc's malloc from holding memory the mount no longer uses.

    Block transfers run in many worker threads, each allocating megabyte
    buffers. With an arena per busy thread (glibc's default: 8 per core),
    freed memory stays spread over them: arenas are capped at 2 (peak RSS:
    docs/benchmarks.md, "malloc arenas"). The mmap and trim
    thresholds are fixed (glibc would slide them with the largest buffer
    freed): blocks and read replies come from the heap, which is reused
    without page faults (mapping every block-sized buffer afresh cost a third
    of the cold read throughput), and segments of 8 MiB and more are mapped.
    The heap's fragmentation is returned to the kernel by ``_trim_malloc``,
    with the ``malloc_trim`` returned here (None: not glibc, nothing tuned).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
        libc.mallopt(M_MMAP_THRESHOLD, 8 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


async def _trim_malloc(malloc_trim: Callable[[int], int], interval: float = 0.25) -> None:
    """Every ``interval`` seconds, give the kernel the heap's free pages back.

    Blocks of many sizes, some held long by the hot set, fragment the heap so
    that freed memory cannot shrink it from the top; trimming often lowers
    peak RSS at no cost in throughput (docs/benchmarks.md, "Heap trimming").
    """
    while True:
        await trio.sleep(interval)
        malloc_trim(0)


def _open_journal(cfg: MountConfig) -> Journal | None:
    """The write-back journal (None in sync mode without one left to replay).

    Staging files no journal record names are left from a crash of a sync
    mount (or before the record was written): nothing acknowledged them, and
    they are removed.
    """
    staging = os.path.join(cfg.cache_dir, "staging")
    if not (cfg.writeback or os.path.exists(os.path.join(cfg.cache_dir, JOURNAL_NAME))):
        shutil.rmtree(staging, ignore_errors=True)
        return None
    try:
        journal = Journal(cfg.cache_dir)
    except UnknownVersion as e:
        raise MountFailed(str(e)) from None
    named = {r.state["staging"] for r in journal.records()}
    if os.path.isdir(staging):
        for name in os.listdir(staging):
            if name not in named:
                os.unlink(os.path.join(staging, name))
    return journal


def _raise_file_limit() -> None:
    """Raise the soft limit of open files to the hard one: each pending file holds one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _remove_leftovers(store: BlockStore) -> None:
    """Delete the store's temporary files that crashed puts left (in a worker thread)."""
    try:
        n = store.remove_leftovers(LEFTOVER_GRACE)
    except OSError as e:
        log.warning("leftovers of crashed puts not removed from %s: %s", store.url, e)
        return
    if n:
        log.info("removed %d temporary files of crashed puts from %s", n, store.url)


def _raise_readahead(mountpoint: str, kib: int = READAHEAD_KIB) -> None:
    """Raise the kernel's readahead for this mount (FUSE leaves it at 128 KiB).

    Sequential reads then arrive as 1 MiB requests, about twice the cold read
    throughput for half the CPU (docs/benchmarks.md, "Kernel readahead").
    Runs in a worker thread once the mount serves requests: the stat waits
    for the FUSE handshake, which sets the readahead from its own limit (so a
    value written earlier would be lowered again). Needs root; otherwise the
    default stays.
    """
    st = os.stat(mountpoint)
    try:
        with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb",
                  "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.info("kernel readahead left at its default: %s", e)


# Where a mount serving metrics writes their URL, in its cache directory
# (``nimbusfs status`` reads it; the port may have been chosen by the kernel).
METRICS_URL_FILE = "metrics.url"


def _publish(vfs: VFS, cache: BlockCache, client: MetaClient) -> None:
    """Let the mount's gauges read what they show from its parts, when scraped.

    They are read in the metrics server's thread, while the trio thread
    changes what they read: each reads attributes, or copies the open files'
    dict in one call (which the GIL makes atomic), never iterating it live.
    """
    metrics.CACHE_BYTES.labels("disk").set_function(lambda: cache.used)
    metrics.CACHE_BYTES.labels("memory").set_function(lambda: cache.hot.currsize)
    metrics.CACHE_LIMIT.labels("disk").set(cache.max_bytes if cache.on_disk else 0)
    metrics.CACHE_LIMIT.labels("memory").set(cache.hot.maxsize)
    metrics.DIRTY_FILES.set_function(lambda: sum(f.modified for f in list(vfs.files.values())))
    metrics.CONNECTED.set_function(lambda: client.connected)


def _serve_metrics(cfg: MountConfig, ops: Operations) -> Callable[[], None] | None:
    """With ``cfg.metrics``: time FUSE operations and serve ``/metrics``; what stops it.

    Its URL is written to ``METRICS_URL_FILE`` in the cache directory while
    it serves (one left by a mount of this cache that crashed is removed).
    """
    url_file = os.path.join(cfg.cache_dir, METRICS_URL_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(url_file)
    if cfg.metrics is None:
        return None
    try:
        httpd, url = metrics.serve_mount(cfg.metrics)
    except (OSError, ValueError) as e:
        raise MountFailed(f"cannot serve metrics on {cfg.metrics}: {e}") from None
    metrics.instrument(ops)
    with open(url_file + ".tmp", "w") as f:
        f.write(url + "\n")
    os.rename(url_file + ".tmp", url_file)
    log.info("metrics on %s", url)

    def stop() -> None:
        os.unlink(url_file)
        httpd.shutdown()
    return stop


async def serve(cfg: MountConfig) -> None:
    malloc_trim = _tune_malloc()
    lock_fd = _lock_cache_dir(cfg.cache_dir)
    journal = _open_journal(cfg)
    _raise_file_limit()
    async with trio.open_nursery() as nursery:
        client = MetaClient(nursery, cfg.server, cfg.token, device_name(cfg),
                            cfg.outage_timeout, cfg.tls, cfg.insecure)
        await client.connect()
        store = metrics.MeteredStore(open_store(cfg.blocks or client.info["blocks"],
                                                client.call, cfg.outage_timeout))
        cache = BlockCache(store, cfg.cache_dir, cfg.cache_size, timeout=cfg.outage_timeout)
        vfs = VFS(client, cache, cfg.cache_dir, nursery, Kernel())
        client.on_push = vfs.apply_changes
        _publish(vfs, cache, client)
        await client.subscribe()  # before mounting: a failure here leaves nothing mounted
        if journal is not None:
            vfs.writeback = WriteBack(vfs, journal, cfg.writeback_limit)
            nursery.start_soon(vfs.writeback.run)
            if n := vfs.writeback.replay():
                log.info("replaying the write-back journal: %d files (%.1f MiB) to commit"
                         " before mounting", n, vfs.writeback.bytes / 2**20)
                await vfs.writeback.drained()
                log.info("journal replayed")
            if not cfg.writeback:
                vfs.writeback = None
        options = {"fsname=nimbusfs", "subtype=nimbusfs", "default_permissions"}
        if cfg.allow_other:
            options.add("allow_other")
        if cfg.read_only:
            options.add("ro")
        ops = Operations(vfs)
        stop_metrics = _serve_metrics(cfg, ops)
        _fuse_init(ops, cfg.mountpoint, options)
        nursery.start_soon(partial(trio.to_thread.run_sync, _raise_readahead, cfg.mountpoint,
                                   abandon_on_cancel=True))
        nursery.start_soon(vfs.run_invalidations)
        nursery.start_soon(vfs.hold_orphans)
        nursery.start_soon(partial(trio.to_thread.run_sync, _remove_leftovers, store,
                                   abandon_on_cancel=True))
        if malloc_trim is not None:
            nursery.start_soon(_trim_malloc, malloc_trim)
        log.info("mounted %s (server %s, blocks %s, user %s)", cfg.mountpoint, cfg.server,
                 store.url, client.info["user"])
        notify_ready()  # the kernel queues requests until pyfuse3.main() serves them
        stop_requested = False

        async def on_signals() -> None:
            nonlocal stop_requested
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    log.info("signal received: committing open files and unmounting")
                    stop_requested = True
                    await vfs.flush_all(cfg.outage_timeout)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals)
        try:
            await pyfuse3.main()
        finally:
            await vfs.flush_all(cfg.outage_timeout)
            pyfuse3.close(unmount=stop_requested)
            log.info("unmounted %s", cfg.mountpoint)
            await client.aclose()
            if stop_metrics is not None:
                stop_metrics()
            store.close()
            if journal is not None:
                journal.close()
            os.close(lock_fd)
            nursery.cancel_scope.cancel()
