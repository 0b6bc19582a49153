"""The leader's rollout controller (node/rollout.py): batches, readiness gating, minimum ready
time, failure -> pause or rollback, completion. Pure: a ClusterState driven through the codec
(as the log delivers commands) and SlotHealth maps standing in for the owners' reports."""

from __future__ import annotations

from p2porch.node.rollout import SlotHealth, plan_rollouts
from p2porch.node.scheduler import SlotId
from p2porch.node.spec import FailureAction, UpdateOrder, UpdateStrategy
from p2porch.node.state import (
    PauseRollout,
    PutApp,
    ReplicaFact,
    ReportReplica,
    RolloutStep,
    SetRolloutState,
)
from tests.unit.state.test_revisions import KEY, Log, app


def slot(n: int) -> SlotId:
    return SlotId(KEY, n)


def rolled(log: Log, strategy: UpdateStrategy | None = None, replicas: int = 3) -> Log:
    """web at revision 1 with ``replicas`` placed, then a new image: revision 2 rolling."""
    strategy = strategy or UpdateStrategy()
    log.put(app(replicas=replicas, update=strategy), at_s=0.0)
    log.place(*range(replicas))
    log.put(app(image="demo:2", replicas=replicas, update=strategy), at_s=10.0)
    return log


def healthy(log: Log, ready_for_s: float = 60.0) -> dict[SlotId, SlotHealth]:
    """Every placed slot ready at the revision its placement names."""
    return {
        s: SlotHealth(node=p.node, revision=p.generation, ready=True, ready_for_s=ready_for_s)
        for s, p in log.state.placements.items()
    }


def step(log: Log, health: dict[SlotId, SlotHealth], now: float = 20.0) -> list[object]:
    commands = plan_rollouts(log.state, health, now)
    for command in commands:
        assert log.apply(command).error is None
    return list(commands)


def test_start_first_moves_max_surge_slots_at_a_time_and_waits_for_readiness() -> None:
    log = rolled(Log())
    (cmd,) = step(log, healthy(log))
    assert cmd == RolloutStep("default", "web", 2, (0,), 20.0)
    # Slot 0 runs revision 2 but is not ready yet: nothing more moves.
    health = healthy(log)
    health[slot(0)] = SlotHealth("n1", 2, ready=False)
    assert step(log, health) == []
    # Ready: the next one goes.
    (cmd,) = step(log, healthy(log))
    assert isinstance(cmd, RolloutStep) and cmd.slots == (1,)


def test_a_whole_rollout_ends_complete_with_every_slot_on_the_new_revision() -> None:
    log = rolled(Log(), UpdateStrategy(max_surge="2"), replicas=5)
    for _ in range(10):
        commands = step(log, healthy(log))
        if any(isinstance(c, SetRolloutState) for c in commands):
            break
    assert log.state.rollouts[KEY].state == "complete"
    assert {p.generation for p in log.state.placements.values()} == {2}


def test_stop_first_batch_is_max_unavailable() -> None:
    strategy = UpdateStrategy(order=UpdateOrder.STOP_FIRST, max_unavailable="2", max_surge="0")
    log = rolled(Log(), strategy, replicas=4)
    (cmd,) = step(log, healthy(log))
    assert isinstance(cmd, RolloutStep) and cmd.slots == (0, 1)


def test_min_ready_time_holds_the_next_batch() -> None:
    log = rolled(Log(), UpdateStrategy(min_ready_s=5))
    step(log, healthy(log))
    assert step(log, healthy(log, ready_for_s=2.0)) == []
    (cmd,) = step(log, healthy(log, ready_for_s=5.0))
    assert isinstance(cmd, RolloutStep) and cmd.slots == (1,)


def test_a_crashing_new_replica_rolls_back_to_the_previous_template() -> None:
    log = rolled(Log())
    step(log, healthy(log))
    health = healthy(log)
    health[slot(0)] = SlotHealth("n1", 2, ready=False, failure="restarted 1 time(s)")
    (cmd,) = step(log, health)
    assert isinstance(cmd, PutApp) and cmd.rollback_of == 2
    assert cmd.app.spec.image == "demo:1" and "restarted" in cmd.cause
    # The old template reuses revision 1: slots 1 and 2 are already up to date.
    rollout = log.state.rollouts[KEY]
    assert (rollout.revision, rollout.from_revision, rollout.rollback_of) == (1, 2, 2)
    (back,) = step(log, healthy(log))
    assert back == RolloutStep("default", "web", 1, (0,), 20.0)


