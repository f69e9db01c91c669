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
It prints MB/s, the mount's CPU seconds (and the kernel's share), the load
average and how idle the CPUs were.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial

import harness
from gcs import emulator, raw_baseline
from harness import MIB, cpu_times
from jobs import read_all, stream, write_stream
from targets import Nimbus, open_target

HERE = harness.ROOT


def use(tree: str) -> None:
    """Mount (at the next ``cold``) from ``tree``: ``nimbusfs`` runs there, importing it first."""
    harness.ROOT = tree
    if tree == HERE:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = tree


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
        for r in range(1, args.rounds + 1):
            raw = raw_baseline(emu, args.mib)
            print(f"round {r}: raw client upload {raw['upload MB/s']:.0f} MB/s, download"
                  f" {raw['download MB/s']:.0f} MB/s", flush=True)
            for name, tree in trees.items():
                use(tree)
                t.cold()
                if args.write:
                    new = os.path.join(t.root, f"new-{r}-{name}.bin")
                    dt, cpu, idle = measured(t, partial(write_stream, new,
                                                        stream(args.mib, new.encode())))
                    os.unlink(new)
                    print(f"  {name}: write+fsync {mb / dt:.0f} MB/s, {cpu}, {idle}", flush=True)
                    t.cold()
                dt, cpu, idle = measured(t, lambda: read_all(path))
                print(f"  {name}: cold read {mb / dt:.0f} MB/s, {cpu}, {idle}", flush=True)


def measured(t: Nimbus, fn: Callable[[], object]) -> tuple[float, str, str]:
    """``fn()``'s wall seconds, the mount's CPU during it, and the load then."""
    pid = t._pid()
    c0, i0 = cpu_times(pid), cpu_busy()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    c1, i1 = cpu_times(pid), cpu_busy()
    idle = 100 * (i1[0] - i0[0]) / max(1, i1[1] - i0[1])
    user, system = c1[0] - c0[0], c1[1] - c0[1]
    return (dt, f"mount CPU {user + system:.2f} s (system {system:.2f})",
            f"load {os.getloadavg()[0]:.1f}, CPUs {idle:.0f}% idle")

if __name__ == "__main__":
    main()
