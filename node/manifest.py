"""YAML manifests <-> desired-state records, with errors that point at the exact spot.

A manifest file holds one or more YAML documents, each ``apiVersion: p2porch/v1`` with
``kind: App`` or ``kind: Namespace`` (field reference: docs/manifests.md). Parsing works on
the composed YAML node tree rather than on plain dicts, because the nodes carry line and
column marks: every problem names the file, the document (1-based), the line, and the field
path in the manifest's own spelling (``spec.ports[1].containerPort``).

Every problem of a file is collected before anything is raised, so a user fixes a file in
one round; ``parse_manifests`` raises only :class:`~p2porch.node.errors.ManifestError`, for
any input at all (hypothesis checks that in tests/unit/node/test_manifest.py).

Value rules live once, in the records of :mod:`p2porch.node.spec`: this module checks shapes
and types, builds records, and translates a record's ``SpecError`` path (Python names) back
into manifest names.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.constructor import SafeConstructor

from .errors import ManifestError, ManifestProblem, SpecError
from .spec import (
    MAX_PROBE_INITIAL_DELAY_S,
    MAX_PROBE_PERIOD_S,
    MAX_PROBE_THRESHOLD,
    MAX_REPLICAS,
    MAX_STOP_GRACE_S,
    App,
    AppSpec,
    Balance,
    BindMount,
    EnvVar,
    ExecAction,
    FailureAction,
    HttpGetAction,
    IngressRoute,
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
    UpdateOrder,
    UpdateStrategy,
    VolumeMount,
)

API_VERSION = "p2porch/v1"
KINDS = ("App", "Namespace")

# Hostile input bounds: YAML aliases can make a small file describe a huge tree ("billion
# laughs"), and a self-referencing alias an infinite one.
MAX_NODES_PER_DOCUMENT = 20_000
MAX_DEPTH = 64
# PyYAML reads YAML 1.1 base-60 integers ("1:30:00") in time quadratic in their length (a
# 400 KB "1:0:0:..." costs seconds); no integer longer than Python's own 4300-digit limit for
# int("...") means anything in a manifest, so longer ones are refused before construction.
MAX_INT_CHARS = 4300
_INT_TAG = "tag:yaml.org,2002:int"

Manifest = App | Namespace
T = TypeVar("T")


class _Bad:
    """Marks a value whose problem is already recorded (so callers skip building records)."""


BAD = _Bad()


# --------------------------------------------------------------------------- quantities

_QUANTITY = re.compile(
    r"^\s*([+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def _quantity_number(value: object) -> tuple[Decimal, str] | None:
    """Split a quantity into (number, suffix); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value), ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return Decimal(repr(value)), ""
    if not isinstance(value, str):
        return None
    match = _QUANTITY.match(value)
    if match is None:
        return None
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:
        return None
    if not number.is_finite() or number.adjusted() > 24:
        return None
    return number, match.group(2)


def parse_cpu_millicores(value: object) -> int:
    """``"250m"`` -> 250, ``"0.5"``/``0.5`` -> 500, ``"2"``/``2`` -> 2000 (ValueError if not)."""
    parsed = _quantity_number(value)
    if parsed is None:
        raise ValueError(f"expected a cpu quantity like 250m, 0.5 or 2, got {_show_value(value)}")
    number, suffix = parsed
    if suffix == "m":
        millis = number
    elif suffix == "":
        millis = number * 1000
    else:
        raise ValueError(f"unknown cpu unit {suffix!r} in {_show_value(value)}: use m or none")
    if millis != millis.to_integral_value():
        raise ValueError(f"{_show_value(value)} is finer than 1m (a thousandth of a core)")
    return int(millis)


def parse_memory_bytes(value: object) -> int:
    """``"64Mi"``, ``"1G"``, ``"128974848"``, ``"1.5Gi"`` -> bytes (ValueError if not)."""
    parsed = _quantity_number(value)
    if parsed is None:
        raise ValueError(
            f"expected a memory quantity like 64Mi, 1G or 128974848, got {_show_value(value)}"
        )
    number, suffix = parsed
    if suffix in _BINARY:
        total = number * _BINARY[suffix]
    elif suffix in _DECIMAL:
        total = number * _DECIMAL[suffix]
    elif suffix == "":
        total = number
    else:
        raise ValueError(
            f"unknown memory unit {suffix!r} in {_show_value(value)}: "
            "use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E or none"
        )
    if total != total.to_integral_value():
        raise ValueError(f"{_show_value(value)} is not a whole number of bytes")
    return int(total)


def format_cpu(millicores: int) -> str:
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def format_memory(num_bytes: int) -> str | int:
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if num_bytes and num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return num_bytes


# --------------------------------------------------------------------------- display


