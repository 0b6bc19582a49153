"""Deterministic simulation of a Raft cluster (tier 2): many seeds, faults, invariants.

``python -m p2porch.consensus.sim --seeds N [--nodes K] [--start S] [--bug NAME] [--verbose]``

N cores are driven directly (no event loop: trio's scheduler would shuffle ready tasks and
break determinism) through a simulated network, clock and disk. Everything random comes from
one ``random.Random(seed)``, and everything iterated is sorted, so the same seed gives the
same trace in any process (the trace is hashed and checked by re-running seeds).

Each seed draws its own fault mix and core tuning: message drop/duplication/delay (so
reordering), partitions (halves, an isolated node -- often the leader --, one-way cuts),
clogged links (huge delays), crash-restarts that lose whatever the node had not fsynced, slow
disks (a Ready is persisted and its messages sent only some steps later) and slow nodes
(missed ticks). Crashes also strike at the revealing points: right after a vote was sent, a
few steps into a new leader's term, and between a leader's fsync and its send (so entries
exist on one disk only -- the raw material of the Raft paper's Figure 8). A client meanwhile
proposes KV writes (also to deposed leaders, as clients with stale routing do), issues
ReadIndex reads, changes membership (add learner, promote, remove -- the leader too), and
transfers leadership; nodes compact their logs so laggards need InstallSnapshot. A removed
node is wiped (re-provisioned empty, as an operator would) before it is added again.

The simulated shell follows the contract: persist (fsync when ``must_sync``), THEN send, then
apply, then ``advance``. A crash reverts the disk to its last fsync.

Invariants, checked as the run goes (after every step):

* election safety: at most one leader per term;
* leader append-only: a leader never truncates its own log;
* log matching: an (index, term) pair always names the same entry with the same predecessor
  term, on every node's disk, forever;
* state-machine safety: every node applies the same entry at each index (and restores
  snapshots whose state hashes to what the others had at that index);
* leader completeness: a new leader holds every entry any node has applied;
* committed-is-durable: acknowledged writes are never lost (the checks above across crashes,
  plus the final leader's log in the liveness phase);
* ReadIndex: a read index covers every entry committed before the read began;
* linearizability: the client history (writes acknowledged when applied on the node that
  proposed them, ReadIndex reads answered once applied) is checked with
  ``p2porch.consensus.lincheck`` when that module is present;
* liveness: once everything heals, a leader is elected and a new write commits and reaches
  every member within a bound;
* determinism: re-running a seed gives the same trace hash.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import importlib
import random
import sys
import zlib
from collections import deque
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import attrs

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.consensus.config import KNOWN_BUGS, RaftConfig
from p2porch.consensus.core import RaftCore
from p2porch.consensus.errors import ConsensusError
from p2porch.consensus.messages import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    Membership,
    Message,
    PersistentState,
    Ready,
    RequestVoteResponse,
    Role,
    Snapshot,
)


def _load_lincheck() -> ModuleType | None:
    """The linearizability checker (another module, optional): used when it is there."""
    try:
        return importlib.import_module("p2porch.consensus.lincheck")
    except ImportError:  # pragma: no cover
        return None


LINCHECK = _load_lincheck()


FAULT_STEPS = 500
# The liveness phase heals partitions, clogs and crashes but keeps random loss and delay,
# so a leaderless stretch is a run of split votes whose length has a tail: seed 57353 (4
# voters, no pre-vote, 10% loss, delays up to 5 ticks, a removed stale leader) went ~170
# ticks without progress before electing, where the first 57,000 seeds never needed 150.
# 300 ticks is still ~15-30 election rounds.
STALL_STEPS = 300
LIVENESS_MAX_STEPS = 20_000
TRACE_TAIL = 40

_SNAP_HINT = tuple[bytes, int, dict[str, str]]


def _fmt(value: object) -> str:
    """Text for the trace that does not depend on the process's hash seed (sets sorted)."""
    if isinstance(value, frozenset | set):
        return "{" + ",".join(sorted(_fmt(v) for v in value)) + "}"
    cls: Any = type(value)
    if attrs.has(cls):
        fields = attrs.fields(cls)
        inner = ",".join(f"{f.name}={_fmt(getattr(value, f.name))}" for f in fields)
        return f"{type(value).__name__}({inner})"
    if isinstance(value, tuple | list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class Violation(Exception):
    """An invariant broke; the message names it."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail


@attrs.frozen
class Faults:
    """One seed's fault mix (probabilities are per message or per step)."""

    drop: float
    duplicate: float
    max_delay: int
    partition_rate: float
    crash_rate: float
    slow_disk_rate: float
    clog_rate: float
    propose_rate: float
    conf_rate: float
    transfer_rate: float
    read_rate: float
    compact_every: int
    crash_after_send: float
    new_leader_crash: float
    crash_before_send: float

    @classmethod
    def draw(cls, rng: random.Random) -> Faults:
        return cls(
            drop=rng.choice((0.0, 0.02, 0.05, 0.1, 0.2)),
            duplicate=rng.choice((0.0, 0.02, 0.05)),
            max_delay=rng.choice((1, 2, 3, 5)),
            partition_rate=rng.choice((0.0, 0.01, 0.02, 0.04)),
            crash_rate=rng.choice((0.0, 0.005, 0.01, 0.02)),
            slow_disk_rate=rng.choice((0.0, 0.02, 0.05)),
            clog_rate=rng.choice((0.0, 0.005, 0.01)),
            propose_rate=rng.choice((0.3, 0.6, 1.0)),
            conf_rate=rng.choice((0.0, 0.02, 0.05)),
            transfer_rate=rng.choice((0.0, 0.005, 0.02)),
            read_rate=rng.choice((0.0, 0.1, 0.3)),
            compact_every=rng.choice((8, 16, 40)),
            crash_after_send=rng.choice((0.0, 0.1, 0.3)),
            new_leader_crash=rng.choice((0.0, 0.2, 0.5)),
            crash_before_send=rng.choice((0.0, 0.05, 0.2)),
        )


class SimDisk:
    """What survives a crash: everything up to the last fsync.

    Entries, snapshots, term and vote are always written with ``must_sync`` (the core says
    so), so only a commit-index-only hard state can be pending; a crash drops it.
    """

    def __init__(self, state: PersistentState) -> None:
        self.durable_hs = state.hard_state
        self.volatile_hs = state.hard_state
        self.snapshot = state.snapshot
        self.entries: list[Entry] = list(state.entries)

    @property
    def first_index(self) -> int:
        return self.entries[0].index if self.entries else self.snap_index + 1

    @property
    def snap_index(self) -> int:
        return self.snapshot.meta.index if self.snapshot is not None else 0

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snap_index

    def term_at(self, index: int) -> int | None:
        if index == self.snap_index:
            return self.snapshot.meta.term if self.snapshot is not None else 0
        pos = index - self.first_index
        if 0 <= pos < len(self.entries):
            return self.entries[pos].term
        return None

    def write(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.entries:
            first = rd.entries[0].index
            keep = first - self.first_index
            if keep < len(self.entries):
                del self.entries[max(0, keep) :]
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.volatile_hs = rd.hard_state
        if rd.must_sync:
            self.durable_hs = self.volatile_hs

    def compact(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        index = snapshot.meta.index
        self.entries = [e for e in self.entries if e.index > index]
        self.durable_hs = self.volatile_hs  # the shell fsyncs the snapshot

    def crash(self) -> None:
        self.volatile_hs = self.durable_hs

    def recover(self) -> PersistentState:
        return PersistentState(self.durable_hs, self.snapshot, tuple(self.entries))


class StateMachine:
    """A KV map plus a hash chain over every applied entry (any difference shows)."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.chain = b""
        self.index = 0

    def apply(self, entry: Entry) -> None:
        self.chain = hashlib.blake2b(
            self.chain + entry.term.to_bytes(8, "big") + entry.data, digest_size=12
        ).digest()
        self.index = entry.index
        if entry.kind is EntryKind.NORMAL:
            _, key, value = entry.data.decode().split("|", 2)
            self.kv[key] = value

    def encode(self) -> bytes:
        return codec.encode((self.chain, self.index, dict(sorted(self.kv.items()))))

    def restore(self, data: bytes, index: int) -> None:
        if not data:
            self.kv, self.chain, self.index = {}, b"", index
            return
        decoded: tuple[bytes, int, dict[str, str]] = codec.decode(data, _SNAP_HINT)
        self.chain, self.index, self.kv = decoded[0], decoded[1], dict(decoded[2])


@attrs.define
class HistOp:
    """One client operation, for the linearizability check at the end of a seed."""

    kind: str  # "put" or "get"
    key: str
    value: bytes | None
    call: float
    ret: float | None = None
    result: bytes | None = None
    failed: bool = False  # known never to have taken effect: left out of the history
    index: int = 0  # puts: where the proposal landed in the proposer's log
    term: int = 0


class SimNode:
    def __init__(self, node_id: str, state: PersistentState) -> None:
        self.id = node_id
        self.disk = SimDisk(state)
        self.core: RaftCore | None = None
        self.sm = StateMachine()
        self.incarnation = 0
        self.slow_ready: tuple[Ready, int] | None = None  # a Ready whose fsync is slow
        self.slow_ticks = False
        self.down_until = -1
        self.proposals: dict[int, tuple[int, HistOp]] = {}  # index -> (term, client op)
        self.reads: dict[bytes, tuple[int, HistOp]] = {}  # ctx -> (committed at issue, op)
        self.read_waits: list[tuple[int, HistOp]] = []  # answered reads waiting for apply
        self.leader_terms: set[int] = set()
        self.crash_at = -1


class Simulation:
    def __init__(
        self,
        seed: int,
        n_nodes: int = 5,
        bugs: frozenset[str] = frozenset(),
        verbose: bool = False,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.verbose = verbose
        rng = self.rng
        self.faults = Faults.draw(rng)
        check_quorum = rng.random() < 0.8
        self.config = RaftConfig(
            election_ticks=rng.choice((4, 6, 10)),
            heartbeat_ticks=rng.choice((1, 2)),
            max_entries_per_msg=rng.choice((1, 1, 2, 16)),
            max_bytes_per_msg=rng.choice((64, 1024, 1 << 20)),
            max_inflight_msgs=rng.choice((1, 2, 4, 16)),
            max_uncommitted_bytes=rng.choice((200, 2000, 1 << 20)),
            snapshot_chunk_bytes=rng.choice((16, 64, 1024)),
            max_promote_lag_entries=rng.choice((5, 50)),
            pre_vote=rng.random() < 0.8,
            check_quorum=check_quorum,
            bugs=bugs,
        )
        self.ids = [f"n{i + 1}" for i in range(n_nodes)]
        founders = self.ids[: min(rng.choice((3, 5)), n_nodes)]
        boot = PersistentState.bootstrap(Membership(voters=frozenset(founders)))
        self.nodes: dict[str, SimNode] = {}
        for nid in self.ids:
            self.nodes[nid] = SimNode(nid, boot if nid in founders else PersistentState.empty())
            self._start(self.nodes[nid])
        self.now = 0
        self.net: list[tuple[int, int, int, Message]] = []  # (due, tiebreak, seq, msg)
        self.seq = 0
        self.cut: set[tuple[str, str]] = set()
        self.clogged: set[tuple[str, str]] = set()
        self.heal_at = -1
        self.unclog_at = -1
        # global knowledge for invariants
        self.leaders: dict[int, str] = {}
        self.committed: list[int] = [0]  # committed[i] = term of the entry applied at i
        self.chains: list[bytes] = [b""]  # state hash after applying index i
        self.entry_sig: dict[tuple[int, int], tuple[int, int, bytes]] = {}
        self.key_seq = 0
        self.read_seq = 0
        self.acked = 0
        self.trace_hash = 0
        self.trace: deque[str] = deque(maxlen=TRACE_TAIL)
        self.liveness = False
        self.stats: dict[str, int] = {}
        self.history: list[HistOp] = []
        self.first_applied: list[float] = [0.0]  # when index i was first applied anywhere
        self.tick_events = 0

    # ------------------------------------------------------------------ tracing

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def _trace(self, *parts: object) -> None:
        head = str(parts[0])
        if head == "recv":
            head = f"recv {parts[1]}"
        elif head == "event":
            head = f"event {type(parts[2]).__name__}"
        self._count(head)
        line = " ".join(map(_fmt, parts))
        self.trace_hash = zlib.crc32(line.encode(), self.trace_hash)
        self.trace.append(f"t={self.now} {line}")
        if self.verbose:
            print(f"t={self.now} {line}")

    # ------------------------------------------------------------------ node lifecycle

    def _start(self, node: SimNode) -> None:
        node.incarnation += 1
        state = node.disk.recover()
        node.core = RaftCore(
            node.id,
            self.config,
            random.Random(self.seed * 1000003 + node.incarnation * 131 + int(node.id[1:])),
            state,
        )
        node.sm = StateMachine()
        if state.snapshot is not None:
            node.sm.restore(state.snapshot.data, state.snapshot.meta.index)
        node.slow_ready = None
        node.proposals = {}
        for _, op in node.reads.values():
            op.failed = True
        for _, op in node.read_waits:
            op.failed = True
        node.reads = {}
        node.read_waits = []

    def _crash(self, node: SimNode, downtime: int) -> None:
        self._trace("crash", node.id, "for", downtime)
        node.core = None
        node.disk.crash()
        node.slow_ready = None
        node.down_until = self.now + downtime

    def _restart(self, node: SimNode) -> None:
        self._trace("restart", node.id)
        self._start(node)
        node.down_until = -1

    def _wipe(self, node: SimNode) -> None:
        """An operator re-provisions a removed node before it joins again."""
        self._trace("wipe", node.id)
        node.disk = SimDisk(PersistentState.empty())
        node.leader_terms = set()
        self._start(node)
        node.down_until = -1

    def _running(self) -> Iterator[tuple[SimNode, RaftCore]]:
        for nid in self.ids:
            node = self.nodes[nid]
            if node.core is not None:
                yield node, node.core

    # ------------------------------------------------------------------ network

    def _send(self, msg: Message) -> None:
        f = self.faults if not self.liveness else None
        copies = 1
        if f is not None:
            if self.rng.random() < f.drop:
                return
            if self.rng.random() < f.duplicate:
                copies = 2
        for _ in range(copies):
            delay = 1 + (self.rng.randrange(f.max_delay) if f is not None else 0)
            if (msg.src, msg.dst) in self.clogged:
                delay += 15 + self.rng.randrange(15)
            self.seq += 1
            heapq.heappush(self.net, (self.now + delay, self.rng.randrange(1 << 30), self.seq, msg))

    def _deliver(self) -> None:
        while self.net and self.net[0][0] <= self.now:
            _, _, _, msg = heapq.heappop(self.net)
            if (msg.src, msg.dst) in self.cut:
                continue
            node = self.nodes.get(msg.dst)
            if node is None or node.core is None:
                continue
            node.core.step(msg)
            self._trace("recv", type(msg).__name__, msg.src, msg.dst, msg.term)

    # ------------------------------------------------------------------ the shell

    def _process(self, node: SimNode) -> None:
        core = node.core
        assert core is not None
        if node.slow_ready is not None:
            rd, due = node.slow_ready
            if due > self.now:
                return
            node.slow_ready = None
            if not self._finish_ready(node, core, rd) or self._crash_after_send(node, rd):
                return
        for _ in range(20):
            if not core.has_ready():
                break
            rd = core.ready()
            self._check_ready(node, core, rd)
            if (
                not self.liveness
                and rd.must_sync
                and self.rng.random() < self.faults.slow_disk_rate
            ):
                node.slow_ready = (rd, self.now + 1 + self.rng.randrange(6))
                return
            if not self._finish_ready(node, core, rd) or self._crash_after_send(node, rd):
                return
        self._maybe_compact(node, core)

    def _crash_after_send(self, node: SimNode, rd: Ready) -> bool:
        """Crash right after a promise left the node: the most revealing crash point.

        A vote or an append acknowledgement is only safe if what it promises was on disk
        before it was sent; a quick reboot right after it exposes any shortcut.
        """
        if self.liveness:
            return False
        rate = self.faults.crash_after_send
        if not rate:
            return False
        for msg in rd.messages:
            promise = isinstance(msg, RequestVoteResponse) and msg.granted and not msg.pre_vote
            if promise and self.rng.random() < rate:
                self._crash(node, self.rng.randrange(4))
                return True
        return False

    def _check_ready(self, node: SimNode, core: RaftCore, rd: Ready) -> None:
        """Leader append-only, judged when the core hands the batch out (its role then)."""
        if not rd.entries:
            return
        first = rd.entries[0].index
        if core.role is Role.LEADER and first <= node.disk.last_index and rd.snapshot is None:
            raise Violation(
                "leader-append-only",
                f"{node.id} (leader, term {core.term}) truncates its log at {first}",
            )

    def _check_log_matching(self, node: SimNode, rd: Ready) -> None:
        """Log matching, judged as the batch reaches the disk (just before the write).

        An entry exists once it is persisted: a batch a crash loses before its write (a slow
        disk) never reached any log nor left the node (the shell persists, then sends). A
        single voter that loses its unwritten term with it may hand the same (index, term)
        to another command after the restart -- nothing ever saw the first one (seed 83091).
        """
        if not rd.entries:
            return
        disk = node.disk
        first = rd.entries[0].index
        prev_term = disk.term_at(first - 1) if rd.snapshot is None else rd.snapshot.meta.term
        if rd.snapshot is not None and first != rd.snapshot.meta.index + 1:
            prev_term = None
        for e in rd.entries:
            sig = (prev_term if prev_term is not None else -1, int(e.kind), e.data)
            known = self.entry_sig.get((e.index, e.term))
            if known is None:
                if prev_term is not None:
                    self.entry_sig[(e.index, e.term)] = sig
            elif prev_term is not None and known != sig:
                raise Violation(
                    "log-matching",
                    f"{node.id}: entry ({e.index}, term {e.term}) differs from another node's "
                    f"(prev term {sig[0]} vs {known[0]}, data {sig[2]!r} vs {known[2]!r})",
                )
            prev_term = e.term

    def _finish_ready(self, node: SimNode, core: RaftCore, rd: Ready) -> bool:
        """Persist, send, apply, advance. Returns False if the node crashed mid-way."""
        self._check_log_matching(node, rd)
        node.disk.write(rd)
        if rd.hard_state is not None:
            self._record_commit(node, rd.hard_state.commit)
        if (
            not self.liveness
            and (rd.committed or rd.entries)
            and core.role is Role.LEADER
            and self.rng.random() < self.faults.crash_before_send
        ):
            self._crash(node, self.rng.randrange(20))  # persisted, but nothing sent or applied
            return False
        for msg in rd.messages:
            self._send(msg)
        if rd.snapshot is not None:
            meta = rd.snapshot.meta
            node.sm.restore(rd.snapshot.data, meta.index)
            self._count("snapshot installed")
            self._check_chain(node, meta.index, meta.term, restored=True)
            node.proposals = {i: p for i, p in node.proposals.items() if i > meta.index}
        for entry in rd.committed:
            if entry.index != node.sm.index + 1:
                raise Violation(
                    "state-machine-safety",
                    f"{node.id} applies {entry.index} after {node.sm.index}",
                )
            node.sm.apply(entry)
            self._check_chain(node, entry.index, entry.term, restored=False)
            pending = node.proposals.pop(entry.index, None)
            if pending is not None:
                if pending[0] == entry.term:
                    self.acked += 1
                    self._count("write acked")
                    pending[1].ret = self._clock(0.6)
                else:
                    pending[1].failed = True  # another entry took its index
        for rs in rd.read_states:
            self._count("read answered")
            issued = node.reads.pop(rs.ctx, None)
            if issued is None:
                continue
            floor, op = issued
            if rs.index < floor:
                raise Violation(
                    "read-index-linearizable",
                    f"{node.id} answered read {rs.ctx!r} at index {rs.index} but {floor} "
                    "was already committed when the read began",
                )
            node.read_waits.append((rs.index, op))
        if node.read_waits:
            waiting = []
            for index, op in node.read_waits:
                if index <= node.sm.index:
                    value = node.sm.kv.get(op.key)
                    op.result = value.encode() if value is not None else None
                    op.ret = self._clock(0.6)
                else:
                    waiting.append((index, op))
            node.read_waits = waiting
        for ctx in rd.dropped_reads:
            dropped = node.reads.pop(ctx, None)
            if dropped is not None:
                dropped[1].failed = True
        for ev in rd.events:
            self._trace("event", node.id, ev)
        self._trace(
            "ready",
            node.id,
            core.term,
            core.role.name,
            core.commit_index,
            core.last_index,
            len(rd.entries),
            len(rd.messages),
            len(rd.committed),
        )
        core.advance(rd)
        return True

    def _check_chain(self, node: SimNode, index: int, term: int, *, restored: bool) -> None:
        chain = node.sm.chain
        if not restored and index < len(self.committed) and self.committed[index] != term:
            raise Violation(
                "state-machine-safety",
                f"{node.id} applied term {term} at {index}; term {self.committed[index]} "
                "was committed there",
            )
        if index < len(self.chains):
            if self.chains[index] != chain:
                raise Violation(
                    "state-machine-safety",
                    f"{node.id} {'restored' if restored else 'applied'} a different state at "
                    f"index {index} than other nodes",
                )
        elif restored:
            raise Violation(
                "state-machine-safety",
                f"{node.id} restored a snapshot at {index} beyond anything applied",
            )
        else:
            if index != len(self.chains):
                raise Violation("state-machine-safety", f"{node.id} applied {index} out of order")
            self.chains.append(chain)
            self.first_applied.append(self._clock(0.6))
            if index == len(self.committed):
                self.committed.append(term)

    def _record_commit(self, node: SimNode, commit: int) -> None:
        """A node persisted ``commit``: those entries are committed, forever, cluster-wide."""
        disk = node.disk
        top = min(commit, disk.last_index)
        for i in range(max(1, disk.snap_index + 1), top + 1):
            term = disk.term_at(i)
            assert term is not None
            if i < len(self.committed):
                if self.committed[i] != term:
                    raise Violation(
                        "committed-is-durable",
                        f"{node.id} persisted commit {commit} over term {term} at {i}, but "
                        f"term {self.committed[i]} was committed there",
                    )
            elif i == len(self.committed):
                self.committed.append(term)

    def _maybe_compact(self, node: SimNode, core: RaftCore) -> None:
        applied = core.applied_index
        if (
            node.slow_ready is not None
            or applied - core.log.snapshot_index < self.faults.compact_every
        ):
            return
        if node.sm.index != applied:
            return
        core.compact(applied, node.sm.encode())
        snap = core.log.snapshot
        assert snap is not None
        node.disk.compact(snap)
        self._trace("compact", node.id, applied)

    # ------------------------------------------------------------------ invariants per step

    def _check_leaders(self) -> None:
        for node, core in self._running():
            if core.role is not Role.LEADER:
                continue
            term = core.term
            holder = self.leaders.setdefault(term, node.id)
            if holder != node.id:
                raise Violation(
                    "election-safety", f"{holder} and {node.id} are both leaders of term {term}"
                )
            if term not in node.leader_terms:
                node.leader_terms.add(term)
                self._check_complete(node, core)
                if not self.liveness and self.rng.random() < self.faults.new_leader_crash:
                    # A leader dying a few steps into its term leaves uncommitted entries of
                    # several terms at the same indexes: the raw material of Raft's Figure 8.
                    node.crash_at = self.now + 1 + self.rng.randrange(6)

    def _check_complete(self, node: SimNode, core: RaftCore) -> None:
        log = core.log
        top = len(self.committed) - 1
        if log.last_index < top:
            raise Violation(
                "leader-completeness",
                f"{node.id} leads term {core.term} with log ending at {log.last_index}, but "
                f"{top} is committed",
            )
        for i in range(max(1, log.snapshot_index + 1), top + 1):
            if log.term(i) != self.committed[i]:
                raise Violation(
                    "leader-completeness",
                    f"{node.id} leads term {core.term} with term {log.term(i)} at {i}, "
                    f"committed term is {self.committed[i]}",
                )
        snap = log.snapshot
        if (
            snap is not None
            and 0 < snap.meta.index <= top
            and snap.meta.term != self.committed[snap.meta.index]
        ):
            raise Violation("leader-completeness", f"{node.id} holds a foreign snapshot")

    # ------------------------------------------------------------------ faults and client

    def _faults_step(self) -> None:
        f, rng = self.faults, self.rng
        if self.cut and self.now >= self.heal_at:
            self.cut = set()
            self._trace("heal")
        if self.clogged and self.now >= self.unclog_at:
            self.clogged = set()
            self._trace("unclog")
        if not self.cut and rng.random() < f.partition_rate:
            kind = rng.randrange(3)
            if kind == 0:  # two halves
                side = set(rng.sample(self.ids, rng.randrange(1, len(self.ids))))
                self.cut = {
                    (a, b) for a in self.ids for b in self.ids if (a in side) != (b in side)
                }
            elif kind == 1:  # isolate one node (often the leader)
                leaders = [n.id for n, c in self._running() if c.role is Role.LEADER]
                victim = (
                    rng.choice(leaders) if leaders and rng.random() < 0.6 else rng.choice(self.ids)
                )
                self.cut = {
                    (a, b) for a in self.ids for b in self.ids if victim in (a, b) and a != b
                }
            else:  # one-way cuts
                self.cut = {tuple(rng.sample(self.ids, 2)) for _ in range(3)}  # type: ignore[misc]
            self.heal_at = self.now + 5 + rng.randrange(40)
            self._trace("partition", sorted(self.cut))
        if not self.clogged and rng.random() < f.clog_rate:
            a, b = rng.sample(self.ids, 2)
            self.clogged = {(a, b), (b, a)}
            self.unclog_at = self.now + 10 + rng.randrange(40)
            self._trace("clog", a, b)
        for nid in self.ids:
            node = self.nodes[nid]
            if node.core is None and self.now >= node.down_until:
                self._restart(node)
        for nid in self.ids:
            node = self.nodes[nid]
            if node.core is not None and node.crash_at == self.now:
                self._crash(node, rng.randrange(25))
        if rng.random() < f.crash_rate:
            leading = [n for n, c in self._running() if c.role is Role.LEADER]
            up = [n for n, _ in self._running()]
            if up:
                pick = leading if leading and rng.random() < 0.5 else up
                self._crash(rng.choice(pick), 1 + rng.randrange(30))
        if rng.random() < 0.01:
            slow = self.nodes[rng.choice(self.ids)]
            slow.slow_ticks = not slow.slow_ticks
            self._trace("slow-ticks", slow.id, slow.slow_ticks)

    def _leader(self) -> tuple[SimNode, RaftCore] | None:
        best: tuple[SimNode, RaftCore] | None = None
        for node, core in self._running():
            if core.role is Role.LEADER and (best is None or core.term > best[1].term):
                best = (node, core)
        return best

    def _clock(self, phase: float) -> float:
        """History time: the step, the phase within it, then a counter for event order."""
        self.tick_events += 1
        return self.now + phase + self.tick_events * 1e-7

    def _propose(self, node: SimNode, core: RaftCore) -> None:
        self.key_seq += 1
        key = f"k{self.key_seq % 7}"
        value = f"v{self.key_seq}"
        data = f"{self.key_seq}|{key}|{value}".encode()
        try:
            term, index = core.propose(data)
        except ConsensusError as exc:
            self._trace("propose-refused", node.id, type(exc).__name__)
            return
        op = HistOp("put", key, value.encode(), self._clock(0.3), index=index, term=term)
        self.history.append(op)
        node.proposals[index] = (term, op)
        self._trace("propose", node.id, term, index)

    def _client_step(self) -> None:
        f, rng = self.faults, self.rng
        found = self._leader()
        if found is not None and rng.random() < 0.5:
            # Clients with stale routing keep talking to a deposed (e.g. isolated) leader.
            leaders = [(n, c) for n, c in self._running() if c.role is Role.LEADER]
            found = rng.choice(leaders)
        if found is None:
            if rng.random() < 0.1:  # a client talking to a non-leader gets NotLeader
                node = self.nodes[rng.choice(self.ids)]
                if node.core is not None:
                    self._propose(node, node.core)
            return
        node, core = found
        if rng.random() < f.propose_rate:
            for _ in range(1 + rng.randrange(3)):
                self._propose(node, core)
        if rng.random() < f.read_rate:
            self.read_seq += 1
            key = f"k{self.read_seq % 7}"
            ctx = f"r{self.read_seq}|{key}".encode()
            try:
                core.read_index(ctx)
                op = HistOp("get", key, None, self._clock(0.3))
                self.history.append(op)
                node.reads[ctx] = (len(self.committed) - 1, op)
                self._trace("read", node.id, ctx)
            except ConsensusError as exc:
                self._trace("read-refused", node.id, type(exc).__name__)
        if rng.random() < f.conf_rate:
            self._conf_change(node, core)
        if rng.random() < f.transfer_rate:
            voters = sorted(core.membership.voters - {node.id})
            if voters:
                target = rng.choice(voters)
                try:
                    core.transfer_leadership(target)
                    self._trace("transfer", node.id, "->", target)
                except ConsensusError as exc:
                    self._trace("transfer-refused", node.id, type(exc).__name__)

    def _conf_change(self, node: SimNode, core: RaftCore) -> None:
        rng = self.rng
        m = core.membership
        options: list[ConfChange] = []
        spares = [n for n in self.ids if n not in m.members]
        if spares:
            options.append(ConfChange(ConfChangeOp.ADD_LEARNER, rng.choice(spares)))
        if m.learners and len(m.voters) < 5:
            options.append(ConfChange(ConfChangeOp.PROMOTE, rng.choice(sorted(m.learners))))
        if len(m.voters) > 3 or (m.learners and rng.random() < 0.3):
            options.append(
                ConfChange(ConfChangeOp.REMOVE, rng.choice(sorted(m.voters | m.learners)))
            )
        if not options:
            return
        change = rng.choice(options)
        try:
            core.propose_conf_change(change)
        except ConsensusError as exc:
            self._trace("conf-refused", node.id, change.op.name, change.node_id, exc)
            return
        self._trace("conf", node.id, change.op.name, change.node_id)
        if change.op is ConfChangeOp.ADD_LEARNER:
            target = self.nodes[change.node_id]
            if target.disk.snapshot is not None or target.disk.entries:
                self._wipe(target)

    # ------------------------------------------------------------------ the run

    def _step(self) -> None:
        self.now += 1
        self.tick_events = 0
        if not self.liveness:
            self._faults_step()
        self._deliver()
        for node, core in self._running():
            if node.slow_ticks and not self.liveness and self.rng.random() < 0.5:
                continue
            core.tick()
        if not self.liveness:
            self._client_step()
        for node, _core in self._running():
            self._process(node)
        self._check_leaders()

    def _heal_all(self) -> None:
        self.liveness = True
        self.cut = set()
        self.clogged = set()
        for nid in self.ids:
            node = self.nodes[nid]
            node.slow_ticks = False
            if node.core is None:
                self._restart(node)
        self._trace("liveness-phase")

    def _liveness(self) -> None:
        """Heal everything; a leader must commit a new write and every member must apply it.

        The bound is on progress, not on total time: a seed whose fault phase left a backlog
        of hundreds of entries, replicated one entry per message, legitimately needs longer.
        Failing = no node applied anything new for STALL_STEPS steps (or the hard cap).
        """
        self._heal_all()
        target: tuple[str, int, int] | None = None
        last_progress = self.now
        progress_mark = -1
        for _ in range(LIVENESS_MAX_STEPS):
            self._step()
            mark = sum(c.applied_index + c.last_index for _, c in self._running())
            if mark != progress_mark:
                progress_mark, last_progress = mark, self.now
            elif self.now - last_progress > STALL_STEPS:
                break
            found = self._leader()
            if found is None:
                continue
            node, core = found
            if target is None or target[0] != node.id or core.term != target[1]:
                try:
                    term, index = core.propose(f"0|live|{self.now}".encode())
                except ConsensusError:
                    continue
                target = (node.id, term, index)
                continue
            _, term, index = target
            members = core.membership.members
            done = all(
                (c := self.nodes[m].core) is not None and c.applied_index >= index for m in members
            )
            if done and core.applied_index >= index and core.log.term(index) == term:
                self._check_complete(node, core)
                return
        state = {
            n.id: (c.role.name, c.term, c.commit_index, c.applied_index, c.last_index)
            for n, c in self._running()
        }
        raise Violation(
            "liveness",
            f"after healing, no progress for {STALL_STEPS} steps (or {LIVENESS_MAX_STEPS} "
            f"steps in all) before a new write reached every member (target {target}; "
            f"nodes {state})",
        )

    def run(self) -> int:
        """Run the seed; raises Violation. Returns the trace hash."""
        self._trace("faults", self.faults)
        self._trace("config", self.config)
        try:
            for _ in range(FAULT_STEPS):
                self._step()
            self._liveness()
            self._check_linearizable()
        except Violation:
            raise
        except (AssertionError, ValueError, RuntimeError, KeyError, CodecError) as exc:
            raise Violation("core-crash", f"{type(exc).__name__}: {exc}") from exc
        return self.trace_hash

    def _check_linearizable(self) -> None:
        """Every completed client write/read must fit one sequential KV history."""
        lincheck = LINCHECK
        if lincheck is None:
            return
        for op in self.history:
            if op.kind != "put" or op.failed:
                continue
            # A Raft write takes effect when its entry is first applied anywhere: the check
            # pins each write to that instant (inside its real call..return window), which
            # is stricter than plain linearizability and keeps the search linear even when
            # dozens of writes to a key are in flight. If the proposer never saw the outcome
            # (it crashed or lost leadership), the cluster knows: committed with its term ->
            # it happened; otherwise (overwritten, or never committed before the run ended,
            # so invisible to every read) it did not.
            committed = op.index < len(self.committed) and self.committed[op.index] == op.term
            if committed and op.index < len(self.first_applied):
                at = self.first_applied[op.index]
                if at < op.call or (op.ret is not None and at > op.ret):
                    raise Violation(
                        "linearizability",
                        f"write {op.value!r} was applied outside its call..return window",
                    )
                op.call, op.ret = at - 1e-9, at
            else:
                op.failed = True
        ops = [
            lincheck.Op(
                client=f"c{i}",
                key=op.key,
                kind=lincheck.OpKind.PUT if op.kind == "put" else lincheck.OpKind.GET,
                value=op.value,
                result=op.result,
                call=op.call,
                ret=op.ret,
            )
            for i, op in enumerate(self.history)
            if not op.failed and (op.kind == "put" or op.ret is not None)
        ]
        result = lincheck.check(ops, max_steps_per_key=200_000)
        self.stats["lincheck ops"] = self.stats.get("lincheck ops", 0) + len(ops)
        if result.unknown_keys:
            # Too costly to decide: not a proof either way, so counted rather than failed.
            self.stats["lincheck undecided keys"] = len(result.unknown_keys)
        if result.failed_keys:
            raise Violation(
                "linearizability",
                f"client history not linearizable for keys {result.failed_keys}",
            )


def run_seed(seed: int, n_nodes: int, bugs: frozenset[str], verbose: bool = False) -> int:
    return Simulation(seed, n_nodes, bugs, verbose).run()


@attrs.frozen
class SeedResult:
    seed: int
    invariant: str | None
    detail: str
    trace: tuple[str, ...]
    stats: dict[str, int] = attrs.field(factory=dict)


def check_seed(
    seed: int, n_nodes: int, bugs: frozenset[str], determinism: bool, verbose: bool = False
) -> SeedResult:
    sim = Simulation(seed, n_nodes, bugs, verbose)
    try:
        first = sim.run()
    except Violation as exc:
        return SeedResult(seed, exc.invariant, exc.detail, tuple(sim.trace), sim.stats)
    if determinism:
        again = Simulation(seed, n_nodes, bugs)
        try:
            second = again.run()
        except Violation as exc:
            return SeedResult(seed, "determinism", f"second run failed: {exc}", tuple(again.trace))
        if second != first:
            return SeedResult(
                seed, "determinism", f"trace hash {first:#x} then {second:#x}", tuple(again.trace)
            )
    return SeedResult(seed, None, "", (), sim.stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2porch.consensus.sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--nodes", type=int, default=5, help="nodes per cluster (>= 1)")
    parser.add_argument(
        "--bug", action="append", default=[], choices=sorted(KNOWN_BUGS), help="break the core"
    )
    parser.add_argument(
        "--determinism-every",
        type=int,
        default=10,
        help="re-run every Nth seed to compare trace hashes (0: never)",
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first violation")
    parser.add_argument("--verbose", action="store_true", help="print every trace line")
    parser.add_argument("--stats", action="store_true", help="print event counts over all seeds")
    parser.add_argument("--trace-hash", action="store_true", help="print each seed's hash")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    bugs = frozenset(args.bug)
    violations = 0
    ran = 0
    totals: dict[str, int] = {}
    for seed in range(args.start, args.start + args.seeds):
        every = args.determinism_every
        determinism = every > 0 and (seed - args.start) % every == 0
        result = check_seed(seed, args.nodes, bugs, determinism, args.verbose)
        ran += 1
        for key, count in result.stats.items():
            totals[key] = totals.get(key, 0) + count
        if args.trace_hash and result.invariant is None:
            print(f"seed={seed} hash={run_seed(seed, args.nodes, bugs):#010x}")
        if result.invariant is not None:
            violations += 1
            if violations == 1:
                print(f"FAILED seed={seed} invariant={result.invariant}")
                print(f"  {result.detail}")
                print(f"  trace tail (last {len(result.trace)} lines):")
                for line in result.trace:
                    print(f"    {line}")
                print(
                    f"  reproduce: python -m p2porch.consensus.sim --seeds 1 --start {seed} "
                    f"--nodes {args.nodes}" + "".join(f" --bug {b}" for b in sorted(bugs))
                )
            if args.fail_fast:
                break
    if args.stats:
        for key in sorted(totals):
            print(f"  {key:32} {totals[key]:>10} ({totals[key] / max(ran, 1):.1f}/seed)")
    print(f"seeds={ran} violations={violations}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
