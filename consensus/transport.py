"""How Raft nodes reach each other: an injected stream factory plus length-prefixed framing.

Why injected. The Raft shell only needs "give me a byte stream to that address" and "call me
with every inbound stream"; *how* (plain TCP, mutual TLS, an in-memory pipe in tests) is not
its business. The security layer wraps :class:`TcpTransport` in TLS without touching the core
or the shell; shell tests use :class:`MemoryNetwork`, which can also cut links.

Framing. Every frame is ``u32 big-endian length | payload``; payloads are codec records. The
reader never trusts a peer: it refuses frames over ``max_frame_bytes`` *before* buffering them,
reads in bounded chunks, and turns a stream that ends mid-frame into :class:`FrameError`. The
caller drops the connection and counts it; nothing a peer sends can crash the node.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2porch.common.tls import (
    HANDSHAKE_TIMEOUT_S,
    Authorizer,
    TlsContexts,
    TlsError,
    client_handshake,
    server_handshake,
)
from p2porch.consensus.errors import ConsensusError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FrameError",
    "FrameReader",
    "MemoryNetwork",
    "StreamHandler",
    "TcpTransport",
    "TlsTransport",
    "Transport",
    "TransportError",
    "encode_frame",
    "parse_address",
]

DEFAULT_MAX_FRAME_BYTES = 16 << 20
_LENGTH = struct.Struct(">I")
_READ_CHUNK_BYTES = 256 << 10

StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]


class TransportError(ConsensusError):
    """A peer could not be reached or a stream broke."""


class FrameError(TransportError):
    """A peer sent bytes that are not a valid frame (too large, cut short)."""


def parse_address(address: str) -> tuple[str, int]:
    """``"127.0.0.2:7000"`` -> ("127.0.0.2", 7000); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"address must be host:port, got {address!r}")
    return host, int(port)


def encode_frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Reads frames from one stream with bounded memory."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_frame_bytes: int) -> None:
        self._stream = stream
        self._max = max_frame_bytes
        self._buffer = bytearray()

    async def receive(self) -> bytes | None:
        """The next frame's payload; None at a clean end of stream (between frames)."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buffer)
                if length > self._max:
                    raise FrameError(f"frame of {length} bytes over the {self._max} limit")
                end = _LENGTH.size + length
                if len(self._buffer) >= end:
                    payload = bytes(self._buffer[_LENGTH.size : end])
                    del self._buffer[:end]
                    return payload
                want = min(_READ_CHUNK_BYTES, end - len(self._buffer))
            else:
                want = _READ_CHUNK_BYTES
            chunk = await self._stream.receive_some(max(want, 4096))
            if not chunk:
                if self._buffer:
                    raise FrameError(f"stream ended inside a frame ({len(self._buffer)} bytes)")
                return None
            self._buffer += chunk


class Transport(Protocol):
    """The injected connection factory (plain TCP here; mutual TLS in the security layer)."""

    async def connect(self, address: str) -> trio.abc.Stream:
        """A new stream to ``address``; raises :class:`TransportError` if unreachable."""
        ...

    async def serve(
        self,
        address: str,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept streams on ``address`` forever, calling ``handler`` for each in its own task.

        Reports the bound address (useful with port 0) through ``task_status.started``.
        ``handler`` must not raise; streams are closed after it returns.
        """
        ...


async def _guarded(handler: StreamHandler, stream: trio.abc.Stream) -> None:
    """Run a handler so that a broken peer stream never takes the server down."""
    try:
        async with stream:
            await handler(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, TransportError):
        pass


