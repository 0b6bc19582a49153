"""Tier-3 shell tests: real RaftService instances over in-memory streams, virtual time."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from p2porch.common import codec
from p2porch.consensus.errors import NotLeader
from p2porch.consensus.kv import KvCas, KvCommand, KvGet, KvPut, KvResult, KvStateMachine
from p2porch.consensus.lincheck import Op, OpKind, check
from p2porch.consensus.messages import Membership, Role
from p2porch.consensus.service import (
    ProposalLost,
    RaftService,
    RequestTimeout,
    ServiceConfig,
    ServiceStopped,
)
from p2porch.consensus.storage import DiskFull, Storage, StorageError
from p2porch.consensus.transport import (
    MemoryNetwork,
    MemoryTransport,
    StreamHandler,
    Transport,
    encode_frame,
)

CONFIG = ServiceConfig.local()
CONFIG = ServiceConfig(raft=CONFIG.raft, storage_in_thread=False, request_timeout_s=3.0)


class Cluster:
    def __init__(self, nursery: trio.Nursery, root: Path, config: ServiceConfig = CONFIG) -> None:
        self.nursery = nursery
        self.root = root
        self.config = config
        self.network = MemoryNetwork()
        self.nodes: dict[str, RaftService] = {}
        self.machines: dict[str, KvStateMachine] = {}
        self.addresses: dict[str, str] = {}
        self.seq = 0
        self.crashed: dict[str, StorageError] = {}
        self.wrap: Callable[[MemoryTransport], Transport] = lambda t: t

    def address(self, node_id: str) -> str:
        return self.addresses.setdefault(node_id, f"mem-{node_id}:1")

    async def start(self, node_id: str, bootstrap: Membership | None) -> RaftService:
        machine = KvStateMachine()
        service = RaftService(
            node_id,
            config=self.config,
            storage=Storage.open(self.root / node_id, segment_bytes=8192),
            state_machine=machine,
            transport=self.wrap(self.network.transport(self.address(node_id))),
            listen=self.address(node_id),
            peers={n: self.address(n) for n in "abcde"},
            bootstrap=bootstrap,
            rng=random.Random(node_id),
        )
        await self.nursery.start(self._run, service)
        self.nodes[node_id] = service
        self.machines[node_id] = machine
        return service

    async def _run(self, service: RaftService, task_status: trio.TaskStatus[str]) -> None:
        try:
            await service.run(task_status=task_status)
        except StorageError as exc:
            self.crashed[service.node_id] = exc

    def stop(self, node_id: str) -> None:
        self.nodes.pop(node_id).stop()

    async def leader(self, timeout_s: float = 10.0) -> RaftService:
        with trio.fail_after(timeout_s):
            while True:
                leaders = [s for s in self.nodes.values() if s.core.role is Role.LEADER]
                if len(leaders) == 1:
                    return leaders[0]
                await trio.sleep(0.05)

    async def put(self, key: str, value: bytes) -> KvResult:
        return await self.command(KvPut(key, value))

    async def command(self, op: KvPut | KvGet | KvCas) -> KvResult:
        self.seq += 1
        data = codec.encode(KvCommand("test", self.seq, op))
        with trio.fail_after(20):
            while True:
                leader = await self.leader()
                try:
                    result = await leader.propose(data)
                except (NotLeader, ServiceStopped):
                    await trio.sleep(0.1)
                    continue
                assert isinstance(result, KvResult)
                return result

    async def converged(self, timeout_s: float = 10.0) -> None:
        with trio.fail_after(timeout_s):
            while True:
                applied = {s.applied_index for s in self.nodes.values()}
                commit = max(s.core.commit_index for s in self.nodes.values())
                if len(applied) == 1 and applied.pop() >= commit:
                    return
                await trio.sleep(0.05)


@pytest.fixture(params=[False, True], ids=["persist-then-send", "leader-parallel-append"])
async def cluster(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    config = ServiceConfig(
        raft=CONFIG.raft,
        storage_in_thread=False,
        request_timeout_s=3.0,
        leader_parallel_append=request.param,
    )
    async with trio.open_nursery() as nursery:
        yield Cluster(nursery, tmp_path, config)
        nursery.cancel_scope.cancel()


THREE = Membership(frozenset({"a", "b", "c"}))


async def start_three(cluster: Cluster) -> None:
    for node_id in "abc":
        await cluster.start(node_id, THREE)


async def test_three_nodes_elect_commit_and_apply_everywhere(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    leader = await cluster.leader()
    for i in range(20):
        assert (await cluster.put(f"k{i}", b"v%d" % i)).ok
    cas = await cluster.command(KvCas("k1", b"v1", b"new"))
    assert cas.ok
    await cluster.converged()
    for machine in cluster.machines.values():
        assert machine.get("k1") == b"new"
        assert machine.get("k19") == b"v19"
    if cluster.config.leader_parallel_append:
        assert leader.counters.early_messages > 0
    else:
        assert all(s.counters.early_messages == 0 for s in cluster.nodes.values())
    follower = next(s for s in cluster.nodes.values() if s is not leader)
    with pytest.raises(NotLeader) as info:
        await follower.propose(b"x")
    assert info.value.leader_hint == leader.node_id


async def test_survives_leader_loss_and_restart_catches_up(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    old = await cluster.leader()
    assert (await cluster.put("before", b"1")).ok
    cluster.stop(old.node_id)
    new = await cluster.leader()
    assert new.node_id != old.node_id
    for i in range(10):
        assert (await cluster.put(f"during{i}", b"2")).ok
    # Restart the old leader from its disk: it recovers and catches up.
    await trio.sleep(1)
    restarted = await cluster.start(old.node_id, THREE)
    await cluster.converged()
    machine = cluster.machines[restarted.node_id]
    assert machine.get("before") == b"1"
    assert machine.get("during9") == b"2"


async def test_linearizable_read_barrier(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    leader = await cluster.leader()
    assert (await cluster.put("r", b"1")).ok
    index = await leader.read_barrier()
    assert index >= 1
    assert cluster.machines[leader.node_id].get("r") == b"1"
    follower = next(s for s in cluster.nodes.values() if s is not leader)
    with pytest.raises(NotLeader):
        await follower.read_barrier()


async def test_snapshot_and_new_learner_catches_up(tmp_path: Path, autojump_clock: object) -> None:
    config = ServiceConfig(raft=CONFIG.raft, storage_in_thread=False, snapshot_every_entries=25)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, config)
        await start_three(cluster)
        for i in range(60):
            assert (await cluster.put(f"k{i}", b"v%d" % i)).ok
        leader = await cluster.leader()
        assert leader.counters.snapshots_taken >= 2
        assert leader.core.log.snapshot_index >= 50
        # A brand-new node joins empty and can only catch up through InstallSnapshot.
        learner = await cluster.start("d", None)
        await leader.add_learner("d", cluster.address("d"))
        await cluster.converged()
        assert learner.counters.snapshots_installed == 1
        assert cluster.machines["d"].items() == cluster.machines[leader.node_id].items()
        assert learner.core.membership.learners == frozenset({"d"})
        await leader.promote("d")
        assert (await cluster.put("after", b"x")).ok
        await cluster.converged()
        assert cluster.machines["d"].get("after") == b"x"
        assert learner.core.membership.voters == frozenset("abcd")
        # The learner restarts from its own disk (snapshot + WAL) and still has everything.
        cluster.stop("d")
        await trio.sleep(1)
        await cluster.start("d", None)
        await cluster.converged()
        assert cluster.machines["d"].get("k59") == b"v59"
        nursery.cancel_scope.cancel()


async def test_leader_transfer(cluster: Cluster, autojump_clock: trio.testing.MockClock) -> None:
    await start_three(cluster)
    leader = await cluster.leader()
    assert (await cluster.put("t", b"1")).ok
    target = next(n for n in "abc" if n != leader.node_id)
    assert await leader.transfer_leadership(target)
    assert (await cluster.leader()).node_id == target


async def test_garbage_from_a_peer_is_dropped_and_counted(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    await cluster.leader()
    victim = cluster.nodes["a"]
    transport = cluster.network.transport("mem-evil:1")
    stream = await transport.connect(cluster.address("a"))
    await stream.send_all(encode_frame(b"\xc1\xc1 not msgpack"))
    stream2 = await transport.connect(cluster.address("a"))
    await stream2.send_all(b"\xff\xff\xff\xff" + b"x" * 100)  # 4 GiB frame announced
    stream3 = await transport.connect(cluster.address("a"))
    await stream3.send_all(encode_frame(codec.encode(KvPut("k", b"v"))))  # wrong record
    await trio.sleep(1)
    assert victim.counters.bad_messages == 2
    assert victim.counters.bad_frames == 1
    assert (await cluster.put("still", b"fine")).ok


async def test_idle_cluster_writes_nothing(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    await cluster.leader()
    assert (await cluster.put("x", b"1")).ok
    await cluster.converged()
    await trio.sleep(2)
    before = {n: s.storage.stats() for n, s in cluster.nodes.items()}
    await trio.sleep(30)  # hundreds of ticks and heartbeats
    after = {n: s.storage.stats() for n, s in cluster.nodes.items()}
    assert before == after


async def test_storage_failure_stops_the_node(
    tmp_path: Path, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path)
        await start_three(cluster)
        leader = await cluster.leader()
        sent_before = leader.counters.batches

        def full(*args: object, **kwargs: object) -> None:
            raise DiskFull("disk full while appending: [Errno 28] No space left on device")

        monkeypatch.setattr(leader.storage, "save", full)
        with pytest.raises(ServiceStopped):
            await leader.propose(codec.encode(KvCommand("", 0, KvPut("lost", b"1"))))
        assert isinstance(leader.fatal_error, DiskFull)
        await trio.sleep(0.1)
        assert isinstance(cluster.crashed[leader.node_id], DiskFull)
        assert leader.counters.batches == sent_before
        with pytest.raises(ServiceStopped):
            await leader.propose(b"again")
        nursery.cancel_scope.cancel()


async def test_removing_the_leader_hands_over(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    await start_three(cluster)
    leader = await cluster.leader()
    assert (await cluster.put("r", b"1")).ok
    await leader.remove(leader.node_id)
    remaining = [n for n in "abc" if n != leader.node_id]
    with trio.fail_after(10):
        while True:
            new = await cluster.leader()
            if new.node_id in remaining:
                break
            await trio.sleep(0.1)
    assert new.core.membership.voters == frozenset(remaining)
    cluster.stop(leader.node_id)
    assert (await cluster.put("after-removal", b"2")).ok
    await cluster.converged()
    for node_id in remaining:
        assert cluster.machines[node_id].get("after-removal") == b"2"


class _BlackHoleStream(trio.abc.Stream):
    """A peer that accepts the connection and then never reads: send_all blocks forever."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep_forever()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep_forever()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _StuckPeerTransport:
    def __init__(self, inner: MemoryTransport, stuck: str) -> None:
        self.inner = inner
        self.stuck = stuck

    async def connect(self, address: str) -> trio.abc.Stream:
        if address == self.stuck:
            await trio.lowlevel.checkpoint()
            return _BlackHoleStream()
        return await self.inner.connect(address)

    async def serve(
        self,
        address: str,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.inner.serve(address, handler, task_status=task_status)


async def test_stuck_peer_fills_its_bounded_queue_and_is_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = ServiceConfig(raft=CONFIG.raft, storage_in_thread=False, send_queue_messages=8)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, tmp_path, config)
        cluster.wrap = lambda inner: _StuckPeerTransport(inner, cluster.address("c"))
        await cluster.start("a", THREE)
        await cluster.start("b", THREE)  # c never reads anything it is sent
        for i in range(30):
            assert (await cluster.put(f"k{i}", b"v")).ok
        await trio.sleep(5)
        leader = await cluster.leader()
        assert leader.counters.send_queue_drops > 0
        assert leader.counters.send_failures > 0  # stuck sends time out; the link is redialled
        assert (await cluster.put("still", b"ok")).ok
        nursery.cancel_scope.cancel()


