"""The rollout controller: the leader's pure decision of the next step of each rolling update.

A changed template makes a new revision and a :class:`~p2porch.node.state.Rollout` record
(node/state.py). Each leader pass calls :func:`plan_rollouts` with the replicated state and
what the owners say about their replicas (:class:`SlotHealth`, from the endpoint table), and
commits the commands it returns. Nothing here waits or sleeps: a rollout advances one pass at
a time, so a leader change just hands the next pass to the new leader, which reads the same
log.

Per app, with ``target`` the rollout's revision:

* a slot whose placement runs ``target`` and whose replica has been ready (at ``target``)
  for ``min_ready_s`` is **done**; one that runs ``target`` but is not done yet is **in flight**;
* an in-flight replica that failed -- the process crashed or was restarted, cannot start, or
  is not ready within ``progress_deadline_s`` of being moved -- **fails the rollout**: the
  action is to pause it (with the reason) or to roll back, i.e. put the previous revision's
  template back as the app's spec (the replicas still on it are then already up to date). An
  automatic rollback that fails itself pauses: no ping-pong;
* otherwise up to ``batch - in flight`` outdated slots move to ``target`` (lowest slot first);
  ``batch`` is max-surge for start-first, max-unavailable for stop-first (node/spec.py). The
  node that runs a moved slot does the start-first / stop-first dance (node/reconcile_core.py);
* no outdated and nothing in flight: **complete**.

Readiness is the owner's word (probes), as gossip spreads it; ``ready_for_s`` is measured by
the leader from when it first saw that replica ready, so clocks of other nodes never matter.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from p2porch.node.scheduler import SlotId
from p2porch.node.spec import with_settings_of
from p2porch.node.state import (
    ClusterState,
    Command,
    PutApp,
    Rollout,
    RolloutStep,
    SetRolloutState,
)


@attrs.frozen
class SlotHealth:
    """What the owner of a slot's replica says about it, as the leader sees it."""

    node: str
    revision: int
    ready: bool
    ready_for_s: float = 0.0
    # Why it failed ("crashed: exit 3", "cannot start: image not found"), "" when it did not.
    failure: str = ""


def _rollback_command(
    state: ClusterState, key: str, rollout: Rollout, reason: str, at_s: float
) -> PutApp | None:
    """The PutApp that puts the previous revision's template back (None if it is gone)."""
    app = state.apps.get(key)
    previous = next(
        (r for r in state.revisions.get(key, ()) if r.revision == rollout.from_revision), None
    )
    if app is None or previous is None:
        return None
    spec = with_settings_of(previous.spec, app.spec, drop_unfit_routes=True)
    dropped = len(app.spec.ingress) - len(spec.ingress)
    note = f" ({dropped} ingress route(s) to ports it lacks dropped)" if dropped else ""
    return PutApp(
        attrs.evolve(app, spec=spec),
        expected_generation=app.meta.generation,
        cause=f"automatic rollback of revision {rollout.revision}: {reason}{note}",
        at_s=at_s,
        rollback_of=rollout.revision,
    )


def _failure(
    rollout: Rollout, slot: int, health: SlotHealth | None, deadline_s: int, now_s: float
) -> str:
    replica = f"{rollout.app}-{slot}"
    if health is not None and health.revision == rollout.revision and health.failure:
        return f"replica {replica} on {health.node} failed: {health.failure}"
    started = dict(rollout.slot_started).get(slot)
    if started is not None and now_s - started > deadline_s:
        return f"replica {replica} not ready within {deadline_s}s"
    return ""


def plan_rollouts(
    state: ClusterState, health: Mapping[SlotId, SlotHealth], now_s: float
) -> list[Command]:
    """The commands that advance every rollout by one step (see the module doc)."""
    commands: list[Command] = []
    for key, rollout in sorted(state.rollouts.items()):
        app = state.apps.get(key)
        if app is None or not rollout.moving:
            continue
        if state.current_revision(key) != rollout.revision:
            continue  # a newer revision is on its way: its own record will follow
        strategy = app.spec.update
        target = rollout.revision
        outdated: list[int] = []
        in_flight: list[int] = []
        failure = ""
        for slot, placement in sorted(state.placements.items()):
            if slot.app != key or slot.slot >= app.spec.replicas:
                continue
            if placement.generation != target:
                outdated.append(slot.slot)
                continue
            seen = health.get(slot)
            fact = state.facts.get(slot)
            if fact is not None and fact.generation == target and fact.state == "failed":
                failure = failure or f"replica {rollout.app}-{slot.slot} failed: {fact.reason}"
                continue
            if (
                seen is not None
                and seen.revision == target
                and seen.node == placement.node
                and seen.ready
                and seen.ready_for_s >= strategy.min_ready_s
            ):
                continue  # done
            in_flight.append(slot.slot)
            failure = failure or _failure(
                rollout, slot.slot, seen, strategy.progress_deadline_s, now_s
            )
        if failure:
            rollback = None
            if strategy.failure_action.value == "rollback" and not rollout.rollback_of:
                rollback = _rollback_command(state, key, rollout, failure, now_s)
            if rollback is not None:
                commands.append(rollback)
            else:
                message = f"paused: {failure}"
                commands.append(
                    SetRolloutState(
                        rollout.namespace, rollout.app, target, "paused", message, now_s
                    )
                )
            continue
        if not outdated and not in_flight:
            commands.append(
                SetRolloutState(rollout.namespace, rollout.app, target, "complete", "", now_s)
            )
            continue
        room = strategy.batch(app.spec.replicas) - len(in_flight)
        if room > 0 and outdated:
            commands.append(
                RolloutStep(rollout.namespace, rollout.app, target, tuple(outdated[:room]), now_s)
            )
    return commands
