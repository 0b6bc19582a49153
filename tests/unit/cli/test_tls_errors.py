"""What the CLI says when TLS or authorization fails, against a real TLS 1.3 server.

Each case is one a user meets: no credentials at all, the credentials of another cluster (we
refuse its node, or it refuses our certificate), an expired client certificate, an address
the node's certificate does not name, a config with a CA but no certificate (401), a viewer
writing (403). The loopback server (tls_fixtures.py) makes ssl raise its real errors; a mock
transport covers the node closing the connection before its alert arrives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from p2porch.cli.client import ApiClient, ApiError, TlsFailure, Unreachable
from p2porch.cli.config import Credentials, Target, target_from_config
from p2porch.cli.main import Runtime, cli

from .tls_fixtures import Pki, TlsServer, make_pki, serving


@pytest.fixture
def certs(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
def node(certs: Pki) -> Iterator[TlsServer]:
    with serving(certs.ca) as server:
        yield server


def _cli(config: Path | None, *args: str, home: Path) -> Result:
    """``p2porch ARGS`` in-process with the real transport (loopback TLS)."""
    env = {"P2PORCH_NODE": None, "P2PORCH_CONFIG": str(config) if config else None}
    runtime = Runtime(home=home, request_timeout_s=10.0)
    return CliRunner().invoke(cli, list(args), obj=runtime, env=env, catch_exceptions=False)


def _client(config: Path, node: str | None = None) -> ApiClient:
    return ApiClient(target_from_config(config, node=node), timeout_s=10.0)


def test_admin_credentials_work_over_mutual_tls(certs: Pki, node: TlsServer) -> None:
    """The control case: the credentials a node writes get through, identified by name."""
    certs.user("admin", "admin")
    config = certs.config("client.yaml", node.address, cert="admin.pem", key="admin.key")
    with _client(config) as client:
        assert client.status() == {"ok": True, "user": "admin"}
        assert client.put_secret("default", "db", {"k": b"v"})["user"] == "admin"


def test_no_credentials_names_the_client_yaml_to_use(
    certs: Pki, node: TlsServer, tmp_path: Path
) -> None:
    target = Target(f"https://{node.address}", "--node")
    with ApiClient(target, timeout_s=10.0) as client, pytest.raises(TlsFailure) as caught:
        client.healthz()
    message = caught.value.full_text
    assert f"cannot verify node {node.address}" in message
    assert "no client.yaml is in use" in message
    assert "P2PORCH_CONFIG=DATA_DIR/client.yaml" in message
    # the same through the command, with where the node came from
    result = _cli(None, "--node", node.address, "get", "nodes", home=tmp_path / "home")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: cannot verify node {node.address}: this CLI has no")
    assert lines[1] == (
        "  no client.yaml is in use (P2PORCH_CONFIG is not set and "
        "~/.config/p2porch/client.yaml does not exist)"
    )
    assert "P2PORCH_CONFIG=DATA_DIR/client.yaml" in lines[2]
    assert lines[3].startswith("  (node chosen by --node")


def test_node_of_another_cluster_is_refused(certs: Pki, tmp_path: Path) -> None:
    """Our CA file is cluster c0ffee's; the node at the address belongs to another cluster."""
    certs.user("admin", "admin")
    config = certs.config("client.yaml", "127.0.0.1", cert="admin.pem", key="admin.key")
    with serving(certs.other_ca) as other:
        with _client(config, node=other.address) as client, pytest.raises(TlsFailure) as caught:
            client.nodes()
        message = caught.value.full_text
        assert f"refused node {other.address}" in message
        assert f"not issued by the cluster CA in {certs.root / 'ca.pem'}" in message
        assert "another cluster" in message and f"credentials from {config}" in message


def test_expired_client_certificate(certs: Pki, node: TlsServer) -> None:
    certs.user("bob", "admin", expired=True)
    config = certs.config("client.yaml", node.address, cert="bob.pem", key="bob.key")
    with _client(config) as client, pytest.raises(TlsFailure) as caught:
        client.nodes()
    message = caught.value.full_text
    # Whether the node's alert or only a closed connection reached us, the message is ours.
    assert f"node {node.address}" in message
    assert f"{certs.root / 'bob.pem'} (user bob, role admin) expired on" in message
    assert caught.value.hints == (
        "ask an admin of the cluster for new credentials: p2porch user create bob --role admin",
    )


def test_client_certificate_of_another_cluster(certs: Pki, node: TlsServer) -> None:
    certs.user("eve", "admin", ca=certs.other_ca)
    config = certs.config("client.yaml", node.address, cert="eve.pem", key="eve.key")
    with _client(config) as client, pytest.raises(TlsFailure) as caught:
        client.nodes()
    message = caught.value.full_text
    assert f"node {node.address}" in message
    assert "(user eve, role admin) was not issued by the cluster CA in" in message
    assert "belongs to another cluster" in message
    assert "P2PORCH_CONFIG=DATA_DIR/client.yaml" in message
    assert node.refused_a_connection(), "the node itself refused the certificate"
    assert "unable to get local issuer certificate" in node.handshake_errors[0]