async def test_concurrent_reads_share_rounds_and_history_is_linearizable(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    """Writers and ReadIndex readers on one key, the leader killed midway: lincheck agrees."""
    await start_three(cluster)
    await cluster.leader()
    history: list[Op] = []
    seq = itertools.count(1)
    # Virtual time barely moves (memory streams, no fsync), so timestamps come from one
    # counter: in a single trio thread its order IS the real-time order of calls and returns.
    clock = itertools.count()

    def now() -> float:
        return float(next(clock))

    async def writer(name: str) -> None:
        for n in range(15):
            value = b"%s-%d" % (name.encode(), n)
            call = now()
            data = codec.encode(KvCommand(name, next(seq), KvPut("k", value)))
            try:
                leader = await cluster.leader()
                await leader.propose(data)
            except (NotLeader, ServiceStopped, ProposalLost, RequestTimeout):
                history.append(Op(name, "k", OpKind.PUT, value, None, call, None))
                await trio.sleep(0.2)
                continue
            history.append(Op(name, "k", OpKind.PUT, value, None, call, now()))
            if len(history) >= 40:
                milestone.set()

    async def reader(name: str) -> None:
        for _ in range(25):
            call = now()
            try:
                leader = await cluster.leader()
                await leader.read_barrier()
            except (NotLeader, ServiceStopped, RequestTimeout):
                await trio.sleep(0.1)
                continue
            value = cluster.machines[leader.node_id].get("k")
            history.append(Op(name, "k", OpKind.GET, None, value, call, now()))

    killed_at: list[float] = []
    milestone = trio.Event()  # virtual time stands still under load: wake the killer by event

    async def killer() -> None:
        await milestone.wait()
        cluster.stop((await cluster.leader()).node_id)
        killed_at.append(now())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(killer)
        for i in range(3):
            nursery.start_soon(writer, f"w{i}")
        for i in range(6):
            nursery.start_soon(reader, f"r{i}")
    reads = [op for op in history if op.kind is OpKind.GET]
    assert len(reads) > 50
    assert killed_at and any(op.call > killed_at[0] for op in history)  # load went on
    rounds = sum(s.counters.read_rounds for s in cluster.nodes.values())
    assert rounds < len(reads)
    result = check(history)
    assert result.ok, result


async def test_a_message_must_come_from_the_tls_peer_it_names(
    cluster: Cluster, autojump_clock: trio.testing.MockClock
) -> None:
    """Over mutual TLS a stream knows its peer: a valid node certificate of "b" cannot speak
    for "c" (e.g. a forged vote request with a huge term is dropped, not obeyed)."""
    from p2porch.consensus.messages import RequestVote
    from p2porch.consensus.transport import AuthenticatedStream

    await start_three(cluster)
    await cluster.leader()
    victim = cluster.nodes["a"]
    term = victim.core.term
    ours, theirs = trio.testing.memory_stream_pair()
    forged = RequestVote(
        src="c", dst="a", term=term + 1000, last_log_index=10**6, last_log_term=term + 999
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(victim._handle_inbound, AuthenticatedStream(theirs, "b"))
        await ours.send_all(encode_frame(codec.encode(forged)))
        await trio.sleep(1)
        await ours.aclose()  # a service that (wrongly) kept reading returns at end of stream
    assert victim.counters.bad_messages == 1
    assert victim.core.term < term + 1000
    assert (await cluster.put("still", b"fine")).ok
