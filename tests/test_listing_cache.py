"""Directory listings answered from the mount's caches, as coherent as its cached lookups.

Real mounts, a real metaserver and PostgreSQL. What reaches the server is
counted by the mount's ``nimbusfs_mount_server_calls_total{op="readdir"}``.
"""

from __future__ import annotations

import os
import stat

import psycopg
import pytest

from conftest import wait_until, write_file
from nimbusfs.mount.freshness import Drops
from test_metrics import mount_url, scrape, value
from test_writeback import own_server, pending, take_lease, twin

MODES = ["--sync", "--writeback"]


def readdirs(m) -> float:
    """Listings mount ``m`` asked its server for so far."""
    return value(scrape(mount_url(m)), "nimbusfs_mount_server_calls_total", op="readdir")


def listing(m, *parts: str) -> list[str]:
    return sorted(os.listdir(m.p(*parts)))


@pytest.mark.parametrize("mode", MODES)
def test_a_second_listing_of_an_unchanged_directory_asks_no_server(services, mount_factory,
                                                                   mode):
    token = services.deployments["local"].new_user()
    b = mount_factory("local", token)
    os.mkdir(b.p("d"))
    os.mkdir(b.p("d", "sub"))
    for i in range(20):
        write_file(b.p("d", f"f{i}"), b"x" * i)
    a = mount_factory("local", token, None, mode, "--metrics", "127.0.0.1:0")
    expected = sorted(["sub", *(f"f{i}" for i in range(20))])
    before = readdirs(a)
    assert listing(a, "d") == expected        # the server's listing fills the caches
    asked = readdirs(a)
    assert asked > before
    assert listing(a, "d") == expected        # and answers the next ones
    assert listing(a, "d") == expected
    assert {os.stat(a.p("d", f"f{i}")).st_size for i in range(20)} == set(range(20))
    assert readdirs(a) == asked


@pytest.mark.parametrize("mode", MODES)
def test_another_mounts_changes_show_in_the_next_listing_once_pushed(services, mount_factory,
                                                                     mode):
    token = services.deployments["local"].new_user()
    b = mount_factory("local", token)
    os.mkdir(b.p("d"))
    write_file(b.p("d", "old"), b"1")
    write_file(b.p("d", "gone"), b"2")
    a = mount_factory("local", token, None, mode, "--metrics", "127.0.0.1:0")
    assert listing(a, "d") == ["gone", "old"]
    assert listing(a, "d") == ["gone", "old"]   # cached now

    write_file(b.p("d", "new"), b"3")
    wait_until(lambda: listing(a, "d") == ["gone", "new", "old"], 10, "B's create on A")
    os.unlink(b.p("d", "gone"))
    wait_until(lambda: listing(a, "d") == ["new", "old"], 10, "B's unlink on A")
    os.rename(b.p("d", "old"), b.p("d", "moved"))
    wait_until(lambda: listing(a, "d") == ["moved", "new"], 10, "B's rename on A")
    # A change of an entry's attributes only: the listing shows the new ones.
    write_file(b.p("d", "new"), b"longer")
    wait_until(lambda: os.stat(a.p("d", "new")).st_size == 6, 10, "B's write on A")
    assert {e.name: e.stat().st_size for e in os.scandir(a.p("d"))} == {"moved": 1, "new": 6}


@pytest.mark.parametrize("mode", MODES)
def test_this_mounts_own_changes_show_at_once(services, mount_factory, mode):
    a = mount_factory("local", None, None, mode, "--metrics", "127.0.0.1:0")
    os.listdir(a.path)
    base = readdirs(a)
    os.mkdir(a.p("d"))
    write_file(a.p("d", "f"), b"1")
    assert listing(a, "d") == ["f"]
    write_file(a.p("d", "g"), b"2")
    assert listing(a, "d") == ["f", "g"]
    os.mkdir(a.p("d", "sub"))
    os.symlink("f", a.p("d", "ln"))
    os.link(a.p("d", "f"), a.p("d", "hard"))
    assert listing(a, "d") == ["f", "g", "hard", "ln", "sub"]
    os.rename(a.p("d", "g"), a.p("d", "sub", "g2"))
    os.unlink(a.p("d", "hard"))
    assert listing(a, "d") == ["f", "ln", "sub"]
    assert listing(a, "d", "sub") == ["g2"]
    os.rename(a.p("d", "sub"), a.p("moved"))
    assert listing(a, "d") == ["f", "ln"]
    assert sorted(os.listdir(a.p("moved", ".."))) == sorted(os.listdir(a.path))
    os.unlink(a.p("moved", "g2"))
    os.rmdir(a.p("moved"))
    assert "moved" not in os.listdir(a.path)
    if mode == "--writeback":
        # A tree made here (in a directory listed before) needs no listing of the server.
        assert readdirs(a) == base
        wait_until(lambda: pending(a) == (0, 0), 60, "the drain")
        assert listing(a, "d") == ["f", "ln"]
        assert listing(a) == sorted(["d"])


