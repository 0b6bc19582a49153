"""Manifests: happy paths, every error kind located precisely, round trips, hostile input."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import attrs
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2porch.node.errors import ManifestError, ManifestProblem
from p2porch.node.manifest import (
    dump_manifests,
    format_cpu,
    format_memory,
    load_manifest_file,
    parse_cpu_millicores,
    parse_manifests,
    parse_memory_bytes,
    to_manifest,
)
from p2porch.node.spec import (
    App,
    BindMount,
    ConstraintOp,
    EnvVar,
    ExecAction,
    HttpGetAction,
    Namespace,
    PortSpec,
    Probe,
    Protocol,
    Resources,
    RestartPolicy,
    RestartPolicyKind,
    TcpSocketAction,
    VolumeMount,
)

from .strategies import apps
from .strategies import text as any_text

REPO = Path(__file__).resolve().parents[3]
MiB = 1024 * 1024

FULL = """\
apiVersion: p2porch/v1
kind: Namespace
metadata:
  name: shop
  labels: {team: web}
---
apiVersion: p2porch/v1
kind: App
metadata:
  name: hello
  namespace: shop
  labels:
    tier: web
spec:
  image: p2porch/demo:latest
  command: ["/bin/sh", "-c"]
  args: ["exec httpd -f -p 8080", 42]
  env:
    - name: MESSAGE
      value: Hello
    - name: COUNT
      value: 3
    - name: EMPTY
  ports:
    - containerPort: 8080
      publishedPort: 30080
    - containerPort: 53
      protocol: UDP
  replicas: 3
  resources:
    requests: {cpu: 250m, memory: 64Mi}
    limits: {cpu: 1, memory: 1Gi}
  restartPolicy: {policy: on-failure, maxRestarts: 5}
  placement:
    constraints: ["zone==a", "disk!=hdd", gpu]
  volumes:
    - volume: data
      mountPath: /data
    - hostPath: /srv/www
      mountPath: /www
      readOnly: true
  stopGracePeriodSeconds: 5
