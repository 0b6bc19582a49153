"""The node daemon: one trio nursery wiring gossip, Raft, the state machine, the scheduler,
the reconciler and the API.

Every machine runs this same process (``p2porch agent``). What it does depends only on its data
directory and flags:

- empty data dir, no ``--join``: create a new cluster (Raft bootstrapped with this node as the
  only voter, a fresh join token and gossip key);
- empty data dir, ``--join PEER --token T``: ask PEER to admit it (the leader adds it as a Raft
  learner and records it), then catch up and serve;
- existing data dir: restart and rejoin through the peers it knew (``peers.json``).

Roles that move: the Raft leader runs the scheduler and the membership manager; every node
runs its reconciler and serves the API. SIGTERM leaves gossip, hands leadership over and exits
-- containers keep running (static stability: a daemon restart does not restart replicas).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from cryptography import x509

from p2porch.common import codec, pki
from p2porch.common.errors import CodecError
from p2porch.common.tls import Authorizer, TlsMaterial
from p2porch.consensus.errors import ConsensusError, NotLeader
from p2porch.consensus.messages import Membership, Role
from p2porch.consensus.service import RaftService, ServiceConfig
from p2porch.consensus.storage import Storage
from p2porch.consensus.transport import TcpTransport, TlsTransport
from p2porch.gossip.config import GossipConfig
from p2porch.gossip.keyring import Keyring, generate_key, load_keyring, save_keyring
from p2porch.gossip.messages import Event, EventKind, Member, MemberState
from p2porch.gossip.service import GossipService
from p2porch.gossip.tls_transport import TlsGossipTransport
from p2porch.node.api import Api, to_json
from p2porch.node.errors import NodeError
from p2porch.node.reconcile_core import ReplicaStatus
from p2porch.node.rollout import plan_rollouts
from p2porch.node.scheduler import NodeStatus, schedule
from p2porch.node.security import (
    CLUSTER_MATERIAL,
    NodeSecurity,
    SecurityError,
    api_authorizer,
    node_authorizer,
    write_private,
)
from p2porch.node.spec import App
from p2porch.node.state import (
    CaRecord,
    ClusterState,
    Command,
    CommandResult,
    GossipKeys,
    JoinTokenRecord,
    NodeRecord,
    PutApp,
    PutNode,
    PutSecret,
    RemoveNode,
    ReplicaFact,
    ReportReplica,
    SecretRecord,
    SetCa,
    SetGossipKeys,
    SetJoinToken,
    decode_command,
    encode_command,
)
from p2porch.node.traffic import Traffic

log = logging.getLogger("p2porch.agent")

API_PORT = 7950
RAFT_PORT = 7951
GOSSIP_PORT = 7946
MAX_VOTERS = 5
# A learner this close to the leader's log is caught up enough to vote.
CATCH_UP_ENTRIES = 64
# How long a removed (live) node must stay caught up before the leader drops it from Raft.
CAUGHT_UP_HOLD_S = 1.0
# Period of the leader's timed scheduling/membership pass (changes trigger it at once).
LEADER_PASS_S = 2.0
REMOVED_MARKER = "removed"
# How long an outbound HTTP client replaced on certificate renewal lives on for in-flight calls.
PROXY_CLOSE_DELAY_S = 60.0


class AgentError(NodeError):
    """The agent cannot start or continue (bad data dir, refused join, lost storage)."""


@attrs.frozen
class AgentOptions:
    """The daemon's flags, validated."""

    data_dir: Path
    advertise: str
    join: str | None = None
    token: str | None = None
    name: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    api_port: int = API_PORT
    raft_port: int = RAFT_PORT
    gossip_port: int = GOSSIP_PORT
    preset: str = "lan"
    runtime: bool = True
    cpu_millicores: int | None = None
    memory_bytes: int | None = None
    # How long a voter may be dead before a healthy learner replaces it.
    voter_grace_s: float = 30.0
    # How long a node that left gracefully (SIGTERM: a restart, an upgrade) keeps its replicas
    # placed before they move. Its containers keep running meanwhile, so moving them at once
    # would only make duplicates.
    left_grace_s: float = 60.0
    # The data plane (node/traffic.py): the HTTP ingress and service DNS listen on the
    # advertise address; 0 turns one off.
    ingress_port: int = 80
    dns_port: int = 53
    dns_domain: str = "p2porch"

    def __attrs_post_init__(self) -> None:
        if self.preset not in ("local", "lan", "wan"):
            raise ValueError(f"preset must be local, lan or wan, not {self.preset!r}")
        if self.join is not None and not self.token:
            raise ValueError("--join needs --token (print it on any member: p2porch token)")
        for port in (self.api_port, self.raft_port, self.gossip_port):
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
        if self.voter_grace_s <= 0:
            raise ValueError("voter_grace_s must be > 0")
        if self.left_grace_s < 0:
            raise ValueError("left_grace_s must be >= 0")
        for port in (self.ingress_port, self.dns_port):
            if not 0 <= port < 65536:
                raise ValueError(f"port {port} out of range (0 turns the service off)")


@attrs.frozen
class Identity:
    """Who this node is, written once at first start (``DIR/node.json``)."""

    name: str
    cluster: str
    advertise: str
    api_port: int
    raft_port: int
    gossip_port: int

    @property
    def api_address(self) -> str:
        return f"{self.advertise}:{self.api_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.advertise}:{self.raft_port}"

    @property
    def gossip_address(self) -> str:
        return f"{self.advertise}:{self.gossip_port}"


@codec.register(280)
@attrs.frozen
class NodeMeta:
    """What a node tells everyone by gossip: where its API and Raft listen."""

    api_address: str
    raft_address: str
    # Appended: the node's endpoint record stamp (node/endpoints.py). Gossip carries only
    # this; a peer that sees a newer one fetches the record from the node's API.
    endpoints_epoch: int = 0
    endpoints_version: int = 0


# --------------------------------------------------------------------------- helpers


def _write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (tokens, keys)."""
    write_private(path, text.encode())


def _detect_capacity() -> tuple[int, int]:
    cpus = os.cpu_count() or 1
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return cpus * 1000, memory


def outbound_http(
    advertise: str, verify: ssl.SSLContext, timeout_s: float = 10.0
) -> httpx.AsyncClient:
    """An HTTPS client whose connections originate from the node's advertise address and
    present ``verify``'s certificate (the node's, or none while joining)."""
    return httpx.AsyncClient(
        timeout=timeout_s,
        transport=httpx.AsyncHTTPTransport(local_address=advertise, verify=verify),
    )


def _unverified_context() -> ssl.SSLContext:
    """For the joiner's first call only: fetch the CA bundle, then pin it by fingerprint
    (the token's) -- nothing secret is sent on this connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# The AAD binding each sealed record to its place (node/security.py).
TOKEN_AAD = "join-token"
GOSSIP_KEY_AAD = "gossip-key"
CA_KEY_AAD = "ca-key"


def secret_aad(namespace: str, name: str) -> str:
    return f"secret/{namespace}/{name}"


def default_name(advertise: str) -> str:
    host = socket.gethostname().split(".")[0].lower() or "node"
    return f"{host}-{advertise.replace('.', '-').replace(':', '-')}"[:63]


class StateMachineAdapter:
    """Adapts :class:`ClusterState` to the Raft shell's StateMachine protocol."""

    def __init__(self, on_apply: Callable[[CommandResult], None]) -> None:
        self.state = ClusterState()
        self._on_apply = on_apply
        self.bad_entries = 0

    def apply(self, data: bytes) -> object:
        try:
            command = decode_command(data)
        except CodecError as exc:
            # A command this version cannot read: count it and refuse it; never crash a node.
            self.bad_entries += 1
            return CommandResult(error=f"undecodable command: {exc}")
        result = self.state.apply(self.state.index + 1, command)
        self._on_apply(result)
        return result

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, data: bytes) -> None:
        # A bootstrap snapshot carries only Raft membership: no state yet.
        self.state = ClusterState.restore(data) if data else ClusterState()
        self._on_apply(CommandResult())


