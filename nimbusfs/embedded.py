"""The embedded default: a private PostgreSQL cluster, a metaserver on loopback
and a local block store, all under one state directory (``$NIMBUSFS_HOME``).

Layout of the state directory::

    pg/            PostgreSQL data directory
    run/           PostgreSQL socket, metaserver and supervisor pids and state, live mounts
    blocks/        the local block store
    cache/NAME/    the block cache and staging area of each mount
    logs/          postgres.log, metaserver.log, supervisor.log, mount-NAME.log
    token          the owner's token (mode 0600)

PostgreSQL refuses to run as root, so when root starts it the cluster runs
as the ``postgres`` system user (created by Debian's package); the state
directory must then be reachable by that user, which is why root's default
home is ``/var/lib/nimbusfs``. The server listens only on a Unix socket in
``run/`` with trust authentication: access is guarded by the directory.

Supervision: the metaserver runs as the child of a small supervisor process
(``nimbusfs supervise``, see :meth:`Embedded.supervise`), which restarts it
and PostgreSQL with backoff when they die and records what happened in
``run/supervisor.json`` for ``nimbusfs status``. A process of its own rather
than the mounts: mounts come and go, several may share the services, and a
FUSE server should not also manage a database; being the metaserver's parent,
the supervisor learns its exit status. PostgreSQL daemonizes (``pg_ctl``),
so it is watched through the pid in its ``postmaster.pid``.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nimbusfs.retry import Backoff, wait_until

OWNER = "owner"

log = logging.getLogger(__name__)

# Restarts of a service that died: the first after 0.5 s, each further one
# after twice the last wait, up to 30 s, until the service has run
# STABLE_AFTER seconds (then the next death waits 0.5 s again). No jitter:
# one supervisor per home has nobody to spread its tries from, and its waits
# are what ``status`` reports. The supervisor looks every POLL seconds.
RESTARTS = Backoff(first=0.5, cap=30.0, jitter=0.0)
STABLE_AFTER = 60.0
POLL = 0.2


def default_home() -> str:
    if env := os.environ.get("NIMBUSFS_HOME"):
        return os.path.abspath(env)
    if os.geteuid() == 0:
        return "/var/lib/nimbusfs"
    return os.path.expanduser("~/.local/share/nimbusfs")


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]))
    if not found:
        raise SystemExit(f"PostgreSQL's {name} not found: install the postgresql package")
    return found[-1]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; an exited child its parent has not reaped yet does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def exit_reason(returncode: int) -> str:
    """How a process ended, for logs and status: ``exit code -9 (SIGKILL)``."""
    if returncode < 0:
        try:
            return f"exit code {returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    return f"exit code {returncode}"


@dataclass
class Embedded:
    home: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.home, *parts)

    # --- PostgreSQL -----------------------------------------------------------------

    def _pg_user(self) -> list[str]:
        """Command prefix that runs PostgreSQL tools as a non-root user (run them with
        ``cwd="/"``: the caller's directory may be closed to that user)."""
        if os.geteuid() != 0:
            return []
        return ["runuser", "-u", "postgres", "--"]

    def dsn_for(self, dbname: str) -> str:
        return f"host={self.path('run')} port=5432 dbname={dbname} user=postgres"

    @property
    def dsn(self) -> str:
        return self.dsn_for("nimbusfs")

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid, from its lock file; None if it is not running.

        Not the socket file: a postmaster killed with SIGKILL leaves it behind.
        """
        try:
            with open(self.path("pg", "postmaster.pid")) as f:
                pid = int(f.readline())
        except (FileNotFoundError, ValueError):
            return None
        return pid if alive(pid) else None

    def start_postgres(self) -> None:
        pg, run, logs = self.path("pg"), self.path("run"), self.path("logs")
        for d in (self.home, run, logs):
            os.makedirs(d, exist_ok=True)
        # Private, also a state directory made before umask 077 (see cli.main):
        # only root's lets others through (0711, listing nothing), for the
        # postgres user to reach pg/, run/ (its socket) and logs/postgres.log,
        # the two directories it owns (0700).
        os.chmod(self.home, 0o711 if os.geteuid() == 0 else 0o700)
        for d in (run, logs):
            os.chmod(d, 0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for d in (run, logs):
                os.chown(d, pw.pw_uid, pw.pw_gid)
            os.makedirs(pg, mode=0o700, exist_ok=True)
            os.chown(pg, pw.pw_uid, pw.pw_gid)
            probe = subprocess.run([*self._pg_user(), "test", "-w", pg], cwd="/")
            if probe.returncode:
                raise SystemExit(f"the postgres user cannot write {pg}; choose an"
                                 " NIMBUSFS_HOME it can reach (e.g. /var/lib/nimbusfs)")
        if not os.path.exists(os.path.join(pg, "PG_VERSION")):
            subprocess.run([*self._pg_user(), pg_bin("initdb"), "-D", pg, "-U", "postgres",
                            "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                           check=True, stdout=subprocess.DEVNULL, cwd="/")
            with open(os.path.join(pg, "postgresql.auto.conf"), "a") as f:
                f.write(f"listen_addresses = ''\nunix_socket_directories = '{run}'\n"
                        "unix_socket_permissions = 0700\nmax_connections = 50\n"
                        "shared_buffers = 128MB\nfsync = on\n")
        if self.postmaster_pid() is None:
            subprocess.run([*self._pg_user(), pg_bin("pg_ctl"), "-D", pg, "-w", "-t", "60",
                            "-l", os.path.join(logs, "postgres.log"), "start"],
                           check=True, stdout=subprocess.DEVNULL, cwd="/")
        self.ensure_database("nimbusfs")

    def ensure_database(self, name: str) -> None:
        run = self.path("run")
        exists = subprocess.run(
            [pg_bin("psql"), "-h", run, "-U", "postgres", "-d", "postgres", "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            check=True, capture_output=True, text=True).stdout.strip()
        if not exists:
            subprocess.run([pg_bin("createdb"), "-h", run, "-U", "postgres", name], check=True)

    def stop_postgres(self) -> None:
        """Stop PostgreSQL: a fast shutdown (open connections are ended, not waited
        for), then an immediate one if that has not finished within 30 s."""
        if self.postmaster_pid() is None:
            return
        for mode in ("fast", "immediate"):
            r = subprocess.run([*self._pg_user(), pg_bin("pg_ctl"), "-D", self.path("pg"), "-w",
                                "-t", "30", "-m", mode, "stop"], stdout=subprocess.DEVNULL,
                               cwd="/")
            if r.returncode == 0:
                return

    # --- metaserver -----------------------------------------------------------------

    def _server_info(self) -> dict:
        """What the running metaserver wrote to its info file (empty if none runs)."""
        try:
            with open(self.path("run", "metaserver.json")) as f:
                info = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return info if alive(info["pid"]) else {}

    def server_address(self) -> str | None:
        """The running metaserver's address, or None."""
        return self._server_info().get("address")

    def http_url(self) -> str | None:
        """The running metaserver's HTTP API base URL (``http://127.0.0.1:PORT``), or None."""
        return self._server_info().get("http") or None

    def _spawn_server(self, listen: str) -> subprocess.Popen:
        """Start a metaserver, a child of this process; return once it listens.

        ``listen`` ending in ``:0`` takes the address the last one had, so
        that running mounts reconnect to it.
        """
        info_file = self.path("run", "metaserver.json")
        last, last_http = self.path("metaserver.address"), self.path("http.address")
        if listen.endswith(":0") and os.path.exists(last):
            with open(last) as f:
                listen = f.read().strip()
        http = "127.0.0.1:0"   # the HTTP API stays on loopback, on the port it had before
        if os.path.exists(last_http):
            with open(last_http) as f:
                http = f.read().strip().removeprefix("http://") or http
        if os.path.exists(info_file):
            os.unlink(info_file)
        with open(self.path("logs", "metaserver.log"), "ab") as log_f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nimbusfs.cli", "server", "--dsn", self.dsn,
                 "--listen", listen, "--blocks", "file://" + self.path("blocks"),
                 "--http", http, "--info-file", info_file],
                stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f, start_new_session=True)
        wait_until(lambda: os.path.exists(info_file) or proc.poll() is not None, 60,
                   "the metaserver to start")
        if proc.poll() is not None:
            raise SystemExit(f"metaserver failed to start ({exit_reason(proc.returncode)});"
                             f" see {self.path('logs')}/metaserver.log")
        with open(last, "w") as f:
            f.write(self.server_address() or "")
        with open(last_http, "w") as f:
            f.write(self.http_url() or "")
        return proc

    def start_server(self, listen: str = "127.0.0.1:0") -> str:
        """Start the supervisor (which starts the metaserver) unless it runs; return the address."""
        addr = self.server_address()
        if addr and self.supervisor_pid():
            return addr
        if addr:
            self.stop_server()  # left by an older version, unsupervised: the same port again
        os.makedirs(self.path("logs"), exist_ok=True)
        with open(self.path("logs", "supervisor.log"), "ab") as log_f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nimbusfs.cli", "--home", self.home, "supervise",
                 "--listen", listen],
                stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f, start_new_session=True)
        # A supervisor that exits 0 found another starting: wait for its metaserver.
        wait_until(lambda: self.server_address() or proc.poll(), 90,
                   "the metaserver to start")
        if not self.server_address():
            raise SystemExit(f"metaserver failed to start; see {self.path('logs')}/"
                             "supervisor.log and metaserver.log")
        return self.server_address() or ""

    def stop_server(self) -> None:
        """Stop the supervisor, which stops the metaserver; or the metaserver alone."""
        if supervisor := self.supervisor_pid():
            os.kill(supervisor, signal.SIGTERM)
            wait_until(lambda: not alive(supervisor), 60, "the supervisor to stop")
        try:
            with open(self.path("run", "metaserver.json")) as f:
                pid = json.load(f)["pid"]
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not alive(pid), 30, "the metaserver to stop")
        os.unlink(self.path("run", "metaserver.json"))

    # --- supervision --------------------------------------------------------------------

    def supervisor_state(self) -> dict | None:
        """What ``run/supervisor.json`` says, if its supervisor is running."""
        try:
            with open(self.path("run", "supervisor.json")) as f:
                state = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return state if alive(state["pid"]) else None

    def supervisor_pid(self) -> int | None:
        state = self.supervisor_state()
        return state["pid"] if state else None

    def supervise(self, listen: str) -> int:
        """Run the supervisor in the foreground until SIGTERM or SIGINT.

        Starts the metaserver, then watches it and PostgreSQL; one that dies
        is restarted with backoff, for as long as it keeps failing (a
        restart that fails is logged and tried again later). Each event goes
        to the log and to ``run/supervisor.json``. On SIGTERM the metaserver
        is stopped; PostgreSQL is left to ``stop_postgres``. A second
        supervisor of the same home exits at once (a lock in ``run/``).
        """
        lock = os.open(self.path("run", "supervisor.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another supervisor runs for %s", self.home)
            return 0
        stopping = False

        def stop(*_: object) -> None:
            nonlocal stopping
            stopping = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        server = self._spawn_server(listen)
        listen = self.server_address() or listen

        def server_gone() -> str | None:
            return None if server.poll() is None else exit_reason(server.returncode)

        def restart_server() -> None:
            nonlocal server
            server = self._spawn_server(listen)

        def postgres_gone() -> str | None:
            return None if self.postmaster_pid() else "the postmaster is not running"

        watches = [Watch("postgres", postgres_gone, self.start_postgres),
                   Watch("metaserver", server_gone, restart_server)]
        log.info("supervising the metaserver (pid %d, %s) and PostgreSQL", server.pid, listen)
        self._write_state(watches)
        try:
            while not stopping:
                if any([w.step() for w in watches]):
                    self._write_state(watches)
                time.sleep(POLL)
        finally:
            log.info("stopping the metaserver")
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            for name in ("metaserver.json", "supervisor.json"):
                try:
                    os.unlink(self.path("run", name))
                except FileNotFoundError:
                    pass
        return 0

    def _write_state(self, watches: list[Watch]) -> None:
        path = self.path("run", "supervisor.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "services": {w.name: w.state() for w in watches}}, f)
        os.rename(path + ".tmp", path)

    # --- the owner's token -------------------------------------------------------------

    def token(self) -> str:
        """The owner's token, creating the owner and token on first use."""
        path = self.path("token")
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        from nimbusfs.server.auth import create_token, create_user
        from nimbusfs.server.db import Database

        db = Database(self.dsn, pool_size=1)
        db.open()
        try:
            def setup(cur):
                cur.execute("SELECT 1 FROM users WHERE name = %s", (OWNER,))
                if not cur.fetchone():
                    create_user(cur, OWNER)
                return create_token(cur, OWNER, "embedded owner")
            token = db.run(setup)
        finally:
            db.close()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token

    def start(self, listen: str = "127.0.0.1:0") -> tuple[str, str]:
        """Start what is not running; return (server address, owner token)."""
        self.start_postgres()
        addr = self.start_server(listen)
        return addr, self.token()

    # --- mounts using the embedded server ------------------------------------------------

    def mount_record(self, mountpoint: str) -> str:
        key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
        return self.path("run", "mounts", key + ".json")

    def live_mounts(self) -> list[dict]:
        out = []
        for p in glob.glob(self.path("run", "mounts", "*.json")):
            try:
                with open(p) as f:
                    rec = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if alive(rec["pid"]):
                out.append(rec)
            else:
                os.unlink(p)
        return out

    def stop_if_unused(self) -> bool:
        if self.live_mounts():
            return False
        self.stop_server()
        self.stop_postgres()
        return True


@dataclass
class Watch:
    """One supervised service: how to tell it died, how to restart it, what happened."""

    name: str
    gone: Callable[[], str | None]       # why it is not running, or None
    restart: Callable[[], None]          # raises (SystemExit, TimeoutError ...) if it cannot
    restarts: int = 0
    last_restart: float | None = None
    last_reason: str | None = None       # why it died the last time
    down: str | None = None              # why it is not running now
    error: str | None = None             # why the last restart failed
    failures: int = 0                    # restarts tried since it was last stable
    backoff: float = RESTARTS.first      # the wait before the next try
    retry_at: float = 0.0
    up_since: float = field(default_factory=time.monotonic)

    def step(self) -> bool:
        """Check the service, restart it if due; return whether anything changed."""
        now = time.monotonic()
        if self.down is None:
            reason = self.gone()
            if reason is None:
                if now - self.up_since > STABLE_AFTER:
                    self.failures, self.backoff = 0, RESTARTS.first
                return False
            log.warning("%s died: %s; restarting in %.1f s", self.name, reason, self.backoff)
            self.down, self.retry_at = reason, now + self.backoff
            return True
        if now < self.retry_at:
            return False
        self.failures += 1
        self.backoff = RESTARTS.delay(self.failures)
        try:
            self.restart()
        except (Exception, SystemExit) as e:
            self.error = str(e)
            self.retry_at = time.monotonic() + self.backoff
            log.warning("restarting %s failed: %s; next try in %.1f s", self.name, e,
                        self.backoff)
            return True
        self.restarts += 1
        self.last_restart, self.last_reason = time.time(), self.down
        self.down = self.error = None
        self.up_since = time.monotonic()
        log.info("%s restarted (%d times so far)", self.name, self.restarts)
        return True

    def state(self) -> dict:
        return {"restarts": self.restarts, "last_restart": self.last_restart,
                "last_reason": self.last_reason, "down": self.down, "error": self.error}
