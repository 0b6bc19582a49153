"""Raft values: log entries, persistent state, RPC messages, and the core's output batch.

Everything here is a frozen attrs record so it can be hashed, compared in tests, and (for the
wire/WAL records) encoded by :mod:`p2porch.common.codec`.

Wire tags (permanent, append-only). The consensus range is 1-99; it is split so the two
consensus modules never collide:

    1-9     log and state records (Entry, HardState, Membership, ConfChange, snapshots, ...)
    10-29   RPC messages between cores
    30-39   core events (never on the wire today, registered so they can be logged/encoded)
    40-49   status records (served by the node API)
    50-99   reserved for storage.py / service.py / kv.py (WAL records, KV commands)
"""

from __future__ import annotations

import enum

import attrs

from p2porch.common import codec


class EntryKind(enum.IntEnum):
    """What an entry's ``data`` means to the shell."""

    NORMAL = 0  # opaque state-machine command
    CONFIG = 1  # codec-encoded ConfChange; the core applies it when it is APPENDED
    NOOP = 2  # appended by every new leader so it can commit entries of older terms


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


class ConfChangeOp(enum.IntEnum):
    ADD_LEARNER = 0  # new node receives the log; does not vote or count for commit
    PROMOTE = 1  # learner -> voter (refused while the learner is far behind)
    REMOVE = 2  # voter or learner, the leader itself included


class ProgressState(enum.IntEnum):
    """Leader's view of one follower (like etcd's Progress states)."""

    PROBE = 0  # one AppendEntries at a time until the match point is found
    REPLICATE = 1  # optimistic pipelining, bounded by max_inflight_msgs
    SNAPSHOT = 2  # InstallSnapshot in progress; appends paused


@codec.register(1)
@attrs.frozen
class Entry:
    term: int
    index: int
    kind: EntryKind
    data: bytes


@codec.register(2)
@attrs.frozen
class HardState:
    """What must be on disk before a message depending on it is sent."""

    term: int
    vote: str | None
    commit: int


@codec.register(3)
@attrs.frozen
class Membership:
    """Who votes and who only listens. Single-server changes only, so no joint config."""

    voters: frozenset[str]
    learners: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        if self.voters & self.learners:
            raise ValueError("a node cannot be both voter and learner")

    @property
    def members(self) -> frozenset[str]:
        return self.voters | self.learners

    def quorum(self) -> int:
        """How many voters make a majority (0 voters -> 1, so nothing ever commits)."""
        return len(self.voters) // 2 + 1


@codec.register(4)
@attrs.frozen
class ConfChange:
    op: ConfChangeOp
    node_id: str


@codec.register(5)
@attrs.frozen
class SnapshotMeta:
    index: int
    term: int
    membership: Membership


@codec.register(6)
@attrs.frozen
class Snapshot:
    meta: SnapshotMeta
    data: bytes


@codec.register(7)
@attrs.frozen
class PersistentState:
    """What storage recovers at start (and what the simulation's disk keeps)."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]

    @classmethod
    def bootstrap(cls, membership: Membership) -> PersistentState:
        """The state of a brand-new cluster's founding node(s): a snapshot at index 0."""
        meta = SnapshotMeta(index=0, term=0, membership=membership)
        return cls(HardState(0, None, 0), Snapshot(meta, b""), ())

    @classmethod
    def empty(cls) -> PersistentState:
        """A node that will join an existing cluster: it learns everything from the leader."""
        return cls(HardState(0, None, 0), None, ())


# --------------------------------------------------------------------------- RPC messages
# Every RPC starts with src, dst, term (the core checks these before anything else).


@codec.register(10)
@attrs.frozen
class RequestVote:
    src: str
    dst: str
    term: int  # for a pre-vote: the term the candidate WOULD campaign in
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False  # sent after TimeoutNow: voters ignore their leader lease


@codec.register(11)
@attrs.frozen
class RequestVoteResponse:
    src: str
    dst: str
    term: int
    granted: bool
    pre_vote: bool = False


