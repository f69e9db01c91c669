"""The one interface the content layer needs from the metadata service.

Implemented by the mount's protocol client (``nimbusfs.client.MetaClient``,
each call one request over TCP) and, in the metaserver's process, by
``nimbusfs.server.contentmeta.NamespaceMeta`` (the namespace functions, one
transaction each, as the protocol's dispatcher calls them). Authorisation is
the implementation's: the caller is the user it was opened for, and every
rule (which blocks the user may reference, quota, conflicts) is checked by
the namespace functions either way, never by the content layer.
"""

from __future__ import annotations

from typing import Any, Protocol


class Metadata(Protocol):
    @property
    def gc_grace(self) -> float | None:
        """Seconds block GC leaves an unreferenced block alone; None: blocks are not held
        (an older server), so uploaded-ahead bytes stay staged until their commit."""

    async def open_file(self, ino: int) -> dict[str, Any]:
        """``{"attr", "extents"}`` of the file's current version."""

    async def have_blocks(self, keys: list[bytes]) -> list[bytes]:
        """Those of ``keys`` (at most 10,000) stored and the caller's to reference."""

    async def hold_blocks(self, extents: list[list[Any]]) -> list[bytes]:
        """Restart the GC grace of uploaded, uncommitted blocks; answer those not held."""

    async def commit(self, args: dict[str, Any]) -> dict[str, Any]:
        """Make a new version (``namespace.commit``'s arguments and answer).

        EAGAIN: blocks of it were collected by block GC; put them again and retry.
        """
