"""The container runtime: the local Docker engine, driven from trio.

The docker SDK is blocking (requests over the engine's unix socket), so every call runs in a
worker thread through ``trio.to_thread.run_sync`` under a ``CapacityLimiter``; the SDK's
connection pool is raised to the same size, so no thread waits for a pooled connection.
Long-lived streams (events, followed logs, image pulls) use a second client with no timeout
and their own limiter, so a handful of open streams can never starve ordinary requests.

Ownership is the safety rule: every container this node creates carries
``io.p2porch.node=<node name>`` (plus app, namespace, replica and generation labels), the
node lists only containers with its label, and every operation on an id first checks that
label -- a container that is not ours raises :class:`NotOwned` and is left alone. Several
nodes may share one engine (tests run many daemons on one machine), so container and volume
names include the node name too.

Published ports bind the node's advertise address only (never 0.0.0.0 by default), and
containers run with an init process (``init=True``), so a stop is prompt even when the
image's PID 1 (busybox httpd, for one) ignores SIGTERM. The engine's own restart policy is
off: restarts with back-off belong to the reconciler, which sees every exit as an event.

Every docker, requests or socket exception is translated into a
:mod:`p2porch.node.errors` exception (``raise ... from exc``). Requests are not abandoned
when the caller is cancelled: the engine finishes what it was asked (a cancelled stop still
stops) and the thread's answer is awaited, so the node never loses track of a container.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import ipaddress
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import attrs
import docker
import docker.errors
import docker.types
import requests.exceptions
import trio
import urllib3.exceptions

from .errors import (
    ContainerConflict,
    ContainerNotFound,
    EngineRefused,
    EngineUnavailable,
    ImageUnavailable,
    NodeError,
    NotOwned,
    SpecError,
)
from .spec import App, BindMount, Protocol, VolumeMount, check_dns_label

T = TypeVar("T")

# Node names become part of container and volume names: no '_' (the separator there).
_NODE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,126}[A-Za-z0-9])?$")

LABEL_PREFIX = "io.p2porch"
LABEL_NODE = "io.p2porch.node"
LABEL_APP = "io.p2porch.app"
LABEL_NAMESPACE = "io.p2porch.namespace"
LABEL_REPLICA = "io.p2porch.replica"
LABEL_GENERATION = "io.p2porch.generation"

# Environment every replica gets, so the app can tell which replica it is.
ENV_REPLICA = "P2PORCH_REPLICA"
ENV_APP = "P2PORCH_APP"
ENV_NAMESPACE = "P2PORCH_NAMESPACE"
ENV_NODE = "P2PORCH_NODE"
ENV_GENERATION = "P2PORCH_GENERATION"

_ENGINE_ERRORS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)
_STREAM_ERRORS: tuple[type[Exception], ...] = (*_ENGINE_ERRORS, ValueError, AttributeError)
# Output an exec probe keeps (for the reason shown when it fails); the rest is drained.
_EXEC_PROBE_OUTPUT_BYTES = 4096


# --------------------------------------------------------------------------- config


@attrs.frozen
class RuntimeConfig:
    """How the node talks to its engine. Units in names; checks raise ValueError."""

    # Worker threads for ordinary requests (and the SDK connection pool size). Measured here:
    # 50 container starts take 8.0-8.3 s with 8 threads, 7.5-8.0 s with 16.
    thread_limit: int = 16
    # Threads (and connections) for long-lived streams: events, followed logs, pulls.
    stream_limit: int = 16
    request_timeout_s: float = 60.0
    # None: the environment's DOCKER_HOST, else the local unix socket.
    docker_host: str | None = None
    # Rotate container logs so a chatty replica cannot fill the node's disk.
    log_max_size_mb: int = 10
    log_max_files: int = 3

    def __attrs_post_init__(self) -> None:
        if self.thread_limit < 1:
            raise ValueError(f"thread_limit must be >= 1, got {self.thread_limit}")
        if self.stream_limit < 1:
            raise ValueError(f"stream_limit must be >= 1, got {self.stream_limit}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.log_max_size_mb < 1 or self.log_max_files < 1:
            raise ValueError("log_max_size_mb and log_max_files must be >= 1")

    @classmethod
    def local(cls) -> RuntimeConfig:
        """Tests and a laptop: a busy engine is still a local one, fail fast-ish."""
        return cls(thread_limit=8, stream_limit=16, request_timeout_s=30.0)

    @classmethod
    def lan(cls) -> RuntimeConfig:
        """Real nodes: more parallel starts, patience for a loaded engine."""
        return cls(thread_limit=16, stream_limit=32, request_timeout_s=120.0)


# --------------------------------------------------------------------------- values


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    RESTARTING = "restarting"
    REMOVING = "removing"
    EXITED = "exited"
    DEAD = "dead"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: object) -> ContainerState:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


@attrs.frozen
class PortBinding:
    """Publish ``container_port`` on the advertise address; ``host_port`` None = any free."""

    container_port: int
    host_port: int | None = None
    protocol: Protocol = Protocol.TCP


@attrs.frozen
class PublishedPort:
    """A port binding as the engine reports it (the actual host port)."""

    container_port: int
    protocol: Protocol
    host_ip: str
    host_port: int


Mount = BindMount | VolumeMount


@attrs.frozen
class HealthCheck:
    """An engine-run health command: its verdicts arrive as HEALTH events.

    ``command`` runs inside the container (exit 0 = healthy) every ``interval_s``; after
    ``retries`` failures in a row the replica is unhealthy. Failures during ``start_period_s``
    do not count.
    """

    command: tuple[str, ...]
    interval_s: float = 5.0
    timeout_s: float = 3.0
    retries: int = 3
    start_period_s: float = 0.0

    def __attrs_post_init__(self) -> None:
        if not self.command:
            raise ValueError("a health check needs a command")
        if self.interval_s < 0.001 or self.timeout_s < 0.001:
            raise ValueError("interval_s and timeout_s must be at least 1 ms")
        if self.retries < 1 or self.start_period_s < 0:
            raise ValueError("retries must be >= 1 and start_period_s >= 0")

    def to_engine(self) -> dict[str, Any]:
        return {
            "test": ["CMD", *self.command],
            "interval": int(self.interval_s * 1e9),
            "timeout": int(self.timeout_s * 1e9),
            "retries": self.retries,
            "start_period": int(self.start_period_s * 1e9),
        }


def _pairs(value: Mapping[str, str] | tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(value.items()) if isinstance(value, Mapping) else tuple(value)


@attrs.frozen
class ContainerRequest:
    """Everything needed to run one replica (``for_replica`` derives it from an App)."""

    app: str
    namespace: str
    replica: str
    generation: int
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    ports: tuple[PortBinding, ...] = ()
    cpu_request_millicores: int = 0
    cpu_limit_millicores: int | None = None
    memory_request_bytes: int = 0
    memory_limit_bytes: int | None = None
    volumes: tuple[Mount, ...] = ()
    # Extra labels (the App's metadata labels); io.p2porch.* ones are always the runtime's.
    labels: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    stop_grace_s: int = 10
    # None: p2porch_<node>_<namespace>_<replica>_g<generation>.
    name: str | None = None
    health: HealthCheck | None = None

    def __attrs_post_init__(self) -> None:
        for field in ("app", "namespace", "replica"):
            try:
                check_dns_label(getattr(self, field), field)
            except SpecError as exc:
                raise exc.within(field) from None
        if type(self.generation) is not int or self.generation < 0:
            raise SpecError(("generation",), f"expected an integer >= 0, got {self.generation!r}")

    @classmethod
    def for_replica(cls, app: App, replica: str, *, publish: bool = True) -> ContainerRequest:
        """The request for one replica of ``app``.

        With ``publish`` False (the default: the routing mesh owns published TCP ports),
        every TCP port gets a free host port on the advertise address, where probes, the mesh
        and the ingress reach the replica; UDP published ports are bound directly.
        """
        spec = app.spec
        return cls(
            app=app.meta.name,
            namespace=app.meta.namespace,
            replica=replica,
            generation=app.meta.generation,
            image=spec.image,
            command=spec.command,
            args=spec.args,
            env=tuple((var.name, var.value) for var in spec.env),
            ports=tuple(
                PortBinding(
                    p.container_port,
                    # The routing mesh serves published TCP ports; UDP has no mesh, so a
                    # UDP published port is bound by the replica itself (one per node).
                    p.published_port if publish or p.protocol is Protocol.UDP else None,
                    p.protocol,
                )
                for p in spec.ports
            ),
            cpu_request_millicores=spec.resources.cpu_request_millicores,
            cpu_limit_millicores=spec.resources.cpu_limit_millicores,
            memory_request_bytes=spec.resources.memory_request_bytes,
            memory_limit_bytes=spec.resources.memory_limit_bytes,
            volumes=spec.volumes,
            labels=app.meta.labels,
            stop_grace_s=spec.stop_grace_s,
        )


@attrs.frozen
class ContainerInfo:
    """One container of this node as the engine sees it right now."""

    id: str
    name: str
    image: str
    state: ContainerState
    app: str
    namespace: str
    replica: str
    generation: int | None
    # Set once the process has ended at least once (None while it never ran to an end).
    exit_code: int | None
    oom_killed: bool
    started_at: datetime | None
    finished_at: datetime | None
    restart_count: int
    ports: tuple[PublishedPort, ...]
    labels: tuple[tuple[str, str], ...]
    # The engine's error text (e.g. why a start failed), "" when none.
    error: str = ""

    @property
    def running(self) -> bool:
        return self.state is ContainerState.RUNNING

    def host_port(self, container_port: int, protocol: Protocol = Protocol.TCP) -> int | None:
        for port in self.ports:
            if port.container_port == container_port and port.protocol is protocol:
                return port.host_port
        return None


class EventKind(enum.Enum):
    START = "start"
    DIE = "die"
    OOM = "oom"
    DESTROY = "destroy"
    HEALTH = "health_status"


@attrs.frozen
class ContainerEvent:
    """A lifecycle event of one of this node's containers."""

    kind: EventKind
    container_id: str
    name: str
    app: str
    namespace: str
    replica: str
    generation: int | None
    time_ns: int
    exit_code: int | None = None  # for DIE
    health: str | None = None  # for HEALTH: healthy | unhealthy | starting


