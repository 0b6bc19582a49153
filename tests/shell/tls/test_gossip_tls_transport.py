"""Gossip's TlsGossipTransport on real loopback sockets: datagrams pass, streams need mTLS.

A peer holding the gossip key but no certificate from the cluster CA (a removed node, a leaked
key) must not get a push-pull stream; every refusal is counted and the server keeps serving.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from p2porch.common import pki, tls
from p2porch.gossip.config import GossipConfig
from p2porch.gossip.errors import JoinFailed, TransportError
from p2porch.gossip.keyring import Keyring
from p2porch.gossip.messages import MemberState
from p2porch.gossip.service import GossipService, UdpTcpTransport
from p2porch.gossip.tls_transport import TlsGossipTransport

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

GOSSIP_KEY = bytes(range(32))


@pytest.fixture(scope="module")
def certs() -> Pki:
    return Pki()


@attrs.define
class Server:
    transport: TlsGossipTransport
    rejected: int = 0
    seen: list[tuple[bytes, str]] = attrs.field(factory=list)

    def on_reject(self) -> None:
        self.rejected += 1

    async def echo(self, stream: trio.abc.Stream, peer: str) -> None:
        """One request, one answer (the shape of a push-pull)."""
        data = bytes(await stream.receive_some(65536))
        self.seen.append((data, peer))
        await stream.send_all(b"echo:" + data)


async def bind(certs: Pki, name: str, **kw: float) -> TlsGossipTransport:
    return TlsGossipTransport(
        await UdpTcpTransport.bind(HOST, 0),
        certs.contexts(name),
        nodes_except("node-gone"),
        **kw,
    )


@asynccontextmanager
async def serving(certs: Pki) -> AsyncIterator[Server]:
    server = Server(await bind(certs, "node-a", handshake_timeout_s=SHORT_HANDSHAKE_S))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.transport.serve, server.echo, 16, server.on_reject)
            yield server
            nursery.cancel_scope.cancel()
    finally:
        await server.transport.aclose()


async def exchange(client: TlsGossipTransport, address: str, payload: bytes) -> bytes:
    stream = await client.connect(address)
    try:
        await stream.send_all(payload)
        return await read_until_closed(stream)
    finally:
        await trio.aclose_forcefully(stream)


# --------------------------------------------------------------------------- transport


async def test_datagrams_pass_through_untouched(certs: Pki) -> None:
    a = await bind(certs, "node-a")
    b = await bind(certs, "node-b")
    try:
        await b.send_datagram(a.local_addr, b"sealed-by-the-keyring-not-by-tls")
        with trio.fail_after(WAIT_S):
            data, source = await a.receive_datagram(1500)
        assert data == b"sealed-by-the-keyring-not-by-tls"
        assert source == b.local_addr
    finally:
        await a.aclose()
        await b.aclose()


async def test_stream_round_trip_names_the_peer_address(certs: Pki) -> None:
    async with serving(certs) as server:
        client = await bind(certs, "node-b")
        try:
            assert await exchange(client, server.transport.local_addr, b"hi") == b"echo:hi"
        finally:
            await client.aclose()
        assert [data for data, _ in server.seen] == [b"hi"]
        assert server.seen[0][1].startswith(f"{HOST}:")
        assert server.rejected == server.transport.refused == 0


async def handshake_then_talk(context: ssl.SSLContext, address: str) -> None:
    """An attacker with ``context``: the server must hang up before answering anything."""
    raw = await raw_connect(address)
    try:
        stream = await tls.client_handshake(raw, context, address)
    except tls.TlsError:
        return  # refused during the handshake (TLS 1.2, or no common ground)
    try:
        await stream.send_all(b"push-pull please")
        reply = await read_until_closed(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        reply = b""
    finally:
        await trio.aclose_forcefully(stream)
    assert reply == b""


def foreign(certs: Pki) -> ssl.SSLContext:
    return certs.contexts("node-b", signed_by=certs.other_ca).client


async def raw_bytes(address: str, data: bytes) -> None:
    stream = await raw_connect(address)
    if data:
        await stream.send_all(data)
    assert b"echo" not in await read_until_closed(stream)
    await stream.aclose()


ATTACKS: dict[str, Callable[[Pki, str], Awaitable[None]]] = {
    "foreign-ca-client": lambda c, a: handshake_then_talk(foreign(c), a),
    "no-client-certificate": lambda c, a: handshake_then_talk(c.no_cert_client(), a),
    "viewer-certificate": lambda c, a: handshake_then_talk(
        c.contexts("alice", pki.ROLE_VIEWER).client, a
    ),
    "removed-node": lambda c, a: handshake_then_talk(c.contexts("node-gone").client, a),
    "tls12-only-client": lambda c, a: handshake_then_talk(c.tls12_client("node-b"), a),
    "silent-client": lambda c, a: raw_bytes(a, b""),
    "garbage-http": lambda c, a: raw_bytes(a, GARBAGE["http"]),
    "garbage-fake-record": lambda c, a: raw_bytes(a, GARBAGE["fake-record"]),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_is_refused_counted_and_the_server_keeps_serving(
    certs: Pki, attack: str
) -> None:
    async with serving(certs) as server:
        address = server.transport.local_addr
        await ATTACKS[attack](certs, address)
        await wait_for(lambda: server.transport.refused == 1, "the refusal is counted")
        assert server.rejected == 1  # reported to the service too (its tcp_rejected)
        client = await bind(certs, "node-b")
        try:
            assert await exchange(client, address, b"still here") == b"echo:still here"
        finally:
            await client.aclose()
        assert [data for data, _ in server.seen] == [b"still here"]


async def test_client_refuses_a_gossip_server_from_another_ca(certs: Pki) -> None:
    impostor = TlsGossipTransport(
        await UdpTcpTransport.bind(HOST, 0),
        certs.contexts("node-a", signed_by=certs.other_ca),
        tls.accept_any,
    )
    client = await bind(certs, "node-b")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(impostor.serve, Server(impostor).echo, 16, lambda: None)
            with pytest.raises(TransportError, match="certificate verify failed"):
                await client.connect(impostor.local_addr)
            nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
        await impostor.aclose()


# --------------------------------------------------------------------------- services


def service(certs: Pki, name: str, contexts: tls.TlsContexts | None = None) -> GossipService:
    return GossipService(
        GossipConfig.local(),
        name,
        (HOST, 0),
        Keyring(GOSSIP_KEY),
        transport_factory=TlsGossipTransport.factory(
            contexts or certs.contexts(name), nodes_except("node-gone")
        ),
    )


def alive(s: GossipService) -> set[str]:
    return {m.name for m in s.members() if m.state is MemberState.ALIVE}


async def test_services_join_over_tls_and_a_foreign_certificate_cannot(certs: Pki) -> None:
    """Real time, real sockets; the waits are upper bounds, assertions are on outcomes."""
    async with trio.open_nursery() as nursery:
        a = service(certs, "node-a")
        await nursery.start(a.run)
        b = service(certs, "node-b")
        await nursery.start(b.run)
        await b.join([a.addr], timeout_s=WAIT_S)
        await wait_for(lambda: alive(a) == alive(b) == {"node-a", "node-b"}, "both alive")
        assert a.stats()["tcp_accepted"] >= 1
        assert a.stats()["tcp_rejected"] == 0

        # Same gossip key, same names, but a certificate from another CA: no push-pull.
        intruder = service(certs, "node-c", certs.contexts("node-c", signed_by=certs.other_ca))
        await nursery.start(intruder.run)
        with pytest.raises(JoinFailed):
            await intruder.join([a.addr], timeout_s=2.0)
        assert a.stats()["tcp_rejected"] >= 1
        assert intruder.stats()["push_pulls_ok"] == 0
        assert "node-c" not in alive(a)
        nursery.cancel_scope.cancel()