@codec.register(12)
@attrs.frozen
class AppendEntries:
    src: str
    dst: str
    term: int
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@codec.register(13)
@attrs.frozen
class AppendEntriesResponse:
    src: str
    dst: str
    term: int
    success: bool
    # success: the last index now known to match the leader; reject: the prev_index refused
    index: int
    # reject only: where the follower's log may match (fast back-tracking hints)
    hint_index: int = 0
    hint_term: int = 0
    needs_snapshot: bool = False  # the follower has no base state at all (joined empty)


@codec.register(14)
@attrs.frozen
class Heartbeat:
    src: str
    dst: str
    term: int
    commit: int  # min(follower's match, leader's commit): never beyond what the follower holds
    ctx: int = 0  # ReadIndex round the follower must echo


@codec.register(15)
@attrs.frozen
class HeartbeatResponse:
    src: str
    dst: str
    term: int
    ctx: int = 0


@codec.register(16)
@attrs.frozen
class InstallSnapshot:
    src: str
    dst: str
    term: int
    meta: SnapshotMeta
    offset: int
    data: bytes  # one chunk: snapshot.data[offset:offset+len(data)]
    total_bytes: int
    done: bool


@codec.register(17)
@attrs.frozen
class InstallSnapshotResponse:
    src: str
    dst: str
    term: int
    snapshot_index: int
    snapshot_term: int
    next_offset: int  # bytes the follower holds; the leader resumes from here
    done: bool  # the whole snapshot is installed (or the follower already had it)


@codec.register(18)
@attrs.frozen
class TimeoutNow:
    src: str
    dst: str
    term: int


Message = (
    RequestVote
    | RequestVoteResponse
    | AppendEntries
    | AppendEntriesResponse
    | Heartbeat
    | HeartbeatResponse
    | InstallSnapshot
    | InstallSnapshotResponse
    | TimeoutNow
)

MESSAGE_TYPES: tuple[type, ...] = (
    RequestVote,
    RequestVoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    TimeoutNow,
)


@codec.register(20)
@attrs.frozen
class ReadState:
    """A ReadIndex answer: the read ``ctx`` is linearizable once applied >= ``index``."""

    ctx: bytes
    index: int


# --------------------------------------------------------------------------- events


@codec.register(30)
@attrs.frozen
class LeaderChanged:
    term: int
    leader_id: str | None


@codec.register(31)
@attrs.frozen
class RoleChanged:
    term: int
    role: Role


@codec.register(32)
@attrs.frozen
class MembershipChanged:
    """The configuration in force changed (at append, or truncation/snapshot reverted it)."""

    index: int
    membership: Membership


@codec.register(33)
@attrs.frozen
class TransferAborted:
    target: str
    reason: str


@codec.register(34)
@attrs.frozen
class ConfChangeCommitted:
    """A configuration entry committed (the point a removed leader steps down)."""

    index: int
    membership: Membership


Event = LeaderChanged | RoleChanged | MembershipChanged | TransferAborted | ConfChangeCommitted


# --------------------------------------------------------------------------- status


@codec.register(40)
@attrs.frozen
class ProgressStatus:
    match: int
    next: int
    state: ProgressState
    recent_active: bool
    inflight: int
    snapshot_offset: int = 0


@codec.register(41)
@attrs.frozen
class Status:
    node_id: str
    term: int
    role: Role
    leader_id: str | None
    commit_index: int
    applied_index: int
    last_index: int
    first_index: int  # first entry still in the log (snapshot index + 1)
    membership: Membership
    progress: dict[str, ProgressStatus]  # leader only; empty elsewhere
    transfer_target: str | None = None


# --------------------------------------------------------------------------- Ready


@attrs.frozen
class Ready:
    """One batch of work for the shell, in this order:

    1. persist ``snapshot`` (if any: it REPLACES the whole stable log -- entries at or below its
       index are covered, entries above it are stale and must be dropped too), then
       ``entries`` (if ``entries[0].index`` <= the last stable index, truncate the stable log
       from there first), then ``hard_state`` (if not None); fsync if ``must_sync``;
    2. THEN send ``messages`` (they may promise what step 1 wrote: votes, appended entries);
    3. restore the state machine from ``snapshot`` (if any), then apply ``committed`` in order;
       answer ``read_states`` once applied >= their index; fail ``dropped_reads``;
    4. call ``RaftCore.advance(ready)``.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    dropped_reads: tuple[bytes, ...] = ()
    events: tuple[Event, ...] = ()
    must_sync: bool = False
