"""A fault-injecting TCP proxy for HTTP/1.1 on loopback (a test helper), in front of the GCS
emulator: latency, connection resets, 5xx answers, black holes.

It reads each request whole (head and ``Content-Length`` body) before acting
on it, so a fault hits requests, not arbitrary bytes:

- ``latency``: each request waits that long before it is forwarded;
- ``status``: each request is answered with that HTTP status (and the
  connection closed) instead of being forwarded: the store never sees it;
- ``reset``: half of each request is forwarded, then both connections are
  reset (RST): the store sees a truncated upload, the client a reset;
- ``black_hole``: nothing more is forwarded on any connection open while it
  holds, nor on those accepted meanwhile, ever (as when a peer vanishes
  without a FIN or RST, or a NAT forgets the flow): only timeouts get a
  client out. Connections opened after it ends work.

Responses are relayed as they come. Faults are set from the test's thread
(:meth:`FaultProxy.set`, plain attribute writes the proxy's trio thread
reads per request), and counted.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

import trio

CANNED = b"HTTP/1.1 %d Injected\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
         b"Connection: close\r\n\r\n%s"


@dataclass
class Faults:
    latency: float = 0.0
    status: int | None = None
    reset: bool = False
    black_hole: bool = False


@dataclass
class Counts:
    forwarded: int = 0
    answered: int = 0         # with the injected status
    reset: int = 0
    swallowed: int = 0        # by the black hole


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _read_request(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """The next whole request from the client (None at its end of stream)."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(1 << 16)
        if not data:
            return None
        buf += data
    end += 4
    length = 0
    for line in bytes(buf[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        assert name.strip().lower() != b"transfer-encoding", "chunked bodies are not framed"
    while len(buf) < end + length:
        data = await stream.receive_some(1 << 20)
        if not data:
            return None
        buf += data
    request = bytes(buf[:end + length])
    del buf[:end + length]
    return request


class FaultProxy:
    """A proxy from ``url`` (127.0.0.1, a free port) to ``upstream`` (an http:// URL)."""

    def __init__(self, upstream: str) -> None:
        u = urlparse(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.faults = Faults()
        self.counts = Counts()
        self.url = ""
        self._ready = threading.Event()
        self._stop: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def set(self, **faults: object) -> None:
        """Replace the faults in force (none given: pass everything through)."""
        self.faults = Faults(**faults)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.cancel, trio_token=self._token)
        self._thread.join(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._stop:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            self._ready.set()
            await trio.serve_listeners(self._serve, listeners)

    async def _hang(self) -> None:
        self.counts.swallowed += 1
        await trio.sleep_forever()

    async def _serve(self, client: trio.SocketStream) -> None:
        if self.faults.black_hole:
            await self._hang()
        try:
            upstream = await trio.open_tcp_stream(*self.upstream)
        except OSError:
            _reset(client)
            return
        try:
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._responses, upstream, client, nursery.cancel_scope)
                await self._requests(client, upstream)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # either side went away: so does the other

    async def _requests(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        buf = bytearray()
        while (request := await _read_request(client, buf)) is not None:
            f = self.faults
            if f.black_hole:
                await self._hang()
            if f.latency:
                await trio.sleep(f.latency)
            if f.status is not None:
                self.counts.answered += 1
                body = b'{"error": {"code": %d, "message": "injected"}}' % f.status
                await client.send_all(CANNED % (f.status, len(body), body))
                return
            if f.reset:
                self.counts.reset += 1
                await upstream.send_all(request[:len(request) // 2])
                _reset(client)
                _reset(upstream)
                return
            self.counts.forwarded += 1
            await upstream.send_all(request)

    async def _responses(self, upstream: trio.SocketStream, client: trio.SocketStream,
                         done: trio.CancelScope) -> None:
        try:
            async for data in upstream:
                if self.faults.black_hole:
                    await self._hang()
                await client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()
