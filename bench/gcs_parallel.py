"""What the GCS emulator serves in parallel: the raw client, and the mount's store code alone.

Usage (root: the cold downloads drop the page cache)::

    python bench/gcs_parallel.py [--mib 512] [--threads 8,16] [--rounds 3]

Stores ``--mib`` MiB of random bytes cut as the mount cuts them (FastCDC), as
blocks through ``GCSStore.put``, then for each round prints the raw client's
download (``raw_baseline``, its own objects of the same sizes) with the
emulator's files in the page cache and cold, and ``GCSStore.get`` of every
block (hash-checked, as ``BlockCache`` does) in each number of threads, cold.
Beside a mount's cold read of the same size (``bench/ab_cold_read.py``), it
says whether the emulator, the store's requests or the mount is the limit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from gcs import emulator, raw_baseline
from harness import MIB, drop_page_cache

from nimbusfs.blockstore import block_hash
from nimbusfs.blockstore.chunking import Piece, chunk_buf
from nimbusfs.blockstore.gcs import GCSStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--threads", default="8,16", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    threads = [int(n) for n in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="nimbus-gcs-par-", dir="/var/tmp") as base, \
            emulator(base) as emu:
        emu.create_bucket("blocks")
        store = GCSStore("blocks", endpoint=emu.url)
        buf = os.urandom(args.mib * MIB)

        def put(p: Piece) -> bytes:
            data = memoryview(buf)[p.offset:p.offset + p.length]
            key = block_hash(data)
            store.put(key, data)
            return key

        def get(key: bytes) -> int:
            data = store.get(key)
            if block_hash(data) != key:
                raise AssertionError(f"block {key.hex()} fails its hash")
            return len(data)

        with ThreadPoolExecutor(8) as pool:
            keys = list(pool.map(put, chunk_buf(buf, 0)))
        for r in range(1, args.rounds + 1):
            line = []
            for cold in (False, True):
                raw = raw_baseline(emu, args.mib, bucket=f"raw{r}{cold:d}", cold=cold)
                line.append(f"raw client {'cold' if cold else 'warm'} {raw['download MB/s']:.0f}")
            for n in threads:
                drop_page_cache()
                with ThreadPoolExecutor(n) as pool:
                    t = time.perf_counter()
                    total = sum(pool.map(get, keys))
                    line.append(f"store.get x{n} {total / 1e6 / (time.perf_counter() - t):.0f}")
            print(f"round {r}:", " | ".join(line), f"(MB/s; load {os.getloadavg()[0]:.1f})",
                  flush=True)


if __name__ == "__main__":
    main()
