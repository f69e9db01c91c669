"""Block GC and fsck on a store of many blocks: time taken and space reclaimed.

Fills a private PostgreSQL database and a local block store directly (no
mount): ``--blocks`` blocks of ``--block-size`` random bytes, of which
``--unreferenced`` (a fraction) have had no reference for two hours and
``--orphans`` (a fraction) are store objects no row knows, two hours old;
the others are referenced by versions of files (``--per-file`` blocks each).
Then runs ``nimbusfs gc --dry-run``, ``nimbusfs gc`` (grace 1 h) and
``nimbusfs fsck``, timed, and prints what GC reclaimed.

Usage: ``python bench/gc.py [--blocks 100000] [--block-size 4096]``
(root: it starts PostgreSQL under a temporary directory, as the tests do).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import msgpack
from harness import print_table

from nimbusfs.blockstore import block_hash, open_store
from nimbusfs.embedded import Embedded
from nimbusfs.server.auth import create_user
from nimbusfs.server.db import Database


def fill(db: Database, root: str, n: int, size: int, unref: float, orphan: float,
         per_file: int) -> dict[str, int]:
    """Write the blocks' files (no fsync: filling is not measured) and their rows."""
    store = open_store("file://" + root)
    rng = random.Random(1)
    old = time.time() - 7200
    kinds = {"referenced": 0, "unreferenced": 0, "orphans": 0}
    live: list[tuple[bytes, int]] = []
    rows: list[tuple[bytes, int, int, bool]] = []   # hash, size, refcount, old unref
    for i in range(n):
        data = rng.randbytes(size - 8) + i.to_bytes(8, "big")
        key = block_hash(data)
        path = store._path(key)
        with open(path, "wb") as f:
            f.write(data)
        r = rng.random()
        if r < orphan:
            os.utime(path, (old, old))
            kinds["orphans"] += 1
        elif r < orphan + unref:
            rows.append((key, size, 0, True))
            kinds["unreferenced"] += 1
        else:
            rows.append((key, size, 1, False))
            live.append((key, size))
            kinds["referenced"] += 1
    user = db.run(create_user, "bench", 0)

    def load(cur) -> None:
        with cur.copy("COPY blocks (hash, size, refcount, unref_since) FROM STDIN") as copy:
            for key, sz, refs, stale in rows:
                copy.write_row((key, sz, refs, "now" if not stale else
                                time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(old))))
        cur.execute("UPDATE blocks SET unref_since = NULL WHERE refcount > 0")
        now = time.time_ns()
        for f in range(0, len(live), per_file):
            ext = [[k, s] for k, s in live[f:f + per_file]]
            total = sum(s for _, s in ext)
            cur.execute("INSERT INTO inodes (owner_id, mode, uid, gid, nlink, size, atime_ns,"
                        " mtime_ns, ctime_ns, version) VALUES (%s, 33188, 0, 0, 1, %s, %s, %s,"
                        " %s, 1) RETURNING id", (user.id, total, now, now, now))
            ino = cur.fetchone()[0]
            cur.execute("INSERT INTO dentries (parent, name, inode) VALUES (%s, %s, %s)",
                        (user.root, b"f%d" % f, ino))
            cur.execute("INSERT INTO versions (inode, version, size, extents) VALUES"
                        " (%s, 1, %s, %s)", (ino, total, msgpack.packb(ext)))
            cur.execute("UPDATE users SET used_bytes = used_bytes + %s WHERE id = %s",
                        (total, user.id))
    db.run(load)
    return kinds


def timed(argv: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "nimbusfs.cli", *argv], capture_output=True,
                       text=True)
    secs = time.perf_counter() - t
    if p.returncode not in (0, 1):
        raise SystemExit(p.stdout + p.stderr)
    return secs, p.stdout.strip().splitlines()[-1]


def du(root: str) -> int:
    return sum(e.stat().st_size for d in os.scandir(root) if d.is_dir()
               for e in os.scandir(d.path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--unreferenced", type=float, default=0.4)
    ap.add_argument("--orphans", type=float, default=0.1)
    ap.add_argument("--per-file", type=int, default=10)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="nimbus-bench-gc-")
    os.chmod(home, 0o755)
    emb = Embedded(home)
    emb.start_postgres()
    try:
        emb.ensure_database("gcbench")
        dsn = emb.dsn_for("gcbench")
        db = Database(dsn, pool_size=2)
        db.open()
        root = os.path.join(home, "blocks")
        t = time.perf_counter()
        kinds = fill(db, root, args.blocks, args.block_size, args.unreferenced, args.orphans,
                     args.per_file)
        db.close()
        print(f"filled in {time.perf_counter() - t:.1f} s: {kinds}", flush=True)
        before = du(root)
        admin = ["--dsn", dsn, "--blocks", "file://" + root]
        rows: list[list] = []
        for label, argv in (("gc --dry-run", ["gc", "--dry-run", *admin]),
                            ("gc (grace 1h)", ["gc", *admin]),
                            ("gc again (nothing to do)", ["gc", *admin]),
                            ("fsck", ["fsck", *admin])):
            secs, said = timed(argv)
            print(f"{label}: {secs:.1f} s: {said}", flush=True)
            rows.append([label, f"{secs:.1f}", said])
        after = du(root)
        print(f"store: {before:,} bytes before, {after:,} after: {before - after:,} reclaimed"
              f" ({args.blocks:,} blocks of {args.block_size} bytes)")
        print_table(f"{args.blocks:,} blocks of {args.block_size} bytes", ["step", "seconds",
                    "result"], rows)
    finally:
        emb.stop_postgres()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