def test_a_tree_made_here_is_listed_and_statted_without_the_server_once_drained(
        services, mount_factory):
    """Write-back: a tree made as ``tar x`` makes it (directories, files, then the
    directories' times set), drained; listing and stat of all of it asks the server
    nothing (an applied setattr leaves the attributes this mount showed)."""
    a = mount_factory("local", None, None, "--writeback", "--metrics", "127.0.0.1:0")
    assert listing(a) == []
    os.makedirs(a.p("t", "sub"))
    for d in (("t",), ("t", "sub")):
        for i in range(3):
            write_file(a.p(*d, f"f{i}"), b"x" * i)
    os.utime(a.p("t", "sub"), ns=(10**18, 10**18))
    os.utime(a.p("t"), ns=(2 * 10**18, 2 * 10**18))
    wait_until(lambda: pending(a) == (0, 0), 60, "the drain")
    before = scrape(mount_url(a))

    assert listing(a, "t") == ["f0", "f1", "f2", "sub"]
    assert listing(a, "t", "sub") == ["f0", "f1", "f2"]
    assert os.stat(a.p("t")).st_mtime_ns == 2 * 10**18
    assert os.stat(a.p("t", "sub")).st_mtime_ns == 10**18
    after = scrape(mount_url(a))
    for op in ("readdir", "getattr", "lookup"):
        assert value(after, "nimbusfs_mount_server_calls_total", op=op) == \
            value(before, "nimbusfs_mount_server_calls_total", op=op), op


@pytest.mark.parametrize("mode", MODES)
def test_a_lookup_the_kernel_repeats_after_a_chmod_asks_no_server(services, mount_factory,
                                                                  mode):
    """A chmod of a directory makes the kernel drop its entry (``tar x`` chmods each
    directory it makes): the next path walk looks it up again, answered from the caches,
    not the server; in write-back mode right after the chmods, their drain not waited
    for (it waited behind the whole backlog of a ``tar x``: 6-9 s for a ``stat``)."""
    a = mount_factory("local", None, None, mode, "--metrics", "127.0.0.1:0")
    os.makedirs(a.p("t", "sub", "deep"))
    write_file(a.p("t", "sub", "deep", "f"), b"x")
    for d in (("t",), ("t", "sub"), ("t", "sub", "deep")):
        os.chmod(a.p(*d), 0o750)
    before = value(scrape(mount_url(a)), "nimbusfs_mount_server_calls_total", op="lookup")
    assert os.stat(a.p("t", "sub", "deep", "f")).st_size == 1
    assert stat.S_IMODE(os.stat(a.p("t", "sub")).st_mode) == 0o750
    after = value(scrape(mount_url(a)), "nimbusfs_mount_server_calls_total", op="lookup")
    assert after == before


def test_a_file_and_its_link_drained_in_one_batch_stay_listed_from_the_caches(
        services, mount_factory):
    """Write-back: a file and a hard link to it drained in one batch. The link's answer
    (the inode's attributes after it) came first and the file's commit then found the
    inode dropped since the batch was sent, so it dropped the newer attributes too: the
    directory's listing was no longer whole in the caches, and with the server out of
    reach ``rm -rf`` could not read it ("Directory not empty", a flake of
    test_writeback_rmdir's kill test under load). The link's attributes stay."""
    with own_server(services, "listing-link-batch") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2",
                          "--metrics", "127.0.0.1:0")
        take_lease(a)
        # A change of another mount pushed to A: its resubscribe after the restart
        # below is not a reset (which would drop every listing).
        b = mount_factory("local", a.token, dep)
        write_file(b.p("theirs"), b"1")
        wait_until(lambda: "theirs" in os.listdir(a.p()), 10, "B's create on A")
        os.mkdir(a.p("sub"))
        wait_until(lambda: pending(a) == (0, 0), 60, "sub's drain")
        assert listing(a, "sub") == []
        dep.kill()
        os.mkdir(a.p("x"))   # sent alone, again and again, while the server is down
        wait_until(lambda: "write-back of 1 records waits" in a.log(), 60, "x's batch")
        write_file(a.p("sub", "f"), b"x")
        os.link(a.p("sub", "f"), a.p("sub", "l"))   # so f and l drain in one batch
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "the drain")
        before = readdirs(a)
        assert listing(a, "sub") == ["f", "l"]
        assert readdirs(a) == before
        assert os.stat(a.p("sub", "l")).st_nlink == 2


