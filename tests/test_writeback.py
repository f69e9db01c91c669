"""Write-back mode: close is local and durable, the journal drains in order, crashes lose nothing.

Real mounts, a real metaserver and PostgreSQL. A mount is crashed with
SIGKILL; a metaserver is stopped with SIGKILL and started again on the same
address; two metaservers on one database stand for a server one mount
cannot reach while another mount can.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator

import blake3
import pytest
import trio

from conftest import read_file, start_metaserver, status, wait_until, write_file
from nimbusfs.blockstore import block_hash
from nimbusfs.blockstore.local import LocalStore
from nimbusfs.mount.journal import summary
from nimbusfs.mount.writeback import BATCH_FILES


def pattern(seed: bytes, size: int) -> bytes:
    return blake3.blake3(seed).digest(length=size)


def crash(m) -> None:
    """kill -9 the mount process and detach its dead FUSE mount."""
    m.proc.kill()
    m.proc.wait()
    m.proc = None
    subprocess.run(["umount", "-l", m.path], check=False)


def _read_or_none(path: str) -> bytes | None:
    try:
        return read_file(path)
    except FileNotFoundError:
        return None


def pending(m) -> tuple[int, int]:
    """(files, bytes) waiting in the mount's journal."""
    s = summary(m.cache_dir)
    return (s[0], s[1]) if s else (0, 0)


@contextlib.contextmanager
def own_server(services, name: str) -> Iterator:
    """A metaserver of the test's own on the shared database and block directory (so that
    killing and restarting it touches no other test), killed at the end."""
    dep = start_metaserver(services.emb, name, "file://" + services.emb.path("blocks"),
                           services.env)
    try:
        yield dep
    finally:
        dep.kill()


def take_lease(m, files: dict[str, bytes] | None = None) -> None:
    """A first file (and ``files``, in the root), drained: the mount holds a lease of
    inode numbers, and lists its root so that it knows the names there are free without
    asking (creates need no server)."""
    for name, data in {"first": b"1", **(files or {})}.items():
        write_file(m.p(name), data)
    wait_until(lambda: pending(m) == (0, 0), 30, "the first drain")
    os.listdir(m.p())


def drained_dir(m, d: str, name: str, data: bytes) -> None:
    """Directory ``d`` holding the file ``name``, drained and listed: the mount knows
    its entries without asking (a test then cuts the server off)."""
    os.mkdir(m.p(d))
    write_file(m.p(d, name), data)
    wait_until(lambda: pending(m) == (0, 0), 30, "the setup's drain")
    os.listdir(m.p(d))


def server_view(dep, token: str, *names: str) -> list[dict]:
    """What the metaserver holds for names in the volume's root: attrs and versions."""
    from nimbusfs.client import connect

    async def run() -> list[dict]:
        out = []
        async with connect(dep.address, token, "test") as c:
            for name in names:
                a = await c.call("lookup", parent=c.info["root"], name=name.encode())
                a["versions"] = len(await c.call("versions", ino=a["ino"]))
                out.append(a)
        return out
    return trio.run(run)


