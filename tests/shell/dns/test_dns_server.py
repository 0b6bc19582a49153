"""The DNS server on real loopback sockets: UDP, TCP, forwarding, limits, bad bytes.

Every server binds 127.0.0.1 port 0 (the kernel picks; UDP and TCP share the port), so tests
running in parallel never collide. The "upstream" resolvers are servers these tests run on
loopback themselves: another DnsServer for a second domain, or a socket that never answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import dns.asyncbackend
import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import trio

from p2porch.node.dns import DnsConfig, DnsError, DnsServer
from p2porch.node.endpoints import EndpointTable, NodeEndpoints
from tests.unit.dns.kit import LOCAL, ep, query, table, tcp

HOST = "127.0.0.1"
TIMEOUT_S = 10
BACKEND = dns.asyncbackend.get_backend("trio")
APPS = [("default", "web"), ("default", "idle")]


def web_table() -> EndpointTable:
    return table(
        ep("web-0", "node-a", tcp(80, "127.0.0.2", 30000)),
        ep("web-1", LOCAL, tcp(80, "127.0.0.3", 31000)),
    )


def big_table(replicas: int, app: str = "web") -> EndpointTable:
    return table(
        *(
            ep(f"{app}-{i}", "node-a", tcp(80, f"127.0.1.{i + 1}", 30000 + i), app=app)
            for i in range(replicas)
        )
    )


@asynccontextmanager
async def serving(
    tbl: EndpointTable, config: DnsConfig | None = None, apps: Any = APPS
) -> AsyncIterator[tuple[DnsServer, int]]:
    server = DnsServer(tbl, HOST, 0, config or DnsConfig())
    server.set_apps(apps)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        assert server.port == port
        yield server, port
        nursery.cancel_scope.cancel()


async def udp(q: dns.message.Message, port: int) -> dns.message.Message:
    return await dns.asyncquery.udp(q, HOST, timeout=TIMEOUT_S, port=port, backend=BACKEND)


async def tcp_query(q: dns.message.Message, port: int) -> dns.message.Message:
    return await dns.asyncquery.tcp(q, HOST, timeout=TIMEOUT_S, port=port, backend=BACKEND)


def a_records(response: dns.message.Message) -> list[str]:
    return [
        rd.to_text() for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset
    ]


async def eventually(check: Callable[[], bool]) -> None:
    """Wait (bounded) until ``check()`` holds; no timing is asserted, only the outcome."""
    with trio.fail_after(TIMEOUT_S):
        while not check():
            await trio.sleep(0.01)


async def test_answers_over_udp_and_tcp() -> None:
    async with serving(web_table()) as (server, port):
        q = query("web.default.p2porch")
        response = await udp(q, port)
        assert response.id == q.id
        assert a_records(response) == ["127.0.0.3", "127.0.0.2"]
        response = await tcp_query(query("_80._tcp.web.default.p2porch", "SRV"), port)
        assert len(response.answer[0]) == 2
        assert (await udp(query("idle.default.p2porch"), port)).rcode() == dns.rcode.NOERROR
        assert (await udp(query("nope.default.p2porch"), port)).rcode() == dns.rcode.NXDOMAIN
        assert (await udp(query("example.com"), port)).rcode() == dns.rcode.REFUSED
        status = server.status()
        assert status["port"] == port
        assert status["queries"] == 5
        assert status["answered"] == 3
        assert status["nxdomain"] == 1
        assert status["refused"] == 1
        assert status["forwarded"] == 0


async def test_table_and_app_set_changes_are_seen_at_once() -> None:
    tbl = web_table()
    async with serving(tbl, apps=[]) as (server, port):
        assert (await udp(query("idle.default.p2porch"), port)).rcode() == dns.rcode.NXDOMAIN
        server.set_apps(APPS)
        assert (await udp(query("idle.default.p2porch"), port)).rcode() == dns.rcode.NOERROR
        tbl.drop_node("node-a")
        assert a_records(await udp(query("web.default.p2porch"), port)) == ["127.0.0.3"]
        stamp = tbl.stamp(LOCAL)
        assert stamp is not None
        assert tbl.update(NodeEndpoints(LOCAL, stamp[0], stamp[1] + 1, ()))
        response = await udp(query("web.default.p2porch"), port)
        assert response.rcode() == dns.rcode.NOERROR  # web still exists (app set): NODATA
        assert response.answer == []


async def test_large_answers_truncate_over_udp_and_complete_over_tcp() -> None:
    async with serving(big_table(60)) as (server, port):
        response = await udp(query("web.default.p2porch"), port)
        assert response.flags & dns.flags.TC
        assert server.status()["truncated"] == 1
        response = await udp(query("web.default.p2porch", edns=True, payload=4096), port)
        assert not response.flags & dns.flags.TC  # ~1 KB fits the EDNS payload we allow
        assert len(a_records(response)) == 60
        response = await tcp_query(query("web.default.p2porch"), port)
        assert len(a_records(response)) == 60
        assert server.status()["truncated"] == 1


async def test_garbage_is_dropped_and_counted_while_good_queries_are_answered() -> None:
    garbage = [b"", b"\x00", b"\xff" * 40, query("web.default.p2porch").to_wire()[:-3]]
    garbage.append(dns.message.make_response(query("web.default.p2porch")).to_wire())
    async with serving(web_table()) as (server, port):
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((HOST, 0))
            with trio.fail_after(TIMEOUT_S):
                for round_ in range(3):
                    for data in garbage:
                        await sock.sendto(data, (HOST, port))
                    good = query("web.default.p2porch")
                    await sock.sendto(good.to_wire(), (HOST, port))
                    # Datagrams on loopback keep their order: had any garbage been answered,
                    # that answer would arrive first.
                    data, _ = await sock.recvfrom(4096)
                    reply = dns.message.from_wire(data)
                    assert reply.id == good.id, f"round {round_}"
                    assert a_records(reply) == ["127.0.0.3", "127.0.0.2"]
        status = server.status()
        assert status["dropped_malformed"] == 3 * len(garbage)
        assert status["queries"] == 3
        assert status["answered"] == 3


async def test_tcp_pipelined_queries_and_a_garbage_frame_closes_the_connection() -> None:
    async with serving(web_table()) as (server, port):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            first, second = query("web.default.p2porch"), query("nope.default.p2porch")
            payload = b"".join(
                len(w).to_bytes(2, "big") + w for w in (first.to_wire(), second.to_wire())
            )
            await stream.send_all(payload)
            replies = [dns.message.from_wire(frame) for frame in await read_frames(stream, 2)]
            assert [r.id for r in replies] == [first.id, second.id]
            assert replies[1].rcode() == dns.rcode.NXDOMAIN
            await stream.send_all(b"\x00\x03abc")
            with trio.fail_after(TIMEOUT_S):
                assert await stream.receive_some(100) == b""  # closed by the server
        assert server.status()["dropped_malformed"] == 1
        await eventually(lambda: server.status()["tcp_open"] == 0)


async def read_frames(stream: trio.SocketStream, count: int) -> list[bytes]:
    buffer = b""
    frames: list[bytes] = []
    with trio.fail_after(TIMEOUT_S):
        while len(frames) < count:
            if len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
                size = int.from_bytes(buffer[:2], "big")
                frames.append(buffer[2 : 2 + size])
                buffer = buffer[2 + size :]
                continue
            chunk = await stream.receive_some(65536)
            assert chunk, "server closed early"
            buffer += chunk
    return frames


async def test_tcp_connection_cap() -> None:
    config = DnsConfig(max_tcp_connections=2)
    async with serving(web_table(), config) as (server, port):
        held = [await trio.open_tcp_stream(HOST, port) for _ in range(2)]
        await eventually(lambda: server.status()["tcp_open"] == 2)
        extra = await trio.open_tcp_stream(HOST, port)
        # A reset is as good as a close.
        with trio.fail_after(TIMEOUT_S), contextlib.suppress(trio.BrokenResourceError):
            assert await extra.receive_some(100) == b""
        assert server.status()["tcp_refused"] == 1
        # The held connections still work.
        wire = query("web.default.p2porch").to_wire()
        await held[0].send_all(len(wire).to_bytes(2, "big") + wire)
        [frame] = await read_frames(held[0], 1)
        assert a_records(dns.message.from_wire(frame)) == ["127.0.0.3", "127.0.0.2"]
        for stream in [*held, extra]:
            await stream.aclose()
        await eventually(lambda: server.status()["tcp_open"] == 0)


async def test_tcp_idle_and_trickling_connections_are_closed() -> None:
    config = DnsConfig(tcp_idle_timeout_s=0.2)
    async with serving(web_table(), config) as (server, port):
        idle = await trio.open_tcp_stream(HOST, port)
        partial = await trio.open_tcp_stream(HOST, port)
        await partial.send_all(b"\x00\x20\x01")  # a frame that never completes
        for stream in (idle, partial):
            with trio.fail_after(TIMEOUT_S):
                assert await stream.receive_some(100) == b""
            await stream.aclose()
        await eventually(lambda: server.status()["tcp_open"] == 0)
        assert server.status()["tcp_timeouts"] == 1  # only the one that started a frame


@asynccontextmanager
async def upstream_server(tbl: EndpointTable) -> AsyncIterator[tuple[DnsServer, int]]:
    """A DnsServer authoritative for "upstream.test": the forwarders' upstream."""
    async with serving(tbl, DnsConfig(domain="upstream.test"), apps=[("default", "web")]) as up:
        yield up


