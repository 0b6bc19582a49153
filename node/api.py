"""The node API (docs/api.md): HTTP + JSON on every node.

Every connection is TLS 1.3 (node/http.py); who may call what is decided here from the
client certificate (:func:`required_role`): nothing but the liveness probe, the CA bundle and
the join call without one; viewers read; admins read and write; node-to-node endpoints
(``/v1/internal/*``, ``/v1/local/*``) take node certificates only.

Any node accepts every call. Writes go to the Raft leader: a follower forwards the request
as-is to the leader's API and relays the answer, so clients never need to know who leads.
Reads answer from the local applied state, or -- with ``?consistent=1`` -- from the leader
after a ReadIndex round. When no leader is known (quorum lost), writes fail at once with 503
``no_quorum`` while replicas keep running.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio

from p2porch import __version__
from p2porch.common import pki
from p2porch.common.errors import CodecError
from p2porch.consensus.errors import ConsensusError, NotLeader
from p2porch.consensus.service import RequestTimeout
from p2porch.node.errors import ManifestError, NodeError
from p2porch.node.http import HttpError, HttpServer, Request, Response, Router
from p2porch.node.manifest import parse_manifests, to_manifest
from p2porch.node.revisions import (
    NothingToUndo,
    RevisionNotFound,
    describe_change,
    revision_json,
    rolled_back,
    rollout_json,
    undo_target,
)
from p2porch.node.scheduler import NodeStatus, SlotId, rebalance, schedule
from p2porch.node.spec import App, Namespace, replica_name
from p2porch.node.state import (
    Command,
    CommandResult,
    DeleteApp,
    DeleteNamespace,
    DeleteSecret,
    PauseRollout,
    PutApp,
    PutNamespace,
    RemoveNode,
    Rollout,
    SetNodeDrained,
    decode_command,
)
from p2porch.node.traffic import ENDPOINTS_CONTENT_TYPE

if TYPE_CHECKING:
    from p2porch.node.daemon import Agent

PROXY_TIMEOUT_S = 10.0
# Calls the leader may legitimately take long over (it waits for every member to confirm each
# step): a follower forwarding them must not give up first and report the leader unreachable.
LONG_CALLS_TIMEOUT_S = {"/v1/keys/rotate": 120.0, "/v1/ca/rotate": 300.0}
# Secrets live in the log and every snapshot: bounded like Kubernetes' (1 MiB).
MAX_SECRET_BYTES = 1 << 20
FANOUT_TIMEOUT_S = 2.0

# Reachable without a client certificate: a liveness probe, and what a joiner needs before it
# has one (the CA bundle it pins by fingerprint, then the join call carrying the secret).
_OPEN = frozenset({("GET", "/healthz"), ("GET", "/v1/ca"), ("POST", "/v1/join")})
# Reads that still need an admin: they hand out secrets.
_ADMIN_READS = frozenset({"/v1/token"})


def required_role(method: str, path: str) -> str | None:
    """The weakest role allowed to call an endpoint: None (anyone), viewer, admin or node."""
    if (method, path) in _OPEN:
        return None
    if path.startswith(("/v1/internal/", "/v1/local/")):
        return pki.ROLE_NODE
    if method in ("GET", "HEAD") and path not in _ADMIN_READS:
        return pki.ROLE_VIEWER
    return pki.ROLE_ADMIN


def authorize(request: Request) -> None:
    """Raise 401/403 unless the request's certificate may call its endpoint."""
    needed = required_role(request.method, request.path)
    if needed is None:
        return
    identity = request.identity
    if identity is None:
        raise HttpError(
            401,
            "unauthenticated",
            "this endpoint needs a client certificate of the cluster (the client.yaml written "
            "in a node's data dir, or one from: p2porch user create)",
        )
    if identity.role == pki.ROLE_NODE:
        return  # nodes forward users' calls after checking them here, on the first node
    if needed == pki.ROLE_NODE:
        raise HttpError(403, "forbidden", f"{request.path} is for nodes only")
    if needed == pki.ROLE_ADMIN and identity.role != pki.ROLE_ADMIN:
        raise HttpError(
            403,
            "forbidden",
            f"user {identity.name} has role {identity.role}: it may read, not "
            f"{request.method} {request.path}",
        )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def to_json(value: object) -> Any:
    """attrs records, enums and containers -> JSON-ready values with camelCase keys."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (App, Namespace)):
        return to_manifest(value)
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, (str, int)) else value.name.lower()
    if attrs.has(type(value)):
        fields = attrs.fields(type(value))  # type: ignore[arg-type]
        return {_camel(f.name): to_json(getattr(value, f.name)) for f in fields}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        return [to_json(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _rollout_word(rollout: Rollout | None, revision: int) -> str:
    """``complete`` | ``progressing`` | ``paused`` for the app's current revision."""
    if rollout is None or rollout.revision != revision:
        return "complete"
    return "paused" if rollout.paused else rollout.state