@contextlib.contextmanager
def twin(services, dep, name: str) -> Iterator:
    """A second metaserver on ``dep``'s database (the server is stateless), killed at the
    end."""
    from conftest import Deployment

    info = services.emb.path("run", f"server-{name}.json")
    argv = list(dep.argv)
    argv[argv.index("--info-file") + 1] = info
    log_path = services.emb.path("logs", f"metaserver-{name}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=dep.env)
    wait_until(lambda: os.path.exists(info) or proc.poll() is not None, 60, "metaserver")
    with open(info) as f:
        bound = json.load(f)
    other = Deployment(dep.dsn, bound["address"], dep.blocks, proc, argv, log_path, dep.env,
                       bound["http"])
    try:
        yield other
    finally:
        other.kill()


def test_close_is_local_reads_see_pending_and_other_mounts_get_it(mount_factory):
    """Read-your-writes on the writer; the drain brings every file to another mount."""
    a = mount_factory("local", None, None, "--writeback")
    b = mount_factory("local", a.token)
    files = {f"f{i}": pattern(b"%d" % i, size)
             for i, size in enumerate([0, 1, 4096, 70_000, 5 << 20, 20 << 20])}
    for name, data in files.items():
        write_file(a.p(name), data)
        assert os.stat(a.p(name)).st_size == len(data)
        assert read_file(a.p(name)) == data
    for name, data in files.items():
        wait_until(lambda n=name, d=data: os.path.exists(b.p(n)) and read_file(b.p(n)) == d,
                   60, f"{name} on the other mount")
    wait_until(lambda: pending(a) == (0, 0), 30, "the journal to empty")
    a.remount(drop_cache=True)
    assert {n: read_file(a.p(n)) for n in files} == files


def test_a_renamed_pending_file_reaches_other_mounts_with_its_content(mount_factory):
    """Write a temporary file, rename it over the original: atomic for other mounts too.

    The rename is journalled after the pending file's commit (one drain order),
    so another mount never sees the new name without the content (it would see
    an empty file).
    """
    a = mount_factory("local", None, None, "--writeback")
    b = mount_factory("local", a.token)
    old = b"old"
    write_file(a.p("doc"), old)
    wait_until(lambda: os.path.exists(b.p("doc")), 30, "the first version on B")
    for i in range(3):
        data = pattern(b"save%d" % i, 24 << 20)
        write_file(a.p("doc.tmp"), data)
        os.rename(a.p("doc.tmp"), a.p("doc"))
        # B's kernel learns of the rename by a push: until then it shows the
        # old file (or ENOENT: its cached entry names the replaced inode);
        # from then on, the whole new one (never an empty file).
        wait_until(lambda o=old: _read_or_none(b.p("doc")) not in (o, None), 30,
                   "the rename on B")
        assert read_file(b.p("doc")) == data, i
        old = data


def test_a_file_rewritten_while_it_drains_keeps_its_last_close_across_a_crash(mount_factory):
    """Each close of a file being drained is journalled as its own record: after kill -9
    and the replay, the file holds what its last close wrote, on the server too."""
    a = mount_factory("local", None, None, "--writeback")
    for i in range(300):
        write_file(a.p("f"), pattern(b"r%d" % i, 1000 + 37 * i))
    last = pattern(b"r%d" % i, 1000 + 37 * i)
    crash(a)
    a.start()
    assert read_file(a.p("f")) == last
    b = mount_factory("local", a.token)
    assert read_file(b.p("f")) == last


EXTRACT = r"""
import os, sys, tarfile
tar, dest, done = sys.argv[1:]
with tarfile.open(tar) as t, open(done, "a") as log:
    for m in t:
        path = os.path.join(dest, m.name)
        if m.isdir():
            os.mkdir(path)
            os.chmod(path, m.mode)
            log.write("dir " + m.name + "\n")   # its mkdir and chmod returned
        else:
            # As git writes a file: to NAME.lock, renamed over NAME (over a
            # placeholder for every third file), and a scratch file unlinked.
            data = t.extractfile(m).read()
            if len(m.name) % 3 == 0:
                with open(path, "wb") as f:
                    f.write(b"placeholder")
            with open(path + ".tmp", "wb") as f:
                f.write(b"scratch")
            os.unlink(path + ".tmp")
            with open(path + ".lock", "wb") as f:
                f.write(data)
            os.rename(path + ".lock", path)
            log.write("file " + m.name + "\n")   # only once its rename returned
        log.flush()
        os.fsync(log.fileno())
"""


def _tarball(rng: random.Random) -> tuple[bytes, dict[str, bytes]]:
    """A tarball of small files (journalled inline), larger ones (named staging files)
    and one big enough to be uploaded ahead while it is written."""
    files: dict[str, bytes] = {}
    for i in range(150):
        size = rng.choice([rng.randrange(0, 2000), rng.randrange(2000, 60_000),
                           rng.randrange(70_000, 1 << 20)])
        files[f"d{i % 7}/f{i}"] = pattern(b"t%d" % i, size)
    files["d0/big"] = pattern(b"big", 40 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        names = list(files)
        rng.shuffle(names)
        names.insert(rng.randrange(len(names)), names.pop(names.index("d0/big")))
        for d in sorted({n.split("/")[0] for n in names}):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o750
            t.addfile(info)
            sub = tarfile.TarInfo(d + "/sub")   # a directory made in a new one
            sub.type = tarfile.DIRTYPE
            sub.mode = 0o705
            t.addfile(sub)
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(files[n])
            t.addfile(info, io.BytesIO(files[n]))
    return buf.getvalue(), files


def _crash_rounds(mount_factory, world_tmp: str, rounds: int) -> None:
    """kill -9 of the mount during an extraction, at a random point, ``rounds`` times.

    Each file is written as git does (``EXTRACT``: a lock file renamed over
    it, a scratch file unlinked). After the remount (journal replayed and
    drained before it answers), every file whose rename returned before the
    last one holds its bytes (a close makes every operation journalled before
    it durable; the last rename may be lost with the crash, then its lock
    file holds the bytes), no commit was applied twice (that would leave a
    conflicted copy: its base would be stale), no journalled create, rename
    or unlink either (a rename or unlink applied again is refused and logged
    in conflicts.jsonl), and another mount sees the same files. The
    directories (journalled mkdir and chmod) made before the last file whose
    close returned are there with their mode, none twice.
    """
    rng = random.Random(os.environ.get("NIMBUS_SEED", "16"))
    data, files = _tarball(rng)
    tar = os.path.join(world_tmp, "t.tar")
    with open(tar, "wb") as f:
        f.write(data)
    m = mount_factory("local", None, None, "--writeback")
    for r in range(rounds):
        dest = m.p(f"r{r}")
        os.mkdir(dest)
        done = os.path.join(world_tmp, f"done{r}")
        open(done, "w").close()
        proc = subprocess.Popen([sys.executable, "-c", EXTRACT, tar, dest, done],
                                stderr=subprocess.DEVNULL)
        at = rng.randrange(1, len(files))   # crash once this many files are in
        wait_until(lambda d=done, n=at, p=proc: read_file(d).count(b"file ") >= n
                   or p.poll() is not None, 300, "the extraction")
        crash(m)
        proc.wait()
        m.start()
        log = [line.split(" ", 1) for line in read_file(done).decode().splitlines()]
        closed = [name for kind, name in log if kind == "file"]
        assert closed, "nothing was extracted before the crash"
        for name in closed[:-1]:
            assert read_file(os.path.join(dest, name)) == files[name], (r, name)
        tail = os.path.join(dest, closed[-1])
        assert files[closed[-1]] in (_read_or_none(tail), _read_or_none(tail + ".lock")), r
        last = max(i for i, (kind, _) in enumerate(log) if kind == "file")
        for kind, name in log[:last]:
            if kind == "dir":
                mode = os.stat(os.path.join(dest, name)).st_mode & 0o777
                assert mode == (0o705 if name.endswith("/sub") else 0o750), (r, name)
        dirs = {os.path.relpath(d, dest) for d, _, _ in os.walk(dest)} - {"."}
        assert dirs <= {n.split("/")[0] for n in files} | {
            n.split("/")[0] + "/sub" for n in files}, (r, dirs)
        # Creates are journalled with their files: none is doubled (a conflicted
        # copy) or made twice, and no file appears that was not in the tarball.
        present = {os.path.relpath(os.path.join(d, n), dest)
                   for d, _, fs in os.walk(dest) for n in fs}
        extra = present - set(files)   # those of the last file or the one in flight
        assert set(closed[:-1]) <= present, r
        assert len(extra) <= 3 and {n.rsplit(".", 1)[0] for n in extra} <= (
            set(files) - set(closed[:-1])), (r, extra)
        assert not os.path.exists(os.path.join(m.cache_dir, "conflicts.jsonl")), r
    wait_until(lambda: pending(m) == (0, 0), 60, "the journal to empty")
    other = mount_factory("local", m.token)
    for r in range(rounds):   # the server holds what the writer shows
        tree = {os.path.relpath(os.path.join(d, n), m.p(f"r{r}"))
                for d, _, fs in os.walk(m.p(f"r{r}")) for n in fs}
        assert {os.path.relpath(os.path.join(d, n), other.p(f"r{r}"))
                for d, _, fs in os.walk(other.p(f"r{r}")) for n in fs} == tree, r
        for name in tree:
            assert read_file(other.p(f"r{r}", name)) == read_file(m.p(f"r{r}", name)), name


def test_kill_during_extraction(mount_factory, world_tmp):
    _crash_rounds(mount_factory, world_tmp, 3)


@pytest.mark.soak
def test_kill_during_extraction_20_rounds(mount_factory, world_tmp):
    _crash_rounds(mount_factory, world_tmp, 20)


def test_server_down_writes_continue_and_drain_once(services, mount_factory):
    """Closes return while the metaserver is down; after its restart each file has one version."""
    with own_server(services, "wb_outage") as dep:
        m = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        names = [f"f{i}" for i in range(20)]
        fds = [os.open(m.p(n), os.O_RDWR | os.O_CREAT) for n in names]
        dep.kill()
        for i, fd in enumerate(fds):
            os.write(fd, pattern(b"o%d" % i, 100_000 * (i % 3) + 10))
            os.fsync(fd)
            os.close(fd)
        assert pending(m)[0] == len(names)
        dep.start()
        wait_until(lambda: pending(m) == (0, 0), 60, "the drain after the restart")
        view = server_view(dep, m.token, *names)
        assert [a["size"] for a in view] == [100_000 * (i % 3) + 10 for i in range(len(names))]
        assert [a["versions"] for a in view] == [1] * len(names)
        m.remount(drop_cache=True)
        for i, n in enumerate(names):
            assert read_file(m.p(n)) == pattern(b"o%d" % i, 100_000 * (i % 3) + 10)


def test_the_next_batch_is_prepared_while_the_server_has_not_answered(services, mount_factory):
    """With a full batch waiting, the drainer uploads the next batch's blocks while the
    batch before it waits for the server (here: down), and sends it once that one is
    answered: after the restart every file is committed once, in order."""
    with own_server(services, "wb_flight") as dep:
        m = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(m)
        store = LocalStore(services.emb.path("blocks"))
        names = ["a", *(f"b{i}" for i in range(BATCH_FILES))]
        data = {n: pattern(n.encode(), 1000) for n in names}   # one block each
        dep.kill()
        write_file(m.p("a"), data["a"])
        wait_until(lambda: store.exists(block_hash(data["a"])), 30, "a's batch prepared")
        for n in names[1:]:
            write_file(m.p(n), data[n])
        wait_until(lambda: store.exists(block_hash(data["b0"])), 30,
                   "the next batch prepared while a's waits for the server")
        assert pending(m)[0] == len(names)
        dep.start()
        wait_until(lambda: pending(m) == (0, 0), 60, "the drain after the restart")
        assert [(v["size"], v["versions"]) for v in server_view(dep, m.token, *names)] == [
            (1000, 1)] * len(names)
        m.remount(drop_cache=True)
        assert {n: read_file(m.p(n)) for n in names} == data


def test_pending_change_loses_to_another_mount_as_a_conflicted_copy(services, mount_factory):
    """A's change waits (its server is down, then A crashes); B changes the file; A's replay
    makes A's bytes a conflicted copy beside B's version: nothing is lost."""
    with (own_server(services, "wb_conflict") as dep,
          twin(services, dep, "wb_conflict_twin") as other):
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        b = mount_factory("local", a.token, other)
        write_file(a.p("f"), b"base")
        wait_until(lambda: os.path.exists(b.p("f")) and read_file(b.p("f")) == b"base", 30,
                   "the first version on B")
        fd = os.open(a.p("f"), os.O_WRONLY | os.O_TRUNC)
        dep.kill()
        os.write(fd, b"mine")
        os.close(fd)
        assert read_file(a.p("f")) == b"mine"
        crash(a)
        write_file(b.p("f"), b"theirs")
        dep.start()
        a.start()
        assert read_file(a.p("f")) == b"theirs"
        copies = [n for n in os.listdir(a.p()) if n.startswith("f (conflicted copy")]
        assert len(copies) == 1, os.listdir(a.p())
        assert read_file(a.p(copies[0])) == b"mine"
        wait_until(lambda: copies[0] in os.listdir(b.p()), 30, "the copy on B")


def test_limit_reached_writes_wait_then_continue(services, mount_factory):
    """Past --writeback-limit writes wait (never fail) until the drainer catches up."""
    with own_server(services, "wb_limit") as dep:
        m = mount_factory("local", None, dep, "--writeback", "--writeback-limit", "1M",
                          "--outage-timeout", "2")
        n = 6
        fds = [os.open(m.p(f"f{i}"), os.O_RDWR | os.O_CREAT) for i in range(n)]
        dep.kill()
        written: list[int] = []

        def writer() -> None:
            for i, fd in enumerate(fds):
                os.write(fd, pattern(b"l%d" % i, 512 << 10))
                os.close(fd)
                written.append(i)

        t = threading.Thread(target=writer)
        t.start()
        wait_until(lambda: pending(m)[1] > 1 << 20, 30, "the journal past the limit")
        assert t.is_alive() and len(written) < n
        dep.start()
        t.join(120)
        assert not t.is_alive() and written == list(range(n))
        wait_until(lambda: pending(m) == (0, 0), 60, "the drain")
        for i in range(n):
            assert read_file(m.p(f"f{i}")) == pattern(b"l%d" % i, 512 << 10)


def test_creates_need_no_server_and_reach_other_mounts_once_drained(services, mount_factory):
    """Namespace write-back: with the metaserver down, files are created, written,
    looked up and read on the writer at once (leased inode numbers, a journalled create);
    a kill -9 before the restart loses none: after it another mount sees them with
    their bytes, each created once."""
    with own_server(services, "wb_ns") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        os.mkdir(a.p("d"))
        take_lease(a)
        dep.kill()
        files = {f"d/n{i}": pattern(b"n%d" % i, 10 + 997 * i) for i in range(40)}
        for name, data in files.items():
            write_file(a.p(name), data)
        assert not os.path.exists(a.p("d/none"))
        for name, data in files.items():
            assert os.stat(a.p(name)).st_size == len(data)
            assert read_file(a.p(name)) == data
        assert pending(a)[0] == len(files)
        crash(a)
        dep.start()
        a.start()   # replays and drains before it answers
        assert pending(a) == (0, 0)
        write_file(a.p("d/late"), b"late")   # listed at once (drained or not)
        assert sorted(os.listdir(a.p("d"))) == sorted([n[2:] for n in files] + ["late"])
        os.unlink(a.p("d/late"))
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert sorted(os.listdir(b.p("d"))) == sorted(n[2:] for n in files)
        for name, data in files.items():
            assert read_file(b.p(name)) == data, name
        view = server_view(dep, a.token, "first")
        assert view[0]["versions"] == 1


def test_mkdir_and_setattr_need_no_server_and_reach_other_mounts_once_drained(
        services, mount_factory):
    """Namespace write-back of directories and attributes: with the metaserver down, a
    directory tree is made, its modes and times set, files created in it, all seen at
    once on the writer; after the restart another mount sees the same, each made once."""
    with own_server(services, "wb_dirs") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        dep.kill()
        os.mkdir(a.p("top"), 0o700)
        os.mkdir(a.p("top", "sub"))
        write_file(a.p("top", "sub", "f"), b"in a new directory")
        os.chmod(a.p("top", "sub"), 0o751)
        os.utime(a.p("top", "sub"), ns=(1_000_000_000, 2_000_000_000))
        os.chmod(a.p("first"), 0o604)   # a closed, committed file
        os.chmod(a.p("top"), 0o755)
        assert sorted(os.listdir(a.p("top"))) == ["sub"]
        assert os.listdir(a.p("top", "sub")) == ["f"]
        st = os.stat(a.p("top", "sub"))
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o751, 2_000_000_000)
        assert os.stat(a.p("top")).st_mode & 0o7777 == 0o755
        assert os.stat(a.p("first")).st_mode & 0o7777 == 0o604
        assert read_file(a.p("top", "sub", "f")) == b"in a new directory"
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        st = os.stat(b.p("top", "sub"))
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o751, 2_000_000_000)
        assert os.stat(b.p("top")).st_mode & 0o7777 == 0o755
        assert os.stat(b.p("first")).st_mode & 0o7777 == 0o604
        assert read_file(b.p("top", "sub", "f")) == b"in a new directory"
        assert [n for n in os.listdir(b.p()) if n.startswith("top")] == ["top"]
        assert os.stat(a.p("top")).st_ino == os.stat(b.p("top")).st_ino


