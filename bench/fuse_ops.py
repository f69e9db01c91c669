"""Where a job's time goes on a mount: FUSE requests by operation, their count and time.

One embedded mount with ``--metrics``; the job runs on it, then the mount's
``nimbusfs_mount_fuse_op_seconds`` histogram is read: per operation, how
many requests and how long the mount took to answer them (waits for the
server, the journal's fsync and the block store included; the kernel's and
pyfuse3's own time per request not). The rest of the wall time is outside
the mount's handlers. With ``--writeback`` it then waits for the journal's
drain and prints how long that took after the job, and the operations and
batch requests the drain sent (``nimbusfs_mount_writeback_ops``,
``_batches``).
Usage: ``python bench/fuse_ops.py tar|git|creates|rm|rm-drained|stat [--writeback|--sync]``
(``tar``: the Django sdist of ``run.py``; ``git``: a clone of its generated
repository; ``creates``: 2,000 files of 4 KiB; ``rm``: ``rm -rf`` of the
extracted sdist right after ``tar x`` returned, ``rm-drained``: once the
write-back journal has drained; ``stat``: a ``stat`` of each file of the
sdist by its path right after ``tar x`` returned, as a build naming its
sources would; only the ``rm -rf`` or the stats are timed and counted).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import jobs
from harness import embedded_mounts
from run import CACHE, default_tarball

from nimbusfs.mount.journal import summary
from nimbusfs.retry import wait_until

FILES = 2000


def samples(url: str, pattern: str) -> list[re.Match]:
    """The lines of the mount's metrics matching ``pattern`` (a regular expression)."""
    lines = urllib.request.urlopen(url).read().decode().splitlines()
    return [m for line in lines if (m := re.match(pattern, line))]


def fuse_ops(url: str) -> dict[str, tuple[int, float]]:
    """operation -> (requests, seconds) from the mount's metrics."""
    found: dict[str, dict[str, float]] = {}
    for m in samples(url, r'nimbusfs_mount_fuse_op_seconds_(sum|count)\{op="(\w+)"\} (\S+)'):
        found.setdefault(m[2], {})[m[1]] = float(m[3])
    return {op: (int(v["count"]), v["sum"]) for op, v in found.items() if v.get("count")}


def server_calls(url: str) -> dict[str, int]:
    """Requests the mount made to the metaserver so far, by operation (what its caches
    did not answer)."""
    return {m[1]: int(float(m[2])) for m in samples(
        url, r'nimbusfs_mount_server_calls_total\{op="(\w+)"\} (\S+)')}


def sent(url: str) -> tuple[dict[str, int], int]:
    """The operations (by name) and batch requests the write-back drain sent so far."""
    ops = {m[1]: int(float(m[2])) for m in samples(
        url, r'nimbusfs_mount_writeback_ops_total\{op="(\w+)"\} (\S+)')}
    batches = [int(float(m[1])) for m in samples(
        url, r"nimbusfs_mount_writeback_batches_total (\S+)")]
    return ops, batches[0] if batches else 0


def drained(url: str, cache: str, before: tuple[dict[str, int], int]) -> None:
    """Wait until the write-back journal in ``cache`` is drained; print how long that took
    and what the drain sent since ``before`` (``sent``)."""
    start = time.monotonic()
    while (summary(cache) or (0,))[0]:
        time.sleep(0.05)
    ops, batches = sent(url)
    ops = {op: n - before[0].get(op, 0) for op, n in ops.items() if n > before[0].get(op, 0)}
    print(f"  drained {time.monotonic() - start:.2f} s after the job: {sum(ops.values())}"
          f" operations ({', '.join(f'{op} {n}' for op, n in sorted(ops.items()))}) in"
          f" {batches - before[1]} batches")


def prepare(job: str, mnt: str, cache: str) -> None:
    """What a job needs before it is timed: the extracted tree that ``rm`` removes."""
    if job.startswith("rm") or job == "stat":
        subprocess.run(["tar", "xf", default_tarball(), "-C", mnt], check=True)
    if job == "rm-drained":
        wait_until(lambda: not (summary(cache) or (0,))[0], 3600, "the write-back drain")


def run_job(job: str, mnt: str) -> None:
    tarball = default_tarball()
    if job.startswith("rm"):
        subprocess.run(["rm", "-rf", "--", *(os.path.join(mnt, n) for n in os.listdir(mnt))],
                       check=True)
    elif job == "tar":
        subprocess.run(["tar", "xf", tarball, "-C", mnt], check=True)
    elif job == "stat":
        names = subprocess.run(["tar", "tf", tarball], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        for name in names:
            if not name.endswith("/"):
                os.stat(os.path.join(mnt, name))
    elif job == "git":
        base = os.path.basename(tarball).split(".tar")[0]
        repo = jobs.make_repo(tarball, os.path.join(CACHE, f"{base}-500.git"), 500)
        subprocess.run(["git", "clone", "-q", f"file://{repo}", os.path.join(mnt, "clone")],
                       check=True)
    else:
        d = os.path.join(mnt, "c")
        os.mkdir(d)
        data = os.urandom(4096)
        for i in range(FILES):
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                f.write(data)


def main(job: str, mode: str = "--writeback") -> None:
    with embedded_mounts(1, mode, "--metrics", "127.0.0.1:0") as (mnt,):
        cache = os.path.join(os.path.dirname(mnt), "cache0")
        with open(os.path.join(cache, "metrics.url")) as f:
            url = f.read().strip()
        prepare(job, mnt, cache)
        before, drain_before, calls_before = fuse_ops(url), sent(url), server_calls(url)
        start = time.monotonic()
        run_job(job, mnt)
        wall = time.monotonic() - start
        ops = {op: (n - before.get(op, (0, 0.0))[0], s - before.get(op, (0, 0.0))[1])
               for op, (n, s) in fuse_ops(url).items()}
        ops = {op: v for op, v in ops.items() if v[0]}
        print(f"{job} {mode}: {wall:.2f} s; in the mount's handlers"
              f" {sum(s for _, s in ops.values()):.2f} s")
        for op, (n, s) in sorted(ops.items(), key=lambda kv: -kv[1][1]):
            print(f"  {op:12s} {n:7d} requests {s:8.2f} s {1000 * s / n:8.3f} ms each")
        calls = {op: n - calls_before.get(op, 0) for op, n in server_calls(url).items()
                 if n > calls_before.get(op, 0)}
        print("  server requests: " + ", ".join(
            f"{op} {n}" for op, n in sorted(calls.items(), key=lambda kv: -kv[1])))
        if mode == "--writeback":
            drained(url, cache, drain_before)


if __name__ == "__main__":
    main(*sys.argv[1:])
