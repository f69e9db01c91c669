"""The mount protocol over a real TCP connection to the test metaserver."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from conftest import Deployment, Services, start_metaserver
from nimbusfs.client import TLS, connect, is_loopback
from nimbusfs.errors import FSError
from nimbusfs.mount.activity import Activity
from nimbusfs.mount.adapter import _errors
from nimbusfs.protocol import PROTOCOL_VERSION, FrameReader, pack
from nimbusfs.retry import wait_until
from nimbusfs.server import metaserver


def log_size(dep: Deployment) -> int:
    with open(dep.log_path, "rb") as f:
        return f.seek(0, 2)


def log_since(dep: Deployment, offset: int) -> str:
    with open(dep.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def open_raw(dep: Deployment) -> tuple[trio.SocketStream, FrameReader]:
    host, port = dep.address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    return stream, FrameReader(stream)


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Whether the server closes ``stream`` (within a bound on a hang), reading what it sent."""
    with trio.move_on_after(60):
        try:
            while await stream.receive_some(1 << 16):
                pass
        except trio.BrokenResourceError:
            pass  # a reset: closed too
        return True
    return False


async def test_bad_token_is_refused(services):
    with pytest.raises(FSError) as e:
        async with connect(services.deployments["local"].address, "nfs_wrong", "t",
                           outage_timeout=5):
            pass
    assert e.value.errno == errno.EACCES


async def test_many_requests_in_flight_on_one_connection(services):
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "t") as c:
        root = c.info["root"]
        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(lambda i=i: c.call("mknod", parent=root, name=b"f%d" % i,
                                                mode=0o100644, uid=0, gid=0))
        names = {name for name, _ in await c.call("readdir", ino=root)} - {b".", b".."}
        assert names == {b"f%d" % i for i in range(50)}


async def test_users_cannot_see_each_other(services):
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "a") as a, \
            connect(dep.address, dep.new_user(), "b") as b:
        f = await a.call("mknod", parent=a.info["root"], name=b"secret", mode=0o100600,
                         uid=0, gid=0)
        for op, args in [("getattr", {"ino": f["ino"]}), ("open", {"ino": f["ino"]}),
                         ("readdir", {"ino": a.info["root"]}),
                         ("unlink", {"parent": a.info["root"], "name": b"secret"})]:
            with pytest.raises(FSError) as e:
                await b.call(op, **args)
            assert e.value.errno == errno.ENOENT


async def test_bad_arguments_are_einval(services):
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "t") as c:
        with pytest.raises(FSError) as e:
            await c.call("getattr", nope=1)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(FSError) as e:
            await c.call("no_such_op")
        assert e.value.errno == errno.ENOSYS
        f = await c.call("mknod", parent=c.info["root"], name=b"f", mode=0o100644, uid=0, gid=0)
        for attrs in ({"size": 1}, {"mode": "rw"}, [1], {"uid": 1 << 31}, {"mode": -1}):
            with pytest.raises(FSError) as e:
                await c.call("commit", ino=f["ino"], base=0, extents=[], size=0, mtime=0,
                             attrs=attrs)
            assert e.value.errno == errno.EINVAL
        assert (await c.call("getattr", ino=f["ino"]))["version"] == 0  # nothing applied
        r = await c.call("commit", ino=f["ino"], base=0, extents=[], size=0, mtime=5,
                         attrs={"mode": 0o600, "uid": 7})
        assert (r["attr"]["mode"], r["attr"]["uid"], r["attr"]["version"]) == (0o100600, 7, 1)


