"""Event-driven simulation of many SWIM cores on one simulated network (tier 2).

``python -m p2porch.gossip.sim --nodes N --seconds S [--loss P] [--slow K] [--crash C]
[--seed X] [--no-lifeguard [--baseline-min]] [--preset lan|local|wan|memberlist]
[--partition-at T --partition-for D] [--max-stall S] [--slow-lag S] [--timing] [--profile]``

Above 200 nodes the cores start from one shared member table (``SwimCore.bootstrap``);
below, node i starts at 0.02 * i s and joins through nodes 0 and 1 (real push-pull joins).

Cores are driven directly (no trio): a heap of ``(time, seq, action)`` holds packet
deliveries, TCP probes, push-pull exchanges, scenario steps and each core's next timer
(``next_deadline()``), so simulated time jumps from event to event and the same seed gives the
same run (``trace_digest`` in the output summarises every membership event; compare it).

Faults: independent packet loss on UDP; a latency distribution per preset; a partition of
the cluster into two halves (UDP, TCP and push-pull all cut) and its healing; CPU-starved
"slow" nodes (below); crashes (the process vanishes; spread over the run, never a slow node)
and restarts (a fresh core, incarnation 0, joining through two live seeds, after max(10 s,
2 * suspicion max + 5 s)). TCP probes and push-pulls are lossless (TCP retries) but cut by
partitions; a push-pull exchanges both tables at one instant.

A slow node is a process on a CPU-starved host. It runs only when the scheduler gives it the
CPU, and while it waits *nothing* of it runs: neither its timers nor its socket reads. Two
kinds of wait, both ending the same way -- the overdue timers run first, then the input that
queued up, in arrival order (UDP to a slow node is read in FIFO order):

* **stalls**: now and then (every max-stall + exp(5 s) s) the node stops for U(0.5,
  ``--max-stall``) s;
* **run-queue delay** (``--slow-lag`` MEAN, 0 = off): between stalls, every wake-up -- an
  arriving packet or a due timer that finds the node idle -- waits min(max-stall, exp(MEAN))
  s for the CPU; whatever else falls due meanwhile is handled in that same turn.

The second is what makes a slow node an *accuser* (the case Lifeguard is about): it pings a
healthy peer, the ack is back a millisecond later, but the node only sees it after its own
probe timers have fired, so it suspects the peer; and it sees the peer's refutation late too,
so with a short fixed suspicion timeout its own timer can declare the healthy peer DEAD.
Stalls alone rarely do that: an ack is in flight for ~1 ms of each probe interval.

Invariants, checked as events happen (``violations`` counts breaches; exit status 1 if any):

1. per observer and member, incarnations never go down (unless the observer reaped the
   tombstone in between);
2. no running node believes itself DEAD (or SUSPECT-free LEFT before it left);
3. with no loss, no slow node and no partition, no running member is ever declared dead;
4. after a partition heals, every live node's view agrees with the real live set within
   ``converge_bound_s``; and at the end of a run (after a quiet period) likewise.

Figures (the JSON object printed last):

* ``detect_first_s`` / ``detect_all_s``: medians over crashes of crash -> the first node
  declares the crashed member DEAD / -> every node that was live at the crash (and still is)
  has it DEAD.
* ``converge_9999_s``: one metadata update (``set_meta`` on a random node) -> 99.99 % of live
  nodes (rounded up, origin included) hold that version.
* ``false_positives``: *episodes*: distinct (member, incarnation) pairs declared DEAD while
  that member's process was running -- one wrong death counts once however many observers
  believed it. ``false_positive_observations`` counts (observer, member, incarnation) events;
  ``false_positives_slow`` is the part about deliberately slowed (stalling) members and
  ``false_positives_partition`` those during a partition (or within 30 s of its healing:
  both halves rightly give up on the other), ``false_positives_healthy`` the rest -- members
  running normally on a connected network: the figure that should be zero.
  ``false_positives_healthy_spread`` is the part of those that some non-slow observer
  believed too (the rest only a slow accuser's own timer declared: a false positive at that
  observer, which is what Lifeguard's paper counts too); ``false_positive_observations_by_slow``
  counts the observations made by slow observers.
* ``slow_suspects_raised`` / ``slow_max_health``: suspicions the slow nodes raised (probes of
  theirs that failed), and the highest Lifeguard local health any of them reached.
* ``bytes_per_node_s``: codec bytes sent (UDP incl. dropped packets, TCP probes and their
  answers, both push-pull states) per node per simulated second.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs

from p2porch.gossip.config import GossipConfig
from p2porch.gossip.core import SwimCore
from p2porch.gossip.messages import Event, EventKind, Member, MemberState
from p2porch.gossip.table import MemberSnapshot

_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)

# Heap actions.
_TICK = 0
_UDP = 1
_TCP_PING = 2
_TCP_ACK = 3
_PUSH_PULL = 4
_SCENARIO = 5

PRESETS: dict[str, Callable[..., GossipConfig]] = {
    "local": GossipConfig.local,
    "lan": GossipConfig.lan,
    "wan": GossipConfig.wan,
    "memberlist": GossipConfig,
}

# One-way latency: base + exponential(mean) seconds, and a rare slow tail.
LATENCY: dict[str, tuple[float, float, float, float]] = {
    # preset: (base_s, mean_extra_s, tail_probability, tail_max_s)
    "local": (0.00005, 0.00005, 0.0, 0.0),
    "lan": (0.0002, 0.0003, 0.01, 0.02),
    "memberlist": (0.0002, 0.0003, 0.01, 0.02),
    "wan": (0.02, 0.03, 0.02, 0.3),
}


@attrs.frozen
class SimParams:
    nodes: int
    seconds: float
    loss: float = 0.0
    slow: int = 0
    crash: int = 0
    seed: int = 1
    lifeguard: bool = True
    preset: str = "lan"
    partition_at_s: float | None = None
    partition_for_s: float = 0.0
    max_stall_s: float = 3.0
    slow_lag_s: float = 0.25  # mean run-queue delay of a slow node's wake-ups (0: stalls only)
    restart_after_s: float | None = None  # None: 2x the suspicion max at N, at least 10 s
    warmup_s: float | None = None  # None: bootstrap -> 2 s, joining -> time to join + 3 s
    bootstrap: bool | None = None  # None: True above 200 nodes
    config_overrides: tuple[tuple[str, Any], ...] = ()


class _Crash:
    __slots__ = ("at", "done_at", "first", "inc", "name", "pending")

    def __init__(self, name: str, at: float, inc: int, pending: set[int]) -> None:
        self.name = name
        self.at = at
        self.inc = inc
        self.pending = pending
        self.first: float | None = None
        self.done_at: float | None = None


class Simulation:
    """N SWIM cores, one simulated network, one event heap. See the module docstring."""

    def __init__(self, params: SimParams) -> None:
        self.p = params
        overrides = dict(params.config_overrides)
        overrides["lifeguard"] = params.lifeguard
        self.config = PRESETS[params.preset](**overrides)
        n = params.nodes
        self.names = [f"n{i:05d}" for i in range(n)]
        self.addrs = [f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}:7946" for i in range(n)]
        self.idx_by_addr = {a: i for i, a in enumerate(self.addrs)}
        self.idx_by_name = {nm: i for i, nm in enumerate(self.names)}
        self.cores: list[SwimCore | None] = [None] * n
        self.generation = [0] * n
        self.scheduled = [math.inf] * n
        self.busy_until = [0.0] * n  # a slow node runs nothing before this (stall / CPU wait)
        self.awake_until = [0.0] * n  # ... and, after a wait, handles its backlog until this
        self.last_read = [0.0] * n
        self.slow: set[int] = set()
        self.side = [0] * n
        self.partitioned = False
        self.now = 0.0
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.net_rng = random.Random(params.seed * 7919 + 1)
        self.scn_rng = random.Random(params.seed * 7919 + 2)
        self.cpu_rng = random.Random(params.seed * 7919 + 3)  # run-queue delays only
        self.events_processed = 0
        self.bytes_sent = 0
        self.trace = hashlib.blake2b(digest_size=16)
        # invariants
        self.violations = 0
        self.violation_samples: list[str] = []
        self.last_inc: dict[tuple[int, str], int] = {}
        self.crashed_inc: dict[str, int] = {}  # highest incarnation a dead process used
        # metrics
        self.crashes: list[_Crash] = []
        self.open_crash: dict[str, _Crash] = {}
        self.fp_episodes: set[tuple[str, int]] = set()
        self.fp_slow_episodes: set[tuple[str, int]] = set()
        self.fp_partition_episodes: set[tuple[str, int]] = set()
        # healthy-member episodes that some *non-slow* observer believed too
        self.fp_healthy_spread: set[tuple[str, int]] = set()
        self.fp_observations_by_slow = 0
        self.slow_max_health = 0
        self.fp_observations = 0
        self.meta_origin: str | None = None
        self.meta_node = 0
        self.meta_version = 0
        self.meta_started = 0.0
        self.meta_have: set[int] = set()
        self.meta_need = 0
        self.converge_9999_s: float | None = None
        self.heal_at: float | None = None
        self.heal_converged_s: float | None = None
        lat = LATENCY[params.preset]
        self.lat_base, self.lat_mean, self.lat_tail_p, self.lat_tail_max = lat
        self.push_pulls = 0
        self.faulty = params.loss > 0 or params.slow > 0 or params.partition_at_s is not None

    # ------------------------------------------------------------------ plumbing

    def push(self, at: float, action: int, arg: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, action, arg))

    def violate(self, what: str) -> None:
        self.violations += 1
        if len(self.violation_samples) < 20:
            self.violation_samples.append(f"t={self.now:.3f} {what}")

    def latency(self) -> float:
        rng = self.net_rng
        lat = self.lat_base + rng.expovariate(1.0 / self.lat_mean)
        if self.lat_tail_p and rng.random() < self.lat_tail_p:
            lat += rng.random() * self.lat_tail_max
        return lat

    def up(self, i: int) -> bool:
        return self.cores[i] is not None

    def cut(self, a: int, b: int) -> bool:
        return self.partitioned and self.side[a] != self.side[b]

    def new_core(self, i: int, now: float) -> SwimCore:
        rng = random.Random((self.p.seed * 1_000_003 + i) * 31 + self.generation[i])
        core = SwimCore(self.config, self.names[i], self.addrs[i], rng, now)
        self.cores[i] = core
        return core

    def after_step(self, i: int) -> None:
        """Route what core ``i`` produced, check invariants, re-arm its timer."""
        core = self.cores[i]
        if core is None:
            return
        now = self.now
        if core.has_ready():
            ready = core.ready()
            src = self.addrs[i]
            for pkt in ready.packets:
                self.bytes_sent += len(pkt.data)
                j = self.idx_by_addr.get(pkt.dst)
                if j is None or self.cut(i, j):
                    continue
                if self.p.loss and self.net_rng.random() < self.p.loss:
                    continue
                at = now + self.latency()
                if j in self.slow:
                    # A starved process drains its socket in order: no overtaking.
                    at = max(at, self.last_read[j])
                    self.last_read[j] = at
                self.push(at, _UDP, (j, src, pkt.data))
            for pkt in ready.tcp_pings:
                self.bytes_sent += len(pkt.data)
                j = self.idx_by_addr.get(pkt.dst)
                if j is not None and not self.cut(i, j):
                    self.push(now + self.latency(), _TCP_PING, (j, i, self.generation[i], pkt.data))
            for addr in ready.push_pulls:
                j = self.idx_by_addr.get(addr)
                if j is not None:
                    self.push(now + self.latency(), _PUSH_PULL, (i, self.generation[i], j))
            for ev in ready.events:
                self.on_event(i, ev)
        if i in self.slow and core.local_health() > self.slow_max_health:
            self.slow_max_health = core.local_health()
        me = core.member(core.name)
        if me is None or me.state not in (MemberState.ALIVE, MemberState.LEFT):
            self.violate(f"{core.name} believes itself {me and me.state.name}")
        deadline = max(core.next_deadline(), now)  # an overdue timer runs now
        if deadline < self.scheduled[i]:
            self.scheduled[i] = deadline
            self.push(deadline, _TICK, (i, self.generation[i]))

    def deferred(self, i: int, action: int, arg: Any) -> bool:
        """A slow node handles nothing while it stalls or waits for the CPU: re-queue.

        Input waits a microsecond past the wait's end, after the timers: a starved process
        that wakes up finds its timeouts expired before it drains its socket, which is how a
        slow member comes to accuse healthy ones (the case Lifeguard is about).
        """
        if i in self.slow and (self.now < self.busy_until[i] or self.cpu_wait(i)):
            self.push(self.busy_until[i] + 1e-6, action, arg)
            return True
        return False

    def cpu_wait(self, i: int) -> bool:
        """Slow node ``i``, idle, is woken now: start its run-queue wait (True) or run (False).

        A wake-up within a few microseconds of the end of the last wait belongs to that same
        turn on the CPU (the overdue timers at the wait's end, then the queued input).
        """
        lag = self.p.slow_lag_s
        if lag <= 0 or self.now <= self.awake_until[i]:
            return False
        wait = min(self.p.max_stall_s, self.cpu_rng.expovariate(1.0 / lag))
        self.busy_until[i] = self.now + wait
        self.awake_until[i] = self.now + wait + 1e-5
        return True

    # ------------------------------------------------------------------ events

    def on_event(self, i: int, ev: Event) -> None:
        m = ev.member
        now = self.now
        self.trace.update(
            f"{now:.6f} {i} {ev.kind.value} {m.name} {m.incarnation} {m.meta_version}\n".encode()
        )
        key = (i, m.name)
        if ev.kind is EventKind.REAPED:
            self.last_inc.pop(key, None)
            return
        last = self.last_inc.get(key, 0)
        if m.incarnation < last:
            self.violate(f"{self.names[i]} saw {m.name} go from inc {last} to {m.incarnation}")
        self.last_inc[key] = m.incarnation
        j = self.idx_by_name[m.name]
        if ev.kind is EventKind.DEAD:
            crash = self.open_crash.get(m.name)
            if crash is not None:
                if crash.first is None:
                    crash.first = now - crash.at
                crash.pending.discard(i)
                if not crash.pending and crash.done_at is None:
                    crash.done_at = now - crash.at
            if self.up(j) and m.incarnation > self.crashed_inc.get(m.name, -1):
                self.fp_observations += 1
                if i in self.slow:
                    self.fp_observations_by_slow += 1
                episode = (m.name, m.incarnation)
                if j in self.slow:
                    self.fp_slow_episodes.add(episode)
                elif self.partitioned or (self.heal_at is not None and now - self.heal_at < 30):
                    self.fp_partition_episodes.add(episode)
                elif i not in self.slow:
                    self.fp_healthy_spread.add(episode)
                if episode not in self.fp_episodes:
                    self.fp_episodes.add(episode)
                    if not self.faulty:
                        self.violate(f"{self.names[i]} declared healthy {m.name} dead")
        if (
            m.name == self.meta_origin
            and m.meta_version >= self.meta_version
            and ev.kind in (EventKind.UPDATED, EventKind.JOINED, EventKind.ALIVE)
        ):
            self.meta_seen(i)

    def meta_seen(self, i: int) -> None:
        if self.converge_9999_s is not None:
            return
        self.meta_have.add(i)
        if len(self.meta_have) >= self.meta_need:
            self.converge_9999_s = self.now - self.meta_started

    # ------------------------------------------------------------------ scenario

    def setup(self) -> None:
        p = self.p
        n = p.nodes
        rng = self.scn_rng
        bootstrap = p.bootstrap if p.bootstrap is not None else n > 200
        candidates = list(range(1, n))
        rng.shuffle(candidates)
        self.slow = set(candidates[: p.slow])
        if bootstrap:
            snap = MemberSnapshot(
                Member(nm, a, 0, MemberState.ALIVE)
                for nm, a in zip(self.names, self.addrs, strict=True)
            )
            for i in range(n):
                core = self.new_core(i, 0.0)
                core.bootstrap(0.0, snap)
                self.after_step(i)
            warmup = p.warmup_s if p.warmup_s is not None else 2.0
        else:
            join_gap = 0.02
            for i in range(n):
                self.push(i * join_gap, _SCENARIO, ("start", i))
            warmup = p.warmup_s if p.warmup_s is not None else n * join_gap + 5.0
        for i in sorted(self.slow):
            self.push(warmup * rng.random(), _SCENARIO, ("stall", i))
        n_est = n
        smax = self.config.suspicion_max_s(n_est)
        restart_after = (
            p.restart_after_s if p.restart_after_s is not None else max(10.0, 2 * smax + 5)
        )
        self.restart_after = restart_after
        # Crashes, spread over the run, each early enough to be detected before the end.
        detect_budget = smax + 4 * self.config.probe_interval_s * 2 + 2
        span_end = p.seconds - detect_budget
        if p.crash:
            if span_end <= warmup:
                span_end = warmup + 0.001
            for c in range(p.crash):
                at = warmup + (span_end - warmup) * (c + 0.5) / p.crash
                self.push(at, _SCENARIO, ("crash", None))
        # One metadata update (first third of the run, after the warm-up).
        meta_at = warmup + max(0.0, (p.seconds - warmup) / 3) * rng.random()
        self.meta_node = candidates[-1] if candidates else 0
        self.push(meta_at, _SCENARIO, ("meta", self.meta_node))
        if p.partition_at_s is not None:
            self.push(p.partition_at_s, _SCENARIO, ("partition", None))
            self.push(p.partition_at_s + p.partition_for_s, _SCENARIO, ("heal", None))
        self.warmup = warmup

    def scenario(self, step: str, arg: Any) -> None:
        now = self.now
        rng = self.scn_rng
        if step == "start":
            i = arg
            core = self.new_core(i, now)
            if i > 0:
                seeds = [self.addrs[0]] + ([self.addrs[1]] if i > 1 else [])
                core.join(now, seeds)
            self.after_step(i)
        elif step == "stall":
            i = arg
            if self.up(i):
                self.busy_until[i] = max(
                    self.busy_until[i], now + rng.uniform(0.5, self.p.max_stall_s)
                )
                # the stall's end is the node's turn on the CPU: no run-queue wait on top
                self.awake_until[i] = self.busy_until[i] + 1e-5
            self.push(now + rng.expovariate(1 / 5.0) + self.p.max_stall_s, _SCENARIO, ("stall", i))
        elif step == "crash":
            victims = [
                i
                for i, c in enumerate(self.cores)
                if c is not None and i not in self.slow and i > 1 and i != self.meta_node
            ]
            if victims:
                self.crash(victims[rng.randrange(len(victims))])
        elif step == "restart":
            self.restart(arg)
        elif step == "meta":
            self.set_meta(arg)
        elif step == "partition":
            self.partitioned = True
            for i in range(self.p.nodes):
                self.side[i] = rng.randrange(2)
        elif step == "heal":
            self.partitioned = False
            self.heal_at = now
            self.push(now + 1.0, _SCENARIO, ("check_heal", None))
        elif step == "check_heal" and self.heal_converged_s is None:
            if self.views_agree():
                self.heal_converged_s = now - (self.heal_at or now)
            elif now - (self.heal_at or now) > self.converge_bound_s():
                self.violate("views did not converge after the partition healed")
            else:
                self.push(now + 1.0, _SCENARIO, ("check_heal", None))

    def crash(self, i: int) -> None:
        core = self.cores[i]
        if core is None:
            return
        name = self.names[i]
        self.crashed_inc[name] = max(self.crashed_inc.get(name, -1), core.incarnation)
        self.cores[i] = None
        self.generation[i] += 1
        self.scheduled[i] = math.inf
        pending = set()
        for j, other in enumerate(self.cores):
            if other is None:
                continue
            seen = other.member(name)
            if seen is not None and seen.state in _LIVE:
                pending.add(j)
        rec = _Crash(name, self.now, core.incarnation, pending)
        self.crashes.append(rec)
        self.open_crash[name] = rec
        for other_rec in self.open_crash.values():
            other_rec.pending.discard(i)
            if not other_rec.pending and other_rec.done_at is None and other_rec.first is not None:
                other_rec.done_at = self.now - other_rec.at
        if self.now + self.restart_after < self.p.seconds - 5:
            self.push(self.now + self.restart_after, _SCENARIO, ("restart", i))

    def restart(self, i: int) -> None:
        if self.cores[i] is not None:
            return
        self.open_crash.pop(self.names[i], None)
        core = self.new_core(i, self.now)
        live = [j for j, c in enumerate(self.cores) if c is not None and j != i]
        seeds = [self.addrs[j] for j in self.scn_rng.sample(live, min(2, len(live)))]
        core.join(self.now, seeds)
        self.after_step(i)

    def set_meta(self, i: int) -> None:
        core = self.cores[i]
        if core is None:
            return
        core.set_meta(self.now, b"health:" + bytes(40))
        me = core.member(core.name)
        assert me is not None
        self.meta_origin = core.name
        self.meta_version = me.meta_version
        self.meta_started = self.now
        live = sum(1 for c in self.cores if c is not None)
        self.meta_need = math.ceil(0.9999 * live)
        self.meta_have = set()
        self.meta_seen(i)
        self.after_step(i)

    def converge_bound_s(self) -> float:
        cfg = self.config
        return (
            4 * cfg.push_pull_interval_for(self.p.nodes)
            + 2 * cfg.suspicion_max_s(self.p.nodes)
            + 10
        )

    def views_agree(self, sample: int = 64) -> bool:
        """Sampled observers see exactly the running nodes as live (ALIVE or SUSPECT)."""
        up = [i for i, c in enumerate(self.cores) if c is not None]
        down = [i for i, c in enumerate(self.cores) if c is None]
        rng = random.Random(len(up) * 131 + int(self.now * 1000))
        observers = up if len(up) <= sample else rng.sample(up, sample)
        probe_up = up if len(up) <= 256 else rng.sample(up, 256)
        for o in observers:
            core = self.cores[o]
            assert core is not None
            if core.live_count != len(up):
                return False
            for u in probe_up:
                m = core.member(self.names[u])
                if m is None or m.state not in _LIVE:
                    return False
            for d in down:
                m = core.member(self.names[d])
                if m is not None and m.state in _LIVE:
                    return False
        return True

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        self.setup()
        end = self.p.seconds
        heap = self.heap
        while heap:
            at, _seq, action, arg = heapq.heappop(heap)
            if at > end:
                break
            self.now = at
            self.events_processed += 1
            if action == _TICK:
                i, gen = arg
                core = self.cores[i]
                if core is None or gen != self.generation[i] or self.scheduled[i] != at:
                    continue
                if i in self.slow and at < self.busy_until[i]:
                    self.scheduled[i] = self.busy_until[i]
                    self.push(self.busy_until[i], _TICK, (i, gen))
                    continue
                deadline = core.next_deadline()
                if deadline > at:  # the timer it was armed for got cancelled meanwhile
                    self.scheduled[i] = deadline
                    if deadline < math.inf:
                        self.push(deadline, _TICK, arg)
                    continue
                if i in self.slow and self.cpu_wait(i):
                    self.scheduled[i] = self.busy_until[i]
                    self.push(self.busy_until[i], _TICK, (i, gen))
                    continue
                self.scheduled[i] = math.inf
                core.tick(at)
                self.after_step(i)
            elif action == _UDP:
                j, src, data = arg
                core = self.cores[j]
                if core is None or self.deferred(j, action, arg):
                    continue
                core.receive_packet(at, src, data)
                self.after_step(j)
            elif action == _TCP_PING:
                j, i, gen, data = arg
                core = self.cores[j]
                if core is None or self.cut(i, j) or self.deferred(j, action, arg):
                    continue
                answer = core.receive_tcp_ping(at, self.addrs[i], data)
                self.after_step(j)
                if answer is not None:
                    self.bytes_sent += len(answer)
                    self.push(at + self.latency(), _TCP_ACK, (i, gen, self.addrs[j], answer))
            elif action == _TCP_ACK:
                i, gen, src, data = arg
                core = self.cores[i]
                if core is None or gen != self.generation[i] or self.deferred(i, action, arg):
                    continue
                core.receive_packet(at, src, data)
                self.after_step(i)
            elif action == _PUSH_PULL:
                self.push_pull(*arg)
            else:
                self.scenario(*arg)
        self.now = end
        return self.summary()

    def push_pull(self, i: int, gen: int, j: int) -> None:
        a, b = self.cores[i], self.cores[j]
        if a is None or b is None or gen != self.generation[i] or self.cut(i, j):
            return
        if self.deferred(j, _PUSH_PULL, (i, gen, j)):
            return
        now = self.now
        self.push_pulls += 1
        mine = a.local_state(now, False)
        theirs = b.local_state(now, False)
        self.bytes_sent += len(mine) + len(theirs)
        b.merge_remote_state(now, mine, False)
        self.after_step(j)
        a.merge_remote_state(now, theirs, False)
        self.after_step(i)

    def summary(self) -> dict[str, Any]:
        p = self.p
        if p.partition_at_s is None and self.views_agree() is False and not self.faulty:
            self.violate("views disagree at the end of a fault-free run")
        for i, core in enumerate(self.cores):
            # A core whose timers stopped running is a harness or core bug, not a fault.
            stalled_on_purpose = i in self.slow and self.busy_until[i] > p.seconds - 5
            if (
                core is not None
                and core.next_deadline() < p.seconds - 1.0
                and not stalled_on_purpose
            ):
                self.violate(f"{self.names[i]} timers stalled at {core.next_deadline():.3f}")
        firsts = [c.first for c in self.crashes if c.first is not None]
        alls = [c.done_at for c in self.crashes if c.done_at is not None]
        if (
            p.partition_at_s is not None
            and self.heal_at is not None
            and self.heal_converged_s is None
        ) and p.seconds - self.heal_at > self.converge_bound_s():
            self.violate("partition never converged")
        undetected = sum(1 for c in self.crashes if c.first is None)
        if not self.faulty and undetected:
            self.violate(f"{undetected} crash(es) never detected")
        cfg = self.config
        return {
            "nodes": p.nodes,
            "seconds": p.seconds,
            "preset": p.preset,
            "lifeguard": p.lifeguard,
            "loss": p.loss,
            "slow": p.slow,
            "crash": p.crash,
            "seed": p.seed,
            "partition": None
            if p.partition_at_s is None
            else {"at_s": p.partition_at_s, "for_s": p.partition_for_s},
            "detect_first_s": round(statistics.median(firsts), 3) if firsts else None,
            "detect_all_s": round(statistics.median(alls), 3) if alls else None,
            "detect_first_all_s": [round(x, 3) for x in firsts],
            "detect_all_all_s": [round(x, 3) for x in alls],
            "crashes_undetected": undetected,
            "converge_9999_s": None
            if self.converge_9999_s is None
            else round(self.converge_9999_s, 3),
            "heal_converge_s": self.heal_converged_s,
            "false_positives": len(self.fp_episodes),
            "false_positives_slow": len(self.fp_slow_episodes),
            "false_positives_partition": len(self.fp_partition_episodes - self.fp_slow_episodes),
            "false_positives_healthy": len(
                self.fp_episodes - self.fp_slow_episodes - self.fp_partition_episodes
            ),
            "false_positives_healthy_spread": len(
                self.fp_healthy_spread - self.fp_slow_episodes - self.fp_partition_episodes
            ),
            "false_positive_observations": self.fp_observations,
            "false_positive_observations_by_slow": self.fp_observations_by_slow,
            "slow_lag_s": p.slow_lag_s,
            "max_stall_s": p.max_stall_s,
            "slow_suspects_raised": sum(
                c.stats()["suspects_raised"]
                for i, c in enumerate(self.cores)
                if i in self.slow and c
            ),
            "slow_max_health": self.slow_max_health,
            "false_positive_unit": "distinct (member, incarnation) declared DEAD while running",
            "bytes_per_node_s": round(self.bytes_sent / (p.nodes * p.seconds), 1),
            "push_pulls": self.push_pulls,
            "events_processed": self.events_processed,
            "suspicion_min_s": round(cfg.suspicion_min_s(p.nodes), 3),
            "suspicion_max_s": round(cfg.suspicion_max_s(p.nodes), 3),
            "trace_digest": self.trace.hexdigest(),
            "violations": self.violations,
            "violation_samples": self.violation_samples,
        }


def run(params: SimParams) -> dict[str, Any]:
    return Simulation(params).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m p2porch.gossip.sim", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--loss", type=float, default=0.0, help="UDP loss probability 0..1")
    ap.add_argument("--slow", type=int, default=0, help="number of CPU-starved nodes")
    ap.add_argument("--crash", type=int, default=0, help="number of crashes (then restarts)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-lifeguard", action="store_true")
    ap.add_argument(
        "--baseline-min",
        action="store_true",
        help="with --no-lifeguard: fixed suspicion timeout = min (classic SWIM) instead of max",
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="lan")
    ap.add_argument("--partition-at", type=float, default=None)
    ap.add_argument("--partition-for", type=float, default=20.0)
    ap.add_argument("--max-stall", type=float, default=3.0)
    ap.add_argument(
        "--slow-lag",
        type=float,
        default=0.25,
        help="mean run-queue delay (s) of a slow node's every wake-up between stalls (0: off)",
    )
    ap.add_argument("--bootstrap", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--timing", action="store_true", help="add wall_s to the JSON")
    ap.add_argument("--profile", action="store_true", help="cProfile to stderr")
    args = ap.parse_args(argv)
    if not 0 <= args.loss < 1 or args.nodes < 2 or args.seconds <= 0:
        ap.error("need --nodes >= 2, --seconds > 0, 0 <= --loss < 1")
    if args.slow_lag < 0:
        ap.error("need --slow-lag >= 0")
    params = SimParams(
        nodes=args.nodes,
        seconds=args.seconds,
        loss=args.loss,
        slow=args.slow,
        crash=args.crash,
        seed=args.seed,
        lifeguard=not args.no_lifeguard,
        preset=args.preset,
        partition_at_s=args.partition_at,
        partition_for_s=args.partition_for,
        max_stall_s=args.max_stall,
        slow_lag_s=args.slow_lag,
        bootstrap=None if args.bootstrap == "auto" else args.bootstrap == "yes",
        config_overrides=(("baseline_suspicion_at_min", True),) if args.baseline_min else (),
    )
    started = time.perf_counter()
    cpu_started = time.process_time()
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(run, params)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    else:
        result = run(params)
    wall = time.perf_counter() - started
    print(
        f"simulated {params.seconds:g} s of {params.nodes} nodes in {wall:.1f} s", file=sys.stderr
    )
    if args.timing:
        result["wall_s"] = round(wall, 2)
        result["cpu_s"] = round(time.process_time() - cpu_started, 2)
    print(json.dumps(result))
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
