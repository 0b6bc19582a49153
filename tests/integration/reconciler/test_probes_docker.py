"""Health probes against the real engine: readiness over HTTP and TCP through the published
port, a failing liveness exec restarting the replica with back-off, a startup probe holding
liveness back, and the runtime's bounded exec.

Probes reach replicas at their published ports on 127.0.0.4 (the test node's advertise
address): loopback only. Waits are on statuses under ``fail_after`` bounds that only catch a
hung engine; nothing asserts on how long anything took.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import trio

from p2porch.node import images
from p2porch.node.errors import ContainerConflict
from p2porch.node.reconcile_core import ReconcilerConfig, ReplicaState, ReplicaStatus
from p2porch.node.runtime import ContainerRequest, DockerRuntime
from p2porch.node.spec import (
    App,
    AppSpec,
    ExecAction,
    HttpGetAction,
    ObjectMeta,
    PortSpec,
    Probe,
    TcpSocketAction,
)
from p2porch.node.state import Placement

from .conftest import ADDRESS, fetch, running, wait_statuses

pytestmark = pytest.mark.docker

# Probes every second; the fast preset's back-off (0.2 s doubling to 1.6 s).
CONFIG = ReconcilerConfig.fast()


def demo(name: str, ports: tuple[int, ...] = (8080,), **probes: Probe) -> App:
    spec = AppSpec(
        image=images.DEMO_IMAGE,
        ports=tuple(PortSpec(p) for p in ports),
        stop_grace_s=1,
        **probes,  # type: ignore[arg-type]
    )
    return App(ObjectMeta(name), spec).with_generation(1)


def shell(name: str, script: str, **probes: Probe) -> App:
    spec = AppSpec(
        image=images.BUSYBOX_IMAGE,
        command=("sh", "-c", script),
        stop_grace_s=1,
        **probes,  # type: ignore[arg-type]
    )
    return App(ObjectMeta(name), spec).with_generation(1)


def place(node: str, *apps: App) -> list[Placement]:
    return [Placement("default", app.meta.name, 0, node, 1) for app in apps]


def by_app(statuses: list[ReplicaStatus]) -> dict[str, ReplicaStatus]:
    return {s.app: s for s in statuses}


def every_second(**kw: Any) -> Probe:
    return Probe(period_s=1, **kw)


async def test_readiness_over_http_and_tcp_through_the_published_port(
    runtime: DockerRuntime, node_name: str
) -> None:
    apps = [
        demo("http-ok", readiness=every_second(http_get=HttpGetAction(8080, "/healthz"))),
        demo("http-404", readiness=every_second(http_get=HttpGetAction(8080, "/missing"))),
        demo("tcp-ok", readiness=every_second(tcp=TcpSocketAction(8080))),
        # 9091 is published, but nothing listens on it in the container.
        demo("tcp-idle", (8080, 9091), readiness=every_second(tcp=TcpSocketAction(9091))),
    ]

    def settled(statuses: list[ReplicaStatus]) -> bool:
        rows = by_app(statuses)
        return (
            len(rows) == 4
            and all(s.state is ReplicaState.RUNNING for s in statuses)
            and rows["http-ok"].ready
            and rows["tcp-ok"].ready
            and "failing" in rows["http-404"].reason
            and "failing" in rows["tcp-idle"].reason
        )

    async with running(runtime, CONFIG) as rec:
        rec.set_desired(place(node_name, *apps), apps)
        rows = by_app(await wait_statuses(rec, settled, timeout_s=60))
        missing, idle = rows["http-404"], rows["tcp-idle"]
        # Running, serving, but not ready -- and it says why.
        assert not missing.ready and missing.probes_ready is False
        assert missing.reason == "readiness probe failing: HTTP 404"
        assert missing.to_json()["ready"] is False and missing.to_json()["state"] == "running"
        address = dict(missing.published_ports)["8080"]
        assert address.startswith(f"{ADDRESS}:")  # where the probes reached it
        page = await fetch(f"http://{address}/")
        assert "http-404-0" in page
        assert not idle.ready
        # The engine's port proxy accepts and closes at once; without the proxy (iptables
        # only) the connection is refused.
        assert idle.reason in (
            "readiness probe failing: connection closed at once (nothing listening?)",
            "readiness probe failing: connection refused",
        )
        assert rows["http-ok"].reason == "" and rows["tcp-ok"].reason == ""
        assert all(s.restarts == 0 for s in rows.values())  # readiness never restarts
        assert rec.probes_run >= 4


async def test_failing_liveness_restarts_with_reason_and_backoff(
    runtime: DockerRuntime, node_name: str
) -> None:
    # Healthy for two seconds after every start, then not: each run ends by its probe.
    app = shell(
        "flaky",
        "touch /tmp/healthy; sleep 2; rm /tmp/healthy; exec sleep 600",
        liveness=every_second(
            exec=ExecAction(("sh", "-c", "test -f /tmp/healthy")), failure_threshold=2
        ),
    )
    reasons: list[str] = []

    def record(statuses: list[ReplicaStatus]) -> None:
        if statuses and (not reasons or reasons[-1] != statuses[0].reason):
            reasons.append(statuses[0].reason)

    async with running(runtime, CONFIG) as rec:
        rec.set_desired(place(node_name, app), [app])
        (first,) = await wait_statuses(
            rec, lambda s: len(s) == 1 and s[0].ready, timeout_s=30, seen=record
        )
        (status,) = await wait_statuses(
            rec,
            lambda s: len(s) == 1 and s[0].restarts >= 3 and s[0].ready,
            timeout_s=90,
            seen=record,
        )
    cause = "liveness probe failed 2 consecutive times: exit 1"
    assert status.last_termination == cause
    assert status.to_json()["lastTermination"] == cause
    assert status.container_id == first.container_id  # restarted in place, not recreated
    assert f"restarting: {cause}" in reasons
    # The ordinary back-off ladder, with the probe's verdict as the reason. A status reader
    # may skip versions, so check that every back-off seen is on the ladder and they grow.
    pattern = re.compile(r"back-off ([0-9.]+)s restarting failed container \((.*)\)$")
    seen = [(float(m.group(1)), m.group(2)) for r in reasons if (m := pattern.match(r))]
    assert seen and {why for _, why in seen} == {cause}
    delays = [delay for delay, _ in seen]
    assert set(delays) <= {0.2, 0.4, 0.8, 1.6}
    assert delays == sorted(delays)


async def test_startup_probe_holds_liveness_back(
    runtime: DockerRuntime, docker_client: Any, node_name: str
) -> None:
    # Starts slowly: /tmp/started appears after 3 s. Liveness (threshold 1) checks the same
    # file, so without the startup probe the replica would be restarted before it started.
    check = ExecAction(("test", "-f", "/tmp/started"))
    app = shell(
        "slow",
        "sleep 3; touch /tmp/started; exec sleep 600",
        startup=every_second(exec=check, failure_threshold=30),
        liveness=every_second(exec=check, failure_threshold=1),
    )
    reasons: list[str] = []

    def record(statuses: list[ReplicaStatus]) -> None:
        if statuses and (not reasons or reasons[-1] != statuses[0].reason):
            reasons.append(statuses[0].reason)

    async with running(runtime, CONFIG) as rec:
        rec.set_desired(place(node_name, app), [app])
        (started,) = await wait_statuses(
            rec, lambda s: len(s) == 1 and s[0].ready, timeout_s=30, seen=record
        )
        assert started.restarts == 0 and started.last_termination == ""
        assert "startup probe has not passed yet (last: exit 1)" in reasons
        # Liveness runs now: take its file away and the replica is restarted for it.
        docker_client.api.exec_start(
            docker_client.api.exec_create(started.container_id, ["rm", "/tmp/started"])["Id"]
        )
        (status,) = await wait_statuses(
            rec, lambda s: len(s) == 1 and s[0].restarts == 1, timeout_s=30
        )
    assert status.last_termination == "liveness probe failed: exit 1"


async def test_runtime_exec_probe_is_bounded(runtime: DockerRuntime) -> None:
    app = shell("execs", "exec sleep 600")
    info = await runtime.create_and_start(ContainerRequest.for_replica(app, "execs-0"))
    assert await runtime.exec_probe(info.id, ["sh", "-c", "echo hi; exit 3"], 5) == (3, b"hi\n")
    assert await runtime.exec_probe(info.id, ["true"], 5) == (0, b"")
    with trio.fail_after(30):  # only a hung engine trips this
        code, _ = await runtime.exec_probe(info.id, ["sleep", "30"], 1)
    assert code is None
    await runtime.stop(info.id, timeout_s=1)
    with pytest.raises(ContainerConflict):
        await runtime.exec_probe(info.id, ["true"], 5)
