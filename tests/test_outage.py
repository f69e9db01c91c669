"""Outages: a dead metaserver or block store costs each call ``--outage-timeout``, then EIO."""

from __future__ import annotations

import errno
import os
import time

import trio

from conftest import read_file, start_metaserver, write_file

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