def test_a_failing_automatic_rollback_pauses_instead_of_ping_pong() -> None:
    log = rolled(Log())
    step(log, healthy(log))
    health = healthy(log)
    health[slot(0)] = SlotHealth("n1", 2, ready=False, failure="exit 1")
    step(log, health)  # rollback to revision 1
    step(log, healthy(log))  # slot 0 back to revision 1
    health = healthy(log)
    health[slot(0)] = SlotHealth("n1", 1, ready=False, failure="exit 1")
    (cmd,) = step(log, health)
    assert isinstance(cmd, SetRolloutState) and cmd.state == "paused"
    assert step(log, health) == []


def test_pause_action_and_user_pause_and_resume() -> None:
    log = rolled(Log(), UpdateStrategy(failure_action=FailureAction.PAUSE))
    step(log, healthy(log))
    fact = ReplicaFact("default", "web", 0, "n1", 2, "failed", "image demo:2 unavailable")
    assert log.apply(ReportReplica(fact)).error is None
    (cmd,) = step(log, healthy(log))
    assert isinstance(cmd, SetRolloutState) and cmd.state == "paused"
    assert "image demo:2 unavailable" in cmd.message
    assert step(log, healthy(log)) == []  # paused stays paused
    assert log.apply(PauseRollout("default", "web", False, 30.0)).error is None
    assert log.state.rollouts[KEY].state == "progressing"


def test_user_pause_stops_new_batches() -> None:
    log = rolled(Log())
    assert log.apply(PauseRollout("default", "web", True, 15.0)).error is None
    assert step(log, healthy(log)) == []
    assert log.apply(PauseRollout("default", "web", False, 16.0)).error is None
    (cmd,) = step(log, healthy(log))
    assert isinstance(cmd, RolloutStep)


def test_progress_deadline_fails_a_replica_that_never_gets_ready() -> None:
    log = rolled(Log(), UpdateStrategy(progress_deadline_s=30))
    step(log, healthy(log), now=20.0)  # slot 0 moved at t=20
    health = healthy(log)
    health[slot(0)] = SlotHealth("n1", 2, ready=False)
    assert step(log, health, now=49.0) == []
    (cmd,) = step(log, health, now=51.0)
    assert isinstance(cmd, PutApp) and "not ready within 30s" in cmd.cause


def test_a_report_from_another_node_or_revision_does_not_count_as_ready() -> None:
    log = rolled(Log())
    step(log, healthy(log))
    health = healthy(log)
    health[slot(0)] = SlotHealth("n2", 2, ready=True, ready_for_s=60)  # not the owner
    assert step(log, health) == []
    health[slot(0)] = SlotHealth("n1", 1, ready=True, ready_for_s=60)  # the old container
    assert step(log, health) == []


def test_rollback_drops_ingress_routes_the_old_template_cannot_serve() -> None:
    from p2porch.node.spec import App, AppSpec, IngressRoute, ObjectMeta, PortSpec

    log = Log()
    log.put(app(), at_s=0.0)  # revision 1 listens on 8080 only
    log.place(0, 1, 2)
    two_ports = (PortSpec(8080), PortSpec(9090))
    routes = (IngressRoute(port=8080), IngressRoute(port=9090, path="/admin"))
    new = AppSpec(image="demo:2", replicas=3, ports=two_ports, ingress=routes)
    log.put(App(ObjectMeta(name="web"), new), at_s=10.0)
    step(log, healthy(log))
    # The reconciler's view of a slot still on revision 1 must not fail on the new route.
    old = log.state.app_for(log.state.placements[slot(1)])
    assert old is not None and [r.port for r in old.spec.ingress] == [8080]
    health = healthy(log)
    health[slot(0)] = SlotHealth("n1", 2, ready=False, failure="exit 1")
    (cmd,) = step(log, health)
    assert isinstance(cmd, PutApp) and [r.port for r in cmd.app.spec.ingress] == [8080]
    assert "1 ingress route(s) to ports it lacks dropped" in cmd.cause
