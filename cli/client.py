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
        └── BadResponse               the node answered something that is not the API

Tests inject an ``httpx.MockTransport`` through ``transport=``; nothing else differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx

from p2porch.common.errors import P2porchError

from .config import Target

DEFAULT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0


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


class BadResponse(ClientError):
    """A 2xx answer that is not the JSON the API promises (wrong port? a proxy?)."""


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
        if isinstance(exc, httpx.TimeoutException):
            return Unreachable(f"node {where} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.TransportError):
            return Unreachable(f"cannot reach node {where}: {exc or type(exc).__name__}")
        return BadResponse(f"bad answer from node {where}: {exc}")

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
    ) -> Any:
        """One call; the decoded JSON answer (None for an empty body)."""
        try:
            response = self._http.request(
                method,
                path,
                params={k: v for k, v in (params or {}).items() if v is not None},
                json=body,
            )
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        if response.status_code >= 400:
            raise self._error_from(response)
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
                    raise self._error_from(response)
                yield response
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc

    def _list(self, path: str, params: Mapping[str, str | int] | None = None) -> list[Any]:
        answer = self.request("GET", path, params=params)
        if not isinstance(answer, list):
            raise BadResponse(f"expected a list from GET {path}, got {type(answer).__name__}")
        return answer

    def _object(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        answer = self.request(method, path, body=body)
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
        answer = self._object("GET", "/v1/token")
        token = answer.get("token")
        if not isinstance(token, str):
            raise BadResponse("GET /v1/token answered without a token")
        return token

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
