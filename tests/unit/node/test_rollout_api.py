"""The rollout endpoints of node/api.py, on a fake agent: a real ClusterState that commits
every proposal at once, replica statuses handed in by the test, no sockets."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import attrs
import pytest

from p2porch.common import pki
from p2porch.node.api import Api, authorize, required_role
from p2porch.node.http import HttpError, Request, Response
from p2porch.node.manifest import to_manifest
from p2porch.node.reconcile_core import ReplicaState, ReplicaStatus
from p2porch.node.spec import App, AppSpec, EnvVar, ObjectMeta, PortSpec
from p2porch.node.state import (
    ApplyDecision,
    ClusterState,
    Command,
    CommandResult,
    NodeRecord,
    Placement,
    PutApp,
    PutNode,
    RolloutStep,
)

KEY = "default/web"


class FakeRaft:
    def __init__(self) -> None:
        self.is_leader = True
        self.leader_id: str | None = "n1"


class FakeReconciler:
    def __init__(self) -> None:
        self.rows: list[ReplicaStatus] = []

    def statuses(self) -> list[ReplicaStatus]:
        return self.rows


class FakeAgent:
    """What the API handlers touch of node/daemon.py's Agent."""

    def __init__(self) -> None:
        self.name = "n1"
        self.security = None
        self.raft = FakeRaft()
        self.state = ClusterState()
        self.index = 0
        self.proposed: list[Command] = []
        self.statuses: list[ReplicaStatus] = []
        self.reconciler = FakeReconciler()
        for name in ("n1", "n2"):
            host = f"127.0.0.{name[-1]}"
            self.commit(PutNode(NodeRecord(name, host, f"{host}:1", f"{host}:2", f"{host}:3")))

    def commit(self, command: Command) -> CommandResult:
        self.index += 1
        return self.state.apply(self.index, command)

    async def propose(self, command: Command) -> CommandResult:
        self.proposed.append(command)
        return self.commit(command)

    def replica_statuses(self) -> list[ReplicaStatus]:
        return self.statuses


ADMIN = pki.PeerIdentity("ada", pki.ROLE_ADMIN, "c1", 1, dt.datetime(2099, 1, 1, tzinfo=dt.UTC))
VIEWER = attrs.evolve(ADMIN, name="val", role=pki.ROLE_VIEWER)


def request(method: str, path: str, body: Any = None, who: pki.PeerIdentity = ADMIN) -> Request:
    data = b"" if body is None else json.dumps(body).encode()
    return Request(method, path, {}, {}, data, "127.0.0.1:1", identity=who)


async def call(api: Api, method: str, path: str, body: Any = None) -> Any:
    response: Response = await api.handle(request(method, path, body))
    assert response.status == 200
    return json.loads(response.body)


async def refused(api: Api, method: str, path: str, body: Any = None) -> HttpError:
    with pytest.raises(HttpError) as info:
        await api.handle(request(method, path, body))
    return info.value


def manifest(image: str = "p2porch/demo:1", replicas: int = 2, message: str = "hi") -> Any:
    app = App(
        ObjectMeta(name="web"),
        AppSpec(
            image=image,
            replicas=replicas,
            ports=(PortSpec(8080),),
            env=(EnvVar("MESSAGE", message),),
        ),
    )
    return to_manifest(app)


def running(slot: int, node: str, generation: int, ready: bool = True) -> ReplicaStatus:
    return ReplicaStatus(
        f"web-{slot}",
        "default",
        "web",
        slot,
        node,
        generation,
        ReplicaState.RUNNING,
        probes_ready=ready,
    )


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def api(agent: FakeAgent) -> Api:
    return Api(agent)  # type: ignore[arg-type]


async def deploy(api: Api, agent: FakeAgent) -> None:
    """web at revision 1, both replicas placed (n1, n2), then revision 2 applied."""
    await call(api, "PUT", "/v1/apps/default/web", manifest())
    place = (Placement("default", "web", 0, "n1", 1), Placement("default", "web", 1, "n2", 1))
    agent.commit(ApplyDecision(place, ()))
    await call(api, "POST", "/v1/apply", {"documents": [manifest("p2porch/demo:2", message="ho")]})


# --------------------------------------------------------------------------- causes


