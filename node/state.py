"""The replicated desired state: what every node agrees the cluster should look like.

This is the Raft state machine of the node layer. Every change -- an app applied, a node
drained, a placement the scheduler decided -- is a :data:`Command` committed to the log and
applied here in log order on every node, so every node holds the same :class:`ClusterState`.
``apply`` must therefore be deterministic: no clocks, no randomness, no I/O, no iteration over
unordered sets into results. Volatile facts (is a replica healthy right now) travel by gossip,
not through here; only terminal facts (a replica that cannot start) are logged.

Generations: an App's ``meta.generation`` bumps on every change to its spec. A placement
records the generation it was made for, so a reconciler can tell a container built from an
older spec (to be replaced) from a current one.

Errors in a command (an app in a namespace that does not exist, a stale expected generation)
are *results*, not exceptions that stop the log: :meth:`ClusterState.apply` returns a
:class:`CommandResult` with ``error`` set, and the API reports it to the client that proposed it.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from p2porch.common import codec
from p2porch.node.errors import NodeError
from p2porch.node.scheduler import Decision, NodeStatus, SchedApp, SchedNode, SlotId
from p2porch.node.spec import App, AppSpec, Namespace, Protocol, with_settings_of

DEFAULT_NAMESPACE = "default"


class StateError(NodeError):
    """A command that the desired state refuses (not found, conflict, stale generation)."""


# --------------------------------------------------------------------------- records


@codec.register(250)
@attrs.frozen
class NodeRecord:
    """A cluster member as the log knows it: identity, where to reach it, what it offers.

    ``api_address`` is where other nodes forward API calls (log/exec proxying); labels and
    capacity come from the node's flags at join and feed constraint and capacity checks.
    """

    name: str
    address: str
    api_address: str
    raft_address: str
    gossip_address: str
    labels: tuple[tuple[str, str], ...] = ()
    cpu_millicores: int = 0
    memory_bytes: int = 0
    drained: bool = False
    removed: bool = False
    # SHA-256 of the public key of the node's certificate: a peer presenting a certificate
    # with this node's name but another key is refused (renewals keep the key).
    cert_key: str = ""


@codec.register(251)
@attrs.frozen
class Placement:
    """Replica ``slot`` of an app runs on ``node``, built from spec ``generation``."""

    namespace: str
    app: str
    slot: int
    node: str
    generation: int

    @property
    def slot_id(self) -> SlotId:
        return SlotId(f"{self.namespace}/{self.app}", self.slot)


@codec.register(252)
@attrs.frozen
class ReplicaFact:
    """A terminal fact a node reported about a replica it was assigned (e.g. cannot start)."""

    namespace: str
    app: str
    slot: int
    node: str
    generation: int
    state: str  # "failed" | "succeeded"
    reason: str


@codec.register(253)
@attrs.frozen
class PendingSlot:
    """A slot no node can take right now, and why (shown by ``describe app``)."""

    namespace: str
    app: str
    slot: int
    reason: str


@codec.register(254)
@attrs.frozen
class AppRevision:
    """One template of an app -- what its containers run -- kept for history and rollbacks.

    ``revision`` is the app generation that introduced the template. Applying a template
    equal to an older revision's reuses that revision (moved to the newest place), so
    containers still running it count as up to date and a rollback touches only the
    replicas that were already replaced.
    """

    namespace: str
    app: str
    revision: int
    spec: AppSpec
    cause: str = ""
    created_s: float = 0.0  # the proposer's wall clock (carried by the command)


@codec.register(255)
@attrs.frozen
class Rollout:
    """The progress of an app's move from one revision to another (the leader drives it).

    ``state``: progressing | paused | complete. ``paused`` is the user's pause, kept apart
    from a pause the controller made after a failure (``state`` paused, ``message`` why).
    ``slot_started`` says when each slot was moved to ``revision``, for the progress deadline.
    """

    namespace: str
    app: str
    revision: int
    from_revision: int
    state: str = "progressing"
    message: str = ""
    paused: bool = False
    rollback_of: int = 0  # this rollout is the automatic rollback of that revision
    started_s: float = 0.0
    updated_s: float = 0.0
    slot_started: tuple[tuple[int, float], ...] = ()

    @property
    def moving(self) -> bool:
        """Whether the leader should advance it: progressing and not paused by a user."""
        return self.state == "progressing" and not self.paused


# Revisions kept per app besides those still running somewhere (Kubernetes keeps 10).
REVISION_HISTORY = 10


# --------------------------------------------------------------------------- commands


@codec.register(260)
@attrs.frozen
class PutNamespace:
    namespace: Namespace


@codec.register(261)
@attrs.frozen
class DeleteNamespace:
    name: str


@codec.register(262)
@attrs.frozen
class PutApp:
    """Create or update an app. ``expected_generation`` makes the write conditional."""

    app: App
    expected_generation: int | None = None
    # Appended fields: why (shown by ``rollout history``), when (proposer's clock), and,
    # for an automatic rollback, the revision that failed.
    cause: str = ""
    at_s: float = 0.0
    rollback_of: int = 0


@codec.register(263)
@attrs.frozen
class DeleteApp:
    namespace: str
    name: str


@codec.register(264)
@attrs.frozen
class ApplyDecision:
    """The leader's scheduler decision. Stale parts (app gone or changed) are skipped."""

    place: tuple[Placement, ...]
    release: tuple[tuple[str, str, int], ...]  # (namespace, app, slot)
    pending: tuple[PendingSlot, ...] = ()


