"""Scheduler rules: spread, capacity, constraints, pending reasons, dead nodes, no shuffling."""

from __future__ import annotations

import random

from p2porch.node.scheduler import (
    NodeStatus,
    SchedApp,
    SchedNode,
    SlotId,
    rebalance,
    schedule,
)
from p2porch.node.spec import PlacementConstraint

GIB = 1 << 30


def nodes(*names: str, status: NodeStatus = NodeStatus.ALIVE, **labels: str) -> list[SchedNode]:
    return [
        SchedNode(n, status, dict(labels), cpu_millis=2000, memory_bytes=2 * GIB) for n in names
    ]


def apply(placements: dict[SlotId, str], decision) -> dict[SlotId, str]:
    out = dict(placements)
    for slot in decision.release:
        out.pop(slot, None)
    for slot, node in decision.place:
        out[slot] = node
    return out


def test_spreads_replicas_across_nodes() -> None:
    d = schedule([SchedApp("default/web", 3)], nodes("a", "b", "c"), {})
    assert sorted(n for _, n in d.place) == ["a", "b", "c"]
    assert not d.pending and not d.release


def test_six_replicas_on_three_nodes_two_each() -> None:
    d = schedule([SchedApp("default/web", 6)], nodes("a", "b", "c"), {})
    counts = {n: sum(1 for _, x in d.place if x == n) for n in "abc"}
    assert counts == {"a": 2, "b": 2, "c": 2}


def test_capacity_is_respected_and_pending_explains_why() -> None:
    app = SchedApp("default/big", 3, memory_request_bytes=GIB + 1)
    d = schedule([app], nodes("a", "b"), {})
    assert len(d.place) == 2
    assert len(d.pending) == 1
    slot, reason = d.pending[0]
    assert slot == SlotId("default/big", 2)
    assert reason == "0/2 nodes can run it: 2 insufficient memory"


def test_constraints_filter_nodes() -> None:
    ns = nodes("a", "b", zone="x") + nodes("c", zone="y")
    app = SchedApp("default/web", 2, constraints=(PlacementConstraint.parse("zone==y"),))
    d = schedule([app], ns, {})
    assert [n for _, n in d.place] == ["c", "c"]


def test_dead_node_replicas_move_to_survivors() -> None:
    placements = {SlotId("default/web", i): n for i, n in enumerate("abc")}
    ns = [*nodes("a", "b"), *nodes("c", status=NodeStatus.DEAD)]
    d = schedule([SchedApp("default/web", 3)], ns, placements)
    assert d.release == (SlotId("default/web", 2),)
    assert d.place[0][0] == SlotId("default/web", 2)
    assert d.place[0][1] in {"a", "b"}


def test_suspect_node_keeps_its_replicas_but_gets_no_new_ones() -> None:
    placements = {SlotId("default/web", 0): "c"}
    ns = [*nodes("a"), *nodes("c", status=NodeStatus.SUSPECT)]
    d = schedule([SchedApp("default/web", 2)], ns, placements)
    assert d.release == ()
    assert d.place == ((SlotId("default/web", 1), "a"),)


def test_returning_node_does_not_shuffle_healthy_replicas() -> None:
    placements = {SlotId("default/web", 0): "a", SlotId("default/web", 1): "b"}
    d = schedule([SchedApp("default/web", 2)], nodes("a", "b", "c"), placements)
    assert d.empty


def test_scale_down_releases_high_ordinals_and_deleted_apps() -> None:
    placements = {SlotId("default/web", i): "a" for i in range(3)} | {SlotId("default/old", 0): "b"}
    d = schedule([SchedApp("default/web", 1)], nodes("a", "b"), placements)
    assert set(d.release) == {
        SlotId("default/web", 1),
        SlotId("default/web", 2),
        SlotId("default/old", 0),
    }


def test_drained_node_gets_nothing_new() -> None:
    ns = [SchedNode("a", NodeStatus.ALIVE, {}, 1000, GIB, drained=True), *nodes("b")]
    d = schedule([SchedApp("default/web", 2)], ns, {})
    assert {n for _, n in d.place} == {"b"}


def test_rebalance_evens_out_after_a_node_returns() -> None:
    placements = {SlotId("default/web", i): n for i, n in enumerate("aabb")}
    d = rebalance([SchedApp("default/web", 4)], nodes("a", "b", "c", "d"), placements)
    after = apply(placements, d)
    counts = sorted(list(after.values()).count(n) for n in "abcd")
    assert counts == [1, 1, 1, 1]


def test_rebalance_makes_no_churn_when_balanced() -> None:
    placements = {SlotId("default/web", i): n for i, n in enumerate("abc")}
    assert rebalance([SchedApp("default/web", 3)], nodes("a", "b", "c"), placements).empty


def test_schedule_is_deterministic_and_converges() -> None:
    rng = random.Random(7)
    for _ in range(200):
        ns = [
            SchedNode(
                f"n{i}",
                rng.choice(list(NodeStatus)),
                {},
                1000 * rng.randint(1, 4),
                GIB * rng.randint(1, 4),
            )
            for i in range(rng.randint(1, 6))
        ]
        apps = [
            SchedApp(
                f"default/a{i}",
                rng.randint(0, 6),
                rng.choice([0, 250, 1000]),
                rng.choice([0, GIB // 2]),
            )
            for i in range(rng.randint(1, 4))
        ]
        placements: dict[SlotId, str] = {}
        d1 = schedule(apps, ns, placements)
        assert d1 == schedule(apps, list(reversed(ns)), placements)
        after = apply(placements, d1)
        # A second pass over the result changes nothing: the scheduler reaches a fixed point.
        assert schedule(apps, ns, after).empty
        # Capacity is never exceeded on any node.
        for node in ns:
            mine = [s for s, n in after.items() if n == node.name]
            by_key = {a.key: a for a in apps}
            assert sum(by_key[s.app].memory_request_bytes for s in mine) <= node.memory_bytes
            assert sum(by_key[s.app].cpu_request_millis for s in mine) <= node.cpu_millis


def test_published_port_keeps_replicas_on_distinct_nodes() -> None:
    app = SchedApp("default/web", 3, host_ports=frozenset({"30080/tcp"}))
    d = schedule([app], nodes("a", "b"), {})
    assert sorted(n for _, n in d.place) == ["a", "b"]
    assert d.pending == (
        (SlotId("default/web", 2), "0/2 nodes can run it: 2 published port 30080/tcp in use"),
    )


def test_published_port_is_shared_across_apps_too() -> None:
    web = SchedApp("default/web", 1, host_ports=frozenset({"80/tcp"}))
    api = SchedApp("default/api", 1, host_ports=frozenset({"80/tcp", "81/tcp"}))
    udp = SchedApp("default/dns", 1, host_ports=frozenset({"80/udp"}))
    d = schedule([web, api, udp], nodes("a", "b"), {})
    by_app = {s.app: n for s, n in d.place}
    assert by_app["default/api"] != by_app["default/web"]
    assert by_app["default/dns"] == "a"  # udp/80 does not clash with tcp/80
