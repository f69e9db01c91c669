"""A version's extent list: ``(hash or None, length)`` laid end to end, ``None`` a hole."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any


class Extents:
    """An immutable extent list with cumulative offsets for binary search."""

    def __init__(self, pairs: Iterable[Sequence[Any]]) -> None:
        self.keys: list[bytes | None] = []
        self.lens: list[int] = []
        for k, n in pairs:
            self.keys.append(None if k is None else bytes(k))
            self.lens.append(n)
        self.offs: list[int] = []
        pos = 0
        for n in self.lens:
            self.offs.append(pos)
            pos += n
        self.size = pos

    def index(self, off: int) -> int:
        """Index of the extent containing ``off`` (len(self) if at or past the end)."""
        if off >= self.size:
            return len(self.lens)
        return bisect.bisect_right(self.offs, off) - 1

    def __len__(self) -> int:
        return len(self.lens)

    def pairs(self, lo: int = 0, hi: int | None = None) -> list[list[Any]]:
        """Extents ``lo`` to ``hi`` (default: all) as ``[hash, length]`` lists, a commit's form."""
        return [[self.keys[i], self.lens[i]] for i in range(lo, len(self) if hi is None else hi)]

    def between(self, a: int, b: int) -> list[list[Any]]:
        """The extents covering [a, b) exactly: a hole cut by ``a`` or ``b`` is shortened.

        Windows start and end at block boundaries, so only holes are cut.
        """
        i, j = self.index(a), self.index(b - 1)
        assert a == self.offs[i] or self.keys[i] is None, "a block cut at its start"
        assert b == self.offs[j] + self.lens[j] or self.keys[j] is None, "a block cut at its end"
        out = self.pairs(i, j + 1)
        out[0][1] -= a - self.offs[i]
        out[-1][1] -= self.offs[j] + self.lens[j] - b
        return out


def merge_holes(extents: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """The extents with adjacent holes made one (a commit names each hole once)."""
    merged: list[list[Any]] = []
    for k, n in extents:
        if k is None and merged and merged[-1][0] is None:
            merged[-1][1] += n
        else:
            merged.append([k, n])
    return merged
