"""The planner with probes: readiness in the status, a failing liveness probe stopping the
replica, and the exit that follows restarted (or not) by the ordinary policy and back-off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import attrs
import pytest

from p2porch.common import codec
from p2porch.node import probes, runtime
from p2porch.node import reconcile_core as core
from p2porch.node.probes import ProbeKind, ProbeResult, ProbeState, ProbeTarget, RunId
from p2porch.node.reconcile_core import (
    Assignment,
    Plan,
    ReconcilerConfig,
    ReplicaBook,
    ReplicaKey,
    ReplicaState,
    ReplicaStatus,
    RestartContainer,
    StopContainer,
)
from p2porch.node.runtime import ContainerInfo, ContainerState, PublishedPort
from p2porch.node.spec import (
    App,
    AppSpec,
    ExecAction,
    HttpGetAction,
    ObjectMeta,
    PortSpec,
    Probe,
    Protocol,
    RestartPolicy,
    RestartPolicyKind,
)
from p2porch.node.state import Placement

NODE = "n1"
CFG = ReconcilerConfig()
T0 = datetime(2026, 1, 1, tzinfo=UTC)
KEY = ReplicaKey("default", "web", "web-0")
LIVE = Probe(exec=ExecAction(("test", "-f", "/tmp/healthy")), failure_threshold=2)
READY = Probe(http_get=HttpGetAction(8080, "/healthz"))


def make_app(
    liveness: Probe | None = None,
    readiness: Probe | None = None,
    startup: Probe | None = None,
    policy: RestartPolicy | None = None,
) -> App:
    spec = AppSpec(
        image="p2porch/demo:latest",
        ports=(PortSpec(8080), PortSpec(53, protocol=Protocol.UDP)),
        restart_policy=policy or RestartPolicy(),
        liveness=liveness,
        readiness=readiness,
        startup=startup,
    )
    return App(ObjectMeta("web"), spec).with_generation(1)


def assign(app: App) -> Assignment:
    return Assignment(Placement("default", "web", 0, NODE, 1), app)


def container(
    state: ContainerState = ContainerState.RUNNING,
    *,
    started_s: float = 0.0,
    finished_s: float | None = None,
    exit_code: int | None = None,
) -> ContainerInfo:
    return ContainerInfo(
        id="c1",
        name="p2porch_n1_default_web-0_g1",
        image="p2porch/demo:latest",
        state=state,
        app="web",
        namespace="default",
        replica="web-0",
        generation=1,
        exit_code=exit_code,
        oom_killed=False,
        started_at=T0 + timedelta(seconds=started_s),
        finished_at=None if finished_s is None else T0 + timedelta(seconds=finished_s),
        restart_count=0,
        ports=(
            PublishedPort(8080, Protocol.TCP, "127.0.0.2", 32768),
            PublishedPort(53, Protocol.UDP, "127.0.0.2", 32769),
        ),
        labels=((runtime.LABEL_NODE, NODE),),
    )


def exited(code: int, started_s: float, finished_s: float) -> ContainerInfo:
    return container(
        ContainerState.EXITED, started_s=started_s, finished_s=finished_s, exit_code=code
    )


def plan(
    app: App,
    info: ContainerInfo,
    books: dict[ReplicaKey, ReplicaBook] | None = None,
    now: float = 100.0,
    states: dict[ReplicaKey, ProbeState] | None = None,
    **kw: object,
) -> Plan:
    return core.plan(
        NODE,
        [assign(app)],
        [info],
        books or {},
        now,
        config=CFG,
        probe_states=states,
        **kw,  # type: ignore[arg-type]
    )


def probed(
    target: ProbeTarget, *results: tuple[ProbeKind, ProbeResult]
) -> dict[ReplicaKey, ProbeState]:
    """The prober's state for ``target`` after these results."""
    state = probes.start(target, 0.0)
    assert state is not None
    for kind, result in results:
        state = probes.record(probes.launched(state, kind, 0.0), kind, result)
    return {KEY: state}


def test_no_probes_ready_when_running_and_nothing_to_probe() -> None:
    result = plan(make_app(), container())
    (status,) = result.statuses
    assert status.ready and status.probes_ready and status.reason == ""
    assert result.probe_targets == {}


def test_a_new_run_is_handed_to_the_prober_and_not_ready_yet() -> None:
    app = make_app(liveness=LIVE, readiness=READY)
    result = plan(app, container(started_s=5))
    (status,) = result.statuses
    assert status.state is ReplicaState.RUNNING and not status.ready
    assert status.reason == "waiting for the first probes"
    target = result.probe_targets[KEY]
    assert target.run == RunId("c1", (T0 + timedelta(seconds=5)).timestamp())
    assert target.liveness == LIVE and target.readiness == READY and target.startup is None
    assert target.ports == ((8080, 32768),)  # TCP only: a UDP port cannot be probed
    # Liveness alone does not gate readiness (as in Kubernetes).
    (alone,) = plan(make_app(liveness=LIVE), container()).statuses
    assert alone.ready and alone.reason == ""


