"""Raft's TlsTransport on real loopback sockets: who gets in, who is refused, what it costs.

Each attack runs against a fresh server, which must refuse it (``refused`` counts it, the
handler never sees the stream) and then still serve a good node.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from p2porch.common import pki, tls
from p2porch.consensus.transport import (
    FrameReader,
    TcpTransport,
    TlsTransport,
    TransportError,
    encode_frame,
)

from .kit import (
    GARBAGE,
    HOST,
    SHORT_HANDSHAKE_S,
    WAIT_S,
    Pki,
    nodes_except,
    raw_connect,
    read_until_closed,
    wait_for,
)

MAX_FRAME = 1 << 16


@pytest.fixture(scope="module")
def certs() -> Pki:
    return Pki()


@attrs.define
class Server:
    transport: TlsTransport
    address: str
    frames: list[bytes] = attrs.field(factory=list)

    async def echo(self, stream: trio.abc.Stream) -> None:
        reader = FrameReader(stream, MAX_FRAME)
        while (frame := await reader.receive()) is not None:
            self.frames.append(frame)
            await stream.send_all(encode_frame(b"echo:" + frame))


@asynccontextmanager
async def serving(
    certs: Pki,
    *,
    contexts: tls.TlsContexts | None = None,
    handshake_timeout_s: float = SHORT_HANDSHAKE_S,
) -> AsyncIterator[Server]:
    transport = TlsTransport(
        TcpTransport(),
        contexts or certs.contexts("node-a"),
        nodes_except("node-gone"),
        handshake_timeout_s=handshake_timeout_s,
    )
    async with trio.open_nursery() as nursery:
        server = Server(transport, "")
        server.address = await nursery.start(transport.serve, f"{HOST}:0", server.echo)
        yield server
        nursery.cancel_scope.cancel()


def node_client(certs: Pki, name: str = "node-b") -> TlsTransport:
    return TlsTransport(TcpTransport(), certs.contexts(name), nodes_except("node-gone"))


async def round_trip(client: TlsTransport, address: str, payload: bytes) -> bytes | None:
    stream = await client.connect(address)
    try:
        await stream.send_all(encode_frame(payload))
        with trio.fail_after(WAIT_S):
            return await FrameReader(stream, MAX_FRAME).receive()
    finally:
        await trio.aclose_forcefully(stream)


async def learns_nothing(stream: trio.abc.Stream) -> None:
    """An attacker whose own handshake finished (TLS 1.3: the client finishes before the
    server has judged its certificate) sends a frame: the server must hang up, unanswered."""
    try:
        await stream.send_all(encode_frame(b"let me in"))
        with trio.fail_after(WAIT_S):
            reply = await FrameReader(stream, MAX_FRAME).receive()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        reply = None
    finally:
        await trio.aclose_forcefully(stream)
    assert reply is None


# --------------------------------------------------------------------------- attacks


async def foreign_ca_client(certs: Pki, address: str) -> None:
    attacker = TlsTransport(
        TcpTransport(), certs.contexts("node-b", signed_by=certs.other_ca), tls.accept_any
    )
    try:
        stream = await attacker.connect(address)
    except TransportError:
        return
    await learns_nothing(stream)


async def client_without_certificate(certs: Pki, address: str) -> None:
    raw = await TcpTransport().connect(address)
    try:
        stream = await tls.client_handshake(raw, certs.no_cert_client(), address)
    except tls.TlsError:
        return
    await learns_nothing(stream)


async def viewer_on_the_raft_port(certs: Pki, address: str) -> None:
    attacker = TlsTransport(
        TcpTransport(), certs.contexts("alice", pki.ROLE_VIEWER), tls.accept_any
    )
    await learns_nothing(await attacker.connect(address))


async def removed_node(certs: Pki, address: str) -> None:
    attacker = TlsTransport(TcpTransport(), certs.contexts("node-gone"), tls.accept_any)
    await learns_nothing(await attacker.connect(address))


async def silent_client(certs: Pki, address: str) -> None:
    stream = await raw_connect(address)
    # Says nothing: the server's handshake deadline must end it (the server hangs up).
    assert await read_until_closed(stream) == b""
    await stream.aclose()


async def garbage_http(certs: Pki, address: str) -> None:
    stream = await raw_connect(address)
    await stream.send_all(GARBAGE["http"])
    reply = await read_until_closed(stream)
    assert b"echo" not in reply
    await stream.aclose()


async def garbage_record(certs: Pki, address: str) -> None:
    stream = await raw_connect(address)
    await stream.send_all(GARBAGE["fake-record"])
    reply = await read_until_closed(stream)
    assert b"echo" not in reply
    await stream.aclose()


async def tls12_only_client(certs: Pki, address: str) -> None:
    raw = await TcpTransport().connect(address)
    with pytest.raises(tls.TlsError, match="TLS with .* failed"):
        await tls.client_handshake(raw, certs.tls12_client("node-b"), address)


Attack = Callable[[Pki, str], Awaitable[None]]
ATTACKS: dict[str, Attack] = {
    "foreign-ca-client": foreign_ca_client,
    "no-client-certificate": client_without_certificate,
    "viewer-on-raft-port": viewer_on_the_raft_port,
    "removed-node": removed_node,
    "silent-client": silent_client,
    "garbage-http": garbage_http,
    "garbage-fake-record": garbage_record,
    "tls12-only-client": tls12_only_client,
}


def refused_reaches(transport: TlsTransport, count: int) -> bool:
    return transport.refused >= count


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_is_refused_counted_and_the_server_keeps_serving(
    certs: Pki, attack: str
) -> None:
    async with serving(certs) as server:
        good = node_client(certs)
        assert await round_trip(good, server.address, b"before") == b"echo:before"
        await ATTACKS[attack](certs, server.address)
        await wait_for(lambda: server.transport.refused == 1, "the refusal is counted")
        assert await round_trip(good, server.address, b"after") == b"echo:after"
        assert server.frames == [b"before", b"after"]  # the attacker's frame never got in
        assert server.transport.refused == 1


async def test_every_attack_in_a_row_against_one_server(certs: Pki) -> None:
    async with serving(certs) as server:
        good = node_client(certs)
        for n, attack in enumerate(ATTACKS.values(), start=1):
            await attack(certs, server.address)
            await wait_for(functools.partial(refused_reaches, server.transport, n), f"#{n}")
            assert server.transport.refused == n
            assert await round_trip(good, server.address, b"%d" % n) == b"echo:%d" % n
        assert server.frames == [b"%d" % n for n in range(1, len(ATTACKS) + 1)]


async def test_a_silent_client_does_not_hold_up_others(certs: Pki) -> None:
    async with serving(certs, handshake_timeout_s=WAIT_S * 4) as server:
        silent = await raw_connect(server.address)
        good = node_client(certs)
        # The silent connection is still within its (long) deadline while others get served.
        for i in range(3):
            assert await round_trip(good, server.address, b"%d" % i) == b"echo:%d" % i
        assert server.transport.refused == 0
        await silent.aclose()
        await wait_for(lambda: server.transport.refused == 1, "its handshake failed")


async def test_round_trip_many_frames_both_ways(certs: Pki) -> None:
    async with serving(certs) as server:
        stream = await node_client(certs).connect(server.address)
        payloads = [bytes([i]) * (i * 997) for i in range(40)]  # up to ~39 KB, many records
        reader = FrameReader(stream, MAX_FRAME)
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                # Send while reading: the echoes would otherwise fill both socket buffers.
                nursery.start_soon(stream.send_all, b"".join(encode_frame(p) for p in payloads))
                replies = [await reader.receive() for _ in payloads]
        assert replies == [b"echo:" + p for p in payloads]
        assert server.frames == payloads
        await stream.aclose()


# --------------------------------------------------------------------------- client side


async def test_client_refuses_a_server_from_another_ca(certs: Pki) -> None:
    impostor = certs.contexts("node-a", signed_by=certs.other_ca)
    async with serving(certs, contexts=impostor) as server:
        with pytest.raises(TransportError, match="certificate verify failed"):
            await node_client(certs).connect(server.address)


async def test_client_refuses_a_server_its_authorizer_rejects(certs: Pki) -> None:
    async with serving(certs, contexts=certs.contexts("node-gone")) as server:
        with pytest.raises(TransportError, match="refused: node-gone was removed"):
            await node_client(certs).connect(server.address)


async def test_client_refuses_a_server_whose_certificate_names_another_address(
    certs: Pki,
) -> None:
    elsewhere = certs.contexts("node-a", addresses=("127.0.0.9",))
    async with serving(certs, contexts=elsewhere) as server:
        with pytest.raises(TransportError, match="IP address mismatch"):
            await node_client(certs).connect(server.address)


async def test_client_handshake_deadline(certs: Pki) -> None:
    """A server that accepts TCP and never answers the ClientHello cannot hold a client."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    client = TlsTransport(
        TcpTransport(), certs.contexts("node-b"), tls.accept_any, handshake_timeout_s=0.2
    )
    try:
        with pytest.raises(TransportError, match=r"no handshake within 0.2s"):
            await client.connect(f"{HOST}:{port}")
    finally:
        for listener in listeners:
            await listener.aclose()
