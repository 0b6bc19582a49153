"""An in-memory network implementing the shell's Transport, for MockClock shell tests.

Datagrams travel through bounded memory channels (full = dropped, like a socket buffer);
streams are ``trio.testing.memory_stream_pair``. Links can be cut per direction, and a node
can be taken off the network entirely, which is how "the process died" looks to its peers.
Real sockets cannot run under ``MockClock(autojump_threshold=0)``: the clock would jump while
a real packet is still in the kernel, so these tests use this fake and the integration tests
use real processes.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable

import trio
import trio.testing

from p2porch.gossip.service import StreamHandler


class MemoryNetwork:
    def __init__(self) -> None:
        self.endpoints: dict[str, MemoryTransport] = {}
        self.cut: set[tuple[str, str]] = set()  # (src, dst) pairs whose traffic is dropped
        self.largest_datagram = 0  # sent by a transport (not injected)
        self._ports = itertools.count(40000)

    async def bind(self, host: str, port: int) -> MemoryTransport:
        if port == 0:
            port = next(self._ports)
        addr = f"{host}:{port}"
        if addr in self.endpoints and self.endpoints[addr].up:
            raise OSError(errno.EADDRINUSE, f"{addr} in use")
        transport = MemoryTransport(self, addr)
        self.endpoints[addr] = transport
        return transport

    def reachable(self, src: str, dst: str) -> MemoryTransport | None:
        target = self.endpoints.get(dst)
        if target is None or not target.up or (src, dst) in self.cut:
            return None
        source = self.endpoints.get(src)
        if source is not None and not source.up:
            return None
        return target

    def isolate(self, addr: str) -> None:
        """Cut every link to and from ``addr`` (the node keeps running, deaf and mute)."""
        for other in self.endpoints:
            if other != addr:
                self.cut.add((addr, other))
                self.cut.add((other, addr))

    def inject(self, dst: str, data: bytes, src: str = "10.9.9.9:9999") -> bool:
        """Deliver a raw datagram from a stranger (garbage tests)."""
        target = self.reachable(src, dst)
        return target is not None and target.deliver(data, src)

    async def raw_connect(self, dst: str, src: str = "10.9.9.9") -> trio.abc.Stream:
        """A raw stream to ``dst``'s listener, from a stranger (garbage tests)."""
        target = self.reachable(src, dst)
        if target is None:
            raise OSError(errno.ECONNREFUSED, f"{dst} refused")
        return target.accept_from(f"{src}:{next(self._ports)}")


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, addr: str) -> None:
        self.network = network
        self.addr = addr
        self.up = True
        self._dgram_send, self._dgram_recv = trio.open_memory_channel[tuple[bytes, str]](256)
        self._conn_send, self._conn_recv = trio.open_memory_channel[tuple[trio.abc.Stream, str]](64)

    @property
    def local_addr(self) -> str:
        return self.addr

    def deliver(self, data: bytes, src: str) -> bool:
        try:
            self._dgram_send.send_nowait((data, src))
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def accept_from(self, peer: str) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        try:
            self._conn_send.send_nowait((server, peer))
        except (trio.WouldBlock, trio.ClosedResourceError) as exc:
            raise OSError(errno.ECONNREFUSED, "backlog full") from exc
        return client

    async def send_datagram(self, dst: str, data: bytes) -> None:
        self.network.largest_datagram = max(self.network.largest_datagram, len(data))
        target = self.network.reachable(self.addr, dst)
        if target is not None:
            target.deliver(data, self.addr)
        await trio.lowlevel.checkpoint()

    async def receive_datagram(self, max_bytes: int) -> tuple[bytes, str]:
        data, src = await self._dgram_recv.receive()
        return data[:max_bytes], src

    async def connect(self, dst: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        target = self.network.reachable(self.addr, dst)
        if target is None:
            raise OSError(errno.ECONNREFUSED, f"{dst} refused")
        host = self.addr.rpartition(":")[0]
        return target.accept_from(f"{host}:{next(self.network._ports)}")

    async def serve(
        self, handler: StreamHandler, limit: int, on_reject: Callable[[], None]
    ) -> None:
        active = 0

        async def run_one(stream: trio.abc.Stream, peer: str) -> None:
            nonlocal active
            try:
                await handler(stream, peer)
            finally:
                active -= 1
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            async for stream, peer in self._conn_recv:
                if active >= limit:
                    on_reject()
                    await trio.aclose_forcefully(stream)
                    continue
                active += 1
                nursery.start_soon(run_one, stream, peer)

    async def aclose(self) -> None:
        self.up = False
        self._dgram_send.close()
        self._conn_send.close()
        await trio.lowlevel.checkpoint()
