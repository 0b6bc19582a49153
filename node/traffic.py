"""The node's data plane: endpoint exchange, service DNS, the routing mesh and the ingress.

Endpoint exchange (node/endpoints.py has the why): this node publishes its own record each
time its reconciler's statuses or endpoints change -- into its own table at once, and as a
new stamp in its gossip metadata. A peer whose metadata shows a stamp newer than the table
holds is asked for its record (``GET /v1/internal/endpoints``, node certificates only). A
member gossip declares dead or left is dropped from the table at once, so the mesh and the
ingress stop choosing its replicas the moment its death is known. An anti-entropy pass
every few seconds repairs anything a lost fetch or a dropped event missed.

The services read the table on every connection or query; what they serve (published ports,
ingress routes, app names) follows the replicated state. Each can be turned off (port 0)
and none stops the node when its port cannot be bound: the failure is in ``status()``.

The leader's rollout controller gets its view of replica health from here too
(:meth:`Traffic.slot_health`): the owner's statuses, with how long the leader has seen each
replica ready measured on the leader's own clock.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.gossip.messages import Event, EventKind, Member
from p2porch.node.endpoints import EndpointSync, EndpointTable, FetchRequest, NodeEndpoints
from p2porch.node.errors import NodeError
from p2porch.node.reconcile_core import ReplicaState, ReplicaStatus
from p2porch.node.rollout import SlotHealth
from p2porch.node.scheduler import SlotId
from p2porch.node.spec import Protocol

if TYPE_CHECKING:
    from p2porch.node.daemon import Agent

log = logging.getLogger("p2porch.traffic")

ENDPOINTS_PATH = "/v1/internal/endpoints"
ENDPOINTS_CONTENT_TYPE = "application/x-p2porch-codec"
# Anti-entropy: compare every live member's gossiped stamp with the table this often.
ANTI_ENTROPY_S = 5.0
FETCH_TIMEOUT_S = 3.0
FETCH_RETRY_S = 1.0
PUBLISH_COALESCE_S = 0.05
# A data-plane service whose port could not be bound tries again this often.
SERVICE_RETRY_S = 5.0
MAX_RECORD_BYTES = 8 << 20

_GONE = (EventKind.DEAD, EventKind.LEFT, EventKind.REAPED)


def _reachable_from_containers(address: str) -> bool:
    """A container's loopback is its own: only a non-loopback node address reaches the host."""
    try:
        return not ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _host_resolvers(path: str = "/etc/resolv.conf") -> tuple[tuple[str, int], ...]:
    """The host's nameservers (IP literals only, loopback stubs excluded: a container
    forwarding through us must not reach the host's 127.0.0.53)."""
    out: list[tuple[str, int]] = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ()
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ip = ipaddress.ip_address(parts[1].split("%", 1)[0])
            except ValueError:
                continue
            if not ip.is_loopback:
                out.append((str(ip), 53))
    return tuple(out[:3])


def _decode_record(resp: httpx.Response) -> NodeEndpoints:
    if resp.status_code != 200 or len(resp.content) > MAX_RECORD_BYTES:
        raise ValueError(f"HTTP {resp.status_code}, {len(resp.content)} bytes")
    record: NodeEndpoints = codec.decode(resp.content, NodeEndpoints)
    return record


RunKey = tuple[str, str, int, str, int, str]


def _run_key(status: ReplicaStatus) -> RunKey:
    """One container of one slot at one revision on one node: what "ready since" is about."""
    return (
        status.namespace,
        status.app,
        status.slot,
        status.node,
        status.generation,
        status.container_id,
    )


def slot_failure(status: ReplicaStatus) -> str:
    """Why a replica counts as failed for a rollout ("" when it does not)."""
    if status.terminal:
        return status.reason or status.state.value
    if status.state is ReplicaState.FAILED:
        return status.reason or "process ended"
    if status.restarts > 0:
        last = f" (last: {status.last_termination})" if status.last_termination else ""
        return f"restarted {status.restarts} time(s){last}"
    return ""


