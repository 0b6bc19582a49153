"""The trio shell around the sans-I/O SWIM core: sockets, timers, encryption, events.

The core (core.py) decides everything -- whom to probe, what to gossip, when a member is
suspect or dead. This shell only moves bytes and time:

* **one UDP socket**: every datagram is opened with the keyring, then handed to
  ``core.receive_packet``. Datagrams larger than ``udp_mtu_bytes`` are dropped (the read
  buffer is one byte larger than the limit, so an oversize datagram is always visible as
  such); anything that fails authentication is dropped and counted as ``bad_auth``.
* **one TCP listener** on the same port, for push-pull state exchange and fallback pings.
  One request and one reply per connection, each a length-prefixed, sealed frame (below).
  A connection must finish inside ``tcp_io_timeout_s`` and frames are capped at
  ``max_frame_bytes``; at most ``max_tcp_connections`` are served at once and further
  ones are closed on accept. A slow or garbage client therefore costs at most one slot for
  a bounded time, and never memory beyond one frame.
* **a driver loop** that ticks the core, drains its ``Ready`` batches (sealing and sending
  packets, starting push-pulls and TCP pings as tasks, publishing events), then sleeps until
  ``core.next_deadline()`` or until an inbound packet wakes it -- no polling.

TCP frame (both directions)::

    +-----------------------+-------------------------------------------------+
    | length, 4 bytes, BE   | Keyring.seal(codec.encode(StreamRequest | ...)) |
    +-----------------------+-------------------------------------------------+

**Slow event consumers.** Gossip must never wait for the node daemon: a stalled consumer
blocking the driver would stop probes and get *this* node declared dead. So events go into a
bounded buffer (``event_buffer``); when it is full the event is dropped and counted
(``events_dropped``) and, once the consumer has drained what is buffered, ``events()``
yields one :class:`Resync` carrying the current member list. The consumer treats that as
"you missed transitions; here is the truth" -- every member's final state survives even though
intermediate transitions may not.

Time comes from ``trio.current_time()`` so shell tests run under ``MockClock``; the byte
transport is pluggable (:class:`Transport`) so they can also run on an in-memory network.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from typing import Protocol

import attrs
import trio

from p2porch.common import codec
from p2porch.common.errors import CodecError

from .config import GossipConfig
from .core import SwimCore
from .errors import JoinFailed, NotRunning, TransportError
from .keyring import (
    OVERHEAD_BYTES,
    PURPOSE_TCP,
    PURPOSE_UDP,
    AuthenticationFailed,
    Keyring,
    save_keyring,
)
from .messages import Event, Member, Ready

__all__ = [
    "GossipService",
    "PushPullReply",
    "PushPullRequest",
    "Resync",
    "ShellLimits",
    "StreamPingReply",
    "StreamPingRequest",
    "Transport",
    "UdpTcpTransport",
    "format_addr",
    "parse_addr",
]

_LENGTH = struct.Struct(">I")
_TICK_SLACK_S = 1e-6


# ---------------------------------------------------------------------- stream envelopes
# Tags 190-199 are reserved for the shell inside the gossip range (100-199); the core owns
# the rest. The bodies are the core's own bytes (already codec-encoded by the core).


@codec.register(190)
@attrs.frozen
class PushPullRequest:
    """Client -> server: my state; ``join`` says I am joining (the core treats it specially)."""

    join: bool
    state: bytes


@codec.register(191)
@attrs.frozen
class PushPullReply:
    """Server -> client: the server's state, sent before it merges the client's."""

    state: bytes


@codec.register(192)
@attrs.frozen
class StreamPingRequest:
    """A fallback probe over TCP (for peers whose UDP path is lossy or filtered)."""

    data: bytes


@codec.register(193)
@attrs.frozen
class StreamPingReply:
    """The core's answer to a TCP probe; ``None`` when it had nothing to say."""

    data: bytes | None


StreamRequest = PushPullRequest | StreamPingRequest


@attrs.frozen
class Resync:
    """Yielded by ``events()`` after events were dropped for a slow consumer.

    ``members`` is the complete current view; ``dropped`` how many events were lost since
    the previous Resync.
    """

    dropped: int
    members: tuple[Member, ...]


