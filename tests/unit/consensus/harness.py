"""A tiny synchronous cluster for scripted scenarios: instant delivery, optional filters.

Each node's "disk" is its last PersistentState-equivalent (hard state, snapshot, entries);
the shell order (persist, send, apply, advance) is followed exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from p2porch.consensus.config import RaftConfig
from p2porch.consensus.core import RaftCore
from p2porch.consensus.messages import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    Message,
    PersistentState,
    ReadState,
    Snapshot,
)

Filter = Callable[[Message], bool]  # True = deliver


class Disk:
    def __init__(self, state: PersistentState) -> None:
        self.hard_state = state.hard_state
        self.snapshot = state.snapshot
        self.entries: list[Entry] = list(state.entries)

    def state(self) -> PersistentState:
        return PersistentState(self.hard_state, self.snapshot, tuple(self.entries))


class Node:
    def __init__(self, node_id: str, config: RaftConfig, state: PersistentState, seed: int):
        self.id = node_id
        self.config = config
        self.seed = seed
        self.disk = Disk(state)
        self.core = RaftCore(node_id, config, random.Random(seed), state)
        self.applied: list[Entry] = []
        self.read_states: list[ReadState] = []
        self.dropped_reads: list[bytes] = []
        self.events: list[object] = []
        self.sm_snapshot: bytes | None = None

    def restart(self) -> None:
        self.core = RaftCore(self.id, self.config, random.Random(self.seed + 1), self.disk.state())
        self.applied = []


class Cluster:
    def __init__(
        self,
        voters: list[str],
        learners: tuple[str, ...] = (),
        empty: tuple[str, ...] = (),
        config: RaftConfig | None = None,
    ) -> None:
        self.config = config or RaftConfig(election_ticks=10, heartbeat_ticks=1, pre_vote=True)
        membership = Membership(frozenset(voters), frozenset(learners))
        self.nodes: dict[str, Node] = {}
        for i, nid in enumerate([*voters, *learners]):
            self.nodes[nid] = Node(nid, self.config, PersistentState.bootstrap(membership), i)
        for i, nid in enumerate(empty):
            self.nodes[nid] = Node(nid, self.config, PersistentState.empty(), 100 + i)
        self.filters: list[Filter] = []
        self.down: set[str] = set()
        self.queue: list[Message] = []
        self.sent: list[Message] = []

    # ------------------------------------------------------------------ driving

    def core(self, nid: str) -> RaftCore:
        return self.nodes[nid].core

    def process_ready(self, nid: str) -> None:
        node = self.nodes[nid]
        while node.core.has_ready():
            rd = node.core.ready()
            disk = node.disk
            if rd.snapshot is not None:
                disk.snapshot = rd.snapshot
                disk.entries = []
                node.sm_snapshot = rd.snapshot.data
            if rd.entries:
                first = rd.entries[0].index
                disk.entries = [e for e in disk.entries if e.index < first]
                disk.entries.extend(rd.entries)
            if rd.hard_state is not None:
                disk.hard_state = rd.hard_state
            self.queue.extend(rd.messages)
            self.sent.extend(rd.messages)
            node.applied.extend(rd.committed)
            node.read_states.extend(rd.read_states)
            node.dropped_reads.extend(rd.dropped_reads)
            node.events.extend(rd.events)
            node.core.advance(rd)

    def deliver_all(self, max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            for nid in sorted(self.nodes):
                if nid not in self.down:
                    self.process_ready(nid)
            if not self.queue:
                return
            batch, self.queue = self.queue, []
            for msg in batch:
                if msg.dst in self.down or msg.src in self.down or msg.dst not in self.nodes:
                    continue
                if all(f(msg) for f in self.filters):
                    self.nodes[msg.dst].core.step(msg)
        raise AssertionError("messages did not settle")

    def tick(self, n: int = 1, nodes: list[str] | None = None) -> None:
        for _ in range(n):
            for nid in nodes or sorted(self.nodes):
                if nid not in self.down:
                    self.nodes[nid].core.tick()
            self.deliver_all()

    def elect(self, nid: str) -> None:
        """Make ``nid`` campaign now (as if its election timeout fired) and settle."""
        core = self.core(nid)
        for _ in range(100):
            if core.role.name == "LEADER":
                self.deliver_all()
                return
            core.tick()
            self.deliver_all()
        raise AssertionError(f"{nid} did not become leader")

    def leader(self) -> str | None:
        leaders = [
            n
            for n, node in self.nodes.items()
            if node.core.role.name == "LEADER" and n not in self.down
        ]
        return leaders[0] if len(leaders) == 1 else None

    def isolate(self, nid: str) -> Filter:
        f: Filter = lambda m: m.src != nid and m.dst != nid  # noqa: E731
        self.filters.append(f)
        return f

    def heal(self) -> None:
        self.filters = []

    def propose(self, nid: str, data: bytes) -> tuple[int, int]:
        result = self.core(nid).propose(data)
        self.deliver_all()
        return result

    def applied_data(self, nid: str) -> list[bytes]:
        return [e.data for e in self.nodes[nid].applied if e.kind is EntryKind.NORMAL]


def make_snapshot_state(
    hs: HardState, snap: Snapshot, entries: tuple[Entry, ...]
) -> PersistentState:
    return PersistentState(hs, snap, entries)
