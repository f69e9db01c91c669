"""The jobs of issue 4, one function each; each returns ``{metric: value}``.

Every job works in its own directory under ``t.root`` and takes a target from
``targets.py``; nothing here knows which kind of target it runs on.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack

from harness import MIB, pattern, timed
from probe import SyncProbe
from targets import Target


def write_stream(path: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to a new file and fsync it before closing."""
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def stream(mib: int, seed: bytes) -> Iterator[bytes]:
    return (pattern(i, seed) for i in range(mib))


def read_all(path: str) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while b := f.read(MIB):
            n += len(b)
    return n


# --- 1. sequential -------------------------------------------------------------------

def sequential(t: Target, mib: int) -> dict[str, float]:
    """Write ``mib`` MiB with fsync; read it back cold (caches emptied, remounted) and warm."""
    path = os.path.join(t.root, "seq.bin")
    mb = mib * MIB / 1e6
    t0 = time.monotonic()
    write_stream(path, stream(mib, b"seq"))
    t1 = time.monotonic()
    r = {"seq write+fsync MB/s": mb / (t1 - t0)}
    if t.uploads_after_close:
        done = t.settle()
        r["seq write until uploaded MB/s"] = mb / (done - t0)
        r["seq write: upload after fsync returned s"] = done - t1
    t.cold()
    dt = time.perf_counter()
    if read_all(path) != mib * MIB:
        raise AssertionError("cold read returned the wrong length")
    r["seq read cold MB/s"] = mb / (time.perf_counter() - dt)
    r["seq read warm MB/s"] = mb / timed(lambda: read_all(path))
    os.unlink(path)
    return r


# --- 2. random -----------------------------------------------------------------------

def _fio(path: str, mib: int, rw: str, bs: str, seconds: int) -> dict:
    argv = ["fio", "--name=bench", f"--filename={path}", f"--size={mib}M", f"--rw={rw}",
            f"--bs={bs}", "--ioengine=psync", "--time_based", f"--runtime={seconds}",
            "--output-format=json"]
    if rw.endswith("write"):
        argv.append("--end_fsync=1")
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    (job,) = json.loads(out[out.index("{"):])["jobs"]
    return job


def random_io(t: Target, mib: int, seconds: int) -> dict[str, float]:
    """fio, one thread, psync: random 4 KiB and 128 KiB reads (after ``cold``), then writes.

    IOPS, MB/s and completion-latency percentiles are fio's. Writes end with
    an fsync (``end_fsync``), which fio counts in the job's runtime, so write
    IOPS and MB/s include it; its duration (where a mount uploads) is the
    runtime beyond ``seconds`` and is reported too.
    """
    path = os.path.join(t.root, "rand.bin")
    write_stream(path, stream(mib, b"rand"))
    t.cold()
    r: dict[str, float] = {}
    for rw, bs in (("randread", "4k"), ("randread", "128k"),
                   ("randwrite", "4k"), ("randwrite", "128k")):
        job = _fio(path, mib, rw, bs, seconds)
        d = job["read" if rw == "randread" else "write"]
        pct = d["clat_ns"]["percentile"]
        label = f"rand {rw[4:]} {bs}"
        r[f"{label} IOPS"] = d["iops"]
        r[f"{label} MB/s"] = d["bw_bytes"] / 1e6
        r[f"{label} p50 us"] = pct["50.000000"] / 1e3
        r[f"{label} p99 us"] = pct["99.000000"] / 1e3
        if rw == "randwrite":
            r[f"{label} final fsync s"] = max(0.0, job["job_runtime"] / 1e3 - seconds)
    os.unlink(path)
    return r


# --- 3. small files ------------------------------------------------------------------

def small_files(t: Target, n: int) -> dict[str, float]:
    """``n`` files of 4 KiB: create+write+close, stat, read, ``ls -l``, delete."""
    d = os.path.join(t.root, "small")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:05d}") for i in range(n)]
    data = os.urandom(4096)

    def create() -> None:
        for p in names:
            with open(p, "wb") as f:
                f.write(data)

    def read() -> None:
        for p in names:
            with open(p, "rb") as f:
                if len(f.read()) != 4096:
                    raise AssertionError(f"{p}: short read")

    r = {"create+write+close files/s": n / timed(create),
         "stat files/s": n / timed(lambda: [os.stat(p) for p in names]),
         "read files/s": n / timed(read)}
    r[f"ls -l of {n} entries s"] = timed(lambda: subprocess.run(
        ["ls", "-l", d], check=True, stdout=subprocess.DEVNULL))
    r["delete files/s"] = n / timed(lambda: [os.unlink(p) for p in names])
    os.rmdir(d)
    return r


# --- 4. real trees -------------------------------------------------------------------

def trees(t: Target, tarball: str, repo: str) -> dict[str, float]:
    """Wall time of extracting a source tarball, of ``rm -rf`` of the extracted tree (once
    drained) and of ``git clone`` of a local repository.

    Where uploads go on after ``close`` (write-back, rclone), also the time
    until they are over, and the part of it after ``tar`` returned (the
    drain); for ``rm -rf`` the time until its removals are drained too.
    Where another mount can watch (``Target.second_mount``), a
    ``SyncProbe`` measures the sync latency from this mount to the other
    one during the extraction and its drain: a probe file every 0.25 s,
    about 1% more files than the tarball's on this mount.
    """
    d = os.path.join(t.root, "tree")
    os.mkdir(d)
    r: dict[str, float] = {}
    with t.second_mount() as b, ExitStack() as stack:
        probe = (stack.enter_context(SyncProbe(os.path.join(t.root, "probe"),
                                               os.path.join(b, "probe")))
                 if b else None)
        start = time.monotonic()
        subprocess.run(["tar", "xf", tarball, "-C", d], check=True)
        end = time.monotonic()
        r["tar x of source tarball s"] = end - start
        if t.uploads_after_close:
            done = t.settle()
            r["tar x until uploaded s"] = done - start
            r["tar x: drain after it returned s"] = done - end
        stack.close()   # the probes seen
        if probe:
            r.update(probe.result("sync A->B during tar x + drain"))
    extracted = [os.path.join(d, n) for n in os.listdir(d)]
    start = time.monotonic()
    subprocess.run(["rm", "-rf", "--", *extracted], check=True)
    r["rm -rf of the extracted tree s"] = time.monotonic() - start
    if t.uploads_after_close:
        r["rm -rf until drained s"] = t.settle() - start
    r["git clone s"] = timed(lambda: subprocess.run(
        ["git", "clone", "-q", f"file://{repo}", os.path.join(d, "clone")], check=True))
    return r


