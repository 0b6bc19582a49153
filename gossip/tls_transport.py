"""Gossip's stream half (push-pull, fallback probes) over mutual TLS 1.3.

UDP datagrams stay as they are -- sealed with the keyring's AES-GCM, which is what makes them
safe -- while every TCP stream is additionally wrapped in mutual TLS, so a peer that holds the
gossip key but no certificate from the cluster CA (a removed node, a leaked key) cannot open a
push-pull stream and learn the cluster's state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from p2porch.common.tls import (
    HANDSHAKE_TIMEOUT_S,
    Authorizer,
    TlsContexts,
    TlsError,
    client_handshake,
    server_handshake,
)
from p2porch.gossip.errors import TransportError
from p2porch.gossip.service import StreamHandler, Transport, UdpTcpTransport


class TlsGossipTransport:
    """Wraps a :class:`Transport`: datagrams pass through, streams get mutual TLS."""

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

    @classmethod
    def factory(
        cls, contexts: TlsContexts, authorize: Authorizer
    ) -> Callable[[str, int], Awaitable[Transport]]:
        """A ``transport_factory`` for :class:`~p2porch.gossip.service.GossipService`."""

        async def bind(host: str, port: int) -> Transport:
            return cls(await UdpTcpTransport.bind(host, port), contexts, authorize)

        return bind

    @property
    def local_addr(self) -> str:
        return self.inner.local_addr

    async def send_datagram(self, dst: str, data: bytes) -> None:
        await self.inner.send_datagram(dst, data)

    async def receive_datagram(self, max_bytes: int) -> tuple[bytes, str]:
        return await self.inner.receive_datagram(max_bytes)

    async def connect(self, dst: str) -> trio.abc.Stream:
        stream = await self.inner.connect(dst)
        try:
            return await client_handshake(
                stream, self.contexts.client, dst, self.authorize, self.handshake_timeout_s
            )
        except TlsError as exc:
            raise TransportError(str(exc)) from exc

    async def serve(
        self, handler: StreamHandler, limit: int, on_reject: Callable[[], None]
    ) -> None:
        async def secured(stream: trio.abc.Stream, peer: str) -> None:
            try:
                tls, _identity = await server_handshake(
                    stream, self.contexts.server, self.authorize, self.handshake_timeout_s
                )
            except TlsError:
                self.refused += 1
                on_reject()
                return
            await handler(tls, peer)

        await self.inner.serve(secured, limit, on_reject)

    async def aclose(self) -> None:
        await self.inner.aclose()