@codec.register(265)
@attrs.frozen
class PutNode:
    """Register a node, or update its address, labels and capacity (kept: drained/removed)."""

    node: NodeRecord


@codec.register(266)
@attrs.frozen
class SetNodeDrained:
    name: str
    drained: bool


@codec.register(267)
@attrs.frozen
class RemoveNode:
    name: str


@codec.register(268)
@attrs.frozen
class ReportReplica:
    fact: ReplicaFact


@codec.register(271)
@attrs.frozen
class RolloutStep:
    """The leader moves ``slots`` of an app to ``revision`` (one batch of a rolling update)."""

    namespace: str
    app: str
    revision: int
    slots: tuple[int, ...]
    at_s: float


@codec.register(272)
@attrs.frozen
class SetRolloutState:
    """The leader marks a rollout complete, or paused after a failure (``message`` why)."""

    namespace: str
    app: str
    revision: int
    state: str
    message: str
    at_s: float


@codec.register(273)
@attrs.frozen
class PauseRollout:
    """A user pauses or resumes an app's rollout."""

    namespace: str
    app: str
    paused: bool
    at_s: float


# ---- security records (tags 500-599). Sealed fields are AES-GCM under the cluster data key
# (node/security.py): the log, the WAL and snapshots hold ciphertext only.


@codec.register(500)
@attrs.frozen
class JoinTokenRecord:
    """The current join secret (sealed) and when it stops working (unix seconds, or None)."""

    sealed_secret: bytes
    expires_at: float | None = None
    version: int = 0


@codec.register(501)
@attrs.frozen
class SetJoinToken:
    """Replace the join token: every older token stops working once this applies."""

    token: JoinTokenRecord


@codec.register(502)
@attrs.frozen
class GossipKeys:
    """The gossip keyring every node must hold: sealed keys, the first one is the primary."""

    sealed_keys: tuple[bytes, ...]
    version: int = 0


@codec.register(503)
@attrs.frozen
class SetGossipKeys:
    keys: GossipKeys


@codec.register(504)
@attrs.frozen
class SecretRecord:
    """A secret: its item names in clear (for ``secret ls``), its values sealed."""

    namespace: str
    name: str
    keys: tuple[str, ...]
    sealed: bytes
    version: int = 0


@codec.register(505)
@attrs.frozen
class PutSecret:
    secret: SecretRecord


