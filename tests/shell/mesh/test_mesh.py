"""The routing mesh over real loopback sockets: tiny trio backends stand in for replicas.

Each test runs its mesh on its own loopback address (127.77.P.N), so published ports probed
here cannot collide with other suites running in parallel on 127.0.0.1. Backends listen on
127.0.0.1 port 0. No timing assertions: waits are bounded polls under ``trio.fail_after``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import ipaddress
import itertools
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from p2porch.node.balance import Strategy
from p2porch.node.endpoints import Endpoint, EndpointPort, EndpointTable, NodeEndpoints
from p2porch.node.mesh import Mesh, MeshConfig, MeshRoute

BACKEND_HOST = "127.0.0.1"
CONTAINER_PORT = 80
_hosts = itertools.count(1)


def new_host() -> str:
    """A loopback address of our own for one test's mesh."""
    n = next(_hosts)
    return f"127.77.{os.getpid() % 250}.{n % 250 + 1}"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def dead_port() -> int:
    """A port on the backend host with nothing listening (connects are refused)."""
    return free_port(BACKEND_HOST)


# ---- backends


Handler = Callable[[trio.SocketStream], Awaitable[None]]


def identify(name: str) -> Handler:
    """Says its name, echoes until EOF, then says BYE and closes (to test half-close)."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(f"{name}\n".encode())
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_all(b"BYE\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    return handler


async def read_exact(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        assert chunk, "EOF before the expected bytes"
        data += chunk
    return data


def proxy_reader() -> Handler:
    """Parses a PROXY v2 header (as an app would) and answers with what it read."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            head = await read_exact(stream, 16)
            assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
            ver_cmd, fam, length = struct.unpack("!BBH", head[12:])
            body = await read_exact(stream, length)
            src: ipaddress.IPv4Address | ipaddress.IPv6Address
            dst: ipaddress.IPv4Address | ipaddress.IPv6Address
            if fam == 0x11:
                src, dst = ipaddress.IPv4Address(body[:4]), ipaddress.IPv4Address(body[4:8])
                sport, dport = struct.unpack("!HH", body[8:12])
            else:
                src, dst = ipaddress.IPv6Address(body[:16]), ipaddress.IPv6Address(body[16:32])
                sport, dport = struct.unpack("!HH", body[32:36])
            line = f"{ver_cmd:#x} {fam:#x} {src} {sport} {dst} {dport}\n"
            await stream.send_all(line.encode())
            # The app's own bytes follow the header untouched.
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    return handler


async def start_backend(nursery: trio.Nursery, handler: Handler) -> int:
    serve = functools.partial(trio.serve_tcp, host=BACKEND_HOST)
    listeners = await nursery.start(serve, handler, 0)
    return int(listeners[0].socket.getsockname()[1])


def endpoint(node: str, name: str, port: int, *, ready: bool = True) -> Endpoint:
    return Endpoint(
        namespace="default",
        app="web",
        slot=0,
        replica=name,
        node=node,
        revision=1,
        container_id=f"c-{name}",
        ports=(EndpointPort(CONTAINER_PORT, BACKEND_HOST, port),),
        ready=ready,
    )


_versions = itertools.count(1)


def publish(table: EndpointTable, node: str, *endpoints: Endpoint) -> None:
    table.update(NodeEndpoints(node=node, epoch=1, version=next(_versions), endpoints=endpoints))


# ---- clients


