"""Randomised checks against a reference: a differential state machine and an fsx-style run."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

NAMES = ["a", "b", "c"]
PATHS = NAMES + [f"{x}/{y}" for x in NAMES for y in NAMES[:2]] + ["a/a/a", "b/a/b"]


def snapshot(root: str) -> dict[str, tuple]:
    """Everything observable of a tree: type, size, mode, links, content hash, xattrs."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, root)
            digest = None
            if stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            xattrs = tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)
                                  if n.startswith("user.")))
            size = st_.st_size if not stat.S_ISDIR(st_.st_mode) else None
            out[rel] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), size,
                        st_.st_nlink, digest, xattrs)
    return out


def outcome(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def make_machine(mount_root: str, control_root: str):
    class Differential(RuleBasedStateMachine):
        """Apply each operation to the mount and to local disk; they must agree."""

        def __init__(self) -> None:
            super().__init__()
            for r in (mount_root, control_root):
                for entry in os.listdir(r):
                    p = os.path.join(r, entry)
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p)
                    else:
                        os.unlink(p)

        def both(self, fn, *rel: str, **kw) -> None:
            results = [outcome(fn, *[os.path.join(r, p) for p in rel], *kw.values())
                       for r in (mount_root, control_root)]
            assert results[0] == results[1], (fn.__name__, rel, results)

        @rule(path=st.sampled_from(PATHS), data=st.binary(max_size=3000))
        def create(self, path, data):
            def op(p, d):
                with open(p, "wb") as f:
                    f.write(d)
            self.both(op, path, d=data)

        @rule(path=st.sampled_from(PATHS), off=st.integers(0, 200_000),
              data=st.binary(min_size=1, max_size=5000))
        def write(self, path, off, data):
            def op(p, o, d):
                fd = os.open(p, os.O_WRONLY)
                try:
                    os.pwrite(fd, d, o)
                finally:
                    os.close(fd)
            self.both(op, path, o=off, d=data)

        @rule(path=st.sampled_from(PATHS), size=st.integers(0, 100_000))
        def truncate(self, path, size):
            self.both(os.truncate, path, s=size)

        @rule(src=st.sampled_from(PATHS), dst=st.sampled_from(PATHS))
        def rename(self, src, dst):
            self.both(os.rename, src, dst)

        @rule(src=st.sampled_from(PATHS), dst=st.sampled_from(PATHS))
        def link(self, src, dst):
            self.both(os.link, src, dst)

        @rule(path=st.sampled_from(PATHS))
        def unlink(self, path):
            self.both(os.unlink, path)

        @rule(path=st.sampled_from(PATHS))
        def mkdir(self, path):
            self.both(os.mkdir, path)

        @rule(path=st.sampled_from(PATHS))
        def rmdir(self, path):
            self.both(os.rmdir, path)

        @rule(path=st.sampled_from(PATHS), mode=st.sampled_from([0o644, 0o600, 0o755, 0o4755]))
        def chmod(self, path, mode):
            self.both(os.chmod, path, m=mode)

        @rule(path=st.sampled_from(PATHS), name=st.sampled_from(["user.x", "user.y"]),
              value=st.binary(max_size=50))
        def setxattr(self, path, name, value):
            self.both(os.setxattr, path, n=name, v=value)

        @invariant()
        def same_tree(self):
            assert snapshot(mount_root) == snapshot(control_root)

    return Differential


def test_differential_state_machine(mount_factory, world_tmp):
    m = mount_factory("local")
    control = os.path.join(world_tmp, "control")
    os.mkdir(control)
    machine = make_machine(m.path, control)
    # Derandomized: the same examples every run, so a failure replays.
    run_state_machine_as_test(machine, settings=settings(
        max_examples=60, stateful_step_count=60, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))


def test_fsx_random_io_against_model(mount_factory):
    """Thousands of random writes, truncates and reads of one file, checked against memory."""
    m = mount_factory("local")
    rng = random.Random(20261125)
    model = bytearray()
    path = m.p("fsx.bin")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    max_size = 6 << 20
    for step in range(4000):
        r = rng.random()
        if r < 0.45:
            off = rng.randrange(0, max_size)
            n = rng.choice([1, 7, 512, 4096, 65536, 300_000])
            data = rng.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + n] = data
        elif r < 0.55:
            size = rng.randrange(0, max_size)
            os.ftruncate(fd, size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        elif r < 0.95:
            off = rng.randrange(0, max(1, len(model) + 1000))
            n = rng.choice([1, 100, 4096, 131072, 1 << 20])
            assert os.pread(fd, n, off) == bytes(model[off:off + n]), f"step {step}"
        else:                                   # close (commit) and reopen
            os.close(fd)
            fd = os.open(path, os.O_RDWR)
            assert os.fstat(fd).st_size == len(model)
    os.close(fd)
    m.remount(drop_cache=True)
    with open(path, "rb") as f:
        assert f.read() == bytes(model)
