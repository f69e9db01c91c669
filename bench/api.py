"""The HTTP API job: transfers of a large file and metadata calls, with the server's RSS.

Runs against the metaserver of a nimbusfs target (``Target.api``), so the
table shows it beside that target's mount figures of the same run (job
``seq``). Every upload sends bytes no store has seen (a new seed each time):
the server stores only the blocks a user does not have yet, so bytes sent
twice would measure the dedup check, not the store. The client never holds a
file in memory: each file is written to disk once and streamed from there in
1 MiB pieces, by a generator.

- upload, 1 stream: ``POST /files`` (multipart, the mount's one request);
- upload, 4 streams: a resumable upload whose 64 MiB chunks four
  connections send at once;
- chunked upload, 5 MiB and 64 MiB chunks: resumable, one chunk at a time;
- download, 1 and 4 streams (4 ``Range`` requests), each after the kernel's
  page cache is dropped (the server has no block cache: cold = from disk);
- ``GET /files/{id}`` of a small file (one extent: the 1 GiB file's 1,024
  would add their content hash, about 0.1 ms a request) and listings of
  1,000 entries per request, from ``META_CLIENTS`` concurrent connections,
  as requests per second and the server's CPU time per request.

The server's peak RSS (``VmHWM``) is reset before each step
(``/proc/PID/clear_refs``) and read after it, so the 1 GiB upload's figure
is its own and not the peak of whatever ran before.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio
from harness import MIB, cpu_seconds, drop_page_cache, pattern, vm_hwm_mib
from targets import ApiServer, Target

STREAMS = 4
PARALLEL_CHUNK = 64 * MIB
CHUNKED = (5 * MIB, 64 * MIB)
META_CLIENTS = 8
META_SECONDS = 5.0
LISTED = 1000
TIMEOUT = httpx.Timeout(600.0)
T = TypeVar("T")


def _reset_peak(pid: int) -> None:
    """Restart the process's VmHWM from its current RSS (Linux >= 4.0, as root)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def make_file(path: str, mib: int, seed: bytes) -> None:
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(pattern(i, seed))


def _pieces(path: str, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of ``path``, 1 MiB at a time."""
    with open(path, "rb", buffering=0) as f:
        for at in range(start, end, MIB):
            yield os.pread(f.fileno(), min(MIB, end - at), at)


@dataclass
class Client:
    """One API server and a connection pool to it (threads share it)."""

    server: ApiServer

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.server.url + "/api/v1", timeout=TIMEOUT,
                                 headers={"Authorization": f"Bearer {self.server.token}"},
                                 limits=httpx.Limits(max_connections=2 * STREAMS))

    def ok(self, r: httpx.Response) -> dict:
        if r.is_error:
            raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text}")
        return r.json() if r.content else {}

    def post_file(self, path: str, folder: str, name: str) -> dict:
        """``POST /files``: a multipart body streamed from the file (Content-Length known)."""
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\";"
                f" filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = os.path.getsize(path)

        def body() -> Iterator[bytes]:
            yield head
            yield from _pieces(path, 0, size)
            yield tail
        return self.ok(self.http.post(
            "/files", params={"path": folder}, content=body(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                     "Content-Length": str(len(head) + size + len(tail))}))

    def chunked(self, path: str, folder: str, name: str, chunk: int, streams: int) -> dict:
        """A resumable upload in chunks of ``chunk`` bytes, ``streams`` of them at a time."""
        size = os.path.getsize(path)
        uid = self.ok(self.http.post("/uploads", json={"filename": name, "size": size,
                                                       "path": folder}))["upload_id"]

        def put(n: int) -> None:
            a, b = n * chunk, min(size, (n + 1) * chunk)
            self.ok(self.http.put(f"/uploads/{uid}/chunks/{n}", content=_pieces(path, a, b),
                                  headers={"Content-Length": str(b - a)}))
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(put, range(-(-size // chunk))))
        return self.ok(self.http.post(f"/uploads/{uid}/complete"))

    def download(self, file_id: int, size: int, streams: int) -> None:
        """The file's content in ``streams`` ranges fetched at once; checks the length."""
        def get(i: int) -> int:
            a, b = i * size // streams, (i + 1) * size // streams
            n = 0
            with self.http.stream("GET", f"/files/{file_id}/content",
                                  headers={"Range": f"bytes={a}-{b - 1}"}) as r:
                if r.status_code != 206:
                    raise RuntimeError(f"download: {r.status_code}")
                for piece in r.iter_raw():
                    n += len(piece)
            if n != b - a:
                raise AssertionError(f"download of bytes {a}-{b - 1} returned {n} bytes")
            return n
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(get, range(streams)))


