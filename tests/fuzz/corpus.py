"""Valid seed inputs and mutators shared by the fuzz tests and ``benchmarks/fuzz_many.py``.

Why synthesize seeds instead of writing them by hand: the codec has ~75 registered records
and the list grows with every issue. A fuzzer that starts from *valid* encodings of every one
of them reaches the deep decoders (nested records, unions, validators) that random bytes never
get past; hand-written samples would silently stop covering new records. The synthesizer reads
each record's type hints and tries values from small pools chosen to pass the usual validators
(DNS labels, addresses, absolute paths, positive counters); records whose validators refuse
every attempt are reported by ``registered_seeds`` so a test can insist on full coverage.

Everything here is deterministic given a ``random.Random``; nothing reads the clock.
"""

from __future__ import annotations

import enum
import random
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import attrs
import msgpack

from p2porch.common import codec

REPO = Path(__file__).resolve().parents[2]

# Importing these registers every wire record (the codec's registry is filled by imports).
_REGISTERING_MODULES = (
    "p2porch.consensus.messages",
    "p2porch.consensus.kv",
    "p2porch.consensus.storage",
    "p2porch.consensus.node_main",
    "p2porch.gossip.messages",
    "p2porch.gossip.service",
    "p2porch.node.spec",
    "p2porch.node.state",
    "p2porch.node.daemon",
    "p2porch.node.reconcile_core",
)


def load_registry() -> list[type]:
    """Every registered wire record, in tag order (imports every registering module)."""
    import importlib

    for name in _REGISTERING_MODULES:
        importlib.import_module(name)
    return [codec._BY_TAG[tag] for tag in sorted(codec._BY_TAG)]


def boundary_hints() -> dict[str, Any]:
    """The union hints the daemons actually decode peer and disk bytes with.

    Kept next to the per-record hints because unions take a different decoder path (tag
    dispatch over several records) from a single expected class.
    """
    from p2porch.consensus import messages as raft
    from p2porch.consensus import node_main, storage
    from p2porch.gossip import messages as swim
    from p2porch.gossip import service as swim_service

    return {
        "raft.Message": raft.Message,
        "kv.ClientMessage": node_main.ClientMessage,
        "wal.Record": storage._WalRecord,
        "gossip.Packet": swim.Packet,
        "gossip.SingleMessage": swim.SingleMessage,
        "gossip.StreamRequest": swim_service.StreamRequest,
        "gossip.MemberTable": tuple[swim.Member, ...],
        "any": Any,
        "any_record": codec.any_record(),
    }


# --------------------------------------------------------------------------- synthesis

_STRINGS = (
    "a",
    "web",
    "node-1",
    "default",
    "shop",
    "zone",
    "MESSAGE",
    "127.0.0.1:7000",
    "127.0.0.2:7946",
    "busybox:1.36",
    "p2porch/demo:latest",
    "/data",
    "/srv/www",
    "zone==a",
    "running",
    "tcp",
    "",
    "x" * 40,
    "\u00e9t\u00e9",
)
_INTS = (0, 1, 2, 3, 5, 7, 80, 8080, 10_000, 65_535, 2**31, 2**62)
_BYTES = (b"", b"\x00", b"payload", bytes(range(16)), b"\xff" * 33)
_FLOATS = (0.0, 0.5, 1.0, 2.5)


class Unbuildable(Exception):
    """The synthesizer found no valid value for a hint within its attempts."""


