"""Health probes of replicas, decided without I/O: results in, verdicts out.

An App may give its replicas a **startup**, a **liveness** and a **readiness** probe
(:class:`~p2porch.node.spec.Probe`: HTTP GET, TCP connect or exec, with Kubernetes' timing
fields). The reconciler's shell (:mod:`p2porch.node.reconciler`) runs them against each running
replica and feeds every result back here; this module holds the rules, so unit tests can walk
them with a clock they set by hand (``now`` is always passed in; nothing here reads a clock,
a socket or the engine):

* State is kept per **run** of a container (:class:`RunId`: its id and start time). A restart
  in place keeps the id but not the start time, so every run starts afresh: startup not yet
  passed, readiness not yet passed, liveness passing.
* A probe first runs ``initial_delay_s`` after the container started, then every ``period_s``;
  one of a kind is in flight at a time (the shell bounds each by ``timeout_s``).
* Until the startup probe has passed once, liveness and readiness do not run, and the replica
  is not ready. Once passed it never runs again for that run.
* ``failure_threshold`` consecutive failures make a probe failing, ``success_threshold``
  consecutive successes passing. A failing liveness or startup probe asks for a **restart**
  (the planner stops the container, and the ordinary restart path -- policy, back-off, the
  restart count -- takes it from there); after that the run is not probed any more.
* The replica is **ready** when the startup probe (if any) has passed and the readiness probe
  (if any) is passing. With neither, a running replica is ready.
* A probe the node could not run at all (the engine did not answer an exec) is an ``ERROR``:
  not counted either way, as Kubernetes' kubelet discards prober errors -- an engine hiccup
  must not restart healthy replicas.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

import attrs

from p2porch.node.spec import AppSpec, Probe

K = TypeVar("K")


class ProbeKind(enum.Enum):
    STARTUP = "startup"
    LIVENESS = "liveness"
    READINESS = "readiness"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    # The node could not run the probe (engine unavailable): not counted.
    ERROR = "error"


@attrs.frozen
class ProbeResult:
    """One probe run: its outcome and a short detail (``HTTP 500``, ``exit 1``, ...)."""

    outcome: Outcome
    detail: str = ""

    @classmethod
    def success(cls, detail: str = "") -> ProbeResult:
        return cls(Outcome.SUCCESS, detail)

    @classmethod
    def failure(cls, detail: str) -> ProbeResult:
        return cls(Outcome.FAILURE, detail)

    @classmethod
    def error(cls, detail: str) -> ProbeResult:
        return cls(Outcome.ERROR, detail)


@attrs.frozen(order=True)
class RunId:
    """One run of a replica's container (a restart in place changes ``started_at`` only)."""

    container_id: str
    # The engine's start time of this run, in seconds since the epoch.
    started_at: float


@attrs.frozen
class ProbeTarget:
    """A running replica to probe, as the planner hands it to the shell."""

    run: RunId
    startup: Probe | None = None
    liveness: Probe | None = None
    readiness: Probe | None = None
    # TCP container port -> the host port it is published on (at the node's advertise address).
    ports: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_spec(
        cls, spec: AppSpec, run: RunId, ports: tuple[tuple[int, int], ...] = ()
    ) -> ProbeTarget:
        return cls(run, spec.startup, spec.liveness, spec.readiness, ports)

    def host_port(self, container_port: int) -> int | None:
        for port, host_port in self.ports:
            if port == container_port:
                return host_port
        return None

    def probe(self, kind: ProbeKind) -> Probe | None:
        if kind is ProbeKind.STARTUP:
            return self.startup
        return self.liveness if kind is ProbeKind.LIVENESS else self.readiness

    def probes(self) -> tuple[tuple[ProbeKind, Probe], ...]:
        out = []
        for kind in ProbeKind:
            probe = self.probe(kind)
            if probe is not None:
                out.append((kind, probe))
        return tuple(out)


@attrs.frozen
class Track:
    """One probe of one run: when it runs next, and its consecutive results."""

    kind: ProbeKind
    probe: Probe
    next_due: float
    # The verdict so far: liveness starts passing, startup and readiness do not.
    passing: bool
    in_flight: bool = False
    successes: int = 0
    failures: int = 0
    # The last counted result's detail ("" before the first).
    detail: str = ""
    # Startup only: passed once, so it never runs again for this run.
    done: bool = False


@attrs.frozen
class ProbeState:
    """Every probe of one run of one replica."""

    run: RunId
    tracks: tuple[Track, ...]
    # Set once a liveness or startup probe gave up: why the run must be restarted.
    restart: str | None = None

    def track(self, kind: ProbeKind) -> Track | None:
        for track in self.tracks:
            if track.kind is kind:
                return track
        return None


@attrs.frozen
class Verdict:
    """What the probes say about a run: ready or not (and why), or restart it (and why)."""

    ready: bool
    message: str = ""
    restart: str | None = None

    def describe(self) -> str:
        """``ready``, ``not ready: <why>`` or ``restart: <why>``."""
        if self.restart is not None:
            return f"restart: {self.restart}"
        return "ready" if self.ready else f"not ready: {self.message}"


# --------------------------------------------------------------------------- lifecycle


