"""The reconciler's pure planner: placements + what the engine reports -> actions and statuses.

Every node runs a reconciler that makes its local engine match the placements the Raft log
assigns to it. The decisions live here, free of I/O (no trio, no docker, no clock): the shell
(:mod:`p2porch.node.reconciler`) lists the node's containers, calls :func:`plan` with the
current time, performs the returned actions, and feeds their outcomes back through
:func:`after_start`, :func:`after_restart` and :func:`after_failure`. Keeping the rules pure
lets unit tests walk every corner (crash loops, duplicates, generation changes, adoption)
without an engine, and with a clock they set by hand.

The rules of :func:`plan`, per replica assigned to this node:

* no container of the current generation -> **start** one (first removing any container of an
  older generation: stop-then-start; rolling updates come later);
* several of the current generation (a healed partition, a crash between create and record)
  -> keep the newest running one, **remove** the rest;
* a container whose process ended -> the app's restart policy decides; a restart waits an
  **exponential back-off** (``backoff_base_s`` doubling up to ``backoff_max_s``, as
  Kubernetes' CrashLoopBackOff), reset once a run lasted ``backoff_reset_after_s``;
* a running container of the current generation -> nothing: this is also how a restarted
  daemon **adopts** what it finds (static stability: a daemon restart restarts no replica);
* its health probes (:mod:`p2porch.node.probes`, run by the shell and passed in as
  ``probe_states``) decide whether it is **ready**; when its liveness or startup probe gave
  up, **stop** it: the exit that follows goes through the ordinary restart path above (the
  policy, the back-off, the restart count), with the probe's verdict as the reason. Running
  replicas with probes are handed back to the shell as ``Plan.probe_targets``.

Containers of this node that match no assigned replica are **removed** (an app deleted or moved
while the daemon was down, or a partition healed). Containers of other nodes are never looked
at: the planner drops anything without this node's label, even if the runtime let it through.

Starting a replica can fail for good reasons the user must see (the image does not exist, a
bind path is missing, the port is taken): those are *terminal* -- ``ReplicaStatus.terminal`` --
and the daemon logs them as ``ReportReplica`` facts. The planner still retries them on the
back-off schedule, since an image can appear (built locally) or a port be freed later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from p2porch.node import probes
from p2porch.node.endpoints import Endpoint, EndpointPort

# Re-exported: statuses are made here, defined there (the endpoint record carries them).
from p2porch.node.endpoints import ReplicaState as ReplicaState  # noqa: PLC0414
from p2porch.node.endpoints import ReplicaStatus as ReplicaStatus  # noqa: PLC0414
from p2porch.node.probes import ProbeState, ProbeTarget, RunId
from p2porch.node.spec import App, Protocol, RestartPolicyKind, UpdateOrder, replica_name
from p2porch.node.state import Placement

if TYPE_CHECKING:  # the runtime imports trio and docker; the planner only reads its values
    from p2porch.node.runtime import ContainerInfo

# Label keys as the runtime stamps them (repeated here so the planner imports no engine code;
# a unit test checks they agree with p2porch.node.runtime).
LABEL_NODE = "io.p2porch.node"


# --------------------------------------------------------------------------- config


@attrs.frozen
class ReconcilerConfig:
    """How the reconciler paces itself. Units in the names; checks raise ValueError."""

    # Restart back-off: base, doubling per consecutive crash, capped (Kubernetes: 10 s, 5 min).
    backoff_base_s: float = 10.0
    backoff_max_s: float = 300.0
    # A run at least this long resets the back-off to the base (Kubernetes: 10 min).
    backoff_reset_after_s: float = 600.0
    # A full pass at least this often, even without events (missed events, engine restarts).
    resync_interval_s: float = 10.0
    # After the engine failed to answer a listing, try again this soon.
    engine_retry_s: float = 2.0
    # Engine actions (create, start, stop, remove) in flight at once.
    max_parallel_actions: int = 16  # matches the runtime's default thread_limit
    # Seconds between SIGTERM and SIGKILL when stopping; None: the app's stop_grace_s.
    stop_timeout_s: int | None = None
    # False (the product): every replica gets a free host port on the advertise address,
    # reported in its status, and every node's routing mesh serves the published port. True
    # binds ``published_port`` itself -- a test-only mode: the scheduler no longer keeps two
    # replicas that publish one TCP port off the same node (the mesh owns those ports).
    bind_published_ports: bool = False
    # Health probes in flight at once on this node (each also bounded by its own timeout).
    max_parallel_probes: int = 16
    # A running replica about to be stopped (rolled over, scaled down, moved) is first
    # withdrawn from the endpoints, then left running this long so every node's mesh and
    # ingress stop sending to it and its requests in flight finish (Kubernetes users add a
    # preStop sleep for this). Covers gossip dissemination plus one fetch.
    drain_s: float = 3.0

    def __attrs_post_init__(self) -> None:
        if not self.backoff_base_s > 0:
            raise ValueError(f"backoff_base_s must be > 0, got {self.backoff_base_s}")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_base_s "
                f"({self.backoff_base_s})"
            )
        if self.backoff_reset_after_s < 0:
            raise ValueError(
                f"backoff_reset_after_s must be >= 0, got {self.backoff_reset_after_s}"
            )
        if not self.resync_interval_s > 0:
            raise ValueError(f"resync_interval_s must be > 0, got {self.resync_interval_s}")
        if not self.engine_retry_s > 0:
            raise ValueError(f"engine_retry_s must be > 0, got {self.engine_retry_s}")
        if self.max_parallel_actions < 1:
            raise ValueError(f"max_parallel_actions must be >= 1, got {self.max_parallel_actions}")
        if self.stop_timeout_s is not None and self.stop_timeout_s < 0:
            raise ValueError(f"stop_timeout_s must be >= 0 or None, got {self.stop_timeout_s}")
        if self.max_parallel_probes < 1:
            raise ValueError(f"max_parallel_probes must be >= 1, got {self.max_parallel_probes}")
        if not 0 <= self.drain_s <= 600:
            raise ValueError(f"drain_s must be in 0-600, got {self.drain_s}")

    @classmethod
    def lan(cls) -> ReconcilerConfig:
        """Real nodes: Kubernetes' pacing."""
        return cls()

    @classmethod
    def local(cls) -> ReconcilerConfig:
        """A laptop cluster: same back-off, quicker resync."""
        return cls(resync_interval_s=5.0, engine_retry_s=1.0, drain_s=2.0)

    @classmethod
    def fast(cls) -> ReconcilerConfig:
        """Tests: sub-second back-off so crash loops show within a test's budget."""
        return cls(
            backoff_base_s=0.2,
            backoff_max_s=1.6,
            backoff_reset_after_s=30.0,
            resync_interval_s=2.0,
            engine_retry_s=0.5,
            stop_timeout_s=1,
            drain_s=1.0,
        )

    def backoff_s(self, step: int) -> float:
        """The wait before restart number ``step + 1`` of a crash loop: base * 2**step, capped."""
        # Doubling past the cap is pointless (and 2**step would grow without bound).
        delay = self.backoff_base_s
        for _ in range(step):
            delay *= 2
            if delay >= self.backoff_max_s:
                return self.backoff_max_s
        return min(delay, self.backoff_max_s)


