"""TLS material and contexts: TLS 1.3 only, peer certificates required, unusable material refused.

(The handshakes themselves run over real sockets in tests/shell/tls.)
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest

from p2porch.common import pki, tls

NOW = pki.utcnow()


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create("homelab", NOW)


def material(ca: pki.CertificateAuthority, name: str, role: str) -> tls.TlsMaterial:
    key = pki.generate_key()
    cert = ca.issue(key.public_key(), name, role, NOW, addresses=("127.0.0.1",))
    return tls.TlsMaterial(pki.cert_pem(ca.cert), pki.cert_pem(cert), pki.key_pem(key))


def test_contexts_are_tls13_only_and_require_a_peer_certificate(
    ca: pki.CertificateAuthority,
) -> None:
    mine = material(ca, "node-a", pki.ROLE_NODE)
    server = mine.server_context()
    assert server.minimum_version is ssl.TLSVersion.TLSv1_3
    assert server.verify_mode is ssl.CERT_REQUIRED
    optional = mine.server_context(client_cert="optional")
    assert optional.verify_mode is ssl.CERT_OPTIONAL
    client = mine.client_context()
    assert client.minimum_version is ssl.TLSVersion.TLSv1_3
    assert client.verify_mode is ssl.CERT_REQUIRED
    assert client.check_hostname
    assert not mine.client_context(check_hostname=False).check_hostname
    # The cluster CA is the only trust anchor (never the system store).
    assert [c["subject"] for c in client.get_ca_certs()] == [
        c["subject"] for c in server.get_ca_certs()
    ]
    assert len(client.get_ca_certs()) == 1


def test_identity_of_the_material(ca: pki.CertificateAuthority) -> None:
    identity = material(ca, "alice", pki.ROLE_VIEWER).identity
    assert identity is not None
    assert (identity.name, identity.role, identity.cluster) == ("alice", "viewer", "homelab")
    assert tls.TlsMaterial(pki.cert_pem(ca.cert)).identity is None


def test_a_bundle_of_two_cas_trusts_both(ca: pki.CertificateAuthority) -> None:
    new_ca = pki.CertificateAuthority.create("homelab", NOW)
    both = tls.TlsMaterial(pki.cert_pem(ca.cert) + pki.cert_pem(new_ca.cert))
    assert len(both.client_context().get_ca_certs()) == 2


def test_unusable_material_is_refused_with_a_reason(ca: pki.CertificateAuthority) -> None:
    good = material(ca, "node-a", pki.ROLE_NODE)
    with pytest.raises(tls.TlsError, match="unusable CA bundle"):
        tls.TlsMaterial(b"not a certificate").client_context()
    with pytest.raises(tls.TlsError, match="without its key"):
        tls.TlsMaterial(good.ca_pem, good.cert_pem).server_context()
    other_key = pki.key_pem(pki.generate_key())
    with pytest.raises(tls.TlsError, match="do not load together"):
        tls.TlsMaterial(good.ca_pem, good.cert_pem, other_key).server_context()
    with pytest.raises(tls.TlsError):
        tls.TlsContexts.build(tls.TlsMaterial(good.ca_pem, good.cert_pem, b"garbage"))


def test_from_files(tmp_path: Path, ca: pki.CertificateAuthority) -> None:
    good = material(ca, "node-a", pki.ROLE_NODE)
    assert good.cert_pem is not None and good.key_pem is not None
    (tmp_path / "ca.pem").write_bytes(good.ca_pem)
    (tmp_path / "a.pem").write_bytes(good.cert_pem)
    (tmp_path / "a.key").write_bytes(good.key_pem)
    loaded = tls.TlsMaterial.from_files(tmp_path / "ca.pem", tmp_path / "a.pem", tmp_path / "a.key")
    assert loaded == good
    assert tls.TlsMaterial.from_files(tmp_path / "ca.pem") == tls.TlsMaterial(good.ca_pem)
    with pytest.raises(tls.TlsError, match="cannot read TLS material"):
        tls.TlsMaterial.from_files(
            tmp_path / "ca.pem", tmp_path / "missing.pem", tmp_path / "a.key"
        )


def test_contexts_replace_swaps_all_three(ca: pki.CertificateAuthority) -> None:
    contexts = tls.TlsContexts.build(material(ca, "node-a", pki.ROLE_NODE))
    before = (contexts.server, contexts.client, contexts.server_optional)
    contexts.replace(material(ca, "node-a", pki.ROLE_NODE))
    after = (contexts.server, contexts.client, contexts.server_optional)
    assert all(old is not new for old, new in zip(before, after, strict=True))
    assert contexts.server_optional.verify_mode is ssl.CERT_OPTIONAL
    assert contexts.server.verify_mode is ssl.CERT_REQUIRED


def identity(role: str, name: str = "x") -> pki.PeerIdentity:
    return pki.PeerIdentity(name, role, "homelab", 1, NOW + dt.timedelta(days=1))


def test_require_role_and_accept_any() -> None:
    nodes_only = tls.require_role(pki.ROLE_NODE)
    assert nodes_only(identity(pki.ROLE_NODE)) is None
    reason = nodes_only(identity(pki.ROLE_VIEWER, "bob"))
    assert reason == "bob has role viewer; needs node"
    staff = tls.require_role(pki.ROLE_ADMIN, pki.ROLE_NODE)
    assert staff(identity(pki.ROLE_ADMIN)) is None
    assert staff(identity(pki.ROLE_VIEWER)) == "x has role viewer; needs admin or node"
    assert tls.accept_any(identity(pki.ROLE_VIEWER)) is None