def test_readiness_verdict_shows_in_the_status() -> None:
    app = make_app(readiness=READY)
    target = plan(app, container()).probe_targets[KEY]
    failing = probed(target, (ProbeKind.READINESS, ProbeResult.failure("HTTP 404")))
    (status,) = plan(app, container(), states=failing).statuses
    assert status.state is ReplicaState.RUNNING and not status.ready
    assert status.reason == "readiness probe failing: HTTP 404"
    assert status.to_json()["ready"] is False and status.to_json()["state"] == "running"
    passing = probed(target, (ProbeKind.READINESS, ProbeResult.success("HTTP 200")))
    (status,) = plan(app, container(), states=passing).statuses
    assert status.ready and status.reason == ""
    # A state made for an earlier run of the container counts for nothing.
    (status,) = plan(app, container(started_s=50), states=passing).statuses
    assert not status.ready and status.reason == "waiting for the first probes"


def test_failing_liveness_stops_then_restarts_through_the_backoff() -> None:
    app = make_app(liveness=LIVE)
    target = plan(app, container()).probe_targets[KEY]
    failed = ProbeResult.failure("exit 1")
    dying = probed(target, (ProbeKind.LIVENESS, failed), (ProbeKind.LIVENESS, failed))
    reason = "liveness probe failed 2 consecutive times: exit 1"

    stop = plan(app, container(), now=100, states=dying)
    (action,) = stop.actions
    assert action == StopContainer(KEY, assign(app), "c1", target.run, reason)
    assert stop.probe_targets == {}  # this run is over for the prober
    (status,) = stop.statuses
    assert status.state is ReplicaState.RUNNING and not status.ready
    assert status.reason == f"restarting: {reason}"

    # While the stop is in flight the replica is left alone.
    busy = plan(app, container(), stop.books, now=101, busy={KEY: f"restarting: {reason}"})
    assert busy.actions == () and busy.statuses[0].state is ReplicaState.STARTING

    # The run ended (demo's SIGTERM trap exits 0): a failure all the same, restarted after
    # the back-off, the probe's verdict as the reason.
    ended = exited(0, 0, 102)
    waiting = plan(app, ended, stop.books, now=103)
    (status,) = waiting.statuses
    assert status.state is ReplicaState.FAILED and waiting.actions == ()
    assert status.reason == f"back-off 10s restarting failed container ({reason})"
    assert status.last_termination == reason
    due = plan(app, ended, waiting.books, now=113)
    (restart,) = due.actions
    assert isinstance(restart, RestartContainer)
    books = {KEY: core.after_restart(due.books[KEY], restart.exit)}

    # Running again (a new run): counted, the last termination kept, probed afresh.
    again = plan(app, container(started_s=114), books, now=115)
    (status,) = again.statuses
    assert status.ready and status.restarts == 1
    assert status.last_termination == reason
    assert status.to_json()["lastTermination"] == reason
    assert again.probe_targets[KEY].run != target.run


def test_the_next_crash_of_a_restarted_replica_is_its_own() -> None:
    app = make_app(liveness=LIVE)
    target = plan(app, container()).probe_targets[KEY]
    books = {KEY: ReplicaBook(generation=1, kill_cause=(target.run, "liveness probe failed"))}
    # An exit of another run than the one the probe stopped: the process's own doing.
    other = exited(3, 50, 60)
    (status,) = plan(app, other, books, now=61).statuses
    assert status.reason == "back-off 10s restarting failed container (exit 3)"
    assert status.last_termination == "exit 3"


def test_probe_stop_under_on_failure_and_never() -> None:
    target_app = make_app(liveness=LIVE)
    run = plan(target_app, container()).probe_targets[KEY].run
    books = {KEY: ReplicaBook(generation=1, kill_cause=(run, "liveness probe failed: exit 1"))}
    on_failure = make_app(liveness=LIVE, policy=RestartPolicy(RestartPolicyKind.ON_FAILURE))
    (status,) = plan(on_failure, exited(0, 0, 10), books, now=11).statuses
    assert status.state is ReplicaState.FAILED and not status.terminal
    assert "back-off 10s restarting failed container" in status.reason
    never = make_app(liveness=LIVE, policy=RestartPolicy(RestartPolicyKind.NEVER))
    (status,) = plan(never, exited(143, 0, 10), books, now=11).statuses
    assert status.terminal and status.state is ReplicaState.FAILED
    assert status.reason == "stopped (liveness probe failed: exit 1); restart policy never"


def test_startup_gates_readiness_in_the_status() -> None:
    app = make_app(startup=Probe(exec=ExecAction(("true",))), liveness=LIVE)
    target = plan(app, container()).probe_targets[KEY]
    waiting = probed(target, (ProbeKind.STARTUP, ProbeResult.failure("exit 1")))
    (status,) = plan(app, container(), states=waiting).statuses
    assert not status.ready
    assert status.reason == "startup probe has not passed yet (last: exit 1)"
    started = probed(target, (ProbeKind.STARTUP, ProbeResult.success("exit 0")))
    (status,) = plan(app, container(), states=started).statuses
    assert status.ready


def test_status_codec_round_trip_with_the_new_fields() -> None:
    status = ReplicaStatus(
        name="web-0",
        namespace="default",
        app="web",
        slot=0,
        node=NODE,
        generation=1,
        state=ReplicaState.RUNNING,
        probes_ready=False,
        last_termination="liveness probe failed: exit 1",
    )
    decoded: ReplicaStatus = codec.decode(codec.encode(status), ReplicaStatus)
    assert decoded == status
    assert not status.ready
    assert attrs.evolve(status, probes_ready=True).ready
    assert ReplicaStatus("a-0", "default", "a", 0, NODE, 1, ReplicaState.RUNNING).ready


def test_config_rejects_no_probe_slots() -> None:
    with pytest.raises(ValueError):
        ReconcilerConfig(max_parallel_probes=0)
