"""Listings and attributes from the mount's caches, attacked with a second mount.

Mount A holds a directory whole (listed, every entry statted); mount B (or
the server) changes it; A must converge to what B sees, as a local directory
shows the change at once. Real mounts, a real metaserver and PostgreSQL.
"""

from __future__ import annotations

import os

import psycopg
import pytest

from conftest import read_file, wait_until, write_file
from test_writeback import own_server, twin

MODES = ["--sync", "--writeback"]


def view(m, *parts: str) -> dict[str, tuple[int, int, int]]:
    """Directory ``parts`` of mount ``m`` as ``ls -l`` shows it: name -> (mode, nlink, size)."""
    out = {}
    for e in os.scandir(m.p(*parts)):
        st = e.stat(follow_symlinks=False)
        out[e.name] = (st.st_mode, st.st_nlink, st.st_size)
    return out


def converge(a, b, *dirs: tuple[str, ...], what: str) -> None:
    """A's view of each directory in ``dirs`` becomes B's (B is the writer: its view is
    the server's)."""
    for d in dirs:
        wait_until(lambda d=d: view(a, *d) == view(b, *d), 20, f"{what}: A sees {d} as B")


@pytest.mark.parametrize("mode", MODES)
def test_a_rename_over_a_hard_linked_file_shows_the_other_links_count(services,
                                                                      mount_factory, mode):
    """B renames a file over one that has a second link in another directory that A
    holds whole: the remaining link's count drops to 1 on A, as on a local disk."""
    token = services.deployments["local"].new_user()
    b = mount_factory("local", token)
    os.mkdir(b.p("d"))
    os.mkdir(b.p("e"))
    write_file(b.p("d", "t"), b"target")
    write_file(b.p("d", "s"), b"source")
    os.link(b.p("d", "t"), b.p("e", "t2"))
    a = mount_factory("local", token, None, mode)
    assert view(a, "e")["t2"][1] == 2
    assert view(a, "d")["t"][1] == 2

    os.rename(b.p("d", "s"), b.p("d", "t"))
    assert os.stat(b.p("e", "t2")).st_nlink == 1
    converge(a, b, ("d",), ("e",), what="B's rename over a linked file")
    assert os.stat(a.p("e", "t2")).st_nlink == 1


@pytest.mark.parametrize("mode", MODES)
def test_changes_made_while_the_server_restarted_show_on_a_mount_that_asks_nothing(
        services, mount_factory, mode):
    """The metaserver restarts; B chmods a file and creates one in a directory A holds
    whole. A, whose stat and lookup its caches answer (no call that would reconnect it),
    still gets them: it reconnects in the background and the changes are pushed."""
    with own_server(services, f"hostile-restart-{mode}") as dep:
        token = dep.new_user()
        b = mount_factory("local", token, dep, "--outage-timeout", "30")
        os.mkdir(b.p("d"))
        write_file(b.p("d", "f"), b"12345")
        a = mount_factory("local", token, dep, mode, "--outage-timeout", "30")
        view(a, "d")
        assert not os.path.exists(a.p("d", "new"))
        dep.kill()
        dep.start()
        os.chmod(b.p("d", "f"), 0o600)
        write_file(b.p("d", "new"), b"n")
        wait_until(lambda: os.stat(a.p("d", "f")).st_mode & 0o777 == 0o600, 20,
                   "B's chmod on A")
        wait_until(lambda: os.path.exists(a.p("d", "new")), 20, "B's create on A")


def test_xattrs_changed_while_disconnected_show_after_a_reset(services, mount_factory):
    """A's server is down while B adds an xattr to a file whose names A cached, and the
    change log is trimmed meanwhile: A's reset drops the cached xattr names too (it kept
    them: listxattr and getxattr said the new one did not exist, for good)."""
    with own_server(services, "hostile-xattr-reset") as dep:
        token = dep.new_user()
        a = mount_factory("local", token, dep, "--outage-timeout", "30")
        write_file(a.p("f"), b"1")
        os.setxattr(a.p("f"), "user.a", b"1")
        b = mount_factory("local", token, dep)
        write_file(b.p("early"), b"1")
        wait_until(lambda: os.path.exists(a.p("early")), 10, "B's create pushed to A")
        b.stop()
        assert os.listxattr(a.p("f")) == ["user.a"]
        dep.kill()
        with twin(services, dep, "hostile-xattr-reset-twin") as other:
            b = mount_factory("local", token, other)
            os.setxattr(b.p("f"), "user.b", b"2")
            b.stop()
        with psycopg.connect(dep.dsn) as conn:   # as the log's trim would
            conn.execute("DELETE FROM changes WHERE owner_id = (SELECT owner_id FROM"
                         " changes ORDER BY seq DESC LIMIT 1)")
        dep.start()
        wait_until(lambda: "change log reset" in a.log(), 30, "the reset")
        assert sorted(os.listxattr(a.p("f"))) == ["user.a", "user.b"]
        assert os.getxattr(a.p("f"), "user.b") == b"2"


def _renames(root: str) -> dict[str, object]:
    """Renames after which a listing must show the names' new inodes (run in ``root``):
    over a file that keeps another link (whose attributes are cached again before the
    listing), and an exchange. What each directory then shows: name -> (size, links, the
    bytes read there, whether the listing's inode number is the name's)."""
    from test_posix import RENAME_EXCHANGE, renameat2

    def j(*p: str) -> str:
        return os.path.join(root, *p)
    for d in ("d", "e", "f", "g"):
        os.mkdir(j(d))
    for name, data in (("d/t", b"target"), ("d/s", b"source"), ("f/x", b"xx"),
                       ("g/y", b"yyy")):
        write_file(j(name), data)
    os.link(j("d", "t"), j("e", "t2"))
    for d in ("d", "e", "f", "g"):
        for n in os.listdir(j(d)):
            os.stat(j(d, n))
    os.rename(j("d", "s"), j("d", "t"))
    os.listdir(j("e"))           # the replaced inode's attributes, cached again
    renameat2(j("f", "x"), j("g", "y"), RENAME_EXCHANGE)
    out: dict[str, object] = {}
    for d in ("d", "e", "f", "g"):
        for e in os.scandir(j(d)):
            st = e.stat(follow_symlinks=False)
            out[f"{d}/{e.name}"] = (st.st_size, st.st_nlink, read_file(e.path),
                                    e.inode() == st.st_ino)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_renames_show_the_new_inodes_at_their_names_in_the_listings(mount_factory, world_tmp,
                                                                    mode):
    """What a local disk shows after each kind of rename, this mount shows too (a sync
    mount listed the replaced inode at the target's name, from the cached entry, and the
    kernel then read its bytes there, and listed an exchange's names unswapped)."""
    local = os.path.join(world_tmp, "local")
    os.mkdir(local)
    expected = _renames(local)
    assert expected["d/t"] == (6, 1, b"source", True)
    assert expected["g/y"] == (2, 1, b"xx", True)
    a = mount_factory("local", None, None, mode)
    assert _renames(a.path) == expected
