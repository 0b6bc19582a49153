"""Scripted scenarios for the sans-I/O Raft core (tier 1: sync, no event loop)."""

from __future__ import annotations

import random

import pytest

from p2porch.common import codec
from p2porch.consensus.config import RaftConfig
from p2porch.consensus.core import RaftCore
from p2porch.consensus.errors import (
    ConfChangeRefused,
    NotLeader,
    ProposalDropped,
    TransferRefused,
)
from p2porch.consensus.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    HardState,
    Heartbeat,
    InstallSnapshot,
    InstallSnapshotResponse,
    LeaderChanged,
    Membership,
    Message,
    PersistentState,
    ProgressState,
    RequestVote,
    RequestVoteResponse,
    Role,
    TimeoutNow,
    TransferAborted,
)

from .harness import Cluster, Filter

ABC = ["a", "b", "c"]


def role_of(core: RaftCore) -> Role:
    """(A call, so mypy does not narrow ``core.role`` across steps.)"""
    return core.role


def cfg(**kw: object) -> RaftConfig:
    base: dict[str, object] = {"election_ticks": 10, "heartbeat_ticks": 1}
    base.update(kw)
    return RaftConfig(**base)  # type: ignore[arg-type]


def leader_cluster(voters: list[str] = ABC, **kw: object) -> Cluster:
    c = Cluster(voters, config=cfg(**kw), **{})
    c.elect(voters[0])
    c.tick(2)
    return c


# --------------------------------------------------------------------------- elections


def test_single_leader_elected_and_noop_committed() -> None:
    c = leader_cluster()
    assert c.leader() == "a"
    assert {c.core(n).term for n in ABC} == {1}
    for n in ABC:
        assert c.core(n).leader_id == "a"
        assert c.core(n).commit_index == 1  # the leader's NOOP
        assert c.nodes[n].applied[0].kind is EntryKind.NOOP


def test_single_node_cluster_commits_alone() -> None:
    c = Cluster(["solo"], config=cfg())
    c.elect("solo")
    term, index = c.propose("solo", b"x")
    c.deliver_all()
    assert c.core("solo").commit_index == index
    assert c.applied_data("solo") == [b"x"]


def test_timeout_is_randomized_in_range() -> None:
    core = RaftCore(
        "a", cfg(), random.Random(1), PersistentState.bootstrap(Membership(frozenset(ABC)))
    )
    seen = {core._random_timeout() for _ in range(200)}
    assert min(seen) >= 10 and max(seen) < 20 and len(seen) > 5


def test_split_vote_resolves_to_one_leader() -> None:
    c = Cluster(["a", "b", "c", "d"], config=cfg(pre_vote=False))
    # a and b campaign in the same term; c votes a, d votes b: nobody has 3 of 4.
    c.filters.append(
        lambda m: not (isinstance(m, RequestVote) and (m.src, m.dst) in {("a", "d"), ("b", "c")})
    )
    c.core("a")._campaign(pre_vote=False, transfer=False)
    c.core("b")._campaign(pre_vote=False, transfer=False)
    c.deliver_all()
    assert c.core("a").role is Role.CANDIDATE and c.core("b").role is Role.CANDIDATE
    assert c.core("a").term == c.core("b").term == 1
    c.heal()
    for _ in range(100):
        c.tick()
        if c.leader():
            break
    leader = c.leader()
    assert leader is not None
    terms = {c.core(n).term for n in c.nodes}
    assert len(terms) == 1 and terms.pop() >= 2


def test_vote_is_persisted_in_the_same_ready_as_the_grant() -> None:
    core = RaftCore(
        "b",
        cfg(pre_vote=False),
        random.Random(1),
        PersistentState.bootstrap(Membership(frozenset(ABC))),
    )
    core.step(RequestVote("a", "b", 1, 0, 0))
    rd = core.ready()
    assert rd.hard_state == HardState(1, "a", 0)
    assert rd.must_sync
    assert rd.messages == (RequestVoteResponse("b", "a", 1, True),)
    core.advance(rd)
    # the same term: a second candidate is refused
    core.step(RequestVote("c", "b", 1, 5, 1))
    rd = core.ready()
    assert rd.messages == (RequestVoteResponse("b", "c", 1, False),)


