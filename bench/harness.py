"""Shared benchmark plumbing: an embedded deployment in a temporary home, mounts, a table.

Benchmarks use the same commands a user does (``nimbusfs mount``/``umount``
on the embedded default), so what they measure is what a user gets.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nimbusfs(home: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "nimbusfs.cli", "--home", home, *args],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"nimbusfs {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


@contextmanager
def embedded_mounts(n: int, *extra: str) -> Iterator[list[str]]:
    """``n`` mounts of one embedded volume, each with its own cache, torn down after."""
    base = tempfile.mkdtemp(prefix="nimbus-bench-", dir="/tmp")
    os.chmod(base, 0o755)  # the postgres user must reach the home when run as root
    home = os.path.join(base, "home")
    mounts = [os.path.join(base, f"mnt{i}") for i in range(n)]
    try:
        for i, m in enumerate(mounts):
            nimbusfs(home, "mount", m, "--cache-dir", os.path.join(base, f"cache{i}"), *extra)
        yield mounts
    finally:
        for m in reversed(mounts):
            if os.path.ismount(m):
                nimbusfs(home, "umount", m)
        shutil.rmtree(base, ignore_errors=True)


def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": q[49], "p95": q[94], "p99": q[98], "max": max(samples), "n": len(samples)}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(f"\n{title}\n\n| {line} |\n|{'|'.join('-' * (w + 2) for w in widths)}|")
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) + " |")


def save_json(name: str, data: object) -> str:
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path
