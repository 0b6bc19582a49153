"""A node's security material and the decisions made with it.

What lives in the data dir (keys and the CA key readable by the owner only, 0600):

=============  =================================================================
``ca.pem``     the cluster CA bundle (normally one certificate; two during a CA rotation)
``ca.key``     the CA's signing key (every node holds it: see below)
``node.pem``   this node's certificate (CN = node name, OU = node, SANs = its addresses)
``node.key``   this node's private key (never leaves the node; renewals keep it)
``data.key``   the cluster data key: AES-256-GCM for secrets, the join secret and the
               gossip keys inside the Raft log, its WAL and snapshots
``admin.pem``  an admin client certificate + key for the local CLI, named by
``admin.key``  ``client.yaml``
=============  =================================================================

Why every node holds the CA key and the data key: there is no control host. Any node may be
the one a joiner contacts, any node may become the leader that commits a secret, and a node
must renew its own certificate while cut off from the rest. Swarm gives the same material to
every manager; in p2porch every node can become a manager. The consequence is written down in
docs/architecture.md: a stolen node's data dir can mint certificates, and the answer is the CA
rotation procedure. What removal does guarantee: a removed node's own certificate is refused
everywhere (by name, and by key for any node whose key the log recorded).

Sealing: ``seal(plaintext, aad)`` = version byte | 12-byte random nonce | AES-GCM(ciphertext +
tag), with the record's identity as associated data so a sealed value cannot be moved to
another record.
"""

from __future__ import annotations

import datetime as dt
import os
import random
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2porch.common import pki
from p2porch.common.tls import Authorizer, TlsContexts, TlsMaterial
from p2porch.node.errors import NodeError

DATA_KEY_BYTES = 32
_SEAL_VERSION = 1
_NONCE_BYTES = 12


class SecurityError(NodeError):
    """Security material missing, unreadable or refused (the message names the file or cause)."""