async def test_arguments_of_the_wrong_type_are_einval(services):
    """Each argument is checked against its operation's annotation, before any transaction.

    They answered EIO "internal error" with a traceback in the server's log (a
    str where bytes belong, a bool for an int, a uint64 beyond bigint), or were
    applied (a str of digits for an inode number).
    """
    dep = services.deployments["local"]
    log_start = log_size(dep)
    async with connect(dep.address, dep.new_user(), "t") as c:
        root = c.info["root"]
        f = await c.call("mknod", parent=root, name=b"f", mode=0o100644, uid=0, gid=0)
        ino = f["ino"]
        for op, args, arg in [
                ("getattr", {"ino": str(ino)}, "ino"),
                ("getattr", {"ino": True}, "ino"),
                ("lookup", {"parent": root, "name": "f"}, "name"),
                ("mknod", {"parent": root, "name": b"g", "mode": 33188.0, "uid": 0, "gid": 0},
                 "mode"),
                ("setattr", {"ino": ino, "mtime": 2**64 - 1}, "mtime"),  # msgpack: uint64
                ("setattr", {"ino": ino, "atime": 2**63}, "atime"),
                ("setattr", {"ino": ino, "mode": 1 << 40}, "mode"),  # an integer column
                ("mknod", {"parent": root, "name": b"g", "mode": -1, "uid": 0, "gid": 0},
                 "mode"),
                ("mknod", {"parent": root, "name": b"g", "mode": 0o100644, "uid": 2**31,
                           "gid": 0}, "uid"),
                ("have_blocks", {"keys": [b"k", 1]}, "keys"),
                ("open", {"ino": ino, "read": 1}, "read"),
                ("commit", {"ino": ino, "base": 0, "extents": [[b"k", "5"]], "size": 5,
                            "mtime": 0}, "extents"),
                ("commit", {"ino": ino, "base": 0, "extents": [[None, 1, 2]], "size": 1,
                            "mtime": 0}, "extents"),
                ("commit", {"ino": ino, "base": 0, "extents": [], "size": 0, "mtime": 0,
                            "attrs": {"mode": True}}, "attrs"),
                ("subscribe", {"cursor": "x"}, "cursor")]:
            with pytest.raises(FSError) as e:
                await c.call(op, **args)
            assert e.value.errno == errno.EINVAL, (op, args, e.value)
            assert f"bad arguments for {op}: {arg} must be" in e.value.message
        attr = await c.call("getattr", ino=ino)
        assert (attr["version"], attr["mode"]) == (0, 0o100644)  # nothing applied
        assert [n for n, _ in await c.call("readdir", ino=root)] == [b".", b"..", b"f"]
    token = dep.new_user()
    for device in ("a\0b", "x" * 256, 7):  # stored in text columns with every change
        stream, reader = await open_raw(dep)
        await stream.send_all(pack([1, "hello", {"token": token, "device": device}]))
        assert (await reader.read())[1] == errno.EPROTO, device
        await stream.aclose()
    stream, reader = await open_raw(dep)  # the request's envelope: op_id, replay
    await stream.send_all(pack([1, "hello", {"token": token, "device": "t"}]))
    root = (await reader.read())[2]["root"]
    for i, envelope in enumerate(({"op_id": "\0"}, {"op_id": ""}, {"op_id": 7},
                                  {"op_id": "x" * 65}, {"op_id": "a", "replay": 1}), 2):
        await stream.send_all(pack([i, "getattr", {"ino": root, **envelope}]))
        assert (await reader.read())[:2] == [i, errno.EINVAL], envelope
    await stream.aclose()
    assert "Traceback" not in log_since(dep, log_start)


async def test_a_replayed_mutation_is_applied_once(services):
    """A request resent after a lost connection (``replay``) gets the first answer."""
    dep = services.deployments["local"]
    token = dep.new_user()
    host, port = dep.address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    reader = FrameReader(stream)

    async def ask(rid: int, op: str, **args):
        await stream.send_all(pack([rid, op, args]))
        reply = await reader.read()
        assert reply[0] == rid
        return reply[1:]

    err, info = await ask(1, "hello", token=token, device="t")
    assert err == 0
    args = {"parent": info["root"], "name": b"once", "mode": 0o100644, "uid": 0, "gid": 0}
    err, first = await ask(2, "mknod", op_id="op-1", **args)
    assert err == 0
    err, again = await ask(3, "mknod", op_id="op-1", replay=True, **args)
    assert (err, again) == (0, first)                 # the recorded answer, not EEXIST
    err, _ = await ask(4, "mknod", op_id="op-2", replay=True, **args)
    assert err == errno.EEXIST                        # a new operation is applied
    err, listing = await ask(5, "readdir", ino=info["root"])
    assert [n for n, _ in listing].count(b"once") == 1
    await stream.aclose()


