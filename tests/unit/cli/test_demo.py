"""The demo: its report of each replica's page, and how it reaches the agents' API."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2porch.cli import demo
from p2porch.cli.client import TlsFailure
from p2porch.cli.config import ConfigError, dump_config
from p2porch.cli.demo import _page_text, _replica_url

from .tls_fixtures import Pki, make_pki, serving


def test_page_text_shows_message_and_replica_unescaped() -> None:
    page = '<h1 id="message">Tom &amp; Jerry</h1><p><code id="replica">hello-2</code></p>'
    assert _page_text(page) == "Tom & Jerry (hello-2)"


def test_page_text_falls_back_to_the_raw_start() -> None:
    assert _page_text("  not the demo page  ") == "not the demo page"


def test_replica_url_uses_the_reported_host_port() -> None:
    row = {"publishedPorts": {"8080/tcp": "127.0.0.3:32771"}}
    assert _replica_url(row, "127.0.0.3") == "http://127.0.0.3:32771/"
    assert _replica_url({"publishedPorts": {}}, "127.0.0.3") == ""


# --------------------------------------------------------------------------- the API over TLS


def _demo_base(tmp_path: Path, certs: Pki, port: int) -> Path:
    """A demo folder whose n1 wrote its admin credentials, as a real first node does."""
    n1 = tmp_path / "demo" / "n1"
    n1.mkdir(parents=True)
    cert, key = certs.user("admin", "admin")
    (n1 / "ca.pem").write_bytes((certs.root / "ca.pem").read_bytes())
    (n1 / "admin.pem").write_bytes(cert.read_bytes())
    (n1 / "admin.key").write_bytes(key.read_bytes())
    (n1 / "client.yaml").write_text(
        dump_config(f"127.0.0.2:{port}", "c0ffee", "ca.pem", "admin.pem", "admin.key")
    )
    return tmp_path / "demo"


def test_api_client_is_https_with_n1_credentials(tmp_path: Path) -> None:
    base = _demo_base(tmp_path, make_pki(tmp_path), demo.API_PORT)
    with demo.api_client(base, "127.0.0.4") as client:
        assert client.target.base_url == "https://127.0.0.4:7950"
        assert client.target.credentials.cert_file == base / "n1" / "admin.pem"
        assert client.target.credentials.ca_file == base / "n1" / "ca.pem"
    assert f"export P2PORCH_CONFIG={base / 'n1' / 'client.yaml'}" in demo.next_steps(base)


def test_probe_before_n1_wrote_credentials(tmp_path: Path) -> None:
    assert isinstance(demo._probe(tmp_path / "nothing", "127.0.0.2"), ConfigError)


def test_probe_verifies_the_node_with_the_demo_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Healthy only over TLS checked against n1's CA; another cluster's node is a TlsFailure
    (the demo stops there: a leftover agent holds the port)."""
    certs = make_pki(tmp_path)
    with serving(certs.ca) as node:
        monkeypatch.setattr(demo, "API_PORT", node.port)
        base = _demo_base(tmp_path / "a", certs, node.port)
        assert demo._probe(base, "127.0.0.1") is None
    with serving(certs.other_ca) as other:
        monkeypatch.setattr(demo, "API_PORT", other.port)
        assert isinstance(demo._probe(base, "127.0.0.1"), TlsFailure)


def test_replica_url_stays_plain_http() -> None:
    """The app's page is the app's: plain HTTP, whatever the API speaks."""
    row = {"publishedPorts": {"8080": "30080"}}
    assert demo._replica_url(row, "127.0.0.2") == "http://127.0.0.2:30080/"
    listed = {"ports": [{"containerPort": 8080, "hostPort": 30081, "hostIp": "127.0.0.3"}]}
    assert demo._replica_url(listed, "127.0.0.2") == "http://127.0.0.3:30081/"
