"""Data-plane benchmarks: mesh and ingress throughput next to a direct request, rolling updates
under an open-loop load, and how fast endpoints follow readiness and node death.

Run from the repository root::

    python3 -m benchmarks.traffic_bench                  # everything, ~5 min here
    python3 -m benchmarks.traffic_bench --quick          # shorter wrk runs, fewer rounds
    python3 -m benchmarks.traffic_bench --only throughput     # or rollout, endpoints,
                                                              # ready, death (comma-separated)
    python3 -m benchmarks.traffic_bench --json > out.json     # tables on stderr, JSON on stdout

One three-node cluster (127.0.0.170-172, the ``lan`` preset and the product's own graces,
``--ingress-port 18080 --dns-port 18053``), started by the integration harness
(tests/integration/cluster/harness.py, imported), runs the demo app ``web`` (3 replicas, mesh
port 30170, ingress host ``web.bench``, a 1 s readiness probe, start-first updates). Parts:

1. **throughput** -- wrk against (a) one replica's published host port directly, (b) the mesh
   on the published port of the node running that replica (prefer-local: the mesh picks it),
   (c) the ingress with the rule's Host header (spread over all replicas). Then the app is
   scaled to 2 so one node runs none, and (d) the mesh on that node (a remote hop to 2
   replicas) is measured next to a direct request to one of them. Rounds alternate the order.
2. **rollout** -- an open-loop load (threads sharing one schedule; wrk cannot rate-limit)
   through the ingress (and the mesh with ``--mesh-rate``) while MESSAGE changes; failed
   requests (connection errors, status != 200, a page without the demo markers or cut short),
   answers per message, rollout duration, achieved rate.
3. **endpoints** -- (ready) scale 3 -> 4 and poll the new replica's owner and the two other
   nodes every ~20 ms: delay between ``ready`` on the owner and the replica listed in the other
   nodes' ``/v1/endpoints``; (death) SIGKILL a node (harness power cut) and poll the survivors'
   ``/v1/nodes`` and ``/v1/endpoints``: when the node is declared dead and when its endpoints
   are gone.

Nothing asserts: figures, PASS/FAIL against the targets, and JSON. Every agent, container and
temp dir is removed in ``finally`` blocks (SIGTERM too). Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from tests.integration.cluster.harness import Cluster, Node, demo_app, wait_for

FIRST_HOST = 170  # 127.0.0.170-172
INGRESS_PORT = 18080
DNS_PORT = 18053
MESH_PORT = 30170
APP = "web"
HOST_HEADER = "web.bench"
POLL_S = 0.02
REPLICA_RE = re.compile(r'id="replica">([^<]+)<')
MESSAGE_RE = re.compile(r'id="message">([^<]+)<')
TARGET_MESH_RATIO = 0.5
TARGET_READY_S = 1.0
TARGET_REMOVED_S = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Human output goes to stdout; with --json to stderr, so stdout holds only the JSON document.
_OUT: dict[str, Any] = {"stream": sys.stdout}


def log(text: str = "") -> None:
    print(text, file=_OUT["stream"], flush=True)


def table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        padded = (v.rjust(w) if k else v.ljust(w) for v, w in zip(row, widths, strict=True))
        log("  " + "  ".join(padded))
        if k == 0:
            log("  " + "  ".join("-" * w for w in widths))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def med(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# --------------------------------------------------------------------------- cluster + app


def web_app(message: str, replicas: int = 3) -> dict[str, Any]:
    body = demo_app(
        APP,
        replicas,
        ports=[{"containerPort": 8080, "publishedPort": MESH_PORT}],
        ingress=[{"host": HOST_HEADER, "path": "/", "port": 8080}],
        readinessProbe={"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
        update={"order": "start-first", "maxSurge": 1},
    )
    body["spec"]["env"] = [{"name": "MESSAGE", "value": message}]
    return body


class Api:
    """A keep-alive mTLS client to one node's API (the harness's ``Node.get`` loads the
    certificates on every call: too slow for 20 ms polling). One per thread."""

    def __init__(self, node: Node, timeout_s: float = 3.0) -> None:
        self.node = node
        self.http = httpx.Client(base_url=node.api, timeout=timeout_s, verify=node.ssl_context())

    def get(self, path: str) -> Any:
        resp = self.http.get(path)
        resp.raise_for_status()
        return resp.json()

    def close(self) -> None:
        self.http.close()


class Bench:
    """The cluster, the app's current message and replica count, and the admin calls."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.message = "v1"
        self.replicas = 3

    @property
    def nodes(self) -> list[Node]:
        return self.c.nodes

    def apply(self, message: str | None = None, replicas: int | None = None) -> None:
        self.message = message or self.message
        self.replicas = replicas or self.replicas
        self.c.apply(self.c.any_alive(), web_app(self.message, self.replicas))

    def endpoints(self, node: Node) -> list[dict[str, Any]]:
        return list(node.get(f"/v1/endpoints?app={APP}", timeout=5))

    def rollout(self) -> dict[str, Any]:
        return dict(self.c.any_alive().get(f"/v1/apps/default/{APP}/rollout", timeout=5))

    def serving(self, per_node: int | None = None) -> bool:
        """Every live node lists ``replicas`` ready endpoints, all of the current revision's
        replicas answering with the current message through the ingress; optionally exactly
        ``per_node`` of them on each node."""
        live = [n for n in self.nodes if n.proc is not None]
        for node in live:
            eps = self.endpoints(node)
            if len(eps) != self.replicas:
                return False
            if per_node is not None and Counter(e["node"] for e in eps) != {
                n.name: per_node for n in live
            }:
                return False
        status = self.rollout()
        if status["state"] != "complete" or status["ready"] != self.replicas:
            return False
        seen = {fetch_page(live[0].host, INGRESS_PORT, HOST_HEADER)[2] for _ in range(6)}
        return seen == {self.message}

    def wait_serving(self, per_node: int | None = None, timeout_s: float = 120) -> None:
        wait_for(
            lambda: self.serving(per_node),
            timeout_s,
            f"{self.replicas} ready replicas serving {self.message!r}",
            self.c.any_alive(),
        )


