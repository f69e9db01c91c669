"""What each mount-protocol operation costs the database: the figures docs/scaling.md sizes on.

A private PostgreSQL cluster (the embedded default's, with pg_stat_statements
loaded) and one metaserver on loopback; one client runs each operation N
times in a row on its own files. Per operation: SQL statements (BEGIN and
COMMIT included, and the op-id record of a mutation), the database's own
planning and execution time (the
work of its backend; the COMMIT's wait for the WAL flush is not in it, but
in the round trip), WAL bytes written (what a standby must receive, and what
sizes the disk's write rate), and the round trip the client saw (one
connection, one call at a time: latency, not throughput). No mount is
subscribed, so the push to other mounts (one indexed query per subscribed
connection and change batch) is not counted.

The last row is a write-back mount's drain: ``batch`` requests of
``BATCH`` new files each, every file a ``mknod`` (a leased number, ``keep``)
and its first ``commit`` (a 4 KiB block, the attributes ``tar x`` sets), as
``nimbusfs/mount/writeback.py`` sends them; its figures are per file, and
its round trip is the batch's divided by its files. The metaserver's CPU
(user+system, from /proc) per operation, or per drained file, is reported
beside: its Python work (argument checks, psycopg's parameter dumping).

Usage: ``python bench/db_cost.py [N]`` (root, like the embedded default; N=500).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import psycopg
import trio
from harness import cpu_seconds, print_table, save_json

from nimbusfs.blockstore import block_hash
from nimbusfs.blockstore.local import LocalStore
from nimbusfs.client import connect
from nimbusfs.embedded import Embedded
from nimbusfs.retry import wait_until
from nimbusfs.server.auth import create_token, create_user
from nimbusfs.server.db import Database

DB = "nimbus_cost"
# Files per ``batch`` request in the drain row (the mount's BATCH_FILES is 256).
BATCH = 100


def start(base: str) -> tuple[Embedded, subprocess.Popen, str, str]:
    """PostgreSQL with pg_stat_statements, a metaserver on it; (emb, server, address, dsn)."""
    emb = Embedded(os.path.join(base, "home"))
    emb.start_postgres()
    with open(emb.path("pg", "postgresql.auto.conf"), "a") as f:
        f.write("shared_preload_libraries = 'pg_stat_statements'\n"
                "pg_stat_statements.track = all\npg_stat_statements.track_planning = on\n")
    emb.stop_postgres()
    emb.start_postgres()
    emb.ensure_database(DB)
    dsn = emb.dsn_for(DB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    info = os.path.join(base, "server.json")
    server = subprocess.Popen(
        [sys.executable, "-m", "nimbusfs.cli", "server", "--dsn", dsn, "--blocks",
         "file://" + os.path.join(base, "blocks"), "--info-file", info,
         "--listen", "127.0.0.1:0"],
        stdout=open(os.path.join(base, "server.log"), "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_until(lambda: os.path.exists(info) or server.poll() is not None, 60, "the metaserver")
    if server.poll() is not None:
        raise SystemExit(f"the metaserver did not start: see {base}/server.log")
    with open(info) as f:
        return emb, server, json.load(f)["address"], dsn


class Meter:
    """The database's statements, execution time and WAL between ``start`` and ``stop``."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    def _one(self, sql: str) -> tuple:
        row = self.conn.execute(sql).fetchone()
        assert row is not None  # an aggregate: always one row
        return row

    def _wal(self) -> int:
        return int(self._one("SELECT pg_current_wal_insert_lsn() - '0/0'")[0])

    def start(self) -> None:
        self.conn.execute("SELECT pg_stat_statements_reset()")
        self.wal = self._wal()

    def stop(self) -> tuple[int, float, int]:
        """(statements, planning + execution ms, WAL bytes) since ``start``, this meter's
        own excluded."""
        wal = self._wal() - self.wal
        calls, ms = self._one(
            "SELECT coalesce(sum(calls), 0),"
            " coalesce(sum(total_plan_time + total_exec_time), 0)"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            " WHERE datname = current_database()) AND query NOT LIKE '%pg_stat_statements%'"
            " AND query NOT LIKE '%pg_current_wal_insert_lsn%'")
        return int(calls), float(ms), int(wal)


async def measure(meter: Meter, server: int, n: int, call: Callable[[int], Awaitable[object]],
                  per: int = 1) -> list[float]:
    """Run ``call(i)`` for i in 0..n-1, one at a time; per call divided by ``per``:
    statements, DB ms, WAL bytes, round-trip ms, the metaserver's CPU ms."""
    meter.start()
    cpu = cpu_seconds(server)
    t0 = time.perf_counter()
    for i in range(n):
        await call(i)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(server) - cpu
    calls, ms, wal = meter.stop()
    k = n * per
    return [calls / k, ms / k, wal / k, wall * 1000 / k, cpu * 1000 / k]


