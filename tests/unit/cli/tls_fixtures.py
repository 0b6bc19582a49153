"""Real TLS for the CLI's error tests: a cluster's PKI on disk and a loopback HTTPS server.

The server stands in for a node's API only as far as TLS and authorization go: TLS 1.3 with
the same server context a node builds (``TlsMaterial.server_context(client_cert="optional")``),
401 without a client certificate, 403 for a viewer that writes -- so the ssl errors, alerts
and answers the CLI meets are the real ones, not imitations. One connection at a time, every
socket under a timeout, stopped by the fixture: nothing can hang a test.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
from cryptography import x509

from p2porch.cli.config import dump_config
from p2porch.common import pki
from p2porch.common.tls import TlsMaterial

SOCKET_TIMEOUT_S = 5.0


@attrs.frozen
class Pki:
    """Two clusters' CAs and the files a test points client.yaml at (all in ``root``)."""

    root: Path
    ca: pki.CertificateAuthority
    other_ca: pki.CertificateAuthority

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def user(
        self,
        name: str,
        role: str,
        *,
        ca: pki.CertificateAuthority | None = None,
        expired: bool = False,
    ) -> tuple[Path, Path]:
        """``name.pem`` / ``name.key``: a user certificate (expired a year ago if asked)."""
        key = pki.generate_key()
        now = pki.utcnow()
        issued = now - dt.timedelta(days=400) if expired else now
        cert = (ca or self.ca).issue(
            key.public_key(), name, role, issued, lifetime=dt.timedelta(days=30)
        )
        return self.write(f"{name}.pem", pki.cert_pem(cert)), self.write(
            f"{name}.key", pki.key_pem(key)
        )

    def config(
        self,
        name: str,
        server: str,
        *,
        ca_file: str = "ca.pem",
        cert: str | None = None,
        key: str | None = None,
    ) -> Path:
        """A client.yaml named ``name`` (paths relative to ``root``, as nodes write them)."""
        if cert is None or key is None:
            text = (
                f"apiVersion: p2porch/v1\nkind: ClientConfig\nserver: {server}\n"
                f"credentials:\n  caFile: {ca_file}\n"
            )
        else:
            text = dump_config(server, self.ca.cluster, ca_file, cert, key)
        return self.write(name, text.encode())


def make_pki(root: Path) -> Pki:
    now = pki.utcnow()
    made = Pki(
        root,
        pki.CertificateAuthority.create("c0ffee", now),
        pki.CertificateAuthority.create("decade", now),
    )
    made.write("ca.pem", pki.cert_pem(made.ca.cert))
    made.write("other-ca.pem", pki.cert_pem(made.other_ca.cert))
    return made


class TlsServer:
    """A loopback HTTPS server with a node certificate of ``ca`` naming ``address``."""

    def __init__(
        self, ca: pki.CertificateAuthority, name: str = "n1", address: str = "127.0.0.1"
    ) -> None:
        key = pki.generate_key()
        cert = ca.issue(key.public_key(), name, pki.ROLE_NODE, pki.utcnow(), addresses=(address,))
        material = TlsMaterial(pki.cert_pem(ca.cert), pki.cert_pem(cert), pki.key_pem(key))
        self.context = material.server_context(client_cert="optional")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.handshake_errors: list[str] = []
        self._refused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def refused_a_connection(self, timeout_s: float = SOCKET_TIMEOUT_S) -> bool:
        """Whether the server side failed a handshake (its thread may still be recording the
        failure when the client already has its error: wait for it, boundedly)."""
        return self._refused.wait(timeout_s)

    def start(self) -> TlsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(SOCKET_TIMEOUT_S)
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self._answer(conn)
            except (ssl.SSLError, OSError) as exc:
                self.handshake_errors.append(str(exc))
                self._refused.set()
            finally:
                raw.close()

    def _answer(self, conn: ssl.SSLSocket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head_bytes, body = data.split(b"\r\n\r\n", 1)
        head = head_bytes.decode("latin-1")
        method, path = head.split(" ", 2)[:2]
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        # Read the whole body: closing with unread bytes would reset the connection and
        # lose the answer.
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            body += chunk
        der = conn.getpeercert(binary_form=True)
        identity = pki.identity_of(x509.load_der_x509_certificate(der)) if der else None
        status = 200
        answer: dict[str, object] = {"ok": True, "user": identity.name if identity else None}
        if path != "/healthz" and identity is None:
            status, answer = 401, _error("unauthenticated", "this endpoint needs a certificate")
        elif method != "GET" and identity is not None and identity.role != pki.ROLE_ADMIN:
            status, answer = (
                403,
                _error(
                    "forbidden",
                    f"user {identity.name} has role {identity.role}: it may read, not "
                    f"{method} {path}",
                ),
            )
        payload = json.dumps(answer).encode()
        conn.sendall(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )


def _error(code: str, message: str) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "details": []}}


@contextmanager
def serving(ca: pki.CertificateAuthority, address: str = "127.0.0.1") -> Iterator[TlsServer]:
    """A started server, stopped on leaving the block."""
    server = TlsServer(ca, address=address).start()
    try:
        yield server
    finally:
        server.stop()
