"""Several metaservers on one database: one volume, mounts on any of them (issue 17)."""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from collections.abc import Iterator
from functools import partial

import psycopg
import pytest
import trio

from chaos import Load
from conftest import Deployment, read_file, start_metaserver, wait_until, write_file
from nimbusfs.client import connect
from nimbusfs.protocol import FrameReader, pack


@pytest.fixture
def replicas(services) -> Iterator[list[Deployment]]:
    """Two metaservers on one database of their own and the local block store."""
    emb = services.emb
    emb.ensure_database("nimbus_replicas")
    dsn = emb.dsn_for("nimbus_replicas")
    blocks = "file://" + emb.path("blocks")
    deps: list[Deployment] = []
    try:
        for name in ("a", "b"):  # a name per test: its info file says when it listens
            deps.append(start_metaserver(emb, f"replica_{name}_{uuid.uuid4().hex[:8]}", blocks,
                                         services.env, dsn=dsn))
        yield deps
    finally:
        for d in deps:
            d.kill()


def both(a: Deployment, b: Deployment) -> Deployment:
    """``a`` as a mount sees it when given both: ``--server A,B``."""
    return dataclasses.replace(a, address=f"{a.address},{b.address}")


def test_mounts_on_different_replicas_see_each_others_changes(replicas, mount_factory):
    """A change made through one replica is pushed to a mount of the other.

    Each mount's kernel caches a negative lookup first: only the push (the
    committing replica's NOTIFY, heard by the other's LISTEN) makes it look again.
    """
    a, b = replicas
    token = a.new_user()
    ma = mount_factory("local", token, a)
    mb = mount_factory("local", token, b)
    for writer, reader, name in ((ma, mb, "from_a"), (mb, ma, "from_b")):
        assert not os.path.exists(reader.p(name))
        write_file(writer.p(name), name.encode())
        wait_until(lambda r=reader, n=name: os.path.exists(r.p(n)), 10,
                   f"{name} pushed to the other replica's mount")
        assert read_file(reader.p(name)) == name.encode()


def test_killing_a_replica_under_load_loses_and_doubles_nothing(replicas, mount_factory):
    """A mount given both replicas moves to the second when the first is SIGKILLed.

    Saves in flight when it dies are sent again to the other replica with
    their op ids; those the first replica had committed are answered from the
    record, not applied again. Afterwards every acknowledged save is there,
    once, with one version, seen from a mount that was on the other replica
    all along.
    """
    a, b = replicas
    token = a.new_user()
    moving = mount_factory("local", token, both(a, b))
    staying = mount_factory("local", token, b)
    load = Load(moving.p())
    recovery = load.run_through(a.kill)
    print(f"\nreplica SIGKILLed under load: writers waited at most {recovery:.2f} s,"
          f" {len(load.acked)} saves acknowledged")
    load.check()
    assert set(load.versions(a.dsn).values()) == {1}
    wait_until(lambda: load.listing(staying.p()) == set(load.acked), 10,
               "the other replica's mount sees every save")
    load.check(staying.p())


def test_a_hung_replica_is_left_for_another(replicas, mount_factory):
    """A replica that stops answering (SIGSTOP: no reset, its connections stay
    open, its transactions hold their locks) is left after its silence.

    The mount pings a silent connection and drops it after
    ``client.SILENT_LIMIT``; the calls waiting on it go to the other replica,
    which waits for no more than ``db.IDLE_IN_TRANSACTION_MS`` on rows the hung
    one had locked. Without that the writers waited for the calls' deadline
    and failed with EIO.
    """
    from nimbusfs.client import SILENT_LIMIT

    a, b = replicas
    moving = mount_factory("local", None, both(a, b))
    load = Load(moving.p())
    try:
        recovery = load.run_through(lambda: os.kill(a.proc.pid, signal.SIGSTOP))
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)  # for its SIGKILL
    print(f"\nreplica SIGSTOPped under load: writers waited at most {recovery:.2f} s"
          f" (silence limit {SILENT_LIMIT:g} s), {len(load.acked)} saves acknowledged")
    load.check()
    assert set(load.versions(a.dsn).values()) == {1}


def test_a_dead_first_server_is_passed_over_at_mount(replicas, mount_factory):
    """``--server A,B`` with A down from the start mounts through B."""
    a, b = replicas
    a.kill()
    m = mount_factory("local", None, both(a, b))
    write_file(m.p("f"), b"through b")
    assert read_file(m.p("f")) == b"through b"


async def test_a_mutation_answered_by_a_dead_replica_is_not_applied_again(replicas):
    """A mount whose replica committed a mutation and died before answering sends it
    again, marked ``replay``, to another: that one answers from the shared record."""
    a, b = replicas
    token = a.new_user()

    async def hello(dep: Deployment) -> tuple[trio.SocketStream, FrameReader, dict]:
        host, port = dep.address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        reader = FrameReader(stream)
        await stream.send_all(pack([1, "hello", {"token": token, "device": "t"}]))
        reply = await reader.read()
        assert reply is not None and reply[1] == 0
        return stream, reader, reply[2]

    args = {"name": b"once", "mode": 0o100644, "uid": 0, "gid": 0, "op_id": "op-1"}
    stream, reader, info = await hello(a)
    await stream.send_all(pack([2, "mknod", {"parent": info["root"], **args}]))
    first = await reader.read()
    assert first[1] == 0
    a.kill()  # as if before its answer left
    stream, reader, _ = await hello(b)
    await stream.send_all(pack([2, "mknod", {"parent": info["root"], **args, "replay": True}]))
    again = await reader.read()
    assert again[1:] == first[1:]                    # the recorded answer, not EEXIST
    await stream.send_all(pack([3, "readdir", {"ino": info["root"]}]))
    assert [n for n, _ in (await reader.read())[2]].count(b"once") == 1
    await stream.aclose()


async def test_a_hung_replica_holds_no_lock_for_long(replicas):
    """A replica hung inside a transaction (its rows locked) blocks the others only
    until the database ends that transaction (``db.IDLE_IN_TRANSACTION_MS``).

    Replica A's mknod is held at the root directory's row lock, A is stopped,
    the lock is released: A's transaction now holds the root locked and never
    goes on. B's mknod in the same directory waited for it until its statement
    timeout (30 s) and failed with EIO.
    """
    a, b = replicas
    token = a.new_user()
    args = {"mode": 0o100644, "uid": 0, "gid": 0}
    with psycopg.connect(a.dsn) as lock, psycopg.connect(a.dsn, autocommit=True) as watch:
        def backends(state: str, waiting: bool = False) -> int:
            return watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = %s AND (NOT %s OR wait_event_type = 'Lock')",
                (state, waiting)).fetchone()[0]

        async with connect(a.address, token, "hung") as ca, \
                connect(b.address, token, "other") as cb, trio.open_nursery() as nursery:
            root = ca.info["root"]
            lock.execute("SELECT 1 FROM inodes WHERE id = %s FOR UPDATE", (root,))
            nursery.start_soon(partial(ca.call, "mknod", parent=root, name=b"a", **args))
            await trio.to_thread.run_sync(wait_until, lambda: backends("active", True) == 1,
                                          30, "A's mknod waiting for the lock")
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                lock.commit()
                await trio.to_thread.run_sync(
                    wait_until, lambda: backends("idle in transaction") == 1, 30,
                    "A's transaction holding the lock")
                made = await cb.call("mknod", parent=root, name=b"b", **args)
                assert made["ino"]
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
                nursery.cancel_scope.cancel()
