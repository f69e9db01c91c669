"""The ``nimbusfs`` command.

    nimbusfs mount MOUNTPOINT [--server HOST:PORT[,HOST:PORT...] --token T] [--cache-dir D]
                              [--blocks URL] [--cache-size BYTES] [--allow-other]
                              [--read-only] [--outage-timeout SECONDS] [--label L]
                              [--foreground] [--listen HOST:PORT]
                              [--tls-ca FILE] [--tls-fingerprint SHA256] [--insecure]
                              [--metrics HOST:PORT]
    nimbusfs umount MOUNTPOINT
    nimbusfs server --dsn DSN --listen HOST:PORT --blocks URL [--http HOST:PORT]
                    [--proxy-blocks] [--keep-versions N] [--keep-days D]
                    [--tls-cert F [--tls-key F]]
    nimbusfs user add NAME [--quota BYTES] [--admin] [--dsn DSN]
    nimbusfs token create USER [--dsn DSN]
    nimbusfs status [--watch [SECONDS]] [--metrics URL]... [--token T]
    nimbusfs versions PATH
    nimbusfs cat PATH [--version N]
    nimbusfs restore PATH --version N
    nimbusfs install-units [--prefix DIR] [--bin PATH]
    nimbusfs SOURCE MOUNTPOINT -o OPTIONS    (mount -t fuse.nimbusfs, fstab: services.py)

(``versions``, ``cat`` and ``restore`` take ``--server``, ``--token`` and the
TLS flags too; ``--dsn`` defaults to the embedded database.)

Without ``--server``, ``mount`` starts (or reuses) the embedded default under
``$NIMBUSFS_HOME`` and mounts its owner's volume. A client sends its token to
a metaserver that is not on loopback only over TLS (``--tls-ca`` or
``--tls-fingerprint``, which ``server --tls-cert`` prints), or with
``--insecure``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from nimbusfs.embedded import Embedded, alive, default_home
from nimbusfs.retry import wait_until
from nimbusfs.services import (
    helper_argv,
    install_units,
    is_helper_call,
    mounted,
    stderr_is_journal,
)

if TYPE_CHECKING:
    from nimbusfs.metricsview import Reading
    from nimbusfs.mount.journal import Waiting

log = logging.getLogger("nimbusfs")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    for noisy in ("urllib3", "google", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 10G)")
    return int(m[1]) << (10 * " KMGT".index(m[2].upper() or " "))


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h`` or ``2d``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 90s, 15m, 1h, 2d)")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2].lower()]


def _label(text: str) -> str:
    """A mount's label: part of a file name (conflicted copies), so no slash, 1-64 bytes."""
    if "/" in text or not 0 < len(text.encode()) <= 64:
        raise argparse.ArgumentTypeError(f"bad label {text!r} (1-64 bytes, no '/')")
    return text


def _tls(args: argparse.Namespace):
    """The client's TLS settings from ``--tls-ca``/``--tls-fingerprint`` (None: plain TCP)."""
    from nimbusfs.client import TLS

    if args.tls_ca is None and args.tls_fingerprint is None:
        return None
    try:
        return TLS(args.tls_ca, args.tls_fingerprint)
    except ValueError as e:
        raise SystemExit(f"nimbusfs: {e}") from None


def _tls_argv(args: argparse.Namespace) -> list[str]:
    """The client TLS flags given, to pass on to a child process."""
    return [*(["--tls-ca", os.path.abspath(args.tls_ca)] if args.tls_ca else []),
            *(["--tls-fingerprint", args.tls_fingerprint] if args.tls_fingerprint else []),
            *(["--insecure"] if args.insecure else [])]


def _add_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", help="CA file that verifies the metaserver's certificate")
    p.add_argument("--tls-fingerprint",
                   help="the metaserver certificate's SHA-256 (as `nimbusfs server` prints it)")
    p.add_argument("--insecure", action="store_true",
                   help="send the token to a metaserver not on loopback without TLS")


def _mount_name(mountpoint: str) -> str:
    path = os.path.abspath(mountpoint)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")[-40:]
    return f"{slug}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


# --- mount / umount ----------------------------------------------------------------

