"""The sans-I/O Raft core: ticks and messages in, ``Ready`` batches out.

No clocks, sockets, threads or global randomness live here (a test enforces the import rule):
time arrives as :meth:`RaftCore.tick`, peers' messages as :meth:`RaftCore.step`, randomness
from the injected ``rng``. Everything the shell must do comes out of :meth:`RaftCore.ready`.

Design choices (the why; Raft thesis section numbers in brackets):

* **Membership: single-server changes, applied on APPEND** [thesis 4.1]. The configuration
  in force is the newest CONFIG entry in the log, committed or not; a truncation that removes
  it reverts to the previous one. A leader accepts a new change only when (a) the previous
  CONFIG entry is committed and (b) an entry of its own term is committed (its NOOP): (b)
  closes the known hole where two leaders of different terms each append one uncommitted
  single-server change and their majorities stop overlapping. Since any two configurations
  differing by one voter have overlapping majorities, no two leaders can be elected in a term.
  A removed leader keeps leading (without counting itself) until the removal commits, then
  steps down and hands over with TimeoutNow. Any node grants votes whatever its own config
  says (a just-promoted learner may not know it yet; refusing would deadlock).
* **Commit** counts matches of the voters in force, and only an entry of the current term
  commits by counting [thesis 3.6.2]; older ones commit with it. The leader's own match is its
  STABLE index, so the core never counts an entry its own disk does not hold.
* **Elections**: randomized timeout in [election_ticks, 2*election_ticks). Pre-vote [9.6]: a
  node first asks whether it could win without bumping its term; a voter refuses while it has
  heard from a leader within the election timeout (the "lease"). With check-quorum, a real
  vote request is also ignored inside the lease unless it follows a TimeoutNow, and a leader
  that did not hear from a quorum during an election timeout steps down.
* **Replication** follows etcd's Progress: PROBE (one message until the match point is found,
  with conflict hints to skip a whole term per round trip), REPLICATE (pipelined, at most
  max_inflight_msgs unacknowledged messages), SNAPSHOT (chunked InstallSnapshot, one chunk in
  flight; the follower acks the byte offset it holds, so a lost chunk or a restarted transfer
  resumes there). Proposals are batched: appends go out when the shell asks for ``ready()``.
* **ReadIndex** [6.4]: the read waits until the leader's term has a committed entry, records
  the commit index, then needs a quorum of heartbeat acks for a round started after it.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import attrs

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.consensus.config import RaftConfig
from p2porch.consensus.errors import (
    ConfChangeRefused,
    NotLeader,
    ProposalDropped,
    TransferRefused,
)
from p2porch.consensus.log import RaftLog
from p2porch.consensus.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfChangeCommitted,
    ConfChangeOp,
    Entry,
    EntryKind,
    Event,
    HardState,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    LeaderChanged,
    Membership,
    MembershipChanged,
    Message,
    PersistentState,
    ProgressState,
    ProgressStatus,
    ReadState,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Role,
    RoleChanged,
    Snapshot,
    SnapshotMeta,
    Status,
    TimeoutNow,
    TransferAborted,
)

__all__ = ["RaftCore", "Rng", "apply_conf_change"]


class Rng(Protocol):
    """What the core needs from its injected ``random.Random`` (the only randomness it uses)."""

    def randrange(self, start: int) -> int: ...


def apply_conf_change(membership: Membership, change: ConfChange) -> Membership:
    """The membership after ``change`` (invalid changes leave it as it is: deterministic)."""
    voters, learners = membership.voters, membership.learners
    node = change.node_id
    if change.op is ConfChangeOp.ADD_LEARNER:
        if node not in voters:
            learners = learners | {node}
    elif change.op is ConfChangeOp.PROMOTE:
        if node in learners:
            learners = learners - {node}
            voters = voters | {node}
    elif change.op is ConfChangeOp.REMOVE:
        voters = voters - {node}
        learners = learners - {node}
    return Membership(voters=voters, learners=learners)


def _decode_change(entry: Entry) -> ConfChange | None:
    try:
        return codec.decode(entry.data, ConfChange)
    except CodecError:
        return None


class _Progress:
    """The leader's bookkeeping for one follower."""

    __slots__ = (
        "inflight",
        "match",
        "match_at_heartbeat",
        "next",
        "probe_sent",
        "read_round",
        "recent_active",
        "snap_elapsed",
        "snap_index",
        "snap_offset",
        "stall_rounds",
        "state",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight: deque[int] = deque()  # last index of each unacked append (REPLICATE)
        self.recent_active = False
        self.match_at_heartbeat = -1
        self.stall_rounds = 0
        self.read_round = 0  # highest ReadIndex round this follower acknowledged
        self.snap_index = 0
        self.snap_offset = 0
        self.snap_elapsed = 0

    def become_probe(self) -> None:
        self.state = ProgressState.PROBE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()


@attrs.define
class _PendingRead:
    ctx: bytes
    index: int
    round: int


class RaftCore:
    """One Raft node's protocol state. See the module docstring for the rules it follows."""

    def __init__(self, node_id: str, config: RaftConfig, rng: Rng, state: PersistentState) -> None:
        self._id = node_id
        self.config = config
        self.rng = rng
        self._bugs = config.bugs
        self._log = RaftLog(state.snapshot, state.entries)
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._dropped_reads: list[bytes] = []
        self._events: list[Event] = []
        self._need_flush = False
        self._outstanding: Ready | None = None
        hs = state.hard_state
        self._term = hs.term
        self._vote = hs.vote
        self._commit = max(min(hs.commit, self._log.last_index), self._log.snapshot_index)
        self._applied = self._log.snapshot_index  # the shell restores the snapshot, then replays
        self._handed_applied = self._applied
        self._persisted_hs = hs
        self._role = Role.FOLLOWER
        self._leader: str | None = None

        # Membership in force = base (snapshot) + CONFIG entries in the log, applied on append.
        self._base_membership = (
            state.snapshot.meta.membership
            if state.snapshot is not None
            else Membership(voters=frozenset())
        )
        self._configs: list[tuple[int, Membership]] = []
        self._rebuild_configs(self._log.first_index)

        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Progress] = {}
        self._uncommitted_bytes = 0
        self._transfer_target: str | None = None

        self._reads: list[_PendingRead] = []  # confirmed-by-quorum pending, in round order
        self._reads_waiting: list[bytes] = []  # waiting for our term's first commit
        self._read_round = 0

        self._snap_rx: tuple[SnapshotMeta, bytearray] | None = None  # chunks being received
        self._pending_snapshot: Snapshot | None = None

    # ================================================================= read-only API

    @property
    def node_id(self) -> str:
        return self._id

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> str | None:
        return self._vote

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader_id(self) -> str | None:
        return self._leader

    @property
    def membership(self) -> Membership:
        return self._configs[-1][1] if self._configs else self._base_membership

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def last_index(self) -> int:
        return self._log.last_index

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def log(self) -> RaftLog:
        """The in-memory log (read it, never mutate it: tests and the simulation inspect it)."""
        return self._log

    def status(self) -> Status:
        progress: dict[str, ProgressStatus] = {}
        for peer, pr in sorted(self._progress.items()):
            progress[peer] = ProgressStatus(
                match=pr.match,
                next=pr.next,
                state=pr.state,
                recent_active=pr.recent_active,
                inflight=len(pr.inflight),
                snapshot_offset=pr.snap_offset,
            )
        return Status(
            node_id=self._id,
            term=self._term,
            role=self._role,
            leader_id=self._leader,
            commit_index=self._commit,
            applied_index=self._applied,
            last_index=self._log.last_index,
            first_index=self._log.first_index,
            membership=self.membership,
            progress=progress,
            transfer_target=self._transfer_target,
        )

    # ================================================================= client API

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a command; returns its (term, index). The shell completes it when applied."""
        self._check_can_propose(len(data))
        return self._append_own(EntryKind.NORMAL, data)

    def propose_conf_change(self, change: ConfChange) -> tuple[int, int]:
        """Append a single-server membership change (one at a time; see module docstring)."""
        self._check_can_propose(0)
        current = self.membership
        if self._log.term(self._commit) != self._term:
            raise ConfChangeRefused("this leader has not committed an entry of its term yet")
        if self._configs and self._configs[-1][0] > self._commit:
            raise ConfChangeRefused("another membership change is still pending")
        node = change.node_id
        if change.op is ConfChangeOp.ADD_LEARNER:
            if node in current.members:
                raise ConfChangeRefused(f"{node} is already a member")
        elif change.op is ConfChangeOp.PROMOTE:
            if node not in current.learners:
                raise ConfChangeRefused(f"{node} is not a learner")
            pr = self._progress.get(node)
            if pr is None or pr.match == 0:
                # Never acknowledged anything -- not even the snapshot it starts from. On a
                # short log the lag test below would pass it, and an empty voter cannot vote
                # (see _on_request_vote): two of them can leave no electable majority.
                raise ConfChangeRefused(f"{node} has not replicated anything yet")
            lag = self._log.last_index - pr.match
            if lag > self.config.max_promote_lag_entries:
                raise ConfChangeRefused(f"{node} is {lag} entries behind; wait until it catches up")
        elif change.op is ConfChangeOp.REMOVE:
            if node not in current.members:
                raise ConfChangeRefused(f"{node} is not a member")
            if current.voters == frozenset({node}):
                raise ConfChangeRefused("cannot remove the last voter")
        return self._append_own(EntryKind.CONFIG, codec.encode(change))

    def read_index(self, ctx: bytes) -> None:
        """Start a linearizable read; answered by a ReadState (or a dropped read) later."""
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader)
        if self._log.term(self._commit) != self._term:
            self._reads_waiting.append(ctx)
            return
        self._start_read(ctx)

    def transfer_leadership(self, target: str) -> None:
        """Hand leadership to ``target`` (a voter): catch it up, then send TimeoutNow."""
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader)
        if target == self._id:
            return
        if target not in self.membership.voters:
            raise TransferRefused(f"{target} is not a voter")
        if self._transfer_target == target:
            return
        if self._transfer_target is not None:
            self._abort_transfer("superseded by a transfer to " + target)
        self._transfer_target = target
        self._election_elapsed = 0  # the transfer is aborted after one election timeout
        pr = self._progress[target]
        if pr.match == self._log.last_index:
            self._send(TimeoutNow(self._id, target, self._term))
        else:
            self._send_append(target)

    def compact(self, index: int, data: bytes) -> None:
        """The shell snapshotted its state machine at applied ``index``: drop the log to there."""
        if index <= self._log.snapshot_index:
            return
        if index > self._applied:
            raise ValueError(f"cannot compact to {index}: only {self._applied} applied")
        term = self._log.term(index)
        if term is None:
            raise ValueError(f"no entry at {index}")
        meta = SnapshotMeta(index=index, term=term, membership=self._membership_at(index))
        self._log.compact(Snapshot(meta, data))
        self._base_membership = meta.membership
        self._configs = [c for c in self._configs if c[0] > index]

    # ================================================================= time

    def tick(self) -> None:
        if self._role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._promotable() and self._election_elapsed >= self._timeout:
                self._election_elapsed = 0
                self._campaign(pre_vote=self.config.pre_vote, transfer=False)

    def ticks_until_due(self) -> int | None:
        """How many ``tick()`` calls from now the first one that may act comes (>= 1).

        ``None``: no tick will act before some other input (a step, a proposal, ...) arrives.
        Every tick before the due one only counts (no message, event or role change), so a
        shell may sleep until the due tick and deliver the quiet ones in a burst just before
        its next input: a follower then wakes for its leader's heartbeats and nothing else,
        a leader once per heartbeat. The answer changes with any input; ask again after each.
        """
        if self._role is Role.LEADER:
            due = self.config.heartbeat_ticks - self._heartbeat_elapsed
            # The end of an election timeout acts only to abort a transfer or to step down
            # for want of a quorum. Acks only accumulate until that check, so a quorum
            # heard already will still be heard then: no need to wake up for it.
            if self._transfer_target is not None or (
                self.config.check_quorum and not self._quorum_heard()
            ):
                due = min(due, self.config.election_ticks - self._election_elapsed)
            resend = 3 * self.config.heartbeat_ticks
            for pr in self._progress.values():
                if pr.state is ProgressState.SNAPSHOT:
                    due = min(due, resend - pr.snap_elapsed)
            return max(1, due)
        if not self._promotable():
            return None
        return max(1, self._timeout - self._election_elapsed)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_ticks:
            self._election_elapsed = 0
            if self._transfer_target is not None:
                self._abort_transfer("the target did not take over within an election timeout")
            if self.config.check_quorum and not self._quorum_active():
                self._become_follower(self._term, None)
                return
        for peer in sorted(self._progress):
            pr = self._progress[peer]
            if pr.state is ProgressState.SNAPSHOT:
                pr.snap_elapsed += 1
                if pr.snap_elapsed >= 3 * self.config.heartbeat_ticks:
                    self._send_snapshot_chunk(peer)  # the chunk or its ack was lost: resend
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        """Did a quorum answer during this election timeout? Starts the next one afresh."""
        heard = self._quorum_heard()
        for pr in self._progress.values():
            pr.recent_active = False
        return heard

    def _quorum_heard(self) -> bool:
        voters = self.membership.voters
        active = sum(
            1
            for v in voters
            if v == self._id or (v in self._progress and self._progress[v].recent_active)
        )
        return active >= self.membership.quorum()

    def _promotable(self) -> bool:
        """May we campaign? Voters may, and so may a voter whose removal has not committed.

        The second case matters: a leader that removed itself and then lost leadership (say to
        check-quorum) may hold the only copy of its removal entry; if it could not campaign,
        the remaining voters might be unable to elect anyone (thesis 4.2.2). It does not count
        its own vote, since it is not in the configuration it campaigns under.
        """
        if not self._log.has_base:
            return False
        if self._id in self.membership.voters:
            return True
        return self._id in self._membership_at(self._commit).voters

    def _random_timeout(self) -> int:
        e = self.config.election_ticks
        return e + self.rng.randrange(e)

    # ================================================================= messages in

    def step(self, msg: Message) -> None:
        if msg.dst != self._id or msg.src == self._id:
            return
        if msg.term > self._term:
            if isinstance(msg, RequestVote):
                in_lease = (
                    self._leader is not None
                    and self._election_elapsed < self.config.election_ticks
                    and not msg.transfer
                )
                if msg.pre_vote:
                    if in_lease:
                        self._send(RequestVoteResponse(self._id, msg.src, self._term, False, True))
                        return
                    # a pre-vote never changes our term: answer it below at our term
                else:
                    if self.config.check_quorum and in_lease:
                        return
                    self._become_follower(msg.term, None)
            elif isinstance(msg, RequestVoteResponse) and msg.pre_vote and msg.granted:
                pass  # granted pre-votes carry the term we would campaign in
            else:
                from_leader = isinstance(msg, AppendEntries | Heartbeat | InstallSnapshot)
                leader = msg.src if from_leader else None
                self._become_follower(msg.term, leader)
        elif msg.term < self._term:
            if isinstance(msg, AppendEntries | Heartbeat) and (
                self.config.check_quorum or self.config.pre_vote
            ):
                # Tell a stale leader about the newer term so it steps down (with pre-vote our
                # term may have moved without it knowing; otherwise it would never learn).
                self._send(AppendEntriesResponse(self._id, msg.src, self._term, False, 0))
            elif isinstance(msg, RequestVote) and msg.pre_vote:
                self._send(RequestVoteResponse(self._id, msg.src, self._term, False, True))
            return

        if isinstance(msg, RequestVote):
            self._on_request_vote(msg)
        elif isinstance(msg, RequestVoteResponse):
            self._on_vote_response(msg)
        elif isinstance(msg, AppendEntries):
            self._on_append(msg)
        elif isinstance(msg, AppendEntriesResponse):
            self._on_append_response(msg)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, HeartbeatResponse):
            self._on_heartbeat_response(msg)
        elif isinstance(msg, InstallSnapshot):
            self._on_install_snapshot(msg)
        elif isinstance(msg, InstallSnapshotResponse):
            self._on_install_snapshot_response(msg)
        elif isinstance(msg, TimeoutNow):
            self._on_timeout_now(msg)

    # ----------------------------------------------------------------- elections

    def _campaign(self, *, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            self._set_role(Role.PRE_CANDIDATE)
            self._set_leader(None)
            term = self._term + 1
        else:
            self._term += 1
            self._vote = self._id
            self._set_role(Role.CANDIDATE)
            self._set_leader(None)
            term = self._term
        self._timeout = self._random_timeout()
        self._election_elapsed = 0
        self._votes = {self._id: True}
        if self._count_votes() >= self.membership.quorum():
            self._win_vote(pre_vote)
            return
        for peer in sorted(self.membership.voters):
            if peer != self._id:
                self._send(
                    RequestVote(
                        self._id,
                        peer,
                        term,
                        self._log.last_index,
                        self._log.last_term,
                        pre_vote=pre_vote,
                        transfer=transfer,
                    )
                )

    def _count_votes(self, granted: bool = True) -> int:
        voters = self.membership.voters
        return sum(1 for p, g in self._votes.items() if g is granted and p in voters)

    def _win_vote(self, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(pre_vote=False, transfer=False)
        else:
            self._become_leader()

    def _on_request_vote(self, msg: RequestVote) -> None:
        # A node that joined empty knows nothing yet: its vote could only help a stale node
        # (say, one removed from the cluster) win with an outdated configuration.
        up_to_date = self._log.has_base and self._log.is_up_to_date(
            msg.last_log_index, msg.last_log_term
        )
        free = self._vote == msg.src or (self._vote is None and self._leader is None)
        can_vote = free or (msg.pre_vote and msg.term > self._term)
        if can_vote and up_to_date:
            self._send(RequestVoteResponse(self._id, msg.src, msg.term, True, msg.pre_vote))
            if not msg.pre_vote:
                self._vote = msg.src
                self._election_elapsed = 0
        else:
            self._send(RequestVoteResponse(self._id, msg.src, self._term, False, msg.pre_vote))

    def _on_vote_response(self, msg: RequestVoteResponse) -> None:
        if msg.pre_vote:
            if self._role is not Role.PRE_CANDIDATE or msg.term not in (
                self._term,
                self._term + 1,
            ):
                return
        elif self._role is not Role.CANDIDATE:
            return
        self._votes.setdefault(msg.src, msg.granted)
        quorum = self.membership.quorum()
        if self._count_votes(True) >= quorum:
            self._win_vote(msg.pre_vote)
        elif self._count_votes(False) >= quorum:
            self._become_follower(self._term, None)

    def _on_timeout_now(self, msg: TimeoutNow) -> None:
        if self._promotable() and self._role is not Role.LEADER:
            self._campaign(pre_vote=False, transfer=True)

    # ----------------------------------------------------------------- role changes

    def _set_role(self, role: Role) -> None:
        if role is not self._role:
            self._role = role
            self._events.append(RoleChanged(self._term, role))

    def _set_leader(self, leader: str | None) -> None:
        if leader != self._leader:
            self._leader = leader
            self._events.append(LeaderChanged(self._term, leader))

    def _become_follower(self, term: int, leader: str | None) -> None:
        was_leader = self._role is Role.LEADER
        if term > self._term:
            self._term = term
            self._vote = None
        self._set_role(Role.FOLLOWER)
        self._set_leader(leader)
        self._election_elapsed = 0
        self._timeout = self._random_timeout()
        self._votes = {}
        if was_leader:
            self._progress = {}
            self._uncommitted_bytes = 0
            if self._transfer_target is not None:
                self._abort_transfer("leadership lost")
            self._dropped_reads.extend(r.ctx for r in self._reads)
            self._dropped_reads.extend(self._reads_waiting)
            self._reads = []
            self._reads_waiting = []

    def _become_leader(self) -> None:
        self._set_role(Role.LEADER)
        self._set_leader(self._id)
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._votes = {}
        self._uncommitted_bytes = 0
        self._progress = {}
        self._sync_progress()
        self._append_entry(EntryKind.NOOP, b"")

    def _sync_progress(self) -> None:
        """Track exactly the current members (membership may change on append)."""
        members = self.membership.members - {self._id}
        for peer in list(self._progress):
            if peer not in members:
                del self._progress[peer]
        for peer in sorted(members):
            if peer not in self._progress:
                self._progress[peer] = _Progress(self._log.last_index + 1)
                self._need_flush = True

    # ----------------------------------------------------------------- appending (leader)

    def _check_can_propose(self, size: int) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader)
        if self._transfer_target is not None:
            raise ProposalDropped(f"leadership transfer to {self._transfer_target} in progress")
        if (
            self._uncommitted_bytes > 0
            and self._uncommitted_bytes + size > self.config.max_uncommitted_bytes
        ):
            raise ProposalDropped(
                f"too many uncommitted bytes ({self._uncommitted_bytes} pending, "
                f"limit {self.config.max_uncommitted_bytes})"
            )

    def _append_own(self, kind: EntryKind, data: bytes) -> tuple[int, int]:
        index, term = self._append_entry(kind, data)
        self._uncommitted_bytes += len(data)
        return term, index

    def _append_entry(self, kind: EntryKind, data: bytes) -> tuple[int, int]:
        entry = Entry(self._term, self._log.last_index + 1, kind, data)
        self._log.append((entry,))
        if kind is EntryKind.CONFIG:
            self._note_configs((entry,))
        self._need_flush = True
        return entry.index, entry.term

    # ----------------------------------------------------------------- membership

    def _membership_at(self, index: int) -> Membership:
        result = self._base_membership
        for at, membership in self._configs:
            if at > index:
                break
            result = membership
        return result

    def _rebuild_configs(self, from_index: int) -> None:
        """Recompute CONFIG history from ``from_index`` on (after a restart or truncation)."""
        before = self.membership
        self._configs = [c for c in self._configs if c[0] < from_index]
        current = self.membership
        for entry in self._log.entries_between(from_index, self._log.last_index):
            if entry.kind is EntryKind.CONFIG:
                change = _decode_change(entry)
                if change is not None:
                    current = apply_conf_change(current, change)
                self._configs.append((entry.index, current))
        if self.membership != before:
            self._events.append(MembershipChanged(self._log.last_index, self.membership))

    def _note_configs(self, entries: tuple[Entry, ...]) -> None:
        before = self.membership
        current = before
        for entry in entries:
            if entry.kind is EntryKind.CONFIG:
                change = _decode_change(entry)
                if change is not None:
                    current = apply_conf_change(current, change)
                self._configs.append((entry.index, current))
        if current != before:
            self._events.append(MembershipChanged(entries[-1].index, current))
            if self._role is Role.LEADER:
                self._sync_progress()
                target = self._transfer_target
                if target is not None and target not in current.voters:
                    self._abort_transfer("target left the voters")

    # ----------------------------------------------------------------- replication (leader)

    def _send_append(self, peer: str) -> None:
        """Send what ``peer`` is missing, as far as its progress state allows."""
        pr = self._progress.get(peer)
        if pr is None or pr.state is ProgressState.SNAPSHOT:
            return
        while True:
            if pr.state is ProgressState.PROBE and pr.probe_sent:
                return
            if (
                pr.state is ProgressState.REPLICATE
                and len(pr.inflight) >= self.config.max_inflight_msgs
            ):
                return
            prev = pr.next - 1
            prev_term = self._log.term(prev)
            if prev_term is None or prev < self._log.snapshot_index:
                self._start_snapshot(peer)
                return
            entries: tuple[Entry, ...] = ()
            if pr.next <= self._log.last_index:
                entries = self._log.slice(
                    pr.next, self.config.max_entries_per_msg, self.config.max_bytes_per_msg
                )
            if pr.state is ProgressState.REPLICATE and not entries:
                return  # nothing new; heartbeats carry the commit index
            self._send(
                AppendEntries(
                    self._id,
                    peer,
                    self._term,
                    prev,
                    prev_term,
                    entries,
                    min(self._commit, prev + len(entries)) if entries else self._commit,
                )
            )
            if pr.state is ProgressState.PROBE:
                pr.probe_sent = True
                return
            pr.next = entries[-1].index + 1
            pr.inflight.append(entries[-1].index)

    def _flush(self) -> None:
        if self._need_flush:
            self._need_flush = False
            if self._role is Role.LEADER:
                for peer in sorted(self._progress):
                    self._send_append(peer)

    def _broadcast_heartbeat(self) -> None:
        for peer in sorted(self._progress):
            pr = self._progress[peer]
            commit = min(pr.match, self._commit)
            self._send(Heartbeat(self._id, peer, self._term, commit, self._read_round))

    def _on_append_response(self, msg: AppendEntriesResponse) -> None:
        if self._role is not Role.LEADER:
            return
        pr = self._progress.get(msg.src)
        if pr is None:
            return
        pr.recent_active = True
        if msg.success:
            if msg.index > pr.match:
                pr.match = msg.index
                pr.next = max(pr.next, msg.index + 1)
                while pr.inflight and pr.inflight[0] <= msg.index:
                    pr.inflight.popleft()
                self._maybe_commit()
                if msg.src == self._transfer_target and pr.match == self._log.last_index:
                    self._send(TimeoutNow(self._id, msg.src, self._term))
            if pr.state is ProgressState.PROBE and msg.index >= pr.match:
                pr.become_replicate()  # the match point is confirmed: start pipelining
            self._send_append(msg.src)
            return
        # rejected
        if msg.index == 0 and not msg.needs_snapshot and msg.hint_index == 0:
            return  # a "you are stale" answer with our own term: nothing to learn
        if msg.needs_snapshot:
            self._start_snapshot(msg.src)
            return
        if msg.index <= pr.match:
            return  # stale rejection of something already matched
        if pr.state is ProgressState.PROBE and msg.index != pr.next - 1:
            return  # answer to an older probe
        back_to = self._log.find_conflict_by_term(msg.hint_index, msg.hint_term)
        pr.become_probe()
        pr.next = max(pr.match + 1, min(back_to + 1, msg.index))
        self._send_append(msg.src)

    def _on_heartbeat_response(self, msg: HeartbeatResponse) -> None:
        if self._role is not Role.LEADER:
            return
        pr = self._progress.get(msg.src)
        if pr is None:
            return
        pr.recent_active = True
        if msg.ctx > pr.read_round:
            pr.read_round = msg.ctx
            self._release_reads()
        if pr.state is ProgressState.SNAPSHOT:
            return
        if pr.match < self._log.last_index:
            if pr.state is ProgressState.PROBE:
                pr.probe_sent = False
            elif pr.match == pr.match_at_heartbeat:
                # No progress for a few heartbeat rounds: appends (or acks) were lost.
                pr.stall_rounds += 1
                if pr.stall_rounds >= 3:
                    pr.stall_rounds = 0
                    pr.become_probe()
            else:
                pr.stall_rounds = 0
            pr.match_at_heartbeat = pr.match
            self._send_append(msg.src)
        else:
            pr.match_at_heartbeat = pr.match

    def _maybe_commit(self) -> None:
        voters = self.membership.voters
        matches = sorted(
            (
                self._log.stable_index
                if v == self._id
                else (self._progress[v].match if v in self._progress else 0)
            )
            for v in voters
        )
        if not matches:
            return
        candidate = matches[len(matches) - self.membership.quorum()]
        if candidate <= self._commit:
            return
        if "commit-old-term" not in self._bugs and self._log.term(candidate) != self._term:
            return
        self._advance_commit(candidate)

    def _advance_commit(self, new_commit: int) -> None:
        old = self._commit
        if new_commit <= old:
            return
        self._commit = new_commit
        for at, membership in self._configs:
            if old < at <= new_commit:
                self._events.append(ConfChangeCommitted(at, membership))
        if self._role is not Role.LEADER:
            return
        for entry in self._log.entries_between(old + 1, new_commit):
            if entry.term == self._term:
                self._uncommitted_bytes = max(0, self._uncommitted_bytes - len(entry.data))
        if self._log.term(new_commit) == self._term and self._reads_waiting:
            waiting, self._reads_waiting = self._reads_waiting, []
            for ctx in waiting:
                self._start_read(ctx)
        latest_conf = self._configs[-1][0] if self._configs else 0
        if self._id not in self.membership.voters and latest_conf <= new_commit:
            self._step_down_removed()

    def _step_down_removed(self) -> None:
        """Our removal committed: stop leading and hand over to the most caught-up voter."""
        best: str | None = None
        best_match = -1
        for peer in sorted(self.membership.voters):
            pr = self._progress.get(peer)
            if pr is not None and pr.match > best_match:
                best, best_match = peer, pr.match
        term = self._term
        self._become_follower(term, None)
        if best is not None and best_match == self._log.last_index:
            self._send(TimeoutNow(self._id, best, term))

    # ----------------------------------------------------------------- replication (follower)

    def _on_append(self, msg: AppendEntries) -> None:
        self._follow(msg.src)
        if not self._log.has_base:
            self._send(
                AppendEntriesResponse(
                    self._id, msg.src, self._term, False, msg.prev_index, needs_snapshot=True
                )
            )
            return
        if msg.prev_index < self._commit:
            self._send(AppendEntriesResponse(self._id, msg.src, self._term, True, self._commit))
            return
        if self._log.match_term(msg.prev_index, msg.prev_term):
            last_new = msg.prev_index + len(msg.entries)
            conflict = self._log.find_conflict(msg.entries)
            if conflict:
                if conflict <= self._commit:
                    raise AssertionError(f"{self._id}: conflict at committed index {conflict}")
                if "no-log-truncate" in self._bugs and conflict <= self._log.last_index:
                    new = tuple(e for e in msg.entries if e.index > self._log.last_index)
                else:
                    new = tuple(e for e in msg.entries if e.index >= conflict)
                if new:
                    truncating = new[0].index <= self._log.last_index
                    self._log.append(new)
                    if truncating:
                        self._rebuild_configs(new[0].index)
                    else:
                        self._note_configs(new)
            self._advance_commit(min(msg.commit, last_new))
            self._send(AppendEntriesResponse(self._id, msg.src, self._term, True, last_new))
            return
        hint = self._log.find_conflict_by_term(
            min(msg.prev_index, self._log.last_index), msg.prev_term
        )
        self._send(
            AppendEntriesResponse(
                self._id,
                msg.src,
                self._term,
                False,
                msg.prev_index,
                hint_index=hint,
                hint_term=self._log.term(hint) or 0,
            )
        )

    def _follow(self, leader: str) -> None:
        if self._role is not Role.FOLLOWER:
            self._become_follower(self._term, leader)
        self._set_leader(leader)
        self._election_elapsed = 0

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        self._follow(msg.src)
        self._advance_commit(min(msg.commit, self._log.last_index))
        self._send(HeartbeatResponse(self._id, msg.src, self._term, msg.ctx))

    # ----------------------------------------------------------------- snapshots

    def _start_snapshot(self, peer: str) -> None:
        pr = self._progress[peer]
        snap = self._log.snapshot
        if snap is None:
            return  # cannot happen on a leader (it has at least the bootstrap snapshot)
        pr.state = ProgressState.SNAPSHOT
        pr.inflight.clear()
        if pr.snap_index != snap.meta.index:
            pr.snap_index = snap.meta.index
            pr.snap_offset = 0
        self._send_snapshot_chunk(peer)

    def _send_snapshot_chunk(self, peer: str) -> None:
        pr = self._progress[peer]
        snap = self._log.snapshot
        if snap is None:
            return
        if pr.snap_index != snap.meta.index:  # we compacted again meanwhile: send the new one
            pr.snap_index = snap.meta.index
            pr.snap_offset = 0
        data = snap.data
        chunk = data[pr.snap_offset : pr.snap_offset + self.config.snapshot_chunk_bytes]
        done = pr.snap_offset + len(chunk) >= len(data)
        pr.snap_elapsed = 0
        self._send(
            InstallSnapshot(
                self._id, peer, self._term, snap.meta, pr.snap_offset, chunk, len(data), done
            )
        )

    def _on_install_snapshot_response(self, msg: InstallSnapshotResponse) -> None:
        if self._role is not Role.LEADER:
            return
        pr = self._progress.get(msg.src)
        if pr is None:
            return
        pr.recent_active = True
        if pr.state is not ProgressState.SNAPSHOT or msg.snapshot_index != pr.snap_index:
            return
        if msg.done:
            pr.match = max(pr.match, msg.snapshot_index)
            pr.snap_offset = 0
            pr.become_probe()
            self._maybe_commit()
            self._send_append(msg.src)
            return
        pr.snap_offset = msg.next_offset
        self._send_snapshot_chunk(msg.src)

    def _on_install_snapshot(self, msg: InstallSnapshot) -> None:
        self._follow(msg.src)
        meta = msg.meta

        def reply(next_offset: int, done: bool) -> None:
            self._send(
                InstallSnapshotResponse(
                    self._id, msg.src, self._term, meta.index, meta.term, next_offset, done
                )
            )

        if self._log.has_base and meta.index <= self._commit:
            reply(msg.total_bytes, True)  # we already hold (and committed) all of it
            return
        if self._snap_rx is None or self._snap_rx[0] != meta:
            if msg.offset != 0:
                reply(0, False)  # unknown transfer: start it over
                return
            self._snap_rx = (meta, bytearray())
        buf = self._snap_rx[1]
        if msg.offset == len(buf):
            buf.extend(msg.data)
        if len(buf) < msg.total_bytes or not msg.done:
            reply(len(buf), False)
            return
        self._snap_rx = None
        snapshot = Snapshot(meta, bytes(buf[: msg.total_bytes]))
        if self._log.has_base and self._log.match_term(meta.index, meta.term):
            # Our log already holds that entry: just commit up to it and keep the rest.
            self._advance_commit(meta.index)
        else:
            self._log.restore(snapshot)
            self._pending_snapshot = snapshot
            self._commit = meta.index
            self._applied = self._handed_applied = meta.index
            before = self.membership
            self._base_membership = meta.membership
            self._configs = []
            if self.membership != before:
                self._events.append(MembershipChanged(meta.index, self.membership))
        reply(msg.total_bytes, True)

    # ----------------------------------------------------------------- reads and transfers

    def _start_read(self, ctx: bytes) -> None:
        voters = self.membership.voters
        if voters <= {self._id} or (self.config.lease_reads and self.config.check_quorum):
            self._read_states.append(ReadState(ctx, self._commit))
            return
        self._read_round += 1
        self._reads.append(_PendingRead(ctx, self._commit, self._read_round))
        self._broadcast_heartbeat()

    def _release_reads(self) -> None:
        voters = self.membership.voters
        quorum = self.membership.quorum()
        while self._reads:
            read = self._reads[0]
            acks = sum(
                1
                for v in voters
                if v == self._id
                or (v in self._progress and self._progress[v].read_round >= read.round)
            )
            if acks < quorum:
                return
            self._reads.pop(0)
            self._read_states.append(ReadState(read.ctx, read.index))

    def _abort_transfer(self, reason: str) -> None:
        if self._transfer_target is not None:
            self._events.append(TransferAborted(self._transfer_target, reason))
            self._transfer_target = None

    # ================================================================= output

    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)

    def _hard_state(self) -> HardState:
        vote = self._vote
        if "unpersisted-vote" in self._bugs and vote != self._id:
            vote = self._persisted_hs.vote if self._persisted_hs.term == self._term else None
        return HardState(self._term, vote, self._commit)

    def has_ready(self) -> bool:
        """Is there work for the shell? Always False between ``ready()`` and ``advance()``.

        One Ready is outstanding at a time (like etcd's raft): the shell may keep calling
        ``step``/``tick``/``propose`` while it persists, but gets the next batch only after it
        acknowledged the previous one, so the same entries are never handed out twice.
        """
        if self._outstanding is not None:
            return False
        self._flush()
        return bool(
            self._msgs
            or self._events
            or self._read_states
            or self._dropped_reads
            or self._pending_snapshot is not None
            or self._log.stable_index < self._log.last_index
            or self._handed_applied < self._commit
            or self._hard_state() != self._persisted_hs
        )

    def ready(self) -> Ready:
        """The next batch of work; call :meth:`advance` with it when it is done."""
        if self._outstanding is not None:
            raise RuntimeError("ready() called again before advance()")
        self._flush()
        hs = self._hard_state()
        entries = self._log.unstable()
        hs_out = hs if hs != self._persisted_hs else None
        must_sync = (
            bool(entries)
            or self._pending_snapshot is not None
            or (
                hs_out is not None
                and (hs.term != self._persisted_hs.term or hs.vote != self._persisted_hs.vote)
            )
        )
        committed = self._log.entries_between(self._handed_applied + 1, self._commit)
        rd = Ready(
            hard_state=hs_out,
            entries=entries,
            snapshot=self._pending_snapshot,
            messages=tuple(self._msgs),
            committed=committed,
            read_states=tuple(self._read_states),
            dropped_reads=tuple(self._dropped_reads),
            events=tuple(self._events),
            must_sync=must_sync,
        )
        self._msgs = []
        self._read_states = []
        self._dropped_reads = []
        self._events = []
        self._pending_snapshot = None
        if committed:
            self._handed_applied = committed[-1].index
        if hs_out is not None:
            self._persisted_hs = hs_out
        self._outstanding = rd
        return rd

    def advance(self, ready: Ready) -> None:
        """The shell persisted, sent and applied ``ready``."""
        if ready is not self._outstanding:
            raise RuntimeError("advance() with a Ready that is not the outstanding one")
        self._outstanding = None
        if ready.entries:
            last = ready.entries[-1]
            self._log.stable_to(last.index, last.term)
        if ready.committed:
            self._applied = max(self._applied, ready.committed[-1].index)
        if self._role is Role.LEADER and ready.entries:
            self._maybe_commit()
