"""Block store in a Google Cloud Storage bucket.

Uses the official ``google-cloud-storage`` client. ``put`` is a conditional
create (``if_generation_match=0``), so two machines uploading the same block
race harmlessly: the loser gets 412 and the block is already there.

The endpoint is configurable (``NIMBUSFS_GCS_ENDPOINT`` or the standard
``STORAGE_EMULATOR_HOST``) so tests run against an emulator on loopback; with an
emulator endpoint the client uses anonymous credentials.

The client object is not documented as thread-safe, so each worker thread gets
its own (``threading.local``).

Retries are the client library's own (``google.cloud.storage.retry``: 429,
5xx, resets, timeouts; uploads included, which are idempotent here: a block
is immutable and a retried create finds it, 412), configured, not
re-implemented:

- a call's retries end at the store's ``timeout`` (the mount's outage
  timeout): the library's defaults (60 s per request, retries for 120 s) kept
  a read or a close waiting 99 to 410 s for a dead emulator, with
  ``--outage-timeout 15``. A call that fails then raises ``StoreUnavailable``;
- each attempt waits at most ``ATTEMPT_TIMEOUT`` (a quarter of that, 10 s at
  most) for its connection to move: a connection that died silently (a black
  hole, a NAT that forgot the flow) otherwise held the one attempt for the
  whole timeout, and the store's return went unnoticed until the call failed;
- the waits between attempts grow from 0.25 s to 4 s at most (the library's
  1 s to 60 s): once the store is back, a call waiting on it resumes within
  4 s and a retry.

``tests/test_store_faults.py`` checks this through a fault-injecting proxy.
"""

from __future__ import annotations

import functools
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as gauth
from google.cloud.storage.retry import DEFAULT_RETRY

from nimbusfs.blockstore.base import BlockNotFound, BlockStore, StoreUnavailable

# The longest one attempt waits for its connection (connect, or between bytes).
ATTEMPT_TIMEOUT = 10.0
RETRY = DEFAULT_RETRY.with_delay(initial=0.25, maximum=4.0, multiplier=2.0)

P = ParamSpec("P")
R = TypeVar("R")


def _free(exc: BaseException) -> None:
    """Clear the frames an exception from the client holds, and of those it chained.

    The client's retry wrappers keep the errors they saw in a list in their own
    frame, which the error's traceback holds: a reference cycle, left to the
    cyclic garbage collector, with every frame of the call in it, ``put``'s
    included. A 412 for a block already stored kept its bytes (twice: ours and
    the request body) and, through ``put``'s argument, the whole 20 MiB segment
    it was a view of, until a collection of the oldest generation: the mount
    reached 726-828 MiB in the final fsync of the benchmark's random 128 KiB
    writes on the GCS store, 311 with the cycle broken. Frames still running
    (the caller's) are skipped; clearing the others breaks the cycle.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _answered(fn: Callable[P, R]) -> Callable[P, R]:
    """Raise what the client raises once its retries are over as ``StoreUnavailable``.

    Errors the method answers itself (e.g. NotFound) never get here.
    """
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (gexc.GoogleAPIError, gauth.TransportError, requests.RequestException) as e:
            _free(e)
            raise StoreUnavailable(f"GCS {fn.__name__}: {e}") from None
    return wrapper


class GCSStore(BlockStore):
    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None,
                 create_bucket: bool = False, timeout: float = 60.0) -> None:
        self.bucket_name = bucket
        # Passed to every request: one attempt's timeout, and its retries' (see above).
        self._bounds = {"timeout": max(1.0, min(timeout / 4, ATTEMPT_TIMEOUT)),
                        "retry": RETRY.with_timeout(timeout)}
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint or os.environ.get("NIMBUSFS_GCS_ENDPOINT") or os.environ.get(
            "STORAGE_EMULATOR_HOST")
        self.url = f"gs://{bucket}/{self.prefix}".rstrip("/")
        self._local = threading.local()
        if create_bucket:
            try:
                self._client().create_bucket(bucket, **self._bounds)
            except gexc.Conflict:
                pass

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            if self.endpoint:
                client = storage.Client(
                    project="nimbusfs", credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": self.endpoint})
            else:
                client = storage.Client()
            # requests looks up proxies and CA bundle in the environment on every
            # request: 0.8 ms of the 1.9 ms of CPU a small download cost (on the
            # emulator). They are looked up once, for the URL the client uses
            # (which the client also takes from STORAGE_EMULATOR_HOST).
            http = client._http
            env = http.merge_environment_settings(
                client._connection.API_BASE_URL, {}, None, None, None)
            http.proxies.update(env["proxies"])
            http.verify = env["verify"]
            http.trust_env = False
            self._local.client = client
        return client

    def _blob(self, key: bytes):
        return self._client().bucket(self.bucket_name).blob(self.prefix + key.hex())

    # ``single_shot_download``: the body is read in one call instead of the
    # client's default 8 KiB Python loop, which cost the mount half its cold
    # read throughput. Blocks are at most 4 MiB. ``checksum=None``: the block's
    # own hash is checked by the cache.
    @_answered
    def get(self, key: bytes) -> bytes:
        try:
            return self._blob(key).download_as_bytes(checksum=None, raw_download=True,
                                                     single_shot_download=True, **self._bounds)
        except gexc.NotFound as e:
            _free(e)
            raise BlockNotFound(key.hex()) from None

    @_answered
    def get_range(self, key: bytes, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            return self._blob(key).download_as_bytes(
                start=offset, end=offset + length - 1, checksum=None, raw_download=True,
                single_shot_download=True, **self._bounds)
        except gexc.NotFound as e:
            _free(e)
            raise BlockNotFound(key.hex()) from None

    @_answered
    def put(self, key: bytes, data: bytes | memoryview) -> bool:
        try:
            self._blob(key).upload_from_string(bytes(data), if_generation_match=0,
                                               content_type="application/octet-stream",
                                               **self._bounds)
        except gexc.PreconditionFailed as e:
            _free(e)
            return False
        return True

    @_answered
    def exists(self, key: bytes) -> bool:
        return self._blob(key).exists(**self._bounds)

    @_answered
    def delete(self, key: bytes) -> None:
        try:
            self._blob(key).delete(**self._bounds)
        except gexc.NotFound as e:
            _free(e)

    def list(self) -> Iterator[bytes]:
        for blob in self._client().list_blobs(self.bucket_name, prefix=self.prefix or None,
                                              **self._bounds):
            yield bytes.fromhex(blob.name[len(self.prefix):])