def cmd_mount(args: argparse.Namespace) -> int:
    from nimbusfs.mount.serve import MountConfig

    mp = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mp):
        private = os.umask(args.caller_umask)  # the mountpoint is the caller's to share
        try:
            os.makedirs(mp, exist_ok=True)
        finally:
            os.umask(private)
    emb = Embedded(args.home)
    if os.path.ismount(mp):
        return _already_mounted(emb, mp, args.listen)
    name = _mount_name(mp)
    if args.token_file:
        try:
            with open(args.token_file) as f:
                args.token = f.read().strip()
        except OSError as e:
            raise SystemExit(f"nimbusfs: cannot read the token file: {e}") from None
    if args.server and not args.token:
        print("--server needs --token (or NIMBUSFS_TOKEN, or --token-file)", file=sys.stderr)
        return 2
    # What runs before this attempt: a mount that cannot start stops what it started.
    had_postgres, had_server = emb.postmaster_pid() is not None, emb.server_address() is not None
    mounted = False
    try:
        if args.server:
            server, token = args.server, args.token
        else:
            if not had_server:
                print("nimbusfs: starting the embedded database and metaserver",
                      file=sys.stderr)
            server, token = emb.start(args.listen)
        cfg = MountConfig(
            mountpoint=mp, server=server, token=token,
            cache_dir=os.path.abspath(args.cache_dir or emb.path("cache", name)),
            cache_size=args.cache_size, blocks=args.blocks, outage_timeout=args.outage_timeout,
            allow_other=args.allow_other if args.allow_other is not None else os.geteuid() == 0,
            read_only=args.read_only, label=args.label or "", tls=_tls(args),
            insecure=args.insecure, metrics=args.metrics,
            # Write-back by default on the embedded single-machine deployment only.
            writeback=args.writeback if args.writeback is not None else not args.server,
            writeback_limit=args.writeback_limit)
        rc = _run_mount(cfg) if args.foreground else _spawn_mount(args, emb, cfg, name)
        mounted = rc == 0
        return rc
    finally:
        if not mounted and not args.server and not emb.live_mounts():
            if not had_server:
                emb.stop_server()
            if not had_postgres:
                emb.stop_postgres()


def _already_mounted(emb: Embedded, mp: str, listen: str) -> int:
    """A mount at ``mp`` exists: if it is one of the embedded server's, start what stopped.

    The supervisor restarts services that die, but it may be gone itself
    (killed, or the machine's processes were): mounting again is what the
    user tries, so it starts the embedded services again.
    """
    rec = next((r for r in emb.live_mounts() if r["mountpoint"] == mp), None)
    if rec is None or not rec["embedded"]:
        print(f"{mp} is already mounted", file=sys.stderr)
        return 1
    was = emb.supervisor_pid()
    addr, _ = emb.start(listen)
    print(f"{mp} is already mounted; embedded services"
          f" {'running' if was else 'started again'} (metaserver {addr})")
    return 0


def _run_mount(cfg) -> int:
    """Serve the mount in this process; a mount the kernel refuses is one line, no traceback."""
    import trio

    from nimbusfs.errors import fs_error
    from nimbusfs.mount.serve import MountFailed, serve

    _setup_logging()
    try:
        trio.run(serve, cfg)
    except BaseException as e:
        cause = e
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]  # raised inside the mount's nursery
        if isinstance(cause, MountFailed):
            print(f"nimbusfs: {cause}", file=sys.stderr)
        elif (err := fs_error(e)) is not None:
            log.error("mount failed: %s", err.message)  # a refused token, an untrusted server
        else:
            raise
        return 1
    return 0


