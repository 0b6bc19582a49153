"""Scripted scenarios for every rule of the SWIM + Lifeguard core (tier 1, sync)."""

from __future__ import annotations

import ast
import math
import pathlib
import random

import pytest

from p2porch.common import codec
from p2porch.gossip import core as core_module
from p2porch.gossip.config import GossipConfig
from p2porch.gossip.core import Suspicion, SwimCore
from p2porch.gossip.errors import GossipError, MetaTooLarge, NotRunning
from p2porch.gossip.messages import (
    Alive,
    Compound,
    Dead,
    EventKind,
    MemberState,
    Ping,
    PushPullState,
    Suspect,
)
from tests.unit.gossip.helpers import Net, addr_of

DEFAULT = GossipConfig(tcp_fallback=False)


def parts_of(data: bytes) -> list[object]:
    msg = codec.decode(data, codec.any_record())
    if isinstance(msg, Compound):
        return [codec.decode(p, codec.any_record()) for p in msg.parts]
    return [msg]


# --------------------------------------------------------------------------- probing


def test_probe_gets_ack_and_nobody_is_suspected() -> None:
    net = Net(DEFAULT, ["a", "b"])
    net.run_for(10.0)
    a = net.core("a").stats()
    assert a["pings_sent"] >= 9
    assert a["acks_received"] == a["pings_sent"]
    assert a["suspects_raised"] == 0
    assert net.core("a").member("b").state is MemberState.ALIVE  # type: ignore[union-attr]
    assert net.core("a").local_health() == 0


def test_each_pass_probes_every_member_once_in_a_fresh_order() -> None:
    names = [f"m{i}" for i in range(10)]
    net = Net(DEFAULT, names)
    net.frozen = set(names[1:])  # only m0 probes; the others just answer
    net.run_for(0.999 + 18)  # the first probe lands within the first interval
    pings = [
        dst
        for _t, src, dst, data in net.packets
        if src == "m0" and any(isinstance(p, Ping) for p in parts_of(data))
    ]
    first, second = pings[:9], pings[9:18]
    assert sorted(first) == sorted(names[1:])
    assert sorted(second) == sorted(names[1:])
    assert first != second


def test_indirect_probe_rescues_a_member_we_cannot_reach_directly() -> None:
    net = Net(DEFAULT, ["a", "b", "c", "d"])
    net.drop |= {("a", "c"), ("c", "a")}
    net.run_for(30.0)
    a = net.core("a")
    assert a.stats()["indirect_pings_sent"] > 0
    assert a.stats()["probes_failed"] == 0
    assert not net.events_of("a", EventKind.SUSPECT, "c")
    assert a.member("c").state is MemberState.ALIVE  # type: ignore[union-attr]


def test_tcp_fallback_probe_rescues_a_member_when_udp_is_cut() -> None:
    net = Net(GossipConfig(), ["a", "b"])
    net.drop |= {("a", "b"), ("b", "a")}
    net.run_for(10.0)
    assert net.core("a").stats()["tcp_pings_sent"] > 0
    assert net.core("b").stats()["tcp_pings_answered"] > 0
    assert not net.events_of("a", EventKind.SUSPECT, "b")


def _first_suspect_then_dead(net: Net, observer: str, about: str) -> tuple[float, float]:
    (t_s, _), *_ = net.events_of(observer, EventKind.SUSPECT, about)
    (t_d, _), *_ = net.events_of(observer, EventKind.DEAD, about)
    return t_s, t_d


def test_unconfirmed_suspicion_waits_the_max_timeout() -> None:
    names = ["a", "b", "c", "d", "x"]
    net = Net(DEFAULT, names, running=["a", "b", "c", "d"])
    net.frozen = {"b", "c", "d"}  # they answer and relay but never accuse x themselves
    net.run_for(60.0)
    t_s, t_d = _first_suspect_then_dead(net, "a", "x")
    assert t_d - t_s == pytest.approx(DEFAULT.suspicion_max_s(5))  # 24 s at N=5


