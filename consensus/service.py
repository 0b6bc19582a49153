"""The trio shell around the sans-I/O Raft core: timers, sockets, disk, state machine.

Why a shell at all: the core (:mod:`p2porch.consensus.core`) decides everything and does
nothing; this module does everything and decides nothing. Its one job is to perform each
``Ready`` batch in the only safe order::

    persist (snapshot, entries, hard state; fsync if must_sync)   -- storage.Storage
    THEN send messages                                            -- they may promise step 1
    then restore/apply to the state machine, answer reads
    then core.advance(ready)

A storage failure (disk full, I/O error) is fatal: the node stops before sending or applying
anything of that batch, so it never acknowledges what it could not write.

Tasks inside :meth:`RaftService.run`:

* ``ticker``     -- time for the core, without waking at every tick: ticks sit on a fixed
  grid of ``raft.tick_interval_s`` and the task sleeps until the one the core says may act
  (:meth:`RaftCore.ticks_until_due`: the next heartbeat on a leader, the election timeout
  on a follower). The quiet ticks in between are delivered in a burst just before the core's
  next input, so the core sees exactly the ticks a per-tick loop would have given it. An
  idle follower wakes only for the leader's heartbeats, not 10 times a second as well;
* ``ready loop`` -- the order above; disk writes run in a worker thread by default so the
  event loop keeps receiving while the fsync is in progress (everything that accumulates
  meanwhile goes into the next batch: natural group commit, one fsync per batch);
* ``server``     -- one task per inbound stream: frames -> codec -> ``core.step``; a bad frame
  or undecodable message drops that connection and is counted, never more;
* ``sender``     -- one per peer, one outbound stream each, fed by a bounded queue: when the
  queue is full the message is dropped (Raft retransmits; a slow peer must not grow memory).

Client-facing calls (:meth:`propose`, :meth:`read_barrier`, membership helpers, transfer) run
in the caller's task and wait for the shell; they raise :class:`NotLeader` (with the leader
hint, so the API layer may forward), :class:`ProposalLost` (overwritten by another leader:
definitely not applied), :class:`RequestTimeout` (outcome unknown: retry with the same
session sequence number) or :class:`ServiceStopped`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import trio

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.consensus.config import RaftConfig
from p2porch.consensus.core import RaftCore
from p2porch.consensus.errors import ConsensusError, NotLeader
from p2porch.consensus.messages import (
    AppendEntries,
    ConfChange,
    ConfChangeOp,
    EntryKind,
    Heartbeat,
    LeaderChanged,
    Membership,
    Message,
    PersistentState,
    Ready,
    Role,
    Status,
    TransferAborted,
)
from p2porch.consensus.storage import Storage, StorageError
from p2porch.consensus.transport import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameError,
    FrameReader,
    Transport,
    TransportError,
    encode_frame,
)

__all__ = [
    "ProposalLost",
    "RaftService",
    "RequestTimeout",
    "ServiceConfig",
    "ServiceCounters",
    "ServiceError",
    "ServiceStopped",
    "StateMachine",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- errors


class ServiceError(ConsensusError):
    """Errors of the Raft shell (storage errors are in ``storage.py``)."""


class ServiceStopped(ServiceError):
    """The node is not running (stopped, or a storage failure made it stop)."""


class ProposalLost(ServiceError):
    """Another leader overwrote the proposal's log slot: it will never be applied."""


class RequestTimeout(ServiceError):
    """No answer in time; a proposal may or may not have been applied (retry idempotently)."""


