"""The endpoint table every node merges peers' records into (node/endpoints.py), and the
picker the mesh and the ingress share (node/balance.py). Pure."""

from __future__ import annotations

from p2porch.common import codec
from p2porch.node.balance import Balancer, Strategy
from p2porch.node.endpoints import (
    Endpoint,
    EndpointPort,
    EndpointTable,
    NodeEndpoints,
    ReplicaState,
    ReplicaStatus,
)
from p2porch.node.traffic import slot_failure


def ep(node: str, slot: int, *, ready: bool = True, app: str = "web", cid: str = "") -> Endpoint:
    host = f"127.0.0.{node[-1]}"
    return Endpoint(
        "default",
        app,
        slot,
        f"{app}-{slot}",
        node,
        1,
        cid or f"{node}-{slot}",
        (EndpointPort(8080, host, 30000 + slot),),
        ready,
    )


def record(node: str, version: int, *eps: Endpoint, epoch: int = 1) -> NodeEndpoints:
    return NodeEndpoints(node, epoch, version, eps)


def test_records_round_trip_the_codec_with_statuses() -> None:
    status = ReplicaStatus("web-0", "default", "web", 0, "n1", 1, ReplicaState.RUNNING)
    rec = NodeEndpoints("n1", 7, 3, (ep("n1", 0),), (status,))
    assert codec.decode(codec.encode(rec), NodeEndpoints) == rec


def test_newer_stamps_replace_older_and_a_restart_epoch_wins() -> None:
    table = EndpointTable("n1")
    changes: list[int] = []
    table.on_change(lambda: changes.append(table.version))
    assert table.update(record("n2", 2, ep("n2", 0)))
    assert not table.update(record("n2", 1))  # older: ignored
    assert not table.update(record("n2", 2))  # same stamp: ignored
    assert [e.slot for e in table.endpoints("default", "web")] == [0]
    # A restarted node counts from 1 again under a newer epoch.
    assert table.update(record("n2", 1, ep("n2", 1), epoch=2))
    assert [e.slot for e in table.endpoints("default", "web")] == [1]
    assert len(changes) == 2
    # Same content under a newer stamp: taken, but no change for readers.
    assert table.update(record("n2", 2, ep("n2", 1), epoch=2))
    assert len(changes) == 2


def test_ready_only_local_first_and_drop() -> None:
    table = EndpointTable("n2")
    table.update(record("n1", 1, ep("n1", 0), ep("n1", 3, ready=False)))
    table.update(record("n2", 1, ep("n2", 1)))
    table.update(record("n3", 1, ep("n3", 2), ep("n3", 9, app="other")))
    assert [e.node for e in table.endpoints("default", "web")] == ["n2", "n1", "n3"]
    assert len(table.endpoints("default", "web", ready_only=False)) == 4
    assert table.drop_node("n3") and not table.drop_node("n3")
    table.retain(["n2"])
    assert [e.node for e in table.endpoints("default", "web")] == ["n2"]


def test_balancer_round_robin_local_first_and_exclusion() -> None:
    eps = [ep("n1", 0), ep("n2", 1), ep("n2", 2), ep("n3", 3, ready=False)]
    spread = Balancer("n9", prefer_local=False)
    assert [spread.choose(eps).slot for _ in range(4)] == [0, 1, 2, 0]  # type: ignore[union-attr]
    local = Balancer("n2")
    assert {local.choose(eps).slot for _ in range(4)} == {1, 2}  # type: ignore[union-attr]
    only = local.choose(eps, exclude={("n2", "n2-1"), ("n2", "n2-2")})
    assert only is not None and only.slot == 0  # no local left: any other ready one
    assert local.choose([ep("n3", 3, ready=False)]) is None


def test_balancer_least_connections() -> None:
    eps = [ep("n1", 0), ep("n1", 1)]
    lc = Balancer("n1", Strategy.LEAST_CONNECTIONS)
    first = lc.choose(eps)
    assert first is not None
    lc.acquire(first)
    second = lc.choose(eps)
    assert second is not None and second.slot != first.slot
    lc.release(first)
    assert lc.active(first) == 0


def test_slot_failure_words() -> None:
    base = ReplicaStatus("web-0", "default", "web", 0, "n1", 2, ReplicaState.RUNNING)
    assert slot_failure(base) == ""
    crashed = ReplicaStatus(
        "web-0",
        "default",
        "web",
        0,
        "n1",
        2,
        ReplicaState.RUNNING,
        restarts=2,
        last_termination="exit 3",
    )
    assert slot_failure(crashed) == "restarted 2 time(s) (last: exit 3)"
    stuck = ReplicaStatus(
        "web-0",
        "default",
        "web",
        0,
        "n1",
        2,
        ReplicaState.FAILED,
        reason="image x unavailable",
        terminal=True,
    )
    assert slot_failure(stuck) == "image x unavailable"


# --------------------------------------------------------------------------- the sync core


def test_sync_fetches_newer_stamps_once_and_retries_after_a_failure() -> None:
    from p2porch.node.endpoints import EndpointSync, FetchRequest

    sync = EndpointSync(EndpointTable("n1"))
    sync.member("n2", "alive", (1, 3), None)
    assert sync.due(0.0) == []  # no address yet: nothing to ask
    sync.member("n2", "alive", (1, 3), "127.0.0.3:7950")
    assert sync.due(0.0) == [FetchRequest("n2", "127.0.0.3:7950", (1, 3))]
    assert sync.due(0.0) == []  # in flight
    sync.fetched("n2", None, 0.5, retry_s=1.0)
    assert sync.due(1.0) == [] and sync.next_due(1.0) == 1.5
    assert [r.node for r in sync.due(1.5)] == ["n2"]
    sync.fetched("n2", record("n3", 3), 1.6, retry_s=1.0)  # names another node: refused
    assert sync.counters["records_refused"] == 1 and sync.table.record("n2") is None
    assert [r.node for r in sync.due(2.6)] == ["n2"]
    sync.fetched("n2", record("n2", 3, ep("n2", 0)), 2.7, retry_s=1.0)
    assert sync.table.stamp("n2") == (1, 3) and sync.wanted() == {}
    sync.member("n2", "alive", (1, 3), "127.0.0.3:7950")  # nothing newer: no fetch
    assert sync.due(3.0) == []


def test_sync_drops_the_dead_and_discards_what_they_answer_late() -> None:
    from p2porch.node.endpoints import EndpointSync

    sync = EndpointSync(EndpointTable("n1"))
    sync.member("n2", "alive", (1, 1), "a2")
    sync.fetched("n2", record("n2", 1, ep("n2", 0)), 0.0, 1.0)
    sync.member("n2", "alive", (1, 2), "a2")
    (request,) = sync.due(0.0)
    sync.member("n2", "dead", None, None)
    assert sync.table.record("n2") is None and sync.counters["nodes_dropped"] == 1
    sync.fetched("n2", record("n2", 2, ep("n2", 1)), 0.1, 1.0)  # the late answer
    assert sync.table.record("n2") is None and sync.counters["late_records_discarded"] == 1
    # Back under a new epoch: fetched again.
    sync.member("n2", "alive", (2, 1), "a2")
    assert [r.stamp for r in sync.due(0.2)] == [(2, 1)]
    # A full view without n2: dropped like a death.
    sync.fetched("n2", record("n2", 1, ep("n2", 0), epoch=2), 0.3, 1.0)
    sync.resync([("n3", "alive", None, "a3")])
    assert sync.table.nodes() == []