class Synth:
    """Builds valid values of any codec hint from small pools, by trial and error."""

    def __init__(self, rnd: random.Random, attempts: int = 200) -> None:
        self.rnd = rnd
        self.attempts = attempts

    def value(self, hint: Any, depth: int = 0) -> Any:  # noqa: PLR0911 - one case per hint
        rnd = self.rnd
        if hint is Any or hint is object:
            return rnd.choice(_STRINGS)
        if hint is type(None) or hint is None:
            return None
        if hint is bool:
            return rnd.random() < 0.5
        if hint is int:
            return rnd.choice(_INTS)
        if hint is float:
            return rnd.choice(_FLOATS)
        if hint is str:
            return rnd.choice(_STRINGS)
        if hint is bytes:
            return rnd.choice(_BYTES)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return rnd.choice(list(hint))
        if isinstance(hint, type) and attrs.has(hint):
            return self.record(hint, depth + 1)
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (Union, types.UnionType):
            # Prefer the non-None branch: None teaches the decoder little.
            options = [a for a in args if a is not type(None)] or list(args)
            if type(None) in args and rnd.random() < 0.25:
                return None
            return self.value(rnd.choice(options), depth)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                size = 0 if depth > 3 else rnd.choice((0, 1, 1, 2, 3))
                return tuple(self.value(args[0], depth + 1) for _ in range(size))
            return tuple(self.value(a, depth + 1) for a in args)
        if origin in (frozenset, set):
            size = 0 if depth > 3 else rnd.choice((0, 1, 2))
            return frozenset(self.value(args[0], depth + 1) for _ in range(size))
        if origin is list:
            return [self.value(args[0], depth + 1) for _ in range(rnd.choice((0, 1, 2)))]
        if origin is dict or hint is dict:
            key_hint, val_hint = args or (str, Any)
            size = 0 if depth > 3 else rnd.choice((0, 1, 2))
            return {
                self.value(key_hint, depth + 1): self.value(val_hint, depth + 1)
                for _ in range(size)
            }
        if origin is typing.Literal:
            return rnd.choice(args)
        raise Unbuildable(f"no synthesis rule for {hint!r}")

    def record(self, cls: type, depth: int = 0) -> Any:
        """A valid instance of ``cls`` (optional fields sometimes left at their default)."""
        hints = typing.get_type_hints(cls)
        fields = [f for f in attrs.fields(cls) if f.init]
        last: Exception | None = None
        # Nested records mostly keep their defaults: every optional field is one more chance
        # to break a validator, and a failed nested record costs the outer one an attempt.
        skip = 0.3 if depth <= 1 else 0.7
        for _ in range(self.attempts):
            kwargs: dict[str, Any] = {}
            try:
                for f in fields:
                    if f.default is not attrs.NOTHING and self.rnd.random() < skip:
                        continue
                    kwargs[f.alias or f.name] = self.value(hints[f.name], depth)
                return cls(**kwargs)
            except (ValueError, TypeError, Unbuildable) as exc:
                last = exc
        raise Unbuildable(
            f"{cls.__qualname__}: no valid instance in {self.attempts} tries ({last})"
        )


def registered_seeds(
    rnd: random.Random, per_type: int = 4
) -> tuple[dict[type, list[bytes]], list[type]]:
    """Encoded valid instances of every registered record, plus the records none was found for."""
    synth = Synth(rnd)
    out: dict[type, list[bytes]] = {}
    missing: list[type] = []
    for cls in load_registry():
        encodings: list[bytes] = []
        for _ in range(per_type):
            try:
                encodings.append(codec.encode(synth.record(cls)))
            except Unbuildable:
                break
        if encodings:
            out[cls] = sorted(set(encodings), key=lambda b: (len(b), b))
        else:
            missing.append(cls)
    return out, missing


# --------------------------------------------------------------------------- mutation

# msgpack headers that declare big containers or payloads: the interesting lies to tell a
# decoder (a 4 GiB array announced in five bytes).
INTERESTING_HEADERS = (
    b"\xdc\xff\xff",  # array16, 65535 items
    b"\xdd\xff\xff\xff\xff",  # array32, 2**32-1 items
    b"\xde\xff\xff",  # map16
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # int64 min
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
    b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext (-1)
    b"\xc1",  # never used
    b"\xc0",
    b"\xc2",
    b"\xc3",
    b"\x90",
    b"\x80",
    b"\xa0",
)
_BOUNDARY_INTS = (
    -1,
    0,
    1,
    -(2**63),
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**31,
    65_536,
)


