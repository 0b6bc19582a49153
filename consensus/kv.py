"""A replicated key-value state machine: put / get / delete / compare-and-set.

Why it exists: it is the smallest useful state machine with which the Raft shell can be tested
end to end (linearizability under kill -9, benchmarks against etcd) and it is what the node
layer's desired-state store builds on.

Determinism. ``apply`` depends only on the command bytes and the current state, never on time,
randomness or the local node, so every replica that applies the same log holds the same map.
Undecodable commands are deterministic too: every replica decodes the same bytes the same way
and answers the same error.

Exactly-once. A client that times out cannot know whether its proposal committed; it retries
the SAME command with the same ``(client_id, seq)``. Each client session remembers the highest
sequence number applied and its result, so a retried proposal returns the first result instead
of applying twice (Raft thesis section 6.3). Clients must issue a session's sequence numbers in
increasing order, one outstanding command at a time; a command older than the session's last is
answered with ``stale=True`` and no effect. Sessions live in the snapshot, so the guarantee
survives compaction and restarts.

Codec tags 60-69 (consensus range; 1-49 are the core's, 50-59 the WAL's).
"""

from __future__ import annotations

import attrs

from p2porch.common import codec
from p2porch.common.errors import CodecError

__all__ = [
    "KvCas",
    "KvCommand",
    "KvDelete",
    "KvGet",
    "KvPut",
    "KvResult",
    "KvSnapshot",
    "KvStateMachine",
]


@codec.register(60)
@attrs.frozen
class KvPut:
    key: str
    value: bytes


@codec.register(61)
@attrs.frozen
class KvGet:
    """A read through the log (slow path; the shell's ReadIndex read is the fast one)."""

    key: str


@codec.register(62)
@attrs.frozen
class KvDelete:
    key: str


@codec.register(63)
@attrs.frozen
class KvCas:
    """Set ``key`` to ``value`` iff its current value is ``expected`` (None = absent)."""

    key: str
    expected: bytes | None
    value: bytes


KvOp = KvPut | KvGet | KvDelete | KvCas


@codec.register(64)
@attrs.frozen
class KvCommand:
    """What is proposed: one operation tagged with its client session for deduplication.

    ``client_id`` empty means "no session": never deduplicated (for internal writes).
    """

    client_id: str
    seq: int
    op: KvOp


@codec.register(65)
@attrs.frozen
class KvResult:
    """Outcome of one command.

    ``ok``: the write happened (put, delete of a present key, successful cas) or the read
    found the key. ``value``: the value read (get), or the value found when a cas failed.
    ``revision``: the state machine's revision after the command (how many writes applied).
    ``duplicate``: a retried command answered from the session cache.
    ``stale``: a command older than its session's last one; it had no effect.
    """

    ok: bool
    value: bytes | None = None
    revision: int = 0
    error: str | None = None
    duplicate: bool = False
    stale: bool = False


@codec.register(66)
@attrs.frozen
class KvSession:
    seq: int
    result: KvResult


@codec.register(67)
@attrs.frozen
class KvSnapshot:
    data: dict[str, bytes]
    sessions: dict[str, KvSession]
    revision: int


class KvStateMachine:
    """The map plus client sessions. Applied by the shell, in log order, from one task."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._sessions: dict[str, KvSession] = {}
        self._revision = 0

    # ------------------------------------------------------------------ state machine API

    def apply(self, data: bytes) -> KvResult:
        """Apply one committed NORMAL entry's bytes; returns the proposal's result."""
        try:
            command: KvCommand = codec.decode(data, KvCommand)
        except CodecError as exc:
            return KvResult(ok=False, revision=self._revision, error=f"bad command: {exc}")
        if command.client_id:
            session = self._sessions.get(command.client_id)
            if session is not None:
                if command.seq == session.seq:
                    return attrs.evolve(session.result, duplicate=True)
                if command.seq < session.seq:
                    return KvResult(ok=False, revision=self._revision, stale=True)
        result = self._execute(command.op)
        if command.client_id:
            self._sessions[command.client_id] = KvSession(command.seq, result)
        return result

    def snapshot(self) -> bytes:
        return codec.encode(KvSnapshot(dict(self._data), dict(self._sessions), self._revision))

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's (an empty snapshot = empty state)."""
        if not data:
            self._data, self._sessions, self._revision = {}, {}, 0
            return
        snap: KvSnapshot = codec.decode(data, KvSnapshot)
        self._data = dict(snap.data)
        self._sessions = dict(snap.sessions)
        self._revision = snap.revision

    # ------------------------------------------------------------------ local reads

    def get(self, key: str) -> bytes | None:
        """Local read: linearizable only after the shell's read barrier."""
        return self._data.get(key)

    @property
    def revision(self) -> int:
        return self._revision

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> list[tuple[str, bytes]]:
        return sorted(self._data.items())

    # ------------------------------------------------------------------ internals

    def _execute(self, op: KvOp) -> KvResult:
        if isinstance(op, KvPut):
            self._data[op.key] = op.value
            self._revision += 1
            return KvResult(ok=True, revision=self._revision)
        if isinstance(op, KvGet):
            value = self._data.get(op.key)
            return KvResult(ok=value is not None, value=value, revision=self._revision)
        if isinstance(op, KvDelete):
            existed = self._data.pop(op.key, None) is not None
            if existed:
                self._revision += 1
            return KvResult(ok=existed, revision=self._revision)
        current = self._data.get(op.key)
        if current != op.expected:
            return KvResult(ok=False, value=current, revision=self._revision)
        self._data[op.key] = op.value
        self._revision += 1
        return KvResult(ok=True, revision=self._revision)
