"""Fuzz targets: one boundary decoder each, its seed inputs and the oracle it must satisfy.

A target is the unit both the hypothesis tests (tests/fuzz/test_*.py) and the long-running
driver (benchmarks/fuzz_many.py, atheris or a plain mutation loop) feed: ``seeds()`` gives
valid inputs in the target's own byte format, ``run(data)`` pushes one input through the real
component and raises :class:`OracleViolation` when the component breaks its contract. Any
*other* exception escaping ``run`` is a crash of the component itself.

Input formats are flat bytes so a byte-level fuzzer can drive every target; where a target
needs a choice (which type to decode as, how to cut a stream into reads) the first byte
carries it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import re
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import msgpack
import trio
import trio.testing

from p2porch.common import codec
from p2porch.common.errors import CodecError

from .corpus import (
    YAML_VOCABULARY,
    boundary_hints,
    load_registry,
    manifest_seeds,
    mutate,
    mutate_bytes,
    mutate_text,
    registered_seeds,
)


class OracleViolation(AssertionError):
    """The component answered an input in a way its contract forbids."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise OracleViolation(message)


class Target:
    """Base of the fuzz targets (name, seeds, one input at a time)."""

    name: ClassVar[str] = ""
    _seed_cache: list[bytes] | None = None

    def seeds(self) -> list[bytes]:
        """Valid inputs to start mutating from (made once per target, then reused)."""
        if self._seed_cache is None:
            self._seed_cache = self.make_seeds()
        return list(self._seed_cache)

    def make_seeds(self) -> list[bytes]:
        raise NotImplementedError

    def run(self, data: bytes) -> None:
        raise NotImplementedError

    def mutate(self, data: bytes, rnd: random.Random, others: list[bytes]) -> bytes:
        """A mutant of one input (first byte kept most of the time: it is the selector)."""
        head, body = data[:1], data[1:]
        if not head or rnd.random() < 0.05:
            head = bytes((rnd.randrange(256),))
        return head + mutate(body, rnd, self.tags(), [o[1:] for o in others])

    def tags(self) -> list[int]:
        return []


# --------------------------------------------------------------------------- codec


