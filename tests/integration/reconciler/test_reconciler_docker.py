"""The Reconciler against the real engine: start, serve, remove, restart, crash loop, adopt.

Waits are on behaviour (statuses changing, a page answering) under ``fail_after`` bounds that
only catch a hung engine; nothing asserts on how long anything took.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import pytest
import trio

from p2porch.node import images
from p2porch.node.reconcile_core import ReconcilerConfig, ReplicaState, ReplicaStatus
from p2porch.node.reconciler import Reconciler, ReconcilerError
from p2porch.node.runtime import LABEL_GENERATION, LABEL_NODE, DockerRuntime
from p2porch.node.spec import (
    App,
    AppSpec,
    EnvVar,
    ObjectMeta,
    PortSpec,
    Resources,
    RestartPolicy,
    RestartPolicyKind,
)
from p2porch.node.state import Placement

from .conftest import ADDRESS, TEST_LABEL, fetch, free_port, running, wait_statuses

pytestmark = pytest.mark.docker


def demo_app(generation: int = 1, message: str = "Hello from a reconciler test") -> App:
    spec = AppSpec(
        image=images.DEMO_IMAGE,
        env=(EnvVar("MESSAGE", message),),
        ports=(PortSpec(8080, 30080),),
        replicas=2,
        resources=Resources(
            cpu_request_millicores=50,
            cpu_limit_millicores=250,
            memory_request_bytes=16 * 1024 * 1024,
            memory_limit_bytes=32 * 1024 * 1024,
        ),
        stop_grace_s=1,
    )
    return App(ObjectMeta("hello"), spec).with_generation(generation)


def shell_app(name: str, script: str, policy: RestartPolicy | None = None) -> App:
    spec = AppSpec(
        image=images.BUSYBOX_IMAGE,
        command=("sh", "-c", script),
        restart_policy=policy or RestartPolicy(),
        stop_grace_s=1,
    )
    return App(ObjectMeta(name), spec).with_generation(1)


def place(app: App, node: str, *slots: int) -> list[Placement]:
    return [Placement("default", app.meta.name, s, node, app.meta.generation) for s in slots]


def all_running(count: int) -> Any:
    def check(statuses: list[ReplicaStatus]) -> bool:
        return len(statuses) == count and all(s.state is ReplicaState.RUNNING for s in statuses)

    return check


async def test_two_demo_replicas_serve_then_one_is_unassigned(
    runtime: DockerRuntime, docker_client: Any, node_name: str
) -> None:
    app = demo_app()
    async with running(runtime) as rec:
        rec.set_desired(place(app, node_name, 0, 1), [app])
        statuses = await wait_statuses(rec, all_running(2))
        assert [s.name for s in statuses] == ["hello-0", "hello-1"]
        for status in statuses:
            (port_key, address) = status.published_ports[0]
            assert port_key == "8080" and address.startswith(f"{ADDRESS}:")
            page = await fetch(f"http://{address}/")
            assert "Hello from a reconciler test" in page and status.name in page
            host = docker_client.api.inspect_container(status.container_id)["HostConfig"]
            assert host["NanoCpus"] == 250_000_000
            assert host["Memory"] == 32 * 1024 * 1024
            assert host["PortBindings"]["8080/tcp"][0]["HostIp"] == ADDRESS
        gone = statuses[1].container_id

        rec.set_desired(place(app, node_name, 0), [app])
        await wait_statuses(rec, lambda s: [x.name for x in s] == ["hello-0"])
        with trio.fail_after(30):
            while gone in {c.id for c in await runtime.list_owned()}:
                await trio.sleep(0.1)
        (kept,) = await runtime.list_owned()
        assert kept.id == statuses[0].container_id and kept.running


async def test_killed_container_is_restarted_in_place(
    runtime: DockerRuntime, docker_client: Any, node_name: str
) -> None:
    app = shell_app("sleeper", "sleep 600")
    async with running(runtime) as rec:
        rec.set_desired(place(app, node_name, 0), [app])
        (before,) = await wait_statuses(rec, all_running(1))
        docker_client.containers.get(before.container_id).kill()
        (after,) = await wait_statuses(
            rec, lambda s: len(s) == 1 and s[0].restarts == 1 and s[0].ready
        )
    assert after.container_id == before.container_id  # restarted, not recreated
    assert rec.events_seen > 0


async def test_crash_loop_backs_off_and_counts_restarts(
    runtime: DockerRuntime, node_name: str
) -> None:
    app = shell_app("crasher", "echo boom; exit 3")
    reasons: list[str] = []

    def record(statuses: list[ReplicaStatus]) -> None:
        if statuses and (not reasons or reasons[-1] != statuses[0].reason):
            reasons.append(statuses[0].reason)

    async with running(runtime) as rec:
        rec.set_desired(place(app, node_name, 0), [app])
        (status,) = await wait_statuses(
            rec,
            lambda s: len(s) == 1 and s[0].restarts >= 3 and s[0].state is ReplicaState.FAILED,
            seen=record,
        )
    assert status.exit_code == 3 and not status.terminal
    # The fast preset: 0.2 s doubling to 1.6 s. A status reader may skip a version, so
    # check that every back-off seen is on that ladder and that they grow.
    pattern = re.compile(r"back-off ([0-9.]+)s restarting failed container \(exit 3\)$")
    delays = [float(m.group(1)) for r in reasons if (m := pattern.match(r))]
    assert len(delays) >= 2
    assert set(delays) <= {0.2, 0.4, 0.8, 1.6}
    assert delays == sorted(delays) and len(set(delays)) == len(delays)
    (info,) = await runtime.list_owned()
    async with runtime.logs(info.id) as lines:
        logged = [line async for line in lines]
    assert logged.count(b"boom") >= 3  # in-place restarts keep every run's output


async def test_missing_image_is_a_terminal_fact_with_a_clear_reason(
    runtime: DockerRuntime, node_name: str
) -> None:
    ghost = f"{ADDRESS}:{free_port(ADDRESS)}/p2porch/absent:v1"  # a registry nobody serves
    app = App(ObjectMeta("ghost"), AppSpec(image=ghost)).with_generation(1)
    config = ReconcilerConfig(backoff_base_s=30, backoff_max_s=60, stop_timeout_s=1)
    async with running(runtime, config) as rec:
        rec.set_desired(place(app, node_name, 0), [app])
        (status,) = await wait_statuses(rec, lambda s: len(s) == 1 and s[0].terminal)
        assert status.state is ReplicaState.FAILED
        assert status.reason.startswith(f"image {ghost} unavailable: ")
        (fact,) = rec.terminal_facts()
        assert fact.state == "failed" and fact.node == node_name and fact.generation == 1
    assert await runtime.list_owned() == []


async def test_policy_never_reports_success_and_keeps_the_container(
    runtime: DockerRuntime, node_name: str
) -> None:
    app = shell_app("job", "echo done", RestartPolicy(RestartPolicyKind.NEVER))
    async with running(runtime) as rec:
        rec.set_desired(place(app, node_name, 0), [app])
        (status,) = await wait_statuses(rec, lambda s: len(s) == 1 and s[0].terminal)
    assert status.state is ReplicaState.SUCCEEDED and status.exit_code == 0
    assert status.restarts == 0
    assert [c.id for c in await runtime.list_owned()] == [status.container_id]


async def test_oom_killed_replica_is_reported(runtime: DockerRuntime, node_name: str) -> None:
    grow = "x=0123456789abcdef; while true; do x=$x$x; done"
    base = shell_app("hog", grow, RestartPolicy(RestartPolicyKind.NEVER))
    app = App(
        base.meta,
        attrs.evolve(base.spec, resources=Resources(memory_limit_bytes=16 * 1024 * 1024)),
    )
    async with running(runtime) as rec:
        rec.set_desired(place(app, node_name, 0), [app])
        (status,) = await wait_statuses(rec, lambda s: len(s) == 1 and s[0].terminal)
    assert status.oom_killed and status.exit_code == 137
    assert status.state is ReplicaState.FAILED
    assert status.reason == "OOMKilled; restart policy never"


async def test_foreign_containers_untouched_own_orphans_removed(
    runtime: DockerRuntime, docker_client: Any, node_name: str
) -> None:
    unlabelled = docker_client.containers.run(
        images.BUSYBOX_IMAGE, ["sleep", "600"], detach=True, init=True,
        labels={TEST_LABEL: node_name},
    )  # fmt: skip
    other_node = docker_client.containers.run(
        images.BUSYBOX_IMAGE, ["sleep", "600"], detach=True, init=True,
        labels={TEST_LABEL: node_name, LABEL_NODE: f"{node_name}-other"},
    )  # fmt: skip
    app = shell_app("sleeper", "sleep 600")
    orphan_app = shell_app("orphan", "sleep 600")
    async with running(runtime) as rec:
        # An own container nobody assigns any more (e.g. its app was deleted while down).
        rec.set_desired(place(orphan_app, node_name, 0), [orphan_app])
        (orphan,) = await wait_statuses(rec, all_running(1))
        rec.set_desired(place(app, node_name, 0), [app])
        (mine,) = await wait_statuses(rec, lambda s: all_running(1)(s) and s[0].app == "sleeper")
        with trio.fail_after(30):
            while orphan.container_id in {c.id for c in await runtime.list_owned()}:
                await trio.sleep(0.1)
        passes = rec.passes
        rec.poke()
        with trio.fail_after(30):
            while rec.passes < passes + 2:
                await trio.sleep(0.05)
                rec.poke()
    for foreign in (unlabelled, other_node):
        foreign.reload()
        assert foreign.status == "running"
    assert [c.id for c in await runtime.list_owned()] == [mine.container_id]


async def test_restarted_reconciler_adopts_then_replaces_on_new_generation(
    runtime: DockerRuntime, node_name: str
) -> None:
    app = demo_app()
    async with running(runtime) as first:
        first.set_desired(place(app, node_name, 0, 1), [app])
        before = await wait_statuses(first, all_running(2))
    started = {c.id: c.started_at for c in await runtime.list_owned()}

    # A new daemon process: a new Reconciler on the same node finds the replicas running.
    async with running(runtime) as second:
        assert second.statuses() == []  # nothing decided before the desired set is known
        second.set_desired(place(app, node_name, 0, 1), [app])
        adopted = await wait_statuses(second, all_running(2))
        assert [s.container_id for s in adopted] == [s.container_id for s in before]
        assert {c.id: c.started_at for c in await runtime.list_owned()} == started
        assert second.actions_done == 0

        # A new spec generation replaces each replica (stop-then-start).
        newer = demo_app(generation=2, message="second generation")
        second.set_desired(place(newer, node_name, 0, 1), [newer])
        replaced = await wait_statuses(
            second, lambda s: all_running(2)(s) and all(x.generation == 2 for x in s)
        )
        with trio.fail_after(30):
            while len(owned := await runtime.list_owned()) != 2:
                await trio.sleep(0.1)
        assert {dict(c.labels)[LABEL_GENERATION] for c in owned} == {"2"}
        assert not {s.container_id for s in replaced} & set(started)
        page = await fetch(f"http://{replaced[0].published_ports[0][1]}/")
        assert "second generation" in page


async def test_bound_published_port_and_shutdown_all(
    runtime: DockerRuntime, node_name: str
) -> None:
    port = free_port(ADDRESS)
    base = demo_app()
    app = App(
        base.meta,
        AppSpec(
            image=base.spec.image,
            ports=(PortSpec(8080, port),),
            replicas=1,
            stop_grace_s=1,
        ),
    )
    config = ReconcilerConfig(
        backoff_base_s=0.2, backoff_max_s=1.6, stop_timeout_s=1, bind_published_ports=True
    )
    async with running(runtime, config) as rec:
        rec.set_desired(place(app, node_name, 0), [app])
        (status,) = await wait_statuses(rec, all_running(1))
        assert status.published_ports == (("8080", f"{ADDRESS}:{port}"),)
        assert "hello-0" in await fetch(f"http://{ADDRESS}:{port}/")
        await rec.shutdown_all()
        assert rec.statuses() == []
        assert await runtime.list_owned() == []
        # Halted: later passes do not bring it back.
        rec.poke()
        await trio.sleep(0.5)
        assert await runtime.list_owned() == []


async def test_runtime_of_another_node_is_refused(runtime: DockerRuntime) -> None:
    with pytest.raises(ReconcilerError):
        Reconciler(runtime, "someone-else", ADDRESS)
    with pytest.raises(ReconcilerError):
        Reconciler(runtime, runtime.node_name, "127.0.0.9")
