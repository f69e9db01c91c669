"""Block store faults on real mounts, through a fault-injecting proxy in front of the emulator.

While the store is slow, resets connections, answers 503 or is a black hole,
reads of cached blocks keep working, writes wait for it (the GCS client's
own retries, configured in nimbusfs/blockstore/gcs.py) and complete once it
is back, within the outage timeout; a fault that outlasts the timeout fails
the write with EIO at the deadline. Every acknowledged write is read back
cold from the store, each once committed (one version per close), and no
object in the bucket is ever partial (each hashes to its name).

``-m chaos`` runs the long variants and prints the rows of the chaos table
of docs/operations.md.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import (
    Deployment,
    Mount,
    Services,
    read_file,
    start_metaserver,
    wait_until,
    write_file,
)
from faultproxy import FaultProxy
from nimbusfs.blockstore import block_hash
from nimbusfs.mount.journal import summary
from test_writeback import pending

BUCKET = "chaos"
WRITERS = 3      # threads writing files at once
ROWS: list[str] = []


@dataclasses.dataclass
class Op:
    name: str
    data: bytes
    start: float
    end: float
    errno: int | None


@dataclasses.dataclass
class Rig:
    proxy: FaultProxy
    dep: Deployment
    services: Services
    env: dict[str, str]

    def mount(self, root: str, outage: float, *extra: str) -> Mount:
        m = Mount(dataclasses.replace(self.services, env=self.env), self.dep,
                  self.dep.new_user(), "gcs", root, ("--outage-timeout", str(outage), *extra))
        m.start()
        return m


@pytest.fixture(scope="module")
def rig(services) -> Iterator[Rig]:
    """The session's emulator behind a proxy; a metaserver whose store is reached through it."""
    from nimbusfs.blockstore.gcs import GCSStore

    GCSStore(BUCKET, endpoint=services.gcs_endpoint, create_bucket=True)
    proxy = FaultProxy(services.gcs_endpoint).start()
    env = dict(services.env, STORAGE_EMULATOR_HOST=proxy.url)
    dep = start_metaserver(services.emb, "faults", f"gs://{BUCKET}/blocks", env)
    try:
        yield Rig(proxy, dep, services, env)
    finally:
        dep.kill()
        proxy.stop()
        if ROWS:
            print("\n| fault | for | outage timeout | writes it held | recovery s (max) |"
                  " writes acknowledged | failed | lost | doubled |"
                  "\n|---|---|---|---|---|---|---|---|---|")
            print("\n".join(ROWS))


def _writer(m: Mount, tag: str, stop: threading.Event, ops: list[Op]) -> None:
    """Write new files, one after another, each with bytes of its own (new blocks)."""
    i = 0
    while not stop.is_set():
        name = f"w{tag}-{i}"
        data = os.urandom(200_000 + 1000 * i)
        start = time.monotonic()
        try:
            write_file(m.p(name), data)
            err = None
        except OSError as e:
            err = e.errno
        ops.append(Op(name, data, start, time.monotonic(), err))
        i += 1


