"""Shared benchmark plumbing: an embedded deployment in a temporary home, mounts, a table.

Benchmarks use the same commands a user does (``nimbusfs mount``/``umount``
on the embedded default), so what they measure is what a user gets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import blake3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


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
        failed = []
        for m in reversed(mounts):
            if os.path.ismount(m):
                try:
                    nimbusfs(home, "umount", m)
                except SystemExit as e:  # go on: the other mounts must come down too
                    failed.append(str(e))
        if not failed:
            shutil.rmtree(base, ignore_errors=True)
        if failed:
            raise SystemExit("\n".join(failed) + f"\n(left {base} for inspection)")


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


def drop_page_cache() -> None:
    """Write back dirty pages and drop the kernel's page, dentry and inode caches."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def pattern(i: int, seed: bytes = b"") -> bytes:
    """MiB number ``i`` of an incompressible stream named by ``seed``."""
    return blake3.blake3(seed + i.to_bytes(8, "little")).digest(length=MIB)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds ``fn()`` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def dir_bytes(path: str) -> int:
    """Sum of the sizes of the regular files under ``path``."""
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a live process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far."""
    return sum(cpu_times(pid))


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
