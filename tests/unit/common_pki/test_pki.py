"""The cluster PKI: CA, node and user certificates, requests, join tokens, renewal times.

Pure tests (time is passed in as ``NOW``); only key generation draws from the OS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2porch.common import pki
from p2porch.common.errors import P2porchError

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.CertificateAuthority.create("homelab", NOW)


@pytest.fixture(scope="module")
def other_ca() -> pki.CertificateAuthority:
    # Same cluster name on purpose: only the key and the signature tell them apart.
    return pki.CertificateAuthority.create("homelab", NOW)


def node_cert(
    ca: pki.CertificateAuthority, name: str = "node-a", addresses: tuple[str, ...] = ()
) -> x509.Certificate:
    return ca.issue(pki.generate_key().public_key(), name, pki.ROLE_NODE, NOW, addresses=addresses)


def ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def subject_value(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


# --------------------------------------------------------------------------- the CA


def test_new_ca_is_a_self_signed_signing_only_ca(ca: pki.CertificateAuthority) -> None:
    cert = ca.cert
    assert cert.issuer == cert.subject
    assert pki.verify_issued_by(cert, cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0  # it may sign leaves, never another CA
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert not usage.key_encipherment
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert ca.cluster == "homelab"
    assert subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["ca"]
    assert cert.not_valid_before_utc == NOW - pki.BACKDATE
    assert cert.not_valid_after_utc == NOW + pki.CA_LIFETIME


def test_fingerprint_is_sha256_of_der_and_survives_pem_and_reload(
    ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert ca.fingerprint == hashlib.sha256(der).hexdigest()
    assert len(ca.fingerprint) == 64
    assert ca.fingerprint == ca.fingerprint.lower()
    reloaded = pki.CertificateAuthority.load(pki.cert_pem(ca.cert), pki.key_pem(ca.key))
    assert reloaded.fingerprint == ca.fingerprint
    assert pki.fingerprint(pki.load_cert(pki.cert_pem(ca.cert))) == ca.fingerprint
    assert other_ca.fingerprint != ca.fingerprint


def test_ca_load_with_a_mismatched_key_is_refused(
    ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.CertificateAuthority.load(pki.cert_pem(ca.cert), pki.key_pem(other_ca.key))


def test_ca_load_refuses_garbage_and_non_ecdsa_keys(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(pki.PkiError, match="not a PEM certificate"):
        pki.CertificateAuthority.load(b"garbage", pki.key_pem(ca.key))
    with pytest.raises(pki.PkiError, match="not a PEM private key"):
        pki.CertificateAuthority.load(pki.cert_pem(ca.cert), b"garbage")
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(pki.PkiError, match="not an ECDSA key"):
        pki.CertificateAuthority.load(pki.cert_pem(ca.cert), ed_pem)


def test_pki_error_is_part_of_the_error_tree() -> None:
    assert issubclass(pki.PkiError, P2porchError)


def test_bundle_of_old_and_new_ca_loads_both(
    ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    bundle = pki.cert_pem(ca.cert) + pki.cert_pem(other_ca.cert)
    assert [pki.fingerprint(c) for c in pki.load_certs(bundle)] == [
        ca.fingerprint,
        other_ca.fingerprint,
    ]
    with pytest.raises(pki.PkiError, match="bundle"):
        pki.load_certs(b"not pem at all")


# --------------------------------------------------------------------------- issuing


def test_node_certificate_names_the_node_its_addresses_and_both_usages(
    ca: pki.CertificateAuthority,
) -> None:
    cert = node_cert(ca, "node-a", ("127.0.0.2", "::1", "node-a.lan"))
    assert pki.verify_issued_by(cert, ca.cert)
    assert cert.issuer == ca.cert.subject
    assert subject_value(cert, NameOID.COMMON_NAME) == ["node-a"]
    assert subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == [pki.ROLE_NODE]
    assert subject_value(cert, NameOID.ORGANIZATION_NAME) == ["homelab"]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node-a", "node-a.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.2"),
        ipaddress.ip_address("::1"),
    ]
    assert ekus(cert) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_before_utc == NOW - pki.BACKDATE
    assert cert.not_valid_after_utc == NOW + pki.NODE_CERT_LIFETIME


@pytest.mark.parametrize("role", pki.USER_ROLES)
def test_user_certificates_are_client_only_without_sans(
    ca: pki.CertificateAuthority, role: str
) -> None:
    cert = ca.issue(pki.generate_key().public_key(), "alice", role, NOW, addresses=("127.0.0.9",))
    assert ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    identity = pki.identity_of(cert)
    assert (identity.name, identity.role, identity.cluster) == ("alice", role, "homelab")
    assert cert.not_valid_after_utc == NOW + pki.USER_CERT_LIFETIME


def test_identity_of_reads_what_the_certificate_states(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = ca.issue(key.public_key(), "node-b", pki.ROLE_NODE, NOW)
    identity = pki.identity_of(cert)
    assert identity == pki.PeerIdentity(
        name="node-b",
        role=pki.ROLE_NODE,
        cluster="homelab",
        serial=cert.serial_number,
        not_after=NOW + pki.NODE_CERT_LIFETIME,
        key_id=pki.key_id(key.public_key()),
    )


def test_key_id_survives_renewal_with_the_same_key_only(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    first = ca.issue(key.public_key(), "node-b", pki.ROLE_NODE, NOW)
    renewed = ca.issue(key.public_key(), "node-b", pki.ROLE_NODE, NOW + dt.timedelta(days=60))
    rekeyed = node_cert(ca, "node-b")
    assert pki.identity_of(first).key_id == pki.identity_of(renewed).key_id
    assert pki.identity_of(first).serial != pki.identity_of(renewed).serial
    assert pki.identity_of(rekeyed).key_id != pki.identity_of(first).key_id
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert pki.key_id(key.public_key()) == hashlib.sha256(spki).hexdigest()
    with pytest.raises(pki.PkiError, match="only ECDSA"):
        pki.key_id(ed25519.Ed25519PrivateKey.generate().public_key())


def test_lifetime_is_capped_by_the_cas(ca: pki.CertificateAuthority) -> None:
    ca_end = ca.cert.not_valid_after_utc
    late = ca_end - dt.timedelta(days=10)
    cert = ca.issue(pki.generate_key().public_key(), "node-z", pki.ROLE_NODE, late)
    assert cert.not_valid_after_utc == ca_end
    explicit = ca.issue(
        pki.generate_key().public_key(),
        "node-y",
        pki.ROLE_NODE,
        NOW,
        lifetime=dt.timedelta(days=30 * 365),
    )
    assert explicit.not_valid_after_utc == ca_end
    short = ca.issue(
        pki.generate_key().public_key(), "node-x", pki.ROLE_NODE, NOW, lifetime=dt.timedelta(1)
    )
    assert short.not_valid_after_utc == NOW + dt.timedelta(days=1)


def test_issue_refuses_unknown_roles_bad_names_and_non_ecdsa_keys(
    ca: pki.CertificateAuthority,
) -> None:
    key = pki.generate_key().public_key()
    with pytest.raises(pki.PkiError, match="unknown role 'root'"):
        ca.issue(key, "node-a", "root", NOW)
    with pytest.raises(pki.PkiError, match="unknown role 'ca'"):
        ca.issue(key, "node-a", "ca", NOW)
    for bad in ("", "-leading-dash", "has space", "a" * 64, "slash/name", "ünïcode"):
        with pytest.raises(pki.PkiError, match="invalid name"):
            ca.issue(key, bad, pki.ROLE_NODE, NOW)
    ed_key = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(pki.PkiError, match="only ECDSA"):
        ca.issue(ed_key, "node-a", pki.ROLE_NODE, NOW)  # type: ignore[arg-type]


def test_serials_differ_between_certificates(ca: pki.CertificateAuthority) -> None:
    serials = {node_cert(ca, f"n{i}").serial_number for i in range(5)}
    assert len(serials) == 5


def test_verify_issued_by_tells_our_ca_from_another(
    ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    ours = node_cert(ca)
    foreign = node_cert(other_ca)
    assert pki.verify_issued_by(ours, ca.cert)
    assert not pki.verify_issued_by(foreign, ca.cert)
    assert not pki.verify_issued_by(ours, other_ca.cert)
    # Same subject, same names: identity_of alone cannot tell them apart -- the chain check can.
    assert pki.identity_of(foreign).cluster == pki.identity_of(ours).cluster


# --------------------------------------------------------------------------- requests


def test_request_is_signed_with_name_from_request_and_role_from_caller(
    ca: pki.CertificateAuthority,
) -> None:
    key = pki.generate_key()
    csr = pki.make_request(key, "joiner-1")
    cert = ca.sign_request(csr, pki.ROLE_NODE, NOW, addresses=("127.0.0.5",))
    assert pki.verify_issued_by(cert, ca.cert)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    identity = pki.identity_of(cert)
    assert (identity.name, identity.role) == ("joiner-1", pki.ROLE_NODE)
    assert pki.covers_addresses(cert, ("127.0.0.5", "joiner-1"))


def _request_with_subject(
    key: ec.EllipticCurvePrivateKey, attributes: list[x509.NameAttribute[str]]
) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attributes))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_request_never_chooses_its_role_cluster_or_ca_powers(
    ca: pki.CertificateAuthority,
) -> None:
    # A joiner asks to be an admin of another cluster, and a CA: it gets a node certificate.
    csr = _request_with_subject(
        pki.generate_key(),
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pki.ROLE_ADMIN),
            x509.NameAttribute(NameOID.COMMON_NAME, "sneaky"),
        ],
    )
    cert = ca.sign_request(csr, pki.ROLE_NODE, NOW)
    identity = pki.identity_of(cert)
    assert (identity.name, identity.role, identity.cluster) == ("sneaky", pki.ROLE_NODE, "homelab")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_request_with_a_bad_signature_is_refused(ca: pki.CertificateAuthority) -> None:
    # Rename the request after it was signed (same length, so it still parses): the
    # signature no longer covers what the request says.
    der = x509.load_pem_x509_csr(pki.make_request(pki.generate_key(), "alice")).public_bytes(
        serialization.Encoding.DER
    )
    assert der.count(b"alice") == 1
    forged = x509.load_der_x509_csr(der.replace(b"alice", b"admin"))
    assert not forged.is_signature_valid
    with pytest.raises(pki.PkiError, match="signature is invalid"):
        ca.sign_request(forged.public_bytes(serialization.Encoding.PEM), pki.ROLE_VIEWER, NOW)


def test_request_refused_when_unreadable_nameless_or_not_ecdsa(
    ca: pki.CertificateAuthority,
) -> None:
    with pytest.raises(pki.PkiError, match="not a PEM certificate request"):
        ca.sign_request(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", pki.ROLE_NODE, NOW)
    two_cns = _request_with_subject(
        pki.generate_key(),
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "a"),
            x509.NameAttribute(NameOID.COMMON_NAME, "b"),
        ],
    )
    with pytest.raises(pki.PkiError, match="exactly one CN"):
        ca.sign_request(two_cns, pki.ROLE_NODE, NOW)
    no_cn = _request_with_subject(
        pki.generate_key(), [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]
    )
    with pytest.raises(pki.PkiError, match="exactly one CN"):
        ca.sign_request(no_cn, pki.ROLE_NODE, NOW)
    ed = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")]))
        .sign(ed25519.Ed25519PrivateKey.generate(), None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(pki.PkiError, match="only ECDSA"):
        ca.sign_request(ed, pki.ROLE_NODE, NOW)
    bad_name = _request_with_subject(
        pki.generate_key(), [x509.NameAttribute(NameOID.COMMON_NAME, "../etc")]
    )
    with pytest.raises(pki.PkiError, match="invalid name"):
        ca.sign_request(bad_name, pki.ROLE_NODE, NOW)


def test_make_request_checks_the_name() -> None:
    with pytest.raises(pki.PkiError, match="invalid name"):
        pki.make_request(pki.generate_key(), "bad name")


# --------------------------------------------------------------------------- identity_of


def _foreign_cert(attributes: list[x509.NameAttribute[str]]) -> x509.Certificate:
    """A certificate made by someone else's tooling (a web server's, say)."""
    key = pki.generate_key()
    name = x509.Name(attributes)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_identity_of_refuses_certificates_that_do_not_state_one() -> None:
    cn = x509.NameAttribute(NameOID.COMMON_NAME, "www.example.org")
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "homelab")
    with pytest.raises(pki.PkiError, match=r"0 organizationalUnitName entries"):
        pki.identity_of(_foreign_cert([cn]))
    with pytest.raises(pki.PkiError, match="unknown role 'web'"):
        pki.identity_of(
            _foreign_cert([org, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "web"), cn])
        )
    two_roles = [
        org,
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pki.ROLE_VIEWER),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pki.ROLE_ADMIN),
        cn,
    ]
    with pytest.raises(pki.PkiError, match="2 organizationalUnitName entries"):
        pki.identity_of(_foreign_cert(two_roles))
    no_org = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, pki.ROLE_NODE), cn]
    with pytest.raises(pki.PkiError, match="0 organizationName entries"):
        pki.identity_of(_foreign_cert(no_org))


# --------------------------------------------------------------------------- tokens


def test_token_format_and_parse_round_trip(ca: pki.CertificateAuthority) -> None:
    token = pki.JoinToken.new(ca.fingerprint)
    text = str(token)
    assert text == f"P2P-1-{ca.fingerprint}-{token.secret}"
    assert len(token.secret) == 32
    assert pki.JoinToken.parse(text) == token
    assert pki.JoinToken.parse(f"  {text}\n") == token  # pasted with a newline
    assert pki.JoinToken.new(ca.fingerprint).secret != token.secret


def test_token_parse_accepts_the_documented_secret_lengths() -> None:
    fp = "ab" * 32
    assert pki.JoinToken.parse(f"P2P-1-{fp}-{'0' * 32}").secret == "0" * 32
    assert pki.JoinToken.parse(f"P2P-1-{fp}-{'f' * 128}").secret == "f" * 128


FP = "0123456789abcdef" * 4
SECRET = "5ec7e7" + "a" * 26


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "must start with P2P-1-"),
        (f"SWMTKN-1-{FP}-{SECRET}", "must start with P2P-1-"),
        (f"p2p-1-{FP}-{SECRET}", "must start with P2P-1-"),
        (f"P2P-2-{FP}-{SECRET}", "unsupported token version"),
        (f"P2P-1-{FP[:-1]}-{SECRET}", "64 lower-case hex digits, not 63 characters"),
        (f"P2P-1-{FP}0-{SECRET}", "64 lower-case hex digits, not 65 characters"),
        (f"P2P-1-{FP.upper()}-{SECRET}", r"fingerprint must be 64 lower-case hex digits;"),
        (f"P2P-1-{FP[:-1]}g-{SECRET}", r"fingerprint must be 64 lower-case hex digits;"),
        (f"P2P-1--{SECRET}", "64 lower-case hex digits, not 0 characters"),
        (f"P2P-1-{FP}", "secret must be 32 to 128"),
        (f"P2P-1-{FP}-", "secret must be 32 to 128"),
        (f"P2P-1-{FP}-{SECRET[:-1]}", "secret must be 32 to 128"),
        (f"P2P-1-{FP}-{'a' * 129}", "secret must be 32 to 128"),
        (f"P2P-1-{FP}-{SECRET}-extra", "secret must be 32 to 128"),
        (f"P2P-1-{FP}-{SECRET.upper()}", "secret must be 32 to 128"),
        (f"P2P-1-{FP} {SECRET}", "64 lower-case hex digits, not 97 characters"),
    ],
)
def test_malformed_tokens_say_which_part_is_wrong(text: str, why: str) -> None:
    with pytest.raises(pki.PkiError, match="malformed join token") as caught:
        pki.JoinToken.parse(text)
    assert caught.match(why)
    # The message points at the fix, and never repeats a secret (it may end up in a log).
    assert "p2porch token" in str(caught.value)
    assert "5ec7e7" not in str(caught.value).lower()


def test_secret_digest_is_sha256_hex_and_not_the_secret() -> None:
    digest = pki.secret_digest(SECRET)
    assert digest == hashlib.sha256(SECRET.encode()).hexdigest()
    assert SECRET not in digest


# --------------------------------------------------------------------------- renewal


def test_renew_at_falls_in_the_window_and_follows_the_seed(ca: pki.CertificateAuthority) -> None:
    cert = node_cert(ca)
    start = cert.not_valid_before_utc
    life = cert.not_valid_after_utc - start
    earliest, latest = start + life * 0.5, start + life * 0.8
    times = [pki.renew_at(cert, random.Random(seed)) for seed in range(200)]
    assert all(earliest <= t <= latest for t in times)
    # Spread over the window (what keeps a cluster's nodes from renewing at once).
    assert min(times) < start + life * 0.55
    assert max(times) > start + life * 0.75
    assert pki.renew_at(cert, random.Random(42)) == pki.renew_at(cert, random.Random(42))
    assert pki.renew_at(cert, random.Random(1)) != pki.renew_at(cert, random.Random(2))


def test_renew_at_is_well_before_expiry_for_a_node_certificate(
    ca: pki.CertificateAuthority,
) -> None:
    cert = node_cert(ca)
    at = pki.renew_at(cert, random.Random(7))
    assert cert.not_valid_after_utc - at >= dt.timedelta(days=17)  # >= 20% of 90 days
    assert at - NOW >= dt.timedelta(days=44)  # >= 50% of 90 days (minus the backdating)


# --------------------------------------------------------------------------- addresses


def test_covers_addresses(ca: pki.CertificateAuthority) -> None:
    cert = node_cert(ca, "node-a", ("127.0.0.2", "fd00::2", "node-a.lan"))
    assert pki.covers_addresses(cert, ())
    assert pki.covers_addresses(cert, ("127.0.0.2",))
    assert pki.covers_addresses(cert, ("127.0.0.2", "node-a", "node-a.lan", "fd00::2"))
    assert pki.covers_addresses(cert, ("fd00:0:0::2",))  # the same IPv6 address, spelt longer
    assert not pki.covers_addresses(cert, ("127.0.0.3",))
    assert not pki.covers_addresses(cert, ("127.0.0.2", "127.0.0.3"))
    assert not pki.covers_addresses(cert, ("node-b",))
    # An IP written as a DNS name does not count as that IP, nor the reverse.
    assert not pki.covers_addresses(cert, ("127.0.0.2.lan",))


def test_user_certificates_cover_no_address(ca: pki.CertificateAuthority) -> None:
    cert = ca.issue(pki.generate_key().public_key(), "alice", pki.ROLE_ADMIN, NOW)
    assert not pki.covers_addresses(cert, ("127.0.0.2",))
    assert not pki.covers_addresses(cert, ())


def test_utcnow_is_timezone_aware() -> None:
    assert pki.utcnow().tzinfo is not None
