"""The mount's local storage: the block cache and the staging area for dirty data."""

from nimbusfs.cache.blockcache import BlockCache
from nimbusfs.cache.staging import Ranges, Staging

__all__ = ["BlockCache", "Ranges", "Staging"]