@attrs.frozen
class ShellLimits:
    """Resource bounds of the shell (the protocol's timings live in ``GossipConfig``)."""

    max_frame_bytes: int = 4 * 1024 * 1024
    """Largest sealed TCP frame accepted; push-pull state of ~5,000 members fits."""
    tcp_io_timeout_s: float = 5.0
    """A whole TCP exchange (connect, request, reply) must finish within this."""
    max_tcp_connections: int = 16
    """Inbound connections served at once; more are closed on accept and counted."""
    max_outbound_tcp: int = 16
    """Outbound push-pulls and TCP pings in flight at once; more wait for a slot."""
    event_buffer: int = 1024
    """Events buffered for a slow consumer before they are dropped (see Resync)."""
    leave_propagate_s: float = 1.0
    """How long ``leave()`` keeps gossiping so the LEFT message reaches the cluster."""
    join_timeout_s: float = 10.0
    """How long ``join()`` waits for the first successful push-pull with a seed."""

    def __attrs_post_init__(self) -> None:
        if self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be at least 1024")
        if self.tcp_io_timeout_s <= 0:
            raise ValueError("tcp_io_timeout_s must be positive")
        if self.max_tcp_connections < 1 or self.max_outbound_tcp < 1:
            raise ValueError("connection limits must be at least 1")
        if self.event_buffer < 1:
            raise ValueError("event_buffer must be at least 1")
        if self.leave_propagate_s < 0 or self.join_timeout_s <= 0:
            raise ValueError("leave_propagate_s must be >= 0 and join_timeout_s > 0")


# ---------------------------------------------------------------------- addresses