@attrs.frozen
class PullProgress:
    """One progress line of an image pull (``current``/``total`` in bytes when known)."""

    ref: str
    status: str
    layer: str | None = None
    current_bytes: int | None = None
    total_bytes: int | None = None


# --------------------------------------------------------------------------- parsing


def parse_engine_time(value: object) -> datetime | None:
    """Docker's RFC 3339 nanosecond timestamps -> aware datetime (None for the zero time)."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    text = value.replace("Z", "+00:00")
    # Python keeps microseconds: cut the fraction to 6 digits, keep the zone.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _published_ports(attrs_: Mapping[str, Any]) -> tuple[PublishedPort, ...]:
    ports = (attrs_.get("NetworkSettings") or {}).get("Ports") or {}
    out: list[PublishedPort] = []
    for key, bindings in sorted(ports.items()):
        port_text, _, proto = str(key).partition("/")
        container_port = _int_or_none(port_text)
        if container_port is None or not bindings:
            continue
        protocol = Protocol.UDP if proto == "udp" else Protocol.TCP
        for binding in bindings:
            host_port = _int_or_none(binding.get("HostPort"))
            if host_port is not None:
                out.append(
                    PublishedPort(
                        container_port, protocol, str(binding.get("HostIp", "")), host_port
                    )
                )
    return tuple(out)


def container_info(attrs_: Mapping[str, Any]) -> ContainerInfo:
    """A ContainerInfo from the engine's inspect document."""
    config = attrs_.get("Config") or {}
    labels: dict[str, str] = dict(config.get("Labels") or {})
    state = attrs_.get("State") or {}
    status = ContainerState.parse(state.get("Status"))
    finished = parse_engine_time(state.get("FinishedAt"))
    exit_code = _int_or_none(state.get("ExitCode")) if finished is not None else None
    return ContainerInfo(
        id=str(attrs_.get("Id", "")),
        name=str(attrs_.get("Name", "")).lstrip("/"),
        image=str(config.get("Image", "")),
        state=status,
        app=labels.get(LABEL_APP, ""),
        namespace=labels.get(LABEL_NAMESPACE, ""),
        replica=labels.get(LABEL_REPLICA, ""),
        generation=_int_or_none(labels.get(LABEL_GENERATION)),
        exit_code=exit_code,
        oom_killed=bool(state.get("OOMKilled", False)),
        started_at=parse_engine_time(state.get("StartedAt")),
        finished_at=finished,
        restart_count=_int_or_none(attrs_.get("RestartCount")) or 0,
        ports=_published_ports(attrs_),
        labels=tuple(sorted(labels.items())),
        error=str(state.get("Error") or ""),
    )