async def test_put_apply_and_scale_carry_cause_and_time(api: Api, agent: FakeAgent) -> None:
    await deploy(api, agent)
    await call(api, "POST", "/v1/apps/default/web/scale", {"replicas": 3})
    puts = [c for c in agent.proposed if isinstance(c, PutApp)]
    assert [c.cause for c in puts] == [
        "created",
        "image p2porch/demo:1 -> :2; env MESSAGE changed",
        "",
    ]
    assert all(c.at_s > 1_600_000_000 for c in puts)  # the proposer's wall clock
    history = agent.state.revisions[KEY]
    assert [(r.revision, r.cause) for r in history] == [
        (1, "created"),
        (2, "image p2porch/demo:1 -> :2; env MESSAGE changed"),
    ]


# --------------------------------------------------------------------------- reads


async def test_rollout_status(api: Api, agent: FakeAgent) -> None:
    await deploy(api, agent)
    agent.commit(RolloutStep("default", "web", 2, (0,), at_s=5.0))
    agent.statuses = [running(0, "n1", 2), running(1, "n2", 1)]
    body = await call(api, "GET", "/v1/apps/default/web/rollout")
    assert (body["revision"], body["fromRevision"], body["state"]) == (2, 1, "progressing")
    assert (body["replicas"], body["updated"], body["ready"], body["readyTotal"]) == (2, 1, 1, 2)
    assert [(s["replica"], s["revision"], s["ready"]) for s in body["slots"]] == [
        ("web-0", 2, True),
        ("web-1", 1, True),
    ]
    missing = await refused(api, "GET", "/v1/apps/default/nope/rollout")
    assert (missing.status, missing.code) == (404, "not_found")


async def test_revisions_list(api: Api, agent: FakeAgent) -> None:
    await deploy(api, agent)
    rows = await call(api, "GET", "/v1/apps/default/web/revisions")
    assert [(r["revision"], r["current"], r["image"]) for r in rows] == [
        (1, False, "p2porch/demo:1"),
        (2, True, "p2porch/demo:2"),
    ]
    assert rows[1]["cause"] == "image p2porch/demo:1 -> :2; env MESSAGE changed"
    assert rows[1]["spec"]["env"] == [{"name": "MESSAGE", "value": "ho"}]
    assert (await refused(api, "GET", "/v1/apps/default/nope/revisions")).status == 404


# --------------------------------------------------------------------------- writes


async def test_pause_and_resume(api: Api, agent: FakeAgent) -> None:
    await deploy(api, agent)
    body = await call(api, "POST", "/v1/apps/default/web/rollout/pause")
    assert (body["paused"], body["state"]) == (True, "progressing")
    assert agent.state.rollouts[KEY].paused
    body = await call(api, "POST", "/v1/apps/default/web/rollout/resume")
    assert body["paused"] is False
    nope = await refused(api, "POST", "/v1/apps/default/nope/rollout/pause")
    assert (nope.status, nope.code) == (404, "not_found")


async def test_pause_without_a_rollout_is_a_conflict(api: Api) -> None:
    await call(api, "PUT", "/v1/apps/default/web", manifest())
    err = await refused(api, "POST", "/v1/apps/default/web/rollout/pause")
    assert (err.status, err.code) == (409, "conflict")
    assert "no rollout in progress" in err.message


async def test_undo_to_the_previous_revision(api: Api, agent: FakeAgent) -> None:
    await deploy(api, agent)
    await call(api, "POST", "/v1/apps/default/web/scale", {"replicas": 3})
    body = await call(api, "POST", "/v1/apps/default/web/rollout/undo")
    assert (body["revision"], body["fromRevision"], body["state"]) == (1, 2, "progressing")
    app = agent.state.apps[KEY]
    assert app.spec.image == "p2porch/demo:1"
    assert app.spec.replicas == 3  # the scale is kept: replicas are not a revision's
    history = agent.state.revisions[KEY]
    assert [(r.revision, r.cause) for r in history] == [
        (2, "image p2porch/demo:1 -> :2; env MESSAGE changed"),
        (1, "undo to revision 1"),
    ]
    # Undo again: back to 2 (the one before the current), like kubectl.
    body = await call(api, "POST", "/v1/apps/default/web/rollout/undo", {})
    assert body["revision"] == 2


