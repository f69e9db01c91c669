"""Sync latency under load: probes written on mount A, watched for on mount B.

``bench/sync_latency.py`` measures the idle case (one change at a time, B
polling for it). Here A is busy (the tree job's ``tar x`` and, in write-back
mode, the drain of its journal behind it): a thread writes a small probe
file on A every ``interval`` seconds, a new name each time, and another
thread stats the probes on B, oldest first, until each shows its full size.
A probe's latency is from its ``close`` returning on A to B's ``stat``
showing its bytes: in write-back mode it waits behind every file A closed
before it (the journal drains in order), which is what a user of B sees.

B sees a new name only through the server's push (the kernel keeps B's
negative lookups otherwise, see ``VFS.lookup``), so the figure includes the
push, as the idle one does.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

from harness import percentiles

from nimbusfs.retry import wait_until

# A probe's size is BASE + its number: B knows it has the probe's bytes, not
# an empty file being written (a --sync mount creates, then commits at close).
BASE = 100


class SyncProbe:
    """Write probes in ``a``, watch for them in ``b`` (the same directory seen by two mounts).

    Use as a context manager around the load; ``result`` afterwards. Leaving
    stops the writer, then waits up to ``timeout`` seconds for B to see every
    probe written (TimeoutError otherwise: a probe never seen is a failure,
    not a slow sample).
    """

    def __init__(self, a: str, b: str, interval: float = 0.25, poll: float = 0.005,
                 timeout: float = 600.0) -> None:
        self.a, self.b = a, b
        self.interval, self.poll, self.timeout = interval, poll, timeout
        self.closed: list[float] = []     # monotonic time each probe's close returned on A
        self.latency: list[float] = []    # seconds until B saw it, in probe order
        self._stop = threading.Event()      # the load is over (or a thread failed)
        self._abandon = threading.Event()   # the load failed: stop watching too
        self._written = threading.Event()   # the writer has stopped: ``closed`` is final
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=f, daemon=True)
                         for f in (self._write, self._watch)]

    def _name(self, i: int) -> str:
        return f"p{i:06d}"

    def _write(self) -> None:
        i = 0
        try:
            while not self._stop.wait(self.interval if i else 0):
                with open(os.path.join(self.a, self._name(i)), "wb") as f:
                    f.write(os.urandom(BASE + i))
                self.closed.append(time.monotonic())
                i += 1
        except BaseException as e:  # reported by __exit__
            self._errors.append(e)
        finally:
            self._written.set()

    def _watch(self) -> None:
        try:
            self._watch_all()
        except BaseException as e:  # reported by __exit__
            self._errors.append(e)
            self._stop.set()

    def _watch_all(self) -> None:
        deadline = None
        while not self._abandon.is_set():
            j = len(self.latency)
            if self._written.is_set():
                if j == len(self.closed):
                    return
                deadline = deadline or time.monotonic() + self.timeout
                if time.monotonic() > deadline:
                    raise TimeoutError(f"B never saw probe {j} of {len(self.closed)}")
            if j < len(self.closed):
                try:
                    seen = os.stat(os.path.join(self.b, self._name(j))).st_size == BASE + j
                except FileNotFoundError:
                    seen = False
                if seen:
                    self.latency.append(time.monotonic() - self.closed[j])
                    continue   # the next one may be there too
            time.sleep(self.poll)

    def __enter__(self) -> SyncProbe:
        os.mkdir(self.a)
        wait_until(lambda: os.path.isdir(self.b), 60, "the probe directory on B")
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if typ is not None:
            self._abandon.set()
        for t in self._threads:
            t.join()
        if self._errors and typ is None:
            raise self._errors[0]

    def result(self, label: str) -> dict[str, float]:
        """``{label p50 ms, label p99 ms, label probes}`` of the latencies seen."""
        ms = [1000 * x for x in self.latency]
        if len(ms) < 2:   # a load shorter than the interval: no percentiles
            return {f"{label} probes": len(ms)}
        p = percentiles(ms)
        return {f"{label} p50 ms": p["p50"], f"{label} p99 ms": p["p99"],
                f"{label} probes": p["n"]}