# --------------------------------------------------------------------------- the agent


class Agent:
    """One node. ``await agent.run()`` serves until SIGTERM/SIGINT or :meth:`shutdown`."""

    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.data_dir = options.data_dir
        self.identity: Identity | None = None
        self.raft: RaftService | None = None
        self.gossip: GossipService | None = None
        self.machine = StateMachineAdapter(self._applied)
        self.reconciler: Any = None
        self.started = trio.Event()
        self._state_changed = trio.Event()
        self._members_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._dead_since: dict[str, float] = {}
        self._caught_up_since: dict[str, float] = {}
        self._capacity = _detect_capacity()
        self._peers_text: str | None = None  # what peers.json holds, once known
        self._gossip_started_at = 0.0
        self.events = EventLog()
        self.http: httpx.AsyncClient | None = None
        self.security: NodeSecurity | None = None
        # Versions of the log's token / gossip keyring this node has made its own.
        self._token_version = -1
        self._ca_version = 0
        self.applied_gossip_keys_version = 0
        self._retired_http: list[httpx.AsyncClient] = []
        self._rng = random.Random()
        self.traffic: Traffic | None = None  # the data plane, once the identity is known
        self._member_addresses: dict[str, tuple[str, str] | None] = {}

    # ---- state access

    @property
    def state(self) -> ClusterState:
        return self.machine.state

    @property
    def name(self) -> str:
        assert self.identity is not None
        return self.identity.name

    def _applied(self, result: CommandResult) -> None:
        for change in result.changes:
            self.events.add(self.state.index, change.kind, change.key, change.value)
            if change.kind == "node" and isinstance(change.value, NodeRecord) and self.raft:
                self.raft.set_peer_address(change.value.name, change.value.raft_address)
        self._state_changed.set()
        self._state_changed = trio.Event()

    # ---- start-up

    def _paths(self) -> dict[str, Path]:
        d = self.data_dir
        return {
            "identity": d / "node.json",
            "peers": d / "peers.json",
            "token": d / "join-token",
            "client": d / "client.yaml",
            "keys": d / "gossip.keys",
            "raft": d / "raft",
        }

    def _load_or_create_identity(self) -> tuple[Identity, bool]:
        paths = self._paths()
        if paths["identity"].exists():
            try:
                raw = json.loads(paths["identity"].read_text())
                identity = Identity(**raw)
            except (OSError, ValueError, TypeError) as exc:
                raise AgentError(f"{paths['identity']}: unreadable node identity: {exc}") from exc
            if self.options.name and self.options.name != identity.name:
                raise AgentError(
                    f"{self.data_dir} belongs to node {identity.name!r}, not {self.options.name!r}"
                )
            if identity.advertise != self.options.advertise:
                identity = attrs.evolve(identity, advertise=self.options.advertise)
                _write_private(paths["identity"], json.dumps(attrs.asdict(identity)))
            return identity, False
        identity = Identity(
            name=self.options.name or default_name(self.options.advertise),
            cluster=secrets.token_hex(8),
            advertise=self.options.advertise,
            api_port=self.options.api_port,
            raft_port=self.options.raft_port,
            gossip_port=self.options.gossip_port,
        )
        return identity, True

    def _save_identity(self, identity: Identity) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _write_private(self._paths()["identity"], json.dumps(attrs.asdict(identity)))

    def _load_peers(self) -> dict[str, dict[str, str]]:
        path = self._paths()["peers"]
        if not path.exists():
            return {}
        try:
            peers: dict[str, dict[str, str]] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AgentError(f"{path}: unreadable peer list: {exc}") from exc
        return peers

    def _save_peers(self) -> None:
        peers = {
            n.name: {"raft": n.raft_address, "gossip": n.gossip_address, "api": n.api_address}
            for n in self.state.nodes.values()
            if not n.removed
        }
        text = json.dumps(peers, sort_keys=True)
        if text == self._peers_text:
            return  # no write when nothing changed (SD cards)
        path = self._paths()["peers"]
        if self._peers_text is None and path.exists() and path.read_text() == text:
            self._peers_text = text  # a restart with the same peers: still no write
            return
        _write_private(path, text)
        self._peers_text = text

    def write_client_config(self) -> None:
        """``DIR/client.yaml`` with an admin certificate, for the CLI on this machine."""
        assert self.identity is not None and self.security is not None
        self.security.write_admin_client(
            self.identity.api_address, self.identity.cluster, pki.utcnow(), self.identity.name
        )

    def my_record(self) -> NodeRecord:
        assert self.identity is not None
        cpu, mem = self._capacity
        return NodeRecord(
            name=self.identity.name,
            address=self.identity.advertise,
            api_address=self.identity.api_address,
            raft_address=self.identity.raft_address,
            gossip_address=self.identity.gossip_address,
            labels=self.options.labels,
            cpu_millicores=self.options.cpu_millicores or cpu,
            memory_bytes=self.options.memory_bytes or mem,
            cert_key=self.security.node_key_id if self.security else "",
        )

    def _addresses(self) -> tuple[str, ...]:
        """What our certificate's SANs name: the advertise address (peers dial it) and this
        machine's host name (people type it)."""
        host = socket.gethostname().split(".")[0].lower()
        return tuple(dict.fromkeys([self.options.advertise, *([host] if host else [])]))

    async def _join_cluster(self, identity: Identity) -> tuple[dict[str, Any], NodeSecurity]:
        """Ask a member to admit us (retrying: the leader may be changing).

        1. Fetch the member's CA bundle and keep only the certificate whose fingerprint the
           token pins -- a man in the middle with another CA is caught here, before anything
           secret is sent.
        2. Over TLS verified against that CA alone, send the join secret, our record and a
           certificate request (our key never leaves this machine); the answer carries our
           certificate and the cluster's keys.
        """
        try:
            token = pki.JoinToken.parse(self.options.token or "")
        except pki.PkiError as exc:
            raise AgentError(str(exc)) from exc
        peer = self.options.join or ""
        if ":" not in peer:
            peer = f"{peer}:{API_PORT}"
        node_key = pki.generate_key()
        body = {
            "secret": token.secret,
            "csr": pki.make_request(node_key, identity.name).decode(),
            **_record_json(self.my_record()),
        }
        last = ""
        for attempt in range(8):
            try:
                pinned = await self._fetch_pinned_ca(peer, token.ca_fingerprint)
                context = TlsMaterial(pki.cert_pem(pinned)).client_context(check_hostname=False)
                async with outbound_http(self.options.advertise, context, 15.0) as client:
                    resp = await client.post(f"https://{peer}/v1/join", json=body)
            except httpx.HTTPError as exc:
                cause = _root_cause(exc)
                if isinstance(cause, ssl.SSLCertVerificationError):
                    # The CA pinned by the token did not issue this server's certificate (for
                    # a node): whoever answers is not a member. Nothing was sent; stop here.
                    raise AgentError(
                        f"{peer} answered the join call with a certificate the token's CA did "
                        f"not issue to a node ({cause.verify_message}): a different cluster, "
                        "or a man in the middle. Nothing was sent."
                    ) from exc
                last = f"cannot reach {peer}: {str(cause) or type(cause).__name__}"
            else:
                if resp.status_code == 200:
                    answer: dict[str, Any] = resp.json()
                    try:
                        security = NodeSecurity.from_join(
                            self.data_dir,
                            node_key=node_key,
                            ca_bundle=pki.cert_pem(pinned),
                            ca_key=str(answer["caKey"]).encode(),
                            node_cert=str(answer["certificate"]).encode(),
                            data_key=base64.b64decode(answer["dataKey"]),
                        )
                    except (KeyError, ValueError, TypeError) as exc:
                        raise AgentError(f"join answer from {peer} is malformed: {exc}") from exc
                    return answer, security
                try:
                    err = resp.json()["error"]
                    last = f"{err['code']}: {err['message']}"
                except (ValueError, KeyError, TypeError):
                    last = f"HTTP {resp.status_code}"
                if resp.status_code in (400, 401, 403, 409):
                    break
            await trio.sleep(min(0.5 * 2**attempt, 4.0))
        raise AgentError(f"join through {peer} refused: {last}")

    async def _fetch_pinned_ca(self, peer: str, ca_fingerprint: str) -> x509.Certificate:
        async with outbound_http(self.options.advertise, _unverified_context(), 15.0) as client:
            resp = await client.get(f"https://{peer}/v1/ca")
        try:
            bundle = str(resp.json()["ca"]).encode()
            certs = pki.load_certs(bundle)
        except (ValueError, KeyError, TypeError, pki.PkiError) as exc:
            raise AgentError(f"{peer} did not answer with a CA bundle: {exc}") from exc
        for cert in certs:
            if pki.fingerprint(cert) == ca_fingerprint:
                return cert
        seen = ", ".join(pki.fingerprint(c)[:16] for c in certs)
        raise AgentError(
            f"{peer} presents a CA ({seen}...) whose fingerprint is not the one in the join "
            f"token ({ca_fingerprint[:16]}...): a different cluster, or a man in the middle. "
            "Nothing was sent."
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        opts = self.options
        paths = self._paths()
        fresh_dir = not paths["identity"].exists()
        joining = fresh_dir and opts.join is not None
        join_answer: dict[str, Any] = {}
        identity, new = self._load_or_create_identity()
        self.identity = identity
        if joining:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            join_answer, self.security = await self._join_cluster(identity)
            identity = attrs.evolve(identity, cluster=join_answer["cluster"])
        self.identity = identity
        if new:
            self._save_identity(identity)
        paths["raft"].mkdir(parents=True, exist_ok=True)

        # Certificates, keys, the gossip keyring and the join token.
        now = pki.utcnow()
        if joining:
            keys = [base64.b64decode(k) for k in join_answer["gossipKeys"]]
            keyring = Keyring(keys[0], keys[1:])
            save_keyring(keyring, paths["keys"])
            _write_private(paths["token"], (opts.token or "") + "\n")
            peers = {m["name"]: m for m in join_answer["members"]}
        elif fresh_dir:
            self.security = NodeSecurity.bootstrap(
                self.data_dir, identity.cluster, identity.name, self._addresses(), now
            )
            keyring = Keyring(generate_key())
            save_keyring(keyring, paths["keys"])
            token = pki.JoinToken.new(self.security.fingerprint)
            _write_private(paths["token"], f"{token}\n")
            peers = {}
        else:
            if (self.data_dir / REMOVED_MARKER).exists():
                raise AgentError(
                    f"node {identity.name} was removed from its cluster and {self.data_dir} "
                    "no longer holds the cluster's keys: start with an empty data dir and "
                    "join under a new name"
                )
            if not NodeSecurity.exists(self.data_dir):
                raise AgentError(
                    f"{self.data_dir} has no certificates (made by a p2porch without mutual "
                    "TLS?): start this node with a new data dir and join it again"
                )
            try:
                self.security = NodeSecurity.load(self.data_dir)
            except SecurityError as exc:
                raise AgentError(str(exc)) from exc
            keyring = load_keyring(paths["keys"])
            peers = {
                name: {"raftAddress": p["raft"], "gossipAddress": p["gossip"]}
                for name, p in self._load_peers().items()
            }
        security = self.security
        assert security is not None
        security.ensure_node_cert(identity.name, self._addresses(), now, self._rng)
        self.write_client_config()

        service_config = ServiceConfig.local() if opts.preset == "local" else ServiceConfig.lan()
        gossip_config = GossipConfig.local() if opts.preset == "local" else GossipConfig.lan()
        storage = Storage.open(paths["raft"])
        bootstrap = (
            Membership(voters=frozenset({identity.name})) if fresh_dir and not joining else None
        )
        peer_check = node_authorizer(identity.cluster, self._lookup_node)
        self.raft = RaftService(
            identity.name,
            config=service_config,
            storage=storage,
            state_machine=self.machine,
            transport=TlsTransport(
                TcpTransport(local_address=identity.advertise), security.contexts, peer_check
            ),
            listen=identity.raft_address,
            peers={n: p["raftAddress"] for n, p in peers.items() if n != identity.name},
            bootstrap=bootstrap,
        )
        for node in self.state.nodes.values():
            self.raft.set_peer_address(node.name, node.raft_address)
        self.traffic = Traffic(self)
        meta = codec.encode(NodeMeta(identity.api_address, identity.raft_address))
        seeds = [p["gossipAddress"] for n, p in peers.items() if n != identity.name]
        self.gossip = GossipService(
            gossip_config,
            identity.name,
            (identity.advertise, identity.gossip_port),
            keyring,
            meta,
            seeds,
            keyring_path=str(paths["keys"]),
            transport_factory=TlsGossipTransport.factory(security.contexts, peer_check),
        )
        api = Api(self)
        self.http = outbound_http(identity.advertise, security.contexts.client)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.raft.run)
                await nursery.start(self.gossip.run)
                self._gossip_started_at = trio.current_time()
                await nursery.start(api.serve, identity.advertise, identity.api_port)
                nursery.start_soon(self._gossip_events)
                nursery.start_soon(self._leader_loop)
                nursery.start_soon(self._renew_certificate)
                if opts.runtime:
                    await self._start_reconciler(nursery)
                await self._start_traffic(nursery)
                # After the reconciler exists: its first desired set comes from here.
                nursery.start_soon(self._follow_state)
                nursery.start_soon(self._signals)
                self.started.set()
                task_status.started()
                log.info("node %s serving on %s", identity.name, identity.api_address)
        finally:
            await self.http.aclose()
            storage.close()

    async def _start_reconciler(self, nursery: trio.Nursery) -> None:
        from p2porch.node.reconciler import Reconciler
        from p2porch.node.runtime import DockerRuntime

        runtime = await DockerRuntime.connect(self.name, self.options.advertise)
        self.reconciler = Reconciler(runtime, self.name, self.options.advertise)
        await nursery.start(self.reconciler.run)
        nursery.start_soon(self._report_facts)

    async def _start_traffic(self, nursery: trio.Nursery) -> None:
        """The data plane: endpoint exchange, then the mesh, the ingress and DNS."""
        traffic = self.traffic
        assert traffic is not None
        nursery.start_soon(traffic.follow_reconciler)
        nursery.start_soon(traffic.fetch_loop)
        nursery.start_soon(traffic.anti_entropy)
        traffic.on_change(self._traffic_changed)
        await traffic.run_services(nursery)

    def _traffic_changed(self) -> None:
        """Readiness moved: a leader with a rollout under way looks again at once."""
        if self.raft is not None and self.raft.is_leader and self.state.rollouts_moving():
            self._members_changed.set()
            self._members_changed = trio.Event()

    def announce_endpoints(self, stamp: tuple[int, int]) -> None:
        """Put our endpoint record's stamp in our gossip metadata (peers then fetch it)."""
        if self.gossip is None or self.identity is None:
            return
        identity = self.identity
        meta = NodeMeta(identity.api_address, identity.raft_address, stamp[0], stamp[1])
        self.gossip.set_meta(codec.encode(meta))

    @staticmethod
    def decode_meta(meta: bytes) -> NodeMeta | None:
        if not meta:
            return None
        try:
            node_meta: NodeMeta = codec.decode(meta, NodeMeta)
        except CodecError:
            return None
        return node_meta

    def replica_statuses(self) -> list[ReplicaStatus]:
        """Every node's replica statuses, as the endpoint table holds them (the owners' word)."""
        return self.traffic.table.replicas() if self.traffic is not None else []

    async def _report_facts(self) -> None:
        """Log terminal replica facts (cannot start, ...) so every node can show them."""
        seen = 0
        reported: set[ReplicaFact] = set()
        while True:
            seen = await self.reconciler.wait_statuses_changed(seen)
            for fact in self.reconciler.terminal_facts():
                if fact in reported:
                    continue
                try:
                    await self.submit(ReportReplica(fact))
                    reported.add(fact)
                except (ConsensusError, AgentError, httpx.HTTPError) as exc:
                    log.info("cannot report %s yet: %s", fact, exc)

    async def submit(self, command: Command) -> CommandResult:
        """Commit a command from any node: locally on the leader, else through its API."""
        assert self.raft is not None and self.http is not None
        if self.raft.is_leader:
            return await self.propose(command)
        leader = self.raft.leader_id
        node = self.state.nodes.get(leader) if leader else None
        if node is None:
            raise AgentError("no leader known")
        resp = await self.http.post(
            f"https://{node.api_address}/v1/internal/propose",
            content=encode_command(command),
            headers={"content-type": "application/x-p2porch-command"},
        )
        if resp.status_code != 200:
            raise AgentError(f"leader refused the command: HTTP {resp.status_code} {resp.text}")
        return CommandResult(error=resp.json().get("error"))

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                await self.shutdown()
                return

    async def shutdown(self) -> None:
        """Graceful exit: hand leadership over, leave gossip, stop. Containers keep running."""
        with trio.move_on_after(10):
            if self.raft is not None and self.raft.is_leader:
                target = self._transfer_target()
                if target is not None:
                    with contextlib.suppress(ConsensusError):
                        await self.raft.transfer_leadership(target, timeout_s=3)
            if self.gossip is not None:
                await self.gossip.leave()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def leave_cluster(self, timeout_s: float = 60.0) -> None:
        """``p2porch leave``: remove this node for good -- its replicas move elsewhere, its
        containers go, Raft drops it (the leader does, after leadership moved) -- then exit.
        """
        with trio.move_on_after(timeout_s):
            try:
                await self.submit(RemoveNode(self.name))
            except (ConsensusError, AgentError, httpx.HTTPError) as exc:
                log.warning("leave: could not record the removal: %s", exc)
            else:
                # Once our removal has applied here we run nothing (see _follow_state); where
                # our replicas go next is the leader's business, not something to wait for.
                def done() -> bool:
                    me = self.state.nodes.get(self.name)
                    # Statuses go at once; the removals (each drained first) take longer.
                    idle = self.reconciler is None or (
                        not self.reconciler.statuses() and self.reconciler.is_idle()
                    )
                    return me is not None and me.removed and idle

                while not done():
                    await trio.sleep(0.2)
        await self.shutdown()

    def _transfer_target(self) -> str | None:
        assert self.raft is not None
        status = self.raft.status()
        voters = sorted(v for v in status.membership.voters if v != self.name)
        best = sorted(
            voters,
            key=lambda v: -(status.progress[v].match if v in status.progress else 0),
        )
        return best[0] if best else None

    # ---- background tasks

    async def _gossip_events(self) -> None:
        assert self.gossip is not None
        async for event in self.gossip.events():
            kind = getattr(event, "kind", None)
            if self.traffic is not None:
                if isinstance(event, Event):
                    self.traffic.on_gossip_event(event)
                else:
                    self.traffic.resync()
            moved = isinstance(event, Event) and self._addresses_moved(event.member)
            if kind is EventKind.UPDATED and not moved:
                # Only the endpoint stamp changed (every readiness change does that): the
                # data plane took it above; it is neither news for the event log nor for
                # the leader's scheduling pass.
                continue
            if kind is not None:
                member = event.member  # type: ignore[union-attr]
                self._learn_address(member.name, member.meta)
                self.events.add(
                    self.state.index, "member", member.name, {"state": kind.name.lower()}
                )
                if kind in (EventKind.DEAD, EventKind.LEFT):
                    self._dead_since.setdefault(member.name, trio.current_time())
                elif kind in (EventKind.ALIVE, EventKind.JOINED):
                    self._dead_since.pop(member.name, None)
            self._members_changed.set()
            self._members_changed = trio.Event()

    def _addresses_moved(self, member: Member) -> bool:
        """Whether a member's metadata names other API/Raft addresses than last seen."""
        meta = self.decode_meta(member.meta)
        addresses = (meta.api_address, meta.raft_address) if meta else None
        if self._member_addresses.get(member.name) == addresses:
            return False
        self._member_addresses[member.name] = addresses
        return True

    def _learn_address(self, name: str, meta: bytes) -> None:
        """Gossip metadata says where a member's Raft listens: a path that needs no log."""
        if self.raft is None or name == self.name:
            return
        node_meta = self.decode_meta(meta)
        if node_meta is not None:
            self.raft.set_peer_address(name, node_meta.raft_address)

    async def _follow_state(self) -> None:
        """Hand this node's placements to the reconciler and remember peers, on every change."""
        while True:
            changed = self._state_changed
            try:
                self._save_peers()
                me = self.state.nodes.get(self.name)
                if me is not None and me.removed:
                    self._forget_cluster_material()
                else:  # a removed node must not write the cluster's keys back
                    self._sync_security_state()
            except OSError as exc:
                log.warning("cannot save peers.json or keys: %s", exc)
            if self.reconciler is not None:
                me = self.state.nodes.get(self.name)
                # A node removed from the cluster runs nothing, whatever it last heard.
                removed = me is not None and me.removed
                placements = [] if removed else self.state.placements_for(self.name)
                # Each placement runs its own revision (rolling updates move them in batches).
                apps: dict[tuple[str, str, int], App] = {}
                for placement in placements:
                    app = self.state.app_for(placement)
                    if app is not None:
                        apps[(*app.key, app.meta.generation)] = app
                self.reconciler.set_desired(placements, list(apps.values()))
            if self.traffic is not None:
                self.traffic.routes_changed()
            await changed.wait()

    def _forget_cluster_material(self) -> None:
        """This node was removed: delete what lets its data dir act for the cluster (the CA
        and data keys, the admin credentials, the gossip keys, the join token) and mark the
        dir, so a restart says why it cannot serve instead of limping on."""
        marker = self.data_dir / REMOVED_MARKER
        if marker.exists():
            return
        files = NodeSecurity.paths(self.data_dir)
        for key in CLUSTER_MATERIAL:
            files[key].unlink(missing_ok=True)
        self._paths()["keys"].unlink(missing_ok=True)
        self._paths()["token"].unlink(missing_ok=True)
        _write_private(marker, "removed from the cluster; this data dir cannot serve again\n")
        log.info("removed from the cluster: deleted the cluster's keys from %s", self.data_dir)

    def live_view(self) -> dict[str, NodeStatus]:
        """Gossip's view of every node, as the scheduler needs it."""
        assert self.gossip is not None
        view: dict[str, NodeStatus] = {}
        now = trio.current_time()
        grace = now - self._gossip_started_at < 10.0
        members = {m.name: m for m in self.gossip.members()}
        for name in self.state.nodes:
            if name == self.name:
                view[name] = NodeStatus.ALIVE
                continue
            member = members.get(name)
            if member is None:
                # Unknown to gossip: right after start-up that is ignorance, not death.
                view[name] = NodeStatus.SUSPECT if grace else NodeStatus.DEAD
            elif member.state is MemberState.LEFT:
                since = self._dead_since.get(name, now)
                left_recently = now - since < self.options.left_grace_s
                view[name] = NodeStatus.SUSPECT if left_recently else NodeStatus.LEFT
            else:
                view[name] = {
                    MemberState.ALIVE: NodeStatus.ALIVE,
                    MemberState.SUSPECT: NodeStatus.SUSPECT,
                    MemberState.DEAD: NodeStatus.DEAD,
                }[member.state]
        return view

    def member_status(self, name: str) -> str:
        """alive | suspect | dead | left, as gossip reports it (what people are shown)."""
        if name == self.name:
            return "alive"
        node = self.state.nodes.get(name)
        if node is not None and node.removed:
            return "left"
        assert self.gossip is not None
        member = self.gossip.member(name)
        if member is None:
            return "suspect" if self.live_view().get(name) is NodeStatus.SUSPECT else "dead"
        return member.state.name.lower()

    async def propose(self, command: Command, timeout_s: float = 10.0) -> CommandResult:
        assert self.raft is not None
        result = await self.raft.propose(encode_command(command), timeout_s=timeout_s)
        if not isinstance(result, CommandResult):
            raise AgentError(f"unexpected apply result {result!r}")
        return result

    async def _leader_loop(self) -> None:
        """On the leader: keep our record current, schedule, and manage Raft membership."""
        assert self.raft is not None
        while True:
            state_changed, members_changed = self._state_changed, self._members_changed
            if self.raft.is_leader:
                try:
                    await self._lead_once()
                except (ConsensusError, NotLeader) as exc:
                    log.info("leader duties interrupted: %s", exc)
            # Changes wake this loop at once; the timed pass only catches time-based rules
            # (grace periods expiring), so it need not run often -- idle CPU matters on a Pi.
            with trio.move_on_after(LEADER_PASS_S):
                async with trio.open_nursery() as waiters:

                    async def wait_and_cancel(event: trio.Event) -> None:
                        await event.wait()
                        waiters.cancel_scope.cancel()

                    waiters.start_soon(wait_and_cancel, state_changed)
                    waiters.start_soon(wait_and_cancel, members_changed)
                    waiters.start_soon(self._wait_leadership_change, waiters.cancel_scope)

    async def _wait_leadership_change(self, scope: trio.CancelScope) -> None:
        """A new leader must schedule at once: its election commits no command of ours."""
        assert self.raft is not None
        raft = self.raft
        was_leader = raft.is_leader
        await raft.wait_for(lambda: raft.is_leader != was_leader, 2.0)
        scope.cancel()

    async def _lead_once(self) -> None:
        assert self.raft is not None
        await self._ensure_cluster_security()
        mine = self.state.nodes.get(self.name)
        record = self.my_record()
        if mine is None or attrs.evolve(mine, drained=False, removed=False) != record:
            await self.propose(PutNode(record))
        live = self.live_view()
        decision = schedule(
            self.state.sched_apps(), self.state.sched_nodes(live), self.state.slot_map()
        )
        command = self.state.decision_command(decision)
        if command is not None:
            await self.propose(command)
        await self._advance_rollouts()
        await self._manage_membership(live)

    async def _advance_rollouts(self) -> None:
        """One step of every rolling update (node/rollout.py decides, we commit)."""
        if self.traffic is None or not self.state.rollouts_moving():
            return
        for command in plan_rollouts(self.state, self.traffic.slot_health(), time.time()):
            result = await self.propose(command)
            if result.error:
                log.info("rollout step refused: %s", result.error)
            elif isinstance(command, PutApp):
                log.warning(
                    "rollout of %s/%s: %s",
                    command.app.meta.namespace,
                    command.app.meta.name,
                    command.cause,
                )

    async def _manage_membership(self, live: dict[str, NodeStatus]) -> None:
        """Promote caught-up learners up to 5 voters; replace voters dead past the grace."""
        assert self.raft is not None
        status = self.raft.status()
        if status.role is not Role.LEADER:
            return
        membership = status.membership
        now = trio.current_time()
        for name in sorted(membership.members):
            node = self.state.nodes.get(name)
            # Drop a removed node from Raft only once its replicas have moved and -- if it is
            # still up -- it has replicated everything committed, so it hears that its slots
            # were released before it stops hearing anything.
            progress = status.progress.get(name)
            if progress is not None and progress.match >= status.commit_index:
                self._caught_up_since.setdefault(name, now)
            else:
                self._caught_up_since.pop(name, None)
            # Matching the log is not knowing it committed: that news rides on the next
            # heartbeats, so stay caught up for a while before the node is let go.
            caught_up = now - self._caught_up_since.get(name, now) >= CAUGHT_UP_HOLD_S
            if (
                node is not None
                and node.removed
                and name != self.name
                and not self.state.placements_for(name)
                and (caught_up or live.get(name) is not NodeStatus.ALIVE)
            ):
                await self.raft.remove(name, timeout_s=5)
                return
        learners = sorted(
            name
            for name in membership.learners
            if live.get(name) is NodeStatus.ALIVE
            and name in status.progress
            and status.progress[name].recent_active
            and status.progress[name].match > 0
            and status.progress[name].match + CATCH_UP_ENTRIES >= status.last_index
        )
        dead_voters = sorted(
            name
            for name in membership.voters
            if name != self.name
            and live.get(name) in (NodeStatus.DEAD, NodeStatus.LEFT)
            and now - self._dead_since.get(name, now) >= self.options.voter_grace_s
        )
        if dead_voters and learners:
            await self.raft.remove(dead_voters[0], timeout_s=5)
            return
        if learners and len(membership.voters) < MAX_VOTERS:
            await self.raft.promote(learners[0], timeout_s=5)

    # ---- join (called by the API on the leader)

    async def admit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Admit a joining node (on the leader): check the secret against the log's token,
        sign its certificate request, add it as a Raft learner, record it, and hand over the
        cluster's keys -- all inside TLS the joiner verified against the pinned CA."""
        assert self.raft is not None and self.identity is not None
        assert self.security is not None and self.gossip is not None
        secret = body.get("secret")
        current = self._token_secret()
        if current is None:
            raise TimeoutError("this cluster has no join token yet; retry in a moment")
        secret_now, expires_at = current
        if not isinstance(secret, str) or not hmac.compare_digest(
            pki.secret_digest(secret), pki.secret_digest(secret_now)
        ):
            raise PermissionError("wrong join token (it may have been rotated: p2porch token)")
        if expires_at is not None and time.time() > expires_at:
            raise PermissionError(
                "the join token has expired: make a new one with p2porch token rotate"
            )
        csr = body.get("csr")
        if not isinstance(csr, str):
            raise ValueError("join request: csr (a PEM certificate request) is required")  # noqa: TRY004 - answered as 400
        record = _record_from_json(body)
        existing = self.state.nodes.get(record.name)
        if existing is not None and existing.removed:
            raise FileExistsError(f"node {record.name!r} was removed; join with a new name")
        if existing is not None and existing.address != record.address:
            raise FileExistsError(
                f"a node named {record.name!r} already exists at {existing.address}"
            )
        try:
            cert_pem = self.security.issue_node(csr.encode(), (record.address,), pki.utcnow())
            identity = pki.identity_of(pki.load_cert(cert_pem))
        except (SecurityError, pki.PkiError) as exc:
            raise ValueError(f"join request: {exc}") from exc
        if identity.name != record.name:
            raise ValueError(
                f"join request: the certificate request names {identity.name!r}, "
                f"the record {record.name!r}"
            )
        record = attrs.evolve(record, cert_key=identity.key_id)
        try:  # refuse what the log cannot hold before Raft hears of the node
            encode_command(PutNode(record))
        except (CodecError, OverflowError, ValueError, TypeError) as exc:
            raise ValueError(f"join request: unusable node record: {exc}") from exc
        status = self.raft.status()
        if record.name not in status.membership.members:
            await self.raft.add_learner(record.name, record.raft_address, timeout_s=10)
        result = await self.propose(PutNode(record))
        if result.error:
            raise FileExistsError(result.error)
        known = {n.name: n for n in self.state.nodes.values() if not n.removed}
        # The leader itself first: its own record may not be committed yet on a young cluster.
        known[self.name] = self.my_record()
        members = [
            {"name": n.name, "raftAddress": n.raft_address, "gossipAddress": n.gossip_address}
            for n in known.values()
        ]
        keyring = self.gossip.keyring
        return {
            "cluster": self.identity.cluster,
            "members": members,
            "certificate": cert_pem.decode(),
            "caKey": pki.key_pem(self.security.ca.key).decode(),
            "dataKey": base64.b64encode(self.security.data_key).decode(),
            "gossipKeys": [base64.b64encode(k).decode() for k in keyring.installed_keys()],
        }

    # ---- security: who may connect, tokens, users, secrets, gossip keys

    def _lookup_node(self, name: str) -> tuple[bool, str] | None:
        node = self.state.nodes.get(name)
        return None if node is None else (node.removed, node.cert_key)

    def api_authorizer(self) -> Authorizer:
        assert self.identity is not None
        return api_authorizer(self.identity.cluster, self._lookup_node)

    def _token_secret(self) -> tuple[str, float | None] | None:
        """The join secret in force (from the log) and its expiry, or None before the first."""
        assert self.security is not None
        record = self.state.join_token
        if record is None:
            return None
        try:
            secret = self.security.unseal(record.sealed_secret, TOKEN_AAD).decode()
        except SecurityError as exc:
            log.warning("cannot open the join token of the log: %s", exc)
            return None
        return secret, record.expires_at

    def current_token(self) -> tuple[str, float | None]:
        """The full join token and its expiry (``p2porch token``)."""
        assert self.security is not None
        current = self._token_secret()
        if current is None:
            # A brand-new cluster before its first leader pass committed the token.
            text = self._paths()["token"].read_text().strip()
            return text, None
        secret, expires_at = current
        return str(pki.JoinToken(self.security.fingerprint, secret)), expires_at

    async def rotate_token(self, ttl_s: float | None) -> tuple[str, float | None]:
        """A new join secret for the whole cluster; every older token stops working."""
        assert self.security is not None
        token = pki.JoinToken.new(self.security.fingerprint)
        expires_at = None if ttl_s is None else time.time() + ttl_s
        record = JoinTokenRecord(self.security.seal(token.secret.encode(), TOKEN_AAD), expires_at)
        result = await self.submit(SetJoinToken(record))
        if result.error:
            raise AgentError(result.error)
        return str(token), expires_at

    def issue_user(self, name: str, role: str, csr: bytes) -> bytes:
        """Sign a user's certificate request; the name must be the request's CN."""
        assert self.security is not None
        cert = self.security.issue_user(csr, role, pki.utcnow())
        if pki.identity_of(pki.load_cert(cert)).name != name:
            raise SecurityError(f"the certificate request does not name user {name!r}")
        return cert

    async def put_secret(
        self, namespace: str, name: str, values: dict[str, bytes]
    ) -> CommandResult:
        """Seal a secret here (its plaintext never reaches another node) and commit it."""
        assert self.security is not None
        from p2porch.node.spec import check_dns_label

        check_dns_label(name, "secret name")
        for key in values:
            if not key or len(key) > 253 or not all(c.isalnum() or c in "-._" for c in key):
                raise SecurityError(
                    f"secret item name {key!r}: use letters, digits, '-', '.' or '_'"
                )
        plaintext = codec.encode(SecretValues(tuple(sorted(values.items()))))
        record = SecretRecord(
            namespace,
            name,
            tuple(sorted(values)),
            self.security.seal(plaintext, secret_aad(namespace, name)),
        )
        return await self.submit(PutSecret(record))

    def secret_values(self, namespace: str, app: str, name: str) -> dict[str, bytes]:
        """The delivery path: a secret's values, only for an app placed on this node that
        uses it. Nothing else on a node ever opens a secret."""
        assert self.security is not None
        app_record = self.state.apps.get(f"{namespace}/{app}")
        if app_record is None or name not in app_record.spec.secrets:
            raise SecurityError(f"app {namespace}/{app} does not use secret {name!r}")
        if not any(
            p.app == app and p.namespace == namespace for p in self.state.placements_for(self.name)
        ):
            raise SecurityError(f"no replica of {namespace}/{app} runs on {self.name}")
        record = self.state.secrets.get(f"{namespace}/{name}")
        if record is None:
            raise SecurityError(f"secret {name!r} not found in namespace {namespace!r}")
        opened = self.security.unseal(record.sealed, secret_aad(namespace, name))
        try:
            values: SecretValues = codec.decode(opened, SecretValues)
        except CodecError as exc:
            raise SecurityError(f"secret {namespace}/{name} is unreadable: {exc}") from exc
        return dict(values.items)

    def _sealed_keyring(self, keys: list[bytes]) -> GossipKeys:
        assert self.security is not None
        return GossipKeys(tuple(self.security.seal(k, GOSSIP_KEY_AAD) for k in keys))

    async def rotate_gossip_key(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """On the leader: a new gossip key everywhere with no lost member (install on every
        node, then make it primary, then drop the old ones), each step through the log and
        confirmed by every live node before the next."""
        assert self.gossip is not None
        old = list(self.gossip.keyring.installed_keys())
        new = generate_key()
        steps = ([*old, new], [new, *old], [new])
        for keys in steps:
            result = await self.propose(SetGossipKeys(self._sealed_keyring(keys)))
            if result.error:
                raise AgentError(result.error)
            await self._await_keyring(keys, timeout_s)
        return {
            "primary": hashlib.sha256(new).hexdigest()[:8],
            "nodes": len(self._live_peers()) + 1,
        }

    def _live_peers(self) -> list[NodeRecord]:
        live = self.live_view()
        return [
            n
            for n in self.state.nodes.values()
            if n.name != self.name and not n.removed and live.get(n.name) is NodeStatus.ALIVE
        ]

    async def _await_keyring(self, keys: list[bytes], timeout_s: float) -> None:
        """Wait until every live node holds exactly ``keys`` with ``keys[0]`` primary.

        A node that is down now catches up from the log when it returns (its Raft traffic is
        TLS, not gossip), so only live ones are waited for.
        """
        assert self.http is not None
        want = {
            "primary": hashlib.sha256(keys[0]).hexdigest()[:8],
            "keys": sorted(hashlib.sha256(k).hexdigest()[:8] for k in keys),
        }
        deadline = trio.current_time() + timeout_s
        pending = {n.name: n for n in self._live_peers()}
        while True:
            mine = self.gossip.keyring if self.gossip else None
            local_ok = (
                mine is not None
                and mine.primary == keys[0]
                and set(mine.installed_keys()) == set(keys)
            )
            for name, node in list(pending.items()):
                try:
                    resp = await self.http.get(
                        f"https://{node.api_address}/v1/internal/keyring", timeout=2.0
                    )
                    got = resp.json()
                except (httpx.HTTPError, ValueError):
                    continue
                if (
                    got.get("primary") == want["primary"]
                    and sorted(got.get("keys", [])) == want["keys"]
                ):
                    del pending[name]
            if local_ok and not pending:
                return
            if trio.current_time() > deadline:
                raise AgentError(
                    "gossip key rotation stalled: not confirmed by "
                    + ", ".join(sorted(pending) or [self.name])
                    + " (the log holds the step; they will apply it when they catch up)"
                )
            await trio.sleep(0.2)

    def _sync_security_state(self) -> None:
        """Make the log's join token and gossip keyring this node's own (files included)."""
        assert self.security is not None and self.identity is not None
        paths = self._paths()
        ca = self.state.ca
        if ca is not None and ca.version != self._ca_version:
            try:
                ca_key = self.security.unseal(ca.sealed_key, CA_KEY_AAD)
                changed = self.security.adopt_ca(
                    ca.bundle, ca_key, self.identity.name, self._addresses(), pki.utcnow()
                )
            except SecurityError as exc:
                log.warning("cannot adopt the log's CA: %s", exc)
            else:
                self._ca_version = ca.version
                if changed:
                    log.info("CA bundle now trusts %s", self.security.trusted_fingerprints)
                    self._token_version = -1  # the token names the signing CA: rewrite it
                    self._replace_http()
        record = self.state.join_token
        if record is not None and record.version != self._token_version:
            current = self.current_token()[0]
            path = paths["token"]
            if not path.exists() or path.read_text().strip() != current:
                _write_private(path, current + "\n")
            self._token_version = record.version
        sealed = self.state.gossip_keys
        if (
            sealed is not None
            and self.gossip is not None
            and sealed.version != self.applied_gossip_keys_version
        ):
            try:
                keys = [self.security.unseal(k, GOSSIP_KEY_AAD) for k in sealed.sealed_keys]
            except SecurityError as exc:
                log.warning("cannot open the gossip keyring of the log: %s", exc)
                return
            keyring = self.gossip.keyring
            for key in keys:
                if key not in keyring.installed_keys():
                    keyring.install(key)
            keyring.use(keys[0])
            for key in keyring.installed_keys():
                if key not in keys:
                    keyring.remove(key)
            save_keyring(keyring, paths["keys"])
            self.applied_gossip_keys_version = sealed.version

    async def _ensure_cluster_security(self) -> None:
        """On the leader of a new cluster: put the join token and gossip keyring in the log."""
        assert self.security is not None and self.gossip is not None
        if self.state.join_token is None:
            token = pki.JoinToken.parse(self._paths()["token"].read_text())
            sealed = self.security.seal(token.secret.encode(), TOKEN_AAD)
            await self.propose(SetJoinToken(JoinTokenRecord(sealed)))
        if self.state.gossip_keys is None:
            keyring = self.gossip.keyring
            keys = list(keyring.installed_keys())
            await self.propose(SetGossipKeys(self._sealed_keyring(keys)))

    async def _renew_certificate(self) -> None:
        """Renew our certificate (same key) at a random 50-80% of its life, as Swarm does."""
        assert self.security is not None and self.identity is not None
        while True:
            due = pki.renew_at(self.security.node_cert, self._rng)
            wait_s = (due - pki.utcnow()).total_seconds()
            # Wake at least daily: the wall clock may jump (a Pi without an RTC boots in 1970).
            await trio.sleep(min(max(wait_s, 1.0), 86400.0))
            if self.security.ensure_node_cert(
                self.identity.name, self._addresses(), pki.utcnow(), self._rng
            ):
                log.info("renewed the node certificate")
                self._replace_http()

    def _replace_http(self) -> None:
        """A new outbound client with the current certificate; the old one finishes its
        in-flight calls and is closed a while later."""
        assert self.security is not None and self.identity is not None
        old, self.http = (
            self.http,
            outbound_http(self.identity.advertise, self.security.contexts.client),
        )
        if old is not None and self._nursery is not None:
            self._nursery.start_soon(self._close_later, old)

    @staticmethod
    async def _close_later(client: httpx.AsyncClient) -> None:
        await trio.sleep(PROXY_CLOSE_DELAY_S)
        await client.aclose()

    # ---- CA rotation (on the leader)

    def security_report(self) -> dict[str, Any]:
        """What this node trusts and who signed its certificate (rotation confirmations)."""
        assert self.security is not None
        return {
            "signing": self.security.fingerprint,
            "trusted": self.security.trusted_fingerprints,
            "certIssuer": self.security.cert_issuer_fingerprint,
            "caVersion": self._ca_version,
        }

    async def rotate_ca(
        self, *, finish_only: bool = False, force: bool = False, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """Replace the cluster CA with no member cut off, in three logged steps:

        1. trust old + new, still sign with the old CA (no certificate changes yet);
        2. once every member trusts both: sign with the new CA -- every node reissues its
           certificate (same key) and its local admin certificate;
        3. once every member holds a new certificate: trust the new CA only.

        Every member means every node not removed, dead ones included: a node that misses
        the rotation could not reconnect after step 3. ``force`` finishes without them (they
        must then be removed and join again). ``finish_only`` resumes a rotation that stopped
        after step 2.
        """
        assert self.security is not None and self.identity is not None
        security = self.security
        if finish_only:
            certs = pki.load_certs(security.ca_bundle)
            if len(certs) < 2:
                raise AgentError("no CA rotation in progress (the bundle holds one CA)")
            new_ca = security.ca
        else:
            old_ca = security.ca
            new_ca = pki.CertificateAuthority.create(self.identity.cluster, pki.utcnow())
            both = pki.cert_pem(new_ca.cert) + security.ca_bundle
            await self._ca_step(
                bundle=both,
                signing=old_ca,
                confirmed=lambda r: new_ca.fingerprint in r.get("trusted", []),
                what="trust the new CA",
                timeout_s=timeout_s,
                force=force,
            )
            await self._ca_step(
                bundle=both,
                signing=new_ca,
                confirmed=lambda r: r.get("certIssuer") == new_ca.fingerprint,
                what="renew its certificate",
                timeout_s=timeout_s,
                force=force,
            )
        # The last step waits for nobody: a member still on the old CA only is cut off now,
        # which is what --force asked for (without it, step 2 already waited for everyone).
        await self._ca_step(
            bundle=pki.cert_pem(new_ca.cert),
            signing=new_ca,
            confirmed=lambda r: r.get("trusted") == [new_ca.fingerprint],
            what="drop the old CA",
            timeout_s=timeout_s,
            force=True,
        )
        token, _ = self.current_token()
        return {"fingerprint": new_ca.fingerprint, "token": token}

    async def _ca_step(
        self,
        *,
        bundle: bytes,
        signing: pki.CertificateAuthority,
        confirmed: Callable[[dict[str, Any]], bool],
        what: str,
        timeout_s: float,
        force: bool,
    ) -> None:
        assert self.security is not None
        sealed = self.security.seal(pki.key_pem(signing.key), CA_KEY_AAD)
        result = await self.propose(SetCa(CaRecord(bundle, sealed)))
        if result.error:
            raise AgentError(result.error)
        members = {
            n.name: n for n in self.state.nodes.values() if not n.removed and n.name != self.name
        }
        deadline = trio.current_time() + timeout_s
        pending = dict(members)
        while True:
            if confirmed(self.security_report()):
                for name, node in list(pending.items()):
                    report = await self._fetch_json(node, "/v1/internal/security")
                    if report is not None and confirmed(report):
                        del pending[name]
                if not pending:
                    return
            live = self.live_view()
            if force and all(live.get(n) is not NodeStatus.ALIVE for n in pending):
                log.warning("CA rotation: going on without %s", sorted(pending))
                return
            if trio.current_time() > deadline:
                raise AgentError(
                    f"CA rotation paused: {', '.join(sorted(pending))} did not {what} "
                    f"within {timeout_s:.0f} s. Both CAs stay trusted. When they are back, run "
                    "`p2porch ca rotate --finish`; or remove them (p2porch node rm) or finish "
                    "with --force (they must join again)."
                )
            await trio.sleep(0.3)

    async def _fetch_json(self, node: NodeRecord, path: str) -> dict[str, Any] | None:
        assert self.http is not None
        try:
            resp = await self.http.get(f"https://{node.api_address}{path}", timeout=2.0)
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            return None
        return body if resp.status_code == 200 and isinstance(body, dict) else None


@codec.register(507)
@attrs.frozen
class SecretValues:
    """A secret's items, as sealed inside a :class:`SecretRecord` (never stored in clear)."""

    items: tuple[tuple[str, bytes], ...]


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: httpx and trio wrap an ssl failure without its message."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc


def _record_json(node: NodeRecord) -> dict[str, Any]:
    return {
        "name": node.name,
        "address": node.address,
        "apiAddress": node.api_address,
        "raftAddress": node.raft_address,
        "gossipAddress": node.gossip_address,
        "labels": dict(node.labels),
        "cpuMillicores": node.cpu_millicores,
        "memoryBytes": node.memory_bytes,
    }


# Capacities travel as msgpack integers: signed 64-bit at most.
_MAX_CAPACITY = 2**63 - 1


def _record_from_json(body: dict[str, Any]) -> NodeRecord:
    try:
        labels = body.get("labels") or {}
        cpu = int(body.get("cpuMillicores") or 0)
        memory = int(body.get("memoryBytes") or 0)
        record = NodeRecord(
            name=str(body["name"]),
            address=str(body["address"]),
            api_address=str(body["apiAddress"]),
            raft_address=str(body["raftAddress"]),
            gossip_address=str(body["gossipAddress"]),
            labels=tuple(sorted((str(k), str(v)) for k, v in dict(labels).items())),
            cpu_millicores=cpu,
            memory_bytes=memory,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Overflow: int(1e400)
        raise ValueError(f"join request: missing or bad field {exc}") from exc
    if not (0 <= cpu <= _MAX_CAPACITY and 0 <= memory <= _MAX_CAPACITY):
        raise ValueError("join request: cpuMillicores and memoryBytes must be 0 .. 2**63-1")
    return record


class EventLog:
    """The recent change history and live subscribers, for ``GET /v1/events``."""

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.history: list[dict[str, Any]] = []
        self._subscribers: list[trio.MemorySendChannel[dict[str, Any]]] = []

    def add(self, index: int, kind: str, key: str, value: object) -> None:
        event = {
            "index": index,
            "kind": kind,
            "key": key,
            "action": "delete" if value is None else "put",
            "object": to_json(value),
        }
        if kind == "member" and isinstance(value, dict):
            event["action"] = value.get("state", "put")
        self.history.append(event)
        if len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                # A subscriber that cannot keep up is cut off rather than slowing the node.
                self._subscribers.remove(channel)
                channel.close()

    def subscribe(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](1000)
        self._subscribers.append(send)
        return receive


def main_agent(options: AgentOptions) -> int:
    """Run the daemon in the foreground until SIGTERM; the exit code for the CLI."""
    logging.basicConfig(
        level=os.environ.get("P2PORCH_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: node-to-node calls would drown what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    agent = Agent(options)
    try:
        trio.run(agent.run)
    except AgentError as exc:
        print(f"p2porch agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


__all__ = ["Agent", "AgentError", "AgentOptions", "main_agent"]
