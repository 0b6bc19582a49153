"""RaftConfig validation and presets."""

from __future__ import annotations

import pytest

from p2porch.consensus.config import KNOWN_BUGS, RaftConfig


def test_presets_are_valid_and_ordered() -> None:
    local, lan, wan = RaftConfig.local(), RaftConfig.lan(), RaftConfig.wan()
    assert local.tick_interval_s * local.election_ticks < wan.tick_interval_s * wan.election_ticks
    assert lan.bugs == frozenset() and not lan.lease_reads and lan.pre_vote and lan.check_quorum


@pytest.mark.parametrize(
    "kwargs",
    [
        {"election_ticks": 0},
        {"heartbeat_ticks": 6, "election_ticks": 10},
        {"max_inflight_msgs": 0},
        {"tick_interval_s": 0.0},
        {"lease_reads": True, "check_quorum": False},
        {"bugs": frozenset({"no-such-bug"})},
    ],
)
def test_invalid_configs_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RaftConfig(**kwargs)  # type: ignore[arg-type]


def test_known_bugs_are_accepted() -> None:
    assert RaftConfig(bugs=KNOWN_BUGS).bugs == KNOWN_BUGS
    assert {"unpersisted-vote", "commit-old-term", "no-log-truncate"} <= KNOWN_BUGS
