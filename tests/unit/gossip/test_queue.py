"""The transmit-limited broadcast queue and the wire records."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2porch.common import codec
from p2porch.common.errors import CodecError
from p2porch.gossip.messages import (
    Alive,
    Compound,
    Member,
    MemberState,
    Packet,
    Ping,
    PushPullState,
    Suspect,
)
from p2porch.gossip.queue import COMPOUND_OVERHEAD_BYTES, BroadcastQueue, part_cost
from p2porch.gossip.table import MemberSnapshot, member_digest


def test_newer_rumour_about_a_member_invalidates_the_older() -> None:
    q = BroadcastQueue()
    q.queue("x", b"suspect-x", 2)
    q.take(1000, 10)
    q.queue("x", b"alive-x", 1)
    assert len(q) == 1
    assert q.peek("x") == b"alive-x"
    assert q.transmits("x") == 0  # a fresh rumour starts its own count


def test_each_rumour_leaves_after_limit_transmissions() -> None:
    q = BroadcastQueue()
    q.queue("a", b"aaaa", 1)
    sent = 0
    while q:
        sent += len(q.take(1000, 3))
    assert sent == 3


def test_fewest_transmissions_then_priority_then_newest_first() -> None:
    q = BroadcastQueue()
    q.queue("old", b"o" * 10, 1)
    q.take(1000, 10)  # "old" has been sent once
    q.queue("alive", b"a" * 10, 1)
    q.queue("dead", b"d" * 10, 3)
    q.queue("alive2", b"b" * 10, 1)
    assert q.take(1000, 10) == [b"d" * 10, b"b" * 10, b"a" * 10, b"o" * 10]


def test_take_respects_the_byte_budget_and_skips_to_smaller_items() -> None:
    q = BroadcastQueue()
    q.queue("big1", b"1" * 300, 1)
    q.queue("big2", b"2" * 300, 1)
    q.queue("small", b"s" * 20, 1)
    out = q.take(part_cost(300) + part_cost(20) + 10, 10)
    assert out == [b"s" * 20, b"2" * 300]
    assert sum(part_cost(len(p)) for p in out) <= part_cost(300) + part_cost(20) + 10


def test_compound_size_matches_the_accounting() -> None:
    parts = tuple(bytes([i]) * (50 + 40 * i) for i in range(20))
    encoded = codec.encode(Compound(parts))
    assert len(encoded) <= COMPOUND_OVERHEAD_BYTES + sum(part_cost(len(p)) for p in parts)


def test_wire_records_round_trip_and_reject_bad_values() -> None:
    for msg in (
        Ping(1, "a", "b"),
        Alive("a", "127.0.0.2:7946", 3, b"meta", 2),
        Suspect("a", 3, "b"),
        Compound((b"x", b"y")),
    ):
        assert codec.decode(codec.encode(msg), Packet) == msg
    with pytest.raises(ValueError):
        Alive("", "x", 0)
    with pytest.raises(ValueError):
        Ping(-1, "a", "b")
    with pytest.raises(CodecError):
        codec.decode(codec.encode(PushPullState("a", "x", False, b"", b"")), Packet)


def test_snapshot_digest_is_order_independent() -> None:
    members = [Member(f"m{i}", f"h{i}:1", i, MemberState.ALIVE, b"", 0) for i in range(50)]
    a = MemberSnapshot(members)
    b = MemberSnapshot(reversed(members))
    assert a.digest == b.digest
    assert a.live_count == 50
    changed = [*members[:-1], Member("m49", "h49:1", 50, MemberState.ALIVE, b"", 0)]
    assert MemberSnapshot(changed).digest != a.digest
    assert member_digest(members[0]) != member_digest(members[1])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.binary(max_size=60), max_size=5))
def test_hostile_bytes_never_raise_out_of_the_core(data: bytes, parts: list[bytes]) -> None:
    import random

    from p2porch.gossip.config import GossipConfig
    from p2porch.gossip.core import SwimCore

    core = SwimCore(GossipConfig(), "a", "a:1", random.Random(1), 0.0)
    core.receive_packet(0.0, "z:1", data)
    core.receive_packet(0.0, "z:1", codec.encode(Compound(tuple(parts))))
    core.receive_tcp_ping(0.0, "z:1", data)
    core.merge_remote_state(0.0, data, False)
    core.tick(100.0)
    assert core.member("a") is not None
