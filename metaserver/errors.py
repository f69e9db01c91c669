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