def _spawn_mount(args: argparse.Namespace, emb: Embedded, cfg, name: str) -> int:
    """Start the mount process in the background and return once the mount is ready."""
    # Started by systemd (a .mount unit from fstab): its logs go to the journal too.
    journal = stderr_is_journal()
    logfile = "the journal" if journal else emb.path("logs", f"mount-{name}.log")
    cmd = [sys.executable, "-m", "nimbusfs.cli", "--home", emb.home, "mount", cfg.mountpoint,
           "--foreground", "--server", cfg.server, "--cache-dir", cfg.cache_dir,
           "--cache-size", str(cfg.cache_size), "--outage-timeout", str(cfg.outage_timeout),
           "--allow-other" if cfg.allow_other else "--no-allow-other"]
    if cfg.blocks:
        cmd += ["--blocks", cfg.blocks]
    if cfg.read_only:
        cmd.append("--read-only")
    cmd += (["--writeback", "--writeback-limit", str(cfg.writeback_limit)] if cfg.writeback
            else ["--sync"])
    if cfg.label:
        cmd += ["--label", cfg.label]
    if cfg.metrics:
        cmd += ["--metrics", cfg.metrics]
    cmd += _tls_argv(args)
    env = dict(os.environ, NIMBUSFS_TOKEN=cfg.token)  # not on the command line: ps shows it
    print(f"nimbusfs: mounting {cfg.mountpoint}", file=sys.stderr)
    if journal:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    else:
        os.makedirs(emb.path("logs"), exist_ok=True)
        with open(logfile, "ab") as log_f:
            start = log_f.tell()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f,
                                    env=env, start_new_session=True)
    wait_until(lambda: os.path.ismount(cfg.mountpoint) or proc.poll() is not None, 120,
               "the mount")
    if proc.poll() is not None and journal:
        print("nimbusfs: mount failed (see the journal)", file=sys.stderr)
        return 1
    if proc.poll() is not None:
        # The mount process's last line says why (one line for a refused mount).
        with open(logfile, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").split("\n")
        last = next((line for line in reversed(lines) if line.strip()), "no message")
        print(f"nimbusfs: mount failed: {last.strip().removeprefix('nimbusfs: ')}"
              f" (log: {logfile})", file=sys.stderr)
        return 1
    rec = emb.mount_record(cfg.mountpoint)
    os.makedirs(os.path.dirname(rec), exist_ok=True)
    with open(rec, "w") as f:
        json.dump({"pid": proc.pid, "mountpoint": cfg.mountpoint, "server": cfg.server,
                   "log": logfile, "cache_dir": cfg.cache_dir, "embedded": not args.server}, f)
    print(f"nimbusfs mounted at {cfg.mountpoint}")
    print(f"  server: {cfg.server}")
    if not args.server:
        print(f"  api:    {emb.http_url()}/api/v1 (docs: {emb.http_url()}/api/v1/docs)")
        print(f"  token:  {cfg.token}")
        print("  (another machine mounts this volume with"
              f" ./mount.sh MOUNTPOINT --server {cfg.server} --token TOKEN;"
              " start it with --listen 0.0.0.0:PORT to accept other machines)")
    print(f"  log:    {logfile}")
    return 0


def _waiting(cache_dir: str | None) -> Waiting:
    """What a mount's write-back journal holds (nothing if it has none)."""
    from nimbusfs.mount.journal import Waiting, summary

    return (summary(cache_dir) if cache_dir else None) or Waiting(0, 0, 0.0, 0, 0)


def _records_waiting(w: Waiting) -> str:
    """``w``'s records for a person: files (with their bytes) and operations apart."""
    return (f"{w.files} files ({w.bytes / 2**20:.1f} MiB) and {w.ops} namespace"
            " operations")


def _drain_progress(pid: int, cache_dir: str | None, stall: float = 120.0) -> None:
    """Wait for an unmounted mount's process, which drains its journal first.

    One line per change of what is waiting (a progress bar on a terminal).
    Gives up after ``stall`` seconds without progress.
    """
    last: Waiting | None = None
    since = time.monotonic()
    total = _waiting(cache_dir)
    while alive(pid):
        now = _waiting(cache_dir)
        if now != last:
            last, since = now, time.monotonic()
            if now.records:
                # By bytes, or by records when no file holds any.
                done = (1 - now.bytes / total.bytes if total.bytes else
                        1 - now.records / total.records if total.records else 1.0)
                bar = "#" * int(30 * done)
                end = "\r" if sys.stdout.isatty() else "\n"
                print(f"  draining: [{bar:<30}] {_records_waiting(now)} to go", end=end,
                      flush=True)
        elif time.monotonic() - since > stall:
            raise SystemExit(f"the mount process {pid} made no progress for {stall:g} s")
        time.sleep(0.2)
    if last and last.records and sys.stdout.isatty():
        print()


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount; a write-back mount's process commits what it journalled before it exits.

    Nothing journalled is dropped: what the process could not commit (the
    server unreachable) stays in the journal and is committed by the next
    mount of the same cache directory, before that mount answers.
    """
    mp = os.path.abspath(args.mountpoint)
    emb = Embedded(args.home)
    rec_path = emb.mount_record(mp)
    pid = cache_dir = None
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            rec = json.load(f)
        pid, cache_dir = rec["pid"], rec.get("cache_dir")
    waiting = _waiting(cache_dir)
    if waiting.records:
        print(f"nimbusfs: {_records_waiting(waiting)} made on {mp} are not on the server"
              " yet: draining them before unmounting")
    if mounted(mp):
        # --no-canonicalize: no stat of the mount point, which waits for an
        # unreachable server as long as the mount's outage timeout.
        tool = (["umount", "--no-canonicalize", mp] if os.geteuid() == 0
                else ["fusermount3", "-u", mp])
        r = subprocess.run(tool)
        if r.returncode:
            print(f"cannot unmount {mp} (files still open?)", file=sys.stderr)
            return 1
    if pid:
        _drain_progress(pid, cache_dir)
        os.unlink(rec_path)
    waiting = _waiting(cache_dir)
    if waiting.records:
        print(f"nimbusfs: {_records_waiting(waiting)} could not be committed (see the"
              f" mount's log); they stay in {cache_dir} and are committed by the next mount"
              f" of {mp}", file=sys.stderr)
    if emb.stop_if_unused():
        print("embedded services stopped")
    return 1 if waiting.records else 0


# --- server and admin ----------------------------------------------------------------

def cmd_supervise(args: argparse.Namespace) -> int:
    _setup_logging()
    return Embedded(args.home).supervise(args.listen)


def cmd_server(args: argparse.Namespace) -> int:
    import ipaddress
    import signal
    import ssl

    import trio

    from nimbusfs.api import serve_http
    from nimbusfs.blockstore import open_store
    from nimbusfs.client import parse_address
    from nimbusfs.protocol import cert_fingerprint
    from nimbusfs.server import namespace
    from nimbusfs.server.db import Database
    from nimbusfs.server.metaserver import MetaServer

    _setup_logging()
    tls, fingerprint = None, None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        with open(args.tls_cert) as f:
            pem = f.read()
        end = "-----END CERTIFICATE-----"
        first = pem[pem.index("-----BEGIN CERTIFICATE-----"):pem.index(end) + len(end)]
        fingerprint = cert_fingerprint(ssl.PEM_cert_to_DER_cert(first))
    namespace.RETENTION.update(versions=args.keep_versions, days=args.keep_days)
    db = Database(args.dsn, pool_size=args.pool_size, outage_timeout=args.outage_timeout)
    db.open()
    host, port = parse_address(args.listen)

    store = open_store(args.blocks)

    async def main() -> None:
        server = MetaServer(db, args.dsn, store, args.proxy_blocks, tls, args.gc_interval,
                            args.gc_grace)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, host, port)
            bound = listeners[0].socket.getsockname()
            address = f"{bound[0]}:{bound[1]}"
            log.info("metaserver listening on %s (blocks %s%s)", address, args.blocks,
                     ", through this server" if args.proxy_blocks else "")
            if fingerprint:
                log.info("TLS certificate SHA-256 fingerprint: %s", fingerprint)
            elif not ipaddress.ip_address(bound[0]).is_loopback:
                log.warning("listening beyond loopback without TLS (--tls-cert): tokens"
                            " travel in clear")
            http = ""
            if args.http:
                http = await nursery.start(serve_http, server, args.http, args.tls_cert,
                                           args.tls_key)
                log.info("HTTP API on %s/api/v1", http)
            if args.info_file:
                tmp = args.info_file + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"pid": os.getpid(), "address": address, "http": http,
                               "fingerprint": fingerprint}, f)
                os.rename(tmp, args.info_file)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    log.info("stopping")
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        db.close()
        store.close()
    return 0


def cmd_install_units(args: argparse.Namespace) -> int:
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "docs", "operations.md")
    for path in install_units(args.prefix, os.path.abspath(args.bin), docs):
        print(f"wrote {path}")
    print("next: fill /etc/nimbusfs/server.env and mount-INSTANCE.env from the examples,"
          " then systemctl daemon-reload; systemctl enable --now nimbusfs-server"
          " nimbusfs@$(systemd-escape --path MOUNTPOINT)")
    return 0


def _add_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", help="PostgreSQL connection string (default: the embedded one)")
    p.add_argument("--blocks", help="block store URL (default: the embedded one)")


def _admin_db(args: argparse.Namespace):
    from nimbusfs.server.db import Database

    dsn = args.dsn or Embedded(args.home).dsn
    db = Database(dsn, pool_size=1)
    db.open()
    return db


@contextlib.contextmanager
def _store_and_db(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """The database and the block store an admin command works on (default: the embedded ones)."""
    from nimbusfs.blockstore import open_store

    db = _admin_db(args)
    try:
        store = open_store(args.blocks or "file://" + Embedded(args.home).path("blocks"))
        try:
            yield db, store
        finally:
            store.close()
    finally:
        db.close()


def cmd_gc(args: argparse.Namespace) -> int:
    from nimbusfs.server import gc

    _setup_logging()
    with _store_and_db(args) as (db, store):
        report = gc.collect(db, store, args.grace, args.dry_run)
    if report is None:
        print("another block GC is running (a metaserver's schedule?); try again later")
        return 1
    print(report)
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from nimbusfs.server import fsck

    _setup_logging()
    started = time.monotonic()
    with _store_and_db(args) as (db, store):
        faults = fsck.check(db, store, args.verify_blocks, args.repair)
    for f in faults:
        print(f)
    print(fsck.summary(faults, started))
    return 1 if faults else 0


def cmd_user_add(args: argparse.Namespace) -> int:
    from nimbusfs.server.auth import create_user

    db = _admin_db(args)
    try:
        user = db.run(create_user, args.name, args.quota, args.admin)
    finally:
        db.close()
    print(f"user {user.name} created (id {user.id})")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from nimbusfs.server.auth import create_token

    db = _admin_db(args)
    try:
        print(db.run(create_token, args.user, args.label))
    finally:
        db.close()
    return 0


def _status_services(emb: Embedded, mounts: list[dict]) -> None:
    """The embedded services: running or not, restarts, and what to run if they are down."""
    state = emb.supervisor_state()
    pid = emb.postmaster_pid()
    print(f"metaserver:      {emb.server_address() or 'not running'}")
    if url := emb.http_url():
        print(f"HTTP API:        {url}/api/v1")
    print(f"postgres:        {f'running (pid {pid})' if pid else 'not running'}")
    embedded = [r["mountpoint"] for r in mounts if r["embedded"]]
    if state is None:
        if embedded:
            print("supervisor:      not running: nothing restarts the embedded services;"
                  f" run ./mount.sh {embedded[0]} (nimbusfs mount) to start them again")
        return
    print(f"supervisor:      running (pid {state['pid']})")
    for name, s in state["services"].items():
        if s["restarts"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["last_restart"]))
            print(f"  {name} restarted {s['restarts']} time{'s' * (s['restarts'] > 1)},"
                  f" last at {when}, reason: {s['last_reason']}")
        if s["down"]:
            print(f"  {name} is down ({s['down']}); restarting with backoff"
                  + (f", last try failed: {s['error']}" if s["error"] else ""))
            print(f"    see {emb.path('logs')}/{name}.log and supervisor.log; if it does not"
                  " recover, fix the cause, then nimbusfs umount each mount and mount again")


def _conflict(c: dict[str, Any]) -> str:
    """A line of a mount's ``conflicts.jsonl`` for a person."""
    if "refused" in c:   # a journalled namespace operation the server refused
        return (f"{c['refused']} refused ({c['error']}) and dropped from the journal:"
                f" {c['args']}")
    if "kept_as" in c:   # a journalled create whose name was taken or directory removed
        return (f"{c['name']!r} made here was kept as {c['kept_as']!r} in directory"
                f" inode {c['kept_in']} (its name was taken or its directory removed)")
    return (f"conflict: {c['name']!r} kept the other writer's version; this mount's bytes"
            f" are in the conflicted copy (inode {c['copy_inode']})")


def _records(cache_dir: str, name: str) -> Iterator[tuple[dict, str]]:
    """The events a mount recorded in ``cache_dir/name`` (JSON lines), with their local time."""
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                yield r, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))


