"""The write and streaming commands: what they send, what they print, how they exit."""

from __future__ import annotations

import json

import httpx

from .conftest import Cli, FakeApi, app_json, error


def test_token_prints_only_the_token(run: Cli) -> None:
    result = run("token")
    assert result.exit_code == 0
    assert result.stdout == "tok-123\n"


def test_leave(run: Cli, api: FakeApi) -> None:
    api.json_route("POST", "/v1/leave", {"name": "n1", "leaving": True})
    result = run("leave")
    assert result.exit_code == 0
    assert "node n1 is leaving" in result.stdout
    assert api.calls() == ["POST /v1/leave"]


def test_node_rm_and_conflict(run: Cli, api: FakeApi) -> None:
    api.json_route("DELETE", "/v1/nodes/{name}", {"name": "n2", "removed": True})
    result = run("node", "rm", "n2")
    assert result.exit_code == 0 and "node n2 removed" in result.stdout
    assert api.calls() == ["DELETE /v1/nodes/n2"]
    api.fail_route(
        "DELETE", "/v1/nodes/{name}", error(409, "conflict", "a node cannot remove itself")
    )
    result = run("node", "rm", "n1")
    assert result.exit_code == 1
    assert "error: conflict: a node cannot remove itself" in result.stderr


def test_node_drain_and_undo(run: Cli, api: FakeApi) -> None:
    api.json_route("POST", "/v1/nodes/{name}/drain", {})
    assert run("node", "drain", "n2").exit_code == 0
    assert api.body() == {"drained": True}
    result = run("node", "drain", "n2", "--undo")
    assert api.body() == {"drained": False}
    assert "undrained" in result.stdout
    assert api.calls()[-1] == "POST /v1/nodes/n2/drain"


def test_scale(run: Cli, api: FakeApi) -> None:
    api.json_route("POST", "/v1/apps/{ns}/{name}/scale", app_json(replicas=5))
    result = run("scale", "hello=5", "-n", "shop")
    assert result.exit_code == 0
    assert api.calls() == ["POST /v1/apps/shop/hello/scale"]
    assert api.body() == {"replicas": 5}
    assert "scaled to 5" in result.stdout


def test_scale_bad_argument_is_usage_error(run: Cli, api: FakeApi) -> None:
    for bad in ("hello", "hello=x", "=3", "hello=-1"):
        result = run("scale", bad)
        assert result.exit_code == 2, bad
    assert api.requests == []


def test_rebalance(run: Cli, api: FakeApi) -> None:
    api.json_route(
        "POST", "/v1/rebalance", {"moves": [{"replica": "web-2", "from": "n1", "to": "n3"}]}
    )
    result = run("rebalance")
    assert result.stdout.splitlines()[1].split() == ["web-2", "n1", "n3"]
    api.json_route("POST", "/v1/rebalance", {"moves": []})
    assert "balanced" in run("rebalance").stdout


def test_logs_streams_raw_bytes(run: Cli, api: FakeApi) -> None:
    payload = b"line one\n\xff\xfebinary\nline three\n"
    api.route(
        "GET",
        "/v1/replicas/{ns}/{name}/logs",
        lambda _r, _p: httpx.Response(200, content=iter([payload[:10], payload[10:]])),
    )
    result = run("logs", "hello-0", "-f", "--tail", "5", "-n", "shop")
    assert result.exit_code == 0
    assert result.stdout_bytes == payload
    request = api.requests[-1]
    assert request.url.path == "/v1/replicas/shop/hello-0/logs"
    assert request.url.params["follow"] == "1" and request.url.params["tail"] == "5"
    run("logs", "hello-0")
    assert api.requests[-1].url.params["follow"] == "0"
    assert "tail" not in api.requests[-1].url.params


def test_logs_proxy_failure(run: Cli, api: FakeApi) -> None:
    api.fail_route(
        "GET", "/v1/replicas/{ns}/{name}/logs", error(502, "proxy_failed", "n2 unreachable")
    )
    result = run("logs", "hello-1")
    assert result.exit_code == 1
    assert "error: proxy_failed: n2 unreachable" in result.stderr


def test_exec_prints_output_and_exits_with_its_code(run: Cli, api: FakeApi) -> None:
    api.json_route(
        "POST", "/v1/replicas/{ns}/{name}/exec", {"exitCode": 3, "output": "no such file\n"}
    )
    result = run("exec", "hello-0", "--", "ls", "-la", "/nope")
    assert result.exit_code == 3
    assert result.stdout == "no such file\n"
    assert api.body() == {"command": ["ls", "-la", "/nope"]}
    assert api.calls() == ["POST /v1/replicas/default/hello-0/exec"]