def test_a_name_taken_meanwhile_keeps_the_made_directory_as_a_conflicted_copy(
        services, mount_factory):
    """A makes directory ``d`` (a file in it) while its server is down; B makes ``d``
    meanwhile: after A's drain B's ``d`` is unchanged and A's directory, with its file,
    is kept beside it under the conflicted-copy name."""
    with (own_server(services, "wb_dtaken") as dep,
          twin(services, dep, "wb_dtaken_twin") as other):
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        b = mount_factory("local", a.token, other, "--outage-timeout", "2")
        take_lease(a)
        dep.kill()
        os.mkdir(a.p("d"))
        write_file(a.p("d", "mine"), b"mine")
        os.mkdir(b.p("d"))
        write_file(b.p("d", "theirs"), b"theirs")
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")

        def copies(m) -> list[str]:
            return [n for n in os.listdir(m.p()) if n.startswith("d (conflicted copy")]
        wait_until(lambda: len(copies(b)) == 1, 30, "the copy on B")
        assert os.listdir(b.p("d")) == ["theirs"]
        assert read_file(b.p(copies(b)[0], "mine")) == b"mine"
        wait_until(lambda: len(copies(a)) == 1, 30, "the copy on A")
        assert read_file(a.p(copies(a)[0], "mine")) == b"mine"


