"""The metaserver process: the mount protocol over TCP, backed by PostgreSQL.

Stateless apart from its connection pool, so several replicas may serve one
database. Each request runs one transaction in a worker thread; a connection
may have many requests in flight (bounded per connection), answered in
completion order.
"""

from __future__ import annotations

import errno
import inspect
import logging
from functools import partial
from typing import Any

import trio

from metaserver import namespace
from metaserver.auth import User, authenticate
from metaserver.db import Database
from metaserver.errors import Conflict, FSError
from metaserver.protocol import FrameReader, pack

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64


class MetaServer:
    def __init__(self, db: Database, blocks_url: str) -> None:
        self.db = db
        self.blocks_url = blocks_url
        self.limiter = trio.CapacityLimiter(db.pool_size)

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(cur, ...)`` in one transaction on a worker thread."""
        return await trio.to_thread.run_sync(
            partial(self.db.run, fn, *args, **kwargs), limiter=self.limiter)

    async def serve(self, host: str, port: int,
                    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_tcp(self.handle_connection, port, host=host, task_status=task_status)

    async def _hello(self, reader: FrameReader, stream: trio.SocketStream
                     ) -> tuple[User, str] | None:
        msg = await reader.read()
        if not (isinstance(msg, list) and len(msg) == 3 and msg[1] == "hello"
                and isinstance(msg[2], dict)):
            await stream.send_all(pack([0, errno.EPROTO, "expected hello"]))
            return None
        rid, _, args = msg
        try:
            user = await self.call(authenticate, str(args.get("token", "")))
        except FSError as e:
            log.warning("rejected connection: %s", e)
            await stream.send_all(pack([rid, e.errno, e.message]))
            return None
        await stream.send_all(pack([rid, 0, {"user": user.name, "root": user.root,
                                             "blocks": self.blocks_url}]))
        return user, str(args.get("device", ""))

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        reader = FrameReader(stream)
        send_lock = trio.Lock()
        slots = trio.Semaphore(MAX_IN_FLIGHT)
        try:
            hello = await self._hello(reader, stream)
            if hello is None:
                return
            user, device = hello
            async with trio.open_nursery() as nursery:
                while (msg := await reader.read()) is not None:
                    await slots.acquire()
                    nursery.start_soon(self._answer, stream, send_lock, slots, user, device, msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except ValueError as e:
            log.warning("closing connection: %s", e)
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream, send_lock: trio.Lock,
                      slots: trio.Semaphore, user: User, device: str, msg: Any) -> None:
        try:
            rid, opname, args = msg
            fn = namespace.OPS.get(opname)
            if fn is None or not isinstance(args, dict):
                reply = [rid, errno.ENOSYS, f"unknown operation {opname!r}"]
            else:
                try:
                    inspect.signature(fn).bind(None, user, device, **args)
                    reply = [rid, 0, await self.call(fn, user, device, **args)]
                except TypeError as e:
                    reply = [rid, errno.EINVAL, f"bad arguments for {opname}: {e}"]
                except Conflict as e:
                    reply = [rid, e.errno, {"conflict": e.current, "message": e.message}]
                except FSError as e:
                    reply = [rid, e.errno, e.message]
            async with send_lock:
                await stream.send_all(pack(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("request failed: %r", msg[:2] if isinstance(msg, list) else msg)
            try:
                async with send_lock:
                    await stream.send_all(pack([msg[0], errno.EIO, "internal error"]))
            except Exception:
                pass
        finally:
            slots.release()
