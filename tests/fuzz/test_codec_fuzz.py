"""Fuzz codec.decode for every registered record and every boundary union (CI-sized).

Mutants of valid encodings (byte edits and msgpack-structure edits) and arbitrary msgpack
structures must decode to a value of the asked type or raise CodecError -- nothing else. The
long runs (>= 1,000,000 inputs) are benchmarks/fuzz_many.py; this keeps CI within seconds.
"""

from __future__ import annotations

import contextlib
import random
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2porch.common import codec
from p2porch.common.errors import CodecError

from .corpus import INTERESTING_HEADERS, boundary_hints, load_registry
from .targets import CodecTarget

TARGET = CodecTarget()
RECORDS = load_registry()
HINTS = boundary_hints()
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_registered_record_has_valid_seeds() -> None:
    """A record the synthesizer cannot build would be fuzzed from garbage only: add pool values
    to tests/fuzz/corpus.py (_STRINGS, _INTS, ...) that pass its validators."""
    assert TARGET.unbuildable == []
    assert set(TARGET._seeds_by_type) == set(RECORDS)


def test_seeds_decode_to_their_own_record() -> None:
    for cls, encodings in TARGET._seeds_by_type.items():
        for data in encodings:
            assert isinstance(codec.decode(data, cls), cls)


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__qualname__)
@settings(FUZZ, max_examples=25)
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_record_decodes_or_raises_codec_error(cls: type, seed: int) -> None:
    rnd = random.Random(seed)
    index = TARGET.index_of(cls)
    seeds = [bytes((index,)) + e for e in TARGET._seeds_by_type[cls]]
    others = TARGET.seeds()
    data = rnd.choice(seeds)
    for _ in range(6):  # a chain: edits pile up, reaching deeper than one edit each
        data = TARGET.mutate(data, rnd, others)
        TARGET.check(data[1:], index)


@pytest.mark.parametrize("name", sorted(HINTS))
@settings(FUZZ, max_examples=80)
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_messages_against_boundary_unions(name: str, seed: int) -> None:
    rnd = random.Random(seed)
    index = TARGET.index_of(HINTS[name])
    payloads = TARGET.payloads()
    data = rnd.choice(payloads)
    for _ in range(6):
        data = TARGET.mutate(b"\x00" + data, rnd, [])[1:]
        TARGET.check(data, index)


def _tags() -> list[int]:
    return TARGET.tags()


msgpack_ints = st.integers(-(2**63), 2**64 - 1)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | msgpack_ints
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=4) | msgpack_ints, children, max_size=3)
        # Record-shaped: a real tag, then anything.
        | st.tuples(st.sampled_from(_tags()), st.lists(children, max_size=6)).map(
            lambda t: [t[0], *t[1]]
        )
    ),
    max_leaves=25,
)


@settings(FUZZ, max_examples=300)
@given(value=msgpack_values, which=st.integers(0, 10_000))
def test_arbitrary_msgpack_structures(value: Any, which: int) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    TARGET.check(data, which % len(TARGET.hints))


@settings(FUZZ, max_examples=300)
@given(data=st.binary(max_size=300), which=st.integers(0, 10_000))
def test_random_bytes(data: bytes, which: int) -> None:
    TARGET.check(data, which % len(TARGET.hints))


# --------------------------------------------------------------------------- adversarial


def _peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("header", INTERESTING_HEADERS[:7], ids=lambda h: h[:1].hex())
@pytest.mark.parametrize("hint", [*HINTS.values(), RECORDS[0]], ids=[*HINTS, "record"])
def test_huge_declared_length_in_a_small_buffer(header: bytes, hint: Any) -> None:
    """A 4 GiB array/map/str/bin announced in 5 bytes: refused without allocating it."""
    data = header + b"\x00" * 8

    def decode() -> None:
        with pytest.raises(CodecError):
            codec.decode(data, hint)

    assert _peak_bytes(decode) < 256 * 1024


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 100_000 + b"\x00",  # 100,000 nested one-item arrays
        b"\x81\xc0" * 100_000 + b"\x00",  # 100,000 nested one-entry maps
        b"\x92\x01" * 100_000 + b"\x00",  # record-shaped nesting
        (b"\xdc\xff\xff" + b"\x91" * 10) * 1000,  # lying lengths at every level
    ],
    ids=["arrays", "maps", "records", "lying"],
)
@pytest.mark.parametrize(
    "hint", [Any, HINTS["raft.Message"], HINTS["any_record"]], ids=["any", "raft", "record"]
)
def test_deep_nesting_is_refused_within_bounded_memory(data: bytes, hint: Any) -> None:
    def decode() -> None:
        with pytest.raises(CodecError):
            codec.decode(data, hint)

    assert _peak_bytes(decode) < 8 * 1024 * 1024


@pytest.mark.parametrize(
    "item", [b"\x80", b"\x90", b"\xc0", b"\xa0"], ids=["map", "arr", "nil", "str"]
)
@pytest.mark.parametrize("hint", [Any, HINTS["raft.Message"]], ids=["any", "raft"])
def test_memory_grows_linearly_with_the_input(item: bytes, hint: Any) -> None:
    """The worst case: 1-byte empty containers, each a ~60-byte Python object.

    msgpack builds the whole structure before the schema is checked, so a frame of N bytes
    can cost ~70 N of memory, and ~150 N under ``Any`` (which copies what it accepts); see
    the H3 report: a 16 MiB Raft frame of empty maps costs ~1.2 GB. This pins that the cost
    stays linear in the input -- not that it is small.
    """
    n = 50_000
    data = b"\xdd" + struct.pack(">I", n) + item * n

    def decode() -> None:
        with contextlib.suppress(CodecError):
            codec.decode(data, hint)

    assert _peak_bytes(decode) < 200 * len(data)


def test_extension_types_are_refused_even_untyped() -> None:
    """The encoder never writes msgpack extensions, so the decoder must not hand them out."""
    ext = msgpack.packb([1, msgpack.ExtType(5, b"xy")], use_bin_type=True)
    timestamp = b"\x92\x01\xd6\xff\x00\x00\x00\x00"
    for data in (ext, timestamp):
        with pytest.raises(CodecError, match="plain msgpack value"):
            codec.decode(data, Any)
