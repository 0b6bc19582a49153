"""RaftCore.ticks_until_due: the tickless shell sleeps on it, so it must never be late.

Soundness is what matters: a tick earlier than the announced one must only count (no message,
event, role, term, leader, vote or commit change). Exactness in the plain cases is checked too,
so the shell does not wake for nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from p2porch.consensus import sim
from p2porch.consensus.config import RaftConfig
from p2porch.consensus.core import RaftCore
from p2porch.consensus.messages import (
    Heartbeat,
    InstallSnapshot,
    ProgressState,
    RequestVote,
    RequestVoteResponse,
    Role,
)

from .harness import Cluster


def observable(core: RaftCore) -> tuple[object, ...]:
    """Everything a tick may change apart from its own counters (private lists: the output)."""
    status = core.status()
    return (
        len(core._msgs),
        len(core._events),
        core.role,
        core.term,
        core.leader_id,
        core.vote,
        core.commit_index,
        status.transfer_target,
    )


@pytest.fixture
def checked_ticks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Wrap RaftCore.tick: every tick announced as not due must be quiet. Yields counters
    [quiet ticks checked, due ticks seen]."""
    original = RaftCore.tick
    counts = [0, 0]

    def tick(self: RaftCore) -> None:
        due = self.ticks_until_due()
        assert due is None or due >= 1
        before = observable(self)
        original(self)
        if due is None or due > 1:
            assert observable(self) == before, f"{self.node_id}: tick acted {due} ticks early"
            counts[0] += 1
        else:
            counts[1] += 1

    monkeypatch.setattr(RaftCore, "tick", tick)
    yield counts


def test_no_tick_acts_before_it_is_due_across_simulated_runs(checked_ticks: list[int]) -> None:
    # Faults, crashes, partitions, membership changes, snapshots and transfers: every state
    # the simulation reaches is checked at every tick of every node.
    for seed in range(40):
        result = sim.check_seed(seed, 5, frozenset(), determinism=False)
        assert result.invariant is None, result.detail
    quiet, due = checked_ticks
    assert quiet > due > 0  # the check ran, and most ticks are quiet


def test_follower_is_due_at_its_election_timeout_exactly() -> None:
    c = Cluster(["a", "b", "c"], config=RaftConfig(election_ticks=10, heartbeat_ticks=2))
    core = c.core("a")
    due = core.ticks_until_due()
    assert due is not None and 10 <= due < 20
    for _ in range(due - 1):
        core.tick()
    assert core.role is Role.FOLLOWER and not core.has_ready()
    core.tick()
    assert core.status().role is Role.PRE_CANDIDATE


def test_leader_is_due_at_each_heartbeat() -> None:
    # 12 = 4 * 3: the election-timeout check lands on a heartbeat, so every due tick sends one.
    c = Cluster(["a", "b", "c"], config=RaftConfig(election_ticks=12, heartbeat_ticks=3))
    c.elect("a")
    leader = c.core("a")
    for _ in range(6):
        due = leader.ticks_until_due()
        assert due is not None and 1 <= due <= 3
        c.sent.clear()
        c.tick(due - 1, nodes=["a"])
        assert not any(isinstance(m, Heartbeat) for m in c.sent)
        c.tick(1, nodes=["a"])
        assert {m.dst for m in c.sent if isinstance(m, Heartbeat)} == {"b", "c"}
        assert leader.role is Role.LEADER


def test_heartbeat_pushes_a_followers_due_tick_back() -> None:
    c = Cluster(["a", "b", "c"], config=RaftConfig(election_ticks=10, heartbeat_ticks=2))
    c.elect("a")
    follower = c.core("b")
    c.tick(3, nodes=["b"])  # b alone counts time...
    before = follower.ticks_until_due()
    c.tick(2, nodes=["a"])  # ...until a heartbeat arrives
    after = follower.ticks_until_due()
    assert before is not None and after is not None and after > before


def test_a_node_that_may_not_campaign_is_never_due() -> None:
    learner = Cluster(["a"], learners=("l",)).core("l")
    empty = Cluster(["a"], empty=("e",)).core("e")
    assert learner.ticks_until_due() is None
    assert empty.ticks_until_due() is None
    for _ in range(100):
        learner.tick()
        empty.tick()
    assert learner.role is Role.FOLLOWER and empty.role is Role.FOLLOWER
    assert not learner.has_ready() and not empty.has_ready()


def test_snapshot_resends_between_heartbeats_are_announced(checked_ticks: list[int]) -> None:
    config = RaftConfig(election_ticks=40, heartbeat_ticks=4)
    c = Cluster(["a", "b", "c"], config=config)
    c.elect("a")
    c.down.add("c")
    for i in range(5):
        c.propose("a", b"x%d" % i)
    leader = c.core("a")
    leader.compact(leader.applied_index, b"state")
    c.filters.append(lambda m: not isinstance(m, InstallSnapshot))  # every chunk is lost
    c.down.discard("c")
    c.tick(1)
    # A proposal between heartbeats makes the leader find out about c off the heartbeat
    # phase, so the resend timer (3 heartbeats) runs out of step with the heartbeats.
    c.propose("a", b"late")
    c.sent.clear()
    c.tick(60)
    resent = [m for m in c.sent if isinstance(m, InstallSnapshot)]
    assert len(resent) >= 3
    assert leader.status().progress["c"].state is ProgressState.SNAPSHOT


def test_vote_requests_judge_the_lease_by_the_ticks_delivered() -> None:
    """Why the shell delivers the quiet ticks BEFORE each input: the lease check reads them."""
    c = Cluster(["a", "b", "c"], config=RaftConfig(election_ticks=10, heartbeat_ticks=2))
    c.elect("a")
    b = c.core("b")
    probe = RequestVote("c", "b", b.term + 1, b.last_index, b.log.last_term, pre_vote=True)

    def answer() -> bool:
        b.step(probe)
        ready = b.ready()
        b.advance(ready)
        replies = [m for m in ready.messages if isinstance(m, RequestVoteResponse)]
        assert len(replies) == 1
        return replies[0].granted

    assert not answer()  # inside the lease: the leader was heard from just now
    for _ in range(10):
        b.tick()  # a whole election timeout without the leader: the lease is over
    assert answer()
