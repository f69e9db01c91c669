"""Where the CPU goes: one benchmark step on a fresh mount, py-spy on the mount and metaserver.

Usage (root)::

    python bench/cpu_profile.py STEP [--gcs] [--writeback] [--n N]

STEP is one of ``creates`` (N files of 4 KiB: create+write+close), ``ls``
(``ls -l`` of a directory of N such files, 3 times), ``write`` (an N MiB file
with fsync), ``read`` (that file cold, after a remount with an empty cache),
``fsync`` (20,000 random 4 KiB writes into that file, as in the benchmark's
random write job, then an fsync: the figure is the fsync's duration, the CPU
and samples cover the writes too), ``tar`` (the first N entries of the
benchmark's source tarball extracted, as root: tar sets owner, mode and times
of every file). ``--no-spy`` measures the step and each process's CPU
without py-spy (which slows the processes it samples).
``--gcs`` puts the blocks in the GCS emulator; ``--writeback`` mounts in
write-back mode, and a step's time and profile then include the drain of
the journal it left (``Target.settle``). py-spy samples only threads
holding the GIL (``--gil``), so idle waits are not counted and the shares are
of Python CPU. For each process it prints the CPU seconds used during the step
(user+system, from /proc, so it includes what py-spy cannot see: the kernel,
native code without the GIL) and the frames holding most samples, inclusive
and own. Raw samples are kept in ``bench/results/profile-STEP-PROC.txt``
(flamegraph.pl input).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack

import psycopg
from gcs import emulator
from harness import MIB, ROOT, cpu_seconds
from jobs import read_all, stream, write_stream
from run import default_tarball
from targets import Nimbus, open_target

PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")


def process_pids(t: Nimbus) -> dict[str, int]:
    """The mount's and the metaserver's pids (a remount changes both: the last
    unmount stops the metaserver)."""
    return {"mount": t._pid(), "metaserver": t.server_pid()}


def summarize(path: str, top: int = 25) -> None:
    total, own, incl = 0, collections.Counter(), collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            total += int(n)
            own[frames[-1]] += int(n)
            for fr in set(frames):
                incl[fr] += int(n)
    if not total:
        print("  (no samples)")
        return
    for title, counter in (("inclusive", incl), ("own", own)):
        print(f"  {title}:")
        for fr, n in counter.most_common(top):
            print(f"  {100 * n / total:5.1f}%  {fr[:130]}")


def transactions(dsn: str) -> int:
    """Transactions the deployment's database has committed so far."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT xact_commit FROM pg_stat_database"
                            " WHERE datname = current_database()").fetchone()[0]


