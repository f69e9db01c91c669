"""A regular file open on this mount: the content layer's writer plus the mount's state.

The content itself (committed extents, staging, pipelined upload, commit)
is ``nimbusfs.content.writer.Writer``'s, shared with the other front ends;
this adds what only the mount has: the kernel's handles on the file, the
write-back create not yet applied, and where the VFS wants to hear of a
conflict. Its metadata interface is the mount's protocol client, its
background tasks the VFS's (logged, never fatal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nimbusfs.content import Content, Prepared, Writer

if TYPE_CHECKING:
    from nimbusfs.mount.vfs import VFS

__all__ = ["OpenFile", "Prepared"]


class OpenFile(Writer):
    """State of one regular file while this mount has it open (shared by its handles)."""

    def __init__(self, vfs: VFS, ino: int, attr: dict[str, Any], extents: list[Any]) -> None:
        super().__init__(Content(vfs.cache, vfs.client, vfs.spawn, vfs.staging_dir),
                         ino, attr, extents)
        self.vfs = vfs
        self.handles = 0
        # Write-back: the ``mknod`` arguments of a create journalled with the
        # file and not yet applied by the server (the inode is this mount's
        # alone until then); None once applied, and for every other file.
        self.creating: dict[str, Any] | None = None

    def commit_hint(self) -> dict[str, Any]:
        return self.vfs.commit_hint(self.ino)

    def keep_staged(self) -> bool:
        # Write-back: the journal names the staging file, to find it after a crash.
        return self.vfs.writeback is not None

    def conflicted(self, copy: dict[str, Any]) -> None:
        self.vfs.record_conflict(self.ino, copy)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "create": self.creating}

    @classmethod
    def restore(cls, vfs: VFS, ino: int, state: dict[str, Any]) -> OpenFile:
        """The file of a journal record, with its uncommitted changes (no handle open)."""
        f = cls(vfs, ino, state["attr"], state["extents"])
        f.restored(state)
        f.creating = state.get("create")   # absent from records of older mounts
        return f