def mutate_bytes(data: bytes, rnd: random.Random, others: list[bytes] | None = None) -> bytes:
    """One random byte-level edit: flip, set, insert, delete, truncate, splice, lie about size."""
    buf = bytearray(data)
    op = rnd.randrange(9)
    pos = rnd.randrange(len(buf) + 1)
    if op == 0 and buf:  # flip one bit
        i = min(pos, len(buf) - 1)
        buf[i] ^= 1 << rnd.randrange(8)
    elif op == 1 and buf:  # set one byte
        buf[min(pos, len(buf) - 1)] = rnd.randrange(256)
    elif op == 2:  # insert random bytes
        buf[pos:pos] = rnd.randbytes(rnd.choice((1, 1, 2, 4, 9)))
    elif op == 3 and buf:  # delete a range
        del buf[pos : pos + rnd.choice((1, 1, 2, 4, 16))]
    elif op == 4:  # truncate
        del buf[pos:]
    elif op == 5:  # insert or overwrite with a lying header
        header = rnd.choice(INTERESTING_HEADERS)
        if rnd.random() < 0.5:
            buf[pos:pos] = header
        else:
            buf[pos : pos + len(header)] = header
    elif op == 6 and buf:  # duplicate a chunk
        end = min(len(buf), pos + rnd.choice((1, 4, 16, 64)))
        buf[pos:pos] = buf[pos:end]
    elif op == 7 and others:  # splice with another seed
        other = rnd.choice(others)
        cut = rnd.randrange(len(other) + 1)
        buf = buf[:pos] + bytearray(other[cut:])
    else:  # change a length/count nibble of a fix-type header
        if buf:
            i = min(pos, len(buf) - 1)
            buf[i] = (buf[i] & 0xF0) | rnd.randrange(16)
    return bytes(buf)


