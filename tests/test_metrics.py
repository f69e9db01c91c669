"""Prometheus metrics: a real metaserver's and a real mount's /metrics move by what was done."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Deployment, read_file, start_metaserver, wait_until, write_file

Samples = dict[tuple[str, frozenset], float]


def scrape(url: str, **kwargs) -> Samples:
    r = httpx.get(url, timeout=30, **kwargs)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def dep(services) -> Iterator[Deployment]:
    """A metaserver of this module's own: its counters move only by these tests."""
    d = start_metaserver(services.emb, "metrics", "file://" + services.emb.path("blocks"),
                         services.env)
    yield d
    d.proc.terminate()
    d.proc.wait(30)
    with open(d.log_path) as f:
        assert "Traceback" not in f.read()


def server_metrics(dep: Deployment) -> Samples:
    return scrape(dep.http + "/metrics")


def api(dep: Deployment, token: str) -> httpx.Client:
    return httpx.Client(base_url=dep.http + "/api/v1", timeout=30,
                        headers={"Authorization": f"Bearer {token}"})


def test_server_counts_requests_by_kind_and_mounts(dep, mount_factory):
    token = dep.new_user()
    before = server_metrics(dep)
    mounts_before = value(before, "nimbusfs_server_mounts")
    a = mount_factory("local", token, dep)
    b = mount_factory("local", token, dep)
    now = server_metrics(dep)
    assert value(now, "nimbusfs_server_mounts") == mounts_before + 2
    assert value(now, "nimbusfs_server_db_pool_max") == 8
    assert value(now, "nimbusfs_server_db_pool_connections") >= 1

    # Three files closed on a mount: three commits; B is told of each change.
    for i in range(3):
        write_file(a.p(f"f{i}"), b"x" * (i + 1))
    wait_until(lambda: os.path.exists(b.p("f2")), 10, "B to see f2")
    # REST: two uploads, one read, one miss (404).
    with api(dep, token) as c:
        ids = [c.post("/files", files={"file": (f"r{i}", b"data")}).json()["id"]
               for i in range(2)]
        assert c.get(f"/files/{ids[0]}").status_code == 200
        assert c.get("/files/999999999").status_code == 404
    after = server_metrics(dep)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    count = "nimbusfs_server_request_seconds_count"
    assert moved(count, interface="protocol", op="commit") == 3
    assert moved(count, interface="http", op="POST /api/v1/files") == 2
    assert moved(count, interface="http", op="GET /api/v1/files/{id}") == 2
    errors = "nimbusfs_server_request_errors_total"
    assert moved(errors, interface="http", op="GET /api/v1/files/{id}", error="404") == 1
    assert moved(errors, interface="http", op="POST /api/v1/files", error="404") == 0
    # The latency histogram holds every request in its buckets.
    assert value(after, "nimbusfs_server_request_seconds_bucket", interface="protocol",
                 op="commit", le="+Inf") == value(after, count, interface="protocol", op="commit")
    # Changes from A were pushed to B (A's own changes are not pushed to A).
    wait_until(lambda: value(server_metrics(dep), "nimbusfs_server_push_lag_seconds_count")
               > value(before, "nimbusfs_server_push_lag_seconds_count"), 10, "a push")
    assert moved("nimbusfs_server_pushed_changes_total") >= 3


async def test_an_op_name_a_client_makes_up_is_counted_as_other(dep):
    """Label values come from a known set: a client cannot grow the registry."""
    from nimbusfs.client import connect
    from nimbusfs.errors import FSError

    before = server_metrics(dep)
    async with connect(dep.address, dep.new_user(), "metrics-test") as client:
        with pytest.raises(FSError) as e:
            await client.call("made_up_op_name")
    assert e.value.errno == errno.ENOSYS
    after = server_metrics(dep)
    count = "nimbusfs_server_request_seconds_count"
    assert value(after, count, interface="protocol", op="other") == \
        value(before, count, interface="protocol", op="other") + 1
    assert not any("made_up" in v for _, labels in after for _, v in labels)