async def test_forwarding_to_an_upstream_keeps_the_clients_id() -> None:
    async with upstream_server(web_table()) as (upstream, up_port):
        config = DnsConfig(upstreams=((HOST, up_port),))
        async with serving(web_table(), config) as (server, port):
            for _ in range(3):
                q = query("web.default.upstream.test")
                response = await udp(q, port)
                assert response.id == q.id
                assert response.flags & dns.flags.RA
                assert a_records(response) == ["127.0.0.3", "127.0.0.2"]
            q = query("nope.default.upstream.test")
            response = await tcp_query(q, port)
            assert response.id == q.id
            assert response.rcode() == dns.rcode.NXDOMAIN
            # Our own names are still answered here, never forwarded.
            assert a_records(await udp(query("web.default.p2porch"), port)) == [
                "127.0.0.3",
                "127.0.0.2",
            ]
            status = server.status()
            assert status["forwarded"] == 4
            assert status["upstream_failures"] == 0
            assert status["answered"] == 1
            assert upstream.status()["queries"] == 4


async def test_a_truncated_upstream_answer_is_fetched_again_over_tcp() -> None:
    async with upstream_server(big_table(60)) as (upstream, up_port):
        config = DnsConfig(upstreams=((HOST, up_port),))
        async with serving(web_table(), config) as (server, port):
            response = await tcp_query(query("web.default.upstream.test"), port)
            assert len(a_records(response)) == 60
            assert upstream.status()["truncated"] == 1  # it said TC over UDP, then TCP
            response = await udp(query("web.default.upstream.test"), port)
            assert response.flags & dns.flags.TC  # relayed within our client's 512 bytes
            assert server.status()["truncated"] == 1


