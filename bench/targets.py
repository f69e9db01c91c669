"""Where the jobs run: local disk, nimbusfs mounts, rclone mounts.

Each target is opened by a context manager that tears everything it started
down again, even when a job fails. A target knows how to make reads cold, how
much its store holds, how many bytes it sent to its store, and the peak RSS
of its mount process (the maximum over every process a remount started).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

from gcs import Emulator
from harness import (
    ROOT,
    dir_bytes,
    drop_page_cache,
    embedded_mounts,
    free_port,
    nimbusfs,
    vm_hwm_mib,
)

from nimbusfs.embedded import Embedded
from nimbusfs.mount.journal import summary
from nimbusfs.retry import wait_until

NAMES = {"local": "local disk", "nimbus": "nimbusfs (local store)",
         "nimbus-wb": "nimbusfs write-back (local store)",
         "nimbus-gcs": "nimbusfs (GCS emulator)",
         "nimbus-gcs-wb": "nimbusfs write-back (GCS emulator)", "rclone": "rclone (local dir)",
         "rclone-gcs": "rclone (GCS emulator)"}
KINDS = tuple(NAMES)


@dataclass(frozen=True)
class ApiServer:
    """A metaserver: its API's base URL (``http://HOST:PORT``), a token, its pid, address."""

    url: str
    token: str
    pid: int
    address: str


class Target:
    """A directory the jobs run in, and what can be observed about its storage."""

    name: str
    root: str
    #: how ``uploaded_bytes`` is observed (shown in the table)
    upload_source: str = "-"
    #: whether uploads go on after ``close``/``fsync`` returned (rclone's write-back)
    uploads_after_close: bool = False

    def cold(self) -> None:
        """Make the next reads come from the backing store, not from any cache."""
        drop_page_cache()

    def settle(self) -> float:
        """Wait until background uploads have finished; return when they did (monotonic)."""
        return time.monotonic()

    def stored_bytes(self) -> int | None:
        """Bytes the backing store holds (None: no store to measure)."""
        return None

    def uploaded_bytes(self) -> int | None:
        """Bytes sent to the backing store so far (None: not observable)."""
        return None

    def peak_rss_mib(self) -> float | None:
        """Peak RSS of the mount process(es) so far."""
        return None

    def api(self) -> AbstractContextManager[ApiServer | None]:
        """The HTTP API of the metaserver serving this target, on its store (None: none)."""
        return nullcontext(None)

    def second_mount(self) -> AbstractContextManager[str | None]:
        """``root`` as another machine sees it (None: no such view), unmounted after."""
        return nullcontext(None)


class LocalDisk(Target):
    def __init__(self, root: str) -> None:
        self.name, self.root = NAMES["local"], root


