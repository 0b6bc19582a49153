"""The tickless ticker of RaftService: real services over in-memory streams, virtual time.

What it must keep: election timeouts measured on the wall clock (here: trio's virtual clock)
exactly as a per-tick loop would, and every heartbeat on time. What it must gain: an idle
follower does not wake up for time at all while its leader's heartbeats arrive.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from p2porch.consensus.config import RaftConfig
from p2porch.consensus.kv import KvStateMachine
from p2porch.consensus.messages import Membership, Role
from p2porch.consensus.service import RaftService, ServiceConfig
from p2porch.consensus.storage import Storage
from p2porch.consensus.transport import MemoryNetwork

LAN = ServiceConfig(raft=RaftConfig.lan(), storage_in_thread=False)
THREE = Membership(frozenset({"a", "b", "c"}))


class Nodes:
    def __init__(self, nursery: trio.Nursery, root: Path) -> None:
        self.nursery = nursery
        self.root = root
        self.network = MemoryNetwork()
        self.services: dict[str, RaftService] = {}

    async def start(self, node_id: str) -> RaftService:
        service = RaftService(
            node_id,
            config=LAN,
            storage=Storage.open(self.root / node_id),
            state_machine=KvStateMachine(),
            transport=self.network.transport(f"mem-{node_id}:1"),
            listen=f"mem-{node_id}:1",
            peers={n: f"mem-{n}:1" for n in "abc"},
            bootstrap=THREE,
            rng=random.Random(node_id),
        )
        await self.nursery.start(service.run)
        self.services[node_id] = service
        return service

    def leaders(self) -> list[RaftService]:
        return [s for s in self.services.values() if s.core.role is Role.LEADER]

    async def one_leader(self) -> RaftService:
        while len(self.leaders()) != 1:
            await trio.sleep(0.01)
        return self.leaders()[0]


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    async with trio.open_nursery() as nursery:
        yield Nodes(nursery, tmp_path)
        nursery.cancel_scope.cancel()


async def test_idle_followers_never_wake_for_time_and_the_leader_once_per_heartbeat(
    nodes: Nodes, autojump_clock: trio.testing.MockClock
) -> None:
    for node_id in "abc":
        await nodes.start(node_id)
    leader = await nodes.one_leader()
    await trio.sleep(3)
    term = leader.core.term
    before = {n: s.counters.timer_wakeups for n, s in nodes.services.items()}
    idle_s = 30.0
    await trio.sleep(idle_s)
    assert nodes.leaders() == [leader] and all(s.core.term == term for s in nodes.services.values())
    woke = {n: s.counters.timer_wakeups - before[n] for n, s in nodes.services.items()}
    heartbeat_s = LAN.raft.heartbeat_ticks * LAN.raft.tick_interval_s
    assert 0.9 * idle_s / heartbeat_s <= woke.pop(leader.node_id) <= 1.1 * idle_s / heartbeat_s
    assert woke == {n: 0 for n in woke}  # a per-tick loop: idle_s / tick_interval_s each


async def test_a_dead_leaders_successor_comes_after_an_election_timeout(
    nodes: Nodes, autojump_clock: trio.testing.MockClock
) -> None:
    for node_id in "abc":
        await nodes.start(node_id)
    old = await nodes.one_leader()
    await trio.sleep(2.05)
    old.stop()
    del nodes.services[old.node_id]
    stopped_at = trio.current_time()
    new = await nodes.one_leader()
    took = trio.current_time() - stopped_at
    raft = LAN.raft
    # The followers last heard from it at most one heartbeat before the stop; the timeout is
    # drawn from [election_ticks, 2 * election_ticks) ticks; votes travel instantly here.
    earliest = (raft.election_ticks - raft.heartbeat_ticks) * raft.tick_interval_s
    latest = 2 * raft.election_ticks * raft.tick_interval_s
    assert earliest <= took <= latest
    assert new.node_id != old.node_id


async def test_election_timeout_falls_on_the_due_tick_of_the_grid(
    nodes: Nodes, mock_clock: trio.testing.MockClock
) -> None:
    # Alone (its peers never start), a node campaigns exactly when its timeout runs out.
    service = await nodes.start("a")
    due = service.core.ticks_until_due()
    assert due is not None
    tick = LAN.raft.tick_interval_s + 1e-9  # a hair over: the virtual clock adds up floats
    for _ in range(due - 1):
        mock_clock.jump(tick)
        await trio.testing.wait_all_tasks_blocked()
    assert service.core.role is Role.FOLLOWER
    mock_clock.jump(tick)
    await trio.testing.wait_all_tasks_blocked()
    assert service.status().role is Role.PRE_CANDIDATE


async def test_a_stalled_node_gets_its_overdue_timeout_one_tick_later(
    nodes: Nodes, mock_clock: trio.testing.MockClock
) -> None:
    service = await nodes.start("a")
    tick = LAN.raft.tick_interval_s + 1e-9  # a hair over: the virtual clock adds up floats
    mock_clock.jump(tick)
    await trio.testing.wait_all_tasks_blocked()
    # The process "stalls" for 5 s: far past the timeout. Whatever piled up meanwhile (for a
    # follower: its leader's heartbeats) is handled before the timeout may fire...
    mock_clock.jump(5.0)
    await trio.testing.wait_all_tasks_blocked()
    assert service.core.role is Role.FOLLOWER
    # ...which it then does at the next point of the grid, not a whole timeout later.
    mock_clock.jump(tick)
    await trio.testing.wait_all_tasks_blocked()
    assert service.status().role is Role.PRE_CANDIDATE