def test_confirmations_shrink_the_suspicion_to_the_min_timeout() -> None:
    names = ["a", "b", "c", "d", "x"]
    net = Net(DEFAULT, names, running=["a", "b", "c", "d"])
    net.frozen = {"b", "c", "d"}
    while not net.events_of("a", EventKind.SUSPECT, "x"):
        net.run_for(0.1)
    a = net.core("a")
    for accuser in ("b", "c", "d"):
        a.receive_packet(net.now, addr_of(accuser), codec.encode(Suspect("x", 0, accuser)))
    net.run_for(60.0)
    t_s, t_d = _first_suspect_then_dead(net, "a", "x")
    assert t_d - t_s == pytest.approx(DEFAULT.suspicion_min_s(5), abs=0.11)  # 4 s


def test_without_lifeguard_the_timeout_is_fixed() -> None:
    for at_min in (False, True):
        cfg = GossipConfig(tcp_fallback=False, lifeguard=False, baseline_suspicion_at_min=at_min)
        net = Net(cfg, ["a", "b", "c", "d", "x"], running=["a", "b", "c", "d"])
        net.frozen = {"b", "c", "d"}
        while not net.events_of("a", EventKind.SUSPECT, "x"):
            net.run_for(0.1)
        for accuser in ("b", "c", "d"):  # confirmations change nothing
            net.core("a").receive_packet(
                net.now, addr_of(accuser), codec.encode(Suspect("x", 0, accuser))
            )
        net.run_for(60.0)
        t_s, t_d = _first_suspect_then_dead(net, "a", "x")
        want = cfg.suspicion_min_s(5) if at_min else cfg.suspicion_max_s(5)
        assert t_d - t_s == pytest.approx(want, abs=0.11)


def test_suspicion_arithmetic_follows_the_lifeguard_formula() -> None:
    s = Suspicion("a", incarnation=0, k=3, min_s=4.0, max_s=24.0, start=10.0)
    assert s.deadline() == pytest.approx(34.0)
    assert s.confirm("b")
    assert s.deadline() == pytest.approx(10 + 24 - 20 * math.log(2) / math.log(4))
    assert not s.confirm("b")  # the same accuser counts once
    assert not s.confirm("a")  # nor does the first accuser
    assert s.confirm("c") and s.confirm("d")
    assert s.deadline() == pytest.approx(14.0)
    assert not s.confirm("e")  # k reached: the floor is min_s
    assert Suspicion("a", incarnation=0, k=0, min_s=4.0, max_s=24.0, start=0).deadline() == 4.0


def test_dead_rumour_overrides_everyone_and_crash_is_detected_cluster_wide() -> None:
    names = ["a", "b", "c", "d", "e"]
    net = Net(DEFAULT, names)
    net.run_for(5.0)
    net.down.add("e")
    net.run_for(60.0)
    for observer in "abcd":
        dead = net.events_of(observer, EventKind.DEAD, "e")
        assert len(dead) == 1
        assert net.core(observer).member("e").state is MemberState.DEAD  # type: ignore[union-attr]
    assert sum(net.core(n).stats()["deads_declared"] for n in "abcd") >= 1


# --------------------------------------------------------------------------- refutation


def test_suspected_member_refutes_with_a_higher_incarnation() -> None:
    net = Net(DEFAULT, ["a", "b", "c"])
    a = net.core("a")
    a.receive_packet(0.0, addr_of("c"), codec.encode(Suspect("b", 0, "c")))
    net.run_for(3.0)
    assert net.events_of("a", EventKind.SUSPECT, "b")
    (_, alive), *_ = net.events_of("a", EventKind.ALIVE, "b")
    assert alive.member.incarnation == 1
    assert net.core("b").incarnation == 1
    assert net.core("b").stats()["refutes"] == 1
    assert not net.events_of("a", EventKind.DEAD, "b")


def test_ping_to_a_suspect_carries_the_suspicion_only_with_lifeguard() -> None:
    for lifeguard in (True, False):
        cfg = GossipConfig(tcp_fallback=False, lifeguard=lifeguard)
        net = Net(cfg, ["a", "b"])
        net.frozen = {"b"}
        net.down.add("b")  # b hears nothing: we only inspect what a sends
        net.core("a").receive_packet(0.0, addr_of("z"), codec.encode(Suspect("b", 0, "z")))
        net.run_for(2.0)
        carried = [
            p
            for _t, src, dst, data in net.packets
            if src == "a" and dst == "b" and any(isinstance(x, Ping) for x in parts_of(data))
            for p in parts_of(data)
            if isinstance(p, Suspect) and p.accuser == "a"
        ]
        assert bool(carried) is lifeguard


