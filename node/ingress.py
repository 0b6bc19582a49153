"""The HTTP ingress: one node port that routes each request by host and path to an app replica.

Every node runs it on its advertise address (port 80 by default), so a user can point DNS at
any node -- or all of them -- and reach every app. A request is matched against the rules
(:func:`match_rule`), a ready replica of the rule's app is picked from the cluster-wide
:class:`~p2porch.node.endpoints.EndpointTable` by a :class:`~p2porch.node.balance.Balancer`
(``prefer_local=False``: requests spread over the whole cluster, which is what a user
refreshing a page expects), and the request is relayed to the replica's published port.

The pure half (rules, matching, header rewriting, error pages) has no I/O and no clock; the
trio half (:class:`Ingress`) only moves bytes and enforces limits, in the same discipline as
the API server (node/http.py): a header deadline (a client trickling its head cannot hold a
connection), an idle deadline on keep-alive connections, a connection cap, and bodies streamed
chunk by chunk in both directions -- every chunk is sent before the next is read, so a
multi-gigabyte upload or download costs one buffer, never the whole body. h11 parses both
sides.

Choices, and why:

- **Upstream connections are reused** for replayable requests (GET/HEAD/OPTIONS without a
  body): a finished exchange parks its connection for ``upstream_keepalive_s`` (default 4 s,
  below the 5 s keep-alive timeout of common app servers, so the replica rarely closes one we
  are about to use), and a parked connection the replica closed is noticed (readable EOF)
  before use. If a reused connection still fails before any response byte, the request goes
  once more on a fresh connection to the same replica. Other requests (a body, or a
  non-idempotent method) always get a fresh connection: a stale-connection race could
  otherwise turn into a failed or duplicated POST.
- **Retries**: a connect failure (refused, timeout) moves to another replica (never the same
  one twice), up to ``max_connect_attempts``. After the request was sent, only a replayable
  request with no response byte yet is retried. A replica that does not answer within
  ``upstream_timeout_s`` gets a 504 and no retry (retrying a slow app multiplies the wait).
- **Hop-by-hop headers** (Connection and the headers it names, Keep-Alive, TE, Trailer,
  Transfer-Encoding, Upgrade, Proxy-*, and ``Proxy`` -- the httpoxy header a CGI app would
  read as ``HTTP_PROXY``) are never forwarded. Body framing is re-derived from what h11
  parsed (Content-Length kept, or chunked), so a ``Connection: content-length`` trick cannot
  desynchronise the two sides. Trailers of chunked bodies are dropped. ``Expect:
  100-continue`` is answered by the ingress once a replica is connected, and not forwarded.
- **Websockets**: ``Connection: Upgrade`` + ``Upgrade: websocket`` travel to the replica; a
  101 answer turns both connections into a raw byte splice with half-close (idle limit
  ``tunnel_idle_timeout_s``); any other answer is relayed as a normal response. Other
  upgrades (h2c, ...) are stripped and answered over HTTP/1.1.
- **Our own pages** (404 no rule, 503 no ready replica with Retry-After, 502 bad gateway,
  504 timeout, 400/408/431 bad or slow requests) are short HTML with ``Server: p2porch``;
  the replicas' own responses pass through untouched.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import logging
import math
import select
from collections import Counter
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio

from p2porch.node.balance import Balancer, EndpointKey, Strategy, endpoint_key
from p2porch.node.endpoints import Endpoint, EndpointTable
from p2porch.node.errors import NodeError

log = logging.getLogger("p2porch.ingress")

HeaderList = list[tuple[bytes, bytes]]
Address = tuple[str, int]

BUFFER_BYTES = 64 * 1024
LINGER_S = 2.0
LINGER_BYTES = 1 << 20
REPLAYABLE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})

# Never forwarded in either direction (RFC 9110 7.6.1), whatever Connection lists.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy",  # httpoxy: CGI turns it into HTTP_PROXY
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Headers the ingress sets itself; a client's own values are replaced (or appended to).
_REWRITTEN = frozenset(
    {b"host", b"content-length", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for"}
)


class IngressError(NodeError):
    """Root of the ingress's errors."""