def _versions(dep: Deployment, token: str, path: str) -> int:
    ino = os.stat(path).st_ino
    r = httpx.get(f"{dep.http}/api/v1/files/{ino}/versions",
                  headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return sum(1 for v in r.json()["versions"] if v["size"] > 0)


def _no_partial_objects(services) -> int:
    """Every object in the bucket hashes to its name; return how many there are."""
    from nimbusfs.blockstore.gcs import GCSStore

    direct = GCSStore(BUCKET, "blocks", endpoint=services.gcs_endpoint)
    keys = list(direct.list())
    for key in keys:
        assert block_hash(direct.get(key)) == key, f"object {key.hex()} is partial or wrong"
    return len(keys)


def run_fault(rig: Rig, root: str, fault: dict, seconds: float, outage: float) -> dict:
    """Writes before, during and after ``seconds`` of ``fault``; cached reads during it.

    Returns what happened: the recovery time (how long after the fault ended
    the writes it held finished), the writes acknowledged, lost (acknowledged
    but not read back cold from the store), doubled (more than one version
    from one close) and failed.
    """
    m = rig.mount(root, outage)
    try:
        cached = os.urandom(500_000)
        write_file(m.p("cached"), cached)
        m.remount()                      # the block cache on disk stays; the page cache not
        ops: list[Op] = []
        stop = threading.Event()
        writers = [threading.Thread(target=_writer, args=(m, str(n), stop, ops))
                   for n in range(WRITERS)]
        for w in writers:
            w.start()
        try:
            wait_until(lambda: len(ops) >= WRITERS, 60, "writes before the fault")
            before = dataclasses.replace(rig.proxy.counts)
            rig.proxy.set(**fault)
            began = time.monotonic()
            assert read_file(m.p("cached")) == cached     # the store is not needed
            time.sleep(max(0.0, began + seconds - time.monotonic()))  # the fault's duration
            rig.proxy.set()
            ended = time.monotonic()
            wait_until(lambda: any(o.start > ended for o in ops), outage + 60,
                       "a write started after the fault")
        finally:
            stop.set()
            for w in writers:
                w.join(outage + 60)
        counts = rig.proxy.counts
        hit = (counts.answered - before.answered + counts.reset - before.reset
               + counts.swallowed - before.swallowed)
        assert fault.get("latency") or hit > 0, "the fault met no request"
        held = [o for o in ops if o.start < ended and o.end > began]
        recovery = max((o.end - ended for o in held if o.errno is None), default=0.0)
        to_eio = max((o.end - o.start for o in held if o.errno is not None), default=0.0)
        acked = [o for o in ops if o.errno is None]
        failed = [o for o in ops if o.errno is not None]
        assert all(o.errno == errno.EIO for o in failed), failed
        m.remount(drop_cache=True)       # every read below comes from the store
        lost = sum(1 for o in acked if read_file(m.p(o.name)) != o.data)
        doubled = sum(1 for o in acked if _versions(rig.dep, m.token, m.p(o.name)) != 1)
        # A failed close committed nothing of its bytes (its file stays empty).
        half = sum(1 for o in failed if read_file(m.p(o.name)) != b"")
    finally:
        rig.proxy.set()
        m.stop()
    _no_partial_objects(rig.services)
    return {"recovery": recovery, "acked": len(acked), "lost": lost, "doubled": doubled,
            "failed": len(failed), "half": half, "held": len(held), "to_eio": to_eio}


FAULTS = {
    "latency 0.5 s per request": {"latency": 0.5},
    "connections reset (half of each request sent)": {"reset": True},
    "503 to every request": {"status": 503},
    "black hole": {"black_hole": True},
}


def test_reads_do_not_wait_for_setattrs_behind_a_drain_the_store_holds(rig, world_tmp):
    """Write-back, the store a black hole: the drain stops at the first file whose blocks
    it must put, and the records after it wait. The chmods of a directory and of a file
    journalled behind it do not hold up what does not depend on them: a lookup in the
    directory and an open of the file for writing are answered by the server (which is
    up) with the chmods shown on them, as after ``tar x``, which chmods and times each
    directory at its end. (They waited for the drain, and failed with EIO after the
    outage timeout.) An open for reading waits: it updates atime by the times they set."""
    m = rig.mount(os.path.join(world_tmp, "m"), 2.0, "--writeback")
    try:   # stopped whatever happens: the rig's mounts are no fixture's
        try:
            os.mkdir(m.p("d"))
            write_file(m.p("d", "f"), b"committed")
            write_file(m.p("d", "g"), b"never looked up after the remount")
            wait_until(lambda: pending(m) == (0, 0), 60, "the drain")
            m.remount()   # nothing of d is cached: its lookups and opens ask the server
            assert read_file(m.p("d", "f")) == b"committed"   # its blocks in the disk cache
            rig.proxy.set(black_hole=True)
            write_file(m.p("held"), os.urandom(300_000))   # its drain waits for the store
            os.chmod(m.p("d"), 0o750)
            os.chmod(m.p("d", "f"), 0o640)
            assert os.stat(m.p("d", "g")).st_size == 33
            with open(m.p("d", "f"), "ab") as f:
                f.write(b" and more")
            assert stat.S_IMODE(os.stat(m.p("d", "f")).st_mode) == 0o640
            assert stat.S_IMODE(os.stat(m.p("d")).st_mode) == 0o750
            waiting = summary(m.cache_dir)   # the drain is still held: nothing was applied
            assert (waiting.files, waiting.ops) == (2, 2)
        finally:
            rig.proxy.set()
        wait_until(lambda: pending(m) == (0, 0), 60, "the drain after the store is back")
        m.remount()
        assert stat.S_IMODE(os.stat(m.p("d", "f")).st_mode) == 0o640
        assert stat.S_IMODE(os.stat(m.p("d")).st_mode) == 0o750
        assert read_file(m.p("d", "f")) == b"committed and more"
    finally:
        m.stop()


@pytest.mark.parametrize("fault", FAULTS)
def test_writes_wait_out_a_store_fault(rig, world_tmp, fault):
    """A 3 s fault: no write fails, none is lost or doubled, and those it held finish."""
    r = run_fault(rig, world_tmp, FAULTS[fault], 3.0, outage=30.0)
    assert (r["lost"], r["doubled"], r["failed"], r["half"]) == (0, 0, 0, 0), r
    assert r["held"] >= 1, r


def test_a_fault_past_the_outage_timeout_fails_writes_with_eio(rig, world_tmp):
    """A black hole longer than --outage-timeout: writes fail with EIO at the deadline, commit
    nothing, and the next writes after it work."""
    outage = 4.0
    r = run_fault(rig, world_tmp, {"black_hole": True}, outage + 4, outage=outage)
    assert r["failed"] >= 1 and (r["lost"], r["doubled"], r["half"]) == (0, 0, 0), r


CHAOS = [  # (fault, its settings, seconds, outage timeout)
    *((name, f, 10.0, 60.0) for name, f in FAULTS.items()),
    ("black hole (shorter than an attempt's timeout)", {"black_hole": True}, 3.0, 60.0),
    ("black hole past the outage timeout", {"black_hole": True}, 70.0, 60.0),
]


@pytest.mark.chaos
@pytest.mark.parametrize(("fault", "settings", "seconds", "outage"), CHAOS)
def test_chaos_table(rig, world_tmp, fault, settings, seconds, outage):
    """The rows of docs/operations.md's chaos table."""
    r = run_fault(rig, world_tmp, settings, seconds, outage)
    eio = f"{r['failed']} (EIO after {r['to_eio']:.1f} s)" if r["failed"] else "0"
    ROWS.append(f"| {fault} | {seconds:g} s | {outage:g} s | {r['held']} |"
                f" {r['recovery']:.1f} | {r['acked']} | {eio} | {r['lost']} | {r['doubled']} |")
    assert (r["lost"], r["doubled"], r["half"]) == (0, 0, 0), r
    assert r["failed"] == 0 or seconds > outage, r