# --------------------------------------------------------------------------- values


@attrs.frozen(order=True)
class ReplicaKey:
    """A replica's identity on a node, as the container labels carry it."""

    namespace: str
    app: str
    replica: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.replica}"


@attrs.frozen
class Assignment:
    """One replica this node must run: the placement and the app (its current spec)."""

    placement: Placement
    app: App

    @property
    def name(self) -> str:
        return replica_name(self.placement.app, self.placement.slot)

    @property
    def key(self) -> ReplicaKey:
        return ReplicaKey(self.placement.namespace, self.placement.app, self.name)

    @property
    def generation(self) -> int:
        """The generation to run: the app's current spec is the only one this node knows."""
        return self.app.meta.generation


def assignments_for(
    node: str,
    placements: Sequence[Placement],
    apps: Mapping[tuple[str, str], App],
    revisions: Mapping[tuple[str, str, int], App] | None = None,
) -> list[Assignment]:
    """Pair this node's placements with their apps; placements of a deleted app are dropped
    (the app is gone, so its replicas stop even before the scheduler releases the slots).

    ``revisions`` maps (namespace, app, revision) to the App that revision runs: a placement
    runs its own revision (a rolling update moves placements one batch at a time); without
    an entry for it, the app's current spec is used."""
    revisions = revisions or {}
    out = []
    for placement in placements:
        if placement.node != node:
            continue
        app = revisions.get((placement.namespace, placement.app, placement.generation))
        if app is None:
            app = apps.get((placement.namespace, placement.app))
        if app is None:
            continue
        out.append(Assignment(placement, app))
    return sorted(out, key=lambda a: a.key)


