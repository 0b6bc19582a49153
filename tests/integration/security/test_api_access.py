"""Who may call the API: nobody without a certificate (three open endpoints aside), viewers
read and never write, another cluster's certificates fail the TLS handshake; hostile bytes and
slow clients on the API port cost their sender, never the other clients.

Every endpoint is taken from the API's own router, so a route added later is covered too; the
expectations are this suite's own table, not the product's ``required_role``.
"""

from __future__ import annotations

import concurrent.futures
import re
import secrets
import select
import socket
import ssl
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from p2porch.node.api import Api
from tests.integration.cluster.harness import API_PORT, Node
from tests.integration.security.kit import (
    OPEN_ENDPOINTS,
    ControlPlaneCluster,
    admin_pair,
    assert_unharmed,
    client_hello,
    connect,
    counted,
    counters,
    make_user,
    namespace_names,
    node_pair,
    random_name,
    read_until_closed,
    refused_after_handshake,
    request_as,
    ssl_context,
    tls_connect,
)

pytestmark = pytest.mark.slow

_CAPTURE = re.compile(r"\(\?P<\w+>\[\^/\]\+\)")


def routes() -> list[tuple[str, str]]:
    """Every (method, concrete path) the API serves; path parameters become ``h6x``."""
    api = Api(SimpleNamespace(security=None))  # type: ignore[arg-type]
    found = [
        (method, _CAPTURE.sub("h6x", regex.pattern)[1:-1])
        for method, regex, _handler in api.router._routes
    ]
    assert len(found) >= 30, found  # the enumeration itself works
    return found


NODE_ONLY = ("/v1/internal/", "/v1/local/")
ADMIN_READS = {"/v1/token"}


def viewer_may(method: str, path: str) -> bool:
    return method == "GET" and path not in ADMIN_READS and not path.startswith(NODE_ONLY)


def test_routes_cover_the_documented_surface() -> None:
    table = routes()
    for needed in (
        ("GET", "/healthz"),
        ("POST", "/v1/join"),
        ("POST", "/v1/users"),
        ("POST", "/v1/keys/rotate"),
        ("PUT", "/v1/secrets/h6x/h6x"),
        ("POST", "/v1/internal/propose"),
    ):
        assert needed in table


def test_no_certificate_means_401_everywhere_but_the_open_endpoints(
    main: ControlPlaneCluster,
) -> None:
    node = main.nodes[1]
    client = httpx.Client(verify=ssl_context(node.data_dir / "ca.pem"), timeout=20)
    unknown = [("GET", "/"), ("GET", "/v1/nope"), ("POST", "/v1/internal/nope"), ("GET", "/v1")]
    with client:
        for method, path in [*routes(), *unknown]:
            resp = client.request(method, f"{node.api}{path}", json={})
            where = f"{method} {path}: {resp.status_code} {resp.text}"
            if (method, path) in OPEN_ENDPOINTS:
                assert resp.status_code != 401 and resp.status_code < 500, where
                continue
            assert resp.status_code == 401, where
            assert resp.json()["error"]["code"] == "unauthenticated", where
        ca = client.get(f"{node.api}/v1/ca").json()
        assert ca["ca"] == (node.data_dir / "ca.pem").read_text()
        assert client.get(f"{node.api}/healthz").json() == {"ok": True}
    assert_unharmed(main)


def test_viewer_reads_and_never_writes(main: ControlPlaneCluster, tmp_path: Path) -> None:
    viewer = make_user(main.nodes[0], random_name("viewer"), "viewer", tmp_path)
    # Through a follower (writes would be forwarded) and through the leader.
    leader = main.leader()
    follower = next(n for n in main.nodes if n is not leader)
    token = leader.get("/v1/token")["token"]
    namespaces = namespace_names(leader)
    for node in (follower, leader):
        client = httpx.Client(verify=ssl_context(node.data_dir / "ca.pem", *viewer), timeout=20)
        with client:
            for method, path in routes():
                if (method, path) in OPEN_ENDPOINTS:
                    continue
                # Reads that would stream forever are asked for once, not followed.
                resp = client.request(method, f"{node.api}{path}", json={})
                where = f"{node.name} {method} {path}: {resp.status_code} {resp.text}"
                if viewer_may(method, path):
                    assert resp.status_code not in (401, 403), where
                    assert resp.status_code < 500, where
                else:
                    assert resp.status_code == 403, where
                    assert resp.json()["error"]["code"] == "forbidden", where
    # Nothing moved: the token, the namespaces, every member still there and alive.
    assert leader.get("/v1/token")["token"] == token
    assert namespace_names(leader) == namespaces
    assert_unharmed(main)


def test_admins_cannot_call_node_only_endpoints(main: ControlPlaneCluster) -> None:
    node = main.nodes[2]
    for method, path in routes():
        if path.startswith(NODE_ONLY):
            resp = request_as(node, method, path, admin_pair(node), content=b"\x00")
            assert resp.status_code == 403, (method, path, resp.text)
    # The control: the node's own certificate may.
    resp = request_as(node, "GET", "/v1/internal/keyring", node_pair(node))
    assert resp.status_code == 200, resp.text


