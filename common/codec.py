"""The one wire codec: frozen attrs records <-> msgpack bytes, checked against type hints.

Every message that crosses a process boundary (Raft RPCs, gossip packets, API bodies that are
not JSON, WAL records) goes through here, so there is exactly one place that knows msgpack.

Encoding. A registered record is written as a msgpack array ``[tag, field1, field2, ...]`` in
attrs field order; nested records the same way. Tags are small integers and **append-only**:
a tag, once shipped, keeps its class forever, and fields are only ever appended (with a
default), so mixed versions decode each other: an older reader ignores extra trailing fields,
a newer reader fills missing trailing fields from their defaults.

Tag ranges (one per layer, so layers never collide)::

    1-99     consensus (Raft messages, entries, snapshots, WAL records)
    100-199  gossip (SWIM messages, metadata)
    200-499  node (desired state, commands, replica status)
    500-599  security (join exchange, certificates)

Decoding is schema driven: the expected type (and every field's type hint) says what each
value must be. Anything else -- truncated bytes, a wrong tag, a string where an int belongs, a
validator that refuses the value -- raises :class:`CodecError`, the single error the boundary
catches, drops and counts. Nothing a peer sends can crash a node through this module.
"""

from __future__ import annotations

import contextlib
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union, cast

import attrs
import msgpack

from .errors import CodecError

T = TypeVar("T")

_BY_TAG: dict[int, type] = {}
_BY_CLASS: dict[type, int] = {}
# Compiled per-class (en|de)coders, built lazily on first use so forward references resolve.
_DECODERS: dict[type, Callable[[Any], Any]] = {}
_ENCODERS: dict[type, Callable[[Any], Any]] = {}

_NONE_TYPE = type(None)


def register(tag: int) -> Callable[[type[T]], type[T]]:
    """Class decorator: give a frozen attrs class its permanent wire tag."""

    def wrap(cls: type[T]) -> type[T]:
        if not attrs.has(cls):
            raise TypeError(f"{cls.__name__} is not an attrs class")
        if tag in _BY_TAG and _BY_TAG[tag] is not cls:
            raise ValueError(f"wire tag {tag} already belongs to {_BY_TAG[tag].__qualname__}")
        if not 0 < tag < 2**16:
            raise ValueError(f"wire tag {tag} out of range")
        _BY_TAG[tag] = cls
        _BY_CLASS[cls] = tag
        return cast("type[T]", cls)

    return wrap


def registered_tag(cls: type) -> int:
    """The wire tag of a registered class (raises KeyError if it has none)."""
    return _BY_CLASS[cls]


# --------------------------------------------------------------------------- encoding


def _encode_value(value: Any) -> Any:
    cls = type(value)
    encoder = _ENCODERS.get(cls)
    if encoder is not None:
        return encoder(value)
    if cls in _BY_CLASS:
        return _compile_encoder(cls)(value)
    if value is None or cls in (bool, int, float, str, bytes):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_encode_value(v) for v in value]
    if isinstance(value, frozenset | set):
        items = [_encode_value(v) for v in value]
        with contextlib.suppress(TypeError):
            items.sort()
        return items
    if isinstance(value, dict):
        return {_encode_value(k): _encode_value(v) for k, v in value.items()}
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"cannot encode {cls.__qualname__}: not a registered record or primitive")


def _compile_encoder(cls: type) -> Callable[[Any], Any]:
    tag = _BY_CLASS[cls]
    names = [f.name for f in attrs.fields(cls) if f.init]

    def encode_record(obj: Any) -> list[Any]:
        out: list[Any] = [tag]
        for name in names:
            out.append(_encode_value(getattr(obj, name)))
        return out

    _ENCODERS[cls] = encode_record
    return encode_record


def to_primitive(obj: object) -> Any:
    """The msgpack-ready structure for ``obj`` (used by ``encode`` and by the WAL)."""
    return _encode_value(obj)


def encode(obj: object) -> bytes:
    """Serialize a registered record (or a primitive structure of them) to bytes."""
    return cast(bytes, msgpack.packb(_encode_value(obj), use_bin_type=True))


# --------------------------------------------------------------------------- decoding


def _fail(expected: object, got: object) -> CodecError:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return CodecError(f"expected {getattr(expected, '__name__', expected)}, got {shown}")