# An exit, identified by the container and when the engine says it ended: a restarted-in-place
# container that ends again is a new exit.
ExitKey = tuple[str, float]


@attrs.frozen
class ReplicaBook:
    """Restart bookkeeping for one assigned replica, kept by the shell between passes.

    Reset when the replica's generation changes: a new spec starts with a clean slate.
    """

    generation: int
    # Restarts this reconciler performed (shown as ``restarts``; never reset but by generation).
    restarts: int = 0
    # Consecutive back-off steps: the next restart waits backoff_s(backoff_step).
    backoff_step: int = 0
    # The last exit seen, when the planner first saw it (the back-off clock starts there).
    last_exit: ExitKey | None = None
    exit_seen_at: float = 0.0
    # The exit a restart has already answered (a stale listing must not restart it twice).
    restarted_from: ExitKey | None = None
    # Failed start/restart attempts in a row, the next allowed attempt, and why they failed.
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    error_terminal: bool = False
    # The run a failing liveness/startup probe had stopped, and the probe's verdict: the exit
    # of that run is the probe's doing, and is reported as such.
    kill_cause: tuple[RunId, str] | None = None
    # Why the last exit happened when we caused it ("" for the process's own exit).
    exit_cause: str = ""
    # Why the previous run ended, in words (shown as ``last_termination``).
    last_termination: str = ""


@attrs.frozen
class StartReplica:
    """Create and start the replica, first stopping and removing ``remove_ids``."""

    key: ReplicaKey
    assignment: Assignment
    remove_ids: tuple[str, ...] = ()
    why: str = "creating container"


@attrs.frozen
class RestartContainer:
    """Start the ended container again in place (same id, its logs kept)."""

    key: ReplicaKey
    assignment: Assignment
    container_id: str
    exit: ExitKey
    why: str = ""


@attrs.frozen
class RemoveContainer:
    """Stop (gracefully, if running) and remove a container of this node."""

    container_id: str
    key: ReplicaKey | None
    why: str
    running: bool = False


@attrs.frozen
class StopContainer:
    """Stop a running replica whose liveness or startup probe gave up (``why``).

    Only stopped: the exit then takes the ordinary restart path, so the policy, the back-off
    and the restart count apply to probe failures exactly as to crashes.
    """

    key: ReplicaKey
    assignment: Assignment
    container_id: str
    run: RunId
    why: str


Action = StartReplica | RestartContainer | RemoveContainer | StopContainer


@attrs.frozen
class Plan:
    """One pass's output: what to do, the new bookkeeping, statuses, and when to look again."""

    actions: tuple[Action, ...]
    books: dict[ReplicaKey, ReplicaBook]
    statuses: tuple[ReplicaStatus, ...]
    # The earliest back-off expiry (None: nothing is waiting on a timer).
    next_wake_at: float | None
    # Running replicas whose app has probes: what the shell should probe now.
    probe_targets: dict[ReplicaKey, ProbeTarget] = attrs.field(factory=dict)
    # Containers that may take traffic: each ready replica, and during a start-first update
    # the old container that keeps serving until its successor is ready.
    endpoints: tuple[Endpoint, ...] = ()