def _show_value(value: object) -> str:
    if isinstance(value, str):
        shown = f'"{value}"'
    elif value is None:
        shown = "null"
    elif isinstance(value, bool):
        shown = "true" if value else "false"
    else:
        shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _show_node(node: yaml.Node, value: object = None) -> str:
    """How a bad value is shown: strings quoted, other scalars as the user wrote them."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(value, str) or value is None:
        return _show_value(value)
    raw = str(node.value)
    return raw if len(raw) <= 60 else raw[:57] + "..."


def _suggest(key: str, known: Sequence[str]) -> str:
    lowered = {k.lower(): k for k in known}
    if key.lower() in lowered:
        return f' (did you mean "{lowered[key.lower()]}"?)'
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- documents


class _Document:
    """Problem collection and typed accessors for one YAML document."""

    def __init__(self, filename: str, index: int, problems: list[ManifestProblem]) -> None:
        self.filename = filename
        self.index = index
        self.problems = problems
        self.failed = False
        self.nodes: dict[str, yaml.Node] = {}
        self._constructor = SafeConstructor()

    def problem(self, node: yaml.Node | None, path: str, message: str) -> _Bad:
        self.failed = True
        line = column = None
        if node is not None and node.start_mark is not None:
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
        self.problems.append(
            ManifestProblem(self.filename, self.index, line, column, path, message)
        )
        return BAD

    def spec_problem(self, exc: SpecError, prefix: str, fallback: yaml.Node) -> _Bad:
        """Report a record's SpecError at the manifest path (and line) it corresponds to."""
        path = prefix
        for part in exc.path:
            path = _join(path, part if isinstance(part, int) else _MANIFEST_NAMES.get(part, part))
        # The closest enclosing field we saw a node for gives the line.
        probe = path
        node = self.nodes.get(probe)
        while node is None and len(probe) > len(prefix):
            shorter = _PARENT.sub("", probe)
            if shorter == probe:
                break
            probe = shorter
            node = self.nodes.get(probe)
        return self.problem(node or fallback, path, exc.message)

    # -- scalars

    def scalar(self, node: yaml.Node, path: str) -> object:
        if not isinstance(node, yaml.ScalarNode):
            return self.problem(node, path, f"expected a single value, got {_show_node(node)}")
        if node.tag == _INT_TAG and len(node.value) > MAX_INT_CHARS:
            return self.problem(
                node, path, f"integer of {len(node.value)} characters is too long to read"
            )
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            return self.problem(node, path, f"cannot read value {node.value!r}: {exc}")
        except (LookupError, AttributeError):
            # PyYAML's scalar constructors trust the resolver's pattern match; an explicit
            # tag skips it, and then they fail in their own ways: ``!!int ""`` (IndexError),
            # ``!!bool x`` (KeyError), ``!!timestamp x`` (AttributeError).
            kind = str(node.tag).rsplit(":", 1)[-1]
            return self.problem(node, path, f"cannot read value {node.value!r} as {kind}")

    def string(self, node: yaml.Node, path: str, *, what: str = "a string") -> str | _Bad:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if not isinstance(value, str):
            return self.problem(node, path, f"expected {what}, got {_show_node(node, value)}")
        return value

    def text(self, node: yaml.Node, path: str) -> str | _Bad:
        """A string field that takes any scalar as written (env values, args): ``3`` is "3"."""
        if not isinstance(node, yaml.ScalarNode):
            return self.problem(node, path, f"expected a string, got {_show_node(node)}")
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if value is None:
            return ""
        return value if isinstance(value, str) else str(node.value)

    def integer(self, node: yaml.Node, path: str, lo: int, hi: int | None) -> int | _Bad:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            bound = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            return self.problem(
                node, path, f"expected an integer {bound}, got {_show_node(node, value)}"
            )
        return value

    def boolean(self, node: yaml.Node, path: str) -> bool | _Bad:
        value = self.scalar(node, path)
        if value is BAD:
            return BAD
        if not isinstance(value, bool):
            return self.problem(
                node, path, f"expected true or false, got {_show_node(node, value)}"
            )
        return value

    # -- collections

    def mapping(
        self,
        node: yaml.Node,
        path: str,
        known: Sequence[str] | None,
        required: Sequence[str] = (),
    ) -> dict[str, yaml.Node] | _Bad:
        """Fields of a mapping node (unknown fields reported when ``known`` is given)."""
        if not isinstance(node, yaml.MappingNode):
            value = self.scalar(node, path) if isinstance(node, yaml.ScalarNode) else None
            if value is BAD:
                return BAD
            return self.problem(node, path, f"expected a mapping, got {_show_node(node, value)}")
        try:
            self._constructor.flatten_mapping(node)
        except yaml.YAMLError as exc:
            return self.problem(node, path, f"bad merge key: {exc}")
        fields: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else BAD
            if not isinstance(key, str):
                self.problem(
                    key_node, path, f"field names are strings, got {_show_node(key_node, key)}"
                )
                continue
            field_path = _join(path, key)
            if key in fields:
                self.problem(key_node, field_path, "field given twice")
                continue
            if known is not None and key not in known:
                self.problem(key_node, field_path, "unknown field" + _suggest(key, known))
                continue
            fields[key] = value_node
            self.nodes[field_path] = value_node
        for key in required:
            if key not in fields:
                self.problem(node, _join(path, key), "required field is missing")
        return fields

    def sequence(self, node: yaml.Node, path: str) -> list[yaml.Node] | _Bad:
        if not isinstance(node, yaml.SequenceNode):
            value = self.scalar(node, path) if isinstance(node, yaml.ScalarNode) else None
            if value is BAD:
                return BAD
            return self.problem(node, path, f"expected a list, got {_show_node(node, value)}")
        for i, item in enumerate(node.value):
            self.nodes[_join(path, i)] = item
        return list(node.value)

    def items(
        self, node: yaml.Node, path: str, parse: Callable[[yaml.Node, str], T | _Bad]
    ) -> tuple[T, ...] | _Bad:
        """Parse every item of a list, reporting all failures; BAD if any failed."""
        nodes = self.sequence(node, path)
        if isinstance(nodes, _Bad):
            return BAD
        out: list[T] = []
        ok = True
        for i, item in enumerate(nodes):
            value = parse(item, _join(path, i))
            if isinstance(value, _Bad):
                ok = False
            else:
                out.append(value)
        return tuple(out) if ok else BAD

    def build(self, make: Callable[[], T], prefix: str, node: yaml.Node) -> T | _Bad:
        """Construct a record, reporting its SpecError at the right manifest path."""
        try:
            return make()
        except SpecError as exc:
            return self.spec_problem(exc, prefix, node)


