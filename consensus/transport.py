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

import contextlib
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio
from cryptography import x509

from p2porch.common.pki import PeerIdentity, PkiError, identity_of
from p2porch.common.tls import HANDSHAKE_TIMEOUT_S, Authorizer, TlsContexts, TlsError
from p2porch.consensus.errors import ConsensusError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FrameError",
    "FrameReader",
    "MemoryNetwork",
    "StreamHandler",
    "TcpTransport",
    "TlsStream",
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


# How much ciphertext one read takes from the socket: a few full TLS records (16 KiB each).
_TLS_READ_BYTES = 64 << 10


class TlsStream(trio.abc.Stream):
    """TLS over a byte stream through ``ssl`` memory BIOs: the streams :class:`TlsTransport`
    hands out.

    Why not ``trio.SSLStream``: every Raft message crosses this layer, and SSLStream's general
    machinery (a retry loop per call, a lock that yields to the scheduler on every send, a
    failed read before every successful one) added ~70 us of CPU per message round trip over
    plain TCP on the build machine (4 TLS calls, 400-byte frames), against ~25 us here -- most
    of what TLS added to Raft's commit latency (issue 5's target; figures in
    benchmarks/README.md). It can be this small because it offers only what a framed protocol
    needs: one sending task and one receiving task at a time (the two may run concurrently),
    TLS 1.3 (no renegotiation), close_notify on close. On the wire it is plain TLS: it
    interoperates with ``trio.SSLStream`` and any other TLS peer.

    Errors follow trio's conventions: an ``ssl`` failure or a broken transport raises
    :class:`trio.BrokenResourceError` (the ``ssl`` error as its cause); the peer's close_notify
    is an end of stream (``b""``); the transport closing without one is a broken stream.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        # Both send_all and receive_some (a post-handshake reply) may flush the TLS engine's
        # output; the lock keeps those bytes in order.
        self._flush_lock = trio.StrictFIFOLock()
        self._sending = False
        self._receiving = False
        self._handshook = False
        self._broken = False
        # The verified peer's name once a server-side handshake accepted it: the Raft shell
        # refuses a message whose claimed sender is someone else.
        self.peer_name: str | None = None
        self._peer_closed = False
        self._closed = False

    async def do_handshake(self) -> None:
        """Run the TLS handshake to completion (call once, before sending or receiving)."""
        self._check_usable()
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise trio.BrokenResourceError from exc
                await self._flush()
                if done:
                    self._handshook = True
                    return
                await self._fill()
        except BaseException:
            self._broken = True
            raise

    def peer_certificate_der(self) -> bytes | None:
        """The peer's certificate (DER) as verified in the handshake; None if it sent none."""
        return self._ssl.getpeercert(binary_form=True)

    def version(self) -> str | None:
        return self._ssl.version()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._check_usable()
        self._sending = True
        try:
            if data:
                try:
                    self._ssl.write(data)
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise trio.BrokenResourceError from exc
            if self._outgoing.pending:
                await self._flush()
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            # Records may be half sent (or cancelled mid-way): nothing may follow them.
            self._broken = True
            raise
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._check_usable()
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while not self._peer_closed:
                # Only ask the engine when it can have something: a read that fails costs an
                # exception, and the common case is "nothing buffered, wait for the socket".
                if self._incoming.pending or self._ssl.pending() or self._incoming.eof:
                    data = self._read(max_bytes or _TLS_READ_BYTES)
                    if data:
                        if self._outgoing.pending:  # e.g. the answer to a KeyUpdate
                            await self._flush()
                        return data
                    if data is not None:  # b"": the peer's close_notify
                        break
                await self._fill()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return b""
        except trio.Cancelled:
            raise  # cancelled while waiting for the socket: nothing half-done, still usable
        except BaseException:
            self._broken = True
            raise
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the peer's) and close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._handshook and not self._broken:
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()  # queues close_notify; wants the peer's, which we skip
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError
                ):
                    data = self._outgoing.read()
                    if data:
                        await self.transport_stream.send_all(data)
        finally:
            await self.transport_stream.aclose()

    def _read(self, max_bytes: int) -> bytes | None:
        """Decrypted bytes; None if the engine needs more input; b"" at the peer's
        close_notify (which ``ssl`` reports either way, as b"" or SSLZeroReturnError)."""
        try:
            data = self._ssl.read(max_bytes)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            data = b""
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise trio.BrokenResourceError from exc
        if not data:
            self._peer_closed = True
        return data

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._broken:
            raise trio.BrokenResourceError("this TLS stream broke earlier")

    async def _fill(self) -> None:
        data = await self.transport_stream.receive_some(_TLS_READ_BYTES)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush(self) -> None:
        if not self._outgoing.pending:
            return
        if self._flush_lock.locked():
            async with self._flush_lock:
                await self._send_outgoing()
            return
        # Uncontended (always, for Raft's one-way links): take the lock without the scheduler
        # round trip ``async with`` costs.
        self._flush_lock.acquire_nowait()
        try:
            await self._send_outgoing()
        finally:
            self._flush_lock.release()

    async def _send_outgoing(self) -> None:
        data = self._outgoing.read()  # read under the lock: bytes leave in the engine's order
        if data:
            try:
                await self.transport_stream.send_all(data)
            except BaseException:
                self._broken = True  # records may be half sent: nothing may follow them
                raise