async def test_a_batch_runs_again_with_savepoints_only_when_an_operation_fails(dep):
    """A write-back drain's ``batch`` is applied without a savepoint per operation; one
    refused operation makes the server roll the batch back and apply it again with
    them (counted as a retry): the answers are as one careful run's, the others apply."""
    from nimbusfs.client import connect

    def reruns() -> float:
        return value(server_metrics(dep), "nimbusfs_server_db_retries_total",
                     reason="batch_refusal")

    def mknod(op_id: str, root: int, name: bytes) -> list:
        return ["mknod", op_id, {"parent": root, "name": name, "mode": 0o100644, "uid": 0,
                                 "gid": 0}]

    async with connect(dep.address, dep.new_user(), "metrics-test") as c:
        root = c.info["root"]
        before = reruns()
        answers = await c.call("batch", ops=[mknod(f"ok-{i}", root, b"f%d" % i)
                                             for i in range(3)])
        assert [e for e, _ in answers] == [0, 0, 0]
        assert reruns() == before
        answers = await c.call("batch", ops=[mknod("x-1", root, b"g1"),
                                             mknod("x-2", root, b"f1"),
                                             mknod("x-3", root, b"g3")])
        assert [e for e, _ in answers] == [0, errno.EEXIST, 0]
        assert reruns() == before + 1
        names = {n for n, _ in await c.call("readdir", ino=root)}
        assert {b"f0", b"f1", b"f2", b"g1", b"g3"} <= names