def test_dead_member_is_not_revived_by_a_stale_alive() -> None:
    net = Net(DEFAULT, ["a", "b"])
    a = net.core("a")
    net.down.add("b")
    a.receive_packet(0.0, addr_of("z"), codec.encode(Dead("b", 3, "z")))
    a.receive_packet(0.0, addr_of("z"), codec.encode(Alive("b", addr_of("b"), 3)))
    assert a.member("b").state is MemberState.DEAD  # type: ignore[union-attr]
    a.receive_packet(0.0, addr_of("z"), codec.encode(Alive("b", addr_of("b"), 4)))
    assert a.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]


# --------------------------------------------------------------------------- leave, rejoin


def test_graceful_leave_is_left_not_dead() -> None:
    net = Net(DEFAULT, ["a", "b", "c"])
    net.run_for(3.0)
    b = net.core("b")
    b.leave(net.now)
    net.run_for(1.0)
    pings_after_leave = b.stats()["pings_sent"]
    net.down.add("b")
    net.run_for(60.0)
    for observer in "ac":
        assert net.events_of(observer, EventKind.LEFT, "b")
        assert not net.events_of(observer, EventKind.DEAD, "b")
        assert net.core(observer).member("b").state is MemberState.LEFT  # type: ignore[union-attr]
    assert b.stats()["pings_sent"] == pings_after_leave
    with pytest.raises(NotRunning):
        b.set_meta(net.now, b"x")


def test_restarted_node_refutes_its_own_death_and_rejoins() -> None:
    net = Net(DEFAULT, ["a", "b", "c"])
    net.run_for(3.0)
    net.down.add("b")
    net.run_for(60.0)
    assert net.core("a").member("b").state is MemberState.DEAD  # type: ignore[union-attr]
    dead_inc = net.core("a").member("b").incarnation  # type: ignore[union-attr]
    b = net.add("b", incarnation=0)
    b.join(net.now, [addr_of("a")])
    net.run_for(5.0)
    assert b.incarnation > dead_inc
    for observer in "ac":
        seen = net.core(observer).member("b")
        assert seen is not None and seen.state is MemberState.ALIVE
        assert seen.incarnation == b.incarnation
        assert net.events_of(observer, EventKind.JOINED, "b")
    assert len([m for m in b.members() if m.state is MemberState.ALIVE]) == 3


def test_join_retries_with_exponential_back_off_until_a_seed_answers() -> None:
    a = SwimCore(DEFAULT, "a", addr_of("a"), random.Random(1), 0.0)
    a.join(0.0, [addr_of("z"), addr_of("a")])  # our own address is not a seed
    attempts = []
    now = 0.0
    while now < 20:
        ready = a.ready()
        if ready.push_pulls:
            assert ready.push_pulls == (addr_of("z"),)
            attempts.append(now)
        now = a.next_deadline()
        a.tick(now)
    assert attempts[:5] == [0.0, 1.0, 3.0, 7.0, 15.0]
    # one answer ends the retries
    b = SwimCore(DEFAULT, "z", addr_of("z"), random.Random(2), now)
    a.merge_remote_state(now, b.local_state(now, False), False)
    a.ready()
    for _ in range(200):
        now = a.next_deadline()
        a.tick(now)
        assert not a.ready().push_pulls or now > 25  # only periodic push-pulls remain


def test_tombstones_are_reaped_after_tombstone_s() -> None:
    cfg = GossipConfig.local(tcp_fallback=False)
    net = Net(cfg, ["a", "b", "c"])
    net.down.add("c")
    net.run_for(10.0)
    (t_dead, _), *_ = net.events_of("a", EventKind.DEAD, "c")
    net.run_until(t_dead + cfg.tombstone_s + 1)
    (t_reap, ev), *_ = net.events_of("a", EventKind.REAPED, "c")
    assert t_reap == pytest.approx(t_dead + cfg.tombstone_s)
    assert net.core("a").member("c") is None
    assert "c" not in {m.name for m in net.core("a").members()}


# --------------------------------------------------------------------------- local health