async def test_a_reset_connection_leaves_the_server_serving(services):
    """A mount killed mid-conversation resets its connection; other mounts carry on.

    The reset reached the server inside a nursery, and the ExceptionGroup it
    became stopped the listener: the whole metaserver exited.
    """
    dep = services.deployments["local"]
    token = dep.new_user()
    async with connect(dep.address, token, "survivor") as other:
        host, port = dep.address.rsplit(":", 1)
        for subscribed in (False, True):
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(pack([1, "hello", {"token": token, "device": "killed"}]))
            assert (await FrameReader(stream).read())[1] == 0
            if subscribed:
                await stream.send_all(pack([2, "subscribe", {"cursor": 0}]))
                await other.call("mknod", parent=other.info["root"], name=b"ping",
                                 mode=0o100644, uid=0, gid=0)
            # SO_LINGER 0: close sends RST, as the kernel does for a killed process
            # with unread data.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            stream.socket.close()
            for _ in range(3):  # several round trips: the reset is handled meanwhile
                assert (await other.call("getattr", ino=other.info["root"]))["ino"]


async def test_a_stranger_may_send_only_a_hello_sized_frame(services):
    """Before hello a frame may be 4 KiB: a 60 MiB one is refused from its length.

    The server waited for the whole frame and decoded it: one such frame raised
    its RSS from 44 to 526 MiB, eight half-sent ones held 563 MiB.
    """
    dep = services.deployments["local"]
    stream, _ = await open_raw(dep)
    await stream.send_all(struct.pack(">I", 60 << 20) + bytes(1 << 16))
    assert await closed_by_server(stream)
    await stream.aclose()
    stream, _ = await open_raw(dep)
    hello = pack([1, "hello", {"token": dep.new_user(), "device": "x" * 5000}])
    await stream.send_all(hello)
    assert await closed_by_server(stream)  # a real hello, but over 4 KiB
    await stream.aclose()
    async with connect(dep.address, dep.new_user(), "t") as c:  # the server serves on
        keys = [i.to_bytes(32, "big") for i in range(1000)]  # 35 KB: after hello, 64 MiB
        assert await c.call("have_blocks", keys=keys) == []


async def test_strangers_per_address_are_capped_and_time_out(services):
    """An address holds at most 64 connections before hello, each at most 10 s.

    Connections that never sent hello stayed open forever, each with its buffer.
    """
    dep = services.deployments["local"]
    silent = [(await open_raw(dep))[0] for _ in range(metaserver.MAX_UNAUTHENTICATED)]
    t0 = time.monotonic()
    one_more, _ = await open_raw(dep)
    assert await closed_by_server(one_more)  # over the cap: closed at once
    await one_more.aclose()
    for stream in silent:  # the hello timeout closes them
        assert await closed_by_server(stream)
        await stream.aclose()
    assert time.monotonic() - t0 >= metaserver.HELLO_TIMEOUT - 1  # not closed before their time
    async with connect(dep.address, dep.new_user(), "t") as c:
        assert (await c.call("getattr", ino=c.info["root"]))["ino"] == c.info["root"]