def write_private(path: Path, data: bytes) -> None:
    """Write atomically, readable by the owner only, fsynced (keys, tokens, certificates)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return bytes([_SEAL_VERSION]) + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[0] != _SEAL_VERSION:
        raise SecurityError("sealed value is malformed or of an unknown version")
    nonce = sealed[1 : 1 + _NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, sealed[1 + _NONCE_BYTES :], aad)
    except InvalidTag as exc:
        raise SecurityError(
            "sealed value does not open with this cluster's data key (tampered, or sealed by "
            "another cluster)"
        ) from exc


class NodeSecurity:
    """The node's CA, certificate, key and data key, and the TLS contexts built from them."""

    def __init__(
        self,
        data_dir: Path,
        *,
        ca: pki.CertificateAuthority,
        ca_bundle: bytes,
        node_cert: bytes,
        node_key: ec.EllipticCurvePrivateKey,
        data_key: bytes,
    ) -> None:
        self.data_dir = data_dir
        self.ca = ca
        self.ca_bundle = ca_bundle
        self.node_cert_pem = node_cert
        self.node_key = node_key
        self.data_key = data_key
        self.contexts = TlsContexts.build(self.material)

    # ---- files

    @staticmethod
    def paths(data_dir: Path) -> dict[str, Path]:
        return {
            name: data_dir / file
            for name, file in (
                ("ca", "ca.pem"),
                ("ca_key", "ca.key"),
                ("cert", "node.pem"),
                ("key", "node.key"),
                ("data_key", "data.key"),
                ("admin_cert", "admin.pem"),
                ("admin_key", "admin.key"),
                ("client", "client.yaml"),
            )
        }

    def _save(self) -> None:
        p = self.paths(self.data_dir)
        write_private(p["ca"], self.ca_bundle)
        write_private(p["ca_key"], pki.key_pem(self.ca.key))
        write_private(p["key"], pki.key_pem(self.node_key))
        write_private(p["cert"], self.node_cert_pem)
        write_private(p["data_key"], self.data_key)

    @classmethod
    def exists(cls, data_dir: Path) -> bool:
        return cls.paths(data_dir)["cert"].exists()

    @classmethod
    def load(cls, data_dir: Path) -> NodeSecurity:
        p = cls.paths(data_dir)
        try:
            bundle = p["ca"].read_bytes()
            ca = signing_ca(bundle, p["ca_key"].read_bytes())
            node_key = pki.load_key(p["key"].read_bytes())
            node_cert = p["cert"].read_bytes()
            pki.load_cert(node_cert)
            data_key = p["data_key"].read_bytes()
        except (OSError, pki.PkiError) as exc:
            raise SecurityError(f"{data_dir}: security material unusable: {exc}") from exc
        if len(data_key) != DATA_KEY_BYTES:
            raise SecurityError(f"{p['data_key']}: expected {DATA_KEY_BYTES} bytes")
        return cls(
            data_dir,
            ca=ca,
            ca_bundle=bundle,
            node_cert=node_cert,
            node_key=node_key,
            data_key=data_key,
        )

    @classmethod
    def bootstrap(
        cls, data_dir: Path, cluster: str, name: str, addresses: tuple[str, ...], now: dt.datetime
    ) -> NodeSecurity:
        """A new cluster: its CA, this node's certificate, a data key."""
        ca = pki.CertificateAuthority.create(cluster, now)
        node_key = pki.generate_key()
        cert = ca.issue(node_key.public_key(), name, pki.ROLE_NODE, now, addresses=addresses)
        security = cls(
            data_dir,
            ca=ca,
            ca_bundle=pki.cert_pem(ca.cert),
            node_cert=pki.cert_pem(cert),
            node_key=node_key,
            data_key=os.urandom(DATA_KEY_BYTES),
        )
        security._save()
        return security

    @classmethod
    def from_join(
        cls,
        data_dir: Path,
        *,
        node_key: ec.EllipticCurvePrivateKey,
        ca_bundle: bytes,
        ca_key: bytes,
        node_cert: bytes,
        data_key: bytes,
    ) -> NodeSecurity:
        """What a join answer handed over (already checked against the pinned CA)."""
        try:
            ca = signing_ca(ca_bundle, ca_key)
            cert = pki.load_cert(node_cert)
        except pki.PkiError as exc:
            raise SecurityError(f"the join answer's certificates are unusable: {exc}") from exc
        if not pki.verify_issued_by(cert, ca.cert):
            raise SecurityError("the join answer's certificate was not issued by the pinned CA")
        if pki.key_id(cert.public_key()) != pki.key_id(node_key.public_key()):
            raise SecurityError("the join answer's certificate is not for our key")
        if len(data_key) != DATA_KEY_BYTES:
            raise SecurityError("the join answer's data key has the wrong size")
        security = cls(
            data_dir,
            ca=ca,
            ca_bundle=ca_bundle,
            node_cert=node_cert,
            node_key=node_key,
            data_key=data_key,
        )
        security._save()
        return security

    # ---- TLS

    @property
    def material(self) -> TlsMaterial:
        return TlsMaterial(self.ca_bundle, self.node_cert_pem, pki.key_pem(self.node_key))

    @property
    def node_cert(self) -> x509.Certificate:
        return pki.load_cert(self.node_cert_pem)

    @property
    def fingerprint(self) -> str:
        return self.ca.fingerprint

    @property
    def node_key_id(self) -> str:
        return pki.key_id(self.node_key.public_key())

    def ensure_node_cert(
        self, name: str, addresses: tuple[str, ...], now: dt.datetime, rng: random.Random
    ) -> bool:
        """Reissue our certificate (same key) if it is due for renewal, expired, names
        another node or misses one of our addresses. True if it was reissued."""
        cert = self.node_cert
        identity = pki.identity_of(cert)
        due = now >= pki.renew_at(cert, rng) or now >= cert.not_valid_after_utc
        if not due and identity.name == name and pki.covers_addresses(cert, addresses):
            return False
        fresh = self.ca.issue(
            self.node_key.public_key(), name, pki.ROLE_NODE, now, addresses=addresses
        )
        self.node_cert_pem = pki.cert_pem(fresh)
        write_private(self.paths(self.data_dir)["cert"], self.node_cert_pem)
        self.contexts.replace(self.material)
        return True

    def adopt_ca(
        self,
        bundle: bytes,
        ca_key: bytes,
        name: str,
        addresses: tuple[str, ...],
        now: dt.datetime,
    ) -> bool:
        """Take a CA bundle and signing key from the log (a CA rotation step).

        Trust exactly ``bundle``; sign with ``ca_key``; reissue our certificate (same key) and
        the local admin certificate if another CA signed them. True if anything changed.
        """
        try:
            ca = signing_ca(bundle, ca_key)
        except pki.PkiError as exc:
            raise SecurityError(f"the log's CA is unusable: {exc}") from exc
        if bundle == self.ca_bundle and ca.fingerprint == self.ca.fingerprint:
            return False
        self.ca, self.ca_bundle = ca, bundle
        p = self.paths(self.data_dir)
        write_private(p["ca_key"], pki.key_pem(ca.key))
        write_private(p["ca"], bundle)
        if not pki.verify_issued_by(self.node_cert, ca.cert):
            fresh = ca.issue(
                self.node_key.public_key(), name, pki.ROLE_NODE, now, addresses=addresses
            )
            self.node_cert_pem = pki.cert_pem(fresh)
            write_private(p["cert"], self.node_cert_pem)
        if p["admin_cert"].exists():
            admin = pki.load_cert(p["admin_cert"].read_bytes())
            if not pki.verify_issued_by(admin, ca.cert):
                key = pki.load_key(p["admin_key"].read_bytes())
                admin_name = pki.identity_of(admin).name
                reissued = ca.issue(key.public_key(), admin_name, pki.ROLE_ADMIN, now)
                write_private(p["admin_cert"], pki.cert_pem(reissued))
        self.contexts.replace(self.material)
        return True

    @property
    def trusted_fingerprints(self) -> list[str]:
        return [pki.fingerprint(c) for c in pki.load_certs(self.ca_bundle)]

    @property
    def cert_issuer_fingerprint(self) -> str:
        """Which trusted CA signed our certificate ("" if none of them: mid-rotation bug)."""
        cert = self.node_cert
        for ca in pki.load_certs(self.ca_bundle):
            if pki.verify_issued_by(cert, ca):
                return pki.fingerprint(ca)
        return ""

    def issue_node(self, csr: bytes, addresses: tuple[str, ...], now: dt.datetime) -> bytes:
        try:
            cert = self.ca.sign_request(csr, pki.ROLE_NODE, now, addresses=addresses)
        except pki.PkiError as exc:
            raise SecurityError(str(exc)) from exc
        return pki.cert_pem(cert)

    def issue_user(self, csr: bytes, role: str, now: dt.datetime) -> bytes:
        if role not in pki.USER_ROLES:
            raise SecurityError(f"role must be one of {', '.join(pki.USER_ROLES)}, not {role!r}")
        try:
            cert = self.ca.sign_request(csr, role, now)
        except pki.PkiError as exc:
            raise SecurityError(str(exc)) from exc
        return pki.cert_pem(cert)

    def write_admin_client(
        self, server: str, cluster: str, now: dt.datetime, node_name: str = ""
    ) -> Path:
        """``client.yaml`` + an admin certificate for the local CLI (made once, kept).

        The certificate is named ``admin.<node>`` (:func:`local_admin_name`), so that it dies
        with the node: the API refuses it once the log marks the node removed.
        """
        p = self.paths(self.data_dir)
        if not (p["admin_cert"].exists() and p["admin_key"].exists()):
            key = pki.generate_key()
            name = local_admin_name(node_name)
            cert = self.ca.issue(key.public_key(), name, pki.ROLE_ADMIN, now)
            write_private(p["admin_key"], pki.key_pem(key))
            write_private(p["admin_cert"], pki.cert_pem(cert))
        text = client_yaml(server, cluster, "ca.pem", "admin.pem", "admin.key")
        if not p["client"].exists() or p["client"].read_text() != text:
            write_private(p["client"], text.encode())
        return p["client"]

    # ---- sealing with the data key

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        return seal(self.data_key, plaintext, aad.encode())

    def unseal(self, sealed: bytes, aad: str) -> bytes:
        return unseal(self.data_key, sealed, aad.encode())