def _describe(exc: BaseException) -> str:
    """trio-style errors hide the ``ssl`` reason in their cause: show that."""
    shown = exc.__cause__ if exc.__cause__ is not None else exc
    return str(shown) or repr(shown)


class AuthenticatedStream(trio.abc.Stream):
    """A TLS stream that carries the verified peer's name (``peer_name``), so the Raft shell
    can refuse a message whose claimed sender is not the certificate's holder."""

    def __init__(self, inner: trio.abc.Stream, peer_name: str) -> None:
        self.inner = inner
        self.peer_name = peer_name

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class TlsTransport:
    """Mutual TLS 1.3 over another transport (normally :class:`TcpTransport`).

    Both ends present a certificate from the cluster CA; ``authorize`` then judges the peer's
    identity (the node layer: "a node of this cluster that was not removed"). A refused or
    failed handshake on the serving side is counted in ``refused`` and the stream dropped.
    ``handshake_timeout_s`` bounds how long a peer that says nothing can hold a task. The
    contexts are read at every handshake, so a renewed certificate applies to new links.

    Streams are :class:`TlsStream` (same checks and messages as
    :func:`p2porch.common.tls.client_handshake` / ``server_handshake``, less CPU per message).
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
        host = parse_address(address)[0].strip("[]")
        tls = TlsStream(stream, self.contexts.client, server_side=False, server_hostname=host)
        try:
            await self._secure(tls, f"TLS with {address}", address)
        except TlsError as exc:
            raise TransportError(str(exc)) from exc
        return tls

    async def serve(
        self,
        address: str,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def secured(stream: trio.abc.Stream) -> None:
            tls = TlsStream(stream, self.contexts.server, server_side=True)
            try:
                peer = await self._secure(tls, "TLS handshake", None)
            except TlsError:
                self.refused += 1
                return
            tls.peer_name = peer.name
            await handler(tls)

        await self.inner.serve(address, secured, task_status=task_status)

    async def _secure(self, tls: TlsStream, what: str, address: str | None) -> PeerIdentity:
        """Handshake and judge the peer; on any failure close the stream (TlsError says why)."""
        try:
            return await self._handshake_and_judge(tls, what, address)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise

    async def _handshake_and_judge(
        self, tls: TlsStream, what: str, address: str | None
    ) -> PeerIdentity:
        try:
            with trio.fail_after(self.handshake_timeout_s):
                await tls.do_handshake()
        except trio.TooSlowError as exc:
            raise TlsError(
                f"{what} failed: no handshake within {self.handshake_timeout_s}s"
            ) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TlsError(f"{what} failed: {_describe(exc)}") from exc
        der = tls.peer_certificate_der()
        if der is None:  # the server context requires one: ssl refuses first
            raise TlsError(f"{what} refused: the peer sent no certificate")
        try:
            peer = identity_of(x509.load_der_x509_certificate(der))
        except (ValueError, PkiError) as exc:
            raise TlsError(f"{what}: peer certificate unreadable: {exc}") from exc
        reason = self.authorize(peer)
        if reason is not None:
            who = address if address is not None else f"peer {peer.name}"
            raise TlsError(f"{who} refused: {reason}")
        return peer


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