def test_address_the_node_certificate_does_not_name(certs: Pki) -> None:
    """A node certificate names the address the node advertises; another one is refused."""
    certs.user("admin", "admin")
    config = certs.config("client.yaml", "127.0.0.1", cert="admin.pem", key="admin.key")
    with serving(certs.ca, address="127.0.0.9") as other:
        with _client(config, node=other.address) as client, pytest.raises(TlsFailure) as caught:
            client.nodes()
        message = caught.value.full_text
        assert "is not valid for the address '127.0.0.1'" in message
        assert "get nodes -o wide" in message


def test_unauthenticated_says_which_client_yaml_lacks_a_certificate(
    certs: Pki, node: TlsServer, tmp_path: Path
) -> None:
    config = certs.config("ca-only.yaml", node.address)
    result = _cli(config, "get", "nodes", home=tmp_path / "home")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: unauthenticated: this endpoint needs a certificate"
    assert lines[1] == f"  this CLI presented no client certificate: {config} names no certFile"
    assert "P2PORCH_CONFIG=DATA_DIR/client.yaml" in lines[2]


def test_viewer_writing_is_told_its_role(certs: Pki, node: TlsServer, tmp_path: Path) -> None:
    certs.user("val", "viewer")
    config = certs.config("client.yaml", node.address, cert="val.pem", key="val.key")
    reading = _cli(config, "status", "-o", "json", home=tmp_path / "home")
    assert reading.exit_code == 0 and '"user": "val"' in reading.stdout
    result = _cli(config, "scale", "hello=3", home=tmp_path / "home")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: forbidden: user val has role viewer")
    assert lines[1].startswith(
        f"  {certs.root / 'val.pem'} (user val, role viewer): a viewer reads"
    )
    assert "p2porch user create NAME --role admin" in lines[2]


# --------------------------------------------------------------------------- without a server


def _mock_client(
    credentials: Credentials, error: httpx.HTTPError, base_url: str = "https://127.0.0.2:7950"
) -> ApiClient:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    target = Target(base_url, "--node", credentials=credentials, config_path=Path("/c.yaml"))
    return ApiClient(target, transport=httpx.MockTransport(fail))


def test_connection_closed_with_an_expired_certificate_is_explained(certs: Pki) -> None:
    """The node's alert can be overtaken by a reset: our own check still finds the cause."""
    cert, key = certs.user("bob", "viewer", expired=True)
    creds = Credentials(certs.root / "ca.pem", cert, key)
    lost = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    with _mock_client(creds, lost) as client, pytest.raises(TlsFailure) as caught:
        client.nodes()
    assert caught.value.message.startswith(
        f"node 127.0.0.2:7950 closed the connection: {cert} (user bob, role viewer) expired on"
    )
    assert "p2porch user create bob --role viewer" in caught.value.hints[0]


def test_connection_closed_with_good_credentials_stays_unreachable(certs: Pki) -> None:
    cert, key = certs.user("admin", "admin")
    creds = Credentials(certs.root / "ca.pem", cert, key)
    lost = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    with _mock_client(creds, lost) as client, pytest.raises(Unreachable) as caught:
        client.nodes()
    # nothing wrong locally, but a CA rotated away would look just like this
    assert str(caught.value) == (
        "cannot reach node 127.0.0.2:7950: Server disconnected without sending a response. "
        f"(if this persists, the node may refuse {cert} (user admin, role admin): e.g. after "
        "a CA rotation, ask for new credentials)"
    )
    with (
        _mock_client(creds, lost, base_url="http://127.0.0.2:7950") as client,
        pytest.raises(Unreachable) as caught,
    ):
        client.nodes()
    assert "the p2porch API speaks HTTPS only: drop http:// from the address" in str(caught.value)


def test_unknown_tls_failure_keeps_the_ssl_text() -> None:
    import ssl

    cause = ssl.SSLError(1, "something odd")
    error = httpx.ConnectError("something odd")
    error.__cause__ = cause
    with _mock_client(Credentials(), error) as client, pytest.raises(TlsFailure) as caught:
        client.nodes()
    assert caught.value.message.startswith("TLS with node 127.0.0.2:7950 failed:")


def test_forbidden_for_an_admin_gets_no_viewer_hint(certs: Pki) -> None:
    """A 403 for a node-only endpoint is not about roles: no misleading advice."""
    cert, key = certs.user("admin", "admin")
    target = Target(
        "https://127.0.0.2:7950",
        "--node",
        credentials=Credentials(certs.root / "ca.pem", cert, key),
    )
    body = {"error": {"code": "forbidden", "message": "/v1/internal/x is for nodes only"}}
    transport = httpx.MockTransport(lambda _r: httpx.Response(403, json=body))
    with ApiClient(target, transport=transport) as client, pytest.raises(ApiError) as caught:
        client.request("GET", "/v1/internal/x")
    assert caught.value.details == ()
