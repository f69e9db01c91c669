"""The HTTP API ``/api/v1``: a thin translation onto the namespace functions.

Served by the metaserver process on the same trio loop as the mount
protocol (hypercorn's trio worker, Starlette through anyio). Every route but
the OpenAPI document needs ``Authorization: Bearer nfs_...`` (the mount
protocol's tokens) and runs as that user: a file of another user is 404,
exactly like one that does not exist. Each call is one transaction of a
``metaserver.namespace`` function, so the rules (names, quotas, optimistic
locking, block ownership) are the mount's; file bytes go through
``BlockAccess`` (cut into the mount's blocks, stored once, hash-checked when
read). Errors are JSON ``{"error": {"code", "message"}}`` with a 4xx for
anything the client sent wrong; nothing answers a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import cachetools
import psycopg
import trio
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from metaserver import feed, namespace
from metaserver.auth import User, authenticate
from metaserver.errors import Conflict, FSError

if TYPE_CHECKING:
    from metaserver.server import MetaServer

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

_STATUS = {
    errno.ENOENT: (404, "not_found"), errno.EEXIST: (409, "exists"),
    errno.ENOTEMPTY: (409, "not_empty"), errno.EBUSY: (409, "busy"),
    errno.ESTALE: (409, "stale_version"), errno.EACCES: (403, "forbidden"),
    errno.EPERM: (403, "forbidden"), errno.EINVAL: (400, "bad_request"),
    errno.ENAMETOOLONG: (400, "name_too_long"), errno.EISDIR: (400, "is_a_folder"),
    errno.ENOTDIR: (400, "not_a_folder"), errno.EDQUOT: (507, "quota_exceeded"),
    errno.ENOSPC: (507, "no_space"), errno.EFBIG: (413, "too_large"),
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status)


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def _name(raw: bytes) -> str:
    # Names are bytes; a name that is not UTF-8 keeps its bytes as lone
    # surrogates, which JSON escapes and a client can send back unchanged.
    return raw.decode("utf-8", "surrogateescape")


def _raw(name: str) -> bytes:
    try:
        return name.encode("utf-8", "surrogateescape")
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


def _int(value: str | None, what: str, default: int | None = None, lo: int = 0,
         hi: int = namespace.BIGINT_MAX) -> int | None:
    if value is None or value == "":
        return default
    if not re.fullmatch(r"[0-9]{1,19}", value) or not lo <= int(value) <= hi:
        raise _bad(f"{what} must be an integer from {lo} to {hi}")
    return int(value)


def _bool(value: str | None, what: str) -> bool:
    if value in (None, "", "false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise _bad(f"{what} must be true or false")


def _ranges(header: str, size: int) -> tuple[int, int] | None:
    """The one byte range ``Range: bytes=...`` asks for, as [start, end); None: all.

    Several ranges are answered with the whole file (allowed by RFC 9110);
    a range that starts past the end is 416.
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:                                  # the last N bytes
        n = int(m[2])
        if n == 0:
            raise ApiError(416, "range_not_satisfiable", "empty suffix range",
                           size=size)
        return max(0, size - n), size
    start = int(m[1])
    end = min(size, int(m[2]) + 1) if m[2] else size
    if start >= size or end <= start:
        raise ApiError(416, "range_not_satisfiable", f"the file has {size} bytes", size=size)
    return start, end