class UpstreamError(IngressError):
    """One attempt at a replica failed; the fields say whether another attempt is safe.

    ``stage`` is "connect" (nothing reached the replica) or "exchange" (the request, or part of
    it, was sent); ``got_bytes``: the replica sent at least one response byte; ``started``: the
    response head already went to the client, so no error page can follow; ``timeout``: the
    replica was too slow rather than broken.
    """

    def __init__(self, reason: str, *, stage: str = "exchange", timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.timeout = timeout
        self.got_bytes = False
        self.started = False


class _ClientGone(IngressError):
    """The client went away, stalled or broke the protocol: its connection just ends."""


# ---------------------------------------------------------------------------------------------
# Rules and matching (pure)


def normalize_host(host: str) -> str:
    """A Host header as rules compare it: lower case, no port, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # "[::1]:8080"
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.partition(":")[0].rstrip(".")


def _rule_host(value: str) -> str:
    return value.strip().lower().rstrip(".")


def _check_rule_host(_inst: object, _attr: object, value: str) -> None:
    if value == "":
        return
    name = value[2:] if value.startswith("*.") else value
    if not name or "*" in name or any(c in name for c in " /:?#@[]\\"):
        raise ValueError(
            f"ingress host {value!r}: use an exact name, '*.domain' or '' for any host"
        )


def _rule_path(value: str) -> str:
    # "/api/" and "/api" name the same prefix: matching is by whole segments anyway.
    return (value.rstrip("/") or "/") if value.startswith("/") else value


def _check_rule_path(_inst: object, _attr: object, value: str) -> None:
    if not value.startswith("/") or any(c in value for c in "?# \x00"):
        raise ValueError(f"ingress path {value!r}: a path prefix starting with '/'")


def _check_name(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"ingress rule: {attr.name} must not be empty")


def _check_port(_inst: object, _attr: object, value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"ingress rule: container_port {value} is not in 1..65535")


@attrs.frozen(kw_only=True)
class IngressRule:
    """Send requests for ``host`` + ``path`` to ``container_port`` of ``namespace/app``.

    ``host``: an exact name, ``*.example.com`` (exactly one more label, as in Kubernetes:
    ``a.example.com`` but neither ``example.com`` nor ``a.b.example.com``), or "" for any
    host. ``path`` is a prefix matched on whole segments: "/api" takes "/api" and "/api/x",
    never "/apix".
    """

    host: str = attrs.field(converter=_rule_host, validator=_check_rule_host)
    path: str = attrs.field(default="/", converter=_rule_path, validator=_check_rule_path)
    namespace: str = attrs.field(validator=_check_name)
    app: str = attrs.field(validator=_check_name)
    container_port: int = attrs.field(validator=_check_port)
    strategy: Strategy = Strategy.ROUND_ROBIN


def _host_rank(rule_host: str, host: str) -> int | None:
    """0 exact, 1 wildcard, 2 any host; None when the rule does not take ``host``."""
    if rule_host == "":
        return 2
    if rule_host.startswith("*."):
        suffix = rule_host[1:]
        label = host[: -len(suffix)] if host.endswith(suffix) else ""
        return 1 if label and "." not in label else None
    return 0 if rule_host == host else None


def path_matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return path.startswith("/")
    return path == prefix or path.startswith(prefix + "/")


def match_rule(rules: Iterable[IngressRule], host_header: str, path: str) -> IngressRule | None:
    """The rule for a request: exact host beats wildcard beats any host, then the longest
    path prefix, then (namespace, app, container_port) so the choice never depends on order."""
    host = normalize_host(host_header)
    best: IngressRule | None = None
    best_key: tuple[int, int, str, str, int] | None = None
    for rule in rules:
        rank = _host_rank(rule.host, host)
        if rank is None or not path_matches(rule.path, path):
            continue
        key = (rank, -len(rule.path), rule.namespace, rule.app, rule.container_port)
        if best_key is None or key < best_key:
            best, best_key = rule, key
    return best


def route_target(host_header: str, target: str) -> tuple[str, str]:
    """(host, path) to route by: an absolute-form target's authority beats the Host header
    (RFC 9112 3.2.2); the query string never takes part."""
    if "://" in target and not target.startswith("/"):
        try:
            parts = urlsplit(target)
        except ValueError:
            return host_header, ""
        return parts.netloc.rpartition("@")[2], parts.path or "/"
    return host_header, target.partition("?")[0].partition("#")[0]


# ---------------------------------------------------------------------------------------------
# Header rewriting (pure)


def _tokens(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    out: set[bytes] = set()
    for key, value in headers:
        if key.lower() == name:
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Every value of ``name`` joined with ", " (None when absent)."""
    values = [v for k, v in headers if k.lower() == name]
    return b", ".join(values) if values else None


def is_websocket_upgrade(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return b"upgrade" in _tokens(headers, b"connection") and b"websocket" in _tokens(
        headers, b"upgrade"
    )


def _forwarded_node(ip: str) -> str:
    """RFC 7239 node: IPv6 in brackets and quotes."""
    return f'"[{ip}]"' if ":" in ip else ip


def _end_to_end(headers: Sequence[tuple[bytes, bytes]], keep_upgrade: bool) -> HeaderList:
    drop = set(HOP_BY_HOP) | _tokens(headers, b"connection")
    if keep_upgrade:
        drop.discard(b"upgrade")
    return [
        (k.lower(), v)
        for k, v in headers
        if k.lower() not in drop and not k.lower().startswith(b"proxy-")
    ]


def forward_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client_ip: str,
    websocket: bool = False,
    fallback_host: str = "",
) -> HeaderList:
    """The headers a replica receives: hop-by-hop ones dropped, framing re-derived, the
    original Host kept (apps serve virtual hosts), X-Forwarded-* and Forwarded added, Expect
    removed (the ingress sends 100 Continue itself)."""
    host = header_value(headers, b"host")
    client_host = host.decode("latin-1") if host is not None else ""
    host_text = client_host or fallback_host
    # Expect: the ingress answers "100 Continue" itself once it reached a replica.
    out = [
        (k, v) for k, v in _end_to_end(headers, websocket) if k not in _REWRITTEN and k != b"expect"
    ]
    out.insert(0, (b"host", host_text.encode("latin-1")))
    if b"transfer-encoding" in {k.lower() for k, _ in headers}:
        out.append((b"transfer-encoding", b"chunked"))
    else:
        length = header_value(headers, b"content-length")
        if length is not None:
            out.append((b"content-length", length.split(b",")[0].strip()))
    if websocket:
        out.append((b"connection", b"Upgrade"))
    previous = header_value(headers, b"x-forwarded-for")
    xff = client_ip.encode() if previous is None else previous + b", " + client_ip.encode()
    out.append((b"x-forwarded-for", xff))
    out.append((b"x-forwarded-proto", b"http"))
    if client_host:
        out.append((b"x-forwarded-host", client_host.encode("latin-1")))
    element = f"for={_forwarded_node(client_ip)};proto=http"
    if client_host:
        escaped = client_host.replace("\\", "\\\\").replace('"', '\\"')
        element += f';host="{escaped}"'
    forwarded = [v for k, v in out if k == b"forwarded"]
    out = [(k, v) for k, v in out if k != b"forwarded"]
    out.append((b"forwarded", b", ".join([*forwarded, element.encode("latin-1")])))
    return out


def forward_response_headers(
    headers: Sequence[tuple[bytes, bytes]], *, switching: bool = False
) -> HeaderList:
    """The headers the client receives from a replica: hop-by-hop ones dropped (h11 frames
    the body again); a 101 keeps Upgrade and says ``Connection: Upgrade``."""
    out = _end_to_end(headers, switching)
    if b"transfer-encoding" in {k.lower() for k, _ in headers}:
        # Both framings present: Transfer-Encoding wins (RFC 9112 6.3); never pass both on.
        out = [(k, v) for k, v in out if k != b"content-length"]
    if switching:
        out.append((b"connection", b"Upgrade"))
    return out


def error_page(
    status: int, message: str, *, retry_after_s: int | None = None, close: bool = False
) -> tuple[HeaderList, bytes]:
    """(headers, body) of one of the ingress's own short HTML pages."""
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = str(status)
    body = (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n<body><h1>{html.escape(title)}</h1>\n"
        f"<p>{html.escape(message)}</p>\n<hr><p>p2porch ingress</p></body></html>\n"
    ).encode()
    headers: HeaderList = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"server", b"p2porch"),
        (b"cache-control", b"no-store"),
    ]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    if close:
        headers.append((b"connection", b"close"))
    return headers, body


