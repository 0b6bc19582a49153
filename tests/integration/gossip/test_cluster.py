"""Integration (tier 4): a live 5-process gossip cluster on 127.0.0.2-6.

Real ``python -m p2porch.gossip.agent_main`` processes with real sockets and the local()
preset. The tests share one cluster (module fixture) and run in file order: a foreign-key
packet, a live key rotation, then kill -9 and rejoin. They assert behaviour only; the time
limits are generous upper bounds so a loaded CI machine does not make them flaky.
"""

from __future__ import annotations

import base64
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2porch.common import codec
from p2porch.gossip.agent_main import AgentProcess
from p2porch.gossip.keyring import PURPOSE_TCP, PURPOSE_UDP, Keyring, generate_key
from p2porch.gossip.messages import Ping
from p2porch.gossip.service import StreamPingRequest, parse_addr

pytestmark = pytest.mark.slow  # ~20 s of real processes; still part of CI

REPO = Path(__file__).resolve().parents[3]
HOSTS = [f"127.0.0.{i}" for i in range(2, 7)]
NAMES = [f"n{i}" for i in range(1, 6)]
OLD_KEY = generate_key()
NEW_KEY = generate_key(16)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


def alive_view(agent: AgentProcess) -> set[str]:
    return {n for n, m in agent.members().items() if m["state"] == "ALIVE"}


class Cluster:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.agents: dict[str, AgentProcess] = {}
        self.addrs: dict[str, str] = {}

    def spawn(self, name: str, bind: str, keys: list[str], seeds: list[str]) -> AgentProcess:
        agent = AgentProcess(
            name, bind, keys, seeds, stderr_path=self.log_dir / f"{name}.stderr", cwd=REPO
        )
        self.agents[name] = agent
        return agent

    def start(self, name: str, bind: str, keys: list[str], seeds: list[str]) -> AgentProcess:
        agent = self.spawn(name, bind, keys, seeds)
        self.addrs[name] = agent.wait_ready()
        return agent

    def all_see(self, names: set[str]) -> bool:
        return all(alive_view(a) == names for a in self.agents.values())

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("gossip-agents"))
    try:
        c.start(NAMES[0], f"{HOSTS[0]}:0", [b64(OLD_KEY)], [])
        # The other four start at once (process start-up dominates otherwise).
        for name, host in zip(NAMES[1:], HOSTS[1:], strict=True):
            c.spawn(name, f"{host}:0", [b64(OLD_KEY)], [c.addrs[NAMES[0]]])
        for name in NAMES[1:]:
            c.addrs[name] = c.agents[name].wait_ready()
        wait_for(lambda: c.all_see(set(NAMES)), 30, "5 nodes see 5 alive")
        yield c
    finally:
        c.stop()


def test_packets_under_a_foreign_key_are_dropped_and_counted(cluster: Cluster) -> None:
    target = cluster.agents["n1"]
    host, port = parse_addr(cluster.addrs["n1"])
    before = target.call("stats")["bad_auth"]
    ping = codec.encode(Ping(seq=1, target="n1", source="intruder"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.7", 0))
        udp.settimeout(3.0)
        udp.sendto(Keyring(generate_key()).seal(ping, PURPOSE_UDP), (host, port))
        wait_for(lambda: target.call("stats")["bad_auth"] == before + 1, 10, "UDP bad_auth")
        # Positive control: the same ping under the cluster key is answered (sealed).
        udp.sendto(Keyring(OLD_KEY).seal(ping, PURPOSE_UDP), (host, port))
        answer, _ = udp.recvfrom(65536)
        assert Keyring(OLD_KEY).open(answer, PURPOSE_UDP)
    # And a TCP frame under a foreign key.
    frame = Keyring(generate_key()).seal(codec.encode(StreamPingRequest(ping)), PURPOSE_TCP)
    with socket.create_connection((host, port), timeout=5, source_address=("127.0.0.7", 0)) as s:
        s.sendall(struct.pack(">I", len(frame)) + frame)
        s.settimeout(5.0)
        assert s.recv(1) == b""  # dropped: the server closes without answering
    wait_for(lambda: target.call("stats")["bad_auth"] == before + 2, 10, "TCP bad_auth")
    assert cluster.all_see(set(NAMES))


class Sampler:
    """Samples every node's view continuously in the background; records any gap."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.samples = 0
        self.gaps: list[tuple[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, agent in self.cluster.agents.items():
                view = alive_view(agent)
                self.samples += 1
                if view != set(NAMES):
                    self.gaps.append((name, sorted(view)))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=20)


def test_live_key_rotation_loses_no_member(cluster: Cluster) -> None:
    agents = list(cluster.agents.values())
    first_event = {a.name: len(a.events_snapshot()) for a in agents}
    with Sampler(cluster) as sampler:
        time.sleep(0.5)
        for cmd, key in (("install", NEW_KEY), ("use", NEW_KEY), ("remove", OLD_KEY)):
            for agent in agents:
                agent.call(cmd, key=b64(key))
                time.sleep(0.2)  # nodes change one after another, as an operator would
            time.sleep(1.5)  # several probe rounds under the new state
    assert sampler.samples > 50
    assert sampler.gaps == []
    for agent in agents:
        assert agent.call("keys") == [b64(NEW_KEY)]
        new_events = agent.events_snapshot()[first_event[agent.name] :]
        assert [e for e in new_events if e["kind"] in ("SUSPECT", "DEAD", "LEFT")] == []
    # The old key is really gone: a packet sealed with it is now refused.
    before = cluster.agents["n2"].call("stats")["bad_auth"]
    host, port = parse_addr(cluster.addrs["n2"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.7", 0))
        udp.sendto(Keyring(OLD_KEY).seal(b"stale", PURPOSE_UDP), (host, port))
    wait_for(lambda: cluster.agents["n2"].call("stats")["bad_auth"] == before + 1, 10, "old key")


def test_kill_9_is_detected_and_restart_rejoins_with_higher_incarnation(
    cluster: Cluster,
) -> None:
    victim = "n5"
    old_incarnation = cluster.agents["n1"].members()[victim]["incarnation"]
    cluster.agents[victim].kill()
    survivors = [a for n, a in cluster.agents.items() if n != victim]
    wait_for(
        lambda: all(a.members()[victim]["state"] == "DEAD" for a in survivors),
        30,
        "survivors declare n5 dead",
    )
    for agent in survivors:
        kinds = [e["kind"] for e in agent.events_snapshot() if e["member"]["name"] == victim]
        assert "DEAD" in kinds
    # Same name, same address, fresh process (incarnation starts at 0 again).
    cluster.start(victim, cluster.addrs[victim], [b64(NEW_KEY)], [cluster.addrs["n1"]])
    wait_for(lambda: cluster.all_see(set(NAMES)), 30, "n5 rejoins alive everywhere")
    for agent in cluster.agents.values():
        assert agent.members()[victim]["incarnation"] > old_incarnation