def test_a_name_taken_meanwhile_keeps_the_created_file_as_a_conflicted_copy(services,
                                                                            mount_factory):
    """A creates ``x`` while its server is down; B creates ``x`` meanwhile: after A's drain
    B's file is ``x`` and A's is kept beside it under the conflicted-copy name."""
    with (own_server(services, "wb_taken") as dep,
          twin(services, dep, "wb_taken_twin") as other):
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        b = mount_factory("local", a.token, other, "--outage-timeout", "2")
        take_lease(a)
        dep.kill()
        write_file(a.p("x"), b"mine")
        assert read_file(a.p("x")) == b"mine"
        write_file(b.p("x"), b"theirs")
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")

        def copies(m) -> list[str]:
            return [n for n in os.listdir(m.p()) if n.startswith("x (conflicted copy")]
        wait_until(lambda: len(copies(b)) == 1, 30, "the copy on B")
        assert read_file(b.p(copies(b)[0])) == b"mine"
        assert read_file(b.p("x")) == b"theirs"
        wait_until(lambda: len(copies(a)) == 1 and _read_or_none(a.p("x")) == b"theirs", 30,
                   "the copy and B's file on A")
        assert read_file(a.p(copies(a)[0])) == b"mine"
        assert any(e.get("kept_as") == copies(a)[0] for e in a.records("conflicts.jsonl"))


