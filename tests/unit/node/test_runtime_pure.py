"""The runtime's engine-free parts: request building, inspect/event parsing, error mapping."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs
import docker
import docker.errors
import pytest
import requests
import requests.exceptions

from p2porch.node.errors import (
    ContainerConflict,
    ContainerNotFound,
    EngineRefused,
    EngineUnavailable,
    ImageUnavailable,
    SpecError,
)
from p2porch.node.runtime import (
    ENV_REPLICA,
    LABEL_GENERATION,
    LABEL_NODE,
    ContainerRequest,
    ContainerState,
    DockerRuntime,
    EventKind,
    PortBinding,
    RuntimeConfig,
    container_event,
    container_info,
    parse_engine_time,
    translate_error,
)
from p2porch.node.spec import (
    App,
    AppSpec,
    BindMount,
    EnvVar,
    ObjectMeta,
    PortSpec,
    Protocol,
    Resources,
    VolumeMount,
)

MiB = 1024 * 1024


def offline_runtime() -> DockerRuntime:
    """A runtime whose clients never connect (an explicit API version skips the probe)."""
    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
    return DockerRuntime("n1", "127.0.0.2", client, client, RuntimeConfig())


def demo_app() -> App:
    return App(
        ObjectMeta("hello", "shop", labels={"tier": "web"}, generation=3),
        AppSpec(
            image="p2porch/demo:latest",
            env=(EnvVar("MESSAGE", "hi"), EnvVar("P2PORCH_REPLICA", "forged")),
            ports=(PortSpec(8080, 30080), PortSpec(53, None, Protocol.UDP)),
            resources=Resources(250, 500, 16 * MiB, 32 * MiB),
            volumes=(BindMount("/srv", "/srv", True), VolumeMount("data", "/data")),
            stop_grace_s=4,
        ),
    )


def test_config_checks_and_presets() -> None:
    assert RuntimeConfig.local().thread_limit >= 1
    assert RuntimeConfig.lan().request_timeout_s > RuntimeConfig.local().request_timeout_s
    for bad in (
        {"thread_limit": 0},
        {"stream_limit": 0},
        {"request_timeout_s": 0.0},
        {"log_max_files": 0},
    ):
        with pytest.raises(ValueError):
            RuntimeConfig(**bad)


def test_request_for_replica() -> None:
    request = ContainerRequest.for_replica(demo_app(), "hello-2")
    assert (request.app, request.namespace, request.replica, request.generation) == (
        "hello",
        "shop",
        "hello-2",
        3,
    )
    assert request.ports == (PortBinding(8080, 30080), PortBinding(53, None, Protocol.UDP))
    assert request.cpu_limit_millicores == 500 and request.memory_limit_bytes == 32 * MiB
    assert request.labels == (("tier", "web"),) and request.stop_grace_s == 4
    unpublished = ContainerRequest.for_replica(demo_app(), "hello-2", publish=False)
    assert all(p.host_port is None for p in unpublished.ports)
    with pytest.raises(SpecError):
        ContainerRequest.for_replica(demo_app(), "Bad_Name")


def test_create_arguments() -> None:
    rt = offline_runtime()
    request = ContainerRequest.for_replica(demo_app(), "hello-2")
    name = rt.container_name(request)
    assert name == "p2porch_n1_shop_hello-2_g3"
    kwargs: dict[str, Any] = rt._create_kwargs(request, name)
    host = kwargs["host_config"]
    # Published ports bind the advertise address only; unpublished ones get any free port.
    assert host["PortBindings"] == {
        "8080/tcp": [{"HostIp": "127.0.0.2", "HostPort": "30080"}],
        "53/udp": [{"HostIp": "127.0.0.2", "HostPort": ""}],
    }
    assert host["Init"] is True and host["RestartPolicy"] == {"Name": "no"}
    assert host["NanoCpus"] == 500_000_000 and host["CpuShares"] == 256
    assert host["Memory"] == 32 * MiB and host["MemorySwap"] == 32 * MiB
    assert host["MemoryReservation"] == 16 * MiB
    mounts = {m["Target"]: m for m in host["Mounts"]}
    assert mounts["/srv"]["Type"] == "bind" and mounts["/srv"]["ReadOnly"] is True
    assert mounts["/data"]["Source"] == "p2porch_n1_shop_data"
    labels = kwargs["labels"]
    assert labels[LABEL_NODE] == "n1" and labels[LABEL_GENERATION] == "3"
    assert labels["tier"] == "web"
    env = kwargs["environment"]
    assert "MESSAGE=hi" in env and f"{ENV_REPLICA}=hello-2" in env
    assert f"{ENV_REPLICA}=forged" not in env  # the runtime's own variables win
    assert kwargs["hostname"] == "hello-2" and kwargs["stop_timeout"] == 4
    assert "entrypoint" not in kwargs and "command" not in kwargs  # the image's CMD runs


def test_command_and_args_follow_kubernetes() -> None:
    rt = offline_runtime()
    base = ContainerRequest(app="a", namespace="default", replica="a-0", generation=0, image="i")
    with_cmd = rt._create_kwargs(
        ContainerRequest(
            app="a",
            namespace="default",
            replica="a-0",
            generation=0,
            image="i",
            command=("sh", "-c"),
            args=("echo hi",),
        ),
        "x",
    )
    assert with_cmd["entrypoint"] == ["sh", "-c"] and with_cmd["command"] == ["echo hi"]
    only_args = rt._create_kwargs(
        ContainerRequest(
            app="a", namespace="default", replica="a-0", generation=0, image="i", args=("x",)
        ),
        "x",
    )
    assert "entrypoint" not in only_args and only_args["command"] == ["x"]
    plain = rt._create_kwargs(base, "x")
    assert "NanoCpus" not in plain["host_config"] and "Memory" not in plain["host_config"]


def test_user_labels_cannot_forge_ownership() -> None:
    rt = offline_runtime()
    request = ContainerRequest(
        app="a",
        namespace="default",
        replica="a-0",
        generation=0,
        image="i",
        labels={"io.p2porch.node": "someone-else", "ok": "1"},
    )
    labels = rt._create_kwargs(request, "x")["labels"]
    assert labels[LABEL_NODE] == "n1" and labels["ok"] == "1"


def test_engine_times() -> None:
    assert parse_engine_time("0001-01-01T00:00:00Z") is None
    assert parse_engine_time("") is None and parse_engine_time(None) is None
    assert parse_engine_time("2026-11-26T18:06:58.673050843Z") == datetime(
        2026, 11, 26, 18, 6, 58, 673050, tzinfo=UTC
    )
    assert parse_engine_time("2026-11-26T18:06:58Z") == datetime(
        2026, 11, 26, 18, 6, 58, tzinfo=UTC
    )
    assert parse_engine_time("2026-11-26T18:06:58.5+00:00") == datetime(
        2026, 11, 26, 18, 6, 58, 500000, tzinfo=UTC
    )
    assert parse_engine_time("garbage") is None


INSPECT: dict[str, Any] = {
    "Id": "abc123",
    "Name": "/p2porch_n1_shop_hello-0_g3",
    "RestartCount": 0,
    "Config": {
        "Image": "p2porch/demo:latest",
        "Labels": {
            "io.p2porch.node": "n1",
            "io.p2porch.app": "hello",
            "io.p2porch.namespace": "shop",
            "io.p2porch.replica": "hello-0",
            "io.p2porch.generation": "3",
        },
    },
    "State": {
        "Status": "exited",
        "ExitCode": 137,
        "OOMKilled": True,
        "Error": "",
        "StartedAt": "2026-11-26T18:06:58.673050843Z",
        "FinishedAt": "2026-11-26T18:06:58.726759069Z",
    },
    "NetworkSettings": {
        "Ports": {"8080/tcp": [{"HostIp": "127.0.0.2", "HostPort": "30080"}], "9090/tcp": None}
    },
}


def test_container_info_from_inspect() -> None:
    info = container_info(INSPECT)
    assert info.name == "p2porch_n1_shop_hello-0_g3"
    assert (info.app, info.namespace, info.replica, info.generation) == (
        "hello",
        "shop",
        "hello-0",
        3,
    )
    assert info.state is ContainerState.EXITED and not info.running
    assert info.exit_code == 137 and info.oom_killed
    assert info.host_port(8080) == 30080 and info.host_port(9090) is None
    assert info.finished_at is not None and info.started_at is not None


def test_container_info_never_exited_has_no_exit_code() -> None:
    fresh = {
        **INSPECT,
        "State": {
            "Status": "running",
            "ExitCode": 0,
            "StartedAt": "2026-11-26T18:06:58Z",
            "FinishedAt": "0001-01-01T00:00:00Z",
        },
    }
    info = container_info(fresh)
    assert info.running and info.exit_code is None and info.finished_at is None
    odd = container_info({"State": {"Status": "weird"}, "Config": {"Labels": None}})
    assert odd.state is ContainerState.UNKNOWN and odd.generation is None


def event(action: str, **attributes: str) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": action,
        "Actor": {
            "ID": "abc",
            "Attributes": {
                "name": "c",
                "io.p2porch.replica": "r-0",
                "io.p2porch.generation": "2",
                **attributes,
            },
        },
        "timeNano": 1_700_000_000_123_456_789,
    }


def test_container_events() -> None:
    died = container_event(event("die", exitCode="3"))
    assert died is not None and died.kind is EventKind.DIE and died.exit_code == 3
    assert died.replica == "r-0" and died.generation == 2
    assert died.time_ns == 1_700_000_000_123_456_789
    health = container_event(event("health_status: unhealthy"))
    assert health is not None and health.kind is EventKind.HEALTH
    assert health.health == "unhealthy" and health.exit_code is None
    oom = container_event(event("oom"))
    assert oom is not None and oom.kind is EventKind.OOM
    assert container_event(event("exec_start: sh")) is None
    assert container_event({"Type": "network", "Action": "connect"}) is None


def api_error(status: int, explanation: str = "boom") -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError("x", response=response, explanation=explanation)


def test_error_translation() -> None:
    assert isinstance(translate_error(docker.errors.NotFound("gone"), "w"), ContainerNotFound)
    assert isinstance(translate_error(api_error(409), "w"), ContainerConflict)
    refused = translate_error(api_error(500, "port is already allocated"), "starting r")
    assert isinstance(refused, EngineRefused) and refused.status == 500
    assert "starting r" in str(refused) and "port is already allocated" in str(refused)
    assert isinstance(
        translate_error(requests.exceptions.ConnectionError("x"), "w"), EngineUnavailable
    )
    assert isinstance(translate_error(requests.exceptions.ReadTimeout("x"), "w"), EngineUnavailable)
    assert isinstance(translate_error(OSError("x"), "w"), EngineUnavailable)
    mine = ImageUnavailable("x", "y")
    assert translate_error(mine, "w") is mine


async def test_bad_connect_arguments() -> None:
    with pytest.raises(SpecError):
        await DockerRuntime.connect("bad_name", "127.0.0.2")
    with pytest.raises(SpecError):
        await DockerRuntime.connect("n1", "not-an-ip")


class FakeApi:
    """Just enough of docker's APIClient for ensure_image: a pull that reports progress."""

    def __init__(self, pull_items: list[dict[str, Any]], present_after_pull: bool = True) -> None:
        self.pull_items = pull_items
        self.present = False
        self.present_after_pull = present_after_pull
        self.pulled: list[str] = []

    def inspect_image(self, ref: str) -> dict[str, Any]:
        if not self.present:
            raise docker.errors.ImageNotFound(f"no such image: {ref}")
        return {"Id": "sha256:feed"}

    def pull(self, ref: str, stream: bool, decode: bool) -> Any:
        assert stream and decode
        self.pulled.append(ref)
        yield from self.pull_items
        self.present = self.present_after_pull


