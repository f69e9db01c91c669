"""Outages: a dead metaserver or block store costs each call ``--outage-timeout``, then EIO."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import time

import trio

from conftest import GCSEmulator, Mount, read_file, start_metaserver, write_file
from nimbusfs.retry import wait_until

OUTAGE = 3.0
# What a call may take past its deadline on a loaded 2-core machine: generous,
# a bound on a hang, far below the next multiple of OUTAGE.
MARGIN = 2.5


def _timed_errno(fn, *args) -> tuple[int, float]:
    """Run ``fn(*args)``, expecting an OSError: (its errno, seconds it took)."""
    start = time.monotonic()
    try:
        fn(*args)
    except OSError as e:
        return e.errno, time.monotonic() - start
    raise AssertionError(f"{fn.__name__}{args} succeeded during the outage")


def test_concurrent_calls_each_fail_at_their_own_deadline(services, mount_factory):
    """With the metaserver down, N calls at once all fail after one outage timeout.

    They queue on the client's connect lock: each must keep the deadline it
    started with, not start a fresh one when its turn comes (the N-th failed
    after N timeouts). Each call makes its directory in its own parent, so
    the kernel does not order them itself (mkdir locks the parent).
    """
    dep = start_metaserver(services.emb, "outage_calls", "file://" + services.emb.path("blocks"),
                           services.env)
    m = None
    try:
        m = mount_factory("local", None, dep, "--outage-timeout", str(OUTAGE))
        n = 5
        for i in range(n):
            os.mkdir(m.p(f"p{i}"))
        dep.kill()
        results: list[tuple[int, float]] = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(run_one, i)

        async def run_one(i: int) -> None:
            results.append(await trio.to_thread.run_sync(_timed_errno, os.mkdir,
                                                         m.p(f"p{i}", "d")))

        trio.run(main)
        assert [e for e, _ in results] == [errno.EIO] * n
        assert max(t for _, t in results) < OUTAGE + MARGIN, results
        dep.start()
        os.mkdir(m.p("p0", "d"))   # the mount carries on once the server is back
        write_file(m.p("p0", "d", "f"), b"ok")
        assert read_file(m.p("p0", "d", "f")) == b"ok"
    finally:
        if m is not None:
            m.stop()
        dep.kill()


def test_store_outage_fails_at_the_deadline(services, world_tmp):
    """A paused, then dead, GCS store: uncached reads and closes fail with EIO in time.

    The store's calls run in worker threads that cannot be cancelled, with
    the client library's own timeouts (60 s per request, retries for 120 s)
    unless told otherwise: a paused store held them as long as the pause
    lasted, a dead one for minutes. Blocks the mount has cached are still
    read throughout.
    """
    from nimbusfs.blockstore.gcs import GCSStore

    emu = GCSEmulator(world_tmp)
    env = dict(services.env, STORAGE_EMULATOR_HOST=emu.url)
    GCSStore("outage", endpoint=emu.url, create_bucket=True)
    dep = start_metaserver(services.emb, "outage_store", "gs://outage/blocks", env)
    m = Mount(dataclasses.replace(services, env=env), dep, dep.new_user(), "gcs", world_tmp,
              ("--outage-timeout", str(OUTAGE)))
    try:
        m.start()
        data = {name: os.urandom(300_000 + i) for i, name in
                enumerate(("cached", "cold-paused", "cold-dead"))}
        for name, content in data.items():
            write_file(m.p(name), content)
        m.remount(drop_cache=True)
        assert read_file(m.p("cached")) == data["cached"]    # in the cache from now on

        emu.proc.send_signal(signal.SIGSTOP)
        for name in ("cold-paused", "cold-dead"):
            if name == "cold-dead":
                emu.proc.kill()
                emu.proc.wait()
            err, took = _timed_errno(read_file, m.p(name))
            assert err == errno.EIO and took < OUTAGE + MARGIN, (name, err, took)
            err, took = _timed_errno(write_file, m.p(f"new-{name}"), os.urandom(1 << 20))
            assert err == errno.EIO and took < OUTAGE + MARGIN, (name, err, took)
            assert read_file(m.p("cached")) == data["cached"]
    finally:
        emu.stop()
        m.stop()
        dep.kill()
    assert "Traceback" not in m.log(), m.log()


def test_a_failing_restart_is_tried_again_with_backoff():
    """The supervisor's watch of one service: a restart that fails is retried later, doubling."""
    from nimbusfs.embedded import RESTARTS, Watch

    tries: list[float] = []

    def restart() -> None:
        tries.append(w.backoff)
        if len(tries) < 3:
            raise SystemExit("port in use")

    w = Watch("metaserver", lambda: None if len(tries) >= 3 else "exit code 1", restart)
    wait_until(lambda: w.step() and w.state()["error"] == "port in use", 10, "a failed restart")
    assert w.state() == {"restarts": 0, "last_restart": None, "last_reason": None,
                         "down": "exit code 1", "error": "port in use"}
    wait_until(lambda: w.step() and w.restarts == 1, 30, "the restart")
    assert tries == [2 * RESTARTS.first, 4 * RESTARTS.first, 8 * RESTARTS.first]
    state = w.state()
    assert (state["down"], state["error"], state["last_reason"]) == (None, None, "exit code 1")


def test_umount_of_a_mount_whose_server_is_gone_does_not_wait_for_it(
        services, mount_factory, world_tmp):
    """``nimbusfs umount`` of a mount whose metaserver was killed returns without waiting
    the mount's outage timeout (60 s here): it neither stats the mount point nor lets
    ``umount`` canonicalize it (either would ask the mount for the root's attributes,
    which waits for the server). The bound below is a hang's, not a speed target."""
    import subprocess
    import sys

    from test_writeback import own_server

    with own_server(services, "umount_down") as dep:
        m = mount_factory("local", None, dep, "--outage-timeout", "60")
        write_file(m.p("x"), b"x")
        read_file(m.p("x"))
        dep.kill()
        home = os.path.join(world_tmp, "umount-home")
        subprocess.run([sys.executable, "-m", "nimbusfs.cli", "--home", home, "umount", m.path],
                       check=True, timeout=40, capture_output=True)
        m.proc.wait(40)
