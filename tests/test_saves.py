"""Saves as programs make them: one open-write-close is one version."""

from __future__ import annotations

import os
import subprocess

from conftest import read_file, version_sizes, write_file


def test_shell_save_is_one_version(mount_factory):
    """``echo x > f`` closes a duplicate of its descriptor before writing, which commits
    the empty file; its commit with the bytes replaces that version. ``: > f`` (a
    truncation alone) is a version of its own, committed when the close returns."""
    m = mount_factory("local")
    p = m.p("f")
    write_file(p, b"first\n")
    subprocess.run(["bash", "-c", 'echo second > "$0"', p], check=True)
    assert read_file(p) == b"second\n"
    assert version_sizes(m, p) == [7, 6]
    subprocess.run(["bash", "-c", ': > "$0"', p], check=True)
    assert os.stat(p).st_size == 0
    assert version_sizes(m, p) == [0, 7, 6]
    subprocess.run(["bash", "-c", 'echo third > "$0"', p], check=True)
    assert version_sizes(m, p) == [6, 0, 7, 6]   # the empty version before it was another save's
