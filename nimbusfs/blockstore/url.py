"""Pick the backend for a block store URL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

from nimbusfs.blockstore.base import BlockStore


def open_store(url: str, call: Callable[..., Awaitable[Any]] | None = None,
               timeout: float = 60.0) -> BlockStore:
    """``gs://bucket[/prefix]`` → GCS; ``file:///dir`` or a path → local directory;
    ``metaserver:`` → through the metaserver, with the client's ``call``.

    ``timeout`` bounds each call of a remote store, retries included (the
    mount passes its outage timeout).
    """
    from nimbusfs.blockstore.remote import PROXY_URL, RemoteStore

    if url == PROXY_URL:
        if call is None:
            raise ValueError("blocks through the metaserver need a connected client")
        return RemoteStore(call)
    if url.startswith("gs://"):
        from nimbusfs.blockstore.gcs import GCSStore

        p = urlparse(url)
        return GCSStore(p.netloc, p.path, timeout=timeout)
    if url.startswith("file://"):
        url = urlparse(url).path
    from nimbusfs.blockstore.local import LocalStore

    return LocalStore(url)