def test_unpersisted_vote_bug_leaves_vote_out_of_hard_state() -> None:
    core = RaftCore(
        "b",
        cfg(pre_vote=False, bugs=frozenset({"unpersisted-vote"})),
        random.Random(1),
        PersistentState.bootstrap(Membership(frozenset(ABC))),
    )
    core.step(RequestVote("a", "b", 1, 0, 0))
    rd = core.ready()
    assert rd.hard_state == HardState(1, None, 0)


def test_vote_refused_to_a_less_up_to_date_log() -> None:
    c = leader_cluster(check_quorum=False)  # else b ignores it: it is inside a's lease
    c.propose("a", b"x")
    c.tick(2)
    core = c.core("b")
    core.step(RequestVote("c", "b", 5, 1, 1))  # c claims a shorter log in a later term
    rd = core.ready()
    grants = [m for m in rd.messages if isinstance(m, RequestVoteResponse)]
    assert grants and not grants[0].granted
    core.advance(rd)


def test_stale_term_messages_are_ignored_and_stale_leader_learns() -> None:
    c = leader_cluster()
    b = c.core("b")
    # an old leader's append in term 0 must not touch b's log
    b.step(AppendEntries("c", "b", 0, 1, 1, (Entry(0, 2, EntryKind.NORMAL, b"old"),), 2))
    rd = b.ready()
    assert rd.entries == ()
    assert [type(m) for m in rd.messages] == [AppendEntriesResponse]
    assert rd.messages[0].term == 1  # tells the stale sender the newer term
    b.advance(rd)
    assert b.last_index == 1
    # a stale leader receiving the higher term steps down
    stale = RaftCore(
        "x", cfg(), random.Random(3), PersistentState.bootstrap(Membership(frozenset(["x", "b"])))
    )
    stale._campaign(pre_vote=False, transfer=False)
    stale.step(RequestVoteResponse("b", "x", 1, True))
    assert stale.role is Role.LEADER
    stale.step(AppendEntriesResponse("b", "x", 7, False, 0))
    assert role_of(stale) is Role.FOLLOWER and stale.term == 7


def test_misaddressed_messages_are_ignored() -> None:
    c = leader_cluster()
    b = c.core("b")
    b.step(Heartbeat("a", "zzz", 9, 0))
    assert b.term == 1


# ------------------------------------------------------------------ pre-vote / check-quorum


def test_pre_vote_does_not_disrupt_a_stable_leader() -> None:
    c = leader_cluster()
    c.isolate("c")
    c.tick(60)  # c keeps pre-voting and failing: its term must not move
    assert c.core("c").term == 1
    assert c.core("c").role is Role.PRE_CANDIDATE
    c.heal()
    c.tick(5)
    assert c.leader() == "a" and {c.core(n).term for n in ABC} == {1}


def test_without_pre_vote_an_isolated_node_inflates_its_term() -> None:
    c = leader_cluster(pre_vote=False, check_quorum=False)
    c.isolate("c")
    c.tick(60)
    assert c.core("c").term > 2


def test_pre_vote_rejected_within_the_leader_lease() -> None:
    c = leader_cluster()
    b = c.core("b")
    b.step(RequestVote("c", "b", 2, 10, 1, pre_vote=True))
    rd = b.ready()
    assert rd.messages == (RequestVoteResponse("b", "c", 1, False, True),)
    b.advance(rd)
    assert b.term == 1


def test_check_quorum_leader_steps_down_when_isolated() -> None:
    c = leader_cluster()
    c.isolate("a")
    c.tick(21, nodes=["a"])  # the first check still sees pre-isolation acks
    assert c.core("a").role is Role.FOLLOWER
    assert c.core("a").term == 1


