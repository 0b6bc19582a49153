"""The pure planner, rule by rule: start, adopt, orphans, generations, duplicates, back-off."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest

from p2porch.common import codec
from p2porch.node import reconcile_core as core
from p2porch.node import runtime
from p2porch.node.reconcile_core import (
    Assignment,
    Plan,
    ReconcilerConfig,
    RemoveContainer,
    ReplicaBook,
    ReplicaKey,
    ReplicaState,
    ReplicaStatus,
    RestartContainer,
    StartReplica,
)
from p2porch.node.runtime import ContainerInfo, ContainerState, PublishedPort
from p2porch.node.spec import (
    App,
    AppSpec,
    HttpGetAction,
    ObjectMeta,
    PortSpec,
    Probe,
    Protocol,
    RestartPolicy,
    RestartPolicyKind,
    UpdateOrder,
    UpdateStrategy,
)
from p2porch.node.state import Placement, ReplicaFact

NODE = "n1"
CFG = ReconcilerConfig()  # Kubernetes pacing: 10 s doubling to 300 s, reset after 600 s
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_app(
    name: str = "web",
    generation: int = 1,
    policy: RestartPolicy | None = None,
    replicas: int = 3,
    order: UpdateOrder = UpdateOrder.START_FIRST,
    readiness: Probe | None = None,
) -> App:
    spec = AppSpec(
        image="p2porch/demo:latest",
        ports=(PortSpec(8080, 30080),),
        replicas=replicas,
        restart_policy=policy or RestartPolicy(),
        update=UpdateStrategy(order=order, max_unavailable="1"),
        readiness=readiness,
    )
    return App(ObjectMeta(name), spec).with_generation(generation)


def assign(app: App, slot: int = 0, node: str = NODE) -> Assignment:
    return Assignment(Placement("default", app.meta.name, slot, node, app.meta.generation), app)


def container(
    cid: str,
    replica: str = "web-0",
    generation: int | None = 1,
    state: ContainerState = ContainerState.RUNNING,
    *,
    app: str = "web",
    node: str = NODE,
    exit_code: int | None = None,
    oom: bool = False,
    started_s: float = 0.0,
    finished_s: float | None = None,
    host_port: int = 32768,
) -> ContainerInfo:
    labels = {runtime.LABEL_NODE: node}
    return ContainerInfo(
        id=cid,
        name=f"p2porch_{node}_default_{replica}_g{generation}",
        image="p2porch/demo:latest",
        state=state,
        app=app,
        namespace="default" if replica else "",
        replica=replica,
        generation=generation,
        exit_code=exit_code,
        oom_killed=oom,
        started_at=T0 + timedelta(seconds=started_s),
        finished_at=None if finished_s is None else T0 + timedelta(seconds=finished_s),
        restart_count=0,
        ports=(PublishedPort(8080, Protocol.TCP, "127.0.0.2", host_port),),
        labels=tuple(sorted(labels.items())),
    )


def exited(cid: str, code: int, started_s: float, finished_s: float, **kw: object) -> ContainerInfo:
    return container(
        cid,
        state=ContainerState.EXITED,
        exit_code=code,
        started_s=started_s,
        finished_s=finished_s,
        **kw,  # type: ignore[arg-type]
    )


def run_plan(
    assignments: list[Assignment],
    containers: list[ContainerInfo],
    books: dict[ReplicaKey, ReplicaBook] | None = None,
    now: float = 1000.0,
    config: ReconcilerConfig = CFG,
    **kw: object,
) -> Plan:
    return core.plan(
        NODE,
        assignments,
        containers,
        books or {},
        now,
        config=config,
        **kw,  # type: ignore[arg-type]
    )


KEY0 = ReplicaKey("default", "web", "web-0")

# --------------------------------------------------------------------------- config


def test_backoff_sequence_doubles_to_the_cap() -> None:
    assert [CFG.backoff_s(step) for step in range(8)] == [10, 20, 40, 80, 160, 300, 300, 300]
    assert CFG.backoff_s(10_000) == 300  # no overflow for absurd steps
    fast = ReconcilerConfig.fast()
    assert [fast.backoff_s(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 1.6])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backoff_base_s": 0},
        {"backoff_base_s": 10, "backoff_max_s": 5},
        {"backoff_reset_after_s": -1},
        {"resync_interval_s": 0},
        {"engine_retry_s": 0},
        {"max_parallel_actions": 0},
        {"stop_timeout_s": -1},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReconcilerConfig(**kwargs)  # type: ignore[arg-type]


def test_presets_are_valid() -> None:
    for preset in (ReconcilerConfig.lan(), ReconcilerConfig.local(), ReconcilerConfig.fast()):
        assert preset.backoff_max_s >= preset.backoff_base_s


def test_label_key_matches_the_runtime() -> None:
    assert core.LABEL_NODE == runtime.LABEL_NODE


def test_planner_imports_no_engine_or_event_loop() -> None:
    code = (
        "import sys, p2porch.node.reconcile_core\n"
        "bad = [m for m in ('trio', 'docker', 'requests', 'asyncio') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True
    )
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------- desired set


def test_assignments_keep_only_this_nodes_placements_of_existing_apps() -> None:
    web, db = make_app("web"), make_app("db")
    placements = [
        Placement("default", "web", 1, NODE, 1),
        Placement("default", "web", 0, NODE, 1),
        Placement("default", "web", 2, "n2", 1),
        Placement("default", "gone", 0, NODE, 1),
        Placement("default", "db", 0, NODE, 1),
    ]
    got = core.assignments_for(NODE, placements, {web.key: web, db.key: db})
    assert [a.name for a in got] == ["db-0", "web-0", "web-1"]


# --------------------------------------------------------------------------- basic rules


def test_missing_replica_is_started() -> None:
    a0, a1 = assign(make_app(), 0), assign(make_app(), 1)
    result = run_plan([a0, a1], [])
    assert result.actions == (
        StartReplica(a0.key, a0, (), "creating container"),
        StartReplica(a1.key, a1, (), "creating container"),
    )
    assert [s.state for s in result.statuses] == [ReplicaState.PENDING] * 2
    assert result.statuses[0].name == "web-0" and result.statuses[1].slot == 1


def test_matching_running_container_is_adopted_untouched() -> None:
    """A daemon restart (no books) finds its replicas running: nothing is restarted."""
    a0 = assign(make_app())
    result = run_plan([a0], [container("c1")], books={})
    assert result.actions == ()
    (status,) = result.statuses
    assert status.state is ReplicaState.RUNNING and status.ready
    assert status.container_id == "c1"
    assert status.published_ports == (("8080", "127.0.0.2:32768"),)
    assert status.restarts == 0 and status.reason == "" and not status.terminal
    assert result.next_wake_at is None


def test_unassigned_and_unlabelled_containers_are_removed() -> None:
    a0 = assign(make_app())
    stale = container("c-old", replica="web-7")
    other_app = exited("c-db", 0, 0, 1, replica="db-0", app="db")
    unlabelled = container("c-bare", replica="")
    result = run_plan([a0], [container("c1"), stale, other_app, unlabelled])
    removes = [a for a in result.actions if isinstance(a, RemoveContainer)]
    assert {(r.container_id, r.running) for r in removes} == {
        ("c-old", True),
        ("c-db", False),
        ("c-bare", True),
    }
    assert next(r for r in removes if r.container_id == "c-bare").key is None


def test_everything_goes_when_nothing_is_assigned() -> None:
    result = run_plan([], [container("c1"), container("c2", replica="web-1")])
    assert sorted(a.container_id for a in result.actions if isinstance(a, RemoveContainer)) == [
        "c1",
        "c2",
    ]
    assert result.statuses == ()


def test_containers_of_other_nodes_are_never_touched() -> None:
    a0 = assign(make_app())
    foreign = container("c-foreign", node="n2")
    result = run_plan([a0], [foreign])
    # The foreign one is invisible: the replica is missing, and nothing removes c-foreign.
    assert [type(a) for a in result.actions] == [StartReplica]
    assert all(getattr(a, "container_id", None) != "c-foreign" for a in result.actions)


def test_removing_containers_are_left_to_finish() -> None:
    result = run_plan([], [container("c1", state=ContainerState.REMOVING)])
    assert result.actions == ()


# --------------------------------------------------------------------------- generations


def test_older_generation_is_replaced_stop_then_start() -> None:
    a0 = assign(make_app(generation=2, order=UpdateOrder.STOP_FIRST))
    result = run_plan([a0], [container("c-g1", generation=1)])
    (action,) = result.actions
    assert isinstance(action, StartReplica)
    assert action.remove_ids == ("c-g1",)
    assert action.why == "replacing generation 1 with 2"
    (status,) = result.statuses
    assert status.state is ReplicaState.PENDING and status.generation == 2
    assert result.endpoints == ()  # stop-first: nothing serves this slot meanwhile


def test_start_first_keeps_the_old_container_serving_until_the_new_one_is_ready() -> None:
    probe = Probe(http_get=HttpGetAction(8080, "/healthz"))
    a0 = assign(make_app(generation=2, readiness=probe))
    old = container("c-g1", generation=1, host_port=32768)
    # 1. No successor yet: started beside the old one, which stays an endpoint.
    result = run_plan([a0], [old])
    (action,) = result.actions
    assert isinstance(action, StartReplica) and action.remove_ids == ()
    (endpoint,) = result.endpoints
    assert (endpoint.container_id, endpoint.revision, endpoint.ready) == ("c-g1", 1, True)
    assert endpoint.address(8080) == ("127.0.0.2", 32768)
    # 2. While the start is in flight, the old one still serves.
    result = run_plan([a0], [old], busy={KEY0: "starting container"})
    assert [e.container_id for e in result.endpoints] == ["c-g1"]
    # 3. The successor runs but its readiness probe has not passed: both stay, old serves.
    new = container("c-g2", generation=2, host_port=32769, started_s=5)
    result = run_plan([a0], [old, new])
    assert not any(isinstance(a, RemoveContainer) for a in result.actions)
    assert [e.container_id for e in result.endpoints] == ["c-g1"]
    # 4. Without probes the successor is ready at once: old removed, new serves.
    plain = assign(make_app(generation=2))
    result = run_plan([plain], [old, new])
    assert result.actions == (RemoveContainer("c-g1", KEY0, "generation 1 replaced", True),)
    assert [e.container_id for e in result.endpoints] == ["c-g2"]


def test_start_first_successor_that_crashes_leaves_the_old_one_serving() -> None:
    a0 = assign(make_app(generation=2))
    old = container("c-g1", generation=1)
    crashed = exited("c-g2", 1, 5, 6, generation=2)
    result = run_plan([a0], [old, crashed])
    assert not any(
        isinstance(a, RemoveContainer) and a.container_id == "c-g1" for a in result.actions
    )
    assert [e.container_id for e in result.endpoints] == ["c-g1"]


def test_older_generation_next_to_a_current_one_is_just_removed() -> None:
    a0 = assign(make_app(generation=2))
    result = run_plan([a0], [container("c-g1", generation=1), container("c-g2", generation=2)])
    assert result.actions == (RemoveContainer("c-g1", KEY0, "generation 1 replaced", True),)
    assert result.statuses[0].state is ReplicaState.RUNNING
    assert result.statuses[0].container_id == "c-g2"


def test_new_generation_starts_a_clean_book() -> None:
    a0 = assign(make_app(generation=2))
    books = {KEY0: ReplicaBook(generation=1, restarts=5, backoff_step=4, last_error="x")}
    result = run_plan([a0], [], books=books)
    assert result.books[KEY0] == ReplicaBook(generation=2)
    assert result.statuses[0].restarts == 0


# --------------------------------------------------------------------------- duplicates


def test_duplicates_keep_the_newest_running_one() -> None:
    a0 = assign(make_app())
    old = container("c-a", started_s=10)
    new = container("c-b", started_s=20)
    dead = exited("c-c", 1, 30, 40)
    result = run_plan([a0], [old, dead, new])
    removed = {a.container_id: a for a in result.actions if isinstance(a, RemoveContainer)}
    assert set(removed) == {"c-a", "c-c"}
    assert all(r.why == "duplicate of this replica" for r in removed.values())
    assert removed["c-a"].running and not removed["c-c"].running
    assert result.statuses[0].container_id == "c-b"
    assert len(result.actions) == 2


def test_duplicates_all_ended_keep_the_latest() -> None:
    a0 = assign(make_app(policy=RestartPolicy(RestartPolicyKind.NEVER)))
    result = run_plan([a0], [exited("c-a", 0, 0, 5), exited("c-b", 0, 10, 20)])
    assert [a.container_id for a in result.actions if isinstance(a, RemoveContainer)] == ["c-a"]
    assert result.statuses[0].container_id == "c-b"


def test_created_leftover_is_replaced() -> None:
    a0 = assign(make_app())
    leftover = container("c-created", state=ContainerState.CREATED)
    (action,) = run_plan([a0], [leftover]).actions
    assert isinstance(action, StartReplica) and action.remove_ids == ("c-created",)


# --------------------------------------------------------------------------- restarts


def crash_loop(
    policy: RestartPolicy, codes: list[int], config: ReconcilerConfig = CFG
) -> list[tuple[float, Plan]]:
    """Drive a crash loop: each run lasts 1 s, the planner restarts when it says so.

    Returns (the back-off the planner waited, the plan that waited) per crash.
    """
    a0 = assign(make_app(policy=policy))
    books: dict[ReplicaKey, ReplicaBook] = {}
    now = 100.0
    out: list[tuple[float, Plan]] = []
    for i, code in enumerate(codes):
        info = exited("c1", code, now - 1, now + i * 1e-3)  # same id: restarted in place
        seen = run_plan([a0], [info], books, now=now, config=config)
        books = seen.books
        if seen.next_wake_at is None:  # the policy says no more
            out.append((-1.0, seen))
            break
        waited = seen.next_wake_at - now
        out.append((waited, seen))
        now = seen.next_wake_at
        due = run_plan([a0], [info], books, now=now, config=config)
        (action,) = due.actions
        assert isinstance(action, RestartContainer) and action.container_id == "c1"
        books = dict(due.books)
        books[KEY0] = core.after_restart(books[KEY0], action.exit)
        now += 1.0
    return out


def test_crash_loop_backs_off_exponentially_and_counts_restarts() -> None:
    loop = crash_loop(RestartPolicy(), [3] * 8)
    assert [w for w, _ in loop] == pytest.approx([10, 20, 40, 80, 160, 300, 300, 300])
    first, third = loop[0][1].statuses[0], loop[2][1].statuses[0]
    assert first.state is ReplicaState.FAILED and first.exit_code == 3
    assert first.reason == "back-off 10s restarting failed container (exit 3)"
    assert third.reason == "back-off 40s restarting failed container (exit 3)"
    assert [p.statuses[0].restarts for _, p in loop] == list(range(8))
    assert not any(p.statuses[0].terminal for _, p in loop)


def test_always_restarts_completed_containers_too() -> None:
    loop = crash_loop(RestartPolicy(RestartPolicyKind.ALWAYS), [0, 0])
    status = loop[1][1].statuses[0]
    assert status.state is ReplicaState.SUCCEEDED
    assert status.reason == "back-off 20s restarting completed container (exit 0)"


def test_never_policy_reports_a_terminal_end() -> None:
    loop = crash_loop(RestartPolicy(RestartPolicyKind.NEVER), [3])
    assert loop[0][0] == -1
    plan = loop[0][1]
    assert plan.actions == ()
    (status,) = plan.statuses
    assert status.state is ReplicaState.FAILED and status.terminal
    assert status.reason == "exited (exit 3); restart policy never"
    assert status.to_fact(1) == ReplicaFact("default", "web", 0, NODE, 1, "failed", status.reason)
    ok = crash_loop(RestartPolicy(RestartPolicyKind.NEVER), [0])[0][1].statuses[0]
    assert ok.state is ReplicaState.SUCCEEDED and ok.terminal
    fact = ok.to_fact(1)
    assert fact is not None and fact.state == "succeeded"


def test_on_failure_restarts_failures_until_the_limit() -> None:
    policy = RestartPolicy(RestartPolicyKind.ON_FAILURE, max_restarts=2)
    loop = crash_loop(policy, [1, 1, 1, 1])
    assert [w for w, _ in loop] == [10, 20, -1]
    final = loop[-1][1].statuses[0]
    assert final.terminal and final.restarts == 2
    assert final.reason == "exited (exit 1); restart limit 2 reached"
    done = crash_loop(RestartPolicy(RestartPolicyKind.ON_FAILURE), [0])[0][1].statuses[0]
    assert done.state is ReplicaState.SUCCEEDED and done.terminal
    assert done.reason == "exited (exit 0); completed; restart policy on-failure"


def test_oom_kill_is_reported() -> None:
    a0 = assign(make_app())
    info = exited("c1", 137, 0, 5, oom=True)
    (status,) = run_plan([a0], [info], now=10).statuses
    assert status.oom_killed and status.exit_code == 137 and status.state is ReplicaState.FAILED
    assert status.reason == "OOMKilled; back-off 10s restarting failed container (OOMKilled)"
    never = assign(make_app(policy=RestartPolicy(RestartPolicyKind.NEVER)))
    (status,) = run_plan([never], [info]).statuses
    assert status.reason == "OOMKilled; restart policy never" and status.terminal


def test_a_long_run_resets_the_backoff() -> None:
    a0 = assign(make_app())
    books = {KEY0: ReplicaBook(generation=1, restarts=6, backoff_step=6)}
    short = run_plan([a0], [exited("c1", 1, 0, 599)], books, now=1000)
    assert short.next_wake_at == 1000 + 300
    stable = run_plan([a0], [exited("c1", 1, 0, 600)], books, now=1000)
    assert stable.next_wake_at == 1000 + 10
    assert stable.books[KEY0].restarts == 6  # the count shown never resets


def test_backoff_clock_starts_when_the_exit_is_first_seen() -> None:
    a0 = assign(make_app())
    info = exited("c1", 1, 0, 5)
    first = run_plan([a0], [info], now=50)
    # Seen again later, same exit: the clock does not restart.
    again = run_plan([a0], [info], first.books, now=55)
    assert again.next_wake_at == 60 and again.actions == ()
    assert "back-off 10s" in again.statuses[0].reason


def test_stale_listing_after_a_restart_does_not_restart_twice() -> None:
    a0 = assign(make_app())
    info = exited("c1", 1, 0, 5)
    seen = run_plan([a0], [info], now=0)
    due = run_plan([a0], [info], seen.books, now=10)
    (restart,) = due.actions
    assert isinstance(restart, RestartContainer)
    books = {KEY0: core.after_restart(due.books[KEY0], restart.exit)}
    stale = run_plan([a0], [info], books, now=100)
    assert stale.actions == ()
    assert stale.statuses[0].state is ReplicaState.STARTING
    assert stale.statuses[0].restarts == 1


# --------------------------------------------------------------------------- failures


def test_start_failure_is_terminal_and_retried_on_backoff() -> None:
    a0 = assign(make_app())
    books = {KEY0: ReplicaBook(generation=1)}
    error = "image p2porch/x:1 unavailable: no registry"
    books[KEY0] = core.after_failure(books[KEY0], error, True, 100.0, CFG)
    waiting = run_plan([a0], [], books, now=104)
    assert waiting.actions == ()
    assert waiting.next_wake_at == 110
    (status,) = waiting.statuses
    assert status.state is ReplicaState.FAILED and status.terminal
    assert status.reason == f"{error} (retry in 6s)"
    fact = status.to_fact(1)
    assert fact is not None and fact.state == "failed" and fact.reason.startswith(error)
    due = run_plan([a0], [], books, now=110)
    assert [type(a) for a in due.actions] == [StartReplica]
    assert due.statuses[0].reason == f"{error} (retrying)"
    # The second failure waits twice as long; a success clears it.
    twice = core.after_failure(books[KEY0], error, True, 110.0, CFG)
    assert twice.retry_at == 130 and twice.failures == 2
    assert core.after_start(twice) == ReplicaBook(generation=1)


def test_transient_start_failure_is_pending_not_terminal() -> None:
    a0 = assign(make_app())
    book = core.after_failure(ReplicaBook(generation=1), "engine timeout", False, 0.0, CFG)
    (status,) = run_plan([a0], [], {KEY0: book}, now=1).statuses
    assert status.state is ReplicaState.PENDING and not status.terminal
    assert status.to_fact(1) is None


def test_failed_restart_waits_for_the_retry_too() -> None:
    a0 = assign(make_app())
    info = exited("c1", 1, 0, 5)
    seen = run_plan([a0], [info], now=0)
    book = core.after_failure(seen.books[KEY0], "cannot restart: port taken", True, 10.0, CFG)
    waiting = run_plan([a0], [info], {KEY0: book}, now=15)
    assert waiting.actions == () and waiting.next_wake_at == 20
    assert "last attempt: cannot restart: port taken" in waiting.statuses[0].reason


# --------------------------------------------------------------------------- busy


def test_busy_replicas_and_containers_are_left_alone() -> None:
    a0, a1 = assign(make_app(), 0), assign(make_app(), 1)
    result = run_plan(
        [a0, a1],
        [container("c-orphan", replica="web-9")],
        busy={KEY0: "pulling image p2porch/demo:latest"},
        busy_containers=frozenset({"c-orphan"}),
    )
    assert [(type(a), getattr(a, "key", None)) for a in result.actions] == [(StartReplica, a1.key)]
    assert result.statuses[0].state is ReplicaState.STARTING
    assert result.statuses[0].reason == "pulling image p2porch/demo:latest"


# --------------------------------------------------------------------------- status record


def test_status_round_trips_through_the_codec() -> None:
    status = ReplicaStatus(
        name="web-0",
        namespace="default",
        app="web",
        slot=0,
        node=NODE,
        generation=2,
        state=ReplicaState.FAILED,
        restarts=3,
        exit_code=3,
        reason="back-off 40s restarting failed container (exit 3)",
        container_id="abc",
        published_ports=(("8080", "127.0.0.2:30080"),),
    )
    assert codec.registered_tag(ReplicaStatus) == 300
    decoded: ReplicaStatus = codec.decode(codec.encode(status), ReplicaStatus)
    assert decoded == status
    doc = status.to_json()
    assert doc["state"] == "failed" and doc["exitCode"] == 3 and not doc["ready"]
    assert doc["publishedPorts"] == {"8080": "127.0.0.2:30080"}
    assert attrs.evolve(status, state=ReplicaState.RUNNING).ready


def test_unassigned_replica_with_a_start_in_flight_is_removed_after_it() -> None:
    leftover = container("c1")
    assert run_plan([], [leftover], busy={KEY0: "starting container"}).actions == ()
    (action,) = run_plan([], [leftover]).actions
    assert isinstance(action, RemoveContainer) and action.container_id == "c1"


def test_engine_outage_statuses_keep_what_was_known() -> None:
    a0, a1 = assign(make_app(), 0), assign(make_app(), 1)
    before = run_plan([a0], [container("c1")]).statuses
    got = core.unknown_statuses(NODE, [a1, a0], before, "engine unavailable: boom")
    assert [s.name for s in got] == ["web-0", "web-1"]
    assert all(s.state is ReplicaState.UNKNOWN and not s.ready for s in got)
    assert got[0].container_id == "c1" and got[1].container_id == ""
    assert got[1].reason == "engine unavailable: boom"
