"""Write-back's per-file cost: what a mount does not journal (real mounts and metaserver)."""

from __future__ import annotations

import os
import stat

from conftest import wait_until, write_file
from nimbusfs.mount.journal import summary
from nimbusfs.posix import changing
from test_writeback import own_server, pending, take_lease


def test_a_chmod_or_chown_that_changes_nothing_is_not_journalled(services, mount_factory):
    """``tar x`` as root chowns and chmods every directory it made to what it is already:
    those are not journalled (nor drained); a real change is, and reaches other mounts."""
    with own_server(services, "wb_noop") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        dep.kill()
        os.mkdir(a.p("d"))
        st = os.stat(a.p("d"))
        os.chown(a.p("d"), st.st_uid, st.st_gid)
        os.chmod(a.p("d"), stat.S_IMODE(st.st_mode))
        os.chmod(a.p("d"), 0o700)
        os.chmod(a.p("d"), 0o700)
        write_file(a.p("f"), b"x")   # its close writes the operations too
        assert summary(a.cache_dir).ops == 2   # the mkdir and one chmod
        assert os.stat(a.p("d")).st_mode & 0o7777 == 0o700
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "the drain")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert os.stat(b.p("d")).st_mode & 0o7777 == 0o700


def test_a_chown_that_clears_set_user_id_is_a_change():
    """A chown of a set-user-ID file to its own owner still clears the bit (Linux): kept."""
    suid = {"mode": stat.S_IFREG | 0o4755, "uid": 1, "gid": 2}
    assert changing(suid, {"uid": 1, "gid": 2}) == {"uid": 1, "gid": 2}
    plain = {**suid, "mode": stat.S_IFREG | 0o755}
    assert changing(plain, {"uid": 1, "gid": 2, "mode": 0o755, "mtime": 5}) == {"mtime": 5}
    assert changing(plain, {"uid": 3, "mode": 0o700}) == {"uid": 3, "mode": 0o700}
