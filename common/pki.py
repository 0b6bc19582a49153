"""The cluster's public-key infrastructure: its CA, node and user certificates, join tokens.

Why a CA of our own (as Swarm does) rather than pre-shared keys: every TCP connection is
mutual TLS, so a node proves who it is (its name, its role) with a certificate any peer can
check offline, a removed node can be refused by name, and users get credentials of their own
(admin or viewer) without a password database.

What a certificate says (read by :func:`identity_of`):

- subject ``CN`` = the node or user name, ``OU`` = the role (``node``, ``admin``, ``viewer``),
  ``O`` = the cluster id;
- node certificates carry SANs for the node's addresses (IP) and its name (DNS), and both
  server and client auth; user certificates are client-only.

Join tokens are ``P2P-1-<CA fingerprint>-<secret>``: the fingerprint is the SHA-256 of the CA
certificate (DER, lower-case hex), so a joiner pins the CA before it sends the secret -- no trust
on first use, and a man in the middle with another CA is detected before it learns anything.

Pure: time arrives as ``now``, randomness from the caller where a choice is made. Only key
generation draws from the OS (as it must).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import random
import re
import secrets

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2porch.common.errors import P2porchError

ROLE_NODE = "node"
ROLE_ADMIN = "admin"
ROLE_VIEWER = "viewer"
ROLES = (ROLE_NODE, ROLE_ADMIN, ROLE_VIEWER)
USER_ROLES = (ROLE_ADMIN, ROLE_VIEWER)

CA_LIFETIME = dt.timedelta(days=20 * 365)
# Swarm's choice: short-lived node certificates, renewed automatically at a random 50-80% of
# their life so a cluster's nodes do not all renew at once.
NODE_CERT_LIFETIME = dt.timedelta(days=90)
USER_CERT_LIFETIME = dt.timedelta(days=365)
RENEW_WINDOW = (0.5, 0.8)
# Certificates start a little in the past: a peer whose clock is slightly behind still
# accepts a certificate issued a moment ago.
BACKDATE = dt.timedelta(minutes=5)

TOKEN_PREFIX = "P2P-1-"
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_SECRET_RE = re.compile(r"[0-9a-f]{32,128}")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class PkiError(P2porchError):
    """A certificate, key, request or token that cannot be used (the message says why)."""


@attrs.frozen
class PeerIdentity:
    """Who a verified certificate says its holder is."""

    name: str
    role: str
    cluster: str
    serial: int
    not_after: dt.datetime
    # SHA-256 of the certificate's public key (DER SubjectPublicKeyInfo), see :func:`key_id`.
    key_id: str = ""


# --------------------------------------------------------------------------- keys and PEM


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key (small, fast on a Raspberry Pi, universally supported by TLS 1.3)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the private key is not an ECDSA key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc


def load_certs(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (a CA file may hold the old and the new CA)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate bundle: {exc}") from exc
    return certs


def key_id(public_key: object) -> str:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo: stable across renewals (same key)."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PkiError("only ECDSA public keys are accepted")
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lower-case hex: what a join token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --------------------------------------------------------------------------- tokens


@attrs.frozen
class JoinToken:
    ca_fingerprint: str
    secret: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}{self.ca_fingerprint}-{self.secret}"

    @classmethod
    def new(cls, ca_fingerprint: str) -> JoinToken:
        return cls(ca_fingerprint, secrets.token_hex(16))

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Read a pasted token; the error names the part that is wrong (never echoes it: the
        secret must not land in a log)."""
        token = text.strip()
        fingerprint_, sep, secret = token.removeprefix(TOKEN_PREFIX).partition("-")
        if not token.startswith(TOKEN_PREFIX):
            why = (
                "unsupported token version (this build reads P2P-1- tokens)"
                if token.startswith("P2P-")
                else f"it must start with {TOKEN_PREFIX}"
            )
        elif not _FINGERPRINT_RE.fullmatch(fingerprint_):
            why = "the CA fingerprint must be 64 lower-case hex digits" + (
                f", not {len(fingerprint_)} characters" if len(fingerprint_) != 64 else ""
            )
        elif not sep or not _SECRET_RE.fullmatch(secret):
            why = "the secret must be 32 to 128 lower-case hex digits"
        else:
            return cls(fingerprint_, secret)
        raise PkiError(
            f"malformed join token: {why}; expected P2P-1-<CA fingerprint>-<secret> "
            "(print a valid one on any member with: p2porch token)"
        )