def test_without_check_quorum_isolated_leader_stays() -> None:
    c = leader_cluster(check_quorum=False)
    c.isolate("a")
    c.tick(30, nodes=["a"])
    assert c.core("a").role is Role.LEADER


def test_majority_elects_new_leader_after_leader_is_isolated() -> None:
    c = leader_cluster()
    c.isolate("a")
    c.tick(60, nodes=["b", "c", "a"])
    leaders = {n for n in ABC if c.core(n).role is Role.LEADER}
    assert leaders & {"b", "c"}
    assert c.core("a").role is not Role.LEADER


# --------------------------------------------------------------------------- replication


def test_proposals_are_batched_into_one_append() -> None:
    c = leader_cluster()
    c.sent.clear()
    a = c.core("a")
    for i in range(10):
        a.propose(b"p%d" % i)
    c.deliver_all()
    appends = [m for m in c.sent if isinstance(m, AppendEntries) and m.entries and m.dst == "b"]
    assert len(appends) == 1 and len(appends[0].entries) == 10
    c.tick(2)
    assert c.applied_data("c") == [b"p%d" % i for i in range(10)]


def test_batch_respects_count_and_inflight_caps() -> None:
    c = leader_cluster(max_entries_per_msg=3, max_inflight_msgs=2)
    c.sent.clear()
    a = c.core("a")
    c.filters.append(lambda m: not isinstance(m, AppendEntriesResponse))  # acks lost
    for i in range(20):
        a.propose(b"x%d" % i)
    c.deliver_all()
    appends = [m for m in c.sent if isinstance(m, AppendEntries) and m.dst == "b" and m.entries]
    assert len(appends) == 2 and all(len(m.entries) <= 3 for m in appends)
    assert a.status().progress["b"].inflight == 2
    c.heal()
    c.tick(10)
    assert len(c.applied_data("b")) == 20


def test_non_leader_proposal_raises_not_leader_with_hint() -> None:
    c = leader_cluster()
    with pytest.raises(NotLeader) as info:
        c.core("b").propose(b"x")
    assert info.value.leader_hint == "a"
    with pytest.raises(NotLeader):
        c.core("b").read_index(b"r")


def _drop_noop_after_first_probe() -> Filter:
    """Let the first probe (which followers reject) through, then lose every term-2 entry."""
    seen: set[str] = set()

    def keep(m: Message) -> bool:
        if isinstance(m, AppendEntries) and any(e.term == 2 for e in m.entries):
            if m.dst not in seen:
                seen.add(m.dst)
                return True
            return False
        return True

    return keep


def test_commit_only_counts_current_term_entries() -> None:
    # a (term 2 leader) holds an entry of term 1 that only it has; replicating it to b gives a
    # majority of replicas, but it must not commit until the term-2 NOOP reaches a majority.
    membership = Membership(frozenset(ABC))
    boot = PersistentState.bootstrap(membership)
    old = Entry(1, 1, EntryKind.NORMAL, b"old")
    a_state = PersistentState(HardState(1, "a", 0), boot.snapshot, (old,))
    c = Cluster(ABC, config=cfg(max_entries_per_msg=1, pre_vote=False))
    c.nodes["a"].disk.entries = [old]
    c.nodes["a"].disk.hard_state = a_state.hard_state
    c.nodes["a"].restart()
    c.filters.append(_drop_noop_after_first_probe())
    c.elect("a")
    c.tick(3)
    a = c.core("a")
    assert a.term == 2
    assert a.status().progress["b"].match >= 1  # the old entry is on a majority...
    assert a.commit_index == 0  # ...but was not committed by counting
    c.heal()
    c.tick(3)
    assert a.commit_index == 2  # committed together with the NOOP


