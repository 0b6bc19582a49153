"""`p2porch rollout status|history|undo|pause|resume` against the fake API."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from .conftest import Cli, FakeApi, FakeClock, error

ROLLOUT_PATH = "/v1/apps/{ns}/{name}/rollout"


def rollout(
    updated: int,
    ready: int,
    state: str = "progressing",
    replicas: int = 3,
    message: str = "",
    paused: bool = False,
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "app": "web",
        "revision": 2,
        "fromRevision": 1,
        "state": state,
        "paused": paused,
        "message": message,
        "rollbackOf": None,
        "startedAt": 1700000000.0,
        "updatedAt": 1700000010.0,
        "replicas": replicas,
        "updated": updated,
        "ready": ready,
        "readyTotal": replicas,
        "slots": [],
    }


class Sequence:
    """Answers GET .../rollout with the given bodies in turn (the last one repeats)."""

    def __init__(self, api: FakeApi, *answers: dict[str, Any] | httpx.Response) -> None:
        self.answers = list(answers)
        self.polls = 0
        api.route("GET", ROLLOUT_PATH, self.handle)

    def handle(self, _request: httpx.Request, _params: dict[str, str]) -> httpx.Response:
        answer = self.answers[min(self.polls, len(self.answers) - 1)]
        self.polls += 1
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)


# --------------------------------------------------------------------------- status


def test_status_once(run: Cli, api: FakeApi) -> None:
    Sequence(api, rollout(1, 1))
    for args in (("--no-watch",), ()):  # not a terminal: no watching by default
        result = run("rollout", "status", "web", *args)
        assert result.exit_code == 0, result.output
        assert result.stdout == (
            "default/web revision 2: progressing, 1/3 updated, 1/3 ready (from revision 1)\n"
        )
    assert api.calls() == ["GET /v1/apps/default/web/rollout"] * 2


def test_status_line_shows_pauses_and_messages(run: Cli, api: FakeApi) -> None:
    Sequence(api, rollout(1, 0, state="paused", message="web-1 crashed (exit 1)"))
    result = run("rollout", "status", "web", "-n", "shop", "--no-watch")
    assert api.calls() == ["GET /v1/apps/shop/web/rollout"]
    assert "revision 2: paused, 1/3 updated, 0/3 ready (from revision 1): web-1 crashed" in (
        result.stdout
    )
    Sequence(api, rollout(1, 1, paused=True))
    result = run("rollout", "status", "web", "--no-watch")
    assert "paused, 1/3 updated, 1/3 ready (from revision 1, paused by a user)" in result.stdout
    Sequence(api, rollout(3, 3, state="complete"))
    result = run("rollout", "status", "web", "--no-watch")
    assert result.stdout == "default/web revision 2: complete, 3/3 updated, 3/3 ready\n"


def test_watch_until_complete(run: Cli, api: FakeApi, clock: FakeClock) -> None:
    seq = Sequence(
        api,
        rollout(1, 0),
        rollout(1, 0),
        rollout(2, 1),
        rollout(3, 3, state="complete"),
    )
    result = run("rollout", "status", "web", "--watch")
    assert result.exit_code == 0, result.output
    assert seq.polls == 4
    assert clock.sleeps == [0.5, 0.5, 0.5]
    lines = result.stdout.splitlines()
    assert lines[0].endswith("1/3 updated, 0/3 ready (from revision 1)")  # once, not twice
    assert lines[1].endswith("2/3 updated, 1/3 ready (from revision 1)")
    assert lines[2].endswith("complete, 3/3 updated, 3/3 ready")
    assert lines[3] == "rollout of default/web complete: revision 2, 3/3 ready (2s)"


def test_watch_stops_with_exit_1_when_paused(run: Cli, api: FakeApi) -> None:
    Sequence(api, rollout(1, 0), rollout(1, 0, state="paused", message="web-1 not ready in 120s"))
    result = run("rollout", "status", "web", "-n", "shop", "--watch")
    assert result.exit_code == 1
    assert "error: rollout of shop/web paused:" in result.stderr
    assert "web-1 not ready in 120s" in result.stderr
    assert "p2porch rollout resume web -n shop" in result.stderr
    assert "p2porch rollout undo web -n shop" in result.stderr
    Sequence(api, rollout(1, 1, paused=True))  # a user's pause ends the watch too
    result = run("rollout", "status", "web", "--watch")
    assert result.exit_code == 1
    assert "error: rollout of default/web paused: paused by a user" in result.stderr


def test_watch_times_out(run: Cli, api: FakeApi, clock: FakeClock) -> None:
    seq = Sequence(api, rollout(1, 0))
    result = run("rollout", "status", "web", "--watch", "--timeout", "2")
    assert result.exit_code == 1
    assert seq.polls == 5  # at 0, 0.5, 1, 1.5 and 2 s
    assert sum(clock.sleeps) == 2.0
    assert "error: timed out after 2s: default/web revision 2: progressing, 1/3 updated" in (
        result.stderr
    )


def test_watch_rides_out_transient_errors(run: Cli, api: FakeApi) -> None:
    seq = Sequence(
        api,
        rollout(1, 0),
        error(503, "no_quorum", "no leader"),
        rollout(3, 3, state="complete"),
    )
    result = run("rollout", "status", "web", "--watch")
    assert result.exit_code == 0, result.output
    assert seq.polls == 3
    assert "(retrying: " in result.stdout and "no leader" in result.stdout


def test_watch_of_a_missing_app_fails_at_once(run: Cli, api: FakeApi) -> None:
    seq = Sequence(api, error(404, "not_found", "app default/nope not found"))
    result = run("rollout", "status", "nope", "--watch")
    assert result.exit_code == 1
    assert seq.polls == 1
    assert "error: not_found: app default/nope not found" in result.stderr


def test_watch_draws_bars_on_a_terminal(
    run: Cli, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2porch.cli import output

    monkeypatch.setattr(output, "is_terminal", lambda _stream: True)
    seq = Sequence(api, rollout(1, 0), rollout(3, 3, state="complete"))
    result = run("rollout", "status", "web")  # a terminal: watching is the default
    assert result.exit_code == 0, result.output
    assert seq.polls == 2
    assert "updated" in result.stdout and "ready" in result.stdout
    assert "3/3" in result.stdout
    assert "rollout of default/web complete" in result.stdout


# --------------------------------------------------------------------------- history


REVISIONS = [
    {
        "revision": 1,
        "cause": "created",
        "createdAt": 1764277200.0,
        "current": False,
        "image": "p2porch/demo:1",
        "summary": "p2porch/demo:1; ports 8080/tcp",
        "spec": {"image": "p2porch/demo:1"},
    },
    {
        "revision": 2,
        "cause": "image p2porch/demo:1 -> :2; env MESSAGE changed",
        "createdAt": 0,
        "current": True,
        "image": "p2porch/demo:2",
        "summary": "p2porch/demo:2; env MESSAGE; ports 8080/tcp",
        "spec": {"image": "p2porch/demo:2"},
    },
]


def test_history_table_and_json(run: Cli, api: FakeApi) -> None:
    api.json_route("GET", "/v1/apps/{ns}/{name}/revisions", REVISIONS)
    result = run("rollout", "history", "web")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["REVISION", "CAUSE", "CREATED", "CURRENT"]
    assert lines[1].split() == ["1", "created", "2025-11-27", "21:00:00", "UTC", "no"]
    assert lines[2].split()[0] == "2"
    assert "image p2porch/demo:1 -> :2; env MESSAGE changed" in lines[2]
    assert lines[2].split()[-2:] == ["-", "yes"]  # no recorded time; the current one
    wide = run("rollout", "history", "web", "-o", "wide")
    assert "TEMPLATE" in wide.stdout and "env MESSAGE" in wide.stdout
    as_json = run("rollout", "history", "web", "-n", "shop", "-o", "json")
    assert json.loads(as_json.stdout) == REVISIONS
    assert api.calls()[-1] == "GET /v1/apps/shop/web/revisions"


# --------------------------------------------------------------------------- writes


def test_undo(run: Cli, api: FakeApi) -> None:
    api.json_route("POST", ROLLOUT_PATH + "/undo", {**rollout(0, 0), "revision": 1})
    result = run("rollout", "undo", "web")
    assert result.exit_code == 0, result.output
    assert result.stdout == "app default/web rolling back to revision 1\n"
    assert api.calls() == ["POST /v1/apps/default/web/rollout/undo"]
    assert api.body() == {}
    run("rollout", "undo", "web", "-n", "shop", "--to-revision", "1")
    assert api.calls()[-1] == "POST /v1/apps/shop/web/rollout/undo"
    assert api.body() == {"toRevision": 1}
    assert run("rollout", "undo", "web", "--to-revision", "0").exit_code == 2


def test_undo_refusals_are_reported(run: Cli, api: FakeApi) -> None:
    message = "app default/web: nothing to undo: revision 1 is the only one in the history"
    api.fail_route("POST", ROLLOUT_PATH + "/undo", error(409, "conflict", message))
    result = run("rollout", "undo", "web")
    assert result.exit_code == 1
    assert result.stderr == f"error: conflict: {message}\n"


def test_pause_and_resume(run: Cli, api: FakeApi) -> None:
    api.json_route("POST", ROLLOUT_PATH + "/pause", rollout(1, 1, paused=True))
    api.json_route("POST", ROLLOUT_PATH + "/resume", rollout(1, 1))
    result = run("rollout", "pause", "web")
    assert result.exit_code == 0
    assert result.stdout == "rollout of default/web revision 2 paused\n"
    result = run("rollout", "resume", "web", "-n", "shop")
    assert result.stdout == "rollout of shop/web revision 2 resumed\n"
    assert api.calls() == [
        "POST /v1/apps/default/web/rollout/pause",
        "POST /v1/apps/shop/web/rollout/resume",
    ]
    api.fail_route(
        "POST",
        ROLLOUT_PATH + "/pause",
        error(409, "conflict", "app default/web has no rollout in progress"),
    )
    result = run("rollout", "pause", "web")
    assert result.exit_code == 1
    assert "error: conflict: app default/web has no rollout in progress" in result.stderr


# --------------------------------------------------------------------------- get endpoints


def test_get_endpoints_table_and_filters(run: Cli, api: FakeApi) -> None:
    endpoint = {
        "namespace": "default",
        "app": "web",
        "slot": 0,
        "replica": "web-0",
        "node": "n1",
        "revision": 2,
        "containerId": "abcdef0123456789",
        "ports": [
            {"containerPort": 8080, "host": "127.0.0.2", "hostPort": 32768, "protocol": "tcp"}
        ],
        "ready": True,
    }
    api.json_route("GET", "/v1/endpoints", [endpoint])
    result = run("get", "ep", "--app", "web", "-n", "default")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["REPLICA", "NAMESPACE", "APP", "NODE", "REVISION", "READY", "ADDRESS"]
    assert row.split()[-1] == "8080->127.0.0.2:32768"
    assert api.calls() == ["GET /v1/endpoints"]
    assert dict(api.requests[-1].url.params) == {"namespace": "default", "app": "web"}
