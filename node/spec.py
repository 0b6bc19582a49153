"""Desired state: what the user asked to run, as frozen, validated, wire-encodable records.

These records travel in the Raft log (through :mod:`p2porch.common.codec`; this module uses
tags 200-249 of the node range, node/state.py 250-299), so every rule is enforced in the
constructors: a record that exists is valid, whether it came from a manifest, the API, or a
peer's bytes (a refusal there becomes a ``CodecError``).

Content and metadata are kept apart -- ``App(meta, spec)`` -- because the state machine bumps
``meta.generation`` on every change of ``spec``; the reconciler compares generations, never
whole specs, to decide whether a running replica is out of date.

Units are in the field names: cpu in millicores (1000 = one core), memory in bytes, grace
periods in seconds. A limit of ``None`` means "unlimited"; a request of 0 means "none".
Validation errors are :class:`~p2porch.node.errors.SpecError` with the field path in Python
names (``ports[1].container_port``); the manifest parser translates paths to its spelling.
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from p2porch.common import codec

from .errors import SpecError

# DNS-1123 label: what names must be so they can become hostnames, DNS records and parts
# of container names.
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Label keys: an optional DNS-subdomain prefix and a name, as Kubernetes writes them.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
# Image references: deliberately permissive (registries differ); no whitespace or control
# characters, since the ref ends up on the engine's command line and in logs.
_IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
# The runtime stamps these on containers; users may not forge them.
RESERVED_LABEL_PREFIX = "io.p2porch"

MAX_REPLICAS = 10_000
MAX_STOP_GRACE_S = 3600
MAX_ARGS = 1024
MAX_ARG_CHARS = 64 * 1024


def _fail(field: str, message: str) -> SpecError:
    return SpecError((field,), message)


def check_dns_label(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a DNS-1123 label, else raise SpecError (empty path)."""
    if not isinstance(value, str):
        raise SpecError((), f"expected a {what} string, got {_show(value)}")
    if not _DNS_LABEL.match(value):
        raise SpecError(
            (),
            f"{_show(value)} is not a valid {what}: use lowercase letters, digits and '-', "
            "start and end with a letter or digit, at most 63 characters",
        )
    return value