def container_event(raw: Mapping[str, Any]) -> ContainerEvent | None:
    """A ContainerEvent from one engine event (None for kinds we do not report)."""
    if raw.get("Type") != "container":
        return None
    action = str(raw.get("Action") or raw.get("status") or "")
    kind_text, _, detail = action.partition(":")
    try:
        kind = EventKind(kind_text.strip())
    except ValueError:
        return None
    actor = raw.get("Actor") or {}
    attributes: Mapping[str, Any] = actor.get("Attributes") or {}
    time_ns = _int_or_none(raw.get("timeNano"))
    if time_ns is None:
        time_ns = (_int_or_none(raw.get("time")) or 0) * 1_000_000_000
    return ContainerEvent(
        kind=kind,
        container_id=str(actor.get("ID") or raw.get("id") or ""),
        name=str(attributes.get("name", "")),
        app=str(attributes.get(LABEL_APP, "")),
        namespace=str(attributes.get(LABEL_NAMESPACE, "")),
        replica=str(attributes.get(LABEL_REPLICA, "")),
        generation=_int_or_none(attributes.get(LABEL_GENERATION)),
        time_ns=time_ns,
        exit_code=_int_or_none(attributes.get("exitCode")) if kind is EventKind.DIE else None,
        health=detail.strip() or None if kind is EventKind.HEALTH else None,
    )


# --------------------------------------------------------------------------- errors