def _decoder_for(hint: Any) -> Callable[[Any], Any]:
    """Build a function checking and converting one msgpack value against a type hint."""
    if hint is Any or hint is object:
        return _decode_any
    if hint is _NONE_TYPE or hint is None:

        def dec_none(v: Any) -> None:
            if v is not None:
                raise _fail(None, v)

        return dec_none
    if hint is bool:

        def dec_bool(v: Any) -> bool:
            if type(v) is not bool:
                raise _fail(bool, v)
            return v

        return dec_bool
    if hint is int:

        def dec_int(v: Any) -> int:
            if type(v) is not int:
                raise _fail(int, v)
            return v

        return dec_int
    if hint is float:

        def dec_float(v: Any) -> float:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise _fail(float, v)

        return dec_float
    if hint is str:

        def dec_str(v: Any) -> str:
            if type(v) is not str:
                raise _fail(str, v)
            return v

        return dec_str
    if hint is bytes:

        def dec_bytes(v: Any) -> bytes:
            if type(v) is not bytes:
                raise _fail(bytes, v)
            return v

        return dec_bytes
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        enum_cls = hint

        def dec_enum(v: Any) -> Any:
            try:
                return enum_cls(v)
            except (ValueError, TypeError) as exc:
                raise _fail(enum_cls, v) from exc

        return dec_enum
    if isinstance(hint, type) and hint in _BY_CLASS:
        return _record_decoder({_BY_CLASS[hint]: hint}, hint)

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _union_decoder(args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder_for(args[0])

            def dec_tuple(v: Any) -> tuple[Any, ...]:
                if type(v) is not list:
                    raise _fail("array", v)
                return tuple(item(x) for x in v)

            return dec_tuple
        items = [_decoder_for(a) for a in args]

        def dec_fixed(v: Any) -> tuple[Any, ...]:
            if type(v) is not list or len(v) != len(items):
                raise _fail(f"array of {len(items)}", v)
            return tuple(d(x) for d, x in zip(items, v, strict=True))

        return dec_fixed
    if origin in (frozenset, set):
        item = _decoder_for(args[0])

        def dec_set(v: Any) -> frozenset[Any]:
            if type(v) is not list:
                raise _fail("array", v)
            return frozenset(item(x) for x in v)

        return dec_set
    if origin is list:
        item = _decoder_for(args[0])

        def dec_list(v: Any) -> tuple[Any, ...]:
            if type(v) is not list:
                raise _fail("array", v)
            return tuple(item(x) for x in v)

        return dec_list
    if origin is dict or origin is typing.Mapping or hint is dict:
        key = _decoder_for(args[0]) if args else _decode_any
        val = _decoder_for(args[1]) if args else _decode_any

        def dec_dict(v: Any) -> dict[Any, Any]:
            if type(v) is not dict:
                raise _fail("map", v)
            return {key(k): val(x) for k, x in v.items()}

        return dec_dict
    if origin is typing.Literal:
        allowed = set(args)

        def dec_literal(v: Any) -> Any:
            if v not in allowed:
                raise _fail(f"one of {sorted(map(str, allowed))}", v)
            return v

        return dec_literal
    raise TypeError(f"codec cannot decode fields of type {hint!r}")


def _decode_any(v: Any) -> Any:
    """Untyped data (e.g. a JSON-like document): lists become tuples, nothing else changes.

    msgpack extension values (``ExtType``, ``Timestamp``) are refused: the encoder never
    writes them, so a value holding one could not be encoded (stored, forwarded) again.
    """
    cls = type(v)
    if cls is list:
        return tuple(_decode_any(x) for x in v)
    if cls is dict:
        return {_decode_any(k): _decode_any(x) for k, x in v.items()}
    if cls is msgpack.ExtType or cls is msgpack.Timestamp:
        raise _fail("a plain msgpack value", v)
    return v


def _union_decoder(args: tuple[Any, ...]) -> Callable[[Any], Any]:
    records = {_BY_CLASS[a]: a for a in args if isinstance(a, type) and a in _BY_CLASS}
    others = [_decoder_for(a) for a in args if not (isinstance(a, type) and a in _BY_CLASS)]
    record_dec = _record_decoder(records, "record") if records else None

    def dec_union(v: Any) -> Any:
        if record_dec is not None and type(v) is list:
            return record_dec(v)
        for d in others:
            try:
                return d(v)
            except CodecError:
                continue
        raise _fail(args, v)

    return dec_union


def _record_decoder(allowed: dict[int, type], what: object) -> Callable[[Any], Any]:
    def dec_record(v: Any) -> Any:
        if type(v) is not list or not v or type(v[0]) is not int:
            raise _fail(what, v)
        cls = allowed.get(v[0])
        if cls is None:
            raise CodecError(f"unexpected wire tag {v[0]!r} where {what} belongs")
        dec = _DECODERS.get(cls) or _compile_decoder(cls)
        return dec(v)

    return dec_record


def _compile_decoder(cls: type) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in attrs.fields(cls) if f.init]
    field_decs = [(f.alias or f.name, _decoder_for(hints[f.name])) for f in fields]
    n_required = sum(1 for f in fields if f.default is attrs.NOTHING)

    def dec(v: list[Any]) -> Any:
        values = v[1:]
        if len(values) < n_required:
            raise CodecError(
                f"{cls.__name__}: {len(values)} fields, at least {n_required} required"
            )
        kwargs = {}
        for (name, fdec), raw in zip(field_decs, values, strict=False):
            try:
                kwargs[name] = fdec(raw)
            except CodecError as exc:
                raise CodecError(f"{cls.__name__}.{name}: {exc}") from None
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise CodecError(f"{cls.__name__}: {exc}") from None

    _DECODERS[cls] = dec
    return dec


_TOP_DECODERS: dict[Any, Callable[[Any], Any]] = {}


def from_primitive(raw: Any, expected: type[T] | Any) -> T:
    """Check and convert an already-unpacked msgpack structure against ``expected``."""
    dec = _TOP_DECODERS.get(expected)
    if dec is None:
        dec = _TOP_DECODERS[expected] = _decoder_for(expected)
    try:
        return cast(T, dec(raw))
    except CodecError:
        raise
    except RecursionError as exc:
        raise CodecError("structure nested too deeply") from exc


def decode(data: bytes, expected: type[T] | Any) -> T:
    """Parse peer bytes into ``expected`` (a registered class, a union of them, or a hint).

    Raises :class:`CodecError` for anything that is not exactly that -- never another error.
    """
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise CodecError(f"undecodable bytes: {type(exc).__name__}: {exc}") from None
    return cast(T, from_primitive(raw, expected))


def any_record() -> Any:
    """A hint accepting any registered record (for envelopes that carry many kinds)."""
    return Union[tuple(_BY_TAG.values())]  # noqa: UP007 - built at run time
