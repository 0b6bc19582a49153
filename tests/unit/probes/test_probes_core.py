"""The pure prober core, walked with scenario scripts on a clock set by hand.

A script is one line per step, each at a time ``@t`` (seconds since the run was first seen):

* ``@t due KIND...`` -- exactly these probes are due at t (``due -`` for none), and they are
  launched;
* ``@t KIND ok|fail|error DETAIL => VERDICT`` -- a launched probe of KIND finished with that
  result; the run's verdict is then VERDICT (``Verdict.describe()``: ``ready``,
  ``not ready: ...`` or ``restart: ...``);
* ``@t next T`` -- the next probe is due at T (``none``: nothing until a result arrives).

A line starting with ``=>`` continues the result line before it.
"""

from __future__ import annotations

from typing import Any

import pytest

from p2porch.node import probes
from p2porch.node.probes import (
    Outcome,
    ProbeKind,
    ProbeResult,
    ProbeState,
    ProbeTarget,
    RunId,
    Verdict,
)
from p2porch.node.spec import AppSpec, ExecAction, HttpGetAction, PortSpec, Probe, TcpSocketAction

RUN = RunId("c1", 1_000.0)
HTTP = HttpGetAction(8080, "/healthz")


def target(
    startup: Probe | None = None, liveness: Probe | None = None, readiness: Probe | None = None
) -> ProbeTarget:
    return ProbeTarget(RUN, startup, liveness, readiness, ((8080, 32768),))


def http(**kw: Any) -> Probe:
    return Probe(http_get=HTTP, **kw)


def play(tgt: ProbeTarget, script: str, running_for_s: float = 0.0) -> ProbeState:
    state = probes.start(tgt, 0.0, running_for_s)
    assert state is not None
    lines: list[str] = []
    for raw in script.strip().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("=>"):
            lines[-1] += " " + line
        elif line:
            lines.append(line)
    for number, line in enumerate(lines, 1):
        where = f"script line {number}: {line}"
        at, rest = line.split(None, 1)
        assert at.startswith("@"), where
        now = float(at[1:])
        verb, _, args = rest.partition(" ")
        args = args.strip()
        if verb == "due":
            wanted = [] if args.strip() == "-" else [ProbeKind(k) for k in args.split()]
            assert list(probes.due(state, now)) == wanted, where
            for kind in wanted:
                state = probes.launched(state, kind, now)
        elif verb == "next":
            expected = None if args.strip() == "none" else float(args)
            assert probes.next_due(state) == expected, where
        else:
            kind = ProbeKind(verb)
            result_text, _, verdict_text = args.partition("=>")
            outcome, _, detail = result_text.strip().partition(" ")
            result = ProbeResult(
                {"ok": Outcome.SUCCESS, "fail": Outcome.FAILURE, "error": Outcome.ERROR}[outcome],
                detail.strip(),
            )
            state = probes.record(state, kind, result)
            assert probes.verdict(state).describe() == verdict_text.strip(), where
    return state


# --------------------------------------------------------------------------- liveness


def test_no_probes_no_state() -> None:
    assert probes.start(target(), 0.0) is None
    spec = AppSpec(image="x", ports=(PortSpec(8080),))
    assert ProbeTarget.for_spec(spec, RUN).probes() == ()


def test_liveness_restarts_after_three_consecutive_failures() -> None:
    state = play(
        target(liveness=http()),
        """
        @0   due liveness
        @0   next none                                 # in flight
        @0.1 liveness fail HTTP 500 => ready          # liveness starts passing
        @0.1 next 10                                   # a period after the launch
        @10  due liveness
        @10  liveness fail HTTP 500 => ready
        @20  due liveness
        @20  liveness ok HTTP 200 => ready            # a success resets the count
        @30  due liveness
        @30  liveness fail HTTP 500 => ready
        @40  due liveness
        @40  liveness fail HTTP 500 => ready
        @50  due liveness
        @50  liveness fail HTTP 500 => restart: liveness probe failed 3 consecutive times: HTTP 500
        @60  due -                                     # the run is over: no more probes
        @60  next none
        """,
    )
    assert probes.verdict(state) == Verdict(
        False,
        "liveness probe failed 3 consecutive times: HTTP 500",
        "liveness probe failed 3 consecutive times: HTTP 500",
    )
    # A late result of the same run changes nothing.
    late = probes.record(state, ProbeKind.LIVENESS, ProbeResult.success("HTTP 200"))
    assert probes.verdict(late) == probes.verdict(state)