def _random_primitive(rnd: random.Random, tags: list[int], depth: int = 0) -> Any:
    kind = rnd.randrange(11 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.choice(_BOUNDARY_INTS)
    if kind == 3:
        return rnd.choice((0.0, -0.0, float("nan"), float("inf"), 1e308))
    if kind == 4:
        return rnd.choice(_STRINGS + ("\udcff", "\x00", "a" * 300))
    if kind == 5:
        return rnd.choice(_BYTES)
    if kind == 6:
        return rnd.choice(tags) if tags else 0
    if kind == 7:
        return msgpack.ExtType(rnd.randrange(128), rnd.randbytes(rnd.randrange(4)))
    if kind == 8:  # a record-shaped array with a real tag
        return [rnd.choice(tags)] + [
            _random_primitive(rnd, tags, depth + 1) for _ in range(rnd.randrange(5))
        ]
    if kind == 9:
        return [_random_primitive(rnd, tags, depth + 1) for _ in range(rnd.randrange(4))]
    return {
        rnd.choice(("a", "k", 1, b"b", None)): _random_primitive(rnd, tags, depth + 1)
        for _ in range(rnd.randrange(3))
    }


def _containers(value: Any) -> Iterator[list[Any] | dict[Any, Any]]:
    """Every list/dict inside an unpacked msgpack structure (itself included)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            yield item
            stack.extend(item)
        elif isinstance(item, dict):
            yield item
            stack.extend(item.values())


def mutate_structure(data: bytes, rnd: random.Random, tags: list[int]) -> bytes:
    """Decode ``data`` to msgpack primitives, change one value or shape, re-encode.

    Reaches the typed decoders with well-formed msgpack that lies only in its *meaning*: an
    int where a str belongs, a field too many or too few, a tag of another record.
    """
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception:
        return mutate_bytes(data, rnd)
    holders = list(_containers(value))
    if not holders:
        value = _random_primitive(rnd, tags)
    else:
        holder = rnd.choice(holders)
        if isinstance(holder, dict):
            if holder and rnd.random() < 0.5:
                key = rnd.choice(list(holder))
                holder[key] = _random_primitive(rnd, tags)
            else:
                holder[rnd.choice(("x", 0, None))] = _random_primitive(rnd, tags)
        else:
            op = rnd.randrange(6)
            if op == 0 and holder:
                holder[rnd.randrange(len(holder))] = _random_primitive(rnd, tags)
            elif op == 1 and holder:
                del holder[rnd.randrange(len(holder))]
            elif op == 2:
                holder.append(_random_primitive(rnd, tags))
            elif op == 3 and holder and type(holder[0]) is int:
                holder[0] = rnd.choice(tags) if tags else 0
            elif op == 4 and holder:
                i = rnd.randrange(len(holder))
                item = holder[i]
                if type(item) is int:
                    holder[i] = rnd.choice(_BOUNDARY_INTS)
                else:
                    holder[i] = [item]
            else:
                holder.clear()
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except Exception:
        return mutate_bytes(data, rnd)


def mutate(
    data: bytes, rnd: random.Random, tags: list[int], others: list[bytes] | None = None
) -> bytes:
    """1-3 stacked edits, structural or byte-level."""
    for _ in range(rnd.choice((1, 1, 2, 3))):
        if rnd.random() < 0.5:
            data = mutate_structure(data, rnd, tags)
        else:
            data = mutate_bytes(data, rnd, others)
    return data


def mutate_text(text: str, rnd: random.Random, vocabulary: tuple[str, ...]) -> str:
    """One edit of a YAML text: insert a token, delete, duplicate, swap or truncate lines."""
    op = rnd.randrange(7)
    pos = rnd.randrange(len(text) + 1)
    if op == 0:
        return text[:pos] + rnd.choice(vocabulary) + text[pos:]
    if op == 1:
        return text[:pos] + text[pos + rnd.choice((1, 2, 5, 20)) :]
    if op == 2:
        return text[:pos]
    lines = text.split("\n")
    i = rnd.randrange(len(lines))
    if op == 3:
        lines.insert(i, lines[rnd.randrange(len(lines))])
    elif op == 4:
        j = rnd.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == 5:
        lines[i] = " " * rnd.choice((0, 1, 2, 4)) + lines[i].lstrip()
    else:
        del lines[i]
    return "\n".join(lines)


# YAML fragments an edit may insert: syntax that changes structure or types.
YAML_VOCABULARY = (
    ":",
    ": ",
    "-",
    "- ",
    "\n",
    "\n  ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "&a ",
    "*a",
    "<<: *a\n",
    "!!str ",
    "!!int ",
    "!!binary ",
    "!!python/object:os.system ",
    "? ",
    "|\n",
    ">\n",
    "'",
    '"',
    "#",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "~",
    "null",
    "true",
    "0x1F",
    "1:30",
    "1e400",
    ".nan",
    "-1",
    "99999999999999999999",
    "2001-12-14",
    "\t",
    "\x00",
    "\ufeff",
    "\udcff",
    "containerPort: ",
    "image: ",
    "replicas: ",
    "cpu: 250m",
    "memory: 1Ei",
    "name: ",
)


def manifest_seeds() -> list[str]:
    """Valid manifests: the repository's examples plus the full reference document."""
    texts = [p.read_text() for p in sorted((REPO / "examples").rglob("*.yaml"))]
    return [t for t in texts if t.strip()]


__all__ = [
    "INTERESTING_HEADERS",
    "YAML_VOCABULARY",
    "Synth",
    "Unbuildable",
    "boundary_hints",
    "load_registry",
    "manifest_seeds",
    "mutate",
    "mutate_bytes",
    "mutate_structure",
    "mutate_text",
    "registered_seeds",
]
