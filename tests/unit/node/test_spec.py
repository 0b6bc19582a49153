"""Desired-state records: every rule refuses with a field path, and the wire round trip holds."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.node.errors import SpecError, format_path
from p2porch.node.spec import (
    App,
    AppSpec,
    BindMount,
    ConstraintOp,
    EnvVar,
    ExecAction,
    HttpGetAction,
    Namespace,
    ObjectMeta,
    PlacementConstraint,
    PortSpec,
    Probe,
    Protocol,
    Resources,
    RestartPolicy,
    RestartPolicyKind,
    TcpSocketAction,
    UpdateStrategy,
    VolumeMount,
    check_dns_label,
    replica_name,
)

from .strategies import apps

MiB = 1024 * 1024


def full_app() -> App:
    return App(
        ObjectMeta("hello", "shop", labels={"tier": "web", "example.com/team": "a"}, generation=4),
        AppSpec(
            image="p2porch/demo:latest",
            command=("/bin/sh", "-c"),
            args=("exec httpd -f",),
            env=(EnvVar("MESSAGE", "hi"), EnvVar("EMPTY", "")),
            ports=(PortSpec(8080, 30080), PortSpec(53, None, Protocol.UDP)),
            replicas=3,
            resources=Resources(250, 500, 64 * MiB, 128 * MiB),
            restart_policy=RestartPolicy(RestartPolicyKind.ON_FAILURE, 5),
            placement=(PlacementConstraint.parse("zone==a"), PlacementConstraint.parse("ssd")),
            volumes=(BindMount("/srv/www", "/www", True), VolumeMount("data", "/data")),
            stop_grace_s=3,
        ),
    )


def path_of(exc: pytest.ExceptionInfo[SpecError]) -> str:
    return format_path(exc.value.path)


def test_codec_round_trip_and_hash() -> None:
    app = full_app()
    decoded: App = codec.decode(codec.encode(app), App)
    assert decoded == app and hash(decoded) == hash(app)
    ns = Namespace("shop", labels={"owner": "me"})
    assert codec.decode(codec.encode(ns), Namespace | App) == ns


def test_labels_are_canonical_whatever_the_input_order() -> None:
    a = ObjectMeta("x", labels={"b": "2", "a": "1"})
    b = ObjectMeta("x", labels=[("a", "1"), ("b", "2")])
    assert a == b and a.labels == (("a", "1"), ("b", "2"))
    assert a.labels_dict == {"a": "1", "b": "2"}


@pytest.mark.parametrize("name", ["Hello", "-a", "a-", "a_b", "", "a" * 64, "a.b", "ü"])
def test_names_must_be_dns_labels(name: str) -> None:
    with pytest.raises(SpecError) as caught:
        ObjectMeta(name)
    assert path_of(caught) == "name"
    with pytest.raises(SpecError):
        check_dns_label(name)


def test_good_names() -> None:
    for name in ["a", "a-b", "0", "a" * 63, "web-1"]:
        assert ObjectMeta(name, namespace=name).name == name


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda: PortSpec(0), "container_port"),
        (lambda: PortSpec(65536), "container_port"),
        (lambda: PortSpec(True), "container_port"),
        (lambda: PortSpec(80, 0), "published_port"),
        (lambda: PortSpec(80, None, "tcp"), "protocol"),  # type: ignore[arg-type]
        (lambda: EnvVar("1X", "v"), "name"),
        (lambda: EnvVar("A-B", "v"), "name"),
        (lambda: EnvVar("A", "x\x00y"), "value"),
        (lambda: Resources(cpu_request_millicores=-1), "cpu_request_millicores"),
        (lambda: Resources(cpu_limit_millicores=0), "cpu_limit_millicores"),
        (lambda: Resources(500, 250), "cpu_limit_millicores"),
        (
            lambda: Resources(memory_request_bytes=64 * MiB, memory_limit_bytes=32 * MiB),
            "memory_limit_bytes",
        ),
        (lambda: Resources(memory_limit_bytes=1024), "memory_limit_bytes"),
        (lambda: RestartPolicy(RestartPolicyKind.NEVER, 3), "max_restarts"),
        (lambda: RestartPolicy(RestartPolicyKind.ALWAYS, -1), "max_restarts"),
        (lambda: BindMount("relative", "/x"), "host_path"),
        (lambda: BindMount("/x", "/"), "container_path"),
        (lambda: BindMount("/x", "/a/../b"), "container_path"),
        (lambda: BindMount("/x", "/a:ro"), "container_path"),
        (lambda: VolumeMount("Data", "/data"), "name"),
        (lambda: PlacementConstraint("zone", ConstraintOp.EXISTS, "a"), "value"),
        (lambda: PlacementConstraint("zone", ConstraintOp.EQUALS, None), "value"),
        (lambda: PlacementConstraint("bad key!", ConstraintOp.EXISTS), "key"),
        (lambda: ObjectMeta("x", labels={"io.p2porch.node": "n"}), "labels.io.p2porch.node"),
        (lambda: ObjectMeta("x", labels={"k": "bad value"}), "labels.k"),
        (lambda: ObjectMeta("x", generation=-1), "generation"),
        (lambda: AppSpec("has space"), "image"),
        (lambda: AppSpec("img", replicas=-1), "replicas"),
        (lambda: AppSpec("img", stop_grace_s=3601), "stop_grace_s"),
        (lambda: AppSpec("img", args=("a", 3)), "args[1]"),  # type: ignore[arg-type]
        (lambda: AppSpec("img", env=(EnvVar("A", "1"), EnvVar("A", "2"))), "env[1].name"),
        (lambda: AppSpec("img", ports=(PortSpec(80), PortSpec(80))), "ports[1].container_port"),
        (
            lambda: AppSpec("img", ports=(PortSpec(80, 8080), PortSpec(81, 8080))),
            "ports[1].published_port",
        ),
        (
            lambda: AppSpec("img", volumes=(VolumeMount("a", "/d"), BindMount("/h", "/d"))),
            "volumes[1].container_path",
        ),
    ],
)
def test_each_rule_refuses_with_its_path(make: object, path: str) -> None:
    with pytest.raises(SpecError) as caught:
        make()  # type: ignore[operator]
    assert path_of(caught) == path
    assert isinstance(caught.value, ValueError)  # so codec.decode reports CodecError


def test_same_port_number_on_two_protocols_is_fine() -> None:
    spec = AppSpec("img", ports=(PortSpec(53), PortSpec(53, protocol=Protocol.UDP)))
    assert len(spec.ports) == 2


def test_bad_values_from_a_peer_are_codec_errors() -> None:
    good = codec.to_primitive(PortSpec(80))
    bad = [good[0], 0, None, "tcp"]
    import msgpack

    with pytest.raises(CodecError):
        codec.decode(msgpack.packb(bad), PortSpec)


def test_restart_policy_rule() -> None:
    never = RestartPolicy(RestartPolicyKind.NEVER)
    on_failure = RestartPolicy(RestartPolicyKind.ON_FAILURE, max_restarts=2)
    always = RestartPolicy()
    assert not never.should_restart(1, 0)
    assert not on_failure.should_restart(0, 0)
    assert on_failure.should_restart(1, 1)
    assert not on_failure.should_restart(1, 2)
    assert always.should_restart(0, 10_000)


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("zone==a", {"zone": "a"}, True),
        ("zone==a", {"zone": "b"}, False),
        ("zone==a", {}, False),
        ("zone!=a", {"zone": "b"}, True),
        ("zone!=a", {}, True),
        ("zone!=a", {"zone": "a"}, False),
        ("gpu", {"gpu": ""}, True),
        ("gpu", {}, False),
        (" example.com/disk == ssd ", {"example.com/disk": "ssd"}, True),
    ],
)
def test_constraints(text: str, labels: dict[str, str], expected: bool) -> None:
    constraint = PlacementConstraint.parse(text)
    assert constraint.matches(labels) is expected
    assert PlacementConstraint.parse(str(constraint)) == constraint


@pytest.mark.parametrize("text", ["zone=a", "==a", "zone!", "zone==a==b", "a b"])
def test_bad_constraints(text: str) -> None:
    with pytest.raises(SpecError):
        PlacementConstraint.parse(text)


def test_app_helpers() -> None:
    app = full_app()
    assert app.key == ("shop", "hello")
    assert app.replica_names() == ("hello-0", "hello-1", "hello-2")
    assert app.with_generation(9).meta.generation == 9
    assert app.spec.env_dict == {"MESSAGE": "hi", "EMPTY": ""}
    assert app.spec.placement_matches({"zone": "a", "ssd": "yes"})
    assert not app.spec.placement_matches({"zone": "a"})
    long = "a" * 63
    assert len(replica_name(long, 12)) <= 63 and replica_name(long, 12).endswith("-12")
    check_dns_label(replica_name(long, 12))


@settings(max_examples=60, deadline=None)
@given(apps())
def test_codec_round_trip_any_app(app: App) -> None:
    decoded: App = codec.decode(codec.encode(app), App)
    assert decoded == app
    assert attrs.evolve(app) == app


# --------------------------------------------------------------------------- probes


def probed_spec(**probes: Probe) -> AppSpec:
    return AppSpec(
        image="p2porch/demo:latest",
        ports=(PortSpec(8080), PortSpec(53, None, Protocol.UDP)),
        **probes,  # type: ignore[arg-type]
    )


def test_probe_defaults_are_kubernetes() -> None:
    probe = Probe(tcp=TcpSocketAction(8080))
    assert (
        probe.initial_delay_s,
        probe.period_s,
        probe.timeout_s,
        probe.failure_threshold,
        probe.success_threshold,
    ) == (0, 10, 1, 3, 1)
    assert HttpGetAction(8080).path == "/"
    assert probe.action == TcpSocketAction(8080) and probe.port == 8080
    assert Probe(exec=ExecAction(("true",))).port is None


def test_probes_round_trip_the_codec() -> None:
    spec = probed_spec(
        liveness=Probe(exec=ExecAction(("sh", "-c", "test -f /tmp/ok")), failure_threshold=1),
        readiness=Probe(http_get=HttpGetAction(8080, "/healthz?full=1"), success_threshold=2),
        startup=Probe(tcp=TcpSocketAction(8080), period_s=2, failure_threshold=30),
    )
    decoded: AppSpec = codec.decode(codec.encode(spec), AppSpec)
    assert decoded == spec
    assert [name for name, _ in spec.probes()] == ["liveness", "readiness", "startup"]


def test_an_older_writer_without_probe_fields_decodes_to_none() -> None:
    import msgpack

    spec = probed_spec()
    fields = msgpack.unpackb(codec.encode(spec))
    # The probes are followed only by the traffic fields (update, ingress, balance).
    assert fields[-6:-3] == [None, None, None]
    older: AppSpec = codec.decode(msgpack.packb(fields[:-6]), AppSpec)
    assert older == spec and older.liveness is None
    assert older.update == UpdateStrategy() and older.ingress == ()


@pytest.mark.parametrize(
    ("make", "path", "fragment"),
    [
        (Probe, "", "exactly one action"),
        (
            lambda: Probe(tcp=TcpSocketAction(1), exec=ExecAction(("true",))),
            "",
            "exactly one action",
        ),
        (lambda: Probe(tcp=TcpSocketAction(8080), period_s=0), "period_s", "1-3600"),
        (lambda: Probe(tcp=TcpSocketAction(8080), timeout_s=0), "timeout_s", "1-3600"),
        (
            lambda: Probe(tcp=TcpSocketAction(8080), initial_delay_s=-1),
            "initial_delay_s",
            "0-86400",
        ),
        (lambda: Probe(tcp=TcpSocketAction(8080), failure_threshold=0), "failure_threshold", "1-"),
        (lambda: Probe(tcp=TcpSocketAction(8080), success_threshold=True), "success_threshold", ""),
        (lambda: Probe(tcp=ExecAction(("x",))), "tcp", "expected TcpSocketAction"),  # type: ignore[arg-type]
        (lambda: TcpSocketAction(0), "port", "1-65535"),
        (lambda: HttpGetAction(8080, "healthz"), "path", "starting with /"),
        (lambda: HttpGetAction(8080, "/a b"), "path", "without spaces"),
        (lambda: HttpGetAction(8080, "/" + "x" * 2048), "path", "at most 2048"),
        (lambda: ExecAction(()), "command", "needs a command"),
        (lambda: ExecAction(("a\x00",)), "command[0]", "NUL"),
        (
            lambda: probed_spec(liveness=Probe(http_get=HttpGetAction(9090))),
            "liveness.http_get.port",
            "not one of the app's TCP container ports (8080)",
        ),
        (
            lambda: probed_spec(readiness=Probe(tcp=TcpSocketAction(53))),
            "readiness.tcp.port",
            "TCP container ports",
        ),
        (
            lambda: probed_spec(liveness=Probe(tcp=TcpSocketAction(8080), success_threshold=2)),
            "liveness.success_threshold",
            "must be 1 for a liveness probe",
        ),
        (
            lambda: probed_spec(startup=Probe(tcp=TcpSocketAction(8080), success_threshold=3)),
            "startup.success_threshold",
            "must be 1 for a startup probe",
        ),
        (lambda: probed_spec(startup="tcp 8080"), "startup", "expected Probe"),  # type: ignore[arg-type]
    ],
)
def test_probe_rules(make: Any, path: str, fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        make()
    assert path_of(caught) == path and fragment in caught.value.message


def test_readiness_may_want_several_successes_and_exec_needs_no_port() -> None:
    spec = probed_spec(
        readiness=Probe(tcp=TcpSocketAction(8080), success_threshold=3),
        liveness=Probe(exec=ExecAction(("true",))),
    )
    assert spec.readiness is not None and spec.readiness.success_threshold == 3
    assert AppSpec(image="x", liveness=Probe(exec=ExecAction(("true",)))).liveness is not None