async def test_wrong_tokens_are_rate_limited_and_logged_in_summary(services):
    """After a burst, an address's hellos are refused (EAGAIN) without checking the token.

    10,000 wrong hellos went through at 566/s and wrote 10,000 log lines. A
    client with the right token from that address waits and gets in.
    """
    dep = services.deployments["local"]
    log_start = log_size(dep)
    answers = []
    t0 = time.monotonic()
    for i in range(60):
        stream, reader = await open_raw(dep)
        await stream.send_all(pack([i, "hello", {"token": f"nfs_wrong{i}", "device": "t"}]))
        reply = await reader.read()
        answers.append(reply[1])
        await stream.aclose()
    elapsed = time.monotonic() - t0
    assert set(answers) <= {errno.EACCES, errno.EAGAIN}
    checked = answers.count(errno.EACCES)
    assert checked <= metaserver.WRONG_TOKEN_BURST + elapsed * metaserver.WRONG_TOKEN_RATE + 1
    assert errno.EAGAIN in answers
    assert log_since(dep, log_start).count("refused") <= 1  # not a line per hello
    async with connect(dep.address, dep.new_user(), "t", outage_timeout=30) as c:
        assert (await c.call("getattr", ino=c.info["root"]))["ino"] == c.info["root"]
    summary = re.compile(r"refused (\d+) connections in \d+ s: (\d+) from 127\.0\.0\.1")
    wait_until(lambda: summary.search(log_since(dep, log_start)), 30, "the summary line")
    assert sum(int(m[1]) for m in summary.finditer(log_since(dep, log_start))) >= 59


def self_signed(directory: str, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    cert, key = os.path.join(directory, name + ".pem"), os.path.join(directory, name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key,
                    "-out", cert], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(services: Services, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Deployment, str, str]]:
    """A metaserver serving TLS: (deployment, its certificate, the fingerprint it printed)."""
    cert, key = self_signed(str(tmp_path_factory.mktemp("tls")), "nimbus-test")
    emb = services.emb
    dep = start_metaserver(emb, "tls", "file://" + emb.path("blocks"), services.env,
                           "--tls-cert", cert, "--tls-key", key)
    with open(emb.path("run", "server-tls.json")) as f:
        fingerprint = json.load(f)["fingerprint"]
    yield dep, cert, fingerprint
    dep.proc.terminate()
    dep.proc.wait(30)


async def test_tls_with_a_pinned_fingerprint_or_a_ca(tls_server):
    dep, cert, fingerprint = tls_server
    openssl = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-fingerprint",
                              "-sha256"], check=True, capture_output=True, text=True).stdout
    assert openssl.strip().endswith("=" + fingerprint)  # what the server printed
    token = dep.new_user()
    bare = fingerprint.replace(":", "").lower()
    assert TLS(fingerprint=bare) == TLS(fingerprint=fingerprint)  # colons, case: either way
    for i, tls in enumerate((TLS(fingerprint=bare), TLS(ca_file=cert),
                             TLS(ca_file=cert, fingerprint=fingerprint))):
        async with connect(dep.address, token, "t", tls=tls) as c:
            await c.call("mknod", parent=c.info["root"], name=b"f%d" % i, mode=0o100644,
                         uid=0, gid=0)
            assert len(await c.call("readdir", ino=c.info["root"])) == 3 + i


async def test_tls_refuses_an_untrusted_server_before_the_token(tls_server, tmp_path):
    """A wrong pin or CA fails at once with EACCES (no retries: it will not change)."""
    dep, _, fingerprint = tls_server
    other_ca, _ = self_signed(str(tmp_path), "other")
    wrong = ("00:" + fingerprint[3:]) if not fingerprint.startswith("00") else \
        ("11:" + fingerprint[3:])
    for tls in (TLS(fingerprint=wrong), TLS(ca_file=other_ca),
                TLS(ca_file=other_ca, fingerprint=fingerprint)):
        with pytest.raises(FSError) as e:
            async with connect(dep.address, dep.new_user(), "t", outage_timeout=60, tls=tls):
                pass
        assert e.value.errno == errno.EACCES, e.value
    with pytest.raises(ValueError):
        TLS(fingerprint="AB:CD")