def test_failed_probes_without_nacks_raise_local_health_and_acks_lower_it() -> None:
    net = Net(DEFAULT, ["a", "b"])
    net.down.add("b")
    net.run_for(4.0)
    a = net.core("a")
    assert a.local_health() >= 2  # no relay could vouch for us
    net.down.discard("b")
    net.run_for(60.0)
    assert a.local_health() == 0


def test_nacks_from_relays_keep_local_health_low() -> None:
    net = Net(DEFAULT, ["a", "b", "c", "d", "x"], running=["a", "b", "c", "d"])
    net.frozen = {"b", "c", "d"}
    net.run_for(5.0)
    assert net.core("a").stats()["nacks_received"] == 0  # frozen relays cannot nack
    net2 = Net(DEFAULT, ["a", "b", "c", "d", "x"], running=["a", "b", "c", "d"])
    net2.run_for(12.0)
    a = net2.core("a")
    assert a.stats()["probes_failed"] >= 1
    assert a.stats()["nacks_received"] >= 3
    assert a.local_health() == 0


def test_local_health_is_off_without_lifeguard() -> None:
    net = Net(GossipConfig(tcp_fallback=False, lifeguard=False), ["a", "b"])
    net.down.add("b")
    net.run_for(10.0)
    assert net.core("a").local_health() == 0


def test_local_health_stretches_the_probe_interval() -> None:
    net = Net(DEFAULT, ["a", "b"])
    net.down.add("b")
    net.run_for(12.0)
    pings = [
        t
        for t, src, _dst, data in net.packets
        if src == "a" and any(isinstance(p, Ping) for p in parts_of(data))
    ]
    gaps = [round(b - a, 6) for a, b in zip(pings, pings[1:], strict=False)]
    # every failed probe (no relay to nack for us) adds one to health: 1 s, 2 s, 3 s, ...
    assert gaps[:2] == [1.0, 2.0]  # (b is declared dead after 4 s: N=2 means k=0, min)


# --------------------------------------------------------------------------- dissemination


def test_metadata_update_reaches_everyone_with_updated_events() -> None:
    names = [f"m{i}" for i in range(8)]
    net = Net(DEFAULT, names)
    net.core("m3").set_meta(0.0, b"labels=gpu")
    net.run_for(3.0)
    for observer in names:
        if observer == "m3":
            continue
        seen = net.core(observer).member("m3")
        assert seen is not None and seen.meta == b"labels=gpu" and seen.meta_version == 1
        assert len(net.events_of(observer, EventKind.UPDATED, "m3")) == 1


def test_meta_too_large_is_a_clear_error() -> None:
    cfg = GossipConfig(max_meta_bytes=64)
    core = SwimCore(cfg, "a", addr_of("a"), random.Random(1), 0.0)
    with pytest.raises(MetaTooLarge) as info:
        core.set_meta(0.0, b"x" * 65)
    assert isinstance(info.value, GossipError)
    assert "64" in str(info.value)
    core.set_meta(0.0, b"x" * 64)
    with pytest.raises(MetaTooLarge):
        SwimCore(cfg, "b", addr_of("b"), random.Random(1), 0.0, meta=b"y" * 100)
    # a peer's oversized metadata is dropped and counted
    core.receive_packet(0.0, "z", codec.encode(Alive("q", addr_of("q"), 0, b"m" * 100)))
    assert core.member("q") is None
    assert core.stats()["oversized_meta_dropped"] == 1


def test_gossip_packets_fill_but_never_exceed_the_budget() -> None:
    cfg = GossipConfig(tcp_fallback=False, encryption_overhead_bytes=100)
    names = [f"m{i:02d}" for i in range(40)]
    net = Net(cfg, names)
    a = net.core("m00")
    for i in range(40):  # rumours about 40 members (not running here) with big metadata
        name = f"x{i:02d}"
        a.receive_packet(0.0, "z", codec.encode(Alive(name, addr_of(name), 1, bytes([i]) * 300)))
    net.run_for(6.0)
    sizes = [len(d) for _t, src, _dst, d in net.packets if src == "m00"]
    assert max(sizes) <= cfg.udp_budget_bytes
    assert max(sizes) > cfg.udp_budget_bytes - 330  # packed, not one rumour per packet
    for observer in names[1:]:
        assert net.core(observer).member("x07").meta == bytes([7]) * 300  # type: ignore[union-attr]