# --------------------------------------------------------------------------- helpers


def container_key(info: ContainerInfo) -> ReplicaKey | None:
    """The replica a container claims to be (None if its labels are incomplete)."""
    if not (info.namespace and info.app and info.replica):
        return None
    return ReplicaKey(info.namespace, info.app, info.replica)


def owned_by(info: ContainerInfo, node: str) -> bool:
    return dict(info.labels).get(LABEL_NODE) == node


def _is_running(info: ContainerInfo) -> bool:
    return info.state.value in ("running", "paused")


def _ended(info: ContainerInfo) -> bool:
    return info.state.value in ("exited", "dead")


def _timestamp(info: ContainerInfo, field: str) -> float:
    value = getattr(info, field)
    return float(value.timestamp()) if value is not None else 0.0


def _newest_first(info: ContainerInfo) -> tuple[bool, float, float, str]:
    """Sort key for duplicates: running first, then the latest start, then the latest end."""
    return (
        not _is_running(info),
        -_timestamp(info, "started_at"),
        -_timestamp(info, "finished_at"),
        info.id,
    )


def run_of(info: ContainerInfo) -> RunId:
    """The run a container is in: a restart in place keeps the id, not the start time."""
    return RunId(info.id, _timestamp(info, "started_at"))


def probed_ports(info: ContainerInfo) -> tuple[tuple[int, int], ...]:
    """TCP container port -> host port, as probes reach them (one binding per port)."""
    out: dict[int, int] = {}
    for port in info.ports:
        if port.protocol is Protocol.TCP:
            out.setdefault(port.container_port, port.host_port)
    return tuple(sorted(out.items()))


def published_ports(info: ContainerInfo) -> tuple[tuple[str, str], ...]:
    out = []
    for port in info.ports:
        key = str(port.container_port)
        if port.protocol is not Protocol.TCP:
            key += f"/{port.protocol.value}"
        out.append((key, f"{port.host_ip}:{port.host_port}"))
    return tuple(sorted(set(out)))


def endpoint_of(info: ContainerInfo, placement: Placement, node: str, *, ready: bool) -> Endpoint:
    """The endpoint record of one container of ``placement``'s slot (its own revision)."""
    ports: dict[tuple[int, Protocol], EndpointPort] = {}
    for port in info.ports:
        ports.setdefault(
            (port.container_port, port.protocol),
            EndpointPort(port.container_port, port.host_ip, port.host_port, port.protocol),
        )
    return Endpoint(
        namespace=placement.namespace,
        app=placement.app,
        slot=placement.slot,
        replica=replica_name(placement.app, placement.slot),
        node=node,
        revision=info.generation if info.generation is not None else placement.generation,
        container_id=info.id,
        ports=tuple(v for _, v in sorted(ports.items(), key=lambda kv: (kv[0][0], kv[0][1].value))),
        ready=ready,
    )


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g}s"


def _exit_words(exit_code: int, oom: bool) -> str:
    return "OOMKilled" if oom else f"exit {exit_code}"


def _run_length_s(info: ContainerInfo) -> float:
    if info.started_at is None or info.finished_at is None:
        return 0.0
    return max(0.0, float((info.finished_at - info.started_at).total_seconds()))


