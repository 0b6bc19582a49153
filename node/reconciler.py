"""The reconciler's trio shell: makes this node's Docker engine match its placements.

Every node runs one :class:`Reconciler`. The daemon tells it what this node must run with
:meth:`Reconciler.set_desired` (each time the Raft log applies a change); the reconciler does
the rest, on its own schedule:

* it wakes on a new desired set, on the engine's events for this node's containers (die, oom,
  start, destroy -- a crash is answered at once, not at the next poll), on a resync timer, and
  when a back-off timer expires;
* each pass lists the node's containers (``DockerRuntime.list_owned``: only those labelled
  ``io.p2porch.node=<this node>``), asks the pure planner (:mod:`p2porch.node.reconcile_core`)
  what to do, and starts the actions as background tasks, at most ``max_parallel_actions`` at
  once; a replica with an action in flight is left alone by later passes until it completes;
* it keeps a :class:`~p2porch.node.reconcile_core.ReplicaStatus` per assigned replica.

Status changes, for the daemon (gossip, the API, ``ReportReplica``): :meth:`statuses` is the
current list, :attr:`status_version` counts changes, and ``await wait_statuses_changed(seen)``
returns as soon as the version passes ``seen``. A version counter rather than a channel: the
daemon only ever wants the *latest* statuses, so a slow reader skips intermediate versions
instead of queueing them, and any number of readers can wait. :meth:`terminal_facts` gives
the ``ReplicaFact`` values to log for replicas that cannot start or ended for good.

Static stability: the first pass waits for the first :meth:`set_desired` (so a restarted
daemon does not take "nothing assigned yet" for "remove everything"); then containers that
match a placement are adopted as they are, and the others are removed.

Restarts happen in place (the ended container is started again, same id, so ``logs`` shows
the crashed runs too); a new spec generation replaces the container (stop, remove, create).
The runtime has no ``start(container_id)`` call, so a restart checks ownership with
``inspect`` and then starts through ``run_engine`` (see the report: a runtime method would be
cleaner).

Health probes: each pass hands the running replicas whose app has probes to the prober (a
table of :class:`~p2porch.node.probes.ProbeState` per replica, the rules in
:mod:`p2porch.node.probes`). A prober task launches each probe when due, at most
``max_parallel_probes`` at once, each under its own timeout:

* HTTP GET (h11 over a trio TCP stream) and TCP connect go to the replica's **published port
  on the node's advertise address** -- the runtime publishes every container port there --
  never to the container's bridge address;
* exec runs through the runtime (``exec_probe``: exit 0 passes; the wait is bounded by the
  timeout, not by the engine request timeout).

A result that changes a replica's verdict wakes a pass, which publishes the new ``ready`` and,
when liveness or startup gave up, stops the container (the planner's ``StopContainer``); the
exit is then restarted like any crash. Results for a run that has ended are dropped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import h11
import trio

from p2porch.node import probes
from p2porch.node import reconcile_core as core
from p2porch.node.endpoints import Endpoint
from p2porch.node.errors import (
    ContainerConflict,
    ContainerNotFound,
    EngineRefused,
    EngineUnavailable,
    ImageUnavailable,
    NodeError,
    NotOwned,
    SpecError,
)
from p2porch.node.probes import ProbeKind, ProbeResult, ProbeState, ProbeTarget
from p2porch.node.reconcile_core import (
    Action,
    Assignment,
    ReconcilerConfig,
    ReplicaBook,
    ReplicaKey,
    ReplicaState,
    ReplicaStatus,
)
from p2porch.node.runtime import ContainerRequest, DockerRuntime
from p2porch.node.spec import App, ExecAction, HttpGetAction, Probe
from p2porch.node.state import Placement, ReplicaFact

log = logging.getLogger("p2porch.node.reconciler")

__all__ = ["Reconciler", "ReconcilerConfig", "ReconcilerError", "ReplicaState", "ReplicaStatus"]

# Listings retried when an action completed meanwhile (the listing may predate its effect).
_MAX_RELISTS = 3

# A TCP probe reaches the replica through the engine's port proxy, which accepts every
# connection and closes it at once when nothing listens in the container (measured: ~2 ms).
# So a connection must also stay open this long (or bring data) to count as a success.
TCP_PROBE_SETTLE_S = 0.25
# The most of a response head an HTTP probe reads (h11's own limit on incomplete events).
_HTTP_PROBE_MAX_HEAD = 64 * 1024
_PROBE_USER_AGENT = "p2porch-probe/1"
_CLOSED_EARLY = "connection closed before a response"


class ReconcilerError(NodeError):
    """The reconciler was set up wrongly (e.g. a runtime of another node)."""


class Reconciler:
    """Drives the local engine toward this node's placements (see the module docstring)."""

    def __init__(
        self,
        runtime: DockerRuntime,
        node_name: str,
        advertise_host: str,
        config: ReconcilerConfig | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if runtime.node_name != node_name:
            raise ReconcilerError(
                f"the runtime belongs to node {runtime.node_name!r}, not {node_name!r}"
            )
        if runtime.advertise_address != advertise_host:
            raise ReconcilerError(
                f"the runtime publishes ports on {runtime.advertise_address}, "
                f"not on the advertise address {advertise_host}"
            )
        self.node_name = node_name
        self.advertise_host = advertise_host
        self.config = config or ReconcilerConfig()
        self._runtime = runtime
        self._clock = clock
        # Dates a newly seen run against the engine's start time (a probe's initial delay).
        self._wall_clock = wall_clock
        self._assignments: list[Assignment] = []
        self._placements: dict[ReplicaKey, Placement] = {}
        self._have_desired = trio.Event()
        self._halted = False
        self._books: dict[ReplicaKey, ReplicaBook] = {}
        self._statuses: tuple[ReplicaStatus, ...] = ()
        # The plan's endpoints, and containers being drained (withdrawn, still running).
        self._plan_endpoints: tuple[Endpoint, ...] = ()
        self._endpoints: tuple[Endpoint, ...] = ()
        self._draining: set[str] = set()
        self._version = 0
        self._changed = trio.Event()
        self._wake = trio.Event()
        self._busy: dict[ReplicaKey, str] = {}
        self._busy_containers: set[str] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._completed = 0
        self._limiter = trio.CapacityLimiter(self.config.max_parallel_actions)
        self._image_locks: dict[str, trio.Lock] = {}
        self._actions: trio.Nursery | None = None
        # The prober: per replica, its probe state (one run) and where to reach it.
        self._probe_states: dict[ReplicaKey, ProbeState] = {}
        self._probe_targets: dict[ReplicaKey, ProbeTarget] = {}
        self._probe_wake = trio.Event()
        self._probe_limiter = trio.CapacityLimiter(self.config.max_parallel_probes)
        # Counters, for tests and the daemon's metrics.
        self.passes = 0
        self.events_seen = 0
        self.actions_done = 0
        self.probes_run = 0

    # ------------------------------------------------------------------ the daemon's side

    @property
    def runtime(self) -> DockerRuntime:
        """The engine this reconciler drives (the API uses it for logs and exec)."""
        return self._runtime

    def set_desired(self, placements: Iterable[Placement], apps: Iterable[App]) -> None:
        """What this node must run now (placements of other nodes are ignored)."""
        by_key: dict[tuple[str, str], App] = {}
        by_revision: dict[tuple[str, str, int], App] = {}
        for app in apps:  # several revisions of one app may be given: the last is current
            by_key[app.key] = app
            by_revision[(*app.key, app.meta.generation)] = app
        self._assignments = core.assignments_for(
            self.node_name, list(placements), by_key, by_revision
        )
        self._placements = {a.key: a.placement for a in self._assignments}
        self._halted = False
        self._have_desired.set()
        self._poke()

    def statuses(self) -> list[ReplicaStatus]:
        """The status of every replica assigned to this node, in (namespace, app, name) order."""
        return list(self._statuses)

    def is_idle(self) -> bool:
        """No engine action in flight (a drain counts: its container still runs)."""
        return self._idle.is_set()

    def endpoints(self) -> list[Endpoint]:
        """Containers of this node that may take traffic now (ready, not being drained)."""
        return list(self._endpoints)

    @property
    def status_version(self) -> int:
        """Bumped on every change of :meth:`statuses`."""
        return self._version

    async def wait_statuses_changed(self, seen_version: int) -> int:
        """Wait until the status version is past ``seen_version``; return the new version."""
        while self._version <= seen_version:
            await self._changed.wait()
        return self._version

    def terminal_facts(self) -> list[ReplicaFact]:
        """``ReportReplica`` facts for replicas that cannot start or ended for good."""
        out = []
        for status in self._statuses:
            placement = self._placements.get(ReplicaKey(status.namespace, status.app, status.name))
            fact = status.to_fact(placement.generation) if placement is not None else None
            if fact is not None:
                out.append(fact)
        return out

    def poke(self) -> None:
        """Ask for a pass now (e.g. after the daemon learned the engine restarted)."""
        self._poke()

    # ------------------------------------------------------------------ the loop

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile until cancelled. ``started`` once the engine event watch is set up."""
        async with trio.open_nursery() as nursery:
            self._actions = nursery
            await nursery.start(self._watch_events)
            nursery.start_soon(self._probe_loop)
            task_status.started()
            await self._have_desired.wait()
            while True:
                deadline = await self._pass()
                with trio.move_on_at(deadline):
                    await self._wake.wait()

    async def shutdown_all(self) -> None:
        """Stop and remove every container of this node (tests, ``leave --stop-containers``).

        Clears the desired set, waits for actions in flight, then removes what is left; the
        loop stays idle until the next :meth:`set_desired`.
        """
        self._halted = True
        self._assignments = []
        self._placements = {}
        await self._idle.wait()
        containers = await self._runtime.list_owned()
        async with trio.open_nursery() as nursery:
            for info in containers:
                action = core.RemoveContainer(info.id, None, "shutting down", info.running)
                nursery.start_soon(self._limited, action)
        self._books = {}
        self._set_probe_targets({})
        self._publish((), ())

    def _poke(self) -> None:
        self._wake.set()

    async def _pass(self) -> float:
        """One reconciliation pass; returns when the next one is due at the latest."""
        self._wake = trio.Event()  # set from here on: a wake during the listing is kept
        self.passes += 1
        for _ in range(_MAX_RELISTS):
            epoch = self._completed
            try:
                containers = await self._runtime.list_owned()
            except NodeError as exc:
                log.warning("node %s: cannot list containers: %s", self.node_name, exc)
                self._engine_down(str(exc))
                return self._clock() + self.config.engine_retry_s
            if self._completed == epoch:
                break
        if self._halted:
            return self._clock() + self.config.resync_interval_s
        now = self._clock()
        result = core.plan(
            self.node_name,
            self._assignments,
            containers,
            self._books,
            now,
            config=self.config,
            busy=self._busy,
            busy_containers=frozenset(self._busy_containers),
            probe_states=self._probe_states,
        )
        self._books = result.books
        self._set_probe_targets(result.probe_targets)
        self._publish(result.statuses, result.endpoints)
        for action in result.actions:
            self._start_action(action)
        deadline = now + self.config.resync_interval_s
        if result.next_wake_at is not None:
            deadline = min(deadline, result.next_wake_at)
        return deadline

    def _engine_down(self, reason: str) -> None:
        """The engine does not answer: what we knew is now unknown (probing stops too: a
        verdict reached now could not be acted on, nor trusted once the engine is back)."""
        self._set_probe_targets({})
        self._publish(
            core.unknown_statuses(
                self.node_name,
                self._assignments,
                self._statuses,
                f"engine unavailable: {reason}",
            ),
            (),  # nothing can be vouched for while the engine does not answer
        )

    def _publish(
        self, statuses: tuple[ReplicaStatus, ...], endpoints: tuple[Endpoint, ...] | None = None
    ) -> None:
        if endpoints is not None:
            self._plan_endpoints = endpoints
        shown = tuple(e for e in self._plan_endpoints if e.container_id not in self._draining)
        if statuses == self._statuses and shown == self._endpoints:
            return
        self._statuses = statuses
        self._endpoints = shown
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _watch_events(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Wake the loop on every engine event for this node; resubscribe when it drops."""
        started = False
        while True:
            try:
                async with self._runtime.events() as events:
                    if not started:
                        task_status.started()
                        started = True
                    self._poke()  # (re)subscribed: events may have been missed meanwhile
                    async for event in events:
                        self.events_seen += 1
                        log.debug("node %s: %s %s", self.node_name, event.kind.value, event.replica)
                        self._poke()
            except NodeError as exc:
                log.warning("node %s: engine event stream: %s", self.node_name, exc)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(self.config.engine_retry_s)

    # ------------------------------------------------------------------ actions

    def _start_action(self, action: Action) -> None:
        if self._actions is None:
            raise ReconcilerError("actions can only start inside run()")
        if isinstance(action, core.RemoveContainer):
            self._busy_containers.add(action.container_id)
        elif isinstance(action, core.StartReplica):
            self._busy[action.key] = action.why
        elif isinstance(action, core.StopContainer):
            self._busy[action.key] = f"restarting: {action.why}"
        else:
            self._busy[action.key] = "restarting"
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._actions.start_soon(self._limited, action)

    async def _limited(self, action: Action) -> None:
        try:
            async with self._limiter:
                if isinstance(action, core.StartReplica):
                    await self._start_replica(action)
                elif isinstance(action, core.RestartContainer):
                    await self._restart(action)
                elif isinstance(action, core.StopContainer):
                    await self._stop_for_probe(action)
                else:
                    await self._remove(action.container_id, action.running, action.why)
        finally:
            if isinstance(action, core.RemoveContainer):
                self._busy_containers.discard(action.container_id)
            else:
                self._busy.pop(action.key, None)
            self._completed += 1
            self.actions_done += 1
            if not self._busy and not self._busy_containers:
                self._idle.set()
            self._poke()

    def _update_book(
        self, key: ReplicaKey, generation: int, fn: Callable[[ReplicaBook], ReplicaBook]
    ) -> None:
        book = self._books.get(key)
        if book is None or book.generation != generation:
            return  # reassigned or a new generation meanwhile: this outcome is stale
        self._books[key] = fn(book)

    async def _start_replica(self, action: core.StartReplica) -> None:
        assignment = action.assignment
        key, generation = action.key, assignment.generation
        for container_id in action.remove_ids:
            await self._remove(container_id, True, action.why)
        image = assignment.app.spec.image
        try:
            lock = self._image_locks.setdefault(image, trio.Lock())
            async with lock:
                if not await self._runtime.has_image(image):
                    self._busy[key] = f"pulling image {image}"
                    self._poke()
                    await self._runtime.ensure_image(image)
            self._busy[key] = "starting container"
            request = ContainerRequest.for_replica(
                assignment.app, assignment.name, publish=self.config.bind_published_ports
            )
            info = await self._runtime.create_and_start(request)
        except ImageUnavailable as exc:
            self._failed(key, generation, f"image {exc.ref} unavailable: {exc.reason}", True)
        except (EngineRefused, NotOwned, SpecError) as exc:
            self._failed(key, generation, f"cannot start: {exc}", True)
        except NodeError as exc:
            self._failed(key, generation, f"start failed: {exc}", False)
        else:
            log.info(
                "node %s: started %s (%s) as %s", self.node_name, key, action.why, info.id[:12]
            )
            self._update_book(key, generation, core.after_start)

    async def _restart(self, action: core.RestartContainer) -> None:
        key, generation = action.key, action.assignment.generation
        container_id = action.container_id
        try:
            await self._runtime.inspect(container_id)  # raises NotOwned for a foreign id
            await self._runtime.run_engine(
                lambda client: client.api.start(container_id),
                f"restarting container {container_id[:12]}",
            )
        except ContainerNotFound:
            return  # gone meanwhile: the next pass creates a new one
        except (EngineRefused, NotOwned) as exc:
            self._failed(key, generation, f"cannot restart: {exc}", True)
        except NodeError as exc:
            self._failed(key, generation, f"restart failed: {exc}", False)
        else:
            log.info("node %s: %s %s", self.node_name, action.why, key)
            self._update_book(key, generation, lambda b: core.after_restart(b, action.exit))

    async def _stop_for_probe(self, action: core.StopContainer) -> None:
        """Stop a replica whose liveness/startup probe gave up; the planner restarts the exit."""
        log.warning("node %s: replica %s: %s; stopping it", self.node_name, action.key, action.why)
        try:
            await self._runtime.stop(action.container_id, timeout_s=self.config.stop_timeout_s)
        except ContainerNotFound:
            pass  # gone meanwhile: the next pass creates a new one
        except NodeError as exc:
            log.warning(
                "node %s: stopping %s failed (probed again next pass): %s",
                self.node_name,
                action.key,
                exc,
            )

    def _failed(self, key: ReplicaKey, generation: int, error: str, terminal: bool) -> None:
        log.warning("node %s: replica %s: %s", self.node_name, key, error)
        now = self._clock()
        self._update_book(
            key, generation, lambda b: core.after_failure(b, error, terminal, now, self.config)
        )

    async def _drain(self, container_id: str) -> None:
        """Withdraw a running container from the endpoints, then give the cluster
        ``drain_s`` to stop sending to it before it is stopped."""
        if self.config.drain_s <= 0 or container_id in self._draining:
            return
        self._draining.add(container_id)
        self._publish(self._statuses)
        await trio.sleep(self.config.drain_s)

    async def _remove(self, container_id: str, running: bool, why: str) -> None:
        """Stop gracefully when running (drained first), then remove; failures are left for
        the next pass."""
        try:
            await self._remove_now(container_id, running, why)
        finally:
            if container_id in self._draining:
                self._draining.discard(container_id)
                self._publish(self._statuses)

    async def _remove_now(self, container_id: str, running: bool, why: str) -> None:
        try:
            if running:
                await self._drain(container_id)
                try:
                    await self._runtime.stop(container_id, timeout_s=self.config.stop_timeout_s)
                except ContainerNotFound:
                    return
            await self._runtime.remove(container_id, missing_ok=True)
            log.info("node %s: removed %s (%s)", self.node_name, container_id[:12], why)
        except NotOwned as exc:
            log.warning("node %s: refusing to remove: %s", self.node_name, exc)
        except ContainerNotFound:
            pass
        except NodeError as exc:
            log.warning(
                "node %s: removing %s failed (retried next pass): %s",
                self.node_name,
                container_id[:12],
                exc,
            )

    # ------------------------------------------------------------------ probes

    def _set_probe_targets(self, targets: dict[ReplicaKey, ProbeTarget]) -> None:
        """The replicas to probe now: known runs keep their state, new runs start afresh."""
        self._probe_targets = targets
        self._probe_states = probes.refresh(
            self._probe_states, targets, self._clock(), self._wall_clock()
        )
        self._probe_wake.set()

    async def _probe_loop(self) -> None:
        """Launch every probe when it is due; sleep until the next one or a change."""
        async with trio.open_nursery() as nursery:
            while True:
                self._probe_wake = trio.Event()
                now = self._clock()
                wake_at = math.inf
                for key, state in list(self._probe_states.items()):
                    target = self._probe_targets.get(key)
                    if target is None:
                        continue
                    for kind in probes.due(state, now):
                        state = probes.launched(state, kind, now)
                        nursery.start_soon(self._probe_once, key, target, kind)
                    self._probe_states[key] = state
                    due_at = probes.next_due(state)
                    if due_at is not None:
                        wake_at = min(wake_at, due_at)
                with trio.move_on_at(wake_at):
                    await self._probe_wake.wait()

    async def _probe_once(self, key: ReplicaKey, target: ProbeTarget, kind: ProbeKind) -> None:
        probe = target.probe(kind)
        if probe is None:
            return
        async with self._probe_limiter:
            try:
                result = await self._run_probe(probe, target)
            except Exception as exc:
                # A bug in a probe must cost that probe, never the node's reconciler.
                log.exception("node %s: %s probe of %s crashed", self.node_name, kind.value, key)
                result = ProbeResult.error(f"probe crashed: {exc!r}")
        self.probes_run += 1
        state = self._probe_states.get(key)
        if state is None or state.run != target.run:
            return  # the run ended or was replaced meanwhile: a stale result
        before = probes.verdict(state)
        state = probes.record(state, kind, result)
        self._probe_states[key] = state
        after = probes.verdict(state)
        if after != before:
            log.info(
                "node %s: replica %s: %s (%s probe: %s)",
                self.node_name,
                key,
                after.describe(),
                kind.value,
                result.detail,
            )
            self._poke()  # a pass publishes the new readiness, or stops the replica
        self._probe_wake.set()

    async def _run_probe(self, probe: Probe, target: ProbeTarget) -> ProbeResult:
        """Run one probe against one replica, within its timeout."""
        action = probe.action
        if isinstance(action, ExecAction):
            return await exec_probe(
                self._runtime, target.run.container_id, action.command, probe.timeout_s
            )
        host_port = target.host_port(action.port)
        if host_port is None:
            return ProbeResult.failure(f"container port {action.port} is not published")
        if isinstance(action, HttpGetAction):
            return await http_probe(
                self.advertise_host,
                host_port,
                action.path,
                probe.timeout_s,
                local_address=self.advertise_host,
            )
        return await tcp_probe(
            self.advertise_host, host_port, probe.timeout_s, local_address=self.advertise_host
        )


# --------------------------------------------------------------------------- probe I/O


def _connect_words(exc: OSError) -> str:
    """``connection refused`` rather than trio's 'all attempts to connect ... failed'."""
    causes: list[BaseException] = [exc]
    if isinstance(exc.__cause__, BaseExceptionGroup):
        causes = list(exc.__cause__.exceptions)
    elif exc.__cause__ is not None:
        causes = [exc.__cause__]
    if all(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection refused"
    first = causes[0]
    return f"cannot connect: {first.strerror if isinstance(first, OSError) else first}"


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def http_probe(
    host: str, port: int, path: str, timeout_s: float, *, local_address: str | None = None
) -> ProbeResult:
    """GET ``path`` from ``host:port``: a 2xx or 3xx answer passes (redirects not followed).

    One connection per probe (``Connection: close``), as Kubernetes does; only the response
    head is read.
    """
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        except OSError as exc:
            return ProbeResult.failure(_connect_words(exc))
        async with stream:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_HTTP_PROBE_MAX_HEAD)
            request = h11.Request(
                method="GET",
                target=path,
                headers=[
                    ("Host", _host_header(host, port)),
                    ("User-Agent", _PROBE_USER_AGENT),
                    ("Accept", "*/*"),
                    ("Connection", "close"),
                ],
            )
            try:
                await stream.send_all(conn.send(request))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(16384)
                        if not data:
                            return ProbeResult.failure(_CLOSED_EARLY)
                        conn.receive_data(data)
                    elif isinstance(event, h11.Response):
                        words = f"HTTP {event.status_code}"
                        if 200 <= event.status_code < 400:
                            return ProbeResult.success(words)
                        return ProbeResult.failure(words)
                    # Otherwise an informational (1xx) response: the final one follows.
            except h11.RemoteProtocolError as exc:
                return ProbeResult.failure(f"bad HTTP response: {exc}")
            except (OSError, trio.BrokenResourceError):
                # Reset rather than closed: the same news (the engine's port proxy does
                # either when nothing listens in the container).
                return ProbeResult.failure(_CLOSED_EARLY)
    return ProbeResult.failure(f"timed out after {timeout_s:g}s")


async def tcp_probe(
    host: str, port: int, timeout_s: float, *, local_address: str | None = None
) -> ProbeResult:
    """Connect to ``host:port``: passes when the connection opens and is not closed at once.

    The engine's port proxy accepts every connection to a published port and closes it when
    the container does not listen, so an immediate close (within ``TCP_PROBE_SETTLE_S``,
    without a byte) is a failure. A server that closes every connection at once without
    writing anything would fail this probe: use an HTTP or exec probe for it.
    """
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        except OSError as exc:
            return ProbeResult.failure(_connect_words(exc))
        async with stream:
            with trio.move_on_after(TCP_PROBE_SETTLE_S):
                try:
                    data = await stream.receive_some(1)
                except (OSError, trio.BrokenResourceError):
                    data = b""  # reset rather than closed: the same news
                if not data:
                    return ProbeResult.failure("connection closed at once (nothing listening?)")
            return ProbeResult.success("connected")
    return ProbeResult.failure(f"timed out after {timeout_s:g}s")


def _output_excerpt(output: bytes) -> str:
    """The last non-empty line of a command's output, short enough for a status reason."""
    lines = [line.strip() for line in output.decode("utf-8", "replace").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    last = lines[-1]
    return last if len(last) <= 80 else last[:77] + "..."


async def exec_probe(
    runtime: DockerRuntime, container_id: str, command: tuple[str, ...], timeout_s: float
) -> ProbeResult:
    """Run ``command`` in the container: exit 0 passes. An engine that does not answer, or a
    container already gone or stopped, is an error (not counted): the planner sees the exit."""
    try:
        code, output = await runtime.exec_probe(container_id, command, timeout_s)
    except (EngineUnavailable, ContainerNotFound, ContainerConflict, NotOwned) as exc:
        return ProbeResult.error(str(exc))
    except NodeError as exc:
        return ProbeResult.failure(f"exec refused: {exc}")
    if code is None:
        return ProbeResult.failure(f"timed out after {timeout_s:g}s")
    if code == 0:
        return ProbeResult.success("exit 0")
    excerpt = _output_excerpt(output)
    return ProbeResult.failure(f"exit {code}: {excerpt}" if excerpt else f"exit {code}")
