"""The retry policy (``nimbusfs.retry``) and the database runner's use of it."""

from __future__ import annotations

import itertools
import time

import pytest
from psycopg import errors as pgerr

from nimbusfs.retry import Backoff
from nimbusfs.server.db import Database


def test_waits_double_up_to_the_cap_each_cut_by_at_most_the_jitter():
    policy = Backoff(first=0.1, cap=1.0, jitter=0.5)
    uncut = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for _ in range(50):
        waits = list(itertools.islice(policy.delays(), len(uncut)))
        assert all(d / 2 <= w <= d for w, d in zip(waits, uncut, strict=True)), waits
    assert list(itertools.islice(Backoff(0.5, 30.0, jitter=0).delays(), 8)) == \
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert Backoff(0.5, 30.0, jitter=0).delay(10_000) == 30.0   # no float overflow


def test_the_tries_go_on_until_just_before_the_deadline():
    """Near the deadline the waits shrink to half the time left, so the last try
    is made less than ``first`` before it.

    The reconnect loop used to give up once the next wait would pass the
    deadline: with a 2 s outage timeout, at 1.55 s (1.2 s or so with
    jitter), so a metaserver back at 1.8 s was not reached.
    """
    now = [0.0]
    waits = Backoff(first=1.0, cap=4.0, jitter=0).until(10.0, lambda: now[0])
    taken = []
    for w in waits:
        taken.append(w)
        now[0] += w
    assert taken == [1.0, 2.0, 3.5, 1.75, 0.875]   # 4 s would be more than half of what is left
    assert 10.0 - 1.0 < now[0] < 10.0


def test_a_transaction_that_keeps_losing_is_retried_with_backoff_then_raised(services):
    """Deadlocks and serialization failures are rerun, but not without end.

    They were rerun at once and for ever: a transaction that always lost
    spun a worker thread. Now they wait as a lost connection does and give
    up after ``outage_timeout``; the error then reaches the caller (the
    server answers EIO).
    """
    calls = []

    def always_loses(cur) -> None:
        calls.append(1)
        if len(calls) > 1000:   # an unbounded loop: stop the test, not the machine
            raise RuntimeError("retried without end")
        cur.execute("SELECT 1")
        raise pgerr.DeadlockDetected("deadlock detected")

    db = Database(services.deployments["local"].dsn, pool_size=1, outage_timeout=1.0)
    db.open()
    try:
        with pytest.raises(pgerr.DeadlockDetected):
            db.run(always_loses)
    finally:
        db.close()
    assert 2 <= len(calls) < 1000


def test_a_transaction_the_database_ended_for_idling_is_run_again(services):
    """A transaction left idle past ``idle_in_transaction_session_timeout`` (its
    process stopped: a replica SIGSTOPped, then resumed) is ended by the database
    with its connection; it is run again on a new one, not answered EIO with a
    traceback in the server's log (a resumed replica's rename did that)."""
    calls = []

    def idles_once(cur) -> int:
        calls.append(1)
        cur.execute("SET LOCAL idle_in_transaction_session_timeout = 100")
        if len(calls) == 1:
            time.sleep(0.5)   # the process stopped mid-transaction
        cur.execute("SELECT 1")
        return len(calls)

    db = Database(services.deployments["local"].dsn, pool_size=1, outage_timeout=30.0)
    db.open()
    try:
        assert db.run(idles_once) == 2
    finally:
        db.close()