class Api:
    """The routes; ``server`` gives transactions (``call``) and blocks (``blocks``)."""

    def __init__(self, server: MetaServer) -> None:
        self.server = server
        self.tokens: cachetools.TTLCache[bytes, User] = cachetools.TTLCache(10_000, TOKEN_TTL)

    async def user(self, request: Request) -> User:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "an Authorization: Bearer token is required")
        key = hashlib.sha256(token.encode()).digest()
        user = self.tokens.get(key)
        if user is None:
            try:
                user = await self.server.call(authenticate, token)
            except FSError:
                raise ApiError(401, "unauthorized", "invalid token") from None
            self.tokens[key] = user
        return user

    async def run(self, request: Request, fn: Callable[..., Any], *args: Any,
                  **kwargs: Any) -> Any:
        """``fn(cur, user, device, ...)`` in one transaction, as the request's user."""
        user = await self.user(request)
        device = request.headers.get("x-device-id", "http")[:200]
        return await self.server.call(fn, user, device, *args, **kwargs)

    async def meta(self, request: Request, ino: int) -> dict[str, Any]:
        e = await self.run(request, namespace.entry, ino)
        return _meta(e, e["path"])

    # --- routes ---------------------------------------------------------------------

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(await self.meta(request, self._id(request)))

    async def list_files(self, request: Request) -> Response:
        q = request.query_params
        limit = _int(q.get("limit"), "limit", 100, 1, LIST_LIMIT)
        after = bytes.fromhex(q["cursor"]) if _hex(q.get("cursor")) else None
        user = await self.user(request)
        folder = await self._folder(request, q, user)
        e = await self.run(request, namespace.entry, folder)
        rows = await self.run(request, namespace.children, folder, after, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        base = e["path"].rstrip(b"/")
        return JSONResponse({
            "id": folder, "path": _name(e["path"]), "has_more": more,
            "cursor": rows[-1]["name"].hex() if more else None,
            "entries": [_meta(r, base + b"/" + r["name"]) for r in rows]})

    async def content(self, request: Request) -> Response:
        ino = self._id(request)
        version = _int(request.query_params.get("version"), "version", None, 1)
        r = await self.run(request, namespace.open, ino, version)
        attr, extents = r["attr"], r["extents"]
        if _kind(attr["mode"]) != "file":
            raise _bad("only a file has content")
        size = sum(n for _, n in extents)
        etag = f'"{namespace.content_hash(extents)}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes",
                   "Last-Modified": _iso(attr["mtime"])}
        if etag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
            return Response(status_code=304, headers=headers)
        span = _ranges(request.headers.get("range", ""), size)
        start, end = span or (0, size)
        headers["Content-Length"] = str(end - start)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return StreamingResponse(self.server.blocks.read(extents, start, end),
                                 206 if span else 200, headers,
                                 media_type="application/octet-stream")

    async def upload(self, request: Request) -> Response:
        user = await self.user(request)
        async with request.form(max_files=1, max_fields=MAX_FIELDS,
                                max_part_size=MAX_FIELD_BYTES) as form:
            fields = {**request.query_params, **{k: v for k, v in form.items()
                                                   if isinstance(v, str)}}
            file = form.get("file")
            if not isinstance(file, UploadFile) or not file.filename:
                raise _bad("a multipart field 'file' with a filename is required")
            folder = await self._folder(request, fields, user)
            name = _raw(file.filename)
            if _bool(fields.get("autorename"), "autorename"):
                on_exists = "autorename"
            elif _bool(fields.get("overwrite"), "overwrite"):
                on_exists = "overwrite"
            else:
                on_exists = "fail"
            extents, size = await self._ingest(user, file)
            r = await self.run(request, namespace.put_file, folder, name, extents, size,
                               time.time_ns(), on_exists)
        return JSONResponse(await self.meta(request, r["id"]), 201)

    async def replace(self, request: Request) -> Response:
        ino = self._id(request)
        user = await self.user(request)
        async with request.form(max_files=1, max_fields=MAX_FIELDS,
                                max_part_size=MAX_FIELD_BYTES) as form:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise _bad("a multipart field 'file' is required")
            expected = form.get("expected_version", request.query_params.get(
                "expected_version"))
            expected = _int(expected if isinstance(expected, str) else None,
                            "expected_version")
            extents, size = await self._ingest(user, file)
            await self.run(request, namespace.replace, ino, extents, size, time.time_ns(),
                           expected)
        return JSONResponse(await self.meta(request, ino))

    async def patch(self, request: Request) -> Response:
        ino = self._id(request)
        body = await self._json(request)
        name, parent = body.get("name"), body.get("parent_id")
        if name is not None and not isinstance(name, str):
            raise _bad("name must be a string")
        if parent is not None and (type(parent) is not int or parent < 0):
            raise _bad("parent_id must be an id")
        await self.run(request, namespace.move, ino, parent,
                       None if name is None else _raw(name))
        return JSONResponse(await self.meta(request, ino))

    async def delete(self, request: Request) -> Response:
        await self.run(request, namespace.remove, self._id(request))
        return Response(status_code=204)

    async def make_folder(self, request: Request) -> Response:
        body = await self._json(request)
        path, parent, name = body.get("path"), body.get("parent_id"), body.get("name")
        if isinstance(path, str) and parent is None and name is None:
            parent_path, _, name = path.rstrip("/").rpartition("/")
            where: int | bytes = _raw(parent_path)
        elif type(parent) is int and parent >= 0 and isinstance(name, str) and path is None:
            where = parent
        else:
            raise _bad("give either {path} or {parent_id, name}")
        r = await self.run(request, namespace.make_folder, where, _raw(name))
        return JSONResponse(await self.meta(request, r["id"]), 201)

    async def versions(self, request: Request) -> Response:
        rows = await self.run(request, namespace.versions, self._id(request))
        return JSONResponse({"versions": [
            {"version": v["version"], "size": v["size"], "content_hash": v["content_hash"],
             "modified": _iso(int(v["time"] * 1e9)), "device": v["device"], "user": v["user"]}
            for v in rows]})

    async def restore(self, request: Request) -> Response:
        ino = self._id(request)
        version = (await self._json(request)).get("version")
        if type(version) is not int or version < 1:
            raise _bad("version must be a positive integer")
        await self.run(request, namespace.restore, ino, version)
        return JSONResponse(await self.meta(request, ino))

    async def sync(self, request: Request) -> Response:
        q = request.query_params
        limit = _int(q.get("limit"), "limit", 500, 1, LIST_LIMIT)
        r = await self.run(request, feed.page, q.get("cursor", "0"), limit)
        out = []
        for e in r["entries"]:
            if e["deleted"]:
                out.append({"id": e["ino"], "name": _name(e["name"]), "path": None,
                            "parent_id": e["parent"], "deleted": True, "own": e["own"]})
            else:
                out.append({**_meta(e, e["path"]), "deleted": False, "own": e["own"]})
        return JSONResponse({"cursor": r["cursor"], "has_more": r["has_more"],
                             "reset": r["reset"], "to_download": out})

    async def longpoll(self, request: Request) -> Response:
        """Answer ``changes: true`` as soon as the volume changed after ``cursor``."""
        q = request.query_params
        timeout = _int(q.get("timeout"), "timeout", 30, LONGPOLL_MIN, LONGPOLL_MAX)
        cursor = q.get("cursor", "0")
        user = await self.user(request)
        with self.server.watching(user.id) as changed:
            # Watching first: a change committed during this look still wakes it.
            if await self.run(request, feed.pending, cursor):
                return JSONResponse({"changes": True, "backoff": 0})
            with trio.move_on_after(timeout):
                await changed.wait()
        return JSONResponse({"changes": changed.is_set(), "backoff": 0})

    # --- helpers ----------------------------------------------------------------------

    @staticmethod
    def _id(request: Request) -> int:
        value = _int(request.path_params["id"], "id", None, 1)
        assert value is not None
        return value

    async def _folder(self, request: Request, fields: Any, user: User) -> int:
        """The folder a request names by ``parent_id`` or ``path``; the root by default."""
        parent, path = fields.get("parent_id"), fields.get("path")
        if parent not in (None, "") and path not in (None, ""):
            raise _bad("give parent_id or path, not both")
        if path not in (None, ""):
            return await self.run(request, namespace.resolve, _raw(path))
        return _int(parent, "parent_id", user.root, 1)

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise _bad("the body must be JSON") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    async def _ingest(self, user: User, file: UploadFile) -> tuple[list, int]:
        """The uploaded file's blocks stored; its extents and size.

        The multipart parser spooled the file (to disk past 1 MiB); it is
        chunked from its descriptor, never read whole into memory.
        """
        fd = file.file.fileno()  # a spooled file still in memory is written out first
        size = os.fstat(fd).st_size
        if size > namespace.BIGINT_MAX:
            raise ApiError(413, "too_large", "file too large")
        return await self.server.blocks.ingest(user, fd, size), size


