"""Write-back: the drain yields to a burst of requests, and does not wait for its end.

``Activity`` is pure logic (times given); the burst test runs on real mounts,
a real metaserver and PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from conftest import query, read_file, wait_until, write_file
from nimbusfs.mount.activity import BURST, LONG_QUIET, QUIET, WINDOW, Activity
from test_metrics import mount_url, scrape, value
from test_writeback import own_server, pending


def test_a_few_requests_are_quiet_soon_and_a_burst_only_after_a_long_pause():
    a = Activity()
    assert a.quiet_in(5.0) == 0   # no request yet
    for i in range(5):            # an editor's save
        a.seen(10.0 + i * 0.001)
    assert a.quiet_in(10.004) == pytest.approx(QUIET)
    assert a.quiet_in(10.004 + QUIET) == 0
    t = 20.0
    for _ in range(BURST):        # a tar: a request every 0.1 ms
        a.seen(t)
        t += 0.0001
    assert a.quiet_in(t + QUIET) > 0          # a short gap does not end a burst
    assert a.quiet_in(t + LONG_QUIET) == 0
    # The burst is forgotten two windows later: a few requests are quiet soon again.
    a.seen(t + 2 * WINDOW + 0.01)
    assert a.quiet_in(t + 2 * WINDOW + 0.01 + QUIET) == 0


def test_the_drain_yields_to_a_burst_and_still_drains_during_it(mount_factory):
    """While an application keeps a write-back mount busy (here: one-byte writes into an
    open file as fast as it can, each a FUSE request answered locally), the drain waits
    for the burst to pause (the mount counts the seconds), yet files closed meanwhile
    reach another mount while the burst goes on: a batch at least every ``PACE``."""
    a = mount_factory("local", None, None, "--writeback", "--metrics", "127.0.0.1:0")
    b = mount_factory("local", a.token)
    url = mount_url(a)
    names = [f"f{i}" for i in range(5)]
    stop, rounds = threading.Event(), [0]
    fd = os.open(a.p("busy"), os.O_WRONLY | os.O_CREAT, 0o644)

    def burst() -> None:
        while not stop.is_set():
            os.pwrite(fd, b"x", rounds[0] % 4096)
            rounds[0] += 1

    t = threading.Thread(target=burst)
    t.start()
    try:
        wait_until(lambda: rounds[0] > 2000, 60, "the burst")
        before = scrape(url)
        for n in names:   # back to back: one batch at once, the rest paced
            write_file(a.p(n), n.encode())
        wait_until(lambda: all(os.path.exists(b.p(n)) and read_file(b.p(n)) == n.encode()
                               for n in names), 60, "the files on the other mount")
        during = rounds[0]
        wait_until(lambda: rounds[0] > during, 60, "the burst to go on")
        after = scrape(url)
        waits = {le: value(after, "nimbusfs_mount_writeback_paced_seconds_bucket", le=le)
                 - value(before, "nimbusfs_mount_writeback_paced_seconds_bucket", le=le)
                 for le in ("2.5", "+Inf")}
        assert waits["+Inf"] > 0                  # the drain waited for the burst
        assert waits["2.5"] == waits["+Inf"]      # never for longer than about PACE
    finally:
        stop.set()
        t.join()
        os.close(fd)


def test_the_orphans_of_an_rm_rf_are_purged_in_batches(services, mount_factory):
    """``rm -rf`` of 60 drained files: each orphan is purged on the server (its inode row
    gone), in ``batch`` requests: no ``purge`` request of its own per file (there were
    5,600-6,800 after an ``rm -rf`` of the Django sdist)."""
    with own_server(services, "wb_purge") as dep:
        m = mount_factory("local", None, dep, "--writeback", "--metrics", "127.0.0.1:0")
        url = mount_url(m)
        os.mkdir(m.p("t"))
        for i in range(60):
            write_file(m.p("t", f"f{i}"), b"x" * 10)
        wait_until(lambda: pending(m) == (0, 0), 60, "the drain")
        inos = ",".join(str(os.stat(m.p("t", f"f{i}")).st_ino) for i in range(60))
        before = scrape(url)
        shutil.rmtree(m.p("t"))
        wait_until(lambda: query(dep.dsn, f"SELECT count(*) FROM inodes WHERE id IN ({inos})")
                   == [(0,)], 60, "the orphans purged")
        purges = [value(s, "nimbusfs_mount_server_calls_total", op="purge")
                  for s in (before, scrape(url))]
        assert purges[1] == purges[0]


def test_the_orphans_of_an_rm_rf_right_before_unmounting_are_purged(services, mount_factory):
    """``rm -rf`` of 300 drained files, then at once the unmount: the unmount waits for
    the orphans' purges queued by the drain's last answers (44 of 300 were left on the
    server, counting against the quota until an fsck, when it did not)."""
    with own_server(services, "wb_purge_umount") as dep:
        m = mount_factory("local", None, dep, "--writeback")
        os.mkdir(m.p("t"))
        for i in range(300):
            write_file(m.p("t", f"f{i}"), b"x" * 10)
        wait_until(lambda: pending(m) == (0, 0), 60, "the drain")
        inos = ",".join(str(os.stat(m.p("t", f"f{i}")).st_ino) for i in range(300))
        shutil.rmtree(m.p("t"))
        m.stop()
        assert query(dep.dsn, f"SELECT count(*) FROM inodes WHERE id IN ({inos})") == [(0,)]


@pytest.mark.parametrize("mode", ["--sync", "--writeback"])
def test_an_orphan_closed_while_the_server_is_down_is_purged_once_it_is_back(
        services, mount_factory, mode):
    """A file unlinked while open, closed while the metaserver is down: its purge fails
    for the outage, is sent again, and the orphan is gone once the server is back (it
    was left on the server, and counted against the quota, until an fsck)."""
    with own_server(services, f"wb_purge_down{mode}") as dep:
        m = mount_factory("local", None, dep, mode, "--outage-timeout", "2")
        write_file(m.p("f"), b"x" * 100)
        wait_until(lambda: pending(m) == (0, 0), 60, "the drain")
        ino = os.stat(m.p("f")).st_ino
        fd = os.open(m.p("f"), os.O_RDONLY)
        os.unlink(m.p("f"))
        wait_until(lambda: pending(m) == (0, 0), 60, "the unlink drained")
        assert query(dep.dsn, f"SELECT nlink FROM inodes WHERE id = {ino}") == [(0,)]
        dep.kill()
        os.close(fd)
        wait_until(lambda: "orphans failed" in m.log(), 30, "the purge failing")
        dep.start()
        wait_until(lambda: query(dep.dsn, f"SELECT count(*) FROM inodes WHERE id = {ino}")
                   == [(0,)], 30, "the orphan purged")
