"""Node daemon benchmarks: failover time, time to run N replicas (next to Docker Swarm on the
same engine), and what an idle daemon costs.

Run from the repository root::

    python3 -m benchmarks.node_bench --quick            # ~3 min: 2 failovers per case, 10
                                                        # replicas, 20 s idle
    python3 -m benchmarks.node_bench                    # the full set (~8 min here)
    python3 -m benchmarks.node_bench --only failover    # or scale, or idle

Three parts, each on real agents started by the integration harness
(tests/integration/cluster/harness.py, imported, not copied) and the real Docker engine:

1. **failover** -- SIGKILL a node and remove its containers (the harness's power cut), then
   poll ``GET /v1/replicas`` on a survivor every ~50 ms until every replica of the app is
   ``running`` and none is on the dead node. The app has one replica per node, so the victim
   always had one. A follower and the leader, 3 and 5 nodes, the ``lan`` preset (the product
   default) and ``local`` for reference. Along the way it notes when the survivor first
   showed the victim ``dead`` (gossip), a new leader (Raft), and the replica placed elsewhere
   (scheduler), which splits the total into detection, scheduling and container start.
2. **scale** -- a 1-node cluster: ``POST /v1/apply`` of N replicas -> all ``running``; and
   in the same run ``docker service create --replicas N --no-resolve-image IMAGE_ID`` -> N
   tasks ``running`` (what ``docker service ps`` shows, read through the SDK). Same image
   (p2porch/demo by ID), no published ports, no resource limits, 1 s stop grace for both.
3. **idle** -- a 3-node ``lan`` cluster running a 3-replica app, left alone: RSS (VmRSS),
   CPU (utime+stime deltas, % of one core), bytes written (/proc/PID/io write_bytes deltas)
   and the data dir's growth per daemon, extrapolated to one hour. Also the event loop's
   wake-ups per second (voluntary context switches of the main thread, where trio runs):
   an idle daemon's CPU is mostly the price of waking up, so this says why the CPU moved.

Loopback only: 127.0.0.160-168 (60-69 is taken by test_cluster.py). Every process,
container, Swarm service (and the swarm itself, if this script initialised it) is removed in
``finally`` blocks, also on Ctrl-C or SIGTERM. Nothing asserts: it prints figures,
PASS/FAIL against the targets, and a final JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from tests.integration.cluster.harness import Cluster, demo_app, wait_for

FAILOVER_FIRST_HOST = 160  # 127.0.0.160-164
IDLE_FIRST_HOST = 165  # 127.0.0.165-167
SCALE_HOST = 168  # 127.0.0.168
POLL_S = 0.05
FAILOVER_TIMEOUT_S = 90.0
TARGET_FOLLOWER_S = 5.0
TARGET_LEADER_S = 7.0
TARGET_RSS_MB = 80.0
TARGET_CPU_PCT = 1.0
SWARM_SERVICE_PREFIX = "p2porch-nodebench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- cluster


@contextlib.contextmanager
def bench_cluster(prefix: str, first_host: int, preset: str) -> Iterator[Cluster]:
    """A cluster in a fresh temp dir, torn down (processes, containers, dir) whatever happens."""
    base = Path(tempfile.mkdtemp(prefix=f"p2porch-nodebench-{prefix}-"))
    # The product's own graces (agent_args=()), only the timing preset chosen.
    c = Cluster(base, prefix, first_host, preset=preset, agent_args=())
    try:
        yield c
    except BaseException:
        for node in c.nodes:
            sys.stderr.write(f"\n--- {node.name} ({node.host}) log ---\n{node.log(40)}\n")
        raise
    finally:
        c.teardown()


def form(c: Cluster, size: int) -> None:
    c.form(size)
    first = c.nodes[0]
    wait_for(lambda: settled(c, size), 90, f"{size} voters, all alive", first)


def settled(c: Cluster, size: int) -> bool:
    """Every node up, alive everywhere it is asked, ``size`` voters, a leader, quorum."""
    for node in c.nodes:
        if node.proc is None:
            return False
        status = node.get("/v1/status", timeout=3)
        if not status.get("leader") or not status.get("quorum"):
            return False
        if len(status.get("voters", ())) != size:
            return False
        if sorted(n["status"] for n in node.get("/v1/nodes", timeout=3)) != ["alive"] * size:
            return False
    return True


def light_app(name: str, replicas: int) -> dict[str, Any]:
    """The demo app without published ports (no docker-proxy), 1 s stop grace."""
    doc = demo_app(name, replicas=replicas)
    doc["spec"].pop("ports", None)
    return doc


def docker_client() -> Any:
    import docker

    return docker.from_env(timeout=120)


def wait_containers_gone(label: str, timeout_s: float = 90) -> None:
    """Wait until no container (running or not) carries ``label`` (k=v)."""
    client = docker_client()
    try:
        wait_for(
            lambda: not client.containers.list(all=True, filters={"label": label}),
            timeout_s,
            f"containers with {label} to go",
        )
    finally:
        client.close()


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p90 of 5 runs is the largest but one... rounded up: the max)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# --------------------------------------------------------------------------- failover


def all_running_off(rows: list[dict[str, Any]], n: int, victim: str) -> bool:
    return (
        len(rows) == n
        and all(r["state"] == "running" for r in rows)
        and all(r["node"] != victim for r in rows)
    )


def spread_one_each(c: Cluster, app: str, size: int) -> bool:
    rows = c.replicas(app=app)
    nodes = {r["node"] for r in rows}
    return all_running_off(rows, size, victim="") and len(nodes) == size


def one_failover(c: Cluster, size: int, role: str, app: str) -> dict[str, float | None]:
    """Kill a node of ``role``; times (s after SIGKILL) of each phase, seen on a survivor."""
    c.apply(c.nodes[0], light_app(app, size))
    wait_for(lambda: spread_one_each(c, app, size), 120, f"{app}: one replica per node")
    leader = c.leader()
    followers = [n for n in c.nodes if n is not leader]
    victim = leader if role == "leader" else followers[0]
    survivor = followers[1] if role == "follower" else followers[0]
    marks: dict[str, float | None] = {"dead": None, "leader": None, "placed": None}
    with httpx.Client(base_url=survivor.api, timeout=2, verify=survivor.ssl_context()) as http:
        t0 = time.monotonic()
        victim.kill()  # SIGKILL + remove its containers
        marks["kill_returned"] = time.monotonic() - t0
        deadline = t0 + FAILOVER_TIMEOUT_S
        done: float | None = None
        while time.monotonic() < deadline:
            now = time.monotonic() - t0
            try:
                rows = http.get(f"/v1/replicas?app={app}").json()
                if (
                    marks["placed"] is None
                    and rows
                    and all(r["node"] not in (None, victim.name) for r in rows)
                ):
                    marks["placed"] = now
                if all_running_off(rows, size, victim.name):
                    done = now
                if marks["dead"] is None:
                    nodes = http.get("/v1/nodes").json()
                    if any(n["name"] == victim.name and n["status"] == "dead" for n in nodes):
                        marks["dead"] = now
                if role == "leader" and marks["leader"] is None:
                    status = http.get("/v1/status").json()
                    if status.get("leader") not in (None, victim.name):
                        marks["leader"] = now
            except (httpx.HTTPError, ValueError):
                pass  # the survivor may be busy electing; keep polling
            if done is not None and marks["dead"] is not None:
                break
            time.sleep(POLL_S)
        marks["total"] = done
    # Back to `size` healthy nodes for the next run: the app goes, the victim restarts (same
    # name and data dir: it rejoins), and the engine is quiet again before the next kill.
    resp = survivor.request("DELETE", f"/v1/apps/default/{app}")
    if resp.status_code not in (200, 202, 204, 404):
        raise RuntimeError(f"delete {app}: {resp.status_code} {resp.text}")
    victim.start()
    wait_for(lambda: settled(c, size), 120, "the victim back and all alive", victim)
    wait_containers_gone(f"io.p2porch.app={app}")
    return marks


def failover_bench(presets: list[str], sizes: list[int], runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    log("== failover: SIGKILL (+ its containers removed) -> all replicas running elsewhere")
    for preset in presets:
        for size in sizes:
            key = f"{preset}/{size}"
            per_role: dict[str, list[dict[str, float | None]]] = {"follower": [], "leader": []}
            with bench_cluster(f"nbf{preset[:2]}{size}x", FAILOVER_FIRST_HOST, preset) as c:
                form(c, size)
                k = 0
                for run in range(runs):
                    for role in ("follower", "leader"):
                        k += 1
                        marks = one_failover(c, size, role, f"fo{k}")
                        per_role[role].append(marks)
                        log(f"  {key} {role:8s} run {run + 1}: " + fmt_marks(marks))
            results[key] = {role: summarise(role, marks) for role, marks in per_role.items()}
            for role in ("follower", "leader"):
                log(f"  {key} {role:8s} " + fmt_summary(results[key][role]))
    return results


def fmt_marks(marks: dict[str, float | None]) -> str:
    def f(v: float | None) -> str:
        return "  -  " if v is None else f"{v:5.2f}"

    return (
        f"total {f(marks['total'])} s  (dead seen {f(marks['dead'])}, new leader "
        f"{f(marks['leader'])}, placed elsewhere {f(marks['placed'])}, kill+rm "
        f"{f(marks['kill_returned'])})"
    )


def summarise(role: str, marks: list[dict[str, float | None]]) -> dict[str, Any]:
    totals = [m["total"] for m in marks if m["total"] is not None]
    out: dict[str, Any] = {"runs": len(marks), "timeouts": len(marks) - len(totals)}
    target = TARGET_LEADER_S if role == "leader" else TARGET_FOLLOWER_S
    out["target_median_s"] = target
    if totals:
        out["median_s"] = round(statistics.median(totals), 2)
        out["p90_s"] = round(percentile(totals, 90), 2)
        out["pass"] = out["timeouts"] == 0 and out["median_s"] <= target
    else:
        out["pass"] = False
    for phase in ("dead", "leader", "placed"):
        values = [v for m in marks if (v := m[phase]) is not None]
        if values:
            out[f"{phase}_median_s"] = round(statistics.median(values), 2)
    # What the engine took: placed elsewhere -> running.
    starts = [
        t - p for m in marks if (t := m["total"]) is not None and (p := m["placed"]) is not None
    ]
    if starts:
        out["start_median_s"] = round(statistics.median(starts), 2)
    return out


def fmt_summary(s: dict[str, Any]) -> str:
    if "median_s" not in s:
        return f"no run finished in {FAILOVER_TIMEOUT_S:.0f} s -- FAIL"
    verdict = "PASS" if s["pass"] else "FAIL"
    parts = [
        f"median {s['median_s']:.2f} s  p90 {s['p90_s']:.2f} s  over {s['runs']} runs"
        f"  (target median <= {s['target_median_s']:.0f} s: {verdict})"
    ]
    phases = [
        f"{label} {s[key]:.2f}"
        for key, label in (
            ("dead_median_s", "dead seen"),
            ("leader_median_s", "new leader"),
            ("placed_median_s", "placed"),
            ("start_median_s", "placed->running"),
        )
        if key in s
    ]
    if phases:
        parts.append("medians: " + ", ".join(phases) + " s")
    if s["timeouts"]:
        parts.append(f"{s['timeouts']} run(s) timed out")
    return "  ".join(parts)


# --------------------------------------------------------------------------- scale


class Swarm:
    """Docker Swarm on the same engine; leaves the swarm at the end only if it made it."""

    def __init__(self) -> None:
        self.client = docker_client()
        self.initialised = False
        self.services: list[Any] = []

    def __enter__(self) -> Swarm:
        state = self.client.info()["Swarm"]["LocalNodeState"]
        if state == "inactive":
            subprocess.run(
                [
                    "docker",
                    "swarm",
                    "init",
                    "--advertise-addr",
                    "127.0.0.1",
                    "--listen-addr",
                    "127.0.0.1:2377",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
            self.initialised = True
        elif state != "active":
            raise RuntimeError(f"the engine's swarm is {state!r}; not touching it")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for service in self.services:
                with contextlib.suppress(Exception):
                    service.remove()
                with contextlib.suppress(Exception):
                    wait_containers_gone(f"com.docker.swarm.service.id={service.id}")
            if self.initialised:
                subprocess.run(
                    ["docker", "swarm", "leave", "--force"],
                    check=False,
                    capture_output=True,
                    timeout=120,
                )
        finally:
            self.client.close()

    def run(self, image_id: str, replicas: int, name: str) -> float:
        """``docker service create`` -> ``replicas`` tasks running; seconds."""
        cmd = [
            "docker",
            "service",
            "create",
            "--detach",
            "--quiet",
            "--name",
            name,
            "--replicas",
            str(replicas),
            "--no-resolve-image",
            "--stop-grace-period",
            "1s",
            image_id,
        ]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"docker service create: {proc.stderr.strip()}")
        service = self.client.services.get(proc.stdout.strip())
        self.services.append(service)
        deadline = t0 + 300
        while time.monotonic() < deadline:
            tasks = service.tasks(filters={"desired-state": "running"})
            running = sum(1 for t in tasks if t["Status"]["State"] == "running")
            if running >= replicas:
                elapsed = time.monotonic() - t0
                break
            time.sleep(POLL_S)
        else:
            raise RuntimeError(f"swarm: {replicas} tasks not running after 300 s")
        service.remove()
        self.services.remove(service)
        wait_containers_gone(f"com.docker.swarm.service.id={service.id}", 180)
        return elapsed


def p2porch_run(c: Cluster, replicas: int, app: str) -> tuple[float, float]:
    """``POST /v1/apply`` -> ``replicas`` replicas running (GET /v1/replicas).

    Seconds to all running, and seconds until all were placed (rows listed: the control
    plane's share -- the API lists unplaced slots with ``node: null`` --; the rest is the
    reconciler and the engine).
    """
    node = c.nodes[0]
    placed: float | None = None
    with httpx.Client(base_url=node.api, timeout=30, verify=node.ssl_context()) as http:
        t0 = time.monotonic()
        resp = http.post("/v1/apply", json={"documents": [light_app(app, replicas)]})
        if resp.status_code != 200:
            raise RuntimeError(f"apply: {resp.status_code} {resp.text}")
        deadline = t0 + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                rows = http.get(f"/v1/replicas?app={app}").json()
                if placed is None and len(rows) == replicas and all(r["node"] for r in rows):
                    placed = time.monotonic() - t0
                if len(rows) == replicas and all(r["state"] == "running" for r in rows):
                    elapsed = time.monotonic() - t0
                    break
            time.sleep(POLL_S)
        else:
            raise RuntimeError(f"p2porch: {replicas} replicas not running after 300 s")
        http.delete(f"/v1/apps/default/{app}")
    wait_containers_gone(f"io.p2porch.app={app}", 180)
    return elapsed, placed if placed is not None else elapsed


def demo_image_id() -> str:
    from p2porch.node.images import DEMO_IMAGE, build_builtin_images

    client = docker_client()
    try:
        build_builtin_images(client)
        return str(client.images.get(DEMO_IMAGE).id)
    finally:
        client.close()


def scale_bench(counts: list[int], rounds: int) -> dict[str, Any]:
    log("== scale: apply -> N replicas running, 1 node; Docker Swarm on the same engine")
    image_id = demo_image_id()
    results: dict[str, Any] = {}
    with bench_cluster("nbsc", SCALE_HOST, "lan") as c, Swarm() as swarm:
        form(c, 1)
        samples: dict[int, dict[str, list[float]]] = {
            n: {"p2porch": [], "swarm": [], "placed": []} for n in counts
        }
        for rnd in range(rounds):
            for n in counts:
                # Alternate who goes first so a drifting background load hits both alike.
                order = ["p2porch", "swarm"] if rnd % 2 == 0 else ["swarm", "p2porch"]
                for system in order:
                    extra = ""
                    if system == "p2porch":
                        t, placed = p2porch_run(c, n, f"sc{n}r{rnd}")
                        samples[n]["placed"].append(placed)
                        extra = f"  (all placed after {placed:.2f} s)"
                    else:
                        t = swarm.run(image_id, n, f"{SWARM_SERVICE_PREFIX}-{n}-{rnd}")
                    samples[n][system].append(t)
                    log(f"  {n:3d} replicas  round {rnd + 1}  {system:8s} {t:6.2f} s{extra}")
        for n in counts:
            ours = statistics.median(samples[n]["p2porch"])
            theirs = statistics.median(samples[n]["swarm"])
            ratio = ours / theirs
            results[str(n)] = {
                "p2porch_s": round(ours, 2),
                "swarm_s": round(theirs, 2),
                "ratio": round(ratio, 2),
                "rounds": rounds,
                "pass": ratio <= 1.0,
                "p2porch_samples_s": [round(x, 2) for x in samples[n]["p2porch"]],
                "p2porch_placed_median_s": round(statistics.median(samples[n]["placed"]), 2),
                "swarm_samples_s": [round(x, 2) for x in samples[n]["swarm"]],
            }
            verdict = "PASS" if ratio <= 1.0 else "FAIL"
            log(
                f"  {n:3d} replicas: p2porch {ours:6.2f} s  swarm {theirs:6.2f} s  "
                f"ratio {ratio:4.2f}  (median of {rounds}; target <= 1.0: {verdict})"
            )
    return results


# --------------------------------------------------------------------------- idle


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (bytes), CPU ticks (utime+stime), write_bytes, main-thread sleeps of one process."""
    rss = wakeups = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("voluntary_ctxt_switches:"):
            wakeups = int(line.split()[1])  # the thread group leader's: trio's thread
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    write_bytes = 0
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            write_bytes = int(line.split()[1])
    return {"rss": rss, "ticks": ticks, "write_bytes": write_bytes, "wakeups": wakeups}


