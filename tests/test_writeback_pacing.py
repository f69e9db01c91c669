"""Write-back: the drain yields to a burst of requests, and never waits for its end.

``Activity`` is pure logic (times given); the burst test runs on real mounts,
a real metaserver and PostgreSQL.
"""

from __future__ import annotations

import os
import threading

import pytest

from conftest import read_file, wait_until, write_file
from nimbusfs.mount.activity import BURST, LONG_QUIET, QUIET, WINDOW, Activity


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


def test_a_burst_does_not_hold_its_changes_back_from_other_mounts(mount_factory):
    """While an application keeps a write-back mount busy (here: opening and closing a
    file as fast as it can, three requests each time), a file closed on it reaches
    another mount during the burst: the drain yields to the burst, but takes a batch
    at least every ``PACE`` seconds."""
    a = mount_factory("local", None, None, "--writeback")
    b = mount_factory("local", a.token)
    write_file(a.p("busy"), b"x")
    stop, rounds = threading.Event(), [0]

    def burst() -> None:
        while not stop.is_set():
            os.close(os.open(a.p("busy"), os.O_RDONLY))
            rounds[0] += 1

    t = threading.Thread(target=burst)
    t.start()
    try:
        wait_until(lambda: rounds[0] > 1000, 60, "the burst")
        write_file(a.p("f"), b"made in a burst")
        wait_until(lambda: os.path.exists(b.p("f")) and read_file(b.p("f")) == b"made in a burst",
                   60, "the file on the other mount")
        assert t.is_alive()   # the burst went on all along
    finally:
        stop.set()
        t.join()