def _show(value: object) -> str:
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _dns_label(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    try:
        check_dns_label(value)
    except SpecError as exc:
        raise exc.within(attribute.name) from None


def _int_in(lo: int, hi: int | None) -> Any:
    """Validator: a real int (not bool) in [lo, hi]."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if type(value) is not int or value < lo or (hi is not None and value > hi):
            bound = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            raise _fail(attribute.name, f"expected an integer {bound}, got {_show(value)}")

    return check


def _opt_int_in(lo: int, hi: int | None) -> Any:
    inner = _int_in(lo, hi)

    def check(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            inner(inst, attribute, value)

    return check


def _absolute_path(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    # ':' and ',' would be read as option separators by the engine's mount syntax.
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or value == "/"
        or posixpath.normpath(value) != value
        or any(ch in value for ch in ":,\x00\n")
        or len(value) > 4096
    ):
        raise _fail(
            attribute.name,
            f"expected a normalized absolute path other than / (like /data), got {_show(value)}",
        )


def _str_tuple(field: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise _fail(field, f"expected a list of strings, got {_show(value)}")
    if len(value) > MAX_ARGS:
        raise _fail(field, f"at most {MAX_ARGS} items, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise SpecError((field, i), f"expected a string, got {_show(item)}")
        if "\x00" in item or len(item) > MAX_ARG_CHARS:
            raise SpecError((field, i), "strings may not contain NUL or exceed 64 KiB")
    return value


def _check_label_key(key: object) -> None:
    if not isinstance(key, str):
        raise SpecError((), f"label keys are strings, got {_show(key)}")
    prefix, _, name = key.rpartition("/")
    if (prefix and not _LABEL_PREFIX.match(prefix)) or not _LABEL_NAME.match(name):
        raise SpecError(
            (),
            f"{_show(key)} is not a valid label key: [prefix/]name, name is up to 63 "
            "letters, digits, '-', '_' or '.' starting and ending alphanumeric",
        )
    if key.startswith(RESERVED_LABEL_PREFIX):
        raise SpecError((), f"label key {_show(key)} uses the reserved prefix io.p2porch")


def _labels(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Converter: labels become a key-sorted tuple of pairs (hashable, one canonical form)."""
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise SpecError(("labels",), f"expected key/value pairs, got {_show(item)}")
    return tuple(sorted(items, key=lambda kv: str(kv[0])))


def _check_labels(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, tuple):
        raise _fail(attribute.name, f"expected key/value pairs, got {_show(value)}")
    seen: set[str] = set()
    for key, val in value:
        try:
            _check_label_key(key)
        except SpecError as exc:
            raise SpecError((attribute.name, str(key)), exc.message) from None
        if key in seen:
            raise SpecError((attribute.name, key), "duplicate label key")
        seen.add(key)
        if not isinstance(val, str) or not _LABEL_VALUE.match(val):
            raise SpecError(
                (attribute.name, key),
                f"{_show(val)} is not a valid label value: up to 63 letters, digits, '-', "
                "'_' or '.', starting and ending alphanumeric (or empty)",
            )


# --------------------------------------------------------------------------- enums


class Protocol(enum.Enum):
    TCP = "tcp"
    UDP = "udp"


class RestartPolicyKind(enum.Enum):
    """When the reconciler restarts a replica whose process ended."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class ConstraintOp(enum.Enum):
    EQUALS = "=="
    NOT_EQUALS = "!="
    EXISTS = "exists"


# --------------------------------------------------------------------------- records


@codec.register(200)
@attrs.frozen
class ObjectMeta:
    """Identity and bookkeeping of an App; ``generation`` is owned by the state machine."""

    name: str = attrs.field(validator=_dns_label)
    namespace: str = attrs.field(default="default", validator=_dns_label)
    labels: tuple[tuple[str, str], ...] = attrs.field(
        default=(), converter=_labels, validator=_check_labels
    )
    generation: int = attrs.field(default=0, validator=_int_in(0, None))

    @property
    def labels_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name): the App's identity in the desired state."""
        return (self.namespace, self.name)


@codec.register(201)
@attrs.frozen
class EnvVar:
    name: str
    value: str

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not _ENV_NAME.match(self.name):
            raise _fail(
                "name",
                f"{_show(self.name)} is not a valid variable name: letters, digits and '_', "
                "not starting with a digit",
            )
        if not isinstance(self.value, str) or "\x00" in self.value:
            raise _fail("value", f"expected a string without NUL, got {_show(self.value)}")
        if len(self.value) > MAX_ARG_CHARS:
            raise _fail("value", "values are at most 64 KiB")


@codec.register(202)
@attrs.frozen
class PortSpec:
    """A port the replica listens on; ``published_port`` is the port users reach on nodes."""

    container_port: int = attrs.field(validator=_int_in(1, 65535))
    published_port: int | None = attrs.field(default=None, validator=_opt_int_in(1, 65535))
    protocol: Protocol = attrs.field(default=Protocol.TCP)
    # The routing mesh prepends a PROXY protocol v2 header on connections to the replica, so
    # the app sees the client's address (it must expect the header: opt-in).
    proxy_protocol: bool = False

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.protocol, Protocol):
            raise _fail("protocol", f"expected tcp or udp, got {_show(self.protocol)}")
        if type(self.proxy_protocol) is not bool:
            raise _fail(
                "proxy_protocol", f"expected true or false, got {_show(self.proxy_protocol)}"
            )
        if self.proxy_protocol and self.protocol is not Protocol.TCP:
            raise _fail("proxy_protocol", "the PROXY protocol header exists for TCP ports only")


@codec.register(203)
@attrs.frozen
class Resources:
    """Requests (what the scheduler reserves) and limits (what the engine enforces)."""

    cpu_request_millicores: int = attrs.field(default=0, validator=_int_in(0, 1_000_000))
    cpu_limit_millicores: int | None = attrs.field(
        default=None, validator=_opt_int_in(1, 1_000_000)
    )
    memory_request_bytes: int = attrs.field(default=0, validator=_int_in(0, 2**62))
    # Docker refuses memory limits under 6 MiB; say so here rather than at container start.
    memory_limit_bytes: int | None = attrs.field(
        default=None, validator=_opt_int_in(6 * 1024 * 1024, 2**62)
    )

    def __attrs_post_init__(self) -> None:
        if (
            self.cpu_limit_millicores is not None
            and self.cpu_limit_millicores < self.cpu_request_millicores
        ):
            raise _fail(
                "cpu_limit_millicores",
                f"limit {self.cpu_limit_millicores}m is below the request "
                f"{self.cpu_request_millicores}m",
            )
        if (
            self.memory_limit_bytes is not None
            and self.memory_limit_bytes < self.memory_request_bytes
        ):
            raise _fail(
                "memory_limit_bytes",
                f"limit {self.memory_limit_bytes} bytes is below the request "
                f"{self.memory_request_bytes} bytes",
            )


