"""The scheduler: desired replicas + the cluster's view of nodes -> placement decisions.

Pure and deterministic: the leader calls :func:`schedule` with what the replicated state says
(apps and current placements) and what gossip says (which nodes are alive, their labels and
capacity), then commits the returned decisions to the Raft log. Because placements are log
entries, every node applies the same decisions even when nodes run different versions.

Rules, in the order they are applied:

1. A slot whose app is gone, or whose ordinal is >= the app's replica count, is **released**.
2. A slot placed on a node that is ``DEAD``, ``LEFT`` or ``REMOVED`` is **moved**: released from
   that node and placed again. ``SUSPECT`` nodes keep their replicas (suspicion is not death;
   moving on suspicion is how clusters flap) but get no new ones.
3. A slot with no placement is **placed** on the best feasible node: ``ALIVE``, not drained,
   every constraint satisfied, and enough free cpu and memory for the app's *requests* (node
   capacity minus the requests already placed there). Best = fewest replicas of this app (the
   spread), then the lowest resulting utilisation, then the node name (determinism).
4. A slot that no node can take stays **pending** with a reason that counts why each node was
   rejected, as ``kubectl describe`` does: ``0/3 nodes can run it: 2 insufficient memory, 1 not
   matching zone==a``.

Healthy replicas are never shuffled when a node comes back; :func:`rebalance` computes the moves
that even out the spread, for the ``p2porch rebalance`` command.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import attrs

from p2porch.node.spec import PlacementConstraint


class NodeStatus(enum.Enum):
    """What gossip and the replicated node decisions say about a node, as the scheduler sees it."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"
    REMOVED = "removed"


_GONE = frozenset({NodeStatus.DEAD, NodeStatus.LEFT, NodeStatus.REMOVED})


@attrs.frozen
class SchedNode:
    """One node as the scheduler needs it: identity, health, labels and allocatable capacity."""

    name: str
    status: NodeStatus
    labels: Mapping[str, str] = attrs.field(factory=dict)
    cpu_millis: int = 0
    memory_bytes: int = 0
    drained: bool = False


@attrs.frozen
class SchedApp:
    """One app's scheduling-relevant desired state."""

    key: str  # "<namespace>/<name>", unique in the cluster
    replicas: int
    cpu_request_millis: int = 0
    memory_request_bytes: int = 0
    constraints: tuple[PlacementConstraint, ...] = ()
    # Host ports a replica publishes ("8080/tcp"): two replicas publishing one port cannot
    # share a node, since both would bind the node's advertise address on it.
    host_ports: frozenset[str] = frozenset()
    # Why no replica of this app can be placed anywhere (e.g. a secret it uses is missing):
    # its unplaced slots stay pending with this reason; placed ones are left alone.
    blocked: str = ""


@attrs.frozen(order=True)
class SlotId:
    """A replica slot: the app's key and an ordinal ``0 <= slot < replicas``."""

    app: str
    slot: int

    def __str__(self) -> str:
        return f"{self.app}.{self.slot}"


@attrs.frozen
class Decision:
    """What the leader commits: slots to (re)place, slots to release, and pending reasons."""

    place: tuple[tuple[SlotId, str], ...] = ()
    release: tuple[SlotId, ...] = ()
    pending: tuple[tuple[SlotId, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.place or self.release)


@attrs.define
class _Load:
    cpu_millis: int = 0
    memory_bytes: int = 0
    per_app: Counter[str] = attrs.field(factory=Counter)
    ports: set[str] = attrs.field(factory=set)

    def add(self, app: SchedApp) -> None:
        self.cpu_millis += app.cpu_request_millis
        self.memory_bytes += app.memory_request_bytes
        self.per_app[app.key] += 1
        self.ports |= app.host_ports


def _loads(
    apps: Mapping[str, SchedApp], placements: Mapping[SlotId, str]
) -> defaultdict[str, _Load]:
    loads: defaultdict[str, _Load] = defaultdict(_Load)
    for slot, node in placements.items():
        app = apps.get(slot.app)
        if app is None:
            continue
        loads[node].add(app)
    return loads


def _reject_reason(app: SchedApp, node: SchedNode, load: _Load) -> str | None:
    """Why ``node`` cannot take one more replica of ``app`` (None when it can)."""
    if node.status is not NodeStatus.ALIVE:
        return f"node {node.status.value}"
    if node.drained:
        return "node drained"
    for constraint in app.constraints:
        if not constraint.matches(node.labels):
            return f"not matching {constraint}"
    clash = app.host_ports & load.ports
    if clash:
        return f"published port {min(clash)} in use"
    if app.cpu_request_millis and load.cpu_millis + app.cpu_request_millis > node.cpu_millis:
        return "insufficient cpu"
    if (
        app.memory_request_bytes
        and load.memory_bytes + app.memory_request_bytes > node.memory_bytes
    ):
        return "insufficient memory"
    return None


def _utilisation(app: SchedApp, node: SchedNode, load: _Load) -> float:
    cpu = (load.cpu_millis + app.cpu_request_millis) / node.cpu_millis if node.cpu_millis else 0.0
    mem = (
        (load.memory_bytes + app.memory_request_bytes) / node.memory_bytes
        if node.memory_bytes
        else 0.0
    )
    return max(cpu, mem)


def _pick(
    app: SchedApp, nodes: Iterable[SchedNode], loads: Mapping[str, _Load]
) -> tuple[SchedNode | None, str]:
    feasible: list[SchedNode] = []
    reasons: Counter[str] = Counter()
    total = 0
    for node in nodes:
        total += 1
        reason = _reject_reason(app, node, loads.get(node.name) or _Load())
        if reason is None:
            feasible.append(node)
        else:
            reasons[reason] += 1
    if not feasible:
        detail = ", ".join(
            f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda x: (-x[1], x[0]))
        )
        return None, f"0/{total} nodes can run it" + (f": {detail}" if detail else "")

    def score(node: SchedNode) -> tuple[int, float, str]:
        load = loads.get(node.name) or _Load()
        return (load.per_app[app.key], _utilisation(app, node, load), node.name)

    return min(feasible, key=score), ""