# --------------------------------------------------------------------------- config


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen
class ServiceConfig:
    """Knobs of the shell (the core's are in ``raft``)."""

    raft: RaftConfig = attrs.field(factory=RaftConfig.lan)
    snapshot_every_entries: int = attrs.field(default=10_000, validator=_positive)
    send_queue_messages: int = attrs.field(default=4096, validator=_positive)
    max_frame_bytes: int = attrs.field(default=DEFAULT_MAX_FRAME_BYTES, validator=_positive)
    reconnect_backoff_s: float = attrs.field(default=0.05, validator=_positive)
    max_reconnect_backoff_s: float = attrs.field(default=1.0, validator=_positive)
    request_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    # A send stuck this long means a peer that vanished without a reset (power cut, cable):
    # drop the connection and dial again instead of waiting minutes for TCP to give up.
    send_timeout_s: float = attrs.field(default=3.0, validator=_positive)
    # Disk writes in a worker thread keep the event loop serving during fsync; tests running
    # under a MockClock may turn it off for exact determinism.
    storage_in_thread: bool = True
    # Raft thesis 10.2.1: a leader may send AppendEntries for new entries BEFORE its own disk
    # write completes, so the leader's fsync overlaps the followers' (about one fsync of
    # latency instead of two). Safe because the core counts the leader's own match only up to
    # its STABLE index. Only leader-to-follower replication messages go early, and only when
    # the batch does not change term or vote; everything else still waits for the fsync.
    # Off by default: the shell contract says "persist, THEN send".
    leader_parallel_append: bool = False

    def __attrs_post_init__(self) -> None:
        if self.max_reconnect_backoff_s < self.reconnect_backoff_s:
            raise ValueError("max_reconnect_backoff_s must be >= reconnect_backoff_s")
        needed = self.raft.max_bytes_per_msg + self.raft.snapshot_chunk_bytes
        if self.max_frame_bytes < needed:
            raise ValueError(
                f"max_frame_bytes ({self.max_frame_bytes}) must hold a full AppendEntries or "
                f"snapshot chunk ({needed} bytes)"
            )

    @classmethod
    def local(cls) -> ServiceConfig:
        return cls(raft=RaftConfig.local(), request_timeout_s=3.0)

    @classmethod
    def lan(cls) -> ServiceConfig:
        return cls(raft=RaftConfig.lan())

    @classmethod
    def wan(cls) -> ServiceConfig:
        return cls(
            raft=RaftConfig.wan(),
            request_timeout_s=10.0,
            max_reconnect_backoff_s=5.0,
            send_timeout_s=10.0,
        )


@attrs.define
class ServiceCounters:
    """What went wrong at the boundary (exposed for tests, metrics and the API)."""

    bad_frames: int = 0
    bad_messages: int = 0
    step_errors: int = 0
    send_queue_drops: int = 0
    unknown_peer_drops: int = 0
    connect_failures: int = 0
    send_failures: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    batches: int = 0
    early_messages: int = 0  # sent before the disk write (leader_parallel_append)
    read_rounds: int = 0  # ReadIndex rounds started (concurrent readers share one)
    timer_wakeups: int = 0  # the ticker woke because a tick was due (idle cost; see _ticker)


class StateMachine(Protocol):
    """What the shell applies committed commands to (see ``kv.KvStateMachine``)."""

    def apply(self, data: bytes) -> object: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


# --------------------------------------------------------------------------- internals


class _Waiter:
    """A one-shot result slot a client task waits on."""

    __slots__ = ("error", "event", "result", "term")

    def __init__(self, term: int = 0) -> None:
        self.term = term
        self.event = trio.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def resolve(self, result: object) -> None:
        if not self.event.is_set():
            self.result = result
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> object:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.result


class _Peer:
    def __init__(self, node_id: str, address: str, queue_len: int) -> None:
        self.node_id = node_id
        self.address = address
        self.send, self.receive = trio.open_memory_channel[Message](queue_len)
        self.scope = trio.CancelScope()


# --------------------------------------------------------------------------- service


