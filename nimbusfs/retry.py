"""One retry policy and one polling helper, for every wait on something that may come back.

``Backoff`` is the retry policy: exponential waits, capped, with jitter, and
bounded by a deadline where the caller has one (a request's
``outage_timeout``). The database runner, the mount's reconnect, the
metaserver's LISTEN connection and change pumps, and the embedded
supervisor's restarts all draw their waits from it, each with its own
figures, so that "how long until the next try" has one definition.

``wait_until`` is the polling helper: a condition that another process makes
true (a mount appears, a server writes its address, a process exits), looked
at every few milliseconds until a timeout. Tests and the benchmark use it too.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Waits of ``first``, ``first * factor``, ... up to ``cap`` seconds, each with jitter.

    ``jitter`` is the fraction of each wait drawn at random: a wait of ``d``
    is uniform in ``[d * (1 - jitter), d]``, so that clients cut off by the
    same outage (every mount of a restarted metaserver, transactions that
    deadlocked on each other) do not all come back in the same instant. The
    uncut ``d`` still doubles, so the waits grow as without jitter.
    """

    first: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0 for the first)."""
        d = min(self.first * self.factor ** min(attempt, 64), self.cap)
        return d * (1 - self.jitter * random.random())

    def delays(self) -> Iterator[float]:
        """The waits before each retry, without end (for a loop that must never give up)."""
        return map(self.delay, itertools.count())

    def until(self, deadline: float, clock: Callable[[], float] = time.monotonic
              ) -> Iterator[float]:
        """The waits up to ``deadline`` on ``clock``; then none (give up).

        No wait is longer than half the time left, and none is made once less
        than ``first`` is left: so the tries go on, closer and closer, until
        ``first`` before the deadline, and a server that comes back just
        before it is still reached (a wait that merely ended at the deadline
        would leave no time for the try itself, and one that would pass it
        left up to ``cap`` unused). ``clock`` is the caller's:
        ``time.monotonic`` in a thread, ``trio.current_time`` in a trio task
        (whose deadlines are in trio time).
        """
        for d in self.delays():
            left = deadline - clock()
            if left < self.first:
                return
            yield min(d, left / 2)


# A lost database connection, a serialization failure or deadlock, a
# metaserver that does not answer, a LISTEN connection to open again: first
# retry after 25-50 ms, then twice as late each time, at most 2 s apart.
RECONNECT = Backoff(first=0.05, cap=2.0)


def wait_until(cond: Callable[[], object], timeout: float = 30.0, what: str = "a condition",
               interval: float = 0.02) -> None:
    """Poll ``cond`` every ``interval`` seconds until it is true.

    Raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds. For
    conditions another process makes true, where there is nothing to wait
    on but time (a file or a mount that appears, a pid that goes).
    """
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
