"""PostgreSQL with a synchronous streaming standby on loopback, for failover tests.

The primary is a fresh cluster on a TCP port of 127.0.0.1; the standby is its
``pg_basebackup`` on another port, streaming from it. The primary names the
standby in ``synchronous_standby_names``, so a COMMIT returns only once the
standby has flushed it: an acknowledged transaction is on both. The standby's
own configuration names none, so that once promoted it commits alone (with a
copy of the primary's setting it would wait forever for a standby of its own).

Clients reach whichever is the primary through libpq's own failover:
``host=127.0.0.1,127.0.0.1 port=P1,P2 target_session_attrs=read-write``
tries the hosts in order and keeps the first that accepts writes.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import struct
import subprocess
import threading
import time

from conftest import wait_until
from nimbusfs.embedded import pg_bin

STANDBY_NAME = "standby"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: its tools run as the postgres user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PgPair:
    """A primary and its synchronous standby under ``root`` (reachable by postgres)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dirs = [os.path.join(root, f"pg{i}") for i in (0, 1)]
        self.ports = [_free_port(), _free_port()]
        self.primary = 0            # which of the two is the primary now

    def _run(self, *argv: str) -> None:
        subprocess.run([*_as_postgres(), *argv], check=True, cwd="/",
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _pg_ctl(self, i: int, *argv: str) -> None:
        self._run(pg_bin("pg_ctl"), "-D", self.dirs[i], "-w", "-t", "60", *argv)

    def psql(self, i: int, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` on server ``i``; its output, unaligned."""
        return subprocess.run(
            [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.ports[i]), "-U", "postgres",
             "-d", dbname, "-tAc", sql], check=True, capture_output=True, text=True
        ).stdout.strip()

    def start(self, dbname: str) -> None:
        if os.geteuid() == 0:  # the clusters and their logs are the postgres user's
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run(pg_bin("initdb"), "-D", self.dirs[0], "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8")
        # initdb's pg_hba.conf lets replication connections in from 127.0.0.1 (trust).
        with open(os.path.join(self.dirs[0], "postgresql.auto.conf"), "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.ports[0]}\n"
                    "unix_socket_directories = ''\nmax_connections = 60\n"
                    f"shared_buffers = 32MB\nsynchronous_standby_names = '{STANDBY_NAME}'\n"
                    "synchronous_commit = on\n")
        self._pg_ctl(0, "-l", os.path.join(self.root, "pg0.log"), "start")
        self.rebuild_standby()
        self.psql(0, f"CREATE DATABASE {dbname}")

    def rebuild_standby(self) -> None:
        """A fresh standby of the primary in the other directory, synchronous once caught up
        (after a failover: the old primary's place, as an operator rebuilds it)."""
        i = 1 - self.primary
        shutil.rmtree(self.dirs[i], ignore_errors=True)
        self._run(pg_bin("pg_basebackup"), "-D", self.dirs[i], "-R", "-X", "stream", "-c",
                  "fast", "-d", f"host=127.0.0.1 port={self.ports[self.primary]} user=postgres")
        with open(os.path.join(self.dirs[i], "postgresql.auto.conf"), "a") as f:
            f.write(f"port = {self.ports[i]}\nsynchronous_standby_names = ''\n"
                    f"primary_conninfo = 'host=127.0.0.1 port={self.ports[self.primary]}"
                    f" user=postgres application_name={STANDBY_NAME}'\n")
        self._pg_ctl(i, "-l", os.path.join(self.root, f"pg{i}.log"), "start")
        self.psql(self.primary, f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        self.psql(self.primary, "SELECT pg_reload_conf()")
        wait_until(lambda: self.psql(self.primary, "SELECT sync_state FROM pg_stat_replication"
                                     f" WHERE application_name = '{STANDBY_NAME}'") == "sync",
                   60, "the standby to be synchronous")

    def dsn(self, dbname: str) -> str:
        """Both servers, the writable one chosen at each connect (libpq's failover)."""
        return (f"host=127.0.0.1,127.0.0.1 port={self.ports[0]},{self.ports[1]}"
                f" dbname={dbname} user=postgres target_session_attrs=read-write"
                " connect_timeout=5")

    def fail_primary(self) -> None:
        """The primary dies: an immediate shutdown, as a crash (no checkpoint, no goodbye
        to its clients beyond their sockets closing)."""
        self._pg_ctl(self.primary, "-m", "immediate", "stop")

    def start_primary(self) -> None:
        """Start the primary again after ``fail_primary`` (a database back after an outage,
        no failover); its standby reconnects on its own."""
        self._pg_ctl(self.primary, "-l", os.path.join(self.root, f"pg{self.primary}.log"),
                     "start")

    def promote(self) -> float:
        """Promote the standby; how long until it accepts writes, in seconds."""
        start = time.monotonic()
        self._pg_ctl(1 - self.primary, "promote")
        self.primary = 1 - self.primary
        return time.monotonic() - start

    def stop(self) -> None:
        for i in (0, 1):
            if os.path.exists(os.path.join(self.dirs[i], "postmaster.pid")):
                subprocess.run([*_as_postgres(), pg_bin("pg_ctl"), "-D", self.dirs[i], "-w",
                                "-t", "30", "-m", "immediate", "stop"], cwd="/",
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.root, ignore_errors=True)


class CommitAnswerLoss:
    """A TCP proxy to a PostgreSQL socket that can lose the answer to one COMMIT.

    Once armed (``arm(marker)``), the next simple-query ``COMMIT`` sent on a
    connection whose transaction sent a statement containing ``marker`` is
    passed on; the server's answer is read up to its ReadyForQuery (so the transaction
    has committed) and then both connections are closed without relaying it:
    the client sees a lost connection where its COMMIT's result should be, as
    when a primary dies between committing and answering. Clients must
    connect with ``sslmode=disable`` (the proxy reads the message framing).
    """

    def __init__(self, unix_socket: str) -> None:
        self.unix_socket = unix_socket
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.marker: bytes | None = None     # armed: the statement to wait for
        self.lost = threading.Event()        # set once a COMMIT's answer was dropped
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.unix_socket)
            dropping = threading.Event()
            threading.Thread(target=self._to_server, args=(client, server, dropping),
                             daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client, dropping),
                             daemon=True).start()

    def arm(self, marker: bytes) -> None:
        self.lost.clear()
        self.marker = marker

    @staticmethod
    def _message(src: socket.socket, typed: bool) -> bytes:
        """One protocol message (the startup message has no type byte)."""
        head = _read(src, 5 if typed else 4)
        return head + _read(src, struct.unpack("!I", head[-4:])[0] - 4)

    def _to_server(self, client: socket.socket, server: socket.socket,
                   dropping: threading.Event) -> None:
        try:
            server.sendall(self._message(client, typed=False))
            marked = False          # this transaction sent the marker
            while True:
                msg = self._message(client, typed=True)
                marker = self.marker
                marked = marked or (marker is not None and marker in msg)
                if msg[:1] == b"Q" and msg[5:].rstrip(b"\0").upper() == b"COMMIT":
                    if marked and self.marker is not None:
                        self.marker = None
                        dropping.set()
                    marked = False
                server.sendall(msg)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def _to_client(self, server: socket.socket, client: socket.socket,
                   dropping: threading.Event) -> None:
        try:
            while True:
                msg = self._message(server, typed=True)
                if dropping.is_set():
                    if msg[:1] == b"Z":  # the COMMIT is done: lose its answer
                        self.lost.set()
                        client.shutdown(socket.SHUT_RDWR)
                        return
                    continue
                client.sendall(msg)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.listener.close()


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("closed")
        data += chunk
    return data