class RaftService:
    """One Raft node: core + storage + transport + state machine, run by :meth:`run`."""

    def __init__(
        self,
        node_id: str,
        *,
        config: ServiceConfig,
        storage: Storage,
        state_machine: StateMachine,
        transport: Transport,
        listen: str,
        peers: dict[str, str],
        bootstrap: Membership | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.storage = storage
        self.state_machine = state_machine
        self.transport = transport
        self.listen = listen
        self.counters = ServiceCounters()
        self._addresses = {k: v for k, v in peers.items() if k != node_id}
        state = storage.load()
        if storage.fresh and bootstrap is not None:
            state = PersistentState.bootstrap(bootstrap)
            if state.snapshot is not None:
                storage.save_snapshot(state.snapshot)
        if state.snapshot is not None:
            state_machine.restore(state.snapshot.data)
        self.core = RaftCore(node_id, config.raft, rng or random.Random(), state)
        self._applied = self.core.applied_index
        self._last_snapshot_index = state.snapshot.meta.index if state.snapshot else 0
        self._proposals: dict[int, _Waiter] = {}
        self._reads: dict[bytes, list[_Waiter]] = {}  # ReadIndex round ctx -> its readers
        self._read_queue: list[_Waiter] = []  # readers waiting for the next round
        self._read_inflight: tuple[bytes, float] | None = None  # (ctx, started at)
        self._applied_waiters: list[tuple[int, trio.Event]] = []
        self._read_ids = itertools.count(1)
        self._peers: dict[str, _Peer] = {}
        self._wakeup = trio.Event()
        self._changed = trio.Event()
        self._tick_origin = 0.0  # trio time of tick 0 of the grid (set by run)
        self._ticks = 0  # ticks delivered to the core so far
        self._tick_deferred = False  # the last catch-up moved the grid (see _catch_up)
        self._tick_scope: trio.CancelScope | None = None  # the ticker's sleep
        self._nursery: trio.Nursery | None = None
        self._stopped: BaseException | None = None
        self._running = False
        self.bound_address: str | None = None
        self.fatal_error: StorageError | None = None
        self._transfer_aborted = False

    # ================================================================= lifecycle

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (or :meth:`stop`); raises the StorageError that stopped it."""
        if self._running or self._stopped is not None:
            raise ServiceStopped("a RaftService runs once; build a new one to restart")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.bound_address = await nursery.start(
                    self.transport.serve, self.listen, self._handle_inbound
                )
                self._tick_origin = trio.current_time()
                nursery.start_soon(self._ticker)
                nursery.start_soon(self._ready_loop)
                task_status.started(self.bound_address)
        finally:
            self._shutdown(self.fatal_error or ServiceStopped(f"node {self.node_id} stopped"))
        if self.fatal_error is not None:
            raise self.fatal_error

    def stop(self) -> None:
        """Stop serving (``run`` returns); pending requests fail with ServiceStopped."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _die(self, exc: StorageError) -> None:
        """A storage failure: fail everything now, then unwind ``run`` (which re-raises)."""
        self.fatal_error = exc
        self._shutdown(exc)
        self.stop()

    def _shutdown(self, error: BaseException) -> None:
        if not isinstance(error, ServiceStopped):
            stopped = ServiceStopped(f"node {self.node_id} stopped: {error}")
            stopped.__cause__ = error
            error = stopped
        if self._stopped is None:
            self._stopped = error
        self._running = False
        readers = [w for batch in self._reads.values() for w in batch]
        for waiter in [*self._proposals.values(), *readers, *self._read_queue]:
            waiter.fail(error)
        self._proposals.clear()
        self._reads.clear()
        self._read_queue.clear()
        for _, event in self._applied_waiters:
            event.set()
        self._applied_waiters.clear()
        self._changed.set()
        self.storage.close()

    def _check_running(self) -> None:
        if self._stopped is not None:
            raise ServiceStopped(str(self._stopped)) from self._stopped
        if not self._running:
            raise ServiceStopped(f"node {self.node_id} is not running")

    # ================================================================= read-only state

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def is_leader(self) -> bool:
        return self.core.role is Role.LEADER

    @property
    def leader_id(self) -> str | None:
        return self.core.leader_id

    def status(self) -> Status:
        return self.core.status()

    def set_peer_address(self, node_id: str, address: str) -> None:
        """Where to reach ``node_id`` (the node layer learns addresses from gossip)."""
        if node_id == self.node_id:
            return
        self._addresses[node_id] = address
        peer = self._peers.get(node_id)
        if peer is not None and peer.address != address:
            peer.scope.cancel()
            del self._peers[node_id]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``predicate()`` holds after some batch; False on timeout."""
        with trio.move_on_after(timeout_s):
            while not predicate():
                self._check_running()
                await self._changed.wait()
            return True
        return False

    # ================================================================= client API

    async def propose(self, data: bytes, *, timeout_s: float | None = None) -> object:
        """Replicate ``data`` and return what the state machine's ``apply`` returned."""
        self._check_running()
        self._catch_up()
        term, index = self.core.propose(data)
        return await self._wait_entry(term, index, timeout_s)

    async def _wait_entry(self, term: int, index: int, timeout_s: float | None) -> object:
        waiter = _Waiter(term)
        self._proposals[index] = waiter
        self._kick()
        with trio.move_on_after(timeout_s or self.config.request_timeout_s):
            return await waiter.wait()
        if self._proposals.get(index) is waiter:
            del self._proposals[index]
        raise RequestTimeout(f"entry {index} (term {term}) not applied in time; outcome unknown")

    async def read_barrier(self, *, timeout_s: float | None = None) -> int:
        """Linearizable read point (ReadIndex): afterwards the local state machine is at least
        as new as any write completed before the call. Returns the read index.

        Concurrent readers share rounds: a reader joins the NEXT round to start, never one
        already in flight (that round may have fixed its index before this call, and a write
        completed in between would be missed). So at most one round is in flight and N
        concurrent readers cost one heartbeat broadcast instead of N.
        """
        self._check_running()
        if self.core.role is not Role.LEADER:
            raise NotLeader(self.core.leader_id)
        waiter = _Waiter()
        self._read_queue.append(waiter)
        self._start_read_round()
        with trio.move_on_after(timeout_s or self.config.request_timeout_s):
            index = await waiter.wait()
            if not isinstance(index, int):
                raise TypeError("read index must be an int")
            await self.wait_applied(index)
            return index
        if waiter in self._read_queue:
            self._read_queue.remove(waiter)
        raise RequestTimeout("read index not confirmed in time")

    def _start_read_round(self) -> None:
        """Start a ReadIndex round for every queued reader, unless one is in flight."""
        if not self._read_queue or self._stopped is not None:
            return
        if self._read_inflight is not None:
            ctx, started = self._read_inflight
            if trio.current_time() - started < self.config.request_timeout_s:
                return
            # A round that never completed (no quorum, yet no step-down): give up on it.
            for reader in self._reads.pop(ctx, []):
                reader.fail(RequestTimeout("read round expired"))
            self._read_inflight = None
        batch, self._read_queue = self._read_queue, []
        ctx = b"%d" % next(self._read_ids)
        self._catch_up()
        try:
            self.core.read_index(ctx)
        except NotLeader as exc:
            for reader in batch:
                reader.fail(exc)
            return
        self._reads[ctx] = batch
        self._read_inflight = (ctx, trio.current_time())
        self.counters.read_rounds += 1
        self._kick()

    def _end_read_round(self, ctx: bytes, index: int | None, error: BaseException | None) -> None:
        for reader in self._reads.pop(ctx, []):
            if error is not None:
                reader.fail(error)
            else:
                reader.resolve(index)
        if self._read_inflight is not None and self._read_inflight[0] == ctx:
            self._read_inflight = None

    async def wait_applied(self, index: int) -> None:
        """Return once the state machine has applied ``index``."""
        while self._applied < index:
            self._check_running()
            event = trio.Event()
            self._applied_waiters.append((index, event))
            await event.wait()

    async def add_learner(
        self, node_id: str, address: str, *, timeout_s: float | None = None
    ) -> None:
        self.set_peer_address(node_id, address)
        await self._conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, node_id), timeout_s)

    async def promote(self, node_id: str, *, timeout_s: float | None = None) -> None:
        await self._conf_change(ConfChange(ConfChangeOp.PROMOTE, node_id), timeout_s)

    async def remove(self, node_id: str, *, timeout_s: float | None = None) -> None:
        await self._conf_change(ConfChange(ConfChangeOp.REMOVE, node_id), timeout_s)

    async def _conf_change(self, change: ConfChange, timeout_s: float | None) -> None:
        self._check_running()
        self._catch_up()
        term, index = self.core.propose_conf_change(change)
        await self._wait_entry(term, index, timeout_s)

    async def transfer_leadership(self, target: str, *, timeout_s: float | None = None) -> bool:
        """Ask the leader to hand over to ``target``; True once ``target`` leads."""
        self._check_running()
        if target == self.node_id and self.core.role is Role.LEADER:
            return True
        self._catch_up()
        self.core.transfer_leadership(target)
        self._kick()
        self._transfer_aborted = False
        return (
            await self.wait_for(
                lambda: (
                    (self.core.leader_id == target and self.core.role is not Role.LEADER)
                    or self._transfer_aborted
                ),
                timeout_s or self.config.request_timeout_s,
            )
            and not self._transfer_aborted
        )

    # ================================================================= tasks

    def _kick(self) -> None:
        """The core took an input: let the ready loop run, and re-aim the ticker's sleep."""
        self._wakeup.set()
        self._rearm_ticker()

    def _catch_up(self) -> None:
        """Deliver the grid ticks that passed since the last delivery; call before every input.

        The ticks before the due one are quiet, so delivering them late changes nothing; what
        matters is that they reach the core BEFORE the input that follows them (a heartbeat
        resets the election timer, and a vote request is judged by how long ago the leader
        was heard from).

        A due tick overdue by a whole interval or more means the process was stalled (paused,
        starved of CPU). Then the grid moves so that tick comes at the next grid point instead
        of now, as a per-tick loop would have lost the ticks it slept through: a paused
        follower first handles the heartbeats that piled up meanwhile, and a paused leader its
        followers' answers, before a timeout or check-quorum may fire. Only one deferral in a
        row: an event loop that is always late must still deliver every due tick.
        """
        interval = self.config.raft.tick_interval_s
        # The epsilon absorbs float error when woken exactly at a grid point.
        now_tick = int((trio.current_time() - self._tick_origin) / interval + 1e-6)
        if now_tick <= self._ticks:
            return
        due = self.core.ticks_until_due()
        if due is not None and self._ticks + due < now_tick and not self._tick_deferred:
            quiet = due - 1
            self._tick_origin += (now_tick - self._ticks - quiet) * interval
            now_tick = self._ticks + quiet
            self._tick_deferred = True
        else:
            self._tick_deferred = False
        for _ in range(now_tick - self._ticks):
            self.core.tick()
        self._ticks = now_tick

    def _next_tick_at(self) -> float:
        due = self.core.ticks_until_due()
        if due is None:
            return math.inf
        return self._tick_origin + (self._ticks + due) * self.config.raft.tick_interval_s

    def _rearm_ticker(self) -> None:
        scope = self._tick_scope
        if scope is not None:
            at = self._next_tick_at()
            if at != scope.deadline:  # most inputs leave it where it was: skip trio's bookkeeping
                scope.deadline = at

    async def _ticker(self) -> None:
        while True:
            self._catch_up()
            self._kick()
            with trio.CancelScope(deadline=self._next_tick_at()) as scope:
                self._tick_scope = scope
                await trio.sleep_forever()
            self._tick_scope = None
            self.counters.timer_wakeups += 1

    async def _ready_loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            while self.core.has_ready() and self.fatal_error is None:
                ready = self.core.ready()
                early, late = self._split_messages(ready)
                if early:
                    self.counters.early_messages += len(early)
                    self._send_all(early)
                try:
                    await self._persist(ready)
                except StorageError:
                    return  # _die() already stopped the node; run() re-raises
                self._send_all(late)
                self._apply(ready)
                self.core.advance(ready)
                self._rearm_ticker()  # advance may commit, and a commit may change the timers
                self.counters.batches += 1
                self._start_read_round()  # readers that queued while a round was in flight
                try:
                    await self._maybe_snapshot()
                except StorageError:
                    return
                changed, self._changed = self._changed, trio.Event()
                changed.set()
            await self._wakeup.wait()

    async def _persist(self, ready: Ready) -> None:
        if ready.hard_state is None and not ready.entries and ready.snapshot is None:
            return
        if ready.entries:
            self._fail_overwritten(ready)
        try:
            if self.config.storage_in_thread and (ready.must_sync or ready.snapshot is not None):
                await trio.to_thread.run_sync(
                    self.storage.save,
                    ready.hard_state,
                    ready.entries,
                    ready.snapshot,
                    ready.must_sync,
                )
            else:
                self.storage.save(ready.hard_state, ready.entries, ready.snapshot, ready.must_sync)
        except StorageError as exc:
            # Fatal: nothing of this batch may be sent or applied. Stop the whole node.
            log.critical("node %s: storage failed, stopping: %s", self.node_id, exc)
            self._die(exc)
            raise

    def _fail_overwritten(self, ready: Ready) -> None:
        """Entries from ``entries[0].index`` on replace our log: proposals there whose term
        does not match were overwritten by another leader and will never apply."""
        first = ready.entries[0].index
        last = ready.entries[-1].index
        for index in [i for i in self._proposals if i >= first]:
            waiter = self._proposals[index]
            new_term = ready.entries[index - first].term if index <= last else None
            if new_term != waiter.term:
                del self._proposals[index]
                waiter.fail(ProposalLost(f"entry {index} of term {waiter.term} was overwritten"))

    def _split_messages(self, ready: Ready) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
        """(messages that may go before the disk write, messages that must wait for it)."""
        if not self.config.leader_parallel_append or self.core.role is not Role.LEADER:
            return (), ready.messages
        persisted = self.storage.hard_state
        hard = ready.hard_state
        if hard is not None and (hard.term, hard.vote) != (persisted.term, persisted.vote):
            return (), ready.messages
        early: list[Message] = []
        late: list[Message] = []
        for msg in ready.messages:
            if isinstance(msg, AppendEntries | Heartbeat) and msg.term == persisted.term:
                early.append(msg)
            else:
                late.append(msg)
        return tuple(early), tuple(late)

    def _send_all(self, messages: tuple[Message, ...]) -> None:
        for msg in messages:
            peer = self._peers.get(msg.dst)
            if peer is None:
                peer = self._start_peer(msg.dst)
                if peer is None:
                    self.counters.unknown_peer_drops += 1
                    continue
            try:
                peer.send.send_nowait(msg)
            except trio.WouldBlock:
                self.counters.send_queue_drops += 1

    def _apply(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            self.state_machine.restore(ready.snapshot.data)
            index = ready.snapshot.meta.index
            self._applied = max(self._applied, index)
            self._last_snapshot_index = index
            self.counters.snapshots_installed += 1
            for i in [i for i in self._proposals if i <= index]:
                self._proposals.pop(i).fail(
                    RequestTimeout(f"entry {i} was covered by a snapshot; outcome unknown")
                )
        for entry in ready.committed:
            result = (
                self.state_machine.apply(entry.data) if entry.kind is EntryKind.NORMAL else None
            )
            waiter = self._proposals.pop(entry.index, None)
            if waiter is not None:
                if waiter.term == entry.term:
                    waiter.resolve(result)
                else:
                    waiter.fail(
                        ProposalLost(f"entry {entry.index} of term {waiter.term} was overwritten")
                    )
            self._applied = entry.index
        for read_state in ready.read_states:
            self._end_read_round(read_state.ctx, read_state.index, None)
        for ctx in ready.dropped_reads:
            self._end_read_round(ctx, None, NotLeader(self.core.leader_id))
        for event in ready.events:
            if isinstance(event, TransferAborted):
                # Stepping down because the target won also ends the transfer: only an abort
                # while we still lead is a failure.
                self._transfer_aborted = self.core.role is Role.LEADER
            elif isinstance(event, LeaderChanged) and event.leader_id != self.node_id:
                # Reads started while we led can no longer be confirmed by us.
                for ctx in list(self._reads):
                    self._end_read_round(ctx, None, NotLeader(event.leader_id))
                queued, self._read_queue = self._read_queue, []
                for reader in queued:
                    reader.fail(NotLeader(event.leader_id))
        if self._applied_waiters:
            remaining = []
            for index, wake in self._applied_waiters:
                if index <= self._applied:
                    wake.set()
                else:
                    remaining.append((index, wake))
            self._applied_waiters = remaining

    async def _maybe_snapshot(self) -> None:
        applied = self.core.applied_index
        if applied - self._last_snapshot_index < self.config.snapshot_every_entries:
            return
        data = self.state_machine.snapshot()
        self.core.compact(applied, data)
        snapshot = self.core.log.snapshot
        if snapshot is None or snapshot.meta.index != applied:
            return
        try:
            if self.config.storage_in_thread:
                await trio.to_thread.run_sync(self.storage.save_snapshot, snapshot)
                await trio.to_thread.run_sync(self.storage.compact, applied)
            else:
                self.storage.save_snapshot(snapshot)
                self.storage.compact(applied)
        except StorageError as exc:
            log.critical("node %s: snapshot failed, stopping: %s", self.node_id, exc)
            self._die(exc)
            raise
        self._last_snapshot_index = applied
        self.counters.snapshots_taken += 1

    # ----------------------------------------------------------------- network

    def _start_peer(self, node_id: str) -> _Peer | None:
        address = self._addresses.get(node_id)
        if address is None or self._nursery is None:
            return None
        peer = _Peer(node_id, address, self.config.send_queue_messages)
        self._peers[node_id] = peer
        self._nursery.start_soon(self._sender, peer)
        return peer

    async def _sender(self, peer: _Peer) -> None:
        backoff = self.config.reconnect_backoff_s
        with peer.scope:
            while True:
                try:
                    stream = await self.transport.connect(peer.address)
                except TransportError:
                    self.counters.connect_failures += 1
                    # Messages queued for an unreachable peer are stale by the time it is back.
                    with contextlib.suppress(trio.WouldBlock):
                        while True:
                            peer.receive.receive_nowait()
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.max_reconnect_backoff_s)
                    continue
                backoff = self.config.reconnect_backoff_s
                try:
                    async with stream:
                        await self._pump(peer, stream)
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    trio.TooSlowError,
                    OSError,
                ) as exc:
                    self.counters.send_failures += 1
                    log.debug("node %s: link to %s broke: %s", self.node_id, peer.node_id, exc)

    async def _pump(self, peer: _Peer, stream: trio.abc.Stream) -> None:
        while True:
            msg = await peer.receive.receive()
            frames = [encode_frame(codec.encode(msg))]
            size = len(frames[0])
            while size < 1 << 20:
                try:
                    msg = peer.receive.receive_nowait()
                except trio.WouldBlock:
                    break
                frames.append(encode_frame(codec.encode(msg)))
                size += len(frames[-1])
            with trio.fail_after(self.config.send_timeout_s):
                await stream.send_all(b"".join(frames))

    async def _handle_inbound(self, stream: trio.abc.Stream) -> None:
        reader = FrameReader(stream, self.config.max_frame_bytes)
        while True:
            try:
                payload = await reader.receive()
            except FrameError as exc:
                self.counters.bad_frames += 1
                log.info("node %s: dropping connection: %s", self.node_id, exc)
                return
            if payload is None or self._stopped is not None:
                return
            try:
                msg: Message = codec.decode(payload, Message)
            except CodecError as exc:
                self.counters.bad_messages += 1
                log.info("node %s: dropping connection, bad message: %s", self.node_id, exc)
                return
            # Over mutual TLS the stream knows which node is on the other end: a message
            # claiming another sender is a forgery (a valid certificate speaking for a peer).
            peer = getattr(stream, "peer_name", None)
            if peer is not None and msg.src != peer:
                self.counters.bad_messages += 1
                log.warning(
                    "node %s: dropping connection from %s: message claims to be from %s",
                    self.node_id,
                    peer,
                    msg.src,
                )
                return
            self._catch_up()
            try:
                self.core.step(msg)
            except Exception:
                # A well-typed but nonsensical message the core could not digest: a peer bug
                # must not take this node down. Counted and logged loudly.
                self.counters.step_errors += 1
                log.exception("node %s: core refused %r", self.node_id, type(msg).__name__)
                return
            self._kick()
