"""Pick the backend for a block store URL."""

from __future__ import annotations

from urllib.parse import urlparse

from blockstore.base import BlockStore


def open_store(url: str, timeout: float = 60.0) -> BlockStore:
    """``gs://bucket[/prefix]`` → GCS; ``file:///dir`` or a path → local directory.

    ``timeout`` bounds each call of a remote store, retries included (the
    mount passes its outage timeout).
    """
    if url.startswith("gs://"):
        from blockstore.gcs import GCSStore

        p = urlparse(url)
        return GCSStore(p.netloc, p.path, timeout=timeout)
    if url.startswith("file://"):
        url = urlparse(url).path
    from blockstore.local import LocalStore

    return LocalStore(url)