def make_repo(tarball: str, path: str, commits: int) -> str:
    """A bare repository: the tarball's files, then ``commits`` small edits (made once)."""
    if os.path.isdir(path):
        return path
    tmp = path + ".tmp"
    subprocess.run(["rm", "-rf", tmp], check=True)
    subprocess.run(["git", "init", "-q", "--bare", tmp], check=True)
    fi = subprocess.Popen(["git", "fast-import", "--quiet"], cwd=tmp, stdin=subprocess.PIPE)
    assert fi.stdin
    w = fi.stdin.write
    stamp = 1_700_000_000
    files: dict[str, bytes] = {}

    def commit(i: int, changes: dict[str, bytes]) -> None:
        msg = f"commit {i}\n".encode()
        w(f"commit refs/heads/main\ncommitter Bench <bench@example> {stamp + i} +0000\n"
          .encode())
        w(b"data %d\n%s" % (len(msg), msg))
        for name, data in changes.items():
            w(b"M 100644 inline %s\ndata %d\n%s\n" % (name.encode(), len(data), data))

    with tarfile.open(tarball) as tf:
        for m in tf:
            if m.isfile():
                f = tf.extractfile(m)
                assert f
                files[m.name] = f.read()
    commit(0, files)
    rng = random.Random(7)
    names = sorted(files)
    for i in range(1, commits + 1):
        changes = {}
        for name in rng.sample(names, min(3, len(names))):
            files[name] += f"# edit {i}\n".encode()
            changes[name] = files[name]
        commit(i, changes)
    fi.stdin.close()
    if fi.wait():
        raise RuntimeError("git fast-import failed")
    subprocess.run(["git", "-C", tmp, "symbolic-ref", "HEAD", "refs/heads/main"], check=True)
    subprocess.run(["git", "-C", tmp, "gc", "-q"], check=True)
    os.rename(tmp, path)
    return path


# --- 5. dedup ------------------------------------------------------------------------

def _edited(mib: int, seed: bytes, edits: list[tuple[int, bytes]]) -> Iterator[bytes]:
    """The stream ``seed`` with ``edits`` (offset, bytes; within one MiB) laid over it."""
    for i in range(mib):
        c = pattern(i, seed)
        for off, b in edits:
            if off // MIB == i:
                o = off % MIB
                c = c[:o] + b + c[o + len(b):]
        yield c


def _inserted(mib: int, seed: bytes, at: int) -> Iterator[bytes]:
    """The stream ``seed`` with one byte inserted at offset ``at``."""
    for i in range(mib):
        c = pattern(i, seed)
        if i == at // MIB:
            c = c[:at % MIB] + b"!" + c[at % MIB:]
        yield c


def dedup(t: Target, mib: int) -> dict[str, float]:
    """Bytes uploaded and stored by: a file written twice; a 1-byte insertion; ten versions.

    The file is ``mib`` MiB (issue: 1 GiB); the insertion is at ``mib``*100/1024
    MiB (issue: 100 MiB), and the versioned file has that size (issue: 100 MiB).
    Each save rewrites the whole file, as editors do.
    """
    if t.stored_bytes() is None:
        return {}
    seed = os.urandom(16)   # bytes no store has seen, whatever ran before
    small = max(1, mib * 100 // 1024)
    r: dict[str, float] = {}

    def measure(label: str, fn: Callable[[], object]) -> None:
        t.settle()
        s0, u0 = t.stored_bytes() or 0, t.uploaded_bytes() or 0
        fn()
        t.settle()
        s1, u1 = t.stored_bytes() or 0, t.uploaded_bytes() or 0
        r[f"dedup {label}: uploaded MiB"] = (u1 - u0) / MIB
        r[f"dedup {label}: stored MiB"] = (s1 - s0) / MIB

    a, b = os.path.join(t.root, "dedup-a"), os.path.join(t.root, "dedup-b")
    measure(f"{mib} MiB file, 1st copy", lambda: write_stream(a, stream(mib, seed)))
    measure("same file again", lambda: write_stream(b, stream(mib, seed)))
    measure(f"1 byte inserted at {small} MiB",
            lambda: write_stream(a, _inserted(mib, seed, small * MIB)))
    v = os.path.join(t.root, "dedup-v")
    vseed = seed + b"v"

    def versions() -> None:
        rng = random.Random(11)
        edits: list[tuple[int, bytes]] = []
        write_stream(v, stream(small, vseed))
        for _ in range(9):
            off = rng.randrange(small * MIB - 16)
            edits.append((off - off % MIB + min(off % MIB, MIB - 16), os.urandom(16)))
            write_stream(v, _edited(small, vseed, edits))
    measure(f"10 versions of {small} MiB, 16-byte edits", versions)
    for p in (a, b, v):
        os.unlink(p)
    return r