async def run(address: str, token: str, dsn: str, blocks: str, server: int, n: int
              ) -> list[list]:
    store = LocalStore(blocks)
    batches = max(1, n // BATCH)
    datas = [os.urandom(4096) + i.to_bytes(4, "big") for i in range(n + batches * BATCH)]
    keys = [block_hash(d) for d in datas]
    for k, d in zip(keys, datas, strict=True):
        store.put(k, d)
    meter = Meter(dsn)
    rows = []
    async with connect(address, token, "bench") as c:
        root = c.info["root"]
        d = (await c.call("mknod", parent=root, name=b"d", mode=0o40755, uid=0, gid=0))["ino"]
        small = (await c.call("mknod", parent=root, name=b"small", mode=0o40755, uid=0,
                              gid=0))["ino"]
        for i in range(100):
            await c.call("mknod", parent=small, name=b"f%d" % i, mode=0o100644, uid=0, gid=0)
        inos: list[int] = []

        async def create(i: int) -> None:
            inos.append((await c.call("mknod", parent=d, name=b"f%d" % i, mode=0o100644,
                                      uid=0, gid=0))["ino"])

        async def commit(i: int) -> None:
            await c.call("commit", ino=inos[i], base=0, extents=[[keys[i], len(datas[i])]],
                         size=len(datas[i]), mtime=time.time_ns())

        def simple(op: str, **args: object) -> Callable[[int], Awaitable[object]]:
            async def call(i: int) -> object:
                return await c.call(op, **{k: (v(i) if callable(v) else v)
                                           for k, v in args.items()})
            return call

        steps: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
            ("create (mknod)", create),
            ("commit a 4 KiB version (new block)", commit),
            ("getattr", simple("getattr", ino=lambda i: inos[i])),
            ("lookup", simple("lookup", parent=d, name=lambda i: b"f%d" % i)),
            ("open (the current extents)", simple("open", ino=lambda i: inos[i])),
            ("readdir of 100 entries", simple("readdir", ino=small)),
            ("chmod (setattr)", simple("setattr", ino=lambda i: inos[i], mode=0o100600)),
            ("rename", simple("rename", parent=d, name=lambda i: b"f%d" % i, new_parent=d,
                              new_name=lambda i: b"g%d" % i)),
            ("unlink", simple("unlink", parent=d, name=lambda i: b"g%d" % i)),
        ]
        for name, call in steps:
            rows.append([name, *await measure(meter, server, n, call)])
        lessee = "bench-lessee"
        leased: list[int] = []
        while len(leased) < batches * BATCH:
            leased += await c.call("lease_inodes", count=4096, lessee=lessee)

        async def drain(b: int) -> None:
            ops: list[list] = []
            for i in range(b * BATCH, (b + 1) * BATCH):
                data, key, name = datas[n + i], keys[n + i], b"w%d" % i
                ops += [["mknod", uuid.uuid4().hex, {
                            "parent": d, "name": name, "mode": 0o100644, "uid": 0, "gid": 0,
                            "ino": leased[i], "lessee": lessee, "keep": True}],
                        ["commit", uuid.uuid4().hex, {
                            "ino": leased[i], "base": 0, "extents": [[key, len(data)]],
                            "size": len(data), "mtime": time.time_ns(), "kill_priv": False,
                            "attrs": {"mode": 0o100644, "uid": 0, "gid": 0,
                                      "atime": time.time_ns()},
                            "parent": d, "name": name}]]
            for r in await c.call("batch", ops=ops):
                assert r[0] == 0, r

        rows.append([f"drain: batch of {BATCH} x (mknod + commit 4 KiB), per file",
                     *await measure(meter, server, batches, drain, BATCH)])
    return rows


def main(n: int = 500) -> None:
    base = tempfile.mkdtemp(prefix="nimbus-dbcost-", dir="/tmp")
    os.chmod(base, 0o755)  # the postgres user must reach the home when run as root
    emb, server, address, dsn = start(base)
    try:
        db = Database(dsn, pool_size=1)
        db.open()
        db.run(create_user, "bench", 0)
        token = db.run(create_token, "bench")
        db.close()
        rows = trio.run(run, address, token, dsn, os.path.join(base, "blocks"), server.pid, n)
    finally:
        server.terminate()
        server.wait(30)
        emb.stop_postgres()
    shutil.rmtree(base, ignore_errors=True)
    print_table(f"Database cost per operation ({n} of each, one client, one at a time)",
                ["operation", "statements", "DB ms (plan+exec)", "WAL bytes", "round trip ms",
                 "server CPU ms"],
                [[r[0], f"{r[1]:.1f}", f"{r[2]:.3f}", f"{r[3]:,.0f}", f"{r[4]:.2f}",
                  f"{r[5]:.2f}"] for r in rows])
    path = save_json("db_cost", {"n": n, "machine": platform.node(), "cpus": os.cpu_count(),
                                 "rows": {r[0]: dict(zip(("statements", "db_exec_ms",
                                                          "wal_bytes", "round_trip_ms",
                                                          "server_cpu_ms"),
                                                         r[1:], strict=True))
                                          for r in rows}})
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
