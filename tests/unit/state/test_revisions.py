"""App revisions and rollouts in the replicated state: what records a revision, what starts,
steps, pauses and ends a rollout, and what survives a snapshot. Pure: ClusterState only."""

from __future__ import annotations

import attrs

from p2porch.node.scheduler import Decision, SlotId
from p2porch.node.spec import (
    App,
    AppSpec,
    Balance,
    EnvVar,
    IngressRoute,
    ObjectMeta,
    PortSpec,
    UpdateOrder,
    UpdateStrategy,
)
from p2porch.node.state import (
    REVISION_HISTORY,
    ApplyDecision,
    ClusterState,
    Command,
    CommandResult,
    DeleteApp,
    NodeRecord,
    PauseRollout,
    Placement,
    PutApp,
    PutNode,
    ReplicaFact,
    ReportReplica,
    RolloutStep,
    SetRolloutState,
    decode_command,
    encode_command,
)

KEY = "default/web"


def app(image: str = "demo:1", replicas: int = 3, **spec: object) -> App:
    return App(
        ObjectMeta(name="web"),
        AppSpec(image=image, replicas=replicas, ports=(PortSpec(8080),), **spec),  # type: ignore[arg-type]
    )


def node(name: str) -> NodeRecord:
    host = f"127.0.0.{name[-1]}"
    return NodeRecord(name, host, f"{host}:7950", f"{host}:7951", f"{host}:7946")