def start(target: ProbeTarget, now: float, running_for_s: float = 0.0) -> ProbeState | None:
    """The state of a run first seen at ``now``, already ``running_for_s`` old (None: no probes).

    The initial delay counts from the container's start, so a replica adopted by a restarted
    daemon is probed at once rather than after another initial delay.
    """
    tracks = []
    for kind, probe in target.probes():
        delay = max(0.0, probe.initial_delay_s - max(0.0, running_for_s))
        tracks.append(
            Track(kind=kind, probe=probe, next_due=now + delay, passing=kind is ProbeKind.LIVENESS)
        )
    return ProbeState(target.run, tuple(tracks)) if tracks else None


def refresh(
    table: Mapping[K, ProbeState], targets: Mapping[K, ProbeTarget], now: float, wall_now: float
) -> dict[K, ProbeState]:
    """The probe table for the replicas running now: a run seen before (with the same probes)
    keeps its state, a new run (new container, restart in place) starts afresh, and replicas
    no longer running are dropped. ``wall_now`` (epoch seconds) dates a new run against its
    engine start time."""
    out: dict[K, ProbeState] = {}
    for key, target in targets.items():
        old = table.get(key)
        if (
            old is not None
            and old.run == target.run
            and tuple((t.kind, t.probe) for t in old.tracks) == target.probes()
        ):
            out[key] = old
            continue
        state = start(target, now, wall_now - target.run.started_at)
        if state is not None:
            out[key] = state
    return out


def _gated(state: ProbeState, track: Track) -> bool:
    """Liveness and readiness wait for the startup probe to pass."""
    if track.kind is ProbeKind.STARTUP:
        return False
    startup = state.track(ProbeKind.STARTUP)
    return startup is not None and not startup.passing


def _can_run(state: ProbeState, track: Track) -> bool:
    return (
        state.restart is None
        and not track.in_flight
        and not track.done
        and not _gated(state, track)
    )


def due(state: ProbeState, now: float) -> tuple[ProbeKind, ...]:
    """The probes to launch now."""
    return tuple(t.kind for t in state.tracks if _can_run(state, t) and t.next_due <= now)


def next_due(state: ProbeState) -> float | None:
    """When the next probe of this run is due (None: none until a result arrives)."""
    times = [t.next_due for t in state.tracks if _can_run(state, t)]
    return min(times) if times else None


def _replace(state: ProbeState, track: Track) -> ProbeState:
    return attrs.evolve(
        state, tracks=tuple(track if t.kind is track.kind else t for t in state.tracks)
    )


def launched(state: ProbeState, kind: ProbeKind, now: float) -> ProbeState:
    """A probe of ``kind`` was started at ``now``: the next one is due a period later."""
    track = state.track(kind)
    if track is None:
        return state
    return _replace(state, attrs.evolve(track, in_flight=True, next_due=now + track.probe.period_s))


def _failed_words(kind: ProbeKind, failures: int, detail: str) -> str:
    if failures == 1:
        return f"{kind.value} probe failed: {detail}"
    return f"{kind.value} probe failed {failures} consecutive times: {detail}"


def record(state: ProbeState, kind: ProbeKind, result: ProbeResult) -> ProbeState:
    """A probe of ``kind`` finished with ``result``: count it and update the verdict."""
    track = state.track(kind)
    if track is None:
        return state
    track = attrs.evolve(track, in_flight=False)
    if state.restart is not None or result.outcome is Outcome.ERROR:
        return _replace(state, track)
    probe = track.probe
    restart = None
    if result.outcome is Outcome.SUCCESS:
        successes = track.successes + 1
        passing = track.passing or successes >= probe.success_threshold
        track = attrs.evolve(
            track,
            successes=successes,
            failures=0,
            passing=passing,
            detail=result.detail,
            done=kind is ProbeKind.STARTUP and passing,
        )
    else:
        failures = track.failures + 1
        passing = track.passing and failures < probe.failure_threshold
        track = attrs.evolve(
            track, successes=0, failures=failures, passing=passing, detail=result.detail
        )
        if kind is not ProbeKind.READINESS and failures >= probe.failure_threshold:
            restart = _failed_words(kind, failures, result.detail)
    state = _replace(state, track)
    return attrs.evolve(state, restart=restart) if restart is not None else state


def verdict(state: ProbeState) -> Verdict:
    """Ready, not ready (with the reason), or restart (with the reason)."""
    if state.restart is not None:
        return Verdict(False, state.restart, state.restart)
    startup = state.track(ProbeKind.STARTUP)
    if startup is not None and not startup.passing:
        if startup.failures:
            return Verdict(False, f"startup probe has not passed yet (last: {startup.detail})")
        return Verdict(False, "waiting for the startup probe")
    readiness = state.track(ProbeKind.READINESS)
    if readiness is not None and not readiness.passing:
        if readiness.failures:
            # No count in the message: it would change every period, and every change of a
            # replica's status is a new status version for the daemon to spread.
            return Verdict(False, f"readiness probe failing: {readiness.detail}")
        if readiness.successes:
            threshold = readiness.probe.success_threshold
            return Verdict(
                False, f"readiness probe passed {readiness.successes} of {threshold} times"
            )
        return Verdict(False, "waiting for the readiness probe")
    return Verdict(True)


__all__ = [
    "Outcome",
    "ProbeKind",
    "ProbeResult",
    "ProbeState",
    "ProbeTarget",
    "RunId",
    "Track",
    "Verdict",
    "due",
    "launched",
    "next_due",
    "record",
    "refresh",
    "start",
    "verdict",
]
