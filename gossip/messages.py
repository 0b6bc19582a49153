"""Gossip wire records (codec tags 100-199) and the plain values the core hands its shell.

Every record here is a frozen attrs class registered with the one codec
(:mod:`p2porch.common.codec`); tags are permanent and fields are only ever appended with a
default, so mixed versions of the daemon keep understanding each other.

Wire shape. A UDP payload is either one message (``Ping``, ``Ack``...) or a ``Compound``
whose ``parts`` are the codec bytes of several messages. Parts stay *bytes* (not nested
records) on purpose: a broadcast is encoded once when it is queued, its exact size is known
when packing an MTU-sized packet, and the same bytes are retransmitted many times without
re-encoding. A receiver decodes the outer list, then each part; identical parts (the same
rumour arriving from several peers) can be decoded once and reused (see core's cache).

Why ``Member`` is a wire record: push-pull carries the full member table as a tuple of them.
"""

from __future__ import annotations

import enum

import attrs

from p2porch.common import codec

#: Hard wire bound for names and addresses (a peer cannot make us store huge keys).
MAX_NAME_BYTES = 255
#: Hard wire bound for metadata; the configured bound (max_meta_bytes) is usually far lower.
MAX_WIRE_META_BYTES = 4096


class MemberState(enum.IntEnum):
    """What an observer believes about a member. LEFT (graceful) is distinct from DEAD."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class EventKind(enum.Enum):
    """Membership changes reported to the node layer through ``Ready.events``."""

    JOINED = "joined"  # a member became known, or came back from DEAD/LEFT
    UPDATED = "updated"  # metadata (or address after reclaim) of an alive member changed
    SUSPECT = "suspect"  # an alive member is now suspected
    ALIVE = "alive"  # a suspected member refuted the suspicion
    DEAD = "dead"  # declared failed (by the suspicion timeout somewhere in the cluster)
    LEFT = "left"  # left gracefully
    REAPED = "reaped"  # a DEAD/LEFT tombstone was forgotten; the name may come back afresh


def _check_name(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or len(value.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{attribute.name} must be 1..{MAX_NAME_BYTES} bytes")


def _check_addr(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if len(value.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{attribute.name} longer than {MAX_NAME_BYTES} bytes")


def _check_meta(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if len(value) > MAX_WIRE_META_BYTES:
        raise ValueError(f"{attribute.name} longer than {MAX_WIRE_META_BYTES} bytes")


def _check_counter(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value < 2**63:
        raise ValueError(f"{attribute.name} out of range")


@codec.register(100)
@attrs.frozen
class Member:
    """One member as an observer sees it (also one row of a push-pull state)."""

    name: str = attrs.field(validator=_check_name)
    addr: str = attrs.field(validator=_check_addr)
    incarnation: int = attrs.field(validator=_check_counter)
    state: MemberState
    meta: bytes = attrs.field(default=b"", validator=_check_meta)
    meta_version: int = attrs.field(default=0, validator=_check_counter)


@codec.register(101)
@attrs.frozen
class Ping:
    """Direct probe. ``target`` is checked by the receiver: an address reused by another node
    must not answer for the old one."""

    seq: int = attrs.field(validator=_check_counter)
    target: str = attrs.field(validator=_check_name)
    source: str = attrs.field(validator=_check_name)


@codec.register(102)
@attrs.frozen
class IndirectPing:
    """Ask a relay to probe ``target`` for us; the relay answers with Ack or (Lifeguard) Nack."""

    seq: int = attrs.field(validator=_check_counter)
    target: str = attrs.field(validator=_check_name)
    target_addr: str = attrs.field(validator=_check_addr)
    source: str = attrs.field(validator=_check_name)
    want_nack: bool = False


@codec.register(103)
@attrs.frozen
class Ack:
    seq: int = attrs.field(validator=_check_counter)
    source: str = attrs.field(validator=_check_name)


@codec.register(104)
@attrs.frozen
class Nack:
    """A relay could not reach the target: proof that *we* are reachable (Lifeguard health)."""

    seq: int = attrs.field(validator=_check_counter)
    source: str = attrs.field(validator=_check_name)


@codec.register(105)
@attrs.frozen
class Alive:
    """``name`` is alive at ``incarnation``; carries its metadata (ordered by meta_version)."""

    name: str = attrs.field(validator=_check_name)
    addr: str = attrs.field(validator=_check_addr)
    incarnation: int = attrs.field(validator=_check_counter)
    meta: bytes = attrs.field(default=b"", validator=_check_meta)
    meta_version: int = attrs.field(default=0, validator=_check_counter)


@codec.register(106)
@attrs.frozen
class Suspect:
    """``accuser`` could not reach ``name`` at ``incarnation``. Several distinct accusers are
    the independent confirmations that shorten a Lifeguard suspicion."""

    name: str = attrs.field(validator=_check_name)
    incarnation: int = attrs.field(validator=_check_counter)
    accuser: str = attrs.field(validator=_check_name)


@codec.register(107)
@attrs.frozen
class Dead:
    """A suspicion of ``name`` at ``incarnation`` timed out at ``accuser``."""

    name: str = attrs.field(validator=_check_name)
    incarnation: int = attrs.field(validator=_check_counter)
    accuser: str = attrs.field(validator=_check_name)


@codec.register(108)
@attrs.frozen
class Left:
    """``name`` left gracefully at ``incarnation`` (only the member itself sends this)."""

    name: str = attrs.field(validator=_check_name)
    incarnation: int = attrs.field(validator=_check_counter)


@codec.register(109)
@attrs.frozen
class Compound:
    """Several messages in one datagram; each part is the codec bytes of one message."""

    parts: tuple[bytes, ...]


@codec.register(110)
@attrs.frozen
class PushPullState:
    """A full member table for anti-entropy (sent over TCP by the shell, both directions).

    ``digest`` summarises the table (order-independent; see core) so a receiver whose own
    table has the same digest skips decoding ``members_blob`` -- the common case in a calm
    cluster, and what keeps push-pull O(N) bytes but O(1) work at 10,000 nodes.
    ``members_blob`` is the codec bytes of ``tuple[Member, ...]``.
    """

    source: str = attrs.field(validator=_check_name)
    source_addr: str = attrs.field(validator=_check_addr)
    join: bool
    digest: bytes
    members_blob: bytes


#: Messages that may travel alone or as a part of a Compound.
SingleMessage = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | Left
#: Whatever a UDP payload may be.
Packet = SingleMessage | Compound
#: Messages that are queued and piggybacked (rumours about members).
Broadcast = Alive | Suspect | Dead | Left


@attrs.frozen
class Event:
    """A membership change for the node layer (not a wire record)."""

    kind: EventKind
    member: Member


@attrs.frozen
class OutPacket:
    """One plaintext datagram (or TCP fallback probe) for the shell to send to ``dst``."""

    dst: str
    data: bytes


@attrs.frozen
class Ready:
    """Everything the core wants done since the last ``ready()`` call.

    ``packets`` go over UDP (each within mtu - encryption overhead); ``tcp_pings`` over a TCP
    connection whose answer is fed back through ``receive_packet``; ``push_pulls`` are
    addresses to run a push-pull exchange with (``local_state`` / ``merge_remote_state``).
    """

    packets: tuple[OutPacket, ...] = ()
    tcp_pings: tuple[OutPacket, ...] = ()
    push_pulls: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
