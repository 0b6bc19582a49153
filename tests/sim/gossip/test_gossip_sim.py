"""Bounded simulation runs (tier 2): invariants hold, crashes are found, partitions heal."""

from __future__ import annotations

import json

import pytest

from p2porch.gossip import sim
from p2porch.gossip.sim import SimParams, Simulation


def run(**kw: object) -> dict[str, object]:
    return sim.run(SimParams(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ten_nodes_detect_crashes_without_false_alarms(seed: int) -> None:
    out = run(nodes=10, seconds=120, crash=3, seed=seed, preset="lan")
    assert out["violations"] == 0, out["violation_samples"]
    assert out["crashes_undetected"] == 0
    assert len(out["detect_all_all_s"]) == 3  # type: ignore[arg-type]
    assert out["false_positives"] == 0
    assert out["converge_9999_s"] is not None


def test_fifty_nodes_with_loss_and_a_slow_node_keep_invariants() -> None:
    out = run(nodes=50, seconds=180, loss=0.05, slow=1, crash=2, seed=4, preset="lan")
    assert out["violations"] == 0, out["violation_samples"]
    assert out["crashes_undetected"] == 0
    # wrong deaths, if any, are about the deliberately stalled member, never a healthy one
    assert out["false_positives"] == out["false_positives_slow"]


@pytest.mark.parametrize("cut_s", [20.0, 60.0])  # shorter / longer than tombstone_s (30 s)
def test_partition_heals_and_views_converge(cut_s: float) -> None:
    out = run(
        nodes=30, seconds=150, preset="local", partition_at_s=20.0, partition_for_s=cut_s, seed=5
    )
    assert out["violations"] == 0, out["violation_samples"]
    assert out["heal_converge_s"] is not None
    assert out["false_positives_healthy"] == 0


def test_restart_rejoins_through_push_pull_with_a_higher_incarnation() -> None:
    s = Simulation(SimParams(nodes=12, seconds=90, crash=1, seed=6, preset="local"))
    out = s.run()
    assert out["violations"] == 0, out["violation_samples"]
    (crash,) = s.crashes
    victim = s.idx_by_name[crash.name]
    core = s.cores[victim]
    assert core is not None  # it was restarted
    assert core.incarnation > crash.inc
    for other in s.cores:
        assert other is not None
        seen = other.member(crash.name)
        assert seen is not None and seen.incarnation == core.incarnation


def test_healthy_cluster_without_faults_has_no_violations_and_agrees() -> None:
    s = Simulation(SimParams(nodes=40, seconds=60, seed=7, preset="lan", bootstrap=True))
    out = s.run()
    assert out["violations"] == 0
    assert s.views_agree()
    converge = out["converge_9999_s"]
    assert isinstance(converge, float) and converge < 2.5


def test_invariant_checker_catches_a_shrinking_incarnation() -> None:
    s = Simulation(SimParams(nodes=3, seconds=1, seed=1))
    from p2porch.gossip.messages import Event, EventKind, Member, MemberState

    s.on_event(0, Event(EventKind.ALIVE, Member(s.names[1], s.addrs[1], 5, MemberState.ALIVE)))
    s.on_event(0, Event(EventKind.ALIVE, Member(s.names[1], s.addrs[1], 4, MemberState.ALIVE)))
    assert s.violations == 1


def test_same_seed_same_output_and_the_cli_prints_json_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--nodes", "15", "--seconds", "40", "--crash", "1", "--loss", "0.05", "--seed", "9"]
    assert sim.main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sim.main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first == second
    for key in (
        "detect_first_s",
        "detect_all_s",
        "converge_9999_s",
        "false_positives",
        "bytes_per_node_s",
        "violations",
    ):
        assert key in first