@pytest.mark.parametrize("mode", MODES)
def test_a_file_opened_by_a_listed_name_and_deleted_elsewhere_is_kept_as_a_copy(
        services, mount_factory, mode):
    """A file opened through a name this mount knows from a listing (no lookup reached
    the server), written, and deleted meanwhile by another mount: its bytes become a
    conflicted copy beside it, as when the name was looked up. (The mount did not know
    where it had seen the file, and the server, given no name, committed the bytes to the
    deleted inode: lost.)"""
    token = services.deployments["local"].new_user()
    b = mount_factory("local", token, None, "--sync")
    os.mkdir(b.p("d"))
    write_file(b.p("d", "notes.md"), b"v1")
    a = mount_factory("local", token, None, mode)
    assert listing(a, "d") == ["notes.md"]
    with open(a.p("d", "notes.md"), "r+b") as f:
        f.write(b"precious edit")
        os.unlink(b.p("d", "notes.md"))
        wait_until(lambda: listing(a, "d") == [], 10, "B's unlink on A")
    wait_until(lambda: listing(b, "d") != [], 10, "the conflicted copy on B")
    (copy,) = listing(b, "d")
    assert copy.startswith("notes (conflicted copy ")
    with open(b.p("d", copy), "rb") as f:
        assert f.read() == b"precious edit"


@pytest.mark.parametrize("seen", [True, False])
def test_a_change_log_reset_drops_the_cached_listings(services, mount_factory, seen):
    """The mount was disconnected while another mount changed a directory it had listed:
    ``seen``, it had seen changes before and their log was trimmed meanwhile (its
    subscribe answers a reset); else it had seen none (its cursor is 0, which subscribes
    from now). Either way it drops its caches, and its next listing asks the server."""
    with own_server(services, f"listing-reset-{seen}") as dep:
        token = dep.new_user()
        a = mount_factory("local", token, dep, "--outage-timeout", "30")
        assert listing(a) == []
        if seen:
            b = mount_factory("local", token, dep)
            write_file(b.p("early"), b"1")
            wait_until(lambda: listing(a) == ["early"], 10, "B's create pushed to A")
            b.stop()
        dep.kill()
        # A's server is down (A keeps trying to reconnect): B's create, through another
        # server of the volume, is not pushed to it.
        with twin(services, dep, f"listing-reset-{seen}-twin") as other:
            b = mount_factory("local", token, other)
            write_file(b.p("theirs"), b"2")
            b.stop()
        if seen:
            with psycopg.connect(dep.dsn) as conn:   # as the log's trim would
                conn.execute("DELETE FROM changes WHERE owner_id = (SELECT owner_id FROM"
                             " changes ORDER BY seq DESC LIMIT 1)")
        dep.start()           # A reconnects and subscribes again
        wait_until(lambda: "change log reset" in a.log(), 30, "the reset")
        assert listing(a) == (["early", "theirs"] if seen else ["theirs"])


def test_a_reply_is_fresh_unless_its_item_was_dropped_while_it_was_in_flight():
    """``Drops``, pure logic: another item's drop leaves a reply fresh (it voided every reply
    in flight before), an evicted record or a reset voids the replies sent before them."""
    d = Drops(size=2)
    sent = d.now
    d.drop(("dir", 1))
    assert d.fresh(7, sent) and d.fresh(("dir", 2), sent)
    assert not d.fresh(("dir", 1), sent) and d.fresh(("dir", 1), d.now)
    d.drop(2)
    d.drop(3)          # evicts ("dir", 1): dropped at some unknown time after ``sent``
    assert not d.fresh(("dir", 1), sent) and not d.fresh(7, sent)
    sent = d.now
    d.all()
    assert not d.fresh(7, sent) and d.fresh(7, d.now)