def test_fsync_of_a_directory_makes_its_new_entries_durable(services, mount_factory):
    """A journalled mkdir is durable once an fsync of its parent directory returned (as
    on a local disk, and as an application that fsyncs the directory counts on)."""
    with own_server(services, "wb_fsyncdir") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        dep.kill()
        fd = os.open(a.p(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(20):
                os.mkdir(a.p(f"d{i}"))
                os.fsync(fd)
        finally:
            os.close(fd)
        crash(a)
        dep.start()
        a.start()
        assert sorted(n for n in os.listdir(a.p()) if n.startswith("d")) == sorted(
            f"d{i}" for i in range(20))


def pending_behind_a_mkdir(a, dep) -> None:
    """``f`` created, written and closed on ``a`` while its server is down, journalled
    behind a mkdir: the drainer sends a batch of the mkdir alone, again and again, so
    ``f`` stays pending with its lock free (in no batch)."""
    dep.kill()
    os.mkdir(a.p("d"))
    wait_until(lambda: "write-back of 1 records waits" in a.log(), 60, "the mkdir's batch")
    write_file(a.p("f"), b"pending")


def test_utimens_of_a_file_created_here_and_closed_sets_its_mtime(services, mount_factory):
    """utimens of a file created here, closed and not drained yet: shown at once and
    committed with it (the commit carries the file's mtime: it was left at the close's)."""
    with own_server(services, "wb_utime") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        pending_behind_a_mkdir(a, dep)
        os.utime(a.p("f"), ns=(1_000_000_000, 2_000_000_000))
        assert os.stat(a.p("f")).st_mtime_ns == 2_000_000_000
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert os.stat(b.p("f")).st_mtime_ns == 2_000_000_000


def test_attributes_set_on_a_closed_pending_file_survive_a_crash(services, mount_factory):
    """chmod and utimens of a file created here and closed (journalled, not drained)
    are kept for its first commit: a later close that returned makes them durable too,
    as the journalled operations before it are; after kill -9 the file has them."""
    with own_server(services, "wb_deferred") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        pending_behind_a_mkdir(a, dep)
        os.chmod(a.p("f"), 0o751)
        os.utime(a.p("f"), ns=(1_000_000_000, 2_000_000_000))
        st = os.stat(a.p("f"))
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o751, 2_000_000_000)
        write_file(a.p("g"), b"a later close")
        crash(a)
        dep.start()
        a.start()   # replays and drains before it answers
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        st = os.stat(b.p("f"))
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o751, 2_000_000_000)
        assert read_file(b.p("f")) == b"pending"


def test_a_change_the_server_cannot_store_is_einval_not_a_refused_drain(mount_factory):
    """chown to a uid the server does not store (2**31 and above) is EINVAL at once, as
    on a sync mount. Journalled, it returned 0 and was dropped at the drain (the server
    refuses it), and one in a batch with others made the server refuse the whole batch
    (its arguments are checked before any op applies)."""
    a = mount_factory("local", None, None, "--writeback")
    b = mount_factory("local", a.token)
    os.mkdir(a.p("d"))
    write_file(a.p("d", "f"), b"kept")
    with pytest.raises(OSError) as e:
        os.chown(a.p("d"), 3_000_000_000, -1)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.chown(a.p("d", "f"), -1, 3_000_000_000)
    assert e.value.errno == errno.EINVAL
    wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
    assert read_file(a.p("d", "f")) == b"kept"
    wait_until(lambda: _read_or_none(b.p("d", "f")) == b"kept", 30, "B sees d/f")


def test_a_create_by_a_uid_the_server_cannot_store_is_einval(mount_factory):
    """A process whose uid is 2**31 or more creating a file or a directory: EINVAL at
    once, as on a sync mount, instead of a create the drain's batch cannot carry (the
    server refuses the whole batch: the other files in it saved aside)."""
    a = mount_factory("local", None, None, "--writeback", "--allow-other")
    b = mount_factory("local", a.token)
    os.chmod(a.p(), 0o777)
    write_file(a.p("other"), b"another file")
    for code in ("open(p + '/f', 'w').close()", "os.mkdir(p + '/d')"):
        run = subprocess.run(["/usr/bin/python3", "-c", f"import os, sys; p = sys.argv[1]; {code}",
                              a.p()], user=3_000_000_000, group=3_000_000_000,
                             capture_output=True, text=True)
        assert "Errno 22" in run.stderr, run.stderr
    wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
    wait_until(lambda: _read_or_none(b.p("other")) == b"another file", 30, "B sees other")


def test_a_directory_chmodded_then_given_a_subdirectory_shows_both_once_drained(
        services, mount_factory):
    """chmod of a directory, then a mkdir in it, drained in one batch: the directory's
    attributes this mount shows afterwards count the new subdirectory and its time (the
    answer to the chmod is the directory before the mkdir), as another mount's do."""
    with own_server(services, "wb_nlink") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        os.mkdir(a.p("d"))
        wait_until(lambda: pending(a) == (0, 0), 30, "the first drain")
        os.listdir(a.p("d"))
        dep.kill()   # the two operations drain together
        os.chmod(a.p("d"), 0o750)
        os.mkdir(a.p("d", "x"))
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        there = os.stat(b.p("d"))
        here = os.stat(a.p("d"))
        assert (here.st_nlink, here.st_mode) == (there.st_nlink, there.st_mode) == (
            3, 0o40750)
        assert here.st_mtime_ns >= os.stat(a.p("d", "x")).st_ctime_ns


