"""Fuzz the Raft frame reader (consensus.transport.FrameReader) and the decode behind it.

Streams of valid frames are mutated and cut into reads at fuzzed places; the reader must
yield exactly what a by-hand reference parser finds, then end cleanly or raise FrameError.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2porch.consensus.transport import FrameError, FrameReader, encode_frame

from .targets import FramesTarget, reference_frames

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def target() -> FramesTarget:
    return FramesTarget()


def test_reference_parser() -> None:
    two = encode_frame(b"ab") + encode_frame(b"")
    assert reference_frames(two, 10) == ([b"ab", b""], True)
    assert reference_frames(two[:-1], 10) == ([b"ab"], False)
    assert reference_frames(encode_frame(b"x" * 11), 10) == ([], False)


def test_seeds_are_read_whole(target: FramesTarget) -> None:
    for data in target.seeds():
        frames, error = trio.run(target._read_all, data[1:], data[0] % 64 + 1)
        assert error is None and frames == reference_frames(data[1:], target.MAX_FRAME)[0]
        assert frames


@settings(FUZZ, max_examples=200)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 255))
def test_mutated_frame_streams(target: FramesTarget, seed: int, cut: int) -> None:
    rnd = random.Random(seed)
    seeds = target.seeds()
    data = rnd.choice(seeds)
    for _ in range(3):
        data = target.mutate(data, rnd, seeds)
        target.run(bytes((cut,)) + data[1:])


@settings(FUZZ, max_examples=150)
@given(data=st.binary(max_size=300))
def test_random_streams(target: FramesTarget, data: bytes) -> None:
    target.run(data)


async def test_an_oversized_length_is_refused_before_buffering() -> None:
    """A header announcing 4 GiB: FrameError after reading the header, nothing more."""
    receiver = trio.testing.MemoryReceiveStream()
    receiver.put_data(b"\xff\xff\xff\xff")
    reads = 0

    async def count() -> None:
        nonlocal reads
        reads += 1
        if reads > 1:  # only ever reached if the reader wants the body
            receiver.put_data(b"\x00" * 65536)

    receiver.receive_some_hook = count
    with pytest.raises(FrameError, match="over the"):
        await FrameReader(receiver, 16 << 20).receive()
    assert reads == 1


async def test_a_frame_exactly_at_the_limit_is_read_and_one_byte_more_is_not() -> None:
    for size, ok in ((1024, True), (1025, False)):
        receiver = trio.testing.MemoryReceiveStream()
        receiver.put_data(encode_frame(b"x" * size))
        receiver.put_eof()
        reader = FrameReader(receiver, 1024)
        if ok:
            assert await reader.receive() == b"x" * size
            assert await reader.receive() is None
        else:
            with pytest.raises(FrameError):
                await reader.receive()