def test_commit_old_term_bug_commits_by_counting() -> None:
    membership = Membership(frozenset(ABC))
    boot = PersistentState.bootstrap(membership)
    old = Entry(1, 1, EntryKind.NORMAL, b"old")
    c = Cluster(
        ABC, config=cfg(max_entries_per_msg=1, pre_vote=False, bugs=frozenset({"commit-old-term"}))
    )
    c.nodes["a"].disk.entries = [old]
    c.nodes["a"].disk.hard_state = HardState(1, "a", 0)
    c.nodes["a"].restart()
    assert boot.snapshot is not None
    c.filters.append(_drop_noop_after_first_probe())
    c.elect("a")
    c.tick(3)
    assert c.core("a").commit_index == 1


def _diverged_cluster(**kw: object) -> Cluster:
    """b led term 1 and wrote 5 entries nobody else has; a then leads term 2 with its own."""
    c = Cluster(ABC, config=cfg(pre_vote=False, **kw))
    c.elect("b")
    c.tick(2)
    c.isolate("b")
    for i in range(5):
        c.core("b").propose(b"lost%d" % i)
    c.deliver_all()
    c.tick(30, nodes=["a", "c", "b"])
    new_leader = c.leader() or next(n for n in ABC if c.core(n).role is Role.LEADER and n != "b")
    for i in range(3):
        c.propose(new_leader, b"kept%d" % i)
    c.tick(2)
    return c


def test_conflicting_follower_entries_are_overwritten() -> None:
    c = _diverged_cluster()
    assert c.core("b").last_index >= 6
    c.heal()
    c.tick(10)
    leader = c.leader()
    assert leader is not None and leader != "b"
    lead_log = c.core(leader).log
    b_log = c.core("b").log
    assert b_log.last_index == lead_log.last_index
    for i in range(1, lead_log.last_index + 1):
        assert b_log.term(i) == lead_log.term(i)
    assert b"lost0" not in c.applied_data("b")
    assert c.applied_data("b")[-3:] == [b"kept0", b"kept1", b"kept2"]
    # storage saw the truncation: b's disk matches the leader's log too
    assert [e.term for e in c.nodes["b"].disk.entries] == [
        lead_log.term(i) for i in range(1, lead_log.last_index + 1)
    ]


def test_fast_backtracking_skips_a_whole_term() -> None:
    # a and c: 2 entries of term 1 then 10 of term 3; b: 10 entries of term 1 (a dead
    # leader's). One rejection must take the leader from index 13 straight back to 3.
    c = Cluster(ABC, config=cfg(pre_vote=False, max_entries_per_msg=100))
    long_log = [Entry(1, i, EntryKind.NORMAL, b"c") for i in (1, 2)]
    long_log += [Entry(3, i, EntryKind.NORMAL, b"n") for i in range(3, 13)]
    stale = [Entry(1, i, EntryKind.NORMAL, b"c" if i <= 2 else b"s") for i in range(1, 11)]
    for nid, entries, term in (("a", long_log, 3), ("c", long_log, 3), ("b", stale, 2)):
        c.nodes[nid].disk.entries = list(entries)
        c.nodes[nid].disk.hard_state = HardState(term, None, 2)
        c.nodes[nid].restart()
    c.sent.clear()
    c.elect("a")
    c.tick(3)
    rejects = [
        m for m in c.sent if isinstance(m, AppendEntriesResponse) and m.src == "b" and not m.success
    ]
    assert len(rejects) == 1
    assert (rejects[0].index, rejects[0].hint_index, rejects[0].hint_term) == (12, 10, 1)
    a_log, b_log = c.core("a").log, c.core("b").log
    assert [b_log.term(i) for i in range(1, 14)] == [a_log.term(i) for i in range(1, 14)]


def test_no_log_truncate_bug_keeps_conflicts() -> None:
    c = _diverged_cluster(bugs=frozenset({"no-log-truncate"}))
    c.heal()
    c.tick(10)
    leader = c.leader()
    assert leader is not None
    terms = [c.core("b").log.term(i) for i in range(2, 4)]
    assert terms != [c.core(leader).log.term(i) for i in range(2, 4)]