def test_each_rumour_is_retransmitted_a_bounded_number_of_times() -> None:
    names = [f"m{i}" for i in range(5)]
    net = Net(DEFAULT, names)
    net.frozen = set(names)  # no probes: only gossip rounds carry the rumour
    a = net.core("m0")
    a.set_meta(0.0, b"v1")
    limit = DEFAULT.retransmit_limit(5)
    sent = 0
    now = 0.0
    for _ in range(100):
        now += DEFAULT.gossip_interval_s
        a.tick(now)
        sent += sum(1 for p in a.ready().packets for x in parts_of(p.data) if isinstance(x, Alive))
    assert sent == limit
    assert a.queued_broadcasts == 0


# --------------------------------------------------------------------------- push-pull


def test_push_pull_merges_tables_both_ways_and_skips_equal_ones() -> None:
    net = Net(DEFAULT, ["a", "b"], bootstrap=False)
    a, b = net.core("a"), net.core("b")
    a.receive_packet(0.0, "z", codec.encode(Alive("c", addr_of("c"), 2)))
    b.receive_packet(0.0, "z", codec.encode(Alive("d", addr_of("d"), 5)))
    sa, sb = a.local_state(0.0, False), b.local_state(0.0, False)
    b.merge_remote_state(0.0, sa, False)
    a.merge_remote_state(0.0, sb, False)
    assert {m.name for m in a.members()} == {"a", "b", "c", "d"}
    assert {m.name for m in b.members()} == {"a", "b", "c", "d"}
    assert a.member("d").incarnation == 5  # type: ignore[union-attr]
    assert a.digest == b.digest
    a.merge_remote_state(0.0, b.local_state(0.0, False), False)
    assert a.stats()["push_pulls_same_digest"] == 1


def test_remote_dead_is_only_a_suspicion_here() -> None:
    net = Net(DEFAULT, ["a", "b", "c"])
    a = net.core("a")
    remote = SwimCore(DEFAULT, "r", addr_of("r"), random.Random(5), 0.0)
    remote.receive_packet(0.0, "z", codec.encode(Alive("c", addr_of("c"), 0)))
    remote.receive_packet(0.0, "z", codec.encode(Dead("c", 0, "z")))
    a.merge_remote_state(0.0, remote.local_state(0.0, False), False)
    assert a.member("c").state is MemberState.SUSPECT  # type: ignore[union-attr]


# --------------------------------------------------------------------------- hostile input


def test_garbage_is_counted_never_raised() -> None:
    a = SwimCore(DEFAULT, "a", addr_of("a"), random.Random(1), 0.0)
    garbage = [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        codec.encode(Ping(1, "a", "b"))[:-1],
        b"\x92\xcc\x65\xc0",  # tag 101 with a nil body
    ]
    for data in garbage:
        a.receive_packet(0.0, "z", data)
    assert a.stats()["bad_packets"] == len(garbage)
    mixed = Compound((b"\xff\xff", codec.encode(Alive("q", addr_of("q"), 0))))
    a.receive_packet(0.0, "z", codec.encode(mixed))
    assert a.stats()["bad_packets"] == len(garbage) + 1
    assert a.member("q") is not None  # the good part still counted
    assert a.receive_tcp_ping(0.0, "z", b"junk") is None
    a.merge_remote_state(0.0, b"junk", False)
    a.merge_remote_state(
        0.0, codec.encode(PushPullState("z", "z:1", False, b"\x00" * 16, b"\xc1")), False
    )
    assert a.stats()["bad_packets"] == len(garbage) + 4


def test_ping_for_another_name_is_not_answered() -> None:
    a = SwimCore(DEFAULT, "a", addr_of("a"), random.Random(1), 0.0)
    a.receive_packet(0.0, "z", codec.encode(Ping(7, "someone-else", "z")))
    assert not a.ready().packets
    assert a.stats()["misdirected_pings"] == 1
    assert a.receive_tcp_ping(0.0, "z", codec.encode(Ping(7, "someone-else", "z"))) is None


# --------------------------------------------------------------------------- config, purity