async def test_tls_and_plain_do_not_mix(services, tls_server):
    """A plain client of a TLS server, and the reverse, fail cleanly (EIO after retries)."""
    dep, _, fingerprint = tls_server
    token = dep.new_user()
    with pytest.raises(FSError) as e:
        async with connect(dep.address, token, "t", outage_timeout=1):
            pass
    assert e.value.errno == errno.EIO
    plain = services.deployments["local"]
    with pytest.raises(FSError) as e:
        async with connect(plain.address, plain.new_user(), "t", outage_timeout=1,
                           tls=TLS(fingerprint=fingerprint)):
            pass
    assert e.value.errno == errno.EIO
    async with connect(dep.address, token, "t", tls=TLS(fingerprint=fingerprint)) as c:
        assert (await c.call("getattr", ino=c.info["root"]))["ino"] == c.info["root"]


async def test_no_token_in_clear_beyond_loopback(services, world_tmp):
    """Without TLS, a client refuses to send its token to a non-loopback address.

    It refuses before connecting: a connection to 10.0.0.1 (unreachable here)
    would end in EIO after the outage timeout, not in EPERM at once.
    """
    assert await is_loopback("127.0.0.1") and await is_loopback("::1")
    assert await is_loopback("localhost") and await is_loopback("0.0.0.0")
    assert not await is_loopback("10.0.0.1")
    with trio.fail_after(30), pytest.raises(FSError) as e:
        async with connect("10.0.0.1:7070", "nfs_secret", "t", outage_timeout=600):
            pass
    assert e.value.errno == errno.EPERM
    assert "in clear" in e.value.message
    env = dict(services.env, NIMBUSFS_TOKEN="nfs_secret")
    r = subprocess.run([sys.executable, "-m", "nimbusfs.cli", "mount",
                        os.path.join(world_tmp, "mnt"), "--foreground", "--server",
                        "10.0.0.1:7070", "--cache-dir", os.path.join(world_tmp, "cache")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "refusing to send the token in clear to 10.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_mount_over_tls(tls_server, mount_factory):
    dep, _, fingerprint = tls_server
    m = mount_factory("local", None, dep, "--tls-fingerprint", fingerprint)
    with open(m.p("f"), "wb") as f:
        f.write(b"over tls")
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"over tls"
    m.remount(drop_cache=True)
    with open(m.p("f"), "rb") as f:
        assert f.read() == b"over tls"


async def test_connections_reset_at_once_leave_the_server_serving(services):
    """Connections reset right after connecting: the accepted socket may have no peer.

    getpeername raised ENOTCONN out of the connection handler, and the
    listener's nursery with it.
    """
    dep = services.deployments["local"]
    host, port = dep.address.rsplit(":", 1)
    for _ in range(300):
        s = socket.create_connection((host, int(port)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
    async with connect(dep.address, dep.new_user(), "t") as c:
        assert (await c.call("getattr", ino=c.info["root"]))["ino"] == c.info["root"]
    assert dep.proc.poll() is None


async def test_hello_names_the_protocol_version_and_the_read_only_operations(services):
    """One declaration of which operations mutate: the server's, told in the hello.

    A client of another protocol version is refused with a clear error.
    """
    dep = services.deployments["local"]
    host, port = dep.address.rsplit(":", 1)
    for version, expect in [(PROTOCOL_VERSION + 1, errno.EPROTONOSUPPORT),
                            (str(PROTOCOL_VERSION), errno.EPROTONOSUPPORT), (PROTOCOL_VERSION, 0)]:
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(pack([1, "hello", {"token": dep.new_user(), "device": "t",
                                                 "protocol": version}]))
        reply = await FrameReader(stream).read()
        await stream.aclose()
        assert reply[1] == expect, reply
    info = reply[2]
    assert info["protocol"] == PROTOCOL_VERSION
    assert {"getattr", "readdir", "open", "get_block"} <= set(info["read_only"])
    assert not {"mknod", "commit", "rename", "setattr", "purge"} & set(info["read_only"])
    async with connect(dep.address, dep.new_user(), "t") as c:
        assert c.read_only == frozenset(info["read_only"])


async def test_a_batch_applies_in_order_each_op_once_and_failures_alone(services):
    """``batch``: one transaction for many operations, each applied once by its op_id.

    Sent again (as a write-back mount does after a lost answer or a crash),
    every operation answers its first result; an operation that fails
    (EEXIST here) is answered its errno and the others still apply.
    """
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "t") as c:
        root = c.info["root"]
        f = await c.call("mknod", parent=root, name=b"f", mode=0o100644, uid=0, gid=0)
        ops = [["mknod", "b-1", {"parent": root, "name": b"a", "mode": 0o100644, "uid": 0,
                                 "gid": 0}],
               ["mknod", "b-2", {"parent": root, "name": b"f", "mode": 0o100644, "uid": 0,
                                 "gid": 0}],
               ["commit", "b-3", {"ino": f["ino"], "base": f["version"], "extents": [],
                                  "size": 0, "mtime": 7}],
               ["commit", "b-4", {"ino": f["ino"], "base": f["version"] + 1,
                                  "extents": [[None, 5]], "size": 5, "mtime": 8}]]
        first = await c.call("batch", ops=ops)
        assert [e for e, _ in first] == [0, errno.EEXIST, 0, 0]
        assert first[3][1]["attr"]["size"] == 5   # after the commit before it, in order
        again = await c.call("batch", ops=ops)
        assert [r for e, r in again if not e] == [r for e, r in first if not e]
        assert len(await c.call("versions", ino=f["ino"])) == 2
        names = [n for n, _ in await c.call("readdir", ino=root)]
        assert names.count(b"a") == 1
        for bad in ([], [["getattr", "x", {"ino": root}]], [["commit", None, {}]],
                    [["nosuch", "x", {}]]):
            with pytest.raises(FSError) as e:
                await c.call("batch", ops=bad)
            assert e.value.errno in (errno.EINVAL, errno.ENOSYS), bad
        # An op with wrong arguments fails alone; the ops around it apply.
        alone = await c.call("batch", ops=[
            ["mknod", "c-1", {"parent": root, "name": b"c1", "mode": 0o100644, "uid": 0,
                              "gid": 0}],
            ["mknod", "c-2", {"parent": root}],
            ["setattr", "c-3", {"ino": f["ino"], "uid": 1 << 40}],
            ["commit", "c-4", {"ino": f["ino"], "base": f["version"] + 2,
                               "extents": "not a list", "size": 5, "mtime": 9}],
            ["mknod", "c-5", {"parent": root, "name": b"c5", "mode": 0o100644, "uid": 0,
                              "gid": 0}]])
        assert [e for e, _ in alone] == [0, errno.EINVAL, errno.EINVAL, errno.EINVAL, 0]
        names = [n for n, _ in await c.call("readdir", ino=root)]
        assert b"c1" in names and b"c5" in names


async def test_a_batch_naming_another_users_inodes_changes_and_tells_nothing(services):
    """A crafted ``batch`` (a write-back drain's request) naming another user's inodes:
    a setattr is ENOENT as for a number never used, a directory made with ``keep`` in
    their directory lands in the sender's own root, as for a directory removed, and
    the other user's inodes are unchanged."""
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "a") as a, \
            connect(dep.address, dep.new_user(), "m") as m:
        root = a.info["root"]
        d = await a.call("mknod", parent=root, name=b"d", mode=0o40700, uid=0, gid=0)
        before = await a.call("getattr", ino=d["ino"])
        nums = await m.call("lease_inodes", count=1, lessee="mallory")
        answers = await m.call("batch", ops=[
            ["setattr", "m-1", {"ino": d["ino"], "mode": 0o777, "mtime": 5}],
            ["setattr", "m-2", {"ino": d["ino"] + 10**9, "mode": 0o777}],
            ["mknod", "m-3", {"parent": d["ino"], "name": b"in", "mode": 0o40755, "uid": 0,
                              "gid": 0, "ino": nums[0], "lessee": "mallory", "keep": True}]])
        assert [e for e, _ in answers[:2]] == [errno.ENOENT, errno.ENOENT]
        assert answers[0][1].replace(str(d["ino"]), "N") == answers[1][1].replace(
            str(d["ino"] + 10**9), "N")
        assert answers[2][0] == 0
        assert (answers[2][1]["parent"], answers[2][1]["name"]) == (m.info["root"], b"in")
        after = await a.call("getattr", ino=d["ino"])
        assert after == before
        assert b"in" not in {n for n, _ in await a.call("readdir", ino=d["ino"])}


async def test_leased_inode_numbers_are_the_lessees_and_used_once(services):
    """A create under a leased number is accepted once, from its user and lessee only;
    one sent late with ``keep`` takes a conflicted name if its name was taken meanwhile,
    and the volume's root if its directory was removed."""
    dep = services.deployments["local"]
    user = dep.new_user()
    async with connect(dep.address, user, "a") as a, connect(dep.address, user, "b") as b, \
            connect(dep.address, dep.new_user(), "c") as stranger:
        root = a.info["root"]
        nums = await a.call("lease_inodes", count=3, lessee="mount-a")
        assert len(set(nums)) == 3
        args = {"parent": root, "mode": 0o100644, "uid": 0, "gid": 0}
        for c, lessee in ((b, "mount-b"), (stranger, "mount-a")):
            with pytest.raises(FSError) as e:
                await c.call("mknod", **args, name=b"x", ino=nums[0], lessee=lessee)
            assert e.value.errno == errno.EACCES
        f = await a.call("mknod", **args, name=b"x", ino=nums[0], lessee="mount-a")
        assert f["ino"] == nums[0]
        with pytest.raises(FSError) as e:   # used up
            await a.call("mknod", **args, name=b"y", ino=nums[0], lessee="mount-a")
        assert e.value.errno == errno.EACCES
        # The name taken meanwhile (by b): kept under the conflicted copy's name.
        await b.call("mknod", **args, name=b"taken")
        g = await a.call("mknod", **args, name=b"taken", ino=nums[1], lessee="mount-a",
                         keep=True)
        assert (g["ino"], g["parent"]) == (nums[1], root)
        assert g["name"].startswith(b"taken (conflicted copy ")
        # Its directory removed meanwhile: kept in the root.
        d = await b.call("mknod", **{**args, "mode": 0o40755}, name=b"d")
        await b.call("rmdir", parent=root, name=b"d")
        h = await a.call("mknod", **{**args, "parent": d["ino"]}, name=b"z", ino=nums[2],
                         lessee="mount-a", keep=True)
        assert (h["parent"], h["name"]) == (root, b"z")
        names = {n for n, _ in await b.call("readdir", ino=root)}
        assert {b"x", b"taken", g["name"], b"z"} <= names
        with pytest.raises(FSError) as e:
            await a.call("lease_inodes", count=0, lessee="mount-a")
        assert e.value.errno == errno.EINVAL


async def test_journalled_rmdir_symlink_and_link_name_what_the_mount_saw(services):
    """A write-back mount's journalled rmdir names the directory it removed: another inode
    at the name now is ESTALE, one with entries ENOTEMPTY, and nothing is removed. Its
    symlink takes a leased number (once, with ``keep``), its link is kept under a
    conflicted name if the name was taken meanwhile, and is ENOENT for an inode removed
    meanwhile."""
    dep = services.deployments["local"]
    async with connect(dep.address, dep.new_user(), "a") as a:
        root = a.info["root"]
        dirmode = {"mode": 0o40755, "uid": 0, "gid": 0}
        d = await a.call("mknod", parent=root, name=b"d", **dirmode)
        await a.call("rmdir", parent=root, name=b"d")
        d2 = await a.call("mknod", parent=root, name=b"d", **dirmode)
        with pytest.raises(FSError) as e:
            await a.call("rmdir", parent=root, name=b"d", ino=d["ino"])
        assert e.value.errno == errno.ESTALE
        await a.call("mknod", parent=d2["ino"], name=b"in", mode=0o100644, uid=0, gid=0)
        with pytest.raises(FSError) as e:
            await a.call("rmdir", parent=root, name=b"d", ino=d2["ino"])
        assert e.value.errno == errno.ENOTEMPTY
        assert {n for n, _ in await a.call("readdir", ino=d2["ino"])} >= {b"in"}

        nums = await a.call("lease_inodes", count=1, lessee="mount-a")
        s = await a.call("symlink", parent=root, name=b"d", target=b"t", uid=0, gid=0,
                         ino=nums[0], lessee="mount-a", keep=True)
        assert s["ino"] == nums[0] and s["name"].startswith(b"d (conflicted copy ")
        assert await a.call("readlink", ino=nums[0]) == b"t"
        with pytest.raises(FSError) as e:   # the number is used up
            await a.call("symlink", parent=root, name=b"s2", target=b"t", uid=0, gid=0,
                         ino=nums[0], lessee="mount-a", keep=True)
        assert e.value.errno == errno.EACCES

        f = await a.call("mknod", parent=root, name=b"f", mode=0o100644, uid=0, gid=0)
        ln = await a.call("link", ino=f["ino"], parent=root, name=b"d", keep=True)
        assert ln["nlink"] == 2 and ln["name"].startswith(b"d (conflicted copy ")
        await a.call("unlink", parent=root, name=b"f")
        await a.call("unlink", parent=root, name=ln["name"])
        with pytest.raises(FSError) as e:
            await a.call("link", ino=f["ino"], parent=root, name=b"g", keep=True)
        assert e.value.errno == errno.ENOENT


def test_a_servers_enosys_reaches_the_kernel_as_eio():
    """The adapter, pure logic: an operation a server does not know (one older than the
    mount answers ENOSYS) fails that request with EIO. The kernel takes ENOSYS as "never
    supported" and stops sending the request for the rest of the mount: an OPEN answered
    so made every later open of the mount handle-less (their writes failed)."""
    class Fake:
        vfs = SimpleNamespace(activity=Activity())

    @_errors
    async def open(self: Fake) -> None:
        raise FSError(errno.ENOSYS, "unknown operation 'entry'")

    @_errors
    async def unlink(self: Fake) -> None:
        raise FSError(errno.ENOENT, "no such entry")

    for fn, expected in ((open, errno.EIO), (unlink, errno.ENOENT)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            trio.run(fn, Fake())
        assert e.value.errno == expected


async def test_a_database_outage_behind_a_live_metaserver_is_logged(caplog):
    """A metaserver whose database is down answers every hello EIO ("database
    unavailable"). The mount's background reconnect logs no EIO (the outage log,
    ``_unreachable``, does), so that outage must go through the outage log: once,
    and no "reached again" for a hello that was refused."""
    from nimbusfs.client import MetaClient

    async def server(stream: trio.SocketStream) -> None:
        msg = await FrameReader(stream).read()
        await stream.send_all(pack([msg[0], errno.EIO, "database unavailable"]))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        client = MetaClient(nursery, f"127.0.0.1:{port}", "nfs_x", "host/test/1",
                            outage_timeout=1.0)
        with caplog.at_level("WARNING", logger="nimbusfs.client"):
            for _ in range(3):
                with pytest.raises(FSError) as e:
                    await client.connect()
                assert e.value.errno == errno.EIO
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("database unavailable" in m for m in lines) == 1, lines
    assert not any("reached again" in m for m in lines), lines
