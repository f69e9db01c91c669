"""CPU per block transfer on the GCS emulator: the google-cloud-storage client against the store.

Usage::

    python bench/gcs_cpu.py [--n 200] [--kib 1024]

Puts 50 objects of ``--kib`` KiB, then times ``--n`` downloads and uploads,
one at a time in this process, through ``Blob.download_as_bytes`` /
``Blob.upload_from_string`` (as the store did until 2026-11-30) and through
``GCSStore.get`` / ``GCSStore.put`` (its own urllib3 requests). It prints the
CPU time (this process, user+system) and the wall time per call: in the mount,
that CPU is Python holding the GIL the FUSE requests wait for.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

from gcs import emulator

from nimbusfs.blockstore.gcs import GCSStore


def measure(n: int, fn: Callable[[int], object]) -> str:
    fn(0)
    c, t = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    return (f"cpu {1000 * (time.process_time() - c) / n:.2f} ms,"
            f" wall {1000 * (time.perf_counter() - t) / n:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--kib", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nimbus-gcs-cpu-", dir="/var/tmp") as base, \
            emulator(base) as emu:
        emu.create_bucket("cpu")
        store = GCSStore("cpu", endpoint=emu.url)
        bucket = emu.client().bucket("cpu")
        data = os.urandom(args.kib << 10)
        keys = [os.urandom(32) for _ in range(50)]
        for k in keys:
            store.put(k, data)

        def client_get(i: int) -> None:
            blob = bucket.blob(keys[i % 50].hex())
            assert len(blob.download_as_bytes(checksum=None, raw_download=True,
                                              single_shot_download=True)) == len(data)

        def client_put(i: int) -> None:
            bucket.blob(os.urandom(16).hex()).upload_from_string(
                data, if_generation_match=0, content_type="application/octet-stream")

        def store_get(i: int) -> None:
            assert len(store.get(keys[i % 50])) == len(data)

        def store_put(i: int) -> None:
            store.put(os.urandom(32), data)

        print(f"{args.kib} KiB objects, {args.n} calls each, one at a time:")
        for name, fn in (("client download", client_get), ("store get", store_get),
                         ("client upload", client_put), ("store put", store_put)):
            print(f"  {name:16} {measure(args.n, fn)}", flush=True)


if __name__ == "__main__":
    main()
