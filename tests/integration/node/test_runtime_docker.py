"""DockerRuntime against the real engine: demo page, exits, OOM, ownership, images, logs, exec.

Each test waits on behaviour (an event, a page answering) under a generous ``fail_after``
that only bounds a hung engine; nothing asserts on how long anything took.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from p2porch.node import images
from p2porch.node.errors import (
    ContainerConflict,
    EngineRefused,
    EngineUnavailable,
    ImageUnavailable,
    NotOwned,
)
from p2porch.node.manifest import load_manifest_file
from p2porch.node.runtime import (
    LABEL_APP,
    LABEL_GENERATION,
    LABEL_NAMESPACE,
    LABEL_NODE,
    LABEL_REPLICA,
    ContainerEvent,
    ContainerRequest,
    ContainerState,
    DockerRuntime,
    EventKind,
    EventStream,
    HealthCheck,
    PortBinding,
    PullProgress,
    RuntimeConfig,
)
from p2porch.node.spec import App, BindMount, VolumeMount
from tests.integration.dockerkit import fetch

from .conftest import ADDRESS, TEST_LABEL, free_port

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[3]
BUSYBOX = images.BUSYBOX_IMAGE
DEMO = images.DEMO_IMAGE


def busybox(replica: str, script: str, **kwargs: Any) -> ContainerRequest:
    return ContainerRequest(
        app="probe",
        namespace="default",
        replica=replica,
        generation=1,
        image=BUSYBOX,
        command=("sh", "-c", script),
        stop_grace_s=1,
        **kwargs,
    )


async def next_event(
    events: EventStream, container_id: str, kinds: set[EventKind]
) -> ContainerEvent:
    with trio.fail_after(60):
        async for event in events:
            if event.container_id == container_id and event.kind in kinds:
                return event
    raise AssertionError("event stream ended")


async def test_demo_replica_serves_page_with_limits_and_labels(
    runtime: DockerRuntime, docker_client: Any
) -> None:
    (app,) = [m for m in load_manifest_file(REPO / "examples" / "demo.yaml") if isinstance(m, App)]
    port = free_port(ADDRESS)
    base = ContainerRequest.for_replica(app.with_generation(7), "hello-1")
    # The manifest's published port may be taken on a shared machine: pick a free one.
    request = attrs.evolve(
        base,
        env=(*[kv for kv in base.env if kv[0] != "MESSAGE"], ("MESSAGE", "Hi from a test")),
        ports=(PortBinding(8080, port),),
        cpu_limit_millicores=500,
        memory_limit_bytes=32 * 1024 * 1024,
        memory_request_bytes=16 * 1024 * 1024,
    )
    info = await runtime.create_and_start(request)
    assert info.state is ContainerState.RUNNING
    assert info.replica == "hello-1" and info.app == app.meta.name and info.generation == 7
    assert info.host_port(8080) == port
    assert all(p.host_ip == ADDRESS for p in info.ports)

    page = await fetch(f"http://{ADDRESS}:{port}/")
    assert "Hi from a test" in page
    assert "hello-1" in page
    assert (await fetch(f"http://{ADDRESS}:{port}/healthz")).strip() == "ok"

    raw = docker_client.api.inspect_container(info.id)
    labels = raw["Config"]["Labels"]
    assert labels[LABEL_NODE] == runtime.node_name
    assert labels[LABEL_APP] == app.meta.name
    assert labels[LABEL_NAMESPACE] == app.meta.namespace
    assert labels[LABEL_REPLICA] == "hello-1"
    assert labels[LABEL_GENERATION] == "7"
    host = raw["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 32 * 1024 * 1024
    assert host["MemoryReservation"] == 16 * 1024 * 1024
    assert host["Init"] is True
    assert host["PortBindings"]["8080/tcp"] == [{"HostIp": ADDRESS, "HostPort": str(port)}]
    assert "P2PORCH_REPLICA=hello-1" in raw["Config"]["Env"]

    assert [c.id for c in await runtime.list_owned()] == [info.id]

    async with runtime.logs(info.id) as lines:
        logged = [line async for line in lines]
    assert any(b"replica hello-1 serving on port 8080" in line for line in logged)

    # With an init as PID 1 the stop ends well within the grace period; we check the
    # outcome (a clean exit), not the time.
    await runtime.stop(info.id, timeout_s=30)
    stopped = await runtime.inspect(info.id)
    assert stopped.state is ContainerState.EXITED
    assert stopped.exit_code is not None and not stopped.oom_killed
    assert stopped.started_at is not None and stopped.finished_at is not None
    assert stopped.finished_at >= stopped.started_at
    await runtime.remove(info.id)
    assert await runtime.list_owned() == []


async def test_exit_code_reported_by_event_and_inspect(runtime: DockerRuntime) -> None:
    async with runtime.events() as events:
        info = await runtime.create_and_start(busybox("exit-3", "echo bye; exit 3"))
        died = await next_event(events, info.id, {EventKind.DIE})
    assert died.exit_code == 3
    assert died.replica == "exit-3" and died.app == "probe" and died.generation == 1
    inspected = await runtime.inspect(info.id)
    assert inspected.state is ContainerState.EXITED
    assert inspected.exit_code == 3
    assert not inspected.oom_killed


async def test_engine_health_checks_arrive_as_events(runtime: DockerRuntime) -> None:
    check = HealthCheck(("test", "-f", "/tmp/ok"), interval_s=0.2, timeout_s=2, retries=1)
    async with runtime.events() as events:
        info = await runtime.create_and_start(busybox("checked", "sleep 60", health=check))
        verdicts: list[str | None] = []
        with trio.fail_after(60):
            async for event in events:
                if event.container_id != info.id or event.kind is not EventKind.HEALTH:
                    continue
                verdicts.append(event.health)
                if event.health == "unhealthy":
                    code, _ = await runtime.exec(info.id, ["touch", "/tmp/ok"])
                    assert code == 0
                elif event.health == "healthy":
                    break
    assert verdicts[-2:] == ["unhealthy", "healthy"]


async def test_memory_limit_exceeded_is_oom_killed(runtime: DockerRuntime) -> None:
    # This machine runs cgroup v1 with the memory controller: the kill is reported.
    grow = "x=0123456789abcdef; while true; do x=$x$x; done"
    request = busybox("hog", grow, memory_limit_bytes=16 * 1024 * 1024)
    seen: set[EventKind] = set()
    async with runtime.events() as events:
        info = await runtime.create_and_start(request)
        with trio.fail_after(60):
            async for event in events:
                if event.container_id == info.id:
                    seen.add(event.kind)
                    if event.kind is EventKind.DIE:
                        break
    inspected = await runtime.inspect(info.id)
    assert inspected.oom_killed
    assert inspected.exit_code == 137
    assert EventKind.OOM in seen


async def test_foreign_containers_are_never_listed_or_touched(
    runtime: DockerRuntime, docker_client: Any, node_name: str
) -> None:
    mine = await runtime.create_and_start(busybox("mine", "sleep 60"))
    unlabelled = docker_client.containers.run(
        BUSYBOX, ["sleep", "60"], detach=True, init=True, labels={TEST_LABEL: node_name}
    )
    other_node = docker_client.containers.run(
        BUSYBOX,
        ["sleep", "60"],
        detach=True,
        init=True,
        labels={TEST_LABEL: node_name, LABEL_NODE: f"{node_name}-other"},
    )
    assert [c.id for c in await runtime.list_owned()] == [mine.id]
    for foreign in (unlabelled, other_node):
        with pytest.raises(NotOwned):
            await runtime.inspect(foreign.id)
        with pytest.raises(NotOwned):
            await runtime.stop(foreign.id, timeout_s=1)
        with pytest.raises(NotOwned):
            await runtime.remove(foreign.id)
        with pytest.raises(NotOwned):
            await runtime.exec(foreign.id, ["true"])
        with pytest.raises(NotOwned):
            async with runtime.logs(foreign.id) as lines:
                async for _ in lines:
                    pass
        foreign.reload()
        assert foreign.status == "running"


async def test_ensure_image_without_registry(runtime: DockerRuntime) -> None:
    updates: list[PullProgress] = []
    # Present locally: returned without a pull.
    image_id = await runtime.ensure_image(BUSYBOX, updates.append)
    assert image_id.startswith("sha256:") and updates == []
    assert await runtime.has_image(BUSYBOX)
    # A registry on loopback where nothing listens: the pull fails with a clear error.
    missing = f"{ADDRESS}:{free_port(ADDRESS)}/p2porch/absent:v1"
    assert not await runtime.has_image(missing)
    with trio.fail_after(60), pytest.raises(ImageUnavailable) as caught:
        await runtime.ensure_image(missing, updates.append)
    assert caught.value.ref == missing
    assert missing in str(caught.value) and "cannot be pulled" in str(caught.value)
    # Creating from an image that is not there names the image too.
    with pytest.raises(ImageUnavailable):
        await runtime.create_and_start(
            ContainerRequest(
                app="probe", namespace="default", replica="ghost", generation=0, image=missing
            )
        )


async def test_logs_exec_and_errors(runtime: DockerRuntime) -> None:
    info = await runtime.create_and_start(
        busybox("chatty", "for i in 1 2 3 4 5; do echo line-$i; done; sleep 60")
    )
    code, output = await runtime.exec(info.id, ["sh", "-c", "echo inside; exit 4"])
    assert (code, output) == (4, b"inside\n")
    code, output = await runtime.exec(info.id, ["cat", "/proc/1/cmdline"])
    assert code == 0 and b"init" in output  # docker-init is PID 1
    with trio.fail_after(30):
        while True:
            async with runtime.logs(info.id, tail=2) as lines:
                tail = [line async for line in lines]
            if tail == [b"line-4", b"line-5"]:
                break
            await trio.sleep(0.1)
    followed: list[bytes] = []
    async with runtime.logs(info.id, follow=True) as lines:
        with trio.fail_after(30):
            async for line in lines:
                followed.append(line)
                if line == b"line-5":
                    break
    assert followed == [f"line-{i}".encode() for i in range(1, 6)]
    await runtime.stop(info.id, timeout_s=5)
    with pytest.raises(ContainerConflict):
        await runtime.exec(info.id, ["true"])
    await runtime.remove(info.id)
    await runtime.remove(info.id, missing_ok=True)


async def test_failed_start_is_cleaned_up(runtime: DockerRuntime) -> None:
    port = free_port(ADDRESS)
    first = await runtime.create_and_start(
        busybox("holder", "sleep 60", ports=(PortBinding(8080, port),))
    )
    with pytest.raises(EngineRefused) as caught:
        await runtime.create_and_start(
            busybox("clash", "sleep 60", ports=(PortBinding(8080, port),))
        )
    assert str(port) in str(caught.value) or "allocated" in str(caught.value)
    assert [c.id for c in await runtime.list_owned()] == [first.id]
    with pytest.raises(ContainerConflict):  # same replica and generation: same name
        await runtime.create_and_start(busybox("holder", "sleep 60"))
    missing_dir = BindMount("/nonexistent/p2porch-test", "/data")
    with pytest.raises(EngineRefused):
        await runtime.create_and_start(busybox("nodir", "sleep 60", volumes=(missing_dir,)))
    assert [c.id for c in await runtime.list_owned()] == [first.id]


async def test_volumes_bind_and_named(runtime: DockerRuntime, tmp_path: Path) -> None:
    (tmp_path / "greeting").write_text("from the host\n")
    mounts = (
        BindMount(str(tmp_path), "/host", read_only=True),
        VolumeMount("scratch", "/data"),
    )
    writer = await runtime.create_and_start(
        busybox("writer", "echo kept > /data/note; sleep 60", volumes=mounts)
    )
    code, output = await runtime.exec(writer.id, ["cat", "/host/greeting"])
    assert (code, output) == (0, b"from the host\n")
    code, _ = await runtime.exec(writer.id, ["sh", "-c", "echo x > /host/new"])
    assert code != 0  # read-only bind
    await runtime.remove(writer.id)
    reader = await runtime.create_and_start(busybox("reader", "sleep 60", volumes=mounts))
    with trio.fail_after(30):
        while True:
            code, output = await runtime.exec(reader.id, ["cat", "/data/note"])
            if code == 0:
                break
            await trio.sleep(0.1)
    assert output == b"kept\n"
    volume = runtime.volume_name("default", "scratch")
    assert await runtime.list_owned_volumes() == [volume]
    with pytest.raises(ContainerConflict):  # still mounted by the reader
        await runtime.remove_volume(volume)
    await runtime.remove(reader.id)
    await runtime.remove_volume(volume)
    assert await runtime.list_owned_volumes() == []


async def test_unreachable_engine_is_engine_unavailable() -> None:
    config = RuntimeConfig(docker_host="unix:///nonexistent/p2porch-docker.sock")
    with pytest.raises(EngineUnavailable):
        await DockerRuntime.connect("nowhere", ADDRESS, config)


async def test_images_through_the_runtime(
    runtime: DockerRuntime, built_images: dict[str, str]
) -> None:
    assert await images.ensure_builtin_images(runtime) == built_images


def test_image_builds_are_idempotent(docker_client: Any, built_images: dict[str, str]) -> None:
    before = {tag: docker_client.images.get(tag).id for tag in built_images}
    again = images.build_builtin_images(docker_client)
    assert again == built_images
    assert {tag: docker_client.images.get(tag).id for tag in built_images} == before
    out = docker_client.containers.run(
        BUSYBOX, ["sh", "-c", "ls /bin | wc -l"], remove=True, labels={TEST_LABEL: "images"}
    )
    assert int(out.decode().strip()) > 100
