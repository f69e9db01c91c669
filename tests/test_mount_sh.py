"""The README's first command, as a user runs it: ./mount.sh on the embedded default."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

from conftest import _world_dir, wait_until
from nimbusfs.embedded import Embedded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run([os.path.join(ROOT, "mount.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_mount_sh_embedded_lifecycle():
    home = _world_dir("nimbus-home-")
    work = _world_dir("nimbus-mnt-")
    env = dict(os.environ, NIMBUSFS_HOME=home)
    a, b, c = (os.path.join(work, n) for n in ("a", "b", "c"))
    try:
        out = run(a, env=env).stdout
        assert os.path.ismount(a)
        server = re.search(r"server: (\S+)", out)[1]
        token = re.search(r"token:\s+(\S+)", out)[1]
        with open(os.path.join(a, "note.txt"), "w") as f:
            f.write("kept\n")

        # A second mount of the same volume through the running embedded server.
        run(b, "--cache-dir", os.path.join(work, "cache-b"), env=env)
        with open(os.path.join(b, "note.txt")) as f:
            assert f.read() == "kept\n"
        # And as another machine would: by address and token.
        run(c, "--server", server, "--token", token, "--cache-dir", os.path.join(work, "cc"),
            env=env)
        assert os.listdir(c) == ["note.txt"]
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


def status(home: str) -> str:
    return subprocess.run([sys.executable, "-m", "nimbusfs.cli", "--home", home, "status"],
                          capture_output=True, text=True, check=True).stdout


def test_embedded_services_are_supervised():
    """A dead metaserver or PostgreSQL is restarted, and the mount carries on; status says so.

    A dead supervisor is started again by mounting again, which before said
    only "already mounted".
    """
    home = _world_dir("nimbus-home-")
    work = _world_dir("nimbus-mnt-")
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
        assert "metaserver restarted 1 time, last at " in status(home)
        assert "reason: exit code -9 (SIGKILL)" in status(home)

        pg = emb.postmaster_pid()
        os.kill(pg, signal.SIGKILL)
        wait_until(lambda: emb.postmaster_pid() not in (None, pg), 60, "PostgreSQL restarted")
        with open(os.path.join(a, "after-postgres"), "w") as f:
            f.write("two\n")
        assert "postgres restarted 1 time" in status(home)

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
