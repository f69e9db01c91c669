"""Services as admins run them: mount -t fuse.nimbusfs, fstab, systemd units, upgrades."""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import pytest

from conftest import Mount, query, read_file, start_metaserver, wait_until, write_file
from nimbusfs.embedded import alive

VENV_BIN = os.path.dirname(sys.executable)
SERVERS, ROUNDS = 4, 6  # servers starting at once on an empty database, how often


class Namespace:
    """A private mount namespace whose /usr/local/bin holds only the venv's ``nimbusfs``.

    mount(8) runs its helpers with no PATH, so mount.fuse3's shell finds
    ``nimbusfs`` on the default one (/usr/local/bin first, where ./mount.sh
    links it): the test puts it there, in a namespace of its own, leaving the
    machine's /usr/local/bin alone. Mounts made in it are seen from the test
    through ``/proc/PID/root``.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             "mount -t tmpfs tmpfs /usr/local/bin && ln -s"
             f" {VENV_BIN}/nimbusfs /usr/local/bin/nimbusfs && echo ready && exec sleep 3600"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", *argv],
                              capture_output=True, text=True, timeout=120)

    def path(self, path: str) -> str:
        return f"/proc/{self.proc.pid}/root{path}"

    def mounts(self) -> list[list[str]]:
        with open(f"/proc/{self.proc.pid}/mounts") as f:
            return [line.split() for line in f]

    def close(self) -> None:
        for m in self.mounts():
            if m[2] == "fuse.nimbusfs":
                self.run("umount", "-l", m[1])
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def ns() -> Iterator[Namespace]:
    n = Namespace()
    yield n
    n.close()


def _mount_pid(home: str) -> int:
    (rec,) = glob.glob(os.path.join(home, "run", "mounts", "*.json"))
    with open(rec) as f:
        return json.load(f)["pid"]


def _umount(ns: Namespace, mp: str, pid: int) -> None:
    r = ns.run("umount", mp)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not alive(pid), 60, "the mount process to end")


def test_mount_t_fuse_nimbusfs_and_an_fstab_line(services, world_tmp, ns):
    """mount(8) -> mount.fuse3 -> ``nimbusfs SOURCE MP -o ...``: a live mount, then umount.

    The same through an fstab line (``mount -T FSTAB MP``) with the options an
    admin writes there (``_netdev``, ``nofail``, ``x-systemd.automount``, which
    mount(8) and mount.fuse3 keep for themselves), read-only.
    """
    dep = services.deployments["local"]
    token_file = os.path.join(world_tmp, "token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(dep.new_user() + "\n")
    home = os.path.join(world_tmp, "home")
    mp = os.path.join(world_tmp, "mnt")
    os.makedirs(mp)
    opts = f"token_file={token_file},home={home},cache_dir={world_tmp}/cache,allow_other"
    r = ns.run("mount", "-t", "fuse.nimbusfs", dep.address, mp, "-o", opts)
    assert r.returncode == 0, r.stderr
    pid = _mount_pid(home)
    try:
        (m,) = [m for m in ns.mounts() if m[1] == mp]
        assert m[2] == "fuse.nimbusfs" and "allow_other" in m[3], m
        write_file(ns.path(f"{mp}/f"), b"through mount -t")
        assert read_file(ns.path(f"{mp}/f")) == b"through mount -t"
    finally:
        _umount(ns, mp, pid)
    assert [m for m in ns.mounts() if m[1] == mp] == []

    fstab = os.path.join(world_tmp, "fstab")
    with open(fstab, "w") as f:
        f.write(f"# a test fstab\n{dep.address} {mp} fuse.nimbusfs"
                f" _netdev,nofail,x-systemd.automount,ro,{opts} 0 0\n")
    r = ns.run("mount", "-T", fstab, mp)
    assert r.returncode == 0, r.stderr
    pid = _mount_pid(home)
    try:
        assert read_file(ns.path(f"{mp}/f")) == b"through mount -t"
        with pytest.raises(OSError) as e:
            write_file(ns.path(f"{mp}/g"), b"x")
        assert e.value.errno == errno.EROFS
    finally:
        _umount(ns, mp, pid)


def test_under_systemd_the_mount_logs_to_the_journal(services, world_tmp, ns):
    """A helper whose stderr is the journal ($JOURNAL_STREAM names it, as systemd sets it for
    a .mount unit) leaves its mount process logging there, not to a file of its own."""
    dep = services.deployments["local"]
    token_file = os.path.join(world_tmp, "token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(dep.new_user())
    home, mp = os.path.join(world_tmp, "home"), os.path.join(world_tmp, "mnt")
    os.makedirs(mp)
    journal = os.path.join(world_tmp, "journal")
    with open(journal, "wb") as out:
        st = os.fstat(out.fileno())
        r = subprocess.run(
            ["nsenter", "-t", str(ns.proc.pid), "-m", "mount", "-t", "fuse.nimbusfs",
             dep.address, mp, "-o", f"token_file={token_file},home={home}"],
            stdout=out, stderr=out, env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"),
            timeout=120)
    assert r.returncode == 0, read_file(journal)
    pid = _mount_pid(home)
    try:
        assert f"mounted {mp}" in read_file(journal).decode()
        assert glob.glob(os.path.join(home, "logs", "*")) == []
    finally:
        _umount(ns, mp, pid)


def test_mount_helper_refuses_options_it_does_not_know(services, world_tmp, ns):
    """``noexec`` (not honoured) fails the mount with its name; nothing is mounted."""
    mp = os.path.join(world_tmp, "mnt")
    os.makedirs(mp)
    r = ns.run("mount", "-t", "fuse.nimbusfs", services.deployments["local"].address, mp,
               "-o", f"token_file={world_tmp}/t,noexec")
    assert r.returncode != 0 and "unknown mount option(s) noexec" in r.stderr, r.stderr
    assert [m for m in ns.mounts() if m[1] == mp] == []


def test_a_foreground_mount_tells_systemd_when_it_is_live(services, world_tmp):
    """``Type=notify``: READY=1 reaches $NOTIFY_SOCKET once the mount serves requests."""
    path = os.path.join(world_tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(sock.recv(4096)), daemon=True)
    reader.start()
    env = dict(services.env, NOTIFY_SOCKET=path)
    dep = services.deployments["local"]
    m = Mount(dataclasses.replace(services, env=env), dep, dep.new_user(), "local", world_tmp)
    try:
        m.start()
        reader.join(60)
        assert got == [b"READY=1"]
        write_file(m.p("f"), b"ready")
    finally:
        m.stop()
        sock.close()


def test_install_units_verify(tmp_path):
    """``nimbusfs install-units --prefix`` writes units that ``systemd-analyze verify`` accepts.

    This container runs no systemd: the units' behaviour under it (restarts,
    the journal) is not tested here, only that systemd parses them, finds the
    programs they run, and has nothing to warn about.
    """
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    r = subprocess.run([os.path.join(VENV_BIN, "nimbusfs"), "install-units", "--prefix",
                        str(tmp_path)], capture_output=True, text=True, check=True)
    units = tmp_path / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == ["nimbusfs-server.service",
                                                       "nimbusfs@.service"], r.stdout
    assert (tmp_path / "etc/nimbusfs").stat().st_mode & 0o077 == 0
    # An instance of the template, as systemd would load nimbusfs@srv-nimbus.service.
    shutil.copy(units / "nimbusfs@.service", units / "nimbusfs@srv-nimbus.service")
    r = subprocess.run(["systemd-analyze", "verify", "./nimbusfs-server.service",
                        "./nimbusfs@srv-nimbus.service"], cwd=units, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_servers_starting_together_migrate_the_schema_once(services):
    """Four metaservers' migrations at once on an empty database, six times: each migration
    is applied once and every server starts.

    Database.migrate serialises them with an advisory lock: without it the
    others failed creating the tables the first had created; with it
    released before the COMMIT of what it guarded, one round in three did.
    """
    from nimbusfs.server.db import Database

    for _ in range(ROUNDS):
        name = f"nimbus_migrate_{uuid.uuid4().hex[:8]}"
        services.emb.ensure_database(name)
        dsn = services.emb.dsn_for(name)
        start = threading.Barrier(SERVERS)
        errors: list[BaseException] = []

        def server_start(dsn: str = dsn, start: threading.Barrier = start,
                         errors: list[BaseException] = errors) -> None:
            db = Database(dsn, pool_size=1)
            start.wait()
            try:
                db.open()
            except BaseException as e:
                errors.append(e)
            finally:
                db.close()

        threads = [threading.Thread(target=server_start) for _ in range(SERVERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        applied = query(dsn, "SELECT version, count(*) FROM schema_migrations GROUP BY version")
        assert applied and all(n == 1 for _, n in applied), applied


def test_an_upgraded_server_migrates_while_a_mount_waits_and_reconnects(services, mount_factory):
    """The upgrade path of docs/operations.md: stop the server, start the newer one, which
    applies the migrations it brings before it serves; a mount's call made meanwhile
    waits (the outage timeout), and the mount carries on over the new connection.

    The database is set back to the schema before migration 0007 (which the
    newer server then brings) while the server is down.
    """
    from nimbusfs.server.db import Database

    dep = start_metaserver(services.emb, f"upgrade_{uuid.uuid4().hex[:8]}",
                           "file://" + services.emb.path("blocks"), services.env)
    m = None
    try:
        m = mount_factory("local", None, dep, "--outage-timeout", "60")
        write_file(m.p("before"), b"written before the upgrade")
        dep.kill()
        db = Database(dep.dsn, pool_size=1)
        db.pool.open(wait=True)
        try:
            db.run(lambda cur: cur.execute(
                "ALTER TABLE users DROP COLUMN admin;"
                " DELETE FROM schema_migrations WHERE version = '0007_admin.sql'"))
        finally:
            db.close()
        done: list[BaseException | None] = []

        def during() -> None:
            try:
                os.mkdir(m.p("made-during-the-upgrade"))
                done.append(None)
            except BaseException as e:
                done.append(e)

        t = threading.Thread(target=during)
        t.start()
        dep.start()
        t.join(120)
        assert done == [None]
        with open(dep.log_path) as f:
            assert "applying migration 0007_admin.sql" in f.read()
        assert read_file(m.p("before")) == b"written before the upgrade"
        write_file(m.p("made-during-the-upgrade", "after"), b"after")
        assert read_file(m.p("made-during-the-upgrade", "after")) == b"after"
    finally:
        if m is not None:
            m.stop()    # while its server runs: an unmount commits through it
        dep.kill()


def test_the_server_unit_keeps_the_dsn_off_the_command_line(services, tmp_path):
    """The DSN (it may hold the database's password) comes from ``$NIMBUSFS_DSN``,
    which the unit's mode-0600 environment file sets: a command line is readable by
    every local user (``ps``, /proc/PID/cmdline), a process's environment is not."""
    from nimbusfs.services import SERVER_UNIT

    exec_start = next(line for line in SERVER_UNIT.splitlines() if line.startswith("ExecStart="))
    assert "DSN" not in exec_start
    emb = services.emb
    emb.ensure_database("nimbus_dsn_env")
    dsn = emb.dsn_for("nimbus_dsn_env")
    info = str(tmp_path / "server.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nimbusfs.cli", "server", "--blocks",
         f"file://{tmp_path}/blocks", "--info-file", info, "--listen", "127.0.0.1:0"],
        env=dict(services.env, NIMBUSFS_DSN=dsn), stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: os.path.exists(info) or proc.poll() is not None, 60, "metaserver")
        assert proc.poll() is None, proc.communicate()[1]
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert dsn.encode() not in f.read()
    finally:
        proc.terminate()
        proc.wait(30)


def test_mounted_reads_mountinfo_for_any_mount_point_name(world_tmp):
    """``services.mounted`` (``nimbusfs umount``'s check, no stat of the mount point)
    finds a mount point whose name has a space (escaped in mountinfo) and non-ASCII
    bytes (as they are), and not once it is unmounted."""
    from nimbusfs.services import mounted

    d = os.path.join(world_tmp, "Nimbus drive ü")
    os.makedirs(d)
    assert not mounted(d)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], check=True)
    try:
        assert mounted(d)
    finally:
        subprocess.run(["umount", d], check=True)
    assert not mounted(d)
