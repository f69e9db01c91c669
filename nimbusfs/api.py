"""The HTTP API ``/api/v1``: a thin translation onto the namespace functions.

Served by the metaserver process on the same trio loop as the mount
protocol (hypercorn's trio worker; FastAPI/Starlette through anyio). Every
route but the OpenAPI document and its browsable docs needs
``Authorization: Bearer nfs_...`` (the mount protocol's tokens) and runs as
that user: a file of another user is 404, exactly like one that does not
exist. Each call is one transaction of a ``nimbusfs.server.namespace`` (or
``feed``) function, so the rules (names, quotas, optimistic locking, block
ownership) are the mount's; file bytes go through ``BlockAccess`` (cut into
the mount's blocks, stored once, hash-checked when read). The routes'
signatures and models are the one declaration of the API: FastAPI derives
the validation and ``/api/v1/openapi.json`` from them. Errors are JSON
``{"error": {"code", "message"}}``, a 4xx for anything the client sent
wrong; nothing answers a traceback.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes'
# annotations at run time, and those of routes defined inside ``router`` name
# its local aliases.
import errno
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import cachetools
import psycopg
import trio
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from nimbusfs import metrics
from nimbusfs.errors import Conflict, FSError
from nimbusfs.server import feed, namespace, uploads
from nimbusfs.server.auth import User, authenticate

if TYPE_CHECKING:
    from nimbusfs.server.metaserver import MetaServer

log = logging.getLogger(__name__)

# An authenticated token is trusted this long without asking the database
# (a revoked token keeps working at most this long on one server).
TOKEN_TTL = 60.0
LIST_LIMIT = 1000
# Bounds of a long-poll's wait, in seconds (Dropbox's: 30 to 480).
LONGPOLL_MIN, LONGPOLL_MAX = 30, 480
# Form fields besides the file (path, parent_id, overwrite ...), and their size.
MAX_FIELDS = 16
MAX_FIELD_BYTES = 64 << 10
# The body of any request but an upload (JSON: a move, a folder, a restore ...).
MAX_SMALL_BODY = 64 << 10
# A multipart body reaches its parser in pieces of at least this size: the
# parser writes a file's bytes with one worker-thread hop per piece it is
# given, and hypercorn receives 64 KiB at a time (16,384 hops for 1 GiB).
FORM_PIECE = 1 << 20
# Resumable uploads: the chunk size suggested to clients, and the largest taken.
CHUNK_SIZE = 8 << 20
MAX_CHUNK = 256 << 20
# A refused request's body is read (so that the client hears the answer) up to this:
# an authenticated client's own upload chunk.
MAX_DRAIN = MAX_CHUNK

_STATUS = {
    errno.ENOENT: (404, "not_found"), errno.EEXIST: (409, "exists"),
    errno.ENOTEMPTY: (409, "not_empty"), errno.EBUSY: (409, "busy"),
    errno.EACCES: (403, "forbidden"), errno.EPERM: (403, "forbidden"),
    errno.EINVAL: (400, "bad_request"), errno.ENAMETOOLONG: (400, "name_too_long"),
    errno.EISDIR: (400, "is_a_folder"), errno.ENOTDIR: (400, "not_a_folder"),
    errno.EDQUOT: (507, "quota_exceeded"), errno.ENOSPC: (507, "no_space"),
    errno.EFBIG: (413, "too_large"), errno.EIO: (503, "unavailable"),
    errno.ESPIPE: (409, "wrong_offset"), errno.EAGAIN: (409, "incomplete"),
}

Id = Annotated[int, Path(ge=1, le=namespace.BIGINT_MAX, description="a file or folder id")]
# Integers in bodies: what a PostgreSQL bigint holds (ids, sizes, versions).
Count = Annotated[int, Field(ge=0, le=namespace.BIGINT_MAX)]
Ref = Annotated[int, Field(ge=1, le=namespace.BIGINT_MAX)]


# --- models: the shapes clients are written against -----------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FileMeta(_Model):
    id: int
    name: str
    path: str | None
    parent_id: int | None
    kind: str
    size: int
    version: int
    content_hash: str
    modified: str


class Listing(_Model):
    id: int
    path: str
    has_more: bool
    cursor: str | None
    entries: list[FileMeta]


class Move(_Model):
    name: str | None = None
    parent_id: Ref | None = None


class NewFolder(_Model):
    path: str | None = None
    parent_id: Ref | None = None
    name: str | None = None


class Restore(_Model):
    version: Ref


class VersionInfo(_Model):
    version: int
    size: int
    content_hash: str
    modified: str
    device: str
    user: str


class Versions(_Model):
    versions: list[VersionInfo]


class SyncEntry(_Model):
    id: int
    name: str
    path: str | None
    parent_id: int | None
    kind: str | None = None
    size: int | None = None
    version: int | None = None
    content_hash: str | None = None
    modified: str | None = None
    deleted: bool
    own: bool


class SyncPage(_Model):
    cursor: str
    has_more: bool
    reset: bool
    to_download: list[SyncEntry]


class _Totals(_Model):
    logical_size: int
    stored_size: int
    unique_blocks_size: int
    block_count: int
    dedup_ratio: float
    file_count: int
    version_count: int


class StoreTotals(_Totals):
    user_count: int


class StorageStats(_Totals):
    quota: int
    used: int
    store: StoreTotals | None = None   # for an administrator: every volume together


class NewUpload(_Model):
    filename: str
    size: Count
    checksum: str | None = None       # SHA-256 of the whole file, hex
    path: str | None = None
    parent_id: Ref | None = None
    file_id: Ref | None = None        # replace this file's content instead
    expected_version: Count | None = None
    overwrite: bool = False
    autorename: bool = False


class UploadSession(_Model):
    upload_id: str
    chunk_size: int
    expires: str


class Chunk(_Model):
    n: int
    size: int


class UploadStatus(_Model):
    upload_id: str
    size: int
    uploaded_bytes: int
    chunks: list[Chunk]
    expires: str
    completed: bool


class Completed(FileMeta):
    file_id: int


class LongPoll(_Model):
    changes: bool
    backoff: int


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = headers or {}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status,
                        headers)


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def _name(raw: bytes) -> str:
    # Names are bytes: one that is not UTF-8 (made through a mount) is shown
    # with \xNN escapes for its other bytes; such a file is reached by its id.
    return raw.decode("utf-8", "backslashreplace")


def _raw(name: str) -> bytes:
    """A name or path a client sent, as bytes: UTF-8 only (lone surrogates are refused)."""
    if "\ufffd" in name:   # what Starlette made of a query's bytes that were not UTF-8
        raise _bad("a name must be UTF-8")
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("a name must be UTF-8") from None


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def _kind(mode: int) -> str:
    fmt = mode & 0o170000
    return {0o040000: "folder", 0o100000: "file", 0o120000: "symlink"}.get(fmt, "other")


def _meta(e: dict[str, Any], path: bytes) -> dict[str, Any]:
    return {"id": e["ino"], "name": _name(e["name"]), "path": _name(path),
            "parent_id": e["parent"], "kind": _kind(e["mode"]), "size": e["size"],
            "version": e["version"], "content_hash": e["content_hash"],
            "modified": _iso(e["mtime"])}


def _int(value: str | None, what: str, lo: int = 0, hi: int = namespace.BIGINT_MAX
         ) -> int | None:
    """A form field as an int, None if absent (form fields are parsed here, with the
    parser's limits)."""
    if value is None or value == "":
        return None
    if not re.fullmatch(r"[0-9]{1,19}", value) or not lo <= int(value) <= hi:
        raise _bad(f"{what} must be an integer from {lo} to {hi}")
    return int(value)


def _bool(value: str | None, what: str) -> bool:
    if value in (None, "", "false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise _bad(f"{what} must be true or false")


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``Range: bytes=...`` asks for, as [start, end); None: the whole file.

    Several ranges are answered with the whole file (RFC 9110 allows it); a
    range that starts past the end is 416.
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if m is None or (not m[1] and not m[2]):
        return None
    if size == 0:
        raise ApiError(416, "range_not_satisfiable", "the file is empty", size=0)
    if not m[1]:                                  # the last N bytes
        if int(m[2]) == 0:
            raise ApiError(416, "range_not_satisfiable", "empty suffix range", size=size)
        return max(0, size - int(m[2])), size
    start = int(m[1])
    end = min(size, int(m[2]) + 1) if m[2] else size
    if start >= size or end <= start:
        raise ApiError(416, "range_not_satisfiable", f"the file has {size} bytes", size=size)
    return start, end


_RAW = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
_MULTIPART = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "path": {"type": "string"}, "parent_id": {"type": "integer"},
        "overwrite": {"type": "boolean"}, "autorename": {"type": "boolean"},
        "expected_version": {"type": "integer"}}}}}}}


