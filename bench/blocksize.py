"""Why the average block is 1 MiB: dedup granularity against per-block costs.

For each FastCDC average (min = avg/4, max = avg*4, as in ``nimbusfs/blockstore/chunking.py``)
over a random buffer: blocks per GiB (one store object, one extent and one
refcount row each; on GCS one request each), the bytes a one-byte insertion in
the middle adds, and chunk+hash speed. Pure computation, no mount.

Usage: ``python bench/blocksize.py [--mib 64]``
"""

from __future__ import annotations

import argparse
import os
import time

from harness import print_table
from pyfastcdc import FastCDC

from nimbusfs.blockstore.base import block_hash


def cut(data: bytes, avg: int) -> list[bytes]:
    cdc = FastCDC(avg, min_size=avg // 4, max_size=avg * 4)
    return [bytes(c.data) for c in cdc.cut_buf(data)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    data = os.urandom(args.mib << 20)
    edited = data[:len(data) // 2] + b"!" + data[len(data) // 2:]
    rows = []
    for avg in (256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20):
        t = time.perf_counter()
        blocks = cut(data, avg)
        keys = {block_hash(b) for b in blocks}
        secs = time.perf_counter() - t
        new = sum(len(b) for b in cut(edited, avg) if block_hash(b) not in keys)
        rows.append([f"{avg >> 10} KiB", f"{len(blocks) * 1024 / args.mib:.0f}",
                     f"{new / 2**20:.2f}", f"{len(data) / secs / 1e6:.0f}"])
    print_table(f"FastCDC average block size ({args.mib} MiB of random bytes)",
                ["average", "blocks per GiB", "MiB stored by a 1-byte insert",
                 "chunk+hash MB/s (one thread)"], rows)


if __name__ == "__main__":
    main()