def test_lost_appends_are_recovered_by_heartbeats() -> None:
    c = leader_cluster(max_inflight_msgs=4)
    dropped = {"n": 0}

    def drop_three(m: Message) -> bool:
        if isinstance(m, AppendEntries) and m.dst == "c" and m.entries and dropped["n"] < 3:
            dropped["n"] += 1
            return False
        return True

    c.filters.append(drop_three)
    for i in range(3):
        c.propose("a", b"x%d" % i)
    c.tick(10)
    assert c.applied_data("c") == [b"x0", b"x1", b"x2"]


def test_back_pressure_drops_proposals() -> None:
    c = leader_cluster(max_uncommitted_bytes=100)
    c.isolate("a")
    a = c.core("a")
    a.propose(b"x" * 60)
    with pytest.raises(ProposalDropped) as info:
        a.propose(b"y" * 60)
    assert "uncommitted" in info.value.reason
    c.heal()
    c.tick(3)
    a.propose(b"z" * 60)  # committed entries free the budget


# --------------------------------------------------------------------------- restart


def test_restart_recovers_term_vote_log_and_reapplies() -> None:
    c = leader_cluster()
    c.propose("a", b"x")
    c.tick(2)
    node = c.nodes["b"]
    before = (node.core.term, node.core.vote, node.core.last_index)
    node.restart()
    core = node.core
    assert (core.term, core.vote, core.last_index) == before
    assert core.applied_index == 0  # the shell restores the snapshot, then replays
    c.tick(2)
    assert c.applied_data("b") == [b"x"]


def test_empty_node_never_campaigns() -> None:
    core = RaftCore("z", cfg(), random.Random(1), PersistentState.empty())
    for _ in range(100):
        core.tick()
    assert core.role is Role.FOLLOWER and core.term == 0
    assert not core.has_ready()


def test_ready_is_not_reissued_before_advance() -> None:
    c = leader_cluster()
    a = c.core("a")
    a.propose(b"x")
    assert a.has_ready()
    rd = a.ready()
    assert not a.has_ready()
    with pytest.raises(RuntimeError):
        a.ready()
    a.advance(rd)


# --------------------------------------------------------------------------- membership


def test_learner_receives_log_but_does_not_vote_or_count() -> None:
    c = Cluster(["a", "b"], learners=("l",), config=cfg())
    c.elect("a")
    c.propose("a", b"x")
    c.tick(2)
    assert c.applied_data("l") == [b"x"]
    # with b down, the learner's ack must not commit anything
    c.down.add("b")
    t, idx = c.propose("a", b"y")
    c.tick(3, nodes=["a", "l"])
    assert c.core("l").last_index >= idx
    assert c.core("a").commit_index < idx
    # and a learner never campaigns
    c.down.add("a")
    c.tick(60, nodes=["l"])
    assert c.core("l").role is Role.FOLLOWER


def test_add_learner_then_promote() -> None:
    c = Cluster(ABC, empty=("d",), config=cfg())
    c.elect("a")
    c.tick(2)
    a = c.core("a")
    a.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    c.tick(5)
    assert "d" in a.membership.learners
    assert c.core("d").membership == a.membership  # learned from the snapshot + log
    a.propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "d"))
    c.tick(5)
    assert "d" in a.membership.voters and a.membership.quorum() == 3
    assert c.core("d").membership.voters == frozenset("abcd")


def test_one_conf_change_at_a_time_and_validation() -> None:
    c = leader_cluster()
    a = c.core("a")
    c.isolate("a")
    a.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    with pytest.raises(ConfChangeRefused, match="pending"):
        a.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "e"))
    c.heal()
    c.tick(3)
    with pytest.raises(ConfChangeRefused, match="already"):
        a.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    with pytest.raises(ConfChangeRefused, match="not a learner"):
        a.propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "b"))
    with pytest.raises(ConfChangeRefused, match="not a member"):
        a.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "zz"))


def test_new_leader_refuses_conf_change_until_its_noop_commits() -> None:
    c = Cluster(ABC, config=cfg())
    c.isolate("a")
    a = c.core("a")
    a._campaign(pre_vote=False, transfer=False)
    a.step(RequestVoteResponse("b", "a", 1, True))
    assert a.role is Role.LEADER
    with pytest.raises(ConfChangeRefused, match="not committed"):
        a.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))


