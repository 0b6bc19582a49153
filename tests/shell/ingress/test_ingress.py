"""The ingress over real loopback sockets: routing, balancing, keep-alive, retries, pages,
streaming both ways, websockets, deadlines. Backends are tiny h11 servers (kit.py)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from p2porch.node.balance import Strategy
from p2porch.node.endpoints import EndpointTable
from p2porch.node.ingress import IngressConfig, IngressRule, _Upstream

from .kit import (
    CHUNKS,
    Backend,
    dead_port,
    raw_exchange,
    start_backends,
    start_ingress,
    table_for,
    web_rule,
)

LIMIT_S = 30


def client(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, trust_env=False, timeout=20)


async def test_routes_by_host_and_path() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            shop, wild, api, site = (
                Backend("shop"),
                Backend("wild"),
                Backend("api"),
                Backend("site"),
            )
            ports = await start_backends(nursery, shop, wild, api, site)
            table = table_for(
                {
                    ("default", n): [p]
                    for n, p in zip(["shop", "wild", "api", "site"], ports, strict=True)
                }
            )
            rules = [
                web_rule("shop", host="shop.example.com"),
                web_rule("wild", host="*.example.com"),
                web_rule("api", path="/api"),
                web_rule("site"),
            ]
            ingress, base = await start_ingress(nursery, table, rules)
            cases = [
                ("shop.example.com", "/api/x", "shop"),
                ("SHOP.example.com:8080", "/", "shop"),
                ("blog.example.com", "/api", "wild"),
                ("other.org", "/api/v1?q=1", "api"),
                ("other.org", "/apix", "site"),
                ("other.org", "/", "site"),
            ]
            async with client(base) as http:
                for host, path, expected in cases:
                    r = await http.get(path, headers={"Host": host})
                    assert r.status_code == 200, (host, path)
                    assert r.json()["backend"] == expected, (host, path)
                    assert r.json()["target"] == path
                    assert r.json()["headers"]["host"] == host
                # Rules can change while serving: without a catch-all, unknown paths are 404s.
                ingress.set_rules(rules[:3])
                r = await http.get("/nothing/here", headers={"Host": "other.org"})
                assert r.status_code == 404
                assert r.headers["server"] == "p2porch"
                assert "other.org" in r.text and "/nothing/here" in r.text
            assert ingress.status()["no_rule_404"] == 1
            nursery.cancel_scope.cancel()


async def test_round_robin_and_keep_alive_on_one_client_connection() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backends = [Backend(f"b{i}") for i in range(3)]
            ports = await start_backends(nursery, *backends)
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            async with client(base) as http:
                seen = [(await http.get("/")).json()["backend"] for _ in range(9)]
            # Round robin over the whole cluster (replicas on n1 and n2 alike), in a fixed ring.
            assert Counter(seen) == {"b0": 3, "b1": 3, "b2": 3}
            assert seen[0:3] == seen[3:6] == seen[6:9]
            status = ingress.status()
            assert status["connections"] == 1  # httpx kept one connection alive for all nine
            assert status["requests"] == 9
            assert status["responses"] == {"2xx": 9}
            # Upstream connections were parked and reused, not opened per request.
            assert status["upstream_connects"] == 3
            assert status["upstream_reuses"] == 6
            assert sum(b.connections for b in backends) == 3
            nursery.cancel_scope.cancel()


async def test_least_connections_strategy_is_accepted() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backends = [Backend(f"b{i}") for i in range(2)]
            ports = await start_backends(nursery, *backends)
            rule = IngressRule(
                host="",
                namespace="default",
                app="web",
                container_port=8080,
                strategy=Strategy.LEAST_CONNECTIONS,
            )
            _, base = await start_ingress(nursery, table_for({("default", "web"): ports}), [rule])
            async with client(base) as http:
                seen = {(await http.get("/")).json()["backend"] for _ in range(4)}
            assert seen == {"b0", "b1"}
            nursery.cancel_scope.cancel()


async def test_forwarding_headers_and_hop_by_hop() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            ports = await start_backends(nursery, Backend("b"))
            _, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            async with client(base) as http:
                r = await http.get(
                    "/h",
                    headers={
                        "Host": "shop.example.com",
                        "X-Forwarded-For": "203.0.113.9",
                        "Connection": "keep-alive, X-Private",
                        "X-Private": "secret",
                        "Proxy": "http://evil.example",
                        "X-App": "kept",
                    },
                )
            got = r.json()["headers"]
            assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
            assert got["x-forwarded-proto"] == "http"
            assert got["x-forwarded-host"] == "shop.example.com"
            assert got["forwarded"] == 'for=127.0.0.1;proto=http;host="shop.example.com"'
            assert got["host"] == "shop.example.com"
            assert got["x-app"] == "kept"
            for gone in ("connection", "x-private", "proxy"):
                assert gone not in got
            assert r.headers["x-backend"] == "b"
            nursery.cancel_scope.cancel()


async def test_error_pages_404_503_502() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            table = table_for({("default", "dead"): [dead_port(), dead_port()]})
            rules = [web_rule("empty", path="/empty"), web_rule("dead", path="/dead")]
            ingress, base = await start_ingress(nursery, table, rules)
            async with client(base) as http:
                r = await http.get("/nope", headers={"Host": "x.example"})
                assert r.status_code == 404
                assert r.headers["content-type"].startswith("text/html")
                assert "x.example" in r.text and "/nope" in r.text

                r = await http.get("/empty/page")
                assert r.status_code == 503
                assert r.headers["retry-after"] == "5"
                assert r.headers["server"] == "p2porch"
                assert "no ready replica of default/empty" in r.text

                r = await http.get("/dead")
                assert r.status_code == 502
                assert "bad gateway" in r.text and "default/dead" in r.text
                assert "connection refused" in r.text

                r = await http.head("/nope")
                assert r.status_code == 404 and r.content == b""
            status = ingress.status()
            assert status["connections"] == 1  # pages keep the connection alive
            assert status["no_rule_404"] == 2
            assert status["no_endpoint_503"] == 1
            assert status["upstream_failures"] == 2  # both dead replicas tried, then 502
            assert status["retries"] == 1
            assert status["responses"] == {"4xx": 2, "5xx": 2}
            nursery.cancel_scope.cancel()


async def test_dead_endpoint_is_retried_with_no_client_failures() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backends = [Backend("b0"), Backend("b1")]
            ports = await start_backends(nursery, *backends)
            table = table_for({("default", "web"): [ports[0], dead_port(), ports[1]]})
            ingress, base = await start_ingress(nursery, table, [web_rule()])
            async with client(base) as http:
                statuses: Counter[int] = Counter()
                for _ in range(12):
                    r = await http.post("/form", content=b"x=1")
                    statuses[r.status_code] += 1
                    r = await http.get("/page")
                    statuses[r.status_code] += 1
            assert statuses == {200: 24}
            status = ingress.status()
            assert status["retries"] >= 1
            assert status["upstream_failures"] == status["retries"]
            assert sum(b.requests for b in backends) == 24
            nursery.cancel_scope.cancel()


async def test_large_post_streamed_intact_and_chunked_upload() -> None:
    payload = os.urandom(6 * 1024 * 1024 + 123)
    digest = hashlib.sha256(payload).hexdigest()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            ports = await start_backends(nursery, Backend("b"))
            _, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            async with client(base) as http:
                r = await http.post("/upload", content=payload)
                assert r.status_code == 200
                got = r.json()
                assert got["body_bytes"] == len(payload) and got["body_sha256"] == digest
                assert got["headers"]["content-length"] == str(len(payload))

                r = await http.post("/upload", content=pieces())  # chunked on the wire
                got = r.json()
                assert got["body_bytes"] == len(payload) and got["body_sha256"] == digest
                assert got["headers"]["transfer-encoding"] == "chunked"
            nursery.cancel_scope.cancel()


async def test_chunked_response_relayed() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            ports = await start_backends(nursery, Backend("b"))
            _, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            async with client(base) as http:
                pieces = []
                async with http.stream("GET", "/chunked") as r:
                    assert r.headers["transfer-encoding"] == "chunked"
                    async for piece in r.aiter_raw():
                        pieces.append(piece)
                assert b"".join(pieces) == b"".join(CHUNKS)
            # HTTP/1.0 clients get the same body, delimited by the close.
            raw = await raw_exchange(base, b"GET /chunked HTTP/1.0\r\nHost: h\r\n\r\n")
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body == b"".join(CHUNKS)
            nursery.cancel_scope.cancel()


async def test_websocket_upgrade_splices_bytes_both_ways() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            ports = await start_backends(nursery, Backend("b"))
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            host, port = base.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                # The first frame travels right behind the request head (tests trailing data).
                await stream.send_all(
                    b"GET /ws HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\nfirst-frame"
                )
                got = b""
                while b"first-frame" not in got:
                    got += await stream.receive_some(65536)
                head = got.split(b"\r\n\r\n")[0].lower()
                assert head.startswith(b"http/1.1 101")
                assert b"upgrade: websocket" in head and b"connection: upgrade" in head
                for i in range(5):
                    message = f"message {i} ".encode() * 100
                    await stream.send_all(message)
                    echoed = b""
                    while len(echoed) < len(message):
                        echoed += await stream.receive_some(65536)
                    assert echoed == message
                # Half-close: our EOF reaches the backend, whose EOF comes back.
                await stream.send_eof()
                assert await stream.receive_some(65536) == b""
            # An upgrade the replica declines is an ordinary response.
            async with client(base) as http:
                r = await http.get(
                    "/plain", headers={"Connection": "Upgrade", "Upgrade": "websocket"}
                )
                assert r.status_code == 200 and r.json()["headers"]["upgrade"] == "websocket"
            assert ingress.status()["websocket_upgrades"] == 1
            nursery.cancel_scope.cancel()


async def test_slow_client_header_deadline_closes_the_connection() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            ingress, base = await start_ingress(
                nursery, EndpointTable("n1"), [web_rule()], IngressConfig(header_timeout_s=1.0)
            )
            raw = await raw_exchange(base, b"GET / HTTP/1.1\r\nHost: slow.example\r\nX-A: 1\r\n")
            assert raw.startswith(b"HTTP/1.1 408")
            assert ingress.status()["header_timeouts"] == 1
            # A connection that never sends anything is closed too, silently.
            assert await raw_exchange(base, b"") == b""
            assert ingress.status()["header_timeouts"] == 2
            assert ingress.status()["active_connections"] == 0
            nursery.cancel_scope.cancel()


async def test_upstream_timeout_is_504_and_not_retried() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backends = [Backend("b0", slow_s=20), Backend("b1", slow_s=20)]
            ports = await start_backends(nursery, *backends)
            config = IngressConfig(upstream_timeout_s=1.0, connect_timeout_s=1.0)
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()], config
            )
            async with client(base) as http:
                r = await http.get("/slow")
                assert r.status_code == 504
                assert "gateway timeout" in r.text
            assert ingress.status()["retries"] == 0
            assert ingress.status()["upstream_timeouts"] == 1
            nursery.cancel_scope.cancel()


async def test_hangup_after_request_retries_get_but_not_post() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backends = [Backend("b0"), Backend("b1")]
            ports = await start_backends(nursery, *backends)
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            async with client(base) as http:
                r = await http.get("/hangup")
                assert r.status_code == 502  # both replicas hung up: GET tried on each
                assert ingress.status()["retries"] == 1
                r = await http.post("/hangup", content=b"order=1")
                assert r.status_code == 502
                assert ingress.status()["retries"] == 1  # a POST is never sent twice
            assert sum(b.requests for b in backends) == 3
            nursery.cancel_scope.cancel()


async def test_backend_closing_after_each_response_costs_no_failures() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backends = [Backend("b0", keep_alive=False), Backend("b1", keep_alive=False)]
            ports = await start_backends(nursery, *backends)
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            async with client(base) as http:
                for _ in range(6):
                    assert (await http.get("/")).status_code == 200
            status = ingress.status()
            assert status["upstream_failures"] == 0
            assert status["upstream_connects"] == 6
            assert status["idle_upstream_connections"] == 0
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("detect_stale", [True, False])
async def test_parked_connection_closed_by_the_replica_is_not_a_failure(
    detect_stale: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica closes kept-alive connections behind our back. The ingress notices before
    reuse (EOF readable); and if it could not, the request goes again on a new connection."""
    if not detect_stale:
        monkeypatch.setattr(_Upstream, "stale", lambda self: False)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backend = Backend("b0", drop_idle=True)
            ports = await start_backends(nursery, backend)
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            async with client(base) as http:
                for i in range(5):
                    assert (await http.get("/")).status_code == 200
                    for _ in range(1000):  # until the replica closed its side (bounded)
                        if backend.closed > i:
                            break
                        await trio.sleep(0.01)
            status = ingress.status()
            assert status["upstream_failures"] == 0
            assert status["retries"] == 0
            assert status["upstream_connects"] == 5
            assert status["upstream_reuses"] == (0 if detect_stale else 4)
            assert backend.requests == 5
            nursery.cancel_scope.cancel()