_PARENT = re.compile(r"(\.[^.\[]+|\[\d+\])$")

# Python field names of spec records -> manifest names, where not just camelCase.
_MANIFEST_NAMES: dict[str, str] = {
    # Anything not listed keeps its name (image, replicas, env, ports, volumes, name, ...).
    "container_port": "containerPort",
    "published_port": "publishedPort",
    "container_path": "mountPath",
    "host_path": "hostPath",
    "read_only": "readOnly",
    "restart_policy": "restartPolicy",
    "max_restarts": "maxRestarts",
    "stop_grace_s": "stopGracePeriodSeconds",
    "kind": "policy",
    "cpu_request_millicores": "requests.cpu",
    "cpu_limit_millicores": "limits.cpu",
    "memory_request_bytes": "requests.memory",
    "memory_limit_bytes": "limits.memory",
    "liveness": "livenessProbe",
    "readiness": "readinessProbe",
    "startup": "startupProbe",
    "http_get": "httpGet",
    "tcp": "tcpSocket",
    "initial_delay_s": "initialDelaySeconds",
    "period_s": "periodSeconds",
    "timeout_s": "timeoutSeconds",
    "failure_threshold": "failureThreshold",
    "success_threshold": "successThreshold",
    "proxy_protocol": "proxyProtocol",
    "max_surge": "maxSurge",
    "max_unavailable": "maxUnavailable",
    "min_ready_s": "minReadySeconds",
    "progress_deadline_s": "progressDeadlineSeconds",
    "failure_action": "failureAction",
    "balance": "loadBalancing",
}


# --------------------------------------------------------------------------- kinds

_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec")
_APP_META_FIELDS = ("name", "namespace", "labels", "generation")
_NS_META_FIELDS = ("name", "labels", "generation")
_SPEC_FIELDS = (
    "image",
    "command",
    "args",
    "env",
    "ports",
    "replicas",
    "resources",
    "restartPolicy",
    "placement",
    "volumes",
    "stopGracePeriodSeconds",
    "secrets",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "update",
    "ingress",
    "loadBalancing",
)
_UPDATE_FIELDS = (
    "order",
    "maxSurge",
    "maxUnavailable",
    "minReadySeconds",
    "progressDeadlineSeconds",
    "failureAction",
)
# Manifest probe key -> AppSpec field.
_PROBE_KEYS = (
    ("livenessProbe", "liveness"),
    ("readinessProbe", "readiness"),
    ("startupProbe", "startup"),
)
_PROBE_ACTIONS = ("httpGet", "tcpSocket", "exec")
# Manifest name, Probe field, lowest, highest.
_PROBE_NUMBERS = (
    ("initialDelaySeconds", "initial_delay_s", 0, MAX_PROBE_INITIAL_DELAY_S),
    ("periodSeconds", "period_s", 1, MAX_PROBE_PERIOD_S),
    ("timeoutSeconds", "timeout_s", 1, MAX_PROBE_PERIOD_S),
    ("failureThreshold", "failure_threshold", 1, MAX_PROBE_THRESHOLD),
    ("successThreshold", "success_threshold", 1, MAX_PROBE_THRESHOLD),
)
_RESTART_VALUES = {
    "always": RestartPolicyKind.ALWAYS,
    "on-failure": RestartPolicyKind.ON_FAILURE,
    "never": RestartPolicyKind.NEVER,
    # The Kubernetes spellings, since people will type them.
    "Always": RestartPolicyKind.ALWAYS,
    "OnFailure": RestartPolicyKind.ON_FAILURE,
    "Never": RestartPolicyKind.NEVER,
}


def _parse_document(doc: _Document, root: yaml.Node) -> Manifest | None:
    fields = doc.mapping(root, "", _TOP_FIELDS, required=("apiVersion", "kind", "metadata"))
    if isinstance(fields, _Bad):
        return None
    if "apiVersion" in fields:
        version = doc.string(fields["apiVersion"], "apiVersion")
        if isinstance(version, str) and version != API_VERSION:
            doc.problem(
                fields["apiVersion"],
                "apiVersion",
                f'unsupported apiVersion "{version}": this version reads {API_VERSION}',
            )
    kind: str | _Bad = BAD
    if "kind" in fields:
        kind = doc.string(fields["kind"], "kind")
        if isinstance(kind, str) and kind not in KINDS:
            doc.problem(
                fields["kind"],
                "kind",
                f'unknown kind "{kind}": expected App or Namespace' + _suggest(kind, KINDS),
            )
            kind = BAD
    if kind == "Namespace":
        if "spec" in fields:
            doc.problem(fields["spec"], "spec", "a Namespace has no spec")
        return _parse_namespace(doc, fields.get("metadata"))
    if kind == "App":
        if "spec" not in fields:
            doc.problem(root, "spec", "required field is missing")
        return _parse_app(doc, fields.get("metadata"), fields.get("spec"))
    return None


