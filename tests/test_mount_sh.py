"""The README's first command, as a user runs it: ./mount.sh on the embedded default."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig

import httpx
import pytest

from conftest import read_file, world_dir
from nimbusfs.embedded import Embedded
from nimbusfs.retry import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([os.path.join(ROOT, "mount.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _exposed(home: str) -> list[tuple[str, str]]:
    """Paths under the state directory that other local users may read, list or enter.

    Allowed: root's state directory itself is 0711, so that the postgres
    user (PostgreSQL refuses to run as root) reaches pg/, run/ and logs/,
    which it owns, through a directory it cannot list.
    """
    allowed = {home: 0o711} if os.geteuid() == 0 else {}
    out = []
    for d, _, files in os.walk(home):
        for p in [d, *(os.path.join(d, n) for n in files)]:
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            if mode & 0o077 and mode != allowed.get(p):
                out.append((p, oct(mode)))
    return out


def test_mount_sh_embedded_lifecycle():
    home = world_dir("nimbus-home-")
    work = world_dir("nimbus-mnt-")
    bin_dir = os.path.join(work, "bin")
    env = dict(os.environ, NIMBUSFS_HOME=home, NIMBUSFS_BIN=bin_dir)
    a, b, c = (os.path.join(work, n) for n in ("a", "b", "c"))
    try:
        r = run(a, env=env)
        out = r.stdout
        assert os.path.ismount(a)
        # The README's nimbusfs commands: linked where PATH finds them, and said so.
        assert f"the nimbusfs command is now {bin_dir}/nimbusfs" in r.stderr
        status = subprocess.run(["nimbusfs", "status"], capture_output=True, text=True,
                                check=True, env=dict(env, PATH=f"{bin_dir}:{env['PATH']}"))
        assert f"mount:           {a} " in status.stdout
        server = re.search(r"server: (\S+)", out)[1]
        token = re.search(r"token:\s+(\S+)", out)[1]
        with open(os.path.join(a, "note.txt"), "w") as f:
            f.write("kept\n")
        # The HTTP API it printed serves the same volume, with the same token
        # (write-back: the note's create reaches the server once journalled and drained).
        api = re.search(r"api:\s+(http://127\.0\.0\.1:\d+/api/v1) ", out)[1]

        def listed() -> list[str]:
            r = httpx.get(f"{api}/files", headers={"Authorization": f"Bearer {token}"})
            return [e["name"] for e in r.json()["entries"]]
        wait_until(lambda: listed() == ["note.txt"], 30, "the HTTP API to list the note")
        assert httpx.get(f"{api}/files").status_code == 401

        # A second mount of the same volume through the running embedded server
        # (a's note reaches it once a's write-back journal is drained).
        run(b, "--cache-dir", os.path.join(work, "cache-b"), env=env)
        wait_until(lambda: read_file(os.path.join(b, "note.txt")) == b"kept\n", 30,
                   "a's note on b")
        # And as another machine would: by address and token.
        run(c, "--server", server, "--token", token, "--cache-dir", os.path.join(work, "cc"),
            env=env)
        assert os.listdir(c) == ["note.txt"]
        assert _exposed(home) == []
        status = subprocess.run([sys.executable, "-m", "nimbusfs.cli", "--home", home, "status"],
                                capture_output=True, text=True, check=True).stdout
        assert f"metaserver:      {server}" in status
        assert all(f"mount:           {m} " in status for m in (a, b, c))

        run("-u", c, env=env)
        run("-u", b, env=env)
        assert Embedded(home).server_address() is not None  # a still uses it
        out = run("-u", a, env=env).stdout
        assert "embedded services stopped" in out
        assert not os.path.ismount(a)
        assert Embedded(home).server_address() is None

        run(a, env=env)
        with open(os.path.join(a, "note.txt")) as f:
            assert f.read() == "kept\n"
        run("-u", a, env=env)
    finally:
        for m in (a, b, c):
            if os.path.ismount(m):
                subprocess.run(["umount", "-l", m], check=False)
        Embedded(home).stop_if_unused()
        Embedded(home).stop_postgres()
        logs = os.path.join(home, "logs")
        for name in os.listdir(logs) if os.path.isdir(logs) else ():
            if name != "postgres.log":
                with open(os.path.join(logs, name)) as f:
                    assert "Traceback" not in f.read(), name
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _python_for_nobody() -> tuple[list[str], dict[str, str]]:
    """A Python command that user nobody can run with the project's packages.

    This interpreter if nobody can reach it, else the system's python3 of the
    same version with the virtualenv's packages on its path.
    """
    path = {"PYTHONPATH": f"{ROOT}:{sysconfig.get_paths()['purelib']}"}
    for exe, env in ((sys.executable, {}), ("/usr/bin/python3", path)):
        probe = subprocess.run(["runuser", "-u", "nobody", "--", "env", *(f"{k}={v}" for k, v
                                in env.items()), exe, "-c", "import nimbusfs.cli, pyfuse3"],
                               cwd="/", capture_output=True)
        if probe.returncode == 0:
            return [exe], env
    pytest.skip("no Python that user nobody can run with the project's packages")


def _services_of(home: str) -> list[str]:
    """Command lines of the processes running from the state directory ``home``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if home in cmd:
            out.append(cmd)
    return out


