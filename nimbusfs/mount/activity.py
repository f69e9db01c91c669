"""How busy applications keep the mount: what the write-back drain yields to.

The drain shares the mount's interpreter (its GIL) and disk with the
requests it answers, so draining beside a burst of them (``tar x``, ``git
clone``) slows both. :class:`Activity` tells a burst from a few requests: an
editor's save is a handful of requests and then nothing, a ``tar x`` several
thousand a second with gaps of a few milliseconds when the machine is busy.
"""

from __future__ import annotations

# Requests in one ``WINDOW`` (seconds) and the one before it from which the
# mount is in a burst; how long a burst must pause to end (``LONG_QUIET``),
# and a few requests (``QUIET``).
WINDOW = 0.1
BURST = 250
QUIET = 0.002
LONG_QUIET = 0.05


class Activity:
    """Requests counted in windows of ``WINDOW`` seconds, and the last one's time.

    ``seen`` runs once per FUSE request, so it is a few attribute updates;
    times are the caller's (trio's clock).
    """

    __slots__ = ("_before", "_count", "_end", "last")

    def __init__(self) -> None:
        self.last = float("-inf")
        self._count = 0               # requests in the window ending at ``_end``
        self._before = 0              # and in the window before it
        self._end = float("-inf")

    def seen(self, now: float) -> None:
        if now >= self._end:
            self._before = self._count if now < self._end + WINDOW else 0
            self._count = 0
            self._end = now + WINDOW
        self._count += 1
        self.last = now

    def quiet_in(self, now: float) -> float:
        """Seconds until the mount is quiet if no request comes meanwhile (0: quiet
        now): ``QUIET`` after a few requests, ``LONG_QUIET`` after a burst."""
        if now >= self._end:
            recent = self._count if now < self._end + WINDOW else 0
        else:
            recent = self._count + self._before
        pause = LONG_QUIET if recent >= BURST else QUIET
        return max(0.0, self.last + pause - now)