def dir_sizes(path: Path) -> tuple[int, int]:
    """(bytes of the data dir without agent.log, bytes of agent.log)."""
    data = logs = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                size = (Path(root) / name).stat().st_size
                if name == "agent.log":
                    logs += size
                else:
                    data += size
    return data, logs


def idle_bench(idle_s: float, settle_s: float) -> dict[str, Any]:
    log(f"== idle: 3 nodes, lan preset, a 3-replica app, {idle_s:.0f} s untouched")
    results: dict[str, Any] = {}
    with bench_cluster("nbid", IDLE_FIRST_HOST, "lan") as c:
        form(c, 3)
        c.apply(c.nodes[0], light_app("idle", 3))
        wait_for(lambda: spread_one_each(c, "idle", 3), 120, "3 idle replicas running")
        time.sleep(settle_s)
        pids = {n.name: n.proc.pid for n in c.nodes if n.proc is not None}
        leader = c.leader().name
        before = {name: proc_sample(pid) for name, pid in pids.items()}
        dirs_before = {n.name: dir_sizes(n.data_dir) for n in c.nodes}
        peak_rss = {name: s["rss"] for name, s in before.items()}
        t0 = time.monotonic()
        while (left := idle_s - (time.monotonic() - t0)) > 0:
            time.sleep(min(5.0, left))
            for name, pid in pids.items():
                peak_rss[name] = max(peak_rss[name], proc_sample(pid)["rss"])
        wall = time.monotonic() - t0
        after = {name: proc_sample(pid) for name, pid in pids.items()}
        dirs_after = {n.name: dir_sizes(n.data_dir) for n in c.nodes}
        per_hour = 3600.0 / wall
        for name in pids:
            cpu_pct = 100.0 * (after[name]["ticks"] - before[name]["ticks"]) / CLK_TCK / wall
            written = after[name]["write_bytes"] - before[name]["write_bytes"]
            wakeups = (after[name]["wakeups"] - before[name]["wakeups"]) / wall
            data_growth = dirs_after[name][0] - dirs_before[name][0]
            log_growth = dirs_after[name][1] - dirs_before[name][1]
            row: dict[str, Any] = {
                "rss_mb": round(after[name]["rss"] / 1e6, 1),
                "peak_rss_mb": round(peak_rss[name] / 1e6, 1),
                "cpu_pct_core": round(cpu_pct, 2),
                "wakeups_per_s": round(wakeups, 1),
                "write_bytes_per_h": round(written * per_hour),
                "data_dir_growth_bytes_per_h": round(data_growth * per_hour),
                "log_growth_bytes_per_h": round(log_growth * per_hour),
                "seconds": round(wall, 1),
                "role": "leader" if name == leader else "follower",
                # Sanity check that the counter works here: start-up (WAL, keys) did write.
                "write_bytes_since_start": after[name]["write_bytes"],
            }
            row["pass_rss"] = row["peak_rss_mb"] <= TARGET_RSS_MB
            row["pass_cpu"] = row["cpu_pct_core"] <= TARGET_CPU_PCT
            results[name] = row
            log(
                f"  {name} ({row['role']:8s}): RSS {row['rss_mb']:.1f} MB "
                f"(peak {row['peak_rss_mb']:.1f}; "
                f"<= {TARGET_RSS_MB:.0f}: {'PASS' if row['pass_rss'] else 'FAIL'})  CPU "
                f"{row['cpu_pct_core']:.2f}% of a core (<= {TARGET_CPU_PCT:.0f}%: "
                f"{'PASS' if row['pass_cpu'] else 'FAIL'}; {wakeups:.1f} wake-ups/s)  writes "
                f"{human(written * per_hour)}/h (data dir {human(data_growth * per_hour)}/h, "
                f"log {human(log_growth * per_hour)}/h)"
            )
    return results


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# --------------------------------------------------------------------------- main


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    # Turn SIGTERM into KeyboardInterrupt so every finally block (teardown) runs.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (~3 min)")
    parser.add_argument("--only", choices=["failover", "scale", "idle"])
    parser.add_argument("--runs", type=int, help="failovers per role and case (default 5)")
    parser.add_argument(
        "--presets", default=None, help="failover presets, comma-separated (default lan,local)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)

    if args.quick:
        runs, presets, counts, rounds, idle_s, settle_s = 2, ["lan"], [10], 1, 20.0, 5.0
    else:
        runs, presets, counts, rounds = 5, ["lan", "local"], [10, 50], 3
        idle_s, settle_s = 60.0, 10.0
    if args.runs is not None:
        runs = args.runs
    if args.presets:
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    started = time.monotonic()
    summary: dict[str, Any] = {"quick": args.quick, "host_cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        summary["loadavg_start"] = Path("/proc/loadavg").read_text().split()[:3]
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("failover", lambda: failover_bench(presets, [3, 5], runs)),
        ("scale", lambda: scale_bench(counts, rounds)),
        ("idle", lambda: idle_bench(idle_s, settle_s)),
    ]
    for name, part in parts:
        if args.only and args.only != name:
            continue
        t = time.monotonic()
        summary[name] = part()
        log(f"   ({name} took {time.monotonic() - t:.0f} s)")
    summary["seconds"] = round(time.monotonic() - started)
    log(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
