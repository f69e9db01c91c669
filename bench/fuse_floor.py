"""The cost of one FUSE round trip through pyfuse3, without any file system behind it.

Usage (root)::

    python bench/fuse_floor.py [--n N] [--metrics]

Mounts a file system that answers from constants (one directory holding one
file; every extended attribute absent) in a child process, on trio as the
mount does, and times N ``getxattr`` calls of the two names ``ls -l`` asks for
each entry (``security.selinux``, ``system.posix_acl_access``) and N ``stat``
calls that the kernel answers from its attribute cache. The first figure is a
floor under every request the nimbusfs mount answers: ``ls -l`` of 10,000
entries cannot take less than 20,000 of them. ``--metrics`` times every
operation as a mount with ``--metrics`` does (``nimbusfs.metrics.instrument``),
to measure what that costs a request.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import subprocess
import sys
import tempfile
import time

NAMES = ("security.selinux", "system.posix_acl_access")


def serve(mountpoint: str, metrics: bool) -> None:
    import pyfuse3
    import trio

    class Constant(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            e = pyfuse3.EntryAttributes()
            e.st_ino = inode
            root = inode == pyfuse3.ROOT_INODE
            e.st_mode = stat.S_IFDIR | 0o755 if root else stat.S_IFREG | 0o644
            e.st_nlink = 1
            e.attr_timeout = e.entry_timeout = 300
            return e

        async def lookup(self, parent_inode, name, ctx=None):
            if name != b"f":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(pyfuse3.ROOT_INODE + 1)

        async def getxattr(self, inode, name, ctx):
            raise pyfuse3.FUSEError(errno.ENODATA)

    ops = Constant()
    if metrics:
        from nimbusfs.metrics import instrument
        instrument(ops)
    pyfuse3.init(ops, mountpoint, {"fsname=fusefloor"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_call_us(fn, n: int, server: int) -> tuple[float, float]:
    """Mean wall time of a call, and CPU time of the serving process per call, in us.

    The CPU time is steadier than the wall time on a machine shared with other
    work: it does not count the time the serving process waits for a core.
    """
    t0, c0 = time.perf_counter(), cpu_seconds(server)
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6, (cpu_seconds(server) - c0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--metrics", action="store_true",
                    help="count and time every operation, as a mount with --metrics does")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.metrics)
        return
    mnt = tempfile.mkdtemp(prefix="fuse-floor-")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mnt,
                             *(["--metrics"] if args.metrics else [])])
    path = os.path.join(mnt, "f")
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the constant file system did not mount")
            time.sleep(0.05)

        def getxattr(name: str):
            def call() -> None:
                try:
                    os.getxattr(path, name, follow_symlinks=False)
                except OSError as e:
                    assert e.errno == errno.ENODATA
            return call

        print(f"pyfuse3 round trip{' with metrics' if args.metrics else ''},"
              f" {args.n} calls each (mean per call):")
        for name in NAMES:
            wall, cpu = per_call_us(getxattr(name), args.n, proc.pid)
            print(f"  getxattr {name}: {wall:.1f} us (file system's CPU {cpu:.1f} us)")
        wall, _ = per_call_us(lambda: os.stat(path), args.n, proc.pid)
        print(f"  stat (kernel attribute cache): {wall:.1f} us")
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=False)
        proc.wait(timeout=10)
        os.rmdir(mnt)


if __name__ == "__main__":
    main()