async def read_line(stream: trio.SocketStream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data.decode().rstrip("\n")


async def ask(host: str, port: int) -> str:
    """Connect through the mesh and return the backend's name."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        return await read_line(stream)


async def read_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def route_status(mesh: Mesh, port: int) -> dict[str, Any]:
    routes: list[dict[str, Any]] = mesh.status()["routes"]
    for route in routes:
        if route["published_port"] == port:
            return route
    raise AssertionError(f"no route on {port}")


async def wait_until(check: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not check():
            await trio.sleep(0.01)


@asynccontextmanager
async def running_mesh(
    table: EndpointTable,
    host: str,
    routes: list[MeshRoute],
    config: MeshConfig | None = None,
    local_node: str = "n1",
) -> AsyncIterator[Mesh]:
    mesh = Mesh(table, host, config or MeshConfig(bind_retry_interval_s=0.05), local_node)
    mesh.set_routes(routes)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        yield mesh
        nursery.cancel_scope.cancel()


def web_route(port: int, **kw: Any) -> MeshRoute:
    return MeshRoute("default", "web", port, CONTAINER_PORT, **kw)


# ---- tests


async def test_round_robin_spreads_over_replicas() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ports = [await start_backend(nursery, identify(f"b{i}")) for i in range(3)]
            publish(table, "n2", *(endpoint("n2", f"b{i}", p) for i, p in enumerate(ports)))
            async with running_mesh(table, host, [web_route(port)]) as mesh:
                seen = collections.Counter([await ask(host, port) for _ in range(9)])
                assert seen == {"b0": 3, "b1": 3, "b2": 3}
                status = route_status(mesh, port)
                assert status["state"] == "listening"
                assert status["total"] == 9
                assert status["failed_connects"] == 0
            nursery.cancel_scope.cancel()


async def test_prefer_local_and_unready_replicas_get_no_new_connections() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            local = await start_backend(nursery, identify("b1"))
            remote = await start_backend(nursery, identify("b2"))
            publish(table, "n1", endpoint("n1", "b1", local))
            publish(table, "n2", endpoint("n2", "b2", remote))
            async with running_mesh(table, host, [web_route(port)]):
                assert {await ask(host, port) for _ in range(4)} == {"b1"}
                # The local replica turns unready: the table is read on every accept.
                publish(table, "n1", endpoint("n1", "b1", local, ready=False))
                assert {await ask(host, port) for _ in range(4)} == {"b2"}
            async with running_mesh(table, new_host(), []) as mesh:
                # prefer_local off: spread over both even when a local one exists.
                publish(table, "n1", endpoint("n1", "b1", local))
                other = free_port(mesh.listen_host)
                mesh.set_routes([web_route(other, prefer_local=False)])
                seen = {await ask(mesh.listen_host, other) for _ in range(4)}
                assert seen == {"b1", "b2"}
            nursery.cancel_scope.cancel()


async def test_least_connections_avoids_the_busy_replica() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            p1 = await start_backend(nursery, identify("b1"))
            p2 = await start_backend(nursery, identify("b2"))
            publish(table, "n2", endpoint("n2", "b1", p1), endpoint("n2", "b2", p2))
            route = web_route(port, strategy=Strategy.LEAST_CONNECTIONS)
            async with running_mesh(table, host, [route]) as mesh:
                held = await trio.open_tcp_stream(host, port)
                busy = await read_line(held)
                names = []
                for _ in range(4):
                    names.append(await ask(host, port))
                    # Wait until the mesh has released the short connection.
                    await wait_until(lambda: route_status(mesh, port)["active"] == 1)
                assert busy not in names
                assert len(set(names)) == 1
                await held.aclose()
                await wait_until(lambda: route_status(mesh, port)["active"] == 0)
                # Switching to round-robin in place keeps the listener and alternates.
                mesh.set_routes([web_route(port, strategy=Strategy.ROUND_ROBIN)])
                assert route_status(mesh, port)["state"] == "listening"
                assert {await ask(host, port) for _ in range(4)} == {"b1", "b2"}
            nursery.cancel_scope.cancel()


async def test_dead_endpoint_is_retried_elsewhere_without_client_failures() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            alive = await start_backend(nursery, identify("b2"))
            # The dead one is local, so prefer_local tries it first every time.
            publish(table, "n1", endpoint("n1", "dead1", dead_port()))
            publish(table, "n2", endpoint("n2", "b2", alive))
            async with running_mesh(table, host, [web_route(port)]) as mesh:
                assert [await ask(host, port) for _ in range(5)] == ["b2"] * 5
                status = route_status(mesh, port)
                assert status["failed_connects"] == 5
                assert status["unreachable"] == 0
                assert status["no_endpoint"] == 0
                # Every replica dead: the client is closed after max_connect_attempts.
                publish(table, "n2", endpoint("n2", "dead2", dead_port()))
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    assert await read_all(stream) == b""
                await wait_until(lambda: route_status(mesh, port)["unreachable"] == 1)
                assert route_status(mesh, port)["failed_connects"] == 7
            nursery.cancel_scope.cancel()


async def test_no_endpoint_closes_the_client_at_once() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with running_mesh(table, host, [web_route(port)]) as mesh:
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError):  # a reset is closed too
                    assert await read_all(stream) == b""
            await wait_until(lambda: route_status(mesh, port)["no_endpoint"] == 1)
            status = mesh.status()
            assert status["totals"]["no_endpoint"] == 1
            assert route_status(mesh, port)["active"] == 0


async def test_route_removal_closes_the_listener_but_not_live_connections() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            publish(table, "n1", endpoint("n1", "b1", await start_backend(nursery, identify("b1"))))
            async with running_mesh(table, host, [web_route(port)]) as mesh:
                held = await trio.open_tcp_stream(host, port)
                assert await read_line(held) == "b1"
                mesh.set_routes([])
                assert mesh.status()["routes"] == []
                assert mesh.status()["draining_connections"] == 1
                with pytest.raises(OSError):
                    await trio.open_tcp_stream(host, port)
                # The connection accepted before the removal still works.
                await held.send_all(b"still here\n")
                assert await read_line(held) == "still here"
                await held.aclose()
                await wait_until(lambda: mesh.status()["draining_connections"] == 0)
                # And the port can be served again.
                mesh.set_routes([web_route(port)])
                assert await ask(host, port) == "b1"
            nursery.cancel_scope.cancel()


async def test_port_in_use_is_reported_and_retried() -> None:
    host = new_host()
    busy_port = free_port(host)
    other_port = free_port(host)
    table = EndpointTable("n1")
    blocker = socket.socket()
    blocker.bind((host, busy_port))
    blocker.listen()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            publish(table, "n1", endpoint("n1", "b1", await start_backend(nursery, identify("b1"))))
            routes = [web_route(busy_port), web_route(other_port)]
            async with running_mesh(table, host, routes) as mesh:
                status = route_status(mesh, busy_port)
                assert status["state"] == "error"
                assert "in use" in status["error"]
                # The other route is unaffected.
                assert route_status(mesh, other_port)["state"] == "listening"
                assert await ask(host, other_port) == "b1"
                blocker.close()
                await wait_until(lambda: route_status(mesh, busy_port)["state"] == "listening")
                assert route_status(mesh, busy_port)["error"] is None
                assert await ask(host, busy_port) == "b1"
            nursery.cancel_scope.cancel()


async def test_proxy_v2_header_carries_the_client_address() -> None:
    host = new_host()
    port = free_port(host)
    client_host = new_host()
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            publish(table, "n1", endpoint("n1", "b1", await start_backend(nursery, proxy_reader())))
            async with running_mesh(table, host, [web_route(port, proxy_protocol=True)]):
                stream = await trio.open_tcp_stream(host, port, local_address=client_host)
                async with stream:
                    client_ip, client_port = stream.socket.getsockname()[:2]
                    assert client_ip == client_host
                    line = await read_line(stream)
                    assert line == f"0x21 0x11 {client_ip} {client_port} {host} {port}"
                    await stream.send_all(b"payload\n")
                    assert await read_line(stream) == "payload"
            nursery.cancel_scope.cancel()


async def test_half_close_client_still_reads_the_reply() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            publish(table, "n1", endpoint("n1", "b1", await start_backend(nursery, identify("b1"))))
            async with running_mesh(table, host, [web_route(port)]) as mesh:
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(b"hello")
                    await stream.send_eof()
                    # BYE is sent by the backend only after it saw our EOF.
                    assert await read_all(stream) == b"b1\nhelloBYE\n"
                await wait_until(lambda: route_status(mesh, port)["active"] == 0)
                status = route_status(mesh, port)
                assert status["bytes_to_replica"] == 5
                assert status["bytes_to_client"] == len(b"b1\nhelloBYE\n")
            nursery.cancel_scope.cancel()


async def test_large_transfer_is_intact() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    payload = random.Random(7).randbytes(4 * 1024 * 1024 + 123)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            publish(table, "n1", endpoint("n1", "b1", await start_backend(nursery, identify("b1"))))
            async with running_mesh(table, host, [web_route(port)]) as mesh:
                stream = await trio.open_tcp_stream(host, port)
                received: list[bytes] = []

                async def send() -> None:
                    view = memoryview(payload)
                    for offset in range(0, len(payload), 100_000):
                        await stream.send_all(view[offset : offset + 100_000])
                    await stream.send_eof()

                async def receive() -> None:
                    received.append(await read_all(stream))

                async with stream, trio.open_nursery() as inner:
                    inner.start_soon(send)
                    inner.start_soon(receive)
                got = received[0]
                assert got.startswith(b"b1\n") and got.endswith(b"BYE\n")
                body = got[3:-4]
                assert len(body) == len(payload)
                assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()
                await wait_until(lambda: route_status(mesh, port)["active"] == 0)
                assert route_status(mesh, port)["bytes_to_replica"] == len(payload)
            nursery.cancel_scope.cancel()


async def test_connection_limit_closes_the_extra_client() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    config = MeshConfig(max_connections=1, bind_retry_interval_s=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            publish(table, "n1", endpoint("n1", "b1", await start_backend(nursery, identify("b1"))))
            async with running_mesh(table, host, [web_route(port)], config) as mesh:
                held = await trio.open_tcp_stream(host, port)
                assert await read_line(held) == "b1"
                extra = await trio.open_tcp_stream(host, port)
                async with extra:
                    assert await read_all(extra) == b""
                assert route_status(mesh, port)["over_limit"] == 1
                await held.aclose()
                await wait_until(lambda: route_status(mesh, port)["active"] == 0)
                assert await ask(host, port) == "b1"
            nursery.cancel_scope.cancel()


async def test_idle_connection_is_closed() -> None:
    host = new_host()
    port = free_port(host)
    table = EndpointTable("n1")
    config = MeshConfig(connect_timeout_s=0.5, idle_timeout_s=1.0, bind_retry_interval_s=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            publish(table, "n1", endpoint("n1", "b1", await start_backend(nursery, identify("b1"))))
            async with running_mesh(table, host, [web_route(port)], config) as mesh:
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    assert await read_line(stream) == "b1"
                    # Say nothing: the mesh closes the connection (a FIN, not a reset).
                    assert await read_all(stream) == b""
                await wait_until(lambda: route_status(mesh, port)["idle_timeouts"] == 1)
            nursery.cancel_scope.cancel()


async def test_set_routes_before_run_and_duplicate_ports() -> None:
    host = new_host()
    port = free_port(host)
    mesh = Mesh(EndpointTable("n1"), host, MeshConfig(), "n1")
    mesh.set_routes([web_route(port)])
    assert route_status(mesh, port)["state"] == "stopped"
    with pytest.raises(ValueError):
        mesh.set_routes([web_route(port), MeshRoute("default", "api", port, 81)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(mesh.run)
            assert route_status(mesh, port)["state"] == "listening"
            nursery.cancel_scope.cancel()
    # After run ends, the port is free again.
    with socket.socket() as sock:
        sock.bind((host, port))