def test_mount_without_fuse_access_says_why_and_stops_what_it_started():
    """A user who cannot open /dev/fuse gets one line with the cause and what to do, no
    traceback, and the database and metaserver the attempt started are stopped.

    /dev/fuse is closed to the user in a mount namespace of the test's own (a
    root-only device node bound over it), whatever its mode on this machine.
    """
    python, env = _python_for_nobody()
    work = world_dir("nimbus-nofuse-")
    home, mp = os.path.join(work, "home"), os.path.join(work, "mp")
    os.mkdir(home)
    os.mkdir(mp)
    shutil.chown(home, "nobody")
    shutil.chown(mp, "nobody")
    script = ('mknod -m 600 "$0/fuse" c 10 229 && mount --bind "$0/fuse" /dev/fuse'
              ' && exec runuser -u nobody -- "$@"')
    try:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, work,
             "env", f"NIMBUSFS_HOME={home}", *(f"{k}={v}" for k, v in env.items()),
             *python, "-m", "nimbusfs.cli", "mount", mp],
            cwd="/", capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        steps = [line for line in lines if line.startswith(("nimbusfs: starting",
                                                             "nimbusfs: mounting"))]
        (failure,) = [line for line in lines if line not in steps]
        assert "/dev/fuse" in failure and "Permission denied" in failure, failure
        assert "as root" in failure, failure   # what to do
        assert _services_of(home) == []
    finally:
        for cmd in _services_of(home):   # only if the test failed
            print("left running:", cmd)
        Embedded(home).stop_server()
        subprocess.run(["runuser", "-u", "nobody", "--", "sh", "-c",
                        f'pg_ctl=$(ls /usr/lib/postgresql/*/bin/pg_ctl | tail -1);'
                        f' [ ! -e {home}/pg/postmaster.pid ] || $pg_ctl -D {home}/pg -m fast'
                        ' stop'], cwd="/", capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_bootstrap_steps_are_one_line_each_with_details_in_a_log(tmp_path):
    """apt's and pip's output goes to the log; a failed step names the log and shows its
    end, and stops the script."""
    log = tmp_path / "bootstrap.log"
    script = (f'source {ROOT}/scripts/bootstrap.sh; NIMBUS_LOG={log}; set -e;'
              ' _nimbus_step "preparing a thing" sh -c "echo much progress; echo done";'
              ' _nimbus_step "installing a thing" sh -c "echo more progress;'
              ' echo the reason it failed >&2; exit 3"; echo not reached')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[:3] == ["nimbusfs: preparing a thing", "nimbusfs: installing a thing",
                         f"nimbusfs: failed: installing a thing; the end of {log}:"]
    assert "the reason it failed" in lines[3:]
    assert "much progress" not in r.stderr
    assert "much progress" in log.read_text()


def status(home: str) -> str:
    return subprocess.run([sys.executable, "-m", "nimbusfs.cli", "--home", home, "status"],
                          capture_output=True, text=True, check=True).stdout


def test_embedded_services_are_supervised():
    """A dead metaserver or PostgreSQL is restarted, and the mount carries on; status says so.

    A dead supervisor is started again by mounting again, which before said
    only "already mounted".
    """
    home = world_dir("nimbus-home-")
    work = world_dir("nimbus-mnt-")
    env = dict(os.environ, NIMBUSFS_HOME=home)
    a = os.path.join(work, "a")
    emb = Embedded(home)
    try:
        run(a, env=env)
        server = emb.server_address()
        with open(emb.path("run", "metaserver.json")) as f:
            pid = json.load(f)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: emb.server_address() == server and _server_pid(emb) != pid, 60,
                   "the metaserver restarted")
        with open(os.path.join(a, "after-server"), "w") as f:
            f.write("one\n")
        # A mkdir reaches the server before it returns, write-back or not.
        os.mkdir(os.path.join(a, "made-after-server"))
        # The supervisor records the restart after the service is up: wait for it.
        wait_until(lambda: "metaserver restarted 1 time, last at " in status(home), 60,
                   "the metaserver's restart in status")
        assert "reason: exit code -9 (SIGKILL)" in status(home)

        pg = emb.postmaster_pid()
        os.kill(pg, signal.SIGKILL)
        wait_until(lambda: emb.postmaster_pid() not in (None, pg), 60, "PostgreSQL restarted")
        with open(os.path.join(a, "after-postgres"), "w") as f:
            f.write("two\n")
        os.mkdir(os.path.join(a, "made-after-postgres"))
        wait_until(lambda: "postgres restarted 1 time" in status(home), 60,
                   "PostgreSQL's restart in status")

        supervisor = emb.supervisor_pid()
        os.kill(supervisor, signal.SIGKILL)
        wait_until(lambda: emb.supervisor_pid() is None, 10, "the supervisor gone")
        assert f"run ./mount.sh {a}" in status(home)
        assert "started again" in run(a, env=env).stdout
        assert emb.supervisor_pid() not in (None, supervisor)
        assert emb.server_address() == server
        with open(os.path.join(a, "after-server")) as f:
            assert f.read() == "one\n"
        assert "embedded services stopped" in run("-u", a, env=env).stdout
        assert emb.supervisor_pid() is None and emb.postmaster_pid() is None
    finally:
        if os.path.ismount(a):
            subprocess.run(["umount", "-l", a], check=False)
        emb.stop_if_unused()
        emb.stop_postgres()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _server_pid(emb: Embedded) -> int | None:
    try:
        with open(emb.path("run", "metaserver.json")) as f:
            return json.load(f)["pid"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None