@codec.register(506)
@attrs.frozen
class DeleteSecret:
    namespace: str
    name: str


@codec.register(508)
@attrs.frozen
class CaRecord:
    """The CA bundle every node must trust (PEM, public) and the signing CA's key (sealed).

    Absent until the first CA rotation: until then each node's own files are the truth.
    """

    bundle: bytes
    sealed_key: bytes
    version: int = 0


@codec.register(509)
@attrs.frozen
class SetCa:
    """A step of a CA rotation (node/daemon.py ``rotate_ca``)."""

    ca: CaRecord


Command = (
    PutNamespace
    | DeleteNamespace
    | PutApp
    | DeleteApp
    | ApplyDecision
    | PutNode
    | SetNodeDrained
    | RemoveNode
    | ReportReplica
    | SetJoinToken
    | SetGossipKeys
    | PutSecret
    | DeleteSecret
    | SetCa
    | RolloutStep
    | SetRolloutState
    | PauseRollout
)


@attrs.frozen
class Change:
    """One object that changed, for the watch stream: kind, key, and the new value (or None)."""

    # "namespace" | "app" | "placement" | "node" | "replica" | "token" | "gossip-keys" |
    # "secret" | "ca"
    kind: str
    key: str
    value: object | None


@attrs.frozen
class CommandResult:
    """What applying a command produced: the changes, or the reason it was refused."""

    changes: tuple[Change, ...] = ()
    error: str | None = None
    value: object | None = None


# --------------------------------------------------------------------------- the state


@codec.register(270)
@attrs.frozen
class StateSnapshot:
    """The whole state as one record: what a Raft snapshot of this machine contains."""

    index: int
    namespaces: tuple[Namespace, ...]
    apps: tuple[App, ...]
    placements: tuple[Placement, ...]
    pending: tuple[PendingSlot, ...]
    nodes: tuple[NodeRecord, ...]
    facts: tuple[ReplicaFact, ...]
    join_token: JoinTokenRecord | None = None
    gossip_keys: GossipKeys | None = None
    secrets: tuple[SecretRecord, ...] = ()
    ca: CaRecord | None = None
    revisions: tuple[AppRevision, ...] = ()
    rollouts: tuple[Rollout, ...] = ()


def _app_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


