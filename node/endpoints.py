"""Endpoints: where each app's ready replicas can be reached, as every node knows it.

The data plane (service DNS, the routing mesh, the HTTP ingress) and the leader's rollout
controller all ask one question: which replicas of ``namespace/app`` take traffic right now,
and at which host address and port? Each node answers it for its own replicas (its
reconciler knows which containers run and what their probes say) and publishes the answer as
a :class:`NodeEndpoints` record with a version. Gossip carries only that version in the
node's metadata (a member's metadata is capped at a few hundred bytes, far less than a busy
node's list); a peer that sees a newer version fetches the record from the node's API. So a
readiness change reaches every node in one gossip dissemination plus one request, and a
dead node's endpoints go the moment gossip declares it dead or left.

:class:`EndpointTable` is the pure merge of those records (no I/O, no clock): the daemon
feeds it and the data plane reads it. Its ``version`` bumps on every change that alters
what a reader would see, so watchers can wait for "anything newer than what I saw".
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from p2porch.common import codec
from p2porch.node.spec import Protocol
from p2porch.node.state import ReplicaFact

# Replica statuses live here (the reconciler's planner makes them, re-exported there) so the
# endpoint record can carry them without an import cycle.


class ReplicaState(enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


@codec.register(300)
@attrs.frozen
class ReplicaStatus:
    """What this node says about one replica assigned to it (gossiped; the API shows it).

    ``terminal`` marks a fact that will not change by itself: the replica cannot start (image
    unavailable, invalid mount, port taken) or its process ended and the restart policy says
    no more. The daemon logs those as ``ReportReplica``; everything else is volatile.
    ``published_ports`` pairs ``"8080"`` (or ``"53/udp"``) with ``"host:port"``.

    ``probes_ready`` is the probes' say (the startup probe passed and the readiness probe
    passes; True for an app with neither), so ``ready`` -- running and ``probes_ready`` -- is
    what traffic and rollouts go by. ``last_termination`` is why the replica's previous run
    ended (``exit 3``, ``OOMKilled``, ``liveness probe failed ...``), kept after a restart.
    """

    name: str
    namespace: str
    app: str
    slot: int
    node: str
    generation: int
    state: ReplicaState
    restarts: int = 0
    exit_code: int | None = None
    oom_killed: bool = False
    reason: str = ""
    container_id: str = ""
    published_ports: tuple[tuple[str, str], ...] = ()
    terminal: bool = False
    # Appended fields (the codec's rule): a peer without them decodes the defaults.
    probes_ready: bool = True
    last_termination: str = ""

    @property
    def ready(self) -> bool:
        """Running, and its probes say it may take traffic."""
        return self.state is ReplicaState.RUNNING and self.probes_ready

    def to_json(self) -> dict[str, Any]:
        """The replica object of docs/api.md (``GET /v1/replicas``)."""
        return {
            "name": self.name,
            "app": self.app,
            "namespace": self.namespace,
            "node": self.node,
            "slot": self.slot,
            "generation": self.generation,
            "state": self.state.value,
            "ready": self.ready,
            "restarts": self.restarts,
            "exitCode": self.exit_code,
            "oomKilled": self.oom_killed,
            "reason": self.reason,
            "containerId": self.container_id,
            "publishedPorts": dict(self.published_ports),
            "terminal": self.terminal,
            "lastTermination": self.last_termination,
        }

    def to_fact(self, placement_generation: int) -> ReplicaFact | None:
        """The ``ReportReplica`` fact for a terminal status (None when not terminal).

        The state machine accepts a fact only for the placement's own generation, so the
        caller passes that (it can lag the app's generation: see the reconciler's notes).
        """
        if not self.terminal:
            return None
        state = "succeeded" if self.state is ReplicaState.SUCCEEDED else "failed"
        return ReplicaFact(
            namespace=self.namespace,
            app=self.app,
            slot=self.slot,
            node=self.node,
            generation=placement_generation,
            state=state,
            reason=self.reason,
        )


@codec.register(301)
@attrs.frozen
class EndpointPort:
    """One of a replica's container ports and where the node publishes it."""

    container_port: int
    host: str
    host_port: int
    protocol: Protocol = Protocol.TCP