@contextlib.contextmanager
def bench_cluster(preset: str) -> Iterator[Bench]:
    base = Path(tempfile.mkdtemp(prefix="p2porch-trafficbench-"))
    args = ("--ingress-port", str(INGRESS_PORT), "--dns-port", str(DNS_PORT))
    c = Cluster(base, "tb", FIRST_HOST, preset=preset, agent_args=args)
    try:
        build_images()
        c.form(3)
        wait_for(lambda: settled(c), 90, "3 voters, all alive", c.nodes[0])
        bench = Bench(c)
        bench.apply("v1", 3)
        bench.wait_serving(per_node=1)
        yield bench
    except BaseException:
        for node in c.nodes:
            sys.stderr.write(f"\n--- {node.name} ({node.host}) log ---\n{node.log(40)}\n")
        raise
    finally:
        c.teardown()


def build_images() -> None:
    import docker

    from p2porch.node.images import build_builtin_images

    client = docker.from_env(timeout=120)
    try:
        build_builtin_images(client)
    finally:
        client.close()


def wait_containers_gone(node_name: str, replica: str, timeout_s: float = 60) -> None:
    """No container of ``replica`` left on ``node_name`` (both labels: other runs on this
    engine may have a replica of the same name on their own nodes)."""
    import docker

    client = docker.from_env(timeout=60)
    labels = [f"io.p2porch.node={node_name}"]

    def gone() -> bool:
        found = client.containers.list(all=True, filters={"label": labels})
        names = {c.labels.get("io.p2porch.replica", "") for c in found}
        return replica not in names and f"default/{replica}" not in names

    try:
        wait_for(gone, timeout_s, f"{replica}'s container on {node_name} to go")
    finally:
        client.close()


def settled(c: Cluster) -> bool:
    for node in c.nodes:
        if node.proc is None:
            return False
        status = node.get("/v1/status", timeout=3)
        if not status.get("quorum") or len(status.get("voters", ())) != len(c.nodes):
            return False
        if any(n["status"] != "alive" for n in node.get("/v1/nodes", timeout=3)):
            return False
    return True


