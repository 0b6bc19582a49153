"""Tuning of the Raft core: one frozen record, validated, with presets per network kind."""

from __future__ import annotations

import attrs

# Deliberately broken behaviours the simulation must catch (see consensus/sim.py).
KNOWN_BUGS: frozenset[str] = frozenset(
    {
        "unpersisted-vote",  # a granted vote is not put in Ready.hard_state
        "commit-old-term",  # the leader commits older-term entries by counting replicas
        "no-log-truncate",  # a follower keeps conflicting entries instead of truncating
    }
)


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen
class RaftConfig:
    """All knobs of the core. Times are in ticks of ``tick_interval_s`` (a grid the shell keeps,
    without necessarily waking at every point of it: see ``RaftCore.ticks_until_due``).

    The election timeout is randomized in ``[election_ticks, 2 * election_ticks)`` at every
    reset, so split votes resolve. Cross-field rules (ValueError otherwise): heartbeats must be
    well inside the election timeout (a follower must hear several before it gives up on the
    leader), and lease reads are only safe with check-quorum, since only check-quorum makes an
    isolated leader step down before a new one can be elected.
    """

    tick_interval_s: float = 0.1
    election_ticks: int = attrs.field(default=10, validator=_positive)
    heartbeat_ticks: int = attrs.field(default=1, validator=_positive)
    max_entries_per_msg: int = attrs.field(default=256, validator=_positive)
    max_bytes_per_msg: int = attrs.field(default=1 << 20, validator=_positive)
    max_inflight_msgs: int = attrs.field(default=64, validator=_positive)
    max_uncommitted_bytes: int = attrs.field(default=64 << 20, validator=_positive)
    snapshot_chunk_bytes: int = attrs.field(default=1 << 20, validator=_positive)
    # A learner is promoted only if it is within this many entries of the leader's last index.
    max_promote_lag_entries: int = attrs.field(default=1000, validator=_positive)
    pre_vote: bool = True
    check_quorum: bool = True
    lease_reads: bool = False
    bugs: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        if self.tick_interval_s <= 0:
            raise ValueError(f"tick_interval_s must be > 0, got {self.tick_interval_s}")
        if self.heartbeat_ticks * 2 > self.election_ticks:
            raise ValueError(
                f"heartbeat_ticks ({self.heartbeat_ticks}) must be at most half of "
                f"election_ticks ({self.election_ticks})"
            )
        if self.lease_reads and not self.check_quorum:
            raise ValueError("lease_reads=True requires check_quorum=True")
        unknown = self.bugs - KNOWN_BUGS
        if unknown:
            raise ValueError(f"unknown bugs {sorted(unknown)}; known: {sorted(KNOWN_BUGS)}")

    @classmethod
    def local(cls) -> RaftConfig:
        """One machine / loopback: fast ticks, quick elections (tests, demos)."""
        return cls(tick_interval_s=0.05, election_ticks=10, heartbeat_ticks=1)

    @classmethod
    def lan(cls) -> RaftConfig:
        """A data-centre or office LAN: ~1 s election timeout."""
        # Heartbeats every 3 ticks (300 ms): 3-6 per election timeout (1-2 s). Raft runs over
        # TCP, so a heartbeat is late rather than lost, and pre-vote keeps a follower that
        # misses a few from disrupting anyone. Each one costs the leader a wake-up and two
        # answers, and every follower a wake-up: with gossip's probes, most of an idle
        # node's CPU (the shell sleeps between them; it does not wake per tick).
        return cls(tick_interval_s=0.1, election_ticks=10, heartbeat_ticks=3)

    @classmethod
    def wan(cls) -> RaftConfig:
        """Links with 100+ ms RTT: slower ticks, a longer timeout, smaller in-flight window."""
        return cls(
            tick_interval_s=0.2,
            election_ticks=15,
            heartbeat_ticks=2,
            max_inflight_msgs=32,
            snapshot_chunk_bytes=256 << 10,
        )
