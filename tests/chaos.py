"""A write load for chaos tests, and the check that it lost and doubled nothing.

Each writer saves files one after another the way editors do: create a temp
file exclusively (O_EXCL), write, close (the commit), rename it over its final
name. Every step is a mutation on the metaserver, and each one applied twice
shows: a second create fails EEXIST, a second commit adds a version or a
conflicted copy, a second rename fails ENOENT. A save counts as acknowledged
once its rename returned.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from conftest import read_file, wait_until


@dataclass
class Load:
    root: str                   # a directory in the mount, one subdirectory per writer
    writers: int = 4
    acked: dict[str, bytes] = field(default_factory=dict)   # relative path: content
    done_at: list[float] = field(default_factory=list)      # when each step returned
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for k in range(self.writers):
            os.mkdir(os.path.join(self.root, f"w{k}"))
            t = threading.Thread(target=self._write, args=(k,), daemon=True)
            t.start()
            self._threads.append(t)

    def _step(self) -> None:
        with self._lock:
            self.done_at.append(time.monotonic())

    def _write(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            name = f"w{k}/f{i}"
            data = f"{name}\n".encode() + os.urandom(2000 + 97 * i % 5000)
            tmp = os.path.join(self.root, f"w{k}/.f{i}.tmp")
            try:
                with open(tmp, "xb") as f:
                    self._step()
                    f.write(data)
                self._step()
                os.rename(tmp, os.path.join(self.root, name))
                self._step()
            except OSError as e:
                self.errors.append(f"{name}: {e!r}")
                return
            with self._lock:
                self.acked[name] = data
            i += 1

    def steps_after(self, t: float) -> int:
        with self._lock:
            return sum(1 for d in self.done_at if d > t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
            assert not t.is_alive(), "a writer hangs"
        assert not self.errors, self.errors

    def outage(self, fault: Callable[[], None], steps_after: int = 60,
               timeout: float = 60) -> float:
        """Let a few saves through, call ``fault()``, wait for ``steps_after`` more steps.

        Returns the recovery time: the longest span from the fault on in which
        no step returned (the outage as the writers saw it).
        """
        before = len(self.acked)
        wait_until(lambda: len(self.acked) >= before + 4 * self.writers or bool(self.errors),
                   timeout, "saves before the fault")
        fault_at = time.monotonic()
        fault()
        wait_until(lambda: self.steps_after(fault_at) >= steps_after or bool(self.errors),
                   timeout, "saves after the fault")
        assert not self.errors, self.errors
        with self._lock:
            after = sorted(d for d in self.done_at if d > fault_at)
        return max(b - a for a, b in zip([fault_at, *after], after, strict=False))

    def run_through(self, fault: Callable[[], None]) -> float:
        """Start, one ``outage(fault)``, stop: its recovery time."""
        self.start()
        recovery = self.outage(fault)
        self.stop()
        return recovery

    def check(self, root: str | None = None) -> None:
        """Every acknowledged save is there with its bytes, nothing else is (``root``: the
        same volume seen through another mount)."""
        root = root or self.root
        found = self.listing(root)
        assert found == set(self.acked), (sorted(found - set(self.acked)),
                                          sorted(set(self.acked) - found))
        for name, data in self.acked.items():
            assert read_file(os.path.join(root, name)) == data, name

    def listing(self, root: str) -> set[str]:
        """The writers' files under ``root``, as relative paths."""
        return {f"w{k}/{n}" for k in range(self.writers)
                for n in os.listdir(os.path.join(root, f"w{k}"))}

    def versions(self, dsn: str) -> dict[str, int]:
        """How many versions each acknowledged file has in the database (1 each if no
        commit was applied twice)."""
        import psycopg

        inos = {os.stat(os.path.join(self.root, n)).st_ino: n for n in self.acked}
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT inode, count(*) FROM versions WHERE inode = ANY(%s)"
                                " GROUP BY inode", (list(inos),)).fetchall()
        return {inos[ino]: n for ino, n in rows}