def _errno_within(fn, bound: float) -> int:
    """Run ``fn`` in a thread; its OSError's errno (0: it returned). Fails if it is still
    blocked after ``bound`` seconds (the thread is a daemon: the test cannot hang)."""
    out: list[int] = []

    def run() -> None:
        try:
            fn()
            out.append(0)
        except OSError as e:
            out.append(e.errno)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    assert not t.is_alive(), f"{fn} still blocked after {bound} s"
    return out[0]


def test_a_request_waiting_for_the_drain_fails_with_eio_through_an_outage(services,
                                                                          mount_factory):
    """With the metaserver down, a setxattr of a pending file and of a pending directory
    (requests that name them to the server) wait for their drain no longer than the
    outage timeout: EIO, the journal untouched; after the restart it drains and the
    same requests succeed."""
    with own_server(services, "wb_hang") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        dep.kill()
        write_file(a.p("f"), b"pending")
        os.mkdir(a.p("d"))
        for name in ("f", "d"):
            assert _errno_within(lambda n=name: os.setxattr(a.p(n), "user.k", b"v"), 8
                                 ) == errno.EIO
        assert read_file(a.p("f")) == b"pending" and os.path.isdir(a.p("d"))
        assert pending(a)[0] == 2
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "the drain after the restart")
        for name in ("f", "d"):
            os.setxattr(a.p(name), "user.k", b"v")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert sorted(os.listdir(b.p())) == ["d", "f", "first"]
        assert read_file(b.p("f")) == b"pending"
        assert os.getxattr(b.p("d"), "user.k") == b"v"


def test_a_journal_of_a_later_format_is_refused(mount_factory):
    """A mount refuses to start on a journal whose format (``user_version``) it does not
    know, saying so, rather than replay part of it; one of its own format, or of before
    the format was written (0), is opened."""
    import sqlite3

    from nimbusfs.mount.journal import JOURNAL_NAME, VERSION

    m = mount_factory("local", None, None, "--writeback")
    write_file(m.p("f"), b"kept")
    m.stop()
    path = os.path.join(m.cache_dir, JOURNAL_NAME)

    def set_version(v: int) -> None:
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {v}")

    set_version(VERSION + 1)
    r = subprocess.run(
        [sys.executable, "-m", "nimbusfs.cli", "mount", m.path, "--foreground", "--server",
         m.deployment.address, "--cache-dir", m.cache_dir, "--writeback"],
        env=dict(m.services.env, NIMBUSFS_TOKEN=m.token), capture_output=True, text=True,
        timeout=120)
    assert r.returncode != 0 and not os.path.ismount(m.path)
    assert f"has format {VERSION + 1}" in r.stderr, r.stderr
    set_version(0)
    m.start()
    assert read_file(m.p("f")) == b"kept"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == VERSION


def test_a_record_the_server_refuses_as_a_whole_does_not_block_or_refuse_the_others(
        services, mount_factory, world_tmp):
    """A journal record the server refuses whatever the batch (arguments it does not take,
    as from a journal of another version) is found, retried a few times, then logged in
    conflicts.jsonl and removed; the records journalled after it, in the same batch at
    first, drain (at the replay, which comes up)."""
    import sqlite3
    import time

    import msgpack

    from nimbusfs.mount.journal import JOURNAL_NAME

    with own_server(services, "wb_refused") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        ino = os.stat(a.p("first")).st_ino
        mode = os.stat(a.p("first")).st_mode
        dep.kill()
        files = {f"n{i}": pattern(b"r%d" % i, 10 + 70_001 * i) for i in range(3)}
        for name, data in files.items():
            write_file(a.p(name), data)
        crash(a)
        with sqlite3.connect(os.path.join(a.cache_dir, JOURNAL_NAME)) as db:
            first = db.execute("SELECT min(seq) FROM pending").fetchone()[0]
            db.execute("INSERT INTO ops VALUES (?, ?, 'setattr', ?, ?, ?)", (
                first - 1, "f" * 32, msgpack.packb({"ino": ino, "mode": 0o600, "colour": 1}),
                msgpack.packb({"mode": 0o600, "ctime": time.time_ns()}), time.time()))
        dep.start()
        a.start()   # replays and drains before it answers
        assert pending(a) == (0, 0)
        assert not os.path.isdir(os.path.join(a.cache_dir, "recovered"))
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        for name, data in files.items():
            assert read_file(b.p(name)) == data, name
        assert os.stat(b.p("first")).st_mode == mode
        refused = [e for e in a.records("conflicts.jsonl") if e.get("refused")]
        assert [(e["refused"], e["args"]["colour"]) for e in refused] == [("setattr", 1)]
        assert "setattr refused" in status(a, world_tmp)


def test_status_shows_pending_operations_apart_from_files(services, mount_factory, world_tmp):
    """``nimbusfs status`` counts a write-back mount's journalled namespace operations
    apart from its pending files (and their bytes)."""
    with own_server(services, "wb_status") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        dep.kill()
        os.mkdir(a.p("d"))
        os.chmod(a.p("d"), 0o700)
        write_file(a.p("f"), b"x" * (3 << 20))   # its close writes the operations too
        assert "write-back: 1 files (3.0 MiB) and 2 namespace operations waiting" in status(
            a, world_tmp)
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "the drain")
        assert "write-back:" not in status(a, world_tmp)