def _parse_labels(doc: _Document, node: yaml.Node, path: str) -> dict[str, str] | _Bad:
    fields = doc.mapping(node, path, None)
    if isinstance(fields, _Bad):
        return BAD
    out: dict[str, str] = {}
    for key, value_node in fields.items():
        value = doc.text(value_node, _join(path, key))
        if isinstance(value, str):
            out[key] = value
    return out if len(out) == len(fields) else BAD


def _parse_namespace(doc: _Document, meta: yaml.Node | None) -> Namespace | None:
    if meta is None:
        return None
    fields = doc.mapping(meta, "metadata", (*_NS_META_FIELDS, "namespace"), required=("name",))
    if isinstance(fields, _Bad):
        return None
    if "namespace" in fields:
        doc.problem(fields["namespace"], "metadata.namespace", "a Namespace is not namespaced")
    name = doc.string(fields["name"], "metadata.name") if "name" in fields else BAD
    labels = _parse_labels(doc, fields["labels"], "metadata.labels") if "labels" in fields else {}
    if "generation" in fields:
        doc.integer(fields["generation"], "metadata.generation", 0, None)
    if doc.failed or isinstance(name, _Bad) or isinstance(labels, _Bad):
        return None
    result = doc.build(lambda: Namespace(name=name, labels=labels), "metadata", meta)
    return None if isinstance(result, _Bad) else result


def _parse_meta(doc: _Document, meta: yaml.Node) -> ObjectMeta | _Bad:
    fields = doc.mapping(meta, "metadata", _APP_META_FIELDS, required=("name",))
    if isinstance(fields, _Bad):
        return BAD
    name = doc.string(fields["name"], "metadata.name") if "name" in fields else BAD
    namespace: str | _Bad = "default"
    if "namespace" in fields:
        namespace = doc.string(fields["namespace"], "metadata.namespace")
    labels = _parse_labels(doc, fields["labels"], "metadata.labels") if "labels" in fields else {}
    # generation is owned by the cluster: accepted (so `get -o yaml` output re-applies)
    # but ignored.
    if "generation" in fields:
        doc.integer(fields["generation"], "metadata.generation", 0, None)
    if isinstance(name, _Bad) or isinstance(namespace, _Bad) or isinstance(labels, _Bad):
        return BAD
    return doc.build(
        lambda: ObjectMeta(name=name, namespace=namespace, labels=labels), "metadata", meta
    )


def _parse_app(
    doc: _Document, meta_node: yaml.Node | None, spec_node: yaml.Node | None
) -> App | None:
    meta = _parse_meta(doc, meta_node) if meta_node is not None else BAD
    spec = _parse_spec(doc, spec_node) if spec_node is not None else BAD
    if doc.failed or isinstance(meta, _Bad) or isinstance(spec, _Bad):
        return None
    return App(meta=meta, spec=spec)


def _parse_spec(doc: _Document, node: yaml.Node) -> AppSpec | _Bad:
    fields = doc.mapping(node, "spec", _SPEC_FIELDS, required=("image",))
    if isinstance(fields, _Bad):
        return BAD
    kwargs: dict[str, Any] = {}
    ok = True

    def take(name: str, value: object) -> None:
        nonlocal ok
        if isinstance(value, _Bad):
            ok = False
        else:
            kwargs[name] = value

    if "image" in fields:
        take("image", doc.string(fields["image"], "spec.image"))
    for key in ("command", "args"):
        if key in fields:
            take(key, doc.items(fields[key], f"spec.{key}", doc.text))
    if "env" in fields:
        take("env", doc.items(fields["env"], "spec.env", lambda n, p: _parse_env(doc, n, p)))
    if "ports" in fields:
        take("ports", doc.items(fields["ports"], "spec.ports", lambda n, p: _parse_port(doc, n, p)))
    if "replicas" in fields:
        take("replicas", doc.integer(fields["replicas"], "spec.replicas", 0, MAX_REPLICAS))
    if "resources" in fields:
        take("resources", _parse_resources(doc, fields["resources"]))
    if "restartPolicy" in fields:
        take("restart_policy", _parse_restart(doc, fields["restartPolicy"]))
    if "placement" in fields:
        take("placement", _parse_placement(doc, fields["placement"]))
    if "volumes" in fields:
        take(
            "volumes",
            doc.items(fields["volumes"], "spec.volumes", lambda n, p: _parse_volume(doc, n, p)),
        )
    if "stopGracePeriodSeconds" in fields:
        take(
            "stop_grace_s",
            doc.integer(
                fields["stopGracePeriodSeconds"], "spec.stopGracePeriodSeconds", 0, MAX_STOP_GRACE_S
            ),
        )
    if "secrets" in fields:
        take("secrets", doc.items(fields["secrets"], "spec.secrets", doc.string))
    for key, name in _PROBE_KEYS:
        if key in fields:
            take(name, _parse_probe(doc, fields[key], f"spec.{key}"))
    if "update" in fields:
        take("update", _parse_update(doc, fields["update"]))
    if "ingress" in fields:
        take(
            "ingress",
            doc.items(fields["ingress"], "spec.ingress", lambda n, p: _parse_ingress(doc, n, p)),
        )
    if "loadBalancing" in fields:
        take(
            "balance",
            _parse_enum(doc, fields["loadBalancing"], "spec.loadBalancing", Balance),
        )
    if not ok or "image" not in kwargs:
        return BAD
    return doc.build(lambda: AppSpec(**kwargs), "spec", node)