def _hex(value: str | None) -> bool:
    return bool(value) and re.fullmatch(r"(?:[0-9a-f]{2}){1,255}", value) is not None


def _guard(handler: Callable[[Request], Awaitable[Response]]
           ) -> Callable[[Request], Awaitable[Response]]:
    """Turn every failure of a route into a JSON error: 4xx for the client's, 5xx for ours."""
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return _error(e.status, e.code, e.message, **e.extra)
        except Conflict as e:
            return _error(409, "stale_version", e.message, current_version=e.current)
        except FSError as e:
            status, code = _STATUS.get(e.errno, (500, "internal"))
            if e.errno == errno.EIO:
                status, code = 503, "unavailable"
            return _error(status, code, e.message)
        except psycopg.OperationalError as e:
            log.error("database unavailable: %s", e)
            return _error(503, "unavailable", "the database is unavailable")
        except HTTPException as e:   # e.g. the multipart parser's limits
            return _error(e.status_code, "bad_request", str(e.detail))
    route.__name__ = handler.__name__
    return route


def make_app(server: MetaServer) -> Starlette:
    api = Api(server)
    p = "/api/v1"
    routes = [
        Route(f"{p}/files", _guard(api.list_files), methods=["GET"]),
        Route(f"{p}/files", _guard(api.upload), methods=["POST"]),
        Route(f"{p}/files/{{id}}", _guard(api.get_file), methods=["GET"]),
        Route(f"{p}/files/{{id}}", _guard(api.replace), methods=["PUT"]),
        Route(f"{p}/files/{{id}}", _guard(api.patch), methods=["PATCH"]),
        Route(f"{p}/files/{{id}}", _guard(api.delete), methods=["DELETE"]),
        Route(f"{p}/files/{{id}}/content", _guard(api.content), methods=["GET"]),
        Route(f"{p}/files/{{id}}/versions", _guard(api.versions), methods=["GET"]),
        Route(f"{p}/files/{{id}}/restore", _guard(api.restore), methods=["POST"]),
        Route(f"{p}/folders", _guard(api.make_folder), methods=["POST"]),
        Route(f"{p}/sync", _guard(api.sync), methods=["GET"]),
        Route(f"{p}/sync/longpoll", _guard(api.longpoll), methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        if status >= 500:
            log.error("HTTP %s %s failed: %r", request.method, request.url.path, exc)
            return _error(500, "internal", "internal error")
        return _error(status, "not_found" if status == 404 else "bad_request",
                      getattr(exc, "detail", "") or "no such route")

    return Starlette(routes=routes, exception_handlers={HTTPException: not_found,
                                                          Exception: not_found})


async def serve_http(server: MetaServer, address: str,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on ``HOST:PORT`` until cancelled; ``started`` with its base URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [address]
    config.accesslog = None
    config.include_server_header = False
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, make_app(server), config))
        task_status.started(binds[0])
