"""A fake p2porch API (httpx.MockTransport) and a runner that drives the CLI against it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from p2porch.cli.main import Runtime, cli

Handler = Callable[[httpx.Request, dict[str, str]], httpx.Response]


def error(status: int, code: str, message: str, details: list[Any] | None = None) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "details": details or []}}
    return httpx.Response(status, json=body)


def app_json(name: str = "hello", namespace: str = "default", replicas: int = 3) -> dict[str, Any]:
    return {
        "apiVersion": "p2porch/v1",
        "kind": "App",
        "metadata": {"name": name, "namespace": namespace, "generation": 2, "labels": {}},
        "spec": {
            "image": "p2porch/demo:latest",
            "replicas": replicas,
            "ports": [{"containerPort": 8080, "publishedPort": 30080, "protocol": "tcp"}],
            "resources": {"requests": {"cpu": "50m", "memory": "16Mi"}},
        },
        "status": {
            "replicas": replicas,
            "running": replicas - 1,
            "pending": 1,
            "failed": 0,
            "pendingReasons": {f"{name}-{replicas - 1}": "0/3 nodes can run it"},
        },
    }


def replica_json(
    name: str = "hello-0",
    state: str = "running",
    node: str = "n1",
    app: str = "hello",
    namespace: str = "default",
    generation: int = 2,
    reason: str = "",
) -> dict[str, Any]:
    return {
        "name": name,
        "app": app,
        "namespace": namespace,
        "node": node,
        "slot": int(name.rsplit("-", 1)[1]),
        "generation": generation,
        "state": state,
        "ready": state == "running",
        "restarts": 0,
        "exitCode": None,
        "reason": reason,
        "containerId": "3f2a9c0d1e2f3a4b5c6d",
        "publishedPorts": {"8080": "127.0.0.3:30080"},
    }


NODES = [
    {
        "name": "n1",
        "address": "127.0.0.2",
        "apiAddress": "127.0.0.2:7950",
        "status": "alive",
        "role": "leader",
        "labels": {"zone": "a"},
        "cpu": "2000m",
        "memory": "1Gi",
        "drained": False,
        "replicas": 2,
    },
    {
        "name": "n2",
        "address": "127.0.0.3",
        "apiAddress": "127.0.0.3:7950",
        "status": "suspect",
        "role": "voter",
        "labels": {},
        "cpu": "2000m",
        "memory": "1Gi",
        "drained": False,
        "replicas": 1,
    },
]

STATUS = {
    "node": "n1",
    "address": "127.0.0.2",
    "leader": "n1",
    "term": 4,
    "role": "voter",
    "quorum": True,
    "commitIndex": 812,
    "appliedIndex": 812,
    "members": {"alive": 2, "suspect": 1, "dead": 0, "left": 0},
    "version": "0.1.0",
}


class FakeApi:
    """Routes ``(METHOD, path pattern)`` to handlers; records every request it saw."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.json_route("GET", "/healthz", {"ok": True})
        self.json_route("GET", "/v1/status", STATUS)
        self.json_route("GET", "/v1/nodes", NODES)
        self.json_route("GET", "/v1/nodes/{name}", {**NODES[0], "placements": ["hello-0"]})
        self.json_route("GET", "/v1/apps", [app_json()])
        self.json_route("GET", "/v1/apps/{ns}/{name}", app_json())
        self.json_route(
            "GET",
            "/v1/replicas",
            [
                replica_json("hello-0"),
                replica_json("hello-1", node="n2"),
                replica_json("hello-2", state="pending", node="", reason="0/3 nodes can run it"),
            ],
        )
        self.json_route("GET", "/v1/namespaces", [{"name": "default", "labels": {}}])
        self.json_route("GET", "/v1/token", {"token": "tok-123"})
        self.route("GET", "/v1/events", self._events)

    # -- configuration

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self.routes.insert(0, (method, regex, handler))

    def json_route(self, method: str, pattern: str, body: Any, status: int = 200) -> None:
        self.route(method, pattern, lambda _r, _p: httpx.Response(status, json=body))

    def fail_route(self, method: str, pattern: str, response: httpx.Response) -> None:
        self.route(method, pattern, lambda _r, _p: response)

    events: list[dict[str, Any]] = [
        {"index": 810, "kind": "app", "key": "default/hello", "action": "put", "object": {}},
        {
            "index": 811,
            "kind": "placement",
            "key": "default/hello-0",
            "action": "put",
            "object": {"node": "n1"},
        },
        {"index": 812, "kind": "member", "key": "n2", "action": "suspect", "object": {}},
        {"index": 813, "kind": "app", "key": "default/hello-world", "action": "put"},
        {"index": 814, "kind": "placement", "key": "default/hello.2", "action": "delete"},
    ]

    def _events(self, _request: httpx.Request, _params: dict[str, str]) -> httpx.Response:
        body = "".join(json.dumps(e) + "\n" for e in self.events)
        return httpx.Response(
            200, content=body.encode(), headers={"Content-Type": "application/x-ndjson"}
        )

    # -- the transport

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for method, regex, handler in self.routes:
            match = regex.match(request.url.path)
            if method == request.method and match:
                return handler(request, match.groupdict())
        return error(404, "not_found", f"no route {request.method} {request.url.path}")

    # -- inspection

    def calls(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)


class FakeClock:
    """Monotonic time that moves only when the CLI sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Cli:
    """Runs ``p2porch ARGS`` in-process against the fake API with no real waiting."""

    def __init__(self, api: FakeApi, clock: FakeClock, home: Path) -> None:
        self.api = api
        self.clock = clock
        self.home = home
        self.runtime_overrides: dict[str, Any] = {}

    def __call__(
        self, *args: str, env: dict[str, str | None] | None = None, input: str | None = None
    ) -> Result:
        runtime = Runtime(
            transport=httpx.MockTransport(self.api.handle),
            clock=self.clock,
            sleep=self.clock.sleep,
            home=self.home,
            **self.runtime_overrides,
        )
        base_env: dict[str, str | None] = {"P2PORCH_NODE": None, "P2PORCH_CONFIG": None}
        base_env.update(env or {})
        return CliRunner().invoke(
            cli, list(args), obj=runtime, env=base_env, input=input, catch_exceptions=False
        )


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def run(api: FakeApi, clock: FakeClock, tmp_path: Path) -> Iterator[Cli]:
    home = tmp_path / "home"
    home.mkdir()
    yield Cli(api, clock, home)