async def test_undo_to_a_given_revision_and_refusals(api: Api, agent: FakeAgent) -> None:
    await deploy(api, agent)
    await call(api, "PUT", "/v1/apps/default/web", manifest("p2porch/demo:3"))
    body = await call(api, "POST", "/v1/apps/default/web/rollout/undo", {"toRevision": 1})
    assert body["revision"] == 1
    assert agent.state.apps[KEY].spec.image == "p2porch/demo:1"

    gone = await refused(api, "POST", "/v1/apps/default/web/rollout/undo", {"toRevision": 9})
    assert (gone.status, gone.code) == (404, "not_found")
    assert "revision 9 not found" in gone.message
    same = await refused(api, "POST", "/v1/apps/default/web/rollout/undo", {"toRevision": 1})
    assert (same.status, same.code) == (409, "conflict")
    for bad in ({"toRevision": "2"}, {"toRevision": 0}, {"toRevision": True}, [1]):
        err = await refused(api, "POST", "/v1/apps/default/web/rollout/undo", bad)
        assert (err.status, err.code) == (400, "invalid")
    missing = await refused(api, "POST", "/v1/apps/default/nope/rollout/undo")
    assert missing.status == 404


async def test_nothing_to_undo(api: Api) -> None:
    await call(api, "PUT", "/v1/apps/default/web", manifest())
    err = await refused(api, "POST", "/v1/apps/default/web/rollout/undo")
    assert (err.status, err.code) == (409, "conflict")
    assert "nothing to undo" in err.message


async def test_writes_need_a_leader(api: Api, agent: FakeAgent) -> None:
    await deploy(api, agent)
    agent.raft.is_leader = False
    agent.raft.leader_id = None
    for action in ("pause", "resume", "undo"):
        err = await refused(api, "POST", f"/v1/apps/default/web/rollout/{action}")
        assert (err.status, err.code) == (503, "no_quorum")
    assert (await call(api, "GET", "/v1/apps/default/web/rollout"))["revision"] == 2


# --------------------------------------------------------------------------- roles


ROUTES = [
    ("GET", "/v1/apps/default/web/rollout", pki.ROLE_VIEWER),
    ("GET", "/v1/apps/default/web/revisions", pki.ROLE_VIEWER),
    ("POST", "/v1/apps/default/web/rollout/pause", pki.ROLE_ADMIN),
    ("POST", "/v1/apps/default/web/rollout/resume", pki.ROLE_ADMIN),
    ("POST", "/v1/apps/default/web/rollout/undo", pki.ROLE_ADMIN),
]


@pytest.mark.parametrize(("method", "path", "role"), ROUTES)
def test_roles(method: str, path: str, role: str) -> None:
    assert required_role(method, path) == role
    authorize(request(method, path, who=ADMIN))
    if role == pki.ROLE_VIEWER:
        authorize(request(method, path, who=VIEWER))
    else:
        with pytest.raises(HttpError) as info:
            authorize(request(method, path, who=VIEWER))
        assert info.value.status == 403


def test_routes_are_registered(api: Api) -> None:
    patterns = {(m, r.pattern) for m, r, _h in api.router._routes}
    for method, path, _role in ROUTES:
        concrete = path.replace("/default/web/", "/{ns}/{name}/")
        regex = (
            "^"
            + concrete.replace("{ns}", "(?P<ns>[^/]+)").replace("{name}", "(?P<name>[^/]+)")
            + "$"
        )
        assert (method, regex) in patterns


async def test_app_status_names_the_revision_and_its_rollout(api: Api, agent: FakeAgent) -> None:
    await call(api, "PUT", "/v1/apps/default/web", manifest())
    status = (await call(api, "GET", "/v1/apps/default/web"))["status"]
    assert (status["revision"], status["rollout"]) == (1, "complete")
    await deploy(api, agent)
    status = (await call(api, "GET", "/v1/apps/default/web"))["status"]
    assert (status["revision"], status["rollout"]) == (2, "progressing")
    await call(api, "POST", "/v1/apps/default/web/rollout/pause")
    (app,) = await call(api, "GET", "/v1/apps")
    assert app["status"]["rollout"] == "paused"