def _parse_env(doc: _Document, node: yaml.Node, path: str) -> EnvVar | _Bad:
    fields = doc.mapping(node, path, ("name", "value"), required=("name",))
    if isinstance(fields, _Bad):
        return BAD
    name = doc.string(fields["name"], _join(path, "name")) if "name" in fields else BAD
    value = doc.text(fields["value"], _join(path, "value")) if "value" in fields else ""
    if isinstance(name, _Bad) or isinstance(value, _Bad):
        return BAD
    return doc.build(lambda: EnvVar(name=name, value=value), path, node)


_E = TypeVar("_E", bound=enum.Enum)


def _parse_enum(doc: _Document, node: yaml.Node, path: str, kind: type[_E]) -> _E | _Bad:
    text = doc.string(node, path)
    if isinstance(text, _Bad):
        return BAD
    for member in kind:
        if member.value == text:
            return member
    allowed = " or ".join(str(m.value) for m in kind)
    return doc.problem(node, path, f"expected {allowed}, got {_show_value(text)}")


def _parse_update(doc: _Document, node: yaml.Node) -> UpdateStrategy | _Bad:
    path = "spec.update"
    fields = doc.mapping(node, path, _UPDATE_FIELDS)
    if isinstance(fields, _Bad):
        return BAD
    kwargs: dict[str, Any] = {}
    ok = True
    if "order" in fields:
        order = _parse_enum(doc, fields["order"], _join(path, "order"), UpdateOrder)
        ok &= not isinstance(order, _Bad)
        kwargs["order"] = order
    if "failureAction" in fields:
        action = _parse_enum(
            doc, fields["failureAction"], _join(path, "failureAction"), FailureAction
        )
        ok &= not isinstance(action, _Bad)
        kwargs["failure_action"] = action
    for key, name in (("maxSurge", "max_surge"), ("maxUnavailable", "max_unavailable")):
        if key in fields:
            value = doc.text(fields[key], _join(path, key))
            ok &= not isinstance(value, _Bad)
            kwargs[name] = value
    for key, name, hi in (
        ("minReadySeconds", "min_ready_s", 3600),
        ("progressDeadlineSeconds", "progress_deadline_s", 86400),
    ):
        if key in fields:
            number = doc.integer(
                fields[key], _join(path, key), 0 if name == "min_ready_s" else 1, hi
            )
            ok &= not isinstance(number, _Bad)
            kwargs[name] = number
    if not ok:
        return BAD
    return doc.build(lambda: UpdateStrategy(**kwargs), path, node)


def _parse_ingress(doc: _Document, node: yaml.Node, path: str) -> IngressRoute | _Bad:
    fields = doc.mapping(node, path, ("host", "path", "port"), required=("port",))
    if isinstance(fields, _Bad) or "port" not in fields:
        return BAD
    port = doc.integer(fields["port"], _join(path, "port"), 1, 65535)
    host: str | _Bad = ""
    if "host" in fields:
        host = doc.string(fields["host"], _join(path, "host"))
    prefix: str | _Bad = "/"
    if "path" in fields:
        prefix = doc.string(fields["path"], _join(path, "path"))
    if isinstance(port, _Bad) or isinstance(host, _Bad) or isinstance(prefix, _Bad):
        return BAD
    return doc.build(lambda: IngressRoute(port=port, host=host, path=prefix), path, node)


def _parse_port(doc: _Document, node: yaml.Node, path: str) -> PortSpec | _Bad:
    fields = doc.mapping(
        node,
        path,
        ("containerPort", "publishedPort", "protocol", "proxyProtocol"),
        required=("containerPort",),
    )
    if isinstance(fields, _Bad):
        return BAD
    port: int | _Bad = BAD
    if "containerPort" in fields:
        port = doc.integer(fields["containerPort"], _join(path, "containerPort"), 1, 65535)
    published: int | _Bad | None = None
    if "publishedPort" in fields:
        published = doc.integer(fields["publishedPort"], _join(path, "publishedPort"), 1, 65535)
    protocol: Protocol | _Bad = Protocol.TCP
    if "protocol" in fields:
        text = doc.string(fields["protocol"], _join(path, "protocol"))
        if isinstance(text, str):
            try:
                protocol = Protocol(text.lower())
            except ValueError:
                protocol = doc.problem(
                    fields["protocol"],
                    _join(path, "protocol"),
                    f"expected tcp or udp, got {_show_value(text)}",
                )
        else:
            protocol = BAD
    proxy: bool | _Bad = False
    if "proxyProtocol" in fields:
        proxy = doc.boolean(fields["proxyProtocol"], _join(path, "proxyProtocol"))
    if (
        isinstance(port, _Bad)
        or isinstance(published, _Bad)
        or isinstance(protocol, _Bad)
        or isinstance(proxy, _Bad)
    ):
        return BAD
    return doc.build(
        lambda: PortSpec(
            container_port=port, published_port=published, protocol=protocol, proxy_protocol=proxy
        ),
        path,
        node,
    )


