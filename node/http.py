"""A small HTTP/1.1 server on trio, built on h11, for the node API.

Why our own (on h11) rather than an ASGI server: the API must keep serving while hostile or
slow clients hold connections (a header deadline, a body size cap and a connection cap per
server, all enforced here), stream logs and events with back-pressure, and -- once mutual TLS
arrives -- see the peer's certificate on every request. h11 does the protocol parsing (a
well-kept, sans-I/O parser); this module only moves bytes and enforces limits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import h11
import trio

from p2porch.common.pki import PeerIdentity
from p2porch.common.tls import Authorizer, TlsContexts, TlsError, server_handshake
from p2porch.node.errors import NodeError

log = logging.getLogger("p2porch.http")

MAX_BODY_BYTES = 8 << 20
HEADER_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 75.0
SEND_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 512


class HttpError(NodeError):
    """An error answered to the client as a JSON error body with an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str
    params: dict[str, str] = attrs.field(factory=dict)
    # Who the client's TLS certificate says it is (None: no certificate, or plain HTTP).
    identity: PeerIdentity | None = None

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as exc:
            # RecursionError: a body nested deeper than the parser's stack (``[[[[...``).
            raise HttpError(400, "invalid", f"request body is not JSON: {exc}") from None

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true", "yes")


@attrs.frozen
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    # When set, the body is streamed chunk by chunk (logs, watch) and ``body`` is ignored.
    stream: AsyncIterator[bytes] | None = None

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status=status, body=json.dumps(value, separators=(",", ":")).encode() + b"\n")

    @classmethod
    def error(cls, exc: HttpError) -> Response:
        return cls.json(exc.body(), exc.status)


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """Method + path pattern -> handler. ``{name}`` captures one path segment."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self._routes.append((method, re.compile(f"^{regex}$"), handler))

    async def __call__(self, request: Request) -> Response:
        allowed = False
        for method, regex, handler in self._routes:
            match = regex.match(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed = True
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items()}
            return await handler(attrs.evolve(request, params=params))
        if allowed:
            raise HttpError(405, "method_not_allowed", f"{request.method} not allowed here")
        raise HttpError(404, "not_found", f"no such endpoint: {request.path}")


@attrs.define
class ServerCounters:
    connections: int = 0
    requests: int = 0
    bad_requests: int = 0
    timeouts: int = 0
    refused_connections: int = 0
    internal_errors: int = 0
    tls_refused: int = 0


class HttpServer:
    """Serves ``handler`` on a TCP listener; each connection is bounded in time and size."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        tls: TlsContexts | None = None,
        authorize: Authorizer | None = None,
    ) -> None:
        """With ``tls``, every connection is TLS 1.3; a client certificate is optional at the
        handshake (a joiner has none yet, liveness probes send none) and the handler decides
        per endpoint from ``Request.identity``; ``authorize`` cuts off a refused certificate
        (a removed node) before any request is read."""
        self.handler = handler
        self.tls = tls
        self.authorize = authorize
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.counters = ServerCounters()
        self._open = 0

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        if self._open >= self.max_connections:
            self.counters.refused_connections += 1
            await stream.aclose()
            return
        self._open += 1
        self.counters.connections += 1
        try:
            peer = stream.socket.getpeername()
            identity = None
            inner: trio.abc.Stream = stream
            if self.tls is not None:
                try:
                    with trio.fail_after(self.header_timeout_s):
                        inner, identity = await server_handshake(
                            stream,
                            self.tls.server_optional,
                            self.authorize or (lambda _peer: None),
                            timeout_s=self.header_timeout_s,
                            https_compatible=True,
                        )
                except (TlsError, trio.TooSlowError):
                    self.counters.tls_refused += 1
                    return
            await self._serve_connection(inner, f"{peer[0]}:{peer[1]}", identity)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
            pass
        except Exception:
            # E.g. a stream that failed half-way: the client sees a cut response, we log it.
            self.counters.internal_errors += 1
            log.exception("connection from %s failed", stream.socket.getpeername())
        finally:
            self._open -= 1
            with trio.move_on_after(1):
                await stream.aclose()

    async def _serve_connection(
        self, stream: trio.abc.Stream, peer: str, identity: PeerIdentity | None = None
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        first = True
        while True:
            # A new request must arrive within the idle timeout, and its head within the header
            # timeout: a client trickling bytes cannot hold the connection.
            deadline = self.header_timeout_s if first else self.idle_timeout_s
            request = None
            with trio.move_on_after(deadline):
                request = await self._read_request(conn, stream, peer, identity)
            if request is None:
                # Bytes of an unfinished request are buffered (a head still trickling in) or the
                # body is still expected: the client was too slow. Otherwise an idle keep-alive
                # connection simply ends.
                partial = bool(conn.trailing_data[0]) or conn.their_state is h11.SEND_BODY
                if partial:
                    self.counters.timeouts += 1
                    await self._send_simple(conn, stream, 408, "request_timeout", "too slow")
                return
            first = False
            if isinstance(request, HttpError):
                self.counters.bad_requests += 1
                await self._send_simple(conn, stream, request.status, request.code, request.message)
                return
            self.counters.requests += 1
            try:
                response = await self.handler(request)
            except HttpError as exc:
                response = Response.error(exc)
            except Exception:
                # A bug in one handler must cost one request, never the node.
                self.counters.internal_errors += 1
                log.exception("%s %s failed", request.method, request.path)
                response = Response.error(
                    HttpError(500, "internal", "internal error (logged on the node)")
                )
            await self._send_response(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_request(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        peer: str,
        identity: PeerIdentity | None = None,
    ) -> Request | HttpError | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return HttpError(exc.error_status_hint, "bad_request", str(exc))
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    if head is None:
                        return None
                    return HttpError(400, "bad_request", "connection closed mid-request")
                try:
                    conn.receive_data(bytes(data))
                except h11.RemoteProtocolError as exc:
                    return HttpError(400, "bad_request", str(exc))
                continue
            if isinstance(event, h11.Request):
                head = event
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                    return HttpError(413, "too_large", f"body over {self.max_body_bytes} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body_bytes:
                    return HttpError(413, "too_large", f"body over {self.max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                if head is None:
                    return HttpError(400, "bad_request", "message without a request line")
                target = head.target.decode("latin-1")
                try:
                    parts = urlsplit(target)
                except ValueError as exc:  # e.g. "http://[::1/": an unclosed IPv6 host
                    return HttpError(400, "bad_request", f"unreadable request target: {exc}")
                return Request(
                    method=head.method.decode("ascii", "replace"),
                    path=parts.path,
                    query=dict(parse_qsl(parts.query)),
                    headers={
                        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
                    },
                    body=bytes(body),
                    peer=peer,
                    identity=identity,
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send_simple(
        self, conn: h11.Connection, stream: trio.abc.Stream, status: int, code: str, message: str
    ) -> None:
        quiet = (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)
        with trio.move_on_after(5), contextlib.suppress(*quiet):
            await self._send_response(
                conn, stream, Response.error(HttpError(status, code, message))
            )

    async def _send_response(
        self, conn: h11.Connection, stream: trio.abc.Stream, response: Response
    ) -> None:
        headers = [("content-type", response.content_type), *response.headers]
        if response.stream is None:
            headers.append(("content-length", str(len(response.body))))
        else:
            headers.append(("transfer-encoding", "chunked"))
        # IDLE too: after a malformed request h11 still lets a server answer it (a 400).
        if conn.our_state not in (h11.SEND_RESPONSE, h11.IDLE):
            return
        await self._write(
            stream, conn.send(h11.Response(status_code=response.status, headers=headers))
        )
        if response.stream is None:
            await self._write(stream, conn.send(h11.Data(data=response.body)))
        else:
            try:
                async for chunk in response.stream:
                    if chunk:
                        await self._write(stream, conn.send(h11.Data(data=chunk)))
            finally:
                aclose = getattr(response.stream, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
        await self._write(stream, conn.send(h11.EndOfMessage()))

    async def _write(self, stream: trio.abc.Stream, data: bytes | None) -> None:
        if data:
            with trio.fail_after(SEND_TIMEOUT_S):
                await stream.send_all(data)