def test_promotion_refused_when_learner_far_behind() -> None:
    c = Cluster(["a", "b", "c"], learners=("l",), config=cfg(max_promote_lag_entries=5))
    c.elect("a")
    c.tick(2)
    c.down.add("l")
    for i in range(10):
        c.propose("a", b"x%d" % i)
    c.tick(2)
    with pytest.raises(ConfChangeRefused, match="behind"):
        c.core("a").propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "l"))
    c.down.discard("l")
    c.tick(5)
    c.core("a").propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "l"))


def test_remove_follower() -> None:
    c = leader_cluster()
    a = c.core("a")
    a.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "c"))
    c.tick(3)
    assert a.membership.voters == frozenset({"a", "b"})
    assert "c" not in a.status().progress
    t, idx = c.propose("a", b"after")
    c.tick(2)
    assert a.commit_index >= idx  # a + b are a quorum of two


def test_remove_the_leader_steps_down_after_commit() -> None:
    c = leader_cluster()
    a = c.core("a")
    _, idx = a.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "a"))
    assert a.role is Role.LEADER  # still leading (without counting itself) until it commits
    c.tick(3)
    assert a.commit_index >= idx
    assert role_of(a) is Role.FOLLOWER
    c.tick(30)
    new = c.leader()
    assert new in {"b", "c"}
    assert c.core(new).membership.voters == frozenset({"b", "c"})
    c.propose(new, b"after")
    c.tick(2)
    assert b"after" in c.applied_data("b")
    c.tick(50)
    assert c.core("a").role is Role.FOLLOWER  # a removed node never campaigns


def test_removed_leader_that_lost_leadership_can_still_finish_its_removal() -> None:
    # a removes itself, then loses leadership before the removal commits; it alone holds the
    # entry, so it must still be allowed to campaign (not counting its own vote).
    c = Cluster(["a", "b"], config=cfg())
    c.elect("a")
    c.tick(2)
    c.isolate("a")
    c.core("a").propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "a"))
    c.tick(22, nodes=["a"])  # check-quorum: a steps down
    assert c.core("a").role is not Role.LEADER
    c.heal()
    c.tick(80)
    assert c.core("b").membership.voters == frozenset({"b"})
    assert c.leader() == "b"


# --------------------------------------------------------------------------- transfer


def test_leader_transfer() -> None:
    c = leader_cluster()
    a = c.core("a")
    c.propose("a", b"x")
    c.filters.append(lambda m: not isinstance(m, TimeoutNow))
    a.transfer_leadership("b")
    with pytest.raises(ProposalDropped, match="transfer"):
        a.propose(b"refused")
    c.heal()
    a.transfer_leadership("b")  # same target: idempotent
    c.core("a")._transfer_target = None
    a.transfer_leadership("b")
    c.deliver_all()
    assert c.leader() == "b"
    assert c.core("b").term == 2


def test_transfer_aborts_after_election_timeout() -> None:
    c = leader_cluster()
    a = c.core("a")
    c.isolate("b")
    a.transfer_leadership("b")
    c.tick(11, nodes=["a", "c"])
    assert any(isinstance(e, TransferAborted) for e in c.nodes["a"].events)
    assert a.role is Role.LEADER
    a.propose(b"accepted again")


def test_transfer_refused_to_non_voter() -> None:
    c = Cluster(["a", "b"], learners=("l",), config=cfg())
    c.elect("a")
    with pytest.raises(TransferRefused):
        c.core("a").transfer_leadership("l")
    with pytest.raises(NotLeader):
        c.core("b").transfer_leadership("a")


# --------------------------------------------------------------------------- reads


