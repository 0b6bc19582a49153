"""Sans-I/O SWIM membership with the Lifeguard refinements.

The core never touches a socket or a clock: time arrives as ``now`` (seconds, monotonic),
datagrams as ``receive_packet``, randomness from the injected ``rng``; everything it wants
done comes out of ``ready()``. The trio shell (service.py) and the simulation (sim.py) drive
the very same object, so what the simulation shows is what the daemon does.

Protocol, in the shape of hashicorp/memberlist (re-derived here, not copied):

* **Probing.** Every probe interval the next member of a shuffled round-robin order is pinged
  (each pass is a fresh random permutation; members that join mid-pass are slotted in at a
  random remaining position), so every member is probed once per pass -- a bounded detection
  time that pure random choice would not give. The permutation is ``offset + i * stride mod
  n`` with a random offset and a random stride coprime to n, drawn anew each pass: O(1)
  memory instead of a shuffled copy of the member list per node (10,000 simulated nodes
  cannot each hold a 10,000-entry list), at the price of a less uniform shuffle. No ack
  within the probe timeout -> ``k`` relays ping it for us (indirect probe, with Lifeguard
  nacks) and, if enabled, a TCP probe is requested from the shell. Still no ack when the
  interval ends -> the member is suspected.
* **Suspicion (Lifeguard).** A suspicion starts at ``max_s`` and shrinks logarithmically
  toward ``min_s`` as distinct other members confirm it (formula: config.py). The suspect
  hears about it -- by gossip, and directly on our pings to it -- and refutes by bumping its
  incarnation. Expiry declares it DEAD; the Dead rumour overrides everyone's timers.
* **Local health (Lifeguard).** A node whose own probes fail without the relays' nacks, or
  that has to refute suspicions of itself, is probably the slow one: its probe interval and
  timeout stretch by ``health + 1`` so it accuses others less while it is unwell.
* **Dissemination.** Rumours (Alive/Suspect/Dead/Left) wait in a transmit-limited queue
  (queue.py), ride on every outgoing datagram up to the MTU, and are pushed to
  ``gossip_nodes`` random members every gossip interval while the queue is not empty.
* **Anti-entropy.** Periodic push-pull of the full table with one random member (interval
  scaled with N), and now and then with a DEAD member, which is how two halves of a healed
  partition find each other again. Joining is a push-pull with the seeds, retried with
  exponential back-off until one answers.
* **Tombstones.** DEAD/LEFT rows are kept ``tombstone_s`` to reject stale rumours, receive
  gossip for ``gossip_to_dead_s`` (so a wrongly-declared node learns it and refutes), then
  are reaped (event REAPED); a later Alive brings the name back as a fresh member. The
  address of a reaped DEAD member stays on a reconnect list for ``reconnect_s`` (serf's
  idea): push-pulls now and then go there, which heals partitions longer than tombstones.

Ordering of rumours about one member: ``(incarnation, meta_version)``. Only the member bumps
its incarnation (refutations, restarts); metadata changes bump ``meta_version`` only, so a
metadata update never overrides a suspicion.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.gossip.config import GossipConfig
from p2porch.gossip.errors import MetaTooLarge, NotRunning
from p2porch.gossip.messages import (
    Ack,
    Alive,
    Broadcast,
    Compound,
    Dead,
    Event,
    EventKind,
    IndirectPing,
    Left,
    Member,
    MemberState,
    Nack,
    OutPacket,
    Packet,
    Ping,
    PushPullState,
    Ready,
    SingleMessage,
    Suspect,
)
from p2porch.gossip.queue import COMPOUND_OVERHEAD_BYTES, BroadcastQueue
from p2porch.gossip.table import MemberSnapshot, member_digest

if TYPE_CHECKING:  # the core only ever uses the injected generator
    from random import Random

__all__ = [
    "Event",
    "EventKind",
    "GossipConfig",
    "Member",
    "MemberSnapshot",
    "MemberState",
    "OutPacket",
    "Ready",
    "Suspicion",
    "SwimCore",
]

_ALIVE = MemberState.ALIVE
_SUSPECT = MemberState.SUSPECT
_DEAD = MemberState.DEAD
_LEFT = MemberState.LEFT
_LIVE_STATES = (_ALIVE, _SUSPECT)
_GONE_STATES = (_DEAD, _LEFT)

# Rumour priorities in the broadcast queue (higher goes first among equally-sent rumours).
_PRIO_ALIVE = 1
_PRIO_SUSPECT = 2
_PRIO_DEAD = 3

# Timer kinds.
_T_PROBE = 0
_T_PROBE_TIMEOUT = 1
_T_PROBE_END = 2
_T_GOSSIP = 3
_T_PUSH_PULL = 4
_T_SUSPICION = 5
_T_REAP = 6
_T_RELAY_NACK = 7
_T_RELAY_EXPIRE = 8
_T_JOIN_RETRY = 9

_MISSING = object()
_MAX_INCARNATION = 2**63 - 1  # the wire bound of incarnation numbers (messages.py)

# Decoded rumours by their exact bytes. The same rumour reaches a node from several peers
# (and, in the simulation, every node); decoding it once is a pure memo of a pure function.
_PART_CACHE: dict[bytes, SingleMessage] = {}
_PART_CACHE_MAX = 4096  # <= ~6 MB even if a peer sends only unique junk rumours
# Encoded member tables by digest, and decoded ones by their bytes (push-pull; see table.py).
_BLOB_BY_DIGEST: dict[int, bytes] = {}
_TABLE_BY_BLOB: dict[bytes, tuple[Member, ...]] = {}
_TABLE_CACHE_MAX = 4

_STAT_KEYS = (
    "packets_sent",
    "bytes_sent",
    "packets_received",
    "bytes_received",
    "bad_packets",
    "pings_sent",
    "acks_sent",
    "acks_received",
    "indirect_pings_sent",
    "indirect_pings_relayed",
    "nacks_sent",
    "nacks_received",
    "tcp_pings_sent",
    "tcp_pings_answered",
    "probes_failed",
    "suspects_raised",
    "deads_declared",
    "refutes",
    "gossip_packets_sent",
    "push_pulls_started",
    "push_pulls_merged",
    "push_pulls_same_digest",
    "join_attempts",
    "name_conflicts",
    "oversized_meta_dropped",
    "misdirected_pings",
)


class Suspicion:
    """Lifeguard's shrinking suspicion timer for one member (pure arithmetic).

    ``k`` confirmations are expected; each distinct other accuser moves the deadline from
    ``start + max_s`` toward ``start + min_s`` by ``log(c + 1) / log(k + 1)`` of the span.
    """

    __slots__ = ("_accusers", "incarnation", "k", "max_s", "min_s", "start", "timer")

    def __init__(
        self, accuser: str, *, incarnation: int, k: int, min_s: float, max_s: float, start: float
    ) -> None:
        self._accusers = {accuser}
        self.incarnation = incarnation
        self.k = k
        self.min_s = min_s
        self.max_s = max_s
        self.start = start
        self.timer: list[object] | None = None

    @property
    def confirmations(self) -> int:
        return len(self._accusers) - 1

    def confirm(self, accuser: str) -> bool:
        """Count ``accuser`` once; True when this was a new confirmation (re-gossip it)."""
        if self.confirmations >= self.k or accuser in self._accusers:
            return False
        self._accusers.add(accuser)
        return True

    def timeout_s(self) -> float:
        if self.k < 1:
            return self.min_s
        frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
        return max(self.min_s, self.max_s - frac * (self.max_s - self.min_s))

    def deadline(self) -> float:
        return self.start + self.timeout_s()


class _ProbeWait:
    __slots__ = (
        "acked",
        "direct_deadline",
        "end_timer",
        "expected_nacks",
        "incarnation",
        "nacks",
        "target",
        "timeout_timer",
    )

    def __init__(self, target: str, incarnation: int, direct_deadline: float) -> None:
        self.target = target
        self.incarnation = incarnation
        self.direct_deadline = direct_deadline
        self.acked = False
        self.nacks = 0
        self.expected_nacks = 0
        self.timeout_timer: list[object] | None = None
        self.end_timer: list[object] | None = None


class _RelayWait:
    __slots__ = ("acked", "orig_seq", "requester", "want_nack")

    def __init__(self, orig_seq: int, requester: str, want_nack: bool) -> None:
        self.orig_seq = orig_seq
        self.requester = requester
        self.want_nack = want_nack
        self.acked = False


def _decode_part(data: bytes) -> SingleMessage:
    msg = _PART_CACHE.get(data)
    if msg is not None:
        return msg
    msg = codec.decode(data, SingleMessage)
    if isinstance(msg, Alive | Suspect | Dead | Left):
        if len(_PART_CACHE) >= _PART_CACHE_MAX:
            _PART_CACHE.clear()
        _PART_CACHE[data] = msg
    return msg


def _bounded_put(cache: dict[object, object], key: object, value: object) -> None:
    if len(cache) >= _TABLE_CACHE_MAX:
        del cache[next(iter(cache))]
    cache[key] = value


class SwimCore:
    """One member's SWIM + Lifeguard state machine. See the module docstring."""

    def __init__(  # noqa: PLR0917 - the shared contract's signature
        self,
        config: GossipConfig,
        name: str,
        addr: str,
        rng: Random,
        now: float,
        meta: bytes = b"",
        incarnation: int = 0,
    ) -> None:
        if len(meta) > config.max_meta_bytes:
            raise MetaTooLarge(len(meta), config.max_meta_bytes)
        self.config = config
        self.name = name
        self.addr = addr
        self.rng = rng
        self._budget = config.udp_budget_bytes
        self._self = Member(name, addr, incarnation, _ALIVE, meta, 0)
        # Copy-on-write table: a shared read-only base (see bootstrap) plus our changes.
        self._base: Mapping[str, Member] = {}
        self._base_names: tuple[str, ...] = ()
        self._overlay: dict[str, Member | None] = {name: self._self}
        self._extra_names: list[str] = []  # names not in the base, in order of arrival
        self._extra_set: set[str] = set()
        self._live = 1
        self._digest = member_digest(self._self)
        self._since: dict[str, float] = {}  # DEAD/LEFT members -> when they became so
        self._reconnect: dict[str, tuple[str, float]] = {}  # reaped DEAD: addr, when reaped
        self._suspicions: dict[str, Suspicion] = {}
        self._queue = BroadcastQueue()
        self._timers: list[tuple[float, int, list[object]]] = []
        self._timer_seq = 0
        self._acks: dict[int, _ProbeWait | _RelayWait] = {}
        self._seq = 0
        self._health = 0
        self._left = False
        self._joining = False
        self._join_seeds: tuple[str, ...] = ()
        self._join_delay_s = config.join_retry_initial_s
        self._join_timer: list[object] | None = None
        self._gossip_timer: list[object] | None = None
        self._gossip_phase = rng.random() * config.gossip_interval_s
        # Probe order: a random permutation (offset + i * stride mod n) per pass.
        self._pass_n = 0
        self._pass_i = 0
        self._pass_offset = 0
        self._pass_stride = 1
        self._probe_new: list[str] = []
        self._state_cache: tuple[int, bytes] | None = None
        self._stats = dict.fromkeys(_STAT_KEYS, 0)
        self._out_packets: list[OutPacket] = []
        self._out_tcp: list[OutPacket] = []
        self._out_push_pulls: list[str] = []
        self._out_events: list[Event] = []
        self._probe_timer: list[object] | None = self._schedule(
            now + rng.random() * config.probe_interval_s, _T_PROBE, None
        )
        self._push_pull_timer: list[object] | None = None
        self._schedule_push_pull(now, first=True)

    # ================================================================== public API

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _at, _seq, timer = heapq.heappop(timers)
            if not timer[0]:
                continue
            timer[0] = False
            self._fire(now, timer[1], timer[2])  # type: ignore[arg-type]

    def next_deadline(self) -> float:
        """When the core next needs ``tick`` (``inf`` if never)."""
        timers = self._timers
        while timers and not timers[0][2][0]:
            heapq.heappop(timers)
        return timers[0][0] if timers else math.inf

    def receive_packet(self, now: float, src_addr: str, data: bytes) -> None:
        """Handle one plaintext datagram; garbage is counted in ``bad_packets``."""
        stats = self._stats
        stats["packets_received"] += 1
        stats["bytes_received"] += len(data)
        try:
            msg: Packet = codec.decode(data, Packet)
        except CodecError:
            stats["bad_packets"] += 1
            return
        if isinstance(msg, Compound):
            for part in msg.parts:
                try:
                    sub = _decode_part(part)
                except CodecError:
                    stats["bad_packets"] += 1
                    continue
                self._handle(now, src_addr, sub, part)
        else:
            self._handle(now, src_addr, msg, data)

    def receive_tcp_ping(self, now: float, src_addr: str, data: bytes) -> bytes | None:
        """Answer a fallback probe that came over TCP (None: not for us / garbage)."""
        try:
            msg: Ping = codec.decode(data, Ping)
        except CodecError:
            self._stats["bad_packets"] += 1
            return None
        if msg.target != self.name:
            self._stats["misdirected_pings"] += 1
            return None
        self._stats["tcp_pings_answered"] += 1
        return codec.encode(Ack(msg.seq, self.name))

    def local_state(self, now: float, join: bool) -> bytes:
        """Our full table for a push-pull exchange."""
        digest = self._digest
        cached = self._state_cache
        if cached is not None and cached[0] == digest:
            blob = cached[1]
        else:
            shared = _BLOB_BY_DIGEST.get(digest)
            if shared is None:
                shared = codec.encode(self._all_members())
                _bounded_put(_BLOB_BY_DIGEST, digest, shared)  # type: ignore[arg-type]
            blob = shared
            self._state_cache = (digest, blob)
        return codec.encode(
            PushPullState(
                self.name, self.addr, join or self._joining, digest.to_bytes(16, "big"), blob
            )
        )

    def merge_remote_state(self, now: float, data: bytes, join: bool) -> None:
        """Merge a peer's table (anti-entropy); garbage is counted, never raised."""
        try:
            state: PushPullState = codec.decode(data, PushPullState)
        except CodecError:
            self._stats["bad_packets"] += 1
            return
        if state.source == self.name:
            return
        if self._joining:
            self._finish_join()
        if state.digest == self._digest.to_bytes(16, "big"):
            self._stats["push_pulls_same_digest"] += 1
            return
        members = _TABLE_BY_BLOB.get(state.members_blob)
        if members is None:
            try:
                members = codec.decode(state.members_blob, tuple[Member, ...])
            except CodecError:
                self._stats["bad_packets"] += 1
                return
            _bounded_put(_TABLE_BY_BLOB, state.members_blob, members)  # type: ignore[arg-type]
        self._stats["push_pulls_merged"] += 1
        rebroadcast_new = not (join or state.join)
        for m in members:
            if m.state is _ALIVE:
                self._on_alive(
                    now,
                    Alive(m.name, m.addr, m.incarnation, m.meta, m.meta_version),
                    None,
                    rebroadcast_new,
                )
            elif m.state is _LEFT:
                self._on_gone(now, m.name, m.incarnation, None, None)
            else:
                # A remote DEAD is only a suspicion here (memberlist's rule): let the member
                # refute, or our own timer decide.
                self._on_suspect(now, Suspect(m.name, m.incarnation, state.source), None)

    def join(self, now: float, seeds: Sequence[str]) -> None:
        """Join through any of ``seeds`` (push-pulls, retried with back-off until one works)."""
        if self._left:
            raise NotRunning("this node has left the cluster")
        self._join_seeds = tuple(s for s in seeds if s != self.addr)
        self._queue_self_alive()
        self._ensure_gossip(now)
        if not self._join_seeds:
            return
        self._joining = True
        self._join_delay_s = self.config.join_retry_initial_s
        self._join_attempt(now)

    def leave(self, now: float) -> None:
        """Leave gracefully: announce LEFT, stop probing; keep gossiping so the news spreads."""
        if self._left:
            return
        self._left = True
        self._joining = False
        for timer in (self._probe_timer, self._push_pull_timer, self._join_timer):
            if timer is not None:
                timer[0] = False
        me = self._self
        self._set_self(Member(me.name, me.addr, me.incarnation, _LEFT, me.meta, me.meta_version))
        self._queue.queue(self.name, codec.encode(Left(self.name, me.incarnation)), _PRIO_DEAD)
        self._ensure_gossip(now, immediate=True)

    def set_meta(self, now: float, meta: bytes) -> None:
        """Publish new metadata (versioned; spreads like any rumour)."""
        if len(meta) > self.config.max_meta_bytes:
            raise MetaTooLarge(len(meta), self.config.max_meta_bytes)
        if self._left:
            raise NotRunning("this node has left the cluster")
        me = self._self
        self._set_self(
            Member(me.name, me.addr, me.incarnation, me.state, meta, me.meta_version + 1)
        )
        self._queue_self_alive()
        self._ensure_gossip(now)

    def bootstrap(self, now: float, snapshot: MemberSnapshot) -> None:
        """Start from a shared table without any traffic (simulations, tests).

        The snapshot is used read-only and may be shared by many cores; our own row in it is
        ignored. Only valid before anything else is known. No events are emitted.
        """
        if self._base_names or self._extra_names:
            raise ValueError("bootstrap() must come before any other member is known")
        self._base = snapshot.by_name
        self._base_names = snapshot.names
        own_in_base = snapshot.by_name.get(self.name)
        digest = snapshot.digest
        live = snapshot.live_count + 1
        if own_in_base is not None:
            digest ^= member_digest(own_in_base)
            if own_in_base.state in _LIVE_STATES:
                live -= 1
        self._digest = digest ^ member_digest(self._self)
        self._live = live
        self._pass_n = self._pass_i = 0
        self._schedule_push_pull(now, first=True)

    def ready(self) -> Ready:
        """Take everything produced since the last call."""
        out = Ready(
            tuple(self._out_packets),
            tuple(self._out_tcp),
            tuple(self._out_push_pulls),
            tuple(self._out_events),
        )
        self._out_packets = []
        self._out_tcp = []
        self._out_push_pulls = []
        self._out_events = []
        return out

    def has_ready(self) -> bool:
        return bool(self._out_packets or self._out_tcp or self._out_push_pulls or self._out_events)

    def members(self) -> tuple[Member, ...]:
        """Every known member (self included, DEAD/LEFT tombstones too), sorted by name."""
        return self._all_members()

    def member(self, name: str) -> Member | None:
        return self._get(name)

    def local_health(self) -> int:
        """Lifeguard awareness: 0 is healthy; timeouts are scaled by (health + 1)."""
        return self._health

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    # ------------------------------------------------------------------ extra read-outs

    @property
    def incarnation(self) -> int:
        return self._self.incarnation

    @property
    def live_count(self) -> int:
        """Estimated cluster size: ALIVE + SUSPECT members, self included."""
        return self._live

    @property
    def digest(self) -> int:
        return self._digest

    @property
    def queued_broadcasts(self) -> int:
        return len(self._queue)

    def suspicion(self, name: str) -> Suspicion | None:
        return self._suspicions.get(name)

    # ================================================================== table

    def _get(self, name: str) -> Member | None:
        found = self._overlay.get(name, _MISSING)
        if found is _MISSING:
            return self._base.get(name)
        return found  # type: ignore[return-value]

    def _put(self, old: Member | None, new: Member, name: str | None = None) -> None:
        """Replace ``old`` (or nothing) by ``new`` keeping digest and live count in step."""
        if old is not None:
            self._digest ^= member_digest(old)
            if old.state in _LIVE_STATES:
                self._live -= 1
        else:
            self._remember_name(new.name)
        self._digest ^= member_digest(new)
        if new.state in _LIVE_STATES:
            self._live += 1
        self._overlay[new.name] = new

    def _forget(self, old: Member) -> None:
        self._digest ^= member_digest(old)
        if old.state in _LIVE_STATES:
            self._live -= 1
        self._overlay[old.name] = None
        self._since.pop(old.name, None)

    def _set_self(self, new: Member) -> None:
        self._put(self._self, new)
        self._self = new

    def _remember_name(self, name: str) -> None:
        if name == self.name or name in self._extra_set or name in self._base:
            return
        self._extra_set.add(name)
        self._extra_names.append(name)
        self._probe_new.append(name)

    def _name_at(self, i: int) -> str:
        nb = len(self._base_names)
        return self._base_names[i] if i < nb else self._extra_names[i - nb]

    def _all_members(self) -> tuple[Member, ...]:
        out: list[Member] = []
        overlay = self._overlay
        for name in self._base_names:
            found = overlay.get(name, _MISSING)
            if found is _MISSING:
                out.append(self._base[name])
            elif found is not None:
                out.append(found)  # type: ignore[arg-type]
        for name, m in overlay.items():
            if m is not None and name not in self._base:
                out.append(m)
        out.sort(key=lambda m: m.name)
        return tuple(out)

    def _sample(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to ``k`` distinct random members (not self) that ``accept`` approves."""
        total = len(self._base_names) + len(self._extra_names)
        if k <= 0 or total == 0:
            return []
        rng = self.rng
        if total <= 64:
            cands = []
            for i in range(total):
                m = self._get(self._name_at(i))
                if m is not None and m.name != self.name and accept(m):
                    cands.append(m)
            if len(cands) <= k:
                rng.shuffle(cands)
                return cands
            return rng.sample(cands, k)
        picked: dict[str, Member] = {}
        tries = 0
        while len(picked) < k and tries < 8 * k + 24:
            tries += 1
            name = self._name_at(rng.randrange(total))
            if name in picked or name == self.name:
                continue
            m = self._get(name)
            if m is not None and accept(m):
                picked[name] = m
        return list(picked.values())

    # ================================================================== timers

    def _schedule(self, at: float, kind: int, arg: object) -> list[object]:
        timer: list[object] = [True, kind, arg]
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, timer))
        return timer

    def _fire(self, now: float, kind: int, arg: object) -> None:
        if kind == _T_PROBE:
            self._probe(now)
        elif kind == _T_PROBE_TIMEOUT:
            self._probe_timeout(now, arg)  # type: ignore[arg-type]
        elif kind == _T_PROBE_END:
            self._probe_end(now, arg)  # type: ignore[arg-type]
        elif kind == _T_GOSSIP:
            self._gossip(now)
        elif kind == _T_PUSH_PULL:
            self._push_pull(now)
        elif kind == _T_SUSPICION:
            self._suspicion_expired(now, arg)  # type: ignore[arg-type]
        elif kind == _T_REAP:
            self._reap(now, arg)  # type: ignore[arg-type]
        elif kind == _T_RELAY_NACK:
            self._relay_nack(now, arg)  # type: ignore[arg-type]
        elif kind == _T_RELAY_EXPIRE:
            self._acks.pop(arg, None)  # type: ignore[call-overload]
        elif kind == _T_JOIN_RETRY:
            self._join_retry(now)

    def _scale(self) -> int:
        return self._health + 1

    def _adjust_health(self, delta: int) -> None:
        if not self.config.lifeguard:
            return
        top = self.config.awareness_max_multiplier - 1
        self._health = min(top, max(0, self._health + delta))

    # ================================================================== output

    def _send(self, dst: str, first: bytes, also: Sequence[bytes] = ()) -> None:
        """Send ``first`` (+ ``also``) to ``dst``, filling the datagram with rumours."""
        parts = [first, *also]
        used = COMPOUND_OVERHEAD_BYTES + sum(len(p) + 3 for p in parts)
        if self._queue:
            parts.extend(self._queue.take(self._budget - used, self._retransmit_limit()))
        data = parts[0] if len(parts) == 1 else codec.encode(Compound(tuple(parts)))
        self._emit(dst, data)

    def _emit(self, dst: str, data: bytes) -> None:
        self._stats["packets_sent"] += 1
        self._stats["bytes_sent"] += len(data)
        self._out_packets.append(OutPacket(dst, data))

    def _event(self, kind: EventKind, member: Member) -> None:
        self._out_events.append(Event(kind, member))

    def _retransmit_limit(self) -> int:
        return self.config.retransmit_limit(self._live)

    def _rumour(self, name: str, data: bytes | None, msg: Broadcast, prio: int) -> None:
        self._queue.queue(name, data if data is not None else codec.encode(msg), prio)

    def _queue_self_alive(self) -> None:
        me = self._self
        self._queue.queue(
            self.name,
            codec.encode(Alive(me.name, me.addr, me.incarnation, me.meta, me.meta_version)),
            _PRIO_ALIVE,
        )

    def _ensure_gossip(self, now: float, immediate: bool = False) -> None:
        """Arm the gossip timer while rumours are queued (no empty gossip rounds)."""
        if self._gossip_timer is not None and self._gossip_timer[0]:
            return
        if not self._queue:
            return
        if immediate:
            at = now
        else:
            interval = self.config.gossip_interval_s
            phase = self._gossip_phase
            at = phase + (math.floor((now - phase) / interval) + 1) * interval
            while at <= now:  # float rounding must never re-arm a timer in the past
                at += interval
        self._gossip_timer = self._schedule(at, _T_GOSSIP, None)

    # ================================================================== probing

    def _next_probe_target(self) -> Member | None:
        rng = self.rng
        total = len(self._base_names) + len(self._extra_names)
        for _ in range(total + len(self._probe_new) + 2):
            new = self._probe_new
            remaining = self._pass_n - self._pass_i
            if new and rng.random() * (remaining + len(new)) < len(new):
                name = new.pop(rng.randrange(len(new)))
            else:
                if self._pass_i >= self._pass_n:
                    self._new_pass(total)
                    if self._pass_n == 0:
                        return None
                idx = (self._pass_offset + self._pass_i * self._pass_stride) % self._pass_n
                self._pass_i += 1
                name = self._name_at(idx)
            if name == self.name:
                continue
            m = self._get(name)
            if m is not None and m.state in _LIVE_STATES:
                return m
        return None

    def _new_pass(self, total: int) -> None:
        self._probe_new.clear()
        self._pass_n = total
        self._pass_i = 0
        if total <= 1:
            self._pass_offset, self._pass_stride = 0, 1
            return
        rng = self.rng
        self._pass_offset = rng.randrange(total)
        stride = rng.randrange(1, total)
        while math.gcd(stride, total) != 1:
            stride = rng.randrange(1, total)
        self._pass_stride = stride

    def _probe(self, now: float) -> None:
        if self._left:
            return
        cfg = self.config
        scale = self._scale()
        interval = cfg.probe_interval_s * scale
        target = self._next_probe_target()
        if target is not None:
            self._seq += 1
            seq = self._seq
            wait = _ProbeWait(target.name, target.incarnation, now + cfg.probe_timeout_s * scale)
            self._acks[seq] = wait
            also: list[bytes] = []
            if target.state is _SUSPECT and cfg.lifeguard:
                # Tell the suspect directly: it refutes at once instead of waiting for gossip.
                also.append(codec.encode(Suspect(target.name, target.incarnation, self.name)))
            self._stats["pings_sent"] += 1
            self._send(target.addr, codec.encode(Ping(seq, target.name, self.name)), also)
            wait.timeout_timer = self._schedule(wait.direct_deadline, _T_PROBE_TIMEOUT, seq)
            wait.end_timer = self._schedule(now + interval, _T_PROBE_END, seq)
        self._probe_timer = self._schedule(now + interval, _T_PROBE, None)

    def _probe_timeout(self, now: float, seq: int) -> None:
        wait = self._acks.get(seq)
        if not isinstance(wait, _ProbeWait) or wait.acked:
            return
        target = self._get(wait.target)
        if target is None or target.state not in _LIVE_STATES:
            return
        cfg = self.config
        relays = self._sample(
            cfg.indirect_checks,
            lambda m: m.state is _ALIVE and m.name != wait.target,
        )
        ping = IndirectPing(seq, target.name, target.addr, self.name, cfg.lifeguard)
        data = codec.encode(ping)
        for relay in relays:
            self._stats["indirect_pings_sent"] += 1
            self._send(relay.addr, data)
        if cfg.lifeguard:
            wait.expected_nacks = len(relays)
        if cfg.tcp_fallback:
            self._stats["tcp_pings_sent"] += 1
            self._out_tcp.append(
                OutPacket(target.addr, codec.encode(Ping(seq, target.name, self.name)))
            )

    def _probe_end(self, now: float, seq: int) -> None:
        wait = self._acks.pop(seq, None)
        if not isinstance(wait, _ProbeWait) or wait.acked:
            return
        self._stats["probes_failed"] += 1
        if wait.expected_nacks > 0:
            # Relays that could not even nack us suggest the problem is on our side.
            self._adjust_health(wait.expected_nacks - wait.nacks)
        else:
            self._adjust_health(1)
        target = self._get(wait.target)
        if target is None or target.state not in _LIVE_STATES or self._left:
            return
        self._stats["suspects_raised"] += 1
        self._on_suspect(now, Suspect(wait.target, wait.incarnation, self.name), None)

    # ================================================================== dispatch

    def _handle(self, now: float, src: str, msg: SingleMessage, raw: bytes) -> None:
        if isinstance(msg, Ping):
            self._on_ping(now, src, msg)
        elif isinstance(msg, Ack):
            self._on_ack(now, msg)
        elif isinstance(msg, Alive):
            self._on_alive(now, msg, raw, True)
        elif isinstance(msg, Suspect):
            self._on_suspect(now, msg, raw)
        elif isinstance(msg, Dead | Left):
            self._on_gone(now, msg.name, msg.incarnation, raw, msg)
        elif isinstance(msg, IndirectPing):
            self._on_indirect_ping(now, src, msg)
        elif isinstance(msg, Nack):
            wait = self._acks.get(msg.seq)
            if isinstance(wait, _ProbeWait):
                self._stats["nacks_received"] += 1
                wait.nacks += 1

    def _on_ping(self, now: float, src: str, msg: Ping) -> None:
        if msg.target != self.name:
            self._stats["misdirected_pings"] += 1
            return
        self._stats["acks_sent"] += 1
        self._send(src, codec.encode(Ack(msg.seq, self.name)))

    def _on_ack(self, now: float, msg: Ack) -> None:
        wait = self._acks.get(msg.seq)
        if wait is None or wait.acked:
            return
        self._stats["acks_received"] += 1
        wait.acked = True
        if isinstance(wait, _ProbeWait):
            del self._acks[msg.seq]
            for timer in (wait.timeout_timer, wait.end_timer):
                if timer is not None:
                    timer[0] = False
            if now <= wait.direct_deadline:
                self._adjust_health(-1)
        else:
            self._stats["acks_sent"] += 1
            self._send(wait.requester, codec.encode(Ack(wait.orig_seq, self.name)))

    def _on_indirect_ping(self, now: float, src: str, msg: IndirectPing) -> None:
        self._stats["indirect_pings_relayed"] += 1
        self._seq += 1
        seq = self._seq
        self._acks[seq] = _RelayWait(msg.seq, src, msg.want_nack)
        self._stats["pings_sent"] += 1
        self._send(msg.target_addr, codec.encode(Ping(seq, msg.target, self.name)))
        cfg = self.config
        if msg.want_nack:
            # Nack a little before our own probe timeout so that it reaches the requester
            # before its probe interval ends (it started the indirect phase one probe
            # timeout into that interval); a late nack is worth nothing to its health score.
            self._schedule(now + 0.8 * cfg.probe_timeout_s, _T_RELAY_NACK, seq)
        self._schedule(now + cfg.probe_interval_s, _T_RELAY_EXPIRE, seq)

    def _relay_nack(self, now: float, seq: int) -> None:
        wait = self._acks.get(seq)
        if isinstance(wait, _RelayWait) and not wait.acked:
            self._stats["nacks_sent"] += 1
            self._send(wait.requester, codec.encode(Nack(wait.orig_seq, self.name)))

    # ================================================================== rumours

    def _on_alive(self, now: float, msg: Alive, raw: bytes | None, rebroadcast_new: bool) -> None:
        if len(msg.meta) > self.config.max_meta_bytes:
            self._stats["oversized_meta_dropped"] += 1
            return
        name = msg.name
        if name == self.name:
            self._alive_about_self(now, msg)
            return
        old = self._get(name)
        new = Member(name, msg.addr, msg.incarnation, _ALIVE, msg.meta, msg.meta_version)
        if old is None:
            self._reconnect.pop(name, None)
            self._put(None, new)
            self._event(EventKind.JOINED, new)
            if rebroadcast_new:
                self._rumour(name, raw, msg, _PRIO_ALIVE)
                self._ensure_gossip(now)
            return
        if old.addr != msg.addr:
            reclaim = self.config.dead_node_reclaim_s
            since = self._since.get(name)
            if not (
                old.state in _GONE_STATES
                and reclaim > 0
                and since is not None
                and now - since >= reclaim
            ):
                self._stats["name_conflicts"] += 1
                return
            self._since.pop(name, None)
            self._put(old, new)
            self._event(EventKind.JOINED, new)
        elif old.state in _GONE_STATES:
            if msg.incarnation <= old.incarnation:
                return
            self._since.pop(name, None)
            self._put(old, new)
            self._event(EventKind.JOINED, new)
        elif msg.incarnation > old.incarnation:
            if old.state is _SUSPECT:
                self._cancel_suspicion(name)
                self._put(old, new)
                self._event(EventKind.ALIVE, new)
            else:
                self._put(old, new)
            if old.meta_version != new.meta_version or old.meta != new.meta:
                self._event(EventKind.UPDATED, new)
        elif msg.incarnation == old.incarnation and msg.meta_version > old.meta_version:
            new = Member(name, old.addr, old.incarnation, old.state, msg.meta, msg.meta_version)
            self._put(old, new)
            self._event(EventKind.UPDATED, new)
        else:
            return
        self._rumour(name, raw, msg, _PRIO_ALIVE)
        self._ensure_gossip(now)

    def _alive_about_self(self, now: float, msg: Alive) -> None:
        if self._left:
            return
        me = self._self
        if msg.incarnation < me.incarnation:
            return
        if msg.incarnation == me.incarnation and msg.addr == me.addr:
            if msg.meta_version < me.meta_version:
                return  # an echo of our own older rumour
            if msg.meta_version == me.meta_version and msg.meta == me.meta:
                return  # an echo of our current rumour
        # Someone holds a newer (or conflicting) claim about us: e.g. our previous life
        # before a restart. Out-bid it.
        self._refute(now, msg.incarnation)

    def _on_suspect(self, now: float, msg: Suspect, raw: bytes | None) -> None:
        name = msg.name
        old = self._get(name)
        if old is None or msg.incarnation < old.incarnation:
            return
        if name == self.name:
            if not self._left:
                self._refute(now, msg.incarnation)
            return
        susp = self._suspicions.get(name)
        if susp is not None and old.state is _SUSPECT:
            if msg.incarnation == susp.incarnation:
                if susp.confirm(msg.accuser):
                    self._arm_suspicion(now, susp)
                    self._rumour(name, raw, msg, _PRIO_SUSPECT)
                    self._ensure_gossip(now)
                return
            # Suspected again at a newer incarnation (we missed the refutation in between):
            # a fresh suspicion, so that its Dead carries the incarnation others hold.
            self._cancel_suspicion(name)
        elif old.state is not _ALIVE:
            return
        new = Member(name, old.addr, msg.incarnation, _SUSPECT, old.meta, old.meta_version)
        self._put(old, new)
        self._event(EventKind.SUSPECT, new)
        self._rumour(name, raw, msg, _PRIO_SUSPECT)
        self._ensure_gossip(now)
        cfg = self.config
        n = self._live
        max_s = cfg.suspicion_max_s(n)
        if cfg.lifeguard:
            k = cfg.indirect_checks if n - 2 >= cfg.indirect_checks else 0
            min_s = cfg.suspicion_min_s(n)
        else:
            k = 0
            min_s = max_s = cfg.suspicion_min_s(n) if cfg.baseline_suspicion_at_min else max_s
        susp = Suspicion(
            msg.accuser, incarnation=msg.incarnation, k=k, min_s=min_s, max_s=max_s, start=now
        )
        self._suspicions[name] = susp
        self._arm_suspicion(now, susp, name)

    def _arm_suspicion(self, now: float, susp: Suspicion, name: str | None = None) -> None:
        if susp.timer is not None:
            susp.timer[0] = False
            name = susp.timer[2]  # type: ignore[assignment]
        # A late confirmation can pull the deadline into the past: then it is due now.
        susp.timer = self._schedule(max(now, susp.deadline()), _T_SUSPICION, name)

    def _cancel_suspicion(self, name: str) -> None:
        susp = self._suspicions.pop(name, None)
        if susp is not None and susp.timer is not None:
            susp.timer[0] = False

    def _suspicion_expired(self, now: float, name: str) -> None:
        susp = self._suspicions.get(name)
        m = self._get(name)
        if susp is None or m is None or m.state is not _SUSPECT:
            return
        self._stats["deads_declared"] += 1
        dead = Dead(name, m.incarnation, self.name)
        self._on_gone(now, name, m.incarnation, None, dead)

    def _on_gone(
        self, now: float, name: str, incarnation: int, raw: bytes | None, msg: Dead | Left | None
    ) -> None:
        """A Dead or Left rumour (``msg`` None: LEFT from a push-pull table)."""
        left = msg is None or type(msg) is Left
        old = self._get(name)
        if old is None or incarnation < old.incarnation or old.state in _GONE_STATES:
            return
        if name == self.name:
            if not self._left:
                self._refute(now, incarnation)
            return
        self._cancel_suspicion(name)
        state = _LEFT if left else _DEAD
        new = Member(name, old.addr, incarnation, state, old.meta, old.meta_version)
        self._put(old, new)
        self._since[name] = now
        self._schedule(now + self.config.tombstone_s, _T_REAP, name)
        self._event(EventKind.LEFT if left else EventKind.DEAD, new)
        if msg is None:
            msg = Left(name, incarnation)
        self._rumour(name, raw, msg, _PRIO_DEAD)
        self._ensure_gossip(now)

    def _refute(self, now: float, seen_incarnation: int) -> None:
        me = self._self
        inc = max(me.incarnation, seen_incarnation) + 1
        if inc >= _MAX_INCARNATION:
            self._stats["bad_packets"] += 1  # only a hostile peer gets here; cannot out-bid
            return
        self._set_self(Member(me.name, me.addr, inc, _ALIVE, me.meta, me.meta_version))
        self._stats["refutes"] += 1
        self._adjust_health(1)
        self._queue_self_alive()
        self._ensure_gossip(now)

    def _reap(self, now: float, name: str) -> None:
        since = self._since.get(name)
        m = self._get(name)
        if since is None or m is None or m.state not in _GONE_STATES:
            return
        if now - since < self.config.tombstone_s - 1e-9:
            return  # it died again later; that death has its own reap timer
        self._forget(m)
        if m.state is _DEAD and self.config.reconnect_s > 0:
            # Forgotten, but still worth a push-pull now and then: if it was only cut off
            # by a partition, that exchange is what brings the two halves back together.
            self._reconnect[m.name] = (m.addr, now)
        self._event(EventKind.REAPED, m)

    # ================================================================== gossip, push-pull

    def _gossip(self, now: float) -> None:
        self._gossip_timer = None
        if not self._queue:
            return
        to_dead_s = self.config.gossip_to_dead_s
        since = self._since

        def eligible(m: Member) -> bool:
            if m.state in _LIVE_STATES:
                return True
            return m.state is _DEAD and now - since.get(m.name, -math.inf) < to_dead_s

        limit = self._retransmit_limit()
        budget = self._budget - COMPOUND_OVERHEAD_BYTES
        for target in self._sample(self.config.gossip_nodes, eligible):
            parts = self._queue.take(budget, limit)
            if not parts:
                break
            self._stats["gossip_packets_sent"] += 1
            self._emit(
                target.addr, parts[0] if len(parts) == 1 else codec.encode(Compound(tuple(parts)))
            )
        self._ensure_gossip(now)

    def _schedule_push_pull(self, now: float, first: bool = False) -> None:
        if self._push_pull_timer is not None:
            self._push_pull_timer[0] = False
        interval = self.config.push_pull_interval_for(self._live)
        # The first exchange is staggered over a whole interval so a cluster started at
        # once does not synchronise its push-pulls.
        delay = self.rng.random() * interval if first else interval
        self._push_pull_timer = self._schedule(now + delay, _T_PUSH_PULL, None)

    def _push_pull(self, now: float) -> None:
        self._push_pull_timer = None
        if self._left:
            return
        self._schedule_push_pull(now)
        addr: str | None = None
        if (self._since or self._reconnect) and self.rng.random() < 0.5:
            dead = [n for n, _ in self._since.items() if self._is_dead(n)]
            if dead:
                addr = self._get(dead[self.rng.randrange(len(dead))]).addr  # type: ignore[union-attr]
            else:
                addr = self._reconnect_addr(now)
        if addr is None:
            picked = self._sample(1, lambda m: m.state is _ALIVE)
            addr = picked[0].addr if picked else None
        if addr is not None:
            self._stats["push_pulls_started"] += 1
            self._out_push_pulls.append(addr)

    def _reconnect_addr(self, now: float) -> str | None:
        horizon = now - self.config.reconnect_s
        for name in [n for n, (_a, t) in self._reconnect.items() if t < horizon]:
            del self._reconnect[name]
        if not self._reconnect:
            return None
        names = list(self._reconnect)
        return self._reconnect[names[self.rng.randrange(len(names))]][0]

    def _is_dead(self, name: str) -> bool:
        m = self._get(name)
        return m is not None and m.state is _DEAD

    def _join_attempt(self, now: float) -> None:
        self._stats["join_attempts"] += 1
        self._out_push_pulls.extend(self._join_seeds)
        self._join_timer = self._schedule(now + self._join_delay_s, _T_JOIN_RETRY, None)
        self._join_delay_s = min(self._join_delay_s * 2, self.config.join_retry_max_s)

    def _join_retry(self, now: float) -> None:
        self._join_timer = None
        if self._joining and not self._left:
            self._join_attempt(now)

    def _finish_join(self) -> None:
        self._joining = False
        if self._join_timer is not None:
            self._join_timer[0] = False
            self._join_timer = None
