"""get / describe / status: output formats, query parameters, error rendering."""

from __future__ import annotations

import json

import httpx
import yaml

from .conftest import NODES, STATUS, Cli, FakeApi, app_json, error


def test_get_replicas_json_is_the_api_list(run: Cli, api: FakeApi) -> None:
    result = run("get", "replicas", "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list) and len(data) == 3
    for item in data:
        assert {"name", "app", "namespace", "node", "state"} <= set(item)
    assert data[0]["containerId"] == "3f2a9c0d1e2f3a4b5c6d"
    # No -n: every namespace (no namespace filter sent).
    assert api.requests[-1].url.params.get("namespace") is None


def test_get_nodes_json_and_yaml(run: Cli) -> None:
    as_json = json.loads(run("get", "nodes", "-o", "json").stdout)
    assert as_json == NODES
    assert {"name", "address", "status", "role"} <= set(as_json[0])
    as_yaml = yaml.safe_load(run("get", "nodes", "-o", "yaml").stdout)
    assert as_yaml == NODES


def test_get_replicas_table_columns(run: Cli) -> None:
    result = run("get", "replicas")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "NAMESPACE",
        "APP",
        "NODE",
        "STATE",
        "READY",
        "RESTARTS",
        "REASON",
    ]
    assert lines[1].split()[:5] == ["hello-0", "default", "hello", "n1", "running"]
    assert "0/3 nodes can run it" in lines[3]
    assert all(line == line.rstrip() for line in lines)


def test_get_replicas_wide_adds_generation_container_ports(run: Cli) -> None:
    result = run("get", "replicas", "-o", "wide")
    header = result.stdout.splitlines()[0].split()
    for column in ("GENERATION", "CONTAINER", "PORTS"):
        assert column in header
    assert "3f2a9c0d1e2f" in result.stdout
    assert "3f2a9c0d1e2f3" not in result.stdout  # container ids are shortened
    assert "127.0.0.3:30080->8080" in result.stdout


def test_namespace_and_app_filters_become_query_parameters(run: Cli, api: FakeApi) -> None:
    run("get", "replicas", "-n", "shop", "--app", "web")
    params = api.requests[-1].url.params
    assert params["namespace"] == "shop" and params["app"] == "web"
    run("get", "apps", "-n", "shop")
    assert api.requests[-1].url.params["namespace"] == "shop"
    run("get", "apps", "-A")
    assert "namespace" not in api.requests[-1].url.params


def test_n_and_all_namespaces_conflict_is_usage_error(run: Cli, api: FakeApi) -> None:
    result = run("get", "apps", "-n", "x", "-A")
    assert result.exit_code == 2
    assert api.requests == []


def test_bad_output_format_is_usage_error(run: Cli) -> None:
    result = run("get", "nodes", "-o", "xml")
    assert result.exit_code == 2
    assert "xml" in result.stderr


def test_get_nodes_table_and_aliases(run: Cli) -> None:
    result = run("get", "node")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "STATUS", "ROLE", "REPLICAS", "DRAINED"]
    assert lines[2].split()[:4] == ["n2", "127.0.0.3", "suspect", "voter"]
    wide = run("get", "nodes", "-o", "wide").stdout
    assert "zone=a" in wide and "127.0.0.2:7950" in wide
    assert "2000m" in wide and "1Gi" in wide


def test_node_resources_from_numeric_fields(run: Cli, api: FakeApi) -> None:
    node = {k: v for k, v in NODES[0].items() if k not in ("cpu", "memory")}
    api.json_route("GET", "/v1/nodes", [{**node, "cpuMillicores": 1500, "memoryBytes": 2**31}])
    line = run("get", "nodes", "-o", "wide").stdout.splitlines()[1]
    assert "1500m" in line and "2Gi" in line


def test_get_apps_table_counts_running(run: Cli, api: FakeApi) -> None:
    result = run("get", "apps")
    line = result.stdout.splitlines()[1].split()
    assert line[:4] == ["hello", "default", "p2porch/demo:latest", "2/3"]


def test_get_apps_counts_from_replicas_when_status_lacks_running(run: Cli, api: FakeApi) -> None:
    app = app_json()
    del app["status"]["running"]
    api.json_route("GET", "/v1/apps", [app])
    result = run("get", "apps")
    assert result.stdout.splitlines()[1].split()[3] == "2/3"
    # json stays exactly what the API said
    assert "running" not in json.loads(run("get", "apps", "-o", "json").stdout)[0]["status"]


def test_get_one_app_by_name(run: Cli, api: FakeApi) -> None:
    result = run("get", "app", "hello", "-n", "default", "-o", "json")
    assert json.loads(result.stdout)["metadata"]["name"] == "hello"
    assert api.calls()[-1] == "GET /v1/apps/default/hello"