def test_read_index_needs_a_heartbeat_round() -> None:
    c = leader_cluster()
    c.propose("a", b"x")
    a = c.core("a")
    c.filters.append(lambda m: not isinstance(m, Heartbeat))
    a.read_index(b"r1")
    c.deliver_all()
    assert c.nodes["a"].read_states == []
    c.heal()
    c.tick(1)
    assert [(r.ctx, r.index) for r in c.nodes["a"].read_states] == [(b"r1", a.commit_index)]


def test_new_leader_read_waits_for_its_noop() -> None:
    c = Cluster(ABC, config=cfg())
    c.filters.append(lambda m: not isinstance(m, AppendEntries))
    c.elect("a")
    a = c.core("a")
    a.read_index(b"early")
    c.tick(2)
    assert c.nodes["a"].read_states == []
    c.heal()
    c.tick(3)
    assert [r.ctx for r in c.nodes["a"].read_states] == [b"early"]
    assert c.nodes["a"].read_states[0].index >= 1


def test_pending_reads_dropped_when_leadership_lost() -> None:
    c = leader_cluster()
    c.isolate("a")
    c.core("a").read_index(b"doomed")
    c.tick(21, nodes=["a"])
    assert c.nodes["a"].dropped_reads == [b"doomed"]


def test_lease_reads_answer_without_a_round() -> None:
    c = leader_cluster(lease_reads=True)
    c.isolate("a")
    c.core("a").read_index(b"fast")
    c.deliver_all()
    assert [r.ctx for r in c.nodes["a"].read_states] == [b"fast"]


# --------------------------------------------------------------------------- snapshots


def _compact_leader(c: Cluster, leader: str, data: bytes) -> int:
    core = c.core(leader)
    index = core.applied_index
    core.compact(index, data)
    snap = core.log.snapshot
    assert snap is not None
    c.nodes[leader].disk.snapshot = snap
    c.nodes[leader].disk.entries = [e for e in c.nodes[leader].disk.entries if e.index > index]
    return index


def test_snapshot_installed_on_lagging_follower_in_chunks() -> None:
    c = leader_cluster(snapshot_chunk_bytes=10)
    c.down.add("c")
    for i in range(5):
        c.propose("a", b"v%d" % i)
    c.tick(2, nodes=["a", "b"])
    data = b"S" * 35
    index = _compact_leader(c, "a", data)
    c.sent.clear()
    c.down.discard("c")
    c.tick(10)
    chunks = [m for m in c.sent if isinstance(m, InstallSnapshot) and m.dst == "c"]
    assert [m.offset for m in chunks] == [0, 10, 20, 30]
    assert c.nodes["c"].sm_snapshot == data
    assert c.core("c").log.snapshot_index == index
    assert c.nodes["c"].disk.snapshot is not None and c.nodes["c"].disk.snapshot.data == data
    assert c.core("a").status().progress["c"].state is ProgressState.REPLICATE
    c.propose("a", b"after")
    c.tick(2)
    assert c.applied_data("c")[-1] == b"after"


def test_snapshot_transfer_resumes_after_a_lost_chunk() -> None:
    c = leader_cluster(snapshot_chunk_bytes=10)
    c.down.add("c")
    for i in range(5):
        c.propose("a", b"v%d" % i)
    c.tick(2, nodes=["a", "b"])
    data = bytes(range(40))
    _compact_leader(c, "a", data)
    lost = {"done": False}

    def lose_second_chunk(m: Message) -> bool:
        if isinstance(m, InstallSnapshot) and m.offset == 10 and not lost["done"]:
            lost["done"] = True
            return False
        return True

    c.filters.append(lose_second_chunk)
    c.sent.clear()
    c.down.discard("c")
    c.tick(15)
    offsets = [m.offset for m in c.sent if isinstance(m, InstallSnapshot) and m.dst == "c"]
    assert offsets.count(10) == 2  # resent once after the loss
    assert offsets.count(0) == 1  # never restarted from scratch
    assert c.nodes["c"].sm_snapshot == data