def _status_metrics(args: argparse.Namespace, emb: Embedded, mounts: list[dict],
                    before: dict[str, Reading]) -> dict[str, Reading]:
    """The figures of the embedded metaserver, of each mount serving metrics, and of
    each ``--metrics`` URL; returns this reading of each, for the next (``--watch``)."""
    from nimbusfs.metricsview import show
    from nimbusfs.mount.serve import METRICS_URL_FILE

    endpoints = []
    if url := emb.http_url():
        endpoints.append(("metaserver", f"{url}/metrics", None))
    for rec in mounts:
        with contextlib.suppress(OSError), open(os.path.join(rec["cache_dir"],
                                                             METRICS_URL_FILE)) as f:
            endpoints.append((f"mount {rec['mountpoint']}", f.read().strip(), None))
    endpoints += [(url, url, args.token) for url in args.metrics]
    now: dict[str, Reading] = {}
    for title, url, token in endpoints:
        reading = show(title, url, token, before.get(url))
        if reading is not None:
            now[url] = reading
    return now


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status once, or with ``--watch`` again every few seconds, with rates."""
    if args.watch is None:
        _status(args, {})
        return 0
    before: dict[str, Reading] = {}
    try:
        while True:
            frame = io.StringIO()
            with contextlib.redirect_stdout(frame):
                print(time.strftime("%Y-%m-%d %H:%M:%S"), f"(every {args.watch:g} s;"
                      " Ctrl-C stops)")
                before = _status(args, before)
            print("\033[H\033[2J" + frame.getvalue(), end="", flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _status(args: argparse.Namespace, before: dict[str, Reading]) -> dict[str, Reading]:
    emb = Embedded(args.home)
    print(f"state directory: {emb.home}")
    mounts = emb.live_mounts()
    _status_services(emb, mounts)
    for rec in mounts:
        print(f"mount:           {rec['mountpoint']} (pid {rec['pid']}, server {rec['server']})")
        waiting = _waiting(rec["cache_dir"])
        if waiting.records:
            print(f"  write-back: {_records_waiting(waiting)} waiting for the server, the"
                  f" oldest journalled {time.time() - waiting.oldest:.0f} s ago")
        for c, when in _records(rec["cache_dir"], "conflicts.jsonl"):
            print(f"  {when}: {_conflict(c)}")
        for r, when in _records(rec["cache_dir"], "recovered.jsonl"):
            print(f"  not committed {when}: {r['name']!r} (inode {r['inode']}) kept its"
                  f" committed version; this mount's bytes are saved in {r['path']}")
    cache_root = emb.path("cache")
    if os.path.isdir(cache_root):
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_root)
                   for f in fs)
        print(f"cache use:       {used / 2**20:.1f} MiB in {cache_root}")
    return _status_metrics(args, emb, mounts, before)


# --- versions ---------------------------------------------------------------------------

def _file_context(args: argparse.Namespace) -> tuple[str, str, int]:
    """(server, token, inode) for a file inside a mount."""
    path = os.path.abspath(args.path)
    ino = os.stat(path).st_ino
    emb = Embedded(args.home)
    server = args.server
    if server is None:
        recs = [r for r in emb.live_mounts()
                if path.startswith(r["mountpoint"].rstrip("/") + "/")]
        if not recs:
            raise SystemExit(f"{path} is not in a mount started by nimbusfs; pass --server")
        server = max(recs, key=lambda r: len(r["mountpoint"]))["server"]
    token = args.token
    if token is None:
        try:
            with open(emb.path("token")) as f:
                token = f.read().strip()
        except FileNotFoundError:
            raise SystemExit("no token: pass --token or set NIMBUSFS_TOKEN") from None
    return server, token, ino


def _with_client(args: argparse.Namespace, fn) -> int:
    import trio

    from nimbusfs.client import connect
    from nimbusfs.errors import FSError

    server, token, ino = _file_context(args)

    async def main() -> int:
        async with connect(server, token, f"{os.uname().nodename}/cli", tls=_tls(args),
                           insecure=args.insecure) as client:
            return await fn(client, ino)

    try:
        return trio.run(main)
    except FSError as e:
        print(f"nimbusfs: {e.message}", file=sys.stderr)
        return 1


def cmd_versions(args: argparse.Namespace) -> int:
    async def run(client, ino) -> int:
        print(f"{'version':>7}  {'size':>12}  {'time':19}  device / user")
        for v in await client.call("versions", ino=ino):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["time"]))
            print(f"{v['version']:>7}  {v['size']:>12}  {when}  {v['device']} / {v['user']}")
        return 0
    return _with_client(args, run)


def cmd_restore(args: argparse.Namespace) -> int:
    async def run(client, ino) -> int:
        attr = await client.call("restore", ino=ino, version=args.version)
        print(f"restored version {args.version} as version {attr['version']}")
        return 0
    return _with_client(args, run)


def cmd_cat(args: argparse.Namespace) -> int:
    """Write a version's bytes to stdout, read as the mount reads them (hash-checked)."""
    async def run(client, ino) -> int:
        import trio

        from nimbusfs.blockstore import open_store
        from nimbusfs.cache import BlockCache
        from nimbusfs.content.reader import stream

        r = await client.call("open", ino=ino, version=args.version)
        cache = BlockCache(open_store(client.info["blocks"], client.call), None, 0)
        out = sys.stdout.buffer
        size = sum(n for _, n in r["extents"])   # the version's ("attr" is the file's now)
        async for data in stream(cache, r["extents"], 0, size):
            await trio.to_thread.run_sync(out.write, data)
        out.flush()
        return 0
    return _with_client(args, run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nimbusfs", description="A cloud drive you mount.")
    p.add_argument("--home", default=default_home(),
                   help="state directory (default $NIMBUSFS_HOME or ~/.local/share/nimbusfs)")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("mount", help="mount a volume")
    m.add_argument("mountpoint")
    m.add_argument("--server", help="metaserver HOST:PORT, or several replicas of one volume"
                   " HOST:PORT,HOST:PORT tried in turn (default: the embedded one)")
    m.add_argument("--token", default=os.environ.get("NIMBUSFS_TOKEN"))
    m.add_argument("--token-file", help="read the token from this file (fstab, units)")
    m.add_argument("--cache-dir")
    m.add_argument("--cache-size", type=parse_size, default=parse_size("10G"))
    m.add_argument("--blocks", help="block store: a directory or gs://BUCKET[/PREFIX]")
    m.add_argument("--allow-other", action=argparse.BooleanOptionalAction, default=None,
                   help="let other local users use the mount (default: on when root)")
    m.add_argument("--read-only", action="store_true")
    m.add_argument("--outage-timeout", type=float, default=60.0,
                   help="seconds operations wait for an unreachable metaserver before EIO")
    m.add_argument("--label", type=_label,
                   help="names this mount in conflicted copies, after the host name"
                        " (default: the mount point's base name)")
    m.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics (FUSE operations, cache, transfers) there,"
                        " without a token: keep it on loopback or a monitoring network")
    m.add_argument("--foreground", action="store_true")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--writeback", dest="writeback", action="store_true", default=None,
                      help="close and fsync return once the data is journalled on the local"
                           " disk; committed to the server in the background, in order (the"
                           " default of the embedded server)")
    mode.add_argument("--sync", dest="writeback", action="store_false",
                      help="close and fsync return once the data is committed on the server"
                           " (the default with --server)")
    m.add_argument("--writeback-limit", type=parse_size, default=parse_size("10G"),
                   help="journalled bytes not yet committed before writes wait (default 10G)")
    m.add_argument("--listen", default="127.0.0.1:0",
                   help="address for the embedded metaserver, if this starts it")
    _add_tls_args(m)
    m.set_defaults(fn=cmd_mount)

    u = sub.add_parser("umount", help="flush and unmount")
    u.add_argument("mountpoint")
    u.set_defaults(fn=cmd_umount)

    s = sub.add_parser("server", help="run a metaserver")
    # $NIMBUSFS_DSN keeps a password off the command line, which every local user can read.
    s.add_argument("--dsn", default=os.environ.get("NIMBUSFS_DSN"),
                   required="NIMBUSFS_DSN" not in os.environ,
                   help="PostgreSQL connection string (default: $NIMBUSFS_DSN)")
    s.add_argument("--listen", default="127.0.0.1:7070")
    s.add_argument("--blocks", required=True, help="block store URL")
    s.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the HTTP API /api/v1 there (e.g. 127.0.0.1:7080)")
    s.add_argument("--proxy-blocks", action="store_true",
                   help="mounts hold no store credentials: their blocks go through this"
                        " server, which lets each user read only their own (multi-user"
                        " deployments; see the README's security section)")
    s.add_argument("--pool-size", type=int, default=8)
    s.add_argument("--outage-timeout", type=float, default=60.0,
                   help="seconds a request waits for an unreachable database (a restart, a"
                        " failover) before it fails with EIO (default 60)")
    s.add_argument("--keep-versions", type=int, default=100,
                   help="versions kept per file regardless of age (default 100)")
    s.add_argument("--keep-days", type=int, default=30,
                   help="older versions are kept this many days (default 30)")
    s.add_argument("--gc-interval", type=parse_duration, default=3600.0, metavar="DURATION",
                   help="run block GC this often (default 1h; 0: never)")
    s.add_argument("--gc-grace", type=parse_duration, default=3600.0, metavar="DURATION",
                   help="GC deletes what has been unreferenced this long (default 1h)")
    s.add_argument("--tls-cert", help="serve TLS with this certificate (PEM, chain first)")
    s.add_argument("--tls-key", help="its private key (PEM; default: in --tls-cert)")
    s.add_argument("--info-file", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_server)

    g = sub.add_parser("gc", help="delete blocks unreferenced for longer than the grace")
    g.add_argument("--grace", type=parse_duration, default=3600.0, metavar="DURATION",
                   help="keep what was unreferenced or stored more recently (default 1h)")
    g.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    _add_admin_args(g)
    g.set_defaults(fn=cmd_gc)

    f = sub.add_parser("fsck", help="check the database and the block store (exit 1 on faults)")
    f.add_argument("--verify-blocks", action="store_true",
                   help="also read every referenced block and check its hash")
    f.add_argument("--repair", action="store_true",
                   help="recount references, links and use; drop entries that point nowhere;"
                        " purge orphans left behind; mark versions with lost blocks damaged")
    _add_admin_args(f)
    f.set_defaults(fn=cmd_fsck)

    us = sub.add_parser("user", help="manage users").add_subparsers(dest="ucmd", required=True)
    ua = us.add_parser("add")
    ua.add_argument("name")
    ua.add_argument("--quota", type=parse_size, default=0)
    ua.add_argument("--admin", action="store_true",
                    help="may see the whole store's totals (GET /api/v1/storage/stats)")
    ua.add_argument("--dsn")
    ua.set_defaults(fn=cmd_user_add)

    ts = sub.add_parser("token", help="manage tokens").add_subparsers(dest="tcmd", required=True)
    tc = ts.add_parser("create")
    tc.add_argument("user")
    tc.add_argument("--label", default="")
    tc.add_argument("--dsn")
    tc.set_defaults(fn=cmd_token_create)

    sv = sub.add_parser("supervise", help="run the embedded services' supervisor (internal)")
    sv.add_argument("--listen", default="127.0.0.1:0")
    sv.set_defaults(fn=cmd_supervise)

    iu = sub.add_parser("install-units",
                        help="write the systemd units (nimbusfs-server, nimbusfs@MOUNTPOINT)")
    iu.add_argument("--prefix", default="/",
                    help="root to write under (default /: /etc/systemd/system, /etc/nimbusfs)")
    iu.add_argument("--bin", default=os.path.join(os.path.dirname(sys.executable), "nimbusfs"),
                    help="the nimbusfs program the units run (default: this one)")
    iu.set_defaults(fn=cmd_install_units)

    st = sub.add_parser("status", help="embedded services, mounts, conflicts, files not"
                                       " committed, cache use, and their metrics")
    st.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                    help="show it again every SECONDS (default 2), with rates over that time")
    st.add_argument("--metrics", action="append", default=[], metavar="URL",
                    help="also show the figures of this /metrics endpoint (another"
                         " metaserver, or a mount); repeatable")
    st.add_argument("--token", default=os.environ.get("NIMBUSFS_TOKEN"),
                    help="an administrator's token, for a metaserver's /metrics off this host")
    st.set_defaults(fn=cmd_status)

    for name, fn, help_ in (("versions", cmd_versions, "list a file's versions"),
                            ("restore", cmd_restore, "make an old version current again"),
                            ("cat", cmd_cat, "print a version of a file")):
        v = sub.add_parser(name, help=help_)
        v.add_argument("path")
        if name != "versions":
            v.add_argument("--version", type=int, required=name == "restore")
        v.add_argument("--server", help="metaserver HOST:PORT[,HOST:PORT...] (default: the"
                       " mount's)")
        v.add_argument("--token", default=os.environ.get("NIMBUSFS_TOKEN"))
        _add_tls_args(v)
        v.set_defaults(fn=fn)
    p.set_defaults(commands=set(sub.choices))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command with umask 077 (mount.fuse3's ``SOURCE MOUNTPOINT -o OPTIONS`` too).

    What it and the processes it starts create is private to the user: the
    state directory's logs (they name mountpoints), mount records, the
    metaserver's address, block cache and store files, conflict lists (they
    name files). A mountpoint made by ``mount`` gets the caller's umask.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if is_helper_call(argv, parser.get_default("commands")):
        argv = helper_argv(argv)
    args = parser.parse_args(argv)
    args.caller_umask = os.umask(0o077)
    try:
        return args.fn(args)
    except TimeoutError as e:  # a service or a mount that did not come (or go) in time
        raise SystemExit(f"nimbusfs: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