def _parse_resources(doc: _Document, node: yaml.Node) -> Resources | _Bad:
    fields = doc.mapping(node, "spec.resources", ("requests", "limits"))
    if isinstance(fields, _Bad):
        return BAD
    values: dict[str, dict[str, int]] = {"requests": {}, "limits": {}}
    ok = True
    for group in ("requests", "limits"):
        if group not in fields:
            continue
        gpath = f"spec.resources.{group}"
        gfields = doc.mapping(fields[group], gpath, ("cpu", "memory"))
        if isinstance(gfields, _Bad):
            ok = False
            continue
        for key, parse in (("cpu", parse_cpu_millicores), ("memory", parse_memory_bytes)):
            if key not in gfields:
                continue
            vpath = _join(gpath, key)
            raw = doc.scalar(gfields[key], vpath)
            if isinstance(raw, _Bad):
                ok = False
                continue
            try:
                values[group][key] = parse(raw)
            except ValueError as exc:
                doc.problem(gfields[key], vpath, str(exc))
                ok = False
    if not ok:
        return BAD
    requests, limits = values["requests"], values["limits"]
    # As in Kubernetes: a limit without a request reserves the limit.
    cpu_limit = limits.get("cpu")
    memory_limit = limits.get("memory")
    cpu_request = requests.get("cpu", cpu_limit or 0)
    memory_request = requests.get("memory", memory_limit or 0)
    return doc.build(
        lambda: Resources(
            cpu_request_millicores=cpu_request,
            cpu_limit_millicores=cpu_limit,
            memory_request_bytes=memory_request,
            memory_limit_bytes=memory_limit,
        ),
        "spec.resources",
        node,
    )


def _restart_kind(doc: _Document, node: yaml.Node, path: str) -> RestartPolicyKind | _Bad:
    text = doc.string(node, path)
    if isinstance(text, _Bad):
        return BAD
    if text in _RESTART_VALUES:
        return _RESTART_VALUES[text]
    return doc.problem(
        node,
        path,
        f"expected always, on-failure or never, got {_show_value(text)}"
        + _suggest(text, ("always", "on-failure", "never")),
    )


def _parse_restart(doc: _Document, node: yaml.Node) -> RestartPolicy | _Bad:
    path = "spec.restartPolicy"
    if isinstance(node, yaml.ScalarNode):
        kind = _restart_kind(doc, node, path)
        return BAD if isinstance(kind, _Bad) else RestartPolicy(kind=kind)
    fields = doc.mapping(node, path, ("policy", "maxRestarts"), required=("policy",))
    if isinstance(fields, _Bad):
        return BAD
    kind = _restart_kind(doc, fields["policy"], f"{path}.policy") if "policy" in fields else BAD
    max_restarts: int | _Bad | None = None
    if "maxRestarts" in fields:
        max_restarts = doc.integer(fields["maxRestarts"], f"{path}.maxRestarts", 0, 1_000_000)
    if isinstance(kind, _Bad) or isinstance(max_restarts, _Bad):
        return BAD
    return doc.build(lambda: RestartPolicy(kind=kind, max_restarts=max_restarts), path, node)


def _parse_placement(doc: _Document, node: yaml.Node) -> tuple[PlacementConstraint, ...] | _Bad:
    fields = doc.mapping(node, "spec.placement", ("constraints",))
    if isinstance(fields, _Bad):
        return BAD
    if "constraints" not in fields:
        return ()

    def one(item: yaml.Node, path: str) -> PlacementConstraint | _Bad:
        text = doc.string(item, path, what='a constraint string like "zone==a"')
        if isinstance(text, _Bad):
            return BAD
        try:
            return PlacementConstraint.parse(text)
        except SpecError as exc:
            return doc.problem(item, path, exc.message)

    return doc.items(fields["constraints"], "spec.placement.constraints", one)


def _parse_volume(doc: _Document, node: yaml.Node, path: str) -> BindMount | VolumeMount | _Bad:
    fields = doc.mapping(node, path, ("volume", "hostPath", "mountPath", "readOnly"))
    if isinstance(fields, _Bad):
        return BAD
    if ("volume" in fields) == ("hostPath" in fields):
        return doc.problem(
            node,
            path,
            "give exactly one of volume (a named node-local volume) "
            "or hostPath (a directory of the node)",
        )
    if "mountPath" not in fields:
        return doc.problem(node, _join(path, "mountPath"), "required field is missing")
    mount_path = doc.string(fields["mountPath"], _join(path, "mountPath"))
    read_only: bool | _Bad = False
    if "readOnly" in fields:
        read_only = doc.boolean(fields["readOnly"], _join(path, "readOnly"))
    source_key = "volume" if "volume" in fields else "hostPath"
    source = doc.string(fields[source_key], _join(path, source_key))
    if isinstance(mount_path, _Bad) or isinstance(read_only, _Bad) or isinstance(source, _Bad):
        return BAD
    if source_key == "volume":
        names = {"name": "volume"}
        try:
            return VolumeMount(name=source, container_path=mount_path, read_only=read_only)
        except SpecError as exc:
            part = exc.path[0] if exc.path else ""
            key = names.get(str(part), _MANIFEST_NAMES.get(str(part), str(part)))
            return doc.problem(fields.get(key, node), _join(path, key), exc.message)
    return doc.build(
        lambda: BindMount(host_path=source, container_path=mount_path, read_only=read_only),
        path,
        node,
    )


