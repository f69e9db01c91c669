"""What unauthenticated peers cost the metaserver: memory, stalls and log lines.

An embedded deployment in a temporary home; raw sockets against its
metaserver, while an authenticated client times ``getattr`` round trips:
1. one 60 MiB frame sent before ``hello``;
2. eight connections each sending half of a 60 MiB frame, left open;
3. one 60 MiB frame from an authenticated connection;
4. wrong-token hellos, one connection each, for five seconds.
Prints the server's RSS after each step, the longest round trip of the
authenticated client during steps 1-3, the rate of wrong hellos answered and
the log lines they wrote. Usage: ``python bench/protocol_abuse.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import tempfile
import time
from collections import Counter

import msgpack
import trio

from nimbusfs.client import connect, parse_address
from nimbusfs.embedded import Embedded
from nimbusfs.protocol import pack

BIG = 60 << 20


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory now (or at its peak: ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def raw(address: str) -> socket.socket:
    s = socket.create_connection(parse_address(address))
    s.settimeout(30)
    return s


def send_quietly(s: socket.socket, data: bytes) -> bool:
    """Send what the server takes; False once it closes the connection."""
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


async def timed_getattr(address: str, token: str, stop: trio.Event, worst: list[float]
                        ) -> None:
    async with connect(address, token, "bench") as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            await c.call("getattr", ino=c.info["root"])
            worst[0] = max(worst[0], time.perf_counter() - t0)
            await trio.sleep(0.01)


async def main() -> None:
    base = tempfile.mkdtemp(prefix="nimbus-abuse-", dir="/tmp")
    os.chmod(base, 0o755)  # the postgres user must reach the home when run as root
    emb = Embedded(os.path.join(base, "home"))
    try:
        address, token = emb.start()
        with open(emb.path("run", "metaserver.json")) as f:
            pid = json.load(f)["pid"]
        log_path = emb.path("logs", "metaserver.log")
        print(f"server RSS at start: {rss_mib(pid):.0f} MiB")
        stop, worst = trio.Event(), [0.0]
        async with trio.open_nursery() as n:
            n.start_soon(timed_getattr, address, token, stop, worst)
            await trio.sleep(0.5)
            # An array of 60 M zeros: a list of 60 M references (480 MB) once decoded.
            n = BIG - 5
            big = struct.pack(">IBI", BIG, 0xDD, n) + bytes(n)
            s = raw(address)
            ok = await trio.to_thread.run_sync(send_quietly, s, big)
            await trio.sleep(1)
            print(f"1. one 60 MiB frame before hello (sent whole: {ok}): peak RSS"
                  f" {rss_mib(pid, 'VmHWM'):.0f} MiB, longest getattr {worst[0] * 1000:.0f} ms")
            s.close()
            halves = [raw(address) for _ in range(8)]
            sent = [await trio.to_thread.run_sync(send_quietly, h, big[:BIG // 2])
                    for h in halves]
            await trio.sleep(1)
            print(f"2. eight half-sent 60 MiB frames (sent: {sum(sent)}): RSS"
                  f" {rss_mib(pid):.0f} MiB, longest getattr {worst[0] * 1000:.0f} ms")
            for h in halves:
                h.close()
            worst[0] = 0.0
            with raw(address) as s:
                s.sendall(pack([0, "hello", {"token": token, "device": "bench"}]))
                s.recv(4096)
                peak = rss_mib(pid, "VmHWM")
                await trio.to_thread.run_sync(s.sendall, big)
                await trio.to_thread.run_sync(s.recv, 4096)  # EPROTO: malformed request
                await trio.sleep(1)  # the getattr in flight meanwhile returns
            print(f"3. one 60 MiB frame after hello: peak RSS {peak:.0f} ->"
                  f" {rss_mib(pid, 'VmHWM'):.0f} MiB, longest getattr {worst[0] * 1000:.0f} ms")
            stop.set()
        with open(log_path, "rb") as f:
            lines_before = f.read().count(b"\n")
        hello = pack([0, "hello", {"token": "nfs_wrong", "device": "bench"}])
        answers: Counter[str] = Counter()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 5:
            with raw(address) as s:
                s.sendall(hello)
                reply = msgpack.unpackb(s.recv(4096)[4:])
            answers[errno.errorcode[reply[1]]] += 1
        elapsed = time.perf_counter() - t0
        with open(log_path, "rb") as f:
            lines = f.read().count(b"\n") - lines_before
        print(f"4. wrong hellos for 5 s: {answers['EACCES'] / elapsed:.0f}/s checked (EACCES),"
              f" {answers['EAGAIN'] / elapsed:.0f}/s refused unchecked (EAGAIN),"
              f" {lines} log lines")
    finally:
        emb.stop_server()
        emb.stop_postgres()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    trio.run(main)
