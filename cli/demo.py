"""The main job: a local 3-node cluster on this machine's Docker, running the demo app.

``p2porch demo`` (what ``scripts/demo.sh`` runs):

1. builds the registry-free images (busybox-static base + the demo page) if they changed;
2. starts three agents on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (data in ./demo-cluster/), the
   first creating the cluster and the others joining it with its token -- or, on a second run,
   reuses the agents that answer and restarts the ones that do not (their data dirs rejoin);
3. applies examples/demo.yaml (3 replicas of a page showing $MESSAGE and the replica's name)
   and waits until they run;
4. prints where each replica runs and fetches each page once over loopback;
5. the traffic tour: requests through the HTTP ingress (any node, port 8000) show the three
   replica names; scale to 5 and back; change MESSAGE and watch the rolling update while a
   bounded load loop keeps requesting through the ingress, then print how many requests
   failed (the target is none). ``--no-tour`` skips it.

The agents' API is HTTPS only (mutual TLS 1.3): the demo talks to every node with the admin
credentials the first node wrote (``demo-cluster/n1/client.yaml``: the cluster CA, an admin
certificate and key), through the CLI's own :class:`~p2porch.cli.client.ApiClient`. The demo
app's pages are the app's business, plain HTTP on the ports it publishes.

``p2porch demo --down`` stops the agents and removes the demo's containers (data kept unless
``--purge``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .client import ApiClient, ClientError, TlsFailure
from .config import ConfigError, target_from_config

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
API_PORT = 7950
# The data plane on high ports, so the demo needs no root: HTTP ingress and service DNS.
INGRESS_PORT = 8000
DNS_PORT = 8053
MESH_PORT = 30080
MESSAGES = ("Hello from p2porch", "Hello again, from a rolling update")


def client_config(base: Path) -> Path:
    """The admin client.yaml the first node writes; it serves for every demo node."""
    return base / "n1" / "client.yaml"


def api_client(base: Path, host: str, timeout_s: float = 10.0) -> ApiClient:
    """An HTTPS client of ``host``'s API with the demo cluster's admin credentials.

    ConfigError while the first node has not written its credentials yet.
    """
    target = target_from_config(client_config(base), node=f"{host}:{API_PORT}")
    return ApiClient(target, timeout_s=timeout_s)


def _probe(base: Path, host: str) -> Exception | None:
    """None if ``host`` answers /healthz over TLS verified with the demo's CA; else why not."""
    try:
        with api_client(base, host, timeout_s=2.0) as client:
            return None if client.healthz() else ClientError(f"{host}: not healthy")
    except (ClientError, ConfigError) as exc:
        return exc


def _healthy(base: Path, host: str) -> bool:
    return _probe(base, host) is None


def _start_agent(
    data_dir: Path, host: str, name: str, join: tuple[str, str] | None
) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "p2porch.cli.main",
        "agent",
        "--data-dir",
        str(data_dir),
        "--advertise",
        host,
        "--name",
        name,
        "--ingress-port",
        str(INGRESS_PORT),
        "--dns-port",
        str(DNS_PORT),
    ]
    if join is not None and not (data_dir / "node.json").exists():
        cmd += ["--join", join[0], "--token", join[1]]
    with (data_dir / "agent.log").open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (data_dir / "agent.pid").write_text(f"{proc.pid}\n")
    return proc


