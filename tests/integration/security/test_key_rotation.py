"""``POST /v1/keys/rotate`` on a live five-node cluster: no member is ever lost, and afterwards
every node holds the new key alone (in memory and in ``gossip.keys``); the old key opens
nothing any more.

While the rotation runs, a sampler reads every node's member view over and over; a single
sample showing a member dead or left fails the test.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import httpx
import pytest

from p2porch.gossip.keyring import PURPOSE_UDP
from tests.integration.cluster.harness import wait_for
from tests.integration.security.kit import (
    ControlPlaneCluster,
    assert_unharmed,
    cluster_keyring,
    live_nodes,
    node_pair,
    ping,
    probe_gossip,
    request_as,
)

pytestmark = pytest.mark.slow


class ViewSampler:
    """Reads every node's ``/v1/nodes`` in a loop; keeps every bad sample."""

    def __init__(self, cluster: ControlPlaneCluster) -> None:
        self.cluster = cluster
        self.samples = 0
        self.errors = 0
        self.bad: list[tuple[str, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in live_nodes(self.cluster):
                try:
                    rows = node.get("/v1/nodes", timeout=5)
                except httpx.HTTPError:
                    self.errors += 1
                    continue
                view = {r["name"]: r["status"] for r in rows if not r["removed"]}
                self.samples += 1
                if any(s not in ("alive", "suspect") for s in view.values()):
                    self.bad.append((node.name, view))

    def __enter__(self) -> ViewSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def hint(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def test_gossip_key_rotation_loses_no_member(main: ControlPlaneCluster) -> None:
    nodes = main.nodes
    assert len(live_nodes(main)) == 5
    old = cluster_keyring(nodes[0])
    old_keys = set(old.installed_keys())
    leader = main.leader()
    follower = next(n for n in nodes if n is not leader)
    with ViewSampler(main) as sampler:
        wait_for(lambda: sampler.samples >= 5, 30, "the sampler running")
        # Through a follower: it forwards to the leader, which runs the three steps.
        resp = follower.request("POST", "/v1/keys/rotate", timeout=120)
        assert resp.status_code == 200, resp.text
        answer: dict[str, Any] = resp.json()
    assert answer["nodes"] == 5, answer
    assert sampler.bad == [], sampler.bad[:5]

    primary = answer["primary"]
    for node in nodes:
        # Every node's keyring, as the node itself reports it (a node-only endpoint).
        ring = request_as(node, "GET", "/v1/internal/keyring", node_pair(node)).json()
        assert ring["primary"] == primary and ring["keys"] == [primary], (node.name, ring)
        # And on disk.
        on_disk = cluster_keyring(node)
        assert [hint(k) for k in on_disk.installed_keys()] == [primary], node.name
        assert not old_keys & set(on_disk.installed_keys()), node.name
    # The old key opens nothing any more; the new one does (the control).
    new = cluster_keyring(nodes[0])
    for node in nodes:
        stale = old.seal(ping(1, node.name), PURPOSE_UDP)
        assert set(probe_gossip(node, [stale, stale], new, control_seq=300)) == {300}
    assert_unharmed(main)