def unknown_statuses(
    node: str,
    assignments: Sequence[Assignment],
    previous: Sequence[ReplicaStatus],
    reason: str,
) -> tuple[ReplicaStatus, ...]:
    """Statuses while the engine does not answer: every assigned replica is ``unknown``.

    What was known before (container id, restarts, ports) is kept, so the API still shows it.
    """
    known = {(s.namespace, s.app, s.name): s for s in previous}
    out = []
    for assignment in sorted(assignments, key=lambda a: a.key):
        if assignment.placement.node != node:
            continue
        key = assignment.key
        status = known.get((key.namespace, key.app, key.replica))
        if status is None or status.generation != assignment.generation:
            status = ReplicaStatus(
                name=assignment.name,
                namespace=key.namespace,
                app=key.app,
                slot=assignment.placement.slot,
                node=node,
                generation=assignment.generation,
                state=ReplicaState.UNKNOWN,
            )
        out.append(attrs.evolve(status, state=ReplicaState.UNKNOWN, reason=reason, terminal=False))
    return tuple(out)


# --------------------------------------------------------------------------- outcomes


def after_start(book: ReplicaBook) -> ReplicaBook:
    """A create-and-start succeeded: start failures are forgotten (restarts are not)."""
    return attrs.evolve(book, failures=0, retry_at=0.0, last_error="", error_terminal=False)


def after_restart(book: ReplicaBook, exit: ExitKey) -> ReplicaBook:
    """A restart after ``exit`` succeeded: count it and step the back-off."""
    return attrs.evolve(
        after_start(book),
        restarts=book.restarts + 1,
        backoff_step=book.backoff_step + 1,
        restarted_from=exit,
    )


def after_failure(
    book: ReplicaBook, error: str, terminal: bool, now: float, config: ReconcilerConfig
) -> ReplicaBook:
    """A start or restart failed: remember why and wait the back-off before trying again."""
    return attrs.evolve(
        book,
        failures=book.failures + 1,
        retry_at=now + config.backoff_s(book.failures),
        last_error=error,
        error_terminal=terminal,
    )


# --------------------------------------------------------------------------- the planner


def plan(
    node: str,
    assignments: Sequence[Assignment],
    containers: Sequence[ContainerInfo],
    books: Mapping[ReplicaKey, ReplicaBook],
    now: float,
    *,
    config: ReconcilerConfig,
    busy: Mapping[ReplicaKey, str] | None = None,
    busy_containers: frozenset[str] = frozenset(),
    probe_states: Mapping[ReplicaKey, ProbeState] | None = None,
) -> Plan:
    """Decide one reconciliation pass (see the module docstring for the rules).

    ``busy`` maps replicas with an action still in flight to what it is doing (they are left
    alone, and shown as starting); ``busy_containers`` are ids being removed right now.
    ``probe_states`` are the shell's probe results per replica (a state counts only for the
    run it was made for).
    """
    busy = busy or {}
    probe_states = probe_states or {}
    by_key: dict[ReplicaKey, list[ContainerInfo]] = {}
    actions: list[Action] = []
    wanted = {a.key: a for a in assignments if a.placement.node == node}
    for info in sorted(containers, key=lambda c: c.id):
        if not owned_by(info, node) or info.id in busy_containers:
            continue
        key = container_key(info)
        if key is None or key not in wanted:
            # A replica unassigned while its start is in flight: removed once that ends.
            if info.state.value != "removing" and key not in busy:
                actions.append(
                    RemoveContainer(
                        info.id,
                        key,
                        "not assigned to this node" if key else "unlabelled p2porch container",
                        _is_running(info),
                    )
                )
            continue
        by_key.setdefault(key, []).append(info)

    new_books: dict[ReplicaKey, ReplicaBook] = {}
    statuses: list[ReplicaStatus] = []
    wakes: list[float] = []
    targets: dict[ReplicaKey, ProbeTarget] = {}
    endpoints: list[Endpoint] = []
    for key, assignment in sorted(wanted.items()):
        book = books.get(key)
        if book is None or book.generation != assignment.generation:
            book = ReplicaBook(generation=assignment.generation)
        ctx = _Ctx(assignment, node, now, config, probe_states.get(key))
        found = by_key.get(key, [])
        if key in busy:
            new_books[key] = book
            current = [c for c in found if c.generation == assignment.generation]
            shown = min(current, key=_newest_first) if current else None
            statuses.append(ctx.status(book, ReplicaState.STARTING, busy[key], shown))
            # A start-first successor is being started: the old container keeps serving.
            if assignment.app.spec.update.order is UpdateOrder.START_FIRST:
                endpoints.extend(_held_endpoint(assignment, node, found, frozenset()))
            continue
        step = _plan_replica(ctx, found, book)
        new_books[key] = step.book
        statuses.append(step.status)
        actions.extend(step.actions)
        endpoints.extend(step.endpoints)
        if step.wake_at is not None:
            wakes.append(step.wake_at)
        if step.probe_target is not None:
            targets[key] = step.probe_target
    return Plan(
        actions=tuple(actions),
        books=new_books,
        statuses=tuple(statuses),
        next_wake_at=min(wakes) if wakes else None,
        probe_targets=targets,
        endpoints=tuple(endpoints),
    )


