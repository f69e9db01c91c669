"""Errors the server answers with: an errno the mount passes on unchanged."""

from __future__ import annotations

import errno as _errno


class FSError(Exception):
    """A request failed with a POSIX errno (and a message for logs and REST)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(errno, message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno
        self.message = message or _errno.errorcode.get(errno, str(errno))

    def __str__(self) -> str:
        return f"[{_errno.errorcode.get(self.errno, self.errno)}] {self.message}"


class Conflict(FSError):
    """A commit named a base version that is no longer current."""

    def __init__(self, current: int) -> None:
        super().__init__(_errno.ESTALE, f"base version is stale; current is {current}")
        self.current = current


def fs_error(e: BaseException) -> FSError | None:
    """The FSError ``e`` is, or the first of an exception group made only of them.

    Work done in parallel (block transfers) runs in trio nurseries, which wrap
    what their tasks raise in exception groups.
    """
    if isinstance(e, BaseExceptionGroup):
        match, rest = e.split(FSError)
        if match is None or rest is not None:
            return None
        while isinstance(match, BaseExceptionGroup):
            match = match.exceptions[0]
        e = match
    return e if isinstance(e, FSError) else None