def _hint(key: bytes) -> str:
    """A short public name for a gossip key (never the key): first 8 hex of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:8]


def _manifest_problems(exc: ManifestError) -> list[dict[str, Any]]:
    return [
        {"path": getattr(p, "path", ""), "message": str(p)} for p in getattr(exc, "problems", [])
    ]


def parse_documents(documents: object) -> list[App | Namespace]:
    """Manifest documents as JSON values -> validated objects (the same rules as ``apply -f``)."""
    if not isinstance(documents, list) or not documents:
        raise HttpError(400, "invalid", "expected a non-empty list of manifest documents")
    # JSON is YAML: the manifest parser gives the same precise, path-named errors either way.
    text = "\n---\n".join(json.dumps(doc) for doc in documents)
    try:
        return list(parse_manifests(text, "request"))
    except ManifestError as exc:
        raise HttpError(400, "invalid", str(exc), _manifest_problems(exc)) from None


async def _parse_off_loop(documents: object) -> list[App | Namespace]:
    """Parse in a worker thread: YAML parsing runs at ~300 KB/s, and a large request parsed on
    the event loop would stall Raft heartbeats and gossip timers (a leader would be deposed)."""
    return await trio.to_thread.run_sync(parse_documents, documents)


class Api:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.router = Router()
        r = self.router.add
        r("GET", "/healthz", self.healthz)
        r("GET", "/v1/status", self.status)
        r("GET", "/v1/nodes", self.nodes)
        r("GET", "/v1/nodes/{name}", self.node)
        r("POST", "/v1/nodes/{name}/drain", self.drain)
        r("DELETE", "/v1/nodes/{name}", self.remove_node)
        r("POST", "/v1/leave", self.leave)
        r("POST", "/v1/rebalance", self.rebalance)
        r("GET", "/v1/token", self.token)
        r("POST", "/v1/token/rotate", self.rotate_token)
        r("POST", "/v1/join", self.join)
        r("GET", "/v1/ca", self.ca)
        r("POST", "/v1/ca/rotate", self.rotate_ca)
        r("GET", "/v1/internal/security", self.internal_security)
        r("POST", "/v1/users", self.create_user)
        r("POST", "/v1/keys/rotate", self.rotate_keys)
        r("GET", "/v1/internal/keyring", self.internal_keyring)
        r("GET", "/v1/internal/endpoints", self.internal_endpoints)
        r("GET", "/v1/endpoints", self.endpoints)
        r("GET", "/v1/secrets", self.secrets)
        r("PUT", "/v1/secrets/{ns}/{name}", self.put_secret)
        r("DELETE", "/v1/secrets/{ns}/{name}", self.delete_secret)
        r("GET", "/v1/namespaces", self.namespaces)
        r("PUT", "/v1/namespaces/{name}", self.put_namespace)
        r("DELETE", "/v1/namespaces/{name}", self.delete_namespace)
        r("GET", "/v1/apps", self.apps)
        r("GET", "/v1/apps/{ns}/{name}", self.app)
        r("PUT", "/v1/apps/{ns}/{name}", self.put_app)
        r("DELETE", "/v1/apps/{ns}/{name}", self.delete_app)
        r("POST", "/v1/apps/{ns}/{name}/scale", self.scale)
        r("GET", "/v1/apps/{ns}/{name}/rollout", self.rollout)
        r("GET", "/v1/apps/{ns}/{name}/revisions", self.revisions)
        r("POST", "/v1/apps/{ns}/{name}/rollout/pause", self.rollout_pause)
        r("POST", "/v1/apps/{ns}/{name}/rollout/resume", self.rollout_resume)
        r("POST", "/v1/apps/{ns}/{name}/rollout/undo", self.rollout_undo)
        r("POST", "/v1/apply", self.apply)
        r("POST", "/v1/delete", self.delete_documents)
        r("GET", "/v1/replicas", self.replicas)
        r("GET", "/v1/local/replicas", self.local_replicas)
        r("GET", "/v1/replicas/{ns}/{name}/logs", self.logs)
        r("POST", "/v1/replicas/{ns}/{name}/exec", self.exec)
        r("GET", "/v1/events", self.events)
        r("POST", "/v1/internal/propose", self.internal_propose)
        security = agent.security
        self.server = HttpServer(
            self.handle,
            tls=None if security is None else security.contexts,
            authorize=None if security is None else agent.api_authorizer(),
        )

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.server.serve(host, port, task_status=task_status)

    async def handle(self, request: Request) -> Response:
        authorize(request)
        try:
            return await self.router(request)
        except HttpError:
            raise
        except NotLeader as exc:
            raise HttpError(503, "no_quorum", f"no leader reachable ({exc})") from None
        except RequestTimeout as exc:
            raise HttpError(504, "timeout", str(exc)) from None
        except ConsensusError as exc:
            raise HttpError(503, "no_quorum", str(exc)) from None
        except NodeError as exc:
            raise HttpError(400, "invalid", str(exc)) from None

    # ------------------------------------------------------------------ plumbing

    @property
    def state(self) -> Any:
        return self.agent.state

    def _leader_api(self) -> str | None:
        raft = self.agent.raft
        assert raft is not None
        leader = raft.leader_id
        if leader is None:
            return None
        node = self.state.nodes.get(leader)
        return None if node is None else str(node.api_address)

    async def _proxy(self, request: Request, address: str) -> Response:
        assert self.agent.http is not None
        url = f"https://{address}{request.path}"
        try:
            resp = await self.agent.http.request(
                request.method,
                url,
                params=request.query,
                content=request.body,
                headers={"content-type": request.headers.get("content-type", "application/json")},
                timeout=LONG_CALLS_TIMEOUT_S.get(request.path, PROXY_TIMEOUT_S),
            )
        except httpx.HTTPError as exc:
            raise HttpError(502, "proxy_failed", f"cannot reach {address}: {exc}") from None
        return Response(
            status=resp.status_code,
            body=resp.content,
            content_type=resp.headers.get("content-type", "application/json"),
        )

    async def _on_leader(self, request: Request) -> Response | None:
        """None when this node leads (handle locally); else the leader's answer, relayed."""
        raft = self.agent.raft
        assert raft is not None
        if raft.is_leader:
            return None
        if request.headers.get("x-p2porch-forwarded"):
            raise HttpError(503, "no_quorum", "leadership moved while forwarding; retry")
        address = self._leader_api()
        if address is None:
            raise HttpError(
                503,
                "no_quorum",
                "no leader: the cluster has lost its majority; writes are refused until it "
                "recovers (running replicas keep running)",
            )
        request = attrs.evolve(request, headers={**request.headers, "x-p2porch-forwarded": "1"})
        try:
            return await self._proxy(request, address)
        except HttpError as exc:
            if exc.code != "proxy_failed":
                raise
            raise HttpError(
                503,
                "no_quorum",
                f"the leader ({address}) is unreachable from this node: writes are refused "
                "until it or a new majority answers (running replicas keep running)",
            ) from None

    async def _consistent(self, request: Request) -> Response | None:
        """For ``?consistent=1`` reads on a follower, answer from the leader."""
        if not request.flag("consistent"):
            return None
        raft = self.agent.raft
        assert raft is not None
        if raft.is_leader:
            await raft.read_barrier(timeout_s=5)
            return None
        return await self._on_leader(request)

    async def _commit(self, command: Command) -> CommandResult:
        try:
            result = await self.agent.propose(command)
        except NotLeader as exc:
            raise HttpError(503, "no_quorum", f"leadership lost: {exc}") from None
        if result.error:
            status, code = (404, "not_found") if "not found" in result.error else (409, "conflict")
            raise HttpError(status, code, result.error)
        return result

    # ------------------------------------------------------------------ cluster

    async def healthz(self, request: Request) -> Response:
        return Response.json({"ok": True})

    def _role(self, name: str) -> str:
        raft = self.agent.raft
        assert raft is not None
        membership = raft.status().membership
        if name == raft.leader_id:
            return "leader"
        if name in membership.voters:
            return "voter"
        if name in membership.learners:
            return "learner"
        return "none"

    async def status(self, request: Request) -> Response:
        raft, gossip = self.agent.raft, self.agent.gossip
        assert raft is not None and gossip is not None
        st = raft.status()
        counts = {"alive": 0, "suspect": 0, "dead": 0, "left": 0}
        for member in gossip.members():
            key = member.state.name.lower()
            counts[key] = counts.get(key, 0) + 1
        return Response.json(
            {
                "node": self.agent.name,
                "address": self.agent.options.advertise,
                "leader": st.leader_id,
                "term": st.term,
                "role": self._role(self.agent.name),
                "quorum": st.leader_id is not None,
                "commitIndex": st.commit_index,
                "appliedIndex": st.applied_index,
                "voters": sorted(st.membership.voters),
                "learners": sorted(st.membership.learners),
                "members": counts,
                "version": __version__,
                # What was dropped at each boundary: refused TLS peers, bad frames, packets
                # failing authentication (``gossip.bad_auth``), ...
                "counters": self._counters(),
                # The data plane: endpoint exchange, mesh, ingress, DNS (node/traffic.py).
                "traffic": self.agent.traffic.status() if self.agent.traffic else {},
            }
        )

    def _counters(self) -> dict[str, Any]:
        raft, gossip = self.agent.raft, self.agent.gossip
        assert raft is not None and gossip is not None
        return {
            "raft": attrs.asdict(raft.counters),
            "raftTlsRefused": getattr(raft.transport, "refused", 0),
            "gossip": gossip.stats(),
            "gossipTlsRefused": getattr(gossip.transport_in_use, "refused", 0),
            "api": attrs.asdict(self.server.counters),
        }

    def _node_json(self, name: str) -> dict[str, Any]:
        node = self.state.nodes[name]
        return {
            "name": node.name,
            "address": node.address,
            "apiAddress": node.api_address,
            "status": self.agent.member_status(name),
            "role": self._role(name),
            "labels": dict(node.labels),
            "cpuMillicores": node.cpu_millicores,
            "memoryBytes": node.memory_bytes,
            "drained": node.drained,
            "removed": node.removed,
            "replicas": sum(1 for p in self.state.placements.values() if p.node == name),
        }

    async def nodes(self, request: Request) -> Response:
        if (forwarded := await self._consistent(request)) is not None:
            return forwarded
        return Response.json([self._node_json(n) for n in sorted(self.state.nodes)])

    async def node(self, request: Request) -> Response:
        name = request.params["name"]
        if name not in self.state.nodes:
            raise HttpError(404, "not_found", f"node {name!r} not found")
        body = self._node_json(name)
        body["placements"] = [replica_name(p.app, p.slot) for p in self.state.placements_for(name)]
        return Response.json(body)

    async def drain(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        body = request.json()
        drained = body.get("drained", True) if isinstance(body, dict) else True
        if not isinstance(drained, bool):
            raise HttpError(400, "invalid", "drained: expected true or false")
        await self._commit(SetNodeDrained(request.params["name"], drained))
        if drained:
            # Draining moves the replicas away now; undraining never shuffles them back.
            await self._commit_moves(drain=request.params["name"])
        return Response.json({"name": request.params["name"], "drained": drained})

    async def _commit_moves(self, drain: str | None = None) -> list[dict[str, str]]:
        """Commit the moves of a drain (everything off ``drain``) or of a rebalance."""
        state = self.state
        nodes = state.sched_nodes(self.agent.live_view())
        if drain is not None:
            # Forget the drained node's placements: the scheduler places those slots anew
            # (where nothing can take one, it stays where it is, pending a reason).
            slots = {s: n for s, n in state.slot_map().items() if n != drain}
            decision = schedule(state.sched_apps(), nodes, slots)
        else:
            decision = rebalance(state.sched_apps(), nodes, state.slot_map())
        command = state.decision_command(decision)
        moves = []
        before = state.slot_map()
        for slot, target in decision.place:
            moves.append(
                {
                    "replica": replica_name(slot.app.partition("/")[2], slot.slot),
                    "from": before.get(slot, ""),
                    "to": target,
                }
            )
        if command is not None:
            await self._commit(command)
        return moves

    async def remove_node(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        name = request.params["name"]
        if name == self.agent.name:
            raise HttpError(409, "conflict", "a node cannot remove itself: use `p2porch leave`")
        await self._commit(RemoveNode(name))
        return Response.json({"name": name, "removed": True})

    async def leave(self, request: Request) -> Response:
        agent = self.agent
        assert agent._nursery is not None
        agent._nursery.start_soon(agent.leave_cluster)
        return Response.json({"name": agent.name, "leaving": True})

    async def rebalance(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        return Response.json({"moves": await self._commit_moves()})

    async def token(self, request: Request) -> Response:
        token, expires_at = self.agent.current_token()
        return Response.json({"token": token, "expiresAt": expires_at})

    async def rotate_token(self, request: Request) -> Response:
        body = request.json()
        ttl = body.get("ttlSeconds") if isinstance(body, dict) else None
        if ttl is not None and (
            not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0
        ):
            raise HttpError(400, "invalid", "ttlSeconds: expected a positive number of seconds")
        token, expires_at = await self.agent.rotate_token(ttl)
        return Response.json({"token": token, "expiresAt": expires_at})

    async def ca(self, request: Request) -> Response:
        security = self.agent.security
        assert security is not None
        return Response.json(
            {"ca": security.ca_bundle.decode(), "fingerprint": security.fingerprint}
        )

    async def rotate_ca(self, request: Request) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "invalid", "expected a JSON object")
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        try:
            result = await self.agent.rotate_ca(
                finish_only=bool(body.get("finish")), force=bool(body.get("force"))
            )
        except NodeError as exc:
            raise HttpError(409, "conflict", str(exc)) from None
        return Response.json(result)

    async def internal_security(self, request: Request) -> Response:
        return Response.json(self.agent.security_report())

    async def create_user(self, request: Request) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "invalid", "expected a JSON object with name, role and csr")
        name, role, csr = body.get("name"), body.get("role"), body.get("csr")
        if not isinstance(name, str) or not isinstance(role, str) or not isinstance(csr, str):
            raise HttpError(400, "invalid", "name, role and csr are required strings")
        if role not in pki.USER_ROLES:
            raise HttpError(
                400, "invalid", f"role must be one of {', '.join(pki.USER_ROLES)}, not {role!r}"
            )
        try:
            pki.check_name(name)
            cert = self.agent.issue_user(name, role, csr.encode())
        except NodeError as exc:
            raise HttpError(400, "invalid", str(exc)) from None
        except pki.PkiError as exc:
            raise HttpError(400, "invalid", str(exc)) from None
        security = self.agent.security
        assert security is not None
        return Response.json(
            {"certificate": cert.decode(), "ca": security.ca_bundle.decode(), "role": role}
        )

    async def rotate_keys(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        return Response.json(await self.agent.rotate_gossip_key())

    async def internal_endpoints(self, request: Request) -> Response:
        """This node's endpoint record (node/endpoints.py), codec-encoded, for peers."""
        traffic = self.agent.traffic
        if traffic is None:
            raise HttpError(503, "unavailable", "the data plane is not running yet")
        return Response(body=traffic.local_record(), content_type=ENDPOINTS_CONTENT_TYPE)

    async def endpoints(self, request: Request) -> Response:
        """Every endpoint this node knows (``?namespace=``, ``?app=``; ``?all=1`` includes
        unready ones): what its mesh, ingress and DNS route to right now."""
        traffic = self.agent.traffic
        if traffic is None:
            return Response.json([])
        namespace, app = request.query.get("namespace"), request.query.get("app")
        ready_only = request.query.get("all") not in ("1", "true")
        rows = []
        for node in traffic.table.nodes():
            record = traffic.table.record(node)
            if record is None:
                continue
            for ep in record.endpoints:
                if (namespace and ep.namespace != namespace) or (app and ep.app != app):
                    continue
                if ready_only and not ep.ready:
                    continue
                rows.append(to_json(ep))
        return Response.json(rows)

    async def internal_keyring(self, request: Request) -> Response:
        assert self.agent.gossip is not None
        keyring = self.agent.gossip.keyring
        return Response.json(
            {
                "primary": _hint(keyring.primary),
                "keys": [_hint(k) for k in keyring.installed_keys()],
                "version": self.agent.applied_gossip_keys_version,
            }
        )

    async def secrets(self, request: Request) -> Response:
        namespace = request.query.get("namespace")
        rows = [
            {
                "namespace": s.namespace,
                "name": s.name,
                "keys": list(s.keys),
                "version": s.version,
                "usedBy": sorted(
                    a.meta.name
                    for a in self.state.apps.values()
                    if a.meta.namespace == s.namespace and s.name in a.spec.secrets
                ),
            }
            for _, s in sorted(self.state.secrets.items())
            if namespace is None or s.namespace == namespace
        ]
        return Response.json(rows)

    async def put_secret(self, request: Request) -> Response:
        ns, name = request.params["ns"], request.params["name"]
        body = request.json()
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not data:
            raise HttpError(400, "invalid", 'expected {"data": {"KEY": "<base64 value>", ...}}')
        values: dict[str, bytes] = {}
        for key, value in data.items():
            if not isinstance(value, str):
                raise HttpError(400, "invalid", f"data.{key}: expected a base64 string")
            try:
                values[str(key)] = base64.b64decode(value, validate=True)
            except ValueError:
                raise HttpError(400, "invalid", f"data.{key}: not valid base64") from None
        size = sum(len(k) + len(v) for k, v in values.items())
        if size > MAX_SECRET_BYTES:
            raise HttpError(
                413, "too_large", f"secret of {size} bytes; at most {MAX_SECRET_BYTES} bytes"
            )
        try:
            result = await self.agent.put_secret(ns, name, values)
        except NodeError as exc:
            raise HttpError(400, "invalid", str(exc)) from None
        self._raise_result(result)
        return Response.json({"namespace": ns, "name": name, "keys": sorted(values)})

    async def delete_secret(self, request: Request) -> Response:
        ns, name = request.params["ns"], request.params["name"]
        result = await self.agent.submit(DeleteSecret(ns, name))
        self._raise_result(result)
        return Response.json({"deleted": f"{ns}/{name}"})

    @staticmethod
    def _raise_result(result: CommandResult) -> None:
        if result.error:
            status, code = (404, "not_found") if "not found" in result.error else (409, "conflict")
            raise HttpError(status, code, result.error)

    async def join(self, request: Request) -> Response:
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "invalid", "join: expected a JSON object")
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        try:
            return Response.json(await self.agent.admit(body))
        except PermissionError as exc:
            raise HttpError(403, "forbidden", str(exc)) from None
        except TimeoutError as exc:
            raise HttpError(503, "unavailable", str(exc)) from None
        except FileExistsError as exc:
            raise HttpError(409, "conflict", str(exc)) from None
        except ValueError as exc:
            raise HttpError(400, "invalid", str(exc)) from None

    # ------------------------------------------------------------------ namespaces and apps

    async def namespaces(self, request: Request) -> Response:
        if (forwarded := await self._consistent(request)) is not None:
            return forwarded
        return Response.json([to_json(ns) for _, ns in sorted(self.state.namespaces.items())])

    async def put_namespace(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        try:
            namespace = Namespace(request.params["name"])
        except ValueError as exc:
            raise HttpError(400, "invalid", str(exc)) from None
        await self._commit(PutNamespace(namespace))
        return Response.json(to_json(self.state.namespaces[namespace.name]))

    async def delete_namespace(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        await self._commit(DeleteNamespace(request.params["name"]))
        return Response.json({"deleted": request.params["name"]})

    def _app_json(self, app: App) -> dict[str, Any]:
        key = f"{app.meta.namespace}/{app.meta.name}"
        body: dict[str, Any] = to_manifest(app)
        placed = [p for s, p in self.state.placements.items() if s.app == key]
        pending = {
            replica_name(app.meta.name, s.slot): p.reason
            for s, p in self.state.pending.items()
            if s.app == key
        }
        failed = sum(1 for s, f in self.state.facts.items() if s.app == key and f.state == "failed")
        body["status"] = {
            "replicas": app.spec.replicas,
            "placed": len(placed),
            "pending": len(pending),
            "failed": failed,
            "pendingReasons": pending,
            # The revision new and updated replicas run, and where its rollout stands.
            "revision": self.state.current_revision(key),
            "rollout": _rollout_word(
                self.state.rollouts.get(key), self.state.current_revision(key)
            ),
        }
        return body

    async def apps(self, request: Request) -> Response:
        if (forwarded := await self._consistent(request)) is not None:
            return forwarded
        namespace = request.query.get("namespace")
        return Response.json(
            [
                self._app_json(app)
                for _, app in sorted(self.state.apps.items())
                if namespace is None or app.meta.namespace == namespace
            ]
        )

    def _get_app(self, namespace: str, name: str) -> App:
        app = self.state.apps.get(f"{namespace}/{name}")
        if app is None:
            raise HttpError(404, "not_found", f"app {namespace}/{name} not found")
        return app  # type: ignore[no-any-return]

    async def app(self, request: Request) -> Response:
        if (forwarded := await self._consistent(request)) is not None:
            return forwarded
        return Response.json(
            self._app_json(self._get_app(request.params["ns"], request.params["name"]))
        )

    async def put_app(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "invalid", "expected an App manifest object")
        expected = body.pop("expectedGeneration", None)
        if expected is not None and not isinstance(expected, int):
            raise HttpError(400, "invalid", "expectedGeneration: expected an integer")
        (obj,) = await _parse_off_loop([body])
        if not isinstance(obj, App):
            raise HttpError(400, "invalid", "expected kind: App")
        if (obj.meta.namespace, obj.meta.name) != (request.params["ns"], request.params["name"]):
            raise HttpError(400, "invalid", "metadata.name/namespace do not match the URL")
        old = self.state.apps.get(f"{obj.meta.namespace}/{obj.meta.name}")
        cause = describe_change(None if old is None else old.spec, obj.spec)
        await self._commit(PutApp(obj, expected, cause=cause, at_s=time.time()))
        return Response.json(self._app_json(self._get_app(obj.meta.namespace, obj.meta.name)))

    async def delete_app(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        await self._commit(DeleteApp(request.params["ns"], request.params["name"]))
        return Response.json({"deleted": f"{request.params['ns']}/{request.params['name']}"})

    async def scale(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        body = request.json()
        replicas = body.get("replicas") if isinstance(body, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise HttpError(400, "invalid", "replicas: expected an integer >= 0")
        app = self._get_app(request.params["ns"], request.params["name"])
        try:
            spec = attrs.evolve(app.spec, replicas=replicas)
        except ValueError as exc:
            raise HttpError(400, "invalid", f"replicas: {exc}") from None
        # A scale never changes the template, so it records no revision and no cause.
        await self._commit(
            PutApp(attrs.evolve(app, spec=spec), app.meta.generation, at_s=time.time())
        )
        return Response.json(self._app_json(self._get_app(app.meta.namespace, app.meta.name)))

    async def apply(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        body = request.json()
        objs = await _parse_off_loop(body.get("documents") if isinstance(body, dict) else None)
        results = []
        # Namespaces first, so apps in a namespace created by the same file land.
        for obj in sorted(objs, key=lambda o: 0 if isinstance(o, Namespace) else 1):
            if isinstance(obj, Namespace):
                existed = obj.name in self.state.namespaces
                result = await self._commit(PutNamespace(obj))
                results.append(
                    {
                        "kind": "Namespace",
                        "name": obj.name,
                        "namespace": "",
                        "action": "unchanged"
                        if not result.changes
                        else ("configured" if existed else "created"),
                    }
                )
            else:
                old = self.state.apps.get(f"{obj.meta.namespace}/{obj.meta.name}")
                existed = old is not None
                cause = describe_change(None if old is None else old.spec, obj.spec)
                result = await self._commit(PutApp(obj, cause=cause, at_s=time.time()))
                results.append(
                    {
                        "kind": "App",
                        "name": obj.meta.name,
                        "namespace": obj.meta.namespace,
                        "action": "unchanged"
                        if not result.changes
                        else ("configured" if existed else "created"),
                    }
                )
        return Response.json({"results": results})

    async def delete_documents(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        body = request.json()
        objs = await _parse_off_loop(body.get("documents") if isinstance(body, dict) else None)
        results = []
        for obj in sorted(objs, key=lambda o: 1 if isinstance(o, Namespace) else 0):
            if isinstance(obj, Namespace):
                if obj.name not in self.state.namespaces:
                    results.append({"kind": "Namespace", "name": obj.name, "action": "absent"})
                    continue
                await self._commit(DeleteNamespace(obj.name))
                results.append({"kind": "Namespace", "name": obj.name, "action": "deleted"})
            else:
                key = f"{obj.meta.namespace}/{obj.meta.name}"
                if key not in self.state.apps:
                    results.append({"kind": "App", "name": key, "action": "absent"})
                    continue
                await self._commit(DeleteApp(obj.meta.namespace, obj.meta.name))
                results.append({"kind": "App", "name": key, "action": "deleted"})
        return Response.json({"results": results})

    # ------------------------------------------------------------------ rollouts

    def _rollout_body(self, namespace: str, name: str) -> dict[str, Any]:
        key = f"{namespace}/{name}"
        app = self._get_app(namespace, name)
        # The owners' word, as the endpoint exchange brought it to this node.
        statuses = self.agent.replica_statuses()
        state = self.state
        placements = [p for s, p in state.placements.items() if s.app == key]
        return rollout_json(
            app, state.current_revision(key), state.rollouts.get(key), placements, statuses
        )

    async def rollout(self, request: Request) -> Response:
        if (forwarded := await self._consistent(request)) is not None:
            return forwarded
        return Response.json(self._rollout_body(request.params["ns"], request.params["name"]))

    async def revisions(self, request: Request) -> Response:
        if (forwarded := await self._consistent(request)) is not None:
            return forwarded
        ns, name = request.params["ns"], request.params["name"]
        self._get_app(ns, name)
        key = f"{ns}/{name}"
        current = self.state.current_revision(key)
        history = self.state.revisions.get(key, ())
        return Response.json([revision_json(r, current) for r in history])

    async def _pause(self, request: Request, paused: bool) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        ns, name = request.params["ns"], request.params["name"]
        await self._commit(PauseRollout(ns, name, paused, time.time()))
        return Response.json(self._rollout_body(ns, name))

    async def rollout_pause(self, request: Request) -> Response:
        return await self._pause(request, True)

    async def rollout_resume(self, request: Request) -> Response:
        return await self._pause(request, False)

    async def rollout_undo(self, request: Request) -> Response:
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        ns, name = request.params["ns"], request.params["name"]
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "invalid", 'expected {} or {"toRevision": N}')
        to_revision = body.get("toRevision")
        if to_revision is not None and (
            not isinstance(to_revision, int) or isinstance(to_revision, bool) or to_revision < 1
        ):
            raise HttpError(400, "invalid", "toRevision: expected an integer >= 1")
        app = self._get_app(ns, name)
        history = self.state.revisions.get(f"{ns}/{name}", ())
        try:
            target = undo_target(history, to_revision)
            undone = rolled_back(app, target)
        except RevisionNotFound as exc:
            raise HttpError(404, "not_found", f"app {ns}/{name}: {exc}") from None
        except NothingToUndo as exc:
            raise HttpError(409, "conflict", f"app {ns}/{name}: {exc}") from None
        await self._commit(
            PutApp(
                undone,
                app.meta.generation,
                cause=f"undo to revision {target.revision}",
                at_s=time.time(),
            )
        )
        return Response.json(self._rollout_body(ns, name))

    # ------------------------------------------------------------------ replicas

    def _local_statuses(self) -> list[dict[str, Any]]:
        reconciler = self.agent.reconciler
        if reconciler is None:
            return []
        return [s.to_json() for s in reconciler.statuses()]

    async def local_replicas(self, request: Request) -> Response:
        return Response.json(self._local_statuses())

    async def _node_statuses(self, node_name: str) -> dict[str, dict[str, Any]] | None:
        """Statuses ``node_name`` reports, keyed by namespace/name (None: unreachable)."""
        rows: Any
        if node_name == self.agent.name:
            rows = self._local_statuses()
        else:
            node = self.state.nodes.get(node_name)
            if node is None or self.agent.live_view().get(node_name) in (
                NodeStatus.DEAD,
                NodeStatus.LEFT,
                NodeStatus.REMOVED,
            ):
                return None
            assert self.agent.http is not None
            try:
                resp = await self.agent.http.get(
                    f"https://{node.api_address}/v1/local/replicas", timeout=FANOUT_TIMEOUT_S
                )
                rows = resp.json() if resp.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                rows = None
            if not isinstance(rows, list):
                return None
        return {f"{r.get('namespace')}/{r.get('name')}": r for r in rows if isinstance(r, dict)}

    async def replicas(self, request: Request) -> Response:
        namespace = request.query.get("namespace")
        app_filter = request.query.get("app")
        node_filter = request.query.get("node")
        state = self.state
        rows: list[dict[str, Any]] = []
        wanted_nodes = sorted({p.node for p in state.placements.values()})
        reports: dict[str, dict[str, dict[str, Any]] | None] = {}

        async def fetch(name: str) -> None:
            reports[name] = await self._node_statuses(name)

        async with trio.open_nursery() as nursery:
            for name in wanted_nodes:
                nursery.start_soon(fetch, name)
        for key, app in sorted(state.apps.items()):
            ns, name = app.meta.namespace, app.meta.name
            if namespace is not None and ns != namespace:
                continue
            if app_filter is not None and name != app_filter:
                continue
            for slot in range(app.spec.replicas):
                sid = SlotId(key, slot)
                rname = replica_name(name, slot)
                placement = state.placements.get(sid)
                row: dict[str, Any] = {
                    "name": rname,
                    "app": name,
                    "namespace": ns,
                    "slot": slot,
                    "node": placement.node if placement else None,
                    "generation": placement.generation if placement else app.meta.generation,
                    "state": "pending",
                    "ready": False,
                    "restarts": 0,
                    "exitCode": None,
                    "reason": "",
                    "lastTermination": "",
                }
                if placement is None:
                    pend = state.pending.get(sid)
                    row["reason"] = pend.reason if pend else "waiting for the scheduler"
                else:
                    report = reports.get(placement.node)
                    fact = state.facts.get(sid)
                    if report is None:
                        row["state"] = "unknown"
                        row["reason"] = f"node {placement.node} is unreachable"
                    elif f"{ns}/{rname}" in report:
                        reported = report[f"{ns}/{rname}"]
                        row.update({k: v for k, v in reported.items() if k not in ("name",)})
                        row["node"] = placement.node
                        # The owner judges readiness (running and its readiness probe passing).
                        row["ready"] = bool(
                            reported.get("ready", reported.get("state") == "running")
                        )
                    else:
                        row["state"] = "pending"
                        row["reason"] = "assigned; waiting for the node to start it"
                    if fact is not None and row["state"] not in ("running",):
                        row["state"] = fact.state
                        row["reason"] = fact.reason
                if node_filter is not None and row["node"] != node_filter:
                    continue
                rows.append(row)
        return Response.json(rows)

    def _replica_owner(self, namespace: str, name: str) -> str:
        for placement in self.state.placements.values():
            if (
                placement.namespace == namespace
                and replica_name(placement.app, placement.slot) == name
            ):
                return str(placement.node)
        raise HttpError(404, "not_found", f"replica {namespace}/{name} not found or not placed")

    def _local_container(self, namespace: str, name: str) -> str:
        reconciler = self.agent.reconciler
        if reconciler is None:
            raise HttpError(404, "not_found", "this node runs no containers")
        for status in reconciler.statuses():
            if status.namespace == namespace and status.name == name and status.container_id:
                return str(status.container_id)
        raise HttpError(404, "not_found", f"replica {namespace}/{name} has no container here")

    async def logs(self, request: Request) -> Response:
        ns, name = request.params["ns"], request.params["name"]
        owner = self._replica_owner(ns, name)
        if owner != self.agent.name:
            return await self._stream_proxy(request, owner)
        container = self._local_container(ns, name)
        follow = request.flag("follow")
        tail_raw = request.query.get("tail", "all")
        tail: int | str = int(tail_raw) if tail_raw.isdigit() else "all"
        runtime = self.agent.reconciler.runtime

        async def chunks() -> AsyncIterator[bytes]:
            stream = runtime.logs(container, follow=follow, tail=tail)
            try:
                async for line in stream:  # lines arrive without their newline
                    yield line + b"\n"
            finally:
                await stream.aclose()

        return Response(content_type="application/octet-stream", stream=chunks())

    async def _stream_proxy(self, request: Request, owner: str) -> Response:
        node = self.state.nodes.get(owner)
        if node is None:
            raise HttpError(502, "proxy_failed", f"node {owner} unknown")
        assert self.agent.http is not None
        client = self.agent.http
        url = f"https://{node.api_address}{request.path}"
        try:
            req = client.build_request(request.method, url, params=request.query, timeout=None)
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise HttpError(502, "proxy_failed", f"cannot reach {owner}: {exc}") from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return Response(
            status=resp.status_code,
            content_type=resp.headers.get("content-type", "application/octet-stream"),
            stream=chunks(),
        )

    async def exec(self, request: Request) -> Response:
        ns, name = request.params["ns"], request.params["name"]
        owner = self._replica_owner(ns, name)
        if owner != self.agent.name:
            node = self.state.nodes[owner]
            return await self._proxy(request, node.api_address)
        body = request.json()
        command = body.get("command") if isinstance(body, dict) else None
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) for c in command)
        ):
            raise HttpError(400, "invalid", "command: expected a non-empty list of strings")
        container = self._local_container(ns, name)
        code, output = await self.agent.reconciler.runtime.exec(container, command)
        return Response.json({"exitCode": code, "output": output.decode("utf-8", "replace")})

    async def internal_propose(self, request: Request) -> Response:
        """Node-to-node: commit a codec-encoded command on the leader (replica facts)."""
        if (forwarded := await self._on_leader(request)) is not None:
            return forwarded
        try:
            command = decode_command(request.body)
        except CodecError as exc:
            raise HttpError(400, "invalid", f"undecodable command: {exc}") from None
        result = await self.agent.propose(command)
        return Response.json({"error": result.error, "changes": len(result.changes)})

    # ------------------------------------------------------------------ events

    async def events(self, request: Request) -> Response:
        history = list(self.agent.events.history)
        if not request.flag("follow"):
            body = b"".join(json.dumps(e).encode() + b"\n" for e in history)
            return Response(body=body, content_type="application/x-ndjson")
        receive = self.agent.events.subscribe()

        async def lines() -> AsyncIterator[bytes]:
            for event in history[-100:]:
                yield json.dumps(event).encode() + b"\n"
            async with receive:
                async for event in receive:
                    yield json.dumps(event).encode() + b"\n"

        return Response(content_type="application/x-ndjson", stream=lines())


__all__ = ["Api", "parse_documents", "to_json"]
