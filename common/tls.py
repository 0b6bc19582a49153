"""Mutual TLS 1.3 for every TCP connection: contexts, handshakes and who is on the other end.

Every layer (Raft, gossip push-pull, the API and its proxies) opens and accepts plain TCP
streams through an injected factory; this module wraps those streams. Its parts:

- :class:`TlsMaterial` holds the CA bundle and this end's certificate and key, and builds
  the ``ssl`` contexts (TLS 1.3 only, peer certificate required and chained to the cluster CA).
  It is swapped as a whole when a certificate renews: connections opened afterwards present the
  new certificate, open ones keep theirs (a certificate is checked at handshake).
- :func:`client_handshake` / :func:`server_handshake` run the handshake under a deadline (a
  peer that connects and says nothing cannot hold a task) and return the peer's
  :class:`~p2porch.common.pki.PeerIdentity`, then call an *authorizer* that may refuse it --
  the place where "a removed node still holding its certificate" and "only nodes may speak
  Raft" are enforced, because a chain check alone cannot know either.

Why not ``ssl`` hostname checks alone: peers are addressed by IP (the SANs carry them, so the
check is still done on the client side), but the decision that matters is the *role and name*
in the certificate, which only the application can judge.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs
import trio
from cryptography import x509

from p2porch.common import pki
from p2porch.common.errors import P2porchError

HANDSHAKE_TIMEOUT_S = 5.0

# Returns why a peer is refused, or None to accept it.
Authorizer = Callable[[pki.PeerIdentity], str | None]


class TlsError(P2porchError):
    """A TLS handshake failed or the peer was refused (the message says which and why)."""


def accept_any(_peer: pki.PeerIdentity) -> str | None:
    return None


def require_role(*roles: str) -> Authorizer:
    def check(peer: pki.PeerIdentity) -> str | None:
        if peer.role not in roles:
            return f"{peer.name} has role {peer.role}; needs {' or '.join(roles)}"
        return None

    return check


@attrs.frozen
class TlsMaterial:
    """PEM bytes of the trusted CA bundle and of this end's certificate and key."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    @classmethod
    def from_files(cls, ca: Path, cert: Path | None = None, key: Path | None = None) -> TlsMaterial:
        try:
            return cls(
                ca.read_bytes(),
                cert.read_bytes() if cert else None,
                key.read_bytes() if key else None,
            )
        except OSError as exc:
            raise TlsError(f"cannot read TLS material: {exc}") from exc

    def _load(self, context: ssl.SSLContext) -> None:
        try:
            context.load_verify_locations(cadata=self.ca_pem.decode())
        except (ssl.SSLError, ValueError) as exc:
            raise TlsError(f"unusable CA bundle: {exc}") from exc
        if self.cert_pem is None:
            return
        if self.key_pem is None:
            raise TlsError("a certificate without its key")
        # ssl can only load a chain from files: write them to a private temporary folder.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path = Path(tmp) / "cert.pem"
            key_path = Path(tmp) / "key.pem"
            cert_path.write_bytes(self.cert_pem)
            key_path.touch(mode=0o600)
            key_path.write_bytes(self.key_pem)
            try:
                context.load_cert_chain(str(cert_path), str(key_path))
            except ssl.SSLError as exc:
                raise TlsError(f"certificate and key do not load together: {exc}") from exc

    def server_context(self, *, client_cert: str = "required") -> ssl.SSLContext:
        """TLS 1.3 server context. ``client_cert``: ``required`` or ``optional`` (the API,
        where a joiner without a certificate yet and a bare liveness probe may connect)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        # No session tickets: nothing resumes sessions, and a Raft client that never reads
        # them would close its link with unread data (a TCP reset instead of a clean close).
        context.num_tickets = 0
        context.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
        self._load(context)
        return context

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
        self._load(context)
        return context

    @property
    def identity(self) -> pki.PeerIdentity | None:
        return pki.identity_of(pki.load_cert(self.cert_pem)) if self.cert_pem else None


@attrs.define
class TlsContexts:
    """The live contexts of one process: replaced together on renewal (see module doc)."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    # For the API: clients without a certificate may reach the unauthenticated endpoints.
    server_optional: ssl.SSLContext

    @classmethod
    def build(cls, material: TlsMaterial) -> TlsContexts:
        return cls(
            server=material.server_context(),
            client=material.client_context(),
            server_optional=material.server_context(client_cert="optional"),
        )

    def replace(self, material: TlsMaterial) -> None:
        fresh = TlsContexts.build(material)
        self.server, self.client, self.server_optional = (
            fresh.server,
            fresh.client,
            fresh.server_optional,
        )