"""


def problems_of(text: str, filename: str = "m.yaml") -> list[ManifestProblem]:
    with pytest.raises(ManifestError) as caught:
        parse_manifests(text, filename)
    assert caught.value.problems, "a ManifestError always carries problems"
    return list(caught.value.problems)


def only_problem(text: str) -> ManifestProblem:
    problems = problems_of(text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def app_doc(spec: str, meta: str = "name: web") -> str:
    return (
        "apiVersion: p2porch/v1\nkind: App\nmetadata:\n"
        + textwrap.indent(textwrap.dedent(meta), "  ")
        + "\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )


# --------------------------------------------------------------------------- happy paths


def test_full_manifest() -> None:
    ns, app = parse_manifests(FULL, "full.yaml")
    assert ns == Namespace("shop", labels={"team": "web"})
    assert isinstance(app, App)
    assert app.meta.key == ("shop", "hello") and app.meta.labels_dict == {"tier": "web"}
    spec = app.spec
    assert spec.command == ("/bin/sh", "-c") and spec.args == ("exec httpd -f -p 8080", "42")
    assert spec.env == (EnvVar("MESSAGE", "Hello"), EnvVar("COUNT", "3"), EnvVar("EMPTY", ""))
    assert spec.ports == (PortSpec(8080, 30080), PortSpec(53, None, Protocol.UDP))
    assert spec.replicas == 3
    assert spec.resources == Resources(250, 1000, 64 * MiB, 1024 * MiB)
    assert spec.restart_policy == RestartPolicy(RestartPolicyKind.ON_FAILURE, 5)
    assert [c.op for c in spec.placement] == [
        ConstraintOp.EQUALS,
        ConstraintOp.NOT_EQUALS,
        ConstraintOp.EXISTS,
    ]
    assert spec.volumes == (VolumeMount("data", "/data"), BindMount("/srv/www", "/www", True))
    assert spec.stop_grace_s == 5


def test_demo_example_parses() -> None:
    (app,) = load_manifest_file(REPO / "examples" / "demo.yaml")
    assert isinstance(app, App)
    assert app.spec.replicas == 3 and app.spec.image == "p2porch/demo:latest"
    assert app.spec.env_dict["MESSAGE"]
    # The published port belongs to the routing mesh; the ingress routes every host's "/".
    assert app.spec.ports[0].container_port == 8080
    assert app.spec.ports[0].published_port == 30080
    assert [(r.host, r.path, r.port) for r in app.spec.ingress] == [("", "/", 8080)]
    assert app.spec.update.order.value == "start-first"


def test_every_example_parses() -> None:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        assert load_manifest_file(path), path


def test_minimal_app_defaults() -> None:
    (app,) = parse_manifests(app_doc("image: busybox"))
    assert isinstance(app, App)
    assert app.meta.namespace == "default" and app.meta.generation == 0
    assert app.spec.replicas == 1 and app.spec.restart_policy == RestartPolicy()
    assert app.spec.resources == Resources()


def test_empty_documents_are_skipped() -> None:
    text = "# nothing\n---\n---\n" + app_doc("image: busybox") + "\n---\n"
    assert len(parse_manifests(text)) == 1
    assert parse_manifests("") == []


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("always", RestartPolicyKind.ALWAYS),
        ("OnFailure", RestartPolicyKind.ON_FAILURE),
        ("Never", RestartPolicyKind.NEVER),
        ("on-failure", RestartPolicyKind.ON_FAILURE),
    ],
)
def test_restart_policy_spellings(written: str, expected: RestartPolicyKind) -> None:
    (app,) = parse_manifests(app_doc(f"image: busybox\nrestartPolicy: {written}"))
    assert isinstance(app, App) and app.spec.restart_policy.kind is expected


def test_limits_alone_become_requests() -> None:
    (app,) = parse_manifests(
        app_doc("image: busybox\nresources: {limits: {cpu: 500m, memory: 64Mi}}")
    )
    assert isinstance(app, App)
    assert app.spec.resources == Resources(500, 500, 64 * MiB, 64 * MiB)


def test_generation_is_accepted_and_ignored() -> None:
    (app,) = parse_manifests(app_doc("image: busybox", "name: web\ngeneration: 12"))
    assert isinstance(app, App) and app.meta.generation == 0


def test_anchors_and_merge_keys() -> None:
    text = app_doc(
        """\
        image: busybox
        env:
          - &msg {name: MESSAGE, value: hi}
        ports:
          - <<: {containerPort: 80}
            publishedPort: 8080
        """
    )
    (app,) = parse_manifests(text)
    assert isinstance(app, App)
    assert app.spec.ports == (PortSpec(80, 8080),)


@pytest.mark.parametrize(
    ("text", "millis"),
    [
        ("250m", 250),
        ("0.5", 500),
        (0.5, 500),
        ("1", 1000),
        (2, 2000),
        ("1.25", 1250),
        ("100m", 100),
        (".1", 100),
        ("2e0", 2000),
    ],
)
def test_cpu_quantities(text: object, millis: int) -> None:
    assert parse_cpu_millicores(text) == millis


@pytest.mark.parametrize(
    ("text", "num_bytes"),
    [
        ("64Mi", 64 * MiB),
        ("1G", 10**9),
        ("128974848", 128974848),
        (128974848, 128974848),
        ("1.5Gi", 3 * 512 * MiB),
        ("129e6", 129 * 10**6),
        ("1Ki", 1024),
        ("1k", 1000),
        ("2Ti", 2 * 2**40),
    ],
)
def test_memory_quantities(text: object, num_bytes: int) -> None:
    assert parse_memory_bytes(text) == num_bytes


@pytest.mark.parametrize("text", ["0.0001", "1.5m", "250M", "abc", "", True, None, "1e30", [1]])
def test_bad_cpu_quantities(text: object) -> None:
    with pytest.raises(ValueError):
        parse_cpu_millicores(text)


@pytest.mark.parametrize("text", ["0.5", "64MB", "1.1Ki", "-1", "abc", True, "1e400", "500m"])
def test_bad_memory_quantities(text: object) -> None:
    with pytest.raises(ValueError):
        parse_memory_bytes(text)


def test_quantity_formatting() -> None:
    assert [format_cpu(m) for m in (250, 1000, 1500, 0)] == ["250m", "1", "1500m", "0"]
    assert [format_memory(b) for b in (64 * MiB, 1000, 0, 1536, 3072)] == [
        "64Mi",
        1000,
        0,
        1536,
        "3Ki",
    ]


# --------------------------------------------------------------------------- errors


def test_wrong_type_is_reported_with_path_line_and_value() -> None:
    text = app_doc(
        """\
        image: busybox
        ports:
          - containerPort: 8080
          - containerPort: http
        """
    )
    problem = only_problem(text)
    assert problem.path == "spec.ports[1].containerPort"
    assert problem.message == 'expected an integer 1-65535, got "http"'
    assert (problem.filename, problem.document, problem.line) == ("m.yaml", 1, 9)
    assert str(problem) == (
        "m.yaml: document 1, line 9, column 22: spec.ports[1].containerPort: "
        'expected an integer 1-65535, got "http"'
    )


def test_unknown_fields_suggest_the_near_miss() -> None:
    text = app_doc("image: busybox\nreplica: 3\nports: [{containerport: 80}]\nfoo: 1")
    problems = {p.path: p.message for p in problems_of(text)}
    assert problems["spec.replica"] == 'unknown field (did you mean "replicas"?)'
    assert (
        problems["spec.ports[0].containerport"] == 'unknown field (did you mean "containerPort"?)'
    )
    assert problems["spec.foo"] == "unknown field"
    # the port item then lacks its required field
    assert problems["spec.ports[0].containerPort"] == "required field is missing"


def test_yaml_syntax_error_has_line_and_column() -> None:
    text = app_doc("image: busybox") + "\n---\nkind: App\n  bad: [indent\n"
    problem = only_problem(text)
    assert problem.document == 2
    assert (problem.line, problem.column) == (9, 6)
    assert problem.message.startswith("YAML syntax error")


def test_all_problems_of_all_documents_are_collected() -> None:
    text = (
        app_doc("image: busybox\nreplicas: many", "name: Web")
        + "\n---\n"
        + app_doc("image: 3\nstopGracePeriodSeconds: -1")
        + "\n---\napiVersion: v2\nkind: Pod\nmetadata: {name: x}\n"
    )
    problems = problems_of(text)
    located = {(p.document, p.path) for p in problems}
    assert located == {
        (1, "metadata.name"),
        (1, "spec.replicas"),
        (2, "spec.image"),
        (2, "spec.stopGracePeriodSeconds"),
        (3, "apiVersion"),
        (3, "kind"),
    }
    assert all(p.line is not None for p in problems)
    message = str(ManifestError(problems))
    assert message.startswith("6 problems in manifest")


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        ("image: busybox\nreplicas: -1", "spec.replicas", "expected an integer 0-10000, got -1"),
        ("image: busybox\nreplicas: true", "spec.replicas", "got true"),
        ("image: [a]", "spec.image", "expected a single value, got a list"),
        ("image: 'has space'", "spec.image", "image reference"),
        ("command: [a]", "spec.image", "required field is missing"),
        ("image: busybox\ncommand: a b", "spec.command", "expected a list"),
        ("image: busybox\nenv: [{name: 1X, value: a}]", "spec.env[0].name", "not a valid variable"),
        ("image: busybox\nenv: [{name: A}, {name: A}]", "spec.env[1].name", "duplicate variable A"),
        ("image: busybox\nenv: {A: b}", "spec.env", "expected a list, got a mapping"),
        (
            "image: busybox\nports: [{containerPort: 80, protocol: sctp}]",
            "spec.ports[0].protocol",
            'expected tcp or udp, got "sctp"',
        ),
        (
            "image: busybox\nports: [{containerPort: 80}, {containerPort: 80}]",
            "spec.ports[1].containerPort",
            "listed twice",
        ),
        (
            "image: busybox\nports: [{containerPort: 80, publishedPort: 70000}]",
            "spec.ports[0].publishedPort",
            "expected an integer 1-65535, got 70000",
        ),
        (
            "image: busybox\nresources: {requests: {cpu: 2}, limits: {cpu: 1}}",
            "spec.resources.limits.cpu",
            "below the request",
        ),
        (
            "image: busybox\nresources: {limits: {memory: 1Mi}}",
            "spec.resources.limits.memory",
            "expected an integer",
        ),
        (
            "image: busybox\nresources: {requests: {cpu: lots}}",
            "spec.resources.requests.cpu",
            "expected a cpu quantity",
        ),
        (
            "image: busybox\nresources: {requests: {gpu: 1}}",
            "spec.resources.requests.gpu",
            "unknown field",
        ),
        (
            "image: busybox\nrestartPolicy: sometimes",
            "spec.restartPolicy",
            "expected always, on-failure or never",
        ),
        (
            "image: busybox\nrestartPolicy: {policy: never, maxRestarts: 2}",
            "spec.restartPolicy.maxRestarts",
            "cannot have max_restarts",
        ),
        (
            "image: busybox\nplacement: {constraints: ['zone=a']}",
            "spec.placement.constraints[0]",
            "not a constraint",
        ),
        ("image: busybox\nplacement: ['zone==a']", "spec.placement", "expected a mapping"),
        ("image: busybox\nvolumes: [{mountPath: /x}]", "spec.volumes[0]", "exactly one of"),
        (
            "image: busybox\nvolumes: [{volume: d, hostPath: /h, mountPath: /x}]",
            "spec.volumes[0]",
            "exactly one of",
        ),
        ("image: busybox\nvolumes: [{volume: d}]", "spec.volumes[0].mountPath", "required"),
        (
            "image: busybox\nvolumes: [{volume: D, mountPath: /x}]",
            "spec.volumes[0].volume",
            "not a valid name",
        ),
        (
            "image: busybox\nvolumes: [{hostPath: h, mountPath: /x}]",
            "spec.volumes[0].hostPath",
            "absolute path",
        ),
        (
            "image: busybox\nvolumes: [{volume: d, mountPath: /x, readOnly: maybe}]",
            "spec.volumes[0].readOnly",
            "expected true or false",
        ),
        (
            "image: busybox\nvolumes: [{volume: a, mountPath: /x}, {volume: b, mountPath: /x}]",
            "spec.volumes[1].mountPath",
            "mounted twice",
        ),
        (
            "image: busybox\nstopGracePeriodSeconds: 1.5",
            "spec.stopGracePeriodSeconds",
            "expected an integer 0-3600, got 1.5",
        ),
        ("image: busybox\nimage: other", "spec.image", "field given twice"),
        ("image: busybox\n1: x", "spec", "field names are strings"),
        ("image: !!python/object:os.system echo", "spec.image", "cannot read value"),
    ],
)
def test_spec_errors(spec: str, path: str, fragment: str) -> None:
    problems = problems_of(app_doc(spec))
    assert any(p.path == path and fragment in p.message for p in problems), "\n".join(
        map(str, problems)
    )
    assert all(p.line is not None for p in problems)


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("- a\n- b\n", "", "expected a mapping, got a list"),
        ("just text\n", "", 'expected a mapping, got "just text"'),
        ("kind: App\nmetadata: {name: a}\nspec: {image: b}\n", "apiVersion", "required"),
        ("apiVersion: p2porch/v1\nkind: Ap\nmetadata: {name: a}\n", "kind", 'did you mean "App"'),
        ("apiVersion: p2porch/v1\nkind: App\nmetadata: {name: a}\n", "spec", "required"),
        (
            "apiVersion: p2porch/v1\nkind: App\nmetadata: {namespace: a}\nspec: {image: b}\n",
            "metadata.name",
            "required",
        ),
        (
            "apiVersion: p2porch/v1\nkind: App\nmetadata: {name: a, labels: {io.p2porch.x: y}}\n"
            "spec: {image: b}\n",
            "metadata.labels.io.p2porch.x",
            "reserved prefix",
        ),
        (
            "apiVersion: p2porch/v1\nkind: App\nmetadata: {name: a, labels: [x]}\n"
            "spec: {image: b}\n",
            "metadata.labels",
            "expected a mapping",
        ),
        (
            "apiVersion: p2porch/v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n",
            "metadata.namespace",
            "not namespaced",
        ),
        (
            "apiVersion: p2porch/v1\nkind: Namespace\nmetadata: {name: a}\nspec: {}\n",
            "spec",
            "has no spec",
        ),
        (
            "apiVersion: p2porch/v1\nkind: Namespace\nmetadata: {name: A}\n",
            "metadata.name",
            "not a valid name",
        ),
        (
            "apiVersion: p2porch/v1\nkind: Namespace\nmetadata: {name: a}\n---\n"
            "apiVersion: p2porch/v1\nkind: Namespace\nmetadata: {name: a}\n",
            "metadata.name",
            "already defined in document 1",
        ),
    ],
)
def test_document_errors(text: str, path: str, fragment: str) -> None:
    problems = problems_of(text)
    assert any(p.path == path and fragment in p.message for p in problems), "\n".join(
        map(str, problems)
    )


def test_duplicate_apps_only_clash_within_a_namespace() -> None:
    text = app_doc("image: a") + "\n---\n" + app_doc("image: a", "name: web\nnamespace: other")
    assert len(parse_manifests(text)) == 2
    problem = only_problem(text + "\n---\n" + app_doc("image: b"))
    assert problem.document == 3 and "already defined in document 1" in problem.message


def test_alias_bomb_and_recursive_alias_are_refused() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        prev = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
    assert "more than" in only_problem(bomb).message
    assert "nested deeper" in only_problem("a: &x [*x]\n").message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(tmp_path / "missing.yaml")
    assert "cannot read the file" in str(caught.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError):
        load_manifest_file(binary)


def test_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(app_doc("image: busybox\nreplicas: x"))
    with pytest.raises(ManifestError) as caught:
        load_manifest_file(path)
    assert str(caught.value.problems[0]).startswith(f"{path}: document 1, line 7")


# --------------------------------------------------------------------------- round trips


def test_round_trip_full_manifest() -> None:
    objs = parse_manifests(FULL)
    assert parse_manifests(dump_manifests(objs)) == objs
    app = objs[1]
    assert isinstance(app, App)
    doc = to_manifest(app.with_generation(3))
    assert doc["metadata"]["generation"] == 3
    assert doc["spec"]["resources"] == {
        "requests": {"cpu": "250m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(apps())
def test_round_trip_any_app(app: App) -> None:
    text = yaml.safe_dump(to_manifest(app), sort_keys=False)
    assert parse_manifests(text) == [app.with_generation(0)]


# --------------------------------------------------------------------------- hostile input


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_garbage_text_only_raises_manifest_error(text: str) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifests(text, "fuzz.yaml")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_only_raise_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifests(data, "fuzz.yaml")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "image",
    "ports",
    "containerPort",
    "resources",
    "limits",
    "cpu",
    "memory",
    "volumes",
    "env",
    "name",
    "value",
]


@settings(max_examples=120, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(FIELDS),
        yaml_values | st.dictionaries(st.sampled_from(FIELDS), yaml_values, max_size=5),
        max_size=6,
    )
)
def test_random_documents_only_raise_manifest_error(doc: dict[str, object]) -> None:
    doc.setdefault("apiVersion", "p2porch/v1")
    doc.setdefault("kind", "App")
    text = yaml.safe_dump(doc)
    try:
        parse_manifests(text, "fuzz.yaml")
    except ManifestError as exc:
        assert all(isinstance(p, ManifestProblem) for p in exc.problems)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(FULL) - 1), st.text(max_size=5), st.integers(0, 5))
def test_mutated_manifest_only_raises_manifest_error(pos: int, insert: str, cut: int) -> None:
    text = FULL[:pos] + insert + FULL[pos + cut :]
    with contextlib.suppress(ManifestError):
        parse_manifests(text, "fuzz.yaml")


# --------------------------------------------------------------------------- probes

PROBES = """\
image: p2porch/demo:latest
ports: [{containerPort: 8080}, {containerPort: 53, protocol: udp}]
livenessProbe:
  exec:
    command: ["sh", "-c", "test -f /tmp/healthy"]
  initialDelaySeconds: 5
  periodSeconds: 2
  failureThreshold: 1
