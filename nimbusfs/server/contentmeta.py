"""The content layer's metadata interface inside the metaserver's process.

What ``nimbusfs.client.MetaClient`` is to the mount, this is to a front end
running in the metaserver (the HTTP server): ``nimbusfs.content``'s reader
and writer call the namespace functions directly, each in one transaction,
for one authenticated user and device, with the checks the mount protocol's
dispatcher makes: a commit's blocks are admitted first (``BlockAccess.admit``,
outside the transaction: it may ask the store), and each mutation runs once
however often the database makes its transaction run (``MetaServer.mutate``).

The writer puts blocks into the store itself, which fits *direct* mode (the
commit's admission then finds them there, as a mount's). In *proxy* mode a
block's owner row comes only from ``BlockAccess.put``, so a writer there
would need a store that puts through it; the HTTP server's uploads use
``BlockAccess.ingest`` instead (see its docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nimbusfs.server import namespace
from nimbusfs.server.auth import User

if TYPE_CHECKING:
    from nimbusfs.server.metaserver import MetaServer


class NamespaceMeta:
    """``nimbusfs.content.meta.Metadata`` for ``user`` on ``server``, in-process."""

    def __init__(self, server: MetaServer, user: User, device: str) -> None:
        self.server = server
        self.user = user
        self.device = device

    @property
    def gc_grace(self) -> float | None:
        return self.server.gc_grace

    async def open_file(self, ino: int) -> dict[str, Any]:
        return await self.server.call(namespace.open_file, self.user, self.device, ino)

    async def have_blocks(self, keys: list[bytes]) -> list[bytes]:
        return await self.server.call(namespace.have_blocks, self.user, self.device, keys)

    async def hold_blocks(self, extents: list[list[Any]]) -> list[bytes]:
        return await self.server.blocks.hold(self.user, extents)

    async def commit(self, args: dict[str, Any]) -> dict[str, Any]:
        await self.server.blocks.admit(self.user, args["extents"], args["size"])
        return await self.server.mutate(namespace.commit, self.user, self.device, **args)