def _explanation(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return f"{type(exc).__name__}: {exc}"


def translate_error(exc: BaseException, what: str) -> NodeError:
    """The node error for an SDK/transport exception raised while doing ``what``."""
    if isinstance(exc, NodeError):
        return exc
    if isinstance(exc, docker.errors.NotFound):
        return ContainerNotFound(f"{what}: {_explanation(exc)}")
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code
        if status == 409:
            return ContainerConflict(f"{what}: {_explanation(exc)}")
        return EngineRefused(f"{what}: the engine answered {status}: {_explanation(exc)}", status)
    return EngineUnavailable(f"{what}: the Docker engine did not answer: {_explanation(exc)}")


def _guarded(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` (in a worker thread), translating every engine exception."""
    try:
        return fn()
    except _ENGINE_ERRORS as exc:
        raise translate_error(exc, what) from exc


# --------------------------------------------------------------------------- streams

_END = object()


class _ThreadStream:
    """A blocking SDK stream read by one pump thread into a trio memory channel.

    Reading from the channel is cancel-safe: a reader that times out loses nothing and may
    read again (a worker thread per item would instead leave an abandoned thread inside the
    stream's generator). Closing (``close`` / leaving ``async with``) shuts the HTTP
    connection, which ends the pump thread. Open streams are bounded by ``limiter``.
    """

    def __init__(
        self,
        open_stream: Callable[[], Any],
        limiter: trio.CapacityLimiter,
        what: str,
        buffer_items: int = 256,
    ) -> None:
        self._open_stream = open_stream
        self._limiter = limiter
        self._what = what
        self._buffer_items = buffer_items
        self._stream: Any = None
        self._receive: trio.MemoryReceiveChannel[Any] | None = None
        self._closed = threading.Event()
        self._holding_token = False
        self.finished = False
        # True when the engine ended the stream (not our close): events treat it as an error.
        self.ended_by_engine = False

    async def open(self) -> None:
        if self._receive is not None or self._closed.is_set():
            return
        await self._limiter.acquire_on_behalf_of(self)
        self._holding_token = True
        try:
            stream = await trio.to_thread.run_sync(
                functools.partial(_guarded, self._what, self._open_stream)
            )
        except BaseException:
            self.close()
            raise
        self._stream = stream
        send, self._receive = trio.open_memory_channel[Any](self._buffer_items)
        token = trio.lowlevel.current_trio_token()
        trio.lowlevel.start_thread_soon(
            functools.partial(self._pump, iter(stream), send, token), lambda _outcome: None
        )

    def _pump(
        self,
        iterator: Iterator[Any],
        send: trio.MemorySendChannel[Any],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        """Runs in its own thread: forward every item, then _END or the translated error."""
        final: Any = _END
        try:
            for item in iterator:
                trio.from_thread.run(send.send, item, trio_token=token)
        except _STREAM_ERRORS as exc:
            if not self._closed.is_set():
                final = translate_error(exc, self._what)
        except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the reader went away: nothing to deliver
        with contextlib.suppress(
            trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            trio.from_thread.run(send.send, final, trio_token=token)

    async def receive(self) -> Any:
        """The next item, or _END once the stream is over (an engine error is raised)."""
        await self.open()
        if self._receive is None or self.finished:
            return _END
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            item = _END
        if item is _END or isinstance(item, NodeError):
            self.ended_by_engine = not self._closed.is_set()
            self.finished = True
            self.close()
            if isinstance(item, NodeError):
                raise item
        return item

    def close(self) -> None:
        """Shut the connection (ending the pump thread) and give back the stream slot."""
        self._closed.set()
        stream = self._stream
        if stream is not None and hasattr(stream, "close"):
            # Closing a dead socket may fail in many ways; it is closed either way.
            with contextlib.suppress(Exception):
                stream.close()
        if self._receive is not None:
            self._receive.close()
        if self._holding_token:
            self._holding_token = False
            self._limiter.release_on_behalf_of(self)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


class _EngineStream:
    """An engine stream used as ``async with ... as s: async for item in s``: the thread
    behind it is released on exit, whatever happens in the loop."""

    def __init__(self, stream: _ThreadStream) -> None:
        self._stream = stream

    async def __aenter__(self) -> Self:
        await self._stream.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._stream.close()

    def __aiter__(self) -> Self:
        return self


class EventStream(_EngineStream):
    """``async with runtime.events() as events: async for event in events: ...``

    The subscription is live when ``async with`` returns, so nothing created afterwards is
    missed. The iteration raises EngineUnavailable if the engine ends the stream.
    """

    def __init__(
        self, stream: _ThreadStream, on_event: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(stream)
        self._on_event = on_event

    async def __anext__(self) -> ContainerEvent:
        while True:
            raw = await self._stream.receive()
            if raw is _END:
                if self._stream.ended_by_engine:
                    raise EngineUnavailable("the Docker engine closed the event stream")
                raise StopAsyncIteration
            if isinstance(raw, Mapping):
                event = container_event(raw)
                if event is not None:
                    if self._on_event is not None:
                        self._on_event(event.container_id)
                    return event


class LogStream(_EngineStream):
    """``async with runtime.logs(id, follow=True) as lines: async for line in lines``.

    Yields log lines as bytes without the trailing newline (stdout and stderr interleaved).
    Without ``follow`` it ends after the last line; with it, when the container stops.
    """

    def __init__(self, stream: _ThreadStream) -> None:
        super().__init__(stream)
        self._buffer = b""
        self._lines: list[bytes] = []
        self._done = False

    async def __anext__(self) -> bytes:
        while not self._lines:
            if self._done:
                raise StopAsyncIteration
            chunk = await self._stream.receive()
            if chunk is _END:
                self._done = True
                if self._buffer:
                    self._lines.append(self._buffer)
                    self._buffer = b""
                continue
            if isinstance(chunk, bytes):
                self._buffer += chunk
                *complete, self._buffer = self._buffer.split(b"\n")
                self._lines.extend(line.rstrip(b"\r") for line in complete)
        return self._lines.pop(0)


# --------------------------------------------------------------------------- runtime


class DockerRuntime:
    """This node's handle on the local engine. Create with ``await DockerRuntime.connect``."""

    def __init__(
        self,
        node_name: str,
        advertise_address: str,
        client: Any,
        stream_client: Any,
        config: RuntimeConfig,
    ) -> None:
        self.node_name = node_name
        self.advertise_address = advertise_address
        self.config = config
        self._client = client
        self._stream_client = stream_client
        self._limiter = trio.CapacityLimiter(config.thread_limit)
        self._stream_limiter = trio.CapacityLimiter(config.stream_limit)
        # container id -> (state the listing showed, inspection). The SDK-level list only
        # summarises, and inspecting every container on every reconciler pass made a
        # 50-replica rollout cost O(N^2) inspections. An entry is reused while the listing
        # shows the same state and dropped on any engine event for that container or any
        # operation of ours on it.
        self._inspected: dict[str, tuple[ContainerState, ContainerInfo]] = {}
        # Service DNS for containers (node/traffic.py sets it when the node's DNS server is
        # reachable from containers): resolver addresses and the cluster's DNS domain.
        self.dns_servers: tuple[str, ...] = ()
        self.dns_domain = ""

    @classmethod
    async def connect(
        cls,
        node_name: str,
        advertise_address: str = "127.0.0.1",
        config: RuntimeConfig | None = None,
    ) -> DockerRuntime:
        """Open both clients and check the engine answers (EngineUnavailable if not)."""
        cfg = config or RuntimeConfig()
        if not isinstance(node_name, str) or not _NODE_NAME.match(node_name):
            raise SpecError(
                ("node_name",),
                f"invalid node name {node_name!r}: letters, digits, '.' and '-' (it becomes "
                "part of container names), at most 128 characters",
            )
        try:
            ipaddress.ip_address(advertise_address)
        except ValueError as exc:
            raise SpecError(
                ("advertise_address",), f"expected an IP address, got {advertise_address!r}"
            ) from exc

        def make(timeout: float | None, pool: int) -> Any:
            if cfg.docker_host is not None:
                return docker.DockerClient(
                    base_url=cfg.docker_host, timeout=timeout, max_pool_size=pool
                )
            return docker.from_env(timeout=timeout, max_pool_size=pool)

        def open_clients() -> tuple[Any, Any]:
            client = make(cfg.request_timeout_s, cfg.thread_limit)
            try:
                client.api.ping()
                stream_client = make(None, cfg.stream_limit)
            except BaseException:
                client.close()
                raise
            return client, stream_client

        client, stream_client = await trio.to_thread.run_sync(
            functools.partial(_guarded, "connecting to the Docker engine", open_clients)
        )
        return cls(node_name, advertise_address, client, stream_client, cfg)

    async def aclose(self) -> None:
        def close() -> None:
            for client in (self._client, self._stream_client):
                with contextlib.suppress(*_ENGINE_ERRORS):
                    client.close()

        await trio.to_thread.run_sync(close)

    async def __aenter__(self) -> DockerRuntime:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- plumbing

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(
            functools.partial(_guarded, what, fn), limiter=self._limiter
        )

    async def run_engine(self, fn: Callable[[Any], T], what: str = "engine request") -> T:
        """Run ``fn(docker_client)`` on a worker thread, translating engine errors.

        The escape hatch for whole-engine jobs such as building images (node/images.py).
        """
        self._inspected.clear()  # whatever fn does, listings must not trust old inspections
        return await self._run(what, lambda: fn(self._client))

    def _owned(self, container_id: str) -> dict[str, Any]:
        """Inspect a container and check it is ours (in a worker thread)."""
        inspected: dict[str, Any] = self._client.api.inspect_container(container_id)
        labels = (inspected.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_NODE) != self.node_name:
            raise NotOwned(
                f"container {container_id[:12]} does not belong to node {self.node_name!r}: "
                "not touched"
            )
        return inspected

    def container_name(self, request: ContainerRequest) -> str:
        if request.name is not None:
            return request.name
        return (
            f"p2porch_{self.node_name}_{request.namespace}_{request.replica}_g{request.generation}"
        )

    def volume_name(self, namespace: str, volume: str) -> str:
        """Named volumes are node-local: one engine volume per node, namespace and name."""
        return f"p2porch_{self.node_name}_{namespace}_{volume}"

    # -- queries

    async def ping(self) -> bool:
        """True when the engine answers; EngineUnavailable otherwise."""
        return bool(await self._run("pinging the Docker engine", self._client.api.ping))

    async def list_owned(self) -> list[ContainerInfo]:
        """Every container (running or not) labelled with this node, and nothing else."""

        def list_them() -> list[ContainerInfo]:
            api = self._client.api
            summaries = api.containers(
                all=True, filters={"label": [f"{LABEL_NODE}={self.node_name}"]}
            )
            out = []
            listed = set()
            for summary in summaries:
                container_id = str(summary["Id"])
                listed.add(container_id)
                state = ContainerState.parse(summary.get("State"))
                cached = self._inspected.get(container_id)
                if cached is not None and cached[0] is state:
                    info = cached[1]
                else:
                    try:
                        inspected = api.inspect_container(container_id)
                    except docker.errors.NotFound:
                        continue  # removed between the list and the inspect
                    info = container_info(inspected)
                    self._inspected[container_id] = (state, info)
                # The engine filtered already; checking again costs nothing and keeps the
                # ownership rule local to this module.
                if dict(info.labels).get(LABEL_NODE) == self.node_name:
                    out.append(info)
            for gone in set(self._inspected) - listed:
                self._inspected.pop(gone, None)
            return out

        return await self._run("listing containers", list_them)

    async def inspect(self, container_id: str) -> ContainerInfo:
        return await self._run(
            f"inspecting container {container_id[:12]}",
            lambda: container_info(self._owned(container_id)),
        )

    async def has_image(self, ref: str) -> bool:
        def check() -> bool:
            try:
                self._client.api.inspect_image(ref)
            except docker.errors.ImageNotFound:
                return False
            except docker.errors.NotFound:
                return False
            return True

        return await self._run(f"looking up image {ref}", check)

    # -- lifecycle

    async def create_and_start(self, request: ContainerRequest) -> ContainerInfo:
        """Create and start one replica; on a failed start the container is removed again.

        Raises ImageUnavailable (image not local: call ``ensure_image`` first),
        ContainerConflict (name taken), EngineRefused (bad mount, port taken, ...).
        """
        name = self.container_name(request)

        def create() -> ContainerInfo:
            api = self._client.api
            for mount in request.volumes:
                if isinstance(mount, VolumeMount):
                    api.create_volume(
                        name=self.volume_name(request.namespace, mount.name),
                        labels={
                            LABEL_NODE: self.node_name,
                            LABEL_NAMESPACE: request.namespace,
                        },
                    )
            try:
                created = api.create_container(**self._create_kwargs(request, name))
            except docker.errors.ImageNotFound as exc:
                raise ImageUnavailable(
                    request.image, "not present on this node (ensure_image pulls it first)"
                ) from exc
            container_id = created["Id"]
            try:
                api.start(container_id)
            except _ENGINE_ERRORS as exc:
                # If this fails too, the reconciler's sweep removes the leftover later.
                with contextlib.suppress(*_ENGINE_ERRORS):
                    api.remove_container(container_id, force=True)
                raise translate_error(exc, f"starting replica {request.replica}") from exc
            return container_info(api.inspect_container(container_id))

        return await self._run(f"creating replica {request.replica}", create)

    def _dns_kwargs(self, request: ContainerRequest) -> dict[str, Any]:
        """The node's resolver, searching the replica's namespace first (``web`` resolves
        within it, ``web.shop`` reaches namespace shop)."""
        if not self.dns_servers:
            return {}
        search = [f"{request.namespace}.{self.dns_domain}", self.dns_domain]
        return {"dns": list(self.dns_servers), "dns_search": search}

    def _create_kwargs(self, request: ContainerRequest, name: str) -> dict[str, Any]:
        api = self._client.api
        port_bindings: dict[str, tuple[str, ...] | tuple[str, int]] = {}
        exposed: list[int | tuple[int, str]] = []
        for port in request.ports:
            key = f"{port.container_port}/{port.protocol.value}"
            if port.host_port is None:
                port_bindings[key] = (self.advertise_address,)
            else:
                port_bindings[key] = (self.advertise_address, port.host_port)
            exposed.append(
                port.container_port
                if port.protocol is Protocol.TCP
                else (port.container_port, port.protocol.value)
            )
        mounts = []
        for mount in request.volumes:
            if isinstance(mount, BindMount):
                mounts.append(
                    docker.types.Mount(
                        target=mount.container_path,
                        source=mount.host_path,
                        type="bind",
                        read_only=mount.read_only,
                    )
                )
            else:
                mounts.append(
                    docker.types.Mount(
                        target=mount.container_path,
                        source=self.volume_name(request.namespace, mount.name),
                        type="volume",
                        read_only=mount.read_only,
                    )
                )
        host_config_kwargs: dict[str, Any] = {
            "port_bindings": port_bindings,
            "mounts": mounts,
            "init": True,
            "restart_policy": {"Name": "no"},
            **self._dns_kwargs(request),
            "log_config": docker.types.LogConfig(
                type="json-file",
                config={
                    "max-size": f"{self.config.log_max_size_mb}m",
                    "max-file": str(self.config.log_max_files),
                },
            ),
        }
        if request.cpu_limit_millicores is not None:
            host_config_kwargs["nano_cpus"] = request.cpu_limit_millicores * 1_000_000
        if request.cpu_request_millicores:
            # Relative weight under contention: 1024 shares per core requested.
            host_config_kwargs["cpu_shares"] = max(2, request.cpu_request_millicores * 1024 // 1000)
        if request.memory_limit_bytes is not None:
            host_config_kwargs["mem_limit"] = request.memory_limit_bytes
            # No swap on top: the limit is the limit, and exceeding it is an OOM kill.
            host_config_kwargs["memswap_limit"] = request.memory_limit_bytes
        if request.memory_request_bytes and (
            request.memory_limit_bytes is None
            or request.memory_request_bytes < request.memory_limit_bytes
        ):
            host_config_kwargs["mem_reservation"] = request.memory_request_bytes
        host_config = api.create_host_config(**host_config_kwargs)

        ours = {
            ENV_REPLICA: request.replica,
            ENV_APP: request.app,
            ENV_NAMESPACE: request.namespace,
            ENV_NODE: self.node_name,
            ENV_GENERATION: str(request.generation),
        }
        environment = [f"{k}={v}" for k, v in request.env if k not in ours]
        environment += [f"{k}={v}" for k, v in ours.items()]
        labels = {k: v for k, v in request.labels if not k.startswith(LABEL_PREFIX)}
        labels.update(
            {
                LABEL_NODE: self.node_name,
                LABEL_APP: request.app,
                LABEL_NAMESPACE: request.namespace,
                LABEL_REPLICA: request.replica,
                LABEL_GENERATION: str(request.generation),
            }
        )
        kwargs: dict[str, Any] = {
            "image": request.image,
            "name": name,
            "hostname": request.replica,
            "environment": environment,
            "labels": labels,
            "ports": exposed,
            "host_config": host_config,
            "stop_timeout": request.stop_grace_s,
            "healthcheck": request.health.to_engine() if request.health else None,
            "detach": True,
        }
        if request.command:
            kwargs["entrypoint"] = list(request.command)
            kwargs["command"] = list(request.args)
        elif request.args:
            kwargs["command"] = list(request.args)
        return kwargs

    async def stop(self, container_id: str, timeout_s: int | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` (default: the container's grace period)."""

        def stop() -> None:
            inspected = self._owned(container_id)
            grace = timeout_s
            if grace is None:
                grace = _int_or_none((inspected.get("Config") or {}).get("StopTimeout"))
            # Always explicit: the SDK then waits grace + request timeout for the answer,
            # so a long grace period is not mistaken for an engine that does not answer.
            self._client.api.stop(container_id, timeout=10 if grace is None else grace)

        self.forget(container_id)
        await self._run(f"stopping container {container_id[:12]}", stop)

    async def remove(self, container_id: str, *, missing_ok: bool = False) -> None:
        """Force-remove a container of ours (killing it if running); keeps named volumes."""

        def remove() -> None:
            try:
                self._owned(container_id)
                self._client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                if not missing_ok:
                    raise

        self.forget(container_id)
        await self._run(f"removing container {container_id[:12]}", remove)

    async def exec(self, container_id: str, cmd: list[str] | tuple[str, ...]) -> tuple[int, bytes]:
        """Run a command inside a running container of ours: (exit code, stdout+stderr)."""

        def run() -> tuple[int, bytes]:
            self._owned(container_id)
            api = self._client.api
            exec_id = api.exec_create(container_id, list(cmd), stdout=True, stderr=True)["Id"]
            output = api.exec_start(exec_id)
            code = api.exec_inspect(exec_id).get("ExitCode")
            return (code if isinstance(code, int) else -1), bytes(output or b"")

        return await self._run(f"exec in container {container_id[:12]}", run)

    async def exec_probe(
        self, container_id: str, cmd: list[str] | tuple[str, ...], timeout_s: float
    ) -> tuple[int | None, bytes]:
        """Run a health-check command in a running container of ours, for ``timeout_s`` at most.

        Returns (exit code, output) -- or (None, output so far) when the command did not end
        in time. Unlike :meth:`exec`, the wait is bounded: a timer shuts the output stream at
        the deadline, so a hung command holds a worker thread for ``timeout_s``, not for the
        request timeout. The command itself keeps running inside the container (the engine
        cannot stop an exec; Kubernetes' docker runtime had the same limit).
        """

        def run() -> tuple[int | None, bytes]:
            self._owned(container_id)
            api = self._client.api
            exec_id = api.exec_create(container_id, list(cmd), stdout=True, stderr=True)["Id"]
            # The command's own time is what is bounded (a slow engine is not the app's fault).
            deadline = time.monotonic() + timeout_s
            stream = api.exec_start(exec_id, stream=True)
            expired = threading.Event()

            def expire() -> None:
                expired.set()
                with contextlib.suppress(Exception):  # closing a dead socket; closed either way
                    stream.close()

            timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
            timer.daemon = True
            timer.start()
            output = bytearray()
            try:
                for chunk in stream:
                    if isinstance(chunk, bytes) and len(output) < _EXEC_PROBE_OUTPUT_BYTES:
                        output += chunk[: _EXEC_PROBE_OUTPUT_BYTES - len(output)]
            except _ENGINE_ERRORS:
                if not expired.is_set():
                    raise
            finally:
                timer.cancel()
                with contextlib.suppress(Exception):
                    stream.close()
            if expired.is_set():
                return None, bytes(output)
            # The stream ends with the process; the engine may record the exit a moment later.
            pause = 0.005
            while True:
                info = api.exec_inspect(exec_id)
                if not info.get("Running") or time.monotonic() >= deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            code = info.get("ExitCode")
            if info.get("Running"):
                return None, bytes(output)
            return (code if isinstance(code, int) else -1), bytes(output)

        return await self._run(f"probe exec in container {container_id[:12]}", run)

    async def list_owned_volumes(self) -> list[str]:
        """Names of the engine volumes this node created for named volume mounts."""

        def list_them() -> list[str]:
            answer = self._client.api.volumes(filters={"label": f"{LABEL_NODE}={self.node_name}"})
            return sorted(str(v["Name"]) for v in (answer or {}).get("Volumes") or [])

        return await self._run("listing volumes", list_them)

    async def remove_volume(self, name: str, *, missing_ok: bool = True) -> None:
        """Remove one of this node's volumes (ContainerConflict while a container uses it)."""

        def remove() -> None:
            try:
                volume = self._client.api.inspect_volume(name)
                if (volume.get("Labels") or {}).get(LABEL_NODE) != self.node_name:
                    raise NotOwned(f"volume {name!r} does not belong to node {self.node_name!r}")
                self._client.api.remove_volume(name)
            except docker.errors.NotFound:
                if not missing_ok:
                    raise

        await self._run(f"removing volume {name}", remove)

    # -- streams

    def events(self) -> EventStream:
        """This node's container events (start, die, oom, destroy, health_status)."""

        def open_stream() -> Any:
            return self._stream_client.api.events(
                decode=True,
                filters={
                    "type": ["container"],
                    "label": [f"{LABEL_NODE}={self.node_name}"],
                    "event": [kind.value for kind in EventKind],
                },
            )

        return EventStream(
            _ThreadStream(open_stream, self._stream_limiter, "container events"), self.forget
        )

    def forget(self, container_id: str) -> None:
        """Drop what listings remember of a container (it changed, or may have)."""
        self._inspected.pop(container_id, None)

    def logs(
        self, container_id: str, *, follow: bool = False, tail: int | None = None
    ) -> LogStream:
        """Log lines of a container of ours (``tail``: only the last N lines)."""

        def open_stream() -> Any:
            self._owned(container_id)
            return self._stream_client.api.logs(
                container_id,
                stream=True,
                follow=follow,
                stdout=True,
                stderr=True,
                tail="all" if tail is None else tail,
            )

        return LogStream(
            _ThreadStream(open_stream, self._stream_limiter, f"logs of {container_id[:12]}")
        )

    # -- images

    async def ensure_image(
        self, ref: str, progress: Callable[[PullProgress], None] | None = None
    ) -> str:
        """Return the local image id of ``ref``, pulling it first if missing.

        ``progress`` is called in the trio thread with each pull status. Raises
        ImageUnavailable with the engine's reason when the image cannot be had.
        """
        if not ref or any(ch.isspace() for ch in ref):
            raise ImageUnavailable(ref, "not a valid image reference")

        def local_id() -> str | None:
            try:
                image = self._client.api.inspect_image(ref)
            except docker.errors.NotFound:
                return None
            return str(image["Id"])

        found = await self._run(f"looking up image {ref}", local_id)
        if found is not None:
            return found

        def report(item: Mapping[str, Any]) -> None:
            if progress is None:
                return
            detail = item.get("progressDetail") or {}
            update = PullProgress(
                ref=ref,
                status=str(item.get("status", "")),
                layer=str(item["id"]) if "id" in item else None,
                current_bytes=_int_or_none(detail.get("current")),
                total_bytes=_int_or_none(detail.get("total")),
            )
            trio.from_thread.run_sync(progress, update)

        def pull() -> None:
            try:
                for item in self._stream_client.api.pull(ref, stream=True, decode=True):
                    if not isinstance(item, Mapping):
                        continue
                    if item.get("error"):
                        raise ImageUnavailable(ref, str(item["error"]))
                    report(item)
            except docker.errors.APIError as exc:
                raise ImageUnavailable(ref, _explanation(exc)) from exc

        await trio.to_thread.run_sync(
            functools.partial(_guarded, f"pulling image {ref}", pull),
            limiter=self._stream_limiter,
        )
        found = await self._run(f"looking up image {ref}", local_id)
        if found is None:
            raise ImageUnavailable(ref, "the pull finished but the image is not present")
        return found