LOCAL_ADMIN_PREFIX = "admin."
# What a node removed from the cluster deletes: everything that lets a data dir act for the
# cluster (its own certificate stays: every member refuses it by name and key anyway).
CLUSTER_MATERIAL = ("ca_key", "data_key", "admin_cert", "admin_key", "client")


def local_admin_name(node_name: str) -> str:
    return f"{LOCAL_ADMIN_PREFIX}{node_name}" if node_name else "admin"


def signing_ca(bundle: bytes, key_pem: bytes) -> pki.CertificateAuthority:
    """The CA of ``bundle`` whose certificate matches ``key_pem`` (a bundle may hold two)."""
    key = pki.load_key(key_pem)
    wanted = pki.key_id(key.public_key())
    for cert in pki.load_certs(bundle):
        if pki.key_id(cert.public_key()) == wanted:
            return pki.CertificateAuthority(cert, key)
    raise pki.PkiError("no certificate of the CA bundle matches the CA key")


def client_yaml(server: str, cluster: str, ca_file: str, cert_file: str, key_file: str) -> str:
    """A client config (cli/config.py's format); file paths are relative to its folder."""
    return (
        "apiVersion: p2porch/v1\n"
        "kind: ClientConfig\n"
        f"server: {server}\n"
        f"cluster: {cluster}\n"
        "credentials:\n"
        f"  caFile: {ca_file}\n"
        f"  certFile: {cert_file}\n"
        f"  keyFile: {key_file}\n"
    )


