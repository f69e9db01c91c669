"""The mount protocol client: many requests in flight over one TCP connection.

Used by the mount and by the CLI. A background task reads responses and wakes
the caller waiting on each request id, and hands pushed change lists to
``on_push``. The token is sent in clear only to a loopback address (or with
``insecure``); elsewhere the connection is TLS, the server's certificate
checked against a CA file or a pinned SHA-256 fingerprint before the token
is sent. If the connection drops, calls reconnect with backoff and are sent
again: every mutation carries an ``op_id`` so that the server applies it once
even if the first attempt did reach it. A call that has no answer
``outage_timeout`` seconds after it was made fails with EIO.

Several metaservers may serve one volume (``HOST:PORT,HOST:PORT``): they
share one database and keep no state of their own, so the client talks to one
at a time and, when its connection drops or a connect fails, moves on to the
next in the list. Op ids are recorded in the database, so a mutation sent to
a replica that died before answering and sent again to another is applied
once; the change cursor is the database's, so resubscribing on the other
replica resumes where the pushes stopped.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from nimbusfs.errors import Conflict, FSError
from nimbusfs.metrics import RECONNECTS, SERVER_CALLS
from nimbusfs.protocol import PROTOCOL_VERSION, PUSH, FrameReader, cert_fingerprint, pack
from nimbusfs.retry import RECONNECT

log = logging.getLogger(__name__)

# A TCP (and TLS) connect to one metaserver that takes longer than this moves
# on to the next: a host that is down drops SYNs, and the kernel would wait
# minutes. The hello is not bounded by it: its answer may wait on the database.
CONNECT_TIMEOUT = 5.0
# A connection on which nothing has come for PING_AFTER seconds is pinged
# (any answer proves the server alive, even an older server's ENOSYS); one
# silent for SILENT_LIMIT seconds is dropped and its calls are sent again, to
# the next server. A hung server (a stopped process, a host frozen or cut
# off) sends no reset: its connection would hold every call to its deadline.
# A hello has as long to be answered.
PING_AFTER = 5.0
SILENT_LIMIT = 15.0
# While the metaservers stay out of reach, the mount tries again every few
# seconds for as long as it runs: the first failure of an outage is logged,
# then one line every OUTAGE_LOG_EVERY seconds, and the reconnection.
OUTAGE_LOG_EVERY = 60.0


def parse_address(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_addresses(addresses: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]``: the metaservers of one volume, in the order tried."""
    servers = [parse_address(a.strip()) for a in addresses.split(",") if a.strip()]
    if not servers:
        raise ValueError(f"no metaserver address in {addresses!r}")
    return servers


def _local(address: str) -> bool:
    # 0.0.0.0 reaches this host: the embedded server started with --listen
    # 0.0.0.0:PORT records that address for its own mounts.
    a = ipaddress.ip_address(address)
    return a.is_loopback or a.is_unspecified