class ClusterState:
    """The desired state, mutated only by :meth:`apply` (in log order, on every node)."""

    def __init__(self) -> None:
        self.index = 0
        self.namespaces: dict[str, Namespace] = {DEFAULT_NAMESPACE: Namespace(DEFAULT_NAMESPACE)}
        self.apps: dict[str, App] = {}
        self.placements: dict[SlotId, Placement] = {}
        self.pending: dict[SlotId, PendingSlot] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.facts: dict[SlotId, ReplicaFact] = {}
        self.join_token: JoinTokenRecord | None = None
        self.gossip_keys: GossipKeys | None = None
        self.secrets: dict[str, SecretRecord] = {}
        self.ca: CaRecord | None = None
        # Per app key: revisions oldest first (the last is current), and its latest rollout.
        self.revisions: dict[str, tuple[AppRevision, ...]] = {}
        self.rollouts: dict[str, Rollout] = {}

    # ---- apply

    def apply(self, index: int, command: Command) -> CommandResult:
        """Apply one committed command. Never raises for a refused command: see the module doc."""
        self.index = index
        try:
            handler = getattr(self, f"_apply_{type(command).__name__}")
            changes: tuple[Change, ...] = handler(command)
        except StateError as exc:
            return CommandResult(error=str(exc))
        return CommandResult(changes=changes)

    def _apply_PutNamespace(self, cmd: PutNamespace) -> tuple[Change, ...]:
        old = self.namespaces.get(cmd.namespace.name)
        generation = 1 if old is None else old.generation + (old.labels != cmd.namespace.labels)
        ns = attrs.evolve(cmd.namespace, generation=generation)
        if old == ns:
            return ()
        self.namespaces[ns.name] = ns
        return (Change("namespace", ns.name, ns),)

    def _apply_DeleteNamespace(self, cmd: DeleteNamespace) -> tuple[Change, ...]:
        if cmd.name == DEFAULT_NAMESPACE:
            raise StateError("the default namespace cannot be deleted")
        if cmd.name not in self.namespaces:
            raise StateError(f"namespace {cmd.name!r} not found")
        inside = sorted(a.meta.name for a in self.apps.values() if a.meta.namespace == cmd.name)
        if inside:
            raise StateError(
                f"namespace {cmd.name!r} still holds apps: {', '.join(inside)} (delete them first)"
            )
        del self.namespaces[cmd.name]
        return (Change("namespace", cmd.name, None),)

    def _apply_PutApp(self, cmd: PutApp) -> tuple[Change, ...]:
        meta = cmd.app.meta
        if meta.namespace not in self.namespaces:
            raise StateError(f"namespace {meta.namespace!r} not found (create it first)")
        key = _app_key(meta.namespace, meta.name)
        old = self.apps.get(key)
        current = 0 if old is None else old.meta.generation
        if cmd.expected_generation is not None and cmd.expected_generation != current:
            raise StateError(
                f"app {key} is at generation {current}, not {cmd.expected_generation}"
                " (changed by someone else: read it again)"
            )
        if old is not None and old.spec == cmd.app.spec and old.meta.labels == meta.labels:
            return ()  # applying the same manifest twice is a no-op, not a new generation
        self._check_published_ports(key, cmd.app)
        app = cmd.app.with_generation(current + 1)
        self.apps[key] = app
        changes = [Change("app", key, app)]
        # Scale-down: drop pending reasons for slots that no longer exist.
        for slot in [s for s in self.pending if s.app == key and s.slot >= app.spec.replicas]:
            del self.pending[slot]
        changes.extend(self._new_revision(key, app, cmd))
        return tuple(changes)

    def _check_published_ports(self, key: str, app: App) -> None:
        """A published port is served by every node's mesh (TCP) or bound on every node
        running a replica (UDP): two apps cannot share one."""
        mine = {(p.published_port, p.protocol) for p in app.spec.ports if p.published_port}
        for other_key, other in sorted(self.apps.items()):
            if other_key == key:
                continue
            for port in other.spec.ports:
                if (port.published_port, port.protocol) in mine:
                    raise StateError(
                        f"published port {port.published_port}/{port.protocol.value} is "
                        f"already used by app {other_key}"
                    )

    def _new_revision(self, key: str, app: App, cmd: PutApp) -> list[Change]:
        """Record the app's template as a revision if it changed, and start a rollout."""
        history = list(self.revisions.get(key, ()))
        template = app.spec.template()
        if history and history[-1].spec.template() == template:
            return []
        previous = history[-1].revision if history else 0
        same = next((r for r in history if r.spec.template() == template), None)
        if same is not None:
            history.remove(same)
            cause = cmd.cause or f"back to revision {same.revision}"
            revision = attrs.evolve(same, spec=app.spec, cause=cause, created_s=cmd.at_s)
        else:
            revision = AppRevision(
                app.meta.namespace,
                app.meta.name,
                app.meta.generation,
                app.spec,
                cmd.cause,
                cmd.at_s,
            )
        history.append(revision)
        running = {p.generation for p in self.placements.values() if p.slot_id.app == key}
        while len(history) > REVISION_HISTORY:
            drop = next((r for r in history[:-1] if r.revision not in running), None)
            if drop is None:
                break
            history.remove(drop)
        self.revisions[key] = tuple(history)
        changes = [Change("revision", key, revision)]
        if previous and any(p.slot_id.app == key for p in self.placements.values()):
            rollout = Rollout(
                namespace=app.meta.namespace,
                app=app.meta.name,
                revision=revision.revision,
                from_revision=previous,
                rollback_of=cmd.rollback_of,
                started_s=cmd.at_s,
                updated_s=cmd.at_s,
            )
            self.rollouts[key] = rollout
            changes.append(Change("rollout", key, rollout))
        return changes

    def rollouts_moving(self) -> bool:
        """Whether any rollout is for the leader to advance."""
        return any(r.moving for r in self.rollouts.values())

    def current_revision(self, key: str) -> int:
        """The revision new and updated replicas of app ``key`` run."""
        history = self.revisions.get(key)
        if history:
            return history[-1].revision
        app = self.apps.get(key)
        return app.meta.generation if app is not None else 0

    def app_for(self, placement: Placement) -> App | None:
        """The App a placement's replica runs: its revision's template, with the app's
        current replicas, metadata and traffic settings, and ``generation`` = the revision."""
        key = placement.slot_id.app
        app = self.apps.get(key)
        if app is None:
            return None
        revision = next(
            (r for r in self.revisions.get(key, ()) if r.revision == placement.generation), None
        )
        spec = app.spec
        if revision is not None:
            spec = with_settings_of(revision.spec, app.spec, drop_unfit_routes=True)
        return attrs.evolve(
            app, spec=spec, meta=attrs.evolve(app.meta, generation=placement.generation)
        )

    def _apply_RolloutStep(self, cmd: RolloutStep) -> tuple[Change, ...]:
        key = _app_key(cmd.namespace, cmd.app)
        rollout = self.rollouts.get(key)
        if rollout is None or rollout.revision != cmd.revision:
            return ()  # decided against an older state: the leader decides again
        if self.current_revision(key) != cmd.revision:
            return ()
        changes: list[Change] = []
        started = dict(rollout.slot_started)
        for slot_no in cmd.slots:
            slot = SlotId(key, slot_no)
            placement = self.placements.get(slot)
            if placement is None or placement.generation == cmd.revision:
                continue
            placement = attrs.evolve(placement, generation=cmd.revision)
            self.placements[slot] = placement
            self.facts.pop(slot, None)
            started[slot_no] = cmd.at_s
            changes.append(Change("placement", str(slot), placement))
        if changes:
            rollout = attrs.evolve(
                rollout, slot_started=tuple(sorted(started.items())), updated_s=cmd.at_s
            )
            self.rollouts[key] = rollout
            changes.append(Change("rollout", key, rollout))
        return tuple(changes)

    def _apply_SetRolloutState(self, cmd: SetRolloutState) -> tuple[Change, ...]:
        key = _app_key(cmd.namespace, cmd.app)
        rollout = self.rollouts.get(key)
        if rollout is None or rollout.revision != cmd.revision:
            return ()
        if cmd.state not in ("progressing", "paused", "complete"):
            raise StateError(f"unknown rollout state {cmd.state!r}")
        new = attrs.evolve(rollout, state=cmd.state, message=cmd.message, updated_s=cmd.at_s)
        if new == rollout:
            return ()
        self.rollouts[key] = new
        return (Change("rollout", key, new),)

    def _apply_PauseRollout(self, cmd: PauseRollout) -> tuple[Change, ...]:
        key = _app_key(cmd.namespace, cmd.app)
        if key not in self.apps:
            raise StateError(f"app {key} not found")
        rollout = self.rollouts.get(key)
        if rollout is None or rollout.state == "complete":
            raise StateError(f"app {key} has no rollout in progress")
        if cmd.paused:
            new = attrs.evolve(rollout, paused=True, updated_s=cmd.at_s)
        else:
            # Resuming restarts the deadlines of the replicas in flight.
            new = attrs.evolve(
                rollout,
                paused=False,
                state="progressing",
                message="",
                updated_s=cmd.at_s,
                slot_started=tuple((slot, cmd.at_s) for slot, _ in rollout.slot_started),
            )
        if new == rollout:
            return ()
        self.rollouts[key] = new
        return (Change("rollout", key, new),)

    def _apply_DeleteApp(self, cmd: DeleteApp) -> tuple[Change, ...]:
        key = _app_key(cmd.namespace, cmd.name)
        if self.apps.pop(key, None) is None:
            raise StateError(f"app {key} not found")
        for slot in [s for s in self.pending if s.app == key]:
            del self.pending[slot]
        for slot in [s for s in self.facts if s.app == key]:
            del self.facts[slot]
        self.revisions.pop(key, None)
        self.rollouts.pop(key, None)
        # Placements stay until the scheduler releases them, so nodes stop the containers
        # through the same path as any other release.
        return (Change("app", key, None),)

    def _apply_ApplyDecision(self, cmd: ApplyDecision) -> tuple[Change, ...]:
        changes: list[Change] = []
        for namespace, app_name, slot_no in cmd.release:
            slot = SlotId(_app_key(namespace, app_name), slot_no)
            if self.placements.pop(slot, None) is not None:
                self.facts.pop(slot, None)
                changes.append(Change("placement", str(slot), None))
        for placement in cmd.place:
            slot = placement.slot_id
            app = self.apps.get(slot.app)
            node = self.nodes.get(placement.node)
            # Decided against an older state: the app is gone or scaled down, or the node was
            # removed meanwhile. Skip; the scheduler's next pass decides again.
            if app is None or slot.slot >= app.spec.replicas or node is None or node.removed:
                continue
            # New and moved replicas run the current revision (also mid-rollout).
            placement = attrs.evolve(placement, generation=self.current_revision(slot.app))
            self.placements[slot] = placement
            self.pending.pop(slot, None)
            self.facts.pop(slot, None)
            changes.append(Change("placement", str(slot), placement))
        for pend in cmd.pending:
            slot = SlotId(_app_key(pend.namespace, pend.app), pend.slot)
            app = self.apps.get(slot.app)
            if app is None or slot.slot >= app.spec.replicas or slot in self.placements:
                continue
            if self.pending.get(slot) != pend:
                self.pending[slot] = pend
                changes.append(Change("pending", str(slot), pend))
        return tuple(changes)

    def _apply_PutNode(self, cmd: PutNode) -> tuple[Change, ...]:
        old = self.nodes.get(cmd.node.name)
        node = cmd.node
        if old is not None:
            if old.removed:
                raise StateError(f"node {node.name!r} was removed from the cluster; join anew")
            node = attrs.evolve(node, drained=old.drained, removed=old.removed)
            if node == old:
                return ()
        self.nodes[node.name] = node
        return (Change("node", node.name, node),)

    def _apply_SetNodeDrained(self, cmd: SetNodeDrained) -> tuple[Change, ...]:
        node = self._node(cmd.name)
        if node.drained == cmd.drained:
            return ()
        node = attrs.evolve(node, drained=cmd.drained)
        self.nodes[node.name] = node
        return (Change("node", node.name, node),)

    def _apply_RemoveNode(self, cmd: RemoveNode) -> tuple[Change, ...]:
        node = self._node(cmd.name)
        if node.removed:
            return ()
        node = attrs.evolve(node, removed=True)
        self.nodes[node.name] = node
        return (Change("node", node.name, node),)

    def _apply_ReportReplica(self, cmd: ReportReplica) -> tuple[Change, ...]:
        fact = cmd.fact
        slot = SlotId(_app_key(fact.namespace, fact.app), fact.slot)
        placement = self.placements.get(slot)
        # Only the assigned node may report, and only about the current assignment.
        if (
            placement is None
            or placement.node != fact.node
            or placement.generation != fact.generation
        ):
            return ()
        if self.facts.get(slot) == fact:
            return ()
        self.facts[slot] = fact
        return (Change("replica", str(slot), fact),)

    def _apply_SetJoinToken(self, cmd: SetJoinToken) -> tuple[Change, ...]:
        version = (self.join_token.version if self.join_token else 0) + 1
        self.join_token = attrs.evolve(cmd.token, version=version)
        return (Change("token", "join", None),)  # never the sealed value on the watch stream

    def _apply_SetGossipKeys(self, cmd: SetGossipKeys) -> tuple[Change, ...]:
        if not cmd.keys.sealed_keys:
            raise StateError("the gossip keyring cannot be empty")
        version = (self.gossip_keys.version if self.gossip_keys else 0) + 1
        self.gossip_keys = attrs.evolve(cmd.keys, version=version)
        return (Change("gossip-keys", "keyring", None),)

    def _apply_SetCa(self, cmd: SetCa) -> tuple[Change, ...]:
        if not cmd.ca.bundle:
            raise StateError("the CA bundle cannot be empty")
        version = (self.ca.version if self.ca else 0) + 1
        self.ca = attrs.evolve(cmd.ca, version=version)
        return (Change("ca", "bundle", None),)

    def _apply_PutSecret(self, cmd: PutSecret) -> tuple[Change, ...]:
        secret = cmd.secret
        if secret.namespace not in self.namespaces:
            raise StateError(f"namespace {secret.namespace!r} not found")
        key = _app_key(secret.namespace, secret.name)
        old = self.secrets.get(key)
        secret = attrs.evolve(secret, version=(old.version if old else 0) + 1)
        self.secrets[key] = secret
        return (Change("secret", key, None),)

    def _apply_DeleteSecret(self, cmd: DeleteSecret) -> tuple[Change, ...]:
        key = _app_key(cmd.namespace, cmd.name)
        if key not in self.secrets:
            raise StateError(f"secret {cmd.name!r} not found in namespace {cmd.namespace!r}")
        users = sorted(
            a.meta.name
            for a in self.apps.values()
            if a.meta.namespace == cmd.namespace and cmd.name in a.spec.secrets
        )
        if users:
            raise StateError(
                f"secret {cmd.name!r} is used by app(s) {', '.join(users)}; "
                "remove it from them first"
            )
        del self.secrets[key]
        return (Change("secret", key, None),)

    def _node(self, name: str) -> NodeRecord:
        node = self.nodes.get(name)
        if node is None:
            raise StateError(f"node {name!r} not found")
        return node

    # ---- views for the scheduler and the reconciler

    def sched_apps(self) -> list[SchedApp]:
        return [
            SchedApp(
                key=key,
                replicas=app.spec.replicas,
                cpu_request_millis=app.spec.resources.cpu_request_millicores,
                memory_request_bytes=app.spec.resources.memory_request_bytes,
                constraints=app.spec.placement,
                # Published TCP ports belong to every node's routing mesh, not to a replica;
                # a published UDP port is bound by the replica itself: one per node.
                host_ports=frozenset(
                    f"{port.published_port}/{port.protocol.value}"
                    for port in app.spec.ports
                    if port.published_port is not None and port.protocol is Protocol.UDP
                ),
                blocked=self._missing_secrets(app),
            )
            for key, app in sorted(self.apps.items())
        ]

    def _missing_secrets(self, app: App) -> str:
        missing = [
            name
            for name in app.spec.secrets
            if _app_key(app.meta.namespace, name) not in self.secrets
        ]
        if not missing:
            return ""
        return f"secret(s) {', '.join(missing)} not found in namespace {app.meta.namespace!r}"

    def sched_nodes(self, live: dict[str, NodeStatus]) -> list[SchedNode]:
        """Nodes as the scheduler sees them; ``live`` is gossip's status by node name."""
        out = []
        for name, node in sorted(self.nodes.items()):
            status = NodeStatus.REMOVED if node.removed else live.get(name, NodeStatus.DEAD)
            out.append(
                SchedNode(
                    name=name,
                    status=status,
                    labels=dict(node.labels),
                    cpu_millis=node.cpu_millicores,
                    memory_bytes=node.memory_bytes,
                    drained=node.drained,
                )
            )
        return out

    def slot_map(self) -> dict[SlotId, str]:
        return {slot: p.node for slot, p in self.placements.items()}

    def decision_command(self, decision: Decision) -> ApplyDecision | None:
        """Turn a scheduler decision into the command the leader commits (None: nothing to do)."""
        place = []
        for slot, node in decision.place:
            namespace, _, name = slot.app.partition("/")
            place.append(
                Placement(namespace, name, slot.slot, node, self.current_revision(slot.app))
            )
        release = []
        for slot in decision.release:
            namespace, _, name = slot.app.partition("/")
            release.append((namespace, name, slot.slot))
        pending = []
        for slot, reason in decision.pending:
            namespace, _, name = slot.app.partition("/")
            pend = PendingSlot(namespace, name, slot.slot, reason)
            if self.pending.get(slot) != pend:
                pending.append(pend)
        if not (place or release or pending):
            return None
        return ApplyDecision(tuple(place), tuple(release), tuple(pending))

    def placements_for(self, node: str) -> list[Placement]:
        """What ``node``'s reconciler must run, in a stable order."""
        return sorted(
            (p for p in self.placements.values() if p.node == node),
            key=lambda p: (p.namespace, p.app, p.slot),
        )

    # ---- snapshots

    def snapshot(self) -> bytes:
        return codec.encode(
            StateSnapshot(
                index=self.index,
                namespaces=tuple(v for _, v in sorted(self.namespaces.items())),
                apps=tuple(v for _, v in sorted(self.apps.items())),
                placements=tuple(v for _, v in sorted(self.placements.items())),
                pending=tuple(v for _, v in sorted(self.pending.items())),
                nodes=tuple(v for _, v in sorted(self.nodes.items())),
                facts=tuple(v for _, v in sorted(self.facts.items())),
                join_token=self.join_token,
                gossip_keys=self.gossip_keys,
                secrets=tuple(v for _, v in sorted(self.secrets.items())),
                ca=self.ca,
                revisions=tuple(r for _, hist in sorted(self.revisions.items()) for r in hist),
                rollouts=tuple(v for _, v in sorted(self.rollouts.items())),
            )
        )

    @classmethod
    def restore(cls, data: bytes) -> ClusterState:
        snap: StateSnapshot = codec.decode(data, StateSnapshot)
        state = cls()
        state.index = snap.index
        state.namespaces = {ns.name: ns for ns in snap.namespaces}
        state.apps = {_app_key(a.meta.namespace, a.meta.name): a for a in snap.apps}
        state.placements = {p.slot_id: p for p in snap.placements}
        state.pending = {SlotId(_app_key(p.namespace, p.app), p.slot): p for p in snap.pending}
        state.nodes = {n.name: n for n in snap.nodes}
        state.facts = {SlotId(_app_key(f.namespace, f.app), f.slot): f for f in snap.facts}
        state.join_token = snap.join_token
        state.gossip_keys = snap.gossip_keys
        state.secrets = {_app_key(s.namespace, s.name): s for s in snap.secrets}
        state.ca = snap.ca
        for revision in snap.revisions:
            key = _app_key(revision.namespace, revision.app)
            state.revisions[key] = (*state.revisions.get(key, ()), revision)
        state.rollouts = {_app_key(r.namespace, r.app): r for r in snap.rollouts}
        return state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClusterState) and self.snapshot() == other.snapshot()

    __hash__ = None  # type: ignore[assignment]


def decode_command(data: bytes) -> Command:
    """Bytes from the log -> a command (CodecError for anything else)."""
    result: Command = codec.decode(data, Command)
    return result


def encode_command(command: Command) -> bytes:
    return codec.encode(command)


def apps_in(state: ClusterState, namespace: str | None) -> Iterable[App]:
    """Apps of one namespace, or of all when ``namespace`` is None, in name order."""
    for _key, app in sorted(state.apps.items()):
        if namespace is None or app.meta.namespace == namespace:
            yield app