def _parse_probe(doc: _Document, node: yaml.Node, path: str) -> Probe | _Bad:
    fields = doc.mapping(node, path, (*_PROBE_ACTIONS, *(n[0] for n in _PROBE_NUMBERS)))
    if isinstance(fields, _Bad):
        return BAD
    ok = True
    given = [key for key in _PROBE_ACTIONS if key in fields]
    if len(given) != 1:
        doc.problem(
            node,
            path,
            "give exactly one of httpGet, tcpSocket or exec"
            + (f" (got {' and '.join(given)})" if given else ""),
        )
        ok = False
    kwargs: dict[str, Any] = {}
    for key, name, lo, hi in _PROBE_NUMBERS:
        if key in fields:
            value = doc.integer(fields[key], _join(path, key), lo, hi)
            if isinstance(value, _Bad):
                ok = False
            else:
                kwargs[name] = value
    for key in given:
        action = _parse_probe_action(doc, key, fields[key], _join(path, key))
        if isinstance(action, _Bad):
            ok = False
        elif isinstance(action, HttpGetAction):
            kwargs["http_get"] = action
        elif isinstance(action, TcpSocketAction):
            kwargs["tcp"] = action
        else:
            kwargs["exec"] = action
    if not ok:
        return BAD
    return doc.build(lambda: Probe(**kwargs), path, node)


def _parse_probe_action(
    doc: _Document, key: str, node: yaml.Node, path: str
) -> HttpGetAction | TcpSocketAction | ExecAction | _Bad:
    if key == "exec":
        fields = doc.mapping(node, path, ("command",), required=("command",))
        if isinstance(fields, _Bad) or "command" not in fields:
            return BAD
        command = doc.items(fields["command"], _join(path, "command"), doc.text)
        if isinstance(command, _Bad):
            return BAD
        return doc.build(lambda: ExecAction(command=command), path, node)
    known = ("path", "port") if key == "httpGet" else ("port",)
    fields = doc.mapping(node, path, known, required=("port",))
    if isinstance(fields, _Bad) or "port" not in fields:
        return BAD
    port = doc.integer(fields["port"], _join(path, "port"), 1, 65535)
    if key == "tcpSocket":
        if isinstance(port, _Bad):
            return BAD
        return doc.build(lambda: TcpSocketAction(port=port), path, node)
    http_path: str | _Bad = "/"
    if "path" in fields:
        http_path = doc.string(fields["path"], _join(path, "path"))
    if isinstance(port, _Bad) or isinstance(http_path, _Bad):
        return BAD
    return doc.build(lambda: HttpGetAction(port=port, path=http_path), path, node)


# --------------------------------------------------------------------------- entry points


class _TooManyNodes(yaml.MarkedYAMLError):
    """Raised while composing: the document already holds MAX_NODES_PER_DOCUMENT nodes."""


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that stops composing a document once it has made too many nodes.

    ``_check_size`` (after composing) catches alias bombs, but a document that is simply
    huge -- a flow list of a million ``1`` -- would by then have cost ~650 bytes of tokens,
    marks and nodes per item (2 MB of text -> 680 MB of memory). Counting here stops it at
    the same bound before it is built. Aliases are counted once per use, not expanded.
    """

    _composed = 0

    def compose_document(self) -> yaml.Node | None:
        self._composed = 0
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._composed += 1
        if self._composed > MAX_NODES_PER_DOCUMENT:
            raise _TooManyNodes(
                problem=f"document has more than {MAX_NODES_PER_DOCUMENT} values",
                problem_mark=self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        return super().compose_node(parent, index)


def _documents(
    text: str | bytes, filename: str, problems: list[ManifestProblem]
) -> Iterator[tuple[int, yaml.Node]]:
    """Yield (1-based index, root node) of each non-empty document; syntax errors -> problems."""
    index = 0
    try:
        for root in yaml.compose_all(text, Loader=_BoundedLoader):
            index += 1
            # A document holding nothing (comments, a stray ---) composes to a null scalar.
            if isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null":
                continue
            yield index, root
    except _TooManyNodes as exc:
        mark = exc.problem_mark
        problems.append(
            ManifestProblem(
                filename,
                index + 1,
                mark.line + 1 if mark else None,
                mark.column + 1 if mark else None,
                "",
                exc.problem or "document too large",
            )
        )
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        problems.append(
            ManifestProblem(
                filename,
                index + 1,
                mark.line + 1 if mark else None,
                mark.column + 1 if mark else None,
                "",
                f"YAML syntax error: {message}",
            )
        )
    except yaml.YAMLError as exc:
        problems.append(ManifestProblem(filename, index + 1, None, None, "", f"YAML error: {exc}"))
    except RecursionError:
        problems.append(
            ManifestProblem(filename, index + 1, None, None, "", "YAML nested too deeply")
        )


def _check_size(doc: _Document, root: yaml.Node) -> bool:
    """Refuse documents whose node tree is too deep or (through aliases) too large."""
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            doc.problem(node, "", f"document nested deeper than {MAX_DEPTH} levels")
            return False
        if count > MAX_NODES_PER_DOCUMENT:
            doc.problem(root, "", f"document has more than {MAX_NODES_PER_DOCUMENT} values")
            return False
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
    return True


def parse_manifests(text: str | bytes, filename: str = "<manifest>") -> list[Manifest]:
    """Every App and Namespace of a (multi-document) manifest, in order.

    Raises :class:`ManifestError` listing every problem of the file (and nothing else).
    """
    problems: list[ManifestProblem] = []
    results: list[Manifest] = []
    seen: dict[tuple[str, str, str], int] = {}
    for index, root in _documents(text, filename, problems):
        doc = _Document(filename, index, problems)
        if not _check_size(doc, root):
            continue
        obj = _parse_document(doc, root)
        if obj is None or doc.failed:
            continue
        key = (
            ("Namespace", "", obj.name)
            if isinstance(obj, Namespace)
            else ("App", obj.meta.namespace, obj.meta.name)
        )
        if key in seen:
            doc.problem(
                root,
                "metadata.name",
                f'{key[0]} "{key[2]}" is already defined in document {seen[key]}',
            )
            continue
        seen[key] = index
        results.append(obj)
    if problems:
        # Syntax errors end the stream, so they can come before later-found document errors.
        problems.sort(key=lambda p: (p.document or 0, p.line or 0, p.column or 0))
        raise ManifestError(problems)
    return results


def load_manifest_file(path: str | Path) -> list[Manifest]:
    """Read and parse a manifest file; unreadable files are a ManifestError too."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(
            [ManifestProblem(name, None, None, None, "", f"cannot read the file: {exc}")]
        ) from exc
    return parse_manifests(text, name)