def test_a_chmod_whose_attributes_are_unknown_fails_through_an_outage_without_journalling(
        services, mount_factory):
    """A chmod of a directory whose attributes left this mount's cache, with its server
    down: EIO within the outage timeout (not a wait for the drain), and nothing
    journalled: after the restart the mode is unchanged."""
    with (own_server(services, "wb_chmod") as dep,
          twin(services, dep, "wb_chmod_twin") as other):
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        b = mount_factory("local", a.token, other, "--outage-timeout", "2")
        os.mkdir(a.p("d"), 0o755)
        os.mkdir(a.p("e"))
        wait_until(lambda: pending(a) == (0, 0), 30, "the mkdirs' drain")
        wait_until(lambda: os.path.isdir(b.p("d")) and os.path.isdir(b.p("e")), 30, "B")
        os.stat(a.p("d"))
        # Pushed to A in this order: d's attributes dropped there once A sees e/x
        # (which it looks up without d).
        write_file(b.p("d", "x"), b"x")
        write_file(b.p("e", "x"), b"x")
        wait_until(lambda: os.path.exists(a.p("e", "x")), 30, "e/x on A")
        dep.kill()
        assert _errno_within(lambda: os.chmod(a.p("d"), 0o700), 8) == errno.EIO
        assert pending(a) == (0, 0)
        dep.start()
        assert os.stat(b.p("d")).st_mode & 0o7777 == 0o755
        assert os.stat(a.p("d")).st_mode & 0o7777 == 0o755


def test_rename_and_unlink_need_no_server_and_reach_other_mounts_once_drained(
        services, mount_factory):
    """Namespace write-back of renames and unlinks: with the metaserver down they return,
    and the writer shows their result at once (lookups, listings, link counts, a pending
    file opened by its new name, ENOENT at the old one); after the restart another mount
    sees the same."""
    with own_server(services, "wb_rename") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        write_file(a.p("kept"), b"committed")
        os.mkdir(a.p("d"))
        write_file(a.p("d", "gone"), b"to be removed")
        os.link(a.p("kept"), a.p("kept2"))
        wait_until(lambda: pending(a) == (0, 0), 30, "the setup's drain")
        assert sorted(os.listdir(a.p("d"))) == ["gone"]
        dep.kill()
        os.rename(a.p("kept"), a.p("d", "moved"))   # committed file into another directory
        write_file(a.p("new"), b"made here")
        os.rename(a.p("new"), a.p("d", "new2"))     # a file created here
        os.mkdir(a.p("sub"))
        os.rename(a.p("sub"), a.p("d", "sub"))      # a directory made here
        os.unlink(a.p("d", "gone"))
        os.unlink(a.p("kept2"))                     # one of two links
        assert not os.path.exists(a.p("kept")) and not os.path.exists(a.p("new"))
        assert not os.path.exists(a.p("d", "gone"))
        with pytest.raises(FileNotFoundError):
            os.stat(a.p("kept2"))
        assert sorted(os.listdir(a.p("d"))) == ["moved", "new2", "sub"]
        assert sorted(os.listdir(a.p())) == ["d", "first"]
        assert read_file(a.p("d", "new2")) == b"made here"
        assert os.stat(a.p("d", "moved")).st_nlink == 1
        assert os.stat(a.p("d")).st_nlink == 3   # its new subdirectory
        assert pending(a)[0] >= 6
        dep.start()
        assert read_file(a.p("d", "moved")) == b"committed"   # an open asks the server
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep, "--outage-timeout", "2")
        assert sorted(os.listdir(b.p())) == ["d", "first"]
        assert sorted(os.listdir(b.p("d"))) == ["moved", "new2", "sub"]
        assert read_file(b.p("d", "moved")) == b"committed"
        assert read_file(b.p("d", "new2")) == b"made here"
        assert os.stat(b.p("d", "moved")).st_nlink == 1
        assert os.stat(b.p("d")).st_nlink == 3
        assert os.stat(a.p("d", "moved")).st_ino == os.stat(b.p("d", "moved")).st_ino


def test_the_git_lock_pattern_over_a_committed_file(services, mount_factory):
    """``x.lock`` written and renamed over a committed ``x``, again and again, with the
    server down: each rename returns at once, ``x`` reads its last bytes; after the drain
    another mount has ``x`` with them and no lock file, one version each."""
    with own_server(services, "wb_lock") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a, {"x": b"v0"})
        dep.kill()
        for i in range(1, 4):
            write_file(a.p("x.lock"), b"v%d" % i)
            os.rename(a.p("x.lock"), a.p("x"))
            assert read_file(a.p("x")) == b"v%d" % i
            assert not os.path.exists(a.p("x.lock"))
        assert sorted(os.listdir(a.p())) == ["first", "x"]
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        [view] = server_view(dep, a.token, "x")
        assert view["versions"] == 1
        b = mount_factory("local", a.token, dep)
        assert sorted(os.listdir(b.p())) == ["first", "x"]
        assert read_file(b.p("x")) == b"v3"


def test_a_pending_file_renamed_twice_drains_as_one_file(services, mount_factory):
    """A file created here, written, renamed, written again and renamed again before any
    drain: after it, one file at the last name with the last bytes, on the server too;
    and after kill -9 before the drain, the replay applies each rename once."""
    with own_server(services, "wb_twice") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        pending_behind_a_mkdir(a, dep)   # the drainer retries the mkdir alone
        write_file(a.p("one"), b"first bytes")
        os.rename(a.p("one"), a.p("two"))
        with open(a.p("two"), "ab") as f:
            f.write(b" and more")
        os.rename(a.p("two"), a.p("three"))
        write_file(a.p("one"), b"another file at the first name")
        assert sorted(os.listdir(a.p())) == ["d", "f", "first", "one", "three"]
        crash(a)
        dep.start()
        a.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "the replay's drain")
        assert sorted(os.listdir(a.p())) == ["d", "f", "first", "one", "three"]
        assert read_file(a.p("three")) == b"first bytes and more"
        assert not os.path.exists(os.path.join(a.cache_dir, "conflicts.jsonl"))
        b = mount_factory("local", a.token, dep)
        assert sorted(os.listdir(b.p())) == ["d", "f", "first", "one", "three"]
        assert read_file(b.p("three")) == b"first bytes and more"
        assert read_file(b.p("one")) == b"another file at the first name"
        assert [v["versions"] for v in server_view(dep, a.token, "three")] == [1]