@codec.register(204)
@attrs.frozen
class RestartPolicy:
    """``max_restarts`` caps restarts (None: unbounded); meaningless, so refused, for never."""

    kind: RestartPolicyKind = RestartPolicyKind.ALWAYS
    max_restarts: int | None = attrs.field(default=None, validator=_opt_int_in(0, 1_000_000))

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.kind, RestartPolicyKind):
            raise _fail("kind", f"expected always, on-failure or never, got {_show(self.kind)}")
        if self.kind is RestartPolicyKind.NEVER and self.max_restarts is not None:
            raise _fail("max_restarts", "a policy of never restarts cannot have max_restarts")

    def should_restart(self, exit_code: int, restarts_so_far: int) -> bool:
        """The pure rule the reconciler applies when a replica's process ended."""
        if self.kind is RestartPolicyKind.NEVER:
            return False
        if self.kind is RestartPolicyKind.ON_FAILURE and exit_code == 0:
            return False
        return self.max_restarts is None or restarts_so_far < self.max_restarts


@codec.register(205)
@attrs.frozen
class PlacementConstraint:
    """A rule on node labels: ``key==value``, ``key!=value`` or ``key`` (the label exists)."""

    key: str
    op: ConstraintOp = ConstraintOp.EXISTS
    value: str | None = None

    def __attrs_post_init__(self) -> None:
        try:
            _check_label_key(self.key)
        except SpecError as exc:
            raise _fail("key", exc.message) from None
        if not isinstance(self.op, ConstraintOp):
            raise _fail("op", f"expected ==, != or exists, got {_show(self.op)}")
        if self.op is ConstraintOp.EXISTS:
            if self.value is not None:
                raise _fail("value", "an exists constraint has no value")
        elif not isinstance(self.value, str) or not _LABEL_VALUE.match(self.value):
            raise _fail("value", f"expected a label value, got {_show(self.value)}")

    def matches(self, node_labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels satisfies the rule (a missing key is != value)."""
        if self.op is ConstraintOp.EXISTS:
            return self.key in node_labels
        if self.op is ConstraintOp.EQUALS:
            return node_labels.get(self.key) == self.value
        return node_labels.get(self.key) != self.value

    @classmethod
    def parse(cls, text: str) -> PlacementConstraint:
        """``"zone==a"``, ``"disk!=hdd"`` or ``"gpu"`` -> a constraint (SpecError if not)."""
        if not isinstance(text, str):
            raise SpecError((), f"expected a constraint string, got {_show(text)}")
        stripped = text.strip()
        for op in (ConstraintOp.NOT_EQUALS, ConstraintOp.EQUALS):
            if op.value in stripped:
                key, _, value = stripped.partition(op.value)
                return cls(key=key.strip(), op=op, value=value.strip())
        if "=" in stripped or "!" in stripped:
            raise SpecError(
                (), f"{_show(text)} is not a constraint: use key==value, key!=value or key"
            )
        return cls(key=stripped)

    def __str__(self) -> str:
        if self.op is ConstraintOp.EXISTS:
            return self.key
        return f"{self.key}{self.op.value}{self.value}"


@codec.register(206)
@attrs.frozen
class BindMount:
    """A host directory mounted into the replica (node-local: the path must exist there)."""

    host_path: str = attrs.field(validator=_absolute_path)
    container_path: str = attrs.field(validator=_absolute_path)
    read_only: bool = False


@codec.register(207)
@attrs.frozen
class VolumeMount:
    """A named node-local engine volume, created on first use, kept across replica restarts."""

    name: str = attrs.field(validator=_dns_label)
    container_path: str = attrs.field(validator=_absolute_path)
    read_only: bool = False


Mount = BindMount | VolumeMount


def _tuple_of(kind: type | tuple[type, ...], what: str) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, tuple):
            raise _fail(attribute.name, f"expected a list of {what}, got {_show(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, kind):
                raise SpecError((attribute.name, i), f"expected {what}, got {_show(item)}")

    return check


# Probe bounds: Kubernetes' minimums (1 s period and timeout, thresholds of 1); the maximums
# only keep nonsense out (a day of initial delay, an hour between probes).
MAX_PROBE_INITIAL_DELAY_S = 86_400
MAX_PROBE_PERIOD_S = 3600
MAX_PROBE_THRESHOLD = 10_000
MAX_PROBE_PATH_CHARS = 2048
# An HTTP probe's path goes on the request line as written: printable ASCII, no spaces
# (percent-encode anything else), starting with '/'.
_HTTP_PATH = re.compile(r"^/[\x21-\x7e]*$")


@codec.register(211)
@attrs.frozen
class HttpGetAction:
    """GET ``path`` on the node's published port for container port ``port``; 2xx/3xx pass."""

    port: int = attrs.field(validator=_int_in(1, 65535))
    path: str = "/"

    def __attrs_post_init__(self) -> None:
        if (
            not isinstance(self.path, str)
            or not _HTTP_PATH.match(self.path)
            or len(self.path) > MAX_PROBE_PATH_CHARS
        ):
            raise _fail(
                "path",
                "expected a path starting with / in printable ASCII without spaces "
                f"(percent-encode the rest), at most {MAX_PROBE_PATH_CHARS} characters, "
                f"got {_show(self.path)}",
            )


@codec.register(212)
@attrs.frozen
class TcpSocketAction:
    """Open a TCP connection to the node's published port for container port ``port``."""

    port: int = attrs.field(validator=_int_in(1, 65535))


@codec.register(213)
@attrs.frozen
class ExecAction:
    """Run ``command`` inside the container (no shell: argv as given); exit 0 passes."""

    command: tuple[str, ...]

    def __attrs_post_init__(self) -> None:
        _str_tuple("command", self.command)
        if not self.command:
            raise _fail("command", "an exec probe needs a command")


ProbeAction = HttpGetAction | TcpSocketAction | ExecAction


@codec.register(214)
@attrs.frozen
class Probe:
    """A health check of a replica, with Kubernetes' fields and defaults.

    Exactly one action (``http_get``, ``tcp`` or ``exec``). The node daemon runs it every
    ``period_s`` once ``initial_delay_s`` has passed since the container started; a run
    taking longer than ``timeout_s`` fails. ``failure_threshold`` consecutive failures turn
    the verdict to failing, ``success_threshold`` consecutive successes back to passing.
    What a verdict does depends on the slot the probe fills in :class:`AppSpec`.
    """

    http_get: HttpGetAction | None = None
    tcp: TcpSocketAction | None = None
    exec: ExecAction | None = None
    initial_delay_s: int = attrs.field(default=0, validator=_int_in(0, MAX_PROBE_INITIAL_DELAY_S))
    period_s: int = attrs.field(default=10, validator=_int_in(1, MAX_PROBE_PERIOD_S))
    timeout_s: int = attrs.field(default=1, validator=_int_in(1, MAX_PROBE_PERIOD_S))
    failure_threshold: int = attrs.field(default=3, validator=_int_in(1, MAX_PROBE_THRESHOLD))
    success_threshold: int = attrs.field(default=1, validator=_int_in(1, MAX_PROBE_THRESHOLD))

    def __attrs_post_init__(self) -> None:
        for name, kind in (
            ("http_get", HttpGetAction),
            ("tcp", TcpSocketAction),
            ("exec", ExecAction),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise _fail(name, f"expected {kind.__name__}, got {_show(value)}")
        given = [a for a in (self.http_get, self.tcp, self.exec) if a is not None]
        if len(given) != 1:
            raise SpecError(
                (),
                f"a probe needs exactly one action (http_get, tcp or exec), got {len(given)}",
            )

    @property
    def action(self) -> ProbeAction:
        """The one action this probe runs."""
        action = self.http_get or self.tcp or self.exec
        if action is None:  # unreachable: the constructor refuses it
            raise SpecError((), "a probe needs an action")
        return action

    @property
    def port(self) -> int | None:
        """The container port an HTTP or TCP probe reaches (None for exec)."""
        action = self.action
        return None if isinstance(action, ExecAction) else action.port


# AppSpec's probe fields, in field order.
PROBE_FIELDS = ("liveness", "readiness", "startup")


class UpdateOrder(enum.Enum):
    """Whether a replica's new container starts before its old one stops, or after."""

    START_FIRST = "start-first"
    STOP_FIRST = "stop-first"


class FailureAction(enum.Enum):
    PAUSE = "pause"
    ROLLBACK = "rollback"


_COUNT_OR_PERCENT = re.compile(r"^(0|[1-9][0-9]{0,5})%?$")


def _count_or_percent(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _COUNT_OR_PERCENT.match(value):
        raise _fail(
            attribute.name, f"expected a count like 1 or a percentage like 25%, got {_show(value)}"
        )
    if value.endswith("%") and int(value[:-1]) > 100:
        raise _fail(attribute.name, f"a percentage is at most 100%, got {value}")


def resolve_count(value: str, replicas: int, *, round_up: bool) -> int:
    """``"2"`` -> 2; ``"25%"`` of ``replicas``, rounded up (surge) or down (unavailable)."""
    if not value.endswith("%"):
        return int(value)
    scaled = replicas * int(value[:-1])
    return -(-scaled // 100) if round_up else scaled // 100


@codec.register(215)
@attrs.frozen
class UpdateStrategy:
    """How a changed spec rolls over the replicas (Kubernetes' RollingUpdate + Swarm's order).

    With ``start-first`` a replica's new container starts beside the old one, which keeps
    serving until the new one is ready: ``max_surge`` replicas are replaced at once. With
    ``stop-first`` the old one is drained and stopped first: ``max_unavailable`` at once. A
    replica counts as updated once ready for ``min_ready_s``; one that crashes, fails to
    start or is not ready within ``progress_deadline_s`` fails the rollout, which then
    pauses or rolls back to the previous revision (``failure_action``).
    """

    order: UpdateOrder = UpdateOrder.START_FIRST
    max_surge: str = attrs.field(default="1", validator=_count_or_percent)
    max_unavailable: str = attrs.field(default="0", validator=_count_or_percent)
    min_ready_s: int = attrs.field(default=0, validator=_int_in(0, 3600))
    progress_deadline_s: int = attrs.field(default=120, validator=_int_in(1, 86400))
    failure_action: FailureAction = FailureAction.ROLLBACK

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.order, UpdateOrder):
            raise _fail("order", f"expected start-first or stop-first, got {_show(self.order)}")
        if not isinstance(self.failure_action, FailureAction):
            raise _fail(
                "failure_action", f"expected pause or rollback, got {_show(self.failure_action)}"
            )
        if self.max_surge in ("0", "0%") and self.max_unavailable in ("0", "0%"):
            raise _fail(
                "max_unavailable",
                "maxSurge and maxUnavailable cannot both be 0: nothing could be replaced",
            )

    def batch(self, replicas: int) -> int:
        """Replicas replaced at once: the surge (start-first) or the unavailable budget."""
        if self.order is UpdateOrder.START_FIRST:
            count = resolve_count(self.max_surge, replicas, round_up=True)
        else:
            count = resolve_count(self.max_unavailable, replicas, round_up=False)
        return max(1, count)


_HOST_NAME = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


@codec.register(216)
@attrs.frozen
class IngressRoute:
    """Requests to the node's HTTP ingress for ``host`` (any when empty; ``*.example.com``
    matches one label) under ``path`` (a prefix, matched on whole segments) go to
    ``port`` (a TCP container port) of a ready replica."""

    port: int = attrs.field(validator=_int_in(1, 65535))
    host: str = ""
    path: str = "/"

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.host, str) or (
            self.host and (len(self.host) > 253 or not _HOST_NAME.match(self.host))
        ):
            raise _fail(
                "host",
                f"expected a lowercase host name like shop.example.com, got {_show(self.host)}",
            )
        if (
            not isinstance(self.path, str)
            or not self.path.startswith("/")
            or len(self.path) > 1024
            or any(ch in self.path for ch in " ?#\x00")
        ):
            raise _fail("path", f"expected a path prefix like / or /api, got {_show(self.path)}")


class Balance(enum.Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_CONNECTIONS = "least-connections"


@codec.register(208)
@attrs.frozen
class AppSpec:
    """What to run and how: the part of an App whose changes bump the generation."""

    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = attrs.field(default=(), validator=_tuple_of(EnvVar, "env var"))
    ports: tuple[PortSpec, ...] = attrs.field(default=(), validator=_tuple_of(PortSpec, "port"))
    replicas: int = attrs.field(default=1, validator=_int_in(0, MAX_REPLICAS))
    resources: Resources = attrs.field(factory=Resources)
    restart_policy: RestartPolicy = attrs.field(factory=RestartPolicy)
    placement: tuple[PlacementConstraint, ...] = attrs.field(
        default=(), validator=_tuple_of(PlacementConstraint, "constraint")
    )
    volumes: tuple[BindMount | VolumeMount, ...] = attrs.field(
        default=(), validator=_tuple_of((BindMount, VolumeMount), "volume")
    )
    stop_grace_s: int = attrs.field(default=10, validator=_int_in(0, MAX_STOP_GRACE_S))
    # Names of secrets (in the app's namespace) its replicas use: only the nodes that run one
    # of them are given the values (node/security.py); mounting arrives with workloads.
    secrets: tuple[str, ...] = ()
    # Health probes (node/probes.py): failing liveness restarts the replica; readiness gates
    # whether it counts as ready; a startup probe holds both back until it first passes.
    liveness: Probe | None = None
    readiness: Probe | None = None
    startup: Probe | None = None
    # Traffic: how changes roll out, the ingress routes to this app, and how the routing
    # mesh and the ingress pick a replica. None of them changes what a container runs, so
    # they are not part of the template (changing them starts no rollout).
    update: UpdateStrategy = attrs.field(factory=UpdateStrategy)
    ingress: tuple[IngressRoute, ...] = attrs.field(
        default=(), validator=_tuple_of(IngressRoute, "ingress route")
    )
    balance: Balance = Balance.ROUND_ROBIN

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.image, str) or not _IMAGE_REF.match(self.image):
            raise _fail(
                "image", f"expected an image reference like repo:tag, got {_show(self.image)}"
            )
        if len(self.image) > 512:
            raise _fail("image", "image references are at most 512 characters")
        _str_tuple("command", self.command)
        _str_tuple("args", self.args)
        if not isinstance(self.resources, Resources):
            raise _fail("resources", f"expected Resources, got {_show(self.resources)}")
        if not isinstance(self.restart_policy, RestartPolicy):
            raise _fail(
                "restart_policy", f"expected RestartPolicy, got {_show(self.restart_policy)}"
            )
        names: set[str] = set()
        for i, var in enumerate(self.env):
            if var.name in names:
                raise SpecError(("env", i, "name"), f"duplicate variable {var.name}")
            names.add(var.name)
        container: set[tuple[int, Protocol]] = set()
        published: set[tuple[int, Protocol]] = set()
        for i, port in enumerate(self.ports):
            if (port.container_port, port.protocol) in container:
                raise SpecError(
                    ("ports", i, "container_port"),
                    f"container port {port.container_port}/{port.protocol.value} listed twice",
                )
            container.add((port.container_port, port.protocol))
            if port.published_port is not None:
                if (port.published_port, port.protocol) in published:
                    raise SpecError(
                        ("ports", i, "published_port"),
                        f"published port {port.published_port}/{port.protocol.value} listed twice",
                    )
                published.add((port.published_port, port.protocol))
        mounted: set[str] = set()
        for i, mount in enumerate(self.volumes):
            if mount.container_path in mounted:
                raise SpecError(
                    ("volumes", i, "container_path"),
                    f"{mount.container_path} is mounted twice",
                )
            mounted.add(mount.container_path)
        _str_tuple("secrets", self.secrets)
        for i, secret in enumerate(self.secrets):
            try:
                check_dns_label(secret, "secret name")
            except SpecError as exc:
                raise SpecError(("secrets", i), str(exc)) from None
            if secret in self.secrets[:i]:
                raise SpecError(("secrets", i), f"secret {secret} listed twice")
        self._check_probes(container)
        if not isinstance(self.update, UpdateStrategy):
            raise _fail("update", f"expected UpdateStrategy, got {_show(self.update)}")
        if not isinstance(self.balance, Balance):
            raise _fail(
                "balance", f"expected round-robin or least-connections, got {_show(self.balance)}"
            )
        tcp_ports = sorted(port for port, proto in container if proto is Protocol.TCP)
        routes: set[tuple[str, str]] = set()
        for i, route in enumerate(self.ingress):
            if route.port not in tcp_ports:
                listed = ", ".join(map(str, tcp_ports)) if tcp_ports else "none"
                raise SpecError(
                    ("ingress", i, "port"),
                    f"port {route.port} is not one of the app's TCP container ports ({listed})",
                )
            if (route.host, route.path) in routes:
                raise SpecError(
                    ("ingress", i), f"route {route.host or '*'}{route.path} listed twice"
                )
            routes.add((route.host, route.path))

    def template(self) -> AppSpec:
        """The part that decides what a container runs: a change here is a new revision
        (a rollout); replicas, the update strategy, ingress routes and balancing are not."""
        return attrs.evolve(
            self, replicas=0, update=UpdateStrategy(), ingress=(), balance=Balance.ROUND_ROBIN
        )

    def _check_probes(self, container_ports: set[tuple[int, Protocol]]) -> None:
        """Probes reach a TCP container port of this app; liveness/startup pass at once."""
        tcp_ports = sorted(port for port, proto in container_ports if proto is Protocol.TCP)
        for name in PROBE_FIELDS:
            probe = getattr(self, name)
            if probe is None:
                continue
            if not isinstance(probe, Probe):
                raise _fail(name, f"expected Probe, got {_show(probe)}")
            action = probe.action
            if not isinstance(action, ExecAction) and action.port not in tcp_ports:
                listed = ", ".join(map(str, tcp_ports)) if tcp_ports else "none"
                raise SpecError(
                    (name, "http_get" if isinstance(action, HttpGetAction) else "tcp", "port"),
                    f"port {action.port} is not one of the app's TCP container ports "
                    f"({listed}): probes reach a replica through its published port",
                )
            # As in Kubernetes: one success is what "alive" and "started" mean.
            if name != "readiness" and probe.success_threshold != 1:
                raise SpecError(
                    (name, "success_threshold"),
                    f"must be 1 for a {name} probe, got {probe.success_threshold}",
                )

    def probes(self) -> tuple[tuple[str, Probe], ...]:
        """The probes this app has, as (slot, probe) in field order."""
        out = []
        for name in PROBE_FIELDS:
            probe = getattr(self, name)
            if probe is not None:
                out.append((name, probe))
        return tuple(out)

    @property
    def env_dict(self) -> dict[str, str]:
        return {var.name: var.value for var in self.env}

    def placement_matches(self, node_labels: Mapping[str, str]) -> bool:
        """Whether every constraint holds on a node with these labels."""
        return all(c.matches(node_labels) for c in self.placement)


def with_settings_of(template: AppSpec, current: AppSpec, *, drop_unfit_routes: bool) -> AppSpec:
    """``template``'s containers with ``current``'s replicas and traffic settings (what an
    older revision runs as today). An ingress route to a port the template does not listen
    on is dropped with ``drop_unfit_routes``, else it raises SpecError."""
    routes = current.ingress
    if drop_unfit_routes:
        tcp = {p.container_port for p in template.ports if p.protocol is Protocol.TCP}
        routes = tuple(r for r in routes if r.port in tcp)
    return attrs.evolve(
        template,
        replicas=current.replicas,
        update=current.update,
        ingress=routes,
        balance=current.balance,
    )


@codec.register(209)
@attrs.frozen
class App:
    """A named, versioned AppSpec: the unit users create, update and delete."""

    meta: ObjectMeta
    spec: AppSpec

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.meta, ObjectMeta):
            raise _fail("meta", f"expected ObjectMeta, got {_show(self.meta)}")
        if not isinstance(self.spec, AppSpec):
            raise _fail("spec", f"expected AppSpec, got {_show(self.spec)}")

    @property
    def key(self) -> tuple[str, str]:
        return self.meta.key

    def replica_names(self) -> tuple[str, ...]:
        """Stable replica names ``<app>-<index>``; the scheduler places each one."""
        return tuple(replica_name(self.meta.name, i) for i in range(self.spec.replicas))

    def with_generation(self, generation: int) -> App:
        return attrs.evolve(self, meta=attrs.evolve(self.meta, generation=generation))


@codec.register(210)
@attrs.frozen
class Namespace:
    """A namespace groups Apps; names of Apps are unique within one."""

    name: str = attrs.field(validator=_dns_label)
    labels: tuple[tuple[str, str], ...] = attrs.field(
        default=(), converter=_labels, validator=_check_labels
    )
    generation: int = attrs.field(default=0, validator=_int_in(0, None))


def replica_name(app_name: str, index: int) -> str:
    """``hello-0``: kept a DNS label (an App name leaves room for the suffix up to 63)."""
    name = f"{app_name}-{index}"
    if len(name) > 63:
        # Keep the suffix (it is what tells replicas apart); shorten the app part.
        suffix = f"-{index}"
        name = app_name[: 63 - len(suffix)].rstrip("-") + suffix
    return name
