"""Gossip configuration: one frozen attrs class, validated, with presets.

The defaults are hashicorp/memberlist's LAN defaults (what Consul and Nomad ship); the
presets trade detection speed against false alarms for a given network.

Formulas (N = estimated number of members, i.e. alive + suspect, including this node):

* Lifeguard suspicion timeout, memberlist's shape::

      min_s = suspicion_mult * max(1, log10(max(1, N))) * probe_interval_s
      max_s = suspicion_max_timeout_mult * min_s
      k     = indirect_checks            (expected independent confirmations;
                                          0 when N - 2 < k: too few peers to confirm)
      timeout(c) = max(min_s, max_s - (max_s - min_s) * log(c + 1) / log(k + 1))

  where ``c`` is the number of distinct *other* members that also suspected the member. A
  suspicion nobody confirms waits ``max_s`` (plenty of time to refute); one that k peers
  confirm fires after ``min_s``. With ``lifeguard=False`` the timeout is fixed at ``max_s``.

* Local health (Lifeguard's "awareness", 0..awareness_max_multiplier-1): the node's own
  probe interval and probe timeout are multiplied by ``(health + 1)``. Health rises when our
  probes fail without the relays' nacks (we are the slow one), and when we must refute a
  suspicion about ourselves; it falls with every timely ack.

* Retransmissions of one rumour: ``retransmit_mult * ceil(log10(N + 1))``.

* Push-pull interval, scaled up for big clusters (memberlist's pushPullScale)::

      interval = push_pull_interval_s                              if N <= 32
      interval = push_pull_interval_s * (ceil(log2(N) - log2(32)) + 1)  otherwise

* The UDP budget for one datagram is ``udp_mtu_bytes - encryption_overhead_bytes``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

PUSH_PULL_SCALE_THRESHOLD = 32


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class GossipConfig:
    """Timing, fan-out and size knobs of SWIM + Lifeguard. Units are in the field names."""

    probe_interval_s: float = attrs.field(default=1.0, validator=_positive)
    probe_timeout_s: float = attrs.field(default=0.5, validator=_positive)
    indirect_checks: int = attrs.field(default=3, validator=_non_negative)
    retransmit_mult: int = attrs.field(default=4, validator=_positive)
    suspicion_mult: int = attrs.field(default=4, validator=_positive)
    suspicion_max_timeout_mult: int = attrs.field(default=6, validator=_positive)
    push_pull_interval_s: float = attrs.field(default=30.0, validator=_positive)
    gossip_interval_s: float = attrs.field(default=0.2, validator=_positive)
    gossip_nodes: int = attrs.field(default=3, validator=_positive)
    #: Dead members still receive gossip this long, so they can learn it and refute.
    gossip_to_dead_s: float = attrs.field(default=30.0, validator=_non_negative)
    udp_mtu_bytes: int = attrs.field(default=1400, validator=_positive)
    #: Bytes the shell's encryption adds to each datagram; subtracted from the MTU.
    encryption_overhead_bytes: int = attrs.field(default=0, validator=_non_negative)
    max_meta_bytes: int = attrs.field(default=512, validator=_non_negative)
    awareness_max_multiplier: int = attrs.field(default=8, validator=_positive)
    #: A DEAD/LEFT member's name may be taken by a *different address* after this long
    #: (0 = only after the tombstone is reaped).
    dead_node_reclaim_s: float = attrs.field(default=0.0, validator=_non_negative)
    #: DEAD/LEFT records are kept this long (to reject stale rumours), then reaped.
    tombstone_s: float = attrs.field(default=120.0, validator=_positive)
    #: Reaped DEAD members' addresses are still tried for push-pull this long, so that a
    #: partition longer than tombstone_s still heals (0 = never).
    reconnect_s: float = attrs.field(default=3600.0, validator=_non_negative)
    #: Probe over TCP too when the UDP probe times out (catches UDP-only breakage).
    tcp_fallback: bool = True
    #: First retry of a join after this long; doubles per attempt up to join_retry_max_s.
    join_retry_initial_s: float = attrs.field(default=1.0, validator=_positive)
    join_retry_max_s: float = attrs.field(default=30.0, validator=_positive)
    #: Lifeguard refinements (dynamic suspicion, local health, nacks, suspect piggyback).
    lifeguard: bool = True
    #: Only with lifeguard=False: the fixed suspicion timeout is min_s (classic SWIM, i.e.
    #: memberlist before Lifeguard) instead of max_s. For benchmarks comparing both baselines.
    baseline_suspicion_at_min: bool = False

    def __attrs_post_init__(self) -> None:
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ValueError("probe_timeout_s must be shorter than probe_interval_s")
        if self.gossip_interval_s > self.probe_interval_s * 10:
            raise ValueError("gossip_interval_s is unreasonably long next to probe_interval_s")
        if self.udp_budget_bytes < 512:
            raise ValueError("udp_mtu_bytes - encryption_overhead_bytes must be >= 512")
        if self.max_meta_bytes > min(4096, self.udp_budget_bytes - 256):
            raise ValueError(
                "max_meta_bytes must leave room for the rest of an Alive message in one "
                "datagram (<= budget - 256 and <= 4096)"
            )
        if self.tombstone_s < self.gossip_to_dead_s:
            raise ValueError("tombstone_s must be >= gossip_to_dead_s")
        if self.join_retry_max_s < self.join_retry_initial_s:
            raise ValueError("join_retry_max_s must be >= join_retry_initial_s")

    # ------------------------------------------------------------------ derived values

    @property
    def udp_budget_bytes(self) -> int:
        """Largest plaintext datagram the core may produce."""
        return self.udp_mtu_bytes - self.encryption_overhead_bytes

    def suspicion_min_s(self, n: int) -> float:
        node_scale = max(1.0, math.log10(max(1, n)))
        return self.suspicion_mult * node_scale * self.probe_interval_s

    def suspicion_max_s(self, n: int) -> float:
        return self.suspicion_max_timeout_mult * self.suspicion_min_s(n)

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def push_pull_interval_for(self, n: int) -> float:
        if n <= PUSH_PULL_SCALE_THRESHOLD:
            return self.push_pull_interval_s
        mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
        return self.push_pull_interval_s * mult

    # ------------------------------------------------------------------ presets

    @classmethod
    def local(cls, **overrides: Any) -> GossipConfig:
        """One machine / loopback (tests, demos): sub-millisecond RTTs, no real loss.

        probe 0.2 s (timeout 0.05 s), gossip 0.05 s, suspicion min = 3 * 0.2 s * scale,
        max = 3 * min, push-pull 5 s, tombstones 30 s.
        """
        base: dict[str, Any] = dict(
            probe_interval_s=0.2,
            probe_timeout_s=0.05,
            suspicion_mult=3,
            suspicion_max_timeout_mult=3,
            gossip_interval_s=0.05,
            push_pull_interval_s=5.0,
            gossip_to_dead_s=10.0,
            tombstone_s=30.0,
            join_retry_initial_s=0.2,
            join_retry_max_s=5.0,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def lan(cls, **overrides: Any) -> GossipConfig:
        """A switched LAN, tuned for crash -> dead-everywhere in <= ~3 s at N = 10.

        Trade-off against memberlist's defaults (GossipConfig()): probes every 0.5 s with a
        0.2 s ack timeout (LAN RTTs are < 1 ms, so 0.2 s still absorbs scheduling hiccups),
        suspicion min = 2 * 0.5 s * max(1, log10 N) (1 s at N = 10, 2 s at N = 100) and
        max = 3 * min. Twice the probe traffic of the defaults and less slack for a paused
        peer to refute: Lifeguard's local health and the max-until-confirmed timeout are what
        keep false alarms down.
        """
        base: dict[str, Any] = dict(
            probe_interval_s=0.5,
            probe_timeout_s=0.2,
            suspicion_mult=2,
            suspicion_max_timeout_mult=3,
            gossip_interval_s=0.1,
            push_pull_interval_s=30.0,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def wan(cls, **overrides: Any) -> GossipConfig:
        """Across the internet (memberlist's WAN shape): RTTs of 10-300 ms, real loss.

        probe 5 s (timeout 3 s), suspicion_mult 6 (min = 30 s * max(1, log10 N)), gossip 0.5 s
        to 4 nodes, push-pull 60 s, 60 s of gossip to the dead.
        """
        base: dict[str, Any] = dict(
            probe_interval_s=5.0,
            probe_timeout_s=3.0,
            suspicion_mult=6,
            gossip_interval_s=0.5,
            gossip_nodes=4,
            push_pull_interval_s=60.0,
            gossip_to_dead_s=60.0,
            tombstone_s=300.0,
        )
        base.update(overrides)
        return cls(**base)
