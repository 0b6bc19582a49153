"""apply / delete -f: local parsing first, then one request; apply --wait with a fake clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Cli, FakeApi, FakeClock, app_json, error, replica_json

APP_YAML = """\
apiVersion: p2porch/v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: p2porch/v1
kind: App
metadata:
  name: web
  namespace: shop
spec:
  image: p2porch/demo:latest
  replicas: 2
  env:
    - name: MESSAGE
      value: 42
"""

BAD_YAML = """\
apiVersion: p2porch/v1
kind: App
metadata:
  name: web
spec:
  image: p2porch/demo:latest
  replicas: many
  portz: []
"""


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    path = tmp_path / "app.yaml"
    path.write_text(APP_YAML)
    return path


def _apply_ok(api: FakeApi) -> None:
    def answer(request: httpx.Request, _p: dict[str, str]) -> httpx.Response:
        docs = json.loads(request.content)["documents"]
        results = [
            {
                "kind": d["kind"],
                "name": d["metadata"]["name"],
                "namespace": d["metadata"].get("namespace", ""),
                "action": "created",
            }
            for d in docs
        ]
        return httpx.Response(200, json={"results": results})

    api.route("POST", "/v1/apply", answer)


def test_apply_sends_parsed_documents(run: Cli, api: FakeApi, manifest: Path) -> None:
    _apply_ok(api)
    result = run("apply", "-f", str(manifest))
    assert result.exit_code == 0, result.output
    assert api.calls() == ["POST /v1/apply"]
    docs = api.body()["documents"]
    assert [d["kind"] for d in docs] == ["Namespace", "App"]
    app = docs[1]
    assert app["apiVersion"] == "p2porch/v1"
    assert app["spec"]["env"] == [{"name": "MESSAGE", "value": "42"}]  # normalized locally
    assert app["spec"]["replicas"] == 2
    assert result.stdout.splitlines() == ["namespace shop created", "app shop/web created"]


def test_manifest_errors_shown_before_any_request(
    run: Cli, api: FakeApi, tmp_path: Path, manifest: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    result = run("apply", "-f", str(manifest), "-f", str(bad), "-f", str(tmp_path / "none.yaml"))
    assert result.exit_code == 1
    assert api.requests == []
    err = result.stderr
    assert "error: 3 problems in manifest" in err
    assert f"{bad}: document 1, line 7, column 13: spec.replicas: expected an integer" in err
    assert 'spec.portz: unknown field (did you mean "ports"?)' in err
    assert "none.yaml: cannot read the file" in err


def test_yaml_syntax_error_has_a_line(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    bad = tmp_path / "syntax.yaml"
    bad.write_text("apiVersion: p2porch/v1\nkind: App\nmetadata: {name: [}\n")
    result = run("apply", "-f", str(bad))
    assert result.exit_code == 1 and api.requests == []
    assert "document 1, line 3" in result.stderr and "YAML syntax error" in result.stderr


def test_apply_from_stdin_and_folder(run: Cli, api: FakeApi, tmp_path: Path) -> None:
    _apply_ok(api)
    result = run("apply", "-f", "-", input=APP_YAML)
    assert result.exit_code == 0, result.output
    assert len(api.body()["documents"]) == 2
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "a.yaml").write_text(APP_YAML)
    (folder / "b.yml").write_text(APP_YAML.replace("name: web", "name: api"))
    (folder / "notes.txt").write_text("not yaml: [")
    result = run("apply", "-f", str(folder))
    assert result.exit_code == 0, result.output
    names = [d["metadata"]["name"] for d in api.body()["documents"]]
    assert names == ["shop", "web", "shop", "api"]


def test_apply_needs_a_file(run: Cli, tmp_path: Path) -> None:
    assert run("apply").exit_code == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n---\n")
    result = run("apply", "-f", str(empty))
    assert result.exit_code == 1 and "no documents" in result.stderr


def test_server_validation_errors_are_listed(run: Cli, api: FakeApi, manifest: Path) -> None:
    api.fail_route(
        "POST",
        "/v1/apply",
        error(
            400,
            "invalid",
            "2 problems",
            [
                {"path": "documents[1].spec.replicas", "message": "too many"},
                {"path": "documents[0].metadata.name", "message": "taken"},
            ],
        ),
    )
    result = run("apply", "-f", str(manifest))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: invalid: 2 problems",
        "  documents[1].spec.replicas: too many",
        "  documents[0].metadata.name: taken",
    ]


def test_delete_f(run: Cli, api: FakeApi, manifest: Path) -> None:
    api.json_route(
        "POST",
        "/v1/delete",
        {
            "results": [
                {"kind": "App", "name": "shop/web", "action": "deleted"},
                {"kind": "Namespace", "name": "shop", "action": "absent"},
            ]
        },
    )
    result = run("delete", "-f", str(manifest))
    assert result.exit_code == 0, result.output
    assert api.calls() == ["POST /v1/delete"]
    assert len(api.body()["documents"]) == 2
    assert result.stdout.splitlines() == ["app shop/web deleted", "namespace shop absent"]


# --------------------------------------------------------------------------- --wait


class Rollout:
    """Replicas of shop/web that come up one per poll (or never, with ``stuck``)."""

    def __init__(self, api: FakeApi, replicas: int = 2, stuck: bool = False) -> None:
        self.polls = 0
        self.replicas = replicas
        self.stuck = stuck
        _apply_ok(api)
        app = app_json("web", "shop", replicas)
        app["status"] = {
            "replicas": replicas,
            "placed": 1,
            "pending": 1,
            "failed": 0,
            "pendingReasons": {"web-1": "0/3 nodes can run it: 3 insufficient memory"},
        }
        api.json_route("GET", "/v1/apps/{ns}/{name}", app)
        api.route("GET", "/v1/replicas", self.answer)

    def answer(self, request: httpx.Request, _p: dict[str, str]) -> httpx.Response:
        assert request.url.params["namespace"] == "shop"
        assert request.url.params["app"] == "web"
        self.polls += 1
        up = 0 if self.stuck else min(self.polls - 1, self.replicas)
        rows: list[dict[str, Any]] = []
        for i in range(self.replicas):
            if i < up:
                rows.append(replica_json(f"web-{i}", "running", app="web", namespace="shop"))
            elif self.stuck and i == 0:
                row = replica_json(f"web-{i}", "failed", app="web", namespace="shop")
                row["exitCode"] = 137
                row["reason"] = "OOM killed"
                rows.append(row)
            else:
                rows.append(replica_json(f"web-{i}", "starting", app="web", namespace="shop"))
        # An old-generation replica never counts as done.
        rows.append(replica_json("web-0", "running", app="web", namespace="shop", generation=1))
        return httpx.Response(200, json=rows)


def test_apply_wait_until_running(run: Cli, api: FakeApi, clock: FakeClock, manifest: Path) -> None:
    rollout = Rollout(api)
    result = run("apply", "-f", str(manifest), "--wait", "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert rollout.polls == 3
    assert "shop/web: 0/2 running" in result.stderr
    assert "shop/web: 1/2 running" in result.stderr
    assert "shop/web: 2/2 running" in result.stderr
    assert "all 2 replicas running" in result.stderr
    assert clock.sleeps == [0.5, 0.5]


def test_apply_wait_timeout_lists_reasons(
    run: Cli, api: FakeApi, clock: FakeClock, manifest: Path
) -> None:
    rollout = Rollout(api, stuck=True)
    result = run("apply", "-f", str(manifest), "--wait", "--timeout", "5")
    assert result.exit_code == 1
    err = result.stderr
    assert "error: timed out after 5s waiting for replicas to run" in err
    assert "web-0 (failed, exit code 137): OOM killed" in err
    assert "web-1 (starting): 0/3 nodes can run it: 3 insufficient memory" in err
    assert "old generation 1" in err
    assert sum(clock.sleeps) == pytest.approx(5.0)
    assert rollout.polls == 11


def test_apply_wait_retries_transient_errors(
    run: Cli, api: FakeApi, clock: FakeClock, manifest: Path
) -> None:
    rollout = Rollout(api)
    calls = {"n": 0}

    def flaky(request: httpx.Request, params: dict[str, str]) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return error(503, "no_quorum", "electing")
        return rollout.answer(request, params)

    api.route("GET", "/v1/replicas", flaky)
    result = run("apply", "-f", str(manifest), "--wait")
    assert result.exit_code == 0, result.output
    assert "no_quorum" in result.stderr


def test_apply_wait_app_gone_is_an_error(run: Cli, api: FakeApi, manifest: Path) -> None:
    Rollout(api)
    api.fail_route("GET", "/v1/apps/{ns}/{name}", error(404, "not_found", "app shop/web"))
    result = run("apply", "-f", str(manifest), "--wait")
    assert result.exit_code == 1
    assert "error: not_found: app shop/web" in result.stderr


def test_run_wait(run: Cli, api: FakeApi, clock: FakeClock) -> None:
    rollout = Rollout(api)
    api.route("PUT", "/v1/apps/{ns}/{name}", lambda r, _p: httpx.Response(200, json={}))
    result = run("run", "web", "-n", "shop", "--image", "x", "--replicas", "2", "--wait")
    assert result.exit_code == 0, result.output
    assert rollout.polls == 3


def test_apply_wait_rich_progress_on_a_terminal(
    run: Cli, api: FakeApi, manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2porch.cli import output

    monkeypatch.setattr(output, "is_terminal", lambda _stream: True)
    rollout = Rollout(api)
    result = run("apply", "-f", str(manifest), "--wait")
    assert result.exit_code == 0, result.output
    assert rollout.polls == 3
    assert "shop/web" in result.stderr
    assert "2/2" in result.stderr
    assert "all 2 replicas running" in result.stderr