def peer_identity(stream: trio.SSLStream[trio.abc.Stream]) -> pki.PeerIdentity | None:
    """The verified peer certificate's identity, or None if the peer sent none."""
    der = stream.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return pki.identity_of(x509.load_der_x509_certificate(der))
    except (ValueError, pki.PkiError) as exc:
        raise TlsError(f"peer certificate unreadable: {exc}") from exc


def _why(exc: BaseException, timeout_s: float) -> str:
    """A failed handshake's reason: trio reports an ``ssl`` failure as a bare
    BrokenResourceError whose *cause* says what went wrong (unknown CA, no certificate...)."""
    if isinstance(exc, trio.TooSlowError):
        return f"no handshake within {timeout_s}s"
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else None
    shown = cause if cause is not None else exc
    return str(shown) or repr(shown)


def _host_of(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


async def _handshake(
    tls: trio.SSLStream[trio.abc.Stream], timeout_s: float, refused: str, failed: str
) -> None:
    """Handshake under a deadline; on failure close the stream and say why (TlsError):
    ``refused`` prefixes an ssl verdict, ``failed`` a broken, silent or slow peer."""
    try:
        with trio.fail_after(timeout_s):
            await tls.do_handshake()
    except (ssl.SSLError, ssl.CertificateError) as exc:
        await trio.aclose_forcefully(tls)
        raise TlsError(f"{refused}: {exc}") from exc
    except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
        await trio.aclose_forcefully(tls)
        raise TlsError(f"{failed}: {_why(exc, timeout_s)}") from exc


async def client_handshake(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    address: str,
    authorize: Authorizer = accept_any,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> trio.SSLStream[trio.abc.Stream]:
    """Wrap an open stream to ``address`` and handshake; refuse a server ``authorize`` rejects."""
    tls = trio.SSLStream(stream, context, server_hostname=_host_of(address))
    await _handshake(tls, timeout_s, f"TLS with {address} failed", f"TLS with {address} failed")
    peer = peer_identity(tls)
    reason = "no certificate" if peer is None else authorize(peer)
    if reason is not None:
        await trio.aclose_forcefully(tls)
        raise TlsError(f"{address} refused: {reason}")
    return tls


async def server_handshake(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    authorize: Authorizer = accept_any,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
    *,
    https_compatible: bool = False,
) -> tuple[trio.SSLStream[trio.abc.Stream], pki.PeerIdentity | None]:
    """Accept TLS on ``stream``; a peer with a certificate ``authorize`` rejects is cut off.

    Returns the peer's identity (None only when the context made the certificate optional).
    """
    tls = trio.SSLStream(stream, context, server_side=True, https_compatible=https_compatible)
    await _handshake(tls, timeout_s, "TLS handshake refused", "TLS handshake failed")
    peer = peer_identity(tls)
    if peer is None:
        if context.verify_mode == ssl.CERT_REQUIRED:  # pragma: no cover - ssl refuses first
            await trio.aclose_forcefully(tls)
            raise TlsError("peer sent no certificate")
        return tls, None
    reason = authorize(peer)
    if reason is not None:
        await trio.aclose_forcefully(tls)
        raise TlsError(f"peer {peer.name} refused: {reason}")
    return tls, peer
