"""The main job: a local 3-node cluster on this machine's Docker, running the demo app.

``p2porch demo`` (what ``scripts/demo.sh`` runs):

1. builds the registry-free images (busybox-static base + the demo page) if they changed;
2. starts three agents on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (data in ./demo-cluster/), the
   first creating the cluster and the others joining it with its token -- or, on a second run,
   reuses the agents that answer and restarts the ones that do not (their data dirs rejoin);
3. applies examples/demo.yaml (3 replicas of a page showing $MESSAGE and the replica's name)
   and waits until they run;
4. prints where each replica runs and fetches each page once over loopback.

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

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
API_PORT = 7950


def _api(host: str) -> str:
    return f"http://{host}:{API_PORT}"


def _healthy(host: str) -> bool:
    try:
        return httpx.get(f"{_api(host)}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _start_agent(data_dir: Path, host: str, name: str, join: tuple[str, str] | None) -> None:
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
    ]
    if join is not None and not (data_dir / "node.json").exists():
        cmd += ["--join", join[0], "--token", join[1]]
    log = (data_dir / "agent.log").open("ab")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    (data_dir / "agent.pid").write_text(f"{proc.pid}\n")


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
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


def run_demo(base: Path | None = None, down: bool = False, purge: bool = False) -> int:
    base = base or Path.cwd() / "demo-cluster"
    if down:
        return _down(base, purge)
    _build_images()
    for i, host in enumerate(HOSTS, start=1):
        data = base / f"n{i}"
        if _healthy(host):
            print(f"node n{i} on {host}: already running")
            continue
        join = None
        if i > 1:
            token = (base / "n1" / "join-token").read_text().strip()
            join = (HOSTS[0], token)
        _start_agent(data, host, f"n{i}", join)
        _wait(lambda h=host: _healthy(h), 30, f"node n{i} on {host}")
        print(f"node n{i} on {host}: started (log: {data / 'agent.log'})")
    _wait(
        lambda: len(httpx.get(f"{_api(HOSTS[0])}/v1/status", timeout=2).json()["voters"]) == 3,
        60,
        "three voters",
    )

    from p2porch.node.manifest import load_manifest_file, to_manifest

    docs = [to_manifest(obj) for obj in load_manifest_file(ROOT / "examples" / "demo.yaml")]
    resp = httpx.post(f"{_api(HOSTS[1])}/v1/apply", json={"documents": docs}, timeout=30)
    if resp.status_code != 200:
        raise SystemExit(f"demo: apply failed: {resp.text}")
    for result in resp.json()["results"]:
        print(f"app {result['namespace']}/{result['name']}: {result['action']}")

    def running() -> bool:
        rows = httpx.get(f"{_api(HOSTS[2])}/v1/replicas?app=hello", timeout=5).json()
        return bool(rows) and all(r["state"] == "running" for r in rows)

    _wait(running, 120, "the demo's replicas to run")
    rows = httpx.get(f"{_api(HOSTS[0])}/v1/replicas?app=hello", timeout=5).json()
    nodes = {n["name"]: n for n in httpx.get(f"{_api(HOSTS[0])}/v1/nodes", timeout=5).json()}
    print("\nThe demo app runs on a 3-node p2porch cluster:\n")
    for row in rows:
        url = _replica_url(row, nodes[row["node"]]["address"])
        try:
            page = httpx.get(url, timeout=3).text if url else ""
            shown = _page_text(page)
        except httpx.HTTPError as exc:
            shown = f"(no answer: {exc})"
        print(f"  {row['name']:<10} on {row['node']:<4} {url:<28} {shown}")
    print(
        "\nNext:\n"
        f"  export P2PORCH_NODE={HOSTS[0]}\n"
        "  .venv/bin/p2porch get nodes            # who leads, who is alive\n"
        "  .venv/bin/p2porch get replicas -o wide\n"
        "  .venv/bin/p2porch scale hello=5\n"
        f"  kill -9 $(cat {base}/n3/agent.pid)   # watch its replica move\n"
        "  .venv/bin/p2porch demo --down          # stop it all"
    )
    return 0


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
