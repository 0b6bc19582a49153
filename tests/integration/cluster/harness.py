"""Real p2porch agents as real processes on 127.0.0.x, driven like an operator would.

Node death is SIGKILL plus removing the node's containers (what a power cut does); a
partition is iptables DROP rules between loopback addresses, always removed at teardown.
Every wait is bounded and polls observable behaviour -- no timing assertions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

API_PORT = 7950


class Node:
    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"{cluster.prefix}{index}"
        self.host = f"127.0.0.{cluster.first_host + index - 1}"
        self.data_dir = cluster.base / self.name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"https://{self.host}:{API_PORT}"

    def config_dir(self) -> Path:
        """A data dir holding an admin client.yaml: this node's, else any other node's (they
        share the cluster CA, so one admin certificate works on every node)."""
        for node in [self, *self.cluster.nodes]:
            if (node.data_dir / "admin.pem").exists():
                return node.data_dir
        raise AssertionError("no node has written its admin credentials yet")

    def ssl_context(self) -> ssl.SSLContext:
        d = self.config_dir()
        context = ssl.create_default_context(cafile=str(d / "ca.pem"))
        context.load_cert_chain(str(d / "admin.pem"), str(d / "admin.key"))
        return context

    def start(self, join: Node | None = None, token: str | None = None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "p2porch.cli.main",
            "agent",
            "--data-dir",
            str(self.data_dir),
            "--advertise",
            self.host,
            "--name",
            self.name,
            "--preset",
            self.cluster.preset,
            *self.cluster.agent_args,
        ]
        if join is not None:
            cmd += ["--join", join.host, "--token", token or join.token()]
        env = {**os.environ, "P2PORCH_LOG": "INFO"}
        log = (self.data_dir / "agent.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self.healthy, 30, f"{self.name} to answer /healthz", self)

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            # /healthz needs no certificate (a bare liveness probe); TLS still runs.
            return httpx.get(f"{self.api}/healthz", timeout=1, verify=False).status_code == 200
        except httpx.HTTPError:
            return False

    def token(self) -> str:
        return (self.data_dir / "join-token").read_text().strip()

    def log(self, lines: int = 60) -> str:
        path = self.data_dir / "agent.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, **kw: Any) -> Any:
        resp = httpx.get(
            f"{self.api}{path}", timeout=kw.pop("timeout", 10), verify=self.ssl_context(), **kw
        )
        resp.raise_for_status()
        return resp.json()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.api}{path}",
            timeout=kw.pop("timeout", 20),
            verify=self.ssl_context(),
            **kw,
        )

    def kill(self) -> None:
        """A power cut: SIGKILL the agent and remove its containers."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None
        self.cluster.remove_containers(self.name)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "p2porch.cli.main", "--node", self.host, *args],
            env={**os.environ, "P2PORCH_CONFIG": str(self.config_dir() / "client.yaml")},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"p2porch {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc


# Tests want fast detection and short graces; benchmarks pass the product's own settings.
TEST_AGENT_ARGS = ("--voter-grace", "5", "--left-grace", "30")


class Cluster:
    def __init__(
        self,
        base: Path,
        prefix: str,
        first_host: int = 2,
        preset: str = "local",
        agent_args: tuple[str, ...] = TEST_AGENT_ARGS,
    ) -> None:
        self.base = base
        self.prefix = prefix
        self.first_host = first_host
        self.preset = preset
        self.agent_args = agent_args
        self.nodes: list[Node] = []
        self._rules: list[list[str]] = []

    def add(self) -> Node:
        node = Node(self, len(self.nodes) + 1)
        self.nodes.append(node)
        return node

    def form(self, size: int) -> list[Node]:
        first = self.add()
        first.start()
        wait_for(lambda: first.get("/v1/status")["leader"] == first.name, 30, "a leader", first)
        for _ in range(size - 1):
            self.join_one()
        return self.nodes

    def join_one(self) -> Node:
        node = self.add()
        node.start(join=self.nodes[0])
        return node

    def any_alive(self) -> Node:
        for node in self.nodes:
            if node.proc is not None:
                return node
        raise AssertionError("no live node")

    def leader(self, via: Node | None = None) -> Node:
        status = (via or self.any_alive()).get("/v1/status")
        for node in self.nodes:
            if node.name == status["leader"]:
                return node
        raise AssertionError(f"no leader known: {status}")

    def replicas(self, via: Node | None = None, app: str | None = None) -> list[dict[str, Any]]:
        path = "/v1/replicas" + (f"?app={app}" if app else "")
        return list((via or self.any_alive()).get(path))

    def apply(self, via: Node, *docs: dict[str, Any]) -> dict[str, Any]:
        resp = via.request("POST", "/v1/apply", json={"documents": list(docs)})
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    # ---- faults

    def partition(self, node: Node) -> None:
        """Cut ``node`` off from every other node, both directions."""
        for other in self.nodes:
            if other is node:
                continue
            for src, dst in ((node.host, other.host), (other.host, node.host)):
                rule = ["INPUT", "-s", src, "-d", dst, "-j", "DROP"]
                subprocess.run(["iptables", "-I", *rule], check=True)
                self._rules.append(rule)

    def heal(self) -> None:
        while self._rules:
            rule = self._rules.pop()
            subprocess.run(["iptables", "-D", *rule], check=False)

    def remove_containers(self, node_name: str) -> None:
        import docker

        client = docker.from_env(timeout=60)
        try:
            for c in client.containers.list(
                all=True, filters={"label": f"io.p2porch.node={node_name}"}
            ):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
        finally:
            client.close()

    def containers(self, node_name: str) -> list[Any]:
        import docker

        client = docker.from_env(timeout=60)
        try:
            return list(
                client.containers.list(all=True, filters={"label": f"io.p2porch.node={node_name}"})
            )
        finally:
            client.close()

    def teardown(self) -> None:
        self.heal()
        for node in self.nodes:
            if node.proc is not None:
                node.proc.kill()
                node.proc.wait(10)
                node.proc = None
            self.remove_containers(node.name)
        shutil.rmtree(self.base, ignore_errors=True)


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, node: Node | None = None
) -> Any:
    """Poll ``predicate`` until truthy; fail with the node's log tail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
            error = None
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - a node may be mid-failover; keep polling
            error = exc
        time.sleep(0.25)
    detail = f"last value {last!r}" if error is None else f"last error {error!r}"
    log = f"\n--- {node.name} log ---\n{node.log()}" if node is not None else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; {detail}{log}")


def demo_app(name: str = "hello", replicas: int = 3, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": "p2porch/demo:latest",
        "replicas": replicas,
        "env": [{"name": "MESSAGE", "value": f"hello from {name}"}],
        "ports": [{"containerPort": 8080}],
        "stopGracePeriodSeconds": 1,
    }
    body.update(spec)
    return {"apiVersion": "p2porch/v1", "kind": "App", "metadata": {"name": name}, "spec": body}


@contextlib.contextmanager
def cluster(base: Path, prefix: str, first_host: int = 2) -> Iterator[Cluster]:
    c = Cluster(base, prefix, first_host)
    try:
        yield c
    except BaseException:
        for node in c.nodes:
            sys.stderr.write(f"\n--- {node.name} ({node.host}) log ---\n{node.log(80)}\n")
        raise
    finally:
        c.teardown()


def dump(value: Any) -> str:
    return json.dumps(value, indent=1, default=str)
