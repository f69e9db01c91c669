"""Saves as programs make them: one open-write-close is one version."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import read_file, write_file


def _sizes(m, path: str) -> list[int]:
    """The sizes of the file's versions, newest first (``nimbusfs versions``)."""
    out = subprocess.run([sys.executable, "-m", "nimbusfs.cli", "versions", path,
                          "--server", m.deployment.address],
                         env=dict(m.services.env, NIMBUSFS_TOKEN=m.token), check=True,
                         capture_output=True, text=True).stdout
    return [int(line.split()[1]) for line in out.splitlines()[1:]]


def test_shell_save_is_one_version(mount_factory):
    """``echo x > f`` closes a duplicate of its descriptor before writing, which commits
    the empty file; its commit with the bytes replaces that version. ``: > f`` (a
    truncation alone) is a version of its own, committed when the close returns."""
    m = mount_factory("local")
    p = m.p("f")
    write_file(p, b"first\n")
    subprocess.run(["bash", "-c", 'echo second > "$0"', p], check=True)
    assert read_file(p) == b"second\n"
    assert _sizes(m, p) == [7, 6]
    subprocess.run(["bash", "-c", ': > "$0"', p], check=True)
    assert os.stat(p).st_size == 0
    assert _sizes(m, p) == [0, 7, 6]
    subprocess.run(["bash", "-c", 'echo third > "$0"', p], check=True)
    assert _sizes(m, p) == [6, 0, 7, 6]   # the empty version before it was another save's
