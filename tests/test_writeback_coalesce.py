"""Write-back: setattrs of one inode journalled one after another drain as one record.

Real mounts, a real metaserver and PostgreSQL; the metaserver is stopped
(SIGKILL) while the records are journalled, so that none drains before the
journal is looked at.
"""

from __future__ import annotations

import os
import sqlite3
import stat

import msgpack

from conftest import read_file, wait_until, write_file
from nimbusfs.mount.journal import JOURNAL_NAME, summary
from nimbusfs.posix import merge_setattrs
from test_writeback import crash, own_server, pending, take_lease

SETUID_EXEC = stat.S_ISUID | 0o755


def fsync_dir(path: str) -> None:
    """fsync a directory: the mount writes the journal's group being filled now."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def journalled_ops(m) -> list[tuple[str, dict]]:
    """The operations in the mount's journal (read-only), in drain order."""
    conn = sqlite3.connect(f"file:{os.path.join(m.cache_dir, JOURNAL_NAME)}?mode=ro",
                           uri=True)
    try:
        rows = conn.execute("SELECT op, args FROM ops ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [(op, msgpack.unpackb(args, raw=False)) for op, args in rows]


def made_and_drained(m, *names: str) -> None:
    """Directories ``names`` made on ``m`` and drained, their attributes in ``m``'s cache
    (a setattr of one needs them, and the server is stopped next)."""
    for name in names:
        os.mkdir(m.p(name))
    fsync_dir(m.p())   # their records written: the drain is waited for, not passed before
    wait_until(lambda: pending(m) == (0, 0), 30, "the first drain")
    for name in names:
        os.listdir(m.p(name))


def hold_the_drain(m, dep) -> None:
    """Stop the metaserver while a batch holds a record (a chmod of ``busy``): the
    drainer resends it, and takes no other batch until a full one waits, so that what is
    journalled next stays at the journal's tail, as behind a backlog (else each record
    could go into a batch of its own once written, before the next setattr comes)."""
    dep.kill()
    os.chmod(m.p("busy"), 0o700)
    fsync_dir(m.p("busy"))
    wait_until(lambda: "records waits for the metaserver" in m.log(), 30, "the drain held")


def after_busy(m) -> list[tuple[str, dict]]:
    """The journal's operations after ``hold_the_drain``'s chmod."""
    ops = journalled_ops(m)
    assert ops[0][0] == "setattr" and stat.S_IMODE(ops[0][1]["mode"]) == 0o700
    return ops[1:]


def test_owner_mode_and_times_of_a_directory_set_together_are_one_record(services,
                                                                         mount_factory):
    """``tar x`` as root sets a directory's owner, mode and times one after another: one
    journal record (not three) while the server is down; once drained, another mount
    sees all three changes."""
    with own_server(services, "wb_merge") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        made_and_drained(a, "busy", "d")
        d = a.p("d")
        hold_the_drain(a, dep)
        os.chown(d, 1234, 5678)
        os.chmod(d, 0o750)
        os.utime(d, ns=(1_000_000_000, 2_000_000_000))
        fsync_dir(d)
        assert [op for op, _ in after_busy(a)] == ["setattr"]
        st = os.stat(d)
        assert (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns) == (
            1234, 5678, stat.S_IFDIR | 0o750, 2_000_000_000)
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        st = os.stat(b.p("d"))
        assert (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns) == (
            1234, 5678, stat.S_IFDIR | 0o750, 2_000_000_000)


def test_a_setattr_merged_into_a_written_record_survives_a_crash(services, mount_factory):
    """A setattr merged into a record already written (an fsync of the directory between
    them) rewrites that record with the next group commit: after that commit and a kill
    -9 of the mount, the replay drains both changes, as one record."""
    with own_server(services, "wb_merge_crash") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        made_and_drained(a, "busy", "d")
        d = a.p("d")
        hold_the_drain(a, dep)
        os.chown(d, 1234, 5678)
        fsync_dir(d)   # the record written
        os.chmod(d, 0o705)
        os.utime(d, ns=(1_000_000_000, 3_000_000_000))
        fsync_dir(d)   # the merge written
        assert after_busy(a) == [("setattr", {
            "ino": os.stat(d).st_ino, "uid": 1234, "gid": 5678, "mode": stat.S_IFDIR | 0o705,
            "atime": 1_000_000_000, "mtime": 3_000_000_000})]
        crash(a)
        dep.start()
        a.start()   # replays and drains before it answers
        assert summary(a.cache_dir).records == 0
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        st = os.stat(b.p("d"))
        assert (st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns) == (
            1234, 5678, stat.S_IFDIR | 0o705, 3_000_000_000)


def test_setattrs_are_never_merged_across_a_create(services, mount_factory):
    """chmod of a directory, a create in it, then its chmod back and utimens (as ``tar x``
    ends a directory): the last two merge with each other, never with the first across
    the create, which the server applies between them (a utimens moved before it would
    lose its time to the create's). Another mount sees the file and the directory's
    final mode and time."""
    with own_server(services, "wb_merge_order") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        made_and_drained(a, "busy", "d")
        d = a.p("d")
        hold_the_drain(a, dep)
        os.chmod(d, 0o700)
        write_file(os.path.join(d, "f"), b"made between")
        os.chmod(d, 0o555)
        os.utime(d, ns=(1_000_000_000, 4_000_000_000))
        fsync_dir(d)
        assert [(op, sorted(args)) for op, args in after_busy(a)] == [
            ("setattr", ["ino", "mode"]), ("setattr", ["atime", "ino", "mode", "mtime"])]
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        assert not a.records("conflicts.jsonl")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert read_file(b.p("d", "f")) == b"made between"
        st = os.stat(b.p("d"))
        assert (st.st_mode, st.st_mtime_ns) == (stat.S_IFDIR | 0o555, 4_000_000_000)


def test_merged_setattrs_do_what_the_two_did():
    """``merge_setattrs`` (pure logic): later values win, a later mode replaces what an
    earlier chown left; a chown after a mode with set-user-ID is not merged (it clears
    the bit of a file, a merged mode would keep it)."""
    assert merge_setattrs({"uid": 1, "gid": 2}, {"mode": 0o750}) == {
        "uid": 1, "gid": 2, "mode": 0o750}
    assert merge_setattrs({"mode": 0o750, "mtime": 1}, {"mode": 0o700, "atime": 2}) == {
        "mode": 0o700, "mtime": 1, "atime": 2}
    assert merge_setattrs({"mode": 0o755}, {"uid": 3}) == {"mode": 0o755, "uid": 3}
    assert merge_setattrs({"mode": SETUID_EXEC}, {"uid": 3}) is None
    assert merge_setattrs({"mode": SETUID_EXEC}, {"uid": 3, "mode": SETUID_EXEC}) == {
        "mode": SETUID_EXEC, "uid": 3}