@attrs.frozen
class _Step:
    book: ReplicaBook
    status: ReplicaStatus
    actions: tuple[Action, ...] = ()
    wake_at: float | None = None
    probe_target: ProbeTarget | None = None
    endpoints: tuple[Endpoint, ...] = ()


@attrs.frozen
class _Ctx:
    """What every rule of one replica's pass needs."""

    assignment: Assignment
    node: str
    now: float
    config: ReconcilerConfig
    probes: ProbeState | None = None

    def status(
        self,
        book: ReplicaBook,
        state: ReplicaState,
        reason: str,
        info: ContainerInfo | None = None,
        *,
        exit_code: int | None = None,
        oom: bool = False,
        terminal: bool = False,
        probes_ready: bool = True,
    ) -> ReplicaStatus:
        placement = self.assignment.placement
        return ReplicaStatus(
            name=self.assignment.name,
            namespace=placement.namespace,
            app=placement.app,
            slot=placement.slot,
            node=self.node,
            generation=self.assignment.generation,
            state=state,
            restarts=book.restarts,
            exit_code=exit_code,
            oom_killed=oom,
            reason=reason,
            container_id=info.id if info is not None else "",
            published_ports=published_ports(info) if info is not None else (),
            terminal=terminal,
            probes_ready=probes_ready,
            last_termination=book.last_termination,
        )


def _plan_replica(ctx: _Ctx, found: list[ContainerInfo], book: ReplicaBook) -> _Step:
    step = _plan_current(ctx, found, book)
    if step.status.ready:
        # The slot's current container takes traffic; an older one (if any) is being removed.
        keeper = next(c for c in found if c.id == step.status.container_id)
        ready = endpoint_of(keeper, ctx.assignment.placement, ctx.node, ready=True)
        return attrs.evolve(step, endpoints=(ready,))
    # Not ready: an older container the plan keeps running (start-first) still serves.
    removed = {a.container_id for a in step.actions if isinstance(a, RemoveContainer)}
    removed |= {cid for a in step.actions if isinstance(a, StartReplica) for cid in a.remove_ids}
    held = _held_endpoint(ctx.assignment, ctx.node, found, frozenset(removed))
    return attrs.evolve(step, endpoints=held)


def _held_endpoint(
    assignment: Assignment, node: str, found: list[ContainerInfo], removed: frozenset[str]
) -> tuple[Endpoint, ...]:
    """The newest running container of an older revision that stays (start-first): it
    serves the slot until its successor is ready."""
    for info in sorted(found, key=_newest_first):
        if (
            info.generation != assignment.generation
            and _is_running(info)
            and info.id not in removed
        ):
            return (endpoint_of(info, assignment.placement, node, ready=True),)
    return ()


