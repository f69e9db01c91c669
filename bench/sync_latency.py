"""Time from close on mount A to the change being seen on mount B.

Two mounts of one embedded volume, each with its own cache (two machines on
one host). Each round writes fresh bytes of a new length on A and closes;
then B polls ``stat`` until the new size shows (this needs the pushed
invalidation: without it the kernel keeps the old size for its attribute
timeout), then opens and reads until it gets the new bytes.
Usage: ``python bench/sync_latency.py [ROUNDS] [--sync|--writeback]`` (the
mounts' mode; default ``--sync``: in write-back mode the time includes A's
journal being drained).
"""

from __future__ import annotations

import os
import platform
import sys
import time

from harness import embedded_mounts, percentiles, print_table, save_json


def main(rounds: int = 200, mode: str = "--sync") -> None:
    samples, stat_samples = [], []
    with embedded_mounts(2, mode) as (a, b):
        path_a, path_b = os.path.join(a, "f"), os.path.join(b, "f")
        with open(path_a, "wb"):
            pass
        for i in range(rounds):
            payload = os.urandom(4096 + i)
            with open(path_a, "wb") as f:
                f.write(payload)
            t0 = time.perf_counter()   # close on A has returned
            deadline = t0 + 10
            while os.stat(path_b).st_size != len(payload):
                if time.perf_counter() > deadline:
                    raise SystemExit(f"round {i}: B never saw the new size")
            stat_samples.append((time.perf_counter() - t0) * 1000)
            while True:
                try:
                    with open(path_b, "rb") as f:
                        if f.read() == payload:
                            break
                except FileNotFoundError:
                    pass
                if time.perf_counter() > deadline:
                    raise SystemExit(f"round {i}: B never saw the new content")
            samples.append((time.perf_counter() - t0) * 1000)
    rows, result = [], {"unit": "ms", "rounds": rounds, "machine": platform.node(),
                        "cpus": os.cpu_count(), "mode": mode}
    for name, s in (("stat on B shows the new size", stat_samples),
                    ("read on B returns the new bytes", samples)):
        p = percentiles(s)
        result[name] = p
        rows.append([name, *(f"{p[k]:.2f}" for k in ("p50", "p95", "p99", "max"))])
    print_table(f"Sync latency from close on A ({rounds} rounds, {mode}, ms)",
                ["event", "p50", "p95", "p99", "max"], rows)
    path = save_json("sync_latency", result)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200, *sys.argv[2:3])
