"""Fuzz the gossip receive path: keyring.open, then the SWIM core's packet handlers.

A real Keyring and a real SwimCore (bootstrapped with three peers) take mutants of valid
datagrams, compound packets, TCP pings, push-pull states and sealed stream frames. The core
must never raise, must count garbage, and must keep producing datagrams within budget.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2porch.common import codec
from p2porch.gossip.keyring import PURPOSE_TCP, PURPOSE_UDP, AuthenticationFailed
from p2porch.gossip.messages import Compound, Ping

from .targets import GossipTarget

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def target() -> GossipTarget:
    return GossipTarget()


def test_seeds_are_accepted_by_the_core(target: GossipTarget) -> None:
    """The seeds are valid traffic: none of the plaintext ones counts as a bad packet."""
    fresh = GossipTarget()
    for data in fresh.seeds():
        fresh.run(data)
    assert fresh.core.stats()["bad_packets"] == 0
    assert fresh.core.stats()["packets_received"] > 0
    assert fresh.core.member("newcomer") is not None  # the Alive seed reached the handler


@settings(FUZZ, max_examples=300)
@given(seed=st.integers(0, 2**32 - 1), mode=st.integers(0, 4))
def test_mutated_traffic_never_breaks_the_core(target: GossipTarget, seed: int, mode: int) -> None:
    target.fresh_core()
    rnd = random.Random(seed)
    seeds = target.seeds()
    pool = [s for s in seeds if s[0] == mode] or seeds
    data = rnd.choice(pool)
    for _ in range(8):
        data = target.mutate(data, rnd, seeds)
        target.run(bytes((mode,)) + data[1:])


@settings(FUZZ, max_examples=150)
@given(parts=st.lists(st.binary(max_size=60), max_size=8), seed=st.integers(0, 2**32 - 1))
def test_compound_of_garbage_and_valid_parts(
    target: GossipTarget, parts: list[bytes], seed: int
) -> None:
    """Valid key, garbage plaintext: a Compound whose parts mix real messages and junk."""
    target.fresh_core()
    rnd = random.Random(seed)
    valid = [codec.encode(m) for m in target._messages()]
    mixed = [p if rnd.random() < 0.5 else rnd.choice(valid) for p in parts]
    target.run(b"\x00" + codec.encode(Compound(tuple(mixed))))


@settings(FUZZ, max_examples=200)
@given(data=st.binary(max_size=200), mode=st.integers(0, 4))
def test_random_bytes_in_every_mode(target: GossipTarget, data: bytes, mode: int) -> None:
    target.fresh_core()
    target.run(bytes((mode,)) + data)


def test_every_bit_flip_and_truncation_of_a_sealed_packet_is_refused(
    target: GossipTarget,
) -> None:
    keyring = target.keyring
    sealed = keyring.seal(codec.encode(Ping(1, "a", "b")), PURPOSE_UDP)
    assert keyring.open(sealed, PURPOSE_UDP)
    forged = [
        sealed[: i // 8] + bytes((sealed[i // 8] ^ (1 << (i % 8)),)) + sealed[i // 8 + 1 :]
        for i in range(len(sealed) * 8)
    ]
    forged += [sealed[:n] for n in range(len(sealed))]
    forged += [sealed + b"\x00"]
    for data in forged:
        with pytest.raises(AuthenticationFailed):
            keyring.open(data, PURPOSE_UDP)
    with pytest.raises(AuthenticationFailed):
        keyring.open(sealed, PURPOSE_TCP)  # a datagram replayed as a stream frame
    with pytest.raises(AuthenticationFailed):
        target.stranger.open(sealed, PURPOSE_UDP)