readinessProbe:
  httpGet: {path: /healthz, port: 8080}
  timeoutSeconds: 2
  successThreshold: 2
startupProbe:
  tcpSocket: {port: 8080}
  failureThreshold: 30
"""


def test_probes_parse_with_kubernetes_names() -> None:
    (app,) = parse_manifests(app_doc(PROBES))
    assert isinstance(app, App)
    assert app.spec.liveness == Probe(
        exec=ExecAction(("sh", "-c", "test -f /tmp/healthy")),
        initial_delay_s=5,
        period_s=2,
        failure_threshold=1,
    )
    assert app.spec.readiness == Probe(
        http_get=HttpGetAction(8080, "/healthz"), timeout_s=2, success_threshold=2
    )
    assert app.spec.startup == Probe(tcp=TcpSocketAction(8080), failure_threshold=30)
    # httpGet.path defaults to /.
    (plain,) = parse_manifests(app_doc("image: a\nports: [{containerPort: 80}]\n"
                                       "readinessProbe: {httpGet: {port: 80}}"))  # fmt: skip
    assert isinstance(plain, App) and plain.spec.readiness == Probe(http_get=HttpGetAction(80))


def test_probes_round_trip() -> None:
    objs = parse_manifests(app_doc(PROBES))
    text = dump_manifests(objs)
    assert parse_manifests(text) == objs
    app = objs[0]
    assert isinstance(app, App)
    spec = to_manifest(app)["spec"]
    assert spec["readinessProbe"] == {
        "httpGet": {"path": "/healthz", "port": 8080},
        "initialDelaySeconds": 0,
        "periodSeconds": 10,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
        "successThreshold": 2,
    }
    assert spec["livenessProbe"]["exec"] == {"command": ["sh", "-c", "test -f /tmp/healthy"]}
    assert spec["startupProbe"]["tcpSocket"] == {"port": 8080}
    bare = to_manifest(parse_manifests(app_doc("image: a"))[0])["spec"]
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(bare)


PORTS = "image: a\nports: [{containerPort: 8080}]\n"


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        (
            "livenessProbe: {httpGet: {port: 8080}, initialDelaySecond: 3}",
            "spec.livenessProbe.initialDelaySecond",
            'unknown field (did you mean "initialDelaySeconds"?)',
        ),
        (
            "livenessProbe: {httpGet: {port: 8080}, exec: {command: [x]}}",
            "spec.livenessProbe",
            "exactly one of httpGet, tcpSocket or exec (got httpGet and exec)",
        ),
        ("readinessProbe: {periodSeconds: 5}", "spec.readinessProbe", "exactly one of"),
        ("readinessProbe: tcp", "spec.readinessProbe", 'expected a mapping, got "tcp"'),
        (
            "livenessProbe: {httpGet: {port: http}}",
            "spec.livenessProbe.httpGet.port",
            'expected an integer 1-65535, got "http"',
        ),
        (
            "livenessProbe: {httpGet: {port: 9090}}",
            "spec.livenessProbe.httpGet.port",
            "port 9090 is not one of the app's TCP container ports (8080)",
        ),
        (
            "startupProbe: {tcpSocket: {port: 81}}",
            "spec.startupProbe.tcpSocket.port",
            "not one of the app's TCP container ports",
        ),
        (
            "livenessProbe: {httpGet: {port: 8080, host: example.com}}",
            "spec.livenessProbe.httpGet.host",
            "unknown field",
        ),
        (
            "livenessProbe: {httpGet: {port: 8080, path: healthz}}",
            "spec.livenessProbe.httpGet.path",
            "starting with /",
        ),
        ("livenessProbe: {tcpSocket: {}}", "spec.livenessProbe.tcpSocket.port", "required"),
        ("livenessProbe: {exec: {}}", "spec.livenessProbe.exec.command", "required"),
        ("livenessProbe: {exec: {command: []}}", "spec.livenessProbe.exec.command", "needs"),
        ("livenessProbe: {exec: {command: sh}}", "spec.livenessProbe.exec.command", "a list"),
        (
            "livenessProbe: {exec: {command: [x]}, periodSeconds: 0}",
            "spec.livenessProbe.periodSeconds",
            "expected an integer 1-3600, got 0",
        ),
        (
            "livenessProbe: {exec: {command: [x]}, timeoutSeconds: 1.5}",
            "spec.livenessProbe.timeoutSeconds",
            "expected an integer",
        ),
        (
            "livenessProbe: {exec: {command: [x]}, successThreshold: 2}",
            "spec.livenessProbe.successThreshold",
            "must be 1 for a liveness probe",
        ),
    ],
)
def test_probe_errors(spec: str, path: str, fragment: str) -> None:
    problems = problems_of(app_doc(PORTS + spec))
    assert any(p.path == path and fragment in p.message for p in problems), "\n".join(
        map(str, problems)
    )
    assert all(p.line is not None for p in problems)


@st.composite
def probe_for(draw: st.DrawFn, tcp_ports: tuple[int, ...]) -> Probe:
    kinds = ["exec", *(["http", "tcp"] if tcp_ports else [])]
    kind = draw(st.sampled_from(kinds))
    action: dict[str, object] = {}
    if kind == "exec":
        action["exec"] = ExecAction(tuple(draw(st.lists(any_text, min_size=1, max_size=3))))
    elif kind == "http":
        path = draw(st.from_regex(r"/[!-~]{0,12}", fullmatch=True))
        action["http_get"] = HttpGetAction(draw(st.sampled_from(tcp_ports)), path)
    else:
        action["tcp"] = TcpSocketAction(draw(st.sampled_from(tcp_ports)))
    return Probe(
        **action,  # type: ignore[arg-type]
        initial_delay_s=draw(st.integers(0, 100)),
        period_s=draw(st.integers(1, 60)),
        timeout_s=draw(st.integers(1, 60)),
        failure_threshold=draw(st.integers(1, 10)),
    )


@st.composite
def apps_with_probes(draw: st.DrawFn) -> App:
    app = draw(apps())
    tcp = tuple(p.container_port for p in app.spec.ports if p.protocol is Protocol.TCP)
    maybe = st.none() | probe_for(tcp)
    spec = attrs.evolve(app.spec, liveness=draw(maybe), readiness=draw(maybe), startup=draw(maybe))
    return App(app.meta, spec)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(apps_with_probes())
def test_round_trip_any_app_with_probes(app: App) -> None:
    text = yaml.safe_dump(to_manifest(app), sort_keys=False)
    assert parse_manifests(text) == [app.with_generation(0)]


# --------------------------------------------------------------------------- traffic fields

TRAFFIC = """\
image: busybox
ports:
  - {containerPort: 8080, publishedPort: 30080, proxyProtocol: true}