def schedule(
    apps: Iterable[SchedApp],
    nodes: Iterable[SchedNode],
    placements: Mapping[SlotId, str],
) -> Decision:
    """Which slots to release, and where to place the unplaced ones (rules: the module doc)."""
    by_key = {app.key: app for app in apps}
    node_list = sorted(nodes, key=lambda n: n.name)
    by_name = {node.name: node for node in node_list}

    release: list[SlotId] = []
    kept: dict[SlotId, str] = {}
    for slot, node_name in sorted(placements.items()):
        app = by_key.get(slot.app)
        node = by_name.get(node_name)
        if app is None or slot.slot >= app.replicas:
            release.append(slot)
        elif node is None or node.status in _GONE:
            release.append(slot)  # moved: placed again below
        else:
            kept[slot] = node_name

    loads = _loads(by_key, kept)
    place: list[tuple[SlotId, str]] = []
    pending: list[tuple[SlotId, str]] = []
    for key in sorted(by_key):
        app = by_key[key]
        for ordinal in range(app.replicas):
            slot = SlotId(key, ordinal)
            if slot in kept:
                continue
            if app.blocked:
                pending.append((slot, app.blocked))
                continue
            node, reason = _pick(app, node_list, loads)
            if node is None:
                pending.append((slot, reason))
                continue
            place.append((slot, node.name))
            loads[node.name].add(app)
    return Decision(place=tuple(place), release=tuple(release), pending=tuple(pending))


def rebalance(
    apps: Iterable[SchedApp],
    nodes: Iterable[SchedNode],
    placements: Mapping[SlotId, str],
) -> Decision:
    """Moves that even out each app's spread over the nodes that can run it.

    A replica moves from the node with the most replicas of its app to the feasible node with
    the fewest, while that narrows the gap by at least two (a move that only swaps which node
    has the extra replica is churn, not balance). Called only on request: the scheduler itself
    never moves healthy replicas.
    """
    by_key = {app.key: app for app in apps}
    node_list = sorted((n for n in nodes if n.status is NodeStatus.ALIVE), key=lambda n: n.name)
    current = dict(placements)
    moves: list[tuple[SlotId, str]] = []
    for key in sorted(by_key):
        app = by_key[key]
        while True:
            loads = _loads(by_key, current)
            mine = sorted(s for s, n in current.items() if s.app == key)
            if not mine:
                break
            counts = Counter(current[s] for s in mine)
            busiest = max(counts, key=lambda n: (counts[n], n))
            # The busiest node's own replica frees room there; others must fit as they are.
            candidates = [
                n
                for n in node_list
                if n.name != busiest
                and _reject_reason(app, n, loads.get(n.name) or _Load()) is None
            ]
            if not candidates:
                break
            target = min(candidates, key=lambda n: (counts.get(n.name, 0), n.name))
            if counts[busiest] - counts.get(target.name, 0) < 2:
                break
            slot = max(s for s in mine if current[s] == busiest)
            current[slot] = target.name
            moves.append((slot, target.name))
    return Decision(place=tuple(moves))