def fetch_page(host: str, port: int, host_header: str | None = None) -> tuple[int, str, str]:
    """(status, replica, message) of one GET /; replica/message empty when absent."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Host": host_header or f"{host}:{port}"})
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    replica, message = REPLICA_RE.search(body), MESSAGE_RE.search(body)
    return (
        resp.status,
        replica.group(1) if replica else "",
        message.group(1) if message else "",
    )


def local_endpoint(bench: Bench, node: Node) -> dict[str, Any] | None:
    """The ready endpoint of ``web`` on ``node`` (as ``node`` lists it), if it runs one."""
    for ep in bench.endpoints(node):
        if ep["node"] == node.name:
            return ep
    return None


def endpoint_address(ep: dict[str, Any]) -> tuple[str, int]:
    for port in ep["ports"]:
        if port["containerPort"] == 8080:
            return str(port["host"]), int(port["hostPort"])
    raise RuntimeError(f"endpoint without port 8080: {ep}")


# --------------------------------------------------------------------------- 1. throughput

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not found:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """The figures of ``wrk --latency`` output (requests/s, p50/p99 ms, errors)."""
    out: dict[str, Any] = {"non_2xx_3xx": 0, "socket_errors": 0, "errors_detail": {}}
    if found := re.search(r"Requests/sec:\s+([\d.]+)", output):
        out["rps"] = round(float(found.group(1)), 1)
    if found := re.search(r"(\d+) requests in", output):
        out["requests"] = int(found.group(1))
    for pct in ("50", "99"):
        if found := re.search(rf"^\s+{pct}%\s+(\S+)", output, re.MULTILINE):
            out[f"p{pct}_ms"] = round(_ms(found.group(1)), 2)
    if found := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        out["non_2xx_3xx"] = int(found.group(1))
    if found := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        detail = dict(
            zip(("connect", "read", "write", "timeout"), map(int, found.groups()), strict=True)
        )
        out["errors_detail"] = detail
        out["socket_errors"] = sum(detail.values())
    return out


def run_wrk(
    url: str, host_header: str | None, conns: int, seconds: float, close_delimited: bool
) -> dict[str, Any]:
    """One wrk run. ``close_delimited``: the answers carry no length and end at the close
    (the demo page is a busybox CGI); wrk then counts every answer *also* as a read error (it
    reads EOF before the next request), so only read errors beyond the answers are errors."""
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if host_header:
        cmd += ["-H", f"Host: {host_header}"]
    cmd.append(url)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0 or "Requests/sec" not in proc.stdout:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    out = parse_wrk(proc.stdout)
    detail = out["errors_detail"]
    reads = detail.get("read", 0)
    if close_delimited:
        reads = max(0, reads - out.get("requests", 0))
    out["errors"] = (
        detail.get("connect", 0) + detail.get("write", 0) + detail.get("timeout", 0) + reads
    )
    out["close_delimited"] = close_delimited
    return out


def framing(host: str, port: int, host_header: str | None, path: str) -> bool:
    """Whether answers on this target end at the close (no Content-Length, not chunked)."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host_header or f"{host}:{port}"})
        resp = conn.getresponse()
        resp.read()
        return resp.length is None and not resp.chunked
    finally:
        conn.close()


def who_answers(host: str, port: int, host_header: str | None, n: int = 9) -> dict[str, int]:
    return dict(Counter(fetch_page(host, port, host_header)[1] for _ in range(n)))


Target = tuple[str, int, str | None]  # host, port, Host header


