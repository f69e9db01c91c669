"""Listings and attributes from the mount's caches, attacked with a second mount.

Mount A holds a directory whole (listed, every entry statted); mount B (or
the server) changes it; A must converge to what B sees, as a local directory
shows the change at once. Real mounts, a real metaserver and PostgreSQL.
"""

from __future__ import annotations

import os

import pytest

from conftest import wait_until, write_file

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