_BEARER = HTTPBearer(auto_error=False, description="a token: nfs_...")


class Gate:
    """Before any route: the token is checked and a small request's body bounded.

    ``/metrics`` (Prometheus text, outside ``/api/v1``) needs no token from
    this host's loopback (a scraper beside the server; ``nimbusfs status``)
    and an administrator's token from anywhere else: a user's token is 403.

    Pure ASGI, in front of FastAPI, which reads a JSON body before it runs a
    route's dependencies: a stranger's 300 MB body was read into memory
    (1.8 GB peak RSS) before its 401. Here a request without a valid token
    is answered before a byte of its body is read, and the connection closed;
    a body of any route but the uploads must declare its length (411) and
    stay under ``MAX_SMALL_BODY`` (413).
    """

    PUBLIC = frozenset({"/api/v1/openapi.json", "/api/v1/docs",
                        "/api/v1/docs/oauth2-redirect"})
    UPLOADS = re.compile(r"/api/v1/(?:files(?:/\d+)?|uploads/[^/]+(?:/chunks/\d+)?)")

    def __init__(self, app: Any, api: "Api") -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.PUBLIC:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        try:
            peer = scope["client"][0] if scope.get("client") else ""
            if scope["path"] == "/metrics" and metrics.is_loopback(peer):
                return await self.app(scope, receive, send)
            user = await self.api.authenticate(peer, headers.get("authorization", ""))
            if scope["path"] == "/metrics" and not user.admin:
                raise ApiError(403, "forbidden", "the metrics need an administrator's token"
                               " off this host")
            scope.setdefault("state", {})["user"] = user
            if not (scope["method"] in ("POST", "PUT") and self.UPLOADS.fullmatch(scope["path"])):
                length = headers.get("content-length")
                if length is None and "chunked" in headers.get("transfer-encoding", ""):
                    raise ApiError(411, "length_required", "a body needs a Content-Length")
                if length is not None and not (length.isdigit()
                                               and int(length) <= MAX_SMALL_BODY):
                    raise ApiError(413, "too_large",
                                   f"a request body is at most {MAX_SMALL_BODY} bytes here")
        except ApiError as e:
            # A stranger's body is skipped for 1 MiB at most, a user's like any refused one.
            limit = MAX_DRAIN if scope.get("state", {}).get("user") else 1 << 20
            await _skip(receive, limit)
            response = _error(e.status, e.code, e.message,
                              {**e.headers, "Connection": "close"}, **e.extra)
            return await response(scope, receive, send)
        except psycopg.OperationalError as e:
            log.error("database unavailable: %s", e)
            response = _error(503, "unavailable", "the database is unavailable",
                              {"Connection": "close"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def _skip(receive: Any, limit: int) -> None:
    """Read and drop up to ``limit`` bytes of a request's body (ASGI ``receive``)."""
    seen = 0
    while seen <= limit:
        msg = await receive()
        seen += len(msg.get("body", b""))
        if msg["type"] != "http.request" or not msg.get("more_body"):
            return


class Api:
    """The routes; ``server`` gives transactions (``call``) and blocks (``blocks``)."""

    def __init__(self, server: "MetaServer") -> None:
        self.server = server
        self.tokens: cachetools.TTLCache[bytes, User] = cachetools.TTLCache(10_000, TOKEN_TTL)

    @staticmethod
    def user(request: Request,
             _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> User:
        """The request's user, authenticated by ``Gate`` before any of its body was read
        (the dependency declares the bearer scheme in the OpenAPI document)."""
        return request.state.user

    async def authenticate(self, peer: str, authorization: str) -> User:
        """The token's user. Wrong tokens count against the client's address as the
        mount protocol's do (``MetaServer.wrong_tokens``): past the burst, 429."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "an Authorization: Bearer token is required")
        key = hashlib.sha256(token.encode()).digest()
        user = self.tokens.get(key)
        if user is None:
            if not self.server.wrong_tokens.allowed(peer):
                self.server.refused(peer, "too many wrong tokens")
                raise ApiError(429, "too_many_requests", "too many wrong tokens from this"
                               " address; try again later", {"Retry-After": "1"})
            try:
                user = await self.server.call(authenticate, token)
            except FSError as e:
                self.server.wrong_tokens.failed(peer)
                self.server.refused(peer, e.message)
                raise ApiError(401, "unauthorized", "invalid token") from None
            self.tokens[key] = user
        return user

    def router(self) -> APIRouter:
        """The routes, each a few lines onto one namespace call."""
        r = APIRouter(prefix="/api/v1", dependencies=[Depends(self.user)])
        User_ = Annotated[User, Depends(self.user)]
        Device = Annotated[str, Header(alias="X-Device-ID", max_length=200)]

        async def run(user: User, device: str, fn: Any, *args: Any) -> Any:
            return await self.server.call(fn, user, device, *args)

        async def change(user: User, device: str, fn: Any, *args: Any) -> Any:
            """A namespace mutation: applied once even if its COMMIT's answer is lost."""
            return await self.server.mutate(fn, user, device, *args)

        async def meta(user: User, ino: int) -> dict[str, Any]:
            e = await run(user, "http", namespace.entry, ino)
            return _meta(e, e["path"])

        async def folder(user: User, parent_id: str | int | None, path: str | None) -> int:
            """The folder named by ``parent_id`` or ``path``; the root by default."""
            if parent_id not in (None, "") and path not in (None, ""):
                raise _bad("give parent_id or path, not both")
            if path not in (None, ""):
                return await run(user, "http", namespace.resolve, _raw(path))
            if isinstance(parent_id, int):
                return parent_id
            ino = _int(parent_id, "parent_id", lo=1)
            return user.root if ino is None else ino

        @r.get("/files/{id}", response_model=FileMeta)
        async def get_file(user: User_, id: Id) -> dict[str, Any]:
            return await meta(user, id)

        @r.get("/files", response_model=Listing)
        async def list_files(
                user: User_,
                path: Annotated[str | None, Query(max_length=4096)] = None,
                parent_id: Annotated[int | None, Query(ge=1, le=namespace.BIGINT_MAX)] = None,
                limit: Annotated[int, Query(ge=1, le=LIST_LIMIT)] = 100,
                cursor: Annotated[str | None, Query(pattern=r"^(?:[0-9a-f]{2}){1,255}$")] = None,
        ) -> dict[str, Any]:
            """A folder's entries in name order, ``limit`` at a time (``cursor`` continues)."""
            ino = await folder(user, parent_id, path)
            e = await run(user, "http", namespace.entry, ino)
            rows = await run(user, "http", namespace.children, ino,
                             bytes.fromhex(cursor) if cursor else None, limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            base = e["path"].rstrip(b"/")
            return {"id": ino, "path": _name(e["path"]), "has_more": more,
                    "cursor": rows[-1]["name"].hex() if more else None,
                    "entries": [_meta(x, base + b"/" + x["name"]) for x in rows]}

        @r.get("/files/{id}/content", response_class=StreamingResponse,
               responses={200: {"content": {"application/octet-stream": {}}},
                          206: {"description": "the range asked for"}, 304: {}, 416: {}})
        async def content(
                user: User_, id: Id,
                version: Annotated[int | None, Query(ge=1, le=namespace.BIGINT_MAX)] = None,
                range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
                if_none_match: Annotated[str | None, Header(max_length=1000)] = None,
                if_range: Annotated[str | None, Header(max_length=200)] = None,
        ) -> Response:
            """The file's bytes (or an old version's), streamed; one Range is honoured.

            ``If-None-Match`` (a list, weak tags, ``*``) answers 304 for the
            current content; ``If-Range`` with another tag (a newer version
            since a partial download began) gets the whole file, not a range.
            """
            r_ = await run(user, "http", namespace.open_file, id, version)
            attr, extents = r_["attr"], r_["extents"]
            if _kind(attr["mode"]) != "file":
                raise _bad("only a file has content")
            size = sum(n for _, n in extents)
            etag = f'"{namespace.content_hash(extents)}"'
            headers = {"ETag": etag, "Accept-Ranges": "bytes"}
            tags = {t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")}
            if etag in tags or "*" in tags:
                return Response(status_code=304, headers=headers)
            span = _range(range_, size) if if_range in (None, etag) else None
            start, end = span or (0, size)
            headers["Content-Length"] = str(end - start)
            if span is not None:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            return StreamingResponse(self.server.blocks.read(extents, start, end),
                                     206 if span else 200, headers,
                                     media_type="application/octet-stream")

        @r.post("/files", status_code=201, response_model=FileMeta, openapi_extra=_MULTIPART)
        async def upload(request: Request, user: User_, device: Device = "http"
                         ) -> dict[str, Any]:
            """A new file from the multipart field ``file`` (its filename is the name).

            A taken name is 409 unless ``overwrite`` (a new version of that
            file) or ``autorename`` (``name (1).ext``).
            """
            await self._room(request, user)
            async with self._form(request) as (file, fields):
                if not file.filename:
                    raise _bad("the file part needs a filename")
                where = await folder(user, fields.get("parent_id"), fields.get("path"))
                on_exists = ("autorename" if _bool(fields.get("autorename"), "autorename")
                             else "overwrite" if _bool(fields.get("overwrite"), "overwrite")
                             else "fail")
                name = _raw(file.filename)
                made = await self._commit_file(
                    user, file, lambda ext, size: change(user, device, namespace.put_file, where,
                                                         name, ext, size, time.time_ns(),
                                                         on_exists))
            return await meta(user, made["id"])

        @r.put("/files/{id}", response_model=FileMeta, openapi_extra=_MULTIPART)
        async def replace(request: Request, user: User_, id: Id, device: Device = "http"
                          ) -> dict[str, Any]:
            """New content for a file; a stale ``expected_version`` is 409 and changes nothing."""
            async with self._form(request) as (file, fields):
                expected = _int(fields.get("expected_version"), "expected_version")
                await self._commit_file(
                    user, file, lambda ext, size: change(user, device, namespace.replace, id, ext,
                                                         size, time.time_ns(), expected))
            return await meta(user, id)

        @r.patch("/files/{id}", response_model=FileMeta)
        async def move(user: User_, id: Id, body: Move, device: Device = "http"
                       ) -> dict[str, Any]:
            """Rename and/or move; a taken name is 409."""
            await change(user, device, namespace.move, id, body.parent_id,
                         None if body.name is None else _raw(body.name))
            return await meta(user, id)

        @r.delete("/files/{id}", status_code=204, response_class=Response)
        async def delete(user: User_, id: Id, device: Device = "http") -> Response:
            """Delete a file, or an empty folder (409 if not empty)."""
            await change(user, device, namespace.remove, id)
            return Response(status_code=204)

        @r.post("/folders", status_code=201, response_model=FileMeta)
        async def make_folder(user: User_, body: NewFolder, device: Device = "http"
                              ) -> dict[str, Any]:
            """A new folder at ``path``, or ``name`` in ``parent_id``."""
            if body.path is not None and body.parent_id is None and body.name is None:
                parent_path, _, name = body.path.rstrip("/").rpartition("/")
                where: int | bytes = _raw(parent_path)
            elif body.path is None and body.parent_id is not None and body.name is not None:
                where, name = body.parent_id, body.name
            else:
                raise _bad("give either {path} or {parent_id, name}")
            made = await change(user, device, namespace.make_folder, where, _raw(name))
            return await meta(user, made["id"])

        @r.get("/files/{id}/versions", response_model=Versions)
        async def versions(user: User_, id: Id) -> dict[str, Any]:
            rows = await run(user, "http", namespace.versions, id)
            return {"versions": [
                {"version": v["version"], "size": v["size"], "content_hash": v["content_hash"],
                 "modified": _iso(int(v["time"] * 1e9)), "device": v["device"],
                 "user": v["user"]} for v in rows]}

        @r.post("/files/{id}/restore", response_model=FileMeta)
        async def restore(user: User_, id: Id, body: Restore, device: Device = "http"
                          ) -> dict[str, Any]:
            """Make an old version current again, as a new version."""
            await change(user, device, namespace.restore, id, body.version)
            return await meta(user, id)

        @r.get("/sync", response_model=SyncPage)
        async def sync(user: User_, cursor: Annotated[str, Query(max_length=100)] = "0",
                       limit: Annotated[int, Query(ge=1, le=LIST_LIMIT)] = 500,
                       device: Device = "") -> dict[str, Any]:
            """What changed since ``cursor`` (``0``: everything), as current entries."""
            page = await run(user, device, feed.page, cursor, limit)
            out = []
            for e in page["entries"]:
                if e["deleted"]:
                    out.append({"id": e["ino"], "name": _name(e["name"]), "path": None,
                                "parent_id": e["parent"], "deleted": True, "own": e["own"]})
                else:
                    out.append({**_meta(e, e["path"]), "deleted": False, "own": e["own"]})
            return {"cursor": page["cursor"], "has_more": page["has_more"],
                    "reset": page["reset"], "to_download": out}

        @r.get("/sync/longpoll", response_model=LongPoll)
        async def longpoll(user: User_, cursor: Annotated[str, Query(max_length=100)] = "0",
                           timeout: Annotated[int, Query(ge=LONGPOLL_MIN,
                                                         le=LONGPOLL_MAX)] = 30
                           ) -> dict[str, Any]:
            """``changes: true`` as soon as the volume changed after ``cursor``."""
            with self.server.watching(user.id) as changed:
                # Watching first: a change committed during this look still wakes it.
                if await run(user, "http", feed.pending, cursor):
                    return {"changes": True, "backoff": 0}
                with trio.move_on_after(timeout):
                    await changed.wait()
            return {"changes": changed.is_set(), "backoff": 0}

        def upload_status(upload_id: str, st: dict[str, Any]) -> dict[str, Any]:
            return {"upload_id": upload_id, "size": st["size"],
                    "uploaded_bytes": st["uploaded_bytes"], "chunks": st["chunks"],
                    "expires": st["expires"].isoformat(), "completed": st["completed"]}

        UploadId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

        @r.post("/uploads", status_code=201, response_model=UploadSession)
        async def new_upload(user: User_, body: NewUpload) -> dict[str, Any]:
            """Open a resumable upload of ``size`` bytes (507 if the quota cannot take it)."""
            if body.checksum is not None and not re.fullmatch(r"[0-9a-f]{64}", body.checksum):
                raise _bad("checksum must be a SHA-256 in hex")
            parent = None
            if body.file_id is None:
                parent = await folder(user, body.parent_id, body.path)
            on_exists = ("autorename" if body.autorename
                         else "overwrite" if body.overwrite else "fail")
            made = await run(user, "http", uploads.create, _raw(body.filename), parent,
                             body.file_id, body.expected_version, on_exists, body.size,
                             bytes.fromhex(body.checksum) if body.checksum else None)
            return {"upload_id": made["upload_id"], "chunk_size": CHUNK_SIZE,
                    "expires": made["expires"].isoformat()}

        @r.put("/uploads/{upload_id}/chunks/{n}", response_model=UploadStatus,
               openapi_extra=_RAW)
        async def put_chunk(request: Request, user: User_, upload_id: UploadId,
                            n: Annotated[int, Path(ge=0, le=uploads.MAX_CHUNKS)]
                            ) -> dict[str, Any]:
            """Chunk ``n`` of the upload (raw body); sent again, it replaces itself.

            The upload's existence and the room left under its declared size
            are checked before a byte of the body is read.
            """
            st = await self._open_upload(user, upload_id)
            if n >= min(uploads.MAX_CHUNKS, max(st["size"], 1)):
                raise _bad(f"chunk {n} is past the upload's declared size")
            room = st["size"] - sum(c["size"] for c in st["chunks"] if c["n"] != n)
            extents, size = await self._chunk(request, user, room)
            st = await run(user, "http", uploads.add_chunk, upload_id, n, size, extents)
            return upload_status(upload_id, st)

        @r.put("/uploads/{upload_id}", response_model=UploadStatus, openapi_extra=_RAW)
        async def put_range(request: Request, user: User_, upload_id: UploadId,
                            content_range: Annotated[str, Header(max_length=100)]
                            ) -> dict[str, Any]:
            """Bytes ``Content-Range: bytes A-B/TOTAL`` from where the upload stands.

            A that is not where the received bytes end (nor the start of a
            chunk received, which is then replaced) is 409 with the offset to
            resume from.
            """
            m = re.fullmatch(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)", content_range)
            if m is None or int(m[2]) < int(m[1]):
                raise _bad("Content-Range must be 'bytes A-B/TOTAL'")
            first, length = int(m[1]), int(m[2]) - int(m[1]) + 1
            st = await self._open_upload(user, upload_id)
            if (m[3] != "*" and int(m[3]) != st["size"]) or first + length > st["size"]:
                raise _bad(f"Content-Range {content_range!r} does not fit the upload's"
                           f" declared size of {st['size']} bytes")
            try:
                n = await run(user, "http", uploads.chunk_at, upload_id, first)
                extents, size = await self._chunk(request, user, length)
                if size != length:
                    raise _bad(f"Content-Range names {length} bytes, the body has {size}")
                st = await run(user, "http", uploads.add_chunk, upload_id, n, size, extents,
                               first)
            except FSError as e:
                if e.errno != errno.ESPIPE:
                    raise
                st = await run(user, "http", uploads.status, upload_id)
                raise ApiError(409, "wrong_offset", e.message,
                               offset=st["uploaded_bytes"]) from None
            return upload_status(upload_id, st)

        @r.get("/uploads/{upload_id}", response_model=UploadStatus)
        async def get_upload(user: User_, upload_id: UploadId) -> dict[str, Any]:
            """What the server holds: chunks, and how many bytes from the start are in."""
            return upload_status(upload_id, await run(user, "http", uploads.status, upload_id))

        @r.post("/uploads/{upload_id}/complete", response_model=Completed)
        async def complete(user: User_, upload_id: UploadId, device: Device = "http"
                           ) -> dict[str, Any]:
            """Commit the upload as a file version; repeated, it answers the same.

            Missing chunks are 409 naming them; a declared checksum that the
            bytes do not match is 422 and commits nothing.
            """
            info = await run(user, device, uploads.extents, upload_id)
            if info["result"] is None and info["checksum"] is not None:
                digest = await self._sha256(info["extents"], info["size"])
                if digest != bytes(info["checksum"]):
                    raise ApiError(422, "checksum_mismatch",
                                   f"the bytes have SHA-256 {digest.hex()}")
            ino = await run(user, device, uploads.complete, upload_id, info["extents"],
                            info["size"], time.time_ns())
            return {**await meta(user, ino), "file_id": ino}

        @r.delete("/uploads/{upload_id}", status_code=204, response_class=Response)
        async def abort_upload(user: User_, upload_id: UploadId) -> Response:
            await run(user, "http", uploads.abort, upload_id)
            return Response(status_code=204)

        @r.get("/storage/stats", response_model=StorageStats)
        async def storage_stats(user: User_) -> dict[str, Any]:
            """The volume's size, and how much deduplication saves (``dedup_ratio``).

            An administrator's answer also holds the whole store's (``store``).
            """
            def ratio(st: dict[str, Any]) -> dict[str, Any]:
                unique = st["unique_blocks_size"]
                return {**st, "dedup_ratio": round(st["stored_size"] / unique, 3) if unique
                        else 1.0}
            out = ratio(await run(user, "http", namespace.storage_stats))
            if user.admin:
                out["store"] = ratio(await run(user, "http", namespace.store_stats))
            return out

        return r

    @staticmethod
    @asynccontextmanager
    async def _form(request: Request) -> AsyncIterator[tuple[UploadFile, dict[str, str]]]:
        """The multipart body's ``file`` and its other fields (query parameters too).

        Parsed here rather than by FastAPI so that python-multipart's limits
        are ours: one file, a few small fields; and so that the parser gets
        the body in ``FORM_PIECE``s. The spooled file is removed on the way
        out.
        """
        if not request.headers.get("Content-Type", "").lower().startswith(
                "multipart/form-data"):
            raise _bad("the body must be multipart/form-data")
        try:
            async with aclosing(_pieces(request.stream(), FORM_PIECE)) as body:
                form = await MultiPartParser(request.headers, body, max_files=1,
                                             max_fields=MAX_FIELDS,
                                             max_part_size=MAX_FIELD_BYTES).parse()
        except MultiPartException as e:
            raise _bad(e.message) from None
        except (AssertionError, ValueError):
            raise _bad("the body must be multipart/form-data") from None
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise _bad("a multipart field 'file' is required")
            yield file, {**request.query_params,
                         **{k: v for k, v in form.items() if isinstance(v, str)}}
        finally:
            await form.close()

    async def _chunk(self, request: Request, user: User, room: int) -> tuple[list, int]:
        """A raw request body spooled to disk, then stored as blocks.

        At most ``room`` bytes (and ``MAX_CHUNK``): a longer declared
        ``Content-Length`` is refused before the body is read, a longer body
        as soon as it is longer; nothing of a refused chunk is stored.
        """
        room = min(room, MAX_CHUNK)
        if _declared(request) > room:
            raise ApiError(413, "too_large", f"the chunk is larger than the {room} bytes left"
                           " in the upload")
        with tempfile.TemporaryFile() as f:
            size = 0
            async for piece in request.stream():
                size += len(piece)
                if size > room:
                    raise ApiError(413, "too_large", f"the chunk is larger than the {room}"
                                   " bytes left in the upload")
                f.write(piece)   # into the page cache: cheaper than a thread hop per piece
            f.flush()
            return await self.server.blocks.ingest(user, f.fileno(), size), size

    async def _open_upload(self, user: User, upload_id: str) -> dict[str, Any]:
        """An upload's status, if it still takes chunks (409 once complete)."""
        st = await self.server.call(uploads.status, user, "http", upload_id)
        if st["completed"]:
            raise FSError(errno.EBUSY, "the upload is complete")
        return st

    async def _room(self, request: Request, user: User) -> None:
        """507 before reading a body that cannot fit the user's quota (a new file)."""
        declared = _declared(request)
        if declared < 0:
            return
        st = await self.server.call(namespace.statfs, user, "http")
        if st["quota"] and declared > st["quota"] - st["used"] + MAX_FIELD_BYTES:
            raise ApiError(507, "quota_exceeded", f"{st['quota'] - st['used']} bytes are"
                           " free under the quota")

    async def _sha256(self, extents: list, size: int) -> bytes:
        h = hashlib.sha256()
        async for piece in self.server.blocks.read(extents, 0, size):
            await trio.to_thread.run_sync(h.update, piece)
        return h.digest()

    async def _commit_file(self, user: User, file: UploadFile,
                           commit: Callable[[list, int], Awaitable[Any]]) -> Any:
        """Store the uploaded file's blocks and ``commit(extents, size)`` them.

        A commit refused with EAGAIN found a block that block GC collected
        between the two (only with a grace shorter than the upload): the
        blocks are stored again, once.
        """
        try:
            return await commit(*await self._ingest(user, file))
        except FSError as e:
            if e.errno != errno.EAGAIN:
                raise
        return await commit(*await self._ingest(user, file))

    async def _ingest(self, user: User, file: UploadFile) -> tuple[list, int]:
        """The uploaded file's blocks stored; its extents and size.

        The multipart parser spooled the file (to disk past 1 MiB); it is
        chunked from its descriptor, never read whole into memory.
        """
        fd = file.file.fileno()  # a spooled file still in memory is written out first
        size = os.fstat(fd).st_size
        return await self.server.blocks.ingest(user, fd, size), size


async def _pieces(stream: AsyncIterator[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """``stream``'s bytes in pieces of at least ``size`` bytes (the last one may be shorter)."""
    held: list[bytes] = []
    n = 0
    async for piece in stream:
        held.append(piece)
        n += len(piece)
        if n >= size:
            yield b"".join(held)
            held.clear()
            n = 0
    if held:
        yield b"".join(held)


def _declared(request: Request) -> int:
    """The body's length its ``Content-Length`` declares; -1 if it declares none."""
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else -1


async def _drain(request: Request) -> dict[str, str]:
    """Read what is left of a refused request's body, so that the client hears the answer.

    An HTTP/1.1 client sends its whole body before it reads the response:
    refused unread, a large upload chunk would stall it until its timeout.
    A body declared larger than ``MAX_DRAIN``, or growing past it, is not
    read: the connection is closed instead.
    """
    if _declared(request) > MAX_DRAIN:
        return {"Connection": "close"}
    try:
        seen = 0
        async for piece in request.stream():
            seen += len(piece)
            if seen > MAX_DRAIN:
                return {"Connection": "close"}
    except Exception:
        pass
    return {}


def make_app(server: "MetaServer") -> FastAPI:
    app = FastAPI(title="nimbusfs", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None)
    api = Api(server)
    app.include_router(api.router())
    app.add_middleware(Gate, api=api)
    app.add_middleware(metrics.HttpMetrics)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_text() -> Response:
        """The metaserver's figures, Prometheus text (``Gate`` decides who may read them)."""
        return Response(generate_latest(metrics.SERVER), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.code, e.message, {**e.headers, **await _drain(request)},
                      **e.extra)

    @app.exception_handler(FSError)
    async def fs_error(request: Request, e: FSError) -> JSONResponse:
        headers = await _drain(request)
        if isinstance(e, Conflict):
            return _error(409, "stale_version", e.message, headers, current_version=e.current)
        status, code = _STATUS.get(e.errno, (500, "internal"))
        if status >= 500 and status != 507:
            log.error("HTTP %s %s: %s", request.method, request.url.path, e)
        return _error(status, code, e.message, headers)

    @app.exception_handler(OSError)
    async def os_error(request: Request, e: OSError) -> JSONResponse:
        # The server's own disk: spooling a request body (tempfile) filled it.
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("HTTP %s %s: %s", request.method, request.url.path, e)
            return _error(507, "no_space", "the server has no room to take the upload")
        raise e

    @app.exception_handler(psycopg.OperationalError)
    async def db_error(request: Request, e: psycopg.OperationalError) -> JSONResponse:
        log.error("database unavailable: %s", e)
        return _error(503, "unavailable", "the database is unavailable")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        code = "not_found" if first.get("loc", ("",))[0] == "path" else "bad_request"
        return _error(404 if code == "not_found" else 400, code,
                      f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, "not_found" if e.status_code == 404 else "bad_request",
                      str(e.detail))

    return app


def _http1_only() -> None:
    """Keep hypercorn from switching a cleartext connection to HTTP/2.

    It does so on the HTTP/2 preface or an ``Upgrade: h2c``, with no setting
    to turn it off, and its HTTP/2 handling let one client stop the whole
    metaserver: DATA frames for a stream already answered (a refused body)
    raised KeyError out of its connection's task group and the server's.
    The API speaks HTTP/1.1 only (over TLS, ALPN offers nothing else).
    """
    from hypercorn.protocol.h11 import H11Protocol

    async def no_switch(self: H11Protocol, event: object) -> None:
        return None

    H11Protocol._check_protocol = no_switch  # type: ignore[method-assign]


async def serve_http(server: "MetaServer", address: str, certfile: str | None = None,
                     keyfile: str | None = None,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on ``HOST:PORT`` until cancelled; ``started`` with its base URL.

    With ``certfile`` (the mount protocol's ``--tls-cert``) it is HTTPS.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    _http1_only()
    config = Config()
    config.bind = [address]
    config.alpn_protocols = ["http/1.1"]
    config.certfile, config.keyfile = certfile, keyfile
    config.accesslog = None
    config.include_server_header = False
    async with trio.open_nursery() as nursery:
        # FastAPI's ASGI callable is typed by Starlette, hypercorn's parameter by
        # hypercorn: the same protocol, two sets of type declarations.
        app: Any = make_app(server)
        binds = await nursery.start(partial(serve, app, config))
        task_status.started(binds[0])