def test_config_checks_and_formulas() -> None:
    with pytest.raises(ValueError):
        GossipConfig(probe_timeout_s=1.0, probe_interval_s=1.0)
    with pytest.raises(ValueError):
        GossipConfig(max_meta_bytes=1300)
    with pytest.raises(ValueError):
        GossipConfig(udp_mtu_bytes=600, encryption_overhead_bytes=200)
    with pytest.raises(ValueError):
        GossipConfig(indirect_checks=-1)
    cfg = GossipConfig()
    assert cfg.suspicion_min_s(1) == 4.0  # log10 clamped to >= 1
    assert cfg.suspicion_min_s(100) == 8.0
    assert cfg.suspicion_max_s(100) == 48.0
    assert cfg.retransmit_limit(9) == 4
    assert cfg.retransmit_limit(10) == 8
    assert cfg.push_pull_interval_for(32) == 30.0
    assert cfg.push_pull_interval_for(10_000) == 300.0
    for preset in (GossipConfig.local, GossipConfig.lan, GossipConfig.wan):
        assert isinstance(preset(), GossipConfig)
    assert GossipConfig.lan(gossip_nodes=5).gossip_nodes == 5


def test_same_seed_same_packets() -> None:
    def trace() -> list[tuple[float, str, str, bytes]]:
        net = Net(DEFAULT, [f"m{i}" for i in range(6)], seed=7)
        net.run_for(5.0)
        net.down.add("m5")
        net.run_for(40.0)
        return net.packets

    assert trace() == trace()


def test_core_imports_nothing_impure() -> None:
    tree = ast.parse(pathlib.Path(core_module.__file__).read_text())
    forbidden = {"trio", "time", "socket", "msgpack", "docker", "asyncio", "threading", "random"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.col_offset == 0:
            names = [node.module.split(".")[0]]
        else:
            continue
        assert not forbidden & set(names), names


def test_suspicion_at_a_newer_incarnation_replaces_the_old_one() -> None:
    net = Net(DEFAULT, ["a", "b", "x"], running=["a", "b"])
    a = net.core("a")
    a.receive_packet(0.0, addr_of("b"), codec.encode(Suspect("x", 0, "b")))
    a.receive_packet(0.0, addr_of("b"), codec.encode(Suspect("x", 1, "b")))
    seen = a.member("x")
    assert seen is not None and seen.state is MemberState.SUSPECT and seen.incarnation == 1
    susp = a.suspicion("x")
    assert susp is not None and susp.incarnation == 1


def test_late_confirmations_make_an_overdue_suspicion_fire_at_once() -> None:
    net = Net(DEFAULT, ["a", "b", "c", "d", "x"], running=["a", "b", "c", "d"])
    net.frozen = {"b", "c", "d"}
    while not net.events_of("a", EventKind.SUSPECT, "x"):
        net.run_for(0.1)
    (t_s, _), *_ = net.events_of("a", EventKind.SUSPECT, "x")
    net.run_until(t_s + 20.0)  # min is 4 s: three confirmations now are long overdue
    a = net.core("a")
    for accuser in ("b", "c", "d"):
        a.receive_packet(net.now, addr_of(accuser), codec.encode(Suspect("x", 0, accuser)))
    assert a.next_deadline() == pytest.approx(net.now)
    net.run_for(0.001)
    (t_d, _), *_ = net.events_of("a", EventKind.DEAD, "x")
    assert t_d == pytest.approx(t_s + 20.0)


def test_reaped_dead_members_are_still_tried_for_push_pull() -> None:
    cfg = GossipConfig.local(tcp_fallback=False)
    net = Net(cfg, ["a", "b"])
    net.down.add("b")
    net.run_for(cfg.tombstone_s + 10)
    a = net.core("a")
    assert a.member("b") is None  # reaped
    before = a.stats()["push_pulls_started"]
    net.run_for(10 * cfg.push_pull_interval_s)
    assert a.stats()["push_pulls_started"] > before  # only b's old address is left to try
    net.down.discard("b")
    net.run_for(2 * cfg.push_pull_interval_s)
    assert a.member("b") is not None and a.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]


def test_an_unbeatable_incarnation_is_refused_not_raised() -> None:
    a = SwimCore(DEFAULT, "a", addr_of("a"), random.Random(1), 0.0)
    a.receive_packet(0.0, "z", codec.encode(Suspect("a", 2**63 - 1, "z")))
    assert a.incarnation == 0
    assert a.stats()["bad_packets"] == 1
