"""Issue 4's scenarios on real agents, real sockets and the real Docker engine.

Each test forms its own cluster on its own loopback addresses and tears everything down
(processes, containers, iptables rules, data dirs). Waits are bounded polls on behaviour.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.cluster.harness import Cluster, cluster, demo_app, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def running_by_node(c: Cluster, app: str = "hello") -> dict[str, list[str]]:
    by_node: dict[str, list[str]] = collections.defaultdict(list)
    for row in c.replicas(app=app):
        if row["state"] == "running":
            by_node[row["node"]].append(row["name"])
    return dict(by_node)


def all_running(c: Cluster, n: int, app: str = "hello", exclude: str | None = None) -> bool:
    rows = c.replicas(app=app)
    return (
        len(rows) == n
        and all(r["state"] == "running" for r in rows)
        and all(r["node"] != exclude for r in rows)
    )


def page_of(c: Cluster, row: dict[str, Any]) -> str:
    host = (
        row["publishedPorts"]["8080/tcp"]
        if "8080/tcp" in row["publishedPorts"]
        else next(iter(row["publishedPorts"].values()))
    )
    return httpx.get(f"http://{host}/", timeout=5).text


def test_form_grow_apply_spread_and_fail_over(tmp_path: Path) -> None:
    with cluster(tmp_path, "fa", first_host=20) as c:
        n1, n2, n3 = c.form(3)
        wait_for(lambda: len(n1.get("/v1/status")["voters"]) == 3, 30, "3 voters", n1)

        # Grow to five: both new nodes end up voters (fewer than 5 before).
        c.join_one()
        c.join_one()
        wait_for(lambda: len(n1.get("/v1/status")["voters"]) == 5, 45, "5 voters", n1)
        nodes = n3.get("/v1/nodes")
        assert sorted(n["status"] for n in nodes) == ["alive"] * 5
        assert sum(n["role"] == "leader" for n in nodes) == 1

        # Apply through node 2 (a follower or the leader: either forwards as needed).
        c.apply(n2, demo_app(replicas=5))
        wait_for(lambda: all_running(c, 5), 90, "5 replicas running", n2)
        spread = running_by_node(c)
        assert sorted(len(v) for v in spread.values()) == [1, 1, 1, 1, 1], spread
        row = c.replicas(app="hello")[0]
        assert "hello from hello" in page_of(c, row)

        # exec and logs through a node that does not run the replica: proxied to its owner.
        other = next(n for n in c.nodes if n.name != row["node"])
        resp = other.request(
            "POST",
            f"/v1/replicas/default/{row['name']}/exec",
            json={"command": ["sh", "-c", "echo $MESSAGE; exit 3"]},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"exitCode": 3, "output": "hello from hello\n"}
        logs = other.request("GET", f"/v1/replicas/default/{row['name']}/logs?tail=5")
        assert logs.status_code == 200 and logs.text.endswith("\n"), logs.text

        # kill -9 a follower (and its containers, as a power cut): its replica moves.
        leader = c.leader()
        victim = next(n for n in c.nodes if n is not leader)
        victim.kill()
        wait_for(lambda: all_running(c, 5, exclude=victim.name), 60, "replica moved off follower")

        # kill the leader: a new leader is elected and the replica moves again.
        leader.kill()
        survivor = c.any_alive()
        wait_for(
            lambda: survivor.get("/v1/status")["leader"] not in (None, leader.name),
            30,
            "a new leader",
            survivor,
        )
        wait_for(
            lambda: (
                all_running(c, 5, exclude=leader.name)
                and all(r["node"] != victim.name for r in c.replicas(app="hello"))
            ),
            60,
            "replicas moved off the dead leader",
            survivor,
        )
        statuses = {n["name"]: n["status"] for n in survivor.get("/v1/nodes")}
        assert statuses[victim.name] == "dead" and statuses[leader.name] == "dead"


def test_partition_minority_keeps_running_and_heals(tmp_path: Path) -> None:
    with cluster(tmp_path, "pa", first_host=30) as c:
        n1, n2, n3 = c.form(3)
        wait_for(lambda: len(n1.get("/v1/status")["voters"]) == 3, 30, "3 voters", n1)
        c.apply(n1, demo_app(replicas=3))
        wait_for(lambda: all_running(c, 3), 90, "3 replicas running", n1)

        minority = next(n for n in c.nodes if n is not c.leader())
        before = [x.id for x in c.containers(minority.name) if x.status == "running"]
        assert len(before) == 1
        c.partition(minority)
        majority = next(n for n in c.nodes if n is not minority)
        # The majority declares it dead and runs its replica elsewhere...
        wait_for(
            lambda: (
                sum(
                    1
                    for r in majority.get("/v1/replicas?app=hello")
                    if r["state"] == "running" and r["node"] != minority.name
                )
                == 3
            ),
            60,
            "the majority to reschedule",
            majority,
        )
        # ...while the minority keeps its container running and refuses writes clearly.
        assert [x.id for x in c.containers(minority.name) if x.status == "running"] == before

        def refused() -> httpx.Response | None:
            r = minority.request("POST", "/v1/apps/default/hello/scale", json={"replicas": 4})
            return r if r.status_code == 503 else None

        resp = wait_for(refused, 30, "the minority to refuse writes", minority)
        assert resp.json()["error"]["code"] == "no_quorum"

        c.heal()
        # Healed: the stale copy on the old minority node is removed; 3 replicas, no more.
        wait_for(
            lambda: (
                not [x for x in c.containers(minority.name) if x.status == "running"]
                or all_running(c, 3)
            ),
            60,
            "the minority to catch up",
            minority,
        )
        wait_for(
            lambda: (
                sum(1 for n in c.nodes for x in c.containers(n.name) if x.status == "running") == 3
            ),
            60,
            "duplicates removed after healing",
            minority,
        )


def test_restart_node_and_whole_cluster_keep_desired_state(tmp_path: Path) -> None:
    with cluster(tmp_path, "ra", first_host=40) as c:
        n1, n2, n3 = c.form(3)
        wait_for(lambda: len(n1.get("/v1/status")["voters"]) == 3, 30, "3 voters", n1)
        c.apply(n1, demo_app(replicas=3))
        wait_for(lambda: all_running(c, 3), 90, "3 replicas running", n1)
        ids = {n.name: sorted(x.id for x in c.containers(n.name)) for n in c.nodes}

        # A graceful restart of one node: it rejoins; its replica is adopted, not recreated.
        n2.terminate()
        n2.start()
        wait_for(lambda: all_running(c, 3), 60, "replicas running after restart", n2)
        assert sorted(x.id for x in c.containers(n2.name)) == ids[n2.name]

        # Stop and start the whole cluster: desired state intact, replicas still there.
        for node in c.nodes:
            node.terminate()
        for node in c.nodes:
            node.start()
        wait_for(lambda: n3.get("/v1/status")["leader"] is not None, 30, "a leader", n3)
        apps = n3.get("/v1/apps")
        assert [a["metadata"]["name"] for a in apps] == ["hello"]
        assert apps[0]["spec"]["replicas"] == 3
        wait_for(lambda: all_running(c, 3), 60, "replicas running after full restart", n3)


def test_crash_loop_is_backed_off_and_bad_image_reported(tmp_path: Path) -> None:
    with cluster(tmp_path, "ca", first_host=50) as c:
        (n1,) = c.form(1)
        crash = demo_app("crash", replicas=1, command=["sh", "-c", "echo boom; exit 3"])
        crash["spec"].pop("ports")
        c.apply(n1, crash)

        def backing_off() -> bool:
            rows = c.replicas(app="crash")
            return bool(rows) and rows[0]["restarts"] >= 1 and "back-off" in rows[0]["reason"]

        wait_for(backing_off, 60, "a crash-looping replica backing off", n1)
        row = c.replicas(app="crash")[0]
        assert row["exitCode"] == 3
        # Every run's output is in the logs, one line each.
        logs = n1.request("GET", "/v1/replicas/default/crash-0/logs").text
        assert logs.count("boom\n") >= 2, logs

        # An image that is not there and cannot be pulled: a clear reason, no crash.
        # (A registry on a closed loopback port: no DNS, no traffic off the machine.)
        bad = demo_app("ghost", replicas=1, image="127.0.0.1:9/p2porch/ghost:1")
        c.apply(n1, bad)
        wait_for(
            lambda: (rows := c.replicas(app="ghost")) and "unavailable" in rows[0]["reason"],
            60,
            "an image error on the replica",
            n1,
        )


def test_leave_moves_replicas_and_node_rm_removes_a_dead_node(tmp_path: Path) -> None:
    with cluster(tmp_path, "la", first_host=60) as c:
        n1, n2, n3, n4 = c.form(4)
        wait_for(lambda: len(n1.get("/v1/status")["voters"]) == 4, 30, "4 voters", n1)
        c.apply(n1, demo_app(replicas=4))
        wait_for(lambda: all_running(c, 4), 90, "4 replicas running", n1)

        # `p2porch leave` on n4 (through the CLI): its replica moves, its containers go,
        # Raft drops it, the process exits.
        n4.cli("leave")
        assert n4.proc is not None
        n4.proc.wait(90)
        n4.proc = None
        wait_for(lambda: all_running(c, 4, exclude=n4.name), 60, "replica moved off n4", n1)
        assert not c.containers(n4.name)
        wait_for(lambda: n4.name not in n1.get("/v1/status")["voters"], 30, "n4 out of Raft", n1)
        statuses = {n["name"]: n["status"] for n in n1.get("/v1/nodes")}
        assert statuses[n4.name] == "left"

        # `p2porch node rm` for a node that died (2 of 3 voters remain: a majority): its
        # replicas move and Raft drops it.
        n3.kill()
        n1.cli("node", "rm", n3.name)
        wait_for(
            lambda: all_running(c, 4, exclude=n3.name) and all_running(c, 4, exclude=n4.name),
            60,
            "replicas on n1 and n2 only",
            n1,
        )
        wait_for(lambda: n3.name not in n1.get("/v1/status")["voters"], 30, "n3 out of Raft", n1)


def test_dead_voter_is_replaced_by_a_learner(tmp_path: Path) -> None:
    """Six nodes: five vote, one learns. A voter dies -> after the grace the learner votes."""
    with cluster(tmp_path, "va", first_host=70) as c:
        nodes = c.form(6)
        n1 = nodes[0]

        def roles() -> tuple[list[str], list[str]]:
            status = n1.get("/v1/status")
            return status["voters"], status["learners"]

        wait_for(lambda: len(roles()[0]) == 5 and len(roles()[1]) == 1, 60, "5 + 1", n1)
        learner = roles()[1][0]
        leader = c.leader()
        victim = next(n for n in c.nodes if n.name not in (learner, leader.name))
        victim.kill()
        wait_for(
            lambda: (v := roles()[0]) and len(v) == 5 and victim.name not in v and learner in v,
            60,
            "the learner to replace the dead voter",
            n1,
        )
        # Still a working majority: a write commits.
        c.apply(n1, demo_app("after", replicas=0))