def _wait(
    predicate: Any,
    timeout_s: float,
    what: str,
    agent: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``predicate`` until true; fail early, with the end of ``log``, if ``agent`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if agent is not None and agent.poll() is not None:
            tail = (
                log.read_text(errors="replace").splitlines()[-10:]
                if log is not None and log.exists()
                else []
            )
            raise SystemExit(
                f"demo: the agent for {what} exited with code {agent.returncode}; "
                f"end of {log}:\n  " + "\n  ".join(tail)
            )
        time.sleep(0.3)
    raise SystemExit(f"demo: timed out after {timeout_s:.0f} s waiting for {what}")


def _build_images() -> None:
    import docker

    from p2porch.node.images import build_builtin_images

    client = docker.from_env(timeout=120)
    try:
        built = build_builtin_images(client)
    finally:
        client.close()
    for tag in built:
        print(f"image {tag}: ready")


def run_demo(
    base: Path | None = None, down: bool = False, purge: bool = False, tour: bool = True
) -> int:
    base = base or Path.cwd() / "demo-cluster"
    if down:
        return _down(base, purge)
    _build_images()
    for i, host in enumerate(HOSTS, start=1):
        data = base / f"n{i}"
        problem = _probe(base, host)
        if problem is None:
            print(f"node n{i} on {host}: already running")
            continue
        if isinstance(problem, TlsFailure):
            # Something answers there, but TLS with it fails: another cluster's (leftover)
            # agent, whose port a new agent could not take anyway.
            raise SystemExit(
                f"demo: {host}:{API_PORT} is taken by a node of another cluster ({problem}); "
                "stop it (p2porch demo --down, or kill it) and run the demo again"
            )
        join = None
        if i > 1:
            token = (base / "n1" / "join-token").read_text().strip()
            join = (HOSTS[0], token)
        agent = _start_agent(data, host, f"n{i}", join)
        _wait(
            lambda h=host: _healthy(base, h),
            30,
            f"node n{i} on {host}",
            agent,
            data / "agent.log",
        )
        print(f"node n{i} on {host}: started (log: {data / 'agent.log'})")

    def three_voters() -> bool:
        try:
            with api_client(base, HOSTS[0], timeout_s=2.0) as client:
                return len(client.status().get("voters") or []) == 3
        except (ClientError, ConfigError):
            return False

    _wait(three_voters, 60, "three voters")

    from p2porch.node.manifest import load_manifest_file, to_manifest

    docs = [to_manifest(obj) for obj in load_manifest_file(ROOT / "examples" / "demo.yaml")]
    try:
        with api_client(base, HOSTS[1], timeout_s=30.0) as client:
            answer = client.apply(docs)
    except ClientError as exc:
        raise SystemExit(f"demo: apply failed: {exc}") from None
    for result in answer.get("results") or []:
        print(f"app {result['namespace']}/{result['name']}: {result['action']}")

    def running() -> bool:
        try:
            with api_client(base, HOSTS[2], timeout_s=5.0) as client:
                rows = client.replicas(app="hello")
        except (ClientError, ConfigError):
            return False
        return bool(rows) and all(r["state"] == "running" for r in rows)

    _wait(running, 120, "the demo's replicas to run")
    with api_client(base, HOSTS[0], timeout_s=5.0) as client:
        rows = client.replicas(app="hello")
        nodes = {n["name"]: n for n in client.nodes()}
    print("\nThe demo app runs on a 3-node p2porch cluster:\n")
    for row in rows:
        # The app's own page: plain HTTP on the port it publishes (not the node API).
        url = _replica_url(row, nodes[row["node"]]["address"])
        try:
            page = httpx.get(url, timeout=3).text if url else ""
            shown = _page_text(page)
        except httpx.HTTPError as exc:
            shown = f"(no answer: {exc})"
        print(f"  {row['name']:<10} on {row['node']:<4} {url:<28} {shown}")
    if tour:
        _tour(base)
    print(next_steps(base))
    return 0


# --------------------------------------------------------------------------- the traffic tour


def _ingress_page(host: str, timeout_s: float = 3.0) -> tuple[str, str]:
    """(replica, message) of one request through ``host``'s ingress."""
    page = httpx.get(f"http://{host}:{INGRESS_PORT}/", timeout=timeout_s).text
    message = re.search(r'id="message">([^<]*)<', page)
    replica = re.search(r'id="replica">([^<]*)<', page)
    if message is None or replica is None:
        raise ValueError(f"not the demo page: {page.strip()[:80]!r}")
    return html.unescape(replica.group(1)), html.unescape(message.group(1))


def _ready_endpoints(base: Path, host: str) -> int:
    try:
        with api_client(base, host, timeout_s=3.0) as client:
            rows = client.request("GET", "/v1/endpoints", params={"app": "hello"})
    except (ClientError, ConfigError):
        return -1
    return len(rows) if isinstance(rows, list) else -1


def _wait_endpoints(base: Path, count: int) -> None:
    _wait(
        lambda: all(_ready_endpoints(base, h) == count for h in HOSTS),
        120,
        f"{count} ready replicas known on every node",
    )


def _names_through_ingress(requests: int) -> str:
    seen: dict[str, int] = {}
    for i in range(requests):
        replica, _ = _ingress_page(HOSTS[i % len(HOSTS)])
        seen[replica] = seen.get(replica, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(seen.items()))


class _LoadLoop:
    """Requests through the ingress at a steady rate, in a thread, for at most ``max_s``."""

    def __init__(self, host: str, rate: float = 50.0, max_s: float = 180.0) -> None:
        import threading

        self.host, self.rate, self.max_s = host, rate, max_s
        self.answered = 0
        self.failed: list[str] = []
        self.messages: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _LoadLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                _, message = _ingress_page(self.host)
                self.answered += 1
                self.messages[message] = self.messages.get(message, 0) + 1
            except (httpx.HTTPError, ValueError) as exc:
                self.failed.append(str(exc))
            next_at += 1 / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def _tour(base: Path) -> None:
    _wait_endpoints(base, 3)
    print(f"\nThrough the HTTP ingress (any node, port {INGRESS_PORT}), requests spread:")
    print(f"  curl http://{HOSTS[0]}:{INGRESS_PORT}/   -> {_names_through_ingress(9)}")
    print(f"  (the routing mesh answers on every node too: http://{HOSTS[1]}:{MESH_PORT}/)")
    with api_client(base, HOSTS[0], timeout_s=30.0) as client:
        client.scale("default", "hello", 5)
        _wait_endpoints(base, 5)
        print(f"\nScaled to 5:  {_names_through_ingress(15)}")
        client.scale("default", "hello", 3)
        _wait_endpoints(base, 3)
        print(f"Back to 3:    {_names_through_ingress(9)}")
        app = client.app("default", "hello")
    env = app["spec"].get("env") or []
    current = next((e["value"] for e in env if e.get("name") == "MESSAGE"), MESSAGES[0])
    new = MESSAGES[1] if current == MESSAGES[0] else MESSAGES[0]
    for item in env:
        if item.get("name") == "MESSAGE":
            item["value"] = new
    manifest = {k: v for k, v in app.items() if k in ("apiVersion", "kind", "metadata", "spec")}
    print(f"\nRolling update: MESSAGE -> {new!r}, while 50 requests/s go through the ingress")
    with _LoadLoop(HOSTS[2]) as load:
        time.sleep(1.0)
        with api_client(base, HOSTS[0], timeout_s=30.0) as client:
            client.apply([manifest])
            started = time.monotonic()
            last = ""
            while time.monotonic() - started < 150:
                status = client.request("GET", "/v1/apps/default/hello/rollout")
                line = (
                    f"  revision {status.get('revision')}: {status.get('updated')}/"
                    f"{status.get('replicas')} updated, {status.get('ready')} ready, "
                    f"{status.get('state')}"
                )
                if line != last:
                    print(f"{line}  ({time.monotonic() - started:4.1f} s)")
                    last = line
                if status.get("state") in ("complete", "paused"):
                    break
                time.sleep(0.25)
        time.sleep(1.0)
    print(
        f"  {load.answered + len(load.failed)} requests during the rollout, "
        f"{len(load.failed)} failed; answers by message: {load.messages}"
    )
    for failure in load.failed[:3]:
        print(f"    failed: {failure}")


def next_steps(base: Path) -> str:
    """What to try next: the CLI needs the admin credentials n1 wrote (the API is mTLS)."""
    return (
        "\nNext (the API is HTTPS with client certificates; n1 wrote admin credentials):\n"
        f"  export P2PORCH_CONFIG={client_config(base)}\n"
        "  .venv/bin/p2porch get nodes            # who leads, who is alive\n"
        "  .venv/bin/p2porch get replicas -o wide\n"
        "  .venv/bin/p2porch scale hello=5\n"
        f"  curl http://{HOSTS[0]}:{INGRESS_PORT}/             # any node's ingress\n"
        "  .venv/bin/p2porch rollout status hello  # after changing MESSAGE in examples/demo.yaml\n"
        "  .venv/bin/p2porch rollout undo hello\n"
        f"  kill -9 $(cat {base}/n3/agent.pid)   # watch its replica move\n"
        "  .venv/bin/p2porch demo --down          # stop it all"
    )


def _page_text(page: str) -> str:
    """The demo page's message and replica as one line: 'Hello from p2porch (hello-0)'."""
    message = re.search(r'id="message">([^<]*)<', page)
    replica = re.search(r'id="replica">([^<]*)<', page)
    if message is None or replica is None:
        return page.strip()[:60]
    return f"{html.unescape(message.group(1))} ({html.unescape(replica.group(1))})"


def _replica_url(row: dict[str, Any], address: str) -> str:
    """The loopback URL of a replica's port 8080, from the host port its node reported."""
    ports = row.get("publishedPorts") or row.get("ports") or {}
    if isinstance(ports, dict):
        for container_port, host in ports.items():
            if str(container_port).split("/")[0] == "8080":
                return f"http://{host}/" if ":" in str(host) else f"http://{address}:{host}/"
    if isinstance(ports, list):
        for port in ports:
            if isinstance(port, dict) and port.get("containerPort") == 8080:
                host_port = port.get("hostPort")
                return f"http://{port.get('hostIp') or address}:{host_port}/"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _down(base: Path, purge: bool) -> int:
    pids: list[int] = []
    for pid_file in sorted(base.glob("n*/agent.pid")):
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
            print(f"stopping agent {pid_file.parent.name}")
        except (ValueError, ProcessLookupError, OSError):
            pass
        pid_file.unlink(missing_ok=True)
    # Wait for the agents to exit before removing containers: a stopping agent's reconciler
    # would otherwise put back what it sees removed.
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    import docker

    client = docker.from_env(timeout=60)
    try:
        for name in ("n1", "n2", "n3"):
            for container in client.containers.list(
                all=True, filters={"label": f"io.p2porch.node={name}"}
            ):
                container.remove(force=True)
                print(f"removed container {container.name}")
    finally:
        client.close()
    if purge and base.exists():
        shutil.rmtree(base)
        print(f"removed {base}")
    return 0


if __name__ == "__main__":
    print(json.dumps({"usage": "p2porch demo [--down [--purge]]"}))
