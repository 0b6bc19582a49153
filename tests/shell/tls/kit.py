"""Certificates and attackers shared by the TLS transport tests (real loopback sockets).

Why real sockets: the point is what OpenSSL does with real handshakes -- which side notices a
foreign CA first, what a silent or garbage-speaking peer costs the server -- and trio's memory
streams would hide none of it but the timing, which these tests never assert on.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import trio

from p2porch.common import pki, tls

HOST = "127.0.0.1"
# Every wait is an upper bound on something that happens in milliseconds; tests assert on what
# happened, never on how long it took.
WAIT_S = 15.0
# Short enough that the "silent client" case ends quickly, long enough for a loaded machine to
# finish a real handshake (ECDSA P-256 costs ~1 ms of CPU per side).
SHORT_HANDSHAKE_S = 1.0


class Pki:
    """The cluster CA and a second, unrelated CA with the same cluster name (an attacker's)."""

    def __init__(self) -> None:
        now = pki.utcnow()
        self.now = now
        self.ca = pki.CertificateAuthority.create("homelab", now)
        self.other_ca = pki.CertificateAuthority.create("homelab", now)

    def material(
        self,
        name: str,
        role: str = pki.ROLE_NODE,
        *,
        signed_by: pki.CertificateAuthority | None = None,
        addresses: tuple[str, ...] = (HOST,),
    ) -> tls.TlsMaterial:
        """A certificate for ``name``; it always *trusts* the cluster CA, whoever signed it
        (so an attacker's client gets past its own check and the server's check is tested)."""
        key = pki.generate_key()
        cert = (signed_by or self.ca).issue(
            key.public_key(), name, role, self.now, addresses=addresses
        )
        return tls.TlsMaterial(pki.cert_pem(self.ca.cert), pki.cert_pem(cert), pki.key_pem(key))

    def contexts(
        self,
        name: str,
        role: str = pki.ROLE_NODE,
        *,
        signed_by: pki.CertificateAuthority | None = None,
        addresses: tuple[str, ...] = (HOST,),
    ) -> tls.TlsContexts:
        material = self.material(name, role, signed_by=signed_by, addresses=addresses)
        return tls.TlsContexts.build(material)

    def no_cert_client(self) -> ssl.SSLContext:
        """Trusts the cluster CA but has no certificate of its own."""
        return tls.TlsMaterial(pki.cert_pem(self.ca.cert)).client_context()

    def tls12_client(self, name: str) -> ssl.SSLContext:
        """A valid node certificate, but a client that speaks at most TLS 1.2."""
        context = self.material(name).client_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context


def nodes_except(*removed: str) -> tls.Authorizer:
    """Nodes only, and not the removed ones (what the node layer enforces)."""
    role_check = tls.require_role(pki.ROLE_NODE)

    def check(peer: pki.PeerIdentity) -> str | None:
        if peer.name in removed:
            return f"{peer.name} was removed from the cluster"
        return role_check(peer)

    return check


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    with trio.fail_after(WAIT_S):
        while not predicate():
            await trio.sleep(0.01)
    assert predicate(), what


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the server sends before it hangs up (a reset counts as hanging up)."""
    received = bytearray()
    with trio.fail_after(WAIT_S):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return bytes(received)
            if not chunk:
                return bytes(received)
            received += chunk


async def raw_connect(address: str) -> trio.SocketStream:
    host, _, port = address.rpartition(":")
    return await trio.open_tcp_stream(host, int(port))


# What a port scanner or a confused client sends instead of a ClientHello: plain HTTP, and a
# record that looks like a TLS handshake (type 22, version 3.1, 64 bytes) but holds junk.
GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "fake-record": b"\x16\x03\x01\x00\x40" + bytes(range(64)),
}