def _plan_current(ctx: _Ctx, found: list[ContainerInfo], book: ReplicaBook) -> _Step:
    key = ctx.assignment.key
    generation = ctx.assignment.generation
    current = sorted((c for c in found if c.generation == generation), key=_newest_first)
    older = [c for c in found if c.generation != generation and c.state.value != "removing"]
    # Start-first: an older container keeps running (and serving) until its successor is
    # ready; stop-first (and anything not running) goes first.
    start_first = ctx.assignment.app.spec.update.order is UpdateOrder.START_FIRST
    held = [c for c in older if start_first and _is_running(c)]
    actions: list[Action] = []
    keeper = current[0] if current else None
    for extra in current[1:]:
        if extra.state.value != "removing":
            actions.append(
                RemoveContainer(extra.id, key, "duplicate of this replica", _is_running(extra))
            )

    if keeper is None or keeper.state.value in ("created", "removing"):
        # Nothing usable: start one. A container left "created" (a start interrupted before
        # the runtime could clean up) is replaced; one being removed is waited for.
        if keeper is not None and keeper.state.value == "removing":
            status = ctx.status(book, ReplicaState.PENDING, "previous container being removed")
            return _Step(book, status, tuple(actions))
        remove_ids = tuple(c.id for c in older if c not in held) + ((keeper.id,) if keeper else ())
        old_gens = sorted({c.generation for c in older if c.generation is not None})
        why = (
            f"replacing generation {', '.join(map(str, old_gens))} with {generation}"
            if old_gens
            else "creating container"
        )
        if book.last_error:
            state = ReplicaState.FAILED if book.error_terminal else ReplicaState.PENDING
            if ctx.now < book.retry_at:
                reason = f"{book.last_error} (retry in {_fmt_s(round(book.retry_at - ctx.now, 1))})"
                status = ctx.status(book, state, reason, terminal=book.error_terminal)
                return _Step(book, status, tuple(actions), wake_at=book.retry_at)
            reason = f"{book.last_error} (retrying)"
            status = ctx.status(book, state, reason, terminal=book.error_terminal)
        else:
            status = ctx.status(book, ReplicaState.PENDING, why)
        actions.append(StartReplica(key, ctx.assignment, remove_ids, why))
        return _Step(book, status, tuple(actions))

    if _is_running(keeper):
        step = _plan_running(ctx, keeper, book, actions)
    elif not _ended(keeper):  # restarting / unknown: the engine is in the middle of something
        status = ctx.status(book, ReplicaState.STARTING, keeper.state.value, keeper)
        step = _Step(book, status, tuple(actions))
    else:
        step = _plan_ended(ctx, keeper, book, actions)
    # A usable container of the current generation exists: older ones go -- a held one
    # only once its successor is ready.
    going = [c for c in older if c not in held or step.status.ready]
    removals = tuple(
        RemoveContainer(old.id, key, f"generation {old.generation} replaced", _is_running(old))
        for old in going
    )
    return attrs.evolve(step, actions=(*removals, *step.actions))


def _plan_running(
    ctx: _Ctx, keeper: ContainerInfo, book: ReplicaBook, actions: list[Action]
) -> _Step:
    """A running replica: its probes say whether it is ready, or that it must restart."""
    spec = ctx.assignment.app.spec
    if not spec.probes():
        status = ctx.status(book, ReplicaState.RUNNING, "", keeper)
        return _Step(book, status, tuple(actions))
    run = run_of(keeper)
    target = ProbeTarget.for_spec(spec, run, probed_ports(keeper))
    state = ctx.probes if ctx.probes is not None and ctx.probes.run == run else None
    if state is None:
        # A run the prober has not seen yet: only an app without gates is ready already.
        gated = spec.startup is not None or spec.readiness is not None
        status = ctx.status(
            book,
            ReplicaState.RUNNING,
            "waiting for the first probes" if gated else "",
            keeper,
            probes_ready=not gated,
        )
        return _Step(book, status, tuple(actions), probe_target=target)
    verdict = probes.verdict(state)
    if verdict.restart is not None:
        book = attrs.evolve(book, kill_cause=(run, verdict.restart))
        status = ctx.status(
            book,
            ReplicaState.RUNNING,
            f"restarting: {verdict.restart}",
            keeper,
            probes_ready=False,
        )
        actions.append(
            StopContainer(ctx.assignment.key, ctx.assignment, keeper.id, run, verdict.restart)
        )
        return _Step(book, status, tuple(actions))
    status = ctx.status(
        book, ReplicaState.RUNNING, verdict.message, keeper, probes_ready=verdict.ready
    )
    return _Step(book, status, tuple(actions), probe_target=target)


