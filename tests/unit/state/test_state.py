"""The replicated desired state: generations, refusals as results, scheduler loop, snapshots."""

from __future__ import annotations

import random

import attrs
import pytest

from p2porch.common.errors import CodecError
from p2porch.node.scheduler import NodeStatus, schedule
from p2porch.node.spec import App, AppSpec, Namespace, ObjectMeta
from p2porch.node.state import (
    ApplyDecision,
    ClusterState,
    Command,
    DeleteApp,
    DeleteNamespace,
    NodeRecord,
    Placement,
    PutApp,
    PutNamespace,
    PutNode,
    RemoveNode,
    ReplicaFact,
    ReportReplica,
    SetNodeDrained,
    decode_command,
    encode_command,
)

GIB = 1 << 30


def app(
    name: str = "web", replicas: int = 3, namespace: str = "default", image: str = "demo"
) -> App:
    return App(ObjectMeta(name=name, namespace=namespace), AppSpec(image=image, replicas=replicas))


def node(name: str) -> NodeRecord:
    host = f"127.0.0.{name[-1]}"
    return NodeRecord(
        name,
        host,
        api_address=f"{host}:7950",
        raft_address=f"{host}:7951",
        gossip_address=f"{host}:7946",
        cpu_millicores=4000,
        memory_bytes=4 * GIB,
    )


class Log:
    """Applies commands through the codec, as the Raft log would deliver them."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.index = 0

    def apply(self, command):
        self.index += 1
        return self.state.apply(self.index, decode_command(encode_command(command)))

    def reconcile(self, live: dict[str, NodeStatus]) -> None:
        decision = schedule(
            self.state.sched_apps(), self.state.sched_nodes(live), self.state.slot_map()
        )
        cmd = self.state.decision_command(decision)
        if cmd is not None:
            assert self.apply(cmd).error is None


def test_generation_bumps_only_on_change() -> None:
    log = Log()
    assert log.apply(PutApp(app())).changes[0].value.meta.generation == 1
    assert log.apply(PutApp(app())).changes == ()  # same manifest again: no new generation
    result = log.apply(PutApp(app(replicas=5)))
    assert result.changes[0].value.meta.generation == 2


def test_conditional_write_refuses_stale_generation() -> None:
    log = Log()
    log.apply(PutApp(app()))
    result = log.apply(PutApp(app(replicas=4), expected_generation=0))
    assert result.error is not None
    assert "generation 1, not 0" in result.error
    assert log.state.apps["default/web"].spec.replicas == 3


def test_app_needs_its_namespace() -> None:
    log = Log()
    result = log.apply(PutApp(app(namespace="prod")))
    assert result.error == "namespace 'prod' not found (create it first)"
    log.apply(PutNamespace(Namespace("prod")))
    assert log.apply(PutApp(app(namespace="prod"))).error is None
    assert "still holds apps: web" in (log.apply(DeleteNamespace("prod")).error or "")
    assert log.apply(DeleteNamespace("default")).error is not None


def test_scheduler_loop_places_moves_and_releases() -> None:
    log = Log()
    for n in ("n1", "n2", "n3"):
        log.apply(PutNode(node(n)))
    log.apply(PutApp(app()))
    alive = {n: NodeStatus.ALIVE for n in ("n1", "n2", "n3")}
    log.reconcile(alive)
    assert sorted(p.node for p in log.state.placements.values()) == ["n1", "n2", "n3"]
    assert all(p.generation == 1 for p in log.state.placements.values())

    log.reconcile(alive | {"n3": NodeStatus.DEAD})
    assert "n3" not in {p.node for p in log.state.placements.values()}
    assert len(log.state.placements) == 3

    log.apply(DeleteApp("default", "web"))
    log.reconcile(alive)
    assert log.state.placements == {}


def test_stale_decision_parts_are_skipped() -> None:
    log = Log()
    log.apply(PutNode(node("n1")))
    log.apply(PutApp(app(replicas=1)))
    stale = ApplyDecision(
        place=(
            Placement("default", "web", 0, "n1", 1),
            Placement("default", "web", 5, "n1", 1),  # beyond replicas
            Placement("default", "gone", 0, "n1", 1),  # no such app
            Placement("default", "web", 0, "n9", 1),  # no such node
        ),
        release=(),
    )
    log.apply(stale)
    assert list(log.state.placements.values()) == [Placement("default", "web", 0, "n1", 1)]


def test_removed_node_cannot_come_back_and_drain_is_kept() -> None:
    log = Log()
    log.apply(PutNode(node("n1")))
    log.apply(SetNodeDrained("n1", True))
    log.apply(PutNode(attrs.evolve(node("n1"), cpu_millicores=8000)))
    assert log.state.nodes["n1"].drained is True
    log.apply(RemoveNode("n1"))
    assert "was removed" in (log.apply(PutNode(node("n1"))).error or "")


def test_replica_facts_only_from_the_assigned_node() -> None:
    log = Log()
    log.apply(PutNode(node("n1")))
    log.apply(PutApp(app(replicas=1)))
    log.reconcile({"n1": NodeStatus.ALIVE})
    fact = ReplicaFact("default", "web", 0, "n1", 1, "failed", "image not found")
    assert log.apply(ReportReplica(attrs.evolve(fact, node="n2"))).changes == ()
    assert log.apply(ReportReplica(fact)).changes[0].value == fact


def test_snapshot_round_trip_and_determinism() -> None:
    rng = random.Random(3)
    a, b = Log(), Log()
    names = [f"n{i}" for i in range(1, 5)]
    commands: list[Command] = []
    for n in names:
        commands.append(PutNode(node(n)))
    for _ in range(30):
        commands.append(PutApp(app(name=f"a{rng.randint(0, 4)}", replicas=rng.randint(0, 6))))
        if rng.random() < 0.2:
            commands.append(DeleteApp("default", f"a{rng.randint(0, 4)}"))
    for cmd in commands:
        a.apply(cmd)
        b.apply(cmd)
        live = {n: NodeStatus.ALIVE for n in names}
        a.reconcile(live)
        b.reconcile(live)
    assert a.state == b.state
    restored = ClusterState.restore(a.state.snapshot())
    assert restored == a.state
    assert restored.snapshot() == a.state.snapshot()


def test_garbage_commands_are_codec_errors() -> None:
    with pytest.raises(CodecError):
        decode_command(b"\x93\x01\x02")