def test_certificates_of_another_cluster_fail_the_handshake(
    main: ControlPlaneCluster, foreign: ControlPlaneCluster
) -> None:
    node = main.nodes[0]
    other = foreign.nodes[0]
    before = counters(node)
    for pair in (admin_pair(other), node_pair(other)):
        context = ssl_context(node.data_dir / "ca.pem", *pair)
        for path in ("/healthz", "/v1/status", "/v1/join"):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{node.api}{path}", verify=context, timeout=20)
        # At the socket: the server's alert (or a cut) before any answer.
        assert refused_after_handshake(
            node.host, API_PORT, context, b"GET /healthz HTTP/1.1\r\n\r\n"
        )
    counted(node, before, api__tls_refused=8)
    # And the other way round: our admin certificate means nothing to the other cluster.
    with pytest.raises(httpx.TransportError):
        httpx.get(
            f"{other.api}/v1/status",
            verify=ssl_context(other.data_dir / "ca.pem", *admin_pair(node)),
            timeout=20,
        )
    assert_unharmed(main)


def test_hostile_bytes_on_the_api_port(main: ControlPlaneCluster) -> None:
    node = main.nodes[3]
    context = ssl_context(node.data_dir / "ca.pem")
    # Plain HTTP on the TLS port: no answer in clear, the connection is dropped.
    with connect(node.host, API_PORT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b"HTTP/1.1" not in read_until_closed(sock, 30)
    # Random bytes, no TLS.
    with connect(node.host, API_PORT) as sock:
        sock.sendall(secrets.token_bytes(4096))
        read_until_closed(sock, 30)

    def answer(raw: bytes) -> bytes:
        """Send ``raw`` in pieces, stopping as soon as the server answers (it may refuse
        before it has read everything: sending on would only meet a reset)."""
        with tls_connect(node.host, API_PORT, context) as tls:
            for start in range(0, len(raw), 16384):
                readable, _, _ = select.select([tls], [], [], 0.05)
                if readable or tls.pending():
                    break
                try:
                    tls.sendall(raw[start : start + 16384])
                except (ssl.SSLError, OSError):
                    break
            return read_until_closed(tls, 30)

    cases = {
        b"\x00\xff garbage \r\n\r\n": b"HTTP/1.1 400",
        (
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: "
            + b"a" * 200_000
            + b"\r\n\r\n"
        ): b"HTTP/1.1 431",
        b"POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n": b"HTTP/1.1 413",
        b"POST /v1/join HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n": b"HTTP/1.1 400",
        b"POST /v1/join HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n": (
            b"HTTP/1.1 400"
        ),
    }
    before = counters(node)
    for raw, expected in cases.items():
        got = answer(raw)
        assert got.startswith(expected), (raw[:60], got[:200])
        assert b'"error"' in got, got[:200]
    counted(node, before, api__bad_requests=len(cases))
    assert_unharmed(main)


def _trickle(node: Node, tls: bool, seconds: int) -> bytes:
    """Open one connection and send one byte a second (a ClientHello raw, or an HTTP request
    head inside TLS) until the server hangs up or ``seconds`` pass; what it answered."""
    sock: socket.socket
    if tls:
        context = ssl_context(node.data_dir / "ca.pem")
        sock = tls_connect(node.host, API_PORT, context, timeout_s=30)
        payload = b"GET /v1/status HTTP/1.1\r\nhost: x\r\n" + b"x-slow: y\r\n" * 20
    else:
        sock = connect(node.host, API_PORT)
        payload = client_hello()
    received = bytearray()
    with sock:
        for i in range(seconds):
            try:
                sock.sendall(payload[i : i + 1])
            except (OSError, ssl.SSLError):
                return bytes(received)
            sock.settimeout(1.0)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (ssl.SSLError, ConnectionError):
                return bytes(received)
            if not chunk:
                return bytes(received)
            received += chunk
    raise AssertionError(f"the API still listens to a client trickling 1 byte/s after {seconds} s")


def test_slow_clients_do_not_starve_the_others(main: ControlPlaneCluster) -> None:
    """50 connections sending one byte a second (25 mid TLS handshake, 25 mid request head)
    while another client's requests keep succeeding; the server cuts every slow one."""
    node = main.nodes[4]
    before = counters(node)
    ok = failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        slow = [pool.submit(_trickle, node, i % 2 == 1, 40) for i in range(50)]
        while not all(f.done() for f in slow):
            try:
                resp = node.request("GET", "/v1/status", timeout=10)
                ok += resp.status_code == 200
                failed += resp.status_code != 200
            except httpx.HTTPError:
                failed += 1
            time.sleep(0.25)
        answers = [f.result() for f in slow]
    assert failed == 0 and ok >= 3, (ok, failed)
    # Those that got as far as a request head were told why (408); the others were cut.
    timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) == 25, [a[:40] for a in answers]
    counted(node, before, api__timeouts=25, api__tls_refused=25)
    assert_unharmed(main)