def to_manifest(obj: Manifest) -> dict[str, Any]:
    """The manifest document for a record (``get -o yaml``); parsing it gives ``obj`` back.

    ``metadata.generation`` is included for information and ignored when re-applied.
    """
    if isinstance(obj, Namespace):
        meta: dict[str, Any] = {"name": obj.name}
        if obj.labels:
            meta["labels"] = dict(obj.labels)
        meta["generation"] = obj.generation
        return {"apiVersion": API_VERSION, "kind": "Namespace", "metadata": meta}
    app_meta: dict[str, Any] = {"name": obj.meta.name, "namespace": obj.meta.namespace}
    if obj.meta.labels:
        app_meta["labels"] = dict(obj.meta.labels)
    app_meta["generation"] = obj.meta.generation
    spec = obj.spec
    out: dict[str, Any] = {"image": spec.image}
    if spec.command:
        out["command"] = list(spec.command)
    if spec.args:
        out["args"] = list(spec.args)
    if spec.env:
        out["env"] = [{"name": var.name, "value": var.value} for var in spec.env]
    if spec.ports:
        ports = []
        for port in spec.ports:
            item: dict[str, Any] = {"containerPort": port.container_port}
            if port.published_port is not None:
                item["publishedPort"] = port.published_port
            item["protocol"] = port.protocol.value
            if port.proxy_protocol:
                item["proxyProtocol"] = True
            ports.append(item)
        out["ports"] = ports
    out["replicas"] = spec.replicas
    res = spec.resources
    requests: dict[str, Any] = {
        "cpu": format_cpu(res.cpu_request_millicores),
        "memory": format_memory(res.memory_request_bytes),
    }
    limits: dict[str, Any] = {}
    if res.cpu_limit_millicores is not None:
        limits["cpu"] = format_cpu(res.cpu_limit_millicores)
    if res.memory_limit_bytes is not None:
        limits["memory"] = format_memory(res.memory_limit_bytes)
    out["resources"] = {"requests": requests, **({"limits": limits} if limits else {})}
    policy = spec.restart_policy
    if policy.max_restarts is None:
        out["restartPolicy"] = policy.kind.value
    else:
        out["restartPolicy"] = {"policy": policy.kind.value, "maxRestarts": policy.max_restarts}
    if spec.placement:
        out["placement"] = {"constraints": [str(c) for c in spec.placement]}
    if spec.volumes:
        volumes = []
        for mount in spec.volumes:
            if isinstance(mount, VolumeMount):
                volumes.append(
                    {
                        "volume": mount.name,
                        "mountPath": mount.container_path,
                        "readOnly": mount.read_only,
                    }
                )
            else:
                volumes.append(
                    {
                        "hostPath": mount.host_path,
                        "mountPath": mount.container_path,
                        "readOnly": mount.read_only,
                    }
                )
        out["volumes"] = volumes
    out["stopGracePeriodSeconds"] = spec.stop_grace_s
    if spec.secrets:
        out["secrets"] = list(spec.secrets)
    for key, name in _PROBE_KEYS:
        probe = getattr(spec, name)
        if probe is not None:
            out[key] = _probe_manifest(probe)
    update = spec.update
    out["update"] = {
        "order": update.order.value,
        "maxSurge": update.max_surge,
        "maxUnavailable": update.max_unavailable,
        "minReadySeconds": update.min_ready_s,
        "progressDeadlineSeconds": update.progress_deadline_s,
        "failureAction": update.failure_action.value,
    }
    if spec.ingress:
        out["ingress"] = [
            {**({"host": r.host} if r.host else {}), "path": r.path, "port": r.port}
            for r in spec.ingress
        ]
    out["loadBalancing"] = spec.balance.value
    return {"apiVersion": API_VERSION, "kind": "App", "metadata": app_meta, "spec": out}


def _probe_manifest(probe: Probe) -> dict[str, Any]:
    out: dict[str, Any] = {}
    action = probe.action
    if isinstance(action, HttpGetAction):
        out["httpGet"] = {"path": action.path, "port": action.port}
    elif isinstance(action, TcpSocketAction):
        out["tcpSocket"] = {"port": action.port}
    else:
        out["exec"] = {"command": list(action.command)}
    for key, name, _lo, _hi in _PROBE_NUMBERS:
        out[key] = getattr(probe, name)
    return out


def dump_manifests(objs: Sequence[Manifest]) -> str:
    """Several records as one multi-document YAML text, fields in manifest order."""
    return yaml.safe_dump_all(
        [to_manifest(obj) for obj in objs], sort_keys=False, default_flow_style=False
    )


__all__ = [
    "API_VERSION",
    "Manifest",
    "dump_manifests",
    "format_cpu",
    "format_memory",
    "load_manifest_file",
    "parse_cpu_millicores",
    "parse_manifests",
    "parse_memory_bytes",
    "to_manifest",
]
