"""ServiceConfig: presets are valid, cross-field rules raise ValueError."""

from __future__ import annotations

import pytest

from p2porch.consensus.config import RaftConfig
from p2porch.consensus.service import ServiceConfig


def test_presets_are_valid_and_ordered() -> None:
    local, lan, wan = ServiceConfig.local(), ServiceConfig.lan(), ServiceConfig.wan()
    assert local.raft.tick_interval_s <= lan.raft.tick_interval_s <= wan.raft.tick_interval_s
    assert wan.send_timeout_s >= lan.send_timeout_s
    assert not lan.leader_parallel_append  # the contract's order unless asked otherwise


@pytest.mark.parametrize(
    "kwargs",
    [
        {"snapshot_every_entries": 0},
        {"send_queue_messages": -1},
        {"reconnect_backoff_s": 2.0, "max_reconnect_backoff_s": 1.0},
        {"max_frame_bytes": 1024},  # cannot hold one AppendEntries or snapshot chunk
        {"request_timeout_s": 0.0},
    ],
)
def test_invalid_configs_raise_value_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ServiceConfig(raft=RaftConfig.lan(), **kwargs)  # type: ignore[arg-type]
