"""Content-addressed block stores.

A block is named by the BLAKE3 hash of its bytes, written once and never
modified. Every backend implements :class:`nimbusfs.blockstore.base.BlockStore`; callers
obtain one with :func:`open_store` from a URL (``file:///dir``, a plain path, or
``gs://bucket[/prefix]``).
"""

from nimbusfs.blockstore.base import BlockNotFound, BlockStore, StoreUnavailable, block_hash
from nimbusfs.blockstore.url import open_store

__all__ = ["BlockNotFound", "BlockStore", "StoreUnavailable", "block_hash", "open_store"]