def test_exec_needs_a_command(run: Cli, api: FakeApi) -> None:
    assert run("exec", "hello-0").exit_code == 2
    assert api.requests == []


def test_events_text_and_json(run: Cli, api: FakeApi) -> None:
    result = run("events")
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    assert lines[1].split() == ["811", "placement", "put", "default/hello-0", "node=n1"]
    assert api.requests[-1].url.params["follow"] == "0"
    result = run("events", "-f", "-o", "json")
    assert api.requests[-1].url.params["follow"] == "1"
    assert [json.loads(line)["index"] for line in result.stdout.splitlines()] == [
        810,
        811,
        812,
        813,
        814,
    ]


def test_events_passes_through_unparseable_lines(run: Cli, api: FakeApi) -> None:
    api.route("GET", "/v1/events", lambda _r, _p: httpx.Response(200, content=b"garbage\n\n"))
    result = run("events")
    assert result.exit_code == 0 and result.stdout == "garbage\n"


def test_delete_app(run: Cli, api: FakeApi) -> None:
    api.json_route("DELETE", "/v1/apps/{ns}/{name}", {"deleted": "shop/web"})
    result = run("delete", "app", "web", "-n", "shop")
    assert result.exit_code == 0
    assert api.calls() == ["DELETE /v1/apps/shop/web"]
    assert "app shop/web deleted" in result.stdout


def test_delete_needs_file_or_subcommand(run: Cli, api: FakeApi) -> None:
    assert run("delete").exit_code == 2
    assert api.requests == []


def test_run_builds_and_puts_an_app(run: Cli, api: FakeApi) -> None:
    api.route(
        "PUT",
        "/v1/apps/{ns}/{name}",
        lambda r, _p: httpx.Response(200, json={**json.loads(r.content), "status": {}}),
    )
    result = run(
        "run",
        "web",
        "--image",
        "p2porch/demo:latest",
        "--replicas",
        "2",
        "--env",
        "MESSAGE=hi there",
        "--env",
        "EMPTY=",
        "--publish",
        "30080:8080",
        "--publish",
        "53/udp",
        "--cpu",
        "250m",
        "--memory",
        "64Mi",
        "-n",
        "shop",
        "--",
        "-v",
        "--port=8080",
    )
    assert result.exit_code == 0, result.output
    assert api.calls() == ["PUT /v1/apps/shop/web"]
    body = api.body()
    assert body["metadata"]["name"] == "web" and body["metadata"]["namespace"] == "shop"
    spec = body["spec"]
    assert spec["image"] == "p2porch/demo:latest"
    assert spec["replicas"] == 2
    assert spec["env"] == [
        {"name": "MESSAGE", "value": "hi there"},
        {"name": "EMPTY", "value": ""},
    ]
    assert spec["ports"] == [
        {"containerPort": 8080, "publishedPort": 30080, "protocol": "tcp"},
        {"containerPort": 53, "protocol": "udp"},
    ]
    assert spec["resources"]["limits"] == {"cpu": "250m", "memory": "64Mi"}
    assert spec["args"] == ["-v", "--port=8080"]
    assert "command" not in spec
    assert "app shop/web applied (generation 0)" in result.stdout


def test_run_command_flag_sets_command(run: Cli, api: FakeApi) -> None:
    api.route("PUT", "/v1/apps/{ns}/{name}", lambda r, _p: httpx.Response(200, json={}))
    result = run("run", "job", "--image", "busybox", "--command", "--", "sh", "-c", "true")
    assert result.exit_code == 0, result.output
    assert api.body()["spec"]["command"] == ["sh", "-c", "true"]


def test_run_flag_errors_are_usage_errors(run: Cli, api: FakeApi) -> None:
    assert run("run", "web", "--image", "x", "--env", "NOEQUALS").exit_code == 2
    assert run("run", "web", "--image", "x", "--publish", "a:b").exit_code == 2
    assert run("run", "web").exit_code == 2  # --image missing
    assert api.requests == []


def test_run_invalid_values_fail_before_sending(run: Cli, api: FakeApi) -> None:
    result = run("run", "Web_1", "--image", "bad image", "--memory", "lots")
    assert result.exit_code == 1
    assert "error: invalid app:" in result.stderr
    assert "metadata.name" in result.stderr
    assert "spec.image" in result.stderr or "spec.resources" in result.stderr
    assert api.requests == []