async def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is on this host (False if none)."""
    try:
        return _local(host)
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(_local(str(i[4][0])) for i in infos)


@dataclass(frozen=True)
class TLS:
    """How a client checks the metaserver's certificate, before it sends its token.

    ``ca_file``: the chain and the host name are verified against this CA.
    ``fingerprint``: the certificate's SHA-256 must be this one (as the server
    prints it; colons and case do not matter). Either, or both.
    """

    ca_file: str | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.ca_file is None and self.fingerprint is None:
            raise ValueError("TLS needs a CA file or a certificate fingerprint")
        if self.fingerprint is not None:
            digits = self.fingerprint.replace(":", "").upper()
            if len(digits) != 64 or not all(c in "0123456789ABCDEF" for c in digits):
                raise ValueError(f"not a SHA-256 fingerprint: {self.fingerprint!r}")
            object.__setattr__(self, "fingerprint", bytes.fromhex(digits).hex(":").upper())

    async def wrap(self, tcp: trio.SocketStream, host: str) -> trio.SSLStream:
        """The TLS stream over ``tcp`` once the server's certificate is trusted.

        An untrusted certificate raises EACCES (not retried: it will not
        change). ``tcp`` is closed if this fails.
        """
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.ca_file is None:  # the pinned fingerprint alone vouches for it
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        # No close_notify either way (https_compatible): frames delimit themselves.
        stream = trio.SSLStream(tcp, ctx, server_hostname=host, https_compatible=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            await tcp.aclose()
            if not isinstance(e.__cause__, ssl.SSLCertVerificationError):
                raise  # e.g. a server not speaking TLS: retried, as a lost connection
            raise FSError(errno.EACCES, "metaserver certificate not trusted:"
                                        f" {e.__cause__.verify_message}") from None
        seen = cert_fingerprint(stream.getpeercert(binary_form=True))
        if self.fingerprint is not None and seen != self.fingerprint:
            await tcp.aclose()
            raise FSError(errno.EACCES, f"metaserver certificate fingerprint {seen} is not"
                                        f" the pinned {self.fingerprint}")
        return stream


class MetaClient:
    """``address``: one metaserver, or several of one volume separated by commas."""

    def __init__(self, nursery: trio.Nursery, address: str, token: str, device: str,
                 outage_timeout: float = 60.0, tls: TLS | None = None,
                 insecure: bool = False) -> None:
        self.nursery = nursery
        self.servers = parse_addresses(address)
        self._server = 0                # index in ``servers`` of the one to try next
        self.token = token
        self.device = device
        self.outage_timeout = outage_timeout
        self.tls = tls
        self.insecure = insecure  # send the token in clear to a non-loopback address
        self.info: dict[str, Any] = {}
        self.read_only: frozenset[str] = frozenset()  # from the hello: ops without op_id
        self.on_push: Callable[[list], None] | None = None
        self.cursor = 0                 # newest change seen, for resubscribing
        self._subscribed = False
        self._reconnecting = False      # ``_reconnect`` runs
        self._closed = False            # ``aclose`` was called: no reconnect
        # When the ongoing outage began, and each server's failure was last logged
        # (``_unreachable``).
        self._down_since: float | None = None
        self._down_logged: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._stream: trio.abc.Stream | None = None
        self._pending: dict[int, list] = {}
        self._connect_lock = trio.Lock()
        self._send_lock = trio.Lock()

    async def connect(self, deadline: float | None = None) -> trio.abc.Stream:
        """Return the connection, opening it (with backoff) if there is none.

        Fails with EIO at ``deadline`` (trio time; default ``outage_timeout``
        from now), the caller's own: a call queued on the lock behind another
        caller's reconnect keeps the deadline it started with instead of
        starting a fresh one once it gets the lock, so that with the server
        down every call fails ``outage_timeout`` after it was made, not k
        times that for the k-th in the queue.
        """
        if deadline is None:
            deadline = trio.current_time() + self.outage_timeout
        with trio.move_on_at(deadline):
            return await self._connect(deadline)
        raise FSError(errno.EIO, f"metaserver {self.address} unreachable for"
                                 f" {self.outage_timeout:g} s")

    @property
    def address(self) -> str:
        """The metaservers, as given."""
        return ",".join(f"{h}:{p}" for h, p in self.servers)

    async def _open(self, host: str, port: int) -> trio.abc.Stream:
        """A TCP (and TLS) connection to one metaserver, within ``CONNECT_TIMEOUT``."""
        with trio.move_on_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
            tcp.setsockopt(6, 1, 1)  # TCP_NODELAY: requests are small
            if self.tls is None:
                return tcp
            try:
                return await self.tls.wrap(tcp, host)
            except trio.Cancelled:  # the handshake timed out (wrap closes tcp otherwise)
                await trio.aclose_forcefully(tcp)
                raise
        raise TimeoutError(f"no connection within {CONNECT_TIMEOUT:g} s")

    async def _connect(self, deadline: float) -> trio.abc.Stream:
        async with self._connect_lock:
            if self._stream is not None:
                return self._stream
            if not (self.tls or self.insecure):
                for host, _ in self.servers:
                    if not await is_loopback(host):
                        raise FSError(errno.EPERM, "refusing to send the token in clear to"
                                      f" {host}: give --tls-ca or --tls-fingerprint"
                                      " (or --insecure)")
            waits = RECONNECT.until(deadline, trio.current_time)
            tried = 0                   # servers tried since the last backoff
            while True:
                host, port = self.servers[self._server]
                try:
                    stream = await self._open(host, port)
                    reader = FrameReader(stream)
                    await stream.send_all(pack([0, "hello", {
                        "token": self.token, "device": self.device,
                        "protocol": PROTOCOL_VERSION}]))
                    with trio.move_on_after(SILENT_LIMIT) as hello_wait:
                        reply = await reader.read()
                    if hello_wait.cancelled_caught:
                        await trio.aclose_forcefully(stream)
                        raise TimeoutError(f"no answer to hello within {SILENT_LIMIT:g} s")
                    if reply is None:
                        raise ConnectionResetError("closed during hello")
                    if reply[1] == errno.EAGAIN:  # too many wrong tokens from this address
                        await stream.aclose()
                        raise ConnectionRefusedError(reply[2])
                    break
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    # The next one now; once every one was tried, back off first.
                    self._server = (self._server + 1) % len(self.servers)
                    tried += 1
                    self._unreachable(f"{host}:{port}", e)
                    if tried < len(self.servers):
                        continue
                    tried = 0
                    delay = next(waits, None)
                    if delay is None:
                        raise FSError(errno.EIO, f"metaserver unreachable: {e}") from e
                    await trio.sleep(delay)
            if reply[1]:
                await stream.aclose()
                refused = FSError(reply[1], str(reply[2]))
                if reply[1] == errno.EIO:
                    # The server up, its database not ("database unavailable"): an
                    # outage as well, logged as one (``_reconnect`` logs no EIO).
                    self._unreachable(f"{host}:{port}", refused)
                raise refused
            if not (isinstance(reply[2], dict) and reply[2].get("protocol") == PROTOCOL_VERSION):
                await stream.aclose()
                raise FSError(errno.EPROTONOSUPPORT, "the metaserver speaks another protocol"
                              f" version than this client's {PROTOCOL_VERSION}: upgrade both")
            if self._down_since is not None:
                log.warning("metaserver %s:%s reached again after %.0f s", host, port,
                            trio.current_time() - self._down_since)
                self._down_since = None
                self._down_logged.clear()
            if self.info:
                RECONNECTS.inc()   # not the first connection
            self.info = reply[2]
            self.read_only = frozenset(self.info["read_only"])
            self._stream = stream
            heard = [trio.current_time()]       # when the last frame came on ``stream``
            self.nursery.start_soon(self._read_loop, stream, reader, heard)
            self.nursery.start_soon(self._watch, stream, heard)
            if self._subscribed:
                self.nursery.start_soon(self._resubscribe, stream)
            return stream

    def _unreachable(self, server: str, e: BaseException) -> None:
        """Log a failed attempt to reach ``server``: its first in an outage, then one every
        ``OUTAGE_LOG_EVERY`` seconds (until a server is reached again).

        An idle mount retries every 2 s for as long as an outage lasts: a line
        each (two with a second server) filled its log and the journal.
        """
        now = trio.current_time()
        if self._down_since is None:
            self._down_since = now
        last = self._down_logged.get(server)
        if last is not None and now - last < OUTAGE_LOG_EVERY:
            return
        self._down_logged[server] = now
        log.warning("metaserver %s unreachable (%s), for %.0f s; retrying", server, e,
                    now - self._down_since)

    @property
    def connected(self) -> bool:
        """Whether a connection to the metaserver is open now."""
        return self._stream is not None

    async def _watch(self, stream: trio.abc.Stream, heard: list[float]) -> None:
        """Ping ``stream`` when it is silent; drop it, and move on, once silent too long.

        Silence does not count while a request is being sent (a large one may
        take a while on a slow link). Dropping the connection ends its read
        loop, which wakes the calls waiting on it: they are sent again on a
        new connection, mutations marked ``replay``.
        """
        while True:
            await trio.sleep(PING_AFTER)
            if self._stream is not stream:
                return
            if self._send_lock.locked():
                heard[0] = max(heard[0], trio.current_time() - PING_AFTER)
                continue
            silent = trio.current_time() - heard[0]
            if silent >= SILENT_LIMIT:
                break
            if silent >= PING_AFTER:
                self.nursery.start_soon(self._ping, stream)
        host, port = self.servers[self._server]
        log.warning("metaserver %s:%s silent for %.0f s; dropping its connection", host, port,
                    silent)
        self._stream = None
        self._server = (self._server + 1) % len(self.servers)
        await trio.aclose_forcefully(stream)

    async def _ping(self, stream: trio.abc.Stream) -> None:
        """Ask for an answer (any frame is a sign of life, see ``_watch``)."""
        try:
            async with self._send_lock:
                await stream.send_all(pack([next(self._ids), "ping", {}]))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the read loop sees it too

    async def _resubscribe(self, stream: trio.abc.Stream) -> None:
        """Subscribe again on a new connection; if that fails, drop the connection.

        A failure must not end the client's nursery (the mount): the next
        call reconnects, and subscribes again, on a fresh connection.
        """
        try:
            await self.subscribe()
        except FSError as e:
            log.warning("resubscribing failed (%s); reconnecting at the next call", e.message)
            if self._stream is stream:
                self._stream = None
            await trio.aclose_forcefully(stream)

    async def subscribe(self) -> dict[str, Any]:
        """Ask for pushed changes after ``self.cursor`` (again after each reconnect).

        The answer says ``reset`` when the server's log no longer reaches back
        that far: the caller must then drop everything it cached.
        """
        again, seen = self._subscribed, self.cursor
        self._subscribed = True
        point = await self.call("subscribe", cursor=self.cursor)
        self.cursor = max(self.cursor, point["newest"])
        # A cursor of 0 (no change seen yet: a new volume) subscribes from now: on a
        # resubscribe the changes made while disconnected are not pushed, so they
        # count as a reset too.
        if (point["reset"] or (again and not seen)) and self.on_push is not None:
            self.on_push([])  # an empty list means: drop all caches
        return point

    async def _read_loop(self, stream: trio.abc.Stream, reader: FrameReader,
                         heard: list[float]) -> None:
        try:
            while (msg := await reader.read()) is not None:
                heard[0] = trio.current_time()
                if msg[0] == PUSH:
                    self._pushed(msg[2])
                    continue
                waiter = self._pending.pop(msg[0], None)
                if waiter is not None:
                    waiter[1] = msg
                    waiter[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError):
            pass
        finally:
            if self._stream is stream:
                self._stream = None
            for rid, waiter in list(self._pending.items()):
                if waiter[2] is stream:
                    del self._pending[rid]
                    waiter[0].set()
            if self._subscribed and not self._closed and not self._reconnecting:
                self._reconnecting = True
                self.nursery.start_soon(self._reconnect)
            await stream.aclose()

    async def _reconnect(self) -> None:
        """Connect again in the background after a subscribed connection was lost, until
        connected (its subscription is renewed by ``_connect``).

        Without it a mount whose requests its caches all answer (``stat``,
        a lookup of a name it knows is absent, a listing it holds whole)
        makes no call, so it never reconnects and never gets the changes
        other mounts made meanwhile: it showed them stale for as long as
        it stayed idle towards the server. Calls made meanwhile reconnect
        as before (one connection: ``_connect`` holds a lock).
        """
        try:
            for delay in RECONNECT.delays():
                try:
                    await self.connect()
                    return
                except (FSError, ValueError) as e:
                    # The server away past ``outage_timeout`` (``_unreachable``
                    # logs that), a hello refused or garbled (a call would get it
                    # as its error): no task here may end the mount, and the next
                    # try may succeed.
                    if not (isinstance(e, FSError) and e.errno == errno.EIO):
                        log.warning("reconnecting in the background failed (%s); retrying", e)
                await trio.sleep(delay)
        finally:
            self._reconnecting = False

    def _pushed(self, changes: list) -> None:
        if changes:
            self.cursor = max(self.cursor, changes[-1][0])
            if self.on_push is not None:
                self.on_push(changes)

    async def call(self, op: str, **args: Any) -> Any:
        """Send one request and return its result; raise FSError for an errno.

        One deadline, ``outage_timeout`` after the call is made, bounds all of
        it: reconnecting, resending and waiting for the answer (a server that
        accepts connections but does not answer, e.g. stopped, is an outage
        too). Past it the call fails with EIO.
        """
        SERVER_CALLS.labels(op).inc()
        if op not in self.read_only:  # before the first hello: every op, harmlessly
            args["op_id"] = uuid.uuid4().hex
        deadline = trio.current_time() + self.outage_timeout
        with trio.move_on_at(deadline):
            return await self._call(op, args, deadline)
        raise FSError(errno.EIO, f"metaserver unreachable during {op}: no answer within"
                                 f" {self.outage_timeout:g} s")

    # --- the content layer's metadata interface (``nimbusfs.content.meta.Metadata``) ---

    @property
    def gc_grace(self) -> float | None:
        return self.info.get("gc_grace")

    async def open_file(self, ino: int) -> dict[str, Any]:
        return await self.call("open", ino=ino)

    async def have_blocks(self, keys: list[bytes]) -> list[bytes]:
        return await self.call("have_blocks", keys=keys)

    async def hold_blocks(self, extents: list[list[Any]]) -> list[bytes]:
        return await self.call("hold_blocks", extents=extents)

    async def commit(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.call("commit", **args)

    async def _call(self, op: str, args: dict[str, Any], deadline: float) -> Any:
        while True:
            stream = await self.connect(deadline)
            rid = next(self._ids)
            waiter: list = [trio.Event(), None, stream]
            self._pending[rid] = waiter
            try:
                async with self._send_lock:
                    try:
                        await stream.send_all(pack([rid, op, args]))
                    except trio.Cancelled:
                        # Part of the frame may be out: nothing may follow it on
                        # this stream. Its other callers resend on a new one.
                        await trio.aclose_forcefully(stream)
                        raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._pending.pop(rid, None)
                if self._stream is stream:
                    self._stream = None
                continue  # nothing was sent whole: safe to send again
            try:
                await waiter[0].wait()
            finally:
                self._pending.pop(rid, None)
            msg = waiter[1]
            if msg is None:  # connection lost: send again (op_id makes that safe)
                if "op_id" in args:
                    args["replay"] = True  # the server may have applied it already
                continue
            if msg[1] == 0:
                return msg[2]
            if isinstance(msg[2], dict) and "conflict" in msg[2]:
                raise Conflict(msg[2]["conflict"])
            raise FSError(msg[1], str(msg[2]))

    async def aclose(self) -> None:
        self._closed = True
        if self._stream is not None:
            await self._stream.aclose()


@asynccontextmanager
async def connect(address: str, token: str, device: str, outage_timeout: float = 60.0,
                  tls: TLS | None = None, insecure: bool = False
                  ) -> AsyncIterator[MetaClient]:
    """Open a client for the duration of the block.

    A failure to connect (e.g. a refused token) is raised as itself, not wrapped
    in the nursery's exception group.
    """
    failure: FSError | None = None
    async with trio.open_nursery() as nursery:
        client = MetaClient(nursery, address, token, device, outage_timeout, tls, insecure)
        try:
            await client.connect()
        except FSError as e:
            failure = e
        if failure is None:
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