class FakeClient:
    def __init__(self, api: FakeApi) -> None:
        self.api = api


def fake_runtime(api: FakeApi) -> DockerRuntime:
    client = FakeClient(api)
    return DockerRuntime("n1", "127.0.0.2", client, client, RuntimeConfig())


async def test_ensure_image_pulls_with_progress() -> None:
    api = FakeApi(
        [
            {"status": "Pulling from x/y", "id": "1.0"},
            {"status": "Downloading", "id": "abc", "progressDetail": {"current": 5, "total": 10}},
            {"status": "Download complete", "id": "abc"},
        ]
    )
    seen: list[Any] = []
    assert await fake_runtime(api).ensure_image("x/y:1.0", seen.append) == "sha256:feed"
    assert api.pulled == ["x/y:1.0"]
    assert [p.status for p in seen] == ["Pulling from x/y", "Downloading", "Download complete"]
    assert (seen[1].layer, seen[1].current_bytes, seen[1].total_bytes) == ("abc", 5, 10)
    # Present now: no second pull.
    assert await fake_runtime(api).ensure_image("x/y:1.0") == "sha256:feed"
    assert api.pulled == ["x/y:1.0"]


async def test_ensure_image_error_in_the_pull_stream() -> None:
    api = FakeApi([{"status": "Pulling"}, {"error": "manifest unknown"}])
    with pytest.raises(ImageUnavailable) as caught:
        await fake_runtime(api).ensure_image("x/y:2")
    assert caught.value.reason == "manifest unknown" and caught.value.ref == "x/y:2"
    vanished = FakeApi([], present_after_pull=False)
    with pytest.raises(ImageUnavailable, match="not present"):
        await fake_runtime(vanished).ensure_image("x/y:3")
    with pytest.raises(ImageUnavailable, match="not a valid"):
        await fake_runtime(vanished).ensure_image("has space")