# --------------------------------------------------------------------------- who may connect

# What the authorizers need to know of the desired state: a node's record as (removed, key id),
# or None if the log does not know the name (yet: a joiner catching up sees nobody at first).
NodeLookup = Callable[[str], tuple[bool, str] | None]


def node_authorizer(cluster: str, lookup: NodeLookup) -> Authorizer:
    """Raft and gossip streams: only nodes of this cluster, not removed, with their own key."""

    def check(peer: pki.PeerIdentity) -> str | None:
        if peer.role != pki.ROLE_NODE:
            return f"role {peer.role} may not connect to a node-only port"
        return _node_refusal(cluster, lookup, peer)

    return check


def api_authorizer(cluster: str, lookup: NodeLookup) -> Authorizer:
    """The API: users of this cluster (roles are checked per endpoint) and live nodes."""

    def check(peer: pki.PeerIdentity) -> str | None:
        if peer.role == pki.ROLE_NODE:
            return _node_refusal(cluster, lookup, peer)
        if peer.cluster != cluster:
            return f"certificate of cluster {peer.cluster}, not {cluster}"
        if peer.name.startswith(LOCAL_ADMIN_PREFIX):
            node = lookup(peer.name.removeprefix(LOCAL_ADMIN_PREFIX))
            if node is not None and node[0]:
                return f"{peer.name} belonged to a node removed from the cluster"
        return None

    return check


def _node_refusal(cluster: str, lookup: NodeLookup, peer: pki.PeerIdentity) -> str | None:
    if peer.cluster != cluster:
        return f"certificate of cluster {peer.cluster}, not {cluster}"
    known = lookup(peer.name)
    if known is None:
        return None
    removed, recorded_key = known
    if removed:
        return f"node {peer.name} was removed from the cluster"
    return None if not recorded_key else _key_refusal(peer, recorded_key)


def _key_refusal(peer: pki.PeerIdentity, recorded_key: str) -> str | None:
    if peer.key_id != recorded_key:
        return f"node {peer.name} presented a key the cluster does not know for it"
    return None
