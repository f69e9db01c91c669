"""Where the mount last saw each inode: the place a conflicted copy of it goes.

A commit of a file that another mount deleted meanwhile names where this
mount saw the file (``VFS.commit_hint``); the server then saves the bytes
as a conflicted copy there. Without a place, the server takes the deletion
for this mount's own (an unlinked file written through an open handle) and
the bytes go to the deleted inode: lost. So the places are bounded like the
other caches (an LRU of ``size`` inodes), except that the place of a file
the mount holds (open, or written and not committed yet) is never
forgotten while it is held: evicted, it is set aside until ``release``.
"""

from __future__ import annotations

from collections.abc import Callable

from cachetools import LRUCache

Place = tuple[int, bytes]   # (server parent, name)


class Places(LRUCache[int, Place]):
    """An LRU of inode -> (parent, name) that keeps the places ``held`` says are in use.

    Invariant: a place set for an inode stays readable by ``place`` until it
    is set again or, once evicted from the LRU while ``held(ino)`` was true,
    until ``release(ino)``. Eviction (``popitem``, which cachetools calls to
    make room) keeps held places aside; setting a place drops the one kept
    aside; every read goes through ``place``.
    """

    def __init__(self, size: int, held: Callable[[int], bool]) -> None:
        super().__init__(size)
        self._held = held
        self._aside: dict[int, Place] = {}

    def popitem(self) -> tuple[int, Place]:
        ino, place = super().popitem()
        if self._held(ino):
            self._aside[ino] = place
        return ino, place

    def __setitem__(self, ino: int, place: Place) -> None:
        self._aside.pop(ino, None)
        super().__setitem__(ino, place)

    def place(self, ino: int) -> Place | None:
        """Where ``ino`` was last seen; None if not known (never seen, or evicted unheld)."""
        found = self.get(ino)
        return found if found is not None else self._aside.get(ino)

    def release(self, ino: int) -> None:
        """``ino`` is no longer held: its place may be forgotten."""
        self._aside.pop(ino, None)