def test_a_rename_over_a_name_changed_meanwhile_keeps_both(services, mount_factory):
    """A renames ``new`` over ``x`` while its server is down; B replaces ``x`` meanwhile:
    after A's drain B's ``x`` is unchanged and A's file is kept beside it under the
    conflicted-copy name; A's unlink of a name B replaced meanwhile removes nothing.
    Nothing is lost, and conflicts.jsonl says what happened."""
    with (own_server(services, "wb_rtaken") as dep,
          twin(services, dep, "wb_rtaken_twin") as other):
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        b = mount_factory("local", a.token, other, "--outage-timeout", "2")
        take_lease(a, {"x": b"old", "y": b"old y"})
        wait_until(lambda: os.path.exists(b.p("y")), 30, "y on B")
        dep.kill()
        write_file(a.p("new"), b"mine")
        os.rename(a.p("new"), a.p("x"))
        os.unlink(a.p("y"))
        assert read_file(a.p("x")) == b"mine"
        write_file(b.p("x.tmp"), b"theirs")
        os.rename(b.p("x.tmp"), b.p("x"))
        write_file(b.p("y.tmp"), b"their y")
        os.rename(b.p("y.tmp"), b.p("y"))
        dep.start()
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")

        def copies(m) -> list[str]:
            return [n for n in os.listdir(m.p()) if n.startswith("x (conflicted copy")]
        wait_until(lambda: len(copies(b)) == 1, 30, "the copy on B")
        assert read_file(b.p("x")) == b"theirs"
        assert read_file(b.p(copies(b)[0])) == b"mine"
        assert read_file(b.p("y")) == b"their y"
        wait_until(lambda: len(copies(a)) == 1 and _read_or_none(a.p("x")) == b"theirs"
                   and _read_or_none(a.p("y")) == b"their y", 30, "B's files on A")
        assert read_file(a.p(copies(a)[0])) == b"mine"
        log = a.records("conflicts.jsonl")
        assert any(e.get("kept_as") == copies(a)[0] for e in log)
        assert any(e.get("refused") == "unlink" and e["errno"] == errno.ESTALE for e in log)


def test_rename_and_unlink_errors_are_answered_locally(services, mount_factory):
    """With the metaserver down, rename(2) and unlink(2) fail at once with the errno a
    local disk gives, from this mount's view (pending changes over the server's
    entries), and journal nothing."""
    from test_posix import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

    with own_server(services, "wb_rerr") as dep:
        a = mount_factory("local", None, dep, "--writeback", "--outage-timeout", "2")
        take_lease(a)
        os.mkdir(a.p("full"))
        write_file(a.p("full", "f"), b"f")
        os.mkdir(a.p("empty"))
        wait_until(lambda: pending(a) == (0, 0), 30, "the setup's drain")
        os.listdir(a.p("full"))
        dep.kill()
        os.mkdir(a.p("newdir"))
        write_file(a.p("newdir", "g"), b"g")   # a directory with entries made here
        write_file(a.p("file"), b"file")
        before = pending(a)[0]

        def err(fn) -> int:
            with pytest.raises(OSError) as e:
                fn()
            return e.value.errno
        assert err(lambda: os.rename(a.p("nothing"), a.p("x"))) == errno.ENOENT
        assert err(lambda: os.unlink(a.p("nothing"))) == errno.ENOENT
        assert err(lambda: renameat2(a.p("file"), a.p("first"), RENAME_NOREPLACE)
                   ) == errno.EEXIST
        assert err(lambda: renameat2(a.p("file"), a.p("nothing"), RENAME_EXCHANGE)
                   ) == errno.ENOENT
        assert err(lambda: os.rename(a.p("empty"), a.p("file"))) == errno.ENOTDIR
        assert err(lambda: os.rename(a.p("file"), a.p("empty"))) == errno.EISDIR
        assert err(lambda: os.rename(a.p("empty"), a.p("full"))) == errno.ENOTEMPTY
        assert err(lambda: os.rename(a.p("empty"), a.p("newdir"))) == errno.ENOTEMPTY
        assert err(lambda: os.rename(a.p("full"), a.p("full", "in"))) == errno.EINVAL
        assert err(lambda: os.unlink(a.p("empty"))) == errno.EISDIR
        os.unlink(a.p("full", "f"))
        os.rename(a.p("empty"), a.p("full"))   # empty now, as this mount shows it
        renameat2(a.p("file"), a.p("first"), RENAME_EXCHANGE)
        assert read_file(a.p("first")) == b"file"   # pending: no server needed
        # Nothing journalled for the refused ones: the three that returned are.
        wait_until(lambda: pending(a)[0] == before + 3, 30, "the group commit")
        dep.start()
        assert read_file(a.p("file")) == b"1"
        wait_until(lambda: pending(a) == (0, 0), 60, "A's drain")
        b = mount_factory("local", a.token, dep)
        assert sorted(os.listdir(b.p())) == ["file", "first", "full", "newdir"]
        assert os.listdir(b.p("full")) == []
        assert read_file(b.p("first")) == b"file" and read_file(b.p("file")) == b"1"
        assert not os.path.exists(os.path.join(a.cache_dir, "conflicts.jsonl"))
