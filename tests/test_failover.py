"""Database failover: the primary dies under load, its synchronous standby is promoted.

The metaserver's DSN names both servers with ``target_session_attrs=read-write``;
it notices nothing but lost connections, which its transactions retry (a
transaction whose COMMIT answer was lost is replayed by op id, not applied
again). Issue 17: the service is back within 10 s, no acknowledged operation
is lost and none is applied twice.
"""

from __future__ import annotations

import os
import uuid

import pytest

from chaos import Load
from conftest import start_metaserver
from nimbusfs.client import connect
from pgha import CommitAnswerLoss, PgPair

# The bound on the outage the writers see, primary death to service.
RECOVERY_BOUND = 10.0


@pytest.fixture
def pg_pair(world_tmp):
    pair = PgPair(os.path.join(world_tmp, "pg"))
    os.mkdir(pair.root)
    try:
        pair.start("nimbus")
        yield pair
    finally:
        pair.stop()


def test_primary_dies_under_load_and_the_standby_takes_over(services, pg_pair, mount_factory):
    dep = start_metaserver(services.emb, f"failover_{uuid.uuid4().hex[:8]}",
                           "file://" + services.emb.path("blocks"), services.env,
                           dsn=pg_pair.dsn("nimbus"))
    m = None
    try:
        m = mount_factory("local", None, dep)
        load = Load(m.p())
        promotion: list[float] = []

        def fault() -> None:
            pg_pair.fail_primary()
            promotion.append(pg_pair.promote())

        recovery = load.run_through(fault)
        print(f"\nprimary stopped under load, standby promoted in {promotion[0]:.2f} s:"
              f" writers waited at most {recovery:.2f} s, {len(load.acked)} saves acknowledged")
        assert recovery < RECOVERY_BOUND
        load.check()
        assert set(load.versions(dep.dsn).values()) == {1}
    finally:
        if m is not None:
            m.stop()
        dep.kill()


async def test_a_mutation_whose_commit_answer_was_lost_is_applied_once(services):
    """The database committed a mutation but the answer to COMMIT was lost.

    The metaserver's transaction runner sees a lost connection and runs the
    transaction again on a new one; that rerun is a replay of the op id,
    which finds the mutation's record and returns its result. Run as a first
    attempt again, the mknod failed EEXIST (a commit would have been refused
    as stale and saved as a conflicted copy).
    """
    emb = services.emb
    emb.ensure_database("nimbus_commit_loss")
    proxy = CommitAnswerLoss(emb.path("run", ".s.PGSQL.5432"))
    dep = start_metaserver(emb, f"commit_loss_{uuid.uuid4().hex[:8]}",
                           "file://" + emb.path("blocks"), services.env,
                           dsn=f"host=127.0.0.1 port={proxy.port} dbname=nimbus_commit_loss"
                               " user=postgres sslmode=disable")
    try:
        async with connect(dep.address, dep.new_user(), "t") as client:
            root = client.info["root"]
            proxy.armed.set()
            made = await client.call("mknod", parent=root, name=b"once", mode=0o100644,
                                     uid=0, gid=0)
            assert proxy.lost.is_set()
            listing = await client.call("readdir", ino=root)
            assert [(n, e["ino"]) for n, e in listing if n == b"once"] == [(b"once",
                                                                            made["ino"])]
    finally:
        dep.kill()
        proxy.close()