class Nimbus(Target):
    """A nimbusfs mount; cold = remount with an empty cache.

    With ``server`` None, the mount is the embedded default's; else it
    mounts that metaserver (``--server``), which holds the blocks in the
    GCS emulator: the embedded metaserver's store is the home's directory,
    and a mount's ``--blocks`` must name the server's store (a commit of
    blocks the server's store does not hold is EACCES).
    """

    def __init__(self, name: str, mount: str, emu: Emulator | None,
                 server: ApiServer | None = None, writeback: bool = False,
                 bucket: str = "") -> None:
        base = os.path.dirname(mount)
        self.name, self.mount, self.root = name, mount, mount
        self.home, self.cache_dir = os.path.join(base, "home"), os.path.join(base, "cache0")
        self.emu, self.server, self.bucket = emu, server, bucket
        self.writeback = self.uploads_after_close = writeback
        #: the deployment's database (the GCS target's server has a home of its own)
        self.dsn = Embedded(os.path.join(base, "server") if server else self.home).dsn
        self._rss = 0.0
        self.upload_source = ("proxy (client->GCS bytes)" if emu
                              else "= stored (new blocks only)")

    def _pid(self) -> int:
        (rec,) = [r for r in Embedded(self.home).live_mounts() if r["mountpoint"] == self.mount]
        return rec["pid"]

    def mount_args(self, cache_dir: str | None = None, sync: bool = False) -> list[str]:
        """``nimbusfs mount`` arguments besides the mountpoint (another mount's: its cache)."""
        server = (["--server", self.server.address, "--token", self.server.token]
                  if self.server else [])
        return ["--cache-dir", cache_dir or self.cache_dir, *server,
                "--writeback" if self.writeback and not sync else "--sync"]

    @contextmanager
    def second_mount(self) -> Iterator[str]:
        """Another mount of the volume, with its own cache, ``--sync`` (it only reads)."""
        base = os.path.dirname(self.mount)
        mount = os.path.join(base, "mnt-b")
        nimbusfs(self.home, "mount", mount,
                 *self.mount_args(os.path.join(base, "cache-b"), sync=True))
        try:
            yield mount
        finally:
            nimbusfs(self.home, "umount", mount)

    def settle(self) -> float:
        """Write-back: wait until the mount's journal is drained (polled every 50 ms)."""
        if self.writeback:
            wait_until(lambda: not (summary(self.cache_dir) or (0,))[0], 3600,
                       "the write-back drain")
        return time.monotonic()

    def server_pid(self) -> int:
        """The metaserver's pid (the embedded one changes when the last unmount stops it)."""
        if self.server:
            return self.server.pid
        with open(Embedded(self.home).path("run", "metaserver.json")) as f:
            return json.load(f)["pid"]

    def peak_rss_mib(self) -> float:
        self._rss = max(self._rss, vm_hwm_mib(self._pid()))
        return self._rss

    def cold(self) -> None:
        self.peak_rss_mib()
        nimbusfs(self.home, "umount", self.mount)
        shutil.rmtree(self.cache_dir)
        nimbusfs(self.home, "mount", self.mount, *self.mount_args())
        drop_page_cache()

    def stored_bytes(self) -> int:
        if self.emu:
            return self.emu.bucket_bytes(self.bucket)
        return dir_bytes(os.path.join(self.home, "blocks"))

    def uploaded_bytes(self) -> int:
        return self.emu.uploaded() if self.emu else self.stored_bytes()

    def api(self) -> AbstractContextManager[ApiServer]:
        if self.server:
            return nullcontext(self.server)
        e = Embedded(self.home)
        return nullcontext(ApiServer(e.http_url() or "", e.token(), self.server_pid(),
                                     e.server_address() or ""))


@contextmanager
def metaserver(home: str, blocks: str) -> Iterator[ApiServer]:
    """``nimbusfs server`` on the embedded database of ``home`` with ``blocks``, its API on.

    The database is started first and stopped after the server.
    """
    e = Embedded(home)
    e.start_postgres()
    info = e.path("run", "bench-metaserver.json")
    try:
        with open(e.path("logs", "bench-metaserver.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nimbusfs.cli", "server", "--dsn", e.dsn,
                 "--listen", "127.0.0.1:0", "--blocks", blocks, "--http", "127.0.0.1:0",
                 "--info-file", info], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                stderr=log)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"metaserver exited {proc.returncode}; see"
                                       f" {e.path('logs', 'bench-metaserver.log')}")
                return os.path.exists(info)
            wait_until(up, 60, "the metaserver")
            with open(info) as f:
                i = json.load(f)
            yield ApiServer(i["http"], e.token(), proc.pid, i["address"])
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        e.stop_postgres()