def test_lost_database_connections_count_as_retries(dep):
    """Every pooled connection killed: the next transactions retry on fresh ones."""
    token = dep.new_user()
    with api(dep, token) as c:
        assert c.get("/files").status_code == 200   # the pool holds connections
        before = value(server_metrics(dep), "nimbusfs_server_db_retries_total",
                       reason="connection")
        with psycopg.connect(dep.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert c.get("/files").status_code == 200
    after = server_metrics(dep)
    assert value(after, "nimbusfs_server_db_retries_total", reason="connection") > before


def _off_loopback_address() -> str:
    """An address of this host that is not loopback (a client may send from it to 127.0.0.1)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    pytest.skip("this host has no address but loopback")


def test_metrics_off_loopback_need_an_admin_token(dep):
    """From this host's other address: no token 401, a user's 403, an admin's 200."""
    from nimbusfs.server.auth import create_token, create_user
    from nimbusfs.server.db import Database

    db = Database(dep.dsn, pool_size=1)
    db.open()
    try:
        name = "admin" + uuid.uuid4().hex[:8]
        db.run(create_user, name, 0, True)
        admin = db.run(create_token, name)
    finally:
        db.close()
    user = dep.new_user()
    transport = httpx.HTTPTransport(local_address=_off_loopback_address())
    with httpx.Client(transport=transport, timeout=30) as c:
        url = dep.http + "/metrics"
        r = c.get(url)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = c.get(url, headers={"Authorization": f"Bearer {user}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert "nimbusfs" not in r.text.replace("metrics", "")
        r = c.get(url, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200 and "nimbusfs_server_mounts" in r.text
    # From loopback, no token is needed.
    assert httpx.get(url, timeout=30).status_code == 200


def mount_url(m) -> str:
    with open(os.path.join(m.cache_dir, "metrics.url")) as f:
        return f.read().strip()


def test_mount_counts_fuse_ops_cache_transfers_and_reconnects(dep, mount_factory):
    token = dep.new_user()
    writer = mount_factory("local", token, dep)
    data = os.urandom(3 << 20)
    write_file(writer.p("big"), data)
    m = mount_factory("local", token, dep, "--metrics", "127.0.0.1:0")
    url = mount_url(m)
    before = scrape(url)

    assert read_file(m.p("big")) == data          # cold: every block from the store
    new = os.urandom(1 << 20)
    write_file(m.p("new"), new)                   # one create, one upload of 1 MiB
    os.mkdir(m.p("d"))
    write_file(m.p("d", "f"), b"")
    with pytest.raises(OSError) as e:
        os.rmdir(m.p("d"))
    assert e.value.errno == errno.ENOTEMPTY
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ops = "nimbusfs_mount_fuse_op_seconds_count"
    assert moved(ops, op="create") == 2
    assert moved(ops, op="mkdir") == 1 and moved(ops, op="rmdir") == 1
    assert moved(ops, op="read") >= 1 and moved(ops, op="write") >= 1
    assert moved("nimbusfs_mount_fuse_errors_total", op="rmdir", errno="ENOTEMPTY") == 1
    assert moved("nimbusfs_mount_cache_miss_bytes_total") == len(data)
    assert moved("nimbusfs_mount_store_bytes_total", direction="download") == len(data)
    assert moved("nimbusfs_mount_cache_misses_total") >= 1
    assert moved("nimbusfs_mount_cache_hits_total", tier="memory") >= 1  # read ahead
    assert moved("nimbusfs_mount_store_bytes_total", direction="upload") == len(new)
    assert value(after, "nimbusfs_mount_uploads_in_flight") == 0
    assert value(after, "nimbusfs_mount_dirty_files") == 0
    assert value(after, "nimbusfs_mount_server_connected") == 1
    assert value(after, "process_resident_memory_bytes") > 0

    # The metaserver restarts: the mount's next call reconnects, once.
    dep.kill()
    wait_until(lambda: value(scrape(url), "nimbusfs_mount_server_connected") == 0, 10,
               "the mount to see the connection lost")
    dep.start()
    os.mkdir(m.p("after"))
    assert value(scrape(url), "nimbusfs_mount_reconnects_total") == \
        value(after, "nimbusfs_mount_reconnects_total") + 1
    wait_until(lambda: value(scrape(url), "nimbusfs_mount_server_connected") == 1, 10,
               "the mount to reconnect")


def _status(home: str, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nimbusfs.cli", "--home", home, "status",
                             *args], stdout=subprocess.PIPE, text=True, **popen)


def test_status_shows_the_figures_once_and_live(dep, mount_factory, world_tmp):
    """``nimbusfs status`` reads the mounts it knows (their records) and the URLs given."""
    from nimbusfs.embedded import Embedded

    m = mount_factory("local", None, dep, "--metrics", "127.0.0.1:0")
    write_file(m.p("one"), os.urandom(1 << 20))
    home = os.path.join(world_tmp, "home")
    rec = Embedded(home).mount_record(m.path)
    os.makedirs(os.path.dirname(rec))
    with open(rec, "w") as f:   # as ``nimbusfs mount`` records the mounts it starts
        json.dump({"pid": m.proc.pid, "mountpoint": m.path, "server": dep.address,
                   "log": m.log_path, "cache_dir": m.cache_dir, "embedded": False}, f)
    out, _ = _status(home, "--metrics", dep.http + "/metrics").communicate(timeout=60)
    mount_part = out[out.index(f"mount {m.path} (since it started):"):]
    assert "uploaded 1.0 MiB" in mount_part and "metaserver connected" in mount_part
    assert re.search(r"^    create +1 ", mount_part, re.M), mount_part
    server_part = out[out.index(f"{dep.http}/metrics (since it started):"):]
    assert re.search(r"^  mounts connected [1-9]", server_part, re.M), server_part
    assert re.search(r"^    commit +[1-9]", server_part, re.M), server_part

    # Live: the second frame shows rates over the interval.
    lines: list[str] = []
    proc = _status(home, "--watch", "0.5")
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("(rates over the last" in line for line in lines), 30,
                   "a second frame")
        frame = "".join(lines).rsplit("\033[H\033[2J", 1)[-1]
        assert re.search(r"FUSE operations [0-9.,]+/s", frame), frame
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_http_method_a_client_makes_up_is_not_a_label(dep):
    """A route matched with a method it does not serve (405) is counted under a known
    method: a user making methods up cannot grow the registry without bound."""
    with api(dep, dep.new_user()) as c:
        r = c.request("BREWCOFFEE", "/files/1")
    assert r.status_code == 405
    after = server_metrics(dep)
    assert not any("BREWCOFFEE" in v for _, labels in after for _, v in labels)
    count = "nimbusfs_server_request_seconds_count"
    assert value(after, count, interface="http", op="other /api/v1/files/{id}") >= 1