async def _rate(server: ApiServer, url: str, params: dict) -> tuple[float, float]:
    """``GET url`` from ``META_CLIENTS`` connections for ``META_SECONDS``.

    Returns requests per second and the server's CPU milliseconds per
    request: the client, PostgreSQL and whatever else runs share the cores,
    so the rate depends on the machine's load; the CPU cost much less.
    """
    done = 0
    async with httpx.AsyncClient(base_url=server.url + "/api/v1", timeout=TIMEOUT,
                                 headers={"Authorization": f"Bearer {server.token}"}) as c:
        await c.get(url, params=params)   # connection and token cache warm
        deadline = trio.current_time() + META_SECONDS

        async def worker() -> None:
            nonlocal done
            while trio.current_time() < deadline:
                r = await c.get(url, params=params)
                if r.status_code != 200:
                    raise RuntimeError(f"GET {url}: {r.status_code} {r.text}")
                done += 1
        t0, cpu0 = time.perf_counter(), cpu_seconds(server.pid)
        async with trio.open_nursery() as nursery:
            for _ in range(META_CLIENTS):
                nursery.start_soon(worker)
        return done / (time.perf_counter() - t0), 1000 * (cpu_seconds(server.pid) - cpu0) / done


async def _small_files(server: ApiServer, folder: str, n: int) -> None:
    """``n`` files of 100 bytes in ``folder``, from ``META_CLIENTS`` connections."""
    async with httpx.AsyncClient(base_url=server.url + "/api/v1", timeout=TIMEOUT,
                                 headers={"Authorization": f"Bearer {server.token}"}) as c:
        async def worker(names: range) -> None:
            for i in names:
                r = await c.post("/files", params={"path": folder},
                                 files={"file": (f"f{i:04d}", os.urandom(100))})
                if r.status_code != 201:
                    raise RuntimeError(f"POST /files: {r.status_code} {r.text}")
        async with trio.open_nursery() as nursery:
            for w in range(META_CLIENTS):
                nursery.start_soon(worker, range(w, n, META_CLIENTS))


def api(t: Target, mib: int) -> dict[str, float]:
    """Every measurement of the module docstring on ``t``'s API server; {} without one."""
    with t.api() as server:
        if server is None:
            return {}
        return _measure(server, mib)


def _measure(server: ApiServer, mib: int) -> dict[str, float]:
    c = Client(server)
    mb = mib * MIB / 1e6
    r: dict[str, float] = {}
    peaks: list[float] = []

    def step(fn: Callable[[], T]) -> tuple[float, T]:
        """``fn()``'s wall seconds and result; the server's peak RSS during it goes to ``peaks``."""
        _reset_peak(server.pid)
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        peaks.append(vm_hwm_mib(server.pid))
        return dt, out

    folder = f"/api-bench-{uuid.uuid4().hex[:8]}"
    c.ok(c.http.post("/folders", json={"path": folder}))
    with tempfile.TemporaryDirectory(prefix="nimbus-bench-api-", dir="/var/tmp") as tmp:
        path = os.path.join(tmp, "upload.bin")

        def fresh() -> None:
            make_file(path, mib, os.urandom(16))
            os.sync()   # its write-back does not fall into the timed upload

        fresh()
        dt, made = step(lambda: c.post_file(path, folder, "one.bin"))
        r[f"api upload {mib} MiB, 1 stream MB/s"] = mb / dt
        r[f"api server peak RSS during {mib} MiB upload MiB"] = peaks[-1]
        fresh()
        dt, _ = step(lambda: c.chunked(path, folder, "four.bin", PARALLEL_CHUNK, STREAMS))
        r[f"api upload, {STREAMS} streams of {PARALLEL_CHUNK // MIB} MiB chunks MB/s"] = mb / dt
        for chunk in CHUNKED:
            fresh()
            dt, _ = step(lambda chunk=chunk: c.chunked(path, folder, f"c{chunk}.bin", chunk, 1))
            r[f"api chunked upload, {chunk // MIB} MiB chunks MB/s"] = mb / dt
    for streams in (1, STREAMS):
        drop_page_cache()
        dt, _ = step(lambda streams=streams: c.download(made["id"], made["size"], streams))
        r[f"api download cold, {streams} stream{'s' * (streams > 1)} MB/s"] = mb / dt

    listing = f"{folder}/listed"
    c.ok(c.http.post("/folders", json={"path": listing}))
    trio.run(_small_files, server, listing, LISTED)
    small = c.ok(c.http.get("/files", params={"path": listing, "limit": 1}))["entries"][0]
    for label, url, params in (
            ("GET /files/{id}", f"/files/{small['id']}", {}),
            (f"list {LISTED} entries", "/files", {"path": listing, "limit": LISTED})):
        _, (per_s, cpu_ms) = step(lambda url=url, params=params: trio.run(
            _rate, server, url, params))
        r[f"api {label} req/s ({META_CLIENTS} clients)"] = per_s
        r[f"api {label}: server CPU ms per request"] = cpu_ms
    r["api server peak RSS, whole job MiB"] = max(peaks)
    c.http.close()
    return r
