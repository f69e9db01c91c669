"""The embedded default: a private PostgreSQL cluster, a metaserver on loopback
and a local block store, all under one state directory (``$NIMBUSFS_HOME``).

Layout of the state directory::

    pg/            PostgreSQL data directory
    run/           PostgreSQL socket, metaserver pid and address, live mounts
    blocks/        the local block store
    cache/NAME/    the block cache and staging area of each mount
    logs/          postgres.log, metaserver.log, mount-NAME.log
    token          the owner's token (mode 0600)

PostgreSQL refuses to run as root, so when root starts it the cluster runs
as the ``postgres`` system user (created by Debian's package); the state
directory must then be reachable by that user, which is why root's default
home is ``/var/lib/nimbusfs``. The server listens only on a Unix socket in
``run/`` with trust authentication: access is guarded by the directory.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

OWNER = "owner"


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


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; an exited child its parent has not reaped yet does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


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

    def _pg_running(self) -> bool:
        return os.path.exists(self.path("run", ".s.PGSQL.5432"))

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
        if not self._pg_running():
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
        if os.path.exists(self.path("pg", "postmaster.pid")):
            subprocess.run([*self._pg_user(), pg_bin("pg_ctl"), "-D", self.path("pg"), "-w",
                            "-m", "fast", "stop"], stdout=subprocess.DEVNULL, cwd="/")

    # --- metaserver -----------------------------------------------------------------

    def server_address(self) -> str | None:
        """The running metaserver's address, or None."""
        try:
            with open(self.path("run", "metaserver.json")) as f:
                info = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return info["address"] if _alive(info["pid"]) else None

    def start_server(self, listen: str = "127.0.0.1:0") -> str:
        addr = self.server_address()
        if addr:
            return addr
        info_file = self.path("run", "metaserver.json")
        last = self.path("metaserver.address")
        if listen.endswith(":0") and os.path.exists(last):
            with open(last) as f:   # the same port again, so running mounts reconnect
                listen = f.read().strip()
        if os.path.exists(info_file):
            os.unlink(info_file)
        with open(self.path("logs", "metaserver.log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nimbusfs.cli", "server", "--dsn", self.dsn,
                 "--listen", listen, "--blocks", "file://" + self.path("blocks"),
                 "--info-file", info_file],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        _wait_for(lambda: os.path.exists(info_file) or proc.poll() is not None, 60,
                  "the metaserver to start")
        if proc.poll() is not None:
            raise SystemExit(f"metaserver failed to start; see {self.path('logs')}/metaserver.log")
        addr = self.server_address() or ""
        with open(last, "w") as f:
            f.write(addr)
        return addr

    def stop_server(self) -> None:
        try:
            with open(self.path("run", "metaserver.json")) as f:
                pid = json.load(f)["pid"]
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            _wait_for(lambda: not _alive(pid), 30, "the metaserver to stop")
        os.unlink(self.path("run", "metaserver.json"))

    # --- the owner's token -------------------------------------------------------------

    def token(self) -> str:
        """The owner's token, creating the owner and token on first use."""
        path = self.path("token")
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        from metaserver.auth import create_token, create_user
        from metaserver.db import Database

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
            if _alive(rec["pid"]):
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