@codec.register(302)
@attrs.frozen
class Endpoint:
    """One replica that may receive traffic (or, ``ready`` False, one that may not yet).

    ``revision`` is the app template the replica runs (the placement's generation); during a
    start-first rolling update a slot can have two endpoints, the old revision's and the new.
    """

    namespace: str
    app: str
    slot: int
    replica: str
    node: str
    revision: int
    container_id: str
    ports: tuple[EndpointPort, ...]
    ready: bool

    def address(
        self, container_port: int, protocol: Protocol = Protocol.TCP
    ) -> tuple[str, int] | None:
        """(host, host_port) where ``container_port`` is published, None when it is not."""
        for port in self.ports:
            if port.container_port == container_port and port.protocol is protocol:
                return (port.host, port.host_port)
        return None


@codec.register(303)
@attrs.frozen
class NodeEndpoints:
    """A node's endpoints and replica statuses; ``version`` only grows (per node, per run).

    ``epoch`` is the node's start time in nanoseconds: a restarted node starts its versions
    again from 1, and the pair (epoch, version) still orders its records.
    """

    node: str
    epoch: int
    version: int
    endpoints: tuple[Endpoint, ...] = ()
    replicas: tuple[ReplicaStatus, ...] = ()

    @property
    def stamp(self) -> tuple[int, int]:
        return (self.epoch, self.version)


class EndpointTable:
    """Every node's latest :class:`NodeEndpoints`, merged; read by the data plane."""

    def __init__(self, local_node: str) -> None:
        self.local_node = local_node
        self.version = 0
        self._records: dict[str, NodeEndpoints] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (synchronously, after the change) whenever ``version`` bumps."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self._listeners):
            listener()

    # ---- writes (the daemon)

    def update(self, record: NodeEndpoints) -> bool:
        """Take ``record`` unless an equal or newer one from that node is already held."""
        old = self._records.get(record.node)
        if old is not None and old.stamp >= record.stamp:
            return False
        self._records[record.node] = record
        if old is None or old.endpoints != record.endpoints or old.replicas != record.replicas:
            self._changed()
        return True

    def drop_node(self, node: str) -> bool:
        """Forget a node's endpoints (it died, left or was removed); True if it had any."""
        if self._records.pop(node, None) is None:
            return False
        self._changed()
        return True

    def retain(self, nodes: Iterable[str]) -> None:
        """Drop every node not in ``nodes``."""
        keep = set(nodes)
        for node in [n for n in self._records if n not in keep]:
            self.drop_node(node)

    # ---- reads (data plane, leader)

    def stamp(self, node: str) -> tuple[int, int] | None:
        record = self._records.get(node)
        return None if record is None else record.stamp

    def nodes(self) -> list[str]:
        return sorted(self._records)

    def record(self, node: str) -> NodeEndpoints | None:
        return self._records.get(node)

    def endpoints(self, namespace: str, app: str, *, ready_only: bool = True) -> list[Endpoint]:
        """The app's endpoints, local node first, then by node and replica name."""
        out = [
            ep
            for record in self._records.values()
            for ep in record.endpoints
            if ep.namespace == namespace and ep.app == app and (ep.ready or not ready_only)
        ]
        out.sort(key=lambda ep: (ep.node != self.local_node, ep.node, ep.replica, ep.revision))
        return out

    def replicas(self) -> list[ReplicaStatus]:
        """Every node's replica statuses (the owner's word), by name."""
        out = [status for record in self._records.values() for status in record.replicas]
        out.sort(key=lambda s: (s.namespace, s.name, s.node))
        return out


# --------------------------------------------------------------------------- exchange core

ALIVE_STATES = frozenset({"alive", "suspect"})
GONE_STATES = frozenset({"dead", "left"})


@attrs.frozen
class FetchRequest:
    """Ask ``node`` (its API at ``address``) for its record; gossip announced ``stamp``."""

    node: str
    address: str
    stamp: tuple[int, int]