def profile(name: str, unit: str, t: Nimbus, pids: dict[str, int], step: Callable[[], float],
            spy: bool = True) -> None:
    """Run ``step`` (returns a figure in ``unit``) under py-spy on each of ``pids``; print.

    PostgreSQL's statistics reach ``pg_stat_database`` within half a second
    of a transaction's end; the count is read after waiting that long.
    """
    out = {p: os.path.join(ROOT, "bench", "results", f"profile-{name}-{p}.txt") for p in pids}
    spies = [subprocess.Popen([PY_SPY, "record", "--gil", "-r", "200", "-f", "raw", "-p",
                               str(pid), "-o", out[p]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p, pid in pids.items()] if spy else []
    time.sleep(1)  # py-spy attached; earlier statistics reported
    before = {p: cpu_seconds(pid) for p, pid in pids.items()}
    xacts = transactions(t.dsn)
    t0 = time.perf_counter()
    rate = step()
    wall = time.perf_counter() - t0
    used = {p: cpu_seconds(pid) - before[p] for p, pid in pids.items()}
    for s in spies:
        s.send_signal(2)
        s.wait()
    time.sleep(1)
    xacts = transactions(t.dsn) - xacts - 1  # the first count's own
    print(f"\n== {name}: {rate:.2f} {unit}, {wall:.1f} s wall; CPU s: "
          + ", ".join(f"{p} {u:.1f}" for p, u in used.items())
          + f"; PostgreSQL transactions {xacts}")
    for p in pids if spy else ():
        print(f"-- {p} ({out[p]})")
        summarize(out[p])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("creates", "ls", "write", "read", "fsync", "tar"))
    ap.add_argument("--gcs", action="store_true", help="blocks in the GCS emulator")
    ap.add_argument("--n", type=int, help="files (creates, ls, tar: 2000) or MiB (write, read,"
                                          " fsync: 1024)")
    ap.add_argument("--writeback", action="store_true",
                    help="a write-back mount; the step includes its drain")
    ap.add_argument("--no-spy", action="store_true", help="only the figure and CPU seconds")
    args = ap.parse_args()
    n = args.n or (2000 if args.step in ("creates", "ls", "tar") else 1024)
    spy = not args.no_spy
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with ExitStack() as stack:
        emu = None
        if args.gcs:
            base = tempfile.mkdtemp(prefix="nimbus-profile-", dir="/var/tmp")
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            emu = stack.enter_context(emulator(base))
        kind = ("nimbus-gcs" if args.gcs else "nimbus") + ("-wb" if args.writeback else "")
        t = stack.enter_context(open_target(kind, emu))
        assert isinstance(t, Nimbus)
        pids = process_pids(t)
        d = os.path.join(t.root, "d")
        os.mkdir(d)
        names = [os.path.join(d, f"f{i:05d}") for i in range(n)]
        data = os.urandom(4096)

        def creates() -> float:
            t0 = time.perf_counter()
            for p in names:
                with open(p, "wb") as f:
                    f.write(data)
            return n / (time.perf_counter() - t0)

        def ls() -> float:
            t0 = time.perf_counter()
            for _ in range(3):
                subprocess.run(["ls", "-l", d], check=True, stdout=subprocess.DEVNULL)
            return (time.perf_counter() - t0) / 3

        path = os.path.join(d, "seq.bin")

        def write() -> float:
            t0 = time.perf_counter()
            write_stream(path, stream(n, b"profile"))
            return n * MIB / 1e6 / (time.perf_counter() - t0)

        def read() -> float:
            t0 = time.perf_counter()
            read_all(path)
            return n * MIB / 1e6 / (time.perf_counter() - t0)

        def fsync() -> float:
            # The writes are profiled too: starting py-spy with the file open
            # would flush it (the exec closes a copy of its descriptor, and
            # every close of a FUSE file sends FLUSH, which commits).
            with open(path, "r+b") as f:
                rng = random.Random(1)
                for _ in range(20000):
                    os.pwrite(f.fileno(), data, rng.randrange(n * MIB // 4096) * 4096)
                t0 = time.perf_counter()
                os.fsync(f.fileno())
                return time.perf_counter() - t0

        def tar() -> float:
            tarball = default_tarball()
            members = subprocess.run(["tar", "tzf", tarball], check=True, capture_output=True,
                                     text=True).stdout.splitlines()[:n]
            listing = os.path.join(t.home, "members.txt")
            with open(listing, "w") as f:
                f.write("\n".join(members) + "\n")
            t0 = time.perf_counter()
            subprocess.run(["tar", "xzf", tarball, "-C", d, "--no-recursion", "-T", listing],
                           check=True)
            took, returned = time.perf_counter() - t0, time.monotonic()
            print(f"tar x returned after {took:.1f} s, drained {t.settle() - returned:.1f} s"
                  " later")
            return took

        if args.step == "creates":
            profile("creates", "files/s", t, pids, creates, spy)
        elif args.step == "tar":
            profile("tar", f"s for {n} entries", t, pids, tar, spy)
        elif args.step == "ls":
            creates()
            profile("ls", "s per ls -l", t, pids, ls, spy)
        else:
            if args.step in ("read", "fsync"):
                write()
                t.cold()
                pids = process_pids(t)
            if args.step == "fsync":
                profile("fsync", "s per fsync", t, pids, fsync, spy)
            else:
                profile(args.step, "MB/s", t, pids, write if args.step == "write" else read, spy)


if __name__ == "__main__":
    main()
