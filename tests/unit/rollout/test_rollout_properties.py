"""Properties of the rollout controller over random runs (hypothesis): whatever the owners
report and whenever replicas fail, a rollout never has more replicas in flight than its
batch, completes only with every replica on the target revision and ready, and meets a
failure with a rollback or a pause -- never by pressing on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2porch.node.rollout import SlotHealth, plan_rollouts
from p2porch.node.scheduler import SlotId
from p2porch.node.spec import FailureAction, UpdateOrder, UpdateStrategy
from p2porch.node.state import PutApp, RolloutStep, SetRolloutState
from tests.unit.state.test_revisions import KEY, Log, app

strategies = st.builds(
    UpdateStrategy,
    order=st.sampled_from(list(UpdateOrder)),
    max_surge=st.sampled_from(["1", "2", "50%", "100%"]),
    max_unavailable=st.sampled_from(["1", "2", "25%"]),
    min_ready_s=st.integers(0, 5),
    progress_deadline_s=st.integers(5, 60),
    failure_action=st.sampled_from(list(FailureAction)),
)

# Per pass and placed slot: what its owner says (ready soon, not yet, or failed).
reports = st.lists(
    st.lists(
        st.sampled_from(["ready", "ready", "ready", "starting", "failed"]), min_size=6, max_size=6
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(strategy=strategies, replicas=st.integers(1, 6), passes=reports)
def test_rollouts_respect_their_batch_and_never_press_on_after_a_failure(
    strategy: UpdateStrategy, replicas: int, passes: list[list[str]]
) -> None:
    log = Log()
    log.put(app(replicas=replicas, update=strategy), at_s=0.0)
    log.place(*range(replicas))
    log.put(app(image="demo:2", replicas=replicas, update=strategy), at_s=1.0)
    batch = strategy.batch(replicas)
    now = 2.0
    ready_since: dict[tuple[int, int], float] = {}
    for verdicts in passes:
        rollout = log.state.rollouts[KEY]
        target = rollout.revision
        health: dict[SlotId, SlotHealth] = {}
        failed = False
        for slot, placement in sorted(log.state.placements.items()):
            verdict = verdicts[slot.slot]
            if placement.generation != target:
                verdict = "ready"  # replicas not moved keep serving as before
            if verdict == "failed":
                failed = True
            ready = verdict == "ready"
            since = ready_since.setdefault((slot.slot, placement.generation), now)
            health[slot] = SlotHealth(
                node=placement.node,
                revision=placement.generation,
                ready=ready,
                ready_for_s=now - since if ready else 0.0,
                failure="exit 1" if verdict == "failed" else "",
            )
            if not ready:
                ready_since.pop((slot.slot, placement.generation), None)
        was_rollback = rollout.rollback_of != 0
        in_flight = [
            s
            for s, p in log.state.placements.items()
            if p.generation == target and not (health[s].revision == target and health[s].ready)
        ]
        commands = plan_rollouts(log.state, health, now)
        for command in commands:
            assert log.apply(command).error is None
        if rollout.state != "progressing" or rollout.paused:
            assert commands == []
        # Replicas are moved only into room the batch leaves (replicas already on the target
        # but not ready -- however they got there -- take room).
        moved = [s for c in commands if isinstance(c, RolloutStep) for s in c.slots]
        assert len(moved) <= max(0, batch - len(in_flight)), (moved, in_flight, batch)
        for command in commands:
            if isinstance(command, SetRolloutState) and command.state == "complete":
                assert all(p.generation == target for p in log.state.placements.values())
                assert all(h.ready for h in health.values())
            if isinstance(command, PutApp):
                assert command.rollback_of == target and not was_rollback
                assert strategy.failure_action is FailureAction.ROLLBACK
        if failed and any(isinstance(c, RolloutStep) for c in commands):
            assert all(
                not (h.revision == target and h.failure) for h in health.values()
            )  # the failure was on a replica not yet moved: it does not count
        now += 1.0
