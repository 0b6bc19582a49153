"""TlsStream, Raft's lean TLS stream: plain TLS on the wire, trio's stream contract in code.

It replaced trio.SSLStream on the Raft transport for speed, so these tests pin what must not
change with it: it interoperates with trio.SSLStream in both directions, a close_notify is a
clean end of stream and a cut connection a broken one, one task per direction, large writes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from p2porch.common import tls
from p2porch.consensus.transport import (
    FrameReader,
    TcpTransport,
    TlsStream,
    TlsTransport,
    encode_frame,
)

from .kit import HOST, WAIT_S, Pki, nodes_except

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


@pytest.fixture(scope="module")
def certs() -> Pki:
    return Pki()


def transport(certs: Pki, name: str) -> TlsTransport:
    return TlsTransport(TcpTransport(), certs.contexts(name), nodes_except())


@asynccontextmanager
async def serving(certs: Pki, handler: Handler) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport(certs, "node-a").serve, f"{HOST}:0", handler)
        yield address
        nursery.cancel_scope.cancel()


async def echo(stream: trio.abc.Stream) -> None:
    reader = FrameReader(stream, 4 << 20)
    while (frame := await reader.receive()) is not None:
        await stream.send_all(encode_frame(frame))


async def exchange(stream: trio.abc.Stream, payloads: list[bytes]) -> list[bytes | None]:
    reader = FrameReader(stream, 4 << 20)
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"".join(encode_frame(p) for p in payloads))
            return [await reader.receive() for _ in payloads]


PAYLOADS = [b"", b"x", b"y" * 20_000, bytes(range(256)) * 4096]  # up to 1 MiB: many records


async def test_lean_client_talks_to_a_trio_sslstream_server(certs: Pki) -> None:
    server_contexts = certs.contexts("node-a")
    seen: list[str] = []

    async def trio_server(stream: trio.SocketStream) -> None:
        secured, peer = await tls.server_handshake(stream, server_contexts.server)
        assert peer is not None
        seen.append(peer.name)
        await echo(secured)

    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, trio_server, listeners)
        stream = await transport(certs, "node-b").connect(f"{HOST}:{port}")
        assert isinstance(stream, TlsStream)
        assert stream.version() == "TLSv1.3"
        assert await exchange(stream, PAYLOADS) == PAYLOADS
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen == ["node-b"]


async def test_trio_sslstream_client_talks_to_the_lean_server(certs: Pki) -> None:
    async with serving(certs, echo) as address:
        raw = await TcpTransport().connect(address)
        stream = await tls.client_handshake(raw, certs.contexts("node-b").client, address)
        assert await exchange(stream, PAYLOADS) == PAYLOADS
        await stream.aclose()


async def test_close_notify_is_a_clean_end_and_a_cut_is_a_broken_stream(certs: Pki) -> None:
    outcomes: list[str] = []
    done = trio.Semaphore(0)

    async def watch(stream: trio.abc.Stream) -> None:
        try:
            with trio.fail_after(WAIT_S):
                frame = await FrameReader(stream, 1000).receive()
                assert frame == b"bye"
                rest = await stream.receive_some(100)
                outcomes.append("eof" if rest == b"" else f"data {rest!r}")
                assert await stream.receive_some(100) == b""  # and stays at the end
        except trio.BrokenResourceError:
            outcomes.append("broken")
        finally:
            done.release()

    async with serving(certs, watch) as address:
        client = transport(certs, "node-b")
        polite = await client.connect(address)
        await polite.send_all(encode_frame(b"bye"))
        await polite.aclose()  # sends close_notify
        await done.acquire()
        rude = await client.connect(address)
        assert isinstance(rude, TlsStream)
        await rude.send_all(encode_frame(b"bye"))
        await rude.transport_stream.aclose()  # the TCP connection ends without close_notify
        await done.acquire()
    assert outcomes == ["eof", "broken"]


async def test_one_task_per_direction_and_no_use_after_close(certs: Pki) -> None:
    release = trio.Event()

    async def hold(stream: trio.abc.Stream) -> None:
        await release.wait()

    async with serving(certs, hold) as address:
        stream = await transport(certs, "node-b").connect(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.receive_some, 10)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await stream.receive_some(10)
            # Sending while another task receives is allowed (Raft's links do both).
            await stream.send_all(b"concurrent with a receive")
            nursery.cancel_scope.cancel()
        # A cancelled receive consumed nothing: the stream is still usable.
        await stream.send_all(b"still usable")
        with pytest.raises(ValueError, match="max_bytes"):
            await stream.receive_some(0)
        await stream.aclose()
        await stream.aclose()  # closing twice is fine
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"after close")
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some(10)
        release.set()


async def test_receive_some_respects_max_bytes(certs: Pki) -> None:
    async def blurt(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"0123456789" * 10)
        await trio.sleep_forever()

    async with serving(certs, blurt) as address:
        stream = await transport(certs, "node-b").connect(address)
        got = b""
        with trio.fail_after(WAIT_S):
            while len(got) < 100:
                chunk = await stream.receive_some(7)
                assert 1 <= len(chunk) <= 7
                got += chunk
        assert got == b"0123456789" * 10
        await stream.aclose()
