"""CPU of every process a cold read passes through: the raw client's download against a mount's.

Usage (root)::

    python bench/gcs_path_cpu.py [--mib 512] [--rounds 3]

On one GCS emulator, one nimbus-gcs target with a file of ``--mib`` MiB;
each round times the raw client's cold download (``raw_baseline``) and the
mount's cold read of the file (``Target.cold``), and prints the CPU seconds
(user + system, from ``/proc``) each process on the path used meanwhile:
the raw client (this process's threads) or the mount and the reader (this
process), the emulator, and the counting proxy between them. On a machine
whose CPUs are all busy, a read goes about as fast as its path's CPU per
byte allows, so the totals bound the mount's share of the raw client's
throughput (docs/gcs-path.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial

import gcs
from gcs import emulator
from harness import MIB, cpu_seconds
from jobs import read_all, stream, write_stream
from targets import Nimbus, open_target


def own_cpu() -> float:
    """CPU seconds this process (all its threads) has used so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


Procs = dict[str, Callable[[], float]]


def used(procs: Procs, fn: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """``fn()``'s wall seconds, and the CPU seconds each of ``procs`` used meanwhile."""
    before = {k: f() for k, f in procs.items()}
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, {k: f() - before[k] for k, f in procs.items()}


def raw_download(emu: gcs.Emulator, mib: int, procs: Procs) -> tuple[float, dict[str, float]]:
    """``raw_baseline``'s download (the second step it times), with ``used``'s figures."""
    runs: list[tuple[float, dict[str, float]]] = []
    timed = gcs.timed

    def measured(fn: Callable[[], object]) -> float:
        runs.append(used(procs, fn))
        return runs[-1][0]
    gcs.timed = measured
    try:
        gcs.raw_baseline(emu, mib)
    finally:
        gcs.timed = timed
    return runs[1]


def show(what: str, mb: float, dt: float, cpu: dict[str, float]) -> None:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    print(f"  {what}: {mb / dt:.0f} MB/s; CPU s: {parts}, total {sum(cpu.values()):.2f}"
          f" (load {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    mb = args.mib * MIB / 1e6
    with ExitStack() as stack:
        base = tempfile.mkdtemp(prefix="nimbus-pathcpu-", dir="/var/tmp")
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        emu = stack.enter_context(emulator(base))
        t = stack.enter_context(open_target("nimbus-gcs", emu))
        assert isinstance(t, Nimbus)
        path = os.path.join(t.root, "seq.bin")
        write_stream(path, stream(args.mib, b"pathcpu"))
        path_cpu: Procs = {"emulator": partial(cpu_seconds, emu.server_pid),
                           "proxy": partial(cpu_seconds, emu.proxy_pid)}
        for r in range(1, args.rounds + 1):
            print(f"round {r}:", flush=True)
            show("raw client download", mb,
                 *raw_download(emu, args.mib, {"client": own_cpu, **path_cpu}))
            t.cold()
            show("mount cold read", mb,
                 *used({"mount": partial(cpu_seconds, t._pid()), "reader": own_cpu,
                        **path_cpu}, partial(read_all, path)))


if __name__ == "__main__":
    main()
