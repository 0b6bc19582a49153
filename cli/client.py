"""The HTTP client of the p2porch API (docs/api.md), synchronous, on httpx.

One method per endpoint, returning the decoded JSON as plain dicts and lists: the CLI shows
the API's objects as they are (``-o json`` dumps them untouched), so there is no second
model to keep in step with the server.

Errors the CLI shows to users (it catches :class:`ClientError` and exits 1)::

    P2porchError                     (p2porch.common.errors)
    ├── cli.config.ConfigError        bad --node address or client.yaml
    └── ClientError
        ├── ApiError                  the node answered non-2xx: .status .code .message .details
        ├── Unreachable               no connection, or no answer in time
        ├── TlsFailure                a certificate was refused, by this CLI or by the node
        └── BadResponse               the node answered something that is not the API

Every node's API is mutual TLS 1.3, and ``ssl`` reports its failures in terms only a TLS
expert reads ("tlsv1 alert unknown ca"). :meth:`ApiClient._translate` turns them -- and the
API's 401/403 -- into what to do: which client.yaml is in use and which one to use, whose
certificate expired, which role a certificate has. The node's TLS alert can be lost when it
closes the connection (a reset overtakes it), so the client also checks its own certificate
(expiry, issuer) and says what it finds.

Tests inject an ``httpx.MockTransport`` through ``transport=``; nothing else differs.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
from cryptography import x509

from p2porch.common import pki
from p2porch.common.errors import P2porchError

from .config import ENV_CONFIG, Target

DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
# Gossip key rotation waits for every live node at each of its three steps (up to 30 s each
# on the node), so its one call gets a longer read timeout than the rest.
KEY_ROTATION_TIMEOUT_S = 120.0
# CA rotation: three steps, each waiting up to 60 s on the node for every member.
CA_ROTATION_TIMEOUT_S = 300.0


class ClientError(P2porchError):
    """Anything that kept a request from getting its answer."""


class ApiError(ClientError):
    """A non-2xx answer, decoded from ``{"error": {"code", "message", "details"}}``."""

    def __init__(self, status: int, code: str, message: str, details: Sequence[Any] = ()) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = tuple(details)
        super().__init__(f"{code}: {message}")


class Unreachable(ClientError):
    """The node could not be reached, or did not answer in time."""


class TlsFailure(ClientError):
    """The TLS handshake failed: this CLI refused the node's certificate or the node ours.

    ``hints`` say what to do about it, one line each (the CLI prints them under the error).
    """

    def __init__(self, message: str, hints: Sequence[str] = ()) -> None:
        self.message = message
        self.hints = tuple(hints)
        super().__init__(message)

    @property
    def full_text(self) -> str:
        return "; ".join((self.message, *self.hints))


class BadResponse(ClientError):
    """A 2xx answer that is not the JSON the API promises (wrong port? a proxy?)."""


# OpenSSL's certificate verification codes (X509_V_ERR_*) this module explains.
_UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21})  # self-signed, unknown issuer
_EXPIRED = 10
_NOT_YET_VALID = 9
_NAME_MISMATCH = frozenset({62, 64})  # hostname, IP address
# TLS alerts (ssl reasons) by which a node refuses the client certificate presented.
_REFUSED_CERT_EXPIRED = frozenset({"SSLV3_ALERT_CERTIFICATE_EXPIRED"})
_REFUSED_CERT_UNKNOWN = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)
_CERT_REQUIRED = frozenset(
    {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"}
)
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)
_OLD_TLS = frozenset(
    {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"}
)


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error under an httpx error (httpx -> httpcore -> ssl), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _date(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _seg(part: str) -> str:
    """One URL path segment: names are DNS labels, but never let a '/' through."""
    return quote(part, safe="")


class ApiClient:
    """A connection to one node's API; use as a context manager (closes the pool)."""

    def __init__(
        self,
        target: Target,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.target = target
        verify: Any = True
        if target.credentials.present and transport is None:
            verify = target.credentials.ssl_context()
        self._http = httpx.Client(
            base_url=target.base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            verify=verify,
            headers={"Accept": "application/json"},
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def _translate(self, exc: httpx.HTTPError) -> ClientError:
        where = self.target.display
        tls = ssl_cause(exc)
        if tls is not None:
            return self._explain_tls(tls)
        if isinstance(exc, httpx.TimeoutException):
            return Unreachable(f"node {where} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.TransportError):
            text = f"cannot reach node {where}: {exc or type(exc).__name__}"
            if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
                # A node that refuses a certificate may close the connection before its TLS
                # alert is read: say what is wrong with ours, if anything is.
                own = self.own_certificate_problem()
                if own is not None:
                    return TlsFailure(f"node {where} closed the connection: {own[0]}", own[1])
                if self.target.base_url.startswith("http://"):
                    text += " (the p2porch API speaks HTTPS only: drop http:// from the address)"
                elif (
                    isinstance(exc, httpx.RemoteProtocolError)
                    and "without sending a response" in str(exc)
                    and self.target.credentials.cert_file is not None
                ):
                    # What a refused certificate looks like when the node's alert is lost and
                    # nothing is wrong with it locally: issued by a CA since rotated away.
                    return Unreachable(
                        text + " (if this persists, the node may refuse "
                        f"{self._whose()}: e.g. after a CA rotation, ask for new credentials)"
                    )
            return Unreachable(text)
        return BadResponse(f"bad answer from node {where}: {exc}")

    # ------------------------------------------------------------------ explaining TLS

    def config_in_use(self) -> str:
        """Which client.yaml this CLI uses, for messages."""
        if self.target.config_path is None:
            return (
                f"no client.yaml is in use ({ENV_CONFIG} is not set and "
                "~/.config/p2porch/client.yaml does not exist)"
            )
        return f"credentials from {self.target.config_path}"

    @staticmethod
    def use_hint() -> str:
        """Where good credentials come from."""
        return (
            f"use the client.yaml a node of the cluster wrote in its data dir "
            f"({ENV_CONFIG}=DATA_DIR/client.yaml p2porch ...), or one an admin made for you "
            "with p2porch user create"
        )

    def _certificate(self) -> x509.Certificate | None:
        """Our client certificate, None if there is none or it cannot be read."""
        cert_file = self.target.credentials.cert_file
        if cert_file is None:
            return None
        try:
            return pki.load_cert(cert_file.read_bytes())
        except (OSError, pki.PkiError):
            return None

    def _identity(self) -> pki.PeerIdentity | None:
        cert = self._certificate()
        if cert is None:
            return None
        try:
            return pki.identity_of(cert)
        except pki.PkiError:
            return None

    def _whose(self) -> str:
        """``/path/bob.pem (user bob, role viewer)`` -- the certificate we present."""
        identity = self._identity()
        who = "" if identity is None else f" (user {identity.name}, role {identity.role})"
        return f"{self.target.credentials.cert_file}{who}"

    def _renew_hint(self) -> str:
        identity = self._identity()
        name, role = (identity.name, identity.role) if identity else ("NAME", "ROLE")
        return (
            "ask an admin of the cluster for new credentials: "
            f"p2porch user create {name} --role {role}"
        )

    def own_certificate_problem(self) -> tuple[str, tuple[str, ...]] | None:
        """What is wrong with our own client certificate, seen locally: (what, hints), or
        None when nothing is found.

        Expired or not yet valid, or not issued by the CA our config trusts (then it is
        another cluster's, and the node will refuse it).
        """
        cert = self._certificate()
        if cert is None:
            return None
        creds = self.target.credentials
        now = pki.utcnow()
        if now > cert.not_valid_after_utc:
            return (
                f"{self._whose()} expired on {_date(cert.not_valid_after_utc)}",
                (self._renew_hint(),),
            )
        if now < cert.not_valid_before_utc:
            return (
                f"{self._whose()} is not valid before {_date(cert.not_valid_before_utc)}",
                ("check this machine's clock",),
            )
        if creds.ca_file is not None:
            try:
                cas = pki.load_certs(creds.ca_file.read_bytes())
            except (OSError, pki.PkiError):
                return None
            if not any(pki.verify_issued_by(cert, ca) for ca in cas):
                return (
                    f"{self._whose()} was not issued by the cluster CA in {creds.ca_file}: "
                    "it belongs to another cluster",
                    (self.config_in_use(), self.use_hint()),
                )
        return None

    def _explain_tls(self, err: ssl.SSLError) -> TlsFailure:
        where = self.target.display
        creds = self.target.credentials
        if isinstance(err, ssl.SSLCertVerificationError):
            code = getattr(err, "verify_code", None)
            if code in _UNTRUSTED_ISSUER:
                if creds.ca_file is None:
                    return TlsFailure(
                        f"cannot verify node {where}: this CLI has no cluster CA to check its "
                        "certificate with (p2porch nodes use their cluster's own CA)",
                        (self.config_in_use(), self.use_hint()),
                    )
                return TlsFailure(
                    f"refused node {where}: its certificate was not issued by the cluster CA "
                    f"in {creds.ca_file}: a node of another cluster, or not a p2porch node",
                    (
                        self.config_in_use(),
                        "check the address; if the cluster's CA was rotated since these "
                        "credentials were made, or for another cluster, " + self.use_hint(),
                    ),
                )
            if code in _NAME_MISMATCH:
                host = where.rsplit(":", 1)[0]
                return TlsFailure(
                    f"refused node {where}: its certificate is not valid for the address {host!r}",
                    (
                        "a node's certificate names the address it advertises: use that one "
                        "(the API column of p2porch get nodes -o wide)",
                    ),
                )
            if code in (_EXPIRED, _NOT_YET_VALID):
                state = "has expired" if code == _EXPIRED else "is not valid yet"
                return TlsFailure(
                    f"refused node {where}: its certificate {state}",
                    (
                        "nodes renew theirs automatically: is this machine's clock or the "
                        "node's wrong?",
                    ),
                )
            why = getattr(err, "verify_message", None) or err
            return TlsFailure(f"cannot verify node {where}'s certificate: {why}")
        # ``reason`` is set by the ssl module on the errors it raises (not on hand-made ones).
        reason = str(getattr(err, "reason", None) or "")
        if reason in _REFUSED_CERT_EXPIRED or reason in _REFUSED_CERT_UNKNOWN:
            refused = f"node {where} refused our client certificate"
            own = self.own_certificate_problem()
            if own is not None:
                return TlsFailure(f"{refused}: {own[0]}", own[1])
            if reason in _REFUSED_CERT_EXPIRED:
                return TlsFailure(f"{refused}: {self._whose()} has expired", (self._renew_hint(),))
            return TlsFailure(
                f"{refused}: {self._whose()} is not known to its cluster",
                (self.config_in_use(), self.use_hint()),
            )
        if reason in _CERT_REQUIRED:
            return TlsFailure(
                f"node {where} needs a client certificate and this CLI presented none",
                (self.config_in_use(), self.use_hint()),
            )
        if reason in _NOT_TLS:
            return TlsFailure(
                f"node {where} does not speak TLS on this port (not the p2porch API port, "
                "or a p2porch from before mutual TLS)"
            )
        if reason in _OLD_TLS:
            return TlsFailure(f"node {where} and this CLI share no TLS version (the API needs 1.3)")
        own = self.own_certificate_problem()
        if own is not None:  # e.g. the node hung up mid-handshake: our certificate is why
            return TlsFailure(f"TLS with node {where} failed ({reason or err}): {own[0]}", own[1])
        return TlsFailure(f"TLS with node {where} failed: {reason or err}")

    # ------------------------------------------------------------------ API errors

    def _api_error(self, response: httpx.Response) -> ApiError:
        """The answer's error, with what to do about a 401 or a 403 added as details."""
        err = self._error_from(response)
        hints: tuple[str, ...] = ()
        if err.status == 401:
            path = self.target.config_path
            if self.target.credentials.cert_file is not None:
                sent = f"this CLI presented {self._whose()}"
            elif path is not None:
                sent = f"this CLI presented no client certificate: {path} names no certFile"
            else:
                sent = f"this CLI presented no client certificate: {self.config_in_use()}"
            hints = (sent, self.use_hint())
        elif err.status == 403:
            identity = self._identity()
            if identity is not None and identity.role == pki.ROLE_VIEWER:
                hints = (
                    f"{self._whose()}: a viewer reads the cluster's state; writes, "
                    "users and the join token need an admin",
                    "an admin can make admin credentials: p2porch user create NAME --role admin",
                )
        if not hints:
            return err
        return ApiError(err.status, err.code, err.message, (*err.details, *hints))

    @staticmethod
    def _error_from(response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            details = err.get("details") or []
            return ApiError(
                response.status_code,
                str(err.get("code") or f"http_{response.status_code}"),
                str(err.get("message") or response.reason_phrase),
                details if isinstance(details, list) else [details],
            )
        text = response.text.strip()[:300] or response.reason_phrase
        return ApiError(response.status_code, f"http_{response.status_code}", text)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One call; the decoded JSON answer (None for an empty body).

        ``timeout_s`` overrides the client's read timeout for calls known to take long.
        """
        extra: dict[str, Any] = {}
        if timeout_s is not None:
            extra["timeout"] = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        try:
            response = self._http.request(
                method,
                path,
                params={k: v for k, v in (params or {}).items() if v is not None},
                json=body,
                **extra,
            )
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        if response.status_code >= 400:
            raise self._api_error(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise BadResponse(
                f"node {self.target.display} answered {method} {path} with non-JSON: "
                f"{response.text[:120]!r}"
            ) from exc

    @contextmanager
    def _stream(
        self, method: str, path: str, params: Mapping[str, str | int], body: Any = None
    ) -> Iterator[httpx.Response]:
        # Following a stream may sit idle for hours: no read timeout, but a connect one.
        timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
        try:
            with self._http.stream(
                method, path, params=dict(params), json=body, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._api_error(response)
                yield response
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc

    def _list(self, path: str, params: Mapping[str, str | int] | None = None) -> list[Any]:
        answer = self.request("GET", path, params=params)
        if not isinstance(answer, list):
            raise BadResponse(f"expected a list from GET {path}, got {type(answer).__name__}")
        return answer

    def _object(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        answer = self.request(method, path, body=body, timeout_s=timeout_s)
        if answer is None:
            return {}
        if not isinstance(answer, dict):
            raise BadResponse(f"expected an object from {method} {path}")
        return answer

    # ------------------------------------------------------------------ cluster

    def healthz(self) -> bool:
        answer = self.request("GET", "/healthz")
        return isinstance(answer, dict) and answer.get("ok") is True

    def status(self) -> dict[str, Any]:
        return self._object("GET", "/v1/status")

    def nodes(self) -> list[Any]:
        return self._list("/v1/nodes")

    def node(self, name: str) -> dict[str, Any]:
        return self._object("GET", f"/v1/nodes/{_seg(name)}")

    def drain(self, name: str, drained: bool) -> dict[str, Any]:
        return self._object("POST", f"/v1/nodes/{_seg(name)}/drain", {"drained": drained})

    def remove_node(self, name: str) -> dict[str, Any]:
        return self._object("DELETE", f"/v1/nodes/{_seg(name)}")

    def leave(self) -> dict[str, Any]:
        return self._object("POST", "/v1/leave")

    def rebalance(self) -> dict[str, Any]:
        return self._object("POST", "/v1/rebalance")

    def token(self) -> str:
        return str(self.token_info()["token"])

    def token_info(self) -> dict[str, Any]:
        """``{"token", "expiresAt"}``: the join token in force and its expiry (epoch s|None)."""
        return self._token_answer("GET", "/v1/token", None)

    def rotate_token(self, ttl_s: float | None = None) -> dict[str, Any]:
        """A new join token; every older one stops working."""
        body = {} if ttl_s is None else {"ttlSeconds": ttl_s}
        return self._token_answer("POST", "/v1/token/rotate", body)

    def _token_answer(self, method: str, path: str, body: Any) -> dict[str, Any]:
        answer = self._object(method, path, body)
        if not isinstance(answer.get("token"), str):
            raise BadResponse(f"{method} {path} answered without a token")
        return answer

    # ------------------------------------------------------------------ security

    def ca(self) -> dict[str, Any]:
        """``{"ca": PEM bundle, "fingerprint"}`` (no credentials needed)."""
        return self._object("GET", "/v1/ca")

    def rotate_ca(
        self, *, finish: bool = False, force: bool = False, timeout_s: float = CA_ROTATION_TIMEOUT_S
    ) -> dict[str, Any]:
        """Replace the cluster CA (three logged steps, each confirmed by every member):
        ``{"fingerprint", "token"}`` -- the new CA's fingerprint and the join token pinning it."""
        body: dict[str, Any] = {}
        if finish:
            body["finish"] = True
        if force:
            body["force"] = True
        return self._object("POST", "/v1/ca/rotate", body, timeout_s=timeout_s)

    def create_user(self, name: str, role: str, csr_pem: str) -> dict[str, Any]:
        """Have the cluster CA sign ``csr_pem``: ``{"certificate", "ca", "role"}``."""
        return self._object("POST", "/v1/users", {"name": name, "role": role, "csr": csr_pem})

    def rotate_keys(self, timeout_s: float = KEY_ROTATION_TIMEOUT_S) -> dict[str, Any]:
        """A new gossip key on every live node: ``{"primary", "nodes"}``. Three log steps,
        each confirmed by every live node, so it may take far longer than a normal call."""
        return self._object("POST", "/v1/keys/rotate", {}, timeout_s=timeout_s)

    def secrets(self, namespace: str | None = None) -> list[Any]:
        """Secrets' names, keys, versions and users -- never their values."""
        return self._list("/v1/secrets", {"namespace": namespace} if namespace else None)

    def put_secret(self, namespace: str, name: str, data: Mapping[str, bytes]) -> dict[str, Any]:
        encoded = {key: base64.b64encode(value).decode("ascii") for key, value in data.items()}
        return self._object("PUT", f"/v1/secrets/{_seg(namespace)}/{_seg(name)}", {"data": encoded})

    def delete_secret(self, namespace: str, name: str) -> dict[str, Any]:
        return self._object("DELETE", f"/v1/secrets/{_seg(namespace)}/{_seg(name)}")

    # ------------------------------------------------------------------ namespaces, apps

    def namespaces(self) -> list[Any]:
        return self._list("/v1/namespaces")

    def apps(self, namespace: str | None = None) -> list[Any]:
        return self._list("/v1/apps", {"namespace": namespace} if namespace else None)

    def app(self, namespace: str, name: str) -> dict[str, Any]:
        return self._object("GET", f"/v1/apps/{_seg(namespace)}/{_seg(name)}")

    def put_app(self, namespace: str, name: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
        return self._object("PUT", f"/v1/apps/{_seg(namespace)}/{_seg(name)}", dict(manifest))

    def delete_app(self, namespace: str, name: str) -> dict[str, Any]:
        return self._object("DELETE", f"/v1/apps/{_seg(namespace)}/{_seg(name)}")

    def delete_namespace(self, name: str) -> dict[str, Any]:
        return self._object("DELETE", f"/v1/namespaces/{_seg(name)}")

    def scale(self, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        return self._object(
            "POST", f"/v1/apps/{_seg(namespace)}/{_seg(name)}/scale", {"replicas": replicas}
        )

    def apply(self, documents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._object("POST", "/v1/apply", {"documents": [dict(d) for d in documents]})

    def delete_documents(self, documents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._object("POST", "/v1/delete", {"documents": [dict(d) for d in documents]})

    # ------------------------------------------------------------------ replicas, events

    def replicas(
        self, namespace: str | None = None, app: str | None = None, node: str | None = None
    ) -> list[Any]:
        params = {k: v for k, v in (("namespace", namespace), ("app", app), ("node", node)) if v}
        return self._list("/v1/replicas", params)

    def exec(self, namespace: str, replica: str, command: Sequence[str]) -> dict[str, Any]:
        return self._object(
            "POST",
            f"/v1/replicas/{_seg(namespace)}/{_seg(replica)}/exec",
            {"command": list(command)},
        )

    def logs(
        self, namespace: str, replica: str, *, follow: bool, tail: int | None
    ) -> Iterator[bytes]:
        """The replica's log bytes as they arrive (the node proxies to the owner)."""
        params: dict[str, str | int] = {"follow": 1 if follow else 0}
        if tail is not None:
            params["tail"] = tail
        path = f"/v1/replicas/{_seg(namespace)}/{_seg(replica)}/logs"
        with self._stream("GET", path, params) as response:
            try:
                yield from response.iter_bytes()
            except httpx.HTTPError as exc:
                raise self._translate(exc) from exc

    def events(self, *, follow: bool) -> Iterator[dict[str, Any] | str]:
        """Events as decoded objects; a line that is not a JSON object is yielded as text."""
        with self._stream("GET", "/v1/events", {"follow": 1 if follow else 0}) as response:
            try:
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        yield line
                        continue
                    yield event if isinstance(event, dict) else line
            except httpx.HTTPError as exc:
                raise self._translate(exc) from exc

    def recent_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events(follow=False) if isinstance(e, dict)]
