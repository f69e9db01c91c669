"""The ``nimbusfs`` command.

    nimbusfs mount MOUNTPOINT [--server HOST:PORT --token T] [--cache-dir D]
                              [--blocks URL] [--cache-size BYTES] [--allow-other]
                              [--read-only] [--foreground]
    nimbusfs umount MOUNTPOINT
    nimbusfs server --dsn DSN --listen HOST:PORT --blocks URL
    nimbusfs user add NAME [--quota BYTES] --dsn DSN
    nimbusfs token create USER --dsn DSN
    nimbusfs status

Without ``--server``, ``mount`` starts (or reuses) the embedded default under
``$NIMBUSFS_HOME`` and mounts its owner's volume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time

from nimbusfs.embedded import Embedded, _alive, _wait_for, default_home

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


def _mount_name(mountpoint: str) -> str:
    path = os.path.abspath(mountpoint)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")[-40:]
    return f"{slug}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


# --- mount / umount ----------------------------------------------------------------

def cmd_mount(args: argparse.Namespace) -> int:
    from fusefs.mount import MountConfig

    mp = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mp):
        os.makedirs(mp, exist_ok=True)
    if os.path.ismount(mp):
        print(f"{mp} is already mounted", file=sys.stderr)
        return 1
    emb = Embedded(args.home)
    name = _mount_name(mp)
    if args.server:
        if not args.token:
            print("--server needs --token (or NIMBUSFS_TOKEN)", file=sys.stderr)
            return 2
        server, token = args.server, args.token
    else:
        server, token = emb.start(args.listen)
    cfg = MountConfig(
        mountpoint=mp, server=server, token=token,
        cache_dir=os.path.abspath(args.cache_dir or emb.path("cache", name)),
        cache_size=args.cache_size, blocks=args.blocks, outage_timeout=args.outage_timeout,
        allow_other=args.allow_other if args.allow_other is not None else os.geteuid() == 0,
        read_only=args.read_only)
    if args.foreground:
        return _run_mount(cfg)
    return _spawn_mount(args, emb, cfg, name)


def _run_mount(cfg) -> int:
    import trio

    from fusefs.mount import serve

    _setup_logging()
    trio.run(serve, cfg)
    return 0


def _spawn_mount(args: argparse.Namespace, emb: Embedded, cfg, name: str) -> int:
    """Start the mount process in the background and return once the mount is ready."""
    os.makedirs(emb.path("logs"), exist_ok=True)
    logfile = emb.path("logs", f"mount-{name}.log")
    cmd = [sys.executable, "-m", "nimbusfs.cli", "--home", emb.home, "mount", cfg.mountpoint,
           "--foreground", "--server", cfg.server, "--cache-dir", cfg.cache_dir,
           "--cache-size", str(cfg.cache_size), "--outage-timeout", str(cfg.outage_timeout),
           "--allow-other" if cfg.allow_other else "--no-allow-other"]
    if cfg.blocks:
        cmd += ["--blocks", cfg.blocks]
    if cfg.read_only:
        cmd.append("--read-only")
    env = dict(os.environ, NIMBUSFS_TOKEN=cfg.token)  # not on the command line: ps shows it
    with open(logfile, "ab") as log_f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f,
                                env=env, start_new_session=True)
    _wait_for(lambda: os.path.ismount(cfg.mountpoint) or proc.poll() is not None, 120,
              "the mount")
    if proc.poll() is not None:
        print(f"mount failed; log {logfile}:", file=sys.stderr)
        with open(logfile) as f:
            print("".join(f.readlines()[-20:]), file=sys.stderr)
        return 1
    rec = emb.mount_record(cfg.mountpoint)
    os.makedirs(os.path.dirname(rec), exist_ok=True)
    with open(rec, "w") as f:
        json.dump({"pid": proc.pid, "mountpoint": cfg.mountpoint, "server": cfg.server,
                   "log": logfile, "cache_dir": cfg.cache_dir, "embedded": not args.server}, f)
    print(f"nimbusfs mounted at {cfg.mountpoint}")
    print(f"  server: {cfg.server}")
    if not args.server:
        print(f"  token:  {cfg.token}")
        print("  (another machine mounts this volume with"
              f" ./mount.sh MOUNTPOINT --server {cfg.server} --token TOKEN;"
              " start it with --listen 0.0.0.0:PORT to accept other machines)")
    print(f"  log:    {logfile}")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mp = os.path.abspath(args.mountpoint)
    emb = Embedded(args.home)
    rec_path = emb.mount_record(mp)
    pid = None
    if os.path.exists(rec_path):
        with open(rec_path) as f:
            pid = json.load(f)["pid"]
    if os.path.ismount(mp):
        tool = ["umount", mp] if os.geteuid() == 0 else ["fusermount3", "-u", mp]
        r = subprocess.run(tool)
        if r.returncode:
            print(f"cannot unmount {mp} (files still open?)", file=sys.stderr)
            return 1
    if pid:
        _wait_for(lambda: not _alive(pid), 120, "the mount process to finish")
        os.unlink(rec_path)
    if emb.stop_if_unused():
        print("embedded services stopped")
    return 0


# --- server and admin ----------------------------------------------------------------

def cmd_server(args: argparse.Namespace) -> int:
    import signal

    import trio

    from metaserver import namespace
    from metaserver.client import parse_address
    from metaserver.db import Database
    from metaserver.server import MetaServer

    _setup_logging()
    namespace.RETENTION.update(versions=args.keep_versions, days=args.keep_days)
    db = Database(args.dsn, pool_size=args.pool_size)
    db.open()
    host, port = parse_address(args.listen)

    async def main() -> None:
        server = MetaServer(db, args.dsn, args.blocks)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, host, port)
            bound = listeners[0].socket.getsockname()
            address = f"{bound[0]}:{bound[1]}"
            log.info("metaserver listening on %s (blocks %s)", address, args.blocks)
            if args.info_file:
                tmp = args.info_file + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"pid": os.getpid(), "address": address}, f)
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
    return 0


def _admin_db(args: argparse.Namespace):
    from metaserver.db import Database

    dsn = args.dsn or Embedded(args.home).dsn
    db = Database(dsn, pool_size=1)
    db.open()
    return db


def cmd_user_add(args: argparse.Namespace) -> int:
    from metaserver.auth import create_user

    db = _admin_db(args)
    try:
        user = db.run(create_user, args.name, args.quota)
    finally:
        db.close()
    print(f"user {user.name} created (id {user.id})")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from metaserver.auth import create_token

    db = _admin_db(args)
    try:
        print(db.run(create_token, args.user, args.label))
    finally:
        db.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    emb = Embedded(args.home)
    print(f"state directory: {emb.home}")
    print(f"metaserver:      {emb.server_address() or 'not running'}")
    for rec in emb.live_mounts():
        print(f"mount:           {rec['mountpoint']} (pid {rec['pid']}, server {rec['server']})")
        conflicts = os.path.join(rec["cache_dir"], "conflicts.jsonl")
        if os.path.exists(conflicts):
            with open(conflicts) as f:
                for line in f:
                    c = json.loads(line)
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"]))
                    print(f"  conflict {when}: {c['name']!r} kept the other writer's version;"
                          f" this mount's bytes are in the conflicted copy (inode"
                          f" {c['copy_inode']})")
        recovered = os.path.join(rec["cache_dir"], "recovered.jsonl")
        if os.path.exists(recovered):
            with open(recovered) as f:
                for line in f:
                    r = json.loads(line)
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
                    print(f"  not committed {when}: {r['name']!r} (inode {r['inode']}) kept its"
                          f" committed version; this mount's bytes are saved in {r['path']}")
    cache_root = emb.path("cache")
    if os.path.isdir(cache_root):
        used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_root)
                   for f in fs)
        print(f"cache use:       {used / 2**20:.1f} MiB in {cache_root}")
    return 0


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

    from metaserver.client import connect
    from metaserver.errors import FSError

    server, token, ino = _file_context(args)

    async def main() -> int:
        async with connect(server, token, f"{os.uname().nodename}/cli") as client:
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
    """Write a version's bytes to stdout, fetched from the block store and hash-checked."""
    async def run(client, ino) -> int:
        import trio

        from blockstore import block_hash, open_store

        r = await client.call("open", ino=ino, version=args.version)
        store = open_store(client.info["blocks"])
        out = sys.stdout.buffer
        for key, length in r["extents"]:
            if key is None:
                out.write(bytes(length))
                continue
            data = await trio.to_thread.run_sync(store.get, bytes(key))
            if block_hash(data) != bytes(key):
                print(f"nimbusfs: block {bytes(key).hex()} is corrupt", file=sys.stderr)
                return 1
            out.write(data)
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
    m.add_argument("--server", help="metaserver HOST:PORT (default: the embedded one)")
    m.add_argument("--token", default=os.environ.get("NIMBUSFS_TOKEN"))
    m.add_argument("--cache-dir")
    m.add_argument("--cache-size", type=parse_size, default=parse_size("10G"))
    m.add_argument("--blocks", help="block store: a directory or gs://BUCKET[/PREFIX]")
    m.add_argument("--allow-other", action=argparse.BooleanOptionalAction, default=None,
                   help="let other local users use the mount (default: on when root)")
    m.add_argument("--read-only", action="store_true")
    m.add_argument("--outage-timeout", type=float, default=60.0,
                   help="seconds operations wait for an unreachable metaserver before EIO")
    m.add_argument("--foreground", action="store_true")
    m.add_argument("--listen", default="127.0.0.1:0",
                   help="address for the embedded metaserver, if this starts it")
    m.set_defaults(fn=cmd_mount)

    u = sub.add_parser("umount", help="flush and unmount")
    u.add_argument("mountpoint")
    u.set_defaults(fn=cmd_umount)

    s = sub.add_parser("server", help="run a metaserver")
    s.add_argument("--dsn", required=True, help="PostgreSQL connection string")
    s.add_argument("--listen", default="127.0.0.1:7070")
    s.add_argument("--blocks", required=True, help="block store URL the mounts use")
    s.add_argument("--pool-size", type=int, default=8)
    s.add_argument("--keep-versions", type=int, default=100,
                   help="versions kept per file regardless of age (default 100)")
    s.add_argument("--keep-days", type=int, default=30,
                   help="older versions are kept this many days (default 30)")
    s.add_argument("--info-file", help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_server)

    us = sub.add_parser("user", help="manage users").add_subparsers(dest="ucmd", required=True)
    ua = us.add_parser("add")
    ua.add_argument("name")
    ua.add_argument("--quota", type=parse_size, default=0)
    ua.add_argument("--dsn")
    ua.set_defaults(fn=cmd_user_add)

    ts = sub.add_parser("token", help="manage tokens").add_subparsers(dest="tcmd", required=True)
    tc = ts.add_parser("create")
    tc.add_argument("user")
    tc.add_argument("--label", default="")
    tc.add_argument("--dsn")
    tc.set_defaults(fn=cmd_token_create)

    st = sub.add_parser("status", help="embedded services, mounts, pending writes, conflicts")
    st.set_defaults(fn=cmd_status)

    for name, fn, help_ in (("versions", cmd_versions, "list a file's versions"),
                            ("restore", cmd_restore, "make an old version current again"),
                            ("cat", cmd_cat, "print a version of a file")):
        v = sub.add_parser(name, help=help_)
        v.add_argument("path")
        if name != "versions":
            v.add_argument("--version", type=int, required=name == "restore")
        v.add_argument("--server", help="metaserver (default: the mount's)")
        v.add_argument("--token", default=os.environ.get("NIMBUSFS_TOKEN"))
        v.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
