"""A write-back close's journal write alone: the latency of ``Journal.put``.

One record per close, as a 4 KiB file's close journals it (its bytes inline),
one after another as a single application closes files; every 50 records
the rows are removed as the drainer does (``remove``, not durable). The
journal is a fresh one in a temporary directory on the disk given (default:
the benchmark's, under ``bench/results``), so the figures are those of that
disk's fdatasync, under whatever else writes to it at the time.
Usage: ``python bench/journal_commit.py [N] [--dir D] [--no-checkpoint]``
(``--no-checkpoint``: SQLite's automatic WAL checkpoints off, the WAL grows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

import trio
from harness import ROOT

from nimbusfs.mount.journal import Journal, Record


async def measure(d: str, n: int, checkpoint: bool) -> list[float]:
    journal = Journal(d)
    if not checkpoint:
        journal.db.execute("PRAGMA wal_autocheckpoint=0")
    data = os.urandom(4096)
    took: list[float] = []
    done: list[tuple[int, str]] = []
    for i in range(1, n + 1):
        rec = Record(i, i, uuid.uuid4().hex, {"attr": {"ino": i, "size": 4096},
                                              "inline": [[0, data]], "dirty": [[0, 4096]]},
                     4096, time.time())
        start = time.perf_counter()
        await journal.put(rec)
        took.append(time.perf_counter() - start)
        done.append((i, rec.op_id))
        if i % 50 == 0:
            await journal.remove(done, durable=False)
            done = []
    journal.close()
    return took


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int, nargs="?", default=3000)
    p.add_argument("--dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--no-checkpoint", action="store_true")
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        took = sorted(trio.run(measure, d, a.n, not a.no_checkpoint))
    q = statistics.quantiles(took, n=100)
    print(f"Journal.put x {a.n} ({'no ' if a.no_checkpoint else ''}automatic checkpoints):"
          f" mean {1e3 * statistics.mean(took):.3f} ms, p50 {1e3 * q[49]:.3f},"
          f" p90 {1e3 * q[89]:.3f}, p99 {1e3 * q[98]:.3f}, max {1e3 * took[-1]:.3f}")


if __name__ == "__main__":
    main()