def secret_digest(secret: str) -> str:
    """What the cluster stores of a join secret (never the secret itself in clear)."""
    return hashlib.sha256(secret.encode()).hexdigest()


# --------------------------------------------------------------------------- the CA


def _name(common_name: str, role: str, cluster: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise PkiError(
            f"invalid name {name!r}: 1-63 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


@attrs.frozen
class CertificateAuthority:
    """The cluster CA: its certificate and signing key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, cluster: str, now: dt.datetime) -> CertificateAuthority:
        key = generate_key()
        subject = _name(f"p2porch cluster CA {cluster}", "ca", cluster)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_data: bytes, key_data: bytes) -> CertificateAuthority:
        cert = load_cert(cert_data)
        key = load_key(key_data)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise PkiError("the CA key does not match the CA certificate")
        return cls(cert, key)

    @property
    def cluster(self) -> str:
        attrs_ = self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(attrs_[0].value) if attrs_ else ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        name: str,
        role: str,
        now: dt.datetime,
        *,
        addresses: tuple[str, ...] = (),
        lifetime: dt.timedelta | None = None,
    ) -> x509.Certificate:
        """Sign a certificate for ``name`` in ``role``; nodes get SANs for ``addresses``."""
        check_name(name)
        if role not in ROLES:
            raise PkiError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PkiError("only ECDSA public keys are accepted")
        if lifetime is None:
            lifetime = NODE_CERT_LIFETIME if role == ROLE_NODE else USER_CERT_LIFETIME
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role == ROLE_NODE:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name, role, self.cluster))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if role == ROLE_NODE:
            sans: list[x509.GeneralName] = [x509.DNSName(name)]
            for address in addresses:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(address)))
                except ValueError:
                    sans.append(x509.DNSName(address))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def sign_request(
        self,
        csr_data: bytes,
        role: str,
        now: dt.datetime,
        *,
        addresses: tuple[str, ...] = (),
    ) -> x509.Certificate:
        """Sign a PEM certificate request after checking its self-signature.

        The name comes from the request's CN; the role and addresses from the caller (never
        from the request: a joiner cannot ask to be an admin).
        """
        try:
            csr = x509.load_pem_x509_csr(csr_data)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate request: {exc}") from exc
        try:
            # Both parse the key lazily: an unknown key type or curve raises here.
            signed = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise PkiError(f"unusable certificate request: {exc}") from exc
        if not signed:
            raise PkiError("the certificate request's signature is invalid")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise PkiError("the certificate request must name exactly one CN")
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PkiError("only ECDSA keys are accepted")
        return self.issue(public_key, str(cns[0].value), role, now, addresses=addresses)


def make_request(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A PEM certificate request for ``name`` (the key never leaves its owner)."""
    check_name(name)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- reading certs


def identity_of(cert: x509.Certificate) -> PeerIdentity:
    """The name, role and cluster a certificate states (its chain is checked elsewhere)."""

    def one(oid: x509.ObjectIdentifier) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        if len(values) != 1:
            raise PkiError(f"certificate subject has {len(values)} {oid._name} entries, not 1")
        return str(values[0].value)

    role = one(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if role not in ROLES:
        raise PkiError(f"certificate states an unknown role {role!r}")
    return PeerIdentity(
        name=one(NameOID.COMMON_NAME),
        role=role,
        cluster=one(NameOID.ORGANIZATION_NAME),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        key_id=key_id(cert.public_key()),
    )


def verify_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (for checks outside a TLS handshake)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def covers_addresses(cert: x509.Certificate, addresses: tuple[str, ...]) -> bool:
    """Whether a node certificate's SANs name every one of ``addresses``."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    ips = set(sans.get_values_for_type(x509.IPAddress))
    names = set(sans.get_values_for_type(x509.DNSName))

    def covered(address: str) -> bool:
        try:  # compare IPs as IPs: "::1" and "0:0::1" are one address
            return ipaddress.ip_address(address) in ips
        except ValueError:
            return address in names

    return all(covered(a) for a in addresses)


def renew_at(cert: x509.Certificate, rng: random.Random) -> dt.datetime:
    """When to renew: a random point in 50-80% of the certificate's life (spreads renewals)."""
    start = cert.not_valid_before_utc
    life = cert.not_valid_after_utc - start
    return start + life * rng.uniform(*RENEW_WINDOW)


def utcnow() -> dt.datetime:
    """The wall clock, for shells (cores take ``now`` as an argument)."""
    return dt.datetime.now(dt.UTC)
