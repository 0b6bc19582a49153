"""The KV state machine: deterministic apply, snapshots, exactly-once sessions."""

from __future__ import annotations

from p2porch.common import codec
from p2porch.consensus.kv import (
    KvCas,
    KvCommand,
    KvDelete,
    KvGet,
    KvPut,
    KvResult,
    KvStateMachine,
)


def cmd(op: KvPut | KvGet | KvDelete | KvCas, client: str = "", seq: int = 0) -> bytes:
    return codec.encode(KvCommand(client, seq, op))


def test_put_get_delete_cas() -> None:
    sm = KvStateMachine()
    assert sm.apply(cmd(KvPut("a", b"1"))) == KvResult(ok=True, revision=1)
    assert sm.apply(cmd(KvGet("a"))) == KvResult(ok=True, value=b"1", revision=1)
    assert sm.apply(cmd(KvCas("a", b"0", b"2"))) == KvResult(ok=False, value=b"1", revision=1)
    assert sm.apply(cmd(KvCas("a", b"1", b"2"))).ok
    assert sm.get("a") == b"2"
    assert sm.apply(cmd(KvDelete("a"))).ok
    assert not sm.apply(cmd(KvDelete("a"))).ok
    assert sm.apply(cmd(KvCas("a", None, b"3"))).ok
    assert sm.get("a") == b"3"
    assert sm.revision == 4


def test_same_log_same_state() -> None:
    log = [cmd(KvPut(f"k{i % 7}", b"%d" % i), "c", i + 1) for i in range(50)]
    log += [cmd(KvDelete("k3")), cmd(KvCas("k1", b"43", b"x"))]
    one, two = KvStateMachine(), KvStateMachine()
    results_one = [one.apply(e) for e in log]
    results_two = [two.apply(e) for e in log]
    assert results_one == results_two
    assert one.snapshot() == two.snapshot()


def test_retried_command_applies_once() -> None:
    sm = KvStateMachine()
    first = sm.apply(cmd(KvCas("n", None, b"1"), "client-1", 1))
    assert first.ok
    again = sm.apply(cmd(KvCas("n", None, b"1"), "client-1", 1))
    assert again.ok and again.duplicate
    assert sm.revision == 1
    stale = sm.apply(cmd(KvPut("n", b"old"), "client-1", 0))
    assert stale.stale and not stale.ok
    assert sm.get("n") == b"1"
    assert sm.apply(cmd(KvPut("n", b"2"), "client-1", 2)).ok
    assert sm.get("n") == b"2"


def test_garbage_command_is_a_deterministic_error() -> None:
    sm = KvStateMachine()
    result = sm.apply(b"\xc1garbage")
    assert not result.ok and result.error is not None
    assert result == KvStateMachine().apply(b"\xc1garbage")


def test_snapshot_restore_round_trip_keeps_sessions() -> None:
    sm = KvStateMachine()
    sm.apply(cmd(KvPut("a", b"1"), "c", 1))
    sm.apply(cmd(KvPut("b", b"2"), "d", 5))
    copy = KvStateMachine()
    copy.restore(sm.snapshot())
    assert copy.items() == [("a", b"1"), ("b", b"2")]
    assert copy.apply(cmd(KvPut("b", b"2"), "d", 5)).duplicate
    assert copy.revision == sm.revision
    copy.restore(b"")
    assert len(copy) == 0 and copy.revision == 0