def parse_addr(addr: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; ValueError for anything else.

    Port 0 ("pick a free one") only makes sense for binding, hence ``allow_port_zero``.
    """
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"not a host:port address: {addr!r}")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port < 65536:
        raise ValueError(f"port out of range in {addr!r}")
    return host, port


def format_addr(host: str, port: int) -> str:
    return f"{host}:{port}"


# ---------------------------------------------------------------------- transport


StreamHandler = Callable[[trio.abc.Stream, str], Awaitable[None]]


class Transport(Protocol):
    """What the shell needs from the network; real sockets or an in-memory fake."""

    @property
    def local_addr(self) -> str:
        """``host:port`` both the datagram socket and the stream listener are bound to."""
        ...

    async def send_datagram(self, dst: str, data: bytes) -> None: ...

    async def receive_datagram(self, max_bytes: int) -> tuple[bytes, str]:
        """Next datagram, truncated to ``max_bytes``, and its source address."""
        ...

    async def connect(self, dst: str) -> trio.abc.Stream: ...

    async def serve(
        self, handler: StreamHandler, limit: int, on_reject: Callable[[], None]
    ) -> None:
        """Accept streams forever, running ``handler(stream, peer_addr)`` for each while fewer
        than ``limit`` run, closing (and reporting via ``on_reject``) the ones beyond."""
        ...

    async def aclose(self) -> None: ...


class UdpTcpTransport:
    """Real sockets: one UDP socket and one TCP listener on the same host:port."""

    def __init__(self, udp: trio.socket.SocketType, listener: trio.SocketListener) -> None:
        self._udp = udp
        self._listener = listener
        host, port = udp.getsockname()[:2]
        self._host: str = host
        self._addr = format_addr(host, port)

    @classmethod
    async def bind(cls, host: str, port: int) -> UdpTcpTransport:
        """Bind UDP and TCP to the same port (port 0: pick one free for both)."""
        last_error: OSError | None = None
        for _attempt in range(20):
            tcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            try:
                tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
                await tcp.bind((host, port))
                actual = tcp.getsockname()[1]
                await udp.bind((host, actual))
                tcp.listen(128)
            except OSError as exc:
                tcp.close()
                udp.close()
                last_error = exc
                if port != 0:
                    break
                continue
            return cls(udp, trio.SocketListener(tcp))
        raise TransportError(f"cannot bind gossip sockets on {host}:{port}: {last_error}") from (
            last_error
        )

    @property
    def local_addr(self) -> str:
        return self._addr

    async def send_datagram(self, dst: str, data: bytes) -> None:
        await self._udp.sendto(data, parse_addr(dst))

    async def receive_datagram(self, max_bytes: int) -> tuple[bytes, str]:
        data, src = await self._udp.recvfrom(max_bytes)
        return data, format_addr(src[0], src[1])

    async def connect(self, dst: str) -> trio.abc.Stream:
        host, port = parse_addr(dst)
        # Originate from our own address so peers on 127.0.0.N see the right source.
        return await trio.open_tcp_stream(host, port, local_address=self._host)

    async def serve(
        self, handler: StreamHandler, limit: int, on_reject: Callable[[], None]
    ) -> None:
        active = 0
        # One source address may hold only a share of the slots: a member needs one or two
        # at a time (a push-pull, a TCP ping), while a stranger sending nothing (or half a
        # TLS handshake) must not be able to take them all and lock every member out.
        per_host_limit = max(1, limit // 4)
        per_host: dict[str, int] = {}

        async def run_one(stream: trio.SocketStream, peer: str, host: str) -> None:
            nonlocal active
            try:
                await handler(stream, peer)
            finally:
                active -= 1
                per_host[host] -= 1
                if not per_host[host]:
                    del per_host[host]
                with suppress(trio.BrokenResourceError, OSError):
                    await stream.aclose()

        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await self._listener.accept()
                except OSError:
                    # EMFILE and friends: back off instead of spinning.
                    on_reject()
                    await trio.sleep(0.05)
                    continue
                if active >= limit:
                    on_reject()
                    await trio.aclose_forcefully(stream)
                    continue
                try:
                    peer_host, peer_port = stream.socket.getpeername()[:2]
                except OSError:
                    await trio.aclose_forcefully(stream)
                    continue
                if per_host.get(peer_host, 0) >= per_host_limit:
                    on_reject()
                    await trio.aclose_forcefully(stream)
                    continue
                active += 1
                per_host[peer_host] = per_host.get(peer_host, 0) + 1
                nursery.start_soon(run_one, stream, format_addr(peer_host, peer_port), peer_host)

    async def aclose(self) -> None:
        self._udp.close()
        await self._listener.aclose()


# ---------------------------------------------------------------------- framing


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = await stream.receive_some(min(n - len(chunks), 65536))
        if not chunk:
            raise TransportError("stream closed mid-frame")
        chunks += chunk
    return bytes(chunks)


class _BadFrame(Exception):
    """Internal: a frame that is too large, truncated or unauthenticated."""


# ---------------------------------------------------------------------- the service


class GossipService:
    """One gossip member: the SWIM core plus sockets, timers and a keyring.

    Use it inside a nursery::

        service = GossipService(config, "node-a", ("127.0.0.2", 7946), keyring, b"", seeds)
        await nursery.start(service.run)
        async for event in service.events(): ...

    ``run`` binds, joins ``seeds`` in the background (if any) and serves until cancelled or
    until ``stop()``.
    """

    def __init__(  # noqa: PLR0917 - the positional order is the documented contract
        self,
        config: GossipConfig,
        name: str,
        bind: tuple[str, int],
        keyring: Keyring,
        meta: bytes = b"",
        seeds: Sequence[str] = (),
        *,
        limits: ShellLimits | None = None,
        keyring_path: str | None = None,
        incarnation: int = 0,
        rng: random.Random | None = None,
        transport_factory: Callable[[str, int], Awaitable[Transport]] | None = None,
    ) -> None:
        if config.encryption_overhead_bytes < OVERHEAD_BYTES:
            # The shell knows what sealing costs; the core must leave that much MTU room.
            # (evolve re-runs the config's checks: a budget that becomes too small raises.)
            config = attrs.evolve(config, encryption_overhead_bytes=OVERHEAD_BYTES)
        self.config = config
        self.name = name
        self.limits = limits or ShellLimits()
        self.keyring = keyring
        self._bind = bind
        self._meta = meta
        self._seeds = tuple(seeds)
        self._keyring_path = keyring_path
        self._incarnation = incarnation
        self._rng = rng or random.Random()
        self._transport_factory = transport_factory or UdpTcpTransport.bind
        self._transport: Transport | None = None
        self._core: SwimCore | None = None
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._outbound = trio.CapacityLimiter(self.limits.max_outbound_tcp)
        self._event_send, self._event_recv = trio.open_memory_channel[Event](
            self.limits.event_buffer
        )
        self._events_taken = False
        self._unreported_drops = 0
        self._push_pull_ok = trio.Event()
        self._joining_via: set[str] = set()
        self._stopped = trio.Event()
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "udp_in",
                "udp_out",
                "udp_bytes_in",
                "udp_bytes_out",
                "udp_oversize",
                "udp_send_errors",
                "bad_auth",
                "bad_addr",
                "tcp_accepted",
                "tcp_rejected",
                "tcp_bad_frames",
                "tcp_timeouts",
                "tcp_bytes_in",
                "tcp_bytes_out",
                "push_pulls_ok",
                "push_pulls_failed",
                "tcp_pings_ok",
                "tcp_pings_failed",
                "events_dropped",
            ),
            0,
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def addr(self) -> str:
        """Our ``host:port`` (known once ``run`` has started)."""
        return self._require_transport().local_addr

    @property
    def core(self) -> SwimCore:
        if self._core is None:
            raise NotRunning("the gossip service is not running")
        return self._core

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, start the loops, report started, then serve until cancelled or stopped.

        A service runs once: after ``run`` returns, ``members()`` and ``stats()`` still answer
        (the last view), but it cannot be started again -- make a new one.
        """
        if self._transport is not None:
            raise RuntimeError("a GossipService runs once; create a new one")
        try:
            transport = await self._transport_factory(*self._bind)
        except OSError as exc:
            raise TransportError(f"cannot bind {self._bind}: {exc}") from exc
        self._transport = transport
        try:
            self._core = SwimCore(
                self.config,
                self.name,
                transport.local_addr,
                rng=self._rng,
                now=trio.current_time(),
                meta=self._meta,
                incarnation=self._incarnation,
            )
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._udp_loop)
                nursery.start_soon(
                    transport.serve,
                    self._serve_stream,
                    self.limits.max_tcp_connections,
                    self._count_rejected,
                )
                nursery.start_soon(self._driver_loop)
                if self._seeds:
                    self._start_join(self._seeds)
                task_status.started()
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._event_send.close()
            with trio.CancelScope(shield=True):
                await transport.aclose()

    def stop(self) -> None:
        """Stop serving (no goodbye: call ``leave()`` first for a graceful exit)."""
        self._stopped.set()

    # ------------------------------------------------------------------ public API

    async def join(self, seeds: Sequence[str], timeout_s: float | None = None) -> None:
        """Ask the core to join through ``seeds``; return after the first push-pull succeeds.

        The core retries with back-off by itself; this only bounds how long the caller waits.
        """
        self._push_pull_ok = trio.Event()
        self._start_join(seeds)
        with trio.move_on_after(timeout_s or self.limits.join_timeout_s):
            await self._push_pull_ok.wait()
            return
        raise JoinFailed(f"no push-pull with any of {list(seeds)} succeeded")

    async def leave(self) -> None:
        """Announce a graceful leave and keep gossiping briefly so it spreads."""
        self.core.leave(trio.current_time())
        self._wake.set()
        await trio.sleep(self.limits.leave_propagate_s)

    def set_meta(self, meta: bytes) -> None:
        """Change our metadata (raises ``MetaTooLarge`` beyond ``max_meta_bytes``)."""
        self.core.set_meta(trio.current_time(), meta)
        self._wake.set()

    def members(self) -> tuple[Member, ...]:
        return self.core.members()

    def member(self, name: str) -> Member | None:
        return self.core.member(name)

    @property
    def transport_in_use(self) -> Transport | None:
        """The running transport (None when stopped), e.g. to read a TLS wrapper's counters."""
        return self._transport

    def stats(self) -> dict[str, int]:
        """The core's counters plus the shell's (bytes, bad_auth, tcp_*, events_dropped)."""
        merged = dict(self.core.stats()) if self._core is not None else {}
        merged.update(self._counters)
        return merged

    async def events(self) -> AsyncIterator[Event | Resync]:
        """Membership events, in order; a ``Resync`` after any were dropped. Single consumer."""
        if self._events_taken:
            raise RuntimeError("events() has a single consumer and it is already taken")
        self._events_taken = True
        while True:
            if self._unreported_drops:
                try:
                    event = self._event_recv.receive_nowait()
                except trio.WouldBlock:
                    dropped, self._unreported_drops = self._unreported_drops, 0
                    yield Resync(dropped, self.members())
                    continue
                except trio.EndOfChannel:
                    return
                yield event
                continue
            try:
                event = await self._event_recv.receive()
            except trio.EndOfChannel:
                return
            yield event

    # keyring operations: applied at once (the next packet uses them) and persisted if asked.

    def install_key(self, key: bytes) -> None:
        self.keyring.install(key)
        self._persist_keyring()

    def use_key(self, key: bytes) -> None:
        self.keyring.use(key)
        self._persist_keyring()

    def remove_key(self, key: bytes) -> None:
        self.keyring.remove(key)
        self._persist_keyring()

    def _persist_keyring(self) -> None:
        if self._keyring_path is not None:
            save_keyring(self.keyring, self._keyring_path)

    # ------------------------------------------------------------------ internals

    def _start_join(self, seeds: Sequence[str]) -> None:
        self._joining_via = set(seeds)
        self.core.join(trio.current_time(), tuple(seeds))
        self._wake.set()

    def _require_transport(self) -> Transport:
        if self._transport is None:
            raise NotRunning("the gossip service is not running")
        return self._transport

    def _count(self, key: str, n: int = 1) -> None:
        self._counters[key] += n

    def _count_rejected(self) -> None:
        self._count("tcp_rejected")

    async def _driver_loop(self) -> None:
        core = self.core
        while True:
            # A fresh event *before* draining: a wake-up during the awaits below is kept.
            self._wake = trio.Event()
            core.tick(trio.current_time())
            await self._drain()
            deadline = core.next_deadline()
            if math.isfinite(deadline):
                # Wake a hair *after* the deadline: a timer re-armed on a grid computed in
                # floating point ("next multiple of the interval after now") can land exactly
                # on ``now`` when now equals the old deadline, and be due again forever.
                with trio.move_on_at(deadline + _TICK_SLACK_S):
                    await self._wake.wait()
            else:
                await self._wake.wait()

    async def _drain(self) -> None:
        core = self.core
        while core.has_ready():
            ready: Ready = core.ready()
            for event in ready.events:
                self._publish(event)
            for push_pull_addr in ready.push_pulls:
                self._spawn(self._push_pull, push_pull_addr)
            for ping in ready.tcp_pings:
                self._spawn(self._tcp_ping, ping.dst, ping.data)
            for packet in ready.packets:
                await self._send_udp(packet.dst, packet.data)

    def _publish(self, event: Event) -> None:
        try:
            self._event_send.send_nowait(event)
        except trio.WouldBlock:
            self._count("events_dropped")
            self._unreported_drops += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # shutting down, or the consumer went away: nobody to tell

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    async def _send_udp(self, dst: str, plaintext: bytes) -> None:
        sealed = self.keyring.seal(plaintext, PURPOSE_UDP)
        try:
            await self._require_transport().send_datagram(dst, sealed)
        except ValueError:
            self._count("bad_addr")
            return
        except OSError:
            # Unreachable peer, full buffers: UDP is lossy anyway; SWIM copes.
            self._count("udp_send_errors")
            return
        self._count("udp_out")
        self._count("udp_bytes_out", len(sealed))

    async def _udp_loop(self) -> None:
        transport = self._require_transport()
        limit = self.config.udp_mtu_bytes
        core = self.core
        while True:
            try:
                data, src = await transport.receive_datagram(limit + 1)
            except OSError:
                # e.g. ICMP errors surfaced on the socket; never a reason to stop listening.
                self._count("udp_send_errors")
                await trio.sleep(0)
                continue
            self._count("udp_in")
            self._count("udp_bytes_in", len(data))
            if len(data) > limit:
                self._count("udp_oversize")
                continue
            try:
                plaintext = self.keyring.open(data, PURPOSE_UDP)
            except AuthenticationFailed:
                self._count("bad_auth")
                continue
            core.receive_packet(trio.current_time(), src, plaintext)
            self._wake.set()

    # -------------------------------------------------------------- TCP, both sides

    async def _write_frame(self, stream: trio.abc.Stream, message: object) -> None:
        sealed = self.keyring.seal(codec.encode(message), PURPOSE_TCP)
        await stream.send_all(_LENGTH.pack(len(sealed)) + sealed)
        self._count("tcp_bytes_out", _LENGTH.size + len(sealed))

    async def _read_frame(self, stream: trio.abc.Stream, expected: object) -> object:
        (length,) = _LENGTH.unpack(await _receive_exactly(stream, _LENGTH.size))
        if length > self.limits.max_frame_bytes:
            raise _BadFrame(f"frame of {length} bytes exceeds the limit")
        sealed = await _receive_exactly(stream, length)
        self._count("tcp_bytes_in", _LENGTH.size + length)
        try:
            plaintext = self.keyring.open(sealed, PURPOSE_TCP)
        except AuthenticationFailed as exc:
            self._count("bad_auth")
            raise _BadFrame("unauthenticated frame") from exc
        try:
            return codec.decode(plaintext, expected)
        except CodecError as exc:
            raise _BadFrame(f"undecodable frame: {exc}") from exc

    async def _serve_stream(self, stream: trio.abc.Stream, peer: str) -> None:
        """One inbound exchange: a push-pull or a TCP ping, bounded in time and size."""
        self._count("tcp_accepted")
        with trio.move_on_after(self.limits.tcp_io_timeout_s) as scope:
            try:
                request = await self._read_frame(stream, StreamRequest)
                core = self.core
                now = trio.current_time()
                if isinstance(request, PushPullRequest):
                    # Reply with our state as it was before merging theirs (as memberlist).
                    local = core.local_state(now, request.join)
                    core.merge_remote_state(now, request.state, request.join)
                    self._wake.set()
                    await self._write_frame(stream, PushPullReply(local))
                elif isinstance(request, StreamPingRequest):
                    answer = core.receive_tcp_ping(now, peer, request.data)
                    self._wake.set()
                    await self._write_frame(stream, StreamPingReply(answer))
            except (_BadFrame, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
                self._count("tcp_bad_frames")
            except OSError:
                self._count("tcp_bad_frames")
        if scope.cancelled_caught:
            self._count("tcp_timeouts")

    async def _exchange(self, dst: str, request: object, expected: object) -> object | None:
        """Connect, send one frame, read one frame; None on any failure (counted by caller)."""
        async with self._outbound:
            with trio.move_on_after(self.limits.tcp_io_timeout_s):
                try:
                    stream = await self._require_transport().connect(dst)
                except (OSError, ValueError, TransportError):
                    return None
                try:
                    await self._write_frame(stream, request)
                    return await self._read_frame(stream, expected)
                except (_BadFrame, TransportError, trio.BrokenResourceError, OSError):
                    return None
                finally:
                    await trio.aclose_forcefully(stream)
            self._count("tcp_timeouts")
            return None

    async def _push_pull(self, dst: str) -> None:
        core = self.core
        # A push-pull to a seed while we join is a join exchange (the core retries those by
        # itself with back-off; a failure needs no report).
        join = dst in self._joining_via
        request = PushPullRequest(join, core.local_state(trio.current_time(), join))
        reply = await self._exchange(dst, request, PushPullReply)
        if not isinstance(reply, PushPullReply):
            self._count("push_pulls_failed")
            return
        core.merge_remote_state(trio.current_time(), reply.state, join)
        self._count("push_pulls_ok")
        self._joining_via.clear()
        self._push_pull_ok.set()
        self._wake.set()

    async def _tcp_ping(self, dst: str, data: bytes) -> None:
        reply = await self._exchange(dst, StreamPingRequest(data), StreamPingReply)
        if not isinstance(reply, StreamPingReply):
            self._count("tcp_pings_failed")
            return
        self._count("tcp_pings_ok")
        if reply.data is not None:
            self.core.receive_packet(trio.current_time(), dst, reply.data)
            self._wake.set()