def _accepts(hint: Any) -> Callable[[Any], bool]:
    """What a successful decode against ``hint`` may return."""
    if hint is Any:
        return lambda _v: True
    if isinstance(hint, type):
        return lambda v: isinstance(v, hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _accepts(args[0])
        return lambda v: isinstance(v, tuple) and all(item(x) for x in v)
    members = tuple(a for a in args if isinstance(a, type))
    return lambda v: isinstance(v, members)


def _plain(value: Any) -> bool:
    """True if ``value`` holds only what the codec itself writes (no msgpack extensions)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, msgpack.ExtType | msgpack.Timestamp):
            return False
        if isinstance(item, tuple | list | frozenset):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif attrs.has(type(item)):
            stack.extend(getattr(item, f.name) for f in attrs.fields(type(item)))
    return True


@functools.cache
def _codec_seeds(seed: int) -> tuple[dict[type, list[bytes]], list[type]]:
    """Synthesizing ~90 records by trial takes a while: once per process is enough."""
    return registered_seeds(random.Random(seed))


class CodecTarget(Target):
    """``codec.decode(payload, hint)`` for every registered record and boundary union.

    Input: ``[hint index] + payload``. Contract: a value the hint allows, or CodecError --
    and a decoded value encodes again to bytes that decode to the same encoding (so a node
    can forward or store whatever it accepted).
    """

    name = "codec"

    def __init__(self, seed: int = 1) -> None:
        self.records = load_registry()
        self.hints: list[tuple[str, Any]] = [(c.__qualname__, c) for c in self.records]
        self.hints += list(boundary_hints().items())
        # The first input byte picks the hint: past 256 hints, inputs would need two.
        assert len(self.hints) <= 256, "CodecTarget: widen the hint selector to two bytes"
        self._accept = [_accepts(h) for _, h in self.hints]
        self._seeds_by_type, self.unbuildable = _codec_seeds(seed)
        self._tags = sorted(codec.registered_tag(c) for c in self.records)

    def tags(self) -> list[int]:
        return self._tags

    def index_of(self, hint: Any) -> int:
        return next(i for i, (_, h) in enumerate(self.hints) if h == hint)

    def make_seeds(self) -> list[bytes]:
        out: list[bytes] = []
        by_class = {c: i for i, (_, c) in enumerate(self.hints) if isinstance(c, type)}
        for cls, encodings in self._seeds_by_type.items():
            for enc in encodings:
                out.append(bytes((by_class[cls],)) + enc)
        # The same encodings against the unions that carry them.
        unions = [i for i, (_, h) in enumerate(self.hints) if not isinstance(h, type)]
        rnd = random.Random(7)
        for i in unions:
            for enc in rnd.sample([e for v in self._seeds_by_type.values() for e in v], 16):
                out.append(bytes((i,)) + enc)
        return out

    def payloads(self) -> list[bytes]:
        return [e for v in self._seeds_by_type.values() for e in v]

    def run(self, data: bytes) -> None:
        if not data:
            return
        index = data[0] % len(self.hints)
        self.check(data[1:], index)

    def check(self, payload: bytes, index: int) -> Any:
        name, hint = self.hints[index]
        try:
            value = codec.decode(payload, hint)
        except CodecError as exc:
            _check(bool(str(exc)), f"{name}: CodecError without a message")
            return None
        _check(self._accept[index](value), f"{name}: decoded a {type(value).__name__}")
        _check(_plain(value), f"{name}: decoded a msgpack extension value: {value!r:.120}")
        try:
            again = codec.encode(value)
        except TypeError as exc:
            raise OracleViolation(f"{name}: decoded value does not encode: {exc}") from exc
        _check(
            codec.encode(codec.decode(again, hint)) == again,
            f"{name}: decode(encode(v)) changed the value",
        )
        return value


# --------------------------------------------------------------------------- gossip


class GossipTarget(Target):
    """The gossip receive path: keyring.open, then the SWIM core's packet handlers.

    Input: ``[mode] + bytes``. Modes: 0 a UDP plaintext (sealed and opened with the real
    keyring first, so it is "valid key, garbage plaintext"), 1 a raw datagram as received
    (must open or raise AuthenticationFailed), 2 a TCP ping, 3 a push-pull state, 4 a sealed
    TCP stream request as ``GossipService._read_frame`` sees it. Contract: the core never
    raises, counts every undecodable input in ``bad_packets``, and keeps ticking.
    """

    name = "gossip"
    SELF = "fuzz-self"
    PEER = "peer-1"
    RESET_EVERY = 500

    def __init__(self) -> None:
        from p2porch.gossip.keyring import Keyring

        self.key = bytes(range(32))
        self.keyring = Keyring(self.key, [bytes(range(1, 17))])
        self.stranger = Keyring(bytes(range(100, 132)))
        self.fresh_core()

    def fresh_core(self) -> None:
        """Forget everything the core learnt (so one input's effect does not depend on others)."""
        from p2porch.gossip.config import GossipConfig
        from p2porch.gossip.core import SwimCore
        from p2porch.gossip.messages import Member, MemberState
        from p2porch.gossip.table import MemberSnapshot

        self.now = 0.0
        self.inputs = 0
        self.core = SwimCore(GossipConfig.lan(), self.SELF, "10.0.0.1:7946", random.Random(3), 0.0)
        peers = [
            Member(f"peer-{i}", f"10.0.0.{i + 2}:7946", 1, MemberState.ALIVE) for i in range(3)
        ]
        self.core.bootstrap(0.0, MemberSnapshot(peers))

    def _messages(self) -> list[Any]:
        from p2porch.gossip import messages as m

        me, peer = self.SELF, self.PEER
        return [
            m.Ping(1, me, peer),
            m.Ping(2, "peer-2", peer),
            m.IndirectPing(3, "peer-2", "10.0.0.4:7946", peer, True),
            m.Ack(1, peer),
            m.Nack(1, peer),
            m.Alive(peer, "10.0.0.3:7946", 2, b"meta", 1),
            m.Alive("newcomer", "10.0.0.9:7946", 0),
            m.Alive(me, "10.0.0.1:7946", 5),
            m.Suspect(peer, 1, "peer-2"),
            m.Suspect(me, 0, peer),
            m.Dead("peer-2", 1, peer),
            m.Dead(me, 0, peer),
            m.Left("peer-0", 1),
        ]

    def make_seeds(self) -> list[bytes]:
        # Sealing draws random nonces: the base class keeps these, so they stay the same.
        from p2porch.gossip import messages as m
        from p2porch.gossip.keyring import PURPOSE_TCP, PURPOSE_UDP
        from p2porch.gossip.service import PushPullRequest, StreamPingRequest

        singles = [codec.encode(msg) for msg in self._messages()]
        compound = codec.encode(m.Compound(tuple(singles[:6])))
        table = (
            m.Member(self.PEER, "10.0.0.3:7946", 3, m.MemberState.ALIVE, b"x", 2),
            m.Member("peer-2", "10.0.0.4:7946", 1, m.MemberState.DEAD),
            m.Member("peer-0", "10.0.0.2:7946", 2, m.MemberState.LEFT),
            m.Member(self.SELF, "10.0.0.1:7946", 9, m.MemberState.SUSPECT),
        )
        state = codec.encode(
            m.PushPullState(self.PEER, "10.0.0.3:7946", False, bytes(16), codec.encode(table))
        )
        out = [b"\x00" + p for p in [*singles, compound]]
        out += [b"\x01" + self.keyring.seal(p, PURPOSE_UDP) for p in [*singles[:4], compound]]
        out += [b"\x02" + singles[0], b"\x02" + singles[1]]
        out += [b"\x03" + state]
        requests = [PushPullRequest(False, state), StreamPingRequest(singles[0])]
        out += [b"\x04" + self.keyring.seal(codec.encode(r), PURPOSE_TCP) for r in requests]
        return out

    def tags(self) -> list[int]:
        return list(range(100, 111))

    def run(self, data: bytes) -> None:
        from p2porch.gossip.keyring import PURPOSE_TCP, PURPOSE_UDP, AuthenticationFailed
        from p2porch.gossip.messages import Packet
        from p2porch.gossip.service import PushPullRequest, StreamPingRequest, StreamRequest

        if not data:
            return
        self.inputs += 1
        if self.inputs > self.RESET_EVERY:
            self.fresh_core()
        mode, body = data[0] % 5, data[1:]
        core = self.core
        self.now += 0.01
        now = self.now
        bad_before = core.stats()["bad_packets"]
        if mode == 0:
            sealed = self.keyring.seal(body, PURPOSE_UDP)
            opened = self.keyring.open(sealed, PURPOSE_UDP)
            _check(opened == body, "seal/open round trip")
            for wrong in (self.stranger, None):
                try:
                    if wrong is None:
                        self.keyring.open(sealed, PURPOSE_TCP)
                    else:
                        wrong.open(sealed, PURPOSE_UDP)
                except AuthenticationFailed:
                    pass
                else:
                    raise OracleViolation("a datagram opened under the wrong key or purpose")
            core.receive_packet(now, "10.0.0.3:7946", opened)
            try:
                codec.decode(opened, Packet)
            except CodecError:
                _check(core.stats()["bad_packets"] > bad_before, "garbage not counted")
        elif mode == 1:
            try:
                plaintext = self.keyring.open(body, PURPOSE_UDP)
            except AuthenticationFailed:
                pass
            else:
                core.receive_packet(now, "10.0.0.3:7946", plaintext)
        elif mode == 2:
            answer = core.receive_tcp_ping(now, "10.0.0.3:7946", body)
            _check(answer is None or isinstance(answer, bytes), "tcp ping answer type")
        elif mode == 3:
            core.merge_remote_state(now, body, join=len(body) % 2 == 0)
        else:
            try:
                plaintext = self.keyring.open(body, PURPOSE_TCP)
                request: PushPullRequest | StreamPingRequest = codec.decode(
                    plaintext, StreamRequest
                )
            except (AuthenticationFailed, CodecError):
                pass
            else:
                if isinstance(request, PushPullRequest):
                    core.local_state(now, request.join)
                    core.merge_remote_state(now, request.state, request.join)
                else:
                    _check(isinstance(request, StreamPingRequest), "StreamRequest union")
                    core.receive_tcp_ping(now, "10.0.0.3:7946", request.data)
        core.tick(now)
        deadline = core.next_deadline()
        _check(not math.isnan(deadline), "next_deadline is NaN")
        ready = core.ready()
        budget = core.config.udp_budget_bytes
        for packet in ready.packets:
            _check(len(packet.data) <= budget, f"outgoing datagram over budget: {len(packet.data)}")


# --------------------------------------------------------------------------- raft frames


def reference_frames(stream: bytes, max_frame: int) -> tuple[list[bytes], bool]:
    """The frames a correct reader yields and whether it ends cleanly (the spec, by hand)."""
    frames: list[bytes] = []
    pos = 0
    while True:
        if pos == len(stream):
            return frames, True
        if len(stream) - pos < 4:
            return frames, False
        length = int.from_bytes(stream[pos : pos + 4], "big")
        if length > max_frame:
            return frames, False
        if len(stream) - pos - 4 < length:
            return frames, False
        frames.append(stream[pos + 4 : pos + 4 + length])
        pos += 4 + length


class FramesTarget(Target):
    """consensus.transport.FrameReader over a stream cut into reads at fuzzed places, then
    ``codec.decode(frame, raft.Message)`` for each frame (the Raft inbound path).

    Input: ``[cut size] + stream bytes``. Contract: exactly the reference frames, then a
    clean end (None) or FrameError; never another error, never a frame over the limit.
    """

    name = "frames"
    MAX_FRAME = 2048

    def __init__(self, codec_target: CodecTarget | None = None) -> None:
        from p2porch.consensus.messages import Message

        self.codec = codec_target or CodecTarget()
        self.message_index = self.codec.index_of(Message)

    def make_seeds(self) -> list[bytes]:
        from p2porch.consensus.messages import Message
        from p2porch.consensus.transport import encode_frame

        accepts = _accepts(Message)
        payloads = []
        for p in self.codec.payloads():
            try:
                if accepts(codec.decode(p, Message)) and len(p) <= self.MAX_FRAME:
                    payloads.append(p)
            except CodecError:
                continue
        rnd = random.Random(5)
        out = []
        for _ in range(40):
            chosen = rnd.sample(payloads, rnd.randint(1, 4))
            out.append(bytes((rnd.choice((0, 1, 3, 7, 64)),)) + b"".join(map(encode_frame, chosen)))
        return out

    def tags(self) -> list[int]:
        return self.codec.tags()

    def mutate(self, data: bytes, rnd: random.Random, others: list[bytes]) -> bytes:
        if rnd.random() < 0.5:
            return super().mutate(data, rnd, others)
        return data[:1] + mutate_bytes(data[1:], rnd, [o[1:] for o in others])

    def run(self, data: bytes) -> None:
        if not data:
            return
        cut = data[0] % 64 + 1 if data[0] < 192 else 1 << 20
        stream = data[1:]
        frames, error = trio.run(self._read_all, stream, cut)
        expected, clean = reference_frames(stream, self.MAX_FRAME)
        _check(frames == expected, f"frames differ: {len(frames)} read, {len(expected)} expected")
        _check(clean == (error is None), f"end of stream: clean={clean}, error={error!r}")
        for frame in frames:
            self.codec.check(frame, self.message_index)

    async def _read_all(self, stream: bytes, cut: int) -> tuple[list[bytes], Exception | None]:
        from p2porch.consensus.transport import FrameError, FrameReader

        receiver = trio.testing.MemoryReceiveStream()
        pieces = [stream[i : i + cut] for i in range(0, len(stream), cut)]
        pieces.reverse()

        async def feed() -> None:
            if pieces:
                receiver.put_data(pieces.pop())
            else:
                receiver.put_eof()

        receiver.receive_some_hook = feed
        reader = FrameReader(receiver, self.MAX_FRAME)
        frames: list[bytes] = []
        while True:
            try:
                frame = await reader.receive()
            except FrameError as exc:
                return frames, exc
            if frame is None:
                return frames, None
            _check(len(frame) <= self.MAX_FRAME, "frame over the limit")
            frames.append(frame)


# --------------------------------------------------------------------------- manifests


_YAML_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _yaml_lines(source: str | bytes) -> int:
    """How many lines YAML sees in ``source`` (it breaks lines at CR, LF, NEL, LS and PS)."""
    if isinstance(source, bytes):
        if source[:2] in (b"\xff\xfe", b"\xfe\xff"):
            source = source.decode("utf-16", "replace")
        else:
            source = source.decode("utf-8", "replace")
    return len(_YAML_BREAK.findall(source)) + 1


class ManifestTarget(Target):
    """``parse_manifests`` on text or bytes.

    Input: ``[0|1] + text`` (even first byte: the UTF-8 decoded text, odd: the raw bytes).
    Contract: a list of App/Namespace records that survive a dump/parse round trip, or a
    ManifestError whose every problem names the file and the document (and a line inside
    the text when it gives one).
    """

    name = "manifest"
    FILENAME = "fuzz.yaml"

    def make_seeds(self) -> list[bytes]:
        return [bytes((i % 2,)) + t.encode() for i, t in enumerate(manifest_seeds())]

    def mutate(self, data: bytes, rnd: random.Random, others: list[bytes]) -> bytes:
        text = data[1:].decode("utf-8", "replace")
        for _ in range(rnd.choice((1, 1, 2, 3, 6))):
            text = mutate_text(text, rnd, YAML_VOCABULARY)
        head = data[:1] if rnd.random() < 0.9 else bytes((rnd.randrange(2),))
        out = head + text.encode("utf-8", "surrogatepass")
        if rnd.random() < 0.1:
            out = out[:1] + mutate_bytes(out[1:], rnd)
        return out

    def run(self, data: bytes) -> None:
        if not data:
            return
        source: str | bytes = data[1:]
        if data[0] % 2 == 0:
            source = data[1:].decode("utf-8", "replace")
        self.check(source)

    def check(self, source: str | bytes) -> list[Any]:
        from p2porch.node.errors import ManifestError, ManifestProblem
        from p2porch.node.manifest import dump_manifests, parse_manifests
        from p2porch.node.spec import App, Namespace

        try:
            objs = parse_manifests(source, self.FILENAME)
        except ManifestError as exc:
            _check(bool(exc.problems), "ManifestError without problems")
            lines = _yaml_lines(source)
            for p in exc.problems:
                _check(isinstance(p, ManifestProblem), "problem type")
                _check(p.filename == self.FILENAME, f"problem names {p.filename!r}")
                _check(isinstance(p.document, int) and p.document >= 1, f"document {p.document}")
                _check(bool(p.message), "problem without a message")
                if p.line is not None:
                    # A YAML mark may point just past the last line (end of stream).
                    _check(1 <= p.line <= lines + 1, f"line {p.line} outside the {lines} lines")
                _check(
                    str(p).startswith(f"{self.FILENAME}: document {p.document}"),
                    f"problem text does not locate itself: {p}",
                )
            return []
        for obj in objs:
            _check(isinstance(obj, App | Namespace), f"parsed a {type(obj).__name__}")
        if objs:
            text = dump_manifests(objs)
            try:
                again = parse_manifests(text, self.FILENAME)
            except ManifestError as exc:
                raise OracleViolation(f"dumped manifest does not parse again: {exc}") from exc
            _check(again == objs, "dump/parse round trip changed the records")
        return objs


# --------------------------------------------------------------------------- HTTP


class HttpTarget(Target):
    """node.http's connection loop (h11 request reader, body cap) on one fuzzed connection.

    Input: ``[cut size] + bytes sent by the client`` (then EOF). The server runs on a trio
    memory stream under a MockClock (timeouts pass instantly, so nothing can wait). Contract:
    no exception out of the connection loop, no internal error (500), a handler never sees a
    body over the cap, and every answer is an HTTP/1.1 status line.
    """

    name = "http"
    MAX_BODY = 1024
    OK_STATUSES = frozenset({200, 400, 404, 405, 408, 413, 431, 501, 505})

    def make_seeds(self) -> list[bytes]:
        requests = [
            b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /echo?x=1&y=%20 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\n",
            b"DELETE /echo HTTP/1.0\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000,
        ]
        return [bytes((i * 37 % 256,)) + r for i, r in enumerate(requests)]

    TOKENS = (
        b"\r\n",
        b"\r\n\r\n",
        b"\n",
        b" ",
        b":",
        b"Content-Length: 99999999999\r\n",
        b"Content-Length: -1\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"ffffffff\r\n",
        b"Connection: close\r\n",
        b"Expect: 100-continue\r\n",
        b"GET ",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"%00",
        b"%zz",
        b"?a=%ff&&=",
        b"\x00",
        b"\xff",
    )

    def mutate(self, data: bytes, rnd: random.Random, others: list[bytes]) -> bytes:
        body = data[1:]
        for _ in range(rnd.choice((1, 2, 3))):
            if rnd.random() < 0.4:
                pos = rnd.randrange(len(body) + 1)
                body = body[:pos] + rnd.choice(self.TOKENS) + body[pos:]
            else:
                body = mutate_bytes(body, rnd, [o[1:] for o in others])
        return data[:1] + body

    def run(self, data: bytes) -> None:
        if not data:
            return
        cut = data[0] % 32 + 1 if data[0] < 128 else 1 << 20
        clock = trio.testing.MockClock(autojump_threshold=0)
        trio.run(self._exchange, data[1:], cut, clock=clock)

    async def _exchange(self, sent: bytes, cut: int) -> None:
        from p2porch.node.http import HttpServer, Request, Response, Router

        async def echo(request: Request) -> Response:
            _check(len(request.body) <= self.MAX_BODY, f"handler got {len(request.body)} bytes")
            return Response.json({"n": len(request.body), "q": request.query})

        router = Router()
        router.add("GET", "/echo", echo)
        router.add("POST", "/echo", echo)
        server = HttpServer(router, max_body_bytes=self.MAX_BODY)
        client, remote = trio.testing.memory_stream_pair()
        received = bytearray()

        async def talk() -> None:
            # The server may hang up before it has read everything (after a 400, say), as a
            # TCP peer would; the client then just collects the answer.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for i in range(0, len(sent), cut):
                    await client.send_all(sent[i : i + cut])
                await client.send_eof()
            while True:
                chunk = await client.receive_some(65536)
                if not chunk:
                    return
                received.extend(chunk)

        async def serve() -> None:
            try:
                await server._serve_connection(remote, "fuzz:1")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await remote.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk)
            nursery.start_soon(serve)
        _check(server.counters.internal_errors == 0, "the server counted an internal error")
        for line in bytes(received).split(b"\r\n"):
            if line.startswith(b"HTTP/"):
                parts = line.split(b" ", 2)
                _check(
                    parts[0] == b"HTTP/1.1" and int(parts[1]) in self.OK_STATUSES,
                    f"unexpected status line {line!r}",
                )
        _check(
            not received or received.startswith(b"HTTP/1.1 "),
            f"answer is not HTTP: {bytes(received[:40])!r}",
        )


TARGETS: dict[str, Callable[[], Target]] = {
    "codec": CodecTarget,
    "gossip": GossipTarget,
    "frames": FramesTarget,
    "manifest": ManifestTarget,
    "http": HttpTarget,
}

__all__ = [
    "TARGETS",
    "CodecTarget",
    "FramesTarget",
    "GossipTarget",
    "HttpTarget",
    "ManifestTarget",
    "OracleViolation",
    "Target",
    "reference_frames",
]
