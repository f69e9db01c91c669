"""Which cached items were dropped while a request was in flight (the VFS's caches).

A reply may be older than a change that dropped the cached item it would
fill (an attribute, a directory's listing): it must not fill it again. The
VFS takes a token (``Drops.now``) before it sends a request and asks
``fresh(key, token)`` before caching what the answer holds for ``key``.

One counter for all items (as before) made every drop anywhere void every
reply in flight: while the write-back drain answered (each applied unlink or
setattr drops its inode), almost no listing or attribute the server sent
was cached, and the next request asked the server again. Here each item
keeps the generation of its last drop; an item whose record was evicted
(the bound) counts as dropped at the newest evicted generation (``floor``),
and ``all`` (the change log reset) voids every reply in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class Drops:
    """Generation of the last drop of each recently dropped item, bounded.

    Invariant: ``fresh(key, t)`` is False whenever ``drop(key)`` or ``all()``
    was called after ``now`` was ``t``; it may be False also otherwise (an
    evicted record), never True wrongly.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.now = 0      # generation of the newest drop
        self.floor = 0    # replies with an older token are never fresh
        self._size = size
        self._at: OrderedDict[Hashable, int] = OrderedDict()   # key -> generation, oldest first

    def drop(self, *keys: Hashable) -> None:
        """The items ``keys`` changed: replies in flight for them are not cached."""
        self.now += 1
        for key in keys:
            self._at[key] = self.now
            self._at.move_to_end(key)
        while len(self._at) > self._size:
            self.floor = max(self.floor, self._at.popitem(last=False)[1])

    def all(self) -> None:
        """Everything may have changed: no reply in flight is cached."""
        self.now += 1
        self.floor = self.now
        self._at.clear()

    def fresh(self, key: Hashable, token: int) -> bool:
        """Whether a reply to a request sent at ``token`` may fill ``key``'s cache."""
        return token >= self.floor and self._at.get(key, 0) <= token