def test_get_namespaces(run: Cli) -> None:
    result = run("get", "ns")
    assert result.stdout.splitlines() == ["NAME", "default"]


def test_empty_list_says_so_on_stderr(run: Cli, api: FakeApi) -> None:
    api.json_route("GET", "/v1/replicas", [])
    result = run("get", "replicas")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no replicas" in result.stderr
    assert json.loads(run("get", "replicas", "-o", "json").stdout) == []


def test_api_error_is_rendered_with_code_and_details(run: Cli, api: FakeApi) -> None:
    api.fail_route(
        "GET",
        "/v1/nodes",
        error(503, "no_quorum", "no leader is known", [{"path": "x", "message": "y"}]),
    )
    result = run("get", "nodes")
    assert result.exit_code == 1
    assert "error: no_quorum: no leader is known" in result.stderr
    assert "  x: y" in result.stderr
    assert result.stdout == ""


def test_non_json_error_body_still_reported(run: Cli, api: FakeApi) -> None:
    api.fail_route("GET", "/v1/nodes", httpx.Response(500, text="boom"))
    result = run("get", "nodes")
    assert result.exit_code == 1
    assert "error: http_500: boom" in result.stderr


def test_unreachable_node_exit_1_with_hint(run: Cli, api: FakeApi) -> None:
    def refuse(request: httpx.Request, _params: dict[str, str]) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    api.route("GET", "/v1/nodes", refuse)
    result = run("--node", "127.0.0.9", "get", "nodes")
    assert result.exit_code == 1
    assert "cannot reach node 127.0.0.9:7950" in result.stderr
    assert "--node" in result.stderr


def test_non_json_success_is_a_clear_error(run: Cli, api: FakeApi) -> None:
    api.fail_route("GET", "/v1/nodes", httpx.Response(200, text="<html>"))
    result = run("get", "nodes")
    assert result.exit_code == 1
    assert "non-JSON" in result.stderr


def test_status_text_and_json(run: Cli) -> None:
    result = run("status")
    assert result.exit_code == 0
    text = result.stdout
    assert "n1 (127.0.0.2)" in text
    assert "n1 (term 4)" in text
    assert "2 alive, 1 suspect, 0 dead, 0 left" in text
    assert "commit 812, applied 812" in text
    assert "n2" in text  # the member table
    assert json.loads(run("status", "-o", "json").stdout) == STATUS


def test_status_without_quorum_says_writes_refused(run: Cli, api: FakeApi) -> None:
    api.json_route("GET", "/v1/status", {**STATUS, "quorum": False, "leader": None})
    text = run("status").stdout
    assert "NO: writes are refused" in text
    assert "none known" in text


def test_describe_app(run: Cli, api: FakeApi) -> None:
    api.json_route(
        "GET",
        "/v1/apps/{ns}/{name}/rollout",
        {
            "revision": 4,
            "state": "paused",
            "updated": 1,
            "replicas": 3,
            "ready": 1,
            "paused": False,
            "message": "paused: replica hello-1 not ready within 120s",
        },
    )
    result = run("describe", "app", "hello")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "p2porch/demo:latest" in text
    assert "30080->8080/tcp" in text
    assert "3 desired, 2 running, 1 pending, 0 failed" in text
    assert "hello-2: 0/3 nodes can run it" in text
    assert "default/hello-0" in text  # a replica event
    assert "default/hello.2" in text  # a slot event
    assert "default/hello-world" not in text  # another app's event
    assert "GET /v1/apps/default/hello" in api.calls()
    assert (
        "revision 4 paused (1/3 updated, 1 ready): paused: replica hello-1 not ready within 120s"
        in text
    )


def test_describe_node(run: Cli, api: FakeApi) -> None:
    result = run("describe", "node", "n1")
    assert result.exit_code == 0, result.output
    assert "leader" in result.stdout and "hello-0" in result.stdout
    assert api.requests[1].url.params["node"] == "n1"
    assert "default/hello-0" in result.stdout  # placement event on n1


def test_describe_missing_app_is_not_found(run: Cli, api: FakeApi) -> None:
    api.fail_route("GET", "/v1/apps/{ns}/{name}", error(404, "not_found", "app default/x"))
    result = run("describe", "app", "x")
    assert result.exit_code == 1
    assert "error: not_found: app default/x" in result.stderr


def test_describe_app_counts_from_replicas_when_status_lacks_them(run: Cli, api: FakeApi) -> None:
    app = app_json()
    app["status"] = {"replicas": 3, "placed": 2, "pendingReasons": {}}
    api.json_route("GET", "/v1/apps/{ns}/{name}", app)
    text = run("describe", "app", "hello").stdout
    assert "3 desired, 2 running, 1 pending, 0 failed" in text
