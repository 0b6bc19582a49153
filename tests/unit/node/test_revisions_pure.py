"""node/revisions.py: causes written from a template diff, the rollout and revision bodies of
the API, and what `rollout undo` picks. Pure values only."""

from __future__ import annotations

import attrs
import pytest

from p2porch.node.reconcile_core import ReplicaState, ReplicaStatus
from p2porch.node.revisions import (
    MAX_CAUSE_CHARS,
    NothingToUndo,
    RevisionNotFound,
    describe_change,
    revision_json,
    rolled_back,
    rollout_json,
    summarize_template,
    undo_target,
)
from p2porch.node.spec import (
    App,
    AppSpec,
    Balance,
    EnvVar,
    HttpGetAction,
    IngressRoute,
    ObjectMeta,
    PortSpec,
    Probe,
    Protocol,
    Resources,
    UpdateOrder,
    UpdateStrategy,
)
from p2porch.node.state import AppRevision, Placement, Rollout

PORTS = (PortSpec(8080),)


def spec(image: str = "p2porch/demo:1", **fields: object) -> AppSpec:
    fields.setdefault("ports", PORTS)
    return AppSpec(image=image, **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- describe_change


def test_new_app_is_created() -> None:
    assert describe_change(None, spec()) == "created"


def test_image_tag_change_is_abbreviated() -> None:
    assert describe_change(spec(), spec("p2porch/demo:2")) == "image p2porch/demo:1 -> :2"
    assert describe_change(spec(), spec("other/demo:1")) == "image p2porch/demo:1 -> other/demo:1"
    # A registry port is not a tag; a digest is.
    assert (
        describe_change(spec("reg:5000/demo"), spec("reg:5000/demo:2"))
        == "image reg:5000/demo -> :2"
    )
    assert describe_change(spec("demo:1"), spec("demo@sha256:ab")) == "image demo:1 -> @sha256:ab"


def test_several_changes_in_field_order() -> None:
    old = spec(env=(EnvVar("MESSAGE", "one"), EnvVar("GONE", "x")))
    probe = Probe(http_get=HttpGetAction(8080, "/ready"))
    new = spec(
        "p2porch/demo:2",
        env=(EnvVar("MESSAGE", "two"), EnvVar("NEW", "y")),
        readiness=probe,
        stop_grace_s=3,
    )
    assert describe_change(old, new) == (
        "image p2porch/demo:1 -> :2; env NEW added; env MESSAGE changed; env GONE removed; "
        "stopGracePeriodSeconds 10 -> 3; readinessProbe added"
    )
    assert describe_change(new, old).endswith("readinessProbe removed")
    slower = attrs.evolve(probe, period_s=30)
    assert describe_change(new, attrs.evolve(new, readiness=slower)) == "readinessProbe changed"


def test_ports_secrets_and_other_fields() -> None:
    old = spec()
    new = spec(ports=(PortSpec(8080), PortSpec(53, protocol=Protocol.UDP)))
    assert describe_change(old, new) == "port 53/udp added"
    published = spec(ports=(PortSpec(8080, published_port=30080),))
    assert describe_change(old, published) == "port 8080/tcp changed"
    assert describe_change(old, spec(secrets=("db",))) == "secret db added"
    assert describe_change(old, spec(resources=Resources(cpu_request_millicores=100))) == (
        "resources changed"
    )
    assert describe_change(old, spec(args=("-v",))) == "args changed"


def test_non_template_changes_have_no_cause() -> None:
    old = spec()
    for new in (
        spec(replicas=7),
        spec(update=UpdateStrategy(order=UpdateOrder.STOP_FIRST)),
        spec(ingress=(IngressRoute(8080, host="web.example.com"),)),
        spec(balance=Balance.LEAST_CONNECTIONS),
    ):
        assert describe_change(old, new) == ""


def test_causes_are_bounded() -> None:
    old = spec()
    new = spec(env=tuple(EnvVar(f"VARIABLE_NUMBER_{i}", "x") for i in range(60)))
    cause = describe_change(old, new)
    assert len(cause) <= MAX_CAUSE_CHARS
    assert cause.startswith("env VARIABLE_NUMBER_0, ")
    assert cause.endswith("...")


# --------------------------------------------------------------------------- revisions


def revision(number: int, image: str = "", cause: str = "", at: float = 0.0) -> AppRevision:
    return AppRevision("default", "web", number, spec(image or f"demo:{number}"), cause, at)


def test_revision_json() -> None:
    probe = Probe(http_get=HttpGetAction(8080, "/"))
    rev = AppRevision(
        "default",
        "web",
        3,
        spec("demo:3", env=(EnvVar("MESSAGE", "hi"),), readiness=probe, replicas=4),
        "image demo:2 -> :3",
        1700000000.5,
    )
    body = revision_json(rev, current=3)
    assert {k: body[k] for k in ("revision", "cause", "createdAt", "current", "image")} == {
        "revision": 3,
        "cause": "image demo:2 -> :3",
        "createdAt": 1700000000.5,
        "current": True,
        "image": "demo:3",
    }
    assert body["summary"] == "demo:3; env MESSAGE; ports 8080/tcp; probes readiness http"
    assert body["spec"]["image"] == "demo:3"
    assert body["spec"]["env"] == [{"name": "MESSAGE", "value": "hi"}]
    for not_template in ("replicas", "update", "ingress", "loadBalancing"):
        assert not_template not in body["spec"]
    assert revision_json(rev, current=4)["current"] is False
    assert summarize_template(AppSpec(image="x", command=("sh", "-c"), args=("exit 0",))) == (
        "x; sh -c exit 0"
    )


def test_undo_target() -> None:
    history = (revision(1), revision(2), revision(3))
    assert undo_target(history, None).revision == 2
    assert undo_target(history, 1).revision == 1
    with pytest.raises(RevisionNotFound, match="revision 9 not found .*1, 2, 3"):
        undo_target(history, 9)
    with pytest.raises(NothingToUndo, match="already runs revision 3"):
        undo_target(history, 3)
    with pytest.raises(NothingToUndo, match="only one"):
        undo_target(history[:1], None)
    with pytest.raises(NothingToUndo):
        undo_target((), None)


def test_rolled_back_keeps_the_apps_current_settings() -> None:
    update = UpdateStrategy(order=UpdateOrder.STOP_FIRST)
    today = App(
        ObjectMeta(name="web", generation=7),
        spec(
            "demo:3",
            replicas=5,
            update=update,
            ingress=(IngressRoute(8080),),
            balance=Balance.LEAST_CONNECTIONS,
        ),
    )
    back = rolled_back(today, revision(1))
    assert back.spec.image == "demo:1"
    assert (back.spec.replicas, back.spec.update, back.spec.ingress, back.spec.balance) == (
        5,
        update,
        (IngressRoute(8080),),
        Balance.LEAST_CONNECTIONS,
    )
    assert back.meta == today.meta
    # An old template that no longer has the port today's ingress routes to: refused.
    portless = AppRevision("default", "web", 1, AppSpec(image="demo:1"))
    with pytest.raises(NothingToUndo, match="revision 1 cannot take"):
        rolled_back(today, portless)


# --------------------------------------------------------------------------- rollout status


def status(slot: int, node: str, generation: int, ready: bool = True) -> ReplicaStatus:
    return ReplicaStatus(
        name=f"web-{slot}",
        namespace="default",
        app="web",
        slot=slot,
        node=node,
        generation=generation,
        state=ReplicaState.RUNNING if ready else ReplicaState.STARTING,
    )


def test_rollout_json_counts_updated_and_ready_per_owner() -> None:
    web = App(ObjectMeta(name="web"), spec("demo:2", replicas=4))
    placements = [
        Placement("default", "web", 0, "n1", 2),
        Placement("default", "web", 1, "n2", 2),
        Placement("default", "web", 2, "n3", 1),
        Placement("default", "other", 0, "n1", 2),
    ]
    statuses = [
        status(0, "n1", 2),  # updated and ready
        status(1, "n2", 1),  # start-first: the old container still serves ...
        status(1, "n2", 2, ready=False),  # ... while the new one starts
        status(2, "n3", 1),
        status(2, "n9", 2),  # not the owner's word: ignored
        attrs.evolve(status(0, "n1", 2), app="other"),
    ]
    rollout = Rollout(
        "default",
        "web",
        revision=2,
        from_revision=1,
        message="",
        started_s=10.0,
        updated_s=20.0,
        rollback_of=0,
    )
    body = rollout_json(web, 2, rollout, placements, statuses)
    assert {k: v for k, v in body.items() if k != "slots"} == {
        "namespace": "default",
        "app": "web",
        "revision": 2,
        "fromRevision": 1,
        "state": "progressing",
        "paused": False,
        "message": "",
        "rollbackOf": None,
        "startedAt": 10.0,
        "updatedAt": 20.0,
        "replicas": 4,
        "updated": 2,
        "ready": 1,
        "readyTotal": 3,
    }
    assert body["slots"] == [
        {"slot": 0, "replica": "web-0", "node": "n1", "revision": 2, "ready": True,
         "state": "running"},
        {"slot": 1, "replica": "web-1", "node": "n2", "revision": 2, "ready": False,
         "state": "starting"},
        {"slot": 2, "replica": "web-2", "node": "n3", "revision": 1, "ready": True,
         "state": "running"},
        {"slot": 3, "replica": "web-3", "node": None, "revision": None, "ready": False,
         "state": "pending"},
    ]  # fmt: skip


def test_rollout_json_without_a_current_record_is_complete() -> None:
    web = App(ObjectMeta(name="web"), spec("demo:3", replicas=1))
    placements = [Placement("default", "web", 0, "n1", 3)]
    stale = Rollout("default", "web", revision=2, from_revision=1, state="paused", paused=True)
    for record in (None, stale):
        body = rollout_json(web, 3, record, placements, [])
        assert (body["revision"], body["state"], body["paused"], body["fromRevision"]) == (
            3,
            "complete",
            False,
            None,
        )
        assert (body["updated"], body["ready"], body["readyTotal"]) == (1, 0, 0)
        assert body["slots"][0]["state"] == "pending"  # no word from the owner yet
    rollback = attrs.evolve(stale, revision=3, rollback_of=4, message="web-0 crashed")
    body = rollout_json(web, 3, rollback, placements, [])
    assert (body["state"], body["paused"], body["rollbackOf"], body["message"]) == (
        "paused",
        True,
        4,
        "web-0 crashed",
    )