# ---------------------------------------------------------------------------------------------
# Configuration


def _positive(name: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name} must be > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class IngressConfig:
    """Limits of one node's ingress. Seconds and bytes are in the names.

    ``header_timeout_s``: a request head must arrive within it (from the connection's start,
    or from the first byte of a later request). ``idle_timeout_s``: how long a keep-alive
    connection may wait for its next request. ``connect_timeout_s``: one connect attempt.
    ``upstream_timeout_s``: the wait for a response head after the request was sent, and for
    each piece of a response body. ``body_timeout_s``: the longest stall of a body in either
    direction (a read from the client, a write to either side). ``upstream_keepalive_s``: how
    long an upstream connection stays parked for reuse (0: never reused).
    """

    header_timeout_s: float = 10.0
    idle_timeout_s: float = 75.0
    connect_timeout_s: float = 3.0
    upstream_timeout_s: float = 60.0
    max_connections: int = 1024
    max_header_bytes: int = 64 * 1024
    max_connect_attempts: int = 3
    body_timeout_s: float = 60.0
    tunnel_idle_timeout_s: float = 3600.0
    upstream_keepalive_s: float = 4.0
    max_idle_per_replica: int = 8
    retry_after_s: int = 5

    def __attrs_post_init__(self) -> None:
        for name in (
            "header_timeout_s",
            "idle_timeout_s",
            "connect_timeout_s",
            "upstream_timeout_s",
            "body_timeout_s",
            "tunnel_idle_timeout_s",
        ):
            _positive(name, getattr(self, name))
        if not self.upstream_keepalive_s >= 0:
            raise ValueError(f"upstream_keepalive_s must be >= 0, got {self.upstream_keepalive_s}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")
        if self.max_connect_attempts < 1:
            raise ValueError(f"max_connect_attempts must be >= 1, got {self.max_connect_attempts}")
        if self.max_idle_per_replica < 0:
            raise ValueError(f"max_idle_per_replica must be >= 0, got {self.max_idle_per_replica}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.connect_timeout_s > self.upstream_timeout_s:
            raise ValueError(
                f"connect_timeout_s ({self.connect_timeout_s}) must not exceed "
                f"upstream_timeout_s ({self.upstream_timeout_s}): a connect is part of the wait"
            )
        if self.upstream_keepalive_s >= self.idle_timeout_s:
            raise ValueError(
                f"upstream_keepalive_s ({self.upstream_keepalive_s}) must be below "
                f"idle_timeout_s ({self.idle_timeout_s})"
            )


# ---------------------------------------------------------------------------------------------
# The trio shell


@attrs.define
class IngressCounters:
    connections: int = 0
    refused_connections: int = 0
    requests: int = 0
    bad_requests: int = 0
    header_timeouts: int = 0
    no_rule: int = 0
    no_endpoint: int = 0
    upstream_failures: int = 0
    upstream_timeouts: int = 0
    retries: int = 0
    websocket_upgrades: int = 0
    upstream_connects: int = 0
    upstream_reuses: int = 0
    responses: Counter[str] = attrs.field(factory=Counter)


class _Client:
    """One client connection: its stream, its h11 server state and its address."""

    def __init__(self, stream: trio.SocketStream, peer_ip: str, max_header_bytes: int) -> None:
        self.stream = stream
        self.peer_ip = peer_ip
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)

    async def send(self, event: h11.Event, timeout_s: float) -> None:
        try:
            data = self.conn.send(event)
            if data:
                with trio.fail_after(timeout_s):
                    await self.stream.send_all(data)
        except (
            h11.LocalProtocolError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ) as exc:
            raise _ClientGone(f"sending to the client failed: {exc!r}") from exc

    async def next_event(self, timeout_s: float) -> object:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _ClientGone(f"client broke the protocol: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                with trio.fail_after(timeout_s):
                    data = await self.stream.receive_some(BUFFER_BYTES)
            except (
                trio.TooSlowError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ) as exc:
                raise _ClientGone(f"reading from the client failed: {exc!r}") from exc
            self.conn.receive_data(data)


class _Upstream:
    """One connection to a replica and its h11 client state."""

    def __init__(self, stream: trio.SocketStream, address: Address, max_header_bytes: int) -> None:
        self.stream = stream
        self.address = address
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.reused = False
        self.got_bytes = False

    @property
    def where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def close(self) -> None:
        self.stream.socket.close()

    def stale(self) -> bool:
        """A parked connection with anything to read (EOF, reset, stray bytes) is unusable."""
        try:
            poller = select.poll()
            poller.register(self.stream.socket.fileno(), select.POLLIN | select.POLLERR)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    async def send(self, event: h11.Event, timeout_s: float) -> None:
        try:
            data = self.conn.send(event)
            if data:
                with trio.fail_after(timeout_s):
                    await self.stream.send_all(data)
        except trio.TooSlowError as exc:
            raise UpstreamError(f"sending to {self.where} stalled for {timeout_s} s") from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamError(f"sending to {self.where} failed: {_describe(exc)}") from exc
        except h11.LocalProtocolError as exc:
            raise UpstreamError(f"cannot send to {self.where}: {exc}") from exc

    async def next_event(self, timeout_s: float | None) -> object:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._error(f"invalid response from {self.where}: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                if timeout_s is None:
                    data = await self.stream.receive_some(BUFFER_BYTES)
                else:
                    with trio.fail_after(timeout_s):
                        data = await self.stream.receive_some(BUFFER_BYTES)
            except trio.TooSlowError as exc:
                raise self._error(
                    f"{self.where} sent nothing for {timeout_s} s", timeout=True
                ) from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._error(f"reading from {self.where} failed: {_describe(exc)}") from exc
            if data:
                self.got_bytes = True
            self.conn.receive_data(data)

    def _error(self, reason: str, *, timeout: bool = False) -> UpstreamError:
        error = UpstreamError(reason, timeout=timeout)
        error.got_bytes = self.got_bytes
        return error


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class _IdlePool:
    """Parked upstream connections per replica address, most recently used first."""

    def __init__(self, keepalive_s: float, per_address: int) -> None:
        self.keepalive_s = keepalive_s
        self.per_address = per_address
        self._idle: dict[Address, list[tuple[float, _Upstream]]] = {}
        self.parked = trio.Event()  # set while anything is parked (wakes the sweeper)

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def take(self, address: Address, now: float) -> _Upstream | None:
        parked = self._idle.get(address)
        while parked:
            since, up = parked.pop()
            if now - since < self.keepalive_s and not up.stale():
                return up
            up.close()
        return None

    def park(self, up: _Upstream, now: float) -> None:
        parked = self._idle.setdefault(up.address, [])
        parked.append((now, up))
        self.parked.set()
        while len(parked) > self.per_address:
            parked.pop(0)[1].close()

    def sweep(self, now: float) -> None:
        for address in list(self._idle):
            keep = []
            for since, up in self._idle[address]:
                if now - since < self.keepalive_s:
                    keep.append((since, up))
                else:
                    up.close()
            if keep:
                self._idle[address] = keep
            else:
                del self._idle[address]
        if not self._idle:
            self.parked = trio.Event()

    def close_all(self) -> None:
        for parked in self._idle.values():
            for _since, up in parked:
                up.close()
        self._idle.clear()


@attrs.frozen
class _Plan:
    """What one client request asks for, decided before any replica is tried."""

    rule: IngressRule
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    has_body: bool
    websocket: bool
    http11: bool

    @property
    def replayable(self) -> bool:
        return self.method in REPLAYABLE_METHODS and not self.has_body


@attrs.define
class _Upload:
    done: bool = False
    client_error: _ClientGone | None = None
    upstream_error: UpstreamError | None = None


def _source_address(listen_host: str) -> str | None:
    """Outbound connections leave from the address we listen on (see docs/architecture.md),
    unless that is a wildcard or a name."""
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:
        return None
    return None if address.is_unspecified else str(address)


class Ingress:
    """Serves the ingress on ``listen_host:port``; :meth:`set_rules` swaps the rule set."""

    def __init__(
        self,
        table: EndpointTable,
        listen_host: str,
        port: int,
        config: IngressConfig,
        local_node: str,
    ) -> None:
        self.table = table
        self.listen_host = listen_host
        self.port = port
        self.config = config
        self.local_node = local_node
        self.counters = IngressCounters()
        self.bound_port: int | None = None
        self._rules: tuple[IngressRule, ...] = ()
        self._balancers: dict[tuple[str, str, int, Strategy], Balancer] = {}
        self._open = 0
        self._source = _source_address(listen_host)
        self._pool = _IdlePool(config.upstream_keepalive_s, config.max_idle_per_replica)

    # ---- control

    def set_rules(self, rules: Iterable[IngressRule]) -> None:
        """Take a new rule set; balancers of routes still in use keep their state."""
        self._rules = tuple(rules)
        used = {(r.namespace, r.app, r.container_port, r.strategy) for r in self._rules}
        self._balancers = {k: v for k, v in self._balancers.items() if k in used}

    def rules(self) -> tuple[IngressRule, ...]:
        return self._rules

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "listening": self.bound_port is not None,
            "address": f"{self.listen_host}:{self.bound_port or self.port}",
            "rules": len(self._rules),
            "active_connections": self._open,
            "connections": c.connections,
            "refused_connections": c.refused_connections,
            "requests": c.requests,
            "responses": {k: c.responses[k] for k in sorted(c.responses)},
            "bad_requests": c.bad_requests,
            "header_timeouts": c.header_timeouts,
            "no_rule_404": c.no_rule,
            "no_endpoint_503": c.no_endpoint,
            "upstream_failures": c.upstream_failures,
            "upstream_timeouts": c.upstream_timeouts,
            "retries": c.retries,
            "websocket_upgrades": c.websocket_upgrades,
            "upstream_connects": c.upstream_connects,
            "upstream_reuses": c.upstream_reuses,
            "idle_upstream_connections": len(self._pool),
        }

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound port."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.listen_host or None)
        self.bound_port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                if self.config.upstream_keepalive_s > 0:
                    nursery.start_soon(self._sweep_idle)
                task_status.started(self.bound_port)
                await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)
        finally:
            self.bound_port = None
            self._pool.close_all()

    async def _sweep_idle(self) -> None:
        while True:
            if not len(self._pool):
                # Nothing parked: sleep until something is (an idle node must not wake).
                await self._pool.parked.wait()
            await trio.sleep(self.config.upstream_keepalive_s)
            self._pool.sweep(trio.current_time())

    # ---- client connections

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self._open >= self.config.max_connections:
            self.counters.refused_connections += 1
            await stream.aclose()
            return
        self._open += 1
        self.counters.connections += 1
        try:
            peer = stream.socket.getpeername()
            client = _Client(stream, str(peer[0]), self.config.max_header_bytes)
            await self._serve(client)
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("ingress connection failed")
        finally:
            self._open -= 1
            with trio.move_on_after(1):
                await stream.aclose()

    async def _serve(self, client: _Client) -> None:
        first = True
        while True:
            head = await self._read_head(client, first)
            if head is None:
                return
            first = False
            self.counters.requests += 1
            if not await self._handle(client, head):
                return
            conn = client.conn
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_head(self, client: _Client, first: bool) -> h11.Request | None:
        """The next request head, or None when the connection should end (answered already
        when the client was at fault)."""
        cfg = self.config
        # On a kept-alive connection the wait for the next request is the idle timeout; its
        # first byte starts the header clock. Bytes already buffered (pipelining) start it now.
        waiting = not first and not client.conn.trailing_data[0]
        got_bytes = bool(client.conn.trailing_data[0])
        with trio.move_on_after(cfg.idle_timeout_s if waiting else cfg.header_timeout_s) as scope:
            while True:
                try:
                    event = client.conn.next_event()
                except h11.RemoteProtocolError as exc:
                    self.counters.bad_requests += 1
                    await self._page(
                        client, exc.error_status_hint, f"bad request: {exc}", close=True
                    )
                    return None
                if event is h11.NEED_DATA:
                    data = await client.stream.receive_some(BUFFER_BYTES)
                    if data:
                        got_bytes = True
                        if waiting:
                            waiting = False
                            scope.deadline = trio.current_time() + cfg.header_timeout_s
                    client.conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    return event
                return None  # ConnectionClosed
        if not waiting:
            self.counters.header_timeouts += 1
            if got_bytes:
                await self._page(client, 408, "request header timeout", close=True)
        return None

    async def _handle(self, client: _Client, head: h11.Request) -> bool:
        """Answer one request; True when the connection may carry another."""
        cfg = self.config
        has_body = header_value(head.headers, b"transfer-encoding") is not None or (
            header_value(head.headers, b"content-length") not in (None, b"0")
        )
        if not has_body:
            # Take the request's end now, so our own pages can keep the connection alive.
            event = await client.next_event(cfg.header_timeout_s)
            if not isinstance(event, h11.EndOfMessage):
                raise _ClientGone("request without a body did not end")
        method = head.method
        if sum(1 for k, _ in head.headers if k == b"host") > 1:
            self.counters.bad_requests += 1
            return await self._page(
                client, 400, "bad request: more than one Host header", close=True
            )
        if method == b"CONNECT":
            return await self._page(client, 405, "CONNECT is not supported here", close=True)
        host_value = header_value(head.headers, b"host")
        target = head.target.decode("latin-1")
        host_header, path = route_target(host_value.decode("latin-1") if host_value else "", target)
        rule = match_rule(self._rules, host_header, path)
        if rule is None:
            self.counters.no_rule += 1
            return await self._page(
                client,
                404,
                f"no ingress rule for host {normalize_host(host_header) or '(none)'!r} "
                f"and path {path!r}",
                method=method,
            )
        websocket = method == b"GET" and is_websocket_upgrade(head.headers)
        headers = forward_request_headers(
            head.headers,
            client_ip=client.peer_ip,
            websocket=websocket,
            fallback_host=f"{self.listen_host}:{self.bound_port or self.port}",
        )
        plan = _Plan(
            rule=rule,
            method=method,
            target=head.target,
            headers=tuple(headers),
            has_body=has_body,
            websocket=websocket,
            http11=head.http_version >= b"1.1",
        )
        return await self._proxy(client, plan)

    # ---- choosing replicas and retrying

    def _balancer(self, rule: IngressRule) -> Balancer:
        key = (rule.namespace, rule.app, rule.container_port, rule.strategy)
        balancer = self._balancers.get(key)
        if balancer is None:
            balancer = Balancer(self.local_node, strategy=rule.strategy, prefer_local=False)
            self._balancers[key] = balancer
        return balancer

    async def _proxy(self, client: _Client, plan: _Plan) -> bool:
        cfg = self.config
        rule = plan.rule
        addresses: dict[EndpointKey, Address] = {}
        endpoints: list[Endpoint] = []
        for candidate in self.table.endpoints(rule.namespace, rule.app):
            address = candidate.address(rule.container_port)
            if address is not None:
                addresses[endpoint_key(candidate)] = address
                endpoints.append(candidate)
        name = f"{rule.namespace}/{rule.app}"
        if not endpoints:
            self.counters.no_endpoint += 1
            return await self._page(
                client,
                503,
                f"no ready replica of {name}",
                retry_after_s=cfg.retry_after_s,
                method=plan.method,
            )
        balancer = self._balancer(rule)
        excluded: set[EndpointKey] = set()
        last = UpstreamError("no replica could be tried")
        attempts = 0
        while attempts < cfg.max_connect_attempts:
            ep = balancer.choose(endpoints, exclude=excluded)
            if ep is None:
                break
            if attempts:
                self.counters.retries += 1
            attempts += 1
            balancer.acquire(ep)
            try:
                return await self._attempt(client, plan, addresses[endpoint_key(ep)])
            except UpstreamError as exc:
                self.counters.upstream_failures += 1
                if exc.timeout and exc.stage != "connect":
                    self.counters.upstream_timeouts += 1
                log.debug("ingress: %s replica %s: %s", name, ep.replica, exc.reason)
                last = exc
                if exc.started:
                    return False  # the response was cut half-way: only closing tells the client
                retryable = exc.stage == "connect" or (
                    plan.replayable and not exc.got_bytes and not exc.timeout
                )
                if not retryable:
                    break
                excluded.add(endpoint_key(ep))
            finally:
                balancer.release(ep)
        if last.timeout and last.stage != "connect":
            return await self._page(
                client, 504, f"gateway timeout: {name}: {last.reason}", method=plan.method
            )
        detail = f" ({attempts} attempts)" if attempts > 1 else ""
        return await self._page(
            client, 502, f"bad gateway: {name}: {last.reason}{detail}", method=plan.method
        )

    async def _attempt(self, client: _Client, plan: _Plan, address: Address) -> bool:
        """One replica: a parked connection first when the request allows it, then a new one."""
        if plan.replayable and not plan.websocket:
            up = self._pool.take(address, trio.current_time())
            if up is not None:
                self.counters.upstream_reuses += 1
                try:
                    return await self._exchange(client, plan, up)
                except UpstreamError as exc:
                    if exc.started or exc.got_bytes or exc.timeout:
                        raise
                    # The replica had closed the parked connection: not the replica's fault.
        up = await self._connect(address)
        return await self._exchange(client, plan, up)

    async def _connect(self, address: Address) -> _Upstream:
        host, port = address
        timeout_s = self.config.connect_timeout_s
        try:
            with trio.fail_after(timeout_s):
                stream = await trio.open_tcp_stream(host, port, local_address=self._source)
        except trio.TooSlowError as exc:
            raise UpstreamError(
                f"connect to {host}:{port} timed out after {timeout_s} s",
                stage="connect",
                timeout=True,
            ) from exc
        except OSError as exc:
            # trio wraps each address's failure: "all attempts failed" from a group of OSErrors.
            cause: BaseException = exc
            group = exc.__cause__
            if isinstance(group, BaseExceptionGroup) and group.exceptions:
                cause = group.exceptions[-1]
            raise UpstreamError(
                f"cannot connect to {host}:{port}: {_describe(cause)}", stage="connect"
            ) from exc
        self.counters.upstream_connects += 1
        return _Upstream(stream, address, self.config.max_header_bytes)

    # ---- one exchange with one replica

    async def _exchange(self, client: _Client, plan: _Plan, up: _Upstream) -> bool:
        cfg = self.config
        try:
            await up.send(
                h11.Request(method=plan.method, target=plan.target, headers=list(plan.headers)),
                cfg.body_timeout_s,
            )
            if plan.has_body:
                if client.conn.they_are_waiting_for_100_continue:
                    # We took Expect off the forwarded request: a replica is there, so invite
                    # the body ourselves (as nginx does) rather than wait on an app that may
                    # never send 100 Continue.
                    await client.send(
                        h11.InformationalResponse(status_code=100, headers=[]), cfg.body_timeout_s
                    )
                return await self._exchange_with_body(client, plan, up)
            await up.send(h11.EndOfMessage(), cfg.body_timeout_s)
            head_scope = trio.CancelScope(deadline=trio.current_time() + cfg.upstream_timeout_s)
            return await self._respond(client, plan, up, head_scope)
        finally:
            self._release(up)

    def _release(self, up: _Upstream) -> None:
        conn = up.conn
        if (
            self.config.upstream_keepalive_s > 0
            and self.config.max_idle_per_replica > 0
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]  # bytes past the response: the stream is not clean
        ):
            conn.start_next_cycle()
            up.reused = True
            up.got_bytes = False
            self._pool.park(up, trio.current_time())
        else:
            up.close()

    async def _exchange_with_body(self, client: _Client, plan: _Plan, up: _Upstream) -> bool:
        """Upload and response run side by side: a replica may answer (413, 401) before it
        read the whole body, and must not wait on us to finish an upload it refuses."""
        head_scope = trio.CancelScope(deadline=math.inf)
        upload = _Upload()
        error: UpstreamError | _ClientGone | None = None
        keep = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upload, client, up, upload, head_scope, nursery.cancel_scope)
            try:
                keep = await self._respond(client, plan, up, head_scope)
            except (UpstreamError, _ClientGone) as exc:
                error = exc
            # The response is over; an upload still running is one the replica did not want.
            nursery.cancel_scope.cancel()
        if upload.client_error is not None:
            raise upload.client_error
        if error is not None:
            if isinstance(error, UpstreamError) and upload.upstream_error is not None:
                error.reason = f"{upload.upstream_error.reason}; then {error.reason}"
            raise error
        if not upload.done:
            # The client's body is partly unread: this connection cannot carry another request.
            await self._linger(client)
            return False
        return keep

    async def _upload(
        self,
        client: _Client,
        up: _Upstream,
        state: _Upload,
        head_scope: trio.CancelScope,
        everything: trio.CancelScope,
    ) -> None:
        timeout_s = self.config.body_timeout_s
        try:
            while True:
                event = await client.next_event(timeout_s)
                if isinstance(event, h11.Data):
                    await up.send(h11.Data(data=event.data), timeout_s)
                elif isinstance(event, h11.EndOfMessage):
                    await up.send(h11.EndOfMessage(), timeout_s)
                    break
                else:
                    state.client_error = _ClientGone(f"unexpected {event!r} in a request body")
                    everything.cancel()
                    return
            state.done = True
        except _ClientGone as exc:
            state.client_error = exc
            everything.cancel()
            return
        except UpstreamError as exc:
            state.upstream_error = exc
        # The request is (or will never be) complete: from now the replica's wait is bounded.
        head_scope.deadline = trio.current_time() + self.config.upstream_timeout_s

    async def _respond(
        self, client: _Client, plan: _Plan, up: _Upstream, head_scope: trio.CancelScope
    ) -> bool:
        cfg = self.config
        head: h11.Response | h11.InformationalResponse | None = None
        with head_scope:
            head = await self._response_head(client, plan, up)
        if head is None:
            error = UpstreamError(
                f"{up.where} did not answer within {cfg.upstream_timeout_s} s", timeout=True
            )
            error.got_bytes = up.got_bytes
            raise error
        if isinstance(head, h11.InformationalResponse):
            return await self._tunnel(client, up, head)
        await client.send(
            h11.Response(
                status_code=head.status_code,
                headers=forward_response_headers(head.headers),
                reason=head.reason,
            ),
            cfg.body_timeout_s,
        )
        self.counters.responses[f"{head.status_code // 100}xx"] += 1
        try:
            while True:
                event = await up.next_event(cfg.upstream_timeout_s)
                if isinstance(event, h11.Data):
                    await client.send(h11.Data(data=event.data), cfg.body_timeout_s)
                elif isinstance(event, h11.EndOfMessage):
                    await client.send(h11.EndOfMessage(), cfg.body_timeout_s)
                    return True
                else:
                    raise up._error(f"unexpected {event!r} from {up.where}")
        except UpstreamError as exc:
            exc.started = True
            raise

    async def _response_head(
        self, client: _Client, plan: _Plan, up: _Upstream
    ) -> h11.Response | h11.InformationalResponse:
        """The final response head, or a 101; other 1xx (100 Continue) go to the client."""
        while True:
            event = await up.next_event(None)
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    return event
                if plan.http11:
                    informational = h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=forward_response_headers(event.headers),
                        reason=event.reason,
                    )
                    # Shielded: a half-written head would leave the client stream corrupt.
                    with trio.CancelScope(shield=True):
                        await client.send(informational, self.config.body_timeout_s)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise up._error(f"{up.where} closed the connection without answering")
            raise up._error(f"unexpected {type(event).__name__} from {up.where}")

    # ---- websockets

    async def _tunnel(
        self, client: _Client, up: _Upstream, head: h11.InformationalResponse
    ) -> bool:
        await client.send(
            h11.InformationalResponse(
                status_code=101,
                headers=forward_response_headers(head.headers, switching=True),
                reason=head.reason,
            ),
            self.config.body_timeout_s,
        )
        self.counters.websocket_upgrades += 1
        self.counters.responses["1xx"] += 1
        await self._splice(
            client.stream, client.conn.trailing_data[0], up.stream, up.conn.trailing_data[0]
        )
        return False

    async def _splice(
        self, a: trio.SocketStream, a_rest: bytes, b: trio.SocketStream, b_rest: bytes
    ) -> None:
        """Raw bytes both ways until both sides ended, one errored, or nothing moved for
        ``tunnel_idle_timeout_s``; each side's EOF is passed on as a half-close."""
        idle_s = self.config.tunnel_idle_timeout_s
        quiet = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

        async def pump(
            src: trio.SocketStream, dst: trio.SocketStream, rest: bytes, scope: trio.CancelScope
        ) -> None:
            try:
                if rest:
                    await dst.send_all(rest)
                while True:
                    data = await src.receive_some(BUFFER_BYTES)
                    scope.deadline = trio.current_time() + idle_s
                    if not data:
                        await dst.send_eof()
                        return
                    await dst.send_all(data)
                    scope.deadline = trio.current_time() + idle_s
            except quiet:
                scope.cancel()

        with trio.CancelScope(deadline=trio.current_time() + idle_s) as scope:
            async with trio.open_nursery() as nursery:
                # a -> b starts with what a sent after its head, and the reverse.
                nursery.start_soon(pump, a, b, a_rest, scope)
                nursery.start_soon(pump, b, a, b_rest, scope)

    # ---- our own pages

    async def _page(
        self,
        client: _Client,
        status: int,
        message: str,
        *,
        retry_after_s: int | None = None,
        close: bool = False,
        method: bytes = b"GET",
    ) -> bool:
        """Send one of our pages; True when the connection may carry another request."""
        conn = client.conn
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        # An unread request body (or a broken request) leaves nothing to continue with.
        close = close or conn.their_state in (h11.SEND_BODY, h11.ERROR)
        headers, body = error_page(status, message, retry_after_s=retry_after_s, close=close)
        with contextlib.suppress(_ClientGone):
            timeout_s = self.config.body_timeout_s
            await client.send(h11.Response(status_code=status, headers=headers), timeout_s)
            if method != b"HEAD":
                await client.send(h11.Data(data=body), timeout_s)
            await client.send(h11.EndOfMessage(), timeout_s)
            self.counters.responses[f"{status // 100}xx"] += 1
            if not close:
                return True
        await self._linger(client)
        return False

    async def _linger(self, client: _Client) -> None:
        """Half-close, then read and drop what the client still sends for a moment: closing
        with unread bytes would reset the connection and could destroy the answer in flight."""
        quiet = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
        with trio.move_on_after(LINGER_S), contextlib.suppress(*quiet):
            await client.stream.send_eof()
            dropped = 0
            while dropped < LINGER_BYTES:
                data = await client.stream.receive_some(BUFFER_BYTES)
                if not data:
                    return
                dropped += len(data)