def test_follower_resumes_a_restarted_transfer_at_its_offset() -> None:
    core = RaftCore("c", cfg(), random.Random(1), PersistentState.empty())
    meta = PersistentState.bootstrap(Membership(frozenset(ABC))).snapshot
    assert meta is not None
    from p2porch.consensus.messages import SnapshotMeta

    m = SnapshotMeta(7, 1, Membership(frozenset(ABC)))
    data = b"0123456789abcdefghij"
    core.step(InstallSnapshot("a", "c", 1, m, 0, data[:10], 20, False))
    rd = core.ready()
    assert rd.messages == (InstallSnapshotResponse("c", "a", 1, 7, 1, 10, False),)
    core.advance(rd)
    # the leader (or a new one) restarts from 0: the follower says where it is
    core.step(InstallSnapshot("a", "c", 1, m, 0, data[:10], 20, False))
    rd = core.ready()
    assert rd.messages[-1] == InstallSnapshotResponse("c", "a", 1, 7, 1, 10, False)
    core.advance(rd)
    core.step(InstallSnapshot("a", "c", 1, m, 10, data[10:], 20, True))
    rd = core.ready()
    assert rd.snapshot is not None and rd.snapshot.data == data
    assert rd.hard_state is not None and rd.hard_state.commit == 7
    assert rd.messages[-1] == InstallSnapshotResponse("c", "a", 1, 7, 1, 20, True)
    core.advance(rd)
    assert core.membership == m.membership and core.applied_index == 7


def test_new_empty_node_gets_snapshot_even_without_compaction() -> None:
    c = Cluster(["a"], empty=("d",), config=cfg())
    c.elect("a")
    c.propose("a", b"x")
    c.core("a").propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "d"))
    c.tick(5)
    d = c.core("d")
    assert d.membership.learners == frozenset({"d"})
    assert c.applied_data("d") == [b"x"]


def test_compact_validation() -> None:
    c = leader_cluster()
    a = c.core("a")
    with pytest.raises(ValueError):
        a.compact(a.applied_index + 5, b"")


# --------------------------------------------------------------------------- status, events, codec


def test_status_and_events() -> None:
    c = leader_cluster()
    st = c.core("a").status()
    assert st.role is Role.LEADER and st.leader_id == "a" and set(st.progress) == {"b", "c"}
    assert any(isinstance(e, LeaderChanged) and e.leader_id == "a" for e in c.nodes["b"].events)
    assert codec.decode(codec.encode(st), type(st)) == st


def test_every_message_type_round_trips_through_the_codec() -> None:
    c = leader_cluster(snapshot_chunk_bytes=8)
    c.propose("a", b"x")
    c.tick(3)
    c.core("a").read_index(b"r")
    c.core("a").transfer_leadership("b")
    c.tick(3)
    kinds = set()
    for m in c.sent:
        kinds.add(type(m).__name__)
        assert codec.decode(codec.encode(m), Message) == m
    assert {"RequestVote", "AppendEntries", "Heartbeat", "TimeoutNow"} <= kinds


def test_leader_counts_only_its_persisted_entries() -> None:
    core = RaftCore(
        "a", cfg(), random.Random(1), PersistentState.bootstrap(Membership(frozenset("a")))
    )
    for _ in range(25):
        core.tick()
    assert core.role is Role.LEADER
    rd = core.ready()
    core.advance(rd)
    rd = core.ready()
    core.advance(rd)  # the NOOP is stable and committed by now
    _, index = core.propose(b"x")
    rd = core.ready()
    assert [e.index for e in rd.entries] == [index]
    assert all(e.index != index for e in rd.committed)  # not on our disk yet: not counted
    core.advance(rd)
    rd = core.ready()
    assert [e.data for e in rd.committed] == [b"x"]
    core.advance(rd)


def test_empty_node_does_not_vote() -> None:
    core = RaftCore("z", cfg(pre_vote=False), random.Random(1), PersistentState.empty())
    core.step(RequestVote("a", "z", 3, 0, 0))
    rd = core.ready()
    assert rd.messages == (RequestVoteResponse("z", "a", 3, False),)