def test_health_check_config() -> None:
    from p2porch.node.runtime import HealthCheck

    check = HealthCheck(("wget", "-q", "localhost:8080"), interval_s=2, timeout_s=1, retries=2)
    assert check.to_engine() == {
        "test": ["CMD", "wget", "-q", "localhost:8080"],
        "interval": 2_000_000_000,
        "timeout": 1_000_000_000,
        "retries": 2,
        "start_period": 0,
    }
    for bad in (
        {"command": ()},
        {"command": ("x",), "retries": 0},
        {"command": ("x",), "interval_s": 0.0},
    ):
        with pytest.raises(ValueError):
            HealthCheck(**bad)
    rt = offline_runtime()
    request = ContainerRequest(
        app="a", namespace="default", replica="a-0", generation=0, image="i", health=check
    )
    assert rt._create_kwargs(request, "x")["healthcheck"] == check.to_engine()


def test_udp_published_ports_are_bound_by_the_replica_tcp_ones_left_to_the_mesh() -> None:
    app = attrs.evolve(
        demo_app(),
        spec=attrs.evolve(
            demo_app().spec,
            ports=(PortSpec(8080, 30080), PortSpec(53, 30053, Protocol.UDP)),
        ),
    )
    request = ContainerRequest.for_replica(app, "hello-2", publish=False)
    assert request.ports == (PortBinding(8080, None), PortBinding(53, 30053, Protocol.UDP))


def test_containers_get_the_node_resolver_and_their_namespace_first() -> None:
    rt = offline_runtime()
    request = ContainerRequest.for_replica(demo_app(), "hello-2")
    assert "dns" not in rt._create_kwargs(request, "x")["host_config"]
    rt.dns_servers, rt.dns_domain = ("192.168.1.10",), "p2porch"
    host = rt._create_kwargs(request, "x")["host_config"]
    assert host["Dns"] == ["192.168.1.10"]
    assert host["DnsSearch"] == ["shop.p2porch", "p2porch"]