async def test_a_silent_upstream_is_skipped_and_servfail_when_none_answers() -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind((HOST, 0))
        silent_port = silent.getsockname()[1]
        async with upstream_server(web_table()) as (_, up_port):
            config = DnsConfig(
                upstreams=((HOST, silent_port), (HOST, up_port)), upstream_timeout_s=0.2
            )
            async with serving(web_table(), config) as (server, port):
                response = await udp(query("web.default.upstream.test"), port)
                assert a_records(response) == ["127.0.0.3", "127.0.0.2"]
            config = DnsConfig(upstreams=((HOST, silent_port),), upstream_timeout_s=0.2)
            async with serving(web_table(), config) as (server, port):
                q = query("example.com")
                response = await udp(q, port)
                assert response.id == q.id
                assert response.rcode() == dns.rcode.SERVFAIL
                assert server.status()["upstream_failures"] == 1


async def test_binding_a_taken_port_raises_dns_error() -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as taken:
        await taken.bind((HOST, 0))
        server = DnsServer(web_table(), HOST, taken.getsockname()[1], DnsConfig())
        with pytest.raises(DnsError):
            await server.run()
    with pytest.raises(DnsError):
        await DnsServer(web_table(), "localhost", 0).run()


async def test_forwards_over_the_in_flight_cap_get_servfail_at_once() -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as silent:
        await silent.bind((HOST, 0))
        config = DnsConfig(
            upstreams=((HOST, silent.getsockname()[1]),),
            upstream_timeout_s=0.5,
            max_forwards_in_flight=1,
        )
        async with serving(web_table(), config) as (server, port):
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
                await sock.bind((HOST, 0))
                first, second = query("a.example"), query("b.example")
                await sock.sendto(first.to_wire(), (HOST, port))
                await sock.sendto(second.to_wire(), (HOST, port))
                with trio.fail_after(TIMEOUT_S):
                    replies = [dns.message.from_wire((await sock.recvfrom(4096))[0]) for _ in "ab"]
            # The second is refused service at once, so its answer comes first.
            assert [r.id for r in replies] == [second.id, first.id]
            assert all(r.rcode() == dns.rcode.SERVFAIL for r in replies)
            status = server.status()
            assert status["forward_overflow"] == 1
            assert status["upstream_failures"] == 1
            await eventually(lambda: server.status()["forwards_in_flight"] == 0)
