"""Errors the server answers with: an errno the mount passes on unchanged.

Also the mount's own local disk I/O (staging, disk cache, a local block store):
``local_io`` turns its OS errors into the same FSError, so one rule maps both.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# OS errors of local disk I/O that tell the application what is wrong, as a
# local file system would: passed on with their errno. Any other (EIO of a
# failing disk, EBADF of a bug) is answered with EIO.
PASSED_ON = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS, _errno.EFBIG,
                       _errno.ENOMEM, _errno.EMFILE, _errno.ENFILE})


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
        e = match
        while isinstance(e, BaseExceptionGroup):
            e = e.exceptions[0]
    return e if isinstance(e, FSError) else None


@contextmanager
def local_io(what: str) -> Iterator[None]:
    """Raise an OSError of the I/O in this block as an FSError naming ``what`` (a path).

    The error is logged here with its path, once: the application sees only
    its errno (ENOSPC, EDQUOT, EROFS ... as they are; EIO for the others,
    logged with their traceback, as a bug or a failing disk).
    """
    try:
        yield
    except OSError as e:
        code = e.errno if e.errno in PASSED_ON else _errno.EIO
        if code == _errno.EIO:
            log.exception("%s failed", what)
        else:
            log.warning("%s: %s", what, e)
        raise FSError(code, f"{what}: {e.strerror or e}") from e
