"""The one codec: round trips, schema checks, append-only evolution, hostile bytes."""

from __future__ import annotations

import contextlib
import enum

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2porch.common import codec
from p2porch.common.errors import CodecError


class Color(enum.IntEnum):
    RED = 1
    BLUE = 2


@codec.register(9001)
@attrs.frozen
class Inner:
    name: str
    data: bytes


@codec.register(9002)
@attrs.frozen
class Outer:
    term: int
    color: Color
    items: tuple[Inner, ...]
    tags: frozenset[str]
    maybe: Inner | None
    ratio: float
    flag: bool = False


@codec.register(9003)
@attrs.frozen
class OuterV1:
    """The same record as an older version knew it: fewer trailing fields."""

    term: int


@codec.register(9004)
@attrs.frozen
class Positive:
    n: int = attrs.field()

    @n.validator
    def _check(self, _attr: object, value: int) -> None:
        if value <= 0:
            raise ValueError("n must be positive")


def sample() -> Outer:
    return Outer(
        term=7,
        color=Color.BLUE,
        items=(Inner("a", b"\x00\x01"), Inner("b", b"")),
        tags=frozenset({"x", "y"}),
        maybe=None,
        ratio=0.5,
        flag=True,
    )


def test_round_trip() -> None:
    value = sample()
    assert codec.decode(codec.encode(value), Outer) == value


def test_union_of_records_decodes_by_tag() -> None:
    inner = Inner("n", b"d")
    assert codec.decode(codec.encode(inner), Inner | Outer) == inner


def test_missing_trailing_field_takes_default() -> None:
    raw = codec.to_primitive(sample())
    raw.pop()  # an older sender that did not know `flag`
    assert codec.from_primitive(raw, Outer).flag is False


def test_extra_trailing_fields_are_ignored() -> None:
    raw = [codec.registered_tag(OuterV1), 3, "field from the future"]
    assert codec.from_primitive(raw, OuterV1) == OuterV1(3)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.__setitem__(1, "seven"),  # str where int belongs
        lambda r: r.__setitem__(1, True),  # bool is not an int on the wire
        lambda r: r.__setitem__(2, 99),  # no such enum member
        lambda r: r.__setitem__(3, [[9001, "a"]]),  # nested record missing a field
        lambda r: r.__setitem__(0, 9003),  # wrong tag for the expected type
        lambda r: r.__delitem__(slice(2, None)),  # too few fields
    ],
)
def test_wrong_shapes_raise_codec_error(mutate) -> None:
    raw = codec.to_primitive(sample())
    mutate(raw)
    with pytest.raises(CodecError):
        codec.from_primitive(raw, Outer)


def test_validator_failure_is_codec_error() -> None:
    with pytest.raises(CodecError, match="positive"):
        codec.decode(codec.encode([codec.registered_tag(Positive), -1]), Positive)


def test_tags_are_permanent() -> None:
    with pytest.raises(ValueError, match="already belongs"):

        @codec.register(9001)
        @attrs.frozen
        class Impostor:
            x: int


def test_deep_nesting_is_codec_error() -> None:
    data = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(CodecError):
        codec.decode(data, Outer)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_raise_anything_but_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        codec.decode(data, Outer | Inner)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda c: st.lists(c, max_size=4),
        max_leaves=20,
    )
)
def test_random_structures_never_raise_anything_but_codec_error(value: object) -> None:
    for candidate in (value, [9002, value], [9002, 1, 1, [value], [], None, 1.0]):
        with contextlib.suppress(CodecError):
            codec.decode(msgpack.packb(candidate, use_bin_type=True), Outer)