update:
  order: stop-first
  maxSurge: 25%
  maxUnavailable: 1
  minReadySeconds: 2
  progressDeadlineSeconds: 60
  failureAction: pause
ingress:
  - {host: "*.example.com", path: /api, port: 8080}
  - {port: 8080}
loadBalancing: least-connections
"""


def test_traffic_fields_parse_and_round_trip() -> None:
    from p2porch.node.spec import Balance, FailureAction, IngressRoute, UpdateOrder

    (app,) = parse_manifests(app_doc(TRAFFIC))
    assert isinstance(app, App)
    spec = app.spec
    assert spec.ports[0].proxy_protocol is True
    update = spec.update
    assert (update.order, update.max_surge, update.max_unavailable) == (
        UpdateOrder.STOP_FIRST,
        "25%",
        "1",
    )
    assert (update.min_ready_s, update.progress_deadline_s) == (2, 60)
    assert update.failure_action is FailureAction.PAUSE
    assert spec.ingress == (
        IngressRoute(port=8080, host="*.example.com", path="/api"),
        IngressRoute(port=8080),
    )
    assert spec.balance is Balance.LEAST_CONNECTIONS
    assert parse_manifests(dump_manifests([app])) == [app]
    # None of them is part of the template: changing them starts no rollout.
    assert spec.template() == attrs.evolve(
        spec,
        replicas=0,
        update=type(update)(),
        ingress=(),
        balance=Balance.ROUND_ROBIN,
    )


@pytest.mark.parametrize(
    ("old", "new", "path", "fragment"),
    [
        ("order: stop-first", "order: sideways", "spec.update.order", "start-first or stop-first"),
        ("maxSurge: 25%", "maxSurge: 150%", "spec.update.maxSurge", "at most 100%"),
        ("maxSurge: 25%", "maxSurge: lots", "spec.update.maxSurge", "a count like 1"),
        ("failureAction: pause", "failureAction: panic", "spec.update.failureAction", "pause or"),
        ("minReadySeconds: 2", "minReadySeconds: -1", "spec.update.minReadySeconds", "0-3600"),
        ("{port: 8080}", "{port: 9090}", "spec.ingress[1].port", "not one of the app's"),
        ("path: /api", "path: api", "spec.ingress[0].path", "path prefix"),
        ('"*.example.com"', "Bad_Host", "spec.ingress[0].host", "lowercase host name"),
        ("least-connections", "random", "spec.loadBalancing", "round-robin or"),
        ("proxyProtocol: true", "proxyProtocol: maybe", "spec.ports[0].proxyProtocol", ""),
        ("failureAction: pause", "colour: red", "spec.update.colour", "unknown field"),
    ],
)
def test_traffic_field_errors_name_the_field(old: str, new: str, path: str, fragment: str) -> None:
    text = app_doc(TRAFFIC.replace(old, new))
    assert text != app_doc(TRAFFIC)
    problem = only_problem(text)
    assert problem.path == path, str(problem)
    assert fragment in str(problem)


def test_surge_and_unavailable_cannot_both_be_zero() -> None:
    text = app_doc(
        TRAFFIC.replace("maxSurge: 25%", "maxSurge: 0").replace(
            "maxUnavailable: 1", "maxUnavailable: 0%"
        )
    )
    assert "cannot both be 0" in str(only_problem(text))