class Rclone(Target):
    """``rclone mount --vfs-cache-mode full`` over a local directory or the emulator."""

    def __init__(self, name: str, remote: str, flags: list[str], base: str,
                 backing_dir: str | None = None, emu: Emulator | None = None) -> None:
        self.name, self.remote, self.flags = name, remote, flags
        self.mount = self.root = os.path.join(base, "mnt")
        self.cache_dir, self.log = os.path.join(base, "cache"), os.path.join(base, "rclone.log")
        self.backing_dir, self.emu = backing_dir, emu
        self.proc: subprocess.Popen | None = None
        self.rc = ""
        self._rss = 0.0
        self.upload_source = ("proxy (client->GCS bytes)" if emu
                              else "rclone rc core/stats bytes")
        self.uploads_after_close = True
        os.makedirs(self.mount, exist_ok=True)

    def start(self) -> None:
        self.rc = f"http://127.0.0.1:{free_port()}"
        argv = ["rclone", "mount", self.remote, self.mount, "--vfs-cache-mode", "full",
                "--cache-dir", self.cache_dir, "--rc", "--rc-addr", self.rc[7:],
                "--rc-no-auth", "--log-file", self.log, "--log-level", "NOTICE", *self.flags]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone mount exited {self.proc.returncode}; see {self.log}")
            return os.path.ismount(self.mount)
        wait_until(up, 60, "rclone mount")

    def stop(self) -> None:
        """Unmount with ``fusermount3 -u`` and wait for the rclone process to end."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if os.path.ismount(self.mount):
            r = subprocess.run(["fusermount3", "-u", self.mount], capture_output=True)
            if r.returncode:
                subprocess.run(["fusermount3", "-uz", self.mount], capture_output=True)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _rc(self, command: str) -> dict:
        req = urllib.request.Request(f"{self.rc}/{command}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def settle(self) -> float:
        """No upload queued or running for 1 s (the kernel sends RELEASE after close returns).

        Returns the time the last busy poll was seen (polls are 50 ms apart).
        """
        since = [time.monotonic()]

        def idle() -> bool:
            c = self._rc("vfs/stats").get("diskCache", {})
            if c.get("uploadsInProgress", 0) + c.get("uploadsQueued", 0):
                since[0] = time.monotonic()
            return time.monotonic() - since[0] >= 1.0
        wait_until(idle, 3600, "rclone uploads", interval=0.05)
        return since[0]

    def peak_rss_mib(self) -> float:
        assert self.proc is not None
        self._rss = max(self._rss, vm_hwm_mib(self.proc.pid))
        return self._rss

    def cold(self) -> None:
        self.settle()
        self.peak_rss_mib()
        self.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start()
        drop_page_cache()

    def stored_bytes(self) -> int:
        if self.emu:
            return self.emu.bucket_bytes("rclone")
        assert self.backing_dir
        return dir_bytes(self.backing_dir)

    def uploaded_bytes(self) -> int:
        if self.emu:
            return self.emu.uploaded()
        return int(self._rc("core/stats")["bytes"])


@contextmanager
def open_target(kind: str, emu: Emulator | None) -> Iterator[Target]:
    """Set up one target of ``KINDS``; everything it started is stopped afterwards."""
    with ExitStack() as stack:
        base = tempfile.mkdtemp(prefix=f"nimbus-bench-{kind}-", dir="/var/tmp")
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        if kind == "local":
            yield LocalDisk(base)
        elif kind in ("nimbus", "nimbus-wb"):
            wb = kind == "nimbus-wb"
            (m,) = stack.enter_context(embedded_mounts(1, "--writeback" if wb else "--sync"))
            yield Nimbus(NAMES[kind], m, None, writeback=wb)
        elif kind in ("nimbus-gcs", "nimbus-gcs-wb"):
            # The server's database in a home of its own: the mounts' home
            # stops its embedded services on the last unmount (cold).
            assert emu is not None
            bucket = kind.replace("-gcs", "")   # one per target: what it stores
            emu.create_bucket(bucket)
            stack.enter_context(_env("STORAGE_EMULATOR_HOST", emu.url))
            os.chmod(base, 0o755)   # the postgres user must reach the home when run as root
            server = stack.enter_context(metaserver(os.path.join(base, "server"),
                                                    f"gs://{bucket}/blocks"))
            t = Nimbus(NAMES[kind], os.path.join(base, "mnt0"), emu, server,
                       writeback=kind == "nimbus-gcs-wb", bucket=bucket)
            nimbusfs(t.home, "mount", t.mount, *t.mount_args())
            stack.callback(nimbusfs, t.home, "umount", t.mount)
            yield t
        elif kind in ("rclone", "rclone-gcs"):
            if kind == "rclone":
                backing = os.path.join(base, "backing")
                os.makedirs(backing)
                t = Rclone(NAMES[kind], f":local:{backing}", [], base, backing_dir=backing)
            else:
                assert emu is not None
                emu.create_bucket("rclone")
                t = Rclone(NAMES[kind], ":gcs:rclone",
                           ["--gcs-endpoint", f"{emu.url}/storage/v1/", "--gcs-anonymous"],
                           base, emu=emu)
            stack.callback(t.stop)
            t.start()
            yield t
        else:
            raise ValueError(f"unknown target {kind!r}; choose from {', '.join(KINDS)}")


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