async def test_expect_100_continue_is_answered_by_the_ingress() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            ports = await start_backends(nursery, Backend("b"))
            _, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            host, port = base.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(
                    b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                    b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
                )
                got = b""
                while b"\r\n\r\n" not in got:
                    got += await stream.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 100")
                await stream.send_all(b"hello")
                while chunk := await stream.receive_some(65536):
                    got += chunk
            final = got.split(b"\r\n\r\n", 1)[1]
            assert final.startswith(b"HTTP/1.1 200")
            body = json.loads(final.split(b"\r\n\r\n", 1)[1])
            assert body["body_bytes"] == 5 and "expect" not in body["headers"]
            nursery.cancel_scope.cancel()


async def test_concurrent_requests_and_connection_cap() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            backends = [Backend(f"b{i}") for i in range(3)]
            ports = await start_backends(nursery, *backends)
            config = IngressConfig(max_connections=8)
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()], config
            )
            results: list[int] = []

            async def one() -> None:
                async with client(base) as http:
                    results.append((await http.get("/hold")).status_code)

            async with trio.open_nursery() as requests:
                for _ in range(8):
                    requests.start_soon(one)
                # Wait until all eight are in flight (held by the backends), bounded.
                for _ in range(1000):
                    if ingress.status()["active_connections"] == 8 and (
                        sum(b.requests for b in backends) == 8
                    ):
                        break
                    await trio.sleep(0.01)
                assert ingress.status()["active_connections"] == 8
                # The ninth connection is over the cap: closed without a word.
                assert await raw_exchange(base, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n") == b""
                assert ingress.status()["refused_connections"] == 1
                for b in backends:
                    b.release.set()
            assert results == [200] * 8
            assert Counter(b.requests for b in backends) == {(8 // 3) + 1: 2, 8 // 3: 1}
            nursery.cancel_scope.cancel()


async def test_pipelined_requests_and_bad_request() -> None:
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            ports = await start_backends(nursery, Backend("b"))
            ingress, base = await start_ingress(
                nursery, table_for({("default", "web"): ports}), [web_rule()]
            )
            raw = await raw_exchange(
                base,
                b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /two HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            )
            assert raw.count(b"HTTP/1.1 200") == 2
            assert b'"target": "/one"' in raw and b'"target": "/two"' in raw
            raw = await raw_exchange(base, b"NOT HTTP AT ALL\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 400")
            assert ingress.status()["bad_requests"] == 1
            nursery.cancel_scope.cancel()