class Traffic:
    """Owns the endpoint table and the data-plane services of one agent."""

    def __init__(self, agent: Agent, *, clock: Callable[[], float] = trio.current_time) -> None:
        self.agent = agent
        self.node = agent.name
        self.table = EndpointTable(self.node)
        self._clock = clock
        # Our record's stamp: the epoch makes a restarted node's versions newer than its last.
        self._epoch = time.time_ns()
        self._version = 0
        self.sync = EndpointSync(self.table)
        self._fetch_wake = trio.Event()
        self._ready_since: dict[RunKey, float] = {}
        self.table.on_change(self._table_changed)
        self._listeners: list[Callable[[], None]] = []
        self.published = 0
        self.status_errors: dict[str, str] = {}
        self.mesh: Any = None
        self.ingress: Any = None
        self.dns: Any = None

    # ---- our own record

    def stamp(self) -> tuple[int, int]:
        return (self._epoch, self._version)

    def publish_local(self) -> None:
        """Put this node's current endpoints and statuses in the table and announce them."""
        reconciler = self.agent.reconciler
        endpoints = tuple(reconciler.endpoints()) if reconciler is not None else ()
        statuses = tuple(reconciler.statuses()) if reconciler is not None else ()
        record = self.table.record(self.node)
        if record is not None and (record.endpoints, record.replicas) == (endpoints, statuses):
            return
        self._version += 1
        self.table.update(NodeEndpoints(self.node, self._epoch, self._version, endpoints, statuses))
        self.published += 1
        self.agent.announce_endpoints(self.stamp())

    def local_record(self) -> bytes:
        """Our record, encoded, as ``GET /v1/internal/endpoints`` serves it."""
        record = self.table.record(self.node) or NodeEndpoints(
            self.node, self._epoch, self._version
        )
        return codec.encode(record)

    async def follow_reconciler(self) -> None:
        """Publish our record on every change of the reconciler's statuses or endpoints."""
        self.publish_local()
        reconciler = self.agent.reconciler
        if reconciler is None:
            return
        seen = 0
        while True:
            seen = await reconciler.wait_statuses_changed(seen)
            # A burst (50 replicas starting) changes statuses hundreds of times a second;
            # each record is re-encoded and fetched by every peer. Coalescing into one
            # record per PUBLISH_COALESCE_S costs that much endpoint delay, no more.
            await trio.sleep(PUBLISH_COALESCE_S)
            self.publish_local()

    # ---- peers' records (decisions: EndpointSync in node/endpoints.py; here only I/O)

    def on_gossip_event(self, event: Event) -> None:
        member = event.member
        state = "dead" if event.kind in _GONE else member.state.name.lower()
        self.sync.member(member.name, state, *self._meta_of(member))
        self._fetch_wake.set()

    def _meta_of(self, member: Member) -> tuple[tuple[int, int] | None, str | None]:
        """(endpoint stamp, API address) from a member's gossip metadata; the address falls
        back to the log's node record."""
        meta = self.agent.decode_meta(member.meta)
        stamp = (meta.endpoints_epoch, meta.endpoints_version) if meta else None
        address = meta.api_address if meta else None
        if not address:
            node = self.agent.state.nodes.get(member.name)
            address = node.api_address if node is not None else None
        return stamp, address

    async def fetch_loop(self) -> None:
        """Start the fetches the sync core says are due; sleep until something changes."""
        async with trio.open_nursery() as nursery:
            while True:
                self._fetch_wake = trio.Event()
                now = self._clock()
                for request in self.sync.due(now):
                    nursery.start_soon(self._fetch, request)
                due = self.sync.next_due(now)
                with trio.move_on_at(due if due is not None else math.inf):
                    await self._fetch_wake.wait()

    async def _fetch(self, request: FetchRequest) -> None:
        record: NodeEndpoints | None = None
        http = self.agent.http
        try:
            if http is None:
                return  # not serving yet: counted as a failed fetch, retried
            resp = await http.get(
                f"https://{request.address}{ENDPOINTS_PATH}", timeout=FETCH_TIMEOUT_S
            )
            record = _decode_record(resp)
            if record.node != request.node:
                log.warning(
                    "node %s answered with the endpoints of %r: refused", request.node, record.node
                )
        except (httpx.HTTPError, ValueError, CodecError) as exc:
            log.debug("fetching endpoints of %s: %s", request.node, exc)
        finally:
            self.sync.fetched(request.node, record, self._clock(), FETCH_RETRY_S)
            self._fetch_wake.set()

    async def anti_entropy(self) -> None:
        """Every few seconds: fetch what gossip shows newer, drop members gossip lost."""
        while True:
            await trio.sleep(ANTI_ENTROPY_S)
            self.resync()

    def resync(self) -> None:
        gossip = self.agent.gossip
        if gossip is None:
            return
        self.sync.resync(
            (member.name, member.state.name.lower(), *self._meta_of(member))
            for member in gossip.members()
        )
        self._fetch_wake.set()

    # ---- the leader's view

    def _table_changed(self) -> None:
        now = self._clock()
        seen: set[RunKey] = set()
        for status in self.table.replicas():
            if status.ready:
                key = _run_key(status)
                seen.add(key)
                self._ready_since.setdefault(key, now)
        for key in [k for k in self._ready_since if k not in seen]:
            del self._ready_since[key]
        for listener in list(self._listeners):
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def slot_health(self) -> dict[SlotId, SlotHealth]:
        """Per slot, what its owner says (the newest revision when two nodes report one)."""
        now = self._clock()
        out: dict[SlotId, SlotHealth] = {}
        placements = self.agent.state.placements
        for status in self.table.replicas():
            slot = SlotId(f"{status.namespace}/{status.app}", status.slot)
            placement = placements.get(slot)
            if placement is not None and placement.node != status.node:
                continue  # a stale report from the node the slot left
            key = _run_key(status)
            since = self._ready_since.get(key)
            out[slot] = SlotHealth(
                node=status.node,
                revision=status.generation,
                ready=status.ready,
                ready_for_s=0.0 if since is None else now - since,
                failure=slot_failure(status),
            )
        return out

    # ---- services

    def routes_changed(self) -> None:
        """Hand the services what the replicated state says they serve."""
        apps = list(self.agent.state.apps.values())
        if self.mesh is not None:
            from p2porch.node.mesh import MeshRoute

            routes: dict[int, MeshRoute] = {}
            for app in sorted(apps, key=lambda a: a.key):
                for port in app.spec.ports:
                    if port.published_port is None or port.protocol is not Protocol.TCP:
                        continue
                    # The state refuses a second app on a published port; were one to slip
                    # through (an older log), the first app in key order keeps the port.
                    routes.setdefault(
                        port.published_port,
                        MeshRoute(
                            namespace=app.meta.namespace,
                            app=app.meta.name,
                            published_port=port.published_port,
                            container_port=port.container_port,
                            proxy_protocol=port.proxy_protocol,
                            strategy=app.spec.balance,
                        ),
                    )
            self.mesh.set_routes(routes.values())
        if self.ingress is not None:
            from p2porch.node.ingress import IngressRule

            self.ingress.set_rules(
                IngressRule(
                    host=route.host,
                    path=route.path,
                    namespace=app.meta.namespace,
                    app=app.meta.name,
                    container_port=route.port,
                    strategy=app.spec.balance,
                )
                for app in apps
                for route in app.spec.ingress
            )
        if self.dns is not None:
            self.dns.set_apps((app.meta.namespace, app.meta.name) for app in apps)

    async def run_services(self, nursery: trio.Nursery) -> None:
        """Start the mesh, the ingress and DNS (those whose port is not 0)."""
        opts = self.agent.options
        host = opts.advertise
        from p2porch.node.mesh import Mesh, MeshConfig

        self.mesh = Mesh(self.table, host, MeshConfig(), self.node)
        await nursery.start(self.mesh.run)
        if opts.ingress_port:
            from p2porch.node.ingress import Ingress, IngressConfig

            def make_ingress() -> Any:
                return Ingress(self.table, host, opts.ingress_port, IngressConfig(), self.node)

            await self._start_service(nursery, make_ingress, "ingress", opts.ingress_port)
        if opts.dns_port:
            from p2porch.node.dns import DnsConfig, DnsServer

            reachable = _reachable_from_containers(host) and opts.dns_port == 53
            # Names outside the cluster go to the host's resolvers, so containers that use
            # this server still resolve the world; a loopback-only node (tests) forwards
            # nothing (no container can reach it anyway).
            upstreams = _host_resolvers() if reachable else ()
            config = DnsConfig(domain=opts.dns_domain, upstreams=upstreams)

            def make_dns() -> Any:
                return DnsServer(self.table, host, opts.dns_port, config)

            await self._start_service(nursery, make_dns, "dns", opts.dns_port)
            reconciler = self.agent.reconciler
            if reachable and reconciler is not None:
                # Containers started from now on resolve through this node (if the server
                # could not bind yet, it keeps trying; lookups fail until it can).
                reconciler.runtime.dns_servers = (host,)
                reconciler.runtime.dns_domain = config.domain
        self.routes_changed()

    async def _start_service(
        self, nursery: trio.Nursery, make: Callable[[], Any], what: str, port: int
    ) -> None:
        """Start a service; if its port cannot be bound (taken, or below 1024 without the
        right), the node runs without it, says so in /v1/status, and retries every few
        seconds in the background: a taken port 80 must not stop the orchestrator."""
        if await self._try_start(nursery, make, what, port):
            return

        async def keep_trying() -> None:
            while not await self._try_start(nursery, make, what, port):
                await trio.sleep(SERVICE_RETRY_S)

        nursery.start_soon(keep_trying)

    async def _try_start(
        self, nursery: trio.Nursery, make: Callable[[], Any], what: str, port: int
    ) -> bool:
        service = make()
        try:
            await nursery.start(service.run)
        except (OSError, NodeError) as exc:
            error = f"cannot listen on port {port}: {getattr(exc, 'strerror', None) or exc}"
            if self.status_errors.get(what) != error:
                log.warning("%s on %s: %s", what, self.agent.options.advertise, error)
            self.status_errors[what] = error
            return False
        setattr(self, what, service)
        if self.status_errors.pop(what, None) is not None:
            log.info("%s now listening on %s:%d", what, self.agent.options.advertise, port)
        self.routes_changed()
        return True

    def status(self) -> dict[str, Any]:
        """What /v1/status shows of the data plane."""
        out: dict[str, Any] = {
            "endpoints": {
                "stamp": list(self.stamp()),
                "nodes": self.table.nodes(),
                "published": self.published,
                **self.sync.counters,
            }
        }
        for what in ("mesh", "ingress", "dns"):
            service = getattr(self, what)
            if service is not None:
                out[what] = service.status()
            elif what in self.status_errors:
                out[what] = {"error": self.status_errors[what]}
        return out
