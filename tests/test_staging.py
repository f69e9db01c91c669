"""Staging of dirty bytes: a small file's stay in memory until they need a file (real disk)."""

from __future__ import annotations

import os

from nimbusfs.blockstore.chunking import chunk_buf
from nimbusfs.cache import Staging
from nimbusfs.cache.staging import MEMORY_BYTES


def files(d) -> list[str]:
    return sorted(os.listdir(d))


def open_in(d) -> int:
    """This process's descriptors open on files in ``d`` (an unlinked staging file too)."""
    return sum(os.readlink(f"/proc/self/fd/{n}").startswith(str(d))
               for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}"))


def test_small_file_needs_no_staging_file_until_synced(tmp_path):
    """Bytes below ``MEMORY_BYTES`` make no file (a create, a name and an unlink per small
    file); ``sync`` (a write-back journal naming it) writes them to a durable file."""
    st = Staging(str(tmp_path), keep=True)
    data = os.urandom(4096)
    assert st.write(0, data) == len(data)
    st.write(6000, b"tail")
    assert files(tmp_path) == [] and st.path is None
    assert st.read(0, 4096) == data
    assert st.read(4096, 1904) == bytes(1904)   # the hole between the writes reads zeros
    whole = data + bytes(1904) + b"tail"
    assert st.chunk(0, len(whole)) == chunk_buf(whole, 0)
    st.sync()
    [name] = files(tmp_path)
    assert st.path == os.path.join(tmp_path, name)
    with open(st.path, "rb") as f:
        assert f.read() == whole
    st.write(0, b"again")                      # on the file from now on
    assert st.read(0, 5) == b"again"
    st.close()
    assert files(tmp_path) == []


def test_write_past_the_memory_bound_moves_the_bytes_to_a_file(tmp_path):
    """A file that grows past ``MEMORY_BYTES`` keeps its earlier bytes (moved to its file);
    an unkept one is unlinked at once."""
    st = Staging(str(tmp_path))
    head = os.urandom(1000)
    st.write(0, head)
    assert open_in(tmp_path) == 0
    big = os.urandom(MEMORY_BYTES)
    assert st.write(1000, big) == len(big)
    assert st.read(0, 1000 + len(big)) == head + big
    assert files(tmp_path) == [] and open_in(tmp_path) == 1   # unlinked: the fd holds it
    assert os.fstat(st.fd).st_size == 1000 + len(big)
    st.reset()
    st.close()
