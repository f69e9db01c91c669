"""Block store in a Google Cloud Storage bucket.

Uses the official ``google-cloud-storage`` client's credentials, endpoint and
retry policy. ``put`` is a conditional create (``ifGenerationMatch=0``), so two
machines uploading the same block race harmlessly: the loser gets 412 and the
block is already there.

The endpoint is configurable (``NIMBUSFS_GCS_ENDPOINT`` or the standard
``STORAGE_EMULATOR_HOST``) so tests run against an emulator on loopback; with an
emulator endpoint the client uses anonymous credentials.

The client object is not documented as thread-safe, so each worker thread gets
its own (``threading.local``), and its own connection for blocks.

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

Blocks (``get``, ``get_range``, ``put``) move with requests of this module's
own over urllib3 (``_media``), with the client's credentials and retry
policy, not through ``Blob``: see ``GCSStore._http``. The client serves the
rest (``exists``, ``delete``, ``list``, bucket creation).
"""

from __future__ import annotations

import functools
import json
import os
import string
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar
from urllib.parse import quote, urlencode

import requests
import urllib3
from google.api_core import exceptions as gexc
from google.auth import exceptions as gauth
from google.auth.transport.urllib3 import AuthorizedHttp
from google.cloud.storage.retry import DEFAULT_RETRY

from nimbusfs.blockstore.base import HASH_LEN, BlockNotFound, BlockStore, StoreUnavailable

# The longest one attempt waits for its connection (connect, or between bytes).
ATTEMPT_TIMEOUT = 10.0
RETRY = DEFAULT_RETRY.with_delay(initial=0.25, maximum=4.0, multiplier=2.0)

P = ParamSpec("P")
R = TypeVar("R")


def _free(exc: BaseException | None) -> None:
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
        except (gexc.GoogleAPIError, gauth.TransportError, requests.RequestException,
                urllib3.exceptions.HTTPError) as e:
            _free(e)
            raise StoreUnavailable(f"GCS {fn.__name__}: {e}") from None
    return wrapper


class GCSStore(BlockStore):
    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None,
                 create_bucket: bool = False, timeout: float = 60.0) -> None:
        self.bucket_name = bucket
        # Passed to every request: one attempt's timeout, and its retries' (see above).
        self.attempt_timeout = max(1.0, min(timeout / 4, ATTEMPT_TIMEOUT))
        self._bounds = {"timeout": self.attempt_timeout, "retry": RETRY.with_timeout(timeout)}
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

    def _http(self) -> tuple[AuthorizedHttp, str]:
        """This thread's HTTP connection for block transfers, and the API's base URL.

        Blocks move with the JSON API's media requests over urllib3, with the
        client's credentials (refreshed by google-auth) and its retry policy,
        not through ``Blob``, whose Python (requests, the media and retry
        wrappers) held the GIL the mount's FUSE requests wait for: per 1 MiB
        block on the emulator (``bench/gcs_cpu.py``, one at a time), a
        download cost 1.98 ms of CPU through ``Blob.download_as_bytes`` and
        0.45 here, an upload 3.20 and 0.91. (A transfer process with the
        client in it was tried too: the GIL was freed, but on two busy cores
        the extra process's CPU made cold reads slower, not faster.)
        """
        http = getattr(self._local, "http", None)
        if http is None:
            client = self._client()
            base = client._connection.API_BASE_URL.rstrip("/")
            # The proxy and CA bundle the client's session found for that URL.
            session = client._http
            kw: dict[str, Any] = {"maxsize": 1, "retries": False, "timeout": urllib3.Timeout(
                connect=self.attempt_timeout, read=self.attempt_timeout)}
            if isinstance(session.verify, str):
                kw["ca_certs"] = session.verify
            proxy = session.proxies.get(base.partition(":")[0])
            pool = urllib3.ProxyManager(proxy, **kw) if proxy else urllib3.PoolManager(**kw)
            http = self._local.http = AuthorizedHttp(client._credentials, http=pool)
            self._local.base = base
        return http, self._local.base

    def _media(self, method: str, path: str, fields: dict[str, str | int],
               headers: dict[str, str] | None = None,
               body: tuple[bytes | memoryview, ...] | None = None) -> bytes:
        """One media request (with the client's retries); its body, or the API's error."""
        http, base = self._http()
        url = f"{base}{path}?{urlencode(fields)}"

        def attempt() -> bytes:
            r = http.urlopen(method, url, body=body, headers=headers, preload_content=True,
                             decode_content=False, redirect=False)
            if r.status >= 300:
                raise gexc.from_http_status(r.status, f"{method} {path}: {r.data[:200]!r}")
            return r.data
        return self._bounds["retry"](attempt)()

    def _object(self, key: bytes) -> str:
        return quote(self.prefix + key.hex(), safe="")

    def get(self, key: bytes) -> bytes:
        return self._download(key)

    def get_range(self, key: bytes, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._download(key, {"Range": f"bytes={offset}-{offset + length - 1}"})

    @_answered
    def _download(self, key: bytes, headers: dict[str, str] | None = None) -> bytes:
        """The object's bytes as stored, read in one call (blocks are at most 4 MiB).

        No checksum, no decoding: the block's own hash is checked by the cache.
        """
        try:
            return self._media("GET", f"/download/storage/v1/b/{self.bucket_name}/o/"
                               f"{self._object(key)}", {"alt": "media"}, headers)
        except gexc.NotFound as e:
            _free(e)
            raise BlockNotFound(key.hex()) from None

    @_answered
    def put(self, key: bytes, data: bytes | memoryview) -> bool:
        """A conditional create (ifGenerationMatch=0): 412 if the block is there already.

        A multipart upload (metadata, then the bytes), as the client sends
        small objects: the emulator ignores the precondition of a plain media
        upload. The body is sent as its three parts, without joining them;
        the boundary is random, as the client's (128 bits: no block holds it).
        """
        boundary = b"nimbusfs-" + os.urandom(16).hex().encode()
        meta = json.dumps({"name": self.prefix + key.hex(),
                           "contentType": "application/octet-stream"}).encode()
        head = (b"--" + boundary + b"\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                + meta + b"\r\n--" + boundary
                + b"\r\nContent-Type: application/octet-stream\r\n\r\n")
        tail = b"\r\n--" + boundary + b"--\r\n"
        try:
            self._media("POST", f"/upload/storage/v1/b/{self.bucket_name}/o",
                        {"uploadType": "multipart", "ifGenerationMatch": 0},
                        {"Content-Type": f"multipart/related; boundary={boundary.decode()}",
                         "Content-Length": str(len(head) + len(data) + len(tail))},
                        (head, data, tail))
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
        for key, _, _ in self.objects():
            yield key

    def objects(self) -> Iterator[tuple[bytes, int, float]]:
        """The time of a block is its object's creation time (a put never rewrites one).

        Objects under the prefix whose names are not block hashes are not
        the store's and are skipped.
        """
        for blob in self._client().list_blobs(self.bucket_name, prefix=self.prefix or None,
                                              **self._bounds):
            name = blob.name[len(self.prefix):]
            if len(name) != 2 * HASH_LEN or name.strip(string.hexdigits):
                continue
            yield bytes.fromhex(name), blob.size, blob.time_created.timestamp()