class TcpTransport:
    """Plain TCP over (loopback) addresses ``host:port``."""

    def __init__(self, connect_timeout_s: float = 2.0, local_address: str | None = None) -> None:
        self.connect_timeout_s = connect_timeout_s
        # Originate connections from the node's own address: on a multi-homed host (and on
        # 127.0.0.N in tests) the kernel would otherwise pick another source, and peers --
        # and firewall rules -- would see traffic from an address the node does not own.
        self.local_address = local_address

    async def connect(self, address: str) -> trio.abc.Stream:
        host, port = parse_address(address)
        try:
            with trio.fail_after(self.connect_timeout_s):
                return await trio.open_tcp_stream(host, port, local_address=self.local_address)
        except (OSError, trio.TooSlowError) as exc:
            raise TransportError(f"cannot connect to {address}: {exc}") from exc

    async def serve(
        self,
        address: str,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = parse_address(address)
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise TransportError(f"cannot listen on {address}: {exc}") from exc
        bound = listeners[0].socket.getsockname()
        task_status.started(f"{bound[0]}:{bound[1]}")

        async def guarded(stream: trio.abc.Stream) -> None:
            await _guarded(handler, stream)

        await trio.serve_listeners(guarded, listeners)


class TlsTransport:
    """Mutual TLS 1.3 over another transport (normally :class:`TcpTransport`).

    Both ends present a certificate from the cluster CA; ``authorize`` then judges the peer's
    identity (the node layer: "a node of this cluster that was not removed"). A refused or
    failed handshake on the serving side is counted in ``refused`` and the stream dropped.
    ``handshake_timeout_s`` bounds how long a peer that says nothing can hold a task.
    """

    def __init__(
        self,
        inner: Transport,
        contexts: TlsContexts,
        authorize: Authorizer,
        *,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self.inner = inner
        self.contexts = contexts
        self.authorize = authorize
        self.handshake_timeout_s = handshake_timeout_s
        self.refused = 0

    async def connect(self, address: str) -> trio.abc.Stream:
        stream = await self.inner.connect(address)
        try:
            return await client_handshake(
                stream, self.contexts.client, address, self.authorize, self.handshake_timeout_s
            )
        except TlsError as exc:
            raise TransportError(str(exc)) from exc

    async def serve(
        self,
        address: str,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def secured(stream: trio.abc.Stream) -> None:
            try:
                tls, _peer = await server_handshake(
                    stream, self.contexts.server, self.authorize, self.handshake_timeout_s
                )
            except TlsError:
                self.refused += 1
                return
            await handler(tls)

        await self.inner.serve(address, secured, task_status=task_status)


class MemoryNetwork:
    """An in-process network of :class:`trio.testing` memory streams for shell tests.

    ``transport(name)`` gives one node's view; ``isolate(address)`` cuts every stream to and
    from an address and refuses new ones until ``heal(address)``.
    """

    def __init__(self) -> None:
        self._servers: dict[str, tuple[StreamHandler, trio.Nursery]] = {}
        self._isolated: set[str] = set()
        self._streams: dict[str, list[trio.abc.Stream]] = {}

    def transport(self, local_address: str) -> MemoryTransport:
        return MemoryTransport(self, local_address)

    def isolate(self, address: str) -> None:
        self._isolated.add(address)
        for stream in self._streams.pop(address, []):
            _close_now(stream)

    def heal(self, address: str) -> None:
        self._isolated.discard(address)

    def _track(self, address: str, stream: trio.abc.Stream) -> None:
        self._streams.setdefault(address, []).append(stream)


def _close_now(stream: trio.abc.Stream) -> None:
    """Close a memory stream without awaiting (it never blocks)."""
    # Imported lazily: trio.testing pulls in pytest, far too slow for a daemon's start.
    from trio.testing import MemoryReceiveStream, MemorySendStream

    if isinstance(stream, trio.StapledStream):
        send, receive = stream.send_stream, stream.receive_stream
        if isinstance(send, MemorySendStream):
            send.close()
        if isinstance(receive, MemoryReceiveStream):
            receive.close()


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, local_address: str) -> None:
        self._network = network
        self.local_address = local_address

    async def connect(self, address: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        net = self._network
        if address in net._isolated or self.local_address in net._isolated:
            raise TransportError(f"{address} unreachable (isolated)")
        server = net._servers.get(address)
        if server is None:
            raise TransportError(f"connection refused: nothing serves {address}")
        handler, nursery = server
        from trio.testing import memory_stream_pair

        client, remote = memory_stream_pair()
        for stream in (client, remote):
            net._track(address, stream)
            net._track(self.local_address, stream)
        try:
            nursery.start_soon(_guarded, handler, remote)
        except RuntimeError as exc:
            # The server is shutting down (its nursery no longer takes tasks): to a client
            # that is a refused connection, as it would be over TCP.
            _close_now(client)
            _close_now(remote)
            raise TransportError(f"connection refused: {address} is shutting down") from exc
        return client

    async def serve(
        self,
        address: str,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        net = self._network
        if address in net._servers:
            raise TransportError(f"address {address} already in use")
        try:
            async with trio.open_nursery() as nursery:
                net._servers[address] = (handler, nursery)
                task_status.started(address)
                await trio.sleep_forever()
        finally:
            net._servers.pop(address, None)
            for stream in net._streams.pop(address, []):
                _close_now(stream)