def test_threshold_of_one_says_so_plainly() -> None:
    play(
        target(liveness=Probe(exec=ExecAction(("test", "-f", "/tmp/ok")), failure_threshold=1)),
        """
        @0 due liveness
        @0 liveness fail exit 1 => restart: liveness probe failed: exit 1
        """,
    )


def test_errors_are_not_counted() -> None:
    play(
        target(liveness=Probe(exec=ExecAction(("true",)), period_s=5)),
        """
        @0  due liveness
        @0  liveness fail exit 1 => ready
        @5  due liveness
        @5  liveness error engine unavailable => ready
        @10 due liveness
        @10 liveness error engine unavailable => ready
        @15 due liveness
        @15 liveness fail exit 1 => ready
        @20 due liveness
        @20 liveness fail exit 1 => restart: liveness probe failed 3 consecutive times: exit 1
        """,
    )


def test_initial_delay_and_one_probe_in_flight_at_a_time() -> None:
    play(
        target(liveness=http(initial_delay_s=15, period_s=10, timeout_s=30)),
        """
        @0  next 15
        @14 due -
        @15 due liveness
        @15 next none          # in flight: nothing else to run
        @26 due -              # a period passed, but the last one has not answered yet
        @40 liveness ok HTTP 200 => ready
        @40 next 25            # overdue: runs at once
        @40 due liveness
        @40 next none
        """,
    )


def test_initial_delay_counts_from_the_container_start() -> None:
    # Adopted 12 s after it started (a restarted daemon): 3 s of delay are left.
    play(
        target(liveness=http(initial_delay_s=15)),
        """
        @0 next 3
        @3 due liveness
        """,
        running_for_s=12,
    )
    play(target(liveness=http(initial_delay_s=15)), "@0 due liveness", running_for_s=600)


# --------------------------------------------------------------------------- readiness


def test_readiness_gates_and_never_restarts() -> None:
    tgt = target(readiness=http(period_s=5, failure_threshold=2))
    assert probes.verdict(probes.start(tgt, 0.0)).describe() == (  # type: ignore[arg-type]
        "not ready: waiting for the readiness probe"
    )
    play(
        tgt,
        """
        @0  due readiness
        @0  readiness fail HTTP 404 => not ready: readiness probe failing: HTTP 404
        @5  due readiness
        @5  readiness fail HTTP 404 => not ready: readiness probe failing: HTTP 404
        @10 due readiness
        @10 readiness fail HTTP 404 => not ready: readiness probe failing: HTTP 404
        @15 due readiness
        @15 readiness ok HTTP 200 => ready
        @20 due readiness
        @20 readiness fail timed out after 1s => ready     # below the threshold
        @25 due readiness
        @25 readiness fail timed out after 1s
            => not ready: readiness probe failing: timed out after 1s
        @30 due readiness
        @30 readiness ok HTTP 200 => ready
        """,
    )


def test_readiness_success_threshold() -> None:
    play(
        target(readiness=http(success_threshold=2)),
        """
        @0  due readiness
        @0  readiness ok HTTP 200 => not ready: readiness probe passed 1 of 2 times
        @10 due readiness
        @10 readiness ok HTTP 200 => ready
        @20 due readiness
        @20 readiness fail HTTP 503 => ready
        """,
    )


# --------------------------------------------------------------------------- startup


