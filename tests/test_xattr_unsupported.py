"""Extended attributes the mount does not store answer EOPNOTSUPP, never ENODATA.

GNU ls -l asks each entry for ``security.selinux`` and
``system.posix_acl_access`` and stops asking on a device once one of them is
not supported (EOPNOTSUPP); ENODATA costs one FUSE request per name and
entry (10,000 entries: 20,000 requests). The mount keeps every other
``security.`` name (``tests/test_posix.py``: security.label).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from conftest import write_file

ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno is not None
    return e.value.errno


def test_acls_and_selinux_labels_are_not_supported(mount_factory):
    m = mount_factory("local")
    f, d = m.p("f"), m.p("d")
    write_file(f, b"x")
    os.mkdir(d)
    for p in (f, d):
        for name in (*ACL_NAMES, "security.selinux"):
            assert _errno(os.getxattr, p, name) == errno.EOPNOTSUPP, (p, name)
        # (The kernel answers the removal of a file's default ACL itself: 0.)
        for name in ("system.posix_acl_access", "security.selinux"):
            assert _errno(os.removexattr, p, name) == errno.EOPNOTSUPP, (p, name)
        assert _errno(os.setxattr, p, "security.selinux", b"u:r:t:s0") == errno.EOPNOTSUPP
        assert os.listxattr(p) == []
    # Other security names are stored, and absent ones are ENODATA.
    os.setxattr(f, "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    assert os.listxattr(f) == ["security.capability"]
    assert _errno(os.getxattr, f, "security.ima") == errno.ENODATA


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_ls_l_asks_once_per_device(mount_factory):
    """``ls -l`` of 50 entries makes 2 xattr calls in all (it made 2 per entry)."""
    m = mount_factory("local")
    for i in range(50):
        os.mknod(m.p(f"f{i}"))
    out = subprocess.run(["strace", "-f", "-e", "trace=getxattr,lgetxattr", "-o", "/dev/stderr",
                          "ls", "-l", m.path], capture_output=True, text=True, check=True)
    calls = [line for line in out.stderr.splitlines() if "xattr(" in line]
    assert len(calls) <= 3, calls