class EndpointSync:
    """The endpoint exchange's decisions, without I/O (node/traffic.py is the shell).

    Inputs: what gossip says of each member (state, the stamp in its metadata, its API
    address), full views (resyncs), and fetch outcomes, each with the current time. Output:
    the fetches to start now. Rules:

    * a member gossip calls dead or left is dropped from the table at once, and a record
      fetched from it afterwards (a request that was in flight) is discarded, until gossip
      shows it alive again (a restart comes back with a newer epoch);
    * a stamp newer than the table holds is wanted; one fetch per node at a time; a failed
      fetch waits ``retry_s`` before the next try; a record that names another node is refused;
    * the table only moves forward (EndpointTable.update ignores older stamps), so a slow
      answer cannot undo a newer one.
    """

    def __init__(self, table: EndpointTable) -> None:
        self.table = table
        self.local_node = table.local_node
        self._wanted: dict[str, tuple[int, int]] = {}
        self._address: dict[str, str] = {}
        self._gone: set[str] = set()
        self._in_flight: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self.counters = {
            "fetches": 0,
            "fetch_failures": 0,
            "records_refused": 0,
            "nodes_dropped": 0,
            "late_records_discarded": 0,
        }

    def member(
        self,
        name: str,
        state: str,
        stamp: tuple[int, int] | None,
        address: str | None,
    ) -> None:
        """What gossip says about ``name`` now (an event, or one entry of a full view)."""
        if name == self.local_node:
            return
        if state in GONE_STATES:
            self._gone.add(name)
            self._wanted.pop(name, None)
            self._retry_at.pop(name, None)
            if self.table.drop_node(name):
                self.counters["nodes_dropped"] += 1
            return
        self._gone.discard(name)
        if address:
            self._address[name] = address
        if stamp is not None and stamp > (self.table.stamp(name) or (0, 0)):
            self._wanted[name] = max(stamp, self._wanted.get(name, stamp))

    def resync(
        self, members: Iterable[tuple[str, str, tuple[int, int] | None, str | None]]
    ) -> None:
        """A full view: apply every entry, and drop table nodes the view no longer has."""
        present = {self.local_node}
        for name, state, stamp, address in members:
            self.member(name, state, stamp, address)
            if state in ALIVE_STATES:
                present.add(name)
        for name in self.table.nodes():
            if name not in present:
                self.member(name, "dead", None, None)

    def due(self, now: float) -> list[FetchRequest]:
        """The fetches to start now (each is then in flight until :meth:`fetched`)."""
        out = []
        for name, stamp in sorted(self._wanted.items()):
            if name in self._in_flight or self._retry_at.get(name, now) > now:
                continue
            if stamp <= (self.table.stamp(name) or (0, 0)):
                del self._wanted[name]
                continue
            address = self._address.get(name)
            if address is None:
                continue  # no way to ask yet: a later event or resync brings the address
            self._in_flight.add(name)
            self.counters["fetches"] += 1
            out.append(FetchRequest(name, address, stamp))
        return out

    def next_due(self, now: float) -> float | None:
        """When a waiting retry becomes due (None: nothing waits on time)."""
        times = [
            self._retry_at[name]
            for name in self._wanted
            if name not in self._in_flight and self._retry_at.get(name, now) > now
        ]
        return min(times) if times else None

    def fetched(self, name: str, record: NodeEndpoints | None, now: float, retry_s: float) -> None:
        """A fetch ended: ``record`` is what the node answered (None: it failed)."""
        self._in_flight.discard(name)
        if record is None or record.node != name:
            if record is None:
                self.counters["fetch_failures"] += 1
            else:
                self.counters["records_refused"] += 1
            if name in self._wanted:
                self._retry_at[name] = now + retry_s
            return
        self._retry_at.pop(name, None)
        if name in self._gone:
            self.counters["late_records_discarded"] += 1
            return  # it died while we asked: do not bring its replicas back
        self.table.update(record)
        wanted = self._wanted.get(name)
        if wanted is not None and record.stamp >= wanted:
            del self._wanted[name]

    def wanted(self) -> dict[str, tuple[int, int]]:
        return dict(self._wanted)

    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)