def time_wait() -> int:
    """TCP sockets in TIME_WAIT on this host (/proc/net/sockstat ``tw``). Each request here is
    a new connection (busybox httpd closes after every answer), so a 10 s run leaves ~25,000;
    a later run towards the same address competes with them for ephemeral ports (28k here;
    tcp_tw_reuse only covers loopback, not docker-proxy's leg to the container)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return -1


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def throughput_phase(
    targets: dict[str, Target],
    paths: list[str],
    conns: int,
    seconds: float,
    rounds: int,
    agent: Node,
) -> dict[str, Any]:
    """``rounds`` rounds of wrk over every target and path (keys ``"label path"``), the order
    reversed every other round so a drifting background load hits all alike. ``agent``'s CPU
    (the node whose mesh and ingress are measured) is sampled around each run: a user-space
    proxy that is CPU-bound shows ~100% of a core."""
    assert agent.proc is not None
    pid = agent.proc.pid
    keys = [(label, path) for path in paths for label in targets]
    closes = {(label, path): framing(*targets[label], path) for label, path in keys}
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in keys}
    for rnd in range(rounds):
        for label, path in keys if rnd % 2 == 0 else keys[::-1]:
            host, port, header = targets[label]
            tw = time_wait()
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            result = run_wrk(
                f"http://{host}:{port}{path}", header, conns, seconds, closes[label, path]
            )
            cpu = cpu_seconds(pid) - cpu0
            result["agent_cpu_pct"] = round(100 * cpu / (time.monotonic() - t0), 1)
            result["time_wait_before"] = tw
            samples[label, path].append(result)
            log(
                f"  round {rnd + 1} {label + ' ' + path:22s} {result.get('rps', 0):8.1f} req/s"
                f"  p50 {result.get('p50_ms', float('nan')):7.2f} ms  p99 "
                f"{result.get('p99_ms', float('nan')):7.2f} ms  non-2xx/3xx "
                f"{result['non_2xx_3xx']}  errors {result['errors']}  {agent.name} CPU "
                f"{result['agent_cpu_pct']:.0f}%  TIME_WAIT before {tw}  (wrk socket errors "
                f"{result['errors_detail'] or 0}"
                + (", ends at close: reads = EOFs)" if result["close_delimited"] else ")")
            )
    out: dict[str, Any] = {}
    for (label, path), runs in samples.items():
        out[f"{label} {path}"] = {
            "rps_median": med([r["rps"] for r in runs if "rps" in r]),
            "p99_ms_median": med([r["p99_ms"] for r in runs if "p99_ms" in r]),
            "p50_ms_median": med([r["p50_ms"] for r in runs if "p50_ms" in r]),
            "agent": agent.name,
            "agent_cpu_pct_median": med([r["agent_cpu_pct"] for r in runs]),
            "non_2xx_3xx": sum(r["non_2xx_3xx"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "wrk_socket_errors": sum(r["socket_errors"] for r in runs),
            "rounds": runs,
        }
    return out


def throughput_bench(
    bench: Bench, conns: int, seconds: float, rounds: int, paths: list[str]
) -> dict[str, Any]:
    log(
        f"== throughput: wrk -t2 -c{conns} -d{seconds:g}s --latency, {rounds} rounds, "
        f"paths {paths}"
    )
    bench.apply(replicas=3)
    bench.wait_serving(per_node=1)
    # A follower if possible: the leader's scheduler and rollout loops cost it some CPU.
    leader = bench.c.leader()
    node = next((n for n in bench.nodes if n is not leader), bench.nodes[0])
    ep = local_endpoint(bench, node)
    if ep is None:
        raise RuntimeError(f"{node.name} runs no replica of {APP}")
    d_host, d_port = endpoint_address(ep)
    targets: dict[str, Target] = {
        "direct": (d_host, d_port, None),
        "mesh": (node.host, MESH_PORT, None),
        "ingress": (node.host, INGRESS_PORT, HOST_HEADER),
    }
    hits = {label: who_answers(*t) for label, t in targets.items()}
    log(
        f"  node {node.name} ({node.host}); direct = {ep['replica']} at {d_host}:{d_port} "
        f"(its host port); answered by: {hits}"
    )
    local = throughput_phase(targets, paths, conns, seconds, rounds, node)

    # A node with no replica of its own: scale to 2, the spread leaves one node empty.
    bench.apply(replicas=2)
    bench.wait_serving()
    eps = bench.endpoints(bench.nodes[0])
    running = {e["node"] for e in eps}
    empty = next(n for n in bench.nodes if n.name not in running)
    far = sorted(eps, key=lambda e: str(e["replica"]))[0]
    f_host, f_port = endpoint_address(far)
    remote_targets: dict[str, Target] = {
        "direct-2": (f_host, f_port, None),
        "mesh-remote": (empty.host, MESH_PORT, None),
    }
    remote_hits = {label: who_answers(*t) for label, t in remote_targets.items()}
    log(
        f"  scaled to 2: {empty.name} ({empty.host}) runs none; direct-2 = {far['replica']} "
        f"on {far['node']}; answered by: {remote_hits}"
    )
    remote = throughput_phase(remote_targets, paths, conns, seconds, rounds, empty)
    bench.apply(replicas=3)
    bench.wait_serving()

    figures = {**local, **remote}

    def ratio(a: str, b: str) -> float | None:
        x, y = figures[a]["rps_median"], figures[b]["rps_median"]
        return round(float(x) / float(y), 3) if x and y else None

    ratios: dict[str, float | None] = {}
    for path in paths:
        ratios[f"mesh/direct {path}"] = ratio(f"mesh {path}", f"direct {path}")
        ratios[f"ingress/direct {path}"] = ratio(f"ingress {path}", f"direct {path}")
        ratios[f"mesh-remote/direct-2 {path}"] = ratio(f"mesh-remote {path}", f"direct-2 {path}")
    rows = []
    for key, fig in figures.items():
        per_round = " / ".join(f"{r.get('rps', 0):.0f}" for r in fig["rounds"])
        rows.append(
            [
                key,
                fig["rps_median"],
                per_round,
                fig["p50_ms_median"],
                fig["p99_ms_median"],
                fig["non_2xx_3xx"],
                fig["errors"],
                f"{fig['agent']} {fig['agent_cpu_pct_median']:.0f}%",
            ]
        )
    log()
    table(
        ["target", "req/s (median)", "per round", "p50 ms", "p99 ms", "non-2xx", "errors",
         "agent CPU"],
        rows,
    )
    verdicts: dict[str, bool] = {}
    for path in paths:
        value = ratios[f"mesh/direct {path}"]
        verdicts[path] = value is not None and value >= TARGET_MESH_RATIO
    ok = all(verdicts.values())
    for path in paths:
        log(
            f"  {path}: mesh/direct {ratios[f'mesh/direct {path}']} (target >= "
            f"{TARGET_MESH_RATIO}: {'PASS' if verdicts[path] else 'FAIL'}), ingress/direct "
            f"{ratios[f'ingress/direct {path}']}, mesh-remote/direct-2 "
            f"{ratios[f'mesh-remote/direct-2 {path}']}"
        )
    return {
        "node": node.name,
        "direct_replica": ep["replica"],
        "answered_by": hits,
        "no_local_node": empty.name,
        "answered_by_remote": remote_hits,
        "targets": figures,
        "ratios": ratios,
        "pass": ok,
        "pass_by_path": verdicts,
        "conns": conns,
        "seconds": seconds,
        "paths": paths,
    }


# --------------------------------------------------------------------------- 2. rollout


class OpenLoad:
    """``rate`` requests/s to host:port (GET /, ``Host`` header), open loop: request i is due
    at t0 + i/rate whatever happened to the ones before; ``workers`` threads take the next
    due slot. A request that starts > 50 ms after its slot is counted ``late`` (all workers
    were busy): then the loop is no longer open and the achieved rate says so."""

    def __init__(
        self, host: str, port: int, header: str | None, rate: float, workers: int, max_s: float
    ) -> None:
        self.host, self.port, self.header = host, port, header
        self.rate, self.workers, self.max_s = rate, workers, max_s
        self.ok = 0
        self.late = 0
        self.failures: Counter[str] = Counter()
        self.samples: list[str] = []
        self.messages: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        self.t0 = 0.0
        self.elapsed_s = 0.0

    def __enter__(self) -> OpenLoad:
        self.t0 = time.monotonic() + 0.05
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        self.elapsed_s = time.monotonic() - self.t0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def _fail(self, kind: str, detail: str) -> None:
        with self._lock:
            self.failures[kind] += 1
            if len(self.samples) < 10:
                self.samples.append(f"{kind}: {detail}"[:200])

    def _run(self) -> None:
        deadline = self.t0 + self.max_s
        while not self._stop.is_set():
            with self._lock:
                i = self._next
                self._next += 1
            due = self.t0 + i / self.rate
            if due > deadline:
                return
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            if time.monotonic() - due > 0.05:
                with self._lock:
                    self.late += 1
            self._one()

    def _one(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": self.header or self.host})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            self._fail(type(exc).__name__, str(exc))
            return
        finally:
            conn.close()
        message = MESSAGE_RE.search(body)
        if resp.status != 200:
            self._fail(f"HTTP {resp.status}", body[:120])
        elif message is None or not REPLICA_RE.search(body) or "</html>" not in body:
            self._fail("bad page", body[:120])
        else:
            with self._lock:
                self.ok += 1
                self.messages[message.group(1)] += 1

    def summary(self) -> dict[str, Any]:
        done = self.ok + self.failed
        return {
            "answered": self.ok,
            "failed": self.failed,
            "failures": dict(self.failures),
            "failure_samples": self.samples,
            "by_message": dict(self.messages),
            "late": self.late,
            "achieved_rps": round(done / self.elapsed_s, 1) if self.elapsed_s else None,
            "seconds": round(self.elapsed_s, 1),
        }


def rollout_bench(
    bench: Bench, rate: float, mesh_rate: float, workers: int, rounds: int
) -> dict[str, Any]:
    log(
        f"== rollout under load: {rate:g} req/s through the ingress"
        + (f" + {mesh_rate:g} req/s through the mesh" if mesh_rate else "")
        + f", {workers} workers each; {rounds} MESSAGE changes"
    )
    bench.apply(replicas=3)
    bench.wait_serving()
    leader = bench.c.leader()
    entry = next((n for n in bench.nodes if n is not leader), bench.nodes[0])
    log(f"  load enters at {entry.name} ({entry.host}); the leader is {leader.name}")
    results = []
    for rnd in range(rounds):
        old = bench.message
        new = f"v{int(old[1:]) + 1}" if re.fullmatch(r"v\d+", old) else "v2"
        before = bench.rollout()["revision"]
        loads = [OpenLoad(entry.host, INGRESS_PORT, HOST_HEADER, rate, workers, 300)]
        if mesh_rate:
            loads.append(OpenLoad(entry.host, MESH_PORT, None, mesh_rate, workers, 300))
        with contextlib.ExitStack() as stack:
            for load in loads:
                stack.enter_context(load)
            first = loads[0]
            wait_for(lambda: first.ok >= rate, 30, "the load to get going")  # noqa: B023
            t_apply = time.monotonic()
            bench.apply(message=new)

            def done() -> dict[str, Any] | None:
                status = bench.rollout()
                if status["revision"] > before and status["state"] == "complete":  # noqa: B023
                    return status
                return None

            final = wait_for(done, 300, f"the rollout {old} -> {new} to complete")
            rollout_s = time.monotonic() - t_apply
            time.sleep(3.0)
        row: dict[str, Any] = {
            "from": old,
            "to": new,
            "rollout_s": round(rollout_s, 2),
            "rolled_back": bool(final.get("rollbackOf")),
            "ingress": loads[0].summary(),
        }
        if mesh_rate:
            row["mesh"] = loads[1].summary()
        results.append(row)
        for label in ("ingress", "mesh"):
            if label in row:
                s = row[label]
                log(
                    f"  round {rnd + 1} {old}->{new} {label:7s}: rollout {rollout_s:5.2f} s  "
                    f"answered {s['answered']}  failed {s['failed']} {s['failures'] or ''}  "
                    f"by message {s['by_message']}  achieved {s['achieved_rps']} req/s "
                    f"(late {s['late']})"
                )
                for sample in s["failure_samples"][:3]:
                    log(f"      e.g. {sample}")
        bench.wait_serving()
    log()
    rows = []
    for i, row in enumerate(results):
        for label in ("ingress", "mesh"):
            if label in row:
                s = row[label]
                rows.append(
                    [
                        i + 1,
                        f"{row['from']}->{row['to']}",
                        label,
                        row["rollout_s"],
                        s["answered"],
                        s["failed"],
                        " ".join(f"{k}:{v}" for k, v in sorted(s["by_message"].items())),
                        s["achieved_rps"],
                        s["late"],
                    ]
                )
    table(
        ["round", "change", "via", "rollout s", "answered", "failed", "by message", "req/s",
         "late"],
        rows,
    )
    failed = sum(r[label]["failed"] for r in results for label in ("ingress", "mesh") if label in r)
    verdict = "PASS" if failed == 0 else "FAIL"
    log(f"  failed requests in all rounds: {failed} (target 0: {verdict})")
    return {
        "rate": rate,
        "mesh_rate": mesh_rate,
        "workers": workers,
        "entry_node": entry.name,
        "rounds": results,
        "rollout_s_median": med([r["rollout_s"] for r in results]),
        "failed_total": failed,
        "pass": failed == 0,
    }


# --------------------------------------------------------------------------- 3. endpoints


class FirstSeen(threading.Thread):
    """Poll ``probe(api)`` every POLL_S until every named condition it reports has been true
    once; record, per condition, the monotonic time of the first answer that showed it
    (``at``) and of the answer before (``before``: the condition became true in between)."""

    def __init__(
        self, node: Node, probe: Callable[[Api], dict[str, bool]], names: list[str]
    ) -> None:
        super().__init__(daemon=True)
        self.node, self.probe, self.names = node, probe, names
        self.at: dict[str, float] = {}
        self.before: dict[str, float] = {}
        self.polls = 0
        self.first_poll_true: set[str] = set()
        self.stop = threading.Event()
        self.errors = 0
        self.api = Api(node, timeout_s=2)

    def run(self) -> None:
        last: float | None = None
        try:
            while not self.stop.is_set() and len(self.at) < len(self.names):
                # The node reads its state as the request arrives: stamp the send time.
                now = time.monotonic()
                try:
                    seen = self.probe(self.api)
                except (httpx.HTTPError, ValueError, KeyError):
                    self.errors += 1
                    self.stop.wait(POLL_S)
                    continue
                self.polls += 1
                for name, true in seen.items():
                    if true and name not in self.at:
                        self.at[name] = now
                        self.before[name] = last if last is not None else now
                        if last is None:
                            self.first_poll_true.add(name)
                last = now
                self.stop.wait(POLL_S)
        finally:
            self.api.close()

    def done(self) -> bool:
        return len(self.at) >= len(self.names)


def wait_threads(threads: list[FirstSeen], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(t.done() for t in threads):
            break
        time.sleep(0.05)
    for t in threads:
        t.stop.set()
    for t in threads:
        t.join(5)
    return all(t.done() for t in threads)


def ready_round(bench: Bench, rnd: int) -> dict[str, Any]:
    new = f"{APP}-3"
    via = Api(bench.nodes[0])
    try:
        t_apply = time.monotonic()
        bench.apply(replicas=4)

        def placed() -> str | None:
            for row in via.get(f"/v1/replicas?app={APP}"):
                if row["name"] == new and row.get("node"):
                    return str(row["node"])
            return None

        owner_name = wait_for(placed, 30, f"{new} placed")
        t_placed = time.monotonic()
    finally:
        via.close()
    owner = next(n for n in bench.nodes if n.name == owner_name)
    others = [n for n in bench.nodes if n is not owner]

    def owner_probe(api: Api) -> dict[str, bool]:
        # /v1/local/replicas takes node certificates only; /v1/replicas asked of the owner
        # reads the owner's own statuses locally (and the others' over the network).
        rows = api.get(f"/v1/replicas?app={APP}&node={owner.name}")
        return {"ready": any(r["name"] == new and r["ready"] for r in rows)}

    def listed_probe(api: Api) -> dict[str, bool]:
        rows = api.get(f"/v1/endpoints?app={APP}")
        return {"listed": any(r["replica"] == new and r["ready"] for r in rows)}

    pollers = [FirstSeen(owner, owner_probe, ["ready"])]
    pollers += [FirstSeen(n, listed_probe, ["listed"]) for n in others]
    for p in pollers:
        p.start()
    complete = wait_threads(pollers, 60)
    t_ready = pollers[0].at.get("ready")
    row: dict[str, Any] = {
        "round": rnd + 1,
        "owner": owner.name,
        "placed_s": round(t_placed - t_apply, 3),
        "ready_s": round(t_ready - t_apply, 3) if t_ready else None,
        "complete": complete,
        # Ready already on the first poll: the moment is not bracketed (poller started late).
        "ready_unbracketed": "ready" in pollers[0].first_poll_true,
        "listed_after_ready_s": {},
        "resolution_s": {},
        "polls": {p.node.name: p.polls for p in pollers},
    }
    for p in pollers[1:]:
        at = p.at.get("listed")
        if at is not None and t_ready is not None:
            row["listed_after_ready_s"][p.node.name] = round(at - t_ready, 3)
            # The true delay lies within +- one poll gap of each side.
            gap = (at - p.before["listed"]) + (t_ready - pollers[0].before["ready"])
            row["resolution_s"][p.node.name] = round(gap, 3)
    bench.apply(replicas=3)
    wait_for(lambda: bench.serving(per_node=1), 120, "back to 3 replicas, one per node")
    wait_for(
        lambda: all(e["replica"] != new for e in bench.endpoints(owner)),
        60,
        f"{new} gone from {owner.name}",
    )
    wait_containers_gone(owner.name, new)
    return row


def death_round(bench: Bench, rnd: int) -> dict[str, Any]:
    c = bench.c
    leader = c.leader()
    followers = [n for n in bench.nodes if n is not leader]
    victim = followers[rnd % len(followers)]
    survivors = [n for n in bench.nodes if n is not victim]
    eps_before = [e for e in bench.endpoints(survivors[0]) if e["node"] == victim.name]
    if not eps_before:
        raise RuntimeError(f"{victim.name} has no endpoint of {APP}: nothing to remove")

    def probe(api: Api) -> dict[str, bool]:
        nodes = {n["name"]: n["status"] for n in api.get("/v1/nodes")}
        eps = api.get(f"/v1/endpoints?app={APP}")
        status = nodes.get(victim.name, "dead")
        return {
            "suspect": status != "alive",
            "dead": status in ("dead", "left"),
            "gone": all(e["node"] != victim.name for e in eps),
        }

    pollers = [FirstSeen(n, probe, ["suspect", "dead", "gone"]) for n in survivors]
    for p in pollers:
        p.start()
    time.sleep(0.2)  # a few negative polls first, so every moment is bracketed
    t_kill = time.monotonic()
    victim.kill()  # SIGKILL, then its containers removed (a power cut)
    complete = wait_threads(pollers, 90)
    row: dict[str, Any] = {
        "round": rnd + 1,
        "victim": victim.name,
        "leader": leader.name,
        "complete": complete,
        "survivors": {},
    }
    for p in pollers:
        marks = {k: round(v - t_kill, 3) for k, v in p.at.items()}
        if "gone" in marks and "dead" in marks:
            marks["gone_after_dead"] = round(marks["gone"] - marks["dead"], 3)
        row["survivors"][p.node.name] = marks
    # Back to three healthy nodes, one replica each, for the next round.
    victim.start()
    wait_for(lambda: settled(c), 120, f"{victim.name} back and all alive", victim)
    resp = c.any_alive().request("POST", "/v1/rebalance", json={})
    if resp.status_code != 200:
        raise RuntimeError(f"rebalance: {resp.status_code} {resp.text}")
    wait_for(lambda: bench.serving(per_node=1), 120, "3 replicas again, one per node")
    return row


def endpoints_bench(bench: Bench, ready_rounds: int, death_rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bench.apply(replicas=3)
    bench.wait_serving(per_node=1)
    if ready_rounds:
        log(f"== endpoints (a): ready on the owner -> listed on the other nodes, scale 3 -> 4, "
            f"{ready_rounds} rounds, polled every {POLL_S * 1000:.0f} ms")
        rows = []
        for rnd in range(ready_rounds):
            row = ready_round(bench, rnd)
            rows.append(row)
            log(
                f"  round {rnd + 1}: owner {row['owner']}  placed {row['placed_s']:.2f} s, "
                f"ready {row['ready_s']} s after apply; listed after ready: "
                f"{row['listed_after_ready_s']} (resolution {row['resolution_s']})"
                + ("  [ready not bracketed]" if row["ready_unbracketed"] else "")
            )
        delays = [d for r in rows for d in r["listed_after_ready_s"].values()]
        worst = max(delays) if delays else None
        verdict = "PASS" if worst is not None and worst <= TARGET_READY_S else "FAIL"
        log()
        table(
            ["round", "owner", "apply->ready s", "listed after ready (per node) s"],
            [
                [
                    r["round"],
                    r["owner"],
                    r["ready_s"],
                    "  ".join(f"{k} {v:.3f}" for k, v in r["listed_after_ready_s"].items()),
                ]
                for r in rows
            ],
        )
        log(
            f"  listed after ready: median {med(delays)} s, max {worst} s over {len(delays)} "
            f"samples (target <= {TARGET_READY_S:g} s: {verdict})"
        )
        out["ready"] = {
            "rounds": rows,
            "delay_median_s": med(delays),
            "delay_max_s": worst,
            "pass": verdict == "PASS",
        }
    if death_rounds:
        log(f"== endpoints (b): SIGKILL a follower -> declared dead / its endpoints gone on the "
            f"survivors, {death_rounds} rounds")
        rows = []
        for rnd in range(death_rounds):
            row = death_round(bench, rnd)
            rows.append(row)
            log(f"  round {rnd + 1}: killed {row['victim']} (leader {row['leader']}): "
                f"{row['survivors']}")
        log()
        trows = []
        for r in rows:
            for name, m in r["survivors"].items():
                trows.append(
                    [r["round"], r["victim"], name, m.get("suspect"), m.get("dead"),
                     m.get("gone"), m.get("gone_after_dead")]
                )
        table(
            ["round", "killed", "seen by", "suspect s", "dead s", "endpoints gone s",
             "gone - dead s"],
            trows,
        )
        diffs = [m["gone_after_dead"] for r in rows for m in r["survivors"].values()
                 if "gone_after_dead" in m]
        dead = [m["dead"] for r in rows for m in r["survivors"].values() if "dead" in m]
        gone = [m["gone"] for r in rows for m in r["survivors"].values() if "gone" in m]
        worst = max(diffs) if diffs else None
        incomplete = sum(1 for r in rows if not r["complete"])
        verdict = (
            "PASS" if worst is not None and worst <= TARGET_REMOVED_S and not incomplete
            else "FAIL"
        )
        log(
            f"  after SIGKILL (medians): dead {med(dead)} s, endpoints gone {med(gone)} s; "
            f"gone - dead: median {med(diffs)} s, max {worst} s (target <= "
            f"{TARGET_REMOVED_S:g} s: {verdict})"
            + (f"; {incomplete} round(s) timed out" if incomplete else "")
        )
        out["death"] = {
            "rounds": rows,
            "dead_median_s": med(dead),
            "gone_median_s": med(gone),
            "gone_after_dead_median_s": med(diffs),
            "gone_after_dead_max_s": worst,
            "pass": verdict == "PASS",
        }
    return out


# --------------------------------------------------------------------------- main


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


PARTS = ("throughput", "rollout", "endpoints", "ready", "death")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="5 s wrk runs, fewer rounds")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, tables on stderr")
    parser.add_argument("--preset", default="lan", choices=["local", "lan", "wan"])
    parser.add_argument("--conns", type=int, default=32, help="wrk connections")
    parser.add_argument("--duration", type=float, help="wrk seconds per run (default 10)")
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 2)")
    parser.add_argument(
        "--paths",
        default="/,/healthz",
        help="throughput paths, comma-separated: / is the CGI demo page, /healthz a static file",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="rollout load, req/s")
    parser.add_argument(
        "--mesh-rate", type=float, default=0.0, help="extra rollout load through the mesh"
    )
    parser.add_argument(
        "--workers", type=int, default=32, help="threads per load (>= rate x latency)"
    )
    parser.add_argument("--rollouts", type=int, help="rollout rounds (default 3)")
    parser.add_argument("--ready-rounds", type=int, help="scale 3->4 rounds (default 5)")
    parser.add_argument("--death-rounds", type=int, help="SIGKILL rounds (default 3)")
    args = parser.parse_args(argv)
    if args.json:
        _OUT["stream"] = sys.stderr
    only = set(PARTS) if not args.only else {p.strip() for p in args.only.split(",")}
    if unknown := only - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if "endpoints" in only:
        only |= {"ready", "death"}
    signal.signal(signal.SIGTERM, _sigterm)
    duration = args.duration or (5.0 if args.quick else 10.0)
    rounds = args.rounds or 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    rollouts = args.rollouts or (2 if args.quick else 3)
    ready_rounds = args.ready_rounds if args.ready_rounds is not None else (3 if args.quick else 5)
    death_rounds = args.death_rounds if args.death_rounds is not None else (2 if args.quick else 3)

    started = time.monotonic()
    summary: dict[str, Any] = {"host_cpus": os.cpu_count(), "preset": args.preset}
    with contextlib.suppress(OSError):
        summary["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    with bench_cluster(args.preset) as bench:
        log(f"   (cluster formed and {APP} serving after {time.monotonic() - started:.0f} s)")
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("throughput", lambda: throughput_bench(bench, args.conns, duration, rounds, paths)),
            (
                "rollout",
                lambda: rollout_bench(bench, args.rate, args.mesh_rate, args.workers, rollouts),
            ),
            (
                "endpoints",
                lambda: endpoints_bench(
                    bench,
                    ready_rounds if "ready" in only else 0,
                    death_rounds if "death" in only else 0,
                ),
            ),
        ]
        for name, step in steps:
            if name not in only and not (name == "endpoints" and only & {"ready", "death"}):
                continue
            t = time.monotonic()
            summary[name] = step()
            log(f"   ({name} took {time.monotonic() - t:.0f} s)\n")
    with contextlib.suppress(OSError):
        summary["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    summary["seconds"] = round(time.monotonic() - started)
    log(f"total {summary['seconds']} s")
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True), flush=True)
    else:
        log(json.dumps(summary, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
