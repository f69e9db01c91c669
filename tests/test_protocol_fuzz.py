"""The mount protocol driven with hypothesis-generated frames against the real metaserver.

Whatever a peer sends, before or after hello, the server must stay up, answer
(or close the connection) within a bound, never fail a request with an
internal error, and keep its memory bounded. Derandomized, so that a failure
replays.
"""

from __future__ import annotations

import errno
import inspect
import socket
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Deployment
from nimbusfs.protocol import MAX_HELLO_FRAME, PUSH, pack
from nimbusfs.server import namespace

ANSWER_BOUND = 10.0  # seconds: a bound on a hang, not a performance figure

ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries
leaves = (st.none() | st.booleans() | ints | st.floats() | st.text(max_size=20)
          | st.binary(max_size=40))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | ints, inner, max_size=4),
                      max_leaves=12)
# Each operation's parameters a request names: annotated type, and whether required.
OP_PARAMS = {name: {p: (typing.get_type_hints(fn, include_extras=True)[p],
                        param.default is inspect.Parameter.empty)
                    for p, param in list(inspect.signature(fn).parameters.items())[3:]}
             for name, fn in namespace.OPS.items()}
OP_PARAMS["subscribe"] = {"cursor": (int, True)}
OP_PARAMS["_"] = {"op_id": (str, False), "replay": (bool, False)}  # any mutation's

def typed(hint: Any) -> st.SearchStrategy:
    """Values of an operation's annotated type, as msgpack carries them."""
    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        r = params[1]
        return st.integers(r.start, r.stop - 1) | ints
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*map(typed, params))
    if origin is list:
        return st.lists(typed(params[0]), max_size=4)
    if origin is tuple:
        return st.tuples(*map(typed, params)).map(list)
    if origin is dict:
        return st.dictionaries(typed(params[0]), typed(params[1]), max_size=4)
    return {int: ints, bool: st.booleans(), bytes: st.binary(max_size=40),
            str: st.text(max_size=20), type(None): st.none(), list: st.lists(values),
            dict: st.dictionaries(st.text(max_size=8), values)}.get(hint, values)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Peer:
    """A raw blocking connection to the metaserver, framed by hand."""

    def __init__(self, dep: Deployment) -> None:
        host, port = dep.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=ANSWER_BOUND)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))  # socket.timeout past the bound
            if not chunk:
                return None
            buf += chunk
        return buf

    def read(self) -> Any | None:
        """The next frame's message, or None once the server closed the connection."""
        try:
            head = self._exactly(4)
            body = head and self._exactly(struct.unpack(">I", head)[0])
        except ConnectionResetError:
            return None
        return None if body is None else msgpack.unpackb(body, raw=False,
                                                         strict_map_key=False)

    def reply(self) -> Any | None:
        """The next answer, skipping pushed changes (a fuzzed ``subscribe`` asks for them)."""
        while (msg := self.read()) is not None and msg[0] == PUSH and isinstance(msg[1], str):
            pass
        return msg

    def close(self) -> None:
        self.sock.close()


@st.composite
def requests(draw: Callable, root: int) -> list:
    """``[rid, op, args]``: mostly real operations with their required arguments, mostly of
    the right types (to reach the transactions); now and then anything at all."""
    known = sorted(set(OP_PARAMS) - {"_"})
    op = draw(st.sampled_from(known)) if draw(st.integers(0, 9)) else draw(st.text(max_size=9))
    params = {**OP_PARAMS.get(op, {}), **OP_PARAMS["_"]}
    names = {p for p, (_, required) in params.items() if required}
    names |= set(draw(st.lists(st.sampled_from(sorted(params)), max_size=3)))
    if not draw(st.integers(0, 9)):  # a name missing, or one the operation does not take
        names ^= {draw(st.sampled_from(sorted(params)) | st.text(max_size=6))}
    args = {}
    for name in sorted(names):
        hint = params.get(name, (Any, False))[0]
        if not draw(st.integers(0, 5)):
            args[name] = draw(values)
        elif name in ("ino", "parent", "new_parent") and draw(st.booleans()):
            args[name] = root
        else:
            args[name] = draw(typed(hint))
    return [draw(st.integers(0, 2**31) | values), op, args]


def frames_before_hello() -> st.SearchStrategy[bytes]:
    """What a stranger may send: raw bytes, frames of any length header, msgpack that is
    no hello with a token (a wrong token would use up the address's allowance)."""
    not_hello = values.filter(lambda v: not (isinstance(v, list) and len(v) == 3
                                             and isinstance(v[2], dict)
                                             and isinstance(v[2].get("token"), str)))
    return (st.binary(max_size=64)
            | st.builds(lambda n, body: struct.pack(">I", n) + body,
                        st.integers(0, 2**32 - 1), st.binary(max_size=64))
            | not_hello.map(pack))


def test_fuzzed_frames_leave_the_server_serving(services):
    dep = services.deployments["local"]
    token = dep.new_user()
    pid = dep.proc.pid
    rss_before = rss_kib(pid)
    state: dict[str, Any] = {}

    def session() -> Peer:
        """The fuzzer's authenticated connection, opened again if a frame closed it."""
        if "peer" not in state:
            peer = Peer(dep)
            peer.send(pack([0, "hello", {"token": token, "device": "fuzz"}]))
            reply = peer.reply()
            assert reply is not None and reply[1] == 0, reply
            state["peer"], state["root"] = peer, reply[2]["root"]
        return state["peer"]

    def probe() -> None:
        """A fresh connection is served, within the bound."""
        p = Peer(dep)
        p.send(pack([0, "hello", {"token": token, "device": "probe"}]))
        reply = p.reply()
        assert reply is not None and reply[1] == 0, reply
        p.send(pack([1, "getattr", {"ino": reply[2]["root"]}]))
        assert p.reply()[1:2] == [0]
        p.close()

    session()

    @settings(max_examples=1000, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def authenticated(data: st.DataObject) -> None:
        peer = session()
        if data.draw(st.integers(0, 9)) == 0:  # now and then, bytes that are not msgpack
            body = data.draw(st.binary(min_size=1, max_size=64))
        else:
            body = msgpack.packb(data.draw(requests(state["root"])), use_bin_type=True)
        peer.send(struct.pack(">I", len(body)) + body)
        reply = peer.reply()
        if reply is None:  # an undecodable frame ends the connection
            peer.close()
            del state["peer"]
            return
        assert isinstance(reply, list) and len(reply) == 3, reply
        assert reply[1] != errno.EIO, reply  # "internal error": an exception the server missed

    @settings(max_examples=300, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(frames_before_hello())
    def stranger(frame: bytes) -> None:
        p = Peer(dep)
        p.send(frame)
        p.sock.shutdown(socket.SHUT_WR)  # nothing more is coming: answer or close now
        while (msg := p.read()) is not None:  # at most an error answer, then closed
            assert msg[1] in (errno.EPROTO, errno.EINVAL), msg
        p.close()

    authenticated()
    probe()
    stranger()
    probe()
    if "peer" in state:   # the last example may have ended the connection
        state["peer"].close()
    assert dep.proc.poll() is None
    # Frames of a few KiB at most (MAX_HELLO_FRAME before hello): the server's
    # memory must not have grown by more than a generous margin.
    assert rss_kib(pid) < rss_before + 64 * 1024 + MAX_HELLO_FRAME