def test_startup_holds_liveness_and_readiness_back_until_it_passes() -> None:
    tcp = Probe(tcp=TcpSocketAction(8080), period_s=2, failure_threshold=30)
    play(
        target(startup=tcp, liveness=http(initial_delay_s=1), readiness=http(period_s=5)),
        """
        @0  due startup                        # liveness and readiness wait
        @0  startup fail connection refused
            => not ready: startup probe has not passed yet (last: connection refused)
        @2  due startup
        @2  startup fail connection refused
            => not ready: startup probe has not passed yet (last: connection refused)
        @4  due startup
        @4  next none
        @4  startup ok connected => not ready: waiting for the readiness probe
        @4  next 0                             # both are overdue now
        @4  due liveness readiness
        @4  readiness ok HTTP 200 => ready
        @4  liveness ok HTTP 200 => ready
        @14 due liveness readiness             # startup never runs again
        """,
    )


def test_startup_gives_up_after_its_threshold() -> None:
    play(
        target(startup=Probe(exec=ExecAction(("ready",)), failure_threshold=2), liveness=http()),
        """
        @0  due startup
        @0  startup fail exit 1: not yet
            => not ready: startup probe has not passed yet (last: exit 1: not yet)
        @10 due startup
        @10 startup fail exit 1: not yet
            => restart: startup probe failed 2 consecutive times: exit 1: not yet
        @20 due -
        """,
    )


def test_startup_alone_makes_ready_once_passed() -> None:
    play(
        target(startup=http()),
        """
        @0 due startup
        @0 startup ok HTTP 200 => ready
        @30 due -
        """,
    )


# --------------------------------------------------------------------------- the table


def test_refresh_keeps_known_runs_and_restarts_new_ones() -> None:
    tgt = target(readiness=http())
    table = probes.refresh({}, {"web-0": tgt}, now=0.0, wall_now=RUN.started_at)
    state = probes.launched(table["web-0"], ProbeKind.READINESS, 0.0)
    state = probes.record(state, ProbeKind.READINESS, ProbeResult.success("HTTP 200"))
    table["web-0"] = state
    assert probes.verdict(state).ready

    same = probes.refresh(table, {"web-0": tgt}, now=5.0, wall_now=RUN.started_at + 5)
    assert same["web-0"] is state
    # Restarted in place: same container, a new start time -> a fresh, not-ready state.
    again = ProbeTarget(RunId("c1", 2_000.0), readiness=http())
    fresh = probes.refresh(table, {"web-0": again}, now=6.0, wall_now=2_000.0)
    assert not probes.verdict(fresh["web-0"]).ready
    assert probes.due(fresh["web-0"], 6.0) == (ProbeKind.READINESS,)
    # No longer running (or no probes any more): dropped.
    assert probes.refresh(table, {}, now=7.0, wall_now=0.0) == {}
    assert probes.refresh(table, {"web-0": ProbeTarget(RUN)}, now=7.0, wall_now=0.0) == {}


def test_describe_and_target_lookup() -> None:
    assert Verdict(True).describe() == "ready"
    assert Verdict(False, "x").describe() == "not ready: x"
    assert Verdict(False, "y", "y").describe() == "restart: y"
    tgt = target(liveness=http())
    assert tgt.host_port(8080) == 32768 and tgt.host_port(9090) is None
    assert tgt.probe(ProbeKind.LIVENESS) == http() and tgt.probe(ProbeKind.STARTUP) is None


@pytest.mark.parametrize("kind", list(ProbeKind))
def test_results_for_absent_probes_are_ignored(kind: ProbeKind) -> None:
    state = probes.start(target(liveness=http()), 0.0)
    assert state is not None
    if kind is not ProbeKind.LIVENESS:
        assert probes.record(state, kind, ProbeResult.failure("x")) == state
        assert probes.launched(state, kind, 0.0) == state


def test_core_imports_no_clock_socket_or_event_loop() -> None:
    import ast
    from pathlib import Path

    source = Path(probes.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"trio", "time", "socket", "docker", "asyncio", "threading", "random", "h11"}
    assert not imported & forbidden
