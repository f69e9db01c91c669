"""Cold sequential reads on the GCS emulator, alternating versions of the code on one mount.

Usage (root)::

    git archive OLD | tar -x -C /tmp/old      # the code to compare with
    python bench/ab_cold_read.py /tmp/old [/tmp/other ...] [--mib 512] [--rounds 3] [--write]

On a shared machine, runs minutes apart do not compare (the raw client's
download swung 448-982 MB/s between runs of ``./bench.sh``). This writes one
file on one nimbus-gcs target, then for each round measures the raw client
(``raw_baseline``) and reads the file cold (``Target.cold``: page cache
dropped, cache directory deleted, remounted) once with the mount run from
each tree given (A, B, ...) and once from this one (the last letter);
``--write`` first writes a new file of that size with fsync and times it.
Each round starts one tree later than the one before (A B C, B C A, ...):
the first read after the raw client's download ran slower in some sets.

Per read it prints MB/s and its share of that round's raw download, how
long the first 16 MiB took (the ramp: threads, connections and readahead
starting), the mount's CPU seconds split between its trio thread (FUSE
requests, the cache) and the others (block transfers, hash checks), each
user+system, the load average and how idle the CPUs were; at the end the
median and range of each variant over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial

import harness
from gcs import emulator, raw_baseline
from harness import MIB
from jobs import stream, write_stream
from targets import Nimbus, open_target

HERE = harness.ROOT


def use(tree: str) -> None:
    """Mount (at the next ``cold``) from ``tree``: ``nimbusfs`` runs there, importing it first."""
    harness.ROOT = tree
    if tree == HERE:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = tree


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds of a process's main thread ("trio") and of the others."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"trio": (0.0, 0.0), "threads": (0.0, 0.0)}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:   # a worker thread that just ended: its time is lost
            continue
        k = "trio" if tid == str(pid) else "threads"
        out[k] = (out[k][0] + int(v[11]) / tick, out[k][1] + int(v[12]) / tick)
    return out


def read_ramp(path: str, ramp: int = 16 * MIB) -> float:
    """Read ``path`` to its end in 1 MiB reads; the seconds its first ``ramp`` bytes took."""
    t0 = time.perf_counter()
    first = 0.0
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(MIB):
            n += len(b)
            if not first and n >= ramp:
                first = time.perf_counter() - t0
    return first


def cpu_busy() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", nargs="+", help="copies of the code to compare with (A, B, ...)")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true",
                    help="also write a new file with fsync (before each cold read)")
    args = ap.parse_args()
    trees = {chr(ord("A") + i): os.path.abspath(t) for i, t in enumerate([*args.old, HERE])}
    mb = args.mib * MIB / 1e6
    with ExitStack() as stack:
        base = tempfile.mkdtemp(prefix="nimbus-ab-", dir="/var/tmp")
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        emu = stack.enter_context(emulator(base))
        use(trees["A"])   # the file is written by the first tree's mount
        stack.callback(use, HERE)
        t = stack.enter_context(open_target("nimbus-gcs", emu))
        assert isinstance(t, Nimbus)
        path = os.path.join(t.root, "seq.bin")
        write_stream(path, stream(args.mib, b"ab"))
        names = list(trees)
        got: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for r in range(1, args.rounds + 1):
            raw = raw_baseline(emu, args.mib)
            down = raw["download MB/s"]
            got["raw"].append((down, 100.0, 0.0))
            print(f"round {r}: raw client upload {raw['upload MB/s']:.0f} MB/s, download"
                  f" {down:.0f} MB/s", flush=True)
            k = (r - 1) % len(names)
            for name in names[k:] + names[:k]:
                use(trees[name])
                t.cold()
                if args.write:
                    new = os.path.join(t.root, f"new-{r}-{name}.bin")
                    dt, _, cpu, idle = measured(t, partial(write_stream, new,
                                                           stream(args.mib, new.encode())))
                    os.unlink(new)
                    print(f"  {name}: write+fsync {mb / dt:.0f} MB/s, {cpu}, {idle}", flush=True)
                    t.cold()
                dt, ramp, cpu, idle = measured(t, lambda: read_ramp(path))
                got[name].append((mb / dt, 100 * mb / dt / down, 1000 * ramp))
                print(f"  {name}: cold read {mb / dt:.0f} MB/s ({100 * mb / dt / down:.0f}% of"
                      f" raw), first 16 MiB {1000 * ramp:.0f} ms, {cpu}, {idle}", flush=True)
        print("medians (ranges):")
        for name, rows in got.items():
            cols = [sorted(c) for c in zip(*rows, strict=True)]
            med = [f"{statistics.median(c):.0f} ({c[0]:.0f}-{c[-1]:.0f})" for c in cols]
            print(f"  {name}: {med[0]} MB/s, {med[1]} % of raw"
                  + ("" if name == "raw" else f", first 16 MiB {med[2]} ms"))


def measured(t: Nimbus, fn: Callable[[], float | None]) -> tuple[float, float, str, str]:
    """``fn()``'s wall seconds and result, the mount's CPU during it, and the load then."""
    pid = t._pid()
    c0, i0 = thread_cpu(pid), cpu_busy()
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    c1, i1 = thread_cpu(pid), cpu_busy()
    idle = 100 * (i1[0] - i0[0]) / max(1, i1[1] - i0[1])
    cpu = ", ".join(f"{k} {c1[k][0] - c0[k][0]:.2f}+{c1[k][1] - c0[k][1]:.2f}" for k in c0)
    return (dt, result or 0.0, f"mount CPU s (user+system): {cpu}",
            f"load {os.getloadavg()[0]:.1f}, CPUs {idle:.0f}% idle")

if __name__ == "__main__":
    main()