def _plan_ended(
    ctx: _Ctx, keeper: ContainerInfo, book: ReplicaBook, actions: list[Action]
) -> _Step:
    """The replica's process ended: restart per policy after the back-off, or report it."""
    exit_code = keeper.exit_code if keeper.exit_code is not None else -1
    oom = keeper.oom_killed
    exit_key: ExitKey = (keeper.id, _timestamp(keeper, "finished_at"))
    if exit_key != book.last_exit:
        step = book.backoff_step
        if _run_length_s(keeper) >= ctx.config.backoff_reset_after_s:
            step = 0  # it ran stably for a while: this crash starts a new loop
        cause = ""
        if book.kill_cause is not None and book.kill_cause[0] == run_of(keeper):
            cause = book.kill_cause[1]
        book = attrs.evolve(
            book,
            last_exit=exit_key,
            exit_seen_at=ctx.now,
            backoff_step=step,
            kill_cause=None,
            exit_cause=cause,
            last_termination=cause or _exit_words(exit_code, oom),
        )
    if exit_key == book.restarted_from:
        # Restarted already; this listing predates the restart.
        status = ctx.status(book, ReplicaState.STARTING, "restarting", keeper)
        return _Step(book, status, tuple(actions))
    probe_kill = book.exit_cause
    words = probe_kill or _exit_words(exit_code, oom)
    succeeded = exit_code == 0 and not oom and not probe_kill
    ended = ReplicaState.SUCCEEDED if succeeded else ReplicaState.FAILED
    policy = ctx.assignment.app.spec.restart_policy
    # A probe's stop is a failure whatever the process's exit code (its SIGTERM handler may
    # exit 0): as in Kubernetes, on-failure restarts it too.
    policy_code = 1 if probe_kill and exit_code == 0 else exit_code
    if not policy.should_restart(policy_code, book.restarts):
        if policy.kind is RestartPolicyKind.NEVER:
            why = "restart policy never"
        elif policy.kind is RestartPolicyKind.ON_FAILURE and policy_code == 0:
            why = "completed; restart policy on-failure"
        else:
            why = f"restart limit {policy.max_restarts} reached"
        if probe_kill:
            reason = f"stopped ({words}); {why}"
        else:
            reason = f"OOMKilled; {why}" if oom else f"exited ({words}); {why}"
        status = ctx.status(
            book, ended, reason, keeper, exit_code=exit_code, oom=oom, terminal=True
        )
        return _Step(book, status, tuple(actions))
    delay = ctx.config.backoff_s(book.backoff_step)
    due = max(book.exit_seen_at + delay, book.retry_at)
    kind = "completed" if ended is ReplicaState.SUCCEEDED else "failed"
    prefix = "OOMKilled; " if oom else ""
    if ctx.now < due:
        reason = f"{prefix}back-off {_fmt_s(delay)} restarting {kind} container ({words})"
        if book.last_error:
            reason += f"; last attempt: {book.last_error}"
        status = ctx.status(book, ended, reason, keeper, exit_code=exit_code, oom=oom)
        return _Step(book, status, tuple(actions), wake_at=due)
    reason = f"{prefix}restarting {kind} container ({words})"
    status = ctx.status(book, ended, reason, keeper, exit_code=exit_code, oom=oom)
    actions.append(
        RestartContainer(ctx.assignment.key, ctx.assignment, keeper.id, exit_key, reason)
    )
    return _Step(book, status, tuple(actions))