class Log:
    """Applies commands through the codec, as the Raft log delivers them."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.index = 0
        for name in ("n1", "n2", "n3"):
            self.apply(PutNode(node(name)))

    def apply(self, command: Command) -> CommandResult:
        self.index += 1
        return self.state.apply(self.index, decode_command(encode_command(command)))

    def put(self, spec_app: App, cause: str = "", at_s: float = 0.0) -> CommandResult:
        result = self.apply(PutApp(spec_app, cause=cause, at_s=at_s))
        assert result.error is None, result.error
        return result

    def place(self, *slots: int) -> None:
        """Place ``slots`` of web on n1, n2, n3, ... (the generation is the state's to pick)."""
        place = tuple(Placement("default", "web", s, f"n{s % 3 + 1}", 999) for s in slots)
        assert self.apply(ApplyDecision(place, ())).error is None

    def generations(self) -> list[int]:
        return [p.generation for _, p in sorted(self.state.placements.items())]

    def revisions(self) -> list[int]:
        return [r.revision for r in self.state.revisions.get(KEY, ())]


def deployed() -> Log:
    """web at revision 1 with three replicas placed."""
    log = Log()
    log.put(app(), cause="created", at_s=100.0)
    log.place(0, 1, 2)
    return log


# --------------------------------------------------------------------------- revisions


def test_first_put_records_revision_one_without_a_rollout() -> None:
    log = Log()
    log.put(app(), cause="created", at_s=100.0)
    (rev,) = log.state.revisions[KEY]
    assert (rev.revision, rev.cause, rev.created_s) == (1, "created", 100.0)
    assert KEY not in log.state.rollouts  # nothing runs yet: nothing to roll


def test_template_change_creates_a_revision_and_a_rollout() -> None:
    log = deployed()
    result = log.put(app(image="demo:2"), cause="image demo:1 -> :2", at_s=200.0)
    assert [c.kind for c in result.changes] == ["app", "revision", "rollout"]
    assert log.revisions() == [1, 2]
    assert log.state.current_revision(KEY) == 2
    rollout = log.state.rollouts[KEY]
    assert (rollout.revision, rollout.from_revision, rollout.state) == (2, 1, "progressing")
    assert (rollout.started_s, rollout.updated_s, rollout.paused) == (200.0, 200.0, False)
    assert log.state.revisions[KEY][-1].cause == "image demo:1 -> :2"
    # Nothing moved yet: the controller moves replicas with RolloutStep.
    assert log.generations() == [1, 1, 1]


def test_template_change_without_placements_starts_no_rollout() -> None:
    log = Log()
    log.put(app())
    log.put(app(image="demo:2"))
    assert log.revisions() == [1, 2]
    assert KEY not in log.state.rollouts


def test_scale_ingress_update_and_balance_changes_record_no_revision() -> None:
    log = deployed()
    for changed in (
        app(replicas=5),
        app(replicas=5, ingress=(IngressRoute(8080, host="web.example.com"),)),
        app(replicas=5, update=UpdateStrategy(order=UpdateOrder.STOP_FIRST)),
        app(replicas=5, balance=Balance.LEAST_CONNECTIONS),
    ):
        result = log.put(changed)
        assert [c.kind for c in result.changes] == ["app"]
    assert log.state.apps[KEY].meta.generation == 5  # the app's generation moved ...
    assert log.revisions() == [1]  # ... its template did not
    assert log.state.current_revision(KEY) == 1
    assert KEY not in log.state.rollouts


def test_reapplying_an_older_template_reuses_its_revision() -> None:
    log = deployed()
    log.put(app(image="demo:2"), at_s=200.0)
    log.put(app(image="demo:1", replicas=4), at_s=300.0)  # back to the first template
    assert log.state.apps[KEY].meta.generation == 3
    assert log.revisions() == [2, 1]  # revision 1 moved to the newest place
    assert log.state.current_revision(KEY) == 1
    rev = log.state.revisions[KEY][-1]
    assert rev.cause == "back to revision 1"  # no cause given: the state says why
    assert rev.created_s == 300.0
    rollout = log.state.rollouts[KEY]
    assert (rollout.revision, rollout.from_revision) == (1, 2)
    # Given a cause, it is kept (what `rollout undo` sends).
    log.put(app(image="demo:2", replicas=4), cause="undo to revision 2")
    assert log.revisions() == [1, 2]
    assert log.state.revisions[KEY][-1].cause == "undo to revision 2"


def test_history_is_capped_but_running_revisions_are_kept() -> None:
    log = deployed()  # replicas stay at revision 1 throughout
    for n in range(2, 13):
        log.put(app(image=f"demo:{n}"))
    history = log.revisions()
    assert len(history) == REVISION_HISTORY
    assert history == [1, *range(4, 13)]  # 2 and 3 went; 1 still runs somewhere

    bare = Log()  # nothing placed: only the newest ten remain
    for n in range(1, 13):
        bare.put(app(image=f"demo:{n}"))
    assert bare.revisions() == list(range(3, 13))


# --------------------------------------------------------------------------- rollout steps


def test_rollout_step_moves_listed_slots_of_the_current_revision() -> None:
    log = deployed()
    fact = ReplicaFact("default", "web", 0, "n1", 1, "failed", "exit 1")
    log.apply(ReportReplica(fact))
    assert log.state.facts
    log.put(app(image="demo:2"), at_s=200.0)
    result = log.apply(RolloutStep("default", "web", 2, (0, 1), at_s=210.0))
    assert [c.kind for c in result.changes] == ["placement", "placement", "rollout"]
    assert log.generations() == [2, 2, 1]
    assert not log.state.facts  # a moved slot's old facts are about the old container
    rollout = log.state.rollouts[KEY]
    assert rollout.slot_started == ((0, 210.0), (1, 210.0))
    assert rollout.updated_s == 210.0
    # A slot already at the revision is not started again.
    again = log.apply(RolloutStep("default", "web", 2, (1, 2), at_s=220.0))
    assert [c.kind for c in again.changes] == ["placement", "rollout"]
    assert dict(log.state.rollouts[KEY].slot_started) == {0: 210.0, 1: 210.0, 2: 220.0}


def test_stale_rollout_steps_are_ignored() -> None:
    log = deployed()
    log.put(app(image="demo:2"))
    assert log.apply(RolloutStep("default", "web", 1, (0,), at_s=1.0)).changes == ()
    assert log.apply(RolloutStep("default", "web", 7, (0,), at_s=1.0)).changes == ()
    log.put(app(image="demo:3"))  # decided against revision 2, committed after revision 3
    assert log.apply(RolloutStep("default", "web", 2, (0,), at_s=1.0)).changes == ()
    assert log.generations() == [1, 1, 1]
    # An app without a rollout, or a missing slot, is not an error either.
    assert log.apply(RolloutStep("default", "nope", 1, (0,), at_s=1.0)).error is None
    assert log.apply(RolloutStep("default", "web", 3, (9,), at_s=1.0)).changes == ()


# --------------------------------------------------------------------------- rollout state


def test_set_rollout_state_rules() -> None:
    log = deployed()
    log.put(app(image="demo:2"))
    stale = SetRolloutState("default", "web", 1, "complete", "", at_s=5.0)
    assert log.apply(stale).changes == ()
    bad = log.apply(SetRolloutState("default", "web", 2, "exploded", "", at_s=5.0))
    assert bad.error == "unknown rollout state 'exploded'"
    failed = SetRolloutState("default", "web", 2, "paused", "web-0 not ready in 120s", 6.0)
    assert [c.kind for c in log.apply(failed).changes] == ["rollout"]
    rollout = log.state.rollouts[KEY]
    assert (rollout.state, rollout.message, rollout.paused) == (
        "paused",
        "web-0 not ready in 120s",
        False,  # the controller's pause is not the user's
    )
    assert log.apply(failed).changes == ()  # the same again: nothing new
    done = log.apply(SetRolloutState("default", "web", 2, "complete", "", at_s=7.0))
    assert log.state.rollouts[KEY].state == "complete"
    assert done.changes[0].value == log.state.rollouts[KEY]


def test_pause_and_resume_rules() -> None:
    log = deployed()
    missing = log.apply(PauseRollout("default", "nope", True, 1.0))
    assert missing.error == "app default/nope not found"
    idle = log.apply(PauseRollout("default", "web", True, 1.0))
    assert "no rollout in progress" in (idle.error or "")

    log.put(app(image="demo:2"), at_s=100.0)
    log.apply(RolloutStep("default", "web", 2, (0,), at_s=110.0))
    assert [c.kind for c in log.apply(PauseRollout("default", "web", True, 120.0)).changes] == [
        "rollout"
    ]
    rollout = log.state.rollouts[KEY]
    assert (rollout.paused, rollout.state, rollout.updated_s) == (True, "progressing", 120.0)
    assert rollout.slot_started == ((0, 110.0),)  # pausing keeps the deadlines

    # The controller gave up meanwhile; resuming clears that too and restarts the deadlines.
    log.apply(SetRolloutState("default", "web", 2, "paused", "web-0 crashed", at_s=130.0))
    log.apply(PauseRollout("default", "web", False, 500.0))
    rollout = log.state.rollouts[KEY]
    assert (rollout.paused, rollout.state, rollout.message) == (False, "progressing", "")
    assert rollout.slot_started == ((0, 500.0),)

    log.apply(SetRolloutState("default", "web", 2, "complete", "", at_s=600.0))
    done = log.apply(PauseRollout("default", "web", True, 700.0))
    assert "no rollout in progress" in (done.error or "")


def test_delete_app_drops_its_revisions_and_rollout() -> None:
    log = deployed()
    log.put(app(image="demo:2"))
    assert log.apply(DeleteApp("default", "web")).error is None
    assert KEY not in log.state.revisions
    assert KEY not in log.state.rollouts
    log.put(app(image="demo:9"))  # a new app of the same name starts a fresh history
    assert log.revisions() == [1]


def test_snapshot_round_trips_revisions_and_rollouts() -> None:
    log = deployed()
    log.put(app(image="demo:2"), cause="image demo:1 -> :2", at_s=200.0)
    log.apply(RolloutStep("default", "web", 2, (0,), at_s=210.0))
    log.apply(PauseRollout("default", "web", True, 220.0))
    other = App(ObjectMeta(name="db"), AppSpec(image="db:1"))
    log.put(other)
    log.put(attrs.evolve(other, spec=AppSpec(image="db:2")))
    restored = ClusterState.restore(log.state.snapshot())
    assert restored == log.state
    assert restored.revisions == log.state.revisions
    assert restored.rollouts == log.state.rollouts
    assert [r.revision for r in restored.revisions["default/db"]] == [1, 2]


# --------------------------------------------------------------------------- placements


def test_new_slots_are_placed_at_the_current_revision() -> None:
    log = deployed()
    log.put(app(image="demo:2"))  # generation 2, revision 2; replicas still at 1
    log.put(app(image="demo:2", replicas=5))  # generation 3 (a scale), revision still 2
    assert log.state.apps[KEY].meta.generation == 3
    log.place(3, 4)
    assert log.generations() == [1, 1, 1, 2, 2]  # new slots: the revision, mid-rollout
    # The leader's command says so too (the state re-checks it on apply anyway).
    cmd = log.state.decision_command(Decision(place=((SlotId(KEY, 5), "n3"),)))
    assert cmd is not None and cmd.place[0].generation == 2


def test_app_for_runs_the_placements_revision_with_the_current_replicas() -> None:
    log = deployed()
    env = (EnvVar("MESSAGE", "two"),)
    log.put(app(image="demo:2", env=env))
    log.put(app(image="demo:2", env=env, replicas=4, balance=Balance.LEAST_CONNECTIONS))
    log.apply(RolloutStep("default", "web", 2, (1,), at_s=1.0))
    old, new = log.state.placements[SlotId(KEY, 0)], log.state.placements[SlotId(KEY, 1)]
    old_app, new_app = log.state.app_for(old), log.state.app_for(new)
    assert old_app is not None and new_app is not None
    assert (old_app.spec.image, old_app.spec.env, old_app.meta.generation) == ("demo:1", (), 1)
    assert (new_app.spec.image, new_app.spec.env, new_app.meta.generation) == ("demo:2", env, 2)
    for running in (old_app, new_app):  # replicas and traffic settings are the app's today
        assert running.spec.replicas == 4
        assert running.spec.balance is Balance.LEAST_CONNECTIONS
    log.apply(DeleteApp("default", "web"))
    assert log.state.app_for(old) is None


def test_a_published_port_belongs_to_one_app() -> None:
    log = Log()
    published = (PortSpec(8080, 30080),)
    web = App(ObjectMeta(name="web"), AppSpec(image="demo:1", ports=published))
    assert log.apply(PutApp(web)).error is None
    other = App(ObjectMeta(name="api"), AppSpec(image="demo:1", ports=(PortSpec(9090, 30080),)))
    result = log.apply(PutApp(other))
    assert result.error == "published port 30080/tcp is already used by app default/web"
    # The same app may keep (and change around) its own port.
    web2 = App(ObjectMeta(name="web"), AppSpec(image="demo:2", ports=published))
    assert log.apply(PutApp(web2)).error is None
